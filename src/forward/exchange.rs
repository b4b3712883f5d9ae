//! Exchange accounting and the streaming body wrapper.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::BoxError;
use crate::audit::patients::body::BodyScan;
use crate::audit::{Completion, Outcome};

/// An exchange's outcome in its atomic cell: 0 while none is set (the consumer went away, if it stays so).
fn outcome_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Ok => 1,
        Outcome::ClientClosed => 2,
        Outcome::UpstreamError => 3,
        Outcome::Timeout => 4,
        Outcome::Denied => 5,
        Outcome::ClientError => 6,
    }
}

fn outcome_of(code: u8) -> Outcome {
    match code {
        1 => Outcome::Ok,
        3 => Outcome::UpstreamError,
        4 => Outcome::Timeout,
        5 => Outcome::Denied,
        6 => Outcome::ClientError,
        _ => Outcome::ClientClosed,
    }
}

/// The running totals of one forwarded exchange, written by the request and response body wrappers and read when
/// it ends. It is held by the value that ends the exchange ([`HoldsExchange`]); the body wrappers hold that value,
/// so that when the last of them lets go (both bodies ended or were dropped) its own `Drop` ends the exchange. This
/// module runs no one else's code.
pub struct Exchange {
    started: Instant,
    /// Consumer to provider body bytes.
    bytes_in: AtomicU64,
    /// Provider to consumer body bytes.
    bytes_out: AtomicU64,
    status: AtomicU16,
    /// The first definite outcome wins; none at the end means the consumer went away.
    outcome: AtomicU8,
    /// Microseconds from the start to the provider's response head.
    upstream_us: AtomicU64,
    /// The request was sent a second time after a stale pooled connection.
    retried: std::sync::atomic::AtomicBool,
    /// The whole request body has been handed to the provider connection.
    request_sent: std::sync::atomic::AtomicBool,
    /// The consumer's request body failed to parse (not merely ended early): see
    /// [`Exchange::request_body_malformed`].
    request_malformed: std::sync::atomic::AtomicBool,
    /// Since when the response body has had a frame taken and has not been asked for the next one: microseconds
    /// from `started`, plus one; 0 while it is not waiting for the consumer (see [`Exchange::consumer_waiting_since`]).
    awaiting_consumer: AtomicU64,
    /// The exchange was cut because its consumer accepted no bytes for `body_idle_timeout`.
    stalled: std::sync::atomic::AtomicBool,
    /// The task that watches for a consumer that stops reading, stopped when the exchange ends.
    watch: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    /// A watch is set: only then does the response body stamp its waits on the consumer (a clock read per frame).
    watched: std::sync::atomic::AtomicBool,
    /// Where the request body's first bytes are copied as they stream (`audit.patients.read_bodies`).
    request_copy: std::sync::OnceLock<Arc<BodyScan>>,
}

/// What the body wrappers and the provider leg hold of an exchange: the value that owns its [`Exchange`] and ends
/// the request when it is dropped (`proxy::pipeline::ending::Ending`; a bare `Exchange` in this module's tests).
pub trait HoldsExchange: Send + Sync + 'static {
    fn exchange(&self) -> &Exchange;
}

/// A bare exchange ends as nothing: this module's tests hold one so.
#[cfg(test)]
impl HoldsExchange for Exchange {
    fn exchange(&self) -> &Exchange {
        self
    }
}

/// The exchange's counters, through whatever holds them.
impl std::ops::Deref for dyn HoldsExchange {
    type Target = Exchange;

    fn deref(&self) -> &Exchange {
        self.exchange()
    }
}

/// An exchange as the bodies and the provider leg share it.
pub(crate) type SharedExchange = Arc<dyn HoldsExchange>;

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("summary", &self.summary())
            .finish_non_exhaustive()
    }
}

