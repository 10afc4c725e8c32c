//! Data concentrators at the head-end: a relay batch is split into its meters' envelopes, and
//! each goes through the same pipeline as if its meter had sent it itself.
//!
//! What a concentrator may do, and nothing more:
//! - relay envelopes on `meters/{id}/readings|events` for the meters registered behind it (the
//!   topology in the store, read for every batch, so an operator's change holds at once);
//!   anything else is `relay_not_authorized`, with the concentrator as the event's meter;
//! - each envelope is verified with its meter's key from the PKI (a currently valid, not revoked
//!   certificate of that meter; both during a renewal overlap), its topic as AAD, its meter's
//!   counter and the document rules: an altered envelope is `bad_signature` like any other;
//! - send its own events, signed with its own key, on `concentrators/{id}/events`.
//!
//! The PUBACK of a batch waits for every envelope in it: stored, duplicate or refused (each
//! refusal is its own security event); a store failure leaves the whole batch unacknowledged,
//! and the concentrator resends it (what was stored comes back as duplicates).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use gridward_core::MeterId;
use gridward_core::relay::{self, MeterTopic};
use gridward_core::security::{Reason, SecurityEvent};
use gridward_mqtt::{InboundPublish, Verdict};
use gridward_pki::{MeterKeys, Pki};
use gridward_store::AlarmStore;

use crate::pipeline::{Decision, Message, Pipeline};
use crate::writer::Writer;

/// A meter key the directory did not know is looked up in the PKI again at most this often
/// (a meter issued after the head-end started).
const MISS_REFRESH: Duration = Duration::from_secs(5);

/// The meters' keys for relayed envelopes, from the PKI inventory.
#[derive(Debug)]
pub struct KeyDirectory {
    pki_dir: std::path::PathBuf,
    keys: RwLock<Arc<MeterKeys>>,
    last_refresh: Mutex<Instant>,
}

impl KeyDirectory {
    /// Reads the directory of `pki_dir` now.
    ///
    /// # Errors
    ///
    /// The PKI could not be read.
    pub fn load(pki_dir: &std::path::Path) -> Result<Self, gridward_pki::PkiError> {
        let keys = Pki::open(pki_dir, None)?.meter_keys(time::OffsetDateTime::now_utc())?;
        Ok(Self {
            pki_dir: pki_dir.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
            last_refresh: Mutex::new(Instant::now()),
        })
    }

    /// Re-reads the PKI (on reload: renewals and revocations take effect).
    ///
    /// # Errors
    ///
    /// The PKI could not be read; the current directory stays.
    pub fn refresh(&self) -> Result<(), gridward_pki::PkiError> {
        let keys = Pki::open(&self.pki_dir, None)?.meter_keys(time::OffsetDateTime::now_utc())?;
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        *self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        Ok(())
    }

    /// The SPKIs of `meter`'s valid certificates (refreshing once if it has none).
    fn spkis(&self, meter: &MeterId) -> Vec<Arc<[u8]>> {
        let lookup = |keys: &MeterKeys| -> Vec<Arc<[u8]>> {
            keys.get(meter)
                .iter()
                .map(|k| Arc::clone(&k.spki_der))
                .collect()
        };
        let found = lookup(&self.keys.read().unwrap_or_else(PoisonError::into_inner));
        if !found.is_empty() {
            return found;
        }
        let due = self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
            >= MISS_REFRESH;
        if due {
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, "meter keys not re-read");
            }
            return lookup(&self.keys.read().unwrap_or_else(PoisonError::into_inner));
        }
        found
    }
}

/// What a concentrator's publish needs.
#[derive(Clone)]
pub struct Relays {
    /// The ingest pipeline.
    pub pipeline: Arc<Pipeline>,
    /// The topology.
    pub topology: Arc<dyn AlarmStore>,
    /// The meters' keys.
    pub keys: Arc<KeyDirectory>,
    /// For the relay's own refusals.
    pub writer: Writer,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relays").finish_non_exhaustive()
    }
}

