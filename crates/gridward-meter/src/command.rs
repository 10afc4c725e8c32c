//! Commands from the head-end, executed by the [`Meter`] state machine (sans-IO), and the device
//! state they change: relay, reporting interval, tariff, firmware slots, the last command counter.
//!
//! ```text
//!   on_command(topic, bytes, now)
//!     command::verify (pinned signers, target, counter, time, allowed kinds)
//!        │ refused: Refused ack (id from unverified_id, or all zero); nothing changes
//!        ▼ verified: last counter := the command's (persist before the ack leaves)
//!     execute: relay open/closed, interval, tariff, read_now  ─► Done ack
//!              firmware_update ─► manifest checks ─► Refused ack | Transfer (see crate::firmware)
//!   on_firmware_chunk(bytes, now) ─► ... ─► Done `firmware X.Y.Z (sequence N) confirmed` | Refused
//!   device_record() / device_persisted(gen)   the state to persist; acks wait for it
//! ```
//!
//! **The counter rule.** Every command that passed [`command::verify`] advances the meter's
//! last command counter, whether it then executed or failed (a refused manifest, a tampered or
//! incomplete image, an image that did not confirm): its counter is used, and the same command
//! can never run later. A command refused *by* `verify` (bad signature, unknown signer, other
//! meter, stale counter, expired, kind not allowed, …) changes nothing, not even the counter, so
//! a forgery cannot burn counters. A byte-identical redelivery of an executed command (an MQTT
//! DUP after a lost PUBACK) is refused as `counter_not_fresh` like any replay; its first
//! acknowledgement was queued before it, so the head-end sees the real outcome first.
//!
//! **Persistence before acknowledgement.** A change of device state (counter included) bumps a
//! generation; an acknowledgement is signed only once the generation it follows is persisted
//! ([`Meter::device_record`], [`Meter::device_persisted`]), and the fleet sends the inbound
//! PUBACK only after that, so no crash can lose an acknowledged effect or let a command run twice.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use gridward_core::command::{
    self, AckOutcome, CommandAck, CommandBody, CommandError, CommandId, CommandKind, Refusal,
    TrustedSigner, VerifyContext,
};
use gridward_core::envelope::VerifyingKey;
use gridward_core::firmware::{Chunk, FirmwareError, Installed};
use time::{Duration, OffsetDateTime};

use crate::firmware::{self, ChunkResult, Slot, Slots, Transfer};
use crate::meter::{Meter, whole_second};
use crate::state::DeviceRecord;

/// Tolerated clock skew for a command issued in the future, by default.
pub const DEFAULT_MAX_SKEW_SECS: i64 = 300;

/// How long a firmware transfer may take from its command, by default.
pub const DEFAULT_FIRMWARE_TIMEOUT: Duration = Duration::seconds(60);

/// Vendor id of the simulated meters, by default.
pub const DEFAULT_VENDOR_ID: &str = "gridward-sim";

/// Class id of the simulated meters, by default.
pub const DEFAULT_CLASS_ID: &str = "sim-meter-1";

/// Factory firmware version of the simulated meters, by default.
pub const DEFAULT_FIRMWARE_VERSION: &str = "1.0.0";

/// What a meter trusts and executes. Shared (`Arc`) by every meter of a fleet.
#[derive(Clone)]
pub struct DeviceConfig {
    /// The pinned command signers (several during a rotation).
    pub signers: Arc<[TrustedSigner]>,
    /// The kinds the meter executes.
    pub allowed: Arc<[CommandKind]>,
    /// Tolerated clock skew for `issued_at` in the future, in seconds.
    pub max_skew_secs: i64,
    /// The manufacturer keys firmware manifests must be signed with.
    pub manufacturer_keys: Arc<[VerifyingKey]>,
    /// The firmware in slot A at the factory (vendor and class are the device's for good).
    pub factory_firmware: Installed,
    /// A transfer not complete this long after its command fails as `firmware_incomplete`.
    pub firmware_timeout: Duration,
    /// Whether new images pass the self-test after the reboot (`false`: every install falls back
    /// and is acknowledged `firmware_not_confirmed`, for demonstrations and tests).
    pub image_boots: bool,
}

impl Default for DeviceConfig {
    /// No signer and no manufacturer key (every command is refused until some are pinned), every
    /// kind allowed, [`DEFAULT_MAX_SKEW_SECS`], factory firmware [`DEFAULT_VENDOR_ID`] /
    /// [`DEFAULT_CLASS_ID`] [`DEFAULT_FIRMWARE_VERSION`] sequence 0,
    /// [`DEFAULT_FIRMWARE_TIMEOUT`], images boot.
    fn default() -> Self {
        Self {
            signers: Arc::from(Vec::new()),
            allowed: Arc::from(CommandKind::ALL.to_vec()),
            max_skew_secs: DEFAULT_MAX_SKEW_SECS,
            manufacturer_keys: Arc::from(Vec::new()),
            factory_firmware: Installed {
                vendor_id: DEFAULT_VENDOR_ID.into(),
                class_id: DEFAULT_CLASS_ID.into(),
                version: DEFAULT_FIRMWARE_VERSION.into(),
                sequence: 0,
            },
            firmware_timeout: DEFAULT_FIRMWARE_TIMEOUT,
            image_boots: true,
        }
    }
}

impl fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("signers", &self.signers.len())
            .field("allowed", &self.allowed)
            .field("manufacturer_keys", &self.manufacturer_keys.len())
            .field("factory_firmware", &self.factory_firmware)
            .field("firmware_timeout", &self.firmware_timeout)
            .field("image_boots", &self.image_boots)
            .finish_non_exhaustive()
    }
}

/// The supply relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Relay {
    /// Closed: energy flows.
    #[default]
    Connected,
    /// Open: no energy flows; the meter keeps reporting an unchanged register.
    Disconnected,
}

impl Relay {
    /// `connected` or `disconnected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A firmware transfer in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferState {
    /// The firmware_update command.
    pub command_id: CommandId,
    /// Version being received.
    pub version: String,
    /// Bytes received.
    pub received: u64,
    /// Bytes expected.
    pub size: u64,
    /// When it fails as incomplete.
    pub deadline: OffsetDateTime,
}

