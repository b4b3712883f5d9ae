//! The transaction log (DESIGN.md 1.6): append-only JSON-lines segments, each record chained to the previous one
//! by SHA-256, written with group commit by the requests themselves (an `ssp-audit` thread does the fsyncs),
//! verified and queried offline.
//!
//! Layout of `audit.dir` (mode 0700): `audit-00000001.jsonl`, `audit-00000002.jsonl`, ... (mode 0600). Every
//! record carries `prev`, the SHA-256 (hex) of the previous record's line; the very first record's `prev` is 64
//! zeros, and a new segment's first record chains to the previous segment's last line. Every segment but the one
//! being written ends with a `seal` record (rotation, clean shutdown, or recovery after a crash), so removing,
//! reordering, editing or truncating records or whole segments is detected by [`verify`].
//!
//! Owns the record schema, the writer, recovery, verify and query. Does not decide anything: `proxy` hands it
//! records and waits for the acknowledgement before forwarding.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::jwt::JwtAudit;

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records written in one batch at most.
const MAX_BATCH: usize = 1024;
/// Records waiting for the writer at most; past this, senders wait up to [`SUBMIT_WAIT`].
const QUEUE_CAPACITY: usize = 8192;
/// Records queued at most in all, counting those that do not wait (response records, refusals): a bound on memory
/// while the disk stalls. Past it a record is dropped and the operational log says so.
const QUEUE_LIMIT: usize = 8 * QUEUE_CAPACITY;
/// How long a request waits for room in the queue before it is refused with 503 `AUDIT_UNAVAILABLE`.
const SUBMIT_WAIT: Duration = Duration::from_millis(100);
/// How long a request waits for its record to be written (and, in strict mode, fsynced).
const ACK_WAIT: Duration = Duration::from_secs(5);

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written (to the page cache) before the request is forwarded; fsynced every `fsync_interval`.
    Batched,
    /// Fsynced before the request is forwarded (group commit: one fsync per batch).
    Strict,
}

/// The `[audit]` section, validated.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    pub fsync_interval: Duration,
    pub segment_size: u64,
    /// Names this proxy instance in every record (default: the host name).
    pub instance: String,
}

/// What kind of record a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Request,
    Response,
    Seal,
}

/// The consumer end of a connection, as the audit trail names it.
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub addr: String,
    pub subject: String,
    pub serial: String,
    pub fingerprint_sha256: String,
    /// The layer-4 balancer that relayed the connection with a PROXY protocol header, when `addr` came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// One audit record. `seq`, `instance` and `prev` are filled by the writer; fields that do not apply to a kind are
/// left out of its line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub seq: u64,
    pub instance: Arc<str>,
    /// RFC 3339, microseconds, UTC.
    pub ts: String,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<Arc<Peer>>,
    /// The client certificate's name (CN or DNS SAN) that check 5 matched (permitted request records): the
    /// consumer's identity even when its certificate has no CN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `permit` or `deny` (request records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    /// The refusal text for a denied request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Box<JwtAudit>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Milliseconds to the provider's response head, to the microsecond.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Milliseconds to the end of the exchange, to the microsecond.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// `true` when the request was sent a second time after a stale pooled provider connection (response records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retried: Option<bool>,
    /// `ok`, `denied`, `client_closed`, `upstream_error`, `timeout` (response records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// Why a segment was sealed: `rotate`, `shutdown`, `recovered` (seal records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed: Option<&'static str>,
    /// Bytes of a torn last line set aside during recovery, and where (seal records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torn_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torn_file: Option<String>,
    pub prev: String,
}

impl Record {
    /// An empty record of `kind`, stamped now.
    pub fn new(kind: Kind) -> Self {
        Self {
            seq: 0,
            instance: Arc::from(""),
            ts: now_rfc3339(),
            kind,
            trace_id: None,
            conn_id: None,
            peer: None,
            fqdn: None,
            from: None,
            to: None,
            interaction: None,
            method: None,
            target: None,
            decision: None,
            reason: None,
            policy_generation: None,
            jwt: None,
            status: None,
            bytes_in: None,
            bytes_out: None,
            upstream_ms: None,
            total_ms: None,
            retried: None,
            outcome: None,
            sealed: None,
            torn_bytes: None,
            torn_file: None,
            prev: String::new(),
        }
    }
}

/// A duration as the audit record's milliseconds, to the microsecond.
pub fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Appends `record` to `buf` as one JSON line and returns the SHA-256 (hex) of the line, the next record's `prev`:
/// the whole cost of a record on the request path, but for the `write`.
pub fn encode(record: &Record, buf: &mut Vec<u8>) -> io::Result<String> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, record).map_err(io::Error::other)?;
    let hash = crate::tls::hex(&Sha256::digest(&buf[start..]));
    buf.push(b'\n');
    Ok(hash)
}

/// The current time as RFC 3339 with microseconds, UTC.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` (UTC) as `YYYY-MM-DDTHH:MM:SS.ffffffZ`, digit by digit: every record is stamped, and the general formatter
/// cost a microsecond a record.
fn rfc3339(t: time::OffsetDateTime) -> String {
    fn digits(out: &mut String, n: u32, width: u32) {
        for place in (0..width).rev() {
            let d = (n / 10u32.pow(place)) % 10;
            out.push(char::from(b'0' + d as u8));
        }
    }
    let (h, m, sec, micro) = t.to_hms_micro();
    let mut out = String::with_capacity(27);
    digits(&mut out, t.year().clamp(0, 9999) as u32, 4);
    out.push('-');
    digits(&mut out, u32::from(u8::from(t.month())), 2);
    out.push('-');
    digits(&mut out, u32::from(t.day()), 2);
    out.push('T');
    digits(&mut out, u32::from(h), 2);
    out.push(':');
    digits(&mut out, u32::from(m), 2);
    out.push(':');
    digits(&mut out, u32::from(sec), 2);
    out.push('.');
    digits(&mut out, micro, 6);
    out.push('Z');
    out
}

