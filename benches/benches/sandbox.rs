//! Sandbox figures, each against a baseline measured in the same process:
//!
//! - (a) cold start from the module cache: instantiate plus first call, for a
//!   tiny guest and for the SQL guest (`select 1`);
//! - (b) TPC-H Q1 and Q6 in the sandbox against the same engine (the SQL
//!   guest's own code: planning, policy analysis, DataFusion) run natively on
//!   the same Parquet files, with one and two partitions;
//! - (c) DuckDB (PyPI `duckdb`) on the same files, one and two threads, when
//!   `python3 -c 'import duckdb'` works;
//! - (d) small aggregate queries per second, one and two threads;
//! - (e) fuel metering against epoch interruption alone;
//! - (f) when `CIVICGRID_COMPARE_GUEST` names another build of the SQL guest
//!   (say, other compiler settings), this build against that one, run after
//!   run interleaved in the same process: fuel and time per query;
//! - (g) pool slots that keep the pages a run touched and reset them in
//!   place, against slots that hand every page back to the kernel: the small
//!   aggregate query of (d), rounds interleaved, one and two threads
//!   (`--memory-only` runs this alone).
//!
//! Run: `bash sandbox/build-guests.sh && cargo bench -p civicgrid-benches
//! --bench sandbox` (add `-- --scale 0.1` for a quicker, smaller TPC-H).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{
    Guest, GuestRole, Job, Limits, Outcome, Sandbox, SandboxConfig, TableStore,
};
use civicgrid_tests::sandbox::{
    local, local_in_shares, residents_aggregate_policy, run_native, sql_guest, write_residents,
};
use civicgrid_tests::tpch;

// The same allocator as the marketplace's binaries (see
// marketplace/src/bin/civicgrid-marketplace.rs), for the sandbox and every
// baseline alike: glibc's would have both pay page faults on every batch.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `runs` timings of `f`, sorted for percentiles.
fn sorted_timings(runs: usize, f: impl FnMut() -> Duration) -> Vec<Duration> {
    let mut timings: Vec<Duration> = std::iter::repeat_with(f).take(runs).collect();
    timings.sort();
    timings
}

/// Rounds of (b): each runs the split sandbox, one instance, and native on
/// one and two partitions once.
const TPCH_ROUNDS: usize = 5;

