//! The first cut of a query's filter, made by the host as it reads: rows for
//! which a pushed-down [`ScanPredicate`] fails are dropped before the batch
//! is encoded for the guest, so they cost neither the copy across the
//! boundary nor the guest's fuel. The engine in the guest still filters
//! every row it receives; the host only ever removes rows the query's own
//! filter would remove.
//!
//! The predicates come from the guest, so they are untrusted input: a column
//! outside the scan, or a value the column's type cannot hold, is refused
//! with a message naming it, never guessed at.

use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array,
    Int8Array, Int16Array, Int32Array, Int64Array, LargeStringArray, RecordBatch, Scalar,
    StringArray, StringViewArray, UInt8Array, UInt16Array, UInt32Array, UInt64Array,
};
use arrow_ord::cmp;
use arrow_schema::{DataType, Schema};

use crate::protocol::{CompareOp, ScanPredicate, ScanValue};

/// The predicates of one scan, checked against its schema and ready to run.
pub struct ScanFilter {
    checks: Vec<Check>,
}

struct Check {
    column: usize,
    op: CompareOp,
    value: Scalar<ArrayRef>,
}

impl ScanFilter {
    /// `predicates` over a scan whose batches have `schema` (the scanned
    /// columns, in the scan's order).
    pub fn new(schema: &Schema, predicates: &[ScanPredicate]) -> Result<Self, String> {
        let checks = predicates
            .iter()
            .map(|predicate| {
                let field = schema.fields().get(predicate.column).ok_or_else(|| {
                    format!(
                        "scan filter: the scan has {} columns, no column {}",
                        schema.fields().len(),
                        predicate.column
                    )
                })?;
                let value = scalar(field.data_type(), &predicate.value)
                    .map_err(|why| format!("scan filter on column {}: {why}", field.name()))?;
                Ok(Check {
                    column: predicate.column,
                    op: predicate.op,
                    value,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { checks })
    }

    /// The rows of `batch` for which every predicate holds.
    pub fn apply(&self, batch: RecordBatch) -> Result<RecordBatch, String> {
        let mut keep: Option<arrow_buffer::BooleanBuffer> = None;
        for check in &self.checks {
            let column = batch
                .columns()
                .get(check.column)
                .ok_or_else(|| format!("scan filter: the batch has no column {}", check.column))?;
            let matched = compare(column, check.op, &check.value).map_err(|e| e.to_string())?;
            // A null comparison is not a match (SQL's WHERE drops it too).
            let matched = match matched.nulls() {
                Some(nulls) => matched.values() & nulls.inner(),
                None => matched.values().clone(),
            };
            keep = Some(match keep {
                Some(kept) => &kept & &matched,
                None => matched,
            });
        }
        match keep {
            None => Ok(batch),
            Some(keep) if keep.count_set_bits() == batch.num_rows() => Ok(batch),
            Some(keep) => {
                arrow_select::filter::filter_record_batch(&batch, &BooleanArray::new(keep, None))
                    .map_err(|e| e.to_string())
            }
        }
    }
}

fn compare(
    column: &dyn arrow_array::Datum,
    op: CompareOp,
    value: &Scalar<ArrayRef>,
) -> Result<BooleanArray, arrow_schema::ArrowError> {
    match op {
        CompareOp::Eq => cmp::eq(column, value),
        CompareOp::NotEq => cmp::neq(column, value),
        CompareOp::Lt => cmp::lt(column, value),
        CompareOp::LtEq => cmp::lt_eq(column, value),
        CompareOp::Gt => cmp::gt(column, value),
        CompareOp::GtEq => cmp::gt_eq(column, value),
    }
}

/// `value` as a one-element array of exactly `data_type`.
fn scalar(data_type: &DataType, value: &ScanValue) -> Result<Scalar<ArrayRef>, String> {
    fn int<T: TryFrom<i64>>(v: i64, data_type: &DataType) -> Result<T, String> {
        T::try_from(v).map_err(|_| format!("{v} does not fit {data_type}"))
    }
    fn uint<T: TryFrom<u64>>(v: u64, data_type: &DataType) -> Result<T, String> {
        T::try_from(v).map_err(|_| format!("{v} does not fit {data_type}"))
    }
    let array: ArrayRef = match (data_type, value) {
        (DataType::Boolean, ScanValue::Boolean(v)) => Arc::new(BooleanArray::from(vec![*v])),
        (DataType::Int8, ScanValue::Int(v)) => {
            Arc::new(Int8Array::from(vec![int::<i8>(*v, data_type)?]))
        }
        (DataType::Int16, ScanValue::Int(v)) => {
            Arc::new(Int16Array::from(vec![int::<i16>(*v, data_type)?]))
        }
        (DataType::Int32, ScanValue::Int(v)) => {
            Arc::new(Int32Array::from(vec![int::<i32>(*v, data_type)?]))
        }
        (DataType::Int64, ScanValue::Int(v)) => Arc::new(Int64Array::from(vec![*v])),
        (DataType::UInt8, ScanValue::UInt(v)) => {
            Arc::new(UInt8Array::from(vec![uint::<u8>(*v, data_type)?]))
        }
        (DataType::UInt16, ScanValue::UInt(v)) => {
            Arc::new(UInt16Array::from(vec![uint::<u16>(*v, data_type)?]))
        }
        (DataType::UInt32, ScanValue::UInt(v)) => {
            Arc::new(UInt32Array::from(vec![uint::<u32>(*v, data_type)?]))
        }
        (DataType::UInt64, ScanValue::UInt(v)) => Arc::new(UInt64Array::from(vec![*v])),
        (DataType::Float32 | DataType::Float64, ScanValue::Float(v)) if !v.is_finite() => {
            return Err(format!("{v} is not a finite number"));
        }
        // Only a value that is exactly an f32 compares with an f32 column
        // the way the query compares it.
        (DataType::Float32, ScanValue::Float(v)) if f64::from(*v as f32) == *v => {
            Arc::new(Float32Array::from(vec![*v as f32]))
        }
        (DataType::Float64, ScanValue::Float(v)) => Arc::new(Float64Array::from(vec![*v])),
        (DataType::Decimal128(precision, scale), ScanValue::Decimal(v)) => {
            let unscaled: i128 = v
                .parse()
                .map_err(|_| format!("{v:?} is not a 128-bit integer"))?;
            let array = Decimal128Array::from(vec![unscaled])
                .with_precision_and_scale(*precision, *scale)
                .map_err(|e| e.to_string())?;
            array
                .validate_decimal_precision(*precision)
                .map_err(|e| e.to_string())?;
            Arc::new(array)
        }
        (DataType::Date32, ScanValue::Date32(v)) => Arc::new(Date32Array::from(vec![*v])),
        (DataType::Utf8, ScanValue::Utf8(v)) => Arc::new(StringArray::from(vec![v.as_str()])),
        (DataType::LargeUtf8, ScanValue::Utf8(v)) => {
            Arc::new(LargeStringArray::from(vec![v.as_str()]))
        }
        (DataType::Utf8View, ScanValue::Utf8(v)) => {
            Arc::new(StringViewArray::from(vec![v.as_str()]))
        }
        (data_type, value) => {
            return Err(format!(
                "a {data_type} column cannot be compared with {value:?}"
            ));
        }
    };
    Ok(Scalar::new(array))
}

#[cfg(test)]
mod tests {
    use arrow_schema::Field;

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("price", DataType::Decimal128(15, 2), true),
            Field::new("day", DataType::Date32, false),
            Field::new("district", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5])),
                Arc::new(
                    Decimal128Array::from(vec![Some(100), Some(250), None, Some(700), Some(50)])
                        .with_precision_and_scale(15, 2)
                        .expect("decimal"),
                ),
                Arc::new(Date32Array::from(vec![8766, 8800, 9000, 9131, 9200])),
                Arc::new(StringArray::from(vec![
                    "North", "South", "North", "East", "North",
                ])),
            ],
        )
        .expect("batch")
    }

    fn predicate(column: usize, op: CompareOp, value: ScanValue) -> ScanPredicate {
        ScanPredicate { column, op, value }
    }

    fn ids(batch: &RecordBatch) -> Vec<i32> {
        batch
            .column(0)
            .as_any()
            .downcast_ref::<Int32Array>()
            .expect("ids")
            .values()
            .to_vec()
    }

    #[test]
    fn every_predicate_must_hold_and_a_null_never_matches() {
        let batch = batch();
        let filter = ScanFilter::new(
            &batch.schema(),
            &[
                // 1.00 <= price < 7.00: row 3's null price is not a match.
                predicate(1, CompareOp::GtEq, ScanValue::Decimal("100".into())),
                predicate(1, CompareOp::Lt, ScanValue::Decimal("700".into())),
                predicate(2, CompareOp::GtEq, ScanValue::Date32(8766)),
            ],
        )
        .expect("valid");
        assert_eq!(ids(&filter.apply(batch).expect("filtered")), vec![1, 2]);
    }

    #[test]
    fn each_comparison_selects_what_sql_would() {
        let cases = [
            (CompareOp::Eq, vec![1, 3, 5]),
            (CompareOp::NotEq, vec![2, 4]),
            (CompareOp::Lt, vec![4]),
            (CompareOp::LtEq, vec![1, 3, 4, 5]),
            (CompareOp::Gt, vec![2]),
            (CompareOp::GtEq, vec![1, 2, 3, 5]),
        ];
        for (op, expected) in cases {
            let batch = batch();
            let filter = ScanFilter::new(
                &batch.schema(),
                &[predicate(3, op, ScanValue::Utf8("North".into()))],
            )
            .expect("valid");
            assert_eq!(
                ids(&filter.apply(batch).expect("filtered")),
                expected,
                "{op:?}"
            );
        }
    }

    #[test]
    fn no_predicates_keep_every_row() {
        let batch = batch();
        let filter = ScanFilter::new(&batch.schema(), &[]).expect("valid");
        assert_eq!(filter.apply(batch).expect("kept").num_rows(), 5);
    }

    #[test]
    fn a_predicate_the_scan_cannot_hold_is_refused_by_name() {
        let schema = batch().schema();
        let refused = |p: ScanPredicate| ScanFilter::new(&schema, &[p]).err().expect("refused");
        assert_eq!(
            refused(predicate(4, CompareOp::Eq, ScanValue::Int(1))),
            "scan filter: the scan has 4 columns, no column 4"
        );
        assert_eq!(
            refused(predicate(0, CompareOp::Eq, ScanValue::Int(1 << 40))),
            "scan filter on column id: 1099511627776 does not fit Int32"
        );
        assert_eq!(
            refused(predicate(3, CompareOp::Eq, ScanValue::Int(1))),
            "scan filter on column district: a Utf8 column cannot be compared with Int(1)"
        );
        assert_eq!(
            refused(predicate(
                1,
                CompareOp::Eq,
                ScanValue::Decimal("1e5".into())
            )),
            "scan filter on column price: \"1e5\" is not a 128-bit integer"
        );
        assert!(
            refused(predicate(
                1,
                CompareOp::Eq,
                ScanValue::Decimal("1000000000000000".into())
            ))
            .starts_with("scan filter on column price: "),
            "a value beyond the column's precision"
        );
    }
}
