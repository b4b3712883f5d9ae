//! One HTTPS request on a new connection, for the JWKS and the suppliers' token endpoints: hyper's HTTP/1.1
//! client on tokio-rustls (the project's own TLS stack), the whole exchange under one deadline, the answer read
//! whole up to a bound. No redirect is followed and no proxy is used: the URL comes from the config or the
//! directory, never from a consumer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest answer read: a JWKS of a few dozen keys, or a token response, is well under it.
pub(super) const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// `upstream.resolve`: `host:port` pinned to an address, as for the provider leg.
pub(super) type Resolve = std::collections::HashMap<String, std::net::SocketAddr>;

/// What went wrong, for the operational log (never a token: bodies are not quoted).
pub(super) type Failure = String;

/// `GET url` (with `Accept: accept`), or `POST url` with a form body when `form` is given
/// (`application/x-www-form-urlencoded`), within `timeout`. Returns the status, the content type and the body.
pub(super) async fn call(
    tls: Arc<rustls::ClientConfig>,
    resolve: &Resolve,
    url: &str,
    accept: &'static str,
    form: Option<String>,
    timeout: Duration,
) -> Result<(StatusCode, Option<String>, Bytes), Failure> {
    match tokio::time::timeout(timeout, exchange(tls, resolve, url, accept, form)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{url}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn exchange(
    tls: Arc<rustls::ClientConfig>,
    resolve: &Resolve,
    url: &str,
    accept: &'static str,
    form: Option<String>,
) -> Result<(StatusCode, Option<String>, Bytes), Failure> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: not https"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(bare.to_owned()).map_err(|e| format!("{url}: {e}"))?;
    let pinned = resolve.get(&format!("{}:{port}", bare.to_ascii_lowercase()));
    let tcp = match pinned {
        Some(addr) => TcpStream::connect(*addr).await,
        None => TcpStream::connect((bare, port)).await,
    }
    .map_err(|e| format!("{url}: connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    // Driven here, ended with this call: the connection is not kept.
    let driver = tokio::spawn(conn);
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let builder = Request::builder()
        .uri(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, accept);
    let request = match form {
        Some(form) => builder
            .method(http::Method::POST)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form))),
        None => builder
            .method(http::Method::GET)
            .body(Full::new(Bytes::new())),
    }
    .map_err(|e| format!("{url}: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let (parts, body) = response.into_parts();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| {
                format!("{url}: reading the answer (at most {MAX_ANSWER_BYTES} bytes): {e}")
            })?
            .to_bytes();
        Ok((parts.status, content_type, body))
    }
    .await;
    driver.abort();
    result
}

/// `application/x-www-form-urlencoded` (WHATWG URL, the form serialiser) of `pairs`.
pub(super) fn form(pairs: &[(&str, &str)]) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    /// Everything but `*-._` and alphanumerics is encoded (space too, as `%20`, which form decoders accept).
    const FORM: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'*')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_');
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, FORM),
                utf8_percent_encode(v, FORM)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}
