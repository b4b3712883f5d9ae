//! Where a request record stands between the request waiting for it and the `ssp-audit` thread, and what a request
//! that stops waiting leaves behind.
//!
//! A request waits at most [`ACK_WAIT`](super::ACK_WAIT) for its record. When it stops waiting, one of two things
//! is true, and the slot says which, because the writer and the request settle it with one atomic operation each:
//! - the writer had not taken the record: it is withdrawn, the writer skips it, and the log holds nothing of the
//!   request ([`NotWritten::Never`]);
//! - the writer had taken it and its write (or fsync) had not ended, as on a stalled disk: the record may still
//!   reach the log, so the request's `response` record is queued to follow it, and is written only if the request
//!   record was ([`NotWritten::InFlight`], [`AuditLog::submit_after`](super::AuditLog::submit_after)).
//!
//! Either way no `request` record is left in the log without its `response` record.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// Where one or more request records stand (a staged group holds several); whoever waits for them is woken, and
/// only it, when that changes. The state is a set of the bits below; `DONE` and `FAILED` are final and exclusive.
#[derive(Debug, Default)]
pub(super) struct Slot {
    state: AtomicU8,
    /// Records still to be written before the slot is done.
    pending: AtomicUsize,
    changed: Notify,
    /// A staged request's own slot, once the writer's slot of its group was given up during the write: that slot,
    /// which says in the end whether the record was written. Unset otherwise, and on the writer's slots.
    group: OnceLock<Arc<Slot>>,
}

impl Slot {
    /// Written (in strict mode, fsynced).
    pub(super) const DONE: u8 = 1;
    /// Not written and never will be: a write failed, the record could not be queued, or it was withdrawn before
    /// the writer took it.
    pub(super) const FAILED: u8 = 2;
    /// The writer has taken the records (or the first of them) to write.
    const TAKEN: u8 = 4;
    /// The request stopped waiting after the writer took the records and before their write ended.
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

    /// Whether a request waiting on this state stops waiting: the records were written, will not be, or the
    /// request gave up on them.
    pub(super) fn settled(state: u8) -> bool {
        state & (Self::FINAL | Self::GIVEN_UP) != 0
    }

    /// Whether the write of the records has ended, one way or the other.
    pub(super) fn is_final(&self) -> bool {
        self.get() & Self::FINAL != 0
    }

    /// Whether the records were written.
    pub(super) fn written(&self) -> bool {
        self.get() & Self::DONE != 0
    }

    /// Sets the state and wakes the waiting request (or leaves it a permit, if it is not waiting yet). For a
    /// request's own slot, from the state of its group's.
    pub(super) fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.changed.notify_one();
    }

    /// The request's own slot takes on its group's settled `state`; a group given up during its write is kept,
    /// for the response record to follow.
    pub(super) fn settle_from(&self, group: &Arc<Slot>, state: u8) {
        if state & Self::FINAL == 0 {
            let _ = self.group.set(Arc::clone(group));
        }
        self.set(state);
    }

    /// The writer takes the record to write it: false if it must not be (withdrawn, or its group failed).
    pub(super) fn take(&self) -> bool {
        self.state.fetch_or(Self::TAKEN, Ordering::AcqRel) & Self::FAILED == 0
    }

    /// Sets a final state unless one is set, and wakes the waiting request.
    fn finish(&self, state: u8) {
        let set = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & Self::FINAL == 0).then_some(s | state)
            });
        if set.is_ok() {
            self.changed.notify_one();
        }
    }

    /// One of its records was written (or failed to be): done when the last is, failed as soon as one fails.
    pub(super) fn record_done(&self, written: bool) {
        if !written {
            self.finish(Self::FAILED);
        } else if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(Self::DONE);
        }
    }

    /// The request stops waiting (its deadline passed): withdraws the records if the writer has not taken them,
    /// else marks them given up. Returns the state it leaves, which is settled.
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
        self.changed.notify_one();
        match before {
            Ok(s) if s & Self::TAKEN != 0 => s | Self::GIVEN_UP,
            Ok(_) => Self::FAILED,
            Err(s) => s,
        }
    }

    /// What a request whose slot is in `state` learns: none while it must wait on.
    fn outcome(self: &Arc<Self>, state: u8) -> Option<Result<(), NotWritten>> {
        if state & Self::DONE != 0 {
            Some(Ok(()))
        } else if state & Self::FAILED != 0 {
            Some(Err(NotWritten::Never))
        } else if state & Self::GIVEN_UP != 0 {
            let decides = self.group.get().unwrap_or(self);
            Some(Err(NotWritten::InFlight(InFlight(Arc::clone(decides)))))
        } else {
            None
        }
    }
}

