//! Lower-case hexadecimal: certificate serials and fingerprints, policy hashes, and the SHA-256 digests that chain
//! the audit log. A leaf: it imports nothing from the crate.

use std::fmt;

/// `byte` as two lower-case hexadecimal digits.
pub fn hex_pair(byte: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [
        DIGITS[usize::from(byte >> 4)],
        DIGITS[usize::from(byte & 0xf)],
    ]
}

/// Lower-case hexadecimal of `bytes`: certificate serials and fingerprints, policy hashes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.extend(hex_pair(*b).map(char::from));
    }
    out
}

/// A SHA-256 digest as 64 lower-case hexadecimal digits, held inline: the audit chain makes one per record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexDigest([u8; 64]);

impl HexDigest {
    /// All zeros: the `prev` of the first record of a log.
    pub const GENESIS: HexDigest = HexDigest([b'0'; 64]);

    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(bytes);
        let mut out = [0; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
            pair.copy_from_slice(&hex_pair(b));
        }
        Self(out)
    }

    /// A 32-byte digest (an HMAC-SHA256 tag, say) as hex.
    pub fn from_bytes(digest: &[u8; 32]) -> Self {
        let mut out = [0; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
            pair.copy_from_slice(&hex_pair(*b));
        }
        Self(out)
    }

    /// 64 lower-case hexadecimal digits, as [`HexDigest::as_str`] writes them; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; 64] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Hexadecimal digits only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for HexDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for HexDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digest_is_sha256_in_lower_case_hex() {
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            HexDigest::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(HexDigest::GENESIS.as_str(), "0".repeat(64));
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
