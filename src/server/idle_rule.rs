//! The idle rule's bookkeeping: how many requests are in flight on a connection, and since when it has had none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// How long a connection may stay with no request in flight (the idle rule in the module docs).
#[derive(Debug, Clone, Copy)]
pub(super) struct IdleTimeouts {
    pub(super) http1: Duration,
    pub(super) http2: Duration,
}

/// Requests in flight on one connection, and since when it has had none. Updated by the requests themselves; read
/// by the connection's idle timer only when it fires, so a busy connection costs no timer updates.
#[derive(Debug)]
pub(super) struct Activity {
    opened: Instant,
    in_flight: AtomicU64,
    /// Milliseconds from `opened` to the end of the last request.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// When the connection's idle time runs out, or `None` while a request is in flight.
    pub(super) fn idle_until(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + timeout)
    }
}

/// One request in flight; when dropped (its response body sent or abandoned) the connection may go idle.
#[derive(Debug)]
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until hyper lets go of it.
    pub(super) struct Tracked<B> {
        #[pin]
        pub(super) body: B,
        pub(super) _busy: Busy,
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
