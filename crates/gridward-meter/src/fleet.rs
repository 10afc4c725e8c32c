//! The IO around [`Meter`]: N meters in one process, one lightweight tokio task each, publishing
//! over MQTT with mutual TLS (`gridward_mqtt::client`).
//!
//! ```text
//!  Fleet::start ── CounterStore: one fsync'd write reserves a counter block for every meter
//!      │          Outbox: unacknowledged messages of an earlier run are restored
//!      ├── counter service task: batches reservations of all meters into one atomic rewrite
//!      └── per meter task: connect (staggered, backoff with full jitter) ─► SUBSCRIBE
//!              meters/{id}/commands and meters/{id}/firmware (QoS 1) ─► loop {
//!              handle_timeout(now) ─► poll_publish ─► outbox ─► PUBLISH (QoS 1)
//!              PUBACK ─► on_puback ─► latency sample, outbox done
//!              PUBLISH from the head-end ─► on_command / on_firmware_chunk ─► device state
//!                 persisted (same fsync'd file as the counters) ─► PUBACK ─► signed ack
//!              disconnect ─► on_disconnected (resend later)     PINGREQ when idle }
//! ```
//!
//! Memory per idle meter is one task, one TLS connection and the meter state; no thread per meter.
//! The wall clock is injected ([`Clock`]); timers use tokio's monotonic clock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::command::{CommandKind, TrustedSigner};
use gridward_core::document::{EventKind, Format};
use gridward_core::envelope::VerifyingKey;
use gridward_core::firmware::Installed;
use gridward_mqtt::client::{
    self, Client, ClientError, ClientOptions, ClientReader, ClientWriter, Packet, Protocol, QoS,
};
use rustls::ClientConfig;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::command::{
    ChunkOutcome, CommandOutcome, DEFAULT_CLASS_ID, DEFAULT_FIRMWARE_TIMEOUT,
    DEFAULT_FIRMWARE_VERSION, DEFAULT_MAX_SKEW_SECS, DEFAULT_VENDOR_ID, DeviceConfig, DeviceState,
    Relay,
};
use crate::concentrator::{
    ConcentratorOutcome, ConcentratorSigner, ConcentratorSpec, ConcentratorStats,
};
use crate::counter::{CounterBlock, DEFAULT_BLOCK};
use crate::identity::MeterIdentity;
use crate::meter::{
    MAX_INTERVAL, MIN_INTERVAL, MessageKind, Meter, MeterConfig, MeterCounts, Misbehaviour,
};
use crate::outbox::{Outbox, OutboxEntry};
use crate::profile::{LoadProfile, ProfileError, mix, unit};
use crate::scenario::{Behaviour, GroundTruth};
use crate::state::{CounterStore, DeviceRecord, StateError};
use crate::stats::{FleetStats, LatencySummary, StatsSnapshot};

/// Failed connects in a row after which a meter marked [`Misbehaviour::Revoked`] gives up.
pub const REVOKED_GIVE_UP: u32 = 3;

/// The wall clock: readings and envelopes are stamped with it.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// How a fleet connects and what its meters send.
#[derive(Clone)]
pub struct FleetConfig {
    /// Head-end host name or address.
    pub host: String,
    /// Head-end MQTT/TLS port.
    pub port: u16,
    /// Name the server certificate must carry (default: `host`).
    pub server_name: String,
    /// MQTT version.
    pub protocol: Protocol,
    /// MQTT keep-alive; a PINGREQ is sent after half of it without traffic.
    pub keep_alive: Duration,
    /// Bound on TCP + TLS + CONNACK.
    pub connect_timeout: Duration,
    /// First connections per second across the fleet (connects are staggered).
    pub connect_rate: f64,
    /// First reconnect delay ceiling.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// A meter stops trying after this many failed connects in a row (`None`: never).
    pub give_up_after: Option<u32>,
    /// Time between readings (clamped to [`MIN_INTERVAL`]..=[`MAX_INTERVAL`]).
    pub interval: time::Duration,
    /// Document format.
    pub format: Format,
    /// Messages in flight per connection.
    pub max_inflight: usize,
    /// Messages a meter holds at most (queued and in flight).
    pub max_held: usize,
    /// Counters reserved per persisted mark.
    pub counter_block: u64,
    /// Misbehaving meters misbehave after every this many readings.
    pub misbehave_every: u32,
    /// Seed of the load profiles (with the meter id).
    pub seed: u64,
    /// Local time offset of the load curves.
    pub utc_offset_seconds: i32,
    /// State directory: counter marks and outbox.
    pub state_dir: PathBuf,
    /// Keep unacknowledged messages on disk (resend after a crash of this process).
    pub outbox: bool,
    /// The wall clock.
    pub clock: Clock,
    /// The pinned command signers (e.g. [`crate::identity::Trust::command_signers`]); without
    /// any, every command is refused as `unknown_signer`.
    pub command_signers: Vec<TrustedSigner>,
    /// The command kinds the meters execute.
    pub allowed_commands: Vec<CommandKind>,
    /// Tolerated clock skew for a command issued in the future, in seconds.
    pub command_max_skew_secs: i64,
    /// The manufacturer keys firmware manifests must be signed with
    /// ([`crate::identity::load_manufacturer_keys`]); without any, every update is refused.
    pub manufacturer_keys: Vec<VerifyingKey>,
    /// The meters' firmware vendor id.
    pub vendor_id: String,
    /// The meters' firmware class id.
    pub class_id: String,
    /// The factory firmware version (slot A until an update; the state file keeps updates).
    pub firmware_version: String,
    /// The factory firmware's sequence number.
    pub firmware_sequence: u64,
    /// A firmware transfer not complete this long after its command fails (`firmware_incomplete`).
    pub firmware_timeout: time::Duration,
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("server_name", &self.server_name)
            .field("protocol", &self.protocol)
            .field("interval", &self.interval)
            .field("format", &self.format)
            .field("state_dir", &self.state_dir)
            .field("command_signers", &self.command_signers.len())
            .field("manufacturer_keys", &self.manufacturer_keys.len())
            .field("vendor_id", &self.vendor_id)
            .field("class_id", &self.class_id)
            .field("firmware_version", &self.firmware_version)
            .finish_non_exhaustive()
    }
}

impl FleetConfig {
    /// Defaults: MQTT 5, keep-alive 60 s, connect timeout 10 s, 500 connects/s, backoff
    /// 100 ms … 30 s, never give up, readings every 60 s in XML, 8 in flight, 4096 held,
    /// blocks of [`DEFAULT_BLOCK`], outbox on, seed 0, UTC; no command signer and no
    /// manufacturer key, every command kind allowed, skew [`DEFAULT_MAX_SKEW_SECS`], firmware
    /// [`DEFAULT_VENDOR_ID`] / [`DEFAULT_CLASS_ID`] [`DEFAULT_FIRMWARE_VERSION`] sequence 0,
    /// transfer timeout [`DEFAULT_FIRMWARE_TIMEOUT`].
    pub fn new(
        host: impl Into<String>,
        port: u16,
        state_dir: impl Into<PathBuf>,
        clock: Clock,
    ) -> Self {
        let host = host.into();
        Self {
            server_name: host.clone(),
            host,
            port,
            protocol: Protocol::V5,
            keep_alive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            connect_rate: 500.0,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(30),
            give_up_after: None,
            interval: time::Duration::seconds(60),
            format: Format::Xml,
            max_inflight: 8,
            max_held: 4096,
            counter_block: DEFAULT_BLOCK,
            misbehave_every: 3,
            seed: 0,
            utc_offset_seconds: 0,
            state_dir: state_dir.into(),
            outbox: true,
            clock,
            command_signers: Vec::new(),
            allowed_commands: CommandKind::ALL.to_vec(),
            command_max_skew_secs: DEFAULT_MAX_SKEW_SECS,
            manufacturer_keys: Vec::new(),
            vendor_id: DEFAULT_VENDOR_ID.to_owned(),
            class_id: DEFAULT_CLASS_ID.to_owned(),
            firmware_version: DEFAULT_FIRMWARE_VERSION.to_owned(),
            firmware_sequence: 0,
            firmware_timeout: DEFAULT_FIRMWARE_TIMEOUT,
        }
    }

