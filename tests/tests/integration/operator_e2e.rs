//! The operator end to end: a control cluster and three member clusters
//! (municipal, edge, partner) with simulated nodes, and the operator as its
//! own process (`civicgrid-operator run`), so that killing it is a SIGKILL.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use civicgrid_operator::controller::children;
use civicgrid_operator::crd::{ComputeWorkload, DataCenter};
use civicgrid_tests::controlplane::{Cluster, NodeShape, eventually};
use civicgrid_tests::operator::{OperatorOptions, OperatorProcess};
use civicgrid_tests::pool::{self, Member};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

const WAIT: Duration = Duration::from_secs(60);
const MEMBERS: [Member; 3] = civicgrid_tests::pool::CITY;

/// The control cluster, the members by data center name, and the operator.
struct Pool {
    control: Cluster,
    members: BTreeMap<String, Cluster>,
    client: Client,
    operator: Option<OperatorProcess>,
    /// `run` flags beyond the harness's own.
    operator_args: Vec<String>,
}

impl Pool {
    /// The control cluster and all three members, with one operator.
    async fn start() -> anyhow::Result<Self> {
        Self::start_running(&MEMBERS, &[]).await
    }

    /// The control cluster and `members`, with one operator given the
    /// extra `run` flags `operator_args`, every data center ready.
    async fn start_running(members: &[Member], operator_args: &[&str]) -> anyhow::Result<Self> {
        let mut pool = Self::start_with(members).await?;
        pool.operator_args = operator_args.iter().map(|a| (*a).to_owned()).collect();
        pool.start_operator()?;
        pool.wait_ready().await?;
        Ok(pool)
    }

    /// The control cluster and `members`, with no operator running yet.
    async fn start_with(members: &[Member]) -> anyhow::Result<Self> {
        let shape = NodeShape {
            cpu: "8".into(),
            memory: "32Gi".into(),
            ..NodeShape::default()
        };
        let pool = pool::Pool::start(members, 2, &shape, &["traffic"]).await?;
        Ok(Self {
            control: pool.control,
            members: pool.members,
            client: pool.client,
            operator: None,
            operator_args: Vec::new(),
        })
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        Ok(pool::data_centers_ready(&self.client).await?)
    }

    /// `civicgrid-operator run` against the control cluster; with a Lease
    /// in `civicgrid-system` when `lease` is given.
    fn spawn_operator(
        &self,
        instance: &str,
        lease: Option<Duration>,
    ) -> anyhow::Result<OperatorProcess> {
        let options = OperatorOptions {
            leader_election: lease.map(|lease| ("civicgrid-system".to_owned(), lease)),
            extra_args: self.operator_args.clone(),
            ..OperatorOptions::e2e(instance)
        };
        Ok(OperatorProcess::start(&self.control, &options)?)
    }

    fn start_operator(&mut self) -> anyhow::Result<()> {
        self.operator = Some(self.spawn_operator("e2e", None)?);
        Ok(())
    }

    /// Stops the operator the hard way: SIGKILL, wherever it is.
    fn kill_operator(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.kill();
        }
    }

    /// The running operator's `/metrics` text.
    async fn metrics(&self) -> Option<String> {
        self.operator.as_ref()?.metrics().await.ok()
    }

    fn workloads(&self) -> Api<ComputeWorkload> {
        Api::namespaced(self.client.clone(), "traffic")
    }

    /// Replicas of the workload's Deployment in each member that has one.
    async fn copies(&self, name: &str) -> anyhow::Result<BTreeMap<String, i32>> {
        let mut copies = BTreeMap::new();
        for (dc, member) in &self.members {
            let deployments: Api<Deployment> = Api::namespaced(member.client().await?, "traffic");
            if let Some(d) = deployments.get_opt(name).await? {
                copies.insert(dc.clone(), d.spec.and_then(|s| s.replicas).unwrap_or(0));
            }
        }
        Ok(copies)
    }

    async fn running_pods(&self, dc: &str) -> anyhow::Result<usize> {
        let pods: Api<Pod> = Api::namespaced(self.members[dc].client().await?, "traffic");
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count())
    }

    async fn wait_copies(&self, name: &str, want: &[(&str, i32)]) -> anyhow::Result<()> {
        let want: BTreeMap<String, i32> = want.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect();
        let waited = eventually(&format!("copies of {name} = {want:?}"), WAIT, || async {
            (self.copies(name).await.ok()? == want).then_some(())
        })
        .await;
        match waited {
            Ok(()) => Ok(()),
            Err(timeout) => Err(self.explain(timeout.into(), name).await),
        }
    }

    /// `error` with what the pool looked like when a wait for the workload
    /// `name` gave up: its copies in each member, its status and the end of
    /// the operator's log. The clusters' logs go with the clusters when the
    /// test ends, so a wait that times out in CI has only this to go on.
    async fn explain(&self, error: anyhow::Error, name: &str) -> anyhow::Error {
        let copies = match self.copies(name).await {
            Ok(copies) => format!("{copies:?}"),
            Err(unread) => format!("unreadable: {unread:#}"),
        };
        let status = match self.workloads().get_opt(name).await {
            Ok(Some(workload)) => serde_json::to_string_pretty(&workload.status)
                .unwrap_or_else(|unprintable| unprintable.to_string()),
            Ok(None) => "no such workload".to_owned(),
            Err(unread) => format!("unreadable: {unread}"),
        };
        let log = self.operator.as_ref().map_or_else(
            || "no operator running".to_owned(),
            OperatorProcess::log_tail,
        );
        error.context(format!(
            "copies of {name} now: {copies}\nits status: {status}\nthe operator's last log lines:\n{log}"
        ))
    }

    /// Waits for an Event with `reason` about the workload `name`.
    async fn wait_event(&self, name: &str, reason: &str) -> anyhow::Result<()> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), "traffic");
        let waited = eventually(&format!("{reason} Event about {name}"), WAIT, || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .then_some(())
        })
        .await;
        match waited {
            Ok(()) => Ok(()),
            Err(timeout) => Err(self.explain(timeout.into(), name).await),
        }
    }

    async fn condition(&self, name: &str, type_: &str) -> Option<(String, String, String)> {
        let cw = self.workloads().get_opt(name).await.ok()??;
        cw.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason, c.message))
    }
}

