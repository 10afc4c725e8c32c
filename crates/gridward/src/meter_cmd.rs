//! `gridward meter ...`: simulated meters on the command line.
//!
//! - `gridward meter sign`: signs a document from stdin into an envelope (for other tools).
//! - `gridward meter run`: runs a fleet of the meters issued in a PKI directory against a head-end.
//!
//! Argument parsing, the clock, the tokio runtime and printing only; the meters are
//! `gridward_meter`.

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gridward_core::MeterId;
use gridward_core::document::{EventKind, Format, parse_timestamp};
use gridward_core::envelope::SigningKey;
use gridward_meter::concentrator::{
    ConcentratorIdentity, ConcentratorSpec, DEFAULT_BATCH, ForeignRelay, PlcLoss, RelayConfig,
};
use gridward_meter::fleet::{Clock, Fleet, FleetConfig, FleetReport, MeterSpec};
use gridward_meter::identity::{self, MeterIdentity, Trust};
use gridward_meter::scenario::{Behaviour, DEFAULT_METERED_SHARE, GroundTruth};
use gridward_meter::sign::{SignOptions, sign_document};
use gridward_meter::stats::StatsSnapshot;
use gridward_mqtt::client::Protocol;
use gridward_pki::tls::TlsOptions;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use time::OffsetDateTime;

/// Simulated meters: sign a document, or run a fleet against a head-end.
#[derive(Debug, Args)]
pub struct MeterArgs {
    #[command(subcommand)]
    command: MeterCommand,
}

#[derive(Debug, Subcommand)]
enum MeterCommand {
    /// Sign a reading or event document read from stdin; write the envelope (COSE_Sign1) to stdout.
    Sign(SignArgs),
    /// Run the meters issued in a PKI directory against a head-end (MQTT over mutual TLS).
    Run(Box<RunArgs>),
}

/// Document format of a meter's messages (`gridward meter`, `gridward bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FormatArg {
    /// application/xml (EnergyUsageReport / MeterEvent).
    Xml,
    /// application/json.
    Json,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Xml => Format::Xml,
            FormatArg::Json => Format::Json,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MqttArg {
    /// MQTT 3.1.1 (refusals are acknowledged like acceptances).
    #[value(name = "3.1.1")]
    V311,
    /// MQTT 5 (refusals carry a PUBACK reason code).
    #[value(name = "5")]
    V5,
}

#[derive(Debug, Args)]
#[command(after_help = "\
The document is checked before signing: its MeterID must be --meter, its Timestamp is the \
envelope's (and must equal --timestamp if given); the topic follows from the document kind. \
--unchecked signs the bytes as they are (needs --timestamp and, unless detectable, --format).

Example:
  echo '<EnergyUsageReport><MeterID>M1</MeterID><Timestamp>2025-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>' \\
    | gridward meter sign --key pki/meters/M1/key.pem --meter M1 --counter 42 --out msg.cose")]
