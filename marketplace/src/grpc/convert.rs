//! Proto ↔ domain conversions of the gRPC layer.

use crate::billing::{Balance, Invoice, InvoiceLine, LedgerSummary};
use crate::contracts::{
    Contract, ContractRequest, ContractState, OperationKind, OperationQuestion,
};
use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind};
use crate::proto;
use crate::queries::{QueryRequest, QuerySummary, UsageQuery};
use crate::registry::{CatalogFilter, Product, ProductState, RegistrationEvent};

/// Moves every field of one struct into another with the same field
/// names, the listed ones converted on the way. Both sides are written out
/// whole, so a field added to either fails to compile here instead of
/// going missing from the API.
macro_rules! move_fields {
    ($value:expr, $from:path => $to:path { $($field:ident),* $(,)? }
        $(converting { $($converted:ident: $conversion:expr),* $(,)? })?
        $(adding { $($added:ident: $addition:expr),* $(,)? })?) => {{
        let $from { $($field,)* $($($converted,)*)? } = $value;
        $to { $($field,)* $($($converted: $conversion,)*)? $($($added: $addition,)*)? }
    }};
}

pub(super) fn kind_from_proto(kind: proto::OrganizationKind) -> Result<OrganizationKind> {
    Ok(match kind {
        proto::OrganizationKind::Provider => OrganizationKind::Provider,
        proto::OrganizationKind::Consumer => OrganizationKind::Consumer,
        proto::OrganizationKind::Platform => OrganizationKind::Platform,
        proto::OrganizationKind::Regulator => OrganizationKind::Regulator,
        proto::OrganizationKind::Unspecified => {
            return Err(MarketError::invalid(
                "kind",
                "set provider, consumer, platform or regulator",
            ));
        }
    })
}

pub(super) fn kind_to_proto(kind: OrganizationKind) -> proto::OrganizationKind {
    match kind {
        OrganizationKind::Provider => proto::OrganizationKind::Provider,
        OrganizationKind::Consumer => proto::OrganizationKind::Consumer,
        OrganizationKind::Platform => proto::OrganizationKind::Platform,
        OrganizationKind::Regulator => proto::OrganizationKind::Regulator,
    }
}

pub(super) fn organization_to_proto(organization: &identity::Organization) -> proto::Organization {
    proto::Organization {
        id: organization.id.clone(),
        display_name: organization.display_name.clone(),
        kind: kind_to_proto(organization.kind) as i32,
        created_at_unix_ms: organization.created_at,
    }
}

pub(super) fn user_to_proto(user: &identity::User) -> proto::User {
    proto::User {
        id: user.id.clone(),
        organization_id: user.organization_id.clone(),
        name: user.name.clone(),
        created_at_unix_ms: user.created_at,
    }
}

pub(super) fn demand_to_proto(demand: crate::demand::Demand) -> proto::Demand {
    let state = match demand.state {
        crate::demand::DemandState::Open => proto::DemandState::Open,
        crate::demand::DemandState::Closed => proto::DemandState::Closed,
    };
    proto::Demand {
        id: demand.id,
        consumer_organization_id: demand.consumer_organization_id,
        title: demand.title,
        description: demand.description,
        keywords: demand.keywords,
        tier: demand.tier,
        region: demand.region,
        monthly_budget_minor: demand.monthly_budget_minor,
        currency: demand.currency,
        state: state as i32,
        created_at_unix_ms: demand.created_at,
        answers: demand
            .answers
            .into_iter()
            .map(|answer| proto::DemandAnswer {
                provider_organization_id: answer.provider_organization_id,
                product_id: answer.product_id,
                message: answer.message,
                at_unix_ms: answer.at,
            })
            .collect(),
    }
}

pub(super) fn new_demand_from_proto(request: proto::PostDemandRequest) -> crate::demand::NewDemand {
    crate::demand::NewDemand {
        title: request.title,
        description: request.description,
        keywords: request.keywords,
        tier: request.tier,
        region: request.region,
        monthly_budget_minor: request.monthly_budget_minor,
        currency: request.currency,
    }
}

pub(super) fn demand_query_from_proto(
    request: proto::ListDemandsRequest,
) -> crate::demand::DemandQuery {
    crate::demand::DemandQuery {
        keywords: request.keywords,
        include_closed: request.include_closed,
    }
}

