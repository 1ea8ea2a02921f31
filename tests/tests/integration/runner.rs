//! The runner as the marketplace reaches it: an in-process
//! `civicgrid-runner` service over mutual TLS, with a product's files in its
//! data directory and the real SQL guest. Who attacks it, and what must
//! hold:
//!
//! - anyone on the network without the marketplace's client certificate
//!   (none, or one from another CA): refused at the handshake, before any
//!   request is read;
//! - a marketplace that dialled the wrong data center: the runner's
//!   certificate names its data center, so the handshake fails;
//! - a request naming a folder outside the runner's data directory (a
//!   climb, an absolute path, a link): refused before anything is read;
//! - a query the product's policy does not allow (a blocked column, a
//!   group under the threshold): refused or withheld by the runner itself,
//!   exactly as the marketplace's own sandbox would;
//! - limits beyond the runner's ceilings: refused by name.

use std::net::SocketAddr;

use anyhow::Context as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::cast::AsArray as _;
use arrow_array::types::Int64Type;
use civicgrid_runner::proto::runner_client::RunnerClient;
use civicgrid_runner::proto::{self, run_reply};
use civicgrid_runner::{Ceilings, RunnerService};
use civicgrid_sandbox::{FUEL_PER_COMPUTE_UNIT, GuestRole, SandboxError};
use civicgrid_tests::runners::Authority;
use civicgrid_tests::sandbox::{
    residents_aggregate_policy, sandbox_with, sql_guest, write_residents,
};
use rcgen::ExtendedKeyUsagePurpose;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const EDGE: &str = "edge-1.runner.civicgrid";
const CORE: &str = "core.runner.civicgrid";

/// A CA for the marketplace and its runners, the edge runner's and the
/// core runner's certificates, the marketplace's client certificate, and a
/// client certificate from a CA nobody trusts.
struct Pki {
    ca: String,
    edge: (String, String),
    core: (String, String),
    marketplace: (String, String),
    rogue: (String, String),
    municipal: (String, String),
    directory: (String, String),
}

const MUNICIPAL: &str = "municipal-core.runner.civicgrid";
const DIRECTORY: &str = "directory.marketplace.civicgrid";

impl Pki {
    fn generate() -> anyhow::Result<Self> {
        let authority = Authority::new("civicgrid-test-runner-ca")?;
        let rogue = Authority::new("rogue-ca")?;
        let client = [ExtendedKeyUsagePurpose::ClientAuth];
        Ok(Self {
            ca: authority.ca.clone(),
            edge: authority.both_ways(EDGE)?,
            core: authority.both_ways(CORE)?,
            marketplace: authority.issue(DIRECTORY, &client)?,
            rogue: rogue.issue("intruder", &client)?,
            municipal: authority.both_ways(MUNICIPAL)?,
            directory: authority.both_ways(DIRECTORY)?,
        })
    }
}

/// A runner serving `data_dir` as `identity`, until the test ends.
struct Runner {
    address: SocketAddr,
    metrics: Arc<civicgrid_runner::Metrics>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_runner(
    data_dir: &Path,
    identity: &(String, String),
    pki: &Pki,
) -> anyhow::Result<Runner> {
    let sandbox = sandbox_with(|config| config.max_concurrent_runs = 4);
    let guest = sandbox.load(&sql_guest(), GuestRole::Sql)?;
    let service = Arc::new(RunnerService::new(
        Arc::new(sandbox),
        guest,
        data_dir.to_owned(),
        Ceilings {
            memory_bytes: 2 << 30,
            wall_time: Duration::from_secs(60),
        },
    ));
    let metrics = Arc::clone(service.metrics());
    let tls = civicgrid_runner::mutual_tls(&identity.0, &identity.1, &pki.ca);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(civicgrid_runner::serve(service, listener, tls, async {
        let _ = stopped.await;
    }));
    Ok(Runner {
        address,
        metrics,
        _stop: stop,
    })
}

async fn client(
    runner: &Runner,
    ca: &str,
    identity: Option<&(String, String)>,
    data_center: &str,
) -> anyhow::Result<RunnerClient<Channel>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(data_center);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", runner.address))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(RunnerClient::new(channel))
}

