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
    fn decoder_never_panics(token in ".{0,300}") {
        let _ = decode(&token, None);
    }

    #[test]
    fn decoder_never_panics_on_base64ish_input(token in "[A-Za-z0-9_=+/.-]{0,300}") {
        let _ = decode(&token, None);
    }

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
    let text = serde_json::to_string(&a).unwrap();
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
    let text = serde_json::to_string(&none).unwrap();
    assert!(
        text.starts_with(r#"{"iss":null,"sub":null,"aud":null,"iat":null"#),
        "{text}"
    );
}

/// The reference the strict JSON reader is held to: serde_json, with each object's keys checked for repeats
/// when the object closes (where the reader checks them too, so that both report the first fault alike).
mod reference {
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    use crate::jwt::Violation;

    struct Strict(Value);

    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(StrictVisitor)
        }
    }

    struct StrictVisitor;

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Strict;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
            Ok(Strict(Value::Bool(v)))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
            Ok(Strict(Value::from(v)))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
            Ok(Strict(Value::from(v)))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
            Ok(Strict(Value::from(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
            Ok(Strict(Value::String(v.to_owned())))
        }
        fn visit_unit<E>(self) -> Result<Strict, E> {
            Ok(Strict(Value::Null))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
            let mut items = Vec::new();
            while let Some(Strict(v)) = seq.next_element()? {
                items.push(v);
            }
            Ok(Strict(Value::Array(items)))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
            let mut members: Vec<(String, Value)> = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                let Strict(value) = map.next_value()?;
                members.push((key, value));
            }
            let mut object = Map::new();
            for (key, value) in members {
                if object.insert(key, value).is_some() {
                    return Err(serde::de::Error::custom("duplicate key"));
                }
            }
            Ok(Strict(Value::Object(object)))
        }
    }

    /// serde_json's reading of `bytes` as the strict reader must read it.
    pub(super) fn read(bytes: &[u8]) -> Result<Value, Violation> {
        match serde_json::from_slice::<Strict>(bytes) {
            Ok(Strict(v @ Value::Object(_))) => Ok(v),
            Err(e) if e.to_string().starts_with("duplicate key") => Err(Violation::DuplicateKey),
            _ => Err(Violation::Malformed),
        }
    }

    /// Equal, except that floats may differ in their last place (serde_json's default float parsing is not
    /// correctly rounded; the reader's, std's, is).
    pub(super) fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y || ((x - y) / x).abs() < 1e-15,
                    _ => false,
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
            }
            _ => a == b,
        }
    }
}

/// What the strict reader makes of `bytes`, in the reference's terms.
fn read_strictly(bytes: &[u8]) -> Result<Value, Violation> {
    super::json::json_object(bytes).map(|doc| Value::Object(doc.root().to_map()))
}

fn assert_agrees(bytes: &[u8]) {
    let (mine, theirs) = (read_strictly(bytes), reference::read(bytes));
    let agree = match (&mine, &theirs) {
        (Ok(a), Ok(b)) => reference::same(a, b),
        (a, b) => a == b,
    };
    assert!(
        agree,
        "{:?}: reader {mine:?}, serde_json {theirs:?}",
        String::from_utf8_lossy(bytes)
    );
}

