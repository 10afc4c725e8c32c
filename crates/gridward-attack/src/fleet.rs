//! The genuine fleet: meters that keep sending real readings from 127.0.0.1 while every attack
//! runs, so each scenario can show that the defence did not stop them; and [`Victims`], the
//! attack meters (`x-…`) that the `commands` and `firmware` scenarios deliver forged commands
//! and images to.

use std::time::Duration;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::envelope::VerifyingKey;
use gridward_hes::pipeline::system_clock;
use gridward_meter::command::DeviceState;
use gridward_meter::fleet::{Fleet, FleetConfig, FleetReport, MeterSpec};
use gridward_meter::identity::{Trust, list_meters, load_many};
use gridward_meter::stats::StatsSnapshot;
use gridward_pki::tls::TlsOptions;

use crate::AttackError;
use crate::ctx::Creds;
use crate::target::{FLEET_PREFIX, Target};

/// A reading every this often from each genuine meter.
const INTERVAL_MS: i64 = 200;

/// Genuine meters sending readings in the background.
#[derive(Debug)]
pub struct GenuineFleet {
    fleet: Fleet,
    meters: usize,
}

impl GenuineFleet {
    /// Starts the meters `g000001..` found in the target's PKI (at most `max`), sending a
    /// reading every 200 ms each, and waits until all are connected (at most 30 s).
    pub async fn start(
        target: &Target,
        state_dir: &std::path::Path,
        max: usize,
    ) -> Result<Self, AttackError> {
        let mut ids: Vec<MeterId> = list_meters(&target.pki_dir, FLEET_PREFIX)
            .map_err(|e| AttackError::Setup(format!("listing the fleet's meters: {e}")))?;
        ids.truncate(max);
        if ids.is_empty() {
            return Err(AttackError::Setup(format!(
                "no genuine meters ({FLEET_PREFIX}000001, ...) in {}: issue some with \
                 `gridward pki issue meter --dir {} --count 20 --prefix {FLEET_PREFIX}`",
                target.pki_dir.display(),
                target.pki_dir.display()
            )));
        }
        let trust = Trust::load(&target.pki_dir).map_err(|e| AttackError::Setup(e.to_string()))?;
        let identities = load_many(&target.pki_dir, &ids, &trust, &TlsOptions::new(), &|_| {})
            .map_err(|e| AttackError::Setup(e.to_string()))?;
        let mut config =
            FleetConfig::new("127.0.0.1", target.mqtt.port(), state_dir, system_clock());
        config.server_name = target.server_name.clone();
        config.interval = time::Duration::milliseconds(INTERVAL_MS);
        config.connect_rate = 500.0;
        config.backoff_cap = Duration::from_secs(2);
        let meters = identities.len();
        let fleet = Fleet::start(
            identities.into_iter().map(MeterSpec::from).collect(),
            config,
        )
        .await
        .map_err(|e| AttackError::Setup(format!("starting the genuine fleet: {e}")))?;
        let this = Self { fleet, meters };
        for _ in 0..300 {
            if this.snapshot().connected as usize >= meters {
                return Ok(this);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(AttackError::Setup(format!(
            "only {} of {meters} genuine meters connected within 30 s",
            this.snapshot().connected
        )))
    }

    /// How many genuine meters.
    pub fn meters(&self) -> usize {
        self.meters
    }

    /// The fleet's counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.fleet.stats().snapshot()
    }

    /// Acknowledged genuine readings per second over the next `window`.
    pub async fn rate_over(&self, window: Duration) -> f64 {
        let before = self.snapshot().acked;
        let started = std::time::Instant::now();
        tokio::time::sleep(window).await;
        let after = self.snapshot().acked;
        (after - before) as f64 / started.elapsed().as_secs_f64().max(1e-3)
    }

    /// Stops the fleet, waiting up to `drain` for outstanding acknowledgements.
    pub async fn stop(self, drain: Duration) -> FleetReport {
        self.fleet.stop(drain).await
    }
}

/// How long a victim meter waits for the rest of a firmware image after its command.
pub const VICTIM_FIRMWARE_TIMEOUT: time::Duration = time::Duration::seconds(3);

/// Attack meters of the target's PKI run as simulated meters that trust what a deployed meter
/// trusts: the command signers the PKI lists now (`Trust::load_at`, as `gridward meter run`
/// pins them) and the manufacturer key given. They connect from 127.0.0.1 like the genuine
/// fleet and send a reading every second; what the harness delivers to them
/// ([`Victims::inject_command`], [`Victims::inject_chunk`]) arrives as from a compromised
/// broker, and they answer with signed acknowledgements to the head-end, as for any command.
/// A firmware transfer not complete [`VICTIM_FIRMWARE_TIMEOUT`] after its command fails.
#[derive(Debug)]
pub struct Victims {
    fleet: Fleet,
}

impl Victims {
    /// Starts `meters` (issued in the target's PKI), trusting `manufacturer` for firmware, and
    /// waits until all are connected (at most 30 s). Refuses to start if the PKI lists no
    /// command signer: the head-end's commands would be off.
    pub async fn start(
        target: &Target,
        state_dir: &std::path::Path,
        meters: &[Creds],
        manufacturer: Option<VerifyingKey>,
    ) -> Result<Self, AttackError> {
        let setup = |e: &dyn std::fmt::Display| AttackError::Setup(format!("victim meters: {e}"));
        let trust = Trust::load_at(&target.pki_dir, time::OffsetDateTime::now_utc())
            .map_err(|e| setup(&e))?;
        if trust.command_signers().is_empty() {
            return Err(AttackError::Setup(format!(
                "the PKI {} lists no command signer, so the head-end's commands are off: issue \
                 one with `gridward pki issue command-signer --dir {} headend`",
                target.pki_dir.display(),
                target.pki_dir.display()
            )));
        }
        let ids = meters
            .iter()
            .map(|c| MeterId::new(&c.id))
            .collect::<Result<Vec<_>, _>>()?;
        let identities = load_many(&target.pki_dir, &ids, &trust, &TlsOptions::new(), &|_| {})
            .map_err(|e| setup(&e))?;
        let mut config =
            FleetConfig::new("127.0.0.1", target.mqtt.port(), state_dir, system_clock());
        config.server_name = target.server_name.clone();
        config.interval = time::Duration::seconds(1);
        config.backoff_cap = Duration::from_secs(2);
        config.command_signers = trust.command_signers().to_vec();
        config.manufacturer_keys = manufacturer.into_iter().collect();
        config.firmware_timeout = VICTIM_FIRMWARE_TIMEOUT;
        let n = identities.len();
        let fleet = Fleet::start(
            identities.into_iter().map(MeterSpec::from).collect(),
            config,
        )
        .await
        .map_err(|e| setup(&e))?;
        for _ in 0..300 {
            if fleet.stats().snapshot().connected as usize >= n {
                return Ok(Self { fleet });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(AttackError::Setup(format!(
            "only {} of {n} victim meters connected within 30 s",
            fleet.stats().snapshot().connected
        )))
    }

    /// Hands `bytes` to `meter` as if they had arrived on `topic` (its command subscription,
    /// or another meter's topic a compromised broker routes to it); `false` if it is not one
    /// of these meters or no longer runs.
    pub fn inject_command(&self, meter: &str, topic: &str, bytes: Vec<u8>) -> bool {
        MeterId::new(meter).is_ok_and(|m| self.fleet.inject_command(&m, topic, Bytes::from(bytes)))
    }

    /// Hands `bytes` to `meter` as a firmware chunk (on its firmware topic).
    pub fn inject_chunk(&self, meter: &str, bytes: Vec<u8>) -> bool {
        MeterId::new(meter).is_ok_and(|m| self.fleet.inject_firmware_chunk(&m, Bytes::from(bytes)))
    }

    /// `meter`'s device state now (relay, firmware, last command counter, transfer).
    pub fn state(&self, meter: &str) -> Option<DeviceState> {
        MeterId::new(meter)
            .ok()
            .and_then(|m| self.fleet.device_state(&m))
    }

    /// Waits (up to `wait`) until `meter`'s device state satisfies `pred`; the state then, or
    /// the last one seen.
    pub async fn wait_state(
        &self,
        meter: &str,
        wait: Duration,
        pred: impl Fn(&DeviceState) -> bool,
    ) -> Option<DeviceState> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let state = self.state(meter);
            if state.as_ref().is_none_or(&pred) || tokio::time::Instant::now() >= deadline {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the meters, waiting up to 5 s for outstanding acknowledgements.
    pub async fn stop(self) -> FleetReport {
        self.fleet.stop(Duration::from_secs(5)).await
    }
}
