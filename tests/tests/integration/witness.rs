//! An independent witness (the real `civicgrid-witness` binary) against the
//! marketplace's log, on SQLite and PostgreSQL.
//!
//! The attacker is the platform operator. It holds the log's signing key, so
//! it can rebuild the log from scratch (a fresh database, a restored backup,
//! a rewritten table) and sign checkpoints of the new history: a regulator
//! holding only the log's key and no saved checkpoint sees nothing wrong.
//! The witness cosigned the old history, refuses the new one, and a
//! regulator who requires its cosignature finds the rewrite.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use civicgrid_cli::verify::{
    Finding, VerifyError, authed_client, verify_log, verify_log_witnessed,
};
use civicgrid_marketplace::audit::checkpoint::NoteVerifier;
use civicgrid_marketplace::audit::cosignature::CosignatureVerifier;
use civicgrid_marketplace::market::WitnessEndpoint;
use civicgrid_marketplace::metrics::WitnessLabel;
use civicgrid_marketplace::proto::{self, audit_client::AuditClient};
use civicgrid_tests::market::{Cast, Db, TEST_LOG_ORIGIN, TestMarket, authed, publish};
use tokio::io::AsyncBufReadExt as _;

const WITNESS_NAME: &str = "witness.civicgrid.test/w1";

pub(crate) struct RunningWitness {
    pub(crate) url: String,
    pub(crate) key: CosignatureVerifier,
    state_dir: std::path::PathBuf,
    _process: tokio::process::Child,
    _dir: tempfile::TempDir,
}

fn witness_binary() -> anyhow::Result<std::path::PathBuf> {
    let operator = std::env::var_os("CIVICGRID_OPERATOR_BIN")
        .context("CIVICGRID_OPERATOR_BIN is not set (scripts/test.sh sets it)")?;
    Ok(std::path::Path::new(&operator).with_file_name("civicgrid-witness"))
}

/// Starts a witness that trusts `log_key` and nothing else.
pub(crate) async fn start_witness(log_key: &str) -> anyhow::Result<RunningWitness> {
    let dir = tempfile::tempdir()?;
    let binary = witness_binary()?;
    let key_file = dir.path().join("witness.key");
    let printed = tokio::process::Command::new(&binary)
        .args(["key", "--name", WITNESS_NAME, "--key-file"])
        .arg(&key_file)
        .output()
        .await
        .with_context(|| format!("running {}", binary.display()))?;
    ensure!(printed.status.success(), "witness key: {printed:?}");
    let key: CosignatureVerifier = String::from_utf8(printed.stdout)?.trim().parse()?;
    let state_dir = dir.path().join("state");
    let mut process = tokio::process::Command::new(&binary)
        .args(["serve", "--name", WITNESS_NAME, "--key-file"])
        .arg(&key_file)
        .args(["--log", log_key, "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(process.stdout.take().context("stdout")?).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = line.strip_prefix("listening on ") {
                return Ok(address.to_owned());
            }
        }
        anyhow::bail!("the witness exited before listening")
    })
    .await??;
    Ok(RunningWitness {
        url: format!("http://{address}"),
        key,
        state_dir,
        _process: process,
        _dir: dir,
    })
}

