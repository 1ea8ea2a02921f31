//! Refresh on a schedule: a product's provider (or its ETL) drops files in
//! the product's refresh folder, `incoming/<product>/<table>/` in its data center's
//! store, and every `spec.refresh_minutes` each one is taken and appended
//! as a new version, with every check an upload gets: typed by the declared
//! table, the change rule, the provider's quality minimums. A refused file
//! is gone from the folder and its upload says why (`ListUploads`).

use civicgrid_runner::ProductStore;
use civicgrid_runner::storage::Incoming;
use civicgrid_sandbox::ingest::Format;

use crate::error::{MarketError, Result};
use crate::identity::Principal;
use crate::queries::remote::RunnerChoice;
use crate::registry::{self, Product, ProductState};
use crate::versions::{self, Upload, UploadState};

use super::Marketplace;

/// Who a refresh's versions are by, in the audit log.
pub const REFRESH_ACTOR: &str = "system:refresh";

/// Most files one product's refresh takes in one sweep.
const FILES_PER_SWEEP: usize = 20;

/// Most uploads listed at once.
const MAX_UPLOADS_LISTED: i64 = 200;

impl Marketplace {
    /// Takes and commits the files waiting in the refresh folders of the
    /// products due as of `now_ms`; returns how many versions it published.
    ///
    /// # Errors
    /// Database failures; a store or runner that does not answer is logged
    /// and tried again next time.
    pub async fn sweep_refresh(&self, now_ms: i64) -> Result<usize> {
        let mut connection = self.store.acquire().await?;
        let ids = versions::product_ids(&mut connection).await?;
        let mut due = Vec::new();
        for id in ids {
            let product = registry::get(&mut connection, &id).await?;
            let every = product.spec.refresh_minutes.saturating_mul(60_000);
            if every <= 0 || product.state == ProductState::Retired {
                continue;
            }
            let mut refreshed = self
                .refreshed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let last = refreshed.get(&id).copied().unwrap_or(i64::MIN);
            if last.saturating_add(every) <= now_ms {
                refreshed.insert(id, now_ms);
                due.push(product);
            }
        }
        drop(connection);
        let mut published = 0;
        for product in due {
            match self.refresh(&product).await {
                Ok(count) => published += count,
                Err(error) => {
                    tracing::warn!(product = %product.id, %error, "a refresh did not run");
                }
            }
        }
        Ok(published)
    }

