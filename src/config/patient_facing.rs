//! `[patient_facing]`: the second consumer listener, for patient-facing apps presenting NHS login access tokens
//! (`patient_facing` serves it), validated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Method;

use super::raw::{RawPatientFacing, RawRoute};
use super::validate::Converter;
use super::{ServerConfig, UpstreamConfig};
use crate::ids::{Asid, InteractionId};

/// Where the access tokens' verifying keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS file, read at start and on each refresh.
    File(PathBuf),
    /// An `https://` URL, fetched with ssp's own TLS client and `jwks_ca`.
    Url(String),
}

/// The NHS login identity proofing levels, lowest first (NHS login's `identity_proofing_level` claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proofing {
    P0,
    P5,
    P9,
}

impl Proofing {
    /// `P0`, `P5` or `P9`, exactly.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "P0" => Some(Self::P0),
            "P5" => Some(Self::P5),
            "P9" => Some(Self::P9),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::P0 => "P0",
            Self::P5 => "P5",
            Self::P9 => "P9",
        }
    }
}

/// One `[[patient_facing.route]]`: requests whose path starts with `path` (at a segment boundary) and whose
/// method is one of `methods` are the interaction `interaction`.
#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub methods: Vec<Method>,
    pub interaction: InteractionId,
}

/// `[patient_facing]`, validated.
#[derive(Debug, Clone)]
pub struct PatientFacingConfig {
    pub listen: SocketAddr,
    /// The `[[system]]` the requests are sent as: its interactions and agreements apply to them.
    pub asid: Asid,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The platform's client CAs; empty: no client certificate is asked for.
    pub client_ca: Vec<PathBuf>,
    /// CRLs for the platform's certificates (only the end-entity certificate is checked against them).
    pub crl: Vec<PathBuf>,
    /// `server.crl_expired`: whether a CRL past its nextUpdate still counts.
    pub crl_expired: super::CrlExpired,
    /// `server.tls_versions`, which the door keeps too.
    pub tls_versions: Vec<super::TlsVersion>,
    pub issuer: String,
    pub audience: String,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub jwks: JwksSource,
    pub jwks_ca: Vec<PathBuf>,
    pub jwks_refresh: Duration,
    pub jwks_stale: Duration,
    pub leeway: Duration,
    pub scope: String,
    pub min_proofing: Proofing,
    /// The claim's path, split at dots: `["gp_registration_details", "gp_ods_code"]`.
    pub ods_claim: Option<Vec<String>>,
    pub practices: Option<PathBuf>,
    pub assertion_key: PathBuf,
    pub token_refresh_before: Duration,
    pub token_timeout: Duration,
    pub exchange_backoff: Duration,
    pub requests_per_minute_per_app: u32,
    /// Concurrent connections to the door: its own bound, so that connections to it (which need no client
    /// certificate) cannot take the clinical door's places under `server.max_connections`.
    pub max_connections: usize,
    pub routes: Vec<Route>,
}

/// Largest clock skew `leeway` may allow.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

