//! Registration use cases: products through their lifecycle and revisions,
//! the catalog and its DCAT-AP export, and the demand list, on the
//! registry's and the demand list's own types.

use crate::demand::{Demand, DemandQuery, NewDemand};
use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind, Principal};
use crate::registry::{self, CatalogFilter, Product, ProductState, RegistrationEvent, Step};
use crate::spec::{ProductSpec, QualityMetrics};

use super::Marketplace;

impl Marketplace {
    /// A product, read in `connection` for a change its provider's
    /// `permission` allows.
    async fn provider_product(
        &self,
        connection: &mut sqlx::AnyConnection,
        principal: &Principal,
        product_id: &str,
        permission: &str,
    ) -> Result<Product> {
        let product = registry::get(connection, product_id).await?;
        self.require(principal, &product.provider_organization_id, permission)
            .await?;
        Ok(product)
    }

    /// Registers a draft product for the caller's organization
    /// (`product:create`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn create_product(
        &self,
        principal: &Principal,
        id: &str,
        spec: Option<ProductSpec>,
    ) -> Result<Product> {
        let provider = principal.organization.id.clone();
        self.require(principal, &provider, "product:create").await?;
        let spec = spec.ok_or_else(|| MarketError::invalid("spec", "is required"))?;
        let mut transaction = self.store.begin().await?;
        let product = registry::create(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &provider,
            id,
            spec,
        )
        .await?;
        transaction.commit().await?;
        Ok(product)
    }

    /// Submits a revision of a product's spec for review (`product:revise`);
    /// the current version keeps serving meanwhile.
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn revise_product(
        &self,
        principal: &Principal,
        product_id: &str,
        spec: Option<ProductSpec>,
        reason: &str,
    ) -> Result<Product> {
        let spec = spec.ok_or_else(|| MarketError::invalid("spec", "is required"))?;
        let mut transaction = self.store.begin().await?;
        self.provider_product(&mut transaction, principal, product_id, "product:revise")
            .await?;
        let product = registry::revise(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            product_id,
            spec,
            reason,
        )
        .await?;
        transaction.commit().await?;
        Ok(product)
    }

    /// Hands a product to another provider organization (`product:transfer`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn transfer_product(
        &self,
        principal: &Principal,
        product_id: &str,
        to_organization_id: &str,
        reason: &str,
    ) -> Result<Product> {
        let mut transaction = self.store.begin().await?;
        self.provider_product(&mut transaction, principal, product_id, "product:transfer")
            .await?;
        let target = identity::find_organization(&mut transaction, to_organization_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: to_organization_id.to_owned(),
            })?;
        if target.kind != OrganizationKind::Provider {
            return Err(MarketError::invalid(
                "to_organization_id",
                format!("{} is not a provider organization", target.id),
            ));
        }
        let product = registry::transfer(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            product_id,
            &target.id,
            reason,
        )
        .await?;
        transaction.commit().await?;
        Ok(product)
    }

    /// A product: published ones for every signed-in user; others, and a
    /// revision under review, only for their provider, platform admins and
    /// regulators (anyone else is told it does not exist).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn product(&self, principal: &Principal, product_id: &str) -> Result<Product> {
        let mut connection = self.store.acquire().await?;
        let mut product = registry::get(&mut connection, product_id).await?;
        // Published products are public to every signed-in user; others, and
        // a revision under review, only to their provider, platform admins
        // and regulators.
        let readable = self
            .require(principal, &product.provider_organization_id, "product:read")
            .await
            .is_ok();
        if !readable {
            if product.state != ProductState::Published {
                return Err(MarketError::NotFound {
                    what: "product",
                    id: product_id.to_owned(),
                });
            }
            product.pending_revision = None;
        }
        Ok(product)
    }

    /// A product's registration events, for whoever may read the product.
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn registration_events(
        &self,
        principal: &Principal,
        product_id: &str,
    ) -> Result<Vec<RegistrationEvent>> {
        let mut connection = self.store.acquire().await?;
        let product = registry::get(&mut connection, product_id).await?;
        if product.state != ProductState::Published {
            self.require(principal, &product.provider_organization_id, "product:read")
                .await
                .map_err(|_| MarketError::NotFound {
                    what: "product",
                    id: product_id.to_owned(),
                })?;
        }
        registry::events(&mut connection, product_id).await
    }

    /// Published products matching every criterion (`catalog:search`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn search_catalog(
        &self,
        principal: &Principal,
        filter: &CatalogFilter,
    ) -> Result<Vec<Product>> {
        self.require(principal, &principal.organization.id, "catalog:search")
            .await?;
        let mut connection = self.store.acquire().await?;
        registry::search(&mut connection, filter).await
    }

    /// The public catalog as a DCAT-AP 3 JSON-LD document, its URIs under
    /// `base_uri` (empty: the log's origin).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn export_catalog(&self, principal: &Principal, base_uri: &str) -> Result<String> {
        self.require(principal, &principal.organization.id, "catalog:search")
            .await?;
        let base_uri = if base_uri.is_empty() {
            format!("https://{}", self.origin())
        } else if base_uri.starts_with("https://") || base_uri.starts_with("http://") {
            base_uri.to_owned()
        } else {
            return Err(MarketError::invalid(
                "base_uri",
                "an http:// or https:// URI",
            ));
        };
        let mut connection = self.store.acquire().await?;
        let products = registry::search(&mut connection, &CatalogFilter::default()).await?;
        let organizations = identity::list_organizations(&mut connection).await?;
        let platform = organizations
            .iter()
            .find(|o| o.kind == OrganizationKind::Platform)
            .map_or_else(|| "CivicGrid".to_owned(), |o| o.display_name.clone());
        let names = organizations
            .into_iter()
            .map(|o| (o.id, o.display_name))
            .collect();
        let open = crate::feedback::open_by_product(&mut connection).await?;
        let document = crate::dcat::catalog(&base_uri, &platform, &products, &names, &open);
        serde_json::to_string_pretty(&document).map_err(|e| MarketError::Corrupt(e.to_string()))
    }

    /// Posts a demand for data (`demand:post`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn post_demand(&self, principal: &Principal, request: NewDemand) -> Result<Demand> {
        let consumer = principal.organization.id.clone();
        self.require(principal, &consumer, "demand:post").await?;
        let mut transaction = self.store.begin().await?;
        let demand = crate::demand::post(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &consumer,
            &request,
        )
        .await?;
        transaction.commit().await?;
        Ok(demand)
    }

    /// Answers a demand with a product of the caller's (`demand:answer`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn answer_demand(
        &self,
        principal: &Principal,
        demand_id: &str,
        product_id: &str,
        message: &str,
    ) -> Result<Demand> {
        let provider = principal.organization.id.clone();
        self.require(principal, &provider, "demand:answer").await?;
        let mut transaction = self.store.begin().await?;
        let demand = crate::demand::answer(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            &provider,
            demand_id,
            product_id,
            message,
        )
        .await?;
        transaction.commit().await?;
        Ok(demand)
    }

    /// Closes a demand (`demand:close`, its consumer).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn close_demand(
        &self,
        principal: &Principal,
        demand_id: &str,
        reason: &str,
    ) -> Result<Demand> {
        let mut transaction = self.store.begin().await?;
        let demand = crate::demand::get(&mut transaction, demand_id).await?;
        self.require(principal, &demand.consumer_organization_id, "demand:close")
            .await?;
        let demand = crate::demand::close(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            demand_id,
            reason,
        )
        .await?;
        transaction.commit().await?;
        Ok(demand)
    }

    /// The demand list (`catalog:search`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn demands(&self, principal: &Principal, query: &DemandQuery) -> Result<Vec<Demand>> {
        self.require(principal, &principal.organization.id, "catalog:search")
            .await?;
        let mut connection = self.store.acquire().await?;
        crate::demand::list(&mut connection, query).await
    }

    /// Approves (measuring the revision's data, as at submission) or rejects a
    /// product's pending revision (`product:review`).
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn decide_revision(
        &self,
        principal: &Principal,
        product_id: &str,
        reason: &str,
        approve: bool,
    ) -> Result<Product> {
        // Measured before the transaction that records it: a runner may take
        // minutes, and no write should wait on it.
        let before = self
            .readable_product(principal, product_id, "product:review")
            .await?;
        let mut connection = self.store.acquire().await?;
        let candidate = crate::versions::candidate(&mut connection, product_id).await?;
        drop(connection);
        let measured = match (&before.pending_revision, approve) {
            // Data uploaded for the revision is what it will serve.
            (Some(revised), true) => Some((
                revised.clone(),
                match &candidate {
                    Some(candidate) => {
                        self.measure_quality_of(
                            product_id,
                            revised,
                            Some((
                                std::sync::Arc::new(candidate.manifest.clone()),
                                candidate.data_center.clone(),
                            )),
                        )
                        .await?
                    }
                    None => self.measure_quality(&before, revised).await?,
                },
            )),
            (None, true) => {
                return Err(MarketError::FailedPrecondition(format!(
                    "product {product_id} has no revision waiting for review"
                )));
            }
            (_, false) => None,
        };
        let mut transaction = self.store.begin().await?;
        let product = self
            .provider_product(&mut transaction, principal, product_id, "product:review")
            .await?;
        let quality = match measured {
            Some((revised, quality)) if product.pending_revision.as_ref() == Some(&revised) => {
                Some(quality)
            }
            Some(_) => return Err(changed_while_measured(product_id)),
            None => None,
        };
        match (&candidate, approve) {
            (Some(candidate), true) => {
                crate::versions::promote_candidate(
                    &mut transaction,
                    self.store.backend(),
                    &principal.user.id,
                    &product,
                    candidate,
                )
                .await?;
            }
            (Some(_), false) => {
                crate::versions::discard_candidate(
                    &mut transaction,
                    self.store.backend(),
                    &principal.user.id,
                    &product,
                )
                .await?;
            }
            (None, _) => {}
        }
        let product = registry::decide_revision(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            product_id,
            quality,
            reason,
        )
        .await?;
        transaction.commit().await?;
        if let (Some(candidate), false) = (&candidate, approve) {
            let paths = candidate
                .manifest
                .files()
                .map(|(_, f)| f.path.clone())
                .collect();
            if let Err(error) = self
                .delete_unused(&product, &candidate.data_center, paths)
                .await
            {
                tracing::warn!(product = %product_id, %error, "a rejected revision's data was not deleted");
            }
        }
        Ok(product)
    }

    /// Moves a product one step through its lifecycle (`permission` on its
    /// provider; lifting a suspension also needs `product:suspend`). Submitting
    /// a draft measures its data's quality for the registration record.
    ///
    /// # Errors
    /// `PermissionDenied` naming the permission, `NotFound`, or
    /// `InvalidArgument` / `FailedPrecondition` naming the field or state.
    pub async fn step_product(
        &self,
        principal: &Principal,
        product_id: &str,
        reason: &str,
        step: Step,
        permission: &str,
    ) -> Result<Product> {
        // Registration records measured quality, read from the data itself
        // where it lives, before the transaction that records it.
        let measured = if matches!(step, Step::Submit) {
            let before = self
                .readable_product(principal, product_id, permission)
                .await?;
            if before.state == ProductState::Draft {
                let quality = self.measure_quality(&before, &before.spec).await?;
                Some((before.spec, quality))
            } else {
                None
            }
        } else {
            None
        };
        let mut transaction = self.store.begin().await?;
        let product = self
            .provider_product(&mut transaction, principal, product_id, permission)
            .await?;
        if matches!(step, Step::Publish) && product.state == ProductState::Suspended {
            self.require(
                principal,
                &product.provider_organization_id,
                "product:suspend",
            )
            .await?;
        }
        if let Some((spec, quality)) = measured {
            if product.state != ProductState::Draft || product.spec != spec {
                return Err(changed_while_measured(product_id));
            }
            registry::set_quality(&mut transaction, product_id, quality).await?;
        }
        let product = registry::step(
            &mut transaction,
            self.store.backend(),
            &principal.user.id,
            product_id,
            step,
            reason,
        )
        .await?;
        transaction.commit().await?;
        Ok(product)
    }

    /// A product its provider's member may act on with `permission`, read
    /// outside any write.
    async fn readable_product(
        &self,
        principal: &Principal,
        product_id: &str,
        permission: &str,
    ) -> Result<Product> {
        let mut transaction = self.store.begin().await?;
        let product = self
            .provider_product(&mut transaction, principal, product_id, permission)
            .await?;
        transaction.rollback().await?;
        Ok(product)
    }

    /// The data quality of `spec`'s tables, measured where they are: by a
    /// ready runner in a data center hosting the product when queries are
    /// routed (the marketplace never reads product data), or over the
    /// marketplace's own data directory in the embedded default.
    async fn measure_quality(
        &self,
        product: &Product,
        spec: &ProductSpec,
    ) -> Result<QualityMetrics> {
        let version = self
            .newest_version(product)
            .await?
            .map(|version| (std::sync::Arc::new(version.manifest), version.data_center));
        self.measure_quality_of(&product.id, spec, version).await
    }

    /// As [`Self::measure_quality`], of data version `version` (or, with
    /// none, the product's folder as it is).
    pub(super) async fn measure_quality_of(
        &self,
        product_id: &str,
        spec: &ProductSpec,
        version: Option<(
            std::sync::Arc<civicgrid_sandbox::manifest::Manifest>,
            String,
        )>,
    ) -> Result<QualityMetrics> {
        let now_ms = crate::store::now_ms();
        let Some(runners) = self.runners.get().cloned() else {
            let dir = crate::quality::resolve_location(self.data_dir(), &spec.storage_location)?;
            let tables = spec.tables.clone();
            return tokio::task::spawn_blocking(move || match version {
                Some((manifest, _)) => {
                    crate::quality::measure_version(&dir, &manifest, &tables, now_ms)
                }
                None => crate::quality::measure(&dir, &tables, now_ms),
            })
            .await
            .map_err(|error| MarketError::Corrupt(format!("quality measurement task: {error}")))?;
        };
        // A version is measured where its files are.
        let hosts = match &version {
            Some((_, data_center)) if !data_center.is_empty() => vec![data_center.clone()],
            _ => spec.hosting_data_centers.clone(),
        };
        let choice = runners.pick(&hosts).ok_or_else(|| {
            MarketError::Unavailable(format!(
                "no runner is ready in {} to measure product {product_id}'s data; retry later",
                hosts.join(" or ")
            ))
        })?;
        let job = crate::queries::remote::MeasureJob {
            product_id: product_id.to_owned(),
            storage_location: spec.storage_location.clone(),
            tables: crate::quality::declared(&spec.tables),
            now_ms,
            version: version.map(|(manifest, _)| manifest.as_ref().clone()),
        };
        crate::quality::recorded_remote(runners.measure(choice, hosts, job).await)
    }
}

fn changed_while_measured(product_id: &str) -> MarketError {
    MarketError::FailedPrecondition(format!(
        "product {product_id} changed while its data was measured; try again"
    ))
}
