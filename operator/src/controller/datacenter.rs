//! The `DataCenter` reconciler: member health, capacity from nodes, status,
//! and removal of copies left behind in a member that was down.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource as _, ResourceExt as _};

use super::pool::{current, reachability};
use super::{Context, Error, FIELD_MANAGER, condition, copies, now_unix, set_condition};
use crate::convert;
use crate::crd::{Capacity, DataCenter, DataCenterStatus};
use crate::engine::model::Reachability;

/// Probes the member, writes status, and removes orphaned copies.
#[tracing::instrument(skip_all, fields(name = dc.name_any()))]
pub(super) async fn reconcile(dc: Arc<DataCenter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.config.metrics.reconcile("datacenter");
    let name = dc.name_any();
    let api: Api<DataCenter> = Api::all(ctx.client.clone());
    let previous = dc.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    let generation = dc.metadata.generation;

    let probe = match ctx.members.connect(&ctx.client, &dc).await {
        Ok(member) => members_capacity(&member, &name).await.map(|c| (member, c)),
        Err(e) => Err(e),
    };
    let was_reachable = matches!(reachability(&dc), Reachability::Reachable) && dc.status.is_some();
    let reachable = probe.is_ok();
    match &probe {
        Ok((_, observed)) => {
            set_condition(
                &mut status.conditions,
                condition(
                    "Reachable",
                    true,
                    "Answering",
                    "the member API server answers",
                    generation,
                ),
            );
            status.last_heartbeat = Some(Time(Timestamp::now()));
            status.allocatable = Some(dc.spec.capacity.clone().unwrap_or_else(|| observed.clone()));
        }
        Err(error) => {
            let reason = match error {
                Error::Kubeconfig { .. } => "InvalidKubeconfig",
                _ => "NotAnswering",
            };
            set_condition(
                &mut status.conditions,
                condition("Reachable", false, reason, error.to_string(), generation),
            );
            if status.allocatable.is_none() {
                status.allocatable = dc.spec.capacity.clone();
            }
        }
    }
    set_condition(
        &mut status.conditions,
        condition(
            "Cordoned",
            dc.spec.cordoned,
            if dc.spec.cordoned {
                "Cordoned"
            } else {
                "Schedulable"
            },
            if dc.spec.cordoned {
                "takes no new replicas; running ones stay"
            } else {
                "takes new replicas"
            },
            generation,
        ),
    );
    let mut checked = (*dc).clone();
    checked.status = Some(status.clone());
    let valid = convert::data_center(&checked, now_unix(), Reachability::Reachable);
    let (ready, reason, message) = match (&valid, reachable, dc.spec.cordoned) {
        (Err(e), _, _) => (false, "InvalidSpec", e.to_string()),
        (Ok(_), false, _) => (
            false,
            "Unreachable",
            "the member cluster does not answer".to_owned(),
        ),
        (Ok(_), true, true) => (false, "Cordoned", "cordoned".to_owned()),
        (Ok(_), true, false) => (true, "Ready", "takes replicas".to_owned()),
    };
    set_condition(
        &mut status.conditions,
        condition("Ready", ready, reason, message, generation),
    );
    let (workloads, allocated, replicas) = placed_here(&ctx, &name);
    ctx.config
        .metrics
        .replicas
        .get_or_create(&super::metrics::DataCenterLabel {
            data_center: name.clone(),
        })
        .set(i64::from(replicas));
    status.workloads = workloads;
    status.allocated = Some(allocated);

    if status != previous {
        let patch = serde_json::json!({
            "apiVersion": "civicgrid.io/v1alpha1",
            "kind": "DataCenter",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    }
    if was_reachable != reachable || dc.status.is_none() {
        let (type_, reason, note) = if reachable {
            (
                EventType::Normal,
                "Reachable",
                "the member cluster answers".to_owned(),
            )
        } else {
            (
                EventType::Warning,
                "Unreachable",
                probe
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            )
        };
        publish(&ctx, &dc, type_, reason, note).await;
    }
    if let Err(e) = &valid {
        publish(&ctx, &dc, EventType::Warning, "InvalidSpec", e.to_string()).await;
    }
    if let Ok((member, _)) = &probe {
        remove_orphans(&ctx, member, &name).await?;
    }
    Ok(Action::requeue(ctx.config.heartbeat))
}

async fn members_capacity(member: &kube::Client, name: &str) -> Result<Capacity, Error> {
    super::members::node_capacity(member, name).await
}

async fn publish(ctx: &Context, dc: &DataCenter, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Probe".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &dc.object_ref(&())).await {
        tracing::warn!(%error, data_center = %dc.name_any(), "publishing an event");
    }
}

/// Workloads with replicas in `data_center`, the capacity they take, and
/// how many replicas.
fn placed_here(ctx: &Context, data_center: &str) -> (Vec<String>, Capacity, u32) {
    let mut names = Vec::new();
    let mut total = 0u32;
    let (mut cpu, mut memory) = (0u64, 0u64);
    let mut gpus: BTreeMap<String, u32> = BTreeMap::new();
    for cw in ctx.workloads.state() {
        let placement = current(ctx, &cw);
        let Some(&replicas) = placement.get(data_center) else {
            continue;
        };
        names.push(format!(
            "{}/{}",
            cw.namespace().unwrap_or_default(),
            cw.name_any()
        ));
        total = total.saturating_add(replicas);
        if let Ok(w) = convert::workload(&cw) {
            let n = u64::from(replicas);
            cpu += w.demand.cpu_millis * n;
            memory += w.demand.memory_bytes * n;
            if let Some(model) = &w.demand.gpu_model {
                *gpus.entry(model.clone()).or_default() +=
                    u32::try_from(w.demand.gpu_count * n).unwrap_or(u32::MAX);
            }
        }
    }
    names.sort();
    (
        names,
        Capacity {
            cpu: Quantity(format!("{cpu}m")),
            memory: Quantity(memory.to_string()),
            ephemeral_storage: None,
            gpus,
        },
        total,
    )
}

/// Deletes copies in this member whose workload no longer exists (it was
/// deleted while the member was down).
async fn remove_orphans(
    ctx: &Context,
    member: &kube::Client,
    data_center: &str,
) -> Result<(), Error> {
    // An empty cache would make every copy look orphaned.
    if tokio::time::timeout(
        std::time::Duration::from_secs(1),
        ctx.workloads.wait_until_ready(),
    )
    .await
    .is_err()
    {
        return Ok(());
    }
    let existing: std::collections::BTreeSet<(String, String)> = ctx
        .workloads
        .state()
        .iter()
        .map(|cw| (cw.namespace().unwrap_or_default(), cw.name_any()))
        .collect();
    let children = copies::list_children(member, data_center, None).await?;
    for child in children {
        if !existing.contains(&(
            child.workload_namespace.clone(),
            child.workload_name.clone(),
        )) {
            tracing::info!(data_center, workload = %child.workload_name, "removing an orphaned copy");
            copies::delete_child(ctx, member, data_center, &child).await?;
        }
    }
    Ok(())
}

/// Retries with a delay; member trouble is reported in status, not here.
pub(super) fn error_policy(dc: Arc<DataCenter>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.config
        .metrics
        .errors
        .get_or_create(&super::metrics::ErrorLabels {
            controller: "datacenter",
            kind: error.kind(),
        })
        .inc();
    tracing::warn!(data_center = %dc.name_any(), kind = error.kind(), %error, "data center reconcile failed");
    Action::requeue(ctx.config.heartbeat)
}

impl DataCenterStatus {
    /// Whether the member answered at the last probe.
    pub fn reachable(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == "Reachable" && c.status == "True")
    }
}
