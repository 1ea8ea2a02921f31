//! The gRPC services over the registry, contracts, identity and audit log,
//! with authentication on every call, casbin authorization, reflection and the
//! standard health service.

use std::net::SocketAddr;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tokio_stream_shim::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::access::{self, Access};
use crate::audit::checkpoint::{Checkpoint as CheckpointBody, NoteSigner};
use crate::audit::log::{self, Event};
use crate::billing;
use crate::contracts::{self, Check, ContractIndex, Decision};
use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind, Principal, TokenSecret};
use crate::proto;
use crate::queries::{self, QueryEngine, UsageView};
use crate::registry::{self, Step};
use crate::store::Store;

use crate::audit::MAX_ENTRIES_PER_CALL;

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

/// The marketplace's state shared by every service.
#[derive(Debug)]
pub struct Marketplace {
    store: Store,
    access: Access,
    contracts: ContractIndex,
    signer: NoteSigner,
    origin: String,
    data_dir: std::path::PathBuf,
    engine: std::sync::OnceLock<Arc<QueryEngine>>,
    metrics: Arc<crate::metrics::Metrics>,
}

fn kind_from_proto(kind: proto::OrganizationKind) -> Result<OrganizationKind> {
    Ok(match kind {
        proto::OrganizationKind::Provider => OrganizationKind::Provider,
        proto::OrganizationKind::Consumer => OrganizationKind::Consumer,
        proto::OrganizationKind::Platform => OrganizationKind::Platform,
        proto::OrganizationKind::Regulator => OrganizationKind::Regulator,
        proto::OrganizationKind::Unspecified => {
            return Err(MarketError::invalid(
                "kind",
                "set provider, consumer, platform or regulator",
            ));
        }
    })
}

fn kind_to_proto(kind: OrganizationKind) -> proto::OrganizationKind {
    match kind {
        OrganizationKind::Provider => proto::OrganizationKind::Provider,
        OrganizationKind::Consumer => proto::OrganizationKind::Consumer,
        OrganizationKind::Platform => proto::OrganizationKind::Platform,
        OrganizationKind::Regulator => proto::OrganizationKind::Regulator,
    }
}

fn organization_to_proto(organization: &identity::Organization) -> proto::Organization {
    proto::Organization {
        id: organization.id.clone(),
        display_name: organization.display_name.clone(),
        kind: kind_to_proto(organization.kind) as i32,
        created_at_unix_ms: organization.created_at,
    }
}

fn user_to_proto(user: &identity::User) -> proto::User {
    proto::User {
        id: user.id.clone(),
        organization_id: user.organization_id.clone(),
        name: user.name.clone(),
        created_at_unix_ms: user.created_at,
    }
}

impl Marketplace {
    /// Opens the marketplace over a migrated store, loading casbin's rules and
    /// the contract index.
    ///
    /// # Errors
    /// Database failures.
    pub async fn open(
        store: Store,
        signing_key: SigningKey,
        origin: &str,
        data_dir: std::path::PathBuf,
    ) -> Result<Arc<Self>> {
        if origin.is_empty() || origin.contains(char::is_whitespace) || origin.contains('+') {
            return Err(MarketError::invalid(
                "log-origin",
                "a non-empty name without spaces or '+'",
            ));
        }
        let mut transaction = store.begin().await?;
        let access = Access::load(&mut transaction).await?;
        let contracts = ContractIndex::load(&mut transaction).await?;
        transaction.commit().await?;
        Ok(Arc::new(Self {
            store,
            access,
            contracts,
            signer: NoteSigner::new(origin, signing_key),
            origin: origin.to_owned(),
            data_dir,
            engine: std::sync::OnceLock::new(),
            metrics: Arc::default(),
        }))
    }

    /// The log's origin line.
    #[must_use]
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The verifier key regulators are given.
    #[must_use]
    pub fn verifier_key(&self) -> String {
        self.signer.verifier().to_string()
    }

