//! The SQL guest of the CivicGrid sandbox: DataFusion over the tables the host
//! streams in, with the product's output policy checked on the query's plan
//! before anything runs.
//!
//! Built twice: for wasm32-wasip1 (the module the sandbox loads; see `abi`)
//! and natively, so tests and benchmarks can run the very same planning,
//! policy analysis and engine outside the sandbox as a baseline.

#[cfg(target_family = "wasm")]
mod abi;
mod analysis;
mod decimals;
mod functions;
mod literals;
mod pushdown;
mod rule;
mod split;
mod wide;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use civicgrid_guest_protocol::protocol::{GuestFailure, GuestRequest, ScanPredicate, Stage};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, execute_stream};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use functions::Families;
use futures::StreamExt;

pub use analysis::{Analysis, QueryKind};

/// Batches of one table, as an iterator the engine pulls from.
pub type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>;

/// Where table data comes from: the host's imports inside the sandbox, files
/// or memory outside it.
pub trait BatchSource: Send + Sync + 'static {
    /// Streams `table` (an index into the request's tables) with only
    /// `columns`. A source may drop rows for which one of `predicates` fails
    /// (the engine filters them again), or ignore the predicates.
    fn scan(
        &self,
        table: usize,
        columns: &[usize],
        predicates: &[ScanPredicate],
    ) -> Result<BatchIter, String>;

    /// Into how many shares a scan of `table` can be read in parallel (a
    /// natively run engine reads one per partition; inside the sandbox each
    /// instance reads one stream and the host splits across instances).
    fn parts(&self, _table: usize) -> usize {
        1
    }

    /// Share `part` of `parts` of what [`Self::scan`] streams; every row is
    /// in exactly one share.
    fn scan_part(
        &self,
        table: usize,
        columns: &[usize],
        predicates: &[ScanPredicate],
        part: usize,
        parts: usize,
    ) -> Result<BatchIter, String> {
        match (part, parts) {
            (0, 1) => self.scan(table, columns, predicates),
            _ => Err(format!(
                "table {table} is read as one stream, not as share {part} of {parts}"
            )),
        }
    }

    /// In a final run, the partial aggregate states the partial runs emitted.
    fn partials(&self) -> Result<BatchIter, String> {
        Err("partial aggregate states exist only in a split run".into())
    }
}

/// Plans `request.sql`, checks it against `request.policy`, and runs it (or
/// the part of it `request.stage` names), handing each result batch to
/// `emit`. `partitions` is DataFusion's target partition count (1 inside the
/// sandbox, which has one thread).
pub async fn run(
    request: &GuestRequest,
    source: Arc<dyn BatchSource>,
    partitions: usize,
    mut emit: impl FnMut(RecordBatch) -> Result<(), String>,
) -> Result<Analysis, GuestFailure> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    // Before planning: a reserved name would otherwise fail as an unknown
    // column, with the engine's own words.
    rule::check_reserved_names(&request.sql)?;
    let named = Families::named_in(&request.sql);
    let ctx = context(request, Arc::clone(&source), partitions, named)?;
    let frame = match ctx.sql_with_options(&request.sql, options).await {
        Ok(frame) => frame,
        // Something the query names only through syntax, or a mistake: plan
        // it with every function, so it plans if it can and the consumer
        // sees the error (and the suggestions) of the full registry.
        Err(_) if named != Families::all() => {
            context(request, Arc::clone(&source), partitions, Families::all())?
                .sql_with_options(&request.sql, options)
                .await
                .map_err(query)?
        }
        Err(e) => return Err(query(e)),
    };
    let (state, plan) = frame.into_parts();
    let (analysis, optimized) = analysis::checked_plan(request, plan, |plan| state.optimize(plan))?;
    // After the policy has judged the plan: this changes how decimal
    // arithmetic is computed, never what is read or released.
    let optimized = decimals::call_free_arithmetic(optimized).map_err(query)?;
    let state = match request.stage {
        Stage::Whole => state,
        Stage::Partial { .. } | Stage::Final { .. } => split::keeping_aggregate_phases(state),
    };
    let physical = state
        .query_planner()
        .create_physical_plan(&optimized, &state)
        .await
        .map_err(query)?;
    let physical = literals::repeated_once(physical).map_err(query)?;
    let physical = match request.stage {
        Stage::Whole => physical,
        Stage::Partial { .. } => split::partial_aggregate(&physical)
            .map_err(|reason| GuestFailure::NotSplittable { reason })?,
        Stage::Final { .. } => {
            let partial = split::partial_aggregate(&physical)
                .map_err(|reason| GuestFailure::NotSplittable { reason })?;
            // Share 0's partial aggregate, first: the host streams that share
            // to the first scan opened. Its state stays here, ahead of the
            // other shares', as if it had come from an instance of its own.
            let own = datafusion::physical_plan::collect(Arc::clone(&partial), state.task_ctx())
                .await
                .map_err(execution)?;
            let states = Arc::new(PartialStates {
                schema: partial.schema(),
                own,
                source: Arc::clone(&source),
            });
            split::over_partial_states(physical, &partial, states).map_err(execution)?
        }
    };
    let partial = matches!(request.stage, Stage::Partial { .. });
    let mut stream = execute_stream(physical, state.task_ctx()).map_err(execution)?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(execution)?;
        // Partial states go to the final instance, which annotates the result.
        let batch = match partial {
            true => batch,
            false => analysis::annotate(&analysis, batch).map_err(execution)?,
        };
        emit(batch).map_err(|message| GuestFailure::Execution { message })?;
    }
    Ok(analysis)
}

/// The query cannot be planned: the consumer's to fix.
fn query(e: DataFusionError) -> GuestFailure {
    GuestFailure::Query {
        message: e.strip_backtrace(),
    }
}

