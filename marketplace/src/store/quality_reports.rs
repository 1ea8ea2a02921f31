//! The `quality_reports` table.

use sqlx::{AnyConnection, Row as _};

use crate::error::{MarketError, Result};
use crate::feedback::model::{OpenByProduct, OpenReports, QualityReport, ReportState};

const COLUMNS: &str = "id, product_id, product_version, column_name, description, query_id, \
     reporter_organization_id, reporter_user_id, state, answer, fixed_in_version, created_at, updated_at";

fn from_row(row: &sqlx::any::AnyRow) -> Result<QualityReport> {
    Ok(QualityReport {
        id: row.try_get("id")?,
        product_id: row.try_get("product_id")?,
        product_version: row.try_get("product_version")?,
        column: row.try_get("column_name")?,
        description: row.try_get("description")?,
        query_id: row.try_get("query_id")?,
        reporter_organization_id: row.try_get("reporter_organization_id")?,
        reporter_user_id: row.try_get("reporter_user_id")?,
        state: ReportState::parse(&row.try_get::<String, _>("state")?)?,
        answer: row.try_get("answer")?,
        fixed_in_version: row.try_get("fixed_in_version")?,
        created_at_unix_ms: row.try_get("created_at")?,
        updated_at_unix_ms: row.try_get("updated_at")?,
    })
}

/// Stores a new report.
pub(crate) async fn insert(connection: &mut AnyConnection, report: &QualityReport) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO quality_reports ({COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    )))
    .bind(&report.id)
    .bind(&report.product_id)
    .bind(report.product_version)
    .bind(&report.column)
    .bind(&report.description)
    .bind(&report.query_id)
    .bind(&report.reporter_organization_id)
    .bind(&report.reporter_user_id)
    .bind(report.state.name())
    .bind(&report.answer)
    .bind(report.fixed_in_version)
    .bind(report.created_at_unix_ms)
    .bind(report.updated_at_unix_ms)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Saves `report`'s state, answer and fix, only if it is still as read
/// (`read`): a concurrent change makes this fail rather than be
/// overwritten.
pub(crate) async fn update(
    connection: &mut AnyConnection,
    report: &QualityReport,
    read: &QualityReport,
) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE quality_reports SET state = $1, answer = $2, fixed_in_version = $3, updated_at = $4 \
         WHERE id = $5 AND state = $6 AND updated_at = $7",
    )
    .bind(report.state.name())
    .bind(&report.answer)
    .bind(report.fixed_in_version)
    .bind(report.updated_at_unix_ms)
    .bind(&report.id)
    .bind(read.state.name())
    .bind(read.updated_at_unix_ms)
    .execute(&mut *connection)
    .await?
    .rows_affected();
    if updated == 1 {
        Ok(())
    } else {
        Err(MarketError::Aborted(format!(
            "report {} changed meanwhile; read it again",
            report.id
        )))
    }
}

/// One report.
///
/// # Errors
/// `NotFound`.
pub async fn get(connection: &mut AnyConnection, id: &str) -> Result<QualityReport> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM quality_reports WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *connection)
    .await?
    .ok_or_else(|| MarketError::NotFound {
        what: "quality report",
        id: id.to_owned(),
    })?;
    from_row(&row)
}

/// Reports on `product` (every product when empty) that `viewer` may see
/// (its own and those on its products; every one when `viewer` is empty),
/// open ones only when `open_only`; newest first, at most 1,000.
///
/// # Errors
/// Database failures.
pub async fn list(
    connection: &mut AnyConnection,
    product: &str,
    viewer: &str,
    open_only: bool,
) -> Result<Vec<QualityReport>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM quality_reports WHERE ($1 = '' OR product_id = $1) \
         AND ($2 = 0 OR state = 'open') \
         AND ($3 = '' OR reporter_organization_id = $3 OR product_id IN \
              (SELECT id FROM products WHERE provider_organization_id = $3)) \
         ORDER BY created_at DESC, id LIMIT 1000"
    )))
    .bind(product)
    .bind(i64::from(open_only))
    .bind(viewer)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter().map(from_row).collect()
}

/// How many open reports `reporter` has on `product`.
///
/// # Errors
/// Database failures.
pub(crate) async fn open_count_of(
    connection: &mut AnyConnection,
    reporter: &str,
    product: &str,
) -> Result<i64> {
    let row = sqlx::query(
        "SELECT COUNT(*) FROM quality_reports \
         WHERE reporter_organization_id = $1 AND product_id = $2 AND state = 'open'",
    )
    .bind(reporter)
    .bind(product)
    .fetch_one(&mut *connection)
    .await?;
    Ok(row.try_get(0)?)
}

/// Open reports per product.
///
/// # Errors
/// Database failures.
pub async fn open_by_product(connection: &mut AnyConnection) -> Result<OpenByProduct> {
    let rows = sqlx::query(
        "SELECT product_id, COUNT(*) AS open_reports, MIN(created_at) AS oldest \
         FROM quality_reports WHERE state = 'open' GROUP BY product_id",
    )
    .fetch_all(&mut *connection)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get::<String, _>("product_id")?,
                OpenReports {
                    count: row.try_get("open_reports")?,
                    oldest_unix_ms: row.try_get("oldest")?,
                },
            ))
        })
        .collect()
}
