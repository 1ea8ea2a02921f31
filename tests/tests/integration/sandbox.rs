//! The sandbox with the real SQL guest (DataFusion compiled to wasm32): TPC-H
//! results equal to the same engine run natively, the output policy rule by
//! rule (and attempts to get around it), metering, and consumer algorithms.

use std::collections::BTreeMap;
use std::sync::Arc;

use civicgrid_sandbox::policy::{AggregationRule, DifferentialPrivacy, ListRule, OutputPolicy};
use civicgrid_sandbox::{GuestRole, Job, Limits, Outcome, SandboxError, TableStore};
use civicgrid_tests::sandbox::{
    example_algorithm, local, run_native, shared_sandbox, sql_guest, tpch_small, write_residents,
};
use civicgrid_tests::tpch;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;

/// The time the guest's clock reads in these tests (2025-11-30T00:00:00Z).
const AS_OF: u64 = 1_764_460_800;

pub(crate) fn run_sql(
    tables: Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
) -> Result<Outcome, SandboxError> {
    run_sql_as_of(tables, sql, policy, AS_OF)
}

fn run_sql_as_of(
    tables: Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
    as_of_unix_seconds: u64,
) -> Result<Outcome, SandboxError> {
    let sandbox = shared_sandbox();
    let guest = sandbox
        .load(&sql_guest(), GuestRole::Sql)
        .expect("SQL guest loads");
    sandbox.run(
        &guest,
        Job {
            sql,
            tables,
            policy,
            privacy_budget: 0.0,
            as_of_unix_seconds,
        },
        &Limits::default(),
    )
}

fn table(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).expect("format").to_string()
}

#[test]
fn tpch_queries_in_the_sandbox_equal_the_same_engine_native() {
    let tables = local(tpch_small());
    let owner = OutputPolicy::owner();
    for (name, sql) in tpch::QUERIES {
        let sandboxed =
            run_sql(Arc::clone(&tables), sql, &owner).unwrap_or_else(|e| panic!("{name}: {e}"));
        let native = run_native(Arc::clone(&tables), sql, &owner, 2)
            .unwrap_or_else(|e| panic!("{name} native: {e}"));
        let rows: usize = native.iter().map(RecordBatch::num_rows).sum();
        assert!(
            rows > 0,
            "{name}: the native run returned nothing, so the comparison proves nothing"
        );
        assert_eq!(table(&sandboxed.batches), table(&native), "{name}");
        assert_eq!(sandboxed.metering.rows_released, rows as u64, "{name}");
    }
}

#[test]
fn the_same_query_costs_the_same_and_metering_counts_what_moved() {
    let tables = local(tpch_small());
    let owner = OutputPolicy::owner();
    let first = run_sql(Arc::clone(&tables), tpch::Q6, &owner).unwrap();
    let second = run_sql(Arc::clone(&tables), tpch::Q6, &owner).unwrap();
    assert_eq!(
        first.metering.fuel, second.metering.fuel,
        "fuel must be deterministic"
    );
    assert_eq!(first.metering.compute_units, second.metering.compute_units);
    assert!(first.metering.compute_units > 0);
    // Q6 reads every line item (4 columns of them), and releases one row.
    let lineitems = 60_175;
    assert_eq!(first.metering.rows_read, lineitems);
    assert!(
        first.metering.bytes_read > lineitems * 4 * 4,
        "{:?}",
        first.metering
    );
    assert_eq!(first.metering.rows_released, 1);
    assert!(first.metering.bytes_released > 0);
    // Starting the instance is part of the run's wall time, not all of it.
    assert!(
        first.metering.startup > std::time::Duration::ZERO
            && first.metering.startup < first.metering.wall_time,
        "{:?}",
        first.metering
    );
    // A query that does more costs more.
    let q1 = run_sql(tables, tpch::Q1, &owner).unwrap();
    assert!(q1.metering.fuel > first.metering.fuel);
}