fn best_of(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

fn sandbox(cache: &Path, meter_fuel: bool) -> Sandbox {
    sandbox_with(cache, |config| config.meter_fuel = meter_fuel)
}

/// Set once from `--perf-map`, for every sandbox the benchmark makes.
static PERF_MAP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn config(cache: &Path) -> SandboxConfig {
    let mut config = SandboxConfig::new(cache);
    config.perf_map = PERF_MAP.load(std::sync::atomic::Ordering::Relaxed);
    config
}

fn sandbox_with(cache: &Path, configure: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    let mut config = config(cache);
    configure(&mut config);
    Sandbox::new(&config).expect("sandbox")
}

/// One run of a loaded guest: a fresh instance, the query, the policy.
fn run_guest(
    sandbox: &Sandbox,
    guest: &Guest,
    tables: &Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
) -> Duration {
    let started = Instant::now();
    std::hint::black_box(outcome_of(sandbox, guest, tables, sql, policy));
    started.elapsed()
}

/// One run of a loaded guest, its released result and metering.
fn outcome_of(
    sandbox: &Sandbox,
    guest: &Guest,
    tables: &Arc<dyn TableStore>,
    sql: &str,
    policy: &OutputPolicy,
) -> Outcome {
    sandbox
        .run(
            guest,
            Job {
                sql,
                tables: Arc::clone(tables),
                policy,
                privacy_budget: 0.0,
                as_of_unix_seconds: 1_764_460_800,
            },
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn tpch_dir(scale: f64) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/bench-data/tpch-sf{scale}"));
    if !dir.join("region.parquet").exists() {
        eprintln!(
            "generating TPC-H SF{scale} Parquet into {} (once)",
            dir.display()
        );
        std::fs::create_dir_all(&dir).expect("bench data dir");
        tpch::write_parquet(&dir, scale).expect("TPC-H data");
    }
    dir
}

/// The sandbox's figures.
#[derive(clap::Parser)]
struct Args {
    /// TPC-H scale factor for (b) and (c).
    #[arg(long, default_value_t = 1.0, value_parser = civicgrid_benches::positive_number)]
    scale: f64,
    /// (a) and (f) alone, for comparing two guest builds.
    #[arg(long)]
    compare_only: bool,
    /// (g) alone.
    #[arg(long, conflicts_with = "compare_only")]
    memory_only: bool,
    /// Write `/tmp/perf-<pid>.map` so that `perf record -p <pid>` then
    /// `perf report` name the guest's functions (see docs/sandbox.md).
    #[arg(long)]
    perf_map: bool,
    /// Rows per share of a split scan in (b) to (f), instead of the
    /// sandbox's default (`SHARE_ROWS`); 1048576 splits SF1's line items in
    /// six, as row groups did before shares had a size of their own.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    share_rows: Option<u64>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let (scale, compare_only) = (args.scale, args.compare_only);
    PERF_MAP.store(args.perf_map, std::sync::atomic::Ordering::Relaxed);
    let cache = tempfile::tempdir().expect("cache dir");
    let sql = sql_guest();
    if args.memory_only {
        memory_reuse(cache.path(), &sql);
        return;
    }
    let metered = sandbox(cache.path(), true);
    let owner = OutputPolicy::owner();
    let empty: Arc<dyn TableStore> = Arc::new(civicgrid_sandbox::LocalDirectory::new(
        cache.path(),
        Vec::<String>::new(),
    ));

    // (a) Cold start from the cache.
    let tiny = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "civicgrid_run") (result i32) i32.const 0))"#).unwrap();
    let compile_started = Instant::now();
    metered.load(&sql, GuestRole::Sql).expect("SQL guest");
    let compile = compile_started.elapsed();
    let from_cache = sandbox(cache.path(), true);
    let load_started = Instant::now();
    let sql_guest = from_cache
        .load(&sql, GuestRole::Sql)
        .expect("SQL guest from cache");
    let cache_load = load_started.elapsed();
    // Loaded once, as the marketplace does, and outside the timed loop:
    // loading hashes the module, and hashing the SQL guest's 98 MB between
    // runs evicted everything from the CPU caches, which made each run look
    // about three times slower than a run of the loaded guest.
    let tiny_guest = from_cache.load(&tiny, GuestRole::Sql).expect("tiny guest");
    let tiny_runs = sorted_timings(20_000, || {
        run_guest(&from_cache, &tiny_guest, &empty, "", &owner)
    });
    let sql_runs = sorted_timings(200, || {
        run_guest(&from_cache, &sql_guest, &empty, "select 1", &owner)
    });
    // The same planning and engine natively: what of `select 1` is
    // DataFusion's own fixed cost, and what the sandbox adds.
    let native_runs = sorted_timings(200, || {
        let started = Instant::now();
        run_native(Arc::clone(&empty), "select 1", &owner, 1).expect("native select 1");
        started.elapsed()
    });
    println!("(a) cold start, instantiate + first call, from the module cache");
    println!(
        "    SQL guest: compile {:.1} s, load compiled from the disk cache {:.1} ms",
        compile.as_secs_f64(),
        millis(cache_load)
    );
    println!(
        "    tiny guest: p50 {:.1} µs, p99 {:.1} µs (target < 50 µs)",
        micros(percentile(&tiny_runs, 0.5)),
        micros(percentile(&tiny_runs, 0.99))
    );
    println!(
        "    SQL guest, `select 1`: p50 {:.2} ms, p99 {:.2} ms (target < 5 ms)",
        millis(percentile(&sql_runs, 0.5)),
        millis(percentile(&sql_runs, 0.99))
    );
    println!(
        "    the same `select 1` natively (session, planning, policy, engine): p50 {:.2} ms, p99 {:.2} ms; sandbox/native at p50 {:.1}x",
        millis(percentile(&native_runs, 0.5)),
        millis(percentile(&native_runs, 0.99)),
        percentile(&sql_runs, 0.5).as_secs_f64() / percentile(&native_runs, 0.5).as_secs_f64()
    );

    // (b) TPC-H in the sandbox against the same engine natively.
    let dir = tpch_dir(scale);
    let tables: Arc<dyn TableStore> = match args.share_rows {
        Some(rows) => local_in_shares(&dir, rows),
        None => local(&dir),
    };
    println!(
        "    {} rows per share of a split scan",
        args.share_rows.unwrap_or(civicgrid_sandbox::SHARE_ROWS)
    );
    if !compare_only {
        tpch_against_native(
            cache.path(),
            &from_cache,
            &sql,
            &dir,
            &tables,
            &owner,
            scale,
        );
    }

    // (d) Small aggregate queries per second, 1 and 2 threads.
    let residents_dir = tempfile::tempdir().expect("residents");
    write_residents(residents_dir.path()).expect("residents data");
    let residents = local(residents_dir.path());
    let policy = residents_aggregate_policy();
    let small = "select district, count(*) from residents group by district";
    if !compare_only {
        println!("(d) small aggregate queries ({small}) per second");
    }
    let window = Duration::from_secs(3);
    // Loaded once, as the marketplace does: each query is a fresh instance.
    let small_guest = from_cache.load(&sql, GuestRole::Sql).expect("load");
    let mut single = 0.0;
    let thread_counts = if compare_only {
        [].as_slice()
    } else {
        [1usize, 2].as_slice()
    };
    for &threads in thread_counts {
        let done = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let started = Instant::now();
                    while started.elapsed() < window {
                        run_guest(&from_cache, &small_guest, &residents, small, &policy);
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        let qps = done.into_inner() as f64 / window.as_secs_f64();
        if threads == 1 {
            single = qps;
        }
        println!(
            "    {threads} thread(s): {qps:.0} queries/s ({:.2}x one thread)",
            qps / single
        );
    }

    // (f) This guest against another build of it.
    if let Some(other_path) = std::env::var_os("CIVICGRID_COMPARE_GUEST") {
        let other = std::fs::read(&other_path).expect("CIVICGRID_COMPARE_GUEST: a readable .wasm");
        compare_guests(
            &from_cache,
            (&sql, &other),
            &[
                ("select 1", &empty, "select 1", &owner),
                ("small aggregate (d)", &residents, small, &policy),
            ],
            &[("Q1", &tables, tpch::Q1), ("Q6", &tables, tpch::Q6)],
        );
    }

    if compare_only {
        return;
    }
    // (e) Fuel metering against epoch interruption alone.
    let unmetered = sandbox(cache.path(), false);
    println!("(e) fuel metering overhead, best of 3");
    // Planning is branchy code (a fuel counter per basic block); the scans
    // below are tight loops. `select 1` is nearly all planning.
    let unmetered_guest = unmetered.load(&sql, GuestRole::Sql).expect("load");
    let metered_select = sorted_timings(200, || {
        run_guest(&from_cache, &sql_guest, &empty, "select 1", &owner)
    });
    let unmetered_select = sorted_timings(200, || {
        run_guest(&unmetered, &unmetered_guest, &empty, "select 1", &owner)
    });
    println!(
        "    select 1: fuel + epochs p50 {:.2} ms, epochs only p50 {:.2} ms, overhead {:.1}%",
        millis(percentile(&metered_select, 0.5)),
        millis(percentile(&unmetered_select, 0.5)),
        100.0
            * (percentile(&metered_select, 0.5).as_secs_f64()
                / percentile(&unmetered_select, 0.5).as_secs_f64()
                - 1.0)
    );
    for (name, query) in [("Q1", tpch::Q1), ("Q6", tpch::Q6)] {
        let with_fuel = best_of(3, || {
            run_guest(&from_cache, &sql_guest, &tables, query, &owner)
        });
        let epoch_only = best_of(3, || {
            run_guest(&unmetered, &unmetered_guest, &tables, query, &owner)
        });
        println!(
            "    {name}: fuel + epochs {:.0} ms, epochs only {:.0} ms, overhead {:.1}%",
            millis(with_fuel),
            millis(epoch_only),
            (with_fuel.as_secs_f64() / epoch_only.as_secs_f64() - 1.0) * 100.0
        );
    }
    memory_reuse(cache.path(), &sql);
}

