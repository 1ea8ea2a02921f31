//! The first of a query's two transactions: its terms from the product and
//! the contract, the consumer's standing, and the query recorded as running
//! with its hold.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use civicgrid_sandbox::policy::OutputPolicy;
use sqlx::AnyConnection;

use crate::billing;
use crate::error::{MarketError, Result};
use crate::identity::Principal;
use crate::metering::Metering;
use crate::registry::{self, Product, ProductState};
use crate::spec::{PriceKind, PricePlan};
use crate::store::queries::{ProductAsRead, RunningQuery, Standing};
use crate::store::{self, now_ms};

use super::remote::RunnerChoice;
use super::{Market, QueryEngine, QueryRequest, sandbox_policy};

/// A product as read, with its spec's bytes as stored.
pub(super) type StoredProduct = (Product, Vec<u8>);

/// Everything decided before the sandbox runs.
pub(super) struct Reservation {
    /// The runner chosen to run it, when queries are routed; after the run,
    /// the one that ran it.
    pub(super) runner: Option<RunnerChoice>,
    /// The data centers hosting the product: where else it may run when
    /// the chosen runner does not take it.
    pub(super) hosting_data_centers: Vec<String>,
    pub(super) query_id: String,
    pub(super) consumer: String,
    pub(super) provider: String,
    pub(super) product_id: String,
    /// The product's registration version the query ran under (its spec:
    /// tables, policy, storage); the audit entry records it.
    pub(super) product_version: i64,
    pub(super) contract_id: String,
    pub(super) plan: PricePlan,
    pub(super) period: String,
    pub(super) hold: i64,
    pub(super) compute_units: i64,
    /// Withheld where the product's policy withholds rows (see [`crate::metering`]).
    pub(super) metering: Metering,
    /// When it was reserved: the time every view of the query shows (the
    /// time it settled would tell how long it ran).
    pub(super) created_at: i64,
    pub(super) policy: OutputPolicy,
    pub(super) privacy_budget: f64,
    pub(super) storage: ProductFiles,
    /// The product's last update: what `now()` reads inside the query, so the
    /// same query on the same data always meters the same fuel.
    pub(super) as_of_unix_seconds: u64,
    pub(super) algorithm: Option<Vec<u8>>,
    pub(super) algorithm_sha256: String,
}

/// A product's folder and what of it the product declares: only those
/// tables and columns are served.
#[derive(Debug, Clone)]
pub(super) struct ProductFiles {
    /// The location as registered, for a runner to resolve.
    pub(super) location: String,
    pub(super) dir: Option<PathBuf>,
    pub(super) declared: HashMap<String, Vec<String>>,
    /// The data version read, or `None` for a product with none.
    pub(super) version: Option<Arc<ReadVersion>>,
}

/// A data version as a query reads it.
#[derive(Debug)]
pub(crate) struct ReadVersion {
    pub(crate) version: i64,
    /// Where its files are ("" in the embedded default).
    pub(crate) data_center: String,
    pub(crate) fingerprint: String,
    pub(crate) manifest: civicgrid_sandbox::manifest::Manifest,
}

/// The data version a query on `product` reads: the one asked for, or
/// the newest. Versions are immutable, so each is read from the database
/// once per process.
async fn read_version(
    connection: &mut AnyConnection,
    engine: &QueryEngine,
    product: &Product,
    asked: i64,
) -> Result<Option<Arc<ReadVersion>>> {
    let version = match asked {
        0 => product.data_version,
        asked if asked < 0 => {
            return Err(MarketError::invalid(
                "data_version",
                "0 (the newest) or a version number",
            ));
        }
        asked if asked > product.data_version => {
            return Err(MarketError::NotFound {
                what: "data version",
                id: format!("{}@{asked}", product.id),
            });
        }
        asked => asked,
    };
    if version == 0 {
        return Ok(None);
    }
    // Only the newest version is kept read: it cannot be withdrawn, while
    // an older one may be at any time, on any server.
    let newest = version == product.data_version;
    let key = (product.id.clone(), version);
    if newest
        && let Some(known) = engine
            .versions_read
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
    {
        return Ok(Some(Arc::clone(known)));
    }
    let stored = crate::versions::verified(connection, &product.id, version).await?;
    let read = Arc::new(ReadVersion {
        version,
        data_center: stored.data_center,
        fingerprint: stored.fingerprint,
        manifest: stored.manifest,
    });
    if newest {
        let mut cache = engine
            .versions_read
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_VERSIONS_READ {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&read));
    }
    Ok(Some(read))
}

