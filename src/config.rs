//! The config file (DESIGN.md 1.2): a strictly parsed raw form (`deny_unknown_fields`, one doc line per key with
//! its unit and default) converted once into typed values. Nothing downstream sees a raw string.
//!
//! Owns reading and validating; does not open sockets, build TLS objects or read policy files (the paths it
//! returns are checked for existence by `check-config`, which loads them through their owning modules).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use serde::Deserialize;

/// Where `serve` looks when no `--config` is given: the first that exists.
pub const DEFAULT_PATHS: [&str; 2] = ["ssp.toml", "/etc/ssp/ssp.toml"];

/// One or more problems found in a config or policy files, one line each, each naming the file and the key
/// or line it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems {
    pub problems: Vec<String>,
}

impl Problems {
    pub fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for Problems {}

// ---------------------------------------------------------------------------------------------------------------
// Raw form, as written in the file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    jwt: RawJwt,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    limits: RawLimits,
    /// The Spine Directory Service, for `ssp policy sds`. Optional.
    sds: Option<RawSds>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSds {
    /// The SDS FHIR API base URL (https), e.g. `https://api.service.nhs.uk/spine-directory/FHIR/R4`. Needed for a
    /// live fetch only.
    base_url: Option<String>,
    /// The file holding the API key sent as `apikey`. Needed for a live fetch only.
    api_key_file: Option<PathBuf>,
    /// PEM roots the SDS server's certificate must chain to. Default the system bundle.
    ca: Option<Vec<PathBuf>>,
    /// ODS codes whose accredited systems are consumers (`[[system]]`).
    #[serde(default)]
    systems: Vec<String>,
    /// ODS codes whose accredited systems are providers (`[[endpoint]]`).
    #[serde(default)]
    endpoints: Vec<String>,
    /// Interaction URNs to resolve (and to keep in the entries).
    #[serde(default)]
    interactions: Vec<String>,
    /// One request, connection to last byte. Default `10s`.
    timeout: Option<String>,
    /// Retries of a request answered 429, each after its `Retry-After` (at most 30 s). Default 3.
    max_retries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    /// Consumer-facing `ip:port`. Default `127.0.0.1:8443`.
    listen: Option<String>,
    /// PEM certificate chain, leaf first. Required.
    cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Required.
    key: PathBuf,
    /// PEM roots that consumer certificates must chain to. Required, at least one.
    client_ca: Vec<PathBuf>,
    /// PEM CRLs checked on every handshake. Default none.
    #[serde(default)]
    crl: Vec<PathBuf>,
    /// `"1.2"` and/or `"1.3"`. Default both.
    tls_versions: Option<Vec<String>>,
    /// Longest a TLS handshake may take. Default `10s`.
    handshake_timeout: Option<String>,
    /// Longest a client may take to send a request's headers, and longest an HTTP/1.1 connection may stay with
    /// no request in flight (from the handshake, and between requests). Default `30s`.
    header_read_timeout: Option<String>,
    /// Longest an HTTP/2 connection may stay with no open stream before GOAWAY and close. Default `60s`.
    http2_idle_timeout: Option<String>,
    /// `"refuse"` (a handshake whose revocation status rests on a CRL past its nextUpdate is refused) or
    /// `"allow"` (accepted, logged as an error). Default `"refuse"`.
    crl_expired: Option<String>,
    /// Send the names of the `client_ca` roots in the CertificateRequest. Default `true`; `false` when the names
    /// exceed what one TLS message can carry.
    client_ca_hints: Option<bool>,
    /// Networks (`"10.0.0.0/24"`, or a bare address) of layer-4 balancers whose connections start with a PROXY
    /// protocol header (v1 or v2), which is then required; from anywhere else a PROXY header is refused. Default
    /// none.
    #[serde(default)]
    proxy_protocol_from: Vec<String>,
    /// Concurrent consumer connections; further ones wait in the listen backlog. Default 10000.
    max_connections: Option<usize>,
    /// Methods allowed (check 2). Default GET, POST, PUT, DELETE, PATCH.
    methods: Option<Vec<String>>,
    /// How long open exchanges may run after SIGTERM before their connections are closed. Default `30s`.
    shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    /// The proxy's own client certificate toward providers (PEM chain). Required.
    cert: PathBuf,
    /// Its private key. Required.
    key: PathBuf,
    /// PEM roots that provider server certificates must chain to. Required, at least one.
    ca: Vec<PathBuf>,
    /// TCP connect plus TLS handshake. Default `5s`.
    connect_timeout: Option<String>,
    /// Until the provider's response headers. Default `60s`.
    response_timeout: Option<String>,
    /// Longest silence inside a streaming body. Default `60s`.
    body_idle_timeout: Option<String>,
    /// Idle pooled connections are closed after this. Default `90s`.
    pool_idle_timeout: Option<String>,
    /// Idle pooled connections kept per provider. Default 256, as `limits.per_provider_connections`.
    pool_max_idle_per_host: Option<usize>,
    /// Static name resolution, `"host:port" = "ip:port"`. Default none (system resolver).
    #[serde(default)]
    resolve: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    /// Folder of policy `*.toml` files. Default `policies`.
    dir: Option<PathBuf>,
    /// The sled database of imported generations. Default `data/policy`.
    store: Option<PathBuf>,
    /// Generations kept in the store. Default 20.
    keep_generations: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    /// `off`, `audit` (record violations, forward) or `enforce` (refuse with 400). Default `enforce`.
    mode: Option<String>,
    /// `gpconnect-1` (STU3) or `gpconnect-0.7` (DSTU2). Default `gpconnect-1`.
    profile: Option<String>,
    /// How far in the future `iat` may be. Default `300s`.
    max_future_skew: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// `ip:port` of /metrics, /healthz and /readyz (plain HTTP: keep it on loopback or a management network).
    /// Default `127.0.0.1:9090`.
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// `human` or `json` (one JSON object per line, for journald and log shippers). Default `human`.
    format: Option<String>,
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG`, when set, wins. Default `info`.
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    /// Folder of the audit segments. Default `data/audit`.
    dir: Option<PathBuf>,
    /// `batched` (written before forwarding, fsynced every `fsync_interval`) or `strict` (fsynced before
    /// forwarding). Default `batched`.
    durability: Option<String>,
    /// Longest time written records wait for an fsync in `batched` mode. Default `10ms`.
    fsync_interval: Option<String>,
    /// A segment is sealed and a new one started past this size. Default `64MiB`.
    segment_size: Option<String>,
    /// This instance's name in every record. Default the host name.
    instance: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    /// Requests per second one consumer ASID may send (token bucket). 0 or absent: unlimited.
    per_consumer_rps: Option<u32>,
    /// Requests a consumer may send at once above its rate after a quiet spell. Default `per_consumer_rps`.
    per_consumer_burst: Option<u32>,
    /// Exchanges one consumer ASID may have open at once. 0 or absent: unlimited.
    per_consumer_concurrency: Option<u32>,
    /// Exchanges one provider ASID may have open at once, over all consumers. 0 or absent: unlimited.
    per_provider_concurrency: Option<u32>,
    /// TLS connections the proxy may hold open to one provider (host:port), idle ones included. Default 256.
    per_provider_connections: Option<u32>,
    /// Bytes of request headers (names plus values) a request may carry. Default `64KiB`.
    max_header_bytes: Option<String>,
    /// Header fields a request may carry. Default 100.
    max_header_count: Option<u32>,
}

// ---------------------------------------------------------------------------------------------------------------
// Validated form.

/// The whole validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub policy: PolicyConfig,
    pub jwt: JwtConfig,
    pub audit: AuditConfig,
    pub log: LogConfig,
    /// The admin listener's address.
    pub admin_listen: SocketAddr,
    pub limits: LimitsConfig,
    /// `[sds]`, when present.
    pub sds: Option<SdsConfig>,
}

/// Which ODS codes' accredited systems are consumers (`[[system]]`) and which are providers (`[[endpoint]]`), and
/// the interactions to keep (empty: all).
#[derive(Debug, Clone, Default)]
pub struct SdsRoles {
    pub systems: std::collections::BTreeSet<String>,
    pub endpoints: std::collections::BTreeSet<String>,
    pub interactions: std::collections::BTreeSet<String>,
}

/// `[sds]`: where `ssp policy sds` finds the Spine Directory Service and what it resolves.
#[derive(Debug, Clone)]
pub struct SdsConfig {
    pub base_url: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub ca: Vec<PathBuf>,
    pub roles: SdsRoles,
    pub timeout: Duration,
    pub max_retries: u32,
}

/// `[limits]`: throttling (check 11) and request-size limits. A zero count means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    pub per_consumer_rps: u32,
    pub per_consumer_burst: u32,
    pub per_consumer_concurrency: u32,
    pub per_provider_concurrency: u32,
    pub per_provider_connections: u32,
    pub max_header_bytes: usize,
    pub max_header_count: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_consumer_rps: 0,
            per_consumer_burst: 0,
            per_consumer_concurrency: 0,
            per_provider_concurrency: 0,
            per_provider_connections: 256,
            max_header_bytes: 64 << 10,
            max_header_count: 100,
        }
    }
}

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written (to the page cache) before the request is forwarded; fsynced every `fsync_interval`.
    Batched,
    /// Fsynced before the request is forwarded (group commit: one fsync per batch).
    Strict,
}

/// The `[audit]` section, validated.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    pub fsync_interval: Duration,
    pub segment_size: u64,
    /// Names this proxy instance in every record (default: the host name).
    pub instance: String,
}

/// The operational log (never the audit trail, never tokens, claims or patient identifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub json: bool,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// What a handshake does when a consumer's revocation status rests on a CRL past its nextUpdate
/// (`server.crl_expired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrlExpired {
    /// Refused (fail closed): the default.
    Refuse,
    /// Accepted; the proxy logs an error at start, on reload and when the CRL expires.
    Allow,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Vec<PathBuf>,
    pub crl: Vec<PathBuf>,
    pub tls_versions: Vec<TlsVersion>,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub http2_idle_timeout: Duration,
    pub crl_expired: CrlExpired,
    pub client_ca_hints: bool,
    /// Sources whose connections must start with a PROXY protocol header.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    pub max_connections: usize,
    pub methods: Vec<Method>,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Vec<PathBuf>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// `host:port` (host lower-cased) to the socket address to connect to instead of resolving.
    pub resolve: HashMap<String, SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub mode: crate::jwt::Mode,
    pub profile: crate::jwt::Profile,
    pub max_future_skew: Duration,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub dir: PathBuf,
    pub store: PathBuf,
    pub keep_generations: usize,
}

impl Config {
    /// Reads and validates the file at `path`. Relative paths inside resolve against the file's folder.
    pub fn load(path: &Path) -> Result<Self, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problems::one(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    /// The path `serve` uses when none is given.
    pub fn default_path() -> PathBuf {
        DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATHS[1]))
    }

    /// Validates config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Problems> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| Problems::one(toml_error_line(path, text, &e)))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut v = Validator {
            base,
            problems: Vec::new(),
            file: path.display().to_string(),
        };
        let server = v.server(raw.server);
        let upstream = v.upstream(raw.upstream);
        let keep_generations = raw.policy.keep_generations.unwrap_or(20);
        if keep_generations == 0 {
            v.problem("policy.keep_generations", "must be at least 1");
        }
        let policy = PolicyConfig {
            dir: v.path(raw.policy.dir.unwrap_or_else(|| PathBuf::from("policies"))),
            store: v.path(
                raw.policy
                    .store
                    .unwrap_or_else(|| PathBuf::from("data/policy")),
            ),
            keep_generations: keep_generations.max(1),
        };
        let jwt = v.jwt(raw.jwt);
        let audit = v.audit(raw.audit);
        let log = v.log(raw.log);
        let limits = v.limits(raw.limits);
        let sds = raw.sds.map(|raw| v.sds(raw));
        let admin_text = raw.admin.listen.unwrap_or_else(|| "127.0.0.1:9090".into());
        let admin_listen = admin_text.parse().unwrap_or_else(|_| {
            v.problem(
                "admin.listen",
                format_args!("{admin_text:?} is not an ip:port"),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        });
        if !v.problems.is_empty() {
            return Err(Problems {
                problems: v.problems,
            });
        }
        Ok(Self {
            source: path.to_path_buf(),
            server,
            upstream,
            policy,
            jwt,
            audit,
            log,
            admin_listen,
            limits,
            sds,
        })
    }
}

