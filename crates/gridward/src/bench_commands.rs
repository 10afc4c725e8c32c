//! `gridward bench commands`: the downward path's throughput and latency, next to the upward
//! path's measured in the same run on the same connections.
//!
//! ```text
//!  this process: head-end (MQTT/mTLS endpoint, pipeline, SQLite store, command service, dispatcher)
//!                  ▲ acks, events          │ signed commands (QoS 1)
//!                  │                       ▼
//!                N simulated meters (gridward-meter's fleet), the bench's command signer pinned
//! ```
//!
//! 1. Baseline: every meter is asked to sign and send one event per round (the upward path: the
//!    meter signs, the head-end verifies and stores it durably, then PUBACKs); the time until
//!    all are acknowledged gives signed meter messages ingested per second.
//! 2. Commands: one command per meter per round through `Commands::issue`, in batches below the
//!    four-eyes rule (read_now and set_tariff are not critical). Measured: commands signed and
//!    queued per second (counters reserved, COSE_Sign1, SQLite insert, audit entry), commands
//!    from issue to the stored acknowledgement per second (dispatch, the meter verifies and
//!    executes, signs its acknowledgement, the head-end verifies and stores it), and each
//!    command's latency from just before its batch was issued to the moment the bench saw its
//!    acknowledgement stored (the store is polled every 10 ms).
//! 3. Signing alone: the same number of `command::sign` calls with the same key.
//!
//! The ratio of (2) to (1) says what a command round trip costs next to one signed message from
//! a meter: both include exactly one signed upward message verified and stored (the event, or
//! the acknowledgement); a command adds signing, its own insert, dispatch and the meter's
//! verification. Meters and head-end share this machine's cores. Everything is on 127.0.0.1.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use gridward_command::{IssueRequest, Issued};
use gridward_core::command::{self, Command, CommandBody, CommandId};
use gridward_core::document::EventKind;
use gridward_hes::config::{Config, RawConfig};
use gridward_hes::pipeline::system_clock;
use gridward_meter::fleet::{Fleet, FleetConfig, MeterSpec};
use gridward_meter::identity::{Trust, list_meters, load_many, select_meters};
use gridward_pki::tls::TlsOptions;
use gridward_pki::{InitOptions, IssueOptions, Pki};
use gridward_store::{CommandQuery, CommandStatus, CommandStore, SqliteStore};
use hdrhistogram::Histogram;
use serde_json::json;
use time::OffsetDateTime;

use crate::bench_cmd::{Work, cores, loadavg, write_json};

/// Prefix of the bench meters' ids (`c000001`, ...).
const PREFIX: &str = "c";
/// The server certificate's name.
const SERVER: &str = "localhost";
/// The command signer's name.
const SIGNER: &str = "headend";
/// Longest wait for the meters to connect, for a phase to finish.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
/// How often the store is polled for settled commands.
const POLL: Duration = Duration::from_millis(10);

/// The command the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchKind {
    /// set_tariff: executed, then one signed acknowledgement (like for like with one event).
    SetTariff,
    /// read_now: executed, one signed acknowledgement and a reading (two upward messages).
    ReadNow,
}

/// `gridward bench commands`
#[derive(Debug, Args)]
#[command(after_help = "\
The head-end runs in this process with a command signer issued in the bench's own PKI, the \
dispatch rate limit raised (`[commands] dispatch_rate_per_sec`), and the meters' limits raised \
as in `bench ingest`. The baseline (signed events ingested, one per meter per round) runs first \
on the same connections. Example:
  gridward bench commands --meters 1000 --commands-per-meter 2 --json commands.json")]
