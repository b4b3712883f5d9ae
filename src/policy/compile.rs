//! From policy files to a [`Policy`]: reading the folder and the key files it names (bounded), the strict TOML
//! schema, and validation of the whole set, every problem named with its file and line.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use toml::Spanned;

use super::model::{Agreement, Endpoint, Grant, Organisation, Policy, Supplier, System};
use crate::config::{Problems, line_col};
use crate::ids::{Asid, IdMap, IdSet, InteractionId, OdsCode};
use crate::ssp::Target;

/// Largest policy file read; a directory of 20,000 systems is a few MiB.
const MAX_POLICY_FILE_BYTES: u64 = 256 * 1024 * 1024;

impl Policy {
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
        crate::hex::hex(&sha2::Digest::finalize(h))
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
    #[serde(default)]
    supplier: Vec<Spanned<RawSupplier>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupplier {
    name: String,
    token_endpoint: String,
    client_id: String,
    key_id: String,
    audience: String,
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
    /// For reports only: see `model::Organisation`.
    supplier: Option<String>,
    product: Option<String>,
    org_name: Option<String>,
    org_type: Option<String>,
    postcode: Option<String>,
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
    /// For reports only: see `model::Organisation`.
    supplier: Option<String>,
    product: Option<String>,
    org_name: Option<String>,
    org_type: Option<String>,
    postcode: Option<String>,
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
struct DefinedAt {
    file: String,
    line: usize,
}

impl fmt::Display for DefinedAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: line {}", self.file, self.line)
    }
}

#[derive(Default)]
struct Compiler {
    problems: Vec<String>,
    systems: IdMap<Asid, System>,
    endpoints: IdMap<Asid, Arc<Endpoint>>,
    agreements: Vec<(DefinedAt, Agreement)>,
    agreement_ids: HashSet<String>,
    suppliers: IdMap<String, Arc<Supplier>>,
}

impl Compiler {
    fn problem(&mut self, at: &DefinedAt, message: impl fmt::Display) {
        self.problems.push(format!("{at}: {message}"));
    }

