//! The `products` table with its versions, registration events and the
//! yearly registration counter.

use prost::Message as _;
use sqlx::{AnyConnection, Row as _};

use crate::error::{MarketError, Result};
use crate::registry::model::{
    Product, ProductState, RegistrationEvent, max_sensitivity, search_text,
};
use crate::spec::ProductSpec;
use crate::store::{Backend, now_ms};

const PRODUCT_COLUMNS: &str = "id, provider_organization_id, version, state, spec, registration_number, \
     approved_by, registered_at, public_notice_ends_at, updated_at, pending_spec, data_version";

fn product_from_row(row: &sqlx::any::AnyRow) -> Result<Product> {
    let spec: Vec<u8> = row.try_get("spec")?;
    let spec = ProductSpec::decode(spec.as_slice())
        .map_err(|error| MarketError::Corrupt(format!("stored product spec: {error}")))?;
    Ok(Product {
        id: row.try_get("id")?,
        provider_organization_id: row.try_get("provider_organization_id")?,
        version: row.try_get("version")?,
        state: ProductState::parse(&row.try_get::<String, _>("state")?)?,
        spec,
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
        data_version: row.try_get("data_version")?,
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

/// A product by id, with its spec's bytes as stored: a later statement can
/// compare those to see that the product has not changed since it was read
/// (re-encoding the decoded spec need not give the same bytes).
///
/// # Errors
/// `NotFound`.
pub async fn get_as_stored(connection: &mut AnyConnection, id: &str) -> Result<(Product, Vec<u8>)> {
    let sql = format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| MarketError::NotFound {
            what: "product",
            id: id.to_owned(),
        })?;
    Ok((product_from_row(&row)?, row.try_get("spec")?))
}

/// Whether a product with this id exists.
pub(crate) async fn exists(connection: &mut AnyConnection, id: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT id FROM products WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .is_some())
}

/// Stores a new draft at version 1.
pub(crate) async fn insert_draft(
    connection: &mut AnyConnection,
    id: &str,
    provider: &str,
    spec: &ProductSpec,
) -> Result<()> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO products (id, provider_organization_id, version, state, spec, tier, region, search_text, \
         max_sensitivity, created_at, updated_at) VALUES ($1, $2, 1, 'draft', $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(id)
    .bind(provider)
    .bind(spec.encode_to_vec())
    .bind(&spec.tier)
    .bind(&spec.region)
    .bind(search_text(spec))
    .bind(i64::from(max_sensitivity(spec)))
    .bind(now)
    .execute(&mut *connection)
    .await?;
    save_version(connection, id, 1, spec).await
}

/// The serving and pending specs of every product not `id` and not
/// `provider`'s. On PostgreSQL it first takes the lock that makes
/// concurrent claims on a folder take turns (under READ COMMITTED each
/// would otherwise miss the other's row).
pub(crate) async fn other_providers_specs(
    connection: &mut AnyConnection,
    backend: Backend,
    provider: &str,
    id: &str,
) -> Result<Vec<Vec<u8>>> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(4104)")
            .execute(&mut *connection)
            .await?;
    }
    let rows = sqlx::query(
        "SELECT spec, pending_spec FROM products WHERE provider_organization_id <> $1 AND id <> $2",
    )
    .bind(provider)
    .bind(id)
    .fetch_all(&mut *connection)
    .await?;
    let mut specs = Vec::with_capacity(rows.len());
    for row in rows {
        specs.push(row.try_get("spec")?);
        if let Some(pending) = row.try_get::<Option<Vec<u8>>, _>("pending_spec")? {
            specs.push(pending);
        }
    }
    Ok(specs)
}

/// The ids and serving specs of `provider`'s products.
pub(crate) async fn provider_specs(
    connection: &mut AnyConnection,
    provider: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    sqlx::query("SELECT id, spec FROM products WHERE provider_organization_id = $1")
        .bind(provider)
        .fetch_all(&mut *connection)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("spec")?)))
        .collect()
}

