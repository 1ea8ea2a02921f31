//! Withdrawing data versions, by their provider or when the product's
//! retention runs out, and deleting the files no readable version lists
//! ([`crate::versions`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{MarketError, Result};
use crate::identity::Principal;
use crate::registry::{self, Product};
use crate::versions;

use super::Marketplace;

const DAY_MS: i64 = 86_400_000;

/// How long a withdrawn version's files stay before they are deleted: an
/// upload of the same content stored just before the withdrawal has this
/// long to be published (its version then keeps the file).
pub const DELETION_GRACE_MS: i64 = 3_600_000;

impl Marketplace {
    /// Withdraws a version of a product's data (`product:upload` on its
    /// provider): it can no longer be read at once, and its files no other
    /// readable version lists are deleted from the data center's store by
    /// the next retention sweep after [`DELETION_GRACE_MS`]. To anyone but
    /// the provider the product is not there.
    ///
    /// # Errors
    /// `NotFound`, `PermissionDenied`, `FailedPrecondition` for the newest
    /// version, `InvalidArgument` naming `reason`.
    pub async fn withdraw_data_version(
        &self,
        principal: &Principal,
        product_id: &str,
        version: i64,
        reason: &str,
    ) -> Result<versions::DataVersion> {
        let product = self.uploadable_product(principal, product_id).await?;
        let mut transaction = self.store.begin().await?;
        // Read again in the transaction: a version published meanwhile
        // changes which one is the newest.
        let product = Product {
            data_version: registry::get(&mut transaction, &product.id)
                .await?
                .data_version,
            ..product
        };
        versions::withdraw(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &product,
            version,
            reason,
        )
        .await?;
        transaction.commit().await?;

        let mut connection = self.store.acquire().await?;
        versions::get_version(&mut connection, product_id, version).await
    }

    /// Withdraws every version superseded longer ago than its product's
    /// retention allows, as of `now_ms`, then deletes the files of every
    /// withdrawn version that no readable version lists. Returns how many
    /// versions it withdrew.
    ///
    /// # Errors
    /// Database failures; a store that does not answer is logged and tried
    /// again next time.
    pub async fn sweep_data_retention(&self, now_ms: i64) -> Result<usize> {
        let mut connection = self.store.acquire().await?;
        let superseded = versions::superseded_readable(&mut connection).await?;
        let mut products: HashMap<String, Product> = HashMap::new();
        for (product_id, _, _) in &superseded {
            if !products.contains_key(product_id) {
                let product = registry::get(&mut connection, product_id).await?;
                products.insert(product_id.clone(), product);
            }
        }
        drop(connection);
        let mut withdrawn = 0;
        for (product_id, version, superseded_at) in superseded {
            let product = &products[&product_id];
            let days = product.spec.version_retention_days;
            if days <= 0 || superseded_at.saturating_add(days.saturating_mul(DAY_MS)) > now_ms {
                continue;
            }
            let mut transaction = self.store.begin().await?;
            let result = versions::withdraw(
                &mut transaction,
                self.store.backend(),
                "system",
                product,
                version,
                &format!("retention: superseded more than {days} days ago"),
            )
            .await;
            match result {
                Ok(_) => {
                    transaction.commit().await?;
                    withdrawn += 1;
                }
                // Withdrawn by its provider meanwhile.
                Err(MarketError::FailedPrecondition(_)) => transaction.rollback().await?,
                Err(other) => return Err(other),
            }
        }
        let mut connection = self.store.acquire().await?;
        let pending = versions::with_files_to_delete(&mut connection).await?;
        drop(connection);
        for product_id in pending {
            let product = match products.get(&product_id) {
                Some(product) => product.clone(),
                None => {
                    let mut connection = self.store.acquire().await?;
                    registry::get(&mut connection, &product_id).await?
                }
            };
            if let Err(error) = self.delete_withdrawn_files(&product, now_ms).await {
                tracing::warn!(product = %product_id, %error, "withdrawn files not deleted yet");
            }
        }
        Ok(withdrawn)
    }

