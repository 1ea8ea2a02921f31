//! The marketplace's side of the runners (docs/runners.md): the directory
//! runners report to, and the client that sends them reserved queries.
//! Both speak mutual TLS; a runner's certificate names its data center
//! (`<data-center>.runner.civicgrid`), which the directory checks on every
//! heartbeat and the client dials.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use civicgrid_runner::proto::{self, directory_server::Directory, run_reply};
use civicgrid_runner::uploads::IngestOutcome;
use civicgrid_runner::{certificate_name, certificate_names, wire};
use civicgrid_sandbox::{Outcome, RunFailure, SandboxError};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use prost::Message as _;

use crate::error::MarketError;
use crate::queries::remote::{
    IngestRequest, MeasureJob, RemoteIngest, RemoteJob, RemoteListIncoming, RemoteMeasure,
    RemoteRun, RemoteStage, RemoteTakeIncoming, RunnerChoice, Runners,
};
use crate::store::{Backend, Store, runner_reports};

/// How long a runner counts as ready after a heartbeat, unless configured.
pub const DEFAULT_RUNNER_TTL: Duration = Duration::from_secs(15);

/// Most runners one data center may register: a runner's certificate must
/// not let it fill the marketplace's memory with endpoints.
pub const MAX_RUNNERS_PER_DATA_CENTER: usize = 64;

/// Most runners one query is offered to before it is refused as
/// unavailable: each that does not take it is counted gone at once.
const MAX_RUNNERS_TRIED: usize = 4;

/// Longest version string a runner may report.
const MAX_VERSION_CHARS: usize = 64;

/// Beyond its wall time, how long a run's answer may take to arrive.
const ANSWER_MARGIN: Duration = Duration::from_secs(30);

/// How long a runner may take to measure a product at submission (it reads
/// every declared column once).
const MEASURE_WITHIN: Duration = Duration::from_secs(600);

/// How often a server reads the runners' reports other servers received.
const SHARED_REPORTS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Registered {
    channel: Channel,
    status: proto::RunnerStatus,
    seen: Instant,
    /// When it last failed to take a query: it is not picked again until a
    /// report newer than that.
    down_since: Option<Instant>,
}

impl Registered {
    fn ready(&self, ttl: Duration) -> bool {
        self.seen.elapsed() < ttl && self.down_since.is_none_or(|down| self.seen > down)
    }
}

/// The runners that have reported, by data center and endpoint.
pub struct RunnerDirectory {
    runners: RwLock<HashMap<String, HashMap<String, Registered>>>,
    client_tls: ClientTlsConfig,
    ttl: Duration,
    /// Where reports are shared with the other servers on the database.
    shared: std::sync::OnceLock<Store>,
}

