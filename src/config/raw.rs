//! The config file's schema, as written: every key with its unit and default in its doc line.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) policy: RawPolicy,
    #[serde(default)]
    pub(super) jwt: RawJwt,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) limits: RawLimits,
    /// The Spine Directory Service, for `ssp policy sds`. Optional.
    pub(super) sds: Option<RawSds>,
    #[serde(default)]
    pub(super) radar: RawRadar,
    #[serde(default)]
    pub(super) evidence: RawEvidence,
    /// The patient-facing listener. Optional.
    pub(super) patient_facing: Option<RawPatientFacing>,
}

/// `[patient_facing]` as written: the second consumer listener, for patient-facing apps with NHS login access
/// tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPatientFacing {
    /// `ip:port`. Required.
    pub(super) listen: Option<String>,
    /// The directory `[[system]]` patient-facing requests are sent as (its agreements apply). Required.
    pub(super) asid: Option<String>,
    /// Server certificate and key. Default `server.cert` and `server.key`.
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    /// CA file(s) of the platform's client certificates; empty (the default): no client certificate asked for.
    #[serde(default)]
    pub(super) client_ca: Vec<PathBuf>,
    /// CRLs for those certificates, as `server.crl` (and `server.crl_expired`) for the consumers'.
    #[serde(default)]
    pub(super) crl: Vec<PathBuf>,
    /// The access tokens' `iss`. Required.
    pub(super) issuer: Option<String>,
    /// The `aud` they must carry. Required.
    pub(super) audience: Option<String>,
    /// Accepted `alg`s, from RS256, RS512, ES256. Default all three.
    pub(super) algorithms: Option<Vec<String>>,
    /// A JWKS file, or an `https://` URL. Required.
    pub(super) jwks: Option<String>,
    /// CA file(s) the JWKS URL's certificate is checked against. Default `upstream.ca`.
    #[serde(default)]
    pub(super) jwks_ca: Vec<PathBuf>,
    /// How often the JWKS is fetched again. Default `5m`.
    pub(super) jwks_refresh: Option<String>,
    /// How long a key stays usable after the last fetch that listed it. Default `1h`.
    pub(super) jwks_stale: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default `30s`, at most `5m`.
    pub(super) leeway: Option<String>,
    /// The scope the token must carry. Required.
    pub(super) scope: Option<String>,
    /// Lowest `identity_proofing_level` accepted (`P0`, `P5`, `P9`). Default `P9`.
    pub(super) min_proofing: Option<String>,
    /// The claim (dotted path) holding the patient's GP practice ODS code, when the tokens carry it.
    pub(super) ods_claim: Option<String>,
    /// A file of `nhs_number,ods` lines: the practices of patients whose token does not name it.
    pub(super) practices: Option<PathBuf>,
    /// The private key (PKCS#8 PEM, RSA or EC P-256) that signs the client assertions. Required.
    pub(super) assertion_key: Option<PathBuf>,
    /// How long before its expiry a supplier token is exchanged again. Default `30s`.
    pub(super) token_refresh_before: Option<String>,
    /// How long a token exchange may take. Default `5s`.
    pub(super) token_timeout: Option<String>,
    /// How long a supplier's token endpoint is not called after it failed. Default `10s`.
    pub(super) exchange_backoff: Option<String>,
    /// Requests per minute per app (`client_id`); 0 turns it off. Default 0.
    pub(super) requests_per_minute_per_app: Option<u32>,
    /// Concurrent connections to the door, apart from `server.max_connections`. Default 10000.
    pub(super) max_connections: Option<usize>,
    /// The paths it serves and the interaction each is.
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
}

/// One `[[patient_facing.route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    /// The path the request's starts with, at a segment boundary (`/Appointment` serves `/Appointment/1`).
    pub(super) path: String,
    /// Default `["GET"]`.
    pub(super) methods: Option<Vec<String>>,
    /// The interaction id the directory and agreements know it by.
    pub(super) interaction: String,
}

/// `ssp evidence`: the information-governance evidence pack.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvidence {
    /// The Ed25519 private key (PKCS#8 PEM, `openssl genpkey -algorithm ed25519`) that signs a pack's manifest.
    /// Needed by `ssp evidence` only.
    pub(super) key: Option<PathBuf>,
}

/// The patient index (`[audit.patients]`): NHS numbers in requests kept as HMAC-SHA256 only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPatients {
    /// The HMAC key file: 32 or more random bytes, mode 0400. Required.
    pub(super) key: PathBuf,
    /// Write `hmac:<hex>` in the records' `target` in place of each number. Default false.
    pub(super) redact: Option<bool>,
    /// Read the first 16 KiB of structured record request bodies for the number. Default false.
    pub(super) read_bodies: Option<bool>,
}

