//! The decision for one request: checks 5 to 9 of DESIGN.md 1.4, in order, first failure wins. Each check is one
//! function here; [`Policy::decide`] runs them to make a [`Permit`], and `explain` runs the same functions to say
//! why.

use std::sync::Arc;
use std::time::SystemTime;

use super::model::{Agreement, Endpoint, JwtKeys, Policy, System};
use crate::ids::{Asid, PeerIdentity};
use crate::jwt::VerifyingKey;
use crate::ssp::{SspHeaders, SspRequest, Target};

/// Permission to forward one request. Only [`Policy::decide`] makes one, and it owns the request it checked, so
/// what is forwarded is exactly what was permitted.
#[derive(Debug)]
pub struct Permit {
    request: SspRequest,
    endpoint: Arc<Endpoint>,
    /// The sender's registered token keys, for check 10.
    jwt_keys: Option<JwtKeys>,
    /// The sender's registered FQDN, which the client certificate's CN or one of its DNS SANs matched (check 5).
    fqdn: Arc<str>,
    generation: u64,
}

impl Permit {
    pub(crate) fn request(&self) -> &SspRequest {
        &self.request
    }

    pub(crate) fn target(&self) -> &Target {
        &self.request.target
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The certificate name (CN or DNS SAN, lower case) that check 5 matched.
    pub(crate) fn fqdn(&self) -> &Arc<str> {
        &self.fqdn
    }

    /// The keys the sender's token must be signed with, if it registered any.
    pub(crate) fn jwt_keys(&self) -> Option<&[VerifyingKey]> {
        self.jwt_keys.as_deref()
    }
}

/// Why a request was refused by checks 5 to 9.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// Check 5: the certificate does not carry the FQDN registered for `Ssp-From`.
    FqdnMismatch { from: Asid },
    /// Check 6: `Ssp-From` is unknown or not accredited for the interaction.
    SenderNotAccredited { from: Asid },
    /// Check 7: no endpoint `Ssp-To` handles the interaction.
    ReceiverCannotHandle { to: Asid },
    /// Check 8: no agreement in force covers from -> to for the interaction.
    NoAgreement { from: Asid, to: Asid },
    /// Check 9: the target URL does not continue the endpoint's registered URL.
    TargetVaries {
        url: String,
        cpa_id: String,
        target: String,
    },
}

impl Denial {
    /// The check number of DESIGN.md 1.4.
    pub(crate) fn number(&self) -> u8 {
        match self {
            Denial::FqdnMismatch { .. } => 5,
            Denial::SenderNotAccredited { .. } => 6,
            Denial::ReceiverCannotHandle { .. } => 7,
            Denial::NoAgreement { .. } => 8,
            Denial::TargetVaries { .. } => 9,
        }
    }

    /// A bounded label for logs and metrics (never an ASID or URL).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Denial::FqdnMismatch { .. } => "fqdn_check_failed",
            Denial::SenderNotAccredited { .. } => "asid_check_failed",
            Denial::ReceiverCannotHandle { .. } => "partykey_interaction_check_failed",
            Denial::NoAgreement { .. } => "fot_check_failed",
            Denial::TargetVaries { .. } => "endpoint_varies_from_target_url",
        }
    }

    /// The consumer-facing text, exactly as the contract gives it.
    pub(crate) fn text(&self) -> String {
        match self {
            Denial::FqdnMismatch { from } => format!("FQDN_CHECK_FAILED_MESSAGESENDER_{from}"),
            Denial::SenderNotAccredited { from } => {
                format!("ASID_CHECK_FAILED_MESSAGESENDER_{from}")
            }
            Denial::ReceiverCannotHandle { to } => {
                format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{to}")
            }
            Denial::NoAgreement { from, to } => {
                format!("FOT_CHECK_FAILED_MESSAGESENDER_{from}_MESSAGERECEIVER_{to}")
            }
            Denial::TargetVaries {
                url,
                cpa_id,
                target,
            } => format!("ENDPOINT_{url}_CPAID_{cpa_id}_VARIES_FROM_TARGETURL_{target}"),
        }
    }
}

/// The outcome of a policy check.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "made and matched once per request; boxing the permit would cost an allocation per request"
)]
pub enum Decision {
    Permit(Permit),
    Deny(Denial),
}

