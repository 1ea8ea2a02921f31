//! Hostile and broken guests: each run ends with its own typed error, and the
//! sandbox goes on serving the next run.

use std::sync::Arc;
use std::time::Duration;

use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{
    CacheOutcome, GuestRole, Job, Limits, LocalDirectory, Sandbox, SandboxConfig, SandboxError,
};

/// The protocol's minimum: memory and an entry point, here one that returns 0
/// after `body`.
fn guest(imports: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            {imports}
            (memory (export "memory") 1)
            (func (export "civicgrid_run") (result i32)
                {body}
                i32.const 0))"#
    ))
    .expect("test guest")
}

struct Fixture {
    sandbox: Sandbox,
    _cache: tempfile::TempDir,
    data: tempfile::TempDir,
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

fn fixture_with(configure: impl FnOnce(&mut SandboxConfig)) -> Fixture {
    let cache = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = SandboxConfig::new(cache.path());
    configure(&mut config);
    let sandbox = Sandbox::new(&config).unwrap();
    Fixture {
        sandbox,
        _cache: cache,
        data,
    }
}

impl Fixture {
    /// Runs `wasm` as an approved consumer algorithm.
    fn run(
        &self,
        wasm: &[u8],
        limits: &Limits,
    ) -> Result<civicgrid_sandbox::Outcome, SandboxError> {
        let guest = self.sandbox.load(wasm, GuestRole::Algorithm)?;
        let mut policy = OutputPolicy::owner();
        policy.approved_algorithms.push(guest.sha256().to_owned());
        let job = Job {
            sql: "",
            tables: Arc::new(LocalDirectory::new(self.data.path(), Vec::<String>::new())),
            policy: &policy,
            privacy_budget: 0.0,
            as_of_unix_seconds: 1_764_460_800,
        };
        self.sandbox.run(&guest, job, limits)
    }

    /// A well-behaved guest still runs: nothing a hostile one did leaked.
    fn still_serves(&self) {
        let outcome = self
            .run(&guest("", ""), &Limits::default())
            .expect("a good guest runs");
        assert!(outcome.batches.is_empty());
    }
}

const SPIN: &str = "(loop $forever br $forever)";

#[test]
fn an_infinite_loop_ends_at_the_fuel_budget() {
    let f = fixture();
    let limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    let err = f.run(&guest("", SPIN), &limits).unwrap_err();
    assert!(
        matches!(err, SandboxError::FuelExhausted { fuel: 5_000_000 }),
        "{err}"
    );
    f.still_serves();
}

/// More runs at once than the pool has instance slots: the extra runs wait
/// for a slot instead of failing, and one that gets none within its wall-time
/// limit ends with its own error while the others go on.
#[test]
fn runs_beyond_the_pool_wait_for_a_slot_within_their_time_limit() {
    let f = fixture_with(|config| config.max_concurrent_runs = 2);
    let counting = guest(
        "",
        "(local $i i32)
         (loop $more
            local.get $i i32.const 1 i32.add local.tee $i
            i32.const 20000000 i32.lt_u br_if $more)",
    );
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| f.run(&counting, &Limits::default())))
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    for outcome in &outcomes {
        assert!(outcome.is_ok(), "{:?}", outcome.as_ref().err());
    }

    let spinning = Limits {
        fuel: u64::MAX / 2,
        wall_time: Duration::from_secs(3),
        ..Limits::default()
    };
    let short = Limits {
        wall_time: Duration::from_millis(100),
        ..Limits::default()
    };
    std::thread::scope(|scope| {
        let spinners: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| f.run(&guest("", SPIN), &spinning)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let err = f.run(&guest("", ""), &short).unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::Busy {
                    slots: 2,
                    limit_ms: 100
                }
            ),
            "{err}"
        );
        for spinner in spinners {
            let err = spinner.join().unwrap().unwrap_err();
            assert!(matches!(err, SandboxError::Deadline { .. }), "{err}");
        }
    });
    f.still_serves();
}