/// A snapshot of what commands control on a meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The supply relay.
    pub relay: Relay,
    /// The reporting interval.
    pub interval: Duration,
    /// The active tariff (`None`: never set).
    pub tariff: Option<String>,
    /// The running firmware.
    pub firmware: Installed,
    /// The running slot.
    pub active_slot: Slot,
    /// The counter of the last command verified.
    pub last_command: Option<u64>,
    /// A firmware transfer in progress.
    pub transfer: Option<TransferState>,
}

/// What [`Meter::on_command`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Executed; a `Done` acknowledgement is queued.
    Executed {
        /// The command.
        id: CommandId,
        /// Its kind.
        kind: CommandKind,
        /// The acknowledgement's detail.
        detail: String,
    },
    /// Refused; a `Refused` acknowledgement is queued.
    Refused {
        /// The command (all zero if it did not decode).
        id: CommandId,
        /// The reason in the acknowledgement.
        refusal: Refusal,
        /// What exactly was wrong (for logs).
        detail: String,
        /// Whether the command had verified (and so used its counter).
        verified: bool,
    },
    /// A firmware manifest was accepted; the image is awaited on `meters/{id}/firmware`. The
    /// acknowledgement follows when the transfer ends.
    AwaitingImage {
        /// The command.
        id: CommandId,
        /// Image size in bytes.
        size: u64,
    },
}

impl CommandOutcome {
    /// The refusal, if refused.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Refused { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }
}

/// Why a firmware chunk was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkIgnored {
    /// No transfer is in progress.
    NoTransfer,
    /// The chunk does not decode.
    Malformed,
    /// The chunk names another image than the one being received.
    OtherImage,
}

/// What [`Meter::on_firmware_chunk`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Nothing (see the reason).
    Ignored(ChunkIgnored),
    /// Stored; more is awaited.
    Stored {
        /// Bytes received.
        received: u64,
        /// Bytes expected.
        size: u64,
    },
    /// The image was installed and confirmed; a `Done` acknowledgement is queued.
    Installed(Installed),
    /// The transfer failed; a `Refused` acknowledgement is queued and nothing was installed.
    Refused {
        /// The firmware_update command.
        id: CommandId,
        /// The reason.
        refusal: Refusal,
        /// What exactly was wrong.
        detail: String,
    },
}

/// The device side of a meter's state, owned by the [`Meter`].
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) config: DeviceConfig,
    /// When the relay was opened (whole seconds), if it is open.
    relay_open_since: Option<OffsetDateTime>,
    /// Energy the profile counted while the relay was open, in kWh, subtracted from it.
    withheld_kwh: f64,
    /// The register never reads below this (set at each reconnect, against rounding).
    floor_kwh: f64,
    /// The reporting interval set by a command, in seconds.
    interval_secs: Option<u32>,
    tariff: Option<String>,
    last_command: Option<u64>,
    slots: Slots,
    transfer: Option<Transfer>,
    /// A reading was asked for by `read_now`.
    pub(crate) read_now: bool,
    /// Bumped on every change that must be persisted.
    generation: u64,
    persisted: u64,
    persisting: Option<u64>,
    /// Acknowledgements waiting for their generation to be persisted, then for a counter.
    pub(crate) acks: VecDeque<(u64, CommandAck)>,
}

impl Device {
    pub(crate) fn new(config: DeviceConfig) -> Self {
        Self {
            slots: Slots::factory(config.factory_firmware.clone()),
            config,
            relay_open_since: None,
            withheld_kwh: 0.0,
            floor_kwh: 0.0,
            interval_secs: None,
            tariff: None,
            last_command: None,
            transfer: None,
            read_now: false,
            generation: 0,
            persisted: 0,
            persisting: None,
            acks: VecDeque::new(),
        }
    }

    /// The register at `ts` given the profile's `profile_kwh` function.
    pub(crate) fn register(
        &self,
        ts: OffsetDateTime,
        profile_kwh: impl Fn(OffsetDateTime) -> f64,
    ) -> f64 {
        let at = match self.relay_open_since {
            Some(since) if ts >= since => since,
            _ => ts,
        };
        (profile_kwh(at) - self.withheld_kwh)
            .max(self.floor_kwh)
            .max(0.0)
    }

    pub(crate) fn interval_override(&self) -> Option<Duration> {
        self.interval_secs.map(|s| Duration::seconds(i64::from(s)))
    }

    pub(crate) fn relay(&self) -> Relay {
        if self.relay_open_since.is_some() {
            Relay::Disconnected
        } else {
            Relay::Connected
        }
    }

    pub(crate) fn installed(&self) -> &Installed {
        self.slots.installed(&self.config.factory_firmware)
    }

    pub(crate) fn transfer_deadline(&self) -> Option<OffsetDateTime> {
        self.transfer.as_ref().map(Transfer::deadline)
    }

    /// Whether the front acknowledgement may be signed (its state is persisted).
    pub(crate) fn ack_ready(&self) -> bool {
        self.acks.front().is_some_and(|(g, _)| *g <= self.persisted)
    }

    fn changed(&mut self) {
        self.generation += 1;
    }

    fn queue_ack(
        &mut self,
        meter: &gridward_core::MeterId,
        now: OffsetDateTime,
        id: CommandId,
        outcome: AckOutcome,
    ) {
        let ack = CommandAck {
            meter_id: meter.clone(),
            timestamp: whole_second(now),
            command_id: id,
            outcome,
        };
        self.acks.push_back((self.generation, ack));
    }

    pub(crate) fn record(&self) -> DeviceRecord {
        DeviceRecord {
            last_command: self.last_command,
            relay_open_since: self.relay_open_since.map(OffsetDateTime::unix_timestamp),
            withheld_kwh: self.withheld_kwh,
            floor_kwh: self.floor_kwh,
            interval_secs: self.interval_secs,
            tariff: self.tariff.clone(),
            active_slot: self.slots.active,
            slots: self.slots.images.clone(),
        }
    }

    pub(crate) fn restore(&mut self, r: &DeviceRecord) {
        self.last_command = r.last_command;
        self.relay_open_since = r
            .relay_open_since
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
        self.withheld_kwh = r.withheld_kwh;
        self.floor_kwh = r.floor_kwh;
        self.interval_secs = r.interval_secs;
        self.tariff = r.tariff.clone();
        if r.slots.iter().any(Option::is_some) {
            self.slots = Slots {
                active: r.active_slot,
                images: r.slots.clone(),
            };
        }
    }
}

