//! Real Kubernetes control planes for tests, several at once.
//!
//! Each [`Cluster`] is its own etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and kwok (simulated nodes on which pods reach Running), on
//! free loopback ports, with freshly generated certificates. The binaries are
//! built from the Go module proxy by `tests/controlplane/build.sh`; see
//! `docs/testing.md`.
//!
//! Guarantees: every process a cluster starts is killed, and its data directory
//! removed, when the [`Cluster`] drops — also when the test panics. If the test
//! process itself is killed (a timeout), the processes die with it through
//! `PR_SET_PDEATHSIG`, and the next harness start removes the orphaned data
//! directory.
//!
//! Assumptions: clusters are started from an async test on the test's own
//! thread or a runtime worker thread (see [`process::ManagedProcess`]).

mod pki;
pub(crate) mod process;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use pki::ClusterPki;
use process::ManagedProcess;

/// Environment variable naming the directory that holds the control-plane
/// binaries. When unset, the harness asks `tests/controlplane/build.sh` for
/// its cache directory (without building).
pub const BIN_DIR_ENV: &str = "CIVICGRID_CONTROLPLANE_BIN";

const BINARIES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
];

/// Annotation that tells kwok to manage a node (and the pods bound to it).
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Everything that can go wrong while running a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The control-plane binaries are not where the harness looked.
    #[error(
        "control-plane binary {path} is missing: build the binaries with `bash tests/controlplane/build.sh` \
         (several minutes the first time, cached afterwards) and set {BIN_DIR_ENV} to the directory it prints"
    )]
    MissingBinary {
        /// The path that was expected to hold an executable.
        path: PathBuf,
    },
    /// The binaries have not been built for this checkout's pinned versions.
    #[error(
        "control-plane binaries are not built for this checkout: run `bash tests/controlplane/build.sh` \
         (several minutes the first time, cached afterwards): {detail}"
    )]
    NotBuilt {
        /// What the build script said.
        detail: String,
    },
    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating test certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    /// The generated kubeconfig could not be turned into a client.
    #[error("building a client for cluster {cluster}: {source}")]
    Kubeconfig {
        /// The cluster the client was for.
        cluster: String,
        /// The underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A Kubernetes request made by the harness failed.
    #[error("{what}: {source}")]
    Kube {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },
    /// A test manifest does not parse.
    #[error("a test manifest does not parse: {0}")]
    Manifest(String),
    /// A control-plane process exited on its own.
    #[error("{name} exited ({status}); last log lines:\n{log_tail}")]
    ProcessExited {
        /// Which process.
        name: String,
        /// How it exited.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// The operator binary for process-level tests is not where it should be.
    #[error(
        "the civicgrid-operator binary {}: build it with `cargo build -p civicgrid-operator` \
         and set {} to target/debug/civicgrid-operator (scripts/test.sh does both)",
        path.as_ref().map_or_else(|| format!("is not named: {} is not set", crate::operator::BIN_ENV),
            |p| format!("{} does not exist", p.display())),
        crate::operator::BIN_ENV
    )]
    OperatorNotBuilt {
        /// The path given, if any.
        path: Option<PathBuf>,
    },
    /// A component did not become ready in time.
    #[error("cluster {cluster}: {what} not ready after {after:?}")]
    Timeout {
        /// The cluster.
        cluster: String,
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        after: Duration,
    },
}

/// Where the control-plane binaries live.
#[derive(Debug, Clone)]
pub struct ControlPlaneBinaries {
    dir: PathBuf,
}