    /// Creates the platform organization, its first admin and a token for it,
    /// once. The token's secret is returned to show once.
    ///
    /// # Errors
    /// `FailedPrecondition` when the marketplace was initialised already.
    pub async fn bootstrap(
        &self,
        organization: &str,
        admin_name: &str,
    ) -> Result<identity::IssuedToken> {
        let mut transaction = self.store.begin().await?;
        let existing: Vec<identity::Organization> = identity::list_organizations(&mut transaction)
            .await?
            .into_iter()
            .filter(|o| o.kind == OrganizationKind::Platform)
            .collect();
        if !existing.is_empty() {
            return Err(MarketError::FailedPrecondition(format!(
                "the marketplace is initialised already (platform organization {})",
                existing[0].id
            )));
        }
        identity::create_organization(
            &mut transaction,
            organization,
            "Platform operator",
            OrganizationKind::Platform,
        )
        .await?;
        let user = identity::create_user(&mut transaction, organization, admin_name).await?;
        Access::store_binding(&mut transaction, &user.id, "platform-admin", "*", true).await?;
        let token = identity::issue_token(
            &mut transaction,
            &user.id,
            identity::MAX_TOKEN_TTL_SECONDS,
            "bootstrap",
        )
        .await?;
        log::append(
            &mut transaction,
            self.store.backend(),
            &[Event {
                kind: "policy.bootstrap".into(),
                actor: "system".into(),
                tenant: "*".into(),
                subject: user.id.clone(),
                details: serde_json::json!({"organization": organization, "user": admin_name, "role": "platform-admin"}),
            }],
        )
        .await?;
        transaction.commit().await?;
        self.access
            .apply_binding(&user.id, "platform-admin", "*", true)
            .await?;
        Ok(token)
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            MarketError::Unauthenticated("send `authorization: Bearer <token>`".into())
        })?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                MarketError::Unauthenticated(
                    "the authorization header must be `Bearer <token>`".into(),
                )
            })?;
        let mut connection = self.store.reader().acquire().await?;
        identity::authenticate(&mut connection, &TokenSecret::new(secret.to_owned())).await
    }

    async fn require(&self, principal: &Principal, tenant: &str, permission: &str) -> Result<()> {
        self.access
            .require(&principal.user.id, tenant, permission)
            .await
    }

    /// Writes an audit entry on its own (for decisions that change nothing else).
    async fn audit(&self, event: Event) -> Result<u64> {
        log::append_alone(&self.store, event).await
    }

    /// Gives the marketplace a sandbox to run queries in (once).
    ///
    /// # Errors
    /// `FailedPrecondition` when one is attached already.
    pub fn attach_engine(&self, engine: QueryEngine) -> Result<()> {
        self.engine.set(Arc::new(engine)).map_err(|_| {
            MarketError::FailedPrecondition("a query engine is attached already".into())
        })
    }

    fn engine(&self) -> Result<&Arc<QueryEngine>> {
        self.engine.get().ok_or_else(|| {
            MarketError::Unavailable(
                "this server runs no query sandbox: start it with --sql-guest \
                 (built by `bash sandbox/build-guests.sh`)"
                    .into(),
            )
        })
    }

    /// Where relative storage locations resolve.
    #[must_use]
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The Prometheus metrics.
    #[must_use]
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The database.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Requires `permission` of `principal` in `tenant` (casbin).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission.
    pub async fn require_permission(
        &self,
        principal: &Principal,
        tenant: &str,
        permission: &str,
    ) -> Result<()> {
        self.require(principal, tenant, permission).await
    }

    /// Whether `principal` holds `permission` across every tenant (the
    /// platform-admin and regulator roles, bound in `*`).
    async fn cross_tenant(&self, principal: &Principal, permission: &str) -> Result<bool> {
        self.access
            .allows(&principal.user.id, "platform:cross-tenant", permission)
            .await
    }

    /// The contract index (for benchmarks and tests).
    #[must_use]
    pub fn contract_index(&self) -> &ContractIndex {
        &self.contracts
    }

    /// casbin (for benchmarks and tests).
    #[must_use]
    pub fn access(&self) -> &Access {
        &self.access
    }
}

impl queries::Market for Marketplace {
    fn require_permission<'a>(
        &'a self,
        principal: &'a Principal,
        domain: &'a str,
        permission: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(self.require(principal, domain, permission))
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    fn contract_index(&self) -> &ContractIndex {
        &self.contracts
    }

    fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }
}

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService(pub Arc<Marketplace>);
/// The Registry service.
#[derive(Debug, Clone)]
pub struct RegistryService(pub Arc<Marketplace>);
/// The Contracts service.
#[derive(Debug, Clone)]
pub struct ContractsService(pub Arc<Marketplace>);
/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditService(pub Arc<Marketplace>);

