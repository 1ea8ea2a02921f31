//! The eviction rate limit of failover (`spec.failover.maxEvictionsPerMinute`)
//! and make-before-break moves (`spec.failover.maxUnavailable`, see
//! [`hold_shrinking`]).
//!
//! The engine says where a workload's replicas should run; when a data center
//! has been unreachable past the grace period, that means moving every replica
//! it held at once. A city that loses an edge site should not see a hundred
//! replicas land on the municipal core in one second, so the moves a decision
//! makes off such data centers are trimmed to what the last minute's evictions
//! leave of the budget. A trimmed replica stays placed where it was (it keeps
//! the capacity it held, so the trimmed placement still fits) and the data
//! center that was to receive it gets one fewer. The rest move as the window
//! slides, on a later reconcile.
//!
//! Only moves count: replicas the engine drops from a failed data center
//! without placing them elsewhere (a scale-down) are not evictions.

use std::collections::{BTreeMap, BTreeSet};

/// The sliding window `maxEvictionsPerMinute` counts over.
pub const WINDOW_SECONDS: i64 = 60;

/// What [`limit_evictions`] let through and held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Evictions {
    /// Replicas moved off failed data centers by this decision.
    pub moved: u32,
    /// Replicas the budget kept where they were, to move later.
    pub deferred: u32,
    /// When the pool-wide budget has room again, if it held any back.
    pub pool_retry_at: Option<i64>,
}

/// Failover moves across every workload in the last [`WINDOW_SECONDS`]:
/// what the pool-wide `--max-evictions-per-minute` is counted against, so
/// that losing a data center with hundreds of workloads does not move
/// hundreds of budgets' worth at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolEvictions {
    /// (Unix seconds, replicas moved), oldest first.
    moves: std::collections::VecDeque<(i64, u32)>,
}

impl PoolEvictions {
    /// Starts from moves already recorded (e.g. in workloads' statuses).
    pub fn seeded(mut moves: Vec<(i64, u32)>) -> Self {
        moves.sort_unstable();
        Self {
            moves: moves.into(),
        }
    }

    fn forget_before(&mut self, now: i64) {
        while self
            .moves
            .front()
            .is_some_and(|(at, _)| *at <= now - WINDOW_SECONDS)
        {
            self.moves.pop_front();
        }
    }

    /// Replicas that may still move in the window ending `now`.
    pub fn left(&mut self, now: i64, max: u32) -> u32 {
        self.forget_before(now);
        let used: u32 = self.moves.iter().map(|(_, n)| *n).sum();
        max.saturating_sub(used)
    }

    /// When the oldest move in the window leaves it (`now` + window if none).
    pub fn next_room_at(&mut self, now: i64) -> i64 {
        self.forget_before(now);
        self.moves.front().map_or(now, |(at, _)| *at) + WINDOW_SECONDS
    }

    /// Records `moved` replicas moved at `now`.
    pub fn record(&mut self, now: i64, moved: u32) {
        if moved > 0 {
            self.moves.push_back((now, moved));
        }
    }
}

