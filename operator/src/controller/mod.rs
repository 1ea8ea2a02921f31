//! The controllers behind `civicgrid-operator run`.
//!
//! # Expected flow
//! - **DataCenter**: connect to the member cluster named by the kubeconfig
//!   Secret, derive allocatable capacity from its nodes unless the spec
//!   declares it, and keep `Reachable` with a heartbeat. A member that stops
//!   answering gets `Reachable=False` from the first failed probe; its
//!   `lastTransitionTime` is when the engine's grace periods start.
//! - **ComputeWorkload**: add the finalizer, snapshot the pool from the
//!   caches, place this one workload against what every other workload holds
//!   ([`schedule_only`]) unless the last decision still holds (see
//!   `Reusable`), record the placement (`Scheduled`), server-side apply its
//!   Deployment, StatefulSet or Job with each data center's replica count
//!   into those members at once, delete copies in members no longer chosen,
//!   read readiness back, and write status, conditions and Events.
//!
//! # Guarantees
//! - Every write is a server-side apply under [`FIELD_MANAGER`]; running the
//!   reconcile again with the same inputs writes nothing new, so a restart at
//!   any point converges.
//! - Placement decisions are serialised in-process and remembered until the
//!   status that records them is visible in the cache, so two workloads
//!   reconciled at once never take the same capacity.
//! - A deleted workload's copies are removed from every reachable member
//!   before its finalizer is released; copies in a member that was down are
//!   removed when it answers again.
//!
//! [`schedule_only`]: crate::engine::schedule_only

pub mod children;
mod copies;
mod datacenter;
pub mod dependencies;
pub mod failover;
pub mod leader;
pub mod members;
pub mod metrics;
pub mod overrides;
pub mod pool;
mod workload;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt as _, watcher};
use kube::{Api, Client};

use crate::convert::FieldError;
use crate::crd::{ComputeWorkload, DataCenter, DependencyKind};
use crate::engine::model::WorkloadKey;

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "civicgrid-operator";
/// Holds a workload until its copies are gone from the member clusters.
pub const FINALIZER: &str = "civicgrid.io/member-cleanup";
/// DataCenter events a slow controller may fall behind the watch by before
/// the watch waits for it; data centers are few and change rarely.
const DATA_CENTER_EVENTS_BUFFERED: usize = 1024;

/// Tuning of the controllers.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often each member cluster is probed.
    pub heartbeat: Duration,
    /// Connect and request timeout against a member cluster.
    pub member_timeout: Duration,
    /// How long a member's client is used before its kubeconfig Secret is
    /// read again while probes succeed (see `members::Members::connect`).
    pub member_secret_reread: Duration,
    /// Probes in a row a reachable member must miss to be `Reachable=False`:
    /// one lost probe is not a lost data center.
    pub failure_threshold: u32,
    /// Probes in a row an unreachable member must answer to be
    /// `Reachable=True` again, so a flapping member does not take replicas.
    pub success_threshold: u32,
    /// Failover moves allowed across all workloads per minute (besides each
    /// workload's own `maxEvictionsPerMinute`); unlimited when `None`.
    pub pool_evictions_per_minute: Option<u32>,
    /// Whether `spec.dependencies` may name Secrets (the operator then
    /// reads and watches Secrets in every namespace).
    pub secret_dependencies: bool,
    /// How often a workload that is not yet fully available is looked at
    /// again even if no member reported a change (they are watched).
    pub readiness_poll: Duration,
    /// The name this replica reports in Events (e.g. its pod name).
    pub instance: String,
    /// Act only while holding this Lease (run several replicas; one acts).
    pub leader_election: Option<leader::LeaseConfig>,
    /// Where the controllers count and time their work.
    pub metrics: Arc<metrics::Metrics>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            member_timeout: Duration::from_secs(5),
            member_secret_reread: Duration::from_secs(60),
            failure_threshold: 3,
            success_threshold: 2,
            pool_evictions_per_minute: None,
            secret_dependencies: false,
            readiness_poll: Duration::from_secs(30),
            instance: std::env::var("POD_NAME").unwrap_or_else(|_| "civicgrid-operator".to_owned()),
            leader_election: None,
            metrics: Arc::default(),
        }
    }
}

