//! NHS numbers in a request body (`audit.patients.read_bodies`): the first [`BODY_BOUND`] bytes of a structured
//! record request (`$gpc.getstructuredrecord`, `$gpc.migratestructuredrecord`) are copied as they stream to the
//! provider (the frames go on unchanged and undelayed) and read, once, when the exchange ends, for every FHIR
//! `Identifier` whose `system` is an NHS number system: the `patientNHSNumber` parameter's `valueIdentifier`, in
//! JSON or XML (GP Connect Access Record: Structured, "Retrieve a patient's structured record").
//!
//! A number past the bound is not read: the copy stops there, so a body costs at most 16 KiB of memory whatever
//! its size.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::{Indexer, NHS_NUMBER_SYSTEMS, PatientRef, Source};

/// Bytes of a body read for numbers.
pub const BODY_BOUND: usize = 16 * 1024;

/// Whether `interaction` (an interaction URN) carries the patient's NHS number in its `Parameters` body.
pub fn carries_patient(interaction: &str) -> bool {
    interaction.contains(":gpc.getstructuredrecord")
        || interaction.contains(":gpc.migratestructuredrecord")
}

/// The start of one request body, shared by the body as it streams (which copies into it) and the transaction
/// (whose response record reads it).
#[derive(Debug)]
pub struct BodyScan {
    indexer: Arc<Indexer>,
    copied: Mutex<Vec<u8>>,
    found: OnceLock<Vec<PatientRef>>,
}

impl BodyScan {
    pub(super) fn new(indexer: Arc<Indexer>) -> Self {
        Self {
            indexer,
            copied: Mutex::new(Vec::new()),
            found: OnceLock::new(),
        }
    }

    /// Copies what of `data` is within the bound; `false` once the bound is reached (no more is wanted).
    pub fn push(&self, data: &[u8]) -> bool {
        if self.found.get().is_some() {
            return false;
        }
        let mut copied = self.copied.lock().unwrap_or_else(PoisonError::into_inner);
        let room = BODY_BOUND - copied.len();
        copied.extend_from_slice(&data[..data.len().min(room)]);
        copied.len() < BODY_BOUND
    }

    /// The numbers in what was copied, read the first time it is asked (when the exchange ends), hashed.
    pub fn found(&self) -> &[PatientRef] {
        self.found.get_or_init(|| {
            let copied =
                std::mem::take(&mut *self.copied.lock().unwrap_or_else(PoisonError::into_inner));
            numbers(&copied)
                .into_iter()
                .map(|number| {
                    let number = super::normalise(&number);
                    PatientRef {
                        hmac: self.indexer.key().digest(&number),
                        check: super::Check::of(&number),
                        source: Source::Body,
                    }
                })
                .collect()
        })
    }
}

/// The NHS numbers (as written) of every `Identifier` with an NHS number system in `body`, a whole body or the
/// start of one, JSON or XML (by its first non-blank byte); repeated numbers once.
pub fn numbers(body: &[u8]) -> Vec<String> {
    // A UTF-8 byte order mark is allowed before JSON text (RFC 8259 section 8.1 lets a parser ignore it) and XML.
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let found = match first {
        Some(b'<') => xml_numbers(body),
        Some(b'{') => json_numbers(body),
        _ => Vec::new(),
    };
    let mut once: Vec<String> = Vec::with_capacity(found.len());
    for number in found {
        if !once.contains(&number) {
            once.push(number);
        }
    }
    once
}

/// JSON: a whole body is parsed with serde_json and every object with a `system` (an NHS number system, any case)
/// and a string `value` is an identifier, however the text was escaped. A body cut at the bound does not parse:
/// then each occurrence of a system string is inside an `Identifier` object, and that object (from the nearest
/// unclosed `{` before it to its matching `}`) is parsed whole, so a cut object is not read.
fn json_numbers(body: &[u8]) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>, depth: usize) {
        match v {
            serde_json::Value::Object(o) if depth < 64 => {
                if let (Some(system), Some(value)) = (
                    o.get("system").and_then(serde_json::Value::as_str),
                    o.get("value").and_then(serde_json::Value::as_str),
                ) && NHS_NUMBER_SYSTEMS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(system))
                {
                    out.push(value.to_owned());
                }
                o.values().for_each(|v| walk(v, out, depth + 1));
            }
            serde_json::Value::Array(a) if depth < 64 => {
                a.iter().for_each(|v| walk(v, out, depth + 1))
            }
            _ => {}
        }
    }
    if let Ok(whole) = serde_json::from_slice::<serde_json::Value>(body) {
        let mut out = Vec::new();
        walk(&whole, &mut out, 0);
        return out;
    }
    cut_json_numbers(body)
}

/// [`json_numbers`] of a body cut short.
fn cut_json_numbers(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Identifier {
        system: String,
        value: String,
    }
    let mut out = Vec::new();
    for system in NHS_NUMBER_SYSTEMS {
        let quoted = format!("\"{system}\"");
        for at in memchr::memmem::find_iter(body, quoted.as_bytes()) {
            let Some(start) = enclosing_open(&body[..at]) else {
                continue;
            };
            let Some(end) = matching_close(&body[start..]) else {
                continue;
            };
            if let Ok(id) = serde_json::from_slice::<Identifier>(&body[start..start + end])
                && id.system == system
            {
                out.push(id.value);
            }
        }
    }
    out
}

/// The offset of the last `{` in `before` not closed within it (braces in strings are rare enough in an
/// `Identifier` to be left to the parse, which then fails).
fn enclosing_open(before: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in before.iter().enumerate().rev() {
        match b {
            b'}' => depth += 1,
            b'{' if depth == 0 => return Some(i),
            b'{' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The length up to and including the `}` that closes the object `from` starts with, strings skipped.
fn matching_close(from: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, b) in from.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// XML (FHIR's XML form): an element whose children include `<system value="..."/>` with an NHS number system and
/// `<value value="..."/>`, read with quick-xml's pull reader; a cut body ends the read where it is cut.
fn xml_numbers(body: &[u8]) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    // Per open element: the `system` and `value` attributes of its children seen so far.
    let mut open: Vec<(Option<String>, Option<String>)> = Vec::new();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let (element, empty) = match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => (e, false),
            Ok(Event::Empty(e)) => (e, true),
            Ok(Event::End(_)) => {
                if let Some((Some(system), Some(value))) = open.pop()
                    && NHS_NUMBER_SYSTEMS
                        .iter()
                        .any(|s| s.eq_ignore_ascii_case(&system))
                {
                    out.push(value);
                }
                continue;
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => continue,
        };
        if open.len() > 64 {
            break;
        }
        let name = element.local_name();
        let value = || {
            element
                .try_get_attribute("value")
                .ok()
                .flatten()
                .and_then(|a| a.unescape_value().ok())
                .map(|v| v.into_owned())
        };
        match (name.as_ref(), open.last_mut()) {
            (b"system", Some(parent)) => parent.0 = value(),
            (b"value", Some(parent)) => parent.1 = value(),
            _ => {}
        }
        if !empty {
            open.push((None, None));
        }
    }
    out
}
