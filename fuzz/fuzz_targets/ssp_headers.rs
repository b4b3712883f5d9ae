//! Check 4: the `Ssp-*` headers. The input is read as `name:value` lines (what hyper would hand over after its
//! own parsing); whatever they hold, the parser returns, and what it accepts is exactly one well-formed value each.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ssp::ssp::{HEADER_FROM, HEADER_INTERACTION_ID, HEADER_TO, HEADER_TRACE_ID, SspHeaders};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let Ok(parsed) = SspHeaders::parse(&headers) else {
        return;
    };
    for (name, value) in [
        (HEADER_TRACE_ID, parsed.trace_id.to_string()),
        (HEADER_FROM, parsed.from.to_string()),
        (HEADER_TO, parsed.to.to_string()),
        (HEADER_INTERACTION_ID, parsed.interaction.to_string()),
    ] {
        let all: Vec<_> = headers.get_all(&name).iter().collect();
        assert_eq!(all.len(), 1, "{name} accepted while repeated");
        assert_eq!(all[0].as_bytes(), value.as_bytes(), "{name} changed");
        assert!(
            value.bytes().all(|b| b.is_ascii_graphic()),
            "{name}: {value:?}"
        );
    }
});
