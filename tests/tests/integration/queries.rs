//! Authorized queries end to end over gRPC, on SQLite and on PostgreSQL: the
//! real SQL guest in wasmtime under the product's output policy, holds and
//! charges on a prepaid balance, a ledger that sums to zero, idempotent
//! retries, usage views per role that reconcile with the audit log, and
//! recovery of a query the server stopped in the middle of.

use anyhow::{Context as _, ensure};
use arrow_array::{Array as _, Int64Array, RecordBatch};
use civicgrid_marketplace::proto::{
    self, audit_client::AuditClient, billing_client::BillingClient,
    contracts_client::ContractsClient, queries_client::QueriesClient,
    registry_client::RegistryClient,
};
use civicgrid_marketplace::queries::{EngineConfig, QueryEngine};
use civicgrid_tests::market::{
    Cast, Db, SAMPLE_ROWS, TestMarket, action, authed, contract_request, publish, publish_spec,
    sample_spec,
};
use tonic::Code;

const BY_DISTRICT: &str =
    "SELECT district, COUNT(*) AS people FROM residents GROUP BY district ORDER BY district";

/// A market whose server runs queries in the real sandbox.
async fn start(db: Db) -> anyhow::Result<(TestMarket, Cast)> {
    let market = TestMarket::start(db).await?;
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let mut config = EngineConfig::new(guest, cache);
    config.default_compute_units = 5_000;
    let engine = tokio::task::spawn_blocking(move || QueryEngine::open(config)).await??;
    market.market.attach_engine(engine)?;
    let cast = Cast::create(&market).await?;
    Ok((market, cast))
}

/// Publishes `population` and gives acme an active contract on it.
async fn contract(market: &TestMarket, cast: &Cast, quota: i64) -> anyhow::Result<String> {
    publish(market, cast, "population").await?;
    let mut contracts = ContractsClient::new(market.channel.clone());
    let mut request = contract_request("population");
    request.monthly_query_quota = quota;
    let requested = contracts
        .request_contract(authed(&cast.consumer_admin, request))
        .await?
        .into_inner();
    contracts
        .approve_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: requested.id.clone(),
                reason: String::new(),
            },
        ))
        .await?;
    Ok(requested.id)
}

fn query(sql: &str, key: &str) -> proto::RunQueryRequest {
    proto::RunQueryRequest {
        product_id: "population".into(),
        sql: sql.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

struct Answer {
    summary: proto::QuerySummary,
    ipc: Vec<u8>,
    batches: Vec<RecordBatch>,
}

async fn run(
    market: &TestMarket,
    token: &str,
    request: proto::RunQueryRequest,
) -> Result<Answer, tonic::Status> {
    let mut client = QueriesClient::new(market.channel.clone());
    let mut stream = client.run_query(authed(token, request)).await?.into_inner();
    let mut summary = None;
    let mut ipc = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.message {
            Some(proto::run_query_response::Message::Summary(s)) => summary = Some(s),
            Some(proto::run_query_response::Message::ArrowIpc(bytes)) => ipc.extend(bytes),
            None => {}
        }
    }
    let batches = if ipc.is_empty() {
        Vec::new()
    } else {
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc.clone()), None)
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| tonic::Status::internal(e.to_string()))?
    };
    Ok(Answer {
        summary: summary.ok_or_else(|| tonic::Status::internal("no summary"))?,
        ipc,
        batches,
    })
}

fn total_people(batches: &[RecordBatch]) -> anyhow::Result<i64> {
    let mut total = 0;
    for batch in batches {
        let people = batch
            .column_by_name("people")
            .context("a people column")?
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("people is int64")?;
        total += people.iter().flatten().sum::<i64>();
    }
    Ok(total)
}

async fn balance(market: &TestMarket, token: &str, org: &str) -> anyhow::Result<proto::Balance> {
    let mut billing = BillingClient::new(market.channel.clone());
    Ok(billing
        .get_balance(authed(
            token,
            proto::GetBalanceRequest {
                organization_id: org.into(),
            },
        ))
        .await?
        .into_inner()
        .balances
        .into_iter()
        .find(|b| b.currency == "EUR")
        .unwrap_or_default())
}

