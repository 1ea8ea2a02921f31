//! The operator as its own process, `civicgrid-operator run` against a
//! harness control cluster, for tests that stop it the way a node failure
//! or the kubelet does: SIGKILL, so no destructor runs, no Lease is
//! released and requests to the API servers are cut off wherever they are.
//!
//! The binary is the one `scripts/test.sh` builds
//! (`cargo build -p civicgrid-operator`), named by [`BIN_ENV`]: a test of
//! this crate cannot name another package's binary through Cargo.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt as _;

use crate::controlplane::process::ManagedProcess;
use crate::controlplane::{Cluster, HarnessError, free_port};

/// Environment variable naming the `civicgrid-operator` binary.
pub const BIN_ENV: &str = "CIVICGRID_OPERATOR_BIN";

/// How to run the operator: the `run` flags a test sets.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// `--instance`: the name in Events and on the Lease.
    pub instance: String,
    /// `--heartbeat-seconds`.
    pub heartbeat: Duration,
    /// `--member-timeout-seconds`.
    pub member_timeout: Duration,
    /// `--readiness-poll-seconds`.
    pub readiness_poll: Duration,
    /// `--leader-election-namespace` and `--lease-duration-seconds`; no
    /// leader election when `None`.
    pub leader_election: Option<(String, Duration)>,
    /// Further `run` flags, as given.
    pub extra_args: Vec<String>,
}

impl OperatorOptions {
    /// What the end-to-end tests run with: a heartbeat of half a second, a
    /// member timeout of two, no leader election, and readiness polled only
    /// every two minutes (longer than any wait: readiness must come back
    /// through the member watches).
    #[must_use]
    pub fn e2e(instance: &str) -> Self {
        Self {
            instance: instance.into(),
            heartbeat: Duration::from_millis(500),
            member_timeout: Duration::from_secs(2),
            readiness_poll: Duration::from_secs(120),
            leader_election: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running `civicgrid-operator run`. Dropping it kills it.
pub struct OperatorProcess {
    instance: String,
    process: ManagedProcess,
    metrics_address: SocketAddr,
}

fn binary() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os(BIN_ENV)
        .map(PathBuf::from)
        .ok_or(HarnessError::OperatorNotBuilt { path: None })?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::OperatorNotBuilt { path: Some(path) })
    }
}

impl OperatorProcess {
    /// Starts the operator against `control` with its admin kubeconfig. Its
    /// output goes to `operator-<instance>.log` among the cluster's logs.
    ///
    /// # Errors
    /// [`HarnessError::OperatorNotBuilt`], or the process does not start.
    pub fn start(control: &Cluster, options: &OperatorOptions) -> Result<Self, HarnessError> {
        let metrics_address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let seconds = |d: Duration| d.as_secs_f64().to_string();
        let mut args = vec![
            "run".to_owned(),
            format!("--instance={}", options.instance),
            format!("--heartbeat-seconds={}", seconds(options.heartbeat)),
            format!(
                "--member-timeout-seconds={}",
                seconds(options.member_timeout)
            ),
            format!(
                "--readiness-poll-seconds={}",
                seconds(options.readiness_poll)
            ),
            format!("--metrics-address={metrics_address}"),
        ];
        if let Some((namespace, lease)) = &options.leader_election {
            args.push(format!("--leader-election-namespace={namespace}"));
            args.push(format!("--lease-duration-seconds={}", seconds(*lease)));
        }
        args.extend(options.extra_args.iter().cloned());
        let kubeconfig = control.kubeconfig_path();
        let process = ManagedProcess::spawn_with_env(
            &format!("operator-{}", options.instance),
            &binary()?,
            &args,
            &[
                ("KUBECONFIG", kubeconfig.as_os_str()),
                ("RUST_LOG", OsStr::new("info,kube=warn")),
            ],
            &control.data_dir().join("logs"),
        )?;
        Ok(Self {
            instance: options.instance.clone(),
            process,
            metrics_address,
        })
    }

    /// The `--instance` it runs as.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// SIGKILL, then waits for the process to be gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Fails with the end of its log if it has exited.
    ///
    /// # Errors
    /// [`HarnessError::ProcessExited`].
    pub fn check_running(&mut self) -> Result<(), HarnessError> {
        self.process.check_running()
    }

    /// The last lines of its output.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// The text of its `/metrics` endpoint.
    ///
    /// # Errors
    /// The endpoint does not answer (yet) or answers with an error status.
    pub async fn metrics(&self) -> Result<String, HarnessError> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{}/metrics", self.metrics_address)
            .parse()
            .map_err(|e: http::uri::InvalidUri| self.http_error(e.to_string()))?;
        let response = client
            .get(uri)
            .await
            .map_err(|e| self.http_error(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http_error(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(self.http_error(format!("{status}: {text}")))
        }
    }

    fn http_error(&self, detail: String) -> HarnessError {
        HarnessError::Io {
            what: format!(
                "GET /metrics of operator {} at {}",
                self.instance, self.metrics_address
            ),
            source: std::io::Error::other(detail),
        }
    }
}
