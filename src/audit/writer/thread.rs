//! The `ssp-audit` thread, which writes what the workers do not (strict mode, records of runtimes that are not
//! workers, records a worker queued because the segment was held, full or not open, and everything while writing
//! is handed off), and the batched-mode `ssp-audit-sync` thread. Each turn of the writer is three steps:
//! [`WriterState::wait_for_work`], then under the segment's lock [`WriterState::take_batch`] and
//! [`WriterState::write_taken`]; tests run the same steps by hand on a log started without the thread.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::{Job, MAX_BATCH, SPARE_BUFFERS, WriterState};
use crate::audit::record::SealReason;
use crate::audit::segment::{BatchWrite, SegmentWriter, set_healthy};
use crate::config::Durability;

/// What the writer carries from one turn to the next.
pub(super) struct Turns {
    durability: Durability,
    /// After a write that came within this of the one before, the writer lingers ([`super::LINGER`]).
    linger: Duration,
    /// The records taken in this turn (capacity [`MAX_BATCH`], reused).
    pub(super) batch: Vec<Job>,
    /// The written records' buffers, given back with the next look at the queue.
    spent: Vec<Vec<u8>>,
    /// When the last batch was written.
    last_write: Option<Instant>,
    /// Whether to linger after it: only when it came within `linger` of the one before, so that a stream of
    /// requests shares wake-ups and an occasional request costs no timer.
    linger_now: bool,
    /// The batch is records a failed write left, written again ([`super::Queue::unwritten`]).
    retrying: bool,
}

impl Turns {
    pub(super) fn new(durability: Durability, linger: Duration) -> Self {
        Self {
            durability,
            linger,
            batch: Vec::with_capacity(MAX_BATCH),
            spent: Vec::with_capacity(MAX_BATCH),
            last_write: None,
            linger_now: false,
            retrying: false,
        }
    }
}

/// Starts the `ssp-audit` thread and, in batched mode, `ssp-audit-sync`, adding the handle of each that starts to
/// `threads`.
pub(super) fn spawn(
    shared: &Arc<WriterState>,
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) -> std::io::Result<()> {
    let (durability, linger) = (shared.durability(), shared.linger);
    let for_writer = Arc::clone(shared);
    threads.push(
        std::thread::Builder::new()
            .name("ssp-audit".into())
            .spawn(move || for_writer.run(&mut Turns::new(durability, linger)))?,
    );
    if durability == Durability::Batched {
        let for_syncer = Arc::clone(shared);
        threads.push(
            std::thread::Builder::new()
                .name("ssp-audit-sync".into())
                .spawn(move || for_syncer.run_syncer())?,
        );
    }
    Ok(())
}

impl WriterState {
    pub(super) fn durability(&self) -> Durability {
        if self.batched {
            Durability::Batched
        } else {
            Durability::Strict
        }
    }

    /// The `ssp-audit` thread: writes what is queued, fsyncs per the durability, and on close writes the rest,
    /// seals the segment and fsyncs. After a write that came within the linger of the one before, it lingers:
    /// response records stay queued until a request record comes or the linger ends.
    fn run(&self, turns: &mut Turns) {
        loop {
            self.wait_for_work(turns);
            // The segment first, then the queue again (a worker may have written what was queued meanwhile).
            let mut segment = self.segment();
            let Some(writer) = segment.as_mut() else {
                return;
            };
            let closing = self.take_batch(turns);
            self.write_taken(writer, turns);
            if closing {
                let mut queue = self.lock();
                queue.report_lost(0, true);
                if !queue.unwritten.is_empty() {
                    tracing::error!(
                        records = queue.unwritten.len(),
                        "audit log closed after a failed write: records nobody waited for are lost"
                    );
                }
                drop(queue);
                writer.seal(SealReason::Shutdown);
                writer.sync();
                // Sealed: no worker writes after this.
                *segment = None;
                return;
            }
        }
    }

