//! What one version of a product's data is: for each declared table, the
//! files that hold its rows, each named by its content. A version is
//! immutable; appending a day's rows makes a new version that lists the old
//! files and one more, so nothing already written is rewritten.
//!
//! Its fingerprint is an RFC 9162 Merkle tree root over one leaf per file
//! (table, path, SHA-256, bytes, rows), so a query's audit entry can name
//! exactly which data answered it, and any one file can be proven part of a
//! version without the others.

use civicgrid_tlog::merkle;
use serde::{Deserialize, Serialize};

/// The folder, inside a product's location, that holds its versions' files.
pub const DATA_FOLDER: &str = "data";

/// One file of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative to the product's location: `data/<table>/<sha256>.parquet`.
    pub path: String,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// The file's length.
    pub bytes: u64,
    /// Rows it holds.
    pub rows: u64,
}

/// A table's files, read in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTable {
    /// The declared table's name.
    pub name: String,
    /// Its files.
    pub files: Vec<ManifestFile>,
}

/// A version's tables, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The tables.
    pub tables: Vec<ManifestTable>,
}

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A file's path is not the content-addressed path of its table.
    #[error("file {path} of table {table} is not data/{table}/<sha256>.parquet")]
    Path {
        /// The table.
        table: String,
        /// The path as listed.
        path: String,
    },
    /// A table is listed twice, or out of order.
    #[error("table {0} is listed twice or out of order")]
    Order(String),
}

impl Manifest {
    /// The path a file of `table` with content `sha256` is stored at.
    #[must_use]
    pub fn file_path(table: &str, sha256: &str) -> String {
        format!("{DATA_FOLDER}/{table}/{sha256}.parquet")
    }

    /// Whether `path` is a path a version's file can have,
    /// `data/<table>/<sha256>.parquet`: nothing else in a product's folder
    /// is ever removed as a version's file.
    #[must_use]
    pub fn is_file_path(path: &str) -> bool {
        let mut parts = path.split('/');
        let (Some(DATA_FOLDER), Some(table), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Some(sha256) = name.strip_suffix(".parquet") else {
            return false;
        };
        let hex = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let named =
            !table.is_empty() && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        hex && named
    }

    /// The table named `name`.
    #[must_use]
    pub fn table(&self, name: &str) -> Option<&ManifestTable> {
        self.tables.iter().find(|table| table.name == name)
    }

    /// Rows in every table.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.files().map(|(_, file)| file.rows).sum()
    }

