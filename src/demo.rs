//! `ssp demo`: the newcomer's first run. Starts the proxy on the dev config beside a built-in dev provider (TLS
//! MA, canned GP Connect responses, accepting only the proxy's client certificate), sends one permitted request
//! per interaction the dev policy knows and one refused request per check of DESIGN.md 1.4, prints what happened
//! and `curl` lines to try by hand, and keeps serving until Ctrl-C.
//!
//! The dev provider and the small mTLS client here are also what the integration tests build on.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::Config;
use crate::devcerts;
use crate::ids::TraceId;
use crate::tls;

pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------------------------
// The dev provider.

/// A provider's TLS config: its server certificate, client certificates required and chained to `ca`.
pub fn provider_tls(
    cert: &Path,
    key: &Path,
    ca: &[PathBuf],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let roots = tls::load_roots("provider ca", ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            tls::load_certs("provider cert", cert)?,
            tls::load_key("provider key", key)?,
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves canned GP Connect answers until `shutdown`. Like a real provider, it answers only the proxy: a client
/// whose certificate CN is not `allowed_client` gets 403.
pub async fn serve_provider(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    allowed_client: String,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let allowed: Arc<str> = allowed_client.into();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            () = &mut shutdown => return,
        };
        let acceptor = acceptor.clone();
        let allowed = Arc::clone(&allowed);
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let client_cn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::peer_identity)
                .and_then(|p| p.common_name);
            let is_proxy = client_cn.as_deref() == Some(&*allowed);
            let service = service_fn(move |request: Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(provider_response(&request, is_proxy))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The canned answer for a GP Connect request, chosen by the end of the path.
fn provider_response(request: &Request<Incoming>, is_proxy: bool) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let (status, body) = if !is_proxy {
        (
            StatusCode::FORBIDDEN,
            provider_outcome("forbidden", "client is not the SSP"),
        )
    } else if path.ends_with("/fhir/metadata") && request.method() == Method::GET {
        (
            StatusCode::OK,
            serde_json::json!({
                "resourceType": "CapabilityStatement",
                "version": "1.6.0",
                "name": "GP Connect dev provider",
                "status": "active",
                "date": "2026-11-01",
                "publisher": "ssp demo",
                "kind": "capability",
                "fhirVersion": "3.0.1",
                "format": ["application/fhir+json", "application/fhir+xml"],
                "rest": [{ "mode": "server" }]
            }),
        )
    } else if path.ends_with("/fhir/Patient") && request.method() == Method::GET {
        (
            StatusCode::OK,
            serde_json::json!({
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{ "resource": {
                    "resourceType": "Patient",
                    "id": "2",
                    "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9690937286" }],
                    "name": [{ "use": "official", "family": "Demo", "given": ["Test"] }]
                }}]
            }),
        )
    } else if path.ends_with("/fhir/Patient/$gpc.getstructuredrecord")
        && request.method() == Method::POST
    {
        (
            StatusCode::OK,
            serde_json::json!({
                "resourceType": "Bundle",
                "meta": { "profile": ["https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-StructuredRecord-Bundle-1"] },
                "type": "collection",
                "entry": [{ "resource": { "resourceType": "Patient", "id": "2" } },
                          { "resource": { "resourceType": "AllergyIntolerance", "id": "1", "clinicalStatus": "active" } }]
            }),
        )
    } else if path.contains("/fhir/Practitioner/") && request.method() == Method::GET {
        (
            StatusCode::OK,
            serde_json::json!({
                "resourceType": "Practitioner",
                "id": "1",
                "name": [{ "family": "Gilbert", "given": ["Nichole"], "prefix": ["Dr"] }]
            }),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            provider_outcome("not-found", "no such resource on the dev provider"),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json;charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if let Some(trace) = request.headers().get("ssp-traceid") {
        headers.insert("ssp-traceid", trace.clone());
    }
    response
}

fn provider_outcome(code: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": code, "diagnostics": text }]
    })
}

// ---------------------------------------------------------------------------------------------------------------
// A small mTLS HTTP/1.1 client.

/// A consumer-side client: one TLS connection per request, an optional client certificate.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    addr: SocketAddr,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What came back.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The `diagnostics` text of an OperationOutcome body, if it is one.
    pub fn diagnostics(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["issue"][0]["diagnostics"].as_str().map(str::to_owned)
    }
}

impl Client {
    /// A client for the server at `addr` (verified by its IP address against `ca`), presenting `identity`
    /// (certificate and key files) when given.
    pub fn new(
        addr: SocketAddr,
        ca: &[PathBuf],
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, String> {
        let roots = tls::load_roots("ca", ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(tls::load_certs("cert", cert)?, tls::load_key("key", key)?)
                .map_err(|e| e.to_string())?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            addr,
            server_name: ServerName::IpAddress(addr.ip().into()),
        })
    }

    /// Sends one request on a fresh connection and reads the whole answer.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            // A TLS 1.3 client finishes its handshake before the server has checked its certificate: a refusal
            // arrives as an alert on the first read, which the connection task saw. Its error names the alert.
            Err(e) => {
                return Err(match conn.await {
                    Ok(Err(conn_error)) => error_chain(&conn_error),
                    _ => error_chain(&e),
                });
            }
        };
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| error_chain(&e))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An unsigned GP Connect 1.x audit token (`alg: none`) for `aud`, as a consumer would send it.
pub fn dev_jwt(aud: &str, scope: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "iss": "https://consumer.dev.localhost",
        "sub": "1",
        "aud": aud,
        "exp": now + 300,
        "iat": now,
        "reason_for_request": "directcare",
        "requested_scope": scope,
        "requesting_device": {
            "resourceType": "Device",
            "identifier": [{ "system": "https://consumer.dev.localhost/Id/device", "value": "demo-1" }],
            "model": "ssp demo", "version": "1.0"
        },
        "requesting_organization": {
            "resourceType": "Organization",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RXX01" }],
            "name": "Example Hospital"
        },
        "requesting_practitioner": {
            "resourceType": "Practitioner",
            "id": "1",
            "identifier": [
                { "system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "111222333444" },
                { "system": "https://fhir.nhs.uk/Id/sds-role-profile-id", "value": "444555666777" }
            ],
            "name": [{ "family": "Demo", "given": ["Doctor"], "prefix": ["Dr"] }]
        }
    });
    crate::jwt::encode_unsigned(&claims)
}

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
pub async fn run(config: Config) -> Result<(), DemoError> {
    let certs = config
        .server
        .client_ca
        .first()
        .and_then(|ca| ca.parent())
        .map(Path::to_path_buf)
        .ok_or("server.client_ca names no file")?;
    let assembled = crate::app::assemble(&config)?;
    let server = crate::app::bind(&config, assembled)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let proxy_addr = server.local_addr()?;
    let admin_addr = server.admin_addr()?;

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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
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
    let rows = run_scenarios(proxy_addr, &certs, &config.server.client_ca).await;
    print_table(&rows);
    print_audit(&config.audit.dir, demo_started).await;
    print_curl(proxy_addr, &certs);

    println!("\nserving until Ctrl-C ...");
    crate::lifecycle::shutdown_signal().await;
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
