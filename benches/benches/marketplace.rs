//! Marketplace figures, each with a baseline measured in the same process:
//!
//! - authorization decisions (casbin roles + the contract index) with 10,000
//!   users and 100,000 active contracts, against casbin holding every
//!   contract as a rule (what "let casbin scan contracts" costs);
//! - audit appends per second on SQLite with group commit (one transaction per
//!   batch, durable: WAL with synchronous=FULL), against one transaction per
//!   entry; on PostgreSQL too when `CIVICGRID_TEST_POSTGRES_URL` is set;
//! - inclusion and consistency proof time from the store at the log size the
//!   append run reached, and a query's receipt (head, signed checkpoint,
//!   inclusion proof) against the inclusion proof alone.
//!
//! Run: `cargo bench -p civicgrid-benches --bench marketplace` (add
//! `-- --entries N` to change the log size; default 200,000).

use std::time::{Duration, Instant};

use casbin::{CoreApi as _, DefaultModel, Enforcer, MemoryAdapter, MgmtApi as _};
use civicgrid_marketplace::access::Access;
use civicgrid_marketplace::audit::checkpoint::{Checkpoint, NoteSigner, SigningKey};
use civicgrid_marketplace::audit::log::{self, Event};
use civicgrid_marketplace::contracts::{Check, ContractIndex};
use civicgrid_marketplace::contracts::{Contract, ContractState, OperationKind, OperationQuestion};
use civicgrid_marketplace::spec::AllowedOperations;
use civicgrid_marketplace::store::{Location, Store};

const USERS: usize = 10_000;
const CONTRACTS: usize = 100_000;
const CONSUMERS: usize = 1_000;
const PRODUCTS: usize = 500;
const DECISIONS: usize = 100_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A deterministic pseudo-random sequence (no rand dependency in the bench).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % bound
    }
}

