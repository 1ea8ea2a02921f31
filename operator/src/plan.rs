//! The offline planner: load `DataCenter` and `ComputeWorkload` manifests from
//! files, run the engine, and render placements and explanations.

// A plan error is built at most once per run, on the way out, so its size
// costs nothing; keeping the fields inline keeps matching on them simple.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::convert::{self, FieldError};
use crate::crd::{ComputeWorkload, DataCenter};
use crate::engine::model::{Reachability, Snapshot};
use crate::engine::{self, Decision, Options, Schedule};

/// Why manifests could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The plan could not be written out.
    #[error("writing the plan: {0}")]
    Write(#[source] std::io::Error),
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML or JSON.
    #[error("{path}: document {document}: not valid YAML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based document number.
        document: usize,
        /// Parser message.
        message: String,
    },
    /// YAML that is not a CivicGrid resource.
    #[error(
        "{path}: document {document}: apiVersion `{api_version}`, kind `{kind}` is not a CivicGrid resource \
         (expected civicgrid.io/v1alpha1 DataCenter or ComputeWorkload)"
    )]
    NotCivicGrid {
        /// The file.
        path: PathBuf,
        /// 1-based document number.
        document: usize,
        /// What it said.
        api_version: String,
        /// What it said.
        kind: String,
    },
    /// A field with the wrong shape or value.
    #[error("{path}: document {document}: {kind} `{name}`: field `{field}`: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// 1-based document number.
        document: usize,
        /// Resource kind.
        kind: String,
        /// Object name, if it had one.
        name: String,
        /// Field path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Valid YAML, but the engine cannot use it.
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// Two objects with one name.
    #[error("{kind} `{name}` is defined twice: in {first} and in {second}")]
    Duplicate {
        /// Resource kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// First definition.
        first: String,
        /// Second definition.
        second: String,
    },
    /// Nothing to plan.
    #[error("{0}: no .yaml, .yml or .json files found")]
    Empty(PathBuf),
}

/// Manifests read from disk.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Data centers.
    pub data_centers: Vec<DataCenter>,
    /// Workloads.
    pub workloads: Vec<ComputeWorkload>,
}

/// Reads every `.yaml`, `.yml` and `.json` file under `path` (a file or a
/// directory, recursively, in name order).
///
/// # Errors
/// Unreadable files, invalid YAML, foreign resources, bad fields and
/// duplicate names, each naming file, document and field.
pub fn load(path: &Path) -> Result<Manifests, PlanError> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    if files.is_empty() {
        return Err(PlanError::Empty(path.to_owned()));
    }
    let mut manifests = Manifests::default();
    let mut seen: BTreeMap<(&'static str, String), String> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| PlanError::Read {
            path: file.clone(),
            source,
        })?;
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let document_number = i + 1;
            let value =
                <serde_yaml::Value as serde::Deserialize>::deserialize(document).map_err(|e| {
                    PlanError::Syntax {
                        path: file.clone(),
                        document: document_number,
                        message: e.to_string(),
                    }
                })?;
            if value.is_null() {
                continue;
            }
            let text_of = |key: &str| {
                value
                    .get(key)
                    .and_then(serde_yaml::Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(serde_yaml::Value::as_str)
                .unwrap_or("")
                .to_owned();
            let field_error = |e: serde_path_to_error::Error<serde_yaml::Error>| PlanError::Field {
                path: file.clone(),
                document: document_number,
                kind: kind.clone(),
                name: name.clone(),
                field: e.path().to_string(),
                message: e.into_inner().to_string(),
            };
            let location = format!("{} (document {document_number})", file.display());
            let kind_static: &'static str = match (api_version.as_str(), kind.as_str()) {
                ("civicgrid.io/v1alpha1", "DataCenter") => {
                    let dc: DataCenter =
                        serde_path_to_error::deserialize(value.clone()).map_err(field_error)?;
                    manifests.data_centers.push(dc);
                    "DataCenter"
                }
                ("civicgrid.io/v1alpha1", "ComputeWorkload") => {
                    let mut cw: ComputeWorkload =
                        serde_path_to_error::deserialize(value.clone()).map_err(field_error)?;
                    if cw.metadata.namespace.is_none() {
                        cw.metadata.namespace = Some("default".to_owned());
                    }
                    let namespaced = format!(
                        "{}/{}",
                        cw.metadata.namespace.as_deref().unwrap_or("default"),
                        name
                    );
                    manifests.workloads.push(cw);
                    check_duplicate(&mut seen, "ComputeWorkload", namespaced, location)?;
                    continue;
                }
                _ => {
                    return Err(PlanError::NotCivicGrid {
                        path: file.clone(),
                        document: document_number,
                        api_version,
                        kind,
                    });
                }
            };
            if name.is_empty() {
                return Err(PlanError::Field {
                    path: file.clone(),
                    document: document_number,
                    kind,
                    name,
                    field: "metadata.name".to_owned(),
                    message: "is required".to_owned(),
                });
            }
            check_duplicate(&mut seen, kind_static, name, location)?;
        }
    }
    Ok(manifests)
}

