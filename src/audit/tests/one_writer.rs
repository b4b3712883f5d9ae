//! One writer a log: the flock on `audit.dir` that keeps a second proxy, or a command, from writing the chain
//! beside the one that holds it.

use std::time::Duration;

use super::super::segment::lock_dir;

#[test]
fn one_writer_holds_the_folder_and_the_next_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let held = lock_dir(dir.path(), Duration::ZERO).unwrap();
    // Held: a writer that waits no longer than 100 ms is refused, naming the folder.
    let err = lock_dir(dir.path(), Duration::from_millis(100)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    assert!(
        err.to_string().contains("being written by another process"),
        "{err}"
    );
    // Let go while another waits: the waiter has it at once.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _ = released.recv();
        drop(held);
    });
    let path = dir.path().to_path_buf();
    let waiter = std::thread::spawn(move || lock_dir(&path, Duration::from_secs(20)).map(|_| ()));
    release.send(()).unwrap();
    holder.join().unwrap();
    waiter.join().unwrap().unwrap();
}
