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

/// The audit actor for a name the command service was given: `cert:NAME` (how the API names a
/// client certificate, a name no user can have) is that certificate, anything else a user
/// (including `cli:NAME`, an operating-system user on the command line).
pub fn actor(name: &str) -> gridward_audit::Actor {
    match name.strip_prefix("cert:") {
        Some(subject) => gridward_audit::Actor::Certificate(subject.to_owned()),
        None => gridward_audit::Actor::User(name.to_owned()),
    }
}
