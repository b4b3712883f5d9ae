//! The patient index's input: the NHS numbers a request names, kept only as `HMAC-SHA256(key, number)`.
//!
//! Numbers are read from what the proxy already sees (see the transaction log guide, "Who accessed this patient"):
//! - the target's query: every parameter value (percent-decoded, a comma-separated list read item by item) of the
//!   form `<system>|<number>` where the system is an NHS number system ([`NHS_NUMBER_SYSTEMS`]), in any parameter
//!   (`identifier`, `subject:Patient.identifier`, `patient.identifier`, ...);
//! - the target's path: a segment right after a `Patient` segment that is ten digits (the patient-facing APIs and
//!   some providers use the NHS number as the Patient's logical id);
//! - with `audit.patients.read_bodies`, the first 16 KiB of a structured record request's `Parameters` body
//!   ([`body`]).
//!
//! A number is normalised (spaces removed) before it is hashed; ten digits are checked against the modulus 11
//! check digit (NHS Data Dictionary, "NHS Number"), and the record says `valid`, `invalid_check_digit` or
//! `malformed`, so a mistyped number is still found by the number as typed. With `audit.patients.redact`, the
//! record's `target` has `hmac:<hex>` where the number was ([`Found::redacted`]).

pub mod body;
pub mod index;
pub mod lookup;
pub mod trail;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

pub use crate::config::PatientsConfig;
use crate::hex::HexDigest;

/// The identifier systems of an NHS number: FHIR STU3 (GP Connect 1.x) and DSTU2 (GP Connect 0.x).
pub const NHS_NUMBER_SYSTEMS: [&str; 2] = [
    "https://fhir.nhs.uk/Id/nhs-number",
    "http://fhir.nhs.net/Id/nhs-number",
];

/// Shortest patient key (bytes): the HMAC-SHA256 key should be as long as its output (RFC 2104 section 3).
pub const MIN_KEY_BYTES: usize = 32;
/// Longest patient key file (bytes).
const MAX_KEY_BYTES: usize = 1024;
/// Longest number value hashed (bytes, after normalisation); a longer value is hashed as its first 64 bytes.
const MAX_NUMBER_BYTES: usize = 64;

/// The HMAC key of the patient index: read from its own file, never logged, never printed.
pub struct PatientKey {
    /// Keyed once: each number's HMAC starts from a copy of this state.
    mac: hmac::Hmac<sha2::Sha256>,
    /// The first 8 hex digits of the HMAC of a fixed label: names the key in records and the index without
    /// revealing it, so that a lookup with another key is refused rather than answered with nothing. Shared by
    /// every transaction that names a patient.
    id: Arc<str>,
}

impl std::fmt::Debug for PatientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatientKey").field("id", &self.id).finish()
    }
}

impl PatientKey {
    /// Reads the key at `path`: its bytes as they are, 32 to 1024 of them; the file must not be readable, writable
    /// or executable by group or others (mode 0400 or 0600). Errors name the path and what is wrong, never the key.
    pub fn load(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a file", path.display()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: mode {mode:04o} lets group or others read it; the patient key must be 0400 (chmod 0400)",
                path.display()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if bytes.len() < MIN_KEY_BYTES || bytes.len() > MAX_KEY_BYTES {
            return Err(format!(
                "{}: {} bytes; a patient key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes \
                 (head -c 32 /dev/urandom > FILE)",
                path.display(),
                bytes.len()
            ));
        }
        Self::from_bytes(&bytes).map_err(|why| format!("{}: {why}", path.display()))
    }

