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
            // Rows with no unit count for no one in a query's distinct
            // count, and are kept apart: see [`Change::no_unit`].
            let unit_key = if batch.column(unit).is_null(row) {
                NO_UNIT
            } else {
                key(keys.row(row).as_ref())
            };
            let sum = summaries.entry(unit_key).or_default();
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

/// The key of rows whose unit is null.
const NO_UNIT: u128 = u128::MAX;

/// How two summaries differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Units present in one only, or with other rows.
    pub units: usize,
    /// Whether rows with no unit changed: no query counts them as anyone,
    /// so such a change is safe to publish only beside at least the
    /// minimum of real units.
    pub no_unit: bool,
}

impl Change {
    /// Whether a version with this change keeps two versions from singling
    /// anyone out: nothing changed, or at least `min_units` real units did.
    #[must_use]
    pub fn allowed(self, min_units: usize) -> bool {
        (self.units == 0 && !self.no_unit) || self.units >= min_units
    }
}

/// How `after` differs from `before`.
#[must_use]
pub fn changed_units(before: &HashMap<u128, u64>, after: &HashMap<u128, u64>) -> Change {
    let differs = |unit: &u128| before.get(unit) != after.get(unit);
    let units = before
        .keys()
        .chain(after.keys().filter(|unit| !before.contains_key(*unit)))
        .filter(|unit| **unit != NO_UNIT && differs(unit))
        .count();
    Change {
        units,
        no_unit: differs(&NO_UNIT),
    }
}

/// The change an append of rows summarised as `appended` makes.
#[must_use]
pub fn appended(appended: &HashMap<u128, u64>) -> Change {
    Change {
        units: appended.keys().filter(|unit| **unit != NO_UNIT).count(),
        no_unit: appended.contains_key(&NO_UNIT),
    }
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
            changed_units(&before, &after).units,
            3,
            "b changed, c gone, d new"
        );
        assert_eq!(changed_units(&before, &before).units, 0);
        assert!(changed_units(&before, &before).allowed(10));
        // Nine real people and a row with no unit are not ten.
        let mut nulls = after.clone();
        nulls.insert(NO_UNIT, 7);
        let change = changed_units(&after, &nulls);
        assert_eq!(
            change,
            Change {
                units: 0,
                no_unit: true
            }
        );
        assert!(!change.allowed(10));
        assert!(
            !appended(&nulls).allowed(10),
            "three units and no-unit rows"
        );
    }
}
