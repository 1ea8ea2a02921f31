//! The crate picture in docs/architecture.md, checked against what Cargo
//! resolves: each workspace crate depends only on the workspace crates the
//! page allows (which also keeps the graph free of loops), and the heavy or
//! foreign crates a deployable must not carry stay out of its whole tree.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Workspace crate → the workspace crates it may use at run time (normal and
/// build dependencies; dev-dependencies are the tests' business).
const ALLOWED: &[(&str, &[&str])] = &[
    ("civicgrid-telemetry", &[]),
    ("civicgrid-tlog", &[]),
    (
        "civicgrid-witness",
        &["civicgrid-telemetry", "civicgrid-tlog"],
    ),
    ("civicgrid-guest-protocol", &[]),
    (
        "civicgrid-sandbox",
        &["civicgrid-guest-protocol", "civicgrid-tlog"],
    ),
    ("civicgrid-sandbox-guest", &["civicgrid-guest-protocol"]),
    ("civicgrid-example-algorithm", &["civicgrid-guest-protocol"]),
    (
        "civicgrid-runner",
        &["civicgrid-sandbox", "civicgrid-telemetry"],
    ),
    ("civicgrid-operator", &["civicgrid-telemetry"]),
    (
        "civicgrid-marketplace",
        &[
            "civicgrid-runner",
            "civicgrid-sandbox",
            "civicgrid-telemetry",
            "civicgrid-tlog",
        ],
    ),
    (
        "civicgrid-cli",
        &[
            "civicgrid-marketplace",
            "civicgrid-runner",
            "civicgrid-sandbox",
            "civicgrid-tlog",
        ],
    ),
    (
        "civicgrid-tests",
        &[
            "civicgrid-cli",
            "civicgrid-marketplace",
            "civicgrid-operator",
            "civicgrid-runner",
            "civicgrid-sandbox",
            "civicgrid-sandbox-guest",
            "civicgrid-tlog",
            "civicgrid-witness",
        ],
    ),
    (
        "civicgrid-benches",
        &[
            "civicgrid-cli",
            "civicgrid-marketplace",
            "civicgrid-operator",
            "civicgrid-sandbox",
            "civicgrid-sandbox-guest",
        ],
    ),
];

/// Deployable → crates that must appear nowhere in its run-time tree.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // The server ships no sample-data generator and no client.
    (
        "civicgrid-marketplace",
        &["tpchgen", "tpchgen-arrow", "civicgrid-cli", "kube"],
    ),
    // The operator talks to Kubernetes, not to the data.
    (
        "civicgrid-operator",
        &[
            "wasmtime",
            "datafusion",
            "sqlx",
            "casbin",
            "civicgrid-sandbox",
        ],
    ),
    // A runner reads its data center's product files and nothing of the
    // marketplace: no database, no casbin, no contracts.
    (
        "civicgrid-runner",
        &["sqlx", "casbin", "civicgrid-marketplace", "kube"],
    ),
    // A witness is run by someone other than the log's operator: it
    // checks checkpoints and knows nothing of the marketplace or its data.
    (
        "civicgrid-witness",
        &[
            "civicgrid-marketplace",
            "sqlx",
            "casbin",
            "wasmtime",
            "datafusion",
            "kube",
        ],
    ),
    // The log's formats are plain data and hashing, for every verifier.
    ("civicgrid-tlog", &["tokio", "sqlx", "tonic", "wasmtime"]),
    // The sandbox knows nothing of the marketplace's storage or network.
    ("civicgrid-sandbox", &["sqlx", "casbin", "tonic", "kube"]),
    // What guests link builds for wasm32: no host runtime, no engine.
    (
        "civicgrid-guest-protocol",
        &["wasmtime", "datafusion", "parquet", "tokio"],
    ),
    // Guests carry the protocol, never the host that runs them.
    (
        "civicgrid-sandbox-guest",
        &["wasmtime", "civicgrid-sandbox"],
    ),
    (
        "civicgrid-example-algorithm",
        &["wasmtime", "civicgrid-sandbox", "datafusion"],
    ),
];

