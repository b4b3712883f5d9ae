//! Policy files: whatever the text, compiling returns; a policy it accepts compiles the same way twice and
//! answers questions about itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssp::policy::{Policy, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = Source::from_files(vec![("fuzz.toml".to_owned(), text.to_owned())]);
    match Policy::compile(&source, 1) {
        Ok(policy) => {
            let again = Policy::compile(&source, 1)
                .unwrap_or_else(|e| panic!("second compile failed: {e}"));
            assert_eq!(policy.counts(), again.counts());
            let _ = policy.knows("urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1");
        }
        Err(problems) => assert!(!problems.problems.is_empty(), "refused without a reason"),
    }
});
