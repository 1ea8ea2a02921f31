//! Providers' uploads and the data versions they make
//! ([`crate::versions`]). The bytes go where the product's data lives: a
//! runner in a data center hosting the product stages, checks, converts
//! and stores them, or, in the embedded default, this server's own data
//! directory. The marketplace keeps only the upload's progress and the
//! versions' manifests.

use std::sync::Arc;

use civicgrid_runner::ProductStore;
use civicgrid_runner::staging::Staging;
use civicgrid_runner::uploads::{ChangeGuard, IngestJob, IngestOutcome};
use civicgrid_sandbox::ingest::Format;
use civicgrid_sandbox::manifest::Manifest;
use sha2::{Digest as _, Sha256};

use crate::error::{MarketError, Result};
use crate::identity::Principal;
use crate::queries::remote::{IngestRequest, RunnerChoice};
use crate::registry::{self, Product};
use crate::spec::QualityMetrics;
use crate::versions::{self, DataVersion, NewUpload, Upload, UploadState};

use super::Marketplace;

/// Where the embedded default stages uploads, in its data directory (see
/// [`civicgrid_runner::service::DIRECTORY_STAGING`]).
fn local_staging(data_dir: &std::path::Path) -> Staging {
    Staging::new(data_dir.join(civicgrid_runner::service::DIRECTORY_STAGING))
}

fn upload_not_found(id: &str) -> MarketError {
    MarketError::NotFound {
        what: "upload",
        id: id.to_owned(),
    }
}

/// The runner staging `upload`: the one it started on while it is
/// registered, else another of the same data center (a version's files
/// never leave the data center that holds them).
fn stager(runners: &dyn crate::queries::remote::Runners, upload: &Upload) -> Result<RunnerChoice> {
    let pinned = RunnerChoice {
        data_center: upload.data_center.clone(),
        endpoint: upload.endpoint.clone(),
    };
    if runners.registered(&pinned) {
        return Ok(pinned);
    }
    runners
        .pick(std::slice::from_ref(&upload.data_center))
        .ok_or_else(|| {
            MarketError::Unavailable(format!(
                "no runner is ready in {} to take upload {}; retry later",
                upload.data_center, upload.id
            ))
        })
}

/// Tries at publishing a version before giving up to concurrent uploads.
const PUBLISH_ATTEMPTS: usize = 3;

impl Marketplace {
    /// Starts an upload of one table's rows (`product:upload` on the
    /// product's provider). The staging runner is chosen now, and every
    /// chunk goes to it.
    ///
    /// # Errors
    /// `PermissionDenied`, `NotFound`, `InvalidArgument` naming the field,
    /// `Unavailable` when no runner of the product's data centers is ready.
    pub async fn begin_upload(&self, principal: &Principal, request: NewUpload) -> Result<Upload> {
        let product = self
            .uploadable_product(principal, &request.product_id)
            .await?;
        versions::check(&product, &request)?;
        let (data_center, endpoint) = match self.runners.get() {
            Some(runners) => {
                // A product's versions stay in the store that holds its
                // first: a version never spans two data centers' stores.
                let stored_in = self
                    .newest_version(&product)
                    .await?
                    .map(|version| vec![version.data_center])
                    .filter(|dc| !dc[0].is_empty());
                let hosts = stored_in
                    .as_ref()
                    .unwrap_or(&product.spec.hosting_data_centers);
                let choice = runners.pick(hosts).ok_or_else(|| {
                    MarketError::Unavailable(format!(
                        "no runner is ready in {} to take product {}'s data; retry later",
                        hosts.join(" or "),
                        product.id
                    ))
                })?;
                (choice.data_center, choice.endpoint)
            }
            None => (String::new(), String::new()),
        };
        let now = crate::store::now_ms();
        let upload = Upload {
            id: versions::new_upload_id(),
            product_id: product.id.clone(),
            organization_id: product.provider_organization_id.clone(),
            table: request.table,
            format: request.format,
            append: request.append,
            for_revision: request.for_revision,
            size_bytes: request.size_bytes,
            sha256: request.sha256,
            received_bytes: 0,
            data_center,
            endpoint,
            state: UploadState::Receiving,
            message: String::new(),
            data_version: 0,
            created_by: principal.user.id.clone(),
            created_at_unix_ms: now,
            updated_at_unix_ms: now,
        };
        let mut connection = self.store.acquire().await?;
        let receiving = versions::count_receiving(
            &mut connection,
            &upload.organization_id,
            now - versions::ABANDONED_AFTER_MS,
        )
        .await?;
        if receiving >= versions::MAX_RECEIVING_PER_PROVIDER {
            return Err(MarketError::ResourceExhausted(format!(
                "{} has {receiving} uploads unfinished; finish or abandon some first",
                upload.organization_id
            )));
        }
        versions::insert_upload(&mut connection, &upload).await?;
        Ok(upload)
    }

