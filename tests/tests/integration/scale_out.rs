//! Two marketplace servers on one PostgreSQL, as behind one load balancer
//! (docs/marketplace.md, "Several servers on one PostgreSQL").
//!
//! The attacks: a consumer whose contract was revoked on one server sends
//! its next query to the other; a consumer (or a retrying client) sends one
//! idempotency key to both at once to be served twice and charged once, or
//! charged twice; a server dies mid-query (SIGKILL) and its hold must
//! neither stay forever nor be charged, while a server that is alive but
//! slow must not have its queries taken away and charged twice.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use civicgrid_marketplace::proto::{
    self, audit_client::AuditClient, contracts_client::ContractsClient,
    identity_client::IdentityClient,
};
use civicgrid_tests::market::{Db, TEST_LOG_ORIGIN, TestMarket, approved_contract, authed};
use sqlx::Row as _;
use tokio::io::AsyncBufReadExt as _;
use tonic::Code;

use super::queries::{
    BY_DISTRICT, assert_sound, attach_engine, balance, contract, deposit, ledger,
    open_product_contract, query, run, run_on, start_with,
};

/// A query on `population-open` that runs until its budget is gone: a
/// billion-row cross join. At about 12 compute units a millisecond on an
/// idle 2-core machine, `units` set how long it runs.
fn slow_query(key: &str, units: i64) -> proto::RunQueryRequest {
    proto::RunQueryRequest {
        product_id: "population-open".into(),
        max_compute_units: units,
        ..query(
            "SELECT a.district, COUNT(*) AS n \
             FROM residents a CROSS JOIN residents b CROSS JOIN residents c \
             WHERE concat(a.district, b.district, c.district) = 'none' GROUP BY a.district",
            key,
        )
    }
}

/// Two servers on one PostgreSQL, both running queries.
async fn two_servers() -> anyhow::Result<(TestMarket, TestMarket, civicgrid_tests::market::Cast)> {
    let (a, cast) = start_with(Db::Postgres, |_| {}).await?;
    let b = a.start_replica().await?;
    attach_engine(&b, |_| {}).await?;
    Ok((a, b, cast))
}

/// The id of the user `token` signs in as.
async fn user_id(market: &TestMarket, token: &str) -> anyhow::Result<String> {
    Ok(IdentityClient::new(market.channel.clone())
        .who_am_i(authed(token, proto::WhoAmIRequest {}))
        .await?
        .into_inner()
        .user
        .context("who am I names the user")?
        .id)
}

/// A server on PostgreSQL with `population-open` (consumer-chosen, exact
/// budgets), acme's contract on it and 1,000,000 minor units deposited.
async fn open_product_market() -> anyhow::Result<(TestMarket, civicgrid_tests::market::Cast)> {
    let (market, cast) = start_with(Db::Postgres, |_| {}).await?;
    open_product_contract(&market, &cast).await?;
    deposit(&market, 1_000_000).await?;
    Ok((market, cast))
}

/// Waits until `check` holds, for at most a second: the promise for how
/// soon a change on one server reaches the others.
async fn within_a_second(
    what: &str,
    check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    eventually(what, Duration::from_secs(1), check).await
}

/// The ids of queries in `state`, with the replica running them.
async fn queries_in(market: &TestMarket, state: &str) -> anyhow::Result<Vec<(String, String)>> {
    let pool = market.raw_pool().await?;
    let rows = sqlx::query("SELECT id, replica_id FROM queries WHERE state = $1")
        .bind(state)
        .fetch_all(&pool)
        .await?;
    pool.close().await;
    rows.iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("replica_id")?)))
        .collect()
}

/// The audit entries of `kind` whose details name `query`.
async fn audited(market: &TestMarket, kind: &str, query_id: &str) -> anyhow::Result<usize> {
    let pool = market.raw_pool().await?;
    let rows = sqlx::query("SELECT body FROM audit_entries WHERE kind = $1")
        .bind(kind)
        .fetch_all(&pool)
        .await?;
    pool.close().await;
    let mut found = 0;
    for row in rows {
        let body: serde_json::Value = serde_json::from_slice(&row.try_get::<Vec<u8>, _>("body")?)?;
        if body["details"]["query"] == query_id {
            found += 1;
        }
    }
    Ok(found)
}