/// (g) The default pool, whose slots keep up to 16 MiB of touched pages and
/// reset them in place, against slots that hand every page back. Runs in
/// rounds that alternate which goes first, because this machine's speed
/// drifts by tens of percent within a minute; the figure is the median of
/// the rounds' ratios.
fn memory_reuse(cache: &Path, sql: &[u8]) {
    let residents_dir = tempfile::tempdir().expect("residents");
    write_residents(residents_dir.path()).expect("residents data");
    let residents = local(residents_dir.path());
    let policy = residents_aggregate_policy();
    let small = "select district, count(*) from residents group by district";
    let kept = sandbox(cache, true);
    let handed_back = sandbox_with(cache, |config| config.memory_keep_resident_bytes = 0);
    let pair = [
        (&kept, kept.load(sql, GuestRole::Sql).expect("load")),
        (
            &handed_back,
            handed_back.load(sql, GuestRole::Sql).expect("load"),
        ),
    ];
    println!("(g) memory kept resident in pool slots against handed back, {small}");
    if !civicgrid_sandbox::keeps_touched_pages_resident() {
        println!(
            "    this kernel has no PAGEMAP_SCAN (Linux 6.7+): both hand every page back, \
             so the ratio measures nothing"
        );
    }
    for threads in [1usize, 2] {
        let mut ratios = Vec::new();
        for round in 0..16 {
            let mut per_second = [0.0; 2];
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let (sandbox, guest) = &pair[which];
                let runs_per_thread = 100;
                let started = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        scope.spawn(|| {
                            for _ in 0..runs_per_thread {
                                run_guest(sandbox, guest, &residents, small, &policy);
                            }
                        });
                    }
                });
                per_second[which] =
                    (threads * runs_per_thread) as f64 / started.elapsed().as_secs_f64();
            }
            ratios.push(per_second[0] / per_second[1]);
        }
        ratios.sort_by(f64::total_cmp);
        let favoured = ratios.iter().filter(|ratio| **ratio > 1.0).count();
        println!(
            "    {threads} thread(s): kept/handed back, queries/s: median {:.2}x (range {:.2}-{:.2}x; kept faster in {favoured} of {} rounds)",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1],
            ratios.len()
        );
    }
}

