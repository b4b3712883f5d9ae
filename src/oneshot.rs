//! One HTTPS request on a new connection, for what ssp fetches itself: the Spine Directory Service's pages
//! (`ssp policy sds`), the patient-facing door's JWKS and the suppliers' token endpoints. hyper's HTTP/1.1 client
//! on tokio-rustls (the project's own TLS stack), the whole exchange under one deadline, the answer read whole up
//! to a bound. No redirect is followed and no proxy is used: every URL comes from the config or the directory, or
//! (SDS `next` links) is checked by the caller, never taken from a consumer. A leaf but for `tls`'s types.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// `upstream.resolve`: `host:port` pinned to an address, as for the provider leg.
pub(crate) type Resolve = std::collections::HashMap<String, std::net::SocketAddr>;

/// One request: `GET`, or `POST` with a form body (`application/x-www-form-urlencoded`) when `form` is given.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub(crate) url: &'a str,
    /// Fields besides `Host` (and the form's `Content-Type`): `Accept`, an API key, a request id.
    pub(crate) headers: &'a [(&'a str, &'a str)],
    pub(crate) form: Option<String>,
    /// The most of the answer's body read; past it the call fails.
    pub(crate) max_bytes: usize,
    /// The whole exchange's deadline, connect to the body's end.
    pub(crate) timeout: Duration,
}

/// What came back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Makes `call` over `tls`, connecting to the address `resolve` pins for its `host:port`, else to the host's own.
/// Errors: what went wrong, naming the URL (never a body, which may hold a token), for the operational log.
pub(crate) async fn call(
    tls: Arc<rustls::ClientConfig>,
    resolve: &Resolve,
    call: Call<'_>,
) -> Result<Answer, String> {
    let (url, timeout) = (call.url, call.timeout);
    match tokio::time::timeout(timeout, exchange(tls, resolve, call)).await {
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
    call: Call<'_>,
) -> Result<Answer, String> {
    let url = call.url;
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
    let mut builder = Request::builder().uri(path).header(header::HOST, authority);
    for (name, value) in call.headers {
        builder = builder.header(*name, *value);
    }
    let request = match call.form {
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
        let max = call.max_bytes;
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| format!("{url}: reading the answer (at most {max} bytes): {e}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

/// `application/x-www-form-urlencoded` (WHATWG URL, the form serialiser) of `pairs`.
pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
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
