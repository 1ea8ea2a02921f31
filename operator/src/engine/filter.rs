//! Filter: the hard rules. Those that ignore what runs where are decided
//! once per class of workloads with the same rules ([`RuleClass`]); cordon
//! and reachability, which depend on the workload's current replicas, per
//! workload.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::model::{
    self, DataCenter, FallbackGroup, Reachability, Selector, StrategyKind, TaintEffect, Tier,
    Toleration, Workload,
};
use super::nearest::Rejections;
use super::score::{Scored, StaticParts};
use super::{Candidate, EXCLUDED, KEEP_ONLY, Rule, Scheduler, Verdict};

/// What the hard rules that ignore current placement say about every data
/// center, for one class of workloads with the same rules. Computed once per
/// class and run: in a city most workloads share a handful of rule sets.
pub(super) struct RuleClass {
    /// Per data center: `Ok((group, discouraged))` or the first rule that
    /// rejects it (the message is empty unless explaining).
    pub(super) verdicts: Vec<Verdict>,
    /// The data centers that pass, in index order.
    pub(super) pass: Vec<usize>,
    /// Rejections per rule among `verdicts`.
    pub(super) rejected_by_rule: BTreeMap<Rule, u32>,
    /// Static score components over `pass`.
    pub(super) parts: Rc<StaticParts>,
}

/// Everything the placement-independent rules and static scores read.
#[derive(PartialEq, Eq, Hash)]
pub(super) struct ClassKey<'a> {
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
pub(super) const MAX_CLASSES: usize = 1024;

/// What the filter leaves for scoring and explaining.
pub(super) struct Filtered {
    /// Rejections so far (none unless explaining).
    pub(super) rejections: Rejections,
    /// Rejections per rule so far.
    pub(super) rejected_by_rule: BTreeMap<Rule, u32>,
    /// Static score components over the data centers that passed.
    pub(super) parts: Rc<StaticParts>,
}

