//! The transaction log leaves the box (`[audit.ship]`): every record, as written, goes to the operator's syslog
//! collector (rsyslog, syslog-ng) as an RFC 5424 message over RFC 5425 TLS, or TCP to a relay on loopback, with
//! signed chain heads beside them; `ssp audit verify --witness` checks the local log against the collector's copy;
//! `ssp audit export --format spine` writes the log in the shape NHS England's analytics reads.
//!
//! The shipper is one thread of its own (`ssp-audit-ship`) that reads the segment files, never the writer's
//! memory: a request never waits for it, and what it has not shipped waits on disk, across restarts. Syslog over
//! TLS is one way (RFC 5425 defines no answer from the receiver), so a batch is confirmed by closing the
//! connection: the
//! shipper sends its records, a TLS close_notify and a TCP FIN, and counts them received only when the collector
//! closes its end in turn, which it does after reading everything before the FIN (a collector that closed with
//! bytes unread would have reset the connection instead). Only then is the shipped position (`ship.state` in
//! `audit.dir`, written and fsynced before it is renamed into place) moved on. A batch not confirmed is sent
//! again from the last confirmed record: the collector may then hold a record twice, always with the same `seq`
//! and the same bytes, and `verify --witness` counts such a copy once.
//!
//! - [`syslog`]: the messages, framed and read back.
//! - [`head`]: the signed chain heads.
//! - [`link`]: the connection to the collector and the confirmation by closing it.
//! - [`witness`]: `ssp audit verify --witness`.
//! - [`spine`]: `ssp audit export --format spine`.

pub mod head;
mod link;
pub mod spine;
pub mod syslog;
pub mod witness;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::audit::follow::{FollowError, Follower, Line, LineCounter, Position};
use crate::config::{AuditConfig, ShipConfig};
use crate::hex::HexDigest;
use crate::metrics::ShipMetrics;
use crate::signing::SigningKey;

/// The shipped position's file in `audit.dir`.
pub const STATE_FILE: &str = "ship.state";
/// How often the shipper looks for new records when it has none.
const POLL: Duration = Duration::from_millis(50);
/// Bytes of messages gathered before they are made durable locally (one fdatasync, about 0.2 ms of CPU here) and
/// sent.
const SEND_PIECE: usize = 1 << 20;
/// Most records one connection carries before it is confirmed.
const MAX_PER_BATCH: u64 = 20_000;
/// The wait after a failure doubles from this to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most bytes the lag counter reads ahead in one turn (it catches up over several).
const COUNT_STEP: u64 = 64 << 20;

/// The running shipper: [`Shipper::finish`] stops it.
#[derive(Debug)]
pub struct Shipper {
    stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Closed (its sender dropped) when the thread ends.
    ended: std::sync::mpsc::Receiver<()>,
}

/// The stop request, with a deadline, and the condition the thread sleeps on.
#[derive(Debug, Default)]
struct Stop {
    deadline: Mutex<Option<Instant>>,
    wake: Condvar,
    /// The socket of the batch in flight, for a stop past its deadline to shut down (which ends a blocked read or
    /// write at once).
    socket: Mutex<Option<std::net::TcpStream>>,
}

impl Stop {
    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps up to `d`, or until a stop is requested.
    fn wait(&self, d: Duration) {
        let guard = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let _ = self.wake.wait_timeout(guard, d);
        }
    }
}

/// Checks what `[audit.ship]` needs (the head key, the TLS files) without connecting: for `check-config` and the
/// start.
pub fn check(cfg: &ShipConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if !cfg.head_key.as_os_str().is_empty()
        && let Err(why) = SigningKey::load(&cfg.head_key)
    {
        problems.push(format!("audit.ship.head_key: {why}"));
    }
    if let Err(p) = link::tls_config(cfg) {
        // A bad `server_name` is the config's problem, already reported with its line.
        problems.extend(
            p.into_iter()
                .filter(|p| !p.starts_with("audit.ship.server_name")),
        );
    }
    problems
}

