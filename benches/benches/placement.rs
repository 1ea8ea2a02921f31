//! Placement engine throughput and latency, each against a naive baseline run
//! in the same process: the naive scheduler places one replica at a time and
//! re-evaluates every data center for every replica, with no indexes.
//!
//! Run: `cargo bench -p civicgrid-benches --bench placement` (add `-- --quick`
//! to skip the 100k-workload case).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use civicgrid_benches::city;
use civicgrid_operator::engine::model::{Reachability, Snapshot, Workload};
use civicgrid_operator::engine::{Options, schedule};

const FAST: Options = Options {
    explain: false,
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

fn full_schedule(workloads: usize, dcs: usize) {
    let snapshot = city(workloads, dcs, 7);
    let (out, engine) = time(|| schedule(&snapshot, &FAST));
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

fn one_decision_latency() {
    let base = city(1000, 1000, 11);
    let mut samples = Vec::new();
    let mut naive_samples = Vec::new();
    for i in 0..400 {
        let mut one = base.clone();
        one.workloads = vec![base.workloads[i % base.workloads.len()].clone()];
        let (_, d) = time(|| schedule(&one, &Options::default()));
        samples.push(d);
        let (_, n) = time(|| naive(&one));
        naive_samples.push(n);
    }
    samples.sort();
    naive_samples.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 - 1.0) * p) as usize];
    println!(
        "one decision at 1000 DCs (with full explanation): p50 {:?} p99 {:?} | naive p50 {:?} p99 {:?}",
        pct(&samples, 0.5),
        pct(&samples, 0.99),
        pct(&naive_samples, 0.5),
        pct(&naive_samples, 0.99)
    );
}

fn failover() {
    let mut snapshot = city(10_000, 1000, 13);
    let first = schedule(&snapshot, &FAST);
    snapshot.current = first.placements();
    // The busiest data center stops answering, past every grace period.
    let mut load: BTreeMap<&str, u32> = BTreeMap::new();
    for p in snapshot.current.values() {
        for (dc, n) in p {
            *load.entry(dc.as_str()).or_default() += n;
        }
    }
    let failed = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(dc, _)| (*dc).to_owned())
        .unwrap_or_default();
    let affected: Vec<_> = snapshot
        .current
        .iter()
        .filter(|(_, p)| p.contains_key(&failed))
        .map(|(k, _)| k.clone())
        .collect();
    for dc in &mut snapshot.data_centers {
        if dc.name == failed {
            dc.reachability = Reachability::UnreachableSince(-1000);
        }
    }
    // Re-place only the affected workloads, against everyone else's placement.
    let mut partial = snapshot.clone();
    partial.workloads.retain(|w| affected.contains(&w.key));
    let (out, engine) = time(|| schedule(&partial, &FAST));
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

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    full_schedule(1_000, 100);
    full_schedule(10_000, 1_000);
    if !quick {
        full_schedule(100_000, 1_000);
    }
    one_decision_latency();
    failover();
}
