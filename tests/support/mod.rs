//! Shared helpers for the integration tests: a fresh development PKI per test (rcgen, through `ssp dev-certs`'s
//! generator), a recording TLS MA provider on `127.0.0.1:0`, the proxy started in-process on `127.0.0.1:0` (or
//! the real binary as a child process), and an mTLS consumer speaking HTTP/1.1 or HTTP/2. Loopback only.

#![allow(
    dead_code,
    unused_imports,
    reason = "each test crate uses a different subset of the helpers"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: a failed setup step is a test failure"
)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use ssp::demo::devcerts::{CONSUMER_NAME, CONSUMER2_NAME, PROXY_CLIENT_NAME};

mod served;
pub use served::*;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub const FROM: &str = "200000000359";
pub const FROM_2: &str = "200000000360";
pub const TO: &str = "918999198993";
pub const TO_DOWN: &str = "918999198994";
pub const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
pub const STRUCTURED: &str =
    "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
pub const APPOINTMENT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:appointment-1";
pub const TRACE_ID: &str = "629ea9ba-a077-4d99-b289-7a9b19fd4e03";
/// A system that registers a key (`certs/jwt-signing.key` signs; `policies/jwt/signing.pem` verifies).
pub const FROM_SIGNED: &str = "200000000361";

/// Bounds every network step of a test.
pub const STEP: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PKI.

/// A development PKI in a temporary folder.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        ssp::demo::devcerts::generate(&dir.path().join("certs")).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("certs").join(name)
    }

    pub fn ca(&self) -> Vec<PathBuf> {
        vec![self.path("ca.crt")]
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The recording provider.

/// What the provider saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    /// The CN of the client certificate the provider's TLS verified.
    pub client_cn: Option<String>,
}

#[derive(Default)]
pub struct ProviderState {
    pub seen: Mutex<Vec<Seen>>,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
    /// Bytes of request bodies read by `/gp/upload`.
    pub uploaded: AtomicU64,
    /// Lets `/gp/slow` send its last chunk.
    pub release_slow: Notify,
    /// Set when `/gp/infinite` could no longer send (its connection went away).
    pub stream_broken: Notify,
    pub broken: AtomicUsize,
}

pub struct Provider {
    pub addr: SocketAddr,
    pub state: Arc<ProviderState>,
}

