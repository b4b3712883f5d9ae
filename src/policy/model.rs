//! The compiled directory and agreements: accredited systems, provider endpoints, agreements, and the immutable
//! [`Policy`] snapshot that request handling reads without locks.

use std::sync::Arc;
use std::time::SystemTime;

use crate::ids::{Asid, IdMap, IdSet, InteractionId, OdsCode};
use crate::jwt::VerifyingKey;

/// A system's registered token keys, shared by every permit for it.
pub type JwtKeys = Arc<[VerifyingKey]>;

/// An accredited sending system (SDS accredited-system record).
#[derive(Debug, Clone)]
pub struct System {
    pub asid: Asid,
    pub name: String,
    pub ods: OdsCode,
    /// Must equal the client certificate's CN or one of its DNS SANs (check 5); lower case.
    pub fqdn: Arc<str>,
    /// What this system may send (check 6).
    pub interactions: IdSet<InteractionId>,
    /// Keys its audit tokens must be signed with; `None`: unsigned GP Connect tokens.
    pub jwt_keys: Option<JwtKeys>,
    /// Who runs it and whose product it is, for reports.
    pub org: Organisation,
}

/// What a directory entry may say of its organisation and product, for reports only (the ASID lookup of `ssp
/// audit export --format spine`): nothing here is checked against a request. Each at most 200 characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Organisation {
    /// The system's supplier (manufacturer), `MName` in NHS England's ASID lookup.
    pub supplier: Option<String>,
    /// The supplier's product, `PName`.
    pub product: Option<String>,
    /// The organisation's name, `OrgName`.
    pub org_name: Option<String>,
    /// The organisation's type (`GP Practice`, `NHS Trust`, ...), `OrgType`.
    pub org_type: Option<String>,
    /// `PostCode`.
    pub postcode: Option<String>,
}

/// A provider endpoint (SDS MHS record).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub asid: Asid,
    pub party_key: String,
    pub cpa_id: String,
    pub ods: OdsCode,
    /// The registered `nhsMhsEndPoint`, no trailing slash; targets must continue it exactly (check 9).
    pub url: String,
    /// What this endpoint handles (check 7).
    pub interactions: IdSet<InteractionId>,
    pub org: Organisation,
}

/// Which interactions an agreement covers.
#[derive(Debug, Clone)]
pub enum Grant {
    All,
    Only(IdSet<InteractionId>),
}

impl Grant {
    pub(super) fn covers(&self, interaction: &InteractionId) -> bool {
        match self {
            Grant::All => true,
            Grant::Only(set) => set.contains(interaction),
        }
    }
}

/// A data-sharing agreement from one consumer system to one provider endpoint.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub id: String,
    pub from: Asid,
    pub to: Asid,
    pub interactions: Grant,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

impl Agreement {
    pub(super) fn in_force(&self, now: SystemTime) -> bool {
        self.not_before.is_none_or(|t| now >= t) && self.not_after.is_none_or(|t| now <= t)
    }
}

/// A GP supplier's token service, for patient-facing requests to the endpoints whose `supplier` names it: the
/// supplier's own access token is obtained there by an RFC 8693 token exchange, the client authenticated with a
/// `private_key_jwt` assertion (RFC 7523 section 2.2; OpenID Connect Core section 9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supplier {
    /// As the endpoints' `supplier` field writes it.
    pub name: String,
    /// The token endpoint, an `https` URL: the exchange is POSTed here, and it is the assertion's `aud`.
    pub token_endpoint: String,
    /// This proxy's client id there: the assertion's `iss` and `sub`.
    pub client_id: String,
    /// The `kid` of the assertion's header: which of the proxy's keys the supplier registered.
    pub key_id: String,
    /// The exchange's `audience` parameter (RFC 8693 section 2.1): the supplier API the token is for.
    pub audience: String,
}

/// An immutable, compiled policy: what request handling reads.
#[derive(Debug, Default)]
pub struct Policy {
    /// Which import produced this snapshot; named by every decision.
    pub generation: u64,
    pub(super) systems: IdMap<Asid, System>,
    pub(super) endpoints: IdMap<Asid, Arc<Endpoint>>,
    /// Agreements by sending system; a consumer has a handful, so the receiver is found by a short scan.
    pub(super) agreements: IdMap<Asid, Vec<Agreement>>,
    /// Every interaction some system sends or some endpoint handles: the bounded set of metric labels.
    pub(super) known: IdSet<InteractionId>,
    /// `[[supplier]]` by name.
    pub(super) suppliers: IdMap<String, Arc<Supplier>>,
    /// Endpoints by the ODS code of their practice, in ASID order: where a patient-facing request goes.
    pub(super) by_ods: IdMap<OdsCode, Vec<Arc<Endpoint>>>,
}

impl Policy {
    /// Whether some system or endpoint names this interaction (metric labels use it, or `other`).
    pub fn knows(&self, interaction: &str) -> bool {
        self.known.contains(interaction)
    }

    pub fn endpoint(&self, asid: &Asid) -> Option<&Endpoint> {
        self.endpoints.get(asid).map(|e| &**e)
    }

    /// The endpoint of the practice `ods` that handles `interaction` (the first in ASID order when several do).
    pub fn practice_endpoint(
        &self,
        ods: &OdsCode,
        interaction: &InteractionId,
    ) -> Option<&Arc<Endpoint>> {
        self.by_ods
            .get(ods)?
            .iter()
            .find(|e| e.interactions.contains(interaction))
    }

    /// The practice `ods` has some endpoint in the directory.
    pub fn has_practice(&self, ods: &OdsCode) -> bool {
        self.by_ods.contains_key(ods)
    }

    /// The `[[supplier]]` called `name`.
    pub fn supplier(&self, name: &str) -> Option<&Arc<Supplier>> {
        self.suppliers.get(name)
    }

    /// The accredited system with this ASID.
    pub fn system(&self, asid: &Asid) -> Option<&System> {
        self.systems.get(asid)
    }

    /// Every accredited system, in ASID order.
    pub(crate) fn systems(&self) -> Vec<&System> {
        let mut all: Vec<&System> = self.systems.values().collect();
        all.sort_by(|a, b| a.asid.as_str().cmp(b.asid.as_str()));
        all
    }

    /// Every provider endpoint, in ASID order.
    pub(crate) fn endpoints(&self) -> Vec<&Endpoint> {
        let mut all: Vec<&Endpoint> = self.endpoints.values().map(|e| &**e).collect();
        all.sort_by(|a, b| a.asid.as_str().cmp(b.asid.as_str()));
        all
    }

    /// Counts of systems, endpoints and agreements, for logs.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.systems.len(),
            self.endpoints.len(),
            self.agreements.values().map(Vec::len).sum(),
        )
    }
}
