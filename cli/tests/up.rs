//! `civicgrid up` and `civicgrid demo` as a user runs them: the real binaries,
//! the real SQL guest in wasmtime, SQLite and Parquet in a data directory.
//! Then the server is killed with SIGKILL in the middle of charged queries,
//! restarted, and the books are checked: every query is recorded in full
//! (usage, charge, audit) or not at all, no hold is stuck, the ledger sums to
//! zero, and a retry with the same key is charged once.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sql_guest() -> PathBuf {
    std::env::var_os("CIVICGRID_GUEST_DIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/guest"),
            PathBuf::from,
        )
        .join("civicgrid_sandbox_guest.wasm")
}

/// Starts `civicgrid up` and waits for its "serving on" line.
fn up(data_dir: &Path) -> (Server, String) {
    up_on(data_dir, None)
}

/// A fresh PostgreSQL database in the server `scripts/postgres.sh` runs.
fn fresh_postgres_database() -> String {
    use sqlx::Connection as _;
    let admin_url = std::env::var("CIVICGRID_TEST_POSTGRES_URL").expect(
        "CIVICGRID_TEST_POSTGRES_URL is not set: run `bash scripts/postgres.sh` and export the URL it prints",
    );
    let name = format!("cg_up_{}", hex::encode(rand::random::<[u8; 6]>()));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
    });
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

