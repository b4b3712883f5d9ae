//! The header rules of DESIGN.md 1.5 for the provider's HTTP/1.1 leg.

use std::net::{IpAddr, SocketAddr};

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
}

/// Makes a consumer's request header fields what the provider's HTTP/1.1 leg will carry, before any check reads
/// them: hop-by-hop fields removed, including every field a `Connection` field names (any case, any position, any
/// number of `Connection` fields; RFC 9110 7.6.1), and an HTTP/2 consumer's split `cookie` fields joined into one
/// with `"; "` (RFC 9113 8.2.3).
pub(crate) fn normalize_request_headers(headers: &mut HeaderMap, version: Version) {
    strip_hop_by_hop(headers);
    if version == Version::HTTP_2 {
        join_cookies(headers);
    }
}

/// Joins several `cookie` fields into one, in order, with `"; "`.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Applies the rest of DESIGN.md 1.5 to headers already normalised by [`normalize_request_headers`] (which the
/// pipeline does before the checks, so hop-by-hop fields are not looked for twice): `Host` set to the target
/// authority, `Forwarded` and `X-Forwarded-For` appended; every other header (the `Ssp-*` ones, `Authorization`)
/// unchanged. Every request passes here: the two values are written into one reused buffer.
pub(crate) fn rewrite_request_headers(
    headers: &mut HeaderMap,
    authority: &str,
    client_addr: SocketAddr,
) {
    use std::fmt::Write;
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    let ip = client_addr.ip().to_canonical();
    let mut value = String::with_capacity(64);
    // RFC 7239: an IPv6 node is bracketed and the value quoted.
    let _ = match ip {
        IpAddr::V4(v4) => write!(value, "for={v4};proto=https"),
        IpAddr::V6(v6) => write!(value, "for=\"[{v6}]\";proto=https"),
    };
    append_list(headers, header::FORWARDED, &mut value);
    value.clear();
    let _ = write!(value, "{ip}");
    append_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &mut value,
    );
}

/// Appends `value` to a comma-separated list header, joining existing lines into one (`value` is used as the
/// buffer).
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &mut String) {
    let existing: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !existing.is_empty() {
        let mine = std::mem::take(value);
        for line in existing {
            value.push_str(line);
            value.push_str(", ");
        }
        value.push_str(&mine);
    }
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}