/// Waits, for at most `limit`, until `check` holds.
async fn eventually(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !check().await? {
        ensure!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A contract approved on one server is usable on the other within a
/// second; one revoked there, even behind every server's back, is refused on
/// the other at the next query; a role revoked on one is gone from the
/// other within a second.
#[tokio::test]
async fn contract_and_role_changes_reach_the_other_server() -> anyhow::Result<()> {
    let (a, b, cast) = two_servers().await?;
    deposit(&a, 10_000).await?;
    let token = &cast.consumer_analyst;

    let first = contract(&a, &cast, 0).await?;
    within_a_second("B hears of the contract A approved", async || {
        Ok(b.market.contract_index().len() == 1)
    })
    .await?;
    let answer = run(&b, token, query(BY_DISTRICT, "k-on-b")).await?;
    assert_eq!(answer.summary.charge_minor, 250);

    // Revoked with no notice to any server (as by a notice lost in a
    // reconnection): B's index still lists it, and the stored contract
    // refuses B's next query and corrects the index.
    let pool = a.raw_pool().await?;
    sqlx::query("UPDATE contracts SET state = 'revoked' WHERE id = $1")
        .bind(&first)
        .execute(&pool)
        .await?;
    assert_eq!(b.market.contract_index().len(), 1);
    let refused = run(&b, token, query(BY_DISTRICT, "k-after-revoke"))
        .await
        .err()
        .context("a revoked contract runs no query on any server")?;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(b.market.contract_index().len(), 0);
    let after = balance(&b, &cast.consumer_admin, "").await?;
    assert_eq!((after.balance_minor, after.held_minor), (9_750, 0));

    // Revoked through A: B's index follows within a second.
    let second = approved_contract(&a, &cast, "population").await?;
    within_a_second("B hears of the second contract", async || {
        Ok(b.market.contract_index().len() == 1)
    })
    .await?;
    ContractsClient::new(a.channel.clone())
        .revoke_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: second,
                reason: "ended".into(),
            },
        ))
        .await?;
    within_a_second("B hears of the revocation", async || {
        Ok(b.market.contract_index().is_empty())
    })
    .await?;

    // A role revoked on A is gone from B within a second.
    let analyst = user_id(&a, token).await?;
    assert!(
        b.market
            .access()
            .allows(&analyst, "acme", "query:run")
            .await?
    );
    IdentityClient::new(a.channel.clone())
        .revoke_role(authed(
            &a.admin_token,
            proto::RoleBindingRequest {
                user_id: analyst.clone(),
                role: "consumer-analyst".into(),
            },
        ))
        .await?;
    within_a_second("B forgets the revoked role", async || {
        Ok(!b
            .market
            .access()
            .allows(&analyst, "acme", "query:run")
            .await?)
    })
    .await?;
    let refused = run(&b, token, query(BY_DISTRICT, "k-no-role"))
        .await
        .err()
        .context("a revoked role runs no query on any server")?;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    pool.close().await;
    // Ready (`/readyz`) while it serves, following the others; not once
    // it has stopped.
    let ready = |metrics: &civicgrid_marketplace::metrics::Metrics| {
        metrics.ready.load(std::sync::atomic::Ordering::Relaxed)
    };
    let b_metrics = std::sync::Arc::clone(b.market.metrics());
    assert!(ready(&b_metrics));
    b.stop().await;
    assert!(!ready(&b_metrics));
    a.stop().await;
    Ok(())
}