    /// The device configuration every meter of the fleet gets.
    fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            signers: Arc::from(self.command_signers.clone()),
            allowed: Arc::from(self.allowed_commands.clone()),
            max_skew_secs: self.command_max_skew_secs,
            manufacturer_keys: Arc::from(self.manufacturer_keys.clone()),
            factory_firmware: Installed {
                vendor_id: self.vendor_id.clone(),
                class_id: self.class_id.clone(),
                version: self.firmware_version.clone(),
                sequence: self.firmware_sequence,
            },
            firmware_timeout: self.firmware_timeout,
            image_boots: true,
        }
    }
}

/// One meter of a fleet.
#[derive(Debug)]
pub struct MeterSpec {
    /// Its identity (TLS configuration and key).
    pub identity: MeterIdentity,
    /// A deliberate misbehaviour, if any.
    pub misbehaviour: Option<Misbehaviour>,
}

impl From<MeterIdentity> for MeterSpec {
    fn from(identity: MeterIdentity) -> Self {
        Self {
            identity,
            misbehaviour: None,
        }
    }
}

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The head-end address did not resolve.
    #[error("cannot resolve {host}:{port}: {reason}")]
    Resolve {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// The same meter appears twice.
    #[error("meter {0} appears twice in the fleet")]
    DuplicateMeter(MeterId),
    /// A load profile parameter is out of range.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// A behaviour names a meter that is not one of the fleet's directly connected meters.
    #[error("meter {0} is not a directly connected meter of the fleet")]
    UnknownMeter(MeterId),
}

/// What one meter did, at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterOutcome {
    /// The meter.
    pub id: MeterId,
    /// Its counts.
    pub counts: MeterCounts,
    /// Messages still unacknowledged at the end (kept in the outbox if enabled).
    pub held: usize,
    /// Whether it stopped trying to connect.
    pub gave_up: bool,
}

/// The result of a fleet run.
#[derive(Debug, Clone)]
pub struct FleetReport {
    /// Final counters.
    pub stats: StatsSnapshot,
    /// Publish → PUBACK latency of accepted genuine messages.
    pub latency: LatencySummary,
    /// Run time from start to the end of the stop.
    pub elapsed: Duration,
    /// Per meter (directly connected).
    pub meters: Vec<MeterOutcome>,
    /// Per concentrator, with its PLC meters.
    pub concentrators: Vec<ConcentratorOutcome>,
    /// Per clone ([`Behaviour::Clone`]).
    pub clones: Vec<MeterOutcome>,
    /// The clones' counters (kept apart from the genuine fleet's).
    pub clone_stats: StatsSnapshot,
    /// Per brute-forcing source ([`Behaviour::BruteForce`]).
    pub brute_force: Vec<BruteForceOutcome>,
    /// What the behaviours did, in the order they took effect.
    pub ground_truth: Vec<GroundTruth>,
}

/// What a brute-forcing source ([`Behaviour::BruteForce`]) achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BruteForceOutcome {
    /// Its address.
    pub source: std::net::IpAddr,
    /// Connections it tried.
    pub attempts: u32,
    /// Connections the head-end accepted (a CONNACK success): 0 if the defence held.
    pub accepted: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    Stop,
}

/// A durable write asked of the counter service: a counter mark, a device state, or both.
pub(crate) struct Reservation {
    pub(crate) meter: MeterId,
    pub(crate) mark: Option<u64>,
    pub(crate) device: Option<DeviceRecord>,
    pub(crate) reply: oneshot::Sender<bool>,
}

/// A meter task's links to the [`Fleet`]: what it is asked, and where it shows its device state.
struct Channels {
    controls: mpsc::UnboundedReceiver<Control>,
    device: watch::Sender<DeviceState>,
}

/// What the fleet asks of one meter task (or of a concentrator, for a PLC meter).
#[derive(Debug)]
pub(crate) enum Control {
    Event(EventKind),
    /// A thief: the event, then only this share of the load is metered.
    Theft(EventKind, f64),
    /// The power fails (last gasp).
    PowerFail,
    /// The power is back.
    PowerRestore,
    /// A command as if it arrived on `topic` (no PUBACK: it did not come over MQTT).
    Command(String, Bytes),
    /// A firmware chunk as if it arrived on the firmware topic.
    Chunk(Bytes),
}

/// What the fleet asks of a concentrator task.
#[derive(Debug)]
pub(crate) enum ConcControl {
    /// For one of its PLC meters.
    Meter(MeterId, Control),
    /// For the concentrator itself (its own power).
    Own(Control),
    /// Contact with a PLC meter lost (`true`) or found again (`false`).
    Plc(MeterId, bool),
    /// Relay a copy of an envelope with one byte flipped.
    Alter,
    /// Relay an envelope of the foreign meter.
    RelayFor,
}

/// How the fleet reaches a meter or a concentrator.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Direct(mpsc::UnboundedSender<Control>),
    Plc(mpsc::UnboundedSender<ConcControl>),
    Concentrator(mpsc::UnboundedSender<ConcControl>),
}

impl Route {
    fn send(&self, meter: &MeterId, c: Control) -> bool {
        match self {
            Self::Direct(tx) => tx.send(c).is_ok(),
            Self::Plc(tx) => tx.send(ConcControl::Meter(meter.clone(), c)).is_ok(),
            Self::Concentrator(tx) => tx.send(ConcControl::Own(c)).is_ok(),
        }
    }

    fn concentrator(&self, c: ConcControl) -> bool {
        match self {
            Self::Concentrator(tx) => tx.send(c).is_ok(),
            Self::Direct(_) | Self::Plc(_) => false,
        }
    }
}

/// What every meter task shares.
pub(crate) struct Shared {
    pub(crate) addr: SocketAddr,
    pub(crate) server_name: String,
    pub(crate) protocol: Protocol,
    pub(crate) keep_alive: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) clock: Clock,
    pub(crate) stats: Arc<FleetStats>,
    pub(crate) reservations: mpsc::UnboundedSender<Reservation>,
    pub(crate) outbox: Option<Arc<Mutex<Outbox>>>,
}

/// Builds the fleet's meters alike.
struct MeterBuilder<'a> {
    config: &'a FleetConfig,
    device: &'a DeviceConfig,
    now: OffsetDateTime,
}

