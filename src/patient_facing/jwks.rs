//! The access tokens' verifying keys: a JWKS (RFC 7517) from a file or an `https` URL, fetched again every
//! `jwks_refresh`, each key usable until `jwks_stale` after the last fetch that listed it. So a key removed from
//! the set stops verifying one stale period after it was last seen, and a set that cannot be fetched keeps
//! working for that long, no longer. A token naming a `kid` the set does not hold triggers at most one fetch per
//! refresh interval besides the periodic fetches (single flight), so that a key the issuer adds is taken up at
//! its first token, and a stream of tokens with invented `kid`s cannot make the proxy hammer the key server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{JwksSource, PatientFacingConfig};
use crate::oneshot;

/// Largest JWKS read: a few dozen keys are well under it.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest `kid` kept.
const MAX_KID: usize = 256;
/// Most keys kept from one set.
const MAX_KEYS: usize = 64;

/// One verifying key.
#[derive(Clone)]
pub(super) struct Key {
    pub(super) key: jsonwebtoken::DecodingKey,
    /// The JWK's own `alg`, when it names one: a token must then use exactly it (RFC 7517 section 4.4).
    pub(super) alg: Option<jsonwebtoken::Algorithm>,
    /// RSA (`RS256`, `RS512`) or EC P-256 (`ES256`).
    pub(super) rsa: bool,
    /// The last successful fetch that listed it.
    seen: Instant,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("alg", &self.alg)
            .field("rsa", &self.rsa)
            .finish_non_exhaustive()
    }
}

/// The keys by `kid`.
#[derive(Debug, Default)]
struct KeySet {
    keys: HashMap<String, Key>,
}

/// What looking a `kid` up found.
#[derive(Debug)]
pub(super) enum Found {
    Key(Key),
    /// Not in the set, or last seen longer ago than the stale period.
    Unknown,
}

