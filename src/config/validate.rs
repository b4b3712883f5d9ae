//! Raw values to typed ones; one run reports every problem, each named with its key.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;

use super::raw::*;
use super::*;

/// Collects problems while converting raw values, so that one run reports all of them.
pub(super) struct Converter<'a> {
    pub(super) base: &'a Path,
    pub(super) file: String,
    pub(super) problems: Vec<String>,
    /// Where each key is written, to name its line.
    pub(super) lines: KeyLines<'a>,
    /// Required keys already reported missing or refused (their placeholders are not reported again).
    pub(super) unusable: &'a [String],
}

impl Converter<'_> {
    /// `file: line L: key: message`, or without the line when the key is not written (a default, or a
    /// composite key such as `sds.systems / sds.endpoints`).
    pub(super) fn problem(&mut self, key: &str, message: impl fmt::Display) {
        if self.unusable.iter().any(|k| k == key) {
            return;
        }
        let problem = match self.lines.line_of(key) {
            Some(line) => format!("{}: line {line}: {key}: {message}", self.file),
            None => format!("{}: {key}: {message}", self.file),
        };
        self.problems.push(problem);
    }

    pub(super) fn sds(&mut self, raw: RawSds) -> SdsConfig {
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

    pub(super) fn path(&self, path: PathBuf) -> PathBuf {
        if path.is_absolute() {
            path
        } else {
            self.base.join(path)
        }
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        raw: Option<String>,
        default: Duration,
    ) -> Duration {
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

    pub(super) fn server(&mut self, raw: RawServer) -> ServerConfig {
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
            selftest: raw.selftest.unwrap_or(false),
            proxy_protocol_from,
            max_connections: max_connections.max(1),
            workers: match raw.workers {
                Some(n) if n > 1024 => {
                    self.problem("server.workers", "must be at most 1024 (0 is one per CPU)");
                    1
                }
                Some(n @ 1..) => n,
                _ => std::thread::available_parallelism().map_or(1, usize::from),
            },
            methods,
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.shutdown_grace,
                Duration::from_secs(30),
            ),
        }
    }

    pub(super) fn log(&mut self, raw: RawLog) -> LogConfig {
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

    pub(super) fn audit(&mut self, raw: RawAudit) -> AuditConfig {
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

    pub(super) fn jwt(&mut self, raw: RawJwt) -> JwtConfig {
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

    pub(super) fn limits(&mut self, raw: RawLimits) -> LimitsConfig {
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
        let max_header_count = raw.max_header_count.unwrap_or(90);
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

    pub(super) fn upstream(&mut self, raw: RawUpstream) -> UpstreamConfig {
        if raw.ca.is_empty() {
            self.problem("upstream.ca", "at least one CA file is required");
        }
        let mut resolve = HashMap::new();
        for (name, addr) in raw.resolve {
            let key = format!("upstream.resolve.\"{name}\"");
            if host_and_port(&name).is_none() {
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

/// The host of `"host:port"` (a bracketed IPv6 host without its brackets) when the host is not empty and the port
/// is 1 to 65535; `None` otherwise.
pub(super) fn host_and_port(text: &str) -> Option<&str> {
    let (host, port) = text.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
        .then(|| host.trim_start_matches('[').trim_end_matches(']'))
}

/// `"path: line L, column C: [key: ]message"` for a TOML syntax or type error, on one line.
pub(super) fn toml_error_line(
    path: &Path,
    text: &str,
    err: &toml::de::Error,
    key: Option<&str>,
) -> String {
    let message = err.message().trim().replace('\n', " ");
    let key = key.map(|k| format!("{k}: ")).unwrap_or_default();
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!(
                "{}: line {line}, column {col}: {key}{message}",
                path.display()
            )
        }
        None => format!("{}: {key}{message}", path.display()),
    }
}

/// The host name, for `audit.instance`.
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ssp".to_owned())
}

/// The line each dotted key of a config text is written on, from the TOML parser's spans.
pub(super) struct KeyLines<'a> {
    text: &'a str,
    table: Option<toml::Spanned<toml::de::DeTable<'a>>>,
}

impl<'a> KeyLines<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self {
            text,
            table: toml::de::DeTable::parse(text).ok(),
        }
    }

    /// The line of every key the text writes, by dotted name.
    pub(super) fn all(&self) -> std::collections::BTreeMap<String, usize> {
        fn walk(
            text: &str,
            table: &toml::de::DeTable<'_>,
            prefix: &str,
            out: &mut std::collections::BTreeMap<String, usize>,
        ) {
            for (name, value) in table.iter() {
                let key = if prefix.is_empty() {
                    name.get_ref().to_string()
                } else {
                    format!("{prefix}.{}", name.get_ref())
                };
                if let toml::de::DeValue::Table(inner) = value.get_ref() {
                    walk(text, inner, &key, out);
                }
                out.insert(key, line_col(text, name.span().start).0);
            }
        }
        let mut out = std::collections::BTreeMap::new();
        if let Some(table) = &self.table {
            walk(self.text, table.get_ref(), "", &mut out);
        }
        out
    }

    /// The 1-based line of `key` (`server.listen`), if the text writes it.
    pub(super) fn line_of(&self, key: &str) -> Option<usize> {
        let mut table = self.table.as_ref()?.get_ref();
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            let (name, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
            if parts.peek().is_none() {
                return Some(line_col(self.text, name.span().start).0);
            }
            match value.get_ref() {
                toml::de::DeValue::Table(inner) => table = inner,
                _ => return None,
            }
        }
        None
    }
}