async fn witnessed(market: &TestMarket, token: &str) -> Result<proto::Checkpoint, tonic::Status> {
    AuditClient::new(market.channel.clone())
        .get_checkpoint(authed(
            token,
            proto::GetCheckpointRequest { witnessed: true },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn head_size(market: &TestMarket, token: &str) -> anyhow::Result<i64> {
    Ok(AuditClient::new(market.channel.clone())
        .get_checkpoint(authed(token, proto::GetCheckpointRequest::default()))
        .await?
        .into_inner()
        .tree_size)
}

/// Waits until the witnessed checkpoint covers the log's whole head.
async fn wait_witnessed(market: &TestMarket, token: &str) -> anyhow::Result<proto::Checkpoint> {
    let size = head_size(market, token).await?;
    for _ in 0..200 {
        if let Ok(checkpoint) = witnessed(market, token).await
            && checkpoint.tree_size >= size
        {
            return Ok(checkpoint);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the log of {size} entries was not cosigned within 10 s")
}

pub(crate) fn endpoint(witness: &RunningWitness) -> anyhow::Result<WitnessEndpoint> {
    Ok(format!("{} {}", witness.key, witness.url).parse()?)
}

async fn a_rewritten_history_is_caught_by_the_witness(db: Db) -> anyhow::Result<()> {
    let honest = TestMarket::start(db).await?;
    let cast = Cast::create(&honest).await?;
    publish(&honest, &cast, "population").await?;
    let log_key: NoteVerifier = honest.market.verifier_key().parse()?;
    let witness = start_witness(&honest.market.verifier_key()).await?;
    let witnessing = honest.market.spawn_witnessing(
        vec![endpoint(&witness)?],
        Duration::from_millis(100),
        Duration::from_secs(300),
    );

    // The regulator's view: the checkpoint the witness cosigned, and every
    // entry hashing to it.
    let cosigned = wait_witnessed(&honest, &cast.regulator).await?;
    let mut audit = authed_client(honest.channel.clone(), &cast.regulator)?;
    let witnesses = [witness.key.clone()];
    let report =
        verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await?;
    assert_eq!(report.findings, vec![]);
    assert_eq!(report.checkpoint.size, cosigned.tree_size as u64);
    assert_eq!(report.cosigned_at.len(), 1);
    assert_eq!(report.cosigned_at[0].0, WITNESS_NAME);
    assert_eq!(report.unwitnessed, None, "the witness has seen every entry");
    // A key for another witness finds no cosignature by it.
    let stranger: CosignatureVerifier =
        civicgrid_marketplace::audit::cosignature::CosignatureSigner::new(
            WITNESS_NAME,
            civicgrid_marketplace::audit::checkpoint::SigningKey::from_bytes(&[5u8; 32]),
        )?
        .verifier();
    let refused =
        verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &[stranger]).await;
    assert!(
        matches!(&refused, Err(VerifyError::NotWitnessed { witness, .. }) if witness == WITNESS_NAME),
        "{refused:?}"
    );

    // 1. A row edited behind the server's back: its hash no longer matches
    //    the cosigned tree.
    let pool = honest.raw_pool().await?;
    let (original,): (Vec<u8>,) = sqlx::query_as("SELECT body FROM audit_entries WHERE idx = 2")
        .fetch_one(&pool)
        .await?;
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = 2")
        .bind(b"{\"kind\":\"nothing.happened\"}".to_vec())
        .execute(&pool)
        .await?;
    let report =
        verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await?;
    assert_eq!(report.findings, vec![Finding::Changed { index: 2 }]);
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = 2")
        .bind(original)
        .execute(&pool)
        .await?;
    pool.close().await;
    witnessing.abort();

    // 2. Witnessing stops while the log grows: however fresh the old
    //    cosignature, the verifier sees entries waiting for the witnesses,
    //    and the CLI fails once they have waited longer than allowed.
    publish(&honest, &cast, "population-2").await?;
    let stalled =
        verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await?;
    assert_eq!(stalled.findings, vec![]);
    assert_eq!(stalled.checkpoint.size, cosigned.tree_size as u64);
    let live = head_size(&honest, &cast.regulator).await? as u64;
    assert!(matches!(stalled.unwitnessed, Some((size, at)) if size == live && at > 0));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let operator = std::env::var_os("CIVICGRID_OPERATOR_BIN").context("CIVICGRID_OPERATOR_BIN")?;
    let verified =
        tokio::process::Command::new(std::path::Path::new(&operator).with_file_name("civicgrid"))
            .args([
                "--output",
                "json",
                "--server",
                &format!("http://{}", honest.address),
            ])
            .args(["--token", &cast.regulator, "audit", "verify", "--key"])
            .arg(honest.market.verifier_key())
            .args([
                "--witness-key",
                &witness.key.to_string(),
                "--max-witness-age-secs",
                "0",
            ])
            .output()
            .await?;
    assert_eq!(verified.status.code(), Some(2), "{verified:?}");
    let printed: serde_json::Value = serde_json::from_slice(&verified.stdout)?;
    assert!(
        printed["findings"]
            .as_str()
            .is_some_and(|f| f.contains(&format!(
                "entries {} to {live} have waited",
                cosigned.tree_size
            )) && f.contains("witnessing has stalled")),
        "{printed}"
    );

    // A server cannot pass a stall off as recent by dating the first
    // unwitnessed entry now: that entry is checked against the live tree.
    let pool = honest.raw_pool().await?;
    let waiting_index = cosigned.tree_size;
    let (original,): (Vec<u8>,) = sqlx::query_as("SELECT body FROM audit_entries WHERE idx = $1")
        .bind(waiting_index)
        .fetch_one(&pool)
        .await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = $2")
        .bind(format!("{{\"at_unix_ms\":{now_ms},\"kind\":\"tenant.nothing\"}}").into_bytes())
        .bind(waiting_index)
        .execute(&pool)
        .await?;
    let redated =
        verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await?;
    assert_eq!(
        redated.findings,
        vec![Finding::Changed {
            index: waiting_index as u64
        }]
    );
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = $2")
        .bind(original)
        .bind(waiting_index)
        .execute(&pool)
        .await?;
    pool.close().await;

    // 3. The operator starts the log over with the same key and origin: a
    //    fresh database, another history, at least as long.
    let rewritten = TestMarket::start(db).await?;
    let cast_b = Cast::create(&rewritten).await?;
    publish(&rewritten, &cast_b, "population").await?;
    publish(&rewritten, &cast_b, "population-2").await?;
    let rewritten_size = head_size(&rewritten, &cast_b.regulator).await?;
    ensure!(
        rewritten_size > cosigned.tree_size,
        "the rewritten log ({rewritten_size}) must outgrow the cosigned one ({})",
        cosigned.tree_size
    );
    let witnessing = rewritten.market.spawn_witnessing(
        vec![endpoint(&witness)?],
        Duration::from_millis(100),
        Duration::from_secs(300),
    );
    let failures = || {
        rewritten
            .market
            .metrics()
            .witness_failures
            .get_or_create(&WitnessLabel {
                witness: WITNESS_NAME.into(),
            })
            .get()
    };
    for _ in 0..200 {
        if failures() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    witnessing.abort();
    assert!(failures() >= 2, "the witness was asked twice and refused");
    // Its key alone vouches for the new history...
    let mut audit_b = authed_client(rewritten.channel.clone(), &cast_b.regulator)?;
    let plain = verify_log(&mut audit_b, &log_key, TEST_LOG_ORIGIN, None).await?;
    assert_eq!(plain.findings, vec![]);
    assert_eq!(plain.checkpoint.size, rewritten_size as u64);
    // ...but the witness cosigned none of it,
    let status = witnessed(&rewritten, &cast_b.regulator).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let refused =
        verify_log_witnessed(&mut audit_b, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await;
    assert!(
        matches!(&refused, Err(VerifyError::Rpc(status)) if status.code() == tonic::Code::FailedPrecondition),
        "{refused:?}"
    );
    // kept no evidence (a proof that fails is not signed, so it proves
    // nothing against the log: anyone could have sent it; only a fork
    // does, see the witness's own tests),
    assert!(!witness.state_dir.join("evidence").exists());
    // and the honest cosigned note, copied into the new database, does not
    // match the entries it now serves.
    let pool = rewritten.raw_pool().await?;
    sqlx::query(
        "INSERT INTO cosigned_checkpoints (tree_size, note, cosigned_at) VALUES ($1, $2, 0)",
    )
    .bind(cosigned.tree_size)
    .bind(&cosigned.note)
    .execute(&pool)
    .await?;
    pool.close().await;
    let report =
        verify_log_witnessed(&mut audit_b, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await?;
    // The live log does not extend it either.
    assert_eq!(
        report.findings,
        vec![
            Finding::Inconsistent {
                saved: cosigned.tree_size as u64
            },
            Finding::RootMismatch
        ]
    );

    // 4. The honest log, witnessed again, goes on: the witness cosigns its
    // next checkpoint because it extends the one it saw.
    let witnessing = honest.market.spawn_witnessing(
        vec![endpoint(&witness)?],
        Duration::from_millis(100),
        Duration::from_secs(1),
    );
    publish(&honest, &cast, "population-3").await?;
    let next = wait_witnessed(&honest, &cast.regulator).await?;
    assert!(next.tree_size > cosigned.tree_size);
    // With nothing logged, the same tree is cosigned again (here every
    // second), so a verifier can tell witnessing goes on.
    let first_time = verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &witnesses)
        .await?
        .cosigned_at[0]
        .1;
    let mut refreshed = None;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report =
            verify_log_witnessed(&mut audit, &log_key, TEST_LOG_ORIGIN, None, &witnesses).await?;
        if report.cosigned_at[0].1 > first_time {
            refreshed = Some(report);
            break;
        }
    }
    witnessing.abort();
    let refreshed = refreshed.expect("a newer cosignature of the same tree within 8 s");
    assert_eq!(refreshed.checkpoint.size, next.tree_size as u64);
    assert_eq!(refreshed.findings, vec![]);
    rewritten.stop().await;
    honest.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_rewritten_history_is_caught_by_the_witness_on_sqlite() -> anyhow::Result<()> {
    a_rewritten_history_is_caught_by_the_witness(Db::Sqlite).await
}

#[tokio::test]
async fn a_rewritten_history_is_caught_by_the_witness_on_postgres() -> anyhow::Result<()> {
    a_rewritten_history_is_caught_by_the_witness(Db::Postgres).await
}

#[test]
fn a_witness_is_configured_as_key_then_url() {
    let key = civicgrid_marketplace::audit::cosignature::CosignatureSigner::new(
        WITNESS_NAME,
        civicgrid_marketplace::audit::checkpoint::SigningKey::from_bytes(&[5u8; 32]),
    )
    .unwrap()
    .verifier();
    let parsed: WitnessEndpoint = format!("{key} https://witness.example/sub/")
        .parse()
        .unwrap();
    assert_eq!(parsed.url, "https://witness.example/sub");
    for bad in [
        format!("{key}"),
        format!("{key} ftp://witness.example"),
        "not-a-key https://witness.example".to_owned(),
    ] {
        let error = bad.parse::<WitnessEndpoint>().unwrap_err().to_string();
        assert!(error.starts_with("invalid witness:"), "{bad}: {error}");
    }
}
