//! A request that stops waiting for its request record (5 s, as on a stalled disk) leaves no `request` record
//! without its `response` record: withdrawn if the writer had not taken it, followed by its response record if the
//! writer was writing it. On a worker's runtime (staged records) and on a multi-threaded one (queued at once).

use std::path::Path;
use std::time::Duration;

use super::super::writer::NotWritten;
use super::{config, request, response};
use crate::audit::{AuditLog, Durability, Outcome, verify};

/// The trace-id numbers (see `checked_addressing`) of the records in the log, in order, with the kind and, for a
/// response record, its status and outcome.
pub(super) fn records(dir: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for (_, path) in super::list_segments(dir).unwrap() {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(trace_id) = record["trace_id"].as_str() else {
                continue;
            };
            let n = trace_id.rsplit('-').next().unwrap().parse().unwrap();
            let kind = match record["kind"].as_str().unwrap() {
                "response" => format!("response {} {}", record["status"], record["outcome"]),
                kind => kind.to_owned(),
            };
            out.push((n, kind));
        }
    }
    out
}

/// The trace-id numbers of the log's request records, in order.
pub(super) fn trace_ids(dir: &Path) -> Vec<u64> {
    records(dir)
        .into_iter()
        .filter(|(_, kind)| kind == "request")
        .map(|(n, _)| n)
        .collect()
}

/// Held before the writer takes it, record 1 is given up after 5 s and withdrawn; record 2, after the writer is
/// back, is written alone.
async fn withdrawn(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), durability, 64 << 20));
    let held = log.hold_segment();
    let started = tokio::time::Instant::now();
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(30), ticket.written()).await;
    assert!(matches!(waited, Ok(Err(NotWritten::Never))), "{waited:?}");
    assert!(started.elapsed() >= Duration::from_secs(5));
    drop(held);
    log.write(request(2)).await.unwrap();
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 2);
    assert_eq!(records(dir.path()), [(2, "request".to_owned())]);
}

/// Taken by the writer (here: by hand, on a log without its thread) and not yet written, as by a `write` stuck on
/// a frozen file system, record 1 is given up after 5 s while in flight; the response record queued after it
/// follows it into the log once the write goes through, before record 2.
async fn in_flight(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start_without_thread(config(dir.path(), durability, 64 << 20), None);
    let started = tokio::time::Instant::now();
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    super::until("record 1 reaches the queue", || log.queue_depth() == 1).await;
    let taken = log.take_queued();
    let waited = tokio::time::timeout(Duration::from_secs(30), ticket.written()).await;
    let Ok(Err(NotWritten::InFlight(request_1))) = waited else {
        panic!("{waited:?}");
    };
    assert!(started.elapsed() >= Duration::from_secs(5));
    log.submit_after(response(1, 503, Outcome::Denied), request_1);
    taken.write();
    log.start_thread();
    log.write(request(2)).await.unwrap();
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 4);
    assert_eq!(
        records(dir.path()),
        [
            (1, "request".to_owned()),
            (1, "response 503 \"denied\"".to_owned()),
            (2, "request".to_owned()),
        ]
    );
}

/// A request dropped while it waits for its record (its consumer went away; here on a worker's runtime, whose
/// records are staged and whose watch would give the record up after 5 s): its exchange's `response` record is
/// queued through `submit_response`, which gives the untaken record up, so that neither is written. Before, the
/// response record was written alone.
#[tokio::test]
async fn a_request_that_goes_away_before_its_record_is_taken_leaves_no_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
    // Staged: nothing takes it before this turn ends.
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    let queued = ticket.request();
    drop(ticket);
    log.submit_response(response(1, 0, Outcome::ClientClosed), &queued);
    log.write(request(2)).await.unwrap();
    log.close();
    assert_eq!(records(dir.path()), [(2, "request".to_owned())]);
}

/// Queued behind a worker that holds the segment and is writing (its push woke no one), record 1 is given up after
/// 5 s and withdrawn: the writing worker, taking the queue after its own write, leaves it out. On a log without its
/// thread, so that only that worker could write it.
#[tokio::test]
async fn a_record_given_up_behind_a_writing_worker_is_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        AuditLog::start_without_thread(config(dir.path(), Durability::Batched, 64 << 20), None);
    let writing = log.hold_segment_writing();
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(30), ticket.written()).await;
    assert!(matches!(waited, Ok(Err(NotWritten::Never))), "{waited:?}");
    writing.finish();
    log.write(request(2)).await.unwrap();
    log.start_thread();
    log.close();
    assert_eq!(records(dir.path()), [(2, "request".to_owned())]);
}

#[tokio::test]
async fn a_staged_record_given_up_before_it_is_taken_is_withdrawn() {
    withdrawn(Durability::Batched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_queued_record_given_up_before_it_is_taken_is_withdrawn() {
    withdrawn(Durability::Strict).await;
}

#[tokio::test]
async fn a_staged_record_given_up_during_its_write_is_followed_by_its_response() {
    in_flight(Durability::Strict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_queued_record_given_up_during_its_write_is_followed_by_its_response() {
    in_flight(Durability::Batched).await;
}

/// A response record that follows a request record whose write failed is not written either, even once writes
/// succeed again. The request record is given up during its write (taken by hand, on a log without its thread),
/// which then fails: the audit folder's parent is a file, until it is a folder again.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_record_following_one_that_failed_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent");
    std::fs::write(&parent, b"not a directory").unwrap();
    let log = AuditLog::start_without_thread(
        config(&parent.join("audit"), Durability::Batched, 64 << 20),
        None,
    );
    let ticket = log.queue(request(1), log.reserve().await.unwrap()).unwrap();
    let taken = log.take_queued();
    let Err(NotWritten::InFlight(request_1)) = ticket.written().await else {
        panic!("not in flight");
    };
    // The write of record 1 fails.
    taken.write();
    assert!(request_1.ended());
    log.submit_after(response(1, 503, Outcome::Denied), request_1);
    std::fs::remove_file(&parent).unwrap();
    std::fs::create_dir(&parent).unwrap();
    log.start_thread();
    log.write(request(2)).await.unwrap();
    log.close();
    assert_eq!(records(&parent.join("audit")), [(2, "request".to_owned())]);
}
