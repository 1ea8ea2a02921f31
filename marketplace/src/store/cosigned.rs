//! The `cosigned_checkpoints` table: checkpoints every configured witness
//! cosigned, for `GetCheckpoint { witnessed: true }`.

use sqlx::{AnyPool, Row as _};

use crate::error::Result;

/// Keeps the cosigned `note` of the tree of `tree_size` entries; a later
/// note for the same size (the same tree, cosigned again with newer
/// timestamps) replaces it.
///
/// # Errors
/// Database failures.
pub async fn record(pool: &AnyPool, tree_size: u64, note: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO cosigned_checkpoints (tree_size, note, cosigned_at) VALUES ($1, $2, $3) \
         ON CONFLICT (tree_size) DO UPDATE SET note = excluded.note, cosigned_at = excluded.cosigned_at",
    )
    .bind(i64::try_from(tree_size).unwrap_or(i64::MAX))
    .bind(note)
    .bind(super::now_ms())
    .execute(pool)
    .await?;
    Ok(())
}

/// The cosigned note of the largest tree, if any was cosigned.
///
/// # Errors
/// Database failures.
pub async fn latest(pool: &AnyPool) -> Result<Option<String>> {
    let row = sqlx::query("SELECT note FROM cosigned_checkpoints ORDER BY tree_size DESC LIMIT 1")
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|row| row.get::<String, _>(0)))
}