/// Versions kept read at once; past it the cache starts over.
const MAX_VERSIONS_READ: usize = 4096;

/// What a product and the consumer's contract on it set for a query,
/// worked out before the consumer's standing is read.
struct Terms {
    contract_id: String,
    monthly_query_quota: i64,
    plan: PricePlan,
    policy: OutputPolicy,
    storage: ProductFiles,
    dp_epsilon_budget: f64,
}

fn query_terms(
    market: &dyn Market,
    consumer: &str,
    product: &Product,
    algorithm_sha256: &str,
    now: i64,
) -> Result<Terms> {
    if product.state != ProductState::Published {
        return Err(MarketError::FailedPrecondition(format!(
            "product {} is {}, not published",
            product.id,
            product.state.name()
        )));
    }
    let spec = &product.spec;
    let grant = market
        .contract_index()
        .grant_for_query(consumer, &product.id, algorithm_sha256, now)
        .map_err(|reason| MarketError::PermissionDenied {
            permission: "query:run".into(),
            context: format!(" on product {}: {reason}", product.id),
        })?;
    let plan = spec
        .price_plans
        .iter()
        .find(|plan| plan.id == grant.plan_id)
        .cloned()
        .ok_or_else(|| {
            MarketError::FailedPrecondition(format!(
                "contract {}'s plan {:?} is no longer offered by product {}",
                grant.contract_id, grant.plan_id, product.id
            ))
        })?;
    let policy = sandbox_policy(spec, &grant.operations).map_err(|error| {
        MarketError::FailedPrecondition(format!(
            "product {}'s output policy cannot be enforced: {error}",
            product.id
        ))
    })?;
    // A runner resolves the location in its own data center; the
    // marketplace reads the files only when it runs the query itself.
    let dir = match market.runners() {
        Some(_) => None,
        None => Some(
            crate::quality::resolve_location(market.data_dir(), &spec.storage_location).map_err(
                |error| {
                    MarketError::FailedPrecondition(format!(
                        "product {}'s storage cannot be served: {error}",
                        product.id
                    ))
                },
            )?,
        ),
    };
    let storage = ProductFiles {
        location: spec.storage_location.clone(),
        version: None,
        dir,
        declared: spec
            .tables
            .iter()
            .map(|table| {
                (
                    table.name.clone(),
                    table.columns.iter().map(|c| c.name.clone()).collect(),
                )
            })
            .collect(),
    };
    Ok(Terms {
        contract_id: grant.contract_id,
        monthly_query_quota: grant.monthly_query_quota,
        plan,
        policy,
        storage,
        dp_epsilon_budget: spec
            .output_policy
            .as_ref()
            .map_or(0.0, |policy| policy.dp_epsilon_budget),
    })
}

