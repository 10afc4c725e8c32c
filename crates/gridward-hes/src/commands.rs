//! The head-end's side of the downward path: the command service (`gridward-command`) wired to
//! the MQTT endpoint (its [`Transport`]), the audit log, the users database (who may still have a
//! proposal approved) and the ingest pipeline (acknowledgements).

use std::sync::Arc;

use bytes::Bytes;
use gridward_command::{Commands, Delivery, NotReachable, Policy, Transport};
use gridward_core::MeterId;
use gridward_core::envelope::{SigningKey, VerifyingKey};
use gridward_mqtt::{Endpoint, OutboundResult, PublishHandler};
use gridward_pki::Pki;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::config::CommandSettings;

/// The endpoint as the dispatcher's link to meters.
pub struct EndpointTransport<H> {
    endpoint: Endpoint<H>,
}

impl<H> std::fmt::Debug for EndpointTransport<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointTransport").finish_non_exhaustive()
    }
}

impl<H> EndpointTransport<H> {
    /// Sends through `endpoint`.
    pub fn new(endpoint: Endpoint<H>) -> Self {
        Self { endpoint }
    }
}

impl<H: PublishHandler> Transport for EndpointTransport<H> {
    fn is_reachable(&self, meter: &MeterId) -> bool {
        self.endpoint.is_connected(meter)
    }

    fn send(
        &self,
        meter: &MeterId,
        topic: String,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Delivery>, NotReachable> {
        let done = self
            .endpoint
            .publish(meter, topic, payload)
            .map_err(|_| NotReachable)?;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let delivery = match done.await {
                // PUBACK 0x00 (or, MQTT 5, "no matching subscribers" 0x10: still received).
                Ok(OutboundResult::Acked { reason_code }) if reason_code < 0x80 => Delivery::Acked,
                Ok(OutboundResult::SentUnacknowledged) => Delivery::Acked,
                Ok(other) => {
                    tracing::debug!(result = ?other, "publication to the meter not acknowledged");
                    Delivery::Lost
                }
                Err(_) => Delivery::Lost,
            };
            let _ = tx.send(delivery);
        });
        Ok(rx)
    }
}

/// Why commands could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandSetupError {
    /// No usable command-signer certificate or key.
    #[error("{0}")]
    Signer(String),
    /// A manufacturer key file cannot be used.
    #[error("firmware.manufacturers: {path}: {reason}")]
    Manufacturer {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The configured policy is unusable.
    #[error("commands: {0}")]
    Policy(#[from] gridward_command::PolicyError),
}

/// The command key of `settings.signer`: the current certificate of that name must be valid now
/// and its key on disk.
///
/// # Errors
///
/// [`CommandSetupError::Signer`] naming what to do.
pub fn load_signer(
    pki_dir: &std::path::Path,
    settings: &CommandSettings,
    now: OffsetDateTime,
) -> Result<SigningKey, CommandSetupError> {
    let fail = |e: String| {
        CommandSetupError::Signer(format!(
            "command signer {:?}: {e} (issue one with `gridward pki issue command-signer --dir {} {}`, or set [commands] signer = \"off\")",
            settings.signer,
            pki_dir.display(),
            settings.signer
        ))
    };
    let pki = Pki::open(pki_dir, None).map_err(|e| fail(e.to_string()))?;
    let valid = pki
        .command_signers(now)
        .map_err(|e| fail(e.to_string()))?
        .into_iter()
        .any(|c| c.name == settings.signer && c.current && c.is_valid_at(now));
    if !valid {
        return Err(fail("no current certificate valid now".into()));
    }
    let path = pki
        .command_signer_key_path(&settings.signer)
        .map_err(|e| fail(e.to_string()))?;
    let pem = std::fs::read_to_string(&path)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| fail(format!("{}: {e}", path.display())))
}

/// The manufacturer keys of `[firmware] manufacturers`.
///
/// # Errors
///
/// [`CommandSetupError::Manufacturer`] for a file that is not an SPKI PEM public key.
pub fn load_manufacturers(
    settings: &CommandSettings,
) -> Result<Vec<VerifyingKey>, CommandSetupError> {
    let mut keys = Vec::new();
    for path in &settings.manufacturers {
        let fail = |reason: String| CommandSetupError::Manufacturer {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        keys.push(VerifyingKey::from_spki_pem(&pem).map_err(|e| fail(e.to_string()))?);
    }
    Ok(keys)
}

/// The command service's policy from `[commands]`.
pub fn policy(settings: &CommandSettings) -> Policy {
    let rate = settings.dispatch_rate_per_sec.round().clamp(1.0, 100_000.0) as u32;
    Policy {
        critical_kinds: settings.critical.clone(),
        four_eyes_threshold: settings.four_eyes_threshold,
        approval_window: time::Duration::try_from(settings.approval_window)
            .unwrap_or(time::Duration::minutes(30)),
        default_ttl: time::Duration::try_from(settings.ttl).unwrap_or(time::Duration::hours(1)),
        dispatch_rate_per_sec: rate,
        dispatch_burst: rate,
        ..Policy::default()
    }
}

/// A running command service with its manufacturer keys.
#[derive(Clone)]
pub struct CommandService {
    /// The service.
    pub commands: Arc<Commands>,
    /// Trusted manufacturer keys for firmware uploads.
    pub manufacturers: Arc<Vec<VerifyingKey>>,
}

impl std::fmt::Debug for CommandService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandService")
            .field("commands", &self.commands)
            .field("manufacturers", &self.manufacturers.len())
            .finish()
    }
}

