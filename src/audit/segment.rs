//! Segment files: the appender that serialises, chains and writes batches of records, rotation, and recovery of
//! what a crashed process left (a torn tail is set aside, an unsealed segment sealed). Runs on the audit thread
//! only (see `writer`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::hex::HexDigest;

use super::record::{ChainLink, Encoded, Record, SealReason};
use crate::config::AuditConfig;

/// The segment being appended to.
pub(super) struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// The number in its file name.
    index: u64,
    /// Bytes known to be written in full; a failed write is rolled back to this.
    len: u64,
}

/// The audit log's repeated error lines (failed writes, records given up) come once per this at most, each with the
/// count since the last: a full disk under traffic fails every batch.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// How [`SegmentWriter::write_batch`] writes a batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchWrite {
    /// fdatasync after it: strict durability.
    pub sync: bool,
    /// Move to the next segment after it when this one is full: the thread's writes (workers never rotate).
    pub rotate: bool,
    /// The batch is records of a failed write written again: that they do not fit says nothing of whether new
    /// records do, so its failure leaves the log's health as it was, and its success makes it healthy.
    pub again: bool,
}

pub(super) struct SegmentWriter {
    cfg: AuditConfig,
    healthy: Arc<AtomicBool>,
    /// The write (or strict-mode fsync) in progress, for readiness: a disk that stalls (a frozen file system) holds
    /// it without failing it.
    busy: Arc<BusyClock>,
    segment: Option<Segment>,
    /// Sequence number of the last record written.
    seq: u64,
    /// SHA-256 (hex) of the last line written.
    prev: HexDigest,
    /// Reused for each batch.
    buf: Vec<u8>,
    metrics: Option<AuditMetrics>,
    /// Failed writes since the operational log last said so, and when it did ([`REPORT_EVERY`]).
    failed_writes: u64,
    failure_reported: Option<Instant>,
    /// `audit.dir` itself, flocked for as long as this writer lives: one writer a chain, whatever the process (a
    /// second `ssp serve` on the folder, or `ssp audit subject` writing its record while a proxy runs). The folder,
    /// not a file in it: a file can be deleted from under its lock, a folder that holds segments cannot.
    lock: Option<File>,
}

/// When the writer's `write` or fsync in progress began, if one is: nanoseconds since the clock was made, plus one;
/// zero when none is. Set and cleared by the writer around each call that can stall on the disk, read without a
/// lock by readiness (`AuditLog::stalled`).
#[derive(Debug)]
pub(super) struct BusyClock {
    epoch: Instant,
    since: AtomicU64,
}

impl Default for BusyClock {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            since: AtomicU64::new(0),
        }
    }
}

impl BusyClock {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Marks a call begun; it ends when the value is dropped (a panic included).
    fn start(&self) -> Busy<'_> {
        self.since.store(self.now(), Ordering::Release);
        Busy(self)
    }

    /// How long the call in progress has taken so far; `None` when none is.
    pub(super) fn busy_for(&self) -> Option<Duration> {
        let since = self.since.load(Ordering::Acquire);
        (since != 0).then(|| Duration::from_nanos(self.now().saturating_sub(since)))
    }
}

/// A call on the disk in progress ([`BusyClock::start`]).
struct Busy<'a>(&'a BusyClock);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::Release);
    }
}

