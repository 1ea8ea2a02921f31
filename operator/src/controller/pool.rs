//! What the controllers share about the pool: how the engine sees a data
//! center, and where a workload runs as far as this process knows. Both
//! reconcilers read these; neither reaches into the other.

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};

use kube::ResourceExt as _;

use super::{Context, now_unix};
use crate::convert;
use crate::crd::{ComputeWorkload, DataCenter};
use crate::engine::model::{Reachability, WorkloadKey};

/// What the engine sees of a data center's reachability, from its status:
/// unreachable since the `Reachable` condition turned false, and never
/// probed counts as unreachable now (it takes nothing new until it answers).
pub(super) fn reachability(dc: &DataCenter) -> Reachability {
    let reachable = dc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Reachable"));
    match reachable {
        Some(c) if c.status == "True" => Reachability::Reachable,
        Some(c) => Reachability::UnreachableSince(c.last_transition_time.0.as_second()),
        None => Reachability::UnreachableSince(now_unix()),
    }
}

/// A hash of what the engine reads from a data center: workloads are placed
/// again when it changes, not on every heartbeat.
pub(super) fn placement_fingerprint(dc: &DataCenter) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dc.metadata.generation.hash(&mut hasher);
    if let Some(status) = &dc.status {
        for c in status
            .conditions
            .iter()
            .filter(|c| c.type_ == "Reachable" || c.type_ == "Ready")
        {
            (&c.type_, &c.status).hash(&mut hasher);
        }
        serde_json::to_string(&status.allocatable)
            .unwrap_or_default()
            .hash(&mut hasher);
    }
    hasher.finish()
}

/// The engine's key of `cw`.
pub(super) fn key_of(cw: &ComputeWorkload) -> WorkloadKey {
    WorkloadKey::new(cw.namespace().unwrap_or_default(), cw.name_any())
}

/// Where `cw` runs as far as this process knows: its latest decision, else
/// the placement its status records.
pub(super) fn current(ctx: &Context, cw: &ComputeWorkload) -> BTreeMap<String, u32> {
    ctx.decided()
        .placements
        .get(&key_of(cw))
        .cloned()
        .unwrap_or_else(|| convert::current_placement(cw))
}