pub struct CommandsArgs {
    /// Number of meters (MQTT connections).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    meters: usize,
    /// Commands per meter (sent one after the other: a meter has one command in flight).
    #[arg(long, default_value_t = 1, value_name = "N")]
    commands_per_meter: usize,
    /// The command sent.
    #[arg(long, value_enum, default_value_t = BenchKind::SetTariff)]
    kind: BenchKind,
    /// Meters per `Commands::issue` request.
    #[arg(long, default_value_t = 250, value_name = "N")]
    batch: usize,
    /// The head-end's dispatch rate limit, commands/s (at most 100000).
    #[arg(long, default_value_t = 100_000.0, value_name = "R")]
    dispatch_rate: f64,
    /// Work directory: PKI, database, meter state. A PKI an earlier run left there is reused
    /// [default: a temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also write the results to this file as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Runs `gridward bench commands`.
pub async fn run(args: CommandsArgs) -> Result<()> {
    if args.meters == 0 || args.commands_per_meter == 0 || args.batch == 0 {
        bail!("--meters, --commands-per-meter and --batch must be at least 1");
    }
    if !(args.dispatch_rate.is_finite() && (1.0..=100_000.0).contains(&args.dispatch_rate)) {
        bail!("--dispatch-rate must be within 1..=100000");
    }
    let total = args.meters * args.commands_per_meter;
    eprintln!(
        "gridward bench commands: {} meters, {} command(s) each ({} in all, {}), batches of {}, dispatch limit {}/s; {} cores, load average {}",
        args.meters,
        args.commands_per_meter,
        total,
        kind_name(args.kind),
        args.batch,
        args.dispatch_rate,
        cores(),
        loadavg()
    );
    crate::sys::check_nofile(crate::sys::raise_nofile(), args.meters + 256)?;
    let work = Work::new(args.dir.as_deref())?;
    let pki_dir = work.path.join("pki-commands");
    let started = Instant::now();
    {
        let pki_dir = pki_dir.clone();
        let n = args.meters;
        tokio::task::spawn_blocking(move || prepare_pki(&pki_dir, n))
            .await
            .context("preparing the PKI")??;
    }
    eprintln!(
        "1. PKI in {} ({} meters, command signer {SIGNER:?}) in {:.1} s",
        pki_dir.display(),
        args.meters,
        started.elapsed().as_secs_f64()
    );

    let db = work.path.join("commands.db");
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    for name in ["users.db", "audit.db", "audit.key"] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(work.path.join(format!("{name}{suffix}")));
        }
    }
    let mut raw = RawConfig::loopback(&pki_dir, &db);
    raw.pki.server_name = Some(SERVER.to_owned());
    raw.mqtt.max_connections = Some(args.meters.saturating_add(1000).max(20_000));
    raw.mqtt.connect_timeout_secs = Some(60);
    raw.mqtt.rate_per_second = Some(1_000_000.0);
    raw.mqtt.rate_burst = Some(1_000_000);
    raw.mqtt.ban_after_failures = Some(0);
    raw.ingest.max_skew_secs = Some(3600);
    raw.commands.signer = Some(SIGNER.to_owned());
    raw.commands.dispatch_rate_per_sec = Some(args.dispatch_rate);
    let config = Config::from_raw(raw, Path::new("(bench)"), &work.path)?;
    let running = gridward_hes::service::start(&config, system_clock())
        .await
        .context("starting the head-end")?;
    let commands = match &running.commands {
        Some(service) => Arc::clone(&service.commands),
        None => bail!("the bench head-end started without commands (no usable command signer)"),
    };
    let store: Arc<SqliteStore> = Arc::clone(&running.store);
    eprintln!("2. head-end on {} (commands on)", running.local_addr);

    let now = OffsetDateTime::now_utc();
    let trust = Trust::load_at(&pki_dir, now)?;
    if trust.command_signers().is_empty() {
        bail!("the bench PKI lists no command signer to pin");
    }
    let ids = select_meters(&pki_dir, PREFIX, args.meters)?;
    let loaded = {
        let (dir, ids, trust) = (pki_dir.clone(), ids.clone(), trust.clone());
        tokio::task::spawn_blocking(move || {
            load_many(&dir, &ids, &trust, &TlsOptions::default(), &|_| {})
        })
        .await
        .context("loading meters")??
    };
    let state = work.path.join("fleet-state");
    let _ = std::fs::remove_dir_all(&state);
    let mut fc = FleetConfig::new(
        "127.0.0.1",
        running.local_addr.port(),
        &state,
        Arc::new(OffsetDateTime::now_utc),
    );
    fc.server_name = SERVER.to_owned();
    fc.connect_rate = 2000.0;
    // Readings are not what is measured: one a day, spread over the day.
    fc.interval = time::Duration::days(1);
    fc.outbox = false;
    fc.command_signers = trust.command_signers().to_vec();
    let fleet = Fleet::start(loaded.into_iter().map(MeterSpec::from).collect(), fc)
        .await
        .context("starting the meters")?;
    let connect_started = Instant::now();
    loop {
        let connected = ids
            .iter()
            .filter(|id| running.endpoint.is_connected(id))
            .count();
        if connected == ids.len() {
            break;
        }
        if connect_started.elapsed() > PHASE_LIMIT {
            bail!(
                "only {connected} of {} meters connected in {} s",
                ids.len(),
                PHASE_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Subscriptions follow CONNACK; let them (and the first wake-ups) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!(
        "3. {} meters connected (mutual TLS, MQTT 5) in {:.1} s, the command signer pinned",
        ids.len(),
        connect_started.elapsed().as_secs_f64()
    );

    // ----- baseline: signed events from the meters -----
    let before = fleet.stats().snapshot();
    let base_started = Instant::now();
    for _ in 0..args.commands_per_meter {
        for id in &ids {
            if !fleet.request_event(id, EventKind::PowerRestore) {
                bail!("meter {id} stopped before the baseline");
            }
        }
    }
    let mut last_print = Instant::now();
    let events_secs = loop {
        let s = fleet.stats().snapshot();
        let acked = s.acked.saturating_sub(before.acked);
        let refused = s.rejected.saturating_sub(before.rejected);
        if acked + refused >= total as u64 {
            if refused > 0 {
                bail!("the head-end refused {refused} of the baseline's events");
            }
            break base_started.elapsed().as_secs_f64();
        }
        if base_started.elapsed() > PHASE_LIMIT {
            bail!(
                "baseline: only {acked} of {total} events acknowledged in {} s",
                PHASE_LIMIT.as_secs()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!("   baseline: {acked}/{total} events acknowledged");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let event_latency = fleet.stats().latency.summary();
    let events_per_s = total as f64 / events_secs.max(1e-9);
    eprintln!(
        "4. baseline: {total} signed events ingested in {events_secs:.2} s ({events_per_s:.0}/s)"
    );

    // ----- commands -----
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<CommandId>)>();
    let issuer = {
        let commands = Arc::clone(&commands);
        let ids = ids.clone();
        let (kind, batch, rounds) = (args.kind, args.batch, args.commands_per_meter);
        tokio::task::spawn_blocking(move || -> Result<f64> {
            let started = Instant::now();
            for round in 0..rounds {
                let body = match kind {
                    BenchKind::SetTariff => CommandBody::SetTariff {
                        tariff: format!("bench-{round}"),
                    },
                    BenchKind::ReadNow => CommandBody::ReadNow,
                };
                for chunk in ids.chunks(batch) {
                    let at = Instant::now();
                    let issued = commands.issue(IssueRequest {
                        meters: chunk.to_vec(),
                        body: body.clone(),
                        actor: "bench".to_owned(),
                        ttl: None,
                        reason: "gridward bench commands".to_owned(),
                    })?;
                    match issued {
                        Issued::Queued { ids } => {
                            if tx.send((at, ids)).is_err() {
                                bail!("the bench stopped watching");
                            }
                        }
                        Issued::Proposed { .. } => {
                            bail!("the bench's batch became a four-eyes proposal")
                        }
                    }
                }
            }
            Ok(started.elapsed().as_secs_f64())
        })
    };
    let cmd_started = Instant::now();
    let mut outstanding: HashMap<CommandId, Instant> = HashMap::with_capacity(total);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut issued = 0usize;
    let mut settled = 0usize;
    let mut issue_secs = None;
    let mut issuer = Some(issuer);
    let mut last_print = Instant::now();
    let pending_query = |status| CommandQuery {
        status: Some(status),
        limit: total,
        ..CommandQuery::default()
    };
    let e2e_secs = loop {
        // New ids first: they were stored before they were sent, so the query below sees them.
        while let Ok((at, batch)) = rx.try_recv() {
            issued += batch.len();
            outstanding.extend(batch.into_iter().map(|id| (id, at)));
        }
        if let Some(handle) = &issuer
            && handle.is_finished()
        {
            let handle = issuer.take().context("the issuer")?;
            issue_secs = Some(handle.await.context("the issuing task")??);
            while let Ok((at, batch)) = rx.try_recv() {
                issued += batch.len();
                outstanding.extend(batch.into_iter().map(|id| (id, at)));
            }
        }
        let pending: HashSet<CommandId> = {
            let store = Arc::clone(&store);
            let (q, s) = (
                pending_query(CommandStatus::Queued),
                pending_query(CommandStatus::Sent),
            );
            tokio::task::spawn_blocking(move || -> Result<HashSet<CommandId>> {
                let mut ids: HashSet<CommandId> =
                    store.commands(&q)?.into_iter().map(|c| c.id).collect();
                ids.extend(store.commands(&s)?.into_iter().map(|c| c.id));
                Ok(ids)
            })
            .await
            .context("polling the store")??
        };
        let seen = Instant::now();
        outstanding.retain(|id, at| {
            if pending.contains(id) {
                return true;
            }
            let us = u64::try_from(seen.duration_since(*at).as_micros()).unwrap_or(u64::MAX);
            hist.saturating_record(us.max(1));
            settled += 1;
            false
        });
        if issue_secs.is_some() && settled >= total {
            break cmd_started.elapsed().as_secs_f64();
        }
        if cmd_started.elapsed() > PHASE_LIMIT {
            bail!(
                "commands: {issued} of {total} issued, {settled} settled in {} s",
                PHASE_LIMIT.as_secs()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let d = commands.dispatch_stats();
            eprintln!(
                "   commands: {issued}/{total} signed and queued, {} published, {settled} settled",
                d.sent
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let issue_secs = issue_secs.context("the issuer did not finish")?;
    let dispatch = commands.dispatch_stats();

    // The outcome of every command, from the store.
    let mut by_status = HashMap::new();
    for status in CommandStatus::ALL {
        let n = store.commands(&pending_query(status))?.len();
        by_status.insert(status.as_str(), n);
    }
    let acknowledged = by_status
        .get(CommandStatus::Acknowledged.as_str())
        .copied()
        .unwrap_or(0);
    let issue_per_s = total as f64 / issue_secs.max(1e-9);
    let e2e_per_s = total as f64 / e2e_secs.max(1e-9);
    eprintln!(
        "5. commands: {total} signed and queued in {issue_secs:.2} s, all settled in {e2e_secs:.2} s"
    );

    // ----- signing alone -----
    let signer = commands.signer();
    let probe = Command {
        id: CommandId::random(),
        meter_id: ids[0].clone(),
        body: CommandBody::SetTariff {
            tariff: "bench-0".to_owned(),
        },
        counter: 1,
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
    };
    let sign_started = Instant::now();
    for i in 0..total {
        let mut c = probe.clone();
        c.counter = i as u64 + 1;
        command::sign(&signer, &c).context("signing a command")?;
    }
    let sign_per_s = total as f64 / sign_started.elapsed().as_secs_f64().max(1e-9);

    let report = fleet.stop(Duration::from_secs(2)).await;
    running.shutdown().await;
    let meter_stats = report.stats;

    let ratio = e2e_per_s / events_per_s.max(1e-9);
    let p = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!();
    println!(
        "gridward bench commands ({} meters over mutual TLS, {} {} command(s) each; meters and head-end share {} cores)",
        args.meters,
        args.commands_per_meter,
        kind_name(args.kind),
        cores()
    );
    println!(
        "  signed + queued            {issue_per_s:>9.0} commands/s   {total} in {issue_secs:.2} s (counter reserved, COSE_Sign1, stored, audited; batches of {})",
        args.batch
    );
    println!(
        "  issue → ack stored         {e2e_per_s:>9.0} commands/s   {total} in {e2e_secs:.2} s (dispatched, verified and executed by the meter, its signed ack verified and stored)"
    );
    println!(
        "  latency issue → ack stored  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms   (from before its batch was issued to the stored ack, polled every {} ms)",
        p(0.5),
        p(0.99),
        hist.max() as f64 / 1000.0,
        POLL.as_millis()
    );
    println!(
        "  baseline: signed events    {events_per_s:>9.0} events/s     {total} in {events_secs:.2} s (the meter signs, the head-end verifies and stores; publish → PUBACK p50 {:.1} ms, p99 {:.1} ms)",
        event_latency.p50.as_secs_f64() * 1e3,
        event_latency.p99.as_secs_f64() * 1e3
    );
    println!(
        "  commands / events          {ratio:>9.2}   (a command round trip, which contains one signed upward message like an event, runs at {:.0} % of the rate of ingesting one signed event)",
        ratio * 100.0
    );
    println!(
        "  sign only                  {sign_per_s:>9.0} commands/s   (command::sign, one thread: signing is {:.0} % of the time of signing + queueing)",
        (issue_per_s / sign_per_s.max(1e-9)) * 100.0
    );
    println!(
        "  dispatcher                 {} published, {} PUBACKed by meters, {} lost, {} waits for the rate limit",
        dispatch.sent, dispatch.acked, dispatch.lost, dispatch.rate_limited_waits
    );
    println!(
        "  meters                     {} commands received, {} executed, {} refused, {} acks signed",
        meter_stats.commands_received,
        meter_stats.commands_executed,
        meter_stats.commands_refused,
        meter_stats.command_acks
    );
    let outcome: Vec<String> = CommandStatus::ALL
        .iter()
        .map(|s| format!("{} {}", s.as_str(), by_status.get(s.as_str()).unwrap_or(&0)))
        .collect();
    println!("  outcomes                   {}", outcome.join(", "));
    if acknowledged == total {
        println!("  all {total} commands acknowledged");
    } else {
        println!(
            "  NOT all commands acknowledged: {acknowledged} of {total} (see the outcomes above)"
        );
    }
    write_json(
        args.json.as_deref(),
        &json!({
            "meters": args.meters,
            "commands_per_meter": args.commands_per_meter,
            "kind": kind_name(args.kind),
            "batch": args.batch,
            "dispatch_rate_limit": args.dispatch_rate,
            "cores": cores(),
            "commands": total,
            "issue": { "seconds": issue_secs, "per_s": issue_per_s },
            "issue_to_ack": {
                "seconds": e2e_secs,
                "per_s": e2e_per_s,
                "p50_ms": p(0.5),
                "p99_ms": p(0.99),
                "max_ms": hist.max() as f64 / 1000.0,
            },
            "baseline_events": {
                "seconds": events_secs,
                "per_s": events_per_s,
                "publish_to_puback_p50_ms": event_latency.p50.as_secs_f64() * 1e3,
                "publish_to_puback_p99_ms": event_latency.p99.as_secs_f64() * 1e3,
            },
            "commands_over_events": ratio,
            "sign_only_per_s": sign_per_s,
            "outcomes": by_status,
            "all_acknowledged": acknowledged == total,
        }),
    )?;
    if acknowledged != total {
        bail!(
            "{} of {total} commands were not acknowledged",
            total - acknowledged
        );
    }
    Ok(())
}

fn kind_name(kind: BenchKind) -> &'static str {
    match kind {
        BenchKind::SetTariff => "set_tariff",
        BenchKind::ReadNow => "read_now",
    }
}

/// A PKI with the server certificate, the command signer and at least `meters` meters (an
/// earlier run's is reused and extended).
fn prepare_pki(dir: &Path, meters: usize) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let pki = if dir.join("inventory.json").exists() {
        Pki::open(dir, None)?
    } else {
        Pki::init(dir, &InitOptions::new("gridward-bench", now))?
    };
    let opts = IssueOptions::new("gridward-bench");
    if !dir.join("servers").join(SERVER).join("key.pem").exists() {
        pki.issue_server(
            SERVER,
            &[SERVER.to_owned(), "127.0.0.1".to_owned()],
            &opts,
            now,
        )?;
    }
    if !dir
        .join("command-signers")
        .join(SIGNER)
        .join("key.pem")
        .exists()
    {
        pki.issue_command_signer(SIGNER, &opts, now)?;
    }
    let have = list_meters(dir, PREFIX)?.len();
    if have < meters {
        pki.issue_meters(PREFIX, meters - have, &opts, now, &mut |_| {})?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_not_critical_by_default() {
        let p = gridward_command::Policy::default();
        for k in [BenchKind::SetTariff, BenchKind::ReadNow] {
            let kind = match k {
                BenchKind::SetTariff => gridward_core::command::CommandKind::SetTariff,
                BenchKind::ReadNow => gridward_core::command::CommandKind::ReadNow,
            };
            assert_eq!(kind.as_str(), kind_name(k));
            assert!(!p.needs_four_eyes(kind, 100_000));
        }
    }
}
