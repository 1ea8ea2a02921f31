//! Reading usage: the queries a party may see.

use sqlx::AnyConnection;

use crate::billing;
use crate::error::{MarketError, Result};
use crate::store;

use super::{QuerySummary, UsageQuery, UsageView};

/// Queries visible in `view` to `organization`, newest first.
///
/// # Errors
/// `InvalidArgument` for a bad period or limit; database failures.
pub async fn list_usage(
    connection: &mut AnyConnection,
    view: UsageView,
    organization: &str,
    request: &UsageQuery,
) -> Result<Vec<QuerySummary>> {
    if !request.period.is_empty() {
        billing::validate_period("period", &request.period)?;
    }
    if !(0..=1_000).contains(&request.limit) {
        return Err(MarketError::invalid("limit", "0 (the default) to 1,000"));
    }
    let limit = if request.limit == 0 {
        1_000
    } else {
        request.limit
    };
    let mut queries = store::queries::list(
        connection,
        view,
        organization,
        &request.organization_id,
        &request.product_id,
        &request.period,
        limit,
    )
    .await?;
    if view == UsageView::Provider {
        // Providers see that and how their data was used, not what their
        // customers asked.
        for summary in &mut queries {
            summary.sql.clear();
        }
    }
    Ok(queries)
}