/// Trims `decided` so that at most `budget` replicas move off the data centers
/// in `failed` (relative to `before`). Receivers in `trim_first` (where the
/// engine preempted to make room) give up replicas before the others, so
/// fewer preemptions are made for replicas that will not come.
///
/// `cluster_of` names the member cluster of data centers that share one.
/// Replicas that go from a failed data center to another of its cluster
/// stay in the same object there, relabelled: they cost no budget. When
/// replicas are held back, the failed data center keeps that share too,
/// so the workload never stands in two data centers of one cluster.
pub fn limit_evictions(
    before: &BTreeMap<String, u32>,
    decided: &mut BTreeMap<String, u32>,
    failed: &BTreeSet<String>,
    budget: u32,
    trim_first: &BTreeSet<String>,
    cluster_of: &BTreeMap<String, String>,
) -> Evictions {
    let was = |dc: &str| before.get(dc).copied().unwrap_or(0);
    let now = |decided: &BTreeMap<String, u32>, dc: &str| decided.get(dc).copied().unwrap_or(0);
    let mut lost: Vec<(String, u32)> = failed
        .iter()
        .map(|dc| (dc.clone(), was(dc).saturating_sub(now(decided, dc))))
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut gained: Vec<(String, u32)> = decided
        .iter()
        .filter(|(dc, _)| !failed.contains(*dc))
        .map(|(dc, &n)| (dc.clone(), n.saturating_sub(was(dc))))
        .filter(|(_, n)| *n > 0)
        .collect();
    // A receiver in the failed data center's own cluster, if any.
    let sibling = |decided: &BTreeMap<String, u32>, dc: &str| -> Option<String> {
        let cluster = cluster_of.get(dc)?;
        decided
            .keys()
            .find(|other| other.as_str() != dc && cluster_of.get(*other) == Some(cluster))
            .cloned()
    };
    // Per failed data center: the sibling its replicas went to, and how
    // many.
    let mut relabelled: BTreeMap<String, (String, u32)> = BTreeMap::new();
    for (dc, n) in &mut lost {
        if let Some(kept_in) = sibling(decided, dc)
            && let Some((_, g)) = gained.iter_mut().find(|(r, _)| *r == kept_in)
        {
            let stays = (*n).min(*g);
            *n -= stays;
            *g -= stays;
            relabelled.insert(dc.clone(), (kept_in, stays));
        }
    }
    lost.retain(|(_, n)| *n > 0);
    gained.retain(|(_, n)| *n > 0);
    let total_lost: u32 = lost.iter().map(|(_, n)| n).sum();
    let total_gained: u32 = gained.iter().map(|(_, n)| n).sum();
    let moves = total_lost.min(total_gained);
    if moves <= budget {
        return Evictions {
            moved: moves,
            deferred: 0,
            pool_retry_at: None,
        };
    }
    let deferred = moves - budget;

    // Give the failed data centers back their replicas, fullest first.
    lost.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut left = deferred;
    for (dc, n) in &lost {
        let back = left.min(*n);
        if back == 0 {
            continue;
        }
        // Held back, the failed data center keeps what it has: what went
        // to its sibling comes back too (the sibling's room was found for
        // that share only), and the workload stays in one data center of
        // the cluster.
        let mut stay = back;
        if let Some((sibling, share)) = relabelled.get(dc)
            && let Some(placed) = decided.get_mut(sibling)
        {
            let share = (*share).min(*placed);
            *placed -= share;
            stay += share;
        }
        *decided.entry(dc.clone()).or_insert(0) += stay;
        left -= back;
    }
    // Take as many from the receivers, largest gain first, one at a time so
    // the new replicas stay spread as the engine spread them.
    let mut left = deferred;
    while left > 0 {
        gained.sort_by(|a, b| {
            (b.1 > 0)
                .cmp(&(a.1 > 0))
                .then_with(|| trim_first.contains(&b.0).cmp(&trim_first.contains(&a.0)))
                .then_with(|| b.1.cmp(&a.1))
                .then_with(|| a.0.cmp(&b.0))
        });
        let Some((dc, n)) = gained.first_mut().filter(|(_, n)| *n > 0) else {
            break;
        };
        *n -= 1;
        if let Some(placed) = decided.get_mut(dc.as_str()) {
            *placed -= 1;
        }
        left -= 1;
    }
    decided.retain(|_, n| *n > 0);
    Evictions {
        moved: budget,
        deferred,
        pool_retry_at: None,
    }
}

