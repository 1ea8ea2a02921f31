//! How a sandbox run can end other than with a released result.

use crate::protocol::GuestFailure;

/// A run that did not release a result. Every variant ends only that run.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The guest used its whole fuel budget (compute units).
    #[error("the query used its whole compute budget ({fuel} fuel)")]
    FuelExhausted {
        /// The budget it had.
        fuel: u64,
    },
    /// The guest ran past its wall-time limit.
    #[error("the query ran past its time limit of {limit_ms} ms")]
    Deadline {
        /// The limit.
        limit_ms: u64,
    },
    /// The guest tried to grow its memory past the limit.
    #[error("the query tried to use more than its memory limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// The limit.
        limit_bytes: u64,
    },
    /// Every instance slot of the pool stayed in use for the run's whole
    /// wall-time limit, so it never started (or a share of it never did).
    #[error(
        "the sandbox is busy: all {slots} of its instance slots stayed in use for the query's \
         whole time limit of {limit_ms} ms; retry later"
    )]
    Busy {
        /// Slots in the pool.
        slots: usize,
        /// The wall-time limit it waited out.
        limit_ms: u64,
    },
    /// The guest's call stack overflowed.
    #[error("the query exhausted its call stack")]
    StackOverflow,
    /// The result grew past a size cap.
    #[error("the result is larger than the {limit_bytes}-byte cap ({rule})")]
    ResultTooLarge {
        /// The cap.
        limit_bytes: u64,
        /// `max_result_bytes` (the product's policy) or `sandbox.max_output_bytes`.
        rule: &'static str,
    },
    /// The query breaks the output policy; nothing ran, or nothing was released.
    #[error("refused by the output policy ({rule}{}): {message}", column.as_deref().map(|c| format!(", column {c}")).unwrap_or_default())]
    Policy {
        /// The rule, e.g. `blocked-columns`.
        rule: String,
        /// The column at fault.
        column: Option<String>,
        /// For the consumer.
        message: String,
    },
    /// The SQL is not valid for this product.
    #[error("invalid query: {0}")]
    Query(String),
    /// The engine failed at run time.
    #[error("query failed: {0}")]
    Execution(String),
    /// The guest trapped (a bug or a hostile module).
    #[error("the guest trapped: {0}")]
    Trap(String),
    /// The module needs an import the sandbox does not give (files, sockets…).
    #[error("the module imports {module}::{name}, which the sandbox does not provide")]
    Link {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
    /// Not a valid Wasm module, or missing the guest exports.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// A consumer algorithm whose hash the product's policy does not approve.
    #[error("algorithm {sha256} is not approved for this product")]
    AlgorithmNotApproved {
        /// Its sha256.
        sha256: String,
    },
    /// The differential-privacy budget cannot pay for this query.
    #[error("the privacy budget has {remaining} epsilon left; this query needs {needed}")]
    PrivacyBudget {
        /// Left before the query.
        remaining: f64,
        /// What it would spend.
        needed: f64,
    },
    /// The product's data could not be read.
    #[error("product data: {0}")]
    Data(String),
    /// The sandbox itself (engine, cache directory) failed.
    #[error("sandbox: {0}")]
    Internal(String),
}

/// A run that did not release a result, and the fuel it burnt before it
/// ended: what [`Sandbox::run_metered`](super::Sandbox::run_metered)
/// returns, so that a caller can bill a failed run for the work it did.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RunFailure {
    /// Why the run ended.
    pub error: SandboxError,
    /// Fuel consumed, as [`Metering::fuel`](super::Metering::fuel) counts it
    /// for a completed run: the whole budget when the run ran out of fuel,
    /// 0 when it was refused before anything ran.
    pub fuel: u64,
}

impl RunFailure {
    /// [`RunFailure::fuel`] in billed compute units, rounded up.
    #[must_use]
    pub fn compute_units(&self) -> u64 {
        self.fuel.div_ceil(super::FUEL_PER_COMPUTE_UNIT)
    }
}

impl From<SandboxError> for RunFailure {
    /// A failure before anything ran: no fuel.
    fn from(error: SandboxError) -> Self {
        Self { error, fuel: 0 }
    }
}

impl From<GuestFailure> for SandboxError {
    fn from(failure: GuestFailure) -> Self {
        match failure {
            GuestFailure::Policy {
                rule,
                column,
                message,
            } => Self::Policy {
                rule,
                column,
                message,
            },
            GuestFailure::Query { message } => Self::Query(message),
            GuestFailure::Execution { message } => Self::Execution(message),
            // Only a partial run may answer so, and the host handles that itself.
            GuestFailure::NotSplittable { reason } => Self::Execution(format!(
                "the guest refused a whole run as not splittable: {reason}"
            )),
        }
    }
}

/// Why a host function stopped the guest; carried through the trap.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Abort {
    #[error("memory limit")]
    Memory,
    #[error("result too large")]
    ResultTooLarge {
        limit_bytes: u64,
        rule: &'static str,
    },
    #[error("policy")]
    Policy {
        rule: String,
        column: Option<String>,
        message: String,
    },
    #[error("data: {0}")]
    Data(String),
    #[error("guest protocol: {0}")]
    Protocol(String),
    #[error("guest exited with {0}")]
    Exit(i32),
    #[error("not splittable: {0}")]
    NotSplittable(String),
    /// The run's wall time ran out while the guest waited in a host call.
    #[error("deadline")]
    Deadline,
    /// A final instance waited for a share that failed or never ran; the
    /// run reports that share's error instead.
    #[error("a share of the split run failed")]
    ShareFailed,
}
