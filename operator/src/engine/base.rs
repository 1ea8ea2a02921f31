//! What a decision starts from, and a pool that keeps it between decisions.
//!
//! Every decision starts from the same accounting: which data center each
//! workload holds replicas in, and the capacity those replicas hold, by
//! priority. Making it walks every placement in the pool; at a thousand data
//! centers and ten thousand workloads that costs several times what deciding
//! one workload does. [`Pool`] keeps it, and changes only what a changed
//! workload, placement or data center touches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::model::{self, DataCenter, Reachability, Resources, Snapshot, Workload, WorkloadKey};
use super::{Options, Schedule, Scheduler, any_gpu_model, demand_of, held_at, intern};

/// What depends only on the data centers' names and domains.
#[derive(Debug)]
pub(super) struct Shape {
    pub(super) dc_index: HashMap<String, usize>,
    /// Each data center's position in name order: the last tie-break.
    pub(super) name_rank: Vec<u32>,
    pub(super) zone_ids: Vec<usize>,
    pub(super) region_ids: Vec<usize>,
    /// Each data center's member cluster, interned, where two or more share
    /// one (`None` for the rest): the only data centers a workload must
    /// choose between.
    pub(super) shared_cluster: Vec<Option<usize>>,
    /// Whether any data centers share a member cluster.
    pub(super) any_shared: bool,
}

impl Shape {
    fn new(dcs: &[DataCenter]) -> Self {
        let dc_index = dcs
            .iter()
            .enumerate()
            .map(|(i, dc)| (dc.name.clone(), i))
            .collect();
        let mut by_name: Vec<usize> = (0..dcs.len()).collect();
        by_name.sort_unstable_by(|&a, &b| dcs[a].name.cmp(&dcs[b].name));
        let mut name_rank = vec![0u32; dcs.len()];
        for (rank, &dc) in by_name.iter().enumerate() {
            name_rank[dc] = u32::try_from(rank).unwrap_or(u32::MAX);
        }
        let mut sharing: HashMap<&str, u32> = HashMap::new();
        for cluster in dcs.iter().filter_map(|dc| dc.cluster.as_deref()) {
            *sharing.entry(cluster).or_default() += 1;
        }
        let cluster_ids = intern(dcs.iter().map(|dc| dc.cluster.as_deref()));
        let shared_cluster: Vec<Option<usize>> = dcs
            .iter()
            .zip(cluster_ids)
            .map(|(dc, id)| {
                dc.cluster
                    .as_deref()
                    .filter(|cluster| sharing[cluster] > 1)
                    .map(|_| id)
            })
            .collect();
        Self {
            dc_index,
            name_rank,
            zone_ids: intern(dcs.iter().map(|dc| (dc.region.as_str(), dc.zone.as_str()))),
            region_ids: intern(dcs.iter().map(|dc| dc.region.as_str())),
            any_shared: shared_cluster.iter().any(Option::is_some),
            shared_cluster,
        }
    }
}

/// The accounting a decision starts from.
#[derive(Debug, Clone)]
pub(super) struct Base {
    pub(super) shape: Arc<Shape>,
    /// Capacity held per data center by the current placements.
    pub(super) held_total: Vec<Resources>,
    /// The same, by priority, sorted by priority.
    pub(super) held_by_priority: Vec<Vec<(i32, Resources)>>,
    /// Current replicas per workload index, per data center index.
    /// Shared whole between the pool and a decision, copied only when a
    /// decision changes it (a preemption): copying ten thousand small
    /// vectors, or counting references to each, cost more than deciding.
    pub(super) current: Arc<Vec<Vec<(usize, u32)>>>,
    /// Cordoned, unreachable or NoSchedule/NoExecute-tainted data centers.
    pub(super) troubled: Vec<usize>,
}

fn troubled(dcs: &[DataCenter]) -> Vec<usize> {
    (0..dcs.len())
        .filter(|&i| {
            dcs[i].cordoned
                || dcs[i].reachability != Reachability::Reachable
                || dcs[i].taints.iter().any(|t| {
                    matches!(
                        t.effect,
                        model::TaintEffect::NoSchedule | model::TaintEffect::NoExecute
                    )
                })
        })
        .collect()
}

