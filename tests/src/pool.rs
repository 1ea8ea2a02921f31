//! A CivicGrid pool on the harness: a control cluster with the CRDs and one
//! member cluster per data center, each with simulated nodes, its kubeconfig
//! in a Secret and its `DataCenter` applied. Shared by the end-to-end tests,
//! the chart test and the operator benchmark.

use std::collections::BTreeMap;
use std::time::Duration;

use civicgrid_operator::crd::{ComputeWorkload, DataCenter};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, CustomResourceExt as _};

use crate::controlplane::{Cluster, HarnessError, NodeShape, eventually, start_clusters};

/// Namespace of the member kubeconfig Secrets.
pub const SECRETS_NAMESPACE: &str = "civicgrid-system";
const WAIT: Duration = Duration::from_secs(120);

/// One data center of a pool: its name, tier, region and zone.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// `DataCenter` name.
    pub name: &'static str,
    /// `spec.tier`.
    pub tier: &'static str,
    /// `spec.region`.
    pub region: &'static str,
    /// `spec.zone`.
    pub zone: &'static str,
}

/// The control cluster and the members by data center name.
pub struct Pool {
    /// The control cluster (CRDs, DataCenters, workloads).
    pub control: Cluster,
    /// Member clusters by data center name.
    pub members: BTreeMap<String, Cluster>,
    /// Admin client of the control cluster.
    pub client: Client,
}

fn kube(what: &str) -> impl FnOnce(kube::Error) -> HarnessError + '_ {
    move |source| HarnessError::Kube {
        what: what.to_owned(),
        source,
    }
}

impl Pool {
    /// Starts the pool: `nodes` nodes of `shape` per member, the CRDs and
    /// `namespaces` (plus [`SECRETS_NAMESPACE`]) in the control cluster.
    ///
    /// # Errors
    /// A cluster that does not start, or an object the API server refuses.
    pub async fn start(
        members: &[Member],
        nodes: usize,
        shape: &NodeShape,
        namespaces: &[&str],
    ) -> Result<Self, HarnessError> {
        let names: Vec<&str> = members.iter().map(|m| m.tier).collect();
        let (control, client, clusters) = start_control_and(&names, namespaces).await?;
        let mut by_name = BTreeMap::new();
        for (member, cluster) in members.iter().zip(clusters) {
            cluster.add_nodes("node", nodes, shape).await?;
            let secret = format!("{}-kubeconfig", member.name);
            kubeconfig_secret(&client, &secret, cluster.kubeconfig_yaml()).await?;
            let dc = DataCenter::new(
                member.name,
                serde_json::from_value(serde_json::json!({
                    "tier": member.tier, "region": member.region, "zone": member.zone,
                    "kubeconfigSecretRef": { "name": secret, "namespace": SECRETS_NAMESPACE }
                }))
                .map_err(|e| HarnessError::Manifest(e.to_string()))?,
            );
            let data_centers: Api<DataCenter> = Api::all(client.clone());
            // The CRD is served once Established.
            eventually("DataCenter created", WAIT, || async {
                data_centers.create(&PostParams::default(), &dc).await.ok()
            })
            .await?;
            by_name.insert(member.name.to_owned(), cluster);
        }
        Ok(Self {
            control,
            members: by_name,
            client,
        })
    }

    /// Waits until every `DataCenter` is `Ready`; see [`data_centers_ready`].
    ///
    /// # Errors
    /// [`HarnessError::Timeout`].
    pub async fn wait_ready(&self) -> Result<(), HarnessError> {
        data_centers_ready(&self.client).await
    }
}

/// Starts a control cluster and the member clusters `members`, with the
/// CRDs and `namespaces` (plus [`SECRETS_NAMESPACE`]) in the control
/// cluster.
async fn start_control_and(
    members: &[&str],
    namespaces: &[&str],
) -> Result<(Cluster, Client, Vec<Cluster>), HarnessError> {
    let mut names = vec!["control"];
    names.extend(members);
    let mut clusters = start_clusters(&names).await?;
    let control = clusters.remove(0);
    let client = control.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [DataCenter::crd(), ComputeWorkload::crd()] {
        crds.create(&PostParams::default(), &crd)
            .await
            .map_err(kube("creating a CRD"))?;
    }
    create_namespaces(&client, namespaces).await?;
    Ok((control, client, clusters))
}

/// The city the end-to-end tests and the operator benchmark run: a
/// municipal core, an edge site and a partner cloud, one zone each.
pub const CITY: [Member; 3] = [
    Member {
        name: "municipal-core",
        tier: "municipal",
        region: "city",
        zone: "core-a",
    },
    Member {
        name: "edge-east",
        tier: "edge",
        region: "city",
        zone: "east-1",
    },
    Member {
        name: "partner-cloud",
        tier: "partner",
        region: "city",
        zone: "dc-2",
    },
];

