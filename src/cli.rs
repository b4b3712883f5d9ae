//! Command-line interface: argument parsing, exit codes, and wiring each command to the library. No request
//! logic here. Configs and policies are loaded and validated before any runtime starts or socket binds; a bad
//! one prints one line per problem and exits 64.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Problems};

/// Exit codes of DESIGN.md 1.1.
pub mod exit {
    pub const OK: u8 = 0;
    /// A negative answer (deny, tampered).
    pub const NEGATIVE: u8 = 1;
    /// Bad usage or config.
    pub const USAGE: u8 = 64;
    /// Internal error.
    pub const INTERNAL: u8 = 70;
}

/// A Spine-Secure-Proxy-style forward HTTP proxy for GP Connect.
#[derive(Debug, Parser)]
#[command(name = "ssp", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Config file [default: ./ssp.toml if present, else /etc/ssp/ssp.toml]
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load and validate config, certificates, keys, CRLs and policies; exit 0 if good, 64 if not.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start the proxy and a dev provider on the dev config, send demo requests, keep serving until Ctrl-C.
    Demo {
        /// Config file [default: ./ssp.toml]
        #[arg(long, default_value = "ssp.toml")]
        config: PathBuf,
    },
    /// Explain, import and inspect the policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Verify or query the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a fresh unsigned GP Connect audit token for trying the proxy by hand (development only).
    DevToken {
        /// The audience: the provider endpoint's registered URL.
        #[arg(long)]
        aud: String,
        /// The requested scope.
        #[arg(long, default_value = "organization/*.read")]
        scope: String,
    },
    /// Generate a development PKI (NOT for production).
    DevCerts {
        /// Folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the audit log is: `--dir`, or `audit.dir` of the config.
#[derive(Debug, clap::Args)]
struct AuditLocation {
    /// Config file whose `audit.dir` to read [default: as for serve]
    #[arg(long, conflicts_with = "dir")]
    config: Option<PathBuf>,
    /// The audit folder itself
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl AuditLocation {
    fn dir(self) -> Result<PathBuf, u8> {
        if let Some(dir) = self.dir {
            return Ok(dir);
        }
        match Config::load(&self.config.unwrap_or_else(Config::default_path)) {
            Ok(config) => Ok(config.audit.dir),
            Err(problems) => Err(print_problems(&problems)),
        }
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
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

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain end to end: exit 0 intact, 1 with the first broken record named.
    Verify {
        #[command(flatten)]
        at: AuditLocation,
    },
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
        /// ok, denied, client_closed, upstream_error or timeout
        #[arg(long)]
        outcome: Option<String>,
        /// JSON lines instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// Parses arguments and runs the command; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    ExitCode::from(match cli.command {
        Command::Serve { config } => serve(&config.unwrap_or_else(Config::default_path)),
        Command::CheckConfig { config } => {
            check_config(&config.unwrap_or_else(Config::default_path))
        }
        Command::Demo { config } => demo(&config),
        Command::Audit { command } => audit(command),
        Command::Policy { command } => policy(command),
        Command::DevToken { aud, scope } => {
            println!("{}", crate::demo::dev_jwt(&aud, &scope));
            exit::OK
        }
        Command::DevCerts { out } => dev_certs(&out),
    })
}

fn print_problems(problems: &Problems) -> u8 {
    for line in &problems.problems {
        eprintln!("{line}");
    }
    exit::USAGE
}

/// The operational log on stderr (journald under systemd): `RUST_LOG` wins over `level`.
fn init_logging(level: &str, json: bool) {
    // rustls warns about what any consumer can send at will (an IP address as SNI, renegotiation attempts): one
    // line each would let a scanner flood the operator's log. Its errors stay; a `RUST_LOG` that names rustls
    // overrides.
    let mut directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    if !directives.contains("rustls") {
        directives.push_str(",rustls=error");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            exit::INTERNAL
        })
}

