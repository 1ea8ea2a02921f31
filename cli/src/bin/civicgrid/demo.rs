//! `civicgrid demo`: the whole story against a server `civicgrid up` started:
//! a provider registers a product and the platform approves it, a consumer
//! gets a contract, runs an aggregate query and sees the result and the bill,
//! sees that too-small groups are not shown, and a regulator verifies the
//! audit log.

use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use civicgrid_cli::city;
use civicgrid_cli::verify::{authed_client, verify_log};
use civicgrid_marketplace::audit::checkpoint::NoteVerifier;
use civicgrid_marketplace::proto::{
    self, billing_client::BillingClient, queries_client::QueriesClient,
    registry_client::RegistryClient,
};
use tonic::transport::Channel;

use crate::up::{Credentials, authed, contract, register};

/// Options of `civicgrid demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// The data directory `civicgrid up` uses (for its demo credentials).
    #[arg(long, env = "CIVICGRID_DATA_DIR", default_value = "./civicgrid-data")]
    pub data_dir: PathBuf,
}

async fn query(
    channel: &Channel,
    token: &str,
    product: &str,
    sql: &str,
) -> anyhow::Result<(proto::QuerySummary, Vec<u8>)> {
    let key = format!("demo-{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut stream = QueriesClient::new(channel.clone())
        .run_query(authed(
            token,
            proto::RunQueryRequest {
                product_id: product.into(),
                sql: sql.into(),
                idempotency_key: key,
                ..proto::RunQueryRequest::default()
            },
        ))
        .await?
        .into_inner();
    let mut summary = None;
    let mut ipc = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.message {
            Some(proto::run_query_response::Message::Summary(s)) => summary = Some(s),
            Some(proto::run_query_response::Message::ArrowIpc(bytes)) => ipc.extend(bytes),
            None => {}
        }
    }
    Ok((summary.context("no query summary")?, ipc))
}

fn bill(summary: &proto::QuerySummary) -> String {
    // A product that withholds rows withholds a query's compute too: it
    // would count them.
    let compute = if summary.metering == "withheld" {
        "compute withheld".to_owned()
    } else {
        format!("{} compute units", summary.compute_units)
    };
    let ran_in = if summary.data_center.is_empty() {
        "run by the marketplace".to_owned()
    } else {
        format!("run in {}", summary.data_center)
    };
    format!(
        "{ran_in}; {} rows released, {compute}; held {}.{:02} {cur}, charged {}.{:02} {cur}; audit entry {}",
        summary.rows_released,
        summary.held_minor / 100,
        summary.held_minor % 100,
        summary.charge_minor / 100,
        summary.charge_minor % 100,
        summary.audit_index,
        cur = summary.currency,
    )
}

/// The smallest value of the integer column `column` in an Arrow IPC
/// stream; `None` when it holds no rows.
fn smallest_count(ipc: &[u8], column: &str) -> anyhow::Result<Option<i64>> {
    if ipc.is_empty() {
        return Ok(None);
    }
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
        .context("decoding the result")?;
    let mut smallest = None;
    for batch in reader {
        let batch = batch.context("decoding the result")?;
        let values = batch
            .column_by_name(column)
            .with_context(|| format!("the result has no {column} column"))?
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .with_context(|| format!("{column} is not a 64-bit integer"))?;
        smallest = values.iter().flatten().chain(smallest).min();
    }
    Ok(smallest)
}

