//! Behind a layer-4 balancer: the PROXY protocol from trusted sources (v1, v2 with TLVs, IPv6, LOCAL, malformed,
//! truncated, slow, missing), refused from others, and a real HAProxy in `mode tcp` with `send-proxy-v2` in front
//! of two `ssp serve` instances: the consumer's address everywhere, per-instance chains, and a drain on SIGTERM
//! that loses no request. The real binary throughout; loopback only (the client binds 127.0.0.5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a failed test"
)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A v2 PROXY header (command PROXY, TCP over IPv4 or IPv6) written out from the spec, with optional TLVs.
fn v2_header(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => panic!("mixed families"),
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    body.extend_from_slice(tlvs);
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, family]);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The v2 LOCAL header a balancer's health check sends.
fn v2_local() -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

/// Sends a metadata GET over `tcp` (after whatever the test wrote on it) and returns the status.
async fn get_over(
    pki: &Pki,
    proxy: SocketAddr,
    provider: SocketAddr,
    tcp: TcpStream,
) -> Result<StatusCode, String> {
    let consumer = Consumer::new(pki, Some("consumer"), proxy, false);
    let mut sender = consumer.connect_over(tcp).await?;
    let url = endpoint_url(provider);
    let req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
        .body(empty())
        .unwrap();
    let response = sender.send(req).await?;
    let status = response.status();
    drain(response.into_body()).await?;
    Ok(status)
}

/// `ssp serve` on its own copy of the PKI (its own policy store and audit log), its log in a file.
struct Instance {
    pki: Pki,
    served: Served,
    admin: SocketAddr,
    log: PathBuf,
}

impl Instance {
    async fn start(certs_from: &Pki, provider: SocketAddr, extra_server: &str) -> Self {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let certs = pki.dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        for entry in std::fs::read_dir(certs_from.dir.path().join("certs")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), certs.join(entry.file_name())).unwrap();
        }
        let admin = closed_port().await;
        let log = pki.dir.path().join("ssp.log");
        let served = serve_setup(
            &pki,
            provider,
            &Setup {
                admin: admin.to_string(),
                handshake_timeout: "2s",
                extra_server: extra_server.into(),
                ..Setup::default()
            },
            &[("RUST_LOG", "info")],
            std::fs::File::create(&log).unwrap().into(),
        )
        .await;
        Self {
            pki,
            served,
            admin,
            log,
        }
    }

    fn audit_dir(&self) -> PathBuf {
        self.pki.dir.path().join("data/audit")
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        ssp::audit::query(&self.audit_dir(), &ssp::audit::Filter::default())
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["kind"] == "request")
            .collect()
    }

    async fn admin_get(&self, path: &str) -> Option<String> {
        let mut tcp = TcpStream::connect(self.admin).await.ok()?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.ok()?;
        Some(text)
    }
}