    /// A key from its bytes. HMAC takes a key of any length (RFC 2104 section 2), so the error is the library's
    /// only.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        use hmac::Mac;
        let mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(bytes)
            .map_err(|e| format!("the key is not usable for HMAC-SHA256: {e}"))?;
        let mut id = mac.clone();
        id.update(b"ssp patient index key id");
        let id = crate::hex::hex(&id.finalize().into_bytes()[..4]).into();
        Ok(Self { mac, id })
    }

    /// The key's id: 8 hex digits.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id, shared.
    pub(crate) fn shared_id(&self) -> &Arc<str> {
        &self.id
    }

    /// `HMAC-SHA256(key, number)` as 64 hex digits, of the number as normalised by [`normalise`].
    pub fn hmac(&self, number: &str) -> String {
        self.digest(number).to_string()
    }

    /// As [`PatientKey::hmac`], held inline (no allocation).
    pub fn digest(&self, number: &str) -> HexDigest {
        use hmac::Mac;
        let mut mac = self.mac.clone();
        mac.update(number.as_bytes());
        HexDigest::from_bytes(&mac.finalize().into_bytes().into())
    }
}

/// What a number looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Ten digits whose last is the modulus 11 check digit of the first nine.
    Valid,
    /// Ten digits whose check digit is wrong.
    InvalidCheckDigit,
    /// Not ten digits.
    Malformed,
}

impl Check {
    /// Of a normalised number.
    pub fn of(number: &str) -> Self {
        let digits = number.as_bytes();
        if digits.len() != 10 || !digits.iter().all(u8::is_ascii_digit) {
            return Check::Malformed;
        }
        // NHS Data Dictionary, "NHS Number": weights 10 down to 2 on the first nine digits; 11 minus the sum's
        // remainder mod 11 is the check digit, 11 counting as 0 and 10 never valid.
        let sum: u32 = digits[..9]
            .iter()
            .zip((2..=10).rev())
            .map(|(d, w)| u32::from(d - b'0') * w)
            .sum();
        let check = match 11 - sum % 11 {
            11 => 0,
            10 => return Check::InvalidCheckDigit,
            c => c,
        };
        if u32::from(digits[9] - b'0') == check {
            Check::Valid
        } else {
            Check::InvalidCheckDigit
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Valid => "valid",
            Check::InvalidCheckDigit => "invalid_check_digit",
            Check::Malformed => "malformed",
        }
    }
}

/// Where in the request a number was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Query,
    Path,
    Body,
    /// A patient-facing request's access token (`patient_facing`): the patient the token was issued for.
    Token,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Query => "query",
            Source::Path => "path",
            Source::Body => "body",
            Source::Token => "token",
        }
    }
}

/// One number a request named, as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRef {
    /// `HMAC-SHA256(key, number)`: 64 hex digits.
    pub hmac: HexDigest,
    pub check: Check,
    pub source: Source,
}

/// The numbers of one request's target, and the target as a redacting record writes it.
#[derive(Debug, Default)]
pub struct Found {
    pub refs: Vec<PatientRef>,
    /// With `redact`, the target with `hmac:<hex>` in place of each number; `None` when nothing was redacted.
    pub redacted: Option<String>,
}

/// Reads and hashes the numbers of requests; one per process, shared.
#[derive(Debug)]
pub struct Indexer {
    key: PatientKey,
    redact: bool,
    read_bodies: bool,
}

impl Indexer {
    pub fn new(key: PatientKey, config: &PatientsConfig) -> Arc<Self> {
        Arc::new(Self {
            key,
            redact: config.redact,
            read_bodies: config.read_bodies,
        })
    }

    pub fn key(&self) -> &PatientKey {
        &self.key
    }

