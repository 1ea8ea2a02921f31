//! The marketplace's state, shared by every gRPC service: the store, access
//! control, the contract index, the log's signer and the query engine —
//! and the use cases the gRPC services call, one module per area
//! (`tenancy`, `contracting`, `registration`, `querying`, `accounts`,
//! `audit_reads`); the gRPC services only convert and call them.

mod accounts;
mod audit_reads;
mod contracting;
mod feedback;
mod querying;
mod receipts;
mod refresh;
mod registration;
pub mod replication;
mod retention;
mod tenancy;
mod uploading;
mod witnessing;

pub use accounts::Deposit;
pub use audit_reads::{EntryRange, SignedCheckpoint};
pub use contracting::OperationCheck;
pub use receipts::Receipt;
pub use tenancy::RoleBinding;
pub use witnessing::{COSIGNATURE_REFRESH, WitnessEndpoint};

use std::sync::Arc;

use ed25519_dalek::SigningKey;

use crate::access::Access;
use crate::audit::checkpoint::NoteSigner;
use crate::audit::log::{self, Event};
use crate::contracts::ContractIndex;
use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind, Principal, TokenSecret};
use crate::queries::{self, QueryEngine};
use crate::store::Store;

/// The marketplace's state shared by every service.
#[derive(Debug)]
pub struct Marketplace {
    pub(crate) store: Store,
    pub(crate) access: Access,
    pub(crate) contracts: ContractIndex,
    pub(crate) signer: NoteSigner,
    origin: String,
    data_dir: std::path::PathBuf,
    engine: std::sync::OnceLock<Arc<QueryEngine>>,
    runners: std::sync::OnceLock<Arc<dyn queries::remote::Runners>>,
    metrics: Arc<crate::metrics::Metrics>,
    replica_id: String,
    /// When this server last looked at each product's refresh folder.
    refreshed: std::sync::Mutex<std::collections::HashMap<String, i64>>,
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
        let signer = NoteSigner::new(origin, signing_key);
        crate::store::replicas::claim_log_identity(
            &mut transaction,
            origin,
            &signer.verifier().to_string(),
        )
        .await?;
        transaction.commit().await?;
        Ok(Arc::new(Self {
            store,
            access,
            contracts,
            signer,
            origin: origin.to_owned(),
            data_dir,
            engine: std::sync::OnceLock::new(),
            runners: std::sync::OnceLock::new(),
            metrics: Arc::default(),
            replica_id: identity::new_id("r"),
            refreshed: std::sync::Mutex::default(),
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

    /// The principal a bearer token's secret belongs to.
    ///
    /// # Errors
    /// `Unauthenticated` for a token that is unknown, revoked or expired.
    pub(crate) async fn authenticate(&self, secret: &str) -> Result<Principal> {
        let mut connection = self.store.reader().acquire().await?;
        identity::authenticate(&mut connection, &TokenSecret::new(secret.to_owned())).await
    }

    pub(crate) async fn require(
        &self,
        principal: &Principal,
        tenant: &str,
        permission: &str,
    ) -> Result<()> {
        self.access
            .require(&principal.user.id, tenant, permission)
            .await
    }

    /// Writes an audit entry on its own (for decisions that change nothing else).
    pub(crate) async fn audit(&self, event: Event) -> Result<u64> {
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

    /// Sends every query to a runner in a data center hosting its product
    /// instead of running it in this process (see docs/runners.md).
    ///
    /// # Errors
    /// `FailedPrecondition` when runners are attached already.
    pub fn attach_runners(&self, runners: Arc<dyn queries::remote::Runners>) -> Result<()> {
        self.runners
            .set(runners)
            .map_err(|_| MarketError::FailedPrecondition("runners are attached already".into()))
    }

    pub(crate) fn engine(&self) -> Result<&Arc<QueryEngine>> {
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
    pub(crate) async fn cross_tenant(
        &self,
        principal: &Principal,
        permission: &str,
    ) -> Result<bool> {
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

    fn runners(&self) -> Option<Arc<dyn queries::remote::Runners>> {
        self.runners.get().cloned()
    }

    fn replica_id(&self) -> &str {
        &self.replica_id
    }
}
