//! Where a request record stands between the request waiting for it and the `ssp-audit` thread, and what a request
//! that stops waiting leaves behind.
//!
//! A request stops waiting for its record when [`ACK_WAIT`](super::ACK_WAIT) (5 s) has passed, or when it is
//! dropped (its consumer went away) with its exchange. Then one of two things is true, and the record's slot says
//! which, because the writer and the request settle it with one atomic operation each:
//! - the writer had not taken the record: it is withdrawn, the writer skips it, and the log holds nothing of the
//!   request ([`NotWritten::Never`]);
//! - the writer had taken it and its write (or fsync) had not ended, as on a stalled disk: the record may still
//!   reach the log, so the request's `response` record is queued to follow it, and is written only if the request
//!   record was ([`NotWritten::InFlight`], [`AuditLog::submit_after`](super::AuditLog::submit_after)).
//!
//! Either way the log holds no `request` record without its `response` record, nor the reverse.
//!
//! Each request record has a slot of its own, which the writer settles without waking anyone. On a worker's
//! runtime the records of one turn also share a group slot, which counts them down and wakes the turn's flush
//! task once; that task wakes each request on its own thread ([`stage`](super::stage)).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Where one request record stands, or, as a group slot, how many of a turn's records the writer is still to
/// handle. The state is a set of the bits below; `DONE` and `FAILED` are final and exclusive.
#[derive(Debug, Default)]
pub(super) struct Slot {
    state: AtomicU8,
    /// A group's records still to be handled (written, failed or skipped) before it is done.
    pending: AtomicUsize,
    changed: Notify,
}

impl Slot {
    /// Written (in strict mode, fsynced); for a group, every record handled.
    pub(super) const DONE: u8 = 1;
    /// Not written and never will be: a write failed, the record could not be queued, or it was withdrawn before
    /// the writer took it. For a group: a write failed, or its thread's watch gave it up (5 s).
    pub(super) const FAILED: u8 = 2;
    /// The writer has taken the record to write it.
    const TAKEN: u8 = 4;
    /// The request stopped waiting after the writer took the record and before its write ended.
    const GIVEN_UP: u8 = 8;
    const FINAL: u8 = Self::DONE | Self::FAILED;

    pub(super) fn for_records(n: usize) -> Self {
        Self {
            pending: AtomicUsize::new(n),
            ..Self::default()
        }
    }

    pub(super) fn get(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Whether the write of the record has ended, one way or the other (for a group: every record handled).
    pub(super) fn is_final(&self) -> bool {
        self.get() & Self::FINAL != 0
    }

    /// Whether the record was written.
    pub(super) fn written(&self) -> bool {
        self.get() & Self::DONE != 0
    }

    /// Wakes the request waiting on this slot (or leaves it a permit, if it is not waiting yet).
    pub(super) fn wake(&self) {
        self.changed.notify_one();
    }

    /// The writer takes the record to write it: false if it must not be (withdrawn, or failed).
    pub(super) fn take(&self) -> bool {
        self.state.fetch_or(Self::TAKEN, Ordering::AcqRel) & Self::FAILED == 0
    }

    /// Sets a final state unless one is set; true if it did.
    fn finish(&self, state: u8) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & Self::FINAL == 0).then_some(s | state)
            })
            .is_ok()
    }

    /// The writer is through with the record: written or not. `wake`s the request waiting on it, unless the
    /// record's group will (a staged record).
    pub(super) fn record_done(&self, written: bool, wake: bool) {
        if self.finish(if written { Self::DONE } else { Self::FAILED }) && wake {
            self.wake();
        }
    }

    /// A group: one of its records was handled (written, or skipped because its request withdrew it: `true`;
    /// failed: `false`). Done when the last is, failed as soon as one fails; wakes the flush task either way.
    pub(super) fn group_record_done(&self, handled: bool) {
        let settled = if !handled {
            self.finish(Self::FAILED)
        } else {
            self.pending.fetch_sub(1, Ordering::AcqRel) == 1 && self.finish(Self::DONE)
        };
        if settled {
            self.wake();
        }
    }

    /// The request stops waiting: withdraws the record if the writer has not taken it, else marks it given up.
    /// Returns the state it leaves, which says what the request learns ([`Slot::outcome`]). For a group (its
    /// thread's watch, after 5 s): fails it, so that its flush task settles each record on its own.
    pub(super) fn give_up(&self) -> u8 {
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                if s & Self::FINAL != 0 {
                    None
                } else if s & Self::TAKEN != 0 {
                    Some(s | Self::GIVEN_UP)
                } else {
                    Some(Self::FAILED)
                }
            });
        match before {
            Err(s) => s,
            Ok(s) => {
                self.wake();
                if s & Self::TAKEN != 0 {
                    s | Self::GIVEN_UP
                } else {
                    Self::FAILED
                }
            }
        }
    }

    /// What a request whose record's slot is in `state` learns: none while it must wait on.
    fn outcome(self: &Arc<Self>, state: u8) -> Option<Result<(), NotWritten>> {
        if state & Self::DONE != 0 {
            Some(Ok(()))
        } else if state & Self::FAILED != 0 {
            Some(Err(NotWritten::Never))
        } else if state & Self::GIVEN_UP != 0 {
            Some(Err(NotWritten::InFlight(InFlight(Arc::clone(self)))))
        } else {
            None
        }
    }

    /// Stops waiting now ([`Slot::give_up`]) and says what that leaves.
    fn stop_waiting(self: &Arc<Self>) -> Result<(), NotWritten> {
        let state = self.give_up();
        self.outcome(state).unwrap_or(Err(NotWritten::Never))
    }
}

