//! A removed, reordered, edited or torn record, a segment's seal cut off and a segment removed are each found by
//! `verify`, at the first bad record.

use std::fs::{self, OpenOptions};
use std::path::Path;

use super::super::segment::list_segments;
use super::{config, write_n};
use crate::audit::{AuditLog, Broken, Durability, verify};

fn tamper(dir: &Path, f: impl FnOnce(&mut Vec<String>)) -> Broken {
    let (_, path) = list_segments(dir).unwrap().into_iter().next().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    f(&mut lines);
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    verify(dir).unwrap_err()
}

async fn fresh_log() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 1 << 20));
    write_n(&log, 6).await;
    log.close();
    assert!(verify(dir.path()).is_ok());
    dir
}

#[tokio::test]
async fn tampering_is_detected_at_the_first_bad_record() {
    let dir = fresh_log().await;
    let err = tamper(dir.path(), |l| {
        l[2] = l[2].replace("918999198993", "918999198994")
    });
    assert_eq!((err.line, err.seq), (4, Some(4)), "{err}");

    let dir = fresh_log().await;
    let err = tamper(dir.path(), |l| {
        l.remove(2);
    });
    assert_eq!(err.line, 3, "{err}");

    let dir = fresh_log().await;
    let err = tamper(dir.path(), |l| l.swap(1, 2));
    assert_eq!(err.line, 2, "{err}");

    let dir = fresh_log().await;
    let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = verify(dir.path()).unwrap_err();
    assert!(err.problem.contains("torn"), "{err}");
}

#[tokio::test]
async fn removing_a_sealed_segment_or_its_seal_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::start(config(dir.path(), Durability::Batched, 512));
    write_n(&log, 20).await;
    log.close();
    let segments = list_segments(dir.path()).unwrap();
    assert!(segments.len() >= 3);
    // Truncate the first segment at a record boundary: its seal is gone.
    let text = fs::read_to_string(&segments[0].1).unwrap();
    let cut: Vec<&str> = text.lines().collect();
    fs::write(&segments[0].1, cut[..cut.len() - 1].join("\n") + "\n").unwrap();
    let err = verify(dir.path()).unwrap_err();
    assert!(err.problem.contains("seal"), "{err}");
    fs::write(&segments[0].1, text).unwrap();
    assert!(verify(dir.path()).is_ok());
    // Remove a middle segment.
    fs::remove_file(&segments[1].1).unwrap();
    let err = verify(dir.path()).unwrap_err();
    assert_eq!(err.segment, segments[2].1);
}
