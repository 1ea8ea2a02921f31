//! Which of DataFusion's built-in functions a query's session registers.
//!
//! Every run is a fresh instance, so registering all ~190 built-in
//! functions means constructing each of them (its signature, aliases and
//! documentation) and hashing its names, on every query, and then cloning
//! the registry into every copy of the session state planning makes. A
//! profile of `select 1` put a third of its time there. A query can only
//! call functions it names, so the session gets the families whose names
//! appear among the query's words; a query that names none gets none. The
//! aggregates are one large family that nearly every query needs, so a query
//! whose only aggregates are COUNT, SUM, AVG, MIN or MAX gets just those.
//!
//! The few functions DataFusion plans from syntax rather than from a name
//! (`^` is `power`, `DISTINCT ON` is `first_value`) are covered below, and
//! whatever this misses still plans: a query that fails to plan with the
//! families it named is planned again with every function, and that
//! attempt's error is the one reported. Which families a query gets depends
//! only on its text, so its fuel stays deterministic.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::catalog::TableFunction;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::functions;
use datafusion::functions_aggregate as aggregates;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};

/// The built-in function families, with every name and alias in each (a unit
/// test keeps these equal to what DataFusion registers).
const CORE: &[&str] = &[
    "nullif",
    "arrow_cast",
    "arrow_field",
    "arrow_try_cast",
    "cast_to_type",
    "try_cast_to_type",
    "arrow_metadata",
    "with_metadata",
    "nvl",
    "ifnull",
    "nvl2",
    "overlay",
    "arrow_typeof",
    "named_struct",
    "get_field",
    "coalesce",
    "greatest",
    "least",
    "union_extract",
    "union_tag",
    "version",
    "input_file_name",
    "struct",
    "row",
    "file_row_index",
];
const DATETIME: &[&str] = &[
    "current_date",
    "today",
    "current_time",
    "date_bin",
    "date_part",
    "datepart",
    "date_trunc",
    "datetrunc",
    "from_unixtime",
    "make_date",
    "make_time",
    "now",
    "current_timestamp",
    "to_char",
    "date_format",
    "to_date",
    "to_local_time",
    "to_time",
    "to_unixtime",
    "to_timestamp",
    "to_timestamp_seconds",
    "to_timestamp_millis",
    "to_timestamp_micros",
    "to_timestamp_nanos",
];
const MATH: &[&str] = &[
    "abs",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "cbrt",
    "ceil",
    "cos",
    "cosh",
    "cot",
    "degrees",
    "exp",
    "factorial",
    "floor",
    "gcd",
    "isnan",
    "iszero",
    "lcm",
    "ln",
    "log",
    "log2",
    "log10",
    "nanvl",
    "pi",
    "power",
    "pow",
    "radians",
    "random",
    "rand",
    "signum",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "round",
    "trunc",
];
const REGEX: &[&str] = &[
    "regexp_count",
    "regexp_match",
    "regexp_instr",
    "regexp_like",
    "regexp_replace",
];
const UNICODE: &[&str] = &[
    "character_length",
    "length",
    "char_length",
    "find_in_set",
    "initcap",
    "left",
    "lpad",
    "reverse",
    "right",
    "rpad",
    "strpos",
    "instr",
    "position",
    "substr",
    "substring",
    "substr_index",
    "substring_index",
    "translate",
];
const STRING: &[&str] = &[
    "ascii",
    "bit_length",
    "btrim",
    "trim",
    "chr",
    "concat",
    "concat_ws",
    "ends_with",
    "levenshtein",
    "lower",
    "ltrim",
    "octet_length",
    "repeat",
    "replace",
    "rtrim",
    "split_part",
    "starts_with",
    "to_hex",
    "upper",
    "uuid",
    "contains",
];
const ENCODING: &[&str] = &["encode", "decode"];
const AGGREGATE: &[&str] = &[
    "any_value",
    "array_agg",
    "first_value",
    "last_value",
    "covar_samp",
    "covar",
    "covar_pop",
    "corr",
    "sum",
    "max",
    "min",
    "median",
    "count",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
    "regr_avgx",
    "regr_avgy",
    "regr_sxx",
    "regr_syy",
    "regr_sxy",
    "var",
    "var_sample",
    "var_samp",
    "var_pop",
    "var_population",
    "stddev",
    "stddev_samp",
    "stddev_pop",
    "approx_median",
    "approx_distinct",
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "percentile_cont",
    "quantile_cont",
    "string_agg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "avg",
    "mean",
    "grouping",
    "nth_value",
];
type AggregateConstructor = fn() -> Arc<AggregateUDF>;