    /// The numbers in `target` (an origin-form path and query, or an absolute URL), hashed, with the redacted
    /// target when `redact` is on and a number was found. Costs a byte search when no NHS number system or
    /// `Patient/` segment is in the target.
    pub fn target(&self, target: &str) -> Found {
        let mut found = Found::default();
        let Found { refs, redacted } = &mut found;
        let mut copied = 0;
        let mut one =
            |out: &mut Option<&mut String>, prefix: &str, number: &str, source: Source| {
                let number = normalised(number);
                let hmac = self.key.digest(&number);
                if let Some(out) = out {
                    out.push_str(prefix);
                    out.push_str("hmac:");
                    out.push_str(hmac.as_str());
                }
                refs.push(PatientRef {
                    hmac,
                    check: Check::of(&number),
                    source,
                });
            };
        scan_target(target, |span| {
            // Redacting: the text up to the span as it was, then the span's replacement, written in place.
            let mut out = self.redact.then(|| {
                let out = redacted.get_or_insert_with(|| String::with_capacity(target.len() + 128));
                out.push_str(&target[copied..span.start]);
                copied = span.end;
                out
            });
            match &span.piece {
                Piece::Path(number) => one(&mut out, "", number, Source::Path),
                Piece::Item { prefix, number } => one(&mut out, prefix, number, Source::Query),
                Piece::List {
                    decoded,
                    identifier,
                } => {
                    for (i, item) in decoded.split(',').enumerate() {
                        if i > 0
                            && let Some(out) = &mut out
                        {
                            out.push(',');
                        }
                        match candidate(item, *identifier) {
                            Some((prefix, number)) => one(&mut out, prefix, number, Source::Query),
                            None => {
                                if let Some(out) = &mut out {
                                    out.push_str(item);
                                }
                            }
                        }
                    }
                }
            }
        });
        if let Some(out) = redacted {
            out.push_str(&target[copied..]);
        }
        found
    }

    /// The NHS numbers `target` names (normalised, as found: valid or not), by the rules of [`Indexer::target`],
    /// without a key: the patient-facing door refuses a request naming a patient other than its token's.
    pub fn numbers_in(target: &str) -> Vec<String> {
        let mut numbers = Vec::new();
        scan_target(target, |span| match &span.piece {
            Piece::Path(number) => numbers.push(normalised(number).into_owned()),
            Piece::Item { number, .. } => numbers.push(normalised(number).into_owned()),
            Piece::List {
                decoded,
                identifier,
            } => numbers.extend(
                decoded
                    .split(',')
                    .filter_map(|item| candidate(item, *identifier))
                    .map(|(_, number)| normalised(number).into_owned()),
            ),
        });
        numbers
    }

    /// `text` (a refusal's reason, which may quote the target) with each NHS number it holds replaced as the
    /// redacted target has it; `text` itself when `redact` is off or it holds none.
    pub fn redact_text(&self, text: String) -> String {
        if !self.redact {
            return text;
        }
        match self.target(&text).redacted {
            Some(redacted) => redacted,
            None => text,
        }
    }

    /// A body reader for a request of `interaction`, when `read_bodies` is on and the interaction carries the
    /// number in its `Parameters` body.
    pub fn body(self: &Arc<Self>, interaction: &str) -> Option<Arc<body::BodyScan>> {
        (self.read_bodies && body::carries_patient(interaction))
            .then(|| Arc::new(body::BodyScan::new(Arc::clone(self))))
    }
}

/// A part of a target that names patients: its byte range (replaced whole when redacting) and what is in it.
#[derive(Debug, PartialEq, Eq)]
struct Span<'t> {
    start: usize,
    end: usize,
    piece: Piece<'t>,
}

#[derive(Debug, PartialEq, Eq)]
enum Piece<'t> {
    /// A path segment that is a number.
    Path(Cow<'t, str>),
    /// One query item, as sent (no escapes): `prefix` (`<system>|`, `|` or nothing) and the number after it.
    Item { prefix: &'t str, number: &'t str },
    /// A whole query value with escapes, decoded: a comma-separated list (`%2C` included) read item by item.
    List { decoded: String, identifier: bool },
}

