//! `ssp audit verify --witness FILE`: the local log checked against the collector's copy. Every record the
//! collector holds for the instance must be in the local log with the same bytes at the same `seq`, and every
//! signed chain head must be signed by the instance's head key and name a record the local chain has, with that
//! hash. A copy sent twice (a batch the shipper could not confirm and sent again) carries the same `seq` and
//! bytes and counts once; two different records under one `seq` are a failure.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::head::Head;
use super::syslog::{self, HEAD_SD, RECORD_SD};
use crate::audit::follow::{Follower, Position};
use crate::hex::HexDigest;

/// What the collector's copy holds for the instance, all of it matching the local log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witnessed {
    pub instance: String,
    /// Distinct records.
    pub records: u64,
    /// The highest `seq` the collector holds (the last shipped).
    pub last_shipped: u64,
    /// Copies of a record already held (sent again after an unconfirmed batch).
    pub duplicates: u64,
    pub heads: u64,
    /// Ranges of `seq` below `last_shipped` that the collector does not hold.
    pub gaps: Vec<(u64, u64)>,
    /// The local log's last `seq`.
    pub local_last: u64,
}

/// Why a check did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The local log and the collector's copy differ: the first record or head that does.
    Differs(String),
    /// The check cannot be made as asked (no key for the heads, another instance's log, no record to compare).
    Unusable(String),
}

/// A record or head as the collector holds it: its hash and the line of the file it is on.
struct Held {
    hash: HexDigest,
    line: u64,
}

/// Checks the log in `dir` against the collector's file `witness`, for `instance` (default: the local log's).
/// `public_key` is the raw Ed25519 key the heads must be signed with; without one, a copy that holds heads
/// fails (a head whose signature is not checked proves nothing). The error names the first record or head that
/// differs, with its `seq` and the line of the collector's file.
/// `until` is the local log's last seq as verified (a live log is checked up to there).
pub fn check(
    dir: &Path,
    witness: &Path,
    instance: Option<&str>,
    public_key: Option<&[u8]>,
    until: u64,
) -> Result<Witnessed, Failure> {
    let local_instance = first_instance(dir).map_err(Failure::Unusable)?;
    let instance = instance.map_or(local_instance.clone(), str::to_owned);
    if instance != local_instance {
        return Err(Failure::Unusable(format!(
            "--instance {instance:?}: the local log in {} is instance {local_instance:?}",
            dir.display()
        )));
    }
    let (records, heads, duplicates) =
        read_witness(witness, &instance).map_err(Failure::Differs)?;
    if records.is_empty() && heads.is_empty() {
        return Err(Failure::Unusable(format!(
            "{}: holds no record or head of instance {instance:?}",
            witness.display()
        )));
    }
    let mut head_at: BTreeMap<u64, Vec<&(Head, u64)>> = BTreeMap::new();
    for h in &heads {
        let Some(key) = public_key else {
            return Err(Failure::Unusable(format!(
                "{}: line {}: a signed chain head cannot be checked without the public key: give --public-key, \
                 or --config with audit.ship.head_key",
                witness.display(),
                h.1
            )));
        };
        if !h.0.signed_by(key) {
            return Err(Failure::Differs(format!(
                "{}: line {}: the chain head at seq {} (signed at {}) is not signed by the head key",
                witness.display(),
                h.1,
                h.0.seq,
                h.0.time
            )));
        }
        head_at.entry(h.0.seq).or_default().push(h);
    }
    let mut follower =
        Follower::at(dir, Position::START).map_err(|e| Failure::Unusable(e.to_string()))?;
    let mut local_last = 0;
    while local_last < until
        && let Some(line) = follower
            .next_line()
            .map_err(|e| Failure::Differs(format!("the local log: {e}")))?
    {
        local_last = line.seq;
        if let Some(held) = records.get(&line.seq)
            && held.hash != line.hash
        {
            return Err(Failure::Differs(format!(
                "seq {}: the local record differs from the collector's copy ({}: line {}): local hash {}, \
                 shipped hash {}",
                line.seq,
                witness.display(),
                held.line,
                line.hash,
                held.hash
            )));
        }
        for (head, at) in head_at.get(&line.seq).into_iter().flatten() {
            if head.hash != line.hash {
                return Err(Failure::Differs(format!(
                    "the chain head at seq {} signed at {} ({}: line {at}) does not match the local chain: \
                     the head says {}, the local record hashes to {}",
                    head.seq,
                    head.time,
                    witness.display(),
                    head.hash,
                    line.hash
                )));
            }
        }
    }
    let last_shipped = records.keys().next_back().copied().unwrap_or(0);
    if let Some((&seq, held)) = records.range(local_last + 1..).next() {
        return Err(Failure::Differs(format!(
            "seq {seq}: shipped to the collector ({}: line {}) but not in the local log, which ends at seq \
             {local_last}; the collector holds records up to seq {last_shipped}, the last shipped",
            witness.display(),
            held.line
        )));
    }
    if let Some((&seq, hs)) = head_at.range(local_last + 1..).next() {
        return Err(Failure::Differs(format!(
            "the chain head at seq {seq} ({}: line {}) names a record the local log does not have (it ends at \
             seq {local_last})",
            witness.display(),
            hs[0].1
        )));
    }
    let mut gaps = Vec::new();
    let mut expect = 1;
    for &seq in records.keys() {
        if seq > expect {
            gaps.push((expect, seq - 1));
        }
        expect = seq + 1;
    }
    Ok(Witnessed {
        instance,
        records: records.len() as u64,
        last_shipped,
        duplicates,
        heads: heads.len() as u64,
        gaps,
        local_last,
    })
}

