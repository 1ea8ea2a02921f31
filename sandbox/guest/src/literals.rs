//! The literal argument of `count` (`COUNT(*)` is `count(Int64(1))`), built
//! into an array once per plan instead of once per batch.
//!
//! An aggregate evaluates each argument into an array as long as the batch:
//! for a literal that is a fresh array of that many copies of the value,
//! filled and freed again for every batch. In the SQL guest, TPC-H Q1's
//! `count(*)` spent six times as long natively doing so (the fill loop, and
//! allocating 128 KiB per batch), about 1.5% of the query. Here the array is
//! built once, as long as the longest batch seen so far, and each batch gets
//! a slice of it: the same values, no copy.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::{FieldRef, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};

/// `plan` with every literal argument of its aggregates evaluated once.
pub(crate) fn repeated_once(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let rewritten = plan.transform_up(|node| {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
            return Ok(Transformed::no(node));
        };
        let mut changed = false;
        let mut functions = Vec::with_capacity(aggregate.aggr_expr().len());
        for function in aggregate.aggr_expr() {
            match with_literals_built_once(function) {
                Some(rewritten) => {
                    changed = true;
                    functions.push(Arc::new(rewritten));
                }
                None => functions.push(Arc::clone(function)),
            }
        }
        Ok(match changed {
            true => Transformed::yes(Arc::new(aggregate.with_new_aggr_exprs(functions)) as _),
            false => Transformed::no(node),
        })
    })?;
    Ok(rewritten.data)
}

/// `function` with its literal arguments replaced, if it is a plain `count`
/// with a literal argument. Only `count`: other functions read some literal
/// arguments as settings when they create their accumulators (the
/// percentile of `approx_percentile_cont`, the delimiter of `string_agg`)
/// and refuse anything but a `Literal` there.
fn with_literals_built_once(function: &AggregateFunctionExpr) -> Option<AggregateFunctionExpr> {
    if function.fun().name() != "count" || function.is_distinct() {
        return None;
    }
    let args = function.expressions();
    if !args
        .iter()
        .any(|arg| arg.downcast_ref::<Literal>().is_some())
    {
        return None;
    }
    let args = args
        .into_iter()
        .map(|arg| match arg.downcast_ref::<Literal>() {
            Some(literal) => Arc::new(RepeatedLiteral::new(literal.clone())) as _,
            None => arg,
        })
        .collect();
    let order_by = function
        .order_bys()
        .iter()
        .map(|sort| Arc::clone(&sort.expr))
        .collect();
    function.with_new_expressions(args, order_by)
}

/// A literal that evaluates to an array (a slice of one built once), not to
/// a scalar each consumer expands.
#[derive(Debug)]
pub(crate) struct RepeatedLiteral {
    literal: Literal,
    built: Mutex<Option<ArrayRef>>,
}

impl RepeatedLiteral {
    fn new(literal: Literal) -> Self {
        Self {
            literal,
            built: Mutex::new(None),
        }
    }

    fn array_of(&self, rows: usize) -> Result<ArrayRef> {
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(array) = built.as_ref().filter(|array| array.len() >= rows) {
            return Ok(array.slice(0, rows));
        }
        let array = self.literal.value().to_array_of_size(rows)?;
        *built = Some(Arc::clone(&array));
        Ok(array)
    }
}

impl PartialEq for RepeatedLiteral {
    fn eq(&self, other: &Self) -> bool {
        self.literal == other.literal
    }
}

impl Eq for RepeatedLiteral {}

impl Hash for RepeatedLiteral {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.literal.hash(state);
    }
}

impl fmt::Display for RepeatedLiteral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.literal, f)
    }
}

impl PhysicalExpr for RepeatedLiteral {
    fn return_field(&self, input_schema: &Schema) -> Result<FieldRef> {
        self.literal.return_field(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Array(self.array_of(batch.num_rows())?))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        Vec::new()
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(self)
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.literal.fmt_sql(f)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field};
    use datafusion::common::ScalarValue;

    use super::*;

    fn batch(rows: usize) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let column = Int64Array::from_iter_values(0..rows as i64);
        RecordBatch::try_new(schema, vec![Arc::new(column)]).unwrap()
    }

    fn values(value: &ColumnarValue) -> Vec<Option<i64>> {
        let ColumnarValue::Array(array) = value else {
            panic!("a scalar, not an array: {value:?}");
        };
        let array = array.as_any().downcast_ref::<Int64Array>().unwrap();
        array.iter().collect()
    }

    #[test]
    fn every_batch_gets_the_value_once_per_row_from_one_array() {
        let literal = RepeatedLiteral::new(Literal::new(ScalarValue::Int64(Some(1))));
        let first = literal.evaluate(&batch(5)).unwrap();
        assert_eq!(values(&first), vec![Some(1); 5]);
        // A shorter batch reads a slice of the same array: no new one.
        let shorter = literal.evaluate(&batch(3)).unwrap();
        assert_eq!(values(&shorter), vec![Some(1); 3]);
        let (ColumnarValue::Array(first), ColumnarValue::Array(shorter)) = (&first, &shorter)
        else {
            unreachable!("both checked above");
        };
        assert_eq!(
            first.to_data().buffers()[0].as_ptr(),
            shorter.to_data().buffers()[0].as_ptr()
        );
        // A longer one builds a longer array; an empty one is empty.
        assert_eq!(
            values(&literal.evaluate(&batch(8)).unwrap()),
            vec![Some(1); 8]
        );
        assert_eq!(values(&literal.evaluate(&batch(0)).unwrap()), Vec::new());
    }

    #[test]
    fn a_null_literal_stays_null_in_every_row() {
        let literal = RepeatedLiteral::new(Literal::new(ScalarValue::Int64(None)));
        assert_eq!(values(&literal.evaluate(&batch(4)).unwrap()), vec![None; 4]);
    }
}
