//! Test-only controls of the writer: holding or stalling the `ssp-audit` thread as a stuck disk would, and what
//! counts as a slow write. The production paths read only the queue's `held` and `stalled` flags they set.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::on_worker::nanos;
use super::{AuditLog, WriterState};

impl WriterState {
    /// Tests: waits while [`AuditLog::stall`] holds the thread (or until the log closes).
    pub(super) fn wait_while_stalled(&self) {
        let mut queue = self.lock();
        while queue.stalled && !queue.closed {
            queue = self
                .wake
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl AuditLog {
    /// Tests: holds the writer (it takes nothing from the queue), as a write stuck on a stalled disk would.
    pub(in crate::audit) fn hold(&self, held: bool) {
        self.shared
            .direct
            .store(!held && self.shared.batched, Ordering::Release);
        let mut queue = self.shared.lock();
        queue.held = held;
        self.shared.wake.notify_one();
    }

    /// Tests: stalls the writer after it takes its next batch and before it writes it, as a `write` stuck on a
    /// frozen file system would, until called with `false`.
    pub(in crate::audit) fn stall(&self, stalled: bool) {
        self.shared
            .direct
            .store(!stalled && self.shared.batched, Ordering::Release);
        let mut queue = self.shared.lock();
        queue.stalled = stalled;
        self.shared.wake.notify_all();
    }
    /// Tests: holds the `ssp-audit` thread only (it takes nothing from the queue); workers still write.
    pub(in crate::audit) fn hold_thread(&self, held: bool) {
        let mut queue = self.shared.lock();
        queue.held = held;
        self.shared.wake.notify_one();
    }

    /// Tests: sets what counts as a slow write and how long the thread's writes must be fast before the workers
    /// write again.
    pub(in crate::audit) fn tune(&self, slow_write: Duration, hand_back_after: Duration) {
        self.shared
            .slow_write
            .store(nanos(slow_write), Ordering::Relaxed);
        self.shared
            .hand_back_after
            .store(nanos(hand_back_after), Ordering::Relaxed);
    }

    /// Tests: holds the segment's lock, as another worker does while it writes.
    pub(in crate::audit) fn lock_segment(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<super::SegmentWriter>> {
        self.shared
            .segment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
