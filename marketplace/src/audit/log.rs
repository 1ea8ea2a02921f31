//! The audit log in the database: entries are the leaves of an RFC 9162 tree
//! whose perfect subtree hashes are stored as they complete, so proofs for any
//! tree size are a handful of key lookups.
//!
//! Appends happen inside the caller's transaction, so an audited change and its
//! entry commit together or not at all. The head row (size and right-edge
//! hashes) serialises appenders: PostgreSQL locks it with `FOR UPDATE`; SQLite
//! has a single writer.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{AnyConnection, Row as _};

use super::merkle::{
    self, Frontier, Hash, NodeId, Range, consistency_proof_ranges, fold_decomposition,
    inclusion_proof_ranges, perfect_decomposition,
};
use crate::error::{MarketError, Result};
use crate::store::{Backend, Param, WriteBatch, now_ms};

/// Rows per multi-row INSERT: well under both databases' parameter limits.
/// Measured: 500 beats 200 and 2,000 (larger statements are re-prepared for
/// every batch's odd-sized remainder and cost more than they save).
const INSERT_CHUNK: usize = 500;

/// Something that happened, to be logged.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// What happened, dotted: `product.registered`, `contract.approved`,
    /// `policy.role_granted`.
    pub kind: String,
    /// The user who did it (or `system`).
    pub actor: String,
    /// The tenant it concerns (an organization id; `*` for platform-wide).
    pub tenant: String,
    /// The object it concerns, e.g. a product or contract id.
    pub subject: String,
    /// Whatever else a regulator needs to know, as JSON.
    pub details: serde_json::Value,
}

/// The exact bytes logged for an event: canonical JSON with a timestamp.
#[derive(Serialize)]
struct Body<'a> {
    at_unix_ms: i64,
    #[serde(flatten)]
    event: &'a Event,
}

/// The log's head: how many entries, and the right-edge hashes.
///
/// # Errors
/// Database failures or a corrupt head.
pub async fn head(connection: &mut AnyConnection, _backend: Backend) -> Result<Frontier> {
    read_head(
        connection,
        "SELECT size, frontier FROM audit_head WHERE id = 1",
    )
    .await
}

/// The head, locked for an append until the caller's transaction ends.
pub(crate) async fn head_for_append(
    connection: &mut AnyConnection,
    backend: Backend,
) -> Result<Frontier> {
    let sql = format!(
        "SELECT {HEAD_FOR_APPEND_COLUMNS} FROM audit_head AS head WHERE head.id = 1{}",
        head_for_append_lock(backend)
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *connection)
        .await?;
    head_for_append_from_row(&row)
}

async fn read_head(connection: &mut AnyConnection, sql: &'static str) -> Result<Frontier> {
    let row = sqlx::query(sql).fetch_one(&mut *connection).await?;
    frontier_from_row(&row, "size", "frontier")
}

/// The head's columns, for a caller that reads the head for an append in a
/// statement of its own, beside reads of its own (one trip to SQLite's writer
/// instead of two): `SELECT … {HEAD_FOR_APPEND_COLUMNS} FROM audit_head AS
/// head … WHERE head.id = 1`, followed on PostgreSQL by
/// [`head_for_append_lock`]. [`head_for_append_from_row`] reads them back.
pub const HEAD_FOR_APPEND_COLUMNS: &str =
    "head.size AS audit_head_size, head.frontier AS audit_head_frontier";

/// The lock clause that ends a statement reading the head for an append:
/// appenders queue on the head row until their transactions end.
#[must_use]
pub fn head_for_append_lock(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE OF head",
    }
}

/// The head from a row with [`HEAD_FOR_APPEND_COLUMNS`].
///
/// # Errors
/// A missing column or a corrupt head.
pub fn head_for_append_from_row(row: &sqlx::any::AnyRow) -> Result<Frontier> {
    frontier_from_row(row, "audit_head_size", "audit_head_frontier")
}

fn frontier_from_row(row: &sqlx::any::AnyRow, size: &str, frontier: &str) -> Result<Frontier> {
    let size: i64 = row.try_get(size)?;
    let frontier: Vec<u8> = row.try_get(frontier)?;
    if !frontier.len().is_multiple_of(32) {
        return Err(MarketError::Corrupt("audit head frontier length".into()));
    }
    let hashes = frontier
        .chunks_exact(32)
        .map(|chunk| <Hash>::try_from(chunk).expect("32-byte chunks"))
        .collect();
    Frontier::from_parts(size as u64, hashes)
        .map_err(|_| MarketError::Corrupt("audit head frontier does not match its size".into()))
}

