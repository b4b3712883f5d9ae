//! The policy store (`policy.store`): a sled database of imported generations. Each successful import is a new
//! generation (number, import time, SHA-256 of its source, the whole source) written in one insert and flushed
//! before the `current` pointer moves to it, so a crash at any point leaves the pointer on a complete generation.
//! The last `keep` generations are kept.
//!
//! sled locks its database against other processes, so the store is opened only for the moment of an import or a
//! read, never held: the proxy serves from an in-memory snapshot, and `ssp policy history` works beside it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Source;

/// How long an open waits for another process's import to let go of the database.
const LOCK_WAIT: Duration = Duration::from_secs(10);

const CURRENT: &[u8] = b"current";

/// One imported generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub number: u64,
    /// RFC 3339, UTC.
    pub imported_at: String,
    /// [`Source::sha256`] of `source`.
    pub sha256: String,
    pub source: Source,
}

/// A line of `ssp policy history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistoryEntry {
    pub number: u64,
    pub imported_at: String,
    pub sha256: String,
    pub files: usize,
    pub current: bool,
}

/// An open store; dropped as soon as the operation is done.
pub struct Store {
    db: sled::Db,
    generations: sled::Tree,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating) the store at `path`, waiting a while if another process holds it.
    pub fn open(path: &Path) -> Result<Self, String> {
        let started = Instant::now();
        loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => {
                    let generations = db.open_tree("generations").map_err(|e| err(path, e))?;
                    return Ok(Self {
                        db,
                        generations,
                        path: path.to_path_buf(),
                    });
                }
                // Another `ssp` is importing: its lock is held for a moment only.
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::Other && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(err(path, e)),
            }
        }
    }

    /// The generation the pointer names, if any.
    pub fn current(&self) -> Result<Option<Generation>, String> {
        match self.db.get(CURRENT).map_err(|e| err(&self.path, e))? {
            Some(n) => self.get(u64_of(&n)),
            None => Ok(None),
        }
    }

    pub(crate) fn get(&self, number: u64) -> Result<Option<Generation>, String> {
        match self
            .generations
            .get(number.to_be_bytes())
            .map_err(|e| err(&self.path, e))?
        {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!(
                    "{}: generation {number} does not decode: {e}",
                    self.path.display()
                )
            }),
            None => Ok(None),
        }
    }

    /// Every kept generation, oldest first.
    pub(crate) fn history(&self) -> Result<Vec<HistoryEntry>, String> {
        let current = self
            .db
            .get(CURRENT)
            .map_err(|e| err(&self.path, e))?
            .map(|n| u64_of(&n));
        let mut out = Vec::new();
        for item in self.generations.iter() {
            let (_, bytes) = item.map_err(|e| err(&self.path, e))?;
            let g: Generation = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            out.push(HistoryEntry {
                number: g.number,
                imported_at: g.imported_at,
                sha256: g.sha256,
                files: g.source.files.len(),
                current: current == Some(g.number),
            });
        }
        Ok(out)
    }

    /// Stores `source` (already validated by compiling it) as a new generation and makes it current, unless it is
    /// the current generation's source already. Returns the current generation and whether it is new.
    pub fn import(&self, source: Source, keep: usize) -> Result<(Generation, bool), String> {
        let sha256 = source.sha256();
        let current = self.current()?;
        if let Some(current) = current.filter(|g| g.sha256 == sha256) {
            return Ok((current, false));
        }
        let last = self
            .generations
            .last()
            .map_err(|e| err(&self.path, e))?
            .map_or(0, |(k, _)| u64_of(&k));
        let generation = Generation {
            number: last + 1,
            imported_at: crate::clock::now_rfc3339(),
            sha256,
            source,
        };
        let bytes = serde_json::to_vec(&generation).map_err(|e| e.to_string())?;
        self.generations
            .insert(generation.number.to_be_bytes(), bytes)
            .map_err(|e| err(&self.path, e))?;
        // The generation is on disk before anything points at it.
        self.db.flush().map_err(|e| err(&self.path, e))?;
        self.db
            .insert(CURRENT, &generation.number.to_be_bytes())
            .map_err(|e| err(&self.path, e))?;
        self.db.flush().map_err(|e| err(&self.path, e))?;
        self.prune(generation.number, keep)?;
        Ok((generation, true))
    }

    /// Deletes all but the newest `keep` generations (never the current one).
    fn prune(&self, current: u64, keep: usize) -> Result<(), String> {
        let numbers: Vec<u64> = self
            .generations
            .iter()
            .keys()
            .filter_map(Result::ok)
            .map(|k| u64_of(&k))
            .collect();
        let excess = numbers.len().saturating_sub(keep.max(1));
        for n in numbers.into_iter().take(excess).filter(|n| *n != current) {
            self.generations
                .remove(n.to_be_bytes())
                .map_err(|e| err(&self.path, e))?;
        }
        self.db.flush().map_err(|e| err(&self.path, e))?;
        Ok(())
    }
}

fn u64_of(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(buf)
}

fn err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: policy store: {e}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source::from_files(vec![("p.toml".into(), text.into())])
    }

    #[test]
    fn imports_are_numbered_deduplicated_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.current().unwrap(), None);
            let (g1, new) = store.import(source("# one"), 3).unwrap();
            assert_eq!((g1.number, new), (1, true));
            let (again, new) = store.import(source("# one"), 3).unwrap();
            assert_eq!(
                (again.number, new),
                (1, false),
                "an unchanged source is not a new generation"
            );
            for (i, text) in ["# two", "# three", "# four", "# five"].iter().enumerate() {
                let (g, _) = store.import(source(text), 3).unwrap();
                assert_eq!(g.number, i as u64 + 2);
            }
        }
        // Reopened: the pointer and the kept generations survive.
        let store = Store::open(&path).unwrap();
        let current = store.current().unwrap().unwrap();
        assert_eq!(current.number, 5);
        assert_eq!(current.source, source("# five"));
        let history = store.history().unwrap();
        assert_eq!(
            history.iter().map(|h| h.number).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert!(history.last().unwrap().current);
        assert_eq!(store.get(1).unwrap(), None);
    }
}