/// The detail of a `Done` acknowledgement of a firmware install.
pub fn firmware_detail(fw: &Installed) -> String {
    format!(
        "firmware {} (sequence {}) confirmed",
        fw.version, fw.sequence
    )
}

impl Meter {
    /// A command received on `topic` (bytes as they arrived): verified against the pinned
    /// signers, executed if it verified, and answered with a signed acknowledgement queued for
    /// the events topic (signed by [`handle_timeout`](Self::handle_timeout) once the state it
    /// follows is persisted: see [`device_record`](Self::device_record)).
    pub fn on_command(&mut self, topic: &str, bytes: &[u8], now: OffsetDateTime) -> CommandOutcome {
        let cfg = self.device.config.clone();
        let ctx = VerifyContext {
            meter_id: &self.id,
            topic,
            signers: &cfg.signers,
            last_counter: self.device.last_command,
            now,
            allowed: &cfg.allowed,
            max_skew_secs: cfg.max_skew_secs,
        };
        let verified = match command::verify(bytes, &ctx) {
            Ok(v) => v,
            Err(CommandError { reason, detail }) => {
                let id = command::unverified_id(bytes).unwrap_or(CommandId::UNKNOWN);
                self.counts.commands_refused += 1;
                self.device
                    .queue_ack(&self.id, now, id, AckOutcome::Refused(reason));
                return CommandOutcome::Refused {
                    id,
                    refusal: reason,
                    detail,
                    verified: false,
                };
            }
        };
        let cmd = verified.into_command();
        let id = cmd.id;
        let kind = cmd.body.kind();
        // Verified: its counter is used, whatever happens next.
        self.device.last_command = Some(cmd.counter);
        self.device.changed();
        let ts = whole_second(now);
        let detail = match cmd.body {
            CommandBody::Disconnect => {
                if self.device.relay_open_since.is_none() {
                    self.device.relay_open_since = Some(ts);
                }
                "relay open".to_owned()
            }
            CommandBody::Reconnect => {
                if let Some(since) = self.device.relay_open_since.take() {
                    let frozen = (self.metered_kwh(since) - self.device.withheld_kwh)
                        .max(self.device.floor_kwh);
                    let gap = (self.metered_kwh(ts.max(since)) - self.metered_kwh(since)).max(0.0);
                    self.device.withheld_kwh += gap;
                    self.device.floor_kwh = frozen;
                }
                "relay closed".to_owned()
            }
            CommandBody::SetReportingInterval { seconds } => {
                self.device.interval_secs = Some(seconds);
                self.reschedule(now);
                format!("reporting interval {seconds} s")
            }
            CommandBody::SetTariff { tariff } => {
                let d = format!("tariff {tariff}");
                self.device.tariff = Some(tariff);
                d
            }
            CommandBody::ReadNow => {
                self.device.read_now = true;
                "reading sent".to_owned()
            }
            CommandBody::FirmwareUpdate { manifest } => {
                return self.start_firmware(id, &manifest, now);
            }
        };
        self.counts.commands_executed += 1;
        self.device.queue_ack(
            &self.id,
            now,
            id,
            AckOutcome::Done {
                detail: Some(detail.clone()),
            },
        );
        CommandOutcome::Executed { id, kind, detail }
    }

    fn start_firmware(
        &mut self,
        id: CommandId,
        manifest: &[u8],
        now: OffsetDateTime,
    ) -> CommandOutcome {
        let installed = self.device.installed().clone();
        let keys = Arc::clone(&self.device.config.manufacturer_keys);
        match firmware::accept_manifest(manifest, &keys, &installed, now) {
            Err(e) => {
                let refusal = e.refusal();
                self.counts.commands_refused += 1;
                self.device
                    .queue_ack(&self.id, now, id, AckOutcome::Refused(refusal));
                CommandOutcome::Refused {
                    id,
                    refusal,
                    detail: e.to_string(),
                    verified: true,
                }
            }
            Ok(verified) => {
                if let Some(old) = self.device.transfer.take() {
                    // A newer update supersedes one still in transfer.
                    self.counts.commands_refused += 1;
                    self.device.queue_ack(
                        &self.id,
                        now,
                        old.command_id(),
                        AckOutcome::Refused(Refusal::FirmwareIncomplete),
                    );
                }
                let size = verified.manifest().size;
                let deadline = now
                    .checked_add(self.device.config.firmware_timeout)
                    .unwrap_or(now);
                self.device.transfer = Some(Transfer::new(id, verified, deadline));
                CommandOutcome::AwaitingImage { id, size }
            }
        }
    }

    /// A piece of a firmware image received on `meters/{id}/firmware`. When the image is
    /// complete it is checked against the manifest and installed (A/B, with confirmation).
    pub fn on_firmware_chunk(&mut self, bytes: &[u8], now: OffsetDateTime) -> ChunkOutcome {
        self.expire_transfer(now);
        let Some(transfer) = self.device.transfer.as_mut() else {
            return ChunkOutcome::Ignored(ChunkIgnored::NoTransfer);
        };
        let Ok(chunk) = Chunk::decode(bytes) else {
            return ChunkOutcome::Ignored(ChunkIgnored::Malformed);
        };
        if !transfer.wants(&chunk) {
            return ChunkOutcome::Ignored(ChunkIgnored::OtherImage);
        }
        match transfer.store(&chunk) {
            ChunkResult::Stored { received, size } => ChunkOutcome::Stored { received, size },
            ChunkResult::TooLarge(e) => self.fail_transfer(&e, now),
            ChunkResult::Complete => self.install(now),
        }
    }

    fn fail_transfer(&mut self, e: &FirmwareError, now: OffsetDateTime) -> ChunkOutcome {
        let refusal = e.refusal();
        self.refuse_transfer(refusal, e.to_string(), now)
    }

    fn refuse_transfer(
        &mut self,
        refusal: Refusal,
        detail: String,
        now: OffsetDateTime,
    ) -> ChunkOutcome {
        let id = self
            .device
            .transfer
            .take()
            .map_or(CommandId::UNKNOWN, |t| t.command_id());
        self.counts.commands_refused += 1;
        self.device
            .queue_ack(&self.id, now, id, AckOutcome::Refused(refusal));
        ChunkOutcome::Refused {
            id,
            refusal,
            detail,
        }
    }

