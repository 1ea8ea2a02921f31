//! The output policy, checked on a query's plan before it runs, and the one
//! rewrite the threshold needs: counting distinct privacy units per group.

use std::collections::BTreeSet;
use std::sync::Arc;

use civicgrid_guest_protocol::policy::{DifferentialPrivacy, OutputPolicy};
use civicgrid_guest_protocol::protocol::{
    AGGREGATE_METADATA, GuestFailure, GuestRequest, MIN_UNITS_METADATA, SOURCE_METADATA,
    UNITS_COLUMN,
};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ExprSchema};
use datafusion::error::DataFusionError;
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::expr::Cast;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, Filter, LogicalPlan, LogicalPlanBuilder, Projection, lit, when,
};

use crate::rule;

/// Whether released rows are groups or source rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// Every released row is a group of an aggregation.
    Aggregate,
    /// Released rows are (projections of) source rows.
    List,
}

/// What the plan reads and what the policy requires of its result.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Aggregate or list.
    pub kind: QueryKind,
    /// Every table column the optimised plan reads, in any clause.
    pub columns_read: BTreeSet<String>,
    /// Distinct privacy units each released row must cover (0: no threshold).
    pub min_units: u64,
    /// The column groups are counted by, when there is a threshold.
    pub unit_column: Option<Column>,
    /// Under differential privacy: for each released column, the aggregate
    /// the host adds noise to (None: a group key).
    pub noisy_outputs: Vec<Option<NoisyAggregate>>,
}

/// A released column that differential privacy adds noise to.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisyAggregate {
    /// `count`, `sum` or `avg`.
    pub kind: &'static str,
    /// The summed or averaged column (its clamping bounds set the noise).
    pub source: Option<String>,
}

fn refuse(rule: &str, column: Option<&str>, message: String) -> GuestFailure {
    GuestFailure::policy(rule, column, message)
}

/// Checks `plan` against the request's policy and returns it optimised for
/// running, with the policy's rewrite in it. `optimize` is the session's.
///
/// Optimising is most of a small query's planning, and the analysis needs
/// an optimised plan (what is actually read) before it knows the rewrite,
/// which then needs optimising again. So the rewrite is guessed from the
/// policy and the plan as written, and the plan is optimised once with it.
/// That takes the slow way (optimise, check, rewrite, optimise) when the guess
/// was wrong, or when the consumer's own reads could include the privacy unit
/// the rewrite reads and that would change a decision: the answer is always
/// the one the slow way gives.
pub fn checked_plan(
    request: &GuestRequest,
    plan: LogicalPlan,
    optimize: impl FnMut(&LogicalPlan) -> Result<LogicalPlan, DataFusionError>,
) -> Result<(Analysis, LogicalPlan), GuestFailure> {
    let ruled = top_aggregate(&plan).is_some() && rule::applies(request);
    let (analysis, optimized) = checked_plan_unguarded(request, plan, optimize)?;
    // On the plan as it runs: type coercion's casts are in it by now.
    if ruled && analysis.kind == QueryKind::Aggregate {
        rule::check_cannot_fail(request, &optimized)?;
    }
    Ok((analysis, optimized))
}

fn checked_plan_unguarded(
    request: &GuestRequest,
    plan: LogicalPlan,
    mut optimize: impl FnMut(&LogicalPlan) -> Result<LogicalPlan, DataFusionError>,
) -> Result<(Analysis, LogicalPlan), GuestFailure> {
    let unit = analysis_rule(request, &plan)?;
    let guess = expected_rewrite(request, &plan, unit.as_ref());
    if let Ok(Some(rewritten)) = rewrite(
        request,
        guess.kind,
        guess.unit_column.as_ref(),
        guess.min_units,
        plan.clone(),
    ) && let Ok(optimized) = optimize(&rewritten)
        && let Some(columns_read) =
            consumer_columns_read(request, &plan, &optimized, guess.unit_column.as_ref())
    {
        let analysis = check(request, &plan, unit.as_ref(), columns_read)?;
        if analysis.kind == guess.kind
            && analysis.unit_column == guess.unit_column
            && analysis.min_units == guess.min_units
        {
            return Ok((analysis, optimized));
        }
    }
    checked_plan_slowly(request, plan, unit.as_ref(), optimize)
}