    /// Bytes in every file.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.files().map(|(_, file)| file.bytes).sum()
    }

    /// Every (table, file), in manifest order.
    pub fn files(&self) -> impl Iterator<Item = (&str, &ManifestFile)> {
        self.tables.iter().flat_map(|table| {
            table
                .files
                .iter()
                .map(move |file| (table.name.as_str(), file))
        })
    }

    /// Checks that every file sits where its content says and that tables
    /// are sorted and distinct, so a manifest can name nothing outside the
    /// product's data folder and has one fingerprint.
    ///
    /// # Errors
    /// The first [`ManifestError`].
    pub fn check(&self) -> Result<(), ManifestError> {
        for pair in self.tables.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(ManifestError::Order(pair[1].name.clone()));
            }
        }
        for (table, file) in self.files() {
            let hex = file.sha256.len() == 64
                && file
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let named =
                table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !table.is_empty();
            if !hex || !named || file.path != Self::file_path(table, &file.sha256) {
                return Err(ManifestError::Path {
                    table: table.to_owned(),
                    path: file.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The version's fingerprint: lowercase hex of the RFC 9162 Merkle tree
    /// root over [`Self::leaf`] of every file, in manifest order.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let leaves: Vec<merkle::Hash> = self
            .files()
            .map(|(table, file)| merkle::leaf_hash(&Self::leaf(table, file)))
            .collect();
        hex::encode(merkle::root_of(&leaves))
    }

    /// A file's leaf: `table`, path, SHA-256, bytes and rows, a line each.
    #[must_use]
    pub fn leaf(table: &str, file: &ManifestFile) -> Vec<u8> {
        format!(
            "{table}\n{}\n{}\n{}\n{}\n",
            file.path, file.sha256, file.bytes, file.rows
        )
        .into_bytes()
    }

    /// This manifest with `table`'s files replaced by `files`, or extended
    /// by them when `append`; tables stay sorted.
    #[must_use]
    pub fn with_files(&self, table: &str, files: Vec<ManifestFile>, append: bool) -> Self {
        let mut next = self.clone();
        match next.tables.iter_mut().find(|t| t.name == table) {
            Some(existing) if append => {
                for file in files {
                    // The same content twice would be read twice.
                    if !existing.files.iter().any(|f| f.sha256 == file.sha256) {
                        existing.files.push(file);
                    }
                }
            }
            Some(existing) => existing.files = files,
            None => next.tables.push(ManifestTable {
                name: table.to_owned(),
                files,
            }),
        }
        next.tables.sort_by(|a, b| a.name.cmp(&b.name));
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(table: &str, fill: char, rows: u64) -> ManifestFile {
        let sha256: String = std::iter::repeat_n(fill, 64).collect();
        ManifestFile {
            path: Manifest::file_path(table, &sha256),
            sha256,
            bytes: rows * 10,
            rows,
        }
    }

    #[test]
    fn appending_keeps_old_files_and_changes_the_fingerprint() {
        let first = Manifest::default().with_files("people", vec![file("people", 'a', 5)], false);
        let second = first.with_files("people", vec![file("people", 'b', 3)], true);
        assert_eq!(second.table("people").unwrap().files.len(), 2);
        assert_eq!(second.rows(), 8);
        assert_ne!(first.fingerprint(), second.fingerprint());
        // The same file appended again is not read twice.
        assert_eq!(
            second.with_files("people", vec![file("people", 'b', 3)], true),
            second
        );
        let replaced = second.with_files("people", vec![file("people", 'c', 1)], false);
        assert_eq!(replaced.rows(), 1);
        let two_tables = replaced.with_files("addresses", vec![file("addresses", 'd', 2)], false);
        assert_eq!(two_tables.tables[0].name, "addresses");
        two_tables.check().unwrap();
    }

    #[test]
    fn the_fingerprint_is_the_merkle_root_of_the_file_leaves() {
        let manifest = Manifest::default()
            .with_files("a", vec![file("a", '1', 1), file("a", '2', 2)], false)
            .with_files("b", vec![file("b", '3', 3)], false);
        let leaves: Vec<_> = manifest
            .files()
            .map(|(t, f)| merkle::leaf_hash(&Manifest::leaf(t, f)))
            .collect();
        let expected = merkle::node_hash(&merkle::node_hash(&leaves[0], &leaves[1]), &leaves[2]);
        assert_eq!(manifest.fingerprint(), hex::encode(expected));
        assert_eq!(
            Manifest::default().fingerprint(),
            hex::encode(merkle::empty_root())
        );
    }

    #[test]
    fn paths_outside_the_data_folder_are_refused() {
        let mut escaping = file("people", 'a', 1);
        escaping.path = "../other/data/people/x.parquet".into();
        let mut upper = file("people", 'a', 1);
        upper.sha256 = upper.sha256.to_uppercase();
        upper.path = Manifest::file_path("people", &upper.sha256);
        for bad in [escaping, upper] {
            let manifest = Manifest {
                tables: vec![ManifestTable {
                    name: "people".into(),
                    files: vec![bad],
                }],
            };
            assert!(matches!(manifest.check(), Err(ManifestError::Path { .. })));
        }
        let traversal = Manifest {
            tables: vec![ManifestTable {
                name: "..".into(),
                files: vec![file("..", 'a', 1)],
            }],
        };
        assert!(matches!(traversal.check(), Err(ManifestError::Path { .. })));
        let twice = Manifest {
            tables: vec![
                ManifestTable {
                    name: "a".into(),
                    files: vec![],
                },
                ManifestTable {
                    name: "a".into(),
                    files: vec![],
                },
            ],
        };
        assert_eq!(twice.check(), Err(ManifestError::Order("a".into())));
        let sha: String = std::iter::repeat_n('a', 64).collect();
        assert!(Manifest::is_file_path(&Manifest::file_path("people", &sha)));
        for not_a_file in [
            format!("data/people/{sha}.parquet/x"),
            format!("data/../{sha}.parquet"),
            format!("people/{sha}.parquet"),
            "data/people/residents.parquet".to_owned(),
            "residents.parquet".to_owned(),
        ] {
            assert!(!Manifest::is_file_path(&not_a_file), "{not_a_file}");
        }
    }
}