    /// Files in `product`'s folder that a readable version lists: of this
    /// product, or of any other of its provider's products pointing at the
    /// same folder (content-addressed paths are shared between them).
    async fn files_in_use(&self, product: &Product) -> Result<HashSet<String>> {
        use prost::Message as _;
        let mut connection = self.store.acquire().await?;
        let mut sharing = Vec::new();
        for (id, spec) in crate::store::products::provider_specs(
            &mut connection,
            &product.provider_organization_id,
        )
        .await?
        {
            let spec = crate::spec::ProductSpec::decode(spec.as_slice()).unwrap_or_default();
            if id == product.id || spec.storage_location == product.spec.storage_location {
                sharing.push(id);
            }
        }
        let mut kept = HashSet::new();
        for id in sharing {
            for version in versions::all_versions(&mut connection, &id).await? {
                if version.withdrawn_at_unix_ms == 0 {
                    kept.extend(version.manifest.files().map(|(_, file)| file.path.clone()));
                }
            }
        }
        Ok(kept)
    }

    /// Deletes `paths` of `product`'s folder in `data_center`'s store, but
    /// those a readable version lists.
    pub(super) async fn delete_unused(
        &self,
        product: &Product,
        data_center: &str,
        paths: Vec<String>,
    ) -> Result<Vec<String>> {
        let kept = self.files_in_use(product).await?;
        let paths: Vec<String> = paths.into_iter().filter(|p| !kept.contains(p)).collect();
        if paths.is_empty() {
            return Ok(paths);
        }
        match self.runners.get() {
            Some(runners) => {
                runners
                    .remove(
                        data_center.to_owned(),
                        product.id.clone(),
                        product.spec.storage_location.clone(),
                        paths.clone(),
                    )
                    .await?;
            }
            None => {
                let store = civicgrid_runner::ProductStore::Directory(self.data_dir().to_owned());
                store
                    .remove(&product.spec.storage_location, &paths)
                    .await
                    .map_err(|error| MarketError::Unavailable(error.to_string()))?;
            }
        }
        Ok(paths)
    }

    /// Deletes the files of `product`'s versions withdrawn at least
    /// [`DELETION_GRACE_MS`] ago that no readable version lists, where they
    /// are stored, and audits it. The grace lets an upload of the same
    /// content that was stored before the withdrawal be published.
    async fn delete_withdrawn_files(&self, product: &Product, now_ms: i64) -> Result<()> {
        let mut connection = self.store.acquire().await?;
        let all = versions::all_versions(&mut connection, &product.id).await?;
        drop(connection);
        for version in all.iter().filter(|v| {
            v.withdrawn_at_unix_ms > 0
                && v.files_deleted_at_unix_ms == 0
                && v.withdrawn_at_unix_ms + DELETION_GRACE_MS <= now_ms
        }) {
            let paths: Vec<String> = version
                .manifest
                .files()
                .map(|(_, file)| file.path.clone())
                .collect();
            let deleted = self
                .delete_unused(product, &version.data_center, paths)
                .await?;
            let mut transaction = self.store.begin().await?;
            crate::store::lock_audit_head(&mut transaction).await?;
            versions::files_deleted(&mut transaction, &product.id, version.version, now_ms).await?;
            crate::audit::log::append(
                &mut transaction,
                self.store.backend(),
                &[crate::audit::log::Event {
                    kind: "product.data_files_deleted".into(),
                    actor: "system".into(),
                    tenant: product.provider_organization_id.clone(),
                    subject: product.id.clone(),
                    details: serde_json::json!({
                        "data_version": version.version,
                        "data_center": version.data_center,
                        "deleted": deleted,
                    }),
                }],
            )
            .await?;
            transaction.commit().await?;
        }
        Ok(())
    }

    /// Looks at refresh folders every minute (each product as often as its
    /// `refresh_minutes` says) and sweeps retention every `retention_every`,
    /// until the process ends.
    pub fn spawn_data_upkeep(
        self: &Arc<Self>,
        retention_every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let market = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(60).min(retention_every));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut retention_due = tokio::time::Instant::now();
            loop {
                ticks.tick().await;
                match market.sweep_refresh(crate::store::now_ms()).await {
                    Ok(0) => {}
                    Ok(published) => tracing::info!(published, "refreshed data versions published"),
                    Err(error) => tracing::warn!(%error, "the refresh sweep failed"),
                }
                if tokio::time::Instant::now() < retention_due {
                    continue;
                }
                retention_due = tokio::time::Instant::now() + retention_every;
                match market.sweep_data_retention(crate::store::now_ms()).await {
                    Ok(0) => {}
                    Ok(withdrawn) => {
                        tracing::info!(withdrawn, "data versions past their retention withdrawn");
                    }
                    Err(error) => tracing::warn!(%error, "the retention sweep failed"),
                }
            }
        })
    }
}
