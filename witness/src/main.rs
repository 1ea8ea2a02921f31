//! `civicgrid-witness`: cosigns a CivicGrid audit log's checkpoints after
//! checking each extends the last one it cosigned. Run it somewhere the
//! log's operator does not control (a regulator, an auditor, a partner).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use civicgrid_tlog::checkpoint::NoteVerifier;
use civicgrid_tlog::cosignature::CosignatureSigner;
use civicgrid_tlog::key_file;
use civicgrid_witness::{State, Witness, router};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the witness's verifier key (creating its key file on first
    /// use): give it to the log's operator and to everyone who verifies.
    Key {
        #[command(flatten)]
        identity: Identity,
    },
    /// Serves `POST /add-checkpoint` (C2SP tlog-witness) over HTTP; put it
    /// behind TLS where it crosses a network you do not trust.
    Serve {
        #[command(flatten)]
        identity: Identity,
        /// A log's verifier key (`civicgrid audit checkpoint` prints it); its
        /// name is the log's origin. Repeat for several logs.
        #[arg(long = "log", required = true, value_name = "VERIFIER_KEY")]
        logs: Vec<String>,
        /// Where the last cosigned checkpoint of each log is kept.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7380")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct Identity {
    /// The witness's name, a schema-less URL such as
    /// `witness.example.org/civicgrid`.
    #[arg(long)]
    name: String,
    /// The witness's Ed25519 seed (32 bytes), created with mode 0600 on
    /// first use. Keep it on this machine only.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
}

impl Identity {
    fn signer(&self) -> anyhow::Result<CosignatureSigner> {
        let key = key_file::load_or_create(&self.key_file)?;
        CosignatureSigner::new(self.name.clone(), key).context("--name")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Key { identity } => {
            println!("{}", identity.signer()?.verifier());
            Ok(())
        }
        Command::Serve {
            identity,
            logs,
            state_dir,
            listen,
        } => {
            let _telemetry = civicgrid_telemetry::init("civicgrid-witness", "info")?;
            let signer = identity.signer()?;
            let logs = logs
                .iter()
                .map(|key| {
                    key.parse::<NoteVerifier>()
                        .with_context(|| format!("--log {key:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let state = State::open(&state_dir)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            println!("listening on {}", listener.local_addr()?);
            tracing::info!(
                address = %listener.local_addr()?,
                witness = %signer.verifier(),
                logs = logs.len(),
                "witness serving"
            );
            let witness = Arc::new(Witness::new(signer, logs, state));
            axum::serve(listener, router(witness))
                .with_graceful_shutdown(civicgrid_telemetry::shutdown_signal())
                .await?;
            Ok(())
        }
    }
}