/// The audit log could not take a record in time: the request must not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("audit log unavailable")
    }
}

impl std::error::Error for Unavailable {}

/// Where a request record stands; the request waiting for it is woken, and only it, when that changes.
#[derive(Debug, Default)]
struct Slot {
    state: std::sync::atomic::AtomicU8,
    changed: tokio::sync::Notify,
}

impl Slot {
    const PENDING: u8 = 0;
    /// In the page cache, waiting for an fsync (strict mode only).
    const WRITTEN: u8 = 1;
    const DONE: u8 = 2;
    const FAILED: u8 = 3;

    fn get(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Sets the state and wakes the waiting request (or leaves it a permit, if it is not waiting yet).
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.changed.notify_one();
    }
}

/// A record waiting to be written, and the slot of the request waiting for it (none for response records).
type Job = (Box<Record>, Option<Arc<Slot>>);

/// The writer's metric handles: `ssp_audit_records_total` and `ssp_audit_write_seconds`.
#[derive(Debug, Clone)]
pub struct AuditMetrics {
    pub records: prometheus::IntCounter,
    pub write_seconds: prometheus::Histogram,
}

/// The handle the request path holds.
///
/// Group commit without a hand-off: a request appends its record to the queue and, when no write is in progress,
/// writes the whole queue itself (one `write` for every record queued), on its own thread; requests that arrive
/// meanwhile are carried by the next write. Response records ride along with the next write. A syncer thread
/// fsyncs: in strict mode when a request asks (one fsync for every record written since the last), in batched mode
/// every `fsync_interval`; it also writes records left queued when no request comes to carry them.
pub struct AuditLog {
    shared: Arc<Shared>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the syncer thread.
    wake: std::sync::Condvar,
    /// False after a failed write, open or fsync, true again after a good write: feeds readiness.
    healthy: Arc<AtomicBool>,
    /// The audit folder, for log lines.
    dir: PathBuf,
    durability: Durability,
    fsync_interval: Duration,
}

struct State {
    pending: Vec<Job>,
    /// The segment file and chain; `None` while a write is in progress (its writer holds it) or after close.
    writer: Option<Writer>,
    /// The file being written, for the syncer.
    file: Option<Arc<File>>,
    /// Strict mode: slots written and waiting for the next fsync.
    unsynced: Vec<Arc<Slot>>,
    /// Written since the last fsync.
    dirty: bool,
    /// A strict request waits for an fsync.
    sync_wanted: bool,
    /// The syncer waits with nothing to do: a queued record must wake it.
    syncer_idle: bool,
    closed: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes everything queued, a batch per `write`, unless a write is already in progress: that writer goes on
    /// with what was queued meanwhile before it gives the segment back. Called with the lock held; releases it for
    /// the I/O.
    fn flush<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, State>,
    ) -> std::sync::MutexGuard<'a, State> {
        while !st.pending.is_empty() {
            let Some(mut writer) = st.writer.take() else {
                break;
            };
            let n = st.pending.len().min(MAX_BATCH);
            let batch: Vec<Job> = st.pending.drain(..n).collect();
            drop(st);
            let started = Instant::now();
            let (records, slots): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let result = writer.append(records.into_iter());
            if let Err(e) = &result {
                tracing::error!(error = %e, "audit write failed");
            }
            writer.set_healthy(result.is_ok());
            if let (Ok(()), Some(m)) = (&result, &writer.metrics) {
                m.records.inc_by(n as u64);
                m.write_seconds.observe(started.elapsed().as_secs_f64());
            }
            // Rotate after the batch, so one batch never spans two segments.
            if result.is_ok()
                && writer
                    .segment
                    .as_ref()
                    .is_some_and(|s| s.len >= writer.cfg.segment_size)
            {
                writer.rotate();
            }
            st = self.lock();
            st.file = writer.segment.as_ref().map(|s| Arc::clone(&s.file));
            st.writer = Some(writer);
            let written = match (&result, self.durability) {
                (Err(_), _) => Slot::FAILED,
                (Ok(()), Durability::Batched) => Slot::DONE,
                (Ok(()), Durability::Strict) => Slot::WRITTEN,
            };
            st.dirty |= result.is_ok();
            for slot in slots.into_iter().flatten() {
                slot.set(written);
                if written == Slot::WRITTEN {
                    st.unsynced.push(slot);
                }
            }
        }
        st
    }

    /// Fsyncs the segment being written; every slot written before it is then done. Called with the lock held;
    /// releases it for the I/O.
    fn sync<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, State>,
    ) -> std::sync::MutexGuard<'a, State> {
        let file = st.file.clone();
        let slots = std::mem::take(&mut st.unsynced);
        st.sync_wanted = false;
        st.dirty = false;
        drop(st);
        let result = file.map_or(Ok(()), |f| f.sync_data());
        if let Err(e) = &result {
            tracing::error!(error = %e, "audit fsync failed");
            set_healthy(&self.healthy, false, &self.dir);
        }
        let state = if result.is_ok() {
            Slot::DONE
        } else {
            Slot::FAILED
        };
        for slot in &slots {
            slot.set(state);
        }
        self.lock()
    }

    /// The syncer thread: fsyncs when asked (strict) or when due (batched), and writes records nobody carried.
    fn run_syncer(&self) {
        let mut st = self.lock();
        let mut last_sync = Instant::now();
        let mut queued_since: Option<Instant> = None;
        loop {
            if st.closed {
                return;
            }
            if st.pending.is_empty() {
                queued_since = None;
            } else if queued_since.is_none() {
                queued_since = Some(Instant::now());
            }
            let due = |since: Instant| since.elapsed() >= self.fsync_interval;
            let flush_due = queued_since.is_some_and(due);
            if st.sync_wanted || flush_due || (st.dirty && due(last_sync)) {
                st = self.flush(st);
                if st.sync_wanted || st.dirty {
                    st = self.sync(st);
                    last_sync = Instant::now();
                } else if st.writer.is_none() {
                    // A request is writing: let it finish rather than spin.
                    st = self
                        .wake
                        .wait_timeout(st, Duration::from_millis(1))
                        .map_or_else(|e| e.into_inner().0, |(g, _)| g);
                }
                continue;
            }
            if st.dirty || queued_since.is_some() {
                let from = match queued_since {
                    Some(q) if !st.dirty => q,
                    Some(q) => q.min(last_sync),
                    None => last_sync,
                };
                let wait = self
                    .fsync_interval
                    .saturating_sub(from.elapsed())
                    .max(Duration::from_millis(1));
                st = self
                    .wake
                    .wait_timeout(st, wait)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            } else {
                st.syncer_idle = true;
                st = self
                    .wake
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                st.syncer_idle = false;
            }
        }
    }
}

