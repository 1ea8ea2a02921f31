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

use super::pool::reachability;
use super::{Context, Error, FIELD_MANAGER, condition, copies, now_unix, set_condition};
use crate::convert;
use crate::crd::{Capacity, DataCenter, DataCenterStatus};
use crate::engine::model::Reachability;

/// How often a data center whose status is otherwise unchanged has its
/// `lastHeartbeat` written (a kubelet's `nodeStatusReportFrequency`).
const STATUS_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

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
    if probe.is_err() {
        ctx.members.read_secret_again(&name);
    }
    let was_reachable = matches!(reachability(&dc), Reachability::Reachable) && dc.status.is_some();
    let was = previous
        .conditions
        .iter()
        .find(|c| c.type_ == "Reachable")
        .map(|c| c.status == "True");
    let judged = judge(
        was,
        probe.is_ok(),
        Probes {
            failed: previous.failed_probes,
            answered: previous.answered_probes,
        },
        (ctx.config.failure_threshold, ctx.config.success_threshold),
    );
    let reachable = judged.reachable;
    status.failed_probes = judged.probes.failed;
    status.answered_probes = judged.probes.answered;
    let (failure, success) = (ctx.config.failure_threshold, ctx.config.success_threshold);
    let (reason, message) = match (&probe, reachable) {
        (Ok(_), true) => ("Answering", "the member API server answers".to_owned()),
        (Ok(_), false) => (
            "Recovering",
            format!(
                "answered {} of the {success} probes in a row it needs to take replicas again",
                judged.probes.answered
            ),
        ),
        (Err(error), true) => (
            "MissedProbes",
            format!(
                "missed {} of the {failure} probes in a row that make it unreachable: {error}",
                judged.probes.failed
            ),
        ),
        (Err(Error::Kubeconfig { .. }), false) => ("InvalidKubeconfig", probe_error(&probe)),
        (Err(_), false) => ("NotAnswering", probe_error(&probe)),
    };
    set_condition(
        &mut status.conditions,
        condition("Reachable", reachable, reason, message, generation),
    );
    match &probe {
        Ok((_, observed)) => {
            // One written in the future (a clock ahead, another leader's)
            // is due now, not when this clock reaches it.
            let due = previous.last_heartbeat.as_ref().is_none_or(|at| {
                let age = Timestamp::now().duration_since(at.0);
                age.is_negative() || age.unsigned_abs() >= STATUS_REPORT_EVERY
            });
            if due {
                status.last_heartbeat = Some(Time(Timestamp::now()));
            }
            status.allocatable = Some(dc.spec.capacity.clone().unwrap_or_else(|| observed.clone()));
        }
        Err(_) => {
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
    // Tolerations' seconds count from when a NoExecute taint was added;
    // for one that does not say, from when it was first seen here.
    let no_execute: std::collections::BTreeSet<&String> = dc
        .spec
        .taints
        .iter()
        .filter(|t| t.effect == crate::crd::TaintEffect::NoExecute && t.time_added.is_none())
        .map(|t| &t.key)
        .collect();
    status
        .no_execute_since
        .retain(|key, _| no_execute.contains(key));
    for key in no_execute {
        status
            .no_execute_since
            .entry(key.clone())
            .or_insert_with(|| Time(Timestamp::now()));
    }
    // Data centers that share a member cluster are told apart by its
    // identity: a workload may run in only one of them.
    let mut unidentified = None;
    if let Ok((member, _)) = &probe {
        match ctx.members.cluster_id(&name, member).await {
            Ok(id) => {
                set_condition(
                    &mut status.conditions,
                    condition(
                        "ClusterIdentified",
                        true,
                        "Identified",
                        format!("member cluster {id} (the UID of its kube-system namespace)"),
                        generation,
                    ),
                );
                status.cluster_id = Some(id);
            }
            Err(e) => {
                let message = format!(
                    "cannot read namespace kube-system in the member, so data centers that \
                     share its cluster cannot be told apart: {e}"
                );
                set_condition(
                    &mut status.conditions,
                    condition(
                        "ClusterIdentified",
                        false,
                        "Unidentified",
                        message.clone(),
                        generation,
                    ),
                );
                unidentified = Some(message);
            }
        }
    }
    let was_identified = previous
        .conditions
        .iter()
        .find(|c| c.type_ == "ClusterIdentified")
        .is_none_or(|c| c.status == "True");
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
    // A heartbeat whose answer changed nothing else is not written until
    // `lastHeartbeat` is due: like a kubelet's node status, the status is
    // written on change, or every few minutes to show the probes go on.
    // Writing it every heartbeat cost the control API server one apply per
    // data center per heartbeat, and each apply came back as a watch event
    // that reconciled the data center once more.
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
            (EventType::Warning, "Unreachable", probe_error(&probe))
        };
        publish(&ctx, &dc, type_, reason, note).await;
    }
    if let Err(e) = &valid {
        publish(&ctx, &dc, EventType::Warning, "InvalidSpec", e.to_string()).await;
    }
    if let Some(message) = unidentified
        && was_identified
    {
        publish(
            &ctx,
            &dc,
            EventType::Warning,
            "ClusterUnidentified",
            message,
        )
        .await;
    }
    if let Ok((member, _)) = &probe {
        remove_orphans(&ctx, member, &name).await?;
    }
    Ok(Action::requeue(ctx.config.heartbeat))
}

