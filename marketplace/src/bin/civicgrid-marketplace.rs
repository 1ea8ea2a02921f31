//! The marketplace gRPC server.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use civicgrid_marketplace::grpc::serve;
use civicgrid_marketplace::market::Marketplace;
use civicgrid_marketplace::store::{Location, Store};
use clap::{Args, Parser, Subcommand};
use ed25519_dalek::SigningKey;

// Queries allocate and free batch-sized blocks on the host by the thousand
// (Parquet pages, Arrow arrays, IPC buffers). glibc's allocator maps most
// such blocks fresh and hands them back to the kernel on free, so every
// batch paid page faults and zeroing again: TPC-H Q1 at SF1 in one sandbox
// instance took 1.87 s with it and 1.07 s with mimalloc (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CivicGrid marketplace: data-product registry, contracts and the audit log
/// over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve(Box<ServeArgs>),
    /// Create the platform organization and its first admin; prints the
    /// admin's token once.
    Init {
        #[command(flatten)]
        common: CommonArgs,
        /// The platform organization's id.
        #[arg(long, default_value = "platform")]
        organization: String,
        /// The first admin's user name.
        #[arg(long)]
        admin_name: String,
    },
    /// Write the sample `population` product's data (Parquet) under
    /// `<data-dir>/products/population`, for examples/products/population.json.
    SampleData {
        #[command(flatten)]
        common: CommonArgs,
        /// Residents to generate.
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
    },
    /// Print the audit log's verifier key (give it to regulators out of band).
    VerifierKey {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// Where the embedded SQLite database and the audit signing key live.
    #[arg(long, env = "CIVICGRID_DATA_DIR", default_value = "./civicgrid-data")]
    data_dir: PathBuf,
    /// A postgres:// URL; when set, the database is PostgreSQL instead of SQLite.
    #[arg(long, env = "CIVICGRID_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The audit log's Ed25519 signing key (32 raw bytes); created when missing.
    /// Defaults to audit-signing.key in the data directory.
    #[arg(long, env = "CIVICGRID_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    /// The audit log's origin: the first line of every checkpoint.
    #[arg(
        long,
        env = "CIVICGRID_LOG_ORIGIN",
        default_value = "civicgrid.local/audit"
    )]
    log_origin: String,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on (port 0 picks a free port; the chosen address is
    /// printed as `listening on ADDR`).
    #[arg(long, env = "CIVICGRID_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// PEM certificate chain for TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// The SQL guest (civicgrid_sandbox_guest.wasm, built by
    /// `bash sandbox/build-guests.sh`). Without it the server registers and
    /// contracts but runs no queries.
    #[arg(long, env = "CIVICGRID_SQL_GUEST")]
    sql_guest: Option<PathBuf>,
    #[command(flatten)]
    engine: civicgrid_marketplace::queries::EngineFlags,
    /// Serve Prometheus metrics (`/metrics`) and `/healthz` here.
    #[arg(long, env = "CIVICGRID_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Route every query to a runner in a data center hosting its product
    /// (docs/runners.md): the address runners report to, over mutual TLS.
    #[arg(long, requires_all = ["runners_tls_cert", "runners_tls_key", "runners_ca"])]
    runners_listen: Option<SocketAddr>,
    /// The marketplace's certificate towards runners (PEM): it serves the
    /// directory and is the client certificate runners require, so it
    /// carries both server and client use.
    #[arg(long, requires = "runners_listen")]
    runners_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "runners_listen")]
    runners_tls_key: Option<PathBuf>,
    /// The CA that signs runners' certificates (PEM).
    #[arg(long, requires = "runners_listen")]
    runners_ca: Option<PathBuf>,
    /// A witness to get the audit log's checkpoints cosigned by:
    /// `'<verifier key> <URL>'` (`civicgrid-witness key` prints the key).
    /// Repeat for several; a checkpoint is stored as witnessed once every
    /// one has cosigned it.
    #[arg(long = "witness", env = "CIVICGRID_WITNESSES", value_delimiter = ',')]
    witnesses: Vec<civicgrid_marketplace::market::WitnessEndpoint>,
    /// Seconds between submissions of a grown log to the witnesses.
    #[arg(long, default_value_t = 10)]
    witness_interval_secs: u64,
    /// Seconds after which an unchanged log is cosigned again, so that
    /// verifiers can tell from a cosignature's age that witnessing goes on.
    #[arg(long, default_value_t = civicgrid_marketplace::market::COSIGNATURE_REFRESH.as_secs())]
    witness_refresh_secs: u64,
    /// Seconds between sweeps that withdraw data versions past their
    /// product's retention and delete the files no readable version lists.
    #[arg(long, default_value_t = 3600)]
    retention_sweep_secs: u64,
    /// How long a runner counts as ready after its last heartbeat.
    #[arg(long, default_value_t = 15, requires = "runners_listen")]
    runner_ttl_secs: u64,
}

