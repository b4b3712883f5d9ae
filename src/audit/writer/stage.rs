//! Staging: the records of one turn of a worker's event loop go to the writer together (see [`Stage`]); while a
//! worker's flushes stream in, the response records of later turns wait for the next request record's ([`Linger`]).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;

use super::{ACK_WAIT, AuditLog, Job, Slot, WriterState, report_refused};

/// Records nobody waits for (response records, refusals) staged on one thread in one turn at most; past this they
/// are queued at once. Request records need no such bound: each holds a place in the queue's capacity.
pub(in crate::audit) const STAGE_LIMIT: usize = 1024;
/// Spare record buffers one thread keeps at most, taken from the writer's as its flushes hand records over.
const CACHED_BUFFERS: usize = 256;
/// The capacity of a new record buffer: a request record with its token's claims is about a kilobyte.
const NEW_BUFFER: usize = 1024;

/// A buffer to encode a record into: a spare one of this thread's, else a new one.
pub(super) fn spare_buffer() -> Vec<u8> {
    STAGE
        .try_with(|stage| stage.borrow_mut().buffers.pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(NEW_BUFFER))
}

impl AuditLog {
    /// Stages a job on this thread when it runs a single-threaded runtime (a request waiting for its record is
    /// woken by the flush task once it is written); gives the job back otherwise. A record nobody waits for that
    /// comes while this thread lingers ([`Stage::linger_until`]) is held for the next request record's flush, and
    /// flushed by this thread's [`Linger`] task when the linger ends without one.
    pub(super) fn stage(&self, job: Job) -> Result<(), Job> {
        let single = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if !single {
            return Err(job);
        }
        let log = Arc::as_ptr(&self.shared) as usize;
        // Only a worker that writes its own records holds them: in strict mode (or while writing is handed off)
        // the thread lingers itself.
        let may_hold = !job.is_urgent() && self.shared.direct.load(Ordering::Relaxed);
        let next = STAGE.with(|stage| {
            let mut stage = stage.borrow_mut();
            if stage.jobs.is_empty() {
                stage.log = log;
            } else if stage.log != log {
                // Another log's records are staged on this thread (tests run several proxies in one process).
                return Err(job);
            }
            if job.slot.is_none() {
                if stage.unwaited == STAGE_LIMIT {
                    return Err(job);
                }
                stage.unwaited += 1;
            }
            stage.jobs.push(job);
            if stage.scheduled {
                return Ok(Next::Nothing);
            }
            if may_hold && stage.lingers(tokio::time::Instant::now()) {
                if stage.held.is_some() {
                    return Ok(Next::Nothing);
                }
                stage.held = Some(Arc::clone(&self.shared));
                return Ok(Next::Hold(stage.linger.clone()));
            }
            stage.scheduled = true;
            stage.held = None;
            Ok(Next::Flush)
        })?;
        // Spawned with the stage released: on a runtime that is shutting down a task is dropped at once, and its
        // drop queues the stage.
        match next {
            Next::Nothing => {}
            // Runs after the tasks already woken in this turn, which stage their records first.
            Next::Flush => {
                tokio::spawn(
                    Flush {
                        shared: Some(Arc::clone(&self.shared)),
                    }
                    .run(),
                );
            }
            Next::Hold(Some(linger)) => linger.notify_one(),
            Next::Hold(None) => {
                let wake = Arc::new(Notify::new());
                STAGE.with_borrow_mut(|stage| stage.linger = Some(Arc::clone(&wake)));
                tokio::spawn(Linger.run(wake));
            }
        }
        Ok(())
    }
}

/// What staging a job asks of its thread.
enum Next {
    /// A flush task is on its way, or the held records wait for one.
    Nothing,
    /// The first job of a turn: a flush task, to run after the turn's ready tasks.
    Flush,
    /// The first record held: this thread's [`Linger`] task, to wake (or start) so that it sets its timer.
    Hold(Option<Arc<Notify>>),
}

/// Records staged on one thread (a worker's single-threaded runtime) during one turn of its runtime. A flush task,
/// spawned by the first, hands them to the writer under one lock and one wake-up; the writer wakes that task once
/// when the request records among them are written, and it wakes the requests waiting for them, on their own
/// thread, without a system call. Per request, one thread hand-off each way is thereby shared by every request of
/// the turn, and the response records of the turn go with them.
#[derive(Default)]
struct Stage {
    /// The log (its shared state's address) the staged jobs are for.
    log: usize,
    /// Each job; a request record's carries the slot of the request waiting for it.
    jobs: Vec<Job>,
    /// Jobs nobody waits for, among them.
    unwaited: usize,
    /// A flush task is on its way.
    scheduled: bool,
    /// The staged records are held, for the log here, until a request record's flush takes them or the linger
    /// ends ([`Linger`]): no flush task is on its way for them.
    held: Option<Arc<WriterState>>,
    /// The last flush's time.
    last_flush: Option<tokio::time::Instant>,
    /// When the linger after the last flush ends, if that flush came within the log's linger ([`super::LINGER`])
    /// of the one before it (records stream in). The `ssp-audit` thread's rule, on a worker: a response record
    /// staged meanwhile waits for the next request record's flush and goes out in its `write`, rather than cost a
    /// flush task and a `write` of its own; an occasional request's is flushed at once.
    linger_until: Option<tokio::time::Instant>,
    /// Wakes this thread's [`Linger`] task, while one runs.
    linger: Option<Arc<Notify>>,
    /// The list of waiting requests a finished flush task left, for the next one to reuse.
    spare: Vec<Arc<Slot>>,
    /// Spare record buffers ([`spare_buffer`]), at most [`CACHED_BUFFERS`].
    buffers: Vec<Vec<u8>>,
}

