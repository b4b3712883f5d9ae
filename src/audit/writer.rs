//! The writer. In batched mode each worker writes its own records: the records staged in one turn of a worker's
//! event loop are chained and written by that worker with one `write` once the turn's ready tasks have staged
//! theirs, and the requests waiting on them are woken on that thread (`stage`), so that in steady state no request
//! waits on another thread. The segment files sit behind one lock (one chain per instance); a worker that finds it
//! held by another writer does not wait for it, but queues its records: a worker holding it writes them after its
//! own (up to three writes in all, `on_worker::COMBINED_WRITES`), and otherwise the `ssp-audit` thread, woken for
//! them, takes the lock after the holder. A write that takes longer than [`SLOW_WRITE`] (5 ms) or fails hands all
//! writing to that thread until its writes have been fast for [`HAND_BACK_AFTER`] (1 s): a slow disk then holds no
//! worker's other connections (the operational log says so, and `ssp_audit_writer_handoffs_total` counts it). A
//! write that stalls outright (a frozen file system) holds the worker that issued it until the disk answers; every
//! other worker has handed off by then. A write that fails and is cut back (a full disk) keeps the records of it
//! that nobody waits for; the thread writes them again, apart from new records, a second after the failure, or at
//! once after a write that succeeds (`writer/unwritten.rs`).
//!
//! `ssp-audit` also writes every record in strict mode, with one fsync after each batch (up to `MAX_BATCH` records)
//! that acknowledges every record in it, and the records of runtimes that are not workers. In batched mode a record
//! is acknowledged once written (to the page cache), and `ssp-audit-sync` fsyncs the segment `audit.fsync_interval`
//! after the first write since its last fsync, so that writes go on during an fsync. Recovery and the first
//! segment's open happen in `AuditLog::start_with_metrics`, which the proxy calls on a blocking thread. Rotation
//! and reopening are the thread's too: a worker that finds the segment full (its own write may have filled it) or
//! not open hands its records to the thread, which rotates before it writes them, so no worker waits on a seal's
//! fsync or a file's creation.
//!
//! Nothing polls. The writer waits on a condition variable that a queued record or `close` signals, except that
//! for `LINGER` (2 ms) after a write that came within `LINGER` of the one before (records are streaming in), only a
//! `request` record (or a full batch) signals it: `response` records then go out with the next request record's
//! write instead of waking the thread for one of their own. When the linger ends they are written, and with nothing
//! queued the thread sleeps with no deadline. A worker that writes its own records lingers by the same rule: its
//! `response` records wait on the worker for its next request record's flush, or its linger task's timer
//! (`stage::Linger`), one per linger. The syncer waits on a condition variable that the first write after
//! an fsync signals, then lets its interval pass; a request waits on its own `Slot`; a request that finds the queue
//! full waits on a semaphore whose places come back once the writer has written the records holding them.
//!
//! The thread's turn is in `thread`; tests drive the same steps by hand on a log started without the thread
//! (`by_hand`), so that nothing in the loop exists for them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::record::{Encoded, Record};
use super::segment::{AuditMetrics, BusyClock, SegmentWriter};
use crate::config::{AuditConfig, Durability};

#[cfg(test)]
mod by_hand;
mod on_worker;
mod open;
mod slot;
mod stage;
mod thread;
mod unwritten;

pub(crate) use open::Open;

use on_worker::{HAND_BACK_AFTER, SLOW_WRITE, nanos};

#[cfg(test)]
pub(in crate::audit) use slot::NotWritten;
use slot::Slot;
use slot::Ticket;

#[cfg(test)]
pub(super) use stage::STAGE_LIMIT;

/// Records written in one batch at most.
pub(super) const MAX_BATCH: usize = 1024;
/// Spare record buffers the writer keeps for the workers at most, and the largest one it keeps (a larger one, from
/// a refusal with a long target, is freed): the buffers of written records go back to the threads that encode
/// records, so that once they circulate a record's text costs no allocation. Those it cannot keep, it frees.
const SPARE_BUFFERS: usize = 1024;
const SPARE_BUFFER_MAX: usize = 4096;
/// Records waiting for the writer at most; past this, request records wait up to [`SUBMIT_WAIT`].
pub(super) const QUEUE_CAPACITY: usize = 8192;
/// Records queued at most in all, counting those that do not wait (response records, refusals): a bound on memory
/// while the disk stalls. Past it a record is dropped and the operational log says so.
pub(super) const QUEUE_LIMIT: usize = 8 * QUEUE_CAPACITY;
/// How long a request waits for room in the queue before it is refused with 503 `AUDIT_UNAVAILABLE`.
const SUBMIT_WAIT: Duration = Duration::from_millis(100);
/// A `write` or fsync of the log that has not returned for this long makes the instance unready
/// ([`AuditLog::stalled`]): well past a slow disk's (a hand-off is at 5 ms), well before a request waiting for its
/// record gives up (5 s).
const STALLED_WRITE: Duration = Duration::from_secs(1);

