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
use gridward_meter::fleet::{Clock, Fleet, FleetConfig, FleetReport, MeterSpec};
use gridward_meter::identity::{self, Trust};
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
    Run(RunArgs),
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
a --manufacturer-key; without one every update is refused.")]
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
            runtime.block_on(run_fleet(a))
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
    let bar = progress_bar(ids.len() as u64, "loading meters");
    let loaded = {
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
    let fleet = Fleet::start(loaded.into_iter().map(MeterSpec::from).collect(), config)
        .await
        .with_context(|| format!("starting {n} meters (state in {})", state.display()))?;
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
    Ok(())
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
    if let Some((rss, peak)) = rss_running {
        println!(
            "memory            RSS {:.1} MiB before stopping ({:.1} KiB per meter), peak {:.1} MiB",
            rss as f64 / 1024.0,
            rss as f64 / meters.max(1) as f64,
            peak as f64 / 1024.0
        );
    }
}
