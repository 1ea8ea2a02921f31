//! How many privacy units a new version of a table changes. Two versions of
//! a product are two answers to the same question a consumer may ask: if
//! they differ in the rows of a few people, the difference of two
//! aggregates that each pass the output policy is those people's values.
//! A version therefore changes the rows of none, or of at least the
//! policy's minimum aggregation count, of the privacy units.
//!
//! Each unit's rows are summarised as the wrapping sum of a hash of each row
//! (every column's value as text), which does not depend on row order or on
//! how the rows are split into files; a unit changes when its sum does.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use arrow_cast::display::{ArrayFormatter, FormatOptions};

use crate::TableStore;

/// Each privacy unit's rows in `table` of `store`, summarised: unit (its
/// value as text) → wrapping sum of its rows' hashes.
///
/// # Errors
/// A table that cannot be read, or that has no column `unit_column`.
pub fn unit_summaries(
    store: &dyn TableStore,
    table: &str,
    unit_column: &str,
) -> Result<HashMap<String, u64>, String> {
    let schema = store.schema(table)?;
    let unit = schema
        .index_of(unit_column)
        .map_err(|_| format!("table {table} has no column {unit_column}"))?;
    let columns: Vec<usize> = (0..schema.fields().len()).collect();
    let options = FormatOptions::default().with_null("\u{0}null");
    let mut summaries: HashMap<String, u64> = HashMap::new();
    for batch in store.scan(table, &columns)? {
        let batch = batch?;
        let formatters = batch
            .columns()
            .iter()
            .map(|column| ArrayFormatter::try_new(column.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| error.to_string())?;
        for row in 0..batch.num_rows() {
            let mut hasher = DefaultHasher::new();
            for formatter in &formatters {
                formatter.value(row).to_string().hash(&mut hasher);
            }
            let key = formatters[unit].value(row).to_string();
            let sum = summaries.entry(key).or_default();
            *sum = sum.wrapping_add(hasher.finish());
        }
    }
    Ok(summaries)
}

/// How many units `after` differs from `before` in: present in one only,
/// or with other rows.
#[must_use]
pub fn changed_units(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> usize {
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

    fn summaries(rows: &[(&str, u64)]) -> HashMap<String, u64> {
        rows.iter()
            .map(|(unit, sum)| ((*unit).to_owned(), *sum))
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
