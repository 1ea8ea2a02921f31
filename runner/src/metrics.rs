//! The runner's Prometheus metrics: runs by outcome, runs in flight
//! against the pool's slots, and the fuel, rows and bytes its runs read.
//! They count this data center's work; like the marketplace's, they are for
//! the platform's monitoring and must not be served where consumers reach
//! them (exact fuel and rows read of a run can tell what a policy withheld).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// The runner's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<Outcome, Counter>,
    in_flight: Gauge<i64, AtomicI64>,
    slots: Gauge<i64, AtomicI64>,
    fuel: Counter<u64, AtomicU64>,
    rows_read: Counter<u64, AtomicU64>,
    bytes_read: Counter<u64, AtomicU64>,
}

impl Metrics {
    /// Metrics of a runner with `slots` runs at once.
    #[must_use]
    pub fn new(slots: u32) -> Self {
        let mut registry = Registry::with_prefix("civicgrid_runner");
        let runs = Family::<Outcome, Counter>::default();
        registry.register(
            "runs",
            "Runs by outcome: ran, failed or refused",
            runs.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "runs_in_flight",
            "Runs in the sandbox or waiting for a slot",
            in_flight.clone(),
        );
        let pool = Gauge::<i64, AtomicI64>::default();
        pool.set(i64::from(slots));
        registry.register("slots", "Runs the sandbox takes at once", pool.clone());
        let fuel = Counter::<u64, AtomicU64>::default();
        registry.register("fuel", "Fuel burnt by runs", fuel.clone());
        let rows_read = Counter::<u64, AtomicU64>::default();
        registry.register(
            "rows_read",
            "Rows of product data read by runs",
            rows_read.clone(),
        );
        let bytes_read = Counter::<u64, AtomicU64>::default();
        registry.register(
            "bytes_read",
            "Bytes of product data read by runs",
            bytes_read.clone(),
        );
        Self {
            registry,
            runs,
            in_flight,
            slots: pool,
            fuel,
            rows_read,
            bytes_read,
        }
    }

    /// A run entered (its guard leaves on drop).
    pub(crate) fn entered(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(Arc::clone(self))
    }

    /// A run ended: `ran` (released), `failed` or `refused` (before it
    /// ran), with what it burnt and read.
    pub(crate) fn ended(&self, outcome: &'static str, fuel: u64, rows_read: u64, bytes_read: u64) {
        self.runs.get_or_create(&Outcome { outcome }).inc();
        self.fuel.inc_by(fuel);
        self.rows_read.inc_by(rows_read);
        self.bytes_read.inc_by(bytes_read);
    }

    /// The OpenMetrics exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        civicgrid_telemetry::metrics::encode(&self.registry)
    }

    /// Runs in flight now.
    #[must_use]
    pub fn in_flight(&self) -> u32 {
        u32::try_from(self.in_flight.get()).unwrap_or(0)
    }

    /// Runs the sandbox takes at once.
    #[must_use]
    pub fn slots(&self) -> i64 {
        self.slots.get()
    }
}

/// One run in flight, until dropped.
pub(crate) struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Serves `/metrics` and `/healthz` on `address`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn spawn(
    address: std::net::SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let router = civicgrid_telemetry::metrics::router(metrics, Metrics::encode);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}
