//! `gridward`: the single command-line binary of the Gridward head-end.
//!
//! CLI definition and glue only; all logic lives in the library crates.
//!
//! - [`alarms_cmd`]: `gridward alarms ...`, the detectors' alarms: list, show, ack, clear.
//! - [`attack_cmd`]: `gridward attack`, the attack harness.
//! - [`command_cmd`]: `gridward command ...`, signed commands to meters: send, list, show, proposals.
//! - [`concentrator_cmd`]: `gridward concentrator ...`, meters behind data concentrators.
//! - [`demo_cmd`]: `gridward demo`, the whole ingest path on one machine.
//! - [`export_cmd`]: `gridward export`, pseudonymised and aggregated exports for third parties.
//! - [`firmware_cmd`]: `gridward firmware ...`, manufacturer keys and signed firmware manifests.
//! - [`pki_cmd`]: `gridward pki ...`, the certificate authority.
//! - [`meter_cmd`]: `gridward meter sign` and `gridward meter run`, simulated meters.
//! - [`serve_cmd`]: `gridward serve`, `gridward config`, and `readings`, `events`, `meters`.
//! - [`outbox_cmd`]: `gridward outbox`, the downstream deliveries: status, dead letters, retry.
//! - [`sink_cmd`]: `gridward sink`, the reference downstream service, and `sink show`.
//! - [`report`]: how an error is printed (each cause once).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod alarms_cmd;
mod attack_cmd;
mod audit_cmd;
mod bench_api;
mod bench_cmd;
mod bench_commands;
mod bench_forward;
mod command_cmd;
mod concentrator_cmd;
mod demo_api;
mod demo_cmd;
mod demo_commands;
mod demo_detection;
mod export_cmd;
mod firmware_cmd;
mod firmware_ops;
mod keys_cmd;
mod meter_cmd;
mod outbox_cmd;
mod pki_cmd;
mod report;
mod serve_cmd;
mod sink_cmd;
mod sys;
mod user_cmd;

/// Gridward: a secure smart-metering head-end system.
#[derive(Debug, Parser)]
#[command(name = "gridward", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// How the services log on stderr: `text` for people, `json` for one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Least level logged (error, warn, info, debug, trace) or a filter such as
    /// `info,gridward_mqtt=debug`. Without it: RUST_LOG if set, else `info` for `serve` and
    /// `sink` and `warn` for the other commands (whose own output is their report).
    #[arg(long, global = true, value_name = "FILTER", value_parser = parse_log_filter)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines: time, level, where, message, fields.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message`, the fields, `span`).
    Json,
}

/// Checks a `--log-level` filter.
fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a log level or filter: {e}"))
}

