//! The config file (DESIGN.md 1.2): a strictly parsed raw form (`deny_unknown_fields`, one doc line per key with
//! its unit and default) converted once into typed values. Nothing downstream sees a raw string.
//!
//! Owns reading and validating; does not open sockets, build TLS objects or read policy files (the paths it
//! returns are checked for existence by `check-config`, which loads them through their owning modules).
//!
//! - `raw`: the file's schema, as written (`deny_unknown_fields`).
//! - `validate`: raw values to typed ones, every problem named with its key.

mod patient_facing;
mod raw;
mod shipping;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;

pub use patient_facing::{JwksSource, PatientFacingConfig, Proofing, Route};
use raw::RawConfig;
pub use shipping::{ShipConfig, ShipTransport};
use validate::{Converter, toml_error_line};

/// Where `serve` looks when no `--config` is given: the first that exists.
pub(crate) const DEFAULT_PATHS: [&str; 2] = ["ssp.toml", "/etc/ssp/ssp.toml"];

/// One or more problems found in a config or policy files, one line each, each naming the file and the key
/// or line it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems {
    pub problems: Vec<String>,
}

impl Problems {
    pub(crate) fn one(problem: impl Into<String>) -> Self {
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
    /// `[radar]`: a consumer certificate seen within this long counts for the expiry gauge.
    pub radar_window: Duration,
    /// `[audit.patients]`: the patient index, when configured.
    pub patients: Option<PatientsConfig>,
    /// `[evidence] key`: the Ed25519 key (PKCS#8 PEM) that signs an evidence pack's manifest.
    pub evidence_key: Option<PathBuf>,
    /// `[audit.ship]`: the collector the log is shipped to, when configured.
    pub ship: Option<ShipConfig>,
    /// `[patient_facing]`: the listener for patient-facing apps, when configured.
    pub patient_facing: Option<PatientFacingConfig>,
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
            max_header_count: 90,
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

/// `[audit.patients]`, validated.
#[derive(Debug, Clone)]
pub struct PatientsConfig {
    /// The HMAC key file (mode 0400 or 0600, owned by the service user).
    pub key: PathBuf,
    /// Write `hmac:<hex>` in the records' `target` in place of each number.
    pub redact: bool,
    /// Read the first 16 KiB of structured record request bodies for the number.
    pub read_bodies: bool,
}

/// The `[audit]` section, validated (`[audit.patients]` is [`Config::patients`]).
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
    /// Threads serving consumer connections (`server.workers`, 0 resolved to the CPUs available): at least 1.
    pub workers: usize,
    pub methods: Vec<Method>,
    pub shutdown_grace: Duration,
    /// `GET /_ssp/selftest` answered on the consumer listener.
    pub selftest: bool,
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
    pub(crate) fn default_path() -> PathBuf {
        DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATHS[1]))
    }

    /// Validates config text as if read from `path`.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, Problems> {
        let checked = Self::check(text, path);
        match checked.config {
            Some(config) if checked.problems.is_empty() => Ok(config),
            _ => Err(Problems {
                problems: checked.problems,
            }),
        }
    }

    /// Reads the file at `path` as [`Config::check`] does.
    pub(crate) fn load_checked(path: &Path) -> ConfigReport {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::check(&text, path),
            Err(e) => ConfigReport {
                config: None,
                problems: vec![format!("{}: cannot read: {e}", path.display())],
                unusable: Vec::new(),
                lines: Default::default(),
            },
        }
    }

    /// Reads and validates config text, reporting every problem one run can find (`check-config`): a value of
    /// the wrong type or an unknown key is reported with its line and left out, and the rest is read on; each
    /// value that does not validate is named with its key and line. The config comes back, with the defaults
    /// in place of the values left out, when its required keys could be read, so that the checks of the files
    /// it names can run too.
    pub(crate) fn check(text: &str, path: &Path) -> ConfigReport {
        let mut problems = Vec::new();
        let mut unusable = Vec::new();
        let lines = validate::KeyLines::new(text);
        let Some(mut raw) = read_raw(text, path, &lines, &mut problems, &mut unusable) else {
            return ConfigReport {
                config: None,
                problems,
                unusable,
                lines: lines.all(),
            };
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let mut v = Converter {
            base,
            problems,
            file: path.display().to_string(),
            lines,
            unusable: &unusable,
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
        let patients = raw.audit.patients.take().map(|p| PatientsConfig {
            key: v.path(p.key),
            redact: p.redact.unwrap_or(false),
            read_bodies: p.read_bodies.unwrap_or(false),
        });
        let evidence_key = raw.evidence.key.map(|k| v.path(k));
        let ship = raw.audit.ship.take();
        let audit = v.audit(raw.audit);
        let ship = ship.map(|s| v.ship(s, &upstream, &audit.instance));
        let log = v.log(raw.log);
        let limits = v.limits(raw.limits);
        let sds = raw.sds.map(|raw| v.sds(raw));
        let patient_facing = raw
            .patient_facing
            .map(|raw| v.patient_facing(raw, &server, &upstream));
        let radar_window = v.duration(
            "radar.window",
            raw.radar.window,
            Duration::from_secs(30 * 86_400),
        );
        let admin_text = raw.admin.listen.unwrap_or_else(|| "127.0.0.1:9090".into());
        let admin_listen = admin_text.parse().unwrap_or_else(|_| {
            v.problem(
                "admin.listen",
                format_args!("{admin_text:?} is not an ip:port"),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        });
        if patient_facing
            .as_ref()
            .is_some_and(|pf| patient_facing::clashes(pf.listen, admin_listen))
        {
            v.problem("patient_facing.listen", "must differ from admin.listen");
        }
        let lines = v.lines.all();
        let problems = v.problems;
        ConfigReport {
            unusable,
            lines,
            problems,
            config: Some(Self {
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
                radar_window,
                patients,
                evidence_key,
                ship,
                patient_facing,
            }),
        }
    }
}

/// A config as `check-config` reads it: every problem found, and the config when its required keys could be read
/// (with defaults in place of the values refused).
#[derive(Debug)]
pub(crate) struct ConfigReport {
    pub config: Option<Config>,
    pub problems: Vec<String>,
    /// Required keys that are missing or were refused: the config holds placeholders for them, and the checks
    /// of what they name are not run (their problems are already said).
    pub unusable: Vec<String>,
    /// The line of every key the file writes (`server.cert` -> 7), to place the problems found in what it names.
    pub lines: std::collections::BTreeMap<String, usize>,
}

impl ConfigReport {
    /// A problem found in what the config names (`server.cert: certs/x.crt: ...`), placed at its key's line
    /// (`ssp.toml: line 7: server.cert: ...`); `None` for one about an unusable key, already reported.
    pub(crate) fn place(&self, file: &Path, problem: String) -> Option<String> {
        let key_end = problem.find([':', ' ']).unwrap_or(problem.len());
        let key = &problem[..key_end];
        if self.unusable.iter().any(|k| k == key) {
            return None;
        }
        Some(match self.lines.get(key) {
            Some(line) => format!("{}: line {line}: {problem}", file.display()),
            None => problem,
        })
    }
}

/// The keys without which there is no config, and whether each holds a list (of paths) or one path.
const REQUIRED: [(&str, bool); 6] = [
    ("server.cert", false),
    ("server.key", false),
    ("server.client_ca", true),
    ("upstream.cert", false),
    ("upstream.key", false),
    ("upstream.ca", true),
];

/// The raw config, with each value of the wrong type and each unknown key reported (with its line) and left out,
/// at most 64 of them, and each required key that is missing or was left out reported and replaced by a
/// placeholder (named in `unusable`), so that the rest is still read and checked. `None` when the text is not TOML.
fn read_raw(
    text: &str,
    path: &Path,
    lines: &validate::KeyLines<'_>,
    problems: &mut Vec<String>,
    unusable: &mut Vec<String>,
) -> Option<RawConfig> {
    use serde::Deserialize;
    let mut table = match toml::de::DeTable::parse(text) {
        Ok(table) => table,
        Err(e) => {
            problems.push(toml_error_line(path, text, &e, None));
            return None;
        }
    };
    fill_required(table.get_mut(), None, path, lines, problems, unusable);
    for _ in 0..64 {
        let error = match RawConfig::deserialize(toml::de::Deserializer::from(table.clone())) {
            Ok(raw) => return Some(raw),
            Err(error) => error,
        };
        let removed = error
            .span()
            .and_then(|span| validate::remove_key_at(table.get_mut(), &span));
        let problem = toml_error_line(path, text, &error, removed.as_deref());
        let Some(key) = removed else {
            problems.push(problem);
            return None;
        };
        problems.push(problem);
        fill_required(table.get_mut(), Some(&key), path, lines, problems, unusable);
    }
    None
}

/// Puts a placeholder at each required key `table` lacks (named in `unusable`), and reports it as missing unless
/// its value, or its table, was the key `refused` just now (already reported).
fn fill_required(
    table: &mut toml::de::DeTable<'_>,
    refused: Option<&str>,
    path: &Path,
    lines: &validate::KeyLines<'_>,
    problems: &mut Vec<String>,
    unusable: &mut Vec<String>,
) {
    for (key, list) in REQUIRED {
        // Present, or under a key of another type (`server = 5`) whose refusal comes from the deserializer.
        let parent = key.split('.').next().unwrap_or(key);
        if validate::has_key(table, key) || validate::is_non_table(table, parent) {
            continue;
        }
        let under_refused = refused
            .is_some_and(|r| key == r || key.strip_prefix(r).is_some_and(|k| k.starts_with('.')));
        if !under_refused {
            problems.push(match lines.line_of(parent) {
                Some(line) => format!("{}: line {line}: {key}: missing (required)", path.display()),
                None => format!("{}: {key}: missing (required)", path.display()),
            });
        }
        validate::insert_placeholder(table, key, list);
        unusable.push(key.to_owned());
    }
}

/// Parses `"64KiB"`, `"64MiB"`, `"1GiB"`, `"512B"` into bytes.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
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
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Parses `"10s"`, `"500ms"`, `"5m"`, `"1h"` (an integer and a unit, nothing else).
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits_end);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86_400).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
