//! The directory and the data-sharing agreements (DESIGN.md 1.3), and the decision for one request: checks 5 to 9
//! of DESIGN.md 1.4, first failure wins.
//!
//! Policy files are validated whole (every problem named with its file and line) and compiled into an immutable
//! [`Policy`] snapshot that request handling reads without locks. A [`Permit`] can only be made here, and the
//! forwarder takes nothing else: a request that skipped the check cannot be forwarded. This module knows
//! nothing of HTTP types or sockets.

pub mod sds;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Problems, line_col};
use crate::ids::{Asid, InteractionId, OdsCode, PeerIdentity};
use crate::jwt::VerifyingKey;
use crate::ssp::{SspRequest, Target};

/// Largest policy file read; a directory of 20,000 systems is a few MiB.
const MAX_POLICY_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// A system's registered token keys, shared by every permit for it.
pub type JwtKeys = Arc<[VerifyingKey]>;

/// An accredited sending system (SDS accredited-system record).
#[derive(Debug, Clone)]
pub struct System {
    pub asid: Asid,
    pub name: String,
    pub ods: OdsCode,
    /// Must equal the client certificate's CN or one of its DNS SANs (check 5); lower case.
    pub fqdn: Arc<str>,
    /// What this system may send (check 6).
    pub interactions: HashSet<InteractionId>,
    /// Keys its audit tokens must be signed with; `None`: unsigned GP Connect tokens.
    pub jwt_keys: Option<JwtKeys>,
}

/// A provider endpoint (SDS MHS record).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub asid: Asid,
    pub party_key: String,
    pub cpa_id: String,
    pub ods: OdsCode,
    /// The registered `nhsMhsEndPoint`, no trailing slash; targets must continue it exactly (check 9).
    pub url: String,
    /// What this endpoint handles (check 7).
    pub interactions: HashSet<InteractionId>,
}

/// Which interactions an agreement covers.
#[derive(Debug, Clone)]
pub enum Grant {
    All,
    Only(HashSet<InteractionId>),
}

impl Grant {
    fn covers(&self, interaction: &InteractionId) -> bool {
        match self {
            Grant::All => true,
            Grant::Only(set) => set.contains(interaction),
        }
    }
}

/// A data-sharing agreement from one consumer system to one provider endpoint.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub id: String,
    pub from: Asid,
    pub to: Asid,
    pub interactions: Grant,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

impl Agreement {
    fn in_force(&self, now: SystemTime) -> bool {
        self.not_before.is_none_or(|t| now >= t) && self.not_after.is_none_or(|t| now <= t)
    }
}

/// An immutable, compiled policy: what request handling reads.
#[derive(Debug, Default)]
pub struct Policy {
    /// Which import produced this snapshot; named by every decision.
    pub generation: u64,
    systems: HashMap<Asid, System>,
    endpoints: HashMap<Asid, Arc<Endpoint>>,
    /// Agreements by sending system; a consumer has a handful, so the receiver is found by a short scan.
    agreements: HashMap<Asid, Vec<Agreement>>,
    /// Every interaction some system sends or some endpoint handles: the bounded set of metric labels.
    known: HashSet<InteractionId>,
}

/// Permission to forward one request. Only [`Policy::check`] makes one, and it owns the request it checked, so
/// what is forwarded is exactly what was permitted.
#[derive(Debug)]
pub struct Permit {
    request: SspRequest,
    endpoint: Arc<Endpoint>,
    /// The sender's registered token keys, for check 10.
    jwt_keys: Option<JwtKeys>,
    /// The sender's registered FQDN, which the client certificate's CN or one of its DNS SANs matched (check 5).
    fqdn: Arc<str>,
    generation: u64,
}

impl Permit {
    pub fn request(&self) -> &SspRequest {
        &self.request
    }

    pub fn target(&self) -> &Target {
        &self.request.target
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The certificate name (CN or DNS SAN, lower case) that check 5 matched.
    pub fn fqdn(&self) -> &Arc<str> {
        &self.fqdn
    }

    /// The keys the sender's token must be signed with, if it registered any.
    pub fn jwt_keys(&self) -> Option<&[VerifyingKey]> {
        self.jwt_keys.as_deref()
    }
}

/// Why a request was refused by checks 5 to 9.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Check 5: the certificate does not carry the FQDN registered for `Ssp-From`.
    FqdnMismatch { from: Asid },
    /// Check 6: `Ssp-From` is unknown or not accredited for the interaction.
    SenderNotAccredited { from: Asid },
    /// Check 7: no endpoint `Ssp-To` handles the interaction.
    ReceiverCannotHandle { to: Asid },
    /// Check 8: no agreement in force covers from -> to for the interaction.
    NoAgreement { from: Asid, to: Asid },
    /// Check 9: the target URL does not continue the endpoint's registered URL.
    TargetVaries {
        url: String,
        cpa_id: String,
        target: String,
    },
}

impl Denial {
    /// The check number of DESIGN.md 1.4.
    pub fn check(&self) -> u8 {
        match self {
            Denial::FqdnMismatch { .. } => 5,
            Denial::SenderNotAccredited { .. } => 6,
            Denial::ReceiverCannotHandle { .. } => 7,
            Denial::NoAgreement { .. } => 8,
            Denial::TargetVaries { .. } => 9,
        }
    }