/// The planned query failed while it ran.
fn execution(e: DataFusionError) -> GuestFailure {
    GuestFailure::Execution {
        message: e.strip_backtrace(),
    }
}

fn context(
    request: &GuestRequest,
    source: Arc<dyn BatchSource>,
    partitions: usize,
    functions: Families,
) -> Result<SessionContext, GuestFailure> {
    let config = SessionConfig::new()
        .with_target_partitions(partitions.max(1))
        .with_information_schema(false);
    let ctx = SessionContext::new_with_state(functions.session().with_config(config).build());
    for (index, table) in request.tables.iter().enumerate() {
        let provider = HostTable {
            index,
            schema: Arc::new(table.schema.clone()),
            source: Arc::clone(&source),
        };
        ctx.register_table(table.name.as_str(), Arc::new(provider))
            .map_err(|e| GuestFailure::Query {
                message: format!("table {}: {}", table.name, e.strip_backtrace()),
            })?;
    }
    Ok(ctx)
}

/// A product table: scans ask the source for only the columns the plan needs.
struct HostTable {
    index: usize,
    schema: SchemaRef,
    source: Arc<dyn BatchSource>,
}

impl fmt::Debug for HostTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTable")
            .field("index", &self.index)
            .finish()
    }
}

#[async_trait]
impl TableProvider for HostTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Inexact: the source may drop rows that fail a pushed filter, and the
    /// engine's own filter still judges every row it keeps.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|filter| match pushdown::predicates(filter, &self.schema) {
                Some(_) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let columns: Vec<usize> = match projection {
            Some(columns) => columns.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&columns)?);
        let table_predicates: Vec<_> = filters
            .iter()
            .filter_map(|filter| pushdown::predicates(filter, &self.schema))
            .flatten()
            .collect();
        let predicates = pushdown::for_scan(&table_predicates, &columns);
        // One stream per share, up to the engine's partitions: natively
        // that is how DataFusion reads a table on every core.
        let parts = self
            .source
            .parts(self.index)
            .clamp(1, state.config().target_partitions().max(1));
        let partitions = (0..parts)
            .map(|part| {
                Arc::new(HostPartition {
                    table: self.index,
                    columns: columns.clone(),
                    predicates: predicates.clone(),
                    share: (part, parts),
                    schema: Arc::clone(&schema),
                    source: Arc::clone(&self.source),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            partitions,
            None,
            Vec::new(),
            false,
            limit,
        )?))
    }
}

struct HostPartition {
    table: usize,
    columns: Vec<usize>,
    predicates: Vec<ScanPredicate>,
    /// This stream's share of the table, and how many shares there are.
    share: (usize, usize),
    schema: SchemaRef,
    source: Arc<dyn BatchSource>,
}

impl fmt::Debug for HostPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostPartition")
            .field("table", &self.table)
            .field("columns", &self.columns)
            .field("predicates", &self.predicates)
            .field("share", &self.share)
            .finish()
    }
}

impl PartitionStream for HostPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (part, parts) = self.share;
        stream_of(
            &self.schema,
            self.source
                .scan_part(self.table, &self.columns, &self.predicates, part, parts),
        )
    }
}

/// The partial aggregate states a final run merges: its own share's, then
/// what the partial instances emitted, in share order.
struct PartialStates {
    schema: SchemaRef,
    own: Vec<RecordBatch>,
    source: Arc<dyn BatchSource>,
}

impl fmt::Debug for PartialStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartialStates").finish()
    }
}

impl PartitionStream for PartialStates {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let own = self.own.clone().into_iter().map(Ok);
        let states = self
            .source
            .partials()
            .map(|others| -> BatchIter { Box::new(own.chain(others)) });
        stream_of(&self.schema, states)
    }
}

/// `batches`, each given `schema` (IPC does not carry field metadata across
/// exactly as the plan has it).
fn stream_of(schema: &SchemaRef, batches: Result<BatchIter, String>) -> SendableRecordBatchStream {
    let batches = batches.unwrap_or_else(|message| Box::new(std::iter::once(Err(message))));
    let target = Arc::clone(schema);
    let stream = futures::stream::iter(batches.map(move |batch| {
        let batch = batch.map_err(DataFusionError::Execution)?;
        // Zero-column scans (COUNT(*)) come back without a schema of their own.
        if batch.num_columns() == 0 {
            return Ok(RecordBatch::try_new_with_options(
                Arc::clone(&target),
                Vec::new(),
                &datafusion::arrow::record_batch::RecordBatchOptions::new()
                    .with_row_count(Some(batch.num_rows())),
            )?);
        }
        Ok(batch.with_schema(Arc::clone(&target))?)
    }));
    Box::pin(RecordBatchStreamAdapter::new(Arc::clone(schema), stream))
}

/// Batches held in memory: the native baseline and unit tests.
pub struct MemorySource {
    tables: Vec<Vec<RecordBatch>>,
}

impl MemorySource {
    /// One `Vec<RecordBatch>` per table, in request order.
    pub fn new(tables: Vec<Vec<RecordBatch>>) -> Self {
        Self { tables }
    }
}

impl BatchSource for MemorySource {
    /// Every row: the engine's filter is the only one (which unit tests rely
    /// on to show that a query's answer never depends on its source's).
    fn scan(
        &self,
        table: usize,
        columns: &[usize],
        _predicates: &[ScanPredicate],
    ) -> Result<BatchIter, String> {
        let batches = self
            .tables
            .get(table)
            .ok_or_else(|| format!("no table {table}"))?
            .iter()
            .map(|b| b.project(columns).map_err(|e| e.to_string()))
            .collect::<Vec<_>>();
        Ok(Box::new(batches.into_iter()))
    }
}
