//! The transaction log leaves the box: `ssp serve` (the real binary) ships every record to a real rsyslog on
//! loopback over RFC 5425 TLS, both ends with certificates of the collector's own test CA, and the collector's
//! file witnesses the local log. rsyslog is started once here and stopped and started again under load; ssp is
//! killed with SIGKILL mid-shipping and started again; the local log is cut back and rewritten after shipping;
//! ssp then ships to the same rsyslog as a local relay over plain TCP; forged and foreign messages are added to a
//! copy of the collector's file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::*;

/// A real rsyslog, listening on one loopback port with TLS, writing what it receives as received (`%rawmsg%`).
struct Collector {
    dir: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl Collector {
    /// The witness file.
    fn file(&self) -> PathBuf {
        self.dir.join("witness.log")
    }

    fn start(&mut self) {
        let bin = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("rsyslogd");
        let child = std::process::Command::new(bin)
            .args(["-n", "-f"])
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslog.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("rsyslog.err")).unwrap())
            .spawn()
            .expect("rsyslogd (Debian packages rsyslog and rsyslog-gnutls; .ci/run installs them)");
        self.child = Some(child);
        let deadline = Instant::now() + STEP;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let err = std::fs::read_to_string(self.dir.join("rsyslog.err")).unwrap_or_default();
            assert!(Instant::now() < deadline, "rsyslog did not listen: {err}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and waits until it has exited (its file is complete then).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            child.wait().unwrap();
        }
    }

    /// The collector's file, once it holds every seq in `1..=last` (bounded wait: rsyslog writes its queue out
    /// shortly after it has read a batch).
    async fn holding(&self, last: u64) -> String {
        self.holding_copies(last, 1).await
    }

    /// The collector's file, once it holds at least `copies` copies of every seq in `1..=last`.
    async fn holding_copies(&self, last: u64, copies: usize) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let text = std::fs::read_to_string(self.file()).unwrap_or_default();
            let seqs = witnessed(&text);
            if (1..=last).all(|s| seqs.get(&s).is_some_and(|c| c.len() >= copies)) {
                return text;
            }
            let short: Vec<u64> = (1..=last)
                .filter(|s| seqs.get(s).is_none_or(|c| c.len() < copies))
                .take(10)
                .collect();
            assert!(
                Instant::now() < deadline,
                "the collector holds {} of {last} records; fewer than {copies} copies of seq {short:?}...",
                seqs.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The records in a collector file by seq: every copy's line, in file order.
fn witnessed(text: &str) -> BTreeMap<u64, Vec<String>> {
    let mut seqs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(m) = ssp::audit::ship::syslog::parse(line)
            && let Some(seq) = m.param(ssp::audit::ship::syslog::RECORD_SD, "seq")
        {
            seqs.entry(seq.parse().unwrap())
                .or_default()
                .push(m.msg.to_owned());
        }
    }
    seqs
}

/// The collector's test CA, its server certificate (localhost, 127.0.0.1) and the client certificate ssp ships
/// with, all written into `dir`; plus the Ed25519 head key (mode 0400). rsyslog checks the client certificate
/// against the same CA (`x509/certvalid`).
fn collector_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "test collector CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);
    for (name, server) in [("server", true), ("client", false)] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            if server {
                "localhost"
            } else {
                "ssp test-instance"
            },
        );
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for name in ["head", "other-head"] {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
}

/// rsyslog listening with TLS on `port` and, as a local relay would, in plain TCP on `relay`.
fn rsyslog_conf(dir: &Path, port: u16, relay: u16) -> String {
    let d = dir.display();
    format!(
        r#"global(workDirectory="{d}/work" maxMessageSize="256k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{d}/ca.pem"
  defaultNetstreamDriverCertFile="{d}/server.pem"
  defaultNetstreamDriverKeyFile="{d}/server.key")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imtcp" port="{port}" address="127.0.0.1")
module(load="imptcp")
input(type="imptcp" port="{relay}" address="127.0.0.1")
template(name="witness" type="string" string="%rawmsg%\n")
action(type="omfile" file="{d}/witness.log" template="witness")
"#
    )
}

/// `[audit.ship]` to the collector, after the test's `[audit]` lines.
fn ship_config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"segment_size = "64KiB"

