//! The sandbox's output policy for a product under a contract: the one
//! place a product's spec and a contract's allowed operations become what
//! the sandbox enforces, for queries and for the registry's checks.

use std::collections::BTreeMap;

use civicgrid_sandbox::policy::{AggregationRule, DifferentialPrivacy, ListRule, OutputPolicy};

use crate::error::{MarketError, Result};
use crate::spec::{AllowedOperations, ProductSpec, Sensitivity};

/// The sandbox policy for a product under a contract's allowed operations:
/// blocked columns from the schema, aggregates only if the contract allows
/// them, list columns the product's and the contract's in common.
///
/// # Errors
/// `InvalidArgument` naming the policy field when the product's policy is
/// inconsistent.
pub fn sandbox_policy(spec: &ProductSpec, operations: &AllowedOperations) -> Result<OutputPolicy> {
    let product = spec.output_policy.clone().unwrap_or_default();
    let blocked_columns = spec
        .tables
        .iter()
        .flat_map(|table| &table.columns)
        .filter(|column| column.sensitivity() == Sensitivity::Blocked)
        .map(|column| column.name.clone())
        .collect();
    let min_units = u64::try_from(product.min_aggregation_count).unwrap_or(0);
    // Under a threshold, only public columns decide which rows count and how
    // they group; internal ones (a head count, a licence number) may only be
    // aggregated. Without one, groups can be single rows anyway.
    let dimension_columns = (min_units > 1).then(|| {
        spec.tables
            .iter()
            .flat_map(|table| &table.columns)
            .filter(|column| column.sensitivity() == Sensitivity::Public)
            .map(|column| column.name.clone())
            .collect()
    });
    let aggregation = operations.aggregate_sql.then(|| AggregationRule {
        privacy_unit_columns: if product.privacy_unit_column.is_empty() {
            Vec::new()
        } else {
            vec![product.privacy_unit_column.clone()]
        },
        min_units,
        column_min_units: BTreeMap::new(),
        dimension_columns,
        join_columns: product.join_columns.clone(),
        column_functions: product
            .column_functions
            .iter()
            .map(|(column, declared)| (column.clone(), declared.functions.clone()))
            .collect(),
        scalar_functions: product.scalar_functions.clone(),
        ..AggregationRule::default()
    });
    let list_columns: Vec<String> = product
        .list_columns
        .iter()
        .filter(|column| operations.list_columns.contains(column))
        .cloned()
        .collect();
    let list = (!list_columns.is_empty()).then(|| ListRule {
        columns: list_columns,
        max_rows: u64::try_from(product.max_list_rows).unwrap_or(0),
    });
    let differential_privacy = (product.dp_epsilon_budget > 0.0).then(|| DifferentialPrivacy {
        epsilon_per_query: product.dp_epsilon_per_query,
        bounds: product
            .dp_bounds
            .iter()
            .map(|(column, bounds)| (column.clone(), (bounds.lower, bounds.upper)))
            .collect(),
        max_rows_per_unit: product.dp_max_rows_per_unit,
    });
    let approved_algorithms = product
        .approved_algorithm_sha256
        .iter()
        .filter(|hash| operations.algorithm_sha256.contains(hash))
        .cloned()
        .collect();
    let policy = OutputPolicy {
        blocked_columns,
        aggregation,
        list,
        differential_privacy,
        max_result_bytes: u64::try_from(product.max_result_bytes).unwrap_or(0),
        approved_algorithms,
    };
    policy.validate().map_err(|invalid| {
        MarketError::invalid(
            format!("spec.output_policy ({})", invalid.field),
            invalid.reason,
        )
    })?;
    Ok(policy)
}

/// Whether a product keeps some of its rows or values from consumers under
/// the most a contract can allow (aggregates, every list column): a
/// threshold, noise, a row limit or blocked columns. A policy that does not
/// validate counts as withholding (the registry refuses it anyway).
#[must_use]
pub fn withholds_rows(spec: &ProductSpec) -> bool {
    let widest = AllowedOperations {
        aggregate_sql: true,
        list_columns: spec
            .output_policy
            .as_ref()
            .map(|policy| policy.list_columns.clone())
            .unwrap_or_default(),
        algorithm_sha256: Vec::new(),
    };
    sandbox_policy(spec, &widest).map_or(true, |policy| policy.withholds_rows())
}
