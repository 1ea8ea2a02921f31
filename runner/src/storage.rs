//! Where this data center's products are: a directory on the runner's disk
//! (the embedded default, or a mounted volume), or a prefix in the data
//! center's own object store. Either way a product's registered location
//! is resolved inside it, never outside.

use std::path::PathBuf;
use std::sync::Arc;

use civicgrid_sandbox::location::{self, LocationError};
use civicgrid_sandbox::manifest::Manifest;
use civicgrid_sandbox::object_store::aws::AmazonS3Builder;
use civicgrid_sandbox::object_store::path::Path as ObjectPath;
use civicgrid_sandbox::object_store::{self, ObjectStore, ObjectStoreExt as _};
use civicgrid_sandbox::{FooterCache, LocalDirectory, ObjectTables, TableStore, VersionTables};
use tokio::runtime::Handle;

/// A data center's product storage.
#[derive(Clone)]
pub enum ProductStore {
    /// Products' folders in a directory.
    Directory(PathBuf),
    /// Products' folders under `root` in an object store.
    Objects {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// The prefix every product's folder is under.
        root: ObjectPath,
        /// The runtime that sends the store's requests.
        runtime: Handle,
    },
}

impl std::fmt::Debug for ProductStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory(dir) => write!(f, "directory {}", dir.display()),
            Self::Objects { store, root, .. } => write!(f, "{store} under {root:?}"),
        }
    }
}

impl From<PathBuf> for ProductStore {
    fn from(dir: PathBuf) -> Self {
        Self::Directory(dir)
    }
}

/// Why a product's tables could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The location is not one this store serves.
    #[error(transparent)]
    Location(#[from] LocationError),
    /// The store did not answer.
    #[error("the data center's store did not answer: {0}")]
    Store(String),
    /// A version's file is missing or is not the one the version lists.
    #[error("{0}")]
    Version(String),
}

/// Why a store's address was refused.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// Not `s3://BUCKET[/PREFIX]`.
    #[error("{0}: name the store as s3://BUCKET or s3://BUCKET/PREFIX")]
    NotS3(String),
    /// The client could not be built from it and the environment.
    #[error(transparent)]
    Client(#[from] object_store::Error),
}

impl ProductStore {
    /// The S3-compatible store at `address` (`s3://BUCKET[/PREFIX]`), with
    /// credentials, region and endpoint from the environment, as every S3
    /// tool reads them (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`). Its requests go out
    /// on `runtime`.
    ///
    /// # Errors
    /// An address that is not `s3://…`, or a client that cannot be built.
    pub fn s3(address: &str, runtime: Handle) -> Result<Self, AddressError> {
        Self::s3_with(AmazonS3Builder::from_env(), address, runtime)
    }

    /// As [`Self::s3`], from `builder` (its credentials and endpoint) rather
    /// than the environment.
    ///
    /// # Errors
    /// As [`Self::s3`].
    pub fn s3_with(
        builder: AmazonS3Builder,
        address: &str,
        runtime: Handle,
    ) -> Result<Self, AddressError> {
        let refused = || AddressError::NotS3(address.to_owned());
        let rest = address.strip_prefix("s3://").ok_or_else(refused)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(refused());
        }
        // The prefix is the operator's, not a provider's: a location can
        // still only name folders under it.
        let root = ObjectPath::parse(prefix).map_err(|_| refused())?;
        // A run's reads block its slot, and the sandbox's wall-time limit
        // cannot interrupt a read in flight: a store that stalls fails the
        // read within about a minute (30 s a request, retries within 30 s)
        // instead of object_store's three minutes of retries.
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: std::time::Duration::from_secs(30),
            ..object_store::RetryConfig::default()
        };
        let store = builder.with_bucket_name(bucket).with_retry(retry).build()?;
        Ok(Self::Objects {
            store: Arc::new(store),
            root,
            runtime,
        })
    }

    /// Refuses a location this store would not serve, without asking the
    /// store: one outside it, or (in a directory) missing or reached
    /// through a link.
    ///
    /// # Errors
    /// The location's [`LocationError`].
    pub fn check(&self, location: &str) -> Result<(), LocationError> {
        match self {
            Self::Directory(dir) => location::resolve(dir, location).map(drop),
            Self::Objects { root, .. } => {
                civicgrid_sandbox::object_folder(root, location).map(drop)
            }
        }
    }

    /// Refuses a location that could never be a folder of this store, whether
    /// or not it exists yet (an upload makes it).
    ///
    /// # Errors
    /// The location's [`LocationError`].
    pub fn check_name(&self, location: &str) -> Result<(), LocationError> {
        location::check(location)
    }

    /// The tables of the product at `location`, as they are now, with
    /// Parquet footers kept in `footers`.
    ///
    /// # Errors
    /// A location refused or missing, or a store that does not answer.
    pub async fn tables(
        &self,
        location: &str,
        footers: &Arc<FooterCache>,
    ) -> Result<Arc<dyn TableStore>, StorageError> {
        match self {
            Self::Directory(dir) => {
                let folder = location::resolve(dir, location)?;
                let tables = LocalDirectory::discover(&folder).map_err(StorageError::Store)?;
                Ok(Arc::new(tables.with_footer_cache(Arc::clone(footers))))
            }
            Self::Objects {
                store,
                root,
                runtime,
            } => {
                let folder = civicgrid_sandbox::object_folder(root, location)?;
                let tables = ObjectTables::list(Arc::clone(store), runtime.clone(), &folder)
                    .await
                    .map_err(|error| match error {
                        // The provider's location, not the store's key
                        // (which names the operator's prefix).
                        civicgrid_sandbox::ListError::Missing(_) => {
                            StorageError::Location(LocationError::Missing(location.to_owned()))
                        }
                        civicgrid_sandbox::ListError::Store(why) => StorageError::Store(why),
                    })?
                    .with_footer_cache(Arc::clone(footers));
                Ok(Arc::new(tables))
            }
        }
    }
}

