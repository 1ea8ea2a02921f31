//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it:
//! the holder renews the lease; a replica takes it over once it has seen no
//! renewal for the lease's duration. Writes are server-side applies that
//! carry the `resourceVersion` they read, so two replicas cannot both win a
//! round.
//!
//! Two rules keep a deposed leader from acting beside the new one:
//! - Expiry is judged by the follower's own monotonic clock, from when it
//!   last saw the Lease change, never by comparing the holder's `renewTime`
//!   with the follower's wall clock: clocks skewed by any amount between
//!   replicas cannot make a live lease look expired. (kube-lease-manager
//!   compares `renewTime` with the local wall clock and tolerates skew only
//!   up to its `grace`; that is why this rule is kept here.)
//! - The leader gives up after `renew_deadline` without a successful
//!   renewal, measured from when the successful attempt started; it is
//!   shorter than the lease's duration, so the old leader has stopped before
//!   any follower can take over.

use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::FIELD_MANAGER;

/// Which Lease to hold and how.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How long the holder keeps acting without a successful renewal;
    /// shorter than `duration`.
    pub renew_deadline: Duration,
    /// How often the holder renews, and others retry.
    pub retry: Duration,
}

impl LeaseConfig {
    /// Client-go's proportions for a lease of `duration`: act for at most
    /// two thirds of it without renewing, and try every fifth.
    pub fn with_duration(
        namespace: String,
        name: String,
        identity: String,
        duration: Duration,
    ) -> Self {
        Self {
            namespace,
            name,
            identity,
            duration,
            renew_deadline: duration * 2 / 3,
            retry: duration / 5,
        }
    }
}

/// The Lease as this replica last saw it, and since when by its own clock.
#[derive(Debug, Clone)]
struct Observed {
    version: Option<String>,
    since: Instant,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the lease now.
    Held,
    /// Someone else holds a valid lease.
    Taken(String),
}

/// Waits until this replica holds the lease; returns when the winning
/// attempt started (the lease is valid from no earlier). API errors are
/// logged and retried.
pub async fn acquire(client: Client, lease: &LeaseConfig) -> Instant {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let mut observed = None;
    let held_since = loop {
        let started = Instant::now();
        match try_hold(&api, lease, &mut observed).await {
            Ok(Attempt::Held) => break started,
            Ok(Attempt::Taken(holder)) => {
                tracing::debug!(%holder, "lease held by another replica");
            }
            Err(error) => tracing::warn!(%error, "leader election"),
        }
        tokio::time::sleep(lease.retry).await;
    };
    tracing::info!(identity = %lease.identity, lease = %lease.name, "became the leader");
    held_since
}

/// Keeps renewing a lease held since `held_since`; returns when it is lost:
/// taken over, or not renewed within `renew_deadline` (an attempt still
/// running then is abandoned). Runs in the caller's task, so it dies with
/// the controllers it guards.
pub async fn keep(client: Client, lease: &LeaseConfig, held_since: Instant) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let mut renewed = held_since;
    let mut observed = None;
    loop {
        tokio::time::sleep_until(
            (Instant::now() + lease.retry).min(renewed + lease.renew_deadline),
        )
        .await;
        let started = Instant::now();
        let deadline = renewed + lease.renew_deadline;
        match tokio::time::timeout_at(deadline, try_hold(&api, lease, &mut observed)).await {
            Ok(Ok(Attempt::Held)) => renewed = started,
            Ok(Ok(Attempt::Taken(holder))) => {
                tracing::error!(%holder, "lost the lease to another replica");
                return;
            }
            Ok(Err(error)) => tracing::warn!(%error, "renewing the lease"),
            Err(_) => tracing::warn!("renewing the lease took past the renew deadline"),
        }
        if renewed + lease.renew_deadline <= Instant::now() {
            tracing::error!(
                deadline = ?lease.renew_deadline,
                "could not renew the lease within the renew deadline; stopping"
            );
            return;
        }
    }
}

/// Gives the lease up (on graceful shutdown), so a follower need not wait
/// for it to expire.
pub async fn release(client: Client, lease: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let Ok(Some(current)) = api.get_opt(&lease.name).await else {
        return;
    };
    let spec = current.spec.unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(lease.identity.as_str()) {
        return;
    }
    let patch = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": lease.name, "resourceVersion": current.metadata.resource_version },
        "spec": { "holderIdentity": "", "leaseDurationSeconds": 1 },
    });
    if let Err(error) = api
        .patch(
            &lease.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        tracing::warn!(%error, "releasing the lease");
    }
}

/// Whether a lease another replica holds has expired: it has not changed
/// for its duration by this replica's own clock since it was first seen
/// as it is now.
fn expired(observed: &Observed, duration_seconds: i32, now: Instant) -> bool {
    let valid = Duration::from_secs(u64::try_from(duration_seconds).unwrap_or(0));
    now.saturating_duration_since(observed.since) >= valid
}

async fn try_hold(
    api: &Api<Lease>,
    lease: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<Attempt, kube::Error> {
    let current = api.get_opt(&lease.name).await?;
    let (version, spec) = match &current {
        Some(l) => (
            l.metadata.resource_version.clone(),
            l.spec.clone().unwrap_or_default(),
        ),
        None => (None, Default::default()),
    };
    let seen = match observed.take() {
        Some(o) if o.version == version => o,
        _ => Observed {
            version: version.clone(),
            since: Instant::now(),
        },
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == lease.identity;
    let gone = current.is_none()
        || holder.is_empty()
        || expired(
            &seen,
            spec.lease_duration_seconds.unwrap_or(0),
            Instant::now(),
        );
    *observed = Some(seen);
    if !ours && !gone {
        return Ok(Attempt::Taken(holder));
    }
    // For people and tools reading the Lease; no replica judges by it.
    let now = Timestamp::now();
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let acquired = if ours {
        spec.acquire_time.clone()
    } else {
        Some(MicroTime(now))
    };
    let spec = serde_json::json!({
            "holderIdentity": lease.identity,
            "leaseDurationSeconds": i32::try_from(lease.duration.as_secs()).unwrap_or(i32::MAX),
            "acquireTime": acquired,
            "renewTime": MicroTime(now),
            "leaseTransitions": transitions,
    });
    let written = match version {
        // The first replica creates it; a racing second gets a conflict.
        None => {
            let new: Lease = serde_json::from_value(serde_json::json!({
                "metadata": { "name": lease.name, "namespace": lease.namespace },
                "spec": spec,
            }))
            .map_err(kube::Error::SerdeError)?;
            api.create(&Default::default(), &new).await.map(|_| ())
        }
        Some(version) => {
            let patch = serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": lease.name, "resourceVersion": version },
                "spec": spec,
            });
            api.patch(
                &lease.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
        }
    };
    match written {
        Ok(_) => Ok(Attempt::Held),
        // Another replica wrote first: it won this round.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ok(Attempt::Taken("(racing)".to_owned()))
        }
        Err(e) => Err(e),
    }
}