#[test]
fn an_infinite_loop_ends_at_the_deadline_when_fuel_is_plentiful() {
    let f = fixture();
    let limits = Limits {
        fuel: u64::MAX / 2,
        wall_time: Duration::from_millis(50),
        ..Limits::default()
    };
    let started = std::time::Instant::now();
    let err = f.run(&guest("", SPIN), &limits).unwrap_err();
    assert!(
        matches!(err, SandboxError::Deadline { limit_ms: 50 }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline did not stop it"
    );
    f.still_serves();
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let f = fixture();
    // Grow by 64 KiB pages until growth fails; the limiter traps first.
    let body = r#"(loop $grow
        (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))"#;
    let limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let err = f.run(&guest("", body), &limits).unwrap_err();
    assert!(
        matches!(err, SandboxError::MemoryLimit { limit_bytes } if limit_bytes == 16 << 20),
        "{err}"
    );
    f.still_serves();
}

/// A module declaring more initial memory than a run may have never starts:
/// the run ends with the memory-limit error, and a module larger than the
/// pool's slots is refused when it is loaded (wasmtime checks that while
/// compiling for the pool), with both sizes in the message.
#[test]
fn a_module_that_starts_above_the_memory_limit_never_runs() {
    let f = fixture_with(|config| config.max_memory_bytes = 64 << 20);
    let starting_with = |pages: u32| {
        wat::parse_str(format!(
            r#"(module
                (memory (export "memory") {pages})
                (func (export "civicgrid_run") (result i32) i32.const 0))"#
        ))
        .unwrap()
    };
    let starts_with_two_mib = starting_with(32);
    let guest = f
        .sandbox
        .load(&starts_with_two_mib, GuestRole::Algorithm)
        .unwrap();
    assert_eq!(guest.initial_memory_bytes(), 2 << 20);
    let one_mib = Limits {
        memory_bytes: 1 << 20,
        ..Limits::default()
    };
    let err = f.run(&starts_with_two_mib, &one_mib).unwrap_err();
    assert!(
        matches!(err, SandboxError::MemoryLimit { limit_bytes } if limit_bytes == 1 << 20),
        "{err}"
    );
    let two_mib = Limits {
        memory_bytes: 2 << 20,
        ..Limits::default()
    };
    f.run(&starts_with_two_mib, &two_mib)
        .expect("a run allowed exactly the initial memory starts");

    let larger_than_a_slot = starting_with(1025);
    let err = f
        .sandbox
        .load(&larger_than_a_slot, GuestRole::Algorithm)
        .err()
        .expect("a module larger than a pool slot is refused at load");
    assert!(
        matches!(&err, SandboxError::InvalidModule(message)
            if message.contains("67174400") && message.contains("pooling allocator")),
        "{err}"
    );
    f.still_serves();
}

#[test]
fn deep_recursion_exhausts_the_stack() {
    let f = fixture();
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (func $down (param i64) (result i64)
                (i64.add (call $down (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))
            (func (export "civicgrid_run") (result i32)
                (drop (call $down (i64.const 0)))
                i32.const 0))"#,
    )
    .unwrap();
    let err = f.run(&wasm, &Limits::default()).unwrap_err();
    assert!(matches!(err, SandboxError::StackOverflow), "{err}");
    f.still_serves();
}

#[test]
fn huge_output_hits_the_size_cap() {
    let f = fixture();
    // Emits 2 MiB at once; the cap stops it before any of it is parsed.
    let wasm = wat::parse_str(
        r#"(module
            (import "civicgrid" "emit" (func $emit (param i32 i32)))
            (memory (export "memory") 32)
            (func (export "civicgrid_run") (result i32)
                (call $emit (i32.const 0) (i32.const 2097152))
                i32.const 0))"#,
    )
    .unwrap();
    let limits = Limits {
        max_output_bytes: 1 << 20,
        ..Limits::default()
    };
    let err = f.run(&wasm, &limits).unwrap_err();
    assert!(
        matches!(err, SandboxError::ResultTooLarge { limit_bytes, rule: "sandbox.max_output_bytes" } if limit_bytes == 1 << 20),
        "{err}"
    );
    f.still_serves();
}

