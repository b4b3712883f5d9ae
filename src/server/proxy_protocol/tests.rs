#![allow(clippy::unwrap_used, reason = "tests")]

use super::*;

/// Reads a header from `input` and returns it with what is left unread.
async fn read_from(input: &[u8]) -> (Result<ProxyHeader, ProxyHeaderError>, Vec<u8>) {
    let mut rest = input;
    let result = read(&mut rest).await;
    (result, rest.to_vec())
}

/// A v2 header written out by hand from the spec: signature, version/command, family/protocol, length, body.
fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | command);
    out.push(family);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn ipv4_body(tlvs: &[u8]) -> Vec<u8> {
    let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2];
    body.extend_from_slice(&51234u16.to_be_bytes());
    body.extend_from_slice(&8443u16.to_be_bytes());
    body.extend_from_slice(tlvs);
    body
}

const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x00\x05hello";

#[tokio::test]
async fn version_1_tcp4_tcp6_and_unknown() {
    let cases: [(&[u8], ProxyHeader); 4] = [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 8443\r\n",
            ProxyHeader::Relayed("192.0.2.1:51234".parse().unwrap()),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 8443\r\n",
            ProxyHeader::Relayed("[2001:db8::1]:51234".parse().unwrap()),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader::Local),
        // An IPv4-mapped IPv6 source is the IPv4 address, as Forwarded and X-Forwarded-For write it.
        (
            b"PROXY TCP6 ::ffff:192.0.2.9 ::1 51234 8443\r\n",
            ProxyHeader::Relayed("192.0.2.9:51234".parse().unwrap()),
        ),
    ];
    for (header, expected) in cases {
        let input = [header, CLIENT_HELLO].concat();
        let (result, rest) = read_from(&input).await;
        assert_eq!(result.unwrap(), expected);
        assert_eq!(rest, CLIENT_HELLO, "bytes past the header were consumed");
    }
}

#[tokio::test]
async fn version_2_proxy_with_tlvs_ipv6_and_local() {
    // A NOOP TLV (type 0x04, length 3) and an authority TLV (0x02): parsed, then ignored.
    let tlvs = [
        0x04, 0x00, 0x03, 1, 2, 3, 0x02, 0x00, 0x04, b'h', b'o', b's', b't',
    ];
    let with_tlvs = v2(0x1, 0x11, &ipv4_body(&tlvs));
    let mut ipv6 = Vec::new();
    ipv6.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    ipv6.extend_from_slice(
        &"2001:db8::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    ipv6.extend_from_slice(&51234u16.to_be_bytes());
    ipv6.extend_from_slice(&8443u16.to_be_bytes());
    let cases = [
        (
            with_tlvs,
            ProxyHeader::Relayed("192.0.2.1:51234".parse().unwrap()),
        ),
        (
            v2(0x1, 0x21, &ipv6),
            ProxyHeader::Relayed("[2001:db8::1]:51234".parse().unwrap()),
        ),
        // LOCAL, as a balancer's health check sends it: no addresses.
        (v2(0x0, 0x00, &[]), ProxyHeader::Local),
        // PROXY with an unspecified family: the connection's own address stands.
        (v2(0x1, 0x00, &[]), ProxyHeader::Local),
    ];
    for (header, expected) in cases {
        let input = [header.as_slice(), CLIENT_HELLO].concat();
        let (result, rest) = read_from(&input).await;
        assert_eq!(result.unwrap(), expected);
        assert_eq!(rest, CLIENT_HELLO);
    }
}

#[tokio::test]
async fn bad_headers_are_refused_with_a_reason() {
    let mut bad_tlv = ipv4_body(&[]);
    // A TLV announcing 200 bytes where 2 follow.
    bad_tlv.extend_from_slice(&[0x04, 0x00, 0xc8, 1, 2]);
    let oversized = {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&u16::try_from(MAX_V2_LENGTH + 1).unwrap().to_be_bytes());
        h
    };
    let mut too_long_v1 = b"PROXY TCP4 ".to_vec();
    too_long_v1.extend_from_slice(&[b'1'; 120]);
    let (closed, _) = read_from(b"").await;
    assert!(
        matches!(closed, Err(ProxyHeaderError::Closed)),
        "{closed:?}"
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (CLIENT_HELLO.to_vec(), "proxy_header_missing"),
        (b"PRO".to_vec(), "proxy_header_invalid"),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "proxy_header_missing"),
        (
            b"PROXY TCP4 999.0.2.1 198.51.100.2 1 2\r\n".to_vec(),
            "proxy_header_invalid",
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n".to_vec(),
            "proxy_header_invalid",
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 70000 2\r\n".to_vec(),
            "proxy_header_invalid",
        ),
        (too_long_v1, "proxy_header_invalid"),
        (v2(0x1, 0x11, &bad_tlv), "proxy_header_invalid"),
        (oversized, "proxy_header_invalid"),
        // Truncated: the header announces its address block and the connection ends.
        (
            v2(0x1, 0x11, &ipv4_body(&[]))[..20].to_vec(),
            "proxy_header_invalid",
        ),
        (b"PROXY TCP4 192.0.2.1".to_vec(), "proxy_header_invalid"),
        // Version 1 of the binary format does not exist; command 0xF is not defined.
        (v2(0xF, 0x11, &ipv4_body(&[])), "proxy_header_invalid"),
    ];
    for (input, reason) in cases {
        let (result, _) = read_from(&input).await;
        let err = result.unwrap_err();
        assert_eq!(
            err.reason(),
            reason,
            "{:?}: {err}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn proxy_headers_are_recognised_from_their_first_bytes() {
    assert!(looks_like_proxy_header(b"PROXY TCP4 1.2.3.4"));
    assert!(looks_like_proxy_header(b"PROXY"));
    assert!(looks_like_proxy_header(&V2_SIGNATURE));
    assert!(looks_like_proxy_header(&V2_SIGNATURE[..4]));
    assert!(!looks_like_proxy_header(b"POST /"));
    assert!(!looks_like_proxy_header(b"\x16\x03\x01"));
    assert!(!looks_like_proxy_header(b"\r\n"));
}