/// A reconcile that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec cannot be used; nothing retries until it changes.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] FieldError),
    /// The control cluster's API failed.
    #[error("control cluster API: {0}")]
    Kube(#[source] kube::Error),
    /// A member cluster's API failed.
    #[error("member cluster of data center `{data_center}`: {source}")]
    Member {
        /// Whose member.
        data_center: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// A data center's kubeconfig Secret cannot be used.
    #[error("kubeconfig of data center `{data_center}`: {message}")]
    Kubeconfig {
        /// Whose kubeconfig.
        data_center: String,
        /// What is wrong.
        message: String,
    },
    /// Cleanup in member clusters did not finish.
    #[error("cleanup: {0}")]
    Cleanup(String),
    /// A step that does not fail in practice did (the placement task
    /// panicked; a fixed patch did not build).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// A stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Kube(_) => "control_api",
            Error::Member { .. } => "member_api",
            Error::Kubeconfig { .. } => "kubeconfig",
            Error::Cleanup(_) => "cleanup",
            Error::Internal(_) => "internal",
        }
    }
}

/// Placement decisions made by this process and not yet seen back in the
/// cache: the assume-cache of kube-scheduler, for the same reason.
#[derive(Default)]
struct Decided {
    placements: BTreeMap<WorkloadKey, BTreeMap<String, u32>>,
    /// The members each workload has looked in for copies no placement
    /// names (see [`LookedIn`]).
    looked_in: std::collections::HashMap<WorkloadKey, LookedIn>,
    /// The status this process last wrote for each workload (with its uid).
    statuses:
        std::collections::HashMap<WorkloadKey, (Option<String>, crate::crd::ComputeWorkloadStatus)>,
    /// Failover moves across the pool, once first needed (seeded from the
    /// workloads' statuses, so a restart or a new leader counts on).
    pool_evictions: Option<failover::PoolEvictions>,
    /// Preemptions of each workload not yet written into its status.
    preempted: std::collections::HashMap<WorkloadKey, Vec<crate::crd::PreemptedByEntry>>,
    /// The last decision for each workload that a later reconcile may reuse
    /// without asking the engine again (see [`Reusable`]).
    reusable: std::collections::HashMap<WorkloadKey, Reusable>,
    /// The pool decisions start from, kept between them.
    kept: Option<pool::KeptPool>,
    /// Workloads converted for the engine, with the uid and generation
    /// they were converted from.
    #[allow(clippy::type_complexity)]
    converted: std::collections::HashMap<
        WorkloadKey,
        (
            (Option<String>, Option<i64>),
            crate::engine::model::Workload,
        ),
    >,
}

/// A decision that stays right while nothing it was made from changes.
///
/// A workload placed in full, with the Score or AvailableCapacity strategy
/// and rebalancing off, keeps its replicas where they run while that stays
/// valid, whatever the rest of the pool does; what could make it invalid is
/// its own spec (the generation), a data center's spec, capacity or
/// reachability (the pool fingerprint), or another workload taking its
/// capacity (its placement in [`Decided::placements`] changes). Readiness
/// changes wake a workload several times per placement; asking the engine
/// each time would cost a snapshot of the whole pool for nothing.
#[derive(Clone)]
struct Reusable {
    uid: Option<String>,
    generation: Option<i64>,
    pool: u64,
    decision: crate::engine::Decision,
}

/// The members a workload's reconciles have looked in for copies of it that
/// no placement names, and found none (or removed them).
///
/// A member leaves the set whenever a reconcile sees it unreachable, sees a
/// copy there on purpose (placed there, or kept for make-before-break), or
/// fails to look or delete there: in each case a copy may be there later
/// without any placement naming it. So a member the placement just left, by
/// whatever path (a new decision, a failover, another workload's
/// preemption), is never in the set, and is looked in. Only the workload's
/// own reconciles read and write its set, and Kubernetes controllers never
/// run two reconciles of one object at once, so no order between a member's
/// return and a reconcile can leave a member marked clean that was not
/// looked in. (Until 2026-12-03 this was one flag per workload, reset when
/// any member came back; a reconcile straddling the return could set it
/// again and skip that member.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LookedIn(std::collections::BTreeSet<String>);

