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