thread_local! {
    static STAGE: RefCell<Stage> = RefCell::default();
}

impl Stage {
    /// Whether this thread lingers at `now`: a record nobody waits for is held for the next request record.
    fn lingers(&self, now: tokio::time::Instant) -> bool {
        self.linger_until.is_some_and(|until| now < until)
    }

    /// A flush takes the staged records at `now`: notes its time, and whether a linger follows it.
    fn flushed(&mut self, now: tokio::time::Instant, linger: std::time::Duration) {
        self.linger_until = self
            .last_flush
            .filter(|then| now.duration_since(*then) < linger)
            .map(|_| now + linger);
        self.last_flush = Some(now);
        self.held = None;
    }
}

/// The task that hands a thread's staged records to the writer. Dropped before it ran (its runtime stopped), it
/// withdraws the request records, whose requests will not be forwarded, and still queues the others.
struct Flush {
    shared: Option<Arc<WriterState>>,
}

impl Flush {
    async fn run(mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        // This worker writes the turn's records itself when it may ([`WriterState::write_here`]); else they go to
        // the writer thread.
        let written_here = STAGE.with_borrow_mut(|stage| {
            stage.flushed(tokio::time::Instant::now(), shared.linger);
            let keep = CACHED_BUFFERS.saturating_sub(stage.buffers.len());
            let mut buffers = std::mem::take(&mut stage.buffers);
            let wrote = shared.write_here(&mut stage.jobs, &mut buffers, keep);
            stage.buffers = buffers;
            if wrote {
                stage.scheduled = false;
                stage.unwaited = 0;
            }
            wrote
        });
        if written_here {
            return;
        }
        // Straight from this thread's stage into the queue, which keeps its capacity for the next turn.
        let (group, mut waiters, refused) = STAGE.with_borrow_mut(|stage| {
            stage.scheduled = false;
            let staged = stage.jobs.len();
            let waited = staged - std::mem::take(&mut stage.unwaited);
            let group = Arc::new(Slot::for_records(waited));
            let mut waiters = std::mem::take(&mut stage.spare);
            let jobs = stage.jobs.drain(..).map(|mut job| {
                if let Some(waiter) = &job.slot {
                    waiters.push(Arc::clone(waiter));
                    job.group = Some(Arc::clone(&group));
                }
                job
            });
            // As many buffers back as this turn's records used, up to the thread's bound.
            let mut buffers = std::mem::take(&mut stage.buffers);
            let want = staged.min(CACHED_BUFFERS.saturating_sub(buffers.len()));
            let refused = shared.push_and_refill(jobs, &mut buffers, want);
            stage.buffers = buffers;
            (group, waiters, refused)
        });
        // The requests whose records could not be queued are refused (503) and need no log line; the other
        // records are reported.
        let (requests, others) = refused
            .iter()
            .partition::<Vec<&Job>, _>(|j| j.slot.is_some());
        if !requests.is_empty() {
            group.group_record_done(false);
        }
        report_refused(others.len());
        drop(refused);
        if waiters.is_empty() {
            return;
        }
        // No timer of its own: this thread's watch gives the group up if the writer has not answered by the
        // deadline.
        watch(&group);
        super::slot::settled(&group).await;
        for waiter in waiters.drain(..) {
            super::slot::settle(&waiter);
        }
        let _ = STAGE.try_with(|stage| {
            let mut stage = stage.borrow_mut();
            if stage.spare.capacity() < waiters.capacity() {
                stage.spare = waiters;
            }
        });
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let staged = STAGE.try_with(|_| take_staged()).unwrap_or_default();
            // Their requests go away with the runtime, unforwarded: their request records are withdrawn (and
            // their exchanges, if any, write no response records). The other records are queued all the same.
            for waiter in staged.iter().filter_map(|job| job.slot.as_ref()) {
                waiter.give_up();
            }
            report_refused(shared.push(staged).len());
        }
    }
}

/// Takes this thread's staged jobs, and lets the next one schedule a flush.
fn take_staged() -> Vec<Job> {
    STAGE.with(|stage| {
        let mut stage = stage.borrow_mut();
        stage.scheduled = false;
        stage.unwaited = 0;
        stage.held = None;
        std::mem::take(&mut stage.jobs)
    })
}

