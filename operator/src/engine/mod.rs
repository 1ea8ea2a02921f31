//! The placement engine: `schedule(snapshot) -> decisions`.
//!
//! A pure function with no I/O. The controller feeds it from its caches, and
//! `civicgrid-operator plan` feeds it from manifests on disk.
//!
//! # Expected flow
//! Workloads are decided one at a time in priority order (higher first, ties
//! by namespace/name). For each, `Scheduler::place` runs five stages, each a
//! module: `filter` every data center through the hard rules (the first
//! failing rule is the reason it was rejected), `score` the survivors,
//! `divide` the replicas by the workload's strategy, `preempt` strictly
//! lower priorities if it still does not fit and its policy allows, then
//! `explain` every data center that got nothing. Once every workload of a
//! priority is decided, those that fell short before another of their
//! priority gave up room they may use (scaling down, moving, a gang that no
//! longer fits whole) are decided again, in order, with what they placed
//! counted as running: that room is theirs before any lower priority's.
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
//! - A round that preempts leaves nothing to preempt: over its placements,
//!   the next round evicts nobody for a workload it placed in full. Hence
//!   the second chances above: a lower priority placed in room a higher
//!   one was denied only until later in the round would be evicted from it
//!   next round, and evict others in turn.
//! - A data center that stops answering keeps its replicas for the workload's
//!   grace period; it takes nothing new meanwhile.

pub mod model;

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use strength_reduce::StrengthReducedU64;

use serde::Serialize;

use model::{DataCenter, RebalanceMode, ReplicaDemand, Resources, Snapshot, WorkloadKey};

/// Tuning of one scheduling run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Record a rejection for every data center not chosen. With `false`, only
    /// counts per rule are kept (for very large what-if runs).
    pub explain: bool,
    /// With `explain`, build only the rejections of this many nearest
    /// misses (those rejected by the latest rule, then by name), as a
    /// workload's status shows them; `rejected_by_rule` still counts every
    /// one. `None` explains every data center.
    pub explain_nearest: Option<usize>,
    /// Order every candidate even where the strategy reads only the best
    /// few. The decisions are the same, only slower: tests use it to check
    /// the shortcut.
    pub exhaustive: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            explain: true,
            explain_nearest: None,
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
    /// Shares its member cluster with a data center the workload is placed
    /// in or may use instead.
    SharedCluster,
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

/// Replicas this workload lost to a higher-priority workload's preemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreemptedBy {
    /// The workload the room was made for.
    pub preemptor: WorkloadKey,
    /// Where.
    pub data_center: String,
    /// How many of this workload's replicas.
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
    /// This workload's replicas evicted for higher-priority ones in the same
    /// round, before it was placed again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preempted_by: Vec<PreemptedBy>,
    /// Replicas per data center that stand in room `preemptions` made
    /// (the rest fit in free room).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub preempted_room: BTreeMap<String, u32>,
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
            preempted_by: Vec::new(),
            preempted_room: BTreeMap::new(),
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

struct Scheduler<'a> {
    snapshot: &'a Snapshot,
    options: Options,
    /// What depends only on the data centers' names and domains.
    shape: Arc<Shape>,
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
    /// when a workload is preempted. Shared with the [`Base`] it came from
    /// until then.
    current: Arc<Vec<Vec<(usize, u32)>>>,
    /// Per workload index, what it lost to preemption this round.
    /// Sparse: a round preempts few workloads, and a dense vector the
    /// size of the pool cost a decision as much as placing one.
    preempted_by: HashMap<usize, Vec<PreemptedBy>>,
    /// Per data center, room preemption freed beyond its need, by the
    /// priority it is held at for the rest of the round (also counted in
    /// `held_total` and `held_by_priority`).
    reserved: Vec<Vec<(i32, Resources)>>,
    /// Cordoned, unreachable or NoSchedule-tainted data centers: the only
    /// ones whose rules depend on what a workload runs there now.
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
    (if $messages:ident, $($arg:tt)*) => {
        if $messages { format!($($arg)*) } else { String::new() }
    };
    ($self:ident, $($arg:tt)*) => {
        if $self.options.explain { format!($($arg)*) } else { String::new() }
    };
}

mod base;
mod divide;
mod explain;
mod filter;
mod nearest;
mod preempt;
mod score;

pub use base::Pool;
use base::{Base, Shape};
use filter::{ClassKey, RuleClass};

