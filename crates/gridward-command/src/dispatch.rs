//! [`Dispatcher`]: the task that sends queued commands to reachable meters.
//!
//! It wakes when commands are issued, when the head-end reports a meter reachable
//! ([`Commands::meter_reachable`]), and on every [`Policy::tick`](crate::Policy::tick); every
//! tenth tick (and the first, so commands queued before a restart go out) it also scans the
//! whole queue for reachable meters. On a tick it first sweeps ([`Commands::sweep`]): commands past their expiry become `expired`
//! (queued ones were never sent; sent ones were not acknowledged in time — the store's
//! `expire_commands` settles both as `expired`, the lifecycle's name for "no acknowledgement
//! before expiry"), proposals past their window expire, running campaigns advance.
//!
//! Per meter, commands go out one at a time in counter order (a meter never receives a higher
//! counter before a lower one it still has to execute), each only after the previous one was
//! acknowledged by the meter's PUBACK. Fleet-wide, a [`TokenBucket`] limits publications to
//! [`Policy::dispatch_rate_per_sec`](crate::Policy::dispatch_rate_per_sec), so a mass action
//! cannot storm the fleet.
//!
//! - [`Delivery::Acked`] → `mark_sent`. A `firmware_update` is then followed by its image in
//!   chunks on `meters/{id}/firmware` (at most
//!   [`Policy::max_concurrent_transfers`](crate::Policy::max_concurrent_transfers) at once), each
//!   awaited; a chunk lost makes the command `failed` ("transfer interrupted"), which a campaign
//!   counts as a failure; a meter that answers (e.g. refuses the manifest) stops the transfer.
//! - [`Delivery::Lost`] (or no answer within the delivery timeout) → the command stays queued;
//!   the stored bytes go out again, unchanged, when the meter is reachable again. A command is
//!   never signed twice.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use gridward_audit::{Actor, Outcome};
use gridward_core::MeterId;
use gridward_core::command::{CommandId, CommandKind};
use gridward_core::firmware;
use gridward_store::{CommandStatus, StoreError, StoredCommand};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::args::firmware_digest;
use crate::issue::Commands;
use crate::transport::{Delivery, Transport};

/// Most queued-or-sent commands read per meter at once (the first queued one is sent).
const PER_METER_LIMIT: usize = 256;

/// Most commands read by a full scan for meters with queued commands.
const SCAN_LIMIT: usize = 20_000;

/// A full scan every this many ticks (and at start). Issuing and reachability wake the
/// dispatcher for the meters concerned; the scan only catches what no hint covered (a
/// publication that timed out while the meter stayed connected).
const FULL_SCAN_EVERY: u64 = 10;

/// A token bucket (sans-IO): `rate` tokens a second, at most `burst` saved up.
///
/// [`TokenBucket::reserve`] always grants a token and says how long to wait before using it, so
/// concurrent callers are served in the order they asked and the rate holds over any window.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. A rate or burst of 0 counts as 1.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate_per_sec.max(1)),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at `now`; returns how long the caller must wait before using it
    /// ([`Duration::ZERO`] if one was available).
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        if now > self.last {
            self.last = now;
        }
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The dispatcher's counters, for metrics ([`Commands::dispatch_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Commands signed and queued.
    pub issued: u64,
    /// Command publications handed to the transport (resends included).
    pub sent: u64,
    /// Command publications the meter acknowledged (PUBACK).
    pub acked: u64,
    /// Command publications lost (connection ended, no PUBACK in time, not reachable).
    pub lost: u64,
    /// Publications that had to wait for the rate limit.
    pub rate_limited_waits: u64,
    /// Commands that expired before an acknowledgement.
    pub expired: u64,
    /// Firmware chunks acknowledged by meters.
    pub chunks_sent: u64,
    /// Firmware images transferred completely.
    pub transfers_completed: u64,
    /// Firmware transfers interrupted (the command failed).
    pub transfers_failed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    lost: AtomicU64,
    rate_limited_waits: AtomicU64,
    pub(crate) expired: AtomicU64,
    chunks_sent: AtomicU64,
    transfers_completed: AtomicU64,
    transfers_failed: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> DispatchStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DispatchStats {
            issued: 0,
            sent: l(&self.sent),
            acked: l(&self.acked),
            lost: l(&self.lost),
            rate_limited_waits: l(&self.rate_limited_waits),
            expired: l(&self.expired),
            chunks_sent: l(&self.chunks_sent),
            transfers_completed: l(&self.transfers_completed),
            transfers_failed: l(&self.transfers_failed),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// What one [`Commands::sweep`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Commands that became `expired`.
    pub expired_commands: Vec<CommandId>,
    /// Proposals that became `expired`.
    pub expired_proposals: Vec<i64>,
}

