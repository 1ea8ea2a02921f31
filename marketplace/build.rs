//! Compiles marketplace/proto with protox (pure Rust), so building needs no
//! `protoc`, and keeps the descriptor set for gRPC server reflection.
use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/civicgrid/marketplace/v1/marketplace.proto";
    println!("cargo:rerun-if-changed={proto}");
    // Imported by the API; its types are the domain's documents.
    println!("cargo:rerun-if-changed=proto/civicgrid/product/v1/product.proto");
    // `sqlx::migrate!` embeds these directories; a new migration file must
    // rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(
        out_dir.join("marketplace_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let encoded = descriptors.encode_to_vec();
    tonic_prost_build::configure().compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .build(&[".civicgrid.marketplace.v1", ".civicgrid.product.v1"])?;
    Ok(())
}