/// Installs the `tracing` subscriber: events to stderr in `format`, filtered by `level`, else
/// RUST_LOG, else `default`. Colours only on a terminal.
fn init_logging(format: LogFormat, level: Option<&str>, default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let from_env = || {
        let value = std::env::var("RUST_LOG").ok()?;
        match EnvFilter::builder().parse(&value) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("gridward: warning: ignoring RUST_LOG={value:?}: {e}");
                None
            }
        }
    };
    let filter = level
        .and_then(|l| EnvFilter::builder().parse(l).ok())
        .or_else(from_env)
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("gridward: warning: logging not set up: {e}");
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: a PKI, the head-end, a downstream sink, 1,000 simulated
    /// meters, a tour of the HTTPS API (an operator, a consumer, an auditor), signed commands
    /// and a firmware campaign, a report.
    Demo(demo_cmd::DemoArgs),
    /// Run the certificate authority: CA set-up, issuance, CSR signing, revocation, CRLs, PKCS#12.
    Pki(pki_cmd::PkiArgs),
    /// Run the head-end: MQTT over mutual TLS, verification, durable store, downstream delivery
    /// (certificates and CRLs reload on SIGHUP or when they change on disk).
    Serve(serve_cmd::ServeArgs),
    /// Simulated meters: sign a document, or run a fleet against a head-end.
    Meter(meter_cmd::MeterArgs),
    /// Write or check the configuration file.
    #[command(subcommand)]
    Config(serve_cmd::ConfigCommand),
    /// Show a meter's stored readings.
    Readings(serve_cmd::ReadingsArgs),
    /// Show the security events (every refusal, with its reason), or the meters' tamper and
    /// power events (--meter-events).
    Events(serve_cmd::EventsArgs),
    /// Show the meters: last seen, last counter, connection state.
    Meters(serve_cmd::MetersArgs),
    /// Manage the users of the HTTPS API: add, list, disable, enable, reset-password,
    /// set-role, enroll-totp.
    User(user_cmd::UserArgs),
    /// The tamper-evident audit log: verify, show, checkpoint, key.
    Audit(audit_cmd::AuditArgs),
    /// Firmware updates: a manufacturer key pair, signed manifests (COSE_Sign1), checking a
    /// manifest and its image; uploads and staged campaigns in the running head-end.
    #[command(subcommand)]
    Firmware(firmware_cmd::FirmwareCmd),
    /// Signed commands to meters (disconnect, reconnect, reporting interval, tariff, read now):
    /// send (queued for the running head-end), list, show, and the four-eyes proposals.
    #[command(name = "command")]
    Commands(command_cmd::CommandArgs),
    /// The detectors' alarms (tamper, outages, theft suspicion, intrusion): list, show, ack,
    /// clear (acknowledging and clearing are audited, as cli:$USER).
    Alarms(alarms_cmd::AlarmsArgs),
    /// The concentrator topology: list, attach and detach the meters registered behind a data
    /// concentrator (changes are audited, as cli:$USER).
    Concentrator(concentrator_cmd::ConcentratorArgs),
    /// Encryption at rest of the store: list the data keys, rotate, re-wrap under a new
    /// key-encryption key, destroy one (crypto-shredding); audited, as cli:$USER.
    Keys(keys_cmd::KeysArgs),
    /// Readings for a third party: meter ids as keyed pseudonyms, times in 15m/1h/1d buckets,
    /// sums per group with small groups suppressed; CSV, JSON or Parquet (and `keygen`).
    Export(export_cmd::ExportArgs),
    /// Show and retry downstream deliveries: pending, delivered, dead letters, lag per target.
    Outbox(outbox_cmd::OutboxArgs),
    /// Receive forwarded readings like a billing service: HTTPS with mutual TLS, signatures
    /// (RFC 9421) and digests checked, replays refused, each reading stored once.
    Sink(sink_cmd::SinkArgs),
    /// Attack a head-end (its own, or a running one) with every threat of the design while a
    /// genuine fleet sends; report what was stopped and the security event each left.
    Attack(attack_cmd::AttackArgs),
    /// Benchmarks on this machine: ingest throughput and latency, memory per idle meter,
    /// reconnect storm (each next to a Mosquitto broker doing the relay job), signed
    /// deliveries to a sink, the HTTPS API, and commands to meters.
    Bench(bench_cmd::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The services log what they do; one-shot commands only what goes wrong, unless asked.
    let default_level = match cli.command {
        Command::Serve(_) | Command::Sink(_) => "info",
        _ => "warn",
    };
    init_logging(cli.log_format, cli.log_level.as_deref(), default_level);
    let result = match cli.command {
        Command::Demo(args) => demo_cmd::run(args),
        Command::Pki(args) => pki_cmd::run(args),
        Command::Serve(args) => serve_cmd::serve(args),
        Command::Meter(args) => meter_cmd::run(args),
        Command::Config(cmd) => serve_cmd::config(cmd),
        Command::Readings(args) => serve_cmd::readings(args),
        Command::Events(args) => serve_cmd::events(args),
        Command::Meters(args) => serve_cmd::meters(args),
        Command::Outbox(args) => outbox_cmd::run(args),
        Command::Export(args) => export_cmd::run(args),
        Command::Keys(args) => keys_cmd::run(args),
        Command::Sink(args) => sink_cmd::run(args),
        Command::Attack(args) => attack_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::User(args) => user_cmd::run(args),
        Command::Firmware(cmd) => firmware_cmd::run(cmd),
        Command::Commands(args) => command_cmd::run(args),
        Command::Alarms(args) => alarms_cmd::run(args),
        Command::Concentrator(args) => concentrator_cmd::run(args),
        Command::Audit(args) => match audit_cmd::run(args) {
            Ok(code) if code != ExitCode::SUCCESS => return code,
            other => other.map(|_| ()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if serve_cmd::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", report::error_chain(&err));
            serve_cmd::exit_code(&err)
        }
    }
}
