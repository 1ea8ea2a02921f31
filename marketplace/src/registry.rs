//! The data-product registry and its registration lifecycle:
//! draft → submitted → under public notice → registered (number, approver,
//! time) → published → suspended or retired. Changes (new versions) and
//! transfers are registration events too. Every event is written with its audit
//! entry in one transaction.

use prost::Message as _;
use sha2::{Digest as _, Sha256};
use sqlx::{AnyConnection, Row as _};

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result, check_text};
use crate::identity::validate_slug;
use crate::proto::{
    Column, PriceKind, PricePlan, Product, ProductSpec, ProductState, QualityMetrics,
    RegistrationEvent, SearchCatalogRequest, Sensitivity,
};
use crate::store::{Backend, now_ms};

const KNOWN_TIERS: &[&str] = &["municipal", "edge", "partner"];
const KNOWN_TYPES: &[&str] = &[
    "boolean",
    "int32",
    "int64",
    "float64",
    "utf8",
    "date32",
    "timestamp",
];

/// The stored name of a state.
#[must_use]
pub fn state_name(state: ProductState) -> &'static str {
    match state {
        ProductState::Unspecified => "unspecified",
        ProductState::Draft => "draft",
        ProductState::Submitted => "submitted",
        ProductState::UnderPublicNotice => "under_public_notice",
        ProductState::Registered => "registered",
        ProductState::Published => "published",
        ProductState::Suspended => "suspended",
        ProductState::Retired => "retired",
    }
}

fn parse_state(name: &str) -> Result<ProductState> {
    Ok(match name {
        "draft" => ProductState::Draft,
        "submitted" => ProductState::Submitted,
        "under_public_notice" => ProductState::UnderPublicNotice,
        "registered" => ProductState::Registered,
        "published" => ProductState::Published,
        "suspended" => ProductState::Suspended,
        "retired" => ProductState::Retired,
        other => return Err(MarketError::Corrupt(format!("product state {other:?}"))),
    })
}

fn valid_type(name: &str) -> bool {
    if KNOWN_TYPES.contains(&name) {
        return true;
    }
    // decimal(p,s) with 1 <= p <= 38 and 0 <= s <= p.
    name.strip_prefix("decimal(")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|inner| inner.split_once(','))
        .and_then(|(p, s)| Some((p.trim().parse::<u32>().ok()?, s.trim().parse::<u32>().ok()?)))
        .is_some_and(|(p, s)| (1..=38).contains(&p) && s <= p)
}

/// Checks a product spec; the error names the first bad field.
///
/// # Errors
/// `InvalidArgument` with the field path, e.g. `spec.tables[0].columns[2].type`.
pub fn validate_spec(spec: &ProductSpec) -> Result<()> {
    validate_description(spec)?;
    let columns = validate_tables(spec)?;
    validate_policy(spec, &columns)?;
    validate_price_plans(spec)?;
    validate_quality(spec)?;
    validate_against_withholding(spec)
}

/// The product's words and where it lives: title, description, licence,
/// update frequency, storage location, region, tier, keywords and the data
/// centers that host it.
fn validate_description(spec: &ProductSpec) -> Result<()> {
    check_text("spec.title", &spec.title, 200, true)?;
    check_text("spec.description", &spec.description, 10_000, true)?;
    check_text("spec.licence", &spec.licence, 200, true)?;
    check_text("spec.update_frequency", &spec.update_frequency, 50, true)?;
    check_text("spec.storage_location", &spec.storage_location, 1000, true)?;
    crate::quality::check_location(&spec.storage_location)?;
    check_text("spec.region", &spec.region, 100, true)?;
    if !KNOWN_TIERS.contains(&spec.tier.as_str()) {
        return Err(MarketError::invalid(
            "spec.tier",
            format!("{:?} is not one of {}", spec.tier, KNOWN_TIERS.join(", ")),
        ));
    }
    for (i, keyword) in spec.keywords.iter().enumerate() {
        check_text(&format!("spec.keywords[{i}]"), keyword, 50, true)?;
    }
    if spec.hosting_data_centers.is_empty() {
        return Err(MarketError::invalid(
            "spec.hosting_data_centers",
            "name at least one data center that holds the data",
        ));
    }
    for (i, dc) in spec.hosting_data_centers.iter().enumerate() {
        validate_slug(&format!("spec.hosting_data_centers[{i}]"), dc)?;
    }
    Ok(())
}

