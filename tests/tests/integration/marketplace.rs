//! The marketplace over a real gRPC connection, on SQLite and on PostgreSQL:
//! the registration lifecycle, contracts, the authorization matrix, bad input,
//! and a regulator verifying the audit log — including after someone edits,
//! deletes or reorders rows of the audit table behind the server's back.

use anyhow::{Context as _, ensure};
use civicgrid_cli::verify::{Finding, authed_client, verify_log};
use civicgrid_marketplace::audit::checkpoint::NoteVerifier;
use civicgrid_marketplace::proto::{
    self, audit_client::AuditClient, contracts_client::ContractsClient,
    identity_client::IdentityClient, registry_client::RegistryClient,
};
use civicgrid_tests::market::{
    Cast, Db, TestMarket, action, authed, contract_request, publish, sample_spec,
};
use tonic::Code;

const ORIGIN: &str = "audit.civicgrid.test";

fn check(
    product: &str,
    operation: proto::OperationKind,
    columns: &[&str],
) -> proto::CheckOperationRequest {
    proto::CheckOperationRequest {
        product_id: product.into(),
        operation: operation as i32,
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        algorithm_sha256: String::new(),
    }
}

async fn save_checkpoint(market: &TestMarket, token: &str) -> anyhow::Result<String> {
    let mut audit = AuditClient::new(market.channel.clone());
    Ok(audit
        .get_checkpoint(authed(token, proto::GetCheckpointRequest::default()))
        .await?
        .into_inner()
        .note)
}

/// What a regulator runs: verify the live log with the key it was given.
async fn regulator_verify(
    market: &TestMarket,
    token: &str,
    saved: Option<&str>,
) -> anyhow::Result<civicgrid_cli::verify::Report> {
    let key: NoteVerifier = market.market.verifier_key().parse()?;
    let mut client = authed_client(market.channel.clone(), token)?;
    Ok(verify_log(&mut client, &key, ORIGIN, saved).await?)
}

