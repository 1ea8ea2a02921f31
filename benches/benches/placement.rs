//! Placement engine throughput and latency, each against a naive baseline run
//! in the same process: the naive scheduler places one replica at a time and
//! re-evaluates every data center for every replica, with no indexes.
//!
//! Run: `cargo bench -p civicgrid-benches --bench placement` (add `-- --quick`
//! to skip the 100k-workload case).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use civicgrid_benches::{city, contended_city};
use civicgrid_operator::controller::pool::ConvertedDataCenters;
use civicgrid_operator::engine::model::{
    DataCenter, Reachability, Snapshot, Tier, Workload, WorkloadKey,
};
use civicgrid_operator::engine::{Options, Pool, schedule, schedule_only};

// The operator's own allocator (operator/src/main.rs), for the engine and
// every baseline alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FAST: Options = Options {
    explain: false,
    explain_nearest: None,
    exhaustive: false,
};

/// The baseline: for each replica, scan all data centers, check the hard
/// rules and capacity, score, take the best.
fn naive(snapshot: &Snapshot) -> usize {
    let mut free: Vec<(u64, u64)> = snapshot
        .data_centers
        .iter()
        .map(|d| (d.capacity.cpu_millis, d.capacity.memory_bytes))
        .collect();
    let mut order: Vec<&Workload> = snapshot.workloads.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.key.cmp(&b.key)));
    let mut placed = 0;
    for w in order {
        for _ in 0..w.replicas {
            let mut best: Option<(u64, usize)> = None;
            for (i, dc) in snapshot.data_centers.iter().enumerate() {
                let rules = &w.placement;
                if (!rules.required_tiers.is_empty() && !rules.required_tiers.contains(&dc.tier))
                    || (!rules.allowed_regions.is_empty()
                        && !rules.allowed_regions.contains(&dc.region))
                    || rules.max_latency.as_ref().is_some_and(|(site, max)| {
                        dc.latency_ms.get(site).is_none_or(|ms| ms > max)
                    })
                    || free[i].0 < w.demand.cpu_millis
                    || free[i].1 < w.demand.memory_bytes
                {
                    continue;
                }
                let score = free[i].0 * 100 / dc.capacity.cpu_millis.max(1)
                    + u64::from(rules.weights.cost) * (10 - dc.cost_per_core_hour.min(10));
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, i));
                }
            }
            if let Some((_, i)) = best {
                free[i].0 -= w.demand.cpu_millis;
                free[i].1 -= w.demand.memory_bytes;
                placed += 1;
            }
        }
    }
    placed
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Resident memory in KiB from /proc/self/status: `VmRSS` now, or `VmHWM`,
/// the peak since the last [`reset_peak_rss`]. `None` off Linux.
fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn full_schedule(workloads: usize, dcs: usize) {
    let snapshot = city(workloads, dcs, 7);
    reset_peak_rss();
    let before = rss_kib("VmRSS:");
    let (out, engine) = time(|| schedule(&snapshot, &FAST));
    if let (Some(before), Some(peak)) = (before, rss_kib("VmHWM:")) {
        println!(
            "  memory ({workloads} workloads, {dcs} DCs): snapshot resident {:.0} MiB, peak while scheduling {:.0} MiB (+{:.0} MiB)",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            peak.saturating_sub(before) as f64 / 1024.0
        );
    }
    let placed: u32 = out.decisions.iter().map(|d| d.placed()).sum();
    let (naive_placed, baseline) = time(|| naive(&snapshot));
    let rate = workloads as f64 / engine.as_secs_f64();
    println!(
        "full schedule ({workloads} workloads, {dcs} DCs): engine {:.1} ms ({rate:.0} workloads/s, {placed} replicas) \
         | naive {:.1} ms ({naive_placed} replicas) | speed-up ×{:.1}",
        engine.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3,
        baseline.as_secs_f64() / engine.as_secs_f64()
    );
}

/// The engine's own cost of one decision: a snapshot of 1000 data centers
/// and the one workload, with the full explanation.
fn one_decision_alone() {
    let base = city(1000, 1000, 11);
    let mut samples = Vec::new();
    let mut naive_samples = Vec::new();
    for i in 0..400 {
        let mut one = base.clone();
        one.workloads = vec![base.workloads[(i * 7) % base.workloads.len()].clone()];
        let (_, d) = time(|| schedule(&one, &Options::default()));
        samples.push(d);
        let (_, n) = time(|| naive(&one));
        naive_samples.push(n);
    }
    report_latency(
        "one decision at 1000 DCs, workload alone (with full explanation)",
        samples,
        naive_samples,
    );
}