#[tonic::async_trait]
impl proto::identity_server::Identity for IdentityService {
    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::Principal>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let roles = self
            .0
            .access
            .roles_of(&principal.user.id)
            .await
            .into_iter()
            .map(|(role, domain)| format!("{role}@{domain}"))
            .collect();
        Ok(Response::new(proto::Principal {
            user: Some(user_to_proto(&principal.user)),
            organization: Some(organization_to_proto(&principal.organization)),
            roles,
        }))
    }

    async fn create_organization(
        &self,
        request: Request<proto::CreateOrganizationRequest>,
    ) -> Result<Response<proto::Organization>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        self.0
            .require(&principal, &request.id, "organization:create")
            .await?;
        let kind = kind_from_proto(request.kind())?;
        let mut transaction = self.0.store.begin().await.map_err(Status::from)?;
        let organization = identity::create_organization(
            &mut transaction,
            &request.id,
            &request.display_name,
            kind,
        )
        .await?;
        log::append(
            &mut transaction,
            self.0.store.backend(),
            &[Event {
                kind: "tenant.organization_created".into(),
                actor: principal.user.id.clone(),
                tenant: organization.id.clone(),
                subject: organization.id.clone(),
                details: serde_json::json!({"kind": kind.as_str(), "display_name": organization.display_name}),
            }],
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(organization_to_proto(&organization)))
    }

    async fn list_organizations(
        &self,
        request: Request<proto::ListOrganizationsRequest>,
    ) -> Result<Response<proto::ListOrganizationsResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0.require(&principal, "*", "organization:list").await?;
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let organizations = identity::list_organizations(&mut connection).await?;
        Ok(Response::new(proto::ListOrganizationsResponse {
            organizations: organizations.iter().map(organization_to_proto).collect(),
        }))
    }

    async fn create_user(
        &self,
        request: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        identity::validate_slug("organization_id", &request.organization_id)?;
        self.0
            .require(&principal, &request.organization_id, "user:create")
            .await?;
        let mut transaction = self.0.store.begin().await?;
        let user = identity::create_user(&mut transaction, &request.organization_id, &request.name)
            .await?;
        log::append(
            &mut transaction,
            self.0.store.backend(),
            &[Event {
                kind: "tenant.user_created".into(),
                actor: principal.user.id.clone(),
                tenant: user.organization_id.clone(),
                subject: user.id.clone(),
                details: serde_json::json!({"name": user.name}),
            }],
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(user_to_proto(&user)))
    }

    async fn issue_token(
        &self,
        request: Request<proto::IssueTokenRequest>,
    ) -> Result<Response<proto::IssuedToken>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        identity::validate_token_request(request.ttl_seconds, &request.description)?;
        let mut transaction = self.0.store.begin().await?;
        let user = identity::find_user(&mut transaction, &request.user_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "user",
                id: request.user_id.clone(),
            })?;
        // Users issue their own tokens; issuing for others is an admin's.
        if user.id != principal.user.id {
            self.0
                .require(&principal, &user.organization_id, "token:issue")
                .await?;
        }
        let token = identity::issue_token(
            &mut transaction,
            &user.id,
            request.ttl_seconds,
            &request.description,
        )
        .await?;
        log::append(
            &mut transaction,
            self.0.store.backend(),
            &[Event {
                kind: "tenant.token_issued".into(),
                actor: principal.user.id.clone(),
                tenant: user.organization_id.clone(),
                subject: token.id.clone(),
                details: serde_json::json!({"user": user.id, "expires_at_unix_ms": token.expires_at}),
            }],
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(proto::IssuedToken {
            token_id: token.id,
            secret: token.secret.expose().to_owned(),
            expires_at_unix_ms: token.expires_at,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let owner = identity::token_owner(&mut transaction, &request.token_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "token",
                id: request.token_id.clone(),
            })?;
        let owner = identity::find_user(&mut transaction, &owner)
            .await?
            .ok_or_else(|| MarketError::Corrupt("token without user".into()))?;
        if owner.id != principal.user.id {
            self.0
                .require(&principal, &owner.organization_id, "token:revoke")
                .await?;
        }
        identity::revoke_token(&mut transaction, &request.token_id).await?;
        log::append(
            &mut transaction,
            self.0.store.backend(),
            &[Event {
                kind: "tenant.token_revoked".into(),
                actor: principal.user.id.clone(),
                tenant: owner.organization_id.clone(),
                subject: request.token_id.clone(),
                details: serde_json::json!({"user": owner.id}),
            }],
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(proto::RevokeTokenResponse {}))
    }

    async fn grant_role(
        &self,
        request: Request<proto::RoleBindingRequest>,
    ) -> Result<Response<proto::RoleBinding>, Status> {
        self.bind(request, true).await
    }

    async fn revoke_role(
        &self,
        request: Request<proto::RoleBindingRequest>,
    ) -> Result<Response<proto::RoleBinding>, Status> {
        self.bind(request, false).await
    }
}

