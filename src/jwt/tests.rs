use super::*;

use super::profile::*;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use crate::ids::InteractionId;
use proptest::prelude::*;
use serde_json::json;

const NOW: i64 = 1_795_000_000;
const URL: &str = "https://provider.example/B82617/STU3/1/gpconnect";
const READ: &str = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
const BOOK: &str = "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1";

/// A valid 1.x token's claims (the demo's), issued at `NOW`.
fn claims() -> Value {
    let (_, map) = decode(&crate::demo::dev_jwt(URL, "patient/*.read"), None).unwrap();
    let mut c = Value::Object(map);
    c["iat"] = json!(NOW);
    c["exp"] = json!(NOW + 300);
    c
}

fn validator() -> Validator {
    Validator {
        profile: Profile::GpConnect1,
        max_future_skew: Duration::from_secs(300),
    }
}

fn check_token(token: &str, interaction: &str) -> JwtAudit {
    let interaction = InteractionId::parse(interaction).unwrap();
    let header = format!("Bearer {token}");
    validator().validate(
        Some(header.as_bytes()),
        &Expect {
            endpoint_url: URL,
            interaction: &interaction,
            now: NOW,
            keys: None,
        },
    )
}

fn check(claims: &Value) -> JwtAudit {
    check_token(&encode_unsigned(claims), READ)
}

/// The `jwt` object of a request record, as the audit writer writes it.
fn written(a: &JwtAudit) -> String {
    let mut out = Vec::new();
    let mut o = crate::json_writer::ObjectWriter::open(&mut out);
    a.write_json(&mut o);
    o.close();
    String::from_utf8(out).unwrap()
}

fn names(a: &JwtAudit) -> Vec<&'static str> {
    a.violations()
}

fn with(f: impl FnOnce(&mut Value)) -> Vec<&'static str> {
    let mut c = claims();
    f(&mut c);
    names(&check(&c))
}

#[test]
fn a_good_token_is_valid_and_its_claims_are_kept() {
    let a = check(&claims());
    assert!(a.valid, "{:?}", a.violations());
    assert_eq!(a.claim(Kept::OrganizationOds), Some("RXX01"));
    assert_eq!(a.claim(Kept::OrganizationName), Some("Example Hospital"));
    assert_eq!(a.claim(Kept::SdsUserId), Some("111222333444"));
    assert_eq!(a.claim(Kept::SdsRoleProfileId), Some("444555666777"));
    assert_eq!(a.claim(Kept::PractitionerId), Some("1"));
    assert_eq!(a.claim(Kept::PractitionerFamilyName), Some("Demo"));
    assert_eq!(a.claim(Kept::PractitionerGivenName), Some("Doctor"));
    // DSTU2's HumanName: `family` is a list too; a name that is not there is none.
    let mut c = claims();
    c["requesting_practitioner"]["name"] = json!({ "family": ["Jones"], "given": ["Claire"] });
    let b = check(&c);
    assert_eq!(b.claim(Kept::PractitionerFamilyName), Some("Jones"));
    assert_eq!(b.claim(Kept::PractitionerGivenName), Some("Claire"));
    c["requesting_practitioner"]["name"] = json!([]);
    assert_eq!(check(&c).claim(Kept::PractitionerFamilyName), None);
    assert_eq!(
        a.device_identifier().as_deref(),
        Some("https://consumer.dev.localhost/Id/device|demo-1")
    );
    assert_eq!((a.iat, a.exp), (Some(NOW), Some(NOW + 300)));
    assert_eq!(a.alg(), Some("none"));
}

#[test]
fn every_required_claim_is_required() {
    for key in [
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "reason_for_request",
        "requested_scope",
        "requesting_device",
        "requesting_organization",
        "requesting_practitioner",
    ] {
        let v = with(|c| {
            c.as_object_mut().unwrap().remove(key);
        });
        assert!(
            v.contains(&format!("MISSING_{}", key.to_uppercase()).as_str()),
            "{key}: {v:?}"
        );
    }
}

