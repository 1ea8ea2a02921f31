//! A reserved query in the sandbox, and the one place its failures become
//! what the consumer is told.

use std::sync::Arc;

use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{
    DeclaredColumns, FUEL_PER_COMPUTE_UNIT, GuestRole, Job, Limits, LocalDirectory, RunFailure,
    SandboxError, TableStore, VersionTables,
};

use crate::error::Unanswered;
use crate::metering::Metering;

use super::QueryEngine;
use super::reserve::ProductFiles;

/// What one sandbox run needs from its reservation, moved onto the blocking
/// thread that runs it.
pub(super) struct SandboxRun {
    pub(super) storage: ProductFiles,
    pub(super) policy: OutputPolicy,
    pub(super) privacy_budget: f64,
    pub(super) compute_units: i64,
    pub(super) metering: Metering,
    pub(super) algorithm: Option<Vec<u8>>,
    pub(super) as_of_unix_seconds: u64,
}

/// A run's fuel, wall time and memory: the query's compute budget and the
/// server's limits, each drawn below its budget where the product withholds
/// rows (see [`crate::metering`]); memory never below what the guest
/// starts with (`initial_memory`).
pub(super) fn limits_for(
    engine: &QueryEngine,
    metering: Metering,
    compute_units: i64,
    initial_memory: u64,
) -> Limits {
    let budget_fuel = u64::try_from(compute_units)
        .unwrap_or(0)
        .saturating_mul(FUEL_PER_COMPUTE_UNIT);
    let rng = &mut rand::thread_rng();
    Limits {
        fuel: metering.fuel_limit(budget_fuel, rng),
        wall_time: metering.wall_time_limit(engine.config().wall_time, rng),
        memory_bytes: metering.memory_limit(engine.config().memory_bytes, initial_memory, rng),
        ..Limits::default()
    }
}

pub(super) fn run_in_sandbox(
    engine: &QueryEngine,
    run: &SandboxRun,
    sql: &str,
) -> std::result::Result<civicgrid_sandbox::Outcome, RunFailure> {
    let SandboxRun {
        storage,
        policy,
        privacy_budget,
        compute_units,
        metering,
        algorithm,
        as_of_unix_seconds,
    } = run;
    let (privacy_budget, compute_units, as_of_unix_seconds) =
        (*privacy_budget, *compute_units, *as_of_unix_seconds);
    let algorithm = algorithm.as_deref();
    let dir = storage.dir.as_ref().ok_or_else(|| {
        SandboxError::Internal("this server keeps no copy of the product's files".into())
    })?;
    let files: Arc<dyn TableStore> = match &storage.version {
        Some(read) => Arc::new(
            VersionTables::local(dir, &read.manifest, &engine.footers).map_err(|error| {
                SandboxError::Data(format!("the product's data version: {error}"))
            })?,
        ),
        None => Arc::new(
            LocalDirectory::discover(dir)
                .map_err(|error| SandboxError::Data(format!("the product's files: {error}")))?
                .with_footer_cache(Arc::clone(&engine.footers)),
        ),
    };
    let tables: Arc<dyn TableStore> =
        Arc::new(DeclaredColumns::new(files, storage.declared.clone()));
    let guest = match algorithm {
        Some(wasm) => engine.sandbox.load(wasm, GuestRole::Algorithm)?,
        None => Arc::clone(&engine.sql_guest),
    };
    let limits = limits_for(
        engine,
        *metering,
        compute_units,
        guest.initial_memory_bytes(),
    );
    engine.sandbox.run_metered(
        &guest,
        Job {
            sql,
            tables,
            policy,
            privacy_budget,
            as_of_unix_seconds,
        },
        &limits,
    )
}

/// How a query the sandbox refused or stopped is settled and reported: the
/// one place a [`SandboxError`] becomes an [`Unanswered`] kind, an outcome
/// and the words a consumer reads (the gRPC layer alone picks the status).
#[derive(Debug)]
pub(super) struct Disposition {
    /// Why, as stored and reported now and on every replay.
    pub(super) code: Unanswered,
    /// The outcome: `rejected` (the policy or the planner refused the query)
    /// or `failed`.
    pub(super) state: &'static str,
    /// What the consumer, the stored outcome and the audit entry say.
    pub(super) message: String,
    /// Whether `message` stands in for the engine's own text, which goes
    /// only to the server's log: a failure at run time can quote the data
    /// (a cast error names the value it could not cast).
    pub(super) withheld: bool,
    /// Whether the query counts against the contract's quota and pays for
    /// the fuel it burnt.
    pub(super) counts: bool,
}

