//! The verdict as the command prints it: a line per check (then its fix lines), and as JSON for scripts and for
//! `GET /_ssp/selftest`.

use std::fmt::Write;

use super::{Refused, Status, Verdict};

impl Verdict {
    /// The text report: `check N  name  pass|FAIL|not run  detail`, each fix indented under its check, then the
    /// proxy's answer to the request.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let status = match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::NotRun => "not run",
            };
            let _ = writeln!(
                out,
                "check {:<2} {:<11} {:<7}  {}",
                c.number, c.name, status, c.detail
            );
            for fix in &c.fixes {
                let _ = writeln!(out, "            -> {fix}");
            }
            if c.status == Status::Fail
                && let Some(refused) = &c.refusal
            {
                let _ = writeln!(out, "            proxy answers: {}", answer(refused));
            }
        }
        match self.first_refusal() {
            None if self.passed() => {
                let _ = writeln!(
                    out,
                    "verdict: PASS (policy generation {})",
                    self.policy_generation
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "verdict: FAIL (policy generation {})",
                    self.policy_generation
                );
            }
            Some(refused) => {
                let _ = writeln!(
                    out,
                    "verdict: FAIL, checks {:?} (policy generation {}); the proxy answers the first: {}",
                    self.failed(),
                    self.policy_generation,
                    answer(refused)
                );
            }
        }
        out
    }
}

fn answer(refused: &Refused) -> String {
    match refused {
        Refused::Handshake(reason) => format!("handshake refused ({reason})"),
        Refused::Http { status, text } => format!("{status} {text}"),
    }
}

fn refused_json(refused: &Refused) -> serde_json::Value {
    match refused {
        Refused::Handshake(reason) => serde_json::json!({"handshake": reason}),
        Refused::Http { status, text } => serde_json::json!({"status": status, "text": text}),
    }
}

/// The verdict as one JSON object: `verdict` (`pass` or `fail`), `policy_generation`, `failed` (check numbers),
/// `refusal` (the proxy's answer: `{"status", "text"}`, `{"handshake": reason}`, or `null`), and `checks`, each
/// `{"number", "name", "result" (pass, fail, not_run), "detail", "fixes", "refusal"}`.
pub fn verdict_json(verdict: &Verdict) -> serde_json::Value {
    serde_json::json!({
        "verdict": if verdict.passed() { "pass" } else { "fail" },
        "policy_generation": verdict.policy_generation,
        "failed": verdict.failed(),
        "refusal": verdict.first_refusal().map(refused_json),
        "checks": verdict.checks.iter().map(|c| serde_json::json!({
            "number": c.number,
            "name": c.name,
            "result": c.status.as_str(),
            "detail": c.detail,
            "fixes": c.fixes,
            "refusal": c.refusal.as_ref().map(refused_json),
        })).collect::<Vec<_>>(),
    })
}