#[test]
fn importing_sockets_or_files_does_not_link() {
    let f = fixture();
    for (name, signature) in [
        ("sock_accept", "(param i32 i32 i32) (result i32)"),
        ("sock_recv", "(param i32 i32 i32 i32 i32 i32) (result i32)"),
        (
            "path_open",
            "(param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)",
        ),
    ] {
        let wasm = guest(
            &format!(r#"(import "wasi_snapshot_preview1" "{name}" (func {signature}))"#),
            "",
        );
        let err = f.run(&wasm, &Limits::default()).unwrap_err();
        match err {
            SandboxError::Link { module, name: got } => {
                assert_eq!(
                    (module.as_str(), got.as_str()),
                    ("wasi_snapshot_preview1", name)
                );
            }
            other => panic!("{name}: expected a link error, got {other}"),
        }
    }
    f.still_serves();
}

#[test]
fn the_guest_sees_no_preopened_directory_and_no_environment() {
    let f = fixture();
    // fd 3 is where WASI puts the first preopened directory: there is none.
    let wasm = guest(
        r#"(import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))"#,
        r#"(if (i32.ne (call $prestat (i32.const 3) (i32.const 0)) (i32.const 8)) (then unreachable))
           (drop (call $env (i32.const 0) (i32.const 4)))
           (if (i32.ne (i32.load (i32.const 0)) (i32.const 0)) (then unreachable))"#,
    );
    f.run(&wasm, &Limits::default())
        .expect("EBADF for fd 3 and an empty environment");
}

#[test]
fn a_malformed_module_is_refused_and_a_trap_is_reported() {
    let f = fixture();
    let err = f
        .run(b"\0asm\x01\0\0\0garbage", &Limits::default())
        .unwrap_err();
    assert!(matches!(err, SandboxError::InvalidModule(_)), "{err}");
    let err = f
        .run(
            &wat::parse_str("(module (memory (export \"memory\") 1))").unwrap(),
            &Limits::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, SandboxError::InvalidModule(m) if m.contains("civicgrid_run")),
        "{err}"
    );
    let err = f
        .run(&guest("", "unreachable"), &Limits::default())
        .unwrap_err();
    assert_trapped_at_unreachable(&err);
    f.still_serves();
}

#[test]
fn an_unapproved_algorithm_does_not_run() {
    let f = fixture();
    let wasm = guest("", "");
    let guest = f.sandbox.load(&wasm, GuestRole::Algorithm).unwrap();
    let mut policy = OutputPolicy::owner();
    let job = |policy: &OutputPolicy| {
        let job = Job {
            sql: "",
            tables: Arc::new(LocalDirectory::new(f.data.path(), Vec::<String>::new())),
            policy,
            privacy_budget: 0.0,
            as_of_unix_seconds: 1_764_460_800,
        };
        f.sandbox.run(&guest, job, &Limits::default())
    };
    let err = job(&policy).unwrap_err();
    assert!(
        matches!(&err, SandboxError::AlgorithmNotApproved { sha256 } if sha256 == guest.sha256()),
        "{err}"
    );
    policy.approved_algorithms.push(guest.sha256().to_owned());
    job(&policy).expect("approved by hash, it runs");
}

#[test]
fn wide_arithmetic_runs_and_computes_128_bit_results() {
    // The SQL guest is built with the wide-arithmetic proposal (Decimal128
    // sums and products, hashing): the engine must accept its instructions and
    // compute them exactly. Any wrong half traps.
    let f = fixture();
    let wasm = guest(
        "",
        r#"
        ;; (2^64 - 1)^2 = 2^128 - 2^65 + 1: high half 2^64 - 2, low half 1.
        (i64.mul_wide_u (i64.const -1) (i64.const -1))
        (if (i64.ne (i64.const -2)) (then unreachable))
        (if (i64.ne (i64.const 1)) (then unreachable))
        ;; -3 * 5 = -15, sign-extended into the high half.
        (i64.mul_wide_s (i64.const -3) (i64.const 5))
        (if (i64.ne (i64.const -1)) (then unreachable))
        (if (i64.ne (i64.const -15)) (then unreachable))
        ;; (2^64 - 1) + 1 carries into the high half: (0, 1).
        (i64.add128 (i64.const -1) (i64.const 0) (i64.const 1) (i64.const 0))
        (if (i64.ne (i64.const 1)) (then unreachable))
        (if (i64.ne (i64.const 0)) (then unreachable))
        ;; 0 - 1 borrows from the high half: (2^64 - 1, -1).
        (i64.sub128 (i64.const 0) (i64.const 0) (i64.const 1) (i64.const 0))
        (if (i64.ne (i64.const -1)) (then unreachable))
        (if (i64.ne (i64.const -1)) (then unreachable))
        "#,
    );
    f.run(&wasm, &Limits::default())
        .expect("wide arithmetic is enabled and exact");
    // The same checks with one wrong expectation must trap, or the test above
    // proves nothing.
    let wrong = guest(
        "",
        "(i64.mul_wide_u (i64.const -1) (i64.const -1)) drop
         (if (i64.ne (i64.const 2)) (then unreachable))",
    );
    let err = f.run(&wrong, &Limits::default()).unwrap_err();
    assert_trapped_at_unreachable(&err);
}