struct Graph {
    names: BTreeMap<String, String>,
    workspace: BTreeSet<String>,
    /// Package id → ids of its normal and build dependencies.
    edges: BTreeMap<String, Vec<String>>,
}

fn resolve() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc).arg("-vV").output().expect("rustc -vV");
    let host = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let output = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host])
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    let text = |value: &Value| value.as_str().expect("a string").to_owned();
    let names = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|package| (text(&package["id"]), text(&package["name"])))
        .collect();
    let workspace = metadata["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(text)
        .collect();
    let edges = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|node| {
            let deps = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|dep| {
                    dep["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .any(|kind| kind["kind"].is_null() || kind["kind"] == "build")
                })
                .map(|dep| text(&dep["pkg"]))
                .collect();
            (text(&node["id"]), deps)
        })
        .collect();
    Graph {
        names,
        workspace,
        edges,
    }
}

impl Graph {
    fn id(&self, name: &str) -> &str {
        self.workspace
            .iter()
            .find(|id| self.names[*id] == name)
            .unwrap_or_else(|| panic!("{name} is not a workspace crate"))
    }

    /// Names of every crate `name` reaches, with the path to each.
    fn tree(&self, name: &str) -> BTreeMap<String, Vec<String>> {
        let mut reached = BTreeMap::new();
        let mut queue = vec![(self.id(name).to_owned(), vec![name.to_owned()])];
        while let Some((id, path)) = queue.pop() {
            for dep in self.edges.get(&id).into_iter().flatten() {
                let dep_name = self.names[dep].clone();
                if let std::collections::btree_map::Entry::Vacant(entry) =
                    reached.entry(dep_name.clone())
                {
                    let mut next = path.clone();
                    next.push(dep_name);
                    entry.insert(next.clone());
                    queue.push((dep.clone(), next));
                }
            }
        }
        reached
    }
}

