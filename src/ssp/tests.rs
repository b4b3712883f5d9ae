use super::*;
use http::HeaderValue;
use proptest::prelude::*;

const URL: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect";

fn target(path: &str) -> Result<Target, TargetError> {
    Target::from_request_path(path)
}

#[test]
fn accepts_the_ssp_form_and_keeps_bytes() {
    let t = target("/https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect/fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9690937286").unwrap();
    assert_eq!(t.authority(), "provider.dev.localhost:9443");
    assert_eq!(
        t.uri().path_and_query().unwrap().as_str(),
        "/B82617/STU3/1/gpconnect/fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9690937286"
    );
    assert!(target("/https://h").is_ok());
    assert!(target("/https://h?x=1").is_ok());
    assert!(target("/https://[::1]:9443/p").is_ok());
    assert!(target("/https://h/%2e%2e.txt").is_ok(), "not a dot segment");
    assert!(target("/https://h/a..b/.c").is_ok());
}

#[test]
fn refuses_everything_else() {
    use TargetError::*;
    let cases = [
        ("https://h/p", NotSspForm),
        ("/http://h/p", NotHttps),
        ("/HTTPS://h/p", NotHttps),
        ("/h/p", NotHttps),
        ("/https://user@h/p", Userinfo),
        ("/https://user:pw@h/p", Userinfo),
        ("/https://h/p#frag", Fragment),
        ("/https:///p", EmptyHost),
        ("/https://:443/p", EmptyHost),
        ("/https://h:/p", BadPort),
        ("/https://h:0/p", BadPort),
        ("/https://h:65536/p", BadPort),
        ("/https://h:44a/p", BadPort),
        ("/https://h_x/p", BadHost),
        ("/https://h..x/p", BadHost),
        ("/https://provider.example./p", BadHost),
        ("/https://provider.example.:443/p", BadHost),
        ("/https://h%2ex/p", BadHost),
        ("/https://[zz]/p", BadHost),
        ("/https://h/a/../b", DotSegment),
        ("/https://h/a/./b", DotSegment),
        ("/https://h/a/%2e%2E/b", DotSegment),
        ("/https://h/a/.%2e", DotSegment),
        ("/https://h/..", DotSegment),
        ("/https://h/a/..;/b", DotSegment),
        ("/https://h/a/..;jsessionid=1/b", DotSegment),
        ("/https://h/a/.%3Bx/b", DotSegment),
        ("/https://h/a/..%3bx/b", DotSegment),
        ("/https://h/a\\..\\b", Backslash),
        ("/https://h/gp/%2e%2e%2fadmin", EncodedSeparator),
        ("/https://h/gp/a%2Fb", EncodedSeparator),
        ("/https://h/gp/a%5cb", EncodedSeparator),
        ("/https://h/gp/a%00", EncodedSeparator),
        ("/https://h/m\u{e9}tadata", Unprintable),
        ("/https://h/a b", Unprintable),
        ("/https://h/a\0", Unprintable),
        ("/https://h/a\x7f", Unprintable),
        ("/https://h/p?q=\u{e9}", Unprintable),
        ("/https://h\u{430}/p", Unprintable),
    ];
    for (path, want) in cases {
        assert_eq!(target(path).err(), Some(want), "{path}");
    }
    let long = format!("/https://h/{}", "a".repeat(MAX_TARGET_LEN));
    assert_eq!(target(&long).err(), Some(TooLong));
}

#[test]
fn dot_segments_in_the_query_are_data() {
    assert!(target("/https://h/p?x=/../y").is_ok());
    assert!(target("/https://h/p?x=a%2Fb%5C%00").is_ok());
}

