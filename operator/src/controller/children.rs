//! What the operator creates in a member cluster for one workload and one
//! data center: pure functions of the `ComputeWorkload`, unit-tested without
//! a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Namespace, PodSpec, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt as _;

use crate::crd::{
    ComputeWorkload, GPU_MODEL_LABEL, GPU_RESOURCE, Override, ReplicaResources, WorkloadKind,
};

/// Set on everything the operator creates in a member cluster.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "civicgrid-operator");
/// The owning workload's namespace.
pub const WORKLOAD_NAMESPACE: &str = "civicgrid.io/workload-namespace";
/// The owning workload's name.
pub const WORKLOAD_NAME: &str = "civicgrid.io/workload-name";
/// The data center the object was placed for.
pub const DATA_CENTER: &str = "civicgrid.io/data-center";

/// The labels that identify a workload's children, for selectors.
pub fn selector_labels(namespace: &str, name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (WORKLOAD_NAMESPACE.to_owned(), namespace.to_owned()),
        (WORKLOAD_NAME.to_owned(), name.to_owned()),
    ])
}

/// A label selector string matching every child of `namespace/name`.
pub fn selector(namespace: &str, name: &str) -> String {
    format!(
        "{}={},{WORKLOAD_NAMESPACE}={namespace},{WORKLOAD_NAME}={name}",
        MANAGED_BY.0, MANAGED_BY.1
    )
}

/// A label selector string matching every child the operator manages.
pub fn managed_selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

fn labels(namespace: &str, name: &str, data_center: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(namespace, name);
    labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    labels.insert(DATA_CENTER.to_owned(), data_center.to_owned());
    labels
}

/// One workload's object in one member cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    /// `spec.kind: Deployment`.
    Deployment(Deployment),
    /// `spec.kind: StatefulSet`.
    StatefulSet(StatefulSet),
    /// `spec.kind: Job` (parallelism and completions are the replicas).
    Job(Job),
}

/// The member-cluster namespace for a workload's children: the workload's own.
pub fn namespace(cw: &ComputeWorkload) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: cw.namespace(),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// Writes what one replica needs into the pod, so the member's scheduler
/// places it by what the pool accounted: the requests the template leaves
/// out (on its first container; where it states them, they already add up
/// to `spec.resources`, which `convert` checks), a GPU's limit (Kubernetes
/// requires it to equal the request), and for GPUs the model's node
/// selector (`gpu_model`: the model the engine counted in this data center)
/// and a toleration of the GPU nodes' usual `nvidia.com/gpu` taint.
fn write_resources(pod: &mut PodSpec, resources: &ReplicaResources, gpu_model: Option<&str>) {
    let states = |pod: &PodSpec,
                  list: fn(&ResourceRequirements) -> Option<&BTreeMap<String, Quantity>>,
                  name: &str| {
        pod.containers.iter().any(|c| {
            c.resources
                .as_ref()
                .and_then(list)
                .is_some_and(|m| m.contains_key(name))
        })
    };
    let gpus = resources.gpu.as_ref().filter(|g| g.count > 0);
    let mut requests: Vec<(&str, Quantity)> = vec![
        ("cpu", resources.cpu.clone()),
        ("memory", resources.memory.clone()),
    ];
    if let Some(q) = &resources.ephemeral_storage {
        requests.push(("ephemeral-storage", q.clone()));
    }
    if let Some(g) = gpus {
        requests.push((GPU_RESOURCE, Quantity(g.count.to_string())));
    }
    let missing_requests: Vec<(&str, Quantity)> = requests
        .into_iter()
        .filter(|(name, _)| !states(pod, |r| r.requests.as_ref(), name))
        .collect();
    let gpu_limit_missing = gpus.is_some() && !states(pod, |r| r.limits.as_ref(), GPU_RESOURCE);
    if let Some(first) = pod.containers.first_mut() {
        let r = first
            .resources
            .get_or_insert_with(ResourceRequirements::default);
        for (name, q) in missing_requests {
            r.requests
                .get_or_insert_with(BTreeMap::new)
                .insert(name.to_owned(), q);
        }
        if gpu_limit_missing && let Some(g) = gpus {
            r.limits
                .get_or_insert_with(BTreeMap::new)
                .insert(GPU_RESOURCE.to_owned(), Quantity(g.count.to_string()));
        }
    }
    if gpus.is_none() {
        return;
    }
    if let Some(model) = gpu_model {
        pod.node_selector
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_MODEL_LABEL.to_owned(), model.to_owned());
    }
    let tolerations = pod.tolerations.get_or_insert_with(Vec::new);
    if !tolerations
        .iter()
        .any(|t| t.key.as_deref() == Some(GPU_RESOURCE))
    {
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        });
    }
}