    /// A bounded label for logs and metrics (never an ASID or URL).
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::FqdnMismatch { .. } => "fqdn_check_failed",
            Denial::SenderNotAccredited { .. } => "asid_check_failed",
            Denial::ReceiverCannotHandle { .. } => "partykey_interaction_check_failed",
            Denial::NoAgreement { .. } => "fot_check_failed",
            Denial::TargetVaries { .. } => "endpoint_varies_from_target_url",
        }
    }

    /// The consumer-facing text, exactly as the contract gives it.
    pub fn text(&self) -> String {
        match self {
            Denial::FqdnMismatch { from } => format!("FQDN_CHECK_FAILED_MESSAGESENDER_{from}"),
            Denial::SenderNotAccredited { from } => {
                format!("ASID_CHECK_FAILED_MESSAGESENDER_{from}")
            }
            Denial::ReceiverCannotHandle { to } => {
                format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{to}")
            }
            Denial::NoAgreement { from, to } => {
                format!("FOT_CHECK_FAILED_MESSAGESENDER_{from}_MESSAGERECEIVER_{to}")
            }
            Denial::TargetVaries {
                url,
                cpa_id,
                target,
            } => format!("ENDPOINT_{url}_CPAID_{cpa_id}_VARIES_FROM_TARGETURL_{target}"),
        }
    }
}

/// One check of an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub number: u8,
    pub name: &'static str,
    pub outcome: StepOutcome,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Pass,
    Fail,
    Skip,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Pass => "pass",
            StepOutcome::Fail => "FAIL",
            StepOutcome::Skip => "skip",
        }
    }
}

/// What `ssp policy check` prints: every check with its reason, and the decision (the first failure wins).
#[derive(Debug, Clone)]
pub struct Explained {
    pub generation: u64,
    pub steps: Vec<Step>,
    pub decision: Result<(), Denial>,
}

fn sorted(set: &HashSet<InteractionId>) -> String {
    let mut list: Vec<&str> = set.iter().map(InteractionId::as_str).collect();
    list.sort_unstable();
    if list.is_empty() {
        "(nothing)".into()
    } else {
        list.join(", ")
    }
}

/// The outcome of a policy check.
#[derive(Debug)]
pub enum Decision {
    Permit(Permit),
    Deny(Denial),
}

impl Policy {
    /// Checks 5 to 9 for a request from the consumer `peer`, at time `now`. Consumes the request: a permit owns it.
    pub fn check(&self, request: SspRequest, peer: &PeerIdentity, now: SystemTime) -> Decision {
        match self.evaluate(&request, peer, now) {
            Ok((endpoint, system)) => Decision::Permit(Permit {
                endpoint,
                jwt_keys: system.jwt_keys.clone(),
                fqdn: Arc::clone(&system.fqdn),
                request,
                generation: self.generation,
            }),
            Err(denial) => Decision::Deny(denial),
        }
    }

    fn evaluate(
        &self,
        request: &SspRequest,
        peer: &PeerIdentity,
        now: SystemTime,
    ) -> Result<(Arc<Endpoint>, &System), Denial> {
        let h = &request.headers;
        let system = self.systems.get(&h.from);
        // 5: only a known sender has a registered FQDN to compare; an unknown one fails at 6.
        if let Some(system) = system
            && !peer.has_fqdn(&system.fqdn)
        {
            return Err(Denial::FqdnMismatch {
                from: h.from.clone(),
            });
        }
        // 6
        let Some(system) = system.filter(|s| s.interactions.contains(&h.interaction)) else {
            return Err(Denial::SenderNotAccredited {
                from: h.from.clone(),
            });
        };
        // 7
        let endpoint = self
            .endpoints
            .get(&h.to)
            .filter(|e| e.interactions.contains(&h.interaction))
            .ok_or_else(|| Denial::ReceiverCannotHandle { to: h.to.clone() })?;
        // 8
        let agreed = self.agreements.get(&h.from).is_some_and(|list| {
            list.iter()
                .any(|a| a.to == h.to && a.interactions.covers(&h.interaction) && a.in_force(now))
        });
        if !agreed {
            return Err(Denial::NoAgreement {
                from: h.from.clone(),
                to: h.to.clone(),
            });
        }
        // 9
        if !request.target.is_under(&endpoint.url) {
            return Err(Denial::TargetVaries {
                url: endpoint.url.clone(),
                cpa_id: endpoint.cpa_id.clone(),
                target: request.target.as_str().to_owned(),
            });
        }
        Ok((Arc::clone(endpoint), system))
    }

