//! The Identity service: organizations, users, tokens and roles.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Result;
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
        let roles = self.0.roles_of(&principal).await;
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
        let kind = kind_from_proto(request.kind())?;
        let organization = self
            .0
            .create_organization(&principal, &request.id, &request.display_name, kind)
            .await?;
        Ok(Response::new(organization_to_proto(&organization)))
    }

    async fn list_organizations(
        &self,
        request: Request<proto::ListOrganizationsRequest>,
    ) -> Result<Response<proto::ListOrganizationsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let organizations = self.0.list_organizations(&principal).await?;
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
        let user = self
            .0
            .create_user(&principal, &request.organization_id, &request.name)
            .await?;
        Ok(Response::new(user_to_proto(&user)))
    }

    async fn issue_token(
        &self,
        request: Request<proto::IssueTokenRequest>,
    ) -> Result<Response<proto::IssuedToken>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let token = self
            .0
            .issue_token(
                &principal,
                &request.user_id,
                request.ttl_seconds,
                &request.description,
            )
            .await?;
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
        self.0
            .revoke_token(&principal, &request.into_inner().token_id)
            .await?;
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
        let binding = self
            .0
            .bind_role(&principal, &request.user_id, &request.role, bound)
            .await?;
        Ok(Response::new(proto::RoleBinding {
            user_id: binding.user_id,
            role: binding.role,
            domain: binding.domain,
        }))
    }
}
