//! Table tests for each filter, score, strategy and explanation of the engine,
//! and property tests for its invariants.

use std::collections::{BTreeMap, BTreeSet};

use civicgrid_operator::engine::model::*;
use civicgrid_operator::engine::{
    Decision, Options, Outcome, Pool, Rule, Schedule, schedule, schedule_only,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn dc(name: &str, tier: Tier, region: &str, zone: &str, cores: u64, gib: u64) -> DataCenter {
    DataCenter {
        name: name.to_owned(),
        tier,
        region: region.to_owned(),
        zone: zone.to_owned(),
        labels: BTreeMap::new(),
        taints: Vec::new(),
        capacity: Resources {
            cpu_millis: cores * 1000,
            memory_bytes: gib * GIB,
            ephemeral_bytes: u64::MAX,
            gpus: BTreeMap::new(),
        },
        cost_per_core_hour: 1,
        cost_per_gib_hour: 1,
        cost_per_gpu_hour: BTreeMap::new(),
        carbon_intensity: Some(300),
        pue_milli: 1200,
        latency_ms: BTreeMap::new(),
        datasets: BTreeSet::new(),
        cordoned: false,
        reachability: Reachability::Reachable,
        cluster: None,
    }
}

fn workload(name: &str, replicas: u32, cores: u64, gib: u64) -> Workload {
    Workload {
        key: WorkloadKey::new("ns", name),
        replicas,
        demand: ReplicaDemand {
            cpu_millis: cores * 1000,
            memory_bytes: gib * GIB,
            ..ReplicaDemand::default()
        },
        placement: PlacementRules::default(),
        priority: 0,
        preemption: PreemptionPolicy::Never,
        grace_period_seconds: 60,
    }
}

fn snapshot(data_centers: Vec<DataCenter>, workloads: Vec<Workload>) -> Snapshot {
    Snapshot {
        now_unix: 1_000_000,
        data_centers,
        workloads,
        current: BTreeMap::new(),
    }
}

fn run(s: &Snapshot) -> Schedule {
    schedule(s, &Options::default())
}

fn placement(s: &Schedule, name: &str) -> BTreeMap<String, u32> {
    s.decision(&WorkloadKey::new("ns", name))
        .map(|d| d.placement.clone())
        .unwrap_or_default()
}

fn rule_for(s: &Schedule, workload: &str, dc: &str) -> Option<Rule> {
    s.decision(&WorkloadKey::new("ns", workload))?
        .rejections
        .iter()
        .find(|r| r.data_center == dc)
        .map(|r| r.rule)
}

fn three_dcs() -> Vec<DataCenter> {
    vec![
        dc("core", Tier::Municipal, "city", "a", 16, 64),
        dc("edge", Tier::Edge, "city", "b", 8, 32),
        dc("partner", Tier::Partner, "metro", "c", 32, 128),
    ]
}

#[test]
fn each_hard_rule_rejects_with_its_own_reason() {
    let mut dcs = three_dcs();
    dcs.push({
        let mut d = dc("cordoned", Tier::Municipal, "city", "a", 16, 64);
        d.cordoned = true;
        d
    });
    dcs.push({
        let mut d = dc("tainted", Tier::Municipal, "city", "a", 16, 64);
        d.taints.push(Taint {
            key: "gpu-only".into(),
            value: None,
            effect: TaintEffect::NoSchedule,
            added_unix: None,
        });
        d
    });
    dcs.push({
        let mut d = dc("down", Tier::Municipal, "city", "a", 16, 64);
        d.reachability = Reachability::UnreachableSince(0);
        d
    });
    let mut w = workload("w", 1, 1, 1);
    w.placement.required_tiers = [Tier::Municipal, Tier::Partner].into();
    w.placement.allowed_regions = ["city".to_owned()].into();
    let s = run(&snapshot(dcs, vec![w]));
    assert_eq!(placement(&s, "w"), BTreeMap::from([("core".to_owned(), 1)]));
    assert_eq!(rule_for(&s, "w", "edge"), Some(Rule::Tier));
    assert_eq!(rule_for(&s, "w", "partner"), Some(Rule::Region));
    assert_eq!(rule_for(&s, "w", "cordoned"), Some(Rule::Cordoned));
    assert_eq!(rule_for(&s, "w", "tainted"), Some(Rule::Taint));
    assert_eq!(rule_for(&s, "w", "down"), Some(Rule::Unreachable));
}

#[test]
fn selector_dataset_latency_and_gpu_rules_filter() {
    let mut dcs = three_dcs();
    dcs[0].labels.insert("security".into(), "restricted".into());
    dcs[0].datasets.insert("register".into());
    dcs[0].latency_ms.insert("cams".into(), 4);
    dcs[0].capacity.gpus.insert("l4".into(), 4);
    dcs[1].labels.insert("security".into(), "restricted".into());
    dcs[1].latency_ms.insert("cams".into(), 4);
    dcs[2].labels.insert("security".into(), "restricted".into());
    dcs[2].datasets.insert("register".into());
    dcs[2].latency_ms.insert("cams".into(), 40);
    let mut w = workload("w", 1, 1, 1);
    w.placement.selector = Some(Selector {
        match_labels: BTreeMap::from([("security".into(), "restricted".into())]),
        expressions: vec![],
    });
    w.placement.required_datasets = ["register".to_owned()].into();
    w.placement.max_latency = Some(("cams".into(), 10));
    w.demand.gpu_count = 1;
    w.demand.gpu_model = Some("l4".into());
    let mut no_label = dc("plain", Tier::Municipal, "city", "a", 16, 64);
    no_label.datasets.insert("register".into());
    let mut no_gpu = dcs[0].clone();
    no_gpu.name = "no-gpu".into();
    no_gpu.capacity.gpus.clear();
    dcs.push(no_label);
    dcs.push(no_gpu);
    let s = run(&snapshot(dcs, vec![w]));
    assert_eq!(placement(&s, "w"), BTreeMap::from([("core".to_owned(), 1)]));
    assert_eq!(rule_for(&s, "w", "edge"), Some(Rule::Dataset));
    assert_eq!(rule_for(&s, "w", "partner"), Some(Rule::Latency));
    assert_eq!(rule_for(&s, "w", "plain"), Some(Rule::Selector));
    assert_eq!(rule_for(&s, "w", "no-gpu"), Some(Rule::Gpu));
}

#[test]
fn cost_and_carbon_weights_pick_the_cheap_clean_data_center() {
    let mut dcs = three_dcs();
    dcs[2].cost_per_core_hour = 0;
    dcs[2].carbon_intensity = Some(50);
    let mut w = workload("w", 2, 1, 1);
    w.placement.weights = Weights {
        free_capacity: 0,
        cost: 1,
        carbon: 1,
        latency: 0,
        locality: 0,
        tier: 0,
    };
    let s = run(&snapshot(dcs, vec![w]));
    assert_eq!(
        placement(&s, "w"),
        BTreeMap::from([("partner".to_owned(), 2)])
    );
    let d = s.decision(&WorkloadKey::new("ns", "w")).expect("decision");
    let lost = d
        .rejections
        .iter()
        .find(|r| r.data_center == "core")
        .expect("core explained");
    assert_eq!(lost.rule, Rule::Score);
    assert!(
        lost.score
            .is_some_and(|b| b.total < d.scores["partner"].total)
    );
}

/// A data center that publishes no carbon intensity scores the middle of
/// the carbon range: the known ones keep their order (it used to rank as
/// the largest number, every known data center then scored the same, and
/// carbon-aware placement switched off).
#[test]
fn an_unknown_carbon_intensity_is_neutral_and_the_known_keep_their_order() {
    let mut dcs = three_dcs();
    dcs[0].carbon_intensity = Some(300);
    dcs[1].carbon_intensity = Some(100);
    dcs[2].carbon_intensity = None;
    let mut w = workload("w", 2, 1, 1);
    w.placement.weights = Weights {
        free_capacity: 0,
        cost: 0,
        carbon: 1,
        latency: 0,
        locality: 0,
        tier: 0,
    };
    let s = run(&snapshot(dcs, vec![w]));
    assert_eq!(placement(&s, "w"), BTreeMap::from([("edge".to_owned(), 2)]));
    let d = s.decision(&WorkloadKey::new("ns", "w")).expect("decision");
    let carbon = |dc: &str| {
        d.scores
            .get(dc)
            .or_else(|| {
                d.rejections
                    .iter()
                    .find(|r| r.data_center == dc)
                    .and_then(|r| r.score.as_ref())
            })
            .map(|b| b.carbon)
    };
    assert_eq!(
        (carbon("edge"), carbon("core"), carbon("partner")),
        (Some(100), Some(0), Some(50))
    );
}

/// A declared preference counts without weights being set: the CRD says
/// preferred data centers score higher (with the old defaults a preferred
/// dataset weighed nothing, and the tie went to the first name).
#[test]
fn a_preferred_dataset_counts_under_the_default_weights() {
    let mut dcs = vec![
        dc("core", Tier::Municipal, "city", "a", 16, 64),
        dc("edge", Tier::Municipal, "city", "b", 16, 64),
        dc("partner", Tier::Municipal, "city", "c", 16, 64),
    ];
    dcs[1].datasets.insert("traffic-video".into());
    let mut w = workload("w", 2, 1, 1);
    w.placement
        .preferred_datasets
        .insert("traffic-video".into());
    assert_eq!(w.placement.weights, Weights::default());
    let s = run(&snapshot(dcs, vec![w]));
    assert_eq!(placement(&s, "w"), BTreeMap::from([("edge".to_owned(), 2)]));
}

#[test]
fn fallback_group_is_used_only_when_the_first_is_full() {
    let dcs = three_dcs();
    let mut w = workload("w", 20, 1, 1);
    w.placement.fallback_groups = vec![
        FallbackGroup {
            name: "municipal".into(),
            tiers: [Tier::Municipal].into(),
            ..FallbackGroup::default()
        },
        FallbackGroup {
            name: "partner".into(),
            tiers: [Tier::Partner].into(),
            ..FallbackGroup::default()
        },
    ];
    let s = run(&snapshot(dcs.clone(), vec![w.clone()]));
    assert_eq!(
        placement(&s, "w"),
        BTreeMap::from([("core".to_owned(), 16), ("partner".to_owned(), 4)])
    );
    assert_eq!(rule_for(&s, "w", "edge"), Some(Rule::FallbackGroup));
    w.replicas = 10;
    let s = run(&snapshot(dcs, vec![w]));
    assert_eq!(
        placement(&s, "w"),
        BTreeMap::from([("core".to_owned(), 10)])
    );
    assert_eq!(rule_for(&s, "w", "partner"), Some(Rule::Fallback));
}

#[test]
fn static_weights_divide_by_largest_remainder() {
    let mut w = workload("w", 10, 1, 1);
    w.placement.strategy = StrategyKind::StaticWeights;
    w.placement.static_weights = BTreeMap::from([("core".into(), 2), ("partner".into(), 1)]);
    let s = run(&snapshot(three_dcs(), vec![w]));
    assert_eq!(
        placement(&s, "w"),
        BTreeMap::from([("core".to_owned(), 7), ("partner".to_owned(), 3)])
    );
    assert_eq!(rule_for(&s, "w", "edge"), Some(Rule::StaticWeight));
}

/// The largest weights the CRD allows divide without overflow.
#[test]
fn static_weights_at_their_maximum_divide_without_overflow() {
    let dcs = vec![
        dc("a", Tier::Municipal, "city", "a", 2, 64),
        dc("b", Tier::Municipal, "city", "b", 8, 64),
    ];
    let mut w = workload("w", 5, 1, 1);
    w.placement.strategy = StrategyKind::StaticWeights;
    w.placement.static_weights =
        BTreeMap::from([("a".to_owned(), u32::MAX), ("b".to_owned(), u32::MAX)]);
    let out = run(&snapshot(dcs, vec![w]));
    assert_eq!(
        placement(&out, "w"),
        BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 3)])
    );
}

