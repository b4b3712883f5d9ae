use super::*;

use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;

use tokio::time::Instant;

use crate::audit::Outcome;

#[test]
fn request_headers_follow_the_forwarding_rules() {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("ssp.example:8443"));
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, X-Secret-Hop"),
    );
    h.insert("x-secret-hop", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer abc."),
    );
    h.insert(
        "ssp-traceid",
        HeaderValue::from_static("629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
    );
    h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
    h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
    normalize_request_headers(&mut h, Version::HTTP_11);
    rewrite_request_headers(
        &mut h,
        "provider.example:9443",
        &ClientFields::of("127.0.0.9:5555".parse().unwrap()),
    );
    assert_eq!(h[header::HOST], "provider.example:9443");
    for gone in [
        "connection",
        "x-secret-hop",
        "keep-alive",
        "te",
        "transfer-encoding",
    ] {
        assert!(!h.contains_key(gone), "{gone} forwarded");
    }
    assert_eq!(h[header::AUTHORIZATION], "Bearer abc.");
    assert_eq!(h["ssp-traceid"], "629ea9ba-a077-4d99-b289-7a9b19fd4e03");
    assert_eq!(h[header::FORWARDED], "for=127.0.0.9;proto=https");
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.9");
}

#[test]
fn normalising_removes_what_connection_names_before_the_checks() {
    let mut h = HeaderMap::new();
    h.append(
        header::CONNECTION,
        HeaderValue::from_static("Ssp-TraceID, ssp-from"),
    );
    h.append(
        header::CONNECTION,
        HeaderValue::from_static(" keep-alive ,AUTHORIZATION"),
    );
    h.insert("ssp-traceid", HeaderValue::from_static("x"));
    h.insert("ssp-from", HeaderValue::from_static("1"));
    h.insert("ssp-to", HeaderValue::from_static("2"));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
    normalize_request_headers(&mut h, Version::HTTP_11);
    let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(left, ["ssp-to"]);
}

#[test]
fn each_hop_by_hop_field_alone_is_removed_and_others_are_kept() {
    for hop in [
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "connection",
    ] {
        let mut h = HeaderMap::new();
        h.insert("ssp-from", HeaderValue::from_static("1"));
        h.insert(hop, HeaderValue::from_static("x"));
        h.append(header::ACCEPT, HeaderValue::from_static("a"));
        h.append(header::ACCEPT, HeaderValue::from_static("b"));
        strip_hop_by_hop(&mut h);
        let left: Vec<(&str, &[u8])> = h.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
        assert_eq!(
            left,
            [("ssp-from", &b"1"[..]), ("accept", b"a"), ("accept", b"b")],
            "{hop}"
        );
    }
}

#[test]
fn a_connection_value_with_obs_text_still_names_its_other_fields() {
    let mut h = HeaderMap::new();
    h.append(
        header::CONNECTION,
        HeaderValue::from_bytes(b"Ssp-TraceID, X-\xe9").unwrap(),
    );
    h.append(
        header::CONNECTION,
        HeaderValue::from_bytes(b"\xff ,\tAuthorization ").unwrap(),
    );
    h.insert("ssp-traceid", HeaderValue::from_static("x"));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
    h.insert("ssp-to", HeaderValue::from_static("2"));
    normalize_request_headers(&mut h, Version::HTTP_11);
    let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(left, ["ssp-to"]);
}

#[test]
fn http2_cookies_are_joined_in_order() {
    let mut h = HeaderMap::new();
    for c in ["a=1", "b=2", "c=3"] {
        h.append(header::COOKIE, HeaderValue::from_static(c));
    }
    let mut h1 = h.clone();
    normalize_request_headers(&mut h, Version::HTTP_2);
    assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
    assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
    normalize_request_headers(&mut h1, Version::HTTP_11);
    assert_eq!(h1.get_all(header::COOKIE).iter().count(), 3);
}

#[test]
fn ipv6_clients_are_quoted_in_forwarded() {
    let mut h = HeaderMap::new();
    rewrite_request_headers(
        &mut h,
        "p:1",
        &ClientFields::of("[::1]:5555".parse().unwrap()),
    );
    assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=https");
    assert_eq!(h["x-forwarded-for"], "::1");
}

/// What ends an exchange in these tests: sends its summary when dropped, as `proxy::pipeline::ending::Ending` writes its
/// records.
struct Ends {
    exchange: Exchange,
    ended: std::sync::mpsc::Sender<crate::audit::Completion>,
}

impl HoldsExchange for Ends {
    fn exchange(&self) -> &Exchange {
        &self.exchange
    }
}

