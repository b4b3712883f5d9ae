//! `ssp demo`: the newcomer's first run. Starts the proxy on the dev config beside a built-in dev provider (TLS
//! MA, canned GP Connect responses, accepting only the proxy's client certificate), sends one permitted request
//! per interaction the dev policy knows and one refused request per check of DESIGN.md 1.4, prints what happened
//! and `curl` lines to try by hand, and keeps serving until Ctrl-C.
//!
//! The dev provider and the small mTLS client here are also what the integration tests build on.
//!
//! - `provider`: the dev provider.
//! - `client`: the small mTLS client and the dev audit token.
//! - [`devcerts`]: the development PKI (also `ssp dev-certs`, and the tests' and benchmarks' PKIs).

pub mod auth;
mod client;
pub mod devcerts;
mod patient;
mod provider;

pub use client::{Answer, Client, dev_jwt};
pub use provider::{provider_tls, serve_provider};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::ids::TraceId;

pub(crate) type DemoError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------------------------
// The demo run.

const FROM: &str = "200000000359";
const FROM_2: &str = "200000000360";
const TO: &str = "918999198993";
const TO_DOWN: &str = "918999198994";
const ENDPOINT: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect";
const ENDPOINT_DOWN: &str = "https://provider2.dev.localhost:9444/B82618/STU3/1/gpconnect";
const URN: &str = "urn:nhs:names:services:gpconnect:";

/// One demo request.
struct Scenario {
    check: &'static str,
    what: &'static str,
    /// Certificate file stem in the dev PKI folder.
    cert: &'static str,
    method: Method,
    /// Path on the proxy: `/` + target URL.
    path: String,
    from: &'static str,
    to: &'static str,
    interaction: &'static str,
    /// Leave out `Ssp-TraceID`.
    no_trace_id: bool,
    /// Send a token whose `aud` is not the endpoint.
    wrong_audience: bool,
    body: Option<&'static str>,
    expect: &'static str,
}

impl Scenario {
    fn new(check: &'static str, what: &'static str, expect: &'static str) -> Self {
        Self {
            check,
            what,
            cert: "consumer",
            method: Method::GET,
            path: format!("/{ENDPOINT}/fhir/metadata"),
            from: FROM,
            to: TO,
            interaction: "fhir:rest:read:metadata-1",
            no_trace_id: false,
            wrong_audience: false,
            body: None,
            expect,
        }
    }
}

fn scenarios() -> Vec<Scenario> {
    let s = Scenario::new;
    vec![
        s("permit", "read metadata", "200"),
        Scenario {
            path: format!(
                "/{ENDPOINT}/fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9690937286"
            ),
            interaction: "fhir:rest:search:patient-1",
            ..s("permit", "search patient", "200")
        },
        Scenario {
            path: format!("/{ENDPOINT}/fhir/Practitioner/1"),
            interaction: "fhir:rest:read:practitioner-1",
            ..s("permit", "read practitioner", "200")
        },
        Scenario {
            method: Method::POST,
            path: format!("/{ENDPOINT}/fhir/Patient/$gpc.getstructuredrecord"),
            interaction: "fhir:operation:gpc.getstructuredrecord-1",
            body: Some(
                r#"{"resourceType":"Parameters","parameter":[{"name":"patientNHSNumber","valueIdentifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9690937286"}}]}"#,
            ),
            ..s("permit", "get structured record", "200")
        },
        Scenario {
            cert: "consumer-revoked",
            ..s("1 tls", "revoked certificate", "handshake refused")
        },
        Scenario {
            cert: "consumer-expired",
            ..s("1 tls", "expired certificate", "handshake refused")
        },
        Scenario {
            method: Method::TRACE,
            ..s("2 method", "TRACE", "405")
        },
        Scenario {
            path: "/http://provider.dev.localhost:9443/B82617/STU3/1/gpconnect/fhir/metadata"
                .into(),
            ..s("3 target", "http:// target", "400")
        },
        Scenario {
            no_trace_id: true,
            ..s("4 headers", "no Ssp-TraceID", "400")
        },
        Scenario {
            cert: "consumer2",
            ..s("5 fqdn", "consumer2 cert as 200000000359", "403")
        },
        Scenario {
            interaction: "fhir:rest:read:appointment-1",
            ..s("6 sender", "interaction not accredited", "403")
        },
        Scenario {
            to: "999999999999",
            ..s("7 receiver", "unknown Ssp-To", "403")
        },
        Scenario {
            cert: "consumer2",
            from: FROM_2,
            ..s("8 agreement", "no sharing agreement", "403")
        },
        Scenario {
            path: "/https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata".into(),
            ..s("9 endpoint", "IP instead of host name", "400")
        },
        Scenario {
            wrong_audience: true,
            ..s("10 jwt", "token for another audience", "400")
        },
        Scenario {
            to: TO_DOWN,
            path: format!("/{ENDPOINT_DOWN}/fhir/metadata"),
            ..s("upstream", "provider down", "502")
        },
    ]
}

