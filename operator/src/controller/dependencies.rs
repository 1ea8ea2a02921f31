//! What a workload's pods need besides their own object, copied into every
//! member that runs a copy: the objects `spec.dependencies` names (read from
//! the control cluster), and for a StatefulSet the headless Service its
//! `serviceName` promises.
//!
//! Each copy in a member is owned (`ownerReferences`) by the workload copies
//! there that need it, so the member's garbage collector removes it with the
//! last of them. Every workload applies its dependencies under a field
//! manager of its own, so two workloads sharing a ConfigMap each keep their
//! own owner reference instead of replacing the other's.

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};

use k8s_openapi::api::core::v1::{
    ConfigMap, Secret, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt as _};

use super::children::{self, Child, MANAGED_BY};
use crate::crd::{ComputeWorkload, DependencyKind, WorkloadKind};

/// A dependency as it is applied into members.
#[derive(Debug, Clone, PartialEq)]
pub enum Dependency {
    /// A ConfigMap.
    ConfigMap(ConfigMap),
    /// A Secret.
    Secret(Secret),
    /// A ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// A Service.
    Service(Box<Service>),
}

/// Why a dependency could not be read.
#[derive(Debug, thiserror::Error)]
#[error("spec.dependencies[{index}]: {kind:?} `{name}`: {message}")]
pub struct DependencyError {
    /// Position in `spec.dependencies`.
    pub index: usize,
    /// Its kind.
    pub kind: DependencyKind,
    /// Its name.
    pub name: String,
    /// What went wrong.
    pub message: String,
}

/// The metadata a copy carries: the source's name, labels and annotations
/// (less what only makes sense where it came from), and the operator's mark.
fn copied_meta(source: &ObjectMeta, namespace: &str) -> ObjectMeta {
    let mut labels = source.labels.clone().unwrap_or_default();
    labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    let annotations: BTreeMap<String, String> = source
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "kubectl.kubernetes.io/last-applied-configuration")
        .collect();
    ObjectMeta {
        name: source.name.clone(),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    }
}

/// Reads every dependency `cw` names from the control cluster, as it will
/// be applied into members.
///
/// # Errors
/// A dependency that is missing or cannot be read, naming its entry.
pub async fn read(
    client: &Client,
    cw: &ComputeWorkload,
    secrets_allowed: bool,
) -> Result<Vec<Dependency>, DependencyError> {
    let namespace = cw.namespace().unwrap_or_default();
    let mut read = Vec::with_capacity(cw.spec.dependencies.len());
    for (index, d) in cw.spec.dependencies.iter().enumerate() {
        let failed = |message: String| DependencyError {
            index,
            kind: d.kind,
            name: d.name.clone(),
            message,
        };
        let missing = || failed(format!("not found in namespace `{namespace}`"));
        let read_error = |e: kube::Error| failed(e.to_string());
        let dependency = match d.kind {
            DependencyKind::ConfigMap => {
                let source: ConfigMap = fetch(client, &namespace, &d.name)
                    .await
                    .map_err(read_error)?
                    .ok_or_else(missing)?;
                Dependency::ConfigMap(ConfigMap {
                    metadata: copied_meta(&source.metadata, &namespace),
                    data: source.data,
                    binary_data: source.binary_data,
                    immutable: source.immutable,
                })
            }
            DependencyKind::Secret if !secrets_allowed => {
                return Err(failed(
                    "the operator does not read Secrets outside its own namespace; \
                     allow it with the chart value dependencies.secrets (flag --secret-dependencies)"
                        .to_owned(),
                ));
            }
            DependencyKind::Secret => {
                let source: Secret = fetch(client, &namespace, &d.name)
                    .await
                    .map_err(read_error)?
                    .ok_or_else(missing)?;
                Dependency::Secret(Secret {
                    metadata: copied_meta(&source.metadata, &namespace),
                    data: source.data,
                    immutable: source.immutable,
                    type_: source.type_,
                    string_data: None,
                })
            }
            DependencyKind::ServiceAccount => {
                let source: ServiceAccount = fetch(client, &namespace, &d.name)
                    .await
                    .map_err(read_error)?
                    .ok_or_else(missing)?;
                Dependency::ServiceAccount(ServiceAccount {
                    metadata: copied_meta(&source.metadata, &namespace),
                    automount_service_account_token: source.automount_service_account_token,
                    image_pull_secrets: source.image_pull_secrets,
                    secrets: None,
                })
            }
            DependencyKind::Service => {
                let source: Service = fetch(client, &namespace, &d.name)
                    .await
                    .map_err(read_error)?
                    .ok_or_else(missing)?;
                Dependency::Service(Box::new(Service {
                    metadata: copied_meta(&source.metadata, &namespace),
                    spec: source.spec.map(portable_service_spec),
                    status: None,
                }))
            }
        };
        read.push(dependency);
    }
    Ok(read)
}