impl AuditLog {
    /// Starts the log. It recovers the log (setting aside a torn tail) and opens a new segment; if it cannot, the
    /// log starts unhealthy (every request is refused with 503) and retries on each write.
    pub fn start(cfg: AuditConfig) -> Arc<Self> {
        Self::start_with_metrics(cfg, None)
    }

    /// As [`AuditLog::start`], counting records written and timing each batch.
    pub fn start_with_metrics(cfg: AuditConfig, metrics: Option<AuditMetrics>) -> Arc<Self> {
        let healthy = Arc::new(AtomicBool::new(false));
        let (durability, fsync_interval, dir) =
            (cfg.durability, cfg.fsync_interval, cfg.dir.clone());
        let mut writer = Writer::new(cfg, Arc::clone(&healthy));
        writer.metrics = metrics;
        // Open before returning, so a healthy log is healthy from the first request.
        writer.ensure_open();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                file: writer.segment.as_ref().map(|s| Arc::clone(&s.file)),
                writer: Some(writer),
                unsynced: Vec::new(),
                dirty: false,
                sync_wanted: false,
                syncer_idle: false,
                closed: false,
            }),
            wake: std::sync::Condvar::new(),
            healthy,
            dir,
            durability,
            fsync_interval,
        });
        let for_syncer = Arc::clone(&shared);
        let syncer = std::thread::Builder::new()
            .name("ssp-audit".into())
            .spawn(move || for_syncer.run_syncer())
            .ok();
        Arc::new(Self {
            shared,
            syncer: Mutex::new(syncer),
        })
    }

    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// Records queued and not yet written.
    pub fn queue_depth(&self) -> u64 {
        self.shared.lock().pending.len() as u64
    }

    /// Queues a job; gives it back when the log is closed or the queue is full.
    fn push(&self, job: Job, limit: usize) -> Result<(), Job> {
        let mut st = self.shared.lock();
        if st.closed || st.pending.len() >= limit {
            return Err(job);
        }
        st.pending.push(job);
        if st.syncer_idle {
            st.syncer_idle = false;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Writes a record and waits until it is written (batched) or fsynced (strict). A request may be forwarded
    /// only after this returns `Ok`.
    pub async fn write(&self, record: Record) -> Result<(), Unavailable> {
        let slot = Arc::new(Slot::default());
        let mut job: Job = (Box::new(record), Some(Arc::clone(&slot)));
        let room_deadline = tokio::time::Instant::now() + SUBMIT_WAIT;
        while let Err(back) = self.push(job, QUEUE_CAPACITY) {
            if self.shared.lock().closed || tokio::time::Instant::now() >= room_deadline {
                return Err(Unavailable);
            }
            job = back;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        loop {
            // A change between reading the slot and waiting leaves a permit, so it is not missed.
            match slot.get() {
                Slot::DONE => return Ok(()),
                Slot::FAILED => return Err(Unavailable),
                // Write the queue, this record with it, unless a write is in progress: that writer then carries
                // it, and the notification above tells when.
                Slot::PENDING => drop(self.shared.flush(self.shared.lock())),
                _ => {
                    let mut st = self.shared.lock();
                    if slot.get() == Slot::WRITTEN && !st.sync_wanted {
                        st.sync_wanted = true;
                        self.shared.wake.notify_one();
                    }
                }
            }
            if tokio::time::timeout_at(deadline, slot.changed.notified())
                .await
                .is_err()
            {
                return Err(Unavailable);
            }
        }
    }

    /// Queues a record without waiting for it to be written (response records, refusals): the next write carries
    /// it, or the syncer within `fsync_interval`. Request records wait for room below [`QUEUE_CAPACITY`]; these go
    /// on up to [`QUEUE_LIMIT`], so that an exchange's response record is not lost to a burst. A record that
    /// cannot be queued (the log is closed, or the disk has stalled that long) is reported in the operational log,
    /// never dropped silently.
    pub fn submit(self: &Arc<Self>, record: Record) {
        if self.push((Box::new(record), None), QUEUE_LIMIT).is_err() {
            tracing::error!("audit log closed or its queue full: a record could not be queued");
        }
    }

    /// Writes what is queued, seals the current segment, fsyncs and stops the syncer. Later writes are refused.
    pub fn close(&self) {
        let writer = loop {
            let mut st = self.shared.flush(self.shared.lock());
            if st.closed {
                return;
            }
            // A write in progress holds the writer; it gives it back shortly.
            if st.writer.is_some() && st.pending.is_empty() {
                st.closed = true;
                self.shared.wake.notify_one();
                break st.writer.take();
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Some(thread) = self.syncer.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
        if let Some(mut writer) = writer {
            writer.seal("shutdown");
            let ok = if writer.sync() {
                Slot::DONE
            } else {
                Slot::FAILED
            };
            let mut st = self.shared.lock();
            for slot in std::mem::take(&mut st.unsynced) {
                slot.set(ok);
            }
            st.file = None;
        }
    }
}

impl Drop for AuditLog {
    /// Dropping the log closes it, as a clean stop would.
    fn drop(&mut self) {
        self.close();
    }
}

/// Sets the health flag that feeds readiness, and says so when it changes.
fn set_healthy(flag: &AtomicBool, healthy: bool, dir: &Path) {
    if flag.swap(healthy, Ordering::AcqRel) != healthy {
        if healthy {
            tracing::info!(dir = %dir.display(), "audit log writable");
        } else {
            tracing::error!(dir = %dir.display(), "audit log NOT writable: requests are refused with 503");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The segment writer.

/// The segment being appended to.
struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// The number in its file name.
    index: u64,
    /// Bytes known to be written in full; a failed write is rolled back to this.
    len: u64,
}

struct Writer {
    cfg: AuditConfig,
    instance: Arc<str>,
    healthy: Arc<AtomicBool>,
    segment: Option<Segment>,
    /// Sequence number of the last record written.
    seq: u64,
    /// SHA-256 (hex) of the last line written.
    prev: String,
    /// Reused for each batch.
    buf: Vec<u8>,
    metrics: Option<AuditMetrics>,
}

impl Writer {
    fn new(cfg: AuditConfig, healthy: Arc<AtomicBool>) -> Self {
        Self {
            instance: Arc::from(cfg.instance.as_str()),
            cfg,
            healthy,
            segment: None,
            seq: 0,
            prev: GENESIS.to_owned(),
            buf: Vec::with_capacity(64 * 1024),
            metrics: None,
        }
    }

    fn set_healthy(&self, healthy: bool) {
        set_healthy(&self.healthy, healthy, &self.cfg.dir);
    }
    /// Serialises, chains and writes records in one write; on failure rolls the segment back and leaves the chain
    /// where it was.
    fn append(&mut self, records: impl Iterator<Item = Box<Record>>) -> io::Result<()> {
        if !self.ensure_open() {
            return Err(io::Error::other("no writable audit segment"));
        }
        self.buf.clear();
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        for mut record in records {
            seq += 1;
            record.seq = seq;
            record.instance = Arc::clone(&self.instance);
            record.prev = prev;
            prev = encode(&record, &mut self.buf)?;
        }
        let Some(segment) = self.segment.as_mut() else {
            return Err(io::Error::other("no writable audit segment"));
        };
        match (&*segment.file).write_all(&self.buf) {
            Ok(()) => {
                segment.len += self.buf.len() as u64;
                self.seq = seq;
                self.prev = prev;
                Ok(())
            }
            Err(e) => {
                // Cut off whatever part of the batch landed, so the file still ends at a whole record.
                let rollback = segment
                    .file
                    .set_len(segment.len)
                    .and_then(|()| (&*segment.file).seek(SeekFrom::End(0)));
                if rollback.is_err() {
                    self.segment = None;
                }
                Err(e)
            }
        }
    }

    fn sync_now(&mut self) -> io::Result<()> {
        if let Some(segment) = &self.segment {
            segment.file.sync_data()?;
        }
        Ok(())
    }

    /// Fsyncs the segment; a failure is logged and turns the log unhealthy. True when synced.
    fn sync(&mut self) -> bool {
        match self.sync_now() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "audit fsync failed");
                self.set_healthy(false);
                false
            }
        }
    }

    /// Appends a seal record to the current segment.
    fn seal(&mut self, why: &'static str) {
        if self.segment.is_none() {
            return;
        }
        let mut record = Record::new(Kind::Seal);
        record.sealed = Some(why);
        if let Err(e) = self.append(std::iter::once(Box::new(record))) {
            tracing::error!(error = %e, "audit seal failed");
        }
    }

    /// Opens a writable segment if there is none: recovers the log on disk, then starts a new segment.
    fn ensure_open(&mut self) -> bool {
        if self.segment.is_some() {
            return true;
        }
        match self.open() {
            Ok(segment) => {
                tracing::info!(segment = %segment.path.display(), seq = self.seq, "audit segment opened");
                self.segment = Some(segment);
                self.set_healthy(true);
                true
            }
            Err(e) => {
                tracing::error!(dir = %self.cfg.dir.display(), error = %e, "cannot open the audit log");
                self.set_healthy(false);
                false
            }
        }
    }

    fn open(&mut self) -> io::Result<Segment> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cfg.dir)?;
        // The log holds patient identifiers: an existing folder is tightened too.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&self.cfg.dir, fs::Permissions::from_mode(0o700))?;
        }
        let mut segments = list_segments(&self.cfg.dir)?;
        // Recover from the newest segment backwards until one holds a record.
        let mut last_index = segments.last().map_or(0, |(i, _)| *i);
        while let Some((index, path)) = segments.pop() {
            let recovered = recover_segment(&path)?;
            match recovered {
                Recovered::Empty => {
                    tracing::warn!(segment = %path.display(), "removing an audit segment with no record");
                    fs::remove_file(&path)?;
                }
                Recovered::Tail {
                    seq,
                    hash,
                    sealed,
                    torn,
                } => {
                    self.seq = seq;
                    self.prev = hash;
                    if !sealed {
                        // The process that wrote it did not stop cleanly: seal it now, saying what was found.
                        let file = OpenOptions::new().append(true).open(&path)?;
                        let len = file.metadata()?.len();
                        self.segment = Some(Segment {
                            file: Arc::new(file),
                            path: path.clone(),
                            index,
                            len,
                        });
                        let mut record = Record::new(Kind::Seal);
                        record.sealed = Some("recovered");
                        if let Some((bytes, file)) = &torn {
                            record.torn_bytes = Some(*bytes);
                            record.torn_file = Some(file.clone());
                        }
                        let sealed = self
                            .append(std::iter::once(Box::new(record)))
                            .and_then(|()| self.sync_now());
                        self.segment = None;
                        sealed?;
                    }
                    last_index = index;
                    break;
                }
            }
        }
        self.create_segment(last_index + 1)
    }

    /// Creates segment `index`, empty, and makes its directory entry durable.
    fn create_segment(&self, index: u64) -> io::Result<Segment> {
        let path = self.cfg.dir.join(segment_name(index));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        File::open(&self.cfg.dir)?.sync_all()?;
        Ok(Segment {
            file: Arc::new(file),
            path,
            index,
            len: 0,
        })
    }

    /// Seals the current segment, fsyncs it, and goes on in the next one. The chain state is known here, so
    /// nothing is read back (recovery reads only what a start after a crash needs).
    fn rotate(&mut self) {
        self.seal("rotate");
        self.sync();
        let Some(index) = self.segment.take().map(|s| s.index) else {
            return;
        };
        match self.create_segment(index + 1) {
            Ok(segment) => {
                tracing::info!(segment = %segment.path.display(), seq = self.seq, "audit segment opened");
                self.segment = Some(segment);
            }
            // Another process or a failing disk: the full open path recovers what is there, or reports it.
            Err(e) => {
                tracing::error!(error = %e, "cannot create the next audit segment");
                self.ensure_open();
            }
        }
    }
}

