//! Decimal products without a call per row.
//!
//! Arrow multiplies Decimal128 values with `i128::checked_mul`. Compiled for
//! wasm32, LLVM turns every one of those into a call to `__muloti4` (there
//! is no 128-bit multiply with overflow in Wasm), and in the sandbox the call
//! costs more than the arithmetic: its prologue checks the stack, the fuel
//! and the epoch, and saves five registers. For TPC-H Q1 that was 18% of a
//! run. Nearly every decimal a query multiplies fits in 64 bits, and the
//! product of two such values always fits in 128 and is one widening
//! multiply that needs no call. So, after the policy has checked the
//! optimized plan, every product of two Decimal128 values becomes
//! [`DecimalProduct`]: the same result type, the same values, the same error
//! on overflow, with that case inlined and the rest left to `checked_mul`.
//! The plan is rewritten the same way natively, so the baseline runs the
//! same kernel.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, PrimitiveArray};
use datafusion::arrow::compute::kernels::arity::try_binary;
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, FieldRef};
use datafusion::arrow::error::ArrowError;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, Result, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// `plan` with every product of two Decimal128 values computed by
/// [`DecimalProduct`], output names unchanged.
pub fn decimal_products(plan: LogicalPlan) -> Result<LogicalPlan> {
    let product = Arc::new(ScalarUDF::from(DecimalProduct::new()));
    plan.transform_up_with_subqueries(|node| {
        // Most nodes of most plans multiply nothing: they are only looked
        // at, so a query without products costs next to nothing more.
        let mut multiplies = false;
        node.apply_expressions(|expr| {
            multiplies = expr.exists(|e| {
                Ok(matches!(
                    e,
                    Expr::BinaryExpr(BinaryExpr {
                        op: Operator::Multiply,
                        ..
                    })
                ))
            })?;
            Ok(match multiplies {
                true => TreeNodeRecursion::Stop,
                false => TreeNodeRecursion::Continue,
            })
        })?;
        if !multiplies {
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
            let rewritten = expr.transform_up(|e| rewrite(e, &schema, &product))?;
            Ok(rewritten.update_data(|e| name.restore(e)))
        })
    })
    .map(|rewritten| rewritten.data)
}

fn rewrite(expr: Expr, schema: &DFSchema, product: &Arc<ScalarUDF>) -> Result<Transformed<Expr>> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Multiply,
        right,
    }) = &expr
    else {
        return Ok(Transformed::no(expr));
    };
    // A type that cannot be worked out here (an outer reference the node's
    // inputs do not hold) leaves the product as it was.
    let decimal = |side: &Expr| matches!(side.get_type(schema), Ok(DataType::Decimal128(_, _)));
    if !(decimal(left) && decimal(right)) {
        return Ok(Transformed::no(expr));
    }
    Ok(Transformed::yes(Expr::ScalarFunction(
        ScalarFunction::new_udf(
            Arc::clone(product),
            vec![left.as_ref().clone(), right.as_ref().clone()],
        ),
    )))
}

/// `left * right` for two Decimal128 values, exactly as Arrow's kernel
/// computes it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct DecimalProduct {
    signature: Signature,
}

impl DecimalProduct {
    pub fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl Default for DecimalProduct {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for DecimalProduct {
    fn name(&self) -> &str {
        "civicgrid_decimal_product"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    /// What DataFusion gives `left * right`: the two precisions plus one
    /// (at most 38) and the two scales added.
    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        match args {
            [left, right] => {
                BinaryTypeCoercer::new(left, &Operator::Multiply, right).get_result_type()
            }
            _ => exec_err!(
                "civicgrid_decimal_product takes two arguments, not {}",
                args.len()
            ),
        }
    }

    /// Null exactly where an operand is, as `left * right` is: a plan's
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
                "civicgrid_decimal_product returns Decimal128, not {}",
                args.return_field.data_type()
            );
        };
        let rows = args.number_rows;
        let [left, right] = args.args.as_slice() else {
            return exec_err!("civicgrid_decimal_product takes two arguments");
        };
        let (left, right) = (left.to_array(rows)?, right.to_array(rows)?);
        let (Some(left), Some(right)) = (
            left.as_primitive_opt::<Decimal128Type>(),
            right.as_primitive_opt::<Decimal128Type>(),
        ) else {
            return exec_err!(
                "civicgrid_decimal_product multiplies Decimal128 values, not {} and {}",
                left.data_type(),
                right.data_type()
            );
        };
        let product: PrimitiveArray<Decimal128Type> = try_binary(left, right, multiply)?;
        Ok(ColumnarValue::Array(Arc::new(
            product.with_precision_and_scale(precision, scale)?,
        )))
    }
}

