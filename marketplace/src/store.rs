//! The database: SQLite (the embedded default, a file under the data
//! directory) or PostgreSQL, through sqlx's Any driver so every query and test
//! runs on both. Queries use `$N` placeholders, which both accept.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, ConnectOptions as _, Executor as _};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::error::{MarketError, Result};

mod batch;
pub use batch::{Param, WriteBatch};
pub(crate) mod casbin_rules;
pub(crate) mod contracts;
pub(crate) mod cosigned;
pub(crate) mod data_versions;
pub mod demands;
pub mod identity;
pub(crate) mod ledger;
pub mod products;
pub(crate) mod quality_reports;
pub(crate) mod queries;
pub mod replicas;
pub mod runner_reports;

/// Which database is behind the pool, for the few statements that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one writer; a single connection keeps transactions serial.
    Sqlite,
    /// PostgreSQL: row locks serialise the audit log's appends.
    Postgres,
}

impl Backend {
    /// The database behind a connection.
    #[must_use]
    pub fn of(connection: &AnyConnection) -> Self {
        if connection.backend_name().eq_ignore_ascii_case("sqlite") {
            Self::Sqlite
        } else {
            Self::Postgres
        }
    }
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
    grouped: mpsc::Sender<GroupedWork>,
    listen_url: Option<Redacted>,
    /// When the group in commit began (Unix ms), 0 when none is.
    group_since_ms: Arc<AtomicI64>,
}

/// A database URL kept out of `Debug` output: it may carry a password.
#[derive(Clone)]
struct Redacted(String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Work run inside a shared transaction: it returns how to tell its caller
/// once the transaction's fate is known, or `None` when it failed (and told
/// its caller already), so its savepoint is rolled back.
type GroupedWork =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Option<Deliver>> + Send>;

/// Hands a grouped work's result to its caller: `Ok` once the shared
/// transaction committed, the commit's error otherwise.
type Deliver = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// The most works one shared transaction takes, so that one slow group does
/// not hold every caller behind it.
const MAX_GROUP: usize = 64;

/// Every PostgreSQL session's settings. A server that stalls inside a
/// transaction (a paused VM) would hold the log's head, and with it every
/// server's writes, until its socket died; PostgreSQL ends such a
/// transaction after a few idle seconds instead, well inside a server's
/// lease (`market::replication::REPLICA_LEASE`), and the stalled server's
/// work fails when it resumes.
const POSTGRES_SESSION: &str = "SET idle_in_transaction_session_timeout = '5s'";

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
                    .after_connect(|connection, _| {
                        Box::pin(async move {
                            connection.execute(POSTGRES_SESSION).await?;
                            Ok(())
                        })
                    })
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
                .connect_with(options.clone())
                .await?
        } else {
            pool.clone()
        };
        let (grouped, works) = mpsc::channel(1024);
        let group_since_ms = Arc::new(AtomicI64::new(0));
        let source = match backend {
            Backend::Sqlite => CommitterPool::Shared(pool.clone()),
            Backend::Postgres => CommitterPool::Own(options),
        };
        spawn_committer(source, works, Arc::clone(&group_since_ms)).await?;
        Ok(Self {
            pool,
            reader,
            backend,
            grouped,
            listen_url: (backend == Backend::Postgres).then(|| Redacted(url.clone())),
            group_since_ms,
        })
    }

    /// How long the group commit in progress has been running, if one is:
    /// a server whose writes hang (a socket left half-open by a failover)
    /// stops renewing its lease, so that other servers take its queries over.
    #[must_use]
    pub fn writes_stalled_for(&self) -> Option<Duration> {
        let since = self.group_since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| Duration::from_millis(u64::try_from(now_ms() - since).unwrap_or(0)))
    }

    /// The PostgreSQL URL change notices are listened for on (see
    /// [`replicas::announce`]); `None` on SQLite.
    pub(crate) fn listen_url(&self) -> Option<&str> {
        self.listen_url.as_ref().map(|url| url.0.as_str())
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A connection of the main pool, for reads and writes outside a
    /// transaction.
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        Ok(self.pool.acquire().await?)
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

    /// Runs `work` in a transaction shared with other callers' works (group
    /// commit), each in a savepoint of its own, and returns its result once
    /// that transaction is durable.
    ///
    /// One durable commit then serves every work that queued while the last
    /// one was being written, instead of each waiting for the single SQLite
    /// writer to commit the ones before it one by one. A work that fails is
    /// rolled back to its savepoint and leaves the others' untouched; if the
    /// commit fails, every work in it gets the error and none of it stays.
    /// The work runs to the end even if the caller stops waiting.
    ///
    /// # Errors
    /// The work's own error; `Unavailable` when the shared transaction could
    /// not be committed or the committer has stopped.
    pub async fn grouped<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (reply, replied) = oneshot::channel::<Result<T>>();
        // The committer is a task of its own: without this, the work's spans
        // (a query's `authorize` and `settle`) would leave their caller's trace.
        let span = tracing::Span::current();
        let erased: GroupedWork = Box::new(move |connection| {
            Box::pin(async move {
                match work(connection).instrument(span).await {
                    Ok(value) => {
                        let deliver: Deliver = Box::new(move |committed| {
                            // The caller may have gone; the work is durable anyway.
                            let _ = reply.send(committed.map(|()| value).map_err(|error| {
                                MarketError::Unavailable(format!(
                                    "the transaction could not be committed: {error}"
                                ))
                            }));
                        });
                        Some(deliver)
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        None
                    }
                }
            })
        });
        let stopped = || MarketError::Unavailable("the database committer has stopped".into());
        self.grouped.send(erased).await.map_err(|_| stopped())?;
        replied.await.map_err(|_| stopped())?
    }
}

