//! The output policy: what may leave the sandbox for one data product.
//!
//! The marketplace stores one per product; the SQL guest checks a query's plan
//! against it before anything runs, and the host enforces the parts it can see
//! itself (columns streamed, rows and bytes released, the aggregation threshold)
//! on every result, whichever guest produced it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Deny by default: a policy with nothing set refuses every query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputPolicy {
    /// Columns no query may read, in any clause. The privacy-unit column may be
    /// blocked too: the sandbox reads it only to count units, never to release.
    pub blocked_columns: Vec<String>,
    /// Aggregate queries (every released row is a group); `None` refuses them.
    pub aggregation: Option<AggregationRule>,
    /// Row-level queries; `None` refuses them.
    pub list: Option<ListRule>,
    /// Noise on released COUNT, SUM and AVG columns against an epsilon budget.
    pub differential_privacy: Option<DifferentialPrivacy>,
    /// Largest result, in Arrow IPC bytes, that may be released (0: no limit).
    pub max_result_bytes: u64,
    /// sha256 (lower-case hex) of consumer algorithms this product accepts.
    pub approved_algorithms: Vec<String>,
}

/// Each released row must aggregate at least `min_units` distinct privacy units.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationRule {
    /// Columns that identify a privacy unit (a person, a household, a licence),
    /// in order of preference: the first one a query's aggregation can see is
    /// the one its groups are counted by.
    pub privacy_unit_columns: Vec<String>,
    /// k: groups with fewer distinct units are suppressed (0 or 1: no threshold).
    pub min_units: u64,
    /// A query that reads one of these columns needs at least this many units
    /// per group (the larger of this and `min_units` applies).
    pub column_min_units: BTreeMap<String, u64>,
    /// Columns a query may group, filter or compute with (outside aggregate
    /// functions). `None`: any readable column. The privacy-unit columns
    /// never are. Naming them closes differencing attacks that filter on a
    /// near-unique column (two counts that differ by one person).
    pub dimension_columns: Option<Vec<String>>,
    /// Columns an aggregate function may read. `None`: any readable column.
    pub aggregate_columns: Option<Vec<String>>,
    /// Aggregates a column allows beyond COUNT, COUNT(DISTINCT), SUM and AVG,
    /// from [`DECLARABLE_AGGREGATES`]: `{"employees": ["min", "max"]}`. Each
    /// of these can release one unit's value (the largest head count), so
    /// none is allowed unless declared.
    pub column_functions: BTreeMap<String, Vec<String>>,
    /// Columns the product's tables may be joined on (inner equi-joins in
    /// `JOIN … ON`). Empty: no joins.
    pub join_columns: Vec<String>,
    /// Scalar functions allowed beyond the sandbox's default list.
    pub scalar_functions: Vec<String>,
}

/// Aggregates a policy may declare for a column. Row-valued and
/// order-dependent aggregates (`ARRAY_AGG`, `STRING_AGG`, `FIRST_VALUE`,
/// `LAST_VALUE`, `NTH_VALUE`) are not among them: they release rows, not
/// statistics.
pub const DECLARABLE_AGGREGATES: &[&str] = &[
    "min",
    "max",
    "median",
    "approx_median",
    "approx_distinct",
    "approx_percentile_cont",
    "percentile_cont",
    "stddev",
    "stddev_pop",
    "var",
    "var_pop",
];

/// Row-level queries may read only these columns, and release at most `max_rows`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListRule {
    /// Every column such a query reads, in any clause, must be one of these.
    pub columns: Vec<String>,
    /// Rows beyond this are not released (the result says it was truncated).
    pub max_rows: u64,
}

/// Laplace noise on released COUNT, SUM and AVG columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DifferentialPrivacy {
    /// Epsilon one query spends (split evenly across its noisy columns).
    pub epsilon_per_query: f64,
    /// Clamping bounds per summed or averaged column: each value is clamped to
    /// `[lower, upper]` before aggregation, which bounds one row's influence.
    pub bounds: BTreeMap<String, (f64, f64)>,
    /// Most rows one privacy unit has in the product (the provider declares
    /// it; one row per person in a register): scales every column's noise.
    pub max_rows_per_unit: u32,
}