/// Appends one entry in a transaction of its own (for decisions that
/// change nothing else); returns its index.
///
/// # Errors
/// Database failures (nothing is appended).
pub async fn append_alone(store: &crate::store::Store, event: Event) -> Result<u64> {
    let mut transaction = store.begin().await?;
    let index = append(&mut transaction, store.backend(), &[event]).await?[0];
    transaction.commit().await?;
    Ok(index)
}

/// Appends `events` in the caller's transaction; returns their indexes.
///
/// # Errors
/// Database failures; the transaction should then be rolled back.
pub async fn append(
    connection: &mut AnyConnection,
    backend: Backend,
    events: &[Event],
) -> Result<Vec<u64>> {
    let mut batch = WriteBatch::new();
    let indexes = append_into(connection, &mut batch, backend, events).await?;
    batch.execute(connection).await?;
    Ok(indexes)
}

/// Reads (and on PostgreSQL locks) the log's head now, and adds the entries,
/// their tree nodes and the new head to `batch`; returns their indexes. The
/// batch must run in the same transaction before anything else appends,
/// which is why a batch takes only one append.
///
/// # Errors
/// `Corrupt` for a second append into one batch or a corrupt head; database
/// failures.
#[tracing::instrument(name = "audit", skip_all, fields(events = events.len()))]
pub async fn append_into(
    connection: &mut AnyConnection,
    batch: &mut WriteBatch,
    backend: Backend,
    events: &[Event],
) -> Result<Vec<u64>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let frontier = head_for_append(connection, backend).await?;
    append_after(batch, backend, frontier, events)
}

/// Adds the entries, their tree nodes and the new head to `batch` after
/// `frontier`, the head as the caller's transaction read it for an append
/// (see [`HEAD_FOR_APPEND_COLUMNS`]); returns their indexes. The batch must
/// run in that transaction before anything else appends.
///
/// # Errors
/// `Corrupt` for a second append into one batch.
pub fn append_after(
    batch: &mut WriteBatch,
    backend: Backend,
    mut frontier: Frontier,
    events: &[Event],
) -> Result<Vec<u64>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    batch.claim_audit_append()?;
    let at_unix_ms = now_ms();
    let mut entries = Vec::with_capacity(events.len());
    let mut nodes = Vec::with_capacity(events.len() * 2);
    let mut indexes = Vec::with_capacity(events.len());
    for event in events {
        let body = serde_json::to_vec(&Body { at_unix_ms, event })
            .map_err(|error| MarketError::Corrupt(format!("audit body: {error}")))?;
        let index = frontier.size();
        nodes.extend(frontier.push(merkle::leaf_hash(&body)));
        indexes.push(index);
        entries.push((index, event, body));
    }
    for chunk in entries.chunks(INSERT_CHUNK) {
        let sql = values_sql(
            "INSERT INTO audit_entries (idx, kind, tenant, body) VALUES ",
            4,
            chunk.len(),
            backend,
        );
        let mut params = Vec::with_capacity(chunk.len() * 4);
        for (index, event, body) in chunk {
            params.extend([
                Param::Int(*index as i64),
                Param::from(&event.kind),
                Param::from(&event.tenant),
                Param::Blob(body.clone()),
            ]);
        }
        batch.push(sql, params);
    }
    for chunk in nodes.chunks(INSERT_CHUNK) {
        let sql = values_sql(
            "INSERT INTO audit_nodes (node_key, hash) VALUES ",
            2,
            chunk.len(),
            backend,
        );
        let mut params = Vec::with_capacity(chunk.len() * 2);
        for (id, hash) in chunk {
            params.extend([Param::Int(id.key()), Param::Blob(hash.to_vec())]);
        }
        batch.push(sql, params);
    }
    let frontier_bytes: Vec<u8> = frontier.hashes().concat();
    batch.push(
        "UPDATE audit_head SET size = $1, frontier = $2 WHERE id = 1",
        vec![
            Param::Int(frontier.size() as i64),
            Param::Blob(frontier_bytes),
        ],
    );
    Ok(indexes)
}

/// A multi-row INSERT's SQL. SQLite gets anonymous `?` parameters: sqlx binds
/// each `$N` by asking SQLite for its name, a linear search through the
/// statement's names, which made binding a 500-row insert quadratic (two
/// thirds of an append's time, measured with perf).
fn values_sql(prefix: &str, columns: usize, rows: usize, backend: Backend) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * columns * 5);
    sql.push_str(prefix);
    let mut parameter = 1;
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push(',');
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&parameter.to_string());
                }
            }
            parameter += 1;
        }
        sql.push(')');
    }
    sql
}

