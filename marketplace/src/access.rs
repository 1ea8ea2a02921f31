//! Who may do what, decided by casbin: RBAC with domains, where the domain is
//! the tenant (organization id) a role is bound in, and `*` for the
//! cross-tenant roles (platform-admin, regulator).
//!
//! casbin holds only roles, their permissions and role bindings — a few rules
//! per user — never contracts: a contract's grants are checked by
//! [`crate::contracts::ContractIndex`], so a decision never scans contracts.
//! Rules live in the `casbin_rules` table; every change is written there and to
//! the audit log in one transaction, and applied to the in-memory enforcer
//! after it commits.

use casbin::{
    CachedApi as _, CachedEnforcer, CoreApi as _, DefaultCache, DefaultModel, MemoryAdapter,
    MgmtApi as _,
};
use sqlx::AnyConnection;
use tokio::sync::RwLock;

use crate::error::{MarketError, Result};
use crate::identity::OrganizationKind;
use crate::store;

const MODEL: &str = r#"
[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, obj, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = (g(r.sub, p.sub, r.dom) || g(r.sub, p.sub, "*")) && r.obj == p.obj && r.act == p.act
"#;

/// Decisions casbin keeps cached (each a hash and a flag).
const DECISION_CACHE_ENTRIES: usize = 500_000;

/// The roles and, for each, the organization kind whose users may hold it and
/// whether it applies across tenants.
pub const ROLES: &[(&str, OrganizationKind, bool)] = &[
    ("platform-admin", OrganizationKind::Platform, true),
    ("provider-admin", OrganizationKind::Provider, false),
    ("provider-analyst", OrganizationKind::Provider, false),
    ("consumer-admin", OrganizationKind::Consumer, false),
    ("consumer-analyst", OrganizationKind::Consumer, false),
    ("regulator", OrganizationKind::Regulator, true),
];

/// Each role's permissions (`object:action`). Deny is the default: a
/// permission not listed here is refused.
pub const ROLE_PERMISSIONS: &[(&str, &[&str])] = &[
    (
        "platform-admin",
        &[
            "organization:create",
            "organization:list",
            "user:create",
            "token:issue",
            "token:revoke",
            "role:grant",
            "product:read",
            "product:review",
            "product:publish",
            "product:suspend",
            "product:retire",
            "product:transfer",
            "contract:read",
            "contract:revoke",
            "catalog:search",
            "audit:read",
            "usage:read",
            "billing:read",
            "billing:deposit",
        ],
    ),
    (
        "provider-admin",
        &[
            "user:create",
            "token:issue",
            "token:revoke",
            "role:grant",
            "product:create",
            "product:read",
            "product:submit",
            "product:publish",
            "product:retire",
            "product:revise",
            "product:upload",
            "contract:read",
            "contract:decide",
            "contract:revoke",
            "catalog:search",
            "demand:answer",
            "quality:answer",
            "usage:read",
            "billing:read",
        ],
    ),
    (
        "provider-analyst",
        &[
            "product:read",
            "contract:read",
            "catalog:search",
            "usage:read",
        ],
    ),
    (
        "consumer-admin",
        &[
            "user:create",
            "token:issue",
            "token:revoke",
            "role:grant",
            "contract:request",
            "contract:read",
            "contract:revoke",
            "contract:check",
            "catalog:search",
            "demand:post",
            "demand:close",
            "quality:report",
            "query:run",
            "usage:read",
            "billing:read",
        ],
    ),
    (
        "consumer-analyst",
        &[
            "contract:read",
            "contract:check",
            "catalog:search",
            "demand:post",
            "quality:report",
            "query:run",
            "usage:read",
        ],
    ),
    (
        "regulator",
        &[
            "organization:list",
            "product:read",
            "contract:read",
            "catalog:search",
            "audit:read",
            "usage:read",
            "billing:read",
        ],
    ),
];

/// A role's definition, or `InvalidArgument` naming `field`.
///
/// # Errors
/// An unknown role.
pub fn role(field: &str, name: &str) -> Result<(OrganizationKind, bool)> {
    ROLES
        .iter()
        .find(|(role, _, _)| *role == name)
        .map(|(_, kind, cross_tenant)| (*kind, *cross_tenant))
        .ok_or_else(|| {
            let known: Vec<&str> = ROLES.iter().map(|(role, _, _)| *role).collect();
            MarketError::invalid(
                field,
                format!("unknown role {name:?}; one of {}", known.join(", ")),
            )
        })
}

/// The casbin enforcer, loaded from the database.
pub struct Access {
    // Cached: a decision is a hash lookup after the first; every policy
    // change through this type clears the cache.
    enforcer: RwLock<CachedEnforcer>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

fn casbin_error(error: casbin::Error) -> MarketError {
    MarketError::Access(error.to_string())
}

impl Access {
    /// Seeds the role permissions into `casbin_rules` (once) and loads every
    /// rule into an enforcer.
    ///
    /// # Errors
    /// Database or casbin failures.
    pub async fn load(connection: &mut AnyConnection) -> Result<Self> {
        for (role, permissions) in ROLE_PERMISSIONS {
            for permission in *permissions {
                let (object, action) = permission
                    .split_once(':')
                    .expect("permissions are object:action");
                store::casbin_rules::add_policy(connection, role, object, action).await?;
            }
        }
        Ok(Self {
            enforcer: RwLock::new(enforcer_from(connection).await?),
        })
    }

    /// Reads every rule again, as another server on the database changed
    /// some: the enforcer (and its cache of decisions) is replaced whole.
    ///
    /// # Errors
    /// Database or casbin failures; the enforcer is then left as it was.
    pub async fn reload(&self, connection: &mut AnyConnection) -> Result<()> {
        let enforcer = enforcer_from(connection).await?;
        *self.enforcer.write().await = enforcer;
        Ok(())
    }

    /// Whether `user` holds `permission` in `tenant`.
    ///
    /// # Errors
    /// casbin failures (never a denial: that is `Ok(false)`).
    pub async fn allows(&self, user: &str, tenant: &str, permission: &str) -> Result<bool> {
        let (object, action) = permission
            .split_once(':')
            .ok_or_else(|| MarketError::Access(format!("malformed permission {permission}")))?;
        self.enforcer
            .read()
            .await
            .enforce((user, tenant, object, action))
            .map_err(casbin_error)
    }

    /// Requires `permission` in `tenant`.
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission.
    pub async fn require(&self, user: &str, tenant: &str, permission: &str) -> Result<()> {
        if self.allows(user, tenant, permission).await? {
            Ok(())
        } else {
            Err(MarketError::denied(
                permission,
                format!(" in tenant {tenant}"),
            ))
        }
    }

    /// The roles bound to `user`, with their domains.
    pub async fn roles_of(&self, user: &str) -> Vec<(String, String)> {
        self.enforcer
            .read()
            .await
            .get_filtered_grouping_policy(0, vec![user.to_owned()])
            .into_iter()
            .filter_map(|rule| Some((rule.get(1)?.clone(), rule.get(2)?.clone())))
            .collect()
    }

    /// Writes a role binding in the caller's transaction; apply it with
    /// [`Access::apply_binding`] once that commits.
    ///
    /// # Errors
    /// Database failures.
    pub async fn store_binding(
        connection: &mut AnyConnection,
        user: &str,
        role: &str,
        domain: &str,
        bound: bool,
    ) -> Result<bool> {
        let changed =
            store::casbin_rules::set_grouping(connection, user, role, domain, bound).await?;
        if changed {
            let backend = store::Backend::of(connection);
            store::replicas::announce(connection, backend, &store::replicas::Change::Access)
                .await?;
        }
        Ok(changed)
    }

    /// Applies a committed role binding to the enforcer.
    ///
    /// # Errors
    /// casbin failures.
    pub async fn apply_binding(
        &self,
        user: &str,
        role: &str,
        domain: &str,
        bound: bool,
    ) -> Result<()> {
        let rule = vec![user.to_owned(), role.to_owned(), domain.to_owned()];
        let mut enforcer = self.enforcer.write().await;
        if bound {
            enforcer
                .add_grouping_policy(rule)
                .await
                .map_err(casbin_error)?;
        } else {
            enforcer
                .remove_grouping_policy(rule)
                .await
                .map_err(casbin_error)?;
        }
        Ok(())
    }
}

/// An enforcer with every rule in `casbin_rules`.
async fn enforcer_from(connection: &mut AnyConnection) -> Result<CachedEnforcer> {
    let mut policies = Vec::new();
    let mut groupings = Vec::new();
    for (ptype, rule) in store::casbin_rules::all(connection).await? {
        match ptype.as_str() {
            "p" => policies.push(rule),
            "g" => groupings.push(rule),
            other => return Err(MarketError::Corrupt(format!("casbin rule type {other:?}"))),
        }
    }
    let model = DefaultModel::from_str(MODEL).await.map_err(casbin_error)?;
    let mut enforcer = CachedEnforcer::new(model, MemoryAdapter::default())
        .await
        .map_err(casbin_error)?;
    // casbin's default holds 200 decisions; a city's users times their
    // permissions need far more to stay warm.
    enforcer.set_cache(Box::new(DefaultCache::new(DECISION_CACHE_ENTRIES)));
    if !policies.is_empty() {
        enforcer
            .add_policies(policies)
            .await
            .map_err(casbin_error)?;
    }
    if !groupings.is_empty() {
        enforcer
            .add_grouping_policies(groupings)
            .await
            .map_err(casbin_error)?;
    }
    Ok(enforcer)
}
