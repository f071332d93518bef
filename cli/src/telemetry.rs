//! Where the command line's diagnostics go: `QFLOW_LOG`-filtered lines on
//! stderr, and — built with the `otlp` feature, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector — the run, step, load
//! and acquire spans exported over OTLP/HTTP.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
/// Drop it after the last runtime is gone: the exporter's HTTP client
/// blocks, which no async worker may do.
pub(crate) struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Every layer stacks on the plain registry, boxed: per-layer filters
/// keep stderr quiet while the exporter sees the spans it needs.
type Boxed = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the process's subscriber.
pub(crate) fn init() -> Telemetry {
    let filter = EnvFilter::try_from_env("QFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    // Colours only for a person at a terminal, never into a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_filter(filter);
    #[cfg(feature = "otlp")]
    let (exporter, provider) = otlp::layer().unzip();
    #[cfg(not(feature = "otlp"))]
    let exporter: Option<Boxed> = None;
    let layers: Vec<Boxed> = std::iter::once(stderr.boxed()).chain(exporter).collect();
    tracing_subscriber::registry().with(layers).init();
    Telemetry {
        #[cfg(feature = "otlp")]
        provider,
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: not every span reached the OTLP collector: {e}");
        }
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::{EnvFilter, Layer};

    use super::Boxed;

    /// The standard variable: the collector's base URL (spans go to
    /// `/v1/traces` under it), as every OpenTelemetry SDK reads it.
    const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

    /// What is exported: Qflow's own spans, `acquire` (a debug span) too.
    /// `QFLOW_OTLP_LOG` takes an `EnvFilter` directive to change it.
    const DEFAULT_FILTER: &str = "qflow=debug";

    /// The exporting layer and its provider, if a collector is named and the
    /// exporter could be made (a warning says why not, otherwise).
    pub(super) fn layer() -> Option<(Boxed, SdkTracerProvider)> {
        let endpoint = std::env::var(ENDPOINT).ok().filter(|e| !e.is_empty())?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .build();
        let exporter = match exporter {
            Ok(exporter) => exporter,
            Err(e) => {
                eprintln!("warning: no OTLP export to {endpoint}: {e}");
                return None;
            }
        };
        // The batch processor exports from a thread of its own, never from
        // the async workers the spans end on.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("qflow").build())
            .build();
        let filter = EnvFilter::try_from_env("QFLOW_OTLP_LOG")
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("qflow"))
            .with_filter(filter)
            .boxed();
        Some((layer, provider))
    }
}
