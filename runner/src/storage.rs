//! Where this data center's products are: a directory on the runner's disk
//! (the embedded default, or a mounted volume), or a prefix in the data
//! center's own object store. Either way a product's registered location
//! is resolved inside it, never outside.

use std::path::PathBuf;
use std::sync::Arc;

use civicgrid_sandbox::location::{self, LocationError};
use civicgrid_sandbox::object_store::aws::AmazonS3Builder;
use civicgrid_sandbox::object_store::path::Path as ObjectPath;
use civicgrid_sandbox::object_store::{self, ObjectStore};
use civicgrid_sandbox::{FooterCache, LocalDirectory, ObjectTables, TableStore};
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
