//! The patient index beside the audit log: `<audit.dir>/patient-index.jsonl`, one line per patient a record names
//! (`hmac`, `check`, `in`, `key`, `segment`, `seq`, `instance`, `conn_id`, `trace_id`), and
//! `patient-index.state`, where the next read of the log starts (segment, byte offset, the `seq` expected there).
//!
//! The index is made from the chained log only (each record's `patients` field), so it holds nothing the log does
//! not and can be deleted and rebuilt at any time ([`rebuild`]); it is brought up to date by whoever reads it
//! ([`catch_up`]), reading only the records written since, so the proxy itself never writes it and a request
//! pays nothing for it. Complete lines only: a line being written is read on the next pass. One reader at a time
//! (an exclusive lock on the index file).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::segment::list_segments;

/// The index file's name in `audit.dir`.
pub const INDEX_FILE: &str = "patient-index.jsonl";
/// The index's read position's name in `audit.dir`.
pub const STATE_FILE: &str = "patient-index.state";

/// One patient named by one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub hmac: String,
    pub check: String,
    #[serde(rename = "in")]
    pub source: String,
    /// The id of the key the record's HMAC was made with.
    pub key: String,
    /// The segment's number (`audit-<segment>.jsonl`).
    pub segment: u64,
    pub seq: u64,
    pub instance: String,
    pub conn_id: u64,
    pub trace_id: Option<String>,
}

/// Where the next pass reads from, and what the index has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    segment: u64,
    offset: u64,
    /// The `seq` of the last record read (0 before any).
    seq: u64,
    /// Records with patients, by the id of the key their HMACs were made with.
    keys: BTreeMap<String, u64>,
}

/// An index brought up to date.
#[derive(Debug)]
pub struct Index {
    dir: PathBuf,
    /// Held for the index's life: one reader at a time.
    _lock: File,
    state: State,
}

/// Why the index cannot answer.
#[derive(Debug)]
pub enum IndexError {
    Io(PathBuf, io::Error),
    /// The position the index would resume at does not hold the record it expects: the log is not the one it was
    /// made from.
    Mismatch(String),
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::Io(path, e) => write!(f, "{}: {e}", path.display()),
            IndexError::Mismatch(why) => write!(f, "{why}; rebuild it with `ssp audit reindex`"),
        }
    }
}

/// Brings the index in `dir` up to date with the log and returns it, locked.
pub fn catch_up(dir: &Path) -> Result<Index, IndexError> {
    let mut index = open(dir, false)?;
    index.read_log()?;
    Ok(index)
}

/// Deletes the index in `dir` and makes it again from the whole log.
pub fn rebuild(dir: &Path) -> Result<Index, IndexError> {
    let mut index = open(dir, true)?;
    index.read_log()?;
    Ok(index)
}