/// Where the committer's connection comes from.
enum CommitterPool {
    /// SQLite: the writer's pool. Its one connection lives on a thread of
    /// sqlx's, so any runtime may drive it.
    Shared(AnyPool),
    /// PostgreSQL: a pool of one connection opened on the committer's own
    /// runtime, so that its socket is that runtime's to watch.
    Own(AnyConnectOptions),
}

/// The group committer runs on a thread and runtime of its own. Every
/// statement of every work is a round trip to the database (on SQLite to
/// sqlx's SQLite thread, whose reply wakes the committer from outside the
/// runtime; on PostgreSQL over its socket), and on the server's runtime each
/// wake-up waited behind whatever the workers were busy with (a busy
/// server's gRPC streams), once per statement, while every query's
/// reservation and settlement queued behind the committer. Here nothing else
/// is queued. The thread takes the opener's tracing subscriber, so the
/// works' spans go where the caller's do; it ends when the store is dropped.
async fn spawn_committer(
    source: CommitterPool,
    works: mpsc::Receiver<GroupedWork>,
    group_since_ms: Arc<AtomicI64>,
) -> Result<()> {
    let io_error = |source| MarketError::Io {
        context: "starting the database committer".into(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error)?;
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let (opened, opening) = oneshot::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || {
            let _subscriber = tracing::dispatcher::set_default(&dispatch);
            runtime.block_on(async move {
                let (pool, reconnect) = match source {
                    CommitterPool::Shared(pool) => (pool, None),
                    CommitterPool::Own(options) => {
                        let pool = committer_pool(options.clone());
                        if let Err(error) = pool.acquire().await {
                            let _ = opened.send(Err(error.into()));
                            return;
                        }
                        (pool, Some(options))
                    }
                };
                let _ = opened.send(Ok(()));
                commit_in_groups(pool, reconnect, works, group_since_ms).await;
            });
        })
        .map_err(io_error)?;
    opening.await.map_err(|_| {
        MarketError::Unavailable("the database committer ended while starting".into())
    })?
}