/// Waits (bounded) until the audit log in `dir` holds a request record with this trace id.
async fn request_record(dir: &Path, trace_id: &str) -> serde_json::Value {
    let deadline = Instant::now() + STEP;
    loop {
        let found = ssp::audit::query(dir, &ssp::audit::Filter::default())
            .unwrap_or_default()
            .into_iter()
            .find(|r| r["kind"] == "request" && r["trace_id"] == trace_id);
        if let Some(record) = found {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "no request record for {trace_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The PROXY protocol on its own.

/// From a trusted source: each header form gets its answer, and the consumer's address (or, for LOCAL, the
/// connection's own) is what the audit record, `Forwarded` and `X-Forwarded-For` carry, with the balancer's as
/// `via`.
#[tokio::test]
async fn proxy_headers_from_a_trusted_source() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let ssp = Instance::start(
        &pki,
        provider.addr,
        "proxy_protocol_from = [\"127.0.0.1/32\", \"::1\"]",
    )
    .await;
    let addr = ssp.served.addr;
    // A NOOP and an authority TLV, as HAProxy can send them.
    let tlvs = [0x04, 0x00, 0x02, 0, 0, 0x02, 0x00, 0x03, b's', b's', b'p'];
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "v1 tcp4",
            b"PROXY TCP4 192.0.2.44 127.0.0.1 40001 8443\r\n".to_vec(),
            Some("192.0.2.44:40001"),
        ),
        (
            "v1 tcp6",
            b"PROXY TCP6 2001:db8::44 ::1 40002 8443\r\n".to_vec(),
            Some("[2001:db8::44]:40002"),
        ),
        (
            "v2 tlvs",
            v2_header("198.51.100.7:40003".parse().unwrap(), addr, &tlvs),
            Some("198.51.100.7:40003"),
        ),
        (
            "v2 ipv6",
            v2_header(
                "[2001:db8::7]:40004".parse().unwrap(),
                "[::1]:8443".parse().unwrap(),
                &[],
            ),
            Some("[2001:db8::7]:40004"),
        ),
        ("v2 local", v2_local(), None),
    ];
    for (i, (name, header, consumer)) in cases.iter().enumerate() {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let own = tcp.local_addr().unwrap();
        tcp.write_all(header).await.unwrap();
        let consumer_pki = Consumer::new(&pki, Some("consumer"), addr, false);
        let mut sender = within(name, consumer_pki.connect_over(tcp)).await.unwrap();
        let trace = format!("00000000-0000-4000-8000-{i:012}");
        let mut req = ssp_request(
            Method::GET,
            &format!("/{}/fhir/metadata", endpoint_url(provider.addr)),
            METADATA,
        )
        .body(empty())
        .unwrap();
        req.headers_mut()
            .insert("ssp-traceid", trace.parse().unwrap());
        let response = within(name, sender.send(req)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        let record = request_record(&ssp.audit_dir(), &trace).await;
        let peer = &record["peer"];
        match consumer {
            Some(consumer) => {
                assert_eq!(peer["addr"], *consumer, "{name}: {record}");
                assert_eq!(peer["via"], own.to_string(), "{name}: {record}");
                let seen = provider.seen();
                let headers = &seen.last().unwrap().headers;
                let ip = consumer
                    .rsplit_once(':')
                    .unwrap()
                    .0
                    .trim_matches(['[', ']']);
                assert_eq!(headers["x-forwarded-for"], ip, "{name}");
                let forwarded = headers["forwarded"].to_str().unwrap();
                assert!(forwarded.contains(ip), "{name}: {forwarded}");
            }
            None => {
                assert_eq!(peer["addr"], own.to_string(), "{name}: {record}");
                assert!(peer.get("via").is_none(), "{name}: {record}");
            }
        }
    }
}

/// From a trusted source, a connection without a header, with a malformed or truncated one, or too slow to send
/// it, is closed before TLS, and counted.
#[tokio::test]
async fn bad_or_missing_headers_from_a_trusted_source_are_closed() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let ssp = Instance::start(
        &pki,
        provider.addr,
        "proxy_protocol_from = [\"127.0.0.0/8\"]",
    )
    .await;
    let addr = ssp.served.addr;
    // No header at all: the consumer's TLS handshake is refused.
    let direct = get_over(
        &pki,
        addr,
        provider.addr,
        TcpStream::connect(addr).await.unwrap(),
    )
    .await;
    assert!(direct.is_err(), "served without a PROXY header: {direct:?}");
    let mut truncated = v2_header("192.0.2.1:1".parse().unwrap(), addr, &[]);
    truncated.truncate(20);
    let inputs: [(&str, &[u8]); 3] = [
        ("malformed", b"PROXY TCP4 192.0.2.300 127.0.0.1 1 2\r\n"),
        ("truncated v2, then close", &truncated),
        ("v1 without its end, then close", b"PROXY TCP4 192.0.2.1"),
    ];
    for (name, input) in inputs {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(input).await.unwrap();
        if name.ends_with("then close") {
            tcp.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        let read = within(name, tcp.read_to_end(&mut got)).await;
        assert!(read.is_ok() && got.is_empty(), "{name}: {read:?} {got:?}");
    }
    // Slow: part of a header, then silence; closed after the handshake timeout (2 s).
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 ").await.unwrap();
    let mut got = Vec::new();
    let _ = within("slow", tcp.read_to_end(&mut got)).await;
    assert!(got.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let metrics = ssp.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("ssp_tls_handshake_failures_total{reason=\"proxy_header_missing\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ssp_tls_handshake_failures_total{reason=\"proxy_header_invalid\"} 3"),
        "{metrics}"
    );
    assert!(ssp.requests().is_empty());
}

/// From a source not in `proxy_protocol_from`, a PROXY header is refused and the connection closed before TLS;
/// a consumer connecting directly is served, under its own address.
#[tokio::test]
async fn a_proxy_header_from_an_untrusted_source_is_refused() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let ssp = Instance::start(
        &pki,
        provider.addr,
        "proxy_protocol_from = [\"127.0.0.9/32\"]",
    )
    .await;
    let addr = ssp.served.addr;
    for header in [
        b"PROXY TCP4 192.0.2.44 127.0.0.1 40001 8443\r\n".to_vec(),
        v2_header("192.0.2.44:40001".parse().unwrap(), addr, &[]),
    ] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&header).await.unwrap();
        let status = get_over(&pki, addr, provider.addr, tcp).await;
        assert!(
            status.is_err(),
            "a PROXY header from an untrusted source was served: {status:?}"
        );
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let own = tcp.local_addr().unwrap();
    assert_eq!(
        get_over(&pki, addr, provider.addr, tcp).await.unwrap(),
        StatusCode::OK
    );
    let records = ssp.requests();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["peer"]["addr"], own.to_string());
    assert!(records[0]["peer"].get("via").is_none());
    let metrics = ssp.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("ssp_tls_handshake_failures_total{reason=\"proxy_header_untrusted\"} 2"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// HAProxy in front of two instances.

/// HAProxy's path, or `None` (the test then says it was skipped; in CI, where `.ci/run` installs it, it fails).
fn haproxy() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("haproxy"))
            .chain([PathBuf::from("/usr/sbin/haproxy")])
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is not installed (.ci/run installs Debian's haproxy)"
        );
        eprintln!(
            "SKIPPED: haproxy is not installed (apt-get install haproxy); .ci/run installs it"
        );
    }
    found
}