/// `[audit.ship]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShip {
    /// `host:port` of the syslog collector (rsyslog, syslog-ng). Required.
    pub(super) collector: Option<String>,
    /// `tls` (RFC 5425, the default) or `tcp` (a relay on loopback only).
    pub(super) transport: Option<String>,
    /// CA file(s) the collector's certificate is checked against. Required with `tls`.
    #[serde(default)]
    pub(super) ca: Vec<PathBuf>,
    /// This instance's client certificate and key. Default `upstream.cert` and `upstream.key`.
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    /// The name the collector's certificate must carry. Default the host of `collector`.
    pub(super) server_name: Option<String>,
    /// Ed25519 private key (PKCS#8 PEM, mode 0400 or 0600) that signs the chain heads. Required.
    pub(super) head_key: Option<PathBuf>,
    /// How often a signed chain head is sent. Default `60s`.
    pub(super) head_interval: Option<String>,
    /// How long one connection carries records before their receipt is confirmed. Default `1s`.
    pub(super) confirm_interval: Option<String>,
    /// RFC 5424 HOSTNAME. Default `audit.instance`.
    pub(super) hostname: Option<String>,
}

/// The consumer credential radar: the certificates registered consumers present, kept in
/// `<audit.dir>/consumer-certs.json`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRadar {
    /// A certificate seen within this long counts for `ssp_consumer_cert_expiry_timestamp_seconds`. Default `30d`.
    pub(super) window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSds {
    /// The SDS FHIR API base URL (https), e.g. `https://api.service.nhs.uk/spine-directory/FHIR/R4`. Needed for a
    /// live fetch only.
    pub(super) base_url: Option<String>,
    /// The file holding the API key sent as `apikey`. Needed for a live fetch only.
    pub(super) api_key_file: Option<PathBuf>,
    /// PEM roots the SDS server's certificate must chain to. Default the system bundle.
    pub(super) ca: Option<Vec<PathBuf>>,
    /// ODS codes whose accredited systems are consumers (`[[system]]`).
    #[serde(default)]
    pub(super) systems: Vec<String>,
    /// ODS codes whose accredited systems are providers (`[[endpoint]]`).
    #[serde(default)]
    pub(super) endpoints: Vec<String>,
    /// Interaction URNs to resolve (and to keep in the entries).
    #[serde(default)]
    pub(super) interactions: Vec<String>,
    /// One request, connection to last byte. Default `10s`.
    pub(super) timeout: Option<String>,
    /// Retries of a request answered 429, each after its `Retry-After` (at most 30 s). Default 3.
    pub(super) max_retries: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    /// Consumer-facing `ip:port`. Default `127.0.0.1:8443`.
    pub(super) listen: Option<String>,
    /// PEM certificate chain, leaf first. Required.
    pub(super) cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Required.
    pub(super) key: PathBuf,
    /// PEM roots that consumer certificates must chain to. Required, at least one.
    pub(super) client_ca: Vec<PathBuf>,
    /// PEM CRLs checked on every handshake. Default none.
    #[serde(default)]
    pub(super) crl: Vec<PathBuf>,
    /// `"1.2"` and/or `"1.3"`. Default both.
    pub(super) tls_versions: Option<Vec<String>>,
    /// Longest a TLS handshake may take. Default `10s`.
    pub(super) handshake_timeout: Option<String>,
    /// Longest a client may take to send a request's headers, and longest an HTTP/1.1 connection may stay with
    /// no request in flight (from the handshake, and between requests). Default `30s`.
    pub(super) header_read_timeout: Option<String>,
    /// Longest an HTTP/2 connection may stay with no open stream before GOAWAY and close. Default `60s`.
    pub(super) http2_idle_timeout: Option<String>,
    /// `"refuse"` (a handshake whose revocation status rests on a CRL past its nextUpdate is refused) or
    /// `"allow"` (accepted, logged as an error). Default `"refuse"`.
    pub(super) crl_expired: Option<String>,
    /// Send the names of the `client_ca` roots in the CertificateRequest. Default `true`; `false` when the names
    /// exceed what one TLS message can carry.
    pub(super) client_ca_hints: Option<bool>,
    /// Networks (`"10.0.0.0/24"`, or a bare address) of layer-4 balancers whose connections start with a PROXY
    /// protocol header (v1 or v2), which is then required; from anywhere else a PROXY header is refused. Default
    /// none.
    #[serde(default)]
    pub(super) proxy_protocol_from: Vec<String>,
    /// Answer `GET /_ssp/selftest` on the consumer listener with the verdict of checks 1 to 12 for the caller's
    /// own certificate and headers (docs/integrator-guide.md). Default `false`.
    pub(super) selftest: Option<bool>,
    /// Concurrent consumer connections; further ones wait in the listen backlog. Default 10000.
    pub(super) max_connections: Option<usize>,
    /// Threads serving consumer connections, each with its own event loop, taking connections from the one
    /// listening socket. Default 0: one per CPU this process may run on.
    pub(super) workers: Option<usize>,
    /// Methods allowed (check 2). Default GET, POST, PUT, DELETE, PATCH.
    pub(super) methods: Option<Vec<String>>,
    /// How long open exchanges may run after SIGTERM before their connections are closed. Default `30s`.
    pub(super) shutdown_grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    /// The proxy's own client certificate toward providers (PEM chain). Required.
    pub(super) cert: PathBuf,
    /// Its private key. Required.
    pub(super) key: PathBuf,
    /// PEM roots that provider server certificates must chain to. Required, at least one.
    pub(super) ca: Vec<PathBuf>,
    /// TCP connect plus TLS handshake. Default `5s`.
    pub(super) connect_timeout: Option<String>,
    /// Until the provider's response headers. Default `60s`.
    pub(super) response_timeout: Option<String>,
    /// Longest silence inside a streaming body. Default `60s`.
    pub(super) body_idle_timeout: Option<String>,
    /// Idle pooled connections are closed after this. Default `90s`.
    pub(super) pool_idle_timeout: Option<String>,
    /// Idle pooled connections kept per provider. Default 256, as `limits.per_provider_connections`.
    pub(super) pool_max_idle_per_host: Option<usize>,
    /// Static name resolution, `"host:port" = "ip:port"`. Default none (system resolver).
    #[serde(default)]
    pub(super) resolve: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    /// Folder of policy `*.toml` files. Default `policies`.
    pub(super) dir: Option<PathBuf>,
    /// The sled database of imported generations. Default `data/policy`.
    pub(super) store: Option<PathBuf>,
    /// Generations kept in the store. Default 20.
    pub(super) keep_generations: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    /// `off`, `audit` (record violations, forward) or `enforce` (refuse with 400). Default `enforce`.
    pub(super) mode: Option<String>,
    /// `gpconnect-1` (STU3) or `gpconnect-0.7` (DSTU2). Default `gpconnect-1`.
    pub(super) profile: Option<String>,
    /// How far in the future `iat` may be. Default `300s`.
    pub(super) max_future_skew: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// `ip:port` of /metrics, /healthz and /readyz (plain HTTP: keep it on loopback or a management network).
    /// Default `127.0.0.1:9090`.
    pub(super) listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    /// `human` or `json` (one JSON object per line, for journald and log shippers). Default `human`.
    pub(super) format: Option<String>,
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG`, when set, wins. Default `info`.
    pub(super) level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    /// Folder of the audit segments. Default `data/audit`.
    pub(super) dir: Option<PathBuf>,
    /// `batched` (written before forwarding, fsynced every `fsync_interval`) or `strict` (fsynced before
    /// forwarding). Default `batched`.
    pub(super) durability: Option<String>,
    /// Longest time written records wait for an fsync in `batched` mode. Default `10ms`.
    pub(super) fsync_interval: Option<String>,
    /// A segment is sealed and a new one started past this size. Default `64MiB`.
    pub(super) segment_size: Option<String>,
    /// This instance's name in every record. Default the host name.
    pub(super) instance: Option<String>,
    /// The patient index. Absent: no NHS number is read or recorded apart from the target as sent.
    pub(super) patients: Option<RawPatients>,
    /// Shipping to a syslog collector. Absent: the log stays in local files.
    pub(super) ship: Option<RawShip>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    /// Requests per second one consumer ASID may send (token bucket). 0 or absent: unlimited.
    pub(super) per_consumer_rps: Option<u32>,
    /// Requests a consumer may send at once above its rate after a quiet spell. Default `per_consumer_rps`.
    pub(super) per_consumer_burst: Option<u32>,
    /// Exchanges one consumer ASID may have open at once. 0 or absent: unlimited.
    pub(super) per_consumer_concurrency: Option<u32>,
    /// Exchanges one provider ASID may have open at once, over all consumers. 0 or absent: unlimited.
    pub(super) per_provider_concurrency: Option<u32>,
    /// TLS connections the proxy may hold open to one provider (host:port), idle ones included. Default 256.
    pub(super) per_provider_connections: Option<u32>,
    /// Bytes of request headers (names plus values) a request may carry. Default `64KiB`.
    pub(super) max_header_bytes: Option<String>,
    /// Header fields a request may carry. Default 100.
    pub(super) max_header_count: Option<u32>,
}