/// A gang no data center may take says so, rather than that too few
/// replicas fit.
#[test]
fn a_gang_no_data_center_passes_says_so() {
    let mut w = workload("w", 4, 1, 1);
    w.placement.gang = true;
    w.placement.allowed_regions = ["nowhere".to_owned()].into();
    let out = run(&snapshot(three_dcs(), vec![w]));
    let d = out.decision(&WorkloadKey::new("ns", "w")).expect("w");
    assert_eq!(d.outcome, Outcome::Unschedulable);
    let reason = d.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("no data center passes the hard rules") && reason.contains("Region: 3"),
        "{reason}"
    );
}

/// A `maxDomains: 1` workload that outgrew the data center it runs in
/// moves whole to one that can take all of it, rather than stay partial.
#[test]
fn max_domains_moves_to_the_domain_that_fits() {
    let dcs = vec![
        dc("small", Tier::Municipal, "city", "a", 4, 64),
        dc("large", Tier::Municipal, "city", "b", 10, 64),
    ];
    let mut w = workload("w", 8, 1, 1);
    w.placement.spread.max_domains = Some(1);
    let mut s = snapshot(dcs, vec![w]);
    s.current.insert(
        WorkloadKey::new("ns", "w"),
        BTreeMap::from([("small".into(), 4)]),
    );
    let out = run(&s);
    assert_eq!(
        placement(&out, "w"),
        BTreeMap::from([("large".to_owned(), 8)])
    );
    assert_eq!(
        out.decision(&WorkloadKey::new("ns", "w"))
            .expect("w")
            .outcome,
        Outcome::Scheduled
    );
}

/// What a full data center cannot take goes to the others by their
/// weights, not all to the heaviest with room (Karmada divides it the
/// same way).
#[test]
fn static_weights_overflow_is_divided_by_weight() {
    let dcs = vec![
        dc("core", Tier::Municipal, "city", "a", 2, 64),
        dc("edge", Tier::Edge, "city", "b", 16, 64),
        dc("partner", Tier::Partner, "metro", "c", 16, 64),
    ];
    let mut w = workload("w", 8, 1, 1);
    w.placement.strategy = StrategyKind::StaticWeights;
    w.placement.static_weights = BTreeMap::from([
        ("core".to_owned(), 4),
        ("edge".to_owned(), 1),
        ("partner".to_owned(), 1),
    ]);
    let s = run(&snapshot(dcs, vec![w]));
    // core's exact share is 6 of 8 but it has room for 2; the 4 over are
    // split 1:1.
    assert_eq!(
        placement(&s, "w"),
        BTreeMap::from([
            ("core".to_owned(), 2),
            ("edge".to_owned(), 3),
            ("partner".to_owned(), 3)
        ])
    );
}

#[test]
fn available_capacity_divides_in_proportion_to_room() {
    let mut w = workload("w", 14, 1, 1);
    w.placement.strategy = StrategyKind::AvailableCapacity;
    let s = run(&snapshot(three_dcs(), vec![w]));
    // Room: core 16, edge 8, partner 32 → 4 : 2 : 8.
    assert_eq!(
        placement(&s, "w"),
        BTreeMap::from([
            ("core".to_owned(), 4),
            ("edge".to_owned(), 2),
            ("partner".to_owned(), 8)
        ])
    );
}

#[test]
fn duplicated_runs_a_full_copy_per_zone_within_spread_bounds() {
    let mut w = workload("w", 3, 1, 1);
    w.placement.strategy = StrategyKind::Duplicated;
    w.placement.spread = Spread {
        by: SpreadDomain::Zone,
        min_domains: Some(2),
        max_domains: Some(2),
        max_replicas_per_data_center: None,
    };
    let s = run(&snapshot(three_dcs(), vec![w]));
    let p = placement(&s, "w");
    assert_eq!(p.len(), 2);
    assert!(p.values().all(|n| *n == 3));
    assert_eq!(s.decisions[0].outcome, Outcome::Scheduled);
}

/// Two data centers of one member cluster would hold a workload's copies as
/// one object under one name: a workload gets at most one of them, whatever
/// the strategy, and the other is explained by the cluster it shares.
#[test]
fn a_workload_runs_in_one_data_center_per_member_cluster() {
    let mut dcs = three_dcs();
    dcs[0].cluster = Some("uid-shared".into());
    dcs[1].cluster = Some("uid-shared".into());
    dcs[2].cluster = Some("uid-partner".into());
    let mut copies = workload("copies", 2, 1, 1);
    copies.placement.strategy = StrategyKind::Duplicated;
    // More than partner and the larger of core and edge can hold together
    // without the smaller one.
    let mut wide = workload("wide", 12, 4, 4);
    wide.placement.strategy = StrategyKind::AvailableCapacity;
    let s = run(&snapshot(dcs.clone(), vec![copies, wide]));
    assert_eq!(
        placement(&s, "copies"),
        BTreeMap::from([("core".to_owned(), 2), ("partner".to_owned(), 2)])
    );
    assert_eq!(rule_for(&s, "copies", "edge"), Some(Rule::SharedCluster));
    let why = s
        .decision(&WorkloadKey::new("ns", "copies"))
        .unwrap()
        .rejections
        .iter()
        .find(|r| r.data_center == "edge")
        .unwrap()
        .message
        .clone();
    assert!(why.contains("shares its member cluster with core"), "{why}");
    let wide = placement(&s, "wide");
    assert!(!wide.contains_key("edge"), "{wide:?}");
    assert_eq!(rule_for(&s, "wide", "edge"), Some(Rule::SharedCluster));
    let counted = &s
        .decision(&WorkloadKey::new("ns", "wide"))
        .unwrap()
        .rejected_by_rule;
    assert_eq!(counted.get(&Rule::SharedCluster), Some(&1));

    // Where the workload already runs is the one it keeps, though core
    // scores as well.
    let mut s = snapshot(dcs, vec![workload("settled", 2, 1, 1)]);
    running(&mut s, "settled", "edge", 2);
    let out = run(&s);
    assert_eq!(
        placement(&out, "settled"),
        BTreeMap::from([("edge".to_owned(), 2)])
    );
    assert_eq!(rule_for(&out, "settled", "core"), Some(Rule::SharedCluster));
}

/// `minDomains` counts domains, not data centers, for every strategy: two
/// copies in one zone are one zone, and a spread that did not hold is not
/// `Scheduled`; the reason names the spread.
#[test]
fn a_spread_that_does_not_hold_is_not_scheduled_whatever_the_strategy() {
    let mut dcs = three_dcs();
    // core and edge share zone a; partner (zone c) is ruled out by tier.
    dcs[1].zone = "a".to_owned();
    let spread = Spread {
        by: SpreadDomain::Zone,
        min_domains: Some(2),
        max_domains: None,
        max_replicas_per_data_center: None,
    };
    let mut duplicated = workload("duplicated", 1, 1, 1);
    duplicated.placement.strategy = StrategyKind::Duplicated;
    let mut divided = workload("divided", 4, 1, 1);
    for w in [&mut duplicated, &mut divided] {
        w.placement.spread = spread;
        w.placement.required_tiers = BTreeSet::from([Tier::Municipal, Tier::Edge]);
    }
    let s = run(&snapshot(dcs, vec![duplicated, divided]));
    for name in ["duplicated", "divided"] {
        let d = s.decision(&WorkloadKey::new("ns", name)).expect("decision");
        assert!(!d.placement.is_empty(), "{name}: {d:?}");
        assert_eq!(d.outcome, Outcome::PartiallyScheduled, "{name}: {d:?}");
        assert_eq!(
            d.reason.as_deref(),
            Some("spread: placed in 1 Zone domain(s); minDomains needs 2"),
            "{name}"
        );
    }
}

#[test]
fn min_domains_spreads_a_score_placement() {
    let mut w = workload("w", 4, 1, 1);
    w.placement.spread.min_domains = Some(3);
    let s = run(&snapshot(three_dcs(), vec![w]));
    let p = placement(&s, "w");
    assert_eq!(p.len(), 3, "{p:?}");
    assert_eq!(p.values().sum::<u32>(), 4);
}

#[test]
fn gang_places_nothing_when_not_everything_fits() {
    let mut w = workload("w", 100, 1, 1);
    w.placement.gang = true;
    let s = run(&snapshot(three_dcs(), vec![w]));
    let d = &s.decisions[0];
    assert!(d.placement.is_empty());
    assert_eq!(d.outcome, Outcome::Unschedulable);
    assert!(
        d.reason.as_deref().is_some_and(|r| r.contains("56 of 100")),
        "{:?}",
        d.reason
    );
}

#[test]
fn unschedulable_workload_gets_a_precise_reason() {
    let mut w = workload("w", 1, 1, 1);
    w.placement.allowed_regions = ["nowhere".to_owned()].into();
    let s = run(&snapshot(three_dcs(), vec![w]));
    let reason = s.decisions[0].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no data center passes the hard rules"),
        "{reason}"
    );
    assert!(reason.contains("Region: 3"), "{reason}");
}

