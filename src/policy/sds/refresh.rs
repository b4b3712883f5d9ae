//! `ssp policy sds` from start to end, without the printing: the SDS answers (read from saved files, or fetched
//! live), the directory built from them, compiled by the normal policy compiler, the rule on bad entries, the
//! comparison with the policy in force, and the atomic write. The CLI parses the arguments, runs [`refresh`] and
//! prints what it returns.

use std::path::{Path, PathBuf};

use super::{Directory, Page, Roles};
use crate::config::{Problems, SdsConfig};
use crate::policy::{Policy, Source};

/// Where the answers came from, for the directory's header comment.
#[derive(Debug)]
pub(crate) struct Answers {
    pub pages: Vec<Page>,
    /// `Source: ...` line of the directory's header.
    pub note: String,
    /// When they were fetched (RFC 3339), for a live fetch.
    pub fetched_at: Option<String>,
}

/// What `ssp policy sds` was asked to do.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    /// Saved answers to read; none: fetch live.
    pub bundles: &'a [PathBuf],
    /// Compare with the policy in force (`--diff`).
    pub diff: bool,
    /// Write the good entries even when some are bad (`--partial`).
    pub partial: bool,
    /// Where to write the directory; none: it is printed (unless only a diff was asked for).
    pub out: Option<&'a Path>,
}

/// What `ssp policy sds` did.
#[derive(Debug)]
pub(crate) struct Refreshed {
    pub directory: Directory,
    /// The changes against the policy in force, when asked for.
    pub diff: Option<Vec<String>>,
    /// The file written, when one was.
    pub written: Option<PathBuf>,
}

/// Why `ssp policy sds` stopped.
#[derive(Debug)]
pub(crate) enum RefreshError {
    /// Bad input on the operator's side: a file that cannot be read, no `[sds]` section (exit 64).
    Usage(String),
    /// Some entries are bad and `--partial` was not given: nothing is written (exit 1).
    BadEntries(Directory),
    /// The directory could not be written (exit 70).
    Write(PathBuf, std::io::Error),
    /// The answers or what was built from them are refused (exit 1).
    Refused(String),
    /// What was built from the answers does not compile as a policy (exit 1).
    BuiltDoesNotCompile(Problems),
    /// The policy in force does not compile, so there is nothing to compare with (exit 64).
    InForceDoesNotCompile(Problems),
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshError::Usage(text) | RefreshError::Refused(text) => f.write_str(text),
            RefreshError::BadEntries(d) => write!(
                f,
                "{} bad entries: nothing written (--partial writes the {} systems and {} endpoints that are good)",
                d.problems.len(),
                d.systems,
                d.endpoints
            ),
            RefreshError::Write(path, e) => write!(f, "{}: {e}", path.display()),
            RefreshError::BuiltDoesNotCompile(problems) => write!(
                f,
                "the directory built from SDS does not compile as a policy:\n{problems}"
            ),
            RefreshError::InForceDoesNotCompile(problems) => {
                write!(
                    f,
                    "the policy in force does not compile; no diff:\n{problems}"
                )
            }
        }
    }
}

/// Runs `ssp policy sds` for the `[sds]` section `cfg` (none: a usage error naming `config_file`) against the
/// policy in force in `policy_dir`: reads or fetches the answers, builds and compiles the directory, refuses bad
/// entries unless `partial`, compares, writes. The bad entries left out under `partial` are in the directory's
/// `problems`.
pub(crate) async fn refresh(
    cfg: Option<&SdsConfig>,
    config_file: &Path,
    policy_dir: &Path,
    request: Request<'_>,
) -> Result<Refreshed, RefreshError> {
    let cfg = cfg.ok_or_else(|| {
        RefreshError::Usage(format!(
            "{}: no [sds] section (see docs/operator-guide.md, \"Directory from SDS\")",
            config_file.display()
        ))
    })?;
    let answers = if request.bundles.is_empty() {
        fetch_answers(cfg).await?
    } else {
        read_answers(request.bundles)?
    };
    let (directory, built) = compile(&answers, &cfg.roles)?;
    if !directory.problems.is_empty() && !request.partial {
        return Err(RefreshError::BadEntries(directory));
    }
    let diff = if request.diff {
        Some(diff_against(policy_dir, &built, &cfg.roles)?)
    } else {
        None
    };
    let written = match request.out {
        Some(path) => {
            write_atomically(path, directory.text.as_bytes())
                .map_err(|e| RefreshError::Write(path.to_path_buf(), e))?;
            Some(path.to_path_buf())
        }
        None => None,
    };
    Ok(Refreshed {
        directory,
        diff,
        written,
    })
}