/// Whether a proposer may still have a proposal approved: an enabled operator in `access` (no
/// users database: no user is), or for `cert:NAME` (a proposal made with a client certificate)
/// a current, unexpired, unrevoked client certificate NAME of the PKI bound to the operator role.
pub fn proposer_check(
    access: Option<Arc<gridward_access::Access>>,
    pki_dir: std::path::PathBuf,
) -> Arc<dyn gridward_command::ProposerCheck> {
    Arc::new(move |username: &str| {
        if let Some(subject) = username.strip_prefix("cert:") {
            return operator_certificate_is_current(&pki_dir, subject);
        }
        access.as_ref().is_some_and(|a| {
            a.list_users().is_ok_and(|users| {
                users.iter().any(|u| {
                    u.username == username
                        && !u.disabled
                        && u.role == gridward_access::Role::Operator
                })
            })
        })
    })
}

fn operator_certificate_is_current(pki_dir: &std::path::Path, name: &str) -> bool {
    let now = OffsetDateTime::now_utc();
    let Ok(records) = Pki::open(pki_dir, None).and_then(|p| p.list(now)) else {
        return false;
    };
    records.iter().any(|r| {
        r.entry.kind == gridward_pki::CertKind::Client
            && r.entry.name == name
            && r.entry.role.as_deref() == Some("operator")
            && matches!(
                r.status,
                gridward_pki::CertStatus::Valid | gridward_pki::CertStatus::Expiring
            )
    })
}

/// The command service of a configuration for a tool beside the running head-end (the
/// `gridward command` and `gridward firmware` commands): the configuration's existing store,
/// audit log and users database, its command signer and manufacturer keys. What it queues, the
/// running head-end's dispatcher sends.
#[derive(Debug)]
pub struct LocalCommands {
    /// The service.
    pub commands: Commands,
    /// The store it writes to.
    pub store: Arc<gridward_store::SqliteStore>,
    /// Trusted manufacturer keys.
    pub manufacturers: Vec<VerifyingKey>,
}

/// Why [`LocalCommands::open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// Commands are off in the configuration.
    #[error(
        "commands are off in this configuration ([commands] signer = \"off\"); set signer to a command-signer certificate's name"
    )]
    Off,
    /// No database at the configured path.
    #[error("no database at {0} (has `gridward serve` run with this configuration?)")]
    NoStore(std::path::PathBuf),
    /// The store does not open.
    #[error("opening the database: {0}")]
    Store(#[from] gridward_store::StoreError),
    /// The audit log does not open.
    #[error("the audit log: {0}")]
    Audit(#[from] gridward_audit::AuditError),
    /// Signer, manufacturer keys or policy.
    #[error(transparent)]
    Setup(#[from] CommandSetupError),
}

impl LocalCommands {
    /// Opens what `config` names; audit entries go straight to its audit log (a failed append
    /// is reported on stderr: the act already happened).
    ///
    /// # Errors
    ///
    /// [`LocalError`] naming what is missing.
    pub fn open(config: &crate::config::Config) -> Result<Self, LocalError> {
        let settings = config.commands.as_ref().ok_or(LocalError::Off)?;
        if !config.store_path.exists() {
            return Err(LocalError::NoStore(config.store_path.clone()));
        }
        let manufacturers = load_manufacturers(settings)?;
        let signer = load_signer(&config.pki_dir, settings, OffsetDateTime::now_utc())?;
        let store = Arc::new(config.open_existing_store()?);
        let audit = gridward_audit::AuditLog::open(&config.audit.path)?;
        let recorder = move |entry: gridward_audit::NewEntry| {
            if let Err(e) = audit.append(&entry) {
                eprintln!("warning: the audit log did not take the entry: {e}");
            }
        };
        let access = config.api.as_ref().and_then(|api| {
            api.users_path.exists().then(|| {
                gridward_access::Access::open(&api.users_path, gridward_access::Argon2Params::OWASP)
                    .map(Arc::new)
                    .map_err(|e| {
                        eprintln!(
                            "warning: the users database {} does not open ({e}); proposals cannot be checked here",
                            api.users_path.display()
                        )
                    })
                    .ok()
            })?
        });
        let commands = Commands::new(
            Arc::clone(&store) as Arc<dyn gridward_store::CommandStore>,
            Arc::new(signer),
            Arc::new(OffsetDateTime::now_utc),
            Arc::new(recorder),
            proposer_check(access, config.pki_dir.clone()),
            policy(settings),
        )
        .map_err(CommandSetupError::from)?;
        Ok(Self {
            commands,
            store,
            manufacturers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridward_pki::{InitOptions, IssueOptions, RevocationReason, RevokeTarget};

    #[test]
    fn a_certificate_proposer_is_eligible_while_its_operator_certificate_is_current() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&dir, &InitOptions::new("test", now)).unwrap();
        let mut opts = IssueOptions::new("test");
        opts.role = Some("operator".into());
        pki.issue_client("ops-robot", &opts, now).unwrap();
        opts.role = Some("auditor".into());
        pki.issue_client("audit-robot", &opts, now).unwrap();
        let check = proposer_check(None, dir.clone());
        assert!(check.is_enabled_operator("cert:ops-robot"));
        assert!(
            !check.is_enabled_operator("cert:audit-robot"),
            "not an operator"
        );
        assert!(!check.is_enabled_operator("cert:nobody"));
        assert!(
            !check.is_enabled_operator("ops-robot"),
            "a user name is not a certificate"
        );
        pki.revoke(
            &RevokeTarget::Identity {
                kind: Some(gridward_pki::LeafKind::Client),
                name: "ops-robot".into(),
            },
            RevocationReason::KeyCompromise,
            "test",
            now,
        )
        .unwrap();
        assert!(!check.is_enabled_operator("cert:ops-robot"), "revoked");
    }
}