impl Relays {
    /// One PUBLISH of a concentrator: a relay batch or its own event.
    pub async fn handle(&self, msg: InboundPublish) -> Verdict {
        let concentrator = msg.meter_id.clone();
        if msg.topic == relay::concentrator_events_topic(&concentrator) {
            let message = Message {
                meter_id: concentrator,
                cert_spki: msg.cert_spki,
                other_keys: Vec::new(),
                relayed_by: None,
                topic: msg.topic,
                payload: msg.payload.to_vec(),
                source: Some(msg.source.to_string()),
                received_at: msg.received_at,
            };
            return verdict(self.pipeline.handle(message).await);
        }
        let items = match relay::decode_batch(&msg.payload) {
            Ok(items) => items,
            Err(e) => {
                self.refuse(&msg, Reason::MalformedEnvelope, format!("relay batch: {e}"));
                return Verdict::Rejected(Reason::MalformedEnvelope);
            }
        };
        let registered: HashSet<MeterId> = {
            let store = Arc::clone(&self.topology);
            let c = concentrator.clone();
            match tokio::task::spawn_blocking(move || store.concentrator_meters(&c)).await {
                Ok(Ok(meters)) => meters.into_iter().collect(),
                Ok(Err(e)) => {
                    tracing::warn!(%concentrator, error = %e, "topology not read: batch not acknowledged");
                    return Verdict::Unavailable;
                }
                Err(_) => return Verdict::Unavailable,
            }
        };
        let mut pending: Vec<Pin<Box<dyn Future<Output = Decision> + Send>>> = Vec::new();
        for item in items {
            let meter = match relay::meter_topic(&item.topic) {
                Some((meter, MeterTopic::Readings | MeterTopic::Events)) => meter,
                None => {
                    self.refuse(
                        &msg,
                        Reason::RelayNotAuthorized,
                        format!(
                            "concentrator {concentrator} relayed on {:?}, not a meter's readings or events topic",
                            item.topic
                        ),
                    );
                    continue;
                }
            };
            if !registered.contains(&meter) {
                self.refuse(
                    &msg,
                    Reason::RelayNotAuthorized,
                    format!(
                        "concentrator {concentrator} relayed for meter {meter}, which is not registered behind it"
                    ),
                );
                continue;
            }
            let mut spkis = self.keys.spkis(&meter).into_iter();
            let Some(first) = spkis.next() else {
                let e = SecurityEvent::new(
                    msg.received_at,
                    Reason::CertificateUntrusted,
                    format!(
                        "meter {meter} has no valid certificate in the PKI (relayed by concentrator {concentrator})"
                    ),
                )
                .meter(&meter)
                .source(msg.source);
                self.pipeline
                    .metrics()
                    .message_refused(Reason::CertificateUntrusted);
                self.writer.security_event(e);
                continue;
            };
            let message = Message {
                meter_id: meter,
                cert_spki: first,
                other_keys: spkis.collect(),
                relayed_by: Some(concentrator.clone()),
                topic: item.topic,
                payload: item.envelope,
                source: Some(msg.source.to_string()),
                received_at: msg.received_at,
            };
            let pipeline = Arc::clone(&self.pipeline);
            pending.push(Box::pin(async move { pipeline.handle(message).await }));
        }
        // Polled in order first, so the envelopes enter the writer's queue in batch order (one
        // meter's counters stay in order), then together.
        let decisions = join_in_order(pending).await;
        if decisions.contains(&Decision::Unavailable) {
            Verdict::Unavailable
        } else {
            Verdict::Accepted
        }
    }

    fn refuse(&self, msg: &InboundPublish, reason: Reason, detail: String) {
        self.pipeline.metrics().message_refused(reason);
        let event = SecurityEvent::new(msg.received_at, reason, detail)
            .meter(&msg.meter_id)
            .source(msg.source);
        self.writer.security_event(event);
    }
}

fn verdict(decision: Decision) -> Verdict {
    match decision {
        Decision::Accepted => Verdict::Accepted,
        Decision::Duplicate => Verdict::Duplicate,
        Decision::Rejected(reason) => Verdict::Rejected(reason),
        Decision::Unavailable => Verdict::Unavailable,
    }
}

/// Runs the futures to completion, polling them in order each time: the first poll of each
/// happens in vector order.
async fn join_in_order(
    mut futures: Vec<Pin<Box<dyn Future<Output = Decision> + Send>>>,
) -> Vec<Decision> {
    let mut results: Vec<Option<Decision>> = vec![None; futures.len()];
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, result) in futures.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(d) => *result = Some(d),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    results.into_iter().flatten().collect()
}
