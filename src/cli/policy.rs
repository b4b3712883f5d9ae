//! `ssp policy ...`: import, check, list, and the directory from SDS.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::config::Config;

use super::{exit, init_logging, load_config, print_problems, runtime};

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Explain, check by check (5 to 9), whether the policy permits a request: exit 0 permit, 1 deny.
    Check {
        /// Sending ASID (`Ssp-From`)
        #[arg(long)]
        from: String,
        /// Receiving ASID (`Ssp-To`)
        #[arg(long)]
        to: String,
        /// Interaction URN (`Ssp-InteractionID`)
        #[arg(long)]
        interaction: String,
        /// The target URL (what follows the proxy's address)
        #[arg(long)]
        url: String,
        /// The client certificate's FQDN (CN or DNS SAN); without it check 5 is skipped
        #[arg(long)]
        fqdn: Option<String>,
        /// Use a stored generation (a number, or `current`) instead of the files in `policy.dir`
        #[arg(long)]
        generation: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the policy files and import them into the store as a new generation (if they changed).
    Import {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List the stored generations.
    History {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the source files of a stored generation (default: the current one).
    Show {
        generation: Option<u64>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Build a policy file of [[system]] and [[endpoint]] entries from the Spine Directory Service ([sds] in the
    /// config): live from its FHIR API, or from saved answers. Exit 0 written, 1 bad entries (nothing written
    /// without --partial), 64 bad config.
    Sds {
        /// Saved SDS answers (searchset Bundles, JSON, as the API returns them) instead of a live fetch
        #[arg(long = "bundle")]
        bundles: Vec<PathBuf>,
        /// Write the policy file here (default: standard output, unless --diff)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print what would change in the policy in force (policy.dir), by ASID
        #[arg(long)]
        diff: bool,
        /// Write the good entries even when some are bad (the bad ones are listed on stderr)
        #[arg(long)]
        partial: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub(super) fn policy(command: PolicyCommand) -> u8 {
    use crate::policy::store::Store;
    match command {
        PolicyCommand::Check {
            from,
            to,
            interaction,
            url,
            fqdn,
            generation,
            config,
        } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            policy_check(
                &config,
                &from,
                &to,
                &interaction,
                &url,
                fqdn.as_deref(),
                generation.as_deref(),
            )
        }
        PolicyCommand::Import { config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match crate::app::import_policy(&config) {
                Ok((policy, new)) => {
                    let (systems, endpoints, agreements) = policy.counts();
                    let what = if new {
                        "imported as generation"
                    } else {
                        "unchanged: still generation"
                    };
                    println!(
                        "{what} {} ({systems} systems, {endpoints} endpoints, {agreements} agreements)",
                        policy.generation
                    );
                    println!("a running proxy takes it on `systemctl reload ssp` (SIGHUP)");
                    exit::OK
                }
                Err(problems) => print_problems(&problems),
            }
        }
        PolicyCommand::History { config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match Store::open(&config.policy.store).and_then(|s| s.history()) {
                Ok(history) => {
                    println!("generation  imported at                    files  sha256");
                    for h in history {
                        let mark = if h.current { "*" } else { " " };
                        println!(
                            "{mark}{:>9}  {:<29}  {:>5}  {}",
                            h.number, h.imported_at, h.files, h.sha256
                        );
                    }
                    exit::OK
                }
                Err(e) => {
                    eprintln!("{e}");
                    exit::INTERNAL
                }
            }
        }
        PolicyCommand::Show { generation, config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let found = Store::open(&config.policy.store).and_then(|s| match generation {
                Some(n) => s.get(n),
                None => s.current(),
            });
            match found {
                Ok(Some(g)) => {
                    println!(
                        "# generation {}, imported {}, sha256 {}",
                        g.number, g.imported_at, g.sha256
                    );
                    for (name, text) in &g.source.files {
                        println!("\n# ---- {name}\n{text}");
                    }
                    for (name, text) in &g.source.keys {
                        println!("\n# ---- jwt key {name}\n{text}");
                    }
                    exit::OK
                }
                Ok(None) => {
                    eprintln!("{}: no such generation", config.policy.store.display());
                    exit::NEGATIVE
                }
                Err(e) => {
                    eprintln!("{e}");
                    exit::INTERNAL
                }
            }
        }
        PolicyCommand::Sds {
            bundles,
            out,
            diff,
            partial,
            config,
        } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            policy_sds(&config, &bundles, out.as_deref(), diff, partial)
        }
    }
}

/// `ssp policy sds`: runs [`crate::policy::sds::refresh::refresh`] and prints what it returns: the bad entries,
/// the diff, and the directory or where it was written.
fn policy_sds(
    config: &Config,
    bundles: &[PathBuf],
    out: Option<&Path>,
    diff: bool,
    partial: bool,
) -> u8 {
    use crate::policy::sds::refresh::{self, RefreshError, Request};
    if bundles.is_empty() {
        init_logging(&config.log.level, false);
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let request = Request {
        bundles,
        diff,
        partial,
        out,
    };
    let refreshed = rt.block_on(refresh::refresh(
        config.sds.as_ref(),
        &config.source,
        &config.policy.dir,
        request,
    ));
    let refreshed = match refreshed {
        Ok(refreshed) => refreshed,
        Err(e) => {
            if let RefreshError::BadEntries(directory) = &e {
                directory.problems.iter().for_each(|p| eprintln!("{p}"));
            }
            eprintln!("{e}");
            return match e {
                RefreshError::Usage(_) | RefreshError::InForceDoesNotCompile(_) => exit::USAGE,
                RefreshError::Write(..) => exit::INTERNAL,
                RefreshError::Refused(_)
                | RefreshError::BuiltDoesNotCompile(_)
                | RefreshError::BadEntries(_) => exit::NEGATIVE,
            };
        }
    };
    let directory = &refreshed.directory;
    directory.problems.iter().for_each(|p| eprintln!("{p}"));
    match &refreshed.diff {
        Some(lines) if lines.is_empty() => println!(
            "no change against the policy in force ({})",
            config.policy.dir.display()
        ),
        Some(lines) => lines.iter().for_each(|line| println!("{line}")),
        None => {}
    }
    match &refreshed.written {
        Some(path) => eprintln!(
            "{}: {} systems, {} endpoints{}",
            path.display(),
            directory.systems,
            directory.endpoints,
            if directory.problems.is_empty() {
                String::new()
            } else {
                format!(", {} bad entries left out", directory.problems.len())
            }
        ),
        None if refreshed.diff.is_none() => print!("{}", directory.text),
        None => {}
    }
    if directory.problems.is_empty() {
        exit::OK
    } else {
        exit::NEGATIVE
    }
}

/// The policy a check is explained against: the files in `policy.dir` (generation 0), or a stored generation (a
/// number, or `current`). A failure is printed; the error is the exit code.
pub(super) fn load_policy(
    config: &Config,
    generation: Option<&str>,
) -> Result<crate::policy::Policy, u8> {
    match generation {
        None => {
            crate::policy::Policy::load_dir(&config.policy.dir, 0).map_err(|p| print_problems(&p))
        }
        Some(which) => {
            let stored =
                crate::policy::store::Store::open(&config.policy.store).and_then(|s| match which {
                    "current" => s.current(),
                    n => n
                        .parse()
                        .map_err(|_| format!("--generation {n:?}: a number or `current`"))
                        .and_then(|n| s.get(n)),
                });
            match stored {
                Ok(Some(g)) => crate::policy::Policy::compile(&g.source, g.number)
                    .map_err(|p| print_problems(&p)),
                Ok(None) => {
                    eprintln!("{}: no such generation", config.policy.store.display());
                    Err(exit::USAGE)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Err(exit::INTERNAL)
                }
            }
        }
    }
}

fn policy_check(
    config: &Config,
    from: &str,
    to: &str,
    interaction: &str,
    url: &str,
    fqdn: Option<&str>,
    generation: Option<&str>,
) -> u8 {
    use crate::ids::{Asid, InteractionId, TraceId};
    let (Some(from), Some(to), Some(interaction)) = (
        Asid::parse(from),
        Asid::parse(to),
        InteractionId::parse(interaction),
    ) else {
        eprintln!("--from and --to must be ASIDs (digits) and --interaction a URN (urn:...)");
        return exit::USAGE;
    };
    let policy = load_policy(config, generation);
    let policy = match policy {
        Ok(p) => p,
        Err(code) => return code,
    };
    match policy.generation {
        0 => println!("policy: the files in {}", config.policy.dir.display()),
        n => println!(
            "policy: generation {n} from {}",
            config.policy.store.display()
        ),
    }
    let target = match crate::ssp::Target::parse(url) {
        Ok(t) => t,
        Err(e) => {
            println!("check 3  target     FAIL  not a valid target URL ({e:?})");
            print_denial(&crate::proxy::Refusal::Target(e));
            return exit::NEGATIVE;
        }
    };
    let request = crate::ssp::SspRequest {
        target,
        headers: crate::ssp::SspHeaders {
            trace_id: TraceId::new_random(),
            from,
            to,
            interaction,
        },
    };
    let names = fqdn.map(|f| [f]);
    let explained = policy.explain(
        &request.headers,
        Some(&request.target),
        names.as_ref().map(|n| &n[..]),
        std::time::SystemTime::now(),
    );
    for step in &explained.steps {
        println!(
            "check {}  {:<10} {:<4}  {}",
            step.number,
            step.name,
            step.outcome.as_str(),
            step.detail
        );
    }
    match explained.decision {
        Ok(()) => {
            println!("decision: PERMIT");
            exit::OK
        }
        Err(denial) => {
            print_denial(&crate::proxy::Refusal::Denied(denial));
            exit::NEGATIVE
        }
    }
}

/// The decision line of a refusal, with the status and text the proxy would answer.
fn print_denial(refusal: &crate::proxy::Refusal) {
    println!(
        "decision: DENY  {} {}",
        refusal.status().as_u16(),
        refusal.text()
    );
}
