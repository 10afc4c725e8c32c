//! The ingest pipeline: one meter message in, one verdict out.
//!
//! The checks run in the order of DESIGN.md's ingest path, each refusal becoming a
//! [`SecurityEvent`] with its [`Reason`] and a metric:
//!
//! 1. the envelope's signature, with the key of the sender's certificate (the sender's meter id
//!    comes from the certificate, already bound to the ClientID and topic by the endpoint);
//! 2. freshness: counter strictly greater than the last accepted one, timestamp within the
//!    window (a counter already used goes to the store, which tells a byte-identical resend —
//!    acknowledged as a duplicate — from a replay);
//! 3. the document: parses, agrees with the signed header, matches the topic;
//! 4. the durable write, in the writer's next batch; the verdict waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use gridward_core::MeterId;
use gridward_core::command::{AckOutcome, CommandAck, CommandId};
use gridward_core::document::{Document, Limits};
use gridward_core::envelope::{self, VerifyingKey};
use gridward_core::replay::{FreshnessPolicy, check_freshness};
use gridward_core::security::{Reason, SecurityEvent};
use gridward_store::{Accepted, AcceptedBody, Outcome};
use time::OffsetDateTime;

use crate::metrics::Metrics;
use crate::writer::Writer;

/// A source of the current time, injected so tests control it (the endpoint's type).
pub use gridward_mqtt::Clock;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(OffsetDateTime::now_utc)
}

/// One message as the endpoint hands it over (or as a concentrator relayed it).
#[derive(Debug, Clone)]
pub struct Message {
    /// The meter that signed it: from its certificate when it connected itself, from the relay
    /// item's topic when a concentrator relayed it.
    pub meter_id: MeterId,
    /// The DER SubjectPublicKeyInfo of the sender's certificate. For a relayed envelope: one
    /// of the meter's currently valid certificates (see [`Message::other_keys`]).
    pub cert_spki: Arc<[u8]>,
    /// Further candidate keys of a relayed envelope's meter (a renewal overlap: the one whose
    /// key id the envelope names is used). Empty for a meter that connected itself.
    pub other_keys: Vec<Arc<[u8]>>,
    /// The concentrator that relayed it, if one did.
    pub relayed_by: Option<MeterId>,
    /// The topic it was published to.
    pub topic: String,
    /// The envelope bytes.
    pub payload: Vec<u8>,
    /// The peer address.
    pub source: Option<String>,
    /// When the endpoint received it.
    pub received_at: OffsetDateTime,
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Durably stored: acknowledge.
    Accepted,
    /// A byte-identical resend of a stored message: acknowledge, nothing stored.
    Duplicate,
    /// Refused, with a security event: nothing stored.
    Rejected(Reason),
    /// The store failed: nothing stored and nothing may be acknowledged; the meter resends.
    Unavailable,
}

/// Settings of the checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct PipelineConfig {
    /// The freshness window.
    pub freshness: FreshnessPolicy,
    /// Document limits.
    pub limits: Limits,
}

/// The ingest pipeline. Cheap to share (`Arc`), used concurrently by every connection.
pub struct Pipeline {
    config: PipelineConfig,
    writer: Writer,
    metrics: Arc<Metrics>,
    clock: Clock,
    /// The last counter stored per meter: the fast path of the freshness check. The store's
    /// transaction stays the authority.
    last: Arc<Mutex<HashMap<MeterId, u64>>>,
    keys: Mutex<HashMap<Arc<[u8]>, VerifyingKey>>,
    on_ack: Option<AckHook>,
    on_stored: Option<StoredHook>,
}

/// Called with every message once it is durably stored (readings, events, acknowledgements,
/// concentrator events), with its verified document: the detectors' view of what genuinely
/// arrived. The [`Accepted`] carries no envelope bytes. Must not block.
pub type StoredHook = Arc<dyn Fn(&Accepted, &Document) + Send + Sync>;