async fn authorization(store: &Store) -> anyhow::Result<()> {
    println!("== authorization: {USERS} users, {CONTRACTS} active contracts");
    let mut transaction = store.begin().await?;
    for user in 0..USERS {
        Access::store_binding(
            &mut transaction,
            &format!("usr-{user}"),
            "consumer-analyst",
            &format!("org-{}", user % CONSUMERS),
            true,
        )
        .await?;
    }
    let access = Access::load(&mut transaction).await?;
    transaction.commit().await?;
    let index = ContractIndex::default();
    let far_future = i64::MAX / 2;
    for contract in 0..CONTRACTS {
        index.update(&Contract {
            id: format!("ctr-{contract}"),
            product_id: format!("prd-{}", contract % PRODUCTS),
            consumer_organization_id: format!("org-{}", (contract / PRODUCTS) % CONSUMERS),
            provider_organization_id: "city".into(),
            plan_id: "basic".into(),
            operations: AllowedOperations {
                aggregate_sql: true,
                ..Default::default()
            },
            monthly_query_quota: 0,
            state: ContractState::Active,
            requested_at_unix_ms: 0,
            decided_at_unix_ms: 0,
            expires_at_unix_ms: far_future,
            purpose: String::new(),
            reason: String::new(),
            duration_days: 1,
        });
    }
    assert_eq!(index.len(), CONTRACTS);

    // Twice over the same request sequence: first with casbin's decision
    // cache cold (each user's first decision evaluates the model), then warm,
    // the steady state of a running server.
    let mut warm_p99 = Duration::ZERO;
    for pass in ["cold", "warm"] {
        let mut rng = Lcg(7);
        let mut latencies = Vec::with_capacity(DECISIONS);
        let mut allowed = 0usize;
        for _ in 0..DECISIONS {
            let user = rng.next(USERS);
            let org = format!("org-{}", user % CONSUMERS);
            let request = OperationQuestion {
                product_id: format!("prd-{}", rng.next(PRODUCTS)),
                operation: Some(OperationKind::AggregateSql),
                ..Default::default()
            };
            let user = format!("usr-{user}");
            let started = Instant::now();
            let decision = access.allows(&user, &org, "contract:check").await?
                && matches!(index.check(&org, &request, 0), Check::Allowed { .. });
            latencies.push(started.elapsed());
            allowed += usize::from(decision);
        }
        latencies.sort_unstable();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        println!(
            "roles in casbin + contract index, {pass} cache: p50 {p50:?}  p99 {p99:?}  ({allowed} of {DECISIONS} allowed)"
        );
        warm_p99 = p99;
    }

    // Baseline: every contract a casbin rule, the matcher scanning them.
    let model = DefaultModel::from_str(
        "[request_definition]\nr = sub, dom, obj, act\n[policy_definition]\np = sub, dom, obj, act\n\
         [role_definition]\ng = _, _, _\n[policy_effect]\ne = some(where (p.eft == allow))\n\
         [matchers]\nm = g(r.sub, p.sub, r.dom) && r.dom == p.dom && r.obj == p.obj && r.act == p.act\n",
    )
    .await?;
    let mut enforcer = Enforcer::new(model, MemoryAdapter::default()).await?;
    let rules: Vec<Vec<String>> = (0..CONTRACTS)
        .map(|contract| {
            vec![
                "consumer-analyst".into(),
                format!("org-{}", (contract / PRODUCTS) % CONSUMERS),
                format!("prd-{}", contract % PRODUCTS),
                "aggregate_sql".into(),
            ]
        })
        .collect();
    enforcer.add_policies(rules).await?;
    let groupings: Vec<Vec<String>> = (0..USERS)
        .map(|user| {
            vec![
                format!("usr-{user}"),
                "consumer-analyst".into(),
                format!("org-{}", user % CONSUMERS),
            ]
        })
        .collect();
    enforcer.add_grouping_policies(groupings).await?;
    let mut rng = Lcg(7);
    let baseline_decisions = 200;
    let mut baseline = Vec::with_capacity(baseline_decisions);
    for _ in 0..baseline_decisions {
        let user = rng.next(USERS);
        let org = format!("org-{}", user % CONSUMERS);
        let product = format!("prd-{}", rng.next(PRODUCTS));
        let user = format!("usr-{user}");
        let started = Instant::now();
        let _ = enforcer.enforce((
            user.as_str(),
            org.as_str(),
            product.as_str(),
            "aggregate_sql",
        ))?;
        baseline.push(started.elapsed());
    }
    baseline.sort_unstable();
    let (b50, b99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    println!(
        "baseline, contracts as casbin rules ({baseline_decisions} decisions): p50 {b50:?}  p99 {b99:?}"
    );
    println!(
        "ratio p99: baseline / ours (warm) = {:.0}x",
        b99.as_secs_f64() / warm_p99.as_secs_f64()
    );
    Ok(())
}

fn event(i: usize) -> Event {
    Event {
        kind: "authorization.allowed".into(),
        actor: format!("usr-{}", i % USERS),
        tenant: format!("org-{}", i % CONSUMERS),
        subject: format!("prd-{}", i % PRODUCTS),
        details: serde_json::json!({"operation": "OPERATION_KIND_AGGREGATE_SQL", "contract": format!("ctr-{i}")}),
    }
}

async fn appends(name: &str, store: &Store, entries: usize) -> anyhow::Result<()> {
    println!("== audit appends on {name}");
    const BATCH: usize = 1_000;
    let started = Instant::now();
    let mut written = 0;
    while written < entries {
        let batch: Vec<Event> = (written..(written + BATCH).min(entries))
            .map(event)
            .collect();
        let mut transaction = store.begin().await?;
        log::append(&mut transaction, store.backend(), &batch).await?;
        transaction.commit().await?;
        written += batch.len();
    }
    let grouped = written as f64 / started.elapsed().as_secs_f64();
    println!("group commit, {BATCH} per transaction: {written} entries, {grouped:.0} appends/s");
    let single = 2_000;
    let started = Instant::now();
    for i in 0..single {
        let mut transaction = store.begin().await?;
        log::append(&mut transaction, store.backend(), &[event(i)]).await?;
        transaction.commit().await?;
    }
    let one_by_one = single as f64 / started.elapsed().as_secs_f64();
    println!(
        "baseline, one transaction per entry ({single}): {one_by_one:.0} appends/s; ratio {:.0}x",
        grouped / one_by_one
    );

    let mut connection = store.pool().acquire().await?;
    let size = log::head(&mut connection, store.backend()).await?.size();
    let mut rng = Lcg(11);
    let mut inclusion = Vec::new();
    let mut consistency = Vec::new();
    for _ in 0..500 {
        let index = rng.next(size as usize) as u64;
        let started = Instant::now();
        log::inclusion_proof(&mut connection, store.backend(), index, size).await?;
        inclusion.push(started.elapsed());
        let old = 1 + rng.next(size as usize - 1) as u64;
        let started = Instant::now();
        log::consistency_proof(&mut connection, store.backend(), old, size).await?;
        consistency.push(started.elapsed());
    }
    inclusion.sort_unstable();
    consistency.sort_unstable();
    println!(
        "proofs at {size} entries: inclusion p50 {:?} p99 {:?}; consistency p50 {:?} p99 {:?}",
        percentile(&inclusion, 0.5),
        percentile(&inclusion, 0.99),
        percentile(&consistency, 0.5),
        percentile(&consistency, 0.99)
    );
    // What a query's receipt adds to its answer: the head, a signed
    // checkpoint of it and the entry's inclusion proof, as the server makes
    // it; against the inclusion proof alone (above) as the baseline.
    let signer = NoteSigner::new("bench.civicgrid/audit", SigningKey::from_bytes(&[3u8; 32]));
    let mut receipts = Vec::new();
    for _ in 0..500 {
        let index = rng.next(size as usize) as u64;
        let started = Instant::now();
        let head = log::head(&mut connection, store.backend()).await?;
        let note = signer.sign(&Checkpoint {
            origin: "bench.civicgrid/audit".into(),
            size: head.size(),
            root: head.root(),
        });
        log::inclusion_proof(&mut connection, store.backend(), index, head.size()).await?;
        std::hint::black_box(note);
        receipts.push(started.elapsed());
    }
    receipts.sort_unstable();
    println!(
        "receipt at {size} entries: p50 {:?} p99 {:?}; {:.2}x the inclusion proof alone at p50",
        percentile(&receipts, 0.5),
        percentile(&receipts, 0.99),
        percentile(&receipts, 0.5).as_secs_f64() / percentile(&inclusion, 0.5).as_secs_f64()
    );
    Ok(())
}

/// The audit log's and the authorizer's benchmark.
#[derive(clap::Parser)]
struct Args {
    /// Audit entries appended per database.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    entries: u64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let entries = usize::try_from(args.entries)?;
    let dir = tempfile::tempdir()?;
    let sqlite = Store::open(&Location::DataDir(dir.path().to_owned())).await?;
    authorization(&sqlite).await?;
    appends("SQLite", &sqlite, entries).await?;
    if let Ok(url) = std::env::var("CIVICGRID_TEST_POSTGRES_URL") {
        let postgres = Store::open(&Location::Url(fresh_database(&url).await?)).await?;
        appends("PostgreSQL", &postgres, entries).await?;
        postgres.pool().close().await;
        drop_database(&url).await?;
    }
    Ok(())
}

fn database_name() -> String {
    format!("cg_bench_{}", std::process::id())
}

/// Drops the benchmark's database: a 10M-entry log is gigabytes.
async fn drop_database(admin_url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {}",
        database_name()
    )))
    .execute(&mut admin)
    .await?;
    Ok(())
}

async fn fresh_database(admin_url: &str) -> anyhow::Result<String> {
    use sqlx::Connection as _;
    let name = database_name();
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let (base, _) = admin_url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("URL ends in /DATABASE"))?;
    Ok(format!("{base}/{name}"))
}
