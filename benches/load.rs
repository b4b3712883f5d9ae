//! Load benchmark: GP Connect traffic sent directly to a provider, through ssp (the release build, as operators
//! run it: every check, the JWT validated, audit records written, limits on), and, when they are installed,
//! through nginx and HAProxy configured as mutual-TLS-on-both-legs reverse proxies, all in one run, so that every
//! figure is a ratio to a direct connection measured on the same machine at the same time.
//!
//! Run: `benches/load.sh` (installs nginx and HAProxy when it can, then `cargo bench --bench load`).
//! Environment: `SSP_BENCH_SECS` (default 5) per phase, `SSP_BENCH_ROUNDS` (default 3; the median round is
//! reported), `SSP_BENCH_ONLY` (a comma-separated list of scenario names), `SSP_BENCH_PEERS=0` to skip nginx and
//! HAProxy even when installed; `SSP_BENCH_SSP_BIN` to measure another build of ssp (one with frame pointers for
//! `perf record -g`, say); `SSP_BENCH_COMPARE` to measure a second build beside it in the same run, as `ssp B`
//! and `ssp B strict` (the way to compare two builds on this noisy machine); `SSP_BENCH_PATIENTS=1` to run `ssp B`
//! (this build unless `SSP_BENCH_COMPARE` names another) with the patient index on (`[audit.patients]`, `redact =
//! true`, `read_bodies = false`), and an NHS number in the small GET's query for every target, so that `ssp B`
//! beside `ssp` is the index's cost; `SSP_BENCH_PATIENTS=swap` the other way round (the first `ssp` with the index,
//! `ssp B` without), a control for the order the instances run in. `SSP_BENCH_SHIP=1` runs `ssp B` with `[audit.ship]`
//! on, shipping every record over TLS to a collector (this binary again, `SSP_BENCH_ROLE=collector`: it reads each
//! connection to its end and closes it, as rsyslog does), so that `ssp B` beside `ssp` is what shipping costs;
//! `SSP_BENCH_SHIP=swap` the other way round.
//!
//! Processes: this one (the driver and the load generator, on hyper + rustls), the provider (this same binary,
//! re-executed with `SSP_BENCH_ROLE=provider`), two ssp instances (`durability = "batched"` and `"strict"`),
//! nginx and HAProxy. Each proxy's CPU time and peak resident memory are read from /proc for its own processes.
//! The PKI is RSA-2048, as in the reference figures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark setup: a failure is a bench failure"
)]

use std::convert::Infallible;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

/// The dev provider endpoint the policy registers; ssp requests name it in their target URL.
const ENDPOINT: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect";
/// The same endpoint's path, as a direct client or a reverse proxy sends it.
const BASE: &str = "/B82617/STU3/1/gpconnect";
const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
const STRUCTURED: &str =
    "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
/// The small response of the reference figures.
const SMALL: usize = 2560;
/// Frame size of large bodies, both ways.
const CHUNK: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------------------------
// Bodies.

/// `remaining` bytes served as slices of one shared chunk: no copy and no allocation per frame, so neither the
/// provider nor the load generator adds body costs to the figures.
struct Repeat {
    chunk: Bytes,
    remaining: u64,
}

impl Repeat {
    fn new(chunk: &Bytes, len: u64) -> Self {
        Self {
            chunk: chunk.clone(),
            remaining: len,
        }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = this.remaining.min(this.chunk.len() as u64);
        this.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Reads a body to its end, counting its bytes without keeping them.
async fn drain(mut body: Incoming) -> Result<u64, hyper::Error> {
    use http_body_util::BodyExt;
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------------------------
// The provider process.

/// Serves `GET {BASE}/fhir/metadata` (2.5 KB), `GET {BASE}/fhir/Binary/<bytes>` (a body of that many bytes) and
/// `POST` (reads the body, answers 2.5 KB) over TLS with client authentication. Prints its port on stdout.
fn provider_main(certs: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (acceptor, listener) = listen_tls(certs).await;
        let small = Bytes::from(vec![b'x'; SMALL]);
        let chunk = Bytes::from(vec![b'y'; CHUNK]);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, small, chunk) = (acceptor.clone(), small.clone(), chunk.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (small, chunk) = (small.clone(), chunk.clone());
                    async move {
                        let len = match req.uri().path().rsplit_once("/Binary/") {
                            Some((_, n)) => n.parse().unwrap_or(0),
                            None => SMALL as u64,
                        };
                        let body = if req.method() == Method::POST {
                            drain(req.into_body()).await?;
                            Repeat::new(&small, SMALL as u64)
                        } else if len == SMALL as u64 {
                            Repeat::new(&small, len)
                        } else {
                            Repeat::new(&chunk, len)
                        };
                        let mut response = Response::new(body);
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/fhir+json"),
                        );
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

/// The provider's certificate (client certificates of the bench CA required) on a loopback port, which is printed
/// for the driver.
async fn listen_tls(certs: &Path) -> (tokio_rustls::TlsAcceptor, TcpListener) {
    let tls = ssp::demo::provider_tls(
        &certs.join("provider.crt"),
        &certs.join("provider.key"),
        &[certs.join("ca.crt")],
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    (tokio_rustls::TlsAcceptor::from(tls), listener)
}

/// `SSP_BENCH_ROLE=collector`: a syslog collector's end of `[audit.ship]`, TLS with client certificates of the bench
/// CA, that reads each connection to its end (the messages are not parsed) and then closes it.
fn collector_main(certs: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (acceptor, listener) = listen_tls(certs).await;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 64 << 10];
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                let _ = tls.shutdown().await;
            });
        }
    });
}

/// `SSP_BENCH_SHIP`: which instance ships its log (`ssp B`, or with `swap` the first `ssp`).
fn ships(name: &str) -> bool {
    match std::env::var("SSP_BENCH_SHIP").as_deref() {
        Ok("swap") => name == "batched",
        Ok(_) => name.starts_with("compare"),
        Err(_) => false,
    }
}

/// The collector's port, once started.
static COLLECTOR: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

/// The patient-facing door of the batched instance: its listening port and the dev auth service's address (the
/// JWKS and the supplier's token endpoint, served by this process), and the patient's access token its clients
/// send (signed once; the proxy verifies it on every request).
static PATIENT_FACING: std::sync::OnceLock<(u16, SocketAddr, String)> = std::sync::OnceLock::new();

// ---------------------------------------------------------------------------------------------------------------
// What is measured.