/// The aggregates most queries use, each with its names, registered on
/// their own when a query names no other aggregate.
const COMMON_AGGREGATES: &[(&[&str], AggregateConstructor)] = &[
    (&["count"], aggregates::count::count_udaf),
    (&["sum"], aggregates::sum::sum_udaf),
    (&["avg", "mean"], aggregates::average::avg_udaf),
    (&["min"], aggregates::min_max::min_udaf),
    (&["max"], aggregates::min_max::max_udaf),
];
const WINDOW: &[&str] = &[
    "cume_dist",
    "row_number",
    "lead",
    "lag",
    "rank",
    "dense_rank",
    "percent_rank",
    "ntile",
    "first_value",
    "last_value",
    "nth_value",
];
const TABLE: &[&str] = &["generate_series", "range"];

/// The function families one session registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Families {
    core: bool,
    datetime: bool,
    math: bool,
    regex: bool,
    unicode: bool,
    string: bool,
    encoding: bool,
    aggregate: Aggregates,
    window: bool,
    table: bool,
}

/// Which aggregates a session registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Aggregates {
    #[default]
    None,
    /// Only these of `COMMON_AGGREGATES` (bit i: entry i).
    Common(u8),
    All,
}

impl Families {
    /// Every built-in function, as DataFusion's default session has them.
    pub(crate) fn all() -> Self {
        Self {
            core: true,
            datetime: true,
            math: true,
            regex: true,
            unicode: true,
            string: true,
            encoding: true,
            aggregate: Aggregates::All,
            window: true,
            table: true,
        }
    }

    /// The families any of whose names is a word of `sql` (case-insensitive;
    /// words in literals and comments count too, which only costs a little).
    pub(crate) fn named_in(sql: &str) -> Self {
        let words: HashSet<String> = sql
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| !word.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        let named = |family: &[&str]| family.iter().any(|name| words.contains(*name));
        let common = COMMON_AGGREGATES
            .iter()
            .enumerate()
            .filter(|(_, (names, _))| named(names))
            .fold(0u8, |mask, (i, _)| mask | 1 << i);
        let uncommon = AGGREGATE.iter().any(|name| {
            words.contains(*name)
                && !COMMON_AGGREGATES
                    .iter()
                    .any(|(names, _)| names.contains(name))
        });
        // DISTINCT ON is rewritten into first_value by the optimizer, which
        // looks it up by name.
        let distinct_on = words.contains("distinct") && words.contains("on");
        let aggregate = match (uncommon || distinct_on, common) {
            (true, _) => Aggregates::All,
            (false, 0) => Aggregates::None,
            (false, mask) => Aggregates::Common(mask),
        };
        Self {
            core: named(CORE),
            datetime: named(DATETIME),
            // `a ^ b` is planned as power(a, b).
            math: named(MATH) || sql.contains('^'),
            regex: named(REGEX),
            unicode: named(UNICODE),
            string: named(STRING),
            encoding: named(ENCODING),
            aggregate,
            window: named(WINDOW),
            table: named(TABLE),
        }
    }