fn check_duplicate(
    seen: &mut BTreeMap<(&'static str, String), String>,
    kind: &'static str,
    name: String,
    location: String,
) -> Result<(), PlanError> {
    if let Some(first) = seen.get(&(kind, name.clone())) {
        return Err(PlanError::Duplicate {
            kind,
            name,
            first: first.clone(),
            second: location,
        });
    }
    seen.insert((kind, name), location);
    Ok(())
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), PlanError> {
    let read_error = |source| PlanError::Read {
        path: path.to_owned(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if metadata.is_file() {
        out.push(path.to_owned());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_error)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, out)?;
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(entry);
        }
    }
    Ok(())
}

/// Builds the engine's snapshot from manifests. Workload status placements
/// become the current placement, so a plan shows what would move.
///
/// # Errors
/// The first object the engine cannot use.
pub fn snapshot(manifests: &Manifests, now_unix: i64) -> Result<Snapshot, PlanError> {
    let data_centers = manifests
        .data_centers
        .iter()
        .map(|dc| convert::data_center(dc, now_unix, Reachability::Reachable))
        .collect::<Result<Vec<_>, _>>()?;
    let mut workloads = Vec::new();
    let mut current = BTreeMap::new();
    for cw in &manifests.workloads {
        let workload = convert::workload(cw)?;
        let placement = convert::current_placement(cw);
        if !placement.is_empty() {
            current.insert(workload.key.clone(), placement);
        }
        workloads.push(workload);
    }
    Ok(Snapshot {
        now_unix,
        data_centers,
        workloads,
        current,
    })
}

/// Output formats of `plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

#[derive(Serialize)]
struct Report<'a> {
    decisions: &'a [Decision],
}

fn table(schedule: &Schedule) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 5]> = schedule
        .decisions
        .iter()
        .map(|d| {
            [
                d.workload.to_string(),
                d.desired.to_string(),
                d.placed().to_string(),
                format!("{:?}", d.outcome),
                if d.placement.is_empty() {
                    "-".to_owned()
                } else {
                    d.placement
                        .iter()
                        .map(|(dc, n)| format!("{dc}={n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ]
        })
        .collect();
    let header = ["WORKLOAD", "DESIRED", "PLACED", "OUTCOME", "PLACEMENT"];
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: [&str; 5], out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(header, &mut out);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]], &mut out);
    }
    for d in &schedule.decisions {
        let _ = writeln!(out, "\n{}:", d.workload);
        if let Some(reason) = &d.reason {
            let _ = writeln!(out, "  reason: {reason}");
        }
        for p in &d.preemptions {
            let _ = writeln!(
                out,
                "  preempts {} replica(s) of {} in {}",
                p.replicas, p.victim, p.data_center
            );
        }
        for p in &d.preempted_by {
            let _ = writeln!(
                out,
                "  lost {} replica(s) in {} to {}",
                p.replicas, p.data_center, p.preemptor
            );
        }
        let rules: BTreeSet<_> = d.rejections.iter().map(|r| r.rule).collect();
        if rules.is_empty() && d.rejections.is_empty() {
            if d.rejected_by_rule.is_empty() {
                let _ = writeln!(out, "  every data center was chosen");
            } else {
                let counts: Vec<String> = d
                    .rejected_by_rule
                    .iter()
                    .map(|(rule, n)| format!("{rule:?} {n}"))
                    .collect();
                let _ = writeln!(
                    out,
                    "  not chosen: {} (--explain names each data center)",
                    counts.join(", ")
                );
            }
        }
        for r in &d.rejections {
            let _ = writeln!(
                out,
                "  {:<16} {:<13} {}",
                r.data_center,
                format!("{:?}", r.rule),
                r.message
            );
        }
    }
    out
}

/// Loads, schedules and renders: the whole `plan` command, as text. With
/// `explain`, every data center not chosen is named with its reason;
/// without, counts per rule (a pool of 1,000 data centers and 10,000
/// workloads would otherwise explain ten million rejections).
///
/// # Errors
/// Any [`PlanError`].
pub fn run(path: &Path, format: Format, now_unix: i64, explain: bool) -> Result<String, PlanError> {
    let mut out = Vec::new();
    write(path, format, now_unix, explain, &mut out)?;
    String::from_utf8(out).map_err(|e| PlanError::Write(std::io::Error::other(e)))
}

/// [`run`], written to `out` as it is rendered rather than built in memory
/// first.
///
/// # Errors
/// Any [`PlanError`].
pub fn write(
    path: &Path,
    format: Format,
    now_unix: i64,
    explain: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), PlanError> {
    let manifests = load(path)?;
    let snapshot = snapshot(&manifests, now_unix)?;
    let options = Options {
        explain,
        ..Options::default()
    };
    let schedule = engine::schedule(&snapshot, &options);
    drop(snapshot);
    let report = Report {
        decisions: &schedule.decisions,
    };
    let unrenderable = |message: String| {
        PlanError::Invalid(FieldError {
            kind: "Plan",
            object: path.display().to_string(),
            field: "-".to_owned(),
            message,
        })
    };
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(|e| {
                if e.is_io() {
                    PlanError::Write(e.into())
                } else {
                    unrenderable(e.to_string())
                }
            })?;
            out.write_all(b"\n").map_err(PlanError::Write)?;
        }
        Format::Yaml => {
            serde_yaml::to_writer(&mut *out, &report).map_err(|e| unrenderable(e.to_string()))?;
        }
        Format::Table => out
            .write_all(table(&schedule).as_bytes())
            .map_err(PlanError::Write)?,
    }
    out.flush().map_err(PlanError::Write)
}