/// Runs the demo on a loaded config until Ctrl-C.
pub(crate) async fn run(config: Config) -> Result<(), DemoError> {
    let certs = config
        .server
        .client_ca
        .first()
        .and_then(|ca| ca.parent())
        .map(Path::to_path_buf)
        .ok_or("server.client_ca names no file")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Before the proxy starts: its patient-facing listener fetches the JWKS from here at start.
    let patient = patient::start(&config, &certs, stopped(stop_rx.clone())).await?;
    let assembled = crate::app::assemble(&config)?;
    let server = crate::app::bind(&config, assembled)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let proxy_addr = server.local_addr()?;
    let admin_addr = server.admin_addr()?;
    let patient_addr = server.patient_facing_addr().transpose()?;
    // SIGHUP reloads as under `ssp serve`, rather than ending the demo with its log unsealed.
    tokio::spawn(crate::lifecycle::reload_on_sighup(
        config.clone(),
        server.handles(),
    ));

    let provider_addr = *config
        .upstream
        .resolve
        .get("provider.dev.localhost:9443")
        .ok_or(
            "the demo needs [upstream.resolve] \"provider.dev.localhost:9443\" (see ssp.toml)",
        )?;
    let provider_listener = TcpListener::bind(provider_addr)
        .await
        .map_err(|e| format!("cannot start the dev provider on {provider_addr}: {e}"))?;
    let provider_tls = provider_tls(
        &certs.join("provider.crt"),
        &certs.join("provider.key"),
        &config.upstream.ca,
    )?;

    let provider = tokio::spawn(serve_provider(
        provider_listener,
        provider_tls,
        devcerts::PROXY_CLIENT_NAME.to_owned(),
        stopped(stop_rx.clone()),
    ));
    let proxy = tokio::spawn(server.run(stopped(stop_rx), config.server.shutdown_grace));
    let demo_started = time::OffsetDateTime::now_utc();

    println!(
        "ssp demo: proxy on https://{proxy_addr}, dev provider on https://{provider_addr} (as provider.dev.localhost:9443)"
    );
    println!("metrics and health on http://{admin_addr}/metrics, /healthz, /readyz");
    println!(
        "certificates from {} ({})\n",
        certs.display(),
        devcerts::WARNING
    );
    if let Some(addr) = patient_addr {
        println!(
            "patient-facing listener on https://{addr} (NHS login access tokens, no client certificate)"
        );
    }
    let mut rows = run_scenarios(proxy_addr, &certs, &config.server.client_ca).await;
    if let (Some(patient), Some(addr)) = (&patient, patient_addr) {
        rows.extend(patient.run(addr, &config.server.client_ca).await);
    }
    print_table(&rows);
    print_audit(&config.audit.dir, demo_started).await;
    print_curl(proxy_addr, &certs);
    if let (Some(patient), Some(addr)) = (&patient, patient_addr) {
        println!(
            "{}",
            patient.curl(addr, &certs.join("ca.crt").display().to_string())
        );
    }

    // Taken over before saying so: a Ctrl-C right after the line must stop the demo cleanly.
    let signalled = crate::lifecycle::shutdown_signal();
    println!("\nserving until Ctrl-C ...");
    signalled.await;
    let _ = stop_tx.send(true);
    let _ = proxy.await;
    let _ = provider.await;
    Ok(())
}

/// Prints the audit records this run produced (response records are written as exchanges end, so give them a
/// moment).
async fn print_audit(dir: &Path, since: time::OffsetDateTime) {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let filter = crate::audit::Filter {
        since: Some(since),
        ..Default::default()
    };
    match crate::audit::query(dir, &filter) {
        Ok(records) => {
            println!(
                "\nAudit records of these requests ({}; verify with `ssp audit verify`):\n",
                dir.display()
            );
            println!("{}", crate::audit::TABLE_HEADER);
            for r in &records {
                let row: String = crate::audit::table_row(r).chars().take(220).collect();
                println!("{row}");
            }
        }
        Err(e) => println!("\ncannot read the audit log in {}: {e}", dir.display()),
    }
}

/// (check, request, expected, got, ok)
type Row = (String, String, String, String, bool);

