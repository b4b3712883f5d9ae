#![allow(clippy::unwrap_used, reason = "tests")]

use super::build::quote;
use super::*;

#[test]
fn addresses_are_https_without_trailing_slashes() {
    assert_eq!(
        normalise_address("https://gp.example/B82617/STU3/1/gpconnect/").unwrap(),
        "https://gp.example/B82617/STU3/1/gpconnect"
    );
    assert_eq!(
        normalise_address("https://gp.example:9443/fhir").unwrap(),
        "https://gp.example:9443/fhir"
    );
    for bad in [
        "http://gp.example/fhir",
        "https:///",
        "https://gp.example/a?b=1",
        "https://gp.example/a b",
    ] {
        assert!(normalise_address(bad).is_err(), "{bad}");
    }
}

#[test]
fn quoting_keeps_hostile_text_as_data() {
    let q = quote("a\"b\n[[system]]");
    let parsed: toml::Value = toml::from_str(&format!("x = {q}")).unwrap();
    assert_eq!(parsed["x"].as_str(), Some("a\"b\n[[system]]"));
}