/// A meter's acknowledgement of a command, once it is durably stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckNotice {
    /// The acknowledging meter.
    pub meter_id: MeterId,
    /// The command it names.
    pub command_id: CommandId,
    /// What the meter reports.
    pub outcome: AckOutcome,
    /// Whether it settled a command of this meter that awaited it (false: unknown id, another
    /// meter's command, or already final).
    pub matched: bool,
}

/// Called with every stored acknowledgement (commands and campaigns advance on it).
pub type AckHook = Arc<dyn Fn(&AckNotice) + Send + Sync>;

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The last-counter table shared between the pipeline and the writer's commit callback.
pub type LastCounters = Arc<Mutex<HashMap<MeterId, u64>>>;

/// A refusal before the store: reason, detail and the meter concerned.
struct Refusal {
    reason: Reason,
    detail: String,
}

impl Pipeline {
    /// A pipeline writing through `writer`; `last` must be the table the writer's commit
    /// callback updates (see [`Pipeline::last_counters_table`]), preloaded from the store.
    pub fn new(
        config: PipelineConfig,
        writer: Writer,
        metrics: Arc<Metrics>,
        clock: Clock,
        last: LastCounters,
    ) -> Self {
        Self {
            config,
            writer,
            metrics,
            clock,
            last,
            keys: Mutex::new(HashMap::new()),
            on_ack: None,
            on_stored: None,
        }
    }

    /// Calls `hook` with every message once it is stored.
    #[must_use]
    pub fn with_stored_hook(mut self, hook: StoredHook) -> Self {
        self.on_stored = Some(hook);
        self
    }

    /// Calls `hook` with every acknowledgement once it is stored.
    #[must_use]
    pub fn with_ack_hook(mut self, hook: AckHook) -> Self {
        self.on_ack = Some(hook);
        self
    }

    /// A last-counter table preloaded with `counters`, and the commit callback that keeps it
    /// current, for [`Writer::start`](crate::writer::Writer::start).
    pub fn last_counters_table(
        counters: impl IntoIterator<Item = (MeterId, u64)>,
    ) -> (LastCounters, impl Fn(&[(MeterId, u64)]) + Send + 'static) {
        let table: LastCounters = Arc::new(Mutex::new(counters.into_iter().collect()));
        let t = Arc::clone(&table);
        let on_commit = move |advanced: &[(MeterId, u64)]| {
            let mut map = t.lock().unwrap_or_else(PoisonError::into_inner);
            for (meter, counter) in advanced {
                let entry = map.entry(meter.clone()).or_insert(*counter);
                *entry = (*entry).max(*counter);
            }
        };
        (table, on_commit)
    }

    /// The metrics this pipeline updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs every check on `msg`, stores it if it passes, and says what happened.
    pub async fn handle(&self, msg: Message) -> Decision {
        self.metrics.received();
        let accepted = match self.check(&msg) {
            Ok(a) => a,
            Err(refusal) => return self.refuse(&msg, refusal),
        };
        let (accepted, ack, document) = accepted;
        let stored_copy = self.on_stored.as_ref().map(|_| stored_view(&accepted));
        let outcome = self.writer.write(accepted).await;
        let latency = ((self.clock)() - msg.received_at).unsigned_abs();
        match outcome {
            Ok(Outcome::Stored { .. }) => {
                self.metrics.accepted(latency);
                if let (Some(hook), Some(stored)) = (&self.on_stored, &stored_copy) {
                    hook(stored, &document);
                }
                if let Some(ack) = ack {
                    self.acknowledged(&msg, ack, true);
                }
                Decision::Accepted
            }
            Ok(Outcome::StoredUnmatchedAck { .. }) => {
                self.metrics.accepted(latency);
                if let Some(ack) = ack {
                    self.acknowledged(&msg, ack, false);
                }
                Decision::Accepted
            }
            Ok(Outcome::Duplicate) => {
                self.metrics.duplicate(latency);
                Decision::Duplicate
            }
            Ok(Outcome::Replay { last }) => self.refuse(
                &msg,
                Refusal {
                    reason: Reason::Replay,
                    detail: format!("counter already used (last accepted {last})"),
                },
            ),
            Ok(Outcome::RegisterWentBackwards { last_kwh }) => self.refuse(
                &msg,
                Refusal {
                    reason: Reason::RegisterWentBackwards,
                    detail: format!("register below the last stored reading ({last_kwh} kWh)"),
                },
            ),
            Err(e) => {
                self.metrics.unavailable();
                // The writer logs the failed batch once; this is the per-message detail.
                tracing::debug!(meter = %msg.meter_id, error = %e, "not acknowledged: store failed");
                Decision::Unavailable
            }
        }
    }