/// Why a request record was not acknowledged: the request is refused (503 `AUDIT_UNAVAILABLE`) either way.
#[derive(Debug)]
pub(crate) enum NotWritten {
    /// It is not in the log and never will be (a failed write, a closed log, or withdrawn after 5 s).
    Never,
    /// It was being written when the request stopped waiting (5 s): it is in the log if that write ends well.
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
    /// None for a staged record, whose thread's watch gives its group up ([`stage`](super::stage)).
    pub(super) deadline: Option<tokio::time::Instant>,
}

impl Ticket {
    /// Ok once the record is written (or fsynced); [`NotWritten`] when that failed or took longer than 5 s.
    pub(crate) async fn written(self) -> Result<(), NotWritten> {
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
                        let state = self.slot.give_up();
                        return self.slot.outcome(state).unwrap_or(Err(NotWritten::Never));
                    }
                }
            }
        }
    }
}

/// The flush task's wait for its group: until the writer settles it or the thread's watch gives it up.
pub(super) async fn settled(group: &Slot) -> u8 {
    loop {
        let state = group.get();
        if Slot::settled(state) {
            return state;
        }
        group.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given up before the writer took it, a record is withdrawn: the writer skips it.
    #[test]
    fn given_up_before_it_is_taken_a_record_is_withdrawn() {
        let slot = Arc::new(Slot::for_records(1));
        assert_eq!(slot.give_up(), Slot::FAILED);
        assert!(!slot.take());
        assert!(matches!(
            slot.outcome(slot.get()),
            Some(Err(NotWritten::Never))
        ));
    }

    /// Given up during its write, a record is in flight: what follows it is written only if the write ends well.
    #[test]
    fn given_up_during_its_write_a_record_decides_what_follows_it() {
        for written in [true, false] {
            let slot = Arc::new(Slot::for_records(1));
            assert!(slot.take());
            let state = slot.give_up();
            let Some(Err(NotWritten::InFlight(InFlight(decides)))) = slot.outcome(state) else {
                panic!("{state}");
            };
            assert!(!decides.is_final());
            slot.record_done(written);
            assert!(decides.is_final());
            assert_eq!(decides.written(), written);
        }
    }

    /// A write that ends before the request gives up wins: the request goes on.
    #[test]
    fn a_write_that_ends_first_is_acknowledged() {
        let slot = Arc::new(Slot::for_records(2));
        assert!(slot.take());
        slot.record_done(true);
        assert!(!Slot::settled(slot.get()), "one of two records written");
        slot.record_done(true);
        assert_eq!(slot.give_up() & Slot::DONE, Slot::DONE);
        assert!(matches!(slot.outcome(slot.get()), Some(Ok(()))));
    }

    /// A staged request learns its group's state, and the group decides what follows its record.
    #[test]
    fn a_staged_request_follows_its_group() {
        let group = Arc::new(Slot::for_records(1));
        let own = Arc::new(Slot::default());
        assert!(group.take());
        let state = group.give_up();
        own.settle_from(&group, state);
        let Some(Err(NotWritten::InFlight(InFlight(decides)))) = own.outcome(own.get()) else {
            panic!("{state}");
        };
        assert!(Arc::ptr_eq(&decides, &group));
    }
}
