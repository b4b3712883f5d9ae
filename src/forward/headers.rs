//! The header rules of DESIGN.md 1.5 for the provider's HTTP/1.1 leg.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};

use super::BadResponse;

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

/// The largest provider response head ssp forwards, in bytes, as [`response_head_len`] counts it; a larger one
/// is a 502. It is below the provider connection's read buffer (64 KiB, `pool`), so that hyper never refuses a
/// head this rule lets through: hyper checks its own bound only when a read fills the buffer, which depends on how
/// the head arrived, so that heads between 64 and about 96 KiB passed or failed by chance (found with a Python
/// provider). For comparison, nginx refuses past its `proxy_buffer_size` (4 or 8 KiB), HAProxy past `tune.bufsize`
/// (16 KiB).
pub(crate) const MAX_RESPONSE_HEAD: usize = 60 * 1024;

/// The most fields a provider response head may have (hyper's default; HAProxy's `tune.http.maxhdr` is 101); a
/// head with more is a 502.
pub(crate) const MAX_RESPONSE_FIELDS: usize = 100;

/// A response head's size as sent: the status line (`HTTP/1.1`, the code, the standard reason phrase, CRLF), each
/// field as `name: value` and CRLF, and the closing CRLF. Padding a provider put around values is not counted.
pub(crate) fn response_head_len(status: StatusCode, headers: &HeaderMap) -> usize {
    let status_line = "HTTP/1.1 200 ".len() + status.canonical_reason().map_or(0, str::len) + 2;
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    status_line + fields + 2
}

/// Whether `e` (or one of its sources) is hyper refusing a head as too large: over the read buffer, or over
/// [`MAX_RESPONSE_FIELDS`].
pub(crate) fn is_head_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    super::in_source_chain(e, |e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
    })
}

/// The obsolete `Proxy-Connection`, removed with the hop-by-hop headers.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their names finds that out for less than a lookup of each
    // hop-by-hop name. Any `Connection` field is itself one, so the fields it names are only looked for with it.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == PROXY_CONNECTION)
    {
        return;
    }
    // Read as bytes: a value with obs-text (bytes 0x80 to 0xFF, RFC 9110 section 5.5) in one element still names
    // the fields of its other elements; an element that is not a field name names nothing.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(PROXY_CONNECTION);
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

/// The `Forwarded` and `X-Forwarded-For` elements that name one consumer connection's client, made once per
/// connection (its requests share them).
#[derive(Debug, Clone)]
pub(crate) struct ClientFields {
    /// RFC 7239 section 4: `for=192.0.2.1;proto=https`; an IPv6 node bracketed and the value quoted.
    forwarded: HeaderValue,
    /// The address alone.
    forwarded_for: HeaderValue,
}

impl ClientFields {
    pub(crate) fn of(client: SocketAddr) -> Self {
        let ip = client.ip().to_canonical();
        let forwarded = match ip {
            IpAddr::V4(v4) => format!("for={v4};proto=https"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=https"),
        };
        // An address and these separators are always a valid field value.
        let value = |text: String| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        };
        Self {
            forwarded: value(forwarded),
            forwarded_for: value(ip.to_string()),
        }
    }
}

/// Applies the rest of DESIGN.md 1.5 to headers already normalised by [`normalize_request_headers`] (which the
/// pipeline does before the checks, so hop-by-hop fields are not looked for twice): `Host` set to the target
/// authority, `Forwarded` and `X-Forwarded-For` appended; every other header (the `Ssp-*` ones, `Authorization`)
/// unchanged. Every request passes here: the client's elements are the connection's, shared.
pub(crate) fn rewrite_request_headers(
    headers: &mut HeaderMap,
    authority: &str,
    client: &ClientFields,
) {
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    append_list(headers, header::FORWARDED, &client.forwarded);
    append_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &client.forwarded_for,
    );
}