#[test]
fn exp_is_iat_plus_300_exactly() {
    for (delta, ok) in [(300, true), (299, false), (301, false), (-1, false)] {
        let v = with(|c| c["exp"] = json!(NOW + delta));
        assert_eq!(!v.contains(&"EXP_IAT_NOT_300"), ok, "delta {delta}: {v:?}");
    }
}

#[test]
fn expired_and_future_tokens() {
    let v = with(|c| {
        c["iat"] = json!(NOW - 301);
        c["exp"] = json!(NOW - 1);
    });
    assert_eq!(v, vec!["EXPIRED"]);
    // Issued 200 s ahead passes, as the provider suite expects; beyond the skew fails.
    let v = with(|c| {
        c["iat"] = json!(NOW + 200);
        c["exp"] = json!(NOW + 500);
    });
    assert!(v.is_empty(), "{v:?}");
    let v = with(|c| {
        c["iat"] = json!(NOW + 301);
        c["exp"] = json!(NOW + 601);
    });
    assert_eq!(v, vec!["IAT_IN_FUTURE"]);
    assert_eq!(with(|c| c["iat"] = json!(1.5)), vec!["INVALID_IAT"]);
    assert_eq!(
        with(|c| c["exp"] = json!("1795000300")),
        vec!["INVALID_EXP"]
    );
}