/// The key cache of one patient-facing listener.
pub(super) struct Jwks {
    source: JwksSource,
    tls: Arc<rustls::ClientConfig>,
    resolve: Arc<oneshot::Resolve>,
    refresh: Duration,
    stale: Duration,
    timeout: Duration,
    set: ArcSwap<KeySet>,
    /// When an unknown `kid` last started a fetch, for the one-per-interval rule (the periodic refresh does not
    /// count: a key added just after it must not wait for the next).
    last_kid_fetch: Mutex<Option<Instant>>,
    /// Single flight for the fetch an unknown `kid` triggers.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("keys", &self.set.load().keys.len())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    pub(super) fn new(
        cfg: &PatientFacingConfig,
        tls: Arc<rustls::ClientConfig>,
        resolve: Arc<oneshot::Resolve>,
    ) -> Self {
        Self {
            source: cfg.jwks.clone(),
            tls,
            resolve,
            refresh: cfg.jwks_refresh,
            stale: cfg.jwks_stale,
            timeout: cfg.token_timeout,
            set: ArcSwap::default(),
            last_kid_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key `kid` names, if it is in the set and not stale.
    pub(super) fn get(&self, kid: &str) -> Found {
        match self.set.load().keys.get(kid) {
            Some(key) if key.seen.elapsed() <= self.stale => Found::Key(key.clone()),
            _ => Found::Unknown,
        }
    }

    /// No key is usable: the set was never fetched, or every key in it went stale.
    pub(super) fn is_empty(&self) -> bool {
        !self
            .set
            .load()
            .keys
            .values()
            .any(|k| k.seen.elapsed() <= self.stale)
    }

    /// The key `kid` names, fetching the set again first if it is unknown and no fetch was started within the
    /// refresh interval.
    pub(super) async fn get_or_fetch(&self, kid: &str) -> Found {
        if let found @ Found::Key(_) = self.get(kid) {
            return found;
        }
        let _one = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        if let found @ Found::Key(_) = self.get(kid) {
            return found;
        }
        if self.may_fetch_for_kid() {
            tracing::info!("access token names a key id not in the JWKS; fetching the JWKS again");
            if let Err(error) = self.fetch().await {
                tracing::warn!(%error, "JWKS fetch for an unknown key id failed");
            }
        }
        self.get(kid)
    }

    /// True, and the time noted, when no unknown `kid` started a fetch within the refresh interval.
    fn may_fetch_for_kid(&self) -> bool {
        let mut last = self
            .last_kid_fetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < self.refresh) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Fetches the set and puts it in force (keys it no longer lists stay until they go stale). Errors: the
    /// source could not be read, or holds no usable key; the set in force stays.
    pub(super) async fn fetch(&self) -> Result<usize, String> {
        let bytes = match &self.source {
            JwksSource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    super::read_bounded(&path, MAX_JWKS_BYTES as u64)
                })
                .await
                .map_err(|e| e.to_string())??
                .into()
            }
            JwksSource::Url(url) => {
                let answer = oneshot::call(
                    Arc::clone(&self.tls),
                    &self.resolve,
                    oneshot::Call {
                        url,
                        headers: &[("accept", "application/json")],
                        form: None,
                        max_bytes: MAX_JWKS_BYTES,
                        timeout: self.timeout,
                    },
                )
                .await?;
                if answer.status != http::StatusCode::OK {
                    return Err(format!("{url}: answered {}", answer.status));
                }
                answer.body
            }
        };
        let fresh = parse(&bytes)?;
        let now = Instant::now();
        let count = fresh.len();
        let old = self.set.load_full();
        let mut keys: HashMap<String, Key> = old
            .keys
            .iter()
            .filter(|(_, k)| k.seen.elapsed() <= self.stale)
            .map(|(kid, k)| (kid.clone(), k.clone()))
            .collect();
        for (kid, mut key) in fresh {
            key.seen = now;
            keys.insert(kid, key);
        }
        self.set.store(Arc::new(KeySet { keys }));
        Ok(count)
    }

    /// Fetches the set every refresh interval, for as long as the process runs; failures are logged (the first of
    /// a run of them as a warning) and the keys in force stay until they go stale.
    pub(super) async fn refresh_forever(self: Arc<Self>) {
        let mut failing = false;
        loop {
            tokio::time::sleep(self.refresh).await;
            match self.fetch().await {
                Ok(count) => {
                    if failing {
                        tracing::info!(keys = count, "JWKS fetched again after failures");
                    }
                    failing = false;
                }
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, stale_s = self.stale.as_secs(), "JWKS fetch failed; the keys in force stay until they go stale");
                }
                Err(error) => tracing::debug!(%error, "JWKS fetch failed again"),
            }
        }
    }
}

/// The usable keys in the JWKS file at `path`, counted (for `check-config` and start). Errors name the file.
pub(super) fn check_file(path: &std::path::Path) -> Result<usize, String> {
    let bytes = super::read_bounded(path, MAX_JWKS_BYTES as u64)?;
    parse(&bytes)
        .map(|keys| keys.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The usable keys of a JWKS document: RSA and EC P-256 signing keys with a `kid`. Keys for other uses
/// (`use: enc`) or of other types are left out; a set with none usable is an error.
fn parse(bytes: &[u8]) -> Result<Vec<(String, Key)>, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, PublicKeyUse};
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in set.keys.iter().take(MAX_KEYS) {
        let Some(kid) = jwk
            .common
            .key_id
            .as_ref()
            .filter(|k| !k.is_empty() && k.len() <= MAX_KID)
        else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let rsa = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => true,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => false,
            _ => continue,
        };
        let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<jsonwebtoken::Algorithm>().ok());
        keys.push((
            kid.clone(),
            Key {
                key,
                alg,
                rsa,
                seen: Instant::now(),
            },
        ));
    }
    if keys.is_empty() {
        return Err("the JWKS has no usable signing key (RSA or EC P-256 with a kid)".into());
    }
    Ok(keys)
}
