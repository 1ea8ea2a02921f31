//! The control-plane harness itself: real clusters start, serve, run pods on
//! simulated nodes, survive an API server restart, and leave nothing behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use civicgrid_tests::controlplane::{
    Cluster, NodeShape, eventually, start_clusters, sweep_orphaned_clusters_under,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

const WAIT: Duration = Duration::from_secs(90);

fn widget_crd() -> anyhow::Result<CustomResourceDefinition> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "widgets.smoke.civicgrid.io" },
        "spec": {
            "group": "smoke.civicgrid.io",
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": { "type": "object",
                        "properties": { "size": { "type": "integer", "minimum": 0 } } } }
                } }
            }]
        }
    }))?)
}

fn widgets(client: kube::Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("smoke.civicgrid.io", "v1", "Widget"),
        "widgets",
    );
    Api::namespaced_with(client, "default", &resource)
}

#[tokio::test]
async fn crd_installed_in_one_cluster_is_served_there_only() -> anyhow::Result<()> {
    let clusters = start_clusters(&["alpha", "beta"]).await?;
    let (alpha, beta) = (clusters[0].client().await?, clusters[1].client().await?);

    let crds: Api<CustomResourceDefinition> = Api::all(alpha.clone());
    crds.create(&PostParams::default(), &widget_crd()?).await?;
    let widget: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "smoke.civicgrid.io/v1", "kind": "Widget",
        "metadata": { "name": "w1" }, "spec": { "size": 3 }
    }))?;
    // The CRD is served once it is Established; creating before that fails.
    let alpha_widgets = widgets(alpha);
    eventually("widget created in alpha", WAIT, || async {
        alpha_widgets
            .create(&PostParams::default(), &widget)
            .await
            .ok()
    })
    .await?;
    let stored = alpha_widgets.get("w1").await?;
    assert_eq!(stored.data["spec"]["size"], 3);

    // The schema is enforced by the real API server.
    let invalid: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "smoke.civicgrid.io/v1", "kind": "Widget",
        "metadata": { "name": "w2" }, "spec": { "size": -1 }
    }))?;
    let rejected = alpha_widgets.create(&PostParams::default(), &invalid).await;
    assert!(
        matches!(&rejected, Err(kube::Error::Api(status)) if status.code == 422),
        "{rejected:?}"
    );

    let in_beta = widgets(beta).list(&ListParams::default()).await;
    assert!(
        matches!(&in_beta, Err(kube::Error::Api(status)) if status.code == 404),
        "beta must not serve alpha's CRD: {in_beta:?}"
    );
    Ok(())
}

#[tokio::test]
async fn deployment_pods_reach_running_on_kwok_nodes() -> anyhow::Result<()> {
    let cluster = Cluster::start("pods").await?;
    cluster.add_nodes("node", 2, &NodeShape::default()).await?;
    let client = cluster.client().await?;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1",
                    "resources": { "requests": { "cpu": "100m", "memory": "64Mi" } } }] }
            }
        }
    }))?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment)
        .await?;

    let pods: Api<Pod> = Api::namespaced(client, "default");
    let running = eventually("3 web pods Running", WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        (running.len() == 3).then_some(running)
    })
    .await?;
    for pod in &running {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        assert!(
            node.as_deref().is_some_and(|n| n.starts_with("node-")),
            "pod bound to a kwok node: {node:?}"
        );
    }
    let ready = eventually("deployment reports 3 ready replicas", WAIT, || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.ready_replicas == Some(3)).then_some(())
    })
    .await;
    ready.context("readiness flows back into the Deployment status")?;
    Ok(())
}

#[tokio::test]
async fn client_fails_while_apiserver_is_down_and_recovers_after_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start("restart").await?;
    let client = cluster.client().await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let marker: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "marker" }, "data": { "kept": "yes" }
    }))?;
    config_maps.create(&PostParams::default(), &marker).await?;

    cluster.stop_apiserver();
    let namespaces: Api<Namespace> = Api::all(client);
    let down = namespaces.list(&ListParams::default()).await;
    assert!(
        matches!(
            down,
            Err(kube::Error::HyperError(_) | kube::Error::Service(_))
        ),
        "requests fail while the API server is down: {down:?}"
    );

    cluster.start_apiserver().await?;
    let fresh = cluster.client().await?;
    let listed = Api::<Namespace>::all(fresh.clone())
        .list(&ListParams::default())
        .await?;
    ensure!(
        listed
            .items
            .iter()
            .any(|ns| ns.metadata.name.as_deref() == Some("default")),
        "default namespace served after restart"
    );
    let kept = Api::<ConfigMap>::namespaced(fresh, "default")
        .get("marker")
        .await?;
    assert_eq!(
        kept.data
            .unwrap_or_default()
            .get("kept")
            .map(String::as_str),
        Some("yes"),
        "data in etcd survives the API server restart"
    );
    Ok(())
}

