//! The placement engine: `schedule(snapshot) -> decisions`.
//!
//! A pure function with no I/O. The controller feeds it from its caches, and
//! `civicgrid-operator plan` feeds it from manifests on disk.
//!
//! # Expected flow
//! Workloads are decided one at a time in priority order (higher first, ties
//! by namespace/name). For each: **filter** every data center through the hard
//! rules (the first failing rule is the reason it was rejected), **score** the
//! survivors, **divide** the replicas by the workload's strategy, **preempt**
//! strictly lower priorities if it still does not fit and its policy allows,
//! then **explain** every data center that got nothing.
//!
//! # Guarantees
//! - Deterministic: the same snapshot gives the same decisions, byte for byte.
//! - Never over-commits: the replicas decided for a data center, summed over
//!   all workloads, fit its capacity in every resource.
//! - Stable: replicas stay where they run while that stays valid. An unchanged
//!   world moves nothing; a change moves only what it must (for static
//!   weights, what the new weights demand), and rebalancing towards a better
//!   fallback group happens only when the workload asks, at its pace.
//! - Capacity held by replicas of not-yet-decided workloads is respected:
//!   a workload takes it only by preemption, and only from strictly lower
//!   priorities.
//! - A data center that stops answering keeps its replicas for the workload's
//!   grace period; it takes nothing new meanwhile.

pub mod model;

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use strength_reduce::StrengthReducedU64;

use serde::Serialize;

use model::{
    DataCenter, FallbackGroup, PlacementRules, PreemptionPolicy, Reachability, RebalanceMode,
    ReplicaDemand, Resources, Selector, Snapshot, SpreadDomain, StrategyKind, TaintEffect, Tier,
    Toleration, Workload, WorkloadKey,
};

/// Tuning of one scheduling run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Record a rejection for every data center not chosen. With `false`, only
    /// counts per rule are kept (for very large what-if runs).
    pub explain: bool,
    /// Order every candidate even where the strategy reads only the best
    /// few. The decisions are the same, only slower: tests use it to check
    /// the shortcut.
    pub exhaustive: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            explain: true,
            exhaustive: false,
        }
    }
}

/// The rule that rejected a data center, in the order rules are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Rule {
    /// Cordoned and the workload had nothing there.
    Cordoned,
    /// The member cluster is not answering.
    Unreachable,
    /// Tier not in `requiredTiers`.
    Tier,
    /// Region not in `allowedRegions` (residency).
    Region,
    /// In no fallback group.
    FallbackGroup,
    /// Labels do not match `dataCenterSelector`.
    Selector,
    /// Has a NoSchedule taint the workload does not tolerate.
    Taint,
    /// Does not host a required dataset.
    Dataset,
    /// Too far from the latency site.
    Latency,
    /// Has no GPUs of the requested model.
    Gpu,
    /// No StaticWeights entry for it.
    StaticWeight,
    /// Not enough free capacity for one replica.
    Capacity,
    /// Excluded by the spread bounds.
    Spread,
    /// An earlier fallback group had room.
    Fallback,
    /// Passed every rule but lost on score.
    Score,
}

/// Score components (each 0–100) and the weighted total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScoreBreakdown {
    /// Room left after one more replica.
    pub free_capacity: u32,
    /// Cheaper is higher.
    pub cost: u32,
    /// Lower carbon intensity × PUE is higher.
    pub carbon: u32,
    /// Lower latency to the latency site is higher.
    pub latency: u32,
    /// Share of preferred datasets hosted.
    pub locality: u32,
    /// 100 in a preferred tier.
    pub tier: u32,
    /// Weighted sum.
    pub total: u64,
}

/// Why a data center got none of a workload's replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// The data center.
    pub data_center: String,
    /// The first rule that rejected it.
    pub rule: Rule,
    /// What exactly failed.
    pub message: String,
    /// For [`Rule::Score`] and [`Rule::Fallback`]: how it scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreBreakdown>,
}

/// Replicas of a lower-priority workload evicted to make room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Preemption {
    /// The evicted workload.
    pub victim: WorkloadKey,
    /// Where.
    pub data_center: String,
    /// How many of its replicas.
    pub replicas: u32,
}

/// How completely a workload was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Every replica placed.
    Scheduled,
    /// Some replicas placed.
    PartiallyScheduled,
    /// Nothing placed (or nothing wanted).
    Unschedulable,
}

/// The decision for one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The workload.
    pub workload: WorkloadKey,
    /// Replicas per data center (only non-zero entries).
    pub placement: BTreeMap<String, u32>,
    /// Replicas wanted (per data center when Duplicated).
    pub desired: u32,
    /// How completely it was placed.
    pub outcome: Outcome,
    /// Why not completely, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every data center not chosen, with the reason (empty unless explaining).
    pub rejections: Vec<Rejection>,
    /// Rejection counts per rule (always filled).
    pub rejected_by_rule: BTreeMap<Rule, u32>,
    /// Scores of the chosen data centers.
    pub scores: BTreeMap<String, ScoreBreakdown>,
    /// Lower-priority replicas evicted for this workload.
    pub preemptions: Vec<Preemption>,
    /// Replicas taken away from data centers where they ran.
    pub moved_replicas: u32,
}

impl Decision {
    /// A decision that places `placement` in full, with no rejections,
    /// scores or preemptions to report (replaying a known placement).
    pub fn scheduled(workload: WorkloadKey, placement: BTreeMap<String, u32>) -> Self {
        Self {
            workload,
            desired: placement.values().sum(),
            placement,
            outcome: Outcome::Scheduled,
            reason: None,
            rejections: Vec::new(),
            rejected_by_rule: BTreeMap::new(),
            scores: BTreeMap::new(),
            preemptions: Vec::new(),
            moved_replicas: 0,
        }
    }

    /// Total replicas placed.
    pub fn placed(&self) -> u32 {
        self.placement.values().sum()
    }
}

/// Decisions for every workload of the snapshot, sorted by workload key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schedule {
    /// One per workload.
    pub decisions: Vec<Decision>,
}

impl Schedule {
    /// The decision for `key`.
    pub fn decision(&self, key: &WorkloadKey) -> Option<&Decision> {
        self.decisions
            .binary_search_by(|d| d.workload.cmp(key))
            .ok()
            .map(|i| &self.decisions[i])
    }

    /// The resulting placement of every workload, as the next snapshot's
    /// `current`.
    pub fn placements(&self) -> BTreeMap<WorkloadKey, BTreeMap<String, u32>> {
        self.decisions
            .iter()
            .filter(|d| !d.placement.is_empty())
            .map(|d| (d.workload.clone(), d.placement.clone()))
            .collect()
    }
}

/// Places every workload of `snapshot`. See the module docs for the contract.
pub fn schedule(snapshot: &Snapshot, options: &Options) -> Schedule {
    Scheduler::new(snapshot, *options).run(None)
}

