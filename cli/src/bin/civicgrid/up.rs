//! `civicgrid up`: the marketplace on the embedded default (SQLite and
//! Parquet under one data directory), seeded with the sample city on first
//! start, serving until stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use civicgrid_cli::city::{self, SampleProduct, Sizes};
use civicgrid_marketplace::error::MarketError;
use civicgrid_marketplace::grpc::serve;
use civicgrid_marketplace::market::Marketplace;
use civicgrid_marketplace::proto::{
    self, billing_client::BillingClient, contracts_client::ContractsClient,
    identity_client::IdentityClient, registry_client::RegistryClient,
};
use civicgrid_marketplace::queries::EngineFlags;
use civicgrid_marketplace::store::{Location, Store};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

/// The file, in the data directory, that holds the demo users' tokens.
pub const CREDENTIALS_FILE: &str = "demo-credentials.json";

/// The seeded users' tokens (demo only: these are real, full-power tokens of
/// a local sandbox installation, kept in a 0600 file).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credentials {
    /// The gRPC endpoint.
    pub server: String,
    /// The audit log's origin and the key that verifies its checkpoints.
    pub log_origin: String,
    /// `civicgrid-marketplace verifier-key` output.
    pub verifier_key: String,
    /// platform-admin.
    pub platform_admin: String,
    /// provider-admin of city-data.
    pub city_data_admin: String,
    /// consumer-admin of acme-mobility.
    pub acme_admin: String,
    /// consumer-analyst of acme-mobility.
    pub acme_analyst: String,
    /// regulator of audit-office.
    pub regulator: String,
}

impl Credentials {
    /// Reads the credentials file `up` wrote.
    ///
    /// # Errors
    /// When it is missing or not JSON.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(CREDENTIALS_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (start `civicgrid up --data-dir {}` first)",
                path.display(),
                data_dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = data_dir.join(CREDENTIALS_FILE);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        file.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        file.sync_all()?;
        Ok(())
    }
}

/// A request with a bearer token.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Options of `civicgrid up`.
#[derive(Clone, Debug, clap::Args)]
pub struct UpArgs {
    /// Where the database, the products' files, the signing key and the
    /// demo credentials live.
    #[arg(long, env = "CIVICGRID_DATA_DIR", default_value = "./civicgrid-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL instead of the embedded SQLite (`postgres://…`).
    #[arg(long, env = "CIVICGRID_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where to serve gRPC (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// The SQL guest; default: the one `bash sandbox/build-guests.sh` builds
    /// in this checkout.
    #[arg(long, env = "CIVICGRID_SQL_GUEST")]
    pub sql_guest: Option<PathBuf>,
    /// Where compiled Wasm modules are cached (default: module-cache in the
    /// data directory).
    #[arg(long, env = "CIVICGRID_MODULE_CACHE")]
    pub module_cache: Option<PathBuf>,
    /// Sample data size: `city` (a year of a mid-sized city, TPC-H SF 0.1) or
    /// `small` (seconds to generate).
    #[arg(long, default_value = "city", value_parser = ["city", "small"])]
    pub sample_size: String,
    /// Serve Prometheus metrics (`/metrics`) and `/healthz` here.
    #[arg(long, env = "CIVICGRID_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub engine: EngineFlags,
}

fn default_guest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip1/guest/civicgrid_sandbox_guest.wasm")
}

