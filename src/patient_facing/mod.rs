//! GP Connect's patient-facing front door (`[patient_facing]`): what a second consumer listener needs beyond the
//! clinical one's connection handling. Patient-facing apps (the NHS App and other assured apps) present an NHS
//! login access token instead of a registered certificate and an unsigned audit token; the proxy verifies it,
//! finds the patient's practice, and calls the practice's supplier with the supplier's own token, obtained by a
//! token exchange. The steps of a request are in `proxy` (one pipeline, one audit chain); the parts here:
//!
//! - `token`: the access token verified with `jsonwebtoken` (issuer, audience, expiry with bounded skew,
//!   not-before, the allowed algorithms) and the claims this listener requires (NHS number, proofing level,
//!   scope, app, acting person, practice).
//! - `jwks`: the verifying keys, from a file or an `https` URL, refreshed, with a bounded stale period.
//! - `practices`: a patient's practice when the token does not carry it: [`PracticeSource`], and the file source.
//! - `exchange`: the RFC 8693 token exchange with a `private_key_jwt` client assertion (RFC 7523), cached per
//!   (supplier, patient), with a back-off after a failure.
//! - `apps`: requests per minute per app.
//!
//! Their HTTPS requests are `crate::oneshot`'s.

mod apps;
mod exchange;
mod jwks;
mod practices;
mod token;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::Method;

pub use apps::AppThrottled;
pub use exchange::{ExchangeError, Outcome as ExchangeOutcome, SupplierToken};
pub use practices::{PracticeFile, PracticeSource};
pub use token::{PatientToken, TokenError};

use crate::config::{PatientFacingConfig, Problems, Route, UpstreamConfig};
use crate::ids::OdsCode;
use crate::policy::Supplier;

/// Why no route serves a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMiss {
    /// No route's path.
    Path,
    /// A route's path, not its methods: the methods the routes of that path allow, for `Allow` (`GET, POST`).
    Method(String),
}

/// The patient-facing listener's state, shared by its connections.
pub struct Front {
    cfg: PatientFacingConfig,
    jwks: Arc<jwks::Jwks>,
    practices: RwLock<Option<Arc<dyn PracticeSource>>>,
    exchanger: exchange::Exchanger,
    apps: apps::AppLimits,
    server_tls: ArcSwap<rustls::ServerConfig>,
    /// `upstream.resolve`, for the token endpoints and the JWKS URL.
    resolve: Arc<crate::oneshot::Resolve>,
    /// The upstream client identity (TLS MA to the token endpoints, as to the providers), once wired.
    upstream_tls: std::sync::OnceLock<Arc<crate::tls::Reloadable>>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("listen", &self.cfg.listen)
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl Front {
    /// Reads what the listener needs from its files: its TLS certificate and key (and the platform's CAs), the
    /// assertion key, the practices file, the JWKS' CAs. Errors: one problem per file, naming its key.
    pub fn load(cfg: &PatientFacingConfig, upstream: &UpstreamConfig) -> Result<Self, Problems> {
        let mut problems = Vec::new();
        let server_tls = server_config(cfg)
            .map_err(|p| problems.extend(p.problems))
            .ok();
        // An empty path is a missing key, already said by the config's own check.
        let key = if cfg.assertion_key.as_os_str().is_empty() {
            None
        } else {
            exchange::AssertionKey::load(&cfg.assertion_key)
                .map_err(|e| problems.push(format!("patient_facing.assertion_key: {e}")))
                .ok()
        };
        if let crate::config::JwksSource::File(path) = &cfg.jwks
            && !path.as_os_str().is_empty()
            && let Err(e) = jwks::check_file(path)
        {
            problems.push(format!("patient_facing.jwks: {e}"));
        }
        let practices = match &cfg.practices {
            Some(path) => PracticeFile::load(path)
                .map_err(|e| problems.push(format!("patient_facing.practices: {e}")))
                .ok()
                .map(|file| Arc::new(file) as Arc<dyn PracticeSource>),
            None => None,
        };
        let jwks_tls = jwks_client_config(cfg).map_err(|e| problems.push(e)).ok();
        let (Some(server_tls), Some(key), Some(jwks_tls)) = (server_tls, key, jwks_tls) else {
            return Err(Problems { problems });
        };
        if !problems.is_empty() {
            return Err(Problems { problems });
        }
        let resolve = Arc::new(upstream.resolve.clone());
        Ok(Self {
            jwks: Arc::new(jwks::Jwks::new(cfg, jwks_tls, Arc::clone(&resolve))),
            resolve,
            upstream_tls: std::sync::OnceLock::new(),
            practices: RwLock::new(practices),
            exchanger: exchange::Exchanger::new(
                key,
                cfg.token_timeout,
                cfg.token_refresh_before,
                cfg.exchange_backoff,
            ),
            apps: apps::AppLimits::new(cfg.requests_per_minute_per_app),
            server_tls: ArcSwap::new(server_tls),
            cfg: cfg.clone(),
        })
    }

    /// Calls the token endpoints with the upstream client identity in `tls` (reloaded with it).
    pub(crate) fn connect_upstream(&self, tls: Arc<crate::tls::Reloadable>) {
        let _ = self.upstream_tls.set(tls);
    }

    /// What `check-config` warns of, and the start logs: an assertion key others may read.
    pub fn warnings(cfg: &PatientFacingConfig) -> Vec<String> {
        exchange::AssertionKey::exposed(&cfg.assertion_key)
            .into_iter()
            .collect()
    }

    /// Fetches the JWKS once (a failure is logged: requests are refused 503 until a fetch succeeds), then keeps
    /// it fresh on this runtime.
    pub async fn start(self: &Arc<Self>) {
        for warning in Self::warnings(&self.cfg) {
            tracing::warn!("{warning}");
        }
        match self.jwks.fetch().await {
            Ok(keys) => {
                tracing::info!(keys, listen = %self.cfg.listen, "patient-facing JWKS loaded")
            }
            Err(error) => {
                tracing::warn!(%error, "patient-facing JWKS could not be fetched; tokens are refused until it is")
            }
        }
        tokio::spawn(Arc::clone(&self.jwks).refresh_forever());
    }

    pub fn config(&self) -> &PatientFacingConfig {
        &self.cfg
    }

    /// The listener's TLS config in force (read once per accepted connection).
    pub(crate) fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        self.server_tls.load_full()
    }