impl MeterBuilder<'_> {
    /// A meter whose first reading falls at a point of the interval drawn from its id and `salt`.
    fn meter(
        &self,
        id: MeterId,
        key: gridward_core::envelope::SigningKey,
        misbehaviour: Option<Misbehaviour>,
        block: CounterBlock,
        salt: u64,
    ) -> Result<Meter, FleetError> {
        let config = self.config;
        let h = mix(config.seed ^ id_hash(&id));
        let profile = LoadProfile::from_seed(h).with_utc_offset(config.utc_offset_seconds)?;
        let meter_config = MeterConfig {
            interval: config.interval,
            format: config.format,
            profile,
            max_inflight: config.max_inflight,
            max_held: config.max_held,
            counter_block: config.counter_block,
            misbehaviour,
            misbehave_every: config.misbehave_every,
            device: self.device.clone(),
        };
        // Readings are spread evenly over the interval.
        let interval = config.interval.clamp(MIN_INTERVAL, MAX_INTERVAL);
        let offset = interval * unit(mix(h ^ salt));
        let first = self.now.checked_add(offset).unwrap_or(self.now);
        Ok(Meter::new(id, key, meter_config, block, first))
    }
}

/// One step of the behaviours' schedule.
struct Scheduled {
    after: Duration,
    action: Action,
}

enum Action {
    Theft(MeterId, EventKind, f64),
    PowerFail {
        outage: usize,
        name: String,
        meters: Vec<MeterId>,
        meter: MeterId,
    },
    PowerRestore {
        outage: usize,
        meter: MeterId,
    },
    Clone(MeterId),
    PlcLost(MeterId, MeterId),
    PlcFound(MeterId, MeterId),
    Alter(MeterId),
    RelayFor(MeterId),
}

/// The ground truth recorded so far, with where each open outage and PLC loss is.
#[derive(Default)]
pub(crate) struct Truth {
    entries: Vec<GroundTruth>,
    outages: HashMap<usize, usize>,
    losses: HashMap<(MeterId, MeterId), usize>,
}

impl Truth {
    pub(crate) fn push(&mut self, t: GroundTruth) {
        self.entries.push(t);
    }
}