fn report_latency(what: &str, mut samples: Vec<Duration>, mut baseline: Vec<Duration>) {
    samples.sort();
    baseline.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 - 1.0) * p) as usize];
    if baseline.is_empty() {
        println!(
            "{what}: p50 {:?} p99 {:?}",
            pct(&samples, 0.5),
            pct(&samples, 0.99)
        );
        return;
    }
    println!(
        "{what}: p50 {:?} p99 {:?} | baseline p50 {:?} p99 {:?} (×{:.1} / ×{:.1})",
        pct(&samples, 0.5),
        pct(&samples, 0.99),
        pct(&baseline, 0.5),
        pct(&baseline, 0.99),
        pct(&baseline, 0.5).as_secs_f64() / pct(&samples, 0.5).as_secs_f64(),
        pct(&baseline, 0.99).as_secs_f64() / pct(&samples, 0.99).as_secs_f64(),
    );
}

/// One workload placed the way the controller places it when that workload
/// changes: against a city where everything else already runs, with the full
/// explanation the status carries. The baseline places the same workload
/// naively, alone.
fn one_decision_latency() {
    let mut city_now = city(1000, 1000, 11);
    city_now.current = schedule(&city_now, &FAST).placements();
    let mut samples = Vec::new();
    let mut naive_samples = Vec::new();
    for i in 0..400 {
        let workload = &city_now.workloads[(i * 7) % city_now.workloads.len()];
        let only = BTreeSet::from([workload.key.clone()]);
        let (out, d) = time(|| schedule_only(&city_now, &only, &Options::default()));
        assert_eq!(out.decisions.len(), 1);
        samples.push(d);
        let mut alone = city_now.clone();
        alone.workloads = vec![workload.clone()];
        let (_, n) = time(|| naive(&alone));
        naive_samples.push(n);
    }
    report_latency(
        "one decision at 1000 DCs among 1000 running workloads (with full explanation)",
        samples,
        naive_samples,
    );
}

/// `running` with its busiest data center lost past every grace period,
/// that data center's name, and the workloads that ran there.
fn busiest_lost(running: &Snapshot) -> (Snapshot, String, BTreeSet<WorkloadKey>) {
    let mut load: BTreeMap<&str, u32> = BTreeMap::new();
    for p in running.current.values() {
        for (dc, n) in p {
            *load.entry(dc.as_str()).or_default() += n;
        }
    }
    let failed = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(dc, _)| (*dc).to_owned())
        .unwrap_or_default();
    let affected = running
        .current
        .iter()
        .filter(|(_, p)| p.contains_key(&failed))
        .map(|(k, _)| k.clone())
        .collect();
    let mut lost = running.clone();
    for dc in &mut lost.data_centers {
        if dc.name == failed {
            dc.reachability = Reachability::UnreachableSince(-1000);
        }
    }
    (lost, failed, affected)
}

fn failover() {
    let mut running = city(10_000, 1000, 13);
    running.current = schedule(&running, &FAST).placements();
    let (snapshot, failed, affected) = busiest_lost(&running);
    // Re-place only the affected workloads, against everyone else's placement.
    let (out, engine) = time(|| schedule_only(&snapshot, &affected, &FAST));
    let moved: u32 = out.decisions.iter().map(|d| d.moved_replicas).sum();
    let (_, full) = time(|| schedule(&snapshot, &FAST));
    println!(
        "failover of {failed} ({} workloads, {moved} replicas moved) at (10k, 1k): {:.2} ms | full re-schedule {:.1} ms | ×{:.1}",
        affected.len(),
        engine.as_secs_f64() * 1e3,
        full.as_secs_f64() * 1e3,
        full.as_secs_f64() / engine.as_secs_f64()
    );
}

/// A data center as the controller reads it: the CRD the engine's view is
/// converted from on every decision.
fn as_crd(dc: &DataCenter) -> civicgrid_operator::crd::DataCenter {
    let tier = match dc.tier {
        Tier::Municipal => "municipal",
        Tier::Edge => "edge",
        Tier::Partner => "partner",
    };
    let mut spec = serde_json::json!({
        "tier": tier, "region": dc.region, "zone": dc.zone, "labels": dc.labels,
        "capacity": {
            "cpu": format!("{}m", dc.capacity.cpu_millis),
            "memory": dc.capacity.memory_bytes.to_string(),
            "gpus": dc.capacity.gpus,
        },
        "cost": { "perCoreHour": dc.cost_per_core_hour, "perGibHour": dc.cost_per_gib_hour },
        "latencyMs": dc.latency_ms,
        "datasets": dc.datasets,
    });
    if let Some(carbon) = dc.carbon_intensity {
        spec["energy"] = serde_json::json!({
            "pue": f64::from(dc.pue_milli) / 1000.0,
            "carbonIntensity": carbon,
            "accounting": "LocationBased",
        });
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "civicgrid.io/v1alpha1", "kind": "DataCenter",
        "metadata": { "name": dc.name }, "spec": spec,
    }))
    .expect("a valid DataCenter")
}

