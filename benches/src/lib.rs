//! Benchmarks for CivicGrid live in `benches/benches/`; this library holds the
//! synthetic cities they share.

use std::collections::BTreeMap;

use civicgrid_operator::engine::model::{
    DataCenter, PlacementRules, PreemptionPolicy, Reachability, ReplicaDemand, Resources, Snapshot,
    StrategyKind, Tier, Workload, WorkloadKey,
};

/// Parses a flag's value as a finite number above zero (clap's ranges take
/// integers only).
///
/// # Errors
/// A message naming what was wrong with the value.
pub fn positive_number(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(number) if number.is_finite() && number > 0.0 => Ok(number),
        Ok(_) => Err(format!("{value} is not a number above zero")),
        Err(error) => Err(format!("{value:?}: {error}")),
    }
}

/// A deterministic pseudo-random sequence (SplitMix64), so every run
/// schedules the same city.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// A city with `data_centers` data centers (1 in 20 municipal, 3 in 4 edge,
/// the rest partner; 8 regions) and `workloads` workloads with mixed rules,
/// sized so the pool ends up well used but not full.
pub fn city(workloads: usize, data_centers: usize, seed: u64) -> Snapshot {
    let mut rng = Rng::new(seed);
    let tiers = [Tier::Municipal, Tier::Edge, Tier::Edge, Tier::Partner];
    let dcs: Vec<DataCenter> = (0..data_centers)
        .map(|i| {
            let tier = if i % 20 == 0 {
                Tier::Municipal
            } else {
                tiers[i % 4]
            };
            let mut gpus = BTreeMap::new();
            if i % 5 == 0 {
                gpus.insert("nvidia-l4".to_owned(), 8);
            }
            DataCenter {
                name: format!("dc-{i:05}"),
                tier,
                region: format!("region-{}", i % 8),
                zone: format!("zone-{}", i % 32),
                labels: BTreeMap::new(),
                taints: Vec::new(),
                capacity: Resources {
                    cpu_millis: (64 + rng.below(448))
                        * 1000
                        * (workloads as u64 / data_centers as u64).max(1),
                    memory_bytes: (256 + rng.below(1792)) << 30 << 2,
                    ephemeral_bytes: u64::MAX,
                    gpus,
                },
                cost_per_core_hour: 1 + rng.below(9),
                cost_per_gib_hour: 1,
                cost_per_gpu_hour: BTreeMap::new(),
                carbon_intensity: Some(50 + u32::try_from(rng.below(500)).unwrap_or(0)),
                pue_milli: 1100 + u32::try_from(rng.below(500)).unwrap_or(0),
                latency_ms: BTreeMap::from([(
                    "city-hall".to_owned(),
                    1 + u32::try_from(rng.below(40)).unwrap_or(0),
                )]),
                datasets: Default::default(),
                cordoned: false,
                reachability: Reachability::Reachable,
                cluster: None,
            }
        })
        .collect();
    let strategies = [
        StrategyKind::Score,
        StrategyKind::AvailableCapacity,
        StrategyKind::Score,
    ];
    let workloads: Vec<Workload> = (0..workloads)
        .map(|i| {
            let mut placement = PlacementRules {
                strategy: strategies[i % 3],
                ..PlacementRules::default()
            };
            if i % 4 == 0 {
                placement.allowed_regions = [format!("region-{}", rng.below(8))].into();
            }
            if i % 7 == 0 {
                placement.required_tiers = [Tier::Edge].into();
                placement.max_latency = Some(("city-hall".to_owned(), 20));
            }
            placement.weights.cost = u32::try_from(rng.below(3)).unwrap_or(0);
            placement.weights.carbon = u32::try_from(rng.below(3)).unwrap_or(0);
            Workload {
                key: WorkloadKey::new(format!("ns-{}", i % 50), format!("w-{i:06}")),
                replicas: 1 + u32::try_from(rng.below(6)).unwrap_or(0),
                demand: ReplicaDemand {
                    cpu_millis: 250 * (1 + rng.below(8)),
                    memory_bytes: (1 + rng.below(8)) << 29,
                    ..ReplicaDemand::default()
                },
                placement,
                priority: i32::try_from(rng.below(3)).unwrap_or(0),
                preemption: PreemptionPolicy::Never,
                grace_period_seconds: 60,
            }
        })
        .collect();
    Snapshot {
        now_unix: 0,
        data_centers: dcs,
        workloads,
        current: BTreeMap::new(),
    }
}