/// The host drops the rows a query's simple filter rules out before they
/// cross into the guest. The same count with the filter in a form only the
/// engine can judge (`abs` of a quantity that is never negative) reads the
/// same rows and gives the same answer, and its rows cost far more fuel:
/// every line item crosses and is judged in Wasm.
#[test]
fn rows_a_simple_filter_rules_out_never_cross_into_the_guest() {
    let tables = local(tpch_small());
    let owner = OutputPolicy::owner();
    let query = |condition: &str| {
        format!(
            "SELECT count(*) AS items, sum(l_extendedprice) AS total FROM lineitem WHERE {condition}"
        )
    };
    let pushed = query("l_quantity < 5");
    let engine_only = query("abs(l_quantity) < 5");
    let filtered = run_sql(Arc::clone(&tables), &pushed, &owner).unwrap();
    let judged_in_wasm = run_sql(Arc::clone(&tables), &engine_only, &owner).unwrap();
    let native = run_native(Arc::clone(&tables), &pushed, &owner, 1).unwrap();
    assert_eq!(table(&filtered.batches), table(&native));
    assert_eq!(table(&filtered.batches), table(&judged_in_wasm.batches));
    assert!(
        !table(&native).contains("| 0 "),
        "the filter must keep some rows for the comparison to mean anything: {}",
        table(&native)
    );
    // Both read every line item: metering counts what was scanned.
    assert_eq!(filtered.metering.rows_read, 60_175);
    assert_eq!(judged_in_wasm.metering.rows_read, 60_175);
    // What rows cost is a query's fuel beyond that of the same query over
    // no rows at all (`WHERE false` plans to no scan): planning and set-up.
    // Only the few rows the filter keeps cross, so theirs is a fraction.
    let no_rows = run_sql(Arc::clone(&tables), &query("false"), &owner).unwrap();
    assert_eq!(no_rows.metering.rows_read, 0);
    let rows_cost = |fuel: u64| fuel.saturating_sub(no_rows.metering.fuel);
    assert!(
        rows_cost(filtered.metering.fuel) * 4 < rows_cost(judged_in_wasm.metering.fuel),
        "pushed {} against judged in Wasm {}, {} with no rows",
        filtered.metering.fuel,
        judged_in_wasm.metering.fuel,
        no_rows.metering.fuel
    );
}

/// SQL's `now()` reads the time the caller fixed, not the wall clock: fuel
/// depends on it, so a wall clock made the same query cost a few units more
/// or less from one second to the next.
#[test]
fn now_reads_the_time_the_job_fixes() {
    let tables = local(tpch_small());
    let owner = OutputPolicy::owner();
    let sql = "SELECT to_unixtime(now()) AS t";
    for as_of in [AS_OF, AS_OF + 86_399] {
        let outcome = run_sql_as_of(Arc::clone(&tables), sql, &owner, as_of).unwrap();
        assert_eq!(
            rows_of(&outcome),
            format!("+------------+\n| t          |\n+------------+\n| {as_of} |\n+------------+")
        );
    }
}

fn rows_of(outcome: &Outcome) -> String {
    table(&outcome.batches)
}

fn residents() -> (tempfile::TempDir, Arc<dyn TableStore>) {
    let dir = tempfile::tempdir().unwrap();
    write_residents(dir.path()).unwrap();
    let tables = local(dir.path());
    (dir, tables)
}

/// The population product's policy: person_id blocked, k = 10 people.
pub(crate) fn population_policy() -> OutputPolicy {
    OutputPolicy {
        blocked_columns: vec!["person_id".into()],
        aggregation: Some(AggregationRule {
            privacy_unit_columns: vec!["person_id".into()],
            min_units: 10,
            column_min_units: BTreeMap::new(),
            dimension_columns: None,
            join_columns: vec!["district".into(), "name".into()],
            ..Default::default()
        }),
        list: Some(ListRule {
            columns: vec!["district".into(), "age_band".into()],
            max_rows: 5,
        }),
        max_result_bytes: 1 << 20,
        ..OutputPolicy::default()
    }
}

#[track_caller]
fn assert_refused(result: Result<Outcome, SandboxError>, rule: &str, column: Option<&str>) {
    match result {
        Err(SandboxError::Policy {
            rule: got_rule,
            column: got_column,
            message,
        }) => {
            assert_eq!(got_rule, rule, "{message}");
            assert_eq!(got_column.as_deref(), column, "{message}");
        }
        Err(other) => panic!("expected a refusal by {rule}, got {other}"),
        Ok(outcome) => panic!(
            "expected a refusal by {rule}, got {} rows",
            outcome.metering.rows_released
        ),
    }
}

