//! The marketplace's one error type. Services map it to a gRPC status in one
//! place (`impl From<MarketError> for tonic::Status` in [`crate::grpc`]).

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    /// A request field is missing or malformed.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// The field at fault, as named in the API (e.g. `spec.tables[0].name`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No such object (or the caller may not know it exists).
    #[error("{what} {id:?} not found")]
    NotFound {
        /// The kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// An object with this id exists already.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// The kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The object is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota or limit is used up.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A conflicting request is in progress; retry later.
    #[error("{0}")]
    Aborted(String),
    /// A part the request needs is not running here.
    #[error("{0}")]
    Unavailable(String),
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller lacks a permission.
    #[error("permission {permission} denied{context}")]
    PermissionDenied {
        /// The permission checked, e.g. `product:review`.
        permission: String,
        /// Where, e.g. " in tenant acme"; may be empty.
        context: String,
    },
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A schema migration failed.
    #[error("database migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Stored data cannot be read back (corruption or a bug).
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// casbin failed.
    #[error("access control error: {0}")]
    Access(String),
    /// A query got no answer: the policy or the planner refused it, a
    /// limit stopped it, or it failed while running. `message` is what its
    /// consumer may read (never the engine's own text).
    #[error("query {query_id}: {message}")]
    Unanswered {
        /// The query.
        query_id: String,
        /// Why, in the terms every replay reports.
        kind: Unanswered,
        /// What the consumer reads.
        message: String,
    },
    /// The file system failed (keys, data directory).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a query got no answer. Each kind is kept in `queries.error_code` as
/// the number of the gRPC status it has always been reported with, so
/// stored outcomes and replays read the same before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// Its SQL or input was refused by the planner, or failed on its own
    /// terms while running (a cast, a division by zero).
    Invalid = 3,
    /// The output policy or the algorithm approval refused it.
    Denied = 7,
    /// A limit ran out: compute, time, memory, stack, result size or the
    /// privacy budget.
    Exhausted = 8,
    /// The sandbox or the platform failed.
    Internal = 13,
    /// No sandbox slot was free; retrying may succeed (not counted).
    Busy = 14,
}

impl Unanswered {
    /// The number stored in `queries.error_code`.
    #[must_use]
    pub fn stored(self) -> i64 {
        self as i64
    }

    /// The kind a stored `error_code` names; `None` for 0 (answered).
    /// A number no kind uses reads as `Internal`.
    #[must_use]
    pub fn from_stored(code: i64) -> Option<Self> {
        Some(match code {
            0 => return None,
            3 => Self::Invalid,
            7 => Self::Denied,
            8 => Self::Exhausted,
            14 => Self::Busy,
            _ => Self::Internal,
        })
    }
}

/// Checks a free-text field: present if `required`, at most `max` bytes.
///
/// # Errors
/// `InvalidArgument` naming `field`.
pub(crate) fn check_text(field: &str, value: &str, max: usize, required: bool) -> Result<()> {
    if required && value.trim().is_empty() {
        return Err(MarketError::invalid(field, "is required"));
    }
    if value.len() > max {
        return Err(MarketError::invalid(
            field,
            format!("at most {max} characters"),
        ));
    }
    Ok(())
}

impl MarketError {
    /// A bad field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A missing permission.
    pub fn denied(permission: impl Into<String>, context: impl Into<String>) -> Self {
        Self::PermissionDenied {
            permission: permission.into(),
            context: context.into(),
        }
    }
}

/// Shorthand for marketplace results.
pub type Result<T, E = MarketError> = std::result::Result<T, E>;
