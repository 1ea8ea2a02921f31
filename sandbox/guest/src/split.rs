//! Splitting a plan across instances (see `civicgrid_guest_protocol::protocol::Stage`):
//! partial instances run the plan's one partial aggregate over their share of
//! a table, and the final instance runs the plan with that aggregate replaced
//! by the states they emitted. DataFusion already plans aggregates in these
//! two phases for its own partitions; the split only moves the boundary
//! between them to the edge of an instance.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::session_state::SessionState;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};

/// The physical optimizer rule that fuses a partial aggregate with its final
/// one when a single partition runs both, leaving no boundary to split at.
const FUSES_AGGREGATE_PHASES: &str = "CombinePartialFinalAggregate";

/// Operators a partial aggregate's input may contain: they work row by row
/// (or batch by batch), so running them on shares of a table and
/// concatenating gives what running them on the whole gives.
const ROW_WISE: [&str; 4] = [
    "FilterExec",
    "ProjectionExec",
    "CoalesceBatchesExec",
    "StreamingTableExec",
];

/// `state` planning aggregates in two phases even on one partition.
pub(crate) fn keeping_aggregate_phases(state: SessionState) -> SessionState {
    let rules = state
        .physical_optimizers()
        .iter()
        .filter(|rule| rule.name() != FUSES_AGGREGATE_PHASES)
        .cloned()
        .collect();
    SessionStateBuilder::new_from_existing(state)
        .with_physical_optimizer_rules(rules)
        .build()
}

/// The plan's partial aggregate, if the plan splits at it: it is the only
/// one, needs no input order, and reads one scan through row-wise operators
/// only. Otherwise, why not.
pub(crate) fn partial_aggregate(
    plan: &Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>, String> {
    let mut partials = Vec::new();
    plan.apply(|node| {
        if is_partial_aggregate(node) {
            partials.push(Arc::clone(node));
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| e.strip_backtrace())?;
    let [partial] = partials.as_slice() else {
        return Err(format!(
            "the plan has {} partial aggregates, not one",
            partials.len()
        ));
    };
    if partial
        .required_input_ordering()
        .iter()
        .any(Option::is_some)
    {
        return Err("the aggregate needs its input in order".into());
    }
    let input = &partial.children()[0];
    let mut scans = 0;
    let mut refusal = None;
    input
        .apply(|node| {
            let name = node.name();
            if !ROW_WISE.contains(&name) {
                refusal = Some(format!("{name} under the aggregate is not row-wise"));
                return Ok(TreeNodeRecursion::Stop);
            }
            if node.fetch().is_some() {
                refusal = Some(format!("{name} under the aggregate has a limit"));
                return Ok(TreeNodeRecursion::Stop);
            }
            if name == "StreamingTableExec" {
                scans += 1;
                if node.output_partitioning().partition_count() != 1 {
                    refusal = Some("the scan has more than one partition".into());
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .map_err(|e| e.strip_backtrace())?;
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    if scans != 1 {
        return Err(format!("the aggregate reads {scans} scans, not one"));
    }
    Ok(Arc::clone(partial))
}

fn is_partial_aggregate(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.downcast_ref::<AggregateExec>()
        .is_some_and(|aggregate| matches!(aggregate.mode(), AggregateMode::Partial))
}

/// `plan` with its partial aggregate replaced by `states`, which stream what
/// the partial instances emitted.
pub(crate) fn over_partial_states(
    plan: Arc<dyn ExecutionPlan>,
    partial: &Arc<dyn ExecutionPlan>,
    states: Arc<dyn PartitionStream>,
) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
    let source: Arc<dyn ExecutionPlan> = Arc::new(StreamingTableExec::try_new(
        partial.schema(),
        vec![states],
        None,
        Vec::new(),
        false,
        None,
    )?);
    let replaced = plan.transform_down(|node| {
        Ok(if is_partial_aggregate(&node) {
            Transformed::new(Arc::clone(&source), true, TreeNodeRecursion::Jump)
        } else {
            Transformed::no(node)
        })
    })?;
    Ok(replaced.data)
}
