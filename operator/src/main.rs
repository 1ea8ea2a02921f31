//! `civicgrid-operator`: the operator binary.
use clap::Parser;

/// CivicGrid operator.
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("the operator is not implemented yet")
}
