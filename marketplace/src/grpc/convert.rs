//! Proto ↔ domain conversions of the gRPC layer.

use crate::error::{MarketError, Result};
use crate::identity::{self, OrganizationKind};
use crate::proto;

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
