//! `gridward demo`: the whole path on one machine, in one command.
//!
//! Creates a PKI in a work directory, starts a downstream receiver (`gridward sink`, standing
//! in for billing) and the head-end on free loopback ports, runs a fleet of simulated meters
//! (plus a few misbehaving devices, and tamper and power events) for a bounded time with live
//! progress, lets the forwarder catch up, and ends with a report and the commands to look at
//! the data. The detectors watch it all: a terminal cover opened, a feeder outage, a thief and
//! a data concentrator with PLC meters ([`crate::demo_detection`]) end up as alarms in the
//! report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use gridward_core::MeterId;
use gridward_core::document::{EventKind, Format};
use gridward_core::security::Reason;
use gridward_hes::config::{Config, RawConfig, RawForward};
use gridward_hes::forward::TargetSnapshot;
use gridward_hes::metrics::Snapshot;
use gridward_hes::pipeline::system_clock;
use gridward_meter::fleet::{Fleet, FleetConfig, FleetReport, MeterSpec};
use gridward_meter::identity::{MeterIdentity, Trust, load_many};
use gridward_meter::meter::Misbehaviour;
use gridward_pki::tls::TlsOptions;
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki, RevocationReason, RevokeTarget};
use gridward_store::{AlarmStore, OutboxStats, Store};
use time::OffsetDateTime;

/// Marks a directory as made by `gridward demo`, so a later run may clear it.
const MARKER: &str = ".gridward-demo";

/// `gridward demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Work directory for the PKI, the database and the meters' state (cleared if a previous
    /// demo made it).
    #[arg(long, default_value = "gridward-demo", value_name = "DIR")]
    dir: PathBuf,
    /// How many genuine meters.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    meters: usize,
    /// How long the meters run, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    duration: u64,
    /// Seconds between two readings of one meter (time runs fast in a demo).
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    interval: u64,
    /// Document format the meters send.
    #[arg(long, value_enum, default_value_t = DocFormat::Xml)]
    format: DocFormat,
}

/// Document format.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DocFormat {
    /// `EnergyUsageReport` XML, converted to JSON downstream.
    Xml,
    /// JSON.
    Json,
}

/// The misbehaving devices: (meter id, misbehaviour, revoked before the run).
const BAD_DEVICES: [(&str, Misbehaviour, bool); 4] = [
    ("bad-replay", Misbehaviour::Replay, false),
    ("bad-tamper", Misbehaviour::Tamper, false),
    ("bad-revoked", Misbehaviour::Revoked, true),
    ("retrying", Misbehaviour::ReplayVerbatim, false),
];

/// Meter events the demo asks for, a third of the way into the run: (meter, event).
const DEMO_EVENTS: [(&str, EventKind); 3] = [
    ("m000002", EventKind::TerminalCoverOpened),
    ("m000003", EventKind::PowerFail),
    ("m000003", EventKind::PowerRestore),
];

/// Longest wait, after the meters stop, for the forwarder to deliver what is pending.
const FORWARD_DRAIN: Duration = Duration::from_secs(30);

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.meters == 0 || args.duration == 0 || args.interval == 0 {
        bail!("--meters, --duration and --interval must be at least 1");
    }
    // Meters and head-end in one process: two sockets per meter.
    crate::sys::check_nofile(crate::sys::raise_nofile(), 2 * args.meters + 64)?;
    prepare_dir(&args.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(demo(args))
}

fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = dir
            .read_dir()
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty && !dir.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by `gridward demo`; pass another --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("clearing the previous demo in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by gridward demo; safe to delete\n")
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(())
}

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

