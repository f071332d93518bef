//! Outbound HTTP for steps: the standard `wasi:http/outgoing-handler`
//! (wasmtime-wasi-http), with our [`WasiHttpHooks`] in the send path.
//!
//! - **Granted, or refused.** A request reaches only an origin one of the
//!   step's `http` grants allows; a name that resolves to an internal
//!   address (loopback, private, link-local …) is refused unless the
//!   request names the address itself and a grant names it too.
//! - **Pooled.** Keep-alive HTTP/1.1 connections live in the generic
//!   [`Pool`], one pool per origin (scheme, host, port), shared by every
//!   step and instance of the host: `min`, `max`, idle timeout, health
//!   checks, creation and acquisition timeouts, stats.
//! - **Bounded.** A time limit until the response's headers, a request body
//!   limit and a response body limit, each failing that request with the
//!   matching `wasi:http` error code.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::model::{HttpGrant, HttpScheme, PoolStats, is_internal};
use crate::pool::{Manager, Pool, PoolConfig, PoolSet, Pooled};

/// Outbound HTTP's limits and pool settings, host-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Each origin's connection pool (`min` 0: connections are made on
    /// demand and kept while used).
    pub pool: PoolConfig,
    /// How long a request may wait for its response's headers, connection
    /// included.
    pub request_timeout: Duration,
    /// The largest request body a step may send, in bytes.
    pub max_request_bytes: u64,
    /// The largest response body a step may read, in bytes.
    pub max_response_bytes: u64,
    /// Keep connections open for the next request (HTTP keep-alive); off,
    /// every request opens a connection of its own and closes it after.
    pub keep_alive: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            pool: PoolConfig {
                min: 0,
                max: 16,
                idle_timeout_ms: 30_000,
                health_check_ms: 5_000,
                create_timeout_ms: 10_000,
                acquire_timeout_ms: 30_000,
                ..PoolConfig::default()
            },
            request_timeout: Duration::from_secs(30),
            max_request_bytes: 16 << 20,
            max_response_bytes: 64 << 20,
            keep_alive: true,
        }
    }
}

impl HttpConfig {
    /// Sets the per-origin pool.
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Sets the time limit until a response's headers.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the request body limit.
    pub fn max_request_bytes(mut self, bytes: u64) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    /// Turns keep-alive on or off.
    pub fn keep_alive(mut self, keep: bool) -> Self {
        self.keep_alive = keep;
        self
    }

    /// Sets the response body limit.
    pub fn max_response_bytes(mut self, bytes: u64) -> Self {
        self.max_response_bytes = bytes;
        self
    }
}

/// Where a pooled connection goes. `internal` marks connections to an
/// address a grant named: only requests that may reach internal addresses
/// share them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    scheme: HttpScheme,
    host: String,
    port: u16,
    internal: bool,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// The host's HTTP client: a connection pool per origin.
pub(crate) struct HttpClient {
    config: HttpConfig,
    /// By origin; one unused for an idle timeout goes, so a wildcard grant
    /// does not grow the host without end.
    pools: PoolSet<Origin, Connector>,
}

impl HttpClient {
    pub(crate) fn new(config: HttpConfig) -> HttpClient {
        HttpClient { config, pools: PoolSet::new() }
    }

    /// Each origin's pool figures, by `scheme://host:port`.
    pub(crate) fn stats(&self) -> Vec<(String, PoolStats)> {
        self.pools.stats(Origin::to_string)
    }

    fn pool(&self, origin: Origin) -> Arc<Pool<Connector>> {
        let made = self.pools.get(&origin, || {
            let connector = Connector { origin: origin.clone() };
            Ok::<_, std::convert::Infallible>(Pool::new(connector, self.config.pool))
        });
        let Ok(pool) = made;
        pool
    }

