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
    /// What the runner reports; `busy_slots` is read afresh from
    /// `metrics` for every heartbeat when given.
    pub status: proto::RunnerStatus,
    /// The runner's metrics, for the runs in flight.
    pub metrics: Option<std::sync::Arc<crate::Metrics>>,
    /// Between heartbeats.
    pub interval: Duration,
}

/// The data center name a runner's certificate carries.
#[must_use]
pub fn certificate_name(data_center: &str) -> String {
    format!("{data_center}.runner.civicgrid")
}

/// The name on the marketplace's certificate towards runners, unless
/// configured: the only client a runner answers.
pub const MARKETPLACE_NAME: &str = "directory.marketplace.civicgrid";

/// Whether a DER certificate is valid for the DNS name `name` (its subject
/// alternative names), as TLS would check a server's.
#[must_use]
pub fn certificate_names(der: &[u8], name: &str) -> bool {
    let der = rustls_pki_types::CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
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
        let mut interval = self.interval;
        tokio::pin!(stop);
        loop {
            // A heartbeat that hangs must not hold back the next one.
            let mut status = self.status.clone();
            if let Some(metrics) = &self.metrics {
                status.busy_slots = metrics.in_flight();
            }
            let sent = tokio::time::timeout(interval, client.heartbeat(status));
            tokio::select! {
                () = &mut stop => return Ok(()),
                outcome = sent => match outcome {
                    Ok(Ok(reply)) => {
                        // Three heartbeats per time to live, so one lost
                        // never lets the runner lapse.
                        let ttl = Duration::from_millis(reply.into_inner().ttl_ms);
                        interval = self.interval.min(ttl / 3).max(Duration::from_millis(50));
                    }
                    Ok(Err(status)) => {
                        tracing::warn!(directory = %self.directory, %status, "heartbeat refused");
                    }
                    Err(_) => tracing::warn!(directory = %self.directory, "heartbeat timed out"),
                },
            }
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}
