//! The engine's own types: already parsed and validated, free of Kubernetes
//! wire types, cheap to copy into a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

/// What kind of data center this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// The municipal core.
    Municipal,
    /// An edge site near video and sensor sources.
    Edge,
    /// A partner or commercial cloud.
    Partner,
}

/// What a taint keeps away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaintEffect {
    /// No new replicas unless tolerated.
    NoSchedule,
    /// Used last unless tolerated.
    PreferNoSchedule,
    /// No new replicas, and running ones leave, unless tolerated.
    NoExecute,
}

/// How a toleration matches a taint's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TolerationOperator {
    /// The values must be equal.
    #[default]
    Equal,
    /// Any value.
    Exists,
}

/// The unit replicas are spread over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SpreadDomain {
    /// Each data center.
    #[default]
    DataCenter,
    /// Each zone of a region.
    Zone,
    /// Each region.
    Region,
}

/// How replicas are divided among data centers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StrategyKind {
    /// A full copy in each chosen data center.
    Duplicated,
    /// In proportion to fixed weights.
    StaticWeights,
    /// In proportion to free capacity.
    AvailableCapacity,
    /// Best-scoring data centers first.
    #[default]
    Score,
}

/// Whether a workload may evict lower priorities to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PreemptionPolicy {
    /// Evict replicas of strictly lower priorities.
    PreemptLowerPriority,
    /// Never evict.
    #[default]
    Never,
}

/// Whether replicas move towards a better fallback group on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RebalanceMode {
    /// Replicas stay while their data center stays valid.
    #[default]
    Never,
    /// Move to an earlier fallback group once it has room.
    WhenBetterGroupHasRoom,
}

/// Identifies a workload: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WorkloadKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl WorkloadKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An amount of every resource the pool accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Ephemeral storage in bytes.
    pub ephemeral_bytes: u64,
    /// GPUs by model.
    pub gpus: BTreeMap<String, u64>,
}

impl Resources {
    /// Whether any resource is at its maximum (a sum that may have
    /// saturated).
    pub fn saturated(&self) -> bool {
        [self.cpu_millis, self.memory_bytes, self.ephemeral_bytes].contains(&u64::MAX)
            || self.gpus.values().any(|&n| n == u64::MAX)
    }

    /// `self - other`, floored at zero per resource.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        let mut gpus = self.gpus.clone();
        for (model, used) in &other.gpus {
            if let Some(free) = gpus.get_mut(model) {
                *free = free.saturating_sub(*used);
            }
        }
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            ephemeral_bytes: self.ephemeral_bytes.saturating_sub(other.ephemeral_bytes),
            gpus,
        }
    }

    /// Adds `other` in place.
    pub fn add(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.ephemeral_bytes = self.ephemeral_bytes.saturating_add(other.ephemeral_bytes);
        for (model, n) in &other.gpus {
            let slot = self.gpus.entry(model.clone()).or_default();
            *slot = slot.saturating_add(*n);
        }
    }

    /// Subtracts `other` in place, floored at zero.
    pub fn sub(&mut self, other: &Resources) {
        *self = self.saturating_sub(other);
    }

    /// True when every resource of `self` is at most that of `capacity`.
    pub fn fits_within(&self, capacity: &Resources) -> bool {
        self.cpu_millis <= capacity.cpu_millis
            && self.memory_bytes <= capacity.memory_bytes
            && self.ephemeral_bytes <= capacity.ephemeral_bytes
            && self
                .gpus
                .iter()
                .all(|(model, n)| *n == 0 || capacity.gpus.get(model).is_some_and(|c| n <= c))
    }
}

/// A taint on a data center.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Option<String>,
    /// Effect.
    pub effect: TaintEffect,
    /// When it was added (Unix seconds), if known.
    pub added_unix: Option<i64>,
}

/// A toleration of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Toleration {
    /// Key.
    pub key: String,
    /// Equal or Exists.
    pub operator: TolerationOperator,
    /// Value for Equal.
    pub value: Option<String>,
    /// Effect tolerated (all when `None`).
    pub effect: Option<TaintEffect>,
    /// For NoExecute: seconds replicas may stay after the taint was added
    /// (for good when `None`).
    pub toleration_seconds: Option<u32>,
}