/// Starts the marketplace, seeds it on first start, prints the endpoint and
/// the demo credentials, and serves until SIGINT or SIGTERM.
///
/// # Errors
/// When the data directory, the database, the guest or the port cannot be had.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    if let Err(error) = civicgrid_marketplace::process::disable_transparent_huge_pages() {
        eprintln!(
            "warning: transparent huge pages stay on ({error}): expect a longer latency tail"
        );
    }
    let data_dir = args.data_dir.clone();
    let guest = args.sql_guest.clone().unwrap_or_else(default_guest);
    let cache = args
        .module_cache
        .clone()
        .unwrap_or_else(|| data_dir.join("module-cache"));
    // A limit out of range stops `up` before it seeds anything.
    let config = args.engine.config(&guest, cache.clone())?;
    let runner_limits = (config.memory_bytes, config.wall_time);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let sizes = if args.sample_size == "small" {
        Sizes::SMALL
    } else {
        Sizes::CITY
    };
    if !data_dir.join("products/commerce/region.parquet").exists() {
        eprintln!(
            "writing the sample city's data under {} (once)…",
            data_dir.join("products").display()
        );
        let dir = data_dir.clone();
        tokio::task::spawn_blocking(move || city::write_all(&dir, sizes)).await??;
    }
    let location = match &args.database_url {
        Some(url) => Location::Url(url.clone()),
        None => Location::DataDir(data_dir.clone()),
    };
    let store = Store::open(&location).await?;
    let key = crate::signing_key(&data_dir.join("audit-signing.key"))?;
    let origin = "civicgrid.local/audit";
    let market = Marketplace::open(store, key, origin, data_dir.clone()).await?;
    market.recover_interrupted().await?;
    eprintln!("loading the SQL guest {} …", guest.display());
    let engine = tokio::task::spawn_blocking(move || EngineFlags::open(config))
        .await?
        .map_err(|error| match error {
            // A flag the guest cannot run under is the user's to change.
            MarketError::InvalidArgument { .. } => anyhow::Error::from(error),
            other => anyhow::Error::from(other).context(
                "the SQL guest is needed to run queries; build it with \
                 `bash sandbox/build-guests.sh` or pass --sql-guest",
            ),
        })?;
    market.attach_engine(engine)?;
    let _runner = local_runner(&market, &data_dir, &guest, cache, runner_limits).await?;
    if let Some(address) = args.metrics_listen {
        let bound = civicgrid_marketplace::metrics::spawn(address, market.metrics().clone())
            .await
            .with_context(|| format!("binding the metrics address {address}"))?;
        println!("metrics on http://{bound}/metrics");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    let server = format!("http://{address}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(market.clone(), listener, None, async {
        let _ = stopped.await;
    }));
    let credentials = match Credentials::load(&data_dir) {
        Ok(mut credentials) => {
            credentials.server.clone_from(&server);
            credentials.save(&data_dir)?;
            credentials
        }
        Err(_) => {
            let admin = market
                .bootstrap("platform", "admin@city.example")
                .await
                .context("initialising the marketplace")?;
            let channel = Channel::from_shared(server.clone())?.connect().await?;
            eprintln!("seeding the sample city's organizations, products and contracts…");
            let credentials = seed(
                channel,
                admin.secret.expose(),
                &server,
                origin,
                &market.verifier_key(),
            )
            .await?;
            credentials.save(&data_dir)?;
            credentials
        }
    };
    println!("CivicGrid marketplace serving on {server}");
    println!("data directory: {}", data_dir.display());
    println!(
        "demo credentials ({}):",
        data_dir.join(CREDENTIALS_FILE).display()
    );
    for (who, token) in [
        ("platform admin", &credentials.platform_admin),
        ("provider admin (city-data)", &credentials.city_data_admin),
        ("consumer admin (acme-mobility)", &credentials.acme_admin),
        (
            "consumer analyst (acme-mobility)",
            &credentials.acme_analyst,
        ),
        ("regulator (audit-office)", &credentials.regulator),
    ] {
        println!("  {who:34} {token}");
    }
    println!("audit verifier key: {}", credentials.verifier_key);
    println!(
        "try: CIVICGRID_SERVER={server} civicgrid demo --data-dir {}",
        data_dir.display()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping");
    let _ = stop.send(());
    serving.await??;
    Ok(())
}

