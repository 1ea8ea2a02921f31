//! Quality feedback, on SQLite and PostgreSQL: a consumer reports a problem
//! in a product's data, the provider answers and marks it fixed, the
//! reporter reopens it, and the catalog and its DCAT export show open
//! reports and their age.
//!
//! Attackers: a rival consumer with no contract flooding a product with
//! reports; a rival provider answering (closing) another provider's
//! reports or reading them; a consumer citing someone else's query as its
//! evidence; a provider "fixing" a report in a version that does not exist.

use civicgrid_marketplace::proto::{
    self, audit_client::AuditClient, registry_client::RegistryClient,
};
use civicgrid_tests::market::{Db, TestMarket, authed};
use tonic::Code;

use super::queries::{BY_DISTRICT, contract, deposit, query, run, start_with};

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn report(
    product: &str,
    column: &str,
    description: &str,
    query: &str,
) -> proto::ReportQualityIssueRequest {
    proto::ReportQualityIssueRequest {
        product_id: product.into(),
        column: column.into(),
        description: description.into(),
        query_id: query.into(),
    }
}

async fn listed(market: &TestMarket, token: &str, open_only: bool) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> = RegistryClient::new(market.channel.clone())
        .list_quality_reports(authed(
            token,
            proto::ListQualityReportsRequest {
                product_id: String::new(),
                open_only,
            },
        ))
        .await?
        .into_inner()
        .reports
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    Ok(ids)
}

async fn open_in_catalog(market: &TestMarket, token: &str) -> anyhow::Result<(i64, i64)> {
    let product = RegistryClient::new(market.channel.clone())
        .search_catalog(authed(token, proto::SearchCatalogRequest::default()))
        .await?
        .into_inner()
        .products
        .into_iter()
        .find(|p| p.id == "population")
        .ok_or_else(|| anyhow::anyhow!("population is in the catalog"))?;
    Ok((
        product.open_quality_reports,
        product.oldest_open_quality_report_unix_ms,
    ))
}