/// The HAProxy config of the operator guide's "Running more than one instance", as written there, with this test's
/// addresses and faster health checks (so that a drained instance leaves the rotation within the test's patience).
fn haproxy_config(frontend: SocketAddr, a: &Instance, b: &Instance) -> String {
    let guide = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operator-guide.md"),
    )
    .unwrap();
    let block = guide
        .split("# haproxy.cfg\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the operator guide's haproxy.cfg example");
    let mut config = "global\n    maxconn 256\n\n".to_owned();
    let mut replaced = 0;
    for line in block.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let line = match words.as_slice() {
            ["bind", _] => format!("    bind {frontend}"),
            ["default-server", ..] => "    default-server inter 200ms fall 1 rise 1".to_owned(),
            ["server", name, _, rest @ ..] => {
                let instance = if *name == "ssp1" { a } else { b };
                let admin = instance.admin.port().to_string();
                let rest: Vec<&str> = rest
                    .iter()
                    .map(|w| {
                        if w.parse::<u16>().is_ok() {
                            admin.as_str()
                        } else {
                            w
                        }
                    })
                    .collect();
                format!(
                    "    server {name} {} {}",
                    instance.served.addr,
                    rest.join(" ")
                )
            }
            _ => line.to_owned(),
        };
        let head = line.split_whitespace().next().unwrap_or("");
        if ["bind", "default-server", "server"].contains(&head) {
            replaced += 1;
        }
        config.push_str(&line);
        config.push('\n');
    }
    assert_eq!(replaced, 4, "the guide's example changed shape:\n{block}");
    config
}

/// A connection to HAProxy from 127.0.0.5, as a consumer elsewhere on the network would make it.
async fn from_consumer_host(frontend: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    socket.connect(frontend).await.unwrap()
}

