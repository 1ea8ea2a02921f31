//! The `civicgrid` CLI for providers, enterprises and regulators.
use clap::Parser;

/// CivicGrid command-line client (not yet implemented).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("the civicgrid CLI is not implemented yet")
}
