//! `[audit.ship]`: where the transaction log is shipped (`audit::ship` ships it), validated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::UpstreamConfig;
use super::raw::RawShip;
use super::validate::{Converter, host_and_port};

/// How records reach the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipTransport {
    /// RFC 5425: TLS with this instance's client certificate, the collector checked against `ca` and
    /// `server_name`.
    Tls {
        ca: Vec<PathBuf>,
        cert: PathBuf,
        key: PathBuf,
        server_name: String,
    },
    /// Plain TCP (RFC 6587 octet counting) to a relay on this host: loopback addresses only.
    Tcp,
}

/// `[audit.ship]`, validated.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// `host:port` of the collector.
    pub collector: String,
    pub transport: ShipTransport,
    /// The Ed25519 key (PKCS#8 PEM) that signs the chain heads.
    pub head_key: PathBuf,
    /// How often a signed chain head is sent. Default 60 s.
    pub head_interval: Duration,
    /// How long one connection carries records before it is closed and the collector's reading of them
    /// confirmed (the shipped position moves only then). Default 1 s.
    pub confirm_interval: Duration,
    /// RFC 5424 HOSTNAME of every message. Default `audit.instance`.
    pub hostname: String,
}

impl Converter<'_> {
    pub(super) fn ship(
        &mut self,
        raw: RawShip,
        upstream: &UpstreamConfig,
        instance: &str,
    ) -> ShipConfig {
        let collector = raw.collector.unwrap_or_else(|| {
            self.problem("audit.ship.collector", "missing (required)");
            "localhost:6514".into()
        });
        let head_key = raw.head_key.unwrap_or_else(|| {
            self.problem("audit.ship.head_key", "missing (required)");
            // Empty: the checks of the files leave it alone, the problem is said.
            PathBuf::new()
        });
        let host = host_and_port(&collector).map(str::to_owned);
        if host.is_none() {
            self.problem(
                "audit.ship.collector",
                format_args!("{collector:?} is not \"host:port\""),
            );
        }
        let transport = match raw.transport.as_deref().unwrap_or("tls") {
            "tls" => {
                if raw.ca.is_empty() {
                    self.problem("audit.ship.ca", "at least one CA file is required with tls");
                }
                let server_name = raw.server_name.or(host).unwrap_or_default();
                if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
                    self.problem(
                        "audit.ship.server_name",
                        format_args!("{server_name:?} is not a DNS name or IP address"),
                    );
                }
                ShipTransport::Tls {
                    ca: raw.ca.into_iter().map(|p| self.path(p)).collect(),
                    // The defaults are paths already resolved against the config's folder.
                    cert: raw
                        .cert
                        .map_or_else(|| upstream.cert.clone(), |p| self.path(p)),
                    key: raw
                        .key
                        .map_or_else(|| upstream.key.clone(), |p| self.path(p)),
                    server_name,
                }
            }
            "tcp" => {
                let loopback = collector
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip().is_loopback());
                if !loopback {
                    self.problem(
                        "audit.ship.collector",
                        "with transport = \"tcp\" the collector must be a loopback ip:port (a relay on this \
                         host); use tls to reach another host",
                    );
                }
                ShipTransport::Tcp
            }
            other => {
                self.problem(
                    "audit.ship.transport",
                    format_args!("{other:?} is not \"tls\" or \"tcp\""),
                );
                ShipTransport::Tcp
            }
        };
        let hostname = raw.hostname.unwrap_or_else(|| instance.to_owned());
        // RFC 5424 section 6.2.4: HOSTNAME is 1*255 PRINTUSASCII (no space).
        if hostname.is_empty()
            || hostname.len() > 255
            || !hostname.bytes().all(|b| (33..=126).contains(&b))
        {
            self.problem(
                "audit.ship.hostname",
                "must be 1 to 255 printable US-ASCII characters without spaces (RFC 5424 HOSTNAME); set it \
                 when audit.instance has other characters",
            );
        }
        ShipConfig {
            collector,
            transport,
            head_key: if head_key.as_os_str().is_empty() {
                head_key
            } else {
                self.path(head_key)
            },
            head_interval: self.duration(
                "audit.ship.head_interval",
                raw.head_interval,
                Duration::from_secs(60),
            ),
            confirm_interval: self.duration(
                "audit.ship.confirm_interval",
                raw.confirm_interval,
                Duration::from_secs(1),
            ),
            hostname,
        }
    }
}