async fn ledger(market: &TestMarket) -> anyhow::Result<proto::LedgerSummary> {
    let mut billing = BillingClient::new(market.channel.clone());
    Ok(billing
        .get_ledger_summary(authed(
            &market.admin_token,
            proto::GetLedgerSummaryRequest {},
        ))
        .await?
        .into_inner())
}

fn assert_sound(ledger: &proto::LedgerSummary) {
    assert!(
        ledger.totals_minor.values().all(|total| *total == 0),
        "the ledger sums to zero: {ledger:?}"
    );
    assert!(ledger.unbalanced_accounts.is_empty(), "{ledger:?}");
    assert_eq!(ledger.open_holds, 0, "no hold is left open: {ledger:?}");
}

async fn deposit(market: &TestMarket, amount: i64) -> anyhow::Result<proto::Balance> {
    let mut billing = BillingClient::new(market.channel.clone());
    Ok(billing
        .deposit(authed(
            &market.admin_token,
            proto::DepositRequest {
                organization_id: "acme".into(),
                amount_minor: amount,
                currency: "EUR".into(),
                reference: "test top-up".into(),
            },
        ))
        .await?
        .into_inner())
}

async fn charged_once_policy_checked_and_audited(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    let contract_id = contract(&market, &cast, 100).await?;

    // No money yet: refused before anything runs or is recorded.
    let broke = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-broke"),
    )
    .await
    .err()
    .context("a query without funds is refused")?;
    assert_eq!(broke.code(), Code::FailedPrecondition, "{broke:?}");
    assert!(broke.message().contains("insufficient funds"), "{broke:?}");
    assert_eq!(ledger(&market).await?.postings, 0);

    let topped = deposit(&market, 1_000).await?;
    assert_eq!(
        (topped.balance_minor, topped.available_minor),
        (1_000, 1_000)
    );

    // The query runs in the sandbox over the product's files.
    let first = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-1")).await?;
    let summary = &first.summary;
    assert_eq!(summary.state, "completed");
    assert!(!summary.replayed);
    assert_eq!(summary.contract_id, contract_id);
    assert_eq!((summary.held_minor, summary.charge_minor), (250, 250));
    assert_eq!(summary.rows_released, 12, "one row per district");
    assert_eq!(summary.rows_read, SAMPLE_ROWS as i64);
    assert!(summary.compute_units > 0 && summary.fuel > 0, "{summary:?}");
    assert_eq!(total_people(&first.batches)?, SAMPLE_ROWS as i64);
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        750
    );

    // A retry under the same key returns the first outcome, charged once.
    let retry = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-1")).await?;
    assert!(retry.summary.replayed);
    assert_eq!(retry.summary.query_id, summary.query_id);
    assert_eq!(retry.ipc, first.ipc, "the same result bytes");
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        750
    );

    // The same key for another request is refused, naming the key.
    let reused = run(
        &market,
        &cast.consumer_analyst,
        query("SELECT COUNT(*) AS people FROM residents", "k-1"),
    )
    .await
    .err()
    .context("a reused key is refused")?;
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert!(
        reused.message().starts_with("invalid idempotency_key:"),
        "{reused:?}"
    );

    // Fuel metering is deterministic: the same query costs the same units.
    let again = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-2")).await?;
    assert_eq!(again.summary.fuel, summary.fuel);
    assert_eq!(again.summary.compute_units, summary.compute_units);

    // The policy refuses a blocked column: nothing is charged.
    let blocked = run(
        &market,
        &cast.consumer_analyst,
        query("SELECT person_id FROM residents", "k-blocked"),
    )
    .await
    .err()
    .context("a blocked column is refused")?;
    assert_eq!(blocked.code(), Code::PermissionDenied, "{blocked:?}");
    assert!(blocked.message().contains("person_id"), "{blocked:?}");
    // Its retry returns the same refusal, still uncharged.
    let blocked_again = run(
        &market,
        &cast.consumer_analyst,
        query("SELECT person_id FROM residents", "k-blocked"),
    )
    .await
    .err()
    .context("the refusal replays")?;
    assert_eq!(blocked_again.code(), Code::PermissionDenied);
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        500
    );

    // Groups too small to release are suppressed, and the query is billed.
    let fine = run(
        &market,
        &cast.consumer_analyst,
        query(
            "SELECT district, age_band, household_size, COUNT(*) AS people FROM residents \
             GROUP BY district, age_band, household_size",
            "k-fine",
        ),
    )
    .await?;
    assert!(fine.summary.suppressed_rows > 0, "{:?}", fine.summary);
    assert!(
        total_people(&fine.batches)? < SAMPLE_ROWS as i64,
        "suppressed groups' people are withheld"
    );
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        250
    );

    // Roles: only consumers run queries; contracts are per organization.
    for token in [&cast.provider_analyst, &cast.regulator, &cast.nobody] {
        let denied = run(&market, token, query(BY_DISTRICT, "k-role"))
            .await
            .err()
            .context("only consumers query")?;
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    }
    let rival = run(
        &market,
        &cast.rival_consumer_admin,
        query(BY_DISTRICT, "k-rival"),
    )
    .await
    .err()
    .context("no contract, no query")?;
    assert_eq!(rival.code(), Code::PermissionDenied);
    assert!(rival.message().contains("no active contract"), "{rival:?}");

    // The ledger: 3 charges of 250; 10% to the platform, the rest to the provider.
    let summary_ledger = ledger(&market).await?;
    assert_sound(&summary_ledger);
    let provider = balance_of(&market, "provider:city-data:EUR").await?;
    let platform = balance_of(&market, "platform:platform:EUR").await?;
    assert_eq!((provider, platform), (675, 75));

    // Usage views and the audit log agree.
    let mut queries = QueriesClient::new(market.channel.clone());
    let usage = |token: &str| {
        authed(
            token,
            proto::ListUsageRequest {
                product_id: "population".into(),
                ..Default::default()
            },
        )
    };
    let mine = queries
        .list_usage(usage(&cast.consumer_admin))
        .await?
        .into_inner()
        .queries;
    assert_eq!(mine.len(), 4, "three completed, one rejected: {mine:?}");
    assert!(mine.iter().all(|q| !q.sql.is_empty()));
    assert_eq!(mine.iter().map(|q| q.charge_minor).sum::<i64>(), 750);
    let theirs = queries
        .list_usage(usage(&cast.provider_admin))
        .await?
        .into_inner()
        .queries;
    assert_eq!(theirs.len(), 4);
    assert!(
        theirs.iter().all(|q| q.sql.is_empty()),
        "providers do not see query text"
    );
    let everything = queries
        .list_usage(usage(&cast.regulator))
        .await?
        .into_inner()
        .queries;
    assert_eq!(everything.len(), 4);
    let rivals = queries
        .list_usage(usage(&cast.rival_consumer_admin))
        .await?
        .into_inner()
        .queries;
    assert!(rivals.is_empty(), "{rivals:?}");
    let mut audit = AuditClient::new(market.channel.clone());
    for record in &everything {
        let entries = audit
            .get_entries(authed(
                &cast.regulator,
                proto::GetEntriesRequest {
                    start: record.audit_index,
                    end: record.audit_index + 1,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .entries;
        let body: serde_json::Value = serde_json::from_slice(&entries[0].body)?;
        ensure!(
            body["details"]["query"] == record.query_id.as_str(),
            "{body}"
        );
        ensure!(
            body["details"]["charge_minor"] == record.charge_minor,
            "{body}"
        );
        ensure!(
            body["kind"]
                == if record.state == "completed" {
                    "query.completed"
                } else {
                    "query.rejected"
                },
            "{body}"
        );
    }

    // The month's invoice: three queries on one contract.
    let mut billing = BillingClient::new(market.channel.clone());
    let period = civicgrid_marketplace::billing::period_of(civicgrid_marketplace::store::now_ms());
    let invoice = billing
        .get_invoice(authed(
            &cast.consumer_admin,
            proto::GetInvoiceRequest {
                organization_id: String::new(),
                period: period.clone(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(invoice.lines.len(), 1, "{invoice:?}");
    assert_eq!(invoice.lines[0].queries, 3);
    assert_eq!(invoice.total_minor.get("EUR"), Some(&750));
    let earnings = billing
        .get_invoice(authed(
            &cast.provider_admin,
            proto::GetInvoiceRequest {
                organization_id: String::new(),
                period,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(earnings.total_minor.get("EUR"), Some(&675));
    // Another organization's balance is not a consumer's business.
    let nosy = billing
        .get_balance(authed(
            &cast.consumer_admin,
            proto::GetBalanceRequest {
                organization_id: "globex".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(nosy.code(), Code::PermissionDenied);

    // Funds run out: 250 left covers one more query, then a clear refusal.
    run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-last"),
    )
    .await?;
    let empty = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-empty"),
    )
    .await
    .err()
    .context("an empty balance refuses")?;
    assert_eq!(empty.code(), Code::FailedPrecondition);
    assert_sound(&ledger(&market).await?);

    // Prometheus sees the same story.
    let metrics = market.market.metrics().encode();
    for line in [
        "civicgrid_marketplace_queries_total{outcome=\"completed\"} 4",
        "civicgrid_marketplace_queries_total{outcome=\"rejected\"} 1",
        "civicgrid_marketplace_charged_minor_total{currency=\"EUR\"} 1000",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"sandbox\"} 5",
        // Where the time went: the four that ran split into start-up and
        // the query itself, and were charged; all five were audited, and
        // each settlement's writes went to the database together.
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"sandbox_start\"} 4",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"query\"} 4",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"ledger\"} 4",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"audit\"} 5",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"writes\"} 5",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    market.stop().await;
    Ok(())
}

async fn balance_of(market: &TestMarket, account: &str) -> anyhow::Result<i64> {
    use sqlx::Row as _;
    let pool = market.raw_pool().await?;
    let row = sqlx::query("SELECT balance_minor FROM ledger_accounts WHERE id = $1")
        .bind(account)
        .fetch_one(&pool)
        .await?;
    Ok(row.try_get("balance_minor")?)
}

async fn bad_requests_quota_and_interrupted_queries(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 2).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    for (request, field) in [
        (query(BY_DISTRICT, ""), "idempotency_key"),
        (query(BY_DISTRICT, &"k".repeat(129)), "idempotency_key"),
        (query(BY_DISTRICT, "has space"), "idempotency_key"),
        (query("   ", "k-empty-sql"), "sql"),
        (
            proto::RunQueryRequest {
                max_compute_units: -1,
                ..query(BY_DISTRICT, "k-neg")
            },
            "max_compute_units",
        ),
        (
            proto::RunQueryRequest {
                product_id: String::new(),
                ..query(BY_DISTRICT, "k-noproduct")
            },
            "product_id",
        ),
    ] {
        let refused = run(&market, token, request)
            .await
            .err()
            .context("bad input is refused")?;
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().starts_with(&format!("invalid {field}:")),
            "{field}: {refused:?}"
        );
    }
    // SQL the engine cannot run is refused uncharged.
    let nonsense = run(&market, token, query("SELEKT nothing", "k-nonsense"))
        .await
        .err()
        .context("bad SQL is refused")?;
    assert_eq!(nonsense.code(), Code::InvalidArgument, "{nonsense:?}");
    // Too little fuel stops a query: recorded as failed, not charged.
    let starved = run(
        &market,
        token,
        proto::RunQueryRequest {
            max_compute_units: 1,
            ..query(BY_DISTRICT, "k-starved")
        },
    )
    .await
    .err()
    .context("a starved query fails")?;
    assert_eq!(starved.code(), Code::ResourceExhausted, "{starved:?}");
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        10_000
    );

    // A server that stopped mid-query left it running with its hold.
    let pool = market.raw_pool().await?;
    let contract_id: String = {
        use sqlx::Row as _;
        sqlx::query("SELECT id FROM contracts WHERE consumer_organization_id = 'acme'")
            .fetch_one(&pool)
            .await?
            .try_get("id")?
    };
    sqlx::query(
        "INSERT INTO queries (id, consumer_organization_id, user_id, product_id, \
         provider_organization_id, contract_id, plan_id, idempotency_key, request_sha256, \
         sql_text, algorithm_sha256, period, state, error, error_code, currency, held_minor, \
         hold_open, created_at) VALUES ('q_interrupted', 'acme', 'u', 'population', \
         'city-data', $1, 'per-query', 'k-crash', 'x', '', '', '2026-11', 'running', '', 0, \
         'EUR', 250, 1, 0)",
    )
    .bind(&contract_id)
    .execute(&pool)
    .await?;
    assert_eq!(
        balance(&market, &cast.consumer_admin, "").await?.held_minor,
        250
    );
    let retry_while_running = run(&market, token, query(BY_DISTRICT, "k-crash"))
        .await
        .err()
        .context("a key whose query is running is not run twice")?;
    assert!(
        matches!(
            retry_while_running.code(),
            Code::Aborted | Code::InvalidArgument
        ),
        "{retry_while_running:?}"
    );
    let recovered =
        civicgrid_marketplace::queries::recover_interrupted(market.market.store()).await?;
    assert_eq!(recovered, 1);
    let after = balance(&market, &cast.consumer_admin, "").await?;
    assert_eq!((after.balance_minor, after.held_minor), (10_000, 0));
    assert_sound(&ledger(&market).await?);
    // The retry runs afresh and is charged once.
    let retried = run(&market, token, query(BY_DISTRICT, "k-crash")).await?;
    assert!(!retried.summary.replayed);
    assert_eq!(retried.summary.charge_minor, 250);
    run(&market, token, query(BY_DISTRICT, "k-crash")).await?;
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        9_750
    );

    // The quota is 2 queries a month.
    run(&market, token, query(BY_DISTRICT, "k-second")).await?;
    let over = run(&market, token, query(BY_DISTRICT, "k-third"))
        .await
        .err()
        .context("the quota is enforced")?;
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(over.message().contains("quota"), "{over:?}");
    assert_sound(&ledger(&market).await?);

    // Deposits: only platform-admins, only positive amounts, only consumers.
    let mut billing = BillingClient::new(market.channel.clone());
    let deposit_request = |org: &str, amount: i64, currency: &str| proto::DepositRequest {
        organization_id: org.into(),
        amount_minor: amount,
        currency: currency.into(),
        reference: String::new(),
    };
    let self_service = billing
        .deposit(authed(
            &cast.consumer_admin,
            deposit_request("acme", 5, "EUR"),
        ))
        .await
        .unwrap_err();
    assert_eq!(self_service.code(), Code::PermissionDenied);
    for (request, field) in [
        (deposit_request("acme", 0, "EUR"), "amount_minor"),
        (deposit_request("acme", 5, "euro"), "currency"),
        (deposit_request("city-data", 5, "EUR"), "organization_id"),
    ] {
        let refused = billing
            .deposit(authed(&market.admin_token, request))
            .await
            .unwrap_err();
        assert!(
            refused.message().starts_with(&format!("invalid {field}:")),
            "{refused:?}"
        );
    }
    market.stop().await;
    Ok(())
}

/// A differentially private product: each consumer has epsilon 1.0 a month
/// for it, and each query spends 0.4 — two queries, then a refusal that
/// costs nothing. The spend is persisted with the charge.
async fn privacy_budget_is_debited_with_the_charge(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    let mut spec = sample_spec();
    let policy = spec.output_policy.as_mut().context("policy")?;
    policy.dp_epsilon_budget = 1.0;
    policy.dp_epsilon_per_query = 0.4;
    policy.dp_max_rows_per_unit = 1;
    publish_spec(&market, &cast, "population-dp", spec).await?;
    let mut contracts = ContractsClient::new(market.channel.clone());
    let requested = contracts
        .request_contract(authed(
            &cast.consumer_admin,
            contract_request("population-dp"),
        ))
        .await?
        .into_inner();
    contracts
        .approve_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: requested.id,
                reason: String::new(),
            },
        ))
        .await?;
    deposit(&market, 10_000).await?;
    let dp_query = |key: &str| proto::RunQueryRequest {
        product_id: "population-dp".into(),
        ..query(BY_DISTRICT, key)
    };
    let mut spent = 0.0;
    for key in ["dp-1", "dp-2"] {
        let answer = run(&market, &cast.consumer_analyst, dp_query(key)).await?;
        assert!(
            (answer.summary.privacy_spent - 0.4).abs() < 1e-9,
            "{:?}",
            answer.summary
        );
        spent += answer.summary.privacy_spent;
        assert_eq!(answer.summary.charge_minor, 250);
    }
    assert!((spent - 0.8).abs() < 1e-9);
    let exhausted = run(&market, &cast.consumer_analyst, dp_query("dp-3"))
        .await
        .err()
        .context("the third query exceeds the budget")?;
    assert_eq!(exhausted.code(), Code::ResourceExhausted, "{exhausted:?}");
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        9_500,
        "the refused query is not charged"
    );
    let stored: f64 = {
        use sqlx::Row as _;
        sqlx::query("SELECT spent FROM privacy_budgets WHERE product_id = 'population-dp'")
            .fetch_one(&market.raw_pool().await?)
            .await?
            .try_get("spent")?
    };
    assert!((stored - 0.8).abs() < 1e-9, "persisted spend {stored}");
    assert_sound(&ledger(&market).await?);
    market.stop().await;
    Ok(())
}

/// A client whose deadline passes mid-query (the server drops its handler)
/// does not leave the query running with its hold: it settles as if the
/// client had waited, and a retry under its key replays that outcome.
async fn a_client_that_gives_up_mid_query_leaves_no_hold(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    // A billion-row cross join: it runs until its fuel (20,000 compute
    // units, 2·10¹⁰ fuel, about 5 s on an idle 2-core machine) is gone, long
    // after the client's deadline. 2,000 units burnt in 0.3–0.5 s, and the
    // query sometimes ended before the 300 ms deadline did.
    let slow = proto::RunQueryRequest {
        max_compute_units: 20_000,
        ..query(
            "SELECT a.district, COUNT(*) AS people FROM residents a \
             CROSS JOIN residents b CROSS JOIN residents c GROUP BY a.district",
            "k-gave-up",
        )
    };
    let mut impatient = authed(token, slow.clone());
    impatient.set_timeout(std::time::Duration::from_millis(300));
    let gave_up = QueriesClient::new(market.channel.clone())
        .run_query(impatient)
        .await
        .err()
        .context("the client's deadline passes first")?;
    // Cancelled when the client's own timer fires first.
    assert!(
        matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gave_up:?}"
    );
    assert!(
        balance(&market, &cast.consumer_admin, "").await?.held_minor > 0,
        "the query is running with its hold"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let settled = loop {
        match run(&market, token, slow.clone()).await {
            Err(status) if status.code() == Code::Aborted => {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "the abandoned query is still running after 60 s: {status:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => break other,
        }
    };
    // It ran out of fuel and was settled as failed, uncharged.
    let status = settled.err().context("the query stops on its fuel")?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let after = balance(&market, &cast.consumer_admin, "").await?;
    assert_eq!((after.balance_minor, after.held_minor), (10_000, 0));
    assert_sound(&ledger(&market).await?);
    market.stop().await;
    Ok(())
}

/// The server's query limits are checked when it starts, each refusal naming
/// its flag; memory below what the SQL guest starts with is refused with the
/// guest's own figure rather than failing every query later.
#[test]
fn engine_limits_out_of_range_are_refused_by_flag_at_start() -> anyhow::Result<()> {
    use civicgrid_marketplace::error::MarketError;
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let open = |configure: &dyn Fn(&mut EngineConfig)| {
        let mut config = EngineConfig::new(&guest, &cache);
        configure(&mut config);
        QueryEngine::open(config)
    };
    let refused = |configure: &dyn Fn(&mut EngineConfig)| match open(configure) {
        Err(MarketError::InvalidArgument { field, message }) => Ok((field, message)),
        Err(other) => anyhow::bail!("expected an invalid argument, got {other}"),
        Ok(_) => anyhow::bail!("expected an invalid argument, the engine opened"),
    };

    type Configure = dyn Fn(&mut EngineConfig);
    let cases: [(&str, &Configure); 7] = [
        ("max-compute-units", &|c| c.max_compute_units = 0),
        ("default-compute-units", &|c| {
            c.default_compute_units = c.max_compute_units + 1
        }),
        ("query-wall-time-secs", &|c| {
            c.wall_time = std::time::Duration::ZERO
        }),
        ("query-wall-time-secs", &|c| {
            c.wall_time = std::time::Duration::from_secs(3_601)
        }),
        ("query-memory-mib", &|c| c.memory_bytes = (4 << 30) + 1),
        ("concurrent-queries", &|c| c.concurrent_queries = 0),
        ("platform-fee-bps", &|c| c.platform_fee_bps = 10_001),
    ];
    for (flag, configure) in cases {
        let (field, message) = refused(configure)?;
        assert_eq!(field, flag, "{message}");
    }

    // One MiB is a valid size, but not for this guest: the refusal says how
    // much it needs.
    let (field, message) = refused(&|c| c.memory_bytes = 1 << 20)?;
    assert_eq!(field, "query-memory-mib");
    assert!(
        message.contains("the SQL guest") && message.contains("starts with"),
        "{message}"
    );
    let needed_mib: u64 = message
        .strip_prefix("at least ")
        .and_then(|rest| rest.split(' ').next())
        .context("the refusal names the minimum")?
        .parse()?;
    assert!(needed_mib > 1, "{message}");
    let engine = open(&|c| c.memory_bytes = needed_mib << 20)
        .context("the minimum the refusal names is enough to start")?;
    assert_eq!(engine.config().memory_bytes, needed_mib << 20);
    Ok(())
}

/// The server keeps each product as a query last read it, so that the next
/// query need not read it again from the database's one writer. A product
/// suspended or repriced since must still be seen as it is stored now.
async fn a_product_changed_since_the_last_query_is_read_afresh(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    let mut registry = RegistryClient::new(market.channel.clone());
    let first = run(&market, token, query(BY_DISTRICT, "k-as-published")).await?;
    assert_eq!(first.summary.charge_minor, 250, "the sample plan's price");

    registry
        .suspend_product(authed(
            &cast.admin,
            action("population", "data under review"),
        ))
        .await?;
    let refused = run(&market, token, query(BY_DISTRICT, "k-suspended"))
        .await
        .err()
        .context("a suspended product answers no query")?;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("is suspended, not published"),
        "{refused:?}"
    );

    registry
        .publish_product(authed(&cast.admin, action("population", "")))
        .await?;
    let mut repriced = sample_spec();
    repriced.price_plans[0].unit_price_minor = 400;
    registry
        .revise_product(authed(
            &cast.provider_admin,
            proto::ReviseProductRequest {
                product_id: "population".into(),
                spec: Some(repriced),
                reason: "new price".into(),
            },
        ))
        .await?;
    let after = run(&market, token, query(BY_DISTRICT, "k-repriced")).await?;
    assert_eq!(after.summary.charge_minor, 400, "the new version's price");
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        10_000 - 250 - 400,
        "charged the two queries that ran, at their prices"
    );
    assert_sound(&ledger(&market).await?);
    market.stop().await;
    Ok(())
}

civicgrid_tests::on_both_databases!(
    charged_once_policy_checked_and_audited,
    a_product_changed_since_the_last_query_is_read_afresh,
    bad_requests_quota_and_interrupted_queries,
    privacy_budget_is_debited_with_the_charge,
    a_client_that_gives_up_mid_query_leaves_no_hold,
);
