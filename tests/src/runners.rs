//! Runners for tests and benchmarks: a certificate authority for the
//! marketplace and its runners, and a marketplace routed to one in-process
//! runner over mutual TLS (docs/runners.md).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use civicgrid_marketplace::grpc::runners::{RunnerDirectory, serve_directory};
use civicgrid_runner::{Ceilings, RunnerService};
use civicgrid_sandbox::GuestRole;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::market::TestMarket;

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

/// A marketplace routed to runners for one data center: the directory
/// runs until this is dropped, each runner (and its heartbeats) until it
/// is stopped or this is dropped.
pub struct Routed {
    /// Each runner's address, and what stops it.
    pub runners: Vec<(SocketAddr, tokio::sync::watch::Sender<bool>)>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Routed {
    /// Stops runner `index`: its server and its heartbeats.
    pub fn stop(&mut self, index: usize) {
        let _ = self.runners[index].1.send(true);
    }
}

async fn until_stopped(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stopped| *stopped).await;
}

/// Routes `market`'s queries to `count` runners for `data_center` over
/// `data_dir`, and waits until they have reported.
///
/// # Errors
/// When a certificate, a listener, the sandbox or the SQL guest fails, or
/// the runner never reports.
pub async fn route(
    market: &TestMarket,
    data_center: &str,
    data_dir: &Path,
    count: usize,
) -> anyhow::Result<Routed> {
    let authority = Authority::new("civicgrid-test-runners")?;
    let directory_identity = authority.both_ways(civicgrid_runner::MARKETPLACE_NAME)?;
    let runner_identity = authority.both_ways(&civicgrid_runner::certificate_name(data_center))?;
    let directory = RunnerDirectory::new(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&authority.ca))
            .identity(Identity::from_pem(
                &directory_identity.0,
                &directory_identity.1,
            )),
        Duration::from_secs(15),
    );
    market.market.attach_runners(directory.clone())?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let directory_address = listener.local_addr()?;
    tokio::spawn(serve_directory(
        directory.clone(),
        listener,
        civicgrid_runner::mutual_tls(&directory_identity.0, &directory_identity.1, &authority.ca),
        until_stopped(stopped.clone()),
    ));
    let sandbox = Arc::new(crate::sandbox::sandbox_with(|config| {
        config.max_concurrent_runs = 64;
    }));
    let guest = sandbox.load(&crate::sandbox::sql_guest(), GuestRole::Sql)?;
    let mut runners = Vec::with_capacity(count);
    for _ in 0..count {
        let service = Arc::new(RunnerService::new(
            Arc::clone(&sandbox),
            Arc::clone(&guest),
            data_dir.to_owned(),
            Ceilings {
                memory_bytes: 4 << 30,
                wall_time: Duration::from_secs(3_600),
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let runner = listener.local_addr()?;
        let (stop_runner, runner_stopped) = tokio::sync::watch::channel(false);
        let either = {
            let (all, one) = (stopped.clone(), runner_stopped);
            move || {
                let (all, one) = (all.clone(), one.clone());
                async move {
                    tokio::select! {
                        () = until_stopped(all) => {}
                        () = until_stopped(one) => {}
                    }
                }
            }
        };
        let metrics = Arc::clone(service.metrics());
        tokio::spawn(civicgrid_runner::serve(
            service,
            listener,
            civicgrid_runner::mutual_tls(&runner_identity.0, &runner_identity.1, &authority.ca),
            either(),
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
                data_center: data_center.into(),
                endpoint: format!("https://{runner}"),
                version: "test".into(),
                slots: 64,
                busy_slots: 0,
            },
            metrics: Some(metrics),
            interval: Duration::from_secs(1),
        };
        tokio::spawn(heartbeat.run(either()));
        runners.push((runner, stop_runner));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while directory.ready_runners(data_center) < count {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the runner for {data_center} never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Routed {
        runners,
        _stop: stop,
    })
}
