//! Divide: the workload's replicas among its candidates by its strategy,
//! within its spread bounds, filling candidates in fill order.

use std::collections::{BTreeSet, HashMap};

use super::model::{RebalanceMode, StrategyKind, Workload};
use super::{Candidate, Divisor};

/// Orders `candidates` and divides the replicas among them. Without domain
/// bounds, Score reads only the best few candidates and those already
/// running replicas, and AvailableCapacity over one fallback group reads the
/// order only to trim running replicas; so only that much is ordered, and
/// everything is when the shortcut turns out not to hold (or `exhaustive`).
pub(super) fn in_fill_order(
    workload: &Workload,
    candidates: &mut Vec<Candidate>,
    exhaustive: bool,
) -> Vec<u32> {
    let rules = &workload.placement;
    let shortcut = !exhaustive
        && rules.spread.min_domains.is_none()
        && rules.spread.max_domains.is_none()
        && (rules.rebalance == RebalanceMode::Never || rules.fallback_groups.is_empty());
    let one_class = candidates
        .windows(2)
        .all(|p| (p[0].discouraged, p[0].group) == (p[1].discouraged, p[1].group));
    let ordered = match rules.strategy {
        StrategyKind::Score if shortcut => {
            let best = usize::try_from(workload.replicas)
                .unwrap_or(usize::MAX)
                .saturating_mul(2)
                .saturating_add(8);
            Some(order_prefix(candidates, best))
        }
        StrategyKind::AvailableCapacity if shortcut && one_class => {
            order_prefix(candidates, 0);
            None
        }
        _ => {
            sort_in_fill_order(candidates);
            None
        }
    };
    let mut assignment = divide(workload, candidates);
    let beyond_prefix_untouched = ordered.is_none_or(|prefix| {
        candidates[prefix..]
            .iter()
            .zip(&assignment[prefix..])
            .all(|(c, &a)| a <= c.current.min(c.available))
    });
    if ordered != Some(candidates.len())
        && (placed_total(workload, &assignment) < desired_total(workload)
            || !beyond_prefix_untouched)
    {
        sort_in_fill_order(candidates);
        assignment = divide(workload, candidates);
    }
    assignment
}

/// Sorts candidates in the order they are filled: tolerated before
/// discouraged, earlier fallback groups first, higher score first, then by
/// name. The name makes every key unique, so an unstable sort is
/// deterministic; sorting packed keys and then moving each candidate once is
/// several times faster than sorting the candidates themselves.
pub(super) fn sort_in_fill_order(candidates: &mut Vec<Candidate>) {
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
pub(super) fn order_prefix(candidates: &mut Vec<Candidate>, best: usize) -> usize {
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

pub(super) fn keyed(candidates: &[Candidate]) -> Vec<(u128, u32)> {
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (fill_key(c), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect()
}

pub(super) fn permute(candidates: &mut Vec<Candidate>, order: &[u32]) {
    let ordered: Vec<Candidate> = order.iter().map(|&i| candidates[i as usize]).collect();
    *candidates = ordered;
}

/// Packs the fill order into one integer: discouraged (1 bit), fallback
/// group (31 bits), inverted score (64 bits), name rank (32 bits).
pub(super) fn fill_key(c: &Candidate) -> u128 {
    let group = u128::try_from(c.group.min(0x7fff_ffff)).unwrap_or(0x7fff_ffff);
    (u128::from(c.discouraged) << 127)
        | (group << 96)
        | (u128::from(u64::MAX - c.total) << 32)
        | u128::from(c.rank)
}

pub(super) fn desired_total(workload: &Workload) -> u32 {
    if workload.placement.strategy == StrategyKind::Duplicated {
        // Duplicated is complete when at least the minimum number of domains
        // runs a full copy; `placed_total` counts domains the same way.
        workload.placement.spread.min_domains.unwrap_or(1).max(1) * workload.replicas
    } else {
        workload.replicas
    }
}

pub(super) fn placed_total(workload: &Workload, assignment: &[u32]) -> u32 {
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
pub(super) fn divide(workload: &Workload, candidates: &[Candidate]) -> Vec<u32> {
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

pub(super) fn divide_within(
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
pub(super) fn allowed_domains(
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
    // Stable sorts keep fill order within each class. By room, running
    // replicas get no say: the running domains were just found too small.
    if by_room {
        order.sort_by_key(|c| std::cmp::Reverse(room[&c.domain]));
    } else {
        order.sort_by_key(|c| c.current == 0);
    }
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

pub(super) fn divide_static(
    workload: &Workload,
    candidates: &[Candidate],
    available: &[u32],
) -> Vec<u32> {
    let weights: Vec<u64> = candidates
        .iter()
        .zip(available)
        .map(|(c, &a)| if a == 0 { 0 } else { u64::from(c.weight) })
        .collect();
    let mut assignment = vec![0u32; candidates.len()];
    let mut open: Vec<usize> = (0..candidates.len()).filter(|&i| weights[i] > 0).collect();
    let mut left = u64::from(workload.replicas);
    // Proportional with caps (water-filling): a data center whose exact share
    // exceeds its room gets its room, and the others divide the rest by their
    // weights — what a full data center cannot take is spread by weight, not
    // handed to one. A pure function of weights and room, so an unchanged
    // world gets the same answer.
    loop {
        let open_weight: u64 = open.iter().map(|&i| weights[i]).sum();
        if open_weight == 0 || left == 0 {
            return assignment;
        }
        let (capped, uncapped): (Vec<usize>, Vec<usize>) = open.iter().partition(|&&i| {
            // u128: a weight and a sum of weights may each be near u32::MAX × n.
            u128::from(left) * u128::from(weights[i])
                > u128::from(available[i]) * u128::from(open_weight)
        });
        if capped.is_empty() {
            break;
        }
        for &i in &capped {
            assignment[i] = available[i];
            left -= u64::from(available[i]);
        }
        open = uncapped;
    }
    let open_weight: u64 = open.iter().map(|&i| weights[i]).sum();
    // Largest remainder: exact shares, then leftovers by biggest remainder.
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(open.len());
    let mut given = 0u64;
    for &i in &open {
        let share = left * weights[i] / open_weight;
        assignment[i] = u32::try_from(share).unwrap_or(u32::MAX);
        given += share;
        remainders.push((left * weights[i] % open_weight, i));
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
    // No exact share exceeds its room, so each floor fits; a leftover skips
    // a data center whose floor already fills it.
    let mut leftover = left - given;
    for &(_, i) in &remainders {
        if leftover == 0 {
            break;
        }
        if assignment[i] < available[i] {
            assignment[i] += 1;
            leftover -= 1;
        }
    }
    assignment
}

pub(super) fn divide_stable(
    workload: &Workload,
    candidates: &[Candidate],
    available: &[u32],
) -> Vec<u32> {
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
pub(super) fn enforce_min_domains(
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
