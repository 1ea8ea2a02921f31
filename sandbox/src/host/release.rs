//! The output policy on the host side: what the guest emits is checked here,
//! batch by batch, before any of it is released. The SQL guest has already
//! refused queries whose plans break the policy; this is the part that holds
//! whatever the guest is (a consumer's algorithm included).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Float64Type, Int64Type};
use arrow_array::{ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Schema};

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
        let batch = compact(&batch)?;
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
            let column = &columns[i];
            columns[i] = match column.data_type() {
                DataType::Int64 => {
                    let values = column.as_primitive::<Int64Type>();
                    let mut noised = Vec::with_capacity(values.len());
                    for v in values.iter() {
                        noised.push(match v {
                            Some(v) => {
                                let n = i128::from(v).saturating_add(discrete_laplace(scale)?);
                                let n = i64::try_from(n).unwrap_or(if n < 0 {
                                    i64::MIN
                                } else {
                                    i64::MAX
                                });
                                Some(if kind == "count" { n.max(0) } else { n })
                            }
                            None => None,
                        });
                    }
                    Arc::new(Int64Array::from(noised)) as ArrayRef
                }
                DataType::Float64 => {
                    let values = column.as_primitive::<Float64Type>();
                    let mut noised = Vec::with_capacity(values.len());
                    for v in values.iter() {
                        noised.push(match v {
                            Some(v) => Some(noised_float(v, sensitivity, epsilon)?),
                            None => None,
                        });
                    }
                    Arc::new(Float64Array::from(noised))
                }
                DataType::Decimal128(precision, scale_digits) => {
                    let (precision, scale_digits) = (*precision, *scale_digits);
                    // Noise in the column's own units (cents, say), so the
                    // sample is exact there too.
                    let unit = 10f64.powi(i32::from(scale_digits));
                    let values = column.as_primitive::<Decimal128Type>();
                    let mut noised = Vec::with_capacity(values.len());
                    for v in values.iter() {
                        noised.push(match v {
                            Some(v) => Some(v.saturating_add(discrete_laplace(scale * unit)?)),
                            None => None,
                        });
                    }
                    Arc::new(
                        Decimal128Array::from(noised)
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

/// Resolution of noised floating-point results: values are rounded to
/// multiples of 2^-16 and get integer multiples of it as noise, so that the
/// noise is sampled exactly (the float-sampling weakness Mironov described
/// in 2012 leaks through the low bits of a noised float).
const FLOAT_RESOLUTION: f64 = 1.0 / 65_536.0;

/// A sample of the discrete Laplace distribution of `scale` (P[x] ∝
/// exp(-|x| / scale) on the integers): Canonne, Kamath and Steinke's
/// sampler over exact rationals, from OpenDP.
pub(crate) fn discrete_laplace(scale: f64) -> Result<i128, Abort> {
    let rational = dashu::rational::RBig::try_from(scale)
        .ok()
        .filter(|_| scale >= 0.0)
        .ok_or_else(|| Abort::Protocol(format!("noise scale {scale} is not a number ≥ 0")))?;
    let sample = opendp::traits::samplers::sample_discrete_laplace(rational)
        .map_err(|e| Abort::Protocol(format!("noise sampler: {e:?}")))?;
    let negative = sample < dashu::integer::IBig::ZERO;
    Ok(i128::try_from(sample).unwrap_or(if negative { i128::MIN } else { i128::MAX }))
}

/// `value` rounded to [`FLOAT_RESOLUTION`], plus discrete Laplace noise in
/// steps of that resolution for `sensitivity` at `epsilon`. Rounding can
/// move two neighbouring values one step further apart than `sensitivity`
/// does, so the noise covers one step more.
fn noised_float(value: f64, sensitivity: f64, epsilon: f64) -> Result<f64, Abort> {
    if !value.is_finite() {
        // Infinity plus noise is infinity: it would be released as it is.
        return Err(policy_abort(
            "differential-privacy",
            None,
            "a result that is not a finite number cannot be noised".to_owned(),
        ));
    }
    let steps = discrete_laplace((sensitivity / FLOAT_RESOLUTION + 1.0) / epsilon)?;
    Ok(((value / FLOAT_RESOLUTION).round() + steps as f64) * FLOAT_RESOLUTION)
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

/// A copy of `batch` that holds its own rows and nothing else. A filter or a
/// slice shares the input's buffers: a string view array keeps every
/// string of the rows it dropped, a dictionary every value, and Arrow IPC
/// writes a buffer as it is, so withheld groups' keys would travel with the
/// released ones. Views become plain strings or binaries, dictionaries
/// their values, and every column is copied row by row.
fn compact(batch: &RecordBatch) -> Result<RecordBatch, Abort> {
    let protocol = |e: arrow_schema::ArrowError| Abort::Protocol(e.to_string());
    let rows = u32::try_from(batch.num_rows())
        .map_err(|_| Abort::Protocol("a released batch of over 2^32 rows".into()))?;
    let every_row = arrow_array::UInt32Array::from_iter_values(0..rows);
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let plain = plain_values(column).map_err(protocol)?;
        let copied =
            arrow_select::take::take(plain.as_ref(), &every_row, None).map_err(protocol)?;
        fields.push(
            field
                .as_ref()
                .clone()
                .with_data_type(copied.data_type().clone()),
        );
        columns.push(copied);
    }
    RecordBatch::try_new_with_options(
        Arc::new(Schema::new_with_metadata(
            fields,
            batch.schema().metadata().clone(),
        )),
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(protocol)
}

/// `array` without views or dictionaries, whose buffers `take` would share.
fn plain_values(array: &ArrayRef) -> Result<ArrayRef, arrow_schema::ArrowError> {
    Ok(match array.data_type() {
        DataType::Utf8View => Arc::new(arrow_array::StringArray::from_iter(
            array.as_string_view().iter(),
        )),
        DataType::BinaryView => Arc::new(arrow_array::BinaryArray::from_iter(
            array.as_binary_view().iter(),
        )),
        DataType::Dictionary(..) => {
            let dictionary = array.as_any_dictionary();
            let values = plain_values(dictionary.values())?;
            arrow_select::take::take(values.as_ref(), dictionary.keys(), None)?
        }
        _ => Arc::clone(array),
    })
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

#[cfg(test)]
mod noise_tests {
    use super::{FLOAT_RESOLUTION, discrete_laplace, noised_float};

    /// The sampler's frequencies against the discrete Laplace mass function
    /// P[x] = tanh(1 / 2t) · exp(-|x| / t), by a chi-square test over the
    /// values -6..=6 and the two tails (14 degrees of freedom). The bound,
    /// 60, is exceeded by chance about once in ten million runs.
    #[test]
    fn samples_follow_the_discrete_laplace_distribution() {
        let t = 2.0f64;
        let n = 40_000usize;
        let mut counts = [0usize; 15];
        let mut sum = 0i128;
        for _ in 0..n {
            let x = discrete_laplace(t).expect("a sample");
            sum += x;
            let bin = match x {
                ..=-7 => 0,
                7.. => 14,
                x => (x + 7) as usize,
            };
            counts[bin] += 1;
        }
        let p = |x: i32| (1.0 / (2.0 * t)).tanh() * (-(f64::from(x.abs())) / t).exp();
        let tail: f64 = 1.0 / 2.0 - (0..=6).map(p).sum::<f64>() + p(0) / 2.0;
        let expected: Vec<f64> = std::iter::once(tail)
            .chain((-6..=6).map(p))
            .chain(std::iter::once(tail))
            .map(|q| q * n as f64)
            .collect();
        let total: f64 = expected.iter().sum();
        assert!((total - n as f64).abs() < 1e-6 * n as f64, "{total}");
        let chi2: f64 = counts
            .iter()
            .zip(&expected)
            .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
            .sum();
        assert!(
            chi2 < 60.0,
            "chi-square {chi2}: {counts:?} against {expected:?}"
        );
        let mean = sum as f64 / n as f64;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn no_noise_at_scale_zero_and_a_clear_error_for_a_bad_scale() {
        assert_eq!(discrete_laplace(0.0).expect("zero"), 0);
        assert!(discrete_laplace(f64::NAN).is_err());
        assert!(discrete_laplace(-1.0).is_err());
    }

    /// A noised float carries no low bits of the value it noised: it is a
    /// whole number of resolution steps.
    #[test]
    fn noised_floats_are_whole_steps() {
        for value in [0.1, 12_345.678_9, -3.3e-7, 1e12 / 3.0] {
            let noised = noised_float(value, 3.0, 1.0).expect("noise");
            let steps = noised / FLOAT_RESOLUTION;
            assert_eq!(steps, steps.round(), "{value} → {noised}");
        }
    }

    #[test]
    fn values_that_are_not_finite_are_not_released() {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(noised_float(value, 3.0, 1.0).is_err(), "{value}");
        }
    }
}