fn segment_name(index: u64) -> String {
    format!("audit-{index:08}.jsonl")
}

/// Segment files in `dir`, in order.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("audit-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.file_type()?.is_file() {
            segments.push((index, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

enum Recovered {
    /// No complete record (the file is removed by the caller).
    Empty,
    Tail {
        seq: u64,
        hash: String,
        sealed: bool,
        /// Bytes of a torn last line and the file they were set aside in.
        torn: Option<(u64, String)>,
    },
}

/// How much of a segment's end recovery reads: far more than one record, far less than a segment.
const TAIL_WINDOW: u64 = 1 << 20;

/// Reads a segment's last complete record; a torn tail (bytes after the last newline) is copied to
/// `<segment>.torn-<unix seconds>`, fsynced, and only then cut from the segment. Reads only the segment's last
/// [`TAIL_WINDOW`] bytes, unless the last record does not fit in them.
fn recover_segment(path: &Path) -> io::Result<Recovered> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut start = len.saturating_sub(TAIL_WINDOW);
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(start))?;
    file.read_to_end(&mut bytes)?;
    let mut good = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if start > 0 && !bytes[..good.saturating_sub(1)].contains(&b'\n') {
        start = 0;
        bytes.clear();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut bytes)?;
        good = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    }
    let mut torn = None;
    if good < bytes.len() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = path.with_extension(format!("jsonl.torn-{stamp}"));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&aside)?;
        file.write_all(&bytes[good..])?;
        file.sync_all()?;
        let segment = OpenOptions::new().write(true).open(path)?;
        segment.set_len(start + good as u64)?;
        segment.sync_all()?;
        tracing::warn!(
            segment = %path.display(),
            torn_bytes = bytes.len() - good,
            set_aside = %aside.display(),
            "audit segment ended in a torn record; set aside"
        );
        let name = aside
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        torn = Some(((bytes.len() - good) as u64, name));
    }
    if good == 0 {
        return Ok(Recovered::Empty);
    }
    let body = &bytes[..good - 1];
    let last = body
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(body, |i| &body[i + 1..]);
    let link: Link = serde_json::from_slice(last).map_err(|e| {
        io::Error::other(format!(
            "{}: the last record does not parse ({e}); run `ssp audit verify`",
            path.display()
        ))
    })?;
    Ok(Recovered::Tail {
        seq: link.seq,
        hash: crate::tls::hex(&Sha256::digest(last)),
        sealed: link.kind == "seal",
        torn,
    })
}

