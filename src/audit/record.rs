//! The record schema (DESIGN.md 1.6): the typed [`Transaction`] every record of one exchange names, and the
//! [`Record`] kinds, each made by one constructor. A record is written as one JSON line whose fields come in a
//! fixed order: `seq`, `instance`, `ts`, `kind`, the kind's fields, `prev`.

use std::sync::Arc;
use std::time::Duration;

use super::patients::PatientRef;
use crate::hex::HexDigest;
use crate::json_writer::ObjectWriter;
use crate::jwt::JwtAudit;

mod transaction;

pub(super) use transaction::Addressing;
pub use transaction::{PatientAccess, Peer, Transaction};

/// How an exchange ended (DESIGN.md 1.6 `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused by a check: nothing was forwarded.
    Denied,
    /// The consumer went away before the exchange ended.
    ClientClosed,
    /// The consumer's request body was malformed (answered 400 after the request record was written).
    ClientError,
    UpstreamError,
    Timeout,
}

impl Outcome {
    /// The record's and the metrics' label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::ClientClosed => "client_closed",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
        }
    }
}

/// What a response record says of how the exchange went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    pub status: u16,
    /// Consumer to provider body bytes.
    pub bytes_in: u64,
    /// Provider to consumer body bytes.
    pub bytes_out: u64,
    /// From the start of the request to the provider's response head.
    pub upstream: Duration,
    /// From the start of the request to the end of the exchange.
    pub total: Duration,
    /// Sent a second time on a new connection after a stale pooled one.
    pub retried: bool,
    pub outcome: Outcome,
    /// Cut because the consumer accepted no response bytes for `upstream.body_idle_timeout` (the outcome is then
    /// `timeout`; this says whose silence it was). Not a record field: the log line and the metrics use it.
    pub consumer_stalled: bool,
}

/// Why a segment was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealReason {
    Rotate,
    Shutdown,
    /// Found unsealed at start (its writer did not stop cleanly).
    Recovered,
}

impl SealReason {
    fn as_str(self) -> &'static str {
        match self {
            SealReason::Rotate => "rotate",
            SealReason::Shutdown => "shutdown",
            SealReason::Recovered => "recovered",
        }
    }
}

#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a record lives only until it is encoded, on the thread that made it; boxing the token's claims \
              would cost an allocation per request"
)]
enum Event {
    Permitted {
        tx: Arc<Transaction>,
        jwt: Option<JwtAudit>,
    },
    Refused {
        tx: Arc<Transaction>,
        reason: String,
        jwt: Option<Box<JwtAudit>>,
    },
    Completed {
        tx: Arc<Transaction>,
        end: Completion,
    },
    /// A consumer's `GET /_ssp/selftest`: nothing was forwarded.
    Selftest {
        tx: Arc<Transaction>,
        /// `pass` or `fail`.
        verdict: &'static str,
        /// The failed checks' numbers.
        failed: Vec<u8>,
        /// The text the proxy would answer the first failure with.
        reason: Option<String>,
    },
    /// An operator's `ssp audit subject`: looking a patient up is access too.
    Lookup(Box<Lookup>),
    Sealed {
        why: SealReason,
        /// Bytes of a torn last line set aside during recovery, and the file they went to.
        torn: Option<(u64, String)>,
    },
}

/// Who looked which patient up (`ssp audit subject`), as its `subject_lookup` record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The user id of the process that asked: the kernel's (`SO_PEERCRED`) when the running proxy wrote the
    /// record, the command's own when it wrote the log itself.
    pub uid: u32,
    /// That user's name, when the system knows it.
    pub user: Option<String>,
    /// `SUDO_USER` of the command, as it says (not checked): the person behind a `sudo -u ssp`.
    pub sudo_user: Option<String>,
    /// `HMAC-SHA256(key, number)` of the patient (64 hex digits) and the key's id.
    pub hmac: String,
    pub key: String,
    /// The lookup's `--since`, as given.
    pub since: Option<String>,
    /// `proxy` (the running proxy wrote it for the command) or `command` (no proxy was running).
    pub written_by: &'static str,
}