/// How long a writer waits for another to let go of the folder: long enough for a command's one record (it
/// opens, writes, seals and closes in well under a second), short enough that a second proxy on the folder stops
/// soon with its reason.
pub const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl SegmentWriter {
    pub(super) fn new(cfg: AuditConfig, healthy: Arc<AtomicBool>) -> Self {
        Self {
            cfg,
            healthy,
            busy: Arc::default(),
            segment: None,
            seq: 0,
            prev: HexDigest::GENESIS,
            buf: Vec::with_capacity(64 * 1024),
            metrics: None,
            failed_writes: 0,
            failure_reported: None,
            lock: None,
        }
    }

    /// Takes the folder's writer lock (once), before anything in the folder is read or changed, waiting up to
    /// [`WRITER_WAIT`] for another writer to let go.
    fn lock_folder(&mut self) -> io::Result<()> {
        if self.lock.is_none() {
            self.lock = Some(lock_dir(&self.cfg.dir, WRITER_WAIT)?);
        }
        Ok(())
    }

    fn set_healthy(&self, healthy: bool) {
        set_healthy(&self.healthy, healthy, &self.cfg.dir);
    }
    /// Chains and writes encoded records in one write; on failure rolls the segment back and leaves the chain
    /// where it was.
    fn append<'r>(&mut self, records: impl Iterator<Item = &'r Encoded>) -> io::Result<()> {
        if !self.ensure_open() {
            return Err(io::Error::other("no writable audit segment"));
        }
        self.buf.clear();
        let (mut seq, mut prev) = (self.seq, self.prev);
        for record in records {
            seq += 1;
            let link = ChainLink {
                seq,
                instance: &self.cfg.instance,
                prev: &prev,
            };
            prev = record.write(link, &mut self.buf);
        }
        let Some(segment) = self.segment.as_mut() else {
            return Err(io::Error::other("no writable audit segment"));
        };
        let written = {
            let _busy = self.busy.start();
            (&*segment.file).write_all(&self.buf)
        };
        match written {
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

    /// Counts records written and times each batch.
    pub(super) fn set_metrics(&mut self, metrics: Option<AuditMetrics>) {
        self.metrics = metrics;
    }

    /// Writes one batch with one `write` and, as `how` says, fsyncs it (strict durability); counts it and times both
    /// (`ssp_audit_write_seconds`); then, as `how` says, moves to the next segment once this one has reached
    /// `audit.segment_size` (after the batch, so a batch never spans two segments). A failure is logged (once a second
    /// at most, with the count of failed writes since the last line, which a good write a second or more after it also
    /// reports) and turns the log unhealthy, unless the batch was records of a failed write written again; a good write
    /// makes it healthy again. `Ok` means written, and with `sync` also fsynced.
    pub(super) fn write_batch<'r>(
        &mut self,
        records: impl ExactSizeIterator<Item = &'r Encoded>,
        how: BatchWrite,
    ) -> io::Result<()> {
        let BatchWrite {
            sync,
            rotate,
            again,
        } = how;
        let started = Instant::now();
        let n = records.len() as u64;
        let result = self.append(records);
        let due = || {
            self.failure_reported
                .is_none_or(|at| at.elapsed() >= REPORT_EVERY)
        };
        match &result {
            Err(e) => {
                self.failed_writes += 1;
                if due() {
                    tracing::error!(error = %e, failed_writes = self.failed_writes, "audit write failed");
                    self.failed_writes = 0;
                    self.failure_reported = Some(Instant::now());
                }
            }
            Ok(()) if self.failed_writes > 0 && due() => {
                tracing::error!(
                    failed_writes = self.failed_writes,
                    "audit write failed (the last failures before this write went in)"
                );
                self.failed_writes = 0;
                self.failure_reported = Some(Instant::now());
            }
            Ok(()) => {}
        }
        if result.is_ok() || !again {
            self.set_healthy(result.is_ok());
        }
        result?;
        if sync && !self.sync() {
            return Err(io::Error::other("audit fsync failed"));
        }
        if let Some(m) = &self.metrics {
            m.records.inc_by(n);
            m.write_seconds.observe(started.elapsed().as_secs_f64());
        }
        if rotate && self.full() {
            self.rotate();
        }
        Ok(())
    }

    /// The segment has reached `audit.segment_size`: the next writer that may rotate does so before it writes.
    fn full(&self) -> bool {
        self.segment
            .as_ref()
            .is_some_and(|s| s.len >= self.cfg.segment_size)
    }

    /// Tests: the open segment's writes go to `file` from here on (`/dev/full`: each fails as on a full disk, and
    /// cannot be rolled back, so the next write opens a new segment).
    #[cfg(test)]
    pub(super) fn write_into(&mut self, file: File) {
        if let Some(segment) = self.segment.as_mut() {
            segment.file = Arc::new(file);
        }
    }

    /// The sequence number of the last record written: unchanged by a write that failed and was rolled back.
    pub(super) fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Whether a plain append is all the next write needs: a segment is open and not full. Otherwise the next write
    /// opens or rotates one (file creation and fsyncs), which is the writer thread's work, not a worker's.
    pub(super) fn appends_only(&self) -> bool {
        self.segment.is_some() && !self.full()
    }

    /// Moves to the next segment if this one is full (one a worker's write filled).
    pub(super) fn rotate_if_full(&mut self) {
        if self.full() {
            self.rotate();
        }
    }

    /// The file being appended to, for the batched-mode syncer (which fsyncs it while writes go on).
    pub(super) fn file(&self) -> Option<Arc<File>> {
        self.segment.as_ref().map(|s| Arc::clone(&s.file))
    }

    /// The audit folder, for log lines.
    pub(super) fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    pub(super) fn sync_now(&mut self) -> io::Result<()> {
        if let Some(segment) = &self.segment {
            let _busy = self.busy.start();
            segment.file.sync_data()?;
        }
        Ok(())
    }

    /// The clock of the write in progress ([`BusyClock`]), for readiness.
    pub(super) fn busy_clock(&self) -> Arc<BusyClock> {
        Arc::clone(&self.busy)
    }

    /// Fsyncs the segment; a failure is logged and turns the log unhealthy. True when synced.
    pub(super) fn sync(&mut self) -> bool {
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
    pub(super) fn seal(&mut self, why: SealReason) {
        if self.segment.is_none() {
            return;
        }
        let record = Encoded::new(&Record::sealed(why, None), Vec::new());
        if let Err(e) = self.append(std::iter::once(&record)) {
            tracing::error!(error = %e, "audit seal failed");
        }
    }

    /// Opens a writable segment if there is none: recovers the log on disk, then starts a new segment.
    pub(super) fn ensure_open(&mut self) -> bool {
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
        self.lock_folder()?;
        let mut segments = list_segments(&self.cfg.dir)?;
        // Recover from the newest segment backwards until one holds a record.
        let mut last_index = segments.last().map_or(0, |(i, _)| *i);
        while let Some((index, path)) = segments.pop() {
            let recovered = recover_segment(&path).map_err(|e| naming(&path, e))?;
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
                        let file = OpenOptions::new()
                            .append(true)
                            .open(&path)
                            .map_err(|e| naming(&path, e))?;
                        let len = file.metadata()?.len();
                        self.segment = Some(Segment {
                            file: Arc::new(file),
                            path: path.clone(),
                            index,
                            len,
                        });
                        let record =
                            Encoded::new(&Record::sealed(SealReason::Recovered, torn), Vec::new());
                        let sealed = self
                            .append(std::iter::once(&record))
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
    pub(super) fn rotate(&mut self) {
        self.seal(SealReason::Rotate);
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

/// The writer's metric handles: `ssp_audit_records_total`, `ssp_audit_write_seconds`,
/// `ssp_audit_writer_handoffs_total` (a worker's write was slow or failed, and the `ssp-audit` thread took over the
/// writing) and `ssp_audit_writes_on_thread` (1 while it has).
#[derive(Debug, Clone)]
pub struct AuditMetrics {
    pub records: prometheus::IntCounter,
    pub write_seconds: prometheus::Histogram,
    pub handoffs: prometheus::IntCounter,
    pub on_thread: prometheus::IntGauge,
}

/// Opens `dir` and takes an exclusive flock(2) on it (through rustix: std's `File::try_lock` is newer than the
/// crate's minimum Rust), waiting up to `wait` for another holder: the wait is a blocking flock on a duplicate of
/// the descriptor in a thread of its own, woken by the kernel when the lock is let go. Past `wait` the thread is
/// left blocked on a descriptor nobody else uses, and takes the lock for nobody if it is ever let go.
pub(super) fn lock_dir(dir: &Path, wait: std::time::Duration) -> io::Result<File> {
    use rustix::fs::{FlockOperation, flock};
    let file = File::open(dir).map_err(|e| naming(dir, e))?;
    let held = |e: rustix::io::Errno| {
        let e = io::Error::from(e);
        if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{}: the log is being written by another process (another `ssp serve` on this folder, or a \
                     command writing a record) and was not let go within {} s",
                    dir.display(),
                    wait.as_secs()
                ),
            )
        } else {
            naming(dir, e)
        }
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => return Ok(file),
        Err(e) if io::Error::from(e).kind() != io::ErrorKind::WouldBlock => return Err(held(e)),
        Err(_) => {}
    }
    // Same open file description: the lock the thread takes is this descriptor's too.
    let waiter = file.try_clone().map_err(|e| naming(dir, e))?;
    let (done, taken) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ssp-audit-lock".into())
        .spawn(move || {
            let _ = done.send(flock(&waiter, FlockOperation::LockExclusive));
        })
        .map_err(|e| naming(dir, e))?;
    match taken.recv_timeout(wait) {
        Ok(Ok(())) => Ok(file),
        Ok(Err(e)) => Err(held(e)),
        Err(_) => Err(held(rustix::io::Errno::WOULDBLOCK)),
    }
}

/// Sets the health flag that feeds readiness, and says so when it changes.
pub(super) fn set_healthy(flag: &AtomicBool, healthy: bool, dir: &Path) {
    if flag.swap(healthy, Ordering::AcqRel) != healthy {
        if healthy {
            tracing::info!(dir = %dir.display(), "audit log writable");
        } else {
            tracing::error!(dir = %dir.display(), "audit log NOT writable: requests are refused with 503");
        }
    }
}

/// `e` with the file it is about, for the operational log and the start failure.
fn naming(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

pub(super) fn segment_name(index: u64) -> String {
    format!("audit-{index:08}.jsonl")
}

/// Segment files in `dir`, in order.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
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
        hash: HexDigest,
        sealed: bool,
        /// Bytes of a torn last line and the file they were set aside in.
        torn: Option<(u64, String)>,
    },
}

/// How much of a segment's end recovery reads: far more than one record, far less than a segment.
pub(super) const TAIL_WINDOW: u64 = 1 << 20;

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
    let link: ChainFields = serde_json::from_slice(last).map_err(|e| {
        io::Error::other(format!(
            "{}: the last record does not parse ({e}); run `ssp audit verify`",
            path.display()
        ))
    })?;
    Ok(Recovered::Tail {
        seq: link.seq,
        hash: HexDigest::of(last),
        sealed: link.kind == "seal",
        torn,
    })
}

/// The chain fields of a written line, as recovery and `verify` read them back.
#[derive(serde::Deserialize)]
pub(super) struct ChainFields {
    pub(super) seq: u64,
    pub(super) kind: String,
    pub(super) prev: String,
}
