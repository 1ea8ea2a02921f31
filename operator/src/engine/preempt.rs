//! Preempt: when a workload still does not fit and its policy allows,
//! room held by strictly lower priorities that are not yet decided counts
//! as free for the shortfall only, and the fewest replicas standing in the
//! way are evicted once the placement is final.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::divide;
use super::model::{
    DataCenter, PreemptionPolicy, ReplicaDemand, Resources, StrategyKind, Workload,
};
use super::score::Scored;
use std::sync::Arc;

use super::{Candidate, PreemptedBy, Preemption, Scheduler, any_gpu_model, demand_of, held_at};

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

/// `u64::MAX` of every resource `need` asks for, zero of the others.
fn uses(need: &Resources) -> Resources {
    let some = |n: u64| if n > 0 { u64::MAX } else { 0 };
    Resources {
        cpu_millis: some(need.cpu_millis),
        memory_bytes: some(need.memory_bytes),
        ephemeral_bytes: some(need.ephemeral_bytes),
        gpus: need
            .gpus
            .iter()
            .map(|(model, n)| (model.clone(), some(*n)))
            .collect(),
    }
}

/// `have`, but no more of each resource than `limit`.
fn at_most(have: &Resources, limit: &Resources) -> Resources {
    let gpus = have
        .gpus
        .iter()
        .map(|(model, n)| {
            (
                model.clone(),
                (*n).min(limit.gpus.get(model).copied().unwrap_or(0)),
            )
        })
        .collect();
    Resources {
        cpu_millis: have.cpu_millis.min(limit.cpu_millis),
        memory_bytes: have.memory_bytes.min(limit.memory_bytes),
        ephemeral_bytes: have.ephemeral_bytes.min(limit.ephemeral_bytes),
        gpus,
    }
}

/// Whether a replica using `per` gives back any of what is `missing`.
fn frees_any_of(per: &Resources, missing: &Resources) -> bool {
    (per.cpu_millis > 0 && missing.cpu_millis > 0)
        || (per.memory_bytes > 0 && missing.memory_bytes > 0)
        || (per.ephemeral_bytes > 0 && missing.ephemeral_bytes > 0)
        || per
            .gpus
            .iter()
            .any(|(model, n)| *n > 0 && missing.gpus.get(model).is_some_and(|m| *m > 0))
}

/// Replicas of `assignment` that only preempted room holds: what is placed
/// beyond each candidate's free room.
fn preempted_replicas(free_only: &[Candidate], assignment: &[u32]) -> u32 {
    free_only
        .iter()
        .zip(assignment)
        .map(|(c, &a)| a.saturating_sub(c.available))
        .sum()
}

/// Distinct spread domains used, counted up to what `minDomains` asks.
pub(super) fn domains_met(
    workload: &Workload,
    candidates: &[Candidate],
    assignment: &[u32],
) -> usize {
    let Some(min) = workload.placement.spread.min_domains else {
        return 0;
    };
    let used: BTreeSet<usize> = candidates
        .iter()
        .zip(assignment)
        .filter(|(_, a)| **a > 0)
        .map(|(c, _)| c.domain)
        .collect();
    used.len().min(min as usize)
}

