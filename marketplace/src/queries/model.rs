//! The query path's own records: what a consumer asks, what every party is
//! told about a query, and who may read which usage. The gRPC layer
//! converts them to and from the API's messages.

use sha2::{Digest as _, Sha256};

use crate::error::{MarketError, Result, Unanswered};

use super::{MAX_IDEMPOTENCY_KEY, MAX_SQL_BYTES};

/// A query as a consumer sends it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryRequest {
    /// The product asked.
    pub product_id: String,
    /// SQL for the product's SQL engine, or an algorithm's input.
    pub sql: String,
    /// A consumer algorithm (Wasm), or empty for SQL.
    pub algorithm_wasm: Vec<u8>,
    /// Unique per consumer organization; a retry under it is answered once.
    pub idempotency_key: String,
    /// Most compute units the query may use (0: the server's default).
    pub max_compute_units: i64,
    /// The product's data version to read (0: the newest).
    pub data_version: i64,
}

impl QueryRequest {
    /// Checks the request's own fields.
    pub(super) fn validate(&self, max_compute_units: i64) -> Result<()> {
        if self.product_id.is_empty() {
            return Err(MarketError::invalid("product_id", "is required"));
        }
        let key = &self.idempotency_key;
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(MarketError::invalid(
                "idempotency_key",
                format!(
                    "1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters, unique per request"
                ),
            ));
        }
        if self.sql.len() > MAX_SQL_BYTES {
            return Err(MarketError::invalid(
                "sql",
                format!("at most {MAX_SQL_BYTES} bytes"),
            ));
        }
        if self.algorithm_wasm.is_empty() && self.sql.trim().is_empty() {
            return Err(MarketError::invalid(
                "sql",
                "send SQL, or an algorithm in algorithm_wasm",
            ));
        }
        if !(0..=max_compute_units).contains(&self.max_compute_units) {
            return Err(MarketError::invalid(
                "max_compute_units",
                format!("between 0 (the default) and {max_compute_units}"),
            ));
        }
        Ok(())
    }

    /// What identifies a request for idempotency: the same key with a different
    /// digest is a different request.
    pub(super) fn digest(&self, algorithm_sha256: &str) -> String {
        let mut hasher = Sha256::new();
        for part in [
            self.product_id.as_bytes(),
            self.sql.as_bytes(),
            algorithm_sha256.as_bytes(),
            &self.max_compute_units.to_le_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        // Only when pinned, so that a query stored before versions existed
        // replays under the digest it was stored with.
        if self.data_version != 0 {
            hasher.update(b"data_version");
            hasher.update(self.data_version.to_le_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

/// A query as every party sees it: its state, usage, charge and audit
/// index (what the API's `QuerySummary` carries).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuerySummary {
    /// Its id.
    pub query_id: String,
    /// The contract it ran under.
    pub contract_id: String,
    /// The contract's price plan.
    pub plan_id: String,
    /// `running`, `completed`, `rejected` or `failed`.
    pub state: String,
    /// Why a rejected or failed query did not complete.
    pub error: String,
    /// `exact`, or `withheld` where the product's policy withholds rows
    /// (see [`crate::metering`]).
    pub metering: String,
    /// Fuel burnt (0 where withheld).
    pub fuel: i64,
    /// Compute units used (0 where withheld).
    pub compute_units: i64,
    /// Rows read (0 where withheld).
    pub rows_read: i64,
    /// Bytes read (0 where withheld).
    pub bytes_read: i64,
    /// Rows released to the consumer.
    pub rows_released: i64,
    /// Bytes released to the consumer.
    pub bytes_released: i64,
    /// Always 0: a count of withheld groups would count matching rows.
    pub suppressed_rows: i64,
    /// Whether the row limit cut the result.
    pub truncated: bool,
    /// Epsilon spent.
    pub privacy_spent: f64,
    /// Wall time (0 where withheld).
    pub wall_time_ms: i64,
    /// The plan's currency.
    pub currency: String,
    /// What was held on the balance, in minor units.
    pub held_minor: i64,
    /// What was charged, in minor units.
    pub charge_minor: i64,
    /// Its entry in the audit log, or -1 before it settled.
    pub audit_index: i64,
    /// Whether this answers a retry under an earlier idempotency key.
    pub replayed: bool,
    /// Its SQL (empty in a provider's view).
    pub sql: String,
    /// The algorithm's sha256 (hex), or empty.
    pub algorithm_sha256: String,
    /// The consumer.
    pub consumer_organization_id: String,
    /// The product.
    pub product_id: String,
    /// The user who sent it.
    pub user_id: String,
    /// When it was reserved.
    pub created_at_unix_ms: i64,
    /// The product's provider.
    pub provider_organization_id: String,
    /// The data center whose runner ran it; empty when this server did.
    pub data_center: String,
}

/// A query's outcome: its summary and, when it completed, its result as an
/// Arrow IPC stream.
#[derive(Clone, Debug)]
pub struct QueryOutcome {
    /// Usage, charge and audit index.
    pub summary: QuerySummary,
    /// The released result (empty unless completed).
    pub result: Vec<u8>,
    /// For queries the sandbox refused or stopped: why, and what to say.
    pub error: Option<(Unanswered, String)>,
}

/// Who may see what in usage views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageView {
    /// Platform-admins and regulators: everything.
    Everything,
    /// A consumer: its own queries.
    Consumer,
    /// A provider: queries on its products, without their text.
    Provider,
}

/// Which queries a usage view lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// One product, or every one (empty).
    pub product_id: String,
    /// For cross-tenant readers: one consumer organization, or every one.
    pub organization_id: String,
    /// One period (`YYYY-MM`), or every one (empty).
    pub period: String,
    /// At most this many (0: 1,000).
    pub limit: i64,
}
