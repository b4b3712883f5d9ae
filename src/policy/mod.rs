//! The directory and the data-sharing agreements (DESIGN.md 1.3), and the decision for one request: checks 5 to 9
//! of DESIGN.md 1.4, first failure wins.
//!
//! Policy files are validated whole (every problem named with its file and line) and compiled into an immutable
//! [`Policy`] snapshot that request handling reads without locks. A [`Permit`] can only be made here, and the
//! forwarder takes nothing else: a request that skipped the check cannot be forwarded. This module knows
//! nothing of HTTP types or sockets.
//!
//! - `model`: systems, endpoints, agreements, the [`Policy`] snapshot.
//! - `compile`: policy files (and the key files they name) to a snapshot, with every problem named.
//! - `decide`: checks 5 to 9, one function each; [`Policy::decide`], [`Permit`], [`Denial`].
//! - `explain`: the same checks, explained for `ssp policy check`.
//! - [`store`]: the sled store of generations.
//! - [`sds`]: a directory policy file built from Spine Directory Service answers.

mod compile;
mod decide;
mod explain;
mod model;
pub mod sds;
pub mod store;

pub use compile::Source;
pub use decide::{Decision, Denial, Permit};
pub use explain::{Explained, Step, StepOutcome};
pub use model::{Agreement, Endpoint, Grant, JwtKeys, Organisation, Policy, Supplier, System};

#[cfg(test)]
mod tests;
