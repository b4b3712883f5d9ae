//! `ssp audit subject` (one patient's access trail), `ssp audit reindex`, and `ssp evidence [verify]`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::audit::patients::index::{self, Index};
use crate::audit::patients::lookup::{self, Ask, Written};
use crate::audit::patients::trail::{self, Row};
use crate::audit::patients::{PatientKey, normalise};
use crate::config::Config;

use super::{exit, print_problems};

/// How `ssp audit subject` prints the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum TrailFormat {
    Text,
    Json,
    Csv,
}

/// Where the patient's NHS number comes from.
#[derive(Debug, clap::Args)]
pub(super) struct Subject {
    /// Config file [default: as for serve]
    #[arg(long)]
    config: Option<PathBuf>,
    /// A file whose first line is the NHS number (`-`: standard input). Without it (or --nhs-number) the number
    /// is asked for on the terminal, not echoed, so that it stays out of shell history.
    #[arg(long, conflicts_with = "nhs_number")]
    nhs_number_file: Option<PathBuf>,
    /// The NHS number itself (it then stays in shell history: prefer the prompt or --nhs-number-file)
    #[arg(long)]
    nhs_number: Option<String>,
    /// Only accesses since: an RFC 3339 time, or an age in days, weeks, months or years (`90d`, `12m`, `2y`)
    #[arg(long)]
    since: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    format: TrailFormat,
}

pub(super) fn subject(args: Subject) -> u8 {
    let config = match Config::load(&args.config.unwrap_or_else(Config::default_path)) {
        Ok(config) => config,
        Err(problems) => return print_problems(&problems),
    };
    let Some(patients) = &config.patients else {
        eprintln!("[audit.patients] is not configured: this proxy keeps no patient index");
        return exit::USAGE;
    };
    let key = match PatientKey::load(&patients.key) {
        Ok(key) => key,
        Err(why) => {
            eprintln!("audit.patients.key: {why}");
            return exit::USAGE;
        }
    };
    let since = match args.since.as_deref().map(since_time).transpose() {
        Ok(since) => since,
        Err(why) => {
            eprintln!("--since: {why}");
            return exit::USAGE;
        }
    };
    let number = match read_number(args.nhs_number, args.nhs_number_file.as_deref()) {
        Ok(number) => normalise(&number),
        Err(why) => {
            eprintln!("{why}");
            return exit::USAGE;
        }
    };
    if crate::audit::patients::Check::of(&number) != crate::audit::patients::Check::Valid {
        eprintln!(
            "note: the number given is not a valid NHS number (not ten digits, or its check digit is wrong): \
             what follows is the accesses recorded for it as typed"
        );
    }
    let dir = &config.audit.dir;
    let index = match index::catch_up(dir) {
        Ok(index) => index,
        Err(index::IndexError::Mismatch(why)) => {
            eprintln!(
                "note: the patient index does not fit the log ({why}); made again from the chain"
            );
            match index::rebuild(dir) {
                Ok(index) => index,
                Err(e) => {
                    eprintln!("the patient index: {e}");
                    return exit::INTERNAL;
                }
            }
        }
        Err(e) => {
            eprintln!("the patient index: {e}");
            return exit::INTERNAL;
        }
    };
    if let Err(why) = key_matches(&index, key.id()) {
        eprintln!("audit.patients.key: {why}");
        return exit::USAGE;
    }
    let hmac = key.hmac(&number);
    // Looking a patient up is access: recorded before anything is shown.
    let ask = Ask {
        hmac: hmac.clone(),
        key: key.id().to_owned(),
        since: args.since.clone(),
        sudo_user: std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty()),
    };
    let recorded = match lookup::ask_proxy(dir, &ask) {
        Ok(Written::ByProxy) => Ok(()),
        Ok(Written::NoProxy) => lookup::write_here(&config.audit, ask),
        Err(why) => Err(why),
    };
    if let Err(why) = recorded {
        eprintln!("the lookup could not be recorded, so nothing is shown: {why}");
        return exit::INTERNAL;
    }
    let policy = crate::policy::Policy::load_dir(&config.policy.dir, 0).ok();
    let trail = index
        .lookup(&hmac)
        .map_err(|e| e.to_string())
        .and_then(|entries| {
            trail::rows(dir, &hmac, &entries, policy.as_ref(), since).map_err(|e| e.to_string())
        });
    let trail = match trail {
        Ok(trail) => trail,
        Err(why) => {
            eprintln!("{}: {why}", dir.display());
            return exit::INTERNAL;
        }
    };
    if trail.unbacked > 0 {
        eprintln!(
            "warning: {} transaction(s) the patient index names do not name this patient in the log, and are left \
             out: the index was changed or is not this log's; `ssp audit reindex` makes it again from the chain",
            trail.unbacked
        );
    }
    // A closed pipe (`| head`) ends the output, not the command.
    let _ = print_trail(&mut std::io::stdout().lock(), &trail.rows, args.format);
    exit::OK
}

