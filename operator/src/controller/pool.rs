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
        // Learning that two data centers share a cluster changes where a
        // workload may run.
        status.cluster_id.hash(&mut hasher);
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
    ctx.decided().placement_or_status(&key_of(cw), cw)
}

/// How long a kept pool is trusted before it is made again from the caches.
/// Between rebuilds it follows every placement this process decides and
/// every workload it reconciles; a rebuild also picks up what changed
/// without a reconcile here yet (another workload's new spec, which its own
/// reconcile is about to place anyway).
const REBUILD_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// The engine's pool kept between decisions (see [`crate::engine::Pool`]):
/// a decision then costs what placing one workload costs, not a conversion
/// of every data center and a walk over every placement.
pub(super) struct KeptPool {
    pool: crate::engine::Pool,
    data_centers: ConvertedDataCenters,
    built: std::time::Instant,
    /// When every data center in the cache was last looked at.
    walked: std::time::Instant,
}

/// How often every data center in the cache is looked at, not only those
/// the watch reported changed: the watch does not report a data center
/// gone from the cache.
const WALK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Data centers as the engine sees them, converted again only when their
/// object changed or their conversion stopped holding.
#[derive(Debug, Default)]
pub struct ConvertedDataCenters {
    /// Per data center: the `resourceVersion` it was converted from, and
    /// the time its conversion stops holding (a pushed carbon value
    /// expires; a data center never probed is unreachable "now").
    converted_from: std::collections::HashMap<String, (Option<String>, Option<i64>)>,
}

impl ConvertedDataCenters {
    /// Every data center in `state` that converts, as the engine sees it
    /// at `now`.
    pub fn all(
        &mut self,
        state: &[std::sync::Arc<DataCenter>],
        now: i64,
    ) -> Vec<crate::engine::model::DataCenter> {
        self.converted_from.clear();
        let mut data_centers = Vec::with_capacity(state.len());
        for dc in state {
            let (model, holds_until) = engine_data_center(dc, now);
            self.converted_from
                .insert(dc.name_any(), (dc.resource_version(), holds_until));
            data_centers.extend(model);
        }
        data_centers
    }

    /// Whether a conversion has stopped holding at `now`.
    pub fn due(&self, now: i64) -> bool {
        self.converted_from
            .values()
            .any(|(_, until)| until.is_some_and(|until| now >= until))
    }

    /// Converts again `changed` (data centers the watch reported) into
    /// `pool`.
    pub fn sync_changed(
        &mut self,
        changed: &[std::sync::Arc<DataCenter>],
        now: i64,
        pool: &mut crate::engine::Pool,
    ) {
        for dc in changed {
            self.convert_into(dc, now, pool);
        }
    }

    fn convert_into(&mut self, dc: &DataCenter, now: i64, pool: &mut crate::engine::Pool) {
        let name = dc.name_any();
        let (model, holds_until) = engine_data_center(dc, now);
        match model {
            Some(model) => pool.set_data_center(model),
            None => pool.remove_data_center(&name),
        }
        self.converted_from
            .insert(name, (dc.resource_version(), holds_until));
    }

    /// Brings `pool` up to `state`: converts again only the data centers
    /// whose object changed, or whose conversion stopped holding, since the
    /// last call; removes those that are gone.
    pub fn sync(
        &mut self,
        state: &[std::sync::Arc<DataCenter>],
        now: i64,
        pool: &mut crate::engine::Pool,
    ) {
        for dc in state {
            // Compared in place: all of a thousand data centers are looked
            // at, and only a changed one is worth a copy.
            let fresh = self
                .converted_from
                .get(dc.metadata.name.as_deref().unwrap_or_default())
                .is_some_and(|(was, until)| {
                    was.as_deref() == dc.metadata.resource_version.as_deref()
                        && until.is_none_or(|until| now < until)
                });
            if !fresh {
                self.convert_into(dc, now, pool);
            }
        }
        if state.len() != self.converted_from.len() {
            let present: std::collections::HashSet<String> =
                state.iter().map(|dc| dc.name_any()).collect();
            let gone: Vec<String> = self
                .converted_from
                .keys()
                .filter(|name| !present.contains(*name))
                .cloned()
                .collect();
            for name in gone {
                pool.remove_data_center(&name);
                self.converted_from.remove(&name);
            }
        }
    }
}

/// `dc` as the engine sees it at `now`, and until when that holds.
fn engine_data_center(
    dc: &DataCenter,
    now: i64,
) -> (Option<crate::engine::model::DataCenter>, Option<i64>) {
    let never_probed = !dc
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Reachable"));
    let carbon_expires = dc
        .spec
        .energy
        .as_ref()
        .and_then(|e| e.pushed.as_ref())
        .map(|p| p.expires_at.0.as_second())
        .filter(|&at| at > now);
    let holds_until = if never_probed {
        Some(now + 1)
    } else {
        carbon_expires
    };
    (
        convert::data_center(dc, now, reachability(dc)).ok(),
        holds_until,
    )
}

impl KeptPool {
    /// A pool made from the caches: every data center, every workload (as
    /// converted for `decided`), and where each runs as far as this process
    /// knows.
    pub(super) fn build(ctx: &Context, decided: &mut super::Decided, now: i64) -> Self {
        let mut converted = ConvertedDataCenters::default();
        let data_centers = converted.all(&ctx.data_centers.state(), now);
        let mut workloads = Vec::new();
        let mut current = BTreeMap::new();
        for cw in ctx.workloads.state() {
            let key = key_of(&cw);
            let placement = decided.placement_or_status(&key, &cw);
            // A workload deleted and made again under the same name starts
            // at generation 1 again; the uid tells them apart.
            let seen = (cw.uid(), cw.metadata.generation);
            workloads.extend(decided.converted(&key, seen, || convert::workload(&cw).ok()));
            if !placement.is_empty() {
                current.insert(key, placement);
            }
        }
        Self {
            pool: crate::engine::Pool::new(crate::engine::model::Snapshot {
                now_unix: now,
                data_centers,
                workloads,
                current,
            }),
            data_centers: converted,
            built: std::time::Instant::now(),
            walked: std::time::Instant::now(),
        }
    }