    /// An upload, to its provider (to resume it, or see why it was
    /// refused); to anyone else it does not exist.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub async fn upload(&self, principal: &Principal, upload_id: &str) -> Result<Upload> {
        let mut connection = self.store.acquire().await?;
        let upload = versions::get_upload(&mut connection, upload_id)
            .await
            .map_err(|_| upload_not_found(upload_id))?;
        drop(connection);
        self.own_upload(principal, upload).await
    }

    async fn own_upload(&self, principal: &Principal, upload: Upload) -> Result<Upload> {
        if upload.organization_id != principal.organization.id {
            return Err(upload_not_found(&upload.id));
        }
        self.require(principal, &upload.organization_id, "product:upload")
            .await?;
        Ok(upload)
    }

    /// Writes `data` at `offset` of the upload. `sha256` is the chunk's own
    /// hash, checked before it is passed on. A chunk that does not start
    /// where the upload stands is refused, naming where to resume.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `InvalidArgument` naming the field,
    /// `FailedPrecondition` (resume elsewhere, or the upload has ended),
    /// `Unavailable` when the staging runner is gone.
    pub async fn put_upload_chunk(
        &self,
        principal: &Principal,
        upload_id: &str,
        offset: i64,
        data: Vec<u8>,
        sha256: &str,
    ) -> Result<Upload> {
        let upload = self.upload(principal, upload_id).await?;
        if upload.state != UploadState::Receiving {
            return Err(MarketError::FailedPrecondition(format!(
                "upload {upload_id} is {}; start another",
                upload.state.name()
            )));
        }
        if data.is_empty() || data.len() > versions::MAX_CHUNK_BYTES {
            return Err(MarketError::invalid(
                "data",
                format!("1 to {} bytes a chunk", versions::MAX_CHUNK_BYTES),
            ));
        }
        if hex::encode(Sha256::digest(&data)) != sha256 {
            return Err(MarketError::invalid(
                "sha256",
                "the chunk's bytes do not hash to it; it was damaged on the way, send it again",
            ));
        }
        if offset != upload.received_bytes {
            return Err(MarketError::FailedPrecondition(format!(
                "upload {upload_id} has {} bytes; resume from offset {}",
                upload.received_bytes, upload.received_bytes
            )));
        }
        let end = offset.saturating_add(i64::try_from(data.len()).unwrap_or(i64::MAX));
        if end > upload.size_bytes {
            return Err(MarketError::invalid(
                "data",
                format!(
                    "the chunk ends at byte {end}, past the {} bytes declared",
                    upload.size_bytes
                ),
            ));
        }
        let offset_bytes = u64::try_from(offset).unwrap_or_default();
        let mut endpoint = upload.endpoint.clone();
        let staged = match self.runners.get() {
            Some(runners) => {
                let choice = stager(runners.as_ref(), &upload)?;
                endpoint.clone_from(&choice.endpoint);
                runners
                    .stage(choice, upload.id.clone(), offset_bytes, data)
                    .await?
            }
            None => {
                let staging = local_staging(self.data_dir());
                let id = upload.id.clone();
                tokio::task::spawn_blocking(move || staging.stage(&id, offset_bytes, &data))
                    .await
                    .map_err(|error| MarketError::Corrupt(format!("staging task: {error}")))?
                    .map_err(|error| {
                        tracing::error!(%error, "staging an upload failed");
                        MarketError::Unavailable(
                            "this server could not stage the chunk; send it again".into(),
                        )
                    })?
            }
        };
        let staged = i64::try_from(staged).unwrap_or(i64::MAX);
        let mut next = upload.clone();
        // The stager's length is the truth: after a runner restarted with
        // an empty staging directory the upload resumes from what it has.
        next.received_bytes = staged.min(end);
        next.endpoint = endpoint;
        next.updated_at_unix_ms = crate::store::now_ms().max(upload.updated_at_unix_ms + 1);
        let mut connection = self.store.acquire().await?;
        versions::update_upload(&mut connection, &next, &upload).await?;
        if staged != end {
            return Err(MarketError::FailedPrecondition(format!(
                "upload {upload_id} has {staged} bytes where it is staged; resume from offset {staged}"
            )));
        }
        Ok(next)
    }

    /// Ends an upload with every byte received: checks, converts and stores
    /// it, measures the new version and publishes it. A refused upload
    /// (its hash, a value that is not of its column's type) says why, and
    /// leaves the product's data as it was. Committing an upload already
    /// ingested answers with the version it made.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `FailedPrecondition` naming what was
    /// refused, `Unavailable`, `Aborted` when other uploads kept winning.
    pub async fn commit_upload(
        &self,
        principal: &Principal,
        upload_id: &str,
    ) -> Result<(Upload, DataVersion)> {
        let upload = self.upload(principal, upload_id).await?;
        match upload.state {
            UploadState::Ingested => {
                let mut connection = self.store.acquire().await?;
                let version =
                    versions::get_version(&mut connection, &upload.product_id, upload.data_version)
                        .await?;
                return Ok((upload, version));
            }
            UploadState::Refused => {
                return Err(MarketError::FailedPrecondition(format!(
                    "upload {upload_id} was refused: {}",
                    upload.message
                )));
            }
            UploadState::Receiving => {}
        }
        if upload.received_bytes != upload.size_bytes {
            return Err(MarketError::FailedPrecondition(format!(
                "upload {upload_id} has {} of its {} bytes; resume from offset {}",
                upload.received_bytes, upload.size_bytes, upload.received_bytes
            )));
        }
        self.uploadable_product(principal, &upload.product_id)
            .await?;
        self.commit_checked(&principal.user.id, upload).await
    }

    /// The product `upload` is for, still its uploader's and not retired.
    async fn owned_product(&self, upload: &Upload) -> Result<Product> {
        let mut connection = self.store.acquire().await?;
        let product = registry::get(&mut connection, &upload.product_id).await?;
        if product.provider_organization_id != upload.organization_id {
            return Err(MarketError::NotFound {
                what: "product",
                id: upload.product_id.clone(),
            });
        }
        if product.state == crate::registry::ProductState::Retired {
            return Err(MarketError::FailedPrecondition(format!(
                "product {} is retired; it takes no new data",
                product.id
            )));
        }
        Ok(product)
    }

    /// Commits `upload` (every byte received, its uploader authorized) for
    /// `actor`.
    pub(super) async fn commit_checked(
        &self,
        actor: &str,
        upload: Upload,
    ) -> Result<(Upload, DataVersion)> {
        let upload_id = upload.id.clone();
        let upload_id = upload_id.as_str();
        let product = self.owned_product(&upload).await?;
        let spec = versions::typed_by(&product, upload.for_revision)?.clone();
        let table = versions::declared_table(&product, &spec, &upload.table)?;
        let format = Format::parse(&upload.format)
            .ok_or_else(|| MarketError::Corrupt(format!("upload format {:?}", upload.format)))?;
        let base = self.base_for(&product, &upload).await?;
        // A product with no version yet carries its folder's other tables
        // into its first one.
        // The uploaded table's own folder file too: an append carries its
        // rows over, and a replacement is compared with it.
        let adopt = if base.is_none() {
            crate::quality::declared(&product.spec.tables)
        } else {
            Vec::new()
        };
        // Data for a revision that changes this table's columns is not
        // compared row by row with the old (the revision's review is the
        // check); for a table the revision leaves as it is, it is compared
        // with the version consumers read now.
        let declared_alike = product.spec.tables.iter().find(|t| t.name == upload.table)
            == spec.tables.iter().find(|t| t.name == upload.table);
        let compared = if upload.for_revision {
            self.newest_version(&product).await?
        } else {
            base.clone()
        };
        let guard = spec
            .output_policy
            .as_ref()
            .filter(|_| !upload.for_revision || declared_alike)
            .filter(|policy| {
                policy.min_aggregation_count > 0 && !policy.privacy_unit_column.is_empty()
            })
            .map(|policy| ChangeGuard {
                unit_column: policy.privacy_unit_column.clone(),
                min_units: u64::try_from(policy.min_aggregation_count).unwrap_or(u64::MAX),
                append: upload.append,
                previous: compared
                    .as_ref()
                    .and_then(|base| base.manifest.table(&upload.table))
                    .map(|table| table.files.clone())
                    .unwrap_or_default(),
            });
        let guarded = guard.is_some();
        let job = IngestJob {
            upload_id: upload.id.clone(),
            location: product.spec.storage_location.clone(),
            table,
            format,
            sha256: upload.sha256.clone(),
            bytes: u64::try_from(upload.size_bytes).unwrap_or_default(),
            adopt,
            guard,
        };
        let outcome = self.ingest(&upload, &product, job).await?;
        let (file, adopted) = match outcome {
            IngestOutcome::Ingested {
                upload: file,
                adopted,
            } => (file, adopted),
            IngestOutcome::Refused(why) => return self.refuse(&upload, &why).await,
            IngestOutcome::InProgress => {
                return Err(MarketError::Aborted(format!(
                    "upload {upload_id} is being committed already; ask for it shortly"
                )));
            }
        };
        let mut product = product;
        let mut base = base;
        // What the runner compared a replacement with: a version published
        // since makes that comparison stale.
        let compared_with = base.as_ref().map_or(0, |base| base.version);
        let stored: Vec<String> = std::iter::once(file.path.clone())
            .chain(adopted.iter().map(|(_, file)| file.path.clone()))
            .collect();
        for _ in 0..PUBLISH_ATTEMPTS {
            if guarded
                && !upload.append
                && base.as_ref().map_or(0, |base| base.version) != compared_with
            {
                self.forget_stored(&product, &upload, stored).await;
                return self
                    .refuse(
                        &upload,
                        "another version was published while this replacement was compared with the one before it; upload it again",
                    )
                    .await;
            }
            let mut manifest = base
                .as_ref()
                .map_or_else(Manifest::default, |base| base.manifest.clone());
            // The folder's tables start a first version only: once another
            // upload has published one, it carries them already, and laying
            // them over it again would undo that upload.
            if base.is_none() {
                for (table, adopted) in &adopted {
                    // A replaced table's folder rows were only compared with.
                    if *table == upload.table && !upload.append {
                        continue;
                    }
                    manifest = manifest.with_files(table, vec![adopted.clone()], false);
                }
            }
            manifest = manifest.with_files(&upload.table, vec![file.clone()], upload.append);
            if let Some(base) = base
                .as_ref()
                .filter(|base| base.data_center != upload.data_center)
            {
                let why = format!(
                    "product {}'s data is stored in {:?}, not where upload {upload_id} was staged; upload it again",
                    product.id, base.data_center
                );
                self.forget_stored(&product, &upload, stored).await;
                return self.refuse(&upload, &why).await;
            }
            let quality = self
                .measure_version(&product, &spec, &manifest, &upload.data_center)
                .await?;
            if let Some(minimums) = &spec.quality_minimums
                && let Some(why) = versions::below_minimums(&quality, minimums)
            {
                self.forget_stored(&product, &upload, stored).await;
                return self.refuse(&upload, &why).await;
            }
            let base_version = base.as_ref().map_or(0, |base| base.version);
            let mut transaction = self.store.begin().await?;
            let published = versions::publish(
                &mut transaction,
                self.store.backend(),
                actor,
                &product,
                base_version,
                manifest,
                quality,
                &upload,
            )
            .await;
            match published {
                Ok(version) => {
                    transaction.commit().await?;
                    let mut connection = self.store.acquire().await?;
                    let upload = versions::get_upload(&mut connection, upload_id).await?;
                    return Ok((upload, version));
                }
                Err(MarketError::Aborted(_)) => {
                    transaction.rollback().await?;
                    // A concurrent commit of this same upload settled it.
                    let mut connection = self.store.acquire().await?;
                    let now = versions::get_upload(&mut connection, upload_id).await?;
                    drop(connection);
                    if now.state != UploadState::Receiving {
                        return self.refuse(&now, &now.message).await;
                    }
                    product = self.owned_product(&upload).await?;
                    base = self.base_for(&product, &upload).await?;
                }
                Err(other) => return Err(other),
            }
        }
        Err(MarketError::Aborted(format!(
            "other versions of product {} kept being published; commit upload {upload_id} again",
            upload.product_id
        )))
    }

    /// A product's data versions, newest first, to whoever may see the
    /// product. Which files make each version is shown to its provider,
    /// platform admins and regulators only.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`.
    pub async fn data_versions(
        &self,
        principal: &Principal,
        product_id: &str,
    ) -> Result<Vec<DataVersion>> {
        let product = self.product(principal, product_id).await?;
        let insider = self
            .require(principal, &product.provider_organization_id, "product:read")
            .await
            .is_ok();
        let mut connection = self.store.acquire().await?;
        let mut listed =
            versions::list_versions(&mut connection, product_id, versions::MAX_LISTED).await?;
        // Row and byte counts per version tell how many rows each append
        // added: the provider's to know, not every buyer's.
        // Quality is measured over every declared column, blocked ones too
        // (freshness can be one person's timestamp), and a withdrawal's
        // reason may name whom it protects.
        if !insider {
            listed.retain(|version| !version.candidate);
            for version in &mut listed {
                version.manifest = Manifest::default();
                version.rows = 0;
                version.bytes = 0;
                version.quality = crate::spec::QualityMetrics::default();
                version.withdrawn_reason.clear();
            }
        }
        Ok(listed)
    }

    pub(super) async fn uploadable_product(
        &self,
        principal: &Principal,
        product_id: &str,
    ) -> Result<Product> {
        let mut connection = self.store.acquire().await?;
        let product = registry::get(&mut connection, product_id).await?;
        drop(connection);
        // Another provider's product is not there, as far as uploads go.
        if product.provider_organization_id != principal.organization.id {
            return Err(MarketError::NotFound {
                what: "product",
                id: product_id.to_owned(),
            });
        }
        if product.state == crate::registry::ProductState::Retired {
            return Err(MarketError::FailedPrecondition(format!(
                "product {product_id} is retired; it takes no new data"
            )));
        }
        self.require(
            principal,
            &product.provider_organization_id,
            "product:upload",
        )
        .await?;
        Ok(product)
    }

    /// Deletes what an upload stored and no version will list (it was
    /// refused after it was stored): rows its provider was told are not
    /// published do not stay in the store. Best effort: what a store does
    /// not delete now stays until its folder is cleaned.
    async fn forget_stored(&self, product: &Product, upload: &Upload, paths: Vec<String>) {
        if let Err(error) = self
            .delete_unused(product, &upload.data_center, paths)
            .await
        {
            tracing::warn!(product = %product.id, upload = %upload.id, %error, "a refused upload's files were not deleted");
        }
    }

    /// Records `upload` refused, and says why: unless a concurrent commit of
    /// the same upload won, whose outcome stands.
    async fn refuse(&self, upload: &Upload, why: &str) -> Result<(Upload, DataVersion)> {
        let mut refused = upload.clone();
        refused.state = UploadState::Refused;
        refused.message = why.to_owned();
        refused.updated_at_unix_ms = crate::store::now_ms().max(upload.updated_at_unix_ms + 1);
        let mut connection = self.store.acquire().await?;
        if upload.state != UploadState::Receiving
            || versions::update_upload(&mut connection, &refused, upload)
                .await
                .is_err()
        {
            let now = versions::get_upload(&mut connection, &upload.id).await?;
            if now.state == UploadState::Ingested {
                let version =
                    versions::get_version(&mut connection, &now.product_id, now.data_version)
                        .await?;
                return Ok((now, version));
            }
        }
        Err(MarketError::FailedPrecondition(format!(
            "upload {} was refused: {why}",
            upload.id
        )))
    }

    /// The product's newest version, if it has one.
    pub(super) async fn newest_version(&self, product: &Product) -> Result<Option<DataVersion>> {
        if product.data_version == 0 {
            return Ok(None);
        }
        let mut connection = self.store.acquire().await?;
        Ok(Some(
            versions::verified(&mut connection, &product.id, product.data_version).await?,
        ))
    }

    async fn ingest(
        &self,
        upload: &Upload,
        product: &Product,
        job: IngestJob,
    ) -> Result<IngestOutcome> {
        match self.runners.get() {
            Some(runners) => {
                let choice = stager(runners.as_ref(), upload)?;
                if choice.endpoint != upload.endpoint {
                    // Another runner of the data center took over: it has
                    // the staged bytes if the data center stages on shared
                    // storage, else the upload resumes from what it has.
                    let size = u64::try_from(upload.size_bytes).unwrap_or_default();
                    let staged = runners
                        .stage(choice.clone(), upload.id.clone(), size, Vec::new())
                        .await?;
                    if staged != size {
                        let mut moved = upload.clone();
                        moved.endpoint.clone_from(&choice.endpoint);
                        moved.received_bytes = i64::try_from(staged).unwrap_or_default();
                        moved.updated_at_unix_ms =
                            crate::store::now_ms().max(upload.updated_at_unix_ms + 1);
                        let mut connection = self.store.acquire().await?;
                        versions::update_upload(&mut connection, &moved, upload).await?;
                        return Err(MarketError::FailedPrecondition(format!(
                            "upload {} has {staged} bytes where it is staged now; resume from offset {staged}",
                            upload.id
                        )));
                    }
                }
                runners
                    .ingest(
                        choice,
                        IngestRequest {
                            product_id: product.id.clone(),
                            job,
                        },
                    )
                    .await
            }
            None => {
                let store = ProductStore::Directory(self.data_dir().to_owned());
                civicgrid_runner::uploads::ingest(&store, &local_staging(self.data_dir()), job)
                    .await
                    .map_err(|error| {
                        tracing::error!(%error, product = %product.id, "ingesting an upload failed");
                        match error {
                            civicgrid_runner::storage::StorageError::Location(error) => {
                                MarketError::FailedPrecondition(format!(
                                    "product {}'s storage location: {error}",
                                    product.id
                                ))
                            }
                            _ => MarketError::Unavailable(
                                "this server could not store the upload; commit again".into(),
                            ),
                        }
                    })
            }
        }
    }

    /// What an upload's version is built on: the newest version, or, for
    /// data uploaded for a revision, the data uploaded for it so far (else
    /// the newest version without the tables the revision changes), as of
    /// the newest version's number.
    async fn base_for(&self, product: &Product, upload: &Upload) -> Result<Option<DataVersion>> {
        let mut connection = self.store.acquire().await?;
        let candidate = versions::candidate(&mut connection, &product.id).await?;
        drop(connection);
        let newest = self.newest_version(product).await?;
        if !upload.for_revision {
            if candidate.is_some() {
                return Err(MarketError::FailedPrecondition(format!(
                    "data uploaded for product {}'s revision waits for its review; upload for the revision (--for-revision) or after the decision",
                    product.id
                )));
            }
            return Ok(newest);
        }
        let revised = versions::typed_by(product, true)?;
        let Some(newest) = newest else {
            return Err(MarketError::FailedPrecondition(format!(
                "product {} has no data version yet: its revision is measured against its folder; upload after the decision",
                product.id
            )));
        };
        if let Some(candidate) = candidate.filter(|c| c.version == newest.version + 1) {
            return Ok(Some(DataVersion {
                version: newest.version,
                ..candidate
            }));
        }
        let mut base = newest;
        base.manifest.tables.retain(|table| {
            let before = product.spec.tables.iter().find(|t| t.name == table.name);
            let after = revised.tables.iter().find(|t| t.name == table.name);
            before.is_some() && before == after
        });
        Ok(Some(base))
    }

    /// The quality of `manifest`'s data as `spec` declares it, measured
    /// where it is stored: in `data_center`'s store ("" in the embedded
    /// default).
    pub(super) async fn measure_version(
        &self,
        product: &Product,
        spec: &crate::spec::ProductSpec,
        manifest: &Manifest,
        data_center: &str,
    ) -> Result<QualityMetrics> {
        self.measure_quality_of(
            &product.id,
            spec,
            Some((Arc::new(manifest.clone()), data_center.to_owned())),
        )
        .await
    }
}