impl Base {
    pub(super) fn new(snapshot: &Snapshot) -> Self {
        let dcs = &snapshot.data_centers;
        let mut base = Self {
            shape: Arc::new(Shape::new(dcs)),
            held_total: vec![Resources::default(); dcs.len()],
            held_by_priority: vec![Vec::new(); dcs.len()],
            current: Arc::new(vec![Vec::new(); snapshot.workloads.len()]),
            troubled: troubled(dcs),
        };
        // Walk the current placements once (a map lookup per workload would
        // compare keys a dozen times each).
        let index_of: HashMap<&WorkloadKey, usize> = snapshot
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (&w.key, i))
            .collect();
        for (key, current) in &snapshot.current {
            if let Some(&w) = index_of.get(key) {
                base.hold(dcs, &snapshot.workloads[w], w, current);
            }
        }
        base
    }

    /// Records `placement` as what workload `w` holds.
    fn hold(
        &mut self,
        dcs: &[DataCenter],
        workload: &Workload,
        w: usize,
        placement: &BTreeMap<String, u32>,
    ) {
        for (name, &replicas) in placement {
            if let Some(&dc) = self.shape.dc_index.get(name.as_str())
                && replicas > 0
            {
                Arc::make_mut(&mut self.current)[w].push((dc, replicas));
                let res = demand_of(&dcs[dc], &workload.demand, u64::from(replicas));
                self.held_total[dc].add(&res);
                held_at(&mut self.held_by_priority[dc], workload.priority).add(&res);
            }
        }
    }

    /// Forgets what workload `w` holds.
    fn release(&mut self, dcs: &[DataCenter], workloads: &[Workload], w: usize) {
        let workload = &workloads[w];
        let mut saturated = Vec::new();
        for &(dc, replicas) in &std::mem::take(&mut Arc::make_mut(&mut self.current)[w]) {
            // Sums saturate, so subtracting from a saturated one would not
            // undo what was added: count that data center again instead.
            if self.held_total[dc].saturated() {
                saturated.push(dc);
                continue;
            }
            let res = demand_of(&dcs[dc], &workload.demand, u64::from(replicas));
            self.held_total[dc].sub(&res);
            held_at(&mut self.held_by_priority[dc], workload.priority).sub(&res);
        }
        for dc in saturated {
            self.recount(dcs, workloads, dc);
        }
    }

    /// Accounts data center `dc` again from scratch (its capacity or GPU
    /// models changed what a replica there holds).
    fn recount(&mut self, dcs: &[DataCenter], workloads: &[Workload], dc: usize) {
        self.held_total[dc] = Resources::default();
        self.held_by_priority[dc].clear();
        for (w, current) in self.current.iter().enumerate() {
            for &(at, replicas) in current.iter() {
                if at == dc {
                    let res = demand_of(&dcs[dc], &workloads[w].demand, u64::from(replicas));
                    self.held_total[dc].add(&res);
                    held_at(&mut self.held_by_priority[dc], workloads[w].priority).add(&res);
                }
            }
        }
    }
}

/// A snapshot kept between decisions, with the accounting every decision
/// starts from kept up to date as workloads, placements and data centers
/// change: a decision then costs what placing one workload costs, not what
/// walking the whole pool does.
///
/// [`Pool::schedule_only`] decides exactly what [`super::schedule_only`]
/// decides on [`Pool::snapshot`].
#[derive(Debug, Clone)]
pub struct Pool {
    snapshot: Snapshot,
    index: HashMap<WorkloadKey, usize>,
    base: Base,
}

