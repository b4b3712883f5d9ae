//! Identifier newtypes: `Asid`, `TraceId`, `InteractionId`, `OdsCode` and the consumer's `PeerIdentity`; and the
//! maps and sets keyed by them (`IdMap`, `IdSet`).
//!
//! Each one is parsed strictly from untrusted text exactly once; after that the type says it is well formed, and
//! `Ssp-From` cannot be passed where `Ssp-To` is expected. This module is a leaf: it depends on nothing else in
//! the crate.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use http::HeaderValue;

/// A map keyed by identifiers, as the checks look them up on every request (the directory, the agreements, the
/// limits, the provider pool): hashed with foldhash, hashbrown's default hasher, seeded per process, which costs a
/// fraction of std's SipHash on keys this short. Its tables are filled from policy files and registered systems
/// only, so a consumer's identifiers are looked up in them but never added: colliding keys cannot lengthen a probe.
pub type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A set of identifiers, as [`IdMap`].
pub type IdSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Longest ASID accepted. Real ASIDs are 12 digits; the limit only bounds hostile input.
const MAX_ASID_LEN: usize = 20;
/// Longest interaction URN accepted (the longest GP Connect one is under 80 characters).
const MAX_URN_LEN: usize = 256;
/// Longest ODS code accepted (ODS codes are 3 to 10 characters in practice).
const MAX_ODS_LEN: usize = 16;

/// The text of an identifier read from a header field: it shares the field's bytes (a reference count, not a
/// copy), so that a request's identifiers go from the parsed head to the checks and the audit record without being
/// copied. Identifiers from policy text hold a copy. Always ASCII: every identifier is checked before one is made.
/// Hashes, compares and orders as its text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FieldText(HeaderValue);

impl FieldText {
    /// A copy of `text`, when `valid` accepts it.
    fn copy(text: &str, valid: fn(&str) -> bool) -> Option<Self> {
        if !valid(text) {
            return None;
        }
        HeaderValue::from_str(text).ok().map(Self)
    }

    /// A header field's value, sharing its bytes, when it is visible ASCII and `valid` accepts it.
    fn shared(value: &HeaderValue, valid: fn(&str) -> bool) -> Option<Self> {
        value.to_str().is_ok_and(valid).then(|| Self(value.clone()))
    }

    fn as_str(&self) -> &str {
        // ASCII by construction, so this never fails; std's check is word-at-a-time for ASCII.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or_default()
    }
}

impl Hash for FieldText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// An Accredited System ID: the directory's identifier for a consumer or provider system (`Ssp-From`, `Ssp-To`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Asid(FieldText);

impl Asid {
    /// Parses an ASID: ASCII digits only, 1 to 20 of them.
    pub fn parse(text: &str) -> Option<Self> {
        FieldText::copy(text, Self::valid).map(Self)
    }

    /// `0`: a well-formed ASID no directory registers, in place of a refused config value.
    pub(crate) fn placeholder() -> Self {
        Self(FieldText(HeaderValue::from_static("0")))
    }

    /// An ASID from a header field, sharing its bytes.
    pub(crate) fn from_field(value: &HeaderValue) -> Option<Self> {
        FieldText::shared(value, Self::valid).map(Self)
    }

    fn valid(text: &str) -> bool {
        !text.is_empty() && text.len() <= MAX_ASID_LEN && text.bytes().all(|b| b.is_ascii_digit())
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// A GUID as carried by `Ssp-TraceID`, kept in the text form the consumer sent (hyphenated, either case).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceId(FieldText);

impl TraceId {
    /// Parses the 8-4-4-4-12 hexadecimal GUID form, nothing else (no braces, no URN prefix).
    pub fn parse(text: &str) -> Option<Self> {
        FieldText::copy(text, Self::valid).map(Self)
    }

    /// A trace id from a header field, sharing its bytes.
    pub(crate) fn from_field(value: &HeaderValue) -> Option<Self> {
        FieldText::shared(value, Self::valid).map(Self)
    }

    fn valid(text: &str) -> bool {
        let bytes = text.as_bytes();
        bytes.len() == 36
            && bytes.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
    }

    /// A fresh random (version 4) GUID.
    pub fn new_random() -> Self {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        Self(FieldText(HeaderValue::from_str(text).unwrap_or_else(
            |_| HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
        )))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// A business interaction URN (`Ssp-InteractionID`), e.g.
/// `urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InteractionId(FieldText);

impl InteractionId {
    /// Parses a URN: the `urn:` prefix (lower case, as every NHS interaction is written), then at most 256
    /// characters from the RFC 8141 URN character set.
    pub fn parse(text: &str) -> Option<Self> {
        FieldText::copy(text, Self::valid).map(Self)
    }

    /// `urn:invalid`: a well-formed interaction no directory names, in place of a refused config value.
    pub(crate) fn placeholder() -> Self {
        Self(FieldText(HeaderValue::from_static("urn:invalid")))
    }

    /// An interaction from a header field, sharing its bytes.
    pub(crate) fn from_field(value: &HeaderValue) -> Option<Self> {
        FieldText::shared(value, Self::valid).map(Self)
    }

    fn valid(text: &str) -> bool {
        text.strip_prefix("urn:").is_some_and(|rest| {
            !rest.is_empty()
                && text.len() <= MAX_URN_LEN
                && rest.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b':' | b'.' | b'-' | b'_' | b'+' | b'$' | b'%' | b'/' | b'(' | b')'
                        )
                })
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// An ODS organisation code (e.g. `B82617`): letters and digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OdsCode(Arc<str>);

impl OdsCode {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let ok = !text.is_empty()
            && text.len() <= MAX_ODS_LEN
            && text.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| Self(Arc::from(text)))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! text_newtype_fmt {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.as_str())
            }
        }
    )*};
}
text_newtype_fmt!(Asid, TraceId, InteractionId, OdsCode);

