use super::*;
use crate::ids::{Asid, InteractionId, PeerIdentity, TraceId};
use crate::ssp::SspHeaders;
use crate::ssp::{SspRequest, Target};
use std::time::Duration;
use std::time::SystemTime;

const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
const PATIENT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1";

const POLICY: &str = r#"
[[system]]
asid = "200000000359"
name = "Hospital"
ods = "RXX01"
fqdn = "consumer.dev.localhost"
interactions = ["urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1", "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1"]

[[system]]
asid = "200000000360"
name = "111"
ods = "RYY01"
fqdn = "consumer2.dev.localhost"
interactions = ["urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"]

[[endpoint]]
asid = "918999198993"
party_key = "B82617-807724"
cpa_id = "S20001A000123"
ods = "B82617"
url = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect"
interactions = ["urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"]

[[agreement]]
id = "DSA-0001"
from = "200000000359"
to = "918999198993"
interactions = ["*"]
not_before = "2026-01-01T00:00:00Z"
not_after = "2027-12-31T23:59:59Z"
"#;

fn policy() -> Policy {
    Policy::compile(
        &Source::from_files(vec![("p.toml".into(), POLICY.to_string())]),
        1,
    )
    .unwrap()
}

fn peer(cn: &str) -> PeerIdentity {
    PeerIdentity {
        subject: format!("CN={cn}"),
        common_name: Some(cn.into()),
        dns_sans: vec![],
        serial: "01".into(),
        fingerprint_sha256: "00".into(),
        issuer: "CN=Test CA".into(),
        not_after: 0,
    }
}

fn request(from: &str, to: &str, interaction: &str, target: &str) -> SspRequest {
    SspRequest {
        target: Target::parse(target).unwrap(),
        headers: SspHeaders {
            trace_id: TraceId::new_random(),
            from: Asid::parse(from).unwrap(),
            to: Asid::parse(to).unwrap(),
            interaction: InteractionId::parse(interaction).unwrap(),
        },
    }
}

fn at(rfc3339: &str) -> SystemTime {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .into()
}

const URL: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect/fhir/metadata";

fn decide(
    from: &str,
    to: &str,
    interaction: &str,
    target: &str,
    cn: &str,
    now: &str,
) -> Result<u64, Denial> {
    match policy().decide(request(from, to, interaction, target), &peer(cn), at(now)) {
        Decision::Permit(p) => Ok(p.generation()),
        Decision::Deny(d) => Err(d),
    }
}

const NOW: &str = "2026-11-21T12:00:00Z";
const CN: &str = "consumer.dev.localhost";

#[test]
fn permits_a_registered_agreed_request() {
    assert_eq!(
        decide("200000000359", "918999198993", METADATA, URL, CN, NOW),
        Ok(1)
    );
}

#[test]
fn checks_run_in_order_with_exact_texts() {
    let text = |r: Result<u64, Denial>| r.unwrap_err().text();
    // 5 before 6: wrong certificate for a known sender, even with an unaccredited interaction.
    assert_eq!(
        text(decide(
            "200000000359",
            "918999198993",
            "urn:x",
            URL,
            "consumer2.dev.localhost",
            NOW
        )),
        "FQDN_CHECK_FAILED_MESSAGESENDER_200000000359"
    );
    // An unknown sender fails at 6 whatever its certificate.
    assert_eq!(
        text(decide(
            "100000000001",
            "918999198993",
            METADATA,
            URL,
            CN,
            NOW
        )),
        "ASID_CHECK_FAILED_MESSAGESENDER_100000000001"
    );
    assert_eq!(
        text(decide(
            "200000000359",
            "918999198993",
            "urn:x",
            URL,
            CN,
            NOW
        )),
        "ASID_CHECK_FAILED_MESSAGESENDER_200000000359"
    );
    // 7: sender may send it, receiver does not handle it.
    assert_eq!(
        text(decide(
            "200000000359",
            "918999198993",
            PATIENT,
            URL,
            CN,
            NOW
        )),
        "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_918999198993"
    );
    assert_eq!(
        text(decide(
            "200000000359",
            "999999999999",
            METADATA,
            URL,
            CN,
            NOW
        )),
        "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_999999999999"
    );
    // 8: no agreement for the second system.
    assert_eq!(
        text(decide(
            "200000000360",
            "918999198993",
            METADATA,
            URL,
            "consumer2.dev.localhost",
            NOW
        )),
        "FOT_CHECK_FAILED_MESSAGESENDER_200000000360_MESSAGERECEIVER_918999198993"
    );
    // 9: an IP for the host, an added port.
    assert_eq!(
        text(decide(
            "200000000359",
            "918999198993",
            METADATA,
            "https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata",
            CN,
            NOW
        )),
        "ENDPOINT_https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect_CPAID_S20001A000123_VARIES_FROM_TARGETURL_https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata"
    );
}

