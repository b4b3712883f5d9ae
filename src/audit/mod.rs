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
//! - [`follow`]: a reader that follows the segments as they are written.
//! - [`patients`]: the patient index and trail.
//! - [`ship`]: the log shipped to the operator's collector, checked against it, and exported in the national
//!   SSP's shape.
//!
//! Does not decide anything: `proxy` hands it records and waits for the acknowledgement before forwarding.

pub mod follow;
pub mod patients;
pub mod query;
pub mod record;
mod segment;
pub mod ship;
pub mod verify;
pub mod writer;

pub use crate::config::{AuditConfig, Durability};
pub use query::{Filter, TABLE_HEADER, query, table_row};
pub use record::{
    ChainLink, Completion, Encoded, Lookup, Outcome, PatientAccess, Peer, Record, SealReason,
    Transaction, encode, millis,
};
pub use segment::{AuditMetrics, WRITER_WAIT};
pub use verify::{Broken, Verified, verify};
pub use writer::{AuditLog, Unavailable};

/// Gives `path` (a file a command made in the audit folder `dir`) the folder's owner and group, when they differ:
/// run as root, `ssp audit subject` or `reindex` would otherwise leave a root-owned file that the service user
/// cannot open, and `check-config` (as `ExecStartPre`) would then refuse to start the service. Not root: nothing
/// to do (the file is the user's, as the folder is).
pub(crate) fn owned_like_dir(path: &std::path::Path, dir: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let (Ok(file), Ok(folder)) = (std::fs::metadata(path), std::fs::metadata(dir)) else {
        return;
    };
    if (file.uid(), file.gid()) != (folder.uid(), folder.gid())
        && let Err(e) = std::os::unix::fs::chown(path, Some(folder.uid()), Some(folder.gid()))
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot give the file the audit folder's owner");
    }
}

/// The log's segment files in `dir`, oldest first.
pub fn segment_paths(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    Ok(segment::list_segments(dir)?
        .into_iter()
        .map(|(_, path)| path)
        .collect())
}

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[cfg(test)]
mod tests;