/// The structural checks of [`rule`] on the plan as written, and the
/// privacy unit they found by lineage (aggregates under a threshold or
/// noise only: elsewhere no unit is counted).
fn analysis_rule(
    request: &GuestRequest,
    plan: &LogicalPlan,
) -> Result<Option<Column>, GuestFailure> {
    rule::check_reserved_names(&request.sql)?;
    if !rule::applies(request) {
        return Ok(None);
    }
    if top_aggregate(plan).is_none() {
        // An aggregation under a join, a union or DISTINCT ON would release
        // its groups as a list, with no threshold counted.
        if contains_aggregate(plan) {
            return Err(GuestFailure::policy(
                "aggregation.shape",
                None,
                "an aggregation must be the last step of the query (only projections, filters, \
                 sorts and limits may follow it), so its groups can be counted",
            ));
        }
        return Ok(None);
    }
    Ok(rule::check(request, plan)?.unit.map(|u| u.column))
}

/// Optimise, check what is read, rewrite, optimise again if the rewrite
/// changed the plan.
fn checked_plan_slowly(
    request: &GuestRequest,
    plan: LogicalPlan,
    unit: Option<&Column>,
    mut optimize: impl FnMut(&LogicalPlan) -> Result<LogicalPlan, DataFusionError>,
) -> Result<(Analysis, LogicalPlan), GuestFailure> {
    let query = |e: DataFusionError| GuestFailure::Query {
        message: e.strip_backtrace(),
    };
    let optimized = optimize(&plan).map_err(query)?;
    let analysis = check(request, &plan, unit, columns_read(&optimized))?;
    let optimized = match rewrite(
        request,
        analysis.kind,
        analysis.unit_column.as_ref(),
        analysis.min_units,
        plan,
    )? {
        Some(rewritten) => optimize(&rewritten).map_err(query)?,
        None => optimized,
    };
    Ok((analysis, optimized))
}

/// The rewrite a query will most likely need, from what the policy could ask
/// and the plan as written (the columns read come only after optimising).
#[derive(Debug)]
struct ExpectedRewrite {
    kind: QueryKind,
    unit_column: Option<Column>,
    /// The product's threshold; a column's own may raise it.
    min_units: u64,
}

fn expected_rewrite(
    request: &GuestRequest,
    plan: &LogicalPlan,
    unit: Option<&Column>,
) -> ExpectedRewrite {
    if top_aggregate(plan).is_none() {
        return ExpectedRewrite {
            kind: QueryKind::List,
            unit_column: None,
            min_units: 0,
        };
    }
    let min_units = request
        .policy
        .min_units_for(std::iter::empty())
        .max(request.min_units);
    ExpectedRewrite {
        kind: QueryKind::Aggregate,
        unit_column: if min_units > 1 { unit.cloned() } else { None },
        min_units,
    }
}

/// What the consumer's query reads, from the plan optimised with a rewrite
/// that counts `unit` too: the count is the platform's read, not the
/// consumer's. `None` when the consumer's query may read the unit itself and
/// whether it does could change a decision (the unit is blocked or has a
/// threshold of its own); only optimising the plan as written tells then.
fn consumer_columns_read(
    request: &GuestRequest,
    plan: &LogicalPlan,
    optimized: &LogicalPlan,
    unit: Option<&Column>,
) -> Option<BTreeSet<String>> {
    let mut read = columns_read(optimized);
    let Some(unit) = unit else {
        // The other rewrites (a row cap, clamped sums) read nothing new.
        return Some(read);
    };
    if !may_read(plan, &unit.name) {
        read.remove(&unit.name);
        return Some(read);
    }
    let policy = &request.policy;
    let decides = policy.blocked_columns.contains(&unit.name)
        || policy
            .aggregation
            .as_ref()
            .is_some_and(|rule| rule.column_min_units.contains_key(&unit.name));
    (!decides).then_some(read)
}

