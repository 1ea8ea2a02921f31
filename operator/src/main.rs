//! `civicgrid-operator`: prints the CRDs, plans offline, and runs the
//! controllers.
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use civicgrid_operator::controller::Stopped;
use civicgrid_operator::controller::leader::LeaseConfig;
use civicgrid_operator::plan::{self, Format};
use clap::{Parser, Subcommand};

/// CivicGrid operator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (for kubectl apply).
    Crds,
    /// Place the workloads in manifests offline and explain every decision.
    Plan {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
        /// table, json or yaml.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
        /// Evaluate as of this Unix time (defaults to now); for reproducible plans.
        #[arg(long)]
        at_unix: Option<i64>,
    },
    /// Run the controllers against the cluster of the current kubeconfig (or
    /// the in-cluster service account).
    Run {
        /// Seconds between probes of each member cluster.
        #[arg(long, env = "CIVICGRID_HEARTBEAT_SECONDS", default_value_t = 10)]
        heartbeat_seconds: u64,
        /// Connect and request timeout against a member cluster, in seconds.
        #[arg(long, env = "CIVICGRID_MEMBER_TIMEOUT_SECONDS", default_value_t = 5)]
        member_timeout_seconds: u64,
        /// Act only while holding a Lease in this namespace (run several
        /// replicas; one acts). Off when not given.
        #[arg(long, env = "CIVICGRID_LEADER_ELECTION_NAMESPACE")]
        leader_election_namespace: Option<String>,
        /// Name of the Lease.
        #[arg(
            long,
            env = "CIVICGRID_LEADER_ELECTION_LEASE",
            default_value = "civicgrid-operator"
        )]
        leader_election_lease: String,
        /// Seconds a lease stays valid without renewal.
        #[arg(long, default_value_t = 15)]
        lease_duration_seconds: u64,
        /// Address of the /metrics, /healthz and /readyz endpoints.
        #[arg(
            long,
            env = "CIVICGRID_METRICS_ADDRESS",
            default_value = "0.0.0.0:8080"
        )]
        metrics_address: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = match args.command {
        Command::Run {
            heartbeat_seconds,
            member_timeout_seconds,
            leader_election_namespace,
            leader_election_lease,
            lease_duration_seconds,
            metrics_address,
        } => {
            let mut config = civicgrid_operator::controller::Config {
                heartbeat: Duration::from_secs(heartbeat_seconds.max(1)),
                member_timeout: Duration::from_secs(member_timeout_seconds.max(1)),
                ..Default::default()
            };
            let duration = Duration::from_secs(lease_duration_seconds.max(3));
            config.leader_election = leader_election_namespace.map(|namespace| LeaseConfig {
                namespace,
                name: leader_election_lease,
                identity: config.instance.clone(),
                duration,
                retry: duration / 3,
            });
            return run(config, metrics_address);
        }
        Command::Crds => civicgrid_operator::crds_yaml()?,
        Command::Plan {
            path,
            output,
            at_unix,
        } => {
            let now = at_unix.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            });
            plan::run(&path, output, now).with_context(|| format!("planning {}", path.display()))?
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn run(
    config: civicgrid_operator::controller::Config,
    metrics_address: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // The OTLP exporter's gRPC channel lives on this runtime.
    let _entered = runtime.enter();
    let _telemetry = civicgrid_telemetry::init("civicgrid-operator", "info,kube=warn")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(metrics_address)
            .await
            .with_context(|| format!("binding the metrics address {metrics_address}"))?;
        let router = civicgrid_operator::controller::metrics::router(config.metrics.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "metrics endpoint stopped");
            }
        });
        let client = kube::Client::try_default()
            .await
            .context("connecting to the control cluster")?;
        tracing::info!(?config, "starting the controllers");
        match civicgrid_operator::controller::run(client, config, Box::pin(shutdown_signal())).await
        {
            Stopped::Shutdown => {
                tracing::info!("stopped");
                Ok(())
            }
            // Exit so the pod restarts and contends again as a follower.
            Stopped::LostLease => anyhow::bail!("lost the leader lease"),
        }
    })
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
