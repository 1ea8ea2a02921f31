//! The data-product registry and its registration lifecycle:
//! draft → submitted → under public notice → registered (number, approver,
//! time) → published → suspended or retired. Changes (new versions) and
//! transfers are registration events too. Every event is written with its
//! audit entry in the caller's transaction.

pub(crate) mod model;
mod validate;

use chrono::{DateTime, Datelike as _, Utc};
use prost::Message as _;
use sqlx::AnyConnection;

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result, check_text};
use crate::identity::validate_slug;
use crate::spec::{ProductSpec, QualityMetrics, Sensitivity};
use crate::store::{self, Backend, now_ms};

pub use model::{
    CatalogFilter, Product, ProductState, RegistrationEvent, max_sensitivity, search_text,
    spec_digest,
};
pub use store::products::{events, get_as_stored};
pub use validate::validate_spec;

/// A product by id.
///
/// # Errors
/// `NotFound`.
pub async fn get(connection: &mut AnyConnection, id: &str) -> Result<Product> {
    Ok(get_as_stored(connection, id).await?.0)
}

/// Records a registration event with its audit entry.
async fn record(
    connection: &mut AnyConnection,
    backend: Backend,
    product: &Product,
    kind: &str,
    actor: &str,
    reason: &str,
) -> Result<()> {
    let details = serde_json::json!({
        "version": product.version,
        "state": product.state.name(),
        "provider": product.provider_organization_id,
        "registration_number": product.registration_number,
        "spec_sha256": spec_digest(&product.spec),
        "quality": product.spec.quality.as_ref().map(|q| serde_json::json!({
            "completeness": q.completeness,
            "validity": q.validity,
            "freshness_seconds": q.freshness_seconds,
        })),
        "reason": reason,
    });
    let index = log::append(
        connection,
        backend,
        &[Event {
            kind: format!("product.{kind}"),
            actor: actor.to_owned(),
            tenant: product.provider_organization_id.clone(),
            subject: product.id.clone(),
            details,
        }],
    )
    .await?[0];
    store::products::insert_event(connection, product, kind, actor, reason, index).await
}

/// Creates a draft product for `provider`.
///
/// # Errors
/// Invalid fields, or a taken id.
pub async fn create(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    provider: &str,
    id: &str,
    spec: ProductSpec,
) -> Result<Product> {
    validate_slug("id", id)?;
    validate_spec(&spec)?;
    check_location_is_free(connection, backend, provider, id, &spec.storage_location).await?;
    if store::products::exists(connection, id).await? {
        return Err(MarketError::AlreadyExists {
            what: "product",
            id: id.to_owned(),
        });
    }
    store::products::insert_draft(connection, id, provider, &spec).await?;
    let product = get(connection, id).await?;
    record(connection, backend, &product, "created", actor, "").await?;
    Ok(product)
}

/// Refuses a location whose folder overlaps one of another provider's
/// products, as it is or as a revision waiting for review would make it: a
/// provider may point any number of its own products at the same files,
/// never at someone else's.
async fn check_location_is_free(
    connection: &mut AnyConnection,
    backend: Backend,
    provider: &str,
    id: &str,
    location: &str,
) -> Result<()> {
    for bytes in store::products::other_providers_specs(connection, backend, provider, id).await? {
        // Unreadable specs claim everything: better a refusal than a
        // shared folder.
        let other = ProductSpec::decode(bytes.as_slice()).unwrap_or_default();
        if crate::quality::locations_overlap(location, &other.storage_location) {
            return Err(MarketError::invalid(
                "spec.storage_location",
                format!(
                    "{location} is another provider's product's folder, or inside or around it"
                ),
            ));
        }
    }
    Ok(())
}

/// Replaces a draft's quality figures with measured ones (at submission).
///
/// # Errors
/// Database failures.
pub async fn set_quality(
    connection: &mut AnyConnection,
    id: &str,
    quality: QualityMetrics,
) -> Result<()> {
    let product = get(connection, id).await?;
    let mut spec = product.spec;
    spec.quality = Some(quality);
    store::products::rewrite_current_spec(connection, id, product.version, &spec).await
}