/// The hashes of `ranges`, each folded from stored perfect subtrees, fetched
/// in one query.
async fn range_hashes(connection: &mut AnyConnection, ranges: &[Range]) -> Result<Vec<Hash>> {
    let decompositions: Vec<Vec<NodeId>> =
        ranges.iter().map(|r| perfect_decomposition(*r)).collect();
    let mut wanted: Vec<NodeId> = decompositions.iter().flatten().copied().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let found = fetch_nodes(connection, &wanted).await?;
    decompositions
        .iter()
        .map(|ids| {
            let hashes = ids
                .iter()
                .map(|id| {
                    found.get(id).copied().ok_or_else(|| {
                        MarketError::Corrupt(format!(
                            "audit node level {} index {} is missing",
                            id.level, id.index
                        ))
                    })
                })
                .collect::<Result<Vec<Hash>>>()?;
            fold_decomposition(&hashes)
                .ok_or_else(|| MarketError::Corrupt("empty proof range".into()))
        })
        .collect()
}

async fn fetch_nodes(
    connection: &mut AnyConnection,
    ids: &[NodeId],
) -> Result<HashMap<NodeId, Hash>> {
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(INSERT_CHUNK) {
        let mut sql = String::from("SELECT node_key, hash FROM audit_nodes WHERE node_key IN (");
        for position in 1..=chunk.len() {
            if position > 1 {
                sql.push(',');
            }
            sql.push('$');
            sql.push_str(&position.to_string());
        }
        sql.push(')');
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id.key());
        }
        for row in query.fetch_all(&mut *connection).await? {
            let key: i64 = row.try_get("node_key")?;
            let hash: Vec<u8> = row.try_get("hash")?;
            let hash = <Hash>::try_from(hash.as_slice())
                .map_err(|_| MarketError::Corrupt("audit node hash length".into()))?;
            found.insert(NodeId::from_key(key), hash);
        }
    }
    Ok(found)
}

/// The root hash of the first `size` entries.
///
/// # Errors
/// `size` beyond the log, or missing nodes.
pub async fn root_at(connection: &mut AnyConnection, backend: Backend, size: u64) -> Result<Hash> {
    let head = head(connection, backend).await?;
    if size > head.size() {
        return Err(MarketError::invalid(
            "tree_size",
            format!("the log has {} entries", head.size()),
        ));
    }
    if size == head.size() {
        return Ok(head.root());
    }
    if size == 0 {
        return Ok(merkle::empty_root());
    }
    Ok(range_hashes(
        connection,
        &[Range {
            start: 0,
            end: size,
        }],
    )
    .await?[0])
}

/// The leaf hash at `index` and its inclusion proof in the tree of `size`.
///
/// # Errors
/// An index or size outside the log names the field.
pub async fn inclusion_proof(
    connection: &mut AnyConnection,
    backend: Backend,
    index: u64,
    size: u64,
) -> Result<(Hash, Vec<Hash>)> {
    let head = head(connection, backend).await?;
    if size > head.size() {
        return Err(MarketError::invalid(
            "tree_size",
            format!("the log has {} entries", head.size()),
        ));
    }
    if index >= size {
        return Err(MarketError::invalid(
            "index",
            format!("must be below tree_size {size}"),
        ));
    }
    let mut ranges = vec![Range {
        start: index,
        end: index + 1,
    }];
    ranges.extend(inclusion_proof_ranges(index, size));
    let mut hashes = range_hashes(connection, &ranges).await?;
    let leaf = hashes.remove(0);
    Ok((leaf, hashes))
}

/// The consistency proof between the trees of `old_size` and `new_size`.
///
/// # Errors
/// Sizes outside the log or out of order name the field.
pub async fn consistency_proof(
    connection: &mut AnyConnection,
    backend: Backend,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>> {
    let head = head(connection, backend).await?;
    if new_size > head.size() {
        return Err(MarketError::invalid(
            "new_size",
            format!("the log has {} entries", head.size()),
        ));
    }
    if old_size > new_size {
        return Err(MarketError::invalid("old_size", "must not exceed new_size"));
    }
    range_hashes(connection, &consistency_proof_ranges(old_size, new_size)).await
}

/// A logged entry as stored.
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// Its position.
    pub index: u64,
    /// The leaf bytes.
    pub body: Vec<u8>,
}

