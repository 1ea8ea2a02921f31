//! The `civicgrid.io/v1alpha1` custom resources: [`DataCenter`] and
//! [`ComputeWorkload`].
//!
//! These are wire types: they say what a platform engineer may write. The
//! engine never sees them; [`crate::convert`] parses them into
//! [`crate::engine::model`] types and names the field at fault when it cannot.
//! What the API server can check on its own (enums, minimums, CEL rules) is
//! declared here so bad specs are rejected at `kubectl apply`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// GPU model label set by NVIDIA's GPU feature discovery (and by the test
/// harness's simulated nodes).
pub const GPU_MODEL_LABEL: &str = "nvidia.com/gpu.product";
/// GPU extended resource.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The API group of every CivicGrid resource.
pub const GROUP: &str = "civicgrid.io";

/// What kind of data center this is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The municipal core (government cloud).
    Municipal,
    /// An edge site near video and sensor sources.
    Edge,
    /// A partner or commercial cloud.
    Partner,
}

/// A data center that contributes capacity to the city's compute pool.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[kube(
    group = "civicgrid.io",
    version = "v1alpha1",
    kind = "DataCenter",
    plural = "datacenters",
    shortname = "dc",
    status = "DataCenterStatus",
    category = "civicgrid",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Region","type":"string","jsonPath":".spec.region"}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".spec.zone"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Cordoned","type":"boolean","jsonPath":".spec.cordoned"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DataCenterSpec {
    /// municipal, edge or partner.
    pub tier: Tier,
    /// Region, the unit of data residency (e.g. `city-north`).
    #[x_kube(validation = Rule::new("self.size() > 0").message("region must not be empty"))]
    pub region: String,
    /// Failure zone inside the region.
    #[serde(default)]
    pub zone: String,
    /// Named site (a campus, a street cabinet); latency is measured between sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Where the data center is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<GeoLocation>,
    /// Capacity offered to the pool. Leave out to derive it from the member
    /// cluster's nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// Labels that workloads select data centers by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Taints: only workloads that tolerate them are placed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<DataCenterTaint>,
    /// Prices, in integer minor units of `currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// Energy efficiency and grid carbon intensity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<Energy>,
    /// Round-trip network latency in milliseconds to named sites.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_ms: BTreeMap<String, u32>,
    /// Datasets stored here (data locality and residency of data products).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    /// Secret holding the member cluster's kubeconfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret_ref: Option<SecretKeyRef>,
    /// A cordoned data center keeps what runs there but takes nothing new.
    #[serde(default)]
    pub cordoned: bool,
}

/// Latitude and longitude in decimal degrees.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.latitude >= -90.0 && self.latitude <= 90.0 && self.longitude >= -180.0 && self.longitude <= 180.0").message("latitude must be within [-90, 90] and longitude within [-180, 180]"))]
pub struct GeoLocation {
    /// Degrees north.
    pub latitude: f64,
    /// Degrees east.
    pub longitude: f64,
}

/// Resources a data center offers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// CPU cores (a Kubernetes quantity: `512`, `1500m`).
    pub cpu: Quantity,
    /// Memory (a Kubernetes quantity: `2Ti`, `512Gi`).
    pub memory: Quantity,
    /// Ephemeral storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<Quantity>,
    /// GPUs by model, e.g. `{"nvidia-l4": 16}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpus: BTreeMap<String, u32>,
}

/// A taint on a data center.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataCenterTaint {
    /// Taint key.
    pub key: String,
    /// Taint value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// NoSchedule keeps new replicas away; PreferNoSchedule lowers the
    /// score; NoExecute also moves running replicas away (paced by each
    /// workload's `failover.maxEvictionsPerMinute`).
    pub effect: TaintEffect,
    /// When the taint was added; a NoExecute toleration's
    /// `tolerationSeconds` count from here (from when the operator first
    /// saw the taint when absent: `status.noExecuteSince`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_added: Option<Time>,
}

/// What a taint does to workloads that do not tolerate it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Hash, Eq, JsonSchema)]
pub enum TaintEffect {
    /// No new replicas here; running ones stay.
    NoSchedule,
    /// Place here only if nothing else fits (scores lowest).
    PreferNoSchedule,
    /// No new replicas, and running ones move away unless tolerated.
    NoExecute,
}

/// Prices per hour, in integer minor units (cents) of the currency.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cost {
    /// ISO 4217 code.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Per CPU core-hour.
    #[serde(default)]
    pub per_core_hour: u64,
    /// Per GiB of memory per hour.
    #[serde(default)]
    pub per_gib_hour: u64,
    /// Per GPU-hour, by model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_gpu_hour: BTreeMap<String, u64>,
}

fn default_currency() -> String {
    "EUR".to_owned()
}