async fn open(common: &CommonArgs) -> anyhow::Result<std::sync::Arc<Marketplace>> {
    let location = match &common.database_url {
        Some(url) => Location::Url(url.clone()),
        None => Location::DataDir(common.data_dir.clone()),
    };
    let store = Store::open(&location)
        .await
        .context("opening the database")?;
    let key_file = common
        .signing_key_file
        .clone()
        .unwrap_or_else(|| common.data_dir.join("audit-signing.key"));
    let key = load_or_create_key(&key_file)?;
    Ok(Marketplace::open(store, key, &common.log_origin, common.data_dir.clone()).await?)
}

fn load_or_create_key(path: &Path) -> anyhow::Result<SigningKey> {
    Ok(civicgrid_marketplace::audit::load_or_create_signing_key(
        path,
    )?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = civicgrid_telemetry::init("civicgrid-marketplace", "info")?;
    match Cli::parse().command {
        Command::Init {
            common,
            organization,
            admin_name,
        } => {
            let market = open(&common).await?;
            let token = market.bootstrap(&organization, &admin_name).await?;
            println!("{}", token.secret.expose());
            eprintln!(
                "created platform organization {organization:?} and admin {admin_name:?}; the line above is its token, shown once"
            );
        }
        Command::SampleData { common, rows } => {
            let dir = common.data_dir.join("products/population");
            civicgrid_marketplace::quality::write_sample_population(&dir, rows)?;
            println!("{}", dir.display());
        }
        Command::VerifierKey { common } => {
            let market = open(&common).await?;
            println!("{}", market.verifier_key());
        }
        Command::Serve(args) => {
            if let Err(error) = civicgrid_marketplace::process::disable_transparent_huge_pages() {
                tracing::warn!(%error, "transparent huge pages stay on: expect a longer latency tail");
            }
            let market = open(&args.common).await?;
            let interrupted = market.recover_interrupted().await?;
            if interrupted > 0 {
                tracing::warn!(
                    interrupted,
                    "removed queries a previous run left unfinished (none was charged)"
                );
            }
            if let Some(sql_guest) = &args.sql_guest {
                let config = args
                    .engine
                    .config(sql_guest, args.common.data_dir.join("module-cache"))?;
                let engine = tokio::task::spawn_blocking(move || {
                    civicgrid_marketplace::queries::EngineFlags::open(config)
                })
                .await??;
                market.attach_engine(engine)?;
            } else {
                tracing::warn!("no --sql-guest: queries are refused until the server has one");
            }
            let tls = match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => {
                    let identity = tonic::transport::Identity::from_pem(
                        std::fs::read(cert)?,
                        std::fs::read(key)?,
                    );
                    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                    if let Some(ca) = &args.client_ca {
                        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(
                            std::fs::read(ca)?,
                        ));
                    }
                    Some(tls)
                }
                _ => None,
            };
            if let Some(address) = args.metrics_listen {
                let bound =
                    civicgrid_marketplace::metrics::spawn(address, market.metrics().clone())
                        .await
                        .with_context(|| format!("binding the metrics address {address}"))?;
                tracing::info!(address = %bound, "metrics serving");
            }
            if let (Some(address), Some(cert), Some(key), Some(ca)) = (
                args.runners_listen,
                &args.runners_tls_cert,
                &args.runners_tls_key,
                &args.runners_ca,
            ) {
                let (cert, key, ca) = (
                    std::fs::read(cert).context("reading --runners-tls-cert")?,
                    std::fs::read(key).context("reading --runners-tls-key")?,
                    std::fs::read(ca).context("reading --runners-ca")?,
                );
                let client_tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                    .identity(tonic::transport::Identity::from_pem(&cert, &key));
                let directory = civicgrid_marketplace::grpc::runners::RunnerDirectory::new(
                    client_tls,
                    std::time::Duration::from_secs(args.runner_ttl_secs.max(1)),
                );
                // Runners report to whichever server the load balancer
                // picks; on PostgreSQL every server hears of them all.
                let _sharing = directory.share_through(market.store().clone());
                market.attach_runners(directory.clone())?;
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding --runners-listen {address}"))?;
                tracing::info!(address = %listener.local_addr()?, "runner directory serving");
                let tls = civicgrid_runner::mutual_tls(&cert, &key, &ca);
                tokio::spawn(async move {
                    let serving = civicgrid_marketplace::grpc::runners::serve_directory(
                        directory,
                        listener,
                        tls,
                        std::future::pending(),
                    );
                    if let Err(error) = serving.await {
                        tracing::error!(%error, "the runner directory stopped");
                    }
                });
            }
            if !args.witnesses.is_empty() {
                tracing::info!(
                    witnesses = args.witnesses.len(),
                    "submitting checkpoints to witnesses"
                );
                market.spawn_witnessing(
                    args.witnesses.clone(),
                    std::time::Duration::from_secs(args.witness_interval_secs.max(1)),
                    std::time::Duration::from_secs(args.witness_refresh_secs.max(1)),
                );
            }
            market.spawn_data_upkeep(std::time::Duration::from_secs(
                args.retention_sweep_secs.max(1),
            ));
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            println!("listening on {}", listener.local_addr()?);
            tracing::info!(address = %listener.local_addr()?, origin = market.origin(), "marketplace serving");
            let shutdown = async {
                civicgrid_telemetry::shutdown_signal().await;
                tracing::info!("shutting down");
            };
            serve(market, listener, tls, shutdown).await?;
        }
    }
    Ok(())
}