/// What the placement-independent hard rules say about one data center:
/// `Ok((fallback group, discouraged))` or the first rule that rejects it
/// (the message is empty unless explaining).
type Verdict = Result<(usize, bool), (Rule, String)>;

/// `Scheduler::trouble` marks for the workload being placed.
const UNTROUBLED: u8 = 0;
const EXCLUDED: u8 = 1;
const KEEP_ONLY: u8 = 2;

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
        Self::from_base(snapshot, options, Base::new(snapshot))
    }

    /// A scheduler over `snapshot` whose capacity accounting starts from
    /// `base` (made from the same data centers and workloads, and the
    /// current placements).
    fn from_base(snapshot: &'a Snapshot, options: Options, base: Base) -> Self {
        let n = snapshot.data_centers.len();
        let Base {
            shape,
            held_total,
            held_by_priority,
            current,
            troubled,
        } = base;
        let mut scheduler = Self {
            snapshot,
            options,
            shape,
            committed: vec![Resources::default(); n],
            held_total,
            held_by_priority,
            free: vec![[0; 3]; n],
            capacity_divisors: vec![OnceCell::new(); n],
            current,
            preempted_by: HashMap::new(),
            reserved: vec![Vec::new(); n],
            troubled,
            classes: HashMap::new(),
            here: vec![0; n],
            trouble: vec![UNTROUBLED; n],
        };
        for dc in 0..n {
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

    fn run(self, only: Option<&BTreeSet<WorkloadKey>>) -> Schedule {
        let workloads = &self.snapshot.workloads;
        let order: Vec<usize> = (0..workloads.len())
            .filter(|&w| only.is_none_or(|keys| keys.contains(&workloads[w].key)))
            .collect();
        self.run_these(order)
    }

    /// Decides the workloads at indices `order` (in priority order, whatever
    /// order they come in).
    fn run_these(mut self, mut order: Vec<usize>) -> Schedule {
        let workloads = &self.snapshot.workloads;
        order.sort_by(|&a, &b| {
            workloads[b]
                .priority
                .cmp(&workloads[a].priority)
                .then_with(|| workloads[a].key.cmp(&workloads[b].key))
        });
        let mut decided = vec![false; workloads.len()];
        let mut decisions: Vec<(usize, Decision)> = Vec::with_capacity(order.len());
        // The decisions of the priority being decided start here.
        let mut level = 0;
        // (decision index, data center): where a workload of that priority
        // gave up room, in decision order.
        let mut given_up: Vec<(usize, usize)> = Vec::new();
        for w in order {
            if decisions
                .get(level)
                .is_some_and(|&(first, _)| workloads[first].priority != workloads[w].priority)
            {
                self.give_second_chances(&mut decisions, level, &given_up, &decided);
                level = decisions.len();
                given_up.clear();
            }
            let decision = self.decide(w, &decided);
            decided[w] = true;
            for &(dc, ran) in self.current[w].iter() {
                if self.kept_in(&decision, dc) < ran {
                    given_up.push((decisions.len(), dc));
                }
            }
            decisions.push((w, decision));
        }
        self.give_second_chances(&mut decisions, level, &given_up, &decided);
        let mut decisions: Vec<Decision> = decisions.into_iter().map(|(_, d)| d).collect();
        decisions.sort_by(|a, b| a.workload.cmp(&b.workload));
        Schedule { decisions }
    }

    /// The replicas `decision` places in data center `dc`.
    fn kept_in(&self, decision: &Decision, dc: usize) -> u32 {
        decision
            .placement
            .get(&self.snapshot.data_centers[dc].name)
            .copied()
            .unwrap_or(0)
    }

    /// Decides workload `w` and commits its placement.
    fn decide(&mut self, w: usize, decided: &[bool]) -> Decision {
        let workload = &self.snapshot.workloads[w];
        self.release_holdings(w);
        let decision = self.place(w, decided);
        // A gang victim that no longer fits whole after a preemption
        // gives up its room because of it: that room stays held this
        // round. (Room a victim gives up for its own reasons is free.)
        if self
            .preempted_by
            .get(&w)
            .is_some_and(|lost| !lost.is_empty())
            && workload.placement.gang
            && decision.placement.is_empty()
        {
            for i in 0..self.current[w].len() {
                let (dc, left) = self.current[w][i];
                let kept = self.kept_in(&decision, dc);
                if kept < left {
                    let room = demand_of(
                        &self.snapshot.data_centers[dc],
                        &workload.demand,
                        u64::from(left - kept),
                    );
                    self.reserve(dc, workload.priority, &room);
                    self.refresh_free(dc);
                }
            }
        }
        self.commit(w, &decision.placement);
        decision
    }

    /// Counts `placement` of workload `w` as committed.
    fn commit(&mut self, w: usize, placement: &BTreeMap<String, u32>) {
        self.change_committed(w, placement, Resources::add);
    }

    /// Stops counting `placement` of workload `w` as committed.
    fn uncommit(&mut self, w: usize, placement: &BTreeMap<String, u32>) {
        self.change_committed(w, placement, Resources::sub);
    }

    fn change_committed(
        &mut self,
        w: usize,
        placement: &BTreeMap<String, u32>,
        change: fn(&mut Resources, &Resources),
    ) {
        let workload = &self.snapshot.workloads[w];
        for (name, replicas) in placement {
            let dc = self.shape.dc_index[name.as_str()];
            let res = demand_of(
                &self.snapshot.data_centers[dc],
                &workload.demand,
                u64::from(*replicas),
            );
            change(&mut self.committed[dc], &res);
            self.refresh_free(dc);
        }
    }

    /// Gives every decision of one priority from index `level` on that fell
    /// short a second chance at room a later workload of that priority gave
    /// up in a data center its hard rules allow (`given_up`), in decision
    /// order, before any lower priority is decided. Without it, that room
    /// went to a lower priority, which the next round evicted from it, and
    /// which then evicted others to make up for it.
    fn give_second_chances(
        &mut self,
        decisions: &mut [(usize, Decision)],
        level: usize,
        given_up: &[(usize, usize)],
        decided: &[bool],
    ) {
        let snapshot = self.snapshot;
        for (i, (w, decision)) in decisions.iter_mut().enumerate().skip(level) {
            if decision.outcome == Outcome::Scheduled {
                continue;
            }
            let class = self.rule_class(&snapshot.workloads[*w]);
            let since = given_up.partition_point(|&(after, _)| after <= i);
            if given_up[since..]
                .iter()
                .any(|&(_, dc)| class.verdicts[dc].is_ok())
            {
                self.second_chance(*w, decision, decided);
            }
        }
    }

    /// Decides workload `w` again with its first `decision` as what runs, so
    /// those replicas stay where they may, as they would next round. The
    /// new decision replaces the first only if it places more, or in more
    /// of the spread domains `minDomains` asks for; the first one's
    /// evictions stand either way.
    fn second_chance(&mut self, w: usize, decision: &mut Decision, decided: &[bool]) {
        let snapshot = self.snapshot;
        let workload = &snapshot.workloads[w];
        let rules = &workload.placement;
        let placed_first: Vec<(usize, u32)> = decision
            .placement
            .iter()
            .map(|(name, &n)| (self.shape.dc_index[name.as_str()], n))
            .collect();
        self.uncommit(w, &decision.placement);
        let ran = std::mem::replace(&mut Arc::make_mut(&mut self.current)[w], placed_first);
        let plan = self.plan(w);
        // Moves count from what ran before the round, as in the first
        // decision.
        Arc::make_mut(&mut self.current)[w] = ran;
        let candidates = &plan.scored.candidates;
        let first: Vec<u32> = candidates.iter().map(|c| c.current).collect();
        let rank = |a: &[u32]| {
            (
                divide::placed_total(workload, a),
                preempt::domains_met(workload, candidates, a),
            )
        };
        let moves = candidates
            .iter()
            .zip(&plan.assignment)
            .any(|(c, &a)| a < c.current);
        // A paced rebalance may have spent the round's moves in the first
        // decision.
        let paced = rules.rebalance != RebalanceMode::Never && rules.max_moves_per_round.is_some();
        if rank(&plan.assignment) <= rank(&first) || (moves && paced) {
            self.commit(w, &decision.placement);
            return;
        }
        let mut again = self.carry_out(w, plan, decided);
        self.commit(w, &again.placement);
        let mut preemptions = std::mem::take(&mut decision.preemptions);
        for p in again.preemptions.drain(..) {
            match preemptions
                .iter_mut()
                .find(|q| q.victim == p.victim && q.data_center == p.data_center)
            {
                Some(q) => q.replicas += p.replicas,
                None => preemptions.push(p),
            }
        }
        again.preemptions = preemptions;
        // The second decision counted the first one's replicas as running,
        // so the preempted room those stand in is the first one's to report.
        for (name, n) in std::mem::take(&mut decision.preempted_room) {
            let placed = again.placement.get(&name).copied().unwrap_or(0);
            let room = again.preempted_room.entry(name).or_insert(0);
            *room = (*room + n).min(placed);
        }
        again.preempted_room.retain(|_, n| *n > 0);
        *decision = again;
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

    /// Decides one workload: the stages of the module docs, in order.
    fn place(&mut self, w: usize, decided: &[bool]) -> Decision {
        let plan = self.plan(w);
        self.carry_out(w, plan, decided)
    }

    /// Filters, scores and divides for workload `w`, with preempted room if
    /// it must and may; evicts nobody yet.
    fn plan(&mut self, w: usize) -> Plan {
        let snapshot = self.snapshot;
        let workload = &snapshot.workloads[w];
        let class = self.rule_class(workload);
        for &(dc, replicas) in self.current[w].iter() {
            self.here[dc] = replicas;
        }
        let mut filtered = self.filter(workload, &class);
        let mut scored = self.score(workload, &class.pass, &class.verdicts, &filtered.parts);
        self.one_per_cluster(workload, &mut filtered, &mut scored);
        for &dc in &self.troubled {
            self.trouble[dc] = UNTROUBLED;
        }
        for &(dc, _) in self.current[w].iter() {
            self.here[dc] = 0;
        }
        let mut assignment =
            divide::in_fill_order(workload, &mut scored.candidates, self.options.exhaustive);
        let free_room: Vec<u32> = scored
            .candidates
            .iter()
            .map(|c| self.room_without_eviction(workload, c))
            .collect();
        let mut preempting = self.divide_with_preemption(workload, &mut scored, &mut assignment);

        let mut reason = None;
        let (placed, wanted) = (
            divide::placed_total(workload, &assignment),
            divide::desired_total(workload),
        );
        if workload.placement.gang && placed < wanted {
            // With no candidate at all, the hard rules are the reason, and
            // the general explanation names them.
            if !scored.candidates.is_empty() {
                reason = Some(format!(
                    "gang: only {placed} of {wanted} replicas fit, so none are placed"
                ));
            }
            assignment.iter_mut().for_each(|a| *a = 0);
            preempting = false;
        }
        Plan {
            filtered,
            scored,
            assignment,
            free_room,
            preempting,
            reason,
        }
    }

    /// Evicts what `plan` needs evicted and explains the decision.
    fn carry_out(&mut self, w: usize, plan: Plan, decided: &[bool]) -> Decision {
        // Evict only once the placement that needs it is final: a gang that
        // does not fit whole must not cost anybody their replicas.
        let preemptions = if plan.preempting {
            self.evict(w, &plan.scored.candidates, &plan.assignment, decided)
        } else {
            Vec::new()
        };
        let preempted_room: BTreeMap<String, u32> = if preemptions.is_empty() {
            BTreeMap::new()
        } else {
            plan.scored
                .candidates
                .iter()
                .zip(&plan.assignment)
                .zip(&plan.free_room)
                .filter(|((_, a), free)| **a > **free)
                .map(|((c, a), free)| (self.snapshot.data_centers[c.dc].name.clone(), a - free))
                .collect()
        };
        let mut decision = self.explain(
            w,
            plan.filtered,
            &plan.scored,
            &plan.assignment,
            plan.reason,
            preemptions,
        );
        decision.preempted_room = preempted_room;
        decision
    }
}

/// One workload's placement as decided before anyone is evicted for it.
struct Plan {
    filtered: filter::Filtered,
    scored: score::Scored,
    /// Replicas per candidate of `scored`.
    assignment: Vec<u32>,
    /// Replicas per candidate that fit without evicting anyone.
    free_room: Vec<u32>,
    /// Whether `assignment` needs room held by lower priorities.
    preempting: bool,
    reason: Option<String>,
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

/// The GPU model one replica of `demand` is counted against in `dc`: its
/// own model, or for "any model" the data center's most plentiful one.
/// `None` when it needs no GPU.
pub fn accounted_gpu_model(dc: &DataCenter, demand: &ReplicaDemand) -> Option<String> {
    if demand.gpu_count == 0 {
        return None;
    }
    demand.gpu_model.clone().or_else(|| any_gpu_model(dc))
}

fn any_gpu_model(dc: &DataCenter) -> Option<String> {
    dc.capacity
        .gpus
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(model, _)| model.clone())
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
