//! Preempt: when a workload still does not fit and its policy allows,
//! room held by strictly lower priorities that are not yet decided counts
//! as free, and the replicas standing in the way are evicted once the
//! placement is final.

use super::divide;
use super::model::{DataCenter, PreemptionPolicy, ReplicaDemand, Resources, Workload};
use super::score::Scored;
use super::{Candidate, Preemption, Scheduler, any_gpu_model, demand_of, held_at};

/// How many replicas of `demand` fit in `free`.
pub(super) fn fits(dc: &DataCenter, free: &Resources, demand: &ReplicaDemand) -> u64 {
    let per = |free: u64, need: u64| free.checked_div(need).unwrap_or(u64::MAX);
    let mut n = per(free.cpu_millis, demand.cpu_millis)
        .min(per(free.memory_bytes, demand.memory_bytes))
        .min(per(free.ephemeral_bytes, demand.ephemeral_bytes));
    if demand.gpu_count > 0 {
        let model = demand.gpu_model.clone().or_else(|| any_gpu_model(dc));
        let free_gpus = model.and_then(|m| free.gpus.get(&m).copied()).unwrap_or(0);
        n = n.min(free_gpus.checked_div(demand.gpu_count).unwrap_or(u64::MAX));
    }
    if n == u64::MAX {
        // A replica that needs nothing still takes a slot; bound it sanely.
        n = u64::from(u32::MAX);
    }
    n
}

impl Scheduler<'_> {
    /// Divides again with preemptible room counted as free, and keeps that
    /// division if it places more. Returns whether it did (and so whether
    /// replicas must be evicted).
    pub(super) fn divide_with_preemption(
        &self,
        workload: &Workload,
        scored: &mut Scored,
        assignment: &mut Vec<u32>,
    ) -> bool {
        if workload.preemption != PreemptionPolicy::PreemptLowerPriority
            || divide::placed_total(workload, assignment) >= divide::desired_total(workload)
        {
            return false;
        }
        let mut with_preemption = scored.candidates.clone();
        for c in &mut with_preemption {
            let dc = &self.snapshot.data_centers[c.dc];
            let free = self.free_with_preemption(c.dc, workload.priority);
            c.available = self.cap_available(workload, c, fits(dc, &free, &workload.demand));
        }
        let better = divide::divide(workload, &with_preemption);
        if divide::placed_total(workload, &better) > divide::placed_total(workload, assignment) {
            scored.candidates = with_preemption;
            *assignment = better;
            true
        } else {
            false
        }
    }

    pub(super) fn free_with_preemption(&self, dc: usize, priority: i32) -> Resources {
        let mut blocking = Resources::default();
        let by_priority = &self.held_by_priority[dc];
        let from = by_priority.partition_point(|(p, _)| *p < priority);
        for (_, held) in &by_priority[from..] {
            blocking.add(held);
        }
        self.snapshot.data_centers[dc]
            .capacity
            .saturating_sub(&self.committed[dc])
            .saturating_sub(&blocking)
    }

    /// Evicts lower-priority, not yet decided replicas where `assignment`
    /// needs more than the free capacity.
    pub(super) fn evict(
        &mut self,
        w: usize,
        candidates: &[Candidate],
        assignment: &[u32],
        decided: &[bool],
    ) -> Vec<Preemption> {
        let snapshot = self.snapshot;
        let workload = &snapshot.workloads[w];
        let mut preemptions = Vec::new();
        for (c, &a) in candidates.iter().zip(assignment) {
            if a == 0 {
                continue;
            }
            let dc = &snapshot.data_centers[c.dc];
            let free = dc
                .capacity
                .saturating_sub(&self.committed[c.dc])
                .saturating_sub(&self.held_total[c.dc]);
            let need = demand_of(dc, &workload.demand, u64::from(a));
            if need.fits_within(&free) {
                continue;
            }
            // Victims: lowest priority first, then by key.
            let mut holders: Vec<(usize, u32)> = (0..snapshot.workloads.len())
                .filter(|&v| {
                    !decided[v] && v != w && snapshot.workloads[v].priority < workload.priority
                })
                .filter_map(|v| {
                    self.current[v]
                        .iter()
                        .find(|(d, r)| *d == c.dc && *r > 0)
                        .map(|(_, r)| (v, *r))
                })
                .collect();
            holders.sort_by(|a, b| {
                let (wa, wb) = (&snapshot.workloads[a.0], &snapshot.workloads[b.0]);
                wa.priority
                    .cmp(&wb.priority)
                    .then_with(|| wa.key.cmp(&wb.key))
            });
            let mut freed = free;
            for (v, replicas) in holders {
                if need.fits_within(&freed) {
                    break;
                }
                let victim = &snapshot.workloads[v];
                let mut evicted = 0;
                while evicted < replicas && !need.fits_within(&freed) {
                    freed.add(&demand_of(dc, &victim.demand, 1));
                    evicted += 1;
                }
                let res = demand_of(dc, &victim.demand, u64::from(evicted));
                self.held_total[c.dc].sub(&res);
                held_at(&mut self.held_by_priority[c.dc], victim.priority).sub(&res);
                self.refresh_free(c.dc);
                if let Some(slot) = self.current[v].iter_mut().find(|(d, _)| *d == c.dc) {
                    slot.1 -= evicted;
                }
                preemptions.push(Preemption {
                    victim: victim.key.clone(),
                    data_center: dc.name.clone(),
                    replicas: evicted,
                });
            }
        }
        preemptions
    }
}
