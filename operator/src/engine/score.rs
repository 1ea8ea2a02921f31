//! Score: capacity without preemption and the weighted score of every data
//! center that passed the filter.

use std::rc::Rc;

use super::model::{DataCenter, PlacementRules, ReplicaDemand, Resources, SpreadDomain, Workload};
use super::{Candidate, Divisor, EXCLUDED, KEEP_ONLY, Scheduler, ScoreBreakdown, Verdict};

const MILLI: u64 = 1000;
const GIB: u64 = 1 << 30;

/// Score components that depend only on the data center and the rules,
/// normalised over one candidate set.
pub(super) struct StaticParts {
    pub(super) carbon: Vec<u32>,
    pub(super) latency: Vec<u32>,
    pub(super) locality: Vec<u32>,
    pub(super) tier: Vec<u32>,
}

impl StaticParts {
    pub(super) fn over(rules: &PlacementRules, dcs: &[DataCenter], set: &[usize]) -> Self {
        let normalise = |raw: Vec<u64>| {
            let (lo, hi) = raw
                .iter()
                .fold((u64::MAX, 0u64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            raw.into_iter()
                .map(|v| lower_is_better(v, lo, hi))
                .collect()
        };
        Self {
            carbon: carbon_parts(set.iter().map(|&i| carbon_value(&dcs[i])).collect()),
            latency: normalise(set.iter().map(|&i| latency_value(rules, &dcs[i])).collect()),
            locality: set.iter().map(|&i| locality_part(rules, &dcs[i])).collect(),
            tier: set.iter().map(|&i| tier_part(rules, &dcs[i])).collect(),
        }
    }
}

/// Price of one replica per hour in `dc`, in minor units.
pub(super) fn cost_value(demand: &ReplicaDemand, dc: &DataCenter) -> u64 {
    let gpu_price = if demand.gpu_count == 0 {
        0
    } else {
        match &demand.gpu_model {
            Some(model) => dc.cost_per_gpu_hour.get(model).copied().unwrap_or(0),
            None => dc.cost_per_gpu_hour.values().copied().min().unwrap_or(0),
        }
    };
    demand.cpu_millis.saturating_mul(dc.cost_per_core_hour) / MILLI
        + demand.memory_bytes.saturating_mul(dc.cost_per_gib_hour) / GIB
        + demand.gpu_count.saturating_mul(gpu_price)
}

/// Carbon intensity × PUE, where the intensity is known.
pub(super) fn carbon_value(dc: &DataCenter) -> Option<u64> {
    dc.carbon_intensity
        .map(|g| u64::from(g) * u64::from(dc.pue_milli))
}

/// The carbon part of each candidate: known intensities ranked among
/// themselves (lower is better, 0–100), an unknown one the middle (50).
/// Unknown is neither clean nor dirty; ranked last as the largest number,
/// it stretched the range so far that every known data center scored the
/// same, and carbon-aware placement switched off.
fn carbon_parts(raw: Vec<Option<u64>>) -> Vec<u32> {
    let (lo, hi) = raw
        .iter()
        .flatten()
        .fold((u64::MAX, 0u64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    raw.into_iter()
        .map(|v| v.map_or(UNKNOWN_CARBON_PART, |v| lower_is_better(v, lo, hi)))
        .collect()
}

/// The carbon part of a data center whose intensity is unknown.
pub(super) const UNKNOWN_CARBON_PART: u32 = 50;

pub(super) fn latency_value(rules: &PlacementRules, dc: &DataCenter) -> u64 {
    rules
        .max_latency
        .as_ref()
        .and_then(|(site, _)| dc.latency_ms.get(site))
        .map_or(0, |ms| u64::from(*ms))
}

pub(super) fn locality_part(rules: &PlacementRules, dc: &DataCenter) -> u32 {
    if rules.preferred_datasets.is_empty() {
        return 100;
    }
    let hosted = rules
        .preferred_datasets
        .iter()
        .filter(|d| dc.datasets.contains(*d))
        .count();
    u32::try_from(hosted * 100 / rules.preferred_datasets.len()).unwrap_or(100)
}

pub(super) fn tier_part(rules: &PlacementRules, dc: &DataCenter) -> u32 {
    if rules.preferred_tiers.is_empty() || rules.preferred_tiers.contains(&dc.tier) {
        100
    } else {
        0
    }
}

/// Percent of CPU and memory capacity (the smaller) left after one more
/// replica. `capacity` holds the CPU and memory capacities as divisors.
pub(super) fn free_share(
    capacity: &[Divisor; 2],
    free_cpu: u64,
    free_memory: u64,
    demand: &ReplicaDemand,
) -> u32 {
    let share = |cap: &Divisor, free: u64, need: u64| -> u64 {
        if cap.is_zero() {
            return if need == 0 { 100 } else { 0 };
        }
        cap.div(free.saturating_sub(need).saturating_mul(100))
    };
    let s = share(&capacity[0], free_cpu, demand.cpu_millis).min(share(
        &capacity[1],
        free_memory,
        demand.memory_bytes,
    ));
    u32::try_from(s.min(100)).unwrap_or(100)
}

pub(super) fn lower_is_better(v: u64, lo: u64, hi: u64) -> u32 {
    if hi <= lo {
        return 100;
    }
    u32::try_from((hi - v.min(hi)).saturating_mul(100) / (hi - lo)).unwrap_or(0)
}

/// The scored candidates of one workload, with what explaining a score needs.
pub(super) struct Scored {
    /// Every data center that passed the filter, with its room and score.
    pub(super) candidates: Vec<Candidate>,
    /// Price of one replica per hour, by [`Candidate::part`].
    costs: Vec<u64>,
    /// The lowest and highest of `costs`.
    cost_range: (u64, u64),
    parts: Rc<StaticParts>,
}

impl Scored {
    /// How `c` scored, part by part.
    pub(super) fn breakdown(&self, c: &Candidate) -> ScoreBreakdown {
        ScoreBreakdown {
            free_capacity: c.free_part,
            cost: lower_is_better(self.costs[c.part], self.cost_range.0, self.cost_range.1),
            carbon: self.parts.carbon[c.part],
            latency: self.parts.latency[c.part],
            locality: self.parts.locality[c.part],
            tier: self.parts.tier[c.part],
            total: c.total,
        }
    }
}

impl Scheduler<'_> {
    /// The candidates of the workload being placed: each data center of
    /// `passed` (with its `verdicts`) that cordon and reachability did not
    /// exclude, with the replicas that fit there now and its score; `parts`
    /// are the static score components over them.
    pub(super) fn score(
        &self,
        workload: &Workload,
        passed: &[usize],
        verdicts: &[Verdict],
        parts: &Rc<StaticParts>,
    ) -> Scored {
        let dcs = &self.snapshot.data_centers;
        let rules = &workload.placement;
        let weights = rules.weights;
        let demand = &workload.demand;
        let parts = Rc::clone(parts);
        let mut candidates = Vec::with_capacity(passed.len());
        let mut costs = Vec::with_capacity(passed.len());
        let per_replica = [
            Divisor::new(demand.cpu_millis),
            Divisor::new(demand.memory_bytes),
            Divisor::new(demand.ephemeral_bytes),
        ];
        for &dc in passed {
            if self.trouble[dc] == EXCLUDED {
                continue;
            }
            let Ok((group, discouraged)) = verdicts[dc] else {
                continue;
            };
            let [free_cpu, free_memory, _] = self.free[dc];
            let mut c = Candidate {
                dc,
                group,
                discouraged,
                keep_only: self.trouble[dc] == KEEP_ONLY,
                current: self.here[dc],
                available: 0,
                part: candidates.len(),
                free_part: free_share(
                    self.capacity_divisors[dc].get_or_init(|| {
                        let capacity = &dcs[dc].capacity;
                        [
                            Divisor::new(capacity.cpu_millis),
                            Divisor::new(capacity.memory_bytes),
                        ]
                    }),
                    free_cpu,
                    free_memory,
                    demand,
                ),
                total: 0,
                domain: self.domain(dc, rules.spread.by),
                weight: rules
                    .static_weights
                    .get(&dcs[dc].name)
                    .copied()
                    .unwrap_or(0),
                rank: self.shape.name_rank[dc],
            };
            c.available = self.cap_available(workload, &c, self.fit(dc, demand, &per_replica));
            costs.push(cost_value(demand, &dcs[dc]));
            candidates.push(c);
        }
        let cost_range = costs
            .iter()
            .fold((u64::MAX, 0u64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let cost_span = Divisor::new(cost_range.1.saturating_sub(cost_range.0));
        for (c, &cost) in candidates.iter_mut().zip(&costs) {
            // As `lower_is_better`, without a division per candidate.
            let cost_part = if weights.cost == 0 {
                0
            } else if cost_span.is_zero() {
                100
            } else {
                let v = cost.min(cost_range.1);
                u32::try_from(cost_span.div((cost_range.1 - v).saturating_mul(100))).unwrap_or(0)
            };
            c.total = u64::from(c.free_part) * u64::from(weights.free_capacity)
                + u64::from(cost_part) * u64::from(weights.cost)
                + u64::from(parts.carbon[c.part]) * u64::from(weights.carbon)
                + u64::from(parts.latency[c.part]) * u64::from(weights.latency)
                + u64::from(parts.locality[c.part]) * u64::from(weights.locality)
                + u64::from(parts.tier[c.part]) * u64::from(weights.tier);
        }
        Scored {
            candidates,
            costs,
            cost_range,
            parts,
        }
    }

    /// Replicas of `demand` that fit in data center `i` next to what is
    /// committed and held, without allocating.
    pub(super) fn fit(&self, i: usize, demand: &ReplicaDemand, per_replica: &[Divisor; 3]) -> u64 {
        let [cpu, memory, ephemeral] = self.free[i];
        let mut n = per_replica[0]
            .div(cpu)
            .min(per_replica[1].div(memory))
            .min(per_replica[2].div(ephemeral));
        if demand.gpu_count > 0 {
            let dc = &self.snapshot.data_centers[i];
            let model = match &demand.gpu_model {
                Some(model) => Some(model.as_str()),
                None => dc
                    .capacity
                    .gpus
                    .iter()
                    .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                    .map(|(m, _)| m.as_str()),
            };
            let free_gpus = model.map_or(0, |m| {
                let get = |r: &Resources| r.gpus.get(m).copied().unwrap_or(0);
                get(&dc.capacity)
                    .saturating_sub(get(&self.committed[i]))
                    .saturating_sub(get(&self.held_total[i]))
            });
            n = n.min(free_gpus.checked_div(demand.gpu_count).unwrap_or(u64::MAX));
        }
        if n == u64::MAX {
            n = u64::from(u32::MAX);
        }
        n
    }

    pub(super) fn domain(&self, dc: usize, by: SpreadDomain) -> usize {
        match by {
            SpreadDomain::DataCenter => dc,
            SpreadDomain::Zone => self.shape.zone_ids[dc],
            SpreadDomain::Region => self.shape.region_ids[dc],
        }
    }

    pub(super) fn cap_available(&self, workload: &Workload, c: &Candidate, fit: u64) -> u32 {
        let mut available = u32::try_from(fit).unwrap_or(u32::MAX);
        if let Some(max) = workload.placement.spread.max_replicas_per_data_center {
            available = available.min(max);
        }
        if c.keep_only {
            available = available.min(c.current);
        }
        available
    }
}