async fn user(
    identity: &mut IdentityClient<Channel>,
    admin: &str,
    organization: &str,
    name: &str,
    role: &str,
) -> anyhow::Result<String> {
    let created = identity
        .create_user(authed(
            admin,
            proto::CreateUserRequest {
                organization_id: organization.into(),
                name: name.into(),
            },
        ))
        .await?
        .into_inner();
    identity
        .grant_role(authed(
            admin,
            proto::RoleBindingRequest {
                user_id: created.id.clone(),
                role: role.into(),
            },
        ))
        .await?;
    Ok(identity
        .issue_token(authed(
            admin,
            proto::IssueTokenRequest {
                user_id: created.id,
                ttl_seconds: 365 * 24 * 3600,
                description: "civicgrid up demo".into(),
            },
        ))
        .await?
        .into_inner()
        .secret)
}

/// Takes a product from draft to published: create, submit, public notice,
/// approval (as the platform admin), publish. Returns its registration number.
pub async fn register(
    channel: &Channel,
    provider: &str,
    platform_admin: &str,
    product: SampleProduct,
) -> anyhow::Result<String> {
    let mut registry = RegistryClient::new(channel.clone());
    let id = product.id.to_owned();
    let action = |reason: &str| proto::ProductAction {
        product_id: id.clone(),
        reason: reason.into(),
    };
    registry
        .create_product(authed(
            provider,
            proto::CreateProductRequest {
                id: id.clone(),
                spec: Some(product.spec),
            },
        ))
        .await?;
    registry
        .submit_product(authed(provider, action("")))
        .await?;
    registry
        .start_public_notice(authed(
            platform_admin,
            proto::StartPublicNoticeRequest {
                product_id: id.clone(),
                notice_days: 0,
            },
        ))
        .await?;
    let registered = registry
        .approve_registration(authed(platform_admin, action("")))
        .await?
        .into_inner();
    registry
        .publish_product(authed(provider, action("")))
        .await?;
    Ok(registered.registration_number)
}

/// A consumer-admin requests aggregate SQL on `product` under `plan`; the
/// provider approves. Returns the contract id.
pub async fn contract(
    channel: &Channel,
    consumer: &str,
    provider: &str,
    product: &str,
    plan: &str,
    purpose: &str,
) -> anyhow::Result<String> {
    let mut contracts = ContractsClient::new(channel.clone());
    let requested = contracts
        .request_contract(authed(
            consumer,
            proto::RequestContractRequest {
                product_id: product.into(),
                plan_id: plan.into(),
                operations: Some(proto::AllowedOperations {
                    aggregate_sql: true,
                    ..proto::AllowedOperations::default()
                }),
                monthly_query_quota: 10_000,
                duration_days: 365,
                purpose: purpose.into(),
            },
        ))
        .await?
        .into_inner();
    let approved = contracts
        .approve_contract(authed(
            provider,
            proto::ContractAction {
                contract_id: requested.id.clone(),
                reason: String::new(),
            },
        ))
        .await?
        .into_inner();
    ensure!(
        approved.state() == proto::ContractState::Active,
        "contract {} is not active",
        approved.id
    );
    Ok(requested.id)
}