/// Whether a plan as written could read `name`: some expression names it (or
/// names it from inside a correlated subquery), or the plan has an operator
/// that uses every column of its input without naming them (DISTINCT, UNION
/// and the like), where only optimising tells what survives.
fn may_read(plan: &LogicalPlan, name: &str) -> bool {
    let mut may = false;
    let _ = plan.apply_with_subqueries(|node| {
        let names_columns_it_uses = matches!(
            node,
            LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::Aggregate(_)
                | LogicalPlan::Sort(_)
                | LogicalPlan::Limit(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::TableScan(_)
                | LogicalPlan::Window(_)
                | LogicalPlan::EmptyRelation(_)
                | LogicalPlan::Values(_)
                | LogicalPlan::Subquery(_)
        );
        if !names_columns_it_uses {
            may = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        let _ = node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::Column(c) | Expr::OuterReferenceColumn(_, c) = e
                    && c.name == name
                {
                    may = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
        Ok(if may {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    may
}

/// Checks `plan` (as written) against the request's policy, given the table
/// columns its optimised form reads.
fn check(
    request: &GuestRequest,
    plan: &LogicalPlan,
    unit: Option<&Column>,
    columns_read: BTreeSet<String>,
) -> Result<Analysis, GuestFailure> {
    let policy = &request.policy;
    if let Some(column) = columns_read
        .iter()
        .find(|c| policy.blocked_columns.contains(c))
    {
        return Err(refuse(
            "blocked-columns",
            Some(column),
            format!(
                "column {column} is blocked by the product's output policy and cannot be read in any clause"
            ),
        ));
    }
    match top_aggregate(plan) {
        None => check_list(policy, columns_read),
        Some(aggregate) => check_aggregate(request, plan, aggregate, unit, columns_read),
    }
}

fn check_list(
    policy: &OutputPolicy,
    columns_read: BTreeSet<String>,
) -> Result<Analysis, GuestFailure> {
    let Some(list) = &policy.list else {
        return Err(refuse(
            "list",
            None,
            "this product releases only aggregates: group the rows (GROUP BY) and aggregate them"
                .into(),
        ));
    };
    if !policy.lists_any_column()
        && let Some(column) = columns_read.iter().find(|c| !list.columns.contains(c))
    {
        return Err(refuse(
            "list.columns",
            Some(column),
            format!(
                "a row-level query may read only {}; it reads {column}",
                list.columns.join(", ")
            ),
        ));
    }
    Ok(Analysis {
        kind: QueryKind::List,
        columns_read,
        min_units: 0,
        unit_column: None,
        noisy_outputs: Vec::new(),
    })
}

fn check_aggregate(
    request: &GuestRequest,
    plan: &LogicalPlan,
    aggregate: &Aggregate,
    unit: Option<&Column>,
    columns_read: BTreeSet<String>,
) -> Result<Analysis, GuestFailure> {
    let policy = &request.policy;
    let Some(rule) = &policy.aggregation else {
        return Err(refuse(
            "aggregation",
            None,
            "this product does not release aggregates".into(),
        ));
    };
    let min_units = policy
        .min_units_for(columns_read.iter().map(String::as_str))
        .max(request.min_units);
    let unit_column = if min_units > 1 {
        match unit {
            Some(unit) => Some(unit.clone()),
            None => {
                return Err(refuse(
                    "aggregation.privacy-unit",
                    rule.privacy_unit_columns.first().map(String::as_str),
                    format!(
                        "an aggregation must run over rows that carry a privacy unit ({}), so that its groups can be counted",
                        rule.privacy_unit_columns.join(" or ")
                    ),
                ));
            }
        }
    } else {
        None
    };
    let noisy_outputs = match &policy.differential_privacy {
        None => Vec::new(),
        Some(dp) => noisy_outputs(plan, &noisy_aggregates(aggregate, dp)?)?,
    };
    Ok(Analysis {
        kind: QueryKind::Aggregate,
        columns_read,
        min_units,
        unit_column,
        noisy_outputs,
    })
}

fn dp_refuse(column: Option<&str>, message: String) -> GuestFailure {
    refuse("differential-privacy", column, message)
}

/// The aggregate's output columns, with the noise each needs: only plain
/// COUNT, and SUM or AVG of a column with clamping bounds, can be noised.
fn noisy_aggregates(
    aggregate: &Aggregate,
    dp: &DifferentialPrivacy,
) -> Result<Vec<Option<NoisyAggregate>>, GuestFailure> {
    let groups = aggregate.schema.fields().len() - aggregate.aggr_expr.len();
    let mut outputs = vec![None; groups];
    for expr in &aggregate.aggr_expr {
        let name = expr.schema_name().to_string();
        let Expr::AggregateFunction(function) = expr.clone().unalias() else {
            return Err(dp_refuse(
                None,
                format!("{name} is not an aggregate function"),
            ));
        };
        if function.params.distinct || function.params.filter.is_some() {
            return Err(dp_refuse(
                None,
                format!("{name}: DISTINCT and FILTER aggregates cannot be noised"),
            ));
        }
        let kind = match function.func.name().to_ascii_lowercase().as_str() {
            "count" => "count",
            "sum" => "sum",
            "avg" | "mean" => "avg",
            _ => {
                return Err(dp_refuse(
                    None,
                    format!(
                        "{name}: only COUNT, SUM and AVG can be released under differential privacy"
                    ),
                ));
            }
        };
        let source = match kind {
            "count" => None,
            _ => {
                let Some(Expr::Column(column)) =
                    function.params.args.first().map(|a| a.clone().unalias())
                else {
                    return Err(dp_refuse(
                        None,
                        format!(
                            "{name}: under differential privacy only a column can be summed or averaged"
                        ),
                    ));
                };
                if !dp.bounds.contains_key(&column.name) {
                    return Err(dp_refuse(
                        Some(&column.name),
                        format!(
                            "{}: the policy gives no clamping bounds for it, so it cannot be noised",
                            column.name
                        ),
                    ));
                }
                Some(column.name)
            }
        };
        outputs.push(Some(NoisyAggregate { kind, source }));
    }
    Ok(outputs)
}

/// Follows the aggregate's noisy columns up to the released ones. Anything
/// that would reveal an exact aggregate before the noise (arithmetic on it,
/// HAVING on it, ordering by it, a window over it) is refused.
fn noisy_outputs(
    plan: &LogicalPlan,
    aggregate_outputs: &[Option<NoisyAggregate>],
) -> Result<Vec<Option<NoisyAggregate>>, GuestFailure> {
    let exact = |inner: &[Option<NoisyAggregate>], input: &LogicalPlan, expr: &Expr| {
        expr.column_refs().into_iter().any(|c| {
            input
                .schema()
                .index_of_column(c)
                .ok()
                .and_then(|i| inner.get(i))
                .is_some_and(Option::is_some)
        })
    };
    match plan {
        LogicalPlan::Aggregate(_) => Ok(aggregate_outputs.to_vec()),
        LogicalPlan::Projection(projection) => {
            let inner = noisy_outputs(&projection.input, aggregate_outputs)?;
            projection
                .expr
                .iter()
                .map(|expr| {
                    if let Expr::Column(column) = expr.clone().unalias_nested().data {
                        let index = projection.input.schema().index_of_column(&column).ok();
                        return Ok(index.and_then(|i| inner.get(i).cloned()).flatten());
                    }
                    if exact(&inner, &projection.input, expr) {
                        return Err(dp_refuse(
                            None,
                            format!(
                                "{}: a released aggregate must be a plain COUNT, SUM or AVG to be noised",
                                expr.schema_name()
                            ),
                        ));
                    }
                    Ok(None)
                })
                .collect()
        }
        LogicalPlan::Sort(sort) => {
            let inner = noisy_outputs(&sort.input, aggregate_outputs)?;
            if sort
                .expr
                .iter()
                .any(|s| exact(&inner, &sort.input, &s.expr))
            {
                return Err(dp_refuse(
                    None,
                    "ordering by an aggregate would reveal its exact value".into(),
                ));
            }
            Ok(inner)
        }
        LogicalPlan::Filter(filter) => {
            let inner = noisy_outputs(&filter.input, aggregate_outputs)?;
            if exact(&inner, &filter.input, &filter.predicate) {
                return Err(dp_refuse(
                    None,
                    "HAVING on an aggregate would reveal its exact value".into(),
                ));
            }
            Ok(inner)
        }
        LogicalPlan::Window(_) => Err(dp_refuse(
            None,
            "window functions over noised aggregates are not supported".into(),
        )),
        other => noisy_outputs(other.inputs()[0], aggregate_outputs),
    }
}

/// The aggregation whose groups are the released rows, if the result is one:
/// only operators that keep rows one-to-one (or drop them) may sit above it.
fn top_aggregate(plan: &LogicalPlan) -> Option<&Aggregate> {
    match plan {
        LogicalPlan::Aggregate(aggregate) => Some(aggregate),
        LogicalPlan::Projection(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::Window(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Distinct(Distinct::All(_)) => top_aggregate(plan.inputs()[0]),
        _ => None,
    }
}

fn contains_aggregate(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        found = matches!(node, LogicalPlan::Aggregate(_));
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// Table columns the optimised plan's scans read.
fn columns_read(plan: &LogicalPlan) -> BTreeSet<String> {
    let mut read = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let schema = scan.source.schema();
            match &scan.projection {
                Some(projection) => {
                    read.extend(projection.iter().map(|&i| schema.field(i).name().clone()))
                }
                None => read.extend(schema.fields().iter().map(|f| f.name().clone())),
            }
            // Filters pushed into the scan read columns too.
            for filter in &scan.filters {
                read.extend(filter.column_refs().into_iter().map(|c| c.name.clone()));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    read
}

/// Adds what the analysis needs to the plan: the distinct-unit count on
/// aggregates with a threshold, clamping under differential privacy, and the
/// row cap on list queries. `None`: the plan runs as written.
fn rewrite(
    request: &GuestRequest,
    kind: QueryKind,
    unit_column: Option<&Column>,
    min_units: u64,
    plan: LogicalPlan,
) -> Result<Option<LogicalPlan>, GuestFailure> {
    let internal = |e: DataFusionError| GuestFailure::Query {
        message: e.strip_backtrace(),
    };
    let dp = request.policy.differential_privacy.as_ref();
    match kind {
        QueryKind::Aggregate if unit_column.is_some() || dp.is_some() => {
            let unit = unit_column.cloned();
            map_top_aggregate(plan, &mut |aggregate| {
                let mut aggr_expr = Vec::with_capacity(aggregate.aggr_expr.len() + 1);
                for expr in aggregate.aggr_expr {
                    aggr_expr.push(match dp {
                        Some(dp) => clamp(expr, dp, &aggregate.input)?,
                        None => expr,
                    });
                }
                let Some(unit) = &unit else {
                    return Aggregate::try_new(aggregate.input, aggregate.group_expr, aggr_expr)
                        .map(LogicalPlan::Aggregate);
                };
                // Counted from the unit's own scan, carried up to here:
                // whatever the consumer named a column, only that one counts.
                let (input, carried) =
                    rule::carry_unit(Arc::unwrap_or_clone(aggregate.input), unit)?;
                aggr_expr.push(count_distinct(Expr::Column(carried)).alias(UNITS_COLUMN));
                let aggregate =
                    Aggregate::try_new(Arc::new(input), aggregate.group_expr, aggr_expr)?;
                // Groups below the threshold go here, before anything above
                // the aggregation (HAVING, windows, ORDER BY … LIMIT) sees
                // them; the host checks the count again on the way out.
                let k = i64::try_from(min_units).unwrap_or(i64::MAX);
                let threshold = Expr::Column(Column::from_name(UNITS_COLUMN)).gt_eq(lit(k));
                Ok(LogicalPlan::Filter(Filter::try_new(
                    threshold,
                    Arc::new(LogicalPlan::Aggregate(aggregate)),
                )?))
            })
            .map(Some)
            .map_err(internal)
        }
        QueryKind::List if !request.policy.lists_any_column() => {
            let max_rows = request.policy.list.as_ref().map_or(0, |l| l.max_rows);
            // One row past the cap, so the host can tell the consumer it truncated.
            let fetch = usize::try_from(max_rows.saturating_add(1)).unwrap_or(usize::MAX);
            LogicalPlanBuilder::from(plan)
                .limit(0, Some(fetch))
                .and_then(LogicalPlanBuilder::build)
                .map(Some)
                .map_err(internal)
        }
        _ => Ok(None),
    }
}

/// SUM(x) and AVG(x) over x clamped to the policy's bounds, under the
/// original name (so everything above the aggregation still finds it).
fn clamp(
    expr: Expr,
    dp: &DifferentialPrivacy,
    input: &LogicalPlan,
) -> Result<Expr, DataFusionError> {
    let name = expr.schema_name().to_string();
    let Expr::AggregateFunction(mut function) = expr.clone().unalias() else {
        return Ok(expr);
    };
    let Some(Expr::Column(column)) = function.params.args.first().map(|a| a.clone().unalias())
    else {
        return Ok(expr);
    };
    let Some(&(lower, upper)) = dp.bounds.get(&column.name) else {
        return Ok(expr);
    };
    let data_type = input
        .schema()
        .field_from_column(&column)?
        .data_type()
        .clone();
    let bound = |v: f64| Expr::Cast(Cast::new(Box::new(lit(v)), data_type.clone()));
    let value = Expr::Column(column);
    let clamped = when(value.clone().lt(bound(lower)), bound(lower))
        .when(value.clone().gt(bound(upper)), bound(upper))
        .otherwise(value)?;
    function.params.args = vec![clamped];
    Ok(Expr::AggregateFunction(function).alias(name))
}

fn map_top_aggregate(
    plan: LogicalPlan,
    f: &mut dyn FnMut(Aggregate) -> Result<LogicalPlan, DataFusionError>,
) -> Result<LogicalPlan, DataFusionError> {
    match plan {
        LogicalPlan::Aggregate(aggregate) => f(aggregate),
        LogicalPlan::Projection(projection) => {
            let input = map_top_aggregate(Arc::unwrap_or_clone(projection.input), f)?;
            let mut expr = projection.expr;
            if let Some(units) = units_column(&input) {
                expr.push(Expr::Column(units));
            }
            Ok(LogicalPlan::Projection(Projection::try_new(
                expr,
                Arc::new(input),
            )?))
        }
        other => {
            let input = map_top_aggregate(other.inputs()[0].clone(), f)?;
            other.with_new_exprs(other.expressions(), vec![input])
        }
    }
}

fn units_column(plan: &LogicalPlan) -> Option<Column> {
    plan.schema()
        .columns()
        .into_iter()
        .find(|c| c.name == UNITS_COLUMN)
}

/// Tags a result batch with the threshold the host must enforce.
pub fn annotate(analysis: &Analysis, batch: RecordBatch) -> Result<RecordBatch, DataFusionError> {
    // Aggregate results always carry the threshold: it is also how the host
    // tells them from row-level results.
    if analysis.kind == QueryKind::List {
        return Ok(batch);
    }
    let schema = batch.schema();
    let mut metadata = schema.metadata().clone();
    metadata.insert(MIN_UNITS_METADATA.into(), analysis.min_units.to_string());
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(
            |(i, field)| match analysis.noisy_outputs.get(i).cloned().flatten() {
                None => field.as_ref().clone(),
                Some(noisy) => {
                    let mut meta = field.metadata().clone();
                    meta.insert(AGGREGATE_METADATA.into(), noisy.kind.into());
                    if let Some(source) = noisy.source {
                        meta.insert(SOURCE_METADATA.into(), source);
                    }
                    field.as_ref().clone().with_metadata(meta)
                }
            },
        )
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    Ok(batch.with_schema(schema)?)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use civicgrid_guest_protocol::policy::{AggregationRule, ListRule};
    use civicgrid_guest_protocol::protocol::TableInfo;
    use datafusion::arrow::datatypes::DataType;

    use super::*;

    fn request(sql: &str, policy: OutputPolicy) -> GuestRequest {
        let residents = Schema::new(vec![
            Field::new("district", DataType::Utf8, false),
            Field::new("age_band", DataType::Utf8, false),
            Field::new("household_size", DataType::Int32, false),
            Field::new("income", DataType::Int64, false),
            Field::new("person_id", DataType::Int64, false),
        ]);
        let districts = Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("area_km2", DataType::Int64, false),
        ]);
        GuestRequest {
            sql: sql.to_owned(),
            tables: vec![
                TableInfo {
                    name: "residents".into(),
                    schema: residents,
                },
                TableInfo {
                    name: "districts".into(),
                    schema: districts,
                },
            ],
            min_units: policy.min_units_for(std::iter::empty()),
            policy,
            stage: Default::default(),
        }
    }

    /// person_id blocked and the privacy unit, k = 10; lists of two columns.
    fn population() -> OutputPolicy {
        OutputPolicy {
            blocked_columns: vec!["person_id".into()],
            aggregation: Some(AggregationRule {
                privacy_unit_columns: vec!["person_id".into()],
                min_units: 10,
                column_min_units: BTreeMap::new(),
                dimension_columns: None,
                join_columns: vec!["district".into(), "name".into()],
                ..Default::default()
            }),
            list: Some(ListRule {
                columns: vec!["district".into(), "age_band".into()],
                max_rows: 5,
            }),
            ..OutputPolicy::default()
        }
    }

    fn with_dp(mut policy: OutputPolicy) -> OutputPolicy {
        policy.differential_privacy = Some(DifferentialPrivacy {
            epsilon_per_query: 1.0,
            bounds: [("income".to_owned(), (0.0, 100_000.0))].into(),
            max_rows_per_unit: 1,
        });
        policy
    }

    /// The unit readable, with a threshold of its own when `override_k`.
    fn unit_readable(override_k: Option<u64>) -> OutputPolicy {
        let mut policy = population();
        policy.blocked_columns.clear();
        if let (Some(k), Some(rule)) = (override_k, policy.aggregation.as_mut()) {
            rule.column_min_units.insert("person_id".into(), k);
        }
        policy
    }

    fn render(outcome: Result<(Analysis, LogicalPlan), GuestFailure>) -> String {
        let rendered = match outcome {
            Ok((analysis, plan)) => format!("{analysis:?}\n{}", plan.display_indent()),
            Err(failure) => format!("{failure:?}"),
        };
        // Common subexpressions are numbered per session, not per plan.
        let mut parts = rendered.split("__common_expr_");
        let mut normalized = parts.next().unwrap_or_default().to_owned();
        for part in parts {
            normalized.push_str("__common_expr_N");
            normalized.push_str(part.trim_start_matches(|c: char| c.is_ascii_digit()));
        }
        normalized
    }

    /// `sql` checked and planned the quick way and the slow way: both
    /// outcomes, and how many optimisations the quick way ran.
    fn both_ways(sql: &str, policy: OutputPolicy) -> (String, String, usize) {
        let request = request(sql, policy);
        let source = Arc::new(crate::MemorySource::new(vec![Vec::new(), Vec::new()]));
        let ctx = crate::context(
            &request,
            source,
            1,
            crate::functions::Families::named_in(sql),
        )
        .expect("context");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (state, plan) = runtime
            .block_on(ctx.sql(sql))
            .expect("the SQL plans")
            .into_parts();
        let optimizations = Cell::new(0);
        let quick = checked_plan(&request, plan.clone(), |plan| {
            optimizations.set(optimizations.get() + 1);
            state.optimize(plan)
        });
        let slow = analysis_rule(&request, &plan).and_then(|unit| {
            checked_plan_slowly(&request, plan, unit.as_ref(), |plan| state.optimize(plan))
        });
        (render(quick), render(slow), optimizations.get())
    }

    #[test]
    fn a_rewritten_query_is_optimised_once_and_planned_as_the_slow_way_plans_it() {
        for (sql, policy) in [
            (
                "select district, count(*) from residents group by district",
                population(),
            ),
            (
                "select district, count(*), sum(income) from residents group by district",
                with_dp(population()),
            ),
            ("select district, age_band from residents", population()),
            (
                "select r.district, count(*) from residents r join districts d on r.district = d.name \
                 where d.area_km2 > 3 group by r.district order by 2 desc limit 3",
                population(),
            ),
            // The consumer counts the unit too; it may, it is not blocked here.
            (
                "select district, count(distinct person_id) from residents group by district",
                unit_readable(None),
            ),
        ] {
            let (quick, slow, optimizations) = both_ways(sql, policy);
            assert_eq!(quick, slow, "{sql}");
            assert!(!quick.contains("Policy"), "{sql}: {quick}");
            assert_eq!(optimizations, 1, "{sql}");
        }
    }

    /// Where the consumer's query may read the privacy unit the rewrite
    /// reads, and that decides something, the quick way must not guess.
    #[test]
    fn a_query_that_may_read_the_unit_gets_the_slow_ways_answer() {
        // The analysis rule refuses the unit outside COUNT, a subquery, a
        // renamed unit and a UNION from the plan as written: no optimising.
        for (sql, policy, refused, least_optimizations) in [
            (
                "select district, sum(person_id) from residents group by district",
                population(),
                true,
                0,
            ),
            (
                "select district, count(*) from residents group by district having max(person_id) > 0",
                population(),
                true,
                0,
            ),
            (
                "select district, count(*) from residents r where exists \
                 (select 1 from districts d where d.area_km2 = r.person_id) group by district",
                population(),
                true,
                0,
            ),
            (
                "select p, count(*) from (select person_id as p from residents) group by p",
                population(),
                true,
                0,
            ),
            (
                "select district, count(*) from (select district, person_id from residents \
                 union all select district, person_id from residents) group by district",
                population(),
                true,
                0,
            ),
            // Named but pruned away: the slow way allows it, so must the quick.
            (
                "select district, count(*) from (select * from residents) group by district",
                population(),
                false,
                2,
            ),
            // Counting the blocked unit is reading it.
            (
                "select district, count(distinct person_id) from residents group by district",
                population(),
                true,
                2,
            ),
            (
                "select district, count(distinct person_id) from residents group by district",
                unit_readable(Some(50)),
                false,
                2,
            ),
        ] {
            let (quick, slow, optimizations) = both_ways(sql, policy);
            assert_eq!(quick, slow, "{sql}");
            assert_eq!(quick.contains("Policy"), refused, "{sql}: {quick}");
            assert!(
                optimizations >= least_optimizations,
                "{sql}: {optimizations}"
            );
        }
    }

    /// The rule a query is refused by, or `None` when it is accepted; the
    /// quick way and the slow way must agree.
    fn refused_by(sql: &str, policy: OutputPolicy) -> Option<String> {
        let request = request(sql, policy);
        let source = Arc::new(crate::MemorySource::new(vec![Vec::new(), Vec::new()]));
        let ctx = crate::context(&request, source, 1, crate::functions::Families::all())
            .expect("context");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (state, plan) = runtime
            .block_on(ctx.sql(sql))
            .unwrap_or_else(|e| panic!("{sql} plans: {e}"))
            .into_parts();
        match checked_plan(&request, plan, |plan| state.optimize(plan)) {
            Ok(_) => None,
            Err(GuestFailure::Policy { rule, .. }) => Some(rule),
            Err(other) => panic!("{sql}: not a policy refusal: {other:?}"),
        }
    }

    /// An aggregate's argument that weights rows by a product of columns,
    /// a narrowing cast or a cast to boolean is a hidden CASE.
    #[test]
    fn aggregate_arguments_that_could_single_out_rows_are_refused() {
        for sql in [
            "select age_band, sum(income * (household_size - 1) * (household_size - 2)) \
             from residents group by age_band",
            "select age_band, sum(income * income) from residents group by age_band",
            "select count(cast(income as boolean)) from residents",
            "select sum(try_cast(income as smallint)) from residents",
            "select sum(cast(income as smallint)) from residents",
            "select r.age_band, sum(r.income * d.area_km2) from residents r \
             join districts d on r.district = d.name group by r.age_band",
            "select sum(case when household_size = 6 then income else 0 end) from residents",
        ] {
            assert_eq!(
                refused_by(sql, population()).as_deref(),
                Some("aggregation.arguments"),
                "{sql}"
            );
        }
    }

    /// A failure below the aggregation, or in a filter the optimiser merges
    /// with the threshold, answers a question about a withheld row.
    #[test]
    fn expressions_that_could_fail_on_a_withheld_row_are_refused() {
        for (sql, rule) in [
            (
                "select district, count(*) from residents \
                 where 1 / (household_size - 3) = 0 group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where household_size % (household_size - 3) = 0 group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where cast(age_band as int) = 3 group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where substr(district, 1, household_size - 7) = 'x' group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where date_part('century', cast(household_size as timestamp)) = 1 group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select count(*) from residents where make_date(household_size, 1, 1) is null",
                "scalar-functions",
            ),
            (
                "select district, sum(income) from residents group by district \
                 having 1 / (sum(income) - 60111) > 0",
                "aggregation.cannot-fail",
            ),
            (
                "select * from (select district, sum(income) s from residents group by district) \
                 where 1 / (s - 60111) > 0",
                "aggregation.cannot-fail",
            ),
            // The physical planner pushes this projection below the threshold.
            (
                "select district, sum(income) / (count(*) - 3) from residents group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where round(household_size, -19) = 0 group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where round(cast(income as double), household_size) = 0 group by district",
                "aggregation.cannot-fail",
            ),
            (
                "select district, count(*) from residents \
                 where left(district, household_size) = 'x' group by district",
                "aggregation.cannot-fail",
            ),
        ] {
            assert_eq!(
                refused_by(sql, population()).as_deref(),
                Some(rule),
                "{sql}"
            );
        }
    }

    /// Only equalities of join columns match rows: `OR true` and ranges
    /// would pair one person's row with many.
    #[test]
    fn joins_on_anything_but_equal_join_columns_are_refused() {
        for sql in [
            "select r.district, count(*) from residents r \
             join districts d on r.district = d.name or true group by r.district",
            "select r.district, count(*) from residents r \
             join districts d on r.district >= d.name group by r.district",
            "select r.district, count(*) from residents r \
             join districts d on r.district = d.name and d.name <> 'x' group by r.district",
            "select r.district, count(*) from residents r, districts d group by r.district",
        ] {
            assert_eq!(
                refused_by(sql, population()).as_deref(),
                Some("aggregation.joins"),
                "{sql}"
            );
        }
    }

    /// An aggregation that is not the query's last step would release its
    /// groups as rows of a list, uncounted.
    #[test]
    fn aggregations_under_joins_and_unions_are_refused() {
        for sql in [
            "select * from (select district, count(*) n from residents group by district) a \
             join districts d on a.district = d.name",
            "select district, count(*) from residents group by district \
             union all select name, 1 from districts",
            "select distinct on (n) district, n from \
             (select district, count(*) n from residents group by district)",
        ] {
            assert_eq!(
                refused_by(sql, population()).as_deref(),
                Some("aggregation.shape"),
                "{sql}"
            );
        }
    }

    /// What the rule must keep allowing: linear arguments, wrapping integer
    /// arithmetic, safe functions, and anything computed on released groups.
    #[test]
    fn ordinary_aggregate_queries_still_pass() {
        for sql in [
            "select district, count(*), sum(income), avg(income * 2 + 100) \
             from residents group by district",
            "select district, cast(sum(income) as double) / count(*) from residents \
             group by district",
            "select district, count(*) from residents \
             where round(cast(income as double), -3) > 1000 and left(district, 2) = 'No' \
             group by district",
            "select district, count(*) from residents where household_size + 1 > 3 group by district",
            "select substr(district, 1, 3) d, count(*) from residents group by d",
            "select upper(district), count(distinct age_band) from residents \
             where district like 'N%' group by upper(district)",
            "select r.district, count(*) from residents r join districts d \
             on r.district = d.name group by r.district",
            "select district, count(*) from residents group by district having count(*) > 20",
            "select district, cast(sum(income) as double) / count(*) as mean from residents \
             group by district order by mean desc limit 3",
            "select district, sum(cast(household_size as bigint)) from residents group by district",
        ] {
            assert_eq!(refused_by(sql, population()), None, "{sql}");
        }
    }
}