impl ProductStore {
    /// The tables of version `manifest` of the product at `location`:
    /// exactly its files, each checked against its length and hash.
    ///
    /// # Errors
    /// A location refused, a file missing or not the one listed
    /// ([`StorageError::Version`]), or a store that does not answer.
    pub async fn version(
        &self,
        location: &str,
        manifest: &Manifest,
        footers: &Arc<FooterCache>,
    ) -> Result<Arc<dyn TableStore>, StorageError> {
        match self {
            Self::Directory(dir) => {
                let folder = location::resolve(dir, location)?;
                let (manifest, footers) = (manifest.clone(), Arc::clone(footers));
                let tables = tokio::task::spawn_blocking(move || {
                    VersionTables::local(&folder, &manifest, &footers)
                })
                .await
                .map_err(|error| StorageError::Store(error.to_string()))?
                .map_err(StorageError::Version)?;
                Ok(Arc::new(tables))
            }
            Self::Objects {
                store,
                root,
                runtime,
            } => {
                let folder = civicgrid_sandbox::object_folder(root, location)?;
                let tables = VersionTables::objects(
                    Arc::clone(store),
                    runtime.clone(),
                    &folder,
                    manifest,
                    footers,
                )
                .await
                .map_err(|error| match error {
                    civicgrid_sandbox::ListError::Missing(what) => {
                        StorageError::Version(format!("{what}: missing from the store"))
                    }
                    civicgrid_sandbox::ListError::Store(why) => StorageError::Version(why),
                })?;
                Ok(Arc::new(tables))
            }
        }
    }