#[derive(Clone, Copy, PartialEq)]
enum Work {
    Small,
    Download(u64),
    Upload(u64),
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    KeepAlive,
    /// A new TCP + TLS connection per request, resuming a TLS 1.3 session (or not).
    NewConnection {
        resume: bool,
    },
}

struct Scenario {
    name: &'static str,
    title: &'static str,
    shape: Shape,
    conns: usize,
    work: Work,
    /// Also measured through the `durability = "strict"` instance.
    strict: bool,
    /// Measured through the patient-facing door too (beside the direct connection and the clinical door).
    patient: bool,
}

fn scenarios() -> Vec<Scenario> {
    let all = vec![
        Scenario {
            name: "c1",
            title: "2.5 KB GET, 1 keep-alive connection (latency)",
            shape: Shape::KeepAlive,
            conns: 1,
            work: Work::Small,
            strict: false,
            patient: false,
        },
        Scenario {
            name: "c32",
            title: "2.5 KB GET, 32 keep-alive connections",
            shape: Shape::KeepAlive,
            conns: 32,
            work: Work::Small,
            strict: true,
            patient: false,
        },
        Scenario {
            name: "c256",
            title: "2.5 KB GET, 256 keep-alive connections",
            shape: Shape::KeepAlive,
            conns: 256,
            work: Work::Small,
            strict: false,
            patient: false,
        },
        Scenario {
            name: "resumed",
            title: "new connection per request, TLS 1.3 resumed, 32 clients",
            shape: Shape::NewConnection { resume: true },
            conns: 32,
            work: Work::Small,
            strict: false,
            patient: false,
        },
        Scenario {
            name: "full",
            title: "full mTLS handshake per request, 32 clients",
            shape: Shape::NewConnection { resume: false },
            conns: 32,
            work: Work::Small,
            strict: false,
            patient: false,
        },
        Scenario {
            name: "1mib",
            title: "1 MiB downloads, 8 connections",
            shape: Shape::KeepAlive,
            conns: 8,
            work: Work::Download(MIB),
            strict: false,
            patient: false,
        },
        Scenario {
            name: "100mib",
            title: "100 MiB download, 1 connection",
            shape: Shape::KeepAlive,
            conns: 1,
            work: Work::Download(100 * MIB),
            strict: false,
            patient: false,
        },
        Scenario {
            name: "upload",
            title: "10 MiB uploads, 1 connection",
            shape: Shape::KeepAlive,
            conns: 1,
            work: Work::Upload(10 * MIB),
            strict: false,
            patient: false,
        },
        Scenario {
            name: "pf32",
            title: "2.5 KB GET, 32 keep-alive connections, patient-facing door (ES256 token verified per request, supplier token cached) beside the clinical one",
            shape: Shape::KeepAlive,
            conns: 32,
            work: Work::Small,
            strict: false,
            patient: true,
        },
    ];
    match std::env::var("SSP_BENCH_ONLY") {
        Ok(only) => {
            let only: Vec<&str> = only.split(',').map(str::trim).collect();
            all.into_iter().filter(|s| only.contains(&s.name)).collect()
        }
        Err(_) => all,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    /// ssp: the SSP target URL form, `/https://host/...`.
    Ssp,
    /// A reverse proxy in front of the one provider: the provider's own path.
    Peer,
    /// ssp's patient-facing door: a route's path, an NHS login access token, `X-Request-ID`.
    Patient,
}

/// Where a phase sends its requests, and which processes serve them.
#[derive(Clone)]
struct Target {
    name: &'static str,
    kind: Kind,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    /// Resumption on (rustls' default in-memory session cache), and off.
    tls: Arc<rustls::ClientConfig>,
    tls_full: Arc<rustls::ClientConfig>,
    /// The proxy's processes (empty for the direct connection); CPU and memory are read for these.
    pids: Vec<u32>,
    strict: bool,
}

/// A client TLS config presenting `stem`'s certificate from the PKI.
fn client_tls(certs: &Path, stem: &str, resume: bool) -> Arc<rustls::ClientConfig> {
    let roots = ssp::tls::load_roots("ca", &[certs.join("ca.crt")]).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(ssp::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            ssp::tls::load_certs("c", &certs.join(format!("{stem}.crt"))).unwrap(),
            ssp::tls::load_key("k", &certs.join(format!("{stem}.key"))).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// One request of `work` for `target`. Every target gets the same SSP headers and token, so request sizes match;
/// only the path differs between the SSP form and a reverse proxy's.
fn request(
    target: &Target,
    work: Work,
    token: &str,
    chunk: &Bytes,
    close: bool,
) -> Request<Repeat> {
    let (method, suffix, interaction, upload) = match work {
        Work::Small if patients_on() => (
            Method::GET,
            "/fhir/metadata?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919".to_owned(),
            METADATA,
            0,
        ),
        Work::Small => (Method::GET, "/fhir/metadata".to_owned(), METADATA, 0),
        Work::Download(n) => (Method::GET, format!("/fhir/Binary/{n}"), METADATA, 0),
        Work::Upload(n) => (
            Method::POST,
            "/fhir/Patient/$gpc.getstructuredrecord".to_owned(),
            STRUCTURED,
            n,
        ),
    };
    if target.kind == Kind::Patient {
        let token = &PATIENT_FACING.get().unwrap().2;
        return Request::get(suffix)
            .header("host", "ssp.dev.localhost")
            .header("accept", "application/fhir+json")
            .header("x-request-id", ssp::ids::TraceId::new_random().as_str())
            .header("authorization", format!("Bearer {token}"))
            .body(Repeat::new(chunk, 0))
            .unwrap();
    }
    let path = match target.kind {
        Kind::Ssp => format!("/{ENDPOINT}{suffix}"),
        Kind::Direct | Kind::Peer | Kind::Patient => format!("{BASE}{suffix}"),
    };
    let host = match target.kind {
        Kind::Ssp => "ssp.dev.localhost",
        Kind::Direct | Kind::Peer | Kind::Patient => "provider.dev.localhost:9443",
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("accept", "application/fhir+json")
        .header("ssp-traceid", ssp::ids::TraceId::new_random().as_str())
        .header("ssp-from", "200000000359")
        .header("ssp-to", "918999198993")
        .header("ssp-interactionid", interaction)
        .header("authorization", token);
    if upload > 0 {
        builder = builder.header("content-type", "application/fhir+json");
    }
    if close {
        builder = builder.header("connection", "close");
    }
    builder.body(Repeat::new(chunk, upload)).unwrap()
}

/// What one phase (one target, one scenario, one round) measured.
#[derive(Default)]
struct Phase {
    requests: u64,
    errors: u64,
    bytes: u64,
    elapsed: Duration,
    /// Microseconds, sorted.
    latencies: Vec<u32>,
    /// The proxy's CPU time over the phase, and its peak resident memory during it (KiB).
    cpu: Duration,
    /// The part of `cpu` spent in user space.
    user_cpu: Duration,
    peak_kib: u64,
    /// `SSP_BENCH_PERF`: system calls and context switches of the proxy's processes over the phase (perf stat),
    /// and the CPU time of its `ssp-audit` and `ssp-audit-sync` threads.
    kernel: Option<(u64, u64)>,
    audit_cpu: [Duration; 2],
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies[i]) / 1000.0
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }

    fn cpu_ms_per_mb(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e3 / (self.bytes as f64 / 1e6).max(1e-9)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// /proc.

/// `pid` and every process whose parent it is (nginx's workers).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// User-space and kernel CPU time of `pids`, all their threads (`utime` and `stime` of proc(5)).
fn cpu_time(pids: &[u32]) -> [Duration; 2] {
    let mut ticks = [0u64; 2];
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        for (which, field) in [11, 12].into_iter().enumerate() {
            ticks[which] += fields
                .get(field)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    // USER_HZ is 100 on Linux.
    ticks.map(|t| Duration::from_millis(t * 10))
}

/// The processes' resident memory now, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Samples the processes' resident memory every 10 ms until stopped; the peak, in KiB. (`VmHWM` is the peak of
/// the whole life of a process, and resetting it through `clear_refs` is not allowed everywhere.)
struct PeakSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakSampler {
    fn start(pids: &[u32]) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, pids) = (Arc::clone(&stop), pids.to_vec());
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(&pids));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(rss_kib(&pids))
        });
        Self { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The load generator.

/// Per connection task: latencies (µs), errors, body bytes moved.
type TaskResult = (Vec<u32>, u64, u64);

async fn connect(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
) -> Option<hyper::client::conn::http1::SendRequest<Repeat>> {
    let tcp = TcpStream::connect(target.addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(target.server_name.clone(), tcp)
        .await
        .ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// Sends one request and reads its answer to the end: the body bytes moved, or `None` on any failure.
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Repeat>,
    req: Request<Repeat>,
    work: Work,
) -> Option<u64> {
    sender.ready().await.ok()?;
    let response = sender.send_request(req).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let down = drain(response.into_body()).await.ok()?;
    Some(match work {
        Work::Small | Work::Download(_) => down,
        Work::Upload(n) => n,
    })
}

async fn client_task(
    target: Target,
    scenario_shape: Shape,
    work: Work,
    deadline: Instant,
) -> TaskResult {
    // Consumers mint a token per request; minting is the consumer's cost, so one per connection here.
    let scope = match work {
        Work::Upload(_) => "patient/*.read",
        _ => "organization/*.read",
    };
    let token = format!("Bearer {}", ssp::demo::dev_jwt(ENDPOINT, scope));
    let chunk = Bytes::from(vec![b'z'; CHUNK]);
    let (mut latencies, mut errors, mut bytes) = (Vec::new(), 0u64, 0u64);
    match scenario_shape {
        Shape::KeepAlive => {
            let Some(mut sender) = connect(&target, &target.tls).await else {
                return (latencies, 1, 0);
            };
            while Instant::now() < deadline {
                let req = request(&target, work, &token, &chunk, false);
                let t0 = Instant::now();
                match exchange(&mut sender, req, work).await {
                    Some(n) => {
                        latencies.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        bytes += n;
                    }
                    None => {
                        errors += 1;
                        // Reconnect rather than count the same broken connection again.
                        match connect(&target, &target.tls).await {
                            Some(s) => sender = s,
                            None => break,
                        }
                    }
                }
            }
        }
        Shape::NewConnection { resume } => {
            let tls = if resume {
                &target.tls
            } else {
                &target.tls_full
            };
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let result = match connect(&target, tls).await {
                    Some(mut sender) => {
                        let req = request(&target, work, &token, &chunk, true);
                        exchange(&mut sender, req, work).await
                    }
                    None => None,
                };
                match result {
                    Some(n) => {
                        latencies.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        bytes += n;
                    }
                    None => errors += 1,
                }
            }
        }
    }
    (latencies, errors, bytes)
}

/// `perf stat` counting system calls and context switches of `pids` until it is interrupted.
fn start_perf(pids: &[u32]) -> Option<Child> {
    if std::env::var_os("SSP_BENCH_PERF").is_none() || pids.is_empty() {
        return None;
    }
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches",
            "-p",
        ])
        .arg(list.join(","))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()
}

/// Stops `perf stat` and reads its two counts.
fn finish_perf(perf: Child) -> Option<(u64, u64)> {
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let out = perf.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let count = |event: &str| {
        text.lines()
            .find(|l| l.contains(event))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((count("raw_syscalls:sys_enter")?, count("context-switches")?))
}

/// CPU time of the threads of `pids` named `ssp-audit` (the writer), and of those named `ssp-audit-sync` (the
/// batched mode's fsyncs).
fn audit_threads_cpu(pids: &[u32]) -> [Duration; 2] {
    let mut ticks = [0; 2];
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let which = match comm.trim_end() {
                "ssp-audit" => 0,
                "ssp-audit-sync" => 1,
                _ => continue,
            };
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let fields: Vec<u64> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            ticks[which] += fields.iter().sum::<u64>();
        }
    }
    ticks.map(|t| Duration::from_millis(t * 10))
}