/// One idempotency key sent to both servers at once runs once and is
/// charged once; many keys through both are each charged once; and both
/// servers append to one log and sign the same checkpoint of it.
#[tokio::test]
async fn queries_through_two_servers_are_charged_once_in_one_log() -> anyhow::Result<()> {
    let (a, b, cast) = two_servers().await?;
    contract(&a, &cast, 0).await?;
    deposit(&a, 100_000).await?;
    within_a_second("B hears of the contract", async || {
        Ok(b.market.contract_index().len() == 1)
    })
    .await?;
    let token = &cast.consumer_analyst;

    for round in 0..12 {
        let key = format!("k-both-{round}");
        let (via_a, via_b) = tokio::join!(
            run(&a, token, query(BY_DISTRICT, &key)),
            run(&b, token, query(BY_DISTRICT, &key)),
        );
        let mut answers = Vec::new();
        for answer in [via_a, via_b] {
            match answer {
                Ok(answer) => answers.push(answer.summary),
                // The other server was running it just then.
                Err(status) if status.code() == Code::Aborted => {}
                Err(status) => return Err(status.into()),
            }
        }
        ensure!(
            !answers.is_empty(),
            "round {round}: neither server answered"
        );
        assert_eq!(
            answers.iter().filter(|summary| !summary.replayed).count(),
            1,
            "round {round}: run once, any other answer a replay: {answers:?}"
        );
        assert!(
            answers.iter().all(|s| s.query_id == answers[0].query_id),
            "{answers:?}"
        );
    }
    let many = (0..16).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        run(server, token, query(BY_DISTRICT, &format!("k-many-{i}")))
    });
    for answer in futures::future::join_all(many).await {
        assert_eq!(answer?.summary.charge_minor, 250);
    }

    let settled = 12 + 16;
    for server in [&a, &b] {
        let seen = balance(server, &cast.consumer_admin, "").await?;
        assert_eq!(
            (seen.balance_minor, seen.held_minor),
            (100_000 - settled * 250, 0)
        );
        assert_sound(&ledger(server).await?);
    }
    assert_eq!(queries_in(&a, "completed").await?.len(), 28);

    // One linear log: entries 0..n with no gap or fork, and both servers
    // sign the same checkpoint of it (Ed25519 signatures are deterministic).
    let checkpoint = async |server: &TestMarket| {
        AuditClient::new(server.channel.clone())
            .get_checkpoint(authed(
                &cast.regulator,
                proto::GetCheckpointRequest::default(),
            ))
            .await
            .map(tonic::Response::into_inner)
    };
    let (from_a, from_b) = (checkpoint(&a).await?, checkpoint(&b).await?);
    assert_eq!(from_a.note, from_b.note);
    let pool = a.raw_pool().await?;
    let row =
        sqlx::query("SELECT COUNT(*) AS n, MIN(idx) AS first, MAX(idx) AS last FROM audit_entries")
            .fetch_one(&pool)
            .await?;
    let (n, first, last): (i64, i64, i64) = (
        row.try_get("n")?,
        row.try_get("first")?,
        row.try_get("last")?,
    );
    assert_eq!((first, last, n), (0, n - 1, from_a.tree_size));
    let query_entries: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM audit_entries WHERE kind = 'query.completed'")
            .fetch_one(&pool)
            .await?
            .try_get("n")?;
    assert_eq!(query_entries, 28);
    pool.close().await;
    b.stop().await;
    a.stop().await;
    Ok(())
}

