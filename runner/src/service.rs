//! The Runner service: one authorized query at a time per call, run in this
//! data center's sandbox over this data center's copy of the product.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use civicgrid_sandbox::manifest::Manifest;
use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::{
    DeclaredColumns, FooterCache, Guest, GuestRole, Job, Limits, RunFailure, Sandbox, SandboxError,
    TableStore,
};
use tonic::{Request, Response, Status};

use crate::proto::{self, ingest_reply, run_reply};
use crate::staging::Staging;
use crate::storage::{ProductStore, StorageError};
use crate::uploads::{IngestJob, IngestOutcome};
use crate::wire;

/// Where a runner serving a data directory stages uploads: inside it, so a
/// staged file is renamed into place on the same disk. Staged files are
/// named by upload id, never `<table>.parquet`, and a version names only
/// `data/<table>/<sha256>.parquet`: nothing staged is ever a table.
pub const DIRECTORY_STAGING: &str = ".staging";

/// Uploads ingested at once on one runner.
pub const INGESTS_AT_ONCE: usize = 2;

/// Chunks of the released Arrow IPC stream: at most this many bytes each.
pub const RESULT_CHUNK_BYTES: usize = 1 << 20;

/// The most a run may ask for, whatever the marketplace sends.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Linear memory per run.
    pub memory_bytes: u64,
    /// Wall time per run.
    pub wall_time: Duration,
}

/// The Runner service over one sandbox and one data center's products.
pub struct RunnerService {
    /// The name the caller's certificate must carry: the marketplace's.
    client_name: String,
    sandbox: Arc<Sandbox>,
    sql_guest: Arc<Guest>,
    footers: Arc<FooterCache>,
    products: ProductStore,
    ceilings: Ceilings,
    metrics: Arc<crate::Metrics>,
    measuring: Arc<tokio::sync::Semaphore>,
    /// Ingests at once: each reads, converts and writes a whole upload, and
    /// must leave the runs and measurements their slots.
    ingesting: Arc<tokio::sync::Semaphore>,
    staging: Staging,
}

impl std::fmt::Debug for RunnerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerService")
            .field("products", &self.products)
            .field("ceilings", &self.ceilings)
            .finish_non_exhaustive()
    }
}

impl RunnerService {
    /// A service running queries in `sandbox` with `sql_guest`, over the
    /// products' folders in `products`, for callers whose certificate names
    /// [`crate::MARKETPLACE_NAME`] (see [`Self::answering`]).
    #[must_use]
    pub fn new(
        sandbox: Arc<Sandbox>,
        sql_guest: Arc<Guest>,
        products: impl Into<ProductStore>,
        ceilings: Ceilings,
    ) -> Self {
        let products = products.into();
        let staging = Staging::new(match &products {
            ProductStore::Directory(dir) => dir.join(DIRECTORY_STAGING),
            ProductStore::Objects { .. } => std::env::temp_dir().join("civicgrid-runner-staging"),
        });
        staging.recover();
        staging.sweep();
        Self {
            staging,
            ingesting: Arc::new(tokio::sync::Semaphore::new(INGESTS_AT_ONCE)),
            client_name: crate::MARKETPLACE_NAME.to_owned(),
            metrics: Arc::new(crate::Metrics::new(sandbox.slots())),
            measuring: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(sandbox.slots()).unwrap_or(1).max(1),
            )),
            sandbox,
            sql_guest,
            footers: Arc::default(),
            products,
            ceilings,
        }
    }
}

