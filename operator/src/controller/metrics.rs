//! The operator's Prometheus metrics and its health endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `workload` or `datacenter`.
    pub controller: &'static str,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `workload` or `datacenter`.
    pub controller: &'static str,
    /// The error's stable kind ([`super::Error::kind`]).
    pub kind: &'static str,
}

/// Labels naming a data center.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DataCenterLabel {
    /// Data center name.
    pub data_center: String,
}

/// Every metric the operator exports, registered once per process.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that failed, by error kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration.
    pub reconcile_seconds: Family<ControllerLabel, Histogram>,
    /// Time to place one workload (snapshot and engine).
    pub scheduling_seconds: Histogram,
    /// Time to apply one workload's copies into its members.
    pub propagation_seconds: Histogram,
    /// Replicas placed per data center.
    pub replicas: Family<DataCenterLabel, Gauge>,
    /// 1 while this replica holds the leader lease (or runs without one).
    pub leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let buckets = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let mut metrics = Self {
            registry: Registry::with_prefix("civicgrid_operator"),
            reconciles: Family::default(),
            errors: Family::default(),
            reconcile_seconds: Family::new_with_constructor(buckets),
            scheduling_seconds: buckets(),
            propagation_seconds: buckets(),
            replicas: Family::default(),
            leader: Gauge::default(),
            ready: AtomicBool::new(false),
        };
        let r = &mut metrics.registry;
        r.register(
            "reconciles",
            "Reconciles started",
            metrics.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciles failed, by error kind",
            metrics.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            metrics.reconcile_seconds.clone(),
        );
        r.register(
            "scheduling_duration_seconds",
            "Time to place one workload",
            metrics.scheduling_seconds.clone(),
        );
        r.register(
            "propagation_duration_seconds",
            "Time to apply one workload's copies into member clusters",
            metrics.propagation_seconds.clone(),
        );
        r.register(
            "replicas",
            "Replicas placed per data center",
            metrics.replicas.clone(),
        );
        r.register(
            "leader",
            "1 while this replica acts",
            metrics.leader.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile(&self, controller: &'static str) -> Timer<'_> {
        let labels = ControllerLabel { controller };
        self.reconciles.get_or_create(&labels).inc();
        Timer {
            histogram: self.reconcile_seconds.get_or_create(&labels).clone(),
            started: Instant::now(),
            _metrics: std::marker::PhantomData,
        }
    }

    /// Marks the process ready to serve (`/readyz` answers 200).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        civicgrid_telemetry::metrics::encode(&self.registry)
    }
}

/// Observes elapsed time into a histogram when dropped.
pub struct Timer<'a> {
    histogram: Histogram,
    started: Instant,
    _metrics: std::marker::PhantomData<&'a Metrics>,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (the
/// controllers run, or wait as a follower).
pub fn router(metrics: Arc<Metrics>) -> Router {
    civicgrid_telemetry::metrics::router(Arc::clone(&metrics), Metrics::encode).route(
        "/readyz",
        get(move || {
            let ready = metrics.ready.load(Ordering::Relaxed);
            async move {
                if ready {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }
        }),
    )
}

/// The values are what `/metrics` is for; in a log line (the operator logs
/// its configuration at start) the registry's dump was a screenful of empty
/// histogram buckets.
impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("leader", &self.leader.get())
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_names_the_metrics_without_dumping_the_registry() {
        let metrics = Metrics::default();
        metrics.leader.set(1);
        let printed = format!("{metrics:?}");
        assert_eq!(printed, "Metrics { leader: 1, ready: false, .. }");
    }

    #[test]
    fn reconciles_and_their_duration_are_exported_with_their_labels() {
        let metrics = Metrics::default();
        drop(metrics.reconcile("workload"));
        metrics
            .errors
            .get_or_create(&ErrorLabels {
                controller: "workload",
                kind: "member_api",
            })
            .inc();
        metrics
            .replicas
            .get_or_create(&DataCenterLabel {
                data_center: "edge-east".into(),
            })
            .set(3);
        let text = metrics.encode();
        assert!(
            text.contains(r#"civicgrid_operator_reconciles_total{controller="workload"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"civicgrid_operator_reconcile_errors_total{controller="workload",kind="member_api"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"civicgrid_operator_reconcile_duration_seconds_count{controller="workload"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"civicgrid_operator_replicas{data_center="edge-east"} 3"#),
            "{text}"
        );
    }
}
