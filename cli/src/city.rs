//! The sample city `civicgrid up` serves: deterministic public-data products
//! at a realistic size (hotline tickets, bus ridership, air quality, business
//! licences) and a TPC-H "commerce" product from `tpchgen`, with providers, a
//! consumer with contracts and funds, and a regulator.
//!
//! The same seed always writes the same files, so the demo's figures are
//! reproducible.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use civicgrid_marketplace::error::{MarketError, Result};
use civicgrid_marketplace::proto::{
    Column, OutputPolicy, PriceKind, PricePlan, ProductSpec, QualityMetrics, Sensitivity, Table,
};

/// The city's districts, shared with the server's sample population.
pub use civicgrid_marketplace::quality::DISTRICTS;

/// Rows written per product (TPC-H aside, whose size is its scale factor).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Hotline tickets.
    pub hotline_tickets: usize,
    /// Bus boardings.
    pub bus_boardings: usize,
    /// Days of hourly air-quality readings from 20 stations.
    pub air_quality_days: usize,
    /// Business licences.
    pub business_licences: usize,
    /// TPC-H scale factor of the commerce product.
    pub tpch_scale: f64,
}

impl Sizes {
    /// A year of a mid-sized city's data, and TPC-H SF 0.1.
    pub const CITY: Self = Self {
        hotline_tickets: 250_000,
        bus_boardings: 400_000,
        air_quality_days: 365,
        business_licences: 40_000,
        tpch_scale: 0.1,
    };

    /// Small, for tests.
    pub const SMALL: Self = Self {
        hotline_tickets: 5_000,
        bus_boardings: 5_000,
        air_quality_days: 7,
        business_licences: 2_000,
        tpch_scale: 0.001,
    };
}

fn io_error(dir: &Path) -> impl Fn(std::io::Error) -> MarketError + '_ {
    move |source| MarketError::Io {
        context: format!("writing sample data to {}", dir.display()),
        source,
    }
}

fn arrow_error(error: impl std::fmt::Display) -> MarketError {
    MarketError::Corrupt(format!("sample data: {error}"))
}

/// Writes batches as `<dir>/<table>.parquet` (written beside and renamed, so
/// a half-written file is never served).
fn write_table(
    dir: &Path,
    table: &str,
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut batches = batches.peekable();
    let schema = match batches.peek() {
        Some(Ok(first)) => first.schema(),
        Some(Err(error)) => return Err(arrow_error(error)),
        None => return Ok(()),
    };
    let partial = dir.join(format!(".{table}.parquet.partial"));
    let file = File::create(&partial).map_err(io_error(dir))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties)).map_err(arrow_error)?;
    for batch in batches {
        writer
            .write(&batch.map_err(arrow_error)?)
            .map_err(arrow_error)?;
    }
    writer.close().map_err(arrow_error)?;
    std::fs::rename(&partial, dir.join(format!("{table}.parquet"))).map_err(io_error(dir))?;
    Ok(())
}

fn one_batch(fields: Vec<Field>, columns: Vec<arrow_array::ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(arrow_error)
}

/// 2026-01-01 as days since the Unix epoch.
const YEAR_START: i32 = 20_454;

