//! Several servers on one database (docs/marketplace.md, "Several servers
//! on one PostgreSQL"): each renews a lease while it lives, gives up the
//! queries of servers that stopped, and hears from the others, through
//! PostgreSQL `LISTEN`/`NOTIFY`, which contracts and role bindings they
//! changed, so that what it keeps in memory follows within a second.
//!
//! What must hold across servers the database holds itself: a query's hold
//! and idempotency key are rows with unique keys, every ledger and audit
//! write queues on row locks, and a revoked contract is refused by the
//! reservation's own read of it, whatever this server's index says.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;

use super::Marketplace;
use crate::contracts::ContractIndex;
use crate::error::Result;
use crate::store::queries::LEGACY_RUN_GRACE;
use crate::store::replicas::{self, CHANGES_CHANNEL, Change};

/// How often a server renews its lease and looks for stopped servers'
/// queries.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

/// How long a server that stopped renewing counts as alive. A server that
/// stalls this long (a paused VM) finds its running queries given up, and
/// their settlement refused rather than charged twice.
pub const REPLICA_LEASE: Duration = Duration::from_secs(10);

/// The wait before listening again after the notice connection failed.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// How often each server sends a ping notice (with its lease renewal). A
/// listening connection that delivers not even those (a socket left
/// half-open by a failover or a partition) is replaced after three periods
/// of silence.
const PING_EVERY: Duration = RENEW_EVERY;

/// How often a server reads contracts and roles again whatever it heard: a
/// bound on staleness that does not depend on notices at all.
const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// The longest a lease renewal may take before it is tried afresh.
const RENEWAL_WITHIN: Duration = Duration::from_secs(4);

/// How long this server's writes may hang before it stops renewing its
/// lease: its queries could not settle, so others should give them up.
const WRITES_STALLED_AFTER: Duration = Duration::from_secs(8);

/// How long a server's own renewals must have succeeded without a gap
/// before it gives up others' queries: after the database was out for a
/// while, every lease has lapsed, and the first server back must not take
/// the others' live queries for stopped before they could renew.
const SWEEP_AFTER_RENEWING_FOR: Duration = Duration::from_secs(12);

/// The background work that lets a server share its database: stop it when
/// the server stops serving.
#[derive(Debug)]
pub struct Upkeep {
    market: Arc<Marketplace>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    following: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Upkeep {
    /// Dropped without [`Upkeep::stop`] (the serving future was dropped):
    /// the lease is no longer renewed, and lapses.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Upkeep {
    /// Waits, at most `within`, until this server follows the others'
    /// changes (on PostgreSQL: listens, and has read contracts and roles
    /// since); `false` if it does not by then. What it loaded at open may
    /// be minutes old by the time it serves.
    pub async fn following(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.following.wait_for(|following| *following))
            .await
            .is_ok_and(|following| following.is_ok())
    }

    /// Stops renewing and listening, and removes this server's lease, so
    /// the others need not wait for it to lapse.
    pub async fn stop(mut self) {
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
        let left = async {
            let mut connection = self.market.store.acquire().await?;
            replicas::leave(&mut connection, &self.market.replica_id).await
        };
        if let Err(error) = left.await {
            tracing::warn!(%error, "could not remove this server's lease; it lapses by itself");
        }
    }
}

impl Marketplace {
    /// This server's id among those sharing its database.
    #[must_use]
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Records this server's lease, then gives up the queries that servers
    /// which stopped left running (see [`crate::queries::recover_interrupted`]):
    /// at once on SQLite, once their leases lapse on PostgreSQL.
    ///
    /// # Errors
    /// Database failures.
    pub async fn recover_interrupted(&self) -> Result<u64> {
        self.renew_lease().await?;
        // SQLite has one server per file: whoever left queries running is
        // this server's previous run, stopped for certain.
        let (lease, legacy_grace) = match self.store.backend() {
            crate::store::Backend::Sqlite => (Duration::ZERO, Duration::ZERO),
            crate::store::Backend::Postgres => (REPLICA_LEASE, LEGACY_RUN_GRACE),
        };
        crate::queries::recover_interrupted(&self.store, &self.replica_id, lease, legacy_grace)
            .await
    }