/// Two instances behind HAProxy (`mode tcp`, `send-proxy-v2`, `/readyz` health checks): requests from 127.0.0.5
/// reach both; each instance records the consumer's address with HAProxy's as `via`, and forwards it; each chain
/// verifies on its own; SIGTERM to one drains it (`/readyz` 503, HAProxy stops sending it connections) while a
/// request in flight on it completes, and no request is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behind_haproxy() {
    let Some(haproxy) = haproxy() else { return };
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let trusted = "proxy_protocol_from = [\"127.0.0.1/32\"]";
    let a = Instance::start(&pki, provider.addr, trusted).await;
    let b = Instance::start(&pki, provider.addr, trusted).await;
    let frontend = closed_port().await;
    let cfg = pki.dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(frontend, &a, &b)).unwrap();
    let checked = std::process::Command::new(&haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let mut balancer = Killed(
        std::process::Command::new(&haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Until both instances have been health-checked up and served something (bounded).
    let deadline = Instant::now() + STEP;
    let mut sent = 0usize;
    while a.requests().is_empty() || b.requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "HAProxy did not reach both instances"
        );
        if let Ok(tcp) = tokio::time::timeout(Duration::from_secs(2), async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.5:0".parse().unwrap()).unwrap();
            socket.connect(frontend).await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timeout")))
        {
            if let Ok(status) = get_over(&pki, frontend, provider.addr, tcp).await {
                assert_eq!(status, StatusCode::OK);
                sent += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let tcp = from_consumer_host(frontend).await;
        assert_eq!(
            get_over(&pki, frontend, provider.addr, tcp).await.unwrap(),
            StatusCode::OK
        );
        sent += 1;
    }
    let (on_a, on_b) = (a.requests(), b.requests());
    assert!(!on_a.is_empty() && !on_b.is_empty());
    for record in on_a.iter().chain(&on_b) {
        let peer = &record["peer"];
        assert!(
            peer["addr"].as_str().unwrap().starts_with("127.0.0.5:"),
            "{record}"
        );
        assert!(
            peer["via"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{record}"
        );
    }
    for seen in provider.seen() {
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.5");
        assert_eq!(seen.headers["forwarded"], "for=127.0.0.5;proto=https");
    }

    // A request in flight on instance a (sent to it directly, with a PROXY header as HAProxy would), then SIGTERM.
    let mut direct = TcpStream::connect(a.served.addr).await.unwrap();
    direct
        .write_all(b"PROXY TCP4 127.0.0.5 127.0.0.1 40100 8443\r\n")
        .await
        .unwrap();
    let consumer = Consumer::new(&pki, Some("consumer"), a.served.addr, false);
    let mut sender = consumer.connect_over(direct).await.unwrap();
    let slow = ssp_request(
        Method::GET,
        &format!("/{}/fhir/slow", endpoint_url(provider.addr)),
        METADATA,
    )
    .body(empty())
    .unwrap();
    let slow = within("slow headers", sender.send(slow)).await.unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    signal(a.served.child.id(), "TERM");
    let deadline = Instant::now() + STEP;
    loop {
        let ready = a.admin_get("/readyz").await.unwrap_or_default();
        if ready.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a's /readyz did not turn 503: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While a drains, every request through HAProxy is answered (by b).
    let b_before = b.requests().len();
    for _ in 0..20 {
        let tcp = from_consumer_host(frontend).await;
        let status = within("during drain", get_over(&pki, frontend, provider.addr, tcp)).await;
        assert_eq!(status.unwrap(), StatusCode::OK);
        sent += 1;
    }
    assert_eq!(
        b.requests().len(),
        b_before + 20,
        "HAProxy sent new connections to the draining instance"
    );
    // The request in flight on a completes; then a exits cleanly.
    provider.state.release_slow.notify_one();
    let body = within("slow body", drain(slow.into_body())).await.unwrap();
    assert_eq!(body, "first,last".len() as u64);
    let mut a = a;
    let status = within("a exits", async {
        loop {
            if let Some(status) = a.served.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&a.log).unwrap_or_default()
    );
    // Nothing lost: every request answered has its record on one instance or the other; each chain verifies.
    assert_eq!(a.requests().len() + b.requests().len(), sent + 1);
    for dir in [a.audit_dir(), b.audit_dir()] {
        assert!(ssp::audit::verify(&dir).is_ok(), "{}", dir.display());
    }
    balancer.0.kill().unwrap();
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