/// Edge first; partner is the only other place it may go.
fn edge_first() -> serde_json::Value {
    serde_json::json!({
        "requiredTiers": ["edge", "partner"],
        "preferredTiers": ["edge"],
        "weights": { "freeCapacity": 0, "tier": 10 },
        "strategy": { "type": "Score" }
    })
}

fn workload(
    name: &str,
    replicas: i32,
    placement: serde_json::Value,
    grace: u32,
) -> anyhow::Result<ComputeWorkload> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "civicgrid.io/v1alpha1", "kind": "ComputeWorkload",
        "metadata": { "name": name, "namespace": "traffic" },
        "spec": {
            "kind": "Deployment", "replicas": replicas,
            "template": { "spec": { "containers": [{ "name": "detector", "image": "detector:2.4" }] } },
            "resources": { "cpu": "1", "memory": "1Gi" },
            "placement": placement,
            "failover": { "gracePeriodSeconds": grace }
        }
    }))?)
}

async fn scale(api: &Api<ComputeWorkload>, name: &str, replicas: i32) -> anyhow::Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "replicas": replicas } })),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn workload_is_propagated_scaled_survives_an_operator_kill_and_leaves_nothing_when_deleted()
-> anyhow::Result<()> {
    let mut pool = Pool::start().await?;
    let api = pool.workloads();
    let placement = serde_json::json!({
        "strategy": { "type": "StaticWeights", "staticWeights": [
            { "dataCenter": "municipal-core", "weight": 1 },
            { "dataCenter": "edge-east", "weight": 1 } ] }
    });
    api.create(&PostParams::default(), &workload("cams", 4, placement, 60)?)
        .await?;
    // Kill the operator (SIGKILL) while it works on the new workload and
    // start another, several times at growing delays. A new process takes
    // a few hundred milliseconds to connect and fill its caches, and a
    // reconcile then takes tens of milliseconds on an idle machine, so the
    // kills land at different steps (starting, finalizer, decision
    // recorded, copies half applied, status).
    for delay_ms in [5, 20, 60, 150, 300, 450, 600, 800, 1200] {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        pool.kill_operator();
        pool.start_operator()?;
    }

    // (a) copies in the chosen members only, pods running, readiness back.
    pool.wait_copies("cams", &[("municipal-core", 2), ("edge-east", 2)])
        .await?;
    eventually("pods Running in both members", WAIT, || async {
        (pool.running_pods("municipal-core").await.ok()? == 2
            && pool.running_pods("edge-east").await.ok()? == 2)
            .then_some(())
    })
    .await?;
    // The member's scheduler placed them by what the pool accounted.
    let pods: Api<Pod> = Api::namespaced(pool.members["edge-east"].client().await?, "traffic");
    for pod in pods.list(&ListParams::default()).await?.items {
        let requests = pod
            .spec
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.resources)
            .and_then(|r| r.requests)
            .unwrap_or_default();
        let stated: BTreeMap<&str, &str> = requests
            .iter()
            .map(|(k, q)| (k.as_str(), q.0.as_str()))
            .collect();
        assert_eq!(stated, BTreeMap::from([("cpu", "1"), ("memory", "1Gi")]));
    }
    eventually("readiness aggregated in status", WAIT, || async {
        let status = api.get("cams").await.ok()?.status?;
        (status.ready_replicas == 4 && status.placed_replicas == 4).then_some(())
    })
    .await?;
    // No restarted operator placed it against a pool it had not loaded
    // yet: that reads as "no data center passes the hard rules".
    let events: Api<Event> = Api::namespaced(pool.client.clone(), "traffic");
    let refusals: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("cams")
                && e.type_.as_deref() == Some("Warning")
        })
        .map(|e| format!("{:?}: {:?}", e.reason, e.note))
        .collect();
    assert!(refusals.is_empty(), "warnings about cams: {refusals:?}");
    let (available, _, _) = pool
        .condition("cams", "Available")
        .await
        .context("Available")?;
    assert_eq!(available, "True");
    eventually("replicas per data center in the metrics", WAIT, || async {
        let text = pool.metrics().await?;
        (text.contains(r#"civicgrid_operator_replicas{data_center="edge-east"} 2"#)
            && text.contains("civicgrid_operator_scheduling_duration_seconds_count")
            && text.contains(r#"civicgrid_operator_reconciles_total{controller="workload"}"#))
        .then_some(())
    })
    .await?;
    let status = api.get("cams").await?.status.context("status")?;
    let partner = status
        .explanation
        .iter()
        .find(|e| e.data_center == "partner-cloud")
        .context("partner-cloud explained")?;
    assert_eq!(partner.rule, "StaticWeight");

    // (b) scale up and down.
    scale(&api, "cams", 6).await?;
    pool.wait_copies("cams", &[("municipal-core", 3), ("edge-east", 3)])
        .await?;
    scale(&api, "cams", 2).await?;
    pool.wait_copies("cams", &[("municipal-core", 1), ("edge-east", 1)])
        .await?;

    // A change of kind replaces each member's Deployment with a StatefulSet
    // of the same replicas; no Deployment is left behind.
    api.patch(
        "cams",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "kind": "StatefulSet" } })),
    )
    .await?;
    pool.wait_copies("cams", &[]).await?;
    eventually("StatefulSets in both members", WAIT, || async {
        let mut found = BTreeMap::new();
        for (dc, member) in &pool.members {
            let sets: Api<StatefulSet> = Api::namespaced(member.client().await.ok()?, "traffic");
            if let Some(set) = sets.get_opt("cams").await.ok()? {
                found.insert(dc.as_str(), set.spec?.replicas?);
            }
        }
        (found == BTreeMap::from([("edge-east", 1), ("municipal-core", 1)])).then_some(())
    })
    .await?;

    // (e) a spec the engine cannot use gets a condition and an Event.
    let mut bad = workload("bad-quantity", 1, serde_json::json!({}), 60)?;
    bad.spec.resources.cpu.0 = "lots".into();
    api.create(&PostParams::default(), &bad).await?;
    let (status, reason, message) = eventually("InvalidSpec condition", WAIT, || async {
        pool.condition("bad-quantity", "Scheduled").await
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("spec.resources.cpu"), "{message}");
    pool.wait_event("bad-quantity", "InvalidSpec").await?;
    assert!(pool.copies("bad-quantity").await?.is_empty());

    // A copy whose workload does not exist (left behind while its member
    // was away, say) goes at the member's next heartbeat, found through the
    // member's watches. What stays: the copies of live workloads; a copy
    // another data center sharing this member made (labelled for it); an
    // object whose labels name a third one (deleting what the labels name
    // would let whoever can label an object in the member have the
    // operator delete any other), and that third one.
    let edge = pool
        .members
        .get("edge-east")
        .context("edge")?
        .client()
        .await?;
    let deployment = |name: &str, labels: serde_json::Value| -> anyhow::Result<Deployment> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": name, "namespace": "traffic", "labels": labels },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { "app": name } },
                "template": {
                    "metadata": { "labels": { "app": name } },
                    "spec": { "containers": [{ "name": "c", "image": "c:1" }] }
                }
            }
        }))?)
    };
    let copy_labels = |owner: &str, dc: &str| {
        serde_json::json!({
            children::MANAGED_BY.0: children::MANAGED_BY.1,
            children::WORKLOAD_NAMESPACE: "traffic",
            children::WORKLOAD_NAME: owner,
            children::DATA_CENTER: dc,
        })
    };
    let edge_deployments: Api<Deployment> = Api::namespaced(edge, "traffic");
    for object in [
        deployment("bystander", serde_json::json!({ "app": "bystander" }))?,
        deployment("decoy", copy_labels("bystander", "edge-east"))?,
        deployment("elsewhere", copy_labels("elsewhere", "another-dc"))?,
        deployment("gone", copy_labels("gone", "edge-east"))?,
    ] {
        edge_deployments
            .create(&PostParams::default(), &object)
            .await?;
    }
    eventually("the orphaned copy removed", WAIT, || async {
        edge_deployments
            .get_opt("gone")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    for stays in ["bystander", "decoy", "elsewhere"] {
        assert!(
            edge_deployments.get_opt(stays).await?.is_some(),
            "{stays} went with the orphan"
        );
        edge_deployments
            .delete(stays, &DeleteParams::default())
            .await?;
    }
    assert!(
        Api::<StatefulSet>::namespaced(edge_deployments.into_client(), "traffic")
            .get_opt("cams")
            .await?
            .is_some(),
        "a live workload's copy went with the orphan"
    );

    // (g) delete: nothing left in any member, and the finalizer lets go.
    // Deleted while no operator runs: the next one to start cleans up.
    pool.kill_operator();
    api.delete("cams", &DeleteParams::default()).await?;
    pool.start_operator()?;
    pool.wait_copies("cams", &[]).await?;
    eventually("workload gone", WAIT, || async {
        api.get_opt("cams").await.ok()?.is_none().then_some(())
    })
    .await?;
    let managed = ListParams::default().labels(&children::managed_selector());
    for (dc, member) in &pool.members {
        let client = member.client().await?;
        let left = [
            (
                "Deployments",
                Api::<Deployment>::all(client.clone())
                    .list_metadata(&managed)
                    .await?
                    .items
                    .len(),
            ),
            (
                "StatefulSets",
                Api::<StatefulSet>::all(client)
                    .list_metadata(&managed)
                    .await?
                    .items
                    .len(),
            ),
        ];
        for (kind, count) in left {
            assert_eq!(count, 0, "{dc} still has {count} {kind}");
        }
    }
    pool.kill_operator();
    drop(pool.control);
    Ok(())
}

/// An HorizontalPodAutoscaler in a member sets its copy's replicas: the
/// operator leaves them to it instead of forcing its own count back (the
/// two would fight, scaling the copy up and down).
#[tokio::test]
async fn an_autoscaler_in_the_member_keeps_the_replicas_it_sets() -> anyhow::Result<()> {
    let pool = Pool::start_running(&MEMBERS[1..2], &[]).await?;
    let api = pool.workloads();
    api.create(
        &PostParams::default(),
        &workload("scaled", 2, serde_json::json!({}), 60)?,
    )
    .await?;
    pool.wait_copies("scaled", &[("edge-east", 2)]).await?;
    // The member's own controller manager scales the copy to the
    // autoscaler's minimum (no metrics needed for that).
    let member = pool.members["edge-east"].client().await?;
    let autoscalers: Api<HorizontalPodAutoscaler> = Api::namespaced(member, "traffic");
    autoscalers
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "scaled" },
                "spec": {
                    "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled" },
                    "minReplicas": 3, "maxReplicas": 3,
                    "metrics": [{ "type": "Resource", "resource": { "name": "cpu",
                        "target": { "type": "Utilization", "averageUtilization": 80 } } }]
                }
            }))?,
        )
        .await?;
    pool.wait_copies("scaled", &[("edge-east", 3)]).await?;
    // The operator saw the copy change (its generation moved) and applied
    // again: the count stays the autoscaler's.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            pool.copies("scaled").await?,
            BTreeMap::from([("edge-east".to_owned(), 3)]),
            "the operator took the replicas back from the autoscaler"
        );
    }
    Ok(())
}

