//! The `/metrics` and `/healthz` endpoints every CivicGrid binary serves,
//! over a Prometheus registry of its own.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// The media type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` in the OpenMetrics text format.
#[must_use]
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a metric that cannot be encoded
    // leaves an empty exposition rather than half of one.
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}

/// `/metrics` (what `exposition` returns at each scrape) and `/healthz`
/// (the process answers). Binaries add their own routes, such as readiness.
pub fn router<S>(source: Arc<S>, exposition: fn(&S) -> String) -> Router
where
    S: Send + Sync + 'static,
{
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let source = Arc::clone(&source);
                async move { ([("content-type", CONTENT_TYPE)], exposition(&source)) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn the_exposition_names_each_registered_metric() {
        let mut registry = Registry::with_prefix("civicgrid_test");
        let counter: Counter = Counter::default();
        registry.register("things", "Things counted", counter.clone());
        counter.inc_by(3);
        let text = encode(&registry);
        assert!(text.contains("civicgrid_test_things_total 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