/// How long a request waits for its record to be written (and, in strict mode, fsynced).
const ACK_WAIT: Duration = Duration::from_secs(5);
/// After a write, how long `response` records may wait in the queue for the next `request` record, so that they
/// share its wake-up and its `write` (and in strict mode its fsync) instead of costing one of each. Request records
/// never wait: a permitted request waits for its own, and a refused one is answered without waiting.
pub(super) const LINGER: Duration = Duration::from_millis(2);

/// The audit log could not take a record in time: the request must not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("audit log unavailable")
    }
}

impl std::error::Error for Unavailable {}

/// A record waiting to be written; its slot, if a request waits for it (none for records nobody waits for); the
/// group slot of its worker's turn, if it was staged; the slot of an earlier request record it must follow into the
/// log (see [`slot::InFlight`]); its place in the queue's capacity, given back when the thread takes it.
struct Job {
    record: Encoded,
    slot: Option<Arc<Slot>>,
    group: Option<Arc<Slot>>,
    after: Option<Arc<Slot>>,
    _room: Option<OwnedSemaphorePermit>,
}

impl Job {
    /// A request record, or one a request waits for: it ends the writer's linger.
    fn is_urgent(&self) -> bool {
        self.slot.is_some() || self.record.is_request()
    }

    /// The writer takes the job: false if its record must not be written (its request withdrew it, or the
    /// request record it follows was not written). A withdrawn record counts as handled in its group.
    fn take(&self) -> bool {
        let take = self.slot.as_ref().is_none_or(|slot| slot.take())
            && self.after.as_ref().is_none_or(|slot| slot.written());
        if !take && let Some(group) = &self.group {
            group.group_record_done(true);
        }
        take
    }

    /// The writer is through with the job's record: its request, or its group's flush task, learns the result.
    fn done(&self, written: bool) {
        if let Some(slot) = &self.slot {
            slot.record_done(written, self.group.is_none());
        }
        if let Some(group) = &self.group {
            group.group_record_done(written);
        }
    }
}

/// A reserved place in the queue's capacity ([`AuditLog::reserve`]).
#[derive(Debug)]
pub(crate) struct Room(OwnedSemaphorePermit);

/// The handle the request path holds.
pub struct AuditLog {
    shared: Arc<WriterState>,
    /// The writer, and in batched mode the syncer.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct WriterState {
    /// The segment files and the chain; `None` once the log is sealed at close. Taken before `queue` by whoever
    /// holds both.
    segment: Mutex<Option<SegmentWriter>>,
    /// Whether workers write their own records: batched mode, while writes are fast.
    direct: AtomicBool,
    /// [`Queue::unwritten`] holds records, as of the last change to it (set under the queue's lock): read without
    /// it after every good write, which then makes them due at once.
    unwritten_kept: AtomicBool,
    /// Batched durability: workers may write.
    batched: bool,
    /// After a write that came within this of the one before, the thread lingers ([`LINGER`] outside tests).
    linger: Duration,
    /// Batched mode: how long after a write the syncer fsyncs it (`audit.fsync_interval`).
    fsync_interval: Duration,
    /// `audit.dir`, for the readiness file's messages.
    dir: std::path::PathBuf,
    /// When writing was last handed to the thread, while it is ([`SLOW_WRITE`]).
    handed_off: Mutex<Option<std::time::Instant>>,
    /// [`SLOW_WRITE`] and [`HAND_BACK_AFTER`], in nanoseconds (tests set others).
    slow_write: AtomicU64,
    hand_back_after: AtomicU64,
    metrics: Option<AuditMetrics>,
    queue: Mutex<Queue>,
    /// Wakes the thread: a record was queued while it waited, or the log is closing.
    wake: Condvar,
    /// [`QUEUE_CAPACITY`] places; a request record waits for one.
    room: Arc<Semaphore>,
    /// False after a failed write, open or fsync, true again after a good write: feeds readiness.
    healthy: Arc<AtomicBool>,
    /// The segment writer's clock of the `write` or fsync in progress, for readiness ([`AuditLog::stalled`]).
    busy: Arc<BusyClock>,
    /// Batched mode: what the syncer fsyncs, and whether anything was written since its last fsync.
    sync: Mutex<SyncState>,
    /// Wakes the syncer early: the log is closing.
    sync_wake: Condvar,
}