impl std::fmt::Debug for RunnerDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerDirectory")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RunnerDirectory {
    /// A directory whose runners are dialled with `client_tls` (the
    /// marketplace's client certificate and the runners' CA) and count as
    /// ready for `ttl` after each heartbeat.
    #[must_use]
    pub fn new(client_tls: ClientTlsConfig, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            runners: RwLock::default(),
            client_tls,
            ttl,
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Shares reports with the other servers on `store`'s database: each
    /// report this server receives is stored, and every second the reports
    /// the others received are read, so a runner that reports to any server
    /// behind the load balancer takes queries from all. Only PostgreSQL
    /// serves several servers; on SQLite this does nothing.
    pub fn share_through(self: &Arc<Self>, store: Store) -> Option<tokio::task::JoinHandle<()>> {
        if store.backend() != Backend::Postgres || self.shared.set(store.clone()).is_err() {
            return None;
        }
        let directory = Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SHARED_REPORTS_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let kept_ms =
                i64::try_from(directory.ttl.saturating_mul(4).as_millis()).unwrap_or(i64::MAX);
            loop {
                ticks.tick().await;
                match runner_reports::recent(store.reader(), store.backend(), kept_ms).await {
                    Ok(reports) => directory.merge(reports),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the runners' reports other servers received");
                    }
                }
            }
        }))
    }

    /// Takes in reports other servers received (and checked), each as of
    /// when it was received.
    fn merge(&self, reports: Vec<runner_reports::StoredReport>) {
        for report in reports {
            let Ok(status) = proto::RunnerStatus::decode(report.status.as_slice()) else {
                tracing::warn!(data_center = %report.data_center, "a stored runner report does not decode");
                continue;
            };
            if status.data_center != report.data_center || status.endpoint != report.endpoint {
                tracing::warn!(data_center = %report.data_center, "a stored runner report names another runner");
                continue;
            }
            let age = Duration::from_millis(u64::try_from(report.age_ms).unwrap_or(0));
            let seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            if let Err(status) = self.note(status, seen) {
                tracing::debug!(%status, "a stored runner report is not taken");
            }
        }
    }

    fn record(&self, mut status: proto::RunnerStatus) -> Result<proto::RunnerStatus, Status> {
        status.endpoint = canonical_endpoint(&status.endpoint)?;
        if status.version.chars().count() > MAX_VERSION_CHARS {
            return Err(Status::invalid_argument(format!(
                "version: at most {MAX_VERSION_CHARS} characters"
            )));
        }
        self.note(status.clone(), Instant::now())?;
        Ok(status)
    }

    /// Notes a checked report received at `seen`; an older one than what is
    /// known changes nothing.
    fn note(&self, status: proto::RunnerStatus, seen: Instant) -> Result<(), Status> {
        let name = certificate_name(&status.data_center);
        let endpoint = Endpoint::from_shared(status.endpoint.clone())
            .map_err(|error| Status::invalid_argument(format!("endpoint: {error}")))?
            .tls_config(self.client_tls.clone().domain_name(name))
            .map_err(|error| Status::invalid_argument(format!("endpoint: {error}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        let mut runners = self
            .runners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = runners.entry(status.data_center.clone()).or_default();
        // Runners long gone leave the directory.
        let forgotten = self.ttl.saturating_mul(4);
        at.retain(|_, registered| registered.seen.elapsed() < forgotten);
        if let Some(known) = at.get_mut(&status.endpoint) {
            if seen > known.seen {
                known.status = status;
                known.seen = seen;
            }
            return Ok(());
        }
        if seen.elapsed() >= forgotten {
            return Ok(());
        }
        if at.len() >= MAX_RUNNERS_PER_DATA_CENTER {
            return Err(Status::resource_exhausted(format!(
                "data_center: {} already has {MAX_RUNNERS_PER_DATA_CENTER} runners",
                status.data_center
            )));
        }
        tracing::info!(data_center = %status.data_center, endpoint = %status.endpoint, "runner registered");
        at.insert(
            status.endpoint.clone(),
            Registered {
                channel: endpoint.connect_lazy(),
                status,
                seen,
                down_since: None,
            },
        );
        Ok(())
    }

    /// How many runners of `data_center` are ready.
    #[must_use]
    pub fn ready_runners(&self, data_center: &str) -> usize {
        self.runners
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(data_center)
            .map_or(0, |at| {
                at.values()
                    .filter(|registered| registered.ready(self.ttl))
                    .count()
            })
    }

    /// Counts a runner that did not take a query as gone until its next
    /// heartbeat, so the next pick goes elsewhere.
    fn mark_down(&self, choice: &RunnerChoice) {
        let mut runners = self
            .runners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(registered) = runners
            .get_mut(&choice.data_center)
            .and_then(|at| at.get_mut(&choice.endpoint))
        {
            registered.down_since = Some(Instant::now());
        }
    }

    fn channel(&self, choice: &RunnerChoice) -> Option<Channel> {
        self.runners
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&choice.data_center)?
            .get(&choice.endpoint)
            .map(|registered| registered.channel.clone())
    }
}

/// The directory's gRPC face.
#[derive(Debug, Clone)]
pub struct DirectoryService(pub Arc<RunnerDirectory>);

#[tonic::async_trait]
impl Directory for DirectoryService {
    async fn heartbeat(
        &self,
        request: Request<proto::RunnerStatus>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let certificates = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("a runner reports with its client certificate")
        })?;
        let status = request.into_inner();
        if status.data_center.is_empty() {
            return Err(Status::invalid_argument("data_center is required"));
        }
        let name = certificate_name(&status.data_center);
        if !certificates
            .first()
            .is_some_and(|leaf| certificate_names(leaf.as_ref(), &name))
        {
            return Err(Status::permission_denied(format!(
                "data_center: this certificate does not name {name}"
            )));
        }
        let status = self.0.record(status)?;
        if let Some(store) = self.0.shared.get() {
            let shared = async {
                let mut connection = store.acquire().await?;
                runner_reports::record(
                    &mut connection,
                    store.backend(),
                    &status.data_center,
                    &status.endpoint,
                    &status.encode_to_vec(),
                )
                .await
            };
            if let Err(error) = shared.await {
                tracing::warn!(%error, data_center = %status.data_center, "cannot share a runner's report with the other servers");
            }
        }
        Ok(Response::new(proto::HeartbeatReply {
            ttl_ms: u64::try_from(self.0.ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

impl Runners for RunnerDirectory {
    fn stage(
        &self,
        choice: RunnerChoice,
        upload_id: String,
        offset: u64,
        data: Vec<u8>,
    ) -> RemoteStage<'_> {
        Box::pin(async move { self.stage_on(&choice, upload_id, offset, data).await })
    }

    fn ingest(&self, choice: RunnerChoice, request: IngestRequest) -> RemoteIngest<'_> {
        Box::pin(async move { self.ingest_on(&choice, request).await })
    }

    fn registered(&self, choice: &RunnerChoice) -> bool {
        self.channel(choice).is_some()
    }

    fn list_incoming(
        &self,
        data_center: String,
        product_id: String,
        location: String,
        tables: Vec<String>,
    ) -> RemoteListIncoming<'_> {
        Box::pin(async move {
            let choice = self
                .pick(std::slice::from_ref(&data_center))
                .ok_or_else(|| {
                    MarketError::Unavailable(format!(
                        "no runner is ready in {data_center} to look at the refresh folder"
                    ))
                })?;
            let reply = tokio::time::timeout(
                STAGE_WITHIN,
                self.client(&choice)?
                    .list_incoming(proto::ListIncomingRequest {
                        product_id,
                        storage_location: location,
                        tables,
                    }),
            )
            .await
            .map_err(|_| MarketError::Unavailable("the runner did not list in time".into()))?
            .map_err(|status| {
                tracing::warn!(%data_center, %status, "a runner did not list a refresh folder");
                MarketError::Unavailable("the runner did not list the refresh folder".into())
            })?;
            let files = reply
                .into_inner()
                .files
                .into_iter()
                .map(|file| civicgrid_runner::storage::Incoming {
                    table: file.table,
                    name: file.name,
                    bytes: file.bytes,
                })
                .collect();
            Ok((choice, files))
        })
    }

    fn take_incoming(
        &self,
        choice: RunnerChoice,
        upload_id: String,
        product_id: String,
        location: String,
        incoming: civicgrid_runner::storage::Incoming,
    ) -> RemoteTakeIncoming<'_> {
        Box::pin(async move {
            let reply = tokio::time::timeout(
                INGEST_WITHIN,
                self.client(&choice)?.take_incoming(proto::TakeIncomingRequest {
                    upload_id,
                    product_id,
                    storage_location: location,
                    file: Some(proto::IncomingFile {
                        table: incoming.table,
                        name: incoming.name,
                        bytes: incoming.bytes,
                    }),
                }),
            )
            .await
            .map_err(|_| MarketError::Unavailable("the runner did not take the file in time".into()))?
            .map_err(|status| {
                tracing::warn!(data_center = %choice.data_center, %status, "a runner did not take a refresh file");
                MarketError::Unavailable("the runner did not take the refresh file".into())
            })?
            .into_inner();
            Ok(reply.taken.then_some((reply.bytes, reply.sha256)))
        })
    }

    fn remove(
        &self,
        data_center: String,
        product_id: String,
        location: String,
        paths: Vec<String>,
    ) -> RemoteStage<'_> {
        Box::pin(async move {
            let choice = self
                .pick(std::slice::from_ref(&data_center))
                .ok_or_else(|| {
                    MarketError::Unavailable(format!(
                        "no runner is ready in {data_center} to delete withdrawn files"
                    ))
                })?;
            let count = paths.len() as u64;
            tokio::time::timeout(
                STAGE_WITHIN,
                self.client(&choice)?.remove(proto::RemoveRequest {
                    product_id,
                    storage_location: location,
                    paths,
                }),
            )
            .await
            .map_err(|_| {
                MarketError::Unavailable("the runner did not delete the files in time".into())
            })?
            .map_err(|status| {
                tracing::warn!(%data_center, %status, "a runner did not delete withdrawn files");
                MarketError::Unavailable("the runner did not delete the files".into())
            })?;
            Ok(count)
        })
    }

    fn measure(
        &self,
        choice: RunnerChoice,
        data_centers: Vec<String>,
        job: MeasureJob,
    ) -> RemoteMeasure<'_> {
        Box::pin(async move {
            match self.measure_on(&choice, &job).await {
                Err(MarketError::Unavailable(_)) => {
                    self.mark_down(&choice);
                    match self.pick(&data_centers) {
                        Some(other) => self.measure_on(&other, &job).await,
                        None => Err(MarketError::Unavailable(format!(
                            "no runner in {} measured product {}; retry later",
                            data_centers.join(" or "),
                            job.product_id
                        ))),
                    }
                }
                answered => answered,
            }
        })
    }

    fn pick(&self, data_centers: &[String]) -> Option<RunnerChoice> {
        let runners = self
            .runners
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The least busy ready runner of any hosting data center.
        data_centers
            .iter()
            .filter_map(|data_center| Some((data_center, runners.get(data_center)?)))
            .flat_map(|(data_center, at)| at.values().map(move |r| (data_center, r)))
            .filter(|(_, registered)| registered.ready(self.ttl))
            // The least busy, and among equals any: a random tie-break
            // spreads queries over runners that report alike.
            .min_by_key(|(_, registered)| {
                (
                    u64::from(registered.status.busy_slots) * 1000
                        / u64::from(registered.status.slots.max(1)),
                    rand::random::<u32>(),
                )
            })
            .map(|(data_center, registered)| RunnerChoice {
                data_center: data_center.clone(),
                endpoint: registered.status.endpoint.clone(),
            })
    }

    fn run(&self, choice: RunnerChoice, job: RemoteJob) -> RemoteRun<'_> {
        Box::pin(async move {
            // A runner that does not take the query is counted gone, and the
            // query goes to another: of the same data center first, then of
            // any other hosting the product (a data center lost mid-way).
            // Nothing ran on those that did not take it.
            let mut choice = choice;
            for _ in 0..MAX_RUNNERS_TRIED {
                match self.run_on(&choice, job.clone()).await {
                    Err(MarketError::Unavailable(_)) => {
                        self.mark_down(&choice);
                        let next = self
                            .pick(std::slice::from_ref(&choice.data_center))
                            .or_else(|| self.pick(&job.data_centers));
                        match next {
                            Some(next) => choice = next,
                            None => break,
                        }
                    }
                    answered => return answered.map(|outcome| (choice, outcome)),
                }
            }
            Err(MarketError::Unavailable(format!(
                "no runner in {} took the query; retry later",
                if job.data_centers.is_empty() {
                    choice.data_center.clone()
                } else {
                    job.data_centers.join(" or ")
                }
            )))
        })
    }
}

