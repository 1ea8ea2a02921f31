//! The CivicGrid CRDs on a real API server: bad specs are rejected at apply
//! time by the schema and CEL rules, good ones are stored.

use std::time::Duration;

use civicgrid_tests::controlplane::{Cluster, eventually};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

fn api(client: kube::Client, kind: &str, plural: &str, namespaced: bool) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("civicgrid.io", "v1alpha1", kind),
        plural,
    );
    if namespaced {
        Api::namespaced_with(client, "default", &resource)
    } else {
        Api::all_with(client, &resource)
    }
}

fn object(value: serde_json::Value) -> DynamicObject {
    serde_json::from_value(value).expect("test object")
}

fn workload(name: &str, replicas: i64, placement: serde_json::Value) -> DynamicObject {
    object(serde_json::json!({
        "apiVersion": "civicgrid.io/v1alpha1", "kind": "ComputeWorkload",
        "metadata": { "name": name },
        "spec": { "kind": "Deployment", "replicas": replicas, "template": {},
                  "resources": { "cpu": "1", "memory": "1Gi" }, "placement": placement }
    }))
}

async fn rejected(api: &Api<DynamicObject>, obj: &DynamicObject) -> String {
    match api.create(&PostParams::default(), obj).await {
        Err(kube::Error::Api(status)) if status.code == 422 => status.message,
        other => panic!("expected 422 Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn api_server_rejects_invalid_civicgrid_specs() -> anyhow::Result<()> {
    let cluster = Cluster::start("crds").await?;
    let client = cluster.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let yaml = civicgrid_operator::crds_yaml()?;
    for document in yaml
        .split("\n---\n")
        .filter(|d| d.contains("kind: CustomResourceDefinition"))
    {
        let crd: CustomResourceDefinition = serde_yaml::from_str(document)?;
        crds.create(&PostParams::default(), &crd).await?;
    }
    let workloads = api(client.clone(), "ComputeWorkload", "computeworkloads", true);
    let valid = workload("ok", 3, serde_json::json!({}));
    eventually(
        "ComputeWorkload served",
        Duration::from_secs(60),
        || async { workloads.create(&PostParams::default(), &valid).await.ok() },
    )
    .await?;

    let message = rejected(&workloads, &workload("negative", -1, serde_json::json!({}))).await;
    assert!(message.contains("replicas must be at least 0"), "{message}");

    // The failover knobs are counts: a negative one names the field.
    for field in ["maxEvictionsPerMinute", "maxUnavailable"] {
        let mut bad = workload("failover", 1, serde_json::json!({}));
        bad.data["spec"]["failover"] = serde_json::json!({ field: -1 });
        let message = rejected(&workloads, &bad).await;
        assert!(
            message.contains(&format!("spec.failover.{field}")),
            "{message}"
        );
    }

    let message = rejected(
        &workloads,
        &workload(
            "spread",
            1,
            serde_json::json!({ "spread": { "minDomains": 3, "maxDomains": 2 } }),
        ),
    )
    .await;
    assert!(message.contains("minDomains must not exceed"), "{message}");

    let message = rejected(
        &workloads,
        &workload(
            "weights",
            1,
            serde_json::json!({ "strategy": { "type": "StaticWeights" } }),
        ),
    )
    .await;
    assert!(
        message.contains("staticWeights must list at least one"),
        "{message}"
    );

    let data_centers = api(client, "DataCenter", "datacenters", false);
    let dc = |tier: &str| {
        object(serde_json::json!({
            "apiVersion": "civicgrid.io/v1alpha1", "kind": "DataCenter",
            "metadata": { "name": format!("dc-{tier}") },
            "spec": { "tier": tier, "region": "city" }
        }))
    };
    let message = rejected(&data_centers, &dc("core")).await;
    assert!(
        message.contains("spec.tier") && message.contains("Unsupported value"),
        "{message}"
    );
    data_centers
        .create(&PostParams::default(), &dc("edge"))
        .await?;
    Ok(())
}
