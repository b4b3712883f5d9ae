//! Staging: the records of one turn of a worker's event loop go to the writer together (see [`Stage`]).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

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
    /// woken by the flush task once it is written); gives the job back otherwise.
    pub(super) fn stage(&self, job: Job) -> Result<(), Job> {
        let single = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if !single {
            return Err(job);
        }
        let log = Arc::as_ptr(&self.shared) as usize;
        STAGE
            .with(|stage| {
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
                Ok(!std::mem::replace(&mut stage.scheduled, true))
            })
            .map(|first| {
                if first {
                    // Runs after the tasks already woken in this turn, which stage their records first. Spawned with
                    // the stage released: on a runtime that is shutting down the task is dropped at once, and its drop
                    // queues the stage.
                    tokio::spawn(
                        Flush {
                            shared: Some(Arc::clone(&self.shared)),
                        }
                        .run(),
                    );
                }
            })
    }
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
    /// The list of waiting requests a finished flush task left, for the next one to reuse.
    spare: Vec<Arc<Slot>>,
    /// Spare record buffers ([`spare_buffer`]), at most [`CACHED_BUFFERS`].
    buffers: Vec<Vec<u8>>,
}

thread_local! {
    static STAGE: RefCell<Stage> = RefCell::default();
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
        std::mem::take(&mut stage.jobs)
    })
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
