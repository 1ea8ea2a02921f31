//! Leader election against a real API server, with the holder's clock
//! skewed: a live lease is never taken over however far its `renewTime` is
//! from the follower's clock, a dead one is taken over after its duration
//! whatever `renewTime` says, and a leader that cannot renew stops before
//! any follower may start.

use std::time::Duration;

use civicgrid_operator::controller::leader::{self, LeaseConfig};
use civicgrid_tests::controlplane::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::time::Instant;

const NAMESPACE: &str = "default";

fn config(name: &str, identity: &str) -> LeaseConfig {
    LeaseConfig::with_duration(
        NAMESPACE.into(),
        name.into(),
        identity.into(),
        Duration::from_secs(3),
    )
}

/// A lease held by `holder` whose clock is `skew` off the truth.
async fn held_with_skew(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    skew: SignedDuration,
) -> anyhow::Result<()> {
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 3,
            "renewTime": Timestamp::now().checked_add(skew)?.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        }
    }))?;
    api.create(&PostParams::default(), &lease).await?;
    Ok(())
}

/// What a live holder with a skewed clock does: renews every half second.
async fn renew_with_skew(api: Api<Lease>, name: String, skew: SignedDuration) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(renew) = Timestamp::now().checked_add(skew) else {
            return;
        };
        let patch = serde_json::json!({
            "spec": { "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string() }
        });
        let _ = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
}

async fn client(cluster: &Cluster) -> anyhow::Result<Client> {
    Ok(cluster.client().await?)
}

#[tokio::test]
async fn clock_skew_neither_steals_a_live_lease_nor_keeps_a_dead_one() -> anyhow::Result<()> {
    let cluster = Cluster::start("leader-skew").await?;
    let client = client(&cluster).await?;
    let api: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);

    // The holder's clock is an hour behind: its renewTime looks an hour
    // stale to the follower, but it renews, so the follower must wait.
    let behind = SignedDuration::from_hours(-1);
    held_with_skew(&api, "behind", "old-leader", behind).await?;
    let renewing = tokio::spawn(renew_with_skew(api.clone(), "behind".into(), behind));
    let follower = config("behind", "follower");
    let waited = tokio::time::timeout(
        Duration::from_secs(8),
        leader::acquire(client.clone(), &follower),
    )
    .await;
    assert!(waited.is_err(), "took a lease its holder kept renewing");
    // The holder dies: the lease is taken over within its duration (and a
    // retry) of the last renewal the follower saw.
    renewing.abort();
    let stopped = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        leader::acquire(client.clone(), &follower),
    )
    .await?;
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "taken over before its duration"
    );
    let lease = api.get("behind").await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("follower")
    );

    // The holder's clock is an hour ahead and it is dead: its renewTime
    // looks valid for another hour, but nobody renews it, so it goes after
    // its duration.
    let ahead = SignedDuration::from_hours(1);
    held_with_skew(&api, "ahead", "dead-leader", ahead).await?;
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        leader::acquire(client.clone(), &config("ahead", "follower")),
    )
    .await?;
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "taken over before its duration"
    );
    Ok(())
}

/// A leader cut off from the API server stops acting at its renew deadline,
/// before the lease's duration is over: no follower can have taken over
/// while it still acted.
#[tokio::test]
async fn a_leader_that_cannot_renew_stops_before_its_lease_runs_out() -> anyhow::Result<()> {
    let mut cluster = Cluster::start("leader-deadline").await?;
    let client = client(&cluster).await?;
    let lease = config("cut-off", "leader");
    let held_since = leader::acquire(client.clone(), &lease).await;
    cluster.stop_apiserver();
    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        leader::keep(client, &lease, held_since),
    )
    .await;
    assert!(stopped.is_ok(), "kept acting with no API server");
    let acted_for = held_since.elapsed();
    assert!(
        acted_for < lease.duration,
        "acted for {acted_for:?}, past the lease's {:?}",
        lease.duration
    );
    assert!(
        acted_for >= lease.renew_deadline,
        "gave up before the renew deadline: {acted_for:?}"
    );
    Ok(())
}
