//! The Identity service: organizations, users, tokens and roles.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::{self, Access};
use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result};
use crate::identity;
use crate::proto;

use crate::market::Marketplace;

use super::auth;
use super::convert::{kind_from_proto, organization_to_proto, user_to_proto};

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService(pub Arc<Marketplace>);

#[tonic::async_trait]
impl proto::identity_server::Identity for IdentityService {
    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::Principal>, Status> {
        let principal = auth::principal(&request)?;
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
        let principal = auth::principal(&request)?;
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
        let principal = auth::principal(&request)?;
        self.0.require(&principal, "*", "organization:list").await?;
        let mut connection = self.0.store.acquire().await?;
        let organizations = identity::list_organizations(&mut connection).await?;
        Ok(Response::new(proto::ListOrganizationsResponse {
            organizations: organizations.iter().map(organization_to_proto).collect(),
        }))
    }

    async fn create_user(
        &self,
        request: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let principal = auth::principal(&request)?;
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
        let principal = auth::principal(&request)?;
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
        let principal = auth::principal(&request)?;
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
        let principal = auth::principal(&request)?;
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