/// One audit record, stamped when made. `seq`, `instance` and `prev` are the writer's.
#[derive(Debug)]
pub struct Record {
    ts: crate::clock::Timestamp,
    entry: Event,
}

impl Record {
    fn new(entry: Event) -> Self {
        Self {
            ts: crate::clock::Timestamp::now(),
            entry,
        }
    }

    /// The `request` record of a permitted request: `decision: permit`, and the token's claims when check 10 ran.
    pub fn permitted(tx: &Arc<Transaction>, jwt: Option<JwtAudit>) -> Self {
        Self::new(Event::Permitted {
            tx: Arc::clone(tx),
            jwt,
        })
    }

    /// The `request` record of a refused request: `decision: deny` and the refusal's text.
    pub(crate) fn refused(
        tx: &Arc<Transaction>,
        reason: String,
        jwt: Option<Box<JwtAudit>>,
    ) -> Self {
        Self::new(Event::Refused {
            tx: Arc::clone(tx),
            reason,
            jwt,
        })
    }

    /// The `response` record that ends a forwarded exchange.
    pub(crate) fn completed(tx: &Arc<Transaction>, end: Completion) -> Self {
        Self::new(Event::Completed {
            tx: Arc::clone(tx),
            end,
        })
    }

    /// The `response` record of a refused request: the refusal's status, nothing sent either way, `denied`, and
    /// `total` from the start of the request.
    pub(crate) fn denied(tx: &Arc<Transaction>, status: u16, total: Duration) -> Self {
        Self::completed(
            tx,
            Completion {
                status,
                bytes_in: 0,
                bytes_out: 0,
                upstream: Duration::ZERO,
                total,
                retried: false,
                consumer_stalled: false,
                outcome: Outcome::Denied,
            },
        )
    }

    /// The `selftest` record of a consumer's `GET /_ssp/selftest`: the verdict (`pass` or `fail`), the failed
    /// checks, and the text the proxy would refuse the sample request with.
    pub(crate) fn selftest(
        tx: &Arc<Transaction>,
        passed: bool,
        failed: Vec<u8>,
        reason: Option<String>,
    ) -> Self {
        Self::new(Event::Selftest {
            tx: Arc::clone(tx),
            verdict: if passed { "pass" } else { "fail" },
            failed,
            reason,
        })
    }

    /// The `subject_lookup` record of an `ssp audit subject`, written before its answer is shown.
    pub fn lookup(lookup: Lookup) -> Self {
        Self::new(Event::Lookup(Box::new(lookup)))
    }

    /// The `seal` record that ends a segment.
    pub(crate) fn sealed(why: SealReason, torn: Option<(u64, String)>) -> Self {
        Self::new(Event::Sealed { why, torn })
    }
}

/// A duration as the audit record's milliseconds, to the microsecond.
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Where a record goes in the chain: the writer's part of the line.
#[derive(Debug, Clone, Copy)]
pub struct ChainLink<'a> {
    pub seq: u64,
    pub instance: &'a str,
    /// SHA-256 of the previous line (written as its 64 hex digits).
    pub prev: &'a HexDigest,
}

/// Appends `record` to `buf` as one JSON line at `link` and returns the SHA-256 (hex) of the line, the next
/// record's `prev`: [`Encoded::new`] and [`Encoded::write`] in one.
pub fn encode(record: &Record, link: ChainLink<'_>, buf: &mut Vec<u8>) -> HexDigest {
    Encoded::new(record, Vec::new()).write(link, buf)
}

/// A record as JSON text, made on the thread that made the record, while what it names is still in that thread's
/// cache; the writer adds the chain's fields (`seq`, `instance`, `prev`) with [`Encoded::write`]. So the writer
/// thread reads no request's data and frees none of it, and only the text crosses threads, in a buffer the writer
/// hands back for a later record (`AuditLog`'s spare buffers).
#[derive(Debug)]
pub struct Encoded {
    /// The fields from `ts` to the last one before `prev`, each as `,"key":value`.
    fields: Vec<u8>,
    request: bool,
}

