//! The genuine fleet: meters that keep sending real readings from 127.0.0.1 while every attack
//! runs, so each scenario can show that the defence did not stop them.

use std::time::Duration;

use gridward_core::MeterId;
use gridward_hes::pipeline::system_clock;
use gridward_meter::fleet::{Fleet, FleetConfig, FleetReport, MeterSpec};
use gridward_meter::identity::{Trust, list_meters, load_many};
use gridward_meter::stats::StatsSnapshot;
use gridward_pki::tls::TlsOptions;

use crate::AttackError;
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