impl Commands {
    /// Expires commands and proposals past their time (audited as `command.expire` and
    /// `proposal.expire`), and advances every running campaign. The dispatcher calls it on every
    /// tick.
    ///
    /// # Errors
    ///
    /// The store's first error (campaign errors are logged, not returned).
    pub fn sweep(&self) -> Result<Swept, StoreError> {
        let now = (self.clock)();
        let expired_commands = self.store.expire_commands(now)?;
        for id in &expired_commands {
            bump(&self.counters.expired);
            let cmd = self.store.command(id)?;
            let target = cmd.as_ref().map(|c| c.meter_id.to_string());
            let detail = match &cmd {
                Some(c) => format!(
                    "command {id} {} counter {} not acknowledged before {} (was {})",
                    c.kind,
                    c.counter,
                    c.expires_at,
                    if c.attempts == 0 {
                        "never sent: meter not reachable"
                    } else {
                        "sent"
                    }
                ),
                None => format!("command {id} not acknowledged before its expiry"),
            };
            self.record(
                Actor::System,
                "command.expire",
                target.unwrap_or_default(),
                Outcome::Failure,
                detail,
            );
        }
        let expired_proposals = self.expire_due()?;
        if let Err(e) = self.advance_campaigns() {
            tracing::warn!(error = %e, "could not advance campaigns");
        }
        Ok(Swept {
            expired_commands,
            expired_proposals,
        })
    }