async fn demo(args: DemoArgs) -> Result<()> {
    // Absolute from here on: the configuration resolves relative paths against this directory,
    // and the commands printed at the end must work from wherever they are pasted.
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let pki_dir = dir.join("pki");
    let now = OffsetDateTime::now_utc();
    println!("Gridward demo in {}", dir.display());

    // 1. The PKI: CA, the head-end's server certificate, the sink's, the head-end's client
    //    certificate for delivering downstream, the meters.
    println!(
        "1. PKI: root and issuing CA, server certificates for the head-end and the sink, a client \
         certificate for deliveries, {} meters and {} misbehaving devices, a feeder's meters, a \
         data concentrator and its PLC meters",
        args.meters,
        BAD_DEVICES.len()
    );
    let pki = Pki::init(&pki_dir, &InitOptions::new("gridward-demo", now))?;
    let opts = IssueOptions::new("gridward-demo");
    pki.issue_server(
        "localhost",
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        &opts,
        now,
    )?;
    pki.issue_server(
        "sink",
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        &opts,
        now,
    )?;
    pki.issue_client("hes", &opts, now)?;
    // The head-end's command-signing certificate (its own EKU, never a TLS key), and a
    // manufacturer key pair that signs firmware (not the head-end's).
    pki.issue_command_signer("headend", &opts, now)?;
    let manufacturer = crate::demo_commands::Manufacturer::create(&dir)?;
    let bar = indicatif::ProgressBar::new(args.meters as u64).with_style(style(
        "   {bar:40} {pos}/{len} meter certificates ({per_sec})",
    ));
    let issued = pki.issue_meters("m", args.meters, &opts, now, &mut |n| {
        bar.set_position(n as u64)
    });
    bar.finish_and_clear();
    let issued = issued?;
    for (id, _, revoked) in BAD_DEVICES {
        let id = MeterId::new(id)?;
        pki.issue_meter(&id, &opts, now)?;
        if revoked {
            pki.revoke(
                &RevokeTarget::Identity {
                    kind: Some(LeafKind::Meter),
                    name: id.to_string(),
                },
                RevocationReason::KeyCompromise,
                "gridward-demo",
                now,
            )?;
        }
    }
    let devices = crate::demo_detection::Devices::issue(&pki, &opts, now)?;

    // 2. The downstream receiver (billing), then the head-end, on free loopback ports.
    let mut keys = gridward_sink::Keys::new();
    keys.insert(gridward_sink::Keys::load(
        "hes",
        &pki_dir.join("clients/hes/cert.pem"),
    )?);
    let sink_db = dir.join("sink.db");
    let sink = gridward_sink::start(gridward_sink::SinkConfig::new(
        "127.0.0.1:0".parse()?,
        gridward_sink::tls_from_pki(&pki_dir, "sink", &[], &[])?,
        keys,
        sink_db.clone(),
    ))
    .await?;
    // Every demo meter comes from 127.0.0.1 (exempt from bans): the misbehaving ones must not
    // get it banned.
    let mut raw = RawConfig::loopback(&pki_dir, &dir.join("gridward.db"));
    raw.forward = vec![RawForward::pki_client(
        "billing",
        format!("https://127.0.0.1:{}/readings", sink.local_addr().port()),
        "hes",
        5,
    )];
    raw.api.listen = Some("127.0.0.1:0".to_owned());
    raw.firmware.manufacturers = Some(vec![manufacturer.public_pem.clone()]);
    raw.detection = serde_json::from_value(crate::demo_detection::config_json())
        .context("the demo's [detection]")?;
    let config = Config::from_raw(raw, Path::new("(demo)"), &dir)?;
    // The same files as a configuration, for `gridward audit` and `gridward user` afterwards.
    std::fs::write(
        dir.join("gridward.toml"),
        format!(
            "# Written by gridward demo: the files of this demo (its ports were chosen at random).\n\
             [pki]\ndir = {:?}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[store]\npath = {:?}\n\
             [api]\nlisten = \"127.0.0.1:0\"\nusers = {:?}\n[audit]\npath = {:?}\nkey = {:?}\n\
             [firmware]\nmanufacturers = [{:?}]\n{}",
            pki_dir.display().to_string(),
            config.store_path.display().to_string(),
            config.api.as_ref().map(|a| a.users_path.display().to_string()).unwrap_or_default(),
            config.audit.path.display().to_string(),
            config.audit.key.display().to_string(),
            manufacturer.public_pem.display().to_string(),
            crate::demo_detection::toml(),
        ),
    )
    .with_context(|| format!("writing {}", dir.join("gridward.toml").display()))?;
    let running = gridward_hes::service::start(&config, system_clock()).await?;
    devices.attach(&running.store, now)?;
    println!(
        "2. head-end listening on {} (MQTT over mutual TLS), store {}",
        running.local_addr,
        config.store_path.display()
    );
    println!(
        "   forwarding to a sink on https://{}/readings (mutual TLS, signed JSON), store {}",
        sink.local_addr(),
        sink_db.display()
    );

    // 3. The fleet.
    let trust = Trust::load_at(&pki_dir, now)?;
    let tls = TlsOptions::new();
    let bar = indicatif::ProgressBar::new(issued.len() as u64)
        .with_style(style("   {bar:40} {pos}/{len} meters loaded"));
    let ids = issued
        .iter()
        .map(|c| MeterId::new(&c.name))
        .collect::<Result<Vec<_>, _>>()?;
    let identities = load_many(&pki_dir, &ids, &trust, &tls, &|n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    let mut specs: Vec<MeterSpec> = identities.into_iter().map(MeterSpec::from).collect();
    for (id, misbehaviour, _) in BAD_DEVICES {
        let id = MeterId::new(id)?;
        let identity = MeterIdentity::load(&pki_dir, &id, &trust, &tls)?;
        specs.push(MeterSpec {
            identity,
            misbehaviour: Some(misbehaviour),
        });
    }
    specs.extend(devices.feeder_specs(&pki_dir, &trust, &tls)?);
    let concentrator = devices.concentrator_spec(&pki_dir, &trust, &tls)?;
    let clock = system_clock();
    let mut fleet_config = FleetConfig::new(
        "127.0.0.1",
        running.local_addr.port(),
        dir.join("meters-state"),
        clock,
    );
    fleet_config.server_name = "localhost".to_owned();
    fleet_config.interval = time::Duration::seconds(args.interval as i64);
    fleet_config.format = match args.format {
        DocFormat::Xml => Format::Xml,
        DocFormat::Json => Format::Json,
    };
    fleet_config.connect_rate = 1000.0;
    fleet_config.command_signers = trust.command_signers().to_vec();
    fleet_config.manufacturer_keys = vec![manufacturer.verifying_key()?];
    fleet_config.backoff_cap = Duration::from_secs(5);
    fleet_config.utc_offset_seconds = crate::demo_detection::evening_offset(now);
    println!(
        "3. running {} meters for {} s, one reading every {} s each ({})",
        specs.len(),
        args.duration,
        args.interval,
        match args.format {
            DocFormat::Xml => "XML",
            DocFormat::Json => "JSON",
        }
    );
    let run_for = Duration::from_secs(args.duration);
    let thief = crate::demo_detection::thief(&ids);
    crate::demo_detection::describe(&devices, thief.as_ref(), DEMO_EVENTS[0].0, run_for);
    let fleet = Fleet::start_with(specs, vec![concentrator], Vec::new(), fleet_config).await?;
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(args.duration)
        .with_style(style("   {bar:30} {pos:>3}/{len} s  {msg}"));
    let mut last = (Instant::now(), 0u64);
    let mut peak_connected = 0;
    let mut events_requested = false;
    let mut power_restored = false;
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !events_requested && started.elapsed() >= run_for / 3 {
            events_requested = true;
            for (meter, kind) in DEMO_EVENTS {
                if let Ok(id) = MeterId::new(meter) {
                    fleet.request_event(&id, kind);
                }
            }
            // A thief on a meter with enough readings before it to judge it against.
            let thief = thief
                .as_ref()
                .filter(|_| run_for.as_secs() >= crate::demo_detection::MIN_RUN_FOR_THEFT);
            crate::demo_detection::start(&fleet, &devices, thief);
        }
        if !power_restored && started.elapsed() >= run_for * 2 / 3 {
            power_restored = true;
            crate::demo_detection::restore(&fleet, &devices);
        }
        let m = running.metrics.snapshot();
        let forwarded: u64 = running.forward_snapshot().iter().map(|t| t.delivered).sum();
        let f = fleet.stats().snapshot();
        peak_connected = peak_connected.max(f.connected);
        let rate = (m.accepted - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
        last = (Instant::now(), m.accepted);
        bar.set_position(started.elapsed().as_secs().min(args.duration));
        let alarms: u64 = running
            .store
            .active_alarm_counts()
            .map_or(0, |c| c.iter().map(|(_, n)| n).sum());
        bar.set_message(format!(
            "{} connected · {} sent · {} stored ({:.0}/s) · {} refused · p99 {:.1} ms · {} forwarded · {} active alarms",
            f.connected,
            f.sent,
            m.accepted,
            rate,
            m.rejected_total(),
            m.p99.as_secs_f64() * 1000.0,
            forwarded,
            alarms
        ));
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    if let (Some(access), Some(api), Some(first)) = (&running.access, running.api_addr, ids.first())
    {
        let other = ids.get(1).unwrap_or(first);
        crate::demo_api::show(access, api, &pki_dir, first, other).await?;
    }
    crate::demo_commands::show(&running, &fleet, &manufacturer, &ids).await?;
    println!("5. stopping: waiting for the last acknowledgements");
    let report = fleet.stop(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "6. letting the forwarder deliver what is pending (at most {} s)",
        FORWARD_DRAIN.as_secs()
    );
    let outbox = drain_outbox(&running.store).await?;
    let metrics = running.metrics.snapshot();
    let counts = running.store.counts()?;
    let forward = running.forward_snapshot();
    let store_path = config.store_path.clone();
    let store = std::sync::Arc::clone(&running.store);
    // The detectors write their last alarms as the head-end stops.
    running.shutdown().await;
    let alarms = crate::demo_detection::alarms(&store)?;
    let plc_readings = crate::demo_detection::plc_readings(&store, &devices)?;
    let sink_stats = sink.shutdown().await;
    print_report(
        &report,
        &metrics,
        counts.readings,
        counts.meter_events,
        counts.command_acks,
        peak_connected,
        elapsed,
    );
    crate::demo_detection::print_report(
        &alarms,
        report.concentrators.first(),
        &devices,
        plc_readings,
    );
    print_forward_report(&forward, &outbox, &sink_stats);
    print_commands(&store_path, &sink_db);
    Ok(())
}

/// Waits until no outbox row is pending (or [`FORWARD_DRAIN`] has passed), showing progress;
/// returns the outbox state at the end.
async fn drain_outbox(store: &gridward_store::SqliteStore) -> Result<Vec<OutboxStats>> {
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner().with_style(style("   {spinner} {msg}"));
    loop {
        let stats = store.outbox_stats()?;
        let pending: u64 = stats.iter().map(|s| s.pending).sum();
        let delivered: u64 = stats.iter().map(|s| s.delivered).sum();
        bar.set_message(format!("{delivered} delivered, {pending} pending"));
        bar.tick();
        if pending == 0 || started.elapsed() >= FORWARD_DRAIN {
            bar.finish_and_clear();
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_forward_report(
    forward: &[TargetSnapshot],
    outbox: &[OutboxStats],
    sink: &gridward_sink::StatsSnapshot,
) {
    println!("\ndownstream (signed JSON over mutual TLS):");
    for t in forward {
        let o = outbox.iter().find(|o| o.target == t.name);
        println!(
            "  {:<12} {} readings forwarded, {} still pending, {} dead letters, {} failed attempts retried",
            t.name,
            o.map_or(t.delivered, |o| o.delivered),
            o.map_or(0, |o| o.pending),
            o.map_or(t.dead, |o| o.dead),
            t.failed_attempts
        );
        println!(
            "  {:<12} delivery lag (received → 2xx) p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            "",
            ms(t.lag_p50),
            ms(t.lag_p99),
            ms(t.lag_max)
        );
    }
    println!("  sink         {sink}");
}

fn print_commands(store: &Path, sink_db: &Path) {
    let db = store.display();
    println!("\nlook at the data:");
    println!("  gridward readings --db {db} --meter m000001");
    println!("  gridward readings --db {db} --meter m000001 --format json");
    println!("  gridward events --db {db}");
    println!("  gridward events --db {db} --meter-events");
    println!("  gridward meters --db {db}");
    let toml = store.with_file_name("gridward.toml");
    println!("  gridward alarms --config {}", toml.display());
    println!(
        "  gridward alarms --config {} --type theft_suspected --json",
        toml.display()
    );
    println!("  gridward concentrator list --config {}", toml.display());
    println!("  gridward outbox --db {db}");
    println!("  gridward audit verify --config {}", toml.display());
    println!(
        "  gridward audit show --config {} --action login.",
        toml.display()
    );
    println!("  gridward user list --config {}", toml.display());
    println!("  gridward command list --config {}", toml.display());
    println!(
        "  gridward sink show --store {} --meter m000001",
        sink_db.display()
    );
}

fn print_report(
    report: &FleetReport,
    m: &Snapshot,
    stored_readings: u64,
    stored_events: u64,
    stored_acks: u64,
    peak_connected: u64,
    elapsed: Duration,
) {
    let f = &report.stats;
    // The PLC meters' envelopes reach the head-end in the concentrator's relay batches.
    let relayed: u64 = report
        .concentrators
        .iter()
        .map(|c| c.stats.envelopes_relayed + c.stats.own_events)
        .sum();
    let secs = elapsed.as_secs_f64().max(0.001);
    println!("\n== Gridward demo report ==");
    println!("meters connected (peak)        {peak_connected}");
    println!(
        "readings and events sent       {} ({} resends; {relayed} relayed by the concentrator)",
        f.sent + relayed,
        f.resent
    );
    println!(
        "accepted and stored            {} ({} readings in the store)",
        m.accepted, stored_readings
    );
    println!("meter events stored            {stored_events} (tamper and power events)");
    println!(
        "command acknowledgements       {stored_acks} (signed by the meters: executed, or refused like the forged command)"
    );
    println!("duplicates (acknowledged)      {}", m.duplicates);
    println!("refused                        {}", m.rejected_total());
    for (reason, n) in &m.rejected {
        println!("  {:<28} {n}", reason.code());
    }
    println!(
        "throughput                     {:.0} accepted/s over the {:.0} s run",
        m.accepted as f64 / secs,
        secs
    );
    println!(
        "ingest latency (head-end)      p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(m.p50),
        ms(m.p99),
        ms(m.max)
    );
    println!(
        "publish → PUBACK (meters)      p50 {:.2} ms, p99 {:.2} ms",
        ms(report.latency.p50),
        ms(report.latency.p99)
    );
    println!("\nthe misbehaving devices:");
    println!(
        "  bad-replay   reuses a counter with new content   → {} refused as replay",
        m.rejected_for(Reason::Replay)
    );
    println!(
        "  bad-tamper   changes a signed message            → {} refused for its signature",
        m.rejected_for(Reason::BadSignature)
    );
    println!(
        "  bad-revoked  connects with a revoked certificate → {} handshakes refused",
        m.rejected_for(Reason::CertificateRevoked)
    );
    println!(
        "  retrying     resends an acknowledged message     → {} acknowledged as duplicates, not stored twice",
        m.duplicates
    );
    println!(
        "  (forger)     a disconnect signed by another key  → {} refused by the meter (command_refused)",
        m.rejected_for(Reason::CommandRefused)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
