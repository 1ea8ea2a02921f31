//! The demand list: consumers post the data they need; providers answer with
//! a product of theirs; the consumer closes the request. With the catalog (the
//! supply list) it shows what is offered and what is wanted.

pub(crate) mod model;

use sqlx::AnyConnection;

use crate::audit::log::{self, Event};
use crate::error::{MarketError, Result, check_text};
use crate::identity::new_id;
use crate::store::{self, Backend};

pub use model::{Demand, DemandAnswer, DemandQuery, DemandState, NewDemand, validate};
pub use store::demands::{get, list};

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
    store::demands::insert(connection, &id, consumer, request).await?;
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
    let seq = i64::try_from(demand.answers.len()).unwrap_or(i64::MAX);
    store::demands::insert_answer(connection, demand_id, seq, provider, product_id, message)
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
    store::demands::close(connection, demand_id).await?;
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
