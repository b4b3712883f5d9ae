//! The records of a failed write that nobody waits for (response records of answered requests, refused requests'
//! records): kept in [`Queue::unwritten`] instead of lost, and written again by the `ssp-audit` thread alone, apart
//! from new records, a few at a time, a second after a failure or at once after a write that went in.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Idle, Job, MAX_BATCH, Queue, SPARE_BUFFER_MAX, WriterState};
use crate::audit::segment::REPORT_EVERY;

/// How long after a failed write the thread writes again the records of it that nobody waits for
/// ([`Queue::unwritten`]): one attempt a second at most on a disk that stays full.
const RETRY_UNWRITTEN: Duration = Duration::from_secs(1);

/// How many of those one write takes at most (halved after each failed attempt, doubled after each good one,
/// [`Queue::retry_chunk`]): a disk with a little room again takes them a few at a time, not only once all of them
/// fit at once.
pub(super) const RETRY_CHUNK: usize = 64;

impl Queue {
    /// Moves the first `n` of [`Queue::unwritten`] into `batch` (empty: the thread writes them apart from new
    /// records, so that a failed write of them puts them back where they were).
    pub(super) fn take_unwritten_into(&mut self, batch: &mut Vec<Job>, n: usize) {
        let n = n.min(self.unwritten.len());
        batch.splice(0..0, self.unwritten.drain(..n));
    }

    /// How many of `unwritten` the thread writes again in one write: [`RETRY_CHUNK`], halved after each failed
    /// attempt and doubled after each good one, one at least.
    pub(super) fn retry_chunk(&self) -> usize {
        (RETRY_CHUNK >> self.retry_halvings).max(1)
    }

    /// Counts records given up and says so in the operational log once per [`REPORT_EVERY`] at most (`closing`:
    /// now, with any count not yet said).
    pub(super) fn report_lost(&mut self, records: usize, closing: bool) {
        self.lost += records;
        let due = self
            .lost_reported
            .is_none_or(|at| at.elapsed() >= REPORT_EVERY);
        if self.lost > 0 && (due || closing) {
            tracing::error!(
                records = self.lost,
                "audit writes keep failing: records nobody waits for, past the 1,024 kept to be written again, are lost"
            );
            self.lost = 0;
            self.lost_reported = Some(Instant::now());
        }
    }

    /// Records a failed write left are to be written again now.
    pub(super) fn retry_due(&self) -> bool {
        !self.unwritten.is_empty() && self.retry_at.is_some_and(|at| at <= Instant::now())
    }

    /// Keeps the records of a failed write that nobody waits for ([`Queue::unwritten`]): back at the front if they
    /// were taken from it (`retried`), else after those kept before; gives back those past [`MAX_BATCH`]. The thread
    /// tries them again [`RETRY_UNWRITTEN`] from now.
    pub(super) fn keep_unwritten(&mut self, jobs: &mut Vec<Job>, retried: bool) -> Vec<Job> {
        let room = MAX_BATCH.saturating_sub(self.unwritten.len());
        let over = jobs.split_off(room.min(jobs.len()));
        if retried {
            self.unwritten.splice(0..0, jobs.drain(..));
        } else {
            self.unwritten.append(jobs);
        }
        self.retry_at = Some(Instant::now() + RETRY_UNWRITTEN);
        over
    }
}

impl WriterState {
    /// Ends a batch's write: tells each record's request or group whether it was `written`, and keeps its buffer in
    /// `spare` (`keep` at most). After a write that failed and was rolled back (`rolled_back`: nothing of it is in
    /// the log), the records nobody waits for (response records, refusals') are kept to be written again instead of
    /// lost ([`Queue::unwritten`]; `retried`: the batch was some of those); those past its bound are given up, and
    /// the operational log says how many.
    pub(super) fn settle_batch(
        &self,
        batch: &mut Vec<Job>,
        written: bool,
        (rolled_back, retried): (bool, bool),
        spare: &mut Vec<Vec<u8>>,
        keep: usize,
    ) {
        let mut kept = Vec::new();
        for job in batch.drain(..) {
            if rolled_back && job.slot.is_none() {
                kept.push(job);
                continue;
            }
            job.done(written);
            let buffer = job.record.into_buffer();
            if spare.len() < keep && buffer.capacity() <= SPARE_BUFFER_MAX {
                spare.push(buffer);
            }
        }
        // Records kept from a failed write: after a good write the disk has room, so they are due at once; after
        // another failed write, a second from now.
        if kept.is_empty() && !(written && self.unwritten_kept.load(Ordering::Relaxed)) {
            return;
        }
        let mut queue = self.lock();
        if kept.is_empty() {
            queue.retry_at = Some(Instant::now());
            if retried {
                queue.retry_halvings = queue.retry_halvings.saturating_sub(1);
            }
        } else {
            if retried {
                queue.retry_halvings = (queue.retry_halvings + 1).min(RETRY_CHUNK.ilog2());
            }
            let lost = queue.keep_unwritten(&mut kept, retried);
            queue.report_lost(lost.len(), false);
        }
        self.unwritten_kept
            .store(!queue.unwritten.is_empty(), Ordering::Relaxed);
        // A sleeping thread wakes to time the retry (the write was a worker's; the thread's own is busy).
        let asleep = queue.idle == Idle::Asleep;
        drop(queue);
        if asleep {
            self.wake.notify_one();
        }
    }
}