impl Converter<'_> {
    pub(super) fn patient_facing(
        &mut self,
        raw: RawPatientFacing,
        server: &ServerConfig,
        upstream: &UpstreamConfig,
    ) -> PatientFacingConfig {
        let listen_text = self.required("patient_facing.listen", raw.listen);
        let listen = listen_text.parse().unwrap_or_else(|_| {
            if !listen_text.is_empty() {
                self.problem(
                    "patient_facing.listen",
                    format_args!("{listen_text:?} is not an ip:port"),
                );
            }
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if clashes(listen, server.listen) {
            self.problem(
                "patient_facing.listen",
                "must differ from server.listen: the two listeners are told apart by their socket",
            );
        }
        let asid_text = self.required("patient_facing.asid", raw.asid);
        let asid = Asid::parse(&asid_text).unwrap_or_else(|| {
            if !asid_text.is_empty() {
                self.problem(
                    "patient_facing.asid",
                    format_args!("{asid_text:?} is not an ASID (1 to 20 digits)"),
                );
            }
            Asid::placeholder()
        });
        let issuer = self.required("patient_facing.issuer", raw.issuer);
        let audience = self.required("patient_facing.audience", raw.audience);
        let scope = self.required("patient_facing.scope", raw.scope);
        if scope.contains(' ') {
            self.problem("patient_facing.scope", "one scope, without spaces");
        }
        let algorithms = match raw.algorithms {
            None => vec![
                jsonwebtoken::Algorithm::RS256,
                jsonwebtoken::Algorithm::RS512,
                jsonwebtoken::Algorithm::ES256,
            ],
            Some(list) => {
                let mut algs = Vec::new();
                for text in list {
                    match text.as_str() {
                        "RS256" => algs.push(jsonwebtoken::Algorithm::RS256),
                        "RS512" => algs.push(jsonwebtoken::Algorithm::RS512),
                        "ES256" => algs.push(jsonwebtoken::Algorithm::ES256),
                        other => self.problem(
                            "patient_facing.algorithms",
                            format_args!("{other:?} is not RS256, RS512 or ES256"),
                        ),
                    }
                }
                if algs.is_empty() {
                    self.problem("patient_facing.algorithms", "at least one algorithm");
                }
                algs
            }
        };
        let jwks_text = self.required("patient_facing.jwks", raw.jwks);
        let https = jwks_text
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
        let jwks = if let Some(rest) = https.then(|| &jwks_text[8..]) {
            if rest.is_empty() || jwks_text.parse::<http::Uri>().is_err() {
                self.problem(
                    "patient_facing.jwks",
                    format_args!("{jwks_text:?} is not an https URL"),
                );
            }
            JwksSource::Url(jwks_text)
        } else if jwks_text.contains("://") {
            self.problem(
                "patient_facing.jwks",
                "a URL must be https:// (the keys that admit every patient are not fetched in clear)",
            );
            JwksSource::Url(jwks_text)
        } else if jwks_text.is_empty() {
            // Missing, already said: no file to check.
            JwksSource::File(PathBuf::new())
        } else {
            JwksSource::File(self.path(PathBuf::from(jwks_text)))
        };
        let jwks_refresh = self.duration(
            "patient_facing.jwks_refresh",
            raw.jwks_refresh,
            Duration::from_secs(300),
        );
        let jwks_stale = self.duration(
            "patient_facing.jwks_stale",
            raw.jwks_stale,
            Duration::from_secs(3600),
        );
        if jwks_stale < jwks_refresh {
            self.problem(
                "patient_facing.jwks_stale",
                "must be at least patient_facing.jwks_refresh (a key would lapse between two fetches)",
            );
        }
        let leeway = match raw.leeway {
            Some(text) if text.trim() == "0s" || text.trim() == "0" => Duration::ZERO,
            other => self.duration("patient_facing.leeway", other, Duration::from_secs(30)),
        };
        if leeway > MAX_LEEWAY {
            self.problem("patient_facing.leeway", "at most 5m");
        }
        let min_text = raw.min_proofing.unwrap_or_else(|| "P9".into());
        let min_proofing = Proofing::parse(&min_text).unwrap_or_else(|| {
            self.problem(
                "patient_facing.min_proofing",
                format_args!("{min_text:?} is not P0, P5 or P9"),
            );
            Proofing::P9
        });
        let ods_claim = raw.ods_claim.map(|path| {
            let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
            if parts.iter().any(|p| p.is_empty()) || parts.len() > 4 {
                self.problem(
                    "patient_facing.ods_claim",
                    format_args!("{path:?} is not a claim name or dotted path of at most 4 names"),
                );
            }
            parts
        });
        if ods_claim.is_none() && raw.practices.is_none() {
            self.problem(
                "patient_facing.practices",
                "required when ods_claim is not set: a patient's practice must come from somewhere",
            );
        }
        let assertion_key = match raw.assertion_key {
            Some(path) => self.path(path),
            None => {
                self.problem("patient_facing.assertion_key", "missing (required)");
                PathBuf::new()
            }
        };
        let routes = raw
            .route
            .into_iter()
            .map(|r| self.route(r))
            .collect::<Vec<_>>();
        for (i, route) in routes.iter().enumerate() {
            if routes[..i].iter().any(|r| r.path == route.path) {
                self.problem(
                    "patient_facing.route",
                    format_args!("path {:?} is routed twice", route.path),
                );
            }
        }
        if routes.is_empty() {
            self.problem(
                "patient_facing.route",
                "at least one [[patient_facing.route]]: nothing would be served",
            );
        }
        PatientFacingConfig {
            listen,
            asid,
            // The defaults are paths already resolved against the config's folder.
            cert: raw
                .cert
                .map_or_else(|| server.cert.clone(), |p| self.path(p)),
            key: raw.key.map_or_else(|| server.key.clone(), |p| self.path(p)),
            client_ca: raw.client_ca.into_iter().map(|p| self.path(p)).collect(),
            crl: raw.crl.into_iter().map(|p| self.path(p)).collect(),
            crl_expired: server.crl_expired,
            tls_versions: server.tls_versions.clone(),
            issuer,
            audience,
            algorithms,
            jwks,
            jwks_ca: if raw.jwks_ca.is_empty() {
                upstream.ca.clone()
            } else {
                raw.jwks_ca.into_iter().map(|p| self.path(p)).collect()
            },
            jwks_refresh,
            jwks_stale,
            leeway,
            scope,
            min_proofing,
            ods_claim,
            practices: raw.practices.map(|p| self.path(p)),
            assertion_key,
            token_refresh_before: self.duration(
                "patient_facing.token_refresh_before",
                raw.token_refresh_before,
                Duration::from_secs(30),
            ),
            token_timeout: self.duration(
                "patient_facing.token_timeout",
                raw.token_timeout,
                Duration::from_secs(5),
            ),
            exchange_backoff: self.duration(
                "patient_facing.exchange_backoff",
                raw.exchange_backoff,
                Duration::from_secs(10),
            ),
            requests_per_minute_per_app: raw.requests_per_minute_per_app.unwrap_or(0),
            max_connections: match raw.max_connections {
                Some(0) => {
                    self.problem("patient_facing.max_connections", "must be at least 1");
                    1
                }
                other => other.unwrap_or(10_000),
            },
            routes,
        }
    }

    fn required(&mut self, key: &str, value: Option<String>) -> String {
        match value {
            Some(v) if !v.trim().is_empty() => v,
            _ => {
                self.problem(key, "missing (required)");
                String::new()
            }
        }
    }

    fn route(&mut self, raw: RawRoute) -> Route {
        const KEY: &str = "patient_facing.route";
        let path_ok = raw.path.starts_with('/')
            && raw.path.len() > 1
            && !raw.path.ends_with('/')
            && crate::ssp::Target::parse(&format!("https://h{}", raw.path)).is_ok()
            && !raw.path.contains('?');
        if !path_ok {
            self.problem(
                KEY,
                format_args!(
                    "path {:?} must start with / and be a plain path (no query, dot segment or trailing /)",
                    raw.path
                ),
            );
        }
        let interaction = InteractionId::parse(&raw.interaction).unwrap_or_else(|| {
            self.problem(
                KEY,
                format_args!("interaction {:?} is not a URN", raw.interaction),
            );
            InteractionId::placeholder()
        });
        let methods = raw
            .methods
            .unwrap_or_else(|| vec!["GET".into()])
            .into_iter()
            .filter_map(|m| match Method::from_bytes(m.as_bytes()) {
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => Some(method),
                _ => {
                    self.problem(KEY, format_args!("method {m:?} is not an HTTP method"));
                    None
                }
            })
            .collect::<Vec<_>>();
        if methods.is_empty() {
            self.problem(
                KEY,
                format_args!("path {:?}: methods must name at least one", raw.path),
            );
        }
        Route {
            path: raw.path,
            methods,
            interaction,
        }
    }
}

/// Two listen addresses that cannot both be bound: the same port, on the same address or where either is the
/// unspecified one (`0.0.0.0`, `::`). Port 0 (any free port) never clashes.
pub(super) fn clashes(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