async fn save_version(
    connection: &mut AnyConnection,
    id: &str,
    version: i64,
    spec: &ProductSpec,
) -> Result<()> {
    sqlx::query("INSERT INTO product_versions (product_id, version, spec, created_at) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(version)
        .bind(spec.encode_to_vec())
        .bind(now_ms())
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Rewrites the spec of the product's current version in place (a draft's
/// measured quality).
pub(crate) async fn rewrite_current_spec(
    connection: &mut AnyConnection,
    id: &str,
    version: i64,
    spec: &ProductSpec,
) -> Result<()> {
    sqlx::query("UPDATE products SET spec = $1 WHERE id = $2")
        .bind(spec.encode_to_vec())
        .bind(id)
        .execute(&mut *connection)
        .await?;
    sqlx::query("UPDATE product_versions SET spec = $1 WHERE product_id = $2 AND version = $3")
        .bind(spec.encode_to_vec())
        .bind(id)
        .bind(version)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Writes a product's state and registration record.
pub(crate) async fn save_state(connection: &mut AnyConnection, product: &Product) -> Result<()> {
    sqlx::query(
        "UPDATE products SET state = $1, registration_number = $2, approved_by = $3, registered_at = $4, \
         public_notice_ends_at = $5, updated_at = $6 WHERE id = $7",
    )
    .bind(product.state.name())
    .bind(Some(product.registration_number.clone()).filter(|n| !n.is_empty()))
    .bind(Some(product.approved_by_user_id.clone()).filter(|n| !n.is_empty()))
    .bind(Some(product.registered_at_unix_ms).filter(|t| *t != 0))
    .bind(Some(product.public_notice_ends_at_unix_ms).filter(|t| *t != 0))
    .bind(now_ms())
    .bind(&product.id)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The next registration number of `year`: "CG-<year>-<sequence>".
pub(crate) async fn next_registration_number(
    connection: &mut AnyConnection,
    year: i32,
) -> Result<String> {
    let counter = format!("registration-{year}");
    sqlx::query("INSERT INTO counters (name, value) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(&counter)
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

/// Sets (or, with `None`, drops) the revision waiting for review.
pub(crate) async fn set_pending_revision(
    connection: &mut AnyConnection,
    id: &str,
    revision: Option<&ProductSpec>,
) -> Result<()> {
    sqlx::query("UPDATE products SET pending_spec = $1, updated_at = $2 WHERE id = $3")
        .bind(revision.map(prost::Message::encode_to_vec))
        .bind(now_ms())
        .bind(id)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Makes `spec` the product's version `version`.
pub(crate) async fn save_new_version(
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
    .bind(&spec.tier)
    .bind(&spec.region)
    .bind(search_text(spec))
    .bind(i64::from(max_sensitivity(spec)))
    .bind(now_ms())
    .bind(id)
    .execute(&mut *connection)
    .await?;
    save_version(connection, id, version, spec).await
}

/// Moves a product, and the contracts on it, to provider `to`: the new
/// provider approves and revokes them, and the old one no longer can.
pub(crate) async fn move_to_provider(
    connection: &mut AnyConnection,
    id: &str,
    to: &str,
) -> Result<()> {
    sqlx::query("UPDATE products SET provider_organization_id = $1, updated_at = $2 WHERE id = $3")
        .bind(to)
        .bind(now_ms())
        .bind(id)
        .execute(&mut *connection)
        .await?;
    sqlx::query("UPDATE contracts SET provider_organization_id = $1 WHERE product_id = $2")
        .bind(to)
        .bind(id)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Appends a registration event whose audit entry is `audit_index`.
pub(crate) async fn insert_event(
    connection: &mut AnyConnection,
    product: &Product,
    kind: &str,
    actor: &str,
    reason: &str,
    audit_index: u64,
) -> Result<()> {
    let seq: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM registration_events WHERE product_id = $1")
            .bind(&product.id)
            .fetch_one(&mut *connection)
            .await?
            .try_get("n")?;
    sqlx::query(
        "INSERT INTO registration_events (product_id, seq, kind, actor, reason, version, at, audit_index) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&product.id)
    .bind(seq)
    .bind(kind)
    .bind(actor)
    .bind(reason)
    .bind(product.version)
    .bind(now_ms())
    .bind(i64::try_from(audit_index).unwrap_or(i64::MAX))
    .execute(&mut *connection)
    .await?;
    Ok(())
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
    .bind(id)
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

/// Published products in `tier`, `region` and of `provider` (empty: any)
/// none of whose columns is more sensitive than `max_sensitivity` and
/// whose search text holds every (lower-cased) keyword, by id. Only the
/// matching rows are decoded, so one unreadable product fails only the
/// searches that find it.
pub(crate) async fn published(
    connection: &mut AnyConnection,
    tier: &str,
    region: &str,
    provider: &str,
    max_sensitivity: i64,
    keywords: &[String],
) -> Result<Vec<Product>> {
    let sql = format!(
        "SELECT {PRODUCT_COLUMNS}, search_text FROM products WHERE state = 'published' \
         AND ($1 = '' OR tier = $1) AND ($2 = '' OR region = $2) \
         AND ($3 = '' OR provider_organization_id = $3) AND max_sensitivity <= $4 ORDER BY id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tier)
        .bind(region)
        .bind(provider)
        .bind(max_sensitivity)
        .fetch_all(&mut *connection)
        .await?;
    let mut products = Vec::new();
    for row in rows {
        let text: String = row.try_get("search_text")?;
        if keywords
            .iter()
            .all(|keyword| text.contains(keyword.as_str()))
        {
            products.push(product_from_row(&row)?);
        }
    }
    Ok(products)
}
