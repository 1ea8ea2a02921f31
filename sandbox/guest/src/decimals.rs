//! Decimal arithmetic without a call per row.
//!
//! Arrow multiplies Decimal128 values with `i128::checked_mul`, and adds or
//! subtracts two of different scales by first multiplying each value by a
//! power of ten (by one, for the side already at the result's scale), also
//! with `checked_mul`. Compiled for wasm32, LLVM turns every one of those
//! into a call to `__muloti4` (Wasm has no 128-bit multiply with overflow),
//! and in the sandbox the call costs more than the arithmetic: its prologue
//! checks the stack, the fuel and the epoch, and saves five registers. In
//! TPC-H Q1, `1 - l_discount` and `1 + l_tax` made four such calls per line
//! item and the products two more: 18% of a run. Nearly every value fits in
//! 64 bits, and the product of two such values always fits in 128 and is one
//! widening multiply that needs no call.
//!
//! So, after the policy has checked the optimized plan, every product of two
//! Decimal128 values, and every sum or difference of two of different
//! scales, becomes a call of [`DecimalArithmetic`]: the same result type,
//! nullability and values, and the same error on overflow as Arrow's
//! kernels, with the 64-bit case inline and the rest left to `checked_mul`.
//! The plan is rewritten the same way natively, so the baseline runs the
//! same kernels.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, PrimitiveArray};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::kernels::arity::try_binary;
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef};
use datafusion::arrow::error::ArrowError;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::wide::overflowing_mul;

/// `plan` with Decimal128 products, and sums and differences of different
/// scales, computed by [`DecimalArithmetic`], output names unchanged.
pub fn call_free_arithmetic(plan: LogicalPlan) -> Result<LogicalPlan> {
    let kernels = Kernels {
        product: Arc::new(ScalarUDF::from(DecimalArithmetic::new(Operator::Multiply))),
        sum: Arc::new(ScalarUDF::from(DecimalArithmetic::new(Operator::Plus))),
        difference: Arc::new(ScalarUDF::from(DecimalArithmetic::new(Operator::Minus))),
    };
    plan.transform_up_with_subqueries(|node| {
        // Most nodes of most plans do no such arithmetic: they are only
        // looked at, so a query without any costs next to nothing more.
        let mut arithmetic = false;
        node.apply_expressions(|expr| {
            arithmetic = expr.exists(|e| {
                Ok(matches!(
                    e,
                    Expr::BinaryExpr(BinaryExpr {
                        op: Operator::Multiply | Operator::Plus | Operator::Minus,
                        ..
                    })
                ))
            })?;
            Ok(match arithmetic {
                true => TreeNodeRecursion::Stop,
                false => TreeNodeRecursion::Continue,
            })
        })?;
        if !arithmetic {
            return Ok(Transformed::no(node));
        }
        let schema = match node.inputs().as_slice() {
            [] => Arc::new(DFSchema::empty()),
            [input] => Arc::clone(input.schema()),
            inputs => Arc::new(merge_schema(inputs)),
        };
        let names = NamePreserver::new(&node);
        node.map_expressions(|expr| {
            let name = names.save(&expr);
            let rewritten = expr.transform_up(|e| kernels.rewrite(e, &schema))?;
            Ok(rewritten.update_data(|e| name.restore(e)))
        })
    })
    .map(|rewritten| rewritten.data)
}

struct Kernels {
    product: Arc<ScalarUDF>,
    sum: Arc<ScalarUDF>,
    difference: Arc<ScalarUDF>,
}

impl Kernels {
    fn rewrite(&self, expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &expr else {
            return Ok(Transformed::no(expr));
        };
        // A type that cannot be worked out here (an outer reference the
        // node's inputs do not hold) leaves the expression as it was.
        let scale = |side: &Expr| match side.get_type(schema) {
            Ok(DataType::Decimal128(_, scale)) => Some(scale),
            _ => None,
        };
        let (Some(left_scale), Some(right_scale)) = (scale(left), scale(right)) else {
            return Ok(Transformed::no(expr));
        };
        let kernel = match op {
            Operator::Multiply => &self.product,
            // Of equal scales Arrow adds and subtracts without multiplying.
            Operator::Plus if left_scale != right_scale => &self.sum,
            Operator::Minus if left_scale != right_scale => &self.difference,
            _ => return Ok(Transformed::no(expr)),
        };
        Ok(Transformed::yes(Expr::ScalarFunction(
            ScalarFunction::new_udf(
                Arc::clone(kernel),
                vec![left.as_ref().clone(), right.as_ref().clone()],
            ),
        )))
    }
}

