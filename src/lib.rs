//! `ssp`: a Spine-Secure-Proxy-style forward HTTP proxy for GP Connect. Consumers reach providers through it with
//! TLS mutual authentication on both legs; it checks every request against the directory and the data-sharing
//! agreements, records it in a tamper-evident transaction log, and streams bodies through without buffering.
//!
//! # Crate map
//!
//! A stage with several parts is a folder whose files name the parts. Modules marked (crate) are internal.
//!
//! - [`cli`] (`policy`, `audit`): argument parsing, exit codes, calling the library (`main.rs` only calls it).
//! - [`app`] (`inspect`): the wiring, in one place: config, TLS, policy, audit log, metrics and the proxy into an
//!   [`app::Instance`] whose `run` serves the consumer listener and the admin listener (its own task).
//! - [`config`] (`raw`, `validate`): the TOML config, strictly parsed, validated once into typed values.
//! - [`ids`]: identifier newtypes (`Asid`, `TraceId`, `InteractionId`, `OdsCode`) and the peer identity. A leaf.
//! - `clock` (crate): Unix seconds and the RFC 3339 timestamps the crate writes. A leaf.
//! - [`hex`]: lower-case hexadecimal and the SHA-256 digests that chain the audit log. A leaf.
//! - [`json_writer`]: JSON text: the plain-run scanner the token reader uses, and the field-at-a-time writer of
//!   audit lines (byte for byte what serde_json writes). A leaf but for `hex`.
//! - [`tls`]: certificates, keys and CRLs; the consumer-facing and upstream rustls configs; peer identity reading.
//! - `server` (crate; `connection`, `idle_rule`, `close`, `proxy_protocol`): the worker threads (one single-threaded runtime each) and
//!   the accept loop that hands them connections, connection limit, PROXY header, handshake timeout, h1/h2
//!   serving, the idle rule, staged closes, graceful drain. Knows nothing of request contents.
//! - [`ssp`]: parsing the target URL and the `Ssp-*` headers into an `SspRequest` (checks 3 and 4).
//! - [`policy`] (`model`, `compile`, `decide`, `explain`, [`policy::store`], [`policy::sds`]): the directory and
//!   agreements, checks 5 to 9 (one function each, shared by the decision and `ssp policy check`), the `Permit`,
//!   the sled store of generations, and the directory built from SDS answers (`policy::sds`: `resource`, `build`,
//!   `diff`, `fetch` for the live search, `refresh` for `ssp policy sds` from start to end).
//! - [`jwt`] (`json`, `token`, `profile`): the consumer's audit token (check 10).
//! - `limits` (crate): check 11, rates and concurrency, on tokio's clock.
//! - [`audit`] ([`audit::record`], [`audit::writer`], `segment`, [`audit::verify`](mod@audit::verify), [`audit::query`](mod@audit::query)): the
//!   typed transaction and record kinds, the `ssp-audit` writer thread (`writer/slot`: where a request record
//!   stands; `writer/stage`: the per-worker stage of request records), segments and recovery, verify and query
//!   (check 12); [`audit::patients`] (`body`, `index`, `lookup`, `trail`): the NHS numbers each request names,
//!   kept as HMACs, the index beside the log, and `ssp audit subject`'s trail.
//! - [`evidence`] ([`evidence::pack`]): the signed information-governance evidence pack and its offline check.
//! - `forward` (crate; `connector`, `pool`, `idle_conns`, `headers`, `exchange`): the upstream client and pool, the
//!   stale-connection retry, header rules, timeouts, exchange accounting and the streaming body wrapper.
//! - [`proxy`] (`pipeline`, `refusal`, `patient_refusal`, `body`, [`proxy::operation_outcome`]): the order of the
//!   steps for one request (a patient-facing one in `pipeline/patient_facing`); the one place failures become
//!   statuses and responses, as OperationOutcome bodies (JSON and XML; R4 on the patient-facing door).
//! - [`patient_facing`] (`token`, `jwks`, `practices`, `exchange`, `apps`): the patient-facing door's
//!   access tokens, keys, practices, supplier token exchange and per-app limits.
//! - `oneshot` (crate): one bounded HTTPS request on ssp's TLS stack, for SDS, the JWKS and the token endpoints.
//!   A leaf.
//! - [`lifecycle`]: signals, systemd notification, SIGHUP reload of TLS material and policy.
//! - [`metrics`], `admin` (crate): metric names and handles (every bounded series present from the start); the
//!   admin listener (/metrics, /healthz, /readyz).
//! - [`demo`] (`provider`, `client`, [`demo::devcerts`]): the newcomer's tour, and the development PKI it and
//!   `ssp dev-certs` make (test and benchmark PKIs too).
//!
//! # Life of a request
//!
//! 1. `server` accepts a TCP connection (within `max_connections`) and hands it to the least-loaded worker thread,
//!    where it stays to the end with every exchange on it. The worker reads a PROXY header when the connection
//!    comes from a trusted balancer (the consumer's address), and completes the TLS handshake within
//!    `handshake_timeout`: the client certificate must chain to `client_ca`, be unexpired and unrevoked (check 1).
//!    The peer identity and the audit `Peer` are read once per connection; hyper serves HTTP/1.1 or HTTP/2.
//! 2. `proxy::Proxy::handle` takes each request and removes its hop-by-hop fields first, so that the checks and
//!    the record see exactly what will be forwarded; then the header limits, the method (check 2),
//!    [`ssp::Target`] (3) and [`ssp::SspHeaders`] (4).
//! 3. [`policy::Policy::decide`] runs checks 5 to 9 on the `SspRequest` and returns `Decision::Permit` (the permit
//!    owns the request) or a `Denial`.
//! 4. [`jwt::Validator::validate`] decodes and validates the audit token (check 10) into a `JwtAudit`; `limits`
//!    admits the exchange (check 11).
//! 5. The pipeline makes the [`audit::Transaction`] once (identifiers shared with the request) and hands
//!    [`audit::Record::permitted`] to `audit::AuditLog::write`, which stages it with the other records of this
//!    turn of the worker's event loop, hands them to the `ssp-audit` thread together, and waits until it is
//!    written (or fsynced, in strict mode) (check 12).
//! 6. `forward` takes the `Permit`, rewrites `Host`, `Forwarded` and `X-Forwarded-For`, and sends the request over
//!    a pooled TLS connection presenting the proxy's client certificate (ssp's own client on hyper's
//!    `client::conn`: the exchange drives the connection, on the worker's thread), retrying once on a new
//!    connection when a pooled one turns out stale; the bodies stream through `Streamed`, which counts bytes and
//!    enforces the idle timeout.
//! 7. When both bodies are done the exchange ends once: `audit::Record::completed`, the metrics, a log line.
//! 8. Any failure on the way is a [`proxy::Refusal`]: `proxy::Refusal::status` gives its status (the one
//!    place), `operation_outcome` renders the OperationOutcome in the format `Accept` asks for, and the refused request
//!    leaves `audit::Record::refused` and a `denied` completion.

#![warn(unreachable_pub)]

pub(crate) mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub(crate) mod clock;
pub mod config;
pub mod demo;
pub mod evidence;
pub(crate) mod forward;
pub mod hex;
pub mod ids;
pub mod json_writer;
pub mod jwt;
pub mod lifecycle;
pub(crate) mod limits;
pub mod metrics;
pub mod onboard;
pub(crate) mod oneshot;
pub mod patient_facing;
pub mod policy;
pub mod proxy;
pub(crate) mod server;
pub mod signing;
pub mod ssp;
pub mod tls;
