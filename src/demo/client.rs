//! A small mTLS HTTP/1.1 client and the dev audit token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls;

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
    pub(crate) fn diagnostics(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["issue"][0]["diagnostics"].as_str().map(str::to_owned)
    }
}

impl Client {
    /// A client for the server at `addr` (verified by its IP address against `ca`), presenting `identity`
    /// (certificate and key files) when given.
    pub(crate) fn new(
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
    pub(crate) async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, String> {
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
