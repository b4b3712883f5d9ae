//! Parsing what a consumer sends into an [`SspRequest`]: the target URL carried in the request path
//! (`/https://host[:port]/path[?query]`, check 3 of DESIGN.md 1.4) and the four `Ssp-*` headers (check 4).
//!
//! Everything here is untrusted input, parsed strictly and without normalisation: the path and query go to the
//! provider byte for byte. No policy, no network.

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::ids::{Asid, InteractionId, TraceId};

/// Longest target URL accepted (the request line itself is bounded by hyper's header limits).
const MAX_TARGET_LEN: usize = 8 * 1024;

pub const HEADER_TRACE_ID: HeaderName = HeaderName::from_static("ssp-traceid");
pub const HEADER_FROM: HeaderName = HeaderName::from_static("ssp-from");
pub const HEADER_TO: HeaderName = HeaderName::from_static("ssp-to");
pub const HEADER_INTERACTION_ID: HeaderName = HeaderName::from_static("ssp-interactionid");

/// The provider URL a consumer asked for, checked for shape but otherwise exactly as sent.
#[derive(Clone, Debug)]
pub struct Target {
    /// The URL as the consumer wrote it (without the proxy's leading `/`); check 9 compares this text. Printable
    /// ASCII (checked first), so always a `str`.
    text: bytes::Bytes,
    /// The same URL as an absolute URI for the upstream client, sharing `text`'s bytes.
    uri: Uri,
}

/// Why a target URL was refused. The consumer only ever sees `INVALID_TARGET_URL`; the reason is for tests
/// and the operational log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetError {
    NotSspForm,
    TooLong,
    NotHttps,
    Userinfo,
    Fragment,
    EmptyHost,
    BadHost,
    BadPort,
    DotSegment,
    Backslash,
    /// `%2F`, `%5C` or `%00` in the path: a provider that decodes before normalising could be walked out of
    /// its endpoint root, and FHIR ids never contain them.
    EncodedSeparator,
    /// A byte outside visible ASCII: raw non-ASCII, a control character or a space. URLs carry those
    /// percent-encoded, and hyper lets some through raw.
    Unprintable,
    Unparseable,
}

impl Target {
    /// Parses the request's path-and-query, which must be `/` followed by an absolute https URL.
    pub fn from_request_path(path_and_query: &str) -> Result<Self, TargetError> {
        let text = path_and_query
            .strip_prefix('/')
            .ok_or(TargetError::NotSspForm)?;
        Self::parse(text)
    }

    /// Parses an absolute https URL: `https://host[:port][/path][?query]`, no userinfo, no fragment, no dot
    /// segments (also percent-encoded ones), no backslash in the path, a DNS name or IP literal as host.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        if text.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TargetError::Unprintable);
        }
        let rest = text.strip_prefix("https://").ok_or(TargetError::NotHttps)?;
        if text.contains('#') {
            return Err(TargetError::Fragment);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(authority_end);
        check_authority(authority)?;
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(path, _)| path);
        if path.contains('\\') {
            return Err(TargetError::Backslash);
        }
        if path.split('/').any(is_dot_segment) {
            return Err(TargetError::DotSegment);
        }
        if has_encoded_separator(path) {
            return Err(TargetError::EncodedSeparator);
        }
        let bytes = bytes::Bytes::copy_from_slice(text.as_bytes());
        let uri = Uri::from_maybe_shared(bytes.clone()).map_err(|_| TargetError::Unparseable)?;
        // http::Uri agrees with our split, or the text is too odd to forward.
        if uri.authority().map(|a| a.as_str()) != Some(authority) {
            return Err(TargetError::Unparseable);
        }
        Ok(Self { text: bytes, uri })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text).unwrap_or_default()
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// `host[:port]` exactly as written, the value of the forwarded `Host` header.
    pub fn authority(&self) -> &str {
        self.uri.authority().map_or("", |a| a.as_str())
    }

    /// True when this target is `endpoint_url` itself or continues it at a `/` or `?` (check 9: exact text,
    /// so an IP address for the host or an added `:443` does not match).
    pub fn is_under(&self, endpoint_url: &str) -> bool {
        match self.as_str().strip_prefix(endpoint_url) {
            Some("") => true,
            Some(rest) => rest.starts_with('/') || rest.starts_with('?'),
            None => false,
        }
    }
}