fn request(sql: &str) -> proto::RunRequest {
    proto::RunRequest {
        query_id: "q-test".into(),
        product_id: "population".into(),
        storage_location: "products/population".into(),
        tables: vec![
            proto::DeclaredTable {
                name: "residents".into(),
                columns: [
                    "district",
                    "age_band",
                    "household_size",
                    "income",
                    "person_id",
                ]
                .map(String::from)
                .to_vec(),
            },
            proto::DeclaredTable {
                name: "districts".into(),
                columns: vec!["name".into(), "area_km2".into()],
            },
        ],
        policy_json: serde_json::to_vec(&residents_aggregate_policy()).expect("policy JSON"),
        privacy_budget: 0.0,
        sql: sql.into(),
        algorithm_wasm: Vec::new(),
        as_of_unix_seconds: 1_796_000_000,
        limits: Some(proto::Limits {
            fuel: 2_000 * FUEL_PER_COMPUTE_UNIT,
            wall_time_ms: 30_000,
            memory_bytes: 512 << 20,
        }),
        version: None,
    }
}

/// A run's replies: the released IPC stream's bytes, and its last message.
async fn run(
    client: &mut RunnerClient<Channel>,
    request: proto::RunRequest,
) -> Result<(Vec<u8>, run_reply::Message), tonic::Status> {
    let mut stream = client.run(request).await?.into_inner();
    let mut ipc = Vec::new();
    let mut last = None;
    while let Some(reply) = stream.message().await? {
        match reply.message {
            Some(run_reply::Message::ArrowIpc(chunk)) => ipc.extend(chunk),
            Some(other) => last = Some(other),
            None => {}
        }
    }
    Ok((ipc, last.expect("a final message")))
}

fn product_dir() -> anyhow::Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    let product = root.path().join("products/population");
    std::fs::create_dir_all(&product)?;
    write_residents(&product)?;
    Ok(root)
}

#[tokio::test]
async fn a_runner_releases_only_what_the_policy_allows() -> anyhow::Result<()> {
    let pki = Pki::generate()?;
    let data = product_dir()?;
    let runner = start_runner(data.path(), &pki.edge, &pki).await?;
    let mut client = client(&runner, &pki.ca, Some(&pki.marketplace), EDGE).await?;

    let (ipc, last) = run(
        &mut client,
        request("SELECT district, COUNT(*) AS people FROM residents GROUP BY district"),
    )
    .await?;
    let run_reply::Message::Ran(ran) = last else {
        panic!("expected a completed run, got {last:?}");
    };
    let metering = ran.metering.expect("metering");
    assert!(
        metering.fuel > 0 && metering.rows_read == 2000,
        "{metering:?}"
    );
    let batches: Vec<_> =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)?
            .collect::<Result<_, _>>()?;
    let mut released: Vec<(String, i64)> = Vec::new();
    for batch in &batches {
        let names = batch.column(0).as_string::<i32>();
        let people = batch.column(1).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            released.push((names.value(row).to_owned(), people.value(row)));
        }
    }
    released.sort();
    // Harbour's three residents are under the threshold of ten: withheld.
    let districts: Vec<&str> = released.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        districts,
        ["Centre", "East", "Hills", "North", "River", "South", "West"]
    );
    assert_eq!(released.iter().map(|(_, n)| n).sum::<i64>(), 1997);
    assert_eq!(metering.rows_released, 7);

    // A blocked column: the runner's own policy refuses it, as the
    // marketplace's sandbox would, and the failure crosses as its kind.
    let (ipc, last) = run(&mut client, request("SELECT person_id FROM residents")).await?;
    assert!(ipc.is_empty(), "nothing is released");
    let run_reply::Message::Failed(failed) = last else {
        panic!("expected a refusal, got {last:?}");
    };
    let error = civicgrid_runner::wire::failure_from_proto(failed.error.expect("an error"));
    assert!(
        matches!(&error, SandboxError::Policy { .. }),
        "expected a policy refusal, got {error:?}"
    );

    // The runner's metrics count its runs and what they read: one run of
    // the 2,000 residents released, one refused by the policy before it
    // read anything, nothing in flight.
    let exposition = runner.metrics.encode();
    for line in [
        "civicgrid_runner_runs_total{outcome=\"ran\"} 1",
        "civicgrid_runner_runs_total{outcome=\"failed\"} 1",
        "civicgrid_runner_rows_read_total 2000",
        "civicgrid_runner_runs_in_flight 0",
        "civicgrid_runner_slots 4",
    ] {
        assert!(exposition.contains(line), "{line} in:\n{exposition}");
    }
    Ok(())
}