impl LookedIn {
    /// Whether `member` must be looked in for a copy no placement names.
    /// One that is unreachable, or holds a copy on purpose (`placed`), is
    /// not looked in now and is forgotten, so that it is looked in once
    /// neither holds.
    fn must_look(&mut self, member: &str, reachable: bool, placed: bool) -> bool {
        if !reachable || placed {
            self.0.remove(member);
            return false;
        }
        !self.0.contains(member)
    }

    /// The member was looked in, and holds no copy no placement names.
    fn clean(&mut self, member: &str) {
        self.0.insert(member.to_owned());
    }

    /// A copy may stay behind in the member without any placement naming it.
    fn forget(&mut self, member: &str) {
        self.0.remove(member);
    }

    /// Only data centers that exist now: one deleted and created again
    /// under the same name may be another cluster.
    fn keep_only(&mut self, members: impl IntoIterator<Item = String>) {
        let present: std::collections::BTreeSet<String> = members.into_iter().collect();
        self.0.retain(|member| present.contains(member));
    }
}

impl Decided {
    /// The placement this process last decided for `key`.
    fn placement(&self, key: &WorkloadKey) -> Option<&BTreeMap<String, u32>> {
        self.placements.get(key)
    }

    /// Where `cw` (under `key`) runs as far as this process knows: its
    /// latest decision, else the placement its status records.
    fn placement_or_status(
        &self,
        key: &WorkloadKey,
        cw: &ComputeWorkload,
    ) -> BTreeMap<String, u32> {
        self.placement(key)
            .cloned()
            .unwrap_or_else(|| crate::convert::current_placement(cw))
    }

    /// Remembers `placement` as decided for `key` (its own decision, or
    /// what a preemption left it).
    fn record_placement(&mut self, key: WorkloadKey, placement: BTreeMap<String, u32>) {
        if let Some(kept) = &mut self.kept {
            kept.pool().set_placement(&key, placement.clone());
        }
        self.placements.insert(key, placement);
    }

    /// Notes that `key` lost replicas to a preemption, for its own
    /// reconcile to record in its status and an Event.
    fn record_preempted(&mut self, key: WorkloadKey, entry: crate::crd::PreemptedByEntry) {
        self.preempted.entry(key).or_default().push(entry);
    }

    /// Preemptions of `key` not yet recorded in its status.
    fn pending_preemptions(&self, key: &WorkloadKey) -> Vec<crate::crd::PreemptedByEntry> {
        self.preempted.get(key).cloned().unwrap_or_default()
    }

    /// The first `n` pending preemptions of `key` are in its status now.
    fn recorded_preemptions(&mut self, key: &WorkloadKey, n: usize) {
        if let Some(pending) = self.preempted.get_mut(key) {
            pending.drain(..n.min(pending.len()));
            if pending.is_empty() {
                self.preempted.remove(key);
            }
        }
    }

    /// `key`'s workload converted for the engine, converted again only when
    /// its uid or generation (`seen`) changed; `None` when it does not
    /// convert.
    fn converted(
        &mut self,
        key: &WorkloadKey,
        seen: (Option<String>, Option<i64>),
        convert: impl FnOnce() -> Option<crate::engine::model::Workload>,
    ) -> Option<crate::engine::model::Workload> {
        match self.converted.get(key) {
            Some((was, workload)) if *was == seen => Some(workload.clone()),
            _ => convert().inspect(|workload| {
                self.converted.insert(key.clone(), (seen, workload.clone()));
            }),
        }
    }