/// Each member gets the copy its data center needs: the overrides that
/// match it, and what the pods need goes with them: the ConfigMap, Service and
/// ServiceAccount it names are copied into its member, follow changes made
/// in the control cluster, and go when its copy goes; a StatefulSet gets
/// the headless Service its `serviceName` promises; a missing dependency
/// is reported naming its entry.
#[tokio::test]
async fn overrides_and_dependencies_shape_each_members_copy() -> anyhow::Result<()> {
    let pool = Pool::start_running(&MEMBERS[1..2], &[]).await?;
    let api = pool.workloads();
    let config_maps: Api<ConfigMap> = Api::namespaced(pool.client.clone(), "traffic");
    let services: Api<Service> = Api::namespaced(pool.client.clone(), "traffic");
    let accounts: Api<ServiceAccount> = Api::namespaced(pool.client.clone(), "traffic");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "detector-config", "labels": { "app": "detector" } },
                "data": { "threshold": "0.8" }
            }))?,
        )
        .await?;
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "detector" },
                "spec": { "selector": { "app": "detector" }, "ports": [{ "port": 80 }] }
            }))?,
        )
        .await?;
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({ "metadata": { "name": "detector" } }))?,
        )
        .await?;
    let needs = serde_json::json!([
        { "kind": "ConfigMap", "name": "detector-config" },
        { "kind": "Service", "name": "detector" },
        { "kind": "ServiceAccount", "name": "detector" }
    ]);
    let mut detector = workload("detector", 1, serde_json::json!({}), 60)?;
    detector.spec.dependencies = serde_json::from_value(needs)?;
    // The edge pulls from its own mirror and learns where it runs; an
    // override for another tier changes nothing here.
    detector.spec.overrides = serde_json::from_value(serde_json::json!([
        { "tiers": ["edge"], "imageRegistry": "mirror.edge-east.example:5000",
          "env": [{ "name": "SITE", "value": "edge-east" }] },
        { "tiers": ["partner"], "env": [{ "name": "SITE", "value": "partner" }] }
    ]))?;
    api.create(&PostParams::default(), &detector).await?;
    pool.wait_copies("detector", &[("edge-east", 1)]).await?;

    let member = pool.members["edge-east"].client().await?;
    let member_maps: Api<ConfigMap> = Api::namespaced(member.clone(), "traffic");
    let member_services: Api<Service> = Api::namespaced(member.clone(), "traffic");
    let member_accounts: Api<ServiceAccount> = Api::namespaced(member.clone(), "traffic");
    let deployment = Api::<Deployment>::namespaced(member.clone(), "traffic")
        .get("detector")
        .await?;
    let container = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].clone())
        .context("the copy's container")?;
    assert_eq!(
        container.image.as_deref(),
        Some("mirror.edge-east.example:5000/detector:2.4")
    );
    let env: Vec<(String, Option<String>)> = container
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    assert_eq!(env, vec![("SITE".to_owned(), Some("edge-east".to_owned()))]);
    let owner = deployment.metadata.uid.context("the copy's uid")?;
    let owned = |meta: &kube::core::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == owner && o.kind == "Deployment")
    };
    let copied = eventually("dependencies in the member", WAIT, || async {
        let map = member_maps.get_opt("detector-config").await.ok()??;
        let service = member_services.get_opt("detector").await.ok()??;
        let account = member_accounts.get_opt("detector").await.ok()??;
        Some((map, service, account))
    })
    .await?;
    let (map, service, account) = copied;
    assert_eq!(
        map.data
            .clone()
            .unwrap_or_default()
            .get("threshold")
            .map(String::as_str),
        Some("0.8")
    );
    assert!(owned(&map.metadata) && owned(&service.metadata) && owned(&account.metadata));
    // The member allocated the Service's address itself.
    let spec = service.spec.context("service spec")?;
    assert!(spec.cluster_ip.is_some_and(|ip| ip != "None"));
    assert_eq!(spec.ports.context("ports")?[0].port, 80);

    // A change in the control cluster follows, through the watch.
    config_maps
        .patch(
            "detector-config",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "data": { "threshold": "0.9" } })),
        )
        .await?;
    eventually("the changed ConfigMap in the member", WAIT, || async {
        let map = member_maps.get_opt("detector-config").await.ok()??;
        (map.data?.get("threshold")? == "0.9").then_some(())
    })
    .await?;

    // A StatefulSet gets the headless Service it names.
    let mut ledger = workload("ledger", 1, serde_json::json!({}), 60)?;
    ledger.spec.kind = civicgrid_operator::crd::WorkloadKind::StatefulSet;
    api.create(&PostParams::default(), &ledger).await?;
    let headless = eventually("the headless Service in the member", WAIT, || async {
        member_services.get_opt("ledger").await.ok()?
    })
    .await?;
    assert_eq!(
        headless.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );

    // A dependency that does not exist is reported, naming its entry.
    let mut broken = workload("broken", 1, serde_json::json!({}), 60)?;
    broken.spec.dependencies = serde_json::from_value(serde_json::json!([
        { "kind": "ConfigMap", "name": "nowhere" }
    ]))?;
    api.create(&PostParams::default(), &broken).await?;
    let (status, _, message) = eventually("broken Propagated=False", WAIT, || async {
        let found = pool.condition("broken", "Propagated").await?;
        (found.0 == "False" && found.2.contains("spec.dependencies[0]")).then_some(found)
    })
    .await?;
    assert_eq!(status, "False");
    assert!(
        message.contains("`nowhere`") && message.contains("not found"),
        "{message}"
    );

    // The workload goes: its copy, and with it (the member's garbage
    // collector) the dependencies only it needed.
    api.delete("detector", &DeleteParams::default()).await?;
    eventually("dependencies gone from the member", WAIT, || async {
        (member_maps.get_opt("detector-config").await.ok()?.is_none()
            && member_accounts.get_opt("detector").await.ok()?.is_none())
        .then_some(())
    })
    .await?;
    Ok(())
}