/// A server starting beside a live one leaves the live one's running query
/// alone; a server that stalls beyond its lease has its query given up by
/// the other, and its settlement is then refused: nothing is charged, and
/// the retry runs afresh and is charged once.
#[tokio::test]
async fn a_stalled_servers_query_is_given_up_and_never_charged() -> anyhow::Result<()> {
    let (a, cast) = open_product_market().await?;
    let token = &cast.consumer_analyst;
    // Long enough to still run after a second server has started beside
    // it on a loaded machine.
    let slow = slow_query("k-stalled", 100_000);
    let stalled = async {
        eventually("the slow query runs", Duration::from_secs(30), async || {
            Ok(!queries_in(&a, "running").await?.is_empty())
        })
        .await?;
        let b = a.start_replica().await?;
        assert_eq!(b.market.recover_interrupted().await?, 0);
        let running = queries_in(&a, "running").await?;
        assert_eq!(
            running.len(),
            1,
            "a starting server leaves a live one's query running"
        );
        assert_eq!(running[0].1, a.market.replica_id());
        // A stalls: its lease looks lapsed until it renews (every 2 s), and
        // B, sweeping, gives its query up.
        let pool = a.raw_pool().await?;
        eventually(
            "B gives A's query up",
            Duration::from_secs(30),
            async || {
                sqlx::query("UPDATE marketplace_replicas SET seen_at = 0 WHERE id = $1")
                    .bind(a.market.replica_id())
                    .execute(&pool)
                    .await?;
                b.market.recover_interrupted().await?;
                Ok(queries_in(&a, "running").await?.is_empty())
            },
        )
        .await?;
        pool.close().await;
        anyhow::Ok(b)
    };
    let (ran, b) = tokio::join!(run(&a, token, slow.clone()), stalled);
    let b = b?;
    let refused = ran
        .err()
        .context("a query given up while it ran is not settled")?;
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("given up as interrupted"),
        "{refused:?}"
    );
    let after = balance(&a, &cast.consumer_admin, "").await?;
    assert_eq!((after.balance_minor, after.held_minor), (1_000_000, 0));
    assert_sound(&ledger(&a).await?);
    assert!(queries_in(&a, "completed").await?.is_empty());
    let retried = run(&a, token, slow).await;
    let status = retried.err().context("the retry runs out of its budget")?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let after = balance(&a, &cast.consumer_admin, "").await?;
    assert_eq!(
        (after.balance_minor, after.held_minor),
        (1_000_000 - 100_000, 0)
    );
    assert_sound(&ledger(&a).await?);
    b.stop().await;
    a.stop().await;
    Ok(())
}