    /// Stores the canonical file `file` (in the staging directory) as
    /// `table`'s file with content `sha256` in the product at `location`,
    /// creating the product's folder if it has none yet. Storing the same
    /// content twice is a no-op: the path is the content's.
    ///
    /// # Errors
    /// A location refused, or a store that fails.
    pub async fn put_file(
        &self,
        location: &str,
        table: &str,
        sha256: &str,
        file: &std::path::Path,
    ) -> Result<String, StorageError> {
        let relative = Manifest::file_path(table, sha256);
        match self {
            Self::Directory(dir) => {
                location::check(location)?;
                let (dir, location, relative_path, file, sha256) = (
                    dir.clone(),
                    location.to_owned(),
                    relative.clone(),
                    file.to_owned(),
                    sha256.to_owned(),
                );
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(dir.join(&location))
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    let folder = location::resolve(&dir, &location)?;
                    let target = folder.join(&relative_path);
                    let parent = target.parent().unwrap_or(&folder).to_owned();
                    std::fs::create_dir_all(&parent)
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    // The folders under the product's were just made by us,
                    // but someone with the disk could have linked one away.
                    location::resolve(
                        &folder,
                        &parent
                            .strip_prefix(&folder)
                            .unwrap_or(&parent)
                            .to_string_lossy(),
                    )?;
                    std::fs::File::open(&file)
                        .and_then(|f| f.sync_all())
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    if std::fs::rename(&file, &target).is_err() {
                        // Another file system: copy beside the target, then
                        // rename, so no half file ever has the content's name.
                        let partial = parent.join(format!(".{sha256}.partial"));
                        std::fs::copy(&file, &partial)
                            .and_then(|_| std::fs::File::open(&partial)?.sync_all())
                            .and_then(|()| std::fs::rename(&partial, &target))
                            .map_err(|error| StorageError::Store(error.to_string()))?;
                        let _ = std::fs::remove_file(&file);
                    }
                    std::fs::File::open(&parent)
                        .and_then(|d| d.sync_all())
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    Ok::<_, StorageError>(())
                })
                .await
                .map_err(|error| StorageError::Store(error.to_string()))??;
            }
            Self::Objects { store, root, .. } => {
                let folder = civicgrid_sandbox::object_folder(root, location)?;
                let path = relative
                    .split('/')
                    .fold(folder, |path, part| path.join(part));
                put_object(store.as_ref(), &path, file)
                    .await
                    .map_err(|error| StorageError::Store(error.to_string()))?;
                let _ = tokio::fs::remove_file(file).await;
            }
        }
        Ok(relative)
    }

    /// Copies table `table`'s file as the product's folder holds it
    /// (`<table>.parquet`) to `into`, to be made part of a first version;
    /// `false` when the folder (or the file) is not there.
    ///
    /// # Errors
    /// A location refused, a file reached through a link, or a store that
    /// fails.
    pub async fn fetch_table(
        &self,
        location: &str,
        table: &str,
        into: &std::path::Path,
    ) -> Result<bool, StorageError> {
        let name = format!("{table}.parquet");
        match self {
            Self::Directory(dir) => {
                let folder = match location::resolve(dir, location) {
                    Ok(folder) => folder,
                    Err(LocationError::Missing(_)) => return Ok(false),
                    Err(other) => return Err(other.into()),
                };
                let source = folder.join(&name);
                if !source.exists() && std::fs::symlink_metadata(&source).is_err() {
                    if folder.join(format!("{table}.arrow")).exists() {
                        return Err(arrow_not_carried());
                    }
                    return Ok(false);
                }
                let into = into.to_owned();
                tokio::task::spawn_blocking(move || {
                    // Not through a link, as a query would not read one.
                    // The runner's paths are its own: the provider is told
                    // which table, not where it lives.
                    let mut from = civicgrid_sandbox::open_plain_file(&source).map_err(|_| {
                        StorageError::Version(
                            "its file is reached through a link or cannot be opened".into(),
                        )
                    })?;
                    let mut to = std::fs::File::create(&into)
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    std::io::copy(&mut from, &mut to)
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    Ok::<_, StorageError>(true)
                })
                .await
                .map_err(|error| StorageError::Store(error.to_string()))?
            }
            Self::Objects { store, root, .. } => {
                let path = civicgrid_sandbox::object_folder(root, location)?.join(name.as_str());
                let got = match store.get(&path).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => {
                        let arrow = civicgrid_sandbox::object_folder(root, location)?
                            .join(format!("{table}.arrow").as_str());
                        return match store.head(&arrow).await {
                            Ok(_) => Err(arrow_not_carried()),
                            Err(object_store::Error::NotFound { .. }) => Ok(false),
                            Err(other) => Err(StorageError::Store(other.to_string())),
                        };
                    }
                    Err(other) => return Err(StorageError::Store(other.to_string())),
                };
                write_whole(got, into).await?;
                Ok(true)
            }
        }
    }
}

impl ProductStore {
    /// Deletes the version files `paths` (each `data/<table>/<sha256>.parquet`)
    /// of the product at `location`; one already gone is no error.
    ///
    /// # Errors
    /// A location refused, a path that is not a version's file
    /// ([`StorageError::Version`]), or a store that fails.
    pub async fn remove(&self, location: &str, paths: &[String]) -> Result<(), StorageError> {
        if let Some(path) = paths.iter().find(|path| !Manifest::is_file_path(path)) {
            return Err(StorageError::Version(format!(
                "{path} is not a data version's file"
            )));
        }
        match self {
            Self::Directory(dir) => {
                let folder = match location::resolve(dir, location) {
                    Ok(folder) => folder,
                    Err(LocationError::Missing(_)) => return Ok(()),
                    Err(other) => return Err(other.into()),
                };
                for path in paths {
                    match std::fs::remove_file(folder.join(path)) {
                        Ok(()) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => return Err(StorageError::Store(error.to_string())),
                    }
                }
                Ok(())
            }
            Self::Objects { store, root, .. } => {
                let folder = civicgrid_sandbox::object_folder(root, location)?;
                for path in paths {
                    let object = path.split('/').fold(folder.clone(), |p, part| p.join(part));
                    match store.delete(&object).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(error) => return Err(StorageError::Store(error.to_string())),
                    }
                }
                Ok(())
            }
        }
    }
}