    fn file(&mut self, name: &str, text: &str, keys: &std::collections::BTreeMap<String, String>) {
        let file = name.to_owned();
        let raw: RawFile = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map_or(0, |s| line_col(text, s.start).0);
                let at = DefinedAt { file, line };
                self.problem(&at, e.message().trim().replace('\n', " "));
                return;
            }
        };
        // Newline offsets, found once: a line number is then a binary search, not a scan from the top (which made
        // a 140,000-item directory take minutes).
        let newlines: Vec<usize> = text.match_indices('\n').map(|(i, _)| i).collect();
        let origin = |span: std::ops::Range<usize>| DefinedAt {
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
        for item in raw.supplier {
            let at = origin(item.span());
            self.supplier(&at, item.into_inner());
        }
    }

    fn asid(&mut self, at: &DefinedAt, what: &str, text: &str) -> Option<Asid> {
        let asid = Asid::parse(text);
        if asid.is_none() {
            self.problem(
                at,
                format_args!("{what} {text:?} is not an ASID (1 to 20 digits)"),
            );
        }
        asid
    }

    fn ods(&mut self, at: &DefinedAt, text: &str) -> Option<OdsCode> {
        let ods = OdsCode::parse(text);
        if ods.is_none() {
            self.problem(
                at,
                format_args!("ods {text:?} is not an ODS code (letters and digits)"),
            );
        }
        ods
    }

    fn interactions(&mut self, at: &DefinedAt, list: &[String]) -> IdSet<InteractionId> {
        let mut set = IdSet::with_capacity_and_hasher(list.len(), Default::default());
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

    /// The report-only fields, each non-empty, with no control character, and no longer than NHS England's
    /// ASID lookup table holds it (`gpconnect-analytics`, `Data.AsidLookup`: 200 characters, `OrgType` 50,
    /// `Postcode` 10).
    fn organisation(&mut self, at: &DefinedAt, fields: [Option<String>; 5]) -> Organisation {
        const NAMES: [(&str, usize); 5] = [
            ("supplier", 200),
            ("product", 200),
            ("org_name", 200),
            ("org_type", 50),
            ("postcode", 10),
        ];
        let mut checked = fields;
        for ((name, max), field) in NAMES.iter().zip(checked.iter_mut()) {
            if let Some(text) = field
                && (text.trim().is_empty()
                    || text.chars().count() > *max
                    || text.chars().any(char::is_control))
            {
                self.problem(
                    at,
                    format_args!("{name} must be 1 to {max} characters with no control character"),
                );
                *field = None;
            }
        }
        let [supplier, product, org_name, org_type, postcode] = checked;
        Organisation {
            supplier,
            product,
            org_name,
            org_type,
            postcode,
        }
    }

    fn non_empty(&mut self, at: &DefinedAt, what: &str, text: &str) {
        if text.trim().is_empty() {
            self.problem(at, format_args!("{what} must not be empty"));
        }
    }

    fn system(
        &mut self,
        at: &DefinedAt,
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
        let org = self.organisation(
            at,
            [
                raw.supplier,
                raw.product,
                raw.org_name,
                raw.org_type,
                raw.postcode,
            ],
        );
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
                org,
            },
        );
    }

    /// A `[[supplier]]`: every field non-empty visible text (at most 256 bytes), the token endpoint an `https`
    /// URL, and the name unique.
    fn supplier(&mut self, at: &DefinedAt, raw: RawSupplier) {
        for (what, text) in [
            ("name", &raw.name),
            ("client_id", &raw.client_id),
            ("key_id", &raw.key_id),
            ("audience", &raw.audience),
        ] {
            if text.trim().is_empty() || text.len() > 256 || text.chars().any(char::is_control) {
                self.problem(
                    at,
                    format_args!(
                        "[[supplier]] {what} must be 1 to 256 bytes with no control character"
                    ),
                );
            }
        }
        if Target::parse(&raw.token_endpoint).is_err() || raw.token_endpoint.contains('#') {
            self.problem(
                at,
                format_args!(
                    "[[supplier]] token_endpoint {:?} is not an https URL",
                    raw.token_endpoint
                ),
            );
        }
        if self.suppliers.contains_key(&raw.name) {
            self.problem(
                at,
                format_args!("duplicate [[supplier]] name {:?}", raw.name),
            );
            return;
        }
        self.suppliers.insert(
            raw.name.clone(),
            Arc::new(Supplier {
                name: raw.name,
                token_endpoint: raw.token_endpoint,
                client_id: raw.client_id,
                key_id: raw.key_id,
                audience: raw.audience,
            }),
        );
    }

    fn endpoint(&mut self, at: &DefinedAt, raw: RawEndpoint) {
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
        let org = self.organisation(
            at,
            [
                raw.supplier,
                raw.product,
                raw.org_name,
                raw.org_type,
                raw.postcode,
            ],
        );
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
                org,
            }),
        );
    }

    fn time(&mut self, at: &DefinedAt, what: &str, text: Option<&str>) -> Option<SystemTime> {
        let text = text?;
        match time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
            Ok(t) => Some(t.into()),
            Err(_) => {
                self.problem(at, format_args!("{what} {text:?} is not an RFC 3339 time"));
                None
            }
        }
    }

    fn agreement(&mut self, at: &DefinedAt, raw: RawAgreement) {
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
        let mut agreements: IdMap<Asid, Vec<Agreement>> = IdMap::default();
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
        let mut by_ods: IdMap<OdsCode, Vec<Arc<Endpoint>>> = IdMap::default();
        for endpoint in self.endpoints.values() {
            by_ods
                .entry(endpoint.ods.clone())
                .or_default()
                .push(Arc::clone(endpoint));
        }
        for list in by_ods.values_mut() {
            list.sort_by(|a, b| a.asid.cmp(&b.asid));
        }
        Ok(Policy {
            generation,
            systems: self.systems,
            endpoints: self.endpoints,
            agreements,
            known,
            suppliers: self.suppliers,
            by_ods,
        })
    }
}