    /// Explains checks 5 to 9 for a request, check by check, for `ssp policy check`. `fqdn` stands for the client
    /// certificate's name (absent: check 5 is skipped). The decision is the one [`Policy::check`] makes.
    pub fn explain(&self, request: &SspRequest, fqdn: Option<&str>, now: SystemTime) -> Explained {
        let h = &request.headers;
        let urn = h.interaction.as_str();
        let system = self.systems.get(&h.from);
        let endpoint = self.endpoints.get(&h.to);
        let mut steps = Vec::new();
        let mut step = |number, name, outcome, detail: String| {
            steps.push(Step {
                number,
                name,
                outcome,
                detail,
            })
        };
        use StepOutcome::*;

        match (system, fqdn) {
            (None, _) => step(
                5,
                "fqdn",
                Skip,
                format!("{} is not in the directory (fails at 6)", h.from),
            ),
            (Some(s), None) => step(
                5,
                "fqdn",
                Skip,
                format!("no --fqdn given; {} must present {}", h.from, s.fqdn),
            ),
            (Some(s), Some(f)) if f.eq_ignore_ascii_case(&s.fqdn) => step(
                5,
                "fqdn",
                Pass,
                format!("{f} is the FQDN registered for {}", h.from),
            ),
            (Some(s), Some(f)) => step(
                5,
                "fqdn",
                Fail,
                format!("{f} is not {}, the FQDN registered for {}", s.fqdn, h.from),
            ),
        }
        match system {
            None => step(
                6,
                "sender",
                Fail,
                format!("{} is not an accredited system", h.from),
            ),
            Some(s) if s.interactions.contains(&h.interaction) => step(
                6,
                "sender",
                Pass,
                format!("{} ({}) may send {urn}", h.from, s.name),
            ),
            Some(s) => step(
                6,
                "sender",
                Fail,
                format!(
                    "{} ({}) may send only: {}",
                    h.from,
                    s.name,
                    sorted(&s.interactions)
                ),
            ),
        }
        match endpoint {
            None => step(
                7,
                "receiver",
                Fail,
                format!("no endpoint has ASID {}", h.to),
            ),
            Some(e) if e.interactions.contains(&h.interaction) => step(
                7,
                "receiver",
                Pass,
                format!(
                    "{} ({}, party key {}) handles {urn}",
                    h.to, e.ods, e.party_key
                ),
            ),
            Some(e) => step(
                7,
                "receiver",
                Fail,
                format!(
                    "{} ({}) handles only: {}",
                    h.to,
                    e.ods,
                    sorted(&e.interactions)
                ),
            ),
        }
        let agreements: Vec<&Agreement> = self
            .agreements
            .get(&h.from)
            .map(|l| l.iter().filter(|a| a.to == h.to).collect())
            .unwrap_or_default();
        match agreements
            .iter()
            .find(|a| a.interactions.covers(&h.interaction) && a.in_force(now))
        {
            Some(a) => step(
                8,
                "agreement",
                Pass,
                format!("{} covers it and is in force", a.id),
            ),
            None if agreements.is_empty() => step(
                8,
                "agreement",
                Fail,
                format!("no agreement from {} to {}", h.from, h.to),
            ),
            None => {
                let why: Vec<String> = agreements
                    .iter()
                    .map(|a| {
                        if a.interactions.covers(&h.interaction) {
                            format!("{} is not in force now", a.id)
                        } else {
                            format!("{} does not cover {urn}", a.id)
                        }
                    })
                    .collect();
                step(8, "agreement", Fail, why.join("; "))
            }
        }
        match endpoint {
            None => step(9, "endpoint", Skip, "no endpoint to compare with".into()),
            Some(e) if request.target.is_under(&e.url) => step(
                9,
                "endpoint",
                Pass,
                format!("the URL continues the registered {}", e.url),
            ),
            Some(e) => step(
                9,
                "endpoint",
                Fail,
                format!("the URL does not continue the registered {} exactly", e.url),
            ),
        }
        let peer = PeerIdentity {
            subject: String::new(),
            common_name: fqdn
                .map(str::to_owned)
                .or_else(|| system.map(|s| s.fqdn.to_string())),
            dns_sans: Vec::new(),
            serial: String::new(),
            fingerprint_sha256: String::new(),
        };
        Explained {
            generation: self.generation,
            steps,
            decision: self.evaluate(request, &peer, now).map(|_| ()),
        }
    }

    /// Whether some system or endpoint names this interaction (metric labels use it, or `other`).
    pub fn knows(&self, interaction: &str) -> bool {
        self.known.contains(interaction)
    }

    pub fn endpoint(&self, asid: &Asid) -> Option<&Endpoint> {
        self.endpoints.get(asid).map(|e| &**e)
    }

    /// Every accredited system, in ASID order.
    pub fn systems(&self) -> Vec<&System> {
        let mut all: Vec<&System> = self.systems.values().collect();
        all.sort_by(|a, b| a.asid.as_str().cmp(b.asid.as_str()));
        all
    }

    /// Every provider endpoint, in ASID order.
    pub fn endpoints(&self) -> Vec<&Endpoint> {
        let mut all: Vec<&Endpoint> = self.endpoints.values().map(|e| &**e).collect();
        all.sort_by(|a, b| a.asid.as_str().cmp(b.asid.as_str()));
        all
    }

    /// Counts of systems, endpoints and agreements, for logs.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.systems.len(),
            self.endpoints.len(),
            self.agreements.values().map(Vec::len).sum(),
        )
    }

    /// Reads every `*.toml` file in `dir` and compiles them (see [`Source::read_dir`]).
    pub fn load_dir(dir: &Path, generation: u64) -> Result<Self, Problems> {
        Self::compile(&Source::read_dir(dir)?, generation)
    }

    /// Validates and compiles a policy source. Any problem refuses the whole set; each names its file and line.
    pub fn compile(source: &Source, generation: u64) -> Result<Self, Problems> {
        let mut c = Compiler::default();
        for (name, text) in &source.files {
            c.file(name, text, &source.keys);
        }
        c.finish(generation)
    }
}