/// Citizens' hotline tickets: who called (blocked), where, about what, how
/// fast it was resolved.
pub fn write_hotline_tickets(dir: &Path, rows: usize) -> Result<()> {
    const CATEGORIES: [&str; 10] = [
        "noise",
        "potholes",
        "street-lighting",
        "waste-collection",
        "water",
        "public-transport",
        "parks",
        "graffiti",
        "heating",
        "other",
    ];
    const CHANNELS: [&str; 4] = ["phone", "app", "web", "walk-in"];
    let mut rng = ChaCha8Rng::seed_from_u64(0x0401_111e);
    let callers = (rows / 2).max(1) as i64;
    let mut ticket = Vec::with_capacity(rows);
    let mut caller = Vec::with_capacity(rows);
    let mut district = Vec::with_capacity(rows);
    let mut category = Vec::with_capacity(rows);
    let mut channel = Vec::with_capacity(rows);
    let mut opened = Vec::with_capacity(rows);
    let mut hours = Vec::with_capacity(rows);
    for i in 0..rows {
        let who = rng.gen_range(0..callers);
        ticket.push(1_000_000 + i as i64);
        caller.push(5_000_000 + who);
        // A caller lives somewhere: the district follows the caller.
        district.push(DISTRICTS[(who as usize * 7) % DISTRICTS.len()]);
        // Skewed: noise and potholes dominate, heating is rare.
        let c = (rng.gen_range(0.0_f64..1.0).powi(2) * CATEGORIES.len() as f64) as usize;
        category.push(CATEGORIES[c.min(CATEGORIES.len() - 1)]);
        channel.push(CHANNELS[rng.gen_range(0..CHANNELS.len())]);
        opened.push(YEAR_START + rng.gen_range(0..365));
        hours.push((rng.gen_range(0.5_f64..240.0) * 10.0).round() / 10.0);
    }
    let batch = one_batch(
        vec![
            Field::new("ticket_id", DataType::Int64, false),
            Field::new("caller_id", DataType::Int64, false),
            Field::new("district", DataType::Utf8, false),
            Field::new("category", DataType::Utf8, false),
            Field::new("channel", DataType::Utf8, false),
            Field::new("opened_on", DataType::Date32, false),
            Field::new("hours_to_resolve", DataType::Float64, false),
        ],
        vec![
            Arc::new(Int64Array::from(ticket)),
            Arc::new(Int64Array::from(caller)),
            Arc::new(StringArray::from(district)),
            Arc::new(StringArray::from(category)),
            Arc::new(StringArray::from(channel)),
            Arc::new(Date32Array::from(opened)),
            Arc::new(Float64Array::from(hours)),
        ],
    )?;
    write_table(dir, "tickets", std::iter::once(Ok(batch)))
}

/// Bus boardings: a smart card (blocked), route, stop, day, hour and fare.
pub fn write_bus_ridership(dir: &Path, rows: usize) -> Result<()> {
    const FARES: [&str; 4] = ["adult", "student", "senior", "reduced"];
    let mut rng = ChaCha8Rng::seed_from_u64(0xb05);
    let cards = (rows / 8).max(1) as i64;
    let mut card = Vec::with_capacity(rows);
    let mut route = Vec::with_capacity(rows);
    let mut stop = Vec::with_capacity(rows);
    let mut day = Vec::with_capacity(rows);
    let mut hour = Vec::with_capacity(rows);
    let mut fare = Vec::with_capacity(rows);
    let routes: Vec<String> = (1..=40).map(|r| format!("R{r:02}")).collect();
    for _ in 0..rows {
        let who = rng.gen_range(0..cards);
        card.push(9_000_000 + who);
        // Commuters ride their own route.
        let r = if rng.gen_bool(0.7) {
            (who as usize * 13) % routes.len()
        } else {
            rng.gen_range(0..routes.len())
        };
        route.push(routes[r].clone());
        stop.push(i32::try_from(r * 100).unwrap_or(0) + rng.gen_range(1..30));
        day.push(YEAR_START + rng.gen_range(0..365));
        // Two rush hours.
        let h = if rng.gen_bool(0.6) {
            if rng.gen_bool(0.5) {
                rng.gen_range(7..10)
            } else {
                rng.gen_range(16..19)
            }
        } else {
            rng.gen_range(5..24)
        };
        hour.push(h);
        fare.push(FARES[(who as usize) % FARES.len()]);
    }
    let batch = one_batch(
        vec![
            Field::new("card_id", DataType::Int64, false),
            Field::new("route", DataType::Utf8, false),
            Field::new("stop_id", DataType::Int32, false),
            Field::new("service_date", DataType::Date32, false),
            Field::new("hour", DataType::Int32, false),
            Field::new("fare_type", DataType::Utf8, false),
        ],
        vec![
            Arc::new(Int64Array::from(card)),
            Arc::new(StringArray::from(route)),
            Arc::new(Int32Array::from(stop)),
            Arc::new(Date32Array::from(day)),
            Arc::new(Int32Array::from(hour)),
            Arc::new(StringArray::from(fare)),
        ],
    )?;
    write_table(dir, "boardings", std::iter::once(Ok(batch)))
}

