//! Turns a provider's uploaded file (CSV or Parquet) into the canonical Parquet
//! file a product version stores.
//!
//! The canonical file holds exactly the declared columns, in declared order,
//! all nullable, with the declared types; the same input always yields the same
//! bytes, so a version's fingerprint depends only on its data.
//!
//! # Guarantees
//! - No undeclared column reaches the store: a file with a column the product
//!   does not declare is refused, not trimmed, so the provider notices.
//! - Values are never silently changed: a CSV value that does not parse as its
//!   declared type is refused with its row, line and column; Parquet columns
//!   are only widened (`int32` into `int64`, `float32` into `float64`, ...).
//!   The exception is sub-microsecond precision, which `timestamp` cannot hold
//!   and which is truncated.
//! - Memory is bounded by one batch of 16 Ki rows plus the encoded row
//!   group (up to 1 Mi rows) the Parquet writer keeps until it is full.
//! - On error the partial output is removed.
//!
//! # Assumptions
//! The declaration passed the registry's spec validation (known types, unique
//! column names, at least one column); one that did not is an
//! [`IngestError::Io`], since the provider cannot fix it by changing the file.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::BooleanBuilder;
use arrow_array::cast::AsArray as _;
use arrow_array::types::{
    Date32Type, Decimal128Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow_array::{
    Array as _, ArrayRef, ArrowPrimitiveType, PrimitiveArray, RecordBatch, StringArray,
};
use arrow_cast::CastOptions;
use arrow_csv::ReaderBuilder;
use arrow_csv::reader::Decoder;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use sha2::{Digest as _, Sha256};

pub use crate::quality::DeclaredTable;

/// Rows read from the input, converted and written at a time.
const BATCH_ROWS: usize = 16 * 1024;

/// Rows per row group of the canonical file.
const ROW_GROUP_ROWS: usize = 1024 * 1024;

/// Fixed so that the bytes, and so the hash, depend on the data alone, not
/// on the build that wrote them.
const CREATED_BY: &str = "civicgrid canonical-parquet 1";

/// The longest part of a refused value quoted back in an error.
const SHOWN_CHARS: usize = 40;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The format of an uploaded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Apache Parquet.
    Parquet,
    /// Comma-separated values (RFC 4180) with a header line.
    Csv,
}

impl Format {
    /// The format named `parquet` or `csv`.
    #[must_use]
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "parquet" => Some(Format::Parquet),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// The canonical file written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingested {
    /// SHA-256 of the output file, lowercase hex.
    pub sha256: String,
    /// Size of the output file.
    pub bytes: u64,
    /// Data rows written.
    pub rows: u64,
}

/// Why an upload was refused or could not be stored.
///
/// Every variant but [`IngestError::Io`] is the provider's to fix, and its
/// text is written for them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The input is not a readable file of that format (message without internals).
    #[error("{0}")]
    Unreadable(String),
    /// A declared column is not in the file.
    #[error("column {column:?} is declared but not in the file")]
    MissingColumn {
        /// The declared column's name.
        column: String,
    },
    /// The file has a column the product does not declare (refused: data not
    /// declared must not sit in the store).
    #[error(
        "column {column:?} is in the file but not declared by the product; declare it in a revision or remove it"
    )]
    UndeclaredColumn {
        /// The column's name in the file.
        column: String,
    },
    /// A Parquet column of a type that cannot hold the declared type.
    #[error("column {column:?} is declared {declared} but the file holds {actual}")]
    WrongType {
        /// The column's name.
        column: String,
        /// The declared type.
        declared: String,
        /// The Arrow type of the file's column.
        actual: String,
    },
    /// A CSV value that is not of the declared type.
    #[error("row {row} (line {line}), column {column}: {value:?} is not {} {declared}", article(.declared))]
    BadValue {
        /// 1-based data row (the header is not counted).
        row: u64,
        /// 1-based line in the file the row starts on.
        line: u64,
        /// The column's name.
        column: String,
        /// The declared type.
        declared: String,
        /// The value, cut to 40 characters followed by `…`.
        value: String,
    },
    /// Writing the output failed, or the declaration is not one the registry
    /// accepts (an unknown type, a repeated or no column).
    #[error("cannot write the canonical file: {0}")]
    Io(String),
}

fn article(declared: &str) -> &'static str {
    if declared.starts_with("int") {
        "an"
    } else {
        "a"
    }
}

/// Reads `input` as `format`, checks it against `table` and writes the
/// canonical Parquet file to `output`.
///
/// `output` is written in place; the caller chooses a temporary path and
/// renames it once this returns. The file is synced before it is hashed.
///
/// # Errors
/// [`IngestError::Unreadable`], [`IngestError::MissingColumn`],
/// [`IngestError::UndeclaredColumn`], [`IngestError::WrongType`] and
/// [`IngestError::BadValue`] for an upload that does not match its
/// declaration; [`IngestError::Io`] when the output cannot be written. On
/// any error nothing is left at `output`.
#[tracing::instrument(skip_all, fields(table = %table.name, ?format))]
pub fn canonical_parquet(
    input: &Path,
    format: Format,
    table: &DeclaredTable,
    output: &Path,
) -> Result<Ingested, IngestError> {
    canonical(input, format, table, output, false)
}

/// [`canonical_parquet`] of a Parquet file already in a product's folder,
/// leaving out the columns the product does not declare: they were never
/// served, and carrying a folder into a first version must not fail on them.
///
/// # Errors
/// As [`canonical_parquet`], but never [`IngestError::UndeclaredColumn`].
pub fn canonical_parquet_of_declared(
    input: &Path,
    table: &DeclaredTable,
    output: &Path,
) -> Result<Ingested, IngestError> {
    canonical(input, Format::Parquet, table, output, true)
}

