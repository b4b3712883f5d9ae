//! The PROXY protocol header a layer-4 balancer puts in front of a consumer's TLS connection (HAProxy's "The PROXY
//! protocol", versions 1 and 2), read from sources listed in `server.proxy_protocol_from` only.
//!
//! Reading takes exactly the header's bytes off the socket, never one past it (what follows is the consumer's TLS
//! ClientHello), with fixed bounds: a v1 line of at most 107 bytes, a v2 header of at most 16 + [`MAX_V2_LENGTH`]
//! bytes. Parsing is the `ppp` crate's (a maintained parser of both versions, with TLV iteration), chosen over a
//! hand-written one: the header is untrusted input and its edge cases (v1 field syntax, v2 families and TLVs) are
//! what such a crate is tested on. The caller bounds the whole read in time. Knows nothing of TLS or HTTP.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature that starts a version 2 header (spec section 2.2).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included (spec section 2.1).
const V1_MAX: usize = 107;
/// The longest version 2 address block plus TLVs accepted: enough for IPv6 addresses and the TLVs balancers send
/// (ALPN, authority, unique id, SSL details); the spec allows up to 65,535.
pub(crate) const MAX_V2_LENGTH: usize = 4096;

/// What a valid header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyHeader {
    /// A relayed connection (v1 `TCP4`/`TCP6`, v2 `PROXY` over IPv4 or IPv6): the consumer's address (an
    /// IPv4-mapped IPv6 address as the IPv4 address it is, as `Forwarded` writes it).
    Relayed(SocketAddr),
    /// The balancer speaking for itself (v2 `LOCAL`, as in health checks; v1 `UNKNOWN`; v2 `PROXY` with an
    /// unspecified or UNIX family): the connection's own address stands (spec section 2.2).
    Local,
}

/// Why a trusted source's connection did not start with a usable header.
#[derive(Debug)]
pub(crate) enum ProxyHeaderError {
    /// The connection closed before sending a byte: a TCP health check or a port probe, not a failure.
    Closed,
    /// The first bytes are not a PROXY header (a consumer connecting past the balancer, for example).
    Missing,
    /// A header that does not parse, is longer than the bounds, or carries malformed TLVs.
    Malformed(String),
    /// The connection ended or failed inside the header.
    Io(io::Error),
}

impl std::fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyHeaderError::Closed => f.write_str("closed before a PROXY protocol header"),
            ProxyHeaderError::Missing => f.write_str("no PROXY protocol header"),
            ProxyHeaderError::Malformed(why) => write!(f, "malformed PROXY protocol header: {why}"),
            ProxyHeaderError::Io(e) => {
                write!(f, "connection ended inside the PROXY protocol header: {e}")
            }
        }
    }
}

impl std::error::Error for ProxyHeaderError {}

impl ProxyHeaderError {
    /// A bounded label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ProxyHeaderError::Closed | ProxyHeaderError::Missing => "proxy_header_missing",
            ProxyHeaderError::Malformed(_) | ProxyHeaderError::Io(_) => "proxy_header_invalid",
        }
    }
}

/// True when `first` (the first bytes a connection sent, as peeked) starts like a PROXY header of either version.
pub(crate) fn looks_like_proxy_header(first: &[u8]) -> bool {
    let n = first.len().min(V2_SIGNATURE.len());
    (n >= 5 && first.starts_with(b"PROXY")) || (n >= 4 && first[..n] == V2_SIGNATURE[..n])
}

/// Reads one header from the start of `stream`, consuming exactly its bytes.
pub(crate) async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut head = [0u8; 6];
    let first = stream.read(&mut head).await.map_err(ProxyHeaderError::Io)?;
    if first == 0 {
        return Err(ProxyHeaderError::Closed);
    }
    stream
        .read_exact(&mut head[first..])
        .await
        .map_err(ProxyHeaderError::Io)?;
    if &head == b"PROXY " {
        read_v1(stream, &head).await
    } else if head == V2_SIGNATURE[..6] {
        read_v2(stream, &head).await
    } else {
        Err(ProxyHeaderError::Missing)
    }
}

/// The rest of a v1 line, byte by byte so that nothing past its CRLF is consumed.
async fn read_v1<S: AsyncRead + Unpin>(
    stream: &mut S,
    head: &[u8; 6],
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut line = head.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed(format!(
                "version 1 line longer than {V1_MAX} bytes"
            )));
        }
        line.push(stream.read_u8().await.map_err(ProxyHeaderError::Io)?);
    }
    let header = ppp::v1::Header::try_from(line.as_slice())
        .map_err(|e| ProxyHeaderError::Malformed(format!("version 1: {e}")))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            ProxyHeader::Relayed(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => ProxyHeader::Relayed(SocketAddr::new(
            IpAddr::V6(a.source_address).to_canonical(),
            a.source_port,
        )),
        ppp::v1::Addresses::Unknown => ProxyHeader::Local,
    })
}

/// The rest of a v2 header: the fixed 16 bytes, then the length they announce.
async fn read_v2<S: AsyncRead + Unpin>(
    stream: &mut S,
    head: &[u8; 6],
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut header = vec![0u8; 16];
    header[..6].copy_from_slice(head);
    stream
        .read_exact(&mut header[6..])
        .await
        .map_err(ProxyHeaderError::Io)?;
    if header[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Malformed(
            "bad version 2 signature".into(),
        ));
    }
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if length > MAX_V2_LENGTH {
        return Err(ProxyHeaderError::Malformed(format!(
            "version 2 header announces {length} bytes, more than {MAX_V2_LENGTH}"
        )));
    }
    header.resize(16 + length, 0);
    stream
        .read_exact(&mut header[16..])
        .await
        .map_err(ProxyHeaderError::Io)?;
    let parsed = ppp::v2::Header::try_from(header.as_slice())
        .map_err(|e| ProxyHeaderError::Malformed(format!("version 2: {e}")))?;
    // TLVs carry nothing ssp uses, but a header whose TLVs do not parse is not trusted for its addresses either.
    if let Some(Err(e)) = parsed.tlvs().find(Result::is_err) {
        return Err(ProxyHeaderError::Malformed(format!("version 2 TLV: {e}")));
    }
    Ok(match (parsed.command, parsed.addresses) {
        (ppp::v2::Command::Local, _) => ProxyHeader::Local,
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
            ProxyHeader::Relayed(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => ProxyHeader::Relayed(
            SocketAddr::new(IpAddr::V6(a.source_address).to_canonical(), a.source_port),
        ),
        (ppp::v2::Command::Proxy, _) => ProxyHeader::Local,
    })
}

#[cfg(test)]
mod tests;