async fn run_phase(target: &Target, scenario: &Scenario, secs: u64) -> Phase {
    let sampler = PeakSampler::start(&target.pids);
    let cpu_before = cpu_time(&target.pids);
    let audit_before = audit_threads_cpu(&target.pids);
    let perf = start_perf(&target.pids);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..scenario.conns)
        .map(|_| {
            tokio::spawn(client_task(
                target.clone(),
                scenario.shape,
                scenario.work,
                deadline,
            ))
        })
        .collect();
    let mut phase = Phase::default();
    for task in tasks {
        let (latencies, errors, bytes) = task.await.unwrap();
        phase.latencies.extend(latencies);
        phase.errors += errors;
        phase.bytes += bytes;
    }
    phase.elapsed = started.elapsed();
    let cpu_after = cpu_time(&target.pids);
    phase.user_cpu = cpu_after[0].saturating_sub(cpu_before[0]);
    phase.cpu = phase.user_cpu + cpu_after[1].saturating_sub(cpu_before[1]);
    let audit_after = audit_threads_cpu(&target.pids);
    phase.audit_cpu = [0, 1].map(|i| audit_after[i].saturating_sub(audit_before[i]));
    phase.kernel = perf.and_then(finish_perf);
    phase.peak_kib = sampler.finish();
    phase.requests = phase.latencies.len() as u64;
    phase.latencies.sort_unstable();
    phase
}

