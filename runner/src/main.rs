//! `civicgrid-runner`: serves the Runner API to the marketplace over mutual
//! TLS, running queries over the products in one data center's store (its
//! object store, or a directory).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use civicgrid_runner::{Ceilings, ProductStore, RunnerService, mutual_tls, serve};
use civicgrid_sandbox::{GuestRole, Sandbox, SandboxConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Runs authorized CivicGrid queries next to a data center's product data"
)]
struct Args {
    /// The data center this runner serves (its certificate names it too).
    #[arg(long, env = "CIVICGRID_DATA_CENTER")]
    data_center: String,
    /// Where to listen for the marketplace.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// The data center's product folders, in a directory.
    #[arg(
        long,
        required_unless_present = "object_store",
        conflicts_with = "object_store"
    )]
    data_dir: Option<PathBuf>,
    /// The data center's product folders, in its S3-compatible object
    /// store: s3://BUCKET or s3://BUCKET/PREFIX. Credentials, region and
    /// endpoint come from the environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT, AWS_ALLOW_HTTP).
    #[arg(long, env = "CIVICGRID_OBJECT_STORE")]
    object_store: Option<String>,
    /// The SQL guest (`civicgrid_sandbox_guest.wasm`).
    #[arg(long, env = "CIVICGRID_SQL_GUEST")]
    sql_guest: PathBuf,
    /// Where providers' uploads are staged until they are checked and
    /// stored (default: `.staging` in the data directory, or the system's
    /// temporary directory with an object store). Give it room for the
    /// largest upload twice over: the staged file and its canonical Parquet.
    #[arg(long)]
    staging_dir: Option<PathBuf>,
    /// Compiled modules (default: `<data-dir>/../runner-module-cache`, or
    /// `runner-module-cache` in the working directory with an object store).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The runner's certificate (PEM), naming its data center.
    #[arg(long)]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// The CA whose client certificates may call (the marketplace's).
    #[arg(long)]
    client_ca: PathBuf,
    /// Runs at once.
    #[arg(long, default_value_t = 8)]
    concurrent_runs: u32,
    /// Most linear memory a run may be given, in MiB.
    #[arg(long, default_value_t = 2048)]
    max_memory_mib: u64,
    /// Most wall time a run may be given, in seconds.
    #[arg(long, default_value_t = 3600)]
    max_wall_time_secs: u64,
    /// The name on the marketplace's client certificate: the only caller
    /// this runner answers.
    #[arg(long, default_value = civicgrid_runner::MARKETPLACE_NAME)]
    marketplace_name: String,
    /// Serve Prometheus metrics (`/metrics`) and `/healthz` here: for the
    /// platform's monitoring only, never where consumers reach it.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The marketplace's runner directory to report to (https://HOST:PORT);
    /// without it the runner only serves.
    #[arg(long, requires_all = ["directory_name", "directory_ca", "advertise"])]
    directory: Option<String>,
    /// The name on the directory's certificate.
    #[arg(long, requires = "directory")]
    directory_name: Option<String>,
    /// The CA that signed the directory's certificate (PEM).
    #[arg(long, requires = "directory")]
    directory_ca: Option<PathBuf>,
    /// Where the marketplace reaches this runner (https://HOST:PORT).
    #[arg(long, requires = "directory")]
    advertise: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = civicgrid_telemetry::init("civicgrid-runner", "info")?;
    let args = Args::parse();
    let memory_bytes = args
        .max_memory_mib
        .checked_mul(1 << 20)
        .filter(|bytes| *bytes > 0 && *bytes <= 4 << 30)
        .context("--max-memory-mib: 1 to 4096")?;
    if !(1..=86_400).contains(&args.max_wall_time_secs) {
        anyhow::bail!("--max-wall-time-secs: 1 to 86400");
    }
    // The port first: it is the pod's from the start, while the guest
    // compiles (a minute, on a cold module cache).
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // One signal ends both the heartbeats and the server: a runner that is
    // draining must not be advertised.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        civicgrid_telemetry::shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stopped| *stopped).await;
    };
    let wasm = std::fs::read(&args.sql_guest)
        .with_context(|| format!("reading the SQL guest {}", args.sql_guest.display()))?;
    let products = match (&args.data_dir, &args.object_store) {
        (Some(dir), _) => ProductStore::Directory(dir.clone()),
        (None, Some(address)) => ProductStore::s3(address, tokio::runtime::Handle::current())
            .context("--object-store")?,
        (None, None) => anyhow::bail!("--data-dir or --object-store is required"),
    };
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| match &args.data_dir {
            Some(dir) => dir.parent().unwrap_or(dir).join("runner-module-cache"),
            None => PathBuf::from("runner-module-cache"),
        });
    let mut config = SandboxConfig::new(&cache_dir);
    config.max_memory_bytes = memory_bytes;
    config.max_concurrent_runs = args.concurrent_runs;
    let (sandbox, sql_guest) = tokio::task::spawn_blocking(move || {
        let sandbox = Sandbox::new(&config)?;
        let guest = sandbox.load(&wasm, GuestRole::Sql)?;
        Ok::<_, civicgrid_sandbox::SandboxError>((sandbox, guest))
    })
    .await??;
    let mut service = RunnerService::new(
        Arc::new(sandbox),
        sql_guest,
        products.clone(),
        Ceilings {
            memory_bytes,
            wall_time: Duration::from_secs(args.max_wall_time_secs),
        },
    )
    .answering(args.marketplace_name.clone());
    if let Some(dir) = &args.staging_dir {
        service = service.staging_in(dir);
    }
    let service = Arc::new(service);
    if let Some(address) = args.metrics_listen {
        let bound = civicgrid_runner::metrics::spawn(address, Arc::clone(service.metrics()))
            .await
            .with_context(|| format!("binding --metrics-listen {address}"))?;
        tracing::info!(address = %bound, "metrics serving");
    }
    let tls = mutual_tls(
        std::fs::read(&args.tls_cert).context("reading --tls-cert")?,
        std::fs::read(&args.tls_key).context("reading --tls-key")?,
        std::fs::read(&args.client_ca).context("reading --client-ca")?,
    );
    if let (Some(directory), Some(name), Some(ca), Some(advertise)) = (
        args.directory.clone(),
        args.directory_name.clone(),
        &args.directory_ca,
        args.advertise.clone(),
    ) {
        let heartbeat = civicgrid_runner::Heartbeat {
            directory,
            directory_name: name,
            directory_ca: std::fs::read(ca).context("reading --directory-ca")?,
            identity: (
                std::fs::read(&args.tls_cert).context("reading --tls-cert")?,
                std::fs::read(&args.tls_key).context("reading --tls-key")?,
            ),
            status: civicgrid_runner::proto::RunnerStatus {
                data_center: args.data_center.clone(),
                endpoint: advertise,
                version: env!("CARGO_PKG_VERSION").into(),
                slots: args.concurrent_runs,
                busy_slots: 0,
            },
            metrics: Some(Arc::clone(service.metrics())),
            interval: Duration::from_secs(5),
        };
        let heartbeats_stopped = stopped.clone();
        tokio::spawn(async move {
            if let Err(error) = heartbeat.run(until_stopped(heartbeats_stopped)).await {
                tracing::error!(%error, "heartbeats stopped");
            }
        });
    }
    println!("listening on {}", listener.local_addr()?);
    tracing::info!(
        address = %listener.local_addr()?,
        data_center = %args.data_center,
        products = ?products,
        "runner serving"
    );
    let shutdown = until_stopped(stopped);
    serve(service, listener, tls, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line docs/runners.md shows is one this binary accepts.
    #[test]
    fn the_documented_command_line_parses() {
        let docs = include_str!("../../docs/runners.md");
        let start = docs
            .find("civicgrid-runner --")
            .expect("docs/runners.md shows a command line");
        let command: String = docs[start..]
            .lines()
            .take_while(|line| !line.starts_with("```"))
            .map(|line| line.trim_end_matches('\\'))
            .collect::<Vec<_>>()
            .join(" ");
        let args = Args::try_parse_from(command.split_whitespace()).expect("the documented flags");
        assert_eq!(args.data_center, "edge-1");
        assert_eq!(args.listen.port(), 7443);
    }
}
