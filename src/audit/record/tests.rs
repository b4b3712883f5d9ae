//! The hand-written line writer against serde_json: every kind of record, with hostile text in every string
//! field, must come out byte for byte as serde_json's compact serializer writes it (the reference below builds each
//! line with serde_json).

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::*;
use crate::ids::{InteractionId, PeerIdentity};
use crate::jwt::{Expect, Kept, Profile, Validator};

/// The peer object as serde derived it.
#[derive(Serialize)]
struct RefPeer<'a> {
    addr: String,
    subject: &'a str,
    serial: &'a str,
    fingerprint_sha256: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<String>,
}

/// The token's claims as the earlier `Serialize for JwtAudit` wrote them, through the public accessors.
struct RefJwt<'a>(&'a JwtAudit);

impl Serialize for RefJwt<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut map = s.serialize_map(None)?;
        for (name, kept) in [("iss", Kept::Iss), ("sub", Kept::Sub), ("aud", Kept::Aud)] {
            map.serialize_entry(name, &a.claim(kept))?;
        }
        map.serialize_entry("iat", &a.iat)?;
        map.serialize_entry("exp", &a.exp)?;
        for (name, kept) in [
            ("reason_for_request", Kept::ReasonForRequest),
            ("requested_scope", Kept::RequestedScope),
            ("organization_ods", Kept::OrganizationOds),
            ("organization_name", Kept::OrganizationName),
            ("practitioner_id", Kept::PractitionerId),
            ("sds_user_id", Kept::SdsUserId),
            ("sds_role_profile_id", Kept::SdsRoleProfileId),
        ] {
            map.serialize_entry(name, &a.claim(kept))?;
        }
        map.serialize_entry("device_identifier", &a.device_identifier())?;
        for (name, kept) in [
            ("device_model", Kept::DeviceModel),
            ("device_version", Kept::DeviceVersion),
            ("practitioner_family_name", Kept::PractitionerFamilyName),
            ("practitioner_given_name", Kept::PractitionerGivenName),
        ] {
            map.serialize_entry(name, &a.claim(kept))?;
        }
        map.serialize_entry("alg", &a.alg())?;
        map.serialize_entry("valid", &a.valid)?;
        map.serialize_entry("violations", &a.violations())?;
        map.end()
    }
}

