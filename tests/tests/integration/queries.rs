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

pub(crate) const BY_DISTRICT: &str =
    "SELECT district, COUNT(*) AS people FROM residents GROUP BY district ORDER BY district";

/// A market whose server runs queries in the real sandbox.
async fn start(db: Db) -> anyhow::Result<(TestMarket, Cast)> {
    start_with(db, |_| {}).await
}

/// [`start`] with the engine's configuration changed by `configure`.
pub(crate) async fn start_with(
    db: Db,
    configure: impl FnOnce(&mut EngineConfig),
) -> anyhow::Result<(TestMarket, Cast)> {
    let market = TestMarket::start(db).await?;
    attach_engine(&market, configure).await?;
    let cast = Cast::create(&market).await?;
    Ok((market, cast))
}

/// Gives `market` a query engine on the real sandbox, configured by
/// `configure` from the tests' defaults.
pub(crate) async fn attach_engine(
    market: &TestMarket,
    configure: impl FnOnce(&mut EngineConfig),
) -> anyhow::Result<()> {
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let mut config = EngineConfig::new(guest, cache);
    config.default_compute_units = 5_000;
    configure(&mut config);
    let engine = tokio::task::spawn_blocking(move || QueryEngine::open(config)).await??;
    market.market.attach_engine(engine)?;
    Ok(())
}

/// Publishes `population` and gives acme an active contract on it.
pub(crate) async fn contract(
    market: &TestMarket,
    cast: &Cast,
    quota: i64,
) -> anyhow::Result<String> {
    publish(market, cast, "population").await?;
    let mut request = contract_request("population");
    request.monthly_query_quota = quota;
    approved_contract(market, cast, request).await
}

/// acme's admin requests `request` and city-data's admin approves it;
/// returns the contract's id.
async fn approved_contract(
    market: &TestMarket,
    cast: &Cast,
    request: proto::RequestContractRequest,
) -> anyhow::Result<String> {
    let mut contracts = ContractsClient::new(market.channel.clone());
    let contract_id = contracts
        .request_contract(authed(&cast.consumer_admin, request))
        .await?
        .into_inner()
        .id;
    contracts
        .approve_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: contract_id.clone(),
                reason: String::new(),
            },
        ))
        .await?;
    Ok(contract_id)
}