/// Entries `[start, end)` (at most `limit`), optionally only of a kind prefix
/// and a tenant.
///
/// # Errors
/// Database failures.
pub async fn entries(
    connection: &mut AnyConnection,
    start: u64,
    end: u64,
    kind_prefix: &str,
    tenant: &str,
    limit: u64,
) -> Result<Vec<StoredEntry>> {
    let rows = sqlx::query(
        "SELECT idx, body FROM audit_entries WHERE idx >= $1 AND idx < $2 \
         AND substr(kind, 1, length($3)) = $3 AND ($4 = '' OR tenant = $4) \
         ORDER BY idx LIMIT $5",
    )
    .bind(start as i64)
    .bind(end as i64)
    .bind(kind_prefix.to_owned())
    .bind(tenant.to_owned())
    .bind(limit as i64)
    .fetch_all(&mut *connection)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(StoredEntry {
                index: row.try_get::<i64, _>("idx")? as u64,
                body: row.try_get("body")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Location, Store};

    fn event(i: usize) -> Event {
        Event {
            kind: "test.appended".into(),
            actor: format!("usr-{i}"),
            tenant: "org-a".into(),
            subject: format!("s-{i}"),
            details: serde_json::json!({ "i": i }),
        }
    }

    /// Every inclusion and consistency proof of a 100-entry log, appended in
    /// uneven batches (multi-row inserts of odd sizes), verifies against roots
    /// computed from the stored bodies alone.
    #[tokio::test]
    async fn proofs_from_batched_appends_verify_against_the_entries() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&Location::DataDir(dir.path().to_owned())).await?;
        let total = 100;
        let mut appended = 0;
        for batch in [1, 2, 13, 16, 31, 37] {
            let events: Vec<Event> = (appended..appended + batch).map(event).collect();
            let mut transaction = store.begin().await?;
            let indexes = append(&mut transaction, store.backend(), &events).await?;
            transaction.commit().await?;
            assert_eq!(
                indexes,
                (appended as u64..(appended + batch) as u64).collect::<Vec<_>>()
            );
            appended += batch;
        }
        assert_eq!(appended, total);

        let mut connection = store.pool().acquire().await?;
        let bodies = entries(&mut connection, 0, total as u64, "", "", 1_000).await?;
        let leaves: Vec<Hash> = bodies.iter().map(|e| merkle::leaf_hash(&e.body)).collect();
        assert_eq!(leaves.len(), total);
        let (node_rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_nodes")
            .fetch_one(&mut *connection)
            .await?;
        // Every perfect subtree of 100 leaves, from the leaves up.
        assert_eq!(node_rows, 100 + 50 + 25 + 12 + 6 + 3 + 1);

        for size in 1..=total as u64 {
            let root = merkle::root_of(&leaves[..size as usize]);
            assert_eq!(root_at(&mut connection, store.backend(), size).await?, root);
            for index in [0, size / 3, size / 2, size - 1] {
                let (leaf, path) =
                    inclusion_proof(&mut connection, store.backend(), index, size).await?;
                assert_eq!(leaf, leaves[index as usize]);
                merkle::verify_inclusion(index, size, &leaf, &path, &root)
                    .map_err(|e| anyhow::anyhow!("inclusion {index} in {size}: {e:?}"))?;
            }
            for old in [1, size / 2, size.saturating_sub(1)] {
                if old == 0 || old > size {
                    continue;
                }
                let old_root = merkle::root_of(&leaves[..old as usize]);
                let path = consistency_proof(&mut connection, store.backend(), old, size).await?;
                merkle::verify_consistency(old, size, &path, &old_root, &root)
                    .map_err(|e| anyhow::anyhow!("consistency {old} to {size}: {e:?}"))?;
            }
        }

        Ok(())
    }

    /// A settlement reads the head in its own statement, beside its other
    /// reads, and appends after it: the log it leaves must be the one
    /// `append` would have left, entry for entry and root for root.
    #[tokio::test]
    async fn an_append_after_a_head_read_by_the_caller_extends_the_log() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&Location::DataDir(dir.path().to_owned())).await?;
        let backend = store.backend();
        let mut transaction = store.begin().await?;
        append(&mut transaction, backend, &[event(0), event(1), event(2)]).await?;
        let sql = format!(
            "SELECT 7 AS own_column, {HEAD_FOR_APPEND_COLUMNS} FROM audit_head AS head \
             WHERE head.id = 1{}",
            head_for_append_lock(backend)
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *transaction)
            .await?;
        assert_eq!(row.try_get::<i64, _>("own_column")?, 7);
        let read = head_for_append_from_row(&row)?;
        assert_eq!(read.size(), 3);
        let mut batch = WriteBatch::new();
        assert_eq!(append_after(&mut batch, backend, read, &[event(3)])?, [3]);
        assert!(
            append_after(
                &mut batch,
                backend,
                head(&mut transaction, backend).await?,
                &[event(4)]
            )
            .is_err(),
            "a second append into the batch would fork the log"
        );
        batch.execute(&mut transaction).await?;
        transaction.commit().await?;

        let mut connection = store.pool().acquire().await?;
        let bodies = entries(&mut connection, 0, 4, "", "", 10).await?;
        let leaves: Vec<Hash> = bodies.iter().map(|e| merkle::leaf_hash(&e.body)).collect();
        assert_eq!(leaves.len(), 4);
        assert_eq!(head(&mut connection, backend).await?.size(), 4);
        assert_eq!(
            root_at(&mut connection, backend, 4).await?,
            merkle::root_of(&leaves)
        );
        Ok(())
    }
}