#[test]
fn higher_priority_preempts_only_strictly_lower_priority() {
    let dcs = vec![dc("only", Tier::Municipal, "city", "a", 10, 100)];
    let mut low = workload("low", 10, 1, 1);
    low.priority = 1;
    let mut same = workload("same", 0, 1, 1);
    same.priority = 5;
    let mut high = workload("high", 4, 1, 1);
    high.priority = 5;
    high.preemption = PreemptionPolicy::PreemptLowerPriority;
    let mut s = snapshot(dcs, vec![low, high, same]);
    s.current.insert(
        WorkloadKey::new("ns", "low"),
        BTreeMap::from([("only".into(), 10)]),
    );
    let out = run(&s);
    assert_eq!(
        placement(&out, "high"),
        BTreeMap::from([("only".to_owned(), 4)])
    );
    assert_eq!(
        placement(&out, "low"),
        BTreeMap::from([("only".to_owned(), 6)])
    );
    let pre = &out
        .decision(&WorkloadKey::new("ns", "high"))
        .expect("high")
        .preemptions;
    assert_eq!(pre.len(), 1);
    assert_eq!(pre[0].victim, WorkloadKey::new("ns", "low"));
    assert_eq!(pre[0].replicas, 4);

    // Equal priority is never preempted.
    let dcs = vec![dc("only", Tier::Municipal, "city", "a", 10, 100)];
    let mut peer = workload("peer", 10, 1, 1);
    peer.priority = 5;
    let mut newcomer = workload("newcomer", 4, 1, 1);
    newcomer.priority = 5;
    newcomer.preemption = PreemptionPolicy::PreemptLowerPriority;
    let mut s = snapshot(dcs, vec![peer, newcomer]);
    s.current.insert(
        WorkloadKey::new("ns", "peer"),
        BTreeMap::from([("only".into(), 10)]),
    );
    let out = run(&s);
    assert_eq!(
        placement(&out, "peer"),
        BTreeMap::from([("only".to_owned(), 10)])
    );
    assert!(placement(&out, "newcomer").is_empty());
}

fn running(s: &mut Snapshot, name: &str, dc: &str, replicas: u32) {
    s.current.insert(
        WorkloadKey::new("ns", name),
        BTreeMap::from([(dc.to_owned(), replicas)]),
    );
}

fn preemptions(s: &Schedule, name: &str) -> Vec<(String, String, u32)> {
    s.decision(&WorkloadKey::new("ns", name))
        .expect("decision")
        .preemptions
        .iter()
        .map(|p| (p.victim.name.clone(), p.data_center.clone(), p.replicas))
        .collect()
}

fn preempting(name: &str, replicas: u32, cores: u64, priority: i32) -> Workload {
    let mut w = workload(name, replicas, cores, 1);
    w.priority = priority;
    w.preemption = PreemptionPolicy::PreemptLowerPriority;
    w
}

/// Missing a GPU, only a GPU holder is evicted: a CPU-only job frees
/// nothing the preemptor lacks. And the CPU the GPU job's eviction frees
/// beyond the need sits out the round: a `Never` workload decided next
/// does not gain it.
#[test]
fn preemption_evicts_only_victims_holding_the_missing_resource() {
    let mut only = dc("only", Tier::Municipal, "city", "a", 8, 64);
    only.capacity.gpus.insert("l4".into(), 1);
    let mut cpu_job = workload("cpu-job", 4, 1, 1);
    cpu_job.priority = 1;
    let mut gpu_job = workload("gpu-job", 1, 1, 1);
    gpu_job.priority = 1;
    gpu_job.demand.gpu_count = 1;
    gpu_job.demand.gpu_model = Some("l4".into());
    let mut trainer = preempting("trainer", 1, 1, 10);
    trainer.demand.gpu_count = 1;
    trainer.demand.gpu_model = Some("l4".into());
    let mut never = workload("never", 3, 1, 1);
    never.priority = 5;
    let mut s = snapshot(vec![only], vec![cpu_job, gpu_job, trainer, never]);
    running(&mut s, "cpu-job", "only", 4);
    running(&mut s, "gpu-job", "only", 1);
    let out = run(&s);
    assert_eq!(
        placement(&out, "trainer"),
        BTreeMap::from([("only".to_owned(), 1)])
    );
    assert_eq!(
        preemptions(&out, "trainer"),
        vec![("gpu-job".to_owned(), "only".to_owned(), 1)]
    );
    // 8 cores: 4 cpu-job + 1 trainer + 1 freed by gpu-job and reserved
    // leaves 2 for `never`, not the 3 the freed core would make.
    assert_eq!(
        placement(&out, "never"),
        BTreeMap::from([("only".to_owned(), 2)])
    );
    assert_eq!(
        placement(&out, "cpu-job"),
        BTreeMap::from([("only".to_owned(), 4)])
    );
    let victim = out
        .decision(&WorkloadKey::new("ns", "gpu-job"))
        .expect("gpu-job");
    assert!(victim.placement.is_empty());
    assert_eq!(victim.preempted_by.len(), 1);
    assert_eq!(
        victim.preempted_by[0].preemptor,
        WorkloadKey::new("ns", "trainer")
    );
    assert_eq!(victim.preempted_by[0].data_center, "only");
    assert_eq!(victim.preempted_by[0].replicas, 1);
}

/// Free room elsewhere covers what it can; preemption covers only the
/// rest, even though the full data center is the preferred one.
#[test]
fn preemption_covers_only_the_shortfall_free_room_cannot() {
    let mut preferred = dc("preferred", Tier::Municipal, "city", "a", 4, 64);
    preferred.datasets.insert("cameras".into());
    let other = dc("other", Tier::Municipal, "city", "b", 3, 64);
    let mut batch = workload("batch", 4, 1, 1);
    batch.priority = 1;
    let mut urgent = preempting("urgent", 4, 1, 10);
    urgent.placement.preferred_datasets.insert("cameras".into());
    urgent.placement.weights.locality = 100;
    let mut s = snapshot(vec![preferred, other], vec![batch, urgent]);
    running(&mut s, "batch", "preferred", 4);
    let out = run(&s);
    assert_eq!(
        placement(&out, "urgent"),
        BTreeMap::from([("other".to_owned(), 3), ("preferred".to_owned(), 1)])
    );
    assert_eq!(
        preemptions(&out, "urgent"),
        vec![("batch".to_owned(), "preferred".to_owned(), 1)]
    );
    assert_eq!(
        placement(&out, "batch"),
        BTreeMap::from([("preferred".to_owned(), 3)])
    );
    assert_eq!(
        out.decision(&WorkloadKey::new("ns", "urgent"))
            .expect("urgent")
            .preempted_room,
        BTreeMap::from([("preferred".to_owned(), 1)])
    );
}

/// Room a workload gives up goes to the short workloads of its own
/// priority decided before it, not to a lower priority that the next round
/// would evict again: `p` is denied `y` while `q`, of equal priority, still
/// holds it; `q` then scales to zero. It used to go to `l`, which also
/// evicted one `v`; the next round `p` evicted `l` from `y`, and `l`
/// evicted the second `v` (the property
/// `a_preempting_round_leaves_nothing_to_preempt` found it, with a gang
/// that no longer fit giving up the room).
#[test]
fn room_given_up_goes_to_short_workloads_of_its_priority_first() {
    let x = dc("x", Tier::Municipal, "rx", "a", 8, 64);
    let y = dc("y", Tier::Municipal, "ry", "b", 4, 64);
    let mut p = preempting("p", 1, 4, 1);
    p.placement.allowed_regions = ["ry".to_owned()].into();
    let mut q = workload("q", 0, 4, 1);
    q.priority = 1;
    let l = preempting("l", 2, 4, 0);
    let mut v = workload("v", 2, 4, 1);
    v.priority = -1;
    let mut s = snapshot(vec![x, y], vec![p, q, l, v]);
    running(&mut s, "q", "y", 1);
    running(&mut s, "v", "x", 2);
    let first = run(&s);
    assert_eq!(
        placement(&first, "p"),
        BTreeMap::from([("y".to_owned(), 1)])
    );
    assert!(preemptions(&first, "p").is_empty());
    assert!(placement(&first, "q").is_empty());
    assert_eq!(
        placement(&first, "l"),
        BTreeMap::from([("x".to_owned(), 2)])
    );
    assert_eq!(
        preemptions(&first, "l"),
        vec![("v".to_owned(), "x".to_owned(), 2)]
    );
    assert!(placement(&first, "v").is_empty());
    for name in ["p", "l"] {
        let d = first.decision(&WorkloadKey::new("ns", name)).expect(name);
        assert_eq!(d.outcome, Outcome::Scheduled, "{name}");
    }

    s.current = first.placements();
    let again = run(&s);
    assert_eq!(
        placement(&again, "p"),
        BTreeMap::from([("y".to_owned(), 1)])
    );
    assert_eq!(
        placement(&again, "l"),
        BTreeMap::from([("x".to_owned(), 2)])
    );
    for d in &again.decisions {
        assert!(
            d.preemptions.is_empty(),
            "{}: {:?}",
            d.workload,
            d.preemptions
        );
        assert_eq!(d.moved_replicas, 0, "{}", d.workload);
    }
}

/// Duplicated needs one copy (no `minDomains`): it preempts in one data
/// center, not in every one where a copy could fit.
#[test]
fn duplicated_preempts_only_for_the_domains_it_needs() {
    let dcs = vec![
        dc("a", Tier::Municipal, "city", "a", 2, 64),
        dc("b", Tier::Municipal, "city", "b", 2, 64),
        dc("c", Tier::Municipal, "city", "c", 2, 64),
    ];
    let mut workloads = Vec::new();
    for name in ["fill-a", "fill-b", "fill-c"] {
        let mut w = workload(name, 2, 1, 1);
        w.priority = 1;
        workloads.push(w);
    }
    let mut copy = preempting("copy", 2, 1, 10);
    copy.placement.strategy = StrategyKind::Duplicated;
    workloads.push(copy);
    let mut s = snapshot(dcs, workloads);
    running(&mut s, "fill-a", "a", 2);
    running(&mut s, "fill-b", "b", 2);
    running(&mut s, "fill-c", "c", 2);
    let out = run(&s);
    assert_eq!(
        placement(&out, "copy").len(),
        1,
        "{:?}",
        placement(&out, "copy")
    );
    assert_eq!(preemptions(&out, "copy").len(), 1);
    assert_eq!(
        out.decision(&WorkloadKey::new("ns", "copy"))
            .expect("copy")
            .outcome,
        Outcome::Scheduled
    );
}