/// The object that runs `replicas` of `cw` in `data_center`'s cluster.
/// `gpu_model` is the GPU model the engine counted for it there, and
/// `overrides` the workload's overrides that match that data center.
pub fn desired(
    cw: &ComputeWorkload,
    data_center: &str,
    replicas: u32,
    gpu_model: Option<&str>,
    overrides: &[&Override],
) -> Child {
    let namespace = cw.namespace().unwrap_or_default();
    let name = cw.name_any();
    let labels = labels(&namespace, &name, data_center);
    let metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.clone()),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    };
    let mut template = cw.spec.template.clone();
    // Before the operator's own labels and requests, which an override
    // must not change: the selector and the accounting depend on them.
    for o in overrides {
        super::overrides::apply(o, &mut template);
    }
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels);
    if let Some(pod) = template.spec.as_mut() {
        write_resources(pod, &cw.spec.resources, gpu_model);
    }
    let selector = LabelSelector {
        match_labels: Some(selector_labels(&namespace, &name)),
        match_expressions: None,
    };
    let replicas = i32::try_from(replicas).unwrap_or(i32::MAX);
    match cw.spec.kind {
        WorkloadKind::Deployment => Child::Deployment(Deployment {
            metadata,
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                selector,
                template,
                ..DeploymentSpec::default()
            }),
            status: None,
        }),
        WorkloadKind::StatefulSet => Child::StatefulSet(StatefulSet {
            metadata,
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                selector,
                service_name: Some(name),
                template,
                ..StatefulSetSpec::default()
            }),
            status: None,
        }),
        WorkloadKind::Job => {
            if let Some(spec) = template.spec.as_mut()
                && spec.restart_policy.is_none()
            {
                // Jobs refuse the pod default `Always`.
                spec.restart_policy = Some("OnFailure".to_owned());
            }
            Child::Job(Job {
                metadata,
                spec: Some(JobSpec {
                    parallelism: Some(replicas),
                    completions: Some(replicas),
                    template,
                    ..JobSpec::default()
                }),
                status: None,
            })
        }
    }
}

impl Child {
    /// The copy without a replica count, for a member where another
    /// controller (an HorizontalPodAutoscaler) sets it.
    #[must_use]
    pub fn without_replicas(mut self) -> Self {
        match &mut self {
            Child::Deployment(d) => {
                if let Some(spec) = d.spec.as_mut() {
                    spec.replicas = None;
                }
            }
            Child::StatefulSet(s) => {
                if let Some(spec) = s.spec.as_mut() {
                    spec.replicas = None;
                }
            }
            // A Job's parallelism is not scaled by an autoscaler.
            Child::Job(_) => {}
        }
        self
    }

    /// The Kubernetes kind of this copy.
    pub fn kind(&self) -> &'static str {
        match self {
            Child::Deployment(_) => "Deployment",
            Child::StatefulSet(_) => "StatefulSet",
            Child::Job(_) => "Job",
        }
    }

    /// A fingerprint of the whole object, to skip applying what is already
    /// applied.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let text = match self {
            Child::Deployment(d) => serde_json::to_string(d),
            Child::StatefulSet(s) => serde_json::to_string(s),
            Child::Job(j) => serde_json::to_string(j),
        }
        .unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        hasher.finish()
    }

    /// `metadata.generation` of the object.
    pub fn generation(&self) -> Option<i64> {
        match self {
            Child::Deployment(d) => d.metadata.generation,
            Child::StatefulSet(s) => s.metadata.generation,
            Child::Job(j) => j.metadata.generation,
        }
    }
}

