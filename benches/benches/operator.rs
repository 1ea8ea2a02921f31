//! The operator on real clusters (a control cluster and three members with
//! simulated nodes, the controllers in this process): time from creating a
//! ComputeWorkload to its `Scheduled` and to its `Propagated` condition as a
//! watcher sees them, p50/p99, and sustained reconciles per second.
//!
//! Run (release):
//!   CIVICGRID_CONTROLPLANE_BIN=$(bash tests/controlplane/build.sh) \
//!     cargo bench -p civicgrid-benches --bench operator -- --workloads 1000 [--rate 50]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use civicgrid_operator::controller::{self, metrics::Metrics};
use civicgrid_operator::crd::ComputeWorkload;
use civicgrid_tests::controlplane::{NodeShape, eventually};
use civicgrid_tests::pool::{Pool, SharedPool};
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

/// The operator's propagation benchmark.
#[derive(clap::Parser)]
struct Args {
    /// Workloads to create.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    workloads: u64,
    /// Workloads created per second: latency at a stated offered load.
    /// Without it they are created as fast as the API server takes them (8
    /// at a time): a backlog test.
    #[arg(long, value_parser = civicgrid_benches::positive_number)]
    rate: Option<f64>,
    /// Data centers. Beyond three, they share `--member-clusters` member
    /// clusters and each workload runs in one data center.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    data_centers: u64,
    /// Member clusters behind the data centers (with more than three data
    /// centers).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    member_clusters: u64,
    /// Seconds between a data center's heartbeats (probe, capacity, status).
    #[arg(long, default_value_t = 2.0, value_parser = civicgrid_benches::positive_number)]
    heartbeat: f64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Either pool; kept alive to the end (dropping one stops its clusters).
enum Harness {
    ThreeMembers(Pool),
    Shared(SharedPool),
}

impl Harness {
    fn client(&self) -> kube::Client {
        match self {
            Harness::ThreeMembers(pool) => pool.client.clone(),
            Harness::Shared(pool) => pool.client.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Harness::ThreeMembers(_) => "3 data centers, one member cluster each".to_owned(),
            Harness::Shared(pool) => format!(
                "{} data centers over {} member clusters",
                pool.data_centers.len(),
                pool.clusters.len()
            ),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let count = usize::try_from(args.workloads)?;
    let rate = args.rate;

    let shared = args.data_centers > 3;
    let harness = if shared {
        // 64 CPUs a node: with 100 data centers over 4 clusters of 2 nodes,
        // 5.12 CPUs each, about 80% asked for by 2,000 workloads.
        let shape = NodeShape {
            cpu: "64".into(),
            memory: "256Gi".into(),
            pods: 1000,
            ..NodeShape::default()
        };
        Harness::Shared(
            SharedPool::start(
                usize::try_from(args.data_centers)?,
                usize::try_from(args.member_clusters)?,
                2,
                &shape,
                &["bench"],
            )
            .await?,
        )
    } else {
        let members = civicgrid_tests::pool::CITY;
        let shape = NodeShape {
            cpu: "64".into(),
            memory: "256Gi".into(),
            pods: 1000,
            ..NodeShape::default()
        };
        Harness::ThreeMembers(Pool::start(&members, 2, &shape, &["bench"]).await?)
    };
    let control = harness.client();

    let metrics = Arc::new(Metrics::default());
    let config = controller::Config {
        heartbeat: Duration::from_secs_f64(args.heartbeat),
        member_timeout: Duration::from_secs(5),
        readiness_poll: Duration::from_secs(30),
        instance: "bench".into(),
        leader_election: None,
        metrics: metrics.clone(),
        ..controller::Config::default()
    };
    let operator = tokio::spawn(controller::run(
        control.clone(),
        config,
        Box::pin(futures::future::pending()),
    ));
    civicgrid_tests::pool::data_centers_ready(&control).await?;
    let rss_before = rss_kib("VmRSS:");

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
    let pace = rate.map(|per_second| {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Arc::new(tokio::sync::Mutex::new(ticks))
    });
    let created: BTreeMap<String, Instant> = futures::stream::iter(0..count)
        .map(|i| {
            let workloads = workloads.clone();
            let pace = pace.clone();
            async move {
                if let Some(pace) = pace {
                    pace.lock().await.tick().await;
                }
                let name = format!("w-{i:05}");
                let mut spec = serde_json::json!({
                    "kind": "Deployment", "replicas": 1 + (i % 3),
                    "template": { "spec": { "containers": [{ "name": "c", "image": "c:1" }] } },
                    "resources": { "cpu": "100m", "memory": "128Mi" },
                });
                if shared {
                    spec["placement"] =
                        serde_json::json!({ "spread": { "by": "Zone", "maxDomains": 1 } });
                }
                let cw: ComputeWorkload = serde_json::from_value(serde_json::json!({
                    "apiVersion": "civicgrid.io/v1alpha1", "kind": "ComputeWorkload",
                    "metadata": { "name": name, "namespace": "bench" },
                    "spec": spec,
                }))?;
                // The clock starts when the API server has stored it.
                workloads.create(&PostParams::default(), &cw).await?;
                anyhow::Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(if rate.is_some() { 64 } else { 8 })
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
    let counts = by_request(&metrics_text, "apiserver_request_total{");
    let seconds = by_request(&metrics_text, "apiserver_request_duration_seconds_sum{");
    let mut top: Vec<(u64, String)> = counts.iter().map(|(k, &n)| (n as u64, k.clone())).collect();
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
        (
            "data center heartbeat",
            r#"civicgrid_operator_reconcile_duration_seconds_"#,
        ),
    ] {
        let suffix = match what {
            "workload reconcile" => r#"{controller="workload"}"#,
            "data center heartbeat" => r#"{controller="datacenter"}"#,
            _ => "",
        };
        let sum = value(&format!("{metric}sum{suffix}"));
        let count = value(&format!("{metric}count{suffix}"));
        println!(
            "  {what}: {count:.0} × mean {:.2} ms",
            1e3 * sum / count.max(1.0)
        );
    }
    // A failed reconcile retries after a delay: it shows in the tail.
    for line in text
        .lines()
        .filter(|l| l.contains("reconcile_errors_total{"))
    {
        println!("  {line}");
    }
    println!("control API server requests during the run (top 8, with mean latency):");
    for (n, what) in top.iter().take(8) {
        let mean = seconds.get(what).copied().unwrap_or(0.0) / (*n).max(1) as f64;
        println!("  {n:>7} {what} (mean {:.1} ms)", 1e3 * mean);
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
        "{count} workloads, {}, created {} (in {:.1} s, all propagated after {:.1} s)",
        harness.describe(),
        rate.map_or("as fast as accepted, 8 at a time".to_owned(), |r| format!(
            "at {r}/s"
        )),
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
    println!(
        "memory of the bench process (operator, creating client, watcher): {:.0} MiB before the workloads, {:.0} MiB at the end, peak {:.0} MiB",
        rss_before.unwrap_or(0) as f64 / 1024.0,
        rss_kib("VmRSS:").unwrap_or(0) as f64 / 1024.0,
        rss_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0,
    );
    drop(harness);
    Ok(())
}

/// A field of this process's `/proc/self/status`, in KiB.
fn rss_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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

/// Sums a Prometheus metric of the API server by verb, resource and
/// subresource.
fn by_request(metrics_text: &str, prefix: &str) -> BTreeMap<String, f64> {
    let mut merged: BTreeMap<String, f64> = BTreeMap::new();
    for line in metrics_text.lines().filter(|l| l.starts_with(prefix)) {
        let Some((labels, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<f64>() else { continue };
        let pick = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let key = format!(
            "{} {}/{}",
            pick("verb"),
            pick("resource"),
            pick("subresource")
        );
        *merged.entry(key).or_default() += n;
    }
    merged
}
