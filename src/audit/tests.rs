use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::record::Addressing;
use super::segment::{TAIL_WINDOW, list_segments};
use super::writer::{QUEUE_CAPACITY, QUEUE_LIMIT, STAGE_LIMIT};
use super::*;
use crate::ids::{Asid, InteractionId, PeerIdentity, TraceId};

mod failed_write;
mod given_up;
mod on_worker;
mod one_writer;
mod stalled;
mod tamper;

pub(super) fn config(dir: &Path, durability: Durability, segment_size: u64) -> AuditConfig {
    AuditConfig {
        dir: dir.to_path_buf(),
        durability,
        fsync_interval: Duration::from_millis(5),
        segment_size,
        instance: "test-1".into(),
    }
}

/// A permitted transaction on connection `n` whose trace id ends in `n`.
fn transaction(n: u64) -> Arc<Transaction> {
    let identity = PeerIdentity {
        subject: "CN=consumer.dev.localhost".into(),
        common_name: Some("consumer.dev.localhost".into()),
        dns_sans: Vec::new(),
        serial: "01".into(),
        fingerprint_sha256: "ab".repeat(32),
        issuer: "CN=Test CA".into(),
        not_after: 0,
    };
    Arc::new(Transaction {
        conn_id: n,
        peer: Arc::new(Peer::new(
            "127.0.0.1:50000".parse().unwrap(),
            None,
            &identity,
        )),
        method: http::Method::GET,
        policy_generation: 1,
        addressing: checked_addressing(n, "consumer.dev.localhost"),
        patients: None,
        access: None,
    })
}

/// The identifiers of a permitted request for the metadata interaction, its trace id ending in `n` (below
/// 10^12), its certificate name `fqdn`.
pub(super) fn checked_addressing(n: u64, fqdn: &str) -> Addressing {
    Addressing::Validated {
        trace_id: TraceId::parse(&format!("00000000-0000-4000-8000-{n:012}")).unwrap(),
        from: Asid::parse("200000000359").unwrap(),
        to: Asid::parse("918999198993").unwrap(),
        interaction: InteractionId::parse(
            "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
        )
        .unwrap(),
        target: crate::ssp::Target::parse(
            "https://provider.dev.localhost/B82617/STU3/1/gpconnect/metadata",
        )
        .unwrap(),
        fqdn: Arc::from(fqdn),
    }
}

pub(super) fn request(n: u64) -> Record {
    Record::permitted(&transaction(n), None)
}

pub(super) fn response(n: u64, status: u16, outcome: Outcome) -> Record {
    Record::completed(
        &transaction(n),
        Completion {
            status,
            bytes_in: 0,
            bytes_out: 10,
            upstream: Duration::from_millis(1),
            total: Duration::from_millis(2),
            retried: false,
            consumer_stalled: false,
            outcome,
        },
    )
}

/// The log as a crash leaves it: its writer gone (and with it the folder's writer lock, which the kernel lets go
/// when a process dies), its newest segment without the seal a clean stop writes.
fn crash(log: &AuditLog, dir: &Path) {
    log.close();
    let (_, path) = list_segments(dir).unwrap().pop().unwrap();
    let text = fs::read(&path).unwrap();
    let body = &text[..text.len() - 1];
    let last = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    assert!(
        body[last..].starts_with(b"{")
            && String::from_utf8_lossy(&body[last..]).contains("\"seal\"")
    );
    fs::write(&path, &text[..last]).unwrap();
}

pub(super) async fn write_n(log: &AuditLog, n: u64) {
    for i in 0..n {
        log.write(request(i)).await.unwrap();
    }
}

#[tokio::test]
async fn records_chain_across_segments_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Strict, 1024));
    write_n(&log, 30).await;
    log.close();
    let v = verify(dir.path()).unwrap();
    assert!(v.segments > 2, "{v:?}");
    assert!(v.last_sealed);
    // 30 requests plus one seal per segment.
    assert_eq!(v.records, 30 + v.segments as u64);
    use std::os::unix::fs::PermissionsExt;
    for (_, path) in list_segments(dir.path()).unwrap() {
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert_eq!(
        fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[tokio::test]
async fn a_restart_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let log = AuditLog::start(config(dir.path(), Durability::Batched, 1 << 20));
        write_n(&log, 5).await;
        log.close();
    }
    let v = verify(dir.path()).unwrap();
    assert_eq!((v.segments, v.records), (3, 18));
}