/// Hourly readings from 20 air-quality stations (no personal data).
pub fn write_air_quality(dir: &Path, days: usize) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0xa1e);
    let rows = days * 24 * 20;
    let mut station = Vec::with_capacity(rows);
    let mut district = Vec::with_capacity(rows);
    let mut day = Vec::with_capacity(rows);
    let mut hour = Vec::with_capacity(rows);
    let mut pm25 = Vec::with_capacity(rows);
    let mut no2 = Vec::with_capacity(rows);
    let mut o3 = Vec::with_capacity(rows);
    let mut valid = Vec::with_capacity(rows);
    for d in 0..days {
        for h in 0..24 {
            for s in 0..20 {
                station.push(format!("AQ{s:02}"));
                district.push(DISTRICTS[s % DISTRICTS.len()]);
                day.push(YEAR_START + i32::try_from(d).unwrap_or(0));
                hour.push(h);
                let traffic = if (7..10).contains(&h) || (16..19).contains(&h) {
                    1.6
                } else {
                    1.0
                };
                let base = 8.0 + (s % 5) as f64 * 2.0;
                pm25.push((base * traffic * rng.gen_range(0.6..1.4) * 10.0_f64).round() / 10.0);
                no2.push(
                    (base * 2.5 * traffic * rng.gen_range(0.6..1.4) * 10.0_f64).round() / 10.0,
                );
                o3.push((60.0 / traffic * rng.gen_range(0.7..1.3) * 10.0_f64).round() / 10.0);
                valid.push(rng.gen_bool(0.995));
            }
        }
    }
    let batch = one_batch(
        vec![
            Field::new("station", DataType::Utf8, false),
            Field::new("district", DataType::Utf8, false),
            Field::new("measured_on", DataType::Date32, false),
            Field::new("hour", DataType::Int32, false),
            Field::new("pm25", DataType::Float64, false),
            Field::new("no2", DataType::Float64, false),
            Field::new("o3", DataType::Float64, false),
            Field::new("valid", DataType::Boolean, false),
        ],
        vec![
            Arc::new(StringArray::from(station)),
            Arc::new(StringArray::from(district)),
            Arc::new(Date32Array::from(day)),
            Arc::new(Int32Array::from(hour)),
            Arc::new(Float64Array::from(pm25)),
            Arc::new(Float64Array::from(no2)),
            Arc::new(Float64Array::from(o3)),
            Arc::new(BooleanArray::from(valid)),
        ],
    )?;
    write_table(dir, "readings", std::iter::once(Ok(batch)))
}

