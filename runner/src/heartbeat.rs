//! The runner's side of the directory: a heartbeat to the marketplace
//! every `interval`, naming its data center and endpoint.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::proto::{self, directory_client::DirectoryClient};

/// Where and as whom a runner reports.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// The marketplace's directory, `https://HOST:PORT`.
    pub directory: String,
    /// The name on the marketplace's certificate.
    pub directory_name: String,
    /// The CA that signed the marketplace's certificate (PEM).
    pub directory_ca: Vec<u8>,
    /// The runner's own certificate and key (PEM), naming its data center.
    pub identity: (Vec<u8>, Vec<u8>),
    /// What the runner reports.
    pub status: proto::RunnerStatus,
    /// Between heartbeats.
    pub interval: Duration,
}

/// The data center name a runner's certificate carries.
#[must_use]
pub fn certificate_name(data_center: &str) -> String {
    format!("{data_center}.runner.civicgrid")
}

impl Heartbeat {
    /// Sends heartbeats until `stop` resolves; a failed one is logged and
    /// retried at the next interval.
    ///
    /// # Errors
    /// When the directory's address or TLS settings are unusable.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.directory_ca))
            .identity(Identity::from_pem(&self.identity.0, &self.identity.1))
            .domain_name(&self.directory_name);
        let channel = Channel::from_shared(self.directory.clone())?
            .tls_config(tls)?
            .connect_lazy();
        let mut client = DirectoryClient::new(channel);
        let mut ticks = tokio::time::interval(self.interval);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return Ok(()),
                _ = ticks.tick() => {
                    if let Err(status) = client.heartbeat(self.status.clone()).await {
                        tracing::warn!(directory = %self.directory, %status, "heartbeat failed");
                    }
                }
            }
        }
    }
}
