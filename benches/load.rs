//! Load benchmark: the same GP Connect read sent directly to the provider and through ssp (with `batched` and with
//! `strict` audit durability), in one run, so the proxy's cost is a ratio to a direct connection measured on the
//! same machine at the same time.
//!
//! Run: `cargo bench --bench load` (env `SSP_BENCH_SECS`, default 5 per phase; `SSP_BENCH_CONNS`, default 16
//! keep-alive connections; `SSP_BENCH_ROUNDS`, default 2 rounds of all phases, interleaved).
//! Everything runs in this process on loopback: provider, proxies and clients share the machine's cores, so the
//! figures are relative, not absolute capacity. Figures go to benches/RESULTS.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark setup: a failure is a bench failure"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

const ENDPOINT: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect";
const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A client TLS config presenting `stem`'s certificate from the PKI.
fn client_tls(certs: &Path, stem: &str) -> Arc<rustls::ClientConfig> {
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
    Arc::new(config)
}

/// Where a phase sends its requests.
#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    /// Through the proxy: `/https://...` with the SSP headers; direct: the provider's own path.
    via_proxy: bool,
}

struct Phase {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    /// Microseconds, sorted.
    latencies: Vec<u32>,
    cpu: Duration,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
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
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn run_phase(target: &Target, conns: u64, secs: u64) -> Phase {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let cpu_before = cpu_time();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(target.addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let tls = tokio_rustls::TlsConnector::from(target.tls.clone())
                .connect(target.server_name.clone(), tcp)
                .await
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            // Consumers mint a token per request; minting is the consumer's cost, so one per connection here.
            let token = format!(
                "Bearer {}",
                ssp::demo::dev_jwt(ENDPOINT, "organization/*.read")
            );
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let builder = if target.via_proxy {
                    Request::get(format!("/{ENDPOINT}/fhir/metadata"))
                        .header("host", "ssp.dev.localhost")
                        .header("ssp-traceid", ssp::ids::TraceId::new_random().as_str())
                        .header("ssp-from", "200000000359")
                        .header("ssp-to", "918999198993")
                        .header("ssp-interactionid", METADATA)
                        .header("authorization", &token)
                } else {
                    Request::get("/B82617/STU3/1/gpconnect/fhir/metadata")
                        .header("host", "provider.dev.localhost:9443")
                        .header("ssp-traceid", ssp::ids::TraceId::new_random().as_str())
                        .header("authorization", &token)
                };
                let req = builder.body(Empty::<Bytes>::new()).unwrap();
                let t0 = Instant::now();
                if sender.ready().await.is_err() {
                    break;
                }
                match sender.send_request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        if resp.into_body().collect().await.is_ok() {
                            latencies
                                .push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        } else {
                            errors += 1;
                        }
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Phase {
        requests: latencies.len() as u64,
        errors,
        elapsed,
        latencies,
        cpu: cpu_time().saturating_sub(cpu_before),
    }
}

fn write_config(
    dir: &Path,
    name: &str,
    provider: SocketAddr,
    durability: &str,
) -> std::path::PathBuf {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
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
[policy]
dir = "policies"
[admin]
listen = "127.0.0.1:0"
[audit]
dir = "audit-{name}"
durability = "{durability}"
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

async fn start_proxy(path: &Path) -> SocketAddr {
    let config = ssp::config::Config::load(path).unwrap();
    let assembled = ssp::app::assemble(&config).unwrap();
    let server = ssp::app::bind(&config, assembled).await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending(), Duration::from_secs(1)));
    addr
}

fn main() {
    let secs = env("SSP_BENCH_SECS", 5);
    let conns = env("SSP_BENCH_CONNS", 16);
    let rounds = env("SSP_BENCH_ROUNDS", 2);
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` run only checks that this builds.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load benchmark: run with `cargo bench --bench load`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        ssp::devcerts::generate(&certs).unwrap();
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies/dev.toml"),
            dir.path().join("policies/dev.toml"),
        )
        .unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let provider = listener.local_addr().unwrap();
        let provider_tls =
            ssp::demo::provider_tls(&certs.join("provider.crt"), &certs.join("provider.key"), &[certs.join("ca.crt")])
                .unwrap();
        tokio::spawn(ssp::demo::serve_provider(
            listener,
            provider_tls,
            ssp::devcerts::PROXY_CLIENT_NAME.to_owned(),
            std::future::pending(),
        ));
        let batched = start_proxy(&write_config(dir.path(), "batched", provider, "batched")).await;
        let strict = start_proxy(&write_config(dir.path(), "strict", provider, "strict")).await;

        let consumer = client_tls(&certs, "consumer");
        let targets = [
            Target {
                name: "direct",
                addr: provider,
                server_name: ServerName::try_from("provider.dev.localhost").unwrap(),
                // The provider answers only the proxy's certificate, so the direct client presents it.
                tls: client_tls(&certs, "proxy-client"),
                via_proxy: false,
            },
            Target {
                name: "ssp batched",
                addr: batched,
                server_name: ServerName::IpAddress(batched.ip().into()),
                tls: consumer.clone(),
                via_proxy: true,
            },
            Target {
                name: "ssp strict",
                addr: strict,
                server_name: ServerName::IpAddress(strict.ip().into()),
                tls: consumer,
                via_proxy: true,
            },
        ];
        // Warm up connections, pools and caches.
        for t in &targets {
            run_phase(t, conns, 1).await;
        }
        let mut results: Vec<Vec<Phase>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, t) in targets.iter().enumerate() {
                results[i].push(run_phase(t, conns, secs).await);
            }
        }
        println!(
            "\n{conns} keep-alive connections, {rounds} x {secs} s per target, GET metadata (277-byte body), all on loopback\n"
        );
        println!(
            "{:<12} {:>10} {:>9} {:>9} {:>9} {:>12} {:>7} {:>12} {:>12}",
            "target", "req/s", "p50 ms", "p99 ms", "max ms", "CPU us/req", "errors", "rps ratio", "p99 ratio"
        );
        let merged: Vec<Phase> = results
            .into_iter()
            .map(|phases| {
                let mut latencies: Vec<u32> = phases.iter().flat_map(|p| p.latencies.iter().copied()).collect();
                latencies.sort_unstable();
                Phase {
                    requests: phases.iter().map(|p| p.requests).sum(),
                    errors: phases.iter().map(|p| p.errors).sum(),
                    elapsed: phases.iter().map(|p| p.elapsed).sum(),
                    latencies,
                    cpu: phases.iter().map(|p| p.cpu).sum(),
                }
            })
            .collect();
        let direct = &merged[0];
        for (t, p) in targets.iter().zip(&merged) {
            println!(
                "{:<12} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>12.0} {:>7} {:>12.2} {:>12.2}",
                t.name,
                p.rps(),
                p.pct(0.50),
                p.pct(0.99),
                p.pct(1.0),
                p.cpu_us_per_request(),
                p.errors,
                p.rps() / direct.rps(),
                p.pct(0.99) / direct.pct(0.99),
            );
        }
        let vm = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let hwm = vm.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ?");
        println!("\npeak resident memory of the whole benchmark process (provider, proxies, clients): {hwm}");
    });
}
