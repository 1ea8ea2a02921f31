//! The gRPC layer: one file per service, each handler a thin step from the
//! wire to the marketplace and back. Every call to these services passes
//! [`auth::AuthenticateLayer`] first; every error leaves as a status through
//! the one mapping below.

mod audit;
mod auth;
mod billing;
mod contracts;
mod convert;
mod identity;
mod queries;
mod registry;
pub mod runners;

pub use audit::AuditService;
pub use billing::BillingService;
pub use contracts::ContractsService;
pub use identity::IdentityService;
pub use queries::QueriesService;
pub use registry::RegistryService;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_stream_shim::TcpIncoming;
use tonic::{Code, Status};

use crate::error::{MarketError, Unanswered};
use crate::market::Marketplace;
use crate::proto;

/// Errors become gRPC statuses here and nowhere else. Internal causes are
/// logged in full and leave as an opaque `internal error`.
impl From<MarketError> for Status {
    fn from(error: MarketError) -> Self {
        match &error {
            MarketError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
            MarketError::NotFound { .. } => Status::not_found(error.to_string()),
            MarketError::AlreadyExists { .. } => Status::already_exists(error.to_string()),
            MarketError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
            MarketError::ResourceExhausted(_) => Status::resource_exhausted(error.to_string()),
            MarketError::Aborted(_) => Status::aborted(error.to_string()),
            MarketError::Unavailable(_) => Status::unavailable(error.to_string()),
            MarketError::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
            MarketError::PermissionDenied { .. } => Status::permission_denied(error.to_string()),
            // The message is already what the consumer may read, for
            // internal failures too (a stable code, never engine text).
            MarketError::Unanswered { kind, .. } => Status::new(
                match kind {
                    Unanswered::Invalid => Code::InvalidArgument,
                    Unanswered::Denied => Code::PermissionDenied,
                    Unanswered::Exhausted => Code::ResourceExhausted,
                    Unanswered::Internal => Code::Internal,
                    Unanswered::Busy => Code::Unavailable,
                },
                error.to_string(),
            ),
            MarketError::Database(_)
            | MarketError::Migration(_)
            | MarketError::Corrupt(_)
            | MarketError::Access(_)
            | MarketError::Io { .. } => {
                tracing::error!(error = ?error, "request failed");
                Status::internal("internal error")
            }
        }
    }
}

/// How long serving waits to follow the other servers' changes.
const FOLLOWING_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves every service, reflection and health on `listener` until `shutdown`
/// resolves.
///
/// # Errors
/// When the transport fails.
pub async fn serve(
    market: Arc<Marketplace>,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::result::Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::registry_server::RegistryServer<RegistryService>>()
        .await;
    health_reporter
        .set_serving::<proto::audit_server::AuditServer<AuditService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled descriptor sets are valid");
    // One span per call, named after the RPC, for logs and OTLP traces.
    let mut builder = tonic::transport::Server::builder().trace_fn(|request| {
        tracing::info_span!("grpc", otel.name = %request.uri().path(), rpc.system = "grpc")
    });
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    // Without TCP_NODELAY, small responses wait for the client's delayed ACK
    // (about 40 ms a call; measured by benches/benches/queries.rs).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // The lease and the other servers' notices, for as long as this serves;
    // what was loaded at open may be minutes old, so serving waits (a
    // while) until the server follows the others.
    let mut upkeep = market.start_upkeep();
    if !upkeep.following(FOLLOWING_WITHIN).await {
        tracing::warn!(
            "not yet following the other servers' changes; serving what was loaded at start"
        );
    }
    let metrics = Arc::clone(market.metrics());
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let served = builder
        .layer(auth::AuthenticateLayer::new(Arc::clone(&market)))
        .add_service(health)
        .add_service(reflection)
        .add_service(proto::identity_server::IdentityServer::new(
            IdentityService(market.clone()),
        ))
        .add_service(proto::registry_server::RegistryServer::new(
            RegistryService(market.clone()),
        ))
        .add_service(proto::contracts_server::ContractsServer::new(
            ContractsService(market.clone()),
        ))
        .add_service(proto::queries_server::QueriesServer::new(QueriesService(
            market.clone(),
        )))
        .add_service(proto::billing_server::BillingServer::new(BillingService(
            market.clone(),
        )))
        .add_service(proto::audit_server::AuditServer::new(AuditService(market)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    upkeep.stop().await;
    served
}

/// The address a listener is bound to, for logs.
#[must_use]
pub fn local_address(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

mod tokio_stream_shim {
    pub use tonic::transport::server::TcpIncoming;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query's outcome reaches its consumer with the status it has always
    /// had for its kind, and with its message as the consumer may read it
    /// (even an internal failure's, which is a stable code, not engine text).
    #[test]
    fn an_unanswered_query_keeps_its_status_and_its_words() {
        for (kind, code) in [
            (Unanswered::Invalid, Code::InvalidArgument),
            (Unanswered::Denied, Code::PermissionDenied),
            (Unanswered::Exhausted, Code::ResourceExhausted),
            (Unanswered::Internal, Code::Internal),
            (Unanswered::Busy, Code::Unavailable),
        ] {
            let status = Status::from(MarketError::Unanswered {
                query_id: "q-1".into(),
                kind,
                message: "the query failed while running (internal)".into(),
            });
            assert_eq!(status.code(), code, "{kind:?}");
            assert_eq!(
                status.message(),
                "query q-1: the query failed while running (internal)"
            );
            // Stored as the status's number, so rows written before the kind
            // existed read back the same.
            assert_eq!(kind.stored(), code as i64, "{kind:?}");
            assert_eq!(Unanswered::from_stored(kind.stored()), Some(kind));
        }
        assert_eq!(Unanswered::from_stored(0), None);
        assert_eq!(Unanswered::from_stored(2), Some(Unanswered::Internal));
        // Everything else internal still leaves as an opaque status.
        let database = Status::from(MarketError::Corrupt("row 7 of products".into()));
        assert_eq!(
            (database.code(), database.message()),
            (Code::Internal, "internal error")
        );
    }
}
