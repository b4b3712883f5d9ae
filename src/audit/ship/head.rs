//! Signed chain heads: every `audit.ship.head_interval` the shipper sends the collector the seq and hash of the
//! last record it shipped, with the time and an Ed25519 signature (RFC 8032) by the key in `audit.ship.head_key`.
//! A collector's copy then pins the chain: a local log rewritten after a head was sent no longer has that hash at
//! that seq, whatever was done to the records around it.

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::hex::HexDigest;
use crate::signing::SigningKey;

/// One chain head as sent and as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub instance: String,
    pub seq: u64,
    pub hash: HexDigest,
    /// RFC 3339, UTC, when it was signed.
    pub time: String,
    /// Base64 of the 64-byte signature over [`Head::signed_bytes`].
    pub sig: String,
}

impl Head {
    /// Signs the head of `instance`'s chain at `seq`.
    pub fn sign(key: &SigningKey, instance: &str, seq: u64, hash: HexDigest, time: String) -> Self {
        let mut head = Head {
            instance: instance.to_owned(),
            seq,
            hash,
            time,
            sig: String::new(),
        };
        head.sig = STANDARD.encode(key.sign(&head.signed_bytes()));
        head
    }

    /// What the signature covers: a fixed first line, then instance, seq, hash and time, one a line.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "ssp chain head v1\n{}\n{}\n{}\n{}\n",
            self.instance, self.seq, self.hash, self.time
        )
        .into_bytes()
    }

    /// Whether the signature is by `public_key` (the raw 32 bytes).
    pub fn signed_by(&self, public_key: &[u8]) -> bool {
        let Ok(sig) = STANDARD.decode(&self.sig) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&self.signed_bytes(), &sig)
            .is_ok()
    }

    /// The structured data parameters of the head's message.
    pub fn params(&self) -> [(&'static str, String); 5] {
        [
            ("instance", self.instance.clone()),
            ("seq", self.seq.to_string()),
            ("hash", self.hash.to_string()),
            ("time", self.time.clone()),
            ("sig", self.sig.clone()),
        ]
    }

    /// A head from its structured data parameters (as [`super::syslog::Parsed::param`] gives them).
    pub fn from_params<'p>(param: impl Fn(&str) -> Option<&'p str>) -> Option<Self> {
        Some(Head {
            instance: param("instance")?.to_owned(),
            seq: param("seq")?.parse().ok()?,
            hash: HexDigest::parse(param("hash")?)?,
            time: param("time")?.to_owned(),
            sig: param("sig")?.to_owned(),
        })
    }
}