/// Appends `value` to a comma-separated list header, joining existing lines into one.
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    let mut existing = headers.get_all(&name).iter().peekable();
    if existing.peek().is_none() {
        headers.insert(name, value.clone());
        return;
    }
    let mut joined = Vec::new();
    for line in existing {
        joined.extend_from_slice(line.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(value.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(name, v);
    }
}

/// Whether a provider's response head can be forwarded as it stands, and its framing fields made what the
/// consumer's leg will carry: not a `101` (ssp never asks for an upgrade), a final status from 200 to 599, and
/// no transfer coding but a single `chunked`, which hyper has decoded. With both framings, Transfer-Encoding wins
/// and the `Content-Length` (of the coded message, not the content) is removed before forwarding (RFC 9112
/// section 6.3). The statuses 204 and 304 and a response to HEAD need no check of their body: hyper reads none.
pub(crate) fn response_framing(parts: &mut http::response::Parts) -> Result<(), BadResponse> {
    let status = parts.status.as_u16();
    if status == 101 {
        return Err(BadResponse::UnsolicitedSwitch);
    }
    if !(200..=599).contains(&status) {
        return Err(BadResponse::InvalidStatus(status));
    }
    match codings(&parts.headers) {
        None => Ok(()),
        Some(Codings {
            chunked: 1,
            other: false,
        }) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Ok(())
        }
        Some(_) => Err(BadResponse::TransferCoding),
    }
}

/// What is wrong with a request's own framing fields, found before any check reads the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFramingError {
    /// `Host` missing from an HTTP/1.1 request, repeated, or not `uri-host [":" port]` (RFC 9112 section 3.2: 400).
    Host,
    /// A transfer coding other than `chunked` (`gzip, chunked`): ssp does not decode it, and forwarding its bytes as
    /// the content would change the request (RFC 9112 section 6.1: 501).
    CodingNotImplemented,
    /// `chunked` more than once (RFC 9112 section 6.1: a sender must not apply it more than once; 400).
    ChunkedTwice,
}

/// A request's framing fields as ssp can forward the request: `Transfer-Encoding` none or `chunked` once (which
/// hyper has decoded), and exactly one valid `Host` (none needed over HTTP/1.0 and HTTP/2, whose `:authority`
/// names it). Read before the hop-by-hop removal, which takes `Transfer-Encoding` away.
pub(crate) fn request_framing(
    headers: &HeaderMap,
    version: Version,
) -> Result<(), RequestFramingError> {
    match codings(headers) {
        Some(Codings { other: true, .. }) => return Err(RequestFramingError::CodingNotImplemented),
        Some(Codings { chunked: 2.., .. }) => return Err(RequestFramingError::ChunkedTwice),
        _ => {}
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let valid = match (hosts.next(), hosts.next()) {
        (None, _) => version != Version::HTTP_11,
        (Some(_), Some(_)) => false,
        (Some(host), None) => valid_host(host.as_bytes()),
    };
    if valid {
        Ok(())
    } else {
        Err(RequestFramingError::Host)
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 section 3.2.2; empty is allowed): an IPv6 literal in brackets, or a reg-name
/// of unreserved, percent-encoded and sub-delim characters (which covers IPv4), then an optional port of digits.
fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.strip_prefix(b"[") {
        Some(rest) => {
            let Some(end) = rest.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = std::str::from_utf8(&rest[..end]).unwrap_or("");
            if literal.parse::<std::net::Ipv6Addr>().is_err() {
                return false;
            }
            match &rest[end + 1..] {
                [] => return true,
                [b':', port @ ..] => (&[][..], port),
                _ => return false,
            }
        }
        None => match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        },
    };
    let mut rest = host;
    while let Some((&b, tail)) = rest.split_first() {
        rest = match b {
            b'%' => match tail {
                [h, l, tail @ ..] if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => tail,
                _ => return false,
            },
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => tail,
            _ => return false,
        };
    }
    port.iter().all(u8::is_ascii_digit)
}

/// A message's `Transfer-Encoding` fields summed up: how many times `chunked` is listed, and whether any other
/// coding is.
struct Codings {
    chunked: usize,
    other: bool,
}

/// The transfer codings a message's `Transfer-Encoding` fields list, across every field line (RFC 9112 section 6.1:
/// a comma-separated list; empty elements are ignored, RFC 9110 section 5.6.1); `None` without the field.
fn codings(headers: &HeaderMap) -> Option<Codings> {
    let mut lines = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    lines.peek()?;
    let mut summary = Codings {
        chunked: 0,
        other: false,
    };
    for coding in lines
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty())
    {
        if coding.eq_ignore_ascii_case(b"chunked") {
            summary.chunked += 1;
        } else {
            summary.other = true;
        }
    }
    Some(summary)
}