fn probe_error<T>(probe: &Result<T, Error>) -> String {
    probe
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Consecutive probe outcomes of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probes {
    failed: u32,
    answered: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Judged {
    reachable: bool,
    probes: Probes,
}

/// Whether a member is reachable after a probe, as Karmada judges its
/// clusters: a reachable member turns unreachable only after `failure`
/// missed probes in a row, an unreachable one reachable only after
/// `success` answered in a row. A member never judged before (`was` is
/// `None`) is what its first probe says.
fn judge(
    was: Option<bool>,
    answered: bool,
    probes: Probes,
    (failure, success): (u32, u32),
) -> Judged {
    let probes = if answered {
        Probes {
            failed: 0,
            answered: probes.answered.saturating_add(1),
        }
    } else {
        Probes {
            failed: probes.failed.saturating_add(1),
            answered: 0,
        }
    };
    let reachable = match (was, answered) {
        (None, answered) => answered,
        (Some(true), true) => true,
        (Some(true), false) => probes.failed < failure,
        (Some(false), true) => probes.answered >= success,
        (Some(false), false) => false,
    };
    // Answers count only towards a return; a reachable member needs none.
    let probes = if reachable && answered {
        Probes {
            failed: 0,
            answered: 0,
        }
    } else {
        probes
    };
    Judged { reachable, probes }
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
    let mut decided = ctx.decided();
    for cw in ctx.workloads.state() {
        let key = super::pool::key_of(&cw);
        let Some(&replicas) = decided.placement_or_status(&key, &cw).get(data_center) else {
            continue;
        };
        names.push(format!(
            "{}/{}",
            cw.namespace().unwrap_or_default(),
            cw.name_any()
        ));
        total = total.saturating_add(replicas);
        let seen = (cw.uid(), cw.metadata.generation);
        if let Some(w) = decided.converted(&key, seen, || convert::workload(&cw).ok()) {
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
    // The member's watches know its copies; listing three kinds in every
    // member on every heartbeat is the fallback while they catch up.
    let children = match ctx.members.copies_in(data_center) {
        Some(known) => known
            .into_iter()
            .map(|(kind, namespace, name)| copies::ChildRef {
                kind,
                workload_namespace: namespace.clone(),
                workload_name: name.clone(),
                namespace,
                name,
            })
            .collect(),
        None => copies::list_children(member, data_center, None).await?,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `outcomes` (true: answered) through `judge` from a reachable
    /// member, returning reachability after each probe.
    fn walk(start: Option<bool>, outcomes: &[bool]) -> Vec<bool> {
        let mut was = start;
        let mut probes = Probes {
            failed: 0,
            answered: 0,
        };
        outcomes
            .iter()
            .map(|&answered| {
                let judged = judge(was, answered, probes, (3, 2));
                was = Some(judged.reachable);
                probes = judged.probes;
                judged.reachable
            })
            .collect()
    }

    #[test]
    fn a_reachable_member_is_lost_only_after_the_failure_threshold() {
        // Two missed probes, then an answer: never unreachable.
        assert_eq!(
            walk(Some(true), &[false, false, true, false, false, true]),
            vec![true; 6]
        );
        // The third missed probe in a row makes it unreachable.
        assert_eq!(
            walk(Some(true), &[false, false, false, false]),
            vec![true, true, false, false]
        );
    }

    #[test]
    fn an_unreachable_member_returns_only_after_the_success_threshold() {
        // One answer between misses does not bring it back.
        assert_eq!(
            walk(Some(false), &[true, false, true, true, true]),
            vec![false, false, false, true, true]
        );
    }

    #[test]
    fn a_member_never_judged_is_what_its_first_probe_says() {
        assert_eq!(walk(None, &[false]), vec![false]);
        assert_eq!(walk(None, &[true]), vec![true]);
    }
}