/// Collects problems while converting raw values, so that one run reports all of them.
struct Validator<'a> {
    base: &'a Path,
    file: String,
    problems: Vec<String>,
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, message: impl fmt::Display) {
        self.problems
            .push(format!("{}: {key}: {message}", self.file));
    }

    fn sds(&mut self, raw: RawSds) -> SdsConfig {
        if let Some(url) = &raw.base_url
            && (!url.starts_with("https://") || url.parse::<http::Uri>().is_err())
        {
            self.problem("sds.base_url", format_args!("{url:?} is not an https URL"));
        }
        for ods in raw.systems.iter().chain(&raw.endpoints) {
            if crate::ids::OdsCode::parse(ods).is_none() {
                self.problem(
                    "sds.systems / sds.endpoints",
                    format_args!("{ods:?} is not an ODS code"),
                );
            }
        }
        for urn in &raw.interactions {
            if crate::ids::InteractionId::parse(urn).is_none() {
                self.problem(
                    "sds.interactions",
                    format_args!("{urn:?} is not an interaction URN"),
                );
            }
        }
        SdsConfig {
            base_url: raw.base_url.map(|u| u.trim_end_matches('/').to_owned()),
            api_key_file: raw.api_key_file.map(|p| self.path(p)),
            ca: raw
                .ca
                .unwrap_or_else(|| vec![PathBuf::from("/etc/ssl/certs/ca-certificates.crt")])
                .into_iter()
                .map(|p| self.path(p))
                .collect(),
            roles: SdsRoles {
                systems: raw.systems.into_iter().collect(),
                endpoints: raw.endpoints.into_iter().collect(),
                interactions: raw.interactions.into_iter().collect(),
            },
            timeout: self.duration("sds.timeout", raw.timeout, Duration::from_secs(10)),
            max_retries: raw.max_retries.unwrap_or(3).min(10),
        }
    }

    fn path(&self, path: PathBuf) -> PathBuf {
        if path.is_absolute() {
            path
        } else {
            self.base.join(path)
        }
    }

    fn duration(&mut self, key: &str, raw: Option<String>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(text) => match parse_duration(&text) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    self.problem(
                        key,
                        format_args!("{text:?} is not a duration like \"10s\", \"500ms\", \"5m\""),
                    );
                    default
                }
            },
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:8443".into());
        let listen = listen_text.parse().unwrap_or_else(|_| {
            self.problem(
                "server.listen",
                format_args!("{listen_text:?} is not an ip:port"),
            );
            SocketAddr::from(([127, 0, 0, 1], 8443))
        });
        if raw.client_ca.is_empty() {
            self.problem("server.client_ca", "at least one CA file is required");
        }
        let mut tls_versions = Vec::new();
        for v in raw
            .tls_versions
            .unwrap_or_else(|| vec!["1.2".into(), "1.3".into()])
        {
            match v.as_str() {
                "1.2" => tls_versions.push(TlsVersion::Tls12),
                "1.3" => tls_versions.push(TlsVersion::Tls13),
                other => self.problem(
                    "server.tls_versions",
                    format_args!("{other:?} is not supported (\"1.2\" or \"1.3\"; older versions are forbidden)"),
                ),
            }
        }
        if tls_versions.is_empty() {
            self.problem("server.tls_versions", "at least one version is required");
        }
        let crl_expired = match raw.crl_expired.as_deref() {
            None | Some("refuse") => CrlExpired::Refuse,
            Some("allow") => CrlExpired::Allow,
            Some(other) => {
                self.problem(
                    "server.crl_expired",
                    format_args!("{other:?} is neither \"refuse\" nor \"allow\""),
                );
                CrlExpired::Refuse
            }
        };
        let mut proxy_protocol_from = Vec::new();
        for text in &raw.proxy_protocol_from {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => proxy_protocol_from.push(net.trunc()),
                Err(_) => self.problem(
                    "server.proxy_protocol_from",
                    format_args!("{text:?} is not a network like \"10.0.0.0/24\" or an IP address"),
                ),
            }
        }
        let max_connections = raw.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            self.problem("server.max_connections", "must be at least 1");
        }
        let mut methods = Vec::new();
        for m in raw.methods.unwrap_or_else(|| {
            ["GET", "POST", "PUT", "DELETE", "PATCH"]
                .map(String::from)
                .to_vec()
        }) {
            match Method::from_bytes(m.as_bytes()) {
                Ok(Method::CONNECT | Method::TRACE) => self.problem(
                    "server.methods",
                    format_args!("{m} is never forwarded by an SSP"),
                ),
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(method),
                _ => self.problem(
                    "server.methods",
                    format_args!("{m:?} is not an upper-case method"),
                ),
            }
        }
        ServerConfig {
            listen,
            cert: self.path(raw.cert),
            key: self.path(raw.key),
            client_ca: raw.client_ca.into_iter().map(|p| self.path(p)).collect(),
            crl: raw.crl.into_iter().map(|p| self.path(p)).collect(),
            tls_versions,
            handshake_timeout: self.duration(
                "server.handshake_timeout",
                raw.handshake_timeout,
                Duration::from_secs(10),
            ),
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                raw.header_read_timeout,
                Duration::from_secs(30),
            ),
            http2_idle_timeout: self.duration(
                "server.http2_idle_timeout",
                raw.http2_idle_timeout,
                Duration::from_secs(60),
            ),
            crl_expired,
            client_ca_hints: raw.client_ca_hints.unwrap_or(true),
            proxy_protocol_from,
            max_connections: max_connections.max(1),
            methods,
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.shutdown_grace,
                Duration::from_secs(30),
            ),
        }
    }

    fn log(&mut self, raw: RawLog) -> LogConfig {
        let json = match raw.format.as_deref().unwrap_or("human") {
            "human" => false,
            "json" => true,
            other => {
                self.problem(
                    "log.format",
                    format_args!("{other:?} is not \"human\" or \"json\""),
                );
                false
            }
        };
        let level = raw.level.unwrap_or_else(|| "info".into());
        if !matches!(
            level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            self.problem(
                "log.level",
                format_args!("{level:?} is not error, warn, info, debug or trace"),
            );
        }
        LogConfig { json, level }
    }

    fn audit(&mut self, raw: RawAudit) -> AuditConfig {
        let durability = match raw.durability.as_deref().unwrap_or("batched") {
            "batched" => Durability::Batched,
            "strict" => Durability::Strict,
            other => {
                self.problem(
                    "audit.durability",
                    format_args!("{other:?} is not \"batched\" or \"strict\""),
                );
                Durability::Batched
            }
        };
        let segment_size = match raw.segment_size {
            None => 64 << 20,
            Some(text) => match parse_size(&text) {
                Some(n) if n >= 4096 => n,
                _ => {
                    self.problem(
                        "audit.segment_size",
                        format_args!("{text:?} is not a size of at least 4KiB like \"64MiB\""),
                    );
                    64 << 20
                }
            },
        };
        let instance = raw.instance.unwrap_or_else(host_name);
        if instance.is_empty() || instance.len() > 255 || instance.chars().any(char::is_control) {
            self.problem("audit.instance", "must be 1 to 255 printable characters");
        }
        AuditConfig {
            dir: self.path(raw.dir.unwrap_or_else(|| PathBuf::from("data/audit"))),
            durability,
            fsync_interval: self.duration(
                "audit.fsync_interval",
                raw.fsync_interval,
                Duration::from_millis(10),
            ),
            segment_size,
            instance,
        }
    }

    fn jwt(&mut self, raw: RawJwt) -> JwtConfig {
        use crate::jwt::{Mode, Profile};
        let mode = match raw.mode.as_deref().unwrap_or("enforce") {
            "off" => Mode::Off,
            "audit" => Mode::Audit,
            "enforce" => Mode::Enforce,
            other => {
                self.problem(
                    "jwt.mode",
                    format_args!("{other:?} is not \"off\", \"audit\" or \"enforce\""),
                );
                Mode::Enforce
            }
        };
        let profile = match raw.profile.as_deref().unwrap_or("gpconnect-1") {
            "gpconnect-1" => Profile::GpConnect1,
            "gpconnect-0.7" => Profile::GpConnect07,
            other => {
                self.problem(
                    "jwt.profile",
                    format_args!("{other:?} is not \"gpconnect-1\" or \"gpconnect-0.7\""),
                );
                Profile::GpConnect1
            }
        };
        let max_future_skew = match raw.max_future_skew {
            None => Duration::from_secs(300),
            // Zero is a legitimate skew here (no future tokens at all).
            Some(text) => parse_duration(&text).unwrap_or_else(|| {
                self.problem(
                    "jwt.max_future_skew",
                    format_args!("{text:?} is not a duration like \"300s\""),
                );
                Duration::from_secs(300)
            }),
        };
        JwtConfig {
            mode,
            profile,
            max_future_skew,
        }
    }

    fn limits(&mut self, raw: RawLimits) -> LimitsConfig {
        let d = LimitsConfig::default();
        let per_consumer_rps = raw.per_consumer_rps.unwrap_or(0);
        let per_consumer_burst = raw.per_consumer_burst.unwrap_or(per_consumer_rps);
        if per_consumer_rps > 0 && per_consumer_burst == 0 {
            self.problem(
                "limits.per_consumer_burst",
                "must be at least 1 when per_consumer_rps is set",
            );
        }
        let per_provider_connections = raw
            .per_provider_connections
            .unwrap_or(d.per_provider_connections);
        if per_provider_connections == 0 {
            self.problem("limits.per_provider_connections", "must be at least 1");
        }
        // hyper refuses request heads over its own buffer limits before we see them; below 1KiB no GP Connect
        // request fits (the token alone is about 1.5KiB).
        const HEADER_BYTES: std::ops::RangeInclusive<u64> = 1024..=(1 << 20);
        let max_header_bytes = match raw.max_header_bytes {
            None => d.max_header_bytes,
            Some(text) => match parse_size(&text) {
                Some(n) if HEADER_BYTES.contains(&n) => n as usize,
                _ => {
                    self.problem(
                        "limits.max_header_bytes",
                        format_args!("{text:?} is not a size from 1KiB to 1MiB like \"64KiB\""),
                    );
                    d.max_header_bytes
                }
            },
        };
        let max_header_count = raw.max_header_count.unwrap_or(100);
        if !(8..=1000).contains(&max_header_count) {
            self.problem("limits.max_header_count", "must be from 8 to 1000");
        }
        LimitsConfig {
            per_consumer_rps,
            per_consumer_burst: if per_consumer_rps == 0 {
                0
            } else {
                per_consumer_burst.max(1)
            },
            per_consumer_concurrency: raw.per_consumer_concurrency.unwrap_or(0),
            per_provider_concurrency: raw.per_provider_concurrency.unwrap_or(0),
            per_provider_connections: per_provider_connections.max(1),
            max_header_bytes,
            max_header_count: max_header_count.clamp(8, 1000) as usize,
        }
    }

    fn upstream(&mut self, raw: RawUpstream) -> UpstreamConfig {
        if raw.ca.is_empty() {
            self.problem("upstream.ca", "at least one CA file is required");
        }
        let mut resolve = HashMap::new();
        for (name, addr) in raw.resolve {
            let key = format!("upstream.resolve.\"{name}\"");
            let name_ok = name.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !name_ok {
                self.problem(&key, "the name must be \"host:port\"");
                continue;
            }
            match addr.parse::<SocketAddr>() {
                Ok(sa) => {
                    resolve.insert(name.to_ascii_lowercase(), sa);
                }
                Err(_) => self.problem(&key, format_args!("{addr:?} is not an ip:port")),
            }
        }
        UpstreamConfig {
            cert: self.path(raw.cert),
            key: self.path(raw.key),
            ca: raw.ca.into_iter().map(|p| self.path(p)).collect(),
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.connect_timeout,
                Duration::from_secs(5),
            ),
            response_timeout: self.duration(
                "upstream.response_timeout",
                raw.response_timeout,
                Duration::from_secs(60),
            ),
            body_idle_timeout: self.duration(
                "upstream.body_idle_timeout",
                raw.body_idle_timeout,
                Duration::from_secs(60),
            ),
            pool_idle_timeout: self.duration(
                "upstream.pool_idle_timeout",
                raw.pool_idle_timeout,
                Duration::from_secs(90),
            ),
            pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
            resolve,
        }
    }
}

