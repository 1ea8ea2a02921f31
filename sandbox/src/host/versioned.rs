//! A product version's tables: each table is the files its manifest lists,
//! read one after another, and nothing else in the product's folder. Every
//! file is checked against the manifest's length and SHA-256 before a run
//! reads it (hashed whole the first time, then trusted while the file is
//! the one that was hashed), so the version a query's audit entry names is
//! the data that answered it, even if someone with access to the store
//! swapped a file behind the marketplace's back.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use arrow_schema::SchemaRef;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use sha2::{Digest as _, Sha256};
use tokio::runtime::Handle;

use super::data::{FooterCache, Identity, LocalDirectory, SHARE_ROWS, TableScan, TableStore, open};
use super::objects::{ListError, ObjectTables};
use crate::manifest::Manifest;

struct VersionTable {
    name: String,
    /// Serves the table's files, each as a table named by its SHA-256.
    files: Arc<dyn TableStore>,
    hashes: Vec<String>,
    rows: u64,
}

/// The tables of one version of a product.
pub struct VersionTables {
    tables: Vec<VersionTable>,
}

impl std::fmt::Debug for VersionTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tables.iter().map(|table| &table.name))
            .finish()
    }
}

impl VersionTables {
    /// The tables of `manifest` in the product folder `folder` on a local
    /// disk, every file checked.
    ///
    /// # Errors
    /// A manifest naming paths outside its data folder, or a file missing,
    /// linked, or not the one listed.
    pub fn local(
        folder: &Path,
        manifest: &Manifest,
        footers: &Arc<FooterCache>,
    ) -> Result<Self, String> {
        manifest.check().map_err(|error| error.to_string())?;
        let mut tables = Vec::with_capacity(manifest.tables.len());
        for table in &manifest.tables {
            let dir = folder.join(crate::manifest::DATA_FOLDER).join(&table.name);
            for file in &table.files {
                verify_local(&folder.join(&file.path), &file.sha256, file.bytes, footers)?;
            }
            let hashes: Vec<String> = table.files.iter().map(|f| f.sha256.clone()).collect();
            // Each file is named by its hash, and read only through a handle
            // checked against it.
            let files = LocalDirectory::new(dir, hashes.clone())
                .with_footer_cache(Arc::clone(footers))
                .with_expected_hashes(hashes.iter().map(|h| (h.clone(), h.clone())).collect());
            tables.push(VersionTable {
                name: table.name.clone(),
                files: Arc::new(files),
                hashes,
                rows: table.files.iter().map(|f| f.rows).sum(),
            });
        }
        Ok(Self { tables })
    }

    /// The tables of `manifest` in the product folder `folder` of `store`,
    /// every object checked.
    ///
    /// # Errors
    /// As [`Self::local`]; [`ListError::Store`] when the store does not
    /// answer.
    pub async fn objects(
        store: Arc<dyn ObjectStore>,
        runtime: Handle,
        folder: &ObjectPath,
        manifest: &Manifest,
        footers: &Arc<FooterCache>,
    ) -> Result<Self, ListError> {
        manifest
            .check()
            .map_err(|error| ListError::Store(error.to_string()))?;
        let mut tables = Vec::with_capacity(manifest.tables.len());
        for table in &manifest.tables {
            let dir = folder
                .clone()
                .join(crate::manifest::DATA_FOLDER)
                .join(table.name.as_str());
            let hashes: Vec<String> = table.files.iter().map(|f| f.sha256.clone()).collect();
            let files = ObjectTables::list(Arc::clone(&store), runtime.clone(), &dir)
                .await?
                .only(&hashes, &dir)?
                .with_footer_cache(Arc::clone(footers));
            let checked = files.clone();
            let listed = table.files.clone();
            tokio::task::spawn_blocking(move || {
                listed
                    .iter()
                    .try_for_each(|file| checked.verify(&file.sha256, &file.sha256, file.bytes))
            })
            .await
            .map_err(|error| ListError::Store(error.to_string()))?
            .map_err(ListError::Store)?;
            tables.push(VersionTable {
                name: table.name.clone(),
                files: Arc::new(files),
                hashes,
                rows: table.files.iter().map(|f| f.rows).sum(),
            });
        }
        Ok(Self { tables })
    }

    fn table(&self, name: &str) -> Result<&VersionTable, String> {
        self.tables
            .iter()
            .find(|table| table.name == name)
            .ok_or_else(|| format!("no table {name}"))
    }

    /// The units a table's scan splits into: (file, share, shares of that
    /// file), in file order.
    fn units(table: &VersionTable) -> Result<Vec<(usize, usize, usize)>, String> {
        let mut units = Vec::new();
        for (index, hash) in table.hashes.iter().enumerate() {
            let shares = table.files.parts(hash)?.max(1);
            units.extend((0..shares).map(|share| (index, share, shares)));
        }
        Ok(units)
    }
}

