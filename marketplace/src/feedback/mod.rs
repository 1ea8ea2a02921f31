//! Quality feedback: a consumer who finds a problem in a product's data
//! reports it (a column, what is wrong, optionally the query that showed
//! it); the provider answers and marks it fixed in a version; the reporter
//! checks and may reopen it. Open reports and their age show in the catalog
//! and its DCAT export, so every buyer sees how a provider keeps its data.

use sqlx::AnyConnection;

use crate::audit::log::{self, Event};
use crate::audit::sha256_hex;
use crate::error::{MarketError, Result, check_text};
use crate::identity::new_id;
use crate::registry::Product;
use crate::store::{self, Backend};

/// Most characters of a description, an answer or a reason.
pub const MAX_TEXT: usize = 2000;

/// Most open reports one organization may have on one product: enough for
/// every real problem, too few to bury the provider's list.
pub const MAX_OPEN_PER_REPORTER: i64 = 20;

/// A changed report's time: never the time it was read, so that the
/// conditional update of a concurrent change cannot match it.
fn changed_at(read: &QualityReport) -> i64 {
    store::now_ms().max(read.updated_at_unix_ms + 1)
}

pub(crate) mod model;

pub use crate::store::quality_reports::{get, list, open_by_product};
pub use model::{NewReport, OpenByProduct, OpenReports, QualityReport, ReportState};

async fn audit(
    connection: &mut AnyConnection,
    backend: Backend,
    kind: &str,
    actor: &str,
    report: &QualityReport,
    provider: &str,
    details: serde_json::Value,
) -> Result<()> {
    let mut details = details;
    details["report"] = report.id.clone().into();
    details["provider"] = provider.into();
    details["product_version"] = report.product_version.into();
    log::append(
        connection,
        backend,
        &[Event {
            kind: format!("quality.{kind}"),
            actor: actor.to_owned(),
            tenant: report.reporter_organization_id.clone(),
            subject: report.product_id.clone(),
            details,
        }],
    )
    .await?;
    Ok(())
}

/// Checks `column` names a declared column of `product` as `table.column`.
fn check_column(product: &Product, column: &str) -> Result<()> {
    if column.is_empty() {
        return Ok(());
    }
    let declared = product.spec.tables.iter().any(|table| {
        table
            .columns
            .iter()
            .any(|c| format!("{}.{}", table.name, c.name) == column)
    });
    if declared {
        Ok(())
    } else {
        Err(MarketError::invalid(
            "column",
            format!(
                "{column:?} is not a column of product {}; name it as table.column",
                product.id
            ),
        ))
    }
}

/// Files `request` for `reporter`, who has or had a contract on the
/// product; a query named must be the reporter's own on this product.
///
/// # Errors
/// `InvalidArgument` naming the field; `NotFound` for a query that is not
/// the reporter's on this product.
pub async fn report(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    reporter: &str,
    product: &Product,
    request: &NewReport,
) -> Result<QualityReport> {
    check_text("description", &request.description, MAX_TEXT, true)?;
    check_text("column", &request.column, 200, false)?;
    check_column(product, &request.column)?;
    // Concurrent reports count one after another: every audited write
    // takes the log's head anyway, so taking it first costs nothing.
    store::lock_audit_head(connection).await?;
    let open = store::quality_reports::open_count_of(connection, reporter, &product.id).await?;
    if open >= MAX_OPEN_PER_REPORTER {
        return Err(MarketError::ResourceExhausted(format!(
            "{reporter} has {open} open reports on product {}: wait for answers before filing more",
            product.id
        )));
    }
    if !request.query_id.is_empty() {
        let owner = store::queries::consumer_and_product(connection, &request.query_id).await?;
        if owner
            .as_ref()
            .is_none_or(|(consumer, on)| consumer != reporter || on != &product.id)
        {
            return Err(MarketError::NotFound {
                what: "query",
                id: request.query_id.clone(),
            });
        }
    }
    let report = QualityReport {
        id: new_id("qr"),
        product_id: product.id.clone(),
        product_version: product.version,
        column: request.column.clone(),
        description: request.description.clone(),
        query_id: request.query_id.clone(),
        reporter_organization_id: reporter.to_owned(),
        reporter_user_id: actor.to_owned(),
        state: ReportState::Open,
        answer: String::new(),
        fixed_in_version: 0,
        created_at_unix_ms: store::now_ms(),
        updated_at_unix_ms: store::now_ms(),
    };
    store::quality_reports::insert(connection, &report).await?;
    audit(
        connection,
        backend,
        "reported",
        actor,
        &report,
        &product.provider_organization_id,
        serde_json::json!({
            "column": report.column,
            "query": report.query_id,
            "description_sha256": sha256_hex(report.description.as_bytes()),
        }),
    )
    .await?;
    Ok(report)
}