impl RunnerService {
    /// Answers only callers whose certificate names `name`. Every runner
    /// and the marketplace may share one CA; the name is what keeps one
    /// data center's runner from asking another's for its rows.
    #[must_use]
    pub fn answering(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Stages uploads in `dir` (by default `.staging` in the data
    /// directory, or the system's temporary directory with an object store).
    #[must_use]
    pub fn staging_in(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.staging = Staging::new(dir);
        self.staging.recover();
        self.staging.sweep();
        self
    }

    /// Its metrics.
    #[must_use]
    pub fn metrics(&self) -> &Arc<crate::Metrics> {
        &self.metrics
    }
}

/// A request checked and ready to run on a blocking thread.
struct Checked {
    product_id: String,
    location: String,
    declared: HashMap<String, Vec<String>>,
    policy: OutputPolicy,
    privacy_budget: f64,
    sql: String,
    algorithm: Vec<u8>,
    as_of_unix_seconds: u64,
    limits: Limits,
    version: Option<Manifest>,
}

impl RunnerService {
    /// The request's own fields, each refused by name.
    fn check(&self, request: proto::RunRequest) -> Result<Checked, Status> {
        if request.product_id.is_empty() {
            return Err(Status::invalid_argument("product_id is required"));
        }
        self.products
            .check(&request.storage_location)
            .map_err(|error| {
                Status::failed_precondition(format!(
                    "storage_location of product {}: {error}",
                    request.product_id
                ))
            })?;
        if request.tables.is_empty() {
            return Err(Status::invalid_argument(
                "tables: a product declares at least one table",
            ));
        }
        let policy: OutputPolicy = serde_json::from_slice(&request.policy_json)
            .map_err(|error| Status::invalid_argument(format!("policy_json: {error}")))?;
        if !request.privacy_budget.is_finite() || request.privacy_budget < 0.0 {
            return Err(Status::invalid_argument(
                "privacy_budget: a finite epsilon, 0 or more",
            ));
        }
        let limits = request
            .limits
            .ok_or_else(|| Status::invalid_argument("limits are required"))?;
        let wall_time = Duration::from_millis(limits.wall_time_ms);
        if limits.fuel == 0 || wall_time.is_zero() || limits.memory_bytes == 0 {
            return Err(Status::invalid_argument(
                "limits: fuel, wall_time_ms and memory_bytes must each be above 0",
            ));
        }
        if limits.memory_bytes > self.ceilings.memory_bytes || wall_time > self.ceilings.wall_time {
            return Err(Status::invalid_argument(format!(
                "limits: at most {} bytes of memory and {} ms of wall time on this runner",
                self.ceilings.memory_bytes,
                self.ceilings.wall_time.as_millis()
            )));
        }
        let version = request
            .version
            .map(wire::version_from_proto)
            .transpose()
            .map_err(|error| Status::invalid_argument(format!("version: {error}")))?;
        Ok(Checked {
            version,
            product_id: request.product_id,
            location: request.storage_location,
            declared: request
                .tables
                .into_iter()
                .map(|table| (table.name, table.columns))
                .collect(),
            policy,
            privacy_budget: request.privacy_budget,
            sql: request.sql,
            algorithm: request.algorithm_wasm,
            as_of_unix_seconds: request.as_of_unix_seconds,
            limits: Limits {
                fuel: limits.fuel,
                wall_time,
                memory_bytes: limits.memory_bytes,
                ..Limits::default()
            },
        })
    }

    /// The product's tables in this data center's store: version
    /// `version`'s files, or (for a product with no version) its folder's
    /// tables as they are now.
    async fn open(
        &self,
        product_id: &str,
        location: &str,
        version: Option<&Manifest>,
    ) -> Result<Arc<dyn TableStore>, Status> {
        let opened = match version {
            Some(manifest) => {
                self.products
                    .version(location, manifest, &self.footers)
                    .await
            }
            None => self.products.tables(location, &self.footers).await,
        };
        opened.map_err(|error| match error {
                // Which file is missing or changed is the operator's to
                // know: the marketplace is told the version cannot be read.
                StorageError::Version(why) => {
                    tracing::error!(product = %product_id, %why, "a version's file is missing or changed");
                    Status::data_loss(format!(
                        "product {product_id}'s data in this data center is not the version it should be; the runner logged why"
                    ))
                }
                StorageError::Location(error) => Status::failed_precondition(format!(
                    "storage_location of product {product_id}: {error}"
                )),
                // The store's own error names hosts and buckets: the log
                // has it, the marketplace is told only that it failed.
                StorageError::Store(why) => {
                    tracing::warn!(product = %product_id, %why, "the store did not answer");
                    Status::unavailable("this data center's store did not answer")
                }
            })
    }

    fn run_checked(
        &self,
        run: &Checked,
        files: Arc<dyn TableStore>,
    ) -> Result<civicgrid_sandbox::Outcome, RunFailure> {
        let tables: Arc<dyn TableStore> =
            Arc::new(DeclaredColumns::new(files, run.declared.clone()));
        let guest = if run.algorithm.is_empty() {
            Arc::clone(&self.sql_guest)
        } else {
            self.sandbox.load(&run.algorithm, GuestRole::Algorithm)?
        };
        self.sandbox.run_metered(
            &guest,
            Job {
                sql: &run.sql,
                tables,
                policy: &run.policy,
                privacy_budget: run.privacy_budget,
                as_of_unix_seconds: run.as_of_unix_seconds,
            },
            &run.limits,
        )
    }
}

/// The replies of one run: the released stream in chunks, then `ran`; or
/// `failed` alone.
fn replies(outcome: Result<civicgrid_sandbox::Outcome, RunFailure>) -> Vec<proto::RunReply> {
    let reply = |message| proto::RunReply {
        message: Some(message),
    };
    let failed = |fuel, error: &SandboxError| {
        reply(run_reply::Message::Failed(proto::Failed {
            fuel,
            error: Some(wire::failure_to_proto(error)),
        }))
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(failure) => return vec![failed(failure.fuel, &failure.error)],
    };
    let stream = match civicgrid_sandbox::ipc::write_stream(&outcome.batches) {
        Ok(stream) => stream,
        Err(error) => {
            return vec![failed(
                outcome.metering.fuel,
                &SandboxError::Data(format!("encoding the result: {error}")),
            )];
        }
    };
    let mut messages: Vec<proto::RunReply> = stream
        .chunks(RESULT_CHUNK_BYTES)
        .map(|chunk| reply(run_reply::Message::ArrowIpc(chunk.to_vec())))
        .collect();
    messages.push(reply(run_reply::Message::Ran(proto::Ran {
        metering: Some(wire::metering_to_proto(&outcome.metering)),
        truncated: outcome.truncated,
        privacy_spent: outcome.privacy_spent,
    })));
    messages
}

type ReplyStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::RunReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl proto::runner_server::Runner for Arc<RunnerService> {
    type RunStream = ReplyStream;

    async fn run(
        &self,
        request: Request<proto::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        self.answers(&request)?;
        let traceparent = request
            .metadata()
            .get(civicgrid_telemetry::propagation::TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let request = request.into_inner();
        let query_id = request.query_id.clone();
        let span = tracing::info_span!("run", query = %query_id, product = %request.product_id);
        // The marketplace's query span is this run's parent.
        if let Some(traceparent) = &traceparent {
            civicgrid_telemetry::propagation::join(&span, traceparent);
        }
        let _in_flight = self.metrics.entered();
        let checked = self.check(request).inspect_err(|_| {
            self.metrics.ended("refused", 0, 0, 0);
        })?;
        let files = self
            .open(
                &checked.product_id,
                &checked.location,
                checked.version.as_ref(),
            )
            .await
            .inspect_err(|_| self.metrics.ended("refused", 0, 0, 0))?;
        let service = Arc::clone(self);
        let outcome = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            service.run_checked(&checked, files)
        })
        .await
        .map_err(|error| {
            tracing::error!(query = %query_id, %error, "the run's task failed");
            self.metrics.ended("failed", 0, 0, 0);
            Status::internal("the run's task failed")
        })?;
        match &outcome {
            Ok(ran) => self.metrics.ended(
                "ran",
                ran.metering.fuel,
                ran.metering.rows_read,
                ran.metering.bytes_read,
            ),
            Err(failure) => self.metrics.ended("failed", failure.fuel, 0, 0),
        }
        let messages = replies(outcome).into_iter().map(Ok);
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn measure(
        &self,
        request: Request<proto::MeasureRequest>,
    ) -> Result<Response<proto::MeasureReply>, Status> {
        self.answers(&request)?;
        let request = request.into_inner();
        if request.product_id.is_empty() {
            return Err(Status::invalid_argument("product_id is required"));
        }
        if request.tables.is_empty() {
            return Err(Status::invalid_argument(
                "tables: a product declares at least one table",
            ));
        }
        // At most as many measurements at once as runs: each reads every
        // declared column of a product once.
        let _permit = self
            .measuring
            .acquire()
            .await
            .map_err(|_| Status::unavailable("this runner is shutting down"))?;
        let version = request
            .version
            .map(wire::version_from_proto)
            .transpose()
            .map_err(|error| Status::invalid_argument(format!("version: {error}")))?;
        let files = self
            .open(
                &request.product_id,
                &request.storage_location,
                version.as_ref(),
            )
            .await?;
        let declared = wire::declared_from_proto(request.tables);
        let now_ms = request.now_ms;
        let measured = tokio::task::spawn_blocking(move || {
            civicgrid_sandbox::quality::measure(files.as_ref(), &declared, now_ms)
        })
        .await
        .map_err(|error| {
            tracing::error!(product = %request.product_id, %error, "the measurement's task failed");
            Status::internal("the measurement's task failed")
        })?;
        wire::measured_to_proto(measured)
            .map(Response::new)
            .map_err(|error| {
                // Why a table could not be read names keys, hosts and the
                // store's replies: this runner's log has it, the provider
                // is told which table.
                tracing::warn!(product = %request.product_id, %error, "a product could not be measured");
                match error {
                    civicgrid_sandbox::quality::QualityError::Unreadable { table, .. } => {
                        Status::failed_precondition(format!(
                            "cannot read table {table} of product {}; the runner in its data center logged why",
                            request.product_id
                        ))
                    }
                    other => Status::failed_precondition(other.to_string()),
                }
            })
    }

    async fn stage(
        &self,
        request: Request<proto::StageRequest>,
    ) -> Result<Response<proto::StageReply>, Status> {
        self.answers(&request)?;
        self.stage_chunk(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove(
        &self,
        request: Request<proto::RemoveRequest>,
    ) -> Result<Response<proto::RemoveReply>, Status> {
        self.answers(&request)?;
        let request = request.into_inner();
        self.products
            .remove(&request.storage_location, &request.paths)
            .await
            .map_err(|error| {
                tracing::error!(product = %request.product_id, %error, "removing a withdrawn version's files failed");
                match error {
                    StorageError::Location(_) | StorageError::Version(_) => {
                        Status::invalid_argument(error.to_string())
                    }
                    _ => Status::unavailable("this data center's store did not remove the files"),
                }
            })?;
        Ok(Response::new(proto::RemoveReply {}))
    }

    async fn list_incoming(
        &self,
        request: Request<proto::ListIncomingRequest>,
    ) -> Result<Response<proto::ListIncomingReply>, Status> {
        self.answers(&request)?;
        let request = request.into_inner();
        let files = self
            .products
            .list_incoming(
                &request.storage_location,
                &request.product_id,
                &request.tables,
            )
            .await
            .map_err(|error| {
                tracing::warn!(product = %request.product_id, %error, "listing a refresh folder failed");
                Status::unavailable("this data center's store did not list the refresh folder")
            })?;
        Ok(Response::new(proto::ListIncomingReply {
            files: files
                .into_iter()
                .map(|file| proto::IncomingFile {
                    table: file.table,
                    name: file.name,
                    bytes: file.bytes,
                })
                .collect(),
        }))
    }

    async fn take_incoming(
        &self,
        request: Request<proto::TakeIncomingRequest>,
    ) -> Result<Response<proto::TakeIncomingReply>, Status> {
        self.answers(&request)?;
        let request = request.into_inner();
        let file = request
            .file
            .ok_or_else(|| Status::invalid_argument("file is required"))?;
        let incoming = crate::storage::Incoming {
            table: file.table,
            name: file.name,
            bytes: file.bytes,
        };
        let taken = crate::uploads::take_incoming(
            &self.products,
            &self.staging,
            &request.upload_id,
            (&request.storage_location, &request.product_id),
            &incoming,
        )
        .await
        .map_err(|error| {
            tracing::warn!(product = %request.product_id, %error, "taking a refresh file failed");
            match error {
                StorageError::Location(_) | StorageError::Version(_) => {
                    Status::invalid_argument(error.to_string())
                }
                _ => Status::unavailable("this data center's store did not give the refresh file"),
            }
        })?;
        Ok(Response::new(match taken {
            Some((bytes, sha256)) => proto::TakeIncomingReply {
                taken: true,
                bytes,
                sha256,
            },
            None => proto::TakeIncomingReply::default(),
        }))
    }

    async fn ingest(
        &self,
        request: Request<proto::IngestRequest>,
    ) -> Result<Response<proto::IngestReply>, Status> {
        self.answers(&request)?;
        let _permit = self
            .ingesting
            .acquire()
            .await
            .map_err(|_| Status::unavailable("this runner is shutting down"))?;
        self.ingest_staged(request.into_inner())
            .await
            .map(Response::new)
    }
}

impl RunnerService {
    async fn stage_chunk(&self, request: proto::StageRequest) -> Result<proto::StageReply, Status> {
        let staging = self.staging.clone();
        let staged = tokio::task::spawn_blocking(move || {
            staging.stage(&request.upload_id, request.offset, &request.data)
        })
        .await
        .map_err(|_| Status::internal("the staging task failed"))?
        .map_err(|error| match error {
            crate::staging::StagingError::Id => Status::invalid_argument(error.to_string()),
            crate::staging::StagingError::Io(why) => {
                tracing::error!(%why, "staging an upload failed");
                Status::unavailable("this runner could not stage the chunk")
            }
        })?;
        Ok(proto::StageReply {
            staged_bytes: staged,
        })
    }

    async fn ingest_staged(
        &self,
        request: proto::IngestRequest,
    ) -> Result<proto::IngestReply, Status> {
        let table = request
            .table
            .ok_or_else(|| Status::invalid_argument("table is required"))?;
        let format = civicgrid_sandbox::ingest::Format::parse(&request.format)
            .ok_or_else(|| Status::invalid_argument("format: parquet or csv"))?;
        self.products
            .check_name(&request.storage_location)
            .map_err(|error| {
                Status::failed_precondition(format!(
                    "storage_location of product {}: {error}",
                    request.product_id
                ))
            })?;
        let job = IngestJob {
            upload_id: request.upload_id,
            location: request.storage_location,
            table: wire::declared_from_proto(vec![table]).remove(0),
            format,
            sha256: request.sha256,
            bytes: request.bytes,
            adopt: wire::declared_from_proto(request.adopt),
            guard: request.guard.map(|guard| crate::uploads::ChangeGuard {
                unit_column: guard.unit_column,
                min_units: guard.min_units,
                append: guard.append,
                previous: guard
                    .previous
                    .into_iter()
                    .map(wire::file_from_proto)
                    .collect(),
            }),
        };
        let product = request.product_id;
        let outcome = crate::uploads::ingest(&self.products, &self.staging, job)
            .await
            .map_err(|error| {
                tracing::error!(%product, %error, "ingesting an upload failed");
                match error {
                    StorageError::Location(error) => Status::failed_precondition(format!(
                        "storage_location of product {product}: {error}"
                    )),
                    _ => Status::unavailable(
                        "this data center's store did not take the upload; the runner logged why",
                    ),
                }
            })?;
        let outcome = match outcome {
            IngestOutcome::Ingested { upload, adopted } => {
                ingest_reply::Outcome::Ingested(proto::Ingested {
                    upload: Some(wire::file_to_proto(&upload)),
                    adopted: adopted
                        .iter()
                        .map(|(table, file)| {
                            wire::version_table_to_proto(table, std::slice::from_ref(file))
                        })
                        .collect(),
                })
            }
            IngestOutcome::Refused(why) => ingest_reply::Outcome::Refused(why),
            IngestOutcome::InProgress => ingest_reply::Outcome::InProgress(true),
        };
        Ok(proto::IngestReply {
            outcome: Some(outcome),
        })
    }
}

impl RunnerService {
    /// Refuses a caller whose certificate does not name the marketplace.
    #[allow(clippy::result_large_err)]
    fn answers<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller_named = request.peer_certs().is_some_and(|certificates| {
            certificates
                .first()
                .is_some_and(|leaf| crate::certificate_names(leaf.as_ref(), &self.client_name))
        });
        if caller_named {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this runner answers only {}",
                self.client_name
            )))
        }
    }
}

/// The runner's TLS: its own certificate (naming its data center) and the
/// CA whose client certificates may call. A client certificate is
/// required: nobody but the marketplace gets to send a request.
#[must_use]
pub fn mutual_tls(
    cert_pem: impl AsRef<[u8]>,
    key_pem: impl AsRef<[u8]>,
    client_ca_pem: impl AsRef<[u8]>,
) -> tonic::transport::ServerTlsConfig {
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(tonic::transport::Certificate::from_pem(client_ca_pem))
        .client_auth_optional(false)
}

/// Serves the Runner service and health on `listener` until `shutdown`,
/// over mutual TLS only: `tls` must name the client CA whose certificates
/// (the marketplace's) may call.
///
/// # Errors
/// When the transport fails.
pub async fn serve(
    service: Arc<RunnerService>,
    listener: tokio::net::TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::runner_server::RunnerServer<Arc<RunnerService>>>()
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .trace_fn(|request| {
            tracing::info_span!("grpc", otel.name = %request.uri().path(), rpc.system = "grpc")
        })
        .add_service(health)
        .add_service(proto::runner_server::RunnerServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