pub(super) fn query_request(request: proto::RunQueryRequest) -> QueryRequest {
    move_fields!(request, proto::RunQueryRequest => QueryRequest {
        product_id, sql, algorithm_wasm, idempotency_key, max_compute_units, data_version,
    })
}

pub(super) fn usage_query(request: proto::ListUsageRequest) -> UsageQuery {
    move_fields!(request, proto::ListUsageRequest => UsageQuery {
        product_id, organization_id, period, limit,
    })
}

pub(super) fn query_summary(summary: QuerySummary) -> proto::QuerySummary {
    move_fields!(summary, QuerySummary => proto::QuerySummary {
        query_id, contract_id, plan_id, state, error, metering, fuel, compute_units, rows_read,
        bytes_read, rows_released, bytes_released, suppressed_rows, truncated, privacy_spent,
        wall_time_ms, currency, held_minor, charge_minor, audit_index, replayed, sql,
        algorithm_sha256, consumer_organization_id, product_id, user_id, created_at_unix_ms,
        provider_organization_id, data_center,
    } adding {
        receipt: None,
    })
}

pub(super) fn receipt_to_proto(receipt: crate::market::Receipt) -> proto::Receipt {
    proto::Receipt {
        entry_index: i64::try_from(receipt.index).unwrap_or(i64::MAX),
        entry: receipt.entry,
        checkpoint: receipt.checkpoint,
        inclusion_path: receipt.path.iter().map(|hash| hash.to_vec()).collect(),
    }
}

pub(super) fn product_state_to_proto(state: ProductState) -> proto::ProductState {
    match state {
        ProductState::Draft => proto::ProductState::Draft,
        ProductState::Submitted => proto::ProductState::Submitted,
        ProductState::UnderPublicNotice => proto::ProductState::UnderPublicNotice,
        ProductState::Registered => proto::ProductState::Registered,
        ProductState::Published => proto::ProductState::Published,
        ProductState::Suspended => proto::ProductState::Suspended,
        ProductState::Retired => proto::ProductState::Retired,
    }
}

pub(super) fn product_to_proto(product: Product) -> proto::Product {
    move_fields!(product, Product => proto::Product {
        id, provider_organization_id, version, registration_number, approved_by_user_id,
        registered_at_unix_ms, public_notice_ends_at_unix_ms, updated_at_unix_ms,
        pending_revision, data_version,
    } converting {
        state: product_state_to_proto(state) as i32,
        spec: Some(spec),
    } adding {
        open_quality_reports: 0,
        oldest_open_quality_report_unix_ms: 0,
    })
}

/// A catalog view of `product`: with its open quality reports.
pub(super) fn catalog_product_to_proto(
    product: Product,
    open: &crate::feedback::OpenByProduct,
) -> proto::Product {
    let reports = open.get(&product.id).copied().unwrap_or_default();
    proto::Product {
        open_quality_reports: reports.count,
        oldest_open_quality_report_unix_ms: reports.oldest_unix_ms,
        ..product_to_proto(product)
    }
}

pub(super) fn quality_report_to_proto(
    report: crate::feedback::QualityReport,
) -> proto::QualityReport {
    move_fields!(report, crate::feedback::QualityReport => proto::QualityReport {
        id, product_id, product_version, column, description, query_id,
        reporter_organization_id, reporter_user_id, answer, fixed_in_version,
        created_at_unix_ms, updated_at_unix_ms,
    } converting {
        state: state.name().to_owned(),
    })
}

pub(super) fn registration_event_to_proto(event: RegistrationEvent) -> proto::RegistrationEvent {
    move_fields!(event, RegistrationEvent => proto::RegistrationEvent {
        product_id, kind, actor_user_id, reason, version, at_unix_ms, audit_index,
    })
}

pub(super) fn catalog_filter_from_proto(request: proto::SearchCatalogRequest) -> CatalogFilter {
    let max_sensitivity = request.max_sensitivity();
    let proto::SearchCatalogRequest {
        keywords,
        tier,
        region,
        provider_organization_id,
        max_sensitivity: _,
    } = request;
    CatalogFilter {
        keywords,
        tier,
        region,
        provider_organization_id,
        max_sensitivity,
    }
}

pub(super) fn contract_state_to_proto(state: ContractState) -> proto::ContractState {
    match state {
        ContractState::Requested => proto::ContractState::Requested,
        ContractState::Active => proto::ContractState::Active,
        ContractState::Rejected => proto::ContractState::Rejected,
        ContractState::Revoked => proto::ContractState::Revoked,
        ContractState::Expired => proto::ContractState::Expired,
    }
}