    fn install(&mut self, now: OffsetDateTime) -> ChunkOutcome {
        let Some(transfer) = self.device.transfer.as_ref() else {
            return ChunkOutcome::Ignored(ChunkIgnored::NoTransfer);
        };
        let installed = self.device.installed().clone();
        if let Err(e) = gridward_core::firmware::check_install(
            transfer.manifest(),
            &installed,
            transfer.image(),
            now,
        ) {
            return self.fail_transfer(&e, now);
        }
        let new = firmware::installed_from(transfer.manifest());
        let boots = self.device.config.image_boots
            && self.config.misbehaviour != Some(crate::meter::Misbehaviour::FirmwareFailsBoot);
        if !self.device.slots.install(new.clone(), boots) {
            return self.refuse_transfer(
                Refusal::FirmwareNotConfirmed,
                format!(
                    "firmware {} did not confirm after the reboot; running {} again",
                    new.version, installed.version
                ),
                now,
            );
        }
        let id = transfer.command_id();
        self.device.transfer = None;
        self.device.changed();
        self.counts.commands_executed += 1;
        self.device.queue_ack(
            &self.id,
            now,
            id,
            AckOutcome::Done {
                detail: Some(firmware_detail(&new)),
            },
        );
        ChunkOutcome::Installed(new)
    }

    /// Fails a transfer whose deadline passed at `now` (`firmware_incomplete`).
    pub(crate) fn expire_transfer(&mut self, now: OffsetDateTime) -> bool {
        let Some(t) = self.device.transfer.as_ref() else {
            return false;
        };
        if now < t.deadline() {
            return false;
        }
        let detail = format!(
            "{} of {} bytes received before the deadline",
            t.received(),
            t.manifest().manifest().size
        );
        self.refuse_transfer(Refusal::FirmwareIncomplete, detail, now);
        true
    }

    /// A snapshot of the device state.
    pub fn device_state(&self) -> DeviceState {
        DeviceState {
            relay: self.device.relay(),
            interval: self.interval(),
            tariff: self.device.tariff.clone(),
            firmware: self.device.installed().clone(),
            active_slot: self.device.slots.active,
            last_command: self.device.last_command,
            transfer: self.device.transfer.as_ref().map(|t| TransferState {
                command_id: t.command_id(),
                version: t.manifest().manifest().version.clone(),
                received: t.received(),
                size: t.manifest().manifest().size,
                deadline: t.deadline(),
            }),
        }
    }

    /// The device state to persist, with its generation, if it changed since the last persisted
    /// one and nothing is being persisted. Persist it durably, then call
    /// [`device_persisted`](Self::device_persisted) (or
    /// [`device_persist_failed`](Self::device_persist_failed)).
    pub fn device_record(&mut self) -> Option<(u64, DeviceRecord)> {
        if self.device.persisting.is_some() || self.device.generation <= self.device.persisted {
            return None;
        }
        self.device.persisting = Some(self.device.generation);
        Some((self.device.generation, self.device.record()))
    }

    /// Records that the device state of generation `generation` is durably persisted: the
    /// acknowledgements that waited for it may now be signed.
    pub fn device_persisted(&mut self, generation: u64) {
        self.device.persisted = self.device.persisted.max(generation);
        if self.device.persisting.is_some_and(|p| p <= generation) {
            self.device.persisting = None;
        }
    }

    /// Records that persisting the device state failed; it will be offered again.
    pub fn device_persist_failed(&mut self) {
        self.device.persisting = None;
    }

    /// Whether the device state has changes not yet persisted.
    pub fn device_dirty(&self) -> bool {
        self.device.generation > self.device.persisted
    }

    /// Restores the device state persisted by an earlier run (counter, relay, interval, tariff,
    /// firmware slots); the next reading is rescheduled to the restored interval from `now`.
    pub fn restore_device(&mut self, record: &DeviceRecord, now: OffsetDateTime) {
        self.device.restore(record);
        if record.interval_secs.is_some() {
            self.reschedule(now);
        }
    }

