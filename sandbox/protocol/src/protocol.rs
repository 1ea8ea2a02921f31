//! What crosses the boundary between the host and a guest, besides Arrow IPC
//! record batches. Shared by both sides so the two cannot drift apart.
//!
//! The guest ABI (core Wasm, module `civicgrid`):
//! - `request(ptr, cap) -> i64`: copies the JSON [`GuestRequest`] into guest memory;
//!   returns its length, or minus the length needed when `cap` is too small.
//! - `scan_open(table, columns_ptr, columns_len) -> i32`: opens a scan of a
//!   table over the given column indices (little-endian u32s); returns a handle.
//! - `scan_filter(handle, ptr, len)`: a JSON list of [`ScanPredicate`]s the
//!   host applies to the scan's rows from then on (all of them must hold).
//! - `scan_next(handle, ptr, cap) -> i64`: the next batch as an Arrow IPC stream;
//!   0 at the end, minus the length needed when `cap` is too small.
//! - `emit(ptr, len)`: one result batch as an Arrow IPC stream.
//! - `fail(ptr, len)`: a JSON [`GuestFailure`]; the guest then returns.
//! - `log(ptr, len)`: a diagnostic line (capped by the host).
//! - `partials_next(ptr, cap) -> i64`: in a [`Stage::Final`] run, the next
//!   batch of partial aggregate state the [`Stage::Partial`] runs emitted, as
//!   an Arrow IPC stream, in share order; it waits for a share still running.
//!   0 at the end (and always 0 in any other stage).
//!
//! The guest exports `memory`, `civicgrid_alloc(len) -> ptr` and
//! `civicgrid_run() -> i32` (0 on success).

use serde::{Deserialize, Serialize};

use crate::policy::OutputPolicy;

/// The host's import module name.
pub const IMPORT_MODULE: &str = "civicgrid";
/// The guest's entry point.
pub const RUN_EXPORT: &str = "civicgrid_run";
/// The guest's allocator, for buffers the host fills.
pub const ALLOC_EXPORT: &str = "civicgrid_alloc";

/// The result column the SQL guest adds to aggregate results: how many distinct
/// privacy units each row covers. The host suppresses rows below the threshold
/// and never releases the column.
pub const UNITS_COLUMN: &str = "__civicgrid_units";
/// Field metadata on a released column that is a plain aggregate:
/// `count`, `sum` or `avg` (differential privacy adds noise to these).
pub const AGGREGATE_METADATA: &str = "civicgrid.aggregate";
/// Field metadata naming the column a `sum` or `avg` aggregates.
pub const SOURCE_METADATA: &str = "civicgrid.source";

/// One table the guest can read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableInfo {
    /// The SQL name.
    pub name: String,
    /// Its columns, as the files have them.
    pub schema: arrow_schema::Schema,
}

/// What the guest is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestRequest {
    /// The consumer's SQL (the SQL guest); algorithms receive it as their input.
    pub sql: String,
    /// The product's tables, indexed by position in `scan_open`.
    pub tables: Vec<TableInfo>,
    /// The product's output policy.
    pub policy: OutputPolicy,
    /// Threshold the host will enforce; the guest needs it to decide what to count.
    pub min_units: u64,
    /// Which part of a split run this instance does.
    #[serde(default)]
    pub stage: Stage,
}

/// A large scan is split across instances that run on the host's cores:
/// each computes the query's partial aggregate over its share of one table's
/// rows, and the final instance, which aggregates share 0 itself, merges
/// those states and runs the rest of the plan. The split depends only on the
/// data, never on the machine, so the same query always costs the same fuel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    /// The whole query in one instance.
    #[default]
    Whole,
    /// The partial aggregate over share `part` of `parts` of table `table`
    /// (the host streams only that share). What the guest emits is
    /// intermediate state: the host hands it to the final instance and never
    /// releases it. A plan that cannot be split this way fails with
    /// [`GuestFailure::NotSplittable`], and the host runs it whole.
    Partial {
        /// The table whose row groups are split.
        table: usize,
        /// This instance's share, from 0.
        part: usize,
        /// How many shares there are.
        parts: usize,
    },
    /// Share 0's partial aggregate, its state kept in the instance, then the
    /// rest of the plan over that state and the other shares' (read with
    /// `partials_next`, in share order). The first scan the guest opens is
    /// share 0 of `table` (the partial aggregate's); any later one reads its
    /// table whole. Answers [`GuestFailure::NotSplittable`] like a partial
    /// instance. Planning the query once for both phases, instead of in an
    /// instance of its own after the shares, takes that planning off the end
    /// of every split run.
    Final {
        /// The table whose rows are split.
        table: usize,
        /// How many shares there are (this instance aggregates share 0).
        parts: usize,
    },
}

/// A condition on one column of a scan, that the host checks on every row it
/// reads so that rows which cannot match never cross into the sandbox. The
/// engine keeps its own filter above the scan, so the host's is only ever a
/// first cut: a row it lets through is still judged by the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanPredicate {
    /// Position of the column in the scan's column list (not in the table).
    pub column: usize,
    /// How the column compares with `value`.
    pub op: CompareOp,
    /// Of the column's own type: the host refuses a value it cannot hold.
    pub value: ScanValue,
}

/// The comparisons a [`ScanPredicate`] makes. A row whose column is null
/// never matches, as in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
}

/// The literal a [`ScanPredicate`] compares with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum ScanValue {
    /// A boolean column.
    Boolean(bool),
    /// A signed integer column of any width.
    Int(i64),
    /// An unsigned integer column of any width.
    UInt(u64),
    /// A floating-point column (finite values only).
    Float(f64),
    /// A Decimal128 column: the unscaled value, in decimal digits (JSON
    /// numbers do not reach 128 bits), at the column's own scale.
    Decimal(String),
    /// A Date32 column: days since 1970-01-01.
    Date32(i32),
    /// A string column (Utf8, LargeUtf8 or Utf8View).
    Utf8(String),
}

/// Why a guest refused or failed a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestFailure {
    /// The query breaks the output policy (found in its plan, before it ran).
    #[error("refused by the output policy ({rule}): {message}")]
    Policy {
        /// e.g. `blocked-columns`, `aggregation.dimension-columns`, `list.columns`.
        rule: String,
        /// The column at fault, when there is one.
        column: Option<String>,
        /// For the consumer.
        message: String,
    },
    /// The SQL does not parse or plan.
    #[error("invalid query: {message}")]
    Query {
        /// The engine's message.
        message: String,
    },
    /// The engine failed while running.
    #[error("query failed: {message}")]
    Execution {
        /// The engine's message.
        message: String,
    },
    /// Asked for a [`Stage::Partial`] run, the guest found a plan that cannot
    /// be split (no single partial aggregate over a plain scan of the split
    /// table). Not the consumer's concern: the host runs the query whole.
    #[error("the plan cannot be split across instances: {reason}")]
    NotSplittable {
        /// What stood in the way.
        reason: String,
    },
}

impl GuestFailure {
    /// A policy refusal.
    pub fn policy(rule: &str, column: Option<&str>, message: impl Into<String>) -> Self {
        Self::Policy {
            rule: rule.to_owned(),
            column: column.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// Schema metadata on an aggregate result: the threshold the guest worked out
/// for the columns the query read (the host enforces the larger of this and
/// the product's own).
pub const MIN_UNITS_METADATA: &str = "civicgrid.min_units";
