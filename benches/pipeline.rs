//! The per-request pure steps of the pipeline, measured with criterion: parsing the target and `Ssp-*` headers,
//! the policy decision, and decoding + validating a typical GP Connect audit token.
//!
//! Run: `cargo bench --bench pipeline`. Figures go to benches/RESULTS.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark setup: a failure is a bench failure"
)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use ssp::ids::{InteractionId, PeerIdentity};
use ssp::jwt::{Expect, Profile, Validator};
use ssp::policy::{Decision, Policy};
use ssp::ssp::{SspHeaders, SspRequest, Target};

const URL: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect";
const STRUCTURED: &str =
    "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
const PATH: &str = "/https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect/fhir/Patient/$gpc.getstructuredrecord";

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "ssp-traceid",
        HeaderValue::from_static("629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
    );
    h.insert("ssp-from", HeaderValue::from_static("200000000359"));
    h.insert("ssp-to", HeaderValue::from_static("918999198993"));
    h.insert("ssp-interactionid", HeaderValue::from_static(STRUCTURED));
    h
}

fn bench(c: &mut Criterion) {
    let h = headers();
    c.bench_function("parse target + Ssp headers", |b| {
        b.iter(|| {
            let target = Target::from_request_path(black_box(PATH)).unwrap();
            let headers = SspHeaders::parse(black_box(&h)).unwrap();
            black_box((target, headers))
        })
    });

    let policy_text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/dev.toml")).unwrap();
    let policy = Policy::compile(
        &ssp::policy::Source::from_files(vec![("dev.toml".into(), policy_text)]),
        1,
    )
    .unwrap();
    let peer = PeerIdentity {
        subject: "CN=consumer.dev.localhost".into(),
        common_name: Some("consumer.dev.localhost".into()),
        dns_sans: vec!["consumer.dev.localhost".into()],
        serial: "01".into(),
        fingerprint_sha256: "00".into(),
        issuer: "CN=Test CA".into(),
        not_after: 0,
    };
    let request = SspRequest {
        target: Target::from_request_path(PATH).unwrap(),
        headers: SspHeaders::parse(&h).unwrap(),
    };
    let now = SystemTime::now();
    bench_permit(
        c,
        "policy check (checks 5-9, permit)",
        &policy,
        &request,
        &peer,
        now,
    );

    let token = format!("Bearer {}", ssp::demo::dev_jwt(URL, "patient/*.read"));
    let validator = Validator {
        profile: Profile::GpConnect1,
        max_future_skew: Duration::from_secs(300),
    };
    let interaction = InteractionId::parse(STRUCTURED).unwrap();
    let unix_now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expect = Expect {
        endpoint_url: URL,
        interaction: &interaction,
        now: unix_now,
        keys: None,
    };
    c.bench_function("jwt decode + validate (typical 1.x token)", |b| {
        b.iter(|| {
            let audit = validator.validate(Some(black_box(token.as_bytes())), &expect);
            assert!(audit.valid);
            black_box(audit)
        })
    });

    // A permitted request's record as the proxy writes it: peer, headers, target, the token's claims.
    let permit = match policy.decide(request.clone(), &peer, now) {
        Decision::Permit(p) => p,
        Decision::Deny(d) => panic!("{d:?}"),
    };
    let audit_peer = std::sync::Arc::new(ssp::audit::Peer::new(
        "10.1.2.3:51234".parse().unwrap(),
        None,
        &PeerIdentity {
            subject: "CN=consumer.dev.localhost, O=Example Hospital".into(),
            serial: "1a2b3c4d5e6f7788".into(),
            fingerprint_sha256: "ab".repeat(32),
            ..peer.clone()
        },
    ));
    let tx = ssp::audit::Transaction::permitted(42, &audit_peer, &http::Method::GET, &permit, None);
    let record = ssp::audit::Record::permitted(
        &tx,
        Some(validator.validate(Some(token.as_bytes()), &expect)),
    );
    let prev = ssp::hex::HexDigest::GENESIS;
    let link = ssp::audit::ChainLink {
        seq: 1_234_567,
        instance: "ssp-1.example.nhs.uk",
        prev: &prev,
    };
    let mut buf = Vec::with_capacity(4096);
    c.bench_function("audit request record: JSON line + SHA-256", |b| {
        b.iter(|| {
            buf.clear();
            black_box(ssp::audit::encode(black_box(&record), link, &mut buf))
        })
    });

    // The patient index's share of a request (`[audit.patients]`, redacting): the transaction made with the
    // indexer (the target read for NHS numbers, each hashed, the target redacted) and its record written with the
    // `patients` field, beside the same without the indexer. A target without a number costs a byte search.
    let indexer = ssp::audit::patients::Indexer::new(
        ssp::audit::patients::PatientKey::from_bytes(&[0x5a; 32]).unwrap(),
        &ssp::config::PatientsConfig {
            key: std::path::PathBuf::new(),
            redact: true,
            read_bodies: false,
        },
    );
    let searched = SspRequest {
        target: Target::from_request_path(&format!(
            "/{URL}/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919"
        ))
        .unwrap(),
        headers: SspHeaders::parse(&h).unwrap(),
    };
    let searched = match policy.decide(searched, &peer, now) {
        Decision::Permit(p) => p,
        Decision::Deny(d) => panic!("{d:?}"),
    };
    let with_number =
        format!("{URL}/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919");
    c.bench_function(
        "patients: Indexer::target, one number (HMAC, redaction)",
        |b| b.iter(|| black_box(indexer.target(black_box(&with_number)))),
    );
    for (name, permit, indexer) in [
        ("patients: none (request record, no index)", &searched, None),
        (
            "patients: none, no number in the target (request record, no index)",
            &permit,
            None,
        ),
        (
            "patients: one number in the query (request record, index)",
            &searched,
            Some(&indexer),
        ),
        (
            "patients: no number in the target (request record, index)",
            &permit,
            Some(&indexer),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let tx = ssp::audit::Transaction::permitted(
                    42,
                    &audit_peer,
                    &http::Method::GET,
                    black_box(permit),
                    indexer,
                );
                buf.clear();
                black_box(ssp::audit::encode(
                    &ssp::audit::Record::permitted(&tx, None),
                    link,
                    &mut buf,
                ))
            })
        });
    }
}