/// Read in any clause, the blocked unit is refused: by the blocked-column
/// rule in list queries, and in aggregate queries by the analysis rule,
/// which judges the plan as written first.
#[test]
fn a_blocked_column_is_unreadable_in_any_clause() {
    let (_dir, tables) = residents();
    let policy = population_policy();
    for (sql, rule, column) in [
        (
            "select person_id from residents",
            "blocked-columns",
            Some("person_id"),
        ),
        (
            "select * from residents",
            "blocked-columns",
            Some("person_id"),
        ),
        (
            "select district, count(*) from residents where person_id > 100010 group by district",
            "aggregation.dimension-columns",
            Some("person_id"),
        ),
        (
            "select district, count(*) from residents group by district having max(person_id) > 0",
            "aggregation.functions",
            Some("person_id"),
        ),
        (
            "select district, count(*) c from residents group by district order by min(person_id)",
            "aggregation.functions",
            Some("person_id"),
        ),
        (
            "select d.name, count(*) from districts d join residents r on r.person_id = d.area_km2 group by d.name",
            "aggregation.joins",
            Some("area_km2"),
        ),
        (
            "select district, count(*) from residents where district in (select district from residents where person_id = 100001) group by district",
            "aggregation.shape",
            None,
        ),
        (
            "select district, sum(person_id) from residents group by district",
            "aggregation.functions",
            Some("person_id"),
        ),
    ] {
        assert_refused(run_sql(Arc::clone(&tables), sql, &policy), rule, column);
    }
}

fn rows(outcome: &Outcome) -> String {
    table(&outcome.batches)
}

#[test]
fn groups_below_the_threshold_are_suppressed_and_the_count_is_never_released() {
    let (_dir, tables) = residents();
    let outcome = run_sql(
        tables,
        "select district, count(*) as people from residents group by district order by district",
        &population_policy(),
    )
    .unwrap();
    let released = rows(&outcome);
    assert!(
        !released.contains("Harbour"),
        "a district of three people was released:\n{released}"
    );
    assert!(released.contains("North"), "{released}");
    assert_eq!(
        outcome.suppressed_rows, 0,
        "withheld in the guest, uncounted"
    );
    assert_eq!(outcome.metering.rows_released, 7);
    assert!(!released.contains("__civicgrid"), "{released}");
    let people: usize = outcome.batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(people, 7);
}

#[test]
fn grouping_by_a_unique_column_releases_nothing() {
    let (_dir, tables) = residents();
    let outcome = run_sql(
        Arc::clone(&tables),
        "select income, count(*) from residents group by income",
        &population_policy(),
    )
    .unwrap();
    assert_eq!(outcome.metering.rows_released, 0);
    assert_eq!(outcome.suppressed_rows, 0);
    // With dimensions named, the same query is refused before it runs.
    let mut policy = population_policy();
    policy.aggregation.as_mut().unwrap().dimension_columns =
        Some(vec!["district".into(), "age_band".into()]);
    assert_refused(
        run_sql(
            tables,
            "select income, count(*) from residents group by income",
            &policy,
        ),
        "aggregation.dimension-columns",
        Some("income"),
    );
}

#[test]
fn differencing_two_counts_on_a_near_unique_filter_is_refused() {
    let (_dir, tables) = residents();
    let mut policy = population_policy();
    policy.aggregation.as_mut().unwrap().dimension_columns =
        Some(vec!["district".into(), "age_band".into()]);
    // The first half of a differencing attack is an ordinary count...
    let all = run_sql(
        Arc::clone(&tables),
        "select count(*) from residents where district = 'North'",
        &policy,
    )
    .unwrap();
    assert_eq!(all.metering.rows_released, 1);
    // ...the second leaves out one person by a near-unique column: refused.
    assert_refused(
        run_sql(
            Arc::clone(&tables),
            "select count(*) from residents where district = 'North' and income <> 20111",
            &policy,
        ),
        "aggregation.dimension-columns",
        Some("income"),
    );
    // Hiding the column in a subquery alias does not help.
    assert_refused(
        run_sql(
            tables,
            "select count(*) from (select district, income as x from residents) t where x <> 20111",
            &policy,
        ),
        "aggregation.dimension-columns",
        Some("income"),
    );
    // Summing a non-dimension column is fine: it is inside an aggregate.
    let (_dir, tables) = residents();
    run_sql(
        tables,
        "select district, sum(income) from residents group by district",
        &policy,
    )
    .unwrap();
}

