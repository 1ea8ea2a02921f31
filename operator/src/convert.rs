//! Wire types ([`crate::crd`]) → engine types ([`crate::engine::model`]).
//!
//! Parse, don't validate: everything the engine relies on is checked here once,
//! and every refusal names the object and the field.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

use crate::crd::{self, ComputeWorkload, DataCenter, GPU_MODEL_LABEL, GPU_RESOURCE};
use crate::engine::model::{
    self, FallbackGroup, Reachability, ReplicaDemand, Resources, Selector, SelectorExpression,
    Spread, Taint, Toleration, Weights, WorkloadKey,
};
use crate::quantity;

/// One-to-one maps of the CRD's enums onto the engine's own, so the engine
/// never sees a wire type and the CRD can grow without the engine noticing.
macro_rules! same_variants {
    ($($wire:ident => $model:ident { $($variant:ident),+ $(,)? })+) => {$(
        impl From<crd::$wire> for model::$model {
            fn from(value: crd::$wire) -> Self {
                match value {
                    $(crd::$wire::$variant => Self::$variant,)+
                }
            }
        }
    )+};
}

same_variants! {
    Tier => Tier { Municipal, Edge, Partner }
    TaintEffect => TaintEffect { NoSchedule, PreferNoSchedule, NoExecute }
    TolerationOperator => TolerationOperator { Equal, Exists }
    SpreadDomain => SpreadDomain { DataCenter, Zone, Region }
    StrategyKind => StrategyKind { Duplicated, StaticWeights, AvailableCapacity, Score }
    PreemptionPolicy => PreemptionPolicy { PreemptLowerPriority, Never }
    RebalanceMode => RebalanceMode { Never, WhenBetterGroupHasRoom }
}

/// A spec the engine cannot use, with the object and field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} `{object}`: {field}: {message}")]
pub struct FieldError {
    /// `DataCenter` or `ComputeWorkload`.
    pub kind: &'static str,
    /// Object name (`namespace/name` for workloads).
    pub object: String,
    /// Field path, e.g. `spec.resources.cpu`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

struct At<'a> {
    kind: &'static str,
    object: &'a str,
}

impl At<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            kind: self.kind,
            object: self.object.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn cpu(&self, field: &str, q: &str) -> Result<u64, FieldError> {
        quantity::cpu_millis(q).map_err(|e| self.err(field, e.to_string()))
    }

    fn bytes(&self, field: &str, q: &str) -> Result<u64, FieldError> {
        quantity::bytes(q).map_err(|e| self.err(field, e.to_string()))
    }
}

fn capacity(at: &At<'_>, field: &str, c: &crd::Capacity) -> Result<Resources, FieldError> {
    Ok(Resources {
        cpu_millis: at.cpu(&format!("{field}.cpu"), &c.cpu.0)?,
        memory_bytes: at.bytes(&format!("{field}.memory"), &c.memory.0)?,
        ephemeral_bytes: match &c.ephemeral_storage {
            Some(q) => at.bytes(&format!("{field}.ephemeralStorage"), &q.0)?,
            // Not declared: not a constraint.
            None => u64::MAX,
        },
        gpus: c
            .gpus
            .iter()
            .map(|(model, n)| (model.clone(), u64::from(*n)))
            .collect(),
    })
}

