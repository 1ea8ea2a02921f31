//! `civicgrid product scaffold --from FILE`: a product spec drafted from a
//! Parquet or CSV file's schema, for its provider to finish and submit.
//!
//! Each column gets its declared type and a suggested sensitivity from its
//! name (personal identifiers and contact details blocked, traits and
//! locations sensitive, other identifiers internal, the rest public); the
//! output policy gets the platform's defaults, with list queries refused
//! until the provider names the columns they may return. Suggestions are
//! only that: the provider reviews every one, and a platform admin reviews
//! the registration.

use std::path::Path;

use arrow_schema::{DataType, Schema};
use civicgrid_marketplace::proto::{Column, OutputPolicy, ProductSpec, Sensitivity, Table};

/// Rows a CSV file's types are inferred from.
const CSV_INFERENCE_ROWS: usize = 10_000;

/// Why no spec could be drafted.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The file could not be read.
    #[error("{path}: {message}")]
    Unreadable {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// Neither `.parquet` nor `.csv`.
    #[error("{0}: name a .parquet or .csv file")]
    UnknownFormat(String),
    /// A column whose name a product cannot declare.
    #[error(
        "column {column:?}: a product's columns are named with 1 to 63 of a-z, 0-9 and '_', not starting with a digit; rename it in the file (for example to {suggestion:?})"
    )]
    UnsupportedName {
        /// The column.
        column: String,
        /// A name that would do.
        suggestion: String,
    },
    /// A column whose type a product cannot declare.
    #[error(
        "column {column:?} has type {data_type}, which a product cannot declare (boolean, int32, int64, float64, decimal(p,s), utf8, date32, timestamp)"
    )]
    UnsupportedType {
        /// The column.
        column: String,
        /// Its Arrow type.
        data_type: String,
    },
}

/// A drafted spec and what the provider should review.
#[derive(Debug, Clone)]
pub struct Scaffold {
    /// The draft.
    pub spec: ProductSpec,
    /// One line per suggestion or gap, for the provider to read.
    pub notes: Vec<String>,
}

/// The declared type of an Arrow type, if a product can declare it.
fn declared_type(data_type: &DataType) -> Option<String> {
    Some(match data_type {
        DataType::Boolean => "boolean".into(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::Float32 | DataType::Float64 => "float64".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "utf8".into(),
        DataType::Date32 => "date32".into(),
        DataType::Timestamp(_, _) => "timestamp".into(),
        DataType::Decimal128(precision, scale) if *scale >= 0 => {
            format!("decimal({precision},{scale})")
        }
        _ => return None,
    })
}

const BLOCKED: &[&str] = &[
    "name",
    "fullname",
    "firstname",
    "lastname",
    "surname",
    "phone",
    "mobile",
    "telephone",
    "email",
    "mail",
    "address",
    "street",
    "passport",
    "ssn",
    "idcard",
    "nationalid",
    "citizenid",
    "personid",
    "residentid",
    "plate",
    "licenceplate",
    "licenseplate",
    "iban",
    "account",
    "cardnumber",
    "身份证",
    "姓名",
    "电话",
    "手机",
    "地址",
    "邮箱",
];
const SENSITIVE: &[&str] = &[
    "birth",
    "birthday",
    "dob",
    "age",
    "gender",
    "sex",
    "income",
    "salary",
    "health",
    "diagnosis",
    "religion",
    "ethnicity",
    "latitude",
    "longitude",
    "lat",
    "lon",
    "lng",
    "gps",
    "location",
    "出生",
    "年龄",
    "性别",
    "收入",
    "健康",
    "位置",
];

/// The name's words, lower case: `PersonID` and `person_id` both give
/// `person id`, also joined (`personid`) to catch either spelling.
fn words(name: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if c == '_' || c == '-' || c == ' ' || c == '.' {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            previous_lower = false;
            continue;
        }
        if c.is_uppercase() && previous_lower && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        previous_lower = c.is_lowercase();
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    let joined = words.concat();
    words.push(joined);
    words
}

/// A sensitivity suggested by `name`, and why.
fn suggest(name: &str) -> (Sensitivity, &'static str) {
    let words = words(name);
    let any = |list: &[&str]| {
        words.iter().any(|word| {
            list.iter()
                .any(|term| word == term || (!term.is_ascii() && word.contains(term)))
        })
    };
    if any(BLOCKED) {
        (
            Sensitivity::Blocked,
            "looks like a personal identifier or contact detail",
        )
    } else if any(SENSITIVE) {
        (
            Sensitivity::Sensitive,
            "looks like a personal trait or a location",
        )
    } else if words.iter().any(|w| w == "id") {
        (Sensitivity::Internal, "looks like an identifier")
    } else {
        (Sensitivity::Public, "")
    }
}

fn read_schema(path: &Path) -> Result<Schema, ScaffoldError> {
    let unreadable = |message: String| ScaffoldError::Unreadable {
        path: path.display().to_string(),
        message,
    };
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase);
    let parquet = match extension.as_deref() {
        Some("parquet") => true,
        Some("csv") => false,
        _ => return Err(ScaffoldError::UnknownFormat(path.display().to_string())),
    };
    let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    if parquet {
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| unreadable(e.to_string()))?;
        Ok(builder.schema().as_ref().clone())
    } else {
        let (schema, _) = arrow_csv::reader::Format::default()
            .with_header(true)
            .infer_schema(std::io::BufReader::new(file), Some(CSV_INFERENCE_ROWS))
            .map_err(|e| unreadable(e.to_string()))?;
        Ok(schema)
    }
}

