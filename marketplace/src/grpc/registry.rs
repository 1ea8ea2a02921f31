//! The Registry service: products through their lifecycle, the catalog and
//! the demand list.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind};
use crate::proto;
use crate::registry::{self, Step};

use crate::market::Marketplace;

use super::auth;

/// The Registry service.
#[derive(Debug, Clone)]
pub struct RegistryService(pub Arc<Marketplace>);

#[tonic::async_trait]
impl proto::registry_server::Registry for RegistryService {
    async fn create_product(
        &self,
        request: Request<proto::CreateProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let provider = principal.organization.id.clone();
        self.0
            .require(&principal, &provider, "product:create")
            .await?;
        let spec = request
            .spec
            .ok_or_else(|| MarketError::invalid("spec", "is required"))?;
        let mut transaction = self.0.store.begin().await?;
        let product = registry::create(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &provider,
            &request.id,
            spec,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn submit_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Submit, "product:submit").await
    }

    async fn start_public_notice(
        &self,
        request: Request<proto::StartPublicNoticeRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let (metadata, extensions, inner) = request.into_parts();
        let action = Request::from_parts(
            metadata,
            extensions,
            proto::ProductAction {
                product_id: inner.product_id,
                reason: String::new(),
            },
        );
        self.step(
            action,
            Step::StartPublicNotice {
                days: inner.notice_days,
            },
            "product:review",
        )
        .await
    }

    async fn approve_registration(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Approve, "product:review").await
    }

    async fn reject_registration(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Reject, "product:review").await
    }

    async fn publish_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        // Only a platform admin lifts a suspension; checked inside `step`.
        self.step(request, Step::Publish, "product:publish").await
    }

    async fn suspend_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Suspend, "product:suspend").await
    }

    async fn retire_product(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.step(request, Step::Retire, "product:retire").await
    }

    async fn revise_product(
        &self,
        request: Request<proto::ReviseProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| MarketError::invalid("spec", "is required"))?;
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:revise",
            )
            .await?;
        let product = registry::revise(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            spec,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn approve_revision(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.decide_revision(request, true).await
    }

    async fn reject_revision(
        &self,
        request: Request<proto::ProductAction>,
    ) -> Result<Response<proto::Product>, Status> {
        self.decide_revision(request, false).await
    }

    async fn transfer_product(
        &self,
        request: Request<proto::TransferProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:transfer",
            )
            .await?;
        let target = identity::find_organization(&mut transaction, &request.to_organization_id)
            .await?
            .ok_or_else(|| MarketError::NotFound {
                what: "organization",
                id: request.to_organization_id.clone(),
            })?;
        if target.kind != OrganizationKind::Provider {
            return Err(MarketError::invalid(
                "to_organization_id",
                format!("{} is not a provider organization", target.id),
            )
            .into());
        }
        let product = registry::transfer(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            &target.id,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn get_product(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut connection = self.0.store.acquire().await?;
        let mut product = registry::get(&mut connection, &request.product_id).await?;
        // Published products are public to every signed-in user; others, and
        // a revision under review, only to their provider, platform admins
        // and regulators.
        let readable = self
            .0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:read",
            )
            .await
            .is_ok();
        if !readable {
            if product.state() != proto::ProductState::Published {
                return Err(MarketError::NotFound {
                    what: "product",
                    id: request.product_id.clone(),
                }
                .into());
            }
            product.pending_revision = None;
        }
        Ok(Response::new(product))
    }

    async fn list_registration_events(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::ListRegistrationEventsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut connection = self.0.store.acquire().await?;
        let product = registry::get(&mut connection, &request.product_id).await?;
        if product.state() != proto::ProductState::Published {
            self.0
                .require(
                    &principal,
                    &product.provider_organization_id,
                    "product:read",
                )
                .await
                .map_err(|_| MarketError::NotFound {
                    what: "product",
                    id: request.product_id.clone(),
                })?;
        }
        let events = registry::events(&mut connection, &request.product_id).await?;
        Ok(Response::new(proto::ListRegistrationEventsResponse {
            events,
        }))
    }

    async fn search_catalog(
        &self,
        request: Request<proto::SearchCatalogRequest>,
    ) -> Result<Response<proto::SearchCatalogResponse>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, &principal.organization.id, "catalog:search")
            .await?;
        let request = request.into_inner();
        let mut connection = self.0.store.acquire().await?;
        let products = registry::search(&mut connection, &request).await?;
        Ok(Response::new(proto::SearchCatalogResponse { products }))
    }

    async fn export_catalog(
        &self,
        request: Request<proto::ExportCatalogRequest>,
    ) -> Result<Response<proto::ExportCatalogResponse>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, &principal.organization.id, "catalog:search")
            .await?;
        let request = request.into_inner();
        let base_uri = if request.base_uri.is_empty() {
            format!("https://{}", self.0.origin())
        } else if request.base_uri.starts_with("https://")
            || request.base_uri.starts_with("http://")
        {
            request.base_uri
        } else {
            return Err(MarketError::invalid("base_uri", "an http:// or https:// URI").into());
        };
        let mut connection = self.0.store.acquire().await?;
        let products =
            registry::search(&mut connection, &proto::SearchCatalogRequest::default()).await?;
        let organizations = identity::list_organizations(&mut connection).await?;
        let platform = organizations
            .iter()
            .find(|o| o.kind == OrganizationKind::Platform)
            .map_or_else(|| "CivicGrid".to_owned(), |o| o.display_name.clone());
        let names = organizations
            .into_iter()
            .map(|o| (o.id, o.display_name))
            .collect();
        let document = crate::dcat::catalog(&base_uri, &platform, &products, &names);
        Ok(Response::new(proto::ExportCatalogResponse {
            json_ld: serde_json::to_string_pretty(&document)
                .map_err(|e| MarketError::Corrupt(e.to_string()))?,
        }))
    }

    async fn post_demand(
        &self,
        request: Request<proto::PostDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = auth::principal(&request)?;
        let consumer = principal.organization.id.clone();
        self.0.require(&principal, &consumer, "demand:post").await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let demand = crate::demand::post(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &consumer,
            &request,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(demand))
    }

    async fn answer_demand(
        &self,
        request: Request<proto::AnswerDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = auth::principal(&request)?;
        let provider = principal.organization.id.clone();
        self.0
            .require(&principal, &provider, "demand:answer")
            .await?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let demand = crate::demand::answer(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &provider,
            &request.demand_id,
            &request.product_id,
            &request.message,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(demand))
    }

    async fn close_demand(
        &self,
        request: Request<proto::CloseDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let demand = crate::demand::get(&mut transaction, &request.demand_id).await?;
        self.0
            .require(&principal, &demand.consumer_organization_id, "demand:close")
            .await?;
        let demand = crate::demand::close(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.demand_id,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(demand))
    }

    async fn list_demands(
        &self,
        request: Request<proto::ListDemandsRequest>,
    ) -> Result<Response<proto::ListDemandsResponse>, Status> {
        let principal = auth::principal(&request)?;
        self.0
            .require(&principal, &principal.organization.id, "catalog:search")
            .await?;
        let request = request.into_inner();
        let mut connection = self.0.store.acquire().await?;
        let demands = crate::demand::list(&mut connection, &request).await?;
        Ok(Response::new(proto::ListDemandsResponse { demands }))
    }
}

