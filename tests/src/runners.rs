//! Runners for tests and benchmarks: the embedded default's in-process
//! runners ([`civicgrid_cli::local_runners`]) over a test marketplace.

use std::path::Path;
use std::time::Duration;

pub use civicgrid_cli::local_runners::{Authority, LocalRunners as Routed};
use civicgrid_runner::{Ceilings, ProductStore};

use crate::market::TestMarket;

/// Routes `market`'s queries to `count` runners for `data_center` over
/// `data_dir`, sharing the tests' module cache, and waits until they have
/// reported.
///
/// # Errors
/// As [`civicgrid_cli::local_runners::start`].
pub async fn route(
    market: &TestMarket,
    data_center: &str,
    data_dir: &Path,
    count: usize,
) -> anyhow::Result<Routed> {
    route_to(market, data_center, data_dir.to_owned().into(), count).await
}

/// As [`route`], over `products` (a directory or an object store).
///
/// # Errors
/// As [`civicgrid_cli::local_runners::start`].
pub async fn route_to(
    market: &TestMarket,
    data_center: &str,
    products: ProductStore,
    count: usize,
) -> anyhow::Result<Routed> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sandbox-cache");
    let mut sandbox = civicgrid_sandbox::SandboxConfig::new(cache);
    sandbox.max_concurrent_runs = 64;
    civicgrid_cli::local_runners::start(
        &market.market,
        civicgrid_cli::local_runners::Setup {
            data_center: data_center.to_owned(),
            products,
            sql_guest: crate::sandbox::sql_guest(),
            sandbox,
            ceilings: Ceilings {
                memory_bytes: 4 << 30,
                wall_time: Duration::from_secs(3_600),
            },
            runners: count,
            heartbeat: Duration::from_secs(1),
        },
    )
    .await
}
