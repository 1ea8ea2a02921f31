//! Authorized queries per second over gRPC, end to end (authenticate, casbin,
//! contract, quota, hold, sandbox with the output policy, ledger, usage
//! record, audit entry), for a tiny aggregate query, with 1, 32 and 64
//! concurrent clients (64 is twice the sandbox's pool: runs queue for a slot),
//! on SQLite and (when `CIVICGRID_TEST_POSTGRES_URL` is set)
//! PostgreSQL. The baseline, in the same process: the same query in the same
//! sandbox called directly — what the marketplace adds is the difference.
//! Where the time goes comes from the server's own stage histograms, and
//! from the CPU time each line took per query, by thread (this process holds
//! the clients too, so their share is in the Tokio workers' figure): a
//! figure far less at the mercy of a noisy machine than queries per second.
//!
//! Then the same query offered at fixed rates (`--rates`, default 100,200
//! queries/s), where p99 means what the target means by it.
//!
//! Run: `bash sandbox/build-guests.sh && cargo bench -p civicgrid-benches
//! --bench queries` (`-- --queries N` per client count and per rate; default
//! 400; `--concurrent-queries N` for the sandbox's concurrent runs, the
//! server flag of that name; default the engine's). `-- --scale-out` instead
//! compares one server with two on one PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use civicgrid_marketplace::proto::{
    self, billing_client::BillingClient, contracts_client::ContractsClient,
    queries_client::QueriesClient,
};
use civicgrid_marketplace::queries::{EngineConfig, QueryEngine};
use civicgrid_sandbox::{GuestRole, Job, Limits, Sandbox, SandboxConfig};
use civicgrid_tests::market::{Cast, Db, TestMarket, authed, contract_request, publish};
use civicgrid_tests::sandbox::residents_aggregate_policy;

// The same allocator as the marketplace's binaries (see
// marketplace/src/bin/civicgrid-marketplace.rs), for the sandbox and every
// baseline alike: glibc's would have both pay page faults on every batch.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SQL: &str = "SELECT district, COUNT(*) AS people FROM residents GROUP BY district";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// CPU time (user and system) this process has used: in all, and by thread
/// name, a pool's numbered threads added up. From /proc, which counts in
/// ticks of USER_HZ, 100 a second for user space on Linux.
#[derive(Default)]
struct CpuTimes {
    total: f64,
    by_thread: BTreeMap<String, f64>,
}

impl CpuTimes {
    fn now() -> Self {
        let mut times = Self::default();
        if let Some((_, total)) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| thread_cpu(&stat))
        {
            times.total = total;
        }
        for task in std::fs::read_dir("/proc/self/task").into_iter().flatten() {
            let Ok(task) = task else { continue };
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            if let Some((name, seconds)) = thread_cpu(&stat) {
                *times.by_thread.entry(name).or_default() += seconds;
            }
        }
        times
    }

    /// The CPU time since `before`, per query: in all, then by thread, the
    /// busiest first (threads that have ended since count in the total only).
    fn per_query_since(&self, before: &Self, queries: usize) -> String {
        let per_query = |seconds: f64| seconds * 1e3 / queries.max(1) as f64;
        let mut threads: Vec<(&String, f64)> = self
            .by_thread
            .iter()
            .map(|(name, seconds)| {
                (
                    name,
                    seconds - before.by_thread.get(name).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, seconds)| *seconds > 0.0)
            .collect();
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        let threads: Vec<String> = threads
            .iter()
            .map(|(name, seconds)| format!("{name} {:.3}", per_query(*seconds)))
            .collect();
        format!(
            "cpu {:.3} ms/query ({})",
            per_query(self.total - before.total),
            threads.join(", ")
        )
    }
}

/// A thread's name (its trailing number and dashes dropped) and CPU seconds,
/// from a `/proc/.../stat` line: `pid (name) state …` with user and system
/// ticks the 12th and 13th fields after the name.
fn thread_cpu(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close]
        .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
        .to_owned();
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (user + system) / 100.0))
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn guest_path() -> std::path::PathBuf {
    civicgrid_tests::sandbox::guest_dir().join("civicgrid_sandbox_guest.wasm")
}

fn cache_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache")
}