struct SignArgs {
    /// The meter's private key (PKCS#8 PEM, e.g. DIR/meters/{id}/key.pem).
    #[arg(long, value_name = "KEY.pem")]
    key: PathBuf,
    /// The meter id.
    #[arg(long, value_name = "ID")]
    meter: String,
    /// The message counter. It must be greater than every counter this meter used before.
    #[arg(long, value_name = "N")]
    counter: u64,
    /// The MQTT topic the envelope is bound to [default: meters/{id}/readings or .../events].
    #[arg(long, value_name = "T")]
    topic: Option<String>,
    /// Envelope timestamp: seconds since the epoch or RFC 3339 [default: the document's].
    #[arg(long, value_name = "SECS")]
    timestamp: Option<String>,
    /// Document format [default: detected from the first character].
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Sign without parsing or checking the document.
    #[arg(long)]
    unchecked: bool,
    /// Write the envelope to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write the envelope as hex (one line) instead of binary.
    #[arg(long)]
    hex: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Meters are the ones in DIR/meters/ with a key, sorted by id, filtered by --prefix; issue them with \
`gridward pki issue meter --dir DIR --count N --prefix P` (ids {prefix}{n:06}).
Counters and unacknowledged messages persist in --state (default DIR/meter-state), so a later run \
never reuses a counter and resends what was not acknowledged.
Commands: the meters pin the command signers the PKI lists now (DIR/command-signers, during a \
rotation the superseded certificate too, never a revoked or expired one) and execute only \
commands signed by one of them, for themselves, with a counter above the last executed one and \
before expiry; each answers with a signed acknowledgement. Firmware manifests must be signed by \
a --manufacturer-key; without one every update is refused.

Behaviours with ground truth (for scoring detection; each is printed as a JSON line when it takes \
effect, and written to --ground-truth FILE):
  --thief m000001@60            cover opened at 60 s, then half the load bypasses the meter
  --outage m0000@30+60          the meters whose id starts with m0000 lose power at 30 s (last \
gasps within --outage-spread), come back 60 s later; or a list: --outage m000001,m000002@30+60
  --clone m000003@10            a second device with m000003's certificate and key connects too
  --brute-force 127.0.0.9@20    a device without a certificate tries 20 connections from \
127.0.0.9 at 20 s

Concentrator: --concentrator dc-1 --plc-meters 50 puts the first 50 selected meters behind \
concentrator dc-1 (DIR/concentrators/dc-1/, issued by `gridward pki issue concentrator --name \
dc-1`): they do not connect; each signs its own envelopes, which dc-1 relays in batches on \
concentrators/dc-1/relay over its own connection. The rest of the selected meters connect \
directly. Example:
  gridward meter run --dir pki --count 60 --concentrator dc-1 --plc-meters 50 \
    --plc-loss m000007@20+30 --alter-relay=40 --relay-for m000099@45")]
struct RunArgs {
    /// The PKI directory holding the meters' keys and certificates.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Head-end host.
    #[arg(long, value_name = "H", default_value = "127.0.0.1")]
    host: String,
    /// Head-end MQTT/TLS port.
    #[arg(long, value_name = "P", default_value_t = 8883)]
    port: u16,
    /// Name the server certificate must carry [default: --host].
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Number of meters [default: every meter matching --prefix].
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Only meters whose id starts with this.
    #[arg(long, value_name = "P", default_value = "")]
    prefix: String,
    /// Seconds between readings of each meter (fractions allowed).
    #[arg(long, value_name = "S", default_value_t = 60.0)]
    interval: f64,
    /// Stop after this many seconds [default: run until Ctrl-C].
    #[arg(long, value_name = "S")]
    duration: Option<f64>,
    /// Seconds to wait at the end for outstanding acknowledgements.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    drain: f64,
    /// Document format.
    #[arg(long, value_enum, default_value = "xml")]
    format: FormatArg,
    /// MQTT version.
    #[arg(long, value_enum, default_value = "5")]
    mqtt: MqttArg,
    /// State directory (counters, outbox) [default: DIR/meter-state].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// First connections per second (connects are staggered).
    #[arg(long, value_name = "R", default_value_t = 500.0)]
    connect_rate: f64,
    /// MQTT keep-alive in seconds.
    #[arg(long, value_name = "S", default_value_t = 60)]
    keep_alive: u64,
    /// Seed of the load curves.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Messages in flight per meter.
    #[arg(long, value_name = "N", default_value_t = 8)]
    inflight: usize,
    /// Do not keep unacknowledged messages on disk.
    #[arg(long)]
    no_outbox: bool,
    /// Have a meter report an event SECONDS after the start (default 1): METER:KIND[@SECONDS],
    /// KIND one of CoverOpened, MagneticField, PowerFail, PowerRestore, ReverseEnergy
    /// (e.g. `--event m000001:CoverOpened@30`). Repeatable.
    #[arg(long = "event", value_name = "METER:KIND[@S]", value_parser = parse_event_request)]
    events: Vec<EventRequest>,
    /// A manufacturer public key firmware manifests must be signed with (SPKI PEM, from
    /// `gridward firmware keygen`). Repeatable.
    #[arg(long = "manufacturer-key", value_name = "FILE")]
    manufacturer_keys: Vec<PathBuf>,
    /// A thief: METER[:KIND][@SECONDS] (default CoverOpened, 1 s). At that time the meter signs
    /// the tamper event (KIND one of CoverOpened, TerminalCoverOpened, MagneticField), then only
    /// half of its load is metered for the rest of the run. Repeatable.
    #[arg(long = "thief", value_name = "METER[:KIND][@S]", value_parser = parse_thief)]
    thieves: Vec<ThiefRequest>,
    /// A feeder outage: PREFIX_OR_LIST@SECONDS[+DURATION]. The meters whose id starts with
    /// PREFIX (or those of a comma-separated list; a concentrator id included makes the
    /// concentrator fail too) each sign a PowerFail (last gasp) within --outage-spread of
    /// SECONDS, take no readings (their registers stand still) and, DURATION seconds later,
    /// sign a PowerRestore and resume. Without +DURATION the power stays off. Repeatable.
    #[arg(long = "outage", value_name = "PREFIX|LIST@S[+D]", value_parser = parse_outage)]
    outages: Vec<OutageRequest>,
    /// Seconds over which an outage's last gasps (and its restores) are spread.
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    outage_spread: f64,
    /// A cloned meter: METER[@SECONDS] (default 0). A second device with the meter's
    /// certificate and key connects alongside it, with its own counter: the head-end's takeover
    /// rule drops the two in turn, and reused counters are refused as replays. Repeatable.
    #[arg(long = "clone", value_name = "METER[@S]", value_parser = parse_clone)]
    clones: Vec<CloneRequest>,
    /// A brute-forcing source: IP[@SECONDS] (default 0). From that local address (e.g.
    /// 127.0.0.9: all of 127.0.0.0/8 is loopback) a device with no certificate of the PKI tries
    /// --brute-force-attempts connections as the first selected meter, one every
    /// --brute-force-interval: each is refused, and a head-end bans the source and raises a
    /// refusal burst on it. Repeatable.
    #[arg(long = "brute-force", value_name = "IP[@S]", value_parser = parse_brute_force)]
    brute_forces: Vec<BruteForceRequest>,
    /// Connections each brute-forcing source tries.
    #[arg(long, value_name = "N", default_value_t = 20)]
    brute_force_attempts: u32,
    /// Seconds between two connections of a brute-forcing source.
    #[arg(long, value_name = "S", default_value_t = 0.5)]
    brute_force_interval: f64,
    /// Write the ground truth of the behaviours to FILE at the end, one JSON object a line.
    #[arg(long, value_name = "FILE")]
    ground_truth: Option<PathBuf>,
    /// Simulate data concentrator ID (its certificate and key in DIR/concentrators/ID/) with
    /// the first --plc-meters selected meters behind it.
    #[arg(long, value_name = "ID")]
    concentrator: Option<String>,
    /// Meters behind the concentrator (the first N selected) [default: all selected].
    #[arg(long, value_name = "N", requires = "concentrator")]
    plc_meters: Option<usize>,
    /// Most envelopes per relay batch (1..=64).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH, requires = "concentrator")]
    batch: usize,
    /// Seconds an envelope waits at most for its relay batch to fill.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 0.2,
        requires = "concentrator"
    )]
    linger: f64,
    /// The concentrator loses a PLC meter: METER@SECONDS[+DURATION]. It reports MeterLost (and
    /// MeterFound after DURATION); meanwhile the meter's messages do not get through (they wait
    /// in the meter). Repeatable.
    #[arg(long = "plc-loss", value_name = "METER@S[+D]", value_parser = parse_plc_loss, requires = "concentrator")]
    plc_losses: Vec<PlcLossRequest>,
    /// Tamper test: at SECONDS (default 2) the concentrator relays a copy of one relayed
    /// envelope with one byte flipped (the head-end must refuse it).
    #[arg(long, value_name = "S", num_args = 0..=1, default_missing_value = "2", requires = "concentrator")]
    alter_relay: Option<f64>,
    /// Tamper test: METER[@SECONDS] (default 2): the concentrator relays one envelope of METER,
    /// a meter of DIR not behind it (signed with its key from DIR), which the head-end must
    /// refuse. METER must not be in this run otherwise.
    #[arg(long, value_name = "METER[@S]", value_parser = parse_clone, requires = "concentrator")]
    relay_for: Option<CloneRequest>,
}