    /// A stored acknowledgement: a refusal by the meter is a security event (`command_refused`,
    /// with the meter's code), and so is an acknowledgement of a command this head-end is not
    /// waiting for (a command that reached the meter by another path, e.g. a forged one).
    fn acknowledged(&self, msg: &Message, ack: CommandAck, matched: bool) {
        let event = match (&ack.outcome, matched) {
            (AckOutcome::Refused(refusal), true) => Some(format!(
                "meter refused command {}: {}",
                ack.command_id,
                refusal.code()
            )),
            (AckOutcome::Refused(refusal), false) => Some(format!(
                "meter refused command {} that this head-end did not send or no longer awaits: {}",
                ack.command_id,
                refusal.code()
            )),
            (AckOutcome::Done { .. }, false) => Some(format!(
                "meter reports executing command {} that this head-end did not send or no longer awaits",
                ack.command_id
            )),
            (AckOutcome::Done { .. }, true) => None,
        };
        if let Some(detail) = event {
            let mut e = SecurityEvent::new((self.clock)(), Reason::CommandRefused, detail)
                .meter(&msg.meter_id);
            if let Some(source) = &msg.source {
                e = e.source(source);
            }
            self.metrics.rejected(Reason::CommandRefused);
            self.writer.security_event(e);
        }
        if let Some(hook) = &self.on_ack {
            hook(&AckNotice {
                meter_id: ack.meter_id,
                command_id: ack.command_id,
                outcome: ack.outcome,
                matched,
            });
        }
    }