impl IdentityService {
    async fn bind(
        &self,
        request: Request<proto::RoleBindingRequest>,
        bound: bool,
    ) -> Result<Response<proto::RoleBinding>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let (role_kind, cross_tenant) = access::role("role", &request.role)?;
        let mut transaction = self.0.store.begin().await?;
        let user = identity::find_user(&mut transaction, &request.user_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "user",
                id: request.user_id.clone(),
            })?;
        let organization = identity::find_organization(&mut transaction, &user.organization_id)
            .await?
            .ok_or_else(|| MarketError::Corrupt("user without organization".into()))?;
        if organization.kind != role_kind {
            return Err(MarketError::invalid(
                "role",
                format!(
                    "{} is for users of {} organizations; {} is a {} organization",
                    request.role,
                    role_kind.as_str(),
                    organization.id,
                    organization.kind.as_str()
                ),
            )
            .into());
        }
        // Cross-tenant roles are granted by platform admins only (their binding
        // is in domain "*"); tenant roles by an admin of that tenant.
        let domain = if cross_tenant {
            "*".to_owned()
        } else {
            organization.id.clone()
        };
        let permission_tenant = if cross_tenant {
            "platform:cross-tenant"
        } else {
            organization.id.as_str()
        };
        self.0
            .require(&principal, permission_tenant, "role:grant")
            .await?;
        let changed =
            Access::store_binding(&mut transaction, &user.id, &request.role, &domain, bound)
                .await?;
        if changed {
            log::append(
                &mut transaction,
                self.0.store.backend(),
                &[Event {
                    kind: if bound {
                        "policy.role_granted"
                    } else {
                        "policy.role_revoked"
                    }
                    .into(),
                    actor: principal.user.id.clone(),
                    tenant: organization.id.clone(),
                    subject: user.id.clone(),
                    details: serde_json::json!({"role": request.role, "domain": domain}),
                }],
            )
            .await?;
        }
        transaction.commit().await.map_err(MarketError::from)?;
        if changed {
            self.0
                .access
                .apply_binding(&user.id, &request.role, &domain, bound)
                .await?;
        }
        Ok(Response::new(proto::RoleBinding {
            user_id: user.id,
            role: request.role,
            domain,
        }))
    }
}

#[tonic::async_trait]
impl proto::registry_server::Registry for RegistryService {
    async fn create_product(
        &self,
        request: Request<proto::CreateProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let provider = principal.organization.id.clone();
        self.0
            .require(&principal, &provider, "product:create")
            .await?;
        let spec = request
            .spec
            .ok_or_else(|| MarketError::invalid("spec", "is required"))?;
        let mut transaction = self.0.store.begin().await?;
        let product = registry::create(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &provider,
            &request.id,
            spec,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn submit_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Submit, "product:submit").await
    }

    async fn start_public_notice(
        &self,
        request: Request<proto::StartPublicNoticeRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let (metadata, extensions, inner) = request.into_parts();
        let action = Request::from_parts(
            metadata,
            extensions,
            proto::ProductAction {
                product_id: inner.product_id,
                reason: String::new(),
            },
        );
        self.step(
            action,
            Step::StartPublicNotice {
                days: inner.notice_days,
            },
            "product:review",
        )
        .await
    }

