//! Scans of tables stored in several parts, split across instances of the SQL
//! guest (partial aggregates per share, then a final instance): the same
//! results as one instance and as the engine natively, the same fuel however
//! many cores run the shares, and the output policy intact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{GuestRole, Job, Limits, Outcome, Sandbox, SandboxError, TableStore};
use civicgrid_tests::sandbox::{
    local_in_shares, run_native, sandbox_with, shared_sandbox, sql_guest, tpch_small_in_parts,
    write_residents_in_groups,
};
use civicgrid_tests::tpch;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::sandbox::population_policy;

/// 2025-11-30T00:00:00Z, as in the other sandbox tests.
const AS_OF: u64 = 1_764_460_800;

/// Line items at SF 0.01 (60,175) in row groups and shares of 8,192: eight
/// shares.
const LINEITEM_SHARE_ROWS: u64 = 8_192;
const LINEITEM_PARTS: u32 = 8;

/// Splitting turned off: every query in one instance.
fn whole_sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| sandbox_with(|config| config.split_scans = false))
}

/// Splitting on, but one share at a time.
fn one_core_sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| sandbox_with(|config| config.max_parallel_instances = 1))
}

fn run_on(
    sandbox: &Sandbox,
    tables: &Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
    limits: &Limits,
) -> Result<Outcome, SandboxError> {
    let guest = sandbox
        .load(&sql_guest(), GuestRole::Sql)
        .expect("SQL guest loads");
    sandbox.run(
        &guest,
        Job {
            sql,
            tables: Arc::clone(tables),
            policy,
            privacy_budget: 0.0,
            as_of_unix_seconds: AS_OF,
        },
        limits,
    )
}

fn table(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).expect("format").to_string()
}

/// Queries beyond TPC-H over the split table, and whether they split.
const MORE_QUERIES: [(&str, bool); 6] = [
    ("select count(*) as n from lineitem", true),
    (
        "select l_returnflag, count(distinct l_suppkey) as suppliers, min(l_shipdate) as first_ship,
            max(l_comment) as last_comment, median(l_quantity) as median_qty
         from lineitem group by l_returnflag order by l_returnflag",
        true,
    ),
    (
        "select l_shipmode, sum(l_quantity) as qty from lineitem where l_quantity > 45
         group by l_shipmode having count(*) > 100 order by l_shipmode",
        true,
    ),
    (
        "select l_returnflag, sum(l_quantity) as qty,
            rank() over (order by sum(l_quantity) desc) as place
         from lineitem group by l_returnflag order by l_returnflag",
        true,
    ),
    // A limit under the aggregate depends on which rows come first: not split.
    (
        "select count(*) as n from (select l_orderkey from lineitem limit 100) as first_rows",
        false,
    ),
    // A join under the aggregate: not split (yet).
    (
        "select o_orderpriority, count(*) as n from orders join lineitem on o_orderkey = l_orderkey
         group by o_orderpriority order by o_orderpriority",
        false,
    ),
];

#[test]
fn split_scans_give_what_one_instance_and_the_native_engine_give() {
    let tables = local_in_shares(tpch_small_in_parts(), LINEITEM_SHARE_ROWS);
    let owner = OutputPolicy::owner();
    let limits = Limits::default();
    let splitting = ["q1", "q6"];
    let tpch = tpch::QUERIES
        .iter()
        .map(|&(name, sql)| (name.to_owned(), sql, splitting.contains(&name)));
    let more = MORE_QUERIES
        .iter()
        .enumerate()
        .map(|(i, &(sql, splits))| (format!("query {i}"), sql, splits));
    for (name, sql, splits) in tpch.chain(more) {
        let split = run_on(shared_sandbox(), &tables, sql, &owner, &limits)
            .unwrap_or_else(|e| panic!("{name} split: {e}"));
        let whole = run_on(whole_sandbox(), &tables, sql, &owner, &limits)
            .unwrap_or_else(|e| panic!("{name} whole: {e}"));
        let native = run_native(Arc::clone(&tables), sql, &owner, 2)
            .unwrap_or_else(|e| panic!("{name} native: {e}"));
        assert!(
            native.iter().map(RecordBatch::num_rows).sum::<usize>() > 0,
            "{name}: the native run returned nothing, so the comparison proves nothing"
        );
        assert_eq!(table(&split.batches), table(&native), "{name}: split");
        assert_eq!(table(&whole.batches), table(&native), "{name}: whole");
        assert_eq!(whole.metering.instances, 1, "{name}");
        let expected = if splits { LINEITEM_PARTS } else { 1 };
        assert_eq!(split.metering.instances, expected, "{name}: instances");
        // Every row is read once, split or not; the bytes differ only by the
        // few each batch adds (string offsets, validity bits).
        assert_eq!(split.metering.rows_read, whole.metering.rows_read, "{name}");
        let (split_bytes, whole_bytes) = (split.metering.bytes_read, whole.metering.bytes_read);
        assert!(
            split_bytes.abs_diff(whole_bytes) * 100 <= whole_bytes,
            "{name}: {split_bytes} bytes read split, {whole_bytes} whole"
        );
        if !splits {
            // A plan that does not split costs what it costs in one instance:
            // the partial instances' planning is not billed.
            assert_eq!(split.metering.fuel, whole.metering.fuel, "{name}: fuel");
        }
    }
}

