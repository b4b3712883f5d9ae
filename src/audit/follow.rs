//! Following the log as it is written: whole lines, in chain order, from a remembered position, across segment
//! rotations. For readers that run beside the writer (the shipper); they never change the folder.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::segment::{list_segments, segment_name};
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

impl Fields {
    /// The chain fields of a line in the exact shape the writer gives every record (`{"seq":N,"instance":"..",
    /// "ts":"..",` ... `,"prev":"<64 hex>"}`, no escape in the instance or time), read without a JSON parse; `None`
    /// for any other shape, which the full parse then reads (the shipper reads every record, and a parse of the
    /// whole line was most of its cost). What is read is the same either way: the writer puts these fields first
    /// and `prev` last, once each.
    fn of_written(line: &[u8]) -> Option<Fields> {
        let rest = line.strip_prefix(b"{\"seq\":")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 20 {
            return None;
        }
        let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let rest = rest[digits..].strip_prefix(b",\"instance\":\"")?;
        let (instance, rest) = plain_string(rest)?;
        let rest = rest.strip_prefix(b",\"ts\":\"")?;
        let (ts, _) = plain_string(rest)?;
        let tail = line.strip_suffix(b"\"}")?;
        let prev = tail.get(tail.len().checked_sub(64)?..)?;
        if !tail[..tail.len() - 64].ends_with(b",\"prev\":\"") {
            return None;
        }
        Some(Fields {
            seq,
            instance,
            ts,
            prev: std::str::from_utf8(prev).ok()?.to_owned(),
        })
    }
}

