//! The request record's `jwt` object: claims copied into it as they stand in the token are the bytes the escaping
//! writer would write.

use super::*;

/// The `jwt` object with every kept claim escaped as it is written (`str`), whether or not it needed it.
fn written_escaping_all(a: &JwtAudit) -> String {
    let mut out = Vec::new();
    let mut o = crate::json_writer::ObjectWriter::open(&mut out);
    for kept in &Kept::ALL[..3] {
        o.str_or_null(kept.field(), a.claim(*kept));
    }
    o.i64_or_null("iat", a.iat);
    o.i64_or_null("exp", a.exp);
    for kept in &Kept::ALL[3..10] {
        o.str_or_null(kept.field(), a.claim(*kept));
    }
    match a.device_identifier_parts() {
        Some((system, value)) => o.str_parts("device_identifier", &[system, "|", value]),
        None => o.null("device_identifier"),
    }
    for kept in &Kept::ALL[10..] {
        o.str_or_null(kept.field(), a.claim(*kept));
    }
    o.str_or_null("alg", a.alg());
    o.bool("valid", a.valid);
    o.strs("violations", a.violations());
    o.close();
    String::from_utf8(out).unwrap()
}

proptest! {
    /// Claims copied into the record as they stand in the token (no scan for characters to escape) come out as
    /// the escaping writer writes them, whatever the strings hold: quotes, backslashes, control characters and
    /// `\u` escapes in the token, non-ASCII text.
    #[test]
    fn claims_copied_as_they_are_write_what_escaping_writes(
        name in r#"[a-z"\\\x00-\x1f\u{e9}\u{1F600} ]{0,12}"#,
        family in "\\PC{0,8}",
        system in r#"[a-z:/"]{0,10}"#,
        value in r#"[0-9a-z\\\n]{0,6}"#,
    ) {
        let mut c = claims();
        c["requesting_organization"]["name"] = json!(name);
        c["requesting_practitioner"]["name"][0]["family"] = json!(family);
        c["requesting_device"]["identifier"][0] = json!({"system": system, "value": value});
        let a = check(&c);
        let text = written(&a);
        prop_assert_eq!(&text, &written_escaping_all(&a));
        let object: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&object["organization_name"], &json!(name));
    }
}