impl Default for DifferentialPrivacy {
    fn default() -> Self {
        Self {
            epsilon_per_query: 0.0,
            bounds: BTreeMap::new(),
            max_rows_per_unit: 1,
        }
    }
}

/// A policy field that makes no sense, named by its path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidPolicy {
    /// e.g. `aggregation.min_units`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl OutputPolicy {
    /// Whether some rows or values the product holds never reach a consumer
    /// whole: a threshold that suppresses groups, noise, a cap on listed rows
    /// or blocked columns. A query's exact cost (fuel, time, bytes) depends
    /// on such rows too, so it must not be shown or billed exactly.
    #[must_use]
    pub fn withholds_rows(&self) -> bool {
        !self.blocked_columns.is_empty()
            || self.differential_privacy.is_some()
            || (self.list.is_some() && !self.lists_any_column())
            || self.aggregation.as_ref().is_some_and(|rule| {
                rule.min_units > 1 || rule.column_min_units.values().any(|&k| k > 1)
            })
    }

    /// Checks the policy itself (not a query against it).
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        let invalid = |field: &str, reason: &str| {
            Err(InvalidPolicy {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if let Some(aggregation) = &self.aggregation
            && aggregation.min_units > 1
            && aggregation.privacy_unit_columns.is_empty()
        {
            return invalid(
                "aggregation.privacy_unit_columns",
                "a threshold needs a column that identifies privacy units",
            );
        }
        if let Some(aggregation) = &self.aggregation {
            for (column, functions) in &aggregation.column_functions {
                if let Some(function) = functions
                    .iter()
                    .find(|f| !DECLARABLE_AGGREGATES.contains(&f.to_ascii_lowercase().as_str()))
                {
                    return invalid(
                        &format!("aggregation.column_functions.{column}"),
                        &format!(
                            "{function} cannot be declared; declarable: {}",
                            DECLARABLE_AGGREGATES.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(list) = &self.list {
            if list.max_rows == 0 {
                return invalid("list.max_rows", "must be at least 1");
            }
            if let Some(column) = list
                .columns
                .iter()
                .find(|c| self.blocked_columns.contains(c))
            {
                return invalid(
                    "list.columns",
                    &format!("{column} is blocked and cannot be listed"),
                );
            }
        }
        if let Some(dp) = &self.differential_privacy {
            if !(dp.epsilon_per_query.is_finite() && dp.epsilon_per_query > 0.0) {
                return invalid(
                    "differential_privacy.epsilon_per_query",
                    "must be a positive number",
                );
            }
            if dp.max_rows_per_unit == 0 {
                return invalid(
                    "differential_privacy.max_rows_per_unit",
                    "must be at least 1",
                );
            }
            if let Some((column, _)) = dp.bounds.iter().find(|(_, (lower, upper))| {
                !(lower.is_finite() && upper.is_finite() && lower <= upper)
            }) {
                return invalid(
                    &format!("differential_privacy.bounds.{column}"),
                    "must be finite with lower <= upper",
                );
            }
        }
        for (i, hash) in self.approved_algorithms.iter().enumerate() {
            if hash.len() != 64
                || !hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return invalid(
                    &format!("approved_algorithms[{i}]"),
                    "must be a sha256 in lower-case hex",
                );
            }
        }
        Ok(())
    }

    /// The threshold a query needs given the columns it reads.
    pub fn min_units_for<'a>(&self, columns_read: impl IntoIterator<Item = &'a str>) -> u64 {
        let Some(aggregation) = &self.aggregation else {
            return 0;
        };
        columns_read
            .into_iter()
            .filter_map(|c| aggregation.column_min_units.get(c).copied())
            .fold(aggregation.min_units, u64::max)
    }

    /// A policy under which the data's owner may run anything (a provider
    /// checking its own product, the TPC-H conformance tests).
    pub fn owner() -> Self {
        Self {
            aggregation: Some(AggregationRule::default()),
            list: Some(ListRule {
                columns: Vec::new(),
                max_rows: u64::MAX,
            }),
            ..Self::default()
        }
    }

    /// True when list queries may read any column (only [`Self::owner`]).
    pub fn lists_any_column(&self) -> bool {
        self.list
            .as_ref()
            .is_some_and(|l| l.columns.is_empty() && l.max_rows == u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_withholds_rows_unless_it_releases_everything_it_lets_a_query_read() {
        let aggregation = |min_units, column_min_units: &[(&str, u64)]| OutputPolicy {
            aggregation: Some(AggregationRule {
                privacy_unit_columns: vec!["person_id".into()],
                min_units,
                column_min_units: column_min_units
                    .iter()
                    .map(|(column, k)| ((*column).to_owned(), *k))
                    .collect(),
                ..AggregationRule::default()
            }),
            ..OutputPolicy::default()
        };
        let cases = [
            ("nothing allowed", OutputPolicy::default(), false),
            ("the owner's", OutputPolicy::owner(), false),
            ("aggregates, no threshold", aggregation(1, &[]), false),
            ("a threshold", aggregation(5, &[]), true),
            (
                "a threshold on one column",
                aggregation(1, &[("income", 10)]),
                true,
            ),
            (
                "blocked columns",
                OutputPolicy {
                    blocked_columns: vec!["name".into()],
                    ..aggregation(1, &[])
                },
                true,
            ),
            (
                "noise",
                OutputPolicy {
                    differential_privacy: Some(DifferentialPrivacy::default()),
                    ..aggregation(1, &[])
                },
                true,
            ),
            (
                "a row limit",
                OutputPolicy {
                    list: Some(ListRule {
                        columns: vec![],
                        max_rows: 1_000,
                    }),
                    ..OutputPolicy::default()
                },
                true,
            ),
        ];
        for (case, policy, withholds) in cases {
            assert_eq!(policy.withholds_rows(), withholds, "{case}");
        }
    }

    #[test]
    fn an_empty_policy_is_valid_and_allows_nothing() {
        let policy = OutputPolicy::default();
        assert_eq!(policy.validate(), Ok(()));
        assert!(policy.aggregation.is_none() && policy.list.is_none());
        assert!(policy.approved_algorithms.is_empty());
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases: Vec<(&str, OutputPolicy)> = vec![
            (
                "aggregation.privacy_unit_columns",
                OutputPolicy {
                    aggregation: Some(AggregationRule {
                        min_units: 5,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
            (
                "list.max_rows",
                OutputPolicy {
                    list: Some(ListRule::default()),
                    ..Default::default()
                },
            ),
            (
                "list.columns",
                OutputPolicy {
                    blocked_columns: vec!["ssn".into()],
                    list: Some(ListRule {
                        columns: vec!["ssn".into()],
                        max_rows: 10,
                    }),
                    ..Default::default()
                },
            ),
            (
                "differential_privacy.epsilon_per_query",
                OutputPolicy {
                    differential_privacy: Some(DifferentialPrivacy::default()),
                    ..Default::default()
                },
            ),
            (
                "differential_privacy.bounds.income",
                OutputPolicy {
                    differential_privacy: Some(DifferentialPrivacy {
                        epsilon_per_query: 0.5,
                        bounds: [("income".to_owned(), (10.0, 1.0))].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
            (
                "differential_privacy.max_rows_per_unit",
                OutputPolicy {
                    differential_privacy: Some(DifferentialPrivacy {
                        epsilon_per_query: 0.5,
                        max_rows_per_unit: 0,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
            (
                "approved_algorithms[0]",
                OutputPolicy {
                    approved_algorithms: vec!["ABC".into()],
                    ..Default::default()
                },
            ),
        ];
        for (field, policy) in cases {
            assert_eq!(policy.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn the_largest_column_threshold_applies() {
        let policy = OutputPolicy {
            aggregation: Some(AggregationRule {
                privacy_unit_columns: vec!["person_id".into()],
                min_units: 10,
                column_min_units: [("age".to_owned(), 25), ("income".to_owned(), 50)].into(),
                dimension_columns: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(policy.min_units_for(["district"]), 10);
        assert_eq!(policy.min_units_for(["district", "age"]), 25);
        assert_eq!(policy.min_units_for(["income", "age"]), 50);
    }

    #[test]
    fn policies_round_trip_through_json_and_reject_unknown_fields() {
        let policy = OutputPolicy::owner();
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(serde_json::from_str::<OutputPolicy>(&json).unwrap(), policy);
        let err = serde_json::from_str::<OutputPolicy>(r#"{"blocked_colums": []}"#).unwrap_err();
        assert!(err.to_string().contains("blocked_colums"), "{err}");
    }
}
