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

// A decision frees what the one before it built (the engine's per-decision
// accounting, candidates and explanations): with glibc's allocator, the
// data-center sync that follows paid for consolidating those frees, 0.23 ms
// at p50 of a 0.65 ms decision at 1,000 data centers; with mimalloc, 0.03 ms
// (docs/benchmarks.md). The same allocator as the marketplace's binaries.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Name every data center not chosen, with its reason (otherwise
        /// counts per rule; explaining a large pool takes time and memory).
        #[arg(long)]
        explain: bool,
    },
    /// Run the controllers against the cluster of the current kubeconfig (or
    /// the in-cluster service account).
    Run {
        /// Seconds between probes of each member cluster (fractions allowed).
        #[arg(long, env = "CIVICGRID_HEARTBEAT_SECONDS", default_value = "10", value_parser = positive_seconds)]
        heartbeat_seconds: Duration,
        /// Connect and request timeout against a member cluster, in seconds.
        #[arg(long, env = "CIVICGRID_MEMBER_TIMEOUT_SECONDS", default_value = "5", value_parser = positive_seconds)]
        member_timeout_seconds: Duration,
        /// Seconds a member's client is used before its kubeconfig Secret is
        /// read again (at once after a failed probe). A Secret deleted or
        /// emptied takes the operator's access away within this time.
        #[arg(long, env = "CIVICGRID_MEMBER_SECRET_REREAD_SECONDS", default_value = "60", value_parser = positive_seconds)]
        member_secret_reread_seconds: Duration,
        /// Probes in a row a reachable member must miss before it is
        /// marked unreachable.
        #[arg(long, env = "CIVICGRID_MEMBER_FAILURE_THRESHOLD", default_value = "3", value_parser = clap::value_parser!(u32).range(1..))]
        member_failure_threshold: u32,
        /// Probes in a row an unreachable member must answer before it
        /// takes replicas again.
        #[arg(long, env = "CIVICGRID_MEMBER_SUCCESS_THRESHOLD", default_value = "2", value_parser = clap::value_parser!(u32).range(1..))]
        member_success_threshold: u32,
        /// Failover moves allowed per minute across all workloads (each
        /// workload's own `maxEvictionsPerMinute` applies too). Unlimited
        /// when not given.
        #[arg(long, env = "CIVICGRID_MAX_EVICTIONS_PER_MINUTE")]
        max_evictions_per_minute: Option<u32>,
        /// Let `spec.dependencies` name Secrets: the operator then reads
        /// and watches Secrets in every namespace.
        #[arg(long, env = "CIVICGRID_SECRET_DEPENDENCIES")]
        secret_dependencies: bool,
        /// Seconds after which a workload that is not yet fully available is
        /// looked at again although no member reported a change (members are
        /// watched; this is the safety net).
        #[arg(long, env = "CIVICGRID_READINESS_POLL_SECONDS", default_value = "30", value_parser = positive_seconds)]
        readiness_poll_seconds: Duration,
        /// The name this replica reports in Events and holds the Lease under.
        #[arg(long, env = "POD_NAME", default_value = "civicgrid-operator")]
        instance: String,
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
        /// Seconds a lease stays valid without renewal (at least 3). The
        /// leader renews every fifth of that and stops acting after two
        /// thirds of it without a renewal.
        #[arg(long, default_value = "15", value_parser = lease_seconds)]
        lease_duration_seconds: Duration,
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
            member_secret_reread_seconds,
            member_failure_threshold,
            member_success_threshold,
            max_evictions_per_minute,
            secret_dependencies,
            readiness_poll_seconds,
            instance,
            leader_election_namespace,
            leader_election_lease,
            lease_duration_seconds,
            metrics_address,
        } => {
            let mut config = civicgrid_operator::controller::Config {
                heartbeat: heartbeat_seconds,
                member_timeout: member_timeout_seconds,
                member_secret_reread: member_secret_reread_seconds,
                failure_threshold: member_failure_threshold,
                success_threshold: member_success_threshold,
                pool_evictions_per_minute: max_evictions_per_minute,
                secret_dependencies,
                readiness_poll: readiness_poll_seconds,
                instance,
                ..Default::default()
            };
            config.leader_election = leader_election_namespace.map(|namespace| {
                LeaseConfig::with_duration(
                    namespace,
                    leader_election_lease,
                    config.instance.clone(),
                    lease_duration_seconds,
                )
            });
            return run(config, metrics_address);
        }
        Command::Crds => civicgrid_operator::crds_yaml()?,
        Command::Plan {
            path,
            output,
            at_unix,
            explain,
        } => {
            let now = at_unix.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            });
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            plan::write(&path, output, now, explain, &mut out)
                .with_context(|| format!("planning {}", path.display()))?;
            return Ok(());
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
        match civicgrid_operator::controller::run(
            client,
            config,
            Box::pin(civicgrid_telemetry::shutdown_signal()),
        )
        .await
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

/// A duration given in seconds, fractions allowed: finite and above zero
/// (a zero heartbeat would probe members in a busy loop).
fn positive_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(format!("`{text}` must be more than 0 seconds"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` seconds is too long"))
}

/// A lease duration: a follower takes over this long after a leader dies,
/// and the leader renews every third of it, so under 3 s would renew
/// faster than the API server reliably answers on a busy machine.
fn lease_seconds(text: &str) -> Result<Duration, String> {
    let duration = positive_seconds(text)?;
    if duration < Duration::from_secs(3) {
        return Err(format!("`{text}` is shorter than the 3 s minimum"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_accept_fractions_and_refuse_what_is_not_a_positive_duration() {
        assert_eq!(positive_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(positive_seconds("10"), Ok(Duration::from_secs(10)));
        for bad in ["0", "-1", "NaN", "inf", "ten", ""] {
            let error = positive_seconds(bad).expect_err(bad);
            assert!(error.contains(&format!("`{bad}`")), "{bad}: {error}");
        }
        assert!(lease_seconds("2.5").unwrap_err().contains("3 s minimum"));
        assert_eq!(lease_seconds("3"), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn run_reports_the_flag_at_fault() {
        let error = Args::try_parse_from(["civicgrid-operator", "run", "--heartbeat-seconds", "0"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("--heartbeat-seconds"), "{error}");
        assert!(error.contains("more than 0 seconds"), "{error}");
    }
}
