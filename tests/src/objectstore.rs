//! A data center's object store for tests: a real S3-compatible server
//! (versitygw over a POSIX directory, built from the Go module proxy by
//! `tools/versitygw/build.sh`, which sets `CIVICGRID_VERSITYGW`), one per
//! data center, with its S3 access log, so a test can tell which requests
//! reached which objects.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use civicgrid_sandbox::object_store::aws::AmazonS3Builder;
use civicgrid_sandbox::object_store::path::Path as ObjectPath;
use civicgrid_sandbox::object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use crate::controlplane::process::ManagedProcess;

/// Where `tools/versitygw/build.sh` leaves the server binary.
pub const BIN_ENV: &str = "CIVICGRID_VERSITYGW";

/// The server's region; any name works, but clients must agree.
pub const REGION: &str = "civicgrid-test";

/// A running S3-compatible server, killed when dropped.
pub struct ObjectStoreServer {
    process: ManagedProcess,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The access key the server accepts.
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
    access_log: PathBuf,
    _root: tempfile::TempDir,
}

impl std::fmt::Debug for ObjectStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreServer")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreServer {
    /// Starts a server holding empty `buckets`, and waits until it answers.
    ///
    /// # Errors
    /// When the binary is missing (`CIVICGRID_VERSITYGW` unset: run
    /// `bash tools/versitygw/build.sh`, as scripts/test.sh does) or the
    /// server does not come up.
    pub async fn start(buckets: &[&str]) -> anyhow::Result<Self> {
        let bin = std::env::var_os(BIN_ENV).map(PathBuf::from).with_context(|| {
            format!("{BIN_ENV} is not set: run `bash tools/versitygw/build.sh` (scripts/test.sh does)")
        })?;
        let root = tempfile::tempdir().context("the store's directory")?;
        let data = root.path().join("data");
        for bucket in buckets {
            std::fs::create_dir_all(data.join(bucket))
                .with_context(|| format!("bucket {bucket}"))?;
        }
        let port = crate::controlplane::free_port()?;
        let access_log = root.path().join("access.log");
        let (access_key, secret_key) = (
            format!("civicgrid{port}"),
            format!("secret-{port}-{}", rand::random::<u64>()),
        );
        let args: Vec<String> = [
            "--port",
            &format!("127.0.0.1:{port}"),
            "--region",
            REGION,
            "--access-log",
            &access_log.to_string_lossy(),
            "--health",
            "/health",
            "--quiet",
            "posix",
            &data.to_string_lossy(),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let env: [(&str, &std::ffi::OsStr); 2] = [
            ("ROOT_ACCESS_KEY_ID", access_key.as_ref()),
            ("ROOT_SECRET_ACCESS_KEY", secret_key.as_ref()),
        ];
        let mut process =
            ManagedProcess::spawn_with_env("versitygw", &bin, &args, &env, root.path())?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let health = format!("127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            process.check_running()?;
            if health_answers(&health).await {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the object store did not answer within 30 s:\n{}",
                process.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            process,
            endpoint,
            access_key,
            secret_key,
            access_log,
            _root: root,
        })
    }

    /// A client for `bucket`'s builder: this server's endpoint, region and
    /// credentials.
    #[must_use]
    pub fn builder(&self) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_region(REGION)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_allow_http(true)
    }

    /// The environment a `civicgrid-runner --object-store s3://…` reads.
    #[must_use]
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }

    /// A client for `bucket`.
    ///
    /// # Errors
    /// When the client cannot be built.
    pub fn client(&self, bucket: &str) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(Arc::new(self.builder().with_bucket_name(bucket).build()?))
    }

    /// Uploads every file of `dir` (not its subfolders) to `bucket` under
    /// `prefix`, as a provider's pipeline would.
    ///
    /// # Errors
    /// When a file cannot be read or the store refuses it.
    pub async fn upload_folder(
        &self,
        bucket: &str,
        prefix: &str,
        dir: &Path,
    ) -> anyhow::Result<()> {
        let client = self.client(bucket)?;
        for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            if !path.is_file() {
                continue;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("a file name")?;
            let bytes = std::fs::read(&path)?;
            client
                .put(
                    &ObjectPath::from(format!("{prefix}/{name}")),
                    PutPayload::from(bytes),
                )
                .await
                .with_context(|| format!("uploading {name}"))?;
        }
        Ok(())
    }

    /// The access log's lines so far: one per request the server answered,
    /// naming the bucket and key it touched.
    ///
    /// # Errors
    /// When the log cannot be read (a check over no log would pass).
    pub fn access_log(&self) -> anyhow::Result<Vec<String>> {
        let log = std::fs::read_to_string(&self.access_log)
            .with_context(|| format!("the access log {}", self.access_log.display()))?;
        anyhow::ensure!(
            log.starts_with("log starts"),
            "an access log without its header"
        );
        Ok(log.lines().map(str::to_owned).collect())
    }

    /// Stops the server (the data center's store is gone).
    pub fn stop(&mut self) {
        self.process.kill();
    }
}

async fn health_answers(address: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return false;
    };
    let request = format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply).await;
    reply.starts_with(b"HTTP/1.1 200")
}