/// Times `query` in DuckDB over the same Parquet files, with 1 and 2 threads.
fn duckdb(dir: &Path, query: &str) -> Option<Vec<(usize, Duration)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("duckdb_tpch.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(dir)
        .arg(query)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let times: Vec<(usize, Duration)> = text
        .lines()
        .filter_map(|line| {
            let (threads, seconds) = line.split_once(' ')?;
            Some((
                threads.parse().ok()?,
                Duration::from_secs_f64(seconds.parse().ok()?),
            ))
        })
        .collect();
    (!times.is_empty()).then_some(times)
}

/// A small query for [`compare_guests`]: label, tables, SQL, policy.
type SmallQuery<'a> = (&'a str, &'a Arc<dyn TableStore>, &'a str, &'a OutputPolicy);

/// (f) Two builds of the SQL guest, `this` and `other`, run after run
/// interleaved so both see the same machine: small queries 300 times each
/// (p50, p99), TPC-H queries best of 3. Fuel says how much Wasm each build
/// executes; time says what that costs once wasmtime has compiled it.
fn compare_guests(
    sandbox: &Sandbox,
    (this, other): (&[u8], &[u8]),
    small: &[SmallQuery<'_>],
    large: &[(&str, &Arc<dyn TableStore>, &str)],
) {
    let loaded_started = Instant::now();
    let other_guest = sandbox
        .load(other, GuestRole::Sql)
        .expect("the other guest");
    println!(
        "(f) this SQL guest ({} bytes) against CIVICGRID_COMPARE_GUEST ({} bytes, compiled in {:.1} s)",
        this.len(),
        other.len(),
        loaded_started.elapsed().as_secs_f64()
    );
    let this_guest = sandbox.load(this, GuestRole::Sql).expect("this guest");
    let fuel_of =
        |guest: &Guest, tables: &Arc<dyn TableStore>, sql: &str, policy: &OutputPolicy| {
            outcome_of(sandbox, guest, tables, sql, policy)
                .metering
                .fuel
        };
    for &(label, tables, sql, policy) in small {
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            mine.push(run_guest(sandbox, &this_guest, tables, sql, policy));
            theirs.push(run_guest(sandbox, &other_guest, tables, sql, policy));
        }
        mine.sort();
        theirs.sort();
        println!(
            "    {label}: fuel {} against {}; p50 {:.2} against {:.2} ms ({:.2}x), p99 {:.2} against {:.2} ms",
            fuel_of(&this_guest, tables, sql, policy),
            fuel_of(&other_guest, tables, sql, policy),
            millis(percentile(&mine, 0.5)),
            millis(percentile(&theirs, 0.5)),
            percentile(&mine, 0.5).as_secs_f64() / percentile(&theirs, 0.5).as_secs_f64(),
            millis(percentile(&mine, 0.99)),
            millis(percentile(&theirs, 0.99)),
        );
    }
    let owner = OutputPolicy::owner();
    for &(label, tables, sql) in large {
        let (mut mine, mut theirs) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            mine = mine.min(run_guest(sandbox, &this_guest, tables, sql, &owner));
            theirs = theirs.min(run_guest(sandbox, &other_guest, tables, sql, &owner));
        }
        println!(
            "    {label}: fuel {} against {}; best of 3 {:.0} against {:.0} ms ({:.2}x)",
            fuel_of(&this_guest, tables, sql, &owner),
            fuel_of(&other_guest, tables, sql, &owner),
            millis(mine),
            millis(theirs),
            mine.as_secs_f64() / theirs.as_secs_f64()
        );
    }
}