impl Encoded {
    /// Writes `record`'s fields into `buf` (emptied first: a spare buffer of an earlier record, so that encoding
    /// allocates nothing once the buffers are in circulation).
    pub fn new(record: &Record, mut buf: Vec<u8>) -> Self {
        buf.clear();
        let mut line = ObjectWriter::continued(&mut buf);
        line.verbatim("ts", record.ts.as_str());
        match &record.entry {
            Event::Permitted { tx, jwt } => request(&mut line, tx, "permit", None, jwt.as_ref()),
            Event::Refused { tx, reason, jwt } => {
                request(&mut line, tx, "deny", Some(reason), jwt.as_deref());
            }
            Event::Completed { tx, end } => {
                line.verbatim("kind", "response");
                trace_id(&mut line, tx);
                line.u64("conn_id", tx.conn_id);
                parties(&mut line, tx);
                line.u64("status", u64::from(end.status));
                line.u64("bytes_in", end.bytes_in);
                line.u64("bytes_out", end.bytes_out);
                line.f64("upstream_ms", millis(end.upstream));
                line.f64("total_ms", millis(end.total));
                if end.retried {
                    line.bool("retried", true);
                }
                line.verbatim("outcome", end.outcome.as_str());
                if let Some(p) = &tx.patients
                    && let Some(body) = &p.body
                    && !body.found().is_empty()
                {
                    patients_field(&mut line, &p.key, body.found());
                }
            }
            Event::Selftest {
                tx,
                verdict,
                failed,
                reason,
            } => {
                line.verbatim("kind", "selftest");
                trace_id(&mut line, tx);
                line.u64("conn_id", tx.conn_id);
                line.raw("peer", tx.peer.as_json());
                parties(&mut line, tx);
                line.verbatim("method", tx.method.as_str());
                if let Addressing::AsReceived { .. } = &tx.addressing {
                    line.str_if("target", tx.recorded_target());
                }
                patients(&mut line, tx);
                line.str("verdict", verdict);
                let failed: Vec<String> = failed.iter().map(u8::to_string).collect();
                line.raw("failed", &format!("[{}]", failed.join(",")));
                line.str_if("reason", reason.as_deref());
                line.u64("policy_generation", tx.policy_generation);
            }
            Event::Lookup(lookup) => {
                line.str("kind", "subject_lookup");
                line.u64("uid", u64::from(lookup.uid));
                line.str_if("user", lookup.user.as_deref());
                line.str_if("sudo_user", lookup.sudo_user.as_deref());
                line.str("hmac", &lookup.hmac);
                line.str("key", &lookup.key);
                line.str_if("since", lookup.since.as_deref());
                line.str("written_by", lookup.written_by);
            }
            Event::Sealed { why, torn } => {
                line.str("kind", "seal");
                line.str("sealed", why.as_str());
                if let Some((bytes, file)) = torn {
                    line.u64("torn_bytes", *bytes);
                    line.str("torn_file", file);
                }
            }
        }
        Self {
            fields: buf,
            request: matches!(
                record.entry,
                Event::Permitted { .. }
                    | Event::Refused { .. }
                    | Event::Selftest { .. }
                    | Event::Lookup(_)
            ),
        }
    }

    /// A `request` record (of a permitted or a refused request), which the writer never holds back.
    pub(crate) fn is_request(&self) -> bool {
        self.request
    }

    /// The buffer, for a later record.
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        self.fields
    }

    /// Appends the record to `buf` as one JSON line at `link` (fields in the order of the module's header) and
    /// returns the SHA-256 (hex) of the line, the next record's `prev`: the whole cost of a record on the writer,
    /// but for the `write`.
    pub fn write(&self, link: ChainLink<'_>, buf: &mut Vec<u8>) -> HexDigest {
        let start = buf.len();
        let mut line = ObjectWriter::open(buf);
        line.u64("seq", link.seq);
        line.str("instance", link.instance);
        line.fields(&self.fields);
        line.verbatim("prev", link.prev.as_str());
        line.close();
        let hash = HexDigest::of(&buf[start..]);
        buf.push(b'\n');
        hash
    }
}

