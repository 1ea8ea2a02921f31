//! TPC-H data, generated in-process with the `tpchgen` crates and written as
//! Parquet, and the TPC-H queries the sandbox is checked against.

use std::fs::File;
use std::path::Path;

use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

/// The eight TPC-H tables.
pub const TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

const BATCH: usize = 64 * 1024;

fn write(
    dir: &Path,
    table: &str,
    batches: impl Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>>,
) -> std::io::Result<()> {
    let mut batches = batches.peekable();
    let schema = match batches.peek() {
        Some(Ok(first)) => first.schema(),
        Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
        None => return Ok(()),
    };
    let file = File::create(dir.join(format!("{table}.parquet")))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema, Some(properties)).map_err(std::io::Error::other)?;
    for batch in batches {
        writer
            .write(&batch.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    writer.close().map_err(std::io::Error::other)?;
    Ok(())
}

/// Writes all eight tables at `scale_factor` into `dir` as `<table>.parquet`.
pub fn write_parquet(dir: &Path, scale_factor: f64) -> std::io::Result<()> {
    let sf = scale_factor;
    write(
        dir,
        "lineitem",
        LineItemArrow::new(LineItemGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "orders",
        OrderArrow::new(OrderGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "customer",
        CustomerArrow::new(CustomerGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "part",
        PartArrow::new(PartGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "partsupp",
        PartSuppArrow::new(PartSuppGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "supplier",
        SupplierArrow::new(SupplierGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "nation",
        NationArrow::new(NationGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    write(
        dir,
        "region",
        RegionArrow::new(RegionGenerator::new(sf, 1, 1)).with_batch_size(BATCH),
    )?;
    Ok(())
}

/// TPC-H queries with the specification's validation parameters.
pub const QUERIES: [(&str, &str); 7] = [
    ("q1", Q1),
    ("q3", Q3),
    ("q5", Q5),
    ("q6", Q6),
    ("q10", Q10),
    ("q12", Q12),
    ("q14", Q14),
];

/// Pricing summary report.
pub const Q1: &str = "select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty,
    sum(l_extendedprice) as sum_base_price,
    sum(l_extendedprice * (1 - l_discount)) as sum_disc_price,
    sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) as sum_charge,
    avg(l_quantity) as avg_qty, avg(l_extendedprice) as avg_price, avg(l_discount) as avg_disc,
    count(*) as count_order
from lineitem
where l_shipdate <= date '1998-12-01' - interval '90' day
group by l_returnflag, l_linestatus
order by l_returnflag, l_linestatus";

/// Shipping priority.
pub const Q3: &str = "select l_orderkey, sum(l_extendedprice * (1 - l_discount)) as revenue,
    o_orderdate, o_shippriority
from customer, orders, lineitem
where c_mktsegment = 'BUILDING' and c_custkey = o_custkey and l_orderkey = o_orderkey
    and o_orderdate < date '1995-03-15' and l_shipdate > date '1995-03-15'
group by l_orderkey, o_orderdate, o_shippriority
order by revenue desc, o_orderdate, l_orderkey
limit 10";

/// Local supplier volume.
pub const Q5: &str = "select n_name, sum(l_extendedprice * (1 - l_discount)) as revenue
from customer, orders, lineitem, supplier, nation, region
where c_custkey = o_custkey and l_orderkey = o_orderkey and l_suppkey = s_suppkey
    and c_nationkey = s_nationkey and s_nationkey = n_nationkey and n_regionkey = r_regionkey
    and r_name = 'ASIA' and o_orderdate >= date '1994-01-01'
    and o_orderdate < date '1994-01-01' + interval '1' year
group by n_name
order by revenue desc";

/// Forecasting revenue change.
pub const Q6: &str = "select sum(l_extendedprice * l_discount) as revenue
from lineitem
where l_shipdate >= date '1994-01-01' and l_shipdate < date '1994-01-01' + interval '1' year
    and l_discount between 0.06 - 0.01 and 0.06 + 0.01 and l_quantity < 24";

/// Returned item reporting.
pub const Q10: &str =
    "select c_custkey, c_name, sum(l_extendedprice * (1 - l_discount)) as revenue,
    c_acctbal, n_name, c_address, c_phone, c_comment
from customer, orders, lineitem, nation
where c_custkey = o_custkey and l_orderkey = o_orderkey
    and o_orderdate >= date '1993-10-01' and o_orderdate < date '1993-10-01' + interval '3' month
    and l_returnflag = 'R' and c_nationkey = n_nationkey
group by c_custkey, c_name, c_acctbal, c_phone, n_name, c_address, c_comment
order by revenue desc, c_custkey
limit 20";

/// Shipping modes and order priority.
pub const Q12: &str = "select l_shipmode,
    sum(case when o_orderpriority = '1-URGENT' or o_orderpriority = '2-HIGH' then 1 else 0 end) as high_line_count,
    sum(case when o_orderpriority <> '1-URGENT' and o_orderpriority <> '2-HIGH' then 1 else 0 end) as low_line_count
from orders, lineitem
where o_orderkey = l_orderkey and l_shipmode in ('MAIL', 'SHIP')
    and l_commitdate < l_receiptdate and l_shipdate < l_commitdate
    and l_receiptdate >= date '1994-01-01' and l_receiptdate < date '1994-01-01' + interval '1' year
group by l_shipmode
order by l_shipmode";

/// Promotion effect.
pub const Q14: &str = "select 100.00 * sum(case when p_type like 'PROMO%'
        then l_extendedprice * (1 - l_discount) else 0 end)
    / sum(l_extendedprice * (1 - l_discount)) as promo_revenue
from lineitem, part
where l_partkey = p_partkey and l_shipdate >= date '1995-09-01'
    and l_shipdate < date '1995-09-01' + interval '1' month";