/// A server process killed (SIGKILL) mid-query: its query stays running,
/// held and uncharged, while its lease may still be live (a retry is told
/// to wait), then the other server gives it up once, audited; the retry
/// runs afresh and is charged once.
#[tokio::test]
async fn a_killed_servers_query_is_given_up_once_by_the_other() -> anyhow::Result<()> {
    let (a, cast) = open_product_market().await?;
    let token = &cast.consumer_analyst;

    // The other server is the real binary, in a process of its own, over
    // the same database, products, key and origin.
    let scratch = tempfile::tempdir()?;
    // The sandbox's compiled modules, shared with this process's engine.
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    std::os::unix::fs::symlink(&cache, a.data_dir.join("module-cache"))?;
    let key_file = scratch.path().join("audit-signing.key");
    std::fs::write(
        &key_file,
        civicgrid_tests::market::ed25519_dalek_key().to_bytes(),
    )?;
    let operator = std::env::var_os("CIVICGRID_OPERATOR_BIN")
        .context("CIVICGRID_OPERATOR_BIN is not set (scripts/test.sh sets it)")?;
    let binary = std::path::Path::new(&operator).with_file_name("civicgrid-marketplace");
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    // The password apart from the URL, in PGPASSWORD, as the chart gives
    // it to the servers of a bundled PostgreSQL.
    let (scheme, rest) = a.database_url.split_once("://").context("a URL")?;
    let (user_info, place) = rest.split_once('@').context("a URL with a user")?;
    let (user, password) = user_info.split_once(':').context("a URL with a password")?;
    let without_password = format!("{scheme}://{user}@{place}");
    let mut killed = tokio::process::Command::new(&binary)
        .arg("serve")
        .args(["--database-url", &without_password])
        .env("PGPASSWORD", password)
        .arg("--data-dir")
        .arg(&a.data_dir)
        .arg("--signing-key-file")
        .arg(&key_file)
        .args(["--log-origin", TEST_LOG_ORIGIN, "--listen", "127.0.0.1:0"])
        .arg("--sql-guest")
        .arg(&guest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut lines = tokio::io::BufReader::new(killed.stdout.take().context("stdout")?).lines();
    let address = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = line.strip_prefix("listening on ") {
                return anyhow::Ok(address.to_owned());
            }
        }
        anyhow::bail!("the server exited before it listened")
    })
    .await
    .context("the second server listens within 3 minutes")??;
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let slow = slow_query("k-killed", 40_000);
    let lost = run_on(&channel, token, slow.clone());
    tokio::pin!(lost);
    let running_there = eventually(
        "the slow query runs there",
        Duration::from_secs(30),
        async || {
            Ok(queries_in(&a, "running")
                .await?
                .iter()
                .any(|(_, replica)| replica != a.market.replica_id()))
        },
    );
    tokio::select! {
        answer = &mut lost => anyhow::bail!(
            "the query ended before the server could be killed: {:?}",
            answer.map(|answer| answer.summary)
        ),
        running = running_there => running?,
    }
    killed.start_kill()?;
    killed.wait().await?;
    ensure!(lost.await.is_err(), "the killed server answered");
    let (query_id, _) = queries_in(&a, "running")
        .await?
        .pop()
        .context("the killed server's query is left running")?;
    let held = balance(&a, &cast.consumer_admin, "").await?;
    assert_eq!(held.balance_minor, 1_000_000);
    assert!(held.held_minor > 0, "{held:?}");

    // Given up once the killed server's lease lapses (10 s, swept every
    // 2 s), and not before the retry is told to wait.
    let started = Instant::now();
    let mut told_to_wait = 0;
    loop {
        match run(&a, token, slow.clone()).await {
            Err(status) if status.code() == Code::Aborted => told_to_wait += 1,
            Err(status) if status.code() == Code::ResourceExhausted => break,
            other => anyhow::bail!("unexpected answer to the retry: {:?}", other.err()),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(40),
            "the killed server's query was not given up within 40 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(told_to_wait > 0, "the retry waited for the lease to lapse");
    assert_eq!(audited(&a, "query.interrupted", &query_id).await?, 1);
    let after = balance(&a, &cast.consumer_admin, "").await?;
    assert_eq!(
        (after.balance_minor, after.held_minor),
        (1_000_000 - 40_000, 0)
    );
    assert_sound(&ledger(&a).await?);
    let pool = a.raw_pool().await?;
    let replicas: i64 = sqlx::query("SELECT COUNT(*) AS n FROM marketplace_replicas")
        .fetch_one(&pool)
        .await?
        .try_get("n")?;
    assert_eq!(
        replicas, 1,
        "the killed server is forgotten, the live one stays"
    );
    pool.close().await;
    a.stop().await;
    Ok(())
}

/// A server given another signing key or origin than the log's refuses to
/// start, naming both, rather than sign checkpoints no verifier accepts.
#[tokio::test]
async fn a_server_with_another_log_key_refuses_to_start() -> anyhow::Result<()> {
    use civicgrid_marketplace::market::Marketplace;
    use civicgrid_marketplace::store::{Location, Store};
    let a = TestMarket::start(Db::Postgres).await?;
    let open = async |key: [u8; 32], origin: &str| {
        let store = Store::open(&Location::Url(a.database_url.clone())).await?;
        Marketplace::open(
            store,
            civicgrid_marketplace::audit::checkpoint::SigningKey::from_bytes(&key),
            origin,
            a.data_dir.clone(),
        )
        .await
        .map(|_| ())
        .map_err(anyhow::Error::from)
    };
    let other_key = open([7; 32], TEST_LOG_ORIGIN)
        .await
        .err()
        .context("another key is refused")?
        .to_string();
    assert!(
        other_key.contains("every server on one database must read the same --signing-key-file")
            && other_key.contains(&a.market.verifier_key()),
        "{other_key}"
    );
    let other_origin = open([42; 32], "elsewhere.example")
        .await
        .err()
        .context("another origin is refused")?
        .to_string();
    assert!(
        other_origin.contains("\"elsewhere.example\"") && other_origin.contains(TEST_LOG_ORIGIN),
        "{other_origin}"
    );
    open([42; 32], TEST_LOG_ORIGIN).await?;
    a.stop().await;
    Ok(())
}

/// The listening connections are cut (a failover, a proxy's idle timeout):
/// a role revoked while no server listened still reaches the other server
/// within a few seconds, by the full read that follows every reconnection.
#[tokio::test]
async fn a_change_made_while_nobody_listened_still_reaches_the_other_server() -> anyhow::Result<()>
{
    let (a, cast) = start_with(Db::Postgres, |_| {}).await?;
    let b = a.start_replica().await?;
    let analyst = user_id(&a, &cast.consumer_analyst).await?;
    let pool = a.raw_pool().await?;
    let listeners = async || -> anyhow::Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'civicgrid-changes'",
        )
        .fetch_one(&pool)
        .await?
        .try_get("n")?)
    };
    eventually("both servers listen", Duration::from_secs(10), async || {
        Ok(listeners().await? == 2)
    })
    .await?;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'civicgrid-changes'",
    )
    .execute(&pool)
    .await?;
    IdentityClient::new(a.channel.clone())
        .revoke_role(authed(
            &a.admin_token,
            proto::RoleBindingRequest {
                user_id: analyst.clone(),
                role: "consumer-analyst".into(),
            },
        ))
        .await?;
    eventually(
        "B forgets a role revoked while it did not listen",
        Duration::from_secs(5),
        async || {
            Ok(!b
                .market
                .access()
                .allows(&analyst, "acme", "query:run")
                .await?)
        },
    )
    .await?;
    eventually("both listen again", Duration::from_secs(10), async || {
        Ok(listeners().await? == 2)
    })
    .await?;
    pool.close().await;
    b.stop().await;
    a.stop().await;
    Ok(())
}