/// The fields of a `request` record, after `ts`.
fn request(
    line: &mut ObjectWriter<'_>,
    tx: &Transaction,
    decision: &str,
    reason: Option<&str>,
    jwt: Option<&JwtAudit>,
) {
    line.verbatim("kind", "request");
    trace_id(line, tx);
    line.u64("conn_id", tx.conn_id);
    line.raw("peer", tx.peer.as_json());
    if let Addressing::Validated { fqdn, .. } = &tx.addressing {
        line.str("fqdn", fqdn);
    }
    parties(line, tx);
    line.verbatim("method", tx.method.as_str());
    line.str_if("target", tx.recorded_target());
    patients(line, tx);
    line.verbatim("decision", decision);
    line.str_if("reason", reason);
    line.u64("policy_generation", tx.policy_generation);
    if let Some(jwt) = jwt {
        line.obj("jwt", |o| jwt.write_json(o));
    }
    if let Some(access) = &tx.access {
        line.obj("patient_facing", |o| {
            o.str_if("request_id", access.request_id.as_deref());
            o.str_if("correlation_id", access.correlation_id.as_deref());
            o.str_if("client_id", access.client_id.as_deref());
            o.str_if("nhs_number", access.nhs_number.as_deref());
            o.str_if("proofing", access.proofing);
            o.str_if("acting", access.acting.as_deref());
            if let Some((ods, from)) = &access.practice {
                o.str("practice", ods);
                o.str("practice_from", from);
            }
            o.str_if("supplier", access.supplier.as_deref());
            o.str_if("exchange", access.exchange);
        });
    }
}

/// `"patients": {"key": <key id>, "ids": [{"hmac", "check", "in"}...]}`: the numbers a record names.
fn patients_field(line: &mut ObjectWriter<'_>, key_id: &str, refs: &[PatientRef]) {
    line.obj("patients", |o| {
        o.str("key", key_id);
        o.arr("ids", refs, |o, r| {
            o.verbatim("hmac", r.hmac.as_str());
            o.verbatim("check", r.check.as_str());
            o.verbatim("in", r.source.as_str());
        });
    });
}

/// The `patients` field of a request (or self-test) record: the numbers of its target.
fn patients(line: &mut ObjectWriter<'_>, tx: &Transaction) {
    if let Some(p) = &tx.patients
        && !p.target.is_empty()
    {
        patients_field(line, &p.key, &p.target);
    }
}

/// `trace_id`: a checked one (a UUID) copied as it is, one as received escaped.
fn trace_id(line: &mut ObjectWriter<'_>, tx: &Transaction) {
    identifiers(line, tx, [("trace_id", tx.trace_id())]);
}

/// `from`, `to`, `interaction`: checked ones (digits, an RFC 8141 URN) copied as they are, ones as received
/// escaped.
fn parties(line: &mut ObjectWriter<'_>, tx: &Transaction) {
    let [from, to, interaction] = tx.parties();
    identifiers(
        line,
        tx,
        [("from", from), ("to", to), ("interaction", interaction)],
    );
}

/// Each identifier that is there: as checked (a permitted request's, whose types admit nothing JSON escapes)
/// copied as it is, as received (a refused request's) escaped.
fn identifiers<const N: usize>(
    line: &mut ObjectWriter<'_>,
    tx: &Transaction,
    fields: [(&'static str, Option<&str>); N],
) {
    let checked = matches!(tx.addressing, Addressing::Validated { .. });
    for (key, value) in fields {
        match value {
            Some(value) if checked => line.verbatim(key, value),
            value => line.str_if(key, value),
        }
    }
}

#[cfg(test)]
mod tests;
