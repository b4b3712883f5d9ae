//! The information-governance evidence pack (`ssp evidence`): a folder an auditor (DSPT, the National Data Sharing
//! Arrangement) checks offline, every file listed with its SHA-256 in `MANIFEST`, which is signed with the
//! operator's Ed25519 key (`[evidence] key`, PKCS#8 PEM) in `MANIFEST.sig`; `ssp evidence verify` re-checks both.
//!
//! Ed25519 (RFC 8032) because its signatures are deterministic: the same log, policy store and key give a pack
//! identical to the byte, which an auditor can regenerate and compare. The public key is in the manifest (so it
//! is signed with it) and its SHA-256 is printed, to compare with the one the operator publishes.
//!
//! - [`pack`]: what goes in the pack, read from the log, the policy store and the config.

pub mod pack;

pub use crate::signing::{SigningKey, read_public_key};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The manifest's name in the pack.
pub const MANIFEST: &str = "MANIFEST";
/// The manifest's signature's name in the pack.
pub const SIGNATURE: &str = "MANIFEST.sig";
/// The manifest's first line.
const MANIFEST_HEADER: &str = "ssp evidence pack manifest v1";

/// SHA-256 (hex) of `bytes`.
fn sha256(bytes: &[u8]) -> String {
    crate::hex::HexDigest::of(bytes).to_string()
}

/// Writes `files` (path in the pack, bytes) into `out` (created; it must be empty or absent), then `MANIFEST` and
/// `MANIFEST.sig`. Paths are relative, `/`-separated, made of `[A-Za-z0-9._-]` parts.
pub fn write_pack(
    out: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    key: &SigningKey,
) -> Result<(), String> {
    let fail = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| fail(out, e))?
            .next()
            .is_some()
    {
        return Err(format!("{}: not empty; give a new folder", out.display()));
    }
    let mut manifest = format!(
        "{MANIFEST_HEADER}\nsigning-key: ed25519 {}\n",
        key.public_base64()
    );
    for (name, bytes) in files {
        let path = out.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| fail(&path, e))?;
        manifest.push_str(&format!("{}  {name}\n", sha256(bytes)));
    }
    let signature = STANDARD.encode(key.sign(manifest.as_bytes()));
    let manifest_path = out.join(MANIFEST);
    std::fs::write(&manifest_path, &manifest).map_err(|e| fail(&manifest_path, e))?;
    let signature_path = out.join(SIGNATURE);
    std::fs::write(&signature_path, format!("{signature}\n")).map_err(|e| fail(&signature_path, e))
}

/// A pack that checks out.
#[derive(Debug)]
pub struct Checked {
    pub files: usize,
    /// SHA-256 (hex) of the raw 32-byte public key that signed it.
    pub key_sha256: String,
}

/// Re-checks the pack in `dir`: `MANIFEST.sig` is a signature over `MANIFEST` by the key the manifest names (and,
/// when `expected_key` is given, that key is it: base64 of the raw key, or a PEM public key file's), every file
/// listed has its hash, and no file is there that is not listed. Every problem, each naming its file.
pub fn verify_pack(dir: &Path, expected_key: Option<&[u8]>) -> Result<Checked, Vec<String>> {
    let manifest_path = dir.join(MANIFEST);
    let manifest = std::fs::read(&manifest_path)
        .map_err(|e| vec![format!("{}: {e}", manifest_path.display())])?;
    let mut problems = Vec::new();
    let signature = std::fs::read_to_string(dir.join(SIGNATURE)).unwrap_or_else(|e| {
        problems.push(format!("{SIGNATURE}: missing or unreadable ({e})"));
        String::new()
    });
    let text = String::from_utf8_lossy(&manifest);
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_HEADER) {
        problems.push(format!(
            "{MANIFEST}: not an ssp evidence manifest (first line)"
        ));
    }
    let public = lines
        .next()
        .and_then(|l| l.strip_prefix("signing-key: ed25519 "))
        .and_then(|k| STANDARD.decode(k).ok())
        .unwrap_or_default();
    let signed = STANDARD.decode(signature.trim()).ok().is_some_and(|sig| {
        signature::UnparsedPublicKey::new(&signature::ED25519, &public)
            .verify(&manifest, &sig)
            .is_ok()
    });
    if !signed && !signature.is_empty() {
        problems.push(format!(
            "{SIGNATURE}: not a signature over {MANIFEST} by the key {MANIFEST} names: one of the two was changed"
        ));
    }
    if let Some(expected) = expected_key
        && expected != public.as_slice()
    {
        problems.push(format!(
            "{MANIFEST}: signed by key sha256 {}, not the key given",
            sha256(&public)
        ));
    }
    let mut listed = BTreeMap::new();
    for line in lines {
        match line.split_once("  ") {
            Some((hash, name)) => {
                listed.insert(name.to_owned(), hash.to_owned());
            }
            None => problems.push(format!("{MANIFEST}: unreadable line {line:?}")),
        }
    }
    let mut present = Vec::new();
    let mut folders = Vec::new();
    let mut links = Vec::new();
    walk(dir, dir, &mut present, &mut folders, &mut links);
    for link in links {
        problems.push(format!("{link}: a symbolic link; a pack holds files only"));
    }
    for folder in folders {
        if !listed
            .keys()
            .any(|name| name.starts_with(&format!("{folder}/")))
        {
            problems.push(format!(
                "{folder}/: a folder {MANIFEST} does not list (added)"
            ));
        }
    }
    for name in &present {
        if name == MANIFEST || name == SIGNATURE {
            continue;
        }
        match listed.get(name) {
            None => problems.push(format!("{name}: not in {MANIFEST} (added)")),
            Some(hash) => match std::fs::read(dir.join(name)) {
                Ok(bytes) if sha256(&bytes) == *hash => {}
                Ok(_) => problems.push(format!(
                    "{name}: changed (its SHA-256 is not the manifest's)"
                )),
                Err(e) => problems.push(format!("{name}: {e}")),
            },
        }
    }
    for name in listed.keys() {
        if !present.contains(name) {
            problems.push(format!("{name}: listed in {MANIFEST} but missing"));
        }
    }
    if problems.is_empty() {
        Ok(Checked {
            files: listed.len(),
            key_sha256: sha256(&public),
        })
    } else {
        Err(problems)
    }
}

/// Every file, folder and symbolic link under `dir`, as `/`-separated paths relative to `root` (links are not
/// followed).
fn walk(
    root: &Path,
    dir: &Path,
    files: &mut Vec<String>,
    folders: &mut Vec<String>,
    links: &mut Vec<String>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let rel = rel.to_string_lossy().replace('\\', "/");
        match entry.file_type() {
            Ok(kind) if kind.is_symlink() => links.push(rel),
            Ok(kind) if kind.is_dir() => {
                folders.push(rel);
                walk(root, &path, files, folders, links);
            }
            _ => files.push(rel),
        }
    }
}