async fn lifecycle_contract_and_verified_audit(db: Db) -> anyhow::Result<()> {
    let market = TestMarket::start(db).await?;
    let cast = Cast::create(&market).await?;
    let first_checkpoint = save_checkpoint(&market, &cast.regulator).await?;

    let product = publish(&market, &cast, "population").await?;
    assert_eq!(product.state(), proto::ProductState::Published);
    // Quality was measured from the data at submission, replacing the
    // provider's claim (0.98 / 0.995 / a day): 1,000 residents × 3 declared
    // columns, 10 blank age bands, no nulls in these columns.
    let quality = product
        .spec
        .as_ref()
        .and_then(|s| s.quality)
        .context("quality")?;
    assert_eq!(quality.completeness, 1.0);
    assert!(
        (quality.validity - 2990.0 / 3000.0).abs() < 1e-12,
        "{quality:?}"
    );
    assert!(quality.freshness_seconds < 600, "{quality:?}");

    // The consumer finds it in the catalog, by keyword and by filters.
    let mut registry = RegistryClient::new(market.channel.clone());
    let found = registry
        .search_catalog(authed(
            &cast.consumer_analyst,
            proto::SearchCatalogRequest {
                keywords: vec!["Census".into()],
                tier: "municipal".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .products;
    assert_eq!(
        found.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        ["population"]
    );
    let none = registry
        .search_catalog(authed(
            &cast.consumer_analyst,
            proto::SearchCatalogRequest {
                max_sensitivity: proto::Sensitivity::Sensitive as i32,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .products;
    assert!(
        none.is_empty(),
        "a product with a blocked column is filtered out by max_sensitivity"
    );

    // Contract: request, approve, check, revoke.
    let mut contracts = ContractsClient::new(market.channel.clone());
    let requested = contracts
        .request_contract(authed(&cast.consumer_admin, contract_request("population")))
        .await?
        .into_inner();
    assert_eq!(requested.state(), proto::ContractState::Requested);
    let denied_before = contracts
        .check_operation(authed(
            &cast.consumer_analyst,
            check("population", proto::OperationKind::AggregateSql, &[]),
        ))
        .await?
        .into_inner();
    assert!(!denied_before.allowed, "no operation before approval");
    let active = contracts
        .approve_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: requested.id.clone(),
                reason: String::new(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(active.state(), proto::ContractState::Active);
    assert!(active.expires_at_unix_ms > active.decided_at_unix_ms);
    let allowed = contracts
        .check_operation(authed(
            &cast.consumer_analyst,
            check("population", proto::OperationKind::AggregateSql, &[]),
        ))
        .await?
        .into_inner();
    assert!(allowed.allowed, "{allowed:?}");
    assert_eq!(allowed.contract_id, requested.id);
    let wider_list = contracts
        .check_operation(authed(
            &cast.consumer_analyst,
            check(
                "population",
                proto::OperationKind::ListSql,
                &["district", "age_band"],
            ),
        ))
        .await?
        .into_inner();
    assert!(
        !wider_list.allowed,
        "age_band is not a listed column of the contract"
    );
    let rival = contracts
        .check_operation(authed(
            &cast.rival_consumer_admin,
            check("population", proto::OperationKind::AggregateSql, &[]),
        ))
        .await?
        .into_inner();
    assert!(!rival.allowed, "another consumer has no contract");

    // Revoking a role takes effect on the very next call (casbin's decision
    // cache is cleared by the change), and granting it back restores access.
    let mut identity = IdentityClient::new(market.channel.clone());
    let analyst = identity
        .who_am_i(authed(&cast.consumer_analyst, proto::WhoAmIRequest {}))
        .await?
        .into_inner()
        .user
        .context("user")?
        .id;
    let binding = proto::RoleBindingRequest {
        user_id: analyst,
        role: "consumer-analyst".into(),
    };
    identity
        .revoke_role(authed(&cast.admin, binding.clone()))
        .await?;
    let after_revoke = contracts
        .check_operation(authed(
            &cast.consumer_analyst,
            check("population", proto::OperationKind::AggregateSql, &[]),
        ))
        .await
        .unwrap_err();
    assert_eq!(after_revoke.code(), Code::PermissionDenied);
    identity.grant_role(authed(&cast.admin, binding)).await?;
    let restored = contracts
        .check_operation(authed(
            &cast.consumer_analyst,
            check("population", proto::OperationKind::AggregateSql, &[]),
        ))
        .await?
        .into_inner();
    assert!(restored.allowed);

    // The regulator verifies the log against the checkpoint saved at the start.
    let report = regulator_verify(&market, &cast.regulator, Some(&first_checkpoint)).await?;
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    let middle_checkpoint = report.note.clone();

    contracts
        .revoke_contract(authed(
            &cast.consumer_admin,
            proto::ContractAction {
                contract_id: requested.id.clone(),
                reason: "project finished".into(),
            },
        ))
        .await?;
    let after_revoke = contracts
        .check_operation(authed(
            &cast.consumer_analyst,
            check("population", proto::OperationKind::AggregateSql, &[]),
        ))
        .await?
        .into_inner();
    assert!(
        !after_revoke.allowed,
        "revocation takes effect on the next request"
    );

    // Registration events are on record, each pointing at its audit entry.
    let events = registry
        .list_registration_events(authed(
            &cast.consumer_analyst,
            proto::GetProductRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner()
        .events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "submitted",
            "public_notice",
            "registered",
            "published"
        ]
    );
    let mut audit = AuditClient::new(market.channel.clone());
    let registered_entry = audit
        .get_entries(authed(
            &cast.regulator,
            proto::GetEntriesRequest {
                start: events[3].audit_index,
                end: events[3].audit_index + 1,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .entries;
    let body: serde_json::Value = serde_json::from_slice(&registered_entry[0].body)?;
    assert_eq!(body["kind"], "product.registered");
    assert_eq!(body["subject"], "population");
    // Authorization decisions are logged too: filter by kind.
    let decisions = audit
        .get_entries(authed(
            &cast.regulator,
            proto::GetEntriesRequest {
                start: 0,
                end: 1_000,
                kind_prefix: "authorization.".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .entries;
    assert_eq!(
        decisions.len(),
        6,
        "one entry per CheckOperation call that passed authorization"
    );

    let report = regulator_verify(&market, &cast.regulator, Some(&middle_checkpoint)).await?;
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    market.stop().await;
    Ok(())
}

/// Runs `tamper` on the audit table and expects `verify` to report `expected`.
async fn tampering_is_reported(db: Db) -> anyhow::Result<()> {
    let market = TestMarket::start(db).await?;
    let cast = Cast::create(&market).await?;
    publish(&market, &cast, "population").await?;
    let saved = regulator_verify(&market, &cast.regulator, None).await?;
    assert!(saved.findings.is_empty(), "{:?}", saved.findings);
    let size = saved.checkpoint.size as i64;
    ensure!(size > 20, "enough entries to tamper with: {size}");
    let pool = market.raw_pool().await?;

    // 1. Edit one entry's content.
    let (original,): (Vec<u8>,) = sqlx::query_as("SELECT body FROM audit_entries WHERE idx = 7")
        .fetch_one(&pool)
        .await?;
    let forged = String::from_utf8(original.clone())?.replace("\"actor\":\"", "\"actor\":\"x");
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = 7")
        .bind(forged.into_bytes())
        .execute(&pool)
        .await?;
    let report = regulator_verify(&market, &cast.regulator, Some(&saved.note)).await?;
    assert_eq!(report.findings, [Finding::Changed { index: 7 }]);
    sqlx::query("UPDATE audit_entries SET body = $1 WHERE idx = 7")
        .bind(original)
        .execute(&pool)
        .await?;
    assert!(
        regulator_verify(&market, &cast.regulator, Some(&saved.note))
            .await?
            .findings
            .is_empty()
    );

    // 2. Reorder: swap two entries' positions.
    sqlx::query("UPDATE audit_entries SET idx = -1 WHERE idx = 3")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE audit_entries SET idx = 3 WHERE idx = 12")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE audit_entries SET idx = 12 WHERE idx = -1")
        .execute(&pool)
        .await?;
    let report = regulator_verify(&market, &cast.regulator, Some(&saved.note)).await?;
    assert_eq!(
        report.findings,
        [
            Finding::Moved {
                index: 3,
                signed_at: 12
            },
            Finding::Moved {
                index: 12,
                signed_at: 3
            }
        ]
    );
    sqlx::query("UPDATE audit_entries SET idx = -1 WHERE idx = 3")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE audit_entries SET idx = 3 WHERE idx = 12")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE audit_entries SET idx = 12 WHERE idx = -1")
        .execute(&pool)
        .await?;

    // 3. Delete an entry.
    sqlx::query("DELETE FROM audit_entries WHERE idx = 5")
        .execute(&pool)
        .await?;
    let report = regulator_verify(&market, &cast.regulator, Some(&saved.note)).await?;
    assert_eq!(report.findings, [Finding::Missing { index: 5 }]);

    // 4. Rewrite the tree itself to hide a change: the signed checkpoint the
    //    regulator saved no longer matches (the server signs whatever head it
    //    has, so the rewrite shows as an inconsistent history).
    sqlx::query("UPDATE audit_head SET size = size - 1")
        .execute(&pool)
        .await?;
    let report = regulator_verify(&market, &cast.regulator, Some(&saved.note)).await;
    match report {
        Ok(report) => assert!(
            report
                .findings
                .iter()
                .any(|f| matches!(f, Finding::Shrunk { .. } | Finding::Inconsistent { .. })),
            "{:?}",
            report.findings
        ),
        // A corrupted head may also make the server fail outright; either way
        // the regulator does not get a clean report.
        Err(error) => assert!(error.to_string().contains("server"), "{error}"),
    }
    pool.close().await;
    market.stop().await;
    Ok(())
}

/// One RPC and who may call it.
struct Case {
    name: &'static str,
    /// Tokens expected to be allowed (others: PermissionDenied or NotFound).
    allowed: &'static [&'static str],
}

async fn call(
    market: &TestMarket,
    cast: &Cast,
    rpc: &str,
    token: &str,
    fixture: &Fixture,
) -> Result<(), tonic::Status> {
    let channel = market.channel.clone();
    let mut identity = IdentityClient::new(channel.clone());
    let mut registry = RegistryClient::new(channel.clone());
    let mut contracts = ContractsClient::new(channel.clone());
    let mut audit = AuditClient::new(channel);
    let unique = civicgrid_marketplace::identity::new_id("t");
    match rpc {
        "CreateOrganization" => identity
            .create_organization(authed(
                token,
                proto::CreateOrganizationRequest {
                    id: format!("org{}", &unique[2..]),
                    display_name: "x".into(),
                    kind: proto::OrganizationKind::Consumer as i32,
                },
            ))
            .await
            .map(drop),
        "ListOrganizations" => identity
            .list_organizations(authed(token, proto::ListOrganizationsRequest {}))
            .await
            .map(drop),
        "CreateUser@city-data" => identity
            .create_user(authed(
                token,
                proto::CreateUserRequest {
                    organization_id: "city-data".into(),
                    name: unique,
                },
            ))
            .await
            .map(drop),
        "IssueToken@city-data-analyst" => identity
            .issue_token(authed(
                token,
                proto::IssueTokenRequest {
                    user_id: fixture.provider_analyst_user.clone(),
                    ttl_seconds: 60,
                    description: String::new(),
                },
            ))
            .await
            .map(drop),
        "GrantRole@city-data-analyst" => identity
            .grant_role(authed(
                token,
                proto::RoleBindingRequest {
                    user_id: fixture.provider_analyst_user.clone(),
                    role: "provider-analyst".into(),
                },
            ))
            .await
            .map(drop),
        "GrantRole@regulator" => identity
            .grant_role(authed(
                token,
                proto::RoleBindingRequest {
                    user_id: fixture.regulator_user.clone(),
                    role: "regulator".into(),
                },
            ))
            .await
            .map(drop),
        "CreateProduct" => registry
            .create_product(authed(
                token,
                proto::CreateProductRequest {
                    id: format!("p{}", &unique[2..]),
                    // A folder of its own: the sample's belongs to city-data.
                    spec: Some(proto::ProductSpec {
                        storage_location: format!("products/p{}", &unique[2..]),
                        ..sample_spec()
                    }),
                },
            ))
            .await
            .map(drop),
        "SubmitProduct@draft" => registry
            .submit_product(authed(token, action(&fixture.draft_product, "")))
            .await
            .map(drop),
        "StartPublicNotice@submitted" => registry
            .start_public_notice(authed(
                token,
                proto::StartPublicNoticeRequest {
                    product_id: fixture.submitted_product.clone(),
                    notice_days: 1,
                },
            ))
            .await
            .map(drop),
        "SuspendProduct@published" => registry
            .suspend_product(authed(token, action("population", "test")))
            .await
            .map(drop),
        "GetProduct@draft" => registry
            .get_product(authed(
                token,
                proto::GetProductRequest {
                    product_id: fixture.draft_product.clone(),
                },
            ))
            .await
            .map(drop),
        "GetProduct@published" => registry
            .get_product(authed(
                token,
                proto::GetProductRequest {
                    product_id: "population".into(),
                },
            ))
            .await
            .map(drop),
        "SearchCatalog" => registry
            .search_catalog(authed(token, proto::SearchCatalogRequest::default()))
            .await
            .map(drop),
        "RequestContract" => contracts
            .request_contract(authed(token, contract_request("population")))
            .await
            .map(drop),
        "ApproveContract" => {
            let pending = contracts
                .request_contract(authed(&cast.consumer_admin, contract_request("population")))
                .await?
                .into_inner();
            contracts
                .approve_contract(authed(
                    token,
                    proto::ContractAction {
                        contract_id: pending.id,
                        reason: String::new(),
                    },
                ))
                .await
                .map(drop)
        }
        "GetContract" => contracts
            .get_contract(authed(
                token,
                proto::ContractAction {
                    contract_id: fixture.contract.clone(),
                    reason: String::new(),
                },
            ))
            .await
            .map(drop),
        "CheckOperation" => contracts
            .check_operation(authed(
                token,
                check("population", proto::OperationKind::AggregateSql, &[]),
            ))
            .await
            .map(drop),
        "GetCheckpoint" => audit
            .get_checkpoint(authed(token, proto::GetCheckpointRequest::default()))
            .await
            .map(drop),
        "ExportCatalog" => registry
            .export_catalog(authed(token, proto::ExportCatalogRequest::default()))
            .await
            .map(drop),
        "PostDemand" => registry
            .post_demand(authed(token, demand_request()))
            .await
            .map(drop),
        "AnswerDemand" => registry
            .answer_demand(authed(
                token,
                proto::AnswerDemandRequest {
                    demand_id: fixture.demand.clone(),
                    product_id: "population".into(),
                    message: String::new(),
                },
            ))
            .await
            .map(drop),
        "ListDemands" => registry
            .list_demands(authed(token, proto::ListDemandsRequest::default()))
            .await
            .map(drop),
        "GetEntries" => audit
            .get_entries(authed(
                token,
                proto::GetEntriesRequest {
                    start: 0,
                    end: 10,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        other => panic!("no such case {other}"),
    }
}

struct Fixture {
    demand: String,
    draft_product: String,
    submitted_product: String,
    contract: String,
    provider_analyst_user: String,
    regulator_user: String,
}

async fn every_role_gets_exactly_its_permissions(db: Db) -> anyhow::Result<()> {
    let market = TestMarket::start(db).await?;
    let cast = Cast::create(&market).await?;
    publish(&market, &cast, "population").await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let mut identity = IdentityClient::new(market.channel.clone());
    let mut contracts = ContractsClient::new(market.channel.clone());
    let whoami = |token: &str| authed(token, proto::WhoAmIRequest {});
    let provider_analyst_user = identity
        .who_am_i(whoami(&cast.provider_analyst))
        .await?
        .into_inner()
        .user
        .context("user")?
        .id;
    let regulator_user = identity
        .who_am_i(whoami(&cast.regulator))
        .await?
        .into_inner()
        .user
        .context("user")?
        .id;
    let contract = contracts
        .request_contract(authed(&cast.consumer_admin, contract_request("population")))
        .await?
        .into_inner()
        .id;
    let demand = registry
        .post_demand(authed(&cast.consumer_admin, demand_request()))
        .await?
        .into_inner()
        .id;
    let cases = [
        Case {
            name: "CreateOrganization",
            allowed: &["admin"],
        },
        Case {
            name: "ExportCatalog",
            allowed: &[
                "admin",
                "provider_admin",
                "provider_analyst",
                "consumer_admin",
                "consumer_analyst",
                "regulator",
                "rival_provider_admin",
                "rival_consumer_admin",
            ],
        },
        Case {
            name: "PostDemand",
            allowed: &["consumer_admin", "consumer_analyst", "rival_consumer_admin"],
        },
        Case {
            name: "AnswerDemand",
            allowed: &["provider_admin"],
        },
        Case {
            name: "ListDemands",
            allowed: &[
                "admin",
                "provider_admin",
                "provider_analyst",
                "consumer_admin",
                "consumer_analyst",
                "regulator",
                "rival_provider_admin",
                "rival_consumer_admin",
            ],
        },
        Case {
            name: "ListOrganizations",
            allowed: &["admin", "regulator"],
        },
        Case {
            name: "CreateUser@city-data",
            allowed: &["admin", "provider_admin"],
        },
        Case {
            name: "IssueToken@city-data-analyst",
            allowed: &["admin", "provider_admin", "provider_analyst"],
        },
        Case {
            name: "GrantRole@city-data-analyst",
            allowed: &["admin", "provider_admin"],
        },
        Case {
            name: "GrantRole@regulator",
            allowed: &["admin"],
        },
        Case {
            name: "CreateProduct",
            allowed: &["provider_admin", "rival_provider_admin"],
        },
        Case {
            name: "SubmitProduct@draft",
            allowed: &["provider_admin"],
        },
        Case {
            name: "StartPublicNotice@submitted",
            allowed: &["admin"],
        },
        Case {
            name: "GetProduct@draft",
            allowed: &["admin", "provider_admin", "provider_analyst", "regulator"],
        },
        Case {
            name: "GetProduct@published",
            allowed: &[
                "admin",
                "provider_admin",
                "provider_analyst",
                "consumer_admin",
                "consumer_analyst",
                "regulator",
                "rival_provider_admin",
                "rival_consumer_admin",
                "nobody",
            ],
        },
        Case {
            name: "SearchCatalog",
            allowed: &[
                "admin",
                "provider_admin",
                "provider_analyst",
                "consumer_admin",
                "consumer_analyst",
                "regulator",
                "rival_provider_admin",
                "rival_consumer_admin",
            ],
        },
        Case {
            name: "RequestContract",
            allowed: &["consumer_admin", "rival_consumer_admin"],
        },
        Case {
            name: "ApproveContract",
            allowed: &["provider_admin"],
        },
        Case {
            name: "GetContract",
            allowed: &[
                "admin",
                "provider_admin",
                "provider_analyst",
                "consumer_admin",
                "consumer_analyst",
                "regulator",
            ],
        },
        Case {
            name: "CheckOperation",
            allowed: &["consumer_admin", "consumer_analyst", "rival_consumer_admin"],
        },
        Case {
            name: "GetCheckpoint",
            allowed: &["admin", "regulator"],
        },
        Case {
            name: "GetEntries",
            allowed: &["admin", "regulator"],
        },
        // Last: it changes the product's state for everything after it.
        Case {
            name: "SuspendProduct@published",
            allowed: &["admin"],
        },
    ];
    let roles: [(&str, &str); 9] = [
        ("admin", &cast.admin),
        ("provider_admin", &cast.provider_admin),
        ("provider_analyst", &cast.provider_analyst),
        ("consumer_admin", &cast.consumer_admin),
        ("consumer_analyst", &cast.consumer_analyst),
        ("regulator", &cast.regulator),
        ("rival_provider_admin", &cast.rival_provider_admin),
        ("rival_consumer_admin", &cast.rival_consumer_admin),
        ("nobody", &cast.nobody),
    ];
    let mut mismatches = Vec::new();
    for case in &cases {
        for (role, token) in roles {
            // Products in a fresh state for every call that moves one.
            let draft_product = format!("d{}", &civicgrid_marketplace::identity::new_id("x")[2..]);
            registry
                .create_product(authed(
                    &cast.provider_admin,
                    proto::CreateProductRequest {
                        id: draft_product.clone(),
                        spec: Some(sample_spec()),
                    },
                ))
                .await?;
            let submitted_product =
                format!("s{}", &civicgrid_marketplace::identity::new_id("x")[2..]);
            registry
                .create_product(authed(
                    &cast.provider_admin,
                    proto::CreateProductRequest {
                        id: submitted_product.clone(),
                        spec: Some(sample_spec()),
                    },
                ))
                .await?;
            registry
                .submit_product(authed(&cast.provider_admin, action(&submitted_product, "")))
                .await?;
            let fixture = Fixture {
                demand: demand.clone(),
                draft_product,
                submitted_product,
                contract: contract.clone(),
                provider_analyst_user: provider_analyst_user.clone(),
                regulator_user: regulator_user.clone(),
            };
            let expected = case.allowed.contains(&role);
            let outcome = call(&market, &cast, case.name, token, &fixture).await;
            let ok = match (&outcome, expected) {
                (Ok(()), true) => true,
                (Err(status), false) => {
                    matches!(status.code(), Code::PermissionDenied | Code::NotFound)
                }
                _ => false,
            };
            if !ok {
                mismatches.push(format!(
                    "{} by {role}: expected {}, got {:?}",
                    case.name,
                    if expected { "allow" } else { "deny" },
                    outcome
                        .as_ref()
                        .map_err(|s| (s.code(), s.message().to_owned()))
                ));
            }
            if case.name == "SuspendProduct@published" && outcome.is_ok() {
                registry
                    .publish_product(authed(&cast.admin, action("population", "")))
                    .await?;
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "authorization matrix:\n{}",
        mismatches.join("\n")
    );

    // A denial names the permission; no token, or a bad one, is Unauthenticated.
    let denied = registry
        .start_public_notice(authed(
            &cast.provider_admin,
            proto::StartPublicNoticeRequest {
                product_id: "population".into(),
                notice_days: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("product:review"),
        "{}",
        denied.message()
    );
    let anonymous = registry
        .search_catalog(proto::SearchCatalogRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let forged = registry
        .search_catalog(authed("cgt_forged", proto::SearchCatalogRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);
    market.stop().await;
    Ok(())
}

/// Every method of every marketplace service, found in the server's own
/// descriptor set (so a service added later is covered too), refuses a call
/// without a valid bearer token before its handler runs: nothing is logged,
/// and the message says what was wrong with the header (a handler reached
/// without the authentication layer could only say "send a token").
/// Revoked and expired tokens are refused; health checks stay open.
async fn every_method_refuses_a_call_without_a_valid_token(db: Db) -> anyhow::Result<()> {
    use prost::Message as _;
    let market = TestMarket::start(db).await?;
    let log_size = async |market: &TestMarket| -> anyhow::Result<i64> {
        let checkpoint = AuditClient::new(market.channel.clone())
            .get_checkpoint(authed(
                &market.admin_token,
                proto::GetCheckpointRequest::default(),
            ))
            .await?
            .into_inner();
        Ok(checkpoint.tree_size)
    };
    let before = log_size(&market).await?;
    let descriptors = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
        .context("descriptors")?;
    let mut paths = Vec::new();
    for file in descriptors
        .file
        .iter()
        .filter(|f| f.package() == "civicgrid.marketplace.v1")
    {
        for service in &file.service {
            for method in &service.method {
                paths.push(format!(
                    "/civicgrid.marketplace.v1.{}/{}",
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    ensure!(paths.len() >= 40, "only {} methods found", paths.len());
    let forged = format!("Bearer cgt_{}", "0".repeat(40));
    let must_be = "the authorization header must be `Bearer <token>`";
    let headers: [(Option<&str>, &str); 5] = [
        (None, "send `authorization: Bearer <token>`"),
        (Some("Basic YWRtaW46YWRtaW4="), must_be),
        (Some("Bearer"), must_be),
        (Some("Bearer caf\u{e9}"), must_be),
        (Some(&forged), "invalid, expired or revoked token"),
    ];
    let mut wrong = Vec::new();
    for path in &paths {
        for (header, message) in headers {
            let mut grpc = tonic::client::Grpc::new(market.channel.clone());
            grpc.ready().await?;
            let mut request = tonic::Request::new(());
            if let Some(value) = header {
                request.metadata_mut().insert(
                    "authorization",
                    tonic::metadata::MetadataValue::try_from(value.as_bytes())?,
                );
            }
            let outcome = grpc
                .unary::<(), (), _>(request, path.parse()?, tonic_prost::ProstCodec::default())
                .await;
            match outcome {
                Err(status)
                    if status.code() == Code::Unauthenticated && status.message() == message => {}
                other => wrong.push(format!(
                    "{path} with {header:?}: {:?}",
                    other
                        .map(|_| ())
                        .map_err(|s| (s.code(), s.message().to_owned()))
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "served without a valid token:\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        log_size(&market).await?,
        before,
        "a refused call left an audit entry"
    );

    // Health checks stay open, as load balancers expect.
    let health = tonic_health::pb::health_client::HealthClient::new(market.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "civicgrid.marketplace.v1.Registry".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // A token stops working once revoked, and once expired.
    let mut identity = IdentityClient::new(market.channel.clone());
    let me = identity
        .who_am_i(authed(&market.admin_token, proto::WhoAmIRequest::default()))
        .await?
        .into_inner();
    let user_id = me.user.context("a user")?.id;
    let mut issued = Vec::new();
    for _ in 0..2 {
        let token = identity
            .issue_token(authed(
                &market.admin_token,
                proto::IssueTokenRequest {
                    user_id: user_id.clone(),
                    ttl_seconds: 3600,
                    description: "auth test".into(),
                },
            ))
            .await?
            .into_inner();
        identity
            .who_am_i(authed(&token.secret, proto::WhoAmIRequest::default()))
            .await?;
        issued.push(token);
    }
    let (revoked, expired) = (&issued[0], &issued[1]);
    identity
        .revoke_token(authed(
            &market.admin_token,
            proto::RevokeTokenRequest {
                token_id: revoked.token_id.clone(),
            },
        ))
        .await?;
    sqlx::query("UPDATE api_tokens SET expires_at = 0 WHERE id = $1")
        .bind(&expired.token_id)
        .execute(&market.raw_pool().await?)
        .await?;
    for token in [&revoked.secret, &expired.secret] {
        let refused = identity
            .who_am_i(authed(token, proto::WhoAmIRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert_eq!(refused.message(), "invalid, expired or revoked token");
    }
    market.stop().await;
    Ok(())
}

/// Each PostgreSQL migration is a hand-written twin of its SQLite one; this
/// keeps the twins honest. After every migration has run on both, the two
/// databases have the same tables, each with the same columns, nullability
/// and kind of type (integer, text, bytes, float), and the same indexes.
#[tokio::test]
async fn both_stores_migrate_to_the_same_schema() -> anyhow::Result<()> {
    use sqlx::Row as _;
    type Schema = std::collections::BTreeMap<String, Vec<(String, bool, &'static str)>>;
    let family = |declared: &str| -> anyhow::Result<&'static str> {
        Ok(match declared.to_ascii_lowercase().as_str() {
            "integer" | "bigint" | "smallint" => "integer",
            "text" | "character varying" => "text",
            "blob" | "bytea" => "bytes",
            "real" | "double precision" => "float",
            other => anyhow::bail!("a column type the schema check does not know: {other}"),
        })
    };
    let sqlite = TestMarket::start(Db::Sqlite).await?;
    let postgres = TestMarket::start(Db::Postgres).await?;

    let columns = async |market: &TestMarket, sql: &'static str| -> anyhow::Result<Schema> {
        let mut schema = Schema::new();
        for row in sqlx::query(sql)
            .fetch_all(&market.raw_pool().await?)
            .await?
        {
            schema.entry(row.try_get("table_name")?).or_default().push((
                row.try_get("column_name")?,
                row.try_get::<i64, _>("required")? != 0,
                family(&row.try_get::<String, _>("declared")?)?,
            ));
        }
        Ok(schema)
    };
    let lite = columns(
        &sqlite,
        "SELECT m.name AS table_name, p.name AS column_name, \
                CAST(p.\"notnull\" OR p.pk > 0 AS INTEGER) AS required, p.type AS declared \
         FROM sqlite_master m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name NOT LIKE '_sqlx%' \
         ORDER BY m.name, p.cid",
    )
    .await?;
    let pg = columns(
        &postgres,
        "SELECT table_name::text AS table_name, column_name::text AS column_name, \
                CAST(is_nullable = 'NO' AS INTEGER) AS required, data_type::text AS declared \
         FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name NOT LIKE '_sqlx%' \
         ORDER BY table_name, ordinal_position",
    )
    .await?;
    ensure!(
        lite.len() >= 10,
        "only {} tables read from SQLite",
        lite.len()
    );
    assert_eq!(
        lite.keys().collect::<Vec<_>>(),
        pg.keys().collect::<Vec<_>>(),
        "the same tables"
    );
    for (table, columns) in &lite {
        assert_eq!(columns, &pg[table], "columns of {table} (SQLite left)");
    }

    let lite_indexes: Vec<String> = sqlx::query(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(&sqlite.raw_pool().await?)
    .await?
    .iter()
    .map(|row| row.try_get("name"))
    .collect::<Result<_, _>>()?;
    let pg_indexes: Vec<String> = sqlx::query(
        "SELECT indexname::text AS name FROM pg_indexes \
         WHERE schemaname = current_schema() AND indexdef NOT LIKE '%UNIQUE%' ORDER BY indexname",
    )
    .fetch_all(&postgres.raw_pool().await?)
    .await?
    .iter()
    .map(|row| row.try_get("name"))
    .collect::<Result<_, _>>()?;
    assert_eq!(lite_indexes, pg_indexes, "the same indexes (SQLite left)");
    sqlite.stop().await;
    postgres.stop().await;
    Ok(())
}

async fn bad_input_is_refused_with_the_field_named(db: Db) -> anyhow::Result<()> {
    let market = TestMarket::start(db).await?;
    let cast = Cast::create(&market).await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    let mut identity = IdentityClient::new(market.channel.clone());
    let invalid = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("invalid {field}:")),
            "expected field {field}: {}",
            status.message()
        );
    };
    let mut spec = sample_spec();
    spec.tables[0].columns[2].r#type = "blob".into();
    invalid(
        registry
            .create_product(authed(
                &cast.provider_admin,
                proto::CreateProductRequest {
                    id: "population".into(),
                    spec: Some(spec),
                },
            ))
            .await
            .unwrap_err(),
        "spec.tables[0].columns[2].type",
    );
    invalid(
        registry
            .create_product(authed(
                &cast.provider_admin,
                proto::CreateProductRequest {
                    id: "Bad Id".into(),
                    spec: Some(sample_spec()),
                },
            ))
            .await
            .unwrap_err(),
        "id",
    );
    invalid(
        identity
            .create_organization(authed(
                &cast.admin,
                proto::CreateOrganizationRequest {
                    id: "new-org".into(),
                    display_name: "New".into(),
                    kind: 0,
                },
            ))
            .await
            .unwrap_err(),
        "kind",
    );
    invalid(
        identity
            .issue_token(authed(
                &cast.admin,
                proto::IssueTokenRequest {
                    user_id: "usr-x".into(),
                    ttl_seconds: 0,
                    description: String::new(),
                },
            ))
            .await
            .unwrap_err(),
        "ttl_seconds",
    );
    let consumer_user = identity
        .who_am_i(authed(&cast.consumer_analyst, proto::WhoAmIRequest {}))
        .await?
        .into_inner()
        .user
        .context("user")?
        .id;
    invalid(
        identity
            .grant_role(authed(
                &cast.admin,
                proto::RoleBindingRequest {
                    user_id: consumer_user.clone(),
                    role: "provider-admin".into(),
                },
            ))
            .await
            .unwrap_err(),
        "role",
    );
    invalid(
        identity
            .grant_role(authed(
                &cast.admin,
                proto::RoleBindingRequest {
                    user_id: consumer_user,
                    role: "superuser".into(),
                },
            ))
            .await
            .unwrap_err(),
        "role",
    );
    publish(&market, &cast, "population").await?;
    let mut contracts = ContractsClient::new(market.channel.clone());
    let mut request = contract_request("population");
    request.plan_id = "gold".into();
    invalid(
        contracts
            .request_contract(authed(&cast.consumer_admin, request))
            .await
            .unwrap_err(),
        "plan_id",
    );
    let mut request = contract_request("population");
    request.operations = Some(proto::AllowedOperations {
        aggregate_sql: false,
        list_columns: vec!["person_id".into()],
        algorithm_sha256: vec![],
    });
    invalid(
        contracts
            .request_contract(authed(&cast.consumer_admin, request))
            .await
            .unwrap_err(),
        "operations.list_columns[0]",
    );
    let mut request = contract_request("population");
    request.duration_days = 5000;
    invalid(
        contracts
            .request_contract(authed(&cast.consumer_admin, request))
            .await
            .unwrap_err(),
        "duration_days",
    );
    // A declared column the data does not have: the submission is refused
    // with the column named, and the product stays a draft.
    let mut spec = sample_spec();
    spec.tables[0].columns.push(proto::Column {
        name: "income".into(),
        r#type: "int64".into(),
        sensitivity: proto::Sensitivity::Sensitive as i32,
        description: String::new(),
    });
    registry
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: "incomes".into(),
                spec: Some(spec),
            },
        ))
        .await?;
    invalid(
        registry
            .submit_product(authed(&cast.provider_admin, action("incomes", "")))
            .await
            .unwrap_err(),
        "spec.tables[0].columns[3].name",
    );
    let draft = registry
        .get_product(authed(
            &cast.provider_admin,
            proto::GetProductRequest {
                product_id: "incomes".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(draft.state(), proto::ProductState::Draft);
    // Wrong state: a published product cannot be submitted; nothing changes.
    let status = registry
        .submit_product(authed(&cast.provider_admin, action("population", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("is published"),
        "{}",
        status.message()
    );
    let product = registry
        .get_product(authed(
            &cast.provider_admin,
            proto::GetProductRequest {
                product_id: "population".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(product.state(), proto::ProductState::Published);
    // Duplicates.
    let status = registry
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: "population".into(),
                spec: Some(sample_spec()),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    market.stop().await;
    Ok(())
}

/// With `--client-ca`, a client needs a certificate the CA signed *and* a
/// token; one signed by another CA, or none, does not get a single call in.
#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() -> anyhow::Result<()> {
    use civicgrid_tests::market::MtlsPki;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

    let market = TestMarket::start(Db::Sqlite).await?;
    let pki = MtlsPki::generate()?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca_cert));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(civicgrid_marketplace::grpc::serve(
        market.market.clone(),
        listener,
        Some(tls),
        async {
            let _ = stopped.await;
        },
    ));
    let connect = |identity: Option<&(String, String)>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_cert))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let endpoint =
            Channel::from_shared(format!("https://{address}")).map(|e| e.tls_config(tls));
        async move {
            endpoint?
                .map_err(anyhow::Error::from)?
                .connect()
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let call = |channel: Channel| {
        let admin = market.admin_token.clone();
        async move {
            IdentityClient::new(channel)
                .who_am_i(authed(&admin, proto::WhoAmIRequest {}))
                .await
        }
    };

    let trusted = connect(Some(&pki.client)).await?;
    let me = call(trusted).await?.into_inner();
    assert_eq!(me.user.context("user")?.name, "admin@city.example");

    for (who, identity) in [
        ("a rogue CA's client", Some(&pki.rogue_client)),
        ("a client without a certificate", None),
    ] {
        let refused = match connect(identity).await {
            Err(_) => true,
            Ok(channel) => call(channel).await.is_err(),
        };
        assert!(refused, "{who} got through");
    }
    let plain = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await;
    let plain_refused = match plain {
        Err(_) => true,
        Ok(channel) => call(channel).await.is_err(),
    };
    assert!(plain_refused, "plain HTTP/2 got through");

    // The CLI speaks the same TLS: --tls-ca to check the server, --tls-cert/--tls-key
    // (or CIVICGRID_TLS_CA/_CERT/_KEY) to be let in.
    let files = tempfile::tempdir()?;
    let write = |name: &str, pem: &str| -> anyhow::Result<String> {
        let path = files.path().join(name);
        std::fs::write(&path, pem)?;
        Ok(path.display().to_string())
    };
    let ca = write("ca.pem", &pki.ca_cert)?;
    let (cert, key) = (
        write("client.pem", &pki.client.0)?,
        write("client.key", &pki.client.1)?,
    );
    let (rogue_cert, rogue_key) = (
        write("rogue.pem", &pki.rogue_client.0)?,
        write("rogue.key", &pki.rogue_client.1)?,
    );
    let https = format!("https://{address}");
    let operator = std::env::var_os("CIVICGRID_OPERATOR_BIN")
        .context("CIVICGRID_OPERATOR_BIN is not set (scripts/test.sh sets it)")?;
    let binary = std::path::Path::new(&operator).with_file_name("civicgrid");
    // Awaited, not waited on: the server runs on this test's runtime.
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(&binary);
        command
            .args(args)
            .env("CIVICGRID_TOKEN", &market.admin_token)
            .envs(env.iter().copied());
        async move {
            let out = command.output().await?;
            anyhow::Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    };
    let (ok, stdout, stderr) = cli(
        &[
            "--server",
            &https,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--output",
            "json",
            "whoami",
        ],
        &[],
    )
    .await?;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("admin@city.example"), "{stdout}");
    let (ok, stdout, stderr) = cli(
        &["--server", &https, "--output", "json", "whoami"],
        &[
            ("CIVICGRID_TLS_CA", &ca),
            ("CIVICGRID_TLS_CERT", &cert),
            ("CIVICGRID_TLS_KEY", &key),
        ],
    )
    .await?;
    assert!(ok && stdout.contains("admin@city.example"), "{stderr}");
    for (who, args, says) in [
        (
            "without a certificate",
            vec!["--tls-ca", ca.as_str()],
            "if it asks for a client certificate, pass --tls-cert and --tls-key",
        ),
        (
            "with a rogue CA's certificate",
            vec![
                "--tls-ca",
                &ca,
                "--tls-cert",
                &rogue_cert,
                "--tls-key",
                &rogue_key,
            ],
            "it may not trust --tls-cert",
        ),
        // The system's roots do not know the city's CA.
        (
            "not trusting the server",
            vec!["--tls-cert", &cert, "--tls-key", &key],
            "invalid peer certificate: UnknownIssuer",
        ),
    ] {
        let mut all = vec!["--server", https.as_str()];
        all.extend(args);
        all.push("whoami");
        let (ok, stdout, stderr) = cli(&all, &[]).await?;
        assert!(!ok, "the CLI {who} got through: {stdout}");
        assert!(
            stderr.starts_with("error:") && stderr.contains(says),
            "{who}: {stderr}"
        );
    }
    let (ok, _, stderr) = cli(&["--server", &https, "--tls-cert", &cert, "whoami"], &[]).await?;
    assert!(
        !ok && stderr.contains("--tls-key"),
        "a certificate without its key: {stderr}"
    );
    let (ok, _, stderr) = cli(
        &[
            "--server",
            &format!("http://{address}"),
            "--tls-ca",
            &ca,
            "whoami",
        ],
        &[],
    )
    .await?;
    assert!(
        !ok && stderr.contains("--tls-ca, --tls-cert and --tls-key are for an https:// server"),
        "TLS options for a plain server: {stderr}"
    );
    let (ok, _, stderr) = cli(
        &["--server", &https, "--tls-ca", "/no/such/ca.pem", "whoami"],
        &[],
    )
    .await?;
    assert!(
        !ok && stderr.contains("--tls-ca: reading /no/such/ca.pem"),
        "{stderr}"
    );

    let _ = stop.send(());
    server.await??;
    market.stop().await;
    Ok(())
}

/// grpcurl and grpc_health_probe work: the standard health service answers
/// for the marketplace's services and reflection lists them.
#[tokio::test]
async fn health_and_reflection_serve_standard_clients() -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let market = TestMarket::start(Db::Sqlite).await?;
    let mut health = HealthClient::new(market.channel.clone());
    for service in [
        "civicgrid.marketplace.v1.Registry",
        "civicgrid.marketplace.v1.Audit",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut reflection = ServerReflectionClient::new(market.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .context("a reflection response")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!(
            "expected a service list, got {:?}",
            response.message_response
        );
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "civicgrid.marketplace.v1.Identity",
        "civicgrid.marketplace.v1.Registry",
        "civicgrid.marketplace.v1.Contracts",
        "civicgrid.marketplace.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    market.stop().await;
    Ok(())
}

fn demand_request() -> proto::PostDemandRequest {
    proto::PostDemandRequest {
        title: "Bus ridership by stop and hour".into(),
        description: "Boardings per stop and hour, to plan feeder routes".into(),
        keywords: vec!["bus".into(), "ridership".into()],
        tier: String::new(),
        region: "city-north".into(),
        monthly_budget_minor: 50_000,
        currency: "EUR".into(),
    }
}

async fn demand_list_and_dcat_export(db: Db) -> anyhow::Result<()> {
    let market = TestMarket::start(db).await?;
    let cast = Cast::create(&market).await?;
    publish(&market, &cast, "population").await?;
    let mut registry = RegistryClient::new(market.channel.clone());
    registry
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: "still-a-draft".into(),
                spec: Some(sample_spec()),
            },
        ))
        .await?;

    // Demand: posted by one consumer, seen by everyone, answered, closed.
    let demand = registry
        .post_demand(authed(&cast.consumer_analyst, demand_request()))
        .await?
        .into_inner();
    assert_eq!(demand.state(), proto::DemandState::Open);
    let seen = registry
        .list_demands(authed(
            &cast.rival_provider_admin,
            proto::ListDemandsRequest {
                include_closed: false,
                keywords: vec!["Ridership".into()],
            },
        ))
        .await?
        .into_inner()
        .demands;
    assert_eq!(
        seen.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [demand.id.as_str()]
    );
    let not_theirs = registry
        .answer_demand(authed(
            &cast.rival_provider_admin,
            proto::AnswerDemandRequest {
                demand_id: demand.id.clone(),
                product_id: "population".into(),
                message: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(not_theirs.code(), Code::PermissionDenied, "{not_theirs:?}");
    let answered = registry
        .answer_demand(authed(
            &cast.provider_admin,
            proto::AnswerDemandRequest {
                demand_id: demand.id.clone(),
                product_id: "population".into(),
                message: "per district, monthly".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(answered.answers.len(), 1);
    assert_eq!(answered.answers[0].provider_organization_id, "city-data");
    let mut bad = demand_request();
    bad.currency = "euros".into();
    let status = registry
        .post_demand(authed(&cast.consumer_admin, bad))
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("invalid currency:"),
        "{}",
        status.message()
    );
    let analyst_close = registry
        .close_demand(authed(
            &cast.consumer_analyst,
            proto::CloseDemandRequest {
                demand_id: demand.id.clone(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(analyst_close.code(), Code::PermissionDenied);
    registry
        .close_demand(authed(
            &cast.consumer_admin,
            proto::CloseDemandRequest {
                demand_id: demand.id.clone(),
                reason: "found it".into(),
            },
        ))
        .await?;
    let open = registry
        .list_demands(authed(
            &cast.consumer_admin,
            proto::ListDemandsRequest::default(),
        ))
        .await?
        .into_inner()
        .demands;
    assert!(open.is_empty());
    let all = registry
        .list_demands(authed(
            &cast.consumer_admin,
            proto::ListDemandsRequest {
                include_closed: true,
                keywords: vec![],
            },
        ))
        .await?
        .into_inner()
        .demands;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state(), proto::DemandState::Closed);
    assert_eq!(all[0].answers[0].product_id, "population");

    // DCAT-AP: the published product only, with the mandatory and the
    // recommended properties we hold.
    let export = registry
        .export_catalog(authed(
            &cast.consumer_analyst,
            proto::ExportCatalogRequest {
                base_uri: "https://data.city.example".into(),
            },
        ))
        .await?
        .into_inner();
    let document: serde_json::Value = serde_json::from_str(&export.json_ld)?;
    assert_eq!(document["@type"], "dcat:Catalog");
    assert_eq!(document["@context"]["dcat"], "http://www.w3.org/ns/dcat#");
    for property in ["dct:title", "dct:description", "dct:publisher"] {
        assert!(!document[property].is_null(), "catalog lacks {property}");
    }
    let datasets = document["dcat:dataset"].as_array().context("datasets")?;
    assert_eq!(datasets.len(), 1, "drafts are not in the public catalog");
    let dataset = &datasets[0];
    assert_eq!(
        dataset["@id"],
        "https://data.city.example/datasets/population"
    );
    assert_eq!(dataset["dct:title"], "Population by district");
    assert!(
        dataset["dct:description"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    assert_eq!(dataset["dct:publisher"]["foaf:name"], "city-data");
    assert_eq!(
        dataset["dct:accrualPeriodicity"]["@id"],
        "http://publications.europa.eu/resource/authority/frequency/MONTHLY"
    );
    assert!(
        dataset["adms:identifier"]["skos:notation"]
            .as_str()
            .is_some_and(|n| n.starts_with("CG-"))
    );
    assert_eq!(
        dataset["dcat:distribution"][0]["dct:license"]["@id"],
        "https://spdx.org/licenses/CC-BY-4.0"
    );
    assert!(dataset["dcat:distribution"][0]["dcat:accessURL"]["@id"].is_string());
    let bad_base = registry
        .export_catalog(authed(
            &cast.consumer_analyst,
            proto::ExportCatalogRequest {
                base_uri: "ftp://x".into(),
            },
        ))
        .await
        .unwrap_err();
    assert!(
        bad_base.message().starts_with("invalid base_uri:"),
        "{}",
        bad_base.message()
    );
    market.stop().await;
    Ok(())
}

/// Inserts `n` through the group committer; when `fail`, then also a row the
/// table refuses, so the work fails after a write of its own that must not
/// survive. Returns `n` and, on PostgreSQL, the transaction it ran in.
fn grouped_insert(
    store: &civicgrid_marketplace::store::Store,
    n: i64,
    fail: bool,
) -> tokio::task::JoinHandle<civicgrid_marketplace::error::Result<(i64, Option<i64>)>> {
    let store = store.clone();
    tokio::spawn(async move {
        let postgres = store.backend() == civicgrid_marketplace::store::Backend::Postgres;
        store
            .grouped(move |connection| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO probe (n) VALUES ($1)")
                        .bind(n)
                        .execute(&mut *connection)
                        .await?;
                    if fail {
                        sqlx::query("INSERT INTO probe (n) VALUES (NULL)")
                            .execute(&mut *connection)
                            .await?;
                    }
                    let transaction = if postgres {
                        Some(
                            sqlx::query_scalar::<_, i64>("SELECT CAST(txid_current() AS BIGINT)")
                                .fetch_one(&mut *connection)
                                .await?,
                        )
                    } else {
                        None
                    };
                    Ok((n, transaction))
                })
            })
            .await
    })
}

/// A store on a fresh database with an empty `probe (n)` table, and a first
/// work that holds its committer until `release` is notified, so works queued
/// meanwhile all go into the one group that follows it.
async fn held_committer(
    db: Db,
) -> anyhow::Result<(
    TestMarket,
    civicgrid_marketplace::store::Store,
    std::sync::Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<civicgrid_marketplace::error::Result<()>>,
)> {
    let market = TestMarket::start(db).await?;
    let store = market.market.store().clone();
    sqlx::query("CREATE TABLE probe (n BIGINT NOT NULL)")
        .execute(store.pool())
        .await?;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let blocker = {
        let (store, release) = (store.clone(), std::sync::Arc::clone(&release));
        tokio::spawn(async move {
            store
                .grouped(move |_| {
                    Box::pin(async move {
                        release.notified().await;
                        Ok(())
                    })
                })
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    Ok((market, store, release, blocker))
}

async fn probe_rows(store: &civicgrid_marketplace::store::Store) -> anyhow::Result<Vec<i64>> {
    Ok(sqlx::query_scalar("SELECT n FROM probe ORDER BY n")
        .fetch_all(store.pool())
        .await?)
}

/// A work that panics fails its own caller with `Unavailable`; the works
/// beside it in its group commit, and the committer serves the next ones.
async fn a_panicking_grouped_work_fails_its_caller_and_not_the_committer(
    db: Db,
) -> anyhow::Result<()> {
    let (market, store, release, blocker) = held_committer(db).await?;
    let before = grouped_insert(&store, 1, false);
    let panicking = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .grouped(|connection| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO probe (n) VALUES (2)")
                            .execute(&mut *connection)
                            .await?;
                        panic!("a bug in a work");
                        #[allow(unreachable_code)]
                        Ok(())
                    })
                })
                .await
        })
    };
    let after = grouped_insert(&store, 3, false);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    release.notify_one();
    blocker.await??;
    assert_eq!(before.await??.0, 1);
    let refused = panicking.await?.expect_err("a panicking work succeeded");
    ensure!(
        matches!(
            refused,
            civicgrid_marketplace::error::MarketError::Unavailable(_)
        ),
        "{refused:?}"
    );
    assert_eq!(after.await??.0, 3);
    assert_eq!(grouped_insert(&store, 4, false).await??.0, 4);
    assert_eq!(probe_rows(&store).await?, [1, 3, 4]);
    market.stop().await;
    Ok(())
}

/// The group committer closes one work's savepoint and opens the next one's
/// in a single round trip: a work that fails in the middle of a group or at
/// its end is undone alone, and the works around it commit.
async fn grouped_works_fail_alone_wherever_they_stand(db: Db) -> anyhow::Result<()> {
    let (market, store, release, blocker) = held_committer(db).await?;
    let works: Vec<_> = [
        (1, false),
        (2, true),
        (3, false),
        (4, true),
        (5, false),
        (6, true),
    ]
    .into_iter()
    .map(|(n, fail)| grouped_insert(&store, n, fail))
    .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    ensure!(
        works.iter().all(|work| !work.is_finished()),
        "a work finished while the committer was held"
    );
    release.notify_one();
    blocker.await??;
    let mut committed = Vec::new();
    let mut transactions = std::collections::BTreeSet::new();
    for (index, work) in works.into_iter().enumerate() {
        match work.await? {
            Ok((n, transaction)) => {
                committed.push(n);
                transactions.extend(transaction);
            }
            Err(error) => {
                ensure!(index % 2 == 1, "work {} failed: {error}", index + 1);
                ensure!(
                    matches!(
                        error,
                        civicgrid_marketplace::error::MarketError::Database(_)
                    ),
                    "{error:?}"
                );
            }
        }
    }
    assert_eq!(committed, [1, 3, 5]);
    if db == Db::Postgres {
        assert_eq!(
            transactions.len(),
            1,
            "the works did not share a transaction"
        );
    }
    assert_eq!(probe_rows(&store).await?, [1, 3, 5]);
    // The committer goes on after a group that ended in a failed work.
    assert_eq!(grouped_insert(&store, 7, false).await??.0, 7);
    market.stop().await;
    Ok(())
}

/// A write batch runs its statements in order with each one's own
/// parameters (repeated, anonymous and numbered placeholders, text, NULL,
/// integers, reals and bytes), and a statement that fails stops the batch
/// and fails the work, whose savepoint then leaves nothing behind.
async fn a_write_batch_runs_in_order_and_fails_whole(db: Db) -> anyhow::Result<()> {
    use civicgrid_marketplace::store::{Param, WriteBatch};
    let market = TestMarket::start(db).await?;
    let store = market.market.store().clone();
    sqlx::query(
        "CREATE TABLE batch_probe (id BIGINT PRIMARY KEY, label TEXT, note TEXT, \
         ratio DOUBLE PRECISION, bytes BYTEA, twice BIGINT)",
    )
    .execute(store.pool())
    .await?;
    let anonymous = match store.backend() {
        civicgrid_marketplace::store::Backend::Sqlite => {
            "INSERT INTO batch_probe (id, label) VALUES (?, ?), (?, ?)"
        }
        civicgrid_marketplace::store::Backend::Postgres => {
            "INSERT INTO batch_probe (id, label) VALUES ($1, $2), ($3, $4)"
        }
    };
    let changed = store
        .grouped(move |connection| {
            Box::pin(async move {
                let mut batch = WriteBatch::new();
                batch.push(
                    "INSERT INTO batch_probe (id, label, note, ratio, bytes) \
                     VALUES ($1, $2, $3, $4, $5)",
                    vec![
                        Param::Int(1),
                        Param::from("one"),
                        Param::from(None::<&str>),
                        Param::Real(0.5),
                        Param::Blob(vec![0, 1, 255]),
                    ],
                );
                batch.push(
                    anonymous,
                    vec![
                        Param::Int(2),
                        Param::from("two"),
                        Param::Int(3),
                        Param::from("three '$1 ?'"),
                    ],
                );
                // Runs after the inserts above, and reuses its $1.
                batch.push(
                    "UPDATE batch_probe SET twice = $1 + $1 WHERE id <= $2",
                    vec![Param::Int(21), Param::Int(2)],
                );
                assert_eq!(batch.len(), 3);
                batch.execute(connection).await
            })
        })
        .await?;
    assert_eq!(changed, 5, "1 + 2 inserted, 2 updated");
    type Row = (
        i64,
        Option<String>,
        Option<String>,
        Option<f64>,
        Option<Vec<u8>>,
        Option<i64>,
    );
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, label, note, ratio, bytes, twice FROM batch_probe ORDER BY id")
            .fetch_all(store.pool())
            .await?;
    assert_eq!(
        rows,
        [
            (
                1,
                Some("one".into()),
                None,
                Some(0.5),
                Some(vec![0, 1, 255]),
                Some(42)
            ),
            (2, Some("two".into()), None, None, None, Some(42)),
            (3, Some("three '$1 ?'".into()), None, None, None, None),
        ]
    );
    let failed = store
        .grouped(|connection| {
            Box::pin(async move {
                let mut batch = WriteBatch::new();
                batch.push(
                    "INSERT INTO batch_probe (id, label) VALUES ($1, $2)",
                    vec![Param::Int(4), Param::from("four")],
                );
                // The primary key is taken: this one fails.
                batch.push(
                    "INSERT INTO batch_probe (id, label) VALUES ($1, $2)",
                    vec![Param::Int(1), Param::from("again")],
                );
                batch.push(
                    "UPDATE batch_probe SET label = $1",
                    vec![Param::from("overwritten")],
                );
                batch.execute(connection).await
            })
        })
        .await;
    ensure!(
        matches!(
            failed,
            Err(civicgrid_marketplace::error::MarketError::Database(_))
        ),
        "{failed:?}"
    );
    let labels: Vec<String> = sqlx::query_scalar("SELECT label FROM batch_probe ORDER BY id")
        .fetch_all(store.pool())
        .await?;
    assert_eq!(labels, ["one", "two", "three '$1 ?'"]);
    // Parameters that do not match the placeholders are refused before
    // anything runs, on either database.
    let mismatched = store
        .grouped(|connection| {
            Box::pin(async move {
                let mut batch = WriteBatch::new();
                batch.push(
                    "INSERT INTO batch_probe (id, label) VALUES ($1, $2)",
                    vec![Param::Int(5)],
                );
                batch.execute(connection).await
            })
        })
        .await;
    ensure!(
        matches!(
            &mismatched,
            Err(civicgrid_marketplace::error::MarketError::Corrupt(message))
                if message.contains("2 placeholders and 1 parameters")
        ),
        "{mismatched:?}"
    );
    market.stop().await;
    Ok(())
}

civicgrid_tests::on_both_databases!(
    lifecycle_contract_and_verified_audit,
    grouped_works_fail_alone_wherever_they_stand,
    a_write_batch_runs_in_order_and_fails_whole,
    a_panicking_grouped_work_fails_its_caller_and_not_the_committer,
    tampering_is_reported,
    every_role_gets_exactly_its_permissions,
    bad_input_is_refused_with_the_field_named,
    demand_list_and_dcat_export,
    every_method_refuses_a_call_without_a_valid_token,
);
