//! Records written by the worker that staged them (batched mode), and writing handed to the `ssp-audit` thread
//! when a worker's write is slow.

use std::sync::Arc;
use std::time::Duration;

use super::super::{AuditLog, Durability, Outcome, Unavailable, verify};
use super::{config, request, response, until, writer_metrics};

/// Writes request record `n` on a task of its own, and returns once the record waits in the queue, unanswered.
async fn queued_write(
    log: &Arc<AuditLog>,
    n: u64,
) -> tokio::task::JoinHandle<Result<(), Unavailable>> {
    let waiting = tokio::spawn({
        let log = Arc::clone(log);
        async move { log.write(request(n)).await }
    });
    until("the record reaches the queue", || log.queue_depth() == 1).await;
    assert!(!waiting.is_finished());
    waiting
}

/// On a worker's runtime in batched mode the worker writes its turn's records itself: on a log whose `ssp-audit`
/// thread has not started, a request record is acknowledged and its response record written all the same. In
/// strict mode the thread writes (and fsyncs) them: the record waits in its queue until the thread starts.
#[tokio::test]
async fn a_workers_records_are_written_by_the_worker_in_batched_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = writer_metrics();
    let log = AuditLog::start_without_thread(
        config(dir.path(), Durability::Batched, 64 << 20),
        Some(metrics.clone()),
    );
    log.write(request(0)).await.unwrap();
    log.submit(response(0, 200, Outcome::Ok));
    tokio::task::yield_now().await;
    assert_eq!(metrics.records.get(), 2);
    assert_eq!(log.queue_depth(), 0);
    assert_eq!(metrics.handoffs.get(), 0);
    log.start_thread();
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 3);

    let dir = tempfile::tempdir().unwrap();
    let log =
        AuditLog::start_without_thread(config(dir.path(), Durability::Strict, 64 << 20), None);
    let waiting = queued_write(&log, 0).await;
    log.start_thread();
    waiting.await.unwrap().unwrap();
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 2);
}

/// A worker's slow write hands writing to the thread (counted, and `ssp_audit_writes_on_thread` set): the next
/// record waits in the thread's queue rather than being written by the worker. Once the thread's writes have been
/// fast for the hand-back period, the workers write again. The chain is one throughout. (The thread's turns run
/// by hand here, so that who writes each record is known.)
#[tokio::test]
async fn a_slow_write_hands_writing_to_the_thread_until_writes_are_fast() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = writer_metrics();
    let log = AuditLog::start_without_thread(
        config(dir.path(), Durability::Batched, 64 << 20),
        Some(metrics.clone()),
    );
    // Every write counts as slow: the first one hands off.
    log.tune(Duration::ZERO, Duration::ZERO);
    log.write(request(0)).await.unwrap();
    assert_eq!(metrics.handoffs.get(), 1);
    assert_eq!(metrics.on_thread.get(), 1);
    // Fast again from here; the thread must write the next record.
    log.tune(Duration::from_secs(3600), Duration::ZERO);
    let waiting = queued_write(&log, 1).await;
    log.write_queued();
    waiting.await.unwrap().unwrap();
    // That fast write gave writing back: with no thread to write it, the worker writes the next record.
    assert_eq!(metrics.on_thread.get(), 0);
    log.write(request(2)).await.unwrap();
    assert_eq!(metrics.records.get(), 3);
    assert_eq!(metrics.handoffs.get(), 1);
    log.start_thread();
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 4);
}

/// A worker that finds the segment held by another writer does not wait for it: its records go to the thread's
/// queue, and are written (and the request woken) by the thread once the lock is let go. Not a hand-off: the
/// workers go on writing.
#[tokio::test]
async fn a_worker_finding_the_segment_held_queues_its_records_for_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = writer_metrics();
    let log = AuditLog::start_with_metrics(
        config(dir.path(), Durability::Batched, 64 << 20),
        Some(metrics.clone()),
    );
    let held = log.hold_segment();
    let waiting = queued_write(&log, 0).await;
    drop(held);
    waiting.await.unwrap().unwrap();
    assert_eq!(metrics.handoffs.get(), 0);
    assert_eq!(metrics.on_thread.get(), 0);
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 2);
}

/// A worker does not rotate: once its write has filled the segment, its next records go to the thread, which seals
/// the full segment, opens the next and writes them there.
#[tokio::test]
async fn a_full_segment_is_rotated_by_the_thread_not_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start_without_thread(config(dir.path(), Durability::Batched, 512), None);
    // One request record is over 512 bytes: the worker writes it and leaves the segment full.
    log.write(request(0)).await.unwrap();
    let waiting = queued_write(&log, 1).await;
    assert_eq!(super::list_segments(dir.path()).unwrap().len(), 1);
    log.start_thread();
    waiting.await.unwrap().unwrap();
    log.close();
    // Each request record fills a segment: three segments, two rotation seals and the shutdown seal.
    assert_eq!(super::list_segments(dir.path()).unwrap().len(), 3);
    assert_eq!(verify(dir.path()).unwrap().records, 5);
}