    /// Keeps `decision` for reuse by `key`'s next reconcile, or forgets the
    /// last one (`None`).
    fn set_reusable(&mut self, key: WorkloadKey, decision: Option<Reusable>) {
        match decision {
            Some(reusable) => {
                self.reusable.insert(key, reusable);
            }
            None => {
                self.reusable.remove(&key);
            }
        }
    }

    /// The status this process last wrote for `key`, if written for the
    /// same object (`uid`).
    fn status(
        &self,
        key: &WorkloadKey,
        uid: Option<&String>,
    ) -> Option<crate::crd::ComputeWorkloadStatus> {
        self.statuses
            .get(key)
            .filter(|(written_for, _)| written_for.as_ref() == uid)
            .map(|(_, status)| status.clone())
    }

    fn record_status(
        &mut self,
        key: WorkloadKey,
        uid: Option<String>,
        status: crate::crd::ComputeWorkloadStatus,
    ) {
        self.statuses.insert(key, (uid, status));
    }

    /// Forgets everything about a deleted workload.
    fn forget(&mut self, key: &WorkloadKey) {
        if let Some(kept) = &mut self.kept {
            kept.pool().remove_workload(key);
        }
        self.placements.remove(key);
        self.converted.remove(key);
        self.reusable.remove(key);
        self.statuses.remove(key);
        self.looked_in.remove(key);
        self.preempted.remove(key);
    }

    fn looked_in(&self, key: &WorkloadKey) -> LookedIn {
        self.looked_in.get(key).cloned().unwrap_or_default()
    }

    fn record_looked_in(&mut self, key: WorkloadKey, looked_in: LookedIn) {
        self.looked_in.insert(key, looked_in);
    }

    /// The last decision for `key`, if it may be reused: the same workload
    /// (uid) at the same generation, the same pool, and its placement not
    /// changed since by anyone (a preemption).
    fn reusable_decision(
        &self,
        key: &WorkloadKey,
        uid: Option<String>,
        generation: Option<i64>,
        pool: u64,
    ) -> Option<crate::engine::Decision> {
        let last = self.reusable.get(key)?;
        (last.uid == uid
            && last.generation == generation
            && last.pool == pool
            && self.placements.get(key) == Some(&last.decision.placement))
        .then(|| last.decision.clone())
    }
}

