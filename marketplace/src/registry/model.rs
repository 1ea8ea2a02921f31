//! A product as the registry keeps it: its record, its lifecycle state, its
//! registration events, and what the catalog filters on.

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::error::{MarketError, Result};
use crate::spec::{ProductSpec, Sensitivity};

/// Where a product is in its registration lifecycle:
/// draft → submitted → under public notice → registered → published →
/// suspended or retired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProductState {
    /// Being written by its provider.
    Draft,
    /// Waiting for a platform admin.
    Submitted,
    /// Announced; anyone may object until the notice ends.
    UnderPublicNotice,
    /// Approved, with a registration number; not yet in the catalog.
    Registered,
    /// In the catalog and queryable under contracts.
    Published,
    /// Out of the catalog for now; its contracts cannot query.
    Suspended,
    /// Gone for good.
    Retired,
}

impl ProductState {
    /// The stored (and audited) name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Submitted => "submitted",
            Self::UnderPublicNotice => "under_public_notice",
            Self::Registered => "registered",
            Self::Published => "published",
            Self::Suspended => "suspended",
            Self::Retired => "retired",
        }
    }

    /// The state stored under `name`.
    ///
    /// # Errors
    /// `Corrupt` for a name no state has.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "draft" => Self::Draft,
            "submitted" => Self::Submitted,
            "under_public_notice" => Self::UnderPublicNotice,
            "registered" => Self::Registered,
            "published" => Self::Published,
            "suspended" => Self::Suspended,
            "retired" => Self::Retired,
            other => return Err(MarketError::Corrupt(format!("product state {other:?}"))),
        })
    }
}

/// A data product: its provider, version, state, registration record and
/// the spec that serves.
#[derive(Clone, Debug, PartialEq)]
pub struct Product {
    /// Lower-case letters, digits and '-'.
    pub id: String,
    /// The provider that owns it.
    pub provider_organization_id: String,
    /// Counts from 1; every change that serves makes a new one.
    pub version: i64,
    /// Its lifecycle state.
    pub state: ProductState,
    /// What serves now.
    pub spec: ProductSpec,
    /// "CG-<year>-<sequence>" once registered, else empty.
    pub registration_number: String,
    /// The platform admin who approved it, once registered.
    pub approved_by_user_id: String,
    /// When it was registered (0 before).
    pub registered_at_unix_ms: i64,
    /// When its public notice ends (0 when none runs).
    pub public_notice_ends_at_unix_ms: i64,
    /// Its last change.
    pub updated_at_unix_ms: i64,
    /// Its newest data version (0: its folder as it is; it has none).
    pub data_version: i64,
    /// A revision waiting for review; `spec` serves until it is approved.
    /// Shown to the product's provider and platform admins only.
    pub pending_revision: Option<ProductSpec>,
}

/// One step of a product's registration history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationEvent {
    /// The product.
    pub product_id: String,
    /// created, submitted, public_notice, registered, rejected, published,
    /// suspended, retired, changed, transferred, revision_submitted or
    /// revision_rejected.
    pub kind: String,
    /// Who took the step.
    pub actor_user_id: String,
    /// Why, where a reason was given.
    pub reason: String,
    /// The product's version after it.
    pub version: i64,
    /// When.
    pub at_unix_ms: i64,
    /// The audit log entry recording it.
    pub audit_index: i64,
}

/// What a catalog search asks for: published products matching every
/// filter given (empty filters match everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogFilter {
    /// Every keyword must appear in the title, description or keywords.
    pub keywords: Vec<String>,
    /// One tier.
    pub tier: String,
    /// One region.
    pub region: String,
    /// One provider.
    pub provider_organization_id: String,
    /// Only products none of whose columns is more sensitive than this
    /// (`Unspecified`: any).
    pub max_sensitivity: Sensitivity,
}

/// The sha256 (hex) of a spec's protobuf encoding: what a registration
/// event's audit entry commits to.
#[must_use]
pub fn spec_digest(spec: &ProductSpec) -> String {
    hex::encode(Sha256::digest(spec.encode_to_vec()))
}

/// The most sensitive column's class, for the catalog's filter.
#[must_use]
pub fn max_sensitivity(spec: &ProductSpec) -> i32 {
    spec.tables
        .iter()
        .flat_map(|table| &table.columns)
        .map(|column| column.sensitivity)
        .max()
        .unwrap_or(0)
}

/// The words a catalog search matches keywords against, lower-cased.
#[must_use]
pub fn search_text(spec: &ProductSpec) -> String {
    format!(
        "{} {} {}",
        spec.title,
        spec.description,
        spec.keywords.join(" ")
    )
    .to_lowercase()
}