/// Authorizes the query and records it as running with its hold.
///
/// `seen` is the product as an earlier reservation read it. On SQLite every
/// statement here is a trip to the one writer's thread while every other
/// reservation and settlement waits, so the product is not read again while
/// that earlier read still holds: the standing's statement confirms it is
/// the stored row. When it is not, or when it would refuse the query, the
/// product is read here and decides.
#[tracing::instrument(name = "authorize", skip_all)]
pub(super) async fn reserve(
    connection: &mut AnyConnection,
    market: &dyn Market,
    engine: &QueryEngine,
    principal: &Principal,
    request: &QueryRequest,
    (algorithm_sha256, digest): (&str, &str),
    seen: Option<Arc<StoredProduct>>,
) -> Result<Reservation> {
    let consumer = principal.organization.id.clone();
    let now = now_ms();
    let period = billing::period_of(now);
    let asked = Asked {
        consumer: &consumer,
        request,
        algorithm_sha256,
        period: &period,
        now,
    };
    let (product, terms, standing) =
        terms_and_standing(connection, market, engine, &asked, seen).await?;
    let product = &product.0;
    let Terms {
        contract_id,
        monthly_query_quota: quota,
        plan,
        policy,
        storage,
        dp_epsilon_budget,
    } = terms;
    let mut storage = storage;
    storage.version = read_version(connection, engine, product, request.data_version).await?;
    let runner = choose_runner(market, product, storage.version.as_deref())?;
    let metering = Metering::for_product(&product.spec, &policy);
    let compute_units = compute_budget(engine, request, product, &plan, metering)?;
    let hold = check_quota_and_funds(
        &standing,
        &contract_id,
        quota,
        &plan,
        &period,
        compute_units,
    )?;
    let privacy_budget = if dp_epsilon_budget > 0.0 {
        privacy_remaining(
            connection,
            &consumer,
            &product.id,
            dp_epsilon_budget,
            &standing,
        )
        .await?
    } else {
        0.0
    };
    let query_id = crate::identity::new_id("q");
    let inserted = store::queries::insert_running(
        connection,
        &RunningQuery {
            id: &query_id,
            consumer: &consumer,
            user: &principal.user.id,
            product: &product.id,
            provider: &product.provider_organization_id,
            contract: &contract_id,
            plan: &plan.id,
            idempotency_key: &request.idempotency_key,
            request_sha256: digest,
            sql: &request.sql,
            algorithm_sha256,
            period: &period,
            currency: &plan.currency,
            held_minor: hold,
            created_at: now,
            data_center: runner
                .as_ref()
                .map_or("", |runner| runner.data_center.as_str()),
            replica: market.replica_id(),
        },
    )
    .await?;
    if !inserted {
        return Err(MarketError::Aborted(
            "a query with this idempotency key started just now; retry shortly".into(),
        ));
    }
    Ok(Reservation {
        runner,
        hosting_data_centers: match storage.version.as_deref() {
            Some(read) if !read.data_center.is_empty() => vec![read.data_center.clone()],
            _ => product.spec.hosting_data_centers.clone(),
        },
        query_id,
        consumer,
        provider: product.provider_organization_id.clone(),
        product_id: product.id.clone(),
        product_version: product.version,
        contract_id,
        plan,
        period,
        hold,
        compute_units,
        metering,
        created_at: now,
        policy,
        privacy_budget,
        storage,
        as_of_unix_seconds: u64::try_from(product.updated_at_unix_ms / 1000).unwrap_or(0),
        algorithm: (!request.algorithm_wasm.is_empty()).then(|| request.algorithm_wasm.clone()),
        algorithm_sha256: algorithm_sha256.to_owned(),
    })
}

/// A ready runner in a data center hosting `product`, when queries are
/// routed; refused as unavailable, naming the data centers, before anything
/// is held.
fn choose_runner(
    market: &dyn Market,
    product: &Product,
    version: Option<&ReadVersion>,
) -> Result<Option<RunnerChoice>> {
    let Some(runners) = market.runners() else {
        return Ok(None);
    };
    // A version's files are in the store of the data center that took its
    // upload; elsewhere there is nothing to read.
    let stored_in = version
        .filter(|read| !read.data_center.is_empty())
        .map(|read| vec![read.data_center.clone()]);
    let hosts = stored_in
        .as_ref()
        .unwrap_or(&product.spec.hosting_data_centers);
    runners.pick(hosts).map(Some).ok_or_else(|| {
        MarketError::Unavailable(format!(
            "no runner is ready in {} to run queries on product {}; retry later",
            hosts.join(" or "),
            product.id
        ))
    })
}

/// Who asks what, and when.
struct Asked<'a> {
    consumer: &'a str,
    request: &'a QueryRequest,
    algorithm_sha256: &'a str,
    period: &'a str,
    now: i64,
}