impl Toleration {
    /// Whether this toleration covers `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.key == taint.key
            && self.effect.is_none_or(|effect| effect == taint.effect)
            && match self.operator {
                TolerationOperator::Exists => true,
                TolerationOperator::Equal => self.value == taint.value,
            }
    }
}

/// What a data center's NoExecute taints mean for a workload's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoExecute {
    /// None applies, or every one is tolerated for good.
    Stays,
    /// Tolerated for a while: replicas there stay until this Unix time but
    /// no new ones go; the taint's key.
    StaysUntil(i64, String),
    /// Not tolerated, or tolerated for a time that ran out: replicas leave.
    Leaves(String),
}

/// Judges `dc`'s NoExecute taints for a workload with `tolerations` at
/// `now`. A taint whose addition time is unknown counts from `now`.
pub fn no_execute(tolerations: &[Toleration], dc: &DataCenter, now: i64) -> NoExecute {
    let mut verdict = NoExecute::Stays;
    for taint in dc
        .taints
        .iter()
        .filter(|t| t.effect == TaintEffect::NoExecute)
    {
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| t.tolerates(taint)).collect();
        if matching.is_empty() {
            return NoExecute::Leaves(taint.key.clone());
        }
        // The most generous toleration counts; one without a limit wins.
        if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            continue;
        }
        let seconds = matching
            .iter()
            .filter_map(|t| t.toleration_seconds)
            .max()
            .unwrap_or(0);
        let until = taint
            .added_unix
            .unwrap_or(now)
            .saturating_add(i64::from(seconds));
        if until <= now {
            return NoExecute::Leaves(taint.key.clone());
        }
        verdict = match verdict {
            NoExecute::StaysUntil(earlier, key) if earlier <= until => {
                NoExecute::StaysUntil(earlier, key)
            }
            _ => NoExecute::StaysUntil(until, taint.key.clone()),
        };
    }
    verdict
}

/// Whether the operator can reach a data center's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Answering.
    #[default]
    Reachable,
    /// Not answering since this Unix time (seconds).
    UnreachableSince(i64),
}

/// A data center as the engine sees it.
#[derive(Debug, Clone)]
pub struct DataCenter {
    /// Unique name.
    pub name: String,
    /// Tier.
    pub tier: Tier,
    /// Region (residency unit).
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Capacity offered to the pool.
    pub capacity: Resources,
    /// Price per core-hour (minor units).
    pub cost_per_core_hour: u64,
    /// Price per GiB-hour (minor units).
    pub cost_per_gib_hour: u64,
    /// Price per GPU-hour by model (minor units).
    pub cost_per_gpu_hour: BTreeMap<String, u64>,
    /// Effective grid intensity in gCO2e/kWh (pushed value if fresh, else declared).
    pub carbon_intensity: Option<u32>,
    /// PUE × 1000.
    pub pue_milli: u32,
    /// Latency in ms to named sites.
    pub latency_ms: BTreeMap<String, u32>,
    /// Datasets hosted.
    pub datasets: BTreeSet<String>,
    /// Takes no new replicas.
    pub cordoned: bool,
    /// Member cluster reachability.
    pub reachability: Reachability,
    /// The member cluster's identity (its `kube-system` namespace's UID),
    /// once known. Data centers that share a member cluster share it, and a
    /// workload runs in at most one of them: its copies there would be one
    /// object under one name.
    pub cluster: Option<String>,
}

/// What one replica needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaDemand {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Ephemeral storage in bytes.
    pub ephemeral_bytes: u64,
    /// GPUs per replica.
    pub gpu_count: u64,
    /// GPU model, or any model when `None`.
    pub gpu_model: Option<String>,
}

/// A label selector, already parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Every label must equal.
    pub match_labels: BTreeMap<String, String>,
    /// Every expression must hold.
    pub expressions: Vec<SelectorExpression>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SelectorExpression {
    /// Label value is one of.
    In(String, BTreeSet<String>),
    /// Label value is none of (or label absent).
    NotIn(String, BTreeSet<String>),
    /// Label present.
    Exists(String),
    /// Label absent.
    DoesNotExist(String),
}