/// Checks a local file against the length and hash a manifest lists.
fn verify_local(
    path: &Path,
    sha256: &str,
    bytes: u64,
    footers: &FooterCache,
) -> Result<(), String> {
    let mut file = open(path)?;
    let identity = Identity::of(&file, path)?;
    let length = file
        .metadata()
        .map_err(|error| format!("{}: {error}", path.display()))?
        .len();
    if length != bytes {
        return Err(format!(
            "{}: holds {length} bytes where the version lists {bytes}",
            path.display()
        ));
    }
    let key = path.to_string_lossy();
    if footers.was_verified(&key, &identity, sha256) {
        return Ok(());
    }
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if hex::encode(hasher.finalize()) != sha256 {
        return Err(format!(
            "{}: its content is not the one the version lists",
            path.display()
        ));
    }
    footers.mark_verified(&key, identity, sha256);
    Ok(())
}

impl TableStore for VersionTables {
    fn tables(&self) -> Vec<String> {
        self.tables.iter().map(|table| table.name.clone()).collect()
    }

    /// The files' common schema: files of one table that differ are an
    /// error, never a silent mix.
    fn schema(&self, table: &str) -> Result<SchemaRef, String> {
        let stored = self.table(table)?;
        let mut schemas = stored.hashes.iter().map(|hash| stored.files.schema(hash));
        let first = schemas
            .next()
            .ok_or_else(|| format!("table {table} has no file in this version"))??;
        for (index, schema) in schemas.enumerate() {
            if schema?.fields() != first.fields() {
                return Err(format!(
                    "file {} of table {table} has another schema than its first",
                    stored.hashes[index + 1]
                ));
            }
        }
        Ok(first)
    }

    fn scan(&self, table: &str, columns: &[usize]) -> Result<TableScan, String> {
        let stored = self.table(table)?;
        let files = Arc::clone(&stored.files);
        let columns = columns.to_vec();
        let scans = stored.hashes.clone().into_iter().flat_map(move |hash| {
            match files.scan(&hash, &columns) {
                Ok(scan) => scan,
                Err(error) => Box::new(std::iter::once(Err(error))),
            }
        });
        Ok(Box::new(scans))
    }

    fn modified(&self, table: &str) -> Option<SystemTime> {
        let stored = self.table(table).ok()?;
        stored
            .hashes
            .iter()
            .filter_map(|hash| stored.files.modified(hash))
            .max()
    }

    /// Every file's shares, one after another; a table too small to be
    /// worth a second instance is read whole, as a single file would be.
    fn parts(&self, table: &str) -> Result<usize, String> {
        let stored = self.table(table)?;
        if stored.rows < 2 * SHARE_ROWS.div_ceil(16) {
            return Ok(1);
        }
        Ok(Self::units(stored)?.len())
    }

