//! Following the log as it is written: whole lines, in chain order, from a remembered position, across segment
//! rotations. For readers that run beside the writer (the shipper); they never change the folder.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::segment::list_segments;
use crate::hex::HexDigest;

/// Where a reader is in the log: after the record `seq` (0: before the first), whose line hashes to `hash`; the
/// next line starts at byte `offset` of segment `segment`. `line_at` is where the record `seq` starts, to read it
/// back and check the position still names the same record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
    pub seq: u64,
    pub hash: HexDigest,
    pub line_at: u64,
}

impl Position {
    /// Before the first record of the log.
    pub const START: Position = Position {
        segment: 0,
        offset: 0,
        seq: 0,
        hash: HexDigest::GENESIS,
        line_at: 0,
    };
}

/// One record as read: its line (without the newline), its chain fields and the position after it.
#[derive(Debug, Clone)]
pub struct Line {
    pub bytes: Vec<u8>,
    pub seq: u64,
    pub hash: HexDigest,
    /// The record's `ts` (RFC 3339, microseconds, UTC).
    pub ts: String,
    pub instance: String,
    pub after: Position,
}

#[derive(Deserialize)]
struct Fields {
    seq: u64,
    instance: String,
    #[serde(default)]
    ts: String,
    prev: String,
}

/// Reads the log in `dir` forward from a [`Position`].
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    pos: Position,
    file: Option<BufReader<File>>,
}

/// Why a position or a line does not continue the chain.
#[derive(Debug)]
pub enum FollowError {
    Io(io::Error),
    /// The log on disk is not the one the position was taken in, or a line breaks the chain.
    Chain(String),
}

impl std::fmt::Display for FollowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FollowError::Io(e) => write!(f, "{e}"),
            FollowError::Chain(why) => f.write_str(why),
        }
    }
}

impl From<io::Error> for FollowError {
    fn from(e: io::Error) -> Self {
        FollowError::Io(e)
    }
}

impl Follower {
    /// A reader at `pos`, which is checked: the record it names must still be at `line_at` with that hash.
    pub fn at(dir: &Path, pos: Position) -> Result<Self, FollowError> {
        let follower = Follower {
            dir: dir.to_path_buf(),
            pos: pos.clone(),
            file: None,
        };
        if pos.seq > 0 {
            let path = follower.path_of(pos.segment)?;
            let mut reader = BufReader::new(File::open(&path)?);
            reader.seek(SeekFrom::Start(pos.line_at))?;
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line)?;
            let ok = line.ends_with(b"\n")
                && pos.line_at + line.len() as u64 == pos.offset
                && HexDigest::of(&line[..line.len() - 1]) == pos.hash;
            if !ok {
                return Err(FollowError::Chain(format!(
                    "{}: record seq {} is not where it was (byte {}): the log was replaced or rewritten",
                    path.display(),
                    pos.seq,
                    pos.line_at
                )));
            }
        }
        Ok(follower)
    }

    /// Where the next read starts.
    pub fn position(&self) -> &Position {
        &self.pos
    }

    /// Goes back to `pos` (a position this reader passed), to read again from there.
    pub fn rewind(&mut self, pos: Position) {
        self.pos = pos;
        self.file = None;
    }

    fn path_of(&self, segment: u64) -> io::Result<PathBuf> {
        list_segments(&self.dir)?
            .into_iter()
            .find(|(i, _)| *i == segment)
            .map(|(_, p)| p)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{}: audit segment {segment} is gone", self.dir.display()),
                )
            })
    }

    /// The next whole line, or `None` when the writer has not written one yet. A line still being written (no
    /// newline yet) is left for the next call; a segment is left for the next one only once a newer segment
    /// exists (the writer seals a segment before it starts the next).
    pub fn next_line(&mut self) -> Result<Option<Line>, FollowError> {
        let mut torn_seen = false;
        loop {
            let reader = match &mut self.file {
                Some(reader) => reader,
                slot @ None => {
                    let segments = list_segments(&self.dir)?;
                    // The position's segment, or the first one after it (segment 0: before the first).
                    let Some((index, path)) =
                        segments.into_iter().find(|(i, _)| *i >= self.pos.segment)
                    else {
                        return Ok(None);
                    };
                    if index != self.pos.segment {
                        self.pos.segment = index;
                        self.pos.offset = 0;
                    }
                    let mut file = File::open(path)?;
                    file.seek(SeekFrom::Start(self.pos.offset))?;
                    slot.insert(BufReader::new(file))
                }
            };
            let mut bytes = Vec::new();
            reader.read_until(b'\n', &mut bytes)?;
            if bytes.ends_with(b"\n") {
                bytes.pop();
                return self.accept(bytes).map(Some);
            }
            // Nothing whole here yet: go on in a newer segment if there is one, else wait for the writer.
            self.file = None;
            let newer = list_segments(&self.dir)?
                .into_iter()
                .map(|(i, _)| i)
                .find(|i| *i > self.pos.segment);
            let Some(newer) = newer else {
                return Ok(None);
            };
            if !bytes.is_empty() {
                // A segment is sealed before the next is made: read it again, once, in case the rest of the line
                // landed between the read and the listing.
                if torn_seen {
                    return Err(FollowError::Chain(format!(
                        "segment {} ends in a torn line at byte {} though a newer segment exists",
                        self.pos.segment, self.pos.offset
                    )));
                }
                torn_seen = true;
                continue;
            }
            self.pos.segment = newer;
            self.pos.offset = 0;
        }
    }

    fn accept(&mut self, bytes: Vec<u8>) -> Result<Line, FollowError> {
        let at = self.pos.offset;
        let fields: Fields = serde_json::from_slice(&bytes).map_err(|e| {
            FollowError::Chain(format!(
                "segment {} byte {at}: not a record: {e}",
                self.pos.segment
            ))
        })?;
        if fields.seq != self.pos.seq + 1 || fields.prev != self.pos.hash.as_str() {
            return Err(FollowError::Chain(format!(
                "segment {} byte {at}: seq {} does not follow seq {} in the chain",
                self.pos.segment, fields.seq, self.pos.seq
            )));
        }
        let hash = HexDigest::of(&bytes);
        self.pos = Position {
            segment: self.pos.segment,
            offset: at + bytes.len() as u64 + 1,
            seq: fields.seq,
            hash,
            line_at: at,
        };
        Ok(Line {
            seq: fields.seq,
            hash,
            ts: fields.ts,
            instance: fields.instance,
            after: self.pos.clone(),
            bytes,
        })
    }
}