impl Selector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                SelectorExpression::In(k, values) => {
                    labels.get(k).is_some_and(|v| values.contains(v))
                }
                SelectorExpression::NotIn(k, values) => {
                    labels.get(k).is_none_or(|v| !values.contains(v))
                }
                SelectorExpression::Exists(k) => labels.contains_key(k),
                SelectorExpression::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// A fallback group: data centers matching any of its fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FallbackGroup {
    /// Name for explanations.
    pub name: String,
    /// Tiers.
    pub tiers: BTreeSet<Tier>,
    /// Regions.
    pub regions: BTreeSet<String>,
    /// Data center names.
    pub data_centers: BTreeSet<String>,
}

impl FallbackGroup {
    /// Whether `dc` belongs to this group.
    pub fn contains(&self, dc: &DataCenter) -> bool {
        self.tiers.contains(&dc.tier)
            || self.regions.contains(&dc.region)
            || self.data_centers.contains(&dc.name)
    }
}

/// Score weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Weights {
    /// Free capacity.
    pub free_capacity: u32,
    /// Cost.
    pub cost: u32,
    /// Carbon.
    pub carbon: u32,
    /// Latency.
    pub latency: u32,
    /// Locality.
    pub locality: u32,
    /// Preferred tier.
    pub tier: u32,
}

impl From<&crate::crd::ScoreWeights> for Weights {
    fn from(w: &crate::crd::ScoreWeights) -> Self {
        Self {
            free_capacity: w.free_capacity,
            cost: w.cost,
            carbon: w.carbon,
            latency: w.latency,
            locality: w.locality,
            tier: w.tier,
        }
    }
}

/// The defaults are the CRD's, so the engine and `kubectl apply` agree.
impl Default for Weights {
    fn default() -> Self {
        Self::from(&crate::crd::ScoreWeights::default())
    }
}

/// Spread bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spread {
    /// Domain unit.
    pub by: SpreadDomain,
    /// At least this many domains.
    pub min_domains: Option<u32>,
    /// At most this many domains.
    pub max_domains: Option<u32>,
    /// Cap per data center.
    pub max_replicas_per_data_center: Option<u32>,
}

/// Placement rules of one workload.
#[derive(Debug, Clone, Default)]
pub struct PlacementRules {
    /// Allowed tiers (all when empty).
    pub required_tiers: BTreeSet<Tier>,
    /// Preferred tiers.
    pub preferred_tiers: BTreeSet<Tier>,
    /// Ordered fallback groups.
    pub fallback_groups: Vec<FallbackGroup>,
    /// Allowed regions (all when empty).
    pub allowed_regions: BTreeSet<String>,
    /// Data center selector.
    pub selector: Option<Selector>,
    /// Tolerations.
    pub tolerations: Vec<Toleration>,
    /// `(site, max ms)`.
    pub max_latency: Option<(String, u32)>,
    /// Datasets that must be hosted.
    pub required_datasets: BTreeSet<String>,
    /// Datasets that score higher.
    pub preferred_datasets: BTreeSet<String>,
    /// Spread bounds.
    pub spread: Spread,
    /// Division strategy.
    pub strategy: StrategyKind,
    /// Static weights by data center name.
    pub static_weights: BTreeMap<String, u32>,
    /// All or nothing.
    pub gang: bool,
    /// Score weights.
    pub weights: Weights,
    /// Rebalance mode.
    pub rebalance: RebalanceMode,
    /// Max replicas moved by one rebalance round.
    pub max_moves_per_round: Option<u32>,
}

/// A workload as the engine sees it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Identity.
    pub key: WorkloadKey,
    /// Desired replicas (per data center when Duplicated).
    pub replicas: u32,
    /// Per-replica demand.
    pub demand: ReplicaDemand,
    /// Rules.
    pub placement: PlacementRules,
    /// Priority.
    pub priority: i32,
    /// Preemption policy.
    pub preemption: PreemptionPolicy,
    /// Seconds an unreachable data center keeps this workload's replicas.
    pub grace_period_seconds: u32,
}

/// Everything the engine decides on. The caller owns clocks and I/O.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Now, Unix seconds (for grace periods and pushed carbon values).
    pub now_unix: i64,
    /// Data centers.
    pub data_centers: Vec<DataCenter>,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Where replicas run now.
    pub current: BTreeMap<WorkloadKey, BTreeMap<String, u32>>,
}
