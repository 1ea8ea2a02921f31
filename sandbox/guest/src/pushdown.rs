//! The part of a query's filter the host checks as it reads: comparisons of
//! a column with a literal of the column's own type (and `BETWEEN`, which is
//! two of them). Rows that fail one never cross into the sandbox, so a
//! selective query (TPC-H Q6 keeps 2% of lineitem) neither copies nor meters
//! the rest. DataFusion is told the pushdown is inexact, so its own filter
//! stays above the scan and judges every row the host lets through: the
//! host's check can only remove rows the query would remove anyway.

use civicgrid_guest_protocol::protocol::{CompareOp, ScanPredicate, ScanValue};
use datafusion::arrow::datatypes::Schema;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator};
use datafusion::scalar::ScalarValue;

/// A predicate over a column of the table (its index in the table's schema).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TablePredicate {
    column: usize,
    op: CompareOp,
    value: ScanValue,
}

/// `filter` as predicates the host can check, all of which must hold; `None`
/// when any part of it is something else.
pub(crate) fn predicates(filter: &Expr, schema: &Schema) -> Option<Vec<TablePredicate>> {
    match filter {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut all = predicates(left, schema)?;
            all.extend(predicates(right, schema)?);
            Some(all)
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let op = compare_op(*op)?;
            match (left.as_ref(), right.as_ref()) {
                (Expr::Column(_), Expr::Literal(..)) => {
                    Some(vec![comparison(left, op, right, schema)?])
                }
                // `5 < x` is `x > 5`.
                (Expr::Literal(..), Expr::Column(_)) => {
                    Some(vec![comparison(right, mirrored(op), left, schema)?])
                }
                _ => None,
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) => Some(vec![
            comparison(expr, CompareOp::GtEq, low, schema)?,
            comparison(expr, CompareOp::LtEq, high, schema)?,
        ]),
        _ => None,
    }
}

/// The predicates of `table_predicates` whose columns a scan of `columns`
/// reads, with each column renumbered to its position in the scan.
pub(crate) fn for_scan(
    table_predicates: &[TablePredicate],
    columns: &[usize],
) -> Vec<ScanPredicate> {
    table_predicates
        .iter()
        .filter_map(|p| {
            let position = columns.iter().position(|&c| c == p.column)?;
            Some(ScanPredicate {
                column: position,
                op: p.op,
                value: p.value.clone(),
            })
        })
        .collect()
}

fn comparison(
    column: &Expr,
    op: CompareOp,
    literal: &Expr,
    schema: &Schema,
) -> Option<TablePredicate> {
    let (Expr::Column(column), Expr::Literal(literal, _)) = (column, literal) else {
        return None;
    };
    let index = schema.index_of(&column.name).ok()?;
    // Only a literal of exactly the column's type: the host then compares
    // as the engine would, with no cast for either side to disagree on.
    if &literal.data_type() != schema.field(index).data_type() {
        return None;
    }
    Some(TablePredicate {
        column: index,
        op,
        value: value(literal)?,
    })
}

fn value(literal: &ScalarValue) -> Option<ScanValue> {
    Some(match literal {
        ScalarValue::Boolean(Some(v)) => ScanValue::Boolean(*v),
        ScalarValue::Int8(Some(v)) => ScanValue::Int(i64::from(*v)),
        ScalarValue::Int16(Some(v)) => ScanValue::Int(i64::from(*v)),
        ScalarValue::Int32(Some(v)) => ScanValue::Int(i64::from(*v)),
        ScalarValue::Int64(Some(v)) => ScanValue::Int(*v),
        ScalarValue::UInt8(Some(v)) => ScanValue::UInt(u64::from(*v)),
        ScalarValue::UInt16(Some(v)) => ScanValue::UInt(u64::from(*v)),
        ScalarValue::UInt32(Some(v)) => ScanValue::UInt(u64::from(*v)),
        ScalarValue::UInt64(Some(v)) => ScanValue::UInt(*v),
        // JSON has no NaN or infinity; the engine alone handles those.
        ScalarValue::Float32(Some(v)) if v.is_finite() => ScanValue::Float(f64::from(*v)),
        ScalarValue::Float64(Some(v)) if v.is_finite() => ScanValue::Float(*v),
        ScalarValue::Decimal128(Some(v), _, _) => ScanValue::Decimal(v.to_string()),
        ScalarValue::Date32(Some(v)) => ScanValue::Date32(*v),
        ScalarValue::Utf8(Some(v))
        | ScalarValue::LargeUtf8(Some(v))
        | ScalarValue::Utf8View(Some(v)) => ScanValue::Utf8(v.clone()),
        // A null literal compares to null: the engine's filter drops every
        // row, and there is nothing for the host to check.
        _ => return None,
    })
}