impl Exchange {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            status: AtomicU16::new(0),
            outcome: AtomicU8::new(0),
            upstream_us: AtomicU64::new(0),
            retried: std::sync::atomic::AtomicBool::new(false),
            request_sent: std::sync::atomic::AtomicBool::new(false),
            request_malformed: std::sync::atomic::AtomicBool::new(false),
            awaiting_consumer: AtomicU64::new(0),
            stalled: std::sync::atomic::AtomicBool::new(false),
            watch: std::sync::Mutex::new(None),
            watched: std::sync::atomic::AtomicBool::new(false),
            request_copy: std::sync::OnceLock::new(),
        }
    }

    /// When the request started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Copies the start of the request body into `scan` as its frames go to the provider (unchanged, undelayed),
    /// until the scan has what it reads. Set before the request is sent.
    pub(crate) fn copy_request_body(&self, scan: Arc<BodyScan>) {
        let _ = self.request_copy.set(scan);
    }

    /// Records the response status and the time to response headers.
    pub fn responded(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
        self.upstream_us
            .store(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Whether the whole request body has gone to the provider connection: until it has, that connection cannot
    /// carry another request.
    pub(crate) fn request_sent(&self) -> bool {
        self.request_sent.load(Ordering::Acquire)
    }

    /// Records that the whole request body has gone to the provider connection (at once for a request without
    /// one).
    pub(crate) fn mark_request_sent(&self) {
        self.request_sent.store(true, Ordering::Release);
    }

    /// Records that the request went out a second time (see [`Upstream::send`](super::pool::Upstream::send)).
    pub fn retried(&self) {
        self.retried.store(true, Ordering::Relaxed);
    }

    /// Whether the consumer's request body failed as malformed: its HTTP/1.1 chunked framing did not parse
    /// (hyper reports `InvalidInput` or `InvalidData`), as opposed to the consumer going away mid-body.
    pub(crate) fn request_body_malformed(&self) -> bool {
        self.request_malformed.load(Ordering::Acquire)
    }

    /// When the consumer's side last took a response frame and has not asked for the next one since: `None`
    /// while the response body is being asked (it may be waiting for the provider) or has not started.
    pub(crate) fn consumer_waiting_since(&self) -> Option<Instant> {
        match self.awaiting_consumer.load(Ordering::Acquire) {
            0 => None,
            us => Some(self.started + Duration::from_micros(us - 1)),
        }
    }

    /// Ends the exchange as a `timeout` (whatever outcome was set) because the consumer took no response frame
    /// for the idle bound: the consumer's connection is cut by the caller, which drops both bodies.
    pub(crate) fn consumer_stalled(&self) {
        self.stalled.store(true, Ordering::Release);
        // Over `ok` too: a body whose last frame the consumer never took did not reach it.
        self.outcome
            .store(outcome_code(Outcome::Timeout), Ordering::Release);
    }

    /// Keeps the task watching this exchange's consumer, to stop it when the exchange ends.
    pub(crate) fn set_watch(&self, watch: tokio::task::AbortHandle) {
        *self
            .watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(watch);
        self.watched.store(true, Ordering::Release);
    }

    /// Records that the consumer's side has been handed a response frame (or the head) and not asked for the next
    /// one yet, when a watch needs to know.
    fn wait_on_consumer(&self) {
        if self.watched.load(Ordering::Acquire) {
            let since = self.started.elapsed().as_micros() as u64 + 1;
            self.awaiting_consumer.store(since, Ordering::Release);
        }
    }

    /// Sets the outcome unless one is already set.
    pub fn finish(&self, outcome: Outcome) {
        let _ = self.outcome.compare_exchange(
            0,
            outcome_code(outcome),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Whether the consumer's request body broke off (an HTTP/1.1 connection closed or reset before the body's
    /// end, an HTTP/2 stream reset): the exchange ended `client_closed` from the request's side.
    pub(crate) fn consumer_left_mid_body(&self) -> bool {
        self.outcome.load(Ordering::Acquire) == outcome_code(Outcome::ClientClosed)
    }

    pub fn summary(&self) -> Completion {
        Completion {
            status: self.status.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            upstream: Duration::from_micros(self.upstream_us.load(Ordering::Relaxed)),
            total: self.started.elapsed(),
            outcome: outcome_of(self.outcome.load(Ordering::Acquire)),
            retried: self.retried.load(Ordering::Relaxed),
            consumer_stalled: self.stalled.load(Ordering::Acquire),
        }
    }
}

impl Drop for Exchange {
    /// The watch on the consumer ends with the exchange.
    fn drop(&mut self) {
        if let Some(watch) = self
            .watch
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            watch.abort();
        }
    }
}

/// Whether a request body error is the body's framing failing to parse: hyper's HTTP/1.1 decoder reports a bad
/// chunk size, a missing CRLF, a bare LF or chunk extensions over its bound as `InvalidInput` or `InvalidData`,
/// and a body cut short as `UnexpectedEof`.
fn is_malformed(e: &(dyn std::error::Error + 'static)) -> bool {
    super::in_source_chain(e, |e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        })
    })
}