/// Converts a `DataCenter`. `now_unix` decides whether a pushed carbon value
/// is still fresh; `reachability` comes from the controller's health checks.
///
/// # Errors
/// Unparsable capacity quantities, a PUE below 1, or capacity neither
/// declared nor observed.
pub fn data_center(
    dc: &DataCenter,
    now_unix: i64,
    reachability: Reachability,
) -> Result<model::DataCenter, FieldError> {
    let name = dc.name_any();
    let at = At {
        kind: "DataCenter",
        object: &name,
    };
    let spec = &dc.spec;
    if spec.region.trim().is_empty() {
        return Err(at.err("spec.region", "must not be empty"));
    }
    let capacity = match (
        &spec.capacity,
        dc.status.as_ref().and_then(|s| s.allocatable.as_ref()),
    ) {
        (Some(c), _) => capacity(&at, "spec.capacity", c)?,
        (None, Some(observed)) => capacity(&at, "status.allocatable", observed)?,
        (None, None) => {
            return Err(at.err(
                "spec.capacity",
                "not declared and not yet observed from the member cluster's nodes",
            ));
        }
    };
    let (carbon_intensity, pue_milli) = match &spec.energy {
        None => (None, 1000),
        Some(energy) => {
            if !(energy.pue >= 1.0 && energy.pue.is_finite() && energy.pue < 10.0) {
                return Err(at.err(
                    "spec.energy.pue",
                    format!("{} is not within [1.0, 10.0)", energy.pue),
                ));
            }
            let fresh = energy
                .pushed
                .as_ref()
                .filter(|p| p.expires_at.0.as_second() > now_unix)
                .map(|p| p.carbon_intensity);
            // Rounded to 1/1000: PUE is reported to two decimals in practice.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let pue_milli = (energy.pue * 1000.0).round() as u32;
            (Some(fresh.unwrap_or(energy.carbon_intensity)), pue_milli)
        }
    };
    let cost = spec.cost.clone().unwrap_or_default();
    Ok(model::DataCenter {
        name: name.clone(),
        tier: spec.tier.into(),
        region: spec.region.clone(),
        zone: spec.zone.clone(),
        labels: spec.labels.clone(),
        taints: spec
            .taints
            .iter()
            .map(|t| Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: t.effect.into(),
                added_unix: t
                    .time_added
                    .as_ref()
                    .or_else(|| {
                        dc.status
                            .as_ref()
                            .and_then(|s| s.no_execute_since.get(&t.key))
                    })
                    .map(|at| at.0.as_second()),
            })
            .collect(),
        capacity,
        cost_per_core_hour: cost.per_core_hour,
        cost_per_gib_hour: cost.per_gib_hour,
        cost_per_gpu_hour: cost.per_gpu_hour,
        carbon_intensity,
        pue_milli,
        latency_ms: spec.latency_ms.clone(),
        datasets: spec.datasets.iter().cloned().collect(),
        cordoned: spec.cordoned,
        reachability,
        cluster: dc.status.as_ref().and_then(|s| s.cluster_id.clone()),
    })
}

fn selector(at: &At<'_>, s: &LabelSelector) -> Result<Selector, FieldError> {
    let mut expressions = Vec::new();
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let field = format!("spec.placement.dataCenterSelector.matchExpressions[{i}]");
        let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
        let expression = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(at.err(
                    format!("{field}.values"),
                    format!("{} needs at least one value", e.operator),
                ));
            }
            "In" => SelectorExpression::In(e.key.clone(), values),
            "NotIn" => SelectorExpression::NotIn(e.key.clone(), values),
            "Exists" => SelectorExpression::Exists(e.key.clone()),
            "DoesNotExist" => SelectorExpression::DoesNotExist(e.key.clone()),
            other => {
                return Err(at.err(
                    format!("{field}.operator"),
                    format!("`{other}` is not one of In, NotIn, Exists, DoesNotExist"),
                ));
            }
        };
        expressions.push(expression);
    }
    Ok(Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        expressions,
    })
}

