//! Ed25519 keys (RFC 8032) of the operator: PKCS#8 PEM private keys as `openssl genpkey -algorithm ed25519`
//! writes them, and public keys as an auditor is given them. Deterministic signatures: the same bytes and key
//! always give the same signature.

use std::path::Path;

use aws_lc_rs::signature::{self, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// An Ed25519 private key: it signs evidence packs' manifests (`[evidence] key`) and the shipped chain heads
/// (`audit.ship.head_key`).
pub struct SigningKey {
    pair: signature::Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public_base64())
            .finish()
    }
}

impl SigningKey {
    /// Reads an Ed25519 private key (PKCS#8 v1 or v2, PEM, as `openssl genpkey -algorithm ed25519` writes it);
    /// the file must not be readable by group or others. Errors name the file, never the key.
    pub fn load(path: &Path) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: mode {mode:04o} lets group or others read it; chmod 0400",
                path.display()
            ));
        }
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| {
            let encrypted = std::fs::read_to_string(path)
                .is_ok_and(|t| t.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
            if encrypted {
                format!(
                    "{}: an encrypted key; the proxy reads keys unencrypted (protected by their mode): \
                     `openssl pkey -in KEY -out PLAIN`",
                    path.display()
                )
            } else {
                format!("{}: not a PKCS#8 PEM private key: {e}", path.display())
            }
        })?;
        let pair = signature::Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("{}: not an Ed25519 key: {e}", path.display()))?;
        Ok(Self { pair })
    }

    /// Base64 of the raw public key, as a manifest and a chain head name it.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }

    /// The raw 32-byte public key (RFC 8032 section 5.1.5).
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// The 64-byte Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// The raw 32-byte key of a `--public-key` file: base64 of the raw key, or a PEM `PUBLIC KEY` (SPKI) whose last
/// 32 bytes it is (RFC 8410 section 4).
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw = match rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes()) {
        Ok(spki) => spki
            .as_ref()
            .get(spki.as_ref().len().saturating_sub(32)..)
            .map(<[u8]>::to_vec),
        Err(_) => STANDARD.decode(text.trim()).ok(),
    };
    raw.filter(|k| k.len() == 32)
        .ok_or_else(|| format!("{}: not an Ed25519 public key", path.display()))
}