    /// Gives back the last turn's buffers, then waits until there is work that must not wait, or, after a linger,
    /// any work ([`super::Queue::has_urgent_work`]), or, with nothing else to do, until the records a failed write
    /// left are due again ([`super::Queue::retry_at`]).
    fn wait_for_work(&self, turns: &mut Turns) {
        let mut queue = self.lock();
        let room = SPARE_BUFFERS.saturating_sub(queue.spare.len());
        // Those past the bound are freed as the drain ends; `spent` is empty either way.
        queue.spare.extend(turns.spent.drain(..).take(room));
        let mut lingering = turns.linger_now.then(|| Instant::now() + turns.linger);
        while !queue.has_urgent_work() {
            // Lingering, only work that must not wait wakes the thread, until the linger ends; then what is queued
            // goes out. Asleep, any record wakes it, and records a failed write left are due at `retry_at`, traffic
            // or not (a disk with room again takes them, and the log is healthy again, without a request having to
            // come and write); they are not written every linger.
            let (idle, until) = match lingering.filter(|until| *until > Instant::now()) {
                Some(until) => (super::Idle::Lingering, Some(until)),
                None => {
                    lingering = None;
                    if queue.has_work() {
                        break;
                    }
                    let retry = queue.retry_at.filter(|_| !queue.unwritten.is_empty());
                    (super::Idle::Asleep, retry)
                }
            };
            let left = until.map(|at| at.saturating_duration_since(Instant::now()));
            if left.is_some_and(|left| left.is_zero()) {
                break;
            }
            queue.idle = idle;
            queue = match left {
                Some(left) => self
                    .wake
                    .wait_timeout(queue, left)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g),
                None => self
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
            queue.idle = super::Idle::Busy;
        }
    }

    /// Takes up to [`MAX_BATCH`] queued records into the turn's batch, under the segment's lock (the caller holds
    /// it); whether the log is closing with nothing left after them. When records a failed write left are due
    /// ([`super::Queue::unwritten`]), the batch is instead the first few of them alone
    /// ([`super::unwritten::RETRY_CHUNK`] at most), and what is queued waits for the next turn; a closing log takes
    /// all of them with what is queued.
    ///
    /// Taken from here on (a request that stops waiting now finds its record in flight); a record its request
    /// withdrew, or one following a request record that was not written, is not. A record that follows another is
    /// queued only once that one is taken (or withdrawn), and records are taken and written under the segment's
    /// lock, so the other's write has ended by the time this one is taken.
    pub(super) fn take_batch(&self, turns: &mut Turns) -> bool {
        let batch = &mut turns.batch;
        let closing = {
            let mut queue = self.lock();
            turns.retrying = queue.retry_due() && !queue.closed;
            if turns.retrying {
                let chunk = queue.retry_chunk();
                queue.take_unwritten_into(batch, chunk);
                false
            } else {
                queue.take_into(batch);
                let closing = queue.closed && queue.jobs.is_empty();
                if closing {
                    queue.take_unwritten_into(batch, MAX_BATCH);
                }
                closing
            }
        };
        batch.retain(Job::take);
        closing
    }

    /// Writes the taken records with one `write` (rotating first if the segment is full; in strict mode with an
    /// fdatasync after it), tells each record's request or group the result, and keeps the buffers for the next
    /// look at the queue. In batched mode a write's time decides whether the workers write again
    /// ([`WriterState::maybe_hand_back`]).
    pub(super) fn write_taken(&self, writer: &mut SegmentWriter, turns: &mut Turns) {
        turns.linger_now = false;
        if turns.batch.is_empty() {
            return;
        }
        let now = Instant::now();
        turns.linger_now = turns
            .last_write
            .is_some_and(|then| now.duration_since(then) < turns.linger);
        turns.last_write = Some(now);
        let strict = turns.durability == Durability::Strict;
        writer.rotate_if_full();
        let before = writer.last_seq();
        let done = writer
            .write_batch(
                turns.batch.iter().map(|job| &job.record),
                BatchWrite {
                    sync: strict,
                    rotate: true,
                    again: turns.retrying,
                },
            )
            .is_ok();
        if done && !strict {
            self.mark_dirty(writer);
        }
        if self.batched {
            self.maybe_hand_back(now.elapsed(), done);
        }
        let rolled_back = writer.last_seq() == before;
        self.settle_batch(
            &mut turns.batch,
            done,
            (rolled_back, turns.retrying),
            &mut turns.spent,
            usize::MAX,
        );
    }

    /// The batched-mode `ssp-audit-sync` thread: sleeps on its condvar until something is written, then fsyncs
    /// the segment `fsync_interval` after that write (a closing log wakes it early), so that a record reaches the
    /// disk at most that long after it was written while writes go on. A failed fsync turns the log unhealthy.
    fn run_syncer(&self) {
        let mut state = self.sync_state();
        loop {
            // Nothing written since the last fsync: wait, with no timeout, for the writer to say otherwise.
            while !state.dirty && !state.stop {
                state = self
                    .sync_wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            // Written: let the interval pass (more writes join this fsync), unless the log is closing.
            let due = Instant::now() + self.fsync_interval;
            while !state.stop {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .sync_wake
                    .wait_timeout(state, left)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            }
            if state.stop {
                return;
            }
            state.dirty = false;
            let Some(file) = state.file.clone() else {
                continue;
            };
            drop(state);
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "audit fsync failed");
                set_healthy(&self.healthy, false, &self.dir);
            }
            state = self.sync_state();
        }
    }
}