impl RunnerDirectory {
    fn client(
        &self,
        choice: &RunnerChoice,
    ) -> crate::error::Result<proto::runner_client::RunnerClient<Channel>> {
        self.channel(choice)
            .map(proto::runner_client::RunnerClient::new)
            .ok_or_else(|| {
                MarketError::Unavailable(format!(
                    "the runner in {} holding this upload is gone; start the upload again",
                    choice.data_center
                ))
            })
    }

    async fn stage_on(
        &self,
        choice: &RunnerChoice,
        upload_id: String,
        offset: u64,
        data: Vec<u8>,
    ) -> crate::error::Result<u64> {
        let reply = tokio::time::timeout(
            STAGE_WITHIN,
            self.client(choice)?.stage(proto::StageRequest {
                upload_id,
                offset,
                data,
            }),
        )
        .await
        .map_err(|_| MarketError::Unavailable("the runner did not stage the chunk in time; send it again".into()))?
        .map_err(|status| {
            tracing::warn!(data_center = %choice.data_center, endpoint = %choice.endpoint, %status, "a runner did not stage a chunk");
            MarketError::Unavailable("the runner did not stage the chunk; send it again".into())
        })?;
        Ok(reply.into_inner().staged_bytes)
    }

    async fn ingest_on(
        &self,
        choice: &RunnerChoice,
        request: IngestRequest,
    ) -> crate::error::Result<IngestOutcome> {
        let job = request.job;
        let message = proto::IngestRequest {
            upload_id: job.upload_id.clone(),
            product_id: request.product_id.clone(),
            storage_location: job.location.clone(),
            table: wire::declared_to_proto(std::slice::from_ref(&job.table)).pop(),
            format: match job.format {
                civicgrid_sandbox::ingest::Format::Parquet => "parquet".into(),
                civicgrid_sandbox::ingest::Format::Csv => "csv".into(),
            },
            sha256: job.sha256.clone(),
            bytes: job.bytes,
            adopt: wire::declared_to_proto(&job.adopt),
            guard: job.guard.as_ref().map(|guard| proto::ChangeGuard {
                unit_column: guard.unit_column.clone(),
                min_units: guard.min_units,
                append: guard.append,
                previous: guard.previous.iter().map(wire::file_to_proto).collect(),
            }),
        };
        let reply = tokio::time::timeout(INGEST_WITHIN, self.client(choice)?.ingest(message))
            .await
            .map_err(|_| {
                MarketError::Unavailable(format!(
                    "ingesting the upload took longer than {} s; commit again",
                    INGEST_WITHIN.as_secs()
                ))
            })?;
        let reply = reply.map_err(|status| {
            tracing::warn!(data_center = %choice.data_center, endpoint = %choice.endpoint, %status, "a runner did not ingest an upload");
            match status.code() {
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                    MarketError::FailedPrecondition(status.message().to_owned())
                }
                _ => MarketError::Unavailable(
                    "the data center's runner did not take the upload; commit again".into(),
                ),
            }
        })?;
        match reply.into_inner().outcome {
            Some(proto::ingest_reply::Outcome::Refused(why)) => Ok(IngestOutcome::Refused(why)),
            Some(proto::ingest_reply::Outcome::InProgress(_)) => Ok(IngestOutcome::InProgress),
            Some(proto::ingest_reply::Outcome::Ingested(ingested)) => {
                let upload = ingested.upload.ok_or_else(|| {
                    MarketError::Corrupt("a runner's ingest named no file".into())
                })?;
                let mut adopted = Vec::with_capacity(ingested.adopted.len());
                for table in ingested.adopted {
                    for file in table.files {
                        adopted.push((table.name.clone(), wire::file_from_proto(file)));
                    }
                }
                Ok(IngestOutcome::Ingested {
                    upload: wire::file_from_proto(upload),
                    adopted,
                })
            }
            None => Err(MarketError::Corrupt(
                "a runner's ingest sent no outcome".into(),
            )),
        }
    }
}