/// What a child test process reports about the cluster it started.
const REPORT_ENV: &str = "CIVICGRID_HARNESS_REPORT";
/// When set, the child waits (for its parent to kill it) instead of panicking.
const HANG_ENV: &str = "CIVICGRID_HARNESS_HANG";

/// Not a test on its own: the child half of the leak tests below, run by them
/// in a separate process. It starts a cluster, reports its pids and data
/// directory, then panics (or hangs until killed, like a timed-out test).
#[tokio::test]
#[ignore = "run as a child process by the leak tests"]
async fn child_starts_cluster_then_fails() {
    let Some(report) = std::env::var_os(REPORT_ENV) else {
        return;
    };
    let cluster = Cluster::start("doomed").await.expect("cluster starts");
    let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
    let text = format!("{}\n{}\n", cluster.data_dir().display(), pids.join(" "));
    std::fs::write(PathBuf::from(&report).with_extension("tmp"), text).expect("write report");
    std::fs::rename(PathBuf::from(&report).with_extension("tmp"), &report).expect("publish report");
    if std::env::var_os(HANG_ENV).is_some() {
        std::future::pending::<()>().await;
    }
    panic!("deliberate failure with a running cluster");
}

struct ChildReport {
    data_dir: PathBuf,
    pids: Vec<u32>,
}

fn read_report(path: &Path) -> anyhow::Result<ChildReport> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines();
    let data_dir = PathBuf::from(lines.next().context("data dir line")?);
    let pids = lines
        .next()
        .context("pid line")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()?;
    ensure!(pids.len() == 5, "five control-plane processes: {pids:?}");
    Ok(ChildReport { data_dir, pids })
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not reaped it yet.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn child_command(report: &Path) -> anyhow::Result<std::process::Command> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args([
            "--exact",
            "controlplane_smoke::child_starts_cluster_then_fails",
            "--ignored",
            "--nocapture",
        ])
        .env(REPORT_ENV, report)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Ok(command)
}

#[tokio::test]
async fn panicking_test_leaves_no_process_or_data_behind() -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("civicgrid-leak-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let report_path = scratch.join("panic.report");
    let status = child_command(&report_path)?.status()?;
    ensure!(!status.success(), "the child test must fail");
    let report = read_report(&report_path)?;
    for pid in &report.pids {
        ensure!(!alive(*pid), "process {pid} outlived the failed test");
    }
    ensure!(
        !report.data_dir.exists(),
        "data dir {} removed",
        report.data_dir.display()
    );
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

#[tokio::test]
async fn killed_test_leaves_no_process_and_its_data_is_swept() -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("civicgrid-kill-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let report_path = scratch.join("kill.report");
    // The child keeps its clusters under its own temporary directory: every
    // cluster start in this test binary sweeps the shared harness root, and
    // one of them could otherwise remove the killed child's data before this
    // test sees that no destructor ran.
    let child_temp = scratch.join("tmp");
    std::fs::create_dir_all(&child_temp)?;
    let mut child = child_command(&report_path)?
        .env(HANG_ENV, "1")
        .env("TMPDIR", &child_temp)
        .spawn()?;
    let report = eventually("child reports its cluster", WAIT, || async {
        read_report(&report_path).ok()
    })
    .await;
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            let _ = child.kill();
            return Err(error.into());
        }
    };
    // SIGKILL, as a test runner's timeout does: no destructor runs.
    child.kill()?;
    child.wait()?;
    let pids = report.pids.clone();
    eventually(
        "control-plane processes die with the test",
        WAIT,
        || async { pids.iter().all(|pid| !alive(*pid)).then_some(()) },
    )
    .await?;
    ensure!(
        report.data_dir.exists(),
        "no destructor ran, so the data is still there"
    );
    sweep_orphaned_clusters_under(&child_temp);
    ensure!(
        !report.data_dir.exists(),
        "the next harness start removes {}",
        report.data_dir.display()
    );
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
