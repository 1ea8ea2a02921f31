//! The sandbox's outcomes on the runner's wire and back: the marketplace
//! settles a remote run from exactly the error and metering the sandbox
//! reported, as it would a run in its own process.

use std::time::Duration;

use civicgrid_sandbox::manifest::{Manifest, ManifestFile, ManifestTable};
use civicgrid_sandbox::quality::{DeclaredTable, Quality, QualityError};
use civicgrid_sandbox::{Metering, SandboxError};

use crate::proto::{self, sandbox_failure::Kind};

/// A sandbox error as sent.
#[must_use]
pub fn failure_to_proto(error: &SandboxError) -> proto::SandboxFailure {
    let kind = match error {
        SandboxError::FuelExhausted { fuel } => Kind::FuelExhausted(*fuel),
        SandboxError::Deadline { limit_ms } => Kind::DeadlineMs(*limit_ms),
        SandboxError::MemoryLimit { limit_bytes } => Kind::MemoryLimitBytes(*limit_bytes),
        SandboxError::Busy { slots, limit_ms } => Kind::Busy(proto::Busy {
            slots: *slots as u64,
            limit_ms: *limit_ms,
        }),
        SandboxError::StackOverflow => Kind::StackOverflow(true),
        SandboxError::ResultTooLarge { limit_bytes, rule } => {
            Kind::ResultTooLarge(proto::ResultTooLarge {
                limit_bytes: *limit_bytes,
                rule: (*rule).to_owned(),
            })
        }
        SandboxError::Policy {
            rule,
            column,
            message,
        } => Kind::Policy(proto::Policy {
            rule: rule.clone(),
            column: column.clone(),
            message: message.clone(),
        }),
        SandboxError::Query(text) => Kind::Query(text.clone()),
        SandboxError::Execution(text) => Kind::Execution(text.clone()),
        SandboxError::Trap(text) => Kind::Trap(text.clone()),
        SandboxError::Link { module, name } => Kind::Link(proto::Link {
            module: module.clone(),
            name: name.clone(),
        }),
        SandboxError::InvalidModule(text) => Kind::InvalidModule(text.clone()),
        SandboxError::AlgorithmNotApproved { sha256 } => Kind::AlgorithmNotApproved(sha256.clone()),
        SandboxError::PrivacyBudget { remaining, needed } => {
            Kind::PrivacyBudget(proto::PrivacyBudget {
                remaining: *remaining,
                needed: *needed,
            })
        }
        SandboxError::Data(text) => Kind::Data(text.clone()),
        SandboxError::Internal(text) => Kind::Internal(text.clone()),
    };
    proto::SandboxFailure { kind: Some(kind) }
}

/// A sandbox error as received; a reply without a kind is the runner's
/// fault, reported as internal.
#[must_use]
pub fn failure_from_proto(failure: proto::SandboxFailure) -> SandboxError {
    let Some(kind) = failure.kind else {
        return SandboxError::Internal("the runner sent a failure without its kind".into());
    };
    match kind {
        Kind::FuelExhausted(fuel) => SandboxError::FuelExhausted { fuel },
        Kind::DeadlineMs(limit_ms) => SandboxError::Deadline { limit_ms },
        Kind::MemoryLimitBytes(limit_bytes) => SandboxError::MemoryLimit { limit_bytes },
        Kind::Busy(busy) => SandboxError::Busy {
            slots: usize::try_from(busy.slots).unwrap_or(usize::MAX),
            limit_ms: busy.limit_ms,
        },
        Kind::StackOverflow(_) => SandboxError::StackOverflow,
        Kind::ResultTooLarge(large) => SandboxError::ResultTooLarge {
            limit_bytes: large.limit_bytes,
            rule: known_rule(&large.rule),
        },
        Kind::Policy(policy) => SandboxError::Policy {
            rule: policy.rule,
            column: policy.column,
            message: policy.message,
        },
        Kind::Query(text) => SandboxError::Query(text),
        Kind::Execution(text) => SandboxError::Execution(text),
        Kind::Trap(text) => SandboxError::Trap(text),
        Kind::Link(link) => SandboxError::Link {
            module: link.module,
            name: link.name,
        },
        Kind::InvalidModule(text) => SandboxError::InvalidModule(text),
        Kind::AlgorithmNotApproved(sha256) => SandboxError::AlgorithmNotApproved { sha256 },
        Kind::PrivacyBudget(budget) => SandboxError::PrivacyBudget {
            remaining: budget.remaining,
            needed: budget.needed,
        },
        Kind::Data(text) => SandboxError::Data(text),
        Kind::Internal(text) => SandboxError::Internal(text),
    }
}