/// Whether a product may declare a column named `name`.
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// A table name from a file stem: lower case letters, digits and `_`.
fn table_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("data")
        .to_lowercase();
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name
    } else {
        format!("t_{name}")
    }
}

/// Drafts a spec for product `id` from the file at `path`, its table named
/// `table` (default: from the file's name).
///
/// # Errors
/// [`ScaffoldError`] for a file that cannot be read or a column whose type
/// a product cannot declare.
pub fn scaffold(path: &Path, id: &str, table: Option<&str>) -> Result<Scaffold, ScaffoldError> {
    let schema = read_schema(path)?;
    let table = table.map_or_else(|| table_name(path), str::to_owned);
    let mut notes = Vec::new();
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut privacy_unit = None;
    for field in schema.fields() {
        if !valid_name(field.name()) {
            let mut words = words(field.name());
            words.pop();
            return Err(ScaffoldError::UnsupportedName {
                column: field.name().clone(),
                suggestion: table_name(Path::new(&words.join("_"))),
            });
        }
        let declared =
            declared_type(field.data_type()).ok_or_else(|| ScaffoldError::UnsupportedType {
                column: field.name().clone(),
                data_type: field.data_type().to_string(),
            })?;
        let (sensitivity, why) = suggest(field.name());
        if !why.is_empty() {
            notes.push(format!(
                "{table}.{}: {} ({why})",
                field.name(),
                sensitivity
                    .as_str_name()
                    .trim_start_matches("SENSITIVITY_")
                    .to_lowercase()
            ));
        }
        let identifier = words(field.name())
            .iter()
            .any(|w| w == "id" || w.ends_with("id"));
        if privacy_unit.is_none() && sensitivity == Sensitivity::Blocked && identifier {
            privacy_unit = Some(field.name().clone());
        }
        columns.push(Column {
            name: field.name().clone(),
            r#type: declared,
            sensitivity: sensitivity as i32,
            description: String::new(),
        });
    }
    match &privacy_unit {
        Some(column) => notes.push(format!(
            "output_policy.privacy_unit_column: {column} (every released group must count at least 10 distinct values of it)"
        )),
        None => notes.push(
            "output_policy.privacy_unit_column: none found; name the column that identifies a person or household".into(),
        ),
    }
    notes.push("output_policy.list_columns: empty, so list queries are refused until you name the columns they may return".into());
    notes.push("still to fill in: description, licence, update_frequency, tier, region, hosting_data_centers, price_plans".into());
    let title = table.replace('_', " ");
    let spec = ProductSpec {
        title: title.clone(),
        keywords: Vec::new(),
        storage_location: format!("products/{id}"),
        tables: vec![Table {
            name: table,
            columns,
        }],
        output_policy: Some(OutputPolicy {
            min_aggregation_count: 10,
            privacy_unit_column: privacy_unit.unwrap_or_default(),
            max_list_rows: 1000,
            max_result_bytes: 1 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Scaffold { spec, notes })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::Field;
    use civicgrid_marketplace::proto::{PriceKind, PricePlan};

    use super::*;

    fn parquet(dir: &Path) -> std::path::PathBuf {
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Int64, false),
            Field::new("full_name", DataType::Utf8, true),
            Field::new("date_of_birth", DataType::Date32, true),
            Field::new("district", DataType::Utf8, true),
            Field::new("licence_id", DataType::Int64, true),
            Field::new("income", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["A", "B"])),
                Arc::new(Date32Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["north", "south"])),
                Arc::new(Int64Array::from(vec![7, 8])),
                Arc::new(Float64Array::from(vec![1.0, 2.0])),
            ],
        )
        .unwrap();
        let path = dir.join("City Residents.parquet");
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            schema,
            None,
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    }

    fn sensitivities(scaffold: &Scaffold) -> Vec<(String, String, Sensitivity)> {
        scaffold.spec.tables[0]
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.r#type.clone(), c.sensitivity()))
            .collect()
    }

    #[test]
    fn a_parquet_files_columns_get_types_and_suggested_sensitivities() {
        let dir = tempfile::tempdir().unwrap();
        let drafted = scaffold(&parquet(dir.path()), "residents", None).unwrap();
        assert_eq!(drafted.spec.tables[0].name, "city_residents");
        assert_eq!(
            sensitivities(&drafted),
            vec![
                ("person_id".into(), "int64".into(), Sensitivity::Blocked),
                ("full_name".into(), "utf8".into(), Sensitivity::Blocked),
                (
                    "date_of_birth".into(),
                    "date32".into(),
                    Sensitivity::Sensitive
                ),
                ("district".into(), "utf8".into(), Sensitivity::Public),
                ("licence_id".into(), "int64".into(), Sensitivity::Internal),
                ("income".into(), "float64".into(), Sensitivity::Sensitive),
            ]
        );
        let policy = drafted.spec.output_policy.as_ref().unwrap();
        assert_eq!(policy.privacy_unit_column, "person_id");
        assert!(policy.list_columns.is_empty());
        assert_eq!(drafted.spec.storage_location, "products/residents");
    }

    #[test]
    fn the_draft_once_finished_passes_the_marketplaces_validation() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = scaffold(&parquet(dir.path()), "residents", Some("residents"))
            .unwrap()
            .spec;
        // Not valid as drafted: the provider must describe it.
        let refused = civicgrid_marketplace::registry::validate_spec(&spec).unwrap_err();
        assert!(
            refused.to_string().contains("spec.description"),
            "{refused}"
        );
        spec.description = "Residents of the city".into();
        spec.licence = "CC-BY-4.0".into();
        spec.update_frequency = "monthly".into();
        spec.tier = "municipal".into();
        spec.region = "city".into();
        spec.hosting_data_centers = vec!["municipal-core".into()];
        spec.price_plans = vec![PricePlan {
            id: "per-query".into(),
            kind: PriceKind::PerQuery as i32,
            unit_price_minor: 100,
            currency: "EUR".into(),
            ..Default::default()
        }];
        civicgrid_marketplace::registry::validate_spec(&spec).unwrap();
    }

    #[test]
    fn csv_types_are_inferred_and_unsupported_types_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("permits.csv");
        std::fs::write(
            &path,
            "permit_id,issued,fee,email\n1,2026-01-02,12.5,a@b.c\n2,2026-02-03,9,d@e.f\n",
        )
        .unwrap();
        let drafted = scaffold(&path, "permits", None).unwrap();
        assert_eq!(
            sensitivities(&drafted),
            vec![
                ("permit_id".into(), "int64".into(), Sensitivity::Internal),
                ("issued".into(), "date32".into(), Sensitivity::Public),
                ("fee".into(), "float64".into(), Sensitivity::Public),
                ("email".into(), "utf8".into(), Sensitivity::Blocked),
            ]
        );
        let list = dir.path().join("nested.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new(
            "tags",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        )]));
        let writer = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&list).unwrap(),
            schema,
            None,
        )
        .unwrap();
        writer.close().unwrap();
        let error = scaffold(&list, "nested", None).unwrap_err();
        assert!(
            matches!(&error, ScaffoldError::UnsupportedType { column, .. } if column == "tags"),
            "{error}"
        );
        assert!(matches!(
            scaffold(&dir.path().join("data.xlsx"), "x", None),
            Err(ScaffoldError::UnknownFormat(_))
        ));
        assert!(matches!(
            scaffold(&dir.path().join("missing.csv"), "x", None),
            Err(ScaffoldError::Unreadable { .. })
        ));
    }

    #[test]
    fn a_column_name_a_product_cannot_declare_is_named_with_a_suggestion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("people.csv");
        std::fs::write(&path, "PersonID,district\n1,north\n").unwrap();
        let error = scaffold(&path, "people", None).unwrap_err();
        assert!(
            matches!(&error, ScaffoldError::UnsupportedName { column, suggestion } if column == "PersonID" && suggestion == "person_id"),
            "{error}"
        );
    }

    #[test]
    fn chinese_column_names_are_recognised() {
        assert_eq!(suggest("身份证号").0, Sensitivity::Blocked);
        assert_eq!(suggest("年龄段").0, Sensitivity::Sensitive);
        assert_eq!(suggest("区县").0, Sensitivity::Public);
    }
}