pub(super) fn contract_to_proto(contract: Contract) -> proto::Contract {
    move_fields!(contract, Contract => proto::Contract {
        id, product_id, consumer_organization_id, provider_organization_id, plan_id,
        monthly_query_quota, requested_at_unix_ms, decided_at_unix_ms, expires_at_unix_ms,
        purpose, reason, duration_days,
    } converting {
        operations: Some(operations),
        state: contract_state_to_proto(state) as i32,
    })
}

pub(super) fn contract_request_from_proto(
    request: proto::RequestContractRequest,
) -> ContractRequest {
    move_fields!(request, proto::RequestContractRequest => ContractRequest {
        product_id, plan_id, operations, monthly_query_quota, duration_days, purpose,
    })
}

pub(super) fn operation_question_from_proto(
    request: proto::CheckOperationRequest,
) -> OperationQuestion {
    let operation = match request.operation() {
        proto::OperationKind::AggregateSql => Some(OperationKind::AggregateSql),
        proto::OperationKind::ListSql => Some(OperationKind::ListSql),
        proto::OperationKind::Algorithm => Some(OperationKind::Algorithm),
        proto::OperationKind::Unspecified => None,
    };
    let proto::CheckOperationRequest {
        product_id,
        operation: _,
        columns,
        algorithm_sha256,
    } = request;
    OperationQuestion {
        product_id,
        operation,
        columns,
        algorithm_sha256,
    }
}

pub(super) fn balance_to_proto(balance: Balance) -> proto::Balance {
    move_fields!(balance, Balance => proto::Balance {
        organization_id, currency, balance_minor, held_minor, available_minor,
    })
}

pub(super) fn invoice_to_proto(invoice: Invoice) -> proto::Invoice {
    move_fields!(invoice, Invoice => proto::Invoice {
        organization_id, period, role,
    } converting {
        lines: lines.into_iter().map(invoice_line_to_proto).collect(),
        total_minor: total_minor.into_iter().collect(),
    })
}

fn invoice_line_to_proto(line: InvoiceLine) -> proto::InvoiceLine {
    move_fields!(line, InvoiceLine => proto::InvoiceLine {
        contract_id, product_id, plan_id, queries, compute_units, rows_released, amount_minor,
        currency,
    })
}

pub(super) fn ledger_summary_to_proto(summary: LedgerSummary) -> proto::LedgerSummary {
    move_fields!(summary, LedgerSummary => proto::LedgerSummary {
        postings, open_holds, open_held_minor, unbalanced_accounts,
    } converting {
        totals_minor: totals_minor.into_iter().collect(),
    })
}

pub(super) fn upload_to_proto(upload: crate::versions::Upload) -> proto::Upload {
    proto::Upload {
        id: upload.id,
        product_id: upload.product_id,
        table: upload.table,
        format: upload.format,
        append: upload.append,
        size_bytes: upload.size_bytes,
        sha256: upload.sha256,
        received_bytes: upload.received_bytes,
        state: upload.state.name().to_owned(),
        message: upload.message,
        data_version: upload.data_version,
        data_center: upload.data_center,
        created_at_unix_ms: upload.created_at_unix_ms,
    }
}

pub(super) fn data_version_to_proto(version: crate::versions::DataVersion) -> proto::DataVersion {
    proto::DataVersion {
        product_id: version.product_id,
        version: version.version,
        fingerprint: version.fingerprint,
        rows: version.rows,
        bytes: version.bytes,
        quality: Some(version.quality),
        created_at_unix_ms: version.created_at_unix_ms,
        audit_index: version.audit_index,
        withdrawn_at_unix_ms: version.withdrawn_at_unix_ms,
        withdrawn_reason: version.withdrawn_reason,
        candidate: version.candidate,
        tables: version
            .manifest
            .tables
            .into_iter()
            .map(|table| proto::DataVersionTable {
                name: table.name,
                files: table
                    .files
                    .into_iter()
                    .map(|file| proto::DataVersionFile {
                        path: file.path,
                        sha256: file.sha256,
                        bytes: i64::try_from(file.bytes).unwrap_or(i64::MAX),
                        rows: i64::try_from(file.rows).unwrap_or(i64::MAX),
                    })
                    .collect(),
            })
            .collect(),
    }
}