/// The sandbox names the cap a result outgrew by one of two rules.
fn known_rule(rule: &str) -> &'static str {
    match rule {
        "max_result_bytes" => "max_result_bytes",
        "sandbox.max_output_bytes" => "sandbox.max_output_bytes",
        _ => "a cap the runner named",
    }
}

/// A run's metering as sent.
#[must_use]
pub fn metering_to_proto(metering: &Metering) -> proto::Metering {
    proto::Metering {
        fuel: metering.fuel,
        compute_units: metering.compute_units,
        rows_read: metering.rows_read,
        bytes_read: metering.bytes_read,
        rows_released: metering.rows_released,
        bytes_released: metering.bytes_released,
        wall_time_us: u64::try_from(metering.wall_time.as_micros()).unwrap_or(u64::MAX),
        startup_us: u64::try_from(metering.startup.as_micros()).unwrap_or(u64::MAX),
        instances: metering.instances,
    }
}

/// A run's metering as received.
#[must_use]
pub fn metering_from_proto(metering: &proto::Metering) -> Metering {
    Metering {
        fuel: metering.fuel,
        compute_units: metering.compute_units,
        rows_read: metering.rows_read,
        bytes_read: metering.bytes_read,
        rows_released: metering.rows_released,
        bytes_released: metering.bytes_released,
        wall_time: Duration::from_micros(metering.wall_time_us),
        startup: Duration::from_micros(metering.startup_us),
        instances: metering.instances,
    }
}

/// Declared tables as sent for a measurement.
#[must_use]
pub fn declared_to_proto(tables: &[DeclaredTable]) -> Vec<proto::TypedTable> {
    tables
        .iter()
        .map(|table| proto::TypedTable {
            name: table.name.clone(),
            columns: table
                .columns
                .iter()
                .map(|(name, r#type)| proto::TypedColumn {
                    name: name.clone(),
                    r#type: r#type.clone(),
                })
                .collect(),
        })
        .collect()
}