fn canonical(
    input: &Path,
    format: Format,
    table: &DeclaredTable,
    output: &Path,
    leave_out_undeclared: bool,
) -> Result<Ingested, IngestError> {
    let kinds = declared_kinds(table)?;
    let schema = Arc::new(Schema::new(
        table
            .columns
            .iter()
            .zip(&kinds)
            .map(|((name, _), kind)| Field::new(name, kind.data_type(), true))
            .collect::<Vec<_>>(),
    ));
    // The input is checked before the output is created, so a refused header
    // or schema never touches `output`.
    let mut source = match format {
        Format::Csv => Source::Csv(Box::new(CsvSource::open(input, table, &kinds)?)),
        Format::Parquet => Source::Parquet(ParquetSource::open(
            input,
            table,
            &kinds,
            leave_out_undeclared,
        )?),
    };
    let file = File::create(output).map_err(io)?;
    let mut partial = Partial {
        path: output,
        keep: false,
    };
    let mut writer = ArrowWriter::try_new(
        BufWriter::new(file),
        Arc::clone(&schema),
        Some(properties()),
    )
    .map_err(io)?;
    let mut rows = 0u64;
    while let Some(columns) = source.next_batch()? {
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(io)?;
        rows += batch.num_rows() as u64;
        writer.write(&batch).map_err(io)?;
    }
    let file = writer
        .into_inner()
        .map_err(io)?
        .into_inner()
        .map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    let (sha256, bytes) = hash_file(output).map_err(io)?;
    partial.keep = true;
    tracing::debug!(rows, bytes, %sha256, "canonical file written");
    Ok(Ingested {
        sha256,
        bytes,
        rows,
    })
}

fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // Page statistics make the writer add the column and offset indexes;
        // the sandbox reads the offset index to fetch only the pages a scan
        // selects.
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_created_by(CREATED_BY.to_owned())
        .build()
}

fn io(error: impl std::fmt::Display) -> IngestError {
    IngestError::Io(error.to_string())
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), bytes))
}

/// Removes the output unless the write completed, including on a panic.
struct Partial<'a> {
    path: &'a Path,
    keep: bool,
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        if !self.keep
            && let Err(error) = std::fs::remove_file(self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, path = %self.path.display(), "cannot remove partial output");
        }
    }
}

/// A declared type, as the registry accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Boolean,
    Int32,
    Int64,
    Float64,
    Utf8,
    Date32,
    Timestamp,
    Decimal { precision: u8, scale: i8 },
}

impl Kind {
    /// Same spelling as the registry's validation: the plain names exactly,
    /// `decimal(p,s)` with any spaces, 1 <= p <= 38, 0 <= s <= p.
    fn parse(declared: &str) -> Option<Kind> {
        Some(match declared {
            "boolean" => Kind::Boolean,
            "int32" => Kind::Int32,
            "int64" => Kind::Int64,
            "float64" => Kind::Float64,
            "utf8" => Kind::Utf8,
            "date32" => Kind::Date32,
            "timestamp" => Kind::Timestamp,
            other => {
                let compact = other.replace(' ', "");
                let (p, s) = compact
                    .strip_prefix("decimal(")?
                    .strip_suffix(')')?
                    .split_once(',')?;
                let precision: u8 = p.parse().ok()?;
                let scale: u8 = s.parse().ok()?;
                if !(1..=38).contains(&precision) || scale > precision {
                    return None;
                }
                Kind::Decimal {
                    precision,
                    scale: i8::try_from(scale).ok()?,
                }
            }
        })
    }

    fn data_type(self) -> DataType {
        match self {
            Kind::Boolean => DataType::Boolean,
            Kind::Int32 => DataType::Int32,
            Kind::Int64 => DataType::Int64,
            Kind::Float64 => DataType::Float64,
            Kind::Utf8 => DataType::Utf8,
            Kind::Date32 => DataType::Date32,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
        }
    }

    /// The Parquet (Arrow) types a column of this kind may arrive as: the
    /// same rule as the quality measurement's, so a file accepted here
    /// would also have been measurable as uploaded. All of them widen to
    /// the declared type without loss (bar sub-microsecond timestamps).
    fn accepts(self, actual: &DataType) -> bool {
        match self {
            Kind::Boolean => matches!(actual, DataType::Boolean),
            Kind::Int32 => matches!(actual, DataType::Int8 | DataType::Int16 | DataType::Int32),
            Kind::Int64 => matches!(
                actual,
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
            ),
            Kind::Float64 => matches!(actual, DataType::Float32 | DataType::Float64),
            Kind::Utf8 => matches!(
                actual,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ),
            Kind::Date32 => matches!(actual, DataType::Date32),
            Kind::Timestamp => matches!(actual, DataType::Timestamp(_, _)),
            Kind::Decimal { precision, scale } => {
                matches!(actual, DataType::Decimal128(p, s) if (*p, *s) == (precision, scale))
            }
        }
    }
}

fn declared_kinds(table: &DeclaredTable) -> Result<Vec<Kind>, IngestError> {
    if table.columns.is_empty() {
        return Err(IngestError::Io(format!(
            "table {:?} declares no columns",
            table.name
        )));
    }
    table
        .columns
        .iter()
        .enumerate()
        .map(|(c, (name, declared))| {
            if table.columns[..c].iter().any(|(other, _)| other == name) {
                return Err(IngestError::Io(format!(
                    "column {name:?} is declared twice"
                )));
            }
            Kind::parse(declared).ok_or_else(|| {
                IngestError::Io(format!(
                    "column {name:?} declares {declared:?}, which is not a product type"
                ))
            })
        })
        .collect()
}