/// A JSON string's text up to its closing quote, when it has no escape and no control character; and the rest.
fn plain_string(text: &[u8]) -> Option<(String, &[u8])> {
    let end = memchr::memchr2(b'"', b'\\', text)?;
    if text[end] != b'"' || text[..end].iter().any(|b| *b < 0x20) {
        return None;
    }
    Some((
        std::str::from_utf8(&text[..end]).ok()?.to_owned(),
        &text[end + 1..],
    ))
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
        let path = self.dir.join(segment_name(segment));
        if path.is_file() {
            Ok(path)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: audit segment {segment} is gone", self.dir.display()),
            ))
        }
    }

    /// Makes what this reader has read durable on the local disk (fdatasync of the segment it reads): a record is
    /// shipped only once a power cut can no longer take it from the local log (in `batched` mode the writer's own
    /// fsync may be up to `audit.fsync_interval` away).
    /// The segment synced is the one the last line came from (a segment before it was sealed and fsynced by the
    /// writer before the next was made), opened again when the reader has let it go at its end.
    pub fn sync(&self) -> io::Result<()> {
        match &self.file {
            Some(reader) => reader.get_ref().sync_data(),
            // Nothing read from this segment yet: nothing of it to make durable.
            None if self.pos.offset == 0 => Ok(()),
            None => File::open(self.dir.join(segment_name(self.pos.segment)))?.sync_data(),
        }
    }

    /// The next whole line, or `None` when the writer has not written one yet. A line still being written (no
    /// newline yet) is left for the next call; a segment is left for the next one only once a newer segment
    /// exists (the writer seals a segment before it starts the next).
    pub fn next_line(&mut self) -> Result<Option<Line>, FollowError> {
        let mut again = false;
        loop {
            let reader = match &mut self.file {
                Some(reader) => reader,
                slot @ None => {
                    // The position's segment, or the first one after it (segment 0: before the first).
                    let Some(index) = first_from(&self.dir, self.pos.segment)? else {
                        return Ok(None);
                    };
                    if index != self.pos.segment {
                        self.pos.segment = index;
                        self.pos.offset = 0;
                    }
                    let mut file = File::open(self.dir.join(segment_name(index)))?;
                    file.seek(SeekFrom::Start(self.pos.offset))?;
                    slot.insert(BufReader::with_capacity(64 << 10, file))
                }
            };
            // Sized for a typical record at once, not grown from nothing.
            let mut bytes = Vec::with_capacity(2048);
            reader.read_until(b'\n', &mut bytes)?;
            if bytes.ends_with(b"\n") {
                bytes.pop();
                return self.accept(bytes).map(Some);
            }
            // Nothing whole here: go on in the next segment once this one is complete, else wait for the writer.
            self.file = None;
            let Some(next) = newer(&self.dir, self.pos.segment)? else {
                return Ok(None);
            };
            // The next segment exists, so this one was sealed and is complete; but the writer may have finished
            // it between the read above and the look for the next: read again what is past the position.
            let len = std::fs::metadata(self.dir.join(segment_name(self.pos.segment)))?.len();
            if len > self.pos.offset {
                if again {
                    return Err(FollowError::Chain(format!(
                        "segment {} ends in a torn line at byte {} though a newer segment exists",
                        self.pos.segment, self.pos.offset
                    )));
                }
                again = true;
                continue;
            }
            self.pos.segment = next;
            self.pos.offset = 0;
        }
    }

    fn accept(&mut self, bytes: Vec<u8>) -> Result<Line, FollowError> {
        let at = self.pos.offset;
        let fields = match Fields::of_written(&bytes) {
            Some(fields) => fields,
            None => serde_json::from_slice(&bytes).map_err(|e| {
                FollowError::Chain(format!(
                    "segment {} byte {at}: not a record: {e}",
                    self.pos.segment
                ))
            })?,
        };
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

/// The segment `index` if it exists, else the first after it: a look at one name in the usual case (a reader goes
/// from a segment to the next, numbered one more), a listing of the folder only at the start of the log or past a
/// gap.
fn first_from(dir: &Path, index: u64) -> io::Result<Option<u64>> {
    if index > 0 && dir.join(segment_name(index)).is_file() {
        return Ok(Some(index));
    }
    Ok(list_segments(dir)?
        .into_iter()
        .map(|(i, _)| i)
        .find(|i| *i >= index))
}

/// The segment after `index`, once the writer has made it (it makes them in order, one number apart).
fn newer(dir: &Path, index: u64) -> io::Result<Option<u64>> {
    let next = index + 1;
    Ok(dir.join(segment_name(next)).is_file().then_some(next))
}

/// Counts whole lines past a position without reading them: how far the log runs ahead of a reader (the shipper's
/// lag), at the cost of a scan for newlines.
#[derive(Debug)]
pub struct LineCounter {
    dir: PathBuf,
    segment: u64,
    offset: u64,
    /// The seq of the last whole line passed.
    seq: u64,
    /// Read into, kept between calls.
    buf: Vec<u8>,
}

impl LineCounter {
    /// A counter at `pos`.
    pub fn at(dir: &Path, pos: &Position) -> Self {
        LineCounter {
            dir: dir.to_path_buf(),
            segment: pos.segment,
            offset: pos.offset,
            seq: pos.seq,
            buf: vec![0u8; 64 << 10],
        }
    }

    /// Moves to the end of what is written (at most about `max_bytes` further); the seq of the last whole line.
    /// A line longer than the read buffer is read across several reads.
    pub fn advance(&mut self, max_bytes: u64) -> io::Result<u64> {
        use std::io::Read;
        let mut budget = max_bytes;
        loop {
            let Some(index) = first_from(&self.dir, self.segment)? else {
                return Ok(self.seq);
            };
            if index != self.segment {
                (self.segment, self.offset) = (index, 0);
            }
            // Whether the next segment exists, looked at before reading: then this one is complete.
            let next = newer(&self.dir, self.segment)?;
            let mut file = File::open(self.dir.join(segment_name(self.segment)))?;
            let mut at = self.offset;
            loop {
                file.seek(SeekFrom::Start(at))?;
                let n = file.read(&mut self.buf)?;
                if n == 0 {
                    break;
                }
                match memchr::memrchr(b'\n', &self.buf[..n]) {
                    Some(last) => {
                        self.seq += memchr::memchr_iter(b'\n', &self.buf[..=last]).count() as u64;
                        self.offset = at + last as u64 + 1;
                        at = self.offset;
                    }
                    None => at += n as u64,
                }
                budget = budget.saturating_sub(n as u64);
                if budget == 0 {
                    return Ok(self.seq);
                }
            }
            match next {
                Some(next) if file.metadata()?.len() <= self.offset => {
                    (self.segment, self.offset) = (next, 0)
                }
                _ => return Ok(self.seq),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Record `seq` of a chain whose previous line hashed to `prev`.
    fn line(seq: u64, prev: &HexDigest) -> String {
        format!(
            r#"{{"seq":{seq},"instance":"t","ts":"2026-12-07T10:00:00.000000Z","kind":"x","prev":"{prev}"}}"#
        )
    }

    #[test]
    fn the_written_shape_is_read_without_a_parse_as_the_parse_reads_it() {
        let prev = HexDigest::of(b"x");
        for text in [
            line(7, &prev),
            // An escape in the instance, a field order of another writer: the full parse reads them.
            line(7, &prev).replace(r#""instance":"t""#, r#""instance":"a\"b""#),
            format!(r#"{{"instance":"t","seq":7,"ts":"2026-12-07T10:00:00Z","prev":"{prev}"}}"#),
        ] {
            let parsed: Fields = serde_json::from_str(&text).unwrap();
            let fast = Fields::of_written(text.as_bytes());
            if let Some(fast) = &fast {
                assert_eq!(
                    (fast.seq, &fast.instance, &fast.ts, &fast.prev),
                    (parsed.seq, &parsed.instance, &parsed.ts, &parsed.prev)
                );
            }
            assert_eq!(fast.is_some(), text == line(7, &prev), "{text}");
        }
    }

    #[test]
    fn whole_lines_in_chain_order_across_segments_and_a_changed_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = line(1, &HexDigest::GENESIS);
        let two = line(2, &HexDigest::of(one.as_bytes()));
        let three = line(3, &HexDigest::of(two.as_bytes()));
        let first = dir.path().join("audit-00000001.jsonl");
        // A whole line and half of the next: only the whole one is read, the half waits for its end.
        std::fs::write(&first, format!("{one}\n{}", &two[..10])).unwrap();
        let mut f = Follower::at(dir.path(), Position::START).unwrap();
        assert_eq!(f.next_line().unwrap().unwrap().bytes, one.as_bytes());
        assert!(f.next_line().unwrap().is_none());
        // At the end of what is written the reader has let the file go; what it read can still be made durable.
        f.sync().unwrap();
        std::fs::write(&first, format!("{one}\n{two}\n")).unwrap();
        let read = f.next_line().unwrap().unwrap();
        assert_eq!((read.seq, read.bytes.as_slice()), (2, two.as_bytes()));
        let after_two = read.after;
        // The next segment is read once this one has nothing more.
        std::fs::write(
            dir.path().join("audit-00000002.jsonl"),
            format!("{three}\n"),
        )
        .unwrap();
        let read = f.next_line().unwrap().unwrap();
        assert_eq!(
            (read.seq, read.after.segment, read.after.offset),
            (3, 2, three.len() as u64 + 1)
        );
        assert!(f.next_line().unwrap().is_none());
        // A remembered position is checked: the same log resumes, a rewritten one is refused.
        let mut again = Follower::at(dir.path(), after_two.clone()).unwrap();
        assert_eq!(again.next_line().unwrap().unwrap().seq, 3);
        std::fs::write(
            &first,
            format!("{one}\n{}\n", two.replace("\"x\"", "\"y\"")),
        )
        .unwrap();
        assert!(matches!(
            Follower::at(dir.path(), after_two),
            Err(FollowError::Chain(_))
        ));
        // The counter sees the same lines without reading them: three whole ones, not the half of a fourth.
        let four = line(4, &HexDigest::of(three.as_bytes()));
        let second = dir.path().join("audit-00000002.jsonl");
        std::fs::write(&second, format!("{three}\n{}", &four[..20])).unwrap();
        let mut counter = LineCounter::at(dir.path(), &Position::START);
        assert_eq!(counter.advance(u64::MAX).unwrap(), 3);
        std::fs::write(&second, format!("{three}\n{four}\n")).unwrap();
        assert_eq!(counter.advance(u64::MAX).unwrap(), 4);
        // A line longer than the counter's buffer (a record of 100 KiB) is counted too.
        let long = format!(
            r#"{{"seq":5,"instance":"t","ts":"2026-12-07T10:00:00.000000Z","pad":"{}","prev":"{}"}}"#,
            "x".repeat(100 << 10),
            HexDigest::of(four.as_bytes())
        );
        std::fs::write(&second, format!("{three}\n{four}\n{long}\n")).unwrap();
        assert_eq!(counter.advance(u64::MAX).unwrap(), 5);
        assert_eq!(f.next_line().unwrap().unwrap().seq, 4);
        assert_eq!(f.next_line().unwrap().unwrap().bytes.len(), long.len());
        // A line that does not continue the chain stops the reader.
        let mut fresh = Follower::at(dir.path(), Position::START).unwrap();
        fresh.next_line().unwrap();
        fresh.next_line().unwrap();
        assert!(matches!(fresh.next_line(), Err(FollowError::Chain(_))));
    }
}