#[test]
fn a_join_that_shrinks_groups_is_thresholded_after_the_join() {
    let (_dir, tables) = residents();
    let outcome = run_sql(
        tables,
        "select d.name, count(*) as people, sum(r.income) as income
         from residents r join districts d on r.district = d.name
         where d.area_km2 >= 16 group by d.name order by d.name",
        &population_policy(),
    )
    .unwrap();
    // Areas 16 and 17 are River (~285 people) and Harbour (3 people).
    let released = rows(&outcome);
    assert!(
        released.contains("River") && !released.contains("Harbour"),
        "{released}"
    );
}

#[test]
fn a_column_override_raises_the_threshold_for_queries_that_read_it() {
    let (_dir, tables) = residents();
    let mut policy = population_policy();
    policy
        .aggregation
        .as_mut()
        .unwrap()
        .column_min_units
        .insert("household_size".into(), 500);
    let by_district = run_sql(
        Arc::clone(&tables),
        "select district, count(*) from residents group by district",
        &policy,
    )
    .unwrap();
    assert_eq!(by_district.metering.rows_released, 7);
    // Groups of district x household size hold fewer than 500 people each.
    let by_household = run_sql(
        tables,
        "select district, household_size, count(*) from residents group by district, household_size",
        &policy,
    )
    .unwrap();
    assert_eq!(by_household.metering.rows_released, 0);
}

#[test]
fn list_queries_read_only_listable_columns_and_stop_at_the_row_cap() {
    let (_dir, tables) = residents();
    let policy = population_policy();
    let listed = run_sql(
        Arc::clone(&tables),
        "select district, age_band from residents",
        &policy,
    )
    .unwrap();
    assert_eq!(listed.metering.rows_released, 5);
    assert!(listed.truncated);
    assert_refused(
        run_sql(
            Arc::clone(&tables),
            "select district, income from residents",
            &policy,
        ),
        "list.columns",
        Some("income"),
    );
    assert_refused(
        run_sql(
            Arc::clone(&tables),
            "select district from residents where income > 50000",
            &policy,
        ),
        "list.columns",
        Some("income"),
    );
    // A product that allows no list queries refuses them outright.
    let mut aggregates_only = policy.clone();
    aggregates_only.list = None;
    assert_refused(
        run_sql(tables, "select district from residents", &aggregates_only),
        "list",
        None,
    );
}

#[test]
fn a_result_over_the_size_cap_is_not_released() {
    let (_dir, tables) = residents();
    let mut policy = population_policy();
    policy.list.as_mut().unwrap().max_rows = 10_000;
    policy.max_result_bytes = 1_000;
    let err = run_sql(tables, "select district, age_band from residents", &policy).unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::ResultTooLarge {
                limit_bytes: 1_000,
                rule: "max_result_bytes"
            }
        ),
        "{err}"
    );
}

#[test]
fn statements_other_than_queries_are_refused_and_bad_sql_is_explained() {
    let (_dir, tables) = residents();
    let policy = OutputPolicy::owner();
    for sql in [
        "create table copy as select * from residents",
        "insert into residents values ('x', 'y', 1, 2, 3)",
        "copy residents to '/tmp/stolen.csv'",
        "drop table residents",
        "set datafusion.execution.batch_size = 1",
        "create external table t stored as csv location '/etc/passwd'",
    ] {
        let err = run_sql(Arc::clone(&tables), sql, &policy).unwrap_err();
        assert!(matches!(err, SandboxError::Query(_)), "{sql}: {err}");
    }
    let err = run_sql(Arc::clone(&tables), "select nosuch from residents", &policy).unwrap_err();
    assert!(
        matches!(&err, SandboxError::Query(m) if m.contains("nosuch")),
        "{err}"
    );
    let err = run_sql(tables, "selec district from residents", &policy).unwrap_err();
    assert!(matches!(err, SandboxError::Query(_)), "{err}");
}

