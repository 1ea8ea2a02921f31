//! The demand list: consumers post the data they need; providers answer with
//! a product of theirs; the consumer closes the request. With the catalog (the
//! supply list) it shows what is offered and what is wanted.

use sqlx::{AnyConnection, Row as _};

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result, check_text};
use crate::identity::new_id;
use crate::store::{Backend, now_ms};

/// A consumer's request for data, and the providers' answers to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// Its id (`dem-…`).
    pub id: String,
    /// The consumer organization that posted it.
    pub consumer_organization_id: String,
    /// What is wanted, in a line.
    pub title: String,
    /// What is wanted, in full.
    pub description: String,
    /// Words it is found by.
    pub keywords: Vec<String>,
    /// The tier wanted, or empty.
    pub tier: String,
    /// The region wanted, or empty.
    pub region: String,
    /// What the consumer would pay a month, in minor units (0: unsaid).
    pub monthly_budget_minor: i64,
    /// The budget's currency (ISO 4217), when there is a budget.
    pub currency: String,
    /// Whether it still takes answers.
    pub state: DemandState,
    /// When it was posted, Unix milliseconds.
    pub created_at: i64,
    /// Providers' answers, oldest first.
    pub answers: Vec<DemandAnswer>,
}

/// Whether a demand takes answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandState {
    /// It does.
    Open,
    /// Its consumer closed it.
    Closed,
}

/// A provider's answer: a product of theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemandAnswer {
    /// The answering provider organization.
    pub provider_organization_id: String,
    /// Its product.
    pub product_id: String,
    /// What it says.
    pub message: String,
    /// When, Unix milliseconds.
    pub at: i64,
}

/// A demand as a consumer posts it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewDemand {
    /// See [`Demand::title`].
    pub title: String,
    /// See [`Demand::description`].
    pub description: String,
    /// See [`Demand::keywords`].
    pub keywords: Vec<String>,
    /// See [`Demand::tier`].
    pub tier: String,
    /// See [`Demand::region`].
    pub region: String,
    /// See [`Demand::monthly_budget_minor`].
    pub monthly_budget_minor: i64,
    /// See [`Demand::currency`].
    pub currency: String,
}

/// Which demands to list: every keyword must appear; closed ones only when
/// asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemandQuery {
    /// Words that must all appear in the title, description or keywords.
    pub keywords: Vec<String>,
    /// Whether closed demands are listed too.
    pub include_closed: bool,
}

/// Checks a demand's fields; the error names the first bad one.
///
/// # Errors
/// `InvalidArgument` naming the field.
pub fn validate(request: &NewDemand) -> Result<()> {
    check_text("title", &request.title, 200, true)?;
    check_text("description", &request.description, 10_000, true)?;
    for (i, keyword) in request.keywords.iter().enumerate() {
        check_text(&format!("keywords[{i}]"), keyword, 50, true)?;
        if keyword.contains('\n') {
            return Err(MarketError::invalid(
                format!("keywords[{i}]"),
                "must be one line",
            ));
        }
    }
    if !request.tier.is_empty()
        && !["municipal", "edge", "partner"].contains(&request.tier.as_str())
    {
        return Err(MarketError::invalid(
            "tier",
            "empty, or one of municipal, edge, partner",
        ));
    }
    check_text("region", &request.region, 100, false)?;
    if request.monthly_budget_minor < 0 {
        return Err(MarketError::invalid(
            "monthly_budget_minor",
            "must not be negative",
        ));
    }
    if request.monthly_budget_minor > 0
        && (request.currency.len() != 3
            || !request.currency.chars().all(|c| c.is_ascii_uppercase()))
    {
        return Err(MarketError::invalid(
            "currency",
            "an ISO 4217 code such as EUR or CNY",
        ));
    }
    Ok(())
}

async fn audit(
    connection: &mut AnyConnection,
    backend: Backend,
    kind: &str,
    actor: &str,
    demand: &Demand,
    details: serde_json::Value,
) -> Result<()> {
    log::append(
        connection,
        backend,
        &[Event {
            kind: format!("demand.{kind}"),
            actor: actor.to_owned(),
            tenant: demand.consumer_organization_id.clone(),
            subject: demand.id.clone(),
            details,
        }],
    )
    .await?;
    Ok(())
}

/// Posts a demand for `consumer`.
///
/// # Errors
/// Invalid fields.
pub async fn post(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    consumer: &str,
    request: &NewDemand,
) -> Result<Demand> {
    validate(request)?;
    let id = new_id("dem");
    let search_text = format!(
        "{} {} {}",
        request.title,
        request.description,
        request.keywords.join(" ")
    )
    .to_lowercase();
    sqlx::query(
        "INSERT INTO demands (id, consumer_organization_id, title, description, keywords, tier, region, \
         monthly_budget_minor, currency, state, search_text, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'open', $10, $11)",
    )
    .bind(id.clone())
    .bind(consumer.to_owned())
    .bind(request.title.clone())
    .bind(request.description.clone())
    .bind(request.keywords.join("\n"))
    .bind(request.tier.clone())
    .bind(request.region.clone())
    .bind(request.monthly_budget_minor)
    .bind(request.currency.clone())
    .bind(search_text)
    .bind(now_ms())
    .execute(&mut *connection)
    .await?;
    let demand = get(connection, &id).await?;
    audit(
        connection,
        backend,
        "posted",
        actor,
        &demand,
        serde_json::json!({"title": demand.title}),
    )
    .await?;
    Ok(demand)
}