/// A running fleet.
pub struct Fleet {
    stats: Arc<FleetStats>,
    clone_stats: Arc<FleetStats>,
    concentrator_stats: HashMap<MeterId, Arc<ConcentratorStats>>,
    phase: watch::Sender<Phase>,
    routes: HashMap<MeterId, Route>,
    devices: HashMap<MeterId, watch::Receiver<DeviceState>>,
    tasks: Vec<JoinHandle<MeterOutcome>>,
    concentrator_tasks: Vec<JoinHandle<ConcentratorOutcome>>,
    clones: Vec<JoinHandle<MeterOutcome>>,
    brute_forcers: Vec<JoinHandle<BruteForceOutcome>>,
    scenario: JoinHandle<()>,
    truth: Arc<Mutex<Truth>>,
    counter_service: JoinHandle<()>,
    volatile_service: JoinHandle<()>,
    started: Instant,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("meters", &self.tasks.len())
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// A stable 64-bit hash of a meter id (FNV-1a), for per-meter seeds.
pub(crate) fn id_hash(id: &MeterId) -> u64 {
    id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Fleet {
    /// Starts `meters` (call inside a tokio runtime). Returns once every meter has a persisted
    /// counter block and its task is spawned; connects then happen staggered at
    /// [`FleetConfig::connect_rate`].
    pub async fn start(meters: Vec<MeterSpec>, config: FleetConfig) -> Result<Self, FleetError> {
        Self::start_with(meters, Vec::new(), Vec::new(), config).await
    }

    /// Starts `meters` connected directly, `concentrators` with the PLC meters behind them,
    /// and schedules `behaviours` (thief, outage, clone) relative to now; the
    /// [`GroundTruth`] of what they did is kept ([`ground_truth`](Self::ground_truth)).
    pub async fn start_with(
        meters: Vec<MeterSpec>,
        concentrators: Vec<ConcentratorSpec>,
        behaviours: Vec<Behaviour>,
        config: FleetConfig,
    ) -> Result<Self, FleetError> {
        let addr = tokio::net::lookup_host((config.host.as_str(), config.port))
            .await
            .map_err(|e| e.to_string())
            .and_then(|mut a| a.next().ok_or_else(|| "no address".to_owned()))
            .map_err(|reason| FleetError::Resolve {
                host: config.host.clone(),
                port: config.port,
                reason,
            })?;
        // Every holder of a counter: direct meters, then per concentrator itself, its PLC
        // meters and the foreign meter it may relay for.
        let mut owners: Vec<MeterId> = meters.iter().map(|m| m.identity.id().clone()).collect();
        for c in &concentrators {
            owners.push(c.identity.id().clone());
            owners.extend(c.meters.iter().map(|m| m.identity.id().clone()));
            if let Some(f) = &c.relay_for {
                owners.push(f.identity.id().clone());
            }
        }
        let mut seen = std::collections::HashSet::new();
        for id in &owners {
            if !seen.insert(id.clone()) {
                return Err(FleetError::DuplicateMeter(id.clone()));
            }
        }
        let direct: std::collections::HashSet<&MeterId> =
            meters.iter().map(|m| m.identity.id()).collect();
        for b in &behaviours {
            if let Behaviour::Clone { identity, .. } = b
                && !direct.contains(identity.id())
            {
                return Err(FleetError::UnknownMeter(identity.id().clone()));
            }
        }
        let stats = Arc::new(FleetStats::default());

        // One durable write reserves a block for every counter holder.
        let mut store = CounterStore::open(&config.state_dir)?;
        let reserved: Vec<(MeterId, CounterBlock, u64)> = owners
            .into_iter()
            .map(|id| {
                let b = CounterBlock::resume(store.mark(&id));
                let mark = b.reservation(config.counter_block);
                (id, b, mark)
            })
            .collect();
        store.persist(reserved.iter().map(|(id, _, mark)| (id, *mark)))?;
        stats.counter_writes.fetch_add(1, Ordering::Relaxed);
        // A clone starts where the genuine meter starts: their counters collide.
        let cloned: std::collections::HashSet<&MeterId> = behaviours
            .iter()
            .filter_map(|b| match b {
                Behaviour::Clone { identity, .. } => Some(identity.id()),
                _ => None,
            })
            .collect();
        let clone_starts: HashMap<MeterId, u64> = reserved
            .iter()
            .filter(|(id, _, _)| cloned.contains(id))
            .map(|(id, b, _)| (id.clone(), b.next()))
            .collect();
        drop(cloned);
        let mut grants: HashMap<MeterId, (CounterBlock, u64)> = reserved
            .into_iter()
            .map(|(id, b, mark)| (id, (b, mark)))
            .collect();
        let mut take_block = |id: &MeterId| {
            let (mut b, mark) = grants.remove(id).unwrap_or((CounterBlock::resume(None), 0));
            b.granted(mark);
            b
        };
        let device_config = config.device_config();

        let (outbox, mut restored) = if config.outbox {
            let (ob, entries) = Outbox::open(&store)?;
            let mut by_meter: HashMap<MeterId, Vec<OutboxEntry>> = HashMap::new();
            for e in entries {
                by_meter.entry(e.meter.clone()).or_default().push(e);
            }
            (Some(Arc::new(Mutex::new(ob))), by_meter)
        } else {
            (None, HashMap::new())
        };
        let records: HashMap<MeterId, DeviceRecord> = seen
            .iter()
            .filter_map(|id| store.device(id).map(|r| (id.clone(), r.clone())))
            .collect();

        let store = Arc::new(Mutex::new(store));
        let (res_tx, res_rx) = mpsc::unbounded_channel();
        let counter_service = tokio::spawn(counter_service(store, res_rx, Arc::clone(&stats)));

        let shared = Arc::new(Shared {
            addr,
            server_name: config.server_name.clone(),
            protocol: config.protocol,
            keep_alive: config.keep_alive,
            connect_timeout: config.connect_timeout,
            backoff_base: config.backoff_base,
            backoff_cap: config.backoff_cap,
            clock: Arc::clone(&config.clock),
            stats: Arc::clone(&stats),
            reservations: res_tx,
            outbox,
        });
        let (phase_tx, _) = watch::channel(Phase::Running);
        let now = (config.clock)();
        let started = Instant::now();
        let rate = if config.connect_rate.is_finite() && config.connect_rate > 0.0 {
            config.connect_rate
        } else {
            f64::MAX
        };
        let build = MeterBuilder {
            config: &config,
            device: &device_config,
            now,
        };
        let mut restore = |meter: &mut Meter| {
            if let Some(record) = records.get(meter.id()) {
                meter.restore_device(record, now);
            }
            if let Some(entries) = restored.remove(meter.id()) {
                stats
                    .restored
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                meter.restore(
                    entries
                        .into_iter()
                        .map(|e| (e.counter, Arc::<str>::from(e.topic), e.envelope)),
                );
            }
        };
        let mut routes = HashMap::with_capacity(meters.len());
        let mut devices = HashMap::with_capacity(meters.len());
        let mut tasks = Vec::with_capacity(meters.len());
        let mut slot = 0usize;
        let connect_at = |slot: &mut usize| {
            let at = started + Duration::from_secs_f64((*slot as f64 / rate).min(86_400.0));
            *slot += 1;
            at
        };
        for spec in meters {
            // A revoked meter gives up soon: its refused handshakes would otherwise count towards
            // the head-end's ban of the (shared) source address.
            let give_up_after = match spec.misbehaviour {
                Some(Misbehaviour::Revoked) => {
                    Some(REVOKED_GIVE_UP.min(config.give_up_after.unwrap_or(u32::MAX)))
                }
                _ => config.give_up_after,
            };
            let misbehaviour = spec.misbehaviour;
            let (id, tls, key) = spec.identity.into_parts();
            let block = take_block(&id);
            let mut meter = build.meter(id.clone(), key, misbehaviour, block, 0x51)?;
            restore(&mut meter);
            let (ev_tx, ev_rx) = mpsc::unbounded_channel();
            let (dev_tx, dev_rx) = watch::channel(meter.device_state());
            devices.insert(id.clone(), dev_rx);
            routes.insert(id, Route::Direct(ev_tx));
            tasks.push(tokio::spawn(run_meter(
                meter,
                tls,
                Arc::clone(&shared),
                Channels {
                    controls: ev_rx,
                    device: dev_tx,
                },
                phase_tx.subscribe(),
                connect_at(&mut slot),
                give_up_after,
            )));
        }

        let truth = Arc::new(Mutex::new(Truth::default()));
        // Concentrators, with their PLC meters: one task and one connection each.
        let mut concentrator_tasks = Vec::with_capacity(concentrators.len());
        let mut concentrator_stats = HashMap::new();
        let mut schedule: Vec<Scheduled> = Vec::new();
        for c in concentrators {
            let ConcentratorSpec {
                identity,
                meters: plc,
                relay,
                plc_losses,
                alter_relay_after,
                relay_for,
            } = c;
            let (cid, tls, key) = identity.into_parts();
            let own = take_block(&cid);
            let mut plc_meters = Vec::with_capacity(plc.len());
            for spec in plc {
                let (id, _, key) = spec.identity.into_parts();
                let block = take_block(&id);
                let mut meter = build.meter(id, key, spec.misbehaviour, block, 0x51)?;
                restore(&mut meter);
                plc_meters.push(meter);
            }
            let foreign = match relay_for {
                Some(f) => {
                    let (id, _, key) = f.identity.into_parts();
                    let block = take_block(&id);
                    schedule.push(Scheduled {
                        after: f.after,
                        action: Action::RelayFor(cid.clone()),
                    });
                    Some(build.meter(id, key, None, block, 0x52)?)
                }
                None => None,
            };
            for l in plc_losses {
                schedule.push(Scheduled {
                    after: l.after,
                    action: Action::PlcLost(cid.clone(), l.meter.clone()),
                });
                if let Some(d) = l.duration {
                    schedule.push(Scheduled {
                        after: l.after + d,
                        action: Action::PlcFound(cid.clone(), l.meter),
                    });
                }
            }
            if let Some(after) = alter_relay_after {
                schedule.push(Scheduled {
                    after,
                    action: Action::Alter(cid.clone()),
                });
            }
            let (tx, rx) = mpsc::unbounded_channel();
            for m in &plc_meters {
                routes.insert(m.id().clone(), Route::Plc(tx.clone()));
            }
            routes.insert(cid.clone(), Route::Concentrator(tx));
            let cstats = Arc::new(ConcentratorStats::default());
            concentrator_stats.insert(cid.clone(), Arc::clone(&cstats));
            let signer = ConcentratorSigner::new(cid, key, own, config.counter_block);
            concentrator_tasks.push(tokio::spawn(crate::plc::run_concentrator(
                crate::plc::ConcentratorTask {
                    signer,
                    meters: plc_meters,
                    foreign,
                    relay,
                    tls,
                    shared: Arc::clone(&shared),
                    stats: cstats,
                    controls: rx,
                    phase: phase_tx.subscribe(),
                    connect_at: connect_at(&mut slot),
                    give_up_after: config.give_up_after,
                    truth: Arc::clone(&truth),
                },
            )));
        }

        // Clones: their own counters (never persisted), their own statistics.
        let clone_stats = Arc::new(FleetStats::default());
        let (volatile_tx, volatile_rx) = mpsc::unbounded_channel();
        let volatile_service = tokio::spawn(volatile_service(volatile_rx));
        let clone_shared = Arc::new(Shared {
            stats: Arc::clone(&clone_stats),
            reservations: volatile_tx,
            outbox: None,
            clock: Arc::clone(&config.clock),
            server_name: config.server_name.clone(),
            ..*shared.as_ref()
        });
        let mut clones = Vec::new();
        let mut brute_forcers = Vec::new();
        for b in behaviours {
            match b {
                Behaviour::Theft {
                    meter,
                    after,
                    event,
                    metered_share,
                } => schedule.push(Scheduled {
                    after,
                    action: Action::Theft(meter, event, metered_share),
                }),
                Behaviour::Outage {
                    name,
                    meters,
                    after,
                    duration,
                    spread,
                } => {
                    let index = schedule.len();
                    for m in &meters {
                        let h = mix(config.seed ^ id_hash(m) ^ 0x07a6e);
                        let fail = after + spread.mul_f64(unit(h));
                        schedule.push(Scheduled {
                            after: fail,
                            action: Action::PowerFail {
                                outage: index,
                                name: name.clone(),
                                meters: meters.clone(),
                                meter: m.clone(),
                            },
                        });
                        if let Some(d) = duration {
                            let back = after + d + spread.mul_f64(unit(mix(h)));
                            schedule.push(Scheduled {
                                after: back,
                                action: Action::PowerRestore {
                                    outage: index,
                                    meter: m.clone(),
                                },
                            });
                        }
                    }
                }
                Behaviour::BruteForce {
                    source,
                    after,
                    attempts,
                    interval,
                    client_id,
                    tls,
                } => {
                    brute_forcers.push(tokio::spawn(brute_force(
                        BruteForcer {
                            addr,
                            server_name: config.server_name.clone(),
                            source,
                            attempts,
                            interval,
                            client_id,
                            tls,
                        },
                        started + after,
                        Arc::clone(&truth),
                        Arc::clone(&config.clock),
                        phase_tx.subscribe(),
                    )));
                }
                Behaviour::Clone { identity, after } => {
                    let (id, tls, key) = identity.into_parts();
                    let mut block = CounterBlock::resume(clone_starts.get(&id).copied());
                    block.granted(u64::MAX);
                    let meter = build.meter(id.clone(), key, None, block, 0x53)?;
                    schedule.push(Scheduled {
                        after,
                        action: Action::Clone(id),
                    });
                    let (_ctl_tx, ctl_rx) = mpsc::unbounded_channel();
                    let (dev_tx, _) = watch::channel(meter.device_state());
                    clones.push(tokio::spawn(run_meter(
                        meter,
                        tls,
                        Arc::clone(&clone_shared),
                        Channels {
                            controls: ctl_rx,
                            device: dev_tx,
                        },
                        phase_tx.subscribe(),
                        started + after,
                        None,
                    )));
                }
            }
        }
        drop(clone_shared);
        let scenario = tokio::spawn(run_schedule(
            schedule,
            routes.clone(),
            Arc::clone(&truth),
            Arc::clone(&config.clock),
            started,
        ));
        Ok(Self {
            stats,
            clone_stats,
            concentrator_stats,
            phase: phase_tx,
            routes,
            devices,
            tasks,
            concentrator_tasks,
            clones,
            brute_forcers,
            scenario,
            truth,
            counter_service,
            volatile_service,
            started,
        })
    }

    /// The live counters (shared with the meter tasks).
    pub fn stats(&self) -> &Arc<FleetStats> {
        &self.stats
    }

    /// Number of meters.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the fleet has no meters.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Asks `meter` to sign and send an event now (tamper, power). `false` if the meter is
    /// unknown or its task has ended.
    pub fn request_event(&self, meter: &MeterId, kind: EventKind) -> bool {
        self.control(meter, Control::Event(kind))
    }

    /// A thief on `meter` now: it signs `event`, then meters only `metered_share` of its load
    /// ([`Meter::start_bypass`]). `false` if the meter is unknown or its task has ended.
    /// Unlike [`Behaviour::Theft`], no ground truth is recorded.
    pub fn start_theft(&self, meter: &MeterId, event: EventKind, metered_share: f64) -> bool {
        self.control(meter, Control::Theft(event, metered_share))
    }

    /// `meter` (or a concentrator) loses power now ([`Meter::power_fail`]).
    pub fn power_fail(&self, meter: &MeterId) -> bool {
        self.control(meter, Control::PowerFail)
    }

    /// `meter` (or a concentrator) has power again ([`Meter::power_restore`]).
    pub fn power_restore(&self, meter: &MeterId) -> bool {
        self.control(meter, Control::PowerRestore)
    }

    /// The concentrator `concentrator` loses (`true`) or finds again (`false`) its PLC meter
    /// `meter`: it reports MeterLost / MeterFound and the meter's messages stop / resume.
    pub fn plc_contact(&self, concentrator: &MeterId, meter: &MeterId, lost: bool) -> bool {
        self.routes
            .get(concentrator)
            .is_some_and(|r| r.concentrator(ConcControl::Plc(meter.clone(), lost)))
    }

    fn control(&self, meter: &MeterId, c: Control) -> bool {
        self.routes.get(meter).is_some_and(|r| r.send(meter, c))
    }

    fn direct(&self, meter: &MeterId, c: Control) -> bool {
        match self.routes.get(meter) {
            Some(r @ Route::Direct(_)) => r.send(meter, c),
            _ => false,
        }
    }

    /// What the fleet's behaviours did so far.
    pub fn ground_truth(&self) -> Vec<GroundTruth> {
        self.truth
            .lock()
            .map(|t| t.entries.clone())
            .unwrap_or_default()
    }

    /// The live counters of the clones.
    pub fn clone_stats(&self) -> &Arc<FleetStats> {
        &self.clone_stats
    }

    /// The live counters of concentrator `id`.
    pub fn concentrator_stats(&self, id: &MeterId) -> Option<&Arc<ConcentratorStats>> {
        self.concentrator_stats.get(id)
    }

    /// Hands `bytes` to `meter` as if they had arrived on `topic` from the broker, by a path
    /// that is not the head-end's (a compromised broker, a forged command): the meter verifies
    /// and answers exactly as for a command over MQTT (without a PUBACK). `false` if the meter
    /// is unknown or its task has ended.
    pub fn inject_command(&self, meter: &MeterId, topic: &str, bytes: impl Into<Bytes>) -> bool {
        self.direct(meter, Control::Command(topic.to_owned(), bytes.into()))
    }

    /// Hands `bytes` to `meter` as a firmware chunk (a tampered or foreign image from a
    /// compromised broker). `false` if the meter is unknown or its task has ended.
    pub fn inject_firmware_chunk(&self, meter: &MeterId, bytes: impl Into<Bytes>) -> bool {
        self.direct(meter, Control::Chunk(bytes.into()))
    }

    /// A snapshot of `meter`'s device state (relay, interval, tariff, firmware), as of its last
    /// command or firmware chunk.
    pub fn device_state(&self, meter: &MeterId) -> Option<DeviceState> {
        self.devices.get(meter).map(|rx| rx.borrow().clone())
    }

    /// `meter`'s relay.
    pub fn relay_state(&self, meter: &MeterId) -> Option<Relay> {
        self.devices.get(meter).map(|rx| rx.borrow().relay)
    }

    /// A receiver that sees every change of `meter`'s device state (to wait for a command's
    /// effect: `rx.wait_for(|s| ...)`).
    pub fn watch_device(&self, meter: &MeterId) -> Option<watch::Receiver<DeviceState>> {
        self.devices.get(meter).cloned()
    }

    /// Stops taking readings, waits up to `drain` for what is unacknowledged to be acknowledged,
    /// then disconnects every meter and reports.
    pub async fn stop(self, drain: Duration) -> FleetReport {
        let _ = self.phase.send(Phase::Draining);
        self.scenario.abort();
        let _ = self.scenario.await;
        drop(self.routes);
        let deadline = Instant::now() + drain;
        let mut tasks = self.tasks;
        // Wait for the meters to finish by themselves, up to the deadline.
        while Instant::now() < deadline
            && !(tasks.iter().all(JoinHandle::is_finished)
                && self.concentrator_tasks.iter().all(JoinHandle::is_finished))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.phase.send(Phase::Stop);
        let mut meters = Vec::with_capacity(tasks.len());
        for t in tasks.drain(..) {
            if let Ok(outcome) = t.await {
                meters.push(outcome);
            }
        }
        let mut concentrators = Vec::with_capacity(self.concentrator_tasks.len());
        for t in self.concentrator_tasks {
            if let Ok(outcome) = t.await {
                concentrators.push(outcome);
            }
        }
        let mut clones = Vec::with_capacity(self.clones.len());
        for t in self.clones {
            if let Ok(outcome) = t.await {
                clones.push(outcome);
            }
        }
        let mut brute_force = Vec::with_capacity(self.brute_forcers.len());
        for t in self.brute_forcers {
            if let Ok(outcome) = t.await {
                brute_force.push(outcome);
            }
        }
        // Every task has ended, so the reservation channel is closed: the service finishes and
        // releases the state directory.
        let _ = self.counter_service.await;
        let _ = self.volatile_service.await;
        let ground_truth = self
            .truth
            .lock()
            .map(|t| t.entries.clone())
            .unwrap_or_default();
        FleetReport {
            stats: self.stats.snapshot(),
            latency: self.stats.latency.summary(),
            elapsed: self.started.elapsed(),
            meters,
            concentrators,
            clones,
            clone_stats: self.clone_stats.snapshot(),
            brute_force,
            ground_truth,
        }
    }
}

/// The counter service of clones: grants everything, persists nothing (a clone's counters and
/// device state must never touch the genuine meter's).
async fn volatile_service(mut rx: mpsc::UnboundedReceiver<Reservation>) {
    while let Some(r) = rx.recv().await {
        let _ = r.reply.send(true);
    }
}

/// Runs the behaviours' schedule, recording the ground truth as each takes effect.
/// Where and how a brute-forcing source connects.
struct BruteForcer {
    addr: SocketAddr,
    server_name: String,
    source: std::net::IpAddr,
    attempts: u32,
    interval: Duration,
    client_id: String,
    tls: Arc<ClientConfig>,
}

/// Runs a [`Behaviour::BruteForce`] from `start` until its attempts are made or the fleet
/// stops; records its ground truth when it starts.
async fn brute_force(
    b: BruteForcer,
    start: Instant,
    truth: Arc<Mutex<Truth>>,
    clock: Clock,
    mut phase: watch::Receiver<Phase>,
) -> BruteForceOutcome {
    let mut out = BruteForceOutcome {
        source: b.source,
        attempts: 0,
        accepted: 0,
    };
    tokio::select! {
        () = tokio::time::sleep_until(start) => {}
        _ = phase.wait_for(|p| *p != Phase::Running) => return out,
    }
    if let Ok(mut t) = truth.lock() {
        t.push(GroundTruth::BruteForce {
            source: b.source.to_string(),
            at: clock(),
            attempts: b.attempts,
        });
    }
    let mut opts = ClientOptions::new(b.client_id.clone());
    opts.connect_timeout = Duration::from_secs(5);
    for _ in 0..b.attempts {
        if *phase.borrow() != Phase::Running {
            break;
        }
        out.attempts += 1;
        let connected = tokio::time::timeout(opts.connect_timeout, async {
            let stream = gridward_mqtt::client::tls_connect_from(
                b.source,
                b.addr,
                &b.server_name,
                Arc::clone(&b.tls),
            )
            .await?;
            Client::handshake(stream, &opts).await
        })
        .await;
        if let Ok(Ok((mut client, _))) = connected {
            out.accepted += 1;
            let _ = client.disconnect().await;
        }
        tokio::select! {
            () = tokio::time::sleep(b.interval) => {}
            _ = phase.wait_for(|p| *p != Phase::Running) => break,
        }
    }
    out
}

async fn run_schedule(
    mut schedule: Vec<Scheduled>,
    routes: HashMap<MeterId, Route>,
    truth: Arc<Mutex<Truth>>,
    clock: Clock,
    started: Instant,
) {
    schedule.sort_by_key(|s| s.after);
    for s in schedule {
        tokio::time::sleep_until(started + s.after).await;
        let now = clock();
        let Ok(mut t) = truth.lock() else {
            return;
        };
        let send = |m: &MeterId, c: Control| routes.get(m).is_some_and(|r| r.send(m, c));
        let conc = |c: &MeterId, x: ConcControl| routes.get(c).is_some_and(|r| r.concentrator(x));
        match s.action {
            Action::Theft(meter, event, metered_share) => {
                if send(&meter, Control::Theft(event, metered_share)) {
                    t.push(GroundTruth::Theft {
                        meter,
                        at: now,
                        event,
                        metered_share,
                    });
                }
            }
            Action::PowerFail {
                outage,
                name,
                meters,
                meter,
            } => {
                send(&meter, Control::PowerFail);
                if !t.outages.contains_key(&outage) {
                    let i = t.entries.len();
                    t.outages.insert(outage, i);
                    t.push(GroundTruth::Outage {
                        name,
                        meters,
                        failed_at: now,
                        restored_at: None,
                    });
                }
            }
            Action::PowerRestore { outage, meter } => {
                send(&meter, Control::PowerRestore);
                if let Some(&i) = t.outages.get(&outage)
                    && let Some(GroundTruth::Outage { restored_at, .. }) = t.entries.get_mut(i)
                {
                    *restored_at = Some(now);
                }
            }
            Action::Clone(meter) => t.push(GroundTruth::Clone { meter, at: now }),
            Action::PlcLost(c, meter) => {
                if conc(&c, ConcControl::Plc(meter.clone(), true)) {
                    let i = t.entries.len();
                    t.losses.insert((c.clone(), meter.clone()), i);
                    t.push(GroundTruth::PlcLoss {
                        concentrator: c,
                        meter,
                        lost_at: now,
                        found_at: None,
                    });
                }
            }
            Action::PlcFound(c, meter) => {
                if conc(&c, ConcControl::Plc(meter.clone(), false))
                    && let Some(i) = t.losses.remove(&(c, meter))
                    && let Some(GroundTruth::PlcLoss { found_at, .. }) = t.entries.get_mut(i)
                {
                    *found_at = Some(now);
                }
            }
            Action::Alter(c) => {
                // The concentrator records the ground truth when it publishes the copy.
                conc(&c, ConcControl::Alter);
            }
            Action::RelayFor(c) => {
                conc(&c, ConcControl::RelayFor);
            }
        }
    }
}

async fn counter_service(
    store: Arc<Mutex<CounterStore>>,
    mut rx: mpsc::UnboundedReceiver<Reservation>,
    stats: Arc<FleetStats>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        let marks: Vec<(MeterId, u64)> = batch
            .iter()
            .filter_map(|r| r.mark.map(|k| (r.meter.clone(), k)))
            .collect();
        let devices: Vec<(MeterId, DeviceRecord)> = batch
            .iter()
            .filter_map(|r| r.device.clone().map(|d| (r.meter.clone(), d)))
            .collect();
        let store = Arc::clone(&store);
        let ok = tokio::task::spawn_blocking(move || {
            store.lock().map_err(|_| ()).and_then(|mut s| {
                s.persist_all(
                    marks.iter().map(|(m, k)| (m, *k)),
                    devices.iter().map(|(m, d)| (m, d)),
                )
                .map_err(|_| ())
            })
        })
        .await
        .is_ok_and(|r| r.is_ok());
        if ok {
            stats.counter_writes.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.state_errors.fetch_add(1, Ordering::Relaxed);
        }
        for r in batch {
            let _ = r.reply.send(ok);
        }
    }
}

/// An established connection.
pub(crate) struct Conn {
    reader: ClientReader,
    writer: ClientWriter,
    last_read: Instant,
    last_write: Instant,
    /// Packet id, time written and kind of each message in flight.
    inflight: VecDeque<(u16, Instant, MessageKind)>,
}

/// Something that happened while waiting.
enum Wake {
    Timer,
    Packet(Result<Packet, ClientError>),
    Control(Option<Control>),
    Granted(u64, bool),
    Phase,
}

async fn next_grant(g: &mut Option<(u64, oneshot::Receiver<bool>)>) -> (u64, bool) {
    match g {
        Some((mark, rx)) => (*mark, rx.await.unwrap_or(false)),
        None => std::future::pending().await,
    }
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Control>, open: bool) -> Option<Control> {
    if open {
        rx.recv().await
    } else {
        std::future::pending().await
    }
}

pub(crate) async fn next_packet(conn: &mut Option<Conn>) -> Result<Packet, ClientError> {
    match conn {
        Some(c) => c.reader.recv().await,
        None => std::future::pending().await,
    }
}

/// How long until `t` on the wall clock, as a tokio instant.
pub(crate) fn instant_of(t: OffsetDateTime, clock: &Clock) -> Instant {
    let delta = t - clock();
    Instant::now() + Duration::try_from(delta).unwrap_or(Duration::ZERO).min(FAR)
}

pub(crate) const FAR: Duration = Duration::from_secs(86_400 * 365);

/// A head-end that does not read for this long is given up on (the connection is dropped).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

async fn run_meter(
    mut m: Meter,
    tls: Arc<ClientConfig>,
    sh: Arc<Shared>,
    channels: Channels,
    mut phase: watch::Receiver<Phase>,
    connect_at: Instant,
    give_up_after: Option<u32>,
) -> MeterOutcome {
    let Channels {
        controls: mut events,
        device,
    } = channels;
    let stats = &sh.stats;
    let mut conn: Option<Conn> = None;
    let mut retry_at = connect_at;
    let mut backoff = Backoff::new(sh.backoff_base, sh.backoff_cap);
    let mut grant: Option<(u64, oneshot::Receiver<bool>)> = None;
    let mut events_open = true;
    let mut gave_up = false;
    let mut starved = false;
    // Keep-alive 0 means none: no pings, no dead-peer detection.
    let (ping_after, dead_after) = if sh.keep_alive.is_zero() {
        (FAR, FAR)
    } else {
        (
            (sh.keep_alive / 2).max(Duration::from_millis(100)),
            sh.keep_alive.saturating_mul(3) / 2,
        )
    };

    loop {
        let current = *phase.borrow();
        if current == Phase::Stop {
            break;
        }
        let draining = current == Phase::Draining;

        // 1. Produce what is due.
        if !draining {
            match m.handle_timeout((sh.clock)()) {
                Ok(out) => {
                    stats
                        .readings
                        .fetch_add(u64::from(out.readings), Ordering::Relaxed);
                    stats
                        .events
                        .fetch_add(u64::from(out.events), Ordering::Relaxed);
                    stats
                        .skipped
                        .fetch_add(u64::from(out.skipped), Ordering::Relaxed);
                    stats
                        .command_acks
                        .fetch_add(u64::from(out.acks), Ordering::Relaxed);
                    if out.acks > 0 {
                        publish_device_state(&m, &device);
                    }
                    starved = out.starved;
                }
                Err(_) => {
                    stats.sign_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Everything signed is on disk before it can be published.
        let new: Vec<(u64, Arc<str>, Bytes)> = m
            .take_new()
            .map(|msg| (msg.counter, Arc::clone(&msg.topic), msg.envelope.clone()))
            .collect();
        if !new.is_empty()
            && let Some(ob) = &sh.outbox
        {
            let recorded = ob.lock().map_err(|_| ()).and_then(|mut o| {
                new.into_iter().try_for_each(|(counter, topic, envelope)| {
                    let entry = OutboxEntry {
                        meter: m.id().clone(),
                        counter,
                        topic: topic.to_string(),
                        envelope,
                    };
                    o.record_sent(&entry).map_err(|_| ())
                })
            });
            if recorded.is_err() {
                stats.state_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Device state changed by a command and not yet on disk (a failed write is retried).
        if m.device_dirty() && !persist_device(&mut m, &sh).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if grant.is_none()
            && let Some(mark) = m.counter_reservation()
        {
            let (tx, rx) = oneshot::channel();
            let req = Reservation {
                meter: m.id().clone(),
                mark: Some(mark),
                device: None,
                reply: tx,
            };
            if sh.reservations.send(req).is_ok() {
                grant = Some((mark, rx));
            } else {
                m.reservation_failed();
            }
        }
        if draining && m.held() == 0 && m.pending_acks() == 0 {
            break;
        }

        // 2. Connect when it is time.
        if conn.is_none() && Instant::now() >= retry_at {
            let opts = ClientOptions {
                client_id: m.id().to_string(),
                keep_alive: sh.keep_alive,
                clean_session: true,
                protocol: sh.protocol,
                connect_timeout: sh.connect_timeout,
            };
            let attempt = Box::pin(client::connect_tls(
                sh.addr,
                &sh.server_name,
                Arc::clone(&tls),
                &opts,
            ));
            let result = tokio::select! {
                r = attempt => Some(r),
                _ = phase.wait_for(|p| *p == Phase::Stop) => None,
            };
            match result {
                None => break,
                Some(Ok((client, _ack))) => {
                    let (reader, mut writer) = client.into_split();
                    m.on_connected();
                    let mut subscribed = true;
                    while let Some((pkid, topic)) = m.poll_subscribe() {
                        let sent = tokio::time::timeout(
                            WRITE_TIMEOUT,
                            writer.subscribe(pkid, &topic, QoS::AtLeastOnce),
                        )
                        .await;
                        if !sent.is_ok_and(|r| r.is_ok()) {
                            subscribed = false;
                            break;
                        }
                    }
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    if !subscribed {
                        m.on_disconnected();
                        stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        retry_at = Instant::now() + backoff.next_delay(&mut rand::thread_rng());
                        continue;
                    }
                    let now = Instant::now();
                    conn = Some(Conn {
                        reader,
                        writer,
                        last_read: now,
                        last_write: now,
                        inflight: VecDeque::new(),
                    });
                    backoff.reset();
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(_)) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    if give_up_after.is_some_and(|n| backoff.failures().saturating_add(1) >= n) {
                        gave_up = true;
                        stats.gave_up.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    let delay = backoff.next_delay(&mut rand::thread_rng());
                    retry_at = Instant::now() + delay;
                }
            }
            continue;
        }

        // 3. Write what may be written.
        let mut lost = false;
        if let Some(c) = conn.as_mut() {
            let mut wrote = false;
            while let Some(p) = m.poll_publish() {
                let payload: Bytes = p.payload.clone();
                if c.writer
                    .queue_publish(&p.topic, payload, QoS::AtLeastOnce, p.packet_id)
                    .is_err()
                {
                    lost = true;
                    break;
                }
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if p.resend && p.kind.is_genuine() {
                    stats.resent.fetch_add(1, Ordering::Relaxed);
                }
                if !p.kind.is_genuine() {
                    stats.misbehaviour_sent.fetch_add(1, Ordering::Relaxed);
                }
                c.inflight.push_back((p.packet_id, Instant::now(), p.kind));
                wrote = true;
            }
            if wrote && !lost {
                let flushed = tokio::time::timeout(WRITE_TIMEOUT, c.writer.flush()).await;
                if flushed.is_ok_and(|r| r.is_ok()) {
                    c.last_write = Instant::now();
                } else {
                    lost = true;
                }
            }
        }

        // 4. Wait for the next thing to happen.
        if !lost {
            let mut wake_at = if draining || starved {
                Instant::now() + FAR
            } else {
                instant_of(m.poll_timeout(), &sh.clock)
            };
            match &conn {
                None => wake_at = wake_at.min(retry_at),
                Some(c) => {
                    wake_at = wake_at
                        .min(c.last_write + ping_after)
                        .min(c.last_read + dead_after);
                }
            }
            let wake = tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => Wake::Timer,
                p = next_packet(&mut conn) => Wake::Packet(p),
                e = next_event(&mut events, events_open) => Wake::Control(e),
                (mark, ok) = next_grant(&mut grant) => Wake::Granted(mark, ok),
                r = phase.changed() => {
                    if r.is_err() {
                        break;
                    }
                    Wake::Phase
                }
            };
            match wake {
                Wake::Timer => {
                    if let Some(c) = conn.as_mut() {
                        let now = Instant::now();
                        if now >= c.last_read + dead_after {
                            lost = true;
                        } else if now >= c.last_write + ping_after {
                            let pinged = tokio::time::timeout(WRITE_TIMEOUT, c.writer.ping()).await;
                            if pinged.is_ok_and(|r| r.is_ok()) {
                                c.last_write = Instant::now();
                            } else {
                                lost = true;
                            }
                        }
                    }
                }
                Wake::Packet(Ok(packet)) => {
                    if let Some(c) = conn.as_mut() {
                        c.last_read = Instant::now();
                        match packet {
                            Packet::PubAck { pkid, reason_code } => {
                                on_puback(&mut m, c, &sh, pkid, reason_code);
                            }
                            Packet::SubAck { pkid, return_codes } => {
                                let refused = m.on_suback(pkid, &return_codes) == Some(false);
                                stats
                                    .subscribe_refused
                                    .fetch_add(u64::from(refused), Ordering::Relaxed);
                            }
                            Packet::Publish {
                                qos,
                                topic,
                                pkid,
                                payload,
                                ..
                            } => {
                                inbound(&mut m, &sh, &topic, &payload);
                                publish_device_state(&m, &device);
                                // The PUBACK only once the new state is on disk: a crash before
                                // it makes the head-end send the command again, never lose it.
                                if !persist_device(&mut m, &sh).await {
                                    lost = true;
                                } else if qos == QoS::AtLeastOnce {
                                    let acked =
                                        tokio::time::timeout(WRITE_TIMEOUT, c.writer.puback(pkid))
                                            .await;
                                    if acked.is_ok_and(|r| r.is_ok()) {
                                        c.last_write = Instant::now();
                                    } else {
                                        lost = true;
                                    }
                                }
                            }
                            Packet::Disconnect { .. } => lost = true,
                            _ => {}
                        }
                    }
                }
                Wake::Packet(Err(_)) => lost = true,
                Wake::Control(Some(Control::Event(kind))) => m.request_event(kind),
                Wake::Control(Some(Control::Theft(kind, share))) => {
                    m.start_bypass((sh.clock)(), Some(kind), share);
                }
                Wake::Control(Some(Control::PowerFail)) => m.power_fail((sh.clock)()),
                Wake::Control(Some(Control::PowerRestore)) => m.power_restore((sh.clock)()),
                Wake::Control(Some(Control::Command(topic, bytes))) => {
                    handle_command(&mut m, &sh, &topic, &bytes);
                    publish_device_state(&m, &device);
                }
                Wake::Control(Some(Control::Chunk(bytes))) => {
                    handle_chunk(&mut m, &sh, &bytes);
                    publish_device_state(&m, &device);
                }
                Wake::Control(None) => events_open = false,
                Wake::Granted(mark, true) => {
                    grant = None;
                    m.counters_granted(mark);
                }
                Wake::Granted(_, false) => {
                    grant = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    m.reservation_failed();
                }
                Wake::Phase => {}
            }
        }
        if lost {
            conn = None;
            m.on_disconnected();
            stats.connected.fetch_sub(1, Ordering::Relaxed);
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            let delay = backoff.next_delay(&mut rand::thread_rng());
            retry_at = Instant::now() + delay;
        }
    }

    if let Some(mut c) = conn.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.writer.disconnect()).await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
    MeterOutcome {
        id: m.id().clone(),
        counts: m.counts(),
        held: m.held(),
        gave_up,
    }
}

/// Persists `m`'s changed device state through the counter service; `true` when nothing is left
/// to persist.
async fn persist_device(m: &mut Meter, sh: &Shared) -> bool {
    let Some((generation, record)) = m.device_record() else {
        return !m.device_dirty();
    };
    let (tx, rx) = oneshot::channel();
    let req = Reservation {
        meter: m.id().clone(),
        mark: None,
        device: Some(record),
        reply: tx,
    };
    let ok = sh.reservations.send(req).is_ok() && rx.await.unwrap_or(false);
    if ok {
        m.device_persisted(generation);
    } else {
        m.device_persist_failed();
    }
    ok
}

fn publish_device_state(m: &Meter, tx: &watch::Sender<DeviceState>) {
    let now = m.device_state();
    tx.send_if_modified(|s| {
        if *s == now {
            false
        } else {
            *s = now;
            true
        }
    });
}

/// A PUBLISH from the head-end.
fn inbound(m: &mut Meter, sh: &Shared, topic: &str, payload: &[u8]) {
    if topic == m.firmware_topic() {
        handle_chunk(m, sh, payload);
    } else if topic == m.commands_topic() {
        handle_command(m, sh, topic, payload);
    } else {
        sh.stats
            .unexpected_publishes
            .fetch_add(1, Ordering::Relaxed);
    }
}

fn handle_command(m: &mut Meter, sh: &Shared, topic: &str, payload: &[u8]) {
    sh.stats.commands_received.fetch_add(1, Ordering::Relaxed);
    let outcome = m.on_command(topic, payload, (sh.clock)());
    let counter = match outcome {
        CommandOutcome::Executed { .. } => &sh.stats.commands_executed,
        CommandOutcome::Refused { .. } => &sh.stats.commands_refused,
        CommandOutcome::AwaitingImage { .. } => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn handle_chunk(m: &mut Meter, sh: &Shared, payload: &[u8]) {
    sh.stats.firmware_chunks.fetch_add(1, Ordering::Relaxed);
    match m.on_firmware_chunk(payload, (sh.clock)()) {
        ChunkOutcome::Installed(_) => {
            sh.stats.commands_executed.fetch_add(1, Ordering::Relaxed);
        }
        ChunkOutcome::Refused { .. } => {
            sh.stats.commands_refused.fetch_add(1, Ordering::Relaxed);
        }
        ChunkOutcome::Ignored(_) | ChunkOutcome::Stored { .. } => {}
    }
}

fn on_puback(m: &mut Meter, c: &mut Conn, sh: &Shared, pkid: u16, reason_code: u8) {
    let stats = &sh.stats;
    let Some(acked) = m.on_puback(pkid, reason_code) else {
        stats.unexpected_acks.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let sent_at = c
        .inflight
        .iter()
        .position(|(p, _, _)| *p == pkid)
        .and_then(|i| c.inflight.remove(i))
        .map(|(_, t, _)| t);
    let kind = acked.message.kind;
    if kind.is_genuine() {
        if acked.accepted() {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = sent_at {
                stats.latency.record(t.elapsed());
            }
        } else {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ob) = &sh.outbox {
            let done = ob
                .lock()
                .map_err(|_| ())
                .and_then(|mut o| o.record_done(m.id(), acked.message.counter).map_err(|_| ()));
            if done.is_err() {
                stats.state_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    } else if acked.accepted() {
        stats.misbehaviour_acked.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.misbehaviour_rejected.fetch_add(1, Ordering::Relaxed);
    }
}