#[test]
fn sql_features_beyond_tpch_work_in_the_sandbox() {
    let (_dir, tables) = residents();
    let owner = OutputPolicy::owner();
    for sql in [
        "select district, age_band, count(*) c, rank() over (partition by district order by count(*) desc) r
         from residents group by district, age_band order by district, r, age_band",
        "select upper(district) d, round(avg(income) / 1000.0, 2) k from residents group by district having count(*) > 10 order by d",
        "select district, sum(income) over (order by district rows between unbounded preceding and current row) s
         from (select district, sum(income) income from residents group by district) order by district",
        "with big as (select district from residents group by district having count(*) > 100)
         select r.age_band, count(*) from residents r join big on r.district = big.district group by r.age_band order by 1",
    ] {
        let sandboxed = run_sql(Arc::clone(&tables), sql, &owner).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let native = run_native(Arc::clone(&tables), sql, &owner, 1).unwrap();
        assert!(sandboxed.metering.rows_released > 0, "{sql}");
        assert_eq!(table(&sandboxed.batches), table(&native), "{sql}");
    }
}

fn dp_policy() -> OutputPolicy {
    let mut policy = population_policy();
    policy.differential_privacy = Some(DifferentialPrivacy {
        epsilon_per_query: 1.0,
        bounds: [("income".to_owned(), (0.0, 100_000.0))].into(),
        max_rows_per_unit: 1,
    });
    policy
}

fn run_with_budget(
    tables: &Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
    budget: f64,
) -> Result<Outcome, SandboxError> {
    let sandbox = shared_sandbox();
    let guest = sandbox.load(&sql_guest(), GuestRole::Sql).unwrap();
    sandbox.run(
        &guest,
        Job {
            sql,
            tables: Arc::clone(tables),
            policy,
            privacy_budget: budget,
            as_of_unix_seconds: 1_764_460_800,
        },
        &Limits::default(),
    )
}

