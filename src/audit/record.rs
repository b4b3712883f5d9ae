//! The record schema (DESIGN.md 1.6): the typed [`Transaction`] every record of one exchange names, and the
//! [`Record`] kinds, each made by one constructor. A record is written as one JSON line whose fields come in a
//! fixed order: `seq`, `instance`, `ts`, `kind`, the kind's fields, `prev`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::hex::HexDigest;
use crate::ids::{Asid, InteractionId, PeerIdentity, TraceId};
use crate::json_writer::ObjectWriter;
use crate::jwt::JwtAudit;
use crate::policy::Permit;
use crate::ssp;

/// Longest raw `Ssp-*` header value kept in a refused request's records.
const MAX_AUDITED_HEADER: usize = 256;
/// Longest raw target kept in a refused request's records.
const MAX_AUDITED_TARGET: usize = 8 * 1024;

/// The consumer end of a connection, as the audit trail names it: built once per connection, and kept as the
/// JSON object every record of the connection's requests writes (`addr`, `subject`, `serial`,
/// `fingerprint_sha256`, and `via` when a balancer relayed the connection).
#[derive(Debug, Clone)]
pub struct Peer {
    json: Box<str>,
}

impl Peer {
    /// The consumer at `addr` (relayed by the layer-4 balancer at `via`, with a PROXY protocol header, if any)
    /// with the certificate read as `identity`.
    pub fn new(addr: SocketAddr, via: Option<SocketAddr>, identity: &PeerIdentity) -> Self {
        let mut out = Vec::with_capacity(256);
        let mut peer = ObjectWriter::open(&mut out);
        peer.str("addr", &addr.to_string());
        peer.str("subject", &identity.subject);
        peer.str("serial", &identity.serial);
        peer.str("fingerprint_sha256", &identity.fingerprint_sha256);
        if let Some(via) = via {
            peer.str("via", &via.to_string());
        }
        peer.close();
        Self {
            // Written from `&str`s with ASCII punctuation between them, so UTF-8.
            json: String::from_utf8_lossy(&out).into(),
        }
    }

    /// The JSON object.
    pub fn as_json(&self) -> &str {
        &self.json
    }
}

/// The identifiers a transaction's records name.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "held once per transaction, inside its Arc; boxing would cost an allocation per request"
)]
pub(super) enum Addressing {
    /// A permitted request: the parsed identifiers, shared with the request itself (reference counts, no copies),
    /// and the certificate name check 5 matched.
    Validated {
        trace_id: TraceId,
        from: Asid,
        to: Asid,
        interaction: InteractionId,
        /// A clone of the parsed target (reference counts).
        target: crate::ssp::Target,
        fqdn: Arc<str>,
    },
    /// A refused request: what it carried, raw and bounded (it may be what was refused).
    AsReceived {
        trace_id: Option<Box<str>>,
        from: Option<Box<str>>,
        to: Option<Box<str>>,
        interaction: Option<Box<str>>,
        target: Option<Box<str>>,
    },
}

/// One exchange as the audit trail names it: made once per request, shared by its request and response records.
#[derive(Debug)]
pub struct Transaction {
    pub(super) conn_id: u64,
    pub(super) peer: Arc<Peer>,
    pub(super) method: http::Method,
    /// The policy generation that decided the request.
    pub(super) policy_generation: u64,
    pub(super) addressing: Addressing,
}

impl Transaction {
    /// A permitted request's transaction, on connection `conn_id` from `peer`: the permit's identifiers are shared
    /// (reference counts), not copied, and it names the generation that permitted it.
    pub fn permitted(
        conn_id: u64,
        peer: &Arc<Peer>,
        method: &http::Method,
        permit: &Permit,
    ) -> Arc<Self> {
        let headers = &permit.request().headers;
        Arc::new(Self {
            conn_id,
            peer: Arc::clone(peer),
            method: method.clone(),
            policy_generation: permit.generation(),
            addressing: Addressing::Validated {
                trace_id: headers.trace_id.clone(),
                from: headers.from.clone(),
                to: headers.to.clone(),
                interaction: headers.interaction.clone(),
                target: permit.target().clone(),
                fqdn: Arc::clone(permit.fqdn()),
            },
        })
    }