/// `left * right`, `left + right` or `left - right` for two Decimal128
/// values, exactly as Arrow's kernels compute them.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct DecimalArithmetic {
    op: Operator,
    signature: Signature,
}

impl DecimalArithmetic {
    /// `op` is `Multiply`, `Plus` or `Minus`.
    pub fn new(op: Operator) -> Self {
        Self {
            op,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for DecimalArithmetic {
    fn name(&self) -> &str {
        match self.op {
            Operator::Multiply => "civicgrid_decimal_product",
            Operator::Plus => "civicgrid_decimal_sum",
            _ => "civicgrid_decimal_difference",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    /// What DataFusion gives `left op right`.
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        match args {
            [left, right] => BinaryTypeCoercer::new(left, &self.op, right).get_result_type(),
            _ => exec_err!("{} takes two arguments, not {}", self.name(), args.len()),
        }
    }

    /// Null exactly where an operand is, as `left op right` is: a plan's
    /// schema keeps saying what it said before the rewrite.
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args
            .arg_fields
            .iter()
            .map(|field| field.data_type().clone())
            .collect();
        let nullable = args.arg_fields.iter().any(|field| field.is_nullable());
        Ok(Arc::new(Field::new(
            self.name(),
            self.return_type(&types)?,
            nullable,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let DataType::Decimal128(precision, scale) = *args.return_field.data_type() else {
            return exec_err!(
                "{} returns Decimal128, not {}",
                self.name(),
                args.return_field.data_type()
            );
        };
        let rows = args.number_rows;
        let [left, right] = args.args.as_slice() else {
            return exec_err!("{} takes two arguments", self.name());
        };
        if let Some(values) = self.without_branches(left, right, rows, scale) {
            return Ok(ColumnarValue::Array(Arc::new(
                values.with_precision_and_scale(precision, scale)?,
            )));
        }
        let (left, right) = (left.to_array(rows)?, right.to_array(rows)?);
        let (Some(left), Some(right)) = (
            left.as_primitive_opt::<Decimal128Type>(),
            right.as_primitive_opt::<Decimal128Type>(),
        ) else {
            return exec_err!(
                "{} takes Decimal128 values, not {} and {}",
                self.name(),
                left.data_type(),
                right.data_type()
            );
        };
        let result: PrimitiveArray<Decimal128Type> = match self.op {
            Operator::Multiply => try_binary(left, right, multiply)?,
            op => {
                // Both sides at the result's scale, as Arrow brings them.
                let to_scale = |side_scale: i8| -> Result<i128, ArrowError> {
                    10i128
                        .checked_pow(u32::try_from(scale - side_scale).unwrap_or(0))
                        .ok_or_else(|| {
                            ArrowError::ArithmeticOverflow(format!(
                                "Overflow happened on: 10 ^ {}",
                                scale - side_scale
                            ))
                        })
                };
                let (l_mul, r_mul) = (to_scale(left.scale())?, to_scale(right.scale())?);
                let subtract = op == Operator::Minus;
                try_binary(left, right, |a, b| {
                    let (a, b) = (rescaled(a, l_mul)?, rescaled(b, r_mul)?);
                    match subtract {
                        true => a.checked_sub(b).ok_or_else(|| {
                            ArrowError::ArithmeticOverflow(format!(
                                "Overflow happened on: {a:?} - {b:?}"
                            ))
                        }),
                        false => a.checked_add(b).ok_or_else(|| {
                            ArrowError::ArithmeticOverflow(format!(
                                "Overflow happened on: {a:?} + {b:?}"
                            ))
                        }),
                    }
                })?
            }
        };
        Ok(ColumnarValue::Array(Arc::new(
            result.with_precision_and_scale(precision, scale)?,
        )))
    }
}

impl DecimalArithmetic {
    /// The result computed in a loop that cannot fail, when every value of
    /// both sides (null rows too) and every scale factor fits in 64 bits, as
    /// values of up to 18 digits do. Then no row can overflow: a product of
    /// two such values is at most 2^126 in magnitude, and a sum or difference
    /// adds two products of a value and a factor under 10^19, each below
    /// 2^123. Arrow's kernels instead check every row and return from the
    /// loop at the first overflow, so each row is a call to a closure that
    /// returns a `Result`: a fifth of a TPC-H Q1 run in the sandbox.
    /// `None` for anything else (wider values, two constants, a null
    /// constant): the caller then takes Arrow's way, with its exact errors.
    fn without_branches(
        &self,
        left: &ColumnarValue,
        right: &ColumnarValue,
        rows: usize,
        scale: i8,
    ) -> Option<PrimitiveArray<Decimal128Type>> {
        let (left, right) = (Operand::of(left, rows)?, Operand::of(right, rows)?);
        // Both sides of a sum or difference at the result's scale, as Arrow
        // brings them; the factor of the side already there is one.
        let factor = |side: &Operand| match self.op {
            Operator::Multiply => Some(1),
            _ => 10i64.checked_pow(u32::try_from(scale - side.scale()).ok()?),
        };
        let (left_factor, right_factor) = (factor(&left)?, factor(&right)?);
        let (a, left_factor) = left.narrow(left_factor)?;
        let (b, right_factor) = right.narrow(right_factor)?;
        let (left_factor, right_factor) = (i128::from(left_factor), i128::from(right_factor));
        let values = match self.op {
            Operator::Multiply => Narrow::combine(a, b, |a, b| i128::from(a) * i128::from(b)),
            Operator::Minus => Narrow::combine(a, b, |a, b| {
                i128::from(a) * left_factor - i128::from(b) * right_factor
            }),
            _ => Narrow::combine(a, b, |a, b| {
                i128::from(a) * left_factor + i128::from(b) * right_factor
            }),
        }?;
        let nulls = match (&left, &right) {
            (Operand::Column(a), Operand::Column(b)) => NullBuffer::union(a.nulls(), b.nulls()),
            (Operand::Column(column), _) | (_, Operand::Column(column)) => column.nulls().cloned(),
            _ => return None,
        };
        Some(PrimitiveArray::new(values.into(), nulls))
    }
}

/// One side of a decimal operation, as [`DecimalArithmetic`] gets it.
enum Operand {
    Column(PrimitiveArray<Decimal128Type>),
    Constant { value: i128, scale: i8 },
}

impl Operand {
    /// A column of `rows` values or a non-null constant, both Decimal128.
    fn of(side: &ColumnarValue, rows: usize) -> Option<Self> {
        match side {
            ColumnarValue::Array(array) if array.len() == rows => array
                .as_primitive_opt::<Decimal128Type>()
                .cloned()
                .map(Self::Column),
            ColumnarValue::Scalar(ScalarValue::Decimal128(Some(value), _, scale)) => {
                Some(Self::Constant {
                    value: *value,
                    scale: *scale,
                })
            }
            _ => None,
        }
    }

    fn scale(&self) -> i8 {
        match self {
            Self::Column(column) => column.scale(),
            Self::Constant { scale, .. } => *scale,
        }
    }

    /// This side for the 64-bit loop, with the factor still to apply to its
    /// values (a constant takes its factor here, once, and must then fit; a
    /// column's values are checked in the loop).
    fn narrow(&self, factor: i64) -> Option<(Narrow<'_>, i64)> {
        match self {
            Self::Column(column) => Some((Narrow::Column(column.values()), factor)),
            Self::Constant { value, .. } => {
                let value = value.checked_mul(i128::from(factor))?;
                Some((Narrow::Constant(i64::try_from(value).ok()?), 1))
            }
        }
    }
}

/// One side of the 64-bit loop.
enum Narrow<'a> {
    /// Decimal128 values, used if each fits in 64 bits.
    Column(&'a [i128]),
    Constant(i64),
}

/// Rows the 64-bit loop computes per step, as one block of straight-line
/// code: the loop's own costs (its branch, and wasmtime's fuel count and
/// check on the way back) are paid once per step, not once per row.
const ROWS_PER_STEP: usize = 4;

/// Whether `value` is its own low 64 bits read as signed.
#[inline(always)]
fn fits_in_64(value: i128) -> bool {
    i64::try_from(value).is_ok()
}

impl Narrow<'_> {
    /// `op` over every row, on the low 64 bits of each value; `None` if a
    /// column held a value that does not fit in 64 bits (null rows
    /// included: nothing stops a null slot holding one), or for two
    /// constants, which DataFusion folds before a plan runs. The values are
    /// read once: whether each fits is noted as it is used, and a batch with
    /// one that does not is thrown away at the end.
    #[inline(always)]
    fn combine(left: Self, right: Self, op: impl Fn(i64, i64) -> i128) -> Option<Vec<i128>> {
        // `as i64` keeps the low 64 bits: the value itself when it fits.
        let (out, fit) = match (left, right) {
            (Self::Column(a), Self::Column(b)) if a.len() == b.len() => {
                let mut out = vec![0i128; a.len()];
                let fit = rows_of_two(&mut out, a, b, |out, a, b| {
                    *out = op(a as i64, b as i64);
                    fits_in_64(a) & fits_in_64(b)
                });
                (out, fit)
            }
            (Self::Column(a), Self::Constant(b)) => {
                let mut out = vec![0i128; a.len()];
                let fit = rows(&mut out, a, |out, a| {
                    *out = op(a as i64, b);
                    fits_in_64(a)
                });
                (out, fit)
            }
            (Self::Constant(a), Self::Column(b)) => {
                let mut out = vec![0i128; b.len()];
                let fit = rows(&mut out, b, |out, b| {
                    *out = op(a, b as i64);
                    fits_in_64(b)
                });
                (out, fit)
            }
            _ => return None,
        };
        fit.then_some(out)
    }
}

/// Calls `row(out slot, value)` for every row of `values` (as many as
/// `out` has), in steps of [`ROWS_PER_STEP`], and returns whether every
/// call returned true.
#[inline(always)]
fn rows(out: &mut [i128], values: &[i128], row: impl Fn(&mut i128, i128) -> bool) -> bool {
    let mut fit = true;
    let mut out = out.chunks_exact_mut(ROWS_PER_STEP);
    let mut values = values.chunks_exact(ROWS_PER_STEP);
    for (out, values) in (&mut out).zip(&mut values) {
        for lane in 0..ROWS_PER_STEP {
            fit &= row(&mut out[lane], values[lane]);
        }
    }
    for (out, value) in out.into_remainder().iter_mut().zip(values.remainder()) {
        fit &= row(out, *value);
    }
    fit
}

/// [`rows`] over two columns of the same length.
#[inline(always)]
fn rows_of_two(
    out: &mut [i128],
    left: &[i128],
    right: &[i128],
    row: impl Fn(&mut i128, i128, i128) -> bool,
) -> bool {
    let mut fit = true;
    let mut out = out.chunks_exact_mut(ROWS_PER_STEP);
    let mut left = left.chunks_exact(ROWS_PER_STEP);
    let mut right = right.chunks_exact(ROWS_PER_STEP);
    for ((out, left), right) in (&mut out).zip(&mut left).zip(&mut right) {
        for lane in 0..ROWS_PER_STEP {
            fit &= row(&mut out[lane], left[lane], right[lane]);
        }
    }
    let tail = out
        .into_remainder()
        .iter_mut()
        .zip(left.remainder())
        .zip(right.remainder());
    for ((out, left), right) in tail {
        fit &= row(out, *left, *right);
    }
    fit
}

/// `value` brought to a larger scale: Arrow's `value.mul_checked(by)`,
/// where a factor of one changes nothing and cannot overflow.
#[inline(always)]
fn rescaled(value: i128, by: i128) -> Result<i128, ArrowError> {
    match by {
        1 => Ok(value),
        _ => multiply(value, by),
    }
}

/// Arrow's `mul_checked` for i128, with its error.
#[inline(always)]
fn multiply(a: i128, b: i128) -> Result<i128, ArrowError> {
    match overflowing_mul(a, b) {
        (product, false) => Ok(product),
        (_, true) => Err(ArrowError::ArithmeticOverflow(format!(
            "Overflow happened on: {a:?} * {b:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        ArrayRef, BooleanArray, Datum, Decimal128Array, RecordBatch, Scalar,
    };
    use datafusion::arrow::compute::filter;
    use datafusion::arrow::compute::kernels::numeric::{add, mul, sub};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::SessionContext;
    use proptest::prelude::*;

    use super::*;

    const OPERATORS: [Operator; 3] = [Operator::Multiply, Operator::Plus, Operator::Minus];

    fn decimals(values: &[Option<i128>], precision: u8, scale: i8) -> Decimal128Array {
        Decimal128Array::from(values.to_vec())
            .with_precision_and_scale(precision, scale)
            .unwrap()
    }

    fn ours(op: Operator, left: &Decimal128Array, right: &Decimal128Array) -> Result<ArrayRef> {
        ours_of(op, &column(left), &column(right), left.len())
    }

    fn arrows(
        op: Operator,
        left: &Decimal128Array,
        right: &Decimal128Array,
    ) -> Result<ArrayRef, ArrowError> {
        arrows_of(op, left, right)
    }

    fn column(values: &Decimal128Array) -> ColumnarValue {
        ColumnarValue::Array(Arc::new(values.clone()))
    }

    /// One value for every row, as DataFusion passes a literal.
    fn constant(value: i128, scale: i8) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Decimal128(Some(value), 38, scale))
    }

    fn ours_of(
        op: Operator,
        left: &ColumnarValue,
        right: &ColumnarValue,
        rows: usize,
    ) -> Result<ArrayRef> {
        let udf = ScalarUDF::from(DecimalArithmetic::new(op));
        let return_type = udf.return_type(&[left.data_type(), right.data_type()])?;
        let result = udf.invoke_with_args(ScalarFunctionArgs {
            args: vec![left.clone(), right.clone()],
            arg_fields: vec![],
            number_rows: rows,
            return_field: Arc::new(Field::new("result", return_type, true)),
            config_options: Arc::new(Default::default()),
        })?;
        result.to_array(rows)
    }

    fn arrows_of(
        op: Operator,
        left: &dyn Datum,
        right: &dyn Datum,
    ) -> Result<ArrayRef, ArrowError> {
        match op {
            Operator::Multiply => mul(left, right),
            Operator::Plus => add(left, right),
            _ => sub(left, right),
        }
    }

    /// What the loop without branches gives for two columns, at the scale
    /// of Arrow's result.
    fn unbranched(
        op: Operator,
        left: &Decimal128Array,
        right: &Decimal128Array,
    ) -> Option<PrimitiveArray<Decimal128Type>> {
        let scale = match arrows(op, &left.slice(0, 0), &right.slice(0, 0))
            .ok()?
            .data_type()
        {
            DataType::Decimal128(_, scale) => *scale,
            _ => return None,
        };
        DecimalArithmetic::new(op).without_branches(
            &column(left),
            &column(right),
            left.len(),
            scale,
        )
    }

    #[test]
    fn equals_arrows_kernels_on_every_boundary_and_null() {
        let edges: Vec<Option<i128>> = [
            0,
            1,
            -1,
            99,
            i64::MAX as i128,
            i64::MIN as i128,
            i64::MAX as i128 + 1,
            i64::MIN as i128 - 1,
            10i128.pow(30),
            -(10i128.pow(30)),
            i128::MAX / 50,
            -(i128::MAX / 50),
        ]
        .into_iter()
        .map(Some)
        .chain([None])
        .collect();
        let (mut left, mut right) = (Vec::new(), Vec::new());
        for a in &edges {
            for b in &edges {
                left.push(*a);
                right.push(*b);
            }
        }
        // Different scales, as TPC-H's `1 - l_discount` has them (and so a
        // rescale of the left side by 100).
        let (left, right) = (decimals(&left, 38, 2), decimals(&right, 38, 4));
        for op in OPERATORS {
            // Some pairs overflow: both must refuse the batch, alike.
            let (mine, theirs) = (ours(op, &left, &right), arrows(op, &left, &right));
            let (mine, theirs) = (mine.unwrap_err(), theirs.unwrap_err());
            assert!(
                mine.to_string().contains("Overflow happened on"),
                "{op}: {mine}"
            );
            assert_eq!(mine.to_string(), format!("Arrow error: {theirs}"), "{op}");
            // Without the pairs that overflow, the same values and type.
            let keep: BooleanArray = (0..left.len())
                .map(|row| Some(arrows(op, &left.slice(row, 1), &right.slice(row, 1)).is_ok()))
                .collect();
            let (left, right) = (
                filter(&left, &keep).unwrap(),
                filter(&right, &keep).unwrap(),
            );
            let (left, right) = (left.as_primitive(), right.as_primitive());
            let (mine, theirs) = (
                ours(op, left, right).unwrap(),
                arrows(op, left, right).unwrap(),
            );
            assert_eq!(mine.data_type(), theirs.data_type(), "{op}");
            assert_eq!(&mine, &theirs, "{op}");
            assert!(mine.null_count() > 0 && mine.len() > 100, "{op}");
            // Of the rows where both sides fit in 64 bits, the loop that
            // cannot fail gives the same values.
            let narrow =
                |side: &Decimal128Array, row: usize| i64::try_from(side.value(row)).is_ok();
            let valid: BooleanArray = (0..left.len())
                .map(|row| Some(narrow(left, row) && narrow(right, row)))
                .collect();
            let (left, right, theirs) = (
                filter(left, &valid).unwrap(),
                filter(right, &valid).unwrap(),
                filter(&theirs, &valid).unwrap(),
            );
            let unbranched = unbranched(op, left.as_primitive(), right.as_primitive())
                .expect("every value fits in 64 bits");
            let unbranched: ArrayRef =
                Arc::new(unbranched.with_data_type(theirs.data_type().clone()));
            assert_eq!(&unbranched, &theirs, "{op}");
            assert!(unbranched.null_count() > 0, "{op}");
            assert!(unbranched.len() > 30, "{op}: {}", unbranched.len());
        }
    }

    /// A literal on either side (`1 - l_discount`) is rescaled once, and the
    /// answer and errors stay Arrow's, nulls and overflows included.
    #[test]
    fn a_constant_on_either_side_answers_as_arrows_kernels_do() {
        let edges = [
            0,
            1,
            -1,
            i64::MAX as i128,
            i64::MIN as i128 - 1,
            10i128.pow(30),
            i128::MAX / 50,
            i128::MIN,
        ];
        let values: Vec<Option<i128>> = edges.iter().copied().map(Some).chain([None]).collect();
        let columns = [
            decimals(&values, 38, 4),
            // Only the small values: most results fit.
            decimals(&[Some(1), None, Some(-25), Some(7)], 38, 4),
            // No valid row: Arrow computes nothing, so nothing overflows.
            decimals(&[None, None], 38, 4),
        ];
        for op in OPERATORS {
            for values in &columns {
                for value in edges {
                    let scalar = Scalar::new(decimals(&[Some(value)], 38, 2));
                    let rows = values.len();
                    let cases = [
                        (
                            ours_of(op, &constant(value, 2), &column(values), rows),
                            arrows_of(op, &scalar, values),
                        ),
                        (
                            ours_of(op, &column(values), &constant(value, 2), rows),
                            arrows_of(op, values, &scalar),
                        ),
                    ];
                    for (mine, theirs) in cases {
                        match (mine, theirs) {
                            (Ok(mine), Ok(theirs)) => assert_eq!(&mine, &theirs, "{op} {value}"),
                            (Err(mine), Err(theirs)) => assert_eq!(
                                mine.to_string(),
                                format!("Arrow error: {theirs}"),
                                "{op} {value}"
                            ),
                            (mine, theirs) => {
                                panic!("{op} {value}: ours {mine:?}, Arrow's {theirs:?}")
                            }
                        }
                    }
                }
            }
        }
    }

    /// Arrow does not compute null rows, so what a null row holds cannot
    /// overflow; the loop that computes every row must not say it did.
    #[test]
    fn an_overflow_in_a_null_row_is_no_error() {
        let left = PrimitiveArray::<Decimal128Type>::new(
            vec![i128::MAX, 5, i128::MIN].into(),
            Some(NullBuffer::from(vec![false, true, false])),
        )
        .with_precision_and_scale(38, 2)
        .unwrap();
        let right = decimals(&[Some(2), Some(3), Some(-1)], 38, 4);
        for op in OPERATORS {
            let theirs = arrows(op, &left, &right).unwrap();
            assert_eq!(&ours(op, &left, &right).unwrap(), &theirs, "{op}");
            assert_eq!(theirs.null_count(), 2, "{op}");
        }
    }

    proptest! {
        #[test]
        fn equals_arrows_kernels(
            a: i128,
            b: i128,
            shift_a in 0u32..127,
            shift_b in 0u32..127,
            scale_a in 0i8..10,
            scale_b in 0i8..10,
        ) {
            let (a, b) = (a >> shift_a, b >> shift_b);
            let left = decimals(&[Some(a)], 38, scale_a);
            let right = decimals(&[Some(b)], 38, scale_b);
            for op in OPERATORS {
                // Values of 64 bits take the loop that cannot fail (the
                // factors here are at most 10^9), and give Arrow's values.
                let unbranched = unbranched(op, &left, &right);
                let narrow = i64::try_from(a).is_ok() && i64::try_from(b).is_ok();
                prop_assert_eq!(unbranched.is_some(), narrow);
                match (ours(op, &left, &right), arrows(op, &left, &right)) {
                    (Ok(mine), Ok(theirs)) => {
                        prop_assert_eq!(&mine, &theirs);
                        if let Some(unbranched) = unbranched {
                            prop_assert_eq!(unbranched.values(), theirs.as_primitive::<Decimal128Type>().values());
                        }
                    }
                    (Err(mine), Err(theirs)) => {
                        prop_assert!(unbranched.is_none());
                        prop_assert_eq!(mine.to_string(), format!("Arrow error: {theirs}"))
                    }
                    (mine, theirs) => {
                        prop_assert!(false, "{}: ours {:?}, Arrow's {:?}", op, mine, theirs)
                    }
                }
            }
        }
    }

    /// A query's decimal arithmetic goes through the rewrite, and its answer
    /// and column names stay DataFusion's own.
    #[test]
    fn a_rewritten_plan_answers_as_datafusion_does_under_the_same_names() {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(rewritten_plan_answers());
    }

    async fn rewritten_plan_answers() {
        let ctx = SessionContext::new();
        let price = decimals(&[Some(1_999), Some(-250), None, Some(10_000_000)], 15, 2);
        let discount = decimals(&[Some(5), Some(10), Some(7), None], 15, 2);
        // Columns with no nulls are not nullable, and neither are their
        // products: the physical planner checks that an aggregate's input
        // still says so (TPC-H Q1's shape: a product shared by two sums).
        let quantity = decimals(&[Some(100), Some(300), Some(200), Some(100)], 15, 2);
        let tax = decimals(&[Some(2), Some(0), Some(8), Some(4)], 15, 2);
        let flag: ArrayRef = Arc::new(datafusion::arrow::array::StringArray::from(vec![
            "A", "B", "A", "B",
        ]));
        let batch = RecordBatch::try_from_iter([
            ("price", Arc::new(price) as ArrayRef),
            ("discount", Arc::new(discount) as ArrayRef),
            ("quantity", Arc::new(quantity) as ArrayRef),
            ("tax", Arc::new(tax) as ArrayRef),
            ("flag", flag),
        ])
        .unwrap();
        ctx.register_batch("items", batch).unwrap();
        for (sql, kernels) in [
            (
                "select price * (1 - discount), sum(price * discount * price) over () as s, \
                 price * 2, price + discount from items \
                 where price * discount > 0 or price is null order by 1",
                &["civicgrid_decimal_product", "civicgrid_decimal_difference"][..],
            ),
            (
                "select flag, sum(quantity * (1 - tax)), sum(quantity * (1 - tax) * (1 + tax)) \
                 from items group by flag order by flag",
                &[
                    "civicgrid_decimal_product",
                    "civicgrid_decimal_difference",
                    "civicgrid_decimal_sum",
                ][..],
            ),
        ] {
            same_answer_rewritten(&ctx, sql, kernels).await;
        }
    }

    async fn same_answer_rewritten(ctx: &SessionContext, sql: &str, kernels: &[&str]) {
        let expected = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let plan = ctx.sql(sql).await.unwrap().into_optimized_plan().unwrap();
        let rewritten = call_free_arithmetic(plan.clone()).unwrap();
        let shown = rewritten.display_indent().to_string();
        for kernel in kernels {
            assert!(shown.contains(kernel), "{sql}: no {kernel} in {shown}");
        }
        // Of equal scales, sums stay Arrow's (they multiply nothing).
        if sql.contains("price + discount") {
            assert!(shown.contains("items.price + items.discount"), "{shown}");
        }
        assert_eq!(rewritten.schema(), plan.schema(), "{sql}");
        // Planned as the guest plans it: straight from the rewritten plan,
        // which is not optimized again.
        let state = ctx.state();
        let physical = state
            .query_planner()
            .create_physical_plan(&rewritten, &state)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let actual = datafusion::physical_plan::collect(physical, state.task_ctx())
            .await
            .unwrap();
        assert_eq!(
            pretty_format_batches(&actual).unwrap().to_string(),
            pretty_format_batches(&expected).unwrap().to_string(),
            "{sql}"
        );
    }
}