#[tokio::test]
async fn only_the_marketplace_reaches_a_runner_and_only_the_one_it_dialled() -> anyhow::Result<()> {
    let pki = Pki::generate()?;
    let data = product_dir()?;
    let runner = start_runner(data.path(), &pki.edge, &pki).await?;
    let sql = "SELECT district, COUNT(*) AS people FROM residents GROUP BY district";

    // No client certificate, or one from a CA the runner does not trust:
    // the call fails before the runner reads a request.
    for (who, identity) in [("no certificate", None), ("a rogue CA", Some(&pki.rogue))] {
        let outcome = match client(&runner, &pki.ca, identity, EDGE).await {
            Ok(mut client) => run(&mut client, request(sql)).await.map(|_| ()),
            Err(_) => Err(tonic::Status::unavailable("no connection")),
        };
        assert!(outcome.is_err(), "{who}: the runner answered");
    }

    // The marketplace dialled the edge data center's address expecting the
    // core's runner: the certificate names edge-1, so the handshake fails.
    let wrong = client(&runner, &pki.ca, Some(&pki.marketplace), CORE).await;
    let outcome = match wrong {
        Ok(mut client) => run(&mut client, request(sql)).await.map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("no connection")),
    };
    assert!(
        outcome.is_err(),
        "a runner answered under another data center's name"
    );

    // Another data center's runner, with a certificate from the same CA:
    // it may report to the directory, but a runner answers the marketplace
    // alone, so it cannot ask for the core's rows.
    let core = start_runner(data.path(), &pki.core, &pki).await?;
    let mut neighbour = client(&core, &pki.ca, Some(&pki.edge), CORE).await?;
    let mut open_policy = request("SELECT person_id, income FROM residents");
    open_policy.policy_json = b"{}".to_vec();
    let refused = run(&mut neighbour, open_policy)
        .await
        .expect_err("a runner answered another runner");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // A core runner answers the marketplace under its own name.
    let mut right = client(&core, &pki.ca, Some(&pki.marketplace), CORE).await?;
    let (_, last) = run(&mut right, request(sql)).await?;
    assert!(matches!(last, run_reply::Message::Ran(_)), "{last:?}");
    Ok(())
}