fn serve(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(problems) => return print_problems(&problems),
    };
    // Before anything that logs: starting on the last good policy generation is reported as a warning.
    init_logging(&config.log.level, config.log.json);
    let assembled = match crate::app::assemble(&config) {
        Ok(assembled) => assembled,
        Err(problems) => return print_problems(&problems),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let (systems, endpoints, agreements) = assembled.policy.counts();
        let server = match crate::app::bind(&config, assembled).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("{}: server.listen: cannot listen on {}: {e}", path.display(), config.server.listen);
                return exit::INTERNAL;
            }
        };
        let addr = server.local_addr().map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
        tracing::info!(listen = %addr, systems, endpoints, agreements, config = %path.display(), "ssp serving");
        tokio::spawn(crate::lifecycle::reload_on_sighup(config.clone(), server.handles()));
        tokio::spawn(crate::lifecycle::watchdog());
        crate::lifecycle::notify_ready();
        let stop = async {
            crate::lifecycle::shutdown_signal().await;
            crate::lifecycle::notify_stopping();
        };
        // Ends with the current audit segment sealed and fsynced: a clean stop leaves a verifiably complete log.
        server.run(stop, config.server.shutdown_grace).await;
        tracing::info!("ssp stopped");
        exit::OK
    })
}

fn check_config(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(problems) => return print_problems(&problems),
    };
    let checked = crate::app::check(&config);
    for warning in &checked.warnings {
        eprintln!("warning: {warning}");
    }
    match checked.policy {
        Some(policy) if checked.problems.is_empty() => {
            let (systems, endpoints, agreements) = policy.counts();
            println!(
                "{}: ok (listen {}, {systems} systems, {endpoints} endpoints, {agreements} agreements)",
                path.display(),
                config.server.listen
            );
            exit::OK
        }
        _ => print_problems(&Problems {
            problems: checked.problems,
        }),
    }
}

fn demo(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!(
                "ssp demo runs on the repository's dev config: run it from the repository root, or pass --config"
            );
            return print_problems(&problems);
        }
    };
    init_logging("error", false);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(crate::demo::run(config)) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("ssp demo: {e}");
            if e.downcast_ref::<Problems>().is_some() {
                exit::USAGE
            } else {
                exit::INTERNAL
            }
        }
    }
}

fn load_config(path: Option<PathBuf>) -> Result<Config, u8> {
    Config::load(&path.unwrap_or_else(Config::default_path)).map_err(|p| print_problems(&p))
}