/// Energy: how much the facility adds (PUE) and how clean its grid is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Energy {
    /// Power usage effectiveness, at least 1.0.
    #[x_kube(validation = Rule::new("self >= 1.0").message("pue must be at least 1.0"))]
    pub pue: f64,
    /// Declared grid carbon intensity in gCO2e/kWh.
    pub carbon_intensity: u32,
    /// How the intensity was accounted.
    pub accounting: CarbonAccounting,
    /// A fresher value pushed by a carbon-data feed, used until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<PushedCarbonIntensity>,
}

/// GHG Protocol scope 2 accounting methods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CarbonAccounting {
    /// The average intensity of the local grid.
    LocationBased,
    /// Contracts and certificates the operator holds.
    MarketBased,
}

/// A short-lived carbon intensity reading.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushedCarbonIntensity {
    /// gCO2e/kWh.
    pub carbon_intensity: u32,
    /// When the reading stops being used.
    pub expires_at: Time,
}

/// A key in a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Secret namespace.
    pub namespace: String,
    /// Key within the Secret's data.
    #[serde(default = "default_kubeconfig_key")]
    pub key: String,
}

fn default_kubeconfig_key() -> String {
    "kubeconfig".to_owned()
}

/// What the operator observes about a data center.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataCenterStatus {
    /// Ready, Reachable, Cordoned, ClusterIdentified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Capacity in use by the pool (from the spec or the member's nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Capacity>,
    /// Capacity taken by placed replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Capacity>,
    /// Workloads with replicas here (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
    /// When the member cluster last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// Probes in a row the member did not answer (kept here so a restart or
    /// a new leader counts on).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_probes: u32,
    /// Probes in a row the member answered while it was `Reachable=False`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub answered_probes: u32,
    /// When the operator first saw each NoExecute taint (by key) that
    /// gives no `timeAdded`: tolerations' seconds count from here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub no_execute_since: BTreeMap<String, Time>,
    /// The member cluster's identity: the UID of its `kube-system`
    /// namespace, as Karmada identifies clusters. Data centers with the same
    /// one share a member cluster, and a workload is placed in at most one
    /// of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A workload placed across data centers as one pool.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug)]
#[kube(
    group = "civicgrid.io",
    version = "v1alpha1",
    kind = "ComputeWorkload",
    plural = "computeworkloads",
    shortname = "cw",
    namespaced,
    status = "ComputeWorkloadStatus",
    category = "civicgrid",
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Placed","type":"integer","jsonPath":".status.placedReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Scheduled","type":"string","jsonPath":".status.conditions[?(@.type==\"Scheduled\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ComputeWorkloadSpec {
    /// What to create in each member cluster.
    pub kind: WorkloadKind,
    /// Total replicas across the pool (per data center when Duplicated).
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must be at least 0"))]
    pub replicas: i32,
    /// Pod template of the Deployment, Job or StatefulSet.
    #[schemars(schema_with = "preserve_unknown_object")]
    pub template: PodTemplateSpec,
    /// Resources one replica needs; the unit of capacity accounting.
    pub resources: ReplicaResources,
    /// Where replicas may and should go.
    #[serde(default)]
    pub placement: Placement,
    /// Higher goes first; may preempt strictly lower priorities.
    #[serde(default)]
    pub priority: i32,
    /// Whether this workload may evict lower-priority replicas to fit.
    #[serde(default)]
    pub preemption_policy: PreemptionPolicy,
    /// How replicas leave a data center that is lost.
    #[serde(default)]
    pub failover: FailoverPolicy,
    /// Objects in the workload's namespace that its pods need, copied into
    /// every member cluster that runs a copy of it, and removed there with
    /// the last copy that needs them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<DependencyRef>,
    /// Changes to the pod template in some data centers (a registry
    /// mirror, environment, node labels), applied in order to the copy each
    /// matching data center gets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
}

/// Changes to the copy in the data centers that match every selector given
/// (every data center when none is).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Override {
    /// Only these data centers, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_centers: Vec<String>,
    /// Only data centers of these tiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
    /// Only data centers in these regions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Only data centers whose `spec.labels` include all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data_center_labels: BTreeMap<String, String>,
    /// Pull every container image from this registry instead (host and
    /// optional port, e.g. `mirror.edge-east.city.example:5000`); the
    /// repository path and tag stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_registry: Option<String>,
    /// Environment variables set on every container (replacing one of the
    /// same name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<OverrideEnv>,
    /// Labels added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Annotations added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Node labels the pods require in the member (merged into the pod's
    /// `nodeSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// One environment variable an override sets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverrideEnv {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// An object in the workload's namespace that its pods need.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DependencyRef {
    /// Its kind.
    pub kind: DependencyKind,
    /// Its name, in the workload's namespace.
    pub name: String,
}

