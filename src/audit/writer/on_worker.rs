//! Writing on the worker: in batched mode a worker writes its turn's records itself ([`WriterState::write_here`]),
//! unless another writer holds the segment or writes have turned slow; a slow or failed write hands all writing to
//! the `ssp-audit` thread, which gives it back once its own writes have been fast for [`HAND_BACK_AFTER`].

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Job, SegmentWriter, WriterState};
use crate::audit::segment::BatchWrite;

/// A worker's write that takes longer than this hands writing to the `ssp-audit` thread: long enough for a
/// page-cache write of a large batch under load (they take tens of microseconds), short enough that a disk that has
/// turned slow holds a worker's connections once, for a few milliseconds.
pub(in crate::audit) const SLOW_WRITE: Duration = Duration::from_millis(5);
/// How long the thread's writes must have been fast, after a hand-off, before the workers write again.
pub(in crate::audit) const HAND_BACK_AFTER: Duration = Duration::from_secs(1);
/// Writes a worker makes at most once it holds the segment: its own turn's records, then those other workers
/// queued while it wrote. Enough for two workers whose turns meet at the lock; few enough that writing for others
/// holds this worker's own connections for a few page-cache writes at most.
const COMBINED_WRITES: usize = 3;

/// A worker writing with the queue's `writing` flag set; dropped, the worker is through: the flag is cleared, and
/// what is queued wakes the thread as a push would have.
struct Writing<'a>(&'a WriterState);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.writing = false;
        self.0.wake_if_waiting(queue);
    }
}

impl WriterState {
    /// A worker writes `staged` (its turn's records) itself, with whatever waits in the queue before them, in one
    /// `write`, and settles each record's request on this thread. False, with `staged` untouched, when it must not:
    /// workers do not write now ([`SLOW_WRITE`], strict mode), another writer holds the segment, the segment is full
    /// or not open (rotating and opening are the thread's: file creation and fsyncs), or the log is sealed. Written
    /// buffers go to `spare`, up to `keep` of them.
    ///
    /// While it writes, the queue says so (`Queue::writing`): a worker that finds the segment held then queues its
    /// records without waking the thread, and this one writes them after its own, in up to [`COMBINED_WRITES`]
    /// writes in all, so that two workers' turns meeting at the lock cost one more `write` rather than a wake-up
    /// and a turn of the thread. What is still queued when it lets go, it wakes the thread for.
    pub(super) fn write_here(
        &self,
        staged: &mut Vec<Job>,
        spare: &mut Vec<Vec<u8>>,
        keep: usize,
    ) -> bool {
        if !self.direct.load(Ordering::Acquire) {
            return false;
        }
        let mut segment = match self.segment.try_lock() {
            Ok(segment) => segment,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        // Opening or rotating a segment (file creation, fsyncs) is left to the thread.
        let Some(writer) = segment.as_mut().filter(|w| w.appends_only()) else {
            return false;
        };
        // The stage's own list is the batch (no allocation per turn), given back empty below. Records queued before
        // these (another worker's, when it found the segment held) go first.
        let mut batch = std::mem::take(staged);
        self.start_writing(&mut batch);
        let handed_off = self.write_rounds(writer, &mut batch, spare, keep);
        *staged = batch;
        drop(segment);
        if let Some((took, written)) = handed_off {
            self.hand_off(took, written);
        }
        true
    }

    /// A worker that holds the segment says so in the queue (`Queue::writing`) and takes what waits there, ahead
    /// of `batch`. [`Self::write_rounds`] must follow: it clears the flag.
    pub(super) fn start_writing(&self, batch: &mut Vec<Job>) {
        let mut queue = self.lock();
        queue.writing = true;
        queue.take_into(batch);
    }

    /// The writes of a worker that holds the segment (and has said so in the queue): `batch`, then what other
    /// workers queue meanwhile, in [`COMBINED_WRITES`] writes at most; then it lets go of the queue (`Writing`).
    /// The time and result of a write that was slow or failed, after which it stopped: writing is to be handed off.
    /// `batch` is left empty.
    pub(super) fn write_rounds(
        &self,
        writer: &mut SegmentWriter,
        batch: &mut Vec<Job>,
        spare: &mut Vec<Vec<u8>>,
        keep: usize,
    ) -> Option<(Duration, bool)> {
        // Lets go of the queue however this ends, a panic included: a flag left set would keep pushes from waking
        // the thread.
        let _writing = Writing(self);
        let mut writes = 0;
        let mut hand_off = None;
        loop {
            // Taken under the segment's lock, as the thread takes its records: a record that follows another finds
            // that one's write ended.
            batch.retain(Job::take);
            if !batch.is_empty() {
                writes += 1;
                let started = std::time::Instant::now();
                let written = writer
                    .write_batch(
                        batch.iter().map(|job| &job.record),
                        BatchWrite {
                            sync: false,
                            rotate: false,
                            again: false,
                        },
                    )
                    .is_ok();
                let took = started.elapsed();
                if written {
                    self.mark_dirty(writer);
                }
                // Without an fsync, a write that failed was rolled back.
                self.settle_batch(batch, written, (!written, false), spare, keep);
                if !written || self.slow(took) {
                    hand_off = Some((took, written));
                    break;
                }
            }
            // Records other workers queued meanwhile, while there is room for them.
            let mut queue = self.lock();
            if queue.jobs.is_empty() || writes >= COMBINED_WRITES || !writer.appends_only() {
                break;
            }
            queue.take_into(batch);
        }
        hand_off
    }

    /// Whether a write that took `took` was slow ([`SLOW_WRITE`]).
    fn slow(&self, took: Duration) -> bool {
        nanos(took) > self.slow_write.load(Ordering::Relaxed)
    }

    /// A worker's write was slow or failed: the `ssp-audit` thread writes every record until its writes have been
    /// fast for [`HAND_BACK_AFTER`].
    fn hand_off(&self, took: Duration, written: bool) {
        if !self.direct.swap(false, Ordering::AcqRel) {
            return;
        }
        *self
            .handed_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now());
        if let Some(m) = &self.metrics {
            m.handoffs.inc();
            m.on_thread.set(1);
        }
        tracing::warn!(
            took_ms = took.as_secs_f64() * 1000.0,
            written,
            "audit write slow or failed on a worker: the ssp-audit thread writes every record until writes are fast again"
        );
    }

    /// After the thread's write in batched mode: gives writing back to the workers once writes have been fast for
    /// [`HAND_BACK_AFTER`] since the hand-off.
    pub(super) fn maybe_hand_back(&self, took: Duration, written: bool) {
        let mut handed_off = self
            .handed_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *handed_off {
            Some(_) if !written || self.slow(took) => {
                // Still slow: the wait starts again.
                *handed_off = Some(std::time::Instant::now());
            }
            Some(since)
                if nanos(since.elapsed()) >= self.hand_back_after.load(Ordering::Relaxed) =>
            {
                *handed_off = None;
                drop(handed_off);
                self.direct.store(true, Ordering::Release);
                if let Some(m) = &self.metrics {
                    m.on_thread.set(0);
                }
                tracing::info!("audit writes fast again: workers write their own records");
            }
            _ => {}
        }
    }
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
