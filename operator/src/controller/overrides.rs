//! Per-data-center changes to a workload's copy (Karmada's OverridePolicy,
//! declared on the workload): a registry mirror near an edge site, the
//! environment a partner cloud needs, node labels only one member has.
//! Pure functions of the workload and the data center, applied to the pod
//! template after everything else, in the order the overrides are listed.

use k8s_openapi::api::core::v1::{EnvVar, PodTemplateSpec};

use crate::crd::{DataCenter, Override};

/// Whether `o` applies to `dc`: every selector it gives matches.
pub fn matches(o: &Override, dc: &DataCenter) -> bool {
    let name = dc.metadata.name.as_deref().unwrap_or_default();
    (o.data_centers.is_empty() || o.data_centers.iter().any(|n| n == name))
        && (o.tiers.is_empty() || o.tiers.contains(&dc.spec.tier))
        && (o.regions.is_empty() || o.regions.contains(&dc.spec.region))
        && o.data_center_labels
            .iter()
            .all(|(k, v)| dc.spec.labels.get(k) == Some(v))
}

/// `image` pulled from `registry`: the first path component is replaced
/// when it names a registry (has a `.` or `:`, or is `localhost`), and
/// added otherwise (Docker Hub images such as `nginx:1.27`).
pub fn with_registry(image: &str, registry: &str) -> String {
    let registry = registry.trim_end_matches('/');
    match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            format!("{registry}/{rest}")
        }
        _ => format!("{registry}/{image}"),
    }
}

/// Applies `o` to `template`.
pub fn apply(o: &Override, template: &mut PodTemplateSpec) {
    let meta = template.metadata.get_or_insert_with(Default::default);
    if !o.pod_labels.is_empty() {
        meta.labels
            .get_or_insert_with(Default::default)
            .extend(o.pod_labels.clone());
    }
    if !o.pod_annotations.is_empty() {
        meta.annotations
            .get_or_insert_with(Default::default)
            .extend(o.pod_annotations.clone());
    }
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    if !o.node_selector.is_empty() {
        pod.node_selector
            .get_or_insert_with(Default::default)
            .extend(o.node_selector.clone());
    }
    let init = pod.init_containers.iter_mut().flatten();
    for c in pod.containers.iter_mut().chain(init) {
        if let (Some(registry), Some(image)) = (&o.image_registry, &c.image) {
            c.image = Some(with_registry(image, registry));
        }
        if o.env.is_empty() {
            continue;
        }
        let env = c.env.get_or_insert_with(Vec::new);
        for set in &o.env {
            let var = EnvVar {
                name: set.name.clone(),
                value: Some(set.value.clone()),
                value_from: None,
            };
            match env.iter_mut().find(|e| e.name == set.name) {
                Some(existing) => *existing = var,
                None => env.push(var),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{OverrideEnv, Tier};

    fn data_center(name: &str, tier: &str, region: &str) -> DataCenter {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "civicgrid.io/v1alpha1", "kind": "DataCenter",
            "metadata": { "name": name },
            "spec": { "tier": tier, "region": region, "labels": { "network": "5g" } }
        }))
        .expect("data center")
    }

    #[test]
    fn every_selector_given_must_match() {
        let edge = data_center("edge-east", "edge", "city");
        let core = data_center("core", "municipal", "city");
        let any = Override::default();
        assert!(matches(&any, &edge) && matches(&any, &core));
        let edge_tier = Override {
            tiers: vec![Tier::Edge],
            ..Override::default()
        };
        assert!(matches(&edge_tier, &edge) && !matches(&edge_tier, &core));
        let named_elsewhere = Override {
            tiers: vec![Tier::Edge],
            regions: vec!["metro".into()],
            ..Override::default()
        };
        assert!(!matches(&named_elsewhere, &edge));
        let by_label = Override {
            data_centers: vec!["edge-east".into()],
            data_center_labels: [("network".to_owned(), "5g".to_owned())].into(),
            ..Override::default()
        };
        assert!(matches(&by_label, &edge) && !matches(&by_label, &core));
    }

    #[test]
    fn a_registry_mirror_keeps_the_repository_and_tag() {
        let mirror = "mirror.edge.example:5000";
        assert_eq!(
            with_registry("registry.city.example/plates/reader:1.2", mirror),
            "mirror.edge.example:5000/plates/reader:1.2"
        );
        assert_eq!(
            with_registry("localhost/reader@sha256:ab", mirror),
            "mirror.edge.example:5000/reader@sha256:ab"
        );
        // A Docker Hub name has no registry component: one is added.
        assert_eq!(
            with_registry("nginx:1.27", mirror),
            "mirror.edge.example:5000/nginx:1.27"
        );
        assert_eq!(
            with_registry("library/nginx", "mirror.example/"),
            "mirror.example/library/nginx"
        );
    }

    #[test]
    fn an_override_changes_every_container_and_the_pods() {
        let mut template: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "spec": {
                "initContainers": [{ "name": "init", "image": "registry.city.example/init:1" }],
                "containers": [{ "name": "reader", "image": "registry.city.example/reader:1",
                                 "env": [{ "name": "MODE", "value": "core" }] }]
            }
        }))
        .expect("template");
        let o = Override {
            image_registry: Some("mirror.edge.example".into()),
            env: vec![
                OverrideEnv {
                    name: "MODE".into(),
                    value: "edge".into(),
                },
                OverrideEnv {
                    name: "UPLINK".into(),
                    value: "5g".into(),
                },
            ],
            pod_labels: [("site".to_owned(), "east".to_owned())].into(),
            node_selector: [("network".to_owned(), "5g".to_owned())].into(),
            ..Override::default()
        };
        apply(&o, &mut template);
        let pod = template.spec.expect("pod");
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("mirror.edge.example/reader:1")
        );
        assert_eq!(
            pod.init_containers.expect("init")[0].image.as_deref(),
            Some("mirror.edge.example/init:1")
        );
        let env: Vec<(String, Option<String>)> = pod.containers[0]
            .env
            .clone()
            .expect("env")
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect();
        assert_eq!(
            env,
            vec![
                ("MODE".to_owned(), Some("edge".to_owned())),
                ("UPLINK".to_owned(), Some("5g".to_owned()))
            ]
        );
        assert_eq!(
            pod.node_selector
                .expect("selector")
                .get("network")
                .map(String::as_str),
            Some("5g")
        );
        assert_eq!(
            template
                .metadata
                .expect("meta")
                .labels
                .expect("labels")
                .get("site")
                .map(String::as_str),
            Some("east")
        );
    }
}
