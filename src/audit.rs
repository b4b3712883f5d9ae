//! The transaction log (DESIGN.md 1.6): append-only JSON-lines segments, each record chained to the previous one
//! by SHA-256, written by one writer thread in batches with group commit, verified and queried offline.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
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
            outcome: None,
            sealed: None,
            torn_bytes: None,
            torn_file: None,
            prev: String::new(),
        }
    }
}

/// The current time as RFC 3339 with microseconds, UTC.
pub fn now_rfc3339() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
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

/// Tells a waiting request whether its record was written.
type Ack = tokio::sync::oneshot::Sender<Result<(), Unavailable>>;

enum Job {
    Record(Box<Record>, Option<Ack>),
    /// Seal, fsync and stop; the sender learns when it is done.
    Close(mpsc::Sender<()>),
}

/// The writer's metric handles: `ssp_audit_records_total` and `ssp_audit_write_seconds`.
#[derive(Debug, Clone)]
pub struct AuditMetrics {
    pub records: prometheus::IntCounter,
    pub write_seconds: prometheus::Histogram,
}

/// The handle the request path holds: submits records to the writer thread.
pub struct AuditLog {
    tx: mpsc::SyncSender<Job>,
    /// False after a failed write or open, true again after a good one: feeds readiness.
    healthy: Arc<AtomicBool>,
    /// Records the writer has taken but not yet written, for the queue-depth metric.
    queued: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Starts the writer thread. It recovers the log (setting aside a torn tail) and opens a new segment; if it
    /// cannot, the log starts unhealthy (every request is refused with 503) and retries on each record.
    pub fn start(cfg: AuditConfig) -> Arc<Self> {
        Self::start_with_metrics(cfg, None)
    }

