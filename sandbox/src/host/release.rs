//! The output policy on the host side: what the guest emits is checked here,
//! batch by batch, before any of it is released. The SQL guest has already
//! refused queries whose plans break the policy; this is the part that holds
//! whatever the guest is (a consumer's algorithm included).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Float64Type, Int64Type};
use arrow_array::{ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Schema};
use rand::Rng;

use super::error::Abort;
use crate::policy::OutputPolicy;
use crate::protocol::{AGGREGATE_METADATA, SOURCE_METADATA, UNITS_COLUMN};

pub use crate::protocol::MIN_UNITS_METADATA;

pub(crate) struct Release {
    policy: OutputPolicy,
    pub(crate) batches: Vec<RecordBatch>,
    pub(crate) rows: u64,
    pub(crate) bytes: u64,
    pub(crate) suppressed_rows: u64,
    pub(crate) truncated: bool,
    /// Whether any released column was noised (the query spends epsilon).
    pub(crate) noised: bool,
}

fn policy_abort(rule: &str, column: Option<&str>, message: String) -> Abort {
    Abort::Policy {
        rule: rule.to_owned(),
        column: column.map(str::to_owned),
        message,
    }
}

impl Release {
    pub(crate) fn new(policy: OutputPolicy) -> Self {
        Self {
            policy,
            batches: Vec::new(),
            rows: 0,
            bytes: 0,
            suppressed_rows: 0,
            truncated: false,
            noised: false,
        }
    }

    pub(crate) fn accept(&mut self, batch: RecordBatch) -> Result<(), Abort> {
        let aggregate = batch.schema().metadata().contains_key(MIN_UNITS_METADATA);
        let batch = match batch.schema().index_of(UNITS_COLUMN) {
            Ok(units) => self.threshold(batch, units)?,
            Err(_) if aggregate => self.aggregate_without_units(batch)?,
            Err(_) => self.list(batch)?,
        };
        let bytes: u64 = batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0) as u64)
            .sum();
        self.bytes += bytes;
        if self.policy.max_result_bytes > 0 && self.bytes > self.policy.max_result_bytes {
            return Err(Abort::ResultTooLarge {
                limit_bytes: self.policy.max_result_bytes,
                rule: "max_result_bytes",
            });
        }
        self.rows += batch.num_rows() as u64;
        if batch.num_rows() > 0 || self.batches.is_empty() {
            self.batches.push(batch);
        }
        Ok(())
    }

    /// The threshold for an aggregate batch: the product's, or the larger one
    /// the guest worked out for the columns the query read.
    fn min_units(&self, batch: &RecordBatch) -> Result<u64, Abort> {
        let Some(rule) = &self.policy.aggregation else {
            return Err(policy_abort(
                "aggregation",
                None,
                "this product does not release aggregates".into(),
            ));
        };
        let asked: u64 = batch
            .schema()
            .metadata()
            .get(MIN_UNITS_METADATA)
            .and_then(|k| k.parse().ok())
            .unwrap_or(0);
        Ok(rule.min_units.max(asked))
    }

    /// An aggregate result with no unit counts: only where no threshold applies.
    fn aggregate_without_units(&mut self, batch: RecordBatch) -> Result<RecordBatch, Abort> {
        let k = self.min_units(&batch)?;
        if k > 1 {
            return Err(policy_abort(
                "aggregation",
                None,
                format!(
                    "an aggregate result must say how many privacy units each row covers (k = {k})"
                ),
            ));
        }
        let batch = self.noise(batch, k)?;
        strip_metadata(batch)
    }

    /// Aggregate rows: drop those covering fewer than k privacy units, then
    /// the count itself.
    fn threshold(&mut self, batch: RecordBatch, units: usize) -> Result<RecordBatch, Abort> {
        let k = self.min_units(&batch)?;
        let counts = batch
            .column(units)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| Abort::Protocol(format!("{UNITS_COLUMN} must be int64")))?;
        let keep: BooleanArray = counts
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= 0 && n as u64 >= k)))
            .collect();
        let kept = keep.true_count();
        self.suppressed_rows += (batch.num_rows() - kept) as u64;
        let filtered = self.noise(arrow_select_filter(&batch, &keep)?, k)?;
        let mut columns = filtered.columns().to_vec();
        columns.remove(units);
        let mut fields: Vec<_> = filtered
            .schema()
            .fields()
            .iter()
            .map(|f| Arc::new(f.as_ref().clone().with_metadata(Default::default())))
            .collect();
        fields.remove(units);
        let schema = Arc::new(Schema::new(fields));
        RecordBatch::try_new_with_options(
            schema,
            columns,
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(kept)),
        )
        .map_err(|e| Abort::Protocol(e.to_string()))
    }

    /// Row-level results: only listable columns, at most `max_rows` rows.
    fn list(&mut self, batch: RecordBatch) -> Result<RecordBatch, Abort> {
        let Some(list) = &self.policy.list else {
            return Err(policy_abort(
                "list",
                None,
                "this product releases only aggregates: group the rows (GROUP BY) and aggregate them".into(),
            ));
        };
        if !self.policy.lists_any_column()
            && let Some(field) = batch
                .schema()
                .fields()
                .iter()
                .find(|f| !list.columns.contains(f.name()))
        {
            return Err(policy_abort(
                "list.columns",
                Some(field.name()),
                format!(
                    "{} is not a column row-level results may carry",
                    field.name()
                ),
            ));
        }
        let room = list.max_rows.saturating_sub(self.rows);
        let batch = strip_metadata(batch)?;
        if (batch.num_rows() as u64) > room {
            self.truncated = true;
            return Ok(batch.slice(0, room as usize));
        }
        Ok(batch)
    }
}