    /// Re-reads the listener's certificate, key and CAs and the practices file; if any is bad, nothing changes.
    pub fn reload(&self) -> Result<(), Problems> {
        let tls = server_config(&self.cfg)?;
        let practices = match &self.cfg.practices {
            Some(path) => Some(Arc::new(
                PracticeFile::load(path)
                    .map_err(|e| Problems::one(format!("patient_facing.practices: {e}")))?,
            ) as Arc<dyn PracticeSource>),
            None => None,
        };
        self.server_tls.store(tls);
        // Without a file, a source put in force by `set_practices` stays.
        if let Some(practices) = practices {
            *self
                .practices
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(practices);
        }
        Ok(())
    }

    /// Puts another practice source in force (a PDS client, say) in place of the file.
    pub fn set_practices(&self, source: Arc<dyn PracticeSource>) {
        *self
            .practices
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(source);
    }

    /// The route serving `method` on `path` (the path without its query): the first whose path is `path` or a
    /// segment prefix of it.
    pub fn route(&self, method: &Method, path: &str) -> Result<&Route, RouteMiss> {
        let mut allowed: Vec<&str> = Vec::new();
        for route in &self.cfg.routes {
            let under = path
                .strip_prefix(route.path.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if under {
                if route.methods.contains(method) {
                    return Ok(route);
                }
                allowed.extend(route.methods.iter().map(Method::as_str));
            }
        }
        if allowed.is_empty() {
            Err(RouteMiss::Path)
        } else {
            allowed.sort_unstable();
            allowed.dedup();
            Err(RouteMiss::Method(allowed.join(", ")))
        }
    }

    /// The access token of `headers`' one `Authorization` field, verified, and its text; `seen` gets what the
    /// record names as it is read (see `token::verify`). Two `Authorization` fields are refused: which one the
    /// token is would be a guess.
    pub async fn verify<'a>(
        &self,
        headers: &'a http::HeaderMap,
        seen: &mut crate::audit::PatientAccess,
    ) -> Result<(PatientToken, &'a str), TokenError> {
        let mut fields = headers.get_all(http::header::AUTHORIZATION).iter();
        let authorization = fields.next();
        if fields.next().is_some() {
            return Err(TokenError::Invalid("two_authorization_fields"));
        }
        let token = crate::jwt::bearer_token(authorization.map(http::HeaderValue::as_bytes))
            .map_err(|v| match v {
                crate::jwt::Violation::MissingToken => TokenError::Missing,
                _ => TokenError::Invalid("malformed"),
            })?;
        let verified = token::verify(token, &self.jwks, &self.cfg, seen).await?;
        Ok((verified, token))
    }

    /// The patient's practice, and where it was found (`token` or `lookup`).
    pub fn practice(&self, token: &PatientToken) -> Option<(OdsCode, &'static str)> {
        if let Some(ods) = &token.practice {
            return Some((ods.clone(), "token"));
        }
        let source = self
            .practices
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        source
            .practice(&token.nhs_number)
            .map(|ods| (ods, "lookup"))
    }