/// The kinds of object a workload may depend on.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum DependencyKind {
    /// Configuration files and environment.
    ConfigMap,
    /// Credentials (the operator needs read access to Secrets for this; see
    /// the chart's `dependencies.secrets`).
    Secret,
    /// The identity the pods run as.
    ServiceAccount,
    /// A Service fronting the pods (its cluster IP and node ports are the
    /// member's own).
    Service,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The Kubernetes object created in each member cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    /// A long-running service.
    Deployment,
    /// A batch job run to completion.
    Job,
    /// A stateful service with stable identities.
    StatefulSet,
}

/// What one replica needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaResources {
    /// CPU per replica (quantity).
    pub cpu: Quantity,
    /// Memory per replica (quantity).
    pub memory: Quantity,
    /// Ephemeral storage per replica (quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<Quantity>,
    /// GPUs per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequest>,
}

/// GPUs per replica, optionally of one model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct GpuRequest {
    /// How many GPUs each replica needs.
    #[x_kube(validation = Rule::new("self >= 1").message("gpu.count must be at least 1"))]
    pub count: u32,
    /// A GPU model (as in the data center's capacity); any model when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Placement rules: hard filters, preferences, division and spread.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Only these tiers (all tiers when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_tiers: Vec<Tier>,
    /// These tiers score higher.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_tiers: Vec<Tier>,
    /// Ordered groups: later groups are used only when earlier ones are full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_groups: Vec<FallbackGroup>,
    /// Data residency: only these regions (any when empty). A hard rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<String>,
    /// Only data centers whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_center_selector: Option<LabelSelector>,
    /// Taints this workload tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<DataCenterToleration>,
    /// Only data centers within this latency of a named site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency: Option<LatencyBound>,
    /// Datasets the workload reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_affinity: Option<DataAffinity>,
    /// How widely replicas must spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadConstraints>,
    /// How replicas are divided among the chosen data centers.
    #[serde(default)]
    pub strategy: ReplicaStrategy,
    /// Place all replicas or none.
    #[serde(default)]
    pub gang: bool,
    /// Weights of the scores that rank data centers.
    #[serde(default)]
    pub weights: ScoreWeights,
    /// Whether replicas move back when better capacity returns.
    #[serde(default)]
    pub rebalance: RebalancePolicy,
}

/// One step of an ordered fallback: data centers matching any listed field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackGroup {
    /// Name shown in explanations.
    pub name: String,
    /// Tiers in this group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
    /// Regions in this group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Data centers in this group, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_centers: Vec<String>,
}

/// Tolerates a data center taint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataCenterToleration {
    /// Taint key.
    pub key: String,
    /// Equal (key and value) or Exists (key only).
    #[serde(default)]
    pub operator: TolerationOperator,
    /// Value for Equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Effect tolerated; all effects when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// For a NoExecute taint: how long replicas may stay after the taint
    /// was added (they stay for good when absent). Until then the data
    /// center keeps them but takes no new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<u32>,
}

/// How a toleration matches a taint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Hash, Eq, Default, JsonSchema)]
pub enum TolerationOperator {
    /// Key and value equal.
    #[default]
    Equal,
    /// Key present.
    Exists,
}

/// A latency bound from a named site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencyBound {
    /// Site the latency is measured from (e.g. the cameras' site).
    pub from_site: String,
    /// Maximum round trip in milliseconds.
    pub max_ms: u32,
}

/// Datasets a workload reads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct DataAffinity {
    /// Data centers must host all of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// Data centers hosting these score higher.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<String>,
}

/// Spread bounds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minDomains) || !has(self.maxDomains) || self.minDomains <= self.maxDomains").message("spread.minDomains must not exceed spread.maxDomains"))]
pub struct SpreadConstraints {
    /// What a domain is: a data center, a zone or a region.
    #[serde(default)]
    pub by: SpreadDomain,
    /// At least this many domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_domains: Option<u32>,
    /// At most this many domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_domains: Option<u32>,
    /// At most this many replicas in any one data center.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_data_center: Option<u32>,
}

/// The unit that spread bounds count.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SpreadDomain {
    /// Each data center is a domain.
    #[default]
    DataCenter,
    /// Each zone is a domain.
    Zone,
    /// Each region is a domain.
    Region,
}

/// How replicas are divided.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 'StaticWeights' || (has(self.staticWeights) && size(self.staticWeights) > 0)").message("strategy.staticWeights must list at least one data center when type is StaticWeights"))]
pub struct ReplicaStrategy {
    /// Duplicated, StaticWeights, AvailableCapacity or Score.
    #[serde(rename = "type", default)]
    pub kind: StrategyKind,
    /// Weights for StaticWeights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_weights: Vec<StaticWeight>,
}