/// Business licences: the licence (privacy unit), where, which sector, when,
/// its state and head count.
pub fn write_business_licences(dir: &Path, rows: usize) -> Result<()> {
    const SECTORS: [&str; 8] = [
        "retail",
        "food-service",
        "construction",
        "logistics",
        "software",
        "health",
        "manufacturing",
        "tourism",
    ];
    const STATES: [&str; 3] = ["active", "suspended", "expired"];
    let mut rng = ChaCha8Rng::seed_from_u64(0x11ce);
    let mut licence = Vec::with_capacity(rows);
    let mut district = Vec::with_capacity(rows);
    let mut sector = Vec::with_capacity(rows);
    let mut issued = Vec::with_capacity(rows);
    let mut status = Vec::with_capacity(rows);
    let mut employees = Vec::with_capacity(rows);
    for i in 0..rows {
        licence.push(200_000 + i as i64);
        district.push(DISTRICTS[rng.gen_range(0..DISTRICTS.len())]);
        let s = (rng.gen_range(0.0_f64..1.0).powf(1.5) * SECTORS.len() as f64) as usize;
        sector.push(SECTORS[s.min(SECTORS.len() - 1)]);
        issued.push(YEAR_START - rng.gen_range(0..3650));
        // Suspensions are rare, so many (district, sector) groups have few.
        let state = match rng.gen_range(0..100) {
            0..=1 => 1,
            2..=14 => 2,
            _ => 0,
        };
        status.push(STATES[state]);
        employees.push(1 + (rng.gen_range(0.0_f64..1.0).powi(4) * 500.0) as i32);
    }
    let batch = one_batch(
        vec![
            Field::new("licence_id", DataType::Int64, false),
            Field::new("district", DataType::Utf8, false),
            Field::new("sector", DataType::Utf8, false),
            Field::new("issued_on", DataType::Date32, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("employees", DataType::Int32, false),
        ],
        vec![
            Arc::new(Int64Array::from(licence)),
            Arc::new(StringArray::from(district)),
            Arc::new(StringArray::from(sector)),
            Arc::new(Date32Array::from(issued)),
            Arc::new(StringArray::from(status)),
            Arc::new(Int32Array::from(employees)),
        ],
    )?;
    write_table(dir, "licences", std::iter::once(Ok(batch)))
}

/// The eight TPC-H tables at `scale_factor`, generated by `tpchgen`.
pub fn write_tpch(dir: &Path, scale_factor: f64) -> Result<()> {
    use tpchgen::generators::{
        CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
        PartSuppGenerator, RegionGenerator, SupplierGenerator,
    };
    use tpchgen_arrow::{
        CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow,
        RegionArrow, SupplierArrow,
    };
    const BATCH: usize = 64 * 1024;
    let sf = scale_factor;
    write_table(
        dir,
        "lineitem",
        LineItemArrow::new(LineItemGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "orders",
        OrderArrow::new(OrderGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "customer",
        CustomerArrow::new(CustomerGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "part",
        PartArrow::new(PartGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "partsupp",
        PartSuppArrow::new(PartSuppGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "supplier",
        SupplierArrow::new(SupplierGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "nation",
        NationArrow::new(NationGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write_table(
        dir,
        "region",
        RegionArrow::new(RegionGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )
}

fn column(name: &str, kind: &str, sensitivity: Sensitivity, description: &str) -> Column {
    Column {
        name: name.into(),
        r#type: kind.into(),
        sensitivity: sensitivity as i32,
        description: description.into(),
    }
}

fn per_query(id: &str, cents: i64, included: i64) -> PricePlan {
    PricePlan {
        id: id.into(),
        kind: PriceKind::PerQuery as i32,
        unit_price_minor: cents,
        included_units: included,
        currency: "EUR".into(),
        ..PricePlan::default()
    }
}

/// The data center the sample city keeps every product in; `civicgrid up`
/// runs one runner for it over the local data directory.
pub const DATA_CENTER: &str = "municipal-core";

fn base_spec(title: &str, description: &str, keywords: &[&str], location: &str) -> ProductSpec {
    ProductSpec {
        title: title.into(),
        description: description.into(),
        keywords: keywords.iter().map(|k| (*k).to_owned()).collect(),
        licence: "CC-BY-4.0".into(),
        update_frequency: "daily".into(),
        hosting_data_centers: vec![DATA_CENTER.into()],
        tier: "municipal".into(),
        region: "city".into(),
        storage_location: location.into(),
        quality: Some(QualityMetrics::default()),
        ..ProductSpec::default()
    }
}

/// A product of the sample city: its id, provider, spec, and how its files
/// are written.
pub struct SampleProduct {
    /// Product id.
    pub id: &'static str,
    /// Provider organization.
    pub provider: &'static str,
    /// The registration spec.
    pub spec: ProductSpec,
}

/// The hotline tickets product.
#[must_use]
pub fn hotline_tickets() -> SampleProduct {
    use Sensitivity::{Blocked, Internal, Public};
    let mut spec = base_spec(
        "Citizens' hotline tickets",
        "Every ticket raised with the city's 12345 hotline: district, category, channel, \
         day opened and hours to resolve. Callers are counted, never shown.",
        &["hotline", "complaints", "service-requests"],
        "products/hotline-tickets",
    );
    spec.tables = vec![Table {
        name: "tickets".into(),
        columns: vec![
            column("ticket_id", "int64", Internal, "ticket number"),
            column("caller_id", "int64", Blocked, "pseudonymous caller"),
            column("district", "utf8", Public, "district of the caller"),
            column("category", "utf8", Public, "what the ticket is about"),
            column("channel", "utf8", Public, "phone, app, web or walk-in"),
            column("opened_on", "date32", Public, "day the ticket was opened"),
            column(
                "hours_to_resolve",
                "float64",
                Internal,
                "hours until resolved",
            ),
        ],
    }];
    spec.output_policy = Some(OutputPolicy {
        min_aggregation_count: 10,
        privacy_unit_column: "caller_id".into(),
        list_columns: vec!["district".into(), "category".into(), "opened_on".into()],
        max_list_rows: 1_000,
        max_result_bytes: 16 << 20,
        ..OutputPolicy::default()
    });
    spec.price_plans = vec![per_query("per-query", 50, 20)];
    SampleProduct {
        id: "hotline-tickets",
        provider: "city-data",
        spec,
    }
}

/// The bus ridership product.
#[must_use]
pub fn bus_ridership() -> SampleProduct {
    use Sensitivity::{Blocked, Public};
    let mut spec = base_spec(
        "Bus boardings",
        "Smart-card boardings on the city's 40 bus routes: route, stop, day, hour and fare \
         type. Cards are counted, never shown.",
        &["transport", "bus", "ridership", "mobility"],
        "products/bus-ridership",
    );
    spec.tables = vec![Table {
        name: "boardings".into(),
        columns: vec![
            column("card_id", "int64", Blocked, "pseudonymous smart card"),
            column("route", "utf8", Public, "route, R01–R40"),
            column("stop_id", "int32", Public, "stop"),
            column("service_date", "date32", Public, "day"),
            column("hour", "int32", Public, "hour of boarding"),
            column(
                "fare_type",
                "utf8",
                Public,
                "adult, student, senior or reduced",
            ),
        ],
    }];
    spec.output_policy = Some(OutputPolicy {
        min_aggregation_count: 20,
        privacy_unit_column: "card_id".into(),
        max_result_bytes: 16 << 20,
        ..OutputPolicy::default()
    });
    // Not by compute: under a threshold, a query's compute would count the
    // riders it filtered (the registry refuses such a plan).
    spec.price_plans = vec![PricePlan {
        id: "per-query".into(),
        kind: PriceKind::PerQuery as i32,
        unit_price_minor: 20,
        included_units: 50,
        currency: "EUR".into(),
        ..PricePlan::default()
    }];
    SampleProduct {
        id: "bus-ridership",
        provider: "transit-authority",
        spec,
    }
}

/// The air quality product.
#[must_use]
pub fn air_quality() -> SampleProduct {
    use Sensitivity::Public;
    let mut spec = base_spec(
        "Air quality, hourly",
        "Hourly PM2.5, NO2 and O3 from 20 monitoring stations.",
        &["air", "environment", "pollution"],
        "products/air-quality",
    );
    spec.tier = "edge".into();
    spec.tables = vec![Table {
        name: "readings".into(),
        columns: vec![
            column("station", "utf8", Public, "station"),
            column("district", "utf8", Public, "district"),
            column("measured_on", "date32", Public, "day"),
            column("hour", "int32", Public, "hour"),
            column("pm25", "float64", Public, "µg/m³"),
            column("no2", "float64", Public, "µg/m³"),
            column("o3", "float64", Public, "µg/m³"),
            column("valid", "boolean", Public, "passed the station's checks"),
        ],
    }];
    let all: Vec<String> = spec.tables[0]
        .columns
        .iter()
        .map(|c| c.name.clone())
        .collect();
    spec.output_policy = Some(OutputPolicy {
        min_aggregation_count: 1,
        list_columns: all,
        max_list_rows: 10_000,
        max_result_bytes: 32 << 20,
        ..OutputPolicy::default()
    });
    spec.price_plans = vec![PricePlan {
        id: "free".into(),
        kind: PriceKind::Free as i32,
        currency: "EUR".into(),
        ..PricePlan::default()
    }];
    SampleProduct {
        id: "air-quality",
        provider: "city-data",
        spec,
    }
}

/// The business licences product (the demo registers it).
#[must_use]
pub fn business_licences() -> SampleProduct {
    use Sensitivity::{Internal, Public};
    let mut spec = base_spec(
        "Business licences",
        "Licences issued by the city: district, sector, day issued, status and head count.",
        &["business", "licences", "economy"],
        "products/business-licences",
    );
    spec.update_frequency = "monthly".into();
    spec.tables = vec![Table {
        name: "licences".into(),
        columns: vec![
            column("licence_id", "int64", Internal, "licence number"),
            column("district", "utf8", Public, "district"),
            column("sector", "utf8", Public, "sector"),
            column("issued_on", "date32", Public, "day issued"),
            column("status", "utf8", Public, "active, suspended or expired"),
            column("employees", "int32", Internal, "head count"),
        ],
    }];
    spec.output_policy = Some(OutputPolicy {
        min_aggregation_count: 5,
        privacy_unit_column: "licence_id".into(),
        max_result_bytes: 16 << 20,
        ..OutputPolicy::default()
    });
    spec.price_plans = vec![per_query("per-query", 100, 0)];
    SampleProduct {
        id: "business-licences",
        provider: "city-data",
        spec,
    }
}

/// The TPC-H commerce product.
#[must_use]
pub fn commerce() -> SampleProduct {
    use Sensitivity::{Internal, Public};
    let mut spec = base_spec(
        "Commerce (TPC-H)",
        "The TPC-H benchmark's orders, line items, customers, parts and suppliers, as a \
         stand-in for the chamber of commerce's trade data.",
        &["commerce", "trade", "tpch"],
        "products/commerce",
    );
    spec.tier = "partner".into();
    let table = |name: &str, columns: &[(&str, &str)]| Table {
        name: name.into(),
        columns: columns
            .iter()
            .map(|(n, t)| column(n, t, Public, ""))
            .collect(),
    };
    spec.tables = vec![
        table(
            "lineitem",
            &[
                ("l_orderkey", "int64"),
                ("l_quantity", "decimal(15,2)"),
                ("l_extendedprice", "decimal(15,2)"),
                ("l_discount", "decimal(15,2)"),
                ("l_returnflag", "utf8"),
                ("l_linestatus", "utf8"),
                ("l_shipdate", "date32"),
            ],
        ),
        table(
            "orders",
            &[
                ("o_orderkey", "int64"),
                ("o_custkey", "int64"),
                ("o_totalprice", "decimal(15,2)"),
                ("o_orderdate", "date32"),
            ],
        ),
        table(
            "customer",
            &[
                ("c_custkey", "int64"),
                ("c_mktsegment", "utf8"),
                ("c_nationkey", "int64"),
            ],
        ),
    ];
    spec.tables[2].columns[0].sensitivity = Internal as i32;
    spec.output_policy = Some(OutputPolicy {
        min_aggregation_count: 1,
        max_result_bytes: 16 << 20,
        ..OutputPolicy::default()
    });
    spec.price_plans = vec![PricePlan {
        id: "per-compute-unit".into(),
        kind: PriceKind::PerComputeUnit as i32,
        unit_price_minor: 1,
        included_units: 0,
        currency: "EUR".into(),
        ..PricePlan::default()
    }];
    SampleProduct {
        id: "commerce",
        provider: "chamber-of-commerce",
        spec,
    }
}

/// Writes every product's files under `data_dir/products/<id>`.
///
/// # Errors
/// I/O failures.
pub fn write_all(data_dir: &Path, sizes: Sizes) -> Result<()> {
    let products = data_dir.join("products");
    write_hotline_tickets(&products.join("hotline-tickets"), sizes.hotline_tickets)?;
    write_bus_ridership(&products.join("bus-ridership"), sizes.bus_boardings)?;
    write_air_quality(&products.join("air-quality"), sizes.air_quality_days)?;
    write_business_licences(&products.join("business-licences"), sizes.business_licences)?;
    write_tpch(&products.join("commerce"), sizes.tpch_scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_writes_the_same_bytes() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        write_hotline_tickets(first.path(), 2_000).unwrap();
        write_hotline_tickets(second.path(), 2_000).unwrap();
        let read = |dir: &Path| std::fs::read(dir.join("tickets.parquet")).unwrap();
        assert_eq!(read(first.path()), read(second.path()));
    }

    #[test]
    fn every_sample_spec_is_valid_and_matches_its_files() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path(), Sizes::SMALL).unwrap();
        for product in [
            hotline_tickets(),
            bus_ridership(),
            air_quality(),
            business_licences(),
            commerce(),
        ] {
            civicgrid_marketplace::registry::validate_spec(&product.spec)
                .unwrap_or_else(|e| panic!("{}: {e}", product.id));
            let files = dir.path().join("products").join(product.id);
            for table in &product.spec.tables {
                let path = files.join(format!("{}.parquet", table.name));
                let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let schema =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                        .unwrap()
                        .schema()
                        .clone();
                for column in &table.columns {
                    assert!(
                        schema.field_with_name(&column.name).is_ok(),
                        "{}.{}: declared but not in the file",
                        table.name,
                        column.name
                    );
                }
            }
        }
    }
}