/// For each declared column, its index among the file's columns.
///
/// Missing columns are reported before undeclared ones, each in its own
/// order (declaration, file).
fn match_columns(
    file: &[&str],
    table: &DeclaredTable,
    what: &str,
    leave_out_undeclared: bool,
) -> Result<Vec<usize>, IngestError> {
    for (i, name) in file.iter().enumerate() {
        if file[..i].contains(name) {
            return Err(IngestError::Unreadable(format!(
                "column {name:?} appears twice in the {what}"
            )));
        }
    }
    let positions = table
        .columns
        .iter()
        .map(|(name, _)| {
            file.iter()
                .position(|f| f == name)
                .ok_or_else(|| IngestError::MissingColumn {
                    column: name.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(extra) = file
        .iter()
        .find(|f| !table.columns.iter().any(|(name, _)| name == *f))
        .filter(|_| !leave_out_undeclared)
    {
        return Err(IngestError::UndeclaredColumn {
            column: (*extra).to_owned(),
        });
    }
    Ok(positions)
}

enum Source<'a> {
    // Boxed: the CSV reader's buffers and decoder are several times the
    // size of the Parquet reader.
    Csv(Box<CsvSource<'a>>),
    Parquet(ParquetSource),
}

impl Source<'_> {
    /// The next batch's columns in declared order and types, `None` at the end.
    fn next_batch(&mut self) -> Result<Option<Vec<ArrayRef>>, IngestError> {
        match self {
            Source::Csv(csv) => csv.next_batch(),
            Source::Parquet(parquet) => parquet.next_batch(),
        }
    }
}

struct ParquetSource {
    reader: ParquetRecordBatchReader,
    positions: Vec<usize>,
    targets: Vec<DataType>,
}

impl ParquetSource {
    fn open(
        input: &Path,
        table: &DeclaredTable,
        kinds: &[Kind],
        leave_out_undeclared: bool,
    ) -> Result<Self, IngestError> {
        let unreadable = |error: &dyn std::fmt::Display| {
            tracing::debug!(%error, "not a readable Parquet file");
            IngestError::Unreadable("the file is not a readable Parquet file".into())
        };
        let file = File::open(input).map_err(|e| unreadable(&e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| unreadable(&e))?;
        let schema = Arc::clone(builder.schema());
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let positions = match_columns(&names, table, "file", leave_out_undeclared)?;
        for ((&position, (name, declared)), kind) in positions.iter().zip(&table.columns).zip(kinds)
        {
            let actual = schema.field(position).data_type();
            if !kind.accepts(actual) {
                return Err(IngestError::WrongType {
                    column: name.clone(),
                    declared: declared.clone(),
                    actual: actual.to_string(),
                });
            }
        }
        let reader = builder
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| unreadable(&e))?;
        Ok(Self {
            reader,
            positions,
            targets: kinds.iter().map(|kind| kind.data_type()).collect(),
        })
    }

    fn next_batch(&mut self) -> Result<Option<Vec<ArrayRef>>, IngestError> {
        let Some(batch) = self.reader.next() else {
            return Ok(None);
        };
        let batch = batch.map_err(|error| {
            tracing::debug!(%error, "Parquet input failed part way");
            IngestError::Unreadable(
                "the Parquet file is damaged and cannot be read to the end".into(),
            )
        })?;
        // Not `safe`: a value the cast cannot carry is an error, never a null.
        let options = CastOptions {
            safe: false,
            ..CastOptions::default()
        };
        self.positions
            .iter()
            .zip(&self.targets)
            .map(|(&position, target)| {
                let column = batch.column(position);
                arrow_cast::cast_with_options(column, target, &options).map_err(|error| {
                    let name = batch.schema_ref().field(position).name().clone();
                    tracing::debug!(%error, column = %name, "cast failed");
                    IngestError::Unreadable(format!(
                        "column {name:?} cannot be converted to its declared type"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Reads the CSV with arrow-csv, every column as text, and parses each
/// declared column itself so a refused value carries its row. An empty
/// field is null, in text columns too: CSV cannot tell an empty string from
/// a missing value.
///
/// arrow-csv does not say where in the file a record starts, and a quoted
/// field may span lines, so the line of a refused row is found afterwards:
/// the reader remembers only where the current batch starts and, on an
/// error, [`locate`] re-reads from there one record at a time. This assumes
/// `input` does not change while it is read, which holds for the caller's
/// upload file.
struct CsvSource<'a> {
    path: PathBuf,
    table: &'a DeclaredTable,
    kinds: &'a [Kind],
    reader: BufReader<File>,
    decoder: Decoder,
    /// The number of columns in the header.
    width: usize,
    positions: Vec<usize>,
    /// Byte offset in the file of the next byte the decoder has not consumed.
    offset: u64,
    /// Byte offset where the current batch's records (or the header) begin.
    batch_start: u64,
    /// Records before the current batch's first data row: 1 (the header)
    /// for the first batch, 0 after.
    batch_skip: usize,
    rows_before: u64,
}

impl<'a> CsvSource<'a> {
    fn open(
        input: &Path,
        table: &'a DeclaredTable,
        kinds: &'a [Kind],
    ) -> Result<Self, IngestError> {
        let mut file = File::open(input).map_err(read_error)?;
        let bom = skip_bom(&mut file).map_err(read_error)?;
        let (header, _) = arrow_csv::reader::Format::default()
            .with_header(true)
            .infer_schema(&mut file, Some(0))
            .map_err(|error| {
                tracing::debug!(%error, "CSV header unreadable");
                IngestError::Unreadable(
                    "the first line cannot be read as a CSV header of UTF-8 column names".into(),
                )
            })?;
        if header.fields().is_empty() {
            return Err(IngestError::Unreadable(
                "the file is empty; its first line must name the columns".into(),
            ));
        }
        let names: Vec<&str> = header.fields().iter().map(|f| f.name().as_str()).collect();
        let positions = match_columns(&names, table, "header", false)?;
        let width = names.len();
        file.seek(SeekFrom::Start(bom)).map_err(read_error)?;
        let decoder = ReaderBuilder::new(text_schema(width))
            .with_header(true)
            // The header was matched by name above; the decoder's column
            // names are placeholders.
            .with_header_validation(false)
            .with_batch_size(BATCH_ROWS)
            .build_decoder();
        Ok(Self {
            path: input.to_owned(),
            table,
            kinds,
            reader: BufReader::with_capacity(256 * 1024, file),
            decoder,
            width,
            positions,
            offset: bom,
            batch_start: bom,
            batch_skip: 1,
            rows_before: 0,
        })
    }

    fn next_batch(&mut self) -> Result<Option<Vec<ArrayRef>>, IngestError> {
        // Same loop as arrow-csv's own reader, keeping count of the offset.
        loop {
            let buf = self.reader.fill_buf().map_err(read_error)?;
            let Ok(consumed) = self.decoder.decode(buf) else {
                return Err(self.unreadable_record());
            };
            self.reader.consume(consumed);
            self.offset += consumed as u64;
            if consumed == 0 || self.decoder.capacity() == 0 {
                break;
            }
        }
        let batch = match self.decoder.flush() {
            Ok(Some(batch)) => batch,
            Ok(None) => return Ok(None),
            Err(_) => return Err(self.unreadable_record()),
        };
        let mut columns = Vec::with_capacity(self.positions.len());
        // (row in batch, file column, declared column) of the first bad value
        // in reading order.
        let mut first_bad: Option<(usize, usize, usize)> = None;
        for (c, (&position, &kind)) in self.positions.iter().zip(self.kinds).enumerate() {
            match parse_column(batch.column(position).as_string::<i32>(), kind) {
                Ok(column) => columns.push(column),
                Err(row) => {
                    if first_bad.is_none_or(|(r, p, _)| (row, position) < (r, p)) {
                        first_bad = Some((row, position, c));
                    }
                }
            }
        }
        if let Some((row, position, c)) = first_bad {
            let located = locate(
                &self.path,
                self.batch_start,
                self.batch_skip,
                Some(row),
                self.width,
            )?;
            let (column, declared) = &self.table.columns[c];
            let value = batch.column(position).as_string::<i32>().value(row);
            return Err(IngestError::BadValue {
                row: self.rows_before + row as u64 + 1,
                line: located.line,
                column: column.clone(),
                declared: declared.clone(),
                value: shown(value),
            });
        }
        self.rows_before += batch.num_rows() as u64;
        self.batch_start = self.offset;
        self.batch_skip = 0;
        Ok(Some(columns))
    }

    /// The error for a record arrow-csv refused in the current batch.
    fn unreadable_record(&self) -> IngestError {
        match locate(
            &self.path,
            self.batch_start,
            self.batch_skip,
            None,
            self.width,
        ) {
            Ok(Located {
                line,
                problem: Some(problem),
            }) => IngestError::Unreadable(match problem {
                Problem::FieldCount => format!(
                    "line {line} does not have the {} fields of the header",
                    self.width
                ),
                Problem::NotUtf8 => format!("line {line} is not UTF-8 text"),
            }),
            Ok(_) => IngestError::Unreadable("the file cannot be read as CSV".into()),
            Err(error) => error,
        }
    }
}

fn read_error(error: std::io::Error) -> IngestError {
    tracing::debug!(%error, "input unreadable");
    IngestError::Unreadable("the file cannot be read".into())
}

/// Skips a UTF-8 byte order mark, returning where the text begins.
fn skip_bom(file: &mut File) -> std::io::Result<u64> {
    let mut start = Vec::with_capacity(UTF8_BOM.len());
    file.by_ref()
        .take(UTF8_BOM.len() as u64)
        .read_to_end(&mut start)?;
    let bom = if start == UTF8_BOM {
        UTF8_BOM.len() as u64
    } else {
        0
    };
    file.seek(SeekFrom::Start(bom))?;
    Ok(bom)
}

fn text_schema(width: usize) -> SchemaRef {
    Arc::new(Schema::new(
        (0..width)
            .map(|i| Field::new(format!("c{i}"), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

fn shown(value: &str) -> String {
    let mut chars = value.chars();
    let mut head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    if chars.next().is_some() {
        head.push('…');
    }
    head
}

/// Where a record is, and what is wrong with it if arrow-csv refused it.
struct Located {
    /// 1-based line the record starts on.
    line: u64,
    problem: Option<Problem>,
}

enum Problem {
    FieldCount,
    NotUtf8,
}

/// Re-reads the file from `start` one record at a time: skips `skip`
/// records, then finds data record `target` (0-based), or with `None` the
/// first record arrow-csv refuses.
///
/// It uses arrow-csv's own decoder, so records split exactly as in the main
/// pass (quoted line breaks, skipped blank lines, `\r\n`); lines are counted
/// in the raw bytes, `\r\n`, `\n` and a lone `\r` each ending one.
fn locate(
    path: &Path,
    start: u64,
    skip: usize,
    target: Option<usize>,
    width: usize,
) -> Result<Located, IngestError> {
    let mut file = File::open(path).map_err(read_error)?;
    let mut lines = Lines::default();
    let mut prefix = BufReader::with_capacity(256 * 1024, file.by_ref().take(start));
    loop {
        let buf = prefix.fill_buf().map_err(read_error)?;
        if buf.is_empty() {
            break;
        }
        lines.feed(buf);
        let n = buf.len();
        prefix.consume(n);
    }
    drop(prefix);
    file.seek(SeekFrom::Start(start)).map_err(read_error)?;
    let mut reader = BufReader::new(file);
    let mut decoder = ReaderBuilder::new(text_schema(width))
        .with_header(false)
        .with_batch_size(1)
        .build_decoder();
    for record in 0.. {
        // Blank lines before a record are skipped by the CSV reader; skip them
        // here too so the line is the one the record starts on.
        loop {
            let buf = reader.fill_buf().map_err(read_error)?;
            let n = buf
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            lines.feed(&buf[..n]);
            let rest = buf.len() - n;
            reader.consume(n);
            if rest > 0 || n == 0 {
                break;
            }
        }
        let line = lines.count + 1;
        loop {
            let buf = reader.fill_buf().map_err(read_error)?;
            let Ok(n) = decoder.decode(buf) else {
                return Ok(Located {
                    line,
                    problem: Some(Problem::FieldCount),
                });
            };
            lines.feed(&buf[..n]);
            reader.consume(n);
            if n == 0 || decoder.capacity() == 0 {
                break;
            }
        }
        match decoder.flush() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                return Ok(Located {
                    line,
                    problem: Some(Problem::NotUtf8),
                });
            }
        }
        if record >= skip && target == Some(record - skip) {
            return Ok(Located {
                line,
                problem: None,
            });
        }
    }
    Ok(Located {
        line: lines.count + 1,
        problem: None,
    })
}

/// Counts line ends in a byte stream fed in pieces.
#[derive(Default)]
struct Lines {
    count: u64,
    after_cr: bool,
}

impl Lines {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' => self.count += 1,
                b'\r' => {
                    self.count += 1;
                    self.after_cr = true;
                }
                _ => self.after_cr = false,
            }
        }
    }
}

/// Parses one text column as `kind`; `Err` is the first bad row.
/// An empty field is already null.
fn parse_column(text: &StringArray, kind: Kind) -> Result<ArrayRef, usize> {
    Ok(match kind {
        Kind::Utf8 => Arc::new(text.clone()),
        Kind::Boolean => {
            let mut builder = BooleanBuilder::with_capacity(text.len());
            for (row, value) in text.iter().enumerate() {
                match value {
                    None => builder.append_null(),
                    Some(v) => builder.append_value(parse_bool(v).ok_or(row)?),
                }
            }
            Arc::new(builder.finish())
        }
        Kind::Int32 => Arc::new(parse_primitive::<Int32Type>(text, |v| v.parse().ok())?),
        Kind::Int64 => Arc::new(parse_primitive::<Int64Type>(text, |v| v.parse().ok())?),
        Kind::Float64 => Arc::new(parse_primitive::<Float64Type>(text, |v| {
            v.parse::<f64>().ok().filter(|f| f.is_finite())
        })?),
        Kind::Date32 => Arc::new(parse_primitive::<Date32Type>(text, parse_date)?),
        Kind::Timestamp => Arc::new(parse_primitive::<TimestampMicrosecondType>(
            text,
            parse_timestamp,
        )?),
        Kind::Decimal { precision, scale } => Arc::new(
            parse_primitive::<Decimal128Type>(text, |v| parse_decimal(v, precision, scale))?
                .with_precision_and_scale(precision, scale)
                .expect("Kind::parse admits only precisions and scales Decimal128 holds"),
        ),
    })
}

fn parse_primitive<T: ArrowPrimitiveType>(
    text: &StringArray,
    parse: impl Fn(&str) -> Option<T::Native>,
) -> Result<PrimitiveArray<T>, usize> {
    text.iter()
        .enumerate()
        .map(|(row, value)| value.map(|v| parse(v).ok_or(row)).transpose())
        .collect()
}

fn parse_bool(value: &str) -> Option<bool> {
    if value == "1" || value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value == "0" || value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// Plain decimal text (`-12.5`, `+3`, `.25`, `7.`) with at most `scale`
/// fraction digits and `precision - scale` integer digits (leading zeros
/// not counted); no exponent, no rounding.
fn parse_decimal(value: &str, precision: u8, scale: i8) -> Option<i128> {
    let scale = usize::try_from(scale).ok()?;
    let (negative, digits) = match value.as_bytes().first()? {
        b'-' => (true, &value[1..]),
        b'+' => (false, &value[1..]),
        _ => (false, value),
    };
    let (int, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && fraction.is_empty()) || !all_digits(int) || !all_digits(fraction) {
        return None;
    }
    let int = int.trim_start_matches('0');
    if fraction.len() > scale || int.len() + scale > usize::from(precision) {
        return None;
    }
    // At most 38 digits, so this cannot overflow an i128.
    let mut unscaled = int
        .bytes()
        .chain(fraction.bytes())
        .fold(0i128, |acc, d| acc * 10 + i128::from(d - b'0'));
    for _ in fraction.len()..scale {
        unscaled *= 10;
    }
    Some(if negative { -unscaled } else { unscaled })
}

fn digits(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
    })
}

/// `YYYY-MM-DD`, a real calendar day, as days since 1970-01-01.
fn parse_date(value: &str) -> Option<i32> {
    let b = value.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = digits(&b[..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..])?;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day == 0 || day > month_days {
        return None;
    }
    i32::try_from(days_from_civil(i64::from(year), month, day)).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `YYYY-MM-DD`, `T` or a space, `HH:MM:SS`, an optional fraction of up to
/// nine digits, and an optional `Z` or `±HH:MM`, as UTC microseconds since
/// the epoch. This takes RFC 3339 and `YYYY-MM-DD HH:MM:SS[.ffffff]`; a time
/// without an offset is UTC. Digits past the microsecond are dropped, as
/// when a nanosecond Parquet column is converted. Leap seconds (`:60`) are
/// refused.
fn parse_timestamp(value: &str) -> Option<i64> {
    let b = value.as_bytes();
    if b.len() < 19 || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let days = parse_date(value.get(..10)?)?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros = 0i64;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|d| d.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        let kept = &fraction[..n.min(6)];
        micros = kept.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0'));
        for _ in kept.len()..6 {
            micros *= 10;
        }
        rest = &fraction[n..];
    }
    let offset = match rest {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2])?;
            let minutes = digits(&[*m1, *m2])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    let seconds = i64::from(days) * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset;
    Some(seconds * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    use arrow_array::RecordBatchReader as _;
    use arrow_array::{
        BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
        TimestampMicrosecondArray,
    };
    use parquet::arrow::arrow_reader::ArrowReaderOptions;
    use parquet::file::metadata::PageIndexPolicy;

    fn table(columns: &[(&str, &str)]) -> DeclaredTable {
        DeclaredTable {
            name: "t".into(),
            columns: columns
                .iter()
                .map(|(name, ty)| ((*name).to_owned(), (*ty).to_owned()))
                .collect(),
        }
    }

    struct Upload {
        dir: tempfile::TempDir,
        input: PathBuf,
    }

    impl Upload {
        fn csv(text: &str) -> Upload {
            Upload::bytes("in.csv", text.as_bytes())
        }

        fn bytes(name: &str, bytes: &[u8]) -> Upload {
            let dir = tempfile::tempdir().unwrap();
            let input = dir.path().join(name);
            std::fs::write(&input, bytes).unwrap();
            Upload { dir, input }
        }

        fn parquet(batch: &RecordBatch) -> Upload {
            let mut bytes = Vec::new();
            let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
            writer.write(batch).unwrap();
            writer.close().unwrap();
            Upload::bytes("in.parquet", &bytes)
        }

        fn output(&self) -> PathBuf {
            self.dir.path().join("out.parquet")
        }

        fn ingest(&self, format: Format, table: &DeclaredTable) -> Result<Ingested, IngestError> {
            canonical_parquet(&self.input, format, table, &self.output())
        }
    }

    fn read_back(path: &Path) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let schema = reader.schema();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        arrow_select::concat::concat_batches(&schema, &batches).unwrap()
    }

    fn bad_value(row: u64, line: u64, column: &str, declared: &str, value: &str) -> IngestError {
        IngestError::BadValue {
            row,
            line,
            column: column.into(),
            declared: declared.into(),
            value: value.into(),
        }
    }

    const EVERY_TYPE: &[(&str, &str)] = &[
        ("flag", "boolean"),
        ("small", "int32"),
        ("big", "int64"),
        ("ratio", "float64"),
        ("name", "utf8"),
        ("day", "date32"),
        ("at", "timestamp"),
        ("income", "decimal(12, 2)"),
    ];

    #[test]
    fn csv_with_every_type_round_trips() {
        // A BOM, CRLF line ends, columns in another order than declared, a
        // quoted field with a comma, a doubled quote and a line break, nulls.
        let upload = Upload::csv(
            "\u{feff}name,flag,small,big,ratio,day,at,income\r\n\
             \"Smith, \"\"J\"\"\r\nJr.\",TRUE,-7,9000000000,1.5,2026-01-02,2026-01-02T03:04:05Z,1234.5\r\n\
             plain,0,+12,-1,-2e3,1970-01-01,2026-01-02 05:04:05.25,-0.07\r\n\
             ,,,,,,,\r\n",
        );
        let ingested = upload.ingest(Format::Csv, &table(EVERY_TYPE)).unwrap();
        assert_eq!(ingested.rows, 3);

        let batch = read_back(&upload.output());
        let expected_schema = Schema::new(vec![
            Field::new("flag", DataType::Boolean, true),
            Field::new("small", DataType::Int32, true),
            Field::new("big", DataType::Int64, true),
            Field::new("ratio", DataType::Float64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("day", DataType::Date32, true),
            Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("income", DataType::Decimal128(12, 2), true),
        ]);
        assert_eq!(batch.schema().fields(), expected_schema.fields());
        let at = 1_767_323_045_000_000; // 2026-01-02T03:04:05Z
        let expected: Vec<ArrayRef> = vec![
            Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
            Arc::new(Int32Array::from(vec![Some(-7), Some(12), None])),
            Arc::new(Int64Array::from(vec![Some(9_000_000_000), Some(-1), None])),
            Arc::new(Float64Array::from(vec![Some(1.5), Some(-2000.0), None])),
            Arc::new(StringArray::from(vec![
                Some("Smith, \"J\"\r\nJr."),
                Some("plain"),
                None,
            ])),
            Arc::new(Date32Array::from(vec![Some(20_455), Some(0), None])),
            Arc::new(TimestampMicrosecondArray::from(vec![
                Some(at),
                Some(at + 7_200_250_000),
                None,
            ])),
            Arc::new(
                Decimal128Array::from(vec![Some(123_450), Some(-7), None])
                    .with_precision_and_scale(12, 2)
                    .unwrap(),
            ),
        ];
        for (c, want) in expected.iter().enumerate() {
            assert_eq!(batch.column(c).as_ref(), want.as_ref(), "column {c}");
        }
    }

    #[test]
    fn output_is_snappy_with_page_indexes_and_a_fixed_creator() {
        let upload = Upload::csv("n\n1\n2\n");
        upload
            .ingest(Format::Csv, &table(&[("n", "int64")]))
            .unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(
            File::open(upload.output()).unwrap(),
            ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required),
        )
        .unwrap();
        let metadata = builder.metadata();
        assert_eq!(metadata.file_metadata().created_by(), Some(CREATED_BY));
        assert_eq!(
            metadata.row_group(0).column(0).compression(),
            Compression::SNAPPY
        );
        assert!(metadata.offset_index().is_some());
        assert!(metadata.column_index().is_some());
    }

    #[test]
    fn bad_value_names_row_line_and_column() {
        let upload = Upload::csv("id,income\n1,10.50\n2,abc\n3,1\n");
        let declared = table(&[("id", "int64"), ("income", "decimal(12,2)")]);
        let error = upload.ingest(Format::Csv, &declared).unwrap_err();
        assert_eq!(error, bad_value(2, 3, "income", "decimal(12,2)", "abc"));
        assert_eq!(
            error.to_string(),
            r#"row 2 (line 3), column income: "abc" is not a decimal(12,2)"#
        );
    }

    #[test]
    fn bad_value_after_a_quoted_multi_line_field_has_the_right_line() {
        let upload = Upload::csv("name,n\n\"a\nb\n\nc\",1\n\nd,x\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("name", "utf8"), ("n", "int32")]))
            .unwrap_err();
        assert_eq!(error, bad_value(2, 7, "n", "int32", "x"));
        assert_eq!(
            error.to_string(),
            r#"row 2 (line 7), column n: "x" is not an int32"#
        );
    }

    #[test]
    fn bad_value_in_a_later_batch_counts_every_line_from_the_start() {
        // Past the first batch, with CRLF ends and a quoted CRLF inside a
        // field in each batch, so the line is two more than row + header.
        let mut text = String::from("name,n\r\n");
        for row in 1..=BATCH_ROWS + 100 {
            if row == 10 || row == BATCH_ROWS + 10 {
                text.push_str("\"two\r\nlines\",1\r\n");
            } else {
                text.push_str(&format!("r{row},{row}\r\n"));
            }
        }
        text.push_str("last,1.5\r\n");
        let upload = Upload::csv(&text);
        let error = upload
            .ingest(Format::Csv, &table(&[("name", "utf8"), ("n", "int64")]))
            .unwrap_err();
        let row = (BATCH_ROWS + 101) as u64;
        assert_eq!(error, bad_value(row, row + 3, "n", "int64", "1.5"));
    }

    #[test]
    fn earliest_bad_row_is_reported_then_leftmost_column() {
        let upload = Upload::csv("a,b\n1,1\nx,y\nz,1\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("b", "int32"), ("a", "int32")]))
            .unwrap_err();
        assert_eq!(error, bad_value(2, 3, "a", "int32", "x"));
    }

    #[test]
    fn a_long_bad_value_is_cut_to_forty_characters() {
        let long = "9".repeat(45);
        let upload = Upload::csv(&format!("n\n{long}\n"));
        let error = upload
            .ingest(Format::Csv, &table(&[("n", "int64")]))
            .unwrap_err();
        assert_eq!(
            error,
            bad_value(1, 2, "n", "int64", &format!("{}…", &long[..40]))
        );
    }

    #[test]
    fn a_row_with_the_wrong_number_of_fields_is_unreadable_naming_the_line() {
        let upload = Upload::csv("a,b\n1,2\n\"x\ny\",2\n3\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("a", "utf8"), ("b", "int32")]))
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::Unreadable("line 5 does not have the 2 fields of the header".into())
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_unreadable_naming_the_line() {
        let upload = Upload::bytes("in.csv", b"a\nok\n\xff\xfe\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("a", "utf8")]))
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::Unreadable("line 3 is not UTF-8 text".into())
        );
    }

    #[test]
    fn missing_declared_column_is_refused() {
        let upload = Upload::csv("id\n1\n");
        let error = upload
            .ingest(
                Format::Csv,
                &table(&[("id", "int64"), ("income", "float64")]),
            )
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::MissingColumn {
                column: "income".into()
            }
        );
        assert_eq!(
            error.to_string(),
            r#"column "income" is declared but not in the file"#
        );
    }

    #[test]
    fn undeclared_column_is_refused() {
        let upload = Upload::csv("id,ssn\n1,123\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("id", "int64")]))
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::UndeclaredColumn {
                column: "ssn".into()
            }
        );
        assert_eq!(
            error.to_string(),
            r#"column "ssn" is in the file but not declared by the product; declare it in a revision or remove it"#
        );
    }

    #[test]
    fn a_column_named_twice_in_the_header_is_refused() {
        let upload = Upload::csv("id,id\n1,2\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("id", "int64")]))
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::Unreadable(r#"column "id" appears twice in the header"#.into())
        );
    }

    #[test]
    fn an_empty_file_is_unreadable() {
        let upload = Upload::csv("");
        let error = upload
            .ingest(Format::Csv, &table(&[("id", "int64")]))
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::Unreadable(
                "the file is empty; its first line must name the columns".into()
            )
        );
    }

    #[test]
    fn header_only_csv_gives_zero_rows() {
        let upload = Upload::csv("id,name\n");
        let ingested = upload
            .ingest(Format::Csv, &table(&[("name", "utf8"), ("id", "int64")]))
            .unwrap();
        assert_eq!(ingested.rows, 0);
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(File::open(upload.output()).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
        let names: Vec<&str> = reader
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["name", "id"]);
    }

    #[test]
    fn decimal_with_more_fraction_digits_than_its_scale_is_refused() {
        let upload = Upload::csv("x\n1.25\n1.255\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("x", "decimal(12,2)")]))
            .unwrap_err();
        assert_eq!(error, bad_value(2, 3, "x", "decimal(12,2)", "1.255"));
    }

    #[test]
    fn decimal_with_more_integer_digits_than_it_holds_is_refused() {
        let upload = Upload::csv("x\n99.99\n0099.5\n100\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("x", "decimal(4,2)")]))
            .unwrap_err();
        assert_eq!(error, bad_value(3, 4, "x", "decimal(4,2)", "100"));
    }

    #[test]
    fn out_of_range_int32_is_refused() {
        let upload = Upload::csv("n\n2147483647\n-2147483648\n2147483648\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("n", "int32")]))
            .unwrap_err();
        assert_eq!(error, bad_value(3, 4, "n", "int32", "2147483648"));
    }

    #[test]
    fn non_finite_floats_are_refused() {
        for value in ["NaN", "inf", "-infinity", "1e400"] {
            let upload = Upload::csv(&format!("f\n{value}\n"));
            let error = upload
                .ingest(Format::Csv, &table(&[("f", "float64")]))
                .unwrap_err();
            assert_eq!(error, bad_value(1, 2, "f", "float64", value));
        }
    }

    #[test]
    fn values_are_parsed_strictly() {
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(parse_decimal("-.5", 3, 2), Some(-50));
        assert_eq!(parse_decimal("7.", 3, 0), Some(7));
        assert_eq!(parse_decimal("1e3", 10, 0), None);
        assert_eq!(parse_decimal(".", 10, 2), None);
        assert_eq!(parse_decimal("1.2.3", 10, 2), None);
        assert_eq!(parse_date("2024-02-29"), Some(19_782));
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(parse_date("2026-1-02"), None);
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        let at = Some(1_767_323_045_000_000);
        assert_eq!(parse_timestamp("2026-01-02T03:04:05Z"), at);
        assert_eq!(parse_timestamp("2026-01-02T05:04:05+02:00"), at);
        assert_eq!(parse_timestamp("2026-01-01T23:04:05-04:00"), at);
        assert_eq!(parse_timestamp("2026-01-02 03:04:05"), at);
        assert_eq!(
            parse_timestamp("2026-01-02 03:04:05.000001"),
            at.map(|t| t + 1)
        );
        assert_eq!(
            parse_timestamp("2026-01-02T03:04:05.123456789Z"),
            at.map(|t| t + 123_456)
        );
        assert_eq!(parse_timestamp("2026-01-02"), None);
        assert_eq!(parse_timestamp("2026-01-02T03:04"), None);
        assert_eq!(parse_timestamp("2026-01-02T24:00:00Z"), None);
        assert_eq!(parse_timestamp("2026-01-02T03:04:05+0200"), None);
        assert_eq!(parse_timestamp("2026-01-02T03:04:05."), None);
    }

    #[test]
    fn parquet_int32_is_widened_to_int64() {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("name", DataType::Utf8View, false),
                Field::new("n", DataType::Int32, false),
            ])),
            vec![
                Arc::new(arrow_array::StringViewArray::from(vec!["a", "b"])),
                Arc::new(Int32Array::from(vec![1, -2])),
            ],
        )
        .unwrap();
        let upload = Upload::parquet(&batch);
        let ingested = upload
            .ingest(Format::Parquet, &table(&[("n", "int64"), ("name", "utf8")]))
            .unwrap();
        assert_eq!(ingested.rows, 2);
        let out = read_back(&upload.output());
        assert_eq!(
            out.schema().fields(),
            Schema::new(vec![
                Field::new("n", DataType::Int64, true),
                Field::new("name", DataType::Utf8, true),
            ])
            .fields()
        );
        assert_eq!(
            out.column(0).as_primitive::<Int64Type>(),
            &Int64Array::from(vec![1, -2])
        );
        assert_eq!(
            out.column(1).as_string::<i32>(),
            &StringArray::from(vec!["a", "b"])
        );
    }

    #[test]
    fn parquet_utf8_for_int64_is_wrong_type() {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("n", DataType::Utf8, true)])),
            vec![Arc::new(StringArray::from(vec!["1"]))],
        )
        .unwrap();
        let upload = Upload::parquet(&batch);
        let error = upload
            .ingest(Format::Parquet, &table(&[("n", "int64")]))
            .unwrap_err();
        assert_eq!(
            error,
            IngestError::WrongType {
                column: "n".into(),
                declared: "int64".into(),
                actual: "Utf8".into(),
            }
        );
        assert!(!upload.output().exists());
    }

    #[test]
    fn parquet_missing_and_undeclared_columns_are_refused() {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("n", DataType::Int64, true),
                Field::new("ssn", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1])),
                Arc::new(StringArray::from(vec!["x"])),
            ],
        )
        .unwrap();
        let upload = Upload::parquet(&batch);
        assert_eq!(
            upload.ingest(Format::Parquet, &table(&[("n", "int64")])),
            Err(IngestError::UndeclaredColumn {
                column: "ssn".into()
            })
        );
        assert_eq!(
            upload.ingest(
                Format::Parquet,
                &table(&[("n", "int64"), ("ssn", "utf8"), ("age", "int32")])
            ),
            Err(IngestError::MissingColumn {
                column: "age".into()
            })
        );
    }

    #[test]
    fn a_file_that_is_not_parquet_is_unreadable() {
        let upload = Upload::csv("n\n1\n");
        assert_eq!(
            upload.ingest(Format::Parquet, &table(&[("n", "int64")])),
            Err(IngestError::Unreadable(
                "the file is not a readable Parquet file".into()
            ))
        );
    }

    #[test]
    fn same_input_gives_the_same_bytes_and_hash() {
        let mut text = String::from("id,label,amount\n");
        for row in 0..BATCH_ROWS + 5 {
            text.push_str(&format!("{row},label {},{row}.{}\n", row % 17, row % 10));
        }
        let upload = Upload::csv(&text);
        let declared = table(&[
            ("id", "int64"),
            ("label", "utf8"),
            ("amount", "decimal(10,1)"),
        ]);
        let first = upload.ingest(Format::Csv, &declared).unwrap();
        let first_bytes = std::fs::read(upload.output()).unwrap();
        let again = upload.dir.path().join("again.parquet");
        let second = canonical_parquet(&upload.input, Format::Csv, &declared, &again).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.rows, (BATCH_ROWS + 5) as u64);
        assert_eq!(std::fs::read(&again).unwrap(), first_bytes);
        assert_eq!(first.sha256, hex::encode(Sha256::digest(&first_bytes)));
        assert_eq!(first.bytes, first_bytes.len() as u64);
    }

    #[test]
    fn an_error_leaves_no_output_behind() {
        // The bad value is in the second batch, after the first was written.
        let mut text = String::from("n\n");
        for row in 0..BATCH_ROWS {
            text.push_str(&format!("{row}\n"));
        }
        text.push_str("oops\n");
        let upload = Upload::csv(&text);
        let error = upload
            .ingest(Format::Csv, &table(&[("n", "int64")]))
            .unwrap_err();
        assert!(matches!(error, IngestError::BadValue { .. }), "{error}");
        assert!(!upload.output().exists());
    }

    #[test]
    fn a_declaration_the_registry_would_refuse_is_an_io_error() {
        let upload = Upload::csv("n\n1\n");
        let error = upload
            .ingest(Format::Csv, &table(&[("n", "decimal(2,3)")]))
            .unwrap_err();
        assert!(matches!(error, IngestError::Io(_)), "{error}");
        assert!(!upload.output().exists());
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!(Format::parse("csv"), Some(Format::Csv));
        assert_eq!(Format::parse("parquet"), Some(Format::Parquet));
        assert_eq!(Format::parse("json"), None);
    }
}
