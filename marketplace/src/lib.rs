//! The CivicGrid marketplace: providers register public-data products and get
//! them approved with a registration record, enterprises find them and get
//! authorized under contracts, and every authorization and change lands in a
//! tamper-evident audit log that regulators verify on their own.
//!
//! The server is [`grpc::serve`]; the `civicgrid` CLI (crate `civicgrid-cli`)
//! is a client of the same gRPC API (`proto/civicgrid/marketplace/v1/marketplace.proto`).

pub mod access;
pub mod audit;
pub mod billing;
pub mod contracts;
pub mod dcat;
pub mod demand;
pub mod error;
pub mod feedback;
pub mod grpc;
pub mod identity;
pub mod market;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod quality;
pub mod queries;
pub mod registry;
pub mod store;
pub mod versions;

/// The generated gRPC types and clients, with the documents they carry.
pub mod proto {
    pub use crate::generated::civicgrid::marketplace::v1::*;
    pub use crate::spec::*;

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/marketplace_descriptor.bin"));
}

/// The documents the marketplace stores and commits to, generated from
/// `proto/civicgrid/product/v1/product.proto`: a product's spec (hashed
/// into its registration record as its protobuf encoding) and the
/// operations a contract allows. The domain layer uses these and never the
/// API's messages.
pub mod spec {
    pub use crate::generated::civicgrid::product::v1::*;
}

/// Generated code, laid out by protobuf package so its relative paths
/// between packages resolve.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    pub mod civicgrid {
        pub mod marketplace {
            pub mod v1 {
                tonic::include_proto!("civicgrid.marketplace.v1");
                include!(concat!(
                    env!("OUT_DIR"),
                    "/civicgrid.marketplace.v1.serde.rs"
                ));
            }
        }
        pub mod product {
            pub mod v1 {
                tonic::include_proto!("civicgrid.product.v1");
                include!(concat!(env!("OUT_DIR"), "/civicgrid.product.v1.serde.rs"));
            }
        }
    }
}
