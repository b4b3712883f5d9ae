//! The upstream leg: a pooled keep-alive HTTP/1.1 client presenting the proxy's client certificate, the header
//! rules of DESIGN.md 1.5, the connect / response / body-idle timeouts, and [`Streamed`], the body wrapper that
//! moves frames through untouched while counting bytes, enforcing the idle timeout and recording how the
//! exchange ended.
//!
//! Takes only a [`Permit`](crate::policy::Permit): there is no way to forward a request the policy did not
//! check. Does not parse consumer input or decide anything.
//!
//! - `connector`: static resolution, then DNS; TCP; TLS with the proxy's client certificate.
//! - `pool`: [`Upstream`], the client the proxy owns (hyper's `client::conn`): provider connections driven by the
//!   exchange that uses them, the idle pool and connection limit per provider, the timeouts and the retry of a
//!   request that met a stale pooled connection.
//! - `idle_conns`: a provider's idle connections, per thread that opened them, taken newest first.
//! - `headers`: hop-by-hop removal, cookie joining, the framing rules of both legs (`Host`, `Transfer-Encoding`,
//!   statuses), `Host`, `Forwarded` and `X-Forwarded-For`.
//! - `exchange`: [`Exchange`] accounting and the [`Streamed`] body wrapper.

mod connector;
mod exchange;
mod headers;
mod idle_conns;
mod pool;

pub(crate) use connector::Connector;
pub(crate) use exchange::{
    Direction, Exchange, HoldsExchange, IdleTimeout, SharedExchange, Streamed,
};
pub(crate) use headers::{
    ClientFields, RequestFramingError, normalize_request_headers, request_framing,
    rewrite_request_headers, strip_hop_by_hop,
};
use headers::{MAX_RESPONSE_FIELDS, MAX_RESPONSE_HEAD};
pub(crate) use pool::{ProviderBody, Upstream};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether `e` or one of its sources (`Error::source`, followed to the end) satisfies `pred`.
fn in_source_chain(
    e: &(dyn std::error::Error + 'static),
    pred: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(pred)
}

/// Why the upstream exchange failed before a response arrived.
#[derive(Debug)]
pub enum ForwardError {
    /// No connection: name resolution, TCP, TLS, or the connection broke before a response (502).
    Unreachable(BoxError),
    /// The provider answered with a response head ssp does not forward: over `MAX_RESPONSE_HEAD` bytes or
    /// `MAX_RESPONSE_FIELDS` fields (502).
    HeadTooLarge,
    /// The provider's response cannot be forwarded as it stands (502): see [`BadResponse`].
    BadResponse(BadResponse),
    /// No response headers within `response_timeout`, or the request body went idle past `body_idle_timeout`
    /// before they came (504).
    Timeout,
    /// The consumer's request body is malformed (an HTTP/1.1 chunked body that does not parse, RFC 9112
    /// section 7.1): the consumer's fault, answered 400; the provider is not blamed.
    MalformedRequestBody,
}

/// A provider response head that ssp refuses to forward rather than pass on something the consumer's protocol
/// cannot carry or would read wrongly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadResponse {
    /// `101 Switching Protocols` to a request that asked for no upgrade (ssp never forwards `Upgrade`, RFC 9110
    /// section 15.2.2: a server must not switch unasked); HTTP/2 cannot carry 101 at all (RFC 9113 section 8.6).
    UnsolicitedSwitch,
    /// A status outside 200 to 599 as the final answer (RFC 9110 section 15: values outside 100 to 599 are
    /// invalid; 1xx other than 101 are interim and never final).
    InvalidStatus(u16),
    /// A `Transfer-Encoding` other than a single `chunked`: a coding ssp does not decode (`gzip, chunked`), or
    /// chunked applied twice. Its bytes would reach the consumer as if they were the content (RFC 9112 section 6.1).
    TransferCoding,
}

impl std::fmt::Display for BadResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadResponse::UnsolicitedSwitch => {
                f.write_str("101 Switching Protocols to a request that asked for no upgrade")
            }
            BadResponse::InvalidStatus(status) => {
                write!(f, "status {status} is not a final status (200 to 599)")
            }
            BadResponse::TransferCoding => f.write_str(
                "a Transfer-Encoding other than chunked, once (a coding ssp does not decode)",
            ),
        }
    }
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Unreachable(e) => {
                write!(f, "provider unreachable: {e}")?;
                let mut source = e.source();
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
            ForwardError::HeadTooLarge => write!(
                f,
                "provider response refused: its head is over {} KiB or {MAX_RESPONSE_FIELDS} fields",
                MAX_RESPONSE_HEAD / 1024
            ),
            ForwardError::BadResponse(bad) => write!(f, "provider response refused: {bad}"),
            ForwardError::Timeout => {
                f.write_str("timed out before the provider's response headers")
            }
            ForwardError::MalformedRequestBody => {
                f.write_str("the consumer's request body is malformed")
            }
        }
    }
}

#[cfg(test)]
mod tests;