/// What serde_json wrote for a record (without the newline).
fn reference(record: &Record, link: ChainLink<'_>, peer: &RefPeer<'_>) -> String {
    let mut out = Vec::new();
    let mut s = serde_json::Serializer::new(&mut out);
    let mut map = s.serialize_map(None).unwrap();
    let optional = |map: &mut serde_json::ser::Compound<'_, _, _>, key: &str, v: Option<&str>| {
        if let Some(v) = v {
            map.serialize_entry(key, v).unwrap();
        }
    };
    map.serialize_entry("seq", &link.seq).unwrap();
    map.serialize_entry("instance", link.instance).unwrap();
    map.serialize_entry("ts", record.ts.as_str()).unwrap();
    let parties = |map: &mut serde_json::ser::Compound<'_, _, _>, tx: &Transaction| {
        let [from, to, interaction] = tx.parties();
        optional(map, "from", from);
        optional(map, "to", to);
        optional(map, "interaction", interaction);
    };
    match &record.entry {
        Event::Permitted { tx, .. } | Event::Refused { tx, .. } => {
            let (decision, reason, jwt) = match &record.entry {
                Event::Refused { reason, jwt, .. } => {
                    ("deny", Some(reason.as_str()), jwt.as_deref())
                }
                Event::Permitted { jwt, .. } => ("permit", None, jwt.as_ref()),
                _ => unreachable!(),
            };
            map.serialize_entry("kind", "request").unwrap();
            optional(&mut map, "trace_id", tx.trace_id());
            map.serialize_entry("conn_id", &tx.conn_id).unwrap();
            map.serialize_entry("peer", peer).unwrap();
            let target = match &tx.addressing {
                Addressing::Validated { fqdn, target, .. } => {
                    map.serialize_entry("fqdn", &**fqdn).unwrap();
                    Some(target.as_str())
                }
                Addressing::AsReceived { target, .. } => target.as_deref(),
            };
            parties(&mut map, tx);
            map.serialize_entry("method", tx.method.as_str()).unwrap();
            optional(&mut map, "target", target);
            map.serialize_entry("decision", decision).unwrap();
            optional(&mut map, "reason", reason);
            map.serialize_entry("policy_generation", &tx.policy_generation)
                .unwrap();
            if let Some(jwt) = jwt {
                map.serialize_entry("jwt", &RefJwt(jwt)).unwrap();
            }
        }
        Event::Completed { tx, end } => {
            map.serialize_entry("kind", "response").unwrap();
            optional(&mut map, "trace_id", tx.trace_id());
            map.serialize_entry("conn_id", &tx.conn_id).unwrap();
            parties(&mut map, tx);
            map.serialize_entry("status", &end.status).unwrap();
            map.serialize_entry("bytes_in", &end.bytes_in).unwrap();
            map.serialize_entry("bytes_out", &end.bytes_out).unwrap();
            map.serialize_entry("upstream_ms", &millis(end.upstream))
                .unwrap();
            map.serialize_entry("total_ms", &millis(end.total)).unwrap();
            if end.retried {
                map.serialize_entry("retried", &true).unwrap();
            }
            map.serialize_entry("outcome", end.outcome.as_str())
                .unwrap();
        }
        Event::Selftest {
            tx,
            verdict,
            failed,
            reason,
        } => {
            map.serialize_entry("kind", "selftest").unwrap();
            optional(&mut map, "trace_id", tx.trace_id());
            map.serialize_entry("conn_id", &tx.conn_id).unwrap();
            map.serialize_entry("peer", peer).unwrap();
            parties(&mut map, tx);
            map.serialize_entry("method", tx.method.as_str()).unwrap();
            if let Addressing::AsReceived { target, .. } = &tx.addressing {
                optional(&mut map, "target", target.as_deref());
            }
            map.serialize_entry("verdict", verdict).unwrap();
            map.serialize_entry("failed", failed).unwrap();
            optional(&mut map, "reason", reason.as_deref());
            map.serialize_entry("policy_generation", &tx.policy_generation)
                .unwrap();
        }
        Event::Lookup(lookup) => {
            map.serialize_entry("kind", "subject_lookup").unwrap();
            map.serialize_entry("uid", &lookup.uid).unwrap();
            optional(&mut map, "user", lookup.user.as_deref());
            optional(&mut map, "sudo_user", lookup.sudo_user.as_deref());
            map.serialize_entry("hmac", &lookup.hmac).unwrap();
            map.serialize_entry("key", &lookup.key).unwrap();
            optional(&mut map, "since", lookup.since.as_deref());
            map.serialize_entry("written_by", lookup.written_by)
                .unwrap();
        }
        Event::Sealed { why, torn } => {
            map.serialize_entry("kind", "seal").unwrap();
            map.serialize_entry("sealed", why.as_str()).unwrap();
            if let Some((bytes, file)) = torn {
                map.serialize_entry("torn_bytes", bytes).unwrap();
                map.serialize_entry("torn_file", file).unwrap();
            }
        }
    }
    map.serialize_entry("prev", link.prev.as_str()).unwrap();
    SerializeMap::end(map).unwrap();
    String::from_utf8(out).unwrap()
}

fn identity(subject: &str, serial: &str) -> PeerIdentity {
    PeerIdentity {
        subject: subject.into(),
        common_name: None,
        dns_sans: Vec::new(),
        serial: serial.into(),
        fingerprint_sha256: "ab".repeat(32),
        issuer: "CN=Test CA".into(),
        not_after: 0,
    }
}

