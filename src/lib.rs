//! `ssp`: a Spine-Secure-Proxy-style forward HTTP proxy for GP Connect. Consumers reach providers through it with
//! TLS mutual authentication on both legs; it checks every request against the directory and the data-sharing
//! agreements and streams bodies through without buffering.
//!
//! # Layout
//!
//! - [`cli`]: argument parsing, exit codes, wiring of the commands (`main.rs` only calls it).
//! - [`config`]: the TOML config, strictly parsed, validated once into typed values.
//! - [`ids`]: identifier newtypes (`Asid`, `TraceId`, `InteractionId`, `OdsCode`) and the peer identity.
//! - [`tls`]: certificates, keys and CRLs; the consumer-facing and upstream rustls configs; peer identity reading.
//! - [`server`]: accept loop, connection limit, handshake timeout, serving h1/h2 connections, the idle rule,
//!   staged closes, graceful drain.
//! - [`proxy_header`]: the PROXY protocol header (v1 and v2) from a trusted layer-4 balancer.
//! - [`ssp`]: parsing the target URL and the `Ssp-*` headers into an `SspRequest` (checks 3 and 4).
//! - [`policy`]: policy files, the sled store of generations (`policy::store`), the directory built from SDS
//!   answers (`policy::sds`; fetched live by [`sds_api`]), the in-memory snapshot,
//!   `check() -> Decision` (checks 5 to 9), the `Permit`, and `explain` for `ssp policy check`.
//! - [`jwt`]: the consumer's audit token: strict decoding, signatures, validation per GP Connect profile (check 10).
//! - [`audit`]: the transaction log: record schema, hash chain, group commit, the fsync thread, recovery,
//!   verify and query (check 12).
//! - [`forward`]: upstream client and pool, header rules, timeouts, the streaming body wrapper.
//! - [`proxy`]: the order of the steps for one request; the one place errors become responses.
//! - [`outcome`]: OperationOutcome bodies, JSON and XML.
//! - [`app`]: assembling config, TLS and policy into a bound server (shared by `serve`, `demo`, tests).
//! - [`lifecycle`]: signals, systemd notification, SIGHUP policy reload orchestration.
//! - [`metrics`], [`admin`]: metric names and handles; the admin listener (/metrics, /healthz, /readyz).
//! - [`devcerts`]: the development PKI of `ssp dev-certs`.
//! - [`demo`]: `ssp demo`, its dev provider and a small mTLS client.
//!
//! # Life of a request
//!
//! 1. `server` accepts a TCP connection (within `max_connections`), reads a PROXY header when the connection
//!    comes from a trusted balancer (`proxy_header`: the consumer's address), and completes the TLS handshake
//!    within `handshake_timeout`: the client certificate must chain to `client_ca`, be unexpired and unrevoked
//!    (check 1).
//! 2. `tls::peer_identity` reads the certificate's subject, CN, DNS SANs, serial and fingerprint, once per
//!    connection; hyper serves HTTP/1.1 or HTTP/2 on it.
//! 3. `proxy::Proxy::handle` takes each request, removes its hop-by-hop fields (so that the checks see what will
//!    be forwarded), then: method (check 2), `ssp::Target` (3), `ssp::SspHeaders` (4).
//! 4. `policy::Policy::check` runs checks 5 to 9 and returns `Decision::Permit(Permit)` or a `Denial`.
//! 5. `jwt::Validator::check` decodes and validates the audit token (check 10) into a `JwtAudit`.
//! 6. `audit::AuditLog::write` queues the `request` record, writes the queue unless a write is in progress, and
//!    waits until its record is written (or fsynced, in strict mode) (check 12).
//! 7. `forward::Upstream::send` takes the `Permit`, rewrites the headers, and sends the request over a pooled
//!    TLS connection presenting the proxy's client certificate; the request body streams through `Streamed`.
//! 8. The provider's response streams back through `Streamed`, which counts bytes and enforces the idle
//!    timeout; when both bodies are done the shared `Exchange` fires once: the `response` record, the metrics
//!    and a log line.
//! 9. Any failure on the way is a `proxy::Refusal`, rendered by `outcome` as an OperationOutcome (in the format
//!    `Accept` asks for, negotiated only then), counted, and recorded as a `deny` request record plus a `denied`
//!    response record.

#![warn(unreachable_pub)]

pub(crate) mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devcerts;
pub(crate) mod forward;
pub mod ids;
pub mod jwt;
pub mod lifecycle;
pub(crate) mod limits;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod proxy;
pub(crate) mod proxy_header;
pub(crate) mod sds_api;
pub(crate) mod server;
pub mod ssp;
pub mod tls;
