//! What every request handler shares, and the two records every refusal leaves: a security
//! event (in the store, for operators and the SIEM) and an audit entry (in the audit chain).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gridward_access::Access;
use gridward_audit::{Actor, AuditLog, NewEntry, Outcome};
use gridward_command::Commands;
use gridward_core::MeterId;
use gridward_core::envelope::VerifyingKey;
use gridward_store::{AlarmStore, CommandStore, SecurityEvent, Store};
use time::OffsetDateTime;

/// The clock the API reads (the binary passes the system clock, tests a fixed one).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// A hook called with every security event the API records (the service sends them on to
/// syslog and the metrics).
pub type SecurityHook = Arc<dyn Fn(&SecurityEvent) + Send + Sync>;

/// The service's metrics, as the API sees them: it counts logins and lockouts, and serves the
/// exposition at `GET /metrics`.
pub trait Observer: Send + Sync {
    /// A login attempt ended.
    fn login(&self, success: bool);
    /// An account was locked.
    fn lockout(&self);
    /// The Prometheus/OpenMetrics text exposition and its content type.
    fn exposition(&self) -> (String, &'static str);
}

/// What the API serves from.
#[derive(Clone)]
pub struct ApiContext {
    /// Readings, meters, security events, the outbox.
    pub store: Arc<dyn Store>,
    /// Users, sessions, the authorisation function.
    pub access: Arc<Access>,
    /// The audit chain.
    pub audit: Arc<AuditLog>,
    /// The PKI directory, for a meter's certificate status (`None`: not shown).
    pub pki_dir: Option<PathBuf>,
    /// The clock.
    pub clock: Clock,
    /// Called with every security event recorded.
    pub on_security_event: Option<SecurityHook>,
    /// `GET /readyz` answers 200 only while this is true (the service sets it once ingest runs).
    pub ready: Arc<AtomicBool>,
    /// Metrics (`None`: `GET /metrics` answers 404 and nothing is counted).
    pub observer: Option<Arc<dyn Observer>>,
    /// The command service (`None`: commands are off, and every route that changes something
    /// on the downward path answers 503 saying how to turn them on).
    pub commands: Option<Arc<Commands>>,
    /// Where commands, proposals, firmware and campaigns are read from (`None`: those reads
    /// answer 503 too). The head-end passes its store, which is also the command service's.
    pub command_store: Option<Arc<dyn CommandStore>>,
    /// The manufacturer keys a firmware manifest must be signed by (empty: every upload is
    /// refused).
    pub manufacturers: Arc<Vec<VerifyingKey>>,
    /// Alarms and the concentrator topology (`None`: `/api/v1/alarms` and
    /// `/api/v1/concentrators` answer 503). The head-end passes its store.
    pub alarms: Option<Arc<dyn AlarmStore>>,
}

impl std::fmt::Debug for ApiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiContext")
            .field("pki_dir", &self.pki_dir)
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("commands", &self.commands.is_some())
            .field("manufacturers", &self.manufacturers.len())
            .field("alarms", &self.alarms.is_some())
            .finish_non_exhaustive()
    }
}

impl ApiContext {
    /// A context with no PKI directory, no hook, no commands, no alarms, and ready.
    pub fn new(
        store: Arc<dyn Store>,
        access: Arc<Access>,
        audit: Arc<AuditLog>,
        clock: Clock,
    ) -> Self {
        Self {
            store,
            access,
            audit,
            pki_dir: None,
            clock,
            on_security_event: None,
            ready: Arc::new(AtomicBool::new(true)),
            observer: None,
            commands: None,
            command_store: None,
            manufacturers: Arc::new(Vec::new()),
            alarms: None,
        }
    }

    /// Turns the alarm and topology routes on, served from `store`.
    #[must_use]
    pub fn with_alarms(mut self, store: Arc<dyn AlarmStore>) -> Self {
        self.alarms = Some(store);
        self
    }

    /// Turns the downward path on: `commands` issues and decides, `store` is read, uploads are
    /// checked against `manufacturers`.
    #[must_use]
    pub fn with_commands(
        mut self,
        commands: Arc<Commands>,
        store: Arc<dyn CommandStore>,
        manufacturers: Arc<Vec<VerifyingKey>>,
    ) -> Self {
        self.commands = Some(commands);
        self.command_store = Some(store);
        self.manufacturers = manufacturers;
        self
    }

    /// Now, by the context's clock.
    pub fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    /// Records a security event (durably) and passes it to the hook. A store failure is
    /// logged; the request's answer does not depend on it.
    pub fn security_event(
        &self,
        reason: &str,
        meter: Option<&MeterId>,
        source: IpAddr,
        detail: impl Into<String>,
    ) {
        let event = SecurityEvent {
            at: self.now(),
            meter_id: meter.cloned(),
            source: Some(source.to_string()),
            reason: reason.to_owned(),
            detail: detail.into(),
        };
        if let Err(e) = self
            .store
            .record_security_events(std::slice::from_ref(&event))
        {
            tracing::error!(error = %e, reason, "could not record a security event");
        }
        if let Some(hook) = &self.on_security_event {
            hook(&event);
        }
    }

    /// Appends an audit entry. A failure is logged as an error (the act already happened).
    pub fn audit(
        &self,
        actor: Actor,
        action: &str,
        target: &str,
        outcome: Outcome,
        source: IpAddr,
        detail: impl Into<String>,
    ) {
        let entry = NewEntry::new(self.now(), actor, action, target, outcome)
            .source(source.to_string())
            .detail(detail.into());
        if let Err(e) = self.audit.append(&entry) {
            tracing::error!(error = %e, action, "could not append to the audit log");
        }
    }
}
