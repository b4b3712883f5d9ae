//! A write that fails (a full disk) loses no record nobody waits for: the response records and refusals' records of
//! the failed batch are written again by the thread, right after the next write that succeeds, or a second later
//! when nothing else comes. A request record of the batch is not: its request was refused (503), and its response
//! record is never written. Past [`MAX_BATCH`] of them, the rest are given up and what is queued still moves.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::super::writer::{MAX_BATCH, NotWritten};
use super::given_up::records;
use super::{config, request, response};
use crate::audit::{AuditLog, Durability, Outcome, verify};

/// A batched log, its thread not started, with request 1's record written (by hand).
pub(super) async fn log_with_request_1(dir: &Path) -> Arc<AuditLog> {
    let log = AuditLog::start_without_thread(config(dir, Durability::Batched, 64 << 20), None);
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    log.write_queued();
    ticket.written().await.unwrap();
    log
}

/// The disk fills, and no new segment can be made either, until [`room_again`]: the folder is moved away (to the
/// path returned) and a file takes its place.
fn disk_full(dir: &Path, log: &AuditLog) -> std::path::PathBuf {
    log.fill_disk();
    let away = dir.with_extension("away");
    std::fs::rename(dir, &away).unwrap();
    std::fs::write(dir, b"not a folder").unwrap();
    away
}

fn room_again(dir: &Path, away: &Path) {
    std::fs::remove_file(dir).unwrap();
    std::fs::rename(away, dir).unwrap();
}

/// Waits (`within` at most) until the log holds `n` records of requests and responses.
async fn wait_for_records(dir: &Path, n: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while records(dir).len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the kept records were not written again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The write of request 2 and response 1 fails; response 1 is written right after request 3, the next write, which
/// found room (a new segment); request 2 is not written and its request is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_response_record_whose_write_failed_is_written_after_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_request_1(dir.path()).await;

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
            (3, "request".to_owned()),
            (1, "response 200 \"ok\"".to_owned()),
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
    let log = log_with_request_1(dir.path()).await;
    log.start_thread();

    log.fill_disk();
    let worker = log.hold_segment_writing();
    log.submit(response(1, 200, Outcome::Ok));
    worker.finish();
    assert!(!log.healthy());
    written_again(dir.path(), &log).await;
}

/// Waits (10 s at most) until request 1's response record is in the log, then checks the log is healthy and holds
/// exactly request 1's two records.
async fn written_again(dir: &Path, log: &AuditLog) {
    wait_for_records(dir, 2, Duration::from_secs(10)).await;
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
    let log = log_with_request_1(dir.path()).await;
    log.start_thread();

    log.fill_disk();
    log.submit(response(1, 200, Outcome::Ok));
    written_again(dir.path(), &log).await;
}

/// More records left by failed writes than are kept: the rest are given up, what is queued after them is still
/// taken (and, the disk still full, given up too) instead of waiting behind them; once there is room the thread
/// writes the kept ones by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn past_the_kept_records_the_rest_are_given_up_and_the_queue_still_moves() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_request_1(dir.path()).await;

    let away = disk_full(dir.path(), &log);
    for _ in 0..MAX_BATCH + 10 {
        log.submit(response(1, 200, Outcome::Ok));
    }
    log.write_queued();
    assert_eq!(log.queued_and_unwritten(), (10, MAX_BATCH));
    log.write_queued();
    assert_eq!(log.queued_and_unwritten(), (0, MAX_BATCH));
    log.submit(response(2, 200, Outcome::Ok));
    log.write_queued();
    assert_eq!(log.queued_and_unwritten(), (0, MAX_BATCH));
    assert!(!log.healthy());

    room_again(dir.path(), &away);
    // Room again: the thread writes the kept records a chunk at a time, each chunk at once after the one before
    // (a chunk a second would take 16 s).
    log.start_thread();
    wait_for_records(dir.path(), 1 + MAX_BATCH, Duration::from_secs(8)).await;
    assert!(log.healthy());
    log.close();
    let written = records(dir.path());
    assert_eq!(written.len(), 1 + MAX_BATCH);
    assert!(
        written[1..]
            .iter()
            .all(|(n, kind)| *n == 1 && kind.starts_with("response"))
    );
    assert!(verify(dir.path()).is_ok());
}

/// A disk with less room than a chunk of kept records: each failed attempt halves the chunk the thread writes again
/// (64, 32, 16, 8), and each that goes in doubles it, so that a little room takes a few records.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_failed_retry_halves_the_chunk_and_a_good_one_doubles_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_request_1(dir.path()).await;
    let away = disk_full(dir.path(), &log);
    for _ in 0..100 {
        log.submit(response(1, 200, Outcome::Ok));
    }
    log.write_queued();
    assert_eq!(log.queued_and_unwritten(), (0, 100));
    let mut chunks = Vec::new();
    for _ in 0..3 {
        chunks.push(log.retry_now());
        log.write_queued();
    }
    assert_eq!(chunks, [64, 32, 16]);
    assert_eq!(log.queued_and_unwritten(), (0, 100));

    room_again(dir.path(), &away);
    assert_eq!(log.retry_now(), 8);
    log.write_queued();
    assert_eq!(log.queued_and_unwritten(), (0, 92));
    assert_eq!(records(dir.path()).len(), 1 + 8);
    assert_eq!(log.retry_now(), 16);

    log.start_thread();
    log.close();
    assert_eq!(records(dir.path()).len(), 1 + 100);
    assert!(verify(dir.path()).is_ok());
}

/// A retry that fails leaves the log's health as it was: that kept records do not fit says nothing of whether new
/// ones do. Here a new record went in (healthy) before the retry of response 1 failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_failed_retry_leaves_the_log_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_request_1(dir.path()).await;
    let away = disk_full(dir.path(), &log);
    log.submit(response(1, 200, Outcome::Ok));
    log.write_queued();
    assert!(!log.healthy());

    room_again(dir.path(), &away);
    let ticket = log.queue(request(2), log.reserve().await.unwrap()).unwrap();
    log.write_queued();
    ticket.written().await.unwrap();
    assert!(log.healthy());
    log.fill_disk();
    log.write_queued();
    assert_eq!(log.queued_and_unwritten(), (0, 1));
    assert!(log.healthy());

    log.start_thread();
    log.close();
    assert_eq!(
        records(dir.path()),
        [
            (1, "request".to_owned()),
            (2, "request".to_owned()),
            (1, "response 200 \"ok\"".to_owned()),
        ]
    );
}