pub(crate) fn query(sql: &str, key: &str) -> proto::RunQueryRequest {
    proto::RunQueryRequest {
        product_id: "population".into(),
        sql: sql.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

pub(crate) struct Answer {
    pub(crate) summary: proto::QuerySummary,
    pub(crate) ipc: Vec<u8>,
    pub(crate) batches: Vec<RecordBatch>,
}

pub(crate) async fn run(
    market: &TestMarket,
    token: &str,
    request: proto::RunQueryRequest,
) -> Result<Answer, tonic::Status> {
    run_on(&market.channel, token, request).await
}

/// [`run`] through any server's channel.
pub(crate) async fn run_on(
    channel: &tonic::transport::Channel,
    token: &str,
    request: proto::RunQueryRequest,
) -> Result<Answer, tonic::Status> {
    let mut client = QueriesClient::new(channel.clone());
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

pub(crate) fn total_people(batches: &[RecordBatch]) -> anyhow::Result<i64> {
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

pub(crate) async fn balance(
    market: &TestMarket,
    token: &str,
    org: &str,
) -> anyhow::Result<proto::Balance> {
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

pub(crate) async fn ledger(market: &TestMarket) -> anyhow::Result<proto::LedgerSummary> {
    let mut billing = BillingClient::new(market.channel.clone());
    Ok(billing
        .get_ledger_summary(authed(
            &market.admin_token,
            proto::GetLedgerSummaryRequest {},
        ))
        .await?
        .into_inner())
}

pub(crate) fn assert_sound(ledger: &proto::LedgerSummary) {
    assert!(
        ledger.totals_minor.values().all(|total| *total == 0),
        "the ledger sums to zero: {ledger:?}"
    );
    assert!(ledger.unbalanced_accounts.is_empty(), "{ledger:?}");
    assert_eq!(ledger.open_holds, 0, "no hold is left open: {ledger:?}");
}

pub(crate) async fn deposit(market: &TestMarket, amount: i64) -> anyhow::Result<proto::Balance> {
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

    let topped = deposit(&market, 1_250).await?;
    assert_eq!(
        (topped.balance_minor, topped.available_minor),
        (1_250, 1_250)
    );

    // The query runs in the sandbox over the product's files.
    let first = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-1")).await?;
    let summary = &first.summary;
    assert_eq!(summary.state, "completed");
    assert!(!summary.replayed);
    assert_eq!(summary.contract_id, contract_id);
    assert_eq!((summary.held_minor, summary.charge_minor), (250, 250));
    assert_eq!(summary.rows_released, 12, "one row per district");
    // The product withholds small groups: its cost is withheld too.
    assert_eq!(
        (
            summary.metering.as_str(),
            summary.rows_read,
            summary.fuel,
            summary.compute_units
        ),
        ("withheld", 0, 0, 0),
        "{summary:?}"
    );
    assert_eq!(total_people(&first.batches)?, SAMPLE_ROWS as i64);
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        1_000
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
        1_000
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

    let again = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-2")).await?;
    assert_eq!(again.summary.charge_minor, summary.charge_minor);

    // The policy refuses a blocked column, precisely; planning it ran in the
    // sandbox, so the refusal is charged like any query.
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
    // Its retry returns the same refusal, charged once.
    let blocked_again = run(
        &market,
        &cast.consumer_analyst,
        query("SELECT person_id FROM residents", "k-blocked"),
    )
    .await
    .err()
    .context("the refusal replays")?;
    assert_eq!(blocked_again.code(), Code::PermissionDenied);
    assert_eq!(blocked_again.message(), blocked.message());
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        500
    );

    // Groups too small to release are withheld, uncounted, and the query is
    // billed.
    let fine = run(
        &market,
        &cast.consumer_analyst,
        query(
            "SELECT district, age_band, COUNT(*) AS people FROM residents \
             GROUP BY district, age_band",
            "k-fine",
        ),
    )
    .await?;
    assert!(
        total_people(&fine.batches)? < SAMPLE_ROWS as i64,
        "small groups' people are withheld"
    );
    assert_eq!(fine.summary.suppressed_rows, 0, "{:?}", fine.summary);
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

    // The ledger: 4 charges of 250; 10% to the platform, the rest to the provider.
    let summary_ledger = ledger(&market).await?;
    assert_sound(&summary_ledger);
    let provider = balance_of(&market, "provider:city-data:EUR").await?;
    let platform = balance_of(&market, "platform:platform:EUR").await?;
    assert_eq!((provider, platform), (900, 100));

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
    assert!(mine.iter().all(|q| q.suppressed_rows == 0), "{mine:?}");
    assert_eq!(mine.iter().map(|q| q.charge_minor).sum::<i64>(), 1_000);
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
        ensure!(body["details"].get("suppressed_rows").is_none(), "{body}");
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

    // The month's invoice: four queries on one contract, the refusal too.
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
    assert_eq!(invoice.lines[0].queries, 4);
    assert_eq!(invoice.total_minor.get("EUR"), Some(&1_000));
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
    assert_eq!(earnings.total_minor.get("EUR"), Some(&900));
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
        "civicgrid_marketplace_charged_minor_total{currency=\"EUR\"} 1250",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"sandbox\"} 5",
        // Where the time went: the four that completed split into start-up
        // and the query itself; all five were charged and audited, and each
        // settlement's writes went to the database together.
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"sandbox_start\"} 4",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"query\"} 4",
        "civicgrid_marketplace_query_stage_seconds_count{stage=\"ledger\"} 5",
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

/// What a contract has used this period: (queries, compute units).
async fn counted(market: &TestMarket, contract_id: &str) -> anyhow::Result<(i64, i64)> {
    use sqlx::Row as _;
    let pool = market.raw_pool().await?;
    let row =
        sqlx::query("SELECT queries, compute_units FROM usage_counters WHERE contract_id = $1")
            .bind(contract_id)
            .fetch_optional(&pool)
            .await?;
    Ok(match row {
        Some(row) => (row.try_get("queries")?, row.try_get("compute_units")?),
        None => (0, 0),
    })
}

/// The stored summary of the query a status names (`query <id>: …`), as
/// its consumer lists it.
async fn listed(
    market: &TestMarket,
    token: &str,
    status: &tonic::Status,
) -> anyhow::Result<proto::QuerySummary> {
    let id = status
        .message()
        .strip_prefix("query ")
        .and_then(|rest| rest.split(':').next())
        .with_context(|| format!("the status names its query: {status:?}"))?;
    QueriesClient::new(market.channel.clone())
        .list_usage(authed(token, proto::ListUsageRequest::default()))
        .await?
        .into_inner()
        .queries
        .into_iter()
        .find(|summary| summary.query_id == id)
        .with_context(|| format!("query {id} is listed"))
}

/// The audit log's entry at `index`, as its bytes and parsed.
async fn audit_entry(
    market: &TestMarket,
    token: &str,
    index: i64,
) -> anyhow::Result<(String, serde_json::Value)> {
    let entries = AuditClient::new(market.channel.clone())
        .get_entries(authed(
            token,
            proto::GetEntriesRequest {
                start: index,
                end: index + 1,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .entries;
    let body = &entries.first().context("the entry exists")?.body;
    Ok((
        String::from_utf8(body.clone())?,
        serde_json::from_slice(body)?,
    ))
}

/// Whether `text` quotes the sample's data (a district's name) or the
/// engine's error (which speaks of casts and Arrow).
fn quotes_data_or_engine(text: &str) -> bool {
    let lower = text.to_lowercase();
    lower.contains("cast")
        || lower.contains("arrow")
        || civicgrid_cli::city::DISTRICTS
            .iter()
            .any(|district| lower.contains(district))
}

/// A query that fails while it runs — on a cast of the data's own values,
/// whose error quotes the value — is charged for the compute it used and
/// counts against the quota like one that completes; the consumer, the
/// outcome a replay returns and the audit log see a stable code, never the
/// engine's text. Withheld groups are not counted for consumers. (Out of
/// fuel: `a_querys_cost_counts_no_withheld_rows`.)
async fn failed_queries_are_charged_counted_and_quote_no_data(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    let mut spec = sample_spec();
    // Public, so that it may group the residents with their district.
    spec.tables[0].columns[1].sensitivity = proto::Sensitivity::Public as i32;
    publish_spec(&market, &cast, "population", spec).await?;
    let contract_id = approved_contract(&market, &cast, contract_request("population")).await?;
    deposit(&market, 100_000).await?;
    let token = &cast.consumer_analyst;
    let balance_now = async || -> anyhow::Result<i64> {
        Ok(balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor)
    };

    // Every district's name fails the cast, and the engine's error quotes it.
    // (A list query: the analysis rule refuses an aggregate query whose
    // expressions could fail before it runs.)
    let leaky = query(
        "SELECT CAST(district AS INT) AS n FROM residents",
        "k-failing",
    );
    let failed = run(&market, token, leaky.clone())
        .await
        .err()
        .context("the cast fails while the query runs")?;
    assert_eq!(failed.code(), Code::InvalidArgument, "{failed:?}");
    assert!(
        failed
            .message()
            .ends_with(": the query failed while running (execution_error)"),
        "{failed:?}"
    );
    assert!(!quotes_data_or_engine(failed.message()), "{failed:?}");

    // Recorded as failed, with the same words, and charged.
    let summary = listed(&market, &cast.consumer_admin, &failed).await?;
    assert_eq!(summary.state, "failed");
    assert_eq!(
        summary.error,
        "the query failed while running (execution_error)"
    );
    assert_eq!(
        (
            summary.metering.as_str(),
            summary.fuel,
            summary.charge_minor
        ),
        ("withheld", 0, 250),
        "{summary:?}"
    );
    assert_eq!(balance_now().await?, 100_000 - summary.charge_minor);
    assert_eq!(
        counted(&market, &contract_id).await?,
        (1, 0),
        "it counts against the quota"
    );
    let (text, entry) = audit_entry(&market, &cast.regulator, summary.audit_index).await?;
    assert_eq!(entry["kind"], "query.failed", "{text}");
    assert_eq!(entry["details"]["error"], summary.error.as_str(), "{text}");
    assert_eq!(
        entry["details"]["charge_minor"], summary.charge_minor,
        "{text}"
    );
    assert!(!quotes_data_or_engine(&text), "{text}");

    // A retry under its key replays the same words, charged once.
    let replayed = run(&market, token, leaky)
        .await
        .err()
        .context("the failure replays")?;
    assert_eq!(replayed.code(), failed.code());
    assert_eq!(replayed.message(), failed.message());
    assert_eq!(balance_now().await?, 100_000 - summary.charge_minor);
    assert_eq!(counted(&market, &contract_id).await?.0, 1);
    let spent = summary.charge_minor;

    // A query whose small groups are withheld says nothing of how many.
    let fine = run(
        &market,
        token,
        query(
            "SELECT district, age_band, COUNT(*) AS people FROM residents \
             GROUP BY district, age_band",
            "k-fine",
        ),
    )
    .await?;
    assert!(
        total_people(&fine.batches)? < SAMPLE_ROWS as i64,
        "groups were withheld"
    );
    assert_eq!(fine.summary.suppressed_rows, 0, "{:?}", fine.summary);
    let listed_fine = QueriesClient::new(market.channel.clone())
        .list_usage(authed(&cast.regulator, proto::ListUsageRequest::default()))
        .await?
        .into_inner()
        .queries
        .into_iter()
        .find(|listed| listed.query_id == fine.summary.query_id)
        .context("the completed query is listed")?;
    assert_eq!(listed_fine.suppressed_rows, 0);
    let (text, entry) = audit_entry(&market, &cast.regulator, fine.summary.audit_index).await?;
    assert_eq!(entry["kind"], "query.completed", "{text}");
    assert!(entry["details"].get("suppressed_rows").is_none(), "{text}");

    // The invoice bills all three, and the ledger balances.
    let period = civicgrid_marketplace::billing::period_of(civicgrid_marketplace::store::now_ms());
    let invoice = BillingClient::new(market.channel.clone())
        .get_invoice(authed(
            &cast.consumer_admin,
            proto::GetInvoiceRequest {
                organization_id: String::new(),
                period,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(invoice.lines.len(), 1, "{invoice:?}");
    assert_eq!(invoice.lines[0].queries, 2, "{invoice:?}");
    assert_eq!(
        invoice.total_minor.get("EUR"),
        Some(&(spent + fine.summary.charge_minor))
    );
    assert_sound(&ledger(&market).await?);
    market.stop().await;
    Ok(())
}

async fn bad_requests_quota_and_interrupted_queries(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 4).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    for (request, field) in [
        (query(BY_DISTRICT, ""), "idempotency_key"),
        (query(BY_DISTRICT, &"k".repeat(129)), "idempotency_key"),
        (query(BY_DISTRICT, "has space"), "idempotency_key"),
        (query("   ", "k-empty-sql"), "sql"),
        (query(&"x".repeat(64 * 1024 + 1), "k-long-sql"), "sql"),
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
    // SQL the engine cannot parse is refused, precisely; the parser ran in
    // the sandbox, so it is charged and counts against the quota (1 of 4).
    let nonsense = run(&market, token, query("SELEKT nothing", "k-nonsense"))
        .await
        .err()
        .context("bad SQL is refused")?;
    assert_eq!(nonsense.code(), Code::InvalidArgument, "{nonsense:?}");
    assert!(nonsense.message().contains("SELEKT"), "{nonsense:?}");
    // A query that fails while it runs is recorded as failed, charged (2 of
    // 4), and reported by its code alone.
    let failed = run(
        &market,
        token,
        query(
            "SELECT CAST(district AS INT) AS n FROM residents",
            "k-failing",
        ),
    )
    .await
    .err()
    .context("the cast fails")?;
    assert_eq!(failed.code(), Code::InvalidArgument, "{failed:?}");
    assert!(
        failed.message().ends_with("(execution_error)"),
        "{failed:?}"
    );
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        9_500
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
    let recovered = market.market.recover_interrupted().await?;
    assert_eq!(recovered, 1);
    let after = balance(&market, &cast.consumer_admin, "").await?;
    assert_eq!((after.balance_minor, after.held_minor), (9_500, 0));
    assert_sound(&ledger(&market).await?);
    // The retry runs afresh and is charged once (3 of 4).
    let retried = run(&market, token, query(BY_DISTRICT, "k-crash")).await?;
    assert!(!retried.summary.replayed);
    assert_eq!(retried.summary.charge_minor, 250);
    run(&market, token, query(BY_DISTRICT, "k-crash")).await?;
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        9_250
    );

    // The quota is 4 queries a month.
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

/// Publishes the sample product as `id` with differential privacy (epsilon
/// 1.0 a month per consumer, 0.4 a query) under an approved contract, and
/// funds the consumer.
async fn dp_product(market: &TestMarket, cast: &Cast, id: &str) -> anyhow::Result<String> {
    let mut spec = sample_spec();
    let policy = spec.output_policy.as_mut().context("policy")?;
    policy.dp_epsilon_budget = 1.0;
    policy.dp_epsilon_per_query = 0.4;
    policy.dp_max_rows_per_unit = 1;
    publish_spec(market, cast, id, spec).await?;
    let contract_id = approved_contract(market, cast, contract_request(id)).await?;
    deposit(market, 10_000).await?;
    Ok(contract_id)
}

/// A differentially private product: each consumer has epsilon 1.0 a month
/// for it, and each query spends 0.4 — two queries, then a refusal that
/// costs nothing. The spend is persisted with the charge.
async fn privacy_budget_is_debited_with_the_charge(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    let contract_id = dp_product(&market, &cast, "population-dp").await?;
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
        "the refusal, decided before the sandbox ran anything, is not charged"
    );
    assert_eq!(
        counted(&market, &contract_id).await?.0,
        3,
        "but it counts against the quota"
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

/// A consumer who fires many queries at once on a differentially private
/// product to spend the budget several times over: each reservation would
/// read the same remainder (1.0) and each run spend 0.4 of it. Only one runs
/// at a time, so no more than the budget is ever spent, and the others are
/// told to retry (not charged, not counted).
async fn concurrent_queries_cannot_overspend_the_privacy_budget(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    dp_product(&market, &cast, "population-dp").await?;
    let runs = (0..6).map(|i| {
        let request = proto::RunQueryRequest {
            product_id: "population-dp".into(),
            ..query(BY_DISTRICT, &format!("dp-burst-{i}"))
        };
        run(&market, &cast.consumer_analyst, request)
    });
    let outcomes = futures::future::join_all(runs).await;
    let mut spent = 0.0;
    let (mut answered, mut retry, mut exhausted) = (0, 0, 0);
    for outcome in outcomes {
        match outcome {
            Ok(answer) => {
                answered += 1;
                spent += answer.summary.privacy_spent;
            }
            Err(status) if status.code() == Code::Aborted => retry += 1,
            Err(status) if status.code() == Code::ResourceExhausted => exhausted += 1,
            Err(status) => anyhow::bail!("unexpected refusal: {status:?}"),
        }
    }
    assert_eq!(answered + retry + exhausted, 6);
    assert!((1..=2).contains(&answered), "{answered} answered");
    assert!(spent <= 1.0 + 1e-9, "spent {spent} of a budget of 1.0");
    let stored: f64 = {
        use sqlx::Row as _;
        sqlx::query("SELECT spent FROM privacy_budgets WHERE product_id = 'population-dp'")
            .fetch_one(&market.raw_pool().await?)
            .await?
            .try_get("spent")?
    };
    assert!(
        (stored - spent).abs() < 1e-9,
        "persisted {stored}, answered {spent}"
    );
    // Once the burst is over, the remainder is there for the next query.
    let next = run(
        &market,
        &cast.consumer_analyst,
        proto::RunQueryRequest {
            product_id: "population-dp".into(),
            ..query(BY_DISTRICT, "dp-after")
        },
    )
    .await;
    match (answered, next) {
        (1, Ok(answer)) => assert!((answer.summary.privacy_spent - 0.4).abs() < 1e-9),
        (2, Err(status)) => assert_eq!(status.code(), Code::ResourceExhausted),
        (n, Ok(answer)) => anyhow::bail!("after {n} answered: {:?}", answer.summary),
        (n, Err(status)) => anyhow::bail!("after {n} answered: {status:?}"),
    }
    market.stop().await;
    Ok(())
}

/// A rival provider who points a product of its own at city-data's files,
/// or anywhere outside the data directory, is refused with the field named;
/// and a column in city-data's file that its spec does not declare
/// (`household_size`) is not there as far as a consumer's query can tell.
async fn a_product_reaches_only_its_own_declared_data(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    for (id, location) in [
        ("stolen", "products/population"),
        ("stolen-parent", "products"),
        ("stolen-child", "products/population/residents"),
        ("stolen-dotted", "./products/population"),
        ("stolen-absolute", "/etc"),
        ("stolen-uri", "file:///etc"),
        ("stolen-climb", "products/rival/../population"),
    ] {
        let mut spec = sample_spec();
        spec.storage_location = location.into();
        let refused = registry
            .create_product(authed(
                &cast.rival_provider_admin,
                proto::CreateProductRequest {
                    id: id.into(),
                    spec: Some(spec),
                },
            ))
            .await
            .expect_err(location);
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{location}: {refused:?}"
        );
        assert!(
            refused
                .message()
                .starts_with("invalid spec.storage_location:"),
            "{location}: {}",
            refused.message()
        );
    }
    // A folder of its own is fine.
    let mut own = sample_spec();
    own.storage_location = "products/rival-population".into();
    registry
        .create_product(authed(
            &cast.rival_provider_admin,
            proto::CreateProductRequest {
                id: "rival-population".into(),
                spec: Some(own),
            },
        ))
        .await?;
    let token = &cast.consumer_analyst;
    let undeclared = run(
        &market,
        token,
        query(
            "SELECT district, COUNT(*) FROM residents WHERE household_size = 1 GROUP BY district",
            "k-undeclared",
        ),
    )
    .await
    .err()
    .context("an undeclared column is not served")?;
    assert_eq!(undeclared.code(), Code::InvalidArgument, "{undeclared:?}");
    assert!(
        undeclared.message().contains("household_size"),
        "{}",
        undeclared.message()
    );
    let listed = run(
        &market,
        token,
        query("SELECT * FROM residents LIMIT 1", "k-star"),
    )
    .await;
    match listed {
        Ok(answer) => {
            for batch in &answer.batches {
                assert!(batch.schema().index_of("household_size").is_err());
            }
        }
        Err(status) => assert!(
            !status.message().contains("household_size"),
            "{}",
            status.message()
        ),
    }
    market.stop().await;
    Ok(())
}

/// A consumer whose contract is revoked replays an earlier query's key to
/// read its released rows again: refused, like a new query would be.
async fn a_replay_needs_a_contract_that_still_allows_the_query(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    let contract_id = contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    let first = run(&market, token, query(BY_DISTRICT, "k-before-revocation")).await?;
    assert!(!first.batches.is_empty());
    let again = run(&market, token, query(BY_DISTRICT, "k-before-revocation")).await?;
    assert!(
        again.summary.replayed,
        "the same key replays while the contract stands"
    );
    ContractsClient::new(market.channel.clone())
        .revoke_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id,
                reason: "breach".into(),
            },
        ))
        .await?;
    let replay = run(&market, token, query(BY_DISTRICT, "k-before-revocation"))
        .await
        .err()
        .context("a replay after revocation is refused")?;
    assert_eq!(replay.code(), Code::PermissionDenied, "{replay:?}");
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        10_000 - 250,
        "the one query that ran is the one that was charged"
    );
    market.stop().await;
    Ok(())
}

/// A product transferred to another provider takes its contracts along:
/// the old provider can no longer revoke them, the new one can.
async fn a_transfer_moves_the_products_contracts(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    let contract_id = contract(&market, &cast, 0).await?;
    RegistryClient::new(market.channel.clone())
        .transfer_product(authed(
            &cast.admin,
            proto::TransferProductRequest {
                product_id: "population".into(),
                to_organization_id: "rival-data".into(),
                reason: "the department moved".into(),
            },
        ))
        .await?;
    let mut contracts = ContractsClient::new(market.channel.clone());
    let revoke = |token: &str| {
        authed(
            token,
            proto::ContractAction {
                contract_id: contract_id.clone(),
                reason: "no longer ours".into(),
            },
        )
    };
    let old = contracts
        .revoke_contract(revoke(&cast.provider_admin))
        .await
        .expect_err("the old provider no longer holds the contract");
    assert_eq!(old.code(), Code::PermissionDenied, "{old:?}");
    let revoked = contracts
        .revoke_contract(revoke(&cast.rival_provider_admin))
        .await?
        .into_inner();
    assert_eq!(revoked.provider_organization_id, "rival-data");
    assert_eq!(revoked.state(), proto::ContractState::Revoked);
    market.stop().await;
    Ok(())
}

/// A rival provider tries to reach city-data's folder by the back doors: a
/// link to it, a folder a pending revision has claimed, and a transfer that
/// would leave a shared folder between two providers. Each is refused.
async fn folders_cannot_be_claimed_through_links_revisions_or_transfers(
    db: Db,
) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 0).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let products = market.market.data_dir().join("products");
    std::os::unix::fs::symlink(products.join("population"), products.join("rival-link"))?;
    let mut linked = sample_spec();
    linked.storage_location = "products/rival-link".into();
    registry
        .create_product(authed(
            &cast.rival_provider_admin,
            proto::CreateProductRequest {
                id: "rival-link".into(),
                spec: Some(linked),
            },
        ))
        .await?;
    let refused = registry
        .submit_product(authed(&cast.rival_provider_admin, action("rival-link", "")))
        .await
        .expect_err("a folder reached through a link is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("invalid spec.storage_location:")
            && refused.message().contains("link"),
        "{}",
        refused.message()
    );

    let mut moved = sample_spec();
    moved.storage_location = "products/next-population".into();
    let pending = registry
        .revise_product(authed(
            &cast.provider_admin,
            proto::ReviseProductRequest {
                product_id: "population".into(),
                spec: Some(moved),
                reason: "new files".into(),
            },
        ))
        .await?
        .into_inner();
    assert!(pending.pending_revision.is_some());
    let mut squatter = sample_spec();
    squatter.storage_location = "products/next-population/rival".into();
    let refused = registry
        .create_product(authed(
            &cast.rival_provider_admin,
            proto::CreateProductRequest {
                id: "squatter".into(),
                spec: Some(squatter),
            },
        ))
        .await
        .expect_err("a folder a pending revision claims is taken");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("invalid spec.storage_location:"),
        "{}",
        refused.message()
    );

    let transfer = |id: &str| {
        authed(
            &cast.admin,
            proto::TransferProductRequest {
                product_id: id.into(),
                to_organization_id: "rival-data".into(),
                reason: "reorganised".into(),
            },
        )
    };
    let refused = registry
        .transfer_product(transfer("population"))
        .await
        .expect_err("a product with a pending revision stays put");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // A second product over the same folder: city-data's own, so allowed;
    // transferred, it would share the folder with city-data's population.
    registry
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: "population-copy".into(),
                spec: Some(sample_spec()),
            },
        ))
        .await?;
    let refused = registry
        .transfer_product(transfer("population-copy"))
        .await
        .expect_err("a transfer may not split a shared folder between providers");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("invalid spec.storage_location:"),
        "{}",
        refused.message()
    );
    market.stop().await;
    Ok(())
}