/// A chunk is a few MiB written to a runner's disk.
const STAGE_WITHIN: Duration = Duration::from_secs(60);

/// Hashing, converting and storing an upload of up to 16 GiB.
const INGEST_WITHIN: Duration = Duration::from_secs(3600);

impl RunnerDirectory {
    async fn measure_on(
        &self,
        choice: &RunnerChoice,
        job: &MeasureJob,
    ) -> crate::error::Result<civicgrid_sandbox::quality::Quality> {
        let unavailable = |why: String| {
            tracing::warn!(data_center = %choice.data_center, endpoint = %choice.endpoint, %why, "a runner did not measure a product");
            MarketError::Unavailable(format!(
                "no runner in {} measured product {}; retry later",
                choice.data_center, job.product_id
            ))
        };
        let channel = self
            .channel(choice)
            .ok_or_else(|| unavailable("no longer registered".into()))?;
        let request = proto::MeasureRequest {
            product_id: job.product_id.clone(),
            storage_location: job.storage_location.clone(),
            tables: wire::declared_to_proto(&job.tables),
            now_ms: job.now_ms,
            version: job.version.as_ref().map(wire::version_to_proto),
        };
        // A measurement that runs long is not the runner's failure: it is
        // not counted gone, and the measurement not started again elsewhere.
        let reply = tokio::time::timeout(
            MEASURE_WITHIN,
            proto::runner_client::RunnerClient::new(channel).measure(request),
        )
        .await
        .map_err(|_| {
            MarketError::FailedPrecondition(format!(
                "measuring product {}'s data took longer than {} s",
                job.product_id,
                MEASURE_WITHIN.as_secs()
            ))
        })?;
        let reply = match reply {
            Ok(reply) => reply.into_inner(),
            Err(status) => match status.code() {
                // Not reached, or its store did not answer.
                tonic::Code::Unavailable => return Err(unavailable(status.to_string())),
                // The product's own files, described to their provider by
                // table (the runner keeps the store's words to itself).
                tonic::Code::FailedPrecondition => {
                    return Err(MarketError::FailedPrecondition(status.message().to_owned()));
                }
                _ => {
                    tracing::warn!(data_center = %choice.data_center, %status, "a runner refused a measurement");
                    return Err(MarketError::FailedPrecondition(format!(
                        "the runner in {} refused to measure product {}",
                        choice.data_center, job.product_id
                    )));
                }
            },
        };
        let quality = wire::measured_from_proto(reply).map_err(|(field, message)| match field {
            Some(field) => MarketError::invalid(field, message),
            None => unavailable(message),
        })?;
        // What the registry records is the runner's word: at least in range.
        let ratio = |value: f64| value.is_finite() && (0.0..=1.0).contains(&value);
        if !ratio(quality.completeness) || !ratio(quality.validity) || quality.freshness_seconds < 0
        {
            return Err(unavailable(format!(
                "measured figures out of range: {quality:?}"
            )));
        }
        Ok(quality)
    }