/// A lifecycle step.
#[derive(Clone, Debug)]
pub enum Step {
    /// draft → submitted.
    Submit,
    /// submitted → under public notice for this many days.
    StartPublicNotice {
        /// 0 to 60.
        days: i64,
    },
    /// under public notice → registered (the notice period must be over).
    Approve,
    /// submitted or under public notice → draft.
    Reject,
    /// registered or suspended → published.
    Publish,
    /// published → suspended.
    Suspend,
    /// registered, published or suspended → retired.
    Retire,
}

impl Step {
    fn event(&self) -> &'static str {
        match self {
            Self::Submit => "submitted",
            Self::StartPublicNotice { .. } => "public_notice",
            Self::Approve => "registered",
            Self::Reject => "rejected",
            Self::Publish => "published",
            Self::Suspend => "suspended",
            Self::Retire => "retired",
        }
    }

    fn allowed_from(&self) -> &'static [ProductState] {
        use ProductState::{Draft, Published, Registered, Submitted, Suspended, UnderPublicNotice};
        match self {
            Self::Submit => &[Draft],
            Self::StartPublicNotice { .. } => &[Submitted],
            Self::Approve => &[UnderPublicNotice],
            Self::Reject => &[Submitted, UnderPublicNotice],
            Self::Publish => &[Registered, Suspended],
            Self::Suspend => &[Published],
            Self::Retire => &[Registered, Published, Suspended],
        }
    }

    fn needs_reason(&self) -> bool {
        matches!(self, Self::Reject | Self::Suspend | Self::Retire)
    }
}

/// Applies a lifecycle step.
///
/// # Errors
/// `FailedPrecondition` naming the current state when the step does not apply.
pub async fn step(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    id: &str,
    step: Step,
    reason: &str,
) -> Result<Product> {
    check_text("reason", reason, 2000, step.needs_reason())?;
    let mut product = get(connection, id).await?;
    let current = product.state;
    if !step.allowed_from().contains(&current) {
        let allowed: Vec<&str> = step.allowed_from().iter().map(|s| s.name()).collect();
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} is {}; this step applies only when it is {}",
            current.name(),
            allowed.join(" or ")
        )));
    }
    let now = now_ms();
    product.state = match &step {
        Step::Submit => ProductState::Submitted,
        Step::StartPublicNotice { days } => {
            if !(0..=60).contains(days) {
                return Err(MarketError::invalid(
                    "notice_days",
                    "must be between 0 and 60",
                ));
            }
            product.public_notice_ends_at_unix_ms = now + days * 86_400_000;
            ProductState::UnderPublicNotice
        }
        Step::Approve => {
            if now < product.public_notice_ends_at_unix_ms {
                return Err(MarketError::FailedPrecondition(format!(
                    "the public notice of product {id} runs until {} (unix ms)",
                    product.public_notice_ends_at_unix_ms
                )));
            }
            product.registration_number =
                store::products::next_registration_number(connection, year_of(now)).await?;
            product.approved_by_user_id = actor.to_owned();
            product.registered_at_unix_ms = now;
            ProductState::Registered
        }
        Step::Reject => {
            product.public_notice_ends_at_unix_ms = 0;
            ProductState::Draft
        }
        Step::Publish => ProductState::Published,
        Step::Suspend => ProductState::Suspended,
        Step::Retire => ProductState::Retired,
    };
    store::products::save_state(connection, &product).await?;
    let product = get(connection, id).await?;
    record(connection, backend, &product, step.event(), actor, reason).await?;
    Ok(product)
}

/// The calendar year (UTC) of a Unix time in milliseconds.
fn year_of(unix_ms: i64) -> i32 {
    DateTime::<Utc>::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .year()
}

