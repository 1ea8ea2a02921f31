//! W3C trace context across a call between CivicGrid processes: the
//! caller's span as a `traceparent` value, and the callee's span joined to
//! it, so one query's trace runs from the marketplace into the runner that
//! ran it.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (gRPC metadata key) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The current span's trace context as a `traceparent` value; `None` when
/// no trace is being recorded (no OTLP exporter configured).
#[must_use]
pub fn current_traceparent() -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the trace `traceparent` names. A malformed value
/// leaves the span a root of its own: a caller's bad header must not stop
/// the work.
pub fn join(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn trace_id(traceparent: &str) -> &str {
        traceparent.split('-').nth(1).expect("a trace id")
    }

    /// A span joined to a caller's `traceparent` is in the caller's trace;
    /// without a recording subscriber there is nothing to send.
    #[test]
    fn a_joined_span_continues_the_callers_trace() {
        assert_eq!(current_traceparent(), None, "no trace is recorded");

        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("query");
            let sent = caller
                .in_scope(current_traceparent)
                .expect("a recorded span has a trace context");
            assert!(sent.starts_with("00-") && sent.len() == 55, "{sent}");

            let callee = tracing::info_span!("run");
            join(&callee, &sent);
            let received = callee.in_scope(current_traceparent).expect("a context");
            assert_eq!(trace_id(&received), trace_id(&sent));
            assert_ne!(received, sent, "the callee is a span of its own");

            let stranger = tracing::info_span!("run");
            join(&stranger, "not a traceparent");
            let own = stranger.in_scope(current_traceparent).expect("a context");
            assert_ne!(trace_id(&own), trace_id(&sent));
        });
    }
}
