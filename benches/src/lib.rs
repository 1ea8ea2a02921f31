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