impl Provider {
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Starts a TLS MA provider with the PKI's provider certificate, requiring client certs chained to its CA.
    pub async fn start(pki: &Pki) -> Self {
        let tls = ssp::demo::provider_tls(
            &pki.path("provider.crt"),
            &pki.path("provider.key"),
            &pki.ca(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProviderState::default());
        let acceptor = TlsAcceptor::from(tls);
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(ssp::tls::peer_identity)
                        .and_then(|p| p.common_name);
                    let service = service_fn(move |req| {
                        let st = Arc::clone(&st);
                        let client_cn = client_cn.clone();
                        async move { Ok::<_, Infallible>(provider_route(req, st, client_cn).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }
}

async fn provider_route(
    req: Request<Incoming>,
    st: Arc<ProviderState>,
    client_cn: Option<String>,
) -> Response<TestBody> {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    st.seen.lock().unwrap().push(Seen {
        method: req.method().clone(),
        path_and_query: path_and_query.clone(),
        version: req.version(),
        headers: req.headers().clone(),
        client_cn,
    });
    let path = req.uri().path().to_owned();
    if path.ends_with("/echo") {
        // Streams the request body straight back, with a status and headers the consumer must see unchanged.
        let mut response = Response::new(req.into_body().map_err(BoxError::from).boxed());
        *response.status_mut() = StatusCode::CREATED;
        response
            .headers_mut()
            .insert("x-provider", "echo".parse().unwrap());
        response
            .headers_mut()
            .insert("content-type", "application/fhir+json".parse().unwrap());
        return response;
    }
    if path.ends_with("/upload") || path.ends_with("/$gpc.getstructuredrecord") {
        // Read whole, as a provider reads a structured record request's `Parameters` before it answers.
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
            }
        }
        st.uploaded.store(total, Ordering::SeqCst);
        return text(StatusCode::OK, total.to_string());
    }
    if path.ends_with("/big") {
        let n: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return Response::new(RepeatBody::new(n, false).boxed());
    }
    if path.ends_with("/headers") {
        // A large response head: `bytes=N` adds one `x-fill` field of N letters, `fields=N` adds N small fields.
        let query = req.uri().query().unwrap_or_default();
        let number = |key: &str| -> usize {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let mut response = text(StatusCode::OK, "filled".into());
        let headers = response.headers_mut();
        if number("bytes") > 0 {
            headers.insert("x-fill", "f".repeat(number("bytes")).parse().unwrap());
        }
        for i in 0..number("fields") {
            headers.insert(
                http::HeaderName::from_bytes(format!("x-f{i}").as_bytes()).unwrap(),
                http::HeaderValue::from_static("v"),
            );
        }
        return response;
    }
    if path.ends_with("/slow") {
        let (tx, body) = ChannelBody::new();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"first,")).await;
            st.release_slow.notified().await;
            let _ = tx.send(Bytes::from_static(b"last")).await;
        });
        return Response::new(body.boxed());
    }
    if path.ends_with("/stall") {
        // Headers and one chunk, then silence forever.
        let (tx, body) = ChannelBody::new();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"partial")).await;
            tx.closed().await;
        });
        return Response::new(body.boxed());
    }
    if path.ends_with("/infinite") {
        let (tx, body) = ChannelBody::new();
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            loop {
                if tx.send(chunk.clone()).await.is_err() {
                    st.broken.fetch_add(1, Ordering::SeqCst);
                    st.stream_broken.notify_one();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        return Response::new(body.boxed());
    }
    if path.ends_with("/silent") {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut response = text(StatusCode::OK, format!("provider saw {path_and_query}"));
    response
        .headers_mut()
        .insert("x-provider", "default".parse().unwrap());
    response
}

/// A provider that misbehaves below HTTP: TLS with the given config, then, by the request path's last segment,
/// `garbage` (an answer that is not HTTP), `reset` (headers promising 100000 bytes, 1000 of them, then a TCP
/// reset), `hangup` (the connection closed before any answer). Counts its requests.
pub struct FaultProvider {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
}

impl FaultProvider {
    /// A fault provider with the PKI's provider certificate (the registered name `provider.dev.localhost`).
    pub async fn for_pki(pki: &Pki) -> Self {
        Self::start(
            ssp::demo::provider_tls(
                &pki.path("provider.crt"),
                &pki.path("provider.key"),
                &pki.ca(),
            )
            .unwrap(),
        )
        .await
    }

    pub async fn start(tls: Arc<rustls::ServerConfig>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        let acceptor = TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, count) = (acceptor.clone(), Arc::clone(&count));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    let path = line.split(' ').nth(1).unwrap_or("");
                    if path.ends_with("/garbage") {
                        let _ = tls
                            .write_all(b"SPDY/9 WHAT\r\n\x00\x01\x02 not http at all\r\n\r\n")
                            .await;
                        let _ = tls.flush().await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    } else if let Some(answer) = raw_answer(path) {
                        let _ = tls.write_all(answer).await;
                        let _ = tls.flush().await;
                        // Held open until the proxy closes: the answer says where it ends, or not at all.
                        let _ = tls.read(&mut buf).await;
                    } else if path.ends_with("/http10-cut") {
                        // Close-delimited (HTTP/1.0, no length), 1000 bytes, then a reset: only the reset says the
                        // body is incomplete.
                        let _ = tls
                            .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                            .await;
                        let _ = tls.write_all(&[b'c'; 1000]).await;
                        let _ = tls.flush().await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let (tcp, _) = tls.into_inner();
                        let _ = tcp.set_zero_linger();
                        drop(tcp);
                    } else if path.ends_with("/reset") {
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100000\r\n\r\n")
                            .await;
                        let _ = tls.write_all(&[b'r'; 1000]).await;
                        let _ = tls.flush().await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        // A reset, not a clean close: linger 0 makes close send RST.
                        let (tcp, _) = tls.into_inner();
                        let _ = tcp.set_zero_linger();
                        drop(tcp);
                    }
                    // `hangup` and anything else: drop the connection without a word.
                });
            }
        });
        Self { addr, requests }
    }
}

/// The [`FaultProvider`]'s whole answers by the request path's last segment: framing a proxy must not pass on
/// as it stands.
fn raw_answer(path: &str) -> Option<&'static [u8]> {
    let last = path.rsplit('/').next().unwrap_or("");
    Some(match last {
        // Both framings (RFC 9112 section 6.3: Transfer-Encoding wins); the length counts the coded bytes.
        "cl-chunked" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // A switch the request never asked for.
        "switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        // A status outside 100 to 599.
        "status-600" => b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
        // A coding under the chunks that nobody on the way decodes.
        "gzip-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // Chunked applied twice.
        "chunked-twice" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        _ => return None,
    })
}

