//! Organizations (tenants), users and API tokens.
//!
//! A token is 32 random bytes shown once as `cgt_<base64url>`; the database
//! keeps only its SHA-256, so a leaked database yields no usable token.
//! Tokens expire and can be revoked; both take effect on the next request.

pub(crate) mod model;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sqlx::AnyConnection;

use crate::error::{MarketError, Result};
use crate::store::{self, now_ms};

pub use model::{
    IssuedToken, MAX_TOKEN_TTL_SECONDS, Organization, OrganizationKind, Principal, TokenSecret,
    User, new_id, validate_slug, validate_token_request,
};
pub use store::identity::{find_organization, find_user, list_organizations, token_owner};

/// Creates an organization.
///
/// # Errors
/// A bad or taken id.
pub async fn create_organization(
    connection: &mut AnyConnection,
    id: &str,
    display_name: &str,
    kind: OrganizationKind,
) -> Result<Organization> {
    validate_slug("id", id)?;
    if display_name.trim().is_empty() || display_name.len() > 200 {
        return Err(MarketError::invalid(
            "display_name",
            "must be 1 to 200 characters",
        ));
    }
    if find_organization(connection, id).await?.is_some() {
        return Err(MarketError::AlreadyExists {
            what: "organization",
            id: id.to_owned(),
        });
    }
    let organization = Organization {
        id: id.to_owned(),
        display_name: display_name.to_owned(),
        kind,
        created_at: now_ms(),
    };
    store::identity::insert_organization(connection, &organization).await?;
    Ok(organization)
}

/// Creates a user in an organization.
///
/// # Errors
/// A bad or taken name, or an unknown organization.
pub async fn create_user(
    connection: &mut AnyConnection,
    organization_id: &str,
    name: &str,
) -> Result<User> {
    if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(MarketError::invalid(
            "name",
            "must be 1 to 200 printable characters",
        ));
    }
    if find_organization(connection, organization_id)
        .await?
        .is_none()
    {
        return Err(MarketError::NotFound {
            what: "organization",
            id: organization_id.to_owned(),
        });
    }
    if store::identity::user_name_taken(connection, name).await? {
        return Err(MarketError::AlreadyExists {
            what: "user",
            id: name.to_owned(),
        });
    }
    let user = User {
        id: new_id("usr"),
        organization_id: organization_id.to_owned(),
        name: name.to_owned(),
        created_at: now_ms(),
    };
    store::identity::insert_user(connection, &user).await?;
    Ok(user)
}

/// A user by id.
///
/// # Errors
/// `NotFound`.
pub async fn get_user(connection: &mut AnyConnection, id: &str) -> Result<User> {
    find_user(connection, id)
        .await?
        .ok_or_else(|| MarketError::NotFound {
            what: "user",
            id: id.to_owned(),
        })
}

/// Issues a token for a user.
///
/// # Errors
/// A lifetime outside 1 s to a year, or an unknown user.
pub async fn issue_token(
    connection: &mut AnyConnection,
    user_id: &str,
    ttl_seconds: i64,
    description: &str,
) -> Result<IssuedToken> {
    validate_token_request(ttl_seconds, description)?;
    get_user(connection, user_id).await?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = TokenSecret::new(format!("cgt_{}", URL_SAFE_NO_PAD.encode(bytes)));
    let now = now_ms();
    let token = IssuedToken {
        id: new_id("tok"),
        secret,
        expires_at: now + ttl_seconds * 1000,
    };
    store::identity::insert_token(
        connection,
        &store::identity::NewToken {
            id: &token.id,
            user_id,
            secret_sha256: &token.secret.sha256(),
            description,
            created_at: now,
            expires_at: token.expires_at,
        },
    )
    .await?;
    Ok(token)
}

/// Revokes a token (idempotent).
///
/// # Errors
/// An unknown token.
pub async fn revoke_token(connection: &mut AnyConnection, token_id: &str) -> Result<()> {
    let revoked = store::identity::mark_token_revoked(connection, token_id, now_ms()).await?;
    if !revoked && token_owner(connection, token_id).await?.is_none() {
        return Err(MarketError::NotFound {
            what: "token",
            id: token_id.to_owned(),
        });
    }
    Ok(())
}

/// The principal a presented secret belongs to.
///
/// # Errors
/// `Unauthenticated` for an unknown, expired or revoked token, without saying
/// which (that would help guessing).
pub async fn authenticate(
    connection: &mut AnyConnection,
    secret: &TokenSecret,
) -> Result<Principal> {
    let unauthenticated =
        || MarketError::Unauthenticated("invalid, expired or revoked token".into());
    let holder = store::identity::token_holder(connection, &secret.sha256())
        .await?
        .ok_or_else(unauthenticated)?;
    if holder.revoked_at.is_some() || holder.expires_at <= now_ms() {
        return Err(unauthenticated());
    }
    let user = holder.user;
    let organization = find_organization(connection, &user.organization_id)
        .await?
        .ok_or_else(|| MarketError::Corrupt(format!("user {} has no organization", user.id)))?;
    Ok(Principal { user, organization })
}
