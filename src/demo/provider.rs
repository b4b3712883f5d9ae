//! The dev provider: TLS MA, canned GP Connect responses, accepting only the proxy's client certificate.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::tls;

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

/// The CN of the client certificate a TLS connection presented, if any.
pub(super) fn client_cn(
    stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Option<String> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::peer_identity)
        .and_then(|p| p.common_name)
}

/// The most of a request body the dev provider reads before it answers, in bytes.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

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
            let client_cn = client_cn(&stream);
            let is_proxy = client_cn.as_deref() == Some(&*allowed);
            let service = service_fn(move |request: Request<Incoming>| async move {
                let (parts, body) = request.into_parts();
                discard_body(body).await;
                Ok::<_, std::convert::Infallible>(provider_response(&parts, is_proxy))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Reads a request's body to its end, or to [`MAX_REQUEST_BODY`] bytes, keeping none of it. The whole body is read
/// before the answer, as a server should: one that answers and closes with request bytes unread makes its kernel
/// reset the connection, and the reset can destroy the answer before the proxy has read it (RFC 9112 section 9.6).
async fn discard_body(mut body: Incoming) {
    let mut seen = 0;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, Bytes::len);
        if seen > MAX_REQUEST_BODY {
            return;
        }
    }
}

/// The canned answer for a GP Connect request, chosen by the end of the path.
fn provider_response(request: &Parts, is_proxy: bool) -> Response<Full<Bytes>> {
    let path = request.uri.path();
    let (status, body) = if !is_proxy {
        (
            StatusCode::FORBIDDEN,
            provider_outcome("forbidden", "client is not the SSP"),
        )
    } else if path.ends_with("/fhir/metadata") && request.method == Method::GET {
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
    } else if path.ends_with("/fhir/Patient") && request.method == Method::GET {
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
        && request.method == Method::POST
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
    } else if path.contains("/fhir/Practitioner/") && request.method == Method::GET {
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
    if let Some(trace) = request.headers.get("ssp-traceid") {
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
