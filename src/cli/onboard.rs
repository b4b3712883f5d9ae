//! `ssp onboard check` (a would-be consumer's verdict, checks 1 to 12) and `ssp certs report` (the consumer
//! certificates the radar has seen).

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use http::{HeaderValue, Method};

use super::{exit, load_config};
use crate::onboard::{self, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(super) enum OnboardCommand {
    /// Every check, 1 to 12, for a consumer's certificate and a sample request, each failure with what to change:
    /// exit 0 all pass, 1 any fail, 64 bad input. Forwards nothing.
    Check {
        /// The consumer's certificate chain, leaf first (PEM), or a PKCS#12 file with --password-file. No private
        /// key is read.
        #[arg(long)]
        cert: PathBuf,
        /// The PKCS#12 file's password (its first line)
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// `Ssp-From`: the sending system's ASID
        #[arg(long)]
        from: Option<String>,
        /// `Ssp-To`: the provider's ASID
        #[arg(long)]
        to: Option<String>,
        /// `Ssp-InteractionID`: the interaction's URN
        #[arg(long)]
        interaction: Option<String>,
        /// The full URL the consumer will call (what follows the proxy's address)
        #[arg(long)]
        target: Option<String>,
        /// The request's method [default: the header file's request line, else GET]
        #[arg(long)]
        method: Option<String>,
        /// The audit token (JWT), sent as `Authorization: Bearer`
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the audit token
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The whole header block as the consumer sends it (optionally with its request line); --from, --to,
        /// --interaction and --token replace its fields
        #[arg(long)]
        header_file: Option<PathBuf>,
        /// Use a stored policy generation (a number, or `current`) instead of the files in `policy.dir`
        #[arg(long)]
        generation: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum CertsCommand {
    /// The consumer certificates seen per registered ASID, soonest expiry first.
    Report {
        /// Only certificates expiring within this long (expired ones included), e.g. `30d`
        #[arg(long)]
        within: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Bad input: the line, and exit 64.
fn usage(line: impl std::fmt::Display) -> u8 {
    eprintln!("{line}");
    exit::USAGE
}

fn first_line(path: &PathBuf) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

pub(super) fn onboard(command: OnboardCommand) -> u8 {
    let OnboardCommand::Check {
        cert,
        password_file,
        from,
        to,
        interaction,
        target,
        method,
        token,
        token_file,
        header_file,
        generation,
        format,
        config,
    } = command;
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let password = match password_file.as_ref().map(first_line).transpose() {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let chain = match onboard::input::chain(&cert, password.as_deref()) {
        Ok(chain) => chain,
        Err(e) => return usage(e),
    };
    let mut block = match header_file
        .as_deref()
        .map(onboard::input::header_block)
        .transpose()
    {
        Ok(block) => block.unwrap_or_default(),
        Err(e) => return usage(e),
    };
    let token = match (token, token_file.as_ref().map(first_line).transpose()) {
        (Some(t), _) => Some(t),
        (None, Ok(t)) => t,
        (None, Err(e)) => return usage(e),
    };
    let fields = [
        (crate::ssp::HEADER_FROM, from),
        (crate::ssp::HEADER_TO, to),
        (crate::ssp::HEADER_INTERACTION_ID, interaction),
        (
            http::header::AUTHORIZATION,
            token.map(|t| format!("Bearer {}", t.trim())),
        ),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            let Ok(value) = HeaderValue::from_str(&value) else {
                return usage(format!(
                    "the {name} value is not a valid header field value"
                ));
            };
            block.headers.insert(name, value);
        }
    }
    // A sample needs a trace id like any request; one is made when neither the file nor the flags give one.
    if !block.headers.contains_key(crate::ssp::HEADER_TRACE_ID)
        && let Ok(id) = HeaderValue::from_str(crate::ids::TraceId::new_random().as_str())
    {
        block.headers.insert(crate::ssp::HEADER_TRACE_ID, id);
    }
    let Some(target) = target.or(block.target.take()) else {
        return usage(
            "--target (or a request line in --header-file) is needed: the full URL the consumer will call",
        );
    };
    let method = match method.map(|m| Method::from_bytes(m.as_bytes())) {
        Some(Ok(m)) => m,
        Some(Err(_)) => return usage("--method is not an HTTP method"),
        None => block.method.take().unwrap_or(Method::GET),
    };
    let policy = match super::policy::load_policy(&config, generation.as_deref()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let sample = Sample {
        method,
        target,
        headers: block.headers,
    };
    let verdict = match onboard::offline(&config, &policy, &chain, &sample) {
        Ok(v) => v,
        Err(problems) => return super::print_problems(&problems),
    };
    match format {
        Format::Text => print!("{}", verdict.text()),
        Format::Json => println!("{}", onboard::verdict_json(&verdict)),
    }
    if verdict.passed() {
        exit::OK
    } else {
        exit::NEGATIVE
    }
}

pub(super) fn certs(command: CertsCommand) -> u8 {
    let CertsCommand::Report {
        within,
        format,
        config,
    } = command;
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let within = match within.as_deref().map(crate::config::parse_duration) {
        None => None,
        Some(Some(d)) => Some(d),
        Some(None) => return usage("--within is not a duration like \"30d\" or \"12h\""),
    };
    let policy = match super::policy::load_policy(&config, None) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let inventory = match onboard::radar::Inventory::load(&config.audit.dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return exit::INTERNAL;
        }
    };
    let rows = onboard::radar::report(&inventory, &policy, crate::clock::unix_now(), within);
    match format {
        Format::Json => println!(
            "{}",
            serde_json::Value::Array(rows.iter().map(onboard::radar::Row::json).collect())
        ),
        Format::Text => print!("{}", onboard::radar::table(&rows, crate::clock::unix_now())),
    }
    exit::OK
}