/// Places only the workloads named in `only`; every other workload keeps its
/// current placement, and the capacity it holds stays held. This is what the
/// controller runs when one workload changes or one data center fails: the
/// cost grows with the workloads placed, not with the whole pool.
///
/// Workloads outside `only` with a strictly lower priority may still be
/// preempted; the decisions name them in `preemptions` so the caller can
/// place them again.
pub fn schedule_only(
    snapshot: &Snapshot,
    only: &BTreeSet<WorkloadKey>,
    options: &Options,
) -> Schedule {
    Scheduler::new(snapshot, *options).run(Some(only))
}

/// A data center that passed the hard rules.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    dc: usize,
    /// Fallback group index (0 without groups).
    group: usize,
    /// Untolerated PreferNoSchedule taint: used last.
    discouraged: bool,
    /// Keeps what runs there but takes nothing new (cordoned or briefly unreachable).
    keep_only: bool,
    current: u32,
    /// Replicas that fit without preemption (capped by spread and keep-only).
    available: u32,
    /// Index into the workload's [`StaticParts`].
    part: usize,
    /// The free-capacity score, fixed before any eviction changes the room.
    free_part: u32,
    /// Weighted score.
    total: u64,
    domain: usize,
    /// StaticWeights weight.
    weight: u32,
    /// Position of the data center in name order: the last tie-break.
    rank: u32,
}

/// Score components that depend only on the data center and the rules,
/// normalised over one candidate set.
struct StaticParts {
    carbon: Vec<u32>,
    latency: Vec<u32>,
    locality: Vec<u32>,
    tier: Vec<u32>,
}

impl StaticParts {
    fn over(rules: &PlacementRules, dcs: &[DataCenter], set: &[usize]) -> Self {
        let normalise = |raw: Vec<u64>| {
            let (lo, hi) = raw
                .iter()
                .fold((u64::MAX, 0u64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            raw.into_iter()
                .map(|v| lower_is_better(v, lo, hi))
                .collect()
        };
        Self {
            carbon: normalise(set.iter().map(|&i| carbon_value(&dcs[i])).collect()),
            latency: normalise(set.iter().map(|&i| latency_value(rules, &dcs[i])).collect()),
            locality: set.iter().map(|&i| locality_part(rules, &dcs[i])).collect(),
            tier: set.iter().map(|&i| tier_part(rules, &dcs[i])).collect(),
        }
    }
}

/// What the hard rules that ignore current placement say about every data
/// center, for one class of workloads with the same rules. Computed once per
/// class and run: in a city most workloads share a handful of rule sets.
struct RuleClass {
    /// Per data center: `Ok((group, discouraged))` or the first rule that
    /// rejects it (the message is empty unless explaining).
    verdicts: Vec<Result<(usize, bool), (Rule, String)>>,
    /// The data centers that pass, in index order.
    pass: Vec<usize>,
    /// Rejections per rule among `verdicts`.
    rejected_by_rule: BTreeMap<Rule, u32>,
    /// Static score components over `pass`.
    parts: Rc<StaticParts>,
}

/// Everything the placement-independent rules and static scores read.
#[derive(PartialEq, Eq, Hash)]
struct ClassKey<'a> {
    required_tiers: &'a BTreeSet<Tier>,
    preferred_tiers: &'a BTreeSet<Tier>,
    allowed_regions: &'a BTreeSet<String>,
    fallback_groups: &'a [FallbackGroup],
    selector: &'a Option<Selector>,
    tolerations: &'a [Toleration],
    max_latency: &'a Option<(String, u32)>,
    required_datasets: &'a BTreeSet<String>,
    preferred_datasets: &'a BTreeSet<String>,
    gpu_count: u64,
    gpu_model: &'a Option<String>,
    static_weights: Option<&'a BTreeMap<String, u32>>,
}

impl<'a> ClassKey<'a> {
    fn of(workload: &'a Workload) -> Self {
        let rules = &workload.placement;
        Self {
            required_tiers: &rules.required_tiers,
            preferred_tiers: &rules.preferred_tiers,
            allowed_regions: &rules.allowed_regions,
            fallback_groups: &rules.fallback_groups,
            selector: &rules.selector,
            tolerations: &rules.tolerations,
            max_latency: &rules.max_latency,
            required_datasets: &rules.required_datasets,
            preferred_datasets: &rules.preferred_datasets,
            gpu_count: workload.demand.gpu_count,
            gpu_model: &workload.demand.gpu_model,
            static_weights: (rules.strategy == StrategyKind::StaticWeights)
                .then_some(&rules.static_weights),
        }
    }
}

/// Rule classes kept per run; past this, classes are evaluated and dropped,
/// so a snapshot where every workload is different costs time, not memory.
const MAX_CLASSES: usize = 1024;

/// `Scheduler::trouble` marks for the workload being placed.
const UNTROUBLED: u8 = 0;
const EXCLUDED: u8 = 1;
const KEEP_ONLY: u8 = 2;

struct Scheduler<'a> {
    snapshot: &'a Snapshot,
    options: Options,
    dc_index: HashMap<&'a str, usize>,
    committed: Vec<Resources>,
    held_total: Vec<Resources>,
    /// Held capacity per data center by priority, sorted by priority: a
    /// city has a handful of priorities, so a small vector beats a map.
    held_by_priority: Vec<Vec<(i32, Resources)>>,
    /// Capacity minus committed minus held, for CPU, memory and ephemeral
    /// storage: kept in step with `committed` and `held_total` so the hot
    /// loop reads one small array.
    free: Vec<[u64; 3]>,
    /// CPU and memory capacity per data center, as divisors; made on first
    /// use, since making one costs a 128-bit division.
    capacity_divisors: Vec<OnceCell<[Divisor; 2]>>,
    /// Current replicas per workload index, per data center index; reduced
    /// when a workload is preempted.
    current: Vec<Vec<(usize, u32)>>,
    zone_ids: Vec<usize>,
    region_ids: Vec<usize>,
    /// Each data center's position in name order: the last tie-break.
    name_rank: Vec<u32>,
    /// Cordoned or unreachable data centers: the only ones whose rules depend
    /// on what a workload runs there now.
    troubled: Vec<usize>,
    classes: HashMap<ClassKey<'a>, Rc<RuleClass>>,
    /// Scratch: the placed workload's current replicas per data center,
    /// zero everywhere between placements.
    here: Vec<u32>,
    /// Scratch: per troubled data center, what cordon and reachability say
    /// for the workload being placed; `UNTROUBLED` between placements.
    trouble: Vec<u8>,
}

/// A rejection message, built only when explaining: formatting a message for
/// each of a thousand data centers would dominate a large run.
macro_rules! msg {
    ($self:ident, $($arg:tt)*) => {
        if $self.options.explain { format!($($arg)*) } else { String::new() }
    };
}

const MILLI: u64 = 1000;
const GIB: u64 = 1 << 30;

/// The entry for `priority` in a list sorted by priority, made if missing.
fn held_at(by_priority: &mut Vec<(i32, Resources)>, priority: i32) -> &mut Resources {
    let i = match by_priority.binary_search_by_key(&priority, |(p, _)| *p) {
        Ok(i) => i,
        Err(i) => {
            by_priority.insert(i, (priority, Resources::default()));
            i
        }
    };
    &mut by_priority[i].1
}

