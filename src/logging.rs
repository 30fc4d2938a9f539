//! The log subscriber: `ENVELOPE_PROXY_LOG` (an `EnvFilter`, default `info`), capped so that
//! no setting can make a dependency print a credential.
//!
//! Some libraries log what they hold at debug and trace: s3s logs every request (its
//! Authorization header, presigned query strings) and, on a failed check, the signature it
//! *expected* — a valid signature for the forged request, i.e. a signing oracle; aws-sigv4
//! logs canonical requests and strings to sign; hyper, h2 and rustls log frames and headers.
//! Their events are capped below (a second filter that every event must also pass), so even
//! `ENVELOPE_PROXY_LOG=trace` or `s3s=trace` cannot bring them back. The proxy's own events
//! never carry secrets (the house rule), so they are not capped.

use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The most verbose level each dependency that sees secrets may log at. Targets match by
/// prefix (`aws_` covers aws-sigv4, aws-smithy-*, aws-config, aws-sdk-kms; `hyper` covers
/// hyper-util).
pub fn dependency_caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        // s3s: requests (Authorization, presigned URLs) at debug, expected signatures at debug.
        .with_target("s3s", LevelFilter::WARN)
        // aws-sigv4 (canonical requests, strings to sign), the smithy runtime (requests).
        .with_target("aws_", LevelFilter::INFO)
        .with_target("hyper", LevelFilter::INFO)
        .with_target("h2", LevelFilter::INFO)
        .with_target("rustls", LevelFilter::INFO)
        .with_target("tokio_rustls", LevelFilter::INFO)
        .with_target("tower", LevelFilter::INFO)
        .with_target("cryptoki", LevelFilter::INFO)
        // The trace spans are for the OTLP exporter only (`crate::telemetry`), never printed.
        .with_target(crate::telemetry::TARGET, LevelFilter::OFF)
}

/// How log lines are written: text for people, or one JSON object per line for log pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s.trim() {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    /// `ENVELOPE_PROXY_LOG_FORMAT` (`text` or `json`) wins; then `[server] log_format` of the
    /// config file, read here before the config is loaded (so that loading errors are logged
    /// in the chosen format); then text.
    pub fn choose(config_file: Option<&std::path::Path>) -> Format {
        if let Some(f) = std::env::var("ENVELOPE_PROXY_LOG_FORMAT")
            .ok()
            .as_deref()
            .and_then(Format::parse)
        {
            return f;
        }
        config_file
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| text.parse::<toml::Table>().ok())
            .and_then(|t| {
                t.get("server")?
                    .get("log_format")?
                    .as_str()
                    .and_then(Format::parse)
            })
            .unwrap_or(Format::Text)
    }
}

/// Install the process's subscriber (stderr), filtered by `ENVELOPE_PROXY_LOG` and capped by
/// [`dependency_caps`]. `log` records (rustls) are bridged and capped the same way. With an
/// `otlp` endpoint (and `runtime`, on which the exporter's requests run), spans are exported
/// too (`crate::telemetry`); an exporter that cannot be built is reported and left out.
pub fn init(format: Format, otlp: Option<(String, tokio::runtime::Handle)>) {
    let env =
        EnvFilter::try_from_env("ENVELOPE_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = env.and(dependency_caps());
    let fmt: BoxedLayer = match format {
        Format::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        Format::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let (otel, failed) = match otlp {
        None => (None, None),
        Some((endpoint, runtime)) => otel_layer(&endpoint, runtime),
    };
    let layers: Vec<BoxedLayer> = std::iter::once(fmt).chain(otel).collect();
    tracing_subscriber::registry().with(layers).init();
    if let Some(e) = failed {
        tracing::error!(error = %e, "OpenTelemetry tracing is off");
    }
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(feature = "otel")]
fn otel_layer(
    endpoint: &str,
    runtime: tokio::runtime::Handle,
) -> (Option<BoxedLayer>, Option<String>) {
    match crate::telemetry::layer(endpoint, runtime) {
        Ok(l) => (Some(l.boxed()), None),
        Err(e) => (None, Some(e)),
    }
}

#[cfg(not(feature = "otel"))]
fn otel_layer(
    _endpoint: &str,
    _runtime: tokio::runtime::Handle,
) -> (Option<BoxedLayer>, Option<String>) {
    (
        None,
        Some("this build has no OTLP exporter (cargo feature `otel`)".into()),
    )
}