#[tokio::test]
async fn a_runner_reads_nothing_outside_its_data_directory() -> anyhow::Result<()> {
    let pki = Pki::generate()?;
    let outside = product_dir()?;
    let data = tempfile::tempdir()?;
    std::fs::create_dir_all(data.path().join("products"))?;
    std::os::unix::fs::symlink(
        outside.path().join("products/population"),
        data.path().join("products/linked"),
    )?;
    let runner = start_runner(data.path(), &pki.edge, &pki).await?;
    let mut client = client(&runner, &pki.ca, Some(&pki.marketplace), EDGE).await?;
    let sql = "SELECT district, COUNT(*) AS people FROM residents GROUP BY district";
    let climb = outside.path().join("products/population");
    for (location, why) in [
        (
            "../population",
            "a location may not climb out of the data directory (..)",
        ),
        (
            climb.to_str().expect("a UTF-8 path"),
            "an absolute path is outside the data directory",
        ),
        (
            "products/linked",
            "products/linked is reached through a link; name the folder itself",
        ),
        (
            "products/missing",
            "products/missing: no such folder in the data center's store",
        ),
    ] {
        let mut asked = request(sql);
        asked.storage_location = location.into();
        let status = run(&mut client, asked).await.expect_err(location);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{location}");
        assert!(
            status.message().contains(why),
            "{location}: {}",
            status.message()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_runner_refuses_bad_requests_by_field() -> anyhow::Result<()> {
    let pki = Pki::generate()?;
    let data = product_dir()?;
    let runner = start_runner(data.path(), &pki.edge, &pki).await?;
    let mut client = client(&runner, &pki.ca, Some(&pki.marketplace), EDGE).await?;
    let sql = "SELECT COUNT(*) FROM residents";
    type Break = Box<dyn Fn(&mut proto::RunRequest)>;
    let cases: Vec<(&str, Break)> = vec![
        ("product_id", Box::new(|r| r.product_id.clear())),
        ("tables", Box::new(|r| r.tables.clear())),
        ("policy_json", Box::new(|r| r.policy_json = b"{".to_vec())),
        ("privacy_budget", Box::new(|r| r.privacy_budget = f64::NAN)),
        ("limits", Box::new(|r| r.limits = None)),
        (
            "limits",
            Box::new(|r| {
                if let Some(limits) = r.limits.as_mut() {
                    limits.fuel = 0;
                }
            }),
        ),
        (
            "limits",
            Box::new(|r| {
                if let Some(limits) = r.limits.as_mut() {
                    limits.memory_bytes = 3 << 30;
                }
            }),
        ),
    ];
    for (field, break_it) in cases {
        let mut asked = request(sql);
        break_it(&mut asked);
        let status = run(&mut client, asked).await.expect_err(field);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    Ok(())
}

/// A runner's heartbeats to `directory` as `identity`, until the test ends
/// or `stop` fires.
fn heartbeats(
    directory: SocketAddr,
    pki: &Pki,
    identity: &(String, String),
    data_center: &str,
    runner: &Runner,
) -> tokio::sync::oneshot::Sender<()> {
    let heartbeat = civicgrid_runner::Heartbeat {
        directory: format!("https://{directory}"),
        directory_name: DIRECTORY.into(),
        directory_ca: pki.ca.clone().into_bytes(),
        identity: (
            identity.0.clone().into_bytes(),
            identity.1.clone().into_bytes(),
        ),
        status: proto::RunnerStatus {
            data_center: data_center.into(),
            endpoint: format!("https://{}", runner.address),
            version: "test".into(),
            slots: 4,
            busy_slots: 0,
        },
        metrics: None,
        interval: Duration::from_millis(100),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(heartbeat.run(async {
        let _ = stopped.await;
    }));
    stop
}

/// The municipal core's runner over its own copy of the sample data,
/// reporting to the directory at `directory` until the sender is dropped.
async fn municipal_runner(
    directory: SocketAddr,
    pki: &Pki,
) -> anyhow::Result<(tempfile::TempDir, Runner, tokio::sync::oneshot::Sender<()>)> {
    let data = tempfile::tempdir()?;
    civicgrid_marketplace::quality::write_sample_population(
        &data.path().join("products/population"),
        civicgrid_tests::market::SAMPLE_ROWS,
    )?;
    let runner = start_runner(data.path(), &pki.municipal, pki).await?;
    let stop = heartbeats(directory, pki, &pki.municipal, "municipal-core", &runner);
    Ok((data, runner, stop))
}

/// The marketplace routes each query to a runner in a data center hosting
/// the product and never reads the product's files itself; with no ready
/// runner there, a query fails fast as unavailable, naming the data center,
/// and holds and charges nothing. A runner cannot report for a data center
/// its certificate does not name.
#[tokio::test]
async fn queries_run_on_a_runner_where_the_product_is_hosted() -> anyhow::Result<()> {
    use civicgrid_marketplace::grpc::runners::{RunnerDirectory, serve_directory};
    use civicgrid_marketplace::proto::queries_client::QueriesClient;

    use civicgrid_tests::market::{SAMPLE_ROWS, authed};

    let pki = Pki::generate()?;
    let market = market_with_a_contract(10_000).await?;
    let cast = &market.1;
    let market = &market.0;
    let mut billing =
        civicgrid_marketplace::proto::billing_client::BillingClient::new(market.channel.clone());

    // From here on the marketplace routes; its own copy of the product's
    // files goes, so any answer must come from the runner's.
    let client_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(Identity::from_pem(&pki.directory.0, &pki.directory.1));
    let directory = RunnerDirectory::new(client_tls, Duration::from_secs(2));
    market.market.attach_runners(directory.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let directory_address = listener.local_addr()?;
    let (_stop_directory, directory_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_directory(
        directory.clone(),
        listener,
        civicgrid_runner::mutual_tls(&pki.directory.0, &pki.directory.1, &pki.ca),
        async {
            let _ = directory_stopped.await;
        },
    ));
    std::fs::remove_dir_all(market.market.data_dir().join("products/population"))?;

    let sql = "SELECT district, COUNT(*) AS people FROM residents GROUP BY district";
    let ask = |key: &str| civicgrid_marketplace::proto::RunQueryRequest {
        product_id: "population".into(),
        sql: sql.into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let mut queries = QueriesClient::new(market.channel.clone());

    // No runner has reported yet.
    let status = queries
        .run_query(authed(&cast.consumer_analyst, ask("k-none")))
        .await
        .expect_err("no runner is ready");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("municipal-core"),
        "{}",
        status.message()
    );

    // A runner with the edge data center's certificate cannot report for
    // the municipal core.
    let mut impostor = civicgrid_runner::proto::directory_client::DirectoryClient::new(
        Channel::from_shared(format!("https://{directory_address}"))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&pki.ca))
                    .identity(Identity::from_pem(&pki.edge.0, &pki.edge.1))
                    .domain_name(DIRECTORY),
            )?
            .connect()
            .await?,
    );
    let refused = impostor
        .heartbeat(proto::RunnerStatus {
            data_center: "municipal-core".into(),
            endpoint: "https://127.0.0.1:1".into(),
            version: "x".into(),
            slots: 1,
            busy_slots: 0,
        })
        .await
        .expect_err("a certificate for edge-1 reports for municipal-core");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // The municipal core's runner, over its own copy of the data.
    let (_data, runner, stop_heartbeats) = municipal_runner(directory_address, &pki).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    use civicgrid_marketplace::queries::remote::Runners as _;
    while directory.pick(&["municipal-core".into()]).is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the runner never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut stream = queries
        .run_query(authed(&cast.consumer_analyst, ask("k-routed")))
        .await?
        .into_inner();
    let mut summary = None;
    let mut ipc = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.message {
            Some(civicgrid_marketplace::proto::run_query_response::Message::Summary(s)) => {
                summary = Some(s);
            }
            Some(civicgrid_marketplace::proto::run_query_response::Message::ArrowIpc(bytes)) => {
                ipc.extend(bytes);
            }
            None => {}
        }
    }
    let summary = summary.expect("a summary");
    assert_eq!(summary.state, "completed", "{summary:?}");
    let batches: Vec<_> =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)?
            .collect::<Result<_, _>>()?;
    let people: i64 = batches
        .iter()
        .map(|batch| {
            batch
                .column(1)
                .as_primitive::<Int64Type>()
                .iter()
                .flatten()
                .sum::<i64>()
        })
        .sum();
    assert!(people > 0 && people <= SAMPLE_ROWS as i64, "{people}");
    assert!(summary.charge_minor > 0, "{summary:?}");

    // The runner goes away. While it is still listed, a query sent to it
    // is refused as unavailable, naming the data center and nothing of the
    // runner; once its heartbeats have lapsed, queries are refused before
    // anything is held. Neither is counted or charged.
    drop(stop_heartbeats);
    drop(runner);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = queries
        .run_query(authed(&cast.consumer_analyst, ask("k-unreachable")))
        .await
        .expect_err("the runner is gone");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "no runner in municipal-core took the query; retry later"
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let status = queries
        .run_query(authed(&cast.consumer_analyst, ask("k-gone")))
        .await
        .expect_err("the runner is gone");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("municipal-core"),
        "{}",
        status.message()
    );
    let balances = billing
        .get_balance(authed(
            &cast.consumer_admin,
            civicgrid_marketplace::proto::GetBalanceRequest {
                organization_id: "acme".into(),
            },
        ))
        .await?
        .into_inner()
        .balances;
    assert!(balances.iter().all(|b| b.held_minor == 0), "{balances:?}");
    assert_eq!(
        balances.iter().map(|b| b.balance_minor).sum::<i64>(),
        10_000 - summary.charge_minor,
        "only the routed query was charged"
    );
    Ok(())
}