pub fn text(status: StatusCode, body: String) -> Response<TestBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// A body of `len` bytes in 64 KiB frames, generated on the fly (never held in memory).
pub struct RepeatBody {
    chunk: Bytes,
    remaining: u64,
    exact: bool,
}

impl RepeatBody {
    pub fn new(len: u64, exact: bool) -> Self {
        Self {
            chunk: Bytes::from(vec![b'a'; 64 * 1024]),
            remaining: len,
            exact,
        }
    }
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// A body fed from a channel, one frame per message.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl ChannelBody {
    pub fn new() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(1);
        (tx, Self(rx))
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The proxy.

/// Knobs for a test's config.
#[derive(Clone)]
pub struct Setup {
    pub response_timeout: &'static str,
    pub body_idle_timeout: &'static str,
    pub tls_versions: &'static str,
    pub handshake_timeout: &'static str,
    /// `jwt.mode`.
    pub jwt_mode: &'static str,
    /// `audit.dir`, relative to the config's folder.
    pub audit_dir: &'static str,
    /// `audit.durability`.
    pub durability: &'static str,
    pub header_read_timeout: &'static str,
    /// An extra `[upstream.resolve]` line.
    pub extra_resolve: String,
    /// `server.max_connections`.
    pub max_connections: usize,
    /// The body of the `[limits]` section.
    pub limits: String,
    /// More policy text (endpoints and agreements of a test's own), appended to `policies/test.toml`.
    pub extra_policy: String,
    /// More `[server]` lines (`http2_idle_timeout = "2s"`, `crl_expired = "allow"`, ...).
    pub extra_server: String,
    /// `server.crl`, relative to the config's folder.
    pub crl: &'static str,
    /// `admin.listen`.
    pub admin: String,
    /// Serve on the test's runtime instead of on worker threads (for a test that moves tokio's clock).
    pub on_test_runtime: bool,
    /// More `[audit]` lines (`segment_size = "4KiB"`, ...).
    pub extra_audit: String,
    /// Whole sections appended to the config (`[patient_facing]` ...).
    pub extra_config: String,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            response_timeout: "10s",
            body_idle_timeout: "10s",
            tls_versions: r#"["1.2", "1.3"]"#,
            handshake_timeout: "5s",
            jwt_mode: "enforce",
            audit_dir: "data/audit",
            durability: "batched",
            header_read_timeout: "5s",
            extra_resolve: String::new(),
            max_connections: 10_000,
            limits: String::new(),
            extra_policy: String::new(),
            extra_server: String::new(),
            crl: "certs/ca.crl",
            admin: "127.0.0.1:0".into(),
            on_test_runtime: false,
            extra_audit: String::new(),
            extra_config: String::new(),
        }
    }
}

/// The endpoint URL registered for the test provider.
pub fn endpoint_url(provider: SocketAddr) -> String {
    format!("https://provider.dev.localhost:{}/gp", provider.port())
}

