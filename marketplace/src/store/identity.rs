//! Organizations, users and API tokens (stored as the sha256 of their
//! secret, never the secret).

use sqlx::{AnyConnection, Row as _};

use crate::error::Result;
use crate::identity::model::{Organization, OrganizationKind, User};

/// Stores a new organization.
pub(crate) async fn insert_organization(
    connection: &mut AnyConnection,
    organization: &Organization,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO organizations (id, display_name, kind, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&organization.id)
    .bind(&organization.display_name)
    .bind(organization.kind.as_str())
    .bind(organization.created_at)
    .execute(&mut *connection)
    .await?;
    Ok(())
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
        .bind(id)
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

/// Whether a user already has this name.
pub(crate) async fn user_name_taken(connection: &mut AnyConnection, name: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT id FROM users WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *connection)
        .await?
        .is_some())
}

/// Stores a new user.
pub(crate) async fn insert_user(connection: &mut AnyConnection, user: &User) -> Result<()> {
    sqlx::query(
        "INSERT INTO users (id, organization_id, name, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(&user.id)
    .bind(&user.organization_id)
    .bind(&user.name)
    .bind(user.created_at)
    .execute(&mut *connection)
    .await?;
    Ok(())
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
/// Database failures.
pub async fn find_user(connection: &mut AnyConnection, id: &str) -> Result<Option<User>> {
    sqlx::query("SELECT id, organization_id, name, created_at FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .as_ref()
        .map(user_from_row)
        .transpose()
}

/// A token about to be stored: its secret only as a hash.
pub(crate) struct NewToken<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub secret_sha256: &'a [u8],
    pub description: &'a str,
    pub created_at: i64,
    pub expires_at: i64,
}

/// Stores a new token.
pub(crate) async fn insert_token(
    connection: &mut AnyConnection,
    token: &NewToken<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, secret_sha256, description, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(token.id)
    .bind(token.user_id)
    .bind(token.secret_sha256)
    .bind(token.description)
    .bind(token.created_at)
    .bind(token.expires_at)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The user a token belongs to, if the token exists.
///
/// # Errors
/// Database failures.
pub async fn token_owner(connection: &mut AnyConnection, token_id: &str) -> Result<Option<String>> {
    Ok(sqlx::query("SELECT user_id FROM api_tokens WHERE id = $1")
        .bind(token_id)
        .fetch_optional(&mut *connection)
        .await?
        .map(|row| row.try_get("user_id"))
        .transpose()?)
}

/// Marks a token revoked at `at`; `false` when it was already revoked or
/// does not exist.
pub(crate) async fn mark_token_revoked(
    connection: &mut AnyConnection,
    token_id: &str,
    at: i64,
) -> Result<bool> {
    let updated =
        sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(at)
            .bind(token_id)
            .execute(&mut *connection)
            .await?;
    Ok(updated.rows_affected() > 0)
}

/// Whose a token is, and when it expires or was revoked.
pub(crate) struct TokenHolder {
    pub user: User,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// The holder of the token whose secret hashes to `secret_sha256`.
pub(crate) async fn token_holder(
    connection: &mut AnyConnection,
    secret_sha256: &[u8],
) -> Result<Option<TokenHolder>> {
    let Some(row) = sqlx::query(
        "SELECT u.id, u.organization_id, u.name, u.created_at, t.expires_at, t.revoked_at \
         FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.secret_sha256 = $1",
    )
    .bind(secret_sha256)
    .fetch_optional(&mut *connection)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(TokenHolder {
        user: user_from_row(&row)?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    }))
}