    fn check(&self, msg: &Message) -> Result<(Accepted, Option<CommandAck>, Document), Refusal> {
        let mut verified = self.verify_with(msg, &msg.cert_spki);
        // A relayed envelope of a meter with more than one valid certificate: the one whose key
        // (key id, algorithm) the envelope names.
        for other in &msg.other_keys {
            match &verified {
                Err(Refusal {
                    reason: Reason::KeyMismatch,
                    ..
                }) => verified = self.verify_with(msg, other),
                _ => break,
            }
        }
        let verified = verified?;
        let header = verified.header().clone();
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&msg.meter_id)
            .copied();
        // A used counter may be the meter's resend of a stored message, which is acknowledged
        // whatever its age: the store compares bytes. Only new counters face the time window.
        if last.is_none_or(|l| header.counter > l) {
            check_freshness(
                last,
                header.counter,
                header.timestamp,
                (self.clock)(),
                &self.config.freshness,
            )
            .map_err(|e| Refusal {
                reason: Reason::from(&e),
                detail: e.to_string(),
            })?;
        }
        let document = verified
            .into_document(&self.config.limits)
            .map_err(|e| Refusal {
                reason: Reason::from(&e),
                detail: e.to_string(),
            })?;
        let mut ack = None;
        let body = match (document.document(), topic_kind(&msg.topic)) {
            (Document::Reading(r), Some(TopicKind::Readings)) => AcceptedBody::Reading {
                energy_kwh: r.energy_kwh,
            },
            (Document::Event(e), Some(TopicKind::Events)) => AcceptedBody::Event { kind: e.kind },
            (Document::ConcentratorEvent(e), Some(TopicKind::ConcentratorEvents)) => {
                AcceptedBody::ConcentratorEvent { kind: e.kind }
            }
            (Document::CommandAck(a), Some(TopicKind::Events)) => {
                ack = Some(a.clone());
                AcceptedBody::CommandAck {
                    command_id: a.command_id,
                    refused: match a.outcome {
                        AckOutcome::Done { .. } => None,
                        AckOutcome::Refused(r) => Some(r),
                    },
                }
            }
            _ => {
                return Err(Refusal {
                    reason: Reason::InvalidDocument,
                    detail: format!("document kind does not belong on topic {}", msg.topic),
                });
            }
        };
        Ok((
            Accepted {
                meter_id: msg.meter_id.clone(),
                counter: header.counter,
                taken_at: document.document().timestamp(),
                received_at: msg.received_at,
                body,
                envelope: msg.payload.clone(),
                content_type: header.content_type,
                source: msg.source.clone(),
            },
            ack,
            document.document().clone(),
        ))
    }

    fn verify_with(
        &self,
        msg: &Message,
        spki: &Arc<[u8]>,
    ) -> Result<envelope::VerifiedEnvelope, Refusal> {
        let key = self.key(spki)?;
        envelope::verify(&msg.payload, &key, &msg.meter_id, &msg.topic).map_err(|e| Refusal {
            reason: Reason::from(&e),
            detail: e.to_string(),
        })
    }

    fn key(&self, spki: &Arc<[u8]>) -> Result<VerifyingKey, Refusal> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = keys.get(spki) {
            return Ok(k.clone());
        }
        let key = VerifyingKey::from_spki_der(spki).map_err(|e| Refusal {
            reason: Reason::KeyMismatch,
            detail: format!("certificate key: {e}"),
        })?;
        // Bounded: one entry per distinct certificate key seen; a fleet's worth.
        if keys.len() >= 1_000_000 {
            keys.clear();
        }
        keys.insert(Arc::clone(spki), key.clone());
        Ok(key)
    }

    fn refuse(&self, msg: &Message, refusal: Refusal) -> Decision {
        self.metrics.message_refused(refusal.reason);
        tracing::debug!(
            meter = %msg.meter_id,
            reason = refusal.reason.code(),
            "message refused"
        );
        let detail = match &msg.relayed_by {
            Some(concentrator) => format!(
                "{} (relayed by concentrator {concentrator})",
                refusal.detail
            ),
            None => refusal.detail,
        };
        let mut event =
            SecurityEvent::new((self.clock)(), refusal.reason, detail).meter(&msg.meter_id);
        if let Some(source) = &msg.source {
            event = event.source(source);
        }
        self.writer.security_event(event);
        Decision::Rejected(refusal.reason)
    }
}

/// What the stored hook sees of a message: everything but the envelope bytes (the detectors
/// do not need them, and copying them for every message would cost).
fn stored_view(accepted: &Accepted) -> Accepted {
    Accepted {
        meter_id: accepted.meter_id.clone(),
        counter: accepted.counter,
        taken_at: accepted.taken_at,
        received_at: accepted.received_at,
        body: accepted.body,
        envelope: Vec::new(),
        content_type: accepted.content_type,
        source: accepted.source.clone(),
    }
}

enum TopicKind {
    Readings,
    Events,
    ConcentratorEvents,
}

fn topic_kind(topic: &str) -> Option<TopicKind> {
    let mut parts = topic.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("meters"), Some(_), Some("readings"), None) => Some(TopicKind::Readings),
        (Some("meters"), Some(_), Some("events"), None) => Some(TopicKind::Events),
        (Some("concentrators"), Some(_), Some("events"), None) => {
            Some(TopicKind::ConcentratorEvents)
        }
        _ => None,
    }
}