/// The pod template's own requests, where it states any, must add up to
/// `spec.resources`: the member's scheduler places by the template and the
/// pool accounts by `spec.resources`, and the two must not disagree. What
/// the template leaves out the operator writes in (see
/// `controller::children`).
fn template_agrees(
    at: &At<'_>,
    spec: &crd::ComputeWorkloadSpec,
    demand: &ReplicaDemand,
) -> Result<(), FieldError> {
    let containers = spec
        .template
        .spec
        .as_ref()
        .map(|p| p.containers.as_slice())
        .unwrap_or_default();
    type Parse = fn(&str) -> Result<u64, quantity::QuantityError>;
    let checks: [(&str, &str, u64, Parse); 4] = [
        (
            "cpu",
            "spec.resources.cpu",
            demand.cpu_millis,
            quantity::cpu_millis,
        ),
        (
            "memory",
            "spec.resources.memory",
            demand.memory_bytes,
            quantity::bytes,
        ),
        (
            "ephemeral-storage",
            "spec.resources.ephemeralStorage",
            demand.ephemeral_bytes,
            quantity::bytes,
        ),
        (
            GPU_RESOURCE,
            "spec.resources.gpu.count",
            demand.gpu_count,
            quantity::bytes,
        ),
    ];
    for (resource, accounted_at, accounted, parse) in checks {
        for list in ["requests", "limits"] {
            // CPU and memory limits may exceed the request; only a GPU's
            // limit is its request (Kubernetes requires them equal).
            if list == "limits" && resource != GPU_RESOURCE {
                continue;
            }
            let mut first = None;
            let mut total = 0u64;
            for (i, c) in containers.iter().enumerate() {
                let stated = c
                    .resources
                    .as_ref()
                    .and_then(|r| {
                        if list == "requests" {
                            r.requests.as_ref()
                        } else {
                            r.limits.as_ref()
                        }
                    })
                    .and_then(|m| m.get(resource));
                if let Some(q) = stated {
                    let field =
                        format!("spec.template.spec.containers[{i}].resources.{list}.{resource}");
                    let n = parse(&q.0).map_err(|e| at.err(field.clone(), e.to_string()))?;
                    total = total.saturating_add(n);
                    first.get_or_insert(field);
                }
            }
            if let Some(field) = first
                && total != accounted
            {
                return Err(at.err(
                    field,
                    format!(
                        "the containers' {list} of {resource} add up to {total} but {accounted_at} \
                         says {accounted} (in {}): state it once, in {accounted_at}",
                        if resource == "cpu" {
                            "millicores"
                        } else if resource == GPU_RESOURCE {
                            "GPUs"
                        } else {
                            "bytes"
                        }
                    ),
                ));
            }
        }
    }
    if let Some(model) = &demand.gpu_model
        && let Some(selected) = spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.node_selector.as_ref())
            .and_then(|s| s.get(GPU_MODEL_LABEL))
        && selected != model
    {
        return Err(at.err(
            format!("spec.template.spec.nodeSelector.{GPU_MODEL_LABEL}"),
            format!("selects {selected} but spec.resources.gpu.model is {model}"),
        ));
    }
    Ok(())
}