/// A NoExecute taint on a data center moves the replicas that do not
/// tolerate it away, at the pace of `maxEvictionsPerMinute`, and takes no
/// new ones; Events and status say why.
#[tokio::test]
async fn a_no_execute_taint_moves_replicas_away_at_the_eviction_pace() -> anyhow::Result<()> {
    let pool = Pool::start().await?;
    let api = pool.workloads();
    let placement = edge_first();
    let mut plates = workload("plates", 2, placement, 60)?;
    plates.spec.failover.max_evictions_per_minute = Some(1);
    api.create(&PostParams::default(), &plates).await?;
    pool.wait_copies("plates", &[("edge-east", 2)]).await?;
    let data_centers: Api<DataCenter> = Api::all(pool.client.clone());
    data_centers
        .patch(
            "edge-east",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "taints": [
                { "key": "flooding", "effect": "NoExecute" }
            ] } })),
        )
        .await?;
    // One replica moves now (the budget), the other waits, still on the edge.
    pool.wait_copies("plates", &[("edge-east", 1), ("partner-cloud", 1)])
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pool.copies("plates").await?,
        BTreeMap::from([("edge-east".to_owned(), 1), ("partner-cloud".to_owned(), 1)]),
        "moved past the eviction budget"
    );
    pool.wait_event("plates", "EvictionsDeferred").await?;
    let status = data_centers
        .get("edge-east")
        .await?
        .status
        .context("edge-east status")?;
    assert!(status.no_execute_since.contains_key("flooding"));
    Ok(())
}

