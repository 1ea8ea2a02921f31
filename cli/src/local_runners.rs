//! Runners in this process for the embedded default (`civicgrid up`) and
//! the tests: a certificate authority made for the run, the marketplace's
//! runner directory, and runners for one data center over a local data
//! directory, reached over mutual TLS exactly as a city's runners are
//! (docs/runners.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use civicgrid_marketplace::grpc::runners::{RunnerDirectory, serve_directory};
use civicgrid_marketplace::market::Marketplace;
use civicgrid_runner::{Ceilings, RunnerService};
use civicgrid_sandbox::{GuestRole, Sandbox, SandboxConfig};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A certificate authority, and certificates it issues under one DNS name.
pub struct Authority {
    /// Its certificate (PEM).
    pub ca: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A fresh authority named `name`.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key)?.pem();
        Ok(Self {
            ca,
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate and key (PEM) for `name`, for `uses`.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn issue(
        &self,
        name: &str,
        uses: &[ExtendedKeyUsagePurpose],
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.extended_key_usages = uses.to_vec();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// For a runner or the marketplace's directory: serves, and calls.
    ///
    /// # Errors
    /// As [`Self::issue`].
    pub fn both_ways(&self, name: &str) -> anyhow::Result<(String, String)> {
        self.issue(
            name,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }
}

/// What to start.
pub struct Setup {
    /// The data center the runners serve.
    pub data_center: String,
    /// Its product folders: a directory, or its object store.
    pub products: civicgrid_runner::ProductStore,
    /// The SQL guest (Wasm).
    pub sql_guest: Vec<u8>,
    /// The runners' sandbox (shared by them).
    pub sandbox: SandboxConfig,
    /// The most a run may ask for.
    pub ceilings: Ceilings,
    /// How many runners.
    pub runners: usize,
    /// Between heartbeats.
    pub heartbeat: Duration,
}

/// The directory and the runners, until dropped.
pub struct LocalRunners {
    /// Each runner's address, and what stops it (its server and heartbeats).
    pub runners: Vec<(SocketAddr, tokio::sync::watch::Sender<bool>)>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl LocalRunners {
    /// Stops runner `index`: its server and its heartbeats.
    pub fn stop(&mut self, index: usize) {
        let _ = self.runners[index].1.send(true);
    }
}

async fn until_stopped(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stopped| *stopped).await;
}

async fn either(all: tokio::sync::watch::Receiver<bool>, one: tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        () = until_stopped(all) => {}
        () = until_stopped(one) => {}
    }
}

/// Routes `market`'s queries to `setup.runners` runners for
/// `setup.data_center`, and waits until every one has reported.
///
/// # Errors
/// When a certificate, a listener, the sandbox or the SQL guest fails, or
/// a runner never reports.
pub async fn start(market: &Marketplace, setup: Setup) -> anyhow::Result<LocalRunners> {
    let authority = Authority::new("civicgrid local runners")?;
    let directory_identity = authority.both_ways(civicgrid_runner::MARKETPLACE_NAME)?;
    let runner_identity =
        authority.both_ways(&civicgrid_runner::certificate_name(&setup.data_center))?;
    let directory = RunnerDirectory::new(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&authority.ca))
            .identity(Identity::from_pem(
                &directory_identity.0,
                &directory_identity.1,
            )),
        civicgrid_marketplace::grpc::runners::DEFAULT_RUNNER_TTL,
    );
    market.attach_runners(directory.clone())?;
    // Dropping the sender stops the directory, the runners and their
    // heartbeats.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let directory_address = listener.local_addr()?;
    tokio::spawn(serve_directory(
        directory.clone(),
        listener,
        civicgrid_runner::mutual_tls(&directory_identity.0, &directory_identity.1, &authority.ca),
        until_stopped(stopped.clone()),
    ));

    let (sandbox_config, wasm) = (setup.sandbox, setup.sql_guest);
    let (sandbox, guest) = tokio::task::spawn_blocking(move || {
        let sandbox = Sandbox::new(&sandbox_config)?;
        let guest = sandbox.load(&wasm, GuestRole::Sql)?;
        Ok::<_, civicgrid_sandbox::SandboxError>((Arc::new(sandbox), guest))
    })
    .await??;
    let mut runners = Vec::with_capacity(setup.runners);
    for _ in 0..setup.runners {
        let service = Arc::new(RunnerService::new(
            Arc::clone(&sandbox),
            Arc::clone(&guest),
            setup.products.clone(),
            setup.ceilings,
        ));
        let metrics = Arc::clone(service.metrics());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let runner = listener.local_addr()?;
        let (stop_runner, runner_stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(civicgrid_runner::serve(
            service,
            listener,
            civicgrid_runner::mutual_tls(&runner_identity.0, &runner_identity.1, &authority.ca),
            either(stopped.clone(), runner_stopped.clone()),
        ));
        let heartbeat = civicgrid_runner::Heartbeat {
            directory: format!("https://{directory_address}"),
            directory_name: civicgrid_runner::MARKETPLACE_NAME.into(),
            directory_ca: authority.ca.clone().into_bytes(),
            identity: (
                runner_identity.0.clone().into_bytes(),
                runner_identity.1.clone().into_bytes(),
            ),
            status: civicgrid_runner::proto::RunnerStatus {
                data_center: setup.data_center.clone(),
                endpoint: format!("https://{runner}"),
                version: env!("CARGO_PKG_VERSION").into(),
                slots: sandbox.slots(),
                busy_slots: 0,
            },
            metrics: Some(metrics),
            interval: setup.heartbeat,
        };
        tokio::spawn(heartbeat.run(either(stopped.clone(), runner_stopped)));
        runners.push((runner, stop_runner));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory.ready_runners(&setup.data_center) < setup.runners {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the runners for {} never reported to the marketplace",
            setup.data_center
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(LocalRunners {
        runners,
        _stop: stop,
    })
}
