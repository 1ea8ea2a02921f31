//! The demand list's tables: demands and their answers.

use sqlx::{AnyConnection, Row as _};

use crate::demand::model::{Demand, DemandAnswer, DemandQuery, DemandState, NewDemand};
use crate::error::{MarketError, Result};
use crate::store::now_ms;

/// Stores a new open demand.
pub(crate) async fn insert(
    connection: &mut AnyConnection,
    id: &str,
    consumer: &str,
    request: &NewDemand,
) -> Result<()> {
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
    .bind(id)
    .bind(consumer)
    .bind(&request.title)
    .bind(&request.description)
    .bind(request.keywords.join("\n"))
    .bind(&request.tier)
    .bind(&request.region)
    .bind(request.monthly_budget_minor)
    .bind(&request.currency)
    .bind(search_text)
    .bind(now_ms())
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Appends a provider's answer to a demand.
pub(crate) async fn insert_answer(
    connection: &mut AnyConnection,
    demand_id: &str,
    seq: i64,
    provider: &str,
    product_id: &str,
    message: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO demand_answers (demand_id, seq, provider_organization_id, product_id, message, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(demand_id)
    .bind(seq)
    .bind(provider)
    .bind(product_id)
    .bind(message)
    .bind(now_ms())
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Marks a demand closed.
pub(crate) async fn close(connection: &mut AnyConnection, demand_id: &str) -> Result<()> {
    sqlx::query("UPDATE demands SET state = 'closed', closed_at = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(demand_id)
        .execute(&mut *connection)
        .await?;
    Ok(())
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
    .bind(&id)
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
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| MarketError::NotFound {
            what: "demand",
            id: id.to_owned(),
        })?;
    from_row(connection, &row).await
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