#[derive(Default)]
struct SyncState {
    file: Option<Arc<std::fs::File>>,
    dirty: bool,
    stop: bool,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Jobs among them that must not linger: request records, whether a request waits for them (a permitted
    /// request) or not (a refused one, answered at once).
    urgent: usize,
    /// What the thread is doing, which says which queued records must wake it.
    idle: Idle,
    /// A worker holds the segment and looks at the queue again before it lets go: what is queued meanwhile, it
    /// writes (or wakes the thread for), so a push need not wake the thread.
    writing: bool,
    /// Buffers of written records, for the next records ([`SPARE_BUFFERS`]).
    spare: Vec<Vec<u8>>,
    /// Records nobody waits for (response records, refusals' records) whose write failed and was rolled back, a
    /// full disk say, in their order; [`MAX_BATCH`] at most. Only the thread writes them again, a few at a time
    /// ([`unwritten::RETRY_CHUNK`] at most) and apart from what is queued, once `retry_at` has come
    /// ([`Queue::take_unwritten_into`]): they are not work that wakes anyone, so a disk that stays full is tried
    /// once a second, and new records are never held up behind them.
    unwritten: Vec<Job>,
    /// When the thread writes `unwritten` again: a second after a failed write, at once after a good one.
    retry_at: Option<Instant>,
    /// How many times the chunk of `unwritten` written again has been halved: once more after each of its writes
    /// that failed, so that a disk with less room than [`unwritten::RETRY_CHUNK`] records still takes some, and once
    /// less after each that went in.
    retry_halvings: u32,
    /// Records given up (past [`MAX_BATCH`] kept) since the operational log last said so, and when it did
    /// (`segment::REPORT_EVERY`).
    lost: usize,
    lost_reported: Option<Instant>,
    closed: bool,
}

/// The writer thread's state, as the queue sees it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Taking or writing records: it looks at the queue again before it waits.
    #[default]
    Busy,
    /// Waiting, at most [`LINGER`] after its last write: only a request record (or a full batch) wakes it.
    Lingering,
    /// Waiting with no deadline: any record wakes it.
    Asleep,
}

impl Queue {
    fn has_work(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// Moves up to [`MAX_BATCH`] queued records to the front of `batch` (they were queued before anything in it),
    /// keeping the count of urgent ones.
    fn take_into(&mut self, batch: &mut Vec<Job>) {
        let n = self.jobs.len().min(MAX_BATCH);
        self.urgent -= self.jobs[..n].iter().filter(|job| job.is_urgent()).count();
        batch.splice(0..0, self.jobs.drain(..n));
    }

    /// Work that must not wait: a request record, a full batch, or a closing log.
    fn has_urgent_work(&self) -> bool {
        self.closed || (self.has_work() && (self.urgent > 0 || self.jobs.len() >= MAX_BATCH))
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .finish_non_exhaustive()
    }
}

impl WriterState {
    /// Queues jobs and wakes the thread if it waits; gives back those that could not be queued (the log is closed
    /// or [`QUEUE_LIMIT`] is reached).
    fn push(&self, jobs: impl IntoIterator<Item = Job>) -> Vec<Job> {
        self.push_and_refill(jobs, &mut Vec::new(), 0)
    }

    /// As [`WriterState::push`], and moves up to `want` spare buffers into `buffers`.
    fn push_and_refill(
        &self,
        jobs: impl IntoIterator<Item = Job>,
        buffers: &mut Vec<Vec<u8>>,
        want: usize,
    ) -> Vec<Job> {
        let mut refused = Vec::new();
        let mut queue = self.lock();
        let spare = queue.spare.len();
        buffers.extend(queue.spare.drain(spare - want.min(spare)..));
        for job in jobs {
            if queue.closed || queue.jobs.len() >= QUEUE_LIMIT {
                refused.push(job);
            } else {
                queue.urgent += usize::from(job.is_urgent());
                queue.jobs.push(job);
            }
        }
        if !queue.writing {
            self.wake_if_waiting(queue);
        }
        refused
    }