impl Drop for Ends {
    fn drop(&mut self) {
        let _ = self.ended.send(self.exchange.summary());
    }
}

/// The exchange ends once, when the last of its holders lets go, with the first outcome set.
#[tokio::test]
async fn an_exchange_ends_once_with_the_first_outcome_when_its_last_holder_lets_go() {
    let (ended, rx) = std::sync::mpsc::channel();
    let exchange: SharedExchange = Arc::new(Ends {
        exchange: Exchange::new(Instant::now()),
        ended,
    });
    exchange.responded(200);
    exchange.finish(Outcome::Timeout);
    exchange.finish(Outcome::Ok);
    let body = Streamed::new(
        http_body_util::Empty::<Bytes>::new(),
        Duration::from_secs(10),
        Arc::clone(&exchange),
        Direction::Request,
    );
    drop(exchange);
    assert!(rx.try_recv().is_err(), "ended while a body still held it");
    drop(body);
    let s = rx.try_recv().unwrap();
    assert_eq!((s.status, s.outcome), (200, Outcome::Timeout));
    assert!(rx.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_silent_body_times_out_and_a_busy_one_does_not() {
    use http_body_util::{BodyExt, StreamBody};
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let stream = tokio_stream_from(rx);
    let exchange: SharedExchange = Arc::new(Exchange::new(Instant::now()));
    let mut body = Streamed::new(
        StreamBody::new(stream),
        Duration::from_secs(10),
        exchange.clone(),
        Direction::Response,
    );
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(6)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
    }
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(err.is::<IdleTimeout>());
    assert_eq!(exchange.summary().bytes_out, 15);
    assert_eq!(exchange.summary().outcome, Outcome::Timeout);
}

/// A minimal `Stream` over an mpsc receiver (tokio-stream is not a dependency).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core_stream::Stream<Item = T> {
    futures_core_stream::poll_fn(move |cx| rx.poll_recv(cx))
}

mod futures_core_stream {
    pub(super) use futures_core::Stream;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub(super) struct PollFn<F>(F);
    impl<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin> Stream for PollFn<F> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            (self.0)(cx)
        }
    }
    pub(super) fn poll_fn<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin>(
        f: F,
    ) -> PollFn<F> {
        PollFn(f)
    }
}

/// Every request crosses hyper's dispatch channel to its provider connection as a `Request<RequestBody>`, and each
/// provider connection keeps two 32-slot blocks of that channel. A body held inline made every slot 88 bytes
/// larger: some 5.6 KiB a provider connection, 1.4 MiB at 256 connections.
#[test]
fn the_upstream_request_body_is_one_pointer_wide() {
    assert_eq!(
        std::mem::size_of::<super::pool::RequestBody>(),
        std::mem::size_of::<usize>()
    );
}

#[test]
fn request_framing_takes_one_valid_host_and_chunked_once() {
    use super::headers::{RequestFramingError as E, request_framing};
    let framing = |fields: &[(&str, &str)], version: http::Version| {
        let mut headers = http::HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        request_framing(&headers, version)
    };
    let h11 = http::Version::HTTP_11;
    for host in [
        "ssp",
        "ssp:8443",
        "127.0.0.1",
        "[::1]:8443",
        "a%2Db",
        "",
        "x:",
    ] {
        assert_eq!(framing(&[("host", host)], h11), Ok(()), "{host:?}");
    }
    for host in ["a b", "u@a", "a/b", "[::1", "[zz]", "a%2", "a%zz", "a:8x"] {
        assert_eq!(framing(&[("host", host)], h11), Err(E::Host), "{host:?}");
    }
    assert_eq!(framing(&[], h11), Err(E::Host));
    assert_eq!(framing(&[], http::Version::HTTP_10), Ok(()));
    assert_eq!(framing(&[], http::Version::HTTP_2), Ok(()));
    assert_eq!(
        framing(&[("host", "a"), ("host", "a")], http::Version::HTTP_10),
        Err(E::Host)
    );
    let with = |te: &[&str]| {
        let mut fields = vec![("host", "ssp")];
        fields.extend(te.iter().map(|t| ("transfer-encoding", *t)));
        framing(&fields, h11)
    };
    assert_eq!(with(&["chunked"]), Ok(()));
    assert_eq!(with(&["gzip, chunked"]), Err(E::CodingNotImplemented));
    assert_eq!(with(&["gzip", "chunked"]), Err(E::CodingNotImplemented));
    assert_eq!(with(&["chunked, chunked"]), Err(E::ChunkedTwice));
    assert_eq!(with(&["chunked", " , chunked"]), Err(E::ChunkedTwice));
}