/// Lets a set of interactions be searched by `&str` (for metric labels) without building an `InteractionId`;
/// hashing and equality are those of the text either way.
impl std::borrow::Borrow<str> for InteractionId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Who is at the other end of a consumer connection, read once from the client certificate right after the
/// handshake and shared by every request on that connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate subject as an RFC 4514-style string, for the audit trail.
    pub subject: String,
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// DNS names from the subjectAltName extension.
    pub dns_sans: Vec<String>,
    /// The serial number in lower-case hexadecimal.
    pub serial: String,
    /// SHA-256 of the DER certificate, lower-case hexadecimal.
    pub fingerprint_sha256: String,
    /// The issuer's name as an RFC 4514-style string (the credential radar notices a change of CA).
    pub issuer: String,
    /// The certificate's notAfter, Unix seconds.
    pub not_after: i64,
}

impl PeerIdentity {
    /// True when the certificate's CN or one of its DNS SANs equals `fqdn` (DNS names compare case-insensitively).
    pub(crate) fn has_fqdn(&self, fqdn: &str) -> bool {
        self.common_name
            .iter()
            .chain(self.dns_sans.iter())
            .any(|name| name.eq_ignore_ascii_case(fqdn))
    }

    /// The names check 5 compares: the CN, then the DNS SANs, each once (DNS names compare case-insensitively).
    pub(crate) fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for name in self.common_name.iter().chain(self.dns_sans.iter()) {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                names.push(name);
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Identifiers read from header fields share the fields' bytes; they hash, compare and print as their text
    /// whichever way they were made.
    #[test]
    fn identifiers_from_fields_share_their_bytes() {
        let urn = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
        let field = HeaderValue::from_static(urn);
        let interaction = InteractionId::from_field(&field).unwrap();
        assert_eq!(interaction.as_str().as_ptr(), field.as_bytes().as_ptr());
        assert_eq!(interaction, InteractionId::parse(urn).unwrap());
        let set = std::collections::HashSet::from([InteractionId::parse(urn).unwrap()]);
        assert!(set.contains(urn) && set.contains(&interaction));
        let asid = HeaderValue::from_static("200000000359");
        assert_eq!(
            Asid::from_field(&asid).unwrap().as_str().as_ptr(),
            asid.as_bytes().as_ptr()
        );
        assert!(Asid::from_field(&HeaderValue::from_static("20000000035x")).is_none());
        assert!(TraceId::from_field(&HeaderValue::from_bytes(b"\xff").unwrap()).is_none());
        let trace = TraceId::new_random();
        assert_eq!(
            format!("{trace:?}"),
            format!("TraceId({:?})", trace.as_str())
        );
    }

    #[test]
    fn asid_accepts_digits_only() {
        assert!(Asid::parse("200000000359").is_some());
        assert!(Asid::parse("").is_none());
        assert!(Asid::parse("20000000035a").is_none());
        assert!(Asid::parse(" 200000000359").is_none());
        assert!(Asid::parse(&"1".repeat(21)).is_none());
    }

    #[test]
    fn trace_id_is_a_hyphenated_guid() {
        assert!(TraceId::parse("629ea9ba-a077-4d99-b289-7a9b19fd4e03").is_some());
        assert!(TraceId::parse("629EA9BA-A077-4D99-B289-7A9B19FD4E03").is_some());
        assert!(TraceId::parse("{629ea9ba-a077-4d99-b289-7a9b19fd4e03}").is_none());
        assert!(TraceId::parse("629ea9baa0774d99b2897a9b19fd4e03").is_none());
        assert!(TraceId::parse("629ea9ba-a077-4d99-b289-7a9b19fd4e0g").is_none());
        assert!(TraceId::parse(TraceId::new_random().as_str()).is_some());
    }

    #[test]
    fn interaction_is_a_urn() {
        assert!(
            InteractionId::parse("urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1")
                .is_some()
        );
        assert!(
            InteractionId::parse(
                "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1"
            )
            .is_some()
        );
        assert!(InteractionId::parse("urn:").is_none());
        assert!(InteractionId::parse("nhs:names").is_none());
        assert!(InteractionId::parse("urn:a b").is_none());
        assert!(InteractionId::parse(&format!("urn:{}", "a".repeat(300))).is_none());
    }

    #[test]
    fn fqdn_matches_cn_or_san_case_insensitively() {
        let peer = PeerIdentity {
            subject: "CN=consumer.dev.localhost".into(),
            common_name: Some("consumer.dev.localhost".into()),
            dns_sans: vec!["alt.dev.localhost".into()],
            serial: "01".into(),
            fingerprint_sha256: "00".into(),
            issuer: "CN=Test CA".into(),
            not_after: 0,
        };
        assert!(peer.has_fqdn("CONSUMER.dev.localhost"));
        assert!(peer.has_fqdn("alt.dev.localhost"));
        assert!(!peer.has_fqdn("other.dev.localhost"));
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_round_trip(s in ".{0,64}") {
            if let Some(a) = Asid::parse(&s) { prop_assert_eq!(a.as_str(), s.as_str()); }
            if let Some(t) = TraceId::parse(&s) { prop_assert_eq!(t.as_str(), s.as_str()); }
            if let Some(i) = InteractionId::parse(&s) { prop_assert_eq!(i.as_str(), s.as_str()); }
        }
    }
}
