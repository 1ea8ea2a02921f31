//! Organizations (tenants), users and API tokens.
//!
//! A token is 32 random bytes shown once as `cgt_<base64url>`; the database
//! keeps only its SHA-256, so a leaked database yields no usable token.
//! Tokens expire and can be revoked; both take effect on the next request.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::{AnyConnection, Row as _};

use crate::error::{MarketError, Result};
use crate::store::now_ms;

/// The kinds of organization, which decide the roles their users may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrganizationKind {
    /// Publishes data products.
    Provider,
    /// Buys access to data products.
    Consumer,
    /// Runs the marketplace.
    Platform,
    /// Audits it.
    Regulator,
}

impl OrganizationKind {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider => "provider",
            Self::Consumer => "consumer",
            Self::Platform => "platform",
            Self::Regulator => "regulator",
        }
    }

    /// Parses a stored name.
    ///
    /// # Errors
    /// An unknown name (stored data is corrupt).
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "provider" => Self::Provider,
            "consumer" => Self::Consumer,
            "platform" => Self::Platform,
            "regulator" => Self::Regulator,
            other => return Err(MarketError::Corrupt(format!("organization kind {other:?}"))),
        })
    }
}

/// An organization.
#[derive(Clone, Debug)]
pub struct Organization {
    /// Also the tenant (casbin domain) id.
    pub id: String,
    /// Shown to people.
    pub display_name: String,
    /// What it is.
    pub kind: OrganizationKind,
    /// When it was created.
    pub created_at: i64,
}

/// A user of an organization.
#[derive(Clone, Debug)]
pub struct User {
    /// `usr-` and 16 hex digits.
    pub id: String,
    /// Its organization.
    pub organization_id: String,
    /// Unique across the marketplace.
    pub name: String,
    /// When it was created.
    pub created_at: i64,
}

/// Who is calling: an authenticated user and its organization.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The user.
    pub user: User,
    /// The user's organization.
    pub organization: Organization,
}

/// Checks an id used as a tenant or product id: 3–63 of `[a-z0-9-]`, starting
/// with a letter, not ending with `-`.
///
/// # Errors
/// Names `field` and the rule broken.
pub fn validate_slug(field: &str, value: &str) -> Result<()> {
    let valid_chars = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(3..=63).contains(&value.len())
        || !valid_chars
        || !value.starts_with(|c: char| c.is_ascii_lowercase())
        || value.ends_with('-')
    {
        return Err(MarketError::invalid(
            field,
            format!(
                "{value:?} must be 3 to 63 characters of a-z, 0-9 and '-', start with a letter and not end with '-'"
            ),
        ));
    }
    Ok(())
}

/// A random id with a prefix.
#[must_use]
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

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
    let created_at = now_ms();
    sqlx::query(
        "INSERT INTO organizations (id, display_name, kind, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(id.to_owned())
    .bind(display_name.to_owned())
    .bind(kind.as_str())
    .bind(created_at)
    .execute(&mut *connection)
    .await?;
    Ok(Organization {
        id: id.to_owned(),
        display_name: display_name.to_owned(),
        kind,
        created_at,
    })
}

fn organization_from_row(row: &sqlx::any::AnyRow) -> Result<Organization> {
    Ok(Organization {
        id: row.try_get("id")?,
        display_name: row.try_get("display_name")?,
        kind: OrganizationKind::parse(&row.try_get::<String, _>("kind")?)?,
        created_at: row.try_get("created_at")?,
    })
}

