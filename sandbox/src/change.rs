//! How many privacy units a new version of a table changes. Two versions of
//! a product are two answers to the same question a consumer may ask: if
//! they differ in the rows of a few people, the difference of two
//! aggregates that each pass the output policy is those people's values.
//! A version therefore changes the rows of none, or of at least the
//! policy's minimum aggregation count, of the privacy units.
//!
//! Each unit's rows are summarised as the wrapping sum of a hash of each row
//! (its arrow-row encoding: every column's value, comparable as bytes), which
//! does not depend on row order or on how the rows are split into files; a
//! unit changes when its sum does. Both sides must have the same schema, as
//! a version's canonical files do.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use arrow_row::{RowConverter, SortField};

use crate::TableStore;

/// Each privacy unit's rows in `table` of `store`, summarised: unit (a
/// 128-bit hash of its value's row encoding) → wrapping sum of its rows'
/// hashes.
///
/// # Errors
/// A table that cannot be read, or that has no column `unit_column`.
pub fn unit_summaries(
    store: &dyn TableStore,
    table: &str,
    unit_column: &str,
) -> Result<HashMap<u128, u64>, String> {
    let schema = store.schema(table)?;
    let unit = schema
        .index_of(unit_column)
        .map_err(|_| format!("table {table} has no column {unit_column}"))?;
    let columns: Vec<usize> = (0..schema.fields().len()).collect();
    let rows = RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|field| SortField::new(field.data_type().clone()))
            .collect(),
    )
    .map_err(|error| error.to_string())?;
    let units = RowConverter::new(vec![SortField::new(schema.field(unit).data_type().clone())])
        .map_err(|error| error.to_string())?;
    let mut summaries: HashMap<u128, u64> = HashMap::new();
    for batch in store.scan(table, &columns)? {
        let batch = batch?;
        let encoded = rows
            .convert_columns(batch.columns())
            .map_err(|error| error.to_string())?;
        let keys = units
            .convert_columns(std::slice::from_ref(batch.column(unit)))
            .map_err(|error| error.to_string())?;
        for row in 0..batch.num_rows() {
            let mut hasher = DefaultHasher::new();
            encoded.row(row).as_ref().hash(&mut hasher);
            let sum = summaries.entry(key(keys.row(row).as_ref())).or_default();
            *sum = sum.wrapping_add(hasher.finish());
        }
    }
    Ok(summaries)
}

/// A unit's key: two independent 64-bit hashes of its value, so that two
/// units collide with odds of about one in 2^64 even among millions.
fn key(value: &[u8]) -> u128 {
    let half = |salt: u8| {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        value.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

/// How many units `after` differs from `before` in: present in one only,
/// or with other rows.
#[must_use]
pub fn changed_units(before: &HashMap<u128, u64>, after: &HashMap<u128, u64>) -> usize {
    let gone_or_changed = before
        .iter()
        .filter(|(unit, sum)| after.get(*unit) != Some(sum))
        .count();
    let new = after
        .keys()
        .filter(|unit| !before.contains_key(*unit))
        .count();
    gone_or_changed + new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summaries(rows: &[(&str, u64)]) -> HashMap<u128, u64> {
        rows.iter()
            .map(|(unit, sum)| (key(unit.as_bytes()), *sum))
            .collect()
    }

    #[test]
    fn units_gone_new_or_with_other_rows_count_once_each() {
        let before = summaries(&[("a", 1), ("b", 2), ("c", 3)]);
        let after = summaries(&[("a", 1), ("b", 9), ("d", 4)]);
        assert_eq!(
            changed_units(&before, &after),
            3,
            "b changed, c gone, d new"
        );
        assert_eq!(changed_units(&before, &before), 0);
    }
}
