//! The operator on real clusters (a control cluster and three members with
//! simulated nodes, the controllers in this process): time from creating a
//! ComputeWorkload to its `Scheduled` and to its `Propagated` condition as a
//! watcher sees them, p50/p99, and sustained reconciles per second.
//!
//! Run (release):
//!   CIVICGRID_CONTROLPLANE_BIN=$(bash tests/controlplane/build.sh) \
//!     cargo bench -p civicgrid-benches --bench operator -- --workloads 1000

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use civicgrid_operator::controller::{self, metrics::Metrics};
use civicgrid_operator::crd::ComputeWorkload;
use civicgrid_tests::controlplane::{NodeShape, eventually};
use civicgrid_tests::pool::{Member, Pool};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::ResourceExt as _;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};

#[derive(Default)]
struct Seen {
    scheduled: BTreeMap<String, Instant>,
    propagated: BTreeMap<String, Instant>,
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args
        .iter()
        .position(|a| a == "--workloads")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1000);

    let members = [
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
    let shape = NodeShape {
        cpu: "64".into(),
        memory: "256Gi".into(),
        pods: 1000,
        ..NodeShape::default()
    };
    // Kept alive to the end: dropping the pool stops its clusters.
    let pool = Pool::start(&members, 2, &shape, &["bench"]).await?;
    let control = pool.client.clone();

    let metrics = Arc::new(Metrics::default());
    let config = controller::Config {
        heartbeat: Duration::from_secs(2),
        member_timeout: Duration::from_secs(5),
        readiness_poll: Duration::from_secs(30),
        instance: "bench".into(),
        leader_election: None,
        metrics: metrics.clone(),
    };
    let operator = tokio::spawn(controller::run(
        control.clone(),
        config,
        Box::pin(futures::future::pending()),
    ));
    pool.wait_ready().await?;

    // Record when each condition first shows True.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let workloads: Api<ComputeWorkload> = Api::namespaced(control.clone(), "bench");
    let watch = {
        let seen = seen.clone();
        let stream = watcher(workloads.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Ok(Some(cw)) = stream.try_next().await {
                let now = Instant::now();
                let is_true = |t: &str| {
                    cw.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == t && c.status == "True")
                    })
                };
                let mut seen = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if is_true("Scheduled") {
                    seen.scheduled.entry(cw.name_any()).or_insert(now);
                }
                if is_true("Propagated") {
                    seen.propagated.entry(cw.name_any()).or_insert(now);
                }
            }
        })
    };

    let reconciles_before = reconciles(&metrics);
    let progress = {
        let seen = seen.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let (s, p) = seen
                    .lock()
                    .map(|s| (s.scheduled.len(), s.propagated.len()))
                    .unwrap_or_default();
                eprintln!(
                    "  … scheduled {s}, propagated {p}, reconciles {}",
                    reconciles(&metrics)
                );
            }
        })
    };
    let started = Instant::now();
    let created: BTreeMap<String, Instant> = futures::stream::iter(0..count)
        .map(|i| {
            let workloads = workloads.clone();
            async move {
                let name = format!("w-{i:05}");
                let cw: ComputeWorkload = serde_json::from_value(serde_json::json!({
                    "apiVersion": "civicgrid.io/v1alpha1", "kind": "ComputeWorkload",
                    "metadata": { "name": name, "namespace": "bench" },
                    "spec": { "kind": "Deployment", "replicas": 1 + (i % 3),
                              "template": { "spec": { "containers": [{ "name": "c", "image": "c:1" }] } },
                              "resources": { "cpu": "100m", "memory": "128Mi" } }
                }))?;
                // The clock starts when the API server has stored it.
                workloads.create(&PostParams::default(), &cw).await?;
                anyhow::Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
    let creating = started.elapsed();
    eventually(
        "every workload Propagated",
        Duration::from_secs(900),
        || async { (seen.lock().ok()?.propagated.len() >= count).then_some(()) },
    )
    .await
    .context("waiting for propagation")?;
    let elapsed = started.elapsed();
    let reconciles_done = reconciles(&metrics) - reconciles_before;
    watch.abort();
    progress.abort();
    // Where the control plane's work went: requests by verb and resource.
    let metrics_text = control
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    let mut requests: Vec<(u64, String)> = metrics_text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| {
            let (labels, n) = l.rsplit_once(' ')?;
            let n = n.parse::<f64>().ok()? as u64;
            let pick = |k: &str| {
                labels
                    .split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            Some((
                n,
                format!(
                    "{} {}/{}",
                    pick("verb"),
                    pick("resource"),
                    pick("subresource")
                ),
            ))
        })
        .collect();
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for (n, key) in requests.drain(..) {
        *merged.entry(key).or_default() += n;
    }
    let mut top: Vec<(u64, String)> = merged.into_iter().map(|(k, n)| (n, k)).collect();
    top.sort_by(|a, b| b.cmp(a));
    let text = metrics.encode();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for (what, metric) in [
        (
            "workload reconcile",
            r#"civicgrid_operator_reconcile_duration_seconds_"#,
        ),
        (
            "scheduling",
            "civicgrid_operator_scheduling_duration_seconds_",
        ),
        (
            "propagation",
            "civicgrid_operator_propagation_duration_seconds_",
        ),
    ] {
        let suffix = if what == "workload reconcile" {
            r#"{controller="workload"}"#
        } else {
            ""
        };
        let sum = value(&format!("{metric}sum{suffix}"));
        let count = value(&format!("{metric}count{suffix}"));
        println!(
            "  {what}: {count:.0} × mean {:.2} ms",
            1e3 * sum / count.max(1.0)
        );
    }
    println!("control API server requests during the run (top 8):");
    for (n, what) in top.iter().take(8) {
        println!("  {n:>7} {what}");
    }
    operator.abort();

    let seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let latencies = |at: &BTreeMap<String, Instant>| -> Vec<Duration> {
        created
            .iter()
            .filter_map(|(name, t0)| at.get(name).map(|t| t.saturating_duration_since(*t0)))
            .collect()
    };
    let scheduled = latencies(&seen.scheduled);
    let propagated = latencies(&seen.propagated);
    println!(
        "{count} workloads across 3 member clusters (created in {:.1} s, all propagated after {:.1} s)",
        creating.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "create → Scheduled:  p50 {:?} p99 {:?} (target p99 < 100 ms: ×{:.2} of target)",
        percentile(scheduled.clone(), 0.5),
        percentile(scheduled.clone(), 0.99),
        percentile(scheduled, 0.99).as_secs_f64() / 0.1
    );
    println!(
        "create → Propagated: p50 {:?} p99 {:?} (target p99 < 1 s: ×{:.2} of target)",
        percentile(propagated.clone(), 0.5),
        percentile(propagated.clone(), 0.99),
        percentile(propagated, 0.99).as_secs_f64() / 1.0
    );
    println!(
        "sustained: {reconciles_done} workload reconciles in {:.1} s = {:.0} reconciles/s",
        elapsed.as_secs_f64(),
        reconciles_done as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

fn reconciles(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find(|l| l.contains("reconciles_total") && l.contains(r#"controller="workload""#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
