//! `ssp policy check`: checks 5 to 9 explained one by one, with the same check functions that decide requests
//! (`decide`), so the explanation cannot disagree with the decision.

use std::time::SystemTime;

use super::decide::{Denial, fqdn_check, sender_check, target_check};
use super::model::{Agreement, Policy};
use crate::ids::{IdSet, InteractionId};
use crate::ssp::{SspHeaders, Target};

/// One check of an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub number: u8,
    pub name: &'static str,
    pub outcome: StepOutcome,
    pub detail: String,
    /// On a failure, the refusal the proxy answers it with.
    pub denial: Option<Denial>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Pass,
    Fail,
    Skip,
}

impl StepOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Pass => "pass",
            StepOutcome::Fail => "FAIL",
            StepOutcome::Skip => "skip",
        }
    }
}

/// What `ssp policy check` prints: every check with its reason, and the decision (the first failure wins).
#[derive(Debug, Clone)]
pub struct Explained {
    pub generation: u64,
    pub steps: Vec<Step>,
    pub decision: Result<(), Denial>,
}

fn sorted(set: &IdSet<InteractionId>) -> String {
    let mut list: Vec<&str> = set.iter().map(InteractionId::as_str).collect();
    list.sort_unstable();
    if list.is_empty() {
        "(nothing)".into()
    } else {
        list.join(", ")
    }
}

/// The steps so far and the first failure, which is the decision.
struct Steps {
    steps: Vec<Step>,
    decision: Result<(), Denial>,
}

impl Steps {
    fn skip(&mut self, number: u8, name: &'static str, detail: String) {
        self.push(number, name, StepOutcome::Skip, detail);
    }

    /// Adds a check that ran: `pass` or `fail` is its detail; a failure is the decision if none came before.
    fn ran<T>(
        &mut self,
        number: u8,
        name: &'static str,
        result: Result<T, Denial>,
        pass: impl FnOnce(T) -> String,
        fail: impl FnOnce() -> String,
    ) {
        match result {
            Ok(found) => self.push(number, name, StepOutcome::Pass, pass(found)),
            Err(denial) => {
                self.push(number, name, StepOutcome::Fail, fail());
                if let Some(step) = self.steps.last_mut() {
                    step.denial = Some(denial.clone());
                }
                if self.decision.is_ok() {
                    self.decision = Err(denial);
                }
            }
        }
    }

    fn push(&mut self, number: u8, name: &'static str, outcome: StepOutcome, detail: String) {
        self.steps.push(Step {
            number,
            name,
            outcome,
            detail,
            denial: None,
        });
    }
}