    async fn approve_registration(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Approve, "product:review").await
    }

    async fn reject_registration(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Reject, "product:review").await
    }

    async fn publish_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        // Only a platform admin lifts a suspension; checked inside `step`.
        self.step(request, Step::Publish, "product:publish").await
    }

    async fn suspend_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Suspend, "product:suspend").await
    }

    async fn retire_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Retire, "product:retire").await
    }

    async fn revise_product(
        &self,
        request: Request<proto::ReviseProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| MarketError::invalid("spec", "is required"))?;
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:revise",
            )
            .await?;
        let product = registry::revise(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            spec,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn approve_revision(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.decide_revision(request, true).await
    }

    async fn reject_revision(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.decide_revision(request, false).await
    }

    async fn transfer_product(
        &self,
        request: Request<proto::TransferProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:transfer",
            )
            .await?;
        let target = identity::find_organization(&mut transaction, &request.to_organization_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: request.to_organization_id.clone(),
            })?;
        if target.kind != OrganizationKind::Provider {
            return Err(MarketError::invalid(
                "to_organization_id",
                format!("{} is not a provider organization", target.id),
            )
            .into());
        }
        let product = registry::transfer(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            &target.id,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn get_product(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let mut product = registry::get(&mut connection, &request.product_id).await?;
        // Published products are public to every signed-in user; others, and
        // a revision under review, only to their provider, platform admins
        // and regulators.
        let readable = self
            .0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:read",
            )
            .await
            .is_ok();
        if !readable {
            if product.state() != proto::ProductState::Published {
                return Err(MarketError::NotFound {
                    what: "product",
                    id: request.product_id.clone(),
                }
                .into());
            }
            product.pending_revision = None;
        }
        Ok(Response::new(product))
    }

    async fn list_registration_events(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::ListRegistrationEventsResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let product = registry::get(&mut connection, &request.product_id).await?;
        if product.state() != proto::ProductState::Published {
            self.0
                .require(
                    &principal,
                    &product.provider_organization_id,
                    "product:read",
                )
                .await
                .map_err(|_| MarketError::NotFound {
                    what: "product",
                    id: request.product_id.clone(),
                })?;
        }
        let events = registry::events(&mut connection, &request.product_id).await?;
        Ok(Response::new(proto::ListRegistrationEventsResponse {
            events,
        }))
    }

    async fn search_catalog(
        &self,
        request: Request<proto::SearchCatalogRequest>,
    ) -> Result<Response<proto::SearchCatalogResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, &principal.organization.id, "catalog:search")
            .await?;
        let request = request.into_inner();
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let products = registry::search(&mut connection, &request).await?;
        Ok(Response::new(proto::SearchCatalogResponse { products }))
    }

    async fn export_catalog(
        &self,
        request: Request<proto::ExportCatalogRequest>,
    ) -> Result<Response<proto::ExportCatalogResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, &principal.organization.id, "catalog:search")
            .await?;
        let request = request.into_inner();
        let base_uri = if request.base_uri.is_empty() {
            format!("https://{}", self.0.origin)
        } else if request.base_uri.starts_with("https://")
            || request.base_uri.starts_with("http://")
        {
            request.base_uri
        } else {
            return Err(MarketError::invalid("base_uri", "an http:// or https:// URI").into());
        };
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let products =
            registry::search(&mut connection, &proto::SearchCatalogRequest::default()).await?;
        let organizations = identity::list_organizations(&mut connection).await?;
        let platform = organizations
            .iter()
            .find(|o| o.kind == OrganizationKind::Platform)
            .map_or_else(|| "CivicGrid".to_owned(), |o| o.display_name.clone());
        let names = organizations
            .into_iter()
            .map(|o| (o.id, o.display_name))
            .collect();
        let document = crate::dcat::catalog(&base_uri, &platform, &products, &names);
        Ok(Response::new(proto::ExportCatalogResponse {
            json_ld: serde_json::to_string_pretty(&document)
                .map_err(|e| MarketError::Corrupt(e.to_string()))?,
        }))
    }

    async fn post_demand(
        &self,
        request: Request<proto::PostDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let consumer = principal.organization.id.clone();
        self.0.require(&principal, &consumer, "demand:post").await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let demand = crate::demand::post(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &consumer,
            &request,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(demand))
    }

    async fn answer_demand(
        &self,
        request: Request<proto::AnswerDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let provider = principal.organization.id.clone();
        self.0
            .require(&principal, &provider, "demand:answer")
            .await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let demand = crate::demand::answer(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &provider,
            &request.demand_id,
            &request.product_id,
            &request.message,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(demand))
    }

    async fn close_demand(
        &self,
        request: Request<proto::CloseDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let demand = crate::demand::get(&mut transaction, &request.demand_id).await?;
        self.0
            .require(&principal, &demand.consumer_organization_id, "demand:close")
            .await?;
        let demand = crate::demand::close(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.demand_id,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(demand))
    }

    async fn list_demands(
        &self,
        request: Request<proto::ListDemandsRequest>,
    ) -> Result<Response<proto::ListDemandsResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, &principal.organization.id, "catalog:search")
            .await?;
        let request = request.into_inner();
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let demands = crate::demand::list(&mut connection, &request).await?;
        Ok(Response::new(proto::ListDemandsResponse { demands }))
    }
}

impl RegistryService {
    /// Approves (measuring the revision's data, as at submission) or
    /// rejects a product's pending revision.
    async fn decide_revision(
        &self,
        request: Request<proto::ProductAction>,
        approve: bool,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:review",
            )
            .await?;
        let quality = match (&product.pending_revision, approve) {
            (Some(revised), true) => {
                let revised = revised.clone();
                let dir =
                    crate::quality::resolve_location(&self.0.data_dir, &revised.storage_location)?;
                let measured = tokio::task::spawn_blocking(move || {
                    crate::quality::measure(&dir, &revised.tables, crate::store::now_ms())
                })
                .await
                .map_err(|error| {
                    MarketError::Corrupt(format!("quality measurement task: {error}"))
                })??;
                Some(measured)
            }
            _ => None,
        };
        if approve && quality.is_none() {
            return Err(MarketError::FailedPrecondition(format!(
                "product {} has no revision waiting for review",
                request.product_id
            ))
            .into());
        }
        let product = registry::decide_revision(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            quality,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn step(
        &self,
        request: Request<proto::ProductAction>,
        step: Step,
        permission: &str,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(&principal, &product.provider_organization_id, permission)
            .await?;
        if matches!(step, Step::Publish) && product.state() == proto::ProductState::Suspended {
            self.0
                .require(
                    &principal,
                    &product.provider_organization_id,
                    "product:suspend",
                )
                .await?;
        }
        if matches!(step, Step::Submit) && product.state() == proto::ProductState::Draft {
            // Registration records measured quality, read from the data itself.
            let spec = product.spec.clone().unwrap_or_default();
            let dir = crate::quality::resolve_location(&self.0.data_dir, &spec.storage_location)?;
            let measured = tokio::task::spawn_blocking(move || {
                crate::quality::measure(&dir, &spec.tables, crate::store::now_ms())
            })
            .await
            .map_err(|error| {
                MarketError::Corrupt(format!("quality measurement task: {error}"))
            })??;
            registry::set_quality(&mut transaction, &request.product_id, measured).await?;
        }
        let product = registry::step(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            step,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }
}

#[tonic::async_trait]
impl proto::contracts_server::Contracts for ContractsService {
    async fn request_contract(
        &self,
        request: Request<proto::RequestContractRequest>,
    ) -> Result<Response<proto::Contract>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let consumer = principal.organization.id.clone();
        self.0
            .require(&principal, &consumer, "contract:request")
            .await?;
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        let contract = contracts::request(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &consumer,
            &product,
            &request,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(contract))
    }

    async fn approve_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        self.decide(request, Decision::Approve).await
    }