    /// One product's refresh: every file waiting, oldest name first.
    async fn refresh(&self, product: &Product) -> Result<usize> {
        let tables: Vec<String> = product.spec.tables.iter().map(|t| t.name.clone()).collect();
        let location = product.spec.storage_location.clone();
        // Versions stay in the data center that holds them.
        let data_center = match self.newest_version(product).await? {
            Some(version) => version.data_center,
            None => product
                .spec
                .hosting_data_centers
                .first()
                .cloned()
                .unwrap_or_default(),
        };
        let (choice, waiting) = match self.runners.get() {
            Some(runners) => {
                let (choice, files) = runners
                    .list_incoming(data_center, product.id.clone(), location.clone(), tables)
                    .await?;
                (Some(choice), files)
            }
            None => {
                let store = ProductStore::Directory(self.data_dir().to_owned());
                let files = store
                    .list_incoming(&location, &product.id, &tables)
                    .await
                    .map_err(|error| MarketError::Unavailable(error.to_string()))?;
                (None, files)
            }
        };
        let mut published = 0;
        // A folder of thousands of files is taken over several sweeps, and
        // one file that fails does not hold the others up.
        for incoming in waiting.iter().take(FILES_PER_SWEEP) {
            let size = i64::try_from(incoming.bytes).unwrap_or(i64::MAX);
            if !(1..=versions::MAX_UPLOAD_BYTES).contains(&size) {
                tracing::warn!(product = %product.id, file = %incoming.name, bytes = incoming.bytes, "a refresh file is empty or too large; left where it is");
                continue;
            }
            match self.refresh_one(product, choice.as_ref(), incoming).await {
                Ok(true) => published += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(product = %product.id, file = %incoming.name, %error, "a refresh file was not taken");
                }
            }
        }
        Ok(published)
    }

    /// Takes one waiting file and commits it; whether it made a version.
    async fn refresh_one(
        &self,
        product: &Product,
        choice: Option<&RunnerChoice>,
        incoming: &Incoming,
    ) -> Result<bool> {
        let upload_id = versions::new_upload_id();
        let location = product.spec.storage_location.clone();
        let taken = match (choice, self.runners.get()) {
            (Some(choice), Some(runners)) => {
                runners
                    .take_incoming(
                        choice.clone(),
                        upload_id.clone(),
                        product.id.clone(),
                        location,
                        incoming.clone(),
                    )
                    .await?
            }
            _ => {
                let store = ProductStore::Directory(self.data_dir().to_owned());
                let staging = civicgrid_runner::staging::Staging::new(
                    self.data_dir()
                        .join(civicgrid_runner::service::DIRECTORY_STAGING),
                );
                civicgrid_runner::uploads::take_incoming(
                    &store,
                    &staging,
                    &upload_id,
                    (&location, &product.id),
                    incoming,
                )
                .await
                .map_err(|error| MarketError::Unavailable(error.to_string()))?
            }
        };
        let Some((bytes, sha256)) = taken else {
            return Ok(false);
        };
        let format = if incoming.name.ends_with(".csv") {
            Format::Csv
        } else {
            Format::Parquet
        };
        let now = crate::store::now_ms();
        let size = i64::try_from(bytes).unwrap_or(i64::MAX);
        let upload = Upload {
            id: upload_id,
            product_id: product.id.clone(),
            organization_id: product.provider_organization_id.clone(),
            table: incoming.table.clone(),
            format: match format {
                Format::Csv => "csv".into(),
                Format::Parquet => "parquet".into(),
            },
            append: true,
            for_revision: false,
            size_bytes: size,
            sha256,
            received_bytes: size,
            data_center: choice.map(|c| c.data_center.clone()).unwrap_or_default(),
            endpoint: choice.map(|c| c.endpoint.clone()).unwrap_or_default(),
            state: UploadState::Receiving,
            message: format!("refresh of incoming/{}/{}", incoming.table, incoming.name),
            data_version: 0,
            created_by: REFRESH_ACTOR.into(),
            created_at_unix_ms: now,
            updated_at_unix_ms: now,
        };
        let mut connection = self.store.acquire().await?;
        versions::insert_upload(&mut connection, &upload).await?;
        drop(connection);
        let id = upload.id.clone();
        match self.commit_checked(REFRESH_ACTOR, upload).await {
            Ok(_) => Ok(true),
            // The file is out of the folder now: whatever stopped it, its
            // upload says why, for its provider, and counts no longer.
            Err(error) => {
                tracing::info!(product = %product.id, file = %incoming.name, %error, "a refresh file was refused");
                let mut connection = self.store.acquire().await?;
                let read = versions::get_upload(&mut connection, &id).await?;
                if read.state == UploadState::Receiving {
                    let mut refused = read.clone();
                    refused.state = UploadState::Refused;
                    refused.message = match &error {
                        MarketError::FailedPrecondition(why) => why.clone(),
                        other => format!("not published: {other}"),
                    };
                    refused.updated_at_unix_ms =
                        crate::store::now_ms().max(read.updated_at_unix_ms + 1);
                    versions::update_upload(&mut connection, &refused, &read).await?;
                }
                Ok(false)
            }
        }
    }

    /// A product's uploads, newest first, with why any was refused: its
    /// provider's only (`product:upload`).
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub async fn uploads(&self, principal: &Principal, product_id: &str) -> Result<Vec<Upload>> {
        self.uploadable_product(principal, product_id).await?;
        let mut connection = self.store.acquire().await?;
        versions::list_uploads(&mut connection, product_id, MAX_UPLOADS_LISTED).await
    }
}
