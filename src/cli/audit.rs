//! `ssp audit ...`: verify and query the transaction log; `subject` and `reindex` are in `patients`.

use std::path::PathBuf;

use clap::Subcommand;

use crate::config::Config;

use super::{exit, print_problems};

/// Where the audit log is: `--dir`, or `audit.dir` of the config.
#[derive(Debug, clap::Args)]
pub(super) struct AuditLocation {
    /// Config file whose `audit.dir` to read [default: as for serve]
    #[arg(long, conflicts_with = "dir")]
    config: Option<PathBuf>,
    /// The audit folder itself
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl AuditLocation {
    fn dir(self) -> Result<PathBuf, u8> {
        self.dir_and_config().map(|(dir, _)| dir)
    }

    /// The folder, and the config when it was read for it.
    fn dir_and_config(self) -> Result<(PathBuf, Option<Config>), u8> {
        if let Some(dir) = self.dir {
            return Ok((dir, None));
        }
        match Config::load(&self.config.unwrap_or_else(Config::default_path)) {
            Ok(config) => Ok((config.audit.dir.clone(), Some(config))),
            Err(problems) => Err(print_problems(&problems)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Verify the hash chain end to end: exit 0 intact, 1 with the first broken record named. With `--witness`,
    /// also against the collector's copy of the shipped records and signed heads.
    Verify {
        #[command(flatten)]
        at: AuditLocation,
        #[command(flatten)]
        witness: super::ship::Witness,
    },
    /// Write the log's transactions of a period in another shape: `--format spine`, as NHS England's
    /// gpconnect-analytics import reads the national SSP's.
    Export(super::ship::Export),
    /// Print the transactions that have a record matching every filter given.
    Query {
        #[command(flatten)]
        at: AuditLocation,
        #[arg(long)]
        trace_id: Option<String>,
        /// Sending ASID (`Ssp-From`)
        #[arg(long)]
        from: Option<String>,
        /// Receiving ASID (`Ssp-To`)
        #[arg(long)]
        to: Option<String>,
        /// Interaction URN
        #[arg(long)]
        interaction: Option<String>,
        /// RFC 3339 time, inclusive
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339 time, inclusive
        #[arg(long)]
        until: Option<String>,
        /// ok, denied, client_closed, client_error, upstream_error or timeout
        #[arg(long)]
        outcome: Option<String>,
        /// JSON lines instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Every access to one patient through the proxy, from the patient index (`[audit.patients]`). The lookup is
    /// itself recorded in the chain before anything is shown.
    Subject(super::patients::Subject),
    /// Delete the patient index and make it again from the chained log.
    Reindex {
        #[command(flatten)]
        at: AuditLocation,
    },
}

pub(super) fn audit(command: AuditCommand) -> u8 {
    match command {
        AuditCommand::Subject(args) => super::patients::subject(args),
        AuditCommand::Reindex { at } => match at.dir() {
            Ok(dir) => super::patients::reindex(&dir),
            Err(code) => code,
        },
        AuditCommand::Export(args) => super::ship::export(args),
        AuditCommand::Verify { at, witness } => {
            let (dir, config) = match at.dir_and_config() {
                Ok(found) => found,
                Err(code) => return code,
            };
            match crate::audit::verify(&dir) {
                Ok(v) => {
                    let state = if v.last_sealed {
                        "sealed"
                    } else {
                        "open (being written, or its writer crashed)"
                    };
                    println!(
                        "{}: intact: {} records in {} segments, last seq {}; newest segment {state}",
                        dir.display(),
                        v.records,
                        v.segments,
                        v.last_seq
                    );
                    if witness.given() {
                        return super::ship::verify_witness(
                            &dir,
                            config.as_ref(),
                            witness,
                            v.last_seq,
                        );
                    }
                    exit::OK
                }
                Err(broken) => {
                    println!("TAMPERED OR DAMAGED: {broken}");
                    exit::NEGATIVE
                }
            }
        }
        AuditCommand::Query {
            at,
            trace_id,
            from,
            to,
            interaction,
            since,
            until,
            outcome,
            json,
        } => {
            let dir = match at.dir() {
                Ok(dir) => dir,
                Err(code) => return code,
            };
            let time = |flag: &str,
                        t: Option<String>|
             -> Result<Option<time::OffsetDateTime>, u8> {
                t.map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| {
                            eprintln!(
                                "--{flag}: {t:?} is not an RFC 3339 time like 2026-11-21T09:00:00Z"
                            );
                            exit::USAGE
                        })
                })
                .transpose()
            };
            let (since, until) = match (time("since", since), time("until", until)) {
                (Ok(s), Ok(u)) => (s, u),
                (Err(code), _) | (_, Err(code)) => return code,
            };
            let filter = crate::audit::Filter {
                trace_id,
                from,
                to,
                interaction,
                since,
                until,
                outcome,
            };
            match crate::audit::query(&dir, &filter) {
                Ok(records) => {
                    // A closed pipe (`| head`) ends the output, not the command.
                    let mut out = std::io::stdout().lock();
                    let _ = (|| -> std::io::Result<()> {
                        use std::io::Write;
                        if json {
                            for r in &records {
                                writeln!(out, "{r}")?;
                            }
                        } else {
                            writeln!(out, "{}", crate::audit::TABLE_HEADER)?;
                            for r in &records {
                                writeln!(out, "{}", crate::audit::table_row(r))?;
                            }
                        }
                        Ok(())
                    })();
                    exit::OK
                }
                Err(e) => {
                    eprintln!("{}: {e}", dir.display());
                    exit::INTERNAL
                }
            }
        }
    }
}