/// `--thief METER[:KIND][@SECONDS]`
#[derive(Debug, Clone, PartialEq)]
struct ThiefRequest {
    meter: MeterId,
    kind: EventKind,
    after: Duration,
}

/// Which meters an outage takes down.
#[derive(Debug, Clone, PartialEq)]
enum OutageTarget {
    /// Every meter (and concentrator) whose id starts with this.
    Prefix(String),
    /// These.
    List(Vec<MeterId>),
}

/// `--outage PREFIX_OR_LIST@SECONDS[+DURATION]`
#[derive(Debug, Clone, PartialEq)]
struct OutageRequest {
    spec: String,
    target: OutageTarget,
    after: Duration,
    duration: Option<Duration>,
}

/// `--brute-force IP[@SECONDS]`
#[derive(Debug, Clone, PartialEq)]
struct BruteForceRequest {
    source: std::net::IpAddr,
    after: Duration,
}

fn parse_brute_force(s: &str) -> Result<BruteForceRequest, String> {
    let (ip, after) = match s.rsplit_once('@') {
        Some((ip, secs)) => (ip, parse_secs(secs)?),
        None => (s, Duration::ZERO),
    };
    let source = ip.parse().map_err(|_| {
        format!("{ip:?} is not an IP address; expected IP[@SECONDS], e.g. 127.0.0.9@30")
    })?;
    Ok(BruteForceRequest { source, after })
}

/// `--clone METER[@SECONDS]`, `--relay-for METER[@SECONDS]`
#[derive(Debug, Clone, PartialEq)]
struct CloneRequest {
    meter: MeterId,
    after: Option<Duration>,
}

/// `--plc-loss METER@SECONDS[+DURATION]`
#[derive(Debug, Clone, PartialEq)]
struct PlcLossRequest {
    meter: MeterId,
    after: Duration,
    duration: Option<Duration>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{secs} is not a non-negative number of seconds"))
}

/// `SECONDS[+DURATION]`
fn parse_window(s: &str) -> Result<(Duration, Option<Duration>), String> {
    match s.split_once('+') {
        Some((at, d)) => Ok((parse_secs(at)?, Some(parse_secs(d)?))),
        None => Ok((parse_secs(s)?, None)),
    }
}

fn parse_meter(s: &str) -> Result<MeterId, String> {
    MeterId::new(s).map_err(|e| format!("meter {s:?}: {e}"))
}

fn parse_thief(s: &str) -> Result<ThiefRequest, String> {
    let (spec, after) = match s.rsplit_once('@') {
        Some((spec, secs)) => (spec, parse_secs(secs)?),
        None => (s, Duration::from_secs(1)),
    };
    let (meter, kind) = match spec.split_once(':') {
        Some((meter, kind)) => {
            let kind = kind
                .parse::<EventKind>()
                .ok()
                .filter(|k| TAMPER_KINDS.contains(k))
                .ok_or_else(|| {
                    format!(
                        "event {kind:?}: one of {}",
                        TAMPER_KINDS.map(EventKind::as_str).join(", ")
                    )
                })?;
            (meter, kind)
        }
        None => (spec, EventKind::CoverOpened),
    };
    Ok(ThiefRequest {
        meter: parse_meter(meter)?,
        kind,
        after,
    })
}

/// The events a thief may sign first.
const TAMPER_KINDS: [EventKind; 3] = [
    EventKind::CoverOpened,
    EventKind::TerminalCoverOpened,
    EventKind::MagneticField,
];

