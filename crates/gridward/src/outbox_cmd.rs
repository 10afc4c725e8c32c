//! `gridward outbox`: what the forwarder still has to deliver, the dead letters, and putting
//! them back.
//!
//! Works on the database while `gridward serve` runs: the forwarder picks retried rows up within
//! a second.

use std::io::Write;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use gridward_core::document::format_timestamp;
use gridward_store::{OutboxStats, Store};
use time::OffsetDateTime;

use crate::serve_cmd::StoreArg;

/// `gridward outbox`
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  gridward outbox                      # per target: pending, delivered, dead, lag\n  gridward outbox dead --target billing\n  gridward outbox retry --target billing   # every dead letter of billing back to pending\n  gridward outbox retry --id 1234 --id 1240"
)]
pub struct OutboxArgs {
    #[command(subcommand)]
    command: Option<OutboxCommand>,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Per target: pending, delivered and dead rows, and the lag of the oldest pending reading
    /// (the default).
    Status {
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the dead letters: readings a target refused for good (a 4xx other than 408/429).
    Dead {
        #[command(flatten)]
        store: StoreArg,
        /// Only this target's.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Most rows shown.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back to pending so the forwarder sends them again.
    Retry {
        #[command(flatten)]
        store: StoreArg,
        /// Only this target's.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Only these rows (the ID column of `gridward outbox dead`); default: all.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
    },
}

/// Runs `gridward outbox ...`.
pub fn run(args: OutboxArgs) -> Result<()> {
    match args.command {
        None => status(&args.store),
        Some(OutboxCommand::Status { store }) => status(&store),
        Some(OutboxCommand::Dead {
            store,
            target,
            limit,
        }) => dead(&store, target.as_deref(), limit),
        Some(OutboxCommand::Retry { store, target, ids }) => retry(&store, target.as_deref(), &ids),
    }
}

/// How far behind a target is: now minus the oldest pending reading's arrival.
pub fn lag(s: &OutboxStats, now: OffsetDateTime) -> String {
    match s.oldest_pending {
        None => "0 s".to_owned(),
        Some(t) => format!("{:.1} s", (now - t).as_seconds_f64().max(0.0)),
    }
}

fn status(store: &StoreArg) -> Result<()> {
    let store = store.open()?;
    let stats = store.outbox_stats()?;
    let now = OffsetDateTime::now_utc();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16}  {:>10}  {:>12}  {:>8}  {:>10}  OLDEST PENDING",
        "TARGET", "PENDING", "DELIVERED", "DEAD", "LAG"
    )?;
    for s in &stats {
        writeln!(
            out,
            "{:<16}  {:>10}  {:>12}  {:>8}  {:>10}  {}",
            s.target,
            s.pending,
            s.delivered,
            s.dead,
            lag(s, now),
            s.oldest_pending
                .map_or_else(|| "-".to_owned(), format_timestamp)
        )?;
    }
    if stats.is_empty() {
        eprintln!("no downstream target has been configured ([[forward]] in gridward.toml)");
    } else if stats.iter().any(|s| s.dead > 0) {
        eprintln!("dead letters: `gridward outbox dead`, then `gridward outbox retry`");
    }
    Ok(())
}

fn dead(store: &StoreArg, target: Option<&str>, limit: usize) -> Result<()> {
    let store = store.open()?;
    let rows = store.outbox_dead(target, limit)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>10}  {:<16}  {:<16}  {:>10}  {:>8}  {:<20}  REASON",
        "ID", "TARGET", "METER", "COUNTER", "ATTEMPTS", "DEAD SINCE"
    )?;
    for d in &rows {
        writeln!(
            out,
            "{:>10}  {:<16}  {:<16}  {:>10}  {:>8}  {:<20}  {}",
            d.id,
            d.target,
            d.meter_id.as_str(),
            d.counter,
            d.attempts,
            format_timestamp(d.dead_at),
            d.reason
        )?;
    }
    eprintln!("{} dead letter(s)", rows.len());
    Ok(())
}

fn retry(store: &StoreArg, target: Option<&str>, ids: &[i64]) -> Result<()> {
    let store = store.open()?;
    if let Some(t) = target
        && !store.outbox_stats()?.iter().any(|s| s.target == t)
    {
        bail!("no target named {t:?} (see `gridward outbox`)");
    }
    let n = store.outbox_retry(target, ids)?;
    println!("{n} dead letter(s) back to pending; a running head-end sends them within a second");
    if !ids.is_empty() && n < ids.len() as u64 {
        eprintln!(
            "{} of the given ids were not dead letters{}",
            ids.len() as u64 - n,
            target.map_or_else(String::new, |t| format!(" of {t}"))
        );
    }
    Ok(())
}
