//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it:
//! the holder renews the lease; a replica takes it over once it has not been
//! renewed for its duration. Writes are server-side applies that carry the
//! `resourceVersion` they read, so two replicas cannot both win a round.

use std::time::Duration;

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
    /// How often the holder renews, and others retry.
    pub retry: Duration,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the lease now.
    Held,
    /// Someone else holds a valid lease.
    Taken(String),
}

/// Waits until this replica holds the lease. API errors are logged and
/// retried.
pub async fn acquire(client: Client, lease: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    loop {
        match try_hold(&api, lease).await {
            Ok(Attempt::Held) => break,
            Ok(Attempt::Taken(holder)) => {
                tracing::debug!(%holder, "lease held by another replica");
            }
            Err(error) => tracing::warn!(%error, "leader election"),
        }
        tokio::time::sleep(lease.retry).await;
    }
    tracing::info!(identity = %lease.identity, lease = %lease.name, "became the leader");
}

/// Keeps renewing a held lease; returns when it is lost (taken over, or not
/// renewed within its duration). Runs in the caller's task, so it dies with
/// the controllers it guards.
pub async fn keep(client: Client, lease: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(lease.retry).await;
        match try_hold(&api, lease).await {
            Ok(Attempt::Held) => last_renewal = tokio::time::Instant::now(),
            Ok(Attempt::Taken(holder)) => {
                tracing::error!(%holder, "lost the lease to another replica");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the lease");
                if last_renewal.elapsed() >= lease.duration {
                    tracing::error!("could not renew the lease within its duration");
                    return;
                }
            }
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

async fn try_hold(api: &Api<Lease>, lease: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&lease.name).await?;
    let (version, spec) = match &current {
        Some(l) => (
            l.metadata.resource_version.clone(),
            l.spec.clone().unwrap_or_default(),
        ),
        None => (None, Default::default()),
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == lease.identity;
    let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
        let valid = i64::from(spec.lease_duration_seconds.unwrap_or(0));
        renewed.0.as_second() + valid < now.as_second()
    });
    if !ours && !holder.is_empty() && !expired {
        return Ok(Attempt::Taken(holder));
    }
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