/// Removes from `table` the key whose name or value the error `span` points into, innermost first, and returns
/// its dotted name; `None` when no key holds the span (the error is about a whole table, such as a missing key).
pub(super) fn remove_key_at(
    table: &mut toml::de::DeTable<'_>,
    span: &std::ops::Range<usize>,
) -> Option<String> {
    let within = |outer: std::ops::Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let mut found = None;
    for (name, value) in table.iter_mut() {
        if let toml::de::DeValue::Table(inner) = value.get_mut()
            && let Some(inner_key) = remove_key_at(inner, span)
        {
            return Some(format!("{}.{inner_key}", name.get_ref()));
        }
        let is_table = matches!(value.get_ref(), toml::de::DeValue::Table(_));
        if within(name.span()) || (within(value.span()) && !is_table) {
            found = Some(name.clone());
            break;
        }
    }
    let name = found?;
    table.remove(&name)?;
    Some(name.get_ref().to_string())
}

/// Whether `table` holds `name` with a value that is not a table.
pub(super) fn is_non_table(table: &toml::de::DeTable<'_>, name: &str) -> bool {
    table.iter().any(|(k, v)| {
        k.get_ref().as_ref() == name && !matches!(v.get_ref(), toml::de::DeValue::Table(_))
    })
}

/// Whether `table` holds the dotted `key`.
pub(super) fn has_key(table: &toml::de::DeTable<'_>, key: &str) -> bool {
    let mut table = table;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part) else {
            return false;
        };
        if parts.peek().is_none() {
            return true;
        }
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => table = inner,
            _ => return false,
        }
    }
    false
}

/// Puts an empty placeholder (`""`, or `[]` when `list`) at the dotted `key`, making the tables on the way, so
/// that a config missing a required key can still be read for everything else.
pub(super) fn insert_placeholder(table: &mut toml::de::DeTable<'_>, key: &str, list: bool) {
    use std::borrow::Cow;
    use toml::Spanned;
    use toml::de::{DeArray, DeTable, DeValue};
    let (parents, last) = key.rsplit_once('.').map_or(("", key), |(p, l)| (p, l));
    let mut at = table;
    for part in parents.split('.').filter(|p| !p.is_empty()) {
        let exists = at.iter().any(|(k, _)| k.get_ref().as_ref() == part);
        if !exists {
            at.insert(
                Spanned::new(0..0, Cow::Owned(part.to_owned())),
                Spanned::new(0..0, DeValue::Table(DeTable::new())),
            );
        }
        let Some(next) = at
            .iter_mut()
            .find(|(k, _)| k.get_ref().as_ref() == part)
            .and_then(|(_, v)| match v.get_mut() {
                DeValue::Table(inner) => Some(inner),
                _ => None,
            })
        else {
            return;
        };
        at = next;
    }
    let value = if list {
        DeValue::Array(DeArray::new())
    } else {
        DeValue::String(Cow::Borrowed(""))
    };
    at.insert(
        Spanned::new(0..0, Cow::Owned(last.to_owned())),
        Spanned::new(0..0, value),
    );
}