/// Replica strategies, after Karmada's PropagationPolicy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum StrategyKind {
    /// Every chosen data center runs `replicas`.
    Duplicated,
    /// Divide by fixed weights per data center.
    StaticWeights,
    /// Divide in proportion to free capacity.
    AvailableCapacity,
    /// Fill the best-scoring data centers first.
    #[default]
    Score,
}

/// A static weight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticWeight {
    /// Data center name.
    pub data_center: String,
    /// Relative weight.
    pub weight: u32,
}

/// Score weights; all non-negative. By default free capacity and each
/// preference the workload declares (preferred tiers, preferred datasets,
/// latency to its latency site) count once; cost and carbon count when
/// weighted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScoreWeights {
    /// Prefer data centers with more room left.
    #[serde(default = "default_weight")]
    pub free_capacity: u32,
    /// Prefer cheaper capacity.
    #[serde(default)]
    pub cost: u32,
    /// Prefer lower carbon intensity × PUE.
    #[serde(default)]
    pub carbon: u32,
    /// Prefer lower latency to the latency site.
    #[serde(default = "default_weight")]
    pub latency: u32,
    /// Prefer data centers hosting the preferred datasets.
    #[serde(default = "default_weight")]
    pub locality: u32,
    /// Prefer the preferred tiers.
    #[serde(default = "default_weight")]
    pub tier: u32,
}

fn default_weight() -> u32 {
    1
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            free_capacity: 1,
            cost: 0,
            carbon: 0,
            latency: 1,
            locality: 1,
            tier: 1,
        }
    }
}

/// Priority-based preemption.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PreemptionPolicy {
    /// May evict replicas of strictly lower priority when that makes it fit.
    PreemptLowerPriority,
    /// Never evicts.
    #[default]
    Never,
}

/// Failover knobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPolicy {
    /// How long a data center may be unreachable before its replicas move.
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u32,
    /// At most this many replicas are moved off data centers unreachable
    /// past the grace period in any minute; the rest stay placed where they
    /// were until the window allows (no limit when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_evictions_per_minute: Option<u32>,
    /// When replicas move, copies that would lose ready replicas keep them
    /// until the new ones are ready enough that at most this many placed
    /// replicas are not ready (old copies go at once when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
}

fn default_grace() -> u32 {
    60
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace(),
            max_evictions_per_minute: None,
            max_unavailable: None,
        }
    }
}

/// Rebalancing when better capacity returns.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalancePolicy {
    /// Never (default: stability first) or WhenBetterGroupHasRoom.
    #[serde(default)]
    pub mode: RebalanceMode,
    /// At most this many replicas move per scheduling round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_moves_per_round: Option<u32>,
}

/// When placed replicas move without being forced to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RebalanceMode {
    /// Replicas stay where they run while that stays valid.
    #[default]
    Never,
    /// Replicas in a later fallback group move to an earlier one with room.
    WhenBetterGroupHasRoom,
}

/// What the operator reports about a workload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeWorkloadStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas per data center.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<PlacementEntry>,
    /// Sum of placed replicas.
    #[serde(default)]
    pub placed_replicas: i32,
    /// Sum of ready replicas in member clusters.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Scheduled, Propagated, Available.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Why data centers were not chosen: the nearest misses (those that
    /// passed the most rules), at most twenty; `rejectedByRule` counts them
    /// all. `civicgrid-operator plan --explain` explains every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub explanation: Vec<ExplanationEntry>,
    /// Data centers not chosen, by the first rule that rejected each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected_by_rule: BTreeMap<String, i32>,
    /// Replicas failover moved off unreachable data centers in the last
    /// minute: what `failover.maxEvictionsPerMinute` is counted against.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evictions: Vec<EvictionEntry>,
    /// The latest replicas of this workload evicted to make room for a
    /// higher-priority workload (the last ten, oldest first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preempted_by: Vec<PreemptedByEntry>,
}

/// Replicas evicted by a higher-priority workload's preemption.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreemptedByEntry {
    /// When they were evicted.
    pub time: Time,
    /// The workload the room was made for, as `namespace/name`.
    pub preemptor: String,
    /// Where.
    pub data_center: String,
    /// How many.
    pub replicas: i32,
}

/// Replicas moved off data centers unreachable past the grace period.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvictionEntry {
    /// When they were moved.
    pub time: Time,
    /// How many.
    pub replicas: i32,
}

/// Replicas in one data center.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementEntry {
    /// Data center name.
    pub data_center: String,
    /// Replicas placed there.
    pub replicas: i32,
    /// Replicas ready there (from the member cluster).
    #[serde(default)]
    pub ready_replicas: i32,
}

/// Why a data center was not chosen.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExplanationEntry {
    /// Data center name.
    pub data_center: String,
    /// The first rule that rejected it (e.g. `Region`, `Capacity`, `Score`).
    pub rule: String,
    /// Human-readable detail.
    pub message: String,
}