/// Of equal priority, a job outside a gang is evicted before a gang,
/// whose every replica would be lost with one.
#[test]
fn preemption_prefers_victims_outside_gangs() {
    let only = dc("only", Tier::Municipal, "city", "a", 4, 64);
    let mut gang = workload("a-gang", 2, 1, 1);
    gang.priority = 1;
    gang.placement.gang = true;
    let mut solo = workload("b-solo", 2, 1, 1);
    solo.priority = 1;
    let urgent = preempting("urgent", 1, 1, 10);
    let mut s = snapshot(vec![only], vec![gang, solo, urgent]);
    running(&mut s, "a-gang", "only", 2);
    running(&mut s, "b-solo", "only", 2);
    let out = run(&s);
    assert_eq!(
        preemptions(&out, "urgent"),
        vec![("b-solo".to_owned(), "only".to_owned(), 1)]
    );
    assert_eq!(
        placement(&out, "a-gang"),
        BTreeMap::from([("only".to_owned(), 2)])
    );
}

/// The room one eviction freed beyond its need is held for the round, but a
/// second preemptor of higher priority than the victim uses it before
/// evicting anyone else (found by the attack review: it used to evict the
/// victim's second replica with 3 cores idle).
#[test]
fn reserved_room_serves_the_next_preemptor_before_new_victims() {
    let only = dc("only", Tier::Municipal, "city", "a", 8, 64);
    let v = workload("v", 2, 4, 1);
    let p1 = preempting("p1", 1, 1, 10);
    let p2 = preempting("p2", 1, 1, 9);
    let mut never = workload("never", 2, 1, 1);
    never.priority = 5;
    let mut s = snapshot(vec![only], vec![v, p1, p2, never]);
    running(&mut s, "v", "only", 2);
    let out = run(&s);
    assert_eq!(
        preemptions(&out, "p1"),
        vec![("v".to_owned(), "only".to_owned(), 1)]
    );
    assert!(preemptions(&out, "p2").is_empty());
    assert_eq!(
        placement(&out, "p2"),
        BTreeMap::from([("only".to_owned(), 1)])
    );
    assert_eq!(
        placement(&out, "v"),
        BTreeMap::from([("only".to_owned(), 1)])
    );
    // What is left of the freed room (2 cores) is still nobody else's.
    assert!(placement(&out, "never").is_empty());
}

/// Static weights divide preempted room by the weights too, so the next
/// round does not move replicas (the shortfall-only top-up ignored them).
#[test]
fn static_weights_preemption_holds_in_the_next_round() {
    let a = dc("a", Tier::Municipal, "city", "a", 3, 64);
    let b = dc("b", Tier::Municipal, "city", "b", 4, 64);
    let v = workload("v", 1, 4, 1);
    let mut p = preempting("p", 4, 1, 10);
    p.placement.strategy = StrategyKind::StaticWeights;
    p.placement.static_weights = BTreeMap::from([("a".into(), 1), ("b".into(), 1)]);
    let mut s = snapshot(vec![a, b], vec![v, p]);
    running(&mut s, "v", "b", 1);
    let out = run(&s);
    let first = placement(&out, "p");
    assert_eq!(
        first,
        BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 2)])
    );
    s.current = out.placements();
    let again = run(&s);
    assert_eq!(placement(&again, "p"), first);
    assert_eq!(
        again
            .decision(&WorkloadKey::new("ns", "p"))
            .expect("p")
            .moved_replicas,
        0
    );
}

/// Across data centers, preemption goes where the victims have the lowest
/// priority, before fill order: the preferred data center's priority-9
/// workload is not evicted while a priority-0 one blocks another.
#[test]
fn preemption_evicts_the_lowest_priority_across_data_centers() {
    let mut x = dc("x", Tier::Municipal, "city", "a", 2, 64);
    x.datasets.insert("cams".into());
    let y = dc("y", Tier::Municipal, "city", "b", 2, 64);
    let mut hi = workload("hi", 2, 1, 1);
    hi.priority = 9;
    let lo = workload("lo", 2, 1, 1);
    let mut p = preempting("p", 1, 1, 10);
    p.placement.preferred_datasets.insert("cams".into());
    let mut s = snapshot(vec![x, y], vec![hi, lo, p]);
    running(&mut s, "hi", "x", 2);
    running(&mut s, "lo", "y", 2);
    let out = run(&s);
    assert_eq!(
        preemptions(&out, "p"),
        vec![("lo".to_owned(), "y".to_owned(), 1)]
    );
}

/// A gang victim that no longer fits whole after losing a replica keeps
/// its room held for the round: a lower-priority workload does not gain
/// the three replicas' room one eviction cost it.
#[test]
fn a_collapsed_gang_victim_keeps_its_room_for_the_round() {
    let only = dc("only", Tier::Municipal, "city", "a", 4, 64);
    let mut gang = workload("gang", 4, 1, 1);
    gang.priority = 1;
    gang.placement.gang = true;
    let p = preempting("p", 1, 1, 10);
    let never = workload("never", 3, 1, 1);
    let mut s = snapshot(vec![only], vec![gang, p, never]);
    running(&mut s, "gang", "only", 4);
    let out = run(&s);
    assert_eq!(
        placement(&out, "p"),
        BTreeMap::from([("only".to_owned(), 1)])
    );
    assert!(placement(&out, "gang").is_empty());
    assert!(
        placement(&out, "never").is_empty(),
        "{:?}",
        placement(&out, "never")
    );
}

/// A data center already over its capacity (it shrank) sheds the excess
/// too before a preemptor's need counts as met.
#[test]
fn preemption_in_an_over_full_data_center_sheds_the_excess_too() {
    let only = dc("only", Tier::Municipal, "city", "a", 4, 64);
    let l = workload("l", 6, 1, 1);
    let p = preempting("p", 2, 1, 10);
    let mut s = snapshot(vec![only], vec![l, p]);
    running(&mut s, "l", "only", 6);
    let only_p = BTreeSet::from([WorkloadKey::new("ns", "p")]);
    let out = schedule_only(&s, &only_p, &Options::default());
    assert_eq!(
        placement(&out, "p"),
        BTreeMap::from([("only".to_owned(), 2)])
    );
    assert_eq!(
        preemptions(&out, "p"),
        vec![("l".to_owned(), "only".to_owned(), 4)]
    );
}

/// Room reserved from a lower priority in one data center is taken before
/// anyone is evicted in another (second attack review, A).
#[test]
fn reserved_room_elsewhere_is_taken_before_evicting() {
    let x = dc("x", Tier::Municipal, "city", "a", 4, 64);
    let y = dc("y", Tier::Municipal, "city", "b", 1, 64);
    let mut v5 = workload("v5", 1, 4, 1);
    v5.priority = 5;
    let lo = workload("lo", 1, 1, 1);
    let p1 = preempting("p1", 1, 2, 10);
    let p2 = preempting("p2", 1, 1, 9);
    let mut s = snapshot(vec![x, y], vec![v5, lo, p1, p2]);
    running(&mut s, "v5", "x", 1);
    running(&mut s, "lo", "y", 1);
    let out = run(&s);
    assert_eq!(
        preemptions(&out, "p1"),
        vec![("v5".to_owned(), "x".to_owned(), 1)]
    );
    assert!(
        preemptions(&out, "p2").is_empty(),
        "{:?}",
        preemptions(&out, "p2")
    );
    assert_eq!(placement(&out, "p2"), BTreeMap::from([("x".to_owned(), 1)]));
    assert_eq!(placement(&out, "lo"), BTreeMap::from([("y".to_owned(), 1)]));
}

/// Room a victim gives up for its own reasons (scaling down elsewhere) is
/// not held back (second attack review, B).
#[test]
fn a_victims_own_scale_down_frees_its_room() {
    let mut a = dc("a", Tier::Municipal, "ra", "a", 1, 64);
    a.region = "ra".into();
    let mut b = dc("b", Tier::Municipal, "rb", "b", 2, 64);
    b.region = "rb".into();
    let v = workload("v", 1, 1, 1);
    let mut p = preempting("p", 1, 1, 10);
    p.placement.allowed_regions = ["ra".to_owned()].into();
    let mut n = workload("n", 1, 1, 1);
    n.priority = -1;
    n.placement.allowed_regions = ["rb".to_owned()].into();
    let mut s = snapshot(vec![a, b], vec![v, p, n]);
    s.current.insert(
        WorkloadKey::new("ns", "v"),
        BTreeMap::from([("a".into(), 1), ("b".into(), 2)]),
    );
    let out = run(&s);
    assert_eq!(placement(&out, "n"), BTreeMap::from([("b".to_owned(), 1)]));
}

/// An over-capacity excess in a resource the preemptor does not use, or
/// one the victims cannot free, is not shed at their cost (second attack
/// review, C).
#[test]
fn an_excess_the_victims_cannot_shed_costs_them_nothing() {
    let mut only = dc("only", Tier::Municipal, "city", "a", 8, 64);
    only.capacity.gpus.insert("l4".into(), 2);
    let mut g = workload("g", 3, 1, 1);
    g.priority = 20;
    g.demand.gpu_count = 1;
    g.demand.gpu_model = Some("l4".into());
    let l = workload("l", 5, 1, 1);
    let p = preempting("p", 1, 1, 10);
    let mut s = snapshot(vec![only], vec![g, l, p]);
    running(&mut s, "g", "only", 3);
    running(&mut s, "l", "only", 5);
    let only_p = BTreeSet::from([WorkloadKey::new("ns", "p")]);
    let out = schedule_only(&s, &only_p, &Options::default());
    assert_eq!(
        preemptions(&out, "p"),
        vec![("l".to_owned(), "only".to_owned(), 1)]
    );
}

/// Each replica added in preempted room goes where its victims have the
/// lowest priority: the second does not evict priority 9 while priority 5
/// would do (second attack review, D).
#[test]
fn every_preempted_replica_goes_where_the_victims_rank_lowest() {
    let mut x = dc("x", Tier::Municipal, "city", "a", 2, 64);
    x.datasets.insert("cams".into());
    let y = dc("y", Tier::Municipal, "city", "b", 2, 64);
    let lo = workload("lo", 1, 1, 1);
    let mut hi = workload("hi", 1, 1, 1);
    hi.priority = 9;
    let mut mid = workload("mid", 2, 1, 1);
    mid.priority = 5;
    let mut p = preempting("p", 2, 1, 10);
    p.placement.preferred_datasets.insert("cams".into());
    let mut s = snapshot(vec![x, y], vec![lo, hi, mid, p]);
    running(&mut s, "lo", "x", 1);
    running(&mut s, "hi", "x", 1);
    running(&mut s, "mid", "y", 2);
    let out = run(&s);
    let mut evicted = preemptions(&out, "p");
    evicted.sort();
    assert_eq!(
        evicted,
        vec![
            ("lo".to_owned(), "x".to_owned(), 1),
            ("mid".to_owned(), "y".to_owned(), 1)
        ]
    );
}

