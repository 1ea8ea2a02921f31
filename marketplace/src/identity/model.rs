//! Who is who: organizations (tenants) and their kinds, users, the
//! principal a request runs as, and tokens' secrets.

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::error::{MarketError, Result};

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

    pub(crate) fn sha256(&self) -> Vec<u8> {
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