/// Tables and their columns: names, types and sensitivity. Returns every
/// column, for the policy's checks.
fn validate_tables(spec: &ProductSpec) -> Result<Vec<&Column>> {
    if spec.tables.is_empty() {
        return Err(MarketError::invalid(
            "spec.tables",
            "a product has at least one table",
        ));
    }
    let mut all_columns = Vec::new();
    for (t, table) in spec.tables.iter().enumerate() {
        let field = format!("spec.tables[{t}]");
        check_identifier(&format!("{field}.name"), &table.name)?;
        if spec.tables[..t]
            .iter()
            .any(|other| other.name == table.name)
        {
            return Err(MarketError::invalid(
                format!("{field}.name"),
                format!("table {:?} is listed twice", table.name),
            ));
        }
        if table.columns.is_empty() {
            return Err(MarketError::invalid(
                format!("{field}.columns"),
                "a table has at least one column",
            ));
        }
        for (c, column) in table.columns.iter().enumerate() {
            let field = format!("{field}.columns[{c}]");
            check_identifier(&format!("{field}.name"), &column.name)?;
            if table.columns[..c]
                .iter()
                .any(|other| other.name == column.name)
            {
                return Err(MarketError::invalid(
                    format!("{field}.name"),
                    format!("column {:?} is listed twice", column.name),
                ));
            }
            if !valid_type(&column.r#type) {
                return Err(MarketError::invalid(
                    format!("{field}.type"),
                    format!(
                        "{:?} is not one of {}, decimal(p,s)",
                        column.r#type,
                        KNOWN_TYPES.join(", ")
                    ),
                ));
            }
            if column.sensitivity() == Sensitivity::Unspecified {
                return Err(MarketError::invalid(
                    format!("{field}.sensitivity"),
                    "set public, internal, sensitive or blocked",
                ));
            }
            all_columns.push(column);
        }
    }
    Ok(all_columns)
}

