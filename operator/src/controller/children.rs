//! What the operator creates in a member cluster for one workload and one
//! data center: pure functions of the `ComputeWorkload`, unit-tested without
//! a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt as _;

use crate::crd::{ComputeWorkload, WorkloadKind};

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

/// The object that runs `replicas` of `cw` in `data_center`'s cluster.
pub fn desired(cw: &ComputeWorkload, data_center: &str, replicas: u32) -> Child {
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
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels);
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
        let Child::Deployment(d) = desired(&workload("Deployment"), "edge-1", 2) else {
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
        let Child::Job(j) = desired(&workload("Job"), "core", 4) else {
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
        let Child::StatefulSet(s) = desired(&workload("StatefulSet"), "core", 1) else {
            panic!("expected a StatefulSet");
        };
        assert_eq!(s.spec.expect("spec").service_name.as_deref(), Some("cams"));
    }

    #[test]
    fn selector_string_names_the_workload() {
        assert_eq!(
            selector("video", "cams"),
            "app.kubernetes.io/managed-by=civicgrid-operator,civicgrid.io/workload-namespace=video,civicgrid.io/workload-name=cams"
        );
    }
}
