//! Compute goes to the data, end to end: a control plane and two member
//! clusters (kwok nodes), an S3-compatible store per data center, the
//! operator placing the chart's runner pools by data affinity, and a real
//! `civicgrid-runner` process for every runner pod it placed, configured
//! from that pod's spec (see `civicgrid_tests::kubelet`). The marketplace
//! runs in this process with its runner directory.
//!
//! The city: `municipal-core` holds the population register; `edge-east`
//! holds it too (the seed's disaster-recovery copy) and the camera counts,
//! which exist nowhere else. What must hold:
//!
//! - runner pools land only where their dataset is: the camera pool in
//!   `edge-east` alone, the population pool in both;
//! - a query on the camera product runs in `edge-east` and answers; no
//!   runner of another data center ran anything for it;
//! - when `edge-east` is lost (its API server, runners and store gone), the
//!   population product keeps answering from `municipal-core`, and the
//!   camera product is refused as `UNAVAILABLE` naming `edge-east`, with
//!   nothing held or charged.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use arrow_array::cast::AsArray as _;
use arrow_array::types::Int64Type;
use civicgrid_marketplace::grpc::runners::{RunnerDirectory, serve_directory};
use civicgrid_marketplace::proto::{self as api, queries_client::QueriesClient};
use civicgrid_marketplace::queries::{EngineConfig, QueryEngine};
use civicgrid_operator::crd::{ComputeWorkload, DataCenter};
use civicgrid_tests::controlplane::{NodeShape, eventually};
use civicgrid_tests::kubelet::RunnerPods;
use civicgrid_tests::market::{
    Cast, Db, SAMPLE_ROWS, TestMarket, authed, publish_spec, sample_spec,
};
use civicgrid_tests::objectstore::ObjectStoreServer;
use civicgrid_tests::operator::{OperatorOptions, OperatorProcess};
use civicgrid_tests::pool::{self, Member};
use civicgrid_tests::runners::Authority;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const CORE: &str = "municipal-core";
const EDGE: &str = "edge-east";
const NAMESPACE: &str = "civicgrid-runners";
const BUCKET: &str = "products";
/// Rows in the camera product (the population has `SAMPLE_ROWS`).
const CAMERA_ROWS: usize = 600;
const WAIT: Duration = Duration::from_secs(90);
const MEMBERS: [Member; 2] = [
    Member {
        name: CORE,
        tier: "municipal",
        region: "city",
        zone: "core-a",
    },
    Member {
        name: EDGE,
        tier: "edge",
        region: "city",
        zone: "east-1",
    },
];

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let helm = std::env::var("CIVICGRID_HELM").context(
        "CIVICGRID_HELM is not set: run `bash tools/helm/build.sh` (scripts/test.sh does)",
    )?;
    let out = std::process::Command::new(&helm)
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The chart's runner pools, as a platform engineer would install them.
fn runner_pools(directory: &str) -> anyhow::Result<Vec<ComputeWorkload>> {
    let rendered = helm(&[
        "template",
        "civicgrid",
        "charts/civicgrid",
        "--namespace",
        NAMESPACE,
        "--kube-version",
        "1.35.0",
        "--set-json",
        r#"runners.pools=[{"name":"population","dataset":"population-register","replicas":1,"cpu":"1","memory":"1Gi"},{"name":"cameras","dataset":"camera-counts","replicas":1,"cpu":"1","memory":"1Gi"}]"#,
        "--set",
        &format!("runners.directory={directory}"),
        "--set",
        "runners.objectStoreSecret=civicgrid-runner-store",
        "--show-only",
        "templates/runner-pools.yaml",
    ])?;
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(&rendered)
        .map(|document| Ok(ComputeWorkload::deserialize(document)?))
        .collect()
}

fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(key, value)| ((*key).to_owned(), ByteString(value.to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// In a member cluster: the runners' namespace, their TLS Secret (the data
/// center's runner certificate) and the Secret naming the data center's
/// own store.
async fn member_secrets(
    client: &kube::Client,
    authority: &Authority,
    data_center: &str,
    store: &ObjectStoreServer,
) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    if namespaces.get_opt(NAMESPACE).await?.is_none() {
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
    }
    let (cert, key) = authority.both_ways(&civicgrid_runner::certificate_name(data_center))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    secrets
        .create(
            &PostParams::default(),
            &secret(
                "civicgrid-runner-tls",
                &[
                    ("tls.crt", cert.as_bytes()),
                    ("tls.key", key.as_bytes()),
                    ("ca.crt", authority.ca.as_bytes()),
                ],
            ),
        )
        .await?;
    let mut store_env: Vec<(String, String)> = store
        .environment()
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    store_env.push((
        "CIVICGRID_OBJECT_STORE".to_owned(),
        format!("s3://{BUCKET}"),
    ));
    let data: Vec<(&str, &[u8])> = store_env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_bytes()))
        .collect();
    secrets
        .create(
            &PostParams::default(),
            &secret("civicgrid-runner-store", &data),
        )
        .await?;
    Ok(())
}

