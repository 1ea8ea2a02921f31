//! What a kubelet would do for runner pods, in the multi-cluster tests.
//! kwok nodes run no containers: for each runner pod the operator placed
//! in a member cluster (Running on a kwok node), this starts a real
//! `civicgrid-runner` process configured from that pod's spec, the way a
//! kubelet would start the container: its arguments with `$(VAR)`
//! expanded, its environment (values, the downward API's labels and pod
//! IP, and `envFrom` Secrets read from the member cluster), its Secret and
//! `emptyDir` volumes as directories. Two things differ, because every pod
//! shares this host: each pod's ports (`--listen`, `--metrics-listen`, and
//! the advertised endpoint) become free loopback ports, and the image's
//! files (the SQL guest) are the workspace's build of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams};

use crate::controlplane::free_port;
use crate::controlplane::process::ManagedProcess;

/// How long a runner may take to start serving: a cold module cache means
/// compiling the SQL guest with a debug build.
const SERVING_WITHIN: std::time::Duration = std::time::Duration::from_secs(300);

/// Where the runner image keeps the SQL guest.
const IMAGE_GUEST_DIR: &str = "/usr/share/civicgrid/";

/// One runner pod's process.
pub struct RunnerPod {
    /// The data center the operator placed the pod in.
    pub data_center: String,
    /// The pod's name.
    pub pod: String,
    /// Where it serves the marketplace.
    pub endpoint: SocketAddr,
    /// Its Prometheus metrics, when the pod asks for them.
    pub metrics: Option<SocketAddr>,
    process: ManagedProcess,
}

impl RunnerPod {
    /// The end of the process's log.
    #[must_use]
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// The runner pods' processes, by pod UID.
pub struct RunnerPods {
    binary: PathBuf,
    guest_dir: PathBuf,
    module_cache: PathBuf,
    work: tempfile::TempDir,
    running: BTreeMap<String, RunnerPod>,
}

impl RunnerPods {
    /// Ready to start `civicgrid-runner` (beside the operator binary that
    /// `CIVICGRID_OPERATOR_BIN` names) with the workspace's SQL guest.
    ///
    /// # Errors
    /// When the runner binary is not built.
    pub fn new() -> anyhow::Result<Self> {
        let operator = std::env::var_os(crate::operator::BIN_ENV)
            .map(PathBuf::from)
            .context("CIVICGRID_OPERATOR_BIN is not set (scripts/test.sh sets it)")?;
        let binary = operator.with_file_name("civicgrid-runner");
        anyhow::ensure!(
            binary.is_file(),
            "{} is not built: cargo build --workspace",
            binary.display()
        );
        Ok(Self {
            binary,
            guest_dir: crate::sandbox::guest_dir(),
            module_cache: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/runner-module-cache"),
            work: tempfile::tempdir()?,
            running: BTreeMap::new(),
        })
    }

    /// Starts a process for every Running runner pod in `namespace` of the
    /// member cluster behind `client` (data center `data_center`) that has
    /// none, and stops those whose pod is gone.
    ///
    /// # Errors
    /// When the pods cannot be listed, or a pod's spec cannot be run.
    pub async fn sync(
        &mut self,
        data_center: &str,
        client: &Client,
        namespace: &str,
    ) -> anyhow::Result<()> {
        let listed = running_pods(client, namespace).await?;
        let running: Vec<&Pod> = listed.iter().collect();
        let alive: Vec<String> = running
            .iter()
            .filter_map(|pod| pod.metadata.uid.clone())
            .collect();
        self.running
            .retain(|uid, pod| pod.data_center != data_center || alive.contains(uid));
        for pod in running {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if self.running.contains_key(&uid) {
                continue;
            }
            let started = self.start(data_center, pod, client, namespace).await?;
            self.running.insert(uid, started);
        }
        Ok(())
    }