    async fn reject_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        self.decide(request, Decision::Reject).await
    }

    async fn revoke_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        self.decide(request, Decision::Revoke).await
    }

    async fn get_contract(
        &self,
        request: Request<proto::ContractAction>,
    ) -> Result<Response<proto::Contract>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let contract = contracts::get(&mut connection, &request.contract_id).await?;
        let consumer_may = self
            .0
            .access
            .allows(
                &principal.user.id,
                &contract.consumer_organization_id,
                "contract:read",
            )
            .await?;
        let provider_may = self
            .0
            .access
            .allows(
                &principal.user.id,
                &contract.provider_organization_id,
                "contract:read",
            )
            .await?;
        if !consumer_may && !provider_may {
            return Err(MarketError::NotFound {
                what: "contract",
                id: request.contract_id,
            }
            .into());
        }
        Ok(Response::new(contract))
    }

    async fn list_contracts(
        &self,
        request: Request<proto::ListContractsRequest>,
    ) -> Result<Response<proto::ListContractsResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let own = principal.organization.id.clone();
        self.0.require(&principal, &own, "contract:read").await?;
        // Cross-tenant readers (platform admins, regulators) see every contract.
        let everything = self
            .0
            .access
            .allows(&principal.user.id, "platform:cross-tenant", "contract:read")
            .await?;
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let contracts = contracts::list(
            &mut connection,
            (!everything).then_some(own.as_str()),
            &request.product_id,
        )
        .await?;
        Ok(Response::new(proto::ListContractsResponse { contracts }))
    }

    async fn check_operation(
        &self,
        request: Request<proto::CheckOperationRequest>,
    ) -> Result<Response<proto::CheckOperationResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let consumer = principal.organization.id.clone();
        self.0
            .require(&principal, &consumer, "contract:check")
            .await?;
        if request.operation() == proto::OperationKind::Unspecified {
            return Err(MarketError::invalid(
                "operation",
                "set aggregate_sql, list_sql or algorithm",
            )
            .into());
        }
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let product = registry::get(&mut connection, &request.product_id).await?;
        drop(connection);
        let check = if product.state() == proto::ProductState::Published {
            self.0
                .contracts
                .check(&consumer, &request, crate::store::now_ms())
        } else {
            Check::Denied(format!(
                "product {} is {}",
                product.id,
                registry::state_name(product.state())
            ))
        };
        let (allowed, contract_id, reason) = match check {
            Check::Allowed { contract_id } => (true, contract_id, String::new()),
            Check::Denied(reason) => (false, String::new(), reason),
        };
        self.0
            .audit(Event {
                kind: if allowed {
                    "authorization.allowed"
                } else {
                    "authorization.denied"
                }
                .into(),
                actor: principal.user.id.clone(),
                tenant: consumer.clone(),
                subject: request.product_id.clone(),
                details: serde_json::json!({
                    "operation": request.operation().as_str_name(),
                    "columns": request.columns,
                    "algorithm_sha256": request.algorithm_sha256,
                    "contract": contract_id,
                    "reason": reason,
                }),
            })
            .await?;
        Ok(Response::new(proto::CheckOperationResponse {
            allowed,
            contract_id,
            reason,
        }))
    }
}

impl ContractsService {
    async fn decide(
        &self,
        request: Request<proto::ContractAction>,
        decision: Decision,
    ) -> Result<Response<proto::Contract>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let contract = contracts::get(&mut transaction, &request.contract_id).await?;
        match decision {
            Decision::Approve | Decision::Reject => {
                self.0
                    .require(
                        &principal,
                        &contract.provider_organization_id,
                        "contract:decide",
                    )
                    .await?;
            }
            Decision::Revoke => {
                let provider = self
                    .0
                    .access
                    .allows(
                        &principal.user.id,
                        &contract.provider_organization_id,
                        "contract:revoke",
                    )
                    .await?;
                if !provider {
                    self.0
                        .require(
                            &principal,
                            &contract.consumer_organization_id,
                            "contract:revoke",
                        )
                        .await?;
                }
            }
        }
        let contract = contracts::decide(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.contract_id,
            decision,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        self.0.contracts.update(&contract);
        Ok(Response::new(contract))
    }
}