#[test]
fn agreements_are_in_force_only_between_their_dates() {
    let d = |now| decide("200000000359", "918999198993", METADATA, URL, CN, now);
    assert!(d("2026-01-01T00:00:00Z").is_ok());
    assert!(d("2027-12-31T23:59:59Z").is_ok());
    assert_eq!(d("2025-12-31T23:59:59Z").unwrap_err().number(), 8);
    assert_eq!(d("2028-01-01T00:00:00Z").unwrap_err().number(), 8);
    let later = at(NOW) + Duration::from_secs(3 * 365 * 86400);
    let denied = policy().decide(
        request("200000000359", "918999198993", METADATA, URL),
        &peer(CN),
        later,
    );
    assert!(matches!(denied, Decision::Deny(Denial::NoAgreement { .. })));
}

#[test]
fn a_bad_file_is_refused_whole_with_lines() {
    let bad = POLICY
        .replace("asid = \"200000000360\"", "asid = \"200000000359\"")
        .replace(
            "url = \"https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect\"",
            "url = \"http://provider/x/\"",
        )
        .replace("from = \"200000000359\"", "from = \"555\"")
        .replace(
            "not_before = \"2026-01-01T00:00:00Z\"",
            "not_before = \"2028-01-01T00:00:00Z\"",
        );
    let err = Policy::compile(&Source::from_files(vec![("p.toml".into(), bad)]), 2).unwrap_err();
    let all = err.to_string();
    assert!(
        all.contains("p.toml: line 9: duplicate [[system]] asid 200000000359"),
        "{all}"
    );
    assert!(
        all.contains("p.toml: line 16: url \"http://provider/x/\" is not an https URL"),
        "{all}"
    );
    assert!(all.contains("not_after is before not_before"), "{all}");
    assert!(all.contains("names unknown system 555"), "{all}");
}

#[test]
fn unknown_fields_are_refused() {
    let bad = POLICY.replace("name = \"111\"", "name = \"111\"\ncolour = \"blue\"");
    let err = Policy::compile(&Source::from_files(vec![("p.toml".into(), bad)]), 2).unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
}

/// Each import validation rule refuses the whole set with a message naming the file and line.
#[test]
fn each_validation_error_has_its_message() {
    let cases: [(&str, &str, &str); 12] = [
        (
            "name = \"111\"",
            "name = \"111\"\ncolour = \"blue\"",
            "unknown field `colour`",
        ),
        (
            "asid = \"200000000360\"",
            "asid = \"200000000359\"",
            "line 9: duplicate [[system]] asid 200000000359",
        ),
        (
            "asid = \"918999198993\"",
            "asid = \"91899919899x\"",
            "line 16: [[endpoint]] asid \"91899919899x\" is not an ASID",
        ),
        (
            "id = \"DSA-0001\"",
            "id = \"\"",
            "[[agreement]] id must not be empty",
        ),
        (
            "fqdn = \"consumer2.dev.localhost\"",
            "fqdn = \"consumer2.dev.localhost:443\"",
            "fqdn \"consumer2.dev.localhost:443\" is not a host name",
        ),
        (
            "\"urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1\"]",
            "\"not-a-urn\"]",
            "interaction \"not-a-urn\" is not a URN",
        ),
        (
            "gpconnect\"\ninteractions",
            "gpconnect/\"\ninteractions",
            "must not end with /",
        ),
        (
            "gpconnect\"\ninteractions",
            "gpconnect?x=1\"\ninteractions",
            "must not have a query",
        ),
        (
            "from = \"200000000359\"",
            "from = \"555\"",
            "agreement \"DSA-0001\" names unknown system 555",
        ),
        (
            "to = \"918999198993\"",
            "to = \"918999198999\"",
            "agreement \"DSA-0001\" names unknown endpoint 918999198999",
        ),
        (
            "not_after = \"2027-12-31T23:59:59Z\"",
            "not_after = \"2025-12-31T23:59:59Z\"",
            "not_after is before not_before",
        ),
        (
            "interactions = [\"*\"]",
            "interactions = [\"urn:nhs:names:services:gpconnect:fhir:rest:read:slot-1\"]",
            "grants urn:nhs:names:services:gpconnect:fhir:rest:read:slot-1, which neither 200000000359 nor 918999198993 holds",
        ),
    ];
    for (from, to, message) in cases {
        assert!(POLICY.contains(from), "{from}");
        let bad = POLICY.replacen(from, to, 1);
        let err =
            Policy::compile(&Source::from_files(vec![("p.toml".into(), bad)]), 2).unwrap_err();
        let all = err.to_string();
        assert!(all.contains("p.toml: line "), "{all}");
        assert!(all.contains(message), "expected {message:?} in {all}");
    }
    let mut dup = POLICY.to_string();
    dup.push_str("\n[[agreement]]\nid = \"DSA-0001\"\nfrom = \"200000000359\"\nto = \"918999198993\"\ninteractions = [\"*\"]\n");
    let err = Policy::compile(&Source::from_files(vec![("p.toml".into(), dup)]), 2).unwrap_err();
    assert!(
        err.to_string()
            .contains("duplicate [[agreement]] id \"DSA-0001\""),
        "{err}"
    );
}