    async fn run_on(
        &self,
        choice: &RunnerChoice,
        job: RemoteJob,
    ) -> crate::error::Result<std::result::Result<Outcome, RunFailure>> {
        let unavailable = |why: String| {
            tracing::warn!(data_center = %choice.data_center, endpoint = %choice.endpoint, %why, "a runner did not take a query");
            MarketError::Unavailable(format!(
                "no runner in {} took the query; retry later",
                choice.data_center
            ))
        };
        let lost = |why: String| RunFailure {
            error: SandboxError::Internal(format!(
                "the runner in {} at {}: {why}",
                choice.data_center, choice.endpoint
            )),
            fuel: 0,
        };
        let channel = self
            .channel(choice)
            .ok_or_else(|| unavailable("no longer registered".into()))?;
        let answer_within = job.limits.wall_time + ANSWER_MARGIN;
        // What a runner may send back: no more than a run may release, and
        // no more privacy spent than the budget it was given.
        let bounds = Bounds {
            result_bytes: usize::try_from(job.limits.max_output_bytes).unwrap_or(usize::MAX),
            privacy_budget: job.privacy_budget,
        };
        let request = run_request(job).map_err(MarketError::Corrupt)?;
        let answered = tokio::time::timeout(answer_within, async {
            // Until the runner accepts the request, nothing ran: the
            // query goes as unavailable, neither counted nor charged.
            let mut request = Request::new(request);
            // The runner's spans join this query's trace.
            if let Some(traceparent) = civicgrid_telemetry::propagation::current_traceparent()
                && let Ok(value) = traceparent.parse()
            {
                request
                    .metadata_mut()
                    .insert(civicgrid_telemetry::propagation::TRACEPARENT, value);
            }
            let mut replies = match proto::runner_client::RunnerClient::new(channel)
                .run(request)
                .await
            {
                Ok(replies) => replies.into_inner(),
                // Not reached, or its store did not answer: another runner
                // may take it.
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    return Err(unavailable(status.to_string()));
                }
                // A refusal of this product (its folder, its request) is
                // not the runner's failure: it stays ready for the others.
                Err(status) => {
                    tracing::warn!(data_center = %choice.data_center, endpoint = %choice.endpoint, %status, "a runner refused a query");
                    return Err(MarketError::FailedPrecondition(format!(
                        "the runner in {} refused the query; retry later",
                        choice.data_center
                    )));
                }
            };
            let mut ipc = Vec::new();
            loop {
                let reply = match replies.message().await {
                    Ok(Some(reply)) => reply,
                    Ok(None) => {
                        return Ok(Err(lost("the reply ended before the run did".into())));
                    }
                    Err(status) => return Ok(Err(lost(status.to_string()))),
                };
                match reply.message {
                    Some(run_reply::Message::ArrowIpc(chunk)) => {
                        if ipc.len() + chunk.len() > bounds.result_bytes {
                            return Ok(Err(lost(format!(
                                "a result over the {} bytes a run may release",
                                bounds.result_bytes
                            ))));
                        }
                        ipc.extend(chunk);
                    }
                    Some(run_reply::Message::Ran(ran)) => {
                        return Ok(outcome(&ipc, &ran, &bounds).map_err(&lost));
                    }
                    Some(run_reply::Message::Failed(failed)) => {
                        return Ok(Err(RunFailure {
                            error: failed.error.map_or_else(
                                || SandboxError::Internal("the runner sent no error".into()),
                                wire::failure_from_proto,
                            ),
                            fuel: failed.fuel,
                        }));
                    }
                    None => return Ok(Err(lost("an empty reply".into()))),
                }
            }
        })
        .await;
        answered.unwrap_or_else(|_| {
            Ok(Err(lost(format!(
                "no answer within {} s",
                answer_within.as_secs()
            ))))
        })
    }
}