/// The instance named by the local log's first record.
fn first_instance(dir: &Path) -> Result<String, String> {
    let mut follower = Follower::at(dir, Position::START).map_err(|e| e.to_string())?;
    match follower.next_line() {
        Ok(Some(line)) => Ok(line.instance),
        Ok(None) => Err(format!("{}: the local log holds no record", dir.display())),
        Err(e) => Err(format!("the local log: {e}")),
    }
}

type Records = BTreeMap<u64, Held>;
/// The records, the heads with their line, and the count of copies of records already held.
type WitnessCopy = (Records, Vec<(Head, u64)>, u64);

/// The records (by seq) and heads of `instance` in the collector's file, each message checked on its own: the
/// record's bytes hash to the hash its structured data carries, and its `seq` and `instance` are the record's.
fn read_witness(witness: &Path, instance: &str) -> Result<WitnessCopy, String> {
    let file = std::fs::File::open(witness).map_err(|e| format!("{}: {e}", witness.display()))?;
    let mut reader = BufReader::new(file);
    let (mut records, mut heads, mut duplicates) = (Records::new(), Vec::new(), 0u64);
    let mut bytes = Vec::new();
    let mut line_no = 0u64;
    loop {
        bytes.clear();
        let n = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| format!("{}: {e}", witness.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim_end_matches(['\n', '\r']);
        let at = |what: String| format!("{}: line {line_no}: {what}", witness.display());
        let Some(message) = syslog::parse(text) else {
            // A collector's own lines are not ssp's; a line with ssp's structured data must read whole.
            if text.contains(&format!("[{RECORD_SD} ")) || text.contains(&format!("[{HEAD_SD} ")) {
                return Err(at(
                    "a message of ssp that cannot be read (cut or changed)".into()
                ));
            }
            continue;
        };
        if message.param(RECORD_SD, "instance").is_some() {
            if message.param(RECORD_SD, "instance") != Some(instance) {
                continue;
            }
            let seq: u64 = message
                .param(RECORD_SD, "seq")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| at("a record without a seq".into()))?;
            let hash = message
                .param(RECORD_SD, "hash")
                .and_then(HexDigest::parse)
                .ok_or_else(|| at(format!("seq {seq}: a record without a hash")))?;
            let sent_len = message
                .param(RECORD_SD, "len")
                .and_then(|n| n.parse::<usize>().ok());
            if sent_len.is_some_and(|n| n > message.msg.len()) {
                return Err(at(format!(
                    "seq {seq}: the collector kept {} of the record's {} bytes (raise its maximum message size: \
                     rsyslog's maxMessageSize)",
                    message.msg.len(),
                    sent_len.unwrap_or_default()
                )));
            }
            if HexDigest::of(message.msg.as_bytes()) != hash {
                return Err(at(format!(
                    "seq {seq}: the record's bytes do not hash to the hash sent with them (changed at or after \
                     the collector)"
                )));
            }
            #[derive(serde::Deserialize)]
            struct Chain<'a> {
                seq: u64,
                instance: &'a str,
            }
            let chain: Chain = serde_json::from_str(message.msg)
                .map_err(|e| at(format!("seq {seq}: not a record: {e}")))?;
            if chain.seq != seq || chain.instance != instance {
                return Err(at(format!(
                    "seq {seq}: the record inside says seq {} of {:?}",
                    chain.seq, chain.instance
                )));
            }
            match records.get(&seq) {
                Some(held) if held.hash == hash => duplicates += 1,
                Some(held) => {
                    return Err(at(format!(
                        "seq {seq}: the collector holds two different records under this seq (the other on line \
                         {})",
                        held.line
                    )));
                }
                None => {
                    records.insert(
                        seq,
                        Held {
                            hash,
                            line: line_no,
                        },
                    );
                }
            }
        } else if message.param(HEAD_SD, "instance") == Some(instance) {
            let head = Head::from_params(|name| message.param(HEAD_SD, name)).ok_or_else(|| {
                at("a chain head without its seq, hash, time or signature".into())
            })?;
            heads.push((head, line_no));
        }
    }
    Ok((records, heads, duplicates))
}