/// A small low-priority victim that turns out not to be needed once a
/// bigger one is evicted is given back.
#[test]
fn preemption_gives_back_victims_not_needed_after_all() {
    let only = dc("only", Tier::Municipal, "city", "a", 5, 64);
    let mut small = workload("small", 1, 1, 1);
    small.priority = 1;
    let mut big = workload("big", 1, 4, 1);
    big.priority = 2;
    let urgent = preempting("urgent", 1, 4, 10);
    let mut s = snapshot(vec![only], vec![small, big, urgent]);
    running(&mut s, "small", "only", 1);
    running(&mut s, "big", "only", 1);
    let out = run(&s);
    assert_eq!(
        preemptions(&out, "urgent"),
        vec![("big".to_owned(), "only".to_owned(), 1)]
    );
    assert_eq!(
        placement(&out, "small"),
        BTreeMap::from([("only".to_owned(), 1)])
    );
}

#[test]
fn without_preemption_policy_running_replicas_keep_their_capacity() {
    let dcs = vec![dc("only", Tier::Municipal, "city", "a", 10, 100)];
    let mut low = workload("low", 10, 1, 1);
    low.priority = 1;
    let mut high = workload("high", 4, 1, 1);
    high.priority = 5;
    let mut s = snapshot(dcs, vec![low, high]);
    s.current.insert(
        WorkloadKey::new("ns", "low"),
        BTreeMap::from([("only".into(), 10)]),
    );
    let out = run(&s);
    assert!(placement(&out, "high").is_empty());
    assert_eq!(
        placement(&out, "low"),
        BTreeMap::from([("only".to_owned(), 10)])
    );
}

#[test]
fn unreachable_data_center_keeps_replicas_until_grace_period_ends() {
    let mut dcs = three_dcs();
    dcs[0].reachability = Reachability::UnreachableSince(1_000_000 - 30);
    let w = workload("w", 4, 1, 1);
    let mut s = snapshot(dcs, vec![w]);
    s.current.insert(
        WorkloadKey::new("ns", "w"),
        BTreeMap::from([("core".into(), 4)]),
    );
    let within = run(&s);
    assert_eq!(
        placement(&within, "w"),
        BTreeMap::from([("core".to_owned(), 4)])
    );

    s.data_centers[0].reachability = Reachability::UnreachableSince(1_000_000 - 61);
    let after = run(&s);
    let p = placement(&after, "w");
    assert!(!p.contains_key("core"), "{p:?}");
    assert_eq!(p.values().sum::<u32>(), 4);
    assert_eq!(rule_for(&after, "w", "core"), Some(Rule::Unreachable));
    assert_eq!(after.decisions[0].moved_replicas, 4);
}

#[test]
fn scaling_up_and_down_moves_nothing_that_may_stay() {
    let mut w = workload("w", 6, 1, 1);
    w.placement.strategy = StrategyKind::AvailableCapacity;
    let mut s = snapshot(three_dcs(), vec![w]);
    let first = run(&s);
    s.current = first.placements();
    let before = placement(&first, "w");
    s.workloads[0].replicas = 12;
    let up = run(&s);
    for (dc, n) in &before {
        assert!(placement(&up, "w")[dc] >= *n, "scale-up kept {dc}");
    }
    assert_eq!(up.decisions[0].moved_replicas, 0);
    s.current = up.placements();
    s.workloads[0].replicas = 3;
    let down = run(&s);
    assert_eq!(down.decisions[0].placed(), 3);
    for (dc, n) in placement(&down, "w") {
        assert!(n <= placement(&up, "w")[&dc], "scale-down only removes");
    }
}

#[test]
fn rebalancing_moves_back_at_most_the_allowed_replicas_per_round() {
    let mut dcs = three_dcs();
    dcs[0].capacity.cpu_millis = 0; // municipal full
    let mut w = workload("w", 10, 1, 1);
    w.placement.fallback_groups = vec![
        FallbackGroup {
            name: "municipal".into(),
            tiers: [Tier::Municipal].into(),
            ..FallbackGroup::default()
        },
        FallbackGroup {
            name: "partner".into(),
            tiers: [Tier::Partner].into(),
            ..FallbackGroup::default()
        },
    ];
    w.placement.rebalance = RebalanceMode::WhenBetterGroupHasRoom;
    w.placement.max_moves_per_round = Some(3);
    let mut s = snapshot(dcs, vec![w]);
    let first = run(&s);
    assert_eq!(
        placement(&first, "w"),
        BTreeMap::from([("partner".to_owned(), 10)])
    );
    // Capacity returns.
    s.current = first.placements();
    s.data_centers[0].capacity.cpu_millis = 16_000;
    let second = run(&s);
    assert_eq!(
        placement(&second, "w"),
        BTreeMap::from([("core".to_owned(), 3), ("partner".to_owned(), 7)])
    );
    // Without the policy nothing moves.
    s.workloads[0].placement.rebalance = RebalanceMode::Never;
    let stable = run(&s);
    assert_eq!(
        placement(&stable, "w"),
        BTreeMap::from([("partner".to_owned(), 10)])
    );
}

#[test]
fn cordoned_data_center_keeps_what_runs_but_takes_nothing_new() {
    let mut dcs = three_dcs();
    dcs[2].cordoned = true;
    let w = workload("w", 8, 1, 1);
    let mut s = snapshot(dcs, vec![w]);
    s.current.insert(
        WorkloadKey::new("ns", "w"),
        BTreeMap::from([("partner".into(), 4)]),
    );
    let out = run(&s);
    let p = placement(&out, "w");
    assert_eq!(p.get("partner"), Some(&4));
    assert_eq!(p.values().sum::<u32>(), 8);
}

/// A NoSchedule taint keeps new replicas away and leaves running ones be
/// (Kubernetes and Karmada do not evict on it; it used to evict at once,
/// unpaced): the tainted data center keeps what runs there, takes nothing
/// new, and says why it took no more.
#[test]
fn a_no_schedule_taint_keeps_running_replicas_and_takes_no_new_ones() {
    let mut dcs = three_dcs();
    dcs[2].taints.push(Taint {
        key: "maintenance".into(),
        value: None,
        effect: TaintEffect::NoSchedule,
        added_unix: None,
    });
    let w = workload("w", 8, 1, 1);
    let fresh = workload("fresh", 2, 1, 1);
    let mut s = snapshot(dcs, vec![w, fresh]);
    s.current.insert(
        WorkloadKey::new("ns", "w"),
        BTreeMap::from([("partner".into(), 4)]),
    );
    let out = run(&s);
    let p = placement(&out, "w");
    assert_eq!(p.get("partner"), Some(&4), "{p:?}");
    assert_eq!(p.values().sum::<u32>(), 8);
    let d = out
        .decision(&WorkloadKey::new("ns", "w"))
        .expect("decision");
    assert_eq!(d.moved_replicas, 0);
    // A workload with nothing there is kept out by the taint.
    assert!(!placement(&out, "fresh").contains_key("partner"));
    assert_eq!(rule_for(&out, "fresh", "partner"), Some(Rule::Taint));
}

/// A NoExecute taint moves running replicas away unless tolerated; a
/// toleration with `tolerationSeconds` keeps them that long after the taint
/// was added (taking nothing new meanwhile), one without keeps them for good.
#[test]
fn a_no_execute_taint_moves_replicas_after_what_is_tolerated() {
    let now = 1_000_000;
    let tainted = || {
        let mut dcs = three_dcs();
        dcs[2].taints.push(Taint {
            key: "flooding".into(),
            value: None,
            effect: TaintEffect::NoExecute,
            added_unix: Some(now - 100),
        });
        dcs
    };
    let tolerating = |name: &str, seconds: Option<u32>| {
        let mut w = workload(name, 6, 1, 1);
        w.placement.tolerations.push(Toleration {
            key: "flooding".into(),
            operator: TolerationOperator::Exists,
            value: None,
            effect: Some(TaintEffect::NoExecute),
            toleration_seconds: seconds,
        });
        w
    };
    let running = |s: &mut Snapshot, name: &str| {
        s.current.insert(
            WorkloadKey::new("ns", name),
            BTreeMap::from([("partner".into(), 4)]),
        );
    };
    let mut s = snapshot(
        tainted(),
        vec![
            workload("plain", 6, 1, 1),
            tolerating("brief", Some(60)),
            tolerating("patient", Some(600)),
            tolerating("forever", None),
        ],
    );
    for name in ["plain", "brief", "patient", "forever"] {
        running(&mut s, name);
    }
    let out = run(&s);
    // Not tolerated: every replica leaves, and the taint is the reason.
    assert!(!placement(&out, "plain").contains_key("partner"));
    assert_eq!(placement(&out, "plain").values().sum::<u32>(), 6);
    assert_eq!(rule_for(&out, "plain", "partner"), Some(Rule::Taint));
    // Tolerated for 60 s, added 100 s ago: ran out, they leave.
    assert!(!placement(&out, "brief").contains_key("partner"));
    // Tolerated for 600 s: the 4 stay, the 2 more go elsewhere.
    let patient = placement(&out, "patient");
    assert_eq!(patient.get("partner"), Some(&4), "{patient:?}");
    assert_eq!(patient.values().sum::<u32>(), 6);
    // Tolerated for good: stays, and may take more.
    assert_eq!(placement(&out, "forever").values().sum::<u32>(), 6);
    assert!(
        placement(&out, "forever")
            .get("partner")
            .is_some_and(|n| *n >= 4)
    );
    // A workload with nothing there goes elsewhere, saying why.
    let fresh = snapshot(tainted(), vec![tolerating("fresh", Some(600))]);
    let out = run(&fresh);
    assert!(!placement(&out, "fresh").contains_key("partner"));
    assert_eq!(rule_for(&out, "fresh", "partner"), Some(Rule::Taint));
}

