//! The database: SQLite (the embedded default, a file under the data
//! directory) or PostgreSQL, through sqlx's Any driver so every query and test
//! runs on both. Queries use `$N` placeholders, which both accept.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions as _, Executor as _};

use crate::error::{MarketError, Result};

/// Which database is behind the pool, for the few statements that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one writer; a single connection keeps transactions serial.
    Sqlite,
    /// PostgreSQL: row locks serialise the audit log's appends.
    Postgres,
}

/// Where the data lives.
#[derive(Clone, Debug)]
pub enum Location {
    /// `marketplace.db` in this directory.
    DataDir(std::path::PathBuf),
    /// A `postgres://` URL.
    Url(String),
}

/// The marketplace's database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    reader: AnyPool,
    backend: Backend,
}

/// Read-only connections beside SQLite's one writer.
const SQLITE_READERS: u32 = 4;

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database.
    ///
    /// # Errors
    /// When the database cannot be reached, created or migrated.
    pub async fn open(location: &Location) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (url, backend) = match location {
            Location::DataDir(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| MarketError::Io {
                    context: format!("creating data directory {}", dir.display()),
                    source,
                })?;
                (sqlite_url(&dir.join("marketplace.db")), Backend::Sqlite)
            }
            Location::Url(url)
                if url.starts_with("postgres://") || url.starts_with("postgresql://") =>
            {
                (url.clone(), Backend::Postgres)
            }
            Location::Url(url) if url.starts_with("sqlite:") => (url.clone(), Backend::Sqlite),
            Location::Url(_) => {
                return Err(MarketError::invalid(
                    "database-url",
                    "must start with postgres://, postgresql:// or sqlite:",
                ));
            }
        };
        let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    // SQLite has one writer; one connection turns lock
                    // contention into queueing instead of SQLITE_BUSY.
                    .max_connections(1)
                    .after_connect(|connection, _| {
                        Box::pin(async move {
                            connection
                                .execute(
                                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                                     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                                )
                                .await?;
                            Ok(())
                        })
                    })
                    .connect_with(options.clone())
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options.clone())
                    .await?
            }
        };
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        // An in-memory SQLite database exists once per connection, so only
        // a file can have readers of its own.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let reader = if backend == Backend::Sqlite && !in_memory {
            AnyPoolOptions::new()
                .max_connections(SQLITE_READERS)
                .after_connect(|connection, _| {
                    Box::pin(async move {
                        connection
                            .execute("PRAGMA query_only = ON; PRAGMA busy_timeout = 5000;")
                            .await?;
                        Ok(())
                    })
                })
                .connect_with(options)
                .await?
        } else {
            pool.clone()
        };
        Ok(Self {
            pool,
            reader,
            backend,
        })
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Connections for reads that share no transaction with a write, such
    /// as looking up a token on every request. On a SQLite file these are
    /// read-only connections beside the one writer (WAL lets them read
    /// committed data while it writes), so they do not queue behind other
    /// requests' durable commits; elsewhere, the pool itself.
    #[must_use]
    pub fn reader(&self) -> &AnyPool {
        &self.reader
    }

    /// Which database this is.
    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a transaction.
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(self.pool.begin().await?)
    }
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_readers_read_while_the_writer_is_held_and_cannot_write() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| MarketError::Io {
            context: "temporary directory".into(),
            source,
        })?;
        let store = Store::open(&Location::DataDir(dir.path().to_owned())).await?;
        let mut writing = store.begin().await?;
        sqlx::query("CREATE TABLE probe (n INTEGER)")
            .execute(&mut *writing)
            .await?;
        // The writer's one connection is taken: a read through the pool
        // itself would wait for it.
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sqlite_master WHERE name = 'probe'")
                .fetch_one(store.reader()),
        )
        .await
        .expect("a reader waited for the writer");
        // Uncommitted work is not visible to readers.
        assert_eq!(read?, 0);
        writing.commit().await?;
        let seen: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'probe'")
                .fetch_one(store.reader())
                .await?;
        assert_eq!(seen, 1);
        let refused = sqlx::query("INSERT INTO probe (n) VALUES (1)")
            .execute(store.reader())
            .await
            .expect_err("a reader wrote");
        assert!(refused.to_string().contains("readonly"), "{refused}");
        Ok(())
    }
}