#[tonic::async_trait]
impl proto::audit_server::Audit for AuditService {
    async fn get_checkpoint(
        &self,
        request: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<proto::Checkpoint>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let head = log::head(&mut connection, self.0.store.backend()).await?;
        let body = CheckpointBody {
            origin: self.0.origin.clone(),
            size: head.size(),
            root: head.root(),
        };
        Ok(Response::new(proto::Checkpoint {
            note: self.0.signer.sign(&body),
            tree_size: head.size() as i64,
            root_hash: body.root.to_vec(),
            origin: self.0.origin.clone(),
            verifier_key: self.0.verifier_key(),
        }))
    }

    async fn get_entries(
        &self,
        request: Request<proto::GetEntriesRequest>,
    ) -> Result<Response<proto::GetEntriesResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let request = request.into_inner();
        if request.start < 0 {
            return Err(MarketError::invalid("start", "must not be negative").into());
        }
        if request.end < request.start {
            return Err(MarketError::invalid("end", "must not be below start").into());
        }
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let entries = log::entries(
            &mut connection,
            request.start as u64,
            request.end as u64,
            &request.kind_prefix,
            &request.tenant,
            MAX_ENTRIES_PER_CALL,
        )
        .await?;
        Ok(Response::new(proto::GetEntriesResponse {
            entries: entries
                .into_iter()
                .map(|entry| proto::AuditEntry {
                    index: entry.index as i64,
                    body: entry.body,
                })
                .collect(),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<proto::GetInclusionProofRequest>,
    ) -> Result<Response<proto::InclusionProof>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let request = request.into_inner();
        if request.index < 0 || request.tree_size < 0 {
            return Err(
                MarketError::invalid("index", "index and tree_size must not be negative").into(),
            );
        }
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let (leaf, path) = log::inclusion_proof(
            &mut connection,
            self.0.store.backend(),
            request.index as u64,
            request.tree_size as u64,
        )
        .await?;
        Ok(Response::new(proto::InclusionProof {
            index: request.index,
            tree_size: request.tree_size,
            leaf_hash: leaf.to_vec(),
            path: path.iter().map(|hash| hash.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<proto::GetConsistencyProofRequest>,
    ) -> Result<Response<proto::ConsistencyProof>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, "platform:cross-tenant", "audit:read")
            .await?;
        let request = request.into_inner();
        if request.old_size < 0 || request.new_size < 0 {
            return Err(MarketError::invalid("old_size", "sizes must not be negative").into());
        }
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let path = log::consistency_proof(
            &mut connection,
            self.0.store.backend(),
            request.old_size as u64,
            request.new_size as u64,
        )
        .await?;
        Ok(Response::new(proto::ConsistencyProof {
            old_size: request.old_size,
            new_size: request.new_size,
            path: path.iter().map(|hash| hash.to_vec()).collect(),
        }))
    }
}

/// The Queries service.
#[derive(Debug, Clone)]
pub struct QueriesService(pub Arc<Marketplace>);
/// The Billing service.
#[derive(Debug, Clone)]
pub struct BillingService(pub Arc<Marketplace>);

type ResultStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = std::result::Result<proto::RunQueryResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl proto::queries_server::Queries for QueriesService {
    type RunQueryStream = ResultStream;

    async fn run_query(
        &self,
        request: Request<proto::RunQueryRequest>,
    ) -> Result<Response<Self::RunQueryStream>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let engine = Arc::clone(self.0.engine()?);
        let market: Arc<dyn queries::Market> = Arc::clone(&self.0) as _;
        let request = request.into_inner();
        // Its own task: a client that hangs up mid-query must not stop it
        // between its hold and its settlement, which would leave the hold
        // (and the query `running`) until the next restart.
        let outcome = tokio::spawn(
            async move { queries::run(&market, &engine, &principal, request).await }
                .in_current_span(),
        )
        .await
        .map_err(|error| MarketError::Corrupt(format!("query task: {error}")))??;
        if let Some((code, message)) = outcome.error {
            return Err(Status::new(
                code,
                format!("query {}: {message}", outcome.summary.query_id),
            ));
        }
        let mut messages =
            Vec::with_capacity(1 + outcome.result.len() / queries::RESULT_CHUNK_BYTES + 1);
        messages.push(Ok(proto::RunQueryResponse {
            message: Some(proto::run_query_response::Message::Summary(outcome.summary)),
        }));
        for chunk in outcome.result.chunks(queries::RESULT_CHUNK_BYTES) {
            messages.push(Ok(proto::RunQueryResponse {
                message: Some(proto::run_query_response::Message::ArrowIpc(chunk.to_vec())),
            }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn list_usage(
        &self,
        request: Request<proto::ListUsageRequest>,
    ) -> Result<Response<proto::ListUsageResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let organization = principal.organization.id.clone();
        let view = if self.0.cross_tenant(&principal, "usage:read").await? {
            UsageView::Everything
        } else {
            self.0
                .require(&principal, &organization, "usage:read")
                .await?;
            if !request.organization_id.is_empty() && request.organization_id != organization {
                return Err(MarketError::PermissionDenied {
                    permission: "usage:read".into(),
                    context: format!(" in tenant {}", request.organization_id),
                }
                .into());
            }
            match principal.organization.kind {
                OrganizationKind::Provider => UsageView::Provider,
                _ => UsageView::Consumer,
            }
        };
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let queries = queries::list_usage(&mut connection, view, &organization, &request).await?;
        Ok(Response::new(proto::ListUsageResponse { queries }))
    }
}

impl BillingService {
    /// The organization a billing read is about: the caller's own unless a
    /// cross-tenant role asks about another.
    async fn subject(&self, principal: &Principal, requested: &str) -> Result<String> {
        let own = &principal.organization.id;
        if requested.is_empty() || requested == own {
            self.0.require(principal, own, "billing:read").await?;
            return Ok(own.clone());
        }
        self.0
            .require(principal, "platform:cross-tenant", "billing:read")
            .await?;
        Ok(requested.to_owned())
    }
}

#[tonic::async_trait]
impl proto::billing_server::Billing for BillingService {
    async fn deposit(
        &self,
        request: Request<proto::DepositRequest>,
    ) -> Result<Response<proto::Balance>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, "platform:cross-tenant", "billing:deposit")
            .await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let organization = identity::find_organization(&mut transaction, &request.organization_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: request.organization_id.clone(),
            })?;
        if organization.kind != OrganizationKind::Consumer {
            return Err(MarketError::invalid(
                "organization_id",
                format!("{} is not a consumer organization", organization.id),
            )
            .into());
        }
        billing::deposit(
            &mut transaction,
            &organization.id,
            request.amount_minor,
            &request.currency,
        )
        .await?;
        log::append(
            &mut transaction,
            self.0.store.backend(),
            &[Event {
                kind: "billing.deposit".into(),
                actor: principal.user.id.clone(),
                tenant: organization.id.clone(),
                subject: organization.id.clone(),
                details: serde_json::json!({
                    "amount_minor": request.amount_minor,
                    "currency": request.currency,
                    "reference": request.reference,
                }),
            }],
        )
        .await?;
        let balance = billing::balances(&mut transaction, &organization.id)
            .await?
            .into_iter()
            .find(|balance| balance.currency == request.currency)
            .unwrap_or_default();
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(balance))
    }

    async fn get_balance(
        &self,
        request: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::GetBalanceResponse>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let organization = self
            .subject(&principal, &request.get_ref().organization_id)
            .await?;
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let balances = billing::balances(&mut connection, &organization).await?;
        Ok(Response::new(proto::GetBalanceResponse { balances }))
    }

    async fn get_invoice(
        &self,
        request: Request<proto::GetInvoiceRequest>,
    ) -> Result<Response<proto::Invoice>, Status> {
        let principal = self.0.authenticate(&request).await?;
        let request = request.into_inner();
        let organization = self.subject(&principal, &request.organization_id).await?;
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        let kind = identity::find_organization(&mut connection, &organization)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: organization.clone(),
            })?
            .kind;
        let invoice = billing::invoice(
            &mut connection,
            &organization,
            &request.period,
            kind == OrganizationKind::Provider,
        )
        .await?;
        Ok(Response::new(invoice))
    }

    async fn get_ledger_summary(
        &self,
        request: Request<proto::GetLedgerSummaryRequest>,
    ) -> Result<Response<proto::LedgerSummary>, Status> {
        let principal = self.0.authenticate(&request).await?;
        self.0
            .require(&principal, "platform:cross-tenant", "billing:read")
            .await?;
        let mut connection = self
            .0
            .store
            .pool()
            .acquire()
            .await
            .map_err(MarketError::from)?;
        Ok(Response::new(billing::summary(&mut connection).await?))
    }
}

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
    builder
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
        .await
}

/// The address a listener is bound to, for logs.
#[must_use]
pub fn local_address(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

mod tokio_stream_shim {
    pub use tonic::transport::server::TcpIncoming;
}
