//! Explain: why every data center that got nothing got nothing, the scores
//! of those chosen, and the decision as a whole.

use std::collections::{BTreeMap, BTreeSet};

use super::divide::{desired_total, placed_total};
use super::filter::Filtered;
use super::model::{DataCenter, Reachability, ReplicaDemand, StrategyKind, Workload};
use super::score::Scored;
use super::{Candidate, Decision, Outcome, Preemption, Rejection, Rule, Scheduler, ScoreBreakdown};

impl Scheduler<'_> {
    /// The decision for workload `w`, placed as `assignment` over `scored`'s
    /// candidates, with every rejection `filtered` found and the rest here.
    pub(super) fn explain(
        &self,
        w: usize,
        filtered: Filtered,
        scored: &Scored,
        assignment: &[u32],
        mut reason: Option<String>,
        preemptions: Vec<Preemption>,
    ) -> Decision {
        let dcs = &self.snapshot.data_centers;
        let workload = &self.snapshot.workloads[w];
        let rules = &workload.placement;
        let explain = self.options.explain;
        let Filtered {
            mut rejections,
            mut rejected_by_rule,
            ..
        } = filtered;
        let candidates = &scored.candidates;
        let wanted = desired_total(workload);
        // Only a gang that did not fit whole has a reason yet.
        let gang_broken = reason.is_some();
        let mut placement = BTreeMap::new();
        let mut scores = BTreeMap::new();
        let chosen = || candidates.iter().zip(assignment).filter(|(_, a)| **a > 0);
        let chosen_best_group = chosen().map(|(c, _)| c.group).max();
        let lowest_chosen = chosen().map(|(c, _)| c.total).min();
        let used_domains: BTreeSet<usize> = if rules.spread.max_domains.is_some() {
            chosen().map(|(c, _)| c.domain).collect()
        } else {
            BTreeSet::new()
        };
        for (c, &a) in candidates.iter().zip(assignment) {
            let dc = &dcs[c.dc];
            if a > 0 {
                placement.insert(dc.name.clone(), a);
                scores.insert(dc.name.clone(), scored.breakdown(c));
                continue;
            }
            // The rule first: the message is built only for a rejection
            // that is kept.
            let (rule, miss) = if c.available == 0 && c.keep_only {
                (
                    if dc.cordoned {
                        Rule::Cordoned
                    } else if dc.reachability == Reachability::Reachable {
                        Rule::Taint
                    } else {
                        Rule::Unreachable
                    },
                    Miss::TakesNothingNew,
                )
            } else if c.available == 0 {
                (Rule::Capacity, Miss::NoRoom)
            } else if gang_broken {
                (Rule::Capacity, Miss::GangBroken)
            } else if let Some(max) = rules.spread.max_domains
                && !used_domains.contains(&c.domain)
                && used_domains.len() >= max as usize
            {
                (Rule::Spread, Miss::Spread(max))
            } else if chosen_best_group.is_some_and(|g| c.group > g) {
                (Rule::Fallback, Miss::Fallback)
            } else {
                (Rule::Score, Miss::Score)
            };
            *rejected_by_rule.entry(rule).or_insert(0) += 1;
            if explain && rejections.wants(rule, self.shape.name_rank[c.dc]) {
                let message = match miss {
                    Miss::TakesNothingNew => "takes no new replicas".to_owned(),
                    Miss::NoRoom => capacity_message(dc, &workload.demand, self, c.dc),
                    Miss::GangBroken => "gang could not be placed whole".to_owned(),
                    Miss::Spread(max) => {
                        format!("spread allows at most {max} {:?} domains", rules.spread.by)
                    }
                    Miss::Fallback => format!(
                        "fallback group `{}` not needed: an earlier group had room",
                        group_name(workload, c.group)
                    ),
                    Miss::Score => format!(
                        "scored {} against {} for the lowest chosen data center",
                        c.total,
                        lowest_chosen.unwrap_or(0)
                    ),
                };
                let score = matches!(rule, Rule::Score | Rule::Fallback | Rule::Spread)
                    .then(|| scored.breakdown(c));
                rejections.push(self.rejection(c.dc, rule, message, score));
            }
        }
        let rejections = rejections.into_sorted();

        let placed = placed_total(workload, assignment);
        // Scheduled means the spread held too: copies in two data centers of
        // one zone are one zone, whatever the strategy.
        let domains_placed = chosen()
            .map(|(c, _)| c.domain)
            .collect::<BTreeSet<_>>()
            .len();
        let spread_short = rules
            .spread
            .min_domains
            .filter(|&min| placed > 0 && domains_placed < min as usize);
        let outcome = if wanted == 0 && workload.replicas == 0 {
            Outcome::Scheduled
        } else if placed == 0 {
            Outcome::Unschedulable
        } else if placed < wanted || spread_short.is_some() {
            Outcome::PartiallyScheduled
        } else {
            Outcome::Scheduled
        };
        if let Some(min) = spread_short
            && reason.is_none()
        {
            reason = Some(format!(
                "spread: placed in {domains_placed} {:?} domain(s); minDomains needs {min}",
                rules.spread.by
            ));
        }
        if outcome != Outcome::Scheduled && reason.is_none() {
            reason = Some(unscheduled_reason(
                workload,
                placed,
                wanted,
                candidates,
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
            preempted_by: self.preempted_by.get(&w).cloned().unwrap_or_default(),
            preempted_room: BTreeMap::new(),
            moved_replicas,
        }
    }

    /// A rejection keyed by the data center's name rank, for sorting.
    pub(super) fn rejection(
        &self,
        dc: usize,
        rule: Rule,
        message: String,
        score: Option<ScoreBreakdown>,
    ) -> (u32, Rejection) {
        (
            self.shape.name_rank[dc],
            Rejection {
                data_center: self.snapshot.data_centers[dc].name.clone(),
                rule,
                message,
                score,
            },
        )
    }
}

/// Why a candidate got none of the replicas, before its message is built.
enum Miss {
    TakesNothingNew,
    NoRoom,
    GangBroken,
    Spread(u32),
    Fallback,
    Score,
}

pub(super) fn capacity_message(
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

pub(super) fn unscheduled_reason(
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

pub(super) fn group_name(workload: &Workload, group: usize) -> String {
    workload
        .placement
        .fallback_groups
        .get(group)
        .map_or_else(|| group.to_string(), |g| g.name.clone())
}