impl Release {
    /// Laplace noise on every column the SQL guest marked as a plain COUNT,
    /// SUM or AVG, scaled to what one privacy unit can change it by.
    fn noise(&mut self, batch: RecordBatch, k: u64) -> Result<RecordBatch, Abort> {
        let Some(dp) = &self.policy.differential_privacy else {
            return Ok(batch);
        };
        let schema = batch.schema();
        let noisy: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| schema.field(i).metadata().contains_key(AGGREGATE_METADATA))
            .collect();
        if noisy.is_empty() {
            return Ok(batch);
        }
        self.noised = true;
        let epsilon = dp.epsilon_per_query / noisy.len() as f64;
        let rows = f64::from(dp.max_rows_per_unit);
        let mut columns = batch.columns().to_vec();
        let mut rng = rand::thread_rng();
        for i in noisy {
            let field = schema.field(i);
            let kind = field.metadata()[AGGREGATE_METADATA].as_str();
            let bounds = field
                .metadata()
                .get(SOURCE_METADATA)
                .and_then(|c| dp.bounds.get(c))
                .copied();
            let sensitivity = match (kind, bounds) {
                ("count", _) => rows,
                ("sum", Some((lower, upper))) => rows * lower.abs().max(upper.abs()),
                // Groups under k are withheld, so a released mean averages at least k rows.
                ("avg", Some((lower, upper))) => rows * (upper - lower) / k.max(1) as f64,
                _ => {
                    return Err(policy_abort(
                        "differential-privacy",
                        Some(field.name()),
                        format!("{} cannot be noised", field.name()),
                    ));
                }
            };
            let scale = sensitivity / epsilon;
            let mut laplace = || {
                let u: f64 = rng.gen_range(-0.5..0.5);
                -scale * u.signum() * (1.0 - 2.0 * u.abs()).ln()
            };
            let column = &columns[i];
            columns[i] = match column.data_type() {
                DataType::Int64 => {
                    let values = column.as_primitive::<Int64Type>();
                    let noised: Int64Array = values
                        .iter()
                        .map(|v| {
                            v.map(|v| {
                                let n = (v as f64 + laplace()).round() as i64;
                                if kind == "count" { n.max(0) } else { n }
                            })
                        })
                        .collect();
                    Arc::new(noised) as ArrayRef
                }
                DataType::Float64 => {
                    let values = column.as_primitive::<Float64Type>();
                    Arc::new(
                        values
                            .iter()
                            .map(|v| v.map(|v| v + laplace()))
                            .collect::<Float64Array>(),
                    )
                }
                DataType::Decimal128(precision, scale_digits) => {
                    let (precision, scale_digits) = (*precision, *scale_digits);
                    let unit = 10f64.powi(i32::from(scale_digits));
                    let values = column.as_primitive::<Decimal128Type>();
                    let noised: Decimal128Array = values
                        .iter()
                        .map(|v| v.map(|v| v + (laplace() * unit).round() as i128))
                        .collect();
                    Arc::new(
                        noised
                            .with_precision_and_scale(precision, scale_digits)
                            .map_err(|e| Abort::Protocol(e.to_string()))?,
                    )
                }
                other => {
                    return Err(policy_abort(
                        "differential-privacy",
                        Some(field.name()),
                        format!("{} is {other}, which cannot be noised", field.name()),
                    ));
                }
            };
        }
        RecordBatch::try_new_with_options(
            schema,
            columns,
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )
        .map_err(|e| Abort::Protocol(e.to_string()))
    }
}

fn arrow_select_filter(batch: &RecordBatch, keep: &BooleanArray) -> Result<RecordBatch, Abort> {
    if keep.true_count() == batch.num_rows() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .map(|c| arrow_select::filter::filter(c.as_ref(), keep))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Abort::Protocol(e.to_string()))?;
    RecordBatch::try_new_with_options(
        batch.schema(),
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(keep.true_count())),
    )
    .map_err(|e| Abort::Protocol(e.to_string()))
}

fn strip_metadata(batch: RecordBatch) -> Result<RecordBatch, Abort> {
    let schema = batch.schema();
    if schema.metadata().is_empty() && schema.fields().iter().all(|f| f.metadata().is_empty()) {
        return Ok(batch);
    }
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_metadata(Default::default()))
        .collect();
    RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        batch.columns().to_vec(),
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| Abort::Protocol(e.to_string()))
}