    /// Wakes the thread if it waits and what is queued must not wait (a lingering thread waits for a request
    /// record or a full batch; a sleeping one for anything), and lets go of the queue.
    fn wake_if_waiting(&self, mut queue: MutexGuard<'_, Queue>) {
        let wake = match queue.idle {
            Idle::Busy => false,
            Idle::Lingering => queue.has_urgent_work(),
            Idle::Asleep => queue.has_work(),
        };
        if wake {
            queue.idle = Idle::Busy;
        }
        // Woken after the lock is let go: woken under it, the writer would run (often on this core, at once) only
        // to block on the lock this thread still holds, and each side would sleep and wake once more.
        drop(queue);
        if wake {
            self.wake.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sync_state(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn segment(&self) -> MutexGuard<'_, Option<SegmentWriter>> {
        self.segment.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a good write: in batched mode, tells the syncer there is something to fsync (waking it only when this
    /// starts a new interval: it waits out the rest itself), after letting go of its lock, as `wake_if_waiting` does.
    fn mark_dirty(&self, writer: &SegmentWriter) {
        let mut sync = self.sync_state();
        sync.file = writer.file();
        let starts = !std::mem::replace(&mut sync.dirty, true);
        drop(sync);
        if starts {
            self.sync_wake.notify_one();
        }
    }
}

impl AuditLog {
    /// Starts the log. It recovers the log (setting aside a torn tail) and opens a new segment; if it cannot, the
    /// log starts unhealthy (every request is refused with 503) and retries on each write.
    #[cfg(test)]
    pub(crate) fn start(cfg: AuditConfig) -> Arc<Self> {
        Self::start_with_metrics(cfg, None)
    }

    /// As `AuditLog::start` (tests), counting records written and timing each batch.
    pub(crate) fn start_with_metrics(cfg: AuditConfig, metrics: Option<AuditMetrics>) -> Arc<Self> {
        Self::start_lingering(cfg, metrics, LINGER)
    }

    /// As [`AuditLog::start_with_metrics`], with `linger` in place of [`LINGER`] (tests set it).
    pub(super) fn start_lingering(
        cfg: AuditConfig,
        metrics: Option<AuditMetrics>,
        linger: Duration,
    ) -> Arc<Self> {
        let log = Self::without_threads(cfg, metrics, linger);
        log.start_threads();
        Arc::new(log)
    }

    /// The log with its first segment open (or not: then it is unhealthy), before its threads start.
    fn without_threads(cfg: AuditConfig, metrics: Option<AuditMetrics>, linger: Duration) -> Self {
        let healthy = Arc::new(AtomicBool::new(false));
        let (durability, fsync_interval) = (cfg.durability, cfg.fsync_interval);
        let mut writer = SegmentWriter::new(cfg, Arc::clone(&healthy));
        writer.set_metrics(metrics.clone());
        // Open before returning (the one piece of file I/O on the caller's thread, at start), so that a healthy
        // log is healthy from the first request.
        writer.ensure_open();
        let dir = writer.dir().to_path_buf();
        let busy = writer.busy_clock();
        let batched = durability == Durability::Batched;
        let shared = Arc::new(WriterState {
            segment: Mutex::new(Some(writer)),
            direct: AtomicBool::new(batched),
            unwritten_kept: AtomicBool::new(false),
            batched,
            linger,
            fsync_interval,
            dir,
            handed_off: Mutex::new(None),
            slow_write: AtomicU64::new(nanos(SLOW_WRITE)),
            hand_back_after: AtomicU64::new(nanos(HAND_BACK_AFTER)),
            metrics,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            room: Arc::new(Semaphore::new(QUEUE_CAPACITY)),
            healthy,
            busy,
            sync: Mutex::new(SyncState::default()),
            sync_wake: Condvar::new(),
        });
        Self {
            shared,
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Starts `ssp-audit` (and in batched mode `ssp-audit-sync`). If one cannot start, the log is closed and
    /// unhealthy: every request is refused with 503.
    fn start_threads(&self) {
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = thread::spawn(&self.shared, &mut threads) {
            tracing::error!(error = %e, "cannot start the audit threads: requests are refused with 503");
            self.shared.healthy.store(false, Ordering::Release);
            self.shared.direct.store(false, Ordering::Release);
            self.shared.lock().closed = true;
        }
    }

    /// A `write` of the log (or a strict-mode fsync) has not returned for [`STALLED_WRITE`] or more: the disk has
    /// stalled (a frozen file system, a failing device) without failing the call, and requests wait for their
    /// records. `/readyz` reports it, so that a balancer takes the instance out of rotation.
    pub(crate) fn stalled(&self) -> bool {
        self.shared
            .busy
            .busy_for()
            .is_some_and(|taken| taken >= STALLED_WRITE)
    }

    pub(crate) fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// Records queued and not yet taken by the writer.
    pub(crate) fn queue_depth(&self) -> u64 {
        self.shared.lock().jobs.len() as u64
    }

    /// Queues a record and waits until it is written (batched) or fsynced (strict). A request may be forwarded
    /// only after this returns `Ok`. Waits at most 100 ms for room in the queue and 5 s for the write. The request
    /// path takes the same three steps itself ([`AuditLog::reserve`], [`AuditLog::queue`], [`Ticket::written`]),
    /// so that its exchange exists from the moment the record is queued.
    ///
    /// On a single-threaded runtime (each `server.workers` thread runs one) the record is staged with the others
    /// of the same turn of that runtime and handed to the writer with them (see [`Stage`]); a staged record holds
    /// its place in the queue's capacity, so the bounds hold.
    #[cfg(test)]
    pub(crate) async fn write(&self, record: Record) -> Result<(), Unavailable> {
        let room = self.reserve().await?;
        self.queue(record, room)?
            .written()
            .await
            .map_err(|_| Unavailable)
    }

    /// A place in the queue's capacity for a request record, waiting at most 100 ms for one.
    pub(in crate::audit) async fn reserve(&self) -> Result<Room, Unavailable> {
        tokio::time::timeout(SUBMIT_WAIT, Arc::clone(&self.shared.room).acquire_owned())
            .await
            .map_err(|_| Unavailable)?
            .map(Room)
            .map_err(|_| Unavailable)
    }

    /// Queues (or stages) a request record in its reserved place, at once: from here on it will be written
    /// whatever becomes of the request. The ticket says when it is.
    pub(in crate::audit) fn queue(
        &self,
        record: Record,
        room: Room,
    ) -> Result<Ticket, Unavailable> {
        let slot = Arc::new(Slot::for_records(1));
        let job = Job {
            record: Encoded::new(&record, stage::spare_buffer()),
            slot: Some(Arc::clone(&slot)),
            group: None,
            after: None,
            _room: Some(room.0),
        };
        // A staged record's wait is bounded by its flush task, which its thread's watch fails after ACK_WAIT: no
        // timer per request or per flush (setting one wakes the worker's event loop through a system call).
        let deadline = match self.stage(job) {
            Ok(()) => None,
            Err(job) => {
                if !self.shared.push([job]).is_empty() {
                    return Err(Unavailable);
                }
                Some(tokio::time::Instant::now() + ACK_WAIT)
            }
        };
        Ok(Ticket { slot, deadline })
    }

    /// Queues a record without waiting for it to be written (response records, refusals). It takes a place in the
    /// queue's capacity while there is one, and is queued anyway up to [`QUEUE_LIMIT`], so that an exchange's
    /// response record is not lost to a burst. A record that cannot be queued (the log is closed, or the disk has
    /// stalled that long) is reported in the operational log, never dropped silently.
    ///
    /// On a worker's runtime it is staged with the turn's other records, up to
    /// [`STAGE_LIMIT`](stage::STAGE_LIMIT) of its kind.
    pub(crate) fn submit(&self, record: Record) {
        self.submit_job(record, None);
    }

    fn submit_job(&self, record: Record, after: Option<Arc<Slot>>) {
        let job = Job {
            record: Encoded::new(&record, stage::spare_buffer()),
            slot: None,
            group: None,
            after,
            _room: Arc::clone(&self.shared.room).try_acquire_owned().ok(),
        };
        if let Err(job) = self.stage(job) {
            report_refused(self.shared.push([job]).len());
        }
    }

    /// Writes what is queued, seals the current segment, fsyncs and stops the threads; waits for them. Later
    /// writes are refused.
    pub(crate) fn close(&self) {
        stage::release_held(&self.shared);
        {
            let mut queue = self.shared.lock();
            queue.closed = true;
            self.shared.wake.notify_one();
        }
        self.shared.room.close();
        // Held while joining, so that a second `close` at the same time returns only once the log is sealed.
        let mut held = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        // The writer first (it seals and fsyncs the segment), then the syncer.
        let mut threads = std::mem::take(&mut *held).into_iter();
        if let Some(writer) = threads.next()
            && writer.join().is_err()
        {
            tracing::error!("the audit writer thread panicked");
        }
        {
            let mut sync = self.shared.sync_state();
            sync.stop = true;
            self.shared.sync_wake.notify_one();
        }
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("the audit sync thread panicked");
            }
        }
    }
}

impl Drop for AuditLog {
    /// Dropping the log closes it, as a clean stop would.
    fn drop(&mut self) {
        self.close();
    }
}

/// Says that records could not be queued, never silently.
fn report_refused(records: usize) {
    if records > 0 {
        tracing::error!(
            records,
            "audit log closed or its queue full: records could not be queued"
        );
    }
}