/// Deleting a member's kubeconfig Secret takes the operator's access to it
/// away at once, not only once enough probes have failed to call the data
/// center unreachable: a change made meanwhile (here, with a failure
/// threshold that never calls it unreachable) is not applied there with the
/// old credentials the operator kept.
#[tokio::test]
async fn a_deleted_kubeconfig_secret_stops_the_operator_using_the_member() -> anyhow::Result<()> {
    let pool = Pool::start_running(
        &MEMBERS,
        &[
            "--member-secret-reread-seconds=1",
            "--member-failure-threshold=1000",
        ],
    )
    .await?;
    let api = pool.workloads();
    api.create(
        &PostParams::default(),
        &workload("plates", 2, edge_first(), 60)?,
    )
    .await?;
    pool.wait_copies("plates", &[("edge-east", 2)]).await?;
    let data_centers: Api<DataCenter> = Api::all(pool.client.clone());
    let reference = data_centers
        .get("edge-east")
        .await?
        .spec
        .kubeconfig_secret_ref
        .context("edge-east names its kubeconfig Secret")?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(pool.client.clone(), &reference.namespace);
    secrets
        .delete(&reference.name, &DeleteParams::default())
        .await?;
    let missing = format!(
        "Secret {}/{} not found",
        reference.namespace, reference.name
    );
    eventually("edge-east's probe missing its Secret", WAIT, || async {
        let dc = data_centers.get("edge-east").await.ok()?;
        dc.status?
            .conditions
            .iter()
            .any(|c| {
                c.type_ == "Reachable" && c.reason == "MissedProbes" && c.message.contains(&missing)
            })
            .then_some(())
    })
    .await?;
    scale(&api, "plates", 3).await?;
    pool.wait_event("plates", "PropagationFailed").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pool.copies("plates").await?,
        BTreeMap::from([("edge-east".to_owned(), 2)]),
        "the operator changed a member whose kubeconfig Secret is gone"
    );
    Ok(())
}

/// Losing a data center that runs many workloads moves no more replicas a
/// minute than the pool-wide limit, although no workload has a limit of
/// its own; the ones held back say so.
#[tokio::test]
async fn a_lost_data_center_moves_no_more_than_the_pool_wide_limit() -> anyhow::Result<()> {
    let mut pool = Pool::start_running(&MEMBERS, &["--max-evictions-per-minute=2"]).await?;
    let api = pool.workloads();
    let placement = edge_first();
    let names = ["plates-a", "plates-b", "plates-c"];
    for name in names {
        api.create(
            &PostParams::default(),
            &workload(name, 1, placement.clone(), 2)?,
        )
        .await?;
    }
    for name in names {
        pool.wait_copies(name, &[("edge-east", 1)]).await?;
    }
    pool.members
        .get_mut("edge-east")
        .context("edge")?
        .stop_apiserver();
    // Two of the three move once the grace period is over...
    let moved = |names: [&'static str; 3]| {
        let pool = &pool;
        async move {
            let mut moved = Vec::new();
            for name in names {
                if pool.copies_in("partner-cloud", name).await?.is_some() {
                    moved.push(name);
                }
            }
            anyhow::Ok(moved)
        }
    };
    eventually("two workloads moved to the partner", WAIT, || async {
        (moved(names).await.ok()?.len() == 2).then_some(())
    })
    .await?;
    // ... and the third stays, placed on the edge, for the rest of the
    // minute, saying why.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now_moved = moved(names).await?;
    assert_eq!(now_moved.len(), 2, "moved: {now_moved:?}");
    let held = names
        .into_iter()
        .find(|n| !now_moved.contains(n))
        .context("the one held back")?;
    let status = api.get(held).await?.status.context("status")?;
    assert_eq!(
        status
            .placement
            .iter()
            .map(|p| p.data_center.as_str())
            .collect::<Vec<_>>(),
        vec!["edge-east"]
    );
    pool.wait_event(held, "EvictionsDeferred").await?;
    let events: Api<Event> = Api::namespaced(pool.client.clone(), "traffic");
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("EvictionsDeferred")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(held)
        })
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("the pool-wide limit of 2 per minute")),
        "{notes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn replicas_move_after_the_grace_period_and_the_returning_member_is_cleaned()