/// Edges of RFC 8259 where readers differ: numbers, escapes and surrogates, whitespace, trailing text, repeats.
#[test]
fn reader_agrees_with_serde_json_on_the_edges() {
    let cases: &[&[u8]] = &[
        br#"{}"#,
        br#" {"a" : [ 1 , 2 ] } "#,
        br#"{"a":-0}"#,
        br#"{"a":-0.0}"#,
        br#"{"a":0}"#,
        br#"{"a":01}"#,
        br#"{"a":-}"#,
        br#"{"a":1.}"#,
        br#"{"a":.5}"#,
        br#"{"a":+1}"#,
        br#"{"a":1E+2}"#,
        br#"{"a":1e-2}"#,
        br#"{"a":1e}"#,
        br#"{"a":1e400}"#,
        br#"{"a":-1e400}"#,
        br#"{"a":1e-400}"#,
        br#"{"a":9223372036854775807}"#,
        br#"{"a":9223372036854775808}"#,
        br#"{"a":18446744073709551615}"#,
        br#"{"a":18446744073709551616}"#,
        br#"{"a":-9223372036854775808}"#,
        br#"{"a":-9223372036854775809}"#,
        br#"{"a":0.1e1}"#,
        br#"{"a":"\u00e9\/\b\f\n\r\t\"\\"}"#,
        br#"{"a":"\ud83d\ude00"}"#,
        br#"{"a":"\ud800"}"#,
        br#"{"a":"\udc00"}"#,
        br#"{"a":"\ud800\u0041"}"#,
        br#"{"a":"\ud800\\"}"#,
        br#"{"a":"\u00G0"}"#,
        br#"{"a":"\u00"}"#,
        br#"{"a":"\x"}"#,
        br#"{"a":"\u0000"}"#,
        b"{\"a\":\"tab\there\"}",
        b"{\"a\":\"\x7f\"}",
        b"{\"a\":\"\xc3\xa9\"}",
        b"{\"a\":\"\xc3\"}",
        b"{\"a\":\xc3\xa9}",
        b"\xef\xbb\xbf{}",
        b"{\"a\":1\x0c}",
        b"{\"a\":\n1\r}",
        br#"{"a":tru}"#,
        br#"{"a":true}"#,
        br#"{"a":nul}"#,
        br#"{"a":null,"b":false}"#,
        br#"{"a":1}x"#,
        br#"{"a":1}{}"#,
        br#"{"a":1,}"#,
        br#"{,}"#,
        br#"{"a" 1}"#,
        br#"{"a":[1,]}"#,
        br#"{"a":[,1]}"#,
        br#"{"a":[1 2]}"#,
        br#"{a:1}"#,
        br#"{'a':1}"#,
        br#"{"\u0061":1,"a":2}"#,
        br#"{"a":{"b":1,"b":2}}"#,
        br#"{"a":1,"a":[}"#,
        br#"{"a":1,"a":2,"#,
        br#"{"":1,"":2}"#,
        br#"[]"#,
        br#""x""#,
        br#"1"#,
        b"",
        br#"{"#,
        br#"{"a":"#,
        br#"{"a":"unterminated}"#,
    ];
    for case in cases {
        assert_agrees(case);
    }
    // Depth: 127 levels are read, the 128th is refused; 5,000 do not reach the stack's end.
    for n in [125, 126, 127, 128, 5_000] {
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(n - 1), "]".repeat(n - 1));
        assert_agrees(deep.as_bytes());
    }
    assert!(
        read_strictly(format!(r#"{{"a":{}{}}}"#, "[".repeat(126), "]".repeat(126)).as_bytes())
            .is_ok()
    );
    assert!(
        read_strictly(format!(r#"{{"a":{}{}}}"#, "[".repeat(127), "]".repeat(127)).as_bytes())
            .is_err()
    );
}

/// JSON text from a small grammar, with keys from a tiny alphabet (so objects often repeat one, spelt plainly
/// or escaped), strings with every escape, and numbers of every shape.
fn json_text() -> impl Strategy<Value = String> {
    let ws = "[ \t\n\r]{0,2}";
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
        "\"([a-c ]|é|\\\\[\"\\\\/bfnrt]|\\\\u00[0-7][0-9a-fA-F]|\\\\u[dD]83[dD]\\\\u[dD][eE]00|\\\\u[dD]800){0,6}\"",
    ];
    let key = "\"([ab]|\\\\u006[12]){1,2}\"";
    leaf.prop_recursive(4, 40, 5, move |inner| {
        prop_oneof![
            (proptest::collection::vec(inner.clone(), 0..5), ws)
                .prop_map(|(items, ws)| format!("[{ws}{}{ws}]", items.join(&format!("{ws},")))),
            (proptest::collection::vec((key, inner), 0..5), ws).prop_map(|(members, ws)| {
                let members: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{ws}{k}{ws}:{v}"))
                    .collect();
                format!("{{{}{ws}}}", members.join(","))
            }),
        ]
    })
    .prop_map(|v| format!("{{\"root\":{v}}}"))
}

/// An edit of JSON text: delete, insert or replace one byte, from bytes that matter to the grammar.
fn mutate(text: String, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    const BYTES: &[u8] = b"{}[]\",:\\u0123456789eE.+- \ttnfalr\x00\x1f\xc3\xa9";
    let mut bytes = text.into_bytes();
    for &(at, kind, with) in edits {
        let at = at % (bytes.len() + 1);
        let with = BYTES[usize::from(with) % BYTES.len()];
        match kind % 3 {
            0 if at < bytes.len() => {
                bytes.remove(at);
            }
            1 => bytes.insert(at, with),
            _ if at < bytes.len() => bytes[at] = with,
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The strict reader and serde_json (with repeats refused) accept the same texts, read the same values
    /// and refuse the same way.
    #[test]
    fn reader_agrees_with_serde_json(
        text in json_text(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
    ) {
        assert_agrees(text.as_bytes());
        assert_agrees(&mutate(text, &edits));
    }
}

proptest! {
    /// The word-at-a-time scan for the end of plain string text finds what a byte-at-a-time scan finds.
    #[test]
    fn string_scan_finds_the_first_quote_backslash_or_control(
        bytes in proptest::collection::vec(
            prop_oneof![Just(b'"'), Just(b'\\'), 0u8..0x20, 0x20u8..=0xff], 0..40),
        plain in 0usize..40,
    ) {
        // A run of plain bytes first, so that the special byte lands at every place in a word.
        let mut text = vec![b'a'; plain];
        text.extend(&bytes);
        let expected = text.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
        prop_assert_eq!(super::json::special(&text), expected);
    }
}
