//! Command-line interface: argument parsing, exit codes, and wiring each command to the library. No request
//! logic here. Configs and policies are loaded and validated before any runtime starts or socket binds; a bad
//! one prints one line per problem and exits 64.

//!
//! - `policy`: `ssp policy import | check | list | sds ...`.
//! - `audit`: `ssp audit verify | query | tail`.
//! - `onboard`: `ssp onboard check` and `ssp certs report`.
//! - `patients`: `ssp audit subject | reindex` and `ssp evidence [verify]`.
//! - `ship`: `ssp audit verify --witness` and `ssp audit export`.

mod audit;
mod onboard;
mod patients;
mod policy;
mod ship;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Problems};

use audit::{AuditCommand, audit};
use onboard::{CertsCommand, OnboardCommand, certs, onboard};
use policy::{PolicyCommand, policy};

/// Exit codes of DESIGN.md 1.1.
pub mod exit {
    pub(crate) const OK: u8 = 0;
    /// A negative answer (deny, tampered).
    pub(crate) const NEGATIVE: u8 = 1;
    /// Bad usage or config.
    pub(crate) const USAGE: u8 = 64;
    /// Internal error.
    pub(crate) const INTERNAL: u8 = 70;
}

/// A Spine-Secure-Proxy-style forward HTTP proxy for GP Connect.
#[derive(Debug, Parser)]
#[command(name = "ssp", version, about)]
pub(crate) struct Cli {
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
    /// A would-be consumer's verdict, checks 1 to 12, each failure with what to change.
    Onboard {
        #[command(subcommand)]
        command: OnboardCommand,
    },
    /// The consumer certificates seen per registered ASID.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Write the signed information-governance evidence pack for a period, or check one (`verify`).
    #[command(args_conflicts_with_subcommands = true)]
    Evidence {
        #[command(flatten)]
        args: patients::PackArgs,
        #[command(subcommand)]
        command: Option<patients::EvidenceCommand>,
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

/// Whether `args` (without the program name) is a command line `ssp` accepts; the error is clap's text. For the
/// test that checks every command line in the documentation.
pub fn parses(args: &[&str]) -> Result<(), String> {
    match Cli::try_parse_from(std::iter::once("ssp").chain(args.iter().copied())) {
        Ok(_) => Ok(()),
        Err(e) if !e.use_stderr() => Ok(()),
        Err(e) => Err(e.to_string()),
    }
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
        Command::Onboard { command } => onboard(command),
        Command::Certs { command } => certs(command),
        Command::Evidence { args, command } => patients::evidence(args, command),
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
    // Colour codes only on a terminal: under systemd stderr is the journal, where they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The control runtime: signals, reloads, the admin listener, the provider pool's sweep. Consumer connections
/// are served on `server.workers` threads of their own (see `server`), so one thread is enough here.
fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
                eprintln!("{}: {e}", path.display());
                let state = e.get_ref().is_some_and(|e| {
                    e.is::<crate::app::AuditUnopenable>()
                        || e.is::<crate::app::PatientIndexUnusable>()
                        || e.is::<crate::app::ShipUnusable>()
                });
                return if state { exit::USAGE } else { exit::INTERNAL };
            }
        };
        let addr = server.local_addr().map_or_else(|_| config.server.listen.to_string(), |a| a.to_string());
        tracing::info!(listen = %addr, systems, endpoints, agreements, config = %path.display(), "ssp serving");
        // The signals are taken over before systemd hears READY=1: one sent right after must not kill the process.
        let signalled = crate::lifecycle::shutdown_signal();
        tokio::spawn(crate::lifecycle::reload_on_sighup(config.clone(), server.handles()));
        tokio::spawn(crate::lifecycle::watchdog());
        crate::lifecycle::notify_ready();
        let stop = async {
            signalled.await;
            crate::lifecycle::notify_stopping();
        };
        // Ends with the current audit segment sealed and fsynced: a clean stop leaves a verifiably complete log.
        if let Err(e) = server.run(stop, config.server.shutdown_grace).await {
            tracing::error!(error = %e, "cannot start the worker threads");
            return exit::INTERNAL;
        }
        tracing::info!("ssp stopped");
        exit::OK
    })
}

/// Every problem one run can find: the config's own (each bad value, wrong type and unknown key), then, when its
/// required keys could be read, the files and folders it names (with the defaults in place of refused values).
fn check_config(path: &Path) -> u8 {
    let mut read = Config::load_checked(path);
    let Some(config) = read.config.take() else {
        let mut problems = read.problems;
        problems.push(format!(
            "{}: skipped: the checks of the certificates, keys, CRLs, policy files and state folders it names, \
             because the problems above leave no config to read",
            path.display()
        ));
        return print_problems(&Problems { problems });
    };
    let mut checked = crate::app::inspect(&config);
    if let Some(key) = &config.evidence_key
        && let Err(why) = crate::evidence::SigningKey::load(key)
    {
        checked.problems.push(format!("evidence.key: {why}"));
    }
    for warning in &checked.warnings {
        eprintln!("warning: {warning}");
    }
    let found = std::mem::take(&mut checked.problems);
    checked.problems = std::mem::take(&mut read.problems);
    checked
        .problems
        .extend(found.into_iter().filter_map(|p| read.place(path, p)));
    if !read.unusable.is_empty() {
        checked.problems.push(format!(
            "{}: skipped: the checks that need {} (missing or refused above); everything else was checked",
            path.display(),
            read.unusable.join(", ")
        ));
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

fn dev_certs(out: &Path) -> u8 {
    match crate::demo::devcerts::generate(out) {
        Ok(files) => {
            println!("{}", crate::demo::devcerts::WARNING);
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
