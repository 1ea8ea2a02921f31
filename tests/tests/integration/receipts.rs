//! Receipts, on SQLite and PostgreSQL: every query's answer carries its
//! audit entry, a signed checkpoint and the inclusion proof, which its
//! consumer checks offline with the log's key alone; consumers and
//! providers fetch receipts of their own entries, and only those.
//!
//! Attackers: a consumer editing a receipt to show a smaller charge or
//! another query; a rival asking for someone else's entries (or probing
//! which indexes exist); the operator editing the logged entry afterwards.

use std::time::Duration;

use civicgrid_cli::verify::{
    ReceiptError, entry_records_query, result_matches_entry, verify_receipt,
};
use civicgrid_marketplace::audit::checkpoint::{NoteSigner, NoteVerifier, SigningKey};
use civicgrid_marketplace::proto::{self, audit_client::AuditClient};
use civicgrid_tests::market::{Db, TEST_LOG_ORIGIN, authed};
use tonic::Code;

use super::queries::{BY_DISTRICT, contract, deposit, query, run, start_with};
use super::witness::{endpoint, start_witness};

async fn get_receipt(
    market: &civicgrid_tests::market::TestMarket,
    token: &str,
    index: i64,
    witnessed: bool,
) -> Result<proto::Receipt, tonic::Status> {
    AuditClient::new(market.channel.clone())
        .get_receipt(authed(
            token,
            proto::GetReceiptRequest {
                entry_index: index,
                witnessed,
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn a_querys_receipt_proves_what_ran_and_what_it_cost(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let key: NoteVerifier = market.market.verifier_key().parse()?;
    let answer = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-receipt"),
    )
    .await?;
    let summary = &answer.summary;
    let receipt = summary.receipt.clone().expect("a receipt with the answer");
    assert_eq!(receipt.entry_index, summary.audit_index);

    // Offline, with the key alone: the entry is in the signed tree, and it
    // records this query, the product's version, the charge and the very
    // bytes returned.
    let verified = verify_receipt(&receipt, &key, TEST_LOG_ORIGIN, &[])?;
    assert_eq!(verified.index, summary.audit_index as u64);
    assert_eq!(verified.entry["kind"], "query.completed");
    assert_eq!(verified.entry["tenant"], "acme");
    let details = &verified.entry["details"];
    assert_eq!(details["query"], summary.query_id.as_str());
    assert_eq!(details["product_version"], 1);
    assert_eq!(details["charge_minor"], summary.charge_minor);
    assert!(result_matches_entry(&receipt.entry, &answer.ipc));
    assert!(entry_records_query(
        &receipt.entry,
        receipt.entry_index,
        summary
    ));
    let mut other_query = summary.clone();
    other_query.query_id = "q-another".into();
    assert!(!entry_records_query(
        &receipt.entry,
        receipt.entry_index,
        &other_query
    ));
    assert!(!entry_records_query(
        &receipt.entry,
        receipt.entry_index - 1,
        summary
    ));
    let mut other_result = answer.ipc.clone();
    *other_result.last_mut().expect("a result") ^= 1;
    assert!(!result_matches_entry(&receipt.entry, &other_result));

    // A retry under the same key replays the outcome with a receipt of the
    // same entry, against a checkpoint at least as large.
    let replay = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-receipt"),
    )
    .await?;
    assert!(replay.summary.replayed);
    let replayed = replay.summary.receipt.expect("a receipt with the replay");
    assert_eq!(replayed.entry, receipt.entry);
    verify_receipt(&replayed, &key, TEST_LOG_ORIGIN, &[])?;
    assert!(result_matches_entry(&replayed.entry, &replay.ipc));

    // The consumer's edits fail: a smaller charge, another index, a
    // checkpoint signed by a key of its own.
    let edited = String::from_utf8(receipt.entry.clone())?.replacen(
        &format!("\"charge_minor\":{}", summary.charge_minor),
        "\"charge_minor\":0",
        1,
    );
    assert_ne!(
        edited.as_bytes(),
        receipt.entry.as_slice(),
        "the charge is in the entry"
    );
    let mut forged = receipt.clone();
    forged.entry = edited.into_bytes();
    assert!(matches!(
        verify_receipt(&forged, &key, TEST_LOG_ORIGIN, &[]),
        Err(ReceiptError::NotIncluded { .. })
    ));
    let mut moved = receipt.clone();
    moved.entry_index -= 1;
    assert!(matches!(
        verify_receipt(&moved, &key, TEST_LOG_ORIGIN, &[]),
        Err(ReceiptError::NotIncluded { .. })
    ));
    let own_key = NoteSigner::new(TEST_LOG_ORIGIN, SigningKey::from_bytes(&[1u8; 32]));
    let mut resigned = receipt.clone();
    let body = &receipt.checkpoint[..=receipt.checkpoint.find("\n\n").expect("a note")];
    let checkpoint = civicgrid_marketplace::audit::checkpoint::Checkpoint::parse_body(body)?;
    resigned.checkpoint = own_key.sign(&checkpoint);
    assert!(matches!(
        verify_receipt(&resigned, &key, TEST_LOG_ORIGIN, &[]),
        Err(ReceiptError::Note(_))
    ));

    // Later: the consumer and the product's provider fetch it; the rival
    // consumer and provider get NOT_FOUND, the same answer as for an index
    // that does not exist.
    for token in [
        &cast.consumer_admin,
        &cast.provider_analyst,
        &cast.regulator,
    ] {
        let fetched = get_receipt(&market, token, summary.audit_index, false).await?;
        assert_eq!(fetched.entry, receipt.entry);
        verify_receipt(&fetched, &key, TEST_LOG_ORIGIN, &[])?;
    }
    for (token, index) in [
        (&cast.rival_consumer_admin, summary.audit_index),
        (&cast.rival_provider_admin, summary.audit_index),
        (&cast.consumer_admin, 1_000_000),
        (&cast.consumer_admin, -1),
    ] {
        let status = get_receipt(&market, token, index, false).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (
                Code::NotFound,
                format!("audit entry \"{index}\" not found").as_str()
            )
        );
    }
    // The provider's own registration entries are not the consumer's.
    let status = get_receipt(&market, &cast.consumer_admin, 0, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Nothing is cosigned on a server without witnesses.
    let status = get_receipt(&market, &cast.consumer_admin, summary.audit_index, true)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The operator rewrites the logged entry: a receipt fetched now does
    // not verify, and the consumer's saved one still does.
    let pool = market.raw_pool().await?;
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = $2")
        .bind(forged.entry.clone())
        .bind(summary.audit_index)
        .execute(&pool)
        .await?;
    pool.close().await;
    let after = get_receipt(&market, &cast.consumer_admin, summary.audit_index, false).await?;
    assert!(matches!(
        verify_receipt(&after, &key, TEST_LOG_ORIGIN, &[]),
        Err(ReceiptError::NotIncluded { .. })
    ));
    verify_receipt(&receipt, &key, TEST_LOG_ORIGIN, &[])?;
    market.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_querys_receipt_proves_what_ran_and_what_it_cost_on_sqlite() -> anyhow::Result<()> {
    a_querys_receipt_proves_what_ran_and_what_it_cost(Db::Sqlite).await
}

#[tokio::test]
async fn a_querys_receipt_proves_what_ran_and_what_it_cost_on_postgres() -> anyhow::Result<()> {
    a_querys_receipt_proves_what_ran_and_what_it_cost(Db::Postgres).await
}

/// A witnessed receipt, and the `civicgrid receipt verify` command on it.
#[tokio::test]
async fn a_witnessed_receipt_verifies_with_the_cli_and_an_edited_one_exits_2() -> anyhow::Result<()>
{
    let (market, cast) = start_with(Db::Sqlite, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let witness = start_witness(&market.market.verifier_key()).await?;
    let witnessing = market.market.spawn_witnessing(
        vec![endpoint(&witness)?],
        Duration::from_millis(100),
        Duration::from_secs(300),
    );
    let answer = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-w")).await?;
    let index = answer.summary.audit_index;
    let mut receipt = None;
    for _ in 0..200 {
        match get_receipt(&market, &cast.consumer_analyst, index, true).await {
            Ok(found) => {
                receipt = Some(found);
                break;
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
    witnessing.abort();
    let receipt = receipt.expect("a witnessed receipt within 10 s");

    let folder = tempfile::tempdir()?;
    let saved = folder.path().join("receipt.json");
    std::fs::write(&saved, serde_json::to_string(&receipt)?)?;
    let result = folder.path().join("result.arrow");
    std::fs::write(&result, &answer.ipc)?;
    let operator = std::env::var_os("CIVICGRID_OPERATOR_BIN")
        .ok_or_else(|| anyhow::anyhow!("CIVICGRID_OPERATOR_BIN is not set"))?;
    let cli = std::path::Path::new(&operator).with_file_name("civicgrid");
    let verify = |file: &std::path::Path, witness_key: &str| {
        std::process::Command::new(&cli)
            .args(["--output", "json", "receipt", "verify"])
            .arg(file)
            .args([
                "--key",
                &market.market.verifier_key(),
                "--witness-key",
                witness_key,
            ])
            .arg("--result")
            .arg(&result)
            .output()
    };
    let checked = verify(&saved, &witness.key.to_string())?;
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout)?;
    assert_eq!(checked.status.code(), Some(0), "{checked:?}");
    assert_eq!(report["verified"], true);
    assert_eq!(report["entry_index"], index);
    assert_eq!(report["query"], answer.summary.query_id.as_str());
    assert_eq!(report["witnessed_by"], "witness.civicgrid.test/w1");

    let mut edited = receipt.clone();
    edited.entry = String::from_utf8(edited.entry)?
        .replacen("query.completed", "query.rejected", 1)
        .into_bytes();
    std::fs::write(&saved, serde_json::to_string(&edited)?)?;
    let checked = verify(&saved, &witness.key.to_string())?;
    assert_eq!(checked.status.code(), Some(2), "{checked:?}");
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout)?;
    assert_eq!(report["verified"], false);
    assert_eq!(
        report["finding"],
        format!("entry {index} is not in the signed tree of {} entries", {
            let body = &receipt.checkpoint[..=receipt.checkpoint.find("\n\n").expect("a note")];
            civicgrid_marketplace::audit::checkpoint::Checkpoint::parse_body(body)?.size
        })
    );
    market.stop().await;
    Ok(())
}