impl<'a> Scheduler<'a> {
    /// Runs the hard rules for the workload being placed (its current
    /// replicas are in `here`): cordon and reachability first, then the
    /// class's verdicts. Marks `trouble` for the scoring stage.
    pub(super) fn filter(&mut self, workload: &Workload, class: &RuleClass) -> Filtered {
        let dcs = &self.snapshot.data_centers;
        let explain = self.options.explain;
        let mut rejections = Rejections::new(self.options.explain_nearest);
        let mut rejected_by_rule = class.rejected_by_rule.clone();
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
                    if explain && rejections.wants(rule, self.shape.name_rank[dc]) {
                        rejections.push(self.rejection(dc, rule, message, None));
                    }
                }
            }
        }
        if explain {
            for (dc, verdict) in class.verdicts.iter().enumerate() {
                if let Err((rule, message)) = verdict
                    && self.trouble[dc] != EXCLUDED
                    && rejections.wants(*rule, self.shape.name_rank[dc])
                {
                    let message = if self.options.explain_nearest.is_some() {
                        match self.static_rules(workload, &dcs[dc], true) {
                            Err((_, message)) => message,
                            Ok(_) => String::new(),
                        }
                    } else {
                        message.clone()
                    };
                    rejections.push(self.rejection(dc, *rule, message, None));
                }
            }
        }
        let parts = if same_set {
            Rc::clone(&class.parts)
        } else {
            let set: Vec<usize> = class
                .pass
                .iter()
                .copied()
                .filter(|&dc| self.trouble[dc] != EXCLUDED)
                .collect();
            Rc::new(StaticParts::over(&workload.placement, dcs, &set))
        };
        Filtered {
            rejections,
            rejected_by_rule,
            parts,
        }
    }

    /// Leaves the workload one candidate per member cluster that data
    /// centers share, and rejects the rest by [`Rule::SharedCluster`]: a
    /// copy is one object under the workload's name in its member, so two
    /// data centers of one cluster cannot both hold one. The one kept is
    /// where the workload runs (most replicas), else the earliest fallback
    /// group, then one without a discouraging taint, the one where more of
    /// its replicas fit, the best score, the first name.
    pub(super) fn one_per_cluster(
        &self,
        workload: &Workload,
        filtered: &mut Filtered,
        scored: &mut Scored,
    ) {
        if !self.shape.any_shared {
            return;
        }
        let shared = &self.shape.shared_cluster;
        let wanted = workload.replicas;
        let preference = |c: &Candidate| {
            (
                c.current,
                std::cmp::Reverse(c.group),
                !c.discouraged,
                c.available.min(wanted),
                c.total,
                std::cmp::Reverse(c.rank),
            )
        };
        // Cluster -> (candidate index, data center) of the one kept.
        let mut kept: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (i, c) in scored.candidates.iter().enumerate() {
            let Some(cluster) = shared[c.dc] else {
                continue;
            };
            let better = kept
                .get(&cluster)
                .is_none_or(|&(k, _)| preference(c) > preference(&scored.candidates[k]));
            if better {
                kept.insert(cluster, (i, c.dc));
            }
        }
        if kept.is_empty() {
            return;
        }
        let dcs = &self.snapshot.data_centers;
        let candidates = std::mem::take(&mut scored.candidates);
        for (i, c) in candidates.into_iter().enumerate() {
            match shared[c.dc].map(|cluster| kept[&cluster]) {
                Some((k, chosen)) if k != i => {
                    *filtered
                        .rejected_by_rule
                        .entry(Rule::SharedCluster)
                        .or_insert(0) += 1;
                    if self.options.explain
                        && filtered
                            .rejections
                            .wants(Rule::SharedCluster, self.shape.name_rank[c.dc])
                    {
                        let message = format!(
                            "shares its member cluster with {}, which this workload runs in or \
                             prefers: it runs in one data center per member cluster",
                            dcs[chosen].name
                        );
                        filtered.rejections.push(self.rejection(
                            c.dc,
                            Rule::SharedCluster,
                            message,
                            Some(scored.breakdown(&c)),
                        ));
                    }
                }
                _ => scored.candidates.push(c),
            }
        }
    }

    pub(super) fn rule_class(&mut self, workload: &'a Workload) -> Rc<RuleClass> {
        let key = ClassKey::of(workload);
        if let Some(class) = self.classes.get(&key) {
            return Rc::clone(class);
        }
        let dcs = &self.snapshot.data_centers;
        // Explaining only the nearest misses, the few kept get their
        // message when they are kept ([`Scheduler::filter`]).
        let messages = self.options.explain && self.options.explain_nearest.is_none();
        let verdicts: Vec<_> = dcs
            .iter()
            .map(|dc| self.static_rules(workload, dc, messages))
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

    /// Cordon, reachability and NoSchedule taints, the rules that depend on
    /// what the workload runs in `dc` now (`here`). `Ok(keep_only)`.
    pub(super) fn trouble_rules(
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
        // NoExecute moves running replicas away unless tolerated; a
        // toleration for a while keeps them that long, taking nothing new.
        match model::no_execute(&workload.placement.tolerations, dc, self.snapshot.now_unix) {
            model::NoExecute::Stays => {}
            model::NoExecute::Leaves(key) => {
                return Err((
                    Rule::Taint,
                    msg!(
                        self,
                        "taint `{key}` (NoExecute) is not tolerated, or no longer"
                    ),
                ));
            }
            model::NoExecute::StaysUntil(until, key) => {
                if here == 0 {
                    return Err((
                        Rule::Taint,
                        msg!(
                            self,
                            "taint `{key}` (NoExecute) is tolerated only until {until}; takes no new replicas"
                        ),
                    ));
                }
                keep_only = true;
            }
        }
        // NoSchedule keeps new replicas away and leaves running ones be, as
        // in Kubernetes and Karmada: a taint added to a data center does not
        // evict what runs there.
        if let Some(taint) = dc.taints.iter().find(|t| {
            t.effect == TaintEffect::NoSchedule
                && !workload
                    .placement
                    .tolerations
                    .iter()
                    .any(|tol| tol.tolerates(t))
        }) {
            if here == 0 {
                return Err((
                    Rule::Taint,
                    msg!(self, "taint `{}` (NoSchedule) is not tolerated", taint.key),
                ));
            }
            keep_only = true;
        }
        Ok(keep_only)
    }

    /// The hard rules after cordon and reachability, in order; they read
    /// only what [`ClassKey`] holds. `Ok((group, discouraged))`.
    /// `messages`: whether to say what failed (only the rule otherwise).
    pub(super) fn static_rules(
        &self,
        workload: &Workload,
        dc: &DataCenter,
        messages: bool,
    ) -> Verdict {
        let rules = &workload.placement;
        if !rules.required_tiers.is_empty() && !rules.required_tiers.contains(&dc.tier) {
            return Err((
                Rule::Tier,
                msg!(
                    if messages,
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
                    if messages,
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
                        msg!(if messages, "in none of the fallback groups"),
                    ));
                }
            }
        };
        if let Some(selector) = &rules.selector
            && !selector.matches(&dc.labels)
        {
            return Err((
                Rule::Selector,
                msg!(if messages, "labels do not match dataCenterSelector"),
            ));
        }
        let untolerated = |effect: TaintEffect| {
            dc.taints.iter().find(|t| {
                t.effect == effect && !rules.tolerations.iter().any(|tol| tol.tolerates(t))
            })
        };
        // An untolerated NoSchedule taint is judged with cordon and
        // reachability (`trouble_rules`): it depends on what runs here now.
        if let Some(missing) = rules
            .required_datasets
            .iter()
            .find(|d| !dc.datasets.contains(*d))
        {
            return Err((
                Rule::Dataset,
                msg!(if messages, "does not host required dataset `{missing}`"),
            ));
        }
        if let Some((site, max_ms)) = &rules.max_latency {
            match dc.latency_ms.get(site) {
                None => {
                    return Err((
                        Rule::Latency,
                        msg!(if messages, "no latency known to site `{site}`"),
                    ));
                }
                Some(ms) if ms > max_ms => {
                    return Err((
                        Rule::Latency,
                        msg!(if messages, "{ms} ms to `{site}` exceeds the {max_ms} ms bound"),
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
                            if messages,
                            "has {has} `{model}` GPUs; a replica needs {}",
                            demand.gpu_count
                        ),
                        None => {
                            msg!(if messages, "has no GPU model with {} GPUs", demand.gpu_count)
                        }
                    },
                ));
            }
        }
        if rules.strategy == StrategyKind::StaticWeights
            && rules.static_weights.get(&dc.name).copied().unwrap_or(0) == 0
        {
            return Err((
                Rule::StaticWeight,
                msg!(if messages, "has no static weight"),
            ));
        }
        let discouraged = untolerated(TaintEffect::PreferNoSchedule).is_some();
        Ok((group, discouraged))
    }
}