/// An approval on one server and a rejection on the other at once: one
/// wins, the other is refused, and both servers' indexes agree with the
/// stored contract.
#[tokio::test]
async fn racing_decisions_on_two_servers_leave_one_outcome() -> anyhow::Result<()> {
    let (a, cast) = start_with(Db::Postgres, |_| {}).await?;
    let b = a.start_replica().await?;
    civicgrid_tests::market::publish(&a, &cast, "population").await?;
    for round in 0..5 {
        let contract_id = ContractsClient::new(a.channel.clone())
            .request_contract(authed(
                &cast.consumer_admin,
                civicgrid_tests::market::contract_request("population"),
            ))
            .await?
            .into_inner()
            .id;
        let action = || {
            authed(
                &cast.provider_admin,
                proto::ContractAction {
                    contract_id: contract_id.clone(),
                    reason: format!("round {round}"),
                },
            )
        };
        let (mut via_a, mut via_b) = (
            ContractsClient::new(a.channel.clone()),
            ContractsClient::new(b.channel.clone()),
        );
        let (approved, rejected) = tokio::join!(
            via_a.approve_contract(action()),
            via_b.reject_contract(action()),
        );
        let stored = ContractsClient::new(a.channel.clone())
            .get_contract(action())
            .await?
            .into_inner();
        match (approved, rejected) {
            (Ok(_), Err(refused)) => {
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert_eq!(stored.state, proto::ContractState::Active as i32);
            }
            (Err(refused), Ok(_)) => {
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert_eq!(stored.state, proto::ContractState::Rejected as i32);
            }
            other => anyhow::bail!("round {round}: both or neither decided: {other:?}"),
        }
        let pool = a.raw_pool().await?;
        let stored_active: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM contracts WHERE state = 'active'")
                .fetch_one(&pool)
                .await?
                .try_get("n")?;
        pool.close().await;
        let stored_active = usize::try_from(stored_active)?;
        within_a_second("both indexes agree with the store", async || {
            Ok(a.market.contract_index().len() == stored_active
                && b.market.contract_index().len() == stored_active)
        })
        .await?;
    }
    b.stop().await;
    a.stop().await;
    Ok(())
}