/// (b) and (c): TPC-H Q1 and Q6 in the sandbox, split and in one instance,
/// against the same engine natively and against DuckDB.
fn tpch_against_native(
    cache: &Path,
    from_cache: &Sandbox,
    sql: &[u8],
    dir: &Path,
    tables: &Arc<dyn TableStore>,
    owner: &OutputPolicy,
    scale: f64,
) {
    println!(
        "(b) TPC-H SF{scale}, best of {TPCH_ROUNDS} interleaved rounds, sandbox vs the same engine natively"
    );
    let mut one_instance_config = config(cache);
    one_instance_config.split_scans = false;
    let one_instance = Sandbox::new(&one_instance_config).expect("sandbox");
    let split_guest = from_cache.load(sql, GuestRole::Sql).expect("load");
    let whole_guest = one_instance.load(sql, GuestRole::Sql).expect("load");
    for (name, query) in [("Q1", tpch::Q1), ("Q6", tpch::Q6)] {
        let native = |partitions: usize| {
            let started = Instant::now();
            std::hint::black_box(
                run_native(Arc::clone(tables), query, owner, partitions).expect("native"),
            );
            started.elapsed()
        };
        // Each round runs every contender once, so a stretch when this
        // machine runs slow (its speed swings by a third within minutes)
        // lands on all of them, not on whichever ran in it: measured one
        // after another, best of 3 each, one slow stretch over the native
        // runs once printed Q1 at 1.44x where alternating processes gave
        // 1.76-2.07x.
        let mut best = [Duration::MAX; 4];
        for _round in 0..TPCH_ROUNDS {
            let times = [
                run_guest(from_cache, &split_guest, tables, query, owner),
                run_guest(&one_instance, &whole_guest, tables, query, owner),
                native(1),
                native(2),
            ];
            for (best, time) in best.iter_mut().zip(times) {
                *best = (*best).min(time);
            }
        }
        let [sandboxed, unsplit, native_one, native_two] = best;
        println!(
            "    {name}: sandbox {:.0} ms with scans split across instances, {:.0} ms in one instance ({:.2}x faster split)",
            millis(sandboxed),
            millis(unsplit),
            unsplit.as_secs_f64() / sandboxed.as_secs_f64()
        );
        for (partitions, native) in [(1, native_one), (2, native_two)] {
            println!(
                "    {name}: sandbox {:.0} ms, native {partitions} partition(s) {:.0} ms, ratio {:.2}x (target <= 1.5x)",
                millis(sandboxed),
                millis(native),
                sandboxed.as_secs_f64() / native.as_secs_f64()
            );
        }
        // (c) DuckDB on the same file.
        match duckdb(dir, query) {
            Some(times) => {
                for (threads, duck) in times {
                    println!(
                        "    {name}: DuckDB {threads} thread(s) {:.0} ms, sandbox / DuckDB {:.2}x",
                        millis(duck),
                        sandboxed.as_secs_f64() / duck.as_secs_f64()
                    );
                }
            }
            None => println!("    {name}: DuckDB not measured (pip install duckdb)"),
        }
    }
}