/// Starts the shipper thread for the log in `audit.dir`. Fails, naming the key, when the head key or a TLS file
/// cannot be used, or when the thread cannot be started.
pub fn start(
    cfg: &ShipConfig,
    audit: &AuditConfig,
    metrics: ShipMetrics,
) -> Result<Shipper, String> {
    let key =
        SigningKey::load(&cfg.head_key).map_err(|why| format!("audit.ship.head_key: {why}"))?;
    let tls = link::tls_config(cfg).map_err(|p| p.join("; "))?;
    let stop = Arc::new(Stop::default());
    let mut run = Run {
        link: link::Target {
            collector: cfg.collector.clone(),
            tls,
        },
        cfg: cfg.clone(),
        dir: audit.dir.clone(),
        instance: audit.instance.clone(),
        key,
        metrics,
        procid: std::process::id().to_string(),
        stop: Arc::clone(&stop),
        confirmed: Position::START,
        follower: None,
        counter: None,
        oldest: None,
        last_head: None,
    };
    let (ending, ended) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("ssp-audit-ship".into())
        .spawn(move || {
            let _ending = ending;
            run.run();
        })
        .map_err(|e| format!("audit.ship: cannot start the shipper thread: {e}"))?;
    Ok(Shipper {
        stop,
        thread: Some(thread),
        ended,
    })
}

impl Shipper {
    /// Asks the shipper to ship what the log holds (the seal of a closing log too) and stop, and waits for it,
    /// for up to `within`. What is left stays on disk and goes at the next start.
    pub fn finish(mut self, within: Duration) {
        *self.stop.deadline.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + within);
        self.stop.wake.notify_all();
        let Some(thread) = self.thread.take() else {
            return;
        };
        // A step of the batch in flight may be blocked on the collector for a while yet: past the deadline its
        // socket is shut down, which ends the step with an error (and the batch unconfirmed).
        let out_of_time = matches!(
            self.ended.recv_timeout(within),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        if out_of_time
            && let Some(socket) = self
                .stop
                .socket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        if thread.join().is_err() {
            tracing::error!("the audit shipper thread panicked");
        }
    }
}

/// The shipper thread's state.
struct Run {
    link: link::Target,
    cfg: ShipConfig,
    dir: PathBuf,
    instance: String,
    key: SigningKey,
    metrics: ShipMetrics,
    procid: String,
    stop: Arc<Stop>,
    /// The last record the collector confirmed.
    confirmed: Position,
    /// Reads what is to be sent; rewound to `confirmed` after a failure.
    follower: Option<Follower>,
    /// Counts the lines to the end of the log, for the lag metric only.
    counter: Option<LineCounter>,
    /// Seq and time (Unix seconds) of the oldest record not yet confirmed, once a reader has seen it.
    oldest: Option<(u64, f64)>,
    last_head: Option<Instant>,
}

/// What one turn did.
enum Turn {
    /// Nothing to send.
    Idle,
    /// A batch (records, a head, or both) was sent and confirmed.
    Confirmed,
}