#[test]
fn workspace_crates_depend_only_on_what_the_architecture_allows() {
    let graph = resolve();
    let listed: BTreeSet<&str> = ALLOWED.iter().map(|(name, _)| *name).collect();
    let members: BTreeSet<&str> = graph
        .workspace
        .iter()
        .map(|id| graph.names[id].as_str())
        .collect();
    assert_eq!(
        members, listed,
        "every workspace crate has a line in ALLOWED and docs/architecture.md"
    );
    let mut wrong = Vec::new();
    for (name, allowed) in ALLOWED {
        let id = graph.id(name);
        for dep in graph.edges.get(id).into_iter().flatten() {
            let dep_name = &graph.names[dep];
            if graph.workspace.contains(dep) && !allowed.contains(&dep_name.as_str()) {
                wrong.push(format!("{name} → {dep_name}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependencies docs/architecture.md does not allow: {wrong:?}"
    );
}

#[test]
fn deployables_carry_none_of_their_forbidden_crates() {
    let graph = resolve();
    let mut found = Vec::new();
    for (name, forbidden) in FORBIDDEN {
        let tree = graph.tree(name);
        for crate_name in *forbidden {
            if let Some(path) = tree.get(*crate_name) {
                found.push(path.join(" → "));
            }
        }
    }
    assert!(found.is_empty(), "forbidden dependencies: {found:#?}");
}

/// The checks above would pass on an empty graph; they must see the real one.
#[test]
fn the_resolved_graph_is_the_workspace_and_its_real_trees() {
    let graph = resolve();
    let marketplace = graph.tree("civicgrid-marketplace");
    assert!(marketplace.contains_key("sqlx") && marketplace.contains_key("wasmtime"));
    assert_eq!(
        marketplace["civicgrid-sandbox"],
        ["civicgrid-marketplace", "civicgrid-sandbox"]
    );
    let cli = graph.tree("civicgrid-cli");
    assert!(
        cli.contains_key("tpchgen"),
        "the CLI carries the sample city"
    );
    let operator = graph.tree("civicgrid-operator");
    assert!(operator.contains_key("kube"));
}

type ModulePath = Vec<String>;

/// Every `.rs` file under `dir`, leaving out folders named in `skip`.
fn rust_files(dir: &std::path::Path, skip: &[&str]) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                if path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_none_or(|name| !skip.contains(&name))
                {
                    folders.push(path);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A source file's lines that are not comments.
fn code_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("a readable source file")
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(str::to_owned)
        .collect()
}

/// Every module of the crate rooted at `src` (binaries aside), with the
/// modules it names through `crate::` or `super::` outside comments.
fn module_graph(src: &std::path::Path) -> BTreeMap<ModulePath, BTreeSet<ModulePath>> {
    let files = rust_files(src, &["bin"]);
    let mut modules: BTreeMap<ModulePath, std::path::PathBuf> = BTreeMap::new();
    for file in files {
        let relative = file
            .strip_prefix(src)
            .expect("under src")
            .with_extension("");
        let mut path: ModulePath = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if matches!(
            path.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            path.pop();
        }
        modules.insert(path, file);
    }
    let identifier = |text: &str| -> Vec<String> {
        text.split("::")
            .map(|segment| {
                segment
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|segment| !segment.is_empty())
            .collect()
    };
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let mut named = BTreeSet::new();
        for line in &code_lines(file) {
            for (at, _) in line.match_indices("crate::") {
                let segments = identifier(&line[at + "crate::".len()..]);
                if let Some(target) = (1..=segments.len())
                    .rev()
                    .map(|n| segments[..n].to_vec())
                    .find(|prefix| modules.contains_key(prefix))
                {
                    named.insert(target);
                }
            }
            // A submodule named through its parent's import (`use
            // crate::store;` then `store::ledger::post(...)`).
            for (at, _) in line.match_indices("::") {
                let head_start = line[..at]
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(0, |i| i + 1);
                if line[..head_start].ends_with("::") {
                    continue;
                }
                let segments = identifier(&line[head_start..]);
                if let Some(target) = (2..=segments.len())
                    .rev()
                    .map(|n| segments[..n].to_vec())
                    .find(|prefix| modules.contains_key(prefix))
                {
                    named.insert(target);
                }
            }
            for (at, _) in line.match_indices("super::") {
                let mut target = module.clone();
                target.pop();
                if let Some(first) = identifier(&line[at + "super::".len()..]).first() {
                    target.push(first.clone());
                    if modules.contains_key(&target) {
                        named.insert(target);
                    }
                }
            }
        }
        named.remove(module);
        named.remove(&Vec::new());
        graph.insert(module.clone(), named);
    }
    graph
}

/// The first loop in `graph`, as the modules along it.
fn first_loop(graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Option<Vec<String>> {
    fn visit<'a>(
        module: &'a ModulePath,
        graph: &'a BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        state: &mut BTreeMap<&'a ModulePath, bool>,
        stack: &mut Vec<&'a ModulePath>,
    ) -> Option<Vec<String>> {
        state.insert(module, false);
        stack.push(module);
        for next in graph.get(module).into_iter().flatten() {
            match state.get(next) {
                Some(false) => {
                    let start = stack.iter().position(|m| *m == next).expect("on the stack");
                    let mut cycle: Vec<String> =
                        stack[start..].iter().map(|m| m.join("::")).collect();
                    cycle.push(next.join("::"));
                    return Some(cycle);
                }
                Some(true) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(module, true);
        None
    }
    let mut state = BTreeMap::new();
    let mut stack = Vec::new();
    graph.keys().find_map(|module| {
        if state.contains_key(module) {
            None
        } else {
            visit(module, graph, &mut state, &mut stack)
        }
    })
}

#[test]
fn no_crate_has_a_loop_between_its_modules() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for crate_dir in [
        "marketplace",
        "operator",
        "sandbox",
        "sandbox/protocol",
        "runner",
        "cli",
        "telemetry",
        "tlog",
    ] {
        let graph = module_graph(&root.join(crate_dir).join("src"));
        assert!(
            graph.len() > 1 || crate_dir == "telemetry",
            "{crate_dir}: no modules read"
        );
        if let Some(cycle) = first_loop(&graph) {
            panic!(
                "{crate_dir}: modules import each other: {}",
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_module_scan_sees_imports_and_finds_loops() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let graph = module_graph(&root.join("marketplace/src"));
    let module = |path: &str| path.split("::").map(str::to_owned).collect::<ModulePath>();
    assert!(graph[&module("queries::settle")].contains(&module("billing")));
    assert!(graph[&module("audit::log")].contains(&module("store")));
    // `use crate::store;` then `store::queries::find_by_key(...)`.
    assert!(graph[&module("queries")].contains(&module("store::queries")));
    let operator = module_graph(&root.join("operator/src"));
    assert!(operator[&module("controller::workload")].contains(&module("controller::pool")));

    let mut looped = graph.clone();
    looped
        .get_mut(&module("billing"))
        .expect("billing")
        .insert(module("queries::settle"));
    let cycle = first_loop(&looped).expect("a loop");
    assert!(
        cycle.contains(&"billing".to_owned()) && cycle.contains(&"queries::settle".to_owned()),
        "{cycle:?}"
    );
}

/// The marketplace's layers, as docs/architecture.md draws them: gRPC
/// handlers convert and call the use cases in `market`, holding no
/// transaction, audit entry or permission check of their own; nothing
/// below the gRPC layer knows tonic; and the domain modules that have
/// their own types do not use the API's messages.
#[test]
fn the_marketplace_grpc_layer_is_thin_and_alone_in_knowing_tonic() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../marketplace/src");
    let mut found = Vec::new();
    let mut handlers = 0;
    for path in rust_files(&src.join("grpc"), &[]) {
        handlers += 1;
        for (n, line) in code_lines(&path).iter().enumerate() {
            for rule in [".begin()", "log::append", ".require(", "sqlx::"] {
                if line.contains(rule) {
                    found.push(format!("{}:{}: {rule}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(handlers >= 8, "only {handlers} files read in grpc/");
    let below_grpc: Vec<_> = rust_files(&src, &["grpc", "bin"])
        .into_iter()
        .filter(|path| !path.ends_with("lib.rs"))
        .collect();
    let below = below_grpc.len();
    for path in &below_grpc {
        for (n, line) in code_lines(path).iter().enumerate() {
            if line.contains("tonic::") || line.contains("use tonic") {
                found.push(format!(
                    "{}:{}: tonic below the gRPC layer",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    assert!(below >= 20, "only {below} files read below the gRPC layer");
    for path in &below_grpc {
        let module = path
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        let in_store = module.starts_with("store") || module == "audit/log.rs";
        for (n, line) in code_lines(path).iter().enumerate() {
            // The API's messages stop at the gRPC layer; the domain uses
            // its own types and the documents of `crate::spec`.
            if line.contains("proto::") {
                found.push(format!(
                    "{module}:{}: API messages below the gRPC layer",
                    n + 1
                ));
            }
            // SQL lives in the store, one module per aggregate, and in the
            // audit log, which is its own append-only store.
            if !in_store && (line.contains("sqlx::query") || line.contains("AssertSqlSafe")) {
                found.push(format!("{module}:{}: SQL outside the store", n + 1));
            }
        }
    }
    // The domain's models and rules know no storage at all.
    let models = [
        "billing.rs",
        "metering.rs",
        "policy.rs",
        "contracts/model.rs",
        "demand/model.rs",
        "identity/model.rs",
        "queries/model.rs",
        "registry/model.rs",
        "registry/validate.rs",
    ];
    for module in models {
        for (n, line) in code_lines(&src.join(module)).iter().enumerate() {
            for storage in ["sqlx", "AnyConnection", "crate::store", "store::"] {
                if line.contains(storage) {
                    found.push(format!("{module}:{}: {storage} in a domain model", n + 1));
                }
            }
        }
    }
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}