/// The provider answers `report`; with `fixed_in_version` (not 0) it marks
/// it fixed in that version of the product, which must exist and not
/// predate the version the report was about.
///
/// # Errors
/// `InvalidArgument` naming `message` or `fixed_in_version`;
/// `FailedPrecondition` for a report fixed already.
pub async fn answer(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    product: &Product,
    report: QualityReport,
    message: &str,
    fixed_in_version: i64,
) -> Result<QualityReport> {
    check_text("message", message, MAX_TEXT, true)?;
    if report.state == ReportState::Fixed {
        return Err(MarketError::FailedPrecondition(format!(
            "report {} is fixed already; its reporter may reopen it",
            report.id
        )));
    }
    if fixed_in_version != 0
        && !(report.product_version + 1..=product.version).contains(&fixed_in_version)
    {
        return Err(MarketError::invalid(
            "fixed_in_version",
            if product.version > report.product_version {
                format!(
                    "must be a version of product {} after {} (the version reported), up to {} (its current one)",
                    product.id, report.product_version, product.version
                )
            } else {
                format!(
                    "product {} has no version after {} (the version reported) yet: revise it, then mark the report fixed",
                    product.id, report.product_version
                )
            },
        ));
    }
    let read = report.clone();
    let report = QualityReport {
        state: if fixed_in_version == 0 {
            ReportState::Open
        } else {
            ReportState::Fixed
        },
        answer: message.to_owned(),
        fixed_in_version,
        updated_at_unix_ms: changed_at(&read),
        ..report
    };
    store::quality_reports::update(connection, &report, &read).await?;
    audit(
        connection,
        backend,
        if fixed_in_version == 0 {
            "answered"
        } else {
            "fixed"
        },
        actor,
        &report,
        &product.provider_organization_id,
        serde_json::json!({
            "fixed_in_version": fixed_in_version,
            "message_sha256": sha256_hex(message.as_bytes()),
        }),
    )
    .await?;
    Ok(report)
}

/// The reporter reopens a report marked fixed that is not.
///
/// # Errors
/// `InvalidArgument` naming `reason`; `FailedPrecondition` for a report
/// that is open.
pub async fn reopen(
    connection: &mut AnyConnection,
    backend: Backend,
    actor: &str,
    product: &Product,
    report: QualityReport,
    reason: &str,
) -> Result<QualityReport> {
    check_text("reason", reason, MAX_TEXT, true)?;
    if report.state != ReportState::Fixed {
        return Err(MarketError::FailedPrecondition(format!(
            "report {} is open",
            report.id
        )));
    }
    let read = report.clone();
    let report = QualityReport {
        state: ReportState::Open,
        answer: reason.to_owned(),
        fixed_in_version: 0,
        updated_at_unix_ms: changed_at(&read),
        ..report
    };
    store::quality_reports::update(connection, &report, &read).await?;
    audit(
        connection,
        backend,
        "reopened",
        actor,
        &report,
        &product.provider_organization_id,
        serde_json::json!({"reason_sha256": sha256_hex(reason.as_bytes())}),
    )
    .await?;
    Ok(report)
}