impl ControlPlaneBinaries {
    /// Finds the binaries: the directory named by [`BIN_DIR_ENV`], or else the
    /// build script's cache directory for this checkout.
    ///
    /// # Errors
    /// [`HarnessError::MissingBinary`] or [`HarnessError::NotBuilt`] with the
    /// command that builds them. A missing binary is never a reason to skip.
    pub fn locate() -> Result<Self, HarnessError> {
        let dir = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => Self::cached_dir()?,
        };
        for name in BINARIES {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(HarnessError::MissingBinary { path });
            }
        }
        Ok(Self { dir })
    }

    fn cached_dir() -> Result<PathBuf, HarnessError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/build.sh");
        let output = std::process::Command::new("bash")
            .arg(&script)
            .arg("--if-built")
            .output()
            .map_err(|source| HarnessError::Io {
                what: format!("run {}", script.display()),
                source,
            })?;
        if !output.status.success() {
            return Err(HarnessError::NotBuilt {
                detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The shape of simulated nodes added with [`Cluster::add_nodes`].
#[derive(Debug, Clone)]
pub struct NodeShape {
    /// CPU capacity as a Kubernetes quantity, e.g. `"32"`.
    pub cpu: String,
    /// Memory capacity as a Kubernetes quantity, e.g. `"128Gi"`.
    pub memory: String,
    /// Maximum pods per node.
    pub pods: u32,
    /// GPUs on the node: model (written to the `nvidia.com/gpu.product`
    /// label) and count (the `nvidia.com/gpu` extended resource).
    pub gpus: Option<(String, u32)>,
    /// Extra node labels.
    pub labels: BTreeMap<String, String>,
}

impl Default for NodeShape {
    fn default() -> Self {
        Self {
            cpu: "32".to_owned(),
            memory: "128Gi".to_owned(),
            pods: 110,
            gpus: None,
            labels: BTreeMap::new(),
        }
    }
}

struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
}

/// One running test cluster. Dropping it stops every process and deletes its
/// data.
pub struct Cluster {
    name: String,
    dir: PathBuf,
    binaries: ControlPlaneBinaries,
    ports: Ports,
    kubeconfig_yaml: String,
    // Declared in stop order: fields drop top to bottom.
    kwok: Option<ManagedProcess>,
    scheduler: Option<ManagedProcess>,
    controller_manager: Option<ManagedProcess>,
    apiserver: Option<ManagedProcess>,
    etcd: Option<ManagedProcess>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("apiserver_port", &self.ports.apiserver)
            .finish_non_exhaustive()
    }
}

/// Starts `names.len()` independent clusters concurrently.
///
/// # Errors
/// Any cluster failing to start; the ones already started are stopped.
pub async fn start_clusters(names: &[&str]) -> Result<Vec<Cluster>, HarnessError> {
    let binaries = ControlPlaneBinaries::locate()?;
    futures::future::try_join_all(
        names
            .iter()
            .map(|name| Cluster::start_with(name, binaries.clone())),
    )
    .await
}

static CLUSTER_SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// The directory under which every harness run keeps its clusters' data.
pub fn harness_root() -> PathBuf {
    std::env::temp_dir().join("civicgrid-harness")
}

impl Cluster {
    /// Starts one cluster and waits until it serves requests, the controller
    /// manager has created the default service account, and kwok runs.
    ///
    /// # Errors
    /// Missing binaries, a process that exits, or a component not ready within
    /// two minutes (the error carries the component's last log lines).
    pub async fn start(name: &str) -> Result<Self, HarnessError> {
        Self::start_with(name, ControlPlaneBinaries::locate()?).await
    }

    async fn start_with(name: &str, binaries: ControlPlaneBinaries) -> Result<Self, HarnessError> {
        // A free port found by binding port 0 can be taken by another cluster
        // starting in the same moment before etcd or the API server binds it;
        // that process then exits at once. Start again on new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(name, binaries.clone()).await {
                Err(HarnessError::ProcessExited {
                    name: process,
                    log_tail,
                    ..
                }) if attempt < 3 => {
                    tracing::warn!(cluster = name, %process, attempt, "a process exited during start; retrying on new ports\n{log_tail}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(name: &str, binaries: ControlPlaneBinaries) -> Result<Self, HarnessError> {
        let root = harness_root();
        sweep_orphans(&root);
        let dir = root.join(format!(
            "{}-{}-{}",
            std::process::id(),
            CLUSTER_SEQUENCE.fetch_add(1, Ordering::Relaxed),
            name
        ));
        for sub in ["etcd", "pki", "logs", "apiserver-certs"] {
            create_dir(&dir.join(sub))?;
        }
        let pki = ClusterPki::generate(name)?;
        let ports = Ports {
            etcd_client: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
        };
        let files = [
            ("ca.crt", &pki.ca_cert),
            ("apiserver.crt", &pki.serving_cert),
            ("apiserver.key", &pki.serving_key),
            ("sa.key", &pki.service_account_key),
            ("sa.pub", &pki.service_account_public_key),
        ];
        for (file, content) in files {
            write_file(&dir.join("pki").join(file), content)?;
        }
        let kubeconfig_yaml = kubeconfig_yaml(name, ports.apiserver, &pki);
        write_file(&dir.join("admin.kubeconfig"), &kubeconfig_yaml)?;

        let mut cluster = Self {
            name: name.to_owned(),
            dir,
            binaries,
            ports,
            kubeconfig_yaml,
            kwok: None,
            scheduler: None,
            controller_manager: None,
            apiserver: None,
            etcd: None,
        };
        cluster.start_etcd()?;
        cluster.wait_for_etcd().await?;
        cluster.start_apiserver().await?;
        cluster.start_controllers()?;
        cluster.wait_for_default_service_account().await?;
        Ok(cluster)
    }

    /// The cluster's name (as passed to [`Cluster::start`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The API server's URL.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// A self-contained admin kubeconfig (certificates inline), as YAML.
    pub fn kubeconfig_yaml(&self) -> &str {
        &self.kubeconfig_yaml
    }

    /// The path of the admin kubeconfig file.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The cluster's data directory (removed when the cluster drops).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Process ids of the running control-plane processes.
    pub fn pids(&self) -> Vec<u32> {
        self.processes().filter_map(ManagedProcess::pid).collect()
    }

    fn processes(&self) -> impl Iterator<Item = &ManagedProcess> {
        [
            &self.kwok,
            &self.scheduler,
            &self.controller_manager,
            &self.apiserver,
            &self.etcd,
        ]
        .into_iter()
        .flatten()
    }

    /// A fresh admin client for this cluster.
    ///
    /// # Errors
    /// The generated kubeconfig cannot be loaded (a harness bug).
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        let kubeconfig_error = |source| HarnessError::Kubeconfig {
            cluster: self.name.clone(),
            source,
        };
        let kubeconfig = Kubeconfig::from_yaml(&self.kubeconfig_yaml).map_err(kubeconfig_error)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?;
        // Tests stop API servers on purpose; fail fast instead of hanging.
        config.connect_timeout = Some(Duration::from_secs(5));
        civicgrid_operator::controller::members::request_client(config, Duration::from_secs(30))
            .map_err(|source| HarnessError::Kube {
                what: format!("client for cluster {}", self.name),
                source,
            })
    }

    /// Stops the API server (as if the data center dropped off the network);
    /// etcd and the controllers keep running.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.kill();
        }
    }

    /// Starts the API server again on the same port with the same data and
    /// waits until it is ready.
    ///
    /// # Errors
    /// The API server exits or is not ready within two minutes.
    pub async fn start_apiserver(&mut self) -> Result<(), HarnessError> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let pki = self.dir.join("pki");
        let pki = |file: &str| pki.join(file).display().to_string();
        let args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.ports.etcd_client),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={}", self.ports.apiserver),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")),
            format!("--client-ca-file={}", pki("ca.crt")),
            format!("--service-account-key-file={}", pki("sa.pub")),
            format!("--service-account-signing-key-file={}", pki("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            "--allow-privileged=true".to_owned(),
            // Fewer moving parts per test cluster; none of it is under test.
            "--enable-priority-and-fairness=false".to_owned(),
            "--profiling=false".to_owned(),
            "--v=1".to_owned(),
        ];
        let apiserver = self.spawn("kube-apiserver", args)?;
        self.apiserver = Some(apiserver);
        self.wait_for_apiserver().await
    }

    /// Adds `count` simulated nodes named `{prefix}-{i}`, run by kwok.
    ///
    /// # Errors
    /// The API server rejects a node.
    pub async fn add_nodes(
        &self,
        prefix: &str,
        count: usize,
        shape: &NodeShape,
    ) -> Result<(), HarnessError> {
        let nodes: Api<Node> = Api::all(self.client().await?);
        for i in 0..count {
            let node_name = format!("{prefix}-{i}");
            let node = kwok_node(&node_name, shape);
            nodes
                .create(&PostParams::default(), &node)
                .await
                .map_err(|source| HarnessError::Kube {
                    what: format!("create node {node_name} in {}", self.name),
                    source,
                })?;
        }
        Ok(())
    }

    fn spawn(&self, name: &str, args: Vec<String>) -> Result<ManagedProcess, HarnessError> {
        let process = ManagedProcess::spawn(
            name,
            &self.binaries.path(name),
            &args,
            &self.dir.join("logs"),
        )?;
        if let Some(pid) = process.pid() {
            record_pid(&self.dir, pid)?;
        }
        Ok(process)
    }

    fn start_etcd(&mut self) -> Result<(), HarnessError> {
        let client = format!("http://127.0.0.1:{}", self.ports.etcd_client);
        let peer = format!("http://127.0.0.1:{}", self.ports.etcd_peer);
        let args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}={peer}", self.name),
            // Test data is disposable: skip fsync so several clusters on one
            // small disk stay fast.
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        self.etcd = Some(self.spawn("etcd", args)?);
        Ok(())
    }

    fn start_controllers(&mut self) -> Result<(), HarnessError> {
        let kubeconfig = self.kubeconfig_path().display().to_string();
        let pki = self.dir.join("pki");
        let controller_manager = vec![
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_owned(),
            "--secure-port=0".to_owned(),
            "--use-service-account-credentials=false".to_owned(),
            // kwok renews its nodes' leases late when the machine is busy;
            // after the default 50 s the node lifecycle controller marks the
            // node's pods not ready, and kwok never marks them ready again
            // (kubernetes-sigs/kwok#1464). No test is about node failure.
            "--node-monitor-grace-period=10m".to_owned(),
            format!(
                "--service-account-private-key-file={}",
                pki.join("sa.key").display()
            ),
            format!("--root-ca-file={}", pki.join("ca.crt").display()),
            "--v=1".to_owned(),
        ];
        self.controller_manager = Some(self.spawn("kube-controller-manager", controller_manager)?);
        let scheduler = vec![
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_owned(),
            "--secure-port=0".to_owned(),
            "--v=1".to_owned(),
        ];
        self.scheduler = Some(self.spawn("kube-scheduler", scheduler)?);
        let kwok = vec![
            format!("--kubeconfig={kubeconfig}"),
            "--manage-all-nodes=false".to_owned(),
            format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
            "--cidr=10.244.0.0/16".to_owned(),
            "--node-ip=10.96.0.1".to_owned(),
            "--server-address=".to_owned(),
        ];
        self.kwok = Some(self.spawn("kwok", kwok)?);
        Ok(())
    }

    fn check_processes(&mut self) -> Result<(), HarnessError> {
        for process in [
            &mut self.etcd,
            &mut self.apiserver,
            &mut self.controller_manager,
            &mut self.scheduler,
            &mut self.kwok,
        ]
        .into_iter()
        .flatten()
        {
            process.check_running()?;
        }
        Ok(())
    }

    fn timeout(&self, what: &str) -> HarnessError {
        HarnessError::Timeout {
            cluster: self.name.clone(),
            what: what.to_owned(),
            after: READY_TIMEOUT,
        }
    }

    async fn wait_for_etcd(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.ports.etcd_client);
        while started.elapsed() < READY_TIMEOUT {
            self.check_processes()?;
            if TcpStream::connect_timeout(&address.into(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Err(self.timeout("etcd"))
    }

    async fn wait_for_apiserver(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        let client = self.client().await?;
        while started.elapsed() < READY_TIMEOUT {
            self.check_processes()?;
            let request = http_get("/readyz");
            if let Ok(body) = client.request_text(request).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Err(self.timeout("kube-apiserver /readyz"))
    }

    async fn wait_for_default_service_account(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, "default");
        while started.elapsed() < READY_TIMEOUT {
            self.check_processes()?;
            if let Ok(Some(_)) = accounts.get_opt("default").await {
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Err(self.timeout("kube-controller-manager (default service account)"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for process in [
            &mut self.kwok,
            &mut self.scheduler,
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            if let Some(mut process) = process.take() {
                process.kill();
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error, "could not remove cluster data");
        }
    }
}

fn http_get(path: &'static str) -> http::Request<Vec<u8>> {
    let mut request = http::Request::new(Vec::new());
    *request.uri_mut() = http::Uri::from_static(path);
    request
}

fn kwok_node(name: &str, shape: &NodeShape) -> Node {
    let mut labels = shape.labels.clone();
    labels.insert("kubernetes.io/hostname".to_owned(), name.to_owned());
    labels.insert("type".to_owned(), "kwok".to_owned());
    let mut capacity = serde_json::json!({
        "cpu": shape.cpu,
        "memory": shape.memory,
        "pods": shape.pods.to_string(),
    });
    if let Some((model, count)) = &shape.gpus {
        labels.insert("nvidia.com/gpu.product".to_owned(), model.clone());
        capacity["nvidia.com/gpu"] = serde_json::json!(count.to_string());
    }
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": { KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0" },
        },
        "spec": {},
        "status": { "capacity": capacity, "allocatable": capacity },
    });
    serde_json::from_value(node).unwrap_or_default()
}

fn kubeconfig_yaml(cluster: &str, port: u16, pki: &ClusterPki) -> String {
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: admin
current-context: {cluster}
",
        ca = b64(&pki.ca_cert),
        cert = b64(&pki.admin_cert),
        key = b64(&pki.admin_key),
    )
}