/// A new version of a registered, published or suspended product.
///
/// # Errors
/// Invalid fields, or a product not yet registered (edit the draft instead).
pub async fn revise(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    id: &str,
    spec: ProductSpec,
    reason: &str,
) -> Result<Product> {
    validate_spec(&spec)?;
    check_text("reason", reason, 2000, true)?;
    let product = get(connection, id).await?;
    check_location_is_free(
        connection,
        backend,
        &product.provider_organization_id,
        id,
        &spec.storage_location,
    )
    .await?;
    if !matches!(
        product.state,
        ProductState::Registered | ProductState::Published | ProductState::Suspended
    ) {
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} is {}; only a registered product gets new versions",
            product.state.name()
        )));
    }
    no_revision_pending(&product)?;
    let current = product.spec;
    if needs_review(&current, &spec) {
        store::products::set_pending_revision(connection, id, Some(&spec)).await?;
        let product = get(connection, id).await?;
        record(
            connection,
            backend,
            &product,
            "revision_submitted",
            actor,
            reason,
        )
        .await?;
        return Ok(product);
    }
    // Quality is measured from the data at review, never declared.
    let mut spec = spec;
    spec.quality = current.quality;
    store::products::save_new_version(connection, id, product.version + 1, &spec).await?;
    let product = get(connection, id).await?;
    record(connection, backend, &product, "changed", actor, reason).await?;
    Ok(product)
}

/// Refuses a change to a product whose pending revision was written
/// against what it is now: the review would judge a stale picture.
fn no_revision_pending(product: &Product) -> Result<()> {
    if product.pending_revision.is_some() {
        return Err(MarketError::FailedPrecondition(format!(
            "product {} has a revision waiting for review; it must be approved or rejected first",
            product.id
        )));
    }
    Ok(())
}

/// Whether a revision changes what the product serves, where, or to whom
/// under which rules: where its files are, which data centers (of which
/// tier, in which region) hold them, which tables and columns with which
/// sensitivity, and the output policy. Those go through review like the
/// first registration; descriptions and prices do not.
fn needs_review(current: &ProductSpec, revised: &ProductSpec) -> bool {
    current.storage_location != revised.storage_location
        || current.hosting_data_centers != revised.hosting_data_centers
        || current.tier != revised.tier
        || current.region != revised.region
        || current.tables != revised.tables
        || current.output_policy != revised.output_policy
}

/// Approves or rejects a product's pending revision. Approved, it becomes
/// the next version with `quality` (measured from its data); rejected, it
/// is dropped and the reason recorded.
///
/// # Errors
/// `FailedPrecondition` when no revision is pending; `InvalidArgument` for
/// a rejection without a reason.
pub async fn decide_revision(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    id: &str,
    quality: Option<QualityMetrics>,
    reason: &str,
) -> Result<Product> {
    check_text("reason", reason, 2000, quality.is_none())?;
    let product = get(connection, id).await?;
    let Some(mut revised) = product.pending_revision.clone() else {
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} has no revision waiting for review"
        )));
    };
    store::products::set_pending_revision(connection, id, None).await?;
    let Some(quality) = quality else {
        let product = get(connection, id).await?;
        record(
            connection,
            backend,
            &product,
            "revision_rejected",
            actor,
            reason,
        )
        .await?;
        return Ok(product);
    };
    // Another provider may have claimed the folder while it waited.
    check_location_is_free(
        connection,
        backend,
        &product.provider_organization_id,
        id,
        &revised.storage_location,
    )
    .await?;
    revised.quality = Some(quality);
    store::products::save_new_version(connection, id, product.version + 1, &revised).await?;
    let product = get(connection, id).await?;
    record(connection, backend, &product, "changed", actor, reason).await?;
    Ok(product)
}

/// Moves a product to another provider.
///
/// # Errors
/// A retired product, or the same provider.
pub async fn transfer(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    id: &str,
    to: &str,
    reason: &str,
) -> Result<Product> {
    check_text("reason", reason, 2000, true)?;
    let product = get(connection, id).await?;
    let from = product.provider_organization_id.clone();
    if product.state == ProductState::Retired {
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} is retired"
        )));
    }
    if product.provider_organization_id == to {
        return Err(MarketError::invalid(
            "to_organization_id",
            "the product already belongs to it",
        ));
    }
    no_revision_pending(&product)?;
    // The old provider's other products may share its folder; after the
    // transfer they would read the new provider's files.
    check_location_is_free(connection, backend, to, id, &product.spec.storage_location).await?;
    store::products::move_to_provider(connection, id, to).await?;
    let product = get(connection, id).await?;
    record(
        connection,
        backend,
        &product,
        "transferred",
        actor,
        &format!("{reason} (from {from})"),
    )
    .await?;
    Ok(product)
}