    /// A session builder with these families and DataFusion's other
    /// defaults (planners, file formats, table factories).
    pub(crate) fn session(self) -> SessionStateBuilder {
        let mut scalar: Vec<Arc<ScalarUDF>> = Vec::new();
        let mut add = |on: bool, family: fn() -> Vec<Arc<ScalarUDF>>| {
            if on {
                scalar.extend(family());
            }
        };
        add(self.core, functions::core::functions);
        add(self.datetime, functions::datetime::functions);
        add(self.encoding, functions::encoding::functions);
        add(self.math, functions::math::functions);
        add(self.regex, functions::regex::functions);
        add(self.unicode, functions::unicode::functions);
        add(self.string, functions::string::functions);
        let aggregate: Vec<Arc<AggregateUDF>> = match self.aggregate {
            Aggregates::All => SessionStateDefaults::default_aggregate_functions(),
            Aggregates::None => Vec::new(),
            Aggregates::Common(mask) => COMMON_AGGREGATES
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & 1 << i != 0)
                .map(|(_, (_, udaf))| udaf())
                .collect(),
        };
        let window: Vec<Arc<WindowUDF>> = match self.window {
            true => SessionStateDefaults::default_window_functions(),
            false => Vec::new(),
        };
        let table: Vec<Arc<TableFunction>> = match self.table {
            true => SessionStateDefaults::default_table_functions(),
            false => Vec::new(),
        };
        SessionStateBuilder::new()
            .with_expr_planners(SessionStateDefaults::default_expr_planners())
            .with_file_formats(SessionStateDefaults::default_file_formats())
            .with_table_factories(SessionStateDefaults::default_table_factories())
            .with_scalar_functions(scalar)
            .with_aggregate_functions(aggregate)
            .with_window_functions(window)
            .with_table_function_list(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(names: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        names
    }

    fn listed(family: &[&str]) -> Vec<String> {
        sorted(family.iter().map(|name| name.to_string()))
    }

    fn scalar_names(family: Vec<Arc<ScalarUDF>>) -> Vec<String> {
        sorted(
            family.iter().flat_map(|f| {
                std::iter::once(f.name().to_string()).chain(f.aliases().iter().cloned())
            }),
        )
    }

    /// A DataFusion upgrade that adds, renames or moves a function fails
    /// here, not in a consumer's query.
    #[test]
    fn the_family_lists_match_what_datafusion_registers() {
        assert_eq!(listed(CORE), scalar_names(functions::core::functions()));
        assert_eq!(
            listed(DATETIME),
            scalar_names(functions::datetime::functions())
        );
        assert_eq!(listed(MATH), scalar_names(functions::math::functions()));
        assert_eq!(listed(REGEX), scalar_names(functions::regex::functions()));
        assert_eq!(
            listed(UNICODE),
            scalar_names(functions::unicode::functions())
        );
        assert_eq!(listed(STRING), scalar_names(functions::string::functions()));
        assert_eq!(
            listed(ENCODING),
            scalar_names(functions::encoding::functions())
        );
        let aggregates = SessionStateDefaults::default_aggregate_functions();
        assert_eq!(
            listed(AGGREGATE),
            sorted(aggregates.iter().flat_map(|f| {
                std::iter::once(f.name().to_string()).chain(f.aliases().iter().cloned())
            }))
        );
        for (names, udaf) in COMMON_AGGREGATES {
            let udaf = udaf();
            let actual = sorted(
                std::iter::once(udaf.name().to_string()).chain(udaf.aliases().iter().cloned()),
            );
            assert_eq!(listed(names), actual);
        }
        let windows = SessionStateDefaults::default_window_functions();
        assert_eq!(
            listed(WINDOW),
            sorted(windows.iter().flat_map(|f| {
                std::iter::once(f.name().to_string()).chain(f.aliases().iter().cloned())
            }))
        );
        let tables = SessionStateDefaults::default_table_functions();
        assert_eq!(
            listed(TABLE),
            sorted(tables.iter().map(|f| f.name().to_string()))
        );
        // Every scalar family is listed: nothing DataFusion registers by
        // default is left out of `Families::all`.
        let every_scalar = scalar_names(SessionStateDefaults::default_scalar_functions());
        let listed_scalars = sorted(
            [CORE, DATETIME, MATH, REGEX, UNICODE, STRING, ENCODING]
                .concat()
                .iter()
                .map(|name| name.to_string()),
        );
        assert_eq!(every_scalar, listed_scalars);
    }

    #[test]
    fn a_query_gets_only_the_families_it_names() {
        assert_eq!(Families::named_in("select 1"), Families::default());
        let q1 = Families::named_in(
            "SELECT l_returnflag, SUM(l_quantity), AVG(l_discount), COUNT(*) FROM lineitem \
             WHERE l_shipdate <= DATE '1998-09-02' GROUP BY l_returnflag",
        );
        // sum, avg (and its alias mean), count: three of the common five.
        assert_eq!(
            q1,
            Families {
                aggregate: Aggregates::Common(0b00111),
                ..Families::default()
            }
        );
        let mixed = Families::named_in(
            "select Upper(name), date_trunc('month', t), row_number() over () from x",
        );
        assert!(mixed.string && mixed.datetime && mixed.window);
        assert!(!mixed.math && !mixed.regex);
        assert_eq!(mixed.aggregate, Aggregates::None);
        assert!(Families::named_in("select 2 ^ 3").math);
        assert_eq!(
            Families::named_in("select distinct on (a) a, b from t").aggregate,
            Aggregates::All
        );
        assert_eq!(
            Families::named_in("select max(a), median(b) from t").aggregate,
            Aggregates::All
        );
        // Part of a longer identifier is not a name.
        assert_eq!(
            Families::named_in("select summary, counter from t").aggregate,
            Aggregates::None
        );
    }

    use civicgrid_guest_protocol::policy::{ListRule, OutputPolicy};
    use civicgrid_guest_protocol::protocol::{GuestFailure, GuestRequest, Stage, TableInfo};
    use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::compute::concat_batches;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    fn table() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("a", DataType::Utf8, false),
            Field::new("b", DataType::Int64, false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec!["xxkerb", "quay", "xpier"])),
                Arc::new(Int64Array::from(vec![3, 1, 2])),
            ],
        )
        .expect("batch")
    }

    /// `sql` through the guest's `run` (the families it names, and the
    /// retry) over `table()`, which lists may read whole.
    fn run_in_guest(sql: &str) -> Result<RecordBatch, GuestFailure> {
        run_in_guest_under(
            sql,
            OutputPolicy {
                list: Some(ListRule {
                    columns: vec!["a".into(), "b".into()],
                    max_rows: 100,
                }),
                ..OutputPolicy::default()
            },
        )
    }

    /// [`run_in_guest`] under `policy`.
    fn run_in_guest_under(sql: &str, policy: OutputPolicy) -> Result<RecordBatch, GuestFailure> {
        let data = table();
        let request = GuestRequest {
            sql: sql.to_owned(),
            tables: vec![TableInfo {
                name: "t".into(),
                schema: data.schema().as_ref().clone(),
            }],
            policy,
            min_units: 0,
            stage: Stage::Whole,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let source = Arc::new(crate::MemorySource::new(vec![vec![data]]));
        let mut released = Vec::new();
        runtime
            .block_on(crate::run(&request, source, 1, |batch| {
                released.push(batch);
                Ok(())
            }))
            .map(|_| concat_batches(&released[0].schema(), &released).expect("concat"))
    }

    /// `sql` through the guest and through DataFusion's default session.
    fn guest_and_default(sql: &str) -> (Result<RecordBatch, GuestFailure>, RecordBatch) {
        guest_under_and_default(sql, None)
    }

    /// [`guest_and_default`], the guest under `policy` if given.
    fn guest_under_and_default(
        sql: &str,
        policy: Option<OutputPolicy>,
    ) -> (Result<RecordBatch, GuestFailure>, RecordBatch) {
        let guest = match policy {
            Some(policy) => run_in_guest_under(sql, policy),
            None => run_in_guest(sql),
        };
        let data = table();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let ctx = SessionContext::new();
        let mem = MemTable::try_new(data.schema(), vec![vec![data]]).expect("table");
        ctx.register_table("t", Arc::new(mem)).expect("register");
        let expected = runtime.block_on(async {
            let batches = ctx.sql(sql).await?.collect().await?;
            concat_batches(&batches[0].schema(), &batches)
                .map_err(datafusion::error::DataFusionError::from)
        });
        (guest, expected.expect("the default session runs it"))
    }

    /// Functions reached through syntax plan as they do in DataFusion's
    /// default session, whether the words name their family or the retry
    /// with every function has to find them.
    #[test]
    fn queries_plan_and_answer_as_with_every_function_registered() {
        for sql in [
            "select a, b from t order by b",
            "select upper(a), b ^ 2 from t order by b",
            "select trim(leading 'x' from a), substring(a from 2 for 2) from t order by b",
            "select position('e' in a), extract(year from date '2024-03-01') from t order by b",
            "select ceil(b / 2.0), overlay(a placing 'Q' from 1 for 1) from t order by b",
            "select coalesce(nullif(b, 2), 0) + greatest(b, 2), a || 'z' from t order by b",
            "select a, b, (select max(b) from t) - b from t order by b",
        ] {
            let (guest, expected) = guest_and_default(sql);
            let guest = guest.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            assert_eq!(guest.columns(), expected.columns(), "{sql}");
        }
    }

    /// `count`'s literal argument is built once per plan (see `literals`);
    /// the answers stay DataFusion's, and functions that read a literal
    /// argument as a setting still find a literal there.
    #[test]
    fn counts_and_literal_settings_answer_as_datafusion_does() {
        for sql in [
            "select count(*), count(1), count(b), count(distinct a), count(null) from t",
            "select b > 1 as big, count(*) as n from t group by b > 1 order by big",
            "select count(*) from t where b > 5",
            "select approx_percentile_cont(0.5) within group (order by b), \
             string_agg(a, ',' order by a) from t",
        ] {
            let (guest, expected) = guest_under_and_default(sql, Some(OutputPolicy::owner()));
            let guest = guest.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            assert_eq!(guest.columns(), expected.columns(), "{sql}");
        }
    }

    #[test]
    fn a_misspelt_function_gets_the_full_registrys_suggestion() {
        assert!(run_in_guest("select a from t").is_ok());
        let failure = run_in_guest("select upperr(a) from t").expect_err("no such function");
        let GuestFailure::Query { message } = failure else {
            panic!("expected a query error, got {failure:?}");
        };
        // Only the full registry knows `upper` to suggest it: the words of
        // this query name no family.
        assert!(message.contains("Did you mean 'upper'"), "{message}");
    }
}