/// A worker that finds the segment held by another worker that is writing queues its records without waking the
/// thread, and the writing worker writes them after its own: here on a log without its thread, so that nothing else
/// could.
#[tokio::test]
async fn records_queued_while_a_worker_writes_are_written_by_that_worker() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = writer_metrics();
    let log = AuditLog::start_without_thread(
        config(dir.path(), Durability::Batched, 64 << 20),
        Some(metrics.clone()),
    );
    let writing = log.hold_segment_writing();
    let waiting = queued_write(&log, 0).await;
    writing.finish();
    assert_eq!(log.queue_depth(), 0);
    waiting.await.unwrap().unwrap();
    assert_eq!(metrics.records.get(), 1);
    assert_eq!(metrics.handoffs.get(), 0);
    log.start_thread();
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 2);
}

/// A writing worker that cannot write what was queued meanwhile (here: the segment is full, and rotating is the
/// thread's) wakes the thread for it as it lets go, the push having woken no one: the thread rotates and writes it.
#[tokio::test]
async fn what_a_writing_worker_leaves_queued_wakes_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 512));
    // One request record is over 512 bytes: the worker writes it and leaves the segment full.
    log.write(request(0)).await.unwrap();
    let writing = log.hold_segment_writing();
    let waiting = queued_write(&log, 1).await;
    writing.finish();
    let answered = tokio::time::timeout(Duration::from_secs(3), waiting).await;
    assert!(
        matches!(answered, Ok(Ok(Ok(())))),
        "the queued record was not written: {answered:?}"
    );
    log.close();
    assert_eq!(super::list_segments(dir.path()).unwrap().len(), 3);
}

/// A worker lingers as the thread does. After a flush that came within the linger (2 ms) of the one before, a
/// response record staged in a later turn is held, neither queued nor written, and goes out in the next request
/// record's `write`; with no request record to come it is written when the linger ends (its own, when the linger task
/// was waiting for an earlier one's). A lone flush is not followed by a linger, a refused request's record is never
/// held, and records held when the log closes, or when the
/// runtime stops, are written all the same. (Tokio's clock is paused: the linger ends when the test lets it.)
#[test]
fn a_worker_holds_response_records_for_the_next_request_record_while_it_lingers() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = writer_metrics();
    let log = AuditLog::start_without_thread(
        config(dir.path(), Durability::Batched, 64 << 20),
        Some(metrics.clone()),
    );
    let writes = || metrics.write_seconds.get_sample_count();
    let paused = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let rt = paused();
    rt.block_on(async {
        // A lone flush: the response record after it is written at once, in a flush of its own.
        log.write(request(0)).await.unwrap();
        log.submit(response(0, 200, Outcome::Ok));
        settle().await;
        assert_eq!((metrics.records.get(), writes()), (2, 2));
        // A flush within the linger of the one before: the response record after it is held.
        log.write(request(1)).await.unwrap();
        log.submit(response(1, 200, Outcome::Ok));
        settle().await;
        assert_eq!((metrics.records.get(), writes()), (3, 3));
        assert_eq!(log.queue_depth(), 0);
        // The next request record takes it: one write for both.
        log.write(request(2)).await.unwrap();
        assert_eq!((metrics.records.get(), writes()), (5, 4));
        // With no request record to come, the linger's end writes it.
        log.submit(response(2, 200, Outcome::Ok));
        settle().await;
        assert_eq!(metrics.records.get(), 5);
        tokio::time::sleep(Duration::from_millis(3)).await;
        assert_eq!((metrics.records.get(), writes()), (6, 5));
        // A refused request's record, which nobody waits for, is not held.
        log.write(request(3)).await.unwrap();
        log.submit(super::super::Record::refused(
            &super::transaction(4),
            "refused".into(),
            None,
        ));
        settle().await;
        assert_eq!((metrics.records.get(), writes()), (8, 7));
        // Held while the linger task waits for the end of an earlier linger: it finds the record there, and writes
        // it at the end of the record's own linger (2 ms after the flush before it).
        log.write(request(7)).await.unwrap();
        log.submit(response(7, 200, Outcome::Ok));
        settle().await;
        tokio::time::advance(Duration::from_micros(1500)).await;
        log.write(request(8)).await.unwrap();
        assert_eq!((metrics.records.get(), writes()), (11, 9));
        log.submit(response(8, 200, Outcome::Ok));
        tokio::time::advance(Duration::from_micros(700)).await;
        settle().await;
        assert_eq!(metrics.records.get(), 11);
        // (Tokio's timers fire on the millisecond tick after their deadline.)
        tokio::time::advance(Duration::from_micros(2000)).await;
        settle().await;
        assert_eq!((metrics.records.get(), writes()), (12, 10));
        // Held when the runtime stops: queued as its tasks are dropped.
        log.write(request(9)).await.unwrap();
        log.submit(response(3, 200, Outcome::Ok));
        settle().await;
        assert_eq!((metrics.records.get(), log.queue_depth()), (13, 0));
    });
    drop(rt);
    assert_eq!(log.queue_depth(), 1);
    log.write_queued();
    // Held when the log closes, on the thread that holds them: written before the seal.
    let rt = paused();
    rt.block_on(async {
        log.write(request(5)).await.unwrap();
        log.write(request(6)).await.unwrap();
        log.submit(response(6, 200, Outcome::Ok));
        settle().await;
        assert_eq!(metrics.records.get(), 16);
        log.start_thread();
        log.close();
    });
    assert_eq!(verify(dir.path()).unwrap().records, 18);
}

/// Lets the runtime run what is ready (a flush task, and what it wakes) without letting tokio's paused clock move.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}