/// A runner's endpoint as `https://HOST:PORT`, whatever else it was sent
/// with: one runner cannot register twice under spellings of one address.
fn canonical_endpoint(endpoint: &str) -> Result<String, Status> {
    let uri: tonic::codegen::http::Uri = endpoint
        .parse()
        .map_err(|_| Status::invalid_argument("endpoint: an https://HOST:PORT address"))?;
    let (Some("https"), Some(host), Some(port)) = (uri.scheme_str(), uri.host(), uri.port_u16())
    else {
        return Err(Status::invalid_argument(
            "endpoint: an https://HOST:PORT address",
        ));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(Status::invalid_argument(
            "endpoint: an https://HOST:PORT address, with no path",
        ));
    }
    Ok(format!("https://{}:{port}", host.to_ascii_lowercase()))
}

fn run_request(job: RemoteJob) -> Result<proto::RunRequest, String> {
    Ok(proto::RunRequest {
        query_id: job.query_id,
        product_id: job.product_id,
        storage_location: job.storage_location,
        tables: job
            .declared
            .into_iter()
            .map(|(name, columns)| proto::DeclaredTable { name, columns })
            .collect(),
        policy_json: serde_json::to_vec(&job.policy).map_err(|error| error.to_string())?,
        privacy_budget: job.privacy_budget,
        sql: job.sql,
        algorithm_wasm: job.algorithm,
        as_of_unix_seconds: job.as_of_unix_seconds,
        version: job.version.as_ref().map(wire::version_to_proto),
        limits: Some(proto::Limits {
            fuel: job.limits.fuel,
            wall_time_ms: u64::try_from(job.limits.wall_time.as_millis()).unwrap_or(u64::MAX),
            memory_bytes: job.limits.memory_bytes,
        }),
    })
}