    pub(super) fn stale(&self) -> bool {
        self.built.elapsed() >= REBUILD_AFTER
    }

    /// Brings the data centers up to the cache's: those the watch reported
    /// changed, and every one once a second or when a conversion stops
    /// holding. Looking at each of a thousand data centers costs a cache
    /// miss or three apiece, several times what the changed ones cost.
    pub(super) fn sync_data_centers(&mut self, ctx: &Context, now: i64) {
        let changed = std::mem::take(
            &mut *ctx
                .data_centers_changed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if self.walked.elapsed() >= WALK_EVERY || self.data_centers.due(now) {
            self.walked = std::time::Instant::now();
            self.data_centers
                .sync(&ctx.data_centers.state(), now, &mut self.pool);
            return;
        }
        let changed: Vec<std::sync::Arc<DataCenter>> = changed
            .iter()
            .filter_map(|name| {
                ctx.data_centers
                    .get(&kube::runtime::reflector::ObjectRef::new(name))
            })
            .collect();
        self.data_centers
            .sync_changed(&changed, now, &mut self.pool);
    }

    pub(super) fn pool(&mut self) -> &mut crate::engine::Pool {
        &mut self.pool
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::Pool;
    use crate::engine::model::Snapshot;

    /// A probed, reachable data center at `version`, with `carbon` pushed
    /// until `expires` (Unix seconds) over a declared 300 g/kWh.
    fn data_center(
        name: &str,
        version: &str,
        cores: u32,
        pushed: Option<(u32, i64)>,
    ) -> Arc<DataCenter> {
        let mut energy = serde_json::json!({
            "pue": 1.2, "carbonIntensity": 300, "accounting": "LocationBased",
        });
        if let Some((carbon, expires)) = pushed {
            energy["pushed"] = serde_json::json!({
                "carbonIntensity": carbon,
                "expiresAt": k8s_openapi::jiff::Timestamp::from_second(expires).expect("time").to_string(),
            });
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "civicgrid.io/v1alpha1", "kind": "DataCenter",
                "metadata": { "name": name, "resourceVersion": version },
                "spec": {
                    "tier": "edge", "region": "r", "zone": "z",
                    "capacity": { "cpu": cores.to_string(), "memory": "64Gi" },
                    "energy": energy,
                },
                "status": { "conditions": [{
                    "type": "Reachable", "status": "True", "reason": "Probed", "message": "",
                    "lastTransitionTime": "2026-12-01T00:00:00Z",
                }]},
            }))
            .expect("a valid DataCenter"),
        )
    }

    /// A data center found to share its member cluster is a change the
    /// engine must see: workloads that reuse their last decision while
    /// nothing they read changed must be placed again.
    #[test]
    fn learning_a_data_centers_cluster_changes_its_placement_fingerprint() {
        let unidentified = data_center("edge", "1", 8, None);
        let mut identified = (*unidentified).clone();
        identified.status.as_mut().expect("a status").cluster_id = Some("uid-shared".into());
        assert_ne!(
            placement_fingerprint(&unidentified),
            placement_fingerprint(&identified)
        );
        let mut other = identified.clone();
        other.status.as_mut().expect("a status").cluster_id = Some("uid-other".into());
        assert_ne!(
            placement_fingerprint(&identified),
            placement_fingerprint(&other)
        );
    }

    fn seen(pool: &Pool) -> Vec<(String, u64, Option<u32>)> {
        pool.snapshot()
            .data_centers
            .iter()
            .map(|dc| (dc.name.clone(), dc.capacity.cpu_millis, dc.carbon_intensity))
            .collect()
    }

    #[test]
    fn data_centers_are_converted_again_when_changed_expired_or_gone() {
        let now = 1_800_000_000;
        let mut converted = ConvertedDataCenters::default();
        let first = vec![
            data_center("a", "1", 8, None),
            data_center("b", "1", 8, Some((50, now + 60))),
        ];
        let mut pool = Pool::new(Snapshot {
            now_unix: now,
            data_centers: converted.all(&first, now),
            workloads: Vec::new(),
            current: BTreeMap::new(),
        });
        assert_eq!(
            seen(&pool),
            [("a".into(), 8000, Some(300)), ("b".into(), 8000, Some(50))]
        );

        // The same objects: nothing to convert, even when the content
        // would differ (a cache never shows a new object under an old
        // resourceVersion).
        let unchanged_version = vec![data_center("a", "1", 16, None), first[1].clone()];
        converted.sync(&unchanged_version, now + 1, &mut pool);
        assert_eq!(seen(&pool)[0], ("a".into(), 8000, Some(300)));

        // A new resourceVersion is converted again; the pushed carbon value
        // gives way to the declared one once it expires.
        let changed = vec![data_center("a", "2", 16, None), first[1].clone()];
        converted.sync(&changed, now + 60, &mut pool);
        assert_eq!(
            seen(&pool),
            [
                ("a".into(), 16000, Some(300)),
                ("b".into(), 8000, Some(300))
            ]
        );

        // Gone from the cache: gone from the pool.
        converted.sync(&changed[..1], now + 61, &mut pool);
        assert_eq!(seen(&pool), [("a".into(), 16000, Some(300))]);
    }
}