/// Writes `ssp.toml` and `policies/test.toml` into the PKI's folder; returns the config path.
pub fn write_config(
    pki: &Pki,
    provider: SocketAddr,
    down: SocketAddr,
    listen: SocketAddr,
    setup: &Setup,
) -> PathBuf {
    let dir = pki.dir.path();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let config = format!(
        r#"
[server]
listen = "{listen}"
cert = "certs/proxy-server.crt"
key = "certs/proxy-server.key"
client_ca = ["certs/ca.crt"]
crl = ["{crl}"]
tls_versions = {tls}
handshake_timeout = "{hst}"
header_read_timeout = "{hrt}"
max_connections = {max_connections}
{extra_server}

[upstream]
cert = "certs/proxy-client.crt"
key = "certs/proxy-client.key"
ca = ["certs/ca.crt"]
connect_timeout = "2s"
response_timeout = "{rt}"
body_idle_timeout = "{bit}"

[upstream.resolve]
"provider.dev.localhost:{pport}" = "{provider}"
"provider2.dev.localhost:{dport}" = "{down}"
{extra}

[policy]
dir = "policies"

[jwt]
mode = "{jwt_mode}"

[admin]
listen = "{admin}"

[audit]
dir = "{audit_dir}"
durability = "{durability}"
instance = "test-instance"
{extra_audit}

[limits]
{limits}

{extra_config}
"#,
        extra_config = setup.extra_config,
        max_connections = setup.max_connections,
        extra_server = setup.extra_server,
        admin = setup.admin,
        crl = setup.crl,
        limits = setup.limits,
        audit_dir = setup.audit_dir,
        extra_audit = setup.extra_audit,
        durability = setup.durability,
        jwt_mode = setup.jwt_mode,
        tls = setup.tls_versions,
        hst = setup.handshake_timeout,
        hrt = setup.header_read_timeout,
        rt = setup.response_timeout,
        bit = setup.body_idle_timeout,
        pport = provider.port(),
        dport = down.port(),
        extra = setup.extra_resolve,
    );
    let policy = format!(
        r#"
[[system]]
asid = "{FROM}"
name = "Hospital"
ods = "RXX01"
fqdn = "{CONSUMER_NAME}"
interactions = ["{METADATA}", "{STRUCTURED}"]

[[system]]
asid = "{FROM_2}"
name = "111"
ods = "RYY01"
fqdn = "{CONSUMER2_NAME}"
interactions = ["{METADATA}"]

[[system]]
asid = "{FROM_SIGNED}"
name = "Signing hospital"
ods = "RZZ01"
fqdn = "{CONSUMER_NAME}"
interactions = ["{METADATA}"]
jwt_keys = ["jwt/signing.pem"]

[[endpoint]]
asid = "{TO}"
party_key = "B82617-807724"
cpa_id = "S20001A000123"
ods = "B82617"
url = "{url}"
interactions = ["{METADATA}", "{STRUCTURED}"]

[[endpoint]]
asid = "{TO_DOWN}"
party_key = "B82618-807725"
cpa_id = "S20001A000124"
ods = "B82618"
url = "https://provider2.dev.localhost:{dport}/gp"
interactions = ["{METADATA}"]

[[agreement]]
id = "DSA-1"
from = "{FROM}"
to = "{TO}"
interactions = ["*"]

[[agreement]]
id = "DSA-3"
from = "{FROM_SIGNED}"
to = "{TO}"
interactions = ["*"]

[[agreement]]
id = "DSA-2"
from = "{FROM}"
to = "{TO_DOWN}"
interactions = ["*"]
"#,
        url = endpoint_url(provider),
        dport = down.port(),
    );
    // The signed-token system's key pair (EC P-256, ES256).
    std::fs::create_dir_all(dir.join("policies/jwt")).unwrap();
    let signing = rcgen::KeyPair::generate().unwrap();
    std::fs::write(
        dir.join("policies/jwt/signing.pem"),
        signing.public_key_pem(),
    )
    .unwrap();
    std::fs::write(dir.join("certs/jwt-signing.key"), signing.serialize_pem()).unwrap();
    std::fs::write(dir.join("ssp.toml"), config).unwrap();
    std::fs::write(dir.join("policies/test.toml"), policy + &setup.extra_policy).unwrap();
    dir.join("ssp.toml")
}

/// An address on which nothing listens (bound then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// The proxy running in-process; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// A whole test world: PKI, provider, proxy.
pub struct World {
    pub pki: Pki,
    pub provider: Provider,
    pub proxy: Proxy,
    pub url: String,
    /// The admin listener (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
    /// The TLS material in force, for reloads.
    pub tls: Arc<ssp::tls::Reloadable>,
    /// Where the registered but stopped provider2 "listens" (nothing does).
    pub down: SocketAddr,
    pub config: ssp::config::Config,
    /// The running pipeline, for reloads.
    pub handle: Arc<ssp::proxy::Proxy>,
    /// The running instance's metrics.
    pub metrics: Arc<ssp::metrics::Metrics>,
    /// The patient-facing listener, with `[patient_facing]`.
    pub patient_facing: Option<SocketAddr>,
}

impl World {
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> Self {
        Self::start_in(Pki::generate(), setup).await
    }

    /// Starts the world on a PKI the test already uses (for providers of its own).
    pub async fn start_in(pki: Pki, setup: Setup) -> Self {
        let provider = Provider::start(&pki).await;
        Self::start_with_provider(pki, provider, setup).await
    }