    /// As [`AuditLog::start`], counting records written and timing each batch.
    pub fn start_with_metrics(cfg: AuditConfig, metrics: Option<AuditMetrics>) -> Arc<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicU64::new(0));
        let mut writer = Writer::new(cfg, Arc::clone(&healthy), Arc::clone(&queued));
        writer.metrics = metrics;
        // Open before returning, so a healthy log is healthy from the first request.
        writer.ensure_open();
        let thread = std::thread::Builder::new()
            .name("ssp-audit".into())
            .spawn(move || writer.run(rx))
            .ok();
        Arc::new(Self {
            tx,
            healthy,
            queued,
            thread: Mutex::new(thread),
        })
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records submitted and not yet written.
    pub fn queue_depth(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Writes a record and waits until it is written (batched) or fsynced (strict). A request may be forwarded
    /// only after this returns `Ok`.
    pub async fn write(&self, record: Record) -> Result<(), Unavailable> {
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        self.enqueue(Job::Record(Box::new(record), Some(ack_tx)))
            .await?;
        match tokio::time::timeout(ACK_WAIT, ack_rx).await {
            Ok(Ok(result)) => result,
            _ => Err(Unavailable),
        }
    }

    /// Hands a record to the writer without waiting for it to be written (response records, refusals). If the
    /// queue is full it waits in the background up to the same bound; a record that still cannot be queued is
    /// reported in the operational log, never dropped silently.
    pub fn submit(self: &Arc<Self>, record: Record) {
        match self.tx.try_send(Job::Record(Box::new(record), None)) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::TrySendError::Full(job)) => {
                let log = Arc::clone(self);
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        if log.enqueue(job).await.is_err() {
                            tracing::error!("audit queue full: a record could not be queued");
                        }
                    });
                } else {
                    tracing::error!("audit queue full: a record could not be queued");
                }
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                tracing::error!("audit writer stopped: a record could not be queued");
            }
        }
    }

    async fn enqueue(&self, mut job: Job) -> Result<(), Unavailable> {
        let deadline = tokio::time::Instant::now() + SUBMIT_WAIT;
        loop {
            match self.tx.try_send(job) {
                Ok(()) => {
                    self.queued.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(mpsc::TrySendError::Full(back)) if tokio::time::Instant::now() < deadline => {
                    job = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(_) => return Err(Unavailable),
            }
        }
    }

    /// Seals the current segment, fsyncs and stops the writer; records submitted before are written first.
    pub fn close(&self) {
        let (done_tx, done_rx) = mpsc::channel();
        if self.tx.send(Job::Close(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The writer thread.

/// The segment being appended to.
struct Segment {
    file: File,
    path: PathBuf,
    /// Bytes known to be written in full; a failed write is rolled back to this.
    len: u64,
}

struct Writer {
    cfg: AuditConfig,
    instance: Arc<str>,
    healthy: Arc<AtomicBool>,
    queued: Arc<AtomicU64>,
    segment: Option<Segment>,
    /// Sequence number of the last record written.
    seq: u64,
    /// SHA-256 (hex) of the last line written.
    prev: String,
    /// Written but not yet fsynced.
    dirty: bool,
    last_sync: Instant,
    /// Reused for each batch.
    buf: Vec<u8>,
    metrics: Option<AuditMetrics>,
}

impl Writer {
    fn new(cfg: AuditConfig, healthy: Arc<AtomicBool>, queued: Arc<AtomicU64>) -> Self {
        Self {
            instance: Arc::from(cfg.instance.as_str()),
            cfg,
            healthy,
            queued,
            segment: None,
            seq: 0,
            prev: GENESIS.to_owned(),
            dirty: false,
            last_sync: Instant::now(),
            buf: Vec::with_capacity(64 * 1024),
            metrics: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // With unsynced writes, wake up when the fsync interval is due even if nothing arrives.
            let first = if self.dirty {
                let wait = self
                    .cfg
                    .fsync_interval
                    .saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                }
            };
            let Some(first) = first else {
                self.sync();
                continue;
            };
            let mut records = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(job) = next {
                match job {
                    Job::Record(record, ack) => records.push((record, ack)),
                    Job::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
                next = if records.len() < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            self.queued
                .fetch_sub(records.len() as u64, Ordering::Relaxed);
            if !records.is_empty() {
                self.write_batch(records);
            }
            if let Some(done) = close {
                self.seal("shutdown");
                self.sync();
                let _ = done.send(());
                return;
            }
        }
        self.seal("shutdown");
        self.sync();
    }

    fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                tracing::info!(dir = %self.cfg.dir.display(), "audit log writable");
            } else {
                tracing::error!(dir = %self.cfg.dir.display(), "audit log NOT writable: requests are refused with 503");
            }
        }
    }

    fn write_batch(&mut self, records: Vec<(Box<Record>, Option<Ack>)>) {
        let started = Instant::now();
        let count = records.len() as u64;
        let mut acks = Vec::with_capacity(records.len());
        let result = self.append(records.into_iter().map(|(r, ack)| {
            acks.push(ack);
            r
        }));
        let result = result.and_then(|()| match self.cfg.durability {
            Durability::Strict => self.sync_now(),
            Durability::Batched => {
                if self.last_sync.elapsed() >= self.cfg.fsync_interval {
                    self.sync_now()
                } else {
                    Ok(())
                }
            }
        });
        if let Err(e) = &result {
            tracing::error!(error = %e, "audit write failed");
        }
        if let (Ok(()), Some(m)) = (&result, &self.metrics) {
            m.records.inc_by(count);
            m.write_seconds.observe(started.elapsed().as_secs_f64());
        }
        self.set_healthy(result.is_ok());
        let answer = result.map_err(|_| Unavailable);
        for ack in acks.into_iter().flatten() {
            let _ = ack.send(answer);
        }
        // Rotate after the batch, so one batch never spans two segments.
        if answer.is_ok()
            && self
                .segment
                .as_ref()
                .is_some_and(|s| s.len >= self.cfg.segment_size)
        {
            self.seal("rotate");
            self.segment = None;
            self.ensure_open();
        }
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
            let start = self.buf.len();
            serde_json::to_writer(&mut self.buf, &record).map_err(io::Error::other)?;
            prev = crate::tls::hex(&Sha256::digest(&self.buf[start..]));
            self.buf.push(b'\n');
        }
        let Some(segment) = self.segment.as_mut() else {
            return Err(io::Error::other("no writable audit segment"));
        };
        match segment.file.write_all(&self.buf) {
            Ok(()) => {
                segment.len += self.buf.len() as u64;
                self.seq = seq;
                self.prev = prev;
                self.dirty = true;
                Ok(())
            }
            Err(e) => {
                // Cut off whatever part of the batch landed, so the file still ends at a whole record.
                let rollback = segment
                    .file
                    .set_len(segment.len)
                    .and_then(|()| segment.file.seek(SeekFrom::End(0)));
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
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn sync(&mut self) {
        if let Err(e) = self.sync_now() {
            tracing::error!(error = %e, "audit fsync failed");
            self.set_healthy(false);
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
                            file,
                            path: path.clone(),
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
        let index = last_index + 1;
        let path = self.cfg.dir.join(segment_name(index));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        File::open(&self.cfg.dir)?.sync_all()?;
        Ok(Segment { file, path, len: 0 })
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

/// Reads a segment's last complete record; a torn tail (bytes after the last newline) is copied to
/// `<segment>.torn-<unix seconds>`, fsynced, and only then cut from the segment.
fn recover_segment(path: &Path) -> io::Result<Recovered> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let good = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
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
        segment.set_len(good as u64)?;
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
