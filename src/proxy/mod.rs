//! One request, start to finish: the order of the checks of DESIGN.md 1.4 (2 to 12 here; 1 is the handshake in
//! `server`), forwarding, and the one place where a failure becomes a consumer-facing response.
//!
//! Each step consumes the previous step's output: `Request` -> `Target` + `SspHeaders` -> `Permit` ->
//! `Transaction` -> upstream `Response` -> streamed body. Failures are small [`Refusal`] values with a bounded
//! reason label; `Refusal::respond` turns them into OperationOutcomes. No sockets, no parsing details, no
//! record fields.
//!
//! - `pipeline`: [`Proxy`] and `Proxy::handle`, the steps in order.
//! - `checks`: checks 2, 3, 4 and 10 as single steps, each failing with its [`Refusal`] (shared with `onboard`).
//! - `refusal`: [`Refusal`]: status, text, OperationOutcome, log line.
//! - [`Onboarding`]: what the pipeline asks of `onboard` (the self-test, the credential radar), wired by `app`.
//! - `body`: [`ProxyBody`], and the bounded discard of a refused request's body.
//! - [`operation_outcome`]: the OperationOutcome body of a refusal, JSON and XML. A leaf.

mod body;
pub(crate) mod checks;
pub mod operation_outcome;
mod patient_refusal;
mod pipeline;
mod refusal;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use crate::ids::PeerIdentity;

pub(crate) use body::ConsumerLeft;
pub use body::ProxyBody;
pub use pipeline::Proxy;
pub use refusal::{Refusal, X_RATE_LIMIT_LIMIT, X_RATE_LIMIT_REMAINING, X_RATE_LIMIT_RESET};

/// Which listener a connection came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Door {
    /// `server.listen`: clinical systems, TLS MA and the `Ssp-*` headers.
    Clinical,
    /// `patient_facing.listen`: patient-facing apps with NHS login access tokens.
    PatientFacing,
}

/// What the server knows about a consumer connection; read once after the handshake and shared by its requests.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    /// Counts connections since start, for correlating log lines.
    pub id: u64,
    pub peer: PeerIdentity,
    /// The peer as every audit record of this connection names it, built once.
    pub audit_peer: Arc<crate::audit::Peer>,
    /// The `Forwarded` and `X-Forwarded-For` elements its requests carry to the provider.
    pub client: crate::forward::ClientFields,
    /// How the proxy asks the server to end this connection for the consumer's conduct.
    pub control: Arc<ConnControl>,
    /// The ASID the credential radar noted this connection's certificate for (noted once per connection).
    pub noted: std::sync::OnceLock<crate::ids::Asid>,
    /// The listener it came in by.
    pub door: Door,
    /// It presented a verified client certificate (always, on the clinical listener).
    pub certified: bool,
}

/// What the pipeline asks of onboarding (implemented in `onboard`, wired by `app`, so that `onboard` can build on
/// the pipeline's checks without the pipeline depending on it).
pub(crate) trait Onboarding: std::fmt::Debug + Send + Sync {
    /// The answer to `GET /_ssp/selftest[/<target>]` when the self-test is on and this is one; `None` otherwise.
    fn selftest(
        &self,
        proxy: &Proxy,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        policy: &crate::policy::Policy,
    ) -> Option<http::Response<ProxyBody>>;

    /// A request on `conn` passed checks 2 to 11 with `permit`.
    fn permitted(&self, conn: &ConnInfo, permit: &crate::policy::Permit);

    /// A request on `conn` was refused with `refusal`.
    fn refused(&self, conn: &ConnInfo, refusal: &Refusal, policy: &crate::policy::Policy);
}

/// How a consumer connection is to be ended for its consumer's conduct; the stronger asked for wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Cut {
    /// Stop taking new requests (HTTP/2 GOAWAY), finish those in flight within the close grace.
    GoAway = 1,
    /// End it now, without TLS close_notify, so that a response cut short cannot look complete (RFC 9112
    /// section 9.8): every exchange on it ends and frees its provider connection.
    Abort = 2,
}

/// Premature resets (exchanges the consumer cancels within a second of their start) tolerated on one connection
/// before it is closed, and then only while they are at most half of its exchanges (Envoy's rule for HTTP/2 rapid
/// reset, CVE-2023-44487, has the same shape).
pub(crate) const MAX_PREMATURE_RESETS: u32 = 10;

