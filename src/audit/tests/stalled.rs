//! A `write` of the log that does not return (a frozen file system: the disk neither takes the bytes nor fails the
//! call) makes the log say it has stalled, for `/readyz`, once it has waited a second, and no longer once it returns.
//! The stuck write is a real one: into a pipe whose buffer is full and whose reader does not read.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::failed_write::log_with_request_1;
use super::response;
use crate::audit::Outcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_write_that_does_not_return_is_reported_stalled_until_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let pipes = tempfile::tempdir().unwrap();
    let log = log_with_request_1(dir.path()).await;
    assert!(!log.stalled());

    let fifo = pipes.path().join("stuck");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let nonblocking = i32::try_from(rustix::fs::OFlags::NONBLOCK.bits()).unwrap();
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(nonblocking)
        .open(&fifo)
        .unwrap();
    let mut filler = OpenOptions::new()
        .write(true)
        .custom_flags(nonblocking)
        .open(&fifo)
        .unwrap();
    loop {
        match filler.write(&[b'x'; 4096]) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    log.write_segment_into(OpenOptions::new().write(true).open(&fifo).unwrap());

    log.submit(response(1, 200, Outcome::Ok));
    let started = Instant::now();
    let writer = std::thread::spawn({
        let log = Arc::clone(&log);
        move || log.write_queued()
    });
    while !log.stalled() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reported stalled"
        );
        assert!(!writer.is_finished(), "the write returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(1));

    // The reader reads: the write returns, and the log is no longer stalled.
    let mut buf = vec![0; 64 * 1024];
    while !writer.is_finished() {
        match reader.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    }
    writer.join().unwrap();
    assert!(!log.stalled());
    assert!(log.healthy());
}
