//! Staging: the records of one turn of a worker's event loop go to the writer together (see [`Stage`]).

use std::cell::RefCell;
use std::sync::Arc;

use super::{ACK_WAIT, AuditLog, Job, Shared, Slot, report_refused};

/// Records nobody waits for (response records, refusals) staged on one thread in one turn at most; past this they
/// are queued at once. Request records need no such bound: each holds a place in the queue's capacity.
pub(in crate::audit) const STAGE_LIMIT: usize = 1024;

impl AuditLog {
    /// Stages a job on this thread when it runs a single-threaded runtime, with `waiter` (a request's slot, if
    /// one waits for it) to complete once it is written; gives the job back otherwise.
    pub(super) fn stage(&self, job: Job, waiter: Option<&Arc<Slot>>) -> Result<(), Job> {
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
                if waiter.is_none() {
                    if stage.unwaited == STAGE_LIMIT {
                        return Err(job);
                    }
                    stage.unwaited += 1;
                }
                stage.jobs.push((job, waiter.cloned()));
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
    /// Each job, with the slot of the request waiting for it (none for response records and refusals).
    jobs: Vec<(Job, Option<Arc<Slot>>)>,
    /// Jobs nobody waits for, among them.
    unwaited: usize,
    /// A flush task is on its way.
    scheduled: bool,
    /// The list of waiting requests a finished flush task left, for the next one to reuse.
    spare: Vec<Arc<Slot>>,
}

thread_local! {
    static STAGE: RefCell<Stage> = RefCell::default();
}

/// The task that hands a thread's staged request records to the writer. Dropped before it ran (its runtime
/// stopped), it still queues them, though their requests will not be forwarded.
struct Flush {
    shared: Option<Arc<Shared>>,
}

impl Flush {
    async fn run(mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        // Straight from this thread's stage into the queue, which keeps its capacity for the next turn.
        let (group, mut waiters, refused) = STAGE.with_borrow_mut(|stage| {
            stage.scheduled = false;
            let waited = stage.jobs.len() - std::mem::take(&mut stage.unwaited);
            let group = Arc::new(Slot::for_records(waited));
            let mut waiters = std::mem::take(&mut stage.spare);
            let jobs = stage.jobs.drain(..).map(|(mut job, waiter)| {
                if let Some(waiter) = waiter {
                    job.slot = Some(Arc::clone(&group));
                    waiters.push(waiter);
                }
                job
            });
            let refused = shared.push(jobs);
            (group, waiters, refused)
        });
        // The requests whose records could not be queued are refused (503) and need no log line; the other
        // records are reported.
        let (requests, others) = refused
            .iter()
            .partition::<Vec<&Job>, _>(|j| j.slot.is_some());
        if !requests.is_empty() {
            group.record_done(false);
        }
        report_refused(others.len());
        drop(refused);
        if waiters.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        let state = loop {
            match group.get() {
                0 => {}
                state => break state,
            }
            if tokio::time::timeout_at(deadline, group.changed.notified())
                .await
                .is_err()
            {
                break Slot::FAILED;
            }
        };
        for waiter in waiters.drain(..) {
            waiter.set(state);
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
            // Their requests go away with the runtime; the records are queued all the same.
            let (jobs, waiters): (Vec<Job>, Vec<_>) = staged.into_iter().unzip();
            for waiter in waiters.into_iter().flatten() {
                waiter.set(Slot::FAILED);
            }
            report_refused(shared.push(jobs).len());
        }
    }
}

/// Takes this thread's staged jobs, and lets the next one schedule a flush.
fn take_staged() -> Vec<(Job, Option<Arc<Slot>>)> {
    STAGE.with(|stage| {
        let mut stage = stage.borrow_mut();
        stage.scheduled = false;
        stage.unwaited = 0;
        std::mem::take(&mut stage.jobs)
    })
}