#[test]
fn fuel_is_deterministic_and_proportional_to_work() {
    let f = fixture();
    let wasm = |n: u32| {
        wat::parse_str(format!(
            r#"(module (memory (export "memory") 1)
                (func (export "civicgrid_run") (result i32) (local i32)
                  (loop $l (local.set 0 (i32.add (local.get 0) (i32.const 1)))
                           (br_if $l (i32.lt_u (local.get 0) (i32.const {n}))))
                  i32.const 0))"#
        ))
        .unwrap()
    };
    let fuel = |n| f.run(&wasm(n), &Limits::default()).unwrap().metering.fuel;
    let (a, b, c) = (fuel(100_000), fuel(100_000), fuel(200_000));
    assert_eq!(a, b, "the same run must cost the same fuel");
    assert!(
        c > a * 19 / 10 && c < a * 21 / 10,
        "twice the work, about twice the fuel: {a} vs {c}"
    );
}

/// A run that fails is metered like one that completes, so that it can be
/// billed: a trap after some work reports the fuel of that work, a run out
/// of fuel its whole budget, and a run refused before it started none.
#[test]
fn a_failed_run_reports_the_fuel_it_burnt() {
    let f = fixture();
    let counting = |then: &str| {
        wat::parse_str(format!(
            r#"(module (memory (export "memory") 1)
                (func (export "civicgrid_run") (result i32) (local i32)
                  (loop $l (local.set 0 (i32.add (local.get 0) (i32.const 1)))
                           (br_if $l (i32.lt_u (local.get 0) (i32.const 100000))))
                  {then}
                  i32.const 0))"#
        ))
        .unwrap()
    };
    let run_metered = |wasm: &[u8], limits: &Limits, approve: bool| {
        let guest = f.sandbox.load(wasm, GuestRole::Algorithm).unwrap();
        let mut policy = OutputPolicy::owner();
        if approve {
            policy.approved_algorithms.push(guest.sha256().to_owned());
        }
        let job = Job {
            sql: "",
            tables: Arc::new(LocalDirectory::new(f.data.path(), Vec::<String>::new())),
            policy: &policy,
            privacy_budget: 0.0,
            as_of_unix_seconds: 1_764_460_800,
        };
        f.sandbox.run_metered(&guest, job, limits)
    };
    let completed = run_metered(&counting(""), &Limits::default(), true)
        .unwrap()
        .metering
        .fuel;

    let trapped = run_metered(&counting("unreachable"), &Limits::default(), true).unwrap_err();
    assert_trapped_at_unreachable(&trapped.error);
    assert!(
        trapped.fuel.abs_diff(completed) <= 2,
        "the same work up to the trap: {} against {completed}",
        trapped.fuel
    );
    assert_eq!(trapped.compute_units(), completed.div_ceil(1_000_000));

    let budget = Limits {
        fuel: completed / 2,
        ..Limits::default()
    };
    let starved = run_metered(&counting(""), &budget, true).unwrap_err();
    assert!(
        matches!(starved.error, SandboxError::FuelExhausted { fuel } if fuel == completed / 2),
        "{starved}"
    );
    assert_eq!(starved.fuel, completed / 2, "the whole budget");

    let refused = run_metered(&counting(""), &Limits::default(), false).unwrap_err();
    assert!(
        matches!(refused.error, SandboxError::AlgorithmNotApproved { .. }),
        "{refused}"
    );
    assert_eq!(refused.fuel, 0, "nothing ran");
}

