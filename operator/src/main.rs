//! `civicgrid-operator`: prints the CRDs, plans offline, and (soon) runs the
//! controllers.
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use civicgrid_operator::plan::{self, Format};
use clap::{Parser, Subcommand};

/// CivicGrid operator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (for kubectl apply).
    Crds,
    /// Place the workloads in manifests offline and explain every decision.
    Plan {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
        /// table, json or yaml.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
        /// Evaluate as of this Unix time (defaults to now); for reproducible plans.
        #[arg(long)]
        at_unix: Option<i64>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = match args.command {
        Command::Crds => civicgrid_operator::crds_yaml()?,
        Command::Plan {
            path,
            output,
            at_unix,
        } => {
            let now = at_unix.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            });
            plan::run(&path, output, now).with_context(|| format!("planning {}", path.display()))?
        }
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}