async fn one_query(
    client: &mut QueriesClient<tonic::transport::Channel>,
    token: &str,
    key: String,
) -> Duration {
    let started = Instant::now();
    let mut stream = client
        .run_query(authed(
            token,
            proto::RunQueryRequest {
                product_id: "population".into(),
                sql: SQL.into(),
                idempotency_key: key,
                ..proto::RunQueryRequest::default()
            },
        ))
        .await
        .expect("query")
        .into_inner();
    while let Some(message) = stream.message().await.expect("stream") {
        std::hint::black_box(message);
    }
    started.elapsed()
}

/// Mean seconds per stage from the server's histograms (`_sum` / `_count`).
fn stage_means(text: &str) -> Vec<(String, f64, u64)> {
    let mut sums = std::collections::BTreeMap::new();
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("civicgrid_marketplace_query_stage_seconds_") else {
            continue;
        };
        let Some((name, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Some(stage) = name
            .split("stage=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        if name.starts_with("sum") {
            sums.insert(stage.to_owned(), value.parse::<f64>().unwrap_or(0.0));
        } else if name.starts_with("count") {
            counts.insert(stage.to_owned(), value.parse::<u64>().unwrap_or(0));
        }
    }
    sums.into_iter()
        .map(|(stage, sum)| {
            let count = counts.get(&stage).copied().unwrap_or(0);
            (stage, sum / count.max(1) as f64, count)
        })
        .collect()
}

async fn bench(
    db: Db,
    queries: usize,
    rates: &[u32],
    concurrent_queries: Option<u32>,
    routed: bool,
) -> anyhow::Result<()> {
    if routed {
        println!("== {db:?}, each query run by a runner over mutual TLS");
    } else {
        println!("== {db:?}");
    }
    let (market, cast) = serving_market(db, concurrent_queries).await?;
    // The runner reads its own copy of the product's files; the marketplace
    // sends it every query.
    let runner_data = tempfile::tempdir()?;
    let _routed = if routed {
        civicgrid_marketplace::quality::write_sample_population(
            &runner_data.path().join("products/population"),
            civicgrid_tests::market::SAMPLE_ROWS,
        )?;
        Some(
            civicgrid_tests::runners::route(&market, "municipal-core", runner_data.path(), 1)
                .await?,
        )
    } else {
        None
    };
    let mut client = QueriesClient::new(market.channel.clone());
    for i in 0..20 {
        one_query(&mut client, &cast.consumer_analyst, format!("warm-{i}")).await;
    }
    for clients in [1_usize, 32, 64] {
        let before = market.market.metrics().encode();
        let cpu_before = CpuTimes::now();
        let (latencies, elapsed) = closed_loop(
            &[&market],
            &cast.consumer_analyst,
            clients,
            queries,
            &format!("c{clients}"),
        )
        .await?;
        let answered = latencies.len();
        report(&format!("{clients:>2} client(s)"), latencies, elapsed);
        println!(
            "      {}",
            CpuTimes::now().per_query_since(&cpu_before, answered)
        );
        let after = market.market.metrics().encode();
        let before: std::collections::HashMap<_, _> = stage_means(&before)
            .into_iter()
            .map(|(stage, mean, count)| (stage, (mean, count)))
            .collect();
        for (stage, mean, count) in stage_means(&after) {
            let (old_mean, old_count) = before.get(&stage).copied().unwrap_or((0.0, 0));
            let new = count.saturating_sub(old_count).max(1) as f64;
            let stage_mean = (mean * count as f64 - old_mean * old_count as f64) / new;
            println!("      {stage:>9}: {:>6.2} ms mean", stage_mean * 1e3);
        }
    }
    for rate in rates {
        open_loop(&market, &cast.consumer_analyst, *rate, queries).await?;
    }
    market.stop().await;
    Ok(())
}

/// A server with the sandbox, a published product and a funded consumer
/// with a contract on it.
async fn serving_market(
    db: Db,
    concurrent_queries: Option<u32>,
) -> anyhow::Result<(TestMarket, Cast)> {
    let market = TestMarket::start(db).await?;
    attach_engine(&market, concurrent_queries).await?;
    let cast = Cast::create(&market).await?;
    publish(&market, &cast, "population").await?;
    let mut contracts = ContractsClient::new(market.channel.clone());
    let mut request = contract_request("population");
    request.monthly_query_quota = 0;
    let contract = contracts
        .request_contract(authed(&cast.consumer_admin, request))
        .await?
        .into_inner();
    contracts
        .approve_contract(authed(
            &cast.provider_admin,
            proto::ContractAction {
                contract_id: contract.id,
                reason: String::new(),
            },
        ))
        .await?;
    BillingClient::new(market.channel.clone())
        .deposit(authed(
            &market.admin_token,
            proto::DepositRequest {
                organization_id: "acme".into(),
                amount_minor: 1_000_000_000_000,
                currency: "EUR".into(),
                reference: "bench".into(),
            },
        ))
        .await?;
    Ok((market, cast))
}

/// Gives `market` the engine every server of this bench runs.
async fn attach_engine(market: &TestMarket, concurrent_queries: Option<u32>) -> anyhow::Result<()> {
    let mut config = EngineConfig::new(guest_path(), cache_dir());
    config.default_compute_units = 1_000;
    if let Some(concurrent) = concurrent_queries {
        config.concurrent_queries = concurrent;
    }
    let engine = tokio::task::spawn_blocking(move || QueryEngine::open(config)).await??;
    market.market.attach_engine(engine)?;
    Ok(())
}

/// `clients` closed-loop clients, spread in turn over `servers`, each
/// sending its share of `queries`; the latencies and the time it took.
async fn closed_loop(
    servers: &[&TestMarket],
    token: &str,
    clients: usize,
    queries: usize,
    tag: &str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let per_client = queries.div_ceil(clients);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = QueriesClient::new(servers[c % servers.len()].channel.clone());
        let token = token.to_owned();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for q in 0..per_client {
                latencies.push(one_query(&mut client, &token, format!("{tag}-{c}-{q}")).await);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    Ok((latencies, started.elapsed()))
}

/// Queries per second with one server and with two servers on one
/// PostgreSQL, 32 clients either way (spread over both in the second), in
/// turns: one, two, one, two. Both servers run in this process, as two
/// replicas would on one machine: with fewer cores than the work needs they
/// share them, and two servers cannot be faster than one.
async fn scale_out(queries: usize, concurrent_queries: Option<u32>) -> anyhow::Result<()> {
    println!("== PostgreSQL, one server against two on one database, 32 clients");
    let (one, cast) = serving_market(Db::Postgres, concurrent_queries).await?;
    let two = one.start_replica().await?;
    attach_engine(&two, concurrent_queries).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while two.market.contract_index().is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the second server never heard of the contract"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let token = &cast.consumer_analyst;
    for (server, name) in [(&one, "one"), (&two, "two")] {
        let mut client = QueriesClient::new(server.channel.clone());
        for i in 0..20 {
            one_query(&mut client, token, format!("warm-{name}-{i}")).await;
        }
    }
    let (mut alone, mut shared) = (Vec::new(), Vec::new());
    for turn in 0..2 {
        for (servers, label) in [(vec![&one], "1 server "), (vec![&one, &two], "2 servers")] {
            let cpu_before = CpuTimes::now();
            let (latencies, elapsed) = closed_loop(
                &servers,
                token,
                32,
                queries,
                &format!("t{turn}-{}", servers.len()),
            )
            .await?;
            let answered = latencies.len();
            let rate = answered as f64 / elapsed.as_secs_f64();
            report(label, latencies, elapsed);
            println!(
                "      {}",
                CpuTimes::now().per_query_since(&cpu_before, answered)
            );
            if servers.len() == 1 {
                alone.push(rate);
            } else {
                shared.push(rate);
            }
        }
    }
    let mean = |rates: &[f64]| rates.iter().sum::<f64>() / rates.len() as f64;
    println!(
        "two servers against one: {:.2}x ({:.1} against {:.1} queries/s, mean of {} turns; {} cores here)",
        mean(&shared) / mean(&alone),
        mean(&shared),
        mean(&alone),
        alone.len(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
    );
    two.stop().await;
    one.stop().await;
    Ok(())
}

/// One line of results: throughput, p50, p99, the slowest query and how many
/// took longer than the target's 50 ms.
fn report(label: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    let over_target = latencies
        .iter()
        .filter(|latency| **latency > Duration::from_millis(50))
        .count();
    println!(
        "{label}: {:>7.1} queries/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms   \
         ({} queries, {over_target} over 50 ms)",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        millis(percentile(&latencies, 0.5)),
        millis(percentile(&latencies, 0.99)),
        millis(latencies.last().copied().unwrap_or_default()),
        latencies.len()
    );
}

/// Queries arriving at a fixed rate whatever the server does, as independent
/// callers would send them. With N closed-loop clients the mean latency is
/// N / throughput (Little's law): 32 clients at 500 queries/s wait 64 ms on
/// average, so "p99 under 50 ms" can only be judged at an offered rate.
/// Each latency counts from the moment its query was due, not from when it
/// was sent, so a server that falls behind is charged for the backlog
/// (no coordinated omission).
async fn open_loop(
    market: &TestMarket,
    token: &str,
    rate: u32,
    queries: usize,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for q in 0..queries {
        let due = started + interval.mul_f64(q as f64);
        tokio::time::sleep_until(due.into()).await;
        let mut client = QueriesClient::new(market.channel.clone());
        let token = token.to_owned();
        tasks.spawn(async move {
            one_query(&mut client, &token, format!("r{rate}-{q}")).await;
            due.elapsed()
        });
    }
    let latencies = tasks.join_all().await;
    let answered = latencies.len();
    report(
        &format!("{rate:>4}/s offered"),
        latencies,
        started.elapsed(),
    );
    println!(
        "      {}",
        CpuTimes::now().per_query_since(&cpu_before, answered)
    );
    Ok(())
}

/// The same query in the same sandbox, called directly.
fn baseline(queries: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    civicgrid_marketplace::quality::write_sample_population(dir.path(), 1000)?;
    let sandbox = Sandbox::new(&SandboxConfig::new(cache_dir()))?;
    let guest = sandbox.load(&std::fs::read(guest_path())?, GuestRole::Sql)?;
    let tables = civicgrid_tests::sandbox::local(dir.path());
    let policy = residents_aggregate_policy();
    let run = || {
        let started = Instant::now();
        let outcome = sandbox
            .run(
                &guest,
                Job {
                    sql: SQL,
                    tables: Arc::clone(&tables),
                    policy: &policy,
                    privacy_budget: 0.0,
                    as_of_unix_seconds: 1_764_460_800,
                },
                &Limits::default(),
            )
            .expect("baseline query");
        std::hint::black_box(outcome);
        started.elapsed()
    };
    for _ in 0..20 {
        run();
    }
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = (0..queries).map(|_| run()).collect();
    let elapsed = started.elapsed();
    let cpu = CpuTimes::now().per_query_since(&cpu_before, queries);
    latencies.sort();
    println!(
        "== baseline: the sandbox alone, 1 thread: {:>7.1} queries/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
        queries as f64 / elapsed.as_secs_f64(),
        millis(percentile(&latencies, 0.5)),
        millis(percentile(&latencies, 0.99)),
    );
    println!("      {cpu}");
    Ok(())
}

/// Authorized queries over gRPC against the sandbox alone.
#[derive(clap::Parser)]
struct Args {
    /// Queries per line.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..))]
    queries: u64,
    /// Offered rates, queries/s, comma-separated: a latency line each.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = [100, 200],
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    rates: Vec<u32>,
    /// The sandbox's concurrent runs (the server's --concurrent-queries);
    /// the engine's default unless given.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    concurrent_queries: Option<u32>,
    /// Only compare one server with two on one PostgreSQL
    /// (`CIVICGRID_TEST_POSTGRES_URL`).
    #[arg(long)]
    scale_out: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    // As the marketplace's binaries do before serving.
    civicgrid_marketplace::process::disable_transparent_huge_pages()?;
    let queries = usize::try_from(args.queries)?;
    let (rates, concurrent_queries) = (args.rates, args.concurrent_queries);
    if args.scale_out {
        return scale_out(queries, concurrent_queries).await;
    }
    tokio::task::spawn_blocking(move || baseline(queries)).await??;
    bench(Db::Sqlite, queries, &rates, concurrent_queries, false).await?;
    // The same path with the sandbox in a runner, for the price of the hop.
    bench(Db::Sqlite, queries, &rates, concurrent_queries, true).await?;
    if std::env::var_os(civicgrid_tests::market::POSTGRES_URL_ENV).is_some() {
        bench(Db::Postgres, queries, &rates, concurrent_queries, false).await?;
    } else {
        println!("== PostgreSQL skipped: CIVICGRID_TEST_POSTGRES_URL is not set");
    }
    Ok(())
}