/// A key the log's records were not hashed with finds nothing: refused, naming the ids (never the keys).
fn key_matches(index: &Index, id: &str) -> Result<(), String> {
    let keys = index.keys();
    if keys.is_empty() || keys.contains_key(id) {
        return Ok(());
    }
    let known: Vec<&str> = keys.keys().map(String::as_str).collect();
    Err(format!(
        "this key (id {id}) is not one the log's records were written with (ids {}): the wrong key file, or one \
         replaced since",
        known.join(", ")
    ))
}

fn read_number(given: Option<String>, file: Option<&Path>) -> Result<String, String> {
    if let Some(number) = given {
        if number.trim().is_empty() {
            return Err("no NHS number given".into());
        }
        return Ok(number);
    }
    let mut line = String::new();
    match file {
        Some(path) if path == Path::new("-") => {
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("standard input: {e}"))?;
        }
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            line = text.lines().next().unwrap_or_default().to_owned();
        }
        None => line = prompt("NHS number (not echoed): ")?,
    }
    let number = line.trim().to_owned();
    if number.is_empty() {
        return Err("no NHS number given".into());
    }
    Ok(number)
}

/// Reads a line from the terminal with echo off (restored after), or from standard input when it is not one.
fn prompt(text: &str) -> Result<String, String> {
    use rustix::termios::{LocalModes, OptionalActions, isatty, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let mut line = String::new();
    let saved = if isatty(&stdin) {
        eprint!("{text}");
        let _ = std::io::stderr().flush();
        let saved = tcgetattr(&stdin).map_err(|e| format!("the terminal: {e}"))?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        tcsetattr(&stdin, OptionalActions::Now, &quiet)
            .map_err(|e| format!("the terminal: {e}"))?;
        Some(saved)
    } else {
        None
    };
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = saved {
        let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
        eprintln!();
    }
    read.map_err(|e| format!("standard input: {e}"))?;
    Ok(line)
}

/// `--since`: an RFC 3339 time, or an age: `N` and `d` (days), `w` (weeks), `m` (calendar months) or `y` (years).
pub(super) fn since_time(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let bad = || format!("{text:?} is neither an RFC 3339 time nor an age like 90d, 12m or 2y");
    let unit = text.chars().last().ok_or_else(bad)?;
    let n: i32 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    if !(0..=1200).contains(&n) {
        return Err(bad());
    }
    let now = OffsetDateTime::now_utc();
    let months_ago = |months: i32| {
        let total = now.year() * 12 + i32::from(u8::from(now.month())) - 1 - months;
        let (year, month) = (total.div_euclid(12), total.rem_euclid(12) + 1);
        let month = time::Month::try_from(month as u8).map_err(|_| bad())?;
        let day = now.day().min(time::util::days_in_month(month, year));
        time::Date::from_calendar_date(year, month, day)
            .map(|date| now.replace_date(date))
            .map_err(|_| bad())
    };
    match unit {
        'd' => Ok(now - time::Duration::days(n.into())),
        'w' => Ok(now - time::Duration::weeks(n.into())),
        'm' => months_ago(n),
        'y' => months_ago(n * 12),
        _ => Err(bad()),
    }
}

/// Writes the trail; consumer-sent text (token claims, refusal reasons) is escaped for a terminal in `text`,
/// guarded against spreadsheet formulas in `csv`, and JSON-escaped in `json`.
fn print_trail(out: &mut impl Write, rows: &[Row], format: TrailFormat) -> std::io::Result<()> {
    use crate::audit::query::{cell, csv_line};
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    match format {
        TrailFormat::Json => {
            for row in rows {
                writeln!(out, "{}", serde_json::to_string(row).unwrap_or_default())?;
            }
        }
        TrailFormat::Csv => {
            out.write_all(
                csv_line(&[
                    "time",
                    "ods_code",
                    "organisation",
                    "asid",
                    "system",
                    "sds_user_id",
                    "sds_role_profile_id",
                    "user_name",
                    "interaction",
                    "interaction_words",
                    "decision",
                    "reason",
                    "status",
                    "outcome",
                    "trace_id",
                    "instance",
                    "found_in",
                    "check",
                ])
                .as_bytes(),
            )?;
            for r in rows {
                let status = r.status.map(|s| s.to_string()).unwrap_or_default();
                let cells = [
                    r.time.clone(),
                    text(&r.ods_code),
                    text(&r.organisation),
                    text(&r.asid),
                    text(&r.system),
                    text(&r.sds_user_id),
                    text(&r.sds_role_profile_id),
                    text(&r.user_name),
                    text(&r.interaction),
                    r.interaction_words.clone(),
                    text(&r.decision),
                    text(&r.reason),
                    status,
                    text(&r.outcome),
                    text(&r.trace_id),
                    r.instance.clone(),
                    r.found_in.clone(),
                    r.check.clone(),
                ];
                let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
                out.write_all(csv_line(&cells).as_bytes())?;
            }
        }
        TrailFormat::Text => {
            if rows.is_empty() {
                writeln!(
                    out,
                    "No access to this patient through this proxy is recorded."
                )?;
            }
            let shown = |v: &Option<String>, none: &str| cell(v.as_deref().unwrap_or(none));
            for r in rows {
                let org = match (&r.organisation, &r.ods_code) {
                    (Some(name), Some(ods)) => format!("{} ({})", cell(name), cell(ods)),
                    (Some(one), None) | (None, Some(one)) => cell(one),
                    (None, None) => "unknown organisation".into(),
                };
                let system = match (&r.system, &r.asid) {
                    (Some(name), Some(asid)) => format!("{}, ASID {}", cell(name), cell(asid)),
                    (None, Some(asid)) => format!("ASID {}", cell(asid)),
                    _ => "unknown system".into(),
                };
                let result = match (&r.decision, &r.outcome, r.status) {
                    (Some(d), _, _) if d == "deny" => format!("refused: {}", shown(&r.reason, "")),
                    (_, Some(outcome), Some(status)) => format!("{} ({status})", cell(outcome)),
                    _ => "no response recorded".into(),
                };
                writeln!(out, "{}  {}", cell(&r.time), cell(&r.interaction_words))?;
                writeln!(out, "    by {org} via {system}")?;
                writeln!(
                    out,
                    "    user {} (SDS user id {}, role profile {})",
                    shown(&r.user_name, "unnamed"),
                    shown(&r.sds_user_id, "-"),
                    shown(&r.sds_role_profile_id, "-")
                )?;
                writeln!(
                    out,
                    "    {result}; trace id {}; number in the {} ({})",
                    shown(&r.trace_id, "-"),
                    r.found_in,
                    r.check
                )?;
            }
        }
    }
    Ok(())
}

/// `ssp audit reindex`: the patient index made again from the chained log.
pub(super) fn reindex(dir: &Path) -> u8 {
    match index::rebuild(dir) {
        Ok(index) => {
            let total: u64 = index.keys().values().sum();
            println!(
                "{}: patient index rebuilt: {total} patient references (keys: {})",
                dir.display(),
                index
                    .keys()
                    .iter()
                    .map(|(id, n)| format!("{id} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            exit::OK
        }
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            exit::INTERNAL
        }
    }
}

/// `ssp evidence verify`.
#[derive(Debug, Subcommand)]
pub(super) enum EvidenceCommand {
    /// Re-check a pack: every file against the signed manifest; exit 0 intact, 1 naming each file that is not.
    Verify {
        /// The pack's folder
        dir: PathBuf,
        /// The signer's public key (PEM, or base64 of the raw key) the pack must be signed with
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
}

/// `ssp evidence --from T --to T --out DIR`.
#[derive(Debug, clap::Args)]
pub(super) struct PackArgs {
    /// Config file [default: as for serve]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start of the period (RFC 3339), inclusive
    #[arg(long)]
    from: Option<String>,
    /// End of the period (RFC 3339), inclusive
    #[arg(long)]
    to: Option<String>,
    /// A new or empty folder to write the pack into
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(super) fn evidence(args: PackArgs, command: Option<EvidenceCommand>) -> u8 {
    if let Some(EvidenceCommand::Verify { dir, public_key }) = command {
        let expected = match public_key.as_deref().map(crate::evidence::read_public_key) {
            None => None,
            Some(Ok(key)) => Some(key),
            Some(Err(why)) => {
                eprintln!("--public-key: {why}");
                return exit::USAGE;
            }
        };
        return match crate::evidence::verify_pack(&dir, expected.as_deref()) {
            Ok(checked) => {
                println!(
                    "{}: intact: {} files, signed by the Ed25519 key with SHA-256 {}",
                    dir.display(),
                    checked.files,
                    checked.key_sha256
                );
                exit::OK
            }
            Err(problems) => {
                for problem in problems {
                    println!("NOT INTACT: {problem}");
                }
                exit::NEGATIVE
            }
        };
    }
    let (Some(from), Some(to), Some(out)) = (args.from, args.to, args.out) else {
        eprintln!("ssp evidence needs --from, --to and --out (or: ssp evidence verify DIR)");
        return exit::USAGE;
    };
    let time = |flag: &str, t: &str| {
        OffsetDateTime::parse(t, &Rfc3339).map_err(|_| {
            eprintln!("--{flag}: {t:?} is not an RFC 3339 time like 2026-11-01T00:00:00Z");
            exit::USAGE
        })
    };
    let period = match (time("from", &from), time("to", &to)) {
        (Ok(from), Ok(to)) if from <= to => crate::evidence::pack::Period { from, to },
        (Ok(_), Ok(_)) => {
            eprintln!("--from must not be after --to");
            return exit::USAGE;
        }
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let config = match Config::load(&args.config.unwrap_or_else(Config::default_path)) {
        Ok(config) => config,
        Err(problems) => return print_problems(&problems),
    };
    let Some(key_path) = &config.evidence_key else {
        eprintln!("[evidence] key is not configured: the pack's manifest must be signed");
        return exit::USAGE;
    };
    let key = match crate::evidence::SigningKey::load(key_path) {
        Ok(key) => key,
        Err(why) => {
            eprintln!("evidence.key: {why}");
            return exit::USAGE;
        }
    };
    let written = crate::evidence::pack::contents(&config, period)
        .and_then(|files| crate::evidence::write_pack(&out, &files, &key).map(|()| files.len()));
    match written {
        Ok(files) => {
            println!(
                "{}: evidence pack written: {files} files, MANIFEST and MANIFEST.sig",
                out.display()
            );
            exit::OK
        }
        Err(why) => {
            eprintln!("{why}");
            exit::INTERNAL
        }
    }
}