#[test]
fn the_earliest_limited_toleration_decides_when_replicas_leave() {
    let mut dc = dc("d", Tier::Edge, "city", "a", 8, 8);
    for (key, added) in [("a", 100), ("b", 50)] {
        dc.taints.push(Taint {
            key: key.into(),
            value: None,
            effect: TaintEffect::NoExecute,
            added_unix: Some(added),
        });
    }
    let tolerate = |key: &str, seconds: Option<u32>| Toleration {
        key: key.into(),
        operator: TolerationOperator::Exists,
        value: None,
        effect: None,
        toleration_seconds: seconds,
    };
    // a until 100 + 300, b until 50 + 200: b's comes first.
    assert_eq!(
        no_execute(
            &[tolerate("a", Some(300)), tolerate("b", Some(200))],
            &dc,
            120
        ),
        NoExecute::StaysUntil(250, "b".into())
    );
    // One toleration for good beside a limited one: the one for good counts.
    assert_eq!(
        no_execute(
            &[
                tolerate("a", Some(10)),
                tolerate("a", None),
                tolerate("b", None)
            ],
            &dc,
            500
        ),
        NoExecute::Stays
    );
    assert_eq!(
        no_execute(&[tolerate("a", None)], &dc, 120),
        NoExecute::Leaves("b".into())
    );
    // An unknown addition time counts from now: it never runs out unseen.
    dc.taints[0].added_unix = None;
    assert_eq!(
        no_execute(&[tolerate("a", Some(30)), tolerate("b", None)], &dc, 999),
        NoExecute::StaysUntil(1029, "a".into())
    );
}

// ---- properties -------------------------------------------------------------

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    let dcs = prop::collection::vec(
        (
            0usize..3,
            0usize..3,
            0usize..3,
            0u64..40,
            0u64..160,
            any::<bool>(),
            0u64..4,
            0usize..4,
        ),
        1..8,
    );
    let workloads = prop::collection::vec(
        (
            0u32..30,
            1u64..6,
            1u64..20,
            -2i32..3,
            0usize..4,
            any::<bool>(),
            any::<bool>(),
            (prop::option::of(1u32..4), prop::option::of(1u32..5)),
            any::<bool>(),
            0u64..2,
        ),
        0..10,
    );
    (dcs, workloads, any::<u64>()).prop_map(|(dcs, workloads, seed)| {
        let tiers = [Tier::Municipal, Tier::Edge, Tier::Partner];
        let data_centers: Vec<DataCenter> = dcs
            .into_iter()
            .enumerate()
            .map(|(i, (t, r, z, cores, gib, cordoned, gpus, cluster))| {
                let mut d = dc(
                    &format!("dc{i}"),
                    tiers[t],
                    &format!("r{r}"),
                    &format!("z{z}"),
                    cores,
                    gib,
                );
                d.cordoned = cordoned && i % 3 == 0;
                if gpus > 0 {
                    d.capacity.gpus.insert("l4".into(), gpus);
                }
                d.cost_per_core_hour = (seed >> (i % 32)) & 7;
                // Clusters 1 and 2 may be shared; 0 is a cluster not yet
                // identified.
                d.cluster = match cluster {
                    0 => None,
                    1 | 2 => Some(format!("shared-{cluster}")),
                    _ => Some(format!("own-{i}")),
                };
                d
            })
            .collect();
        let strategies = [
            StrategyKind::Score,
            StrategyKind::AvailableCapacity,
            StrategyKind::StaticWeights,
            StrategyKind::Duplicated,
        ];
        let workloads: Vec<Workload> = workloads
            .into_iter()
            .enumerate()
            .map(
                |(
                    i,
                    (
                        replicas,
                        cores,
                        gib,
                        priority,
                        strategy,
                        gang,
                        preempt,
                        (min, max),
                        region,
                        gpu,
                    ),
                )| {
                    let mut w = workload(&format!("w{i}"), replicas, cores, gib);
                    w.priority = priority;
                    w.placement.strategy = strategies[strategy];
                    w.placement.gang = gang;
                    w.demand.gpu_count = gpu;
                    if gpu > 0 {
                        w.demand.gpu_model = Some("l4".into());
                    }
                    if w.placement.strategy == StrategyKind::StaticWeights {
                        w.placement.static_weights = data_centers
                            .iter()
                            .enumerate()
                            .map(|(j, d)| (d.name.clone(), u32::try_from((i + j) % 3).unwrap_or(1)))
                            .collect();
                    }
                    let (min, max) = match (min, max) {
                        (Some(a), Some(b)) if a > b => (Some(b), Some(a)),
                        other => other,
                    };
                    w.placement.spread = Spread {
                        by: SpreadDomain::DataCenter,
                        min_domains: min,
                        max_domains: max,
                        max_replicas_per_data_center: None,
                    };
                    if region {
                        w.placement.allowed_regions = ["r0".to_owned()].into();
                    }
                    if preempt {
                        w.preemption = PreemptionPolicy::PreemptLowerPriority;
                    }
                    w
                },
            )
            .collect();
        Snapshot {
            now_unix: 0,
            data_centers,
            workloads,
            current: BTreeMap::new(),
        }
    })
}

fn used_per_dc(s: &Snapshot, out: &Schedule) -> BTreeMap<String, Resources> {
    let mut used: BTreeMap<String, Resources> = BTreeMap::new();
    for d in &out.decisions {
        let w = s
            .workloads
            .iter()
            .find(|w| w.key == d.workload)
            .expect("workload");
        for (dc, n) in &d.placement {
            let n = u64::from(*n);
            let entry = used.entry(dc.clone()).or_default();
            let mut gpus = BTreeMap::new();
            if w.demand.gpu_count > 0 {
                gpus.insert("l4".to_owned(), w.demand.gpu_count * n);
            }
            entry.add(&Resources {
                cpu_millis: w.demand.cpu_millis * n,
                memory_bytes: w.demand.memory_bytes * n,
                ephemeral_bytes: 0,
                gpus,
            });
        }
    }
    used
}

proptest! {
    // `a_preempting_round_leaves_nothing_to_preempt` rejects every snapshot
    // where nothing is preempted: a deeper run (PROPTEST_CASES=3000) needs
    // room for more rejects than the default 1024.
    #![proptest_config(ProptestConfig {
        max_global_rejects: 1 << 20,
        ..ProptestConfig::with_cases(256)
    })]

    #[test]
    fn never_over_commits_any_resource(s in arb_snapshot()) {
        let out = run(&s);
        for (dc, used) in used_per_dc(&s, &out) {
            let cap = &s.data_centers.iter().find(|d| d.name == dc).expect("dc").capacity;
            prop_assert!(used.fits_within(cap), "{dc}: {used:?} > {cap:?}");
        }
    }

    #[test]
    fn never_over_commits_with_random_current_placements(s in arb_snapshot(), seed in any::<u64>()) {
        let mut s = s;
        // Arbitrary (even over-committed) current placements must still give a
        // schedule that fits.
        for (i, w) in s.workloads.iter().enumerate() {
            let dc = &s.data_centers[(seed as usize + i) % s.data_centers.len()];
            s.current.insert(w.key.clone(), BTreeMap::from([(dc.name.clone(), w.replicas)]));
        }
        let out = run(&s);
        for (dc, used) in used_per_dc(&s, &out) {
            let cap = &s.data_centers.iter().find(|d| d.name == dc).expect("dc").capacity;
            prop_assert!(used.fits_within(cap), "{dc}: {used:?} > {cap:?}");
        }
    }

    /// After a round that preempted, the world it left is stable: run again
    /// with its placements as current, and no workload placed in full
    /// preempts again. (One left short may: the room its first evictions
    /// freed is its own the next round, a legitimate cascade.)
    #[test]
    fn a_preempting_round_leaves_nothing_to_preempt(s in arb_snapshot(), seed in any::<u64>()) {
        let mut s = s;
        for (i, w) in s.workloads.iter().enumerate() {
            let dc = &s.data_centers[(seed as usize + i) % s.data_centers.len()];
            s.current.insert(w.key.clone(), BTreeMap::from([(dc.name.clone(), w.replicas)]));
        }
        let first = run(&s);
        prop_assume!(first.decisions.iter().any(|d| !d.preemptions.is_empty()));
        s.current = first.placements();
        let again = run(&s);
        for d in &again.decisions {
            let full = first.decision(&d.workload).is_some_and(|f| f.outcome == Outcome::Scheduled);
            prop_assert!(!full || d.preemptions.is_empty(), "{} preempts again: {:?}", d.workload, d.preemptions);
        }
    }

    #[test]
    fn every_placement_satisfies_the_hard_rules(s in arb_snapshot()) {
        let out = run(&s);
        for d in &out.decisions {
            let w = s.workloads.iter().find(|w| w.key == d.workload).expect("workload");
            for dc_name in d.placement.keys() {
                let dc = s.data_centers.iter().find(|x| &x.name == dc_name).expect("dc");
                prop_assert!(!dc.cordoned, "new replicas on cordoned {dc_name}");
                prop_assert!(w.placement.allowed_regions.is_empty() || w.placement.allowed_regions.contains(&dc.region));
                if w.demand.gpu_count > 0 {
                    prop_assert!(dc.capacity.gpus.get("l4").copied().unwrap_or(0) >= w.demand.gpu_count);
                }
            }
        }
    }

    #[test]
    fn same_input_same_output(s in arb_snapshot()) {
        prop_assert_eq!(run(&s), run(&s));
    }

    #[test]
    fn unchanged_world_moves_nothing(s in arb_snapshot()) {
        let first = run(&s);
        let mut next = s.clone();
        next.current = first.placements();
        let second = run(&next);
        for (a, b) in first.decisions.iter().zip(&second.decisions) {
            prop_assert_eq!(&a.placement, &b.placement, "{} moved; first {:?}; second {:?}", a.workload,
                first.decisions.iter().map(|d| (d.workload.name.clone(), d.placement.clone(), d.preemptions.clone())).collect::<Vec<_>>(),
                second.decisions.iter().map(|d| (d.workload.name.clone(), d.placement.clone(), d.preemptions.clone())).collect::<Vec<_>>());
            prop_assert_eq!(b.moved_replicas, 0);
        }
    }

    #[test]
    fn sums_spread_and_gang_hold(s in arb_snapshot()) {
        let out = run(&s);
        for d in &out.decisions {
            let w = s.workloads.iter().find(|w| w.key == d.workload).expect("workload");
            match w.placement.strategy {
                StrategyKind::Duplicated => prop_assert!(d.placement.values().all(|n| *n == w.replicas)),
                _ => prop_assert!(d.placed() <= w.replicas),
            }
            if let Some(max) = w.placement.spread.max_domains {
                prop_assert!(d.placement.len() <= max as usize, "{} uses {} > {max}", d.workload, d.placement.len());
            }
            if w.placement.gang && w.placement.strategy != StrategyKind::Duplicated {
                prop_assert!(d.placed() == 0 || d.placed() == w.replicas, "gang all or nothing");
            }
            if d.outcome == Outcome::Scheduled && w.replicas > 0 && w.placement.strategy != StrategyKind::Duplicated {
                prop_assert_eq!(d.placed(), w.replicas);
            }
            if d.outcome != Outcome::Scheduled {
                prop_assert!(d.reason.is_some());
            }
            // Scheduled implies minDomains distinct domains, for every
            // strategy.
            if d.outcome == Outcome::Scheduled
                && !d.placement.is_empty()
                && let Some(min) = w.placement.spread.min_domains
            {
                let domains: BTreeSet<String> = d
                    .placement
                    .keys()
                    .map(|name| {
                        let dc = s.data_centers.iter().find(|x| &x.name == name).expect("dc");
                        match w.placement.spread.by {
                            SpreadDomain::DataCenter => dc.name.clone(),
                            SpreadDomain::Zone => format!("{}/{}", dc.region, dc.zone),
                            SpreadDomain::Region => dc.region.clone(),
                        }
                    })
                    .collect();
                prop_assert!(domains.len() >= min as usize, "{} Scheduled in {domains:?}, minDomains {min}", d.workload);
            }
        }
    }

    #[test]
    fn preemption_only_takes_from_strictly_lower_priority(s in arb_snapshot(), seed in any::<u64>()) {
        let mut s = s;
        for (i, w) in s.workloads.iter().enumerate() {
            let dc = &s.data_centers[(seed as usize + i) % s.data_centers.len()];
            s.current.insert(w.key.clone(), BTreeMap::from([(dc.name.clone(), w.replicas)]));
        }
        let out = run(&s);
        for d in &out.decisions {
            let w = s.workloads.iter().find(|w| w.key == d.workload).expect("workload");
            for p in &d.preemptions {
                let victim = s.workloads.iter().find(|v| v.key == p.victim).expect("victim");
                prop_assert!(victim.priority < w.priority);
                prop_assert_eq!(w.preemption, PreemptionPolicy::PreemptLowerPriority);
            }
        }
    }

    #[test]
    fn no_workload_runs_in_two_data_centers_of_one_member_cluster(s in arb_snapshot(), seed in any::<u64>()) {
        let mut s = s;
        // Current placements that broke the rule (the cluster's identity
        // learned late) are mended too.
        for (i, w) in s.workloads.iter().enumerate() {
            if (seed >> (i % 64)) & 1 == 1 {
                let everywhere = s.data_centers.iter().map(|d| (d.name.clone(), 1)).collect();
                s.current.insert(w.key.clone(), everywhere);
            }
        }
        let cluster_of: BTreeMap<&str, Option<&str>> = s
            .data_centers
            .iter()
            .map(|d| (d.name.as_str(), d.cluster.as_deref()))
            .collect();
        for d in &run(&s).decisions {
            let mut seen = BTreeSet::new();
            for dc in d.placement.keys() {
                if let Some(cluster) = cluster_of[dc.as_str()] {
                    prop_assert!(seen.insert(cluster), "{}: two data centers of {cluster}: {:?}", d.workload, d.placement);
                }
            }
        }
    }

    /// Explaining only the nearest misses decides the same and counts the
    /// same, and keeps exactly the rejections a status would pick from the
    /// full explanation, messages included.
    #[test]
    fn explaining_the_nearest_misses_keeps_what_a_full_explanation_ranks_first(s in arb_snapshot(), n in 0usize..5) {
        let full = run(&s);
        let nearest = schedule(&s, &Options { explain_nearest: Some(n), ..Options::default() });
        for (f, d) in full.decisions.iter().zip(&nearest.decisions) {
            prop_assert_eq!(&f.placement, &d.placement);
            prop_assert_eq!(&f.rejected_by_rule, &d.rejected_by_rule);
            prop_assert_eq!(&f.reason, &d.reason);
            let mut ranked: Vec<&civicgrid_operator::engine::Rejection> = f.rejections.iter().collect();
            ranked.sort_by(|a, b| b.rule.cmp(&a.rule).then_with(|| a.data_center.cmp(&b.data_center)));
            let mut expected: Vec<_> = ranked.into_iter().take(n).cloned().collect();
            expected.sort_by(|a, b| a.data_center.cmp(&b.data_center));
            prop_assert_eq!(&expected, &d.rejections);
        }
    }

    #[test]
    fn every_data_center_is_chosen_or_explained(s in arb_snapshot()) {
        let out = run(&s);
        for d in &out.decisions {
            let explained: BTreeSet<&str> = d.rejections.iter().map(|r| r.data_center.as_str()).collect();
            for dc in &s.data_centers {
                prop_assert!(d.placement.contains_key(&dc.name) ^ explained.contains(dc.name.as_str()),
                    "{} for {}: chosen xor explained", dc.name, d.workload);
            }
        }
    }
}