/// Everything a reconcile needs; no globals.
pub struct Context {
    client: Client,
    config: Config,
    data_centers: Store<DataCenter>,
    workloads: Store<ComputeWorkload>,
    members: members::Members,
    recorder: Recorder,
    /// Serialises snapshot → schedule → remember.
    decided: Mutex<Decided>,
    /// Asks for every workload to be reconciled again (after a preemption).
    requeue: futures::channel::mpsc::UnboundedSender<()>,
    /// Data centers whose object changed since the kept pool last looked.
    data_centers_changed: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl Context {
    fn decided(&self) -> std::sync::MutexGuard<'_, Decided> {
        self.decided
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A future that ends the controllers when it completes.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future completed.
    Shutdown,
    /// Another replica holds the lease now; this one must not act.
    LostLease,
}

/// Runs both controllers against the control cluster `client` until
/// `shutdown` completes (or, with leader election, the lease is lost), then
/// lets running reconciles finish. With leader election it first waits to
/// become the leader, and gives the lease up on a clean shutdown.
pub async fn run(client: Client, config: Config, shutdown: Shutdown) -> Stopped {
    let shutdown = shutdown.shared();
    let lease = config.leader_election.clone();
    let metrics = config.metrics.clone();
    // A follower waiting for the lease is healthy and ready.
    metrics.set_ready();
    let mut held_since = tokio::time::Instant::now();
    if let Some(lease) = &lease {
        tokio::select! {
            since = leader::acquire(client.clone(), lease) => held_since = since,
            () = shutdown.clone() => return Stopped::Shutdown,
        }
    }
    metrics.leader.set(1);
    // Renewing the lease runs beside the controllers in this task; losing it
    // stops them.
    let (lost_tx, lost_rx) = futures::channel::oneshot::channel::<()>();
    let renewing = {
        let client = client.clone();
        let lease = lease.clone();
        async move {
            match &lease {
                Some(lease) => leader::keep(client, lease, held_since).await,
                None => futures::future::pending().await,
            }
            let _ = lost_tx.send(());
        }
    };
    // True only when the lease was lost; false when renewing was dropped
    // because the controllers stopped first.
    let lost: Pin<Box<dyn Future<Output = bool> + Send>> =
        Box::pin(async move { lost_rx.await.is_ok() });
    let lost = lost.shared();
    let stop: Shutdown =
        Box::pin(futures::future::select(shutdown.clone(), lost.clone()).map(|_| ()));
    let stop = stop.shared();
    let dc_api: Api<DataCenter> = Api::all(client.clone());
    let cw_api: Api<ComputeWorkload> = Api::all(client.clone());
    // One DataCenter watch feeds the store the workload reconcile reads and
    // both controllers' triggers, and each event reaches the triggers only
    // after the store holds it. With a watch per controller, a workload
    // woken by a data center going unreachable could read the store before
    // that change arrived, decide nothing moved, and sleep past the grace
    // period.
    let (dc_store, dc_writer) = reflector::store_shared(DATA_CENTER_EVENTS_BUFFERED);
    let (Some(dc_changed), Some(dc_changed_for_workloads)) =
        (dc_writer.subscribe(), dc_writer.subscribe())
    else {
        // Only a store made without `store_shared` has no subscribers.
        tracing::error!("the shared DataCenter store refused a subscriber");
        return Stopped::Shutdown;
    };
    // A data center's reconcile wakes on its spec, not on its status: its
    // own status writes would wake it at once, so a failing member's probes
    // would run back to back instead of a heartbeat apart (three missed
    // probes in a second, not three heartbeats), and every write would
    // cost one more probe. The heartbeat's requeue wakes it otherwise.
    let specs_seen = Mutex::new(std::collections::HashMap::new());
    let dc_spec_changed = dc_changed.filter(move |dc: &Arc<DataCenter>| {
        let seen = (
            dc.metadata.uid.clone(),
            dc.metadata.generation,
            dc.metadata.deletion_timestamp.is_some(),
        );
        let changed = specs_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(kube::ResourceExt::name_any(&**dc), seen.clone())
            != Some(seen);
        std::future::ready(changed)
    });
    let dc_controller = Controller::for_shared_stream(dc_spec_changed, dc_store);
    let cw_controller = Controller::new(cw_api, watcher::Config::default());
    let (requeue, requeued) = futures::channel::mpsc::unbounded();
    let (copy_changed, copies_changed) = futures::channel::mpsc::unbounded();
    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(config.instance.clone()),
            },
        ),
        members: members::Members::new(
            config.member_timeout,
            config.member_secret_reread,
            copy_changed,
        ),
        data_centers: dc_controller.store(),
        workloads: cw_controller.store(),
        client,
        config,
        decided: Mutex::new(Decided::default()),
        requeue,
        data_centers_changed: Arc::default(),
    });
    // A dependency changed in the control cluster: copy it again into the
    // members of every workload that names it. Metadata only: what changed
    // is read when the workload is reconciled.
    let client = &context.client;
    let workloads = &context.workloads;
    let cw_controller = cw_controller
        .watches_stream(
            dependency_changes::<ConfigMap>(client),
            dependents_of(workloads, DependencyKind::ConfigMap),
        )
        .watches_stream(
            dependency_changes::<Service>(client),
            dependents_of(workloads, DependencyKind::Service),
        )
        .watches_stream(
            dependency_changes::<ServiceAccount>(client),
            dependents_of(workloads, DependencyKind::ServiceAccount),
        );
    let cw_controller = if context.config.secret_dependencies {
        cw_controller.watches_stream(
            dependency_changes::<Secret>(client),
            dependents_of(workloads, DependencyKind::Secret),
        )
    } else {
        cw_controller
    };
    // Workloads are placed again when a data center changes in a way the
    // engine sees, not on every heartbeat.
    let every_workload = context.workloads.clone();
    let data_centers_changed = context.data_centers_changed.clone();
    let seen = Mutex::new(std::collections::HashMap::<String, u64>::new());
    let workloads = cw_controller
        .watches_shared_stream(dc_changed_for_workloads, move |dc: Arc<DataCenter>| {
            let fingerprint = pool::placement_fingerprint(&dc);
            let name = kube::ResourceExt::name_any(&*dc);
            data_centers_changed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.clone());
            let changed = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name, fingerprint)
                != Some(fingerprint);
            if changed {
                every_workload
                    .state()
                    .iter()
                    .map(|cw| ObjectRef::from_obj(&**cw))
                    .collect::<Vec<_>>()
            } else {
                Vec::new()
            }
        })
        // A preemption changes another workload's placement: look again at all.
        .reconcile_all_on(requeued)
        // A copy changed in a member (readiness, mostly): look at its workload.
        .reconcile_on(copies_changed)
        .graceful_shutdown_on(stop.clone())
        .run(workload::reconcile, workload::error_policy, context.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "workload reconcile");
            }
        });
    // A deleted data center's client goes with it (the reconciler does not
    // see deletions: data centers have no finalizer), and with it the old
    // credentials and the watches on its member.
    let forgetting = context.clone();
    let dc_watch = watcher(dc_api, watcher::Config::default())
        .default_backoff()
        .reflect_shared(dc_writer)
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::Delete(dc)) => {
                    forgetting.members.forget(&kube::ResourceExt::name_any(&dc));
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "DataCenter watch"),
            }
            std::future::ready(())
        });
    let control = context.client.clone();
    let data_centers = dc_controller
        .graceful_shutdown_on(stop)
        .run(datacenter::reconcile, datacenter::error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "data center reconcile");
            }
        });
    let controllers = Box::pin(async move {
        // The watch never ends on its own; the controllers end on shutdown.
        let both = futures::future::join(workloads, data_centers);
        futures::pin_mut!(dc_watch);
        futures::future::select(Box::pin(both), dc_watch).await;
    });
    match futures::future::select(controllers, Box::pin(renewing)).await {
        futures::future::Either::Left(((), _)) => {}
        // The lease is gone: the controllers are stopping; let them finish.
        futures::future::Either::Right(((), controllers)) => controllers.await,
    }
    metrics.leader.set(0);
    if lost.now_or_never() == Some(true) {
        return Stopped::LostLease;
    }
    if let Some(lease) = &lease {
        leader::release(control, lease).await;
    }
    Stopped::Shutdown
}