/// Ready replicas reported by a child as the member cluster returned it.
pub fn ready_replicas(child: &Child) -> i32 {
    match child {
        Child::Deployment(d) => d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        Child::StatefulSet(s) => s
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
        Child::Job(j) => j
            .status
            .as_ref()
            .map_or(0, |s| s.ready.unwrap_or(0) + s.succeeded.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ComputeWorkloadSpec;

    fn workload(kind: &str) -> ComputeWorkload {
        let spec: ComputeWorkloadSpec = serde_json::from_value(serde_json::json!({
            "kind": kind, "replicas": 3,
            "template": { "metadata": { "labels": { "app": "cams" } },
                          "spec": { "containers": [{ "name": "c", "image": "x" }] } },
            "resources": { "cpu": "1", "memory": "1Gi" }
        }))
        .expect("spec");
        let mut cw = ComputeWorkload::new("cams", spec);
        cw.metadata.namespace = Some("video".into());
        cw
    }

    #[test]
    fn deployment_carries_replicas_labels_and_a_selector_its_pods_match() {
        let Child::Deployment(d) = desired(&workload("Deployment"), "edge-1", 2, None, &[]) else {
            panic!("expected a Deployment");
        };
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(d.metadata.namespace.as_deref(), Some("video"));
        let pod_labels = spec
            .template
            .metadata
            .expect("meta")
            .labels
            .expect("labels");
        assert_eq!(pod_labels.get("app").map(String::as_str), Some("cams"));
        for (k, v) in spec.selector.match_labels.expect("selector") {
            assert_eq!(
                pod_labels.get(&k),
                Some(&v),
                "selector {k} must match the pods"
            );
        }
        let labels = d.metadata.labels.expect("labels");
        assert_eq!(labels.get(DATA_CENTER).map(String::as_str), Some("edge-1"));
        assert_eq!(
            labels.get(MANAGED_BY.0).map(String::as_str),
            Some(MANAGED_BY.1)
        );
    }

    #[test]
    fn job_runs_replicas_in_parallel_and_never_restarts_always() {
        let Child::Job(j) = desired(&workload("Job"), "core", 4, None, &[]) else {
            panic!("expected a Job");
        };
        let spec = j.spec.expect("spec");
        assert_eq!((spec.parallelism, spec.completions), (Some(4), Some(4)));
        assert_eq!(
            spec.template.spec.expect("pod").restart_policy.as_deref(),
            Some("OnFailure")
        );
    }

    #[test]
    fn stateful_set_names_its_service_after_the_workload() {
        let Child::StatefulSet(s) = desired(&workload("StatefulSet"), "core", 1, None, &[]) else {
            panic!("expected a StatefulSet");
        };
        assert_eq!(s.spec.expect("spec").service_name.as_deref(), Some("cams"));
    }

    fn pod_of(child: Child) -> PodSpec {
        let Child::Deployment(d) = child else {
            panic!("expected a Deployment");
        };
        d.spec.expect("spec").template.spec.expect("pod")
    }

    /// The member's scheduler must place a replica by what the pool
    /// accounted: requests, the GPU limit, the GPU model's nodes.
    #[test]
    fn pods_request_what_the_pool_accounted() {
        let mut cw = workload("Deployment");
        cw.spec.resources.ephemeral_storage = Some(Quantity("2Gi".into()));
        cw.spec.resources.gpu = Some(crate::crd::GpuRequest {
            count: 2,
            model: None,
        });
        let pod = pod_of(desired(&cw, "edge-1", 1, Some("l4"), &[]));
        let r = pod.containers[0].resources.clone().expect("resources");
        let requests = r.requests.expect("requests");
        let q = |m: &BTreeMap<String, Quantity>, k: &str| m.get(k).map(|q| q.0.clone());
        assert_eq!(q(&requests, "cpu").as_deref(), Some("1"));
        assert_eq!(q(&requests, "memory").as_deref(), Some("1Gi"));
        assert_eq!(q(&requests, "ephemeral-storage").as_deref(), Some("2Gi"));
        assert_eq!(q(&requests, GPU_RESOURCE).as_deref(), Some("2"));
        assert_eq!(
            q(&r.limits.expect("limits"), GPU_RESOURCE).as_deref(),
            Some("2")
        );
        assert_eq!(
            pod.node_selector
                .expect("node selector")
                .get(GPU_MODEL_LABEL)
                .map(String::as_str),
            Some("l4")
        );
        let tolerations = pod.tolerations.expect("tolerations");
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some(GPU_RESOURCE)
                    && t.operator.as_deref() == Some("Exists")
                    && t.effect.as_deref() == Some("NoSchedule")),
            "{tolerations:?}"
        );

        // Without GPUs: requests only, no GPU node selector or toleration.
        let pod = pod_of(desired(&workload("Deployment"), "edge-1", 1, None, &[]));
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());
        let requests = pod.containers[0]
            .resources
            .clone()
            .and_then(|r| r.requests)
            .expect("requests");
        assert_eq!(requests.len(), 2, "{requests:?}");
    }

    /// What the template states itself stays as it is (it adds up to
    /// `spec.resources`; `convert` refuses it otherwise), and nothing is
    /// counted twice.
    #[test]
    fn requests_the_template_states_are_kept() {
        let mut cw = workload("Deployment");
        let pod = cw.spec.template.spec.as_mut().expect("pod");
        pod.containers.push(pod.containers[0].clone());
        pod.containers[1].name = "sidecar".into();
        pod.containers[1].resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_owned(), Quantity("1".into()))])),
            ..ResourceRequirements::default()
        });
        let pod = pod_of(desired(&cw, "edge-1", 1, None, &[]));
        let first = pod.containers[0]
            .resources
            .clone()
            .and_then(|r| r.requests)
            .expect("requests");
        assert_eq!(first.keys().collect::<Vec<_>>(), vec!["memory"]);
        let second = pod.containers[1]
            .resources
            .clone()
            .and_then(|r| r.requests)
            .expect("requests");
        assert_eq!(second.get("cpu").map(|q| q.0.as_str()), Some("1"));
    }

    #[test]
    fn selector_string_names_the_workload() {
        assert_eq!(
            selector("video", "cams"),
            "app.kubernetes.io/managed-by=civicgrid-operator,civicgrid.io/workload-namespace=video,civicgrid.io/workload-name=cams"
        );
    }
}