/// `s` with each data center repeated `copies` times under new names, some
/// of the copies unreachable, and every workload running somewhere: wide
/// enough that the Score shortcut orders only part of the candidates.
fn widened(s: &Snapshot, copies: usize, seed: u64) -> Snapshot {
    let mut wide = s.clone();
    wide.data_centers = (0..copies)
        .flat_map(|copy| {
            s.data_centers.iter().enumerate().map(move |(i, dc)| {
                let mut dc = dc.clone();
                dc.name = format!("{}-{copy}", dc.name);
                dc.cost_per_core_hour = (seed >> ((i + copy) % 32)) & 7;
                if (seed >> ((i * 7 + copy) % 64)) & 15 == 0 {
                    // Some are within a 60 s grace period, some past it.
                    dc.reachability = Reachability::UnreachableSince(
                        s.now_unix - if copy % 2 == 0 { 10 } else { 600 },
                    );
                }
                dc
            })
        })
        .collect();
    let n = wide.data_centers.len();
    for (i, w) in wide.workloads.iter().enumerate() {
        if w.replicas > 0 && (seed >> (i % 64)) & 1 == 1 {
            // Two data centers with more than half each: scaling down trims.
            let at = |k: usize| {
                wide.data_centers[(seed as usize).wrapping_add(i * 13 + k * 5) % n]
                    .name
                    .clone()
            };
            let each = w.replicas / 2 + 1;
            wide.current.insert(
                w.key.clone(),
                BTreeMap::from([(at(0), each), (at(1), each)]),
            );
        }
    }
    wide
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn shortcut_decides_exactly_like_ordering_every_candidate(s in arb_snapshot(), copies in 3usize..8, seed in any::<u64>()) {
        let wide = widened(&s, copies, seed);
        let shortcut = schedule(&wide, &Options::default());
        let exhaustive = schedule(&wide, &Options { exhaustive: true, ..Options::default() });
        prop_assert_eq!(shortcut, exhaustive);
    }

    #[test]
    fn scheduling_only_every_workload_equals_scheduling_all(s in arb_snapshot(), seed in any::<u64>()) {
        let wide = widened(&s, 2, seed);
        let every: BTreeSet<WorkloadKey> = wide.workloads.iter().map(|w| w.key.clone()).collect();
        prop_assert_eq!(schedule_only(&wide, &every, &Options::default()), run(&wide));
    }

    #[test]
    fn scheduling_some_workloads_respects_capacity_the_others_hold(s in arb_snapshot(), seed in any::<u64>()) {
        // Everyone runs where a first round put them; then every other
        // workload grows and only those are placed again.
        let mut s = s;
        s.current = run(&s).placements();
        let mut changed = BTreeSet::new();
        for (i, w) in s.workloads.iter_mut().enumerate() {
            if (seed >> (i % 64)) & 1 == 1 {
                w.replicas += 2;
                changed.insert(w.key.clone());
            }
        }
        let out = schedule_only(&s, &changed, &Options::default());
        prop_assert_eq!(out.decisions.len(), changed.len());
        // Usage: the changed workloads' decisions plus what the others still
        // run after any preemption.
        let mut running = s.current.clone();
        for d in &out.decisions {
            running.insert(d.workload.clone(), d.placement.clone());
            // A victim that was itself placed again has its final placement
            // in its own decision.
            for p in d.preemptions.iter().filter(|p| !changed.contains(&p.victim)) {
                if let Some(n) = running.get_mut(&p.victim).and_then(|m| m.get_mut(&p.data_center)) {
                    *n -= p.replicas;
                }
            }
        }
        let as_schedule = Schedule {
            decisions: s.workloads.iter().map(|w| civicgrid_operator::engine::Decision {
                desired: w.replicas,
                ..civicgrid_operator::engine::Decision::scheduled(
                    w.key.clone(),
                    running.get(&w.key).cloned().unwrap_or_default(),
                )
            }).collect(),
        };
        for (dc, used) in used_per_dc(&s, &as_schedule) {
            let cap = &s.data_centers.iter().find(|d| d.name == dc).expect("dc").capacity;
            prop_assert!(used.fits_within(cap), "{dc}: {used:?} > {cap:?}");
        }
    }
}