/// Measures `Policy::decide` on a request it permits (the clone of the request, which `decide` consumes, is setup).
fn bench_permit(
    c: &mut Criterion,
    name: &str,
    policy: &Policy,
    request: &SspRequest,
    peer: &PeerIdentity,
    now: SystemTime,
) {
    c.bench_function(name, |b| {
        b.iter_batched(
            || request.clone(),
            |r| match policy.decide(r, peer, now) {
                Decision::Permit(p) => black_box(p),
                Decision::Deny(d) => panic!("{d:?}"),
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A directory of `n` systems and `n` endpoints with `per` agreements per system, as TOML.
fn large_policy(n: u64, per: u64) -> String {
    let mut text = String::with_capacity((n * (600 + per * 130)) as usize);
    for i in 0..n {
        text.push_str(&format!(
            "[[system]]\nasid = \"{}\"\nname = \"System {i}\"\nods = \"S{i}\"\nfqdn = \"s{i}.example\"\ninteractions = [\"{STRUCTURED}\"]\n\n",
            300_000_000_000 + i
        ));
        text.push_str(&format!(
            "[[endpoint]]\nasid = \"{}\"\nparty_key = \"P{i}\"\ncpa_id = \"C{i}\"\nods = \"E{i}\"\nurl = \"https://e{i}.example/fhir\"\ninteractions = [\"{STRUCTURED}\"]\n\n",
            400_000_000_000 + i
        ));
    }
    for i in 0..n {
        for k in 0..per {
            text.push_str(&format!(
                "[[agreement]]\nid = \"A{i}-{k}\"\nfrom = \"{}\"\nto = \"{}\"\ninteractions = [\"*\"]\n\n",
                300_000_000_000 + i,
                400_000_000_000 + (i + k * 7) % n
            ));
        }
    }
    text
}

/// Import and decision at the scale of the national directory: 20,000 systems, 20,000 endpoints, 100,000
/// agreements. Import times are printed once (they take seconds, not a criterion loop).
fn bench_scale(c: &mut Criterion) {
    let text = large_policy(20_000, 5);
    let source = ssp::policy::Source::from_files(vec![("scale.toml".into(), text)]);
    let started = std::time::Instant::now();
    let policy = Policy::compile(&source, 1).unwrap();
    let compile = started.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let store = ssp::policy::store::Store::open(&dir.path().join("store")).unwrap();
    store.import(source.clone(), 20).unwrap();
    let stored = started.elapsed();
    let (systems, endpoints, agreements) = policy.counts();
    println!(
        "scale policy ({systems} systems, {endpoints} endpoints, {agreements} agreements, {} MiB of TOML): \
         validate + compile {compile:?}, store as a generation (write + 2 flushes) {stored:?}",
        source.files[0].1.len() >> 20
    );

    let peer = PeerIdentity {
        subject: "CN=s12345.example".into(),
        common_name: Some("s12345.example".into()),
        dns_sans: vec![],
        serial: "01".into(),
        fingerprint_sha256: "00".into(),
        issuer: "CN=Test CA".into(),
        not_after: 0,
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        "ssp-traceid",
        HeaderValue::from_static("629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
    );
    headers.insert("ssp-from", HeaderValue::from_static("300000012345"));
    headers.insert("ssp-to", HeaderValue::from_static("400000012345"));
    headers.insert("ssp-interactionid", HeaderValue::from_static(STRUCTURED));
    let request = SspRequest {
        target: Target::parse("https://e12345.example/fhir/Patient/$gpc.getstructuredrecord")
            .unwrap(),
        headers: SspHeaders::parse(&headers).unwrap(),
    };
    let now = SystemTime::now();
    bench_permit(
        c,
        "policy check at 20k/20k/100k (checks 5-9, permit)",
        &policy,
        &request,
        &peer,
        now,
    );
}

/// The shipper's own work per record (`[audit.ship]`), without the network: a pass over a segment of 10,000
/// records of a real request's size, each read, its chain fields taken, hashed and framed as an RFC 5424
/// message. Criterion's figure is for the pass: divide by 10,000.
fn bench_ship(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut prev = ssp::hex::HexDigest::GENESIS;
    let mut text = String::new();
    for seq in 1..=10_000u64 {
        let line = format!(
            r#"{{"seq":{seq},"instance":"ssp-a","ts":"2026-12-07T10:00:00.123456Z","kind":"request","trace_id":"629ea9ba-a077-4d99-b289-7a9b19fd4e03","conn_id":7,"peer":{{"addr":"127.0.0.1:45282","subject":"O=ssp development PKI - NOT FOR PRODUCTION, CN=consumer.dev.localhost","serial":"41a81dc3d28640b6","fingerprint_sha256":"a6dde32f4f6fe7691c4913fe6925fdb9374cf379fa7891cd54b223603928cebe"}},"fqdn":"consumer.dev.localhost","from":"200000000359","to":"918999198993","interaction":"{STRUCTURED}","method":"GET","target":"https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect/fhir/metadata","decision":"permit","policy_generation":3,"jwt":{{"iss":"https://consumer.dev.localhost","sub":"111111111111","requesting_system":"https://fhir.nhs.uk/Id/accredited-system|200000000359","organization_ods":"RXX01","practitioner_sds_user_id":"111111111111","role_profile_id":"222222222222"}},"prev":"{prev}"}}"#
        );
        prev = ssp::hex::HexDigest::of(line.as_bytes());
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(dir.path().join("audit-00000001.jsonl"), &text).unwrap();
    let header = ssp::audit::ship::syslog::Header {
        ts: "2026-12-07T10:00:00.123456Z",
        hostname: "ssp-a",
        procid: "4242",
    };
    let mut out = Vec::with_capacity(text.len() * 2);
    c.bench_function(
        &format!(
            "ship: 10,000 records of {} bytes read, hashed and framed (per pass)",
            text.len() / 10_000
        ),
        |b| {
            b.iter(|| {
                out.clear();
                let mut follower = ssp::audit::follow::Follower::at(
                    dir.path(),
                    ssp::audit::follow::Position::START,
                )
                .unwrap();
                while let Some(line) = follower.next_line().unwrap() {
                    let mut seq = itoa::Buffer::new();
                    let params = [
                        ("seq", seq.format(line.seq)),
                        ("instance", line.instance.as_str()),
                        ("hash", line.hash.as_str()),
                    ];
                    ssp::audit::ship::syslog::frame(
                        &mut out,
                        &header,
                        "record",
                        ssp::audit::ship::syslog::RECORD_SD,
                        &params,
                        &line.bytes,
                    );
                }
                out.len()
            })
        },
    );
}

/// The patient-facing door's token step, by its parts: the signature check of an NHS-login-sized access token
/// (ES256, as the dev issuer signs, and RS256 with a 2048-bit key) with `jsonwebtoken`, claims parsed into a
/// `serde_json::Value` as the door reads them.
fn bench_patient_token(c: &mut Criterion) {
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
    let claims = serde_json::json!({
        "iss": "https://auth.login.nhs.uk", "aud": "ssp-patient-facing", "sub": "nhs-login-9690937286",
        "iat": 1_796_647_377, "nbf": 1_796_647_372, "exp": 4_102_444_800i64,
        "jti": "1e9a699b-4c25-40a7-8075-ce25b6c6ef99", "client_id": "nhs-app",
        "scope": "openid profile gp-connect:patient", "nhs_number": "9690937286",
        "identity_proofing_level": "P9", "vot": "P9.Cp.Cd",
        "gp_registration_details": { "gp_ods_code": "B82617" },
    });
    let ec = rcgen::KeyPair::generate().unwrap();
    let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    for (name, alg, token, key) in [
        (
            "patient token: ES256 verify + claims",
            Algorithm::ES256,
            jsonwebtoken::encode(
                &Header::new(Algorithm::ES256),
                &claims,
                &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap(),
            DecodingKey::from_ec_pem(ec.public_key_pem().as_bytes()).unwrap(),
        ),
        (
            "patient token: RS256 (2048) verify + claims",
            Algorithm::RS256,
            jsonwebtoken::encode(
                &Header::new(Algorithm::RS256),
                &claims,
                &EncodingKey::from_rsa_pem(rsa.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap(),
            DecodingKey::from_rsa_pem(rsa.public_key_pem().as_bytes()).unwrap(),
        ),
    ] {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&["https://auth.login.nhs.uk"]);
        validation.set_audience(&["ssp-patient-facing"]);
        c.bench_function(name, |b| {
            b.iter(|| {
                jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
                    .unwrap()
                    .claims
            })
        });
    }
}

criterion_group!(benches, bench, bench_scale, bench_ship, bench_patient_token);
criterion_main!(benches);
