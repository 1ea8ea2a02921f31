//! A marketplace server on a free port over a fresh database — SQLite in a
//! temporary directory, or a new PostgreSQL database — and a cast of users in
//! every role, for tests over a real gRPC connection.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use civicgrid_marketplace::grpc::serve;
use civicgrid_marketplace::market::Marketplace;
use civicgrid_marketplace::proto;
use civicgrid_marketplace::proto::identity_client::IdentityClient;
use civicgrid_marketplace::proto::registry_client::RegistryClient;
use civicgrid_marketplace::store::{Location, Store};
use rand::RngCore as _;
use sqlx::Connection as _;
use tonic::transport::Channel;

/// The environment variable with an admin URL of the PostgreSQL the tests may
/// create databases in (`scripts/postgres.sh` prints one).
pub const POSTGRES_URL_ENV: &str = "CIVICGRID_TEST_POSTGRES_URL";

/// The audit log's origin in every test market.
pub const TEST_LOG_ORIGIN: &str = "audit.civicgrid.test";

/// Residents in the sample data every test market holds.
pub const SAMPLE_ROWS: usize = 1000;

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A new database in the PostgreSQL named by [`POSTGRES_URL_ENV`].
    Postgres,
}

/// A running marketplace.
pub struct TestMarket {
    /// Where it listens.
    pub address: SocketAddr,
    /// A connected channel.
    pub channel: Channel,
    /// The server's state.
    pub market: Arc<Marketplace>,
    /// The bootstrap platform admin's token.
    pub admin_token: String,
    /// The database URL, for tests that tamper with it directly.
    pub database_url: String,
    /// Where products' folders are.
    pub data_dir: std::path::PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn fresh_postgres_database() -> anyhow::Result<String> {
    let admin_url = std::env::var(POSTGRES_URL_ENV).with_context(|| {
        format!("{POSTGRES_URL_ENV} is not set: run `bash scripts/postgres.sh` and export the URL it prints")
    })?;
    let name = format!("cg_test_{}", random_suffix());
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .with_context(|| format!("connecting to {POSTGRES_URL_ENV}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let (base, _) = admin_url
        .rsplit_once('/')
        .context("the PostgreSQL URL ends in /DATABASE")?;
    Ok(format!("{base}/{name}"))
}

impl TestMarket {
    /// Starts a server over a fresh database and bootstraps its platform admin.
    ///
    /// # Errors
    /// When the database or the server cannot be started.
    pub async fn start(db: Db) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (location, database_url) = match db {
            Db::Sqlite => (
                Location::DataDir(dir.path().to_owned()),
                format!("sqlite://{}", dir.path().join("marketplace.db").display()),
            ),
            Db::Postgres => {
                let url = fresh_postgres_database().await?;
                (Location::Url(url.clone()), url)
            }
        };
        let store = Store::open(&location).await?;
        let key = ed25519_dalek_key();
        // The sample product's data, where specs with storage location
        // `products/population` find it.
        civicgrid_marketplace::quality::write_sample_population(
            &dir.path().join("products/population"),
            SAMPLE_ROWS,
        )?;
        let market = Marketplace::open(store, key, TEST_LOG_ORIGIN, dir.path().to_owned()).await?;
        let admin_token = market
            .bootstrap("platform", "admin@city.example")
            .await?
            .secret
            .expose()
            .to_owned();
        let data_dir = dir.path().to_owned();
        Self::serve(market, admin_token, database_url, data_dir, dir).await
    }

    /// Starts another server over this one's database and products' folders,
    /// with the same signing key and origin: a second replica behind the
    /// same load balancer.
    ///
    /// # Errors
    /// When the database or the server cannot be started.
    pub async fn start_replica(&self) -> anyhow::Result<Self> {
        let store = Store::open(&Location::Url(self.database_url.clone())).await?;
        let market = Marketplace::open(
            store,
            ed25519_dalek_key(),
            TEST_LOG_ORIGIN,
            self.data_dir.clone(),
        )
        .await?;
        Self::serve_beside(market, self).await
    }

    /// Serves `market` (over `other`'s database and products' folders) on a
    /// port of its own, with `other`'s admin token.
    ///
    /// # Errors
    /// When the server cannot be started.
    pub async fn serve_beside(market: Arc<Marketplace>, other: &Self) -> anyhow::Result<Self> {
        Self::serve(
            market,
            other.admin_token.clone(),
            other.database_url.clone(),
            other.data_dir.clone(),
            tempfile::tempdir()?,
        )
        .await
    }

    /// Stops the server but keeps its database and folders, for another
    /// server to open.
    pub async fn halt(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    async fn serve(
        market: Arc<Marketplace>,
        admin_token: String,
        database_url: String,
        data_dir: std::path::PathBuf,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_market = market.clone();
        let server = tokio::spawn(async move {
            let _ = serve(server_market, listener, None, async {
                let _ = stopped.await;
            })
            .await;
        });
        let channel = Channel::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        Ok(Self {
            address,
            channel,
            market,
            admin_token,
            database_url,
            data_dir,
            shutdown: Some(shutdown),
            server: Some(server),
            _dir: dir,
        })
    }

    /// A pool on the same database, bypassing the server (for tampering).
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub async fn raw_pool(&self) -> anyhow::Result<sqlx::AnyPool> {
        sqlx::any::install_default_drivers();
        Ok(sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&self.database_url)
            .await?)
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

/// The signing key tests use: fixed, so checkpoints are reproducible.
#[must_use]
pub fn ed25519_dalek_key() -> civicgrid_marketplace::audit::checkpoint::SigningKey {
    civicgrid_marketplace::audit::checkpoint::SigningKey::from_bytes(&[42u8; 32])
}

/// A request with a bearer token.
#[must_use]
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a token is ASCII"),
    );
    request
}

/// Users in every role, in their own and in rival tenants.
#[derive(Clone, Debug)]
pub struct Cast {
    /// platform-admin.
    pub admin: String,
    /// provider-admin of `city-data`.
    pub provider_admin: String,
    /// provider-analyst of `city-data`.
    pub provider_analyst: String,
    /// consumer-admin of `acme`.
    pub consumer_admin: String,
    /// consumer-analyst of `acme`.
    pub consumer_analyst: String,
    /// regulator of `audit-office`.
    pub regulator: String,
    /// provider-admin of the rival provider `rival-data`.
    pub rival_provider_admin: String,
    /// consumer-admin of the rival consumer `globex`.
    pub rival_consumer_admin: String,
    /// A user of `acme` with no role at all.
    pub nobody: String,
}

impl Cast {
    /// Creates the organizations, users, roles and tokens.
    ///
    /// # Errors
    /// When any call fails.
    pub async fn create(market: &TestMarket) -> anyhow::Result<Self> {
        let admin = market.admin_token.clone();
        let mut identity = IdentityClient::new(market.channel.clone());
        for (id, kind) in [
            ("city-data", proto::OrganizationKind::Provider),
            ("rival-data", proto::OrganizationKind::Provider),
            ("acme", proto::OrganizationKind::Consumer),
            ("globex", proto::OrganizationKind::Consumer),
            ("audit-office", proto::OrganizationKind::Regulator),
        ] {
            identity
                .create_organization(authed(
                    &admin,
                    proto::CreateOrganizationRequest {
                        id: id.into(),
                        display_name: id.into(),
                        kind: kind as i32,
                    },
                ))
                .await?;
        }
        let mut user =
            async |organization: &str, name: &str, role: Option<&str>| -> anyhow::Result<String> {
                let created = identity
                    .create_user(authed(
                        &admin,
                        proto::CreateUserRequest {
                            organization_id: organization.into(),
                            name: name.into(),
                        },
                    ))
                    .await?
                    .into_inner();
                if let Some(role) = role {
                    identity
                        .grant_role(authed(
                            &admin,
                            proto::RoleBindingRequest {
                                user_id: created.id.clone(),
                                role: role.into(),
                            },
                        ))
                        .await?;
                }
                Ok(identity
                    .issue_token(authed(
                        &admin,
                        proto::IssueTokenRequest {
                            user_id: created.id,
                            ttl_seconds: 3600,
                            description: "test".into(),
                        },
                    ))
                    .await?
                    .into_inner()
                    .secret)
            };
        Ok(Self {
            provider_admin: user("city-data", "pa@city-data", Some("provider-admin")).await?,
            provider_analyst: user("city-data", "analyst@city-data", Some("provider-analyst"))
                .await?,
            consumer_admin: user("acme", "ca@acme", Some("consumer-admin")).await?,
            consumer_analyst: user("acme", "analyst@acme", Some("consumer-analyst")).await?,
            regulator: user("audit-office", "inspector@audit-office", Some("regulator")).await?,
            rival_provider_admin: user("rival-data", "pa@rival-data", Some("provider-admin"))
                .await?,
            rival_consumer_admin: user("globex", "ca@globex", Some("consumer-admin")).await?,
            nobody: user("acme", "intern@acme", None).await?,
            admin,
        })
    }
}

/// PEM credentials for a mutual-TLS marketplace: a CA, the server's
/// certificate for `localhost`, a client certificate the CA signed, and one a
/// rogue CA signed.
#[derive(Debug)]
pub struct MtlsPki {
    /// The CA clients and server trust.
    pub ca_cert: String,
    /// The server's certificate and key.
    pub server: (String, String),
    /// A client certificate and key signed by the CA.
    pub client: (String, String),
    /// A client certificate and key signed by another CA.
    pub rogue_client: (String, String),
}

impl MtlsPki {
    /// Generates fresh credentials.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn generate() -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            SanType,
        };
        let authority = |name: &str| -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key)?;
            Ok((cert.pem(), Issuer::new(params, key)))
        };
        let leaf = |issuer: &Issuer<'static, KeyPair>,
                    names: Vec<String>,
                    purpose: ExtendedKeyUsagePurpose|
         -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            if purpose == ExtendedKeyUsagePurpose::ServerAuth {
                params
                    .subject_alt_names
                    .push(SanType::IpAddress(std::net::IpAddr::V4(
                        std::net::Ipv4Addr::LOCALHOST,
                    )));
            }
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (ca_cert, ca) = authority("civicgrid-test-marketplace-ca")?;
        let (_, rogue) = authority("rogue-ca")?;
        Ok(Self {
            ca_cert,
            server: leaf(
                &ca,
                vec!["localhost".into()],
                ExtendedKeyUsagePurpose::ServerAuth,
            )?,
            client: leaf(
                &ca,
                vec!["inspector".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
            rogue_client: leaf(
                &rogue,
                vec!["intruder".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
        })
    }
}

/// The sample product's spec (population by district; person_id blocked and
/// the privacy unit; 250 EUR cents per query).
#[must_use]
pub fn sample_spec() -> proto::ProductSpec {
    use proto::{Column, OutputPolicy, PriceKind, PricePlan, Sensitivity, Table};
    let column = |name: &str, kind: &str, sensitivity: Sensitivity| Column {
        name: name.into(),
        r#type: kind.into(),
        sensitivity: sensitivity as i32,
        description: String::new(),
    };
    proto::ProductSpec {
        title: "Population by district".into(),
        description: "Registered residents per district and age band, monthly".into(),
        keywords: vec!["population".into(), "census".into()],
        licence: "CC-BY-4.0".into(),
        update_frequency: "monthly".into(),
        hosting_data_centers: vec!["municipal-core".into()],
        tier: "municipal".into(),
        region: "city-north".into(),
        storage_location: "products/population".into(),
        tables: vec![Table {
            name: "residents".into(),
            columns: vec![
                column("district", "utf8", Sensitivity::Public),
                column("age_band", "utf8", Sensitivity::Public),
                column("person_id", "int64", Sensitivity::Blocked),
            ],
        }],
        output_policy: Some(OutputPolicy {
            min_aggregation_count: 10,
            privacy_unit_column: "person_id".into(),
            list_columns: vec!["district".into()],
            max_list_rows: 1000,
            max_result_bytes: 1 << 20,
            ..Default::default()
        }),
        price_plans: vec![PricePlan {
            id: "per-query".into(),
            kind: PriceKind::PerQuery as i32,
            unit_price_minor: 250,
            currency: "EUR".into(),
            ..Default::default()
        }],
        quality: Some(proto::QualityMetrics {
            completeness: 0.98,
            validity: 0.995,
            freshness_seconds: 86_400,
        }),
        version_retention_days: 0,
        quality_minimums: None,
        refresh_minutes: 0,
    }
}

/// A lifecycle action on a product.
#[must_use]
pub fn action(product: &str, reason: &str) -> proto::ProductAction {
    proto::ProductAction {
        product_id: product.into(),
        reason: reason.into(),
    }
}

/// Registers and publishes `id` (the sample spec) as city-data's provider admin.
pub async fn publish(market: &TestMarket, cast: &Cast, id: &str) -> anyhow::Result<proto::Product> {
    publish_spec(market, cast, id, sample_spec()).await
}

/// Registers and publishes `id` with `spec` as city-data's provider admin.
pub async fn publish_spec(
    market: &TestMarket,
    cast: &Cast,
    id: &str,
    spec: proto::ProductSpec,
) -> anyhow::Result<proto::Product> {
    let mut registry = RegistryClient::new(market.channel.clone());
    let draft = registry
        .create_product(authed(
            &cast.provider_admin,
            proto::CreateProductRequest {
                id: id.into(),
                spec: Some(spec),
            },
        ))
        .await?
        .into_inner();
    ensure!(draft.state() == proto::ProductState::Draft);
    registry
        .submit_product(authed(&cast.provider_admin, action(id, "")))
        .await?;
    let noticed = registry
        .start_public_notice(authed(
            &cast.admin,
            proto::StartPublicNoticeRequest {
                product_id: id.into(),
                notice_days: 0,
            },
        ))
        .await?
        .into_inner();
    ensure!(noticed.state() == proto::ProductState::UnderPublicNotice);
    let registered = registry
        .approve_registration(authed(&cast.admin, action(id, "")))
        .await?
        .into_inner();
    ensure!(registered.state() == proto::ProductState::Registered);
    ensure!(
        registered.registration_number.starts_with("CG-")
            && registered.registration_number.len() == 14,
        "registration number {:?}",
        registered.registration_number
    );
    ensure!(!registered.approved_by_user_id.is_empty() && registered.registered_at_unix_ms > 0);
    Ok(registry
        .publish_product(authed(&cast.provider_admin, action(id, "")))
        .await?
        .into_inner())
}

/// A consumer's request for aggregate SQL and district lists on `product`.
#[must_use]
pub fn contract_request(product: &str) -> proto::RequestContractRequest {
    proto::RequestContractRequest {
        product_id: product.into(),
        plan_id: "per-query".into(),
        operations: Some(proto::AllowedOperations {
            aggregate_sql: true,
            list_columns: vec!["district".into()],
            algorithm_sha256: vec![],
        }),
        monthly_query_quota: 100,
        duration_days: 30,
        purpose: "plan bus routes by district population".into(),
    }
}

/// acme's contract on `product` (the [`contract_request`]), requested by
/// its admin and approved by the provider's; its id.
///
/// # Errors
/// A refusal of either.
pub async fn approved_contract(
    market: &TestMarket,
    cast: &Cast,
    product: &str,
) -> anyhow::Result<String> {
    let mut contracts = proto::contracts_client::ContractsClient::new(market.channel.clone());
    let contract_id = contracts
        .request_contract(authed(&cast.consumer_admin, contract_request(product)))
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

/// Deposits `amount_minor` EUR cents on acme's balance, as the platform
/// admin.
///
/// # Errors
/// A refusal.
pub async fn deposit(market: &TestMarket, amount_minor: i64) -> anyhow::Result<()> {
    proto::billing_client::BillingClient::new(market.channel.clone())
        .deposit(authed(
            &market.admin_token,
            proto::DepositRequest {
                organization_id: "acme".into(),
                amount_minor,
                currency: "EUR".into(),
                reference: "test top-up".into(),
            },
        ))
        .await?;
    Ok(())
}

/// acme's balance and what of it is held, summed over currencies, as its
/// admin sees them.
///
/// # Errors
/// A refusal.
pub async fn acme_balance(market: &TestMarket, cast: &Cast) -> anyhow::Result<(i64, i64)> {
    let balances = proto::billing_client::BillingClient::new(market.channel.clone())
        .get_balance(authed(
            &cast.consumer_admin,
            proto::GetBalanceRequest {
                organization_id: "acme".into(),
            },
        ))
        .await?
        .into_inner()
        .balances;
    Ok((
        balances.iter().map(|b| b.balance_minor).sum(),
        balances.iter().map(|b| b.held_minor).sum(),
    ))
}