/// The object `name` of kind `K` in `namespace`, if there is one.
async fn fetch<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
}

/// Server-side applies `object` as `name` in `namespace` of `member`.
async fn put<K>(
    member: &Client,
    namespace: &str,
    name: &str,
    params: &PatchParams,
    object: &K,
) -> Result<(), kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(member.clone(), namespace)
        .patch(name, params, &Patch::Apply(object))
        .await
        .map(|_| ())
}

/// A Service spec without what the control cluster allocated for it (its
/// cluster IPs, node ports, health check port): the member allocates its
/// own. A headless Service stays headless.
fn portable_service_spec(spec: ServiceSpec) -> ServiceSpec {
    let headless = spec.cluster_ip.as_deref() == Some("None");
    ServiceSpec {
        cluster_ip: headless.then(|| "None".to_owned()),
        cluster_ips: None,
        health_check_node_port: None,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    node_port: None,
                    ..p
                })
                .collect()
        }),
        ..spec
    }
}

/// The headless Service a StatefulSet copy names as its `serviceName`,
/// unless a dependency of that name provides it: every port of the pods,
/// selecting them.
pub fn headless_service(cw: &ComputeWorkload, dependencies: &[Dependency]) -> Option<Dependency> {
    if cw.spec.kind != WorkloadKind::StatefulSet {
        return None;
    }
    let name = cw.name_any();
    let provided = dependencies
        .iter()
        .any(|d| matches!(d, Dependency::Service(s) if s.metadata.name.as_deref() == Some(name.as_str())));
    if provided {
        return None;
    }
    let namespace = cw.namespace().unwrap_or_default();
    let ports: Vec<ServicePort> = cw
        .spec
        .template
        .spec
        .iter()
        .flat_map(|pod| &pod.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .enumerate()
        .map(|(i, p)| ServicePort {
            name: Some(p.name.clone().unwrap_or_else(|| format!("port-{i}"))),
            port: p.container_port,
            protocol: p.protocol.clone(),
            ..ServicePort::default()
        })
        .collect();
    Some(Dependency::Service(Box::new(Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(children::selector_labels(&namespace, &name)),
            ports: (!ports.is_empty()).then_some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    })))
}

/// A fingerprint of the dependencies, so a change to one re-applies them.
pub fn fingerprint(dependencies: &[Dependency]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for d in dependencies {
        let text = match d {
            Dependency::ConfigMap(o) => serde_json::to_string(o),
            Dependency::Secret(o) => serde_json::to_string(o),
            Dependency::ServiceAccount(o) => serde_json::to_string(o),
            Dependency::Service(o) => serde_json::to_string(o),
        }
        .unwrap_or_default();
        text.hash(&mut hasher);
    }
    hasher.finish()
}

/// The field manager a workload's dependencies are applied under: one per
/// workload, so each keeps its own owner reference on a shared object.
fn field_manager(cw: &ComputeWorkload) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (cw.namespace(), cw.name_any()).hash(&mut hasher);
    format!(
        "{}-dependency-{:016x}",
        super::FIELD_MANAGER,
        hasher.finish()
    )
}

/// The owner reference to `child`, the workload's copy in the member.
fn owned_by(child: &Child) -> Option<OwnerReference> {
    let (api_version, kind, meta) = match child {
        Child::Deployment(d) => ("apps/v1", "Deployment", &d.metadata),
        Child::StatefulSet(s) => ("apps/v1", "StatefulSet", &s.metadata),
        Child::Job(j) => ("batch/v1", "Job", &j.metadata),
    };
    Some(OwnerReference {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        ..OwnerReference::default()
    })
}

