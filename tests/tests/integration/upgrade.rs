//! The upgrade path (docs/install.md, "Upgrading"): a database as the
//! previous release left it, with its data, is migrated forward by the next
//! server to open it. Migrations only ever go forward; the previous
//! release's schema is made here by taking this release's additions (server
//! leases, runner reports, the log's identity) back out of a database full
//! of data, as that release would have had it.

use civicgrid_marketplace::market::Marketplace;
use civicgrid_marketplace::store::{Location, Store};
use civicgrid_tests::market::{Db, TEST_LOG_ORIGIN, TestMarket, ed25519_dalek_key};
use sqlx::Row as _;

use super::queries::{
    BY_DISTRICT, assert_sound, balance, contract, deposit, ledger, query, run, start_with,
};

/// The last migration of the release before scale-out: every migration
/// since (server leases, runner reports, cosigned checkpoints, quality
/// reports) is taken out,
/// so the test covers the longest upgrade path still supported.
const PREVIOUS_RELEASE: i64 = 20261207000014;

/// Takes the migrations after [`PREVIOUS_RELEASE`] back out.
async fn back_to_the_previous_release(market: &TestMarket, db: Db) -> anyhow::Result<()> {
    let pool = market.raw_pool().await?;
    for statement in [
        "DROP TABLE marketplace_replicas",
        "DROP TABLE log_identity",
        "DROP TABLE runner_reports",
        "DROP TABLE cosigned_checkpoints",
        "DROP TABLE quality_reports",
        "DROP TABLE product_data_versions",
        "DROP TABLE product_uploads",
        "ALTER TABLE products DROP COLUMN data_version",
        "ALTER TABLE queries DROP COLUMN replica_id",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    let removed = sqlx::query("DELETE FROM _sqlx_migrations WHERE version > $1")
        .bind(PREVIOUS_RELEASE)
        .execute(&pool)
        .await?
        .rows_affected();
    anyhow::ensure!(removed == 5, "{db:?}: took {removed} migrations back out");
    pool.close().await;
    Ok(())
}

/// A server of this release opens a database the previous release wrote
/// (organizations, a product, a contract, a deposit, a settled query, the
/// audit log, and a query its server was still running): the schema goes
/// forward, every record is still there and still adds up, and the old
/// query is given up once, at once on SQLite, and on PostgreSQL once it is
/// older than any query may run (its server might still be running it).
async fn a_database_from_the_previous_release_is_migrated_forward(db: Db) -> anyhow::Result<()> {
    let (mut old, cast) = start_with(db, |_| {}).await?;
    let contract_id = contract(&old, &cast, 0).await?;
    deposit(&old, 10_000).await?;
    let token = cast.consumer_analyst.clone();
    let settled = run(&old, &token, query(BY_DISTRICT, "k-before")).await?;
    let (database_url, data_dir) = (old.database_url.clone(), old.data_dir.clone());
    old.halt().await;
    back_to_the_previous_release(&old, db).await?;
    // The old server was running a query when it was stopped for the
    // upgrade, and stored it as that release did: with no server's id.
    let pool = old.raw_pool().await?;
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    sqlx::query(
        "INSERT INTO queries (id, consumer_organization_id, user_id, product_id, \
         provider_organization_id, contract_id, plan_id, idempotency_key, request_sha256, \
         sql_text, algorithm_sha256, period, state, error, error_code, currency, held_minor, \
         hold_open, created_at) VALUES ('q_old', 'acme', 'u', 'population', 'city-data', $1, \
         'per-query', 'k-old', 'x', '', '', '2026-12', 'running', '', 0, 'EUR', 250, 1, $2)",
    )
    .bind(&contract_id)
    .bind(now_ms)
    .execute(&pool)
    .await?;

    let location = match db {
        Db::Sqlite => Location::DataDir(data_dir.clone()),
        Db::Postgres => Location::Url(database_url),
    };
    let store = Store::open(&location).await?;
    let market = Marketplace::open(
        store,
        ed25519_dalek_key(),
        TEST_LOG_ORIGIN,
        data_dir.clone(),
    )
    .await?;
    let versions: Vec<i64> = sqlx::query("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&pool)
        .await?
        .iter()
        .map(|row| row.try_get("version"))
        .collect::<Result<_, _>>()?;
    assert!(
        versions.iter().filter(|v| **v > PREVIOUS_RELEASE).count() == 5,
        "{versions:?}"
    );
    assert_eq!(market.contract_index().len(), 1, "the contract is served");
    match db {
        // One server per file: the old one has stopped for certain.
        Db::Sqlite => assert_eq!(market.recover_interrupted().await?, 1),
        // Younger than any query may run, its old server may still be
        // running it (an upgrade without the full stop docs/install.md
        // asks for): it keeps its hold until then.
        Db::Postgres => {
            assert_eq!(market.recover_interrupted().await?, 0);
            sqlx::query("UPDATE queries SET created_at = 0 WHERE id = 'q_old'")
                .execute(&pool)
                .await?;
            assert_eq!(market.recover_interrupted().await?, 1);
        }
    }

    let upgraded = TestMarket::serve_beside(market, &old).await?;
    super::queries::attach_engine(&upgraded, |_| {}).await?;
    let after = balance(&upgraded, &cast.consumer_admin, "").await?;
    assert_eq!(
        (after.balance_minor, after.held_minor),
        (10_000 - settled.summary.charge_minor, 0)
    );
    assert_sound(&ledger(&upgraded).await?);
    // The key the old release answered replays the same query; a new one
    // runs and is charged.
    let replayed = run(&upgraded, &token, query(BY_DISTRICT, "k-before")).await?;
    assert!(replayed.summary.replayed, "{:?}", replayed.summary);
    assert_eq!(replayed.summary.query_id, settled.summary.query_id);
    let fresh = run(&upgraded, &token, query(BY_DISTRICT, "k-after")).await?;
    assert_eq!(fresh.summary.charge_minor, 250);
    // The log the old release wrote goes on: entries 0..n, no gap.
    let row = sqlx::query("SELECT COUNT(*) AS n, MAX(idx) AS last FROM audit_entries")
        .fetch_one(&pool)
        .await?;
    let (n, last): (i64, i64) = (row.try_get("n")?, row.try_get("last")?);
    assert_eq!(last, n - 1);
    let interrupted: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM audit_entries WHERE kind = 'query.interrupted'")
            .fetch_one(&pool)
            .await?
            .try_get("n")?;
    assert_eq!(interrupted, 1);
    pool.close().await;
    upgraded.stop().await;
    old.stop().await;
    Ok(())
}

civicgrid_tests::on_both_databases!(a_database_from_the_previous_release_is_migrated_forward);

/// Migrations only go forward: a migration a release shipped is never
/// edited (sqlx refuses to start on a database where an applied
/// migration's file changed), and a new one comes after every shipped one.
/// marketplace/migrations/released.sha256 lists what has shipped; append
/// to it when a release ships new migrations.
#[test]
fn shipped_migrations_are_never_edited_and_new_ones_come_after() -> anyhow::Result<()> {
    let migrations =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../marketplace/migrations");
    let checked = std::process::Command::new("sha256sum")
        .args(["--check", "--quiet", "released.sha256"])
        .current_dir(&migrations)
        .output()?;
    anyhow::ensure!(
        checked.status.success(),
        "a shipped migration changed: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let shipped: Vec<String> = std::fs::read_to_string(migrations.join("released.sha256"))?
        .lines()
        .filter_map(|line| line.split_once("  ").map(|(_, path)| path.to_owned()))
        .collect();
    let version = |path: &str| -> i64 {
        path.rsplit('/')
            .next()
            .and_then(|file| file.split('_').next())
            .and_then(|digits| digits.parse().ok())
            .unwrap_or(0)
    };
    let last_shipped = shipped.iter().map(|path| version(path)).max().unwrap_or(0);
    for backend in ["postgres", "sqlite"] {
        for entry in std::fs::read_dir(migrations.join(backend))? {
            let path = format!("{backend}/{}", entry?.file_name().to_string_lossy());
            anyhow::ensure!(
                shipped.contains(&path) || version(&path) > last_shipped,
                "{path} is new but comes before the last shipped migration ({last_shipped})"
            );
        }
    }
    Ok(())
}
