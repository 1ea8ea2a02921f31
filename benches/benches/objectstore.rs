//! Reading product data from a data center's object store against reading
//! it from a local directory, in the same process, on the same files:
//! TPC-H Q1 (7 of lineitem's 16 columns) and Q6 (4 columns) in the sandbox,
//! over `LocalDirectory` and over `ObjectTables` on a real S3-compatible
//! server (versitygw on this machine's disk, over loopback HTTP), rounds
//! interleaved so a slow stretch of the machine lands on both.
//!
//! - cold: the first run over a fresh footer cache (the footer is fetched
//!   or parsed);
//! - warm: best of the rounds, footers cached, as a runner serves queries.
//!
//! Run: `bash sandbox/build-guests.sh && CIVICGRID_VERSITYGW=$(bash
//! tools/versitygw/build.sh) cargo bench -p civicgrid-benches --bench
//! objectstore` (add `-- --scale 1` for SF 1).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use civicgrid_sandbox::object_store::path::Path as ObjectPath;
use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{
    FooterCache, GuestRole, Job, Limits, LocalDirectory, ObjectTables, Sandbox, SandboxConfig,
    TableStore,
};
use civicgrid_tests::objectstore::ObjectStoreServer;
use civicgrid_tests::sandbox::sql_guest;
use civicgrid_tests::tpch;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROUNDS: usize = 5;

/// Object store against local directory.
#[derive(clap::Parser)]
struct Args {
    /// TPC-H scale factor.
    #[arg(long, default_value_t = 0.1, value_parser = civicgrid_benches::positive_number)]
    scale: f64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn tpch_dir(scale: f64) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/bench-data/tpch-sf{scale}"));
    if !dir.join("region.parquet").exists() {
        std::fs::create_dir_all(&dir).expect("bench data dir");
        tpch::write_parquet(&dir, scale).expect("TPC-H data");
    }
    dir
}

fn run(
    sandbox: &Sandbox,
    guest: &civicgrid_sandbox::Guest,
    tables: Arc<dyn TableStore>,
    sql: &str,
) -> Duration {
    let policy = OutputPolicy::owner();
    let started = Instant::now();
    let outcome = sandbox
        .run(
            guest,
            Job {
                sql,
                tables,
                policy: &policy,
                privacy_budget: 0.0,
                as_of_unix_seconds: 1_764_460_800,
            },
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    std::hint::black_box(outcome);
    started.elapsed()
}

fn main() -> anyhow::Result<()> {
    let args: Args = clap::Parser::parse();
    let dir = tpch_dir(args.scale);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = runtime.block_on(ObjectStoreServer::start(&["core"]))?;
    runtime.block_on(server.upload_folder("core", "products/tpch", &dir))?;
    let client = server.client("core")?;
    let folder = ObjectPath::from("products/tpch");

    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let sandbox = Sandbox::new(&SandboxConfig::new(cache))?;
    let guest = sandbox.load(&sql_guest(), GuestRole::Sql)?;
    let local = |footers: &Arc<FooterCache>| -> Arc<dyn TableStore> {
        Arc::new(
            LocalDirectory::discover(&dir)
                .expect("tables")
                .with_footer_cache(Arc::clone(footers)),
        )
    };
    let objects = |footers: &Arc<FooterCache>| -> Arc<dyn TableStore> {
        Arc::new(
            ObjectTables::discover(Arc::clone(&client), runtime.handle().clone(), &folder)
                .expect("tables")
                .with_footer_cache(Arc::clone(footers)),
        )
    };
    println!(
        "TPC-H SF{}, sandbox over a local directory and over an S3-compatible store on loopback",
        args.scale
    );
    for (name, query) in [("Q1", tpch::Q1), ("Q6", tpch::Q6)] {
        let (local_footers, object_footers) = (Arc::default(), Arc::default());
        let cold_local = run(&sandbox, &guest, local(&local_footers), query);
        let cold_objects = run(&sandbox, &guest, objects(&object_footers), query);
        let mut best = [Duration::MAX; 2];
        for _ in 0..ROUNDS {
            best[0] = best[0].min(run(&sandbox, &guest, local(&local_footers), query));
            best[1] = best[1].min(run(&sandbox, &guest, objects(&object_footers), query));
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "  {name}: cold {:.1} ms local, {:.1} ms store ({:.2}x); warm best of {ROUNDS} {:.1} ms local, {:.1} ms store ({:.2}x)",
            ms(cold_local),
            ms(cold_objects),
            cold_objects.as_secs_f64() / cold_local.as_secs_f64(),
            ms(best[0]),
            ms(best[1]),
            best[1].as_secs_f64() / best[0].as_secs_f64(),
        );
    }
    Ok(())
}
