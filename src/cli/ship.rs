//! `ssp audit verify --witness` and `ssp audit export --format spine` (see `crate::audit::ship`).

use std::path::{Path, PathBuf};

use crate::config::Config;

use super::{exit, print_problems};

/// `--witness` and its companions of `ssp audit verify`.
#[derive(Debug, clap::Args)]
pub(super) struct Witness {
    /// The collector's copy (the file rsyslog or syslog-ng wrote): check the local log against it
    #[arg(long)]
    witness: Option<PathBuf>,
    /// The instance to check in a collector file that holds several [default: the local log's]
    #[arg(long, requires = "witness")]
    instance: Option<String>,
    /// The heads' Ed25519 public key (PEM, or base64 of the raw key) [default: that of audit.ship.head_key]
    #[arg(long, requires = "witness")]
    public_key: Option<PathBuf>,
}

impl Witness {
    pub(super) fn given(&self) -> bool {
        self.witness.is_some()
    }
}

/// The raw public key the heads must be signed with: `--public-key`, else the config's `audit.ship.head_key`.
fn head_public_key(
    given: Option<&Path>,
    config: Option<&Config>,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(path) = given {
        return crate::signing::read_public_key(path).map(Some);
    }
    match config.and_then(|c| c.ship.as_ref()) {
        Some(ship) => crate::signing::SigningKey::load(&ship.head_key)
            .map(|k| Some(k.public_key()))
            .map_err(|why| format!("audit.ship.head_key: {why}")),
        None => Ok(None),
    }
}

/// `ssp audit verify --witness FILE`, after the local chain verified intact.
pub(super) fn verify_witness(
    dir: &Path,
    config: Option<&Config>,
    args: Witness,
    last_seq: u64,
) -> u8 {
    let Some(witness) = args.witness else {
        return exit::USAGE;
    };
    if let Err(e) = std::fs::File::open(&witness).and_then(|f| {
        f.metadata()?
            .is_file()
            .then_some(())
            .ok_or_else(|| std::io::Error::other("not a file"))
    }) {
        eprintln!("--witness {}: {e}", witness.display());
        return exit::USAGE;
    }
    let key = match head_public_key(args.public_key.as_deref(), config) {
        Ok(key) => key,
        Err(why) => {
            eprintln!("{why}");
            return exit::USAGE;
        }
    };
    match crate::audit::ship::witness::check(
        dir,
        &witness,
        args.instance.as_deref(),
        key.as_deref(),
        last_seq,
    ) {
        Ok(w) => {
            println!(
                "{}: the collector's copy matches: {} records of instance {:?} up to seq {} (the last shipped; \
                 the local log is at seq {}), {} signed heads{}",
                witness.display(),
                w.records,
                w.instance,
                w.last_shipped,
                w.local_last,
                w.heads,
                if w.duplicates > 0 {
                    format!(", {} records sent twice and counted once", w.duplicates)
                } else {
                    String::new()
                }
            );
            for (a, b) in &w.gaps {
                println!(
                    "note: the collector does not hold seq {a} to {b} (not in its file: lost there, or the file \
                     was rotated)"
                );
            }
            exit::OK
        }
        Err(crate::audit::ship::witness::Failure::Differs(why)) => {
            println!("DIFFERS FROM THE WITNESS: {why}");
            exit::NEGATIVE
        }
        Err(crate::audit::ship::witness::Failure::Unusable(why)) => {
            eprintln!("{why}");
            exit::USAGE
        }
    }
}

/// `ssp audit export`'s arguments.
#[derive(Debug, clap::Args)]
pub(super) struct Export {
    /// Config file (its audit.dir and policy.dir) [default: as for serve]
    #[arg(long)]
    config: Option<PathBuf>,
    /// The shape to write: `spine` (NHS England's gpconnect-analytics import)
    #[arg(long)]
    format: String,
    /// Start of the period (RFC 3339), inclusive
    #[arg(long)]
    from: String,
    /// End of the period (RFC 3339), exclusive
    #[arg(long)]
    to: String,
    /// The folder to write the files into (created if absent)
    #[arg(long)]
    out: PathBuf,
    /// The source name in the file names: cloud, spinea, spineb or other
    #[arg(long, default_value = "other")]
    splunk_instance: String,
}

pub(super) fn export(args: Export) -> u8 {
    if args.format != "spine" {
        eprintln!("--format {:?}: the formats are: spine", args.format);
        return exit::USAGE;
    }
    let time = |flag: &str, t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).map_err(
            |_| {
                eprintln!("--{flag}: {t:?} is not an RFC 3339 time like 2026-11-01T00:00:00Z");
                exit::USAGE
            },
        )
    };
    let (from, to) = match (time("from", &args.from), time("to", &args.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let config = match Config::load(&args.config.unwrap_or_else(Config::default_path)) {
        Ok(config) => config,
        Err(problems) => return print_problems(&problems),
    };
    let policy = match crate::policy::Policy::load_dir(&config.policy.dir, 0) {
        Ok(policy) => policy,
        Err(problems) => return print_problems(&problems),
    };
    let extracted = time::OffsetDateTime::now_utc();
    if to > extracted {
        eprintln!(
            "warning: --to is after now, the extract date: NHS England's import refuses such a file (export a \
             period that has ended)"
        );
    }
    match crate::audit::ship::spine::export(
        &config.audit.dir,
        &policy,
        from,
        to,
        &args.splunk_instance,
        extracted,
        &args.out,
    ) {
        Ok(done) => {
            for file in &done.files {
                println!("{}", file.display());
            }
            eprintln!("{} transactions, {} ASIDs", done.transactions, done.asids);
            if done.unreadable > 0 {
                eprintln!(
                    "warning: {} lines of the log are not records and were left out (`ssp audit verify` says where)",
                    done.unreadable
                );
            }
            exit::OK
        }
        Err(why) => {
            eprintln!("{why}");
            exit::USAGE
        }
    }
}