/// Counts residents by district on `product` as acme's analyst: the
/// summary and the people counted in all districts, or the status.
async fn ask(
    queries: &mut QueriesClient<tonic::transport::Channel>,
    token: &str,
    product: &str,
    key: &str,
) -> Result<(api::QuerySummary, i64), tonic::Status> {
    let mut stream = queries
        .run_query(authed(
            token,
            api::RunQueryRequest {
                product_id: product.into(),
                sql: "SELECT district, COUNT(*) AS people FROM residents GROUP BY district".into(),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    let mut summary = None;
    let mut ipc = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.message {
            Some(api::run_query_response::Message::Summary(s)) => summary = Some(s),
            Some(api::run_query_response::Message::ArrowIpc(bytes)) => ipc.extend(bytes),
            None => {}
        }
    }
    let summary = summary.ok_or_else(|| tonic::Status::internal("no summary"))?;
    let mut people = 0;
    if !ipc.is_empty() {
        let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .map_err(|error| tonic::Status::internal(error.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|error| tonic::Status::internal(error.to_string()))?;
            people += batch
                .column(1)
                .as_primitive::<Int64Type>()
                .iter()
                .flatten()
                .sum::<i64>();
        }
    }
    Ok((summary, people))
}

/// Runs finished by each runner pod of `data_center`, by pod.
async fn runs_by_pod(
    pods: &RunnerPods,
    data_center: &str,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut runs = BTreeMap::new();
    for pod in pods.in_data_center(data_center) {
        let metrics = pod.metrics.context("the pod serves metrics")?;
        runs.insert(pod.pod.clone(), runs_finished(metrics).await?);
    }
    Ok(runs)
}

/// Runs finished by the runner behind `metrics` (its Prometheus text).
async fn runs_finished(metrics: std::net::SocketAddr) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(metrics).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: runner\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("civicgrid_runner_runs_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_pools_run_next_to_their_data_and_a_lost_data_center_is_survived()
-> anyhow::Result<()> {
    // Each data center's own store, with its own copy of what it holds.
    let stores: BTreeMap<&str, ObjectStoreServer> = [
        (CORE, ObjectStoreServer::start(&[BUCKET]).await?),
        (EDGE, ObjectStoreServer::start(&[BUCKET]).await?),
    ]
    .into_iter()
    .collect();
    let sample = tempfile::tempdir()?;
    civicgrid_marketplace::quality::write_sample_population(sample.path(), SAMPLE_ROWS)?;
    stores[CORE]
        .upload_folder(BUCKET, "products/population", sample.path())
        .await?;
    stores[EDGE]
        .upload_folder(BUCKET, "products/population", sample.path())
        .await?;
    // Other rows for the cameras, so an answer tells which folder it read.
    let camera_counts = tempfile::tempdir()?;
    civicgrid_marketplace::quality::write_sample_population(camera_counts.path(), CAMERA_ROWS)?;
    stores[EDGE]
        .upload_folder(BUCKET, "products/cameras", camera_counts.path())
        .await?;

    // The pool and the operator; the data centers say what they hold.
    let shape = NodeShape {
        cpu: "8".into(),
        memory: "32Gi".into(),
        ..NodeShape::default()
    };
    let mut city = pool::Pool::start(&MEMBERS, 1, &shape, &[NAMESPACE]).await?;
    let _operator = OperatorProcess::start(&city.control, &OperatorOptions::e2e("runners"))?;
    let data_centers: Api<DataCenter> = Api::all(city.client.clone());
    for (name, datasets) in [
        (CORE, vec!["population-register"]),
        (EDGE, vec!["population-register", "camera-counts"]),
    ] {
        data_centers
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "datasets": datasets } })),
            )
            .await?;
    }
    city.wait_ready().await?;

    // The marketplace, with its runner directory; it keeps no product data.
    let market = TestMarket::start(Db::Sqlite).await?;
    let guest = civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm");
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let engine =
        tokio::task::spawn_blocking(move || QueryEngine::open(EngineConfig::new(guest, cache)))
            .await??;
    market.market.attach_engine(engine)?;
    std::fs::remove_dir_all(market.market.data_dir().join("products/population"))?;
    let authority = Authority::new("civicgrid e2e runners")?;
    let directory_identity = authority.both_ways(civicgrid_runner::MARKETPLACE_NAME)?;
    let directory = RunnerDirectory::new(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&authority.ca))
            .identity(Identity::from_pem(
                &directory_identity.0,
                &directory_identity.1,
            )),
        Duration::from_secs(3),
    );
    market.market.attach_runners(directory.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let directory_address = listener.local_addr()?;
    let (_stop_directory, directory_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_directory(
        directory.clone(),
        listener,
        civicgrid_runner::mutual_tls(&directory_identity.0, &directory_identity.1, &authority.ca),
        async {
            let _ = directory_stopped.await;
        },
    ));

    // Each member cluster's Secrets, then the chart's pools.
    for (name, member) in &city.members {
        member_secrets(
            &member.client().await?,
            &authority,
            name,
            &stores[name.as_str()],
        )
        .await?;
    }
    let workloads: Api<ComputeWorkload> = Api::namespaced(city.client.clone(), NAMESPACE);
    for workload in runner_pools(&format!("https://{directory_address}"))? {
        workloads.create(&PostParams::default(), &workload).await?;
    }

    // The operator places them: cameras only where the camera counts are.
    let mut copies = BTreeMap::new();
    for (name, member) in &city.members {
        copies.insert(
            name.clone(),
            Api::<Deployment>::namespaced(member.client().await?, NAMESPACE),
        );
    }
    eventually("runner pools placed", WAIT, || async {
        let population_core = copies[CORE].get_opt("runner-population").await.ok()??;
        let population_edge = copies[EDGE].get_opt("runner-population").await.ok()??;
        let cameras_edge = copies[EDGE].get_opt("runner-cameras").await.ok()??;
        Some((population_core, population_edge, cameras_edge))
    })
    .await?;
    anyhow::ensure!(
        copies[CORE].get_opt("runner-cameras").await?.is_none(),
        "the camera pool landed in {CORE}, which does not hold camera-counts"
    );

    // A runner process for every runner pod, as the pods come up (the
    // first may compile the SQL guest: minutes, on a cold cache).
    let mut pods = RunnerPods::new()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    loop {
        for (name, member) in &city.members {
            pods.sync(name, &member.client().await?, NAMESPACE).await?;
        }
        if directory.ready_runners(CORE) >= 1 && directory.ready_runners(EDGE) >= 2 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "runners not ready: {} in {CORE}, {} in {EDGE}; edge logs: {:?}",
            directory.ready_runners(CORE),
            directory.ready_runners(EDGE),
            pods.in_data_center(EDGE)
                .iter()
                .map(|pod| pod.log_tail())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(pods.in_data_center(CORE).len(), 1);
    assert_eq!(pods.in_data_center(EDGE).len(), 2);

    // Two products: the population in both data centers, the cameras at
    // the edge only. Registration measures each on a runner.
    let cast = Cast::create(&market).await?;
    let mut population = sample_spec();
    population.hosting_data_centers = vec![CORE.into(), EDGE.into()];
    publish_spec(&market, &cast, "population", population.clone()).await?;
    let mut cameras = population;
    cameras.hosting_data_centers = vec![EDGE.into()];
    cameras.storage_location = "products/cameras".into();
    publish_spec(&market, &cast, "cameras", cameras).await?;
    for product in ["population", "cameras"] {
        civicgrid_tests::market::approved_contract(&market, &cast, product).await?;
    }
    civicgrid_tests::market::deposit(&market, 100_000).await?;
    let mut queries = QueriesClient::new(market.channel.clone());
    let analyst = cast.consumer_analyst.clone();

    // The camera product runs at the edge and answers from its own rows;
    // exactly one edge runner ran it, the core's ran nothing, and only the
    // edge store served the camera files.
    let core_before = runs_by_pod(&pods, CORE).await?;
    let edge_before = runs_by_pod(&pods, EDGE).await?;
    let (summary, people) = ask(&mut queries, &analyst, "cameras", "cameras-1").await?;
    assert_eq!(summary.state, "completed", "{summary:?}");
    assert_eq!(summary.data_center, EDGE);
    assert_eq!(people, CAMERA_ROWS as i64);
    assert_eq!(runs_by_pod(&pods, CORE).await?, core_before);
    let edge_after = runs_by_pod(&pods, EDGE).await?;
    let edge_runs: f64 = edge_after.values().sum::<f64>() - edge_before.values().sum::<f64>();
    assert_eq!(edge_runs, 1.0, "{edge_before:?} -> {edge_after:?}");
    let camera_reads = |store: &ObjectStoreServer| -> anyhow::Result<usize> {
        Ok(store
            .access_log()?
            .iter()
            .filter(|line| line.contains(" s3_GetObject products/cameras/"))
            .count())
    };
    assert!(camera_reads(&stores[EDGE])? > 0);
    assert_eq!(camera_reads(&stores[CORE])?, 0);

    // The population product answers from either data center, with its own
    // rows; until it has run in both.
    let mut ran_in = std::collections::BTreeSet::new();
    for i in 0..12 {
        let (summary, people) = ask(
            &mut queries,
            &analyst,
            "population",
            &format!("population-{i}"),
        )
        .await?;
        assert_eq!(summary.state, "completed", "{summary:?}");
        assert_eq!(people, SAMPLE_ROWS as i64);
        ran_in.insert(summary.data_center);
        if ran_in.len() == 2 {
            break;
        }
    }
    assert_eq!(ran_in.len(), 2, "the population ran only in {ran_in:?}");

    // The edge's runner pods are deleted: until their replacements serve,
    // a camera query is refused at once as unavailable, naming the edge.
    let edge_client = city.members[EDGE].client().await?;
    let edge_pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(edge_client.clone(), NAMESPACE);
    edge_pods
        .delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default().labels("app.kubernetes.io/name=civicgrid-runner"),
        )
        .await?;
    pods.reap(EDGE, &edge_client, NAMESPACE).await?;
    assert!(pods.in_data_center(EDGE).is_empty());
    let asked = std::time::Instant::now();
    let refused = ask(&mut queries, &analyst, "cameras", "cameras-pods-deleted")
        .await
        .expect_err("no edge runner is left");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.message(),
        "no runner in edge-east took the query; retry later"
    );
    // Their replacements come up, and the camera product answers again.
    let deadline = tokio::time::Instant::now() + WAIT;
    while directory.ready_runners(EDGE) < 2 || pods.in_data_center(EDGE).len() < 2 {
        pods.sync(EDGE, &edge_client, NAMESPACE).await?;
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the edge's runner pods did not come back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (summary, people) = ask(&mut queries, &analyst, "cameras", "cameras-2").await?;
    assert_eq!(
        (summary.state.as_str(), people),
        ("completed", CAMERA_ROWS as i64)
    );

    let before_loss = civicgrid_tests::market::acme_balance(&market, &cast).await?;

    // The edge data center is lost: its API server, its runners, its
    // store. New queries on the population go to the core at once (the
    // edge's runners are still listed, and each that does not answer is
    // passed over); the cameras are refused, uncharged.
    city.members
        .get_mut(EDGE)
        .context("the edge member")?
        .stop_apiserver();
    pods.lose(EDGE);
    let mut stores = stores;
    stores.get_mut(EDGE).context("the edge store")?.stop();
    assert!(
        directory.ready_runners(EDGE) > 0,
        "the edge's runners are still listed"
    );
    let mut population_charges = 0;
    for i in 0..3 {
        let (summary, people) = ask(
            &mut queries,
            &analyst,
            "population",
            &format!("after-loss-{i}"),
        )
        .await?;
        assert_eq!(summary.state, "completed", "{summary:?}");
        assert_eq!(summary.data_center, CORE, "{summary:?}");
        assert_eq!(people, SAMPLE_ROWS as i64);
        population_charges += summary.charge_minor;
    }
    let refused = ask(&mut queries, &analyst, "cameras", "cameras-after-loss")
        .await
        .expect_err("no data center holding the camera counts is left");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(EDGE), "{}", refused.message());
    let after_loss = civicgrid_tests::market::acme_balance(&market, &cast).await?;
    assert_eq!(after_loss.1, 0, "nothing is held");
    assert_eq!(
        after_loss.0,
        before_loss.0 - population_charges,
        "the refused camera query is not charged"
    );
    Ok(())
}