    /// Stops the processes of `data_center`'s pods that are gone or being
    /// deleted, and starts none: what a kubelet does first when pods are
    /// deleted, before their replacements are scheduled.
    ///
    /// # Errors
    /// When the pods cannot be listed.
    pub async fn reap(
        &mut self,
        data_center: &str,
        client: &Client,
        namespace: &str,
    ) -> anyhow::Result<()> {
        let alive = running_pods(client, namespace).await?;
        self.running.retain(|uid, pod| {
            pod.data_center != data_center
                || alive.iter().any(|p| p.metadata.uid.as_ref() == Some(uid))
        });
        Ok(())
    }

    /// Stops every runner process of `data_center`: the data center is
    /// lost.
    pub fn lose(&mut self, data_center: &str) {
        self.running.retain(|_, pod| pod.data_center != data_center);
    }

    /// The processes running for `data_center`'s pods.
    #[must_use]
    pub fn in_data_center(&self, data_center: &str) -> Vec<&RunnerPod> {
        self.running
            .values()
            .filter(|pod| pod.data_center == data_center)
            .collect()
    }

    async fn start(
        &self,
        data_center: &str,
        pod: &Pod,
        client: &Client,
        namespace: &str,
    ) -> anyhow::Result<RunnerPod> {
        let name = pod.metadata.name.clone().context("a pod's name")?;
        let spec = pod.spec.as_ref().context("a pod's spec")?;
        let container = spec.containers.first().context("a container")?;
        let env = environment(pod, container, client, namespace).await?;
        anyhow::ensure!(
            env.get("CIVICGRID_DATA_CENTER").map(String::as_str) == Some(data_center),
            "pod {name} in {data_center} is labelled for {:?}",
            env.get("CIVICGRID_DATA_CENTER")
        );
        let pod_dir = self.work.path().join(&name);
        let mounts = self
            .mount(&pod_dir, pod, container, client, namespace)
            .await?;
        let endpoint = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let port = |port_name: &str| -> anyhow::Result<i32> {
            container
                .ports
                .iter()
                .flatten()
                .find(|port| port.name.as_deref() == Some(port_name))
                .map(|port| port.container_port)
                .with_context(|| format!("pod {name}: no container port named {port_name}"))
        };
        // What the pod's spec says must agree with itself before its ports
        // are moved: the runner listens on its `runner` port, advertises
        // that port at its pod IP, and serves metrics on its `metrics` one.
        let (runner_port, metrics_port) = (port("runner")?, port("metrics")?);
        let pod_ip = env.get("POD_IP").cloned().unwrap_or_default();
        let mut metrics = None;
        let mut args = Vec::new();
        for arg in container.args.iter().flatten() {
            let arg = mounts.iter().fold(expand(arg, &env), |arg, (mount, dir)| {
                arg.replace(mount.as_str(), &dir.to_string_lossy())
            });
            let arg = match arg.split_once('=') {
                Some(("--listen", listen)) => {
                    anyhow::ensure!(
                        listen.ends_with(&format!(":{runner_port}")),
                        "pod {name} listens on {listen}, not its runner port {runner_port}"
                    );
                    format!("--listen={endpoint}")
                }
                Some(("--advertise", advertised)) => {
                    anyhow::ensure!(
                        advertised == format!("https://{pod_ip}:{runner_port}"),
                        "pod {name} advertises {advertised}, not https://{pod_ip}:{runner_port}"
                    );
                    format!("--advertise=https://{endpoint}")
                }
                Some(("--metrics-listen", listen)) => {
                    anyhow::ensure!(
                        listen.ends_with(&format!(":{metrics_port}")),
                        "pod {name} serves metrics on {listen}, not its metrics port {metrics_port}"
                    );
                    let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                    metrics = Some(address);
                    format!("--metrics-listen={address}")
                }
                Some(("--sql-guest", path)) => {
                    let file = path.strip_prefix(IMAGE_GUEST_DIR).with_context(|| {
                        format!("pod {name}: the SQL guest outside the image's {IMAGE_GUEST_DIR}")
                    })?;
                    format!("--sql-guest={}", self.guest_dir.join(file).display())
                }
                _ => arg,
            };
            args.push(arg);
        }
        let env: Vec<(&str, &std::ffi::OsStr)> = env
            .iter()
            .map(|(key, value)| (key.as_str(), std::ffi::OsStr::new(value.as_str())))
            .chain([("RUST_LOG", std::ffi::OsStr::new("info"))])
            .collect();
        // The pod's environment, and nothing of the test's.
        let mut process = ManagedProcess::spawn_with_only_env(
            &format!("runner-{name}"),
            &self.binary,
            &args,
            &env,
            &pod_dir,
        )?;
        let deadline = std::time::Instant::now() + SERVING_WITHIN;
        while !process.log_tail().contains("listening on") {
            process.check_running()?;
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "pod {name}'s runner is not serving after {} s:\n{}",
                SERVING_WITHIN.as_secs(),
                process.log_tail()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Ok(RunnerPod {
            data_center: data_center.to_owned(),
            pod: name,
            endpoint,
            metrics,
            process,
        })
    }

    /// The container's Secret and `emptyDir` volumes as directories under
    /// `pod_dir`: (mount path, directory).
    async fn mount(
        &self,
        pod_dir: &Path,
        pod: &Pod,
        container: &Container,
        client: &Client,
        namespace: &str,
    ) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.volumes.clone())
            .unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = volumes
                .iter()
                .find(|volume| volume.name == mount.name)
                .with_context(|| format!("volume {}", mount.name))?;
            let dir = if mount.name == "module-cache" && volume.empty_dir.is_some() {
                self.module_cache.clone()
            } else {
                pod_dir.join(&mount.name)
            };
            std::fs::create_dir_all(&dir)?;
            if let Some(source) = &volume.secret {
                let secret_name = source.secret_name.clone().context("a Secret's name")?;
                for (key, value) in secret_data(client, namespace, &secret_name).await? {
                    std::fs::write(dir.join(key), value)?;
                }
            } else {
                anyhow::ensure!(
                    volume.empty_dir.is_some(),
                    "volume {}: this harness mounts Secrets and emptyDirs only",
                    mount.name
                );
            }
            mounts.push((mount.mount_path.clone(), dir));
        }
        // Longest first, so a mount inside another is replaced as itself.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(mounts)
    }
}

