//! Authentication, once for every call: a tower layer in front of the
//! marketplace's services turns the bearer token into a [`Principal`] the
//! handlers read from the request; a call without a valid token never
//! reaches a handler.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;

use crate::error::MarketError;
use crate::identity::Principal;
use crate::market::Marketplace;

/// The gRPC package whose calls need a token. Health checks and reflection
/// (other packages) stay open, as load balancers and tools expect.
const AUTHENTICATED_PREFIX: &str = "/civicgrid.marketplace.v1.";

/// Authenticates every call to the marketplace's services.
#[derive(Debug, Clone)]
pub(crate) struct AuthenticateLayer {
    market: Arc<Marketplace>,
}

impl AuthenticateLayer {
    pub(crate) fn new(market: Arc<Marketplace>) -> Self {
        Self { market }
    }
}

impl<S> tower::Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            market: Arc::clone(&self.market),
        }
    }
}

/// The service [`AuthenticateLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub(crate) struct Authenticate<S> {
    inner: S,
    market: Arc<Marketplace>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Call the service that was driven to readiness; keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let market = Arc::clone(&self.market);
        Box::pin(async move {
            if request.uri().path().starts_with(AUTHENTICATED_PREFIX) {
                let secret = bearer_secret(request.headers().get(http::header::AUTHORIZATION));
                let principal = match secret {
                    Ok(secret) => market.authenticate(secret).await,
                    Err(error) => Err(error),
                };
                match principal {
                    Ok(principal) => {
                        request.extensions_mut().insert(principal);
                    }
                    Err(error) => return Ok(Status::from(error).into_http()),
                }
            }
            inner.call(request).await
        })
    }
}

/// The secret of an `authorization: Bearer <token>` header (visible ASCII).
fn bearer_secret(header: Option<&http::HeaderValue>) -> Result<&str, MarketError> {
    let header = header.ok_or_else(|| {
        MarketError::Unauthenticated("send `authorization: Bearer <token>`".into())
    })?;
    header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| {
            MarketError::Unauthenticated("the authorization header must be `Bearer <token>`".into())
        })
}

/// The caller, as [`AuthenticateLayer`] found it.
///
/// # Errors
/// `Unauthenticated` when the call did not pass through the layer, so a
/// service served without it refuses every call rather than serving anyone.
pub(crate) fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, MarketError> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| MarketError::Unauthenticated("send `authorization: Bearer <token>`".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler reached without the layer (a service wired up without it)
    /// refuses rather than serving an anonymous caller.
    #[test]
    fn a_call_that_skipped_the_layer_has_no_principal() {
        let request = tonic::Request::new(());
        let error = principal(&request).unwrap_err();
        assert!(
            matches!(error, MarketError::Unauthenticated(_)),
            "{error:?}"
        );
        assert_eq!(Status::from(error).code(), tonic::Code::Unauthenticated);
    }
}
