//! The output policy, checked on a query's plan before it runs, and the one
//! rewrite the threshold needs: counting distinct privacy units per group.

use std::collections::BTreeSet;
use std::sync::Arc;

use civicgrid_sandbox::policy::{DifferentialPrivacy, OutputPolicy};
use civicgrid_sandbox::protocol::{
    AGGREGATE_METADATA, GuestFailure, GuestRequest, MIN_UNITS_METADATA, SOURCE_METADATA,
    UNITS_COLUMN,
};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, ExprSchema};
use datafusion::error::DataFusionError;
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::expr::Cast;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, LogicalPlan, LogicalPlanBuilder, Projection, lit, when,
};

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

/// Checks `plan` (as written) and `optimized` (what will actually be read)
/// against the request's policy.
pub fn check(
    request: &GuestRequest,
    plan: &LogicalPlan,
    optimized: &LogicalPlan,
) -> Result<Analysis, GuestFailure> {
    let policy = &request.policy;
    let columns_read = columns_read(optimized);
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
        Some(aggregate) => check_aggregate(request, plan, aggregate, columns_read),
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
    if let Some(dimensions) = &rule.dimension_columns {
        let table_columns: BTreeSet<&str> = request
            .tables
            .iter()
            .flat_map(|t| t.schema.fields().iter().map(|f| f.name().as_str()))
            .collect();
        let outside = columns_outside_aggregates(plan);
        if let Some(column) = outside
            .iter()
            .find(|c| table_columns.contains(c.as_str()) && !dimensions.contains(c))
        {
            return Err(refuse(
                "aggregation.dimension-columns",
                Some(column),
                format!(
                    "{column} may be used only inside an aggregate function; group, filter and join by {} only",
                    dimensions.join(", ")
                ),
            ));
        }
    }
    let min_units = policy
        .min_units_for(columns_read.iter().map(String::as_str))
        .max(request.min_units);
    let unit_column = if min_units > 1 {
        let input_columns = aggregate.input.schema().columns();
        let unit = rule
            .privacy_unit_columns
            .iter()
            .find_map(|wanted| input_columns.iter().find(|c| &c.name == wanted).cloned());
        match unit {
            Some(unit) => Some(unit),
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

/// Columns a plan uses anywhere except as arguments of aggregate functions:
/// in groupings, filters, joins, projections, window functions and sorts.
fn columns_outside_aggregates(plan: &LogicalPlan) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        let expressions: Vec<&Expr> = match node {
            LogicalPlan::Aggregate(aggregate) => aggregate.group_expr.iter().collect(),
            _ => {
                let mut all = Vec::new();
                let _ = node.apply_expressions(|e| {
                    all.push(e.clone());
                    Ok(TreeNodeRecursion::Continue)
                });
                for e in &all {
                    used.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
                }
                Vec::new()
            }
        };
        for e in expressions {
            used.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
        }
        Ok(TreeNodeRecursion::Continue)
    });
    used
}

/// Adds what the analysis needs to the plan: the distinct-unit count on
/// aggregates with a threshold, clamping under differential privacy, and the
/// row cap on list queries. `None`: the plan runs as written.
pub fn rewrite(
    request: &GuestRequest,
    analysis: &Analysis,
    plan: LogicalPlan,
) -> Result<Option<LogicalPlan>, GuestFailure> {
    let internal = |e: DataFusionError| GuestFailure::Query {
        message: e.strip_backtrace(),
    };
    let dp = request.policy.differential_privacy.as_ref();
    match analysis.kind {
        QueryKind::Aggregate if analysis.unit_column.is_some() || dp.is_some() => {
            let unit = analysis.unit_column.clone();
            map_top_aggregate(plan, &mut |aggregate| {
                let mut aggr_expr = Vec::with_capacity(aggregate.aggr_expr.len() + 1);
                for expr in aggregate.aggr_expr {
                    aggr_expr.push(match dp {
                        Some(dp) => clamp(expr, dp, &aggregate.input)?,
                        None => expr,
                    });
                }
                if let Some(unit) = &unit {
                    aggr_expr.push(count_distinct(Expr::Column(unit.clone())).alias(UNITS_COLUMN));
                }
                Aggregate::try_new(aggregate.input, aggregate.group_expr, aggr_expr)
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
    f: &mut dyn FnMut(Aggregate) -> Result<Aggregate, DataFusionError>,
) -> Result<LogicalPlan, DataFusionError> {
    match plan {
        LogicalPlan::Aggregate(aggregate) => Ok(LogicalPlan::Aggregate(f(aggregate)?)),
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