    /// Settles `cmd` as failed with `detail` (if it is not final yet), audits it and lets its
    /// campaign count it.
    pub(crate) fn fail_command(&self, cmd: &StoredCommand, detail: &str) {
        match self
            .store
            .settle_command(&cmd.id, CommandStatus::Failed, (self.clock)(), detail)
        {
            Ok(true) => {
                self.record(
                    Actor::System,
                    "command.fail",
                    cmd.meter_id.as_str(),
                    Outcome::Failure,
                    format!(
                        "command {} {} counter {}: {detail}",
                        cmd.id, cmd.kind, cmd.counter
                    ),
                );
                if let Some(c) = cmd.campaign_id
                    && let Err(e) = self.advance_campaign(c)
                {
                    tracing::warn!(campaign = c, error = %e, "could not advance campaign");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(command = %cmd.id, error = %e, "could not settle command"),
        }
    }
}

/// Sends queued commands (see the [module documentation](self)). Start it with
/// [`Dispatcher::run`] on the head-end's runtime.
pub struct Dispatcher {
    commands: Arc<Commands>,
    transport: Arc<dyn Transport>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// An image's digest and its encoded chunks.
type CachedImage = ([u8; 32], Arc<Vec<Bytes>>);

struct Shared {
    commands: Arc<Commands>,
    transport: Arc<dyn Transport>,
    bucket: Mutex<TokenBucket>,
    transfers: Semaphore,
    /// The chunks of the image sent last (a campaign sends one image to many meters).
    image: Mutex<Option<CachedImage>>,
}

impl Dispatcher {
    /// A dispatcher for `commands` over `transport`.
    pub fn new(commands: Arc<Commands>, transport: Arc<dyn Transport>) -> Self {
        Self {
            commands,
            transport,
        }
    }

    /// Runs until `shutdown` is cancelled; then stops the per-meter sends in progress (their
    /// commands stay queued and go out, byte-identical, after the next start).
    pub async fn run(self, shutdown: CancellationToken) {
        let policy = self.commands.policy.clone();
        let shared = Arc::new(Shared {
            commands: Arc::clone(&self.commands),
            transport: Arc::clone(&self.transport),
            bucket: Mutex::new(TokenBucket::new(
                policy.dispatch_rate_per_sec,
                policy.dispatch_burst,
                Instant::now(),
            )),
            transfers: Semaphore::new(policy.max_concurrent_transfers),
            image: Mutex::new(None),
        });
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut active: HashMap<tokio::task::Id, MeterId> = HashMap::new();
        let mut busy: HashSet<MeterId> = HashSet::new();
        let mut ticks: u64 = 0;
        let mut again: HashSet<MeterId> = HashSet::new();
        let mut tick = tokio::time::interval(policy.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut candidates: HashSet<MeterId> = HashSet::new();
            let full = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => e.id(),
                    };
                    if let Some(m) = active.remove(&id) {
                        busy.remove(&m);
                        if again.remove(&m) {
                            candidates.insert(m);
                        }
                    }
                    false
                }
                () = self.commands.wake.notify.notified() => false,
                _ = tick.tick() => true,
            };
            candidates.extend(self.commands.wake.take_hints());
            if full {
                if let Err(e) = self.commands.sweep() {
                    tracing::warn!(error = %e, "command sweep failed");
                }
                ticks += 1;
            }
            if full && ticks % FULL_SCAN_EVERY == 1 {
                match shared.queued_meters() {
                    Ok(m) => candidates.extend(m),
                    Err(e) => tracing::warn!(error = %e, "could not read queued commands"),
                }
            }
            for meter in candidates {
                if busy.contains(&meter) {
                    again.insert(meter);
                    continue;
                }
                if !self.transport.is_reachable(&meter) {
                    continue;
                }
                let handle = tasks.spawn(Arc::clone(&shared).drain(meter.clone()));
                busy.insert(meter.clone());
                active.insert(handle.id(), meter);
            }
        }
        tasks.shutdown().await;
    }
}

impl Shared {
    /// Meters with at least one queued, unexpired command.
    fn queued_meters(&self) -> Result<HashSet<MeterId>, StoreError> {
        let now = (self.commands.clock)();
        Ok(self
            .commands
            .store
            .dispatchable(None, now, SCAN_LIMIT)?
            .into_iter()
            .filter(|c| c.status == CommandStatus::Queued)
            .map(|c| c.meter_id)
            .collect())
    }

    /// Sends `meter`'s queued commands one after the other while it stays reachable.
    async fn drain(self: Arc<Self>, meter: MeterId) {
        let c = &self.commands;
        loop {
            if !self.transport.is_reachable(&meter) {
                return;
            }
            let now = (c.clock)();
            let next = match c.store.dispatchable(Some(&meter), now, PER_METER_LIMIT) {
                Ok(cmds) => cmds
                    .into_iter()
                    .find(|cmd| cmd.status == CommandStatus::Queued && cmd.meter_id == meter),
                Err(e) => {
                    tracing::warn!(meter = %meter, error = %e, "could not read queued commands");
                    return;
                }
            };
            let Some(cmd) = next else { return };
            let wait = self
                .bucket
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .reserve(Instant::now());
            if !wait.is_zero() {
                bump(&c.counters.rate_limited_waits);
                tokio::time::sleep(wait).await;
            }
            if cmd.expires_at <= (c.clock)() {
                // Expired while waiting: never sent; the next sweep settles it.
                continue;
            }
            // The stored bytes, exactly: a resend is byte-identical.
            let payload = Bytes::from(cmd.envelope.clone());
            match self.send(&meter, meter.commands_topic(), payload).await {
                Delivery::Acked => {
                    bump(&c.counters.acked);
                    if let Err(e) = c.store.mark_sent(&cmd.id, (c.clock)()) {
                        tracing::warn!(command = %cmd.id, error = %e, "could not mark command sent");
                        return;
                    }
                    if cmd.kind == CommandKind::FirmwareUpdate && !self.transfer(&meter, &cmd).await
                    {
                        return;
                    }
                }
                Delivery::Lost => {
                    bump(&c.counters.lost);
                    return;
                }
            }
        }
    }