// ---------------------------------------------------------------------------------------------------------------
// Processes under test.

/// Children stopped when the benchmark ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(500));
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn installed(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn start_provider(certs: &Path, children: &mut Children) -> SocketAddr {
    start_role("provider", certs, children)
}

/// Runs this binary again in `role`, which prints the port it listens on.
fn start_role(role: &str, certs: &Path, children: &mut Children) -> SocketAddr {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("SSP_BENCH_ROLE", role)
        .env("SSP_BENCH_CERTS", certs)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    children.0.push(child);
    SocketAddr::from(([127, 0, 0, 1], line.trim().parse::<u16>().unwrap()))
}

/// The config of an ssp under test, its paths relative to the bench folder: every check on, the JWT enforced,
/// limits set high enough never to refuse. `benches/allocs.sh` measures the same config (role `ssp-config`).
fn ssp_config(port: u16, name: &str, provider: SocketAddr, durability: &str) -> String {
    let indexed = match std::env::var("SSP_BENCH_PATIENTS").as_deref() {
        Ok("swap") => name == "batched",
        Ok(_) => name.starts_with("compare"),
        Err(_) => false,
    };
    let patients = if indexed {
        "[audit.patients]\nkey = \"patient.key\"\nredact = true\nread_bodies = false\n"
    } else {
        ""
    };
    // The batched instance also serves the patient-facing door (its own port; the one config `SSP_BENCH_ROLE=
    // ssp-config` prints for benches/allocs.sh has it only when the driver set it up).
    let (patient_resolve, patient_facing) = match PATIENT_FACING.get() {
        Some((pf_port, auth, _)) if name == "batched" => (
            format!(r#""provider.dev.localhost:9445" = "{auth}""#),
            format!(
                r#"[patient_facing]
listen = "127.0.0.1:{pf_port}"
asid = "200000000999"
issuer = "https://auth.dev.localhost"
audience = "ssp-patient-facing"
jwks = "https://provider.dev.localhost:9445/jwks"
scope = "gp-connect:patient"
ods_claim = "gp_registration_details.gp_ods_code"
assertion_key = "certs/pf-assertion.key"
requests_per_minute_per_app = 100000000
[[patient_facing.route]]
path = "/fhir/metadata"
interaction = "{METADATA}"
"#
            ),
        ),
        _ => (String::new(), String::new()),
    };
    let ship = match COLLECTOR.get() {
        Some(port) if ships(name) => format!(
            "[audit.ship]\ncollector = \"127.0.0.1:{port}\"\nserver_name = \"provider.dev.localhost\"\n\
             ca = [\"certs/ca.crt\"]\nhead_key = \"head.key\"\n"
        ),
        _ => String::new(),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
cert = "certs/proxy-server.crt"
key = "certs/proxy-server.key"
client_ca = ["certs/ca.crt"]
crl = ["certs/ca.crl"]
[upstream]
cert = "certs/proxy-client.crt"
key = "certs/proxy-client.key"
ca = ["certs/ca.crt"]
[upstream.resolve]
"provider.dev.localhost:9443" = "{provider}"
{patient_resolve}
[policy]
dir = "policies"
store = "policy-{name}"
[admin]
listen = "127.0.0.1:0"
[jwt]
mode = "enforce"
[audit]
dir = "audit-{name}"
durability = "{durability}"
[limits]
per_consumer_rps = 1000000
per_consumer_burst = 1000000
per_consumer_concurrency = 100000
per_provider_concurrency = 100000
{patients}{ship}{patient_facing}"#
    )
}

/// `SSP_BENCH_PATIENTS`: `ssp B` runs with the patient index on.
fn patients_on() -> bool {
    std::env::var_os("SSP_BENCH_PATIENTS").is_some()
}

/// Starts `ssp serve` on a config with every check on, limits set high enough never to refuse, and `durability`.
fn start_ssp(
    dir: &Path,
    name: &str,
    provider: SocketAddr,
    durability: &str,
    children: &mut Children,
) -> (u16, u32) {
    let port = free_port();
    let config = ssp_config(port, name, provider, durability);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    // `SSP_BENCH_SSP_BIN` runs another build of ssp, such as one with frame pointers for perf; the `compare`
    // instances run `SSP_BENCH_COMPARE`.
    let var = if name.starts_with("compare") {
        "SSP_BENCH_COMPARE"
    } else {
        "SSP_BENCH_SSP_BIN"
    };
    let bin = std::env::var_os(var)
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ssp")), PathBuf::from);
    let pid = launch(
        Command::new(bin).args(["serve", "--config"]).arg(&path),
        None,
        port,
        children,
    );
    (port, pid)
}

/// Starts a proxy quietly and waits until it listens on `port`; its pid.
fn launch(
    command: &mut Command,
    stdout: Option<std::fs::File>,
    port: u16,
    children: &mut Children,
) -> u32 {
    let child = command
        .stdout(stdout.map_or_else(Stdio::null, Stdio::from))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (pid, name) = (
        child.id(),
        command.get_program().to_string_lossy().into_owned(),
    );
    children.0.push(child);
    wait_listening(port, &name);
    pid
}

/// nginx as a TLS-terminating reverse proxy: client certificates required and checked against the CA and CRL, the
/// provider's certificate verified, the proxy's client certificate presented, upstream keep-alive, bodies streamed.
fn start_nginx(
    nginx: &Path,
    dir: &Path,
    provider: SocketAddr,
    children: &mut Children,
) -> (u16, u32) {
    let port = free_port();
    let config = nginx_config(dir, provider, port, 2);
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let pid = launch(
        Command::new(nginx).arg("-c").arg(&path).arg("-p").arg(dir),
        None,
        port,
        children,
    );
    (port, pid)
}

/// The nginx configuration of [`start_nginx`], listening on `port`, the certificates in `dir/certs`. With one
/// worker it runs without a master process (one process, as benches/allocs.sh counts its instructions).
fn nginx_config(dir: &Path, provider: SocketAddr, port: u16, workers: u32) -> String {
    let d = dir.display();
    let master = if workers == 1 { "off" } else { "on" };
    format!(
        r#"
worker_processes {workers};
daemon off;
master_process {master};
user root;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    upstream provider {{
        server {provider};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {d}/certs/proxy-server.crt;
        ssl_certificate_key {d}/certs/proxy-server.key;
        ssl_client_certificate {d}/certs/ca.crt;
        ssl_crl {d}/certs/ca.crl;
        ssl_verify_client on;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        location / {{
            proxy_pass https://provider;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host provider.dev.localhost:9443;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_ssl_certificate {d}/certs/proxy-client.crt;
            proxy_ssl_certificate_key {d}/certs/proxy-client.key;
            proxy_ssl_trusted_certificate {d}/certs/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name provider.dev.localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#
    )
}

/// HAProxy 2 threads, the same TLS on both legs as nginx, connection reuse to the provider. With `work`, it also
/// does what its configuration can of ssp's per-request work ([`HAPROXY_WORK`]), as `haproxy work`.
fn start_haproxy(
    haproxy: &Path,
    dir: &Path,
    provider: SocketAddr,
    work: bool,
    children: &mut Children,
) -> (u16, u32) {
    let port = free_port();
    let stem = if work { "haproxy-work" } else { "haproxy" };
    let certs = dir.join("certs");
    let pem = |stem: &str| {
        let text = std::fs::read_to_string(certs.join(format!("{stem}.crt"))).unwrap()
            + &std::fs::read_to_string(certs.join(format!("{stem}.key"))).unwrap();
        let path = dir.join(format!("haproxy-{stem}.pem"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (server_pem, client_pem) = (pem("proxy-server"), pem("proxy-client"));
    let c = certs.display();
    let (global_log, checks) = if work {
        // The maps ssp's directory and agreements would give it: the consumer's certificate name by ASID, the
        // agreement by `from:to:interaction`, the provider's origin by ASID.
        std::fs::write(
            dir.join("asid-cn.map"),
            "200000000359 consumer.dev.localhost\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("agreements.map"),
            format!("200000000359:918999198993:{METADATA} S20001A000123\n200000000359:918999198993:{STRUCTURED} S20001A000123\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("endpoints.map"),
            "918999198993 provider.dev.localhost:9443\n",
        )
        .unwrap();
        let d = dir.display();
        (
            "    log stdout format raw local0\n".to_owned(),
            HAPROXY_WORK.replace("{d}", &d.to_string()),
        )
    } else {
        (String::new(), String::new())
    };
    let config = format!(
        r#"
global
    nbthread 2
    maxconn 8192
    tune.ssl.cachesize 20000
{global_log}defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend consumers
    bind 127.0.0.1:{port} ssl crt {server_pem} ca-file {c}/ca.crt crl-file {c}/ca.crl verify required alpn http/1.1
{checks}    default_backend provider
backend provider
    http-request set-header Host provider.dev.localhost:9443
    server p {provider} ssl crt {client_pem} ca-file {c}/ca.crt verify required sni str(provider.dev.localhost) verifyhost provider.dev.localhost alpn http/1.1
"#
    );
    let path = dir.join(format!("{stem}.cfg"));
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(haproxy);
    command.arg("-db").arg("-f").arg(&path);
    // Its log lines go to a file, as ssp's records do (neither chained nor synced).
    let log = work.then(|| std::fs::File::create(dir.join("haproxy-work.log")).unwrap());
    let pid = launch(&mut command, log, port, children);
    (port, pid)
}

/// What `haproxy work` does per request of ssp's work, as far as its configuration can: the four `Ssp-*` fields
/// against patterns, the consumer certificate's CN against the name registered for `Ssp-From`, the agreement for
/// `from:to:interaction`, the target's origin against the endpoint registered for `Ssp-To`; the JWT's claims set
/// decoded once (`http_auth_bearer,field(2,.),ub64dec`) and its claims read with `json_query` (iss, sub, aud, exp,
/// iat, reason, scope, ODS code, SDS user and role ids), refusing an expired token, one valid for over 300 s or a
/// reason other than `directcare`; one log line per request with those values. No chaining, no fsync, no JWT
/// header or structure check beyond that, no audit record before forwarding.
const HAPROXY_WORK: &str = r#"    http-request deny deny_status 400 unless { req.hdr_cnt(ssp-traceid) eq 1 } { req.hdr(ssp-traceid) -m reg ^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$ }
    http-request deny deny_status 400 unless { req.hdr_cnt(ssp-from) eq 1 } { req.hdr(ssp-from) -m reg ^[0-9]{1,12}$ }
    http-request deny deny_status 400 unless { req.hdr_cnt(ssp-to) eq 1 } { req.hdr(ssp-to) -m reg ^[0-9]{1,12}$ }
    http-request deny deny_status 400 unless { req.hdr_cnt(ssp-interactionid) eq 1 } { req.hdr(ssp-interactionid) -m reg ^urn:nhs:names:services:gpconnect:[a-z0-9:.-]+$ }
    http-request set-var(txn.from) req.hdr(ssp-from)
    http-request set-var(txn.to) req.hdr(ssp-to)
    http-request set-var(txn.interaction) req.hdr(ssp-interactionid)
    http-request set-var(txn.trace) req.hdr(ssp-traceid)
    http-request set-var(txn.cn) var(txn.from),map({d}/asid-cn.map)
    http-request deny deny_status 403 unless { ssl_c_s_dn(cn),strcmp(txn.cn) eq 0 }
    http-request set-var(txn.cpa) var(txn.from),concat(:,txn.to,:),concat(,txn.interaction,),map({d}/agreements.map)
    http-request deny deny_status 403 unless { var(txn.cpa) -m found }
    http-request set-var(txn.origin) var(txn.to),map({d}/endpoints.map)
    http-request deny deny_status 403 unless { req.hdr(host),strcmp(txn.origin) eq 0 }
    http-request set-var(txn.claims) http_auth_bearer,field(2,.),ub64dec
    http-request deny deny_status 400 unless { var(txn.claims) -m found }
    http-request set-var(txn.iss) var(txn.claims),json_query('$.iss')
    http-request set-var(txn.sub) var(txn.claims),json_query('$.sub')
    http-request set-var(txn.aud) var(txn.claims),json_query('$.aud')
    http-request set-var(txn.exp) var(txn.claims),json_query('$.exp','int')
    http-request set-var(txn.iat) var(txn.claims),json_query('$.iat','int')
    http-request set-var(txn.reason) var(txn.claims),json_query('$.reason_for_request')
    http-request set-var(txn.scope) var(txn.claims),json_query('$.requested_scope')
    http-request set-var(txn.ods) var(txn.claims),json_query('$.requesting_organization.identifier[0].value')
    http-request set-var(txn.user) var(txn.claims),json_query('$.requesting_practitioner.identifier[0].value')
    http-request set-var(txn.role) var(txn.claims),json_query('$.requesting_practitioner.identifier[1].value')
    http-request set-var(txn.now) date
    http-request deny deny_status 400 unless { var(txn.reason) -m str directcare }
    http-request deny deny_status 400 if { var(txn.exp),sub(txn.now) lt 0 }
    http-request deny deny_status 400 if { var(txn.exp),sub(txn.iat) gt 300 }
    log global
    log-format "%t %ci %[var(txn.from)] %[var(txn.to)] %[var(txn.interaction)] %[var(txn.trace)] %[var(txn.cn)] %[var(txn.cpa)] %[var(txn.iss)] %[var(txn.sub)] %[var(txn.aud)] %[var(txn.exp)] %[var(txn.iat)] %[var(txn.reason)] %[var(txn.scope)] %[var(txn.ods)] %[var(txn.user)] %[var(txn.role)] %ST %B"
"#;

// ---------------------------------------------------------------------------------------------------------------
// The report.

/// The round with the median throughput.
fn median(mut rounds: Vec<Phase>) -> Phase {
    rounds.sort_by(|a, b| a.rps().total_cmp(&b.rps()));
    let mid = rounds.len() / 2;
    rounds.swap_remove(mid)
}

fn body_scenario(work: Work) -> bool {
    !matches!(work, Work::Small)
}

fn print_scenario(scenario: &Scenario, rows: &[(&Target, Phase)]) {
    println!("\n{}", scenario.title);
    println!(
        "  {:<13} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9}",
        "target",
        "req/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "CPU us/r",
        "CPU ms/MB",
        "peak MiB",
        "errors",
        "x direct",
        "p99 x dir"
    );
    let direct = rows
        .iter()
        .find(|(t, _)| t.kind == Kind::Direct)
        .map(|(_, p)| p);
    for (target, p) in rows {
        let proxy = target.kind != Kind::Direct;
        let dash = |v: f64, w: usize, prec: usize| {
            if proxy {
                format!("{v:>w$.prec$}")
            } else {
                format!("{:>w$}", "-")
            }
        };
        let (ratio, p99_ratio) = match direct {
            Some(d) if body_scenario(scenario.work) => {
                (p.mbps() / d.mbps(), p.pct(0.99) / d.pct(0.99))
            }
            Some(d) => (p.rps() / d.rps(), p.pct(0.99) / d.pct(0.99)),
            None => (f64::NAN, f64::NAN),
        };
        println!(
            "  {:<13} {:>9.0} {:>8.1} {:>8.2} {:>8.2} {} {} {} {:>7} {:>9.2} {:>9.2}",
            target.name,
            p.rps(),
            p.mbps(),
            p.pct(0.50),
            p.pct(0.99),
            dash(p.cpu_us_per_request(), 9, 1),
            if body_scenario(scenario.work) {
                dash(p.cpu_ms_per_mb(), 9, 2)
            } else {
                format!("{:>9}", "-")
            },
            dash(p.peak_kib as f64 / 1024.0, 9, 1),
            p.errors,
            ratio,
            p99_ratio,
        );
    }
    for (target, p) in rows {
        if let Some((syscalls, switches)) = p.kernel {
            let n = p.requests.max(1) as f64;
            println!(
                "  {:<13} per request: {:.1} us CPU in user space, {:.2} system calls, {:.2} context switches, ssp-audit threads {:.1} us CPU (writer {:.1}, fsyncs {:.1})",
                target.name,
                p.user_cpu.as_secs_f64() * 1e6 / n,
                syscalls as f64 / n,
                switches as f64 / n,
                (p.audit_cpu[0] + p.audit_cpu[1]).as_secs_f64() * 1e6 / n,
                p.audit_cpu[0].as_secs_f64() * 1e6 / n,
                p.audit_cpu[1].as_secs_f64() * 1e6 / n,
            );
        }
    }
}

/// The performance goals, checked against this run's own figures.
fn print_goals(results: &[(&Scenario, Vec<(&Target, Phase)>)]) {
    let find =
        |rows: &[(&Target, Phase)], name: &str| rows.iter().position(|(t, _)| t.name == name);
    println!("\nGoals (ssp = the batched instance; peers = nginx and HAProxy measured above)");
    for (scenario, rows) in results {
        let Some(s) = find(rows, "ssp") else { continue };
        let ssp = &rows[s].1;
        // The plain peers: nginx and HAProxy as reverse proxies (`haproxy work` is compared on its own below).
        let peers: Vec<&Phase> = rows
            .iter()
            .filter(|(t, _)| t.kind == Kind::Peer && t.name != "haproxy work")
            .map(|(_, p)| p)
            .collect();
        let nginx = find(rows, "nginx").map(|i| &rows[i].1);
        let mut lines = Vec::new();
        // One connection: what each proxy adds to a request's median time over going direct.
        if scenario.conns == 1 && !body_scenario(scenario.work) {
            if let Some(d) = find(rows, "direct") {
                let direct = rows[d].1.pct(0.50);
                let added = |p: &Phase| (p.pct(0.50) - direct) * 1000.0;
                let mut added_by: Vec<String> = vec![format!("ssp {:.0} us", added(ssp))];
                for (t, p) in rows.iter().filter(|(t, _)| t.kind == Kind::Peer) {
                    added_by.push(format!("{} {:.0} us", t.name, added(p)));
                }
                lines.push(format!(
                    "p50 added over direct: {} (goal: ssp <= nginx)",
                    added_by.join(", ")
                ));
            }
        }
        let body = body_scenario(scenario.work);
        if let Some(best) = peers.iter().copied().max_by(|a, b| {
            if body {
                a.mbps().total_cmp(&b.mbps())
            } else {
                a.rps().total_cmp(&b.rps())
            }
        }) {
            let (mine, theirs, need) = match (body, scenario.shape) {
                (true, _) => (ssp.mbps(), best.mbps(), 1.1),
                (false, Shape::KeepAlive) => (ssp.rps(), best.rps(), 1.0),
                (false, Shape::NewConnection { .. }) => (ssp.rps(), best.rps(), 1.0),
            };
            lines.push(format!(
                "throughput {:.2}x the better plain peer (goal >= {need})",
                mine / theirs
            ));
            if let Some(w) = find(rows, "haproxy work").filter(|_| !body) {
                lines.push(format!(
                    "{:.2}x the HAProxy doing ssp's kind of work (goal >= 1.5)",
                    ssp.rps() / rows[w].1.rps()
                ));
            }
            if !body && scenario.shape == Shape::KeepAlive {
                let best_p99 = peers
                    .iter()
                    .map(|p| p.pct(0.99))
                    .fold(f64::INFINITY, f64::min);
                lines.push(format!(
                    "p99 {:.2} ms vs {:.2} ms (goal <=)",
                    ssp.pct(0.99),
                    best_p99
                ));
            }
            let peak_max = peers.iter().map(|p| p.peak_kib).max().unwrap_or(0);
            let haproxy = find(rows, "haproxy").map_or(peak_max, |i| rows[i].1.peak_kib);
            lines.push(format!(
                "peak RSS {:.1} MiB vs HAProxy {:.1} MiB (goal <)",
                ssp.peak_kib as f64 / 1024.0,
                haproxy as f64 / 1024.0
            ));
        }
        if let Some(n) = nginx {
            let ratio = if body {
                ssp.cpu_ms_per_mb() / n.cpu_ms_per_mb()
            } else {
                ssp.cpu_us_per_request() / n.cpu_us_per_request()
            };
            let goal = if !body && scenario.shape == Shape::KeepAlive {
                "goal <= 1.0, floor 1.2"
            } else {
                "goal <= 0.8"
            };
            lines.push(format!("CPU {ratio:.2}x nginx's ({goal})"));
        }
        if let Some(strict) = find(rows, "ssp strict") {
            lines.push(format!(
                "strict {:.2}x batched req/s (goal >= 0.9)",
                rows[strict].1.rps() / ssp.rps()
            ));
        }
        if let (Some(b), Some(strict)) = (find(rows, "ssp B"), find(rows, "ssp B strict")) {
            lines.push(format!(
                "B: strict {:.2}x batched",
                rows[strict].1.rps() / rows[b].1.rps()
            ));
        }
        if let Some(pf) = find(rows, "ssp pf") {
            let pf = &rows[pf].1;
            lines.push(format!(
                "patient-facing door {:.0} us CPU a request, {:.2}x the clinical door's ({:.0} us; no goal: reported)",
                pf.cpu_us_per_request(),
                pf.cpu_us_per_request() / ssp.cpu_us_per_request(),
                ssp.cpu_us_per_request()
            ));
        }
        println!("  {:<8} {}", scenario.name, lines.join("; "));
    }
}

/// Serves the dev NHS login JWKS and the dev supplier's token endpoint (`ssp::demo::auth`, the dev policy's
/// `[[supplier]]`) from this process, and signs the patient's access token the clients send: valid two hours, so
/// it outlasts the run. The supplier's token is exchanged once and then cached, as it would be in steady state.
async fn start_patient_facing(certs: &Path) {
    use ssp::demo::auth::{AuthState, Expect, PatientTokens, auth_tls, serve_auth};
    let issuer = std::fs::read_to_string(certs.join("nhs-login.key")).unwrap();
    let tokens = PatientTokens::new(
        &issuer,
        "bench-1",
        "https://auth.dev.localhost",
        "ssp-patient-facing",
    )
    .unwrap();
    let assertion = std::fs::read_to_string(certs.join("pf-assertion.key")).unwrap();
    let state = AuthState::new(
        PatientTokens::jwks(&[&tokens]),
        Expect {
            client_id: "ssp-dev".into(),
            key_id: "ssp-dev-1".into(),
            token_url: "https://provider.dev.localhost:9445/token".into(),
            audience: "https://provider.dev.localhost:9443/B82617".into(),
            assertion_public_pem: rcgen::KeyPair::from_pem(&assertion)
                .unwrap()
                .public_key_pem(),
            expires_in: 7200,
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth = listener.local_addr().unwrap();
    let tls = auth_tls(
        &certs.join("provider.crt"),
        &certs.join("provider.key"),
        &[certs.join("ca.crt")],
    )
    .unwrap();
    tokio::spawn(serve_auth(listener, tls, state, std::future::pending()));
    let mut claims = tokens.claims("9690937286", "bench-app", "gp-connect:patient");
    claims["exp"] = serde_json::json!(claims["iat"].as_i64().unwrap() + 7200);
    claims["gp_registration_details"] = serde_json::json!({ "gp_ods_code": "B82617" });
    let token = tokens.sign(&claims);
    PATIENT_FACING.set((free_port(), auth, token)).unwrap();
}

// ---------------------------------------------------------------------------------------------------------------

/// The config roles' listening port (`SSP_BENCH_PORT`, 18443 by default) and provider (`SSP_BENCH_PROVIDER`).
fn config_role_addresses() -> (u16, SocketAddr) {
    let port = env("SSP_BENCH_PORT", 18443) as u16;
    let provider = std::env::var("SSP_BENCH_PROVIDER")
        .unwrap()
        .parse()
        .unwrap();
    (port, provider)
}

fn main() {
    match std::env::var("SSP_BENCH_ROLE").as_deref() {
        Ok("provider") => {
            let certs = PathBuf::from(std::env::var_os("SSP_BENCH_CERTS").unwrap());
            provider_main(&certs);
            return;
        }
        Ok("collector") => {
            let certs = PathBuf::from(std::env::var_os("SSP_BENCH_CERTS").unwrap());
            collector_main(&certs);
            return;
        }
        // For benches/allocs.sh: the config of the batched instance, listening on SSP_BENCH_PORT.
        Ok("ssp-config") => {
            let (port, provider) = config_role_addresses();
            print!("{}", ssp_config(port, "batched", provider, "batched"));
            return;
        }
        // For benches/allocs.sh: nginx's config with one worker, listening on SSP_BENCH_PORT, its files (the
        // certificates in `certs`) in SSP_BENCH_DIR.
        Ok("nginx-config") => {
            let (port, provider) = config_role_addresses();
            let dir = PathBuf::from(std::env::var_os("SSP_BENCH_DIR").unwrap());
            print!("{}", nginx_config(&dir, provider, port, 1));
            return;
        }
        _ => {}
    }
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` run only checks that this builds.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load benchmark: run with `benches/load.sh` or `cargo bench --bench load`");
        return;
    }
    let secs = env("SSP_BENCH_SECS", 5);
    let rounds = env("SSP_BENCH_ROUNDS", 3).max(1);
    let peers = env("SSP_BENCH_PEERS", 1) != 0;

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ssp::demo::devcerts::generate_with(&certs, ssp::demo::devcerts::KeyKind::Rsa2048).unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies/dev.toml"),
        dir.path().join("policies/dev.toml"),
    )
    .unwrap();

    let mut children = Children(Vec::new());
    let provider = start_provider(&certs, &mut children);
    let consumer = (
        client_tls(&certs, "consumer", true),
        client_tls(&certs, "consumer", false),
    );
    let loopback = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let proxy_target = |name, kind, port: u16, pid: u32, strict| Target {
        name,
        kind,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        server_name: loopback.clone(),
        tls: consumer.0.clone(),
        tls_full: consumer.1.clone(),
        pids: process_tree(pid),
        strict,
    };
    let mut targets = vec![Target {
        name: "direct",
        kind: Kind::Direct,
        addr: provider,
        server_name: ServerName::try_from("provider.dev.localhost").unwrap(),
        // The provider accepts any certificate of the CA; the direct client presents the proxy's.
        tls: client_tls(&certs, "proxy-client", true),
        tls_full: client_tls(&certs, "proxy-client", false),
        pids: Vec::new(),
        strict: false,
    }];
    if std::env::var_os("SSP_BENCH_SHIP").is_some() {
        use std::os::unix::fs::PermissionsExt;
        let collector = start_role("collector", &certs, &mut children);
        COLLECTOR.set(collector.port()).unwrap();
        let key = dir.path().join("head.key");
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(&key, pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    if patients_on() {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join("patient.key");
        std::fs::write(&key, [0x5a; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if scenarios().iter().any(|s| s.patient) {
        rt.block_on(start_patient_facing(&certs));
    }
    let (port, pid) = start_ssp(dir.path(), "batched", provider, "batched", &mut children);
    targets.push(proxy_target("ssp", Kind::Ssp, port, pid, false));
    if let Some((pf_port, _, _)) = PATIENT_FACING.get() {
        wait_listening(*pf_port, "the patient-facing door");
        targets.push(proxy_target("ssp pf", Kind::Patient, *pf_port, pid, false));
    }
    let (port, pid) = start_ssp(dir.path(), "strict", provider, "strict", &mut children);
    targets.push(proxy_target("ssp strict", Kind::Ssp, port, pid, true));
    // Another build beside this one, batched, in the same run: `ssp B` in the tables (not in the goals).
    if std::env::var_os("SSP_BENCH_COMPARE").is_some()
        || patients_on()
        || std::env::var_os("SSP_BENCH_SHIP").is_some()
    {
        let (port, pid) = start_ssp(dir.path(), "compare", provider, "batched", &mut children);
        targets.push(proxy_target("ssp B", Kind::Ssp, port, pid, false));
        let (port, pid) = start_ssp(
            dir.path(),
            "compare-strict",
            provider,
            "strict",
            &mut children,
        );
        targets.push(proxy_target("ssp B strict", Kind::Ssp, port, pid, true));
    }
    let mut missing = Vec::new();
    if peers {
        match installed("nginx") {
            Some(nginx) => {
                let (port, pid) = start_nginx(&nginx, dir.path(), provider, &mut children);
                // nginx forks its workers after it listens; give them a moment to appear.
                std::thread::sleep(Duration::from_millis(300));
                targets.push(proxy_target("nginx", Kind::Peer, port, pid, false));
            }
            None => missing.push("nginx"),
        }
        match installed("haproxy") {
            Some(haproxy) => {
                let (port, pid) =
                    start_haproxy(&haproxy, dir.path(), provider, false, &mut children);
                targets.push(proxy_target("haproxy", Kind::Peer, port, pid, false));
                let (port, pid) =
                    start_haproxy(&haproxy, dir.path(), provider, true, &mut children);
                targets.push(proxy_target("haproxy work", Kind::Peer, port, pid, false));
            }
            None => missing.push("haproxy"),
        }
    }

    let scenarios = scenarios();
    let started = Instant::now();
    let results: Vec<(&Scenario, Vec<(&Target, Phase)>)> = rt.block_on(async {
        // Warm up every target: connections, pools, caches.
        let warm = Scenario {
            name: "warm-up",
            title: "",
            shape: Shape::KeepAlive,
            conns: 32,
            work: Work::Small,
            strict: false,
            patient: false,
        };
        for target in &targets {
            let phase = run_phase(target, &warm, 1).await;
            assert!(
                phase.requests > 0 && phase.errors == 0,
                "{}: warm-up failed ({} answered, {} errors)",
                target.name,
                phase.requests,
                phase.errors
            );
        }
        let mut results = Vec::new();
        for scenario in &scenarios {
            // The patient-facing scenario: the direct connection, the clinical door and the patient-facing one.
            let applicable: Vec<&Target> = targets
                .iter()
                .filter(|t| !t.strict || scenario.strict)
                .filter(|t| match (scenario.patient, t.kind) {
                    (true, kind) => matches!(kind, Kind::Direct | Kind::Patient) || t.name == "ssp",
                    (false, kind) => kind != Kind::Patient,
                })
                .collect();
            let mut rounds_of: Vec<Vec<Phase>> = applicable.iter().map(|_| Vec::new()).collect();
            // Rounds interleave the targets, so that a slow moment of the machine does not land on one of them.
            // Each round starts with the direct phase, then the proxies, starting one further on each round, so
            // that no proxy always runs right after the direct phase. (Which place costs more was not settled:
            // two instances of one build differed by up to 16% of CPU per request in one run; benches/RESULTS.md.)
            let n = applicable.len();
            for round in 0..rounds as usize {
                let proxies = (0..n - 1).map(|k| 1 + (k + round) % (n - 1));
                for i in std::iter::once(0).chain(proxies) {
                    rounds_of[i].push(run_phase(applicable[i], scenario, secs).await);
                }
            }
            let rows: Vec<(&Target, Phase)> = applicable
                .into_iter()
                .zip(rounds_of.into_iter().map(median))
                .collect();
            print_scenario(scenario, &rows);
            results.push((scenario, rows));
        }
        results
    });
    print_goals(&results);
    println!(
        "\n{} s per phase, median of {rounds} rounds, {:.0} s in all; RSA-2048 PKI, TLS 1.3, all on loopback on this machine.",
        secs,
        started.elapsed().as_secs_f64()
    );
    if !missing.is_empty() {
        println!(
            "not measured (not installed): {}; `benches/load.sh` installs them",
            missing.join(", ")
        );
    }
    drop(children);
}