    /// Starts the world around a provider the test started (whose address its policy may name).
    pub async fn start_with_provider(pki: Pki, provider: Provider, setup: Setup) -> Self {
        let down = closed_port().await;
        let path = write_config(
            &pki,
            provider.addr,
            down,
            "127.0.0.1:0".parse().unwrap(),
            &setup,
        );
        let config = ssp::config::Config::load(&path).unwrap();
        let assembled = ssp::app::assemble(&config).unwrap();
        let mut server = ssp::app::bind(&config, assembled).await.unwrap();
        if setup.on_test_runtime {
            server = server.on_caller_runtime();
        }
        let addr = server.local_addr().unwrap();
        let patient_facing = server.patient_facing_addr().map(|a| a.unwrap());
        let handles = server.handles();
        let admin = server.admin_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        let url = endpoint_url(provider.addr);
        Self {
            pki,
            provider,
            proxy: Proxy { addr, _stop: stop },
            url,
            down,
            config,
            handle: handles.proxy,
            metrics: handles.metrics,
            admin,
            tls: handles.tls,
            patient_facing,
        }
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.pki.dir.path().join("data/audit")
    }

    /// Waits until the audit log holds at least `n` records (seals excluded) and returns them all.
    pub async fn records(&self, n: usize) -> Vec<serde_json::Value> {
        audit_records(&self.audit_dir(), n).await
    }

    /// Sends `GET <endpoint url><tail>` as the consumer, for the metadata interaction, and returns the response
    /// once its headers arrive.
    pub async fn get(&self, tail: &str) -> Response<Incoming> {
        let req = ssp_request(Method::GET, &format!("/{}{tail}", self.url), METADATA)
            .body(empty())
            .unwrap();
        within(tail, self.consumer("consumer").send(req))
            .await
            .unwrap()
    }

    /// Makes the running audit log fail, as a disk that goes bad does: the folder is moved away and a regular file
    /// put in its place, and requests are sent until the log's next segment cannot be made (start the world with a
    /// small `audit.segment_size`) and a request is refused with 503. Returns the requests the provider had seen
    /// by then.
    pub async fn break_audit_log(&self) -> usize {
        let dir = self.audit_dir();
        std::fs::rename(&dir, dir.with_extension("moved")).unwrap();
        std::fs::write(&dir, "not a folder").unwrap();
        for _ in 0..100 {
            let req = ssp_request(
                Method::GET,
                &format!("/{}/fhir/metadata", self.url),
                METADATA,
            )
            .body(empty())
            .unwrap();
            let answer = within("a request", self.consumer("consumer").fetch(req))
                .await
                .unwrap();
            if answer.status == StatusCode::SERVICE_UNAVAILABLE {
                return self.provider.seen().len();
            }
        }
        panic!("the audit log never failed");
    }

