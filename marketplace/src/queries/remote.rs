//! Queries run where the data is: a runner in a data center hosting the
//! product runs the reserved query and returns the released result, while
//! the marketplace authorizes, holds, settles and audits it as it would a
//! run of its own. Runners also measure a product's data when it is
//! submitted for registration. The transport (mutual TLS gRPC, the runners' directory)
//! lives in the gRPC layer; this is what the query path asks of it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use civicgrid_runner::storage::Incoming;
use civicgrid_runner::uploads::{IngestJob, IngestOutcome};
use civicgrid_sandbox::manifest::Manifest;
use civicgrid_sandbox::policy::OutputPolicy;
use civicgrid_sandbox::quality::{DeclaredTable, Quality};
use civicgrid_sandbox::{Limits, Outcome, RunFailure};

use crate::error::Result;

/// A ready runner, chosen for one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerChoice {
    /// The data center it serves.
    pub data_center: String,
    /// Where it is reached.
    pub endpoint: String,
}

/// What a runner needs to run a reserved query: everything decided, and
/// nothing of the marketplace's state.
#[derive(Clone, Debug)]
pub struct RemoteJob {
    /// The query's id.
    pub query_id: String,
    /// The product.
    pub product_id: String,
    /// Its registered storage location, resolved by the runner.
    pub storage_location: String,
    /// The tables and columns it declares.
    pub declared: HashMap<String, Vec<String>>,
    /// The output policy for this query and contract.
    pub policy: OutputPolicy,
    /// Epsilon left.
    pub privacy_budget: f64,
    /// SQL, or the algorithm's input.
    pub sql: String,
    /// A consumer algorithm, or empty.
    pub algorithm: Vec<u8>,
    /// What `now()` reads.
    pub as_of_unix_seconds: u64,
    /// The run's fuel, wall time and memory.
    pub limits: Limits,
    /// The data centers hosting the product: where the query may run if
    /// the chosen runner does not take it.
    pub data_centers: Vec<String>,
    /// The data version to read (its files, checked), or `None` for a
    /// product with none: its folder as it is.
    pub version: Option<Manifest>,
}

/// What a runner needs to measure a product's data at submission: the
/// marketplace never reads product data, not even to describe it.
#[derive(Clone, Debug)]
pub struct MeasureJob {
    /// The product.
    pub product_id: String,
    /// Its storage location, resolved by the runner.
    pub storage_location: String,
    /// Its declared tables, with column types.
    pub tables: Vec<DeclaredTable>,
    /// The measurement's clock, Unix milliseconds.
    pub now_ms: i64,
    /// As in [`RemoteJob::version`].
    pub version: Option<Manifest>,
}

/// What a runner needs to ingest a staged upload.
#[derive(Clone, Debug)]
pub struct IngestRequest {
    /// The product.
    pub product_id: String,
    /// What to ingest.
    pub job: IngestJob,
}

/// A chunk staged on a runner: the staged file's length after it.
pub type RemoteStage<'a> = Pin<Box<dyn Future<Output = Result<u64>> + Send + 'a>>;

/// A refresh folder listed by a runner.
pub type RemoteListIncoming<'a> =
    Pin<Box<dyn Future<Output = Result<(RunnerChoice, Vec<Incoming>)>> + Send + 'a>>;

/// A refresh file taken into a runner's staging.
pub type RemoteTakeIncoming<'a> =
    Pin<Box<dyn Future<Output = Result<Option<(u64, String)>>> + Send + 'a>>;

/// An ingest on a runner.
pub type RemoteIngest<'a> = Pin<Box<dyn Future<Output = Result<IngestOutcome>> + Send + 'a>>;

/// A measurement on a runner: the figures, `InvalidArgument` naming the
/// spec's column that does not match the files, `FailedPrecondition` for a
/// table that cannot be read, or `Unavailable` when no runner answered.
pub type RemoteMeasure<'a> = Pin<Box<dyn Future<Output = Result<Quality>> + Send + 'a>>;

/// A run on a runner: the runner that took it, and the sandbox's own
/// outcome or failure; `Err` (`Unavailable`) when no runner took the query,
/// so nothing ran and it is neither counted nor charged.
pub type RemoteRun<'a> = Pin<
    Box<
        dyn Future<Output = Result<(RunnerChoice, std::result::Result<Outcome, RunFailure>)>>
            + Send
            + 'a,
    >,
>;

/// The runners the marketplace can send queries to.
pub trait Runners: Send + Sync + std::fmt::Debug {
    /// A ready runner in one of `data_centers`, if any.
    fn pick(&self, data_centers: &[String]) -> Option<RunnerChoice>;
    /// Runs `job` on `choice`, or, when it cannot be reached, on another
    /// ready runner of its data center or then of `job.data_centers`. No
    /// runner taking it, or a refusal, is `Err`; a runner that breaks off,
    /// or does not answer within the run's wall time, fails the run with
    /// what it had burnt (nothing, as far as the marketplace knows).
    fn run(&self, choice: RunnerChoice, job: RemoteJob) -> RemoteRun<'_>;
    /// Measures a product on `choice`, or, if it does not answer, on
    /// another ready runner of `data_centers`.
    fn measure(
        &self,
        choice: RunnerChoice,
        data_centers: Vec<String>,
        job: MeasureJob,
    ) -> RemoteMeasure<'_>;
    /// Writes a chunk of upload `upload_id` at `offset` on `choice`, the
    /// runner staging it (`Unavailable` when it is gone).
    fn stage(
        &self,
        choice: RunnerChoice,
        upload_id: String,
        offset: u64,
        data: Vec<u8>,
    ) -> RemoteStage<'_>;
    /// Whether `choice` is still a registered runner.
    fn registered(&self, choice: &RunnerChoice) -> bool;
    /// Ingests an upload staged on `choice`.
    fn ingest(&self, choice: RunnerChoice, request: IngestRequest) -> RemoteIngest<'_>;
    /// The files waiting in the refresh folder of the product at `location`,
    /// through a ready runner of `data_center`, and the runner that listed
    /// them.
    fn list_incoming(
        &self,
        data_center: String,
        product_id: String,
        location: String,
        tables: Vec<String>,
    ) -> RemoteListIncoming<'_>;
    /// Moves a waiting file into `choice`'s staging as upload `upload_id`:
    /// its length and SHA-256, or `None` when another took it first.
    fn take_incoming(
        &self,
        choice: RunnerChoice,
        upload_id: String,
        product_id: String,
        location: String,
        incoming: Incoming,
    ) -> RemoteTakeIncoming<'_>;
    /// Deletes withdrawn versions' files `paths` of the product at
    /// `location` through a ready runner of `data_center`.
    fn remove(
        &self,
        data_center: String,
        product_id: String,
        location: String,
        paths: Vec<String>,
    ) -> RemoteStage<'_>;
}