/// Which way a body flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Consumer to provider.
    Request,
    /// Provider to consumer.
    Response,
}

/// A body that went quiet for longer than `upstream.body_idle_timeout`.
#[derive(Debug)]
pub(crate) struct IdleTimeout;

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body idle timeout")
    }
}

impl std::error::Error for IdleTimeout {}

pin_project_lite::pin_project! {
    /// Passes frames through untouched, counting data bytes into the [`Exchange`] and failing the stream when no
    /// frame arrives for the idle timeout. Never buffers.
    pub struct Streamed<B> {
        #[pin]
        inner: B,
        // Armed at most once per idle period: frames only move `last_frame`, and the timer re-arms itself from
        // it when it fires, so a busy stream costs no timer updates. Made the first time the body has to wait
        // (a small body that arrives whole never does); boxed so that the body stays `Unpin`.
        idle: Option<Pin<Box<Sleep>>>,
        idle_timeout: Duration,
        last_frame: Instant,
        exchange: SharedExchange,
        direction: Direction,
        done: bool,
        // The request body's copy for the patient index, while it wants more.
        copy: Option<Arc<BodyScan>>,
    }
}

impl<B> std::fmt::Debug for Streamed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("direction", &self.direction)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Streamed<B> {
    pub fn new(
        inner: B,
        idle_timeout: Duration,
        exchange: SharedExchange,
        direction: Direction,
    ) -> Self {
        let now = Instant::now();
        // An empty body (204, `Content-Length: 0`) is never polled: it is complete as it stands.
        if direction == Direction::Response && inner.is_end_stream() {
            exchange.finish(Outcome::Ok);
        } else if direction == Direction::Response {
            // Until the consumer's side first asks for a frame, the wait is the consumer's: an HTTP/2 stream
            // opened with a zero window is never asked at all.
            exchange.wait_on_consumer();
        }
        if direction == Direction::Request && inner.is_end_stream() {
            exchange.mark_request_sent();
        }
        let copy = match direction {
            Direction::Request => exchange.request_copy.get().cloned(),
            Direction::Response => None,
        };
        Self {
            copy,
            inner,
            idle: None,
            idle_timeout,
            last_frame: now,
            exchange,
            direction,
            done: false,
        }
    }
}

impl<B> Body for Streamed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if *this.direction == Direction::Response {
            // Asked for the next frame: whatever wait follows is the provider's, not the consumer's.
            this.exchange.awaiting_consumer.store(0, Ordering::Release);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let counter = match this.direction {
                        Direction::Request => &this.exchange.bytes_in,
                        Direction::Response => &this.exchange.bytes_out,
                    };
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(copy) = this.copy
                        && !copy.push(data)
                    {
                        *this.copy = None;
                    }
                }
                *this.last_frame = Instant::now();
                // hyper stops polling once a sized body reports its end, so the final `None` may never come:
                // the last frame is where a complete response is known to be complete.
                if this.inner.is_end_stream() {
                    match this.direction {
                        Direction::Response => this.exchange.finish(Outcome::Ok),
                        Direction::Request => this.exchange.mark_request_sent(),
                    }
                }
                if *this.direction == Direction::Response {
                    // Until the consumer's side asks for the next frame, or lets go of the body once it has taken
                    // the last one (HTTP/2 holds a frame until the consumer's window admits it), the wait is the
                    // consumer's.
                    this.exchange.wait_on_consumer();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.done = true;
                let e: BoxError = e.into();
                let outcome = match this.direction {
                    Direction::Request if is_malformed(&*e) => {
                        this.exchange
                            .request_malformed
                            .store(true, Ordering::Release);
                        Outcome::ClientError
                    }
                    Direction::Request => Outcome::ClientClosed,
                    Direction::Response => Outcome::UpstreamError,
                };
                this.exchange.finish(outcome);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                *this.done = true;
                match this.direction {
                    Direction::Response => this.exchange.finish(Outcome::Ok),
                    Direction::Request => this.exchange.mark_request_sent(),
                }
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                let deadline = *this.last_frame + *this.idle_timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(idle.as_mut().poll(cx));
                if deadline > Instant::now() {
                    idle.as_mut().reset(deadline);
                    continue;
                }
                *this.done = true;
                this.exchange.finish(Outcome::Timeout);
                return Poll::Ready(Some(Err(Box::new(IdleTimeout))));
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
