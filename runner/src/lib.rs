//! `civicgrid-runner`: the sandbox next to a data center's product data.
//! The marketplace authorizes, holds, bills and audits a query, then asks a
//! runner in a data center hosting the product to run it; the runner reads
//! the product's files from its own store, runs the query in wasmtime under
//! the product's output policy, and returns only the released result and
//! the run's metering. It serves the marketplace alone, over mutual TLS.

pub mod heartbeat;
pub mod metrics;
pub mod service;
pub mod staging;
pub mod storage;
pub mod uploads;
pub mod wire;

/// The generated runner API, server and client.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("civicgrid.runner.v1");
}

pub use heartbeat::{Heartbeat, MARKETPLACE_NAME, certificate_name, certificate_names};
pub use metrics::Metrics;
pub use service::{Ceilings, RunnerService, mutual_tls, serve};
pub use storage::ProductStore;