impl Pool {
    /// A pool from `snapshot`.
    #[must_use]
    pub fn new(snapshot: Snapshot) -> Self {
        let base = Base::new(&snapshot);
        let index = snapshot
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (w.key.clone(), i))
            .collect();
        Self {
            snapshot,
            index,
            base,
        }
    }

    /// The snapshot the pool decides on (its `now_unix` is that of the
    /// last decision).
    #[must_use]
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Whether the pool has a workload under `key`.
    #[must_use]
    pub fn contains(&self, key: &WorkloadKey) -> bool {
        self.index.contains_key(key)
    }

    /// Adds `workload`, or replaces the one under its key; what it holds
    /// follows its (new) demand and priority.
    pub fn set_workload(&mut self, workload: Workload) {
        let dcs = &self.snapshot.data_centers;
        match self.index.get(&workload.key) {
            Some(&w) => {
                self.base.release(dcs, &self.snapshot.workloads, w);
                self.snapshot.workloads[w] = workload;
                self.hold_current(w);
            }
            None => {
                let w = self.snapshot.workloads.len();
                self.index.insert(workload.key.clone(), w);
                self.snapshot.workloads.push(workload);
                Arc::make_mut(&mut self.base.current).push(Vec::new());
                self.hold_current(w);
            }
        }
    }

    /// Removes the workload under `key` and its placement.
    pub fn remove_workload(&mut self, key: &WorkloadKey) {
        self.snapshot.current.remove(key);
        let Some(w) = self.index.remove(key) else {
            return;
        };
        self.base
            .release(&self.snapshot.data_centers, &self.snapshot.workloads, w);
        self.snapshot.workloads.swap_remove(w);
        Arc::make_mut(&mut self.base.current).swap_remove(w);
        if let Some(moved) = self.snapshot.workloads.get(w) {
            self.index.insert(moved.key.clone(), w);
        }
    }

    /// Records where `key`'s replicas run now (empty: nowhere).
    pub fn set_placement(&mut self, key: &WorkloadKey, placement: BTreeMap<String, u32>) {
        if placement.is_empty() {
            self.snapshot.current.remove(key);
        } else {
            self.snapshot.current.insert(key.clone(), placement);
        }
        if let Some(&w) = self.index.get(key) {
            self.base
                .release(&self.snapshot.data_centers, &self.snapshot.workloads, w);
            self.hold_current(w);
        }
    }

    fn hold_current(&mut self, w: usize) {
        let workload = &self.snapshot.workloads[w];
        if let Some(placement) = self.snapshot.current.get(&workload.key) {
            self.base
                .hold(&self.snapshot.data_centers, workload, w, placement);
        }
    }

    /// Adds `dc`, or replaces the data center of its name.
    pub fn set_data_center(&mut self, dc: DataCenter) {
        let Some(&i) = self.base.shape.dc_index.get(&dc.name) else {
            self.snapshot.data_centers.push(dc);
            self.rebuild();
            return;
        };
        let old = std::mem::replace(&mut self.snapshot.data_centers[i], dc);
        let new = &self.snapshot.data_centers[i];
        if (&old.region, &old.zone, &old.cluster) != (&new.region, &new.zone, &new.cluster) {
            self.base.shape = Arc::new(Shape::new(&self.snapshot.data_centers));
        }
        self.base.troubled = troubled(&self.snapshot.data_centers);
        // What a replica holds depends on its data center only through the
        // GPU model "any GPU" means there.
        if any_gpu_model(&old) != any_gpu_model(&self.snapshot.data_centers[i]) {
            self.base
                .recount(&self.snapshot.data_centers, &self.snapshot.workloads, i);
        }
    }

    /// Removes the data center named `name`.
    pub fn remove_data_center(&mut self, name: &str) {
        let before = self.snapshot.data_centers.len();
        self.snapshot.data_centers.retain(|dc| dc.name != name);
        if self.snapshot.data_centers.len() != before {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.base = Base::new(&self.snapshot);
    }

    /// [`super::schedule_only`] on [`Pool::snapshot`] at `now_unix`,
    /// starting from the kept accounting.
    pub fn schedule_only(
        &mut self,
        now_unix: i64,
        only: &BTreeSet<WorkloadKey>,
        options: &Options,
    ) -> Schedule {
        self.snapshot.now_unix = now_unix;
        // Looked up in the index: filtering every workload by `only` would
        // compare keys ten thousand times for one decision.
        let order = only
            .iter()
            .filter_map(|key| self.index.get(key).copied())
            .collect();
        Scheduler::from_base(&self.snapshot, *options, self.base.clone()).run_these(order)
    }
}
