//! The `marketplace_replicas`, `log_identity` tables and change notices:
//! what lets several servers share one database.

use sqlx::{AnyConnection, Row as _};

use super::Backend;
use crate::error::{MarketError, Result};

/// The database's clock in Unix milliseconds, as SQL. Leases are stamped and
/// judged by one clock, the database's, so servers whose clocks disagree do
/// not take each other for stopped.
#[must_use]
pub(crate) fn database_now_ms(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    }
}

/// Records that replica `id` lives now (and, the first time, that it
/// started): one statement, so a replica whose row another removed while it
/// stalled is back at its next renewal.
///
/// # Errors
/// Database failures.
pub(crate) async fn renew(
    connection: &mut AnyConnection,
    backend: Backend,
    id: &str,
    host: &str,
) -> Result<()> {
    let now = database_now_ms(backend);
    let sql = format!(
        "INSERT INTO marketplace_replicas (id, host, started_at, seen_at) \
         VALUES ($1, $2, {now}, {now}) \
         ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(host)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Removes replica `id`'s row: it stopped serving.
///
/// # Errors
/// Database failures.
pub(crate) async fn leave(connection: &mut AnyConnection, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM marketplace_replicas WHERE id = $1")
        .bind(id)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Forgets replicas that have not renewed for `lease_ms`, except `me`.
///
/// # Errors
/// Database failures.
pub(crate) async fn forget_stopped(
    connection: &mut AnyConnection,
    backend: Backend,
    me: &str,
    lease_ms: i64,
) -> Result<u64> {
    let sql = format!(
        "DELETE FROM marketplace_replicas WHERE id <> $1 AND seen_at < {} - $2",
        database_now_ms(backend)
    );
    Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(me)
        .bind(lease_ms)
        .execute(&mut *connection)
        .await?
        .rows_affected())
}

/// The condition, on `queries`, that a row belongs to a replica other than
/// `$1` that has not renewed for `$2` milliseconds, or to none (stored by a
/// version before replicas were recorded) and is older than `$3`
/// milliseconds.
#[must_use]
pub(crate) fn of_stopped_replica(backend: Backend) -> String {
    let now = database_now_ms(backend);
    format!(
        "replica_id <> $1 AND (replica_id <> '' OR created_at < {now} - $3) \
         AND replica_id NOT IN \
         (SELECT id FROM marketplace_replicas WHERE seen_at >= {now} - $2)"
    )
}

/// Records the log's origin and verifier key if none is recorded, and
/// refuses when another is.
///
/// # Errors
/// `FailedPrecondition` naming both keys (or origins) when they differ;
/// database failures.
pub(crate) async fn claim_log_identity(
    connection: &mut AnyConnection,
    origin: &str,
    verifier_key: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO log_identity (id, origin, verifier_key) VALUES (1, $1, $2) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(origin)
    .bind(verifier_key)
    .execute(&mut *connection)
    .await?;
    let row = sqlx::query("SELECT origin, verifier_key FROM log_identity WHERE id = 1")
        .fetch_one(&mut *connection)
        .await?;
    let (recorded_origin, recorded_key): (String, String) =
        (row.try_get("origin")?, row.try_get("verifier_key")?);
    if recorded_origin != origin {
        return Err(MarketError::FailedPrecondition(format!(
            "this database's audit log has origin {recorded_origin:?}, and this server was \
             given {origin:?}: every server on one database must use the same --log-origin"
        )));
    }
    if recorded_key != verifier_key {
        return Err(MarketError::FailedPrecondition(format!(
            "this database's audit log is signed by {recorded_key}, and this server's signing \
             key is {verifier_key}: every server on one database must read the same \
             --signing-key-file"
        )));
    }
    Ok(())
}

/// The channel change notices go out on (PostgreSQL `NOTIFY`).
pub const CHANGES_CHANNEL: &str = "civicgrid_changes";

/// What changed, for the other servers to read again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A contract's state.
    Contract(String),
    /// A role binding (casbin's rules).
    Access,
    /// Nothing: a server checking that its listening connection delivers.
    Ping,
}

impl Change {
    /// The notice's payload.
    #[must_use]
    pub fn payload(&self) -> String {
        match self {
            Self::Contract(id) => format!("contract:{id}"),
            Self::Access => "access".into(),
            Self::Ping => "ping".into(),
        }
    }

    /// A payload read back; `None` for one this version does not know
    /// (the receiver then reads everything again).
    #[must_use]
    pub fn parse(payload: &str) -> Option<Self> {
        match payload.split_once(':') {
            Some(("contract", id)) if !id.is_empty() => Some(Self::Contract(id.to_owned())),
            _ => match payload {
                "access" => Some(Self::Access),
                "ping" => Some(Self::Ping),
                _ => None,
            },
        }
    }
}

/// Tells every server on the database, once the caller's transaction
/// commits (and not if it rolls back), that `change` happened. SQLite has
/// one server per file, which changed its own memory already.
///
/// # Errors
/// Database failures.
pub(crate) async fn announce(
    connection: &mut AnyConnection,
    backend: Backend,
    change: &Change,
) -> Result<()> {
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(change.payload())
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Change;

    #[test]
    fn a_change_reads_back_as_itself_and_unknown_notices_are_none() {
        for change in [
            Change::Contract("c_1:x".into()),
            Change::Access,
            Change::Ping,
        ] {
            assert_eq!(Change::parse(&change.payload()), Some(change));
        }
        assert_eq!(Change::parse("contract:"), None);
        assert_eq!(Change::parse("products"), None);
    }
}
