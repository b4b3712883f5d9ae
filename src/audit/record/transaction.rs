//! The typed transaction every record of one exchange names: the consumer [`Peer`], the identifiers (checked, or
//! as received), and the patients its target and body name.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::audit::patients::body::BodyScan;
use crate::audit::patients::{Indexer, PatientRef};
use crate::ids::{Asid, InteractionId, PeerIdentity, TraceId};
use crate::json_writer::ObjectWriter;
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

    /// A consumer at `addr` (via `via`) that presented no certificate: a patient-facing listener that asks for
    /// none. The object has `addr` (and `via`) only.
    pub fn anonymous(addr: SocketAddr, via: Option<SocketAddr>) -> Self {
        let mut out = Vec::with_capacity(64);
        let mut peer = ObjectWriter::open(&mut out);
        peer.str("addr", &addr.to_string());
        if let Some(via) = via {
            peer.str("via", &via.to_string());
        }
        peer.close();
        Self {
            json: String::from_utf8_lossy(&out).into(),
        }
    }

    /// The JSON object.
    pub fn as_json(&self) -> &str {
        &self.json
    }
}

/// What a patient-facing request's records say of its access (`"patient_facing": {...}` in its request record):
/// the app, the patient, the acting person, the practice, the supplier and the token exchange. Each is `None` when
/// the request was refused before it was known.
#[derive(Debug, Clone, Default)]
pub struct PatientAccess {
    /// `X-Request-ID`, as sent (bounded); also the records' `trace_id`.
    pub request_id: Option<String>,
    /// `X-Correlation-ID`, as sent (bounded).
    pub correlation_id: Option<String>,
    /// The app: the token's `client_id`.
    pub client_id: Option<String>,
    /// The patient's NHS number from the verified token. With `[audit.patients]` the record names it as an HMAC
    /// in `patients` (`"in": "token"`), never in clear; without, it is the object's `nhs_number`.
    pub nhs_number: Option<String>,
    /// `P0`, `P5` or `P9`.
    pub proofing: Option<&'static str>,
    /// The acting person of a composite token (`act.sub`): proxy access.
    pub acting: Option<String>,
    /// The practice's ODS code, and where it came from (`token` or `lookup`).
    pub practice: Option<(String, &'static str)>,
    /// The supplier's name in the directory.
    pub supplier: Option<String>,
    /// `cached`, `exchanged`, `refused` or `failed`.
    pub exchange: Option<&'static str>,
}

/// The identifiers a transaction's records name.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "held once per transaction, inside its Arc; boxing would cost an allocation per request"
)]
pub(in crate::audit) enum Addressing {
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
    pub(in crate::audit) conn_id: u64,
    pub(in crate::audit) peer: Arc<Peer>,
    pub(in crate::audit) method: http::Method,
    /// The policy generation that decided the request.
    pub(in crate::audit) policy_generation: u64,
    pub(in crate::audit) addressing: Addressing,
    /// The patients it names, with `[audit.patients]`.
    pub(in crate::audit) patients: Option<Box<Patients>>,
    /// A patient-facing request's access.
    pub(in crate::audit) access: Option<Box<PatientAccess>>,
}

/// A transaction's patients: those of its target (on the request record), and the body reader whose numbers the
/// response record names.
#[derive(Debug)]
pub(in crate::audit) struct Patients {
    pub(in crate::audit) key: Arc<str>,
    pub(in crate::audit) target: Vec<PatientRef>,
    /// The target with `hmac:<hex>` in place of each number (`redact`).
    redacted: Option<String>,
    pub(in crate::audit) body: Option<Arc<BodyScan>>,
}

impl Patients {
    /// Of `target`, and the body of a request of `interaction` when the indexer reads bodies; `None` when there is
    /// nothing to record.
    fn of(indexer: &Arc<Indexer>, target: &str, interaction: Option<&str>) -> Option<Box<Self>> {
        let found = indexer.target(target);
        let body = interaction.and_then(|i| indexer.body(i));
        if found.refs.is_empty() && body.is_none() {
            return None;
        }
        Some(Box::new(Self {
            key: Arc::clone(indexer.key().shared_id()),
            target: found.refs,
            redacted: found.redacted,
            body,
        }))
    }
}

