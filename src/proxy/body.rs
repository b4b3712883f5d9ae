//! Bodies on the consumer side: the response body (a refusal built here, or the provider's body streamed
//! through), and the bounded read that discards a refused request's body so its connection can stay open.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::forward::{BoxError, ProviderBody, Streamed};

/// Largest refused request body read and discarded to keep its connection open.
const MAX_DRAIN_BYTES: u64 = 64 * 1024;
/// Longest a refusal waits for that body.
const MAX_DRAIN_TIME: Duration = Duration::from_secs(1);

/// The mark of a response that is not to be sent: the consumer left while its request was handled (its request
/// body broke off, see [`Exchange::consumer_left_mid_body`](crate::forward::Exchange)). The connection's service
/// closes the connection instead (an HTTP/2 stream is reset), as when a consumer hangs up while its request
/// waits; the exchange has ended `client_closed` with no status.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConsumerLeft;

impl ConsumerLeft {
    /// An empty response with the mark: 400 should anything send it (an incomplete request message, RFC 9112
    /// section 8), never a status that blames the provider.
    pub(super) fn response() -> http::Response<ProxyBody> {
        let mut response = http::Response::new(ProxyBody::empty());
        *response.status_mut() = http::StatusCode::BAD_REQUEST;
        response.extensions_mut().insert(ConsumerLeft);
        response
    }

    /// Whether `response` carries the mark.
    pub(crate) fn marks<B>(response: &http::Response<B>) -> bool {
        response.extensions().get::<ConsumerLeft>().is_some()
    }
}

/// Reads and discards a refused request's body; true when it ended within the bounds.
pub(super) async fn drain(mut body: Incoming) -> bool {
    use http_body_util::BodyExt;
    if body.is_end_stream() {
        return true;
    }
    if body.size_hint().lower() > MAX_DRAIN_BYTES {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > MAX_DRAIN_BYTES {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(MAX_DRAIN_TIME, read)
        .await
        .unwrap_or(false)
}

pin_project_lite::pin_project! {
    /// A consumer-facing response body: a refusal built here, or the provider's body streamed through.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Full { data: Option<Bytes> },
        Stream { #[pin] body: Streamed<ProviderBody> },
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyBody::Full { data } => f
                .debug_struct("Full")
                .field("len", &data.as_ref().map(Bytes::len))
                .finish(),
            ProxyBody::Stream { body } => body.fmt(f),
        }
    }
}

impl ProxyBody {
    pub(crate) fn full(data: Bytes) -> Self {
        ProxyBody::Full { data: Some(data) }
    }

    /// No body: a response to HEAD.
    pub(crate) fn empty() -> Self {
        ProxyBody::Full { data: None }
    }

    pub(crate) fn stream(body: Streamed<ProviderBody>) -> Self {
        ProxyBody::Stream { body }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Stream { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Stream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Stream { body } => body.size_hint(),
        }
    }
}