/// The usual unsigned header is recognised by its encoding; the same header spelt otherwise is read, and judged
/// the same, and one that differs by a byte is refused.
#[test]
fn unsigned_headers_are_judged_alike_however_spelt() {
    let claims = URL_SAFE_NO_PAD.encode(claims().to_string());
    for (header, valid) in [
        (r#"{"alg":"none","typ":"JWT"}"#, true),
        (r#"{"typ":"JWT","alg":"none"}"#, true),
        (r#" {"alg" : "none", "typ":"JWT"}"#, true),
        (r#"{"alg":"none","typ":"JWS"}"#, false),
        (r#"{"alg":"None","typ":"JWT"}"#, false),
    ] {
        let token = format!("{}.{claims}.", URL_SAFE_NO_PAD.encode(header));
        let audit = check_token(&token, READ);
        assert_eq!(audit.valid, valid, "{header}: {:?}", names(&audit));
        assert_eq!(audit.alg(), valid.then_some("none"), "{header}");
    }
}

#[test]
fn hostile_tokens_are_refused_by_name() {
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let token = |payload: &str| format!("{h}.{}.", URL_SAFE_NO_PAD.encode(payload));
    // Huge: refused before any decoding.
    let huge = token(&format!(r#"{{"iss":"{}"}}"#, "a".repeat(MAX_TOKEN_BYTES)));
    assert_eq!(names(&check_token(&huge, READ)), vec!["TOO_LARGE"]);
    // Deeply nested: serde_json's depth limit, not the stack.
    let deep = format!(r#"{{"iss":{}1{}}}"#, "[".repeat(5_000), "]".repeat(5_000));
    assert!(token(&deep).len() < MAX_TOKEN_BYTES);
    assert_eq!(names(&check_token(&token(&deep), READ)), vec!["MALFORMED"]);
    // A repeated claim, at the top or inside a resource, and a repeated header key.
    let mut text = claims().to_string();
    text.insert_str(1, r#""sub":"someone-else","#);
    assert_eq!(
        names(&check_token(&token(&text), READ)),
        vec!["DUPLICATE_KEY"]
    );
    let nested = claims().to_string().replacen(
        r#""resourceType":"Practitioner""#,
        r#""resourceType":"Practitioner","resourceType":"Patient""#,
        1,
    );
    assert_ne!(nested, claims().to_string());
    assert_eq!(
        names(&check_token(&token(&nested), READ)),
        vec!["DUPLICATE_KEY"]
    );
    let dup_header = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    assert_eq!(
        names(&check_token(&dup_header, READ)),
        vec!["DUPLICATE_KEY"]
    );
    // A key spelt with an escape is the same key; and a large object is checked as well as a small one.
    let escaped = claims().to_string().replacen('{', r#"{"s\u0075b":"x","#, 1);
    assert_eq!(
        names(&check_token(&token(&escaped), READ)),
        vec!["DUPLICATE_KEY"]
    );
    let mut large = claims();
    for i in 0..40 {
        large[format!("x-{i}")] = json!(i);
    }
    assert!(check_token(&token(&large.to_string()), READ).valid);
    let repeated = large.to_string().replacen('{', r#"{"x-17":0,"#, 1);
    assert_eq!(
        names(&check_token(&token(&repeated), READ)),
        vec!["DUPLICATE_KEY"]
    );
    // Wrong types: a number for a string, a string for a number, an array for a resource.
    for (claim, value, name) in [
        ("iss", json!(42), "INVALID_ISS"),
        ("iat", json!("1795000000"), "INVALID_IAT"),
        (
            "requesting_device",
            json!([1, 2]),
            "INVALID_REQUESTING_DEVICE",
        ),
    ] {
        let mut c = claims();
        c[claim] = value;
        assert!(
            names(&check_token(&encode_unsigned(&c), READ)).contains(&name),
            "{claim}"
        );
    }
    // Not an object, and trailing bytes after one.
    assert_eq!(names(&check_token(&token("[1]"), READ)), vec!["MALFORMED"]);
    let trailing = format!("{} x", claims());
    assert_eq!(
        names(&check_token(&token(&trailing), READ)),
        vec!["MALFORMED"]
    );
}

/// A claims set that is not UTF-8 is malformed; a repeated key in an object that closes before the first byte that
/// is not UTF-8 is still named, as the reader meets it first. Both go through the whole token path, which keeps
/// the decoded bytes for this case and text otherwise.
#[test]
fn claims_that_are_not_utf8_are_malformed_and_an_earlier_repeated_key_is_still_named() {
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let token = |payload: &[u8]| format!("{h}.{}.", URL_SAFE_NO_PAD.encode(payload));
    let good = claims().to_string();
    // The same claims with one byte (in the ODS code) that is not UTF-8.
    let mut bytes = good.clone().into_bytes();
    let at = good.find("RXX01").unwrap() + 4;
    bytes[at] = 0xff;
    assert_eq!(names(&check_token(&token(&bytes), READ)), vec!["MALFORMED"]);
    // A resource with a repeated key, closed before a byte that is not UTF-8 at the very end.
    let nested = good.replacen(
        r#""resourceType":"Practitioner""#,
        r#""resourceType":"Practitioner","resourceType":"Patient""#,
        1,
    );
    assert_ne!(nested, good);
    let mut repeated = nested.into_bytes();
    repeated.insert(repeated.len() - 1, 0xc3);
    assert_eq!(
        names(&check_token(&token(&repeated), READ)),
        vec!["DUPLICATE_KEY"]
    );
    // And the unchanged claims are valid, so neither verdict comes from something else.
    assert!(check_token(&token(good.as_bytes()), READ).valid);
}

#[test]
fn token_shape_is_strict() {
    let good = encode_unsigned(&claims());
    let (h, rest) = good.split_once('.').unwrap();
    let p = rest.trim_end_matches('.');
    // Raw JSON instead of base64url.
    assert_eq!(
        names(&check_token(
            &format!("{}.{}.", r#"{"alg":"none"}"#, claims()),
            READ
        )),
        vec!["MALFORMED"]
    );
    // Padding, and the standard alphabet.
    assert_eq!(
        names(&check_token(&format!("{h}=.{p}."), READ)),
        vec!["MALFORMED"]
    );
    let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode(claims().to_string());
    if standard.contains(['+', '/']) {
        assert_eq!(
            names(&check_token(&format!("{h}.{standard}."), READ)),
            vec!["MALFORMED"]
        );
    }
    assert_eq!(
        names(&check_token(&format!("{h}.{p}+."), READ)),
        vec!["MALFORMED"]
    );
    // Two parts, four parts.
    assert_eq!(
        names(&check_token(&format!("{h}.{p}"), READ)),
        vec!["MALFORMED"]
    );
    assert_eq!(
        names(&check_token(&format!("{h}.{p}..x"), READ)),
        vec!["MALFORMED"]
    );
    // A non-empty signature on an unsigned token.
    assert_eq!(
        names(&check_token(&format!("{h}.{p}.c2ln"), READ)),
        vec!["UNEXPECTED_SIGNATURE"]
    );
    // Wrong alg, missing typ, extra header fields.
    for header in [
        r#"{"alg":"HS256","typ":"JWT"}"#,
        r#"{"alg":"none"}"#,
        r#"{"alg":"none","typ":"JWT","kid":"1"}"#,
    ] {
        let h = URL_SAFE_NO_PAD.encode(header);
        assert_eq!(
            names(&check_token(&format!("{h}.{p}."), READ)),
            vec!["HEADER"],
            "{header}"
        );
    }
    // A JSON array is not a claims object.
    let arr = URL_SAFE_NO_PAD.encode("[1]");
    assert_eq!(
        names(&check_token(&format!("{h}.{arr}."), READ)),
        vec!["MALFORMED"]
    );
    // Too large.
    let big = "a".repeat(MAX_TOKEN_BYTES);
    assert_eq!(
        names(&check_token(&format!("{h}.{big}."), READ)),
        vec!["TOO_LARGE"]
    );
}

#[test]
fn bearer_takes_one_or_more_spaces_and_nothing_else() {
    assert_eq!(bearer_token(Some(b"Bearer abc")), Ok("abc"));
    assert_eq!(bearer_token(Some(b"bEaReR    abc")), Ok("abc"));
    assert_eq!(bearer_token(None), Err(Violation::MissingToken));
    assert_eq!(
        bearer_token(Some(b"Basic abc")),
        Err(Violation::MissingToken)
    );
    assert_eq!(
        bearer_token(Some(b"Bearerx abc")),
        Err(Violation::MissingToken)
    );
    for malformed in [
        &b"Bearer\tabc"[..],
        b"Bearer",
        b"Bearer   ",
        b"Bearer \xff",
        b"Bearer\t abc",
    ] {
        assert_eq!(
            bearer_token(Some(malformed)),
            Err(Violation::Malformed),
            "{:?}",
            String::from_utf8_lossy(malformed)
        );
    }
}

#[test]
fn missing_or_other_scheme_is_missing_token() {
    let interaction = InteractionId::parse(READ).unwrap();
    let expect = Expect {
        endpoint_url: URL,
        interaction: &interaction,
        now: NOW,
        keys: None,
    };
    assert_eq!(
        names(&validator().validate(None, &expect)),
        vec!["MISSING_TOKEN"]
    );
    assert_eq!(
        names(&validator().validate(Some(b"Basic abc"), &expect)),
        vec!["MISSING_TOKEN"]
    );
    let lower = format!("bearer {}", encode_unsigned(&claims()));
    assert!(validator().validate(Some(lower.as_bytes()), &expect).valid);
}

#[test]
fn reason_and_scope() {
    assert_eq!(
        with(|c| c["reason_for_request"] = json!("secondaryuses")),
        vec!["INVALID_REASON_FOR_REQUEST"]
    );
    assert_eq!(
        with(|c| c["requested_scope"] = json!("patient/*.delete")),
        vec!["INVALID_REQUESTED_SCOPE"]
    );
    assert_eq!(
        with(|c| c["requested_scope"] = json!("patient/*.read conf/X")),
        vec!["INVALID_REQUESTED_SCOPE"]
    );
    assert!(with(|c| c["requested_scope"] = json!("patient/*.read conf/N")).is_empty());
    // Scope not fitting the interaction: organization read for a patient read, read for a booking.
    assert_eq!(
        with(|c| c["requested_scope"] = json!("organization/*.read")),
        vec!["SCOPE_FOR_INTERACTION"]
    );
    let mut c = claims();
    c["requested_scope"] = json!("patient/*.read");
    assert_eq!(
        names(&check_token(&encode_unsigned(&c), BOOK)),
        vec!["SCOPE_FOR_INTERACTION"]
    );
    c["requested_scope"] = json!("patient/*.write");
    assert!(check_token(&encode_unsigned(&c), BOOK).valid);
    c["requested_scope"] = json!("organization/*.read");
    assert!(check_token(&encode_unsigned(&c), METADATA).valid);
}

#[test]
fn sub_resource_types_and_identifier_systems() {
    assert_eq!(
        with(|c| c["sub"] = json!("2")),
        vec!["SUB_NOT_PRACTITIONER_ID"]
    );
    assert_eq!(
        with(|c| c["requesting_device"]["resourceType"] = json!("Organization")),
        vec!["INVALID_REQUESTING_DEVICE"]
    );
    assert_eq!(
        with(|c| c["requesting_practitioner"]["resourceType"] = json!("Patient")),
        vec!["INVALID_REQUESTING_PRACTITIONER"]
    );
    assert_eq!(
        with(|c| c["requesting_organization"] = json!("RXX01")),
        vec!["INVALID_REQUESTING_ORGANIZATION"]
    );
    assert_eq!(
        with(
            |c| c["requesting_organization"]["identifier"][0]["system"] =
                json!("http://fhir.nhs.net/Id/ods-organization-code")
        ),
        vec!["ODS_IDENTIFIER"]
    );
    assert_eq!(
        with(
            |c| c["requesting_practitioner"]["identifier"][0]["system"] =
                json!("http://fhir.nhs.net/sds-user-id")
        ),
        vec!["SDS_USER_ID"]
    );
    // UNK is accepted for both SDS ids, and the role profile id may be absent.
    let v = with(|c| {
        c["requesting_practitioner"]["identifier"] =
            json!([{ "system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "UNK" }]);
    });
    assert!(v.is_empty(), "{v:?}");
    assert!(
        with(|c| c["requesting_practitioner"]["identifier"][1]["value"] = json!("UNK")).is_empty()
    );
}

#[test]
fn audience_by_profile() {
    assert_eq!(
        with(|c| c["aud"] = json!("https://other.example/x")),
        vec!["AUD_MISMATCH"]
    );
    assert_eq!(
        with(|c| c["requested_record"] = json!({"resourceType": "Patient"})),
        vec!["UNEXPECTED_REQUESTED_RECORD"]
    );
    // DSTU2: fixed audience, http://fhir.nhs.net identifier systems, requested_record required.
    let mut c = claims();
    c["aud"] = json!(DSTU2_AUDIENCE);
    c["requesting_organization"]["identifier"][0]["system"] =
        json!("http://fhir.nhs.net/Id/ods-organization-code");
    c["requesting_practitioner"]["identifier"][0]["system"] =
        json!("http://fhir.nhs.net/sds-user-id");
    let dstu2 = Validator {
        profile: Profile::GpConnect07,
        max_future_skew: Duration::from_secs(300),
    };
    let interaction =
        InteractionId::parse("urn:nhs:names:services:gpconnect:fhir:operation:gpc.getcarerecord")
            .unwrap();
    let expect = Expect {
        endpoint_url: URL,
        interaction: &interaction,
        now: NOW,
        keys: None,
    };
    let run = |c: &Value| {
        dstu2.validate(
            Some(format!("Bearer {}", encode_unsigned(c)).as_bytes()),
            &expect,
        )
    };
    assert_eq!(names(&run(&c)), vec!["MISSING_REQUESTED_RECORD"]);
    c["requested_record"] = json!({"resourceType": "Patient", "identifier": []});
    assert!(run(&c).valid, "{:?}", run(&c).violations());
    c["aud"] = json!(URL);
    assert_eq!(names(&run(&c)), vec!["AUD_MISMATCH"]);
}

#[test]
fn required_scopes_follow_the_specification() {
    let scope = |s: &str| {
        required_scope(
            &InteractionId::parse(&format!("urn:nhs:names:services:gpconnect:{s}")).unwrap(),
        )
    };
    assert_eq!(
        scope("fhir:rest:read:metadata-1"),
        Some("organization/*.read")
    );
    assert_eq!(
        scope("structured:fhir:rest:read:metadata-1"),
        Some("organization/*.read")
    );
    assert_eq!(
        scope("fhir:rest:search:slot-1"),
        Some("organization/*.read")
    );
    assert_eq!(scope("fhir:rest:search:patient-1"), Some("patient/*.read"));
    assert_eq!(
        scope("documents:fhir:rest:read:binary-1"),
        Some("patient/*.read")
    );
    assert_eq!(
        scope("fhir:operation:gpc.registerpatient-1"),
        Some("patient/*.write")
    );
    assert_eq!(
        scope("fhir:rest:cancel:appointment-1"),
        Some("patient/*.write")
    );
    assert_eq!(scope("fhir:rest:read:something-new-1"), None);
}

proptest! {
    #[test]
    fn decode_encode_round_trips(
        iss in "[ -~]{1,40}", sub in "[A-Za-z0-9]{1,12}", iat in 0i64..4_000_000_000,
        extra in proptest::collection::btree_map("[a-z_]{1,10}", "[ -~]{0,20}", 0..5),
    ) {
        let mut c = claims();
        c["iss"] = json!(iss);
        c["sub"] = json!(sub);
        c["iat"] = json!(iat);
        for (k, v) in &extra { c[format!("x_{k}")] = json!(v); }
        let (alg, decoded) = decode(&encode_unsigned(&c), None).unwrap();
        prop_assert_eq!(alg, "none");
        prop_assert_eq!(Value::Object(decoded), c);
    }
}

/// Kept claims point into the decoded claims set, or hold the unescaped text of a JSON string with escapes; the
/// record's `jwt` object lists every field in its documented order either way.
#[test]
fn kept_claims_with_and_without_escapes_serialize_in_order() {
    let mut c = claims();
    c["requesting_organization"]["name"] = json!("St \"Mary's\" \u{e9}\\ward");
    let a = check(&c);
    assert!(a.valid, "{:?}", a.violations());
    assert_eq!(
        a.claim(Kept::OrganizationName),
        Some("St \"Mary's\" \u{e9}\\ward")
    );
    assert_eq!(a.claim(Kept::OrganizationOds), Some("RXX01"));
    let text = written(&a);
    let object: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    // serde_json's map sorts keys; the order is checked on the text.
    let order = [
        "iss",
        "sub",
        "aud",
        "iat",
        "exp",
        "reason_for_request",
        "requested_scope",
        "organization_ods",
        "organization_name",
        "practitioner_id",
        "sds_user_id",
        "sds_role_profile_id",
        "device_identifier",
        "device_model",
        "device_version",
        "practitioner_family_name",
        "practitioner_given_name",
        "alg",
        "valid",
        "violations",
    ];
    assert_eq!(keys.len(), order.len(), "{text}");
    let at: Vec<usize> = order
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert_eq!(
        object["organization_name"],
        c["requesting_organization"]["name"]
    );
    assert_eq!(
        object["device_identifier"],
        "https://consumer.dev.localhost/Id/device|demo-1"
    );
    // A token that never got as far as its claims keeps none, and says so with nulls.
    let none = check_token("not-a-token", READ);
    let text = written(&none);
    assert!(
        text.starts_with(r#"{"iss":null,"sub":null,"aud":null,"iat":null"#),
        "{text}"
    );
}

mod parts;
mod reader;
mod written;