    /// Sends `request` for `caller` if `grants` allow it, waiting for its
    /// response's headers at most `limit` (the host's time limit, or a
    /// shorter one the guest asked for).
    async fn send(
        self: Arc<Self>,
        caller: Arc<str>,
        grants: Arc<[HttpGrant]>,
        mut request: http::Request<WasiBody>,
        limit: Duration,
    ) -> Result<http::Response<WasiBody>, Error> {
        let uri = request.uri();
        let scheme = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => HttpScheme::Https,
            Some(s) if s.eq_ignore_ascii_case("http") => HttpScheme::Http,
            _ => return Err(Error::HttpProtocolError),
        };
        // One spelling per host: `API.example.com.` is `api.example.com`.
        let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?;
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(Error::HttpRequestUriInvalid);
        }
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        if !grants.iter().any(|g| g.allows(scheme, &host, port)) {
            let message = format!(
                "step `{caller}` has no http grant for {scheme}://{host}:{port} (add http = [\"{host}:{port}\"] to the step)"
            );
            tracing::warn!("{message}");
            return Err(Error::InternalError(Some(message)));
        }
        // An internal address is reached only when the request names it and
        // a grant names that very address (a name never does).
        let address = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        let internal =
            address.is_some_and(|ip| grants.iter().any(|g| g.grants_address(scheme, ip, port)));
        let host = match address {
            Some(IpAddr::V6(v6)) => format!("[{v6}]"),
            Some(IpAddr::V4(v4)) => v4.to_string(),
            None => host,
        };
        let origin = Origin { scheme, host, port, internal };
        let config = self.config;

        // Origin-form on the wire: the path and query, no scheme or authority.
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") => "/".to_owned(),
            Some(p) if p.starts_with('?') => format!("/{p}"),
            Some(p) => p.to_owned(),
        };
        *request.uri_mut() = http::Uri::try_from(path).map_err(|_| Error::HttpRequestUriInvalid)?;
        if request.body().size_hint().lower() > config.max_request_bytes {
            return Err(Error::HttpRequestBodySize(Some(config.max_request_bytes)));
        }
        let request = request.map(|body| {
            Capped {
                inner: body,
                limit: config.max_request_bytes,
                seen: 0,
                over: Error::HttpRequestBodySize,
            }
            .boxed_unsync()
        });

        let pool = self.pool(origin.clone());
        let exchange = async {
            // An idempotent request (GET, HEAD …) may be sent again: its body
            // (empty, nearly always) is read first and kept.
            let (request, replay) = if idempotent(request.method()) {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await?.to_bytes();
                let copy = (parts.clone(), bytes.clone());
                (http::Request::from_parts(parts, full_body(bytes)), Some(copy))
            } else {
                (request, None)
            };
            let mut request = request;
            // A pooled connection may have been closed by the server while it
            // sat idle (its keep-alive ran out): the request goes on another
            // connection, if it was not sent or can be sent again. A new
            // connection gets one try.
            loop {
                let mut connection = pool.acquire().await.map_err(|e| {
                    let message = format!("step `{caller}`: {origin}: {e}");
                    tracing::warn!("{message}");
                    Error::InternalError(Some(message))
                })?;
                let fresh = connection.is_new();
                let sender = connection.get();
                if sender.ready().await.is_err() {
                    if fresh {
                        return Err(Error::ConnectionTerminated);
                    }
                    continue;
                }
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok::<_, Error>((connection, response)),
                    Err(mut failed) => match (failed.take_message(), &replay) {
                        (Some(unsent), _) if !fresh => request = unsent,
                        (None, Some((parts, bytes))) if !fresh => {
                            request =
                                http::Request::from_parts(parts.clone(), full_body(bytes.clone()));
                        }
                        _ => return Err(Error::from(failed.into_error())),
                    },
                }
            }
        };
        let (connection, response) = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| Error::ConnectionReadTimeout)??;
        if response.body().size_hint().lower() > config.max_response_bytes {
            return Err(Error::HttpResponseBodySize(Some(config.max_response_bytes)));
        }
        // A response without a body leaves the connection free at once.
        let connection = if response.body().is_end_stream() {
            if config.keep_alive {
                connection.release();
            }
            None
        } else {
            Some(connection)
        };
        Ok(response.map(|incoming| {
            let body = Returning { inner: incoming, connection, keep: config.keep_alive };
            Capped {
                inner: body,
                limit: config.max_response_bytes,
                seen: 0,
                over: Error::HttpResponseBodySize,
            }
            .boxed_unsync()
        }))
    }
}