impl Policy {
    /// Checks 5 to 9 for a request from the consumer `peer`, at time `now`. Consumes the request: a permit owns it.
    pub fn decide(&self, request: SspRequest, peer: &PeerIdentity, now: SystemTime) -> Decision {
        match self.evaluate(&request, peer, now) {
            Ok((endpoint, system)) => Decision::Permit(Permit {
                endpoint: Arc::clone(endpoint),
                jwt_keys: system.jwt_keys.clone(),
                fqdn: Arc::clone(&system.fqdn),
                request,
                generation: self.generation,
            }),
            Err(denial) => Decision::Deny(denial),
        }
    }

    /// Checks 5 to 9 for a patient-facing request, sent as the front's `[[system]]`: check 5 compares the
    /// platform's client certificate when the listener asks for one (`platform`), and is skipped when it does
    /// not (the access token, verified before, is then the only credential).
    pub fn decide_patient_facing(
        &self,
        request: SspRequest,
        platform: Option<&PeerIdentity>,
        now: SystemTime,
    ) -> Decision {
        match self.evaluate_for(&request, platform, now) {
            Ok((endpoint, system)) => Decision::Permit(Permit {
                endpoint: Arc::clone(endpoint),
                jwt_keys: None,
                fqdn: Arc::clone(&system.fqdn),
                request,
                generation: self.generation,
            }),
            Err(denial) => Decision::Deny(denial),
        }
    }

    fn evaluate(
        &self,
        request: &SspRequest,
        peer: &PeerIdentity,
        now: SystemTime,
    ) -> Result<(&Arc<Endpoint>, &System), Denial> {
        self.evaluate_for(request, Some(peer), now)
    }

    fn evaluate_for(
        &self,
        request: &SspRequest,
        peer: Option<&PeerIdentity>,
        now: SystemTime,
    ) -> Result<(&Arc<Endpoint>, &System), Denial> {
        let headers = &request.headers;
        let system = self.systems.get(&headers.from);
        if let Some(peer) = peer {
            fqdn_check(headers, system, |fqdn| peer.has_fqdn(fqdn))?;
        }
        let system = sender_check(headers, system)?;
        let endpoint = self.receiver_check(headers)?;
        self.agreement_check(headers, now)?;
        target_check(&request.target, endpoint)?;
        Ok((endpoint, system))
    }

    /// Check 7: the endpoint `Ssp-To` names handles the interaction.
    pub(super) fn receiver_check(&self, headers: &SspHeaders) -> Result<&Arc<Endpoint>, Denial> {
        self.endpoints
            .get(&headers.to)
            .filter(|e| e.interactions.contains(&headers.interaction))
            .ok_or_else(|| Denial::ReceiverCannotHandle {
                to: headers.to.clone(),
            })
    }

    /// Check 8: an agreement from `Ssp-From` to `Ssp-To` covers the interaction and is in force at `now`.
    pub(super) fn agreement_check(
        &self,
        headers: &SspHeaders,
        now: SystemTime,
    ) -> Result<&Agreement, Denial> {
        self.agreements
            .get(&headers.from)
            .and_then(|list| {
                list.iter().find(|a| {
                    a.to == headers.to
                        && a.interactions.covers(&headers.interaction)
                        && a.in_force(now)
                })
            })
            .ok_or_else(|| Denial::NoAgreement {
                from: headers.from.clone(),
                to: headers.to.clone(),
            })
    }
}

/// Check 5: the client certificate presents (`presents`) the FQDN registered for `Ssp-From`. Only a known sender
/// has one to compare; an unknown sender passes here and fails at 6.
pub(super) fn fqdn_check(
    headers: &SspHeaders,
    system: Option<&System>,
    presents: impl Fn(&str) -> bool,
) -> Result<(), Denial> {
    match system {
        Some(system) if !presents(&system.fqdn) => Err(Denial::FqdnMismatch {
            from: headers.from.clone(),
        }),
        _ => Ok(()),
    }
}

/// Check 6: `Ssp-From` is an accredited system that may send the interaction.
pub(super) fn sender_check<'p>(
    headers: &SspHeaders,
    system: Option<&'p System>,
) -> Result<&'p System, Denial> {
    system
        .filter(|s| s.interactions.contains(&headers.interaction))
        .ok_or_else(|| Denial::SenderNotAccredited {
            from: headers.from.clone(),
        })
}

/// Check 9: the target URL continues the endpoint's registered URL exactly.
pub(super) fn target_check(target: &Target, endpoint: &Endpoint) -> Result<(), Denial> {
    if target.is_under(&endpoint.url) {
        Ok(())
    } else {
        Err(Denial::TargetVaries {
            url: endpoint.url.clone(),
            cpa_id: endpoint.cpa_id.clone(),
            target: target.as_str().to_owned(),
        })
    }
}