/// One data center under contention: lower-priority victims running (some
/// CPU-only, some with GPUs, some gangs), a preemptor, and a `Never`
/// workload decided between them.
fn arb_contended_dc() -> impl Strategy<Value = Snapshot> {
    let victims = prop::collection::vec((1u32..5, 0u64..4, 0u64..2, 0i32..3, any::<bool>()), 1..6);
    (
        4u64..24,
        0u64..5,
        victims,
        (1u32..5, 0u64..5, 0u64..3),
        (0u32..6, 1u64..3),
    )
        .prop_map(
            |(cores, gpus, victims, (p_replicas, p_cores, p_gpus), (n_replicas, n_cores))| {
                let mut only = dc("only", Tier::Municipal, "city", "a", cores, 4096);
                only.capacity.gpus.insert("l4".into(), gpus);
                let with_gpus = |w: &mut Workload, n: u64| {
                    if n > 0 {
                        w.demand.gpu_count = n;
                        w.demand.gpu_model = Some("l4".into());
                    }
                };
                let mut workloads = Vec::new();
                let mut current = BTreeMap::new();
                let (mut cpu_left, mut gpu_left) = (cores * 1000, gpus);
                for (i, (replicas, v_cores, v_gpus, priority, gang)) in
                    victims.into_iter().enumerate()
                {
                    let mut w = workload(&format!("v{i}"), replicas, v_cores, 1);
                    w.priority = priority;
                    w.placement.gang = gang;
                    with_gpus(&mut w, v_gpus);
                    // Only what fits runs.
                    let by_cpu = cpu_left
                        .checked_div(w.demand.cpu_millis)
                        .unwrap_or(u64::MAX);
                    let by_gpu = gpu_left.checked_div(v_gpus).unwrap_or(u64::MAX);
                    let runs =
                        u32::try_from(by_cpu.min(by_gpu).min(u64::from(replicas))).unwrap_or(0);
                    if runs > 0 {
                        cpu_left -= w.demand.cpu_millis * u64::from(runs);
                        gpu_left -= v_gpus * u64::from(runs);
                        current.insert(w.key.clone(), BTreeMap::from([("only".to_owned(), runs)]));
                    }
                    workloads.push(w);
                }
                let mut p = preempting("preemptor", p_replicas, p_cores, 10);
                with_gpus(&mut p, p_gpus);
                workloads.push(p);
                let mut never = workload("never", n_replicas, n_cores, 1);
                never.priority = 5;
                workloads.push(never);
                Snapshot {
                    now_unix: 0,
                    data_centers: vec![only],
                    workloads,
                    current,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Preemption evicts only victims holding some of what is missing, none
    /// it could give back, and no other workload gains the room it frees.
    #[test]
    fn preemption_is_minimal_and_keeps_its_room(s in arb_contended_dc()) {
        let out = run(&s);
        let per = |name: &str| {
            let w = s.workloads.iter().find(|w| w.key.name == name).expect("workload");
            (w.demand.cpu_millis, w.demand.gpu_count)
        };
        let cap = &s.data_centers[0].capacity;
        let (mut free_cpu, mut free_gpu) = (cap.cpu_millis, cap.gpus["l4"]);
        for (key, at) in &s.current {
            let (c, g) = per(&key.name);
            free_cpu -= c * u64::from(at["only"]);
            free_gpu -= g * u64::from(at["only"]);
        }
        let placed = placement(&out, "preemptor").get("only").copied().unwrap_or(0);
        let (p_cpu, p_gpu) = per("preemptor");
        let (need_cpu, need_gpu) = (p_cpu * u64::from(placed), p_gpu * u64::from(placed));
        let (missing_cpu, missing_gpu) = (need_cpu.saturating_sub(free_cpu), need_gpu.saturating_sub(free_gpu));
        let pre = preemptions(&out, "preemptor");
        let (mut freed_cpu, mut freed_gpu) = (0, 0);
        for (victim, _, n) in &pre {
            let (c, g) = per(victim);
            prop_assert!((c > 0 && missing_cpu > 0) || (g > 0 && missing_gpu > 0),
                "{victim} holds none of what is missing ({missing_cpu} mCPU, {missing_gpu} GPU)");
            freed_cpu += c * u64::from(*n);
            freed_gpu += g * u64::from(*n);
        }
        prop_assert!(need_cpu <= free_cpu + freed_cpu && need_gpu <= free_gpu + freed_gpu);
        for (victim, _, _) in &pre {
            let (c, g) = per(victim);
            prop_assert!(need_cpu > free_cpu + freed_cpu - c || need_gpu > free_gpu + freed_gpu - g,
                "one replica of {victim} was not needed: {pre:?}");
        }
        let never = u64::from(placement(&out, "never").get("only").copied().unwrap_or(0));
        prop_assert!(never * per("never").0 <= free_cpu.saturating_sub(need_cpu),
            "never took {never} replicas; free before {free_cpu}, preemptor used {need_cpu}");
        let lost: u32 = pre.iter().map(|p| p.2).sum();
        let recorded: u32 = out.decisions.iter().flat_map(|d| &d.preempted_by).map(|p| p.replicas).sum();
        prop_assert_eq!(lost, recorded);
    }
}

/// A pool changed step by step, in an order driven by `seed`: workloads
/// added one at a time (some placed before their workload arrives), data
/// centers resized, cordoned, added and removed, workloads grown, demoted
/// and removed, placements moved.
fn pool_changed_step_by_step(s: &Snapshot, seed: u64) -> Pool {
    let bit = |k: usize| (seed >> (k % 64)) & 1 == 1;
    let mut pool = Pool::new(Snapshot {
        now_unix: s.now_unix,
        data_centers: s.data_centers.clone(),
        workloads: Vec::new(),
        current: BTreeMap::new(),
    });
    for (i, w) in s.workloads.iter().enumerate() {
        let placed = s.current.get(&w.key).cloned().unwrap_or_default();
        if bit(i) {
            pool.set_placement(&w.key, placed);
            pool.set_workload(w.clone());
        } else {
            pool.set_workload(w.clone());
            pool.set_placement(&w.key, placed);
        }
    }
    let first = run(s).placements();
    for (i, w) in s.workloads.iter().enumerate() {
        match (seed >> (i % 61)) & 7 {
            0 => {
                let mut grown = w.clone();
                grown.replicas += 1;
                grown.demand.cpu_millis += 500;
                pool.set_workload(grown);
            }
            1 => {
                let mut demoted = w.clone();
                demoted.priority -= 1;
                pool.set_workload(demoted);
            }
            2 => pool.remove_workload(&w.key),
            3 => pool.set_placement(&w.key, first.get(&w.key).cloned().unwrap_or_default()),
            _ => {}
        }
    }
    for (i, dc) in s.data_centers.iter().enumerate() {
        match (seed >> ((i * 3) % 59)) & 7 {
            0 => {
                let mut resized = dc.clone();
                resized.capacity.cpu_millis /= 2;
                pool.set_data_center(resized);
            }
            1 => {
                let mut cordoned = dc.clone();
                cordoned.cordoned = true;
                cordoned.zone = format!("{}-moved", dc.zone);
                pool.set_data_center(cordoned);
            }
            2 if s.data_centers.len() > 1 => pool.remove_data_center(&dc.name),
            3 => {
                let mut added = dc.clone();
                added.name = format!("{}-new", dc.name);
                pool.set_data_center(added);
            }
            5 => {
                // Its member cluster identified as another's.
                let mut joined = dc.clone();
                joined.cluster = Some("shared-1".into());
                pool.set_data_center(joined);
            }
            4 => {
                // "Any GPU" now means another model there.
                let mut regpu = dc.clone();
                regpu.capacity.gpus = BTreeMap::from([("h100".into(), 3)]);
                pool.set_data_center(regpu);
            }
            _ => {}
        }
    }
    pool
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The pool the controller keeps between decisions decides exactly what
    /// a snapshot made from scratch decides, after any sequence of changes.
    #[test]
    fn a_pool_kept_between_decisions_decides_like_a_fresh_snapshot(s in arb_snapshot(), seed in any::<u64>()) {
        let s = widened(&s, 2, seed);
        let mut pool = pool_changed_step_by_step(&s, seed);
        let fresh = pool.snapshot().clone();
        let keys: Vec<WorkloadKey> = fresh.workloads.iter().map(|w| w.key.clone()).collect();
        for key in keys {
            let only = BTreeSet::from([key]);
            let kept = pool.schedule_only(fresh.now_unix, &only, &Options::default());
            prop_assert_eq!(kept, schedule_only(&fresh, &only, &Options::default()));
        }
        let every: BTreeSet<WorkloadKey> = fresh.workloads.iter().map(|w| w.key.clone()).collect();
        prop_assert_eq!(
            pool.schedule_only(fresh.now_unix, &every, &Options::default()),
            schedule_only(&fresh, &every, &Options::default())
        );
    }
}

/// Sums of held capacity saturate; releasing a workload from a saturated
/// data center counts it again instead of subtracting, so the kept pool
/// still decides what a fresh snapshot decides.
#[test]
fn a_pool_released_from_a_saturated_data_center_decides_like_a_fresh_one() {
    let mut huge = dc("a", Tier::Municipal, "r", "z", 0, 0);
    huge.capacity.cpu_millis = u64::MAX;
    huge.capacity.memory_bytes = u64::MAX;
    let mut pool = Pool::new(snapshot(vec![huge], Vec::new()));
    let key = |name: &str| WorkloadKey::new("ns", name);
    let mut hog = workload("hog", 1, 0, 0);
    hog.demand.cpu_millis = u64::MAX - 5;
    pool.set_workload(hog);
    pool.set_placement(&key("hog"), BTreeMap::from([("a".into(), 1)]));
    let mut other = workload("other", 1, 0, 0);
    other.demand.cpu_millis = 1000;
    pool.set_workload(other);
    pool.set_placement(&key("other"), BTreeMap::from([("a".into(), 1)]));
    pool.set_placement(&key("other"), BTreeMap::new());
    let mut newcomer = workload("new", 1, 0, 0);
    newcomer.demand.cpu_millis = 500;
    pool.set_workload(newcomer);
    // Five millicores are left: the newcomer's 500 do not fit.
    let decided = decided_like_a_fresh_snapshot(&mut pool, "new");
    assert!(decided.placement.is_empty(), "{decided:?}");
}

/// The kept pool's decision for `name`, once checked to be the one a
/// snapshot made from scratch gives.
fn decided_like_a_fresh_snapshot(pool: &mut Pool, name: &str) -> Decision {
    let fresh = pool.snapshot().clone();
    let only = BTreeSet::from([WorkloadKey::new("ns", name)]);
    let kept = pool.schedule_only(fresh.now_unix, &only, &Options::default());
    assert_eq!(kept, schedule_only(&fresh, &only, &Options::default()));
    kept.decisions[0].clone()
}

/// "Any GPU" means a data center's most plentiful model: when its models
/// change, what its running replicas hold changes with them, in the kept
/// pool as in a fresh snapshot.
#[test]
fn a_pool_follows_a_data_centers_gpu_models_into_what_replicas_hold() {
    let mut g = dc("g", Tier::Municipal, "r", "z", 64, 256);
    g.capacity.gpus = BTreeMap::from([("l4".into(), 2)]);
    let key = |name: &str| WorkloadKey::new("ns", name);
    let gpu_workload = |name: &str, replicas| {
        let mut w = workload(name, replicas, 1, 1);
        w.demand.gpu_count = 1;
        w.demand.gpu_model = None;
        w
    };
    let mut pool = Pool::new(snapshot(vec![g.clone()], vec![gpu_workload("a", 2)]));
    pool.set_placement(&key("a"), BTreeMap::from([("g".into(), 2)]));
    g.capacity.gpus = BTreeMap::from([("h100".into(), 2)]);
    pool.set_data_center(g);
    pool.set_workload(gpu_workload("b", 1));
    // a's two replicas hold both H100s now: b does not fit.
    let decided = decided_like_a_fresh_snapshot(&mut pool, "b");
    assert!(decided.placement.is_empty(), "{decided:?}");
}