/// Why a request record was not acknowledged: the request is refused (503 `AUDIT_UNAVAILABLE`) either way.
#[derive(Debug)]
pub(crate) enum NotWritten {
    /// It is not in the log and never will be (a failed write, a closed log, or withdrawn).
    Never,
    /// It was being written when the request stopped waiting: it is in the log if that write ends well.
    InFlight(InFlight),
}

/// A request record whose write had not ended when its request stopped waiting; a record queued with it
/// ([`AuditLog::submit_after`](super::AuditLog::submit_after)) is written only if this one was.
#[derive(Debug)]
pub(crate) struct InFlight(pub(super) Arc<Slot>);

#[cfg(test)]
impl InFlight {
    /// Whether its write has ended, one way or the other.
    pub(crate) fn ended(&self) -> bool {
        self.0.is_final()
    }
}

/// A queued request record ([`AuditLog::queue`](super::AuditLog::queue)): waits until it is written (batched) or
/// fsynced (strict).
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(super) slot: Arc<Slot>,
    /// None for a staged record, whose thread's watch bounds the wait ([`stage`](super::stage)).
    pub(super) deadline: Option<tokio::time::Instant>,
}

impl Ticket {
    /// Ok once the record is written (or fsynced); [`NotWritten`] when that failed or took longer than 5 s.
    pub(crate) async fn written(&self) -> Result<(), NotWritten> {
        loop {
            // A change between reading the slot and waiting leaves a permit, so it is not missed.
            if let Some(outcome) = self.slot.outcome(self.slot.get()) {
                return outcome;
            }
            match self.deadline {
                None => self.slot.changed.notified().await,
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, self.slot.changed.notified())
                        .await
                        .is_err()
                    {
                        return self.slot.stop_waiting();
                    }
                }
            }
        }
    }

    /// The record, for the `response` record of its exchange ([`AuditLog::submit_response`](
    /// super::AuditLog::submit_response)).
    pub(crate) fn request(&self) -> Queued {
        Queued(Arc::clone(&self.slot))
    }
}

/// A queued request record, as its exchange holds it: the exchange's `response` record follows it into the log.
#[derive(Debug)]
pub(crate) struct Queued(Arc<Slot>);

impl Queued {
    /// The request stops waiting, if it still was (its consumer went away), and learns where its record stands
    /// (for a record already settled, one atomic load).
    pub(super) fn stop_waiting(&self) -> Result<(), NotWritten> {
        self.0.stop_waiting()
    }
}

/// The flush task's wait for its group: until the writer has handled every record, a write failed, or the
/// thread's watch gave the group up.
pub(super) async fn settled(group: &Slot) -> u8 {
    loop {
        let state = group.get();
        if state & Slot::FINAL != 0 {
            return state;
        }
        group.changed.notified().await;
    }
}

/// The flush task, once its group is settled, settles each of its requests: a record the writer has handled is
/// acknowledged; any other (the group failed or was given up) is given up, and its request learns what that
/// leaves.
pub(super) fn settle(request: &Slot) {
    if request.is_final() {
        request.wake();
    } else {
        request.give_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given up before the writer took it, a record is withdrawn: the writer skips it.
    #[test]
    fn given_up_before_it_is_taken_a_record_is_withdrawn() {
        let slot = Arc::new(Slot::for_records(1));
        assert!(matches!(slot.stop_waiting(), Err(NotWritten::Never)));
        assert!(!slot.take());
    }

    /// Given up during its write, a record is in flight: what follows it is written only if the write ends well.
    #[test]
    fn given_up_during_its_write_a_record_decides_what_follows_it() {
        for written in [true, false] {
            let slot = Arc::new(Slot::for_records(1));
            assert!(slot.take());
            let Err(NotWritten::InFlight(InFlight(decides))) = slot.stop_waiting() else {
                panic!("not in flight");
            };
            assert!(!decides.is_final());
            slot.record_done(written, true);
            assert!(decides.is_final());
            assert_eq!(decides.written(), written);
        }
    }

    /// A write that ends before the request stops waiting wins: the request goes on.
    #[test]
    fn a_write_that_ends_first_is_acknowledged() {
        let slot = Arc::new(Slot::for_records(1));
        assert!(slot.take());
        slot.record_done(true, false);
        assert!(matches!(slot.stop_waiting(), Ok(())));
        assert!(Queued(slot).stop_waiting().is_ok());
    }

    /// A group is done once every record is handled, and failed at the first failure.
    #[test]
    fn a_group_counts_its_records_down() {
        let group = Slot::for_records(2);
        group.group_record_done(true);
        assert!(!group.is_final(), "one of two handled");
        group.group_record_done(true);
        assert!(group.written());
        let group = Slot::for_records(2);
        group.group_record_done(false);
        assert!(group.is_final() && !group.written());
    }
}