fn check_authority(authority: &str) -> Result<(), TargetError> {
    if authority.contains('@') {
        return Err(TargetError::Userinfo);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or(TargetError::BadHost)?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| TargetError::BadHost)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(TargetError::BadPort)?),
        };
        (addr, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if !authority.starts_with('[') && !is_dns_name(host) {
        return Err(TargetError::BadHost);
    }
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && matches!(port.parse::<u32>(), Ok(1..=65535));
        if !ok {
            return Err(TargetError::BadPort);
        }
    }
    Ok(())
}

/// A DNS name (or dotted IPv4 literal): labels of letters, digits and hyphens, separated by single dots.
fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `.` or `..`, also when a dot is percent-encoded (`%2e`, `%2E`).
fn is_dot_segment(segment: &str) -> bool {
    // A dot segment starts with its first dot, plain or encoded; this runs for every segment of every target.
    if !matches!(segment.as_bytes().first(), Some(b'.' | b'%')) {
        return false;
    }
    // A segment's parameters (`..;jsessionid=x`, RFC 3986 section 3.3) are cut first: servlet containers drop
    // them before they resolve dot segments, so `..;` walks up a level there.
    let segment = match segment.find(';') {
        Some(at) => &segment[..at],
        None => segment,
    };
    // `%3b` in either case, found in place.
    let encoded_semicolon = segment
        .as_bytes()
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'3' && (w[2] | 0x20) == b'b');
    let segment = match encoded_semicolon {
        Some(at) => &segment[..at],
        None => segment,
    };
    let mut dots = 0;
    let mut rest = segment.as_bytes();
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && (rest[2] | 0x20) == b'e'
        {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// True when the path holds a percent-encoded `/`, `\` or NUL (any case).
fn has_encoded_separator(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2] | 0x20),
                (b'2', b'f') | (b'5', b'c') | (b'0', b'0')
            )
    })
}

/// The `Ssp-*` headers of one request, each well formed.
#[derive(Clone, Debug)]
pub struct SspHeaders {
    pub trace_id: TraceId,
    pub from: Asid,
    pub to: Asid,
    pub interaction: InteractionId,
}

/// A missing, repeated or malformed `Ssp-*` header; carries the header's canonical name for the error text
/// `MISSING_OR_INVALID_HEADER_<Header-Name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderError(pub &'static str);

impl SspHeaders {
    /// Reads the four headers in the documented order; the first missing or invalid one is the error.
    pub fn parse(headers: &HeaderMap) -> Result<Self, HeaderError> {
        let fields = SspFields::read(headers);
        Ok(Self {
            trace_id: fields.trace_id?,
            from: fields.from?,
            to: fields.to?,
            interaction: fields.interaction?,
        })
    }
}

/// Check 4 field by field: each `Ssp-*` header read on its own, so that `ssp onboard check` can name every bad
/// one and go on with the good ones. [`SspHeaders::parse`] is this, stopping at the first error.
#[derive(Clone, Debug)]
pub struct SspFields {
    pub trace_id: Result<TraceId, HeaderError>,
    pub from: Result<Asid, HeaderError>,
    pub to: Result<Asid, HeaderError>,
    pub interaction: Result<InteractionId, HeaderError>,
}

impl SspFields {
    pub fn read(headers: &HeaderMap) -> Self {
        Self {
            trace_id: single(headers, &HEADER_TRACE_ID)
                .and_then(TraceId::from_field)
                .ok_or(HeaderError("Ssp-TraceID")),
            from: single(headers, &HEADER_FROM)
                .and_then(Asid::from_field)
                .ok_or(HeaderError("Ssp-From")),
            to: single(headers, &HEADER_TO)
                .and_then(Asid::from_field)
                .ok_or(HeaderError("Ssp-To")),
            interaction: single(headers, &HEADER_INTERACTION_ID)
                .and_then(InteractionId::from_field)
                .ok_or(HeaderError("Ssp-InteractionID")),
        }
    }

    /// Every missing or invalid field, in the documented order.
    pub fn errors(&self) -> Vec<HeaderError> {
        [
            self.trace_id.as_ref().err(),
            self.from.as_ref().err(),
            self.to.as_ref().err(),
            self.interaction.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .copied()
        .collect()
    }
}

/// The header's value when it appears exactly once (each identifier then requires visible ASCII). A repeated
/// `Ssp-*` header is ambiguous, so it counts as invalid rather than taking either value.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    Some(first)
}

/// A request that passed checks 3 and 4: where it goes and who says it is sending what.
#[derive(Clone, Debug)]
pub struct SspRequest {
    pub target: Target,
    pub headers: SspHeaders,
}

#[cfg(test)]
mod tests;
