use super::body::{BODY_BOUND, numbers};
use super::*;

fn indexer(redact: bool) -> Arc<Indexer> {
    Indexer::new(
        PatientKey::from_bytes(&[7; 32]).unwrap(),
        &PatientsConfig {
            key: std::path::PathBuf::new(),
            redact,
            read_bodies: true,
        },
    )
}

#[test]
fn the_hmac_is_hmac_sha256() {
    // RFC 4231 section 4.3, test case 2.
    assert_eq!(
        PatientKey::from_bytes(b"Jefe")
            .unwrap()
            .hmac("what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn the_check_digit_is_modulus_11() {
    assert_eq!(Check::of("9434765919"), Check::Valid);
    assert_eq!(Check::of("9000000009"), Check::Valid);
    assert_eq!(Check::of("4010232137"), Check::Valid);
    assert_eq!(Check::of("9434765918"), Check::InvalidCheckDigit);
    // 123456789 has remainder 1: check 10, never valid.
    assert_eq!(Check::of("1234567890"), Check::InvalidCheckDigit);
    assert_eq!(Check::of("943476591"), Check::Malformed);
    assert_eq!(Check::of("94347659X9"), Check::Malformed);
}

#[test]
fn numbers_are_found_in_the_query_raw_encoded_and_in_lists() {
    let ix = indexer(false);
    let found = |t: &str| {
        ix.target(t)
            .refs
            .iter()
            .map(|r| (r.hmac.to_string(), r.check, r.source))
            .collect::<Vec<_>>()
    };
    let h = |n: &str| ix.key().hmac(n);
    assert_eq!(
        found(
            "https://p.example/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919"
        ),
        vec![(h("9434765919"), Check::Valid, Source::Query)]
    );
    assert_eq!(
        found(
            "/B82617/fhir/DocumentReference?subject:Patient.identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9434765918&_include=x"
        ),
        vec![(h("9434765918"), Check::InvalidCheckDigit, Source::Query)]
    );
    // A FHIR OR list, the DSTU2 system, spaces in the number, and a system that is not an NHS number's.
    assert_eq!(
        found(
            "/Patient?identifier=http://fhir.nhs.net/Id/nhs-number|943+476+5919,https://fhir.nhs.uk/Id/nhs-number|9000000009&x=https://other/Id|9000000009"
        ),
        vec![
            (h("9434765919"), Check::Valid, Source::Query),
            (h("9000000009"), Check::Valid, Source::Query)
        ]
    );
    assert_eq!(
        found("/fhir/Patient/9000000009/Appointment"),
        vec![(h("9000000009"), Check::Valid, Source::Path)]
    );
    assert!(found("/fhir/Patient/2/Appointment?start=ge2026-01-01").is_empty());
    assert!(found("/fhir/metadata").is_empty());
}

#[test]
fn identifier_searches_are_read_as_a_fhir_server_reads_them() {
    let ix = indexer(true);
    let h = |n: &str| ix.key().hmac(n);
    let read = |t: &str| {
        let found = ix.target(t);
        let hmacs: Vec<String> = found.refs.iter().map(|r| r.hmac.to_string()).collect();
        (hmacs, found.redacted.unwrap_or_default())
    };
    // A list whose comma is escaped, and the host in capitals.
    let (hmacs, redacted) = read(
        "/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number%7C9434765919%2CHTTPS://FHIR.NHS.UK/Id/nhs-number%7C9000000009",
    );
    assert_eq!(hmacs, vec![h("9434765919"), h("9000000009")]);
    assert!(
        !redacted.contains("9434765919") && !redacted.contains("9000000009"),
        "{redacted}"
    );
    // A bare code, or one with an empty system, in an identifier parameter; not in another parameter.
    let (hmacs, redacted) = read(
        "/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919,9000000009&subject:Patient.identifier=|4010232137&count=9000000009",
    );
    assert_eq!(
        hmacs,
        vec![h("9434765919"), h("9000000009"), h("4010232137")]
    );
    assert!(redacted.ends_with("&count=9000000009"), "{redacted}");
    assert!(!redacted.contains("4010232137"), "{redacted}");
    // Modifiers, an escaped `:` in the name, and a number written with spaces.
    for query in [
        "identifier:exact=9434765919",
        "identifier:not=9434765919",
        "identifier%3Aexact=9434765919",
        "identifier=943%20476%205919",
        "identifier=943+476+5919",
    ] {
        let (hmacs, redacted) = read(&format!("/Patient?{query}"));
        assert_eq!(hmacs, vec![h("9434765919")], "{query}");
        assert!(!redacted.contains("5919"), "{query}: {redacted}");
    }
    // Text shown on a terminal: invisible and line-breaking characters from a consumer are escaped.
    let shown = crate::audit::query::cell("A\u{2028}E\u{feff}G\u{2029}H\u{200b}");
    assert!(
        !shown.contains(['\u{2028}', '\u{2029}', '\u{feff}', '\u{200b}']),
        "{shown}"
    );
    // A refusal's reason that quotes the target is redacted as the target is.
    let reason = "ENDPOINT_https://p/gp_VARIES_FROM_TARGETURL_https://p/gp/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919".to_owned();
    let redacted = ix.redact_text(reason);
    assert!(
        !redacted.contains("9434765919") && redacted.contains("hmac:"),
        "{redacted}"
    );
    assert_eq!(
        indexer(false).redact_text("x 9434765919".into()),
        "x 9434765919"
    );
}

#[test]
fn redaction_leaves_the_hmac_where_the_number_was_and_the_rest_as_sent() {
    let ix = indexer(true);
    let target = "/fhir/Patient/9000000009/Appointment?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9434765919&_count=5";
    let found = ix.target(target);
    let redacted = found.redacted.as_deref().unwrap_or_default();
    assert_eq!(
        redacted,
        format!(
            "/fhir/Patient/hmac:{}/Appointment?identifier=https://fhir.nhs.uk/Id/nhs-number|hmac:{}&_count=5",
            ix.key().hmac("9000000009"),
            ix.key().hmac("9434765919")
        )
    );
    assert!(!redacted.contains("9434765919") && !redacted.contains("9000000009"));
    assert!(indexer(false).target(target).redacted.is_none());
}

#[test]
fn the_key_file_must_be_private_and_long_enough() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, [1u8; 32]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = PatientKey::load(&path).unwrap_err();
    assert!(err.contains("0644") && err.contains("0400"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    let key = PatientKey::load(&path).unwrap();
    assert_eq!(key.id().len(), 8);
    assert_ne!(key.id(), PatientKey::from_bytes(&[2; 32]).unwrap().id());
    let short = dir.path().join("short");
    std::fs::write(&short, [1u8; 16]).unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert!(PatientKey::load(&short).unwrap_err().contains("16 bytes"));
}

const JSON_BODY: &str = r#"{"resourceType":"Parameters","parameter":[{"name":"patientNHSNumber","valueIdentifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9690937286"}},{"name":"includeAllergies","part":[{"name":"includeResolvedAllergies","valueBoolean":true}]}]}"#;

const XML_BODY: &str = r#"<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="patientNHSNumber"/><valueIdentifier><system value="https://fhir.nhs.uk/Id/nhs-number"/><value value="9690937286"/></valueIdentifier></parameter><parameter><name value="includeMedication"/></parameter></Parameters>"#;

#[test]
fn bodies_give_their_identifiers_in_json_and_xml() {
    assert_eq!(numbers(JSON_BODY.as_bytes()), vec!["9690937286"]);
    assert_eq!(numbers(XML_BODY.as_bytes()), vec!["9690937286"]);
    // Value before system, white space, and the same number twice.
    let reordered = r#" { "parameter": [ { "valueIdentifier": { "value": "9434765919", "system": "https://fhir.nhs.uk/Id/nhs-number" } }, { "valueIdentifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919" } } ] }"#;
    assert_eq!(numbers(reordered.as_bytes()), vec!["9434765919"]);
    // Other identifier systems are not NHS numbers.
    let other = r#"{"valueIdentifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"B82617"}}"#;
    assert!(numbers(other.as_bytes()).is_empty());
    assert!(numbers(b"not a body").is_empty());
    // Escaped slashes and letters, a byte order mark, a brace in a string before the identifier: one whole body
    // is parsed, not searched.
    let escaped = "\u{feff}{\"meta\":\"}\",\"parameter\":[{\"valueIdentifier\":{\"system\":\"\\u0068ttps:\\/\\/fhir.nhs.uk\\/Id\\/nhs-number\",\"value\":\"9434765919\"}}]}";
    assert_eq!(numbers(escaped.as_bytes()), vec!["9434765919"]);
    let bom_xml = format!("\u{feff}{XML_BODY}");
    assert_eq!(numbers(bom_xml.as_bytes()), vec!["9690937286"]);
}

#[test]
fn a_number_past_the_bound_or_cut_by_it_is_not_read() {
    let ix = indexer(false);
    let padding = format!(
        r#"{{"resourceType":"Parameters","meta":{{"x":"{}"}},"parameter":["#,
        "a".repeat(BODY_BOUND)
    );
    let scan = ix
        .body("urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1")
        .unwrap();
    assert!(!scan.push(padding.as_bytes()), "the bound is reached");
    assert!(!scan.push(JSON_BODY.as_bytes()));
    assert!(scan.found().is_empty());
    // Cut in the middle of the identifier: nothing half-read.
    let cut = &XML_BODY[..XML_BODY.find("9690").unwrap() + 2];
    assert!(numbers(cut.as_bytes()).is_empty());
    let cut = &JSON_BODY[..JSON_BODY.find("9690").unwrap() + 2];
    assert!(numbers(cut.as_bytes()).is_empty());
    // Frames of any size add up to the same answer.
    let scan = ix
        .body("urn:nhs:names:services:gpconnect:fhir:operation:gpc.migratestructuredrecord-1")
        .unwrap();
    for chunk in XML_BODY.as_bytes().chunks(7) {
        assert!(scan.push(chunk));
    }
    assert_eq!(
        scan.found()[0].hmac.to_string(),
        ix.key().hmac("9690937286")
    );
    assert_eq!(scan.found()[0].source, Source::Body);
    assert!(
        ix.body("urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1")
            .is_none()
    );
}