/// A contended city, generated deterministically, for the placement
/// engine's realistic benchmark: capacity sized so the workloads ask for
/// about three quarters of it, and workloads of thousands of rule classes
/// (regions, tiers, label selectors, datasets, latency bounds and weights
/// combined), with preemption, spread, static weights, gangs, fallback
/// groups and GPUs; one data center in ten has no carbon data. A third of
/// the workloads already run where a first round put them.
pub fn contended_city(workloads: usize, data_centers: usize, seed: u64) -> Snapshot {
    use civicgrid_operator::engine::model::{
        FallbackGroup, Selector, Spread, SpreadDomain, Taint, TaintEffect,
    };
    let mut rng = Rng::new(seed);
    // Average demand per workload: 3.5 replicas × 1.125 cores; a quarter of
    // the capacity is left free, on average.
    let wanted_cores = workloads as u64 * 35 * 1125 / 10;
    let per_dc_millis = wanted_cores * 4 / 3 / data_centers.max(1) as u64;
    let classes = ["metro", "rural", "harbour", "industrial", "campus"];
    let dcs: Vec<DataCenter> = (0..data_centers)
        .map(|i| {
            let tier = match i % 10 {
                0 => Tier::Municipal,
                1..=6 => Tier::Edge,
                _ => Tier::Partner,
            };
            let mut gpus = BTreeMap::new();
            if i % 5 == 0 {
                gpus.insert("nvidia-l4".to_owned(), 4 + rng.below(12));
            }
            let mut taints = Vec::new();
            if i % 17 == 0 {
                taints.push(Taint {
                    key: "maintenance".into(),
                    value: None,
                    effect: TaintEffect::PreferNoSchedule,
                    added_unix: None,
                });
            }
            DataCenter {
                name: format!("dc-{i:05}"),
                tier,
                region: format!("region-{}", i % 12),
                zone: format!("zone-{}", i % 48),
                labels: BTreeMap::from([
                    (
                        "site-class".to_owned(),
                        classes[i % classes.len()].to_owned(),
                    ),
                    (
                        "network".to_owned(),
                        if i % 3 == 0 { "5g" } else { "fiber" }.to_owned(),
                    ),
                ]),
                taints,
                capacity: Resources {
                    cpu_millis: per_dc_millis / 2 + rng.below(per_dc_millis.max(1)),
                    memory_bytes: (per_dc_millis / 1000 * 4) << 30,
                    ephemeral_bytes: u64::MAX,
                    gpus,
                },
                cost_per_core_hour: 1 + rng.below(9),
                cost_per_gib_hour: 1,
                cost_per_gpu_hour: BTreeMap::new(),
                carbon_intensity: (i % 10 != 3)
                    .then(|| 50 + u32::try_from(rng.below(500)).unwrap_or(0)),
                pue_milli: 1100 + u32::try_from(rng.below(500)).unwrap_or(0),
                latency_ms: BTreeMap::from([(
                    "city-hall".to_owned(),
                    1 + u32::try_from(rng.below(60)).unwrap_or(0),
                )]),
                datasets: (0..3)
                    .map(|_| format!("dataset-{}", rng.below(200)))
                    .collect(),
                cordoned: false,
                reachability: Reachability::Reachable,
                cluster: None,
            }
        })
        .collect();
    let strategies = [
        StrategyKind::Score,
        StrategyKind::AvailableCapacity,
        StrategyKind::Score,
        StrategyKind::StaticWeights,
        StrategyKind::Score,
    ];
    let workloads: Vec<Workload> = (0..workloads)
        .map(|i| {
            let mut p = PlacementRules {
                strategy: strategies[i % strategies.len()],
                ..PlacementRules::default()
            };
            if i % 100 == 7 {
                p.strategy = StrategyKind::Duplicated;
                p.spread.min_domains = Some(2);
            }
            if i % 3 == 0 {
                p.allowed_regions = (0..1 + rng.below(3))
                    .map(|_| format!("region-{}", rng.below(12)))
                    .collect();
            }
            if i % 5 == 1 {
                p.required_tiers = [Tier::Edge].into();
                p.max_latency = Some((
                    "city-hall".to_owned(),
                    10 + 5 * u32::try_from(rng.below(6)).unwrap_or(0),
                ));
            }
            if i % 4 == 2 {
                p.selector = Some(Selector {
                    match_labels: BTreeMap::from([(
                        "site-class".to_owned(),
                        classes[usize::try_from(rng.below(5)).unwrap_or(0)].to_owned(),
                    )]),
                    expressions: Vec::new(),
                });
            }
            if i % 6 == 0 {
                p.preferred_datasets = [format!("dataset-{}", rng.below(200))].into();
            }
            if i % 9 == 4 {
                p.spread = Spread {
                    by: SpreadDomain::Zone,
                    min_domains: Some(2),
                    max_domains: Some(4),
                    max_replicas_per_data_center: None,
                };
            }
            if p.strategy == StrategyKind::StaticWeights {
                p.static_weights = (0..4)
                    .map(|_| {
                        (
                            format!("dc-{:05}", rng.below(data_centers as u64)),
                            1 + u32::try_from(rng.below(4)).unwrap_or(0),
                        )
                    })
                    .collect();
            }
            if i % 20 == 11 {
                p.gang = true;
            }
            if i % 10 == 5 {
                p.fallback_groups = vec![
                    FallbackGroup {
                        name: "edge".into(),
                        tiers: [Tier::Edge].into(),
                        ..FallbackGroup::default()
                    },
                    FallbackGroup {
                        name: "anywhere".into(),
                        ..FallbackGroup::default()
                    },
                ];
            }
            p.weights.cost = u32::try_from(rng.below(3)).unwrap_or(0);
            p.weights.carbon = u32::try_from(rng.below(3)).unwrap_or(0);
            let priority = i32::try_from(rng.below(5)).unwrap_or(0);
            let gpu = i % 25 == 3;
            Workload {
                key: WorkloadKey::new(format!("ns-{}", i % 50), format!("w-{i:06}")),
                replicas: 1 + u32::try_from(rng.below(6)).unwrap_or(0),
                demand: ReplicaDemand {
                    cpu_millis: 250 * (1 + rng.below(8)),
                    memory_bytes: (1 + rng.below(8)) << 29,
                    gpu_count: u64::from(gpu),
                    gpu_model: gpu.then(|| "nvidia-l4".to_owned()),
                    ..ReplicaDemand::default()
                },
                placement: p,
                priority,
                preemption: if priority >= 3 && i % 3 == 0 {
                    PreemptionPolicy::PreemptLowerPriority
                } else {
                    PreemptionPolicy::Never
                },
                grace_period_seconds: 60,
            }
        })
        .collect();
    let mut snapshot = Snapshot {
        now_unix: 0,
        data_centers: dcs,
        workloads,
        current: BTreeMap::new(),
    };
    // A third already run where a first round (of the whole city) put them.
    let first = civicgrid_operator::engine::schedule(
        &snapshot,
        &civicgrid_operator::engine::Options {
            explain: false,
            explain_nearest: None,
            exhaustive: false,
        },
    );
    snapshot.current = first
        .decisions
        .iter()
        .enumerate()
        .filter(|(i, d)| i % 3 == 0 && !d.placement.is_empty())
        .map(|(_, d)| (d.workload.clone(), d.placement.clone()))
        .collect();
    snapshot
}