fn parse_outage(s: &str) -> Result<OutageRequest, String> {
    let (spec, window) = s
        .rsplit_once('@')
        .ok_or_else(|| "expected PREFIX_OR_LIST@SECONDS[+DURATION], e.g. m0000@30+60".to_owned())?;
    let (after, duration) = parse_window(window)?;
    let target = if spec.contains(',') {
        let ids = spec
            .split(',')
            .filter(|p| !p.is_empty())
            .map(parse_meter)
            .collect::<Result<Vec<_>, _>>()?;
        OutageTarget::List(ids)
    } else if spec.is_empty() {
        return Err("an empty prefix would take down every meter; name a prefix or a list".into());
    } else {
        OutageTarget::Prefix(spec.to_owned())
    };
    Ok(OutageRequest {
        spec: spec.to_owned(),
        target,
        after,
        duration,
    })
}

fn parse_clone(s: &str) -> Result<CloneRequest, String> {
    match s.rsplit_once('@') {
        Some((meter, secs)) => Ok(CloneRequest {
            meter: parse_meter(meter)?,
            after: Some(parse_secs(secs)?),
        }),
        None => Ok(CloneRequest {
            meter: parse_meter(s)?,
            after: None,
        }),
    }
}

fn parse_plc_loss(s: &str) -> Result<PlcLossRequest, String> {
    let (meter, window) = s
        .rsplit_once('@')
        .ok_or_else(|| "expected METER@SECONDS[+DURATION], e.g. m000007@20+30".to_owned())?;
    let (after, duration) = parse_window(window)?;
    Ok(PlcLossRequest {
        meter: parse_meter(meter)?,
        after,
        duration,
    })
}

impl OutageRequest {
    /// The ids of `all` this outage takes down, in order.
    fn resolve(&self, all: &[MeterId]) -> Vec<MeterId> {
        match &self.target {
            OutageTarget::Prefix(p) => all
                .iter()
                .filter(|m| m.as_str().starts_with(p.as_str()))
                .cloned()
                .collect(),
            OutageTarget::List(ids) => ids.iter().filter(|m| all.contains(m)).cloned().collect(),
        }
    }
}

/// `--event METER:KIND[@SECONDS]`
#[derive(Debug, Clone, PartialEq)]
struct EventRequest {
    meter: MeterId,
    kind: EventKind,
    after: Duration,
}

fn parse_event_request(s: &str) -> Result<EventRequest, String> {
    let (spec, after) = match s.rsplit_once('@') {
        Some((spec, secs)) => {
            let secs: f64 = secs
                .parse()
                .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
            let after = Duration::try_from_secs_f64(secs)
                .map_err(|_| format!("{secs} is not a non-negative number of seconds"))?;
            (spec, after)
        }
        None => (s, Duration::from_secs(1)),
    };
    let (meter, kind) = spec
        .split_once(':')
        .ok_or_else(|| "expected METER:KIND[@SECONDS], e.g. m000001:CoverOpened@30".to_owned())?;
    let meter = MeterId::new(meter).map_err(|e| format!("meter {meter:?}: {e}"))?;
    let kind = kind.parse::<EventKind>().map_err(|_| {
        format!(
            "event {kind:?}: one of {}",
            EventKind::ALL.map(EventKind::as_str).join(", ")
        )
    })?;
    Ok(EventRequest { meter, kind, after })
}

/// Runs `gridward meter ...`.
pub fn run(args: MeterArgs) -> Result<()> {
    match args.command {
        MeterCommand::Sign(a) => sign(a),
        MeterCommand::Run(a) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run_fleet(*a))
        }
    }
}

fn sign(a: SignArgs) -> Result<()> {
    let pem = fs::read_to_string(&a.key).with_context(|| format!("reading {}", a.key.display()))?;
    let key =
        SigningKey::from_pkcs8_pem(&pem).with_context(|| format!("loading {}", a.key.display()))?;
    let meter = MeterId::new(&a.meter).with_context(|| format!("meter id {:?}", a.meter))?;
    let timestamp = a.timestamp.as_deref().map(parse_seconds).transpose()?;
    let mut doc = Vec::new();
    std::io::stdin()
        .read_to_end(&mut doc)
        .context("reading the document from stdin")?;
    let opts = SignOptions {
        topic: a.topic,
        timestamp,
        format: a.format.map(Format::from),
        unchecked: a.unchecked,
    };
    let signed = sign_document(&key, &meter, a.counter, &doc, &opts)?;
    let bytes = if a.hex {
        format!("{}\n", hex::encode(&signed.envelope)).into_bytes()
    } else {
        signed.envelope
    };
    match a.out {
        Some(path) => {
            fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            let mut out = std::io::stdout().lock();
            if !a.hex && out.is_terminal() {
                bail!("refusing to write binary to a terminal; use --out FILE or --hex");
            }
            out.write_all(&bytes).context("writing to stdout")?;
            out.flush().context("writing to stdout")?;
        }
    }
    eprintln!(
        "signed {} bytes for meter {meter}, counter {}, topic {}, timestamp {} ({})",
        doc.len(),
        a.counter,
        signed.topic,
        signed.timestamp,
        signed.format
    );
    Ok(())
}