    /// A refused request's transaction: the `Ssp-*` values and target it carried, raw (lossy UTF-8) and bounded
    /// (256 bytes a header, 8 KiB the target), since they may be what was refused; `generation` is the policy in
    /// force when it was refused.
    pub(crate) fn refused(
        conn_id: u64,
        peer: &Arc<Peer>,
        parts: &http::request::Parts,
        generation: u64,
    ) -> Arc<Self> {
        let raw = |name: &http::HeaderName| {
            parts.headers.get(name).map(|v| {
                let bytes = v.as_bytes();
                Box::from(String::from_utf8_lossy(
                    &bytes[..bytes.len().min(MAX_AUDITED_HEADER)],
                ))
            })
        };
        // An HTTP/1.1 request target in absolute form (RFC 9112 section 3.2.2) is recorded whole, as sent: its path
        // alone would lose the host the consumer named. (An HTTP/2 request's URI is always absolute, built from
        // `:scheme`, `:authority` and `:path`; only its path is the target.)
        let absolute = (parts.version <= http::Version::HTTP_11 && parts.uri.scheme().is_some())
            .then(|| parts.uri.to_string());
        let target = match &absolute {
            Some(uri) => Some(uri.as_str()),
            None => parts.uri.path_and_query().map(|pq| pq.as_str()),
        };
        let target = target.map(|sent| {
            let text = sent.strip_prefix('/').unwrap_or(sent);
            let end = (0..=text.len().min(MAX_AUDITED_TARGET))
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            Box::from(&text[..end])
        });
        Arc::new(Self {
            conn_id,
            peer: Arc::clone(peer),
            method: parts.method.clone(),
            policy_generation: generation,
            addressing: Addressing::AsReceived {
                trace_id: raw(&ssp::HEADER_TRACE_ID),
                from: raw(&ssp::HEADER_FROM),
                to: raw(&ssp::HEADER_TO),
                interaction: raw(&ssp::HEADER_INTERACTION_ID),
                target,
            },
        })
    }

    /// The connection the request came on (for log lines).
    pub(crate) fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The trace id, checked or as sent.
    pub(crate) fn trace_id(&self) -> Option<&str> {
        match &self.addressing {
            Addressing::Validated { trace_id, .. } => Some(trace_id.as_str()),
            Addressing::AsReceived { trace_id, .. } => trace_id.as_deref(),
        }
    }

    /// `from`, `to`, `interaction`.
    pub(crate) fn parties(&self) -> [Option<&str>; 3] {
        match &self.addressing {
            Addressing::Validated {
                from,
                to,
                interaction,
                ..
            } => [
                Some(from.as_str()),
                Some(to.as_str()),
                Some(interaction.as_str()),
            ],
            Addressing::AsReceived {
                from,
                to,
                interaction,
                ..
            } => [from.as_deref(), to.as_deref(), interaction.as_deref()],
        }
    }
}

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
    Sealed {
        why: SealReason,
        /// Bytes of a torn last line set aside during recovery, and the file they went to.
        torn: Option<(u64, String)>,
    },
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
    /// SHA-256 (hex) of the previous line.
    pub prev: &'a str,
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
        line.str("ts", record.ts.as_str());
        match &record.entry {
            Event::Permitted { tx, jwt } => request(&mut line, tx, "permit", None, jwt.as_ref()),
            Event::Refused { tx, reason, jwt } => {
                request(&mut line, tx, "deny", Some(reason), jwt.as_deref());
            }
            Event::Completed { tx, end } => {
                line.str("kind", "response");
                line.str_if("trace_id", tx.trace_id());
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
                line.str("outcome", end.outcome.as_str());
            }
            Event::Selftest {
                tx,
                verdict,
                failed,
                reason,
            } => {
                line.str("kind", "selftest");
                line.str_if("trace_id", tx.trace_id());
                line.u64("conn_id", tx.conn_id);
                line.raw("peer", tx.peer.as_json());
                parties(&mut line, tx);
                line.str("method", tx.method.as_str());
                if let Addressing::AsReceived { target, .. } = &tx.addressing {
                    line.str_if("target", target.as_deref());
                }
                line.str("verdict", verdict);
                let failed: Vec<String> = failed.iter().map(u8::to_string).collect();
                line.raw("failed", &format!("[{}]", failed.join(",")));
                line.str_if("reason", reason.as_deref());
                line.u64("policy_generation", tx.policy_generation);
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
                Event::Permitted { .. } | Event::Refused { .. } | Event::Selftest { .. }
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
        line.str("prev", link.prev);
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
    line.str("kind", "request");
    line.str_if("trace_id", tx.trace_id());
    line.u64("conn_id", tx.conn_id);
    line.raw("peer", tx.peer.as_json());
    let target = match &tx.addressing {
        Addressing::Validated { fqdn, target, .. } => {
            line.str("fqdn", fqdn);
            Some(target.as_str())
        }
        Addressing::AsReceived { target, .. } => target.as_deref(),
    };
    parties(line, tx);
    line.str("method", tx.method.as_str());
    line.str_if("target", target);
    line.str("decision", decision);
    line.str_if("reason", reason);
    line.u64("policy_generation", tx.policy_generation);
    if let Some(jwt) = jwt {
        line.obj("jwt", |o| jwt.write_json(o));
    }
}

fn parties(line: &mut ObjectWriter<'_>, tx: &Transaction) {
    let [from, to, interaction] = tx.parties();
    line.str_if("from", from);
    line.str_if("to", to);
    line.str_if("interaction", interaction);
}

#[cfg(test)]
mod tests;
