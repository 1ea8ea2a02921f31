//! The analysis rule of a product with a privacy threshold: the structure an
//! aggregate query's plan must have before anything runs.
//!
//! The rule is an allow-list over the plan as the SQL planner wrote it, in the
//! spirit of AWS Clean Rooms' aggregation analysis rule:
//!
//! - **One aggregation over the product's rows.** Below it only scans of the
//!   product's tables, projections, filters, aliases and inner equi-joins on
//!   declared join columns; no `VALUES`, `UNION`, `LIMIT`, `DISTINCT`,
//!   windows, subqueries or second aggregation. Above it anything that works
//!   on released groups only (the threshold is applied directly on top of the
//!   aggregation, inside the guest, so `HAVING`, `ORDER BY … LIMIT` and windows
//!   never see a withheld group).
//! - **The privacy unit by lineage.** The unit is the unit column of the one
//!   scan of a table that carries one, followed through the plan; names do not
//!   count, so a constant or a `VALUES` column named like the unit is just a
//!   column. A plan that scans units twice (a self-join, a join of two tables
//!   with units) is refused: it could pair one unit's row with many others.
//! - **Allow-listed aggregates on declared columns.** `COUNT`, `COUNT(DISTINCT)`,
//!   `SUM` and `AVG` by default; other statistics only where the policy declares
//!   them for a column; row-valued and order-dependent aggregates never.
//!   Arguments are product columns, or arithmetic on them, never an expression
//!   that could pick one unit's row (`MAX(CASE WHEN id = 7 THEN x END)`).
//! - **Dimensions only.** Every column that decides which rows are counted or
//!   how they are grouped (GROUP BY, WHERE, join keys, computed columns) must be
//!   a dimension column; the unit never is one.
//! - **Allow-listed scalar functions** anywhere in the query.

use std::collections::BTreeSet;

use civicgrid_guest_protocol::policy::AggregationRule;
use civicgrid_guest_protocol::protocol::{GuestFailure, GuestRequest};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, JoinType, LogicalPlan, Operator};

/// Names the platform uses for its own columns; a consumer's SQL may not.
pub const RESERVED_PREFIX: &str = "__civicgrid";

/// Scalar functions any query may call. Each maps values to values without
/// reading other rows; the risky ones (regular expressions, casts that echo
/// their input on failure) are either absent or only reach dimension columns,
/// which the consumer may group by anyway.
pub const DEFAULT_SCALAR_FUNCTIONS: &[&str] = &[
    "abs",
    "btrim",
    "ceil",
    "char_length",
    "character_length",
    "coalesce",
    "concat",
    "date_part",
    "date_trunc",
    "datepart",
    "datetrunc",
    "floor",
    "greatest",
    "least",
    "left",
    "length",
    "lower",
    "ltrim",
    "nullif",
    "right",
    "round",
    "rtrim",
    "starts_with",
    "substr",
    "substring",
    "trim",
    "trunc",
    "upper",
];

/// Aggregates every aggregate query may use on an aggregatable column.
pub const DEFAULT_AGGREGATES: &[&str] = &["count", "sum", "avg", "mean"];

/// Where the privacy unit comes from: the one scan of a table that has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSource {
    /// The scan's table, as the plan names it.
    pub column: Column,
}

/// What the rule found in an accepted plan.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// The privacy unit's source, when a table of the query carries one.
    pub unit: Option<UnitSource>,
}

fn refuse(rule: &str, column: Option<&str>, message: impl Into<String>) -> GuestFailure {
    GuestFailure::policy(rule, column, message)
}

/// Refuses SQL that names the platform's own columns (`__civicgrid…`): such a
/// name could otherwise be mistaken for the platform's unit count.
///
/// # Errors
/// A policy refusal (`reserved-names`).
pub fn check_reserved_names(sql: &str) -> Result<(), GuestFailure> {
    if sql.to_ascii_lowercase().contains(RESERVED_PREFIX) {
        return Err(refuse(
            "reserved-names",
            None,
            format!("names starting with {RESERVED_PREFIX} are reserved for the platform"),
        ));
    }
    Ok(())
}

/// Whether the rule applies: the product withholds small groups or adds noise.
/// Without either, every readable column may be released row by row anyway
/// (grouped by all of them), so only the blocked columns need guarding.
pub fn applies(request: &GuestRequest) -> bool {
    let policy = &request.policy;
    policy.differential_privacy.is_some()
        || request.min_units > 1
        || policy.aggregation.as_ref().is_some_and(|rule| {
            rule.min_units > 1 || rule.column_min_units.values().any(|&k| k > 1)
        })
}

/// How one column of a plan's output came about.
#[derive(Debug, Clone, PartialEq)]
enum Lineage {
    /// A product table's column, passed through unchanged.
    Table { name: String, unit: bool },
    /// Computed from these table columns (already checked as dimensions).
    Computed,
}

struct Checker<'a> {
    rule: &'a AggregationRule,
    /// Table columns that may decide which rows count and how they group.
    dimensions: BTreeSet<String>,
    /// Table columns that identify a privacy unit.
    units: BTreeSet<String>,
    scalar_functions: BTreeSet<String>,
    /// The unit-bearing scan seen (a second is refused).
    unit_scan: Option<Column>,
    /// Whether results are noised: the noise is calibrated to one unit's
    /// rows, and a join can multiply them.
    noised: bool,
}

