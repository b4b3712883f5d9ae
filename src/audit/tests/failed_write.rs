//! A write that fails (a full disk) loses no record nobody waits for: the response records and refusals' records of
//! the failed batch are written first by the next write, or by the thread's own retry a second later when nothing
//! else comes. A request record of the batch is not: its request was refused (503), and its response record is
//! never written.

use super::super::writer::NotWritten;
use super::given_up::records;
use super::{config, request, response};
use crate::audit::{AuditLog, Durability, Outcome, verify};

/// The thread's write of request 2 and response 1 fails; response 1 is written with request 3, the next write, in
/// a new segment; request 2 is not written and its request is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_response_record_whose_write_failed_is_written_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        AuditLog::start_without_thread(config(dir.path(), Durability::Batched, 64 << 20), None);
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    log.write_queued();
    ticket.written().await.unwrap();

    log.fill_disk();
    let refused = log.queue(request(2), log.reserve().await.unwrap()).unwrap();
    log.submit(response(1, 200, Outcome::Ok));
    log.write_queued();
    assert!(!log.healthy());
    assert!(matches!(refused.written().await, Err(NotWritten::Never)));

    log.start_thread();
    log.write(request(3)).await.unwrap();
    assert!(log.healthy());
    log.close();
    assert_eq!(
        records(dir.path()),
        [
            (1, "request".to_owned()),
            (1, "response 200 \"ok\"".to_owned()),
            (3, "request".to_owned()),
        ]
    );
    // One chain across the segment the failed write left and the one the next write opened: the three records
    // and the two segments' seals.
    let verified = verify(dir.path()).unwrap();
    assert_eq!((verified.records, verified.segments), (5, 2));
}

/// The same on a worker's write, with no record after it: the failed write hands writing to the thread, which wakes
/// to try the worker's failed records again by itself (once a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_response_record_whose_write_failed_on_a_worker_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        AuditLog::start_without_thread(config(dir.path(), Durability::Batched, 64 << 20), None);
    log.start_thread();
    log.write(request(1)).await.unwrap();

    log.fill_disk();
    let worker = log.hold_segment_writing();
    log.submit(response(1, 200, Outcome::Ok));
    worker.finish();
    assert!(!log.healthy());
    written_again(dir.path(), &log).await;
}

/// Waits (10 s at most) until request 1's response record is in the log, then checks the log is healthy and holds
/// exactly request 1's two records.
async fn written_again(dir: &std::path::Path, log: &AuditLog) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while records(dir).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the response record was not written again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(log.healthy());
    log.close();
    assert_eq!(
        records(dir),
        [
            (1, "request".to_owned()),
            (1, "response 200 \"ok\"".to_owned()),
        ]
    );
}

/// With no record coming after it, the thread tries the failed write's records again by itself (once a second):
/// the response record is written, and the log is healthy again, with nothing else written.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_thread_tries_a_failed_write_again_without_a_new_record() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        AuditLog::start_without_thread(config(dir.path(), Durability::Batched, 64 << 20), None);
    log.start_thread();
    log.write(request(1)).await.unwrap();

    log.fill_disk();
    log.submit(response(1, 200, Outcome::Ok));
    written_again(dir.path(), &log).await;
}