    async fn renew_lease(&self) -> Result<()> {
        let mut connection = self.store.acquire().await?;
        replicas::renew(
            &mut connection,
            self.store.backend(),
            &self.replica_id,
            &host_name(),
        )
        .await
    }

    /// Starts renewing this server's lease, sweeping stopped servers'
    /// queries and, on PostgreSQL, following the other servers' changes.
    #[must_use]
    pub fn start_upkeep(self: &Arc<Self>) -> Upkeep {
        let renewing_since = Arc::new(std::sync::Mutex::new(None));
        let mut tasks = vec![
            tokio::spawn(keep_lease(Arc::clone(self), Arc::clone(&renewing_since))),
            tokio::spawn(sweep(Arc::clone(self), renewing_since)),
        ];
        let (followed, following) = tokio::sync::watch::channel(false);
        if let Some(url) = self.store.listen_url() {
            tasks.push(tokio::spawn(follow_changes(
                Arc::clone(self),
                url.to_owned(),
                followed,
            )));
        } else {
            // One server per SQLite file: nothing to follow.
            followed.send_replace(true);
        }
        Upkeep {
            market: Arc::clone(self),
            tasks,
            following,
        }
    }

    /// Reads again everything other servers may have changed: the contract
    /// index and casbin's rules.
    ///
    /// # Errors
    /// Database or casbin failures; what was kept stays as it was.
    pub async fn reload_shared_state(&self) -> Result<()> {
        let mut connection = self.store.reader().acquire().await?;
        let contracts = ContractIndex::load(&mut connection).await?;
        self.access.reload(&mut connection).await?;
        self.contracts.replace_with(contracts);
        Ok(())
    }

    async fn apply_change(&self, change: Option<Change>) -> Result<()> {
        match change {
            Some(Change::Contract(id)) => {
                let mut connection = self.store.reader().acquire().await?;
                let contract = crate::store::contracts::get(&mut connection, &id).await?;
                self.contracts.update(&contract);
                Ok(())
            }
            Some(Change::Access) => {
                let mut connection = self.store.reader().acquire().await?;
                self.access.reload(&mut connection).await
            }
            Some(Change::Ping) => Ok(()),
            None => self.reload_shared_state().await,
        }
    }
}

/// `url` with an `application_name`, so that `pg_stat_activity` tells a
/// server's connections apart.
fn named_connection(url: &str, name: &str) -> String {
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}application_name={name}")
}

fn host_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!("{host} pid {}", std::process::id())
}

/// Renews this server's lease every [`RENEW_EVERY`], on a connection of its
/// own on PostgreSQL: a pool exhausted by requests, or a sweep waiting for
/// a lock, must not let a live server's lease lapse.
async fn keep_lease(market: Arc<Marketplace>, renewing_since: RenewingSince) {
    let mut ticks = tokio::time::interval(RENEW_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut own: Option<sqlx::AnyConnection> = None;
    let set_since = |since: Option<std::time::Instant>| {
        *renewing_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = since;
    };
    loop {
        ticks.tick().await;
        if market
            .store
            .writes_stalled_for()
            .is_some_and(|stalled| stalled > WRITES_STALLED_AFTER)
        {
            tracing::warn!(
                "this server's writes hang; not renewing its lease, so others take its queries over"
            );
            set_since(None);
            continue;
        }
        let renewal = async {
            let backend = market.store.backend();
            let host = host_name();
            match market.store.listen_url() {
                Some(url) => {
                    if own.is_none() {
                        own = Some(
                            <sqlx::AnyConnection as sqlx::Connection>::connect(&named_connection(
                                url,
                                "civicgrid-lease",
                            ))
                            .await?,
                        );
                    }
                    let connection = own.as_mut().expect("connected just now");
                    replicas::renew(connection, backend, &market.replica_id, &host).await?;
                    // Every server's listener expects to hear these.
                    replicas::announce(connection, backend, &Change::Ping).await
                }
                None => market.renew_lease().await,
            }
        };
        match tokio::time::timeout(RENEWAL_WITHIN, renewal).await {
            Ok(Ok(())) => {
                let mut since = renewing_since
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                since.get_or_insert_with(std::time::Instant::now);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not renew this server's lease");
                own = None;
                set_since(None);
            }
            Err(_) => {
                tracing::warn!("renewing this server's lease took too long; reconnecting");
                own = None;
                set_since(None);
            }
        }
    }
}

/// Since when this server's lease renewals have succeeded without a gap.
type RenewingSince = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

/// Gives up, every [`RENEW_EVERY`], the queries of servers whose leases
/// lapsed, and forgets those servers.
async fn sweep(market: Arc<Marketplace>, renewing_since: RenewingSince) {
    let mut ticks = tokio::time::interval(RENEW_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let renewing_long_enough = renewing_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|since| since.elapsed() >= SWEEP_AFTER_RENEWING_FOR);
        if !renewing_long_enough {
            continue;
        }
        match crate::queries::recover_interrupted(
            &market.store,
            &market.replica_id,
            REPLICA_LEASE,
            LEGACY_RUN_GRACE,
        )
        .await
        {
            Ok(0) => {}
            Ok(interrupted) => tracing::warn!(
                interrupted,
                "gave up queries another server left running when it stopped (none was charged)"
            ),
            Err(error) => tracing::warn!(%error, "could not look for stopped servers' queries"),
        }
        let forgotten = async {
            let mut connection = market.store.acquire().await?;
            replicas::forget_stopped(
                &mut connection,
                market.store.backend(),
                &market.replica_id,
                i64::try_from(REPLICA_LEASE.as_millis()).unwrap_or(i64::MAX),
            )
            .await
        };
        if let Err(error) = forgotten.await {
            tracing::warn!(%error, "could not forget stopped servers");
        }
    }
}