/// Checks an aggregate query's plan, as written, against the product's
/// analysis rule.
///
/// # Errors
/// A policy refusal naming the rule and, where there is one, the column.
pub fn check(request: &GuestRequest, plan: &LogicalPlan) -> Result<Shape, GuestFailure> {
    let policy = &request.policy;
    let Some(rule) = &policy.aggregation else {
        return Err(refuse(
            "aggregation",
            None,
            "this product does not release aggregates",
        ));
    };
    let units: BTreeSet<String> = rule.privacy_unit_columns.iter().cloned().collect();
    let table_columns = request
        .tables
        .iter()
        .flat_map(|t| t.schema.fields().iter().map(|f| f.name().clone()));
    let dimensions = match &rule.dimension_columns {
        Some(declared) => declared.iter().cloned().collect(),
        None => table_columns.collect::<BTreeSet<_>>(),
    }
    .into_iter()
    .filter(|c| !units.contains(c))
    .collect();
    let mut checker = Checker {
        rule,
        dimensions,
        units,
        scalar_functions: DEFAULT_SCALAR_FUNCTIONS
            .iter()
            .map(|f| (*f).to_owned())
            .chain(rule.scalar_functions.iter().map(|f| f.to_ascii_lowercase()))
            .collect(),
        unit_scan: None,
        noised: policy.differential_privacy.is_some(),
    };
    checker.no_subqueries(plan)?;
    checker.scalar_functions_allowed(plan)?;
    let aggregations = count_aggregations(plan);
    if aggregations != 1 {
        return Err(refuse(
            "aggregation.shape",
            None,
            "an aggregate query has exactly one aggregation (GROUP BY or aggregate functions); \
             aggregating the result of another aggregation is not allowed",
        ));
    }
    checker.above(plan)?;
    built_by_concatenation(plan)?;
    let unit = checker.unit_scan.clone();
    Ok(Shape {
        unit: unit.map(|column| UnitSource { column }),
    })
}

/// The first `Some` that `find` gives for an expression, or any expression
/// inside one, of any node of `plan` (subqueries' plans aside).
fn find_in_expressions<T>(
    plan: &LogicalPlan,
    mut find: impl FnMut(&Expr) -> Option<T>,
) -> Option<T> {
    let mut found = None;
    let _ = plan.apply(|node| {
        let _ = node.apply_expressions(|expr| {
            found = find_in_expr(expr, &mut find);
            Ok(stop_if(found.is_some()))
        });
        Ok(stop_if(found.is_some()))
    });
    found
}

/// The first `Some` that `find` gives for `expr` or an expression inside it.
fn find_in_expr<T>(expr: &Expr, find: &mut impl FnMut(&Expr) -> Option<T>) -> Option<T> {
    let mut found = None;
    let _ = expr.apply(|e| {
        found = find(e);
        Ok(stop_if(found.is_some()))
    });
    found
}

fn stop_if(found: bool) -> TreeNodeRecursion {
    if found {
        TreeNodeRecursion::Stop
    } else {
        TreeNodeRecursion::Continue
    }
}

