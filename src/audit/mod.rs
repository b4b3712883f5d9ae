//! The transaction log (DESIGN.md 1.6): append-only JSON-lines segments, each record chained to the previous one
//! by SHA-256, written with group commit by one `ssp-audit` thread, verified and queried offline.
//!
//! Layout of `audit.dir` (mode 0700): `audit-00000001.jsonl`, `audit-00000002.jsonl`, ... (mode 0600). Every
//! record carries `prev`, the SHA-256 (hex) of the previous record's line; the very first record's `prev` is 64
//! zeros, and a new segment's first record chains to the previous segment's last line. Every segment but the one
//! being written ends with a `seal` record (rotation, clean shutdown, or recovery after a crash), so removing,
//! reordering, editing or truncating records or whole segments is detected by [`verify()`].
//!
//! - [`record`]: the typed [`Transaction`] and the record kinds, and how a record becomes a line.
//! - [`writer`]: the queue, the `ssp-audit` thread, group commit and fsync.
//! - `segment`: segment files, rotation and crash recovery (the thread's only).
//! - [`verify`](mod@verify) and [`query`](mod@query): the offline readers of `ssp audit verify` and `ssp audit query`.
//!
//! Does not decide anything: `proxy` hands it records and waits for the acknowledgement before forwarding.

pub mod query;
pub mod record;
mod segment;
pub mod verify;
pub mod writer;

pub use crate::config::{AuditConfig, Durability};
pub use query::{Filter, TABLE_HEADER, query, table_row};
pub use record::{
    ChainLink, Completion, Encoded, Outcome, Peer, Record, SealReason, Transaction, encode, millis,
};
pub use segment::AuditMetrics;
pub use verify::{Broken, Verified, verify};
pub use writer::{AuditLog, Unavailable};

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[cfg(test)]
mod tests;