#[test]
fn a_split_run_costs_the_same_fuel_on_one_core_as_on_all() {
    let tables = local_in_shares(tpch_small_in_parts(), LINEITEM_SHARE_ROWS);
    let owner = OutputPolicy::owner();
    let limits = Limits::default();
    let all = run_on(shared_sandbox(), &tables, tpch::Q1, &owner, &limits).unwrap();
    let again = run_on(shared_sandbox(), &tables, tpch::Q1, &owner, &limits).unwrap();
    let one = run_on(one_core_sandbox(), &tables, tpch::Q1, &owner, &limits).unwrap();
    assert_eq!(all.metering.instances, LINEITEM_PARTS);
    assert_eq!(one.metering.instances, LINEITEM_PARTS);
    assert!(all.metering.fuel > 0);
    assert_eq!(all.metering.fuel, again.metering.fuel, "the same run twice");
    assert_eq!(all.metering.fuel, one.metering.fuel, "one core against all");
    assert_eq!(all.metering.compute_units, one.metering.compute_units);
    assert_eq!(table(&all.batches), table(&one.batches));
}

#[test]
fn a_split_run_stops_at_the_fuel_budget_of_the_whole_run() {
    let tables = local_in_shares(tpch_small_in_parts(), LINEITEM_SHARE_ROWS);
    let owner = OutputPolicy::owner();
    let full = run_on(
        shared_sandbox(),
        &tables,
        tpch::Q1,
        &owner,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(full.metering.instances, LINEITEM_PARTS);
    // Each share needs about an eighth of the fuel, so each partial instance
    // fits half the budget; together they do not.
    let half = Limits {
        fuel: full.metering.fuel / 2,
        ..Limits::default()
    };
    match run_on(shared_sandbox(), &tables, tpch::Q1, &owner, &half) {
        Err(SandboxError::FuelExhausted { fuel }) => assert_eq!(fuel, half.fuel),
        Err(other) => panic!("expected fuel exhaustion, got {other}"),
        Ok(outcome) => panic!(
            "a run over budget released {} rows",
            outcome.metering.rows_released
        ),
    }
    // Just enough fuel is enough.
    let exact = Limits {
        fuel: full.metering.fuel + 1,
        ..Limits::default()
    };
    let outcome = run_on(shared_sandbox(), &tables, tpch::Q1, &owner, &exact).unwrap();
    assert_eq!(outcome.metering.fuel, full.metering.fuel);
}

/// Residents in row groups of 250: eight shares, each holding part of every
/// district, so thresholds must hold on the merged groups, not per share.
fn residents_in_parts() -> (tempfile::TempDir, Arc<dyn TableStore>) {
    let dir = tempfile::tempdir().unwrap();
    write_residents_in_groups(dir.path(), 250).unwrap();
    let tables = local_in_shares(dir.path(), 250);
    (dir, tables)
}

#[test]
fn the_output_policy_holds_on_split_runs() {
    let (_dir, tables) = residents_in_parts();
    let policy = population_policy();
    let limits = Limits::default();

    // Every district but Harbour (three people) has at least ten people, but
    // no share holds ten of some of them: thresholds apply to merged groups.
    let sql =
        "select district, count(*) as people from residents group by district order by district";
    let split = run_on(shared_sandbox(), &tables, sql, &policy, &limits).unwrap();
    let whole = run_on(whole_sandbox(), &tables, sql, &policy, &limits).unwrap();
    assert_eq!(split.metering.instances, 8);
    assert_eq!(table(&split.batches), table(&whole.batches));
    let released = table(&split.batches);
    assert!(!released.contains("Harbour"), "{released}");
    assert!(!released.contains("__civicgrid"), "{released}");
    assert_eq!(split.suppressed_rows, 0);
    assert_eq!(split.metering.rows_released, 7);

    // Grouping by a unique column: every group is one person, none released.
    let sql = "select income, count(*) as people from residents group by income";
    let split = run_on(shared_sandbox(), &tables, sql, &policy, &limits).unwrap();
    assert_eq!(split.metering.instances, 8);
    assert_eq!(split.metering.rows_released, 0);
    assert_eq!(split.suppressed_rows, 0);

    // A blocked column stays unreadable.
    let sql = "select district, sum(person_id) as s from residents group by district";
    match run_on(shared_sandbox(), &tables, sql, &policy, &limits) {
        Err(SandboxError::Policy { rule, column, .. }) => {
            // The analysis rule refuses the unit outside COUNT first.
            assert!(
                rule == "blocked-columns" || rule == "aggregation.functions",
                "{rule}"
            );
            assert_eq!(column.as_deref(), Some("person_id"));
        }
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(outcome) => panic!("released {} rows", outcome.metering.rows_released),
    }
}

#[test]
fn a_share_that_fails_ends_the_split_run_with_its_own_error_while_the_final_instance_waits() {
    let (_dir, tables) = residents_in_parts();
    let owner = OutputPolicy::owner();
    let limits = Limits::default();
    // Person 101,999 is the last resident, in the last share: only that
    // share divides by zero.
    // The final instance aggregates share 0 without trouble and then waits
    // for the others' states; it must stop waiting, and the run must fail
    // with the share's error, not hang or report the wait.
    let sql =
        "select district, sum(1 / (person_id - 101999)) as s from residents group by district";
    let whole = match run_on(whole_sandbox(), &tables, sql, &owner, &limits) {
        Err(SandboxError::Execution(message)) => message,
        other => panic!("expected the whole run to fail, got {other:?}"),
    };
    assert!(whole.contains("Divide by zero"), "{whole}");
    for (cores, sandbox) in [
        ("all cores", shared_sandbox()),
        ("one core", one_core_sandbox()),
    ] {
        match run_on(sandbox, &tables, sql, &owner, &limits) {
            Err(SandboxError::Execution(message)) => assert_eq!(message, whole, "{cores}"),
            other => panic!("{cores}: expected the share's error, got {other:?}"),
        }
    }
    // The same query without the failing row runs split.
    let sql =
        "select district, sum(1 / (person_id - 102000)) as s from residents group by district";
    let split = run_on(shared_sandbox(), &tables, sql, &owner, &limits).unwrap();
    assert_eq!(split.metering.instances, 8);
}

/// The spans a subscriber saw closed: name, fields and parent's name.
#[derive(Clone, Default)]
struct SpanRecorder(Arc<Mutex<Vec<ClosedSpan>>>);

#[derive(Debug)]
struct ClosedSpan {
    name: &'static str,
    fields: HashMap<String, String>,
    parent: Option<&'static str>,
}

#[derive(Default)]
struct SpanFields(HashMap<String, String>);

impl Visit for SpanFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S> Layer<S> for SpanRecorder
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let mut fields = SpanFields::default();
        attributes.record(&mut fields);
        if let Some(span) = context.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        if let Some(span) = context.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: Id, context: Context<'_, S>) {
        let Some(span) = context.span(&id) else {
            return;
        };
        let fields = span
            .extensions_mut()
            .remove::<SpanFields>()
            .unwrap_or_default();
        self.0.lock().unwrap().push(ClosedSpan {
            name: span.name(),
            fields: fields.0,
            parent: span.parent().map(|parent| parent.name()),
        });
    }
}