/// Published products matching every filter given.
///
/// # Errors
/// Database failures.
pub async fn search(
    connection: &mut AnyConnection,
    filter: &CatalogFilter,
) -> Result<Vec<Product>> {
    let max_sensitivity = match filter.max_sensitivity {
        Sensitivity::Unspecified => i64::from(Sensitivity::Blocked as i32),
        other => i64::from(other as i32),
    };
    let keywords: Vec<String> = filter.keywords.iter().map(|k| k.to_lowercase()).collect();
    let mut products = store::products::published(
        connection,
        &filter.tier,
        &filter.region,
        &filter.provider_organization_id,
        max_sensitivity,
        &keywords,
    )
    .await?;
    // The catalog shows what serves; a revision under review is the
    // provider's and the reviewers' business.
    for product in &mut products {
        product.pending_revision = None;
    }
    Ok(products)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::{Column, OutputPolicy, PriceKind, PricePlan, Sensitivity, Table};

    pub(crate) fn sample_spec() -> ProductSpec {
        ProductSpec {
            title: "Population by district".into(),
            description: "Residents per district and age band".into(),
            keywords: vec!["population".into()],
            licence: "CC-BY-4.0".into(),
            update_frequency: "monthly".into(),
            hosting_data_centers: vec!["municipal-core".into()],
            tier: "municipal".into(),
            region: "city".into(),
            storage_location: "products/population".into(),
            tables: vec![Table {
                name: "residents".into(),
                columns: vec![
                    Column {
                        name: "district".into(),
                        r#type: "utf8".into(),
                        sensitivity: Sensitivity::Public as i32,
                        description: String::new(),
                    },
                    Column {
                        name: "person_id".into(),
                        r#type: "int64".into(),
                        sensitivity: Sensitivity::Blocked as i32,
                        description: String::new(),
                    },
                ],
            }],
            output_policy: Some(OutputPolicy {
                min_aggregation_count: 10,
                privacy_unit_column: "person_id".into(),
                ..Default::default()
            }),
            price_plans: vec![PricePlan {
                id: "basic".into(),
                kind: PriceKind::PerQuery as i32,
                unit_price_minor: 100,
                currency: "EUR".into(),
                ..Default::default()
            }],
            quality: None,
            version_retention_days: 0,
            quality_minimums: None,
            refresh_minutes: 0,
        }
    }

    /// Each field that says what a product serves, where or under which
    /// rules sends a revision to review on its own; wording and prices do
    /// not.
    #[test]
    fn each_served_field_sends_a_revision_to_review() {
        type Change = Box<dyn Fn(&mut ProductSpec)>;
        let reviewed: Vec<(&str, Change)> = vec![
            (
                "storage",
                Box::new(|s| s.storage_location = "products/moved".into()),
            ),
            (
                "data centers",
                Box::new(|s| s.hosting_data_centers = vec!["partner-cloud".into()]),
            ),
            ("tier", Box::new(|s| s.tier = "partner".into())),
            ("region", Box::new(|s| s.region = "elsewhere".into())),
            (
                "tables",
                Box::new(|s| {
                    s.tables[0].columns.pop();
                }),
            ),
            (
                "policy",
                Box::new(|s| {
                    if let Some(policy) = s.output_policy.as_mut() {
                        policy.min_aggregation_count = 2;
                    }
                }),
            ),
        ];
        for (field, change) in reviewed {
            let mut revised = sample_spec();
            change(&mut revised);
            assert_ne!(revised, sample_spec(), "{field} changes the spec");
            assert!(needs_review(&sample_spec(), &revised), "{field}");
        }
        let mut worded = sample_spec();
        worded.description = "Residents per district".into();
        worded.price_plans[0].unit_price_minor += 1;
        assert!(!needs_review(&sample_spec(), &worded));
    }

    #[test]
    fn registration_years_follow_the_calendar() {
        assert_eq!(year_of(0), 1970);
        assert_eq!(year_of(20_786 * 86_400_000), 2026); // 2026-11-29
        assert_eq!(year_of(20_819 * 86_400_000 - 1), 2026); // 2026-12-31T23:59:59.999
        assert_eq!(year_of(20_819 * 86_400_000), 2027); // 2027-01-01
    }
}
