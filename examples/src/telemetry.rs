//! Tracing for the HTTP example: quiet by default, exported through OpenTelemetry when an OTLP
//! endpoint is configured.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, the spans
//! the framework opens — one per command (`command`: aggregate type, id, command type, command
//! id, correlation id) and one per projection batch (`projection_batch`) — are sent over
//! OTLP/HTTP with protobuf bodies to that endpoint (a collector, Jaeger, Tempo, ...). Without it
//! nothing is installed and nothing is sent. The exporter batches spans on a thread of its own,
//! so a slow or absent collector never holds up a request.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// The variable with the collector's base URL (`http://localhost:4318`); traces go to
/// `<base>/v1/traces`.
pub const ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The variable with the full URL for traces, used as given; it wins over
/// [`ENDPOINT_VARIABLE`].
pub const TRACES_ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The exporter could not be built (an invalid endpoint URL).
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Another subscriber is already installed in this process.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// Where traces go, from the environment: [`TRACES_ENDPOINT_VARIABLE`] as given, else
/// [`ENDPOINT_VARIABLE`] with `/v1/traces`; `None` when neither is set (or both are empty).
pub fn traces_endpoint_from_env() -> Option<String> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    set(TRACES_ENDPOINT_VARIABLE).or_else(|| {
        set(ENDPOINT_VARIABLE).map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
    })
}

/// A tracer provider exporting to `traces_endpoint` (the full URL, e.g.
/// `http://localhost:4318/v1/traces`) in batches. Call [`SdkTracerProvider::shutdown`] before
/// the process exits to send what is still buffered.
pub fn tracer_provider(traces_endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_endpoint)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("cqrs-bank-http")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs the process's tracing subscriber exporting spans through `provider`: the
/// framework's command spans (info) and projection batch spans (debug), everything else from
/// info up.
pub fn install(provider: &SdkTracerProvider) -> Result<(), TelemetryError> {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("cqrs_core", tracing::Level::DEBUG)
        .with_default(tracing::Level::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("examples"))
        .with_filter(filter);
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::set_global_default(subscriber)?;
    Ok(())
}

/// What `main` calls: with an endpoint in the environment, installs the exporting subscriber and
/// returns the provider to shut down at exit; without one, does nothing.
pub fn init_from_env() -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = traces_endpoint_from_env() else {
        return Ok(None);
    };
    let provider = tracer_provider(&endpoint)?;
    install(&provider)?;
    Ok(Some(provider))
}