/// The realistic case: a contended city (about 75% of the capacity asked
/// for, thousands of rule classes, a third already running, preemption,
/// spread, static weights, gangs, fallback groups, data centers with no
/// carbon data), against the naive baseline in the same process.
fn contended(quick: bool) {
    // The large city first: the allocator keeps what the explained run
    // takes, which would hide its peak.
    for (workloads, dcs) in [(100_000, 1_000), (10_000, 1_000)] {
        if quick && workloads > 10_000 {
            continue;
        }
        let snapshot = contended_city(workloads, dcs, 23);
        let classes: std::collections::HashSet<String> = snapshot
            .workloads
            .iter()
            .map(|w| format!("{:?}", w.placement))
            .collect();
        reset_peak_rss();
        let before = rss_kib("VmRSS:");
        let (out, engine) = time(|| schedule(&snapshot, &FAST));
        let peak = rss_kib("VmHWM:");
        let placed: u32 = out.decisions.iter().map(|d| d.placed()).sum();
        let preempted: usize = out.decisions.iter().map(|d| d.preemptions.len()).sum();
        drop(out);
        let (naive_placed, baseline) = time(|| naive(&snapshot));
        println!(
            "contended full schedule ({workloads} workloads, {dcs} DCs, {} rule classes, {} running): \
             engine {:.1} ms ({:.0} workloads/s, {placed} replicas, {preempted} preemptions) \
             | naive {:.1} ms ({naive_placed} replicas) | speed-up ×{:.1}",
            classes.len(),
            snapshot.current.len(),
            engine.as_secs_f64() * 1e3,
            workloads as f64 / engine.as_secs_f64(),
            baseline.as_secs_f64() * 1e3,
            baseline.as_secs_f64() / engine.as_secs_f64()
        );
        if let (Some(before), Some(peak)) = (before, peak) {
            println!(
                "  memory: resident {:.0} MiB with the snapshot, peak {:.0} MiB while scheduling (+{:.0} MiB)",
                before as f64 / 1024.0,
                peak as f64 / 1024.0,
                peak.saturating_sub(before) as f64 / 1024.0
            );
        }
        if workloads > 10_000 {
            continue;
        }
        // plan's cost with and without explanations.
        reset_peak_rss();
        let before = rss_kib("VmRSS:").unwrap_or(0);
        let (explained, with) = time(|| schedule(&snapshot, &Options::default()));
        let peak = rss_kib("VmHWM:").unwrap_or(0);
        let rejections: usize = explained.decisions.iter().map(|d| d.rejections.len()).sum();
        drop(explained);
        println!(
            "  with every rejection explained (plan --explain): {:.1} ms (×{:.1} of without), {rejections} rejections, +{:.0} MiB peak",
            with.as_secs_f64() * 1e3,
            with.as_secs_f64() / engine.as_secs_f64(),
            peak.saturating_sub(before) as f64 / 1024.0
        );

        // One decision as the controller makes it, and as it made it before
        // it kept its pool (the baseline, in the same process): convert
        // every data center from its CRD, clone every workload and
        // placement, account every placement, place one workload.
        let mut running = snapshot.clone();
        running.current = schedule(&snapshot, &FAST).placements();
        let mut crds: Vec<Arc<civicgrid_operator::crd::DataCenter>> = running
            .data_centers
            .iter()
            .map(|dc| {
                // As the controller sees a probed data center: a version,
                // and Reachable.
                let mut crd = as_crd(dc);
                crd.metadata.resource_version = Some("0".to_owned());
                crd.status = Some(
                    serde_json::from_value(serde_json::json!({ "conditions": [{
                        "type": "Reachable", "status": "True", "reason": "Answering",
                        "message": "", "lastTransitionTime": "2026-12-01T00:00:00Z",
                    }]}))
                    .expect("a valid status"),
                );
                Arc::new(crd)
            })
            .collect();
        let mut samples = Vec::new();
        let mut syncs = Vec::new();
        let mut decisions = Vec::new();
        let mut fully_explained = Vec::new();
        // As the controller asks: its status explains the twenty nearest
        // misses.
        let controller = Options {
            explain_nearest: Some(20),
            ..Options::default()
        };
        let mut rebuilt = Vec::new();
        let mut converted = ConvertedDataCenters::default();
        let mut pool = Pool::new(Snapshot {
            now_unix: 0,
            data_centers: converted.all(&crds, 0),
            workloads: running.workloads.clone(),
            current: running.current.clone(),
        });
        for i in 0..400 {
            let workload = &running.workloads[(i * 37) % running.workloads.len()];
            let key = workload.key.clone();
            let only = BTreeSet::from([key.clone()]);
            // A heartbeat: the watch reported one data center's object
            // changed since the last decision, so it is converted and
            // accounted again. Once a second the controller also looks at
            // every one (measured below).
            let beat = (i * 7) % crds.len();
            Arc::make_mut(&mut crds[beat]).metadata.resource_version = Some((i + 1).to_string());
            let changed = [crds[beat].clone()];
            let (_, sync) = time(|| converted.sync_changed(&changed, 0, &mut pool));
            pool.set_workload(workload.clone());
            let (_, full) = time(|| {
                pool.set_placement(&key, running.current.get(&key).cloned().unwrap_or_default());
                pool.schedule_only(0, &only, &Options::default())
            });
            fully_explained.push(full);
            let (_, decision) = time(|| {
                pool.set_workload(workload.clone());
                pool.set_placement(&key, running.current.get(&key).cloned().unwrap_or_default());
                let out = pool.schedule_only(0, &only, &controller);
                pool.set_placement(&key, out.decisions[0].placement.clone());
                out
            });
            samples.push(sync + decision);
            syncs.push(sync);
            decisions.push(decision);
            let (_, from_scratch) = time(|| {
                let data_centers = crds
                    .iter()
                    .filter_map(|dc| {
                        civicgrid_operator::convert::data_center(dc, 0, Reachability::Reachable)
                            .ok()
                    })
                    .collect();
                let view = Snapshot {
                    now_unix: 0,
                    data_centers,
                    workloads: pool.snapshot().workloads.clone(),
                    current: pool.snapshot().current.clone(),
                };
                schedule_only(&view, &only, &Options::default())
            });
            rebuilt.push(from_scratch);
        }
        report_latency(
            "  one decision as the controller makes it (kept pool, one DataCenter changed) | baseline: snapshot made from scratch",
            samples,
            rebuilt,
        );
        report_latency("    of which the data-center sync", syncs, Vec::new());
        let walks: Vec<Duration> = (0..50)
            .map(|_| time(|| converted.sync(&crds, 0, &mut pool)).1)
            .collect();
        report_latency(
            "    a look at all 1000 data centers (once a second)",
            walks,
            Vec::new(),
        );
        report_latency(
            "    of which the engine on the kept pool, explaining the 20 nearest misses | baseline: explaining all 1000",
            decisions,
            fully_explained,
        );

        // Failover: the busiest data center is lost past every grace period.
        let (lost, failed, affected) = busiest_lost(&running);
        let (out, engine) = time(|| schedule_only(&lost, &affected, &FAST));
        let moved: u32 = out.decisions.iter().map(|d| d.moved_replicas).sum();
        let (_, full) = time(|| schedule(&lost, &FAST));
        let (_, naive_full) = time(|| naive(&lost));
        println!(
            "  failover of {failed} ({} workloads, {moved} replicas moved): {:.2} ms | full re-schedule {:.1} ms (×{:.1}) | naive {:.1} ms (×{:.1})",
            affected.len(),
            engine.as_secs_f64() * 1e3,
            full.as_secs_f64() * 1e3,
            full.as_secs_f64() / engine.as_secs_f64(),
            naive_full.as_secs_f64() * 1e3,
            naive_full.as_secs_f64() / engine.as_secs_f64(),
        );
    }
}

/// The placement engine's benchmark.
#[derive(clap::Parser)]
struct Args {
    /// Leave out the 100,000-workload full schedule.
    #[arg(long)]
    quick: bool,
    /// Run one case alone (for profiling).
    #[arg(long, value_enum)]
    case: Option<Case>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    Full,
    Decision,
    Failover,
    Contended,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let quick = args.quick;
    let wants = |case: Case| args.case.is_none_or(|c| c == case);
    if wants(Case::Full) {
        full_schedule(1_000, 100);
        full_schedule(10_000, 1_000);
        if !quick {
            full_schedule(100_000, 1_000);
        }
    }
    if wants(Case::Decision) {
        one_decision_alone();
        one_decision_latency();
    }
    if wants(Case::Failover) {
        failover();
    }
    if wants(Case::Contended) {
        contended(quick);
    }
}