/// Whether copies that would lose ready replicas must keep them for now
/// (`spec.failover.maxUnavailable`, make before break).
///
/// `live_ready` is what each member's copy has ready now; `grown_ready` what
/// the copies that do not shrink reported after this round's applies. A copy
/// shrinks when it has more ready replicas than its new share in `placement`
/// (a data center absent from `placement` has a share of 0). Shrinking is
/// allowed when, counting every data center's ready replicas up to its share,
/// at most `max_unavailable` placed replicas would not be ready.
pub fn hold_shrinking(
    placement: &BTreeMap<String, u32>,
    live_ready: &BTreeMap<String, i32>,
    grown_ready: &BTreeMap<String, i32>,
    max_unavailable: Option<u32>,
) -> bool {
    let Some(max_unavailable) = max_unavailable else {
        return false;
    };
    let share = |dc: &str| i64::from(placement.get(dc).copied().unwrap_or(0));
    let shrinks = |dc: &str| {
        live_ready
            .get(dc)
            .is_some_and(|&ready| i64::from(ready) > share(dc))
    };
    if !live_ready.keys().any(|dc| shrinks(dc)) {
        return false;
    }
    let ready_after: i64 = placement
        .keys()
        .map(|dc| {
            let ready = if shrinks(dc) {
                live_ready[dc.as_str()]
            } else {
                grown_ready.get(dc).copied().unwrap_or(0)
            };
            i64::from(ready).min(share(dc))
        })
        .sum();
    let placed: i64 = placement.values().map(|&n| i64::from(n)).sum();
    placed - ready_after > i64::from(max_unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_budget_counts_every_move_in_the_last_minute() {
        // Seeded from statuses: 3 moved 50 s ago, 1 moved 70 s ago (gone).
        let mut pool = PoolEvictions::seeded(vec![(1_000 - 50, 3), (1_000 - 70, 1)]);
        assert_eq!(pool.left(1_000, 5), 2);
        pool.record(1_000, 2);
        assert_eq!(pool.left(1_000, 5), 0);
        // Room comes back when the oldest move leaves the window.
        assert_eq!(pool.next_room_at(1_000), 1_000 - 50 + WINDOW_SECONDS);
        assert_eq!(pool.left(1_000 + 10, 5), 3);
        assert_eq!(pool.left(1_000 + WINDOW_SECONDS, 5), 5);
        // Nothing moved records nothing.
        pool.record(2_000, 0);
        assert_eq!(pool.left(2_000, 5), 5);
        assert_eq!(pool.next_room_at(2_000), 2_000 + WINDOW_SECONDS);
    }

    fn ready(entries: &[(&str, i32)]) -> BTreeMap<String, i32> {
        entries.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect()
    }

    #[test]
    fn a_move_waits_until_the_new_copy_is_ready_enough() {
        // Two replicas move from the partner to the edge.
        let placement = map(&[("edge", 2)]);
        let live = ready(&[("partner", 2), ("edge", 0)]);
        // (edge ready, maxUnavailable, held?)
        let cases = [
            (0, Some(0), true),
            (1, Some(0), true),
            (1, Some(1), false),
            (2, Some(0), false),
            (0, Some(2), false),
            (0, None, false),
        ];
        for (edge_ready, max_unavailable, held) in cases {
            assert_eq!(
                hold_shrinking(
                    &placement,
                    &live,
                    &ready(&[("edge", edge_ready)]),
                    max_unavailable
                ),
                held,
                "edge ready {edge_ready}, maxUnavailable {max_unavailable:?}"
            );
        }
    }

    #[test]
    fn a_scale_down_is_never_held() {
        let placement = map(&[("core", 2)]);
        let live = ready(&[("core", 4)]);
        assert!(!hold_shrinking(
            &placement,
            &live,
            &BTreeMap::new(),
            Some(0)
        ));
    }

    #[test]
    fn nothing_is_held_when_no_copy_shrinks() {
        // Not ready yet, but nothing would be taken away.
        let placement = map(&[("core", 2), ("edge", 2)]);
        let live = ready(&[("core", 1), ("edge", 0)]);
        assert!(!hold_shrinking(
            &placement,
            &live,
            &ready(&[("core", 1), ("edge", 0)]),
            Some(0)
        ));
    }

    /// A workload moving off a failed data center into another of the same
    /// member cluster stays in the same object: that costs no budget, and
    /// what the budget holds back stays with the other data center, never
    /// in two data centers of one cluster.
    #[test]
    fn a_move_within_one_member_cluster_is_not_an_eviction() {
        let clusters: BTreeMap<String, String> = [("edge-a", "x"), ("edge-b", "x")]
            .iter()
            .map(|(dc, c)| ((*dc).to_owned(), (*c).to_owned()))
            .collect();
        let before = map(&[("edge-a", 10)]);
        let mut decided = map(&[("edge-b", 10)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge-a"]),
            3,
            &BTreeSet::new(),
            &clusters,
        );
        assert_eq!(decided, map(&[("edge-b", 10)]));
        assert_eq!(evictions.deferred, 0);
        // Part to the sibling, part to another cluster: only the latter
        // counts, and once some are held back the failed data center keeps
        // the sibling's share too (room was found there for that share
        // only), never both of one cluster.
        let mut decided = map(&[("edge-b", 6), ("core", 4)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge-a"]),
            3,
            &BTreeSet::new(),
            &clusters,
        );
        assert_eq!(decided, map(&[("edge-a", 7), ("core", 3)]));
        assert_eq!((evictions.moved, evictions.deferred), (3, 1));
        // No budget at all: everything stays where it ran.
        let mut decided = map(&[("edge-b", 6), ("core", 4)]);
        limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge-a"]),
            0,
            &BTreeSet::new(),
            &clusters,
        );
        assert_eq!(decided, map(&[("edge-a", 10)]));
    }

    fn map(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect()
    }

    fn failed(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn moves_within_the_budget_pass_unchanged() {
        let before = map(&[("edge", 3), ("core", 2)]);
        let mut decided = map(&[("core", 4), ("partner", 1)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge"]),
            3,
            &BTreeSet::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            evictions,
            Evictions {
                moved: 3,
                deferred: 0,
                pool_retry_at: None
            }
        );
        assert_eq!(decided, map(&[("core", 4), ("partner", 1)]));
    }

    #[test]
    fn moves_past_the_budget_stay_on_the_failed_data_center() {
        let before = map(&[("edge", 5), ("core", 1)]);
        let mut decided = map(&[("core", 4), ("partner", 2)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge"]),
            2,
            &BTreeSet::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            evictions,
            Evictions {
                moved: 2,
                deferred: 3,
                pool_retry_at: None
            }
        );
        // Gains were core +3, partner +2; three are taken back, largest gain
        // first: core, then a tie broken by name (core), then partner.
        assert_eq!(decided, map(&[("core", 2), ("edge", 3), ("partner", 1)]));
        assert_eq!(decided.values().sum::<u32>(), 6, "no replica is lost");
    }

    #[test]
    fn an_exhausted_budget_keeps_the_old_placement() {
        let before = map(&[("edge", 2), ("core", 2)]);
        let mut decided = map(&[("core", 4)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge"]),
            0,
            &BTreeSet::new(),
            &BTreeMap::new(),
        );
        assert_eq!(evictions.deferred, 2);
        assert_eq!(decided, before);
    }

    #[test]
    fn a_scale_down_off_a_failed_data_center_is_not_an_eviction() {
        let before = map(&[("edge", 3), ("core", 3)]);
        let mut decided = map(&[("core", 3)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge"]),
            0,
            &BTreeSet::new(),
            &BTreeMap::new(),
        );
        assert_eq!(evictions, Evictions::default());
        assert_eq!(decided, map(&[("core", 3)]));
    }

    #[test]
    fn several_failed_data_centers_share_one_budget() {
        let before = map(&[("edge-a", 2), ("edge-b", 4)]);
        let mut decided = map(&[("core", 6)]);
        let evictions = limit_evictions(
            &before,
            &mut decided,
            &failed(&["edge-a", "edge-b"]),
            1,
            &BTreeSet::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            evictions,
            Evictions {
                moved: 1,
                deferred: 5,
                pool_retry_at: None
            }
        );
        assert_eq!(decided, map(&[("core", 1), ("edge-a", 1), ("edge-b", 4)]));
    }
}