/// Arrow's `mul_checked` for i128, with the 64-bit case inlined.
#[inline(always)]
fn multiply(a: i128, b: i128) -> Result<i128, ArrowError> {
    if let (Ok(a), Ok(b)) = (i64::try_from(a), i64::try_from(b)) {
        // |a·b| <= 2^126: it always fits.
        return Ok(i128::from(a).wrapping_mul(i128::from(b)));
    }
    a.checked_mul(b).ok_or_else(|| {
        ArrowError::ArithmeticOverflow(format!("Overflow happened on: {a:?} * {b:?}"))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Decimal128Array, RecordBatch};
    use datafusion::arrow::compute::kernels::numeric::mul;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::SessionContext;
    use proptest::prelude::*;

    use super::*;

    fn decimals(values: &[Option<i128>], precision: u8, scale: i8) -> Decimal128Array {
        Decimal128Array::from(values.to_vec())
            .with_precision_and_scale(precision, scale)
            .unwrap()
    }

    fn product_of(left: &Decimal128Array, right: &Decimal128Array) -> Result<ArrayRef> {
        let udf = ScalarUDF::from(DecimalProduct::new());
        let return_type =
            udf.return_type(&[left.data_type().clone(), right.data_type().clone()])?;
        let result = udf.invoke_with_args(ScalarFunctionArgs {
            args: vec![
                ColumnarValue::Array(Arc::new(left.clone())),
                ColumnarValue::Array(Arc::new(right.clone())),
            ],
            arg_fields: vec![],
            number_rows: left.len(),
            return_field: Arc::new(datafusion::arrow::datatypes::Field::new(
                "p",
                return_type,
                true,
            )),
            config_options: Arc::new(Default::default()),
        })?;
        result.to_array(left.len())
    }

    #[test]
    fn equals_arrows_kernel_on_every_boundary_and_null() {
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
        // Each operand type as TPC-H's prices and discounts have them.
        let (left, right) = (decimals(&left, 38, 2), decimals(&right, 38, 4));
        let ours = product_of(&left, &right);
        let arrows = mul(&left, &right);
        // Some pairs overflow (10^30 · 10^30): both must refuse the batch.
        let (ours, arrows) = (ours.unwrap_err(), arrows.unwrap_err());
        assert!(ours.to_string().contains("Overflow happened on"), "{ours}");
        assert_eq!(ours.to_string(), format!("Arrow error: {arrows}"));
        // Without the pairs that overflow, the same values and type.
        let keep: Vec<bool> = left
            .iter()
            .zip(right.iter())
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => a.checked_mul(b).is_some(),
                _ => true,
            })
            .collect();
        let filter = datafusion::arrow::array::BooleanArray::from(keep);
        let left = datafusion::arrow::compute::filter(&left, &filter).unwrap();
        let right = datafusion::arrow::compute::filter(&right, &filter).unwrap();
        let (left, right) = (left.as_primitive::<Decimal128Type>(), right.as_primitive());
        let ours = product_of(left, right).unwrap();
        let arrows = mul(left, right).unwrap();
        assert_eq!(ours.data_type(), arrows.data_type());
        assert_eq!(&ours, &arrows);
        assert!(ours.null_count() > 0 && ours.len() > 100);
    }

    proptest! {
        #[test]
        fn equals_arrows_kernel(a: i128, b: i128, shift_a in 0u32..127, shift_b in 0u32..127) {
            let (a, b) = (a >> shift_a, b >> shift_b);
            let (left, right) = (decimals(&[Some(a)], 38, 0), decimals(&[Some(b)], 38, 0));
            match (product_of(&left, &right), mul(&left, &right)) {
                (Ok(ours), Ok(arrows)) => prop_assert_eq!(&ours, &arrows),
                (Err(_), Err(_)) => {}
                (ours, arrows) => prop_assert!(false, "ours {:?}, Arrow's {:?}", ours, arrows),
            }
        }
    }

    /// A query's products of decimals go through the rewrite, and its answer
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
        for sql in [
            "select price * (1 - discount), sum(price * discount * price) over () as s, \
             price * 2 from items where price * discount > 0 or price is null order by 1",
            "select flag, sum(quantity * (1 - tax)), sum(quantity * (1 - tax) * (1 + tax)) \
             from items group by flag order by flag",
        ] {
            same_answer_rewritten(&ctx, sql).await;
        }
    }

    async fn same_answer_rewritten(ctx: &SessionContext, sql: &str) {
        let expected = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let plan = ctx.sql(sql).await.unwrap().into_optimized_plan().unwrap();
        let rewritten = decimal_products(plan.clone()).unwrap();
        let shown = rewritten.display_indent().to_string();
        assert!(
            shown.contains("civicgrid_decimal_product"),
            "{sql}: {shown}"
        );
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