    /// A consumer presenting the PKI's certificate `stem` (e.g. `consumer`).
    pub fn consumer(&self, stem: &str) -> Consumer {
        Consumer::new(&self.pki, Some(stem), self.proxy.addr, false)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The consumer.

/// An mTLS consumer of the proxy.
#[derive(Clone)]
pub struct Consumer {
    connector: TlsConnector,
    addr: SocketAddr,
    h2: bool,
}

impl Consumer {
    /// `stem` names the client certificate in the PKI (`None`: no certificate); `h2` offers only HTTP/2.
    pub fn new(pki: &Pki, stem: Option<&str>, addr: SocketAddr, h2: bool) -> Self {
        let roots = ssp::tls::load_roots("ca", &pki.ca()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(ssp::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match stem {
            Some(stem) => builder
                .with_client_auth_cert(
                    ssp::tls::load_certs("c", &pki.path(&format!("{stem}.crt"))).unwrap(),
                    ssp::tls::load_key("k", &pki.path(&format!("{stem}.key"))).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Self {
            connector: TlsConnector::from(Arc::new(config)),
            addr,
            h2,
        }
    }

    /// A raw TLS connection to the proxy, for tests that write bytes by hand.
    pub async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::IpAddress(self.addr.ip().into());
        self.connector.connect(name, tcp).await.unwrap()
    }

    /// A raw TLS connection offering ALPN `h2` only, for tests that set up their own HTTP/2 client.
    pub async fn tls_h2(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tls = self.tls().await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls
    }

    /// Connects and returns a request sender on one connection.
    pub async fn connect(&self) -> Result<Sender, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        self.connect_over(tcp).await
    }

    /// TLS and HTTP over a TCP connection the test opened itself (from a chosen source address, or after a PROXY
    /// protocol header of its own); the server is verified as the consumer's `addr`.
    pub async fn connect_over(&self, tcp: TcpStream) -> Result<Sender, String> {
        let tls = self
            .connector
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let io = TokioIo::new(tls);
        if self.h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Sender::H1(sender))
        }
    }

    /// Sends one request on a fresh connection.
    pub async fn send(&self, req: Request<TestBody>) -> Result<Response<Incoming>, String> {
        self.connect().await?.send(req).await
    }

    /// Sends one request and reads the whole answer.
    pub async fn fetch(&self, req: Request<TestBody>) -> Result<Answer, String> {
        let response = self.send(req).await?;
        Answer::read(response).await
    }
}

pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl Sender {
    pub async fn send(&mut self, mut req: Request<TestBody>) -> Result<Response<Incoming>, String> {
        let result = match self {
            Sender::H1(s) => {
                s.ready().await.map_err(|e| chain(&e))?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                *req.version_mut() = Version::HTTP_2;
                // HTTP/2 wants an absolute URI for :scheme and :authority.
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                *req.uri_mut() = format!("https://ssp.dev.localhost{pq}").parse().unwrap();
                req.headers_mut().remove("host");
                s.ready().await.map_err(|e| chain(&e))?;
                s.send_request(req).await
            }
        };
        result.map_err(|e| chain(&e))
    }
}

pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub async fn read(response: Response<Incoming>) -> Result<Answer, String> {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| chain(&e))?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts the answer is an SSP OperationOutcome with this status, issue code and text.
    pub fn assert_outcome(&self, status: u16, code: &str, text: &str) {
        assert_eq!(self.status.as_u16(), status, "status; body {:?}", self.body);
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome");
        let issue = &v["issue"][0];
        assert_eq!(issue["code"], code);
        let coding = &issue["details"]["coding"][0];
        assert_eq!(
            coding["system"],
            ssp::proxy::operation_outcome::CODING_SYSTEM
        );
        assert_eq!(coding["code"], status.to_string());
        assert_eq!(coding["display"], text);
        assert_eq!(issue["diagnostics"], text);
        assert_eq!(self.headers["cache-control"], "no-store");
        assert!(
            self.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/fhir+json")
        );
    }
}

/// The claims of a valid GP Connect 1.x token for `aud` and the scope `interaction` needs, issued now.
pub fn claims(aud: &str, interaction: &str) -> serde_json::Value {
    let scope = ssp::ids::InteractionId::parse(interaction)
        .as_ref()
        .and_then(ssp::jwt::required_scope)
        .unwrap_or("patient/*.read");
    let token = ssp::demo::dev_jwt(aud, scope);
    ssp::jwt::decode(&token, None)
        .map(|(_, c)| serde_json::Value::Object(c))
        .unwrap()
}

/// `Bearer <unsigned token>` for these claims.
pub fn bearer(claims: &serde_json::Value) -> String {
    format!("Bearer {}", ssp::jwt::encode_unsigned(claims))
}

/// The endpoint URL a test path targets: everything up to `/gp` (the test endpoint root).
pub fn audience(path: &str) -> String {
    let target = path.trim_start_matches('/');
    match target.find("/gp") {
        Some(i) => target[..i + 3].to_owned(),
        None => target.to_owned(),
    }
}

/// A request builder with the four `Ssp-*` headers and a valid token, for `path` (which starts with `/https://`).
pub fn ssp_request(method: Method, path: &str, interaction: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "ssp.dev.localhost")
        .header("Ssp-TraceID", TRACE_ID)
        .header("Ssp-From", FROM)
        .header("Ssp-To", TO)
        .header("Ssp-InteractionID", interaction)
        .header(
            "Authorization",
            bearer(&claims(&audience(path), interaction)),
        )
}