/// A consumer probing the policy query after refused query is turned away
/// once it has had the limit's worth in a minute, good queries included,
/// and the refusals are counted per consumer for the operators' dashboards.
async fn a_consumer_probing_the_policy_is_throttled(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |config| config.unanswered_per_minute = 3).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    for i in 0..3 {
        let refused = run(
            &market,
            token,
            query(
                "SELECT district, COUNT(*) FROM residents GROUP BY district, person_id",
                &format!("k-probe-{i}"),
            ),
        )
        .await
        .err()
        .context("a blocked column is refused")?;
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
    let throttled = run(&market, token, query(BY_DISTRICT, "k-after-probes"))
        .await
        .err()
        .context("the fourth query in the minute is turned away")?;
    assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled:?}");
    assert!(
        throttled.message().contains("wait a minute"),
        "{}",
        throttled.message()
    );
    let exposition = market.market.metrics().encode();
    assert!(
        exposition.contains("civicgrid_marketplace_unanswered_queries_total{consumer=\"acme\"} 3"),
        "{exposition}"
    );
    market.stop().await;
    Ok(())
}

/// A provider lowers its published product's threshold from 10 to 2 in a
/// revision: the product goes on serving under k = 10 until a platform
/// admin approves the revision, which is then measured and becomes the next
/// version. A rejected revision changes nothing; a description change needs
/// no review, a move to other data centers does. Consumers never see a
/// revision under review.
async fn a_revision_that_changes_the_policy_waits_for_review(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let get = |token: &str| {
        authed(
            token,
            proto::GetProductRequest {
                product_id: "population".into(),
            },
        )
    };
    let published = registry
        .get_product(get(&cast.provider_admin))
        .await?
        .into_inner();
    let revise = |spec: proto::ProductSpec, reason: &str| {
        authed(
            &cast.provider_admin,
            proto::ReviseProductRequest {
                product_id: "population".into(),
                spec: Some(spec),
                reason: reason.into(),
            },
        )
    };
    let mut lowered = published.spec.clone().context("spec")?;
    lowered
        .output_policy
        .as_mut()
        .context("policy")?
        .min_aggregation_count = 2;
    let pending = registry
        .revise_product(revise(lowered.clone(), "smaller groups"))
        .await?
        .into_inner();
    assert_eq!(pending.version, published.version, "nothing new serves yet");
    assert_eq!(pending.spec, published.spec);
    assert_eq!(
        pending
            .pending_revision
            .as_ref()
            .and_then(|s| s.output_policy.as_ref())
            .map(|p| p.min_aggregation_count),
        Some(2)
    );
    let seen_by_consumer = registry
        .get_product(get(&cast.consumer_analyst))
        .await?
        .into_inner();
    assert!(seen_by_consumer.pending_revision.is_none());
    let answered = run(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-under-review"),
    )
    .await?;
    assert!(!answered.batches.is_empty());
    let second = registry
        .revise_product(revise(lowered.clone(), "again"))
        .await
        .expect_err("one revision at a time");
    assert_eq!(second.code(), Code::FailedPrecondition, "{second:?}");
    let approved = registry
        .approve_revision(authed(&cast.admin, action("population", "")))
        .await?
        .into_inner();
    assert_eq!(approved.version, published.version + 1);
    assert!(approved.pending_revision.is_none());
    assert_eq!(
        approved
            .spec
            .as_ref()
            .and_then(|s| s.output_policy.as_ref())
            .map(|p| p.min_aggregation_count),
        Some(2)
    );
    assert!(
        approved
            .spec
            .as_ref()
            .and_then(|s| s.quality.as_ref())
            .is_some(),
        "measured afresh"
    );
    // A rejected revision leaves the product as it was.
    let mut moved = approved.spec.clone().context("spec")?;
    moved.tables[0].columns[1].sensitivity = proto::Sensitivity::Blocked as i32;
    registry
        .revise_product(revise(moved, "hide age bands"))
        .await?;
    let unreasoned = registry
        .reject_revision(authed(&cast.admin, action("population", "")))
        .await
        .expect_err("a rejection needs a reason");
    assert_eq!(unreasoned.code(), Code::InvalidArgument);
    let rejected = registry
        .reject_revision(authed(&cast.admin, action("population", "not needed")))
        .await?
        .into_inner();
    assert_eq!(rejected.version, approved.version);
    assert_eq!(rejected.spec, approved.spec);
    assert!(rejected.pending_revision.is_none());
    // A description is not what the product serves: no review.
    let mut described = approved.spec.clone().context("spec")?;
    described.description = "Residents per district, refreshed monthly".into();
    let redescribed = registry
        .revise_product(revise(described, "wording"))
        .await?
        .into_inner();
    assert_eq!(redescribed.version, approved.version + 1);
    assert!(redescribed.pending_revision.is_none());
    // Where the data lives is: moving it to a partner cloud in another
    // region waits for review, and the product stays where it was.
    let mut relocated = redescribed.spec.clone().context("spec")?;
    relocated.hosting_data_centers = vec!["partner-cloud-east".into()];
    relocated.tier = "partner".into();
    relocated.region = "east".into();
    let waiting = registry
        .revise_product(revise(relocated, "cheaper hosting"))
        .await?
        .into_inner();
    assert_eq!(waiting.version, redescribed.version);
    assert_eq!(waiting.spec, redescribed.spec);
    assert_eq!(
        waiting
            .pending_revision
            .as_ref()
            .map(|s| s.hosting_data_centers.clone()),
        Some(vec!["partner-cloud-east".to_owned()])
    );
    registry
        .reject_revision(authed(
            &cast.admin,
            action("population", "stays in the city"),
        ))
        .await?;
    let kinds: Vec<String> = registry
        .list_registration_events(authed(
            &cast.provider_admin,
            proto::GetProductRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.kind)
        .rev()
        .take(7)
        .collect();
    assert_eq!(
        kinds,
        [
            "revision_rejected",
            "revision_submitted",
            "changed",
            "revision_rejected",
            "revision_submitted",
            "changed",
            "revision_submitted"
        ]
    );
    market.stop().await;
    Ok(())
}

/// A client whose deadline passes mid-query (the server drops its handler)
/// does not leave the query running with its hold: it settles as if the
/// client had waited, and a retry under its key replays that outcome.
async fn a_client_that_gives_up_mid_query_leaves_no_hold(db: Db) -> anyhow::Result<()> {
    // The product withholds rows, so its queries have the server's budget.
    let (market, cast) = start_with(db, |c| c.default_compute_units = 20_000).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let token = &cast.consumer_analyst;
    // A billion-row cross join: it runs until its fuel (at most 20,000
    // compute units, 2·10¹⁰ fuel, about 5 s on an idle 2-core machine; drawn
    // below that, but above a tenth of it all but once in a million runs) is
    // gone, long after the client's deadline. 2,000 units burnt in 0.3–0.5
    // s, and the query sometimes ended before the 300 ms deadline did.
    let slow = query(
        "SELECT a.district FROM residents a CROSS JOIN residents b CROSS JOIN residents c \
         WHERE concat(a.district, b.district, c.district) = 'none'",
        "k-gave-up",
    );
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
    // It ran out of fuel and was settled as failed, charged once.
    let status = settled.err().context("the query stops on its fuel")?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let after = balance(&market, &cast.consumer_admin, "").await?;
    assert_eq!((after.balance_minor, after.held_minor), (9_750, 0));
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

/// Publishes `id` with `spec` and gives acme an active contract on it for
/// aggregate SQL under its first plan; returns the contract's id.
async fn aggregate_contract(
    market: &TestMarket,
    cast: &Cast,
    id: &str,
    spec: proto::ProductSpec,
) -> anyhow::Result<String> {
    let plan_id = spec.price_plans[0].id.clone();
    publish_spec(market, cast, id, spec).await?;
    approved_contract(
        market,
        cast,
        proto::RequestContractRequest {
            plan_id,
            operations: Some(proto::AllowedOperations {
                aggregate_sql: true,
                ..Default::default()
            }),
            ..contract_request(id)
        },
    )
    .await
}

/// Publishes `population-open`, the sample data with every column public
/// and nothing withheld, priced per compute unit (1 minor unit each), so a
/// query's budget is the consumer's and its cost exact; gives acme an
/// aggregate contract on it and returns the contract's id.
pub(crate) async fn open_product_contract(
    market: &TestMarket,
    cast: &Cast,
) -> anyhow::Result<String> {
    let mut open = sample_spec();
    open.storage_location = "products/population-open".into();
    for column in &mut open.tables[0].columns {
        column.sensitivity = proto::Sensitivity::Public as i32;
    }
    open.output_policy = Some(proto::OutputPolicy {
        min_aggregation_count: 1,
        max_result_bytes: 1 << 20,
        ..Default::default()
    });
    open.price_plans = vec![per_compute_unit()];
    civicgrid_marketplace::quality::write_sample_population(
        &market.market.data_dir().join("products/population-open"),
        SAMPLE_ROWS,
    )?;
    aggregate_contract(market, cast, "population-open", open).await
}

fn per_compute_unit() -> proto::PricePlan {
    proto::PricePlan {
        id: "per-unit".into(),
        kind: proto::PriceKind::PerComputeUnit as i32,
        unit_price_minor: 1,
        currency: "EUR".into(),
        ..Default::default()
    }
}

/// The attack: a query's cost grows with the rows its filter keeps, so
/// `COUNT(*) … WHERE` a slice too small to release, run with one condition
/// changed, would tell by its fuel, compute units, bill, wall time or bytes
/// read — or by which `max_compute_units` let it finish — how many people
/// the slice holds. On a product that withholds rows none of these reach the
/// consumer: not in the answer's summary, the listings of anyone who can
/// list it, the audit entry or the invoice; the price cannot be by compute
/// (the registry refuses such a plan) and the budget is the server's. A
/// product that withholds nothing is metered exactly, and the same query
/// costs the same every time.
async fn a_querys_cost_counts_no_withheld_rows(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start(db).await?;
    // Priced by compute under a threshold: refused, naming the plan.
    let mut by_compute = sample_spec();
    by_compute.price_plans.push(per_compute_unit());
    let refused = RegistryClient::new(market.channel.clone())
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: "population".into(),
                spec: Some(by_compute),
            },
        ))
        .await
        .expect_err("a threshold product priced by compute");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().starts_with(
            "invalid spec.price_plans[1].kind: a product whose output policy withholds rows"
        ),
        "{refused:?}"
    );

    let guarded = aggregate_contract(&market, &cast, "population", sample_spec()).await?;
    open_product_contract(&market, &cast).await?;
    deposit(&market, 1_000_000).await?;
    let token = &cast.consumer_analyst;

    // No budget of the consumer's choosing to binary-search.
    let chosen = run(
        &market,
        token,
        proto::RunQueryRequest {
            max_compute_units: 3,
            ..query(BY_DISTRICT, "k-chosen-budget")
        },
    )
    .await
    .err()
    .context("a chosen budget is refused")?;
    assert_eq!(chosen.code(), Code::InvalidArgument, "{chosen:?}");
    assert!(
        chosen.message().starts_with(
            "invalid max_compute_units: product population withholds rows, so every query on it \
             has the server's compute budget"
        ),
        "{chosen:?}"
    );

    // Two slices, each too small to release: one resident of the old town
    // has no age band, and none of the harbour.
    let slices = [
        "SELECT COUNT(*) AS people FROM residents WHERE district = 'old-town' AND age_band = ''",
        "SELECT COUNT(*) AS people FROM residents WHERE district = 'harbour' AND age_band = ''",
    ];
    let mut ids = Vec::new();
    let mut seen = Vec::new();
    for (i, slice) in slices.iter().enumerate() {
        let answer = run(&market, token, query(slice, &format!("k-slice-{i}"))).await?;
        let summary = answer.summary;
        assert_eq!(summary.state, "completed", "{summary:?}");
        assert!(answer.batches.iter().all(|b| b.num_rows() == 0), "withheld");
        let cost = (
            summary.metering.clone(),
            summary.fuel,
            summary.compute_units,
            summary.wall_time_ms,
            summary.rows_read,
            summary.bytes_read,
            summary.charge_minor,
        );
        assert_eq!(
            cost,
            ("withheld".to_owned(), 0, 0, 0, 0, 0, 250),
            "{summary:?}"
        );
        seen.push(cost);
        ids.push((
            summary.query_id.clone(),
            summary.audit_index,
            summary.created_at_unix_ms,
        ));
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(counted(&market, &guarded).await?, (2, 0));
    assert_eq!(
        balance(&market, &cast.consumer_admin, "")
            .await?
            .balance_minor,
        1_000_000 - 500
    );
    // Nobody's listing holds the cost either (it was never stored; the
    // server's log has it), and the time shown is when the query was
    // admitted, not when it ended.
    for viewer in [&cast.consumer_admin, &cast.provider_admin, &cast.regulator] {
        let listed = QueriesClient::new(market.channel.clone())
            .list_usage(authed(viewer, proto::ListUsageRequest::default()))
            .await?
            .into_inner()
            .queries;
        for (id, _, created_at) in &ids {
            let summary = listed
                .iter()
                .find(|summary| &summary.query_id == id)
                .with_context(|| format!("{id} is listed"))?;
            assert_eq!(
                (
                    summary.metering.as_str(),
                    summary.fuel,
                    summary.compute_units,
                    summary.wall_time_ms,
                    summary.rows_read,
                    summary.bytes_read,
                    summary.created_at_unix_ms
                ),
                ("withheld", 0, 0, 0, 0, 0, *created_at),
                "{summary:?}"
            );
        }
    }
    for (_, index, _) in &ids {
        let (text, entry) = audit_entry(&market, &cast.regulator, *index).await?;
        let details = &entry["details"];
        assert_eq!(details["metering"], "withheld", "{text}");
        for field in ["fuel", "compute_units", "rows_read"] {
            assert_eq!(details[field], 0, "{field}: {text}");
        }
    }
    let period = civicgrid_marketplace::billing::period_of(civicgrid_marketplace::store::now_ms());
    let invoice = BillingClient::new(market.channel.clone())
        .get_invoice(authed(
            &cast.consumer_admin,
            proto::GetInvoiceRequest {
                organization_id: String::new(),
                period: period.clone(),
            },
        ))
        .await?
        .into_inner();
    let line = invoice
        .lines
        .iter()
        .find(|line| line.product_id == "population")
        .context("an invoice line")?;
    assert_eq!((line.queries, line.compute_units), (2, 0), "{invoice:?}");

    // A refusal is withheld too: the guest refuses some queries only after
    // reading rows.
    let blocked = run(
        &market,
        token,
        query("SELECT person_id FROM residents", "k-blocked"),
    )
    .await
    .err()
    .context("a blocked column is refused")?;
    let blocked = listed(&market, &cast.consumer_admin, &blocked).await?;
    assert_eq!(
        (
            blocked.state.as_str(),
            blocked.metering.as_str(),
            blocked.fuel
        ),
        ("rejected", "withheld", 0),
        "{blocked:?}"
    );

    // The same slice on a product that withholds nothing: exact, priced by
    // compute, and the same every time.
    let mut exact = Vec::new();
    for attempt in 0..2 {
        let answer = run(
            &market,
            token,
            proto::RunQueryRequest {
                product_id: "population-open".into(),
                ..query(slices[0], &format!("k-open-{attempt}"))
            },
        )
        .await?;
        let summary = answer.summary;
        assert_eq!(summary.metering, "exact", "{summary:?}");
        assert!(summary.fuel > 0 && summary.rows_read > 0, "{summary:?}");
        assert_eq!(
            (summary.compute_units, summary.charge_minor),
            ((summary.fuel + 999_999) / 1_000_000, summary.compute_units),
            "{summary:?}"
        );
        exact.push((summary.fuel, summary.compute_units));
    }
    assert_eq!(exact[0], exact[1]);
    // There the consumer may choose its budget: out of fuel, a query pays
    // for all of it.
    let starved = run(
        &market,
        token,
        proto::RunQueryRequest {
            product_id: "population-open".into(),
            max_compute_units: 1,
            ..query(BY_DISTRICT, "k-open-starved")
        },
    )
    .await
    .err()
    .context("a query with one compute unit runs out of fuel")?;
    assert_eq!(starved.code(), Code::ResourceExhausted, "{starved:?}");
    assert!(
        starved.message().ends_with(
            ": the query used its whole compute budget; a larger max_compute_units, where the \
             product lets you choose one, may let it finish (compute_budget_exhausted)"
        ),
        "{starved:?}"
    );
    let starved = listed(&market, &cast.consumer_admin, &starved).await?;
    assert_eq!(
        (
            starved.metering.as_str(),
            starved.fuel,
            starved.compute_units,
            starved.charge_minor
        ),
        ("exact", 1_000_000, 1, 1),
        "{starved:?}"
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
    concurrent_queries_cannot_overspend_the_privacy_budget,
    a_product_reaches_only_its_own_declared_data,
    a_replay_needs_a_contract_that_still_allows_the_query,
    a_transfer_moves_the_products_contracts,
    folders_cannot_be_claimed_through_links_revisions_or_transfers,
    a_consumer_probing_the_policy_is_throttled,
    a_revision_that_changes_the_policy_waits_for_review,
    a_client_that_gives_up_mid_query_leaves_no_hold,
    failed_queries_are_charged_counted_and_quote_no_data,
    a_querys_cost_counts_no_withheld_rows,
);
