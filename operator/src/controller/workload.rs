//! The `ComputeWorkload` reconciler: place, propagate, clean up, report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource as _, ResourceExt as _};

use super::children::{self, Child};
use super::copies::{copies_of, delete_child, list_children};
use super::dependencies;
use super::failover::{Evictions, PoolEvictions, WINDOW_SECONDS, hold_shrinking, limit_evictions};
use super::pool::{current, key_of, placement_fingerprint, reachability};
use super::{Context, Error, FIELD_MANAGER, FINALIZER, condition, now_unix, set_condition};
use crate::convert;
use crate::crd::{
    ComputeWorkload, ComputeWorkloadStatus, EvictionEntry, ExplanationEntry, PlacementEntry,
    PreemptedByEntry,
};
use crate::engine::model::{
    NoExecute, Reachability, ReplicaDemand, Snapshot, Toleration, Workload, WorkloadKey, no_execute,
};
use crate::engine::{Decision, Options, Outcome};

/// Entry point: the finalizer guards apply and cleanup.
///
/// The finalizer is added in the same reconcile that places the workload,
/// rather than returning and waiting for the watch to bring the patched
/// object back as kube's `finalizer` helper does: that round trip through
/// the API server sat between every new workload and its `Scheduled`.
#[tracing::instrument(skip_all, fields(namespace = cw.namespace().unwrap_or_default(), name = cw.name_any()))]
pub(super) async fn reconcile(
    cw: Arc<ComputeWorkload>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.config.metrics.reconcile("workload");
    data_centers_loaded(&ctx).await?;
    let namespace = cw.namespace().unwrap_or_default();
    let api: Api<ComputeWorkload> = Api::namespaced(ctx.client.clone(), &namespace);
    let finalizer_at = cw.finalizers().iter().position(|f| f == FINALIZER);
    if cw.metadata.deletion_timestamp.is_some() {
        let Some(index) = finalizer_at else {
            return Ok(Action::await_change());
        };
        // Copies first: the finalizer stays until none is left.
        let action = cleanup(cw.clone(), ctx.clone()).await?;
        let path = format!("/metadata/finalizers/{index}");
        // `test` makes the removal fail, and retry, if the list moved.
        let patch = finalizer_patch(serde_json::json!([
            { "op": "test", "path": path, "value": FINALIZER },
            { "op": "remove", "path": path },
        ]))?;
        api.patch(
            &cw.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .map_err(Error::Kube)?;
        return Ok(action);
    }
    let cw = if finalizer_at.is_some() {
        cw
    } else {
        // `test` fails the patch, to retry, if someone else changed the list
        // meanwhile; the API server does not deduplicate finalizers.
        let patch = if cw.finalizers().is_empty() {
            serde_json::json!([
                { "op": "test", "path": "/metadata/finalizers", "value": null },
                { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
            ])
        } else {
            serde_json::json!([
                { "op": "test", "path": "/metadata/finalizers", "value": cw.finalizers() },
                { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER },
            ])
        };
        let patched = api
            .patch(
                &cw.name_any(),
                &PatchParams::default(),
                &Patch::Json::<()>(finalizer_patch(patch)?),
            )
            .await
            .map_err(Error::Kube)?;
        Arc::new(patched)
    };
    apply(cw, ctx.clone()).await
}

/// Waits until the DataCenter cache holds the first full list. kube holds a
/// controller's reconciles until its own cache is filled, but the data
/// centers come from a separate watch: a restarted operator that did not
/// wait placed workloads against an empty pool (`Unschedulable`, "of 0
/// rejected") and, for a workload being deleted, found no member to clean
/// and let the finalizer go, leaving its copies behind.
async fn data_centers_loaded(ctx: &Context) -> Result<(), Error> {
    match tokio::time::timeout(
        DATA_CENTERS_LOAD_TIMEOUT,
        ctx.data_centers.wait_until_ready(),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Error::Internal("the DataCenter watch stopped".to_owned())),
        Err(_) => Err(Error::Internal(format!(
            "the DataCenter list has not loaded after {DATA_CENTERS_LOAD_TIMEOUT:?}"
        ))),
    }
}

/// How long a reconcile waits for the first DataCenter list before it
/// fails and is retried.
const DATA_CENTERS_LOAD_TIMEOUT: Duration = Duration::from_secs(30);

fn finalizer_patch(operations: serde_json::Value) -> Result<json_patch::Patch, Error> {
    serde_json::from_value(operations).map_err(|e| Error::Internal(format!("finalizer patch: {e}")))
}

/// Transient errors retry with a delay; invalid specs wait for a change
/// (they were already reported in status and an Event).
pub(super) fn error_policy(cw: Arc<ComputeWorkload>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.config
        .metrics
        .errors
        .get_or_create(&super::metrics::ErrorLabels {
            controller: "workload",
            kind: error.kind(),
        })
        .inc();
    tracing::warn!(workload = %cw.name_any(), kind = error.kind(), %error, "workload reconcile failed");
    match error {
        Error::InvalidSpec(_) => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// A hash of everything the engine reads from the data centers, and whether
/// every one of them is reachable.
fn pool_fingerprint(ctx: &Context) -> (u64, bool) {
    let mut data_centers = ctx.data_centers.state();
    data_centers.sort_by_key(|dc| dc.name_any());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut all_reachable = true;
    for dc in &data_centers {
        std::hash::Hash::hash(&dc.name_any(), &mut hasher);
        std::hash::Hash::hash(&placement_fingerprint(dc), &mut hasher);
        all_reachable &= reachability(dc) == Reachability::Reachable;
    }
    (std::hash::Hasher::finish(&hasher), all_reachable)
}

/// The last decision for `cw`, when nothing it was made from has changed
/// (see [`super::Reusable`]).
fn reuse(ctx: &Context, cw: &ComputeWorkload, pool: u64) -> Option<Decision> {
    ctx.decided()
        .reusable_decision(&key_of(cw), cw.uid(), cw.metadata.generation, pool)
}

/// Whether `workload`'s rules keep a full placement where it is whatever
/// else changes in the pool (see [`super::Reusable`]).
fn keeps_a_full_placement(workload: &Workload) -> bool {
    use crate::engine::model::{RebalanceMode, StrategyKind};
    workload.placement.rebalance == RebalanceMode::Never
        && matches!(
            workload.placement.strategy,
            StrategyKind::Score | StrategyKind::AvailableCapacity
        )
}

/// Whether a later reconcile may reuse `decision` instead of asking the
/// engine again: placed in full, by rules that keep a full placement where
/// it is, with no grace period running (every data center reachable), and
/// no preemption whose victims are still moving.
fn may_reuse(keeps: bool, all_reachable: bool, decision: &Decision) -> bool {
    keeps
        && all_reachable
        && decision.outcome == Outcome::Scheduled
        && decision.preemptions.is_empty()
}

/// Places `workload` against the pool and everything else that runs in it,
/// and remembers the decision before anyone else decides. With an eviction
/// budget, trims the moves off data centers unreachable past its grace
/// period to that budget.
fn decide(
    ctx: &Context,
    cw: &ComputeWorkload,
    workload: Workload,
    eviction_budget: Option<u32>,
    (pool, all_reachable): (u64, bool),
) -> (Decision, Evictions) {
    let now = now_unix();
    let grace = i64::from(workload.grace_period_seconds);
    let keeps = keeps_a_full_placement(&workload);
    let mut decided = ctx.decided();
    let mut kept = match decided.kept.take() {
        Some(mut kept) if !kept.stale() => {
            kept.sync_data_centers(ctx, now);
            kept
        }
        _ => super::pool::KeptPool::build(ctx, &mut decided, now),
    };
    let key = workload.key.clone();
    let tolerations = workload.placement.tolerations.clone();
    let mine = decided.placement_or_status(&key, cw);
    let engine_pool = kept.pool();
    engine_pool.set_workload(workload);
    engine_pool.set_placement(&key, mine);
    let only = BTreeSet::from([key.clone()]);
    // The status explains the nearest misses only: the engine builds no
    // message for the rest.
    let options = Options {
        explain_nearest: Some(EXPLAINED_DATA_CENTERS),
        ..Options::default()
    };
    let mut schedule = engine_pool.schedule_only(now, &only, &options);
    let mut decision = schedule.decisions.remove(0);
    let snapshot = engine_pool.snapshot();
    let pool_left = pool_budget_left(ctx, &mut decided, now);
    let eviction_budget = match (eviction_budget, pool_left) {
        (Some(own), Some(pool)) => Some(own.min(pool)),
        (own, pool) => own.or(pool),
    };
    let evictions = match eviction_budget {
        Some(budget) => {
            let mut evictions =
                pace_evictions(snapshot, &tolerations, &mut decision, budget, (now, grace));
            if let Some(pool) = decided
                .pool_evictions
                .as_mut()
                .filter(|_| pool_left.is_some())
            {
                pool.record(now, evictions.moved);
                if evictions.deferred > 0 && pool_left.is_some_and(|left| left <= evictions.moved) {
                    evictions.pool_retry_at = Some(pool.next_room_at(now));
                }
            }
            evictions
        }
        None => Evictions::default(),
    };
    let victims_left = victims_left(snapshot, &decision);
    // Back before anything is recorded: record_placement keeps the pool in
    // step with every placement it records, the victims' included.
    decided.kept = Some(kept);
    record_preemptions_made(ctx, &mut decided, victims_left, &decision);
    decided.record_placement(key.clone(), decision.placement.clone());
    let reusable = may_reuse(keeps, all_reachable, &decision).then(|| super::Reusable {
        uid: cw.uid(),
        generation: cw.metadata.generation,
        pool,
        decision: decision.clone(),
    });
    decided.set_reusable(key, reusable);
    (decision, evictions)
}

/// Failover moves the pool-wide limit still allows this minute, if there
/// is one; the count is seeded from every workload's status the first time.
fn pool_budget_left(ctx: &Context, decided: &mut super::Decided, now: i64) -> Option<u32> {
    let max = ctx.config.pool_evictions_per_minute?;
    let pool = decided.pool_evictions.get_or_insert_with(|| {
        PoolEvictions::seeded(
            ctx.workloads
                .state()
                .iter()
                .filter_map(|cw| cw.status.as_ref())
                .flat_map(|s| &s.evictions)
                .map(|e| (e.time.0.as_second(), u32::try_from(e.replicas).unwrap_or(0)))
                .collect(),
        )
    });
    Some(pool.left(now, max))
}

/// Trims `decision` so that at most `budget` replicas leave the data
/// centers they must leave: unreachable past the grace period, or with a
/// NoExecute taint the workload (the snapshot's first) does not, or no
/// longer, tolerate. Preemptions no replica then uses are dropped.
fn pace_evictions(
    snapshot: &Snapshot,
    tolerations: &[crate::engine::model::Toleration],
    decision: &mut Decision,
    budget: u32,
    (now, grace): (i64, i64),
) -> Evictions {
    let before = snapshot
        .current
        .get(&decision.workload)
        .cloned()
        .unwrap_or_default();
    let failed: BTreeSet<String> = snapshot
        .data_centers
        .iter()
        .filter(|dc| {
            matches!(dc.reachability,
                Reachability::UnreachableSince(since) if now - since >= grace)
                || matches!(no_execute(tolerations, dc, now), NoExecute::Leaves(_))
        })
        .map(|dc| dc.name.clone())
        .collect();
    let engine_placement = decision.placement.clone();
    let preempted_in: BTreeSet<String> = decision.preempted_room.keys().cloned().collect();
    let cluster_of: BTreeMap<String, String> = snapshot
        .data_centers
        .iter()
        .filter_map(|dc| Some((dc.name.clone(), dc.cluster.clone()?)))
        .collect();
    let evictions = limit_evictions(
        &before,
        &mut decision.placement,
        &failed,
        budget,
        &preempted_in,
        &cluster_of,
    );
    drop_unused_preemptions(decision, &engine_placement);
    evictions
}

/// What `decision`'s preemptions leave each victim, one entry per
/// preemption, from the placements in `snapshot`.
fn victims_left(
    snapshot: &Snapshot,
    decision: &Decision,
) -> Vec<(WorkloadKey, BTreeMap<String, u32>)> {
    let mut left: Vec<(WorkloadKey, BTreeMap<String, u32>)> = Vec::new();
    for preemption in &decision.preemptions {
        // A victim preempted in two data centers loses both.
        let mut victim = left
            .iter()
            .rev()
            .find(|(key, _)| *key == preemption.victim)
            .map(|(_, placement)| placement.clone())
            .unwrap_or_else(|| {
                snapshot
                    .current
                    .get(&preemption.victim)
                    .cloned()
                    .unwrap_or_default()
            });
        if let Some(n) = victim.get_mut(&preemption.data_center) {
            *n = n.saturating_sub(preemption.replicas);
        }
        victim.retain(|_, n| *n > 0);
        left.push((preemption.victim.clone(), victim));
    }
    left
}

/// Remembers what `decision`'s preemptions leave each victim
/// (`victims_left`, one entry per preemption), for its own reconcile to
/// record in its status and an Event, and asks for the victims to be
/// looked at again.
fn record_preemptions_made(
    ctx: &Context,
    decided: &mut super::Decided,
    victims_left: Vec<(WorkloadKey, BTreeMap<String, u32>)>,
    decision: &Decision,
) {
    for (preemption, (victim, left)) in decision.preemptions.iter().zip(victims_left) {
        decided.record_placement(victim.clone(), left);
        decided.record_preempted(
            victim,
            PreemptedByEntry {
                time: Time(Timestamp::now()),
                preemptor: decision.workload.to_string(),
                data_center: preemption.data_center.clone(),
                replicas: i32::try_from(preemption.replicas).unwrap_or(i32::MAX),
            },
        );
        let _ = ctx.requeue.unbounded_send(());
    }
}

/// Drops the preemptions made for replicas the eviction budget then kept
/// where they were: in a data center the budget trimmed by at least the
/// replicas that stood in preempted room, the victims keep theirs.
fn drop_unused_preemptions(decision: &mut Decision, engine_placement: &BTreeMap<String, u32>) {
    let trimmed = |dc: &str| {
        engine_placement
            .get(dc)
            .copied()
            .unwrap_or(0)
            .saturating_sub(decision.placement.get(dc).copied().unwrap_or(0))
    };
    let unused: BTreeSet<String> = decision
        .preempted_room
        .iter()
        .filter(|(dc, room)| trimmed(dc) >= **room)
        .map(|(dc, _)| dc.clone())
        .collect();
    decision
        .preemptions
        .retain(|p| !unused.contains(&p.data_center));
    decision.preempted_room.retain(|dc, _| !unused.contains(dc));
}

/// Reconciles one workload: decide where its replicas go, propagate its
/// copies into the chosen members, remove the copies no placement names,
/// and report status and Events.
async fn apply(cw: Arc<ComputeWorkload>, ctx: Arc<Context>) -> Result<Action, Error> {
    // What this process last wrote, when newer than the cache: comparing
    // with a lagging cache would rewrite the same status on every event.
    let previous = ctx
        .decided()
        .status(&key_of(&cw), cw.uid().as_ref())
        .or_else(|| cw.status.clone())
        .unwrap_or_default();
    let workload = match convert::workload(&cw) {
        Ok(w) => w,
        Err(invalid) => {
            report_invalid_spec(&ctx, &cw, &previous, &invalid).await?;
            return Ok(Action::await_change());
        }
    };
    let grace = i64::from(workload.grace_period_seconds);
    let wanted = workload.replicas;
    // What propagation and the deadlines read of the converted spec: the
    // decision takes the workload itself.
    let demand = workload.demand.clone();
    let tolerations = workload.placement.tolerations.clone();
    let before = current(&ctx, &cw);
    let now = now_unix();
    let placed = decide_placement(&ctx, &cw, workload, &previous, &before, now).await?;
    let mut propagated = propagate_copies(&ctx, &cw, &demand, &placed.decision).await;
    let next_deadline = remove_stale_copies(
        &ctx,
        &cw,
        (&placed.decision, &tolerations),
        &mut propagated,
        grace,
        now,
    )
    .await;
    report(
        &ctx,
        &cw,
        Report {
            previous: &previous,
            before: &before,
            wanted,
            placed,
            propagated,
            next_deadline,
        },
    )
    .await
}

/// A spec the engine cannot use: `Scheduled=False` with the field at fault,
/// and a Warning Event the first time.
async fn report_invalid_spec(
    ctx: &Context,
    cw: &ComputeWorkload,
    previous: &ComputeWorkloadStatus,
    invalid: &convert::FieldError,
) -> Result<(), Error> {
    let generation = cw.metadata.generation;
    let mut status = previous.clone();
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        condition(
            "Scheduled",
            false,
            "InvalidSpec",
            invalid.to_string(),
            generation,
        ),
    );
    if status != *previous {
        write_status(ctx, cw, &status).await?;
        publish(
            ctx,
            cw,
            EventType::Warning,
            "InvalidSpec",
            invalid.to_string(),
        )
        .await;
    }
    Ok(())
}

/// What the decide stage settled: the decision, the evictions it made or
/// deferred, and the eviction window with them.
struct Placed {
    decision: Decision,
    evictions: Evictions,
    recent_evictions: Vec<EvictionEntry>,
}

/// Decides the placement (reusing the last decision where nothing it was
/// made from changed), paced by `maxEvictionsPerMinute`, and records a new
/// placement in the status before acting on it.
async fn decide_placement(
    ctx: &Arc<Context>,
    cw: &Arc<ComputeWorkload>,
    workload: crate::engine::model::Workload,
    previous: &ComputeWorkloadStatus,
    before: &BTreeMap<String, u32>,
    now: i64,
) -> Result<Placed, Error> {
    let generation = cw.metadata.generation;
    let wanted = workload.replicas;
    // Evictions in the last minute count against maxEvictionsPerMinute.
    let mut recent_evictions: Vec<EvictionEntry> = previous
        .evictions
        .iter()
        .filter(|e| e.time.0.as_second() > now - WINDOW_SECONDS)
        .cloned()
        .collect();
    let max_evictions = cw.spec.failover.max_evictions_per_minute;
    let eviction_budget = max_evictions.map(|max| {
        let used: i64 = recent_evictions.iter().map(|e| i64::from(e.replicas)).sum();
        u32::try_from(i64::from(max) - used).unwrap_or(0)
    });
    let started = std::time::Instant::now();
    let pool = pool_fingerprint(ctx);
    let (decision, evictions) = match reuse(ctx, cw, pool.0) {
        Some(decision) => (decision, Evictions::default()),
        None => {
            // The engine reads a snapshot of the whole pool: off the async
            // workers, so watches and API calls keep moving meanwhile.
            let ctx = ctx.clone();
            let cw = cw.clone();
            tokio::task::spawn_blocking(move || decide(&ctx, &cw, workload, eviction_budget, pool))
                .await
                .map_err(|e| Error::Internal(format!("placement task: {e}")))?
        }
    };
    if evictions.moved > 0 {
        recent_evictions.push(EvictionEntry {
            time: Time(Timestamp::now()),
            replicas: i32::try_from(evictions.moved).unwrap_or(i32::MAX),
        });
    }
    let metrics = &ctx.config.metrics;
    metrics
        .scheduling_seconds
        .observe(started.elapsed().as_secs_f64());
    // Record a decision before acting on it: `Scheduled` is reported as soon
    // as the placement is made, not after every member has answered, and a
    // crash mid-move restarts from it. Compared with this process's own
    // last decision, not the cached status, which lags our writes.
    if decision.placement != *before {
        let previous_ready: BTreeMap<String, i32> = previous
            .placement
            .iter()
            .map(|p| (p.data_center.clone(), p.ready_replicas))
            .collect();
        let mut interim = status_of(
            previous,
            &decision,
            &previous_ready,
            &[],
            wanted,
            generation,
        );
        interim.evictions.clone_from(&recent_evictions);
        set_condition(
            &mut interim.conditions,
            condition(
                "Propagated",
                false,
                "Propagating",
                "applying to member clusters",
                generation,
            ),
        );
        write_status(ctx, cw, &interim).await?;
    }
    Ok(Placed {
        decision,
        evictions,
        recent_evictions,
    })
}

/// What propagation found: failures to report, ready replicas per data
/// center, and the copies held back for make-before-break.
struct Propagated {
    failures: Vec<String>,
    ready_by_dc: BTreeMap<String, i32>,
    holding: BTreeSet<String>,
}

/// Applies the workload's copy to every chosen, reachable data center, the
/// copies that grow first; with `maxUnavailable`, a copy that would lose
/// ready replicas shrinks only once those are ready enough.
async fn propagate_copies(
    ctx: &Context,
    cw: &ComputeWorkload,
    demand: &ReplicaDemand,
    decision: &Decision,
) -> Propagated {
    let namespace = cw.namespace().unwrap_or_default();
    let name = cw.name_any();
    let metrics = &ctx.config.metrics;
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut ready_by_dc = BTreeMap::new();
    // Data centers whose copies wait for replacements to become ready.
    let mut holding: BTreeSet<String> = BTreeSet::new();
    let unreachable: BTreeSet<String> = ctx
        .data_centers
        .state()
        .iter()
        .filter(|dc| reachability(dc) != Reachability::Reachable)
        .map(|dc| dc.name_any())
        .collect();
    // With maxUnavailable, a copy that would lose ready replicas (a move
    // away, or a smaller share) shrinks only once the copies that grow are
    // ready enough: make before break. Readiness of live copies comes from
    // the member watches, so it survives a restart.
    // Read once for every member; a dependency that cannot be read is
    // reported, and the copies are still kept at their placement (those
    // already in members keep what they were given).
    let mut needs = if decision.placement.is_empty() {
        Vec::new()
    } else {
        match dependencies::read(&ctx.client, cw, ctx.config.secret_dependencies).await {
            Ok(read) => read,
            Err(e) => {
                failures.push(e.to_string());
                Vec::new()
            }
        }
    };
    needs.extend(dependencies::headless_service(cw, &needs));
    let needs = &needs;
    let max_unavailable = cw.spec.failover.max_unavailable;
    let live_ready: BTreeMap<String, i32> = if max_unavailable.is_some() {
        ctx.data_centers
            .state()
            .iter()
            .map(|dc| dc.name_any())
            .filter(|dc| !unreachable.contains(dc))
            .filter_map(|dc| {
                let ready = ctx
                    .members
                    .ready_of(&(dc.clone(), namespace.clone(), name.clone()))?;
                Some((dc, ready))
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let target = |dc: &str| {
        decision
            .placement
            .get(dc)
            .map_or(0, |&n| i32::try_from(n).unwrap_or(i32::MAX))
    };
    let shrinks = |dc: &str| live_ready.get(dc).is_some_and(|&ready| ready > target(dc));
    // Copies that do not shrink are applied first; whether the others may
    // shrink depends on what those report ready.
    for pass_shrinking in [false, true] {
        let hold = pass_shrinking
            && hold_shrinking(
                &decision.placement,
                &live_ready,
                &ready_by_dc,
                max_unavailable,
            );
        if hold {
            holding = live_ready
                .keys()
                .filter(|dc| shrinks(dc))
                .cloned()
                .collect();
        }
        let mut applying = Vec::new();
        for (data_center, &replicas) in &decision.placement {
            if shrinks(data_center) != pass_shrinking {
                continue;
            }
            // Replicas still placed on an unreachable data center (within
            // the grace period, or waiting for the eviction budget) keep the
            // copy it has; trying to reach it would only wait for the
            // timeout.
            if unreachable.contains(data_center) {
                failures.push(format!(
                    "data center {data_center} is unreachable; its copy is left as it was"
                ));
                continue;
            }
            if hold {
                ready_by_dc.insert(data_center.clone(), target(data_center));
                continue;
            }
            applying.push((data_center, replicas));
        }
        // Members are separate clusters: apply to all of them at once.
        let applied = futures::future::join_all(applying.iter().map(|&(data_center, replicas)| {
            propagate(ctx, cw, (data_center, replicas), demand, needs)
        }))
        .await;
        for ((data_center, _), result) in applying.into_iter().zip(applied) {
            match result {
                Ok(ready) => {
                    ready_by_dc.insert(data_center.clone(), ready);
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    metrics
        .propagation_seconds
        .observe(started.elapsed().as_secs_f64());
    Propagated {
        failures,
        ready_by_dc,
        holding,
    }
}

/// Removes copies from reachable members no placement names; returns the
/// next grace-period deadline of an unreachable data center still placed.
async fn remove_stale_copies(
    ctx: &Context,
    cw: &ComputeWorkload,
    (decision, tolerations): (&Decision, &[Toleration]),
    propagated: &mut Propagated,
    grace: i64,
    now: i64,
) -> Option<i64> {
    let namespace = cw.namespace().unwrap_or_default();
    let name = cw.name_any();
    let key = key_of(cw);
    let mut looked_in = ctx.decided().looked_in(&key);
    let (failures, holding) = (&mut propagated.failures, &propagated.holding);
    let mut next_deadline: Option<i64> = None;
    let data_centers = ctx.data_centers.state();
    for dc in &data_centers {
        let dc_name = dc.name_any();
        // A NoExecute toleration that runs out moves the replicas then.
        if decision.placement.contains_key(&dc_name)
            && let Ok(model) = convert::data_center(dc, now, reachability(dc))
            && let NoExecute::StaysUntil(until, _) = no_execute(tolerations, &model, now)
        {
            next_deadline = Some(next_deadline.map_or(until, |d| d.min(until)));
        }
        if let Reachability::UnreachableSince(since) = reachability(dc)
            && decision.placement.contains_key(&dc_name)
        {
            // Past the deadline the replicas have moved, or are waiting for
            // the eviction budget, which sets its own deadline below.
            let deadline = since + grace;
            if deadline > now {
                next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
        // A copy is there on purpose where the workload is placed or kept
        // for make-before-break; one no placement names may stay in a member
        // while it is down.
        let placed = decision.placement.contains_key(&dc_name) || holding.contains(&dc_name);
        if !looked_in.must_look(
            &dc_name,
            reachability(dc) == Reachability::Reachable,
            placed,
        ) {
            continue;
        }
        let Some(member) = ctx.members.cached(&dc_name) else {
            looked_in.forget(&dc_name);
            continue;
        };
        match copies_of(ctx, &member, &dc_name, &namespace, &name).await {
            Ok(stale) => {
                let mut clean = true;
                for child in stale {
                    if let Err(e) = delete_child(ctx, &member, &dc_name, &child).await {
                        failures.push(e.to_string());
                        clean = false;
                    }
                }
                if clean {
                    looked_in.clean(&dc_name);
                } else {
                    looked_in.forget(&dc_name);
                }
            }
            Err(e) => {
                failures.push(e.to_string());
                looked_in.forget(&dc_name);
            }
        }
    }
    looked_in.keep_only(data_centers.iter().map(|dc| dc.name_any()));
    ctx.decided().record_looked_in(key, looked_in);
    next_deadline
}

/// What the report stage reads.
struct Report<'a> {
    previous: &'a ComputeWorkloadStatus,
    before: &'a BTreeMap<String, u32>,
    wanted: u32,
    placed: Placed,
    propagated: Propagated,
    next_deadline: Option<i64>,
}

/// Writes the status when it changed materially, publishes the Events, and
/// picks when to look again.
async fn report(ctx: &Context, cw: &ComputeWorkload, report: Report<'_>) -> Result<Action, Error> {
    let Report {
        previous,
        before,
        wanted,
        placed:
            Placed {
                decision,
                evictions,
                recent_evictions,
            },
        propagated:
            Propagated {
                failures,
                ready_by_dc,
                holding,
            },
        mut next_deadline,
    } = report;
    let generation = cw.metadata.generation;
    let max_unavailable = cw.spec.failover.max_unavailable;
    let max_evictions = cw.spec.failover.max_evictions_per_minute;
    let mut status = status_of(
        previous,
        &decision,
        &ready_by_dc,
        &failures,
        wanted,
        generation,
    );
    status.evictions.clone_from(&recent_evictions);
    let lost = ctx.decided().pending_preemptions(&key_of(cw));
    record_preemptions(&mut status.preempted_by, &lost);
    if !holding.is_empty() && failures.is_empty() {
        let held: Vec<&str> = holding.iter().map(String::as_str).collect();
        set_condition(
            &mut status.conditions,
            condition(
                "Propagated",
                false,
                "WaitingForReplacements",
                format!(
                    "copies in {} keep their replicas until the new ones are ready \
                     (failover.maxUnavailable {})",
                    held.join(", "),
                    max_unavailable.unwrap_or(0)
                ),
                generation,
            ),
        );
    }
    let changed_placement = *before != decision.placement;
    if materially_different(&status, previous) {
        write_status(ctx, cw, &status).await?;
    }
    if !lost.is_empty() {
        ctx.decided().recorded_preemptions(&key_of(cw), lost.len());
        for entry in &lost {
            publish(
                ctx,
                cw,
                EventType::Warning,
                "Preempted",
                format!(
                    "{} replica(s) in {} evicted to make room for {}, of higher priority",
                    entry.replicas, entry.data_center, entry.preemptor
                ),
            )
            .await;
        }
    }
    if !decision.preemptions.is_empty() {
        let evicted: Vec<String> = decision
            .preemptions
            .iter()
            .map(|p| {
                format!(
                    "{} replica(s) of {} in {}",
                    p.replicas, p.victim, p.data_center
                )
            })
            .collect();
        publish(
            ctx,
            cw,
            EventType::Normal,
            "Preempting",
            format!("evicted {} to make room", evicted.join(", ")),
        )
        .await;
    }
    if changed_placement {
        let placed: Vec<String> = decision
            .placement
            .iter()
            .map(|(dc, n)| format!("{dc}={n}"))
            .collect();
        let note = if placed.is_empty() {
            "no replicas placed".to_owned()
        } else {
            format!("replicas placed: {}", placed.join(", "))
        };
        publish(ctx, cw, EventType::Normal, "Placed", note).await;
    }
    if decision.outcome != Outcome::Scheduled
        && (changed_placement || previous.conditions.is_empty())
    {
        let reason = match decision.outcome {
            Outcome::PartiallyScheduled => "PartiallyScheduled",
            _ => "Unschedulable",
        };
        publish(
            ctx,
            cw,
            EventType::Warning,
            reason,
            decision.reason.clone().unwrap_or_default(),
        )
        .await;
    }
    if evictions.deferred > 0 {
        publish(
            ctx,
            cw,
            EventType::Normal,
            "EvictionsDeferred",
            format!(
                "moved {} replicas off data centers unreachable past the grace period; {} \
                 stay until {} allows",
                evictions.moved,
                evictions.deferred,
                match (max_evictions, evictions.pool_retry_at) {
                    (_, Some(_)) => format!(
                        "the pool-wide limit of {} per minute",
                        ctx.config.pool_evictions_per_minute.unwrap_or(0)
                    ),
                    (max, None) => format!("maxEvictionsPerMinute ({})", max.unwrap_or(0)),
                }
            ),
        )
        .await;
    }
    if !failures.is_empty() {
        publish(
            ctx,
            cw,
            EventType::Warning,
            "PropagationFailed",
            failures.join("; "),
        )
        .await;
    }

    let available = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Available" && c.status == "True");
    let mut wait = if available && failures.is_empty() {
        Duration::from_secs(300)
    } else {
        ctx.config.readiness_poll
    };
    // Deferred evictions go when the oldest in the window leaves it (this
    // workload's, or the pool's when that held them back).
    if evictions.deferred > 0 {
        let own = recent_evictions
            .iter()
            .map(|e| e.time.0.as_second() + WINDOW_SECONDS)
            .min();
        for deadline in own.into_iter().chain(evictions.pool_retry_at) {
            next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
        }
    }
    if let Some(deadline) = next_deadline {
        let left = u64::try_from(deadline - now_unix()).unwrap_or(0) + 1;
        wait = wait.min(Duration::from_secs(left));
    }
    Ok(Action::requeue(wait))
}

/// Data centers not chosen that a workload's status explains one by one.
const EXPLAINED_DATA_CENTERS: usize = 20;

fn status_of(
    previous: &ComputeWorkloadStatus,
    decision: &Decision,
    ready_by_dc: &BTreeMap<String, i32>,
    failures: &[String],
    wanted: u32,
    generation: Option<i64>,
) -> ComputeWorkloadStatus {
    let mut status = previous.clone();
    status.observed_generation = generation;
    status.placement = decision
        .placement
        .iter()
        .map(|(dc, &replicas)| PlacementEntry {
            data_center: dc.clone(),
            replicas: i32::try_from(replicas).unwrap_or(i32::MAX),
            ready_replicas: ready_by_dc.get(dc).copied().unwrap_or(0),
        })
        .collect();
    status.placed_replicas = status.placement.iter().map(|p| p.replicas).sum();
    status.ready_replicas = status.placement.iter().map(|p| p.ready_replicas).sum();
    // A status naming every data center not chosen grows with the pool (a
    // thousand entries, a hundred kilobytes, rewritten with every change);
    // the nearest misses say what to change, the counts say the rest.
    let mut nearest: Vec<&crate::engine::Rejection> = decision.rejections.iter().collect();
    nearest.sort_by(|a, b| {
        b.rule
            .cmp(&a.rule)
            .then_with(|| a.data_center.cmp(&b.data_center))
    });
    status.explanation = nearest
        .iter()
        .take(EXPLAINED_DATA_CENTERS)
        .map(|r| ExplanationEntry {
            data_center: r.data_center.clone(),
            rule: format!("{:?}", r.rule),
            message: r.message.clone(),
        })
        .collect();
    status.rejected_by_rule = decision
        .rejected_by_rule
        .iter()
        .map(|(rule, &n)| (format!("{rule:?}"), i32::try_from(n).unwrap_or(i32::MAX)))
        .collect();
    let (scheduled, reason) = match decision.outcome {
        Outcome::Scheduled => (true, "Scheduled"),
        Outcome::PartiallyScheduled => (false, "PartiallyScheduled"),
        Outcome::Unschedulable => (false, "Unschedulable"),
    };
    let message = decision.reason.clone().unwrap_or_else(|| {
        format!(
            "{} replicas placed in {} data centers",
            decision.placed(),
            decision.placement.len()
        )
    });
    set_condition(
        &mut status.conditions,
        condition("Scheduled", scheduled, reason, message, generation),
    );
    set_condition(
        &mut status.conditions,
        if failures.is_empty() {
            condition(
                "Propagated",
                true,
                "Applied",
                "every chosen member cluster has its copy",
                generation,
            )
        } else {
            condition(
                "Propagated",
                false,
                "MemberError",
                failures.join("; "),
                generation,
            )
        },
    );
    let placed_all =
        scheduled && status.placed_replicas >= i32::try_from(wanted).unwrap_or(i32::MAX);
    let ready_all = status.ready_replicas >= status.placed_replicas;
    set_condition(
        &mut status.conditions,
        condition(
            "Available",
            placed_all && ready_all,
            if placed_all && ready_all {
                "Ready"
            } else {
                "NotReady"
            },
            format!(
                "{} of {} placed replicas ready",
                status.ready_replicas, status.placed_replicas
            ),
            generation,
        ),
    );
    status
}

/// Whether `status` is worth writing over `previous`. Explanation messages
/// carry live numbers (free capacity, scores) that move whenever anything
/// else is placed; rewriting every workload's status for that would load the
/// API server with every placement in the pool. They are refreshed whenever
/// anything else changes, or a data center is rejected for another rule.
/// How many preemptions a status keeps: enough to see a pattern, bounded
/// so a workload preempted all day does not grow its object.
const PREEMPTIONS_KEPT: usize = 10;

/// Appends `lost` to the status's preemptions, keeping the latest
/// [`PREEMPTIONS_KEPT`].
fn record_preemptions(kept: &mut Vec<PreemptedByEntry>, lost: &[PreemptedByEntry]) {
    kept.extend(lost.iter().cloned());
    let over = kept.len().saturating_sub(PREEMPTIONS_KEPT);
    kept.drain(..over);
}

fn materially_different(status: &ComputeWorkloadStatus, previous: &ComputeWorkloadStatus) -> bool {
    let rules = |s: &ComputeWorkloadStatus| -> Vec<(String, String)> {
        s.explanation
            .iter()
            .map(|e| (e.data_center.clone(), e.rule.clone()))
            .collect()
    };
    let without_explanation = |s: &ComputeWorkloadStatus| ComputeWorkloadStatus {
        explanation: Vec::new(),
        ..s.clone()
    };
    without_explanation(status) != without_explanation(previous) || rules(status) != rules(previous)
}

async fn write_status(
    ctx: &Context,
    cw: &ComputeWorkload,
    status: &ComputeWorkloadStatus,
) -> Result<(), Error> {
    let api: Api<ComputeWorkload> =
        Api::namespaced(ctx.client.clone(), &cw.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": "civicgrid.io/v1alpha1",
        "kind": "ComputeWorkload",
        "status": status,
    });
    api.patch_status(
        &cw.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    ctx.decided()
        .record_status(key_of(cw), cw.uid(), status.clone());
    Ok(())
}

async fn publish(
    ctx: &Context,
    cw: &ComputeWorkload,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        // Events carry at most 1 kB of note.
        note: Some(note.chars().take(1000).collect()),
        action: "Place".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &cw.object_ref(&())).await {
        tracing::warn!(%error, workload = %cw.name_any(), "publishing an event");
    }
}

async fn member_of(ctx: &Context, data_center: &str) -> Result<Client, Error> {
    if let Some(client) = ctx.members.cached(data_center) {
        return Ok(client);
    }
    let dc = ctx
        .data_centers
        .get(&ObjectRef::new(data_center))
        .ok_or_else(|| Error::Kubeconfig {
            data_center: data_center.to_owned(),
            message: "the DataCenter is gone".to_owned(),
        })?;
    ctx.members.connect(&ctx.client, &dc).await
}

/// Applies `cw`'s copy with `replicas` in `data_center`'s member; returns
/// the ready replicas the member reports.
async fn propagate(
    ctx: &Context,
    cw: &ComputeWorkload,
    (data_center, replicas): (&str, u32),
    demand: &ReplicaDemand,
    needs: &[dependencies::Dependency],
) -> Result<i32, Error> {
    let member = member_of(ctx, data_center).await?;
    let failed = |source| Error::Member {
        data_center: data_center.to_owned(),
        source,
    };
    let namespace = cw.namespace().unwrap_or_default();
    let name = cw.name_any();
    let dc = ctx.data_centers.get(&ObjectRef::new(data_center));
    let gpu_model = match &dc {
        Some(dc) if demand.gpu_count > 0 => convert::data_center(dc, now_unix(), reachability(dc))
            .ok()
            .and_then(|dc| crate::engine::accounted_gpu_model(&dc, demand)),
        _ => None,
    };
    let overrides: Vec<&crate::crd::Override> = dc
        .as_ref()
        .map(|dc| {
            cw.spec
                .overrides
                .iter()
                .filter(|o| super::overrides::matches(o, dc))
                .collect()
        })
        .unwrap_or_default();
    let desired = children::desired(cw, data_center, replicas, gpu_model.as_deref(), &overrides);
    let fingerprint = desired.fingerprint() ^ dependencies::fingerprint(needs).rotate_left(1);
    let key = (data_center.to_owned(), namespace.clone(), name.clone());
    if let Some(ready) = ctx.members.unchanged(&key, fingerprint) {
        return Ok(ready);
    }
    let kind = desired.kind();
    // A copy of another kind is left from a `spec.kind` change. This process
    // knows what it applied; after a restart, a workload that was placed
    // before may have one from an earlier process, so look once.
    let other_kind_possible = match ctx.members.applied_kind(&key) {
        Some(applied) => applied != kind,
        None => cw
            .status
            .as_ref()
            .is_some_and(|status| !status.placement.is_empty()),
    };
    if other_kind_possible {
        for child in copies_of(ctx, &member, data_center, &namespace, &name).await? {
            if child.kind != kind {
                delete_child(ctx, &member, data_center, &child).await?;
            }
        }
    }
    if !ctx.members.has_namespace(data_center, &namespace) {
        let namespaces: Api<Namespace> = Api::all(member.clone());
        namespaces
            .patch(
                &namespace,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&children::namespace(cw)),
            )
            .await
            .map_err(failed)?;
        ctx.members.set_namespace(data_center, &namespace, true);
    }
    // Not forced first: a field another manager in the member owns shows
    // up as a conflict instead of being taken back. The replica count an
    // HorizontalPodAutoscaler there sets is left to it; anything else
    // someone changed in the copy is the operator's, and taken back.
    let mut result = apply_child(&member, &namespace, &name, &desired, false).await;
    if let Err(kube::Error::Api(status)) = &result
        && status.code == 409
    {
        let replicas_owned_elsewhere = status
            .details
            .iter()
            .flat_map(|d| &d.causes)
            .any(|c| c.field == ".spec.replicas");
        let desired = if replicas_owned_elsewhere {
            tracing::info!(
                data_center,
                workload = %name,
                "another controller in the member sets this copy's replicas; leaving them to it"
            );
            desired.without_replicas()
        } else {
            desired
        };
        result = apply_child(&member, &namespace, &name, &desired, true).await;
    }
    let applied = match result {
        Ok(applied) => applied,
        Err(error) => {
            // The namespace may be gone; the copy may be anything now.
            ctx.members.set_namespace(data_center, &namespace, false);
            ctx.members.forget_copy(&key);
            return Err(failed(error));
        }
    };
    if let Err(error) = dependencies::apply(&member, cw, &applied, needs).await {
        ctx.members.forget_copy(&key);
        return Err(failed(error));
    }
    let ready = children::ready_replicas(&applied);
    ctx.members
        .applied(key, kind, fingerprint, applied.generation(), ready);
    Ok(ready)
}

/// Applies `child` into `member` under the operator's field manager;
/// `force` takes over fields other managers own.
async fn apply_child(
    member: &Client,
    namespace: &str,
    name: &str,
    child: &Child,
    force: bool,
) -> Result<Child, kube::Error> {
    let mut params = PatchParams::apply(FIELD_MANAGER);
    params.force = force;
    match child {
        Child::Deployment(d) => Api::<Deployment>::namespaced(member.clone(), namespace)
            .patch(name, &params, &Patch::Apply(d))
            .await
            .map(Child::Deployment),
        Child::StatefulSet(s) => Api::<StatefulSet>::namespaced(member.clone(), namespace)
            .patch(name, &params, &Patch::Apply(s))
            .await
            .map(Child::StatefulSet),
        Child::Job(j) => Api::<Job>::namespaced(member.clone(), namespace)
            .patch(name, &params, &Patch::Apply(j))
            .await
            .map(Child::Job),
    }
}

/// Removes the workload's copies from every reachable member. A member that
/// is down is skipped: its data center's reconcile removes the copy when it
/// answers again.
async fn cleanup(cw: Arc<ComputeWorkload>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = cw.namespace().unwrap_or_default();
    let name = cw.name_any();
    let mut failures = Vec::new();
    for dc in ctx.data_centers.state() {
        let dc_name = dc.name_any();
        if reachability(&dc) != Reachability::Reachable {
            continue;
        }
        let member = match member_of(&ctx, &dc_name).await {
            Ok(m) => m,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        // Asked of the member itself: deletion is rare, and must not miss
        // a copy a watch has not delivered yet.
        match list_children(&member, &dc_name, Some((&namespace, &name))).await {
            Ok(copies) => {
                for child in copies {
                    if let Err(e) = delete_child(&ctx, &member, &dc_name, &child).await {
                        failures.push(e.to_string());
                    }
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if !failures.is_empty() {
        return Err(Error::Cleanup(failures.join("; ")));
    }
    ctx.decided().forget(&key_of(&cw));
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A victim preempted in two data centers by one decision loses both;
    /// one preempted twice in one data center loses the sum.
    #[test]
    fn what_preemptions_leave_a_victim_adds_up_across_data_centers() {
        let victim = WorkloadKey::new("ns", "v");
        let other = WorkloadKey::new("ns", "o");
        let snapshot = Snapshot {
            now_unix: 0,
            data_centers: Vec::new(),
            workloads: Vec::new(),
            current: BTreeMap::from([
                (
                    victim.clone(),
                    BTreeMap::from([("a".into(), 3), ("b".into(), 2)]),
                ),
                (other.clone(), BTreeMap::from([("a".into(), 1)])),
            ]),
        };
        let preempt = |who: &WorkloadKey, dc: &str, replicas| crate::engine::Preemption {
            victim: who.clone(),
            data_center: dc.into(),
            replicas,
        };
        let mut decision = Decision::scheduled(WorkloadKey::new("ns", "p"), BTreeMap::new());
        decision.preemptions = vec![
            preempt(&victim, "a", 1),
            preempt(&other, "a", 1),
            preempt(&victim, "b", 2),
            preempt(&victim, "a", 1),
        ];
        let left = victims_left(&snapshot, &decision);
        assert_eq!(
            left,
            [
                (
                    victim.clone(),
                    BTreeMap::from([("a".into(), 2), ("b".into(), 2)])
                ),
                (other, BTreeMap::new()),
                (victim.clone(), BTreeMap::from([("a".into(), 2)])),
                (victim, BTreeMap::from([("a".into(), 1)])),
            ]
        );
    }

    fn status(ready: i32, rule: &str, message: &str) -> ComputeWorkloadStatus {
        ComputeWorkloadStatus {
            ready_replicas: ready,
            explanation: vec![ExplanationEntry {
                data_center: "edge-east".into(),
                rule: rule.into(),
                message: message.into(),
            }],
            ..ComputeWorkloadStatus::default()
        }
    }

    /// A status explains the twenty nearest misses of a thousand data
    /// centers not chosen, and counts them all by rule.
    #[test]
    fn a_status_explains_the_nearest_misses_and_counts_every_rejection() {
        use crate::engine::{Rejection, Rule};
        let mut decision = Decision::scheduled(
            WorkloadKey::new("city", "p"),
            BTreeMap::from([("dc-0000".to_owned(), 1)]),
        );
        let rules = [Rule::Region, Rule::Capacity, Rule::Score, Rule::Tier];
        decision.rejections = (1..1000)
            .map(|i| Rejection {
                data_center: format!("dc-{i:04}"),
                rule: rules[i % rules.len()],
                message: format!("m{i}"),
                score: None,
            })
            .collect();
        // As the engine counts them, whether it explains each or not.
        for r in &decision.rejections {
            *decision.rejected_by_rule.entry(r.rule).or_insert(0) += 1;
        }
        let status = status_of(
            &ComputeWorkloadStatus::default(),
            &decision,
            &BTreeMap::new(),
            &[],
            1,
            Some(1),
        );
        // Score is the last rule checked: those passed every other one.
        assert_eq!(status.explanation.len(), 20);
        assert!(status.explanation.iter().all(|e| e.rule == "Score"));
        assert_eq!(status.explanation[0].data_center, "dc-0002");
        assert_eq!(status.explanation[19].data_center, "dc-0078");
        assert_eq!(
            status.rejected_by_rule,
            BTreeMap::from([
                ("Capacity".to_owned(), 250),
                ("Region".to_owned(), 249),
                ("Score".to_owned(), 250),
                ("Tier".to_owned(), 250),
            ])
        );
    }

    /// The eviction budget kept replicas on a lost data center that the
    /// engine had preempted room for elsewhere: those victims keep theirs.
    #[test]
    fn preemptions_for_replicas_the_budget_kept_back_are_dropped() {
        let engine = BTreeMap::from([("a".to_owned(), 2), ("x".to_owned(), 2)]);
        let mut decision = Decision::scheduled(WorkloadKey::new("city", "p"), engine.clone());
        decision.preemptions = vec![crate::engine::Preemption {
            victim: WorkloadKey::new("batch", "v"),
            data_center: "a".into(),
            replicas: 2,
        }];
        decision.preempted_room = BTreeMap::from([("a".to_owned(), 2)]);
        // The budget trimmed a by 2: nothing stands in preempted room there.
        decision.placement = BTreeMap::from([("x".to_owned(), 2)]);
        let mut trimmed = decision.clone();
        drop_unused_preemptions(&mut trimmed, &engine);
        assert!(trimmed.preemptions.is_empty() && trimmed.preempted_room.is_empty());
        // Trimmed by 1 only: the preempted room is still used.
        decision.placement = BTreeMap::from([("a".to_owned(), 1), ("x".to_owned(), 2)]);
        let mut kept = decision.clone();
        drop_unused_preemptions(&mut kept, &engine);
        assert_eq!(kept.preemptions.len(), 1);
    }

    #[test]
    fn a_status_keeps_the_latest_preemptions_oldest_first() {
        let entry = |replicas| PreemptedByEntry {
            time: Time(Timestamp::UNIX_EPOCH),
            preemptor: "city/emergency".into(),
            data_center: "edge-east".into(),
            replicas,
        };
        let mut kept: Vec<PreemptedByEntry> = (0..8).map(entry).collect();
        record_preemptions(&mut kept, &[entry(8), entry(9), entry(10), entry(11)]);
        let replicas: Vec<i32> = kept.iter().map(|e| e.replicas).collect();
        assert_eq!(replicas, (2..12).collect::<Vec<_>>());
        let mut none = Vec::new();
        record_preemptions(&mut none, &[]);
        assert!(none.is_empty());
    }

    #[test]
    fn only_full_placements_with_every_data_center_reachable_are_reused() {
        let decision = |outcome| Decision {
            outcome,
            ..Decision::scheduled(
                WorkloadKey::new("video", "cams"),
                BTreeMap::from([("edge-east".to_owned(), 2)]),
            )
        };
        let full = decision(Outcome::Scheduled);
        assert!(may_reuse(true, true, &full));
        // Rebalancing or weights may move it when others change.
        assert!(!may_reuse(false, true, &full));
        // A grace period is running: the decision changes with the clock.
        assert!(!may_reuse(true, false, &full));
        // Capacity freed elsewhere may place the rest.
        assert!(!may_reuse(
            true,
            true,
            &decision(Outcome::PartiallyScheduled)
        ));
        assert!(!may_reuse(true, true, &decision(Outcome::Unschedulable)));
        let mut preempting = decision(Outcome::Scheduled);
        preempting.preemptions.push(crate::engine::Preemption {
            victim: WorkloadKey::new("batch", "etl"),
            data_center: "edge-east".into(),
            replicas: 1,
        });
        assert!(!may_reuse(true, true, &preempting));
    }

    #[test]
    fn live_numbers_in_explanations_alone_do_not_rewrite_status() {
        let previous = status(1, "Score", "scored 310 against 400");
        assert!(!materially_different(
            &status(1, "Score", "scored 290 against 400"),
            &previous
        ));
        assert!(materially_different(
            &status(1, "Capacity", "free 0m CPU"),
            &previous
        ));
        assert!(materially_different(
            &status(2, "Score", "scored 310 against 400"),
            &previous
        ));
    }
}