/// Listens for the other servers' change notices. Notices sent while no
/// connection listened are lost, so every (re)connection starts with a
/// full read of what they could have changed; so does every
/// [`RELOAD_EVERY`]. A connection that delivers nothing, not even pings,
/// for three ping periods is replaced.
async fn follow_changes(
    market: Arc<Marketplace>,
    url: String,
    followed: tokio::sync::watch::Sender<bool>,
) {
    loop {
        let listening = async {
            let mut listener =
                PgListener::connect(&named_connection(&url, "civicgrid-changes")).await?;
            listener.listen(CHANGES_CHANNEL).await?;
            Ok::<_, crate::error::MarketError>(listener)
        };
        let mut listener = match listening.await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for other servers' changes; retrying");
                tokio::time::sleep(RELISTEN_AFTER).await;
                continue;
            }
        };
        if let Err(error) = market.reload_shared_state().await {
            tracing::warn!(%error, "cannot read contracts and roles again; retrying");
            tokio::time::sleep(RELISTEN_AFTER).await;
            continue;
        }
        followed.send_replace(true);
        // The listener only ever waits for notices, in a task of its own
        // (a wait that is given up midway could leave its connection
        // half-read); what it hears comes here.
        let (heard, mut notices) = tokio::sync::mpsc::channel::<String>(256);
        let receiving = tokio::spawn(async move {
            while let Ok(Some(notice)) = listener.try_recv().await {
                if heard.send(notice.payload().to_owned()).await.is_err() {
                    return;
                }
            }
        });
        let mut reloads = tokio::time::interval(RELOAD_EVERY);
        reloads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reloads.tick().await;
        loop {
            let payload = tokio::select! {
                payload = tokio::time::timeout(PING_EVERY * 3, notices.recv()) => payload,
                _ = reloads.tick() => {
                    if let Err(error) = market.reload_shared_state().await {
                        tracing::warn!(%error, "cannot read contracts and roles again");
                    }
                    continue;
                }
            };
            let change = match payload {
                Ok(Some(payload)) => Change::parse(&payload),
                // The connection was lost: listen anew and read everything.
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("no notice, not even a ping, for a while; listening anew");
                    break;
                }
            };
            if let Err(error) = market.apply_change(change).await {
                tracing::warn!(%error, "cannot apply another server's change; reading everything again");
                if let Err(error) = market.reload_shared_state().await {
                    tracing::warn!(%error, "cannot read contracts and roles again");
                    break;
                }
            }
        }
        receiving.abort();
        tokio::time::sleep(RELISTEN_AFTER).await;
    }
}