impl RegistryService {
    /// Approves (measuring the revision's data, as at submission) or
    /// rejects a product's pending revision.
    async fn decide_revision(
        &self,
        request: Request<proto::ProductAction>,
        approve: bool,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(
                &principal,
                &product.provider_organization_id,
                "product:review",
            )
            .await?;
        let quality = match (&product.pending_revision, approve) {
            (Some(revised), true) => {
                let revised = revised.clone();
                let dir =
                    crate::quality::resolve_location(self.0.data_dir(), &revised.storage_location)?;
                let measured = tokio::task::spawn_blocking(move || {
                    crate::quality::measure(&dir, &revised.tables, crate::store::now_ms())
                })
                .await
                .map_err(|error| {
                    MarketError::Corrupt(format!("quality measurement task: {error}"))
                })??;
                Some(measured)
            }
            _ => None,
        };
        if approve && quality.is_none() {
            return Err(MarketError::FailedPrecondition(format!(
                "product {} has no revision waiting for review",
                request.product_id
            ))
            .into());
        }
        let product = registry::decide_revision(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            quality,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }

    async fn step(
        &self,
        request: Request<proto::ProductAction>,
        step: Step,
        permission: &str,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let mut transaction = self.0.store.begin().await?;
        let product = registry::get(&mut transaction, &request.product_id).await?;
        self.0
            .require(&principal, &product.provider_organization_id, permission)
            .await?;
        if matches!(step, Step::Publish) && product.state() == proto::ProductState::Suspended {
            self.0
                .require(
                    &principal,
                    &product.provider_organization_id,
                    "product:suspend",
                )
                .await?;
        }
        if matches!(step, Step::Submit) && product.state() == proto::ProductState::Draft {
            // Registration records measured quality, read from the data itself.
            let spec = product.spec.clone().unwrap_or_default();
            let dir = crate::quality::resolve_location(self.0.data_dir(), &spec.storage_location)?;
            let measured = tokio::task::spawn_blocking(move || {
                crate::quality::measure(&dir, &spec.tables, crate::store::now_ms())
            })
            .await
            .map_err(|error| {
                MarketError::Corrupt(format!("quality measurement task: {error}"))
            })??;
            registry::set_quality(&mut transaction, &request.product_id, measured).await?;
        }
        let product = registry::step(
            &mut transaction,
            self.0.store.backend(),
            &principal.user.id,
            &request.product_id,
            step,
            &request.reason,
        )
        .await?;
        transaction.commit().await.map_err(MarketError::from)?;
        Ok(Response::new(product))
    }
}