/// Simulates a crash: a segment left unsealed with half a record at the end.
#[tokio::test]
async fn a_torn_tail_is_set_aside_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Strict, 1 << 20));
    write_n(&log, 3).await;
    // As after kill -9: no seal. Then tear the end.
    crash(&log, dir.path());
    let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"seq":4,"instance":"test-1","ts":"2026"#)
        .unwrap();
    let err = verify(dir.path()).unwrap_err();
    assert!(err.problem.contains("torn"), "{err}");

    let log = AuditLog::start(config(dir.path(), Durability::Strict, 1 << 20));
    assert!(log.healthy());
    write_n(&log, 2).await;
    log.close();
    let v = verify(dir.path()).unwrap();
    assert_eq!(v.records, 3 + 1 + 2 + 1);
    let aside: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        fs::read(aside[0].path()).unwrap(),
        br#"{"seq":4,"instance":"test-1","ts":"2026"#
    );
    let first = fs::read_to_string(&path).unwrap();
    let seal: serde_json::Value = serde_json::from_str(first.lines().last().unwrap()).unwrap();
    assert_eq!(seal["sealed"], "recovered");
    assert_eq!(seal["torn_bytes"], 39);
}

/// Many requests at once on two threads: every one is answered, group commit writes fewer batches than
/// records, and the chain holds across rotations, in both durability modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_writes() {
    for durability in [Durability::Batched, Durability::Strict] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = writer_metrics();
        let log = AuditLog::start_with_metrics(
            config(dir.path(), durability, 256 << 10),
            Some(metrics.clone()),
        );
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    for i in 0..25 {
                        log.write(request(t * 100 + i)).await.unwrap();
                        log.submit(response(t * 100 + i, 200, Outcome::Ok));
                    }
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap();
        }
        log.close();
        let v = verify(dir.path()).unwrap();
        assert!(v.segments > 1, "{v:?}");
        assert_eq!(v.records, 64 * 25 * 2 + v.segments as u64, "{durability:?}");
        let batches = metrics.write_seconds.get_sample_count();
        assert!(
            batches < metrics.records.get(),
            "{durability:?}: {batches} writes for {} records",
            metrics.records.get()
        );
    }
}

/// The writer's metric handles, unregistered: records written and batches (`write`s) made.
pub(super) fn writer_metrics() -> AuditMetrics {
    AuditMetrics {
        records: prometheus::IntCounter::new("r", "r").unwrap(),
        write_seconds: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("w", "w"))
            .unwrap(),
        handoffs: prometheus::IntCounter::new("h", "h").unwrap(),
        on_thread: prometheus::IntGauge::new("t", "t").unwrap(),
    }
}

/// After a write that came within the linger of the one before, the writer lingers: a record nobody waits for (a
/// response record) stays queued until the next request record and goes out in its `write` (in strict mode, its
/// fsync) rather than in one of its own; with no request record to come, it goes out when the linger ends. A lone
/// write is not followed by a linger, and a refused request's record does not linger. On a multi-threaded runtime,
/// where records go straight to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn records_nobody_waits_for_go_out_with_the_next_request_record() {
    for durability in [Durability::Batched, Durability::Strict] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = writer_metrics();
        let log = AuditLog::start_lingering(
            config(dir.path(), durability, 64 << 20),
            Some(metrics.clone()),
            Duration::from_secs(3600),
        );
        // The first write alone: the response record after it is written at once, in a write of its own.
        log.write(request(0)).await.unwrap();
        log.submit(response(0, 200, Outcome::Ok));
        wait_for_records(&metrics, 2).await;
        assert_eq!(metrics.write_seconds.get_sample_count(), 2);
        // A second request record within the linger: the writer lingers after it.
        log.write(request(1)).await.unwrap();
        log.submit(response(1, 200, Outcome::Ok));
        // Time enough for a writer that does not linger to write the response record alone, which the count of
        // writes below would show.
        tokio::time::sleep(Duration::from_millis(100)).await;
        log.write(request(2)).await.unwrap();
        assert_eq!(metrics.records.get(), 5, "{durability:?}");
        assert_eq!(
            metrics.write_seconds.get_sample_count(),
            4,
            "{durability:?}: the response record had a write of its own"
        );
        // A refused request's `request` record, which nobody waits for, ends the linger: it goes out at once.
        log.submit(Record::refused(&transaction(3), "refused".into(), None));
        wait_for_records(&metrics, 6).await;
        log.close();
        assert_eq!(verify(dir.path()).unwrap().records, 7, "{durability:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let metrics = writer_metrics();
    let log = AuditLog::start_lingering(
        config(dir.path(), Durability::Batched, 64 << 20),
        Some(metrics.clone()),
        Duration::from_millis(50),
    );
    log.write(request(0)).await.unwrap();
    log.write(request(1)).await.unwrap();
    log.submit(response(1, 200, Outcome::Ok));
    wait_for_records(&metrics, 3).await;
    assert_eq!(metrics.write_seconds.get_sample_count(), 3);
    log.close();
}