/// The proxy's side of one consumer connection's control: the server loop waits on [`ConnControl::cut`]'s
/// signal; the exchanges report how they ended.
#[derive(Debug, Default)]
pub(crate) struct ConnControl {
    /// 0, or the strongest [`Cut`] asked for.
    cut: AtomicU8,
    wake: tokio::sync::Notify,
    /// Exchanges (forwarded requests) that ended on this connection.
    exchanges: AtomicU32,
    /// Of those, the ones the consumer cancelled within a second of their start: each closed a provider
    /// connection mid-exchange.
    premature: AtomicU32,
    /// The exchanges whose consumer is watched for taking no response bytes (see `pipeline::watch_consumer`):
    /// when the connection is cut for one of them, each that is still waiting on the consumer ends as `timeout`
    /// too (its body, handed over whole, may otherwise say `ok` though none of it was delivered).
    watched: std::sync::Mutex<Vec<std::sync::Weak<dyn crate::forward::HoldsExchange>>>,
}

impl ConnControl {
    /// Asks the server to end the connection as `how` says.
    pub(crate) fn cut(&self, how: Cut) {
        self.cut.fetch_max(how as u8, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Keeps `exchange` to be ended as `timeout` if the connection is cut while it waits on the consumer.
    pub(crate) fn watch(&self, exchange: &crate::forward::SharedExchange) {
        let mut watched = self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if watched.len() >= 16 {
            watched.retain(|e| e.strong_count() > 0);
        }
        watched.push(Arc::downgrade(exchange));
    }

    /// Cuts the connection ([`Cut::Abort`]) because a consumer took no response bytes within the bound: every
    /// watched exchange still waiting on the consumer ends as `timeout`. True for the call that cut it (to count
    /// the connection once, whichever of its exchanges' watchers comes first).
    pub(crate) fn cut_for_send_timeout(&self) -> bool {
        let watched = std::mem::take(
            &mut *self
                .watched
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for exchange in watched.iter().filter_map(std::sync::Weak::upgrade) {
            if exchange.consumer_waiting_since().is_some() {
                exchange.consumer_stalled();
            }
        }
        let before = self.cut.fetch_max(Cut::Abort as u8, Ordering::AcqRel);
        self.wake.notify_one();
        before < Cut::Abort as u8
    }

    /// The strongest cut asked for so far.
    pub(crate) fn asked(&self) -> Option<Cut> {
        match self.cut.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Cut::GoAway),
            _ => Some(Cut::Abort),
        }
    }

    /// Waits until a cut stronger than `seen` is asked for (cancel-safe: one asked while nobody waited is seen
    /// at the next call).
    pub(crate) async fn wait_beyond(&self, seen: Option<Cut>) -> Cut {
        loop {
            let notified = self.wake.notified();
            if let Some(cut) = self.asked().filter(|&cut| Some(cut) > seen) {
                return cut;
            }
            notified.await;
        }
    }

    /// Counts an exchange's end; true when it was premature and pushes the connection over the bound (the
    /// caller then closes it with [`Cut::GoAway`]).
    pub(crate) fn exchange_ended(&self, premature: bool) -> bool {
        let exchanges = self.exchanges.fetch_add(1, Ordering::Relaxed) + 1;
        if !premature {
            return false;
        }
        let resets = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        resets > MAX_PREMATURE_RESETS && resets * 2 > exchanges && self.asked().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::{ConnInfo, Proxy};

    /// The size of the future an `async fn` of this shape returns, read from its type without calling it.
    fn future_size<'a, F, Fut>(_: F) -> usize
    where
        F: Fn(&'a Proxy, http::Request<hyper::body::Incoming>, &'a ConnInfo) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// The request future's budget: 4 KiB. hyper keeps each consumer connection's in-flight request future in a
    /// box sized for it, and every future on the request path is moved at its full size when first awaited, so
    /// its size is paid per request. What breaks it (see the note at `Proxy::handle`): a value kept across an
    /// `.await` that only a step before it needs (a `match` on the checks' whole `Result` holds some 850 bytes), or
    /// a large value taken by value into an awaited call (a `Permit` moved into `Proxy::forward` is a second copy,
    /// some 650 bytes).
    #[test]
    fn the_request_future_stays_under_4_kib() {
        let size = future_size(Proxy::handle);
        assert!(size <= 4_096, "Proxy::handle's future is {size} bytes");
    }
}
