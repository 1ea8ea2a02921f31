//! Tenancy use cases: organizations, users, tokens and role bindings. Each
//! checks the caller's permission, makes its change and its audit entry in
//! one transaction, and only then updates what the process caches.

use crate::access::{self, Access};
use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result};
use crate::identity::{self, IssuedToken, Organization, OrganizationKind, Principal, User};

use super::Marketplace;

/// A role binding as it stands after a grant or a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleBinding {
    /// The user.
    pub user_id: String,
    /// The role.
    pub role: String,
    /// The casbin domain: the user's organization, or `*` for a
    /// cross-tenant role.
    pub domain: String,
}

impl Marketplace {
    /// The caller's roles, as `role@domain`.
    pub async fn roles_of(&self, principal: &Principal) -> Vec<String> {
        self.access
            .roles_of(&principal.user.id)
            .await
            .into_iter()
            .map(|(role, domain)| format!("{role}@{domain}"))
            .collect()
    }

    /// Creates an organization (`organization:create` on its id).
    ///
    /// # Errors
    /// `PermissionDenied`, `InvalidArgument` naming the field, `AlreadyExists`.
    pub async fn create_organization(
        &self,
        principal: &Principal,
        id: &str,
        display_name: &str,
        kind: OrganizationKind,
    ) -> Result<Organization> {
        self.require(principal, id, "organization:create").await?;
        let mut transaction = self.store.begin().await?;
        let organization =
            identity::create_organization(&mut transaction, id, display_name, kind).await?;
        log::append(
            &mut transaction,
            self.store.backend(),
            &[Event {
                kind: "tenant.organization_created".into(),
                actor: principal.user.id.clone(),
                tenant: organization.id.clone(),
                subject: organization.id.clone(),
                details: serde_json::json!({"kind": kind.as_str(), "display_name": organization.display_name}),
            }],
        )
        .await?;
        transaction.commit().await?;
        Ok(organization)
    }

    /// Every organization (`organization:list`, platform-wide).
    ///
    /// # Errors
    /// `PermissionDenied`, or the database fails.
    pub async fn list_organizations(&self, principal: &Principal) -> Result<Vec<Organization>> {
        self.require(principal, "*", "organization:list").await?;
        let mut connection = self.store.acquire().await?;
        identity::list_organizations(&mut connection).await
    }

    /// Creates a user in an organization (`user:create` there).
    ///
    /// # Errors
    /// `InvalidArgument` naming the field, `PermissionDenied`, `NotFound`.
    pub async fn create_user(
        &self,
        principal: &Principal,
        organization_id: &str,
        name: &str,
    ) -> Result<User> {
        identity::validate_slug("organization_id", organization_id)?;
        self.require(principal, organization_id, "user:create")
            .await?;
        let mut transaction = self.store.begin().await?;
        let user = identity::create_user(&mut transaction, organization_id, name).await?;
        log::append(
            &mut transaction,
            self.store.backend(),
            &[Event {
                kind: "tenant.user_created".into(),
                actor: principal.user.id.clone(),
                tenant: user.organization_id.clone(),
                subject: user.id.clone(),
                details: serde_json::json!({"name": user.name}),
            }],
        )
        .await?;
        transaction.commit().await?;
        Ok(user)
    }

    /// Issues a token: users their own; admins (`token:issue`) others'.
    ///
    /// # Errors
    /// `InvalidArgument` naming the field, `NotFound`, `PermissionDenied`.
    pub async fn issue_token(
        &self,
        principal: &Principal,
        user_id: &str,
        ttl_seconds: i64,
        description: &str,
    ) -> Result<IssuedToken> {
        identity::validate_token_request(ttl_seconds, description)?;
        let mut transaction = self.store.begin().await?;
        let user = identity::get_user(&mut transaction, user_id).await?;
        if user.id != principal.user.id {
            self.require(principal, &user.organization_id, "token:issue")
                .await?;
        }
        let token =
            identity::issue_token(&mut transaction, &user.id, ttl_seconds, description).await?;
        log::append(
            &mut transaction,
            self.store.backend(),
            &[Event {
                kind: "tenant.token_issued".into(),
                actor: principal.user.id.clone(),
                tenant: user.organization_id.clone(),
                subject: token.id.clone(),
                details: serde_json::json!({"user": user.id, "expires_at_unix_ms": token.expires_at}),
            }],
        )
        .await?;
        transaction.commit().await?;
        Ok(token)
    }

    /// Revokes a token: users their own; admins (`token:revoke`) others'.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub async fn revoke_token(&self, principal: &Principal, token_id: &str) -> Result<()> {
        let mut transaction = self.store.begin().await?;
        let owner = identity::token_owner(&mut transaction, token_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "token",
                id: token_id.to_owned(),
            })?;
        let owner = identity::find_user(&mut transaction, &owner)
            .await?
            .ok_or_else(|| MarketError::Corrupt("token without user".into()))?;
        if owner.id != principal.user.id {
            self.require(principal, &owner.organization_id, "token:revoke")
                .await?;
        }
        identity::revoke_token(&mut transaction, token_id).await?;
        log::append(
            &mut transaction,
            self.store.backend(),
            &[Event {
                kind: "tenant.token_revoked".into(),
                actor: principal.user.id.clone(),
                tenant: owner.organization_id.clone(),
                subject: token_id.to_owned(),
                details: serde_json::json!({"user": owner.id}),
            }],
        )
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Grants (`bound`) or revokes a role. A role is for users of one kind
    /// of organization; cross-tenant roles are bound in domain `*` and only
    /// by platform admins, tenant roles in the user's organization by an
    /// admin of it (`role:grant`). casbin's cache changes only after the
    /// binding and its audit entry are committed.
    ///
    /// # Errors
    /// `InvalidArgument` naming `role`, `NotFound`, `PermissionDenied`.
    pub async fn bind_role(
        &self,
        principal: &Principal,
        user_id: &str,
        role: &str,
        bound: bool,
    ) -> Result<RoleBinding> {
        let (role_kind, cross_tenant) = access::role("role", role)?;
        let mut transaction = self.store.begin().await?;
        let user = identity::get_user(&mut transaction, user_id).await?;
        let organization = identity::find_organization(&mut transaction, &user.organization_id)
            .await?
            .ok_or_else(|| MarketError::Corrupt("user without organization".into()))?;
        if organization.kind != role_kind {
            return Err(MarketError::invalid(
                "role",
                format!(
                    "{role} is for users of {} organizations; {} is a {} organization",
                    role_kind.as_str(),
                    organization.id,
                    organization.kind.as_str()
                ),
            ));
        }
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
        self.require(principal, permission_tenant, "role:grant")
            .await?;
        let changed =
            Access::store_binding(&mut transaction, &user.id, role, &domain, bound).await?;
        if changed {
            log::append(
                &mut transaction,
                self.store.backend(),
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
                    details: serde_json::json!({"role": role, "domain": domain}),
                }],
            )
            .await?;
        }
        transaction.commit().await?;
        if changed {
            self.access
                .apply_binding(&user.id, role, &domain, bound)
                .await?;
        }
        Ok(RoleBinding {
            user_id: user.id,
            role: role.to_owned(),
            domain,
        })
    }
}
