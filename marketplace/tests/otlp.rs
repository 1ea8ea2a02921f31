//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, the server exports a span per RPC
//! over OTLP/gRPC, named after the RPC and tagged with its service name. The
//! collector here is a real OTLP trace service in the test process.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Collector {
    /// (service.name, span name) of every span received.
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn each_rpc_is_exported_as_a_span_over_otlp() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let served = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(served))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });

    let data = tempfile::tempdir().unwrap();
    let marketplace = env!("CARGO_BIN_EXE_civicgrid-marketplace");
    let init = Command::new(marketplace)
        .args(["init", "--admin-name", "admin@city.example", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let token = String::from_utf8(init.stdout).unwrap().trim().to_owned();
    let mut server = Command::new(marketplace)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        // Export promptly rather than every five seconds.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();

    let mut registry = civicgrid_marketplace::proto::registry_client::RegistryClient::connect(
        format!("http://{address}"),
    )
    .await
    .unwrap();
    let mut search =
        tonic::Request::new(civicgrid_marketplace::proto::SearchCatalogRequest::default());
    search
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    registry.search_catalog(search).await.unwrap();

    let wanted = "/civicgrid.marketplace.v1.Registry/SearchCatalog";
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let spans = collector.spans.lock().unwrap().clone();
        if let Some(span) = spans.iter().find(|(_, name)| name == wanted) {
            break Some(span.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = server.kill();
    let _ = server.wait();
    let (service, _) = found.unwrap_or_else(|| {
        panic!(
            "no {wanted} span arrived; got {:?}",
            collector.spans.lock().unwrap()
        )
    });
    assert!(
        service.contains("civicgrid-marketplace"),
        "service.name {service}"
    );
}