/// An organization by id.
///
/// # Errors
/// Database failures.
pub async fn find_organization(
    connection: &mut AnyConnection,
    id: &str,
) -> Result<Option<Organization>> {
    sqlx::query("SELECT id, display_name, kind, created_at FROM organizations WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&mut *connection)
        .await?
        .as_ref()
        .map(organization_from_row)
        .transpose()
}

/// Every organization, by id.
///
/// # Errors
/// Database failures.
pub async fn list_organizations(connection: &mut AnyConnection) -> Result<Vec<Organization>> {
    sqlx::query("SELECT id, display_name, kind, created_at FROM organizations ORDER BY id")
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(organization_from_row)
        .collect()
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
    let taken = sqlx::query("SELECT id FROM users WHERE name = $1")
        .bind(name.to_owned())
        .fetch_optional(&mut *connection)
        .await?;
    if taken.is_some() {
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
    sqlx::query(
        "INSERT INTO users (id, organization_id, name, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(user.id.clone())
    .bind(user.organization_id.clone())
    .bind(user.name.clone())
    .bind(user.created_at)
    .execute(&mut *connection)
    .await?;
    Ok(user)
}

fn user_from_row(row: &sqlx::any::AnyRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
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

/// A user by id.
///
/// # Errors
/// Database failures.
pub async fn find_user(connection: &mut AnyConnection, id: &str) -> Result<Option<User>> {
    sqlx::query("SELECT id, organization_id, name, created_at FROM users WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&mut *connection)
        .await?
        .as_ref()
        .map(user_from_row)
        .transpose()
}

/// A token's secret, which is never logged or printed by accident.
#[derive(Clone)]
pub struct TokenSecret(String);

impl TokenSecret {
    /// Wraps a presented secret.
    #[must_use]
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret itself, to show once or to send.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn sha256(&self) -> Vec<u8> {
        Sha256::digest(self.0.as_bytes()).to_vec()
    }
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// A newly issued token.
#[derive(Debug)]
pub struct IssuedToken {
    /// Its id, for revocation.
    pub id: String,
    /// The secret, shown once.
    pub secret: TokenSecret,
    /// When it stops working.
    pub expires_at: i64,
}

/// Longest token lifetime: a year.
pub const MAX_TOKEN_TTL_SECONDS: i64 = 365 * 24 * 3600;

/// Checks a token request's fields.
///
/// # Errors
/// Names the bad field.
pub fn validate_token_request(ttl_seconds: i64, description: &str) -> Result<()> {
    if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
        return Err(MarketError::invalid(
            "ttl_seconds",
            format!("must be between 1 and {MAX_TOKEN_TTL_SECONDS}"),
        ));
    }
    if description.len() > 200 {
        return Err(MarketError::invalid(
            "description",
            "at most 200 characters",
        ));
    }
    Ok(())
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
    let secret = TokenSecret(format!("cgt_{}", URL_SAFE_NO_PAD.encode(bytes)));
    let now = now_ms();
    let token = IssuedToken {
        id: new_id("tok"),
        secret,
        expires_at: now + ttl_seconds * 1000,
    };
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, secret_sha256, description, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(token.id.clone())
    .bind(user_id.to_owned())
    .bind(token.secret.sha256())
    .bind(description.to_owned())
    .bind(now)
    .bind(token.expires_at)
    .execute(&mut *connection)
    .await?;
    Ok(token)
}

/// The user a token belongs to, if the token exists.
///
/// # Errors
/// Database failures.
pub async fn token_owner(connection: &mut AnyConnection, token_id: &str) -> Result<Option<String>> {
    Ok(sqlx::query("SELECT user_id FROM api_tokens WHERE id = $1")
        .bind(token_id.to_owned())
        .fetch_optional(&mut *connection)
        .await?
        .map(|row| row.try_get("user_id"))
        .transpose()?)
}

/// Revokes a token (idempotent).
///
/// # Errors
/// An unknown token.
pub async fn revoke_token(connection: &mut AnyConnection, token_id: &str) -> Result<()> {
    let updated =
        sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(token_id.to_owned())
            .execute(&mut *connection)
            .await?;
    if updated.rows_affected() == 0 && token_owner(connection, token_id).await?.is_none() {
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
    let row = sqlx::query(
        "SELECT u.id, u.organization_id, u.name, u.created_at, t.expires_at, t.revoked_at \
         FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.secret_sha256 = $1",
    )
    .bind(secret.sha256())
    .fetch_optional(&mut *connection)
    .await?;
    let unauthenticated =
        || MarketError::Unauthenticated("invalid, expired or revoked token".into());
    let row = row.ok_or_else(unauthenticated)?;
    let expires_at: i64 = row.try_get("expires_at")?;
    let revoked_at: Option<i64> = row.try_get("revoked_at")?;
    if revoked_at.is_some() || expires_at <= now_ms() {
        return Err(unauthenticated());
    }
    let user = user_from_row(&row)?;
    let organization = find_organization(connection, &user.organization_id)
        .await?
        .ok_or_else(|| MarketError::Corrupt(format!("user {} has no organization", user.id)))?;
    Ok(Principal { user, organization })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_validated_with_the_field_named() {
        assert!(validate_slug("id", "city-population").is_ok());
        for bad in [
            "ab",
            "Caps",
            "1starts-with-digit",
            "ends-",
            "has space",
            &"x".repeat(64),
        ] {
            let error = validate_slug("product_id", bad).unwrap_err().to_string();
            assert!(error.starts_with("invalid product_id:"), "{error}");
        }
    }

    #[test]
    fn token_secrets_never_print() {
        let secret = TokenSecret::new("cgt_very-secret".into());
        assert_eq!(format!("{secret:?}"), "TokenSecret(<redacted>)");
    }
}
