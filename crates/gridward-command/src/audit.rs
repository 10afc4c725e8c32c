//! [`AuditRecorder`]: where the command service writes its audit entries.
//!
//! Every command issued, proposal made, approved, rejected or expired, firmware uploaded or
//! refused, campaign created, advanced, paused, resumed or cancelled is one
//! [`gridward_audit::NewEntry`]. Where two people are involved (four eyes) the entry's actor is
//! the one who acted and its detail names the other.

use gridward_audit::NewEntry;

/// Receives audit entries. The head-end's implementation appends them to the audit log (a
/// failure there is the recorder's to report: the act already happened).
pub trait AuditRecorder: Send + Sync {
    /// Records one entry.
    fn record(&self, entry: NewEntry);
}

impl<F> AuditRecorder for F
where
    F: Fn(NewEntry) + Send + Sync,
{
    fn record(&self, entry: NewEntry) {
        self(entry);
    }
}