fn int_column(outcome: &Outcome, column: usize) -> Vec<i64> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    outcome
        .batches
        .iter()
        .flat_map(|b| {
            b.column(column)
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

#[test]
fn differential_privacy_noises_counts_and_sums_and_debits_the_budget() {
    let (_dir, tables) = residents();
    let policy = dp_policy();
    let sql = "select district, count(*) as people, sum(income) as income from residents group by district order by district";
    let exact = run_sql(Arc::clone(&tables), sql, &population_policy()).unwrap();
    let first = run_with_budget(&tables, sql, &policy, 3.0).unwrap();
    let second = run_with_budget(&tables, sql, &policy, 3.0).unwrap();
    assert_eq!(first.privacy_spent, 1.0);
    assert_eq!(first.privacy_budget_left, 2.0);
    assert_eq!(
        first.metering.rows_released, 7,
        "the threshold still applies"
    );
    let (truth, a, b) = (
        int_column(&exact, 1),
        int_column(&first, 1),
        int_column(&second, 1),
    );
    assert_ne!(a, b, "two runs drew the same noise for every district");
    // Count noise: Laplace with scale 1 / (1/2) = 2; 60 is 30 scales out.
    for (t, n) in truth.iter().zip(&a) {
        assert!((t - n).abs() < 60, "count {n} too far from {t}");
    }
    assert_ne!(truth, a, "counts were released exactly");
    // Sum noise: scale 100,000 / (1/2) = 200,000; sums are in the millions.
    let (truth, noised) = (int_column(&exact, 2), int_column(&first, 2));
    for (t, n) in truth.iter().zip(&noised) {
        assert!((t - n).abs() < 6_000_000, "sum {n} too far from {t}");
    }
    assert_ne!(truth, noised);
    // Averages are noised too, and list queries spend nothing.
    let mean = run_with_budget(
        &tables,
        "select district, avg(income) from residents group by district",
        &policy,
        1.0,
    )
    .unwrap();
    assert_eq!(mean.privacy_budget_left, 0.0);
    let listed = run_with_budget(&tables, "select district from residents", &policy, 1.0).unwrap();
    assert_eq!(listed.privacy_spent, 0.0);
}

#[test]
fn differential_privacy_refuses_what_it_cannot_noise_and_an_empty_budget() {
    let (_dir, tables) = residents();
    let policy = dp_policy();
    let err = run_with_budget(
        &tables,
        "select district, count(*) from residents group by district",
        &policy,
        0.5,
    )
    .unwrap_err();
    assert!(
        matches!(err, SandboxError::PrivacyBudget { needed, .. } if needed == 1.0),
        "{err}"
    );
    // MAX is not declared for income: the analysis rule refuses it before
    // the noise could.
    assert_refused(
        run_with_budget(
            &tables,
            "select district, max(income) from residents group by district",
            &policy,
            10.0,
        ),
        "aggregation.functions",
        Some("income"),
    );
    for (sql, column) in [
        (
            "select district, sum(household_size) from residents group by district",
            Some("household_size"),
        ),
        (
            "select district, count(*) * 2 from residents group by district",
            None,
        ),
        (
            "select district, count(*) from residents group by district having count(*) > 100",
            None,
        ),
        (
            "select district, count(*) c from residents group by district order by c",
            None,
        ),
        (
            "select district, count(distinct age_band) from residents group by district",
            None,
        ),
    ] {
        assert_refused(
            run_with_budget(&tables, sql, &policy, 10.0),
            "differential-privacy",
            column,
        );
    }
}

#[test]
fn a_consumer_algorithm_runs_only_when_approved_and_its_output_is_thresholded() {
    let (_dir, tables) = residents();
    let sandbox = shared_sandbox();
    let wasm = example_algorithm();
    let guest = sandbox.load(&wasm, GuestRole::Algorithm).unwrap();
    let input = r#"{"table": "residents", "group_by": "district", "unit": "person_id"}"#;
    let run = |policy: &OutputPolicy| {
        sandbox.run(
            &guest,
            Job {
                sql: input,
                tables: Arc::clone(&tables),
                policy,
                privacy_budget: 0.0,
                as_of_unix_seconds: 1_764_460_800,
            },
            &Limits::default(),
        )
    };
    let mut policy = population_policy();
    let err = run(&policy).unwrap_err();
    assert!(
        matches!(err, SandboxError::AlgorithmNotApproved { .. }),
        "{err}"
    );
    policy.approved_algorithms.push(guest.sha256().to_owned());
    let outcome = run(&policy).unwrap();
    let released = rows(&outcome);
    assert!(
        released.contains("North") && !released.contains("Harbour"),
        "{released}"
    );
    assert_eq!(outcome.suppressed_rows, 1);
    assert!(outcome.metering.fuel > 0 && outcome.metering.rows_read == 2000);
    let again = run(&policy).unwrap();
    assert_eq!(
        again.metering.fuel, outcome.metering.fuel,
        "a component's fuel is deterministic"
    );
}

/// The example is a component of sandbox/wit/algorithm.wit: the host's
/// rules reach it through `host` (a blocked column is never streamed), and
/// its own failures come back in its words.
#[test]
fn the_example_algorithm_is_a_component_the_host_polices_and_that_reports_its_failures() {
    let (_dir, tables) = residents();
    let sandbox = shared_sandbox();
    let wasm = example_algorithm();
    assert_eq!(
        &wasm[4..8],
        &[0x0d, 0, 1, 0],
        "a component, not a core module"
    );
    let guest = sandbox.load(&wasm, GuestRole::Algorithm).unwrap();
    let mut policy = population_policy();
    // A blocked column may not be listed either: the policy would be refused
    // as inconsistent before the algorithm ran.
    policy.blocked_columns.push("age_band".into());
    if let Some(list) = &mut policy.list {
        list.columns.retain(|c| c != "age_band");
    }
    policy.approved_algorithms.push(guest.sha256().to_owned());
    let run = |input: &str| {
        sandbox.run(
            &guest,
            Job {
                sql: input,
                tables: Arc::clone(&tables),
                policy: &policy,
                privacy_budget: 0.0,
                as_of_unix_seconds: 1_764_460_800,
            },
            &Limits::default(),
        )
    };
    assert_refused(
        run(r#"{"table": "residents", "group_by": "age_band", "unit": "person_id"}"#),
        "blocked-columns",
        Some("age_band"),
    );
    let err =
        run(r#"{"table": "residents", "group_by": "nowhere", "unit": "person_id"}"#).unwrap_err();
    assert!(
        matches!(&err, SandboxError::Query(m) if m == "table residents has no column nowhere"),
        "{err}"
    );
    let err = run("not json").unwrap_err();
    assert!(
        matches!(&err, SandboxError::Query(m) if m.starts_with("input: ")),
        "{err}"
    );
}