/// Polls (up to 10 s) until `ready` holds.
pub(super) async fn until(what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (up to 10 s) until the writer has written `n` records.
pub(super) async fn wait_for_records(metrics: &AuditMetrics, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metrics.records.get() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} records written",
            metrics.records.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// While nothing can be written (here: the segment held, as by a write stuck on a stalled disk), a request
/// record is refused once the queue holds `QUEUE_CAPACITY`, and other records are kept up to `QUEUE_LIMIT`,
/// then dropped; everything queued is written once the writer is back. (On a multi-threaded runtime, where
/// records go straight to the queue; staging is tested below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_queue_is_bounded_while_the_disk_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
    let held = log.hold_segment();
    for i in 0..QUEUE_CAPACITY as u64 {
        log.submit(request(i));
    }
    assert_eq!(log.write(request(0)).await, Err(Unavailable));
    for i in 0..(QUEUE_LIMIT - QUEUE_CAPACITY + 10) as u64 {
        log.submit(request(i));
    }
    assert_eq!(log.queue_depth(), QUEUE_LIMIT as u64);
    drop(held);
    log.close();
    let v = verify(dir.path()).unwrap();
    assert_eq!(v.records, QUEUE_LIMIT as u64 + 1);
}

/// Recovery reads a segment's last [`TAIL_WINDOW`] bytes; a tear longer than that is still found whole.
#[tokio::test]
async fn recovery_of_a_long_segment_reads_its_tail() {
    for tear in [
        b"{\"seq\":".to_vec(),
        vec![b'x'; TAIL_WINDOW as usize + 4096],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
        let n = 2 * TAIL_WINDOW / 200;
        for i in 0..n {
            log.submit(request(i));
        }
        log.write(request(n)).await.unwrap();
        crash(&log, dir.path());
        let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        assert!(fs::metadata(&path).unwrap().len() > TAIL_WINDOW);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&tear)
            .unwrap();

        let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
        write_n(&log, 1).await;
        log.close();
        let v = verify(dir.path()).unwrap();
        assert_eq!(v.records, n + 1 + 1 + 1 + 1, "{v:?}");
        let text = fs::read_to_string(&path).unwrap();
        let seal: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(seal["sealed"], "recovered");
        assert_eq!(seal["torn_bytes"], tear.len() as u64);
    }
}

#[tokio::test]
async fn an_unwritable_directory_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    fs::write(&blocker, b"not a directory").unwrap();
    let log = AuditLog::start(config(&blocker.join("audit"), Durability::Strict, 1 << 20));
    assert!(!log.healthy());
    assert_eq!(log.write(request(1)).await, Err(Unavailable));
    log.close();
}

#[tokio::test]
async fn query_returns_whole_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 1 << 20));
    for (n, outcome) in [(1u64, Outcome::Ok), (2, Outcome::Denied), (3, Outcome::Ok)] {
        log.write(request(n)).await.unwrap();
        log.write(response(n, 200, outcome)).await.unwrap();
    }
    log.close();
    let denied = query(
        dir.path(),
        &Filter {
            outcome: Some("denied".into()),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(
        denied.len(),
        2,
        "the request and response of the denied transaction"
    );
    assert_eq!(denied[0]["kind"], "request");
    assert_eq!(denied[1]["outcome"], "denied");
    let all = query(
        dir.path(),
        &Filter {
            from: Some("200000000359".into()),
            ..Filter::default()
        },
    )
    .unwrap();
    assert_eq!(all.len(), 6);
    let none = query(
        dir.path(),
        &Filter {
            since: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
            ..Filter::default()
        },
    )
    .unwrap();
    assert!(none.is_empty());
}

/// On a single-threaded runtime, request records written in the same turn are staged and handed over together:
/// each request is acknowledged only once its record is written, in both durabilities.
#[tokio::test]
async fn records_staged_in_one_turn_are_written_together_and_each_acknowledged() {
    for durability in [Durability::Batched, Durability::Strict] {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::start(config(dir.path(), durability, 64 << 20));
        let writes = (0..64).map(|i| log.write(request(i)));
        let results = futures_join_all(writes).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        // Acknowledged means written: every record is on disk before close adds the seal.
        let text: String = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|(_, path)| fs::read_to_string(path).unwrap())
            .collect();
        assert_eq!(text.lines().count(), 64, "{durability:?}");
        log.close();
        assert_eq!(verify(dir.path()).unwrap().records, 65);
    }
    // A closed log refuses staged records too.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
    log.close();
    let results = futures_join_all((0..3).map(|i| log.write(request(i)))).await;
    assert!(
        results.iter().all(|r| *r == Err(Unavailable)),
        "{results:?}"
    );
}

