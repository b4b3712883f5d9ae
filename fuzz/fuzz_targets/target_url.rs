//! Check 3: the target URL carried in the request path. Whatever the bytes, the parser returns; what it accepts
//! keeps the properties the policy and the forwarder rely on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssp::ssp::Target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(target) = Target::from_request_path(path) else {
        return;
    };
    let text = target.as_str();
    // Forwarded exactly as sent, to the host the text names.
    assert_eq!(Some(text), path.strip_prefix('/'));
    let rest = text
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("not https: {text:?}"));
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    assert_eq!(target.authority(), authority);
    assert_eq!(
        target.uri().authority().map(|a| a.as_str()),
        Some(authority)
    );
    assert_eq!(target.uri().scheme_str(), Some("https"));
    assert!(!authority.contains('@') && !text.contains('#'));
    assert!(!authority.is_empty());
    // The path is what a provider normalises; the query is data and may hold anything printable.
    let path_only = rest[authority.len()..].split('?').next().unwrap_or("");
    assert!(
        !path_only.contains('\\'),
        "backslash in the path of {text:?}"
    );
    assert!(
        path_only.split('/').all(|s| s != "." && s != ".."),
        "dot segment in {text:?}"
    );
    assert!(
        text.bytes().all(|b| b.is_ascii_graphic()),
        "unprintable byte in {text:?}"
    );
    // Check 9 never panics on what was accepted.
    let _ = target.is_under("https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect");
});