/// `"path: message at line L, column C"` for a TOML syntax or type error, on one line.
fn toml_error_line(path: &Path, text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!("{}: line {line}, column {col}: {message}", path.display())
        }
        None => format!("{}: {message}", path.display()),
    }
}

/// The host name, for `audit.instance`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ssp".to_owned())
}

/// Parses `"64KiB"`, `"64MiB"`, `"1GiB"`, `"512B"` into bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits_end);
    let n: u64 = number.parse().ok()?;
    let mult = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Parses `"10s"`, `"500ms"`, `"5m"`, `"1h"` (an integer and a unit, nothing else).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits_end);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
cert = "c.crt"
key = "c.key"
client_ca = ["ca.crt"]
[upstream]
cert = "u.crt"
key = "u.key"
ca = ["ca.crt"]
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(MINIMAL, Path::new("/etc/ssp/ssp.toml")).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.server.cert, PathBuf::from("/etc/ssp/c.crt"));
        assert_eq!(
            c.server.tls_versions,
            vec![TlsVersion::Tls12, TlsVersion::Tls13]
        );
        assert_eq!(c.server.methods.len(), 5);
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(c.policy.dir, PathBuf::from("/etc/ssp/policies"));
        assert_eq!(c.policy.store, PathBuf::from("/etc/ssp/data/policy"));
        assert_eq!(c.policy.keep_generations, 20);
        assert_eq!(c.jwt.mode, crate::jwt::Mode::Enforce);
        assert_eq!(c.jwt.profile, crate::jwt::Profile::GpConnect1);
        assert_eq!(c.jwt.max_future_skew, Duration::from_secs(300));
        assert_eq!(c.audit.dir, PathBuf::from("/etc/ssp/data/audit"));
        assert_eq!(c.audit.durability, crate::audit::Durability::Batched);
        assert_eq!(c.audit.segment_size, 64 << 20);
        assert!(!c.audit.instance.is_empty());
        assert_eq!(
            c.log,
            LogConfig {
                json: false,
                level: "info".into()
            }
        );
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.max_header_bytes, 64 * 1024);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = MINIMAL.replace("key = \"c.key\"", "key = \"c.key\"\nlisten_port = 1");
        let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        let line = &err.problems[0];
        assert!(line.starts_with("ssp.toml: line 5"), "{line}");
        assert!(line.contains("listen_port"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn every_bad_value_is_reported() {
        let text = MINIMAL.replace(
            "[upstream]",
            "listen = \"nowhere\"\ntls_versions = [\"1.1\"]\nmethods = [\"TRACE\", \"get\"]\nhandshake_timeout = \"10 seconds\"\n[upstream]\nresolve = { \"nohost\" = \"1.2.3.4:5\", \"h:443\" = \"h:443\" }",
        ) + "[jwt]\nmode = \"strict\"\nprofile = \"gpconnect-2\"\n"
            + "[limits]\nper_consumer_rps = 5\nper_consumer_burst = 0\nper_provider_connections = 0\nmax_header_bytes = \"64\"\nmax_header_count = 3\n";
        let err = Config::parse(&text, Path::new("ssp.toml")).unwrap_err();
        let all = err.to_string();
        for key in [
            "server.listen",
            "server.tls_versions",
            "server.methods: TRACE",
            "server.methods: \"get\"",
            "server.handshake_timeout",
            "upstream.resolve.\"nohost\"",
            "upstream.resolve.\"h:443\"",
            "jwt.mode",
            "jwt.profile",
            "limits.per_consumer_burst",
            "limits.per_provider_connections",
            "limits.max_header_bytes",
            "limits.max_header_count",
        ] {
            assert!(all.contains(key), "missing {key} in {all}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("64mb"), None);
    }

    /// The repository's dev config and the sample production config stay valid as keys change.
    #[test]
    fn shipped_configs_parse() {
        for (name, text) in [
            ("ssp.toml", include_str!("../ssp.toml")),
            ("systemd/ssp.toml", include_str!("../systemd/ssp.toml")),
        ] {
            if let Err(e) = Config::parse(text, Path::new(name)) {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