/// The saved answers in `bundles` (one searchset Bundle each, at most [`super::fetch::MAX_ANSWER_BYTES`]).
fn read_answers(bundles: &[PathBuf]) -> Result<Answers, RefreshError> {
    let mut pages = Vec::new();
    let mut names = Vec::new();
    for path in bundles {
        let bytes = read_limited(path, super::fetch::MAX_ANSWER_BYTES)
            .map_err(|e| RefreshError::Usage(format!("{}: {e}", path.display())))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let bundle = super::Bundle::parse(&name, &bytes).map_err(RefreshError::Refused)?;
        pages.push(Page {
            origin: name.clone(),
            bundle,
        });
        names.push(name);
    }
    Ok(Answers {
        pages,
        note: format!("Source: saved SDS answers {}.", names.join(", ")),
        fetched_at: None,
    })
}

/// Fetches the answers for the configured ODS codes and interactions from the SDS FHIR API.
async fn fetch_answers(cfg: &SdsConfig) -> Result<Answers, RefreshError> {
    let client = super::fetch::SdsClient::new(cfg).map_err(RefreshError::Usage)?;
    let ods: Vec<String> = cfg
        .roles
        .systems
        .union(&cfg.roles.endpoints)
        .cloned()
        .collect();
    let interactions: Vec<String> = cfg.roles.interactions.iter().cloned().collect();
    let fetched_at = crate::clock::now_rfc3339();
    let pages = client
        .fetch_all(&ods, &interactions)
        .await
        .map_err(|e| RefreshError::Refused(format!("ssp policy sds: {e}")))?;
    let base = cfg.base_url.as_deref().unwrap_or("");
    Ok(Answers {
        pages,
        note: format!("Source: SDS FHIR API {base}, fetched {fetched_at}."),
        fetched_at: Some(fetched_at),
    })
}

/// Builds the directory from `answers` and compiles it with the normal policy compiler, the judge of what was
/// built: it must compile, and hold systems and endpoints only (anything else is a bug or an injection).
fn compile(answers: &Answers, roles: &Roles) -> Result<(Directory, Policy), RefreshError> {
    let directory = super::build(
        &answers.pages,
        roles,
        &answers.note,
        answers.fetched_at.as_deref(),
    );
    let source = Source::from_files(vec![("sds.toml".into(), directory.text.clone())]);
    match Policy::compile(&source, 0) {
        Ok(policy) if policy.counts().2 != 0 => Err(RefreshError::Refused(
            "the directory built from SDS holds agreements; refused".into(),
        )),
        Ok(policy) => Ok((directory, policy)),
        Err(problems) => Err(RefreshError::BuiltDoesNotCompile(problems)),
    }
}

/// What changes against the policy in force in `dir` (see [`super::diff`]).
fn diff_against(dir: &Path, built: &Policy, roles: &Roles) -> Result<Vec<String>, RefreshError> {
    let current = Policy::load_dir(dir, 0).map_err(RefreshError::InForceDoesNotCompile)?;
    Ok(super::diff(&current, built, roles))
}

/// A file's bytes, refused past `limit`.
fn read_limited(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(bytes)
}

/// Writes `path` through a temporary file in the same folder, fsynced, then renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map_or_else(|| "sds".into(), |n| n.to_string_lossy())
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