    /// Share `part` of `parts`: when `parts` is fewer than the units (the
    /// sandbox caps the shares of a run), each share is a run of whole
    /// units, so every row is still read exactly once.
    fn scan_part(
        &self,
        table: &str,
        columns: &[usize],
        part: usize,
        parts: usize,
    ) -> Result<TableScan, String> {
        if parts <= 1 {
            return self.scan(table, columns);
        }
        let stored = self.table(table)?;
        let units = Self::units(stored)?;
        let (from, to) = (part * units.len() / parts, (part + 1) * units.len() / parts);
        let files = Arc::clone(&stored.files);
        let hashes = stored.hashes.clone();
        let columns = columns.to_vec();
        let scans =
            units
                .into_iter()
                .skip(from)
                .take(to - from)
                .flat_map(move |(file, share, shares)| {
                    match files.scan_part(&hashes[file], &columns, share, shares) {
                        Ok(scan) => scan,
                        Err(error) => Box::new(std::iter::once(Err(error))),
                    }
                });
        Ok(Box::new(scans))
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray as _;
    use arrow_array::types::Int64Type;
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;
    use crate::manifest::ManifestFile;

    /// Writes a file of `values` (in row groups of `group` rows) where a
    /// version stores it, and lists it.
    fn stored(
        folder: &Path,
        table: &str,
        values: std::ops::Range<i64>,
        group: usize,
    ) -> ManifestFile {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(values.clone()))],
        )
        .unwrap();
        let mut bytes = Vec::new();
        let properties = WriterProperties::builder()
            .set_max_row_group_row_count(Some(group))
            .build();
        let mut writer = ArrowWriter::try_new(&mut bytes, schema, Some(properties)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let path = Manifest::file_path(table, &sha256);
        std::fs::create_dir_all(folder.join(crate::manifest::DATA_FOLDER).join(table)).unwrap();
        std::fs::write(folder.join(&path), &bytes).unwrap();
        ManifestFile {
            path,
            sha256,
            bytes: bytes.len() as u64,
            rows: values.count() as u64,
        }
    }

    fn values(scan: TableScan) -> Vec<i64> {
        scan.flat_map(|batch| {
            batch
                .unwrap()
                .column(0)
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
    }

    #[test]
    fn a_table_is_its_listed_files_in_order_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let first = stored(dir.path(), "counts", 0..3, 1024);
        let second = stored(dir.path(), "counts", 10..12, 1024);
        // In the folder, but not in this version.
        stored(dir.path(), "counts", 100..200, 1024);
        let manifest = Manifest::default().with_files("counts", vec![first, second], false);
        let footers = Arc::new(FooterCache::new());
        let tables = VersionTables::local(dir.path(), &manifest, &footers).unwrap();
        assert_eq!(tables.tables(), vec!["counts".to_owned()]);
        assert_eq!(
            values(tables.scan("counts", &[0]).unwrap()),
            vec![0, 1, 2, 10, 11]
        );
        assert_eq!(tables.parts("counts").unwrap(), 1);
    }

    #[test]
    fn a_swapped_or_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let listed = stored(dir.path(), "counts", 0..3, 1024);
        let other = stored(dir.path(), "counts", 5..8, 1024);
        let manifest = Manifest::default().with_files("counts", vec![listed.clone()], false);
        let footers = Arc::new(FooterCache::new());
        VersionTables::local(dir.path(), &manifest, &footers).unwrap();
        // Someone with the store's keys puts other rows under the listed
        // name: same length (same shape of file), other content.
        let path = dir.path().join(&listed.path);
        let mut forged = std::fs::read(dir.path().join(&other.path)).unwrap();
        forged.resize(listed.bytes as usize, 0);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &forged).unwrap();
        let error = VersionTables::local(dir.path(), &manifest, &footers).unwrap_err();
        assert!(
            error.ends_with("its content is not the one the version lists"),
            "{error}"
        );
        std::fs::write(&path, &forged[..10]).unwrap();
        let error = VersionTables::local(dir.path(), &manifest, &footers).unwrap_err();
        assert!(
            error.contains(&format!(
                "holds 10 bytes where the version lists {}",
                listed.bytes
            )),
            "{error}"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(VersionTables::local(dir.path(), &manifest, &footers).is_err());
    }

    #[test]
    fn a_file_rewritten_in_place_with_its_old_times_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let listed = stored(dir.path(), "counts", 0..3, 1024);
        let other = stored(dir.path(), "counts", 5..8, 1024);
        let manifest = Manifest::default().with_files("counts", vec![listed.clone()], false);
        let footers = Arc::new(FooterCache::new());
        VersionTables::local(dir.path(), &manifest, &footers).unwrap();
        let path = dir.path().join(&listed.path);
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut forged = std::fs::read(dir.path().join(&other.path)).unwrap();
        forged.resize(listed.bytes as usize, 0);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &file, &forged).unwrap();
        file.set_modified(modified).unwrap();
        drop(file);
        let error = VersionTables::local(dir.path(), &manifest, &footers).unwrap_err();
        assert!(
            error.ends_with("its content is not the one the version lists"),
            "{error}"
        );
    }

    #[test]
    fn a_file_renamed_over_one_already_checked_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let listed = stored(dir.path(), "counts", 0..3, 1024);
        let manifest = Manifest::default().with_files("counts", vec![listed.clone()], false);
        let footers = Arc::new(FooterCache::new());
        // Checked when the run opened the version...
        let tables = VersionTables::local(dir.path(), &manifest, &footers).unwrap();
        // ...and swapped before the scan opens it again.
        let path = dir.path().join(&listed.path);
        let forged = stored(dir.path(), "other", 50..53, 1024);
        std::fs::rename(dir.path().join(&forged.path), &path).unwrap();
        let error = match tables.scan("counts", &[0]) {
            Err(error) => error,
            Ok(scan) => scan
                .collect::<Result<Vec<_>, _>>()
                .expect_err("the swapped file is refused"),
        };
        assert!(
            error.ends_with("its content is not the one the version lists"),
            "{error}"
        );
    }

    #[test]
    fn shares_cover_every_row_once_even_when_capped() {
        let dir = tempfile::tempdir().unwrap();
        let rows = SHARE_ROWS as i64 / 4;
        let files: Vec<ManifestFile> = (0..5)
            .map(|k| {
                stored(
                    dir.path(),
                    "big",
                    k * rows..(k + 1) * rows,
                    rows as usize / 2,
                )
            })
            .collect();
        let manifest = Manifest::default().with_files("big", files, false);
        let tables =
            VersionTables::local(dir.path(), &manifest, &Arc::new(FooterCache::new())).unwrap();
        let parts = tables.parts("big").unwrap();
        assert!(parts >= 5, "{parts}");
        for asked in [parts, 3, 2] {
            let mut seen: Vec<i64> = (0..asked)
                .flat_map(|part| values(tables.scan_part("big", &[0], part, asked).unwrap()))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..5 * rows).collect::<Vec<_>>(), "{asked} shares");
        }
    }
}