/// The stable codes of queries that failed while they ran, as consumers see
/// them (in `QuerySummary.error` and the status message).
mod failure_code {
    pub const EXECUTION_ERROR: &str = "execution_error";
    pub const COMPUTE_BUDGET_EXHAUSTED: &str = "compute_budget_exhausted";
    pub const TIME_LIMIT: &str = "time_limit";
    pub const MEMORY_LIMIT: &str = "memory_limit";
    pub const STACK_LIMIT: &str = "stack_limit";
    pub const RESULT_TOO_LARGE: &str = "result_too_large";
    pub const INTERNAL: &str = "internal";
}

/// `fuel` is what the run burnt before it ended: a run that found no free
/// slot for a later share after earlier shares read the data has run, and
/// when it stopped depends on the data.
pub(super) fn classify(error: &SandboxError, fuel: u64) -> Disposition {
    use failure_code::*;
    // Decided before anything read the data (the host's checks, the guest's
    // parser and planner, the output policy): the reason helps and tells
    // nothing about the data.
    let precise = |code, state| Disposition {
        code,
        state,
        message: error.to_string(),
        withheld: false,
        counts: true,
    };
    let withheld = |code, failure: &str, what: &str| Disposition {
        code,
        state: "failed",
        message: format!("{what} ({failure})"),
        withheld: true,
        counts: true,
    };
    match error {
        SandboxError::Policy { .. } | SandboxError::AlgorithmNotApproved { .. } => {
            precise(Unanswered::Denied, "rejected")
        }
        SandboxError::Query(_) => precise(Unanswered::Invalid, "rejected"),
        SandboxError::PrivacyBudget { .. } => precise(Unanswered::Exhausted, "rejected"),
        SandboxError::InvalidModule(_) | SandboxError::Link { .. } => {
            precise(Unanswered::Invalid, "failed")
        }
        // Every sandbox slot stayed busy: a retry may well succeed, and the
        // consumer neither pays nor uses up its quota for the platform's
        // capacity.
        SandboxError::Busy { .. } if fuel > 0 => withheld(
            Unanswered::Exhausted,
            TIME_LIMIT,
            "the query ran past its time limit",
        ),
        SandboxError::Busy { .. } => Disposition {
            counts: false,
            ..precise(Unanswered::Busy, "failed")
        },
        SandboxError::FuelExhausted { .. } => withheld(
            Unanswered::Exhausted,
            COMPUTE_BUDGET_EXHAUSTED,
            "the query used its whole compute budget; a larger max_compute_units, where the \
             product lets you choose one, may let it finish",
        ),
        SandboxError::Deadline { .. } => withheld(
            Unanswered::Exhausted,
            TIME_LIMIT,
            "the query ran past its time limit",
        ),
        SandboxError::MemoryLimit { .. } => withheld(
            Unanswered::Exhausted,
            MEMORY_LIMIT,
            "the query needed more memory than its limit",
        ),
        SandboxError::StackOverflow => withheld(
            Unanswered::Exhausted,
            STACK_LIMIT,
            "the query exhausted its call stack",
        ),
        SandboxError::ResultTooLarge { .. } => withheld(
            Unanswered::Exhausted,
            RESULT_TOO_LARGE,
            "the query's result is larger than the product releases at once",
        ),
        // The query's own doing (a cast that fails on some value, a
        // division by zero): the same query fails again.
        SandboxError::Execution(_) => withheld(
            Unanswered::Invalid,
            EXECUTION_ERROR,
            "the query failed while running",
        ),
        // A bug in the SQL guest, or a consumer algorithm's own trap.
        SandboxError::Trap(_) => withheld(
            Unanswered::Internal,
            EXECUTION_ERROR,
            "the query failed while running",
        ),
        SandboxError::Data(_) | SandboxError::Internal(_) => withheld(
            Unanswered::Internal,
            INTERNAL,
            "the query failed inside the platform",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every kind the sandbox reports.
    fn every_sandbox_error() -> Vec<SandboxError> {
        let quoting = "Cast error: Cannot cast string 'xhealth/458' to value of Int32 type";
        vec![
            SandboxError::FuelExhausted { fuel: 5_000_000 },
            SandboxError::Deadline { limit_ms: 60_000 },
            SandboxError::MemoryLimit {
                limit_bytes: 1 << 30,
            },
            SandboxError::Busy {
                slots: 32,
                limit_ms: 60_000,
            },
            SandboxError::StackOverflow,
            SandboxError::ResultTooLarge {
                limit_bytes: 1 << 20,
                rule: "max_result_bytes",
            },
            SandboxError::Policy {
                rule: "blocked-columns".into(),
                column: Some("person_id".into()),
                message: "person_id is blocked".into(),
            },
            SandboxError::Query("no such column: salary".into()),
            SandboxError::Execution(quoting.into()),
            SandboxError::Trap(format!("unreachable (guest log: {quoting})")),
            SandboxError::Link {
                module: "wasi_snapshot_preview1".into(),
                name: "sock_open".into(),
            },
            SandboxError::InvalidModule("bad magic".into()),
            SandboxError::AlgorithmNotApproved {
                sha256: "ab".repeat(32),
            },
            SandboxError::PrivacyBudget {
                remaining: 0.1,
                needed: 0.4,
            },
            SandboxError::Data(format!("products/population/residents.parquet: {quoting}")),
            SandboxError::Internal(quoting.into()),
        ]
    }

    /// A query that failed while it ran is reported by a generic message
    /// and a stable code, whatever the engine said (it can quote the data);
    /// a refusal decided before the data was read says precisely why.
    #[test]
    fn failures_at_run_time_are_reported_by_code_alone() {
        for error in every_sandbox_error() {
            let disposition = classify(&error, 0);
            let inner = error.to_string();
            if disposition.withheld {
                assert_eq!(disposition.state, "failed", "{error}");
                assert!(!disposition.message.contains("xhealth"), "{error}");
                let code = disposition
                    .message
                    .strip_suffix(')')
                    .and_then(|message| message.rsplit_once(" ("))
                    .map(|(_, code)| code)
                    .unwrap_or_default();
                assert!(
                    !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "a snake_case code in {:?}",
                    disposition.message
                );
            } else {
                assert_eq!(disposition.message, inner);
            }
        }
        let cast = classify(&SandboxError::Execution("Cannot cast string 'x'".into()), 1);
        assert_eq!(
            (cast.code, cast.message.as_str()),
            (
                Unanswered::Invalid,
                "the query failed while running (execution_error)"
            )
        );
        let refused = classify(&SandboxError::Query("no such column: salary".into()), 1);
        assert_eq!(
            (refused.code, refused.state),
            (Unanswered::Invalid, "rejected")
        );
        assert!(refused.message.contains("salary"));
    }

    /// The invoice finds the queries that count by their stored status code:
    /// only a query that found no free sandbox slot is settled as
    /// `Unavailable`, and it alone does not count.
    #[test]
    fn only_a_query_that_found_no_slot_goes_uncounted() {
        assert!(
            crate::store::ledger::COUNTED_QUERY
                .ends_with(&format!("<> {}", Unanswered::Busy.stored()))
        );
        for error in every_sandbox_error() {
            let disposition = classify(&error, 0);
            assert_eq!(
                disposition.counts,
                disposition.code != Unanswered::Busy,
                "{error}"
            );
        }
        // Unless it ran first: a later share of a split run that found no
        // slot after earlier ones read the data stopped when the data made
        // it stop, and is counted, charged and worded like a time limit.
        let ran = classify(
            &SandboxError::Busy {
                slots: 2,
                limit_ms: 1_234,
            },
            5_000_000,
        );
        assert_eq!(
            (ran.code, ran.counts, ran.message.as_str()),
            (
                Unanswered::Exhausted,
                true,
                "the query ran past its time limit (time_limit)"
            )
        );
    }
}