/// Converts a `ComputeWorkload`.
///
/// # Errors
/// Negative replicas, unparsable quantities, a replica that asks for nothing,
/// inconsistent spread bounds, duplicate or empty static weights and fallback
/// groups, pod-template requests that disagree with `spec.resources`, each
/// naming the field.
pub fn workload(cw: &ComputeWorkload) -> Result<model::Workload, FieldError> {
    let key = WorkloadKey::new(
        cw.namespace().unwrap_or_else(|| "default".to_owned()),
        cw.name_any(),
    );
    let object = key.to_string();
    let at = At {
        kind: "ComputeWorkload",
        object: &object,
    };
    let spec = &cw.spec;
    let replicas = u32::try_from(spec.replicas)
        .map_err(|_| at.err("spec.replicas", format!("{} is negative", spec.replicas)))?;
    let r = &spec.resources;
    let gpu = r.gpu.as_ref();
    if gpu.is_some_and(|g| g.count == 0) {
        return Err(at.err("spec.resources.gpu.count", "must be at least 1"));
    }
    if gpu
        .and_then(|g| g.model.as_deref())
        .is_some_and(|m| m.trim().is_empty())
    {
        return Err(at.err("spec.resources.gpu.model", "must not be empty when given"));
    }
    let demand = ReplicaDemand {
        cpu_millis: at.cpu("spec.resources.cpu", &r.cpu.0)?,
        memory_bytes: at.bytes("spec.resources.memory", &r.memory.0)?,
        ephemeral_bytes: match &r.ephemeral_storage {
            Some(q) => at.bytes("spec.resources.ephemeralStorage", &q.0)?,
            None => 0,
        },
        gpu_count: gpu.map_or(0, |g| u64::from(g.count)),
        gpu_model: gpu.and_then(|g| g.model.clone()),
    };
    if demand.cpu_millis == 0 && demand.memory_bytes == 0 && demand.gpu_count == 0 {
        return Err(at.err(
            "spec.resources",
            "a replica must request some CPU, memory or GPU, or capacity cannot be accounted",
        ));
    }
    template_agrees(&at, spec, &demand)?;
    for (i, o) in spec.overrides.iter().enumerate() {
        if let Some(registry) = &o.image_registry {
            let bad = registry.is_empty()
                || registry.contains("://")
                || registry.trim_end_matches('/').contains('/')
                || registry.chars().any(char::is_whitespace);
            if bad {
                return Err(at.err(
                    format!("spec.overrides[{i}].imageRegistry"),
                    format!("`{registry}` is not a registry host (e.g. mirror.example:5000)"),
                ));
            }
        }
        if let Some(j) = o.env.iter().position(|e| e.name.trim().is_empty()) {
            return Err(at.err(
                format!("spec.overrides[{i}].env[{j}].name"),
                "must not be empty",
            ));
        }
    }
    let p = &spec.placement;
    let spread = p.spread.clone().unwrap_or_default();
    if let (Some(min), Some(max)) = (spread.min_domains, spread.max_domains)
        && min > max
    {
        return Err(at.err(
            "spec.placement.spread.minDomains",
            format!("{min} exceeds spec.placement.spread.maxDomains {max}"),
        ));
    }
    if spread.max_domains == Some(0) {
        return Err(at.err("spec.placement.spread.maxDomains", "must be at least 1"));
    }
    let mut static_weights = BTreeMap::new();
    for (i, w) in p.strategy.static_weights.iter().enumerate() {
        if static_weights
            .insert(w.data_center.clone(), w.weight)
            .is_some()
        {
            return Err(at.err(
                format!("spec.placement.strategy.staticWeights[{i}].dataCenter"),
                format!("`{}` is listed twice", w.data_center),
            ));
        }
    }
    if p.strategy.kind == crd::StrategyKind::StaticWeights
        && static_weights.values().all(|w| *w == 0)
    {
        return Err(at.err(
            "spec.placement.strategy.staticWeights",
            "StaticWeights needs at least one data center with a weight above 0",
        ));
    }
    let mut fallback_groups = Vec::new();
    let mut group_names = BTreeSet::new();
    for (i, g) in p.fallback_groups.iter().enumerate() {
        let field = format!("spec.placement.fallbackGroups[{i}]");
        if g.tiers.is_empty() && g.regions.is_empty() && g.data_centers.is_empty() {
            return Err(at.err(
                field,
                "lists no tiers, regions or data centers, so it matches nothing",
            ));
        }
        if !group_names.insert(g.name.clone()) {
            return Err(at.err(
                format!("{field}.name"),
                format!("`{}` is used twice", g.name),
            ));
        }
        fallback_groups.push(FallbackGroup {
            name: g.name.clone(),
            tiers: g.tiers.iter().map(|&t| t.into()).collect(),
            regions: g.regions.iter().cloned().collect(),
            data_centers: g.data_centers.iter().cloned().collect(),
        });
    }
    let selector = p
        .data_center_selector
        .as_ref()
        .map(|s| selector(&at, s))
        .transpose()?;
    let affinity = p.data_affinity.clone().unwrap_or_default();
    Ok(model::Workload {
        key,
        replicas,
        demand,
        placement: model::PlacementRules {
            required_tiers: p.required_tiers.iter().map(|&t| t.into()).collect(),
            preferred_tiers: p.preferred_tiers.iter().map(|&t| t.into()).collect(),
            fallback_groups,
            allowed_regions: p.allowed_regions.iter().cloned().collect(),
            selector,
            tolerations: p
                .tolerations
                .iter()
                .map(|t| Toleration {
                    key: t.key.clone(),
                    operator: t.operator.into(),
                    value: t.value.clone(),
                    effect: t.effect.map(Into::into),
                    toleration_seconds: t.toleration_seconds,
                })
                .collect(),
            max_latency: p
                .max_latency
                .as_ref()
                .map(|l| (l.from_site.clone(), l.max_ms)),
            required_datasets: affinity.required.into_iter().collect(),
            preferred_datasets: affinity.preferred.into_iter().collect(),
            spread: Spread {
                by: spread.by.into(),
                min_domains: spread.min_domains,
                max_domains: spread.max_domains,
                max_replicas_per_data_center: spread.max_replicas_per_data_center,
            },
            strategy: p.strategy.kind.into(),
            static_weights,
            gang: p.gang,
            weights: Weights::from(&p.weights),
            rebalance: p.rebalance.mode.into(),
            max_moves_per_round: p.rebalance.max_moves_per_round,
        },
        priority: spec.priority,
        preemption: spec.preemption_policy.into(),
        grace_period_seconds: spec.failover.grace_period_seconds,
    })
}

/// The workload's current placement as recorded in its status.
pub fn current_placement(cw: &ComputeWorkload) -> BTreeMap<String, u32> {
    cw.status
        .iter()
        .flat_map(|s| &s.placement)
        .filter_map(|e| {
            u32::try_from(e.replicas)
                .ok()
                .map(|r| (e.data_center.clone(), r))
        })
        .filter(|(_, r)| *r > 0)
        .collect()
}