/// The output policy against the declared columns: thresholds, limits,
/// differential privacy, the privacy unit, list, join and aggregate
/// columns, scalar functions and approved algorithms.
fn validate_policy(spec: &ProductSpec, all_columns: &[&Column]) -> Result<()> {
    let policy = spec
        .output_policy
        .as_ref()
        .ok_or_else(|| MarketError::invalid("spec.output_policy", "is required"))?;
    if policy.min_aggregation_count < 1 {
        return Err(MarketError::invalid(
            "spec.output_policy.min_aggregation_count",
            "must be at least 1",
        ));
    }
    if policy.max_list_rows < 0 || policy.max_result_bytes < 0 {
        return Err(MarketError::invalid(
            "spec.output_policy.max_list_rows",
            "must not be negative",
        ));
    }
    if !(policy.dp_epsilon_budget >= 0.0 && policy.dp_epsilon_budget.is_finite()) {
        return Err(MarketError::invalid(
            "spec.output_policy.dp_epsilon_budget",
            "must be a finite number ≥ 0",
        ));
    }
    let find_column = |name: &str| all_columns.iter().find(|column| column.name == name);
    if policy.dp_epsilon_budget > 0.0 {
        if !(policy.dp_epsilon_per_query > 0.0
            && policy.dp_epsilon_per_query <= policy.dp_epsilon_budget)
        {
            return Err(MarketError::invalid(
                "spec.output_policy.dp_epsilon_per_query",
                "with a privacy budget, each query spends more than 0 and at most the budget",
            ));
        }
        if policy.dp_max_rows_per_unit == 0 {
            return Err(MarketError::invalid(
                "spec.output_policy.dp_max_rows_per_unit",
                "with a privacy budget, at least 1 (rows one privacy unit may have)",
            ));
        }
        for (column, bounds) in &policy.dp_bounds {
            let field = format!("spec.output_policy.dp_bounds[{column:?}]");
            if find_column(column).is_none() {
                return Err(MarketError::invalid(field, format!("no column {column:?}")));
            }
            if !(bounds.lower.is_finite()
                && bounds.upper.is_finite()
                && bounds.lower <= bounds.upper)
            {
                return Err(MarketError::invalid(field, "finite, with lower <= upper"));
            }
        }
    }
    if !policy.privacy_unit_column.is_empty() && find_column(&policy.privacy_unit_column).is_none()
    {
        return Err(MarketError::invalid(
            "spec.output_policy.privacy_unit_column",
            format!("no column {:?}", policy.privacy_unit_column),
        ));
    }
    for (i, name) in policy.list_columns.iter().enumerate() {
        let field = format!("spec.output_policy.list_columns[{i}]");
        let column = find_column(name)
            .ok_or_else(|| MarketError::invalid(&field, format!("no column {name:?}")))?;
        if column.sensitivity() == Sensitivity::Blocked {
            return Err(MarketError::invalid(
                field,
                format!("column {name:?} is blocked and can never be listed"),
            ));
        }
    }
    for (i, name) in policy.join_columns.iter().enumerate() {
        let field = format!("spec.output_policy.join_columns[{i}]");
        if policy.dp_epsilon_budget > 0.0 {
            // A join can repeat a person's rows beyond what the noise hides.
            return Err(MarketError::invalid(
                field,
                "a product that adds noise allows no joins",
            ));
        }
        let column = find_column(name)
            .ok_or_else(|| MarketError::invalid(&field, format!("no column {name:?}")))?;
        if column.sensitivity() != Sensitivity::Public {
            return Err(MarketError::invalid(
                field,
                format!(
                    "column {name:?} is not public; only public columns may match rows in a join"
                ),
            ));
        }
    }
    for (name, declared) in &policy.column_functions {
        let field = format!("spec.output_policy.column_functions[{name:?}]");
        let column = find_column(name)
            .ok_or_else(|| MarketError::invalid(&field, format!("no column {name:?}")))?;
        if column.sensitivity() == Sensitivity::Blocked {
            return Err(MarketError::invalid(
                field,
                format!("column {name:?} is blocked and cannot be aggregated"),
            ));
        }
        for function in &declared.functions {
            if !civicgrid_sandbox::policy::DECLARABLE_AGGREGATES
                .contains(&function.to_ascii_lowercase().as_str())
            {
                return Err(MarketError::invalid(
                    field,
                    format!(
                        "{function:?} cannot be declared; declarable: {}",
                        civicgrid_sandbox::policy::DECLARABLE_AGGREGATES.join(", ")
                    ),
                ));
            }
        }
    }
    for (i, function) in policy.scalar_functions.iter().enumerate() {
        if function.is_empty()
            || !function
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(MarketError::invalid(
                format!("spec.output_policy.scalar_functions[{i}]"),
                "a function's name: letters, digits and _",
            ));
        }
    }
    for (i, hash) in policy.approved_algorithm_sha256.iter().enumerate() {
        if hash.len() != 64
            || !hash
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(MarketError::invalid(
                format!("spec.output_policy.approved_algorithm_sha256[{i}]"),
                "must be 64 lower-case hex digits",
            ));
        }
    }
    Ok(())
}

/// At least one price plan, each valid, no id twice.
fn validate_price_plans(spec: &ProductSpec) -> Result<()> {
    if spec.price_plans.is_empty() {
        return Err(MarketError::invalid(
            "spec.price_plans",
            "a product has at least one price plan",
        ));
    }
    for (i, plan) in spec.price_plans.iter().enumerate() {
        validate_plan(&format!("spec.price_plans[{i}]"), plan)?;
        if spec.price_plans[..i]
            .iter()
            .any(|other| other.id == plan.id)
        {
            return Err(MarketError::invalid(
                format!("spec.price_plans[{i}].id"),
                format!("plan {:?} is listed twice", plan.id),
            ));
        }
    }
    Ok(())
}

/// Declared quality figures, where given, within their ranges.
fn validate_quality(spec: &ProductSpec) -> Result<()> {
    if let Some(quality) = &spec.quality {
        for (name, value) in [
            ("completeness", quality.completeness),
            ("validity", quality.validity),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(MarketError::invalid(
                    format!("spec.quality.{name}"),
                    "must be between 0 and 1",
                ));
            }
        }
        if quality.freshness_seconds < 0 {
            return Err(MarketError::invalid(
                "spec.quality.freshness_seconds",
                "must not be negative",
            ));
        }
    }
    Ok(())
}