#[test]
fn a_corrupt_or_truncated_cache_entry_is_rebuilt_never_loaded() {
    let cache = tempfile::tempdir().unwrap();
    let wasm = guest("", "");
    let config = SandboxConfig::new(cache.path());
    let first = Sandbox::new(&config).unwrap();
    let loaded = first.load(&wasm, GuestRole::Sql).unwrap();
    assert_eq!(loaded.cache_outcome(), CacheOutcome::Compiled);
    let path = first.cache_path(loaded.sha256());
    // The cache maps what it loads; nothing loaded may still map the files
    // this test rewrites in place (the cache itself only ever renames).
    drop((loaded, first));
    // What a fresh process would find in the cache.
    let load_again = || {
        Sandbox::new(&config)
            .unwrap()
            .load(&wasm, GuestRole::Sql)
            .unwrap()
            .cache_outcome()
    };

    assert_eq!(load_again(), CacheOutcome::Hit);

    // Flip one byte in the compiled code.
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let sandbox = Sandbox::new(&config).unwrap();
    let reloaded = sandbox.load(&wasm, GuestRole::Sql).unwrap();
    assert_eq!(reloaded.cache_outcome(), CacheOutcome::Rebuilt);
    let data = tempfile::tempdir().unwrap();
    let policy = OutputPolicy::owner();
    sandbox
        .run(
            &reloaded,
            Job {
                sql: "",
                tables: Arc::new(LocalDirectory::new(data.path(), Vec::<String>::new())),
                policy: &policy,
                privacy_budget: 0.0,
                as_of_unix_seconds: 1_764_460_800,
            },
            &Limits::default(),
        )
        .expect("the rebuilt module runs");
    drop((reloaded, sandbox));

    // Truncated to a few bytes.
    std::fs::write(&path, &bytes[..10]).unwrap();
    assert_eq!(load_again(), CacheOutcome::Rebuilt);
    assert_eq!(load_again(), CacheOutcome::Hit);

    // The checksum beside it lost, or not the artifact's.
    let checksum = path.with_extension("cwasm.sha256");
    for damage in [
        |checksum: &std::path::Path| std::fs::remove_file(checksum).unwrap(),
        |checksum: &std::path::Path| std::fs::write(checksum, [0u8; 32]).unwrap(),
    ] {
        damage(&checksum);
        assert_eq!(load_again(), CacheOutcome::Rebuilt);
        assert!(checksum.exists(), "the rebuild stores a new checksum");
    }
}

/// Pool slots keep the pages a run touched and reset them in place (see
/// `SandboxConfig::memory_keep_resident_bytes`); the next run in the slot
/// must still start from the module's own image: its data back, the rest
/// zero, grown pages gone. One slot, so every run reuses the last one's.
#[test]
fn a_run_never_sees_what_an_earlier_run_left_in_memory() {
    let dirtying = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (data (i32.const 16) "seed")
            (func (export "civicgrid_run") (result i32)
                (if (i32.ne (i32.load (i32.const 16)) (i32.const 0x64656573))
                    (then unreachable))
                (if (i32.ne (i32.load (i32.const 4096)) (i32.const 0))
                    (then unreachable))
                (if (i32.ne (memory.size) (i32.const 1))
                    (then unreachable))
                (i32.store (i32.const 16) (i32.const -1))
                (i32.store (i32.const 4096) (i32.const -1))
                (drop (memory.grow (i32.const 1)))
                (if (i32.ne (i32.load (i32.const 65540)) (i32.const 0))
                    (then unreachable))
                (i32.store (i32.const 65540) (i32.const -1))
                i32.const 0))"#,
    )
    .expect("test guest");
    for keep_resident in [0, 16 << 20] {
        let f = fixture_with(|config| {
            config.max_concurrent_runs = 1;
            config.memory_keep_resident_bytes = keep_resident;
        });
        for run in 0..4 {
            if let Err(error) = f.run(&dirtying, &Limits::default()) {
                panic!("run {run} with {keep_resident} bytes kept resident: {error}");
            }
        }
    }
}