/// Queues the records this thread holds for `shared`'s log ([`Stage::held`]), if any: for a log that closes while
/// the runtime that staged them still runs (the one a test serves on).
pub(super) fn release_held(shared: &Arc<WriterState>) {
    let held = STAGE
        .try_with(|stage| {
            let holds = stage
                .borrow()
                .held
                .as_ref()
                .is_some_and(|held| Arc::ptr_eq(held, shared));
            if holds { take_staged() } else { Vec::new() }
        })
        .unwrap_or_default();
    if !held.is_empty() {
        report_refused(shared.push(held).len());
    }
}

/// The task that flushes a thread's held records ([`Stage::held`]) when its linger ends without a request record's
/// flush to take them. One per thread, started by the first held record and kept: it sets a timer for the end of
/// the linger while records are held, and otherwise waits to be woken by the next held record. Each record held
/// first after a flush wakes it (on this thread: no system call), and it moves its timer to the linger's new end,
/// which only ever moves later: while requests stream in, its timer never fires and never wakes the event loop
/// (a timer set earlier than the loop's next would, through a system call). Dropped (its runtime stopped), it
/// queues what is held.
struct Linger;

impl Linger {
    async fn run(self, wake: Arc<Notify>) {
        loop {
            let now = tokio::time::Instant::now();
            let due = STAGE.with_borrow_mut(|stage| {
                if stage.scheduled || stage.held.is_none() {
                    return Err(None);
                }
                match stage.linger_until {
                    Some(until) if now < until => Err(Some(until)),
                    _ => {
                        stage.scheduled = true;
                        Ok(stage.held.take())
                    }
                }
            });
            match due {
                Ok(shared) => {
                    tokio::spawn(Flush { shared }.run());
                }
                Err(Some(until)) => {
                    let _ = tokio::time::timeout_at(until, wake.notified()).await;
                }
                Err(None) => wake.notified().await,
            }
        }
    }
}

impl Drop for Linger {
    fn drop(&mut self) {
        let _ = STAGE.try_with(|stage| stage.borrow_mut().linger = None);
        let held = STAGE
            .try_with(|stage| stage.borrow().held.clone())
            .ok()
            .flatten();
        if let Some(shared) = held {
            release_held(&shared);
        }
    }
}

/// One thread's flushes still waiting for the writer, oldest first, each with its deadline ([`ACK_WAIT`] after it
/// was queued), and how to wake the thread's [`Watch`] task, while one runs.
///
/// A timer per flush would cost a system call per flush: tokio wakes its driver through an eventfd whenever a timer
/// is set earlier than any other, and a flush's 5 s is usually the earliest. One task per thread watches the
/// oldest deadline instead, and sets a timer only when the first flush comes after a quiet spell and when the
/// deadline it waited for has passed: about once per `ACK_WAIT` under load.
#[derive(Default)]
struct Waiting {
    groups: VecDeque<(tokio::time::Instant, Arc<Slot>)>,
    watch: Option<Arc<Notify>>,
}

thread_local! {
    static WAITING: RefCell<Waiting> = RefCell::default();
}

/// Puts `group` under this thread's watch: starts the watch task if none runs, and wakes it if it was waiting for
/// a first group, with no deadline.
fn watch(group: &Arc<Slot>) {
    let (start, wake) = WAITING.with_borrow_mut(|waiting| {
        waiting.take_done();
        let first = waiting.groups.is_empty();
        waiting
            .groups
            .push_back((tokio::time::Instant::now() + ACK_WAIT, Arc::clone(group)));
        match &waiting.watch {
            Some(watch) => (None, first.then(|| Arc::clone(watch))),
            None => {
                let watch = Arc::new(Notify::new());
                waiting.watch = Some(Arc::clone(&watch));
                (Some(watch), None)
            }
        }
    });
    if let Some(wake) = wake {
        wake.notify_one();
    }
    if let Some(wake) = start {
        tokio::spawn(Watch.run(wake));
    }
}

impl Waiting {
    /// Drops the groups at the front that are settled: the writer has handled every record, or a write failed.
    fn take_done(&mut self) {
        while self
            .groups
            .front()
            .is_some_and(|(_, group)| group.is_final())
        {
            self.groups.pop_front();
        }
    }

    /// Gives up the groups whose deadline has passed (the writer is stuck, as on a stalled disk), so that their
    /// requests are refused with 503 rather than wait on ([`Slot::give_up`]); gives the next deadline.
    fn expire(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        loop {
            self.take_done();
            let (deadline, group) = self.groups.front()?;
            if *deadline > now {
                return Some(*deadline);
            }
            group.give_up();
            self.groups.pop_front();
        }
    }
}

/// The task that watches one thread's waiting flushes ([`Waiting`]). It waits for the oldest deadline, or with
/// nothing waiting for a first flush to wake it. Dropped (its runtime stopped), it lets the next flush on the thread
/// start another.
struct Watch;

impl Watch {
    async fn run(self, wake: Arc<Notify>) {
        loop {
            let next =
                WAITING.with_borrow_mut(|waiting| waiting.expire(tokio::time::Instant::now()));
            match next {
                Some(deadline) => {
                    let _ = tokio::time::timeout_at(deadline, wake.notified()).await;
                }
                None => wake.notified().await,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = WAITING.try_with(|waiting| waiting.borrow_mut().watch = None);
    }
}