#[test]
fn a_split_runs_instances_are_spans_in_the_callers_trace_with_their_share_and_fuel() {
    let recorder = SpanRecorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let tables = local_in_shares(tpch_small_in_parts(), LINEITEM_SHARE_ROWS);
    let owner = OutputPolicy::owner();
    let run = || {
        run_on(
            shared_sandbox(),
            &tables,
            tpch::Q1,
            &owner,
            &Limits::default(),
        )
    };
    // The shares run on the worker threads too: their spans must reach this
    // thread's subscriber, under the caller's span.
    let outcome = tracing::subscriber::with_default(subscriber, || {
        // Other tests in this process run without a subscriber, and while
        // this one is the only subscriber, tracing caches a span's interest
        // from the subscriber of whichever thread meets the span first. So
        // meet every span once, then have their interest asked again here.
        run().unwrap();
        tracing::callsite::rebuild_interest_cache();
        recorder.0.lock().unwrap().clear();
        tracing::info_span!("query").in_scope(run)
    })
    .unwrap();
    assert_eq!(outcome.metering.instances, LINEITEM_PARTS);
    let spans = recorder.0.lock().unwrap();
    let instances: Vec<&ClosedSpan> = spans
        .iter()
        .filter(|span| span.name == "sandbox_instance")
        .collect();
    assert_eq!(instances.len(), LINEITEM_PARTS as usize, "{spans:#?}");
    let field = |span: &ClosedSpan, name: &str| -> String {
        span.fields
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {span:?}"))
            .clone()
    };
    let mut parts_seen = Vec::new();
    let mut fuel = 0u64;
    for span in &instances {
        assert_eq!(span.parent, Some("query"), "{span:?}");
        let span_fuel: u64 = field(span, "fuel").parse().unwrap();
        assert!(span_fuel > 0, "{span:?}");
        fuel += span_fuel;
        let ran_us: u64 = field(span, "ran_us").parse().unwrap();
        let startup_us: u64 = field(span, "startup_us").parse().unwrap();
        assert!(startup_us <= ran_us, "{span:?}");
        assert_eq!(field(span, "parts"), LINEITEM_PARTS.to_string());
        let part = field(span, "part").parse::<u32>().unwrap();
        parts_seen.push(part);
        // The final instance aggregates share 0 itself.
        match field(span, "stage").as_str() {
            "partial" => assert_ne!(part, 0, "{span:?}"),
            "final" => assert_eq!(part, 0, "{span:?}"),
            other => panic!("a split run's instance in stage {other}"),
        }
    }
    parts_seen.sort_unstable();
    assert_eq!(parts_seen, (0..LINEITEM_PARTS).collect::<Vec<_>>());
    assert_eq!(
        fuel, outcome.metering.fuel,
        "the instances' fuel is the run's"
    );
}