fn open(dir: &Path, fresh: bool) -> Result<Index, IndexError> {
    let path = dir.join(INDEX_FILE);
    let io = |e| IndexError::Io(path.clone(), e);
    let lock = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    crate::audit::owned_like_dir(&path, dir);
    // flock(2) through rustix: std's `File::lock` is newer than the crate's minimum Rust.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(e.into()))?;
    let state_path = dir.join(STATE_FILE);
    let state = match fs::read(&state_path) {
        Ok(bytes) if !fresh => serde_json::from_slice(&bytes).map_err(|e| {
            IndexError::Mismatch(format!("{}: unreadable: {e}", state_path.display()))
        })?,
        Ok(_) => State::default(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
        Err(e) => return Err(IndexError::Io(state_path, e)),
    };
    if state == State::default() {
        // Nothing read yet: whatever the file holds (a pass that crashed before its state was saved) goes.
        lock.set_len(0).map_err(io)?;
    }
    Ok(Index {
        dir: dir.to_path_buf(),
        _lock: lock,
        state,
    })
}

impl Index {
    /// The ids of the keys the log's records were hashed with, and how many records each.
    pub fn keys(&self) -> &BTreeMap<String, u64> {
        &self.state.keys
    }

    /// Every entry with `hmac`, each record once, in log order.
    pub fn lookup(&self, hmac: &str) -> Result<Vec<Entry>, IndexError> {
        let path = self.dir.join(INDEX_FILE);
        let file = File::open(&path).map_err(|e| IndexError::Io(path.clone(), e))?;
        let needle = format!("\"hmac\":\"{hmac}\"");
        let mut out: Vec<Entry> = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| IndexError::Io(path.clone(), e))?;
            if !line.contains(&needle) {
                continue;
            }
            if let Ok(entry) = serde_json::from_str::<Entry>(&line)
                && !out
                    .iter()
                    .any(|e| e.instance == entry.instance && e.seq == entry.seq)
            {
                out.push(entry);
            }
        }
        out.sort_by_key(|e| (e.segment, e.seq));
        Ok(out)
    }

    /// Reads the records written since the last pass, appends their entries, then saves the new position.
    fn read_log(&mut self) -> Result<(), IndexError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| IndexError::Io(path.clone(), e)
        };
        let segments = list_segments(&self.dir).map_err(io(&self.dir))?;
        // Where the last pass stopped must still be there, as long as it was: a log moved away and begun again
        // would otherwise be read from a place it does not have.
        if self.state.seq != 0 {
            let there = segments
                .iter()
                .find(|(n, _)| *n == self.state.segment)
                .and_then(|(_, path)| fs::metadata(path).ok())
                .is_some_and(|m| m.len() >= self.state.offset);
            if !there {
                return Err(IndexError::Mismatch(format!(
                    "the index was made up to byte {} of segment {}, which the log no longer has",
                    self.state.offset, self.state.segment
                )));
            }
        }
        let index_path = self.dir.join(INDEX_FILE);
        let mut out = io::BufWriter::new(&self._lock);
        let mut first = true;
        for (number, path) in segments {
            if number < self.state.segment {
                continue;
            }
            let mut file = File::open(&path).map_err(io(&path))?;
            let start = if number == self.state.segment {
                self.state.offset
            } else {
                0
            };
            file.seek(SeekFrom::Start(start)).map_err(io(&path))?;
            let mut reader = BufReader::with_capacity(256 * 1024, file);
            let mut offset = start;
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(io(&path))?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                let seq = leading_seq(&line).ok_or_else(|| {
                    IndexError::Mismatch(format!(
                        "{} at byte {offset}: not a record line",
                        path.display()
                    ))
                })?;
                if first && self.state.seq != 0 && seq != self.state.seq + 1 {
                    return Err(IndexError::Mismatch(format!(
                        "the index expected seq {} at {} byte {offset}, and found seq {seq}",
                        self.state.seq + 1,
                        path.display()
                    )));
                }
                first = false;
                if memchr::memmem::find(&line, b"\"patients\":{").is_some() {
                    for entry in entries(&line, number) {
                        *self.state.keys.entry(entry.key.clone()).or_default() += 1;
                        serde_json::to_writer(&mut out, &entry)
                            .map_err(|e| IndexError::Io(index_path.clone(), e.into()))?;
                        out.write_all(b"\n").map_err(io(&index_path))?;
                    }
                }
                offset += n as u64;
                self.state.seq = seq;
                self.state.segment = number;
                self.state.offset = offset;
            }
            // Bytes past the last newline (a line being written) are read next time, from `offset`.
        }
        out.flush().map_err(io(&index_path))?;
        drop(out);
        self._lock.sync_data().map_err(io(&index_path))?;
        // The state moves only once the entries it covers are durable; a crash in between re-reads those
        // records, and `lookup` counts a record once.
        let state_path = self.dir.join(STATE_FILE);
        let temp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&serde_json::to_vec(&self.state)?)?;
            file.sync_all()?;
            fs::rename(&temp, &state_path)
        };
        write().map_err(io(&state_path))?;
        crate::audit::owned_like_dir(&state_path, &self.dir);
        Ok(())
    }
}

/// `seq` of a record line, read from its start (`{"seq":N,`) without parsing the rest.
fn leading_seq(line: &[u8]) -> Option<u64> {
    let digits = line.strip_prefix(b"{\"seq\":")?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// The entries of one record line that has a `patients` field.
fn entries(line: &[u8], segment: u64) -> Vec<Entry> {
    #[derive(Deserialize)]
    struct Patients {
        key: String,
        ids: Vec<Id>,
    }
    #[derive(Deserialize)]
    struct Id {
        hmac: String,
        check: String,
        #[serde(rename = "in")]
        source: String,
    }
    #[derive(Deserialize)]
    struct Line {
        seq: u64,
        instance: String,
        conn_id: u64,
        trace_id: Option<String>,
        patients: Patients,
    }
    let Ok(record) = serde_json::from_slice::<Line>(line) else {
        return Vec::new();
    };
    record
        .patients
        .ids
        .into_iter()
        .map(|id| Entry {
            hmac: id.hmac,
            check: id.check,
            source: id.source,
            key: record.patients.key.clone(),
            segment,
            seq: record.seq,
            instance: record.instance.clone(),
            conn_id: record.conn_id,
            trace_id: record.trace_id.clone(),
        })
        .collect()
}