#[test]
fn under_endpoint_is_exact_text_at_a_boundary() {
    let under = |p: &str| Target::parse(p).unwrap().is_under(URL);
    assert!(under(URL));
    assert!(under(&format!("{URL}/fhir/metadata")));
    assert!(under(&format!("{URL}?x=1")));
    assert!(!under(&format!("{URL}x/fhir")));
    assert!(!under(
        "https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir"
    ));
    let plain =
        Target::parse("https://provider.example/B82617/STU3/1/gpconnect/fhir/metadata").unwrap();
    assert!(plain.is_under("https://provider.example/B82617/STU3/1/gpconnect"));
    let added_port =
        Target::parse("https://provider.example:443/B82617/STU3/1/gpconnect/fhir/metadata")
            .unwrap();
    assert!(!added_port.is_under("https://provider.example/B82617/STU3/1/gpconnect"));
    assert!(!under(
        "https://PROVIDER.dev.localhost:9443/B82617/STU3/1/gpconnect"
    ));
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

const GOOD: [(&str, &str); 4] = [
    ("Ssp-TraceID", "629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
    ("Ssp-From", "200000000359"),
    ("Ssp-To", "918999198993"),
    (
        "Ssp-InteractionId",
        "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
    ),
];

#[test]
fn headers_parse_case_insensitively() {
    let h = SspHeaders::parse(&headers(&GOOD)).unwrap();
    assert_eq!(h.from.as_str(), "200000000359");
    assert_eq!(h.to.as_str(), "918999198993");
}

#[test]
fn first_bad_header_is_named() {
    for (i, name) in ["Ssp-TraceID", "Ssp-From", "Ssp-To", "Ssp-InteractionID"]
        .iter()
        .enumerate()
    {
        let mut missing = GOOD.to_vec();
        missing.remove(i);
        assert_eq!(
            SspHeaders::parse(&headers(&missing)).err(),
            Some(HeaderError(name))
        );
        let mut bad = GOOD.to_vec();
        bad[i].1 = "not valid";
        assert_eq!(
            SspHeaders::parse(&headers(&bad)).err(),
            Some(HeaderError(name))
        );
        let mut twice = GOOD.to_vec();
        twice.push(GOOD[i]);
        assert_eq!(
            SspHeaders::parse(&headers(&twice)).err(),
            Some(HeaderError(name))
        );
    }
}

proptest! {
    #[test]
    fn target_parser_never_panics(s in "/https://[a-z0-9.:@\\[\\]%/?#\\\\-]{0,40}") {
        let _ = target(&s);
    }

    #[test]
    fn accepted_targets_keep_their_promises(s in "/https://[a-zA-Z0-9.:@\\[\\]%/?#\\\\ \u{e9}\u{0}\u{7f}-]{0,60}") {
        if let Ok(t) = target(&s) {
            let text = t.as_str();
            prop_assert_eq!(text, &s[1..]);
            prop_assert!(text.bytes().all(|b| b.is_ascii_graphic()));
            let rest = &text["https://".len()..];
            let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
            prop_assert!(!authority.is_empty() && !authority.contains('@'));
            prop_assert_eq!(t.authority(), authority);
            // No fragment anywhere; no backslash in the path (a query may carry one, as the integrator guide's check 3 says).
            let path = &rest[authority.len()..];
            let path = path.split_once('?').map_or(path, |(path, _)| path);
            prop_assert!(!text.contains('#') && !path.contains('\\'));
        }
    }

    #[test]
    fn accepted_headers_are_single_and_unchanged(
        values in proptest::collection::vec(
            (0usize..5, proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
    ) {
        const NAMES: [&str; 5] = ["ssp-traceid", "ssp-from", "ssp-to", "ssp-interactionid", "x-other"];
        let mut headers = HeaderMap::new();
        for (name, value) in &values {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                headers.append(NAMES[*name], v);
            }
        }
        if let Ok(h) = SspHeaders::parse(&headers) {
            for (name, parsed) in NAMES.iter().zip([
                h.trace_id.as_str(), h.from.as_str(), h.to.as_str(), h.interaction.as_str(),
            ]) {
                let all: Vec<_> = headers.get_all(*name).iter().collect();
                prop_assert_eq!(all.len(), 1);
                prop_assert_eq!(all[0].as_bytes(), parsed.as_bytes());
            }
        }
    }

    #[test]
    fn accepted_targets_have_no_dot_segments(path in "(/(\\.|\\.\\.|%2e|a|%2E\\.)){0,5}") {
        // An oracle of its own (RFC 3986 section 3.3: `.` or `..`, percent-encoded dots included), not the
        // parser's helper, so that a wrong helper fails here.
        let dot = |segment: &str| {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            decoded == "." || decoded == ".."
        };
        let text = format!("/https://h{path}");
        match target(&text) {
            Ok(t) => {
                prop_assert!(!t.uri().path().split('/').any(dot), "{text} accepted");
                prop_assert_eq!(t.as_str(), &text[1..]);
            }
            Err(e) => prop_assert!(path.split('/').any(dot), "{text} refused: {e:?}"),
        }
    }
}