/// The product, the terms it and the contract set, and the consumer's
/// standing under them, with the consumer's account locked for the hold.
/// A product remembered from an earlier reservation is used while the
/// standing's statement confirms it is still the stored row; otherwise it
/// is read afresh and decides.
async fn terms_and_standing(
    connection: &mut AnyConnection,
    market: &dyn Market,
    engine: &QueryEngine,
    asked: &Asked<'_>,
    mut seen: Option<Arc<StoredProduct>>,
) -> Result<(Arc<StoredProduct>, Terms, Standing)> {
    // Each pass that does not return corrects the index from the database,
    // so a contract cannot send the loop round twice; the bound is for the
    // bug that would.
    for _ in 0..8 {
        let (product, from_memory) = match seen.take() {
            Some(product) => (product, true),
            None => {
                let product =
                    Arc::new(registry::get_as_stored(connection, &asked.request.product_id).await?);
                engine.remember_product(Arc::clone(&product));
                (product, false)
            }
        };
        let terms = match query_terms(
            market,
            asked.consumer,
            &product.0,
            asked.algorithm_sha256,
            asked.now,
        ) {
            Ok(terms) => terms,
            Err(_) if from_memory => continue,
            Err(refusal) => return Err(refusal),
        };
        store::ledger::lock_for_hold(
            connection,
            market.store().backend(),
            asked.consumer,
            &terms.plan.currency,
        )
        .await?;
        let (read, spec) = product.as_ref();
        let standing = store::queries::standing(
            connection,
            &terms.contract_id,
            asked.period,
            asked.consumer,
            &terms.plan.currency,
            ProductAsRead::of(read, spec),
        )
        .await?;
        if !standing.contract_active {
            // Revoked (or ended) by another server whose notice has not
            // arrived: the stored contract decides, and corrects the index.
            let contract = store::contracts::get(connection, &terms.contract_id).await?;
            market.contract_index().update(&contract);
            continue;
        }
        if from_memory && !standing.product_unchanged {
            continue;
        }
        return Ok((product, terms, standing));
    }
    Err(MarketError::Corrupt(
        "the contract index and the stored contracts keep disagreeing".into(),
    ))
}

/// The compute units a query may use: its own choice, or the server's
/// default where the product withholds rows (a budget of the consumer's
/// choosing would be a threshold on a cost that counts withheld rows).
fn compute_budget(
    engine: &QueryEngine,
    request: &QueryRequest,
    product: &Product,
    plan: &PricePlan,
    metering: Metering,
) -> Result<i64> {
    let config = engine.config();
    let compute_units = match metering {
        Metering::Exact if request.max_compute_units > 0 => request.max_compute_units,
        Metering::Withheld if request.max_compute_units > 0 => {
            return Err(MarketError::invalid(
                "max_compute_units",
                format!(
                    "product {} withholds rows, so every query on it has the server's compute \
                     budget (a budget of your choosing would tell how much a query cost, and with \
                     it how many rows it filtered); leave it 0",
                    product.id
                ),
            ));
        }
        Metering::Exact | Metering::Withheld => config.default_compute_units,
    };
    if metering == Metering::Withheld && plan.kind() == PriceKind::PerComputeUnit {
        return Err(MarketError::FailedPrecondition(format!(
            "product {}'s plan {} is priced by compute, which on a product that withholds rows \
             would bill by the rows a query filtered; its provider must price it another way",
            product.id, plan.id
        )));
    }
    Ok(compute_units)
}

/// Refuses a query over its contract's quota or beyond the consumer's
/// available funds; returns the hold (the plan's most for this query).
fn check_quota_and_funds(
    standing: &Standing,
    contract_id: &str,
    quota: i64,
    plan: &PricePlan,
    period: &str,
    compute_units: i64,
) -> Result<i64> {
    let usage = standing.usage;
    if quota > 0 && usage.queries + standing.running >= quota {
        return Err(MarketError::ResourceExhausted(format!(
            "contract {contract_id}'s quota of {quota} queries in {period} is used up"
        )));
    }
    let hold = billing::maximum(plan, usage, compute_units)?;
    let available = standing.balance - standing.held;
    if hold > 0 && available < hold {
        return Err(MarketError::FailedPrecondition(format!(
            "insufficient funds: this query holds up to {hold} {currency} (minor units) and \
             {available} is available; deposit more, or lower max_compute_units",
            currency = plan.currency,
        )));
    }
    Ok(hold)
}

/// The privacy budget left for one query on a differentially private
/// product. It is read here and debited at settlement, so two runs at once
/// would each be offered the whole remainder. Reservations of one consumer
/// are serialized (the account lock, or SQLite's one writer), so one
/// running query per consumer and product makes the remainder read here
/// exact.
async fn privacy_remaining(
    connection: &mut AnyConnection,
    consumer: &str,
    product_id: &str,
    budget: f64,
    standing: &Standing,
) -> Result<f64> {
    let running = store::queries::running_on_product(connection, consumer, product_id).await?;
    if running > 0 {
        return Err(MarketError::Aborted(
            "another query of your organization on this differentially private product is \
             still running; its privacy budget is spent one query at a time, so retry when \
             that one has finished"
                .into(),
        ));
    }
    Ok((budget - standing.privacy_spent).max(0.0))
}