/// A component of the `algorithm` world (sandbox/wit/algorithm.wit) whose
/// `run` does `body` and then returns the `result<_, failure>` stored at
/// address 16 (all zeros, `ok`, unless `data` writes there). It imports
/// `imports` besides.
fn algorithm_component(imports: &str, body: &str, data: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component
            {imports}
            (core module $m
                (memory (export "memory") 1)
                {data}
                (func (export "run") (result i32)
                    {body}
                    i32.const 16))
            (core instance $i (instantiate $m))
            (type $failure' (variant (case "query" string) (case "execution" string)))
            (export $failure "failure" (type $failure'))
            (func $run (result (result (error $failure)))
                (canon lift (core func $i "run") (memory (core memory $i "memory"))))
            (export "run" (func $run)))"#
    ))
    .expect("test component")
}

#[test]
fn a_component_algorithm_runs_under_the_same_limits_as_a_module() {
    let f = fixture();
    let outcome = f
        .run(&algorithm_component("", "", ""), &Limits::default())
        .expect("a component that returns ok runs");
    assert!(outcome.batches.is_empty());
    assert!(outcome.metering.fuel > 0, "components are metered too");

    let limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    let err = f
        .run(&algorithm_component("", SPIN, ""), &limits)
        .unwrap_err();
    assert!(
        matches!(err, SandboxError::FuelExhausted { fuel: 5_000_000 }),
        "{err}"
    );

    let bomb = r#"(loop $grow
        (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))"#;
    let limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let err = f
        .run(&algorithm_component("", bomb, ""), &limits)
        .unwrap_err();
    assert!(
        matches!(err, SandboxError::MemoryLimit { limit_bytes } if limit_bytes == 16 << 20),
        "{err}"
    );

    let err = f
        .run(
            &algorithm_component("", "unreachable", ""),
            &Limits::default(),
        )
        .unwrap_err();
    assert_trapped_at_unreachable(&err);
    f.still_serves();
}

/// `run` returning `err(query("bad input"))`: the consumer gets the
/// algorithm's own words as an invalid-query error.
#[test]
fn a_component_algorithm_reports_its_failure_in_its_own_words() {
    let f = fixture();
    // result<_, failure> at 16: discriminant 1 (err); at 20 the failure's
    // case 0 (query); at 24 and 28 the string's pointer (32) and length.
    let data = r#"(data (i32.const 16) "\01\00\00\00\00\00\00\00\20\00\00\00\09\00\00\00")
                  (data (i32.const 32) "bad input")"#;
    let err = f
        .run(&algorithm_component("", "", data), &Limits::default())
        .unwrap_err();
    assert!(
        matches!(&err, SandboxError::Query(m) if m == "bad input"),
        "{err}"
    );
    // Case 1 is `execution`.
    let data = r#"(data (i32.const 16) "\01\00\00\00\01\00\00\00\20\00\00\00\04\00\00\00")
                  (data (i32.const 32) "oops")"#;
    let err = f
        .run(&algorithm_component("", "", data), &Limits::default())
        .unwrap_err();
    assert!(
        matches!(&err, SandboxError::Execution(m) if m == "oops"),
        "{err}"
    );
}