/// Applies `dependencies` into `member`, owned by the applied `child`.
///
/// # Errors
/// The member's API refused one.
pub async fn apply(
    member: &Client,
    cw: &ComputeWorkload,
    child: &Child,
    dependencies: &[Dependency],
) -> Result<(), kube::Error> {
    let namespace = cw.namespace().unwrap_or_default();
    let owner = owned_by(child);
    let params = PatchParams::apply(&field_manager(cw)).force();
    for d in dependencies {
        let mut d = d.clone();
        let meta = match &mut d {
            Dependency::ConfigMap(o) => &mut o.metadata,
            Dependency::Secret(o) => &mut o.metadata,
            Dependency::ServiceAccount(o) => &mut o.metadata,
            Dependency::Service(o) => &mut o.metadata,
        };
        meta.owner_references = owner.clone().map(|o| vec![o]);
        let name = meta.name.clone().unwrap_or_default();
        match d {
            Dependency::ConfigMap(o) => put(member, &namespace, &name, &params, &o).await?,
            Dependency::Secret(o) => put(member, &namespace, &name, &params, &o).await?,
            Dependency::ServiceAccount(o) => put(member, &namespace, &name, &params, &o).await?,
            Dependency::Service(o) => put(member, &namespace, &name, &params, &*o).await?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ComputeWorkloadSpec;

    fn workload(kind: &str) -> ComputeWorkload {
        let spec: ComputeWorkloadSpec = serde_json::from_value(serde_json::json!({
            "kind": kind, "replicas": 3,
            "template": { "spec": { "containers": [{ "name": "db", "image": "x",
                "ports": [{ "name": "sql", "containerPort": 5432 }, { "containerPort": 9187 }] }] } },
            "resources": { "cpu": "1", "memory": "1Gi" }
        }))
        .expect("spec");
        let mut cw = ComputeWorkload::new("ledger", spec);
        cw.metadata.namespace = Some("finance".into());
        cw
    }

    #[test]
    fn a_stateful_set_gets_the_headless_service_it_names() {
        let Some(Dependency::Service(service)) = headless_service(&workload("StatefulSet"), &[])
        else {
            panic!("expected a Service");
        };
        assert_eq!(service.metadata.name.as_deref(), Some("ledger"));
        let spec = service.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(
            spec.selector,
            Some(children::selector_labels("finance", "ledger"))
        );
        let ports: Vec<(Option<String>, i32)> = spec
            .ports
            .expect("ports")
            .into_iter()
            .map(|p| (p.name, p.port))
            .collect();
        assert_eq!(
            ports,
            vec![(Some("sql".into()), 5432), (Some("port-1".into()), 9187)]
        );
        // Other kinds name no Service.
        assert!(headless_service(&workload("Deployment"), &[]).is_none());
    }

    #[test]
    fn a_dependency_of_the_same_name_provides_the_service() {
        let own = Dependency::Service(Box::new(Service {
            metadata: ObjectMeta {
                name: Some("ledger".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }));
        assert!(headless_service(&workload("StatefulSet"), &[own]).is_none());
    }

    #[test]
    fn a_copied_service_leaves_addresses_to_the_member() {
        let spec = ServiceSpec {
            cluster_ip: Some("10.0.0.7".into()),
            cluster_ips: Some(vec!["10.0.0.7".into()]),
            type_: Some("NodePort".into()),
            health_check_node_port: Some(31000),
            ports: Some(vec![ServicePort {
                port: 80,
                node_port: Some(30080),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        };
        let copied = portable_service_spec(spec);
        assert_eq!(copied.cluster_ip, None);
        assert_eq!(copied.cluster_ips, None);
        assert_eq!(copied.health_check_node_port, None);
        assert_eq!(copied.type_.as_deref(), Some("NodePort"));
        let port = &copied.ports.expect("ports")[0];
        assert_eq!((port.port, port.node_port), (80, None));
        let headless = portable_service_spec(ServiceSpec {
            cluster_ip: Some("None".into()),
            ..ServiceSpec::default()
        });
        assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    }

    #[test]
    fn copies_drop_what_only_makes_sense_at_the_source() {
        let source = ObjectMeta {
            name: Some("cfg".into()),
            namespace: Some("elsewhere".into()),
            uid: Some("u".into()),
            resource_version: Some("7".into()),
            labels: Some(BTreeMap::from([("app".into(), "ledger".into())])),
            annotations: Some(BTreeMap::from([
                (
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{}".into(),
                ),
                ("team".into(), "finance".into()),
            ])),
            ..ObjectMeta::default()
        };
        let meta = copied_meta(&source, "finance");
        assert_eq!(meta.namespace.as_deref(), Some("finance"));
        assert_eq!((meta.uid, meta.resource_version), (None, None));
        let labels = meta.labels.expect("labels");
        assert_eq!(labels.get("app").map(String::as_str), Some("ledger"));
        assert_eq!(
            labels.get(MANAGED_BY.0).map(String::as_str),
            Some(MANAGED_BY.1)
        );
        assert_eq!(
            meta.annotations
                .expect("annotations")
                .keys()
                .collect::<Vec<_>>(),
            vec!["team"]
        );
    }
}