/// Everything a policy generation is compiled from: the policy files (display name, text) in name order, and the
/// `jwt_keys` files they name (as written, relative to the policy folder, with their text). A stored generation
/// holds its whole source, so it recompiles without the files on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Source {
    pub files: Vec<(String, String)>,
    pub keys: std::collections::BTreeMap<String, String>,
}

impl Source {
    /// A source of policy texts without key files.
    pub fn from_files(files: Vec<(String, String)>) -> Self {
        Self {
            files,
            keys: Default::default(),
        }
    }

    /// Reads every `*.toml` file in `dir` (sorted by name) and the key files their systems name.
    pub fn read_dir(dir: &Path) -> Result<Self, Problems> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Problems::one(format!("{}: cannot read policy folder: {e}", dir.display()))
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Problems::one(format!(
                "{}: no *.toml policy files",
                dir.display()
            )));
        }
        let mut source = Source::default();
        for path in paths {
            let text = read_bounded(&path, MAX_POLICY_FILE_BYTES)?;
            // A lenient look for key files only; the strict parse happens in `compile`.
            if let Ok(refs) = toml::from_str::<KeyRefs>(&text) {
                for name in refs.system.into_iter().flat_map(|s| s.jwt_keys) {
                    if let Ok(key) = read_bounded(&dir.join(&name), MAX_KEY_FILE_BYTES) {
                        source.keys.insert(name, key);
                    }
                }
            }
            source.files.push((path.display().to_string(), text));
        }
        Ok(source)
    }

    /// SHA-256 (hex) over the file names and texts and the key files, in order.
    pub fn sha256(&self) -> String {
        let mut h = sha2::Sha256::new();
        for (name, text) in &self.files {
            for part in [name.as_bytes(), b"\0", text.as_bytes(), b"\0"] {
                sha2::Digest::update(&mut h, part);
            }
        }
        for (name, text) in &self.keys {
            for part in [
                b"key\0".as_slice(),
                name.as_bytes(),
                b"\0",
                text.as_bytes(),
                b"\0",
            ] {
                sha2::Digest::update(&mut h, part);
            }
        }
        crate::ids::hex(&sha2::Digest::finalize(h))
    }
}

use sha2::Digest as _;

/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

fn read_bounded(path: &Path, max: u64) -> Result<String, Problems> {
    let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > max);
    if too_big {
        return Err(Problems::one(format!(
            "{}: larger than {max} bytes",
            path.display()
        )));
    }
    std::fs::read_to_string(path)
        .map_err(|e| Problems::one(format!("{}: cannot read: {e}", path.display())))
}

/// The `jwt_keys` of each `[[system]]`, read leniently.
#[derive(Deserialize)]
struct KeyRefs {
    #[serde(default)]
    system: Vec<KeyRef>,
}

#[derive(Deserialize)]
struct KeyRef {
    #[serde(default)]
    jwt_keys: Vec<String>,
}

// ---------------------------------------------------------------------------------------------------------------
// Raw policy files.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    system: Vec<Spanned<RawSystem>>,
    #[serde(default)]
    endpoint: Vec<Spanned<RawEndpoint>>,
    #[serde(default)]
    agreement: Vec<Spanned<RawAgreement>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystem {
    asid: String,
    name: String,
    ods: String,
    fqdn: String,
    interactions: Vec<String>,
    /// PEM public keys or JWKS files, relative to the policy file's folder.
    #[serde(default)]
    jwt_keys: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    asid: String,
    party_key: String,
    cpa_id: String,
    ods: String,
    url: String,
    interactions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgreement {
    id: String,
    from: String,
    to: String,
    interactions: Vec<String>,
    not_before: Option<String>,
    not_after: Option<String>,
}

/// Where an item was defined, for problem lines.
#[derive(Debug, Clone)]
struct Origin {
    file: String,
    line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: line {}", self.file, self.line)
    }
}

#[derive(Default)]
struct Compiler {
    problems: Vec<String>,
    systems: HashMap<Asid, System>,
    endpoints: HashMap<Asid, Arc<Endpoint>>,
    agreements: Vec<(Origin, Agreement)>,
    agreement_ids: HashSet<String>,
}

impl Compiler {
    fn problem(&mut self, at: &Origin, message: impl fmt::Display) {
        self.problems.push(format!("{at}: {message}"));
    }

