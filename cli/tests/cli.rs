//! The two binaries as people use them: `civicgrid-marketplace init` and
//! `serve`, then the `civicgrid` CLI for a provider, the platform, a consumer
//! and a regulator — the sequence docs/marketplace.md walks through — ending
//! with `audit verify` catching an edit made directly in the database.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server binary of the marketplace crate. Cargo names only this
/// package's binaries to its tests; the server's lands beside them when the
/// workspace is built (`cargo build --workspace`, as scripts/test.sh does).
fn server_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_civicgrid")).with_file_name("civicgrid-marketplace");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p civicgrid-marketplace` first",
        path.display()
    );
    path
}

fn marketplace(data_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(server_binary());
    command
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn");
    command
}

/// Runs the CLI; returns (exit code, stdout, stderr).
fn civicgrid(server: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_civicgrid"))
        .args(args)
        .env("CIVICGRID_SERVER", server)
        .env("CIVICGRID_TOKEN", token)
        .output()
        .expect("civicgrid runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json(server: &str, token: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = civicgrid(server, token, &all);
    assert_eq!(code, 0, "civicgrid {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{args:?}: {error}: {stdout}"))
}

fn token_for(server: &str, admin: &str, org: &str, name: &str, role: &str) -> String {
    let user = json(
        server,
        admin,
        &["user", "create", "--org", org, "--name", name],
    );
    let user_id = user["id"].as_str().unwrap().to_owned();
    json(
        server,
        admin,
        &["role", "grant", "--user", &user_id, "--role", role],
    );
    json(server, admin, &["token", "issue", "--user", &user_id])["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn cli_walks_registration_contract_and_audit_and_verify_catches_tampering() {
    let data = tempfile::tempdir().unwrap();
    let spec = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/products/population.json"
    );

    let init = marketplace(data.path(), &["init", "--admin-name", "admin@city.example"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let admin = String::from_utf8(init.stdout).unwrap().trim().to_owned();
    assert!(admin.starts_with("cgt_"));
    let again = marketplace(data.path(), &["init", "--admin-name", "x"])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a second init is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("initialised already"));

    let sample = marketplace(data.path(), &["sample-data", "--rows", "500"])
        .output()
        .unwrap();
    assert!(
        sample.status.success(),
        "{}",
        String::from_utf8_lossy(&sample.stderr)
    );

    let key = marketplace(data.path(), &["verifier-key"])
        .output()
        .unwrap();
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("civicgrid.local/audit+"), "{key}");

    let mut child = marketplace(data.path(), &["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // The server turned transparent huge pages off before serving (see
    // civicgrid_marketplace::process).
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let thp = status
            .lines()
            .find(|line| line.starts_with("THP_enabled:"))
            .unwrap_or_else(|| panic!("no THP_enabled line in {status}"));
        assert_eq!(thp.split_whitespace().nth(1), Some("0"), "{thp}");
    }
    let _server = Server(child);
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_owned();
    let server = format!("http://{address}");

    for (id, kind) in [
        ("city-data", "provider"),
        ("acme", "consumer"),
        ("audit-office", "regulator"),
    ] {
        json(
            &server,
            &admin,
            &["org", "create", id, "--name", id, "--kind", kind],
        );
    }
    let provider = token_for(
        &server,
        &admin,
        "city-data",
        "pa@city-data",
        "provider-admin",
    );
    let consumer = token_for(&server, &admin, "acme", "ca@acme", "consumer-admin");
    let regulator = token_for(
        &server,
        &admin,
        "audit-office",
        "inspector@audit",
        "regulator",
    );

    let draft = json(
        &server,
        &provider,
        &["product", "create", "population", "--spec", spec],
    );
    assert_eq!(draft["state"], "PRODUCT_STATE_DRAFT");
    json(&server, &provider, &["product", "submit", "population"]);
    json(
        &server,
        &admin,
        &["product", "notice", "population", "--days", "0"],
    );
    let registered = json(&server, &admin, &["product", "approve", "population"]);
    // Measured from the sample data: 500 residents × 4 columns, 10 household
    // sizes missing, 5 blank age bands.
    let measured = |name: &str| registered["spec"]["quality"][name].as_f64().unwrap();
    assert!((measured("completeness") - 1990.0 / 2000.0).abs() < 1e-12);
    assert!((measured("validity") - 1985.0 / 1990.0).abs() < 1e-12);
    assert!(
        registered["registrationNumber"]
            .as_str()
            .unwrap()
            .starts_with("CG-")
    );
    json(&server, &provider, &["product", "publish", "population"]);

    let catalog = json(&server, &consumer, &["catalog", "--keyword", "census"]);
    assert_eq!(catalog["products"][0]["id"], "population");
    let (code, table, _) = civicgrid(&server, &consumer, &["catalog"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("population") && table.contains("PRODUCT_STATE_PUBLISHED"),
        "{table}"
    );

    let contract = json(
        &server,
        &consumer,
        &[
            "contract",
            "request",
            "population",
            "--plan",
            "per-query",
            "--aggregate",
            "--days",
            "30",
            "--purpose",
            "bus planning",
        ],
    );
    let contract_id = contract["id"].as_str().unwrap().to_owned();
    json(&server, &provider, &["contract", "approve", &contract_id]);

    // The provider appends a day's residents as CSV: the first version
    // carries the folder's rows over and adds these.
    let day = data.path().join("2026-12-07.csv");
    let mut csv = String::from("district,age_band,household_size,person_id\n");
    for id in 0..30 {
        csv.push_str(&format!("new-town,30-39,2,{}\n", 9_000_000 + id));
    }
    std::fs::write(&day, csv).unwrap();
    let day_arg = day.to_str().unwrap();
    let committed = json(
        &server,
        &provider,
        &[
            "product",
            "upload",
            "population",
            "--table",
            "residents",
            "--file",
            day_arg,
            "--append",
        ],
    );
    assert_eq!(committed["upload"]["state"], "ingested", "{committed}");
    assert_eq!(committed["version"]["version"], "1", "{committed}");
    let versions = json(&server, &consumer, &["product", "versions", "population"]);
    assert_eq!(
        versions["versions"][0]["fingerprint"],
        committed["version"]["fingerprint"]
    );
    assert!(
        versions["versions"][0]["tables"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "the consumer sees no files: {versions}"
    );
    let (code, _, stderr) = civicgrid(
        &server,
        &consumer,
        &[
            "product",
            "upload",
            "population",
            "--table",
            "residents",
            "--file",
            day_arg,
        ],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("NotFound"),
        "a consumer cannot upload: {stderr}"
    );
    let (code, _, _) = civicgrid(
        &server,
        &consumer,
        &[
            "contract",
            "check",
            "population",
            "--operation",
            "aggregate-sql",
        ],
    );
    assert_eq!(code, 0, "aggregate SQL is allowed");
    let (code, _, _) = civicgrid(
        &server,
        &consumer,
        &[
            "contract",
            "check",
            "population",
            "--operation",
            "list-sql",
            "--column",
            "district",
        ],
    );
    assert_eq!(code, 3, "list SQL was not part of the contract");

    // Bad input names the field, and the CLI exits 1 with the status.
    let (code, _, stderr) = civicgrid(
        &server,
        &provider,
        &["product", "retire", "population", "--reason", ""],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("InvalidArgument: invalid reason: is required"),
        "{stderr}"
    );
    let (code, _, stderr) = civicgrid(&server, &consumer, &["product", "notice", "population"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("product:review"),
        "{stderr}"
    );

    // The regulator saves a checkpoint, verifies, and catches an edit.
    let saved = data.path().join("saved.checkpoint");
    let saved_arg = saved.to_str().unwrap();
    json(
        &server,
        &regulator,
        &["audit", "checkpoint", "--save", saved_arg],
    );
    let verified = json(
        &server,
        &regulator,
        &["audit", "verify", "--key", &key, "--checkpoint", saved_arg],
    );
    assert_eq!(verified["verified"], true, "{verified}");
    let entries = json(
        &server,
        &regulator,
        &["audit", "entries", "--kind-prefix", "contract."],
    );
    assert_eq!(
        entries["entries"].as_array().unwrap().len(),
        2,
        "requested and approved"
    );

    // By hand, as docs/audit.md shows: raw entries, the stdlib script, the
    // checkpoint's size and root lines.
    let note = std::fs::read_to_string(&saved).unwrap();
    let mut lines = note.lines();
    let (_origin, size, root) = (
        lines.next().unwrap(),
        lines.next().unwrap(),
        lines.next().unwrap(),
    );
    let (code, raw, stderr) = civicgrid(
        &server,
        &regulator,
        &["audit", "entries", "--raw", "--end", size],
    );
    assert_eq!(code, 0, "{stderr}");
    let raw_file = data.path().join("entries.jsonl");
    std::fs::write(&raw_file, raw).unwrap();
    let by_hand = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tools/audit/merkle_root.py"
        ))
        .arg(&raw_file)
        .output()
        .unwrap();
    assert!(
        by_hand.status.success(),
        "{}",
        String::from_utf8_lossy(&by_hand.stderr)
    );
    assert_eq!(
        String::from_utf8(by_hand.stdout).unwrap(),
        format!("{size}\n{root}\n")
    );

    let database = data.path().join("marketplace.db");
    let edit = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute(\"UPDATE audit_entries SET body = CAST(replace(CAST(body AS TEXT), 'bus planning', 'nothing to see') AS BLOB) WHERE kind = 'contract.requested'\"); c.commit()",
            database.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(edit.success());
    let (code, stdout, _) = civicgrid(
        &server,
        &regulator,
        &[
            "--output",
            "json",
            "audit",
            "verify",
            "--key",
            &key,
            "--checkpoint",
            saved_arg,
        ],
    );
    assert_eq!(code, 2, "tampering is an exit code of its own: {stdout}");
    assert!(stdout.contains("was rewritten"), "{stdout}");
}

/// Each query limit flag with a value out of its range, and the range.
const LIMITS_OUT_OF_RANGE: [(&str, &str, &str); 5] = [
    ("--query-wall-time-secs", "0", "between 1 and 3600 seconds"),
    ("--query-memory-mib", "5000", "between 1 and 4096 MiB"),
    ("--concurrent-queries", "0", "between 1 and 1024"),
    ("--max-compute-units", "0", "at least 1"),
    ("--platform-fee-bps", "10001", "between 0 and 10000"),
];

fn assert_refused_naming(output: &std::process::Output, flag: &str, value: &str, range: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{flag} {value} was accepted");
    assert!(
        stderr.contains(&format!("{flag}: {range}")),
        "{flag} {value}: {stderr}"
    );
}

/// A query limit out of range stops `serve` before it listens, with the flag
/// at fault and its range; nothing is served half-configured.
#[test]
fn serve_refuses_query_limits_out_of_range_naming_the_flag() {
    let data = tempfile::tempdir().unwrap();
    let no_guest_needed = data.path().join("never-read.wasm");
    for (flag, value, range) in LIMITS_OUT_OF_RANGE {
        let output = marketplace(
            data.path(),
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--sql-guest",
                no_guest_needed.to_str().unwrap(),
                flag,
                value,
            ],
        )
        .output()
        .unwrap();
        assert_refused_naming(&output, flag, value, range);
    }
}

/// `civicgrid up` takes the same limits, and one out of range stops it before
/// it writes the sample city or opens a database.
#[test]
fn up_refuses_query_limits_out_of_range_before_seeding() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("city");
    for (flag, value, range) in LIMITS_OUT_OF_RANGE {
        let output = Command::new(env!("CARGO_BIN_EXE_civicgrid"))
            .env_remove("CIVICGRID_DATABASE_URL")
            .args(["up", "--listen", "127.0.0.1:0", "--sample-size", "small"])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--sql-guest")
            .arg(scratch.path().join("never-read.wasm"))
            .args([flag, value])
            .output()
            .unwrap();
        assert_refused_naming(&output, flag, value, range);
        assert!(
            !data_dir.exists(),
            "up wrote {} before refusing {flag} {value}",
            data_dir.display()
        );
    }
}

/// Both binaries allocate through mimalloc (the `#[global_allocator]` in
/// each): with glibc's allocator every batch a query read paid page faults
/// and zeroing again (docs/benchmarks.md has the figures). Asked to, mimalloc
/// prints its arena statistics at exit, which glibc's allocator never does.
#[test]
fn both_binaries_allocate_through_mimalloc() {
    for binary in [
        PathBuf::from(env!("CARGO_BIN_EXE_civicgrid")),
        server_binary(),
    ] {
        let output = Command::new(&binary)
            .arg("--version")
            .env("MIMALLOC_SHOW_STATS", "1")
            .output()
            .expect("the binary runs");
        assert!(
            output.status.success(),
            "{} --version failed",
            binary.display()
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("arenas") && stderr.contains("committed"),
            "{} printed no allocator statistics: {stderr}",
            binary.display()
        );
    }
}
