//! The `runner_reports` table: runners' reports, shared by the servers of
//! one database.

use sqlx::{AnyConnection, AnyPool, Row as _};

use super::Backend;
use super::replicas::database_now_ms;
use crate::error::Result;

/// A runner's report as stored, with how long ago (by the database's clock)
/// it was received.
#[derive(Debug)]
pub struct StoredReport {
    /// The data center the reporting runner's certificate names.
    pub data_center: String,
    /// Where the runner is reached.
    pub endpoint: String,
    /// The report (`RunnerStatus`, protobuf).
    pub status: Vec<u8>,
    /// Milliseconds since it was received.
    pub age_ms: i64,
}

/// Records a report that the receiving server checked.
///
/// # Errors
/// Database failures.
pub async fn record(
    connection: &mut AnyConnection,
    backend: Backend,
    data_center: &str,
    endpoint: &str,
    status: &[u8],
) -> Result<()> {
    let sql = format!(
        "INSERT INTO runner_reports (data_center, endpoint, status, seen_at) \
         VALUES ($1, $2, $3, {now}) \
         ON CONFLICT (data_center, endpoint) \
         DO UPDATE SET status = excluded.status, seen_at = excluded.seen_at",
        now = database_now_ms(backend)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(data_center)
        .bind(endpoint)
        .bind(status)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Reports received within `within_ms`; older ones are deleted.
///
/// # Errors
/// Database failures.
pub async fn recent(pool: &AnyPool, backend: Backend, within_ms: i64) -> Result<Vec<StoredReport>> {
    let now = database_now_ms(backend);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM runner_reports WHERE seen_at < {now} - $1"
    )))
    .bind(within_ms)
    .execute(pool)
    .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT data_center, endpoint, status, {now} - seen_at AS age_ms FROM runner_reports"
    )))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(StoredReport {
                data_center: row.try_get("data_center")?,
                endpoint: row.try_get("endpoint")?,
                status: row.try_get("status")?,
                age_ms: row.try_get("age_ms")?,
            })
        })
        .collect()
}