async fn run_scenarios(proxy: SocketAddr, certs: &Path, ca: &[PathBuf]) -> Vec<Row> {
    let mut rows = Vec::new();
    for sc in scenarios() {
        let cert = certs.join(format!("{}.crt", sc.cert));
        let key = certs.join(format!("{}.key", sc.cert));
        let got = match Client::new(proxy, ca, Some((&cert, &key))) {
            Err(e) => Err(e),
            Ok(client) => client.send(build_request(&sc)).await,
        };
        let (text, ok) = match got {
            Ok(answer) => {
                let detail = answer.diagnostics().unwrap_or_else(|| {
                    let kind = serde_json::from_slice::<serde_json::Value>(&answer.body)
                        .ok()
                        .and_then(|v| v["resourceType"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    format!("{kind} ({} bytes from the provider)", answer.body.len())
                });
                let status = answer.status.as_u16().to_string();
                (format!("{status} {detail}"), status == sc.expect)
            }
            Err(e) => (format!("refused: {e}"), sc.expect == "handshake refused"),
        };
        rows.push((
            sc.check.to_owned(),
            sc.what.to_owned(),
            sc.expect.to_owned(),
            text,
            ok,
        ));
    }
    rows
}

fn build_request(sc: &Scenario) -> Request<Full<Bytes>> {
    let interaction = format!("{URN}{}", sc.interaction);
    let scope = crate::ids::InteractionId::parse(&interaction)
        .as_ref()
        .and_then(crate::jwt::required_scope)
        .unwrap_or("patient/*.read");
    let audience = match (sc.wrong_audience, sc.to) {
        (true, _) => "https://elsewhere.example/fhir",
        (false, TO_DOWN) => ENDPOINT_DOWN,
        (false, _) => ENDPOINT,
    };
    let mut builder = Request::builder()
        .method(sc.method.clone())
        .uri(&sc.path)
        .header("host", "ssp.dev.localhost")
        .header("accept", "application/fhir+json")
        .header("ssp-from", sc.from)
        .header("ssp-to", sc.to)
        .header("ssp-interactionid", interaction)
        .header(
            "authorization",
            format!("Bearer {}", dev_jwt(audience, scope)),
        );
    if !sc.no_trace_id {
        builder = builder.header("ssp-traceid", TraceId::new_random().as_str());
    }
    if sc.body.is_some() {
        builder = builder.header("content-type", "application/fhir+json");
    }
    let body = Full::new(
        sc.body
            .map_or_else(Bytes::new, |b| Bytes::from_static(b.as_bytes())),
    );
    builder
        .body(body)
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

fn print_table(rows: &[Row]) {
    let width = |f: fn(&Row) -> &String, min: usize| {
        rows.iter().map(|r| f(r).len()).max().unwrap_or(0).max(min)
    };
    let (w0, w1, w2) = (width(|r| &r.0, 5), width(|r| &r.1, 7), width(|r| &r.2, 8));
    println!(
        "  {:w0$}  {:w1$}  {:w2$}  got",
        "check", "request", "expected"
    );
    println!("  {}", "-".repeat(w0 + w1 + w2 + 60));
    for (check, what, expect, got, ok) in rows {
        let mark = if *ok { " " } else { "!" };
        let got: String = got.chars().take(140).collect();
        println!("{mark} {check:w0$}  {what:w1$}  {expect:w2$}  {got}");
    }
    let failed = rows.iter().filter(|r| !r.4).count();
    if failed > 0 {
        println!("\n{failed} request(s) did not get the expected answer (marked !)");
    }
}

fn print_curl(proxy: SocketAddr, certs: &Path) {
    let cwd = std::env::current_dir().unwrap_or_default();
    let rel = |path: PathBuf| {
        path.strip_prefix(&cwd)
            .map(Path::to_path_buf)
            .unwrap_or(path)
            .display()
            .to_string()
    };
    // Tokens live 300 s, so each pasted line asks this binary for a fresh one.
    let ssp = std::env::current_exe().map_or_else(|_| "ssp".to_owned(), rel);
    let common = |scope: &str| {
        format!(
            "curl --cert {} --key {} --cacert {} \\\n    -H \"Ssp-TraceID: $(cat /proc/sys/kernel/random/uuid)\" -H 'Ssp-From: {FROM}' -H 'Ssp-To: {TO}' \\\n    -H \"Authorization: Bearer $({ssp} dev-token --aud {ENDPOINT} --scope '{scope}')\"",
            rel(certs.join("consumer.crt")),
            rel(certs.join("consumer.key")),
            rel(certs.join("ca.crt")),
        )
    };
    println!("\nTry it by hand (development certificates):\n");
    println!(
        "{} \\\n    -H 'Ssp-InteractionID: {URN}fhir:rest:read:metadata-1' \\\n    https://{proxy}/{ENDPOINT}/fhir/metadata\n",
        common("organization/*.read")
    );
    println!(
        "{} \\\n    -H 'Ssp-InteractionID: {URN}fhir:operation:gpc.getstructuredrecord-1' \\\n    -H 'Content-Type: application/fhir+json' -d '{{\"resourceType\":\"Parameters\"}}' \\\n    https://{proxy}/{ENDPOINT}/fhir/Patient/\\$gpc.getstructuredrecord\n",
        common("patient/*.read")
    );
    println!(
        "# refused at check 6 (interaction not accredited), as an XML OperationOutcome:\n{} \\\n    -H 'Ssp-InteractionID: {URN}fhir:rest:read:appointment-1' -H 'Accept: application/fhir+xml' \\\n    https://{proxy}/{ENDPOINT}/fhir/Appointment/1",
        common("patient/*.read")
    );
}
