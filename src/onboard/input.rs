//! The inputs of `ssp onboard check`: the consumer's certificate chain (PEM, or PKCS#12 with a password; no private
//! key is read or needed) and the request as the consumer would send it (a header block, with or without its
//! request line).

use std::path::Path;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Largest input file read (a certificate chain or a header block).
const MAX_INPUT: u64 = 1 << 20;
/// Most header fields read from a header block (the proxy refuses over `limits.max_header_count` anyway).
const MAX_FIELDS: usize = 256;

fn read(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_INPUT {
        return Err(format!("{}: larger than {MAX_INPUT} bytes", path.display()));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The certificates of a PEM file (leaf first, as sent in the handshake), or of a PKCS#12 file when `password` is
/// given (a PKCS#12 file has no order: the leaf, the one certificate no other in it was issued by, goes first).
///
/// # Errors
///
/// The file cannot be read, holds no certificate, or (PKCS#12) does not open with the password.
pub(crate) fn chain(
    path: &Path,
    password: Option<&str>,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = match password {
        None => CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not a PEM certificate chain: {e}", path.display()))?,
        Some(password) => {
            let archive =
                p12_keystore::Pkcs12Archive::from_pkcs12(&bytes, password).map_err(|e| {
                    format!(
                        "{}: cannot open as PKCS#12 with that password: {e}",
                        path.display()
                    )
                })?;
            let mut certs: Vec<CertificateDer<'static>> = archive
                .certs
                .iter()
                .map(|bag| CertificateDer::from(bag.cert.as_der().to_vec()))
                .collect();
            leaf_first(&mut certs);
            certs
        }
    };
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// Puts the certificate that issued none of the others first.
fn leaf_first(certs: &mut [CertificateDer<'static>]) {
    let names: Vec<Option<(String, String)>> = certs
        .iter()
        .map(|c| {
            x509_parser::parse_x509_certificate(c)
                .ok()
                .map(|(_, x)| (x.subject().to_string(), x.issuer().to_string()))
        })
        .collect();
    let issues_another = |i: usize| {
        names[i].as_ref().is_some_and(|(subject, _)| {
            names.iter().enumerate().any(|(j, n)| {
                j != i
                    && n.as_ref()
                        .is_some_and(|(s, issuer)| issuer == subject && s != subject)
            })
        })
    };
    if let Some(leaf) = (0..certs.len()).find(|&i| !issues_another(i)) {
        certs.swap(0, leaf);
    }
}

/// A request's method, target and header fields, read from a header block as the consumer sends it: an optional
/// request line (`GET /https://... HTTP/1.1`), then `Name: value` lines (CRLF or LF), ending at an empty line or
/// the end of the file. Repeated fields are kept, as sent.
#[derive(Debug, Default)]
pub(crate) struct HeaderBlock {
    pub method: Option<Method>,
    /// The request line's target, without the proxy's leading `/`.
    pub target: Option<String>,
    pub headers: HeaderMap,
}

/// Reads a header block file.
///
/// # Errors
///
/// The file cannot be read, or is not an HTTP/1.1 header block (RFC 9112 section 2).
pub(crate) fn header_block(path: &Path) -> Result<HeaderBlock, String> {
    let mut bytes = read(path)?;
    let err = |e: String| format!("{}: not an HTTP header block: {e}", path.display());
    if !bytes.ends_with(b"\n\n") && !bytes.ends_with(b"\r\n\r\n") {
        bytes.extend_from_slice(if bytes.ends_with(b"\n") {
            b"\n"
        } else {
            b"\n\n"
        });
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut block = HeaderBlock::default();
    let parsed: &[httparse::Header<'_>] = if first_line_is_request(&bytes) {
        let mut request = httparse::Request::new(&mut fields);
        match request.parse(&bytes).map_err(|e| err(e.to_string()))? {
            httparse::Status::Complete(_) => {}
            httparse::Status::Partial => return Err(err("incomplete".into())),
        }
        block.method = request
            .method
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        block.target = request
            .path
            .map(|p| p.strip_prefix('/').unwrap_or(p).to_owned());
        let n = request.headers.len();
        &fields[..n]
    } else {
        match httparse::parse_headers(&bytes, &mut fields).map_err(|e| err(e.to_string()))? {
            httparse::Status::Complete((_, parsed)) => {
                let n = parsed.len();
                &fields[..n]
            }
            httparse::Status::Partial => return Err(err("incomplete".into())),
        }
    };
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|e| err(e.to_string()))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|e| err(e.to_string()))?;
        block.headers.append(name, value);
    }
    Ok(block)
}

/// Whether the first line looks like `METHOD target HTTP/x.y`.
fn first_line_is_request(bytes: &[u8]) -> bool {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ');
    let (Some(_), Some(_), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    version.starts_with(b"HTTP/")
}
