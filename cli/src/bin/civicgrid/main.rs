//! `civicgrid`: the command-line client for providers, consumers, platform
//! operators and regulators.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use civicgrid_cli::verify::{BearerToken, verify_log_witnessed};
use civicgrid_marketplace::audit::checkpoint::NoteVerifier;
use civicgrid_marketplace::audit::cosignature::CosignatureVerifier;
use civicgrid_marketplace::proto::{
    self, audit_client::AuditClient, billing_client::BillingClient,
    contracts_client::ContractsClient, identity_client::IdentityClient,
    queries_client::QueriesClient, registry_client::RegistryClient,
};
use clap::{Parser, Subcommand, ValueEnum};

mod demo;
mod up;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

// Queries allocate and free batch-sized blocks on the host by the thousand
// (Parquet pages, Arrow arrays, IPC buffers). glibc's allocator maps most
// such blocks fresh and hands them back to the kernel on free, so every
// batch paid page faults and zeroing again: TPC-H Q1 at SF1 in one sandbox
// instance took 1.87 s with it and 1.07 s with mimalloc (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CivicGrid marketplace client.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The marketplace server.
    #[arg(
        long,
        global = true,
        env = "CIVICGRID_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Your API token.
    #[arg(long, global = true, env = "CIVICGRID_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate (PEM) that signed the server's, for an https://
    /// server; without it, the system's trusted roots.
    #[arg(long, global = true, env = "CIVICGRID_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Your client certificate (PEM), for a server that asks for one
    /// (`civicgrid-marketplace serve --client-ca`).
    #[arg(long, global = true, env = "CIVICGRID_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(
        long,
        global = true,
        env = "CIVICGRID_TLS_KEY",
        requires = "tls_cert",
        hide_env_values = true
    )]
    tls_key: Option<PathBuf>,
    /// How to print results.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Who the token belongs to, and its roles.
    Whoami,
    /// Organizations (tenants).
    #[command(subcommand)]
    Org(OrgCommand),
    /// Users.
    #[command(subcommand)]
    User(UserCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Role bindings.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Data products and their registration.
    #[command(subcommand)]
    Product(ProductCommand),
    /// Search the catalog of published products.
    Catalog(CatalogArgs),
    /// The demand list: data consumers need, and providers' answers.
    #[command(subcommand)]
    Demand(DemandCommand),
    /// Contracts.
    #[command(subcommand)]
    Contract(ContractCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Quality feedback: report a problem in a product's data, answer or
    /// reopen a report, list reports.
    #[command(subcommand)]
    Quality(QualityCommand),
    /// Receipts: proof that an audit entry (a query of yours, or on your
    /// products) is in the signed log.
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Run SQL (or an approved algorithm) on a product under your contract.
    /// The result goes to stdout; the usage and charge to stderr.
    Query(QueryArgs),
    /// Queries run: yours; your products' (providers); all (regulators).
    Usage(UsageArgs),
    /// Balances, deposits, invoices and the ledger.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Start the marketplace on the embedded default (SQLite and Parquet
    /// under --data-dir), seeded with the sample city on first start; print
    /// the endpoint and demo credentials; serve until stopped.
    Up(up::UpArgs),
    /// Run the whole story against `civicgrid up`: register, approve,
    /// contract, query, bill, suppression, audit verification.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args)]
struct CatalogArgs {
    /// Words that must all appear.
    #[arg(long = "keyword")]
    keywords: Vec<String>,
    #[arg(long, default_value = "")]
    tier: String,
    #[arg(long, default_value = "")]
    region: String,
    #[arg(long, default_value = "")]
    provider: String,
    /// public, internal, sensitive or blocked.
    #[arg(long)]
    max_sensitivity: Option<String>,
    /// Print the whole public catalog as DCAT-AP JSON-LD instead.
    #[arg(long)]
    dcat: bool,
    /// Base of the URIs in the DCAT-AP export.
    #[arg(long, default_value = "")]
    base_uri: String,
}

#[derive(clap::Args)]
struct QueryArgs {
    #[arg(long)]
    product: String,
    /// The SQL (for an algorithm: its input).
    #[arg(long, default_value = "")]
    sql: String,
    /// A consumer algorithm to run instead of SQL: a Wasm component of
    /// sandbox/wit/algorithm.wit (or a core module of the core ABI).
    #[arg(long)]
    algorithm: Option<PathBuf>,
    /// Retry with the same key to get the first outcome without paying
    /// twice. Default: a fresh random key (printed, to retry with).
    #[arg(long)]
    key: Option<String>,
    /// Most compute units the query may use (0: the server's default;
    /// must be 0 on a product that withholds rows).
    #[arg(long, default_value_t = 0)]
    max_compute_units: i64,
    /// The product's data version to read (0: the newest); the receipt
    /// records its fingerprint.
    #[arg(long = "version", default_value_t = 0)]
    data_version: i64,
    /// How to print the result rows.
    #[arg(long, value_enum, default_value_t = RowFormat::Table)]
    format: RowFormat,
    /// Save the query's receipt (its audit entry, a signed checkpoint and
    /// the inclusion proof) here, as JSON, for `civicgrid receipt verify`.
    #[arg(long, value_name = "FILE")]
    receipt: Option<PathBuf>,
    /// Also save the result exactly as returned (an Arrow IPC stream),
    /// whose SHA-256 the receipt's entry records.
    #[arg(long, value_name = "FILE")]
    result_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct UsageArgs {
    #[arg(long, default_value = "")]
    product: String,
    /// An organization (platform-admins and regulators).
    #[arg(long, default_value = "")]
    org: String,
    /// A month, YYYY-MM.
    #[arg(long, default_value = "")]
    period: String,
    #[arg(long, default_value_t = 0)]
    limit: i64,
}

#[derive(Clone, Copy, ValueEnum)]
enum RowFormat {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum BillingCommand {
    /// Credit a consumer's prepaid balance (platform-admins).
    Deposit {
        #[arg(long)]
        org: String,
        /// Minor units (cents): 10000 is 100.00.
        #[arg(long)]
        amount: i64,
        #[arg(long)]
        currency: String,
        #[arg(long, default_value = "")]
        reference: String,
    },
    /// Balances of your organization (or --org for platform-admins and regulators).
    Balance {
        #[arg(long, default_value = "")]
        org: String,
    },
    /// Charges (consumers) or earnings (providers) in a month.
    Invoice {
        /// YYYY-MM.
        #[arg(long)]
        period: String,
        #[arg(long, default_value = "")]
        org: String,
    },
    /// Ledger totals per currency (zero when sound) and open holds.
    Ledger,
}

#[derive(Subcommand)]
enum OrgCommand {
    Create {
        id: String,
        #[arg(long)]
        name: String,
        /// provider, consumer, platform or regulator.
        #[arg(long)]
        kind: String,
    },
    List,
}

#[derive(Subcommand)]
enum UserCommand {
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Prints the secret once.
    Issue {
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl_seconds: i64,
        #[arg(long, default_value = "")]
        description: String,
    },
    Revoke {
        token_id: String,
    },
}

#[derive(Subcommand)]
enum RoleCommand {
    Grant {
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: String,
    },
    Revoke {
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: String,
    },
}

#[derive(Subcommand)]
enum ProductCommand {
    /// Draft a spec from a Parquet or CSV file's schema: types, suggested
    /// sensitivities and the output policy's defaults. Needs no server;
    /// review every suggestion, fill in the rest, then `product create`.
    Scaffold {
        /// The data file (.parquet or .csv).
        #[arg(long = "from", value_name = "FILE")]
        from: PathBuf,
        /// The product's id (its storage location is products/ID).
        #[arg(long)]
        id: String,
        /// The table's name (default: from the file's name).
        #[arg(long)]
        table: Option<String>,
        /// Write the spec here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Upload one table's rows (Parquet, or CSV with a header naming the
    /// declared columns) as a new version of the product's data. Sent in
    /// checksummed chunks; rerun with --resume UPLOAD_ID after a cut.
    Upload {
        id: String,
        /// The declared table the rows are of.
        #[arg(long)]
        table: String,
        /// The file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Add the rows to the table's instead of replacing them.
        #[arg(long)]
        append: bool,
        /// parquet or csv (default: from the file's extension).
        #[arg(long)]
        format: Option<String>,
        /// Resume this upload instead of starting another.
        #[arg(long, value_name = "UPLOAD_ID")]
        resume: Option<String>,
        /// Typed by the product's revision waiting for review: the data it
        /// will serve once approved.
        #[arg(long)]
        for_revision: bool,
    },
    /// The product's data versions, newest first.
    Versions {
        id: String,
    },
    /// The product's uploads, newest first, its refreshes' included, with
    /// why any was refused (its provider only).
    Uploads {
        id: String,
    },
    /// Withdraw an older data version: it can no longer be read, and its
    /// files no readable version lists are deleted.
    WithdrawVersion {
        id: String,
        #[arg(long)]
        version: i64,
        #[arg(long)]
        reason: String,
    },
    /// Create a draft from a spec file (proto3 JSON of ProductSpec).
    Create {
        id: String,
        #[arg(long)]
        spec: PathBuf,
    },
    Submit {
        id: String,
    },
    /// Start the public notice (platform admin).
    Notice {
        id: String,
        #[arg(long, default_value_t = 7)]
        days: i64,
    },
    Approve {
        id: String,
    },
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Publish {
        id: String,
    },
    Suspend {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Retire {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// A new version from a spec file; one that changes storage, tables,
    /// sensitivity or the output policy waits for review.
    Revise {
        id: String,
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        reason: String,
    },
    /// Make the pending revision the product's new version (platform admin).
    ApproveRevision {
        id: String,
    },
    /// Drop the pending revision (platform admin).
    RejectRevision {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Transfer {
        id: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        reason: String,
    },
    Get {
        id: String,
    },
    Events {
        id: String,
    },
}

#[derive(Subcommand)]
enum DemandCommand {
    /// Post what data your organization needs.
    Post {
        #[arg(long)]
        title: String,
        #[arg(long)]
        description: String,
        #[arg(long = "keyword")]
        keywords: Vec<String>,
        #[arg(long, default_value = "")]
        tier: String,
        #[arg(long, default_value = "")]
        region: String,
        #[arg(long, default_value_t = 0)]
        monthly_budget_minor: i64,
        #[arg(long, default_value = "")]
        currency: String,
    },
    /// Answer a demand with one of your products.
    Answer {
        demand: String,
        #[arg(long)]
        product: String,
        #[arg(long, default_value = "")]
        message: String,
    },
    Close {
        demand: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    List {
        #[arg(long)]
        include_closed: bool,
        #[arg(long = "keyword")]
        keywords: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ContractCommand {
    Request {
        product: String,
        #[arg(long)]
        plan: String,
        /// Ask for aggregate SQL queries.
        #[arg(long)]
        aggregate: bool,
        /// A column list queries may return (repeat).
        #[arg(long = "list-column")]
        list_columns: Vec<String>,
        /// An approved algorithm's sha256 (repeat).
        #[arg(long = "algorithm")]
        algorithms: Vec<String>,
        #[arg(long, default_value_t = 0)]
        monthly_quota: i64,
        #[arg(long, default_value_t = 365)]
        days: i64,
        #[arg(long)]
        purpose: String,
    },
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Get {
        id: String,
    },
    List {
        #[arg(long, default_value = "")]
        product: String,
    },
    /// May my organization run this operation now?
    Check {
        product: String,
        /// aggregate-sql, list-sql or algorithm.
        #[arg(long)]
        operation: String,
        #[arg(long = "column")]
        columns: Vec<String>,
        #[arg(long, default_value = "")]
        algorithm: String,
    },
}

#[derive(Subcommand)]
enum QualityCommand {
    /// Report a problem in a product's data (your organization has or had
    /// a contract on it).
    Report {
        #[arg(long)]
        product: String,
        /// The column, as table.column (empty: the product as a whole).
        #[arg(long, default_value = "")]
        column: String,
        /// What is wrong.
        #[arg(long)]
        description: String,
        /// A query of yours on the product that shows it.
        #[arg(long, default_value = "")]
        query: String,
    },
    /// Answer a report on your product; --fixed-in-version marks it fixed.
    Answer {
        #[arg(long)]
        report: String,
        #[arg(long)]
        message: String,
        #[arg(long, default_value_t = 0)]
        fixed_in_version: i64,
    },
    /// Reopen a report of yours marked fixed that is not.
    Reopen {
        #[arg(long)]
        report: String,
        #[arg(long)]
        reason: String,
    },
    /// Reports you may see: yours, on your products, or all (platform
    /// admins and regulators).
    List {
        #[arg(long, default_value = "")]
        product: String,
        /// Only those not fixed.
        #[arg(long)]
        open: bool,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Fetch the receipt of an audit entry that concerns your organization
    /// (a query's entry index is in its summary and in `usage`).
    Get {
        #[arg(long)]
        index: i64,
        /// Prove it against the newest checkpoint the witnesses cosigned.
        #[arg(long)]
        witnessed: bool,
        /// Write it here (JSON) instead of stdout.
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
    },
    /// Check a saved receipt offline with the log's verifier key: needs no
    /// server and no token. Exits 2 when it does not check out.
    Verify {
        /// The receipt (JSON), from `query --receipt` or `receipt get`.
        file: PathBuf,
        /// The log's verifier key (name+hash+key), given out of band.
        #[arg(long, env = "CIVICGRID_LOG_KEY")]
        key: String,
        /// The log's origin; defaults to the key's name.
        #[arg(long)]
        origin: Option<String>,
        /// Require a cosignature by this witness (repeatable).
        #[arg(long = "witness-key", value_name = "VERIFIER_KEY")]
        witness_keys: Vec<String>,
        /// The query's result as saved by `query --result-file`: it must be
        /// the result the entry records.
        #[arg(long, value_name = "FILE")]
        result: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The latest signed checkpoint; --save writes the note to a file.
    Checkpoint {
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// Entries [start, end).
    Entries {
        #[arg(long, default_value_t = 0)]
        start: i64,
        #[arg(long, default_value_t = 1000)]
        end: i64,
        #[arg(long, default_value = "")]
        kind_prefix: String,
        #[arg(long, default_value = "")]
        tenant: String,
        /// Print each entry's exact bytes, one per line (what the leaf hash
        /// covers), for checking by hand.
        #[arg(long)]
        raw: bool,
    },
    /// Verify the live log with the log's public key, against a checkpoint
    /// saved earlier. Exits 2 when the log was tampered with.
    Verify {
        /// The verifier key (name+hash+key), given out of band.
        #[arg(long, env = "CIVICGRID_LOG_KEY")]
        key: String,
        /// The log's origin (checkpoint first line); defaults to the key's name.
        #[arg(long)]
        origin: Option<String>,
        /// A checkpoint note saved earlier, to check the log extends it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// After a clean verification, overwrite --checkpoint with the new one.
        #[arg(long, requires = "checkpoint")]
        update: bool,
        /// Verify against the newest checkpoint this witness cosigned (its
        /// verifier key, from its operator); repeat to require several.
        #[arg(long = "witness-key", value_name = "VERIFIER_KEY")]
        witness_keys: Vec<String>,
        /// Fail when a required witness's cosignature is older than this
        /// many seconds (the server stopped getting its log witnessed).
        #[arg(long, requires = "witness_keys")]
        max_witness_age_secs: Option<u64>,
    },
}

type Authed = InterceptedService<Channel, BearerToken>;

struct Clients {
    identity: IdentityClient<Authed>,
    registry: RegistryClient<Authed>,
    contracts: ContractsClient<Authed>,
    audit: AuditClient<Authed>,
    queries: QueriesClient<Authed>,
    billing: BillingClient<Authed>,
}

async fn connect(cli: &Cli) -> anyhow::Result<Clients> {
    let token = cli
        .token
        .as_deref()
        .context("no token: pass --token or set CIVICGRID_TOKEN")?;
    let token = BearerToken::new(token).context("--token: not a printable ASCII token")?;
    let channel = endpoint(cli)?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.server))?;
    Ok(Clients {
        identity: IdentityClient::with_interceptor(channel.clone(), token.clone()),
        registry: RegistryClient::with_interceptor(channel.clone(), token.clone()),
        contracts: ContractsClient::with_interceptor(channel.clone(), token.clone()),
        queries: QueriesClient::with_interceptor(channel.clone(), token.clone()),
        billing: BillingClient::with_interceptor(channel.clone(), token.clone()),
        audit: AuditClient::with_interceptor(channel, token),
    })
}

/// The server's endpoint, with TLS for an https:// server: the server is
/// checked against `--tls-ca` (or the system's roots), and `--tls-cert`/`--tls-key`
/// are presented when given.
fn endpoint(cli: &Cli) -> anyhow::Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let endpoint = Channel::from_shared(cli.server.clone())
        .with_context(|| format!("--server: {:?} is not a URL", cli.server))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    if !https {
        anyhow::ensure!(
            cli.tls_ca.is_none() && cli.tls_cert.is_none(),
            "--tls-ca, --tls-cert and --tls-key are for an https:// server; --server is {}",
            cli.server
        );
        return Ok(endpoint);
    }
    let read = |flag: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("{flag}: reading {}", path.display()))
    };
    let mut tls = match &cli.tls_ca {
        Some(ca) => {
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    endpoint
        .tls_config(tls)
        .context("--tls-ca, --tls-cert, --tls-key: not a usable TLS configuration")
}

/// Prints a query result (an Arrow IPC stream) as a table, CSV or JSON.
fn print_rows(ipc: &[u8], format: RowFormat) -> anyhow::Result<()> {
    if ipc.is_empty() {
        return Ok(());
    }
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
        .context("decoding the result")?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .context("decoding the result")?;
    let stdout = std::io::stdout();
    match format {
        RowFormat::Csv => {
            let mut writer = arrow_csv::Writer::new(stdout.lock());
            for batch in &batches {
                writer.write(batch)?;
            }
        }
        RowFormat::Json => {
            let mut writer = arrow_json::ArrayWriter::new(stdout.lock());
            for batch in &batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            println!();
        }
        RowFormat::Table => {
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
            table.set_header(schema.fields().iter().map(|field| field.name().clone()));
            let options = arrow_cast::display::FormatOptions::default().with_null("NULL");
            for batch in &batches {
                let formatters = batch
                    .columns()
                    .iter()
                    .map(|column| arrow_cast::display::ArrayFormatter::try_new(column, &options))
                    .collect::<Result<Vec<_>, _>>()?;
                for row in 0..batch.num_rows() {
                    table.add_row(formatters.iter().map(|f| f.value(row).to_string()));
                }
            }
            println!("{table}");
        }
    }
    Ok(())
}

fn print<T: serde::Serialize>(output: Output, value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_value(value)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Output::Table => println!("{}", table(&json)),
    }
    Ok(())
}

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A response as a table: a list becomes one row per item, anything else one
/// row per field.
fn table(json: &serde_json::Value) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    let list = json.as_object().and_then(|object| {
        let mut arrays = object.values().filter_map(serde_json::Value::as_array);
        let first = arrays.next()?;
        (object.len() == 1).then_some(first)
    });
    if let Some(items) = list {
        let mut columns: Vec<String> = Vec::new();
        for item in items {
            for (key, value) in item.as_object().into_iter().flatten() {
                if !value.is_object() && !value.is_array() && !columns.contains(key) {
                    columns.push(key.clone());
                }
            }
        }
        table.set_header(columns.iter().map(|c| c.to_uppercase()));
        for item in items {
            table.add_row(
                columns
                    .iter()
                    .map(|c| cell(item.get(c).unwrap_or(&serde_json::Value::Null))),
            );
        }
    } else if let Some(object) = json.as_object() {
        for (key, value) in object {
            table.add_row([key.clone(), cell(value)]);
        }
    }
    table
}

fn read_spec(path: &PathBuf) -> anyhow::Result<proto::ProductSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--spec: reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "--spec: {} is not a ProductSpec in proto3 JSON",
            path.display()
        )
    })
}

fn sensitivity(name: &str) -> anyhow::Result<proto::Sensitivity> {
    proto::Sensitivity::from_str_name(&format!("SENSITIVITY_{}", name.to_uppercase())).with_context(
        || format!("--max-sensitivity: {name:?} is not public, internal, sensitive or blocked"),
    )
}

fn action(id: String, reason: String) -> proto::ProductAction {
    proto::ProductAction {
        product_id: id,
        reason,
    }
}

fn signing_key(path: &std::path::Path) -> anyhow::Result<ed25519_dalek::SigningKey> {
    Ok(civicgrid_marketplace::audit::load_or_create_signing_key(
        path,
    )?)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let output = cli.output;
    match &cli.command {
        Command::Up(args) => {
            up::up(args.clone()).await?;
            return Ok(0);
        }
        Command::Product(ProductCommand::Scaffold {
            from,
            id,
            table,
            out,
        }) => {
            let drafted = civicgrid_cli::scaffold::scaffold(from, id, table.as_deref())?;
            let json = serde_json::to_string_pretty(&drafted.spec)? + "\n";
            match out {
                Some(path) => std::fs::write(path, json)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{json}"),
            }
            for note in &drafted.notes {
                eprintln!("{note}");
            }
            return Ok(0);
        }
        Command::Receipt(ReceiptCommand::Verify {
            file,
            key,
            origin,
            witness_keys,
            result,
        }) => {
            return verify_receipt_file(
                output,
                file,
                key,
                origin.as_deref(),
                witness_keys,
                result.as_deref(),
            );
        }
        Command::Demo(args) => {
            let server = std::env::var("CIVICGRID_SERVER")
                .ok()
                .or_else(|| (cli.server != "http://127.0.0.1:50051").then(|| cli.server.clone()));
            demo::demo(args.clone(), server).await?;
            return Ok(0);
        }
        _ => {}
    }
    let mut c = connect(&cli).await?;
    match cli.command {
        Command::Whoami => print(
            output,
            &c.identity
                .who_am_i(proto::WhoAmIRequest {})
                .await?
                .into_inner(),
        )?,
        Command::Org(OrgCommand::Create { id, name, kind }) => {
            let kind = proto::OrganizationKind::from_str_name(&format!(
                "ORGANIZATION_KIND_{}",
                kind.to_uppercase()
            ))
            .with_context(|| {
                format!("--kind: {kind:?} is not provider, consumer, platform or regulator")
            })?;
            let request = proto::CreateOrganizationRequest {
                id,
                display_name: name,
                kind: kind as i32,
            };
            print(
                output,
                &c.identity.create_organization(request).await?.into_inner(),
            )?;
        }
        Command::Org(OrgCommand::List) => {
            print(
                output,
                &c.identity
                    .list_organizations(proto::ListOrganizationsRequest {})
                    .await?
                    .into_inner(),
            )?;
        }
        Command::User(UserCommand::Create { org, name }) => {
            let request = proto::CreateUserRequest {
                organization_id: org,
                name,
            };
            print(output, &c.identity.create_user(request).await?.into_inner())?;
        }
        Command::Token(TokenCommand::Issue {
            user,
            ttl_seconds,
            description,
        }) => {
            let request = proto::IssueTokenRequest {
                user_id: user,
                ttl_seconds,
                description,
            };
            print(output, &c.identity.issue_token(request).await?.into_inner())?;
        }
        Command::Token(TokenCommand::Revoke { token_id }) => {
            c.identity
                .revoke_token(proto::RevokeTokenRequest { token_id })
                .await?;
        }
        Command::Role(RoleCommand::Grant { user, role }) => {
            print(
                output,
                &c.identity
                    .grant_role(proto::RoleBindingRequest {
                        user_id: user,
                        role,
                    })
                    .await?
                    .into_inner(),
            )?;
        }
        Command::Role(RoleCommand::Revoke { user, role }) => {
            print(
                output,
                &c.identity
                    .revoke_role(proto::RoleBindingRequest {
                        user_id: user,
                        role,
                    })
                    .await?
                    .into_inner(),
            )?;
        }
        Command::Product(command) => return product(&mut c, output, command).await,
        Command::Catalog(args) => return catalog(&mut c, output, args).await,
        Command::Demand(command) => return demand(&mut c, output, command).await,
        Command::Contract(command) => return contract(&mut c, output, command).await,
        Command::Query(args) => return query(&mut c, args).await,
        Command::Usage(args) => return usage(&mut c, output, args).await,
        Command::Billing(command) => return billing(&mut c, output, command).await,
        Command::Audit(command) => return audit(&mut c, output, command).await,
        Command::Quality(command) => {
            let registry = &mut c.registry;
            match command {
                QualityCommand::Report {
                    product,
                    column,
                    description,
                    query,
                } => print(
                    output,
                    &registry
                        .report_quality_issue(proto::ReportQualityIssueRequest {
                            product_id: product,
                            column,
                            description,
                            query_id: query,
                        })
                        .await?
                        .into_inner(),
                )?,
                QualityCommand::Answer {
                    report,
                    message,
                    fixed_in_version,
                } => print(
                    output,
                    &registry
                        .answer_quality_report(proto::AnswerQualityReportRequest {
                            report_id: report,
                            message,
                            fixed_in_version,
                        })
                        .await?
                        .into_inner(),
                )?,
                QualityCommand::Reopen { report, reason } => print(
                    output,
                    &registry
                        .reopen_quality_report(proto::ReopenQualityReportRequest {
                            report_id: report,
                            reason,
                        })
                        .await?
                        .into_inner(),
                )?,
                QualityCommand::List { product, open } => print(
                    output,
                    &registry
                        .list_quality_reports(proto::ListQualityReportsRequest {
                            product_id: product,
                            open_only: open,
                        })
                        .await?
                        .into_inner(),
                )?,
            }
        }
        Command::Receipt(ReceiptCommand::Get {
            index,
            witnessed,
            save,
        }) => {
            let receipt = c
                .audit
                .get_receipt(proto::GetReceiptRequest {
                    entry_index: index,
                    witnessed,
                })
                .await?
                .into_inner();
            let json = serde_json::to_string_pretty(&receipt)?;
            match save {
                Some(path) => std::fs::write(&path, json + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{json}"),
            }
        }
        Command::Up(_) | Command::Demo(_) | Command::Receipt(ReceiptCommand::Verify { .. }) => {
            unreachable!("handled before connecting")
        }
    }
    Ok(0)
}

/// A product through its lifecycle, as its provider, reviewer or the platform.
async fn product(c: &mut Clients, output: Output, command: ProductCommand) -> anyhow::Result<i32> {
    let r = &mut c.registry;
    let product = match command {
        ProductCommand::Scaffold { .. } => unreachable!("handled before connecting"),
        ProductCommand::Create { id, spec } => {
            r.create_product(proto::CreateProductRequest {
                id,
                spec: Some(read_spec(&spec)?),
            })
            .await?
        }
        ProductCommand::Submit { id } => r.submit_product(action(id, String::new())).await?,
        ProductCommand::Notice { id, days } => {
            r.start_public_notice(proto::StartPublicNoticeRequest {
                product_id: id,
                notice_days: days,
            })
            .await?
        }
        ProductCommand::Approve { id } => r.approve_registration(action(id, String::new())).await?,
        ProductCommand::Reject { id, reason } => r.reject_registration(action(id, reason)).await?,
        ProductCommand::Publish { id } => r.publish_product(action(id, String::new())).await?,
        ProductCommand::Suspend { id, reason } => r.suspend_product(action(id, reason)).await?,
        ProductCommand::Retire { id, reason } => r.retire_product(action(id, reason)).await?,
        ProductCommand::Revise { id, spec, reason } => {
            r.revise_product(proto::ReviseProductRequest {
                product_id: id,
                spec: Some(read_spec(&spec)?),
                reason,
            })
            .await?
        }
        ProductCommand::ApproveRevision { id } => {
            r.approve_revision(action(id, String::new())).await?
        }
        ProductCommand::RejectRevision { id, reason } => {
            r.reject_revision(action(id, reason)).await?
        }
        ProductCommand::Transfer { id, to, reason } => {
            r.transfer_product(proto::TransferProductRequest {
                product_id: id,
                to_organization_id: to,
                reason,
            })
            .await?
        }
        ProductCommand::Get { id } => {
            r.get_product(proto::GetProductRequest { product_id: id })
                .await?
        }
        ProductCommand::Upload {
            id,
            table,
            file,
            append,
            format,
            resume,
            for_revision,
        } => {
            let committed = upload(
                r,
                &id,
                &table,
                &file,
                (append, for_revision),
                format,
                resume,
            )
            .await?;
            print(output, &committed)?;
            return Ok(0);
        }
        ProductCommand::Uploads { id } => {
            let uploads = r
                .list_uploads(proto::ListUploadsRequest { product_id: id })
                .await?;
            print(output, &uploads.into_inner())?;
            return Ok(0);
        }
        ProductCommand::Versions { id } => {
            let versions = r
                .list_data_versions(proto::ListDataVersionsRequest { product_id: id })
                .await?;
            print(output, &versions.into_inner())?;
            return Ok(0);
        }
        ProductCommand::WithdrawVersion {
            id,
            version,
            reason,
        } => {
            let withdrawn = r
                .withdraw_data_version(proto::WithdrawDataVersionRequest {
                    product_id: id,
                    version,
                    reason,
                })
                .await?;
            print(output, &withdrawn.into_inner())?;
            return Ok(0);
        }
        ProductCommand::Events { id } => {
            let events = r
                .list_registration_events(proto::GetProductRequest { product_id: id })
                .await?;
            print(output, &events.into_inner())?;
            return Ok(0);
        }
    };
    print(output, &product.into_inner())?;
    Ok(0)
}

/// Bytes sent per chunk: under the server's 3 MiB.
const UPLOAD_CHUNK_BYTES: usize = 2 << 20;

/// Uploads `file` as table `table`'s rows of product `id`, resuming
/// `resume` if given, and commits it.
async fn upload(
    r: &mut RegistryClient<Authed>,
    id: &str,
    table: &str,
    file: &std::path::Path,
    (append, for_revision): (bool, bool),
    format: Option<String>,
    resume: Option<String>,
) -> anyhow::Result<proto::CommitUploadResponse> {
    use sha2::Digest as _;
    use std::io::{Read as _, Seek as _};
    let format = match format {
        Some(format) => format,
        None => match file.extension().and_then(|e| e.to_str()) {
            Some("parquet") => "parquet".to_owned(),
            Some("csv") => "csv".to_owned(),
            _ => anyhow::bail!("--format: parquet or csv (the file's extension says neither)"),
        },
    };
    let mut source =
        std::fs::File::open(file).with_context(|| format!("--file: opening {}", file.display()))?;
    let mut hasher = sha2::Sha256::new();
    let size = std::io::copy(&mut source, &mut hasher)
        .with_context(|| format!("--file: reading {}", file.display()))?;
    let sha256 = hex::encode(hasher.finalize());
    let started = match resume {
        Some(upload_id) => {
            let upload = r
                .get_upload(proto::GetUploadRequest { upload_id })
                .await?
                .into_inner();
            if upload.sha256 != sha256 {
                anyhow::bail!(
                    "--resume: upload {} is of another file (SHA-256 {})",
                    upload.id,
                    upload.sha256
                );
            }
            upload
        }
        None => r
            .begin_upload(proto::BeginUploadRequest {
                product_id: id.to_owned(),
                table: table.to_owned(),
                format,
                append,
                for_revision,
                size_bytes: i64::try_from(size)?,
                sha256,
            })
            .await?
            .into_inner(),
    };
    eprintln!(
        "upload {} ({size} bytes; resume with --resume {})",
        started.id, started.id
    );
    let mut offset = u64::try_from(started.received_bytes)?;
    let mut buffer = vec![0u8; UPLOAD_CHUNK_BYTES];
    // A server may find the upload staged shorter than it recorded (its
    // runner was replaced): it says where to resume, and the rest is sent
    // again, a few times at most.
    for _ in 0..UPLOAD_RESUMES {
        source.seek(std::io::SeekFrom::Start(offset))?;
        while offset < size {
            let read = source.read(&mut buffer)?;
            if read == 0 {
                anyhow::bail!("--file: {} ended before its {size} bytes", file.display());
            }
            let chunk = buffer[..read].to_vec();
            let sent = r
                .put_upload_chunk(proto::PutUploadChunkRequest {
                    upload_id: started.id.clone(),
                    offset: i64::try_from(offset)?,
                    sha256: hex::encode(sha2::Sha256::digest(&chunk)),
                    data: chunk,
                })
                .await;
            offset = match sent {
                Ok(upload) => u64::try_from(upload.into_inner().received_bytes)?,
                Err(status) if resumes_elsewhere(&status) => received(r, &started.id).await?,
                Err(status) => return Err(status.into()),
            };
            source.seek(std::io::SeekFrom::Start(offset))?;
        }
        let committed = r
            .commit_upload(proto::GetUploadRequest {
                upload_id: started.id.clone(),
            })
            .await;
        match committed {
            Ok(committed) => return Ok(committed.into_inner()),
            Err(status) if resumes_elsewhere(&status) => offset = received(r, &started.id).await?,
            Err(status) => return Err(status.into()),
        }
    }
    anyhow::bail!(
        "upload {} kept being cut off; resume it later with --resume {}",
        started.id,
        started.id
    )
}

/// Times an upload resumes from where the server says it stands.
const UPLOAD_RESUMES: usize = 3;

fn resumes_elsewhere(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status.message().contains("resume from offset")
}

async fn received(r: &mut RegistryClient<Authed>, upload_id: &str) -> anyhow::Result<u64> {
    let upload = r
        .get_upload(proto::GetUploadRequest {
            upload_id: upload_id.to_owned(),
        })
        .await?
        .into_inner();
    Ok(u64::try_from(upload.received_bytes)?)
}

/// The demand list.
async fn demand(c: &mut Clients, output: Output, command: DemandCommand) -> anyhow::Result<i32> {
    let r = &mut c.registry;
    match command {
        DemandCommand::Post {
            title,
            description,
            keywords,
            tier,
            region,
            monthly_budget_minor,
            currency,
        } => {
            let request = proto::PostDemandRequest {
                title,
                description,
                keywords,
                tier,
                region,
                monthly_budget_minor,
                currency,
            };
            print(output, &r.post_demand(request).await?.into_inner())?;
        }
        DemandCommand::Answer {
            demand,
            product,
            message,
        } => {
            let request = proto::AnswerDemandRequest {
                demand_id: demand,
                product_id: product,
                message,
            };
            print(output, &r.answer_demand(request).await?.into_inner())?;
        }
        DemandCommand::Close { demand, reason } => {
            print(
                output,
                &r.close_demand(proto::CloseDemandRequest {
                    demand_id: demand,
                    reason,
                })
                .await?
                .into_inner(),
            )?;
        }
        DemandCommand::List {
            include_closed,
            keywords,
        } => {
            print(
                output,
                &r.list_demands(proto::ListDemandsRequest {
                    include_closed,
                    keywords,
                })
                .await?
                .into_inner(),
            )?;
        }
    }
    Ok(0)
}

/// Contracts; `check` exits 3 when the operation is not allowed.
async fn contract(
    c: &mut Clients,
    output: Output,
    command: ContractCommand,
) -> anyhow::Result<i32> {
    let k = &mut c.contracts;
    let contract = match command {
        ContractCommand::Request {
            product,
            plan,
            aggregate,
            list_columns,
            algorithms,
            monthly_quota,
            days,
            purpose,
        } => {
            k.request_contract(proto::RequestContractRequest {
                product_id: product,
                plan_id: plan,
                operations: Some(proto::AllowedOperations {
                    aggregate_sql: aggregate,
                    list_columns,
                    algorithm_sha256: algorithms,
                }),
                monthly_query_quota: monthly_quota,
                duration_days: days,
                purpose,
            })
            .await?
        }
        ContractCommand::Approve { id, reason } => {
            k.approve_contract(proto::ContractAction {
                contract_id: id,
                reason,
            })
            .await?
        }
        ContractCommand::Reject { id, reason } => {
            k.reject_contract(proto::ContractAction {
                contract_id: id,
                reason,
            })
            .await?
        }
        ContractCommand::Revoke { id, reason } => {
            k.revoke_contract(proto::ContractAction {
                contract_id: id,
                reason,
            })
            .await?
        }
        ContractCommand::Get { id } => {
            k.get_contract(proto::ContractAction {
                contract_id: id,
                reason: String::new(),
            })
            .await?
        }
        ContractCommand::List { product } => {
            print(
                output,
                &k.list_contracts(proto::ListContractsRequest {
                    product_id: product,
                })
                .await?
                .into_inner(),
            )?;
            return Ok(0);
        }
        ContractCommand::Check {
            product,
            operation,
            columns,
            algorithm,
        } => {
            let kind = proto::OperationKind::from_str_name(&format!(
                "OPERATION_KIND_{}",
                operation.to_uppercase().replace('-', "_")
            ))
            .with_context(|| {
                format!("--operation: {operation:?} is not aggregate-sql, list-sql or algorithm")
            })?;
            let answer = k
                .check_operation(proto::CheckOperationRequest {
                    product_id: product,
                    operation: kind as i32,
                    columns,
                    algorithm_sha256: algorithm,
                })
                .await?
                .into_inner();
            print(output, &answer)?;
            return Ok(if answer.allowed { 0 } else { 3 });
        }
    };
    print(output, &contract.into_inner())?;
    Ok(0)
}

/// Balances, deposits, invoices and the ledger; `summary` exits 3 when the books do not balance.
async fn billing(c: &mut Clients, output: Output, command: BillingCommand) -> anyhow::Result<i32> {
    let b = &mut c.billing;
    match command {
        BillingCommand::Deposit {
            org,
            amount,
            currency,
            reference,
        } => print(
            output,
            &b.deposit(proto::DepositRequest {
                organization_id: org,
                amount_minor: amount,
                currency,
                reference,
            })
            .await?
            .into_inner(),
        )?,
        BillingCommand::Balance { org } => print(
            output,
            &b.get_balance(proto::GetBalanceRequest {
                organization_id: org,
            })
            .await?
            .into_inner(),
        )?,
        BillingCommand::Invoice { period, org } => print(
            output,
            &b.get_invoice(proto::GetInvoiceRequest {
                organization_id: org,
                period,
            })
            .await?
            .into_inner(),
        )?,
        BillingCommand::Ledger => {
            let summary = b
                .get_ledger_summary(proto::GetLedgerSummaryRequest {})
                .await?
                .into_inner();
            print(output, &summary)?;
            let sound = summary.totals_minor.values().all(|total| *total == 0)
                && summary.unbalanced_accounts.is_empty();
            return Ok(if sound { 0 } else { 3 });
        }
    }
    Ok(0)
}

/// Search the catalog, or print it as DCAT-AP.
async fn catalog(c: &mut Clients, output: Output, args: CatalogArgs) -> anyhow::Result<i32> {
    let CatalogArgs {
        keywords,
        tier,
        region,
        provider,
        max_sensitivity,
        dcat,
        base_uri,
    } = args;
    if dcat {
        let export = c
            .registry
            .export_catalog(proto::ExportCatalogRequest { base_uri })
            .await?
            .into_inner();
        println!("{}", export.json_ld);
        return Ok(0);
    }
    let max_sensitivity = max_sensitivity
        .as_deref()
        .map(sensitivity)
        .transpose()?
        .unwrap_or_default();
    let request = proto::SearchCatalogRequest {
        keywords,
        tier,
        region,
        provider_organization_id: provider,
        max_sensitivity: max_sensitivity as i32,
    };
    print(
        output,
        &c.registry.search_catalog(request).await?.into_inner(),
    )?;
    Ok(0)
}

/// Runs a query and prints its rows (stdout) and its bill (stderr).
async fn query(c: &mut Clients, args: QueryArgs) -> anyhow::Result<i32> {
    let QueryArgs {
        product,
        sql,
        algorithm,
        key,
        max_compute_units,
        data_version,
        format,
        receipt: receipt_file,
        result_file,
    } = args;
    let algorithm_wasm = match &algorithm {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("--algorithm: reading {}", path.display()))?,
        None => Vec::new(),
    };
    let key = key.unwrap_or_else(|| format!("cli-{}", hex::encode(rand::random::<[u8; 12]>())));
    let mut stream = c
        .queries
        .run_query(proto::RunQueryRequest {
            product_id: product.clone(),
            sql,
            algorithm_wasm,
            idempotency_key: key.clone(),
            max_compute_units,
            data_version,
        })
        .await
        .inspect_err(|_| eprintln!("idempotency key: {key} (retry with --key {key})"))?
        .into_inner();
    let mut summary = None;
    let mut ipc = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.message {
            Some(proto::run_query_response::Message::Summary(s)) => summary = Some(s),
            Some(proto::run_query_response::Message::ArrowIpc(bytes)) => {
                ipc.extend_from_slice(&bytes);
            }
            None => {}
        }
    }
    let summary = summary.context("the server sent no query summary")?;
    match &summary.receipt {
        Some(receipt) => {
            // The summary is the server's word too: the entry must record
            // the product asked for.
            if summary.product_id != product
                || !civicgrid_cli::verify::entry_records_query(
                    &receipt.entry,
                    receipt.entry_index,
                    &summary,
                )
            {
                anyhow::bail!(
                    "the receipt's entry is not this query's (query {}, audit entry {}): do not rely on it",
                    summary.query_id,
                    summary.audit_index
                );
            }
            if !civicgrid_cli::verify::result_matches_entry(&receipt.entry, &ipc) {
                anyhow::bail!(
                    "the result received is not the result audit entry {} records: do not use it",
                    summary.audit_index
                );
            }
            if let Some(path) = &receipt_file {
                std::fs::write(path, serde_json::to_string_pretty(receipt)? + "\n")
                    .with_context(|| format!("--receipt: writing {}", path.display()))?;
            }
        }
        None if receipt_file.is_some() => eprintln!(
            "the server made no receipt now; fetch it later with `civicgrid receipt get --index {}`",
            summary.audit_index
        ),
        None => {}
    }
    if let Some(path) = &result_file {
        std::fs::write(path, &ipc)
            .with_context(|| format!("--result-file: writing {}", path.display()))?;
    }
    print_rows(&ipc, format)?;
    eprintln!(
        "query {} ({}{}): {} rows released{}, {} compute units{}, \
             charged {} of {} held ({} minor units), audit entry {}; key {key}",
        summary.query_id,
        summary.state,
        if summary.replayed { ", replayed" } else { "" },
        summary.rows_released,
        if summary.truncated { ", truncated" } else { "" },
        summary.compute_units,
        if summary.metering == "withheld" {
            " (withheld: the product withholds rows)"
        } else {
            ""
        },
        summary.charge_minor,
        summary.held_minor,
        summary.currency,
        summary.audit_index,
    );
    Ok(0)
}

/// Checks a saved receipt offline; 2 when it does not check out.
fn verify_receipt_file(
    output: Output,
    file: &Path,
    key: &str,
    origin: Option<&str>,
    witness_keys: &[String],
    result: Option<&Path>,
) -> anyhow::Result<i32> {
    let key: NoteVerifier = key.parse().context("--key")?;
    let origin = origin.unwrap_or(key.name()).to_owned();
    let witnesses = witness_keys
        .iter()
        .map(|key| {
            key.parse::<CosignatureVerifier>()
                .with_context(|| format!("--witness-key {key:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let receipt: proto::Receipt = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a receipt", file.display()))?;
    let verified = match civicgrid_cli::verify::verify_receipt(&receipt, &key, &origin, &witnesses)
    {
        Ok(verified) => verified,
        Err(error) => {
            print(
                output,
                &serde_json::json!({ "verified": false, "finding": error.to_string() }),
            )?;
            return Ok(2);
        }
    };
    if let Some(path) = result {
        let bytes =
            std::fs::read(path).with_context(|| format!("--result: reading {}", path.display()))?;
        if !civicgrid_cli::verify::result_matches_entry(&receipt.entry, &bytes) {
            print(
                output,
                &serde_json::json!({
                    "verified": false,
                    "finding": format!("{} is not the result entry {} records", path.display(), verified.index),
                }),
            )?;
            return Ok(2);
        }
    }
    let details = &verified.entry["details"];
    print(
        output,
        &serde_json::json!({
            "verified": true,
            "entry_index": verified.index,
            "tree_size": verified.checkpoint.size,
            "kind": verified.entry["kind"],
            "at_unix_ms": verified.entry["at_unix_ms"],
            "tenant": verified.entry["tenant"],
            "subject": verified.entry["subject"],
            "query": details["query"],
            "product_version": details["product_version"],
            "result_sha256": details["result_sha256"],
            "charge_minor": details["charge_minor"],
            "currency": details["currency"],
            "witnessed_by": verified.cosigned_at.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(","),
        }),
    )?;
    Ok(0)
}

/// Lists queries run.
async fn usage(c: &mut Clients, output: Output, args: UsageArgs) -> anyhow::Result<i32> {
    let UsageArgs {
        product,
        org,
        period,
        limit,
    } = args;
    let usage = c
        .queries
        .list_usage(proto::ListUsageRequest {
            product_id: product,
            organization_id: org,
            period,
            limit,
        })
        .await?
        .into_inner();
    print(output, &usage)?;
    Ok(0)
}

/// The audit log; `verify` exits 2 when the log does not check out.
async fn audit(c: &mut Clients, output: Output, command: AuditCommand) -> anyhow::Result<i32> {
    match command {
        AuditCommand::Checkpoint { save } => {
            let checkpoint = c
                .audit
                .get_checkpoint(proto::GetCheckpointRequest::default())
                .await?
                .into_inner();
            if let Some(path) = save {
                std::fs::write(&path, &checkpoint.note)
                    .with_context(|| format!("--save: writing {}", path.display()))?;
            }
            print(output, &checkpoint)?;
        }
        AuditCommand::Entries {
            start,
            end,
            kind_prefix,
            tenant,
            raw,
        } => {
            let entries = c
                .audit
                .get_entries(proto::GetEntriesRequest {
                    start,
                    end,
                    kind_prefix,
                    tenant,
                })
                .await?
                .into_inner();
            if raw {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                for entry in &entries.entries {
                    // Bodies are compact JSON: no newline inside one.
                    stdout.write_all(&entry.body)?;
                    stdout.write_all(b"\n")?;
                }
                return Ok(0);
            }
            // Bodies are JSON: show them as JSON, not base64.
            let rows: Vec<serde_json::Value> = entries
                .entries
                .iter()
                .map(|entry| {
                    let body: serde_json::Value =
                        serde_json::from_slice(&entry.body).unwrap_or(serde_json::Value::Null);
                    serde_json::json!({
                        "index": entry.index,
                        "at_unix_ms": body["at_unix_ms"],
                        "kind": body["kind"],
                        "actor": body["actor"],
                        "tenant": body["tenant"],
                        "subject": body["subject"],
                        "details": body["details"],
                    })
                })
                .collect();
            print(output, &serde_json::json!({ "entries": rows }))?;
        }
        AuditCommand::Verify {
            key,
            origin,
            checkpoint,
            update,
            witness_keys,
            max_witness_age_secs,
        } => {
            let key: NoteVerifier = key.parse().context("--key")?;
            let witnesses = witness_keys
                .iter()
                .map(|key| {
                    key.parse::<CosignatureVerifier>()
                        .with_context(|| format!("--witness-key {key:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let origin = origin.unwrap_or_else(|| key.name().to_owned());
            let saved = checkpoint
                .as_ref()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .with_context(|| format!("--checkpoint: reading {}", path.display()))
                })
                .transpose()?;
            let report =
                verify_log_witnessed(&mut c.audit, &key, &origin, saved.as_deref(), &witnesses)
                    .await?;
            let mut findings: Vec<String> =
                report.findings.iter().map(ToString::to_string).collect();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs());
            for (witness, time) in &report.cosigned_at {
                // A witness's clock may run a little ahead; far ahead, its
                // timestamp says nothing about when it saw the log.
                if *time > now + 300 {
                    findings.push(format!(
                        "witness {witness} cosigned at {time}, in the future"
                    ));
                }
                let age = now.saturating_sub(*time);
                if max_witness_age_secs.is_some_and(|most| age > most) {
                    findings.push(format!(
                        "witness {witness} last cosigned {age} s ago: the log has not been witnessed since"
                    ));
                }
            }
            if let (Some(most), Some((live, logged_at))) =
                (max_witness_age_secs, report.unwitnessed)
            {
                let logged = u64::try_from(logged_at / 1000).unwrap_or(0);
                if logged > now + 300 {
                    findings.push(format!(
                        "entry {} is dated {logged}, in the future",
                        report.checkpoint.size
                    ));
                }
                let waiting = now.saturating_sub(logged);
                if waiting > most {
                    findings.push(format!(
                        "entries {} to {live} have waited {waiting} s for the witnesses: witnessing has stalled",
                        report.checkpoint.size
                    ));
                }
            }
            print(
                output,
                &serde_json::json!({
                    "verified": findings.is_empty(),
                    "tree_size": report.checkpoint.size,
                    "entries_checked": report.entries_checked,
                    "findings": findings.join("; "),
                    "witnessed_by": report.cosigned_at.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(","),
                    "live_tree_size": report.unwitnessed.map_or(report.checkpoint.size, |(live, _)| live),
                }),
            )?;
            if !findings.is_empty() {
                return Ok(2);
            }
            if update && let Some(path) = checkpoint {
                std::fs::write(&path, &report.note)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(0)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let tls = cli.server.starts_with("https://");
    let presented_certificate = cli.tls_cert.is_some();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            if let Some(status) = error.downcast_ref::<tonic::Status>() {
                eprintln!("error: {:?}: {}", status.code(), status.message());
                // A server that refuses the client's certificate ends the
                // connection after the handshake; the call then fails with
                // no word from the server.
                let cut_off = matches!(
                    status.code(),
                    tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable
                ) && std::error::Error::source(status).is_some();
                if tls && cut_off {
                    eprintln!(
                        "{}",
                        if presented_certificate {
                            "hint: the server closed the connection; it may not trust --tls-cert (signed by a CA it does not accept)"
                        } else {
                            "hint: the server closed the connection; if it asks for a client certificate, pass --tls-cert and --tls-key"
                        }
                    );
                }
            } else {
                eprintln!("error: {error:#}");
            }
            std::process::exit(1);
        }
    }
}