-> anyhow::Result<()> {
    let mut pool = Pool::start().await?;
    let api = pool.workloads();
    let placement = edge_first();
    // One replica may move per minute.
    let mut plates = workload("plates", 2, placement, 8)?;
    plates.spec.failover.max_evictions_per_minute = Some(1);
    api.create(&PostParams::default(), &plates).await?;
    pool.wait_copies("plates", &[("edge-east", 2)]).await?;

    // The edge member stops answering.
    pool.members
        .get_mut("edge-east")
        .context("edge")?
        .stop_apiserver();
    let data_centers: Api<DataCenter> = Api::all(pool.client.clone());
    // Missed probes are a heartbeat (500 ms here) apart, however often the
    // status they write changes: the third comes at least two heartbeats
    // after the first.
    let first_missed = eventually("a first missed probe", WAIT, || async {
        let status = data_centers.get("edge-east").await.ok()?.status?;
        (status.failed_probes >= 1).then(std::time::Instant::now)
    })
    .await?;
    let lost = eventually("edge-east Reachable=False", WAIT, || async {
        let status = data_centers.get("edge-east").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Reachable" && c.status == "False")
            .then_some(status)
    })
    .await?;
    // Not on the first missed probe: on the third in a row (the default
    // failure threshold).
    assert!(
        lost.failed_probes >= 3,
        "unreachable after {} missed probes",
        lost.failed_probes
    );
    assert!(
        first_missed.elapsed() >= Duration::from_millis(700),
        "three missed probes within {:?}",
        first_missed.elapsed()
    );
    // Within the grace period nothing moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pool.copies_in("partner-cloud", "plates").await?.is_none(),
        "replicas moved before the grace period ended"
    );
    let status = api.get("plates").await?.status.context("status")?;
    assert_eq!(status.placement.len(), 1);
    assert_eq!(status.placement[0].data_center, "edge-east");

    // After it, one moves to the partner and the other waits for the
    // eviction budget, still placed on the edge.
    eventually("one replica on the partner", WAIT, || async {
        (pool.copies_in("partner-cloud", "plates").await.ok()?? == 1).then_some(())
    })
    .await?;
    let moved_at = std::time::Instant::now();
    let status = api.get("plates").await?.status.context("status")?;
    let placed: BTreeMap<&str, i32> = status
        .placement
        .iter()
        .map(|p| (p.data_center.as_str(), p.replicas))
        .collect();
    assert_eq!(
        placed,
        BTreeMap::from([("edge-east", 1), ("partner-cloud", 1)])
    );
    assert_eq!(
        status.evictions.iter().map(|e| e.replicas).sum::<i32>(),
        1,
        "{:?}",
        status.evictions
    );
    pool.wait_event("plates", "EvictionsDeferred").await?;
    // The second follows when the first leaves the one-minute window.
    eventually("both replicas on the partner", 2 * WAIT, || async {
        (pool.copies_in("partner-cloud", "plates").await.ok()?? == 2).then_some(())
    })
    .await?;
    assert!(
        moved_at.elapsed() >= Duration::from_secs(50),
        "the second replica moved {:?} after the first",
        moved_at.elapsed()
    );
    eventually("status placement on the partner", WAIT, || async {
        let s = api.get("plates").await.ok()?.status?;
        (s.placement.len() == 1 && s.placement[0].data_center == "partner-cloud").then_some(())
    })
    .await?;

    // The edge comes back: its stale copy goes, nothing is duplicated.
    pool.members
        .get_mut("edge-east")
        .context("edge")?
        .start_apiserver()
        .await?;
    pool.wait_copies("plates", &[("partner-cloud", 2)]).await?;

    // Make before break: with maxUnavailable 0, a move to the edge whose new
    // pods can never be scheduled (no node matches) keeps the partner's
    // ready copy.
    eventually("both partner replicas ready", WAIT, || async {
        (api.get("plates").await.ok()?.status?.ready_replicas == 2).then_some(())
    })
    .await?;
    api.patch(
        "plates",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": {
            "placement": { "requiredTiers": ["edge"] },
            "failover": { "maxUnavailable": 0 },
            "template": { "spec": { "nodeSelector": { "civicgrid.io/no-such-node": "true" } } }
        } })),
    )
    .await?;
    pool.wait_copies("plates", &[("edge-east", 2), ("partner-cloud", 2)])
        .await?;
    let (propagated, reason, message) = eventually("WaitingForReplacements", WAIT, || async {
        pool.condition("plates", "Propagated")
            .await
            .filter(|(_, reason, _)| reason == "WaitingForReplacements")
    })
    .await?;
    assert_eq!(propagated, "False");
    assert!(message.contains("partner-cloud"), "{reason}: {message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pool.copies_in("partner-cloud", "plates").await?,
        Some(2),
        "the partner's copy went before its replacements were ready"
    );
    // Allowing both to be unavailable lets the old copy go.
    api.patch(
        "plates",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "failover": { "maxUnavailable": 2 } } })),
    )
    .await?;
    pool.wait_copies("plates", &[("edge-east", 2)]).await?;
    pool.kill_operator();
    Ok(())
}

impl Pool {
    async fn copies_in(&self, dc: &str, name: &str) -> anyhow::Result<Option<i32>> {
        let deployments: Api<Deployment> =
            Api::namespaced(self.members[dc].client().await?, "traffic");
        Ok(deployments
            .get_opt(name)
            .await?
            .map(|d| d.spec.and_then(|s| s.replicas).unwrap_or(0)))
    }
}