/// Every change to an object of kind `K` in any namespace, metadata only.
fn dependency_changes<K>(
    client: &Client,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    PartialObjectMeta<K>: serde::de::DeserializeOwned,
{
    watcher(
        Api::<PartialObjectMeta<K>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
}

/// Maps a changed object of `kind` to the workloads that depend on it.
fn dependents_of<K>(
    workloads: &Store<ComputeWorkload>,
    kind: DependencyKind,
) -> impl Fn(PartialObjectMeta<K>) -> Vec<ObjectRef<ComputeWorkload>> + Send + Sync + 'static
where
    K: Send + Sync + 'static,
{
    let workloads = workloads.clone();
    move |changed| dependents(&workloads, kind, &changed.metadata)
}

/// The workloads whose `spec.dependencies` name the object `meta` of `kind`.
fn dependents(
    workloads: &Store<ComputeWorkload>,
    kind: DependencyKind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Vec<ObjectRef<ComputeWorkload>> {
    workloads
        .state()
        .iter()
        .filter(|cw| {
            cw.metadata.namespace == meta.namespace
                && cw
                    .spec
                    .dependencies
                    .iter()
                    .any(|d| d.kind == kind && meta.name.as_deref() == Some(d.name.as_str()))
        })
        .map(|cw| ObjectRef::from_obj(&**cw))
        .collect()
}

/// `conditions` with `new` set: the transition time is kept when the status
/// does not change, so an unchanged world writes an unchanged status.
fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    if let Some(old) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        if old.status == new.status {
            new.last_transition_time = old.last_transition_time.clone();
        }
        *old = new;
    } else {
        conditions.push(new);
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

fn now_unix() -> i64 {
    Timestamp::now().as_second()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Decision;

    fn decided_with(placement: &[(&str, u32)]) -> (Decided, WorkloadKey) {
        let key = WorkloadKey::new("video", "cams");
        let placement: BTreeMap<String, u32> = placement
            .iter()
            .map(|&(dc, n)| (dc.to_owned(), n))
            .collect();
        let decision = Decision::scheduled(key.clone(), placement.clone());
        let mut decided = Decided::default();
        decided.placements.insert(key.clone(), placement);
        decided.reusable.insert(
            key.clone(),
            Reusable {
                uid: Some("uid-1".into()),
                generation: Some(3),
                pool: 42,
                decision,
            },
        );
        (decided, key)
    }

    #[test]
    fn a_decision_is_reused_only_while_nothing_it_was_made_from_changed() {
        let (mut decided, key) = decided_with(&[("edge-east", 2), ("municipal-core", 1)]);
        let uid = || Some("uid-1".to_owned());
        let reused = decided
            .reusable_decision(&key, uid(), Some(3), 42)
            .expect("nothing changed");
        assert_eq!(reused.placement.get("edge-east"), Some(&2));
        // A new generation of the spec, a changed pool, a workload made
        // again under the same name: ask the engine.
        assert!(
            decided
                .reusable_decision(&key, uid(), Some(4), 42)
                .is_none()
        );
        assert!(
            decided
                .reusable_decision(&key, uid(), Some(3), 43)
                .is_none()
        );
        assert!(
            decided
                .reusable_decision(&key, Some("uid-2".into()), Some(3), 42)
                .is_none()
        );
        // Another workload preempted one of its replicas.
        decided.placements.insert(
            key.clone(),
            BTreeMap::from([
                ("edge-east".to_owned(), 1),
                ("municipal-core".to_owned(), 1),
            ]),
        );
        assert!(
            decided
                .reusable_decision(&key, uid(), Some(3), 42)
                .is_none()
        );
    }

    #[test]
    fn a_member_seen_down_is_looked_in_again_whatever_the_order_of_its_return() {
        let mut looked = LookedIn::default();
        assert!(
            looked.must_look("edge-east", true, false),
            "a new process has looked nowhere"
        );
        looked.clean("edge-east");
        assert!(!looked.must_look("edge-east", true, false));

        // A reconcile sees the edge down (whether it began before or after
        // the edge answered again makes no difference): the next one looks.
        assert!(!looked.must_look("edge-east", false, false));
        assert!(looked.must_look("edge-east", true, false));
        looked.clean("edge-east");

        // A failed look or delete leaves it to be looked in again.
        looked.forget("edge-east");
        assert!(looked.must_look("edge-east", true, false));
        looked.clean("edge-east");

        // A data center deleted and created again under the same name.
        looked.keep_only(["municipal-core".to_owned()]);
        assert!(looked.must_look("edge-east", true, false));
    }

    #[test]
    fn a_member_the_placement_left_is_looked_in_even_if_it_was_clean_before() {
        let mut looked = LookedIn::default();
        looked.clean("partner-cloud");
        // Placed there later (or kept there for make-before-break) ...
        assert!(!looked.must_look("partner-cloud", true, true));
        // ... then left by any path, a preemption by another workload
        // included, which the workload's own previous placement does not show.
        assert!(looked.must_look("partner-cloud", true, false));
    }

    #[test]
    fn each_workload_has_its_own_record_of_where_it_looked() {
        let mut decided = Decided::default();
        let plates = WorkloadKey::new("traffic", "plates");
        let mut looked = decided.looked_in(&plates);
        looked.clean("edge-east");
        decided.record_looked_in(plates.clone(), looked.clone());
        assert_eq!(decided.looked_in(&plates), looked);
        assert_eq!(
            decided.looked_in(&WorkloadKey::new("traffic", "other")),
            LookedIn::default()
        );
    }
}