async fn reports_answers_fixes_and_reopens(db: Db) -> anyhow::Result<()> {
    let (market, cast) = start_with(db, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let ran = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-q")).await?;
    let query_id = ran.summary.query_id.clone();
    let mut registry = RegistryClient::new(market.channel.clone());

    // No contract, no report; bad fields are named.
    let status = registry
        .report_quality_issue(authed(
            &cast.rival_consumer_admin,
            report("population", "", "wrong", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("has never held a contract"),
        "{status:?}"
    );
    for (request, code, needle) in [
        (
            report("population", "residents.income", "x", ""),
            Code::InvalidArgument,
            "column",
        ),
        (
            report("population", "", "", ""),
            Code::InvalidArgument,
            "description",
        ),
        (
            report("population", "", &"x".repeat(2001), ""),
            Code::InvalidArgument,
            "description",
        ),
        (
            report("population", "", "x", "q_not_there"),
            Code::NotFound,
            "q_not_there",
        ),
        (
            report("no-such-product", "", "x", ""),
            Code::NotFound,
            "no-such-product",
        ),
    ] {
        let status = registry
            .report_quality_issue(authed(&cast.consumer_analyst, request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
    // The provider is not a consumer of its own product.
    let status = registry
        .report_quality_issue(authed(
            &cast.provider_admin,
            report("population", "", "x", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let first = registry
        .report_quality_issue(authed(
            &cast.consumer_analyst,
            report(
                "population",
                "residents.age_band",
                "ten rows have a blank age band",
                &query_id,
            ),
        ))
        .await?
        .into_inner();
    assert_eq!(
        (
            first.state.as_str(),
            first.product_version,
            first.reporter_organization_id.as_str()
        ),
        ("open", 1, "acme")
    );
    let second = registry
        .report_quality_issue(authed(
            &cast.consumer_admin,
            report("population", "", "district names changed spelling", ""),
        ))
        .await?
        .into_inner();
    let mut both = vec![first.id.clone(), second.id.clone()];
    both.sort();

    // Who sees what: the reporter's organization, the provider, the
    // regulator; not the rivals. The catalog shows everyone the count.
    assert_eq!(listed(&market, &cast.consumer_analyst, false).await?, both);
    assert_eq!(listed(&market, &cast.provider_analyst, false).await?, both);
    assert_eq!(listed(&market, &cast.regulator, false).await?, both);
    assert!(
        listed(&market, &cast.rival_consumer_admin, false)
            .await?
            .is_empty()
    );
    assert!(
        listed(&market, &cast.rival_provider_admin, false)
            .await?
            .is_empty()
    );
    assert_eq!(
        open_in_catalog(&market, &cast.rival_consumer_admin).await?,
        (2, first.created_at_unix_ms)
    );
    let dcat = registry
        .export_catalog(authed(
            &cast.rival_consumer_admin,
            proto::ExportCatalogRequest::default(),
        ))
        .await?
        .into_inner()
        .json_ld;
    let dcat: serde_json::Value = serde_json::from_str(&dcat)?;
    let dataset = dcat["dcat:dataset"]
        .as_array()
        .and_then(|sets| sets.iter().find(|d| d["dct:identifier"] == "population"))
        .ok_or_else(|| anyhow::anyhow!("population in the DCAT export"))?;
    let open_reports = dataset["dqv:hasQualityMeasurement"]
        .as_array()
        .and_then(|ms| {
            ms.iter().find(|m| {
                m["dqv:isMeasurementOf"]["@id"]
                    .as_str()
                    .is_some_and(|id| id.ends_with("/metrics/open-quality-reports"))
            })
        })
        .ok_or_else(|| anyhow::anyhow!("an open-reports measurement"))?;
    assert_eq!(open_reports["dqv:value"], 2);

    // Only the product's provider answers, and only with the permission;
    // to anyone else the report does not exist.
    let answer = |token: &str, message: &str, fixed: i64| {
        let mut registry = registry.clone();
        let request = authed(
            token,
            proto::AnswerQualityReportRequest {
                report_id: first.id.clone(),
                message: message.into(),
                fixed_in_version: fixed,
            },
        );
        async move { registry.answer_quality_report(request).await }
    };
    for token in [&cast.rival_provider_admin, &cast.consumer_admin] {
        let status = answer(token, "closed", 1).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (
                Code::NotFound,
                format!("quality report {:?} not found", first.id).as_str()
            )
        );
    }
    assert_eq!(
        answer(&cast.provider_analyst, "closed", 1)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let status = answer(&cast.provider_admin, "fixed in v5", 5)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("fixed_in_version"), "{status:?}");
    let answered = answer(&cast.provider_admin, "looking into it", 0)
        .await?
        .into_inner();
    assert_eq!(
        (answered.state.as_str(), answered.answer.as_str()),
        ("open", "looking into it")
    );
    // Not fixed in the very version it was found in: a fix is a later one.
    let status = answer(&cast.provider_admin, "blank bands filled", 1)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("has no version after 1 (the version reported) yet"),
        "{status:?}"
    );
    let mut revised = civicgrid_tests::market::sample_spec();
    revised.description =
        "Registered residents per district and age band, monthly; blank bands filled".into();
    let product = RegistryClient::new(market.channel.clone())
        .revise_product(authed(
            &cast.provider_admin,
            proto::ReviseProductRequest {
                product_id: "population".into(),
                spec: Some(revised),
                reason: "blank age bands filled".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(product.version, 2);
    let fixed = answer(&cast.provider_admin, "blank bands filled", 2)
        .await?
        .into_inner();
    assert_eq!((fixed.state.as_str(), fixed.fixed_in_version), ("fixed", 2));
    assert_eq!(
        answer(&cast.provider_admin, "again", 2)
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        listed(&market, &cast.consumer_analyst, true).await?,
        vec![second.id.clone()]
    );
    assert_eq!(
        open_in_catalog(&market, &cast.consumer_analyst).await?,
        (1, second.created_at_unix_ms)
    );

    // The reporter checks, and reopens; nobody else can.
    let reopen = |token: &str| {
        let mut registry = registry.clone();
        let request = authed(
            token,
            proto::ReopenQualityReportRequest {
                report_id: first.id.clone(),
                reason: "still blank in district 7".into(),
            },
        );
        async move { registry.reopen_quality_report(request).await }
    };
    assert_eq!(
        reopen(&cast.rival_consumer_admin).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        reopen(&cast.provider_admin).await.unwrap_err().code(),
        Code::NotFound
    );
    let reopened = reopen(&cast.consumer_analyst).await?.into_inner();
    assert_eq!(
        (reopened.state.as_str(), reopened.fixed_in_version),
        ("open", 0)
    );
    assert_eq!(
        reopen(&cast.consumer_analyst).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(open_in_catalog(&market, &cast.consumer_analyst).await?.0, 2);

    // Every step is in the log, and the provider can prove its answers.
    let entries = AuditClient::new(market.channel.clone())
        .get_entries(authed(
            &cast.regulator,
            proto::GetEntriesRequest {
                start: 0,
                end: 10_000,
                kind_prefix: "quality.".into(),
                tenant: String::new(),
            },
        ))
        .await?
        .into_inner()
        .entries;
    let kinds: Vec<String> = entries
        .iter()
        .map(|e| {
            serde_json::from_slice::<serde_json::Value>(&e.body)
                .map(|v| v["kind"].as_str().unwrap_or_default().to_owned())
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(
        kinds,
        [
            "quality.reported",
            "quality.reported",
            "quality.answered",
            "quality.fixed",
            "quality.reopened"
        ]
    );
    let reported: serde_json::Value = serde_json::from_slice(&entries[0].body)?;
    assert_eq!(
        reported["details"]["description_sha256"],
        sha256_hex("ten rows have a blank age band")
    );
    let fixed_entry = entries[3].index;
    let mut audit = AuditClient::new(market.channel.clone());
    let receipt = audit
        .get_receipt(authed(
            &cast.provider_admin,
            proto::GetReceiptRequest {
                entry_index: fixed_entry,
                witnessed: false,
            },
        ))
        .await?
        .into_inner();
    assert_eq!(receipt.entry, entries[3].body);
    let status = audit
        .get_receipt(authed(
            &cast.rival_provider_admin,
            proto::GetReceiptRequest {
                entry_index: fixed_entry,
                witnessed: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    market.stop().await;
    Ok(())
}

#[tokio::test]
async fn reports_answers_fixes_and_reopens_on_sqlite() -> anyhow::Result<()> {
    reports_answers_fixes_and_reopens(Db::Sqlite).await
}

#[tokio::test]
async fn reports_answers_fixes_and_reopens_on_postgres() -> anyhow::Result<()> {
    reports_answers_fixes_and_reopens(Db::Postgres).await
}

/// A consumer cannot cite another organization's query as evidence.
#[tokio::test]
async fn another_organizations_query_is_not_evidence() -> anyhow::Result<()> {
    let (market, cast) = start_with(Db::Sqlite, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    deposit(&market, 10_000).await?;
    let ran = run(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-own")).await?;
    // The rival consumer gets a contract of its own, then cites acme's query.
    let mut contracts = civicgrid_marketplace::proto::contracts_client::ContractsClient::new(
        market.channel.clone(),
    );
    let requested = contracts
        .request_contract(authed(
            &cast.rival_consumer_admin,
            civicgrid_tests::market::contract_request("population"),
        ))
        .await?
        .into_inner();
    contracts
        .approve_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: requested.id,
                reason: "ok".into(),
            },
        ))
        .await?;
    let status = RegistryClient::new(market.channel.clone())
        .report_quality_issue(authed(
            &cast.rival_consumer_admin,
            report(
                "population",
                "",
                "your numbers are wrong",
                &ran.summary.query_id,
            ),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::NotFound,
            format!("query {:?} not found", ran.summary.query_id).as_str()
        )
    );
    market.stop().await;
    Ok(())
}

/// A rival cannot bury other organizations' reports under its own, nor learn
/// of a product out of the catalog by reporting on it.
#[tokio::test]
async fn reports_are_capped_per_reporter_and_unlisted_products_do_not_exist() -> anyhow::Result<()>
{
    let (market, cast) = start_with(Db::Sqlite, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    for i in 0..20 {
        registry
            .report_quality_issue(authed(
                &cast.consumer_analyst,
                report("population", "", &format!("problem {i}"), ""),
            ))
            .await?;
    }
    let status = registry
        .report_quality_issue(authed(
            &cast.consumer_analyst,
            report("population", "", "one more", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("acme has 20 open reports on product population"),
        "{status:?}"
    );
    assert_eq!(
        listed(&market, &cast.consumer_admin, false).await?.len(),
        20
    );
    assert_eq!(
        listed(&market, &cast.provider_analyst, true).await?.len(),
        20
    );
    assert!(
        listed(&market, &cast.rival_consumer_admin, false)
            .await?
            .is_empty()
    );

    // A rival provider's draft: to a consumer, as missing as a made-up id.
    registry
        .create_product(authed(
            &cast.rival_provider_admin,
            proto::CreateProductRequest {
                id: "unannounced".into(),
                spec: Some({
                    let mut spec = civicgrid_tests::market::sample_spec();
                    spec.storage_location = "products/unannounced".into();
                    spec
                }),
            },
        ))
        .await?;
    for id in ["unannounced", "made-up"] {
        let status = registry
            .report_quality_issue(authed(&cast.consumer_analyst, report(id, "", "x", "")))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, format!("product {id:?} not found").as_str())
        );
    }
    market.stop().await;
    Ok(())
}

/// Concurrent reports on PostgreSQL cannot pass the cap together: with 19
/// open, one of thirty at once is filed and the rest are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reports_do_not_overshoot_the_cap() -> anyhow::Result<()> {
    let (market, cast) = start_with(Db::Postgres, |_| {}).await?;
    contract(&market, &cast, 0).await?;
    let registry = RegistryClient::new(market.channel.clone());
    for i in 0..19 {
        registry
            .clone()
            .report_quality_issue(authed(
                &cast.consumer_analyst,
                report("population", "", &format!("problem {i}"), ""),
            ))
            .await?;
    }
    let attempts = (0..30).map(|i| {
        let mut registry = registry.clone();
        let request = authed(
            &cast.consumer_analyst,
            report("population", "", &format!("at once {i}"), ""),
        );
        async move { registry.report_quality_issue(request).await }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let filed = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Err(status) if status.code() == Code::ResourceExhausted))
        .count();
    assert_eq!((filed, refused), (1, 29), "{outcomes:?}");
    market.stop().await;
    Ok(())
}
