//! Warm-up queries the host runs once, before snapshotting the module's
//! memory (see `Sandbox::load`): every run then starts from a module whose
//! engine has already built what DataFusion builds on first use — function
//! registries, signatures, parser and optimizer tables — instead of paying
//! for that on every query, as a fresh instance otherwise would.
//!
//! Only fixed, made-up data goes through here; nothing of any product or
//! consumer is ever in the snapshot.

use std::sync::Arc;

use civicgrid_sandbox::policy::{AggregationRule, OutputPolicy};
use civicgrid_sandbox::protocol::{GuestFailure, GuestRequest, TableInfo};
use datafusion::arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;

use crate::MemorySource;

/// The queries, each exercising a family of what consumers run: aggregates
/// with HAVING and ORDER BY, windows, joins, scalar functions.
const QUERIES: &[&str] = &[
    "select 1",
    "select category, count(*) as n, count(distinct id) as ids, sum(amount), avg(amount), \
     min(amount), max(day) from warm where amount > 0 and category like 'a%' \
     group by category having count(*) > 1 order by n desc limit 10",
    "select id, category, row_number() over (partition by category order by amount desc) as r, \
     sum(amount) over (partition by category) as total from warm order by id limit 5",
    "select a.category, count(*) as n from warm a join warm b on a.id = b.id \
     where a.day >= date '2024-01-01' group by a.category order by a.category",
    "select upper(category), lower(category), substr(category, 1, 1), length(category), \
     round(amount, 1), abs(amount), extract(year from day), date_trunc('month', day), \
     case when amount > 1 then 'high' else 'low' end, coalesce(category, ''), \
     cast(id as varchar), concat(category, '-', cast(id as varchar)) from warm",
];

fn table() -> Result<(Schema, RecordBatch), GuestFailure> {
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("category", DataType::Utf8, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("day", DataType::Date32, true),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6])),
        Arc::new(StringArray::from(vec![
            "alpha", "alpha", "beta", "alpha", "beta", "gamma",
        ])),
        Arc::new(Float64Array::from(vec![1.5, 2.0, 0.5, 3.25, 4.0, 1.0])),
        Arc::new(Date32Array::from(vec![
            19723, 19724, 19800, 19900, 20000, 20100,
        ])),
    ];
    let batch = RecordBatch::try_new(Arc::new(schema.clone()), columns).map_err(|e| {
        GuestFailure::Execution {
            message: format!("warm-up table: {e}"),
        }
    })?;
    Ok((schema, batch))
}

/// Runs every warm-up query, as the data's owner and under an aggregation
/// threshold (the policy rewrite has its own first-use costs).
pub fn warm_up() -> Result<(), GuestFailure> {
    let (schema, batch) = table()?;
    let threshold = OutputPolicy {
        aggregation: Some(AggregationRule {
            privacy_unit_columns: vec!["id".into()],
            min_units: 2,
            ..AggregationRule::default()
        }),
        ..OutputPolicy::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| GuestFailure::Execution {
            message: format!("runtime: {e}"),
        })?;
    let runs = QUERIES
        .iter()
        .map(|sql| (*sql, OutputPolicy::owner()))
        .chain(std::iter::once((QUERIES[1], threshold)));
    for (sql, policy) in runs {
        let request = GuestRequest {
            sql: sql.to_owned(),
            tables: vec![TableInfo {
                name: "warm".into(),
                schema: schema.clone(),
            }],
            min_units: policy.aggregation.as_ref().map_or(0, |a| a.min_units),
            policy,
        };
        let source = Arc::new(MemorySource::new(vec![vec![batch.clone()]]));
        runtime.block_on(crate::run(&request, source, 1, |_| Ok(())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warm-up query that stopped planning would make the host discard the
    /// snapshot (and every query pay for first use again) without failing.
    #[test]
    fn every_warm_up_query_runs() {
        warm_up().expect("warm-up");
    }
}