/// Every part of `target` that names patients, in order, handed to `each`.
fn scan_target<'t>(target: &'t str, mut each: impl FnMut(Span<'t>)) {
    let (path, query) = match target.find('?') {
        Some(q) => (&target[..q], Some((q + 1, &target[q + 1..]))),
        None => (target, None),
    };
    // The fast way out: no `Patient` segment in the path and nothing that could be (or encode) an NHS number
    // system or an identifier parameter in the query. (`str::contains`, not a memchr `Finder`: building one per
    // call costs more than searching a short target.)
    if path.contains("Patient") {
        let mut at = 0;
        let mut after_patient = false;
        for segment in path.split('/') {
            // Ten digits, or their percent-encoding: at most 30 bytes.
            if after_patient && segment.len() <= 30 {
                let decoded = decode(segment);
                if decoded.len() == 10 && decoded.bytes().all(|b| b.is_ascii_digit()) {
                    each(Span {
                        start: at,
                        end: at + segment.len(),
                        piece: Piece::Path(decoded),
                    });
                }
            }
            after_patient = segment == "Patient";
            at += segment.len() + 1;
        }
    }
    let Some((offset, query)) = query else {
        return;
    };
    if !query.contains('%')
        && !query.contains("identifier")
        && !contains_nocase(query, "nhs-number")
    {
        return;
    }
    let mut at = offset;
    for pair in query.split('&') {
        if let Some(eq) = pair.find('=') {
            let name = decode(&pair[..eq]);
            // A token search on an identifier (`identifier`, `subject:Patient.identifier`, ...) may give the
            // number without its system (FHIR R4 3.1.1.4.6): a bare ten-digit code there is taken as one too.
            // With its modifiers (`identifier:exact`, `identifier:not`) and chains (`subject:Patient.identifier`).
            let identifier = name
                .split(':')
                .any(|part| part == "identifier" || part.ends_with(".identifier"));
            let value_start = at + eq + 1;
            let raw = &pair[eq + 1..];
            if raw.contains(['%', '+']) {
                let decoded = decode(raw);
                if decoded
                    .split(',')
                    .any(|item| candidate(item, identifier).is_some())
                {
                    each(Span {
                        start: value_start,
                        end: value_start + raw.len(),
                        piece: Piece::List {
                            decoded: decoded.into_owned(),
                            identifier,
                        },
                    });
                }
            } else {
                let mut item_at = value_start;
                for item in raw.split(',') {
                    if let Some((prefix, number)) = candidate(item, identifier) {
                        each(Span {
                            start: item_at,
                            end: item_at + item.len(),
                            piece: Piece::Item { prefix, number },
                        });
                    }
                    item_at += item.len() + 1;
                }
            }
        }
        at += pair.len() + 1;
    }
}

/// Whether `text` holds `word` (ASCII, any case).
fn contains_nocase(text: &str, word: &str) -> bool {
    text.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
}

/// An item of a token search that names an NHS number: `<NHS number system>|N` (the system's case ignored: a
/// URI's scheme and host are case-insensitive, RFC 3986 section 6.2.2.1), or, in an identifier parameter, `|N` or
/// a bare `N` of ten digits. The text kept before the number, and the number as sent.
fn candidate(item: &str, identifier: bool) -> Option<(&str, &str)> {
    // Spaces are allowed between the digits, as NHS numbers are often written (`943 476 5919`).
    let ten_digits = |n: &str| {
        n.bytes().all(|b| b.is_ascii_digit() || b == b' ')
            && n.bytes().filter(u8::is_ascii_digit).count() == 10
    };
    match item.rfind('|') {
        Some(bar) => {
            let (system, number) = (&item[..bar], &item[bar + 1..]);
            let nhs = NHS_NUMBER_SYSTEMS
                .iter()
                .any(|s| s.eq_ignore_ascii_case(system));
            (nhs || (identifier && system.is_empty() && ten_digits(number)))
                .then(|| (&item[..=bar], number))
        }
        None => (identifier && ten_digits(item)).then_some(("", item)),
    }
}

/// [`normalise`], borrowing `number` when it needs no change.
fn normalised(number: &str) -> Cow<'_, str> {
    if number.len() <= MAX_NUMBER_BYTES && !number.contains(' ') {
        Cow::Borrowed(number)
    } else {
        Cow::Owned(normalise(number))
    }
}

/// A number as hashed: ASCII spaces removed, at most 64 bytes.
pub fn normalise(number: &str) -> String {
    let mut out: String = number.chars().filter(|c| *c != ' ').collect();
    if out.len() > MAX_NUMBER_BYTES {
        let end = (0..=MAX_NUMBER_BYTES)
            .rev()
            .find(|i| out.is_char_boundary(*i))
            .unwrap_or(0);
        out.truncate(end);
    }
    out
}

/// Percent-decoded (RFC 3986 section 2.1), and `+` as a space in a query (HTML form encoding); lossy UTF-8.
fn decode(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(text);
    }
    let plus = text.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests;