/// The folder, inside a product's location, a refresh picks new files up
/// from: `incoming/<product>/<table>/<name>.csv` or `.parquet`.
pub const INCOMING_FOLDER: &str = "incoming";

/// A file waiting in a product's refresh folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The declared table it holds rows of.
    pub table: String,
    /// Its name in `incoming/<product>/<table>/`.
    pub name: String,
    /// Its length.
    pub bytes: u64,
}

/// A product's refresh folder for `table`, relative to its location:
/// `incoming/<product>/<table>`, so products of one provider sharing a
/// folder never take each other's files.
#[must_use]
pub fn incoming_path(product_id: &str, table: &str) -> String {
    format!("{INCOMING_FOLDER}/{product_id}/{table}")
}

/// Whether `name` is a file a refresh takes: a plain name ending in `.csv`
/// or `.parquet`.
#[must_use]
pub fn is_incoming_name(name: &str) -> bool {
    let plain = !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    plain && (name.ends_with(".csv") || name.ends_with(".parquet"))
}

impl ProductStore {
    /// The files waiting in `incoming/<product>/<table>/` of the product at
    /// `location`, for each of `tables`, oldest name first.
    ///
    /// # Errors
    /// A location refused, or a store that fails.
    pub async fn list_incoming(
        &self,
        location: &str,
        product_id: &str,
        tables: &[String],
    ) -> Result<Vec<Incoming>, StorageError> {
        let mut found = Vec::new();
        match self {
            Self::Directory(dir) => {
                let folder = match location::resolve(dir, location) {
                    Ok(folder) => folder,
                    Err(LocationError::Missing(_)) => return Ok(found),
                    Err(other) => return Err(other.into()),
                };
                for table in tables {
                    // Reached through no link: a provider who can write its
                    // folder could otherwise point it at anyone's files.
                    let Ok(incoming) =
                        location::resolve(&folder, &incoming_path(product_id, table))
                    else {
                        continue;
                    };
                    let Ok(entries) = std::fs::read_dir(incoming) else {
                        continue;
                    };
                    for entry in entries.flatten() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        let metadata = entry.metadata();
                        if is_incoming_name(&name)
                            && let Ok(metadata) = metadata
                            && metadata.is_file()
                        {
                            found.push(Incoming {
                                table: table.clone(),
                                name,
                                bytes: metadata.len(),
                            });
                        }
                    }
                }
            }
            Self::Objects { store, root, .. } => {
                let folder = civicgrid_sandbox::object_folder(root, location)?;
                for table in tables {
                    let prefix = folder
                        .clone()
                        .join(INCOMING_FOLDER)
                        .join(product_id)
                        .join(table.as_str());
                    let listed = store
                        .list_with_delimiter(Some(&prefix))
                        .await
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    for object in listed.objects {
                        let Some(name) = object.location.filename().map(str::to_owned) else {
                            continue;
                        };
                        if is_incoming_name(&name) {
                            found.push(Incoming {
                                table: table.clone(),
                                name,
                                bytes: object.size,
                            });
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| (&a.table, &a.name).cmp(&(&b.table, &b.name)));
        Ok(found)
    }

    /// Moves the waiting file `incoming` to `into` (a staging path): `false`
    /// when it is gone (another server took it first).
    ///
    /// # Errors
    /// A location or name refused, or a store that fails.
    pub async fn take_incoming(
        &self,
        location: &str,
        product_id: &str,
        incoming: &Incoming,
        into: &std::path::Path,
    ) -> Result<bool, StorageError> {
        let table_named = !incoming.table.is_empty()
            && incoming
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_incoming_name(&incoming.name) || !table_named {
            return Err(StorageError::Version(format!(
                "{}/{} is not a refresh file",
                incoming.table, incoming.name
            )));
        }
        match self {
            Self::Directory(dir) => {
                let folder = location::resolve(dir, location)?;
                let source =
                    location::resolve(&folder, &incoming_path(product_id, &incoming.table))?
                        .join(&incoming.name);
                let into = into.to_owned();
                let claimed = format!(".{}.taking", incoming.name);
                tokio::task::spawn_blocking(move || {
                    // Taken by renaming it away first: of two servers, one
                    // gets it (a dot name is never listed).
                    let taken = source.with_file_name(claimed);
                    if std::fs::rename(&source, &taken).is_err() {
                        return Ok(false);
                    }
                    let mut from = civicgrid_sandbox::open_plain_file(&taken).map_err(|_| {
                        StorageError::Version("the refresh file is reached through a link".into())
                    })?;
                    let mut to = std::fs::File::create(&into)
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    std::io::copy(&mut from, &mut to)
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    to.sync_all()
                        .map_err(|error| StorageError::Store(error.to_string()))?;
                    let _ = std::fs::remove_file(&taken);
                    Ok(true)
                })
                .await
                .map_err(|error| StorageError::Store(error.to_string()))?
            }
            Self::Objects { store, root, .. } => {
                let path = civicgrid_sandbox::object_folder(root, location)?
                    .join(INCOMING_FOLDER)
                    .join(product_id)
                    .join(incoming.table.as_str())
                    .join(incoming.name.as_str());
                let got = match store.get(&path).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => return Ok(false),
                    Err(other) => return Err(StorageError::Store(other.to_string())),
                };
                write_whole(got, into).await?;
                match store.delete(&path).await {
                    Ok(()) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(other) => Err(StorageError::Store(other.to_string())),
                }
            }
        }
    }
}

/// Writes the object `got` to the local file `into`, synced, without
/// holding it in memory.
async fn write_whole(
    got: object_store::GetResult,
    into: &std::path::Path,
) -> Result<(), StorageError> {
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let failed = |error: &dyn std::fmt::Display| StorageError::Store(error.to_string());
    let mut stream = got.into_stream();
    let mut to = tokio::fs::File::create(into)
        .await
        .map_err(|e| failed(&e))?;
    while let Some(chunk) = stream.next().await {
        to.write_all(&chunk.map_err(|e| failed(&e))?)
            .await
            .map_err(|e| failed(&e))?;
    }
    to.sync_all().await.map_err(|e| failed(&e))
}

/// A folder table in Arrow IPC cannot be carried into a first version
/// (versions hold Parquet): left out, consumers would lose it unannounced.
fn arrow_not_carried() -> StorageError {
    StorageError::Version("it is stored as Arrow IPC, which a version does not carry over".into())
}

/// Uploads `file` to `path` in parts, so a file of gigabytes never sits in
/// memory; the object appears whole when the upload completes, or not at all.
async fn put_object(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    file: &std::path::Path,
) -> Result<(), object_store::Error> {
    use tokio::io::AsyncReadExt as _;
    let upload = store.put_multipart(path).await?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut source =
        tokio::fs::File::open(file)
            .await
            .map_err(|error| object_store::Error::Generic {
                store: "staging",
                source: Box::new(error),
            })?;
    let mut buffer = vec![0u8; PART_BYTES];
    loop {
        let read =
            source
                .read(&mut buffer)
                .await
                .map_err(|error| object_store::Error::Generic {
                    store: "staging",
                    source: Box::new(error),
                })?;
        if read == 0 {
            break;
        }
        writer.wait_for_capacity(4).await?;
        writer.write(&buffer[..read]);
    }
    writer.finish().await?;
    Ok(())
}

/// Parts of a multipart upload: S3's minimum is 5 MiB.
const PART_BYTES: usize = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn store_addresses_name_a_bucket() {
        let builder = || {
            AmazonS3Builder::new()
                .with_region("city-1")
                .with_access_key_id("key")
                .with_secret_access_key("secret")
        };
        match ProductStore::s3_with(builder(), "s3://edge-1/city/products", Handle::current())
            .unwrap()
        {
            ProductStore::Objects { root, .. } => assert_eq!(root.as_ref(), "city/products"),
            ProductStore::Directory(_) => panic!("a directory"),
        }
        for refused in [
            "edge-1/products",
            "s3://",
            "s3:///products",
            "file:///srv/data",
        ] {
            assert!(
                matches!(
                    ProductStore::s3_with(builder(), refused, Handle::current()),
                    Err(AddressError::NotS3(_))
                ),
                "{refused}"
            );
        }
    }
}