/// Runs the story; every step prints what it did.
///
/// # Errors
/// When a step fails or an expectation (no group smaller than the
/// product's threshold, a clean audit log) does not hold.
pub async fn demo(args: DemoArgs, server: Option<String>) -> anyhow::Result<()> {
    let credentials = Credentials::load(&args.data_dir)?;
    let server = server.unwrap_or_else(|| credentials.server.clone());
    let channel = Channel::from_shared(server.clone())
        .with_context(|| format!("{server:?} is not a URL"))?
        .connect()
        .await
        .with_context(|| format!("connecting to {server} (is `civicgrid up` running?)"))?;
    let verifier: NoteVerifier = credentials
        .verifier_key
        .parse()
        .context("the verifier key in the credentials file")?;
    let mut audit = authed_client(channel.clone(), &credentials.regulator)?;

    println!("1. The regulator saves the audit log's current checkpoint.");
    let saved = verify_log(&mut audit, &verifier, &credentials.log_origin, None).await?;
    ensure!(
        saved.findings.is_empty(),
        "the log is not intact: {:?}",
        saved.findings
    );
    println!("   tree size {}, verified", saved.checkpoint.size);

    let product = city::business_licences();
    let id = product.id;
    let exists = RegistryClient::new(channel.clone())
        .get_product(authed(
            &credentials.city_data_admin,
            proto::GetProductRequest {
                product_id: id.into(),
            },
        ))
        .await;
    println!("2. city-data registers {id}; the platform approves it after public notice.");
    match exists {
        Ok(existing) => println!(
            "   registered already ({}), state {:?}",
            existing.get_ref().registration_number,
            existing.get_ref().state()
        ),
        Err(status) if status.code() == tonic::Code::NotFound => {
            let number = register(
                &channel,
                &credentials.city_data_admin,
                &credentials.platform_admin,
                product,
            )
            .await?;
            println!("   registration number {number}, published");
            println!("3. acme-mobility asks for a contract; city-data approves it.");
            let contract_id = contract(
                &channel,
                &credentials.acme_admin,
                &credentials.city_data_admin,
                id,
                "per-query",
                "where to open delivery hubs",
            )
            .await?;
            println!("   contract {contract_id} active");
        }
        Err(status) => return Err(status.into()),
    }

    println!("4. acme-mobility's analyst runs an aggregate query next to the data.");
    let sql = "SELECT sector, COUNT(*) AS licences, SUM(employees) AS employees \
               FROM licences WHERE status = 'active' GROUP BY sector ORDER BY licences DESC";
    println!("   {sql}");
    let (summary, ipc) = query(&channel, &credentials.acme_analyst, id, sql).await?;
    crate::print_rows(&ipc, crate::RowFormat::Table)?;
    println!("   {}", bill(&summary));

    println!("5. A finer query: groups of fewer than 5 licences are not shown.");
    let fine = "SELECT district, sector, COUNT(*) AS licences FROM licences \
                WHERE status = 'suspended' GROUP BY district, sector";
    println!("   {fine}");
    let (fine_summary, fine_ipc) = query(&channel, &credentials.acme_analyst, id, fine).await?;
    let smallest = smallest_count(&fine_ipc, "licences")?;
    ensure!(
        smallest.is_none_or(|smallest| smallest >= 5),
        "a group of {smallest:?} licences was released"
    );
    println!("   {}", bill(&fine_summary));

    println!("6. acme-mobility's balance and this month's invoice.");
    let mut billing = BillingClient::new(channel.clone());
    for balance in billing
        .get_balance(authed(
            &credentials.acme_admin,
            proto::GetBalanceRequest::default(),
        ))
        .await?
        .into_inner()
        .balances
    {
        println!(
            "   balance {}.{:02} {}",
            balance.balance_minor / 100,
            balance.balance_minor % 100,
            balance.currency
        );
    }
    let period = civicgrid_marketplace::billing::period_of(civicgrid_marketplace::store::now_ms());
    let invoice = billing
        .get_invoice(authed(
            &credentials.acme_admin,
            proto::GetInvoiceRequest {
                organization_id: String::new(),
                period: period.clone(),
            },
        ))
        .await?
        .into_inner();
    for line in &invoice.lines {
        println!(
            "   {period} {:18} {:>4} queries {:>6}.{:02} {}",
            line.product_id,
            line.queries,
            line.amount_minor / 100,
            line.amount_minor % 100,
            line.currency
        );
    }

    println!("7. The regulator verifies the log against the checkpoint saved in step 1.");
    let report = verify_log(
        &mut audit,
        &verifier,
        &credentials.log_origin,
        Some(&saved.note),
    )
    .await?;
    ensure!(
        report.findings.is_empty(),
        "the audit log was tampered with: {:?}",
        report.findings
    );
    println!(
        "   intact: tree size {} → {}, {} entries checked, the queries above at entries {} and {}",
        saved.checkpoint.size,
        report.checkpoint.size,
        report.entries_checked,
        summary.audit_index,
        fine_summary.audit_index
    );
    Ok(())
}