const COLUMNS: &str = "id, consumer_organization_id, title, description, keywords, tier, region, \
     monthly_budget_minor, currency, state, created_at";

async fn from_row(connection: &mut AnyConnection, row: &sqlx::any::AnyRow) -> Result<Demand> {
    let id: String = row.try_get("id")?;
    let keywords: String = row.try_get("keywords")?;
    let state = match row.try_get::<String, _>("state")?.as_str() {
        "open" => DemandState::Open,
        "closed" => DemandState::Closed,
        other => return Err(MarketError::Corrupt(format!("demand state {other:?}"))),
    };
    let answers = sqlx::query(
        "SELECT provider_organization_id, product_id, message, at FROM demand_answers WHERE demand_id = $1 ORDER BY seq",
    )
    .bind(id.clone())
    .fetch_all(&mut *connection)
    .await?
    .iter()
    .map(|answer| {
        Ok(DemandAnswer {
            provider_organization_id: answer.try_get("provider_organization_id")?,
            product_id: answer.try_get("product_id")?,
            message: answer.try_get("message")?,
            at: answer.try_get("at")?,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    Ok(Demand {
        id,
        consumer_organization_id: row.try_get("consumer_organization_id")?,
        title: row.try_get("title")?,
        description: row.try_get("description")?,
        keywords: keywords.lines().map(str::to_owned).collect(),
        tier: row.try_get("tier")?,
        region: row.try_get("region")?,
        monthly_budget_minor: row.try_get("monthly_budget_minor")?,
        currency: row.try_get("currency")?,
        state,
        created_at: row.try_get("created_at")?,
        answers,
    })
}

/// A demand by id.
///
/// # Errors
/// `NotFound`.
pub async fn get(connection: &mut AnyConnection, id: &str) -> Result<Demand> {
    let sql = format!("SELECT {COLUMNS} FROM demands WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_owned())
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| MarketError::NotFound {
            what: "demand",
            id: id.to_owned(),
        })?;
    from_row(connection, &row).await
}

/// Answers an open demand with `product` of `provider`.
///
/// # Errors
/// A closed demand, or a product of another provider.
pub async fn answer(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    provider: &str,
    demand_id: &str,
    product_id: &str,
    message: &str,
) -> Result<Demand> {
    check_text("message", message, 2000, false)?;
    let demand = get(connection, demand_id).await?;
    if demand.state != DemandState::Open {
        return Err(MarketError::FailedPrecondition(format!(
            "demand {demand_id} is closed"
        )));
    }
    let product = crate::registry::get(connection, product_id).await?;
    if product.provider_organization_id != provider {
        return Err(MarketError::denied(
            "demand:answer",
            format!(" with product {product_id}: it is not {provider}'s"),
        ));
    }
    let seq = demand.answers.len() as i64;
    sqlx::query(
        "INSERT INTO demand_answers (demand_id, seq, provider_organization_id, product_id, message, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(demand_id.to_owned())
    .bind(seq)
    .bind(provider.to_owned())
    .bind(product_id.to_owned())
    .bind(message.to_owned())
    .bind(now_ms())
    .execute(&mut *connection)
    .await?;
    let demand = get(connection, demand_id).await?;
    audit(
        connection,
        backend,
        "answered",
        actor,
        &demand,
        serde_json::json!({"provider": provider, "product": product_id}),
    )
    .await?;
    Ok(demand)
}

/// Closes an open demand.
///
/// # Errors
/// A demand closed already.
pub async fn close(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    demand_id: &str,
    reason: &str,
) -> Result<Demand> {
    check_text("reason", reason, 2000, false)?;
    let demand = get(connection, demand_id).await?;
    if demand.state != DemandState::Open {
        return Err(MarketError::FailedPrecondition(format!(
            "demand {demand_id} is closed already"
        )));
    }
    sqlx::query("UPDATE demands SET state = 'closed', closed_at = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(demand_id.to_owned())
        .execute(&mut *connection)
        .await?;
    let demand = get(connection, demand_id).await?;
    audit(
        connection,
        backend,
        "closed",
        actor,
        &demand,
        serde_json::json!({"reason": reason}),
    )
    .await?;
    Ok(demand)
}

/// The demand list, newest first.
///
/// # Errors
/// Database failures.
pub async fn list(connection: &mut AnyConnection, request: &DemandQuery) -> Result<Vec<Demand>> {
    let sql = format!(
        "SELECT {COLUMNS}, search_text FROM demands WHERE ($1 = 1 OR state = 'open') ORDER BY created_at DESC, id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(i64::from(request.include_closed))
        .fetch_all(&mut *connection)
        .await?;
    let keywords: Vec<String> = request.keywords.iter().map(|k| k.to_lowercase()).collect();
    let mut demands = Vec::new();
    for row in rows {
        let text: String = row.try_get("search_text")?;
        if keywords
            .iter()
            .all(|keyword| text.contains(keyword.as_str()))
        {
            demands.push(from_row(connection, &row).await?);
        }
    }
    Ok(demands)
}