/// The committer's own PostgreSQL connection, opened when first needed.
fn committer_pool(options: AnyConnectOptions) -> AnyPool {
    AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|connection, _| {
            Box::pin(async move {
                connection.execute(POSTGRES_SESSION).await?;
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

/// The longest one group commit may take. Groups take milliseconds; one
/// that takes this long waits on a connection that will not answer (a
/// socket left half-open by a failover, which the kernel would give up on
/// only after many minutes).
const GROUP_WITHIN: Duration = Duration::from_secs(30);

/// The group committer: takes every work waiting when a transaction starts
/// (up to [`MAX_GROUP`]) into it, then commits once. A group that does not
/// finish within [`GROUP_WITHIN`] fails, and on PostgreSQL (`reconnect`)
/// the next group has a new connection.
async fn commit_in_groups(
    mut pool: AnyPool,
    reconnect: Option<AnyConnectOptions>,
    mut works: mpsc::Receiver<GroupedWork>,
    group_since_ms: Arc<AtomicI64>,
) {
    while let Some(first) = works.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match works.try_recv() {
                Ok(work) => group.push(work),
                Err(_) => break,
            }
        }
        let mut delivers = Vec::with_capacity(group.len());
        group_since_ms.store(now_ms(), Ordering::Relaxed);
        let committed =
            match tokio::time::timeout(GROUP_WITHIN, commit_group(&pool, group, &mut delivers))
                .await
            {
                Ok(committed) => committed.map_err(|error| {
                    tracing::error!(%error, "a group commit failed");
                    error.to_string()
                }),
                Err(_) => {
                    tracing::error!(
                        within = ?GROUP_WITHIN,
                        "a group commit did not finish; its connection is dropped"
                    );
                    if let Some(options) = &reconnect {
                        let stuck = std::mem::replace(&mut pool, committer_pool(options.clone()));
                        tokio::spawn(async move { stuck.close().await });
                    }
                    Err(format!(
                        "the database did not answer within {} s",
                        GROUP_WITHIN.as_secs()
                    ))
                }
            };
        group_since_ms.store(0, Ordering::Relaxed);
        for deliver in delivers {
            deliver(committed.clone());
        }
    }
}

/// Opens the first work's savepoint.
const OPEN: &str = "SAVEPOINT grouped_work";
/// Keeps the last work and opens the next one's savepoint, in one round trip:
/// on SQLite every statement is a trip to the writer's thread, taken while
/// every other work waits.
const KEEP_AND_OPEN: &str = "RELEASE SAVEPOINT grouped_work; SAVEPOINT grouped_work";
/// Undoes the last work and opens the next one's savepoint.
const UNDO_AND_OPEN: &str = "ROLLBACK TO SAVEPOINT grouped_work; \
     RELEASE SAVEPOINT grouped_work; SAVEPOINT grouped_work";

async fn commit_group(
    pool: &AnyPool,
    group: Vec<GroupedWork>,
    delivers: &mut Vec<Deliver>,
) -> Result<()> {
    let mut transaction = pool.begin().await?;
    if Backend::of(&transaction) == Backend::Postgres {
        // Reservations lock consumers' accounts and settlements lock the
        // log's head, then accounts. Two groups (two servers on one
        // database, or this server's group and a deposit) holding one each
        // and waiting for the other would deadlock: every writer that
        // locks both takes the head first (see `lock_audit_head`).
        lock_audit_head(&mut transaction).await?;
    }
    let mut opening = OPEN;
    let mut last_failed = false;
    for work in group {
        transaction.execute(opening).await?;
        // A panicking work must not take the committer, and every later
        // caller, with it; its caller sees its reply dropped.
        let done = std::panic::AssertUnwindSafe(work(&mut transaction))
            .catch_unwind()
            .await
            .unwrap_or(None);
        last_failed = done.is_none();
        opening = match done {
            Some(deliver) => {
                delivers.push(deliver);
                KEEP_AND_OPEN
            }
            None => UNDO_AND_OPEN,
        };
    }
    // The commit keeps whatever savepoints are still open; only a failed last
    // work has anything to undo first.
    if last_failed {
        transaction
            .execute("ROLLBACK TO SAVEPOINT grouped_work")
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Locks the audit log's head until the caller's transaction ends, on
/// PostgreSQL (SQLite's one writer serialises transactions already). The
/// head is the first lock of every transaction that both appends to the
/// log and locks rows the query path locks too (ledger accounts): one
/// order, so no deadlock.
///
/// # Errors
/// Database failures.
pub(crate) async fn lock_audit_head(connection: &mut AnyConnection) -> Result<()> {
    if Backend::of(connection) == Backend::Postgres {
        sqlx::query("SELECT id FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *connection)
            .await?;
    }
    Ok(())
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

/// A store on a SQLite file in a fresh temporary directory (the directory
/// goes when the returned guard is dropped).
#[cfg(test)]
pub(crate) async fn temporary() -> Result<(tempfile::TempDir, Store)> {
    let dir = tempfile::tempdir().map_err(|source| MarketError::Io {
        context: "temporary directory".into(),
        source,
    })?;
    let store = Store::open(&Location::DataDir(dir.path().to_owned())).await?;
    Ok((dir, store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_grouped_work_runs_in_its_callers_span() -> Result<()> {
        // The subscriber is this thread's only; the committer's thread
        // takes it over when the store opens.
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let (_dir, store) = temporary().await?;
        let caller = tracing::info_span!("caller");
        let seen = store
            .grouped(|_| Box::pin(async { Ok(tracing::Span::current().id()) }))
            .instrument(caller.clone())
            .await?;
        assert!(caller.id().is_some());
        assert_eq!(seen, caller.id());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_works_run_on_the_committers_own_thread() -> Result<()> {
        let (_dir, store) = temporary().await?;
        let thread = store
            .grouped(|_| Box::pin(async { Ok(std::thread::current().name().map(str::to_owned)) }))
            .await?;
        assert_eq!(thread.as_deref(), Some("store-committer"));
        Ok(())
    }

    #[tokio::test]
    async fn sqlite_readers_read_while_the_writer_is_held_and_cannot_write() -> Result<()> {
        let (_dir, store) = temporary().await?;
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