    /// Acknowledgements queued but not yet signed.
    pub fn pending_acks(&self) -> usize {
        self.device.acks.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use gridward_core::MeterId;
    use gridward_core::command::{Command, sign};
    use gridward_core::document::{Document, Limits};
    use gridward_core::envelope::{SigningKey, verify};
    use gridward_core::firmware::{Manifest, chunks, sign_manifest};
    use time::macros::datetime;

    use super::*;
    use crate::counter::CounterBlock;
    use crate::meter::{MessageKind, MeterConfig, Misbehaviour};
    use crate::profile::LoadProfile;
    use crate::state::CounterStore;

    const T0: OffsetDateTime = datetime!(2025-03-10 06:00 UTC);

    fn ed25519() -> SigningKey {
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap()
    }

    fn p256() -> SigningKey {
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap()
    }

    fn trusted(key: &SigningKey) -> TrustedSigner {
        TrustedSigner {
            key: key.verifying_key().unwrap(),
            not_before: T0 - Duration::days(1),
            not_after: T0 + Duration::days(365),
        }
    }

    /// A meter with a command signer, a manufacturer key and a test clock.
    struct Rig {
        meter: Meter,
        signer: Arc<SigningKey>,
        maker: Arc<SigningKey>,
        meter_key: gridward_core::envelope::VerifyingKey,
        counter: u64,
    }

    fn id() -> MeterId {
        MeterId::new("M-000001").unwrap()
    }

    fn rig_with(adjust: impl FnOnce(&mut MeterConfig)) -> Rig {
        let signer = ed25519();
        let maker = ed25519();
        let meter_key = p256();
        let mut cfg = MeterConfig::new(Duration::seconds(60), LoadProfile::from_seed(7));
        cfg.device.signers = Arc::from(vec![trusted(&signer)]);
        cfg.device.manufacturer_keys = Arc::from(vec![maker.verifying_key().unwrap()]);
        adjust(&mut cfg);
        let vk = meter_key.verifying_key().unwrap();
        let mut meter = Meter::new(id(), meter_key, cfg, CounterBlock::resume(None), T0);
        let mark = meter.counter_reservation().unwrap();
        meter.counters_granted(mark);
        Rig {
            meter,
            signer: Arc::new(signer),
            maker: Arc::new(maker),
            meter_key: vk,
            counter: 0,
        }
    }

    fn rig() -> Rig {
        rig_with(|_| {})
    }

    impl Rig {
        fn command(&mut self, body: CommandBody) -> Command {
            self.counter += 1;
            Command {
                id: CommandId::random(),
                meter_id: id(),
                body,
                counter: self.counter,
                issued_at: T0,
                expires_at: T0 + Duration::days(2),
            }
        }

        fn signed(&mut self, body: CommandBody) -> (CommandId, Vec<u8>) {
            let c = self.command(body);
            (c.id, sign(&self.signer, &c).unwrap())
        }

        fn send(&mut self, bytes: &[u8], now: OffsetDateTime) -> CommandOutcome {
            let topic = self.meter.commands_topic().to_owned();
            self.meter.on_command(&topic, bytes, now)
        }

        /// Persists whatever changed (as the fleet does before the PUBACK).
        fn persist(&mut self) {
            if let Some((g, _)) = self.meter.device_record() {
                self.meter.device_persisted(g);
            }
        }

        /// Persists, signs what is due at `now`, and returns the acknowledgements signed.
        fn acks(&mut self, now: OffsetDateTime) -> Vec<CommandAck> {
            self.persist();
            self.meter.handle_timeout(now).unwrap();
            let msgs: Vec<_> = self
                .meter
                .take_new()
                .filter(|m| matches!(m.kind, MessageKind::CommandAck(_)))
                .cloned()
                .collect();
            msgs.iter()
                .map(|m| {
                    assert_eq!(&*m.topic, "meters/M-000001/events");
                    let doc = verify(&m.envelope, &self.meter_key, &id(), &m.topic)
                        .unwrap()
                        .into_document(&Limits::default())
                        .unwrap();
                    let Document::CommandAck(a) = doc.document().clone() else {
                        panic!("not an ack: {doc:?}")
                    };
                    let expected = match &a.outcome {
                        AckOutcome::Done { .. } => None,
                        AckOutcome::Refused(r) => Some(*r),
                    };
                    assert_eq!(m.kind, MessageKind::CommandAck(expected));
                    a
                })
                .collect()
        }

        /// The single ack signed at `now`.
        fn ack(&mut self, now: OffsetDateTime) -> CommandAck {
            let mut acks = self.acks(now);
            assert_eq!(acks.len(), 1, "{acks:?}");
            acks.remove(0)
        }

        fn manifest(&self, sequence: u64, image: &[u8]) -> Manifest {
            Manifest {
                manifest_version: gridward_core::firmware::MANIFEST_VERSION,
                sequence,
                vendor_id: DEFAULT_VENDOR_ID.into(),
                class_id: DEFAULT_CLASS_ID.into(),
                version: format!("1.{sequence}.0"),
                digest: sha256(image),
                size: image.len() as u64,
                expires_at: None,
                rollback_from: None,
            }
        }
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
        d.as_ref().try_into().unwrap()
    }

    fn done(detail: &str) -> AckOutcome {
        AckOutcome::Done {
            detail: Some(detail.to_owned()),
        }
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn disconnect_freezes_the_register_and_reconnect_resumes_it() {
        let mut r = rig();
        let (cid, bytes) = r.signed(CommandBody::Disconnect);
        let t1 = T0 + Duration::hours(1);
        assert!(matches!(r.send(&bytes, t1), CommandOutcome::Executed { id, .. } if id == cid));
        assert_eq!(r.meter.device_state().relay, Relay::Disconnected);
        let a = r.ack(t1);
        assert_eq!((a.command_id, a.outcome), (cid, done("relay open")));
        assert_eq!(r.meter.device_state().last_command, Some(1));
        // While open, the register does not grow (the meter keeps reporting).
        let profile = r.meter.config.profile.clone();
        let reg = |m: &Meter, t| m.device.register(t, |x| profile.register_kwh(x));
        let frozen = reg(&r.meter, t1);
        assert!(frozen > 0.0);
        assert_eq!(reg(&r.meter, t1 + Duration::hours(5)), frozen);
        assert!(profile.register_kwh(t1 + Duration::hours(5)) > frozen);
        // Reconnected: it grows again from where it stopped.
        let (_, bytes) = r.signed(CommandBody::Reconnect);
        let t2 = t1 + Duration::hours(5);
        r.send(&bytes, t2);
        assert_eq!(r.ack(t2).outcome, done("relay closed"));
        assert_eq!(r.meter.device_state().relay, Relay::Connected);
        assert!(reg(&r.meter, t2) >= frozen);
        assert!(reg(&r.meter, t2) - frozen < 1e-9);
        let later = reg(&r.meter, t2 + Duration::hours(2));
        assert!(later > frozen);
        let expected =
            frozen + profile.register_kwh(t2 + Duration::hours(2)) - profile.register_kwh(t2);
        assert!((later - expected).abs() < 1e-6);
    }

    #[test]
    fn acknowledgement_waits_until_the_state_is_persisted() {
        let mut r = rig();
        let (_, bytes) = r.signed(CommandBody::Disconnect);
        r.send(&bytes, T0);
        assert!(r.meter.device_dirty());
        // Not persisted: handle_timeout signs the reading, not the ack.
        let out = r.meter.handle_timeout(T0).unwrap();
        assert_eq!((out.acks, out.readings), (0, 1));
        assert_eq!(r.meter.pending_acks(), 1);
        let (g, rec) = r.meter.device_record().unwrap();
        assert_eq!(rec.last_command, Some(1));
        assert_eq!(rec.relay_open_since, Some(T0.unix_timestamp()));
        assert!(r.meter.device_record().is_none()); // being persisted
        r.meter.device_persist_failed();
        let (g2, _) = r.meter.device_record().unwrap();
        assert_eq!(g, g2);
        assert_eq!(r.meter.handle_timeout(T0).unwrap().acks, 0);
        r.meter.device_persisted(g2);
        assert!(!r.meter.device_dirty());
        assert_eq!(r.meter.poll_timeout(), OffsetDateTime::UNIX_EPOCH);
        assert_eq!(r.meter.handle_timeout(T0).unwrap().acks, 1);
        assert_eq!(r.meter.pending_acks(), 0);
    }

    #[test]
    fn interval_tariff_and_read_now() {
        let mut r = rig();
        r.meter.handle_timeout(T0).unwrap();
        assert_eq!(r.meter.poll_timeout(), T0 + Duration::seconds(60));
        let (_, bytes) = r.signed(CommandBody::SetReportingInterval { seconds: 900 });
        let t = T0 + Duration::seconds(10);
        r.send(&bytes, t);
        assert_eq!(r.ack(t).outcome, done("reporting interval 900 s"));
        assert_eq!(r.meter.device_state().interval, Duration::seconds(900));
        assert_eq!(r.meter.poll_timeout(), t + Duration::seconds(900));
        // The schedule follows the new interval.
        let p = r.meter.handle_timeout(t + Duration::seconds(900)).unwrap();
        assert_eq!(p.readings, 1);
        assert_eq!(r.meter.poll_timeout(), t + Duration::seconds(1800));

        let (_, bytes) = r.signed(CommandBody::SetTariff {
            tariff: "night".into(),
        });
        r.send(&bytes, t);
        assert_eq!(r.ack(t).outcome, done("tariff night"));
        assert_eq!(r.meter.device_state().tariff.as_deref(), Some("night"));

        // read_now: a reading at once, the schedule unchanged.
        let (_, bytes) = r.signed(CommandBody::ReadNow);
        let t3 = t + Duration::seconds(1000);
        r.send(&bytes, t3);
        r.persist();
        let before = r.meter.poll_timeout();
        assert!(before <= t3 || before == OffsetDateTime::UNIX_EPOCH);
        let p = r.meter.handle_timeout(t3).unwrap();
        assert_eq!((p.readings, p.acks), (1, 1));
        assert_eq!(r.meter.poll_timeout(), t + Duration::seconds(1800));
        assert_eq!(r.meter.counts().commands_executed, 3);
    }

    /// Every refusal `verify` decides: typed reason in a signed ack, no state change, counter
    /// unchanged, and readings keep flowing.
    #[test]
    fn refused_commands_change_nothing() {
        let mut r = rig();
        // One genuine command first, so there is a counter to replay against.
        let (_, genuine) = r.signed(CommandBody::SetTariff {
            tariff: "day".into(),
        });
        r.send(&genuine, T0);
        r.ack(T0);
        let state = r.meter.device_state();
        assert_eq!(state.last_command, Some(1));

        let other_signer = ed25519();
        /// Name, bytes, topic, expected refusal, expected acknowledged id.
        type Case = (&'static str, Vec<u8>, String, Refusal, Option<CommandId>);
        let mut cases: Vec<Case> = Vec::new();
        let topic = r.meter.commands_topic().to_owned();
        {
            let c = r.command(CommandBody::Disconnect);
            let b = sign(&other_signer, &c).unwrap();
            cases.push((
                "other signer",
                b,
                topic.clone(),
                Refusal::UnknownSigner,
                Some(c.id),
            ));
        }
        {
            let c = r.command(CommandBody::Disconnect);
            let mut b = sign(&r.signer, &c).unwrap();
            let last = b.len() - 1;
            b[last] ^= 0x01;
            cases.push((
                "flipped byte",
                b,
                topic.clone(),
                Refusal::BadSignature,
                Some(c.id),
            ));
        }
        {
            let c = r.command(CommandBody::Disconnect);
            let b = sign(&r.signer, &c).unwrap();
            cases.push((
                "other topic",
                b,
                "meters/M-000002/commands".into(),
                Refusal::BadSignature,
                Some(c.id),
            ));
        }
        {
            let mut c = r.command(CommandBody::Disconnect);
            c.meter_id = MeterId::new("M-000002").unwrap();
            let b = sign(&r.signer, &c).unwrap();
            cases.push((
                "wrong meter",
                b,
                "meters/M-000002/commands".into(),
                Refusal::WrongMeter,
                Some(c.id),
            ));
        }
        cases.push((
            "replayed",
            genuine.clone(),
            topic.clone(),
            Refusal::CounterNotFresh,
            command::unverified_id(&genuine),
        ));
        {
            let mut c = r.command(CommandBody::Disconnect);
            c.counter = 1;
            let b = sign(&r.signer, &c).unwrap();
            cases.push((
                "lowered counter",
                b,
                topic.clone(),
                Refusal::CounterNotFresh,
                Some(c.id),
            ));
            c.counter = 0;
            let b = sign(&r.signer, &c).unwrap();
            cases.push((
                "counter zero",
                b,
                topic.clone(),
                Refusal::CounterNotFresh,
                Some(c.id),
            ));
        }
        {
            let mut c = r.command(CommandBody::Disconnect);
            c.issued_at = T0 - Duration::hours(2);
            c.expires_at = T0 - Duration::hours(1);
            let b = sign(&r.signer, &c).unwrap();
            cases.push(("expired", b, topic.clone(), Refusal::Expired, Some(c.id)));
        }
        {
            let mut c = r.command(CommandBody::Disconnect);
            c.issued_at = T0 + Duration::hours(1);
            c.expires_at = T0 + Duration::hours(2);
            let b = sign(&r.signer, &c).unwrap();
            cases.push((
                "issued in the future",
                b,
                topic.clone(),
                Refusal::NotYetValid,
                Some(c.id),
            ));
        }
        {
            // A meter key is not a command signer.
            let c = r.command(CommandBody::Disconnect);
            let b = sign(&p256(), &c).unwrap();
            cases.push((
                "a meter key",
                b,
                topic.clone(),
                Refusal::UnknownSigner,
                Some(c.id),
            ));
        }
        cases.push((
            "garbage",
            b"\xd2\x84not a command".to_vec(),
            topic.clone(),
            Refusal::Malformed,
            Some(CommandId::UNKNOWN),
        ));
        cases.push((
            "empty",
            Vec::new(),
            topic.clone(),
            Refusal::Malformed,
            Some(CommandId::UNKNOWN),
        ));

        let readings_before = r.meter.counts().readings;
        for (i, (name, bytes, topic, refusal, cid)) in cases.into_iter().enumerate() {
            let now = T0 + Duration::seconds(60 * (i as i64 + 1));
            let out = r.meter.on_command(&topic, &bytes, now);
            assert_eq!(out.refusal(), Some(refusal), "{name}: {out:?}");
            assert!(
                matches!(
                    out,
                    CommandOutcome::Refused {
                        verified: false,
                        ..
                    }
                ),
                "{name}"
            );
            assert!(!r.meter.device_dirty(), "{name}: nothing to persist");
            let a = r.ack(now);
            assert_eq!(a.outcome, AckOutcome::Refused(refusal), "{name}");
            if let Some(cid) = cid {
                assert_eq!(a.command_id, cid, "{name}");
            }
            assert_eq!(r.meter.device_state(), state, "{name}: state changed");
        }
        // Readings kept flowing: one per slot.
        assert_eq!(r.meter.counts().readings - readings_before, 12);
        assert_eq!(r.meter.counts().commands_refused, 12);
    }

    #[test]
    fn kinds_not_allowed_are_refused() {
        let mut r = rig_with(|c| {
            c.device.allowed = Arc::from(vec![CommandKind::ReadNow]);
        });
        let (cid, bytes) = r.signed(CommandBody::Disconnect);
        let before = r.meter.device_state();
        assert_eq!(r.send(&bytes, T0).refusal(), Some(Refusal::KindNotAllowed));
        let a = r.ack(T0);
        assert_eq!(
            (a.command_id, a.outcome),
            (cid, AckOutcome::Refused(Refusal::KindNotAllowed))
        );
        assert_eq!(r.meter.device_state(), before);
        // A meter with no pinned signer refuses everything.
        let mut r = rig_with(|c| c.device.signers = Arc::from(Vec::new()));
        let (_, bytes) = r.signed(CommandBody::ReadNow);
        assert_eq!(r.send(&bytes, T0).refusal(), Some(Refusal::UnknownSigner));
    }

    #[test]
    fn a_second_pinned_signer_is_accepted_during_rotation() {
        let new_signer = ed25519();
        let new = trusted(&new_signer);
        let mut r = rig_with(|c| {
            let mut v = c.device.signers.to_vec();
            v.push(new);
            c.device.signers = Arc::from(v);
        });
        let (_, old) = r.signed(CommandBody::Disconnect);
        assert!(matches!(r.send(&old, T0), CommandOutcome::Executed { .. }));
        let c = r.command(CommandBody::Reconnect);
        let b = sign(&new_signer, &c).unwrap();
        assert!(matches!(r.send(&b, T0), CommandOutcome::Executed { .. }));
        assert_eq!(r.meter.device_state().last_command, Some(2));
    }

    /// Sends a firmware_update command for `manifest` (signed by `key`) and the chunks of `img`.
    fn update(
        r: &mut Rig,
        key: &SigningKey,
        manifest: &Manifest,
        img: &[u8],
        now: OffsetDateTime,
    ) -> (CommandId, CommandOutcome, Option<ChunkOutcome>) {
        let signed = sign_manifest(key, manifest).unwrap();
        let (cid, bytes) = r.signed(CommandBody::FirmwareUpdate { manifest: signed });
        let out = r.send(&bytes, now);
        let mut last = None;
        if matches!(out, CommandOutcome::AwaitingImage { .. }) {
            for c in chunks(manifest.digest, img) {
                last = Some(r.meter.on_firmware_chunk(&c.encode(), now));
            }
        }
        (cid, out, last)
    }

    #[test]
    fn firmware_is_installed_confirmed_and_persisted() {
        let mut r = rig();
        let img = image(40_000); // three chunks
        let m = r.manifest(5, &img);
        let maker = Arc::clone(&r.maker);
        let (cid, out, last) = update(&mut r, &maker, &m, &img, T0);
        assert_eq!(
            out,
            CommandOutcome::AwaitingImage {
                id: cid,
                size: 40_000
            }
        );
        let expected = Installed {
            vendor_id: DEFAULT_VENDOR_ID.into(),
            class_id: DEFAULT_CLASS_ID.into(),
            version: "1.5.0".into(),
            sequence: 5,
        };
        assert_eq!(last, Some(ChunkOutcome::Installed(expected.clone())));
        let a = r.ack(T0);
        assert_eq!(
            (a.command_id, a.outcome),
            (cid, done("firmware 1.5.0 (sequence 5) confirmed"))
        );
        let st = r.meter.device_state();
        assert_eq!(
            (st.firmware.clone(), st.active_slot, st.transfer),
            (expected.clone(), Slot::B, None)
        );

        // Survives a restart through the state file.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = CounterStore::open(dir.path()).unwrap();
            let rec = r.meter.device.record();
            store.persist_all([(&id(), 100)], [(&id(), &rec)]).unwrap();
        }
        let store = CounterStore::open(dir.path()).unwrap();
        let mut again = rig();
        again.meter.restore_device(store.device(&id()).unwrap(), T0);
        let st2 = again.meter.device_state();
        assert_eq!(st2.firmware, expected);
        assert_eq!(st2.active_slot, Slot::B);
        assert_eq!(st2.last_command, Some(1));
        // A second update goes to slot A, over sequence 5 only.
        again.counter = 1;
        let img2 = image(100);
        let m2 = again.manifest(6, &img2);
        let maker = Arc::clone(&again.maker);
        let (_, _, last) = update(&mut again, &maker, &m2, &img2, T0);
        assert!(matches!(last, Some(ChunkOutcome::Installed(ref fw)) if fw.sequence == 6));
        assert_eq!(again.meter.device_state().active_slot, Slot::A);
    }

    /// Each firmware refusal: typed reason, firmware unchanged, counter used.
    #[test]
    fn firmware_refusals() {
        let img = image(20_000);
        type Case = (
            &'static str,
            Box<dyn Fn(&mut Rig) -> (Arc<SigningKey>, Manifest, Vec<u8>)>,
            Refusal,
        );
        let cases: Vec<Case> = vec![
            (
                "not a manufacturer key",
                Box::new({
                    let img = img.clone();
                    move |r: &mut Rig| (Arc::clone(&r.signer), r.manifest(5, &img), img.clone())
                }),
                Refusal::FirmwareBadSignature,
            ),
            (
                "older sequence",
                Box::new({
                    let img = img.clone();
                    move |r: &mut Rig| (Arc::clone(&r.maker), r.manifest(0, &img), img.clone())
                }),
                Refusal::FirmwareRollback,
            ),
            (
                "other class",
                Box::new({
                    let img = img.clone();
                    move |r: &mut Rig| {
                        let mut m = r.manifest(5, &img);
                        m.class_id = "other-meter".into();
                        (Arc::clone(&r.maker), m, img.clone())
                    }
                }),
                Refusal::FirmwareWrongClass,
            ),
            (
                "expired manifest",
                Box::new({
                    let img = img.clone();
                    move |r: &mut Rig| {
                        let mut m = r.manifest(5, &img);
                        m.expires_at = Some(T0 - Duration::hours(1));
                        (Arc::clone(&r.maker), m, img.clone())
                    }
                }),
                Refusal::FirmwareExpired,
            ),
            (
                "tampered image",
                Box::new({
                    let img = img.clone();
                    move |r: &mut Rig| {
                        let m = r.manifest(5, &img);
                        let mut bad = img.clone();
                        bad[12_345] ^= 0x40;
                        (Arc::clone(&r.maker), m, bad)
                    }
                }),
                Refusal::FirmwareDigestMismatch,
            ),
            (
                "longer image",
                Box::new({
                    let img = img.clone();
                    move |r: &mut Rig| {
                        let m = r.manifest(5, &img);
                        let mut bad = img.clone();
                        bad.push(0);
                        (Arc::clone(&r.maker), m, bad)
                    }
                }),
                Refusal::FirmwareDigestMismatch,
            ),
        ];
        for (name, make, refusal) in cases {
            let mut r = rig();
            let before = r.meter.device_state();
            let (key, manifest, data) = make(&mut r);
            let (cid, out, last) = update(&mut r, &key, &manifest, &data, T0);
            let got = out.refusal().or(match &last {
                Some(ChunkOutcome::Refused { refusal, .. }) => Some(*refusal),
                _ => None,
            });
            assert_eq!(got, Some(refusal), "{name}: {out:?} {last:?}");
            let a = r.ack(T0);
            assert_eq!(
                (a.command_id, a.outcome),
                (cid, AckOutcome::Refused(refusal)),
                "{name}"
            );
            let after = r.meter.device_state();
            assert_eq!(after.firmware, before.firmware, "{name}");
            assert_eq!(after.active_slot, before.active_slot, "{name}");
            assert_eq!(after.transfer, None, "{name}");
            // Verified, so its counter is used: the same command cannot run later.
            assert_eq!(after.last_command, Some(1), "{name}");
        }
    }

    #[test]
    fn a_truncated_transfer_times_out_as_incomplete() {
        let mut r = rig_with(|c| c.device.firmware_timeout = Duration::seconds(30));
        let img = image(40_000);
        let m = r.manifest(5, &img);
        let signed = sign_manifest(&r.maker, &m).unwrap();
        let (cid, bytes) = r.signed(CommandBody::FirmwareUpdate { manifest: signed });
        r.send(&bytes, T0);
        let parts = chunks(m.digest, &img);
        // The last chunk never comes.
        for c in &parts[..parts.len() - 1] {
            assert!(matches!(
                r.meter
                    .on_firmware_chunk(&c.encode(), T0 + Duration::seconds(5)),
                ChunkOutcome::Stored { .. }
            ));
        }
        // A chunk of another image and junk are ignored.
        let other = Chunk {
            digest: [9; 32],
            offset: 0,
            data: vec![1, 2, 3],
        };
        assert_eq!(
            r.meter.on_firmware_chunk(&other.encode(), T0),
            ChunkOutcome::Ignored(ChunkIgnored::OtherImage)
        );
        assert_eq!(
            r.meter.on_firmware_chunk(b"junk", T0),
            ChunkOutcome::Ignored(ChunkIgnored::Malformed)
        );
        let st = r.meter.device_state();
        assert_eq!(st.transfer.as_ref().map(|t| t.received), Some(32_768));
        assert!(r.acks(T0 + Duration::seconds(29)).is_empty());
        assert_eq!(r.meter.poll_timeout(), T0 + Duration::seconds(30));
        let a = r.ack(T0 + Duration::seconds(30));
        assert_eq!(
            (a.command_id, a.outcome),
            (cid, AckOutcome::Refused(Refusal::FirmwareIncomplete))
        );
        let after = r.meter.device_state();
        assert_eq!((after.transfer, after.firmware.sequence), (None, 0));
        // The last chunk, late, finds no transfer.
        assert_eq!(
            r.meter
                .on_firmware_chunk(&parts[parts.len() - 1].encode(), T0 + Duration::seconds(31)),
            ChunkOutcome::Ignored(ChunkIgnored::NoTransfer)
        );
    }

    #[test]
    fn an_image_that_does_not_boot_falls_back_to_the_old_slot() {
        let mut r = rig_with(|c| c.misbehaviour = Some(Misbehaviour::FirmwareFailsBoot));
        let img = image(1000);
        let m = r.manifest(5, &img);
        let maker = Arc::clone(&r.maker);
        let (cid, _, last) = update(&mut r, &maker, &m, &img, T0);
        assert!(matches!(
            last,
            Some(ChunkOutcome::Refused {
                refusal: Refusal::FirmwareNotConfirmed,
                ..
            })
        ));
        let a = r.ack(T0);
        assert_eq!(
            (a.command_id, a.outcome),
            (cid, AckOutcome::Refused(Refusal::FirmwareNotConfirmed))
        );
        let st = r.meter.device_state();
        assert_eq!(
            (st.firmware.version.as_str(), st.active_slot),
            (DEFAULT_FIRMWARE_VERSION, Slot::A)
        );
    }

    #[test]
    fn a_newer_update_supersedes_one_in_transfer() {
        let mut r = rig();
        let img = image(40_000);
        let m = r.manifest(5, &img);
        let signed = sign_manifest(&r.maker, &m).unwrap();
        let (first, bytes) = r.signed(CommandBody::FirmwareUpdate { manifest: signed });
        r.send(&bytes, T0);
        let m2 = r.manifest(6, &img[..100]);
        let maker = Arc::clone(&r.maker);
        let (second, _, last) = update(&mut r, &maker, &m2, &img[..100], T0);
        assert!(matches!(last, Some(ChunkOutcome::Installed(_))));
        let acks = r.acks(T0);
        assert_eq!(acks.len(), 2);
        assert_eq!(
            (acks[0].command_id, &acks[0].outcome),
            (first, &AckOutcome::Refused(Refusal::FirmwareIncomplete))
        );
        assert_eq!(acks[1].command_id, second);
    }
}
