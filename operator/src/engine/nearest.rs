//! The rejections one decision reports: every one, or only the nearest
//! misses, built only for those.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{Rejection, Rule};

/// How near a miss is: a later rule first (it passed more of them), then
/// the data center's name rank. Larger is nearer.
type Nearness = (Rule, Reverse<u32>);

/// Collects the rejections of one decision, keyed by name rank. With a
/// limit, only the `limit` nearest misses are kept, and a caller asks
/// [`Rejections::wants`] before building one: a status that shows twenty
/// of a thousand data centers should not cost a thousand messages.
pub(super) struct Rejections {
    limit: Option<usize>,
    /// Every rejection, in no order (without a limit).
    all: Vec<(u32, Rejection)>,
    /// The nearest misses so far, the least near on top (with a limit).
    nearest: BinaryHeap<Reverse<(Nearness, Keyed)>>,
}

/// A rejection ordered by nothing but its nearness (the heap's key).
struct Keyed(Rejection);

impl PartialEq for Keyed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Keyed {}
impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Keyed {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Rejections {
    /// Every rejection (`None`), or the `limit` nearest misses.
    pub(super) fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            all: Vec::new(),
            nearest: BinaryHeap::new(),
        }
    }

    /// Whether a rejection by `rule` of the data center of name rank `rank`
    /// would be kept.
    pub(super) fn wants(&self, rule: Rule, rank: u32) -> bool {
        match self.limit {
            None => true,
            Some(0) => false,
            Some(limit) => {
                self.nearest.len() < limit
                    || self
                        .nearest
                        .peek()
                        .is_some_and(|Reverse((least, _))| (rule, Reverse(rank)) > *least)
            }
        }
    }

    /// Keeps `rejection` of the data center of name rank `rank`, if wanted.
    pub(super) fn push(&mut self, (rank, rejection): (u32, Rejection)) {
        let Some(limit) = self.limit else {
            self.all.push((rank, rejection));
            return;
        };
        if !self.wants(rejection.rule, rank) {
            return;
        }
        self.nearest
            .push(Reverse(((rejection.rule, Reverse(rank)), Keyed(rejection))));
        if self.nearest.len() > limit {
            self.nearest.pop();
        }
    }

    /// What was kept, by name rank.
    pub(super) fn into_sorted(self) -> Vec<Rejection> {
        let mut kept = self.all;
        kept.extend(
            self.nearest
                .into_iter()
                .map(|Reverse(((_, Reverse(rank)), Keyed(r)))| (rank, r)),
        );
        kept.sort_unstable_by_key(|(rank, _)| *rank);
        kept.into_iter().map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(rule: Rule, name: &str) -> Rejection {
        Rejection {
            data_center: name.to_owned(),
            rule,
            message: String::new(),
            score: None,
        }
    }

    /// The limit keeps exactly what sorting every rejection by rule (latest
    /// first), then name, and taking the first `limit` would.
    #[test]
    fn keeps_the_nearest_misses_whatever_order_they_come_in() {
        let rules = [Rule::Tier, Rule::Score, Rule::Capacity, Rule::Region];
        let all: Vec<(u32, Rejection)> = (0..40u32)
            .map(|rank| {
                let rule = rules[(rank as usize * 7) % rules.len()];
                (rank, rejection(rule, &format!("dc{rank:02}")))
            })
            .collect();
        let mut expected: Vec<&(u32, Rejection)> = all.iter().collect();
        expected.sort_by(|a, b| b.1.rule.cmp(&a.1.rule).then(a.0.cmp(&b.0)));
        let mut expected: Vec<u32> = expected.iter().take(9).map(|(rank, _)| *rank).collect();
        expected.sort_unstable();
        for rotation in [0, 13, 29] {
            let mut nearest = Rejections::new(Some(9));
            for i in 0..all.len() {
                let (rank, r) = &all[(i + rotation) % all.len()];
                if nearest.wants(r.rule, *rank) {
                    nearest.push((*rank, r.clone()));
                }
            }
            let kept: Vec<u32> = nearest
                .into_sorted()
                .iter()
                .map(|r| r.data_center[2..].parse().unwrap())
                .collect();
            assert_eq!(kept, expected, "rotation {rotation}");
        }
        let mut every = Rejections::new(None);
        for r in all.iter().rev() {
            every.push(r.clone());
        }
        assert_eq!(every.into_sorted().len(), 40);
        let mut none = Rejections::new(Some(0));
        assert!(!none.wants(Rule::Score, 0));
        none.push(all[0].clone());
        assert!(none.into_sorted().is_empty());
    }
}