fn compare_op(op: Operator) -> Option<CompareOp> {
    Some(match op {
        Operator::Eq => CompareOp::Eq,
        Operator::NotEq => CompareOp::NotEq,
        Operator::Lt => CompareOp::Lt,
        Operator::LtEq => CompareOp::LtEq,
        Operator::Gt => CompareOp::Gt,
        Operator::GtEq => CompareOp::GtEq,
        _ => return None,
    })
}

fn mirrored(op: CompareOp) -> CompareOp {
    match op {
        CompareOp::Lt => CompareOp::Gt,
        CompareOp::LtEq => CompareOp::GtEq,
        CompareOp::Gt => CompareOp::Lt,
        CompareOp::GtEq => CompareOp::LtEq,
        same => same,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field};
    use datafusion::logical_expr::{col, lit};

    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("price", DataType::Decimal128(15, 2), false),
            Field::new("district", DataType::Utf8, false),
            Field::new("day", DataType::Date32, false),
        ])
    }

    fn predicate(column: usize, op: CompareOp, value: ScanValue) -> TablePredicate {
        TablePredicate { column, op, value }
    }

    #[test]
    fn comparisons_with_a_literal_of_the_columns_type_are_pushed() {
        let schema = schema();
        assert_eq!(
            predicates(&col("id").gt_eq(lit(5i64)), &schema),
            Some(vec![predicate(0, CompareOp::GtEq, ScanValue::Int(5))])
        );
        // The literal on the left: the comparison is turned around.
        assert_eq!(
            predicates(&lit("North").lt(col("district")), &schema),
            Some(vec![predicate(
                2,
                CompareOp::Gt,
                ScanValue::Utf8("North".into())
            )])
        );
        let price = |v: i128| lit(ScalarValue::Decimal128(Some(v), 15, 2));
        assert_eq!(
            predicates(&col("price").between(price(5), price(7)), &schema),
            Some(vec![
                predicate(1, CompareOp::GtEq, ScanValue::Decimal("5".into())),
                predicate(1, CompareOp::LtEq, ScanValue::Decimal("7".into())),
            ])
        );
        assert_eq!(
            predicates(
                &col("day")
                    .lt(lit(ScalarValue::Date32(Some(9131))))
                    .and(col("id").not_eq(lit(3i64))),
                &schema
            ),
            Some(vec![
                predicate(3, CompareOp::Lt, ScanValue::Date32(9131)),
                predicate(0, CompareOp::NotEq, ScanValue::Int(3)),
            ])
        );
    }

    #[test]
    fn anything_else_is_left_to_the_engine_alone() {
        let schema = schema();
        let refused = [
            // Another type: the engine would cast, the host will not guess how.
            col("id").gt(lit(5i32)),
            col("price").gt(lit(ScalarValue::Decimal128(Some(5), 15, 3))),
            // Not a plain comparison.
            col("id").gt(lit(5i64)).or(col("id").lt(lit(1i64))),
            !col("id").between(lit(1i64), lit(5i64)),
            col("district").like(lit("N%")),
            col("id").eq(col("id")),
            // A null literal, and a part of a conjunction that cannot go.
            col("id").eq(lit(ScalarValue::Int64(None))),
            col("id").gt(lit(1i64)).and(col("district").like(lit("N%"))),
            col("unknown").eq(lit(1i64)),
        ];
        for filter in refused {
            assert_eq!(predicates(&filter, &schema), None, "{filter}");
        }
    }

    #[test]
    fn a_scan_gets_only_the_predicates_on_its_columns_renumbered() {
        let table = [
            predicate(3, CompareOp::Lt, ScanValue::Date32(9131)),
            predicate(0, CompareOp::Eq, ScanValue::Int(3)),
        ];
        assert_eq!(
            for_scan(&table, &[2, 3]),
            vec![ScanPredicate {
                column: 1,
                op: CompareOp::Lt,
                value: ScanValue::Date32(9131)
            }]
        );
    }
}
