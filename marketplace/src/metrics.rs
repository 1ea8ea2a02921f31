//! The marketplace's Prometheus metrics: queries by outcome, compute units,
//! latency per stage of the query path, and money charged.

use std::time::Duration;

use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A query's outcome: completed, rejected, failed or denied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: String,
}

/// A stage of the query path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// `authorize` (role, contract, quota, funds, hold), `sandbox` (run and
    /// policy; of it `sandbox_start`, instantiation, and `query`, the rest),
    /// `settle` (usage, ledger, audit; of it `ledger`, the charge's
    /// statements made ready, `audit`, the log's head read and the entry
    /// hashed, and `writes`, all the settlement's writes sent together) or
    /// `total`.
    pub stage: &'static str,
}

/// A witness, by its name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WitnessLabel {
    /// The witness's key name.
    pub witness: String,
}

/// A consumer organization.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    /// The organization's id.
    pub consumer: String,
}

/// A currency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CurrencyLabel {
    /// ISO 4217 code.
    pub currency: String,
}

/// Every metric the marketplace exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Queries by outcome.
    pub queries: Family<OutcomeLabel, Counter>,
    /// Compute units of completed queries.
    pub compute_units: Counter,
    /// Seconds per stage of the query path.
    pub stage_seconds: Family<StageLabel, Histogram>,
    /// Minor units charged, by currency.
    pub charged_minor: Family<CurrencyLabel, Counter>,
    /// Refused or failed queries, by consumer organization: a consumer
    /// probing the output policy shows here first.
    pub unanswered: Family<ConsumerLabel, Counter>,
    /// Whether the server serves, following the other servers' changes
    /// (`/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
    /// Rounds in which a witness did not cosign, by witness.
    pub witness_failures: Family<WitnessLabel, Counter>,
    /// The largest tree every witness cosigned (0 before the first).
    pub audit_cosigned_tree_size: prometheus_client::metrics::gauge::Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("civicgrid_marketplace"),
            queries: Family::default(),
            compute_units: Counter::default(),
            stage_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_25, 2.0, 18))
            }),
            charged_minor: Family::default(),
            unanswered: Family::default(),
            ready: std::sync::atomic::AtomicBool::new(false),
            witness_failures: Family::default(),
            audit_cosigned_tree_size: prometheus_client::metrics::gauge::Gauge::default(),
        };
        let r = &mut metrics.registry;
        r.register(
            "queries",
            "Queries by outcome (completed, rejected, failed, denied)",
            metrics.queries.clone(),
        );
        r.register(
            "compute_units",
            "Compute units of completed queries",
            metrics.compute_units.clone(),
        );
        r.register(
            "query_stage_seconds",
            "Seconds per stage of the query path",
            metrics.stage_seconds.clone(),
        );
        r.register(
            "charged_minor",
            "Money charged for queries, in minor units",
            metrics.charged_minor.clone(),
        );
        r.register(
            "unanswered_queries",
            "Refused or failed queries, by consumer organization",
            metrics.unanswered.clone(),
        );
        r.register(
            "audit_witness_failures",
            "Rounds in which a witness did not cosign the log's checkpoint",
            metrics.witness_failures.clone(),
        );
        r.register(
            "audit_cosigned_tree_size",
            "The largest audit tree every witness cosigned",
            metrics.audit_cosigned_tree_size.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// Counts a query's outcome.
    pub fn outcome(&self, outcome: &str) {
        self.queries
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Records a stage's duration.
    pub fn stage(&self, stage: &'static str, elapsed: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel { stage })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a consumer's refused or failed query.
    pub fn unanswered(&self, consumer: &str) {
        self.unanswered
            .get_or_create(&ConsumerLabel {
                consumer: consumer.to_owned(),
            })
            .inc();
    }

    /// Records a charge.
    pub fn charged(&self, currency: &str, minor: i64, compute_units: i64) {
        self.charged_minor
            .get_or_create(&CurrencyLabel {
                currency: currency.to_owned(),
            })
            .inc_by(u64::try_from(minor).unwrap_or(0));
        self.compute_units
            .inc_by(u64::try_from(compute_units).unwrap_or(0));
    }

    /// The OpenMetrics text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        civicgrid_telemetry::metrics::encode(&self.registry)
    }
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (it serves,
/// following the other servers' changes) over HTTP.
pub fn router(metrics: std::sync::Arc<Metrics>) -> Router {
    let readiness = std::sync::Arc::clone(&metrics);
    civicgrid_telemetry::metrics::router(metrics, Metrics::encode).route(
        "/readyz",
        axum::routing::get(move || {
            let ready = readiness.ready.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                if ready {
                    (axum::http::StatusCode::OK, "ready")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }
        }),
    )
}

/// Serves [`router`] on `address` in the background; returns the bound address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn spawn(
    address: std::net::SocketAddr,
    metrics: std::sync::Arc<Metrics>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(metrics)).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn status_of(address: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        Ok(reply.lines().next().unwrap_or_default().to_owned())
    }

    /// `/healthz` answers while the process runs; `/readyz` only while the
    /// server serves, so a load balancer sends nothing to one still
    /// starting or stopping.
    #[tokio::test]
    async fn readiness_follows_serving_and_health_the_process() -> std::io::Result<()> {
        let metrics = std::sync::Arc::new(Metrics::default());
        let address = spawn("127.0.0.1:0".parse().expect("an address"), metrics.clone()).await?;
        assert_eq!(status_of(address, "/healthz").await?, "HTTP/1.1 200 OK");
        assert_eq!(
            status_of(address, "/readyz").await?,
            "HTTP/1.1 503 Service Unavailable"
        );
        metrics
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status_of(address, "/readyz").await?, "HTTP/1.1 200 OK");
        Ok(())
    }
}