/// A pool of many data centers on few member clusters: data center `i`
/// (named `dc-000`, `dc-001`, …, each its own zone of region `city`) is
/// backed by member cluster `i % clusters`, declares an equal share of that
/// cluster's nodes as its capacity, and tells its copies apart from the
/// other data centers' in the same cluster by the data-center label every
/// copy carries. A workload must then run in one data center only
/// (`spread.maxDomains: 1`): its copies in two data centers of one cluster
/// would be one object.
pub struct SharedPool {
    /// The control cluster.
    pub control: Cluster,
    /// The member clusters.
    pub clusters: Vec<Cluster>,
    /// Admin client of the control cluster.
    pub client: Client,
    /// The data centers' names.
    pub data_centers: Vec<String>,
}

impl SharedPool {
    /// Starts `clusters` member clusters of `nodes` nodes of `shape` each,
    /// and `data_centers` `DataCenter`s over them.
    ///
    /// # Errors
    /// A cluster that does not start, or an object the API server refuses.
    pub async fn start(
        data_centers: usize,
        clusters: usize,
        nodes: usize,
        shape: &NodeShape,
        namespaces: &[&str],
    ) -> Result<Self, HarnessError> {
        let clusters = clusters.clamp(1, data_centers.max(1));
        let names: Vec<String> = (0..clusters).map(|i| format!("member-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (control, client, started) = start_control_and(&names, namespaces).await?;
        for (i, cluster) in started.iter().enumerate() {
            cluster.add_nodes("node", nodes, shape).await?;
            kubeconfig_secret(
                &client,
                &format!("member-{i}-kubeconfig"),
                cluster.kubeconfig_yaml(),
            )
            .await?;
        }
        let per_cluster = data_centers.div_ceil(clusters);
        let invalid = |e: civicgrid_operator::quantity::QuantityError| {
            HarnessError::Manifest(format!("node shape: {e}"))
        };
        let share = |total: u64| total * nodes as u64 / per_cluster as u64;
        let cpu_millis =
            share(civicgrid_operator::quantity::cpu_millis(&shape.cpu).map_err(invalid)?);
        let memory = share(civicgrid_operator::quantity::bytes(&shape.memory).map_err(invalid)?);
        let tiers = ["municipal", "edge", "partner"];
        let api: Api<DataCenter> = Api::all(client.clone());
        let mut names = Vec::with_capacity(data_centers);
        for i in 0..data_centers {
            let name = format!("dc-{i:03}");
            let dc = DataCenter::new(
                &name,
                serde_json::from_value(serde_json::json!({
                    "tier": tiers[i % tiers.len()], "region": "city", "zone": format!("zone-{i:03}"),
                    "capacity": { "cpu": format!("{cpu_millis}m"), "memory": memory.to_string() },
                    "kubeconfigSecretRef": {
                        "name": format!("member-{}-kubeconfig", i % clusters),
                        "namespace": SECRETS_NAMESPACE,
                    }
                }))
                .map_err(|e| HarnessError::Manifest(e.to_string()))?,
            );
            eventually("DataCenter created", WAIT, || async {
                api.create(&PostParams::default(), &dc).await.ok()
            })
            .await?;
            names.push(name);
        }
        Ok(Self {
            control,
            clusters: started,
            client,
            data_centers: names,
        })
    }

    /// Waits until every `DataCenter` is `Ready`; see [`data_centers_ready`].
    ///
    /// # Errors
    /// [`HarnessError::Timeout`].
    pub async fn wait_ready(&self) -> Result<(), HarnessError> {
        data_centers_ready(&self.client).await
    }
}

/// Waits until every `DataCenter` in the control cluster behind `client` is
/// `Ready` (an operator must run). Workloads come after that: a placement
/// made while only some members had answered would, rightly, stay where it
/// landed.
///
/// # Errors
/// [`HarnessError::Timeout`].
pub async fn data_centers_ready(client: &Client) -> Result<(), HarnessError> {
    let data_centers: Api<DataCenter> = Api::all(client.clone());
    eventually("every DataCenter Ready", WAIT, || async {
        let list = data_centers.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .all(|dc| {
                dc.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .then_some(())
    })
    .await
}

/// Creates `namespaces` and [`SECRETS_NAMESPACE`].
///
/// # Errors
/// The API server refuses one.
pub async fn create_namespaces(client: &Client, namespaces: &[&str]) -> Result<(), HarnessError> {
    let api: Api<Namespace> = Api::all(client.clone());
    for name in std::iter::once(&SECRETS_NAMESPACE).chain(namespaces) {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some((*name).to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &namespace)
            .await
            .map_err(kube("creating a namespace"))?;
    }
    Ok(())
}

/// Stores a member's kubeconfig as Secret `name` (key `kubeconfig`) in
/// [`SECRETS_NAMESPACE`], as `DataCenter.spec.kubeconfigSecretRef` expects.
///
/// # Errors
/// The API server refuses it.
pub async fn kubeconfig_secret(
    client: &Client,
    name: &str,
    kubeconfig_yaml: &str,
) -> Result<(), HarnessError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SECRETS_NAMESPACE);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "kubeconfig".to_owned(),
            ByteString(kubeconfig_yaml.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(kube("creating a kubeconfig Secret"))?;
    Ok(())
}
