//! `ssp audit verify`: the whole chain, segment by segment, read back and checked.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::segment::{ChainFields, list_segments};
use crate::hex::HexDigest;

/// What an intact log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub segments: usize,
    pub last_seq: u64,
    /// Whether the newest segment is sealed (false: it is being written, or its writer crashed).
    pub last_sealed: bool,
}

/// The first problem found: which segment, which line, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub segment: PathBuf,
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: line {}", self.segment.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Verifies the whole chain in `dir`: every line parses, `seq` counts up by one from 1, each `prev` is the SHA-256
/// of the line before (64 zeros for the first), every segment but the newest ends with a seal, and no segment
/// ends in a torn line.
pub fn verify(dir: &Path) -> Result<Verified, Broken> {
    let broken = |segment: &Path, line: u64, seq: Option<u64>, problem: String| Broken {
        segment: segment.to_path_buf(),
        line,
        seq,
        problem,
    };
    let segments =
        list_segments(dir).map_err(|e| broken(dir, 0, None, format!("cannot list: {e}")))?;
    if segments.is_empty() {
        return Err(broken(dir, 0, None, "no audit segments".into()));
    }
    let mut expect_seq = 1u64;
    let mut expect_prev = HexDigest::GENESIS;
    let mut records = 0u64;
    let mut last_sealed = false;
    for (n, (_, path)) in segments.iter().enumerate() {
        let file =
            File::open(path).map_err(|e| broken(path, 0, None, format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut line_no = 0u64;
        let mut sealed = false;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| broken(path, line_no + 1, None, format!("read error: {e}")))?;
            if read == 0 {
                break;
            }
            line_no += 1;
            if line.last() != Some(&b'\n') {
                return Err(broken(
                    path,
                    line_no,
                    None,
                    "torn last line (no newline): the log was cut mid-record".into(),
                ));
            }
            let body = &line[..line.len() - 1];
            if sealed {
                return Err(broken(
                    path,
                    line_no,
                    None,
                    "record after the segment's seal".into(),
                ));
            }
            let link: ChainFields = serde_json::from_slice(body)
                .map_err(|e| broken(path, line_no, None, format!("not a record: {e}")))?;
            if link.seq != expect_seq {
                return Err(broken(
                    path,
                    line_no,
                    Some(link.seq),
                    format!(
                        "seq {} where {expect_seq} was expected (a record was removed, added or moved)",
                        link.seq
                    ),
                ));
            }
            if link.prev != expect_prev.as_str() {
                return Err(broken(
                    path,
                    line_no,
                    Some(link.seq),
                    format!(
                        "prev does not match the hash of line {}: that record was edited, or a record was removed \
                         or moved here",
                        line_no.saturating_sub(1)
                    ),
                ));
            }
            expect_prev = HexDigest::of(body);
            expect_seq += 1;
            records += 1;
            sealed = link.kind == "seal";
        }
        let newest = n + 1 == segments.len();
        if !sealed && !newest {
            return Err(broken(
                path,
                line_no,
                None,
                "segment does not end with a seal (it was truncated, or a later segment does not belong)".into(),
            ));
        }
        last_sealed = sealed;
    }
    Ok(Verified {
        records,
        segments: segments.len(),
        last_seq: expect_seq - 1,
        last_sealed,
    })
}
