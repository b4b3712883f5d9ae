//! Tests' handles on the writer, with nothing of them in its loop: a log started without its `ssp-audit` thread,
//! whose turns the test runs by hand (the thread's own steps) or whose thread it starts later; the segment held as
//! a write stuck on a stalled disk holds it, or as a writing worker holds it; a full disk; what counts as a slow
//! write.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::on_worker::nanos;
use super::thread::Turns;
use super::{AuditLog, LINGER, SegmentWriter};
use crate::audit::{AuditConfig, AuditMetrics};

/// The segment held by a test, as a write stuck on a stalled disk holds it: workers find it held and queue their
/// records for the thread, and the thread waits for it before it takes any.
pub(in crate::audit) struct HeldSegment<'a> {
    _guard: MutexGuard<'a, Option<SegmentWriter>>,
}

/// The segment held by a worker that is writing, as [`WriterState::write_here`](super::WriterState) holds it:
/// records other workers queue meanwhile wake no thread, and [`WritingWorker::finish`] writes them, as that worker
/// does after its own write.
pub(in crate::audit) struct WritingWorker<'a> {
    segment: MutexGuard<'a, Option<SegmentWriter>>,
    /// What was queued when it took the segment, written first by `finish`.
    batch: Vec<super::Job>,
    log: &'a AuditLog,
}

/// Records the test took from the queue as the thread takes them (in flight: a request that stops waiting finds
/// them so), not yet written; the segment stays held until [`Taken::write`].
pub(in crate::audit) struct Taken<'a> {
    segment: MutexGuard<'a, Option<SegmentWriter>>,
    turns: Turns,
    log: &'a AuditLog,
}

impl AuditLog {
    /// A log whose threads have not started: what workers do not write waits in the queue until the test runs a
    /// turn by hand ([`AuditLog::write_queued`], [`AuditLog::take_queued`]) or starts the threads
    /// ([`AuditLog::start_thread`]), which [`AuditLog::close`] needs to seal the segment.
    pub(in crate::audit) fn start_without_thread(
        cfg: AuditConfig,
        metrics: Option<AuditMetrics>,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::without_threads(cfg, metrics, LINGER))
    }

    /// Starts the threads of a log started without them.
    pub(in crate::audit) fn start_thread(&self) {
        self.start_threads();
    }

    /// One turn of the thread, on the test's thread: takes what is queued and writes it.
    pub(in crate::audit) fn write_queued(&self) {
        self.take_queued().write();
    }

    /// The first half of the thread's turn: takes what is queued, under the segment's lock, and stops there, as a
    /// thread whose `write` is stuck on a frozen file system does.
    pub(in crate::audit) fn take_queued(&self) -> Taken<'_> {
        let segment = self.shared.segment();
        let mut turns = Turns::new(self.shared.durability(), LINGER);
        self.shared.take_batch(&mut turns);
        Taken {
            segment,
            turns,
            log: self,
        }
    }

    /// Holds the segment as a writing worker does ([`WritingWorker`]).
    pub(in crate::audit) fn hold_segment_writing(&self) -> WritingWorker<'_> {
        let segment = self.shared.segment();
        let mut batch = Vec::new();
        self.shared.start_writing(&mut batch);
        WritingWorker {
            segment,
            batch,
            log: self,
        }
    }

    /// The disk fills: the open segment's writes fail from here on (`ENOSPC`, from `/dev/full`), and the next
    /// write after one that failed opens a new segment, as on a disk with room again.
    pub(in crate::audit) fn fill_disk(&self) {
        if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
            self.write_segment_into(full);
        }
    }

    /// The open segment's writes go to `file` from here on (a pipe nobody reads: a write that does not return).
    pub(in crate::audit) fn write_segment_into(&self, file: std::fs::File) {
        if let Some(writer) = self.shared.segment().as_mut() {
            writer.write_into(file);
        }
    }

    /// How many records are queued, and how many a failed write left to be written again.
    pub(in crate::audit) fn queued_and_unwritten(&self) -> (usize, usize) {
        let queue = self.shared.lock();
        (queue.jobs.len(), queue.unwritten.len())
    }

    /// Makes the records a failed write left due to be written again now (instead of a second after the failure),
    /// and says how many the next attempt takes.
    pub(in crate::audit) fn retry_now(&self) -> usize {
        let mut queue = self.shared.lock();
        queue.retry_at = Some(std::time::Instant::now());
        queue.retry_chunk()
    }

    /// Holds the segment until the value is dropped ([`HeldSegment`]).
    pub(in crate::audit) fn hold_segment(&self) -> HeldSegment<'_> {
        HeldSegment {
            _guard: self.shared.segment(),
        }
    }

    /// Sets what counts as a slow write and how long the thread's writes must be fast before the workers write
    /// again.
    pub(in crate::audit) fn tune(&self, slow_write: Duration, hand_back_after: Duration) {
        self.shared
            .slow_write
            .store(nanos(slow_write), Ordering::Relaxed);
        self.shared
            .hand_back_after
            .store(nanos(hand_back_after), Ordering::Relaxed);
    }
}

impl WritingWorker<'_> {
    /// The rest of the worker's turn: writes what other workers queued meanwhile, then lets go.
    pub(in crate::audit) fn finish(mut self) {
        if let Some(writer) = self.segment.as_mut() {
            self.log
                .shared
                .write_rounds(writer, &mut self.batch, &mut Vec::new(), 0);
        }
    }
}

impl Taken<'_> {
    /// The second half of the turn: writes the taken records and lets go of the segment.
    pub(in crate::audit) fn write(mut self) {
        if let Some(writer) = self.segment.as_mut() {
            self.log.shared.write_taken(writer, &mut self.turns);
        }
    }
}
