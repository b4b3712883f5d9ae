//! The request path's whole interface to the log for a permitted request: [`AuditLog::open`] queues its `request`
//! record and [`Open::durable`] waits until it is durable; [`Open::end`] ends it with its `response` record, once.
//! Where the record stands meanwhile (staged, queued, taken, written, withdrawn) and what a request that stops
//! waiting leaves in the log are this module's business (`slot`), not the caller's.

use std::sync::Arc;

use super::slot::{InFlight, NotWritten, Queued, Ticket};
use super::{AuditLog, Unavailable};
use crate::audit::Record;

/// A permitted request's transaction in the log: its `request` record queued, its `response` record to come.
#[derive(Debug)]
pub(crate) struct Open {
    log: Arc<AuditLog>,
    ticket: Ticket,
}

impl AuditLog {
    /// Queues (or stages) `record`, a permitted request's `request` record, waiting at most 100 ms for room in the
    /// queue; [`Unavailable`] past that or when the log is closed (the request is refused with 503
    /// `AUDIT_UNAVAILABLE` and nothing of it is logged). From the moment this returns the transaction is open,
    /// and its holder must [`end`](Open::end) it, whatever becomes of the request.
    pub(crate) async fn open(self: &Arc<Self>, record: Record) -> Result<Open, Unavailable> {
        let room = self.reserve().await?;
        let ticket = self.queue(record, room)?;
        Ok(Open {
            log: Arc::clone(self),
            ticket,
        })
    }
}

impl AuditLog {
    /// As [`AuditLog::submit`], for the `response` record of a request that stopped waiting for its request record
    /// while that record was being written ([`NotWritten::InFlight`]): it follows that record into the log if,
    /// and only if, its write ends well.
    pub(in crate::audit) fn submit_after(&self, record: Record, request: InFlight) {
        self.submit_job(record, Some(request.0));
    }

    /// Queues a permitted request's `response` record after its `request` record: at once once that is written.
    /// If the request stopped waiting before (5 s passed, or its consumer went away while the record was queued),
    /// the request record is withdrawn if the writer has not taken it, and then neither is written; if the writer
    /// was writing it, the response record follows it only if that write ends well.
    pub(in crate::audit) fn submit_response(&self, record: Record, request: &Queued) {
        match request.stop_waiting() {
            Ok(()) => self.submit(record),
            Err(NotWritten::InFlight(request)) => self.submit_after(record, request),
            Err(NotWritten::Never) => {}
        }
    }
}

impl Open {
    /// Waits until the `request` record is durable as `audit.durability` says (written; in strict mode fsynced):
    /// then, and only then, may the request be forwarded. [`Unavailable`] when its write failed or took longer
    /// than 5 s (a stalled disk): the request is refused with 503 `AUDIT_UNAVAILABLE`, and [`end`](Open::end)
    /// still says how.
    pub(crate) async fn durable(&self) -> Result<(), Unavailable> {
        self.ticket.written().await.map_err(|_| Unavailable)
    }

    /// Ends the transaction with its `response` record. It follows the `request` record into the log: at once
    /// if that is written; if the request stopped waiting before (5 s, or its consumer went away while the record
    /// was queued), the `request` record is withdrawn if no writer has taken it, and then neither is written; if a
    /// writer was writing it, this one is written only if that write ends well. The log never holds one of the two
    /// without the other.
    pub(crate) fn end(self, record: Record) {
        self.log.submit_response(record, &self.ticket.request());
    }
}