/// Writes `record` and checks it against the reference: the same bytes, a newline, and the SHA-256 of the line;
/// the same again when encoded into a used buffer.
fn agrees(record: &Record, link: ChainLink<'_>, peer: &RefPeer<'_>) -> Result<(), TestCaseError> {
    let mut buf = b"earlier line\n".to_vec();
    let hash = encode(record, link, &mut buf);
    let line = std::str::from_utf8(&buf[13..]).unwrap();
    let expected = reference(record, link, peer);
    prop_assert_eq!(line.strip_suffix('\n'), Some(expected.as_str()));
    prop_assert_eq!(hash, HexDigest::of(expected.as_bytes()));
    // Encoded into a buffer an earlier record left (as the writer hands buffers back): the same line.
    let used = b",\"stale\":\"an earlier record's text\"".repeat(40);
    let mut again = Vec::new();
    let hash_again = Encoded::new(record, used).write(link, &mut again);
    prop_assert_eq!(&again[..], &buf[13..]);
    prop_assert_eq!(hash_again, hash);
    serde_json::from_str::<serde_json::Value>(&expected).unwrap();
    Ok(())
}

/// A checked transaction (the identifiers as the request carried them) from `peer`.
fn checked(peer: &Arc<Peer>, conn_id: u64, fqdn: &str) -> Arc<Transaction> {
    Arc::new(Transaction {
        conn_id,
        peer: Arc::clone(peer),
        method: http::Method::POST,
        policy_generation: conn_id / 3,
        addressing: crate::audit::tests::checked_addressing(conn_id % 1_000_000, fqdn),
        patients: None,
        access: None,
    })
}

/// The endpoint the tokens are for.
const URL: &str = "https://provider.dev.localhost/B82617/STU3/1/gpconnect";

/// The demo's token with `name` as the requesting organisation's name, validated.
fn token_with_name(name: &str) -> JwtAudit {
    let (_, mut claims) =
        crate::jwt::decode(&crate::demo::dev_jwt(URL, "patient/*.read"), None).unwrap();
    claims.insert(
        "requesting_organization".into(),
        serde_json::json!({
            "resourceType": "Organization",
            "name": name,
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RXX01" }],
        }),
    );
    let token = crate::jwt::encode_unsigned(&serde_json::Value::Object(claims));
    validated(&format!("Bearer {token}"))
}

/// An `Authorization` value validated for the demo's endpoint.
fn validated(authorization: &str) -> JwtAudit {
    const READ: &str = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
    let interaction = InteractionId::parse(READ).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    Validator {
        profile: Profile::GpConnect1,
        max_future_skew: Duration::from_secs(300),
    }
    .validate(
        Some(authorization.as_bytes()),
        &Expect {
            endpoint_url: URL,
            interaction: &interaction,
            now,
            keys: None,
        },
    )
}

/// Text with everything JSON escapes, and what it does not: quotes, backslashes, every control character, DEL,
/// non-ASCII, and long plain runs.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[\\x00-\\x1f\"\\\\a\\x7f\u{e9}\u{1F600}]{0,24}",
        "[a-z]{0,30}[\"\\\\\\x00-\\x1f]?[a-z]{0,30}",
    ]
}