impl Scheduler<'_> {
    /// With preemptible room counted as free, places more if it can: of the
    /// divisions that place the most (and meet `minDomains` furthest), the
    /// one that needs the fewest replicas in preempted room. Returns whether
    /// it did (and so whether replicas must be evicted).
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
        let redivided = divide::divide(workload, &with_preemption);
        // Static weights are the user's own division: preempted room is
        // divided by them too, or the next round would move replicas back.
        let topped = if workload.placement.strategy == StrategyKind::StaticWeights {
            redivided.clone()
        } else {
            self.top_up(workload, &with_preemption, assignment)
        };
        // Room reserved from lower priorities this round counts as free:
        // taking it evicts nobody.
        let unevicted: Vec<Candidate> = scored
            .candidates
            .iter()
            .map(|c| Candidate {
                available: self.room_without_eviction(workload, c),
                ..*c
            })
            .collect();
        let rank = |a: &[u32]| {
            (
                divide::placed_total(workload, a),
                domains_met(workload, &with_preemption, a),
                Reverse(preempted_replicas(&unevicted, a)),
            )
        };
        let better = if rank(&redivided) > rank(&topped) {
            redivided
        } else {
            topped
        };
        if divide::placed_total(workload, &better) > divide::placed_total(workload, assignment) {
            scored.candidates = with_preemption;
            *assignment = better;
            true
        } else {
            false
        }
    }

    /// Free room in `c`'s data center plus what is reserved there from
    /// priorities below `workload`'s: what it may take without evicting.
    fn unevicted_room(&self, workload: &Workload, c: &Candidate) -> Resources {
        let mut room = self.snapshot.data_centers[c.dc]
            .capacity
            .saturating_sub(&self.committed[c.dc])
            .saturating_sub(&self.held_total[c.dc]);
        for (priority, reserve) in &self.reserved[c.dc] {
            if *priority < workload.priority {
                room.add(reserve);
            }
        }
        room
    }

    /// Replicas of `workload` that fit in `c` without evicting anyone.
    pub(super) fn room_without_eviction(&self, workload: &Workload, c: &Candidate) -> u32 {
        let dc = &self.snapshot.data_centers[c.dc];
        self.cap_available(
            workload,
            c,
            fits(dc, &self.unevicted_room(workload, c), &workload.demand),
        )
    }

    /// The lowest priority whose replicas (and every lower one's) must go
    /// for `wanted` replicas to fit in `c`; `i32::MIN` when they fit
    /// without evicting, `i32::MAX` when no eviction makes them fit.
    fn victim_priority_for(&self, workload: &Workload, c: &Candidate, wanted: u32) -> i32 {
        let dc = &self.snapshot.data_centers[c.dc];
        let mut room = self.unevicted_room(workload, c);
        let fit =
            |room: &Resources| self.cap_available(workload, c, fits(dc, room, &workload.demand));
        if fit(&room) >= wanted {
            return i32::MIN;
        }
        for (priority, held) in &self.held_by_priority[c.dc] {
            if *priority >= workload.priority {
                break;
            }
            room.add(held);
            // Reserved room of this priority was counted already.
            if let Some((_, reserve)) = self.reserved[c.dc].iter().find(|(p, _)| p == priority) {
                room.sub(reserve);
            }
            if fit(&room) >= wanted {
                return *priority;
            }
        }
        i32::MAX
    }

    /// Keeps `assignment` (placed in free room) and adds only the shortfall
    /// in preemptible room, one replica at a time where the victims it
    /// needs have the lowest priority, then in fill order: the preferred
    /// data centers are not emptied to cover what room elsewhere covers,
    /// and a higher priority is never evicted while a lower one would do.
    /// Duplicated adds copies only until `minDomains` domains hold one.
    fn top_up(
        &self,
        workload: &Workload,
        with_preemption: &[Candidate],
        assignment: &[u32],
    ) -> Vec<u32> {
        let rules = &workload.placement;
        let mut topped = assignment.to_vec();
        let mut used: BTreeSet<usize> = with_preemption
            .iter()
            .zip(assignment)
            .filter(|(_, a)| **a > 0)
            .map(|(c, _)| c.domain)
            .collect();
        let may_open = |used: &BTreeSet<usize>, domain: usize| {
            used.contains(&domain)
                || rules
                    .spread
                    .max_domains
                    .is_none_or(|m| used.len() < m as usize)
        };
        if rules.strategy == StrategyKind::Duplicated {
            let min = rules.spread.min_domains.unwrap_or(1).max(1) as usize;
            let mut order: Vec<(i32, usize)> = with_preemption
                .iter()
                .enumerate()
                .filter(|(i, c)| {
                    topped[*i] == 0 && workload.replicas > 0 && c.available >= workload.replicas
                })
                .map(|(i, c)| (self.victim_priority_for(workload, c, workload.replicas), i))
                .collect();
            order.sort_unstable();
            for (_, i) in order {
                let c = &with_preemption[i];
                if used.len() >= min {
                    break;
                }
                if !used.contains(&c.domain) && may_open(&used, c.domain) {
                    topped[i] = workload.replicas;
                    used.insert(c.domain);
                }
            }
            return topped;
        }
        let mut short =
            divide::desired_total(workload).saturating_sub(divide::placed_total(workload, &topped));
        while short > 0 {
            let next = with_preemption
                .iter()
                .enumerate()
                .filter(|(i, c)| {
                    c.available > topped[*i]
                        && !(rules.strategy == StrategyKind::StaticWeights && c.weight == 0)
                        && may_open(&used, c.domain)
                })
                .map(|(i, c)| (self.victim_priority_for(workload, c, topped[i] + 1), i))
                .min();
            let Some((_, i)) = next else { break };
            topped[i] += 1;
            short -= 1;
            used.insert(with_preemption[i].domain);
        }
        topped
    }

    /// Holds `room` in `dc` for the rest of the round as if a workload of
    /// `priority` held it.
    pub(super) fn reserve(&mut self, dc: usize, priority: i32, room: &Resources) {
        if room.fits_within(&Resources::default()) {
            return;
        }
        self.held_total[dc].add(room);
        held_at(&mut self.held_by_priority[dc], priority).add(room);
        match self.reserved[dc].iter_mut().find(|(p, _)| *p == priority) {
            Some((_, held)) => held.add(room),
            None => {
                self.reserved[dc].push((priority, room.clone()));
                self.reserved[dc].sort_by_key(|(p, _)| *p);
            }
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

    /// Evicts the fewest lower-priority, not yet decided replicas that make
    /// `assignment` fit where free room does not: room reserved from lower
    /// priorities first, then victims holding some of the missing resource
    /// (see [`Self::victims`]). What the eviction frees beyond the need
    /// stays held for the round (see [`Self::reserve`]).
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
            // A data center already over its capacity (it shrank) must
            // shed that much too before the need fits, in what it uses.
            let mut used = self.committed[c.dc].clone();
            used.add(&self.held_total[c.dc]);
            let plain_need = demand_of(dc, &workload.demand, u64::from(a));
            let mut need = plain_need.clone();
            need.add(&at_most(
                &used.saturating_sub(&dc.capacity),
                &uses(&plain_need),
            ));
            if need.fits_within(&free) {
                continue;
            }
            let freed = self.take_reserved(c.dc, workload.priority, &need, free);
            if need.fits_within(&freed) {
                self.refresh_free(c.dc);
                continue;
            }
            let missing = need.saturating_sub(&freed);
            let taken = self.victims(w, c.dc, decided, (&need, &plain_need), freed);
            let mut released = Resources::default();
            let mut highest_victim = i32::MIN;
            for (v, evicted) in taken {
                let victim = &snapshot.workloads[v];
                highest_victim = highest_victim.max(victim.priority);
                let res = demand_of(dc, &victim.demand, u64::from(evicted));
                released.add(&res);
                self.held_total[c.dc].sub(&res);
                held_at(&mut self.held_by_priority[c.dc], victim.priority).sub(&res);
                if let Some(slot) = Arc::make_mut(&mut self.current)[v]
                    .iter_mut()
                    .find(|(d, _)| *d == c.dc)
                {
                    slot.1 -= evicted;
                }
                preemptions.push(Preemption {
                    victim: victim.key.clone(),
                    data_center: dc.name.clone(),
                    replicas: evicted,
                });
                // A second chance of the preemptor may evict here again.
                let lost = self.preempted_by.entry(v).or_default();
                match lost
                    .iter_mut()
                    .find(|p| p.preemptor == workload.key && p.data_center == dc.name)
                {
                    Some(earlier) => earlier.replicas += evicted,
                    None => lost.push(PreemptedBy {
                        preemptor: workload.key.clone(),
                        data_center: dc.name.clone(),
                        replicas: evicted,
                    }),
                }
            }
            // Kubernetes keeps freed room for the preemptor (its nominated
            // node). Here the excess stays held, as if by the victims, for
            // the rest of the round: only a workload of higher priority
            // than theirs, which could have evicted them itself, may take it.
            self.reserve(c.dc, highest_victim, &released.saturating_sub(&missing));
            self.refresh_free(c.dc);
        }
        preemptions
    }

    /// Takes room reserved in `dc` from priorities below `priority`
    /// towards `need`, on top of `freed`: it costs nobody a replica.
    /// Returns the room now free for the need.
    fn take_reserved(
        &mut self,
        dc: usize,
        priority: i32,
        need: &Resources,
        mut freed: Resources,
    ) -> Resources {
        for (held_at_priority, reserve) in self.reserved[dc].iter_mut() {
            if *held_at_priority >= priority || need.fits_within(&freed) {
                continue;
            }
            let take = at_most(reserve, &need.saturating_sub(&freed));
            reserve.sub(&take);
            self.held_total[dc].sub(&take);
            held_at(&mut self.held_by_priority[dc], *held_at_priority).sub(&take);
            freed.add(&take);
        }
        freed
    }

    /// The fewest replicas in `dc` of lower-priority, not yet decided
    /// workloads that free `need` on top of `freed`: only workloads holding
    /// some of what is missing, lowest priority first and outside gangs
    /// before gangs; then each replica not needed after all is given back,
    /// the last chosen first. When they cannot free `need` (an excess they
    /// cannot shed), only `plain_need` is evicted for. Returns (workload
    /// index, replicas).
    fn victims(
        &self,
        w: usize,
        dc: usize,
        decided: &[bool],
        (need, plain_need): (&Resources, &Resources),
        mut freed: Resources,
    ) -> Vec<(usize, u32)> {
        let snapshot = self.snapshot;
        let workload = &snapshot.workloads[w];
        let data_center = &snapshot.data_centers[dc];
        let missing = need.saturating_sub(&freed);
        let mut holders: Vec<(usize, u32, Resources)> = (0..snapshot.workloads.len())
            .filter(|&v| {
                !decided[v] && v != w && snapshot.workloads[v].priority < workload.priority
            })
            .filter_map(|v| {
                let (_, replicas) = self.current[v].iter().find(|(d, r)| *d == dc && *r > 0)?;
                let per = demand_of(data_center, &snapshot.workloads[v].demand, 1);
                frees_any_of(&per, &missing).then_some((v, *replicas, per))
            })
            .collect();
        holders.sort_by(|a, b| {
            let (wa, wb) = (&snapshot.workloads[a.0], &snapshot.workloads[b.0]);
            wa.priority
                .cmp(&wb.priority)
                .then_with(|| wa.placement.gang.cmp(&wb.placement.gang))
                .then_with(|| wa.key.cmp(&wb.key))
        });
        let mut taken = vec![0u32; holders.len()];
        for (k, (_, replicas, per)) in holders.iter().enumerate() {
            while taken[k] < *replicas && !need.fits_within(&freed) {
                freed.add(per);
                taken[k] += 1;
            }
            if need.fits_within(&freed) {
                break;
            }
        }
        let need = if need.fits_within(&freed) {
            need
        } else {
            plain_need
        };
        for k in (0..holders.len()).rev() {
            while taken[k] > 0 {
                let without = freed.saturating_sub(&holders[k].2);
                if !need.fits_within(&without) {
                    break;
                }
                freed = without;
                taken[k] -= 1;
            }
        }
        holders
            .iter()
            .zip(taken)
            .filter(|(_, n)| *n > 0)
            .map(|((v, _, _), n)| (*v, n))
            .collect()
    }
}