fn policy(command: PolicyCommand) -> u8 {
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

/// `ssp policy sds`: reads or fetches the answers, builds the directory, compiles it with the normal policy
/// compiler, then reports, diffs and writes.
fn policy_sds(
    config: &Config,
    bundles: &[PathBuf],
    out: Option<&Path>,
    diff: bool,
    partial: bool,
) -> u8 {
    use crate::policy::sds;
    let Some(cfg) = &config.sds else {
        eprintln!(
            "{}: no [sds] section (see README, \"Directory from SDS\")",
            config.source.display()
        );
        return exit::USAGE;
    };
    let (pages, note, fetched) = if bundles.is_empty() {
        init_logging(&config.log.level, false);
        let client = match crate::sds_api::Client::new(cfg) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return exit::USAGE;
            }
        };
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        let ods: Vec<String> = cfg
            .roles
            .systems
            .union(&cfg.roles.endpoints)
            .cloned()
            .collect();
        let interactions: Vec<String> = cfg.roles.interactions.iter().cloned().collect();
        let fetched_at = crate::ids::now_rfc3339();
        match rt.block_on(client.fetch_all(&ods, &interactions)) {
            Ok(pages) => {
                let base = cfg.base_url.as_deref().unwrap_or("");
                (
                    pages,
                    format!("Source: SDS FHIR API {base}, fetched {fetched_at}."),
                    Some(fetched_at),
                )
            }
            Err(e) => {
                eprintln!("ssp policy sds: {e}");
                return exit::NEGATIVE;
            }
        }
    } else {
        let mut pages = Vec::new();
        let mut names = Vec::new();
        for path in bundles {
            let bytes = match read_limited(path, crate::sds_api::MAX_ANSWER_BYTES) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return exit::USAGE;
                }
            };
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            match sds::Bundle::parse(&name, &bytes) {
                Ok(bundle) => pages.push(sds::Page {
                    origin: name.clone(),
                    bundle,
                }),
                Err(e) => {
                    eprintln!("{e}");
                    return exit::NEGATIVE;
                }
            }
            names.push(name);
        }
        (
            pages,
            format!("Source: saved SDS answers {}.", names.join(", ")),
            None,
        )
    };
    let directory = sds::build(&pages, &cfg.roles, &note, fetched.as_deref());
    // The normal compiler is the judge of what was built.
    let built = match crate::policy::Policy::compile(
        &crate::policy::Source::from_files(vec![("sds.toml".into(), directory.text.clone())]),
        0,
    ) {
        // Only systems and endpoints come from SDS: anything else in the text is a bug or an injection.
        Ok(p) if p.counts().2 != 0 => {
            eprintln!("the directory built from SDS holds agreements; refused");
            return exit::NEGATIVE;
        }
        Ok(p) => p,
        Err(problems) => {
            eprintln!("the directory built from SDS does not compile as a policy:");
            return print_problems(&problems).min(exit::NEGATIVE);
        }
    };
    for problem in &directory.problems {
        eprintln!("{problem}");
    }
    if !directory.problems.is_empty() && !partial {
        eprintln!(
            "{} bad entries: nothing written (--partial writes the {} systems and {} endpoints that are good)",
            directory.problems.len(),
            directory.systems,
            directory.endpoints
        );
        return exit::NEGATIVE;
    }
    if diff {
        match crate::policy::Policy::load_dir(&config.policy.dir, 0) {
            Ok(current) => {
                let lines = sds::diff(&current, &built, &cfg.roles);
                if lines.is_empty() {
                    println!(
                        "no change against the policy in force ({})",
                        config.policy.dir.display()
                    );
                }
                for line in lines {
                    println!("{line}");
                }
            }
            Err(problems) => {
                eprintln!("the policy in force does not compile; no diff:");
                return print_problems(&problems);
            }
        }
    }
    match out {
        Some(path) => {
            if let Err(e) = write_atomically(path, directory.text.as_bytes()) {
                eprintln!("{}: {e}", path.display());
                return exit::INTERNAL;
            }
            eprintln!(
                "{}: {} systems, {} endpoints{}",
                path.display(),
                directory.systems,
                directory.endpoints,
                if directory.problems.is_empty() {
                    String::new()
                } else {
                    format!(", {} bad entries left out", directory.problems.len())
                }
            );
        }
        None if !diff => print!("{}", directory.text),
        None => {}
    }
    if directory.problems.is_empty() {
        exit::OK
    } else {
        exit::NEGATIVE
    }
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
    let policy = match generation {
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
    };
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
    let explained = policy.explain(&request, fqdn, std::time::SystemTime::now());
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

fn audit(command: AuditCommand) -> u8 {
    match command {
        AuditCommand::Verify { at } => {
            let dir = match at.dir() {
                Ok(dir) => dir,
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
                    if json {
                        for r in &records {
                            println!("{r}");
                        }
                    } else {
                        println!("{}", crate::audit::TABLE_HEADER);
                        for r in &records {
                            println!("{}", crate::audit::table_row(r));
                        }
                    }
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

fn dev_certs(out: &Path) -> u8 {
    match crate::devcerts::generate(out) {
        Ok(files) => {
            println!("{}", crate::devcerts::WARNING);
            for file in files {
                println!("wrote {}", file.display());
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("{}: {e}", out.display());
            exit::INTERNAL
        }
    }
}