impl Policy {
    /// Explains checks 5 to 9 for a request, check by check, for `ssp policy check` and `ssp onboard check`.
    /// `names` are the client certificate's CN and DNS SANs (absent: check 5 is skipped). The decision is the one
    /// [`Policy::decide`] makes: the first failing check.
    ///
    /// Without a `target` (one that failed check 3), check 9 is skipped.
    pub(crate) fn explain(
        &self,
        headers: &SspHeaders,
        target: Option<&Target>,
        names: Option<&[&str]>,
        now: SystemTime,
    ) -> Explained {
        let urn = headers.interaction.as_str();
        let system = self.systems.get(&headers.from);
        let endpoint = self.endpoints.get(&headers.to);
        let mut out = Steps {
            steps: Vec::new(),
            decision: Ok(()),
        };

        match (system, names) {
            (None, _) => out.skip(
                5,
                "fqdn",
                format!("{} is not in the directory (fails at 6)", headers.from),
            ),
            (Some(s), None) => out.skip(
                5,
                "fqdn",
                format!("no --fqdn given; {} must present {}", headers.from, s.fqdn),
            ),
            (Some(s), Some(names)) => out.ran(
                5,
                "fqdn",
                fqdn_check(headers, system, |registered| {
                    names.iter().any(|n| n.eq_ignore_ascii_case(registered))
                }),
                |()| format!("{} is the FQDN registered for {}", s.fqdn, headers.from),
                || {
                    let shown = if names.is_empty() {
                        "(no name)".to_owned()
                    } else {
                        names.join(", ")
                    };
                    format!(
                        "the certificate names {shown}, not {}, the FQDN registered for {}",
                        s.fqdn, headers.from
                    )
                },
            ),
        }
        out.ran(
            6,
            "sender",
            sender_check(headers, system),
            |s| format!("{} ({}) may send {urn}", headers.from, s.name),
            || match system {
                None => format!("{} is not an accredited system", headers.from),
                Some(s) => format!(
                    "{} ({}) may send only: {}",
                    headers.from,
                    s.name,
                    sorted(&s.interactions)
                ),
            },
        );
        out.ran(
            7,
            "receiver",
            self.receiver_check(headers),
            |e| {
                format!(
                    "{} ({}, party key {}) handles {urn}",
                    headers.to, e.ods, e.party_key
                )
            },
            || match endpoint {
                None => format!("no endpoint has ASID {}", headers.to),
                Some(e) => format!(
                    "{} ({}) handles only: {}",
                    headers.to,
                    e.ods,
                    sorted(&e.interactions)
                ),
            },
        );
        out.ran(
            8,
            "agreement",
            self.agreement_check(headers, now),
            |a| format!("{} covers it and is in force", a.id),
            || {
                let agreements: Vec<&Agreement> = self
                    .agreements
                    .get(&headers.from)
                    .map(|l| l.iter().filter(|a| a.to == headers.to).collect())
                    .unwrap_or_default();
                if agreements.is_empty() {
                    return format!("no agreement from {} to {}", headers.from, headers.to);
                }
                let why: Vec<String> = agreements
                    .iter()
                    .map(|a| {
                        if a.interactions.covers(&headers.interaction) {
                            format!("{} is not in force now", a.id)
                        } else {
                            format!("{} does not cover {urn}", a.id)
                        }
                    })
                    .collect();
                why.join("; ")
            },
        );
        match (endpoint, target) {
            (None, _) => out.skip(9, "endpoint", "no endpoint to compare with".into()),
            (Some(_), None) => out.skip(9, "endpoint", "no valid target URL (check 3)".into()),
            (Some(e), Some(target)) => out.ran(
                9,
                "endpoint",
                target_check(target, e),
                |()| format!("the URL continues the registered {}", e.url),
                || target_hint(target.as_str(), &e.url),
            ),
        }
        Explained {
            generation: self.generation,
            steps: out.steps,
            decision: out.decision,
        }
    }
}

/// Why a target does not continue an endpoint's registered URL, in the consumer's terms: the usual slips (an added
/// default port, another host, a host in other case, another path) named with the registered URL.
fn target_hint(target: &str, url: &str) -> String {
    let (Some((t_origin, t_rest)), Some((u_origin, u_rest))) =
        (split_origin(target), split_origin(url))
    else {
        return format!("the URL must start with the registered {url}");
    };
    if t_origin.eq_ignore_ascii_case(&format!("{u_origin}:443")) {
        return format!("the URL adds :443 to the registered {url}: send {u_origin}{t_rest}");
    }
    if !t_origin.eq_ignore_ascii_case(u_origin) {
        return format!("the URL's origin {t_origin} is not the registered {u_origin} (of {url})");
    }
    if t_origin != u_origin {
        return format!(
            "the URL's origin {t_origin} differs in case from the registered {u_origin}: send it exactly"
        );
    }
    format!(
        "the URL's path {t_rest} does not start with the registered path {u_rest} (of {url}) followed by / or ?"
    )
}

/// `https://authority` and the rest of an absolute URL.
fn split_origin(url: &str) -> Option<(&str, &str)> {
    let after = url.find("://")? + 3;
    let end = url[after..]
        .find(['/', '?'])
        .map_or(url.len(), |i| after + i);
    Some(url.split_at(end))
}
