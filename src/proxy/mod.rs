//! One request, start to finish: the order of the checks of DESIGN.md 1.4 (2 to 12 here; 1 is the handshake in
//! `server`), forwarding, and the one place where a failure becomes a consumer-facing response.
//!
//! Each step consumes the previous step's output: `Request` -> `Target` + `SspHeaders` -> `Permit` ->
//! `Transaction` -> upstream `Response` -> streamed body. Failures are small [`Refusal`] values with a bounded
//! reason label; `Refusal::respond` turns them into OperationOutcomes. No sockets, no parsing details, no
//! record fields.
//!
//! - `pipeline`: [`Proxy`] and `Proxy::handle`, the steps in order.
//! - `refusal`: [`Refusal`]: status, text, OperationOutcome, log line.
//! - `body`: [`ProxyBody`], and the bounded discard of a refused request's body.

mod body;
mod pipeline;
mod refusal;

use std::sync::Arc;

use crate::ids::PeerIdentity;

pub use body::ProxyBody;
pub use pipeline::Proxy;
pub use refusal::{Refusal, X_RATE_LIMIT_LIMIT, X_RATE_LIMIT_REMAINING, X_RATE_LIMIT_RESET};

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

    /// hyper keeps each consumer connection's in-flight request future in a box sized for it, and every future on
    /// the request path is moved at its full size when first awaited. `Proxy::handle` once kept the checks' whole
    /// `Result` across its awaits (some 850 bytes, the scrutinee of a `match`), and `Proxy::forward` took the
    /// permit by value, so that its future held two copies (some 650 bytes): 5,280 bytes in all, 3,792 without.
    /// This fails if either comes back.
    #[test]
    fn the_request_future_stays_under_4_kib() {
        let size = future_size(Proxy::handle);
        assert!(size <= 4_096, "Proxy::handle's future is {size} bytes");
    }
}
