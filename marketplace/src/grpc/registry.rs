//! The Registry service: products through their lifecycle, the catalog and
//! the demand list.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Result;
use crate::proto;
use crate::registry::Step;

use crate::market::Marketplace;

use super::auth;
use super::convert::{
    catalog_filter_from_proto, demand_query_from_proto, demand_to_proto, new_demand_from_proto,
    product_to_proto, registration_event_to_proto,
};

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
        let product = self
            .0
            .create_product(&principal, &request.id, request.spec)
            .await?;
        Ok(Response::new(product_to_proto(product)))
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
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let step = Step::StartPublicNotice {
            days: request.notice_days,
        };
        let product = self
            .0
            .step_product(&principal, &request.product_id, "", step, "product:review")
            .await?;
        Ok(Response::new(product_to_proto(product)))
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
        // Only a platform admin lifts a suspension; checked inside `step_product`.
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
        let product = self
            .0
            .revise_product(
                &principal,
                &request.product_id,
                request.spec,
                &request.reason,
            )
            .await?;
        Ok(Response::new(product_to_proto(product)))
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
        let product = self
            .0
            .transfer_product(
                &principal,
                &request.product_id,
                &request.to_organization_id,
                &request.reason,
            )
            .await?;
        Ok(Response::new(product_to_proto(product)))
    }

    async fn get_product(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let product = self
            .0
            .product(&principal, &request.get_ref().product_id)
            .await?;
        let open = self.0.open_quality_reports().await?;
        Ok(Response::new(super::convert::catalog_product_to_proto(
            product, &open,
        )))
    }

    async fn list_registration_events(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::ListRegistrationEventsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let events = self
            .0
            .registration_events(&principal, &request.get_ref().product_id)
            .await?;
        Ok(Response::new(proto::ListRegistrationEventsResponse {
            events: events
                .into_iter()
                .map(registration_event_to_proto)
                .collect(),
        }))
    }

    async fn search_catalog(
        &self,
        request: Request<proto::SearchCatalogRequest>,
    ) -> Result<Response<proto::SearchCatalogResponse>, Status> {
        let principal = auth::principal(&request)?;
        let filter = catalog_filter_from_proto(request.into_inner());
        let products = self.0.search_catalog(&principal, &filter).await?;
        let open = self.0.open_quality_reports().await?;
        Ok(Response::new(proto::SearchCatalogResponse {
            products: products
                .into_iter()
                .map(|product| super::convert::catalog_product_to_proto(product, &open))
                .collect(),
        }))
    }

    async fn report_quality_issue(
        &self,
        request: Request<proto::ReportQualityIssueRequest>,
    ) -> Result<Response<proto::QualityReport>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let report = self
            .0
            .report_quality_issue(
                &principal,
                crate::feedback::NewReport {
                    product_id: request.product_id,
                    column: request.column,
                    description: request.description,
                    query_id: request.query_id,
                },
            )
            .await?;
        Ok(Response::new(super::convert::quality_report_to_proto(
            report,
        )))
    }

    async fn answer_quality_report(
        &self,
        request: Request<proto::AnswerQualityReportRequest>,
    ) -> Result<Response<proto::QualityReport>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let report = self
            .0
            .answer_quality_report(
                &principal,
                &request.report_id,
                &request.message,
                request.fixed_in_version,
            )
            .await?;
        Ok(Response::new(super::convert::quality_report_to_proto(
            report,
        )))
    }

    async fn reopen_quality_report(
        &self,
        request: Request<proto::ReopenQualityReportRequest>,
    ) -> Result<Response<proto::QualityReport>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let report = self
            .0
            .reopen_quality_report(&principal, &request.report_id, &request.reason)
            .await?;
        Ok(Response::new(super::convert::quality_report_to_proto(
            report,
        )))
    }

    async fn list_quality_reports(
        &self,
        request: Request<proto::ListQualityReportsRequest>,
    ) -> Result<Response<proto::ListQualityReportsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let reports = self
            .0
            .quality_reports(&principal, &request.product_id, request.open_only)
            .await?;
        Ok(Response::new(proto::ListQualityReportsResponse {
            reports: reports
                .into_iter()
                .map(super::convert::quality_report_to_proto)
                .collect(),
        }))
    }

    async fn begin_upload(
        &self,
        request: Request<proto::BeginUploadRequest>,
    ) -> Result<Response<proto::Upload>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let upload = self
            .0
            .begin_upload(
                &principal,
                crate::versions::NewUpload {
                    product_id: request.product_id,
                    table: request.table,
                    format: request.format,
                    append: request.append,
                    for_revision: request.for_revision,
                    size_bytes: request.size_bytes,
                    sha256: request.sha256,
                },
            )
            .await?;
        Ok(Response::new(super::convert::upload_to_proto(upload)))
    }

    async fn put_upload_chunk(
        &self,
        request: Request<proto::PutUploadChunkRequest>,
    ) -> Result<Response<proto::Upload>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let upload = self
            .0
            .put_upload_chunk(
                &principal,
                &request.upload_id,
                request.offset,
                request.data,
                &request.sha256,
            )
            .await?;
        Ok(Response::new(super::convert::upload_to_proto(upload)))
    }

    async fn get_upload(
        &self,
        request: Request<proto::GetUploadRequest>,
    ) -> Result<Response<proto::Upload>, Status> {
        let principal = auth::principal(&request)?;
        let upload = self
            .0
            .upload(&principal, &request.into_inner().upload_id)
            .await?;
        Ok(Response::new(super::convert::upload_to_proto(upload)))
    }

    async fn commit_upload(
        &self,
        request: Request<proto::GetUploadRequest>,
    ) -> Result<Response<proto::CommitUploadResponse>, Status> {
        let principal = auth::principal(&request)?;
        let (upload, version) = self
            .0
            .commit_upload(&principal, &request.into_inner().upload_id)
            .await?;
        Ok(Response::new(proto::CommitUploadResponse {
            upload: Some(super::convert::upload_to_proto(upload)),
            version: Some(super::convert::data_version_to_proto(version)),
        }))
    }

    async fn list_data_versions(
        &self,
        request: Request<proto::ListDataVersionsRequest>,
    ) -> Result<Response<proto::ListDataVersionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let versions = self
            .0
            .data_versions(&principal, &request.into_inner().product_id)
            .await?;
        Ok(Response::new(proto::ListDataVersionsResponse {
            versions: versions
                .into_iter()
                .map(super::convert::data_version_to_proto)
                .collect(),
        }))
    }

    async fn withdraw_data_version(
        &self,
        request: Request<proto::WithdrawDataVersionRequest>,
    ) -> Result<Response<proto::DataVersion>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let version = self
            .0
            .withdraw_data_version(
                &principal,
                &request.product_id,
                request.version,
                &request.reason,
            )
            .await?;
        Ok(Response::new(super::convert::data_version_to_proto(
            version,
        )))
    }

    async fn list_uploads(
        &self,
        request: Request<proto::ListUploadsRequest>,
    ) -> Result<Response<proto::ListUploadsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let uploads = self
            .0
            .uploads(&principal, &request.into_inner().product_id)
            .await?;
        Ok(Response::new(proto::ListUploadsResponse {
            uploads: uploads
                .into_iter()
                .map(super::convert::upload_to_proto)
                .collect(),
        }))
    }

    async fn export_catalog(
        &self,
        request: Request<proto::ExportCatalogRequest>,
    ) -> Result<Response<proto::ExportCatalogResponse>, Status> {
        let principal = auth::principal(&request)?;
        let json_ld = self
            .0
            .export_catalog(&principal, &request.get_ref().base_uri)
            .await?;
        Ok(Response::new(proto::ExportCatalogResponse { json_ld }))
    }

    async fn post_demand(
        &self,
        request: Request<proto::PostDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = auth::principal(&request)?;
        let demand = new_demand_from_proto(request.into_inner());
        let posted = self.0.post_demand(&principal, demand).await?;
        Ok(Response::new(demand_to_proto(posted)))
    }

    async fn answer_demand(
        &self,
        request: Request<proto::AnswerDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let demand = self
            .0
            .answer_demand(
                &principal,
                &request.demand_id,
                &request.product_id,
                &request.message,
            )
            .await?;
        Ok(Response::new(demand_to_proto(demand)))
    }

    async fn close_demand(
        &self,
        request: Request<proto::CloseDemandRequest>,
    ) -> Result<Response<proto::Demand>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let demand = self
            .0
            .close_demand(&principal, &request.demand_id, &request.reason)
            .await?;
        Ok(Response::new(demand_to_proto(demand)))
    }

    async fn list_demands(
        &self,
        request: Request<proto::ListDemandsRequest>,
    ) -> Result<Response<proto::ListDemandsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let query = demand_query_from_proto(request.into_inner());
        let demands = self.0.demands(&principal, &query).await?;
        Ok(Response::new(proto::ListDemandsResponse {
            demands: demands.into_iter().map(demand_to_proto).collect(),
        }))
    }
}

impl RegistryService {
    async fn step(
        &self,
        request: Request<proto::ProductAction>,
        step: Step,
        permission: &str,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let action = request.into_inner();
        let product = self
            .0
            .step_product(
                &principal,
                &action.product_id,
                &action.reason,
                step,
                permission,
            )
            .await?;
        Ok(Response::new(product_to_proto(product)))
    }

    async fn decide_revision(
        &self,
        request: Request<proto::ProductAction>,
        approve: bool,
    ) -> Result<Response<proto::Product>, Status> {
        let principal = auth::principal(&request)?;
        let action = request.into_inner();
        let product = self
            .0
            .decide_revision(&principal, &action.product_id, &action.reason, approve)
            .await?;
        Ok(Response::new(product_to_proto(product)))
    }
}