#[test]
fn the_kinds_of_record_agree_with_serde_json() {
    let ident = identity("CN=consumer.dev.localhost, O=\"Example\" Hospital", "1a2b");
    let addr: std::net::SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let via: std::net::SocketAddr = "10.0.0.1:1234".parse().unwrap();
    let peer = Arc::new(Peer::new(addr, Some(via), &ident));
    let reference_peer = RefPeer {
        addr: addr.to_string(),
        subject: &ident.subject,
        serial: &ident.serial,
        fingerprint_sha256: &ident.fingerprint_sha256,
        via: Some(via.to_string()),
    };
    let link = ChainLink {
        seq: u64::MAX,
        instance: "ssp-1",
        prev: &HexDigest::GENESIS,
    };
    let tx = checked(&peer, 7, "consumer.dev.localhost");
    let good = token_with_name("St \"Mary's\"\u{1}\u{e9}\\ward\u{7f}");
    assert!(good.valid, "{:?}", good.violations());
    let bad = validated("Bearer not-a-token");
    assert!(!bad.valid);
    let records = [
        Record::permitted(&tx, Some(good)),
        Record::permitted(&tx, Some(bad)),
        Record::permitted(&tx, None),
        Record::refused(&tx, "INVALID_JWT_MALFORMED\n\"x\"".into(), None),
        Record::completed(
            &tx,
            Completion {
                status: 200,
                bytes_in: 0,
                bytes_out: u64::MAX,
                upstream: Duration::from_nanos(1_500),
                total: Duration::from_secs(86_400 * 365),
                retried: true,
                outcome: Outcome::Ok,
                consumer_stalled: false,
            },
        ),
        Record::denied(&tx, 403, Duration::ZERO),
        Record::sealed(
            SealReason::Recovered,
            Some((12, "00000001.jsonl.torn-1".into())),
        ),
        Record::sealed(SealReason::Rotate, None),
    ];
    for record in &records {
        agrees(record, link, &reference_peer).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn hostile_text_in_every_field_agrees_with_serde_json(
        subject in hostile(),
        serial in hostile(),
        instance in hostile(),
        prev in hostile(),
        fqdn in hostile(),
        raw in proptest::collection::vec(proptest::option::of(hostile()), 5),
        reason in hostile(),
        torn in hostile(),
        org in hostile(),
        seq in any::<u64>(),
        conn_id in any::<u64>(),
        status in any::<u16>(),
        bytes in any::<u64>(),
        micros in any::<u64>(),
        via in any::<bool>(),
    ) {
        let ident = identity(&subject, &serial);
        let addr: std::net::SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let via = via.then(|| "192.0.2.7:9".parse::<std::net::SocketAddr>().unwrap());
        let peer = Arc::new(Peer::new(addr, via, &ident));
        let reference_peer = RefPeer {
            addr: addr.to_string(),
            subject: &subject,
            serial: &serial,
            fingerprint_sha256: &ident.fingerprint_sha256,
            via: via.map(|v| v.to_string()),
        };
        // `prev` is a digest by its type: the hostile text goes in as the line it is the hash of.
        let prev = HexDigest::of(prev.as_bytes());
        let link = ChainLink { seq, instance: &instance, prev: &prev };
        let boxed = |i: usize| raw[i].as_deref().map(Box::from);
        let refused = Arc::new(Transaction {
            conn_id,
            peer: Arc::clone(&peer),
            method: http::Method::from_bytes(b"PATCH").unwrap(),
            policy_generation: bytes,
            addressing: Addressing::AsReceived {
                trace_id: boxed(0),
                from: boxed(1),
                to: boxed(2),
                interaction: boxed(3),
                target: boxed(4),
            },
            patients: None,
            access: None,
        });
        let tx = checked(&peer, conn_id, &fqdn);
        let end = Completion {
            status,
            bytes_in: bytes,
            bytes_out: conn_id,
            upstream: Duration::from_micros(micros / 2),
            total: Duration::from_micros(micros),
            retried: status % 2 == 0,
            outcome: Outcome::ClientClosed,
            consumer_stalled: false,
        };
        let jwt = Box::new(token_with_name(&org));
        for record in [
            Record::refused(&refused, reason.clone(), Some(jwt.clone())),
            Record::refused(&refused, reason.clone(), None),
            Record::permitted(&tx, Some(*jwt)),
            Record::completed(&refused, end),
            Record::completed(&tx, end),
            Record::selftest(&refused, status % 2 == 0, vec![5, 10], Some(reason.clone())),
            Record::selftest(&refused, true, Vec::new(), None),
            Record::sealed(SealReason::Shutdown, Some((bytes, torn.clone()))),
        ] {
            agrees(&record, link, &reference_peer)?;
        }
    }
}