/// Organizations, users, four published products, acme-mobility's contracts
/// and 1,000.00 EUR of credit.
async fn seed(
    channel: Channel,
    admin: &str,
    server: &str,
    origin: &str,
    verifier_key: &str,
) -> anyhow::Result<Credentials> {
    let mut identity = IdentityClient::new(channel.clone());
    for (id, name, kind) in [
        (
            "city-data",
            "City Data Office",
            proto::OrganizationKind::Provider,
        ),
        (
            "transit-authority",
            "Transit Authority",
            proto::OrganizationKind::Provider,
        ),
        (
            "chamber-of-commerce",
            "Chamber of Commerce",
            proto::OrganizationKind::Provider,
        ),
        (
            "acme-mobility",
            "Acme Mobility Ltd",
            proto::OrganizationKind::Consumer,
        ),
        (
            "audit-office",
            "Data Protection Audit Office",
            proto::OrganizationKind::Regulator,
        ),
    ] {
        identity
            .create_organization(authed(
                admin,
                proto::CreateOrganizationRequest {
                    id: id.into(),
                    display_name: name.into(),
                    kind: kind as i32,
                },
            ))
            .await?;
    }
    let city_data = user(
        &mut identity,
        admin,
        "city-data",
        "admin@city-data",
        "provider-admin",
    )
    .await?;
    let transit = user(
        &mut identity,
        admin,
        "transit-authority",
        "admin@transit",
        "provider-admin",
    )
    .await?;
    let chamber = user(
        &mut identity,
        admin,
        "chamber-of-commerce",
        "admin@chamber",
        "provider-admin",
    )
    .await?;
    let acme_admin = user(
        &mut identity,
        admin,
        "acme-mobility",
        "admin@acme",
        "consumer-admin",
    )
    .await?;
    let acme_analyst = user(
        &mut identity,
        admin,
        "acme-mobility",
        "analyst@acme",
        "consumer-analyst",
    )
    .await?;
    let regulator = user(
        &mut identity,
        admin,
        "audit-office",
        "inspector@audit-office",
        "regulator",
    )
    .await?;
    for (provider, product) in [
        (&city_data, city::hotline_tickets()),
        (&city_data, city::air_quality()),
        (&transit, city::bus_ridership()),
        (&chamber, city::commerce()),
    ] {
        let id = product.id;
        let number = register(&channel, provider, admin, product).await?;
        eprintln!("  published {id} ({number})");
    }
    for (provider, product, plan, purpose) in [
        (
            &city_data,
            "hotline-tickets",
            "per-query",
            "find where service requests pile up",
        ),
        (&city_data, "air-quality", "free", "route planning"),
        (
            &transit,
            "bus-ridership",
            "per-query",
            "size the on-demand shuttle fleet",
        ),
        (
            &chamber,
            "commerce",
            "per-compute-unit",
            "delivery demand by segment",
        ),
    ] {
        contract(&channel, &acme_admin, provider, product, plan, purpose).await?;
    }
    BillingClient::new(channel.clone())
        .deposit(authed(
            admin,
            proto::DepositRequest {
                organization_id: "acme-mobility".into(),
                amount_minor: 100_000,
                currency: "EUR".into(),
                reference: "demo credit".into(),
            },
        ))
        .await?;
    Ok(Credentials {
        server: server.to_owned(),
        log_origin: origin.to_owned(),
        verifier_key: verifier_key.to_owned(),
        platform_admin: admin.to_owned(),
        city_data_admin: city_data,
        acme_admin,
        acme_analyst,
        regulator,
    })
}

/// The embedded default's data center: a runner over the local data
/// directory for [`city::DATA_CENTER`], in this process but reached as any
/// runner is, over mutual TLS with certificates from an authority made for
/// this run alone. The marketplace then routes every query to it, as a
/// city's would to its data centers' runners (docs/runners.md).
async fn local_runner(
    market: &Marketplace,
    data_dir: &Path,
    guest: &Path,
    cache: PathBuf,
    (memory_bytes, wall_time): (u64, std::time::Duration),
) -> anyhow::Result<civicgrid_cli::local_runners::LocalRunners> {
    let mut sandbox = civicgrid_sandbox::SandboxConfig::new(cache);
    sandbox.max_memory_bytes = memory_bytes.max(sandbox.max_memory_bytes);
    let runners = civicgrid_cli::local_runners::start(
        market,
        civicgrid_cli::local_runners::Setup {
            data_center: city::DATA_CENTER.into(),
            products: data_dir.to_owned().into(),
            sql_guest: std::fs::read(guest)
                .with_context(|| format!("reading {}", guest.display()))?,
            sandbox,
            ceilings: civicgrid_runner::Ceilings {
                memory_bytes,
                wall_time,
            },
            runners: 1,
            heartbeat: std::time::Duration::from_secs(2),
        },
    )
    .await?;
    println!(
        "runner for data center {} on https://{}",
        city::DATA_CENTER,
        runners.runners[0].0
    );
    Ok(runners)
}