/// Whether sending `method` twice means the same as once (RFC 9110, 9.2.2).
fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE]
        .contains(method)
}

/// A request body already read.
fn full_body(bytes: Bytes) -> WasiBody {
    http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// The `wasi:http` hooks of one instance: its caller's grants over the
/// host's client.
pub(crate) struct StepHttp {
    pub(crate) client: Arc<HttpClient>,
    pub(crate) grants: Arc<[HttpGrant]>,
    pub(crate) caller: Arc<str>,
}

type Sent =
    Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>;

impl WasiHttpHooks for StepHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        let (client, grants, caller) =
            (self.client.clone(), self.grants.clone(), self.caller.clone());
        // A guest may ask for less time than the host gives (its first-byte
        // timeout, plus its connect timeout), never for more.
        let host = client.config.request_timeout;
        let asked = options.and_then(|o| {
            Some(o.first_byte_timeout?.saturating_add(o.connect_timeout.unwrap_or_default()))
        });
        let limit = asked.map_or(host, |asked| asked.min(host));
        Box::new(async move {
            let response = client.send(caller, grants, request, limit).await?;
            // The connection is driven by its own task, not by the guest.
            let io: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async { Ok(()) });
            Ok((response, io))
        })
    }
}

/// Makes connections to one origin.
struct Connector {
    origin: Origin,
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

impl Manager for Connector {
    type Resource = SendRequest<WasiBody>;
    type Error = String;

    async fn create(&self) -> Result<SendRequest<WasiBody>, String> {
        let Origin { scheme, host, port, internal } = &self.origin;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((bare, *port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        if !internal && let Some(address) = addresses.iter().find(|a| is_internal(a.ip())) {
            return Err(format!(
                "{host} resolves to {}, an internal address, which a name never grants (grant the address itself)",
                address.ip()
            ));
        }
        let tcp = TcpStream::connect(&addresses[..])
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match scheme {
            HttpScheme::Http => Box::new(tcp),
            HttpScheme::Https => {
                let name = rustls_pki_name(bare)?;
                let tls = tokio_rustls::TlsConnector::from(tls_config()?)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}:{port} failed: {e}"))?;
                Box::new(tls)
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {host}:{port} failed: {e}"))?;
        let origin = self.origin.to_string();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection to {origin} ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn healthy(&self, sender: &mut SendRequest<WasiBody>) -> bool {
        !sender.is_closed()
    }
}

fn rustls_pki_name(
    host: &str,
) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, String> {
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host} is not a TLS server name: {e}"))
}

/// The system's root certificates, read once.
fn tls_config() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<tokio_rustls::rustls::ClientConfig>, String>> =
        OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system root certificates to verify HTTPS servers with".to_owned());
            }
            let config = tokio_rustls::rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// A body that fails with `over(Some(limit))` once more than `limit`
/// bytes came through.
struct Capped<B> {
    inner: B,
    limit: u64,
    seen: u64,
    over: fn(Option<u64>) -> Error,
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            self.seen = self.seen.saturating_add(data.len() as u64);
            if self.seen > self.limit {
                return Poll::Ready(Some(Err((self.over)(Some(self.limit)))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that gives its connection back to the pool once read to
/// the end; dropped early, the connection is closed (it still carries the
/// rest of this response).
struct Returning {
    inner: hyper::body::Incoming,
    connection: Option<Pooled<Connector>>,
    /// Give it back (keep-alive), or close it.
    keep: bool,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(connection) = self.connection.take()
            && self.keep
        {
            connection.release();
        }
        polled.map_err(Error::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
