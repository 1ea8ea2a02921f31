//! The Helm chart: it lints, its rendering is committed, and on a real API
//! server the rendered manifests apply and the chart's ServiceAccount, with
//! exactly the chart's RBAC, can run the operator — and cannot read Secrets
//! outside its namespace.
//!
//! `helm` comes from `tools/helm/build.sh` (the Go module proxy) through
//! `CIVICGRID_HELM`. The simulated nodes run no containers, so the chart's
//! Deployment becomes Available with simulated pods; the operator itself runs
//! in this process, authenticated as the chart's ServiceAccount.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use civicgrid_operator::controller::leader::LeaseConfig;
use civicgrid_operator::controller::{self};
use civicgrid_operator::crd::{ComputeWorkload, DataCenter};
use civicgrid_tests::controlplane::{NodeShape, eventually, start_clusters};
use civicgrid_tests::pool;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::discovery::{self, Scope};
use kube::{Client, ResourceExt as _};

const WAIT: Duration = Duration::from_secs(60);
const NAMESPACE: &str = pool::SECRETS_NAMESPACE;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let helm = std::env::var("CIVICGRID_HELM").context(
        "CIVICGRID_HELM is not set: run `bash tools/helm/build.sh` (scripts/test.sh does)",
    )?;
    let out = Command::new(&helm)
        .args(args)
        .current_dir(repo_root())
        .output()
        .with_context(|| format!("running {helm}"))?;
    ensure!(
        out.status.success(),
        "helm {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The chart rendered as `charts/rendered/civicgrid.yaml` holds it.
fn render() -> anyhow::Result<String> {
    render_with(&["--include-crds"])
}

fn render_with(extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        "template",
        "civicgrid",
        "charts/civicgrid",
        "--namespace",
        NAMESPACE,
        "--kube-version",
        "1.35.0",
    ];
    args.extend_from_slice(extra);
    helm(&args)
}

#[test]
fn chart_lints_and_its_committed_rendering_is_current() -> anyhow::Result<()> {
    helm(&[
        "lint",
        "--strict",
        "charts/civicgrid",
        "--kube-version",
        "1.35.0",
    ])?;
    let committed = std::fs::read_to_string(repo_root().join("charts/rendered/civicgrid.yaml"))?;
    assert!(
        render()? == committed,
        "charts/rendered/civicgrid.yaml is stale: regenerate it with\n  \
         $(bash tools/helm/build.sh) template civicgrid charts/civicgrid --namespace {NAMESPACE} \
         --kube-version 1.35.0 --include-crds > charts/rendered/civicgrid.yaml"
    );
    let committed =
        std::fs::read_to_string(repo_root().join("charts/rendered/civicgrid-city.yaml"))?;
    assert!(
        render_city(&[])? == committed,
        "charts/rendered/civicgrid-city.yaml is stale: regenerate it with\n  \
         $(bash tools/helm/build.sh) template civicgrid charts/civicgrid --namespace {NAMESPACE} \
         --kube-version 1.35.0 -f charts/examples/city-values.yaml \
         > charts/rendered/civicgrid-city.yaml"
    );
    Ok(())
}

/// The whole stack (charts/examples/city-values.yaml), with `extra`.
fn render_city(extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["-f", "charts/examples/city-values.yaml"];
    args.extend_from_slice(extra);
    render_with(&args)
}

/// A Deployment's first container in a rendering: its arguments and the
/// names of its environment variables.
fn container_of(rendered: &str, name: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    for document in serde_yaml::Deserializer::from_str(rendered) {
        let value = serde_yaml::Value::deserialize(document)?;
        let named = |field: &serde_yaml::Value, wanted: &str| field.as_str() == Some(wanted);
        if !named(&value["kind"], "Deployment") || !named(&value["metadata"]["name"], name) {
            continue;
        }
        let deployment: Deployment = serde_yaml::from_value(value)?;
        let container = deployment
            .spec
            .and_then(|spec| spec.template.spec)
            .and_then(|spec| spec.containers.into_iter().next())
            .context("the Deployment has a container")?;
        let env = container
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|var| var.name)
            .collect();
        return Ok((container.args.unwrap_or_default(), env));
    }
    bail!("the chart renders no Deployment {name}")
}

