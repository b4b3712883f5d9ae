//! Check 10: the `Authorization` header's unsigned GP Connect token, decoded and validated for the 1.x profile.
//! Whatever the bytes, the validator returns an audit; a token it calls valid has no violation.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ssp::ids::InteractionId;
use ssp::jwt::{Expect, Profile, Validator};

const URL: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect";
const INTERACTION: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";

fuzz_target!(|data: &[u8]| {
    let Some(interaction) = InteractionId::parse(INTERACTION) else {
        return;
    };
    for profile in [Profile::GpConnect1, Profile::GpConnect07] {
        let validator = Validator {
            profile,
            max_future_skew: Duration::from_secs(300),
        };
        let expect = Expect {
            endpoint_url: URL,
            interaction: &interaction,
            now: 1_795_000_000,
            keys: None,
        };
        let audit = validator.validate(Some(data), &expect);
        assert_eq!(audit.valid, audit.first_violation().is_none());
    }
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = ssp::jwt::decode(token, None);
    }
});