/// The chain fields of a line.
#[derive(serde::Deserialize)]
struct Link {
    seq: u64,
    kind: String,
    prev: String,
}

// ---------------------------------------------------------------------------------------------------------------
// Verify.

/// What an intact log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub segments: usize,
    pub last_seq: u64,
    /// Whether the newest segment is sealed (false: it is being written, or its writer crashed).
    pub last_sealed: bool,
}

/// The first problem found: which segment, which line, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub segment: PathBuf,
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: line {}", self.segment.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Verifies the whole chain in `dir`: every line parses, `seq` counts up by one from 1, each `prev` is the SHA-256
/// of the line before (64 zeros for the first), every segment but the newest ends with a seal, and no segment
/// ends in a torn line.
pub fn verify(dir: &Path) -> Result<Verified, Broken> {
    let broken = |segment: &Path, line: u64, seq: Option<u64>, problem: String| Broken {
        segment: segment.to_path_buf(),
        line,
        seq,
        problem,
    };
    let segments =
        list_segments(dir).map_err(|e| broken(dir, 0, None, format!("cannot list: {e}")))?;
    if segments.is_empty() {
        return Err(broken(dir, 0, None, "no audit segments".into()));
    }
    let mut expect_seq = 1u64;
    let mut expect_prev = GENESIS.to_owned();
    let mut records = 0u64;
    let mut last_sealed = false;
    for (n, (_, path)) in segments.iter().enumerate() {
        let file =
            File::open(path).map_err(|e| broken(path, 0, None, format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut line_no = 0u64;
        let mut sealed = false;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| broken(path, line_no + 1, None, format!("read error: {e}")))?;
            if read == 0 {
                break;
            }
            line_no += 1;
            if line.last() != Some(&b'\n') {
                return Err(broken(
                    path,
                    line_no,
                    None,
                    "torn last line (no newline): the log was cut mid-record".into(),
                ));
            }
            let body = &line[..line.len() - 1];
            if sealed {
                return Err(broken(
                    path,
                    line_no,
                    None,
                    "record after the segment's seal".into(),
                ));
            }
            let link: Link = serde_json::from_slice(body)
                .map_err(|e| broken(path, line_no, None, format!("not a record: {e}")))?;
            if link.seq != expect_seq {
                return Err(broken(
                    path,
                    line_no,
                    Some(link.seq),
                    format!(
                        "seq {} where {expect_seq} was expected (a record was removed, added or moved)",
                        link.seq
                    ),
                ));
            }
            if link.prev != expect_prev {
                return Err(broken(
                    path,
                    line_no,
                    Some(link.seq),
                    format!(
                        "prev does not match the hash of line {}: that record was edited, or a record was removed \
                         or moved here",
                        line_no.saturating_sub(1)
                    ),
                ));
            }
            expect_prev = crate::tls::hex(&Sha256::digest(body));
            expect_seq += 1;
            records += 1;
            sealed = link.kind == "seal";
        }
        let newest = n + 1 == segments.len();
        if !sealed && !newest {
            return Err(broken(
                path,
                line_no,
                None,
                "segment does not end with a seal (it was truncated, or a later segment does not belong)".into(),
            ));
        }
        last_sealed = sealed;
    }
    Ok(Verified {
        records,
        segments: segments.len(),
        last_seq: expect_seq - 1,
        last_sealed,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Query.

/// Filters of `ssp audit query`; all given ones must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub trace_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub interaction: Option<String>,
    /// RFC 3339 bounds on `ts`, inclusive.
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
    pub outcome: Option<String>,
}

impl Filter {
    fn matches(&self, v: &serde_json::Value) -> bool {
        let eq = |key: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| v[key].as_str() == Some(w.as_str()))
        };
        let ts = || {
            v["ts"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
        };
        v["kind"] != "seal"
            && eq("trace_id", &self.trace_id)
            && eq("from", &self.from)
            && eq("to", &self.to)
            && eq("interaction", &self.interaction)
            && eq("outcome", &self.outcome)
            && self.since.is_none_or(|s| ts().is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| ts().is_some_and(|t| t <= u))
    }
}

/// Every record of every transaction that has a record matching `filter`, in log order. A transaction is the
/// request and response records sharing an instance, connection and trace id.
pub fn query(dir: &Path, filter: &Filter) -> io::Result<Vec<serde_json::Value>> {
    let key = |v: &serde_json::Value| {
        (
            v["instance"].to_string(),
            v["conn_id"].to_string(),
            v["trace_id"].to_string(),
        )
    };
    let mut wanted = std::collections::HashSet::new();
    for_each_record(dir, |v| {
        if filter.matches(&v) {
            wanted.insert(key(&v));
        }
    })?;
    let mut out = Vec::new();
    for_each_record(dir, |v| {
        if v["kind"] != "seal" && wanted.contains(&key(&v)) {
            out.push(v);
        }
    })?;
    Ok(out)
}

fn for_each_record(dir: &Path, mut f: impl FnMut(serde_json::Value)) -> io::Result<()> {
    for (_, path) in list_segments(dir)? {
        for line in BufReader::new(File::open(&path)?).lines() {
            if let Ok(v) = serde_json::from_str(&line?) {
                f(v);
            }
        }
    }
    Ok(())
}

/// One line of the table view.
pub fn table_row(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    let interaction = s("interaction");
    let interaction = interaction
        .strip_prefix("urn:nhs:names:services:gpconnect:")
        .unwrap_or(&interaction)
        .to_owned();
    let result = match v["kind"].as_str() {
        Some("request") => format!("{} {}", s("decision"), v["reason"].as_str().unwrap_or("")),
        _ => format!(
            "{} {} {}B in {}B out {}ms",
            v["status"],
            s("outcome"),
            v["bytes_in"],
            v["bytes_out"],
            v["total_ms"]
        ),
    };
    format!(
        "{:<27} {:>6} {:<8} {:<36} {:<12} {:<12} {:<45} {:<6} {}",
        s("ts"),
        v["seq"],
        s("kind"),
        s("trace_id"),
        s("from"),
        s("to"),
        interaction,
        s("method"),
        result.trim_end()
    )
}

pub const TABLE_HEADER: &str = "ts                             seq kind     trace_id                             from         to           interaction                                   method result";

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, durability: Durability, segment_size: u64) -> AuditConfig {
        AuditConfig {
            dir: dir.to_path_buf(),
            durability,
            fsync_interval: Duration::from_millis(5),
            segment_size,
            instance: "test-1".into(),
        }
    }

    fn request(n: u64) -> Record {
        let mut r = Record::new(Kind::Request);
        r.trace_id = Some(format!("00000000-0000-4000-8000-{n:012}"));
        r.from = Some("200000000359".into());
        r.to = Some("918999198993".into());
        r.decision = Some("permit");
        r
    }

    async fn write_n(log: &AuditLog, n: u64) {
        for i in 0..n {
            log.write(request(i)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn records_chain_across_segments_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Strict, 1024));
        write_n(&log, 30).await;
        log.close();
        let v = verify(dir.path()).unwrap();
        assert!(v.segments > 2, "{v:?}");
        assert!(v.last_sealed);
        // 30 requests plus one seal per segment.
        assert_eq!(v.records, 30 + v.segments as u64);
        use std::os::unix::fs::PermissionsExt;
        for (_, path) in list_segments(dir.path()).unwrap() {
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[tokio::test]
    async fn a_restart_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let log = AuditLog::start(config(dir.path(), Durability::Batched, 1 << 20));
            write_n(&log, 5).await;
            log.close();
        }
        let v = verify(dir.path()).unwrap();
        assert_eq!((v.segments, v.records), (3, 18));
    }

    /// Simulates a crash: a segment left unsealed with half a record at the end.
    #[tokio::test]
    async fn a_torn_tail_is_set_aside_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Strict, 1 << 20));
        write_n(&log, 3).await;
        // Drop without close: as after kill -9, no seal. Then tear the end.
        std::mem::forget(log);
        let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":4,"instance":"test-1","ts":"2026"#)
            .unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.problem.contains("torn"), "{err}");

        let log = AuditLog::start(config(dir.path(), Durability::Strict, 1 << 20));
        assert!(log.healthy());
        write_n(&log, 2).await;
        log.close();
        let v = verify(dir.path()).unwrap();
        assert_eq!(v.records, 3 + 1 + 2 + 1);
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            fs::read(aside[0].path()).unwrap(),
            br#"{"seq":4,"instance":"test-1","ts":"2026"#
        );
        let first = fs::read_to_string(&path).unwrap();
        let seal: serde_json::Value = serde_json::from_str(first.lines().last().unwrap()).unwrap();
        assert_eq!(seal["sealed"], "recovered");
        assert_eq!(seal["torn_bytes"], 39);
    }

    /// The hand-written stamp is what the general formatter writes, for any instant of these years.
    #[test]
    fn timestamps_match_the_formatter() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let mut t = time::OffsetDateTime::from_unix_timestamp(0).unwrap();
        let step = time::Duration::seconds(86_399) + time::Duration::microseconds(987_654);
        while t.year() < 2100 {
            assert_eq!(rfc3339(t), t.format(&format).unwrap());
            t += step;
        }
        let now = now_rfc3339();
        assert_eq!(now.len(), 27, "{now}");
    }

    /// Many requests at once on two threads: every one is answered, group commit writes fewer batches than
    /// records, and the chain holds across rotations, in both durability modes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_writes() {
        for durability in [Durability::Batched, Durability::Strict] {
            let dir = tempfile::tempdir().unwrap();
            let metrics = AuditMetrics {
                records: prometheus::IntCounter::new("r", "r").unwrap(),
                write_seconds: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(
                    "w", "w",
                ))
                .unwrap(),
            };
            let log = AuditLog::start_with_metrics(
                config(dir.path(), durability, 256 << 10),
                Some(metrics.clone()),
            );
            let tasks: Vec<_> = (0..64)
                .map(|t| {
                    let log = Arc::clone(&log);
                    tokio::spawn(async move {
                        for i in 0..25 {
                            log.write(request(t * 100 + i)).await.unwrap();
                            let mut response = Record::new(Kind::Response);
                            response.status = Some(200);
                            log.submit(response);
                        }
                    })
                })
                .collect();
            for task in tasks {
                tokio::time::timeout(Duration::from_secs(60), task)
                    .await
                    .unwrap()
                    .unwrap();
            }
            log.close();
            let v = verify(dir.path()).unwrap();
            assert!(v.segments > 1, "{v:?}");
            assert_eq!(v.records, 64 * 25 * 2 + v.segments as u64, "{durability:?}");
            let batches = metrics.write_seconds.get_sample_count();
            assert!(
                batches < metrics.records.get(),
                "{durability:?}: {batches} writes for {} records",
                metrics.records.get()
            );
        }
    }

    /// While nothing can be written (here: the writer held, as by a write stuck on a stalled disk), a request
    /// record is refused once the queue holds `QUEUE_CAPACITY`, and other records are kept up to `QUEUE_LIMIT`,
    /// then dropped; everything queued is written once the writer is back.
    #[tokio::test]
    async fn the_queue_is_bounded_while_the_disk_stalls() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
        let writer = log.shared.lock().writer.take();
        for i in 0..QUEUE_CAPACITY as u64 {
            log.submit(request(i));
        }
        assert_eq!(log.write(request(0)).await, Err(Unavailable));
        for i in 0..(QUEUE_LIMIT - QUEUE_CAPACITY + 10) as u64 {
            log.submit(request(i));
        }
        assert_eq!(log.queue_depth(), QUEUE_LIMIT as u64);
        log.shared.lock().writer = writer;
        log.close();
        let v = verify(dir.path()).unwrap();
        assert_eq!(v.records, QUEUE_LIMIT as u64 + 1);
    }

    /// Recovery reads a segment's last [`TAIL_WINDOW`] bytes; a tear longer than that is still found whole.
    #[tokio::test]
    async fn recovery_of_a_long_segment_reads_its_tail() {
        for tear in [
            b"{\"seq\":".to_vec(),
            vec![b'x'; TAIL_WINDOW as usize + 4096],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
            let n = 2 * TAIL_WINDOW / 200;
            for i in 0..n {
                log.submit(request(i));
            }
            log.write(request(n)).await.unwrap();
            std::mem::forget(log);
            let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
            assert!(fs::metadata(&path).unwrap().len() > TAIL_WINDOW);
            OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(&tear)
                .unwrap();

            let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
            write_n(&log, 1).await;
            log.close();
            let v = verify(dir.path()).unwrap();
            assert_eq!(v.records, n + 1 + 1 + 1 + 1, "{v:?}");
            let text = fs::read_to_string(&path).unwrap();
            let seal: serde_json::Value =
                serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(seal["sealed"], "recovered");
            assert_eq!(seal["torn_bytes"], tear.len() as u64);
        }
    }

    #[tokio::test]
    async fn an_unwritable_directory_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"not a directory").unwrap();
        let log = AuditLog::start(config(&blocker.join("audit"), Durability::Strict, 1 << 20));
        assert!(!log.healthy());
        assert_eq!(log.write(request(1)).await, Err(Unavailable));
        log.close();
    }

    fn tamper(dir: &Path, f: impl FnOnce(&mut Vec<String>)) -> Broken {
        let (_, path) = list_segments(dir).unwrap().into_iter().next().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        f(&mut lines);
        fs::write(&path, lines.join("\n") + "\n").unwrap();
        verify(dir).unwrap_err()
    }

    async fn fresh_log() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Batched, 1 << 20));
        write_n(&log, 6).await;
        log.close();
        assert!(verify(dir.path()).is_ok());
        dir
    }

    #[tokio::test]
    async fn tampering_is_detected_at_the_first_bad_record() {
        let dir = fresh_log().await;
        let err = tamper(dir.path(), |l| {
            l[2] = l[2].replace("918999198993", "918999198994")
        });
        assert_eq!((err.line, err.seq), (4, Some(4)), "{err}");

        let dir = fresh_log().await;
        let err = tamper(dir.path(), |l| {
            l.remove(2);
        });
        assert_eq!(err.line, 3, "{err}");

        let dir = fresh_log().await;
        let err = tamper(dir.path(), |l| l.swap(1, 2));
        assert_eq!(err.line, 2, "{err}");

        let dir = fresh_log().await;
        let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.problem.contains("torn"), "{err}");
    }

    #[tokio::test]
    async fn removing_a_sealed_segment_or_its_seal_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Batched, 512));
        write_n(&log, 20).await;
        log.close();
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 3);
        // Truncate the first segment at a record boundary: its seal is gone.
        let text = fs::read_to_string(&segments[0].1).unwrap();
        let cut: Vec<&str> = text.lines().collect();
        fs::write(&segments[0].1, cut[..cut.len() - 1].join("\n") + "\n").unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.problem.contains("seal"), "{err}");
        fs::write(&segments[0].1, text).unwrap();
        assert!(verify(dir.path()).is_ok());
        // Remove a middle segment.
        fs::remove_file(&segments[1].1).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert_eq!(err.segment, segments[2].1);
    }

    #[tokio::test]
    async fn query_returns_whole_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Batched, 1 << 20));
        for (n, outcome) in [(1u64, "ok"), (2, "denied"), (3, "ok")] {
            let mut req = request(n);
            req.conn_id = Some(n);
            log.write(req).await.unwrap();
            let mut resp = Record::new(Kind::Response);
            resp.trace_id = Some(format!("00000000-0000-4000-8000-{n:012}"));
            resp.conn_id = Some(n);
            resp.outcome = Some(outcome);
            log.write(resp).await.unwrap();
        }
        log.close();
        let denied = query(
            dir.path(),
            &Filter {
                outcome: Some("denied".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(
            denied.len(),
            2,
            "the request and response of the denied transaction"
        );
        assert_eq!(denied[0]["kind"], "request");
        assert_eq!(denied[1]["outcome"], "denied");
        let all = query(
            dir.path(),
            &Filter {
                from: Some("200000000359".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(all.len(), 6);
        let none = query(
            dir.path(),
            &Filter {
                since: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
                ..Filter::default()
            },
        )
        .unwrap();
        assert!(none.is_empty());
    }
}