/// The runner pods Running in `namespace` and not being deleted.
async fn running_pods(client: &Client, namespace: &str) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=civicgrid-runner"))
        .await?
        .items
        .into_iter()
        .filter(|pod| {
            pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && pod.metadata.deletion_timestamp.is_none()
        })
        .collect())
}

async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("Secret {namespace}/{name}"))?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| (key, value.0))
        .collect())
}

/// The container's environment, as a kubelet resolves it.
async fn environment(
    pod: &Pod,
    container: &Container,
    client: &Client,
    namespace: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        if let Some(secret) = &from.secret_ref {
            for (key, value) in secret_data(client, namespace, &secret.name).await? {
                env.insert(key, String::from_utf8(value)?);
            }
        }
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    for var in container.env.iter().flatten() {
        let value = match (
            &var.value,
            var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()),
        ) {
            (Some(value), _) => expand(value, &env),
            (None, Some(field)) => match field.field_path.as_str() {
                "status.podIP" => "127.0.0.1".to_owned(),
                path => {
                    let label = path
                        .strip_prefix("metadata.labels['")
                        .and_then(|rest| rest.strip_suffix("']"))
                        .with_context(|| format!("env {}: field {path}", var.name))?;
                    labels.get(label).cloned().unwrap_or_default()
                }
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// `$(VAR)` replaced by `env`'s value, as Kubernetes expands arguments.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    env.iter().fold(text.to_owned(), |text, (key, value)| {
        text.replace(&format!("$({key})"), value)
    })
}