/// `explain` reports every check and decides as `check` does: a permit, and a refusal at each of 5 to 9.
#[test]
fn explain_matches_check_at_each_step() {
    let p = policy();
    let cases = [
        (
            "200000000359",
            "918999198993",
            METADATA,
            URL,
            Some(CN),
            None,
        ),
        (
            "200000000359",
            "918999198993",
            METADATA,
            URL,
            Some("consumer2.dev.localhost"),
            Some(5),
        ),
        (
            "200000000359",
            "918999198993",
            "urn:x",
            URL,
            Some(CN),
            Some(6),
        ),
        (
            "200000000359",
            "918999198993",
            PATIENT,
            URL,
            Some(CN),
            Some(7),
        ),
        (
            "200000000360",
            "918999198993",
            METADATA,
            URL,
            Some("consumer2.dev.localhost"),
            Some(8),
        ),
        (
            "200000000359",
            "918999198993",
            METADATA,
            "https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata",
            Some(CN),
            Some(9),
        ),
    ];
    for (from, to, interaction, target, fqdn, fails_at) in cases {
        let req = request(from, to, interaction, target);
        let names = fqdn.map(|f| [f]);
        let explained = p.explain(
            &req.headers,
            Some(&req.target),
            names.as_ref().map(|n| &n[..]),
            at(NOW),
        );
        assert_eq!(
            explained.steps.iter().map(|s| s.number).collect::<Vec<_>>(),
            vec![5, 6, 7, 8, 9]
        );
        assert_eq!(
            explained.decision.as_ref().err().map(Denial::number),
            fails_at,
            "{explained:?}"
        );
        if let Some(n) = fails_at {
            let step = explained.steps.iter().find(|s| s.number == n).unwrap();
            assert_eq!(step.outcome, StepOutcome::Fail, "{step:?}");
        } else {
            assert!(
                explained
                    .steps
                    .iter()
                    .all(|s| s.outcome == StepOutcome::Pass),
                "{explained:?}"
            );
        }
        let checked = match p.decide(req, &peer(fqdn.unwrap_or(CN)), at(NOW)) {
            Decision::Permit(_) => None,
            Decision::Deny(d) => Some(d.number()),
        };
        assert_eq!(checked, fails_at);
    }
}

proptest::proptest! {
    /// Any edit of a valid policy compiles or is refused with reasons; never a panic, and an accepted text
    /// compiles the same way twice.
    #[test]
    fn edited_policies_compile_or_are_refused(
        edits in proptest::collection::vec(
            (0usize..2000, proptest::prop_oneof![
                proptest::strategy::Just(String::new()),
                "[\\[\\]{}=\",.#\n a-z0-9*-]{1,6}",
                "\\PC{1,3}",
            ], 0usize..8),
            1..4),
    ) {
        let mut text = POLICY.to_string();
        for (at, insert, cut) in edits {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) { at -= 1; }
            let mut end = (at + cut).min(text.len());
            while !text.is_char_boundary(end) { end += 1; }
            text.replace_range(at..end, &insert);
        }
        let source = Source::from_files(vec![("p.toml".into(), text)]);
        match Policy::compile(&source, 1) {
            // What compiles is whole: every agreement joins a known system to a known endpoint.
            Ok(p) => {
                for (from, list) in &p.agreements {
                    proptest::prop_assert!(p.systems.contains_key(from));
                    for a in list {
                        proptest::prop_assert!(p.endpoints.contains_key(&a.to), "{a:?}");
                    }
                }
            }
            // What is refused says where: each problem names the file and a line in it.
            Err(e) => {
                proptest::prop_assert!(!e.problems.is_empty());
                for problem in &e.problems {
                    proptest::prop_assert!(problem.starts_with("p.toml"), "{problem}");
                }
            }
        }
    }
}