/// Declared tables as received.
#[must_use]
pub fn declared_from_proto(tables: Vec<proto::TypedTable>) -> Vec<DeclaredTable> {
    tables
        .into_iter()
        .map(|table| DeclaredTable {
            name: table.name,
            columns: table
                .columns
                .into_iter()
                .map(|column| (column.name, column.r#type))
                .collect(),
        })
        .collect()
}

/// A measurement as sent: its figures, or the schema mismatch it found;
/// `Err` for an unreadable table, which is no answer about the schema.
///
/// # Errors
/// The unreadable table's error, to be sent as a status.
pub fn measured_to_proto(
    measured: Result<Quality, QualityError>,
) -> Result<proto::MeasureReply, QualityError> {
    let mismatch = |table: usize, column: usize, type_differs: bool, message: String| {
        proto::measure_reply::Outcome::Mismatch(proto::SchemaMismatch {
            table: u32::try_from(table).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
            type_differs,
            message,
        })
    };
    let outcome = match measured {
        Ok(quality) => proto::measure_reply::Outcome::Quality(proto::Quality {
            completeness: quality.completeness,
            validity: quality.validity,
            freshness_seconds: quality.freshness_seconds,
        }),
        Err(error @ QualityError::MissingColumn { table, column, .. }) => {
            mismatch(table, column, false, error.to_string())
        }
        Err(error @ QualityError::WrongType { table, column, .. }) => {
            mismatch(table, column, true, error.to_string())
        }
        Err(error @ QualityError::Unreadable { .. }) => return Err(error),
    };
    Ok(proto::MeasureReply {
        outcome: Some(outcome),
    })
}

/// A measurement as received: the figures, or the field of the spec that
/// does not match, with why.
///
/// # Errors
/// `(field, message)` of a schema mismatch, or `(None, why)` for a reply
/// with no outcome.
pub fn measured_from_proto(
    reply: proto::MeasureReply,
) -> Result<Quality, (Option<String>, String)> {
    match reply.outcome {
        Some(proto::measure_reply::Outcome::Quality(quality)) => Ok(Quality {
            completeness: quality.completeness,
            validity: quality.validity,
            freshness_seconds: quality.freshness_seconds,
        }),
        Some(proto::measure_reply::Outcome::Mismatch(mismatch)) => Err((
            Some(format!(
                "spec.tables[{}].columns[{}].{}",
                mismatch.table,
                mismatch.column,
                if mismatch.type_differs {
                    "type"
                } else {
                    "name"
                }
            )),
            mismatch.message,
        )),
        None => Err((None, "the runner sent no measurement".into())),
    }
}

/// A version's manifest as sent.
#[must_use]
pub fn version_to_proto(manifest: &Manifest) -> proto::DataVersion {
    proto::DataVersion {
        tables: manifest
            .tables
            .iter()
            .map(|table| version_table_to_proto(&table.name, &table.files))
            .collect(),
    }
}

/// A table's files as sent.
#[must_use]
pub fn version_table_to_proto(name: &str, files: &[ManifestFile]) -> proto::VersionTable {
    proto::VersionTable {
        name: name.to_owned(),
        files: files.iter().map(file_to_proto).collect(),
    }
}

/// A file as sent.
#[must_use]
pub fn file_to_proto(file: &ManifestFile) -> proto::VersionFile {
    proto::VersionFile {
        path: file.path.clone(),
        sha256: file.sha256.clone(),
        bytes: file.bytes,
        rows: file.rows,
    }
}

/// A file as received.
#[must_use]
pub fn file_from_proto(file: proto::VersionFile) -> ManifestFile {
    ManifestFile {
        path: file.path,
        sha256: file.sha256,
        bytes: file.bytes,
        rows: file.rows,
    }
}

/// A version's manifest as received; checked before any file is named.
///
/// # Errors
/// The manifest's [`civicgrid_sandbox::manifest::ManifestError`].
pub fn version_from_proto(
    version: proto::DataVersion,
) -> Result<Manifest, civicgrid_sandbox::manifest::ManifestError> {
    let manifest = Manifest {
        tables: version
            .tables
            .into_iter()
            .map(|table| ManifestTable {
                name: table.name,
                files: table.files.into_iter().map(file_from_proto).collect(),
            })
            .collect(),
    };
    manifest.check()?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of sandbox error comes back as itself: the marketplace
    /// settles and words a remote failure by its kind.
    #[test]
    fn every_sandbox_error_crosses_the_wire_unchanged() {
        let errors = vec![
            SandboxError::FuelExhausted { fuel: 5 },
            SandboxError::Deadline { limit_ms: 7 },
            SandboxError::MemoryLimit { limit_bytes: 9 },
            SandboxError::Busy {
                slots: 4,
                limit_ms: 60_000,
            },
            SandboxError::StackOverflow,
            SandboxError::ResultTooLarge {
                limit_bytes: 1 << 20,
                rule: "max_result_bytes",
            },
            SandboxError::ResultTooLarge {
                limit_bytes: 1 << 28,
                rule: "sandbox.max_output_bytes",
            },
            SandboxError::Policy {
                rule: "min-aggregation".into(),
                column: Some("person_id".into()),
                message: "too few".into(),
            },
            SandboxError::Policy {
                rule: "list-columns".into(),
                column: None,
                message: "no lists".into(),
            },
            SandboxError::Query("no such table".into()),
            SandboxError::Execution("cast failed".into()),
            SandboxError::Trap("unreachable".into()),
            SandboxError::Link {
                module: "wasi".into(),
                name: "sock_open".into(),
            },
            SandboxError::InvalidModule("bad magic".into()),
            SandboxError::AlgorithmNotApproved {
                sha256: "ab".into(),
            },
            SandboxError::PrivacyBudget {
                remaining: 0.25,
                needed: 0.5,
            },
            SandboxError::Data("missing file".into()),
            SandboxError::Internal("cache".into()),
        ];
        for error in errors {
            let back = failure_from_proto(failure_to_proto(&error));
            assert_eq!(format!("{back:?}"), format!("{error:?}"));
            assert_eq!(back.to_string(), error.to_string());
        }
        assert!(matches!(
            failure_from_proto(proto::SandboxFailure { kind: None }),
            SandboxError::Internal(_)
        ));
    }

    #[test]
    fn metering_crosses_the_wire_unchanged() {
        let metering = Metering {
            fuel: 1,
            compute_units: 2,
            rows_read: 3,
            bytes_read: 4,
            rows_released: 5,
            bytes_released: 6,
            wall_time: Duration::from_micros(7),
            startup: Duration::from_micros(8),
            instances: 9,
        };
        assert_eq!(metering_from_proto(&metering_to_proto(&metering)), metering);
    }
}