/// What a product that withholds rows may not offer: a price by compute,
/// or functions that make a kept row as costly as a query likes.
fn validate_against_withholding(spec: &ProductSpec) -> Result<()> {
    // A query's compute grows with the rows its filter keeps, withheld ones
    // too: priced by compute, its bill would count them.
    if let Some(i) = spec
        .price_plans
        .iter()
        .position(|plan| plan.kind() == PriceKind::PerComputeUnit)
        && crate::policy::withholds_rows(spec)
    {
        return Err(MarketError::invalid(
            format!("spec.price_plans[{i}].kind"),
            "a product whose output policy withholds rows (a threshold, noise, a row limit on \
             list queries or blocked columns) cannot be priced by compute: a query's compute \
             grows with the rows it filters, withheld ones too, so its bill would count them; \
             price it per query, per released row or by subscription",
        ));
    }
    if let Some((i, function)) = spec.output_policy.as_ref().and_then(|policy| {
        policy
            .scalar_functions
            .iter()
            .enumerate()
            .find(|(_, f)| GROWING_FUNCTIONS.contains(&f.to_ascii_lowercase().as_str()))
    }) && crate::policy::withholds_rows(spec)
    {
        return Err(MarketError::invalid(
            format!("spec.output_policy.scalar_functions[{i}]"),
            format!(
                "{function} can return a string far longer than its arguments, so a query could \
                 make each row it keeps as costly as it likes, and its running time would count \
                 withheld rows; it cannot be declared on a product that withholds rows"
            ),
        ));
    }
    Ok(())
}

/// Scalar functions whose result can be far longer than their arguments.
const GROWING_FUNCTIONS: &[&str] = &[
    "lpad",
    "overlay",
    "regexp_replace",
    "repeat",
    "replace",
    "rpad",
    "translate",
];

fn check_identifier(field: &str, name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(MarketError::invalid(
            field,
            format!(
                "{name:?} must be 1 to 63 characters of a-z, 0-9 and '_', not starting with a digit"
            ),
        ))
    }
}

fn validate_plan(field: &str, plan: &PricePlan) -> Result<()> {
    validate_slug(&format!("{field}.id"), &plan.id)?;
    let kind = plan.kind();
    if kind == PriceKind::Unspecified {
        return Err(MarketError::invalid(
            format!("{field}.kind"),
            "set free, per_query, per_compute_unit, per_row_released or subscription",
        ));
    }
    if plan.unit_price_minor < 0 || plan.monthly_fee_minor < 0 || plan.included_units < 0 {
        return Err(MarketError::invalid(
            format!("{field}.unit_price_minor"),
            "prices and quotas must not be negative",
        ));
    }
    if kind != PriceKind::Free
        && (plan.currency.len() != 3 || !plan.currency.chars().all(|c| c.is_ascii_uppercase()))
    {
        return Err(MarketError::invalid(
            format!("{field}.currency"),
            "an ISO 4217 code such as EUR or CNY",
        ));
    }
    Ok(())
}

fn max_sensitivity(spec: &ProductSpec) -> i32 {
    spec.tables
        .iter()
        .flat_map(|table| &table.columns)
        .map(|column: &Column| column.sensitivity)
        .max()
        .unwrap_or(0)
}

fn search_text(spec: &ProductSpec) -> String {
    format!(
        "{} {} {}",
        spec.title,
        spec.description,
        spec.keywords.join(" ")
    )
    .to_lowercase()
}

