//! `gridward`: the single command-line binary of the Gridward head-end.
//!
//! CLI definition and glue only; all logic lives in the library crates.
//!
//! - [`attack_cmd`]: `gridward attack`, the attack harness.
//! - [`demo_cmd`]: `gridward demo`, the whole ingest path on one machine.
//! - [`pki_cmd`]: `gridward pki ...`, the certificate authority.
//! - [`meter_cmd`]: `gridward meter sign` and `gridward meter run`, simulated meters.
//! - [`serve_cmd`]: `gridward serve`, `gridward config`, and `readings`, `events`, `meters`.
//! - [`outbox_cmd`]: `gridward outbox`, the downstream deliveries: status, dead letters, retry.
//! - [`sink_cmd`]: `gridward sink`, the reference downstream service, and `sink show`.
//! - [`report`]: how an error is printed (each cause once).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod attack_cmd;
mod bench_cmd;
mod bench_forward;
mod demo_cmd;
mod meter_cmd;
mod outbox_cmd;
mod pki_cmd;
mod report;
mod serve_cmd;
mod sink_cmd;
mod sys;

/// Gridward: a secure smart-metering head-end system.
#[derive(Debug, Parser)]
#[command(name = "gridward", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: a PKI, the head-end, a downstream sink, 1,000 simulated
    /// meters, a report.
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
    /// Show and retry downstream deliveries: pending, delivered, dead letters, lag per target.
    Outbox(outbox_cmd::OutboxArgs),
    /// Receive forwarded readings like a billing service: HTTPS with mutual TLS, signatures
    /// (RFC 9421) and digests checked, replays refused, each reading stored once.
    Sink(sink_cmd::SinkArgs),
    /// Attack a head-end (its own, or a running one) with every threat of the design while a
    /// genuine fleet sends; report what was stopped and the security event each left.
    Attack(attack_cmd::AttackArgs),
    /// Benchmarks on this machine: ingest throughput and latency, memory per idle meter,
    /// reconnect storm (each next to a Mosquitto broker doing the relay job), and signed
    /// deliveries to a sink.
    Bench(bench_cmd::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Sink(args) => sink_cmd::run(args),
        Command::Attack(args) => attack_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
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