/// Seconds since the epoch, or an RFC 3339 time.
fn parse_seconds(s: &str) -> Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    Ok(parse_timestamp(s)
        .with_context(|| {
            format!("--timestamp {s:?}: neither seconds since the epoch nor RFC 3339")
        })?
        .unix_timestamp())
}

fn seconds(name: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow::anyhow!("{name} {s}: expected a non-negative number of seconds"))
}

async fn run_fleet(a: RunArgs) -> Result<()> {
    let interval = seconds("--interval", a.interval)?;
    if !(Duration::from_millis(10)..=Duration::from_secs(7 * 86_400)).contains(&interval) {
        bail!(
            "--interval {}: between 0.01 s and a week (604800 s)",
            a.interval
        );
    }
    let duration = a.duration.map(|d| seconds("--duration", d)).transpose()?;
    let drain = seconds("--drain", a.drain)?;
    let ids = match a.count {
        Some(n) => identity::select_meters(&a.dir, &a.prefix, n)?,
        None => identity::list_meters(&a.dir, &a.prefix)?,
    };
    if ids.is_empty() {
        bail!(
            "no meters with keys in {} (prefix {:?}); issue some with `gridward pki issue meter --dir {} --count N --prefix P`",
            a.dir.join("meters").display(),
            a.prefix,
            a.dir.display()
        );
    }
    crate::sys::check_nofile(crate::sys::raise_nofile(), ids.len() + 16)?;
    let trust = Trust::load_at(&a.dir, OffsetDateTime::now_utc())?;
    let command_signers = trust.command_signers().to_vec();
    let manufacturer_keys =
        identity::load_manufacturer_keys(&a.manufacturer_keys).context("--manufacturer-key")?;
    let tls_opts = TlsOptions::default();
    let concentrator = a
        .concentrator
        .as_deref()
        .map(|c| MeterId::new(c).with_context(|| format!("--concentrator {c:?}")))
        .transpose()?;
    let plc_count = match &concentrator {
        Some(_) => {
            let n = a.plc_meters.unwrap_or(ids.len());
            if n > ids.len() {
                bail!(
                    "--plc-meters {n}: only {} meters are selected (--count, --prefix)",
                    ids.len()
                );
            }
            n
        }
        None => 0,
    };
    let concentrator_identity = concentrator
        .as_ref()
        .map(|c| {
            ConcentratorIdentity::load(&a.dir, c, &trust, &tls_opts).with_context(|| {
                format!(
                    "loading concentrator {c} (issue it with `gridward pki issue concentrator --dir {} --name {c}`)",
                    a.dir.display()
                )
            })
        })
        .transpose()?;
    let foreign = match &a.relay_for {
        Some(r) => {
            if ids.contains(&r.meter) {
                bail!(
                    "--relay-for {}: that meter is in this run; name one that is not",
                    r.meter
                );
            }
            let identity = MeterIdentity::load(&a.dir, &r.meter, &trust, &tls_opts)
                .with_context(|| format!("--relay-for {}", r.meter))?;
            Some(ForeignRelay {
                identity,
                after: r.after.unwrap_or(Duration::from_secs(2)),
            })
        }
        None => None,
    };
    let mut clone_identities = Vec::with_capacity(a.clones.len());
    for c in &a.clones {
        if !ids[plc_count..].contains(&c.meter) {
            bail!(
                "--clone {}: not a directly connected meter of this run (PLC meters do not connect)",
                c.meter
            );
        }
        let identity = MeterIdentity::load(&a.dir, &c.meter, &trust, &tls_opts)
            .with_context(|| format!("--clone {}", c.meter))?;
        clone_identities.push((identity, c.after.unwrap_or(Duration::ZERO)));
    }
    let outsider = if a.brute_forces.is_empty() {
        None
    } else {
        Some(trust.outsider_config().map_err(|e| {
            anyhow::anyhow!(
                "--brute-force: a TLS configuration trusting {}: {e}",
                a.dir.display()
            )
        })?)
    };
    let bar = progress_bar(ids.len() as u64, "loading meters");
    let mut loaded = {
        let bar = bar.clone();
        let dir = a.dir.clone();
        let ids = ids.clone();
        tokio::task::spawn_blocking(move || {
            identity::load_many(&dir, &ids, &trust, &TlsOptions::default(), &|n| {
                bar.set_position(n as u64)
            })
        })
        .await
        .context("loading meters")??
    };
    bar.finish_and_clear();

    let clock: Clock = Arc::new(OffsetDateTime::now_utc);
    let state = a.state.clone().unwrap_or_else(|| a.dir.join("meter-state"));
    let mut config = FleetConfig::new(a.host.clone(), a.port, &state, clock);
    if let Some(name) = a.server_name {
        config.server_name = name;
    }
    config.protocol = match a.mqtt {
        MqttArg::V311 => Protocol::V311,
        MqttArg::V5 => Protocol::V5,
    };
    config.keep_alive = Duration::from_secs(a.keep_alive);
    config.connect_rate = a.connect_rate;
    config.interval = time::Duration::try_from(interval).context("--interval")?;
    config.format = a.format.into();
    config.seed = a.seed;
    config.max_inflight = a.inflight.max(1);
    config.outbox = !a.no_outbox;
    config.command_signers = command_signers;
    config.manufacturer_keys = manufacturer_keys;
    let n = loaded.len();
    let signers = config.command_signers.len();

    // Behaviours with ground truth.
    let mut all_ids = ids.clone();
    all_ids.extend(concentrator.iter().cloned());
    let mut behaviours = Vec::new();
    for t in &a.thieves {
        if !ids.contains(&t.meter) {
            bail!("--thief {}: not a meter of this run", t.meter);
        }
        behaviours.push(Behaviour::Theft {
            meter: t.meter.clone(),
            after: t.after,
            event: t.kind,
            metered_share: DEFAULT_METERED_SHARE,
        });
    }
    let spread = seconds("--outage-spread", a.outage_spread)?;
    for o in &a.outages {
        let meters = o.resolve(&all_ids);
        if meters.is_empty() {
            bail!("--outage {}: matches no meter of this run", o.spec);
        }
        behaviours.push(Behaviour::Outage {
            name: o.spec.clone(),
            meters,
            after: o.after,
            duration: o.duration,
            spread,
        });
    }
    for (identity, after) in clone_identities {
        behaviours.push(Behaviour::Clone { identity, after });
    }
    if let Some(tls) = outsider {
        if a.brute_force_attempts == 0 {
            bail!("--brute-force-attempts must be at least 1");
        }
        let interval = seconds("--brute-force-interval", a.brute_force_interval)?;
        let client_id = ids.first().map(MeterId::to_string).unwrap_or_default();
        for b in &a.brute_forces {
            behaviours.push(Behaviour::BruteForce {
                source: b.source,
                after: b.after,
                attempts: a.brute_force_attempts,
                interval,
                client_id: client_id.clone(),
                tls: Arc::clone(&tls),
            });
        }
    }
    let plc: Vec<MeterIdentity> = loaded.drain(..plc_count).collect();
    let concentrators = match concentrator_identity {
        Some(identity) => {
            let plc_ids: Vec<MeterId> = plc.iter().map(|m| m.id().clone()).collect();
            let mut spec =
                ConcentratorSpec::new(identity, plc.into_iter().map(MeterSpec::from).collect());
            spec.relay = RelayConfig {
                max_items: a.batch.clamp(1, gridward_core::relay::MAX_RELAY_ITEMS),
                linger: time::Duration::try_from(seconds("--linger", a.linger)?)
                    .context("--linger")?,
                ..RelayConfig::default()
            };
            for l in &a.plc_losses {
                if !plc_ids.contains(&l.meter) {
                    bail!(
                        "--plc-loss {}: not a PLC meter of the concentrator",
                        l.meter
                    );
                }
                spec.plc_losses.push(PlcLoss {
                    meter: l.meter.clone(),
                    after: l.after,
                    duration: l.duration,
                });
            }
            spec.alter_relay_after = a
                .alter_relay
                .map(|s| seconds("--alter-relay", s))
                .transpose()?;
            spec.relay_for = foreign;
            vec![spec]
        }
        None => Vec::new(),
    };
    let direct = loaded.len();
    let fleet = Fleet::start_with(
        loaded.into_iter().map(MeterSpec::from).collect(),
        concentrators,
        behaviours,
        config,
    )
    .await
    .with_context(|| format!("starting {n} meters (state in {})", state.display()))?;
    if let Some(c) = &concentrator {
        eprintln!(
            "concentrator {c}: {plc_count} PLC meters behind it, relay batches of up to {} envelopes on concentrators/{c}/relay; {direct} meters connect directly",
            a.batch
        );
    }
    eprintln!(
        "{n} meters ({}…{}) → {}:{}, a reading every {} s each, state in {}; {} command signer(s) pinned, {} manufacturer key(s)",
        ids.first().map(MeterId::as_str).unwrap_or_default(),
        ids.last().map(MeterId::as_str).unwrap_or_default(),
        a.host,
        a.port,
        a.interval,
        state.display(),
        signers,
        a.manufacturer_keys.len()
    );

    let bar = ProgressBar::new_spinner();
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let started = tokio::time::Instant::now();
    let deadline = duration.map(|d| started + d);
    for e in &a.events {
        if !ids.contains(&e.meter) {
            eprintln!(
                "warning: --event for {}, which is not in this fleet",
                e.meter
            );
        }
    }
    let mut events = a.events.clone();
    let mut truth_seen = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last = (started, 0u64);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let now = tokio::time::Instant::now();
        events.retain(|e| {
            if now < started + e.after {
                return true;
            }
            if fleet.request_event(&e.meter, e.kind) {
                bar.println(format!("{}: {} event requested", e.meter, e.kind));
            }
            false
        });
        let truth = fleet.ground_truth();
        for g in truth.iter().skip(truth_seen) {
            bar.println(format!("ground truth: {}", g.to_json()));
        }
        truth_seen = truth_seen.max(truth.len());
        let s = fleet.stats().snapshot();
        let rate = (s.acked - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        if now - last.0 >= Duration::from_secs(1) {
            last = (now, s.acked);
        }
        let lat = fleet.stats().latency.summary();
        bar.set_message(format!(
            "connected {}/{n} | sent {} | acked {} | rejected {} | failures {} | {:.0} acks/s | p50 {} p99 {}",
            s.connected,
            s.sent,
            s.acked,
            s.rejected + s.misbehaviour_rejected,
            s.connect_failures + s.disconnects,
            rate,
            ms(lat.p50),
            ms(lat.p99),
        ));
        bar.tick();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
    }
    bar.set_message(format!(
        "stopping: waiting up to {} s for acknowledgements",
        a.drain
    ));
    let rss_running = rss();
    let report = fleet.stop(drain).await;
    bar.finish_and_clear();
    print_report(&report, n, rss_running);
    if let Some(path) = &a.ground_truth {
        write_ground_truth(path, &report.ground_truth)?;
        eprintln!(
            "ground truth: {} entries written to {}",
            report.ground_truth.len(),
            path.display()
        );
    }
    Ok(())
}