fn spec_digest(spec: &ProductSpec) -> String {
    Sha256::digest(spec.encode_to_vec())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const PRODUCT_COLUMNS: &str = "id, provider_organization_id, version, state, spec, registration_number, \
     approved_by, registered_at, public_notice_ends_at, updated_at, pending_spec";

fn product_from_row(row: &sqlx::any::AnyRow) -> Result<Product> {
    let spec: Vec<u8> = row.try_get("spec")?;
    let spec = ProductSpec::decode(spec.as_slice())
        .map_err(|error| MarketError::Corrupt(format!("stored product spec: {error}")))?;
    Ok(Product {
        id: row.try_get("id")?,
        provider_organization_id: row.try_get("provider_organization_id")?,
        version: row.try_get("version")?,
        state: parse_state(&row.try_get::<String, _>("state")?)? as i32,
        spec: Some(spec),
        registration_number: row
            .try_get::<Option<String>, _>("registration_number")?
            .unwrap_or_default(),
        approved_by_user_id: row
            .try_get::<Option<String>, _>("approved_by")?
            .unwrap_or_default(),
        registered_at_unix_ms: row
            .try_get::<Option<i64>, _>("registered_at")?
            .unwrap_or_default(),
        public_notice_ends_at_unix_ms: row
            .try_get::<Option<i64>, _>("public_notice_ends_at")?
            .unwrap_or_default(),
        updated_at_unix_ms: row.try_get("updated_at")?,
        pending_revision: row
            .try_get::<Option<Vec<u8>>, _>("pending_spec")?
            .map(|bytes| {
                ProductSpec::decode(bytes.as_slice()).map_err(|error| {
                    MarketError::Corrupt(format!("stored pending revision: {error}"))
                })
            })
            .transpose()?,
    })
}

/// A product by id.
///
/// # Errors
/// `NotFound`.
pub async fn get(connection: &mut AnyConnection, id: &str) -> Result<Product> {
    Ok(get_as_stored(connection, id).await?.0)
}

/// A product by id, with its spec's bytes as stored: a later statement can
/// compare those to see that the product has not changed since it was read
/// (re-encoding the decoded spec need not give the same bytes).
///
/// # Errors
/// `NotFound`.
pub async fn get_as_stored(connection: &mut AnyConnection, id: &str) -> Result<(Product, Vec<u8>)> {
    let sql = format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_owned())
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| MarketError::NotFound {
            what: "product",
            id: id.to_owned(),
        })?;
    Ok((product_from_row(&row)?, row.try_get("spec")?))
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
        "state": state_name(product.state()),
        "provider": product.provider_organization_id,
        "registration_number": product.registration_number,
        "spec_sha256": product.spec.as_ref().map(spec_digest).unwrap_or_default(),
        "quality": product.spec.as_ref().and_then(|spec| spec.quality.as_ref()).map(|q| serde_json::json!({
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
    let seq: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM registration_events WHERE product_id = $1")
            .bind(product.id.clone())
            .fetch_one(&mut *connection)
            .await?
            .try_get("n")?;
    sqlx::query(
        "INSERT INTO registration_events (product_id, seq, kind, actor, reason, version, at, audit_index) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(product.id.clone())
    .bind(seq)
    .bind(kind.to_owned())
    .bind(actor.to_owned())
    .bind(reason.to_owned())
    .bind(product.version)
    .bind(now_ms())
    .bind(index as i64)
    .execute(&mut *connection)
    .await?;
    Ok(())
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
    let exists = sqlx::query("SELECT id FROM products WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&mut *connection)
        .await?;
    if exists.is_some() {
        return Err(MarketError::AlreadyExists {
            what: "product",
            id: id.to_owned(),
        });
    }
    let now = now_ms();
    sqlx::query(
        "INSERT INTO products (id, provider_organization_id, version, state, spec, tier, region, search_text, \
         max_sensitivity, created_at, updated_at) VALUES ($1, $2, 1, 'draft', $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(id.to_owned())
    .bind(provider.to_owned())
    .bind(spec.encode_to_vec())
    .bind(spec.tier.clone())
    .bind(spec.region.clone())
    .bind(search_text(&spec))
    .bind(i64::from(max_sensitivity(&spec)))
    .bind(now)
    .execute(&mut *connection)
    .await?;
    save_version(connection, id, 1, &spec).await?;
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
    if backend == Backend::Postgres {
        // Two providers' concurrent claims would each miss the other's row
        // under READ COMMITTED; claims are rare, so they take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(4104)")
            .execute(&mut *connection)
            .await?;
    }
    let rows = sqlx::query(
        "SELECT spec, pending_spec FROM products WHERE provider_organization_id <> $1 AND id <> $2",
    )
    .bind(provider.to_owned())
    .bind(id.to_owned())
    .fetch_all(&mut *connection)
    .await?;
    for row in rows {
        let current: Vec<u8> = row.try_get("spec")?;
        let pending: Option<Vec<u8>> = row.try_get("pending_spec")?;
        for bytes in std::iter::once(current).chain(pending) {
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
    }
    Ok(())
}

async fn save_version(
    connection: &mut AnyConnection,
    id: &str,
    version: i64,
    spec: &ProductSpec,
) -> Result<()> {
    sqlx::query("INSERT INTO product_versions (product_id, version, spec, created_at) VALUES ($1, $2, $3, $4)")
        .bind(id.to_owned())
        .bind(version)
        .bind(spec.encode_to_vec())
        .bind(now_ms())
        .execute(&mut *connection)
        .await?;
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
    let mut spec = product.spec.unwrap_or_default();
    spec.quality = Some(quality);
    sqlx::query("UPDATE products SET spec = $1 WHERE id = $2")
        .bind(spec.encode_to_vec())
        .bind(id.to_owned())
        .execute(&mut *connection)
        .await?;
    sqlx::query("UPDATE product_versions SET spec = $1 WHERE product_id = $2 AND version = $3")
        .bind(spec.encode_to_vec())
        .bind(id.to_owned())
        .bind(product.version)
        .execute(&mut *connection)
        .await?;
    Ok(())
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
    let current = product.state();
    if !step.allowed_from().contains(&current) {
        let allowed: Vec<&str> = step.allowed_from().iter().map(|s| state_name(*s)).collect();
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} is {}; this step applies only when it is {}",
            state_name(current),
            allowed.join(" or ")
        )));
    }
    let now = now_ms();
    let next = match &step {
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
            product.registration_number = next_registration_number(connection).await?;
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
    product.state = next as i32;
    sqlx::query(
        "UPDATE products SET state = $1, registration_number = $2, approved_by = $3, registered_at = $4, \
         public_notice_ends_at = $5, updated_at = $6 WHERE id = $7",
    )
    .bind(state_name(next))
    .bind(Some(product.registration_number.clone()).filter(|n| !n.is_empty()))
    .bind(Some(product.approved_by_user_id.clone()).filter(|n| !n.is_empty()))
    .bind(Some(product.registered_at_unix_ms).filter(|t| *t != 0))
    .bind(Some(product.public_notice_ends_at_unix_ms).filter(|t| *t != 0))
    .bind(now)
    .bind(id.to_owned())
    .execute(&mut *connection)
    .await?;
    let product = get(connection, id).await?;
    record(connection, backend, &product, step.event(), actor, reason).await?;
    Ok(product)
}

async fn next_registration_number(connection: &mut AnyConnection) -> Result<String> {
    let year = civil_year(now_ms().div_euclid(86_400_000));
    let counter = format!("registration-{year}");
    sqlx::query("INSERT INTO counters (name, value) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(counter.clone())
        .execute(&mut *connection)
        .await?;
    let value: i64 =
        sqlx::query("UPDATE counters SET value = value + 1 WHERE name = $1 RETURNING value")
            .bind(counter)
            .fetch_one(&mut *connection)
            .await?
            .try_get("value")?;
    Ok(format!("CG-{year}-{value:06}"))
}

/// The proleptic Gregorian year of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_year(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(month <= 2)
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
        product.state(),
        ProductState::Registered | ProductState::Published | ProductState::Suspended
    ) {
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} is {}; only a registered product gets new versions",
            state_name(product.state())
        )));
    }
    no_revision_pending(&product)?;
    let current = product.spec.clone().unwrap_or_default();
    if needs_review(&current, &spec) {
        sqlx::query("UPDATE products SET pending_spec = $1, updated_at = $2 WHERE id = $3")
            .bind(spec.encode_to_vec())
            .bind(now_ms())
            .bind(id.to_owned())
            .execute(&mut *connection)
            .await?;
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
    apply_version(connection, id, product.version + 1, &spec).await?;
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
    quality: Option<crate::proto::QualityMetrics>,
    reason: &str,
) -> Result<Product> {
    check_text("reason", reason, 2000, quality.is_none())?;
    let product = get(connection, id).await?;
    let Some(mut revised) = product.pending_revision.clone() else {
        return Err(MarketError::FailedPrecondition(format!(
            "product {id} has no revision waiting for review"
        )));
    };
    sqlx::query("UPDATE products SET pending_spec = NULL, updated_at = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(id.to_owned())
        .execute(&mut *connection)
        .await?;
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
    apply_version(connection, id, product.version + 1, &revised).await?;
    let product = get(connection, id).await?;
    record(connection, backend, &product, "changed", actor, reason).await?;
    Ok(product)
}

/// Makes `spec` the product's version `version`.
async fn apply_version(
    connection: &mut AnyConnection,
    id: &str,
    version: i64,
    spec: &ProductSpec,
) -> Result<()> {
    sqlx::query(
        "UPDATE products SET version = $1, spec = $2, tier = $3, region = $4, search_text = $5, \
         max_sensitivity = $6, updated_at = $7 WHERE id = $8",
    )
    .bind(version)
    .bind(spec.encode_to_vec())
    .bind(spec.tier.clone())
    .bind(spec.region.clone())
    .bind(search_text(spec))
    .bind(i64::from(max_sensitivity(spec)))
    .bind(now_ms())
    .bind(id.to_owned())
    .execute(&mut *connection)
    .await?;
    save_version(connection, id, version, spec).await
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
    if product.state() == ProductState::Retired {
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
    let location = product
        .spec
        .as_ref()
        .map(|spec| spec.storage_location.clone());
    check_location_is_free(connection, backend, to, id, &location.unwrap_or_default()).await?;
    sqlx::query("UPDATE products SET provider_organization_id = $1, updated_at = $2 WHERE id = $3")
        .bind(to.to_owned())
        .bind(now_ms())
        .bind(id.to_owned())
        .execute(&mut *connection)
        .await?;
    // The product's contracts go with it: the new provider approves and
    // revokes them, and the old one no longer can.
    sqlx::query("UPDATE contracts SET provider_organization_id = $1 WHERE product_id = $2")
        .bind(to.to_owned())
        .bind(id.to_owned())
        .execute(&mut *connection)
        .await?;
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

/// A product's registration events, oldest first.
///
/// # Errors
/// Database failures.
pub async fn events(connection: &mut AnyConnection, id: &str) -> Result<Vec<RegistrationEvent>> {
    sqlx::query(
        "SELECT kind, actor, reason, version, at, audit_index FROM registration_events \
         WHERE product_id = $1 ORDER BY seq",
    )
    .bind(id.to_owned())
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|row| {
        Ok(RegistrationEvent {
            product_id: id.to_owned(),
            kind: row.try_get("kind")?,
            actor_user_id: row.try_get("actor")?,
            reason: row.try_get("reason")?,
            version: row.try_get("version")?,
            at_unix_ms: row.try_get("at")?,
            audit_index: row.try_get("audit_index")?,
        })
    })
    .collect()
}

/// Published products matching every filter given.
///
/// # Errors
/// Database failures.
pub async fn search(
    connection: &mut AnyConnection,
    request: &SearchCatalogRequest,
) -> Result<Vec<Product>> {
    let max_sensitivity = match request.max_sensitivity() {
        Sensitivity::Unspecified => i64::from(Sensitivity::Blocked as i32),
        other => i64::from(other as i32),
    };
    let sql = format!(
        "SELECT {PRODUCT_COLUMNS}, search_text FROM products WHERE state = 'published' \
         AND ($1 = '' OR tier = $1) AND ($2 = '' OR region = $2) \
         AND ($3 = '' OR provider_organization_id = $3) AND max_sensitivity <= $4 ORDER BY id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(request.tier.clone())
        .bind(request.region.clone())
        .bind(request.provider_organization_id.clone())
        .bind(max_sensitivity)
        .fetch_all(&mut *connection)
        .await?;
    let keywords: Vec<String> = request.keywords.iter().map(|k| k.to_lowercase()).collect();
    let mut products = Vec::new();
    for row in rows {
        let text: String = row.try_get("search_text")?;
        if keywords
            .iter()
            .all(|keyword| text.contains(keyword.as_str()))
        {
            // The catalog shows what serves; a revision under review is
            // the provider's and the reviewers' business.
            let mut product = product_from_row(&row)?;
            product.pending_revision = None;
            products.push(product);
        }
    }
    Ok(products)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::{OutputPolicy, Table};

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
    fn a_complete_spec_is_valid() {
        validate_spec(&sample_spec()).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Breaker = Box<dyn Fn(&mut ProductSpec)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("spec.title", Box::new(|s| s.title.clear())),
            ("spec.tier", Box::new(|s| s.tier = "orbital".into())),
            (
                "spec.output_policy.scalar_functions[1]",
                Box::new(|s| {
                    if let Some(policy) = s.output_policy.as_mut() {
                        policy.scalar_functions = vec!["upper".into(), "Repeat".into()];
                    }
                }),
            ),
            // Priced by compute under a threshold: the bill would count
            // the rows a query filtered, withheld ones too.
            (
                "spec.price_plans[0].kind",
                Box::new(|s| s.price_plans[0].kind = PriceKind::PerComputeUnit as i32),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "/srv/other-provider/population".into()),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "file:///srv/population".into()),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "products/../../etc".into()),
            ),
            (
                "spec.storage_location",
                Box::new(|s| s.storage_location = "./".into()),
            ),
            (
                "spec.hosting_data_centers",
                Box::new(|s| s.hosting_data_centers.clear()),
            ),
            ("spec.tables", Box::new(|s| s.tables.clear())),
            (
                "spec.tables[0].columns[1].type",
                Box::new(|s| s.tables[0].columns[1].r#type = "blob".into()),
            ),
            (
                "spec.tables[0].columns[0].sensitivity",
                Box::new(|s| s.tables[0].columns[0].sensitivity = 0),
            ),
            (
                "spec.tables[0].columns[1].name",
                Box::new(|s| s.tables[0].columns[1].name = "district".into()),
            ),
            (
                "spec.output_policy.min_aggregation_count",
                Box::new(|s| s.output_policy.as_mut().unwrap().min_aggregation_count = 0),
            ),
            (
                "spec.output_policy.list_columns[0]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().list_columns = vec!["person_id".into()]
                }),
            ),
            (
                "spec.output_policy.privacy_unit_column",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().privacy_unit_column = "nobody".into()
                }),
            ),
            (
                "spec.output_policy.join_columns[0]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().join_columns = vec!["person_id".into()]
                }),
            ),
            (
                "spec.output_policy.join_columns[0]",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 0.5;
                    policy.dp_max_rows_per_unit = 1;
                    policy.join_columns = vec!["district".into()];
                }),
            ),
            (
                "spec.output_policy.column_functions[\"district\"]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().column_functions.insert(
                        "district".into(),
                        crate::proto::AggregateFunctions {
                            functions: vec!["string_agg".into()],
                        },
                    );
                }),
            ),
            (
                "spec.output_policy.approved_algorithm_sha256[0]",
                Box::new(|s| {
                    s.output_policy.as_mut().unwrap().approved_algorithm_sha256 = vec!["abc".into()]
                }),
            ),
            (
                "spec.price_plans[0].currency",
                Box::new(|s| s.price_plans[0].currency = "euro".into()),
            ),
            (
                "spec.price_plans[0].kind",
                Box::new(|s| s.price_plans[0].kind = 0),
            ),
            (
                "spec.output_policy.dp_epsilon_per_query",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 2.0;
                    policy.dp_max_rows_per_unit = 1;
                }),
            ),
            (
                "spec.output_policy.dp_max_rows_per_unit",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 0.1;
                }),
            ),
            (
                "spec.output_policy.dp_bounds[\"income\"]",
                Box::new(|s| {
                    let policy = s.output_policy.as_mut().unwrap();
                    policy.dp_epsilon_budget = 1.0;
                    policy.dp_epsilon_per_query = 0.1;
                    policy.dp_max_rows_per_unit = 1;
                    policy.dp_bounds.insert(
                        "income".into(),
                        crate::proto::DpBounds {
                            lower: 0.0,
                            upper: 1.0,
                        },
                    );
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut spec = sample_spec();
            break_it(&mut spec);
            match validate_spec(&spec) {
                Err(MarketError::InvalidArgument { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn registration_years_follow_the_calendar() {
        assert_eq!(civil_year(0), 1970);
        assert_eq!(civil_year(20_786), 2026); // 2026-11-29
        assert_eq!(civil_year(20_818), 2026); // 2026-12-31
        assert_eq!(civil_year(20_819), 2027); // 2027-01-01
    }

    #[test]
    fn decimal_types_are_checked() {
        assert!(valid_type("decimal(12,2)"));
        assert!(!valid_type("decimal(2,12)"));
        assert!(!valid_type("decimal(x)"));
    }
}