#[test]
fn a_component_importing_anything_but_the_host_interface_does_not_link() {
    let f = fixture();
    for interface in [
        "wasi:sockets/tcp@0.2.0",
        "wasi:filesystem/types@0.2.0",
        "wasi:cli/environment@0.2.0",
    ] {
        let wasm = algorithm_component(
            &format!(r#"(import "{interface}" (instance (export "f" (func))))"#),
            "",
            "",
        );
        match f.run(&wasm, &Limits::default()).unwrap_err() {
            SandboxError::Link { module, .. } => assert_eq!(module, interface),
            other => panic!("{interface}: expected a link error, got {other}"),
        }
    }
    f.still_serves();
}

#[test]
fn a_component_of_another_world_or_in_the_sql_role_is_refused_when_loaded() {
    let f = fixture();
    let nothing = wat::parse_str("(component)").unwrap();
    let err = f
        .sandbox
        .load(&nothing, GuestRole::Algorithm)
        .err()
        .expect("a component exporting no `run` is refused");
    assert!(
        matches!(&err, SandboxError::InvalidModule(m) if m.contains("`algorithm` world")),
        "{err}"
    );
    let err = f
        .sandbox
        .load(&algorithm_component("", "", ""), GuestRole::Sql)
        .err()
        .expect("the SQL role takes core modules only");
    assert!(
        matches!(&err, SandboxError::InvalidModule(m) if m.contains("core module")),
        "{err}"
    );
}

#[test]
fn a_corrupt_cached_component_is_rebuilt_never_loaded() {
    let cache = tempfile::tempdir().unwrap();
    let sandbox = || Sandbox::new(&SandboxConfig::new(cache.path())).unwrap();
    let wasm = algorithm_component("", "", "");
    let first = sandbox().load(&wasm, GuestRole::Algorithm).unwrap();
    assert_eq!(first.cache_outcome(), CacheOutcome::Compiled);
    let second = sandbox().load(&wasm, GuestRole::Algorithm).unwrap();
    assert_eq!(second.cache_outcome(), CacheOutcome::Hit);
    let path = sandbox().cache_path(first.sha256());
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let third = sandbox().load(&wasm, GuestRole::Algorithm).unwrap();
    assert_eq!(third.cache_outcome(), CacheOutcome::Rebuilt);
}

/// The run ended at the guest's `unreachable` instruction, and was reported as
/// a trap.
fn assert_trapped_at_unreachable(err: &SandboxError) {
    assert!(
        matches!(err, SandboxError::Trap(m) if m.contains("unreachable")),
        "{err}"
    );
}

/// A guest opens a scan of a one-column table and pushes `predicates` (raw
/// bytes, as a guest may send anything) down onto it.
fn filtering_guest(predicates: &str) -> Vec<u8> {
    let escaped: String = predicates.bytes().map(|b| format!("\\{b:02x}")).collect();
    wat::parse_str(format!(
        r#"(module
            (import "civicgrid" "scan_open" (func $open (param i32 i32 i32) (result i32)))
            (import "civicgrid" "scan_filter" (func $filter (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "\00\00\00\00")
            (data (i32.const 16) "{escaped}")
            (func (export "civicgrid_run") (result i32)
                (call $filter
                    (call $open (i32.const 0) (i32.const 0) (i32.const 1))
                    (i32.const 16)
                    (i32.const {len}))
                i32.const 0))"#,
        len = predicates.len()
    ))
    .expect("test guest")
}

#[test]
fn a_scan_filter_the_host_cannot_apply_ends_the_run_naming_what_is_wrong() {
    let f = fixture();
    let ids = arrow_array::RecordBatch::try_from_iter([(
        "id",
        Arc::new(arrow_array::Int64Array::from(vec![1, 2, 3])) as arrow_array::ArrayRef,
    )])
    .unwrap();
    let file = std::fs::File::create(f.data.path().join("ids.parquet")).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, ids.schema(), None).unwrap();
    writer.write(&ids).unwrap();
    writer.close().unwrap();
    let run = |predicates: &str| {
        let guest = f
            .sandbox
            .load(&filtering_guest(predicates), GuestRole::Algorithm)
            .unwrap();
        let mut policy = OutputPolicy::owner();
        policy.approved_algorithms.push(guest.sha256().to_owned());
        let job = Job {
            sql: "",
            tables: Arc::new(LocalDirectory::new(f.data.path(), ["ids"])),
            policy: &policy,
            privacy_budget: 0.0,
            as_of_unix_seconds: 1_764_460_800,
        };
        f.sandbox.run(&guest, job, &Limits::default())
    };
    // A well-formed filter on the scan's one column is taken.
    run(r#"[{"column":0,"op":"gt_eq","value":{"type":"int","value":2}}]"#).expect("a valid filter");
    let cases = [
        (
            r#"[{"column":3,"op":"eq","value":{"type":"int","value":1}}]"#,
            "scan filter: the scan has 1 columns, no column 3",
        ),
        (
            r#"[{"column":0,"op":"eq","value":{"type":"utf8","value":"x"}}]"#,
            "scan filter on column id: a Int64 column cannot be compared with Utf8(\"x\")",
        ),
        ("not json", "scan filter: expected ident"),
    ];
    for (predicates, expected) in cases {
        let err = run(predicates).unwrap_err();
        assert!(
            matches!(&err, SandboxError::Trap(m) if m.contains(expected)),
            "{predicates}: {err}"
        );
    }
    f.still_serves();
}
