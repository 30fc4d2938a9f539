//! OpenTelemetry tracing (feature `otel`, on by default; off at run time unless an endpoint is
//! set): spans of each request exported over OTLP/HTTP (protobuf) to a collector.
//!
//! - **Endpoint**: `ENVELOPE_PROXY_OTLP_ENDPOINT`, else `[server] otlp_endpoint`: the full URL
//!   of the collector's traces resource (`http://otel-collector:4318/v1/traces`). Read with the
//!   log settings, before the config loads; a change needs a restart. Batching follows the
//!   standard `OTEL_BSP_*` variables (default: every 5 s).
//! - **Spans** (target [`TARGET`], never printed in logs): `request` (method, route, status,
//!   request id), and below it `data_key` (writes), `transform` (with the number of values
//!   sealed) and `upstream` on JSON routes, `upstream` on pass-through routes; S3 requests get
//!   the `request` span. A valid incoming
//!   `traceparent` makes `request` a child of the caller's span. Attributes are the same as
//!   the access line's: never a value, token, signature, header value or query string.
//! - Without an endpoint no exporter exists and the spans are disabled callsites (nothing is
//!   recorded): the data path pays nothing measurable for the feature.
//! - Export runs on a background thread through the proxy's own hyper client (on the proxy's
//!   runtime), so a slow or absent collector never blocks a request; spans beyond the queue
//!   (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) are dropped.

use std::sync::OnceLock;

/// The target of the proxy's trace spans. The log layer never prints it
/// (`crate::logging::dependency_caps`).
pub const TARGET: &str = "envelope_proxy::otel";

/// Where spans go: `ENVELOPE_PROXY_OTLP_ENDPOINT`, else `[server] otlp_endpoint` of the config
/// file (read raw, as the log format is); `None`: tracing off.
pub fn endpoint(config_file: Option<&std::path::Path>) -> Option<String> {
    if let Ok(e) = std::env::var("ENVELOPE_PROXY_OTLP_ENDPOINT")
        && !e.trim().is_empty()
    {
        return Some(e.trim().to_string());
    }
    config_file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| {
            Some(
                t.get("server")?
                    .get("otlp_endpoint")?
                    .as_str()?
                    .trim()
                    .to_string(),
            )
        })
        .filter(|e| !e.is_empty())
}

/// Whether `e` is an endpoint the exporter can use (an `http` or `https` URL with a host).
pub fn valid_endpoint(e: &str) -> bool {
    e.parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
}

#[cfg(feature = "otel")]
static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();
#[cfg(not(feature = "otel"))]
static PROVIDER: OnceLock<()> = OnceLock::new();

/// Whether spans are being exported.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The tracing layer exporting to `endpoint`, its HTTP requests run on `runtime`.
#[cfg(feature = "otel")]
pub fn layer<S>(
    endpoint: &str,
    runtime: tokio::runtime::Handle,
) -> Result<impl tracing_subscriber::Layer<S>, String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use tracing_subscriber::Layer as _;

    if !valid_endpoint(endpoint) {
        return Err(format!(
            "OTLP endpoint {endpoint:?}: not an http(s) URL (e.g. http://otel-collector:4318/v1/traces)"
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpClient::new(runtime)?)
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("envelope-proxy")
                .build(),
        )
        .build();
    let tracer = provider.tracer("envelope-proxy");
    let _ = PROVIDER.set(provider);
    Ok(tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO),
        ))
}

/// Export what is queued and stop (at exit).
pub fn shutdown() {
    #[cfg(feature = "otel")]
    if let Some(p) = PROVIDER.get()
        && let Err(e) = p.shutdown()
    {
        eprintln!("OTLP export at shutdown: {e}");
    }
}

/// Make `span` a child of the caller's span named by a valid `traceparent` in `headers`.
pub fn set_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    #[cfg(feature = "otel")]
    if enabled() && headers.contains_key("traceparent") {
        use opentelemetry::propagation::TextMapPropagator as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&opentelemetry_http::HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers);
}

/// The exporter's HTTP client: the proxy's hyper client (its TLS roots), each request run
/// on the proxy's runtime (the exporter calls from its own thread).
#[cfg(feature = "otel")]
#[derive(Debug)]
struct OtlpClient {
    runtime: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
}

#[cfg(feature = "otel")]
impl OtlpClient {
    fn new(runtime: tokio::runtime::Handle) -> Result<OtlpClient, String> {
        let tls = crate::pki::client_config(None)?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(OtlpClient { runtime, client })
    }
}

#[cfg(feature = "otel")]
#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt as _;
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, http_body_util::Full::new(body));
        let call = async move {
            let resp = client.request(request).await?;
            let (parts, body) = resp.into_parts();
            // A collector's answer is small; more is not read.
            let body = http_body_util::Limited::new(body, 1 << 20)
                .collect()
                .await?;
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(
                parts,
                body.to_bytes(),
            ))
        };
        // Everything that needs the runtime (the timer too) is made inside the spawned task:
        // this runs on the exporter's own thread.
        let timed =
            async move { tokio::time::timeout(std::time::Duration::from_secs(10), call).await };
        match self.runtime.spawn(timed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("OTLP export timed out".into()),
            Err(e) => Err(Box::new(e)),
        }
    }
}