impl Run {
    fn run(&mut self) {
        self.confirmed = match load_state(&self.dir, &self.cfg.collector) {
            Ok(pos) => pos,
            Err(why) => {
                tracing::warn!(dir = %self.dir.display(), "audit shipping starts at the first record: {why}");
                Position::START
            }
        };
        tracing::info!(collector = %self.cfg.collector, seq = self.confirmed.seq, "audit shipping from here");
        let mut backoff = MIN_BACKOFF;
        let mut failing = 0u32;
        loop {
            let deadline = self.stop.deadline();
            self.update_lag();
            let turn = self.turn(deadline.is_some());
            self.update_lag();
            match turn {
                Ok(Turn::Confirmed) => {
                    if failing > 0 {
                        tracing::info!(collector = %self.cfg.collector, seq = self.confirmed.seq,
                            "audit shipping resumed after {failing} failed attempts");
                    }
                    (backoff, failing) = (MIN_BACKOFF, 0);
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return;
                    }
                }
                Ok(Turn::Idle) if deadline.is_some() => return,
                Ok(Turn::Idle) => self.stop.wait(POLL),
                Err(why) => {
                    self.metrics.failures.inc();
                    // The first failure, then one line a minute or so (at the longest wait, every 12th).
                    if failing % 12 == 0 {
                        tracing::warn!(collector = %self.cfg.collector, error = %why, seq = self.confirmed.seq,
                            "audit shipping failed; the records wait on disk and go when the collector answers");
                    }
                    failing += 1;
                    self.follower = None;
                    // Stopping: what is left goes at the next start.
                    if deadline.is_some() {
                        return;
                    }
                    self.stop.wait(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A reader at the confirmed position; a position the log no longer has starts over at the first record.
    fn follower(&mut self) -> Result<&mut Follower, String> {
        if self.follower.is_none() {
            let follower = match Follower::at(&self.dir, self.confirmed.clone()) {
                Ok(f) => f,
                Err(FollowError::Chain(why)) => {
                    tracing::error!(dir = %self.dir.display(), "{why}; shipping again from the first record");
                    self.confirmed = Position::START;
                    self.counter = None;
                    Follower::at(&self.dir, Position::START).map_err(|e| e.to_string())?
                }
                Err(e) => return Err(e.to_string()),
            };
            self.follower = Some(follower);
        }
        self.follower
            .as_mut()
            .ok_or_else(|| "no reader of the log".to_owned())
    }

    fn next_line(&mut self) -> Result<Option<Line>, String> {
        let line = self.follower()?.next_line().map_err(|e| e.to_string())?;
        if let Some(line) = &line {
            self.saw(line);
        }
        Ok(line)
    }

    /// Makes the records read so far durable locally before they are sent (see [`Follower::sync`]).
    fn durable(&self) -> Result<(), String> {
        match &self.follower {
            Some(f) => f
                .sync()
                .map_err(|e| format!("fdatasync of the segment: {e}")),
            None => Ok(()),
        }
    }

    /// Keeps the time of the oldest unconfirmed record when a reader passes it.
    fn saw(&mut self, line: &Line) {
        if line.seq == self.confirmed.seq + 1 && self.oldest.is_none_or(|(seq, _)| seq != line.seq)
        {
            let t = time::OffsetDateTime::parse(
                &line.ts,
                &time::format_description::well_known::Rfc3339,
            )
            .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
            .unwrap_or_else(|_| crate::clock::unix_now() as f64);
            self.oldest = Some((line.seq, t));
        }
    }

    /// Sends what the log holds past the confirmed position (and a head when one is due) on one connection, for
    /// up to `audit.ship.confirm_interval`, then confirms it.
    fn turn(&mut self, stopping: bool) -> Result<Turn, String> {
        let head_due = self
            .last_head
            .is_none_or(|t| t.elapsed() >= self.cfg.head_interval);
        let first = self.next_line()?;
        if first.is_none() && !(head_due && self.confirmed.seq > 0) {
            return Ok(Turn::Idle);
        }
        let started = Instant::now();
        // Every step of the batch, its confirmation included, is over by this, and by the stop's deadline.
        let mut deadline = started + self.cfg.confirm_interval + link::IO_TIMEOUT;
        if let Some(stop) = self.stop.deadline() {
            deadline = deadline.min(stop);
        }
        let mut conn = self
            .link
            .connect(deadline, &self.stop.socket)
            .map_err(|e| format!("connecting: {e}"))?;
        let mut buf = Vec::with_capacity(SEND_PIECE + (128 << 10));
        let (mut sent, mut last) = (0u64, None::<Position>);
        let mut line = first;
        loop {
            while let Some(l) = line.take() {
                let mut seq = itoa::Buffer::new();
                let seq = seq.format(l.seq);
                let header = syslog::Header {
                    ts: &l.ts,
                    hostname: &self.cfg.hostname,
                    procid: &self.procid,
                };
                let mut len = itoa::Buffer::new();
                let params = [
                    ("seq", seq),
                    ("instance", l.instance.as_str()),
                    ("hash", l.hash.as_str()),
                    ("len", len.format(l.bytes.len())),
                ];
                syslog::frame(
                    &mut buf,
                    &header,
                    "record",
                    syslog::RECORD_SD,
                    &params,
                    &l.bytes,
                );
                sent += 1;
                last = Some(l.after);
                // Sent in pieces of a MiB, each after one fdatasync (one a piece, not one a record).
                if buf.len() >= SEND_PIECE {
                    self.durable()?;
                    conn.cap(self.stop.deadline());
                    conn.send(&buf).map_err(|e| format!("sending: {e}"))?;
                    buf.clear();
                }
                if sent < MAX_PER_BATCH {
                    line = self.next_line()?;
                }
            }
            self.durable()?;
            conn.cap(self.stop.deadline());
            conn.send(&buf).map_err(|e| format!("sending: {e}"))?;
            buf.clear();
            let stopping = stopping || self.stop.deadline().is_some();
            if stopping || sent >= MAX_PER_BATCH || started.elapsed() >= self.cfg.confirm_interval {
                break;
            }
            self.stop.wait(POLL);
            line = self.next_line()?;
            if line.is_none() {
                break;
            }
        }
        let end = last.clone().unwrap_or_else(|| self.confirmed.clone());
        let head = (head_due && end.seq > 0).then(|| {
            head::Head::sign(
                &self.key,
                &self.instance,
                end.seq,
                end.hash,
                crate::clock::now_rfc3339(),
            )
        });
        if let Some(head) = &head {
            let params = head.params();
            let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let header = syslog::Header {
                ts: &head.time,
                hostname: &self.cfg.hostname,
                procid: &self.procid,
            };
            let msg = serde_json::json!({
                "kind": "chain_head", "instance": head.instance, "seq": head.seq, "hash": head.hash.as_str(),
                "time": head.time, "sig": head.sig, "key": self.key.public_base64(),
            });
            syslog::frame(
                &mut buf,
                &header,
                "head",
                syslog::HEAD_SD,
                &params,
                msg.to_string().as_bytes(),
            );
            conn.send(&buf).map_err(|e| format!("sending: {e}"))?;
        }
        conn.cap(self.stop.deadline());
        conn.confirm().map_err(|e| format!("confirming: {e}"))?;
        if let Some(last) = last {
            save_state(&self.dir, &self.cfg.collector, &last)
                .map_err(|e| format!("{STATE_FILE}: {e}"))?;
            self.confirmed = last;
            self.oldest = None;
            self.metrics.shipped.inc_by(sent);
        }
        if head.is_some() {
            self.last_head = Some(Instant::now());
            self.metrics.heads.inc();
        }
        Ok(Turn::Confirmed)
    }

    /// `ssp_audit_ship_lag_records` (lines past the confirmed position, counted, not read) and
    /// `ssp_audit_ship_lag_seconds` (from the time of the first of them, once the shipper has read it).
    fn update_lag(&mut self) {
        let counter = self
            .counter
            .get_or_insert_with(|| LineCounter::at(&self.dir, &self.confirmed));
        let end = counter.advance(COUNT_STEP).unwrap_or(self.confirmed.seq);
        let lag = end.saturating_sub(self.confirmed.seq);
        self.metrics.lag_records.set(lag as i64);
        let seconds = match self.oldest {
            Some((seq, t)) if lag > 0 && seq == self.confirmed.seq + 1 => {
                (time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9 - t).max(0.0)
            }
            _ => 0.0,
        };
        self.metrics.lag_seconds.set(seconds);
    }
}

/// The state file as written.
#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    collector: String,
    segment: u64,
    offset: u64,
    seq: u64,
    hash: String,
    line_at: u64,
}

/// The confirmed position for `collector`; a missing file is the start of the log, a file for another collector
/// or one that cannot be read is reported (and shipping starts at the first record).
fn load_state(dir: &Path, collector: &str) -> Result<Position, String> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Position::START),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let state: State =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if state.collector != collector {
        return Err(format!(
            "{}: shipped to {:?} so far, and the collector is now {collector:?}",
            path.display(),
            state.collector
        ));
    }
    Ok(Position {
        segment: state.segment,
        offset: state.offset,
        seq: state.seq,
        hash: HexDigest::parse(&state.hash)
            .ok_or_else(|| format!("{}: bad hash", path.display()))?,
        line_at: state.line_at,
    })
}

/// Writes the confirmed position: a temporary file, fsynced, renamed over the old one, the folder fsynced.
fn save_state(dir: &Path, collector: &str, pos: &Position) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let state = State {
        collector: collector.to_owned(),
        segment: pos.segment,
        offset: pos.offset,
        seq: pos.seq,
        hash: pos.hash.to_string(),
        line_at: pos.line_at,
    };
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(&state).map_err(std::io::Error::other)?)?;
    file.write_all(b"\n")?;
    file.sync_data()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}