[audit.ship]
collector = "localhost:{port}"
ca = ["{d}/ca.pem"]
cert = "{d}/client.pem"
key = "{d}/client.key"
head_key = "{d}/head.pem"
head_interval = "1s"
confirm_interval = "300ms"
"#
    )
}

/// A config shipping in plain TCP to `port` on loopback (a local relay).
fn tcp_ship(dir: &Path, port: u16) -> Setup {
    Setup {
        extra_audit: format!(
            "segment_size = \"64KiB\"\n\n[audit.ship]\ncollector = \"127.0.0.1:{port}\"\ntransport = \"tcp\"\n\
             head_key = \"{}\"\nconfirm_interval = \"300ms\"\n",
            dir.join("head.pem").display()
        ),
        ..Setup::default()
    }
}

/// A sample of `/metrics`, as a float; 0 when absent.
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    metrics_text(admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (bounded) until the shipper has nothing left: lag 0, and every record written confirmed.
async fn shipped_all(admin: SocketAddr, audit_dir: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = ssp::audit::verify(audit_dir).map_or(0, |v| v.last_seq);
        let lag = metric(admin, "ssp_audit_ship_lag_records").await;
        if lag == 0.0 && last > 0 && ssp::audit::verify(audit_dir).map_or(0, |v| v.last_seq) == last
        {
            let state = std::fs::read_to_string(audit_dir.join("ship.state")).unwrap_or_default();
            if state.contains(&format!("\"seq\":{last},")) {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "shipping did not catch up (lag {lag})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `n` permitted requests on one connection.
async fn send(consumer: &Consumer, provider: SocketAddr, n: u32, from: u32) {
    let mut sender = within("connect", consumer.connect()).await.unwrap();
    for i in from..from + n {
        let mut req = ssp_request(
            Method::GET,
            &format!("/{}/fhir/metadata", endpoint_url(provider)),
            METADATA,
        )
        .body(empty())
        .unwrap();
        req.headers_mut()
            .insert("ssp-traceid", trace_id(i).parse().unwrap());
        let response = within("request", sender.send(req)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain(response.into_body()).await.unwrap();
    }
}

fn verify_witness(config: &Path, witness: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "audit",
        "verify",
        "--config",
        config.to_str().unwrap(),
        "--witness",
        witness.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ssp_cmd(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_collector_and_the_collector_witnesses_the_log() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let cdir = pki.dir.path().join("collector");
    std::fs::create_dir_all(cdir.join("work")).unwrap();
    collector_pki(&cdir);
    let port = closed_port().await.port();
    let relay = closed_port().await.port();
    std::fs::write(cdir.join("rsyslog.conf"), rsyslog_conf(&cdir, port, relay)).unwrap();
    let mut collector = Collector {
        dir: cdir.clone(),
        port,
        child: None,
    };
    collector.start();
    let setup = Setup {
        extra_audit: ship_config(&cdir, port),
        ..Setup::default()
    };
    let config = pki.dir.path().join("ssp.toml");
    let audit_dir = pki.dir.path().join("data/audit");
    let ssp = Logged::start(&pki, provider.addr, setup.clone()).await;
    let consumer = Consumer::new(&pki, Some("consumer"), ssp.served.addr, false);

    // 1. Records arrive, each with its seq, instance and line hash in the structured data.
    send(&consumer, provider.addr, 30, 0).await;
    let last = shipped_all(ssp.admin, &audit_dir).await;
    assert!(last >= 60, "two records a transaction: {last}");
    let text = collector.holding(last).await;
    let local: Vec<String> = ssp::audit::segment_paths(&audit_dir)
        .unwrap()
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    for line in text.lines().filter(|l| l.contains("[ssp-record@32473 ")) {
        let m = ssp::audit::ship::syslog::parse(line).unwrap();
        let seq: usize = m.param("ssp-record@32473", "seq").unwrap().parse().unwrap();
        assert_eq!(m.msg, local[seq - 1], "seq {seq} arrived as written");
        assert_eq!(
            m.param("ssp-record@32473", "instance"),
            Some("test-instance")
        );
        let hash = ssp::hex::HexDigest::of(local[seq - 1].as_bytes());
        assert_eq!(m.param("ssp-record@32473", "hash"), Some(hash.as_str()));
    }
    assert!(text.contains("[ssp-head@32473 "), "a signed head arrived");
    let (code, out) = verify_witness(&config, &collector.file(), &[]);
    assert_eq!(code, 0, "{out}");
    eprintln!("{out}");
    assert!(out.contains(&format!("up to seq {last}")), "{out}");
    assert_eq!(
        metric(ssp.admin, "ssp_audit_shipped_records_total").await as u64,
        last
    );

    // 2. The collector stops under load: the lag goes up; it starts again: back to 0, every record there once in
    // the order written (a copy sent again after an unconfirmed batch has the same seq and bytes).
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU32::new(0));
    let load = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        let consumer = Consumer::new(&pki, Some("consumer"), ssp.served.addr, false);
        let provider = provider.addr;
        tokio::spawn(async move {
            let mut from = 1_000;
            while !stop.load(Ordering::Relaxed) {
                send(&consumer, provider, 5, from).await;
                from += 5;
                sent.fetch_add(5, Ordering::Relaxed);
            }
        })
    };
    while sent.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::spawn_blocking({
        let mut c = Collector {
            dir: cdir.clone(),
            port,
            child: collector.child.take(),
        };
        move || c.stop()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + STEP;
    let (mut lag, mut lag_seconds) = (0.0, 0.0);
    while lag < 20.0 || lag_seconds < 0.5 {
        lag = metric(ssp.admin, "ssp_audit_ship_lag_records").await;
        lag_seconds = metric(ssp.admin, "ssp_audit_ship_lag_seconds").await;
        assert!(
            Instant::now() < deadline,
            "the lag did not grow: {lag} records, {lag_seconds} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric(ssp.admin, "ssp_audit_ship_failures_total").await >= 1.0);
    collector.start();
    while sent.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let last = shipped_all(ssp.admin, &audit_dir).await;
    assert_eq!(metric(ssp.admin, "ssp_audit_ship_lag_seconds").await, 0.0);
    let text = collector.holding(last).await;
    let seqs = witnessed(&text);
    assert_eq!(
        seqs.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    let mut first_seen = Vec::new();
    for line in text.lines() {
        if let Some(m) = ssp::audit::ship::syslog::parse(line)
            && let Some(seq) = m.param("ssp-record@32473", "seq")
        {
            let seq: u64 = seq.parse().unwrap();
            if !first_seen.contains(&seq) {
                first_seen.push(seq);
            }
        }
    }
    assert!(
        first_seen.windows(2).all(|w| w[0] < w[1]),
        "in the order written"
    );
    for (seq, copies) in &seqs {
        assert!(
            copies.iter().all(|c| c == &copies[0]),
            "seq {seq}: copies differ"
        );
    }
    let (code, out) = verify_witness(&config, &collector.file(), &[]);
    assert_eq!(code, 0, "{out}");
    eprintln!("{out}");

    // 3. SIGKILL mid-shipping, and a start again: nothing missing; a record sent twice is the same record.
    let before = last;
    send(&consumer, provider.addr, 40, 5_000).await;
    let mut served = ssp.served;
    signal(served.child.id(), "KILL");
    served.child.wait().unwrap();
    drop(served);
    let ssp = Logged::start(&pki, provider.addr, setup.clone()).await;
    let consumer = Consumer::new(&pki, Some("consumer"), ssp.served.addr, false);
    send(&consumer, provider.addr, 10, 6_000).await;
    let last = shipped_all(ssp.admin, &audit_dir).await;
    assert!(last >= before + 100, "{before} -> {last}");
    let text = collector.holding(last).await;
    assert_eq!(
        witnessed(&text).len() as u64,
        last,
        "every record, none missing"
    );
    let (code, out) = verify_witness(&config, &collector.file(), &[]);
    assert_eq!(code, 0, "{out}");
    eprintln!("{out}");

    // 4. Cut back after shipping: the open segment loses its last three records (ssp killed, the segment left
    // open). The local chain alone still verifies; against the witness it fails, naming the last shipped seq.
    let mut served = ssp.served;
    signal(served.child.id(), "KILL");
    served.child.wait().unwrap();
    let open = ssp::audit::segment_paths(&audit_dir)
        .unwrap()
        .pop()
        .unwrap();
    let whole = std::fs::read_to_string(&open).unwrap();
    let lines: Vec<&str> = whole.lines().collect();
    assert!(lines.len() > 3, "the open segment holds records");
    let cut: String = lines[..lines.len() - 3]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&open, &cut).unwrap();
    let (code, out) = ssp_cmd(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "the local chain alone is content: {out}");
    let (code, out) = verify_witness(&config, &collector.file(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {}:", last - 2)), "{out}");
    assert!(
        out.contains(&format!("up to seq {last}, the last shipped")),
        "{out}"
    );
    std::fs::write(&open, &whole).unwrap();

    // 5. Rewritten after shipping, chain and all: a response record's status changed and every later `prev` made
    // to match. The local chain verifies; the witness names the changed record.
    let segments = ssp::audit::segment_paths(&audit_dir).unwrap();
    let originals: Vec<(PathBuf, String)> = segments
        .iter()
        .map(|p| (p.clone(), std::fs::read_to_string(p).unwrap()))
        .collect();
    let changed = rewrite_chain(&segments);
    let (code, out) = ssp_cmd(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "the rewritten chain verifies alone: {out}");
    let (code, out) = verify_witness(&config, &collector.file(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("seq {changed}: the local record differs")),
        "{out}"
    );
    for (path, text) in &originals {
        std::fs::write(path, text).unwrap();
    }

    // 6. To a relay on loopback over plain TCP: a new collector, so everything is shipped again from the first
    // record; the copies are the same records, counted once (the seal the start writes after the kill is new).
    let before = ssp::audit::verify(&audit_dir).unwrap().last_seq;
    let ssp = Logged::start(&pki, provider.addr, tcp_ship(&cdir, relay)).await;
    let last = shipped_all(ssp.admin, &audit_dir).await;
    assert!(
        ssp.log().contains("shipped to \"localhost:"),
        "{}",
        ssp.log()
    );
    assert!(
        last > before,
        "the start sealed the killed instance's segment"
    );
    collector.holding_copies(before, 2).await;
    collector.holding(last).await;
    let (code, out) = verify_witness(&config, &collector.file(), &[]);
    assert_eq!(code, 0, "{out}");
    let twice: u64 = out
        .split(", ")
        .find_map(|part| {
            part.trim_end()
                .strip_suffix(" records sent twice and counted once")
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        twice >= before,
        "every record came again over the relay: {out}"
    );
    drop(ssp);

    // 7. Heads: one signed by another key fails; without a key the heads cannot be checked; another instance's
    // records in the same file are left to `--instance`.
    collector.stop();
    let forged = pki.dir.path().join("forged.log");
    let mut text = std::fs::read_to_string(collector.file()).unwrap();
    let other_key = ssp::signing::SigningKey::load(&cdir.join("other-head.pem")).unwrap();
    let head = ssp::audit::ship::head::Head::sign(
        &other_key,
        "test-instance",
        5,
        ssp::hex::HexDigest::of(local[4].as_bytes()),
        "2026-12-07T10:00:00Z".into(),
    );
    let mut framed = Vec::new();
    let params: Vec<(&str, String)> = head.params().to_vec();
    let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let header = ssp::audit::ship::syslog::Header {
        ts: "2026-12-07T10:00:00Z",
        hostname: "elsewhere",
        procid: "1",
    };
    ssp::audit::ship::syslog::frame(
        &mut framed,
        &header,
        "head",
        "ssp-head@32473",
        &params,
        b"{}",
    );
    let framed = String::from_utf8(framed).unwrap();
    let (_, message) = framed.split_once(' ').unwrap();
    // Another instance's record, well formed, in the same file.
    let other_line =
        r#"{"seq":1,"instance":"other","ts":"2026-12-07T10:00:00Z","kind":"sealed","prev":"0"}"#;
    let mut other = Vec::new();
    let other_hash = ssp::hex::HexDigest::of(other_line.as_bytes());
    ssp::audit::ship::syslog::frame(
        &mut other,
        &header,
        "record",
        "ssp-record@32473",
        &[
            ("seq", "1"),
            ("instance", "other"),
            ("hash", other_hash.as_str()),
        ],
        other_line.as_bytes(),
    );
    let other = String::from_utf8(other).unwrap();
    text.push_str(other.split_once(' ').unwrap().1);
    text.push('\n');
    std::fs::write(&forged, &text).unwrap();
    let (code, out) = verify_witness(&config, &forged, &[]);
    assert_eq!(
        code, 0,
        "another instance's records are not this log's: {out}"
    );
    let (code, out) = verify_witness(&config, &forged, &["--instance", "other"]);
    assert_eq!(code, 64, "a check that cannot be made as asked: {out}");
    assert!(out.contains("is instance \"test-instance\""), "{out}");
    text.push_str(message);
    text.push('\n');
    std::fs::write(&forged, &text).unwrap();
    let (code, out) = verify_witness(&config, &forged, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not signed by the head key"), "{out}");
    // A message of ssp's cut inside its structured data is named, not skipped.
    let cut = pki.dir.path().join("cut.log");
    let whole = std::fs::read_to_string(collector.file()).unwrap();
    let head_line = whole
        .lines()
        .find(|l| l.contains("[ssp-head@32473 "))
        .unwrap();
    let at = head_line.find(" seq=").unwrap() + 6;
    std::fs::write(&cut, format!("{whole}{}\n", &head_line[..at])).unwrap();
    let (code, out) = verify_witness(&config, &cut, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("a message of ssp that cannot be read"),
        "{out}"
    );
    // A witness that cannot be read is bad usage, not a difference.
    let (code, out) = verify_witness(&config, pki.dir.path(), &[]);
    assert_eq!(code, 64, "{out}");
    let (code, out) = ssp_cmd(&[
        "audit",
        "verify",
        "--dir",
        audit_dir.to_str().unwrap(),
        "--witness",
        collector.file().to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("cannot be checked without the public key"),
        "{out}"
    );

    // 8. A collector that answers the proxy's close with data instead of its own close, and never closes: each
    // batch fails within its bound (it is never confirmed, so nothing is lost), the failures and the lag show it, requests are answered, and SIGTERM stops the
    // proxy within the shipping bound.
    let talker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let talk_port = talker.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in talker.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let _ = std::io::copy(&mut (&conn).take(u64::MAX), &mut std::io::sink());
                while conn.write_all(&[b'x'; 1024]).is_ok() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
    });
    let ssp = Logged::start(&pki, provider.addr, tcp_ship(&cdir, talk_port)).await;
    let consumer = Consumer::new(&pki, Some("consumer"), ssp.served.addr, false);
    send(&consumer, provider.addr, 5, 9_000).await;
    let deadline = Instant::now() + STEP;
    while metric(ssp.admin, "ssp_audit_ship_failures_total").await < 2.0
        || metric(ssp.admin, "ssp_audit_ship_lag_records").await < 10.0
    {
        assert!(
            Instant::now() < deadline,
            "the failures do not show:\n{}",
            ssp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(ssp.admin, "ssp_audit_shipped_records_total").await,
        0.0
    );
    ssp.wait_for_log("the collector sent data on a one-way connection")
        .await;
    let mut served = ssp.served;
    let stopping = Instant::now();
    signal(served.child.id(), "TERM");
    while served.child.try_wait().unwrap().is_none() {
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "SIGTERM did not stop ssp"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Changes the first response record with status 200 to say 204, and rewrites every later `prev`, so that the
/// chain is whole again. Returns the changed record's seq.
fn rewrite_chain(segments: &[PathBuf]) -> u64 {
    let mut changed = None;
    let (mut prev_old, mut prev_new) = (String::new(), String::new());
    let mut seq = 0u64;
    for path in segments {
        let text = std::fs::read_to_string(path).unwrap();
        let mut out = String::new();
        for original in text.lines() {
            seq += 1;
            let line = if changed.is_none() && original.contains("\"status\":200") {
                changed = Some(seq);
                original.replacen("\"status\":200", "\"status\":204", 1)
            } else if changed.is_some() {
                original.replacen(
                    &format!("\"prev\":\"{prev_old}\""),
                    &format!("\"prev\":\"{prev_new}\""),
                    1,
                )
            } else {
                original.to_owned()
            };
            prev_old = ssp::hex::HexDigest::of(original.as_bytes()).to_string();
            prev_new = ssp::hex::HexDigest::of(line.as_bytes()).to_string();
            out.push_str(&line);
            out.push('\n');
        }
        std::fs::write(path, out).unwrap();
    }
    changed.expect("a response with status 200")
}