impl Transaction {
    /// A permitted request's transaction, on connection `conn_id` from `peer`: the permit's identifiers are shared
    /// (reference counts), not copied, and it names the generation that permitted it.
    /// With `patients`, the NHS numbers of its target are hashed (and the target redacted) now, and its body is
    /// read as it streams when the interaction carries the number there ([`Transaction::body_scan`]).
    pub fn permitted(
        conn_id: u64,
        peer: &Arc<Peer>,
        method: &http::Method,
        permit: &Permit,
        patients: Option<&Arc<Indexer>>,
    ) -> Arc<Self> {
        let headers = &permit.request().headers;
        let patients = patients.and_then(|indexer| {
            Patients::of(
                indexer,
                permit.target().as_str(),
                Some(headers.interaction.as_str()),
            )
        });
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
            patients,
            access: None,
        })
    }

    /// A permitted patient-facing request's transaction: as [`Transaction::permitted`], with its `access`; with
    /// `patients`, the token's NHS number is hashed into its patients (`"in": "token"`).
    pub fn patient_facing(
        conn_id: u64,
        peer: &Arc<Peer>,
        method: &http::Method,
        permit: &Permit,
        access: PatientAccess,
        patients: Option<&Arc<Indexer>>,
    ) -> Arc<Self> {
        let mut tx = Self::permitted(conn_id, peer, method, permit, patients);
        if let Some(tx) = Arc::get_mut(&mut tx) {
            tx.add_access(access, patients);
        }
        tx
    }

    /// A refused patient-facing request's transaction: as [`Transaction::refused`], its `trace_id` the
    /// `X-Request-ID` it sent, `from` the door's `[[system]]` (`door`), with what was known of its `access`. Any
    /// `Ssp-*` field the app sent is not recorded as its parties: it names nothing the door acted on.
    pub(crate) fn refused_patient_facing(
        conn_id: u64,
        peer: &Arc<Peer>,
        parts: &http::request::Parts,
        generation: u64,
        door: &Asid,
        access: PatientAccess,
        patients: Option<&Arc<Indexer>>,
    ) -> Arc<Self> {
        let mut tx = Self::refused(conn_id, peer, parts, generation, patients);
        if let Some(tx) = Arc::get_mut(&mut tx) {
            if let Addressing::AsReceived {
                trace_id,
                from,
                to,
                interaction,
                target,
            } = &mut tx.addressing
            {
                *trace_id = access.request_id.as_deref().map(Box::from);
                *from = Some(Box::from(door.as_str()));
                *to = None;
                *interaction = None;
                // A token sent in the query (RFC 6750 section 2.3, which the door refuses) is not recorded: the
                // query goes, the path stays.
                if let Some(sent) = target.as_mut()
                    && let Some(query_at) = sent.find('?')
                    && sent[query_at..].to_ascii_lowercase().contains("access")
                {
                    *sent = Box::from(&sent[..query_at]);
                }
            }
            tx.add_access(access, patients);
        }
        tx
    }

    fn add_access(&mut self, mut access: PatientAccess, patients: Option<&Arc<Indexer>>) {
        if let (Some(indexer), Some(number)) = (patients, access.nhs_number.as_deref()) {
            let hashed = PatientRef {
                hmac: indexer.key().digest(number),
                check: crate::audit::patients::Check::of(number),
                source: crate::audit::patients::Source::Token,
            };
            match &mut self.patients {
                Some(p) => p.target.insert(0, hashed),
                None => {
                    self.patients = Some(Box::new(Patients {
                        key: Arc::clone(indexer.key().shared_id()),
                        target: vec![hashed],
                        redacted: None,
                        body: None,
                    }))
                }
            }
            // Named by its HMAC only.
            access.nhs_number = None;
        }
        self.access = Some(Box::new(access));
    }

    /// The reader its request body's frames are copied into, when its body is read for NHS numbers.
    pub fn body_scan(&self) -> Option<&Arc<BodyScan>> {
        self.patients.as_ref()?.body.as_ref()
    }

    /// A refused request's transaction: the `Ssp-*` values and target it carried, raw (lossy UTF-8) and bounded
    /// (256 bytes a header, 8 KiB the target), since they may be what was refused; `generation` is the policy in
    /// force when it was refused.
    pub(crate) fn refused(
        conn_id: u64,
        peer: &Arc<Peer>,
        parts: &http::request::Parts,
        generation: u64,
        patients: Option<&Arc<Indexer>>,
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
            let mut end = (0..=text.len().min(MAX_AUDITED_TARGET))
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            if end < text.len() {
                // Cut: the part the bound split goes whole, so that no piece of an identifier (nine digits of an
                // NHS number fix the tenth) is kept where the whole one would have been redacted.
                end = text[..end]
                    .rfind(['/', '?', '&', '=', '|', ',', ';'])
                    .map_or(0, |i| i + 1);
            }
            Box::from(&text[..end])
        });
        // A refused request's body is not read: nothing of it was forwarded.
        let patients = patients
            .zip(target.as_deref())
            .and_then(|(indexer, target)| Patients::of(indexer, target, None));
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
            patients,
            access: None,
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

    /// The target as its records write it: redacted when `[audit.patients] redact` found a number in it.
    pub(crate) fn recorded_target(&self) -> Option<&str> {
        if let Some(redacted) = self.patients.as_ref().and_then(|p| p.redacted.as_deref()) {
            return Some(redacted);
        }
        match &self.addressing {
            Addressing::Validated { target, .. } => Some(target.as_str()),
            Addressing::AsReceived { target, .. } => target.as_deref(),
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