/// Two servers on one PostgreSQL behind a load balancer: a runner reports
/// to one of them, and the other routes its queries there too, within a
/// couple of seconds; once the runner's reports stop, neither picks it.
#[tokio::test]
async fn a_runner_reporting_to_one_server_takes_queries_from_another() -> anyhow::Result<()> {
    use civicgrid_marketplace::grpc::runners::{RunnerDirectory, serve_directory};
    use civicgrid_marketplace::queries::remote::Runners as _;
    use civicgrid_tests::market::Db;

    let pki = Pki::generate()?;
    let (a, cast) = market_with_a_contract_on(Db::Postgres, 10_000).await?;
    let b = a.start_replica().await?;
    super::queries::attach_engine(&b, |_| {}).await?;
    let client_tls = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .identity(Identity::from_pem(&pki.directory.0, &pki.directory.1))
    };
    let ttl = Duration::from_secs(2);
    let directory_a = RunnerDirectory::new(client_tls(), ttl);
    let _sharing_a = directory_a
        .share_through(a.market.store().clone())
        .context("PostgreSQL shares reports")?;
    a.market.attach_runners(directory_a.clone())?;
    let directory_b = RunnerDirectory::new(client_tls(), ttl);
    let _sharing_b = directory_b
        .share_through(b.market.store().clone())
        .context("PostgreSQL shares reports")?;
    b.market.attach_runners(directory_b.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let directory_address = listener.local_addr()?;
    let (_stop_directory, directory_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_directory(
        directory_a.clone(),
        listener,
        civicgrid_runner::mutual_tls(&pki.directory.0, &pki.directory.1, &pki.ca),
        async {
            let _ = directory_stopped.await;
        },
    ));
    // Both servers' own copy of the product goes: answers come from the runner.
    std::fs::remove_dir_all(a.data_dir.join("products/population"))?;
    let (_data, runner, stop_heartbeats) = municipal_runner(directory_address, &pki).await?;
    let hosts = ["municipal-core".to_owned()];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory_b.pick(&hosts).is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "B never heard of the runner that reports to A"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ask = |key: &str| civicgrid_marketplace::proto::RunQueryRequest {
        product_id: "population".into(),
        sql: "SELECT district, COUNT(*) AS people FROM residents GROUP BY district".into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let answer = super::queries::run(&b, &cast.consumer_analyst, ask("k-via-b")).await?;
    assert_eq!(answer.summary.state, "completed", "{:?}", answer.summary);
    assert_eq!(answer.summary.data_center, "municipal-core");
    assert!(
        super::queries::total_people(&answer.batches)? > 0,
        "{:?}",
        answer.summary
    );

    // The runner stops reporting: once its last report is older than the
    // TTL (by the database's clock), B no longer picks it either.
    drop(stop_heartbeats);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory_b.pick(&hosts).is_some() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "B keeps a runner whose reports stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = super::queries::run(&b, &cast.consumer_analyst, ask("k-gone"))
        .await
        .err()
        .context("no runner is ready")?;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    drop(runner);
    b.stop().await;
    a.stop().await;
    Ok(())
}

/// One of a data center's runners dies: the next query sent to it is
/// passed to the data center's other runner, the dead one is counted gone
/// at once, and no query is refused, failed or charged twice for it.
#[tokio::test]
async fn a_data_center_keeps_answering_when_one_of_its_runners_dies() -> anyhow::Result<()> {
    use civicgrid_marketplace::proto::queries_client::QueriesClient;

    use civicgrid_tests::market::{SAMPLE_ROWS, authed};

    let market = market_with_a_contract(100_000).await?;
    let cast = &market.1;
    let market = &market.0;
    let data = tempfile::tempdir()?;
    civicgrid_marketplace::quality::write_sample_population(
        &data.path().join("products/population"),
        SAMPLE_ROWS,
    )?;
    let mut routed =
        civicgrid_tests::runners::route(market, "municipal-core", data.path(), 2).await?;
    routed.stop(0);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut queries = QueriesClient::new(market.channel.clone());
    for i in 0..6 {
        let mut stream = queries
            .run_query(authed(
                &cast.consumer_analyst,
                civicgrid_marketplace::proto::RunQueryRequest {
                    product_id: "population".into(),
                    sql: "SELECT district, COUNT(*) AS people FROM residents GROUP BY district"
                        .into(),
                    idempotency_key: format!("k-{i}"),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        let mut summary = None;
        while let Some(message) = stream.message().await? {
            if let Some(civicgrid_marketplace::proto::run_query_response::Message::Summary(s)) =
                message.message
            {
                summary = Some(s);
            }
        }
        let summary = summary.expect("a summary");
        assert_eq!(summary.state, "completed", "query {i}: {summary:?}");
        assert_eq!(summary.data_center, "municipal-core", "query {i}");
    }
    Ok(())
}

/// A marketplace with a query engine, the sample cast, the population
/// product published, acme's contract on it approved, and `deposit` EUR
/// cents on acme's balance.
/// Uploads go to a runner in a data center hosting the product: it stages
/// the chunks, converts and stores the file in its own data directory, and
/// measures the version; queries then read that version there, and the
/// marketplace's disk never holds a byte of it. A file swapped in the data
/// center's store is refused by the runner.
#[tokio::test]
async fn uploads_land_in_the_hosting_data_centers_store() -> anyhow::Result<()> {
    use civicgrid_marketplace::queries::remote::Runners as _;
    use civicgrid_tests::market::SAMPLE_ROWS;

    use super::data_versions::{entry_details, residents_csv, upload};
    use super::queries::{BY_DISTRICT, query, run as run_query, total_people};

    let pki = Pki::generate()?;
    let (market, cast) = market_with_a_contract(100_000).await?;
    let (directory, directory_address, _stop_directory) =
        serve_a_directory(&market, &pki, Duration::from_secs(2)).await?;
    std::fs::remove_dir_all(market.market.data_dir().join("products/population"))?;
    let (data, _runner, _heartbeats) = municipal_runner(directory_address, &pki).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory.pick(&["municipal-core".into()]).is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the runner never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let committed = upload(
        &market,
        &cast.provider_admin,
        true,
        &residents_csv("new-town", 500_000, 40),
    )
    .await?;
    let upload_state = committed.upload.expect("the upload");
    assert_eq!(upload_state.data_center, "municipal-core");
    let version = committed.version.expect("a version");
    assert_eq!(version.rows, i64::try_from(SAMPLE_ROWS)? + 40);
    for file in version.tables.iter().flat_map(|t| &t.files) {
        assert!(
            data.path()
                .join("products/population")
                .join(&file.path)
                .is_file()
        );
        assert!(
            !market
                .market
                .data_dir()
                .join("products/population")
                .join(&file.path)
                .exists()
        );
    }
    assert!(
        std::fs::read_dir(
            data.path()
                .join(civicgrid_runner::service::DIRECTORY_STAGING)
        )?
        .next()
        .is_none(),
        "the staged upload is gone once ingested"
    );
    let answer = run_query(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-runner"),
    )
    .await?;
    assert_eq!(
        total_people(&answer.batches)?,
        i64::try_from(SAMPLE_ROWS)? + 40
    );
    assert_eq!(
        entry_details(&answer.summary)["data_fingerprint"],
        version.fingerprint.as_str()
    );

    // A refresh folder in the data center's store, read through its runner.
    let mut spec = civicgrid_tests::market::sample_spec();
    spec.refresh_minutes = 5;
    civicgrid_marketplace::proto::registry_client::RegistryClient::new(market.channel.clone())
        .revise_product(civicgrid_tests::market::authed(
            &cast.provider_admin,
            civicgrid_marketplace::proto::ReviseProductRequest {
                product_id: "population".into(),
                spec: Some(spec),
                reason: "refresh".into(),
            },
        ))
        .await?;
    let incoming = data
        .path()
        .join("products/population/incoming/population/residents");
    std::fs::create_dir_all(&incoming)?;
    std::fs::write(
        incoming.join("day.csv"),
        residents_csv("harbour", 600_000, 11),
    )?;
    let now = civicgrid_marketplace::store::now_ms();
    assert_eq!(market.market.sweep_refresh(now).await?, 1);
    assert!(!incoming.join("day.csv").exists(), "taken by the runner");
    let refreshed = run_query(
        &market,
        &cast.consumer_analyst,
        query(BY_DISTRICT, "k-refresh"),
    )
    .await?;
    assert_eq!(
        total_people(&refreshed.batches)?,
        i64::try_from(SAMPLE_ROWS)? + 40 + 11
    );

    // The appended file, truncated in the data center's store: refused.
    let appended = version
        .tables
        .iter()
        .flat_map(|t| &t.files)
        .find(|f| f.rows == 40)
        .expect("the appended file");
    let path = data.path().join("products/population").join(&appended.path);
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() - 1])?;
    match run_query(&market, &cast.consumer_analyst, query(BY_DISTRICT, "k-cut")).await {
        Ok(answer) => {
            assert!(answer.batches.is_empty(), "rows from a damaged version");
            assert_ne!(answer.summary.state, "completed", "{:?}", answer.summary);
        }
        Err(status) => assert_ne!(status.code(), tonic::Code::Ok),
    }
    market.stop().await;
    Ok(())
}

/// The marketplace's runner directory for `market`, attached to it and
/// serving until the returned sender is dropped.
async fn serve_a_directory(
    market: &civicgrid_tests::market::TestMarket,
    pki: &Pki,
    ttl: Duration,
) -> anyhow::Result<(
    Arc<civicgrid_marketplace::grpc::runners::RunnerDirectory>,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
)> {
    use civicgrid_marketplace::grpc::runners::{RunnerDirectory, serve_directory};
    let directory = RunnerDirectory::new(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .identity(Identity::from_pem(&pki.directory.0, &pki.directory.1)),
        ttl,
    );
    market.market.attach_runners(directory.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_directory(
        directory.clone(),
        listener,
        civicgrid_runner::mutual_tls(&pki.directory.0, &pki.directory.1, &pki.ca),
        async {
            let _ = stopped.await;
        },
    ));
    Ok((directory, address, stop))
}

async fn market_with_a_contract(
    deposit: i64,
) -> anyhow::Result<(
    civicgrid_tests::market::TestMarket,
    civicgrid_tests::market::Cast,
)> {
    market_with_a_contract_on(civicgrid_tests::market::Db::Sqlite, deposit).await
}

/// [`market_with_a_contract`] on `db`.
async fn market_with_a_contract_on(
    db: civicgrid_tests::market::Db,
    deposit: i64,
) -> anyhow::Result<(
    civicgrid_tests::market::TestMarket,
    civicgrid_tests::market::Cast,
)> {
    use civicgrid_marketplace::proto::{
        billing_client::BillingClient, contracts_client::ContractsClient,
    };
    use civicgrid_tests::market::{Cast, TestMarket, authed, contract_request, publish};

    let market = TestMarket::start(db).await?;
    super::queries::attach_engine(&market, |_| {}).await?;
    let cast = Cast::create(&market).await?;
    publish(&market, &cast, "population").await?;
    let mut contracts = ContractsClient::new(market.channel.clone());
    let contract_id = contracts
        .request_contract(authed(&cast.consumer_admin, contract_request("population")))
        .await?
        .into_inner()
        .id;
    contracts
        .approve_contract(authed(
            &cast.provider_admin,
            civicgrid_marketplace::proto::ContractAction {
                contract_id,
                reason: String::new(),
            },
        ))
        .await?;
    BillingClient::new(market.channel.clone())
        .deposit(authed(
            &market.admin_token,
            civicgrid_marketplace::proto::DepositRequest {
                organization_id: "acme".into(),
                amount_minor: deposit,
                currency: "EUR".into(),
                reference: "test top-up".into(),
            },
        ))
        .await?;
    Ok((market, cast))
}

/// A runner that takes a query, sends part of a result and breaks off, as
/// a runner killed mid-run does (here on purpose, so the break comes after
/// rows were sent, every time).
#[derive(Clone, Default)]
struct BreaksOffMidStream {
    runs: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl proto::runner_server::Runner for BreaksOffMidStream {
    type RunStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<proto::RunReply, tonic::Status>> + Send + 'static>,
    >;

    async fn run(
        &self,
        _request: tonic::Request<proto::RunRequest>,
    ) -> Result<tonic::Response<Self::RunStream>, tonic::Status> {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let replies = vec![
            Ok(proto::RunReply {
                message: Some(run_reply::Message::ArrowIpc(vec![0xff; 64])),
            }),
            Err(tonic::Status::unavailable("connection reset by peer")),
        ];
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(
            replies,
        ))))
    }

    async fn measure(
        &self,
        _request: tonic::Request<proto::MeasureRequest>,
    ) -> Result<tonic::Response<proto::MeasureReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn stage(
        &self,
        _request: tonic::Request<proto::StageRequest>,
    ) -> Result<tonic::Response<proto::StageReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn ingest(
        &self,
        _request: tonic::Request<proto::IngestRequest>,
    ) -> Result<tonic::Response<proto::IngestReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn remove(
        &self,
        _request: tonic::Request<proto::RemoveRequest>,
    ) -> Result<tonic::Response<proto::RemoveReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn list_incoming(
        &self,
        _request: tonic::Request<proto::ListIncomingRequest>,
    ) -> Result<tonic::Response<proto::ListIncomingReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn take_incoming(
        &self,
        _request: tonic::Request<proto::TakeIncomingRequest>,
    ) -> Result<tonic::Response<proto::TakeIncomingReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

/// A query cut off mid-stream is reported failed, settled once under the
/// query rules (a platform failure: not charged, nothing held), and a
/// retry under the same key gives the same answer and runs nothing again.
#[tokio::test]
async fn a_query_cut_off_mid_stream_fails_once_and_is_charged_once() -> anyhow::Result<()> {
    use civicgrid_marketplace::proto::queries_client::QueriesClient;
    use civicgrid_tests::market::authed;

    let pki = Pki::generate()?;
    let (market, cast) = market_with_a_contract(10_000).await?;
    let (directory, directory_address, _stop_directory) =
        serve_a_directory(&market, &pki, Duration::from_secs(5)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let tls = civicgrid_runner::mutual_tls(&pki.municipal.0, &pki.municipal.1, &pki.ca);
    let breaking = BreaksOffMidStream::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)?
            .add_service(proto::runner_server::RunnerServer::new(breaking.clone()))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let (stop, _stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = Runner {
        address,
        metrics: Arc::new(civicgrid_runner::Metrics::new(1)),
        _stop: stop,
    };
    let _heartbeats = heartbeats(
        directory_address,
        &pki,
        &pki.municipal,
        "municipal-core",
        &runner,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory.ready_runners("municipal-core") == 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let queries = QueriesClient::new(market.channel.clone());
    let ask = || civicgrid_marketplace::proto::RunQueryRequest {
        product_id: "population".into(),
        sql: "SELECT district, COUNT(*) AS people FROM residents GROUP BY district".into(),
        idempotency_key: "k-cut-off".into(),
        ..Default::default()
    };
    // Rows had started to arrive; the stream broke. The consumer is told
    // the query failed inside the platform, by its id, and nothing of the
    // runner's words.
    let cut_off = async || -> anyhow::Result<tonic::Status> {
        let outcome = async {
            let mut stream = queries
                .clone()
                .run_query(authed(&cast.consumer_analyst, ask()))
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await;
        outcome.err().context("the query did not fail")
    };
    let first = cut_off().await?;
    assert_eq!(first.code(), tonic::Code::Internal, "{first:?}");
    assert!(
        first.message().starts_with("query q-")
            && first
                .message()
                .ends_with(": the query failed inside the platform (internal)"),
        "{first:?}"
    );
    assert!(!first.message().contains("connection reset"), "{first:?}");

    let balance = || civicgrid_tests::market::acme_balance(&market, &cast);
    // Settled as a failure inside the platform: the consumer pays nothing
    // for it (not even the plan's 250 cents a query), and nothing is left
    // held.
    let (after_first, held) = balance().await?;
    assert_eq!((after_first, held), (10_000, 0));

    // The same key again: the same query, settled once, charged once.
    let again = cut_off().await?;
    assert_eq!(again.message(), first.message());
    assert_eq!(balance().await?, (after_first, 0));
    assert_eq!(breaking.runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    Ok(())
}

fn tokio_stream_from(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}