/// Dense ids for equal keys, in first-seen order.
fn intern<K: std::hash::Hash + Eq>(keys: impl Iterator<Item = K>) -> Vec<usize> {
    let mut ids: HashMap<K, usize> = HashMap::new();
    keys.map(|key| {
        let next = ids.len();
        *ids.entry(key).or_insert(next)
    })
    .collect()
}

impl<'a> Scheduler<'a> {
    fn new(snapshot: &'a Snapshot, options: Options) -> Self {
        let dcs = &snapshot.data_centers;
        let dc_index: HashMap<&str, usize> = dcs
            .iter()
            .enumerate()
            .map(|(i, dc)| (dc.name.as_str(), i))
            .collect();
        let mut by_name: Vec<usize> = (0..dcs.len()).collect();
        by_name.sort_unstable_by(|&a, &b| dcs[a].name.cmp(&dcs[b].name));
        let mut name_rank = vec![0u32; dcs.len()];
        for (rank, &dc) in by_name.iter().enumerate() {
            name_rank[dc] = u32::try_from(rank).unwrap_or(u32::MAX);
        }
        let mut scheduler = Self {
            snapshot,
            options,
            committed: vec![Resources::default(); dcs.len()],
            held_total: vec![Resources::default(); dcs.len()],
            held_by_priority: vec![Vec::new(); dcs.len()],
            free: vec![[0; 3]; dcs.len()],
            capacity_divisors: vec![OnceCell::new(); dcs.len()],
            current: Vec::new(),
            zone_ids: intern(dcs.iter().map(|dc| (dc.region.as_str(), dc.zone.as_str()))),
            region_ids: intern(dcs.iter().map(|dc| dc.region.as_str())),
            dc_index,
            name_rank,
            troubled: (0..dcs.len())
                .filter(|&i| dcs[i].cordoned || dcs[i].reachability != Reachability::Reachable)
                .collect(),
            classes: HashMap::new(),
            here: vec![0; dcs.len()],
            trouble: vec![UNTROUBLED; dcs.len()],
        };
        // Walk the current placements once (a map lookup per workload would
        // compare keys a dozen times each).
        let index_of: HashMap<&WorkloadKey, usize> = snapshot
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (&w.key, i))
            .collect();
        scheduler.current = vec![Vec::new(); snapshot.workloads.len()];
        for (key, current) in &snapshot.current {
            let Some(&w) = index_of.get(key) else {
                continue;
            };
            let workload = &snapshot.workloads[w];
            for (name, &replicas) in current {
                if let Some(&dc) = scheduler.dc_index.get(name.as_str())
                    && replicas > 0
                {
                    scheduler.current[w].push((dc, replicas));
                    let res = demand_of(&dcs[dc], &workload.demand, u64::from(replicas));
                    scheduler.held_total[dc].add(&res);
                    held_at(&mut scheduler.held_by_priority[dc], workload.priority).add(&res);
                }
            }
        }
        for dc in 0..dcs.len() {
            scheduler.refresh_free(dc);
        }
        scheduler
    }

    fn refresh_free(&mut self, dc: usize) {
        let (cap, used, held) = (
            &self.snapshot.data_centers[dc].capacity,
            &self.committed[dc],
            &self.held_total[dc],
        );
        let left = |cap: u64, used: u64, held: u64| cap.saturating_sub(used).saturating_sub(held);
        self.free[dc] = [
            left(cap.cpu_millis, used.cpu_millis, held.cpu_millis),
            left(cap.memory_bytes, used.memory_bytes, held.memory_bytes),
            left(
                cap.ephemeral_bytes,
                used.ephemeral_bytes,
                held.ephemeral_bytes,
            ),
        ];
    }

    fn run(mut self, only: Option<&BTreeSet<WorkloadKey>>) -> Schedule {
        let workloads = &self.snapshot.workloads;
        let mut order: Vec<usize> = (0..workloads.len())
            .filter(|&w| only.is_none_or(|keys| keys.contains(&workloads[w].key)))
            .collect();
        order.sort_by(|&a, &b| {
            workloads[b]
                .priority
                .cmp(&workloads[a].priority)
                .then_with(|| workloads[a].key.cmp(&workloads[b].key))
        });
        let mut decided = vec![false; workloads.len()];
        let mut decisions = Vec::with_capacity(order.len());
        for w in order {
            self.release_holdings(w);
            let decision = self.place(w, &decided);
            decided[w] = true;
            for (name, replicas) in &decision.placement {
                let dc = self.dc_index[name.as_str()];
                let res = demand_of(
                    &self.snapshot.data_centers[dc],
                    &workloads[w].demand,
                    u64::from(*replicas),
                );
                self.committed[dc].add(&res);
                self.refresh_free(dc);
            }
            decisions.push(decision);
        }
        decisions.sort_by(|a, b| a.workload.cmp(&b.workload));
        Schedule { decisions }
    }

    fn release_holdings(&mut self, w: usize) {
        let workload = &self.snapshot.workloads[w];
        for i in 0..self.current[w].len() {
            let (dc, replicas) = self.current[w][i];
            let res = demand_of(
                &self.snapshot.data_centers[dc],
                &workload.demand,
                u64::from(replicas),
            );
            self.held_total[dc].sub(&res);
            held_at(&mut self.held_by_priority[dc], workload.priority).sub(&res);
            self.refresh_free(dc);
        }
    }

    fn rule_class(&mut self, workload: &'a Workload) -> Rc<RuleClass> {
        let key = ClassKey::of(workload);
        if let Some(class) = self.classes.get(&key) {
            return Rc::clone(class);
        }
        let dcs = &self.snapshot.data_centers;
        let verdicts: Vec<_> = dcs
            .iter()
            .map(|dc| self.static_rules(workload, dc))
            .collect();
        let pass: Vec<usize> = (0..dcs.len()).filter(|&i| verdicts[i].is_ok()).collect();
        let mut rejected_by_rule = BTreeMap::new();
        for (rule, _) in verdicts.iter().filter_map(|v| v.as_ref().err()) {
            *rejected_by_rule.entry(*rule).or_insert(0u32) += 1;
        }
        let class = Rc::new(RuleClass {
            parts: Rc::new(StaticParts::over(&workload.placement, dcs, &pass)),
            verdicts,
            pass,
            rejected_by_rule,
        });
        if self.classes.len() < MAX_CLASSES {
            self.classes.insert(key, Rc::clone(&class));
        }
        class
    }

    fn place(&mut self, w: usize, decided: &[bool]) -> Decision {
        let snapshot = self.snapshot;
        let dcs = &snapshot.data_centers;
        let workload = &snapshot.workloads[w];
        let rules = &workload.placement;
        let explain = self.options.explain;
        let class = self.rule_class(workload);
        for &(dc, replicas) in &self.current[w] {
            self.here[dc] = replicas;
        }
        let mut rejections: Vec<(u32, Rejection)> = Vec::new();
        let mut rejected_by_rule = class.rejected_by_rule.clone();

        // Filter. Cordon and reachability come first and depend on what runs
        // where now; every other hard rule comes from the class.
        let mut same_set = true;
        for t in 0..self.troubled.len() {
            let dc = self.troubled[t];
            match self.trouble_rules(workload, &dcs[dc], self.here[dc]) {
                Ok(keep_only) => {
                    if keep_only {
                        self.trouble[dc] = KEEP_ONLY;
                    }
                }
                Err((rule, message)) => {
                    self.trouble[dc] = EXCLUDED;
                    match &class.verdicts[dc] {
                        Ok(_) => same_set = false,
                        Err((static_rule, _)) => {
                            if let Some(n) = rejected_by_rule.get_mut(static_rule) {
                                *n -= 1;
                                if *n == 0 {
                                    rejected_by_rule.remove(static_rule);
                                }
                            }
                        }
                    }
                    *rejected_by_rule.entry(rule).or_insert(0) += 1;
                    if explain {
                        rejections.push(self.rejection(dc, rule, message, None));
                    }
                }
            }
        }
        if explain {
            for (dc, verdict) in class.verdicts.iter().enumerate() {
                if let Err((rule, message)) = verdict
                    && self.trouble[dc] != EXCLUDED
                {
                    rejections.push(self.rejection(dc, *rule, message.clone(), None));
                }
            }
        }
        let set: Vec<usize>;
        let parts = if same_set {
            set = Vec::new();
            Rc::clone(&class.parts)
        } else {
            set = class
                .pass
                .iter()
                .copied()
                .filter(|&dc| self.trouble[dc] != EXCLUDED)
                .collect();
            Rc::new(StaticParts::over(rules, dcs, &set))
        };
        drop(set);

        // Capacity without preemption, then scores.
        let weights = rules.weights;
        let demand = &workload.demand;
        let mut candidates = Vec::with_capacity(class.pass.len());
        let mut costs = Vec::with_capacity(class.pass.len());
        let per_replica = [
            Divisor::new(demand.cpu_millis),
            Divisor::new(demand.memory_bytes),
            Divisor::new(demand.ephemeral_bytes),
        ];
        for &dc in &class.pass {
            if self.trouble[dc] == EXCLUDED {
                continue;
            }
            let Ok((group, discouraged)) = class.verdicts[dc] else {
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
                rank: self.name_rank[dc],
            };
            c.available = self.cap_available(workload, &c, self.fit(dc, demand, &per_replica));
            costs.push(cost_value(demand, &dcs[dc]));
            candidates.push(c);
        }
        for &dc in &self.troubled {
            self.trouble[dc] = UNTROUBLED;
        }
        for &(dc, _) in &self.current[w] {
            self.here[dc] = 0;
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
        let breakdown = |c: &Candidate| ScoreBreakdown {
            free_capacity: c.free_part,
            cost: lower_is_better(costs[c.part], cost_range.0, cost_range.1),
            carbon: parts.carbon[c.part],
            latency: parts.latency[c.part],
            locality: parts.locality[c.part],
            tier: parts.tier[c.part],
            total: c.total,
        };

        // Divide. The Score strategy without domain bounds only ever reads
        // the best few candidates and the ones already running replicas, so
        // only those are ordered, unless that turns out not to be enough.
        // Divide. Without domain bounds, Score reads only the best few
        // candidates and those already running replicas, and
        // AvailableCapacity over one fallback group reads the order only to
        // trim running replicas; so only that much is ordered, and everything
        // is when the shortcut turns out not to hold.
        let shortcut = !self.options.exhaustive
            && rules.spread.min_domains.is_none()
            && rules.spread.max_domains.is_none()
            && (rules.rebalance == RebalanceMode::Never || rules.fallback_groups.is_empty());
        let one_class = candidates
            .windows(2)
            .all(|p| (p[0].discouraged, p[0].group) == (p[1].discouraged, p[1].group));
        let wanted = desired_total(workload);
        let ordered = match rules.strategy {
            StrategyKind::Score if shortcut => {
                let best = usize::try_from(workload.replicas)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(2)
                    .saturating_add(8);
                Some(order_prefix(&mut candidates, best))
            }
            StrategyKind::AvailableCapacity if shortcut && one_class => {
                order_prefix(&mut candidates, 0);
                None
            }
            _ => {
                sort_in_fill_order(&mut candidates);
                None
            }
        };
        let mut assignment = divide(workload, &candidates);
        let beyond_prefix_untouched = ordered.is_none_or(|prefix| {
            candidates[prefix..]
                .iter()
                .zip(&assignment[prefix..])
                .all(|(c, &a)| a <= c.current.min(c.available))
        });
        if ordered != Some(candidates.len())
            && (placed_total(workload, &assignment) < wanted || !beyond_prefix_untouched)
        {
            sort_in_fill_order(&mut candidates);
            assignment = divide(workload, &candidates);
        }

        let mut preempting = false;
        if placed_total(workload, &assignment) < wanted
            && workload.preemption == PreemptionPolicy::PreemptLowerPriority
        {
            let mut with_preemption = candidates.clone();
            for c in &mut with_preemption {
                let dc = &dcs[c.dc];
                let free = self.free_with_preemption(c.dc, workload.priority);
                c.available = self.cap_available(workload, c, fits(dc, &free, &workload.demand));
            }
            let better = divide(workload, &with_preemption);
            if placed_total(workload, &better) > placed_total(workload, &assignment) {
                preempting = true;
                candidates = with_preemption;
                assignment = better;
            }
        }

        let mut reason = None;
        let placed = placed_total(workload, &assignment);
        if rules.gang && placed < wanted {
            reason = Some(format!(
                "gang: only {placed} of {wanted} replicas fit, so none are placed"
            ));
            assignment.iter_mut().for_each(|a| *a = 0);
            preempting = false;
        }
        // Evict only once the placement that needs it is final: a gang that
        // does not fit whole must not cost anybody their replicas.
        let preemptions = if preempting {
            self.evict(w, &candidates, &assignment, decided)
        } else {
            Vec::new()
        };

        // Explain and assemble.
        let mut placement = BTreeMap::new();
        let mut scores = BTreeMap::new();
        let chosen = || candidates.iter().zip(&assignment).filter(|(_, a)| **a > 0);
        let chosen_best_group = chosen().map(|(c, _)| c.group).max();
        let lowest_chosen = chosen().map(|(c, _)| c.total).min();
        let used_domains: BTreeSet<usize> = if rules.spread.max_domains.is_some() {
            chosen().map(|(c, _)| c.domain).collect()
        } else {
            BTreeSet::new()
        };
        for (c, &a) in candidates.iter().zip(&assignment) {
            let dc = &dcs[c.dc];
            if a > 0 {
                placement.insert(dc.name.clone(), a);
                scores.insert(dc.name.clone(), breakdown(c));
                continue;
            }
            let (rule, message) = if c.available == 0 && c.keep_only {
                (
                    if dc.cordoned {
                        Rule::Cordoned
                    } else {
                        Rule::Unreachable
                    },
                    msg!(self, "takes no new replicas"),
                )
            } else if c.available == 0 {
                (
                    Rule::Capacity,
                    if explain {
                        capacity_message(dc, &workload.demand, self, c.dc)
                    } else {
                        String::new()
                    },
                )
            } else if rules.gang && placed < wanted {
                (Rule::Capacity, msg!(self, "gang could not be placed whole"))
            } else if let Some(max) = rules.spread.max_domains
                && !used_domains.contains(&c.domain)
                && used_domains.len() >= max as usize
            {
                (
                    Rule::Spread,
                    msg!(
                        self,
                        "spread allows at most {max} {:?} domains",
                        rules.spread.by
                    ),
                )
            } else if chosen_best_group.is_some_and(|g| c.group > g) {
                (
                    Rule::Fallback,
                    msg!(
                        self,
                        "fallback group `{}` not needed: an earlier group had room",
                        group_name(workload, c.group)
                    ),
                )
            } else {
                (
                    Rule::Score,
                    msg!(
                        self,
                        "scored {} against {} for the lowest chosen data center",
                        c.total,
                        lowest_chosen.unwrap_or(0)
                    ),
                )
            };
            *rejected_by_rule.entry(rule).or_insert(0) += 1;
            if explain {
                let score = matches!(rule, Rule::Score | Rule::Fallback | Rule::Spread)
                    .then(|| breakdown(c));
                rejections.push(self.rejection(c.dc, rule, message, score));
            }
        }
        rejections.sort_unstable_by_key(|(rank, _)| *rank);
        let rejections = rejections.into_iter().map(|(_, r)| r).collect();

        let placed = placed_total(workload, &assignment);
        let outcome = if wanted == 0 && workload.replicas == 0 {
            Outcome::Scheduled
        } else if placed == 0 {
            Outcome::Unschedulable
        } else if placed < wanted {
            Outcome::PartiallyScheduled
        } else {
            Outcome::Scheduled
        };
        if outcome != Outcome::Scheduled && reason.is_none() {
            reason = Some(unscheduled_reason(
                workload,
                placed,
                wanted,
                &candidates,
                &rejected_by_rule,
                dcs.len(),
            ));
        }
        let moved_replicas = self.current[w]
            .iter()
            .map(|(dc, cur)| {
                let now = placement.get(&dcs[*dc].name).copied().unwrap_or(0);
                cur.saturating_sub(now)
            })
            .sum();
        Decision {
            workload: workload.key.clone(),
            placement,
            desired: workload.replicas,
            outcome,
            reason,
            rejections,
            rejected_by_rule,
            scores,
            preemptions,
            moved_replicas,
        }
    }

    /// A rejection keyed by the data center's name rank, for sorting.
    fn rejection(
        &self,
        dc: usize,
        rule: Rule,
        message: String,
        score: Option<ScoreBreakdown>,
    ) -> (u32, Rejection) {
        (
            self.name_rank[dc],
            Rejection {
                data_center: self.snapshot.data_centers[dc].name.clone(),
                rule,
                message,
                score,
            },
        )
    }

    /// Cordon and reachability, the rules that depend on what the workload
    /// runs in `dc` now (`here`). `Ok(keep_only)`.
    fn trouble_rules(
        &self,
        workload: &Workload,
        dc: &DataCenter,
        here: u32,
    ) -> Result<bool, (Rule, String)> {
        let mut keep_only = false;
        if let Reachability::UnreachableSince(since) = dc.reachability {
            let down = self.snapshot.now_unix.saturating_sub(since).max(0);
            if down >= i64::from(workload.grace_period_seconds) {
                return Err((
                    Rule::Unreachable,
                    msg!(
                        self,
                        "unreachable for {down}s, past the {}s grace period",
                        workload.grace_period_seconds
                    ),
                ));
            }
            if here == 0 {
                return Err((
                    Rule::Unreachable,
                    msg!(self, "unreachable for {down}s; takes no new replicas"),
                ));
            }
            keep_only = true;
        }
        if dc.cordoned {
            if here == 0 {
                return Err((Rule::Cordoned, msg!(self, "cordoned")));
            }
            keep_only = true;
        }
        Ok(keep_only)
    }

    /// The hard rules after cordon and reachability, in order; they read
    /// only what [`ClassKey`] holds. `Ok((group, discouraged))`.
    fn static_rules(
        &self,
        workload: &Workload,
        dc: &DataCenter,
    ) -> Result<(usize, bool), (Rule, String)> {
        let rules = &workload.placement;
        if !rules.required_tiers.is_empty() && !rules.required_tiers.contains(&dc.tier) {
            return Err((
                Rule::Tier,
                msg!(
                    self,
                    "tier {:?} is not one of the required tiers {:?}",
                    dc.tier,
                    rules.required_tiers
                ),
            ));
        }
        if !rules.allowed_regions.is_empty() && !rules.allowed_regions.contains(&dc.region) {
            return Err((
                Rule::Region,
                msg!(
                    self,
                    "region `{}` is outside the allowed regions {:?}",
                    dc.region,
                    rules.allowed_regions
                ),
            ));
        }
        let group = if rules.fallback_groups.is_empty() {
            0
        } else {
            match rules.fallback_groups.iter().position(|g| g.contains(dc)) {
                Some(g) => g,
                None => {
                    return Err((
                        Rule::FallbackGroup,
                        msg!(self, "in none of the fallback groups"),
                    ));
                }
            }
        };
        if let Some(selector) = &rules.selector
            && !selector.matches(&dc.labels)
        {
            return Err((
                Rule::Selector,
                msg!(self, "labels do not match dataCenterSelector"),
            ));
        }
        let untolerated = |effect: TaintEffect| {
            dc.taints.iter().find(|t| {
                t.effect == effect && !rules.tolerations.iter().any(|tol| tol.tolerates(t))
            })
        };
        if let Some(taint) = untolerated(TaintEffect::NoSchedule) {
            return Err((
                Rule::Taint,
                msg!(self, "taint `{}` (NoSchedule) is not tolerated", taint.key),
            ));
        }
        if let Some(missing) = rules
            .required_datasets
            .iter()
            .find(|d| !dc.datasets.contains(*d))
        {
            return Err((
                Rule::Dataset,
                msg!(self, "does not host required dataset `{missing}`"),
            ));
        }
        if let Some((site, max_ms)) = &rules.max_latency {
            match dc.latency_ms.get(site) {
                None => {
                    return Err((
                        Rule::Latency,
                        msg!(self, "no latency known to site `{site}`"),
                    ));
                }
                Some(ms) if ms > max_ms => {
                    return Err((
                        Rule::Latency,
                        msg!(self, "{ms} ms to `{site}` exceeds the {max_ms} ms bound"),
                    ));
                }
                Some(_) => {}
            }
        }
        let demand = &workload.demand;
        if demand.gpu_count > 0 {
            let has = match &demand.gpu_model {
                Some(model) => dc.capacity.gpus.get(model).copied().unwrap_or(0),
                None => dc.capacity.gpus.values().copied().max().unwrap_or(0),
            };
            if has < demand.gpu_count {
                return Err((
                    Rule::Gpu,
                    match &demand.gpu_model {
                        Some(model) => msg!(
                            self,
                            "has {has} `{model}` GPUs; a replica needs {}",
                            demand.gpu_count
                        ),
                        None => msg!(self, "has no GPU model with {} GPUs", demand.gpu_count),
                    },
                ));
            }
        }
        if rules.strategy == StrategyKind::StaticWeights
            && rules.static_weights.get(&dc.name).copied().unwrap_or(0) == 0
        {
            return Err((Rule::StaticWeight, msg!(self, "has no static weight")));
        }
        let discouraged = untolerated(TaintEffect::PreferNoSchedule).is_some();
        Ok((group, discouraged))
    }

    /// Replicas of `demand` that fit in data center `i` next to what is
    /// committed and held, without allocating.
    fn fit(&self, i: usize, demand: &ReplicaDemand, per_replica: &[Divisor; 3]) -> u64 {
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

    fn domain(&self, dc: usize, by: SpreadDomain) -> usize {
        match by {
            SpreadDomain::DataCenter => dc,
            SpreadDomain::Zone => self.zone_ids[dc],
            SpreadDomain::Region => self.region_ids[dc],
        }
    }

    fn cap_available(&self, workload: &Workload, c: &Candidate, fit: u64) -> u32 {
        let mut available = u32::try_from(fit).unwrap_or(u32::MAX);
        if let Some(max) = workload.placement.spread.max_replicas_per_data_center {
            available = available.min(max);
        }
        if c.keep_only {
            available = available.min(c.current);
        }
        available
    }

    fn free_with_preemption(&self, dc: usize, priority: i32) -> Resources {
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
    fn evict(
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

/// Price of one replica per hour in `dc`, in minor units.
fn cost_value(demand: &ReplicaDemand, dc: &DataCenter) -> u64 {
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

/// Carbon intensity × PUE; unknown intensity ranks last.
fn carbon_value(dc: &DataCenter) -> u64 {
    dc.carbon_intensity
        .map_or(u64::MAX, |g| u64::from(g) * u64::from(dc.pue_milli))
}

fn latency_value(rules: &PlacementRules, dc: &DataCenter) -> u64 {
    rules
        .max_latency
        .as_ref()
        .and_then(|(site, _)| dc.latency_ms.get(site))
        .map_or(0, |ms| u64::from(*ms))
}

fn locality_part(rules: &PlacementRules, dc: &DataCenter) -> u32 {
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

fn tier_part(rules: &PlacementRules, dc: &DataCenter) -> u32 {
    if rules.preferred_tiers.is_empty() || rules.preferred_tiers.contains(&dc.tier) {
        100
    } else {
        0
    }
}

/// Resources for `n` replicas of `demand` in `dc`. "Any GPU model" means the
/// data center's most plentiful model (ties by name), chosen the same way
/// every time so accounting stays consistent.
fn demand_of(dc: &DataCenter, demand: &ReplicaDemand, n: u64) -> Resources {
    let mut gpus = BTreeMap::new();
    if demand.gpu_count > 0 {
        let model = demand.gpu_model.clone().or_else(|| any_gpu_model(dc));
        if let Some(model) = model {
            gpus.insert(model, demand.gpu_count.saturating_mul(n));
        }
    }
    Resources {
        cpu_millis: demand.cpu_millis.saturating_mul(n),
        memory_bytes: demand.memory_bytes.saturating_mul(n),
        ephemeral_bytes: demand.ephemeral_bytes.saturating_mul(n),
        gpus,
    }
}

fn any_gpu_model(dc: &DataCenter) -> Option<String> {
    dc.capacity
        .gpus
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(model, _)| model.clone())
}

/// How many replicas of `demand` fit in `free`.
fn fits(dc: &DataCenter, free: &Resources, demand: &ReplicaDemand) -> u64 {
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

/// Percent of CPU and memory capacity (the smaller) left after one more
/// replica. `capacity` holds the CPU and memory capacities as divisors.
fn free_share(
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

/// A divisor fixed for many divisions, replaced by a multiplication: the
/// engine divides by each data center's capacity and each workload's demand
/// thousands of times per run. Exact, like `/`.
#[derive(Clone, Copy)]
struct Divisor(Option<StrengthReducedU64>);

impl Divisor {
    fn new(divisor: u64) -> Self {
        Self((divisor != 0).then(|| StrengthReducedU64::new(divisor)))
    }

    fn is_zero(&self) -> bool {
        self.0.is_none()
    }

    /// `n / divisor`, or `u64::MAX` for a zero divisor (no limit).
    fn div(&self, n: u64) -> u64 {
        self.0.map_or(u64::MAX, |d| n / d)
    }
}

fn lower_is_better(v: u64, lo: u64, hi: u64) -> u32 {
    if hi <= lo {
        return 100;
    }
    u32::try_from((hi - v.min(hi)).saturating_mul(100) / (hi - lo)).unwrap_or(0)
}

/// Sorts candidates in the order they are filled: tolerated before
/// discouraged, earlier fallback groups first, higher score first, then by
/// name. The name makes every key unique, so an unstable sort is
/// deterministic; sorting packed keys and then moving each candidate once is
/// several times faster than sorting the candidates themselves.
fn sort_in_fill_order(candidates: &mut Vec<Candidate>) {
    let mut keys: Vec<(u128, u32)> = keyed(candidates);
    keys.sort_unstable();
    let order: Vec<u32> = keys.iter().map(|&(_, i)| i).collect();
    permute(candidates, &order);
}

/// Orders only part of the candidates: the `best` first in fill order, then
/// the others already running replicas in fill order (trimming reads them
/// from the back), then the rest in any order. Returns the length of the
/// ordered best prefix. The caller checks that the division did not reach
/// past what was ordered.
fn order_prefix(candidates: &mut Vec<Candidate>, best: usize) -> usize {
    let n = candidates.len();
    let best = best.min(n);
    if best == n {
        sort_in_fill_order(candidates);
        return n;
    }
    let mut keys = keyed(candidates);
    if best > 0 {
        keys.select_nth_unstable(best);
    }
    let (top, rest) = keys.split_at_mut(best);
    top.sort_unstable();
    let (mut holders, others): (Vec<_>, Vec<_>) = rest
        .iter()
        .partition(|(_, i)| candidates[*i as usize].current > 0);
    holders.sort_unstable();
    let order: Vec<u32> = top
        .iter()
        .chain(&holders)
        .chain(&others)
        .map(|&(_, i)| i)
        .collect();
    permute(candidates, &order);
    best
}

fn keyed(candidates: &[Candidate]) -> Vec<(u128, u32)> {
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (fill_key(c), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect()
}

fn permute(candidates: &mut Vec<Candidate>, order: &[u32]) {
    let ordered: Vec<Candidate> = order.iter().map(|&i| candidates[i as usize]).collect();
    *candidates = ordered;
}

/// Packs the fill order into one integer: discouraged (1 bit), fallback
/// group (31 bits), inverted score (64 bits), name rank (32 bits).
fn fill_key(c: &Candidate) -> u128 {
    let group = u128::try_from(c.group.min(0x7fff_ffff)).unwrap_or(0x7fff_ffff);
    (u128::from(c.discouraged) << 127)
        | (group << 96)
        | (u128::from(u64::MAX - c.total) << 32)
        | u128::from(c.rank)
}

fn group_name(workload: &Workload, group: usize) -> String {
    workload
        .placement
        .fallback_groups
        .get(group)
        .map_or_else(|| group.to_string(), |g| g.name.clone())
}

fn desired_total(workload: &Workload) -> u32 {
    if workload.placement.strategy == StrategyKind::Duplicated {
        // Duplicated is complete when at least the minimum number of domains
        // runs a full copy; `placed_total` counts domains the same way.
        workload.placement.spread.min_domains.unwrap_or(1).max(1) * workload.replicas
    } else {
        workload.replicas
    }
}

fn placed_total(workload: &Workload, assignment: &[u32]) -> u32 {
    if workload.placement.strategy == StrategyKind::Duplicated {
        let copies = u32::try_from(assignment.iter().filter(|a| **a > 0).count()).unwrap_or(0);
        let min = workload.placement.spread.min_domains.unwrap_or(1).max(1);
        copies.min(min) * workload.replicas
    } else {
        assignment.iter().sum()
    }
}

/// Divides replicas among `candidates` (already in fill order). Returns the
/// replicas per candidate.
fn divide(workload: &Workload, candidates: &[Candidate]) -> Vec<u32> {
    let max_domains = workload.placement.spread.max_domains;
    // Spread: pick the domains that may be used — running ones first, then in
    // fill order. If that leaves replicas unplaced, the roomiest domains may
    // do better: take whichever places more.
    let Some(max) = max_domains else {
        return divide_within(workload, candidates, None);
    };
    let preferred = divide_within(
        workload,
        candidates,
        Some(&allowed_domains(workload, candidates, max, false)),
    );
    if placed_total(workload, &preferred) >= desired_total(workload) {
        return preferred;
    }
    let roomiest = divide_within(
        workload,
        candidates,
        Some(&allowed_domains(workload, candidates, max, true)),
    );
    if placed_total(workload, &roomiest) > placed_total(workload, &preferred) {
        roomiest
    } else {
        preferred
    }
}

fn divide_within(
    workload: &Workload,
    candidates: &[Candidate],
    allowed: Option<&BTreeSet<usize>>,
) -> Vec<u32> {
    let rules = &workload.placement;
    let available: Vec<u32> = candidates
        .iter()
        .map(|c| {
            if allowed.is_none_or(|a| a.contains(&c.domain)) {
                c.available
            } else {
                0
            }
        })
        .collect();
    let mut assignment = match rules.strategy {
        StrategyKind::Duplicated => candidates
            .iter()
            .zip(&available)
            .map(|(_, &a)| {
                if a >= workload.replicas && workload.replicas > 0 {
                    workload.replicas
                } else {
                    0
                }
            })
            .collect(),
        StrategyKind::StaticWeights => divide_static(workload, candidates, &available),
        StrategyKind::AvailableCapacity | StrategyKind::Score => {
            divide_stable(workload, candidates, &available)
        }
    };
    if rules.strategy != StrategyKind::Duplicated {
        enforce_min_domains(workload, candidates, &available, &mut assignment);
    }
    assignment
}

/// The at most `max` spread domains a workload may use.
///
/// Only domains the workload can use count: with Duplicated, one where a
/// whole copy fits. Counting a domain that then takes nothing would let the
/// choice swing with scores from one round to the next.
fn allowed_domains(
    workload: &Workload,
    candidates: &[Candidate],
    max: u32,
    by_room: bool,
) -> BTreeSet<usize> {
    let usable = |c: &&Candidate| {
        if workload.placement.strategy == StrategyKind::Duplicated {
            workload.replicas > 0 && c.available >= workload.replicas
        } else {
            c.available > 0
        }
    };
    let mut order: Vec<&Candidate> = candidates.iter().filter(usable).collect();
    let mut room: HashMap<usize, u64> = HashMap::new();
    for c in &order {
        *room.entry(c.domain).or_default() += u64::from(c.available);
    }
    // Stable sorts keep fill order within each class.
    if by_room {
        order.sort_by_key(|c| std::cmp::Reverse(room[&c.domain]));
    }
    order.sort_by_key(|c| c.current == 0);
    // A divided workload that runs where it can stay keeps to those
    // domains: adding one because it now scores better would move replicas
    // in an unchanged world.
    let spread = &workload.placement.spread;
    let running_suffice = |allowed: &BTreeSet<usize>| {
        workload.placement.strategy != StrategyKind::Duplicated
            && allowed.iter().map(|d| room[d]).sum::<u64>() >= u64::from(workload.replicas)
            && allowed.len() >= spread.min_domains.unwrap_or(0) as usize
    };
    let mut allowed = BTreeSet::new();
    let mut any_running = false;
    for c in order {
        if allowed.contains(&c.domain) {
            continue;
        }
        if allowed.len() >= max as usize {
            break;
        }
        if c.current == 0 && any_running && running_suffice(&allowed) {
            break;
        }
        any_running |= c.current > 0;
        allowed.insert(c.domain);
    }
    allowed
}

fn divide_static(workload: &Workload, candidates: &[Candidate], available: &[u32]) -> Vec<u32> {
    let weights: Vec<u64> = candidates
        .iter()
        .zip(available)
        .map(|(c, &a)| if a == 0 { 0 } else { u64::from(c.weight) })
        .collect();
    let total_weight: u64 = weights.iter().sum();
    let replicas = u64::from(workload.replicas);
    let mut assignment = vec![0u32; candidates.len()];
    if total_weight == 0 {
        return assignment;
    }
    // Largest remainder: exact shares, then leftovers by biggest remainder.
    let mut remainders: Vec<(u64, usize)> = Vec::new();
    let mut given = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        let share = replicas * w / total_weight;
        assignment[i] = u32::try_from(share).unwrap_or(u32::MAX);
        given += share;
        if w > 0 {
            remainders.push((replicas * w % total_weight, i));
        }
    }
    // Ties go to data centers already running more than their exact share,
    // so an unchanged world keeps its placement.
    remainders.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| {
                let keeps = |i: usize| candidates[i].current > assignment[i];
                keeps(b.1).cmp(&keeps(a.1))
            })
            .then(a.1.cmp(&b.1))
    });
    for (_, i) in remainders.iter().cycle().take((replicas - given) as usize) {
        assignment[*i] += 1;
    }
    // Clamp to what fits; hand overflow to the heaviest with room.
    let mut overflow = 0u32;
    for (i, a) in assignment.iter_mut().enumerate() {
        if *a > available[i] {
            overflow += *a - available[i];
            *a = available[i];
        }
    }
    let mut by_weight: Vec<usize> = (0..candidates.len()).filter(|&i| weights[i] > 0).collect();
    by_weight.sort_by(|&a, &b| weights[b].cmp(&weights[a]).then(a.cmp(&b)));
    // Overflow first restores replicas where they run now, so an unchanged
    // world hands it out exactly as last time; then the heaviest with room.
    for restoring in [true, false] {
        for &i in &by_weight {
            if overflow == 0 {
                break;
            }
            let room = available[i] - assignment[i];
            let room = if restoring {
                room.min(candidates[i].current.saturating_sub(assignment[i]))
            } else {
                room
            };
            let give = room.min(overflow);
            assignment[i] += give;
            overflow -= give;
        }
    }
    assignment
}

fn divide_stable(workload: &Workload, candidates: &[Candidate], available: &[u32]) -> Vec<u32> {
    let rules = &workload.placement;
    let desired = workload.replicas;
    // Keep what runs where it still may.
    let mut assignment: Vec<u32> = candidates
        .iter()
        .zip(available)
        .map(|(c, &a)| c.current.min(a))
        .collect();
    // Optional rebalancing towards earlier fallback groups.
    if rules.rebalance == RebalanceMode::WhenBetterGroupHasRoom {
        let mut budget = rules.max_moves_per_round.unwrap_or(u32::MAX);
        for i in (0..candidates.len()).rev() {
            let group = candidates[i].group;
            let room: u32 = (0..candidates.len())
                .filter(|&j| candidates[j].group < group && !candidates[j].keep_only)
                .map(|j| available[j] - assignment[j])
                .sum();
            let release = assignment[i].min(room).min(budget);
            assignment[i] -= release;
            budget -= release;
        }
    }
    // Scale down: trim from the back of the fill order.
    let mut kept: u32 = assignment.iter().sum();
    for i in (0..candidates.len()).rev() {
        if kept <= desired {
            break;
        }
        let trim = assignment[i].min(kept - desired);
        assignment[i] -= trim;
        kept -= trim;
    }
    let mut remaining = desired - kept;
    let headroom = |i: usize, assignment: &[u32]| {
        if candidates[i].keep_only {
            0
        } else {
            available[i] - assignment[i]
        }
    };
    match rules.strategy {
        StrategyKind::AvailableCapacity => {
            // Group by group, in proportion to headroom.
            let mut start = 0;
            while start < candidates.len() && remaining > 0 {
                let key = (candidates[start].discouraged, candidates[start].group);
                let end = (start..candidates.len())
                    .find(|&i| (candidates[i].discouraged, candidates[i].group) != key)
                    .unwrap_or(candidates.len());
                let rooms: Vec<u64> = (start..end)
                    .map(|i| u64::from(headroom(i, &assignment)))
                    .collect();
                let total: u64 = rooms.iter().sum();
                if total <= u64::from(remaining) {
                    for (k, i) in (start..end).enumerate() {
                        assignment[i] += u32::try_from(rooms[k]).unwrap_or(0);
                    }
                    remaining -= u32::try_from(total).unwrap_or(remaining);
                } else {
                    let r = u64::from(remaining);
                    let mut given = 0u64;
                    let total = Divisor::new(total);
                    for (k, i) in (start..end).enumerate() {
                        let share = total.div(r * rooms[k]);
                        assignment[i] += u32::try_from(share).unwrap_or(0);
                        given += share;
                    }
                    let mut leftover = r - given;
                    // Leftovers go one each to the roomiest; only that many
                    // need ordering.
                    // Ties by fill order, which is the slice order when the
                    // slice is sorted; the key keeps it when it is not.
                    let mut order: Vec<(std::cmp::Reverse<u32>, u128, usize)> = (start..end)
                        .map(|i| {
                            (
                                std::cmp::Reverse(headroom(i, &assignment)),
                                fill_key(&candidates[i]),
                                i,
                            )
                        })
                        .collect();
                    let wanted = usize::try_from(leftover).unwrap_or(usize::MAX);
                    if wanted < order.len() {
                        order.select_nth_unstable(wanted);
                        order.truncate(wanted + 1);
                    }
                    order.sort_unstable();
                    for (_, _, i) in order {
                        if leftover == 0 {
                            break;
                        }
                        if headroom(i, &assignment) > 0 {
                            assignment[i] += 1;
                            leftover -= 1;
                        }
                    }
                    remaining = 0;
                }
                start = end;
            }
        }
        _ => {
            for i in 0..candidates.len() {
                if remaining == 0 {
                    break;
                }
                let give = headroom(i, &assignment).min(remaining);
                assignment[i] += give;
                remaining -= give;
            }
        }
    }
    assignment
}

/// Moves single replicas into unused domains until `minDomains` holds, taking
/// them from the fullest data center.
fn enforce_min_domains(
    workload: &Workload,
    candidates: &[Candidate],
    available: &[u32],
    assignment: &mut [u32],
) {
    let Some(min) = workload.placement.spread.min_domains else {
        return;
    };
    let mut used: BTreeSet<usize> = candidates
        .iter()
        .zip(assignment.iter())
        .filter(|(_, a)| **a > 0)
        .map(|(c, _)| c.domain)
        .collect();
    for i in 0..candidates.len() {
        if used.len() >= min as usize {
            return;
        }
        let c = &candidates[i];
        if used.contains(&c.domain) || available[i] == 0 || c.keep_only {
            continue;
        }
        let donor = (0..candidates.len())
            .filter(|&j| assignment[j] > 1)
            .max_by(|&a, &b| assignment[a].cmp(&assignment[b]).then(b.cmp(&a)));
        let Some(donor) = donor else { return };
        assignment[donor] -= 1;
        assignment[i] += 1;
        used.insert(c.domain);
    }
}

fn capacity_message(
    dc: &DataCenter,
    demand: &ReplicaDemand,
    s: &Scheduler<'_>,
    i: usize,
) -> String {
    let free = dc
        .capacity
        .saturating_sub(&s.committed[i])
        .saturating_sub(&s.held_total[i]);
    format!(
        "free {}m CPU / {} MiB memory{}; one replica needs {}m CPU / {} MiB{}",
        free.cpu_millis,
        free.memory_bytes >> 20,
        if demand.gpu_count > 0 {
            format!(" / {:?} GPUs", free.gpus)
        } else {
            String::new()
        },
        demand.cpu_millis,
        demand.memory_bytes >> 20,
        if demand.gpu_count > 0 {
            format!(" / {} GPUs", demand.gpu_count)
        } else {
            String::new()
        },
    )
}

fn unscheduled_reason(
    workload: &Workload,
    placed: u32,
    wanted: u32,
    candidates: &[Candidate],
    rejected_by_rule: &BTreeMap<Rule, u32>,
    total: usize,
) -> String {
    if wanted == 0 {
        return "no replicas requested".to_owned();
    }
    let by_rule = rejected_by_rule
        .iter()
        .map(|(rule, n)| format!("{rule:?}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    if candidates.is_empty() {
        return format!("no data center passes the hard rules (of {total} rejected — {by_rule})");
    }
    if workload.placement.strategy == StrategyKind::Duplicated {
        let min = workload.placement.spread.min_domains.unwrap_or(1);
        return format!(
            "Duplicated needs {min} data center(s) with room for {} replicas each; \
             {} passed the hard rules but too few have room ({by_rule})",
            workload.replicas,
            candidates.len()
        );
    }
    let room: u64 = candidates.iter().map(|c| u64::from(c.available)).sum();
    format!(
        "only {placed} of {wanted} replicas fit: {} data center(s) pass the hard rules with room for {room} replicas in total ({by_rule})",
        candidates.len()
    )
}