pub(crate) fn free_port() -> Result<u16, HarnessError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| HarnessError::Io {
            what: "find a free loopback port".to_owned(),
            source,
        })?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|source| HarnessError::Io {
            what: "read a bound port".to_owned(),
            source,
        })
}

fn create_dir(path: &Path) -> Result<(), HarnessError> {
    std::fs::create_dir_all(path).map_err(|source| HarnessError::Io {
        what: format!("create {}", path.display()),
        source,
    })
}

fn write_file(path: &Path, content: &str) -> Result<(), HarnessError> {
    std::fs::write(path, content).map_err(|source| HarnessError::Io {
        what: format!("write {}", path.display()),
        source,
    })
}

fn record_pid(dir: &Path, pid: u32) -> Result<(), HarnessError> {
    use std::io::Write as _;
    let path = dir.join("pids");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| HarnessError::Io {
            what: format!("open {}", path.display()),
            source,
        })?;
    writeln!(file, "{pid}").map_err(|source| HarnessError::Io {
        what: format!("write {}", path.display()),
        source,
    })
}

/// Removes the data of clusters whose test process is gone (killed before any
/// destructor could run), first killing any of their processes that survived.
fn sweep_orphans(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = entry
            .file_name()
            .to_string_lossy()
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(owner) = owner else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        kill_recorded_processes(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Kills processes listed in `dir/pids` whose command line still names `dir`
/// (so a recycled pid belonging to something else is left alone).
fn kill_recorded_processes(dir: &Path) {
    let Ok(pids) = std::fs::read_to_string(dir.join("pids")) else {
        return;
    };
    let needle = dir.display().to_string();
    for pid in pids
        .lines()
        .filter_map(|line| line.trim().parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            // SIGKILL via the kill(1) program keeps this crate free of a
            // second unsafe block.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Polls `probe` every 100 ms until it returns `Some`, for at most `timeout`.
///
/// # Errors
/// [`HarnessError::Timeout`] naming `what` when the time runs out.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<T, HarnessError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if started.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                cluster: "-".to_owned(),
                what: what.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Removes the data of clusters whose test process died without cleaning up
/// (every cluster start does this too).
pub fn sweep_orphaned_clusters() {
    sweep_orphans(&harness_root());
}

/// Like [`sweep_orphaned_clusters`], for a process started with its own
/// `TMPDIR`, whose clusters live under `temp_dir/civicgrid-harness`.
pub fn sweep_orphaned_clusters_under(temp_dir: &Path) {
    sweep_orphans(&temp_dir.join("civicgrid-harness"));
}