/// Every flag and environment variable the chart gives the marketplace is
/// one `civicgrid-marketplace serve` takes: the binary parses the flags
/// (`--help` last) and names the variables in its help.
#[test]
fn the_marketplace_accepts_every_argument_the_chart_passes() -> anyhow::Result<()> {
    let operator = std::env::var(civicgrid_tests::operator::BIN_ENV)
        .with_context(|| format!("{} is not set", civicgrid_tests::operator::BIN_ENV))?;
    let marketplace = std::path::Path::new(&operator).with_file_name("civicgrid-marketplace");
    let plain = container_of(&render_city(&[])?, "civicgrid-marketplace")?;
    let everything = container_of(
        &render_city(&[
            "--set",
            "marketplace.clientCertificates=true,marketplace.database.bundled.enabled=false",
            "--set",
            "marketplace.extraArgs[0]=--default-compute-units=20000",
            "--set",
            "tracing.otlpEndpoint=http://otel:4317",
            "--set-json",
            &format!(
                r#"marketplace.witnesses=[{{"key":"{WITNESS_KEY}","url":"https://witness.regulator.example"}}]"#
            ),
        ])?,
        "civicgrid-marketplace",
    )?;
    ensure!(
        everything.1.contains(&"CIVICGRID_WITNESSES".to_owned()),
        "the witnesses reach the marketplace: {everything:?}"
    );
    ensure!(
        everything
            .0
            .contains(&"--client-ca=/etc/civicgrid/tls/ca.crt".to_owned())
            && everything
                .0
                .contains(&"--default-compute-units=20000".to_owned())
            && plain
                .0
                .contains(&"--runners-listen=0.0.0.0:7443".to_owned()),
        "the values reach the marketplace: {everything:?} {plain:?}"
    );
    for (args, env) in [plain, everything] {
        let out = Command::new(&marketplace)
            .args(&args)
            .arg("--help")
            .output()
            .with_context(|| format!("running {}", marketplace.display()))?;
        ensure!(
            out.status.success(),
            "the marketplace refuses the chart's arguments {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let help = String::from_utf8(out.stdout)?;
        for name in env.iter().filter(|name| name.starts_with("CIVICGRID_")) {
            ensure!(
                help.contains(&format!("env: {name}")),
                "the marketplace reads no {name}"
            );
        }
    }
    Ok(())
}

/// A witness's verifier key (`civicgrid-witness key` prints such keys).
const WITNESS_KEY: &str =
    "witness.regulator.example/civicgrid+b6206d33+BN4P53D9yNy0b0S4vcVg3xQU5GmPlZL3KnygUagQZuzQ";

/// The witnesses a release names reach the marketplace as one value it
/// parses, each key and URL intact.
#[test]
fn witnesses_reach_the_marketplace_as_it_parses_them() -> anyhow::Result<()> {
    let rendered = render_city(&[
        "--set-json",
        &format!(
            r#"marketplace.witnesses=[{{"key":"{WITNESS_KEY}","url":"https://w1.example"}},{{"key":"{WITNESS_KEY}","url":"http://w2:7380"}}]"#
        ),
    ])?;
    let line = rendered
        .lines()
        .skip_while(|line| !line.contains("name: CIVICGRID_WITNESSES"))
        .nth(1)
        .context("CIVICGRID_WITNESSES has a value")?;
    let value: String = serde_yaml::from_str(line.trim().trim_start_matches("value:").trim())?;
    let parsed = value
        .split(',')
        .map(str::parse::<civicgrid_marketplace::market::WitnessEndpoint>)
        .collect::<Result<Vec<_>, _>>()?;
    let urls: Vec<&str> = parsed.iter().map(|w| w.url.as_str()).collect();
    ensure!(urls == ["https://w1.example", "http://w2:7380"], "{urls:?}");
    ensure!(parsed.iter().all(|w| w.verifier.to_string() == WITNESS_KEY));
    let refused = render_city(&[
        "--set-json",
        r#"marketplace.witnesses=[{"key":"not a key","url":"https://w"}]"#,
    ])
    .expect_err("a key with a space is refused");
    ensure!(
        refused.to_string().contains("/marketplace/witnesses/0/key"),
        "{refused}"
    );
    Ok(())
}

/// values.schema.json stops a value the operator would refuse (or ignore)
/// before anything is applied, naming it; the PodDisruptionBudget comes
/// with more than one replica only.
#[test]
fn values_outside_the_schema_are_refused_naming_the_value() -> anyhow::Result<()> {
    for (set, says) in [
        ("heartbeatSeconds=0", "/heartbeatSeconds"),
        ("replicas=0", "/replicas"),
        ("replicass=3", "'replicass' not allowed"),
        ("memberFailureThreshold=0", "/memberFailureThreshold"),
        (
            "leaderElection.leaseName=Not_A_Name",
            "/leaderElection/leaseName",
        ),
        ("metrics.port=70000", "/metrics/port"),
        ("runners.directory=http://plain:4000", "/runners/directory"),
        ("runners.pools[0].name=p", "/runners/pools/0"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("marketplace.replicas=0", "/marketplace/replicas"),
        ("marketplace.logOrigin=audit city", "/marketplace/logOrigin"),
        ("marketplace.extraArgs[0]=serve", "/marketplace/extraArgs/0"),
        (
            "marketplace.tlsSecret=Not_A_Secret",
            "/marketplace/tlsSecret",
        ),
    ] {
        let refused = render_with(&["--set", set])
            .err()
            .with_context(|| format!("--set {set} was accepted"))?;
        assert!(
            refused.to_string().contains(says),
            "--set {set}: {refused:#}"
        );
    }
    let refused = render_with(&["--set-string", "maxEvictionsPerMinute=ten"])
        .err()
        .context("maxEvictionsPerMinute=ten was accepted")?;
    assert!(
        refused.to_string().contains("/maxEvictionsPerMinute"),
        "{refused:#}"
    );

    let nowhere = render_with(&[
        "--set",
        "marketplace.enabled=true,marketplace.database.urlSecret=",
    ])
    .err()
    .context("a marketplace with no database was accepted")?;
    assert!(
        nowhere
            .to_string()
            .contains("marketplace.database: set urlSecret"),
        "{nowhere:#}"
    );

    let budget = "kind: PodDisruptionBudget";
    assert!(
        render()?.contains(budget),
        "two replicas, no PodDisruptionBudget"
    );
    let single = render_with(&[
        "--set",
        "replicas=1",
        "--set",
        "leaderElection.enabled=false",
    ])?;
    assert!(
        !single.contains(budget),
        "a budget for a single replica blocks every drain"
    );
    Ok(())
}

/// The operator container's arguments in a rendering of the chart.
fn operator_args(rendered: &str) -> anyhow::Result<Vec<String>> {
    for document in serde_yaml::Deserializer::from_str(rendered) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.get("kind").and_then(serde_yaml::Value::as_str) != Some("Deployment") {
            continue;
        }
        let deployment: Deployment = serde_yaml::from_value(value)?;
        let container = deployment
            .spec
            .and_then(|spec| spec.template.spec)
            .and_then(|pod| pod.containers.into_iter().next())
            .context("the Deployment has a container")?;
        return container.args.context("the operator container has args");
    }
    bail!("the chart renders no Deployment")
}

/// Every flag the chart passes is one the operator takes, with a value it
/// accepts: the operator binary itself parses them (`--help` last, so it
/// exits once they parsed instead of running).
#[test]
fn the_operator_accepts_every_argument_the_chart_passes() -> anyhow::Result<()> {
    let operator = std::env::var(civicgrid_tests::operator::BIN_ENV).with_context(|| {
        format!(
            "{} is not set: build the operator binary (scripts/test.sh does)",
            civicgrid_tests::operator::BIN_ENV
        )
    })?;
    let defaults = operator_args(&render()?)?;
    let set = operator_args(&render_with(&[
        "--set",
        "readinessPollSeconds=0.5,heartbeatSeconds=2,maxEvictionsPerMinute=40,memberFailureThreshold=5,dependencies.secrets=true",
    ])?)?;
    ensure!(
        defaults.contains(&"--readiness-poll-seconds=30".to_owned()),
        "the default readiness poll reaches the operator: {defaults:?}"
    );
    ensure!(
        set.contains(&"--readiness-poll-seconds=0.5".to_owned())
            && set.contains(&"--heartbeat-seconds=2".to_owned())
            && set.contains(&"--max-evictions-per-minute=40".to_owned())
            && set.contains(&"--member-failure-threshold=5".to_owned())
            && set.contains(&"--secret-dependencies".to_owned()),
        "the values set reach the operator: {set:?}"
    );
    for args in [defaults, set] {
        let out = Command::new(&operator)
            .args(&args)
            .arg("--help")
            .output()
            .with_context(|| format!("running {operator}"))?;
        ensure!(
            out.status.success(),
            "the operator refuses the chart's arguments {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Applies every document of `yaml` with server-side apply, resolving each
/// kind through discovery.
async fn apply_all(client: &Client, yaml: &str) -> anyhow::Result<()> {
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_yaml::from_value(value)?;
        let types = object.types.clone().context("apiVersion and kind")?;
        let gvk = kube::core::GroupVersionKind::try_from(&types)?;
        let (resource, capabilities) =
            eventually(&format!("discovery of {}", gvk.kind), WAIT, || async {
                discovery::pinned_kind(client, &gvk).await.ok()
            })
            .await?;
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(client.clone(), NAMESPACE, &resource),
        };
        api.patch(
            &object.name_any(),
            &PatchParams::apply("helm-chart-test"),
            &Patch::Apply(&object),
        )
        .await
        .with_context(|| format!("applying {} {}", gvk.kind, object.name_any()))?;
    }
    Ok(())
}

use serde::Deserialize as _;

/// A client of `cluster` that authenticates as the chart's ServiceAccount.
async fn as_service_account(admin: &Client, kubeconfig_yaml: &str) -> anyhow::Result<Client> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request("civicgrid-operator", &PostParams::default(), &request)
        .await?
        .status
        .context("token status")?
        .token;
    let kubeconfig = Kubeconfig::from_yaml(kubeconfig_yaml)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info = AuthInfo {
        token: Some(token.into()),
        ..AuthInfo::default()
    };
    Ok(Client::try_from(config)?)
}

#[tokio::test]
async fn chart_applies_and_its_service_account_runs_the_operator_with_least_privilege()
-> anyhow::Result<()> {
    let clusters = start_clusters(&["control", "member"]).await?;
    let (control, member) = (&clusters[0], &clusters[1]);
    let admin = control.client().await?;
    control.add_nodes("node", 1, &NodeShape::default()).await?;
    member.add_nodes("node", 1, &NodeShape::default()).await?;
    pool::create_namespaces(&admin, &["traffic", "elsewhere"]).await?;
    let rendered = std::fs::read_to_string(repo_root().join("charts/rendered/civicgrid.yaml"))?;
    apply_all(&admin, &rendered).await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NAMESPACE);
    eventually(
        "the chart's Deployment Available (simulated pods)",
        WAIT,
        || async {
            let d = deployments.get("civicgrid-operator").await.ok()?;
            (d.status?.available_replicas? == 2).then_some(())
        },
    )
    .await?;

    // The member's kubeconfig where the chart lets the operator read it.
    pool::kubeconfig_secret(&admin, "member", member.kubeconfig_yaml()).await?;
    let operator_client = as_service_account(&admin, control.kubeconfig_yaml()).await?;

    // Least privilege: no Secrets outside its namespace.
    match Api::<Secret>::namespaced(operator_client.clone(), "elsewhere")
        .list(&Default::default())
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => bail!("expected 403 listing Secrets elsewhere, got {other:?}"),
    }

    let config = controller::Config {
        heartbeat: Duration::from_millis(500),
        member_timeout: Duration::from_secs(2),
        readiness_poll: Duration::from_millis(300),
        instance: "chart-test".into(),
        leader_election: Some(LeaseConfig::with_duration(
            NAMESPACE.into(),
            "civicgrid-operator".into(),
            "chart-test".into(),
            Duration::from_secs(15),
        )),
        metrics: Default::default(),
        // Revoking its right to the Secret (below) must show within a
        // second, and must not look like a lost member.
        member_secret_reread: Duration::from_secs(1),
        failure_threshold: 1000,
        ..controller::Config::default()
    };
    let operator = tokio::spawn(controller::run(
        operator_client,
        config,
        Box::pin(futures::future::pending()),
    ));

    let dc: DataCenter = serde_json::from_value(serde_json::json!({
        "apiVersion": "civicgrid.io/v1alpha1", "kind": "DataCenter",
        "metadata": { "name": "edge-east" },
        "spec": { "tier": "edge", "region": "city", "zone": "east-1",
                  "kubeconfigSecretRef": { "name": "member", "namespace": NAMESPACE } }
    }))?;
    Api::<DataCenter>::all(admin.clone())
        .create(&PostParams::default(), &dc)
        .await?;
    let data_centers: Api<DataCenter> = Api::all(admin.clone());
    eventually("DataCenter Ready under the chart's RBAC", WAIT, || async {
        let dc = data_centers.get("edge-east").await.ok()?;
        dc.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await?;
    let cw: ComputeWorkload = serde_json::from_value(serde_json::json!({
        "apiVersion": "civicgrid.io/v1alpha1", "kind": "ComputeWorkload",
        "metadata": { "name": "cams", "namespace": "traffic" },
        "spec": { "kind": "Deployment", "replicas": 2,
                  "template": { "spec": { "containers": [{ "name": "c", "image": "c:1" }] } },
                  "resources": { "cpu": "1", "memory": "1Gi" } }
    }))?;
    let workloads: Api<ComputeWorkload> = Api::namespaced(admin.clone(), "traffic");
    workloads.create(&PostParams::default(), &cw).await?;
    let in_member: Api<Deployment> = Api::namespaced(member.client().await?, "traffic");
    eventually(
        "the workload propagated by the chart's ServiceAccount",
        WAIT,
        || async {
            let d = in_member.get_opt("cams").await.ok()??;
            (d.spec?.replicas? == 2).then_some(())
        },
    )
    .await?;
    eventually(
        "status, finalizer and Events written under the chart's RBAC",
        WAIT,
        || async {
            let cw = workloads.get("cams").await.ok()?;
            let available = cw
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Available" && c.status == "True");
            (available
                && cw
                    .metadata
                    .finalizers?
                    .contains(&controller::FINALIZER.to_owned()))
            .then_some(())
        },
    )
    .await?;

    // Taking away the chart's binding to the member Secrets takes the
    // operator's access to the member away, as deleting the Secret does:
    // the API server refuses it the Secret (403), it drops the client it
    // had, and changes nothing more in the member with old credentials.
    let revoked_at = k8s_openapi::jiff::Timestamp::now();
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(admin.clone(), NAMESPACE);
    bindings
        .delete("civicgrid-operator-member-secrets", &Default::default())
        .await?;
    eventually("edge-east's probe refused its Secret", WAIT, || async {
        let dc = data_centers.get("edge-east").await.ok()?;
        dc.status?
            .conditions
            .iter()
            .any(|c| {
                c.type_ == "Reachable"
                    && c.reason == "MissedProbes"
                    && c.message.contains("may not read Secret")
            })
            .then_some(())
    })
    .await?;
    workloads
        .patch(
            "cams",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": 3 } })),
        )
        .await?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(admin.clone(), "traffic");
    eventually(
        "the scale-up failing to propagate for want of the member",
        WAIT,
        || async {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("PropagationFailed")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("cams")
                        && e.event_time.as_ref().is_some_and(|t| t.0 > revoked_at)
                })
                .then_some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replicas = in_member.get("cams").await?.spec.and_then(|s| s.replicas);
    assert_eq!(
        replicas,
        Some(2),
        "the operator changed a member whose Secret it may no longer read"
    );
    operator.abort();
    Ok(())
}

/// Runner pools render as ComputeWorkloads that the placement engine puts
/// only in data centers holding their dataset, explaining every other
/// (checked with the offline planner over the sample city's data centers).
#[test]
fn runner_pools_land_only_where_their_dataset_is() -> anyhow::Result<()> {
    let rendered = render_with(&[
        "--set-json",
        r#"runners.pools=[{"name":"population","dataset":"population-register","replicas":2},{"name":"traffic","dataset":"traffic-video","replicas":3,"tolerations":[{"key":"edge-only","operator":"Exists"}]}]"#,
        "--set",
        "runners.directory=https://marketplace.civicgrid.internal:7444",
        "--show-only",
        "templates/runner-pools.yaml",
    ])?;
    for expected in [
        "name: runner-population",
        "required: [population-register]",
        "required: [traffic-video]",
        "fieldPath: \"metadata.labels['civicgrid.io/data-center']\"",
        "--directory=https://marketplace.civicgrid.internal:7444",
        "--advertise=https://$(POD_IP):7443",
        "type: Duplicated",
        "--data-dir=/var/lib/civicgrid/products-root",
    ] {
        anyhow::ensure!(rendered.contains(expected), "{expected} in:\n{rendered}");
    }
    // With the data centers' object stores, each member cluster's Secret
    // configures its runners; no product volume is mounted.
    let with_stores = render_with(&[
        "--set-json",
        r#"runners.pools=[{"name":"population","dataset":"population-register"}]"#,
        "--set",
        "runners.objectStoreSecret=civicgrid-runner-store",
        "--show-only",
        "templates/runner-pools.yaml",
    ])?;
    anyhow::ensure!(
        with_stores
            .contains("envFrom:\n        - secretRef:\n            name: civicgrid-runner-store"),
        "the store's Secret in:\n{with_stores}"
    );
    for absent in ["--data-dir", "name: products", "claimName"] {
        anyhow::ensure!(!with_stores.contains(absent), "{absent} in:\n{with_stores}");
    }
    // With no pools, the template renders nothing.
    anyhow::ensure!(!render()?.contains("runner-"), "pools rendered by default");

    let dir = tempfile::tempdir()?;
    std::fs::copy(
        repo_root().join("examples/city/datacenters.yaml"),
        dir.path().join("datacenters.yaml"),
    )?;
    std::fs::write(dir.path().join("runners.yaml"), &rendered)?;
    let plan = civicgrid_operator::plan::run(
        dir.path(),
        civicgrid_operator::plan::Format::Json,
        1_790_000_000,
        true,
    )?;
    let plan: serde_json::Value = serde_json::from_str(&plan)?;
    let decisions = plan["decisions"].as_array().context("decisions")?;
    let datacenters = std::fs::read_to_string(dir.path().join("datacenters.yaml"))?;
    let holders = |dataset: &str| -> Vec<String> {
        serde_yaml::Deserializer::from_str(&datacenters)
            .filter_map(|document| serde_yaml::Value::deserialize(document).ok())
            .filter(|dc| {
                dc["spec"]["datasets"]
                    .as_sequence()
                    .is_some_and(|sets| sets.iter().any(|set| set.as_str() == Some(dataset)))
            })
            .filter_map(|dc| dc["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    for (pool, dataset) in [
        ("runner-population", "population-register"),
        ("runner-traffic", "traffic-video"),
    ] {
        let decision = decisions
            .iter()
            .find(|d| d["workload"]["name"] == pool)
            .with_context(|| format!("{pool} planned"))?;
        let placed: Vec<&String> = decision["placement"]
            .as_object()
            .context("a placement")?
            .keys()
            .collect();
        let holding = holders(dataset);
        anyhow::ensure!(!placed.is_empty(), "{pool} placed nowhere: {decision}");
        for data_center in &placed {
            anyhow::ensure!(
                holding.contains(data_center),
                "{pool} placed in {data_center}, which does not hold {dataset}"
            );
        }
        // And in every one that holds it (tolerations permitting): each
        // copy of the data has runners of its own.
        if pool == "runner-population" {
            let mut placed: Vec<String> = placed.iter().map(|dc| (*dc).clone()).collect();
            placed.sort();
            let mut holding = holding.clone();
            holding.sort();
            anyhow::ensure!(
                placed == holding,
                "{pool}: placed {placed:?}, held by {holding:?}"
            );
        }
        // Every data center without the dataset is rejected for it, by the
        // data-affinity rule.
        for rejection in decision["rejections"].as_array().context("rejections")? {
            let data_center = rejection["dataCenter"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !holding.contains(&data_center) {
                anyhow::ensure!(
                    rejection["rule"] == "Dataset",
                    "{pool}: {data_center} rejected by {} instead of data affinity",
                    rejection["rule"]
                );
            }
        }
    }
    Ok(())
}

/// helm installs the operator alone on a real API server, then upgrades the
/// same release to the whole stack (charts/examples/city-values.yaml): the
/// marketplace's Deployment becomes available (simulated pods) with its
/// Services and disruption budget, the bundled PostgreSQL and the runner
/// pool appear; a further upgrade scales the marketplace, and a rollback
/// returns it.
#[tokio::test]
async fn helm_installs_the_operator_then_upgrades_the_release_to_the_whole_stack()
-> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;

    let clusters = start_clusters(&["control"]).await?;
    let control = &clusters[0];
    control.add_nodes("node", 2, &NodeShape::default()).await?;
    let admin = control.client().await?;
    let scratch = tempfile::tempdir()?;
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(&kubeconfig, control.kubeconfig_yaml())?;
    let kubeconfig = kubeconfig.display().to_string();
    // The harness's API server, built from source without release flags,
    // reports version v0.0.0-master, which the chart's kubeVersion
    // (>= 1.30) refuses: install a copy without that one line.
    let chart = scratch.path().join("civicgrid");
    copy_dir(&repo_root().join("charts/civicgrid"), &chart)?;
    let metadata = std::fs::read_to_string(chart.join("Chart.yaml"))?;
    std::fs::write(
        chart.join("Chart.yaml"),
        metadata
            .lines()
            .filter(|line| !line.starts_with("kubeVersion:"))
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let chart = chart.display().to_string();
    let release = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "civicgrid",
            &chart,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            &kubeconfig,
        ]);
        helm(&all)
    };
    release(&["install", "--create-namespace"])?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NAMESPACE);
    let available = |name: &'static str, replicas: i32| {
        let deployments = deployments.clone();
        async move {
            eventually(
                &format!("{name} available with {replicas} replicas"),
                WAIT,
                || async {
                    let d = deployments.get(name).await.ok()?;
                    let ready =
                        d.status?.available_replicas? == replicas && d.spec?.replicas? == replicas;
                    ready.then_some(())
                },
            )
            .await
        }
    };
    available("civicgrid-operator", 2).await?;
    ensure!(
        deployments
            .get_opt("civicgrid-marketplace")
            .await?
            .is_none(),
        "the operator alone, by default"
    );

    release(&["upgrade", "-f", "charts/examples/city-values.yaml"])?;
    available("civicgrid-marketplace", 2).await?;
    let services: Api<Service> = Api::namespaced(admin.clone(), NAMESPACE);
    let ports_of = async |name: &str| -> anyhow::Result<Vec<(String, i32)>> {
        Ok(services
            .get(name)
            .await?
            .spec
            .and_then(|spec| spec.ports)
            .unwrap_or_default()
            .into_iter()
            .map(|port| (port.name.unwrap_or_default(), port.port))
            .collect())
    };
    let ports = ports_of("civicgrid-marketplace").await?;
    assert_eq!(ports, [("grpc".to_owned(), 50051)]);
    let runners = ports_of("civicgrid-marketplace-runners").await?;
    assert_eq!(
        runners,
        [("runners".to_owned(), 7443)],
        "the directory apart"
    );
    ensure!(
        services
            .get_opt("civicgrid-marketplace-metrics")
            .await?
            .is_some()
            && services.get_opt("civicgrid-postgres").await?.is_some(),
        "the metrics and database Services"
    );
    let budget = Api::<PodDisruptionBudget>::namespaced(admin.clone(), NAMESPACE)
        .get("civicgrid-marketplace")
        .await?;
    assert_eq!(
        budget.spec.and_then(|spec| spec.max_unavailable),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    ensure!(
        Api::<StatefulSet>::namespaced(admin.clone(), NAMESPACE)
            .get_opt("civicgrid-postgres")
            .await?
            .is_some(),
        "the bundled PostgreSQL"
    );
    ensure!(
        Api::<ComputeWorkload>::namespaced(admin.clone(), NAMESPACE)
            .get_opt("runner-population")
            .await?
            .is_some(),
        "the runner pool"
    );

    release(&[
        "upgrade",
        "--reuse-values",
        "--set",
        "marketplace.replicas=3",
    ])?;
    available("civicgrid-marketplace", 3).await?;
    helm(&[
        "rollback",
        "civicgrid",
        "2",
        "--namespace",
        NAMESPACE,
        "--kubeconfig",
        &kubeconfig,
    ])?;
    available("civicgrid-marketplace", 2).await?;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