fn up_on(data_dir: &Path, database_url: Option<&str>) -> (Server, String) {
    // One server starts at a time, so a cold module cache is filled by one
    // compilation of the SQL guest instead of one per concurrent test.
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _starting = STARTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut command = Command::new(env!("CARGO_BIN_EXE_civicgrid"));
    if let Some(url) = database_url {
        command.env("CIVICGRID_DATABASE_URL", url);
    }
    let mut child = command
        .args(["up", "--listen", "127.0.0.1:0", "--sample-size", "small"])
        // Limits other than the defaults, within range, are taken.
        .args(["--concurrent-queries", "8", "--query-wall-time-secs", "30"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--sql-guest")
        .arg(sql_guest())
        // The compiled guest is shared with the other suites' cache.
        .arg("--module-cache")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("civicgrid up starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.expect("a line");
        banner.push_str(&line);
        banner.push('\n');
        if let Some(rest) = line.strip_prefix("CivicGrid marketplace serving on ") {
            url = Some(rest.trim().to_owned());
        }
        if line.starts_with("try: ") {
            break;
        }
    }
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url = url.unwrap_or_else(|| panic!("no endpoint in:\n{banner}"));
    (Server { child, url }, banner)
}

fn cli(server: &str, token: &str, args: &[&str]) -> (i32, String, String) {
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

fn credentials(data_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir.join("demo-credentials.json")).unwrap())
        .unwrap()
}

fn token(data_dir: &Path, who: &str) -> String {
    credentials(data_dir)[who].as_str().unwrap().to_owned()
}

fn demo(data_dir: &Path, server: &str) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_civicgrid"))
        .args(["demo", "--data-dir"])
        .arg(data_dir)
        .env("CIVICGRID_SERVER", server)
        .output()
        .expect("civicgrid demo runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn ledger(server: &str, regulator: &str) -> serde_json::Value {
    let (code, stdout, stderr) = cli(
        server,
        regulator,
        &["--output", "json", "billing", "ledger"],
    );
    assert_eq!(code, 0, "the ledger is sound: {stdout} {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn usage(server: &str, regulator: &str) -> Vec<serde_json::Value> {
    let (code, stdout, stderr) = cli(server, regulator, &["--output", "json", "usage"]);
    assert_eq!(code, 0, "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    value["queries"].as_array().cloned().unwrap_or_default()
}

#[test]
fn up_seeds_the_city_and_demo_tells_the_whole_story() {
    let data = tempfile::tempdir().unwrap();
    let (server, banner) = up(data.path());
    for expected in [
        "demo credentials",
        "regulator (audit-office)",
        "audit verifier key",
        "runner for data center municipal-core on https://127.0.0.1:",
    ] {
        assert!(banner.contains(expected), "{expected:?} in:\n{banner}");
    }
    let (code, stdout, stderr) = demo(data.path(), &server.url);
    assert_eq!(code, 0, "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "registration number CG-",
        "contract ctr",
        "│ sector",
        "groups of fewer than 5 licences are not shown",
        "charged 1.00 EUR",
        "intact: tree size",
        // Every query ran next to the data, in the sample city's data
        // center, through its runner.
        "run in municipal-core; ",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
    // Licences withhold small groups, so the demo's queries say nothing of
    // their compute (it would count the licences they filtered).
    assert!(
        stdout.contains("rows released, compute withheld;") && !stdout.contains("compute units"),
        "{stdout}"
    );
    // A second run finds the product registered and tells the rest again.
    let (code, again, stderr) = demo(data.path(), &server.url);
    assert_eq!(code, 0, "second demo failed:\n{again}\n{stderr}");
    assert!(again.contains("registered already"), "{again}");

    // The seeded products answer the CLI in each format.
    let analyst = token(data.path(), "acme_analyst");
    let (code, csv, stderr) = cli(
        &server.url,
        &analyst,
        &[
            "query",
            "--product",
            "hotline-tickets",
            "--format",
            "csv",
            "--sql",
            "SELECT category, COUNT(*) AS tickets FROM tickets GROUP BY category ORDER BY category",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(csv.starts_with("category,tickets\n"), "{csv}");
    assert!(stderr.contains("completed"), "{stderr}");
    let (code, json, stderr) = cli(
        &server.url,
        &analyst,
        &[
            "query",
            "--product",
            "air-quality",
            "--format",
            "json",
            "--sql",
            "SELECT station, MAX(pm25) AS worst FROM readings GROUP BY station ORDER BY station LIMIT 3",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(3), "{json}");
    assert!(stderr.contains("charged 0 of 0"), "the free plan: {stderr}");
    // A blocked column is refused with the policy's reason.
    let (code, _, stderr) = cli(
        &server.url,
        &analyst,
        &[
            "query",
            "--product",
            "hotline-tickets",
            "--sql",
            "SELECT caller_id FROM tickets",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("caller_id"),
        "{stderr}"
    );
    let regulator = token(data.path(), "regulator");
    ledger(&server.url, &regulator);

    // Restarting keeps everything and seeds nothing twice.
    let url_before = server.url.clone();
    drop(server);
    let (server, _) = up(data.path());
    assert_ne!(server.url, "", "restarted (was {url_before})");
    let queries = usage(&server.url, &regulator);
    assert!(queries.len() >= 6, "{queries:?}");
}

/// A proto3-JSON integer: int64 arrives as a string, and zero is omitted.
fn number(value: &serde_json::Value) -> i64 {
    match value {
        serde_json::Value::String(text) => text.parse().unwrap(),
        serde_json::Value::Number(n) => n.as_i64().unwrap(),
        serde_json::Value::Null => 0,
        other => panic!("not a number: {other}"),
    }
}

fn balance(server: &str, consumer_admin: &str) -> i64 {
    let (code, stdout, stderr) = cli(
        server,
        consumer_admin,
        &["--output", "json", "billing", "balance"],
    );
    assert_eq!(code, 0, "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    number(&value["balances"][0]["balanceMinor"])
}

#[test]
fn sigkill_mid_query_leaves_complete_records_or_none_on_sqlite() {
    sigkill_mid_query(None);
}

#[test]
fn sigkill_mid_query_leaves_complete_records_or_none_on_postgres() {
    sigkill_mid_query(Some(&fresh_postgres_database()));
}

fn sigkill_mid_query(database_url: Option<&str>) {
    let data = tempfile::tempdir().unwrap();
    let (mut server, _) = up_on(data.path(), database_url);
    let analyst = token(data.path(), "acme_analyst");
    let acme_admin = token(data.path(), "acme_admin");
    let regulator = token(data.path(), "regulator");
    let start_balance = balance(&server.url, &acme_admin);
    // Commerce charges per compute unit from the first, so every completed
    // query costs something.
    let sql = "SELECT l_returnflag, l_linestatus, COUNT(*) AS lines, SUM(l_quantity) AS qty \
               FROM lineitem GROUP BY l_returnflag, l_linestatus";
    let run = |url: &str, key: &str| {
        cli(
            url,
            &analyst,
            &["query", "--product", "commerce", "--key", key, "--sql", sql],
        )
    };
    let keys: Vec<String> = (0..6).map(|i| format!("crash-{i}")).collect();
    // Kill the server at different points of in-flight queries.
    for (round, delay_ms) in [30_u64, 120, 350].into_iter().enumerate() {
        let clients: Vec<_> = keys[round * 2..round * 2 + 2]
            .iter()
            .map(|key| {
                let (url, analyst, key) = (server.url.clone(), analyst.clone(), key.clone());
                let sql = sql.to_owned();
                std::thread::spawn(move || {
                    cli(
                        &url,
                        &analyst,
                        &[
                            "query",
                            "--product",
                            "commerce",
                            "--key",
                            &key,
                            "--sql",
                            &sql,
                        ],
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SIGKILL: no shutdown handler runs.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        for client in clients {
            let _ = client.join();
        }
        server = up_on(data.path(), database_url).0;
        // On SQLite the restarted server gives the killed one's queries up
        // at start; on PostgreSQL, other servers may share the database, so
        // only once the killed one's lease lapses (10 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let books = ledger(&server.url, &regulator);
            if number(&books["openHolds"]) == 0 {
                break;
            }
            assert!(
                database_url.is_some() && std::time::Instant::now() < deadline,
                "no hold is stuck: {books}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Every key retried (twice): each query is charged exactly once.
    for key in keys.iter().chain(&keys) {
        let (code, _, stderr) = run(&server.url, key);
        assert_eq!(code, 0, "{key}: {stderr}");
    }
    let completed: Vec<_> = usage(&server.url, &regulator)
        .into_iter()
        .filter(|q| q["productId"] == "commerce" && q["state"] == "completed")
        .collect();
    assert_eq!(
        completed.len(),
        keys.len(),
        "one record per key: {completed:?}"
    );
    let charged: i64 = completed.iter().map(|q| number(&q["chargeMinor"])).sum();
    assert!(
        completed.iter().all(|q| number(&q["chargeMinor"]) > 0),
        "{completed:?}"
    );
    assert_eq!(
        start_balance - balance(&server.url, &acme_admin),
        charged,
        "the balance fell by exactly the recorded charges"
    );
    let books = ledger(&server.url, &regulator);
    assert_eq!(number(&books["openHolds"]), 0, "{books}");
    // Each record's audit entry exists and names it.
    for record in &completed {
        let index = number(&record["auditIndex"]);
        let (code, stdout, stderr) = cli(
            &server.url,
            &regulator,
            &[
                "--output",
                "json",
                "audit",
                "entries",
                "--start",
                &index.to_string(),
                "--end",
                &(index + 1).to_string(),
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stdout.contains(record["queryId"].as_str().unwrap()),
            "entry {index}: {stdout}"
        );
    }
}

/// An upload cut off by a server killed with SIGKILL leaves the product's
/// data as it was (no version, nothing read from the half upload), and
/// resumes after a restart from where the restarted server says it stands,
/// to a version that holds every row exactly once.
#[test]
fn sigkill_mid_upload_leaves_no_half_version_and_resumes() {
    use std::io::Write as _;

    let data = tempfile::tempdir().unwrap();
    let (mut server, _) = up(data.path());
    let provider = token(data.path(), "city_data_admin");
    let tickets = 400_000;
    let csv = data.path().join("tickets.csv");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        writeln!(
            out,
            "ticket_id,caller_id,district,category,channel,opened_on,hours_to_resolve"
        )
        .unwrap();
        for i in 0..tickets {
            writeln!(
                out,
                "{},{},harbour,noise,phone,2026-12-0{},{}.5",
                50_000_000 + i,
                70_000_000 + i % 5_000,
                1 + i % 7,
                i % 48
            )
            .unwrap();
        }
    }
    let csv_arg = csv.to_str().unwrap().to_owned();
    let upload_args = [
        "--output",
        "json",
        "product",
        "upload",
        "hotline-tickets",
        "--table",
        "tickets",
        "--file",
        csv_arg.as_str(),
        "--append",
    ];
    let mut uploading = Command::new(env!("CARGO_BIN_EXE_civicgrid"))
        .args(upload_args)
        .env("CIVICGRID_SERVER", &server.url)
        .env("CIVICGRID_TOKEN", &provider)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut started = String::new();
    BufReader::new(uploading.stderr.take().unwrap())
        .read_line(&mut started)
        .unwrap();
    let upload_id = started
        .strip_prefix("upload ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no upload id in {started:?}"))
        .to_owned();
    // Some chunks in, never the commit.
    std::thread::sleep(Duration::from_millis(150));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let status = uploading.wait().unwrap();
    assert!(!status.success(), "the upload was cut off");

    let (restarted, _) = up(data.path());
    let (code, versions, stderr) = cli(
        &restarted.url,
        &provider,
        &["--output", "json", "product", "versions", "hotline-tickets"],
    );
    assert_eq!(code, 0, "{stderr}");
    let versions: serde_json::Value = serde_json::from_str(&versions).unwrap();
    assert!(
        versions["versions"].as_array().is_none_or(Vec::is_empty),
        "no half version: {versions}"
    );
    let mut resumed = upload_args.to_vec();
    resumed.extend(["--resume", upload_id.as_str()]);
    let (code, committed, stderr) = cli(&restarted.url, &provider, &resumed);
    assert_eq!(code, 0, "{stderr}");
    let committed: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(committed["upload"]["id"], upload_id.as_str());
    assert_eq!(committed["version"]["version"], "1", "{committed}");
    let appended: i64 = committed["version"]["tables"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| number(&file["rows"]))
        .filter(|rows| *rows == tickets)
        .count()
        .try_into()
        .unwrap();
    assert_eq!(appended, 1, "the upload's rows, once: {committed}");
}