    fn file(&mut self, name: &str, text: &str, keys: &std::collections::BTreeMap<String, String>) {
        let file = name.to_owned();
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map_or(0, |s| line_col(text, s.start).0);
                let at = Origin { file, line };
                self.problem(&at, e.message().trim().replace('\n', " "));
                return;
            }
        };
        // Newline offsets, found once: a line number is then a binary search, not a scan from the top (which made
        // a 140,000-item directory take minutes).
        let newlines: Vec<usize> = text.match_indices('\n').map(|(i, _)| i).collect();
        let origin = |span: std::ops::Range<usize>| Origin {
            file: file.clone(),
            line: newlines.partition_point(|nl| *nl < span.start) + 1,
        };
        for item in raw.system {
            let at = origin(item.span());
            self.system(&at, item.into_inner(), keys);
        }
        for item in raw.endpoint {
            let at = origin(item.span());
            self.endpoint(&at, item.into_inner());
        }
        for item in raw.agreement {
            let at = origin(item.span());
            self.agreement(&at, item.into_inner());
        }
    }

    fn asid(&mut self, at: &Origin, what: &str, text: &str) -> Option<Asid> {
        let asid = Asid::parse(text);
        if asid.is_none() {
            self.problem(
                at,
                format_args!("{what} {text:?} is not an ASID (1 to 20 digits)"),
            );
        }
        asid
    }

    fn ods(&mut self, at: &Origin, text: &str) -> Option<OdsCode> {
        let ods = OdsCode::parse(text);
        if ods.is_none() {
            self.problem(
                at,
                format_args!("ods {text:?} is not an ODS code (letters and digits)"),
            );
        }
        ods
    }

    fn interactions(&mut self, at: &Origin, list: &[String]) -> HashSet<InteractionId> {
        let mut set = HashSet::with_capacity(list.len());
        for text in list {
            match InteractionId::parse(text) {
                Some(i) => {
                    set.insert(i);
                }
                None => self.problem(at, format_args!("interaction {text:?} is not a URN")),
            }
        }
        set
    }

    fn non_empty(&mut self, at: &Origin, what: &str, text: &str) {
        if text.trim().is_empty() {
            self.problem(at, format_args!("{what} must not be empty"));
        }
    }

    fn system(
        &mut self,
        at: &Origin,
        raw: RawSystem,
        key_files: &std::collections::BTreeMap<String, String>,
    ) {
        let asid = self.asid(at, "[[system]] asid", &raw.asid);
        let ods = self.ods(at, &raw.ods);
        self.non_empty(at, "[[system]] name", &raw.name);
        let fqdn_ok = Target::parse(&format!("https://{}", raw.fqdn))
            .is_ok_and(|t| t.authority() == raw.fqdn && !raw.fqdn.contains([':', '[']));
        if !fqdn_ok {
            self.problem(at, format_args!("fqdn {:?} is not a host name", raw.fqdn));
        }
        let interactions = self.interactions(at, &raw.interactions);
        let mut keys = Vec::new();
        for file in &raw.jwt_keys {
            let parsed = match key_files.get(&file.display().to_string()) {
                Some(text) => crate::jwt::parse_keys(text.as_bytes(), file),
                None => Err(format!(
                    "{}: not found or unreadable in the policy folder",
                    file.display()
                )),
            };
            match parsed {
                Ok(k) => keys.extend(k),
                Err(e) => self.problem(at, format_args!("jwt_keys: {e}")),
            }
        }
        let jwt_keys = (!keys.is_empty()).then(|| Arc::from(keys));
        let (Some(asid), Some(ods)) = (asid, ods) else {
            return;
        };
        if self.systems.contains_key(&asid) {
            self.problem(at, format_args!("duplicate [[system]] asid {asid}"));
            return;
        }
        self.systems.insert(
            asid.clone(),
            System {
                asid,
                name: raw.name,
                ods,
                fqdn: raw.fqdn.to_ascii_lowercase().into(),
                interactions,
                jwt_keys,
            },
        );
    }

    fn endpoint(&mut self, at: &Origin, raw: RawEndpoint) {
        let asid = self.asid(at, "[[endpoint]] asid", &raw.asid);
        let ods = self.ods(at, &raw.ods);
        self.non_empty(at, "[[endpoint]] party_key", &raw.party_key);
        self.non_empty(at, "[[endpoint]] cpa_id", &raw.cpa_id);
        match Target::parse(&raw.url) {
            Err(e) => self.problem(
                at,
                format_args!("url {:?} is not an https URL ({e:?})", raw.url),
            ),
            Ok(_) if raw.url.contains('?') => {
                self.problem(at, format_args!("url {:?} must not have a query", raw.url))
            }
            Ok(_) if raw.url.ends_with('/') => {
                self.problem(at, format_args!("url {:?} must not end with /", raw.url))
            }
            Ok(_) => {}
        }
        let interactions = self.interactions(at, &raw.interactions);
        let (Some(asid), Some(ods)) = (asid, ods) else {
            return;
        };
        if self.endpoints.contains_key(&asid) {
            self.problem(at, format_args!("duplicate [[endpoint]] asid {asid}"));
            return;
        }
        self.endpoints.insert(
            asid.clone(),
            Arc::new(Endpoint {
                asid,
                party_key: raw.party_key,
                cpa_id: raw.cpa_id,
                ods,
                url: raw.url,
                interactions,
            }),
        );
    }

    fn time(&mut self, at: &Origin, what: &str, text: Option<&str>) -> Option<SystemTime> {
        let text = text?;
        match time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
            Ok(t) => Some(t.into()),
            Err(_) => {
                self.problem(at, format_args!("{what} {text:?} is not an RFC 3339 time"));
                None
            }
        }
    }

    fn agreement(&mut self, at: &Origin, raw: RawAgreement) {
        self.non_empty(at, "[[agreement]] id", &raw.id);
        if !self.agreement_ids.insert(raw.id.clone()) {
            self.problem(at, format_args!("duplicate [[agreement]] id {:?}", raw.id));
        }
        let from = self.asid(at, "[[agreement]] from", &raw.from);
        let to = self.asid(at, "[[agreement]] to", &raw.to);
        let interactions = if raw.interactions == ["*"] {
            Grant::All
        } else {
            Grant::Only(self.interactions(at, &raw.interactions))
        };
        let not_before = self.time(at, "not_before", raw.not_before.as_deref());
        let not_after = self.time(at, "not_after", raw.not_after.as_deref());
        if let (Some(nb), Some(na)) = (not_before, not_after)
            && na < nb
        {
            self.problem(at, "not_after is before not_before");
        }
        if let (Some(from), Some(to)) = (from, to) {
            self.agreements.push((
                at.clone(),
                Agreement {
                    id: raw.id,
                    from,
                    to,
                    interactions,
                    not_before,
                    not_after,
                },
            ));
        }
    }

    fn finish(mut self, generation: u64) -> Result<Policy, Problems> {
        let mut agreements: HashMap<Asid, Vec<Agreement>> = HashMap::new();
        for (at, a) in std::mem::take(&mut self.agreements) {
            if !self.systems.contains_key(&a.from) {
                self.problem(
                    &at,
                    format_args!("agreement {:?} names unknown system {}", a.id, a.from),
                );
            }
            if !self.endpoints.contains_key(&a.to) {
                self.problem(
                    &at,
                    format_args!("agreement {:?} names unknown endpoint {}", a.id, a.to),
                );
            }
            if let (Grant::Only(granted), Some(system), Some(endpoint)) = (
                &a.interactions,
                self.systems.get(&a.from),
                self.endpoints.get(&a.to),
            ) {
                let mut orphans: Vec<&str> = granted
                    .iter()
                    .filter(|i| {
                        !system.interactions.contains(*i) && !endpoint.interactions.contains(*i)
                    })
                    .map(InteractionId::as_str)
                    .collect();
                orphans.sort_unstable();
                for i in orphans {
                    self.problem(
                        &at,
                        format_args!(
                            "agreement {:?} grants {i}, which neither {} nor {} holds",
                            a.id, a.from, a.to
                        ),
                    );
                }
            }
            agreements.entry(a.from.clone()).or_default().push(a);
        }
        if !self.problems.is_empty() {
            return Err(Problems {
                problems: self.problems,
            });
        }
        let known = self
            .systems
            .values()
            .flat_map(|s| s.interactions.iter())
            .chain(self.endpoints.values().flat_map(|e| e.interactions.iter()))
            .cloned()
            .collect();
        Ok(Policy {
            generation,
            systems: self.systems,
            endpoints: self.endpoints,
            agreements,
            known,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TraceId;
    use crate::ssp::SspHeaders;
    use std::time::Duration;

    const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
    const PATIENT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1";

    const POLICY: &str = r#"
[[system]]
asid = "200000000359"
name = "Hospital"
ods = "RXX01"
fqdn = "consumer.dev.localhost"
interactions = ["urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1", "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1"]

[[system]]
asid = "200000000360"
name = "111"
ods = "RYY01"
fqdn = "consumer2.dev.localhost"
interactions = ["urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"]

[[endpoint]]
asid = "918999198993"
party_key = "B82617-807724"
cpa_id = "S20001A000123"
ods = "B82617"
url = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect"
interactions = ["urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"]

[[agreement]]
id = "DSA-0001"
from = "200000000359"
to = "918999198993"
interactions = ["*"]
not_before = "2026-01-01T00:00:00Z"
not_after = "2027-12-31T23:59:59Z"
"#;

    fn policy() -> Policy {
        Policy::compile(
            &Source::from_files(vec![("p.toml".into(), POLICY.to_string())]),
            1,
        )
        .unwrap()
    }

    fn peer(cn: &str) -> PeerIdentity {
        PeerIdentity {
            subject: format!("CN={cn}"),
            common_name: Some(cn.into()),
            dns_sans: vec![],
            serial: "01".into(),
            fingerprint_sha256: "00".into(),
        }
    }

    fn request(from: &str, to: &str, interaction: &str, target: &str) -> SspRequest {
        SspRequest {
            target: Target::parse(target).unwrap(),
            headers: SspHeaders {
                trace_id: TraceId::new_random(),
                from: Asid::parse(from).unwrap(),
                to: Asid::parse(to).unwrap(),
                interaction: InteractionId::parse(interaction).unwrap(),
            },
        }
    }

    fn at(rfc3339: &str) -> SystemTime {
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .into()
    }

    const URL: &str = "https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect/fhir/metadata";

    fn decide(
        from: &str,
        to: &str,
        interaction: &str,
        target: &str,
        cn: &str,
        now: &str,
    ) -> Result<u64, Denial> {
        match policy().check(request(from, to, interaction, target), &peer(cn), at(now)) {
            Decision::Permit(p) => Ok(p.generation()),
            Decision::Deny(d) => Err(d),
        }
    }

    const NOW: &str = "2026-11-21T12:00:00Z";
    const CN: &str = "consumer.dev.localhost";

    #[test]
    fn permits_a_registered_agreed_request() {
        assert_eq!(
            decide("200000000359", "918999198993", METADATA, URL, CN, NOW),
            Ok(1)
        );
    }

    #[test]
    fn checks_run_in_order_with_exact_texts() {
        let text = |r: Result<u64, Denial>| r.unwrap_err().text();
        // 5 before 6: wrong certificate for a known sender, even with an unaccredited interaction.
        assert_eq!(
            text(decide(
                "200000000359",
                "918999198993",
                "urn:x",
                URL,
                "consumer2.dev.localhost",
                NOW
            )),
            "FQDN_CHECK_FAILED_MESSAGESENDER_200000000359"
        );
        // An unknown sender fails at 6 whatever its certificate.
        assert_eq!(
            text(decide(
                "100000000001",
                "918999198993",
                METADATA,
                URL,
                CN,
                NOW
            )),
            "ASID_CHECK_FAILED_MESSAGESENDER_100000000001"
        );
        assert_eq!(
            text(decide(
                "200000000359",
                "918999198993",
                "urn:x",
                URL,
                CN,
                NOW
            )),
            "ASID_CHECK_FAILED_MESSAGESENDER_200000000359"
        );
        // 7: sender may send it, receiver does not handle it.
        assert_eq!(
            text(decide(
                "200000000359",
                "918999198993",
                PATIENT,
                URL,
                CN,
                NOW
            )),
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_918999198993"
        );
        assert_eq!(
            text(decide(
                "200000000359",
                "999999999999",
                METADATA,
                URL,
                CN,
                NOW
            )),
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_999999999999"
        );
        // 8: no agreement for the second system.
        assert_eq!(
            text(decide(
                "200000000360",
                "918999198993",
                METADATA,
                URL,
                "consumer2.dev.localhost",
                NOW
            )),
            "FOT_CHECK_FAILED_MESSAGESENDER_200000000360_MESSAGERECEIVER_918999198993"
        );
        // 9: an IP for the host, an added port.
        assert_eq!(
            text(decide(
                "200000000359",
                "918999198993",
                METADATA,
                "https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata",
                CN,
                NOW
            )),
            "ENDPOINT_https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect_CPAID_S20001A000123_VARIES_FROM_TARGETURL_https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata"
        );
    }

    #[test]
    fn agreements_are_in_force_only_between_their_dates() {
        let d = |now| decide("200000000359", "918999198993", METADATA, URL, CN, now);
        assert!(d("2026-01-01T00:00:00Z").is_ok());
        assert!(d("2027-12-31T23:59:59Z").is_ok());
        assert_eq!(d("2025-12-31T23:59:59Z").unwrap_err().check(), 8);
        assert_eq!(d("2028-01-01T00:00:00Z").unwrap_err().check(), 8);
        let later = at(NOW) + Duration::from_secs(3 * 365 * 86400);
        let denied = policy().check(
            request("200000000359", "918999198993", METADATA, URL),
            &peer(CN),
            later,
        );
        assert!(matches!(denied, Decision::Deny(Denial::NoAgreement { .. })));
    }

    #[test]
    fn a_bad_file_is_refused_whole_with_lines() {
        let bad = POLICY
            .replace("asid = \"200000000360\"", "asid = \"200000000359\"")
            .replace(
                "url = \"https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect\"",
                "url = \"http://provider/x/\"",
            )
            .replace("from = \"200000000359\"", "from = \"555\"")
            .replace(
                "not_before = \"2026-01-01T00:00:00Z\"",
                "not_before = \"2028-01-01T00:00:00Z\"",
            );
        let err =
            Policy::compile(&Source::from_files(vec![("p.toml".into(), bad)]), 2).unwrap_err();
        let all = err.to_string();
        assert!(
            all.contains("p.toml: line 9: duplicate [[system]] asid 200000000359"),
            "{all}"
        );
        assert!(
            all.contains("p.toml: line 16: url \"http://provider/x/\" is not an https URL"),
            "{all}"
        );
        assert!(all.contains("not_after is before not_before"), "{all}");
        assert!(all.contains("names unknown system 555"), "{all}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = POLICY.replace("name = \"111\"", "name = \"111\"\ncolour = \"blue\"");
        let err =
            Policy::compile(&Source::from_files(vec![("p.toml".into(), bad)]), 2).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    /// Each import validation rule refuses the whole set with a message naming the file and line.
    #[test]
    fn each_validation_error_has_its_message() {
        let cases: [(&str, &str, &str); 12] = [
            (
                "name = \"111\"",
                "name = \"111\"\ncolour = \"blue\"",
                "unknown field `colour`",
            ),
            (
                "asid = \"200000000360\"",
                "asid = \"200000000359\"",
                "line 9: duplicate [[system]] asid 200000000359",
            ),
            (
                "asid = \"918999198993\"",
                "asid = \"91899919899x\"",
                "line 16: [[endpoint]] asid \"91899919899x\" is not an ASID",
            ),
            (
                "id = \"DSA-0001\"",
                "id = \"\"",
                "[[agreement]] id must not be empty",
            ),
            (
                "fqdn = \"consumer2.dev.localhost\"",
                "fqdn = \"consumer2.dev.localhost:443\"",
                "fqdn \"consumer2.dev.localhost:443\" is not a host name",
            ),
            (
                "\"urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1\"]",
                "\"not-a-urn\"]",
                "interaction \"not-a-urn\" is not a URN",
            ),
            (
                "gpconnect\"\ninteractions",
                "gpconnect/\"\ninteractions",
                "must not end with /",
            ),
            (
                "gpconnect\"\ninteractions",
                "gpconnect?x=1\"\ninteractions",
                "must not have a query",
            ),
            (
                "from = \"200000000359\"",
                "from = \"555\"",
                "agreement \"DSA-0001\" names unknown system 555",
            ),
            (
                "to = \"918999198993\"",
                "to = \"918999198999\"",
                "agreement \"DSA-0001\" names unknown endpoint 918999198999",
            ),
            (
                "not_after = \"2027-12-31T23:59:59Z\"",
                "not_after = \"2025-12-31T23:59:59Z\"",
                "not_after is before not_before",
            ),
            (
                "interactions = [\"*\"]",
                "interactions = [\"urn:nhs:names:services:gpconnect:fhir:rest:read:slot-1\"]",
                "grants urn:nhs:names:services:gpconnect:fhir:rest:read:slot-1, which neither 200000000359 nor 918999198993 holds",
            ),
        ];
        for (from, to, message) in cases {
            assert!(POLICY.contains(from), "{from}");
            let bad = POLICY.replacen(from, to, 1);
            let err =
                Policy::compile(&Source::from_files(vec![("p.toml".into(), bad)]), 2).unwrap_err();
            let all = err.to_string();
            assert!(all.contains("p.toml: line "), "{all}");
            assert!(all.contains(message), "expected {message:?} in {all}");
        }
        let mut dup = POLICY.to_string();
        dup.push_str("\n[[agreement]]\nid = \"DSA-0001\"\nfrom = \"200000000359\"\nto = \"918999198993\"\ninteractions = [\"*\"]\n");
        let err =
            Policy::compile(&Source::from_files(vec![("p.toml".into(), dup)]), 2).unwrap_err();
        assert!(
            err.to_string()
                .contains("duplicate [[agreement]] id \"DSA-0001\""),
            "{err}"
        );
    }

    /// `explain` reports every check and decides as `check` does: a permit, and a refusal at each of 5 to 9.
    #[test]
    fn explain_matches_check_at_each_step() {
        let p = policy();
        let cases = [
            (
                "200000000359",
                "918999198993",
                METADATA,
                URL,
                Some(CN),
                None,
            ),
            (
                "200000000359",
                "918999198993",
                METADATA,
                URL,
                Some("consumer2.dev.localhost"),
                Some(5),
            ),
            (
                "200000000359",
                "918999198993",
                "urn:x",
                URL,
                Some(CN),
                Some(6),
            ),
            (
                "200000000359",
                "918999198993",
                PATIENT,
                URL,
                Some(CN),
                Some(7),
            ),
            (
                "200000000360",
                "918999198993",
                METADATA,
                URL,
                Some("consumer2.dev.localhost"),
                Some(8),
            ),
            (
                "200000000359",
                "918999198993",
                METADATA,
                "https://127.0.0.1:9443/B82617/STU3/1/gpconnect/fhir/metadata",
                Some(CN),
                Some(9),
            ),
        ];
        for (from, to, interaction, target, fqdn, fails_at) in cases {
            let req = request(from, to, interaction, target);
            let explained = p.explain(&req, fqdn, at(NOW));
            assert_eq!(
                explained.steps.iter().map(|s| s.number).collect::<Vec<_>>(),
                vec![5, 6, 7, 8, 9]
            );
            assert_eq!(
                explained.decision.as_ref().err().map(Denial::check),
                fails_at,
                "{explained:?}"
            );
            if let Some(n) = fails_at {
                let step = explained.steps.iter().find(|s| s.number == n).unwrap();
                assert_eq!(step.outcome, StepOutcome::Fail, "{step:?}");
            } else {
                assert!(
                    explained
                        .steps
                        .iter()
                        .all(|s| s.outcome == StepOutcome::Pass),
                    "{explained:?}"
                );
            }
            let checked = match p.check(req, &peer(fqdn.unwrap_or(CN)), at(NOW)) {
                Decision::Permit(_) => None,
                Decision::Deny(d) => Some(d.check()),
            };
            assert_eq!(checked, fails_at);
        }
    }

    proptest::proptest! {
        /// Any edit of a valid policy compiles or is refused with reasons; never a panic, and an accepted text
        /// compiles the same way twice.
        #[test]
        fn edited_policies_compile_or_are_refused(
            edits in proptest::collection::vec(
                (0usize..2000, proptest::prop_oneof![
                    proptest::strategy::Just(String::new()),
                    "[\\[\\]{}=\",.#\n a-z0-9*-]{1,6}",
                    "\\PC{1,3}",
                ], 0usize..8),
                1..4),
        ) {
            let mut text = POLICY.to_string();
            for (at, insert, cut) in edits {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) { at -= 1; }
                let mut end = (at + cut).min(text.len());
                while !text.is_char_boundary(end) { end += 1; }
                text.replace_range(at..end, &insert);
            }
            let source = Source::from_files(vec![("p.toml".into(), text)]);
            match Policy::compile(&source, 1) {
                Ok(p) => {
                    let again = Policy::compile(&source, 1).unwrap();
                    proptest::prop_assert_eq!(p.counts(), again.counts());
                }
                Err(e) => proptest::prop_assert!(!e.problems.is_empty()),
            }
        }
    }
}