/// The `n`th trace id of a test: a GUID whose last group is `n`.
pub fn trace_id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A GET of `tail` under the endpoint `url` for the metadata interaction, with its own trace id.
pub fn traced_get(url: &str, tail: &str, trace_id: &str) -> Request<TestBody> {
    let mut r = ssp_request(Method::GET, &format!("/{url}{tail}"), METADATA)
        .body(empty())
        .unwrap();
    r.headers_mut()
        .insert("ssp-traceid", trace_id.parse().unwrap());
    r
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|e: Infallible| match e {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// Reads a body frame by frame, counting bytes without keeping them.
pub async fn drain(mut body: Incoming) -> Result<u64, String> {
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| chain(&e))?;
        if let Some(d) = frame.data_ref() {
            total += d.len() as u64;
        }
    }
    Ok(total)
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A KiB figure (`VmHWM:`, `VmRSS:` ...) from `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until the audit log in `dir` holds at least `n` records (seals excluded); response records are written
/// when an exchange ends, a moment after the consumer has its answer.
pub async fn audit_records(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let records = ssp::audit::query(dir, &ssp::audit::Filter::default()).unwrap_or_default();
        if records.len() >= n {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} audit records, found {}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `response` record of `trace_id` in the audit log in `dir`, once written (bounded by [`STEP`]).
pub async fn response_record(dir: &Path, trace_id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let found = audit_records(dir, 0)
            .await
            .into_iter()
            .find(|r| r["trace_id"] == trace_id && r["kind"] == "response");
        if let Some(record) = found {
            return record;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no response record for {trace_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admin listener's whole `/metrics` answer (status line and headers included), over a raw connection.
pub async fn metrics_text(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    within("metrics", tcp.read_to_string(&mut text))
        .await
        .unwrap();
    text
}

/// One sample of a counter or gauge (`name{labels}`) from the admin listener's `/metrics`; 0 when absent.
pub async fn metric_value(admin: SocketAddr, series: &str) -> u64 {
    metrics_text(admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// Sends a signal (`TERM`, `INT`) to a child process through the shell's `kill` builtin.
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Path helper for binaries.
pub fn ssp_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ssp"))
}

/// `ssp serve` running as a child; killed when dropped.
pub struct Served {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Where the registered but stopped provider2 "listens" (nothing does).
    pub down: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config for `provider` on a free port and starts `ssp serve` on it, waiting until it accepts.
pub async fn serve(pki: &Pki, provider: SocketAddr) -> Served {
    serve_with_env(pki, provider, &[]).await
}

/// As [`serve`], with extra environment for the child (e.g. `NOTIFY_SOCKET`).
pub async fn serve_with_env(pki: &Pki, provider: SocketAddr, env: &[(&str, &str)]) -> Served {
    serve_setup(pki, provider, &Setup::default(), env, ChildLog::Inherit).await
}

/// Where a child `ssp serve`'s standard error goes. A file is cloned for each start, so a retried start writes to
/// it too.
pub enum ChildLog {
    Null,
    Inherit,
    File(std::fs::File),
}

impl ChildLog {
    fn stdio(&self) -> std::process::Stdio {
        match self {
            ChildLog::Null => std::process::Stdio::null(),
            ChildLog::Inherit => std::process::Stdio::inherit(),
            ChildLog::File(file) => file.try_clone().unwrap().into(),
        }
    }
}

impl From<std::fs::File> for ChildLog {
    fn from(file: std::fs::File) -> Self {
        ChildLog::File(file)
    }
}

/// As [`serve`], with a test's own config knobs, environment, and somewhere for the child's log to go.
///
/// The listening port is one the kernel handed out and the test let go: another socket can take it before the
/// child binds it (another test's listener, or a connection's local port). A child that exits before it listens
/// is started again on new ports, three times at most; a child still running and not listening after 20 s fails
/// the test.
pub async fn serve_setup(
    pki: &Pki,
    provider: SocketAddr,
    setup: &Setup,
    env: &[(&str, &str)],
    log: ChildLog,
) -> Served {
    const STARTS: usize = 3;
    for start in 1..=STARTS {
        let addr = closed_port().await;
        let down = closed_port().await;
        let config = write_config(pki, provider, down, addr, setup);
        let child = std::process::Command::new(ssp_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log.stdio())
            .spawn()
            .unwrap();
        let mut served = Served { child, addr, down };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return served;
            }
            if let Some(status) = served.child.try_wait().unwrap() {
                assert!(
                    start < STARTS,
                    "ssp serve exited ({status}) before listening, {STARTS} times"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ssp serve did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    unreachable!("every start returns or fails the test")
}

/// Runs the `ssp` binary; returns its exit code and its stdout and stderr together.
pub fn ssp_cmd(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(ssp_bin())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A config for a PKI whose providers are not running (commands that never forward), as `--config`'s argument.
pub async fn offline_config(pki: &Pki) -> String {
    let path = write_config(
        pki,
        closed_port().await,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        &Setup::default(),
    );
    path.display().to_string()
}
