//! The marketplace gRPC server.
use clap::Parser;

/// CivicGrid marketplace server (not yet implemented).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("the marketplace server is not implemented yet")
}