fn write_ground_truth(path: &Path, truth: &[GroundTruth]) -> Result<()> {
    let mut out = String::new();
    for g in truth {
        out.push_str(&g.to_json());
        out.push('\n');
    }
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} ({{eta}})"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Resident set size and its peak, in KiB, from /proc/self/status (Linux).
fn rss() -> Option<(u64, u64)> {
    let status = fs::read_to_string(Path::new("/proc/self/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn print_report(r: &FleetReport, meters: usize, rss_running: Option<(u64, u64)>) {
    let s: &StatsSnapshot = &r.stats;
    let secs = r.elapsed.as_secs_f64().max(1e-3);
    let unacked: usize = r.meters.iter().map(|m| m.held).sum();
    println!("meters            {meters} ({} gave up)", s.gave_up);
    println!(
        "connections       {} made, {} failed attempts, {} lost",
        s.connects, s.connect_failures, s.disconnects
    );
    println!(
        "readings / events {} / {} signed ({} skipped, queue full)",
        s.readings, s.events, s.skipped
    );
    println!(
        "published         {} ({} resends after reconnect, {} restored from an earlier run)",
        s.sent, s.resent, s.restored
    );
    println!(
        "acknowledged      {} accepted, {} refused, {} unacknowledged at the end{}",
        s.acked,
        s.rejected,
        unacked,
        if unacked > 0 {
            " (kept for the next run)"
        } else {
            ""
        }
    );
    if s.misbehaviour_sent > 0 {
        println!(
            "misbehaviour      {} sent, {} refused, {} acknowledged",
            s.misbehaviour_sent, s.misbehaviour_rejected, s.misbehaviour_acked
        );
    }
    println!(
        "commands          {} received, {} executed, {} refused, {} acknowledgements signed",
        s.commands_received, s.commands_executed, s.commands_refused, s.command_acks
    );
    println!(
        "throughput        {:.1} acknowledged readings/s over {:.1} s",
        s.acked as f64 / secs,
        secs
    );
    let l = &r.latency;
    println!(
        "latency           publish → PUBACK: p50 {}, p90 {}, p99 {}, max {} ({} samples)",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.max),
        l.count
    );
    println!(
        "counter writes    {} (fsync'd), {} state errors",
        s.counter_writes, s.state_errors
    );
    for c in &r.concentrators {
        let cs = &c.stats;
        println!(
            "concentrator      {}: {} PLC meters, {} connects, {} lost; {} envelopes relayed in {} batches ({} resent); {} batches acked ({} envelopes), {} refused ({} envelopes); own events {} signed, {} acked, {} refused; tamper tests {} sent, {} refused; {} unacknowledged at the end",
            c.id,
            c.meters.len(),
            cs.connects,
            cs.disconnects,
            cs.envelopes_relayed,
            cs.batches_sent,
            cs.batches_resent,
            cs.batches_acked,
            cs.envelopes_acked,
            cs.batches_refused,
            cs.envelopes_refused,
            cs.own_events,
            cs.own_acked,
            cs.own_refused,
            cs.probes_sent,
            cs.probes_refused,
            c.held
        );
    }
    if !r.clones.is_empty() {
        let c = &r.clone_stats;
        println!(
            "clones            {}: {} connects, {} lost, {} sent, {} accepted, {} refused",
            r.clones.len(),
            c.connects,
            c.disconnects,
            c.sent,
            c.acked,
            c.rejected
        );
    }
    for b in &r.brute_force {
        println!(
            "brute force       {}: {} connections tried, {} accepted",
            b.source, b.attempts, b.accepted
        );
    }
    for g in &r.ground_truth {
        println!("ground truth      {}", g.to_json());
    }
    if let Some((rss, peak)) = rss_running {
        println!(
            "memory            RSS {:.1} MiB before stopping ({:.1} KiB per meter), peak {:.1} MiB",
            rss as f64 / 1024.0,
            rss as f64 / meters.max(1) as f64,
            peak as f64 / 1024.0
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut all = vec!["meter-run", "--dir", "pki"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.run)
    }

    fn id(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    #[test]
    fn behaviours_parse_with_their_defaults() {
        let a = parse(&[
            "--thief",
            "m000001@60",
            "--thief",
            "m000002:TerminalCoverOpened",
            "--outage",
            "m0000@30+60",
            "--outage",
            "m000001,m000003@5.5",
            "--clone",
            "m000004",
            "--clone",
            "m000005@10",
            "--brute-force",
            "127.0.0.9@20",
            "--brute-force",
            "::1",
            "--ground-truth",
            "truth.jsonl",
        ])
        .unwrap();
        assert_eq!(
            a.brute_forces,
            [
                BruteForceRequest {
                    source: "127.0.0.9".parse().unwrap(),
                    after: Duration::from_secs(20)
                },
                BruteForceRequest {
                    source: "::1".parse().unwrap(),
                    after: Duration::ZERO
                },
            ]
        );
        assert_eq!((a.brute_force_attempts, a.brute_force_interval), (20, 0.5));
        let err = parse(&["--brute-force", "host.example@5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not an IP address"), "{err}");
        assert_eq!(
            a.thieves,
            [
                ThiefRequest {
                    meter: id("m000001"),
                    kind: EventKind::CoverOpened,
                    after: Duration::from_secs(60)
                },
                ThiefRequest {
                    meter: id("m000002"),
                    kind: EventKind::TerminalCoverOpened,
                    after: Duration::from_secs(1)
                },
            ]
        );
        assert_eq!(a.outages[0].target, OutageTarget::Prefix("m0000".into()));
        assert_eq!(a.outages[0].after, Duration::from_secs(30));
        assert_eq!(a.outages[0].duration, Some(Duration::from_secs(60)));
        assert_eq!(
            a.outages[1].target,
            OutageTarget::List(vec![id("m000001"), id("m000003")])
        );
        assert_eq!(a.outages[1].duration, None);
        assert_eq!(a.outages[1].after, Duration::from_millis(5500));
        assert_eq!(a.outage_spread, 3.0);
        assert_eq!(a.clones[0].after, None);
        assert_eq!(a.clones[1].after, Some(Duration::from_secs(10)));
        assert_eq!(a.ground_truth, Some(PathBuf::from("truth.jsonl")));
        // Without behaviours, nothing is scheduled.
        let a = parse(&[]).unwrap();
        assert!(a.thieves.is_empty() && a.outages.is_empty() && a.clones.is_empty());
        assert_eq!(a.concentrator, None);
    }

    #[test]
    fn bad_behaviours_are_refused() {
        for bad in [
            ["--thief", "m1:PowerFail@3"].as_slice(),
            &["--thief", "m1@-1"],
            &["--outage", "m0000"],
            &["--outage", "@30"],
            &["--outage", "m1,bad id@30"],
            &["--outage", "m1@30+x"],
            &["--concentrator", "dc-1", "--plc-loss", "m1"],
            &["--clone", "bad id"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn concentrator_options_parse_and_need_a_concentrator() {
        let a = parse(&[
            "--concentrator",
            "dc-1",
            "--plc-meters",
            "50",
            "--batch",
            "32",
            "--linger",
            "0.5",
            "--plc-loss",
            "m000007@20+30",
            "--plc-loss",
            "m000008@25",
            "--alter-relay",
            "--relay-for",
            "m000099@45",
        ])
        .unwrap();
        assert_eq!(a.concentrator.as_deref(), Some("dc-1"));
        assert_eq!((a.plc_meters, a.batch, a.linger), (Some(50), 32, 0.5));
        assert_eq!(
            a.plc_losses,
            [
                PlcLossRequest {
                    meter: id("m000007"),
                    after: Duration::from_secs(20),
                    duration: Some(Duration::from_secs(30))
                },
                PlcLossRequest {
                    meter: id("m000008"),
                    after: Duration::from_secs(25),
                    duration: None
                },
            ]
        );
        assert_eq!(a.alter_relay, Some(2.0));
        assert_eq!(
            a.relay_for,
            Some(CloneRequest {
                meter: id("m000099"),
                after: Some(Duration::from_secs(45))
            })
        );
        let a = parse(&["--concentrator", "dc-1", "--alter-relay=7"]).unwrap();
        assert_eq!(a.alter_relay, Some(7.0));
        assert_eq!(
            (a.plc_meters, a.batch, a.linger),
            (None, DEFAULT_BATCH, 0.2)
        );
        // The concentrator's options mean nothing without one.
        for alone in [
            ["--plc-meters", "5"].as_slice(),
            &["--batch", "4"],
            &["--plc-loss", "m1@3"],
            &["--alter-relay"],
            &["--relay-for", "m1"],
        ] {
            assert!(parse(alone).is_err(), "{alone:?}");
        }
    }

    #[test]
    fn outages_resolve_by_prefix_or_list() {
        let all: Vec<MeterId> = ["m000001", "m000002", "m000101", "dc-1"]
            .into_iter()
            .map(id)
            .collect();
        let o = parse_outage("m0000@1").unwrap();
        assert_eq!(o.resolve(&all), [id("m000001"), id("m000002")]);
        let o = parse_outage("m000101,dc-1,m999999@1+2").unwrap();
        assert_eq!(o.resolve(&all), [id("m000101"), id("dc-1")]);
        assert!(parse_outage("zzz@1").unwrap().resolve(&all).is_empty());
    }

    #[test]
    fn help_documents_every_new_option() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let help = cmd.render_long_help().to_string();
        for opt in [
            "--thief",
            "--outage",
            "--outage-spread",
            "--clone",
            "--ground-truth",
            "--concentrator",
            "--plc-meters",
            "--batch",
            "--linger",
            "--plc-loss",
            "--alter-relay",
            "--relay-for",
        ] {
            assert!(help.contains(opt), "{opt} missing from --help");
        }
    }
}