    /// Takes one request from the app's per-minute budget.
    pub fn admit_app(&self, client_id: &str) -> Result<(), AppThrottled> {
        self.apps.admit(client_id, Instant::now())
    }

    /// What the token cache says now of the supplier's token for `subject_token`, without waiting: `None` when
    /// an exchange is needed ([`Front::exchange_supplier_token`]).
    pub fn cached_supplier_token(
        &self,
        supplier: &Supplier,
        subject_token: &str,
    ) -> Option<Result<SupplierToken, ExchangeError>> {
        self.exchanger.cached(supplier, subject_token)
    }

    /// The supplier's token for `subject_token`, cached or exchanged over the upstream client identity. The
    /// exchange runs as its own task: a request that goes away while it waits does not cancel it, so its result
    /// is still cached (or its failure still backs the endpoint off) for the requests after it.
    pub async fn exchange_supplier_token(
        self: &Arc<Self>,
        supplier: &Arc<Supplier>,
        subject_token: &str,
    ) -> Result<SupplierToken, ExchangeError> {
        let failed = |detail: String| ExchangeError {
            outcome: ExchangeOutcome::Failed,
            detail,
        };
        let Some(tls) = self.upstream_tls.get().map(|tls| tls.client()) else {
            return Err(failed("no upstream TLS identity wired".into()));
        };
        let (front, supplier, subject) = (
            Arc::clone(self),
            Arc::clone(supplier),
            subject_token.to_owned(),
        );
        tokio::spawn(async move {
            front
                .exchanger
                .token(&supplier, &subject, tls, &front.resolve)
                .await
        })
        .await
        .unwrap_or_else(|e| Err(failed(format!("the exchange's task: {e}"))))
    }
}

/// The listener's rustls config: its certificate and key, `server.tls_versions`; with `client_ca`, a client
/// certificate chained to it is required (the platform in front), checked against `crl` as `server.crl` checks the
/// consumers' (the end-entity certificate; a stale CRL refused unless `server.crl_expired = "allow"`); without, none
/// is asked for. Errors: every unreadable file and refused value, each naming its key.
fn server_config(cfg: &PatientFacingConfig) -> Result<Arc<rustls::ServerConfig>, Problems> {
    fn take<T>(problems: &mut Vec<String>, result: Result<T, String>) -> Option<T> {
        result.map_err(|e| problems.push(e)).ok()
    }
    let mut problems = Vec::new();
    let chain = take(
        &mut problems,
        crate::tls::load_certs("patient_facing.cert", &cfg.cert),
    );
    let key = take(
        &mut problems,
        crate::tls::load_key("patient_facing.key", &cfg.key),
    );
    let verifier = if cfg.client_ca.is_empty() {
        if !cfg.crl.is_empty() {
            problems.push("patient_facing.crl: needs patient_facing.client_ca (no client certificate is asked for)".into());
        }
        None
    } else {
        let roots = take(
            &mut problems,
            crate::tls::load_roots("patient_facing.client_ca", &cfg.client_ca),
        );
        let crls = take(
            &mut problems,
            crate::tls::load_crls("patient_facing.crl", &cfg.crl),
        );
        roots.zip(crls).and_then(|(roots, crls)| {
            let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                crate::tls::provider(),
            );
            if !crls.is_empty() {
                builder = builder.with_crls(crls).only_check_end_entity_revocation();
                if cfg.crl_expired == crate::config::CrlExpired::Refuse {
                    builder = builder.enforce_revocation_expiration();
                }
            }
            builder
                .build()
                .map_err(|e| {
                    problems.push(format!(
                        "patient_facing.client_ca / patient_facing.crl: {e}"
                    ))
                })
                .ok()
        })
    };
    let (Some(chain), Some(key)) = (chain, key) else {
        return Err(Problems { problems });
    };
    if !problems.is_empty() {
        return Err(Problems { problems });
    }
    let builder = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&crate::tls::versions(&cfg.tls_versions))
        .map_err(|e| Problems::one(format!("patient_facing: {e}")))?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| Problems::one(format!("patient_facing.cert / patient_facing.key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// The client config the JWKS is fetched with: `jwks_ca` roots, no client certificate.
fn jwks_client_config(cfg: &PatientFacingConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = crate::tls::load_roots("patient_facing.jwks_ca", &cfg.jwks_ca)?;
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("patient_facing.jwks_ca: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The bytes of `path`, refused when larger than `max`.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(format!("{}: larger than {max} bytes", path.display()));
    }
    Ok(bytes)
}