#[tokio::test]
async fn only_the_leader_acts_and_a_follower_takes_over_when_it_dies() -> anyhow::Result<()> {
    let pool = Pool::start_with(&MEMBERS[1..2]).await?;
    let lease = Some(Duration::from_secs(3));
    let mut replicas = BTreeMap::from([
        ("operator-a", pool.spawn_operator("operator-a", lease)?),
        ("operator-b", pool.spawn_operator("operator-b", lease)?),
    ]);
    let leases: Api<Lease> = Api::namespaced(pool.client.clone(), "civicgrid-system");
    let holder = || async {
        leases
            .get_opt("civicgrid-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    };
    let leader = eventually("a leader", WAIT, holder).await?;
    let follower = if leader == "operator-a" {
        "operator-b"
    } else {
        "operator-a"
    };
    pool.wait_ready().await?;

    let api = pool.workloads();
    api.create(
        &PostParams::default(),
        &workload("radar", 2, serde_json::json!({}), 60)?,
    )
    .await?;
    pool.wait_copies("radar", &[("edge-east", 2)]).await?;
    // Every Event so far was reported by the leader.
    let events: Api<Event> = Api::namespaced(pool.client.clone(), "traffic");
    let placed = eventually("a Placed event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?.items;
        list.iter()
            .any(|e| e.reason.as_deref() == Some("Placed"))
            .then_some(list)
    })
    .await?;
    let reported: Vec<String> = placed
        .into_iter()
        .filter_map(|e| e.reporting_instance)
        .collect();
    assert!(
        !reported.is_empty() && reported.iter().all(|r| *r == leader),
        "events from {reported:?}, leader {leader}"
    );

    let waiting = replicas
        .get(follower)
        .context("follower process")?
        .metrics()
        .await?;
    assert!(
        waiting.contains("civicgrid_operator_leader 0"),
        "the follower's metrics show it leading:\n{waiting}"
    );

    // The leader is SIGKILLed, so it cannot release the lease; the follower
    // takes over once it expires, and acts.
    let died = std::time::Instant::now();
    replicas
        .get_mut(leader.as_str())
        .context("leader process")?
        .kill();
    eventually("the follower holds the lease", WAIT, || async {
        (holder().await? == follower).then_some(())
    })
    .await?;
    let takeover = died.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    scale(&api, "radar", 3).await?;
    pool.wait_copies("radar", &[("edge-east", 3)]).await?;
    let survivor = replicas.get_mut(follower).context("follower process")?;
    survivor.check_running()?;
    assert_eq!(survivor.instance(), follower);
    let leading = survivor.metrics().await?;
    assert!(
        leading.contains("civicgrid_operator_leader 1"),
        "the follower's metrics do not show it leading:\n{leading}"
    );
    Ok(())
}

/// A workload with `replicas` of `cpu_millis` each, allowed on `data_center`
/// only, at `priority` (which may preempt lower ones when `preempts`).
fn sized_workload(
    name: &str,
    replicas: i32,
    cpu_millis: i64,
    data_center: &str,
    priority: i32,
    preempts: bool,
) -> anyhow::Result<ComputeWorkload> {
    let placement = serde_json::json!({
        "strategy": { "type": "StaticWeights", "staticWeights": [
            { "dataCenter": data_center, "weight": 1 } ] }
    });
    let mut cw = workload(name, replicas, placement, 60)?;
    cw.spec.resources.cpu.0 = format!("{cpu_millis}m");
    cw.spec.priority = priority;
    if preempts {
        cw.spec.preemption_policy = civicgrid_operator::crd::PreemptionPolicy::PreemptLowerPriority;
    }
    Ok(cw)
}

/// CPU in millicores from a quantity such as `16`, `15500m` or `1.5`.
fn millicores(quantity: &str) -> anyhow::Result<i64> {
    if let Some(millis) = quantity.strip_suffix('m') {
        return Ok(millis.parse()?);
    }
    let cores: f64 = quantity.parse()?;
    #[allow(clippy::cast_possible_truncation)]
    Ok((cores * 1000.0).round() as i64)
}

#[tokio::test]
async fn a_workload_preempted_out_of_a_member_leaves_no_copy_there() -> anyhow::Result<()> {
    let pool = Pool::start_running(&MEMBERS[1..2], &[]).await?;
    let api = pool.workloads();
    let data_centers: Api<DataCenter> = Api::all(pool.client.clone());
    let allocatable = data_centers
        .get("edge-east")
        .await?
        .status
        .and_then(|s| s.allocatable)
        .context("edge-east's allocatable capacity")?;
    let capacity = millicores(&allocatable.cpu.0)?;
    // Two low-priority replicas take three quarters of the edge; the
    // high-priority one needs three quarters too, so both must go.
    let low = 3 * capacity / 8;
    let high = 3 * capacity / 4;
    assert!(high > capacity - low, "one eviction must not be enough");
    api.create(
        &PostParams::default(),
        &sized_workload("batch", 2, low, "edge-east", 0, false)?,
    )
    .await?;
    pool.wait_copies("batch", &[("edge-east", 2)]).await?;
    // Let the low-priority workload's reconciles settle, so that it has
    // looked in every member and recorded the edge as its own placement.
    eventually("batch Scheduled", WAIT, || async {
        let (status, _, _) = pool.condition("batch", "Scheduled").await?;
        (status == "True").then_some(())
    })
    .await?;

    api.create(
        &PostParams::default(),
        &sized_workload("emergency", 1, high, "edge-east", 100, true)?,
    )
    .await?;
    pool.wait_copies("emergency", &[("edge-east", 1)]).await?;
    // The victim's placement changed in the preemptor's reconcile, not its
    // own: its copy must still be removed from the member it lost.
    pool.wait_copies("batch", &[]).await?;
    // Both sides say what happened: the victim's status and an Event on
    // each workload.
    pool.wait_event("batch", "Preempted").await?;
    pool.wait_event("emergency", "Preempting").await?;
    let status = eventually("batch's status records the preemption", WAIT, || async {
        let status = api.get("batch").await.ok()?.status?;
        (!status.preempted_by.is_empty()).then_some(status)
    })
    .await?;
    assert!(
        status.placement.iter().all(|p| p.replicas == 0),
        "batch still placed: {:?}",
        status.placement
    );
    let lost: Vec<(&str, &str, i32)> = status
        .preempted_by
        .iter()
        .map(|p| (p.preemptor.as_str(), p.data_center.as_str(), p.replicas))
        .collect();
    assert_eq!(lost, vec![("traffic/emergency", "edge-east", 2)]);
    Ok(())
}

/// Three data centers over two member clusters (dc-000 and dc-002 share
/// member-0): each reports its cluster's identity, the UID of the member's
/// kube-system namespace, and a Duplicated workload gets one copy per
/// member cluster. Its copies in dc-000 and dc-002 would be one Deployment
/// under one name, which two placements would fight over; dc-002 is
/// explained by the cluster it shares instead.
#[tokio::test]
async fn data_centers_sharing_a_member_cluster_hold_one_copy_of_a_workload() -> anyhow::Result<()> {
    let shape = civicgrid_tests::controlplane::NodeShape {
        cpu: "8".into(),
        memory: "32Gi".into(),
        ..Default::default()
    };
    let shared = pool::SharedPool::start(3, 2, 2, &shape, &["traffic"]).await?;
    let _operator = OperatorProcess::start(&shared.control, &OperatorOptions::e2e("shared"))?;
    shared.wait_ready().await?;

    let mut uids = Vec::new();
    for cluster in &shared.clusters {
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
            Api::all(cluster.client().await?);
        uids.push(namespaces.get("kube-system").await?.metadata.uid);
    }
    let data_centers: Api<DataCenter> = Api::all(shared.client.clone());
    let identified = eventually("every data center's cluster identified", WAIT, || async {
        let mut ids = Vec::new();
        for name in ["dc-000", "dc-001", "dc-002"] {
            ids.push(data_centers.get(name).await.ok()?.status?.cluster_id?);
        }
        Some(ids)
    })
    .await?;
    assert_eq!(
        identified.into_iter().map(Some).collect::<Vec<_>>(),
        vec![uids[0].clone(), uids[1].clone(), uids[0].clone()]
    );

    let api: Api<ComputeWorkload> = Api::namespaced(shared.client.clone(), "traffic");
    api.create(
        &PostParams::default(),
        &workload(
            "plates",
            2,
            serde_json::json!({ "strategy": { "type": "Duplicated" } }),
            60,
        )?,
    )
    .await?;
    let status = eventually("plates Scheduled", WAIT, || async {
        let status = api.get("plates").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Scheduled" && c.status == "True")
            .then_some(status)
    })
    .await?;
    let placed: BTreeMap<&str, i32> = status
        .placement
        .iter()
        .map(|p| (p.data_center.as_str(), p.replicas))
        .collect();
    assert_eq!(placed, BTreeMap::from([("dc-000", 2), ("dc-001", 2)]));
    assert_eq!(
        status.rejected_by_rule,
        BTreeMap::from([("SharedCluster".to_owned(), 1)])
    );
    let why = status
        .explanation
        .iter()
        .find(|e| e.data_center == "dc-002")
        .context("dc-002 explained")?;
    assert_eq!(why.rule, "SharedCluster");
    assert!(why.message.contains("dc-000"), "{}", why.message);

    // One copy in member-0, labelled with the data center that holds it.
    for (cluster, data_center) in [(0, "dc-000"), (1, "dc-001")] {
        let deployments: Api<Deployment> =
            Api::namespaced(shared.clusters[cluster].client().await?, "traffic");
        let copy = eventually(&format!("the copy in member-{cluster}"), WAIT, || async {
            deployments.get_opt("plates").await.ok()?
        })
        .await?;
        assert_eq!(
            copy.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(children::DATA_CENTER))
                .map(String::as_str),
            Some(data_center)
        );
        assert_eq!(copy.spec.and_then(|s| s.replicas), Some(2));
    }

    // Draining dc-000 moves the workload to dc-002, its sibling: the same
    // Deployment, relabelled, never deleted as dc-000's stale copy.
    let in_member_0: Api<Deployment> =
        Api::namespaced(shared.clusters[0].client().await?, "traffic");
    let uid = in_member_0.get("plates").await?.metadata.uid;
    data_centers
        .patch(
            "dc-000",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": { "taints": [{ "key": "drain", "effect": "NoExecute" }] }
            })),
        )
        .await?;
    eventually("plates in dc-001 and dc-002", WAIT, || async {
        let status = api.get("plates").await.ok()?.status?;
        let placed: BTreeMap<String, i32> = status
            .placement
            .iter()
            .map(|p| (p.data_center.clone(), p.replicas))
            .collect();
        (placed == BTreeMap::from([("dc-001".to_owned(), 2), ("dc-002".to_owned(), 2)]))
            .then_some(())
    })
    .await?;
    for _ in 0..10 {
        let copy = in_member_0.get("plates").await?;
        assert_eq!(
            copy.metadata.uid, uid,
            "member-0's copy was deleted and made again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let copy = in_member_0.get("plates").await?;
    assert_eq!(
        copy.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(children::DATA_CENTER))
            .map(String::as_str),
        Some("dc-002")
    );
    Ok(())
}