    /// One publication, awaited: the meter's PUBACK, or lost.
    async fn send(&self, meter: &MeterId, topic: String, payload: Bytes) -> Delivery {
        let c = &self.commands;
        let Ok(rx) = self.transport.send(meter, topic, payload) else {
            return Delivery::Lost;
        };
        bump(&c.counters.sent);
        match tokio::time::timeout(c.policy.delivery_timeout, rx).await {
            Ok(Ok(d)) => d,
            Ok(Err(_)) | Err(_) => Delivery::Lost,
        }
    }

    /// Sends the image of firmware command `cmd`; `false` if the meter became unreachable.
    async fn transfer(&self, meter: &MeterId, cmd: &StoredCommand) -> bool {
        let c = &self.commands;
        let Ok(_permit) = self.transfers.acquire().await else {
            return false;
        };
        let chunks = match self.image_chunks(&cmd.args_json) {
            Ok(chunks) => chunks,
            Err(detail) => {
                c.fail_command(cmd, &detail);
                return true;
            }
        };
        for chunk in chunks.iter() {
            match c.store.command(&cmd.id) {
                // The meter answered already (e.g. refused the manifest before downloading).
                Ok(Some(now)) if now.status.is_final() => return true,
                Ok(_) => {}
                Err(e) => tracing::warn!(command = %cmd.id, error = %e, "could not read command"),
            }
            match self
                .send(meter, meter.firmware_topic(), chunk.clone())
                .await
            {
                Delivery::Acked => bump(&c.counters.chunks_sent),
                Delivery::Lost => {
                    bump(&c.counters.transfers_failed);
                    c.fail_command(cmd, "transfer interrupted");
                    return false;
                }
            }
        }
        bump(&c.counters.transfers_completed);
        true
    }

    /// The encoded chunks of the image a firmware command names.
    fn image_chunks(&self, args_json: &str) -> Result<Arc<Vec<Bytes>>, String> {
        let digest = firmware_digest(args_json)
            .ok_or_else(|| "firmware command names no image digest".to_owned())?;
        if let Some((d, chunks)) = &*self.image.lock().unwrap_or_else(PoisonError::into_inner)
            && *d == digest
        {
            return Ok(Arc::clone(chunks));
        }
        let store = &self.commands.store;
        let missing = || format!("firmware image {} is not stored", hex::encode(digest));
        let fw = store
            .firmwares()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|f| f.digest == digest)
            .ok_or_else(missing)?;
        let image = store
            .firmware_image(fw.id)
            .map_err(|e| e.to_string())?
            .ok_or_else(missing)?;
        let chunks: Arc<Vec<Bytes>> = Arc::new(
            firmware::chunks(digest, &image)
                .iter()
                .map(|ch| Bytes::from(ch.encode()))
                .collect(),
        );
        *self.image.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((digest, Arc::clone(&chunks)));
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_grants_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(50, 5, t0);
        for _ in 0..5 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
        }
        // The sixth waits one token's time (20 ms), the seventh two.
        let w6 = b.reserve(t0);
        let w7 = b.reserve(t0);
        assert!((w6.as_secs_f64() - 0.02).abs() < 1e-9, "{w6:?}");
        assert!((w7.as_secs_f64() - 0.04).abs() < 1e-9, "{w7:?}");
    }

    #[test]
    fn bucket_refills_but_not_beyond_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert_eq!(b.reserve(t0), Duration::ZERO);
        assert_eq!(b.reserve(t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert_eq!(b.reserve(later), Duration::ZERO);
        assert!(b.reserve(later) > Duration::ZERO);
    }

    #[test]
    fn bucket_zero_rate_counts_as_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 0, t0);
        assert_eq!(b.reserve(t0), Duration::ZERO);
        assert_eq!(b.reserve(t0), Duration::from_secs(1));
    }
}