fn count_aggregations(plan: &LogicalPlan) -> usize {
    let mut n = 0;
    let _ = plan.apply_with_subqueries(|node| {
        if matches!(node, LogicalPlan::Aggregate(_)) {
            n += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    n
}

impl Checker<'_> {
    fn no_subqueries(&self, plan: &LogicalPlan) -> Result<(), GuestFailure> {
        let subquery_node = plan
            .exists(|node| Ok(matches!(node, LogicalPlan::Subquery(_))))
            .unwrap_or(true)
            .then_some("a subquery");
        let found = subquery_node.or_else(|| {
            find_in_expressions(plan, |e| match e {
                Expr::ScalarSubquery(_) => Some("a scalar subquery"),
                Expr::Exists(_) => Some("EXISTS"),
                Expr::InSubquery(_) => Some("IN (subquery)"),
                Expr::OuterReferenceColumn(..) => Some("a correlated subquery"),
                Expr::ScalarVariable(..) | Expr::Placeholder(_) => {
                    Some("a variable or placeholder")
                }
                Expr::Unnest(_) => Some("UNNEST"),
                Expr::GroupingSet(_) => Some("GROUPING SETS, CUBE or ROLLUP"),
                _ => None,
            })
        });
        match found {
            Some(what) => Err(refuse(
                "aggregation.shape",
                None,
                format!("{what} is not allowed in an aggregate query of this product"),
            )),
            None => Ok(()),
        }
    }

    fn scalar_functions_allowed(&self, plan: &LogicalPlan) -> Result<(), GuestFailure> {
        let refused = find_in_expressions(plan, |e| match e {
            Expr::ScalarFunction(function) => {
                let name = function.func.name().to_ascii_lowercase();
                let allowed = self.scalar_functions.contains(&name)
                    || function
                        .func
                        .aliases()
                        .iter()
                        .any(|a| self.scalar_functions.contains(&a.to_ascii_lowercase()));
                (!allowed).then_some(name)
            }
            _ => None,
        });
        match refused {
            Some(name) => Err(refuse(
                "scalar-functions",
                None,
                format!(
                    "the function {name} is not allowed by this product's policy; allowed: {}",
                    self.scalar_functions
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// Operators above the aggregation see released groups only.
    fn above(&mut self, plan: &LogicalPlan) -> Result<(), GuestFailure> {
        match plan {
            LogicalPlan::Aggregate(aggregate) => {
                let lineage = self.below(&aggregate.input)?;
                let input = aggregate.input.schema();
                for group in &aggregate.group_expr {
                    self.dimension_use(group, input, &lineage, "GROUP BY")?;
                }
                for expr in &aggregate.aggr_expr {
                    self.aggregate(expr, input, &lineage)?;
                }
                Ok(())
            }
            LogicalPlan::Projection(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Distinct(_) => self.above(plan.inputs()[0]),
            other => Err(refuse(
                "aggregation.shape",
                None,
                format!(
                    "{} is not allowed in an aggregate query of this product",
                    construct(other)
                ),
            )),
        }
    }

    /// The rows the aggregation counts: where each output column comes from.
    fn below(&mut self, plan: &LogicalPlan) -> Result<Vec<Lineage>, GuestFailure> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                if scan.fetch.is_some() {
                    return Err(shape("a row limit on a table"));
                }
                let schema = &scan.projected_schema;
                let source = scan.source.schema();
                let unit_name = self
                    .rule
                    .privacy_unit_columns
                    .iter()
                    .find(|u| source.field_with_name(u).is_ok());
                if let Some(unit) = unit_name {
                    if self.unit_scan.is_some() {
                        return Err(refuse(
                            "aggregation.joins",
                            Some(unit),
                            format!(
                                "the query reads the privacy unit {unit} more than once (a self-join, \
                                 or a join of two tables that carry privacy units): one unit's rows could be \
                                 paired with many others, so it is refused"
                            ),
                        ));
                    }
                    self.unit_scan = Some(Column::new(Some(scan.table_name.clone()), unit.clone()));
                }
                for filter in &scan.filters {
                    let lineage = table_lineage(schema, &self.units);
                    self.dimension_use(filter, schema, &lineage, "WHERE")?;
                }
                Ok(table_lineage(schema, &self.units))
            }
            LogicalPlan::Projection(projection) => {
                let inner = self.below(&projection.input)?;
                let input = projection.input.schema();
                projection
                    .expr
                    .iter()
                    .map(|expr| match expr.clone().unalias_nested().data {
                        Expr::Column(column) => Ok(lineage_of(&column, input, &inner)),
                        other => {
                            self.dimension_use(&other, input, &inner, "a computed column")?;
                            Ok(Lineage::Computed)
                        }
                    })
                    .collect()
            }
            LogicalPlan::Filter(filter) => {
                let inner = self.below(&filter.input)?;
                self.dimension_use(&filter.predicate, filter.input.schema(), &inner, "WHERE")?;
                Ok(inner)
            }
            LogicalPlan::SubqueryAlias(alias) => self.below(&alias.input),
            LogicalPlan::Sort(sort) if sort.fetch.is_none() => self.below(&sort.input),
            LogicalPlan::Join(join) => {
                if self.noised {
                    return Err(refuse(
                        "aggregation.joins",
                        None,
                        "this product adds noise sized for one person's rows, and a join can \
                         repeat them; query one table",
                    ));
                }
                if join.join_type != JoinType::Inner {
                    return Err(refuse(
                        "aggregation.joins",
                        None,
                        format!(
                            "only inner joins are allowed in an aggregate query; this is a {} join",
                            join.join_type
                        ),
                    ));
                }
                // Rows match on equal join columns, and only on them: a
                // cross join, `ON true`, `OR`, or a range condition pairs one
                // unit's row with many others, multiplying what it adds.
                let mut pairs: Vec<(&Expr, &Expr)> = join.on.iter().map(|(l, r)| (l, r)).collect();
                let conjuncts = join
                    .filter
                    .as_ref()
                    .map(split_conjunction)
                    .unwrap_or_default();
                for conjunct in conjuncts {
                    match conjunct {
                        Expr::BinaryExpr(BinaryExpr {
                            left,
                            op: Operator::Eq,
                            right,
                        }) => pairs.push((left, right)),
                        _ => return Err(not_an_equi_join()),
                    }
                }
                let relates = |a: &Expr, b: &Expr| match (a, b) {
                    (Expr::Column(a), Expr::Column(b)) => {
                        join.left.schema().has_column(a) && join.right.schema().has_column(b)
                    }
                    _ => false,
                };
                if pairs.is_empty() || !pairs.iter().all(|(a, b)| relates(a, b) || relates(b, a)) {
                    return Err(not_an_equi_join());
                }
                let mut lineage = self.below(&join.left)?;
                lineage.extend(self.below(&join.right)?);
                for (left, right) in &join.on {
                    self.join_key(left, &join.schema, &lineage)?;
                    self.join_key(right, &join.schema, &lineage)?;
                }
                if let Some(filter) = &join.filter {
                    self.join_key(filter, &join.schema, &lineage)?;
                }
                Ok(lineage)
            }
            other => Err(shape(construct(other))),
        }
    }

    /// A column used to pick or group rows: it must be a dimension.
    fn dimension_use(
        &self,
        expr: &Expr,
        schema: &DFSchemaRef,
        lineage: &[Lineage],
        clause: &str,
    ) -> Result<(), GuestFailure> {
        self.no_aggregate_or_window(expr, clause)?;
        for column in sorted_refs(expr) {
            if let Lineage::Table { name, unit } = lineage_of(column, schema, lineage)
                && (unit || !self.dimensions.contains(&name))
            {
                return Err(not_a_dimension(&name, unit, clause, &self.dimensions));
            }
        }
        Ok(())
    }

    /// A join condition: columns must be declared join columns.
    fn join_key(
        &self,
        expr: &Expr,
        schema: &DFSchemaRef,
        lineage: &[Lineage],
    ) -> Result<(), GuestFailure> {
        self.no_aggregate_or_window(expr, "a join condition")?;
        for column in sorted_refs(expr) {
            let name = match lineage_of(column, schema, lineage) {
                Lineage::Table { name, .. } => name,
                // A key computed in a subquery (`'x' AS k`) matches whatever
                // it is made to: a cross join under another name, on a
                // product that may allow no joins at all.
                Lineage::Computed => {
                    return Err(refuse(
                        "aggregation.joins",
                        Some(&column.name),
                        format!(
                            "{} is computed in a subquery; join on the product's own columns",
                            column.name
                        ),
                    ));
                }
            };
            if !self.rule.join_columns.contains(&name) {
                return Err(refuse(
                    "aggregation.joins",
                    Some(&name),
                    if self.rule.join_columns.is_empty() {
                        format!("this product's policy allows no joins; the query joins on {name}")
                    } else {
                        format!(
                            "{name} is not a join column; join on {} only",
                            self.rule.join_columns.join(", ")
                        )
                    },
                ));
            }
        }
        Ok(())
    }

    fn no_aggregate_or_window(&self, expr: &Expr, clause: &str) -> Result<(), GuestFailure> {
        let found = find_in_expr(expr, &mut |e| {
            matches!(e, Expr::AggregateFunction(_) | Expr::WindowFunction(_)).then_some(())
        });
        if found.is_some() {
            return Err(shape(&format!(
                "an aggregate or window function in {clause}"
            )));
        }
        Ok(())
    }

    /// One aggregate of the aggregation.
    fn aggregate(
        &self,
        expr: &Expr,
        schema: &DFSchemaRef,
        lineage: &[Lineage],
    ) -> Result<(), GuestFailure> {
        let display = expr.schema_name().to_string();
        let Expr::AggregateFunction(function) = expr.clone().unalias_nested().data else {
            return Err(refuse(
                "aggregation.functions",
                None,
                format!("{display} is not an aggregate function"),
            ));
        };
        let name = function.func.name().to_ascii_lowercase();
        let params = &function.params;
        if params.filter.is_some() {
            return Err(refuse(
                "aggregation.functions",
                None,
                format!("{display}: FILTER (WHERE …) is not allowed; filter rows with WHERE"),
            ));
        }
        if !params.order_by.is_empty() {
            return Err(refuse(
                "aggregation.functions",
                None,
                format!("{display}: an ordered aggregate is not allowed"),
            ));
        }
        let is_count = name == "count";
        if params.distinct && !is_count {
            return Err(refuse(
                "aggregation.functions",
                None,
                format!("{display}: DISTINCT is allowed only in COUNT"),
            ));
        }
        // COUNT(*): no column at all.
        if is_count
            && !params.distinct
            && params.args.iter().all(|a| matches!(a, Expr::Literal(..)))
        {
            return Ok(());
        }
        let Some(first) = params.args.first() else {
            return Err(refuse(
                "aggregation.functions",
                None,
                format!("{display} has no argument"),
            ));
        };
        let numeric_only = matches!(name.as_str(), "sum" | "avg" | "mean");
        if !argument_is_allowed(first, schema, numeric_only) {
            return Err(refuse(
                "aggregation.arguments",
                None,
                format!(
                    "{display}: an aggregate's argument must be a column{}, not a computed expression",
                    if numeric_only {
                        " or a linear combination of columns and numbers (x * 2 + y)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        // Further arguments (a percentile's fraction) must be constants.
        if params.args[1..]
            .iter()
            .any(|a| !matches!(a, Expr::Literal(..)))
        {
            return Err(refuse(
                "aggregation.arguments",
                None,
                format!("{display}: only the first argument may name a column"),
            ));
        }
        for column in sorted_refs(first) {
            let (column_name, unit) = match lineage_of(column, schema, lineage) {
                Lineage::Table { name, unit } => (name, unit),
                Lineage::Computed => {
                    return Err(refuse(
                        "aggregation.arguments",
                        Some(&column.name),
                        format!(
                            "{display}: aggregate a column of the product's tables, not a value \
                             computed in a subquery ({})",
                            column.name
                        ),
                    ));
                }
            };
            if unit {
                if !is_count {
                    return Err(refuse(
                        "aggregation.functions",
                        Some(&column_name),
                        format!(
                            "{column_name} identifies a privacy unit: it may only be counted (COUNT, COUNT(DISTINCT))"
                        ),
                    ));
                }
                continue;
            }
            if let Some(aggregatable) = &self.rule.aggregate_columns
                && !aggregatable.contains(&column_name)
            {
                return Err(refuse(
                    "aggregation.aggregate-columns",
                    Some(&column_name),
                    format!(
                        "{column_name} may not be aggregated; aggregate {} only",
                        aggregatable.join(", ")
                    ),
                ));
            }
            let declared = self
                .rule
                .column_functions
                .get(&column_name)
                .is_some_and(|fs| fs.iter().any(|f| f.eq_ignore_ascii_case(&name)));
            if !DEFAULT_AGGREGATES.contains(&name.as_str()) && !declared {
                return Err(refuse(
                    "aggregation.functions",
                    Some(&column_name),
                    format!(
                        "{name} is not allowed on {column_name}: aggregates are COUNT, COUNT(DISTINCT), \
                         SUM and AVG, and others only where the product's policy declares them for a column"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A column, a number, a cast that cannot fail or change which values are
/// distinct, or a *linear* combination of those (`price * 1.1 + fee`): every
/// row adds its own column's value, scaled. A product of two columns or a
/// comparison could weight one row by one and every other by zero
/// (`income * (district_code - 1) * (district_code - 2)`), a hidden `CASE`;
/// `TRY_CAST` to a narrow type is a hidden filter.
fn argument_is_allowed(expr: &Expr, schema: &DFSchemaRef, numeric_only: bool) -> bool {
    degree(expr, schema, numeric_only).is_some_and(|d| d <= 1)
}

/// The degree of `expr` as a polynomial in columns, where it is one.
fn degree(expr: &Expr, schema: &DFSchemaRef, numeric_only: bool) -> Option<u32> {
    match expr {
        Expr::Column(_) => Some(1),
        Expr::Alias(alias) => degree(&alias.expr, schema, numeric_only),
        Expr::Literal(value, _) => (numeric_only && value.data_type().is_numeric()).then_some(0),
        Expr::Cast(cast) => {
            let from = cast.expr.get_type(schema.as_ref()).ok()?;
            (cast_cannot_fail(&from, cast.field.data_type())
                && *cast.field.data_type() != DataType::Boolean)
                .then(|| degree(&cast.expr, schema, numeric_only))
                .flatten()
        }
        Expr::Negative(inner) if numeric_only => degree(inner, schema, numeric_only),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) if numeric_only => {
            let (l, r) = (
                degree(left, schema, numeric_only)?,
                degree(right, schema, numeric_only)?,
            );
            match op {
                Operator::Plus | Operator::Minus => Some(l.max(r)),
                Operator::Multiply => Some(l + r),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether casting any value of `from` to `to` always succeeds (a `CAST`
/// fails the query on a value it cannot represent, and which value failed is
/// an oracle): widening numbers, numbers to floating point, anything to text.
pub fn cast_cannot_fail(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    fn int_digits(t: &DataType) -> Option<u8> {
        Some(match t {
            Int8 | UInt8 => 3,
            Int16 | UInt16 => 5,
            Int32 | UInt32 => 10,
            Int64 => 19,
            UInt64 => 20,
            _ => return None,
        })
    }
    fn int_rank(t: &DataType) -> Option<(bool, u8)> {
        Some(match t {
            Int8 => (true, 8),
            Int16 => (true, 16),
            Int32 => (true, 32),
            Int64 => (true, 64),
            UInt8 => (false, 8),
            UInt16 => (false, 16),
            UInt32 => (false, 32),
            UInt64 => (false, 64),
            _ => return None,
        })
    }
    if from == to || matches!(from, Null) {
        return true;
    }
    if let Dictionary(_, value) = from {
        return cast_cannot_fail(value, to);
    }
    match (from, to) {
        (_, Utf8 | LargeUtf8 | Utf8View) => {
            from.is_primitive() || matches!(from, Boolean | Utf8 | LargeUtf8 | Utf8View)
        }
        (_, Float64 | Float32) => from.is_numeric(),
        (Boolean, _) => to.is_integer(),
        (Date32, Date64 | Timestamp(..)) | (Date64 | Timestamp(..), Date32) => true,
        (Decimal128(p1, s1), Decimal128(p2, s2) | Decimal256(p2, s2))
        | (Decimal256(p1, s1), Decimal256(p2, s2)) => {
            s2 >= s1 && i16::from(*p2) - i16::from(*s2) >= i16::from(*p1) - i16::from(*s1)
        }
        (_, Decimal128(p, s) | Decimal256(p, s)) => {
            int_digits(from).is_some_and(|d| i16::from(*p) - i16::from(*s) >= i16::from(d))
        }
        _ => match (int_rank(from), int_rank(to)) {
            (Some((false, a)), Some((false, b))) => b >= a,
            (Some((true, a)), Some((true, b))) => b >= a,
            (Some((false, a)), Some((true, b))) => b > a,
            _ => false,
        },
    }
}

/// Which of `plan`'s output columns hold strings built by concatenation,
/// anywhere in the plan as written (above the aggregation too: there a
/// string doubled per level costs per group, withheld groups included).
/// A concatenation of a built string is refused: strings built from built
/// strings can double in length at every level, so a short query could
/// make each row it keeps as costly as it likes, and its running time
/// would count withheld rows.
///
/// # Errors
/// `aggregation.growth`, naming the built column.
fn built_by_concatenation(plan: &LogicalPlan) -> Result<Vec<bool>, GuestFailure> {
    let inputs: Vec<(Vec<bool>, &DFSchemaRef)> = plan
        .inputs()
        .into_iter()
        .map(|input| Ok((built_by_concatenation(input)?, input.schema())))
        .collect::<Result<_, GuestFailure>>()?;
    // Columns are looked up in the one input, or in the two sides of a join
    // (whose output is the left's columns, then the right's).
    let built_column = |column: &Column| -> bool {
        inputs.iter().any(|(built, schema)| {
            schema
                .index_of_column(column)
                .ok()
                .and_then(|i| built.get(i).copied())
                .unwrap_or(false)
        })
    };
    let check = |expr: &Expr| -> Result<bool, GuestFailure> {
        if let Some(reason) = grows_strings(expr) {
            return Err(refuse(
                "aggregation.growth",
                None,
                format!(
                    "the query has {reason}; each row it keeps would cost more the longer the \
                     query, which would count withheld rows"
                ),
            ));
        }
        let refused = find_in_expr(expr, &mut |e| {
            is_concatenation(e)
                .then(|| sorted_refs(e).into_iter().find(|c| built_column(c)))
                .flatten()
                .map(|column| column.name.clone())
        });
        if let Some(column) = refused {
            return Err(refuse(
                "aggregation.growth",
                Some(&column),
                format!(
                    "the query concatenates {column}, a string built by concatenation: strings \
                     built from built strings can double in length at every level, and with them \
                     the cost of every row the query keeps, which would count withheld rows; \
                     concatenate the product's own columns"
                ),
            ));
        }
        Ok(
            find_in_expr(expr, &mut |e| is_concatenation(e).then_some(())).is_some()
                || sorted_refs(expr).into_iter().any(&built_column),
        )
    };
    let width = plan.schema().fields().len();
    match plan {
        LogicalPlan::TableScan(_) => Ok(vec![false; width]),
        LogicalPlan::Projection(projection) => projection.expr.iter().map(check).collect(),
        LogicalPlan::Aggregate(aggregate) => {
            let mut built: Vec<bool> = aggregate
                .group_expr
                .iter()
                .map(check)
                .collect::<Result<_, _>>()?;
            for expr in &aggregate.aggr_expr {
                check(expr)?;
            }
            built.resize(width, false);
            Ok(built)
        }
        LogicalPlan::Join(join) => {
            for (left, right) in &join.on {
                check(left)?;
                check(right)?;
            }
            if let Some(filter) = &join.filter {
                check(filter)?;
            }
            let mut built: Vec<bool> = inputs.iter().flat_map(|(b, _)| b.clone()).collect();
            built.resize(width, false);
            Ok(built)
        }
        _ => {
            let mut first_failure = None;
            let _ = plan.apply_expressions(|expr| {
                if let Err(failure) = check(expr) {
                    first_failure = Some(failure);
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
            if let Some(failure) = first_failure {
                return Err(failure);
            }
            // Pass-through nodes (filters, sorts, aliases, limits, windows)
            // keep their input's columns first.
            let mut built = inputs.first().map(|(b, _)| b.clone()).unwrap_or_default();
            built.resize(width, false);
            Ok(built)
        }
    }
}

fn is_concatenation(expr: &Expr) -> bool {
    match expr {
        Expr::ScalarFunction(function) => matches!(function.func.name(), "concat" | "concat_ws"),
        Expr::BinaryExpr(BinaryExpr { op, .. }) => *op == Operator::StringConcat,
        _ => false,
    }
}

/// The most a string literal may hold, and the most values one
/// concatenation may join, under the rule: each kept row copies them.
const MAX_STRING_LITERAL_BYTES: usize = 256;
const MAX_CONCATENATED: usize = 8;

/// Why `expr` could make each kept row cost in proportion to the query's
/// own length, if it could: a long string literal, or a concatenation of
/// many values (`||` chains count as one).
fn grows_strings(expr: &Expr) -> Option<String> {
    find_in_expr(expr, &mut |e| match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(text))
            | ScalarValue::LargeUtf8(Some(text))
            | ScalarValue::Utf8View(Some(text)),
            _,
        ) if text.len() > MAX_STRING_LITERAL_BYTES => Some(format!(
            "a string literal of {} bytes (at most {MAX_STRING_LITERAL_BYTES})",
            text.len()
        )),
        Expr::ScalarFunction(function)
            if matches!(function.func.name(), "concat" | "concat_ws")
                && function.args.len() > MAX_CONCATENATED =>
        {
            Some(format!(
                "a concatenation of {} values (at most {MAX_CONCATENATED})",
                function.args.len()
            ))
        }
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::StringConcat,
            ..
        }) if concatenated(e) > MAX_CONCATENATED => Some(format!(
            "a concatenation of {} values (at most {MAX_CONCATENATED})",
            concatenated(e)
        )),
        _ => None,
    })
}

/// How many values a chain of `||` joins.
fn concatenated(expr: &Expr) -> usize {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::StringConcat,
            right,
        }) => concatenated(left) + concatenated(right),
        _ => 1,
    }
}

/// An expression's columns in name order, so that a refusal names the same
/// column every time.
fn sorted_refs(expr: &Expr) -> Vec<&Column> {
    let mut columns: Vec<&Column> = expr.column_refs().into_iter().collect();
    columns.sort_by(|a, b| {
        (&a.name, a.relation.as_ref().map(|r| r.to_string()))
            .cmp(&(&b.name, b.relation.as_ref().map(|r| r.to_string())))
    });
    columns
}

fn table_lineage(schema: &DFSchemaRef, units: &BTreeSet<String>) -> Vec<Lineage> {
    schema
        .fields()
        .iter()
        .map(|f| Lineage::Table {
            name: f.name().clone(),
            unit: units.contains(f.name()),
        })
        .collect()
}

fn lineage_of(column: &Column, schema: &DFSchemaRef, lineage: &[Lineage]) -> Lineage {
    schema
        .index_of_column(column)
        .ok()
        .and_then(|i| lineage.get(i).cloned())
        // A column the schema cannot resolve is the planner's to refuse; treat
        // it as computed so that it can never pass as a table column.
        .unwrap_or(Lineage::Computed)
}

fn not_a_dimension(
    name: &str,
    unit: bool,
    clause: &str,
    dimensions: &BTreeSet<String>,
) -> GuestFailure {
    let message = if unit {
        format!("{name} identifies a privacy unit: it may only be counted, never used in {clause}")
    } else {
        format!(
            "{name} may be used only inside an aggregate function, not in {clause}; group, filter \
             and compute with {} only",
            dimensions.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    refuse("aggregation.dimension-columns", Some(name), message)
}

fn not_an_equi_join() -> GuestFailure {
    refuse(
        "aggregation.joins",
        None,
        "a join must match rows on equal join columns only (JOIN … ON a.column = b.column [AND …]); \
         cross joins, joins written with commas, OR, ranges and other conditions are not allowed",
    )
}

fn shape(what: &str) -> GuestFailure {
    refuse(
        "aggregation.shape",
        None,
        format!("{what} is not allowed in an aggregate query of this product"),
    )
}

/// The SQL construct an operator comes from, for a refusal.
fn construct(plan: &LogicalPlan) -> &'static str {
    match plan {
        LogicalPlan::Values(_) => "VALUES",
        LogicalPlan::EmptyRelation(_) => "a query that reads no table of the product",
        LogicalPlan::Union(_) => "UNION",
        LogicalPlan::Limit(_) => "LIMIT or OFFSET before the aggregation",
        LogicalPlan::Sort(_) => "ORDER BY … LIMIT before the aggregation",
        LogicalPlan::Distinct(_) => "DISTINCT before the aggregation",
        LogicalPlan::Window(_) => "a window function before the aggregation",
        LogicalPlan::Aggregate(_) => "a second aggregation",
        LogicalPlan::Join(_) => "a join",
        LogicalPlan::Unnest(_) => "UNNEST",
        LogicalPlan::RecursiveQuery(_) => "a recursive query",
        LogicalPlan::Subquery(_) => "a subquery",
        _ => "this operator",
    }
}

/// Refuses a thresholded aggregate query whose plan, as it will run, could
/// fail on some value of a row the threshold withholds: an integer division
/// by `x - 60111`, a narrowing cast, `make_date` of a withheld row. Failed
/// queries tell the consumer nothing but that they failed, and that is one bit
/// about a withheld row, for the price of a query.
///
/// Checked: every expression of every node, above the aggregation too. The
/// threshold is a filter in the plan, not a barrier: the optimiser merges
/// `HAVING` into it, and the physical planner pushes projections that compute
/// on aggregates below it, where they meet withheld groups.
/// Functions the product's policy declares are the provider's choice.
///
/// # Errors
/// A policy refusal (`aggregation.cannot-fail`) naming the expression.
pub fn check_cannot_fail(request: &GuestRequest, plan: &LogicalPlan) -> Result<(), GuestFailure> {
    let declared: BTreeSet<String> = request
        .policy
        .aggregation
        .as_ref()
        .map(|rule| {
            rule.scalar_functions
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut refused = None;
    let _ = plan.apply(|node| {
        // What cannot be typed cannot be shown to be safe.
        let Some(schema) = expression_schema(node) else {
            refused = Some("an expression whose types cannot be worked out".to_owned());
            return Ok(TreeNodeRecursion::Stop);
        };
        for expr in node.expressions() {
            if let Some(reason) = can_fail(&expr, &schema, &declared) {
                refused = Some(reason);
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match refused {
        Some(reason) => Err(refuse(
            "aggregation.cannot-fail",
            None,
            format!(
                "{reason} can fail on some values, and a failure would tell which rows hold them; \
                 use expressions that cannot fail (CAST to DOUBLE before dividing, widening \
                 casts, constant arguments)"
            ),
        )),
        None => Ok(()),
    }
}

/// The schema a node's expressions are evaluated against.
fn expression_schema(node: &LogicalPlan) -> Option<DFSchemaRef> {
    match node {
        LogicalPlan::TableScan(scan) => datafusion::common::DFSchema::try_from_qualified_schema(
            scan.table_name.clone(),
            &scan.source.schema(),
        )
        .ok()
        .map(std::sync::Arc::new),
        _ => {
            let inputs = node.inputs();
            let (first, rest) = inputs.split_first()?;
            let mut schema = first.schema().as_ref().clone();
            for input in rest {
                schema = schema.join(input.schema()).ok()?;
            }
            Some(std::sync::Arc::new(schema))
        }
    }
}

/// Why `expr` could fail on some row's values, if it could.
fn can_fail(expr: &Expr, schema: &DFSchemaRef, declared: &BTreeSet<String>) -> Option<String> {
    let own = || -> Option<String> {
        match expr {
            Expr::Column(_)
            | Expr::Literal(..)
            | Expr::Alias(_)
            | Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Between(_)
            | Expr::InList(_)
            | Expr::Case(_)
            | Expr::TryCast(_)
            | Expr::AggregateFunction(_)
            | Expr::WindowFunction(_) => None,
            Expr::Negative(inner) => {
                let t = inner.get_type(schema.as_ref()).ok()?;
                (!(t.is_integer() || t.is_floating())).then(|| format!("negating a {t}"))
            }
            Expr::Like(like) => (!matches!(*like.pattern, Expr::Literal(..)))
                .then(|| "LIKE with a computed pattern".to_owned()),
            Expr::Cast(cast) => match cast.expr.get_type(schema.as_ref()) {
                Ok(from) if cast_cannot_fail(&from, cast.field.data_type()) => None,
                Ok(from) => Some(format!("CAST from {from} to {}", cast.field.data_type())),
                Err(_) => Some(format!("CAST to {}", cast.field.data_type())),
            },
            Expr::BinaryExpr(BinaryExpr { op, .. }) => {
                let result = expr.get_type(schema.as_ref()).ok();
                let arithmetic_ok = |t: &DataType| t.is_integer() || t.is_floating();
                match op {
                    Operator::Eq
                    | Operator::NotEq
                    | Operator::Lt
                    | Operator::LtEq
                    | Operator::Gt
                    | Operator::GtEq
                    | Operator::And
                    | Operator::Or
                    | Operator::IsDistinctFrom
                    | Operator::IsNotDistinctFrom
                    | Operator::StringConcat => None,
                    // Integers wrap; floating point has infinities.
                    Operator::Plus | Operator::Minus | Operator::Multiply => {
                        (!result.as_ref().is_some_and(arithmetic_ok))
                            .then(|| format!("{op} on decimals or times"))
                    }
                    Operator::Divide | Operator::Modulo => {
                        (!result.as_ref().is_some_and(DataType::is_floating))
                            .then(|| format!("{op} on integers or decimals"))
                    }
                    _ => Some(format!("the operator {op}")),
                }
            }
            Expr::ScalarFunction(function) => {
                let name = function.func.name().to_ascii_lowercase();
                if declared.contains(&name) {
                    return None;
                }
                (!function_cannot_fail(&name, &function.args, schema)).then(|| format!("{name}(…)"))
            }
            other => Some(other.variant_name().to_owned()),
        }
    };
    if let Some(reason) = own() {
        return Some(reason);
    }
    let mut found = None;
    let _ = expr.apply_children(|child| {
        found = can_fail(child, schema, declared);
        Ok(stop_if(found.is_some()))
    });
    found
}

/// Whether a call of a scalar function returns a value for every row: each
/// function that can is listed with what its arguments must be. `make_date`,
/// `date_bin`, regular expressions and the rest fail on some values, and a
/// failure is a one-bit answer about a row.
fn function_cannot_fail(name: &str, args: &[Expr], schema: &DFSchemaRef) -> bool {
    let literal = |i: usize| match args.get(i) {
        Some(Expr::Literal(value, _)) => Some(value.clone()),
        _ => None,
    };
    let text = |i: usize| {
        literal(i).and_then(|v| match v {
            ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s) => s,
            _ => None,
        })
    };
    let integer = |i: usize| {
        literal(i).and_then(|v| match v.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(n) => n,
            _ => None,
        })
    };
    let first_type = || args.first().and_then(|a| a.get_type(schema.as_ref()).ok());
    match name {
        // abs(i64::MIN) is an overflow error.
        "abs" => first_type().is_some_and(|t| t.is_floating()),
        // On decimals they rescale, which can overflow.
        "ceil" | "floor" => first_type().is_some_and(|t| t.is_floating() || t.is_integer()),
        // On integers and decimals, negative digits scale by powers of ten
        // that overflow on chosen values; on floats they saturate.
        "round" | "trunc" => {
            first_type().is_some_and(|t| t.is_floating())
                && (args.len() < 2 || integer(1).is_some_and(|digits| digits.abs() <= 38))
        }
        // A count whose magnitude does not fit is an overflow.
        "left" | "right" => integer(1).is_some_and(|count| count != i64::MIN),
        "btrim" | "char_length" | "character_length" | "coalesce" | "concat" | "greatest"
        | "least" | "length" | "lower" | "ltrim" | "nullif" | "rtrim" | "starts_with" | "trim"
        | "upper" => true,
        "substr" | "substring" => {
            integer(1).is_some_and(|start| start != i64::MIN)
                && (args.len() < 3 || integer(2).is_some_and(|count| count >= 0))
        }
        "date_trunc" | "datetrunc" => text(0)
            .is_some_and(|g| DATE_TRUNC_GRANULARITIES.contains(&g.to_ascii_lowercase().as_str())),
        "date_part" | "datepart" => {
            text(0).is_some_and(|p| DATE_PARTS.contains(&p.to_ascii_lowercase().as_str()))
        }
        _ => false,
    }
}

const DATE_TRUNC_GRANULARITIES: &[&str] = &[
    "microsecond",
    "millisecond",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "quarter",
    "year",
];

const DATE_PARTS: &[&str] = &[
    "year", "quarter", "month", "week", "day", "hour", "minute", "second", "doy", "dow", "epoch",
];

/// The column the rewrite adds to projections that would drop the unit.
pub const CARRIED_UNIT: &str = "__civicgrid_unit";

/// Carries the privacy unit of the scan `unit` names up through every
/// operator between that scan and the aggregation, so the aggregation can
/// count it: a projection that drops it gets it back as [`CARRIED_UNIT`].
/// Returns the plan and the unit's column in its output.
///
/// # Errors
/// When the plan has no such scan (the rule found it, so this is a bug).
pub fn carry_unit(
    plan: LogicalPlan,
    unit: &Column,
) -> datafusion::error::Result<(LogicalPlan, Column)> {
    use datafusion::common::tree_node::Transformed;
    use datafusion::logical_expr::{Projection, SubqueryAlias};

    if let LogicalPlan::TableScan(scan) = &plan {
        if is_unit_scan(&plan, unit) && scan.projected_schema.index_of_column(unit).is_ok() {
            return Ok((plan, unit.clone()));
        }
        return datafusion::common::plan_err!("the unit's scan does not read {unit}");
    }
    let mut carried = None;
    let plan = plan
        .map_children(|child| {
            if carried.is_none() && contains_unit_scan(&child, unit) {
                let (child, column) = carry_unit(child, unit)?;
                carried = Some(column);
                Ok(Transformed::yes(child))
            } else {
                Ok(Transformed::no(child))
            }
        })?
        .data;
    let Some(column) = carried else {
        return datafusion::common::plan_err!("no scan of {unit} to carry");
    };
    let output = |schema: &DFSchemaRef, index: usize| {
        let (qualifier, field) = schema.qualified_field(index);
        Column::new(qualifier.cloned(), field.name())
    };
    match plan {
        LogicalPlan::Projection(projection) => {
            let mut expr = projection.expr;
            let position = expr.iter().position(
                |e| matches!(e.clone().unalias_nested().data, Expr::Column(c) if c == column),
            );
            let index = match position {
                Some(index) => index,
                None => {
                    expr.push(Expr::Column(column).alias(CARRIED_UNIT));
                    expr.len() - 1
                }
            };
            let projection = Projection::try_new(expr, projection.input)?;
            let unit = output(&projection.schema, index);
            Ok((LogicalPlan::Projection(projection), unit))
        }
        LogicalPlan::SubqueryAlias(alias) => {
            let index = alias.input.schema().index_of_column(&column)?;
            let alias = SubqueryAlias::try_new(alias.input, alias.alias)?;
            let unit = output(&alias.schema, index);
            Ok((LogicalPlan::SubqueryAlias(alias), unit))
        }
        other => Ok((other.recompute_schema()?, column)),
    }
}

fn is_unit_scan(plan: &LogicalPlan, unit: &Column) -> bool {
    matches!(plan, LogicalPlan::TableScan(scan)
        if unit.relation.as_ref() == Some(&scan.table_name)
            && scan.source.schema().field_with_name(&unit.name).is_ok())
}

fn contains_unit_scan(plan: &LogicalPlan, unit: &Column) -> bool {
    plan.exists(|node| Ok(is_unit_scan(node, unit)))
        .unwrap_or(false)
}