/// A staged request record nobody writes (here: the segment held, as by a stalled disk) is refused after 5 s by
/// its thread's watch, with no timer of its own, and withdrawn: once the writer is back it writes the records that
/// came after, not the withdrawn ones. In between, with nothing waiting, the watch waits for a first flush with no
/// deadline, and the second refusal below needs the flush to wake it.
#[tokio::test]
async fn a_staged_request_record_left_unanswered_is_refused_after_5_s() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
    for n in [1, 3] {
        let held = log.hold_segment();
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(30), log.write(request(n))).await;
        assert_eq!(result, Ok(Err(Unavailable)), "record {n}");
        assert!(started.elapsed() >= Duration::from_secs(5), "record {n}");
        drop(held);
        log.write(request(n + 1)).await.unwrap();
    }
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, 3);
    assert_eq!(given_up::trace_ids(dir.path()), [2, 4]);
}

/// On a worker's (single-threaded) runtime, records nobody waits for are staged with the turn's request records,
/// up to `STAGE_LIMIT` per turn; past that they are queued at once. Each is written either way, and a runtime that
/// stops before its flush task runs still hands its staged records over.
#[test]
fn records_nobody_waits_for_are_staged_per_turn_and_bounded() {
    const N: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 64 << 20));
    let held = log.hold_segment();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..N {
            log.submit(request(i));
        }
        // In this turn: the first STAGE_LIMIT are staged, the rest queued.
        assert_eq!(log.queue_depth(), N - STAGE_LIMIT as u64);
        tokio::task::yield_now().await;
        assert_eq!(log.queue_depth(), N);
    });
    // Staged, then the runtime dropped before the flush task ran: queued all the same.
    rt.block_on(async {
        log.submit(request(N));
        assert_eq!(log.queue_depth(), N);
    });
    drop(rt);
    assert_eq!(log.queue_depth(), N + 1);
    drop(held);
    log.close();
    assert_eq!(verify(dir.path()).unwrap().records, N + 1 + 1);
}

/// Polls every future on this task until all are done (a join of our own: no futures crate in the build).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, output) in pending.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *output = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Text a consumer sent cannot drive the operator's terminal through `ssp audit query`'s table.
#[test]
fn the_table_escapes_control_and_bidirectional_characters() {
    let record = serde_json::json!({
        "ts": "2026-12-01T00:00:00.000000Z",
        "seq": 7,
        "kind": "request",
        "trace_id": "\u{1b}[2J\u{9b}31m",
        "from": "abc\u{202e}fed",
        "to": "\u{2066}x\u{2069}",
        "interaction": "urn:nhs:names:services:gpconnect:\u{7}",
        "method": "GET",
        "decision": "deny",
        "reason": "MISSING_OR_INVALID_HEADER_Ssp-TraceID\r\n",
    });
    let row = table_row(&record);
    assert!(
        !row.chars()
            .any(|c| c.is_control() || ('\u{2066}'..='\u{2069}').contains(&c) || c == '\u{202e}'),
        "{row:?}"
    );
    for escaped in [
        r"\u{1b}[2J\u{9b}31m",
        r"abc\u{202e}fed",
        r"\u{2066}x\u{2069}",
        r"\u{7}",
        r"\u{d}\u{a}",
    ] {
        assert!(row.contains(escaped), "{escaped} in {row:?}");
    }
    // Plain text, non-ASCII included, is shown as it is.
    let plain =
        table_row(&serde_json::json!({ "kind": "request", "from": "Caf\u{e9} 200000000359" }));
    assert!(plain.contains("Caf\u{e9} 200000000359"), "{plain}");
}
