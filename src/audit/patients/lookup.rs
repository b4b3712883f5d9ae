//! Looking a patient up is access too: every `ssp audit subject` writes a `subject_lookup` record to the chain
//! before it shows anything. One writer owns a chain, so while the proxy runs the command asks it to write the
//! record, over a Unix socket in `audit.dir` ([`SOCKET_FILE`], mode 0600 in a 0700 folder: only the service user
//! and root reach it), and the proxy names the asker by the kernel's account of the connecting process
//! (`SO_PEERCRED`), not by what it says. With no proxy running the command writes the record itself.
//!
//! The exchange is one JSON line each way: `{"hmac", "key", "since", "sudo_user"}`, then `{"written": true}` once the
//! record is written, or `{"error"}`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::audit::{AuditLog, Lookup, Record};

/// The socket's name in `audit.dir`.
pub const SOCKET_FILE: &str = "lookup.sock";
/// Longest request line (bytes).
const MAX_REQUEST: u64 = 4096;
/// How long either side waits for the other.
const WAIT: Duration = Duration::from_secs(10);

/// What the command asks the proxy to record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    pub hmac: String,
    pub key: String,
    pub since: Option<String>,
    pub sudo_user: Option<String>,
}

impl Ask {
    /// The hash and key id as hex of the right length, and short printable texts: the proxy records nothing else.
    fn check(&self) -> Result<(), &'static str> {
        let hex = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_hexdigit());
        let printable = |t: &Option<String>| {
            t.as_ref()
                .is_none_or(|t| t.len() <= 64 && t.chars().all(|c| !c.is_control()))
        };
        if !hex(&self.hmac, 64) || !hex(&self.key, 8) {
            return Err("hmac must be 64 and key 8 hex digits");
        }
        if !printable(&self.since) || !printable(&self.sudo_user) {
            return Err("since and sudo_user must be up to 64 printable characters");
        }
        Ok(())
    }

    fn into_lookup(self, uid: u32, written_by: &'static str) -> Lookup {
        Lookup {
            uid,
            user: user_name(uid),
            sudo_user: self.sudo_user,
            hmac: self.hmac,
            key: self.key,
            since: self.since,
            written_by,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    written: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Binds the lookup socket in `dir` (a stale one from a proxy that did not stop cleanly is replaced). An error
/// here stops the proxy from starting: a command would otherwise write to the chain beside it.
pub fn bind(dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET_FILE);
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: another ssp serves this audit folder", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(&path)?,
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers one connection's lookup request: its record is written (and durable per `audit.durability`) before
/// the answer, within 10 s. The accept loop is the admin module's (`admin::serve_lookups`).
pub async fn answer(stream: tokio::net::UnixStream, audit: &AuditLog) {
    let _ = tokio::time::timeout(WAIT, answer_within(stream, audit)).await;
}

async fn answer_within(stream: tokio::net::UnixStream, audit: &AuditLog) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::AsyncReadExt::take(tokio::io::BufReader::new(read), MAX_REQUEST)
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Ask>(&line) {
        Err(e) => Err(format!("unreadable request: {e}")),
        Ok(ask) => match ask.check() {
            Err(why) => Err(why.to_owned()),
            Ok(()) => write_record(audit, ask.into_lookup(uid, "proxy")).await,
        },
    };
    let answer = match answer {
        Ok(()) => Answer {
            written: Some(true),
            error: None,
        },
        Err(error) => Answer {
            written: None,
            error: Some(error),
        },
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

async fn write_record(audit: &AuditLog, lookup: Lookup) -> Result<(), String> {
    let unavailable = |_| "the audit log is not taking records".to_owned();
    let room = audit.reserve().await.map_err(unavailable)?;
    let ticket = audit
        .queue(Record::lookup(lookup), room)
        .map_err(unavailable)?;
    ticket
        .written()
        .await
        .map_err(|_| "the record was not written".to_owned())
}

/// How the command's record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// By the running proxy.
    ByProxy,
    /// No proxy serves the folder: the caller writes it.
    NoProxy,
}

/// Asks the proxy serving `dir` to record `ask`; [`Written::NoProxy`] when none does (no socket, or a stale one).
pub fn ask_proxy(dir: &Path, ask: &Ask) -> Result<Written, String> {
    let path = dir.join(SOCKET_FILE);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Written::NoProxy);
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    stream.set_read_timeout(Some(WAIT)).map_err(fail)?;
    let mut line = serde_json::to_vec(ask).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(fail)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(fail)?;
    let answer: Answer = serde_json::from_str(&reply)
        .map_err(|e| format!("{}: unreadable answer: {e}", path.display()))?;
    match answer {
        Answer {
            written: Some(true),
            ..
        } => Ok(Written::ByProxy),
        Answer { error, .. } => Err(format!(
            "the proxy did not record the lookup: {}",
            error.unwrap_or_default()
        )),
    }
}

/// Writes `ask`'s record with a log of the command's own, when no proxy runs: the log is opened (a new segment),
/// the record written and the segment sealed; files the command made are given the folder's owner.
pub fn write_here(config: &crate::config::AuditConfig, ask: Ask) -> Result<(), String> {
    let dir: PathBuf = config.dir.clone();
    let before = segment_names(&dir);
    let uid = rustix::process::getuid().as_raw();
    let log = AuditLog::start_with_metrics(config.clone(), None);
    if !log.healthy() {
        log.close();
        return Err(format!(
            "{}: cannot open the transaction log: it is held by a running proxy whose lookup socket is missing, \
             or cannot be written by this user",
            dir.display()
        ));
    }
    log.submit(Record::lookup(ask.into_lookup(uid, "command")));
    log.close();
    for name in segment_names(&dir).difference(&before) {
        crate::audit::owned_like_dir(&dir.join(name), &dir);
    }
    Ok(())
}

fn segment_names(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The name of user `uid` in `/etc/passwd`, when it is there.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}