/// A completed remote run as the sandbox's own outcome.
/// What a run on a runner may come back with.
struct Bounds {
    result_bytes: usize,
    privacy_budget: f64,
}

fn outcome(ipc: &[u8], ran: &proto::Ran, bounds: &Bounds) -> Result<Outcome, String> {
    // A runner is trusted to run the policy, but not to move the consumer's
    // budget the wrong way: a negative, unbounded or NaN spend is refused.
    if !(0.0..=bounds.privacy_budget).contains(&ran.privacy_spent) {
        return Err(format!(
            "it reported spending {} epsilon of a budget of {}",
            ran.privacy_spent, bounds.privacy_budget
        ));
    }
    let batches = if ipc.is_empty() {
        Vec::new()
    } else {
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .map_err(|error| format!("its result: {error}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("its result: {error}"))?
    };
    let metering = ran
        .metering
        .as_ref()
        .map(wire::metering_from_proto)
        .ok_or_else(|| "its metering is missing".to_owned())?;
    Ok(Outcome {
        batches,
        metering,
        suppressed_rows: 0,
        truncated: ran.truncated,
        privacy_spent: ran.privacy_spent,
        privacy_budget_left: 0.0,
        log: String::new(),
    })
}

/// Serves the directory runners report to on `listener` until `shutdown`,
/// over mutual TLS with the runners' CA.
///
/// # Errors
/// When the transport fails.
pub async fn serve_directory(
    directory: Arc<RunnerDirectory>,
    listener: tokio::net::TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(proto::directory_server::DirectoryServer::new(
            DirectoryService(directory),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report another server received counts as of when it was received:
    /// it makes a runner ready, but does not undo a failure seen after it,
    /// and one naming another runner than its row, or older than the TTL,
    /// is not taken.
    #[tokio::test]
    async fn a_shared_report_counts_as_of_when_it_was_received() {
        let directory = RunnerDirectory::new(ClientTlsConfig::new(), Duration::from_secs(1));
        let status = proto::RunnerStatus {
            data_center: "edge-1".into(),
            endpoint: "https://127.0.0.1:1".into(),
            version: "test".into(),
            slots: 1,
            busy_slots: 0,
        };
        let stored = |age_ms| runner_reports::StoredReport {
            data_center: "edge-1".into(),
            endpoint: status.endpoint.clone(),
            status: status.encode_to_vec(),
            age_ms,
        };
        let hosts = ["edge-1".to_owned()];
        directory.merge(vec![stored(1_500)]);
        assert_eq!(directory.pick(&hosts), None, "older than the TTL");
        directory.merge(vec![stored(100)]);
        let choice = directory.pick(&hosts).expect("ready from a shared report");
        directory.mark_down(&choice);
        assert_eq!(directory.pick(&hosts), None);
        directory.merge(vec![stored(50)]);
        assert_eq!(directory.pick(&hosts), None, "received before it failed");
        std::thread::sleep(Duration::from_millis(5));
        directory.merge(vec![stored(0)]);
        assert_eq!(directory.pick(&hosts), Some(choice), "received after");
        let mut elsewhere = stored(0);
        elsewhere.data_center = "core".into();
        directory.merge(vec![elsewhere]);
        assert_eq!(directory.pick(&["core".to_owned()]), None);
    }

    fn ran(privacy_spent: f64) -> proto::Ran {
        proto::Ran {
            metering: Some(proto::Metering::default()),
            truncated: false,
            privacy_spent,
        }
    }

    /// A runner cannot give a consumer budget back, spend past what it was
    /// given, or send a spend that is not a number.
    #[test]
    fn a_runners_privacy_spend_stays_within_its_budget() {
        let bounds = Bounds {
            result_bytes: 1 << 20,
            privacy_budget: 1.0,
        };
        for spent in [-0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(outcome(&[], &ran(spent), &bounds).is_err(), "{spent}");
        }
        for spent in [0.0, 0.5, 1.0] {
            let kept = outcome(&[], &ran(spent), &bounds).expect("within the budget");
            assert!((kept.privacy_spent - spent).abs() < f64::EPSILON);
        }
    }

    /// One runner, one entry: spellings of its address are one endpoint,
    /// and anything but https://HOST:PORT is refused.
    #[test]
    fn endpoints_are_canonical_https_host_and_port() {
        for (sent, kept) in [
            ("https://10.0.3.7:7443", "https://10.0.3.7:7443"),
            ("https://10.0.3.7:7443/", "https://10.0.3.7:7443"),
            ("https://Runner.Example:7443", "https://runner.example:7443"),
        ] {
            assert_eq!(canonical_endpoint(sent).expect(sent), kept);
        }
        for refused in [
            "http://10.0.3.7:7443",
            "https://10.0.3.7",
            "https://10.0.3.7:7443/x",
            "https://10.0.3.7:7443/?a=b",
            "10.0.3.7:7443",
            "",
        ] {
            let status = canonical_endpoint(refused).expect_err(refused);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{refused}");
            assert!(status.message().starts_with("endpoint:"), "{refused}");
        }
    }

    fn status(endpoint: &str, busy_slots: u32) -> proto::RunnerStatus {
        proto::RunnerStatus {
            data_center: "edge-1".into(),
            endpoint: endpoint.into(),
            version: "test".into(),
            slots: 8,
            busy_slots,
        }
    }

    /// Queries go to the least busy ready runner of a hosting data center,
    /// never to one of another data center or one gone quiet.
    #[tokio::test]
    async fn the_least_busy_ready_runner_is_picked() {
        let directory = RunnerDirectory::new(ClientTlsConfig::new(), Duration::from_secs(60));
        directory
            .record(status("https://10.0.0.1:7443", 7))
            .expect("recorded");
        directory
            .record(status("https://10.0.0.2:7443", 1))
            .expect("recorded");
        for _ in 0..20 {
            let choice = directory.pick(&["edge-1".into()]).expect("a runner");
            assert_eq!(choice.endpoint, "https://10.0.0.2:7443");
        }
        assert_eq!(directory.pick(&["core".into()]), None);
        directory.mark_down(&RunnerChoice {
            data_center: "edge-1".into(),
            endpoint: "https://10.0.0.2:7443".into(),
        });
        assert_eq!(
            directory.pick(&["edge-1".into()]).map(|c| c.endpoint),
            Some("https://10.0.0.1:7443".into())
        );
        assert_eq!(directory.ready_runners("edge-1"), 1);
    }
}
