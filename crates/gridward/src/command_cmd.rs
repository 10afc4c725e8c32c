//! `gridward command ...`: signed commands to meters from the command line.
//!
//! Works on the store of a configuration, next to a running `gridward serve`: `send` signs and
//! queues (through `gridward_command::Commands`, exactly as the API does: counters reserved
//! durably, one audit entry per command), and the running head-end's dispatcher sends what is
//! queued when the meter is connected (it looks at the queue at least every 10 s). `list`,
//! `show` and `proposals` only read.
//!
//! Argument parsing, the clock and printing only; the rules are `gridward-command`'s.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gridward_command::{IssueRequest, Issued};
use gridward_core::MeterId;
use gridward_core::command::{CommandBody, CommandId};
use gridward_hes::commands::{LocalCommands, policy};
use gridward_hes::config::{CommandSettings, Config};
use gridward_store::{
    CommandQuery, CommandStatus, CommandStore, ProposalStatus, SqliteStore, Store, StoredCommand,
    StoredProposal,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::serve_cmd::load_config;

/// Prints a line to stdout, ignoring write errors (a closed pipe, as in `| head`, must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Signed commands to meters: send (sign and queue), list, show, proposals.
#[derive(Debug, Args)]
#[command(after_help = "\
Commands are signed with the command-signer certificate of `[commands] signer` (issue one with \
`gridward pki issue command-signer --dir DIR headend`) and queued in the configuration's \
database; the running `gridward serve` sends each when its meter is connected (it looks at the \
queue at least every 10 s, and at once when a meter subscribes). A meter executes a command only \
after checking its signature, target, counter and expiry, and answers with a signed \
acknowledgement. Every command is an entry in the audit log, with the actor cli:$USER.
Firmware updates go through campaigns (the HTTPS API), not through `command send`.")]
pub struct CommandArgs {
    /// The configuration whose `[commands]`, `[store]`, `[pki]` and `[audit]` to use.
    #[arg(
        long,
        short,
        default_value = "gridward.toml",
        value_name = "FILE",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: CommandCmd,
}

#[derive(Debug, Subcommand)]
enum CommandCmd {
    /// Sign and queue a command to a meter (sent by the running head-end when the meter is
    /// connected); --wait follows it to its outcome.
    Send(SendArgs),
    /// List commands, newest first: id, meter, kind, status, counter, attempts, issuer.
    List(ListArgs),
    /// Show one command: lifecycle, identities, counter, attempts, outcome, envelope SHA-256.
    Show(ShowArgs),
    /// List four-eyes proposals (critical commands to many meters). They are decided by a
    /// second operator through the HTTPS API (POST /api/v1/proposals/{id}/approve or /reject),
    /// never on the command line.
    Proposals(ProposalsArgs),
}

/// What `command send` asks a meter to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KindArg {
    /// Open the relay (supply off).
    Disconnect,
    /// Close the relay (supply on).
    Reconnect,
    /// Report every --seconds seconds.
    SetReportingInterval,
    /// Switch to tariff --tariff.
    SetTariff,
    /// Send a reading now.
    ReadNow,
}

/// Output format of `command list`, `show` and `proposals`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// Columns (list) or one field per line (show).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  gridward command send --meter m000001 read-now
  gridward command send --meter m000001 set-tariff --tariff night --reason 'contract change' --wait 60
  gridward command send --meter m000001 --meter m000002 set-reporting-interval --seconds 900
A critical command (`[commands] critical`) to more than `four_eyes_threshold` meters needs a \
second operator: propose it through the HTTPS API instead.")]
struct SendArgs {
    /// The target meter (repeat for more; each gets its own signed command and counter).
    #[arg(long = "meter", value_name = "ID", required = true)]
    meters: Vec<String>,
    /// What to do.
    #[arg(value_enum, value_name = "KIND")]
    kind: KindArg,
    /// With set-reporting-interval: the new interval in seconds.
    #[arg(long, value_name = "N")]
    seconds: Option<u32>,
    /// With set-tariff: the tariff's name (letters, digits, '_', '.', '-').
    #[arg(long, value_name = "T")]
    tariff: Option<String>,
    /// The command's lifetime in seconds: not executed after it [default: `[commands] ttl_secs`].
    #[arg(long, value_name = "SECS")]
    ttl: Option<u32>,
    /// Why (kept in the audit log).
    #[arg(long, value_name = "TEXT", default_value = "")]
    reason: String,
    /// Follow the command(s) for at most SECS seconds and print the outcome; exit non-zero
    /// unless every one was acknowledged (refused, expired, failed, or still pending).
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only commands to this meter.
    #[arg(long, value_name = "ID")]
    meter: Option<String>,
    /// Only commands in this status: queued, sent, acknowledged, refused, expired, failed.
    #[arg(long, value_name = "S", value_parser = parse_status)]
    status: Option<CommandStatus>,
    /// At most this many (the newest).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The command's id (32 hex digits, as `command send` and `command list` print it).
    #[arg(value_name = "ID")]
    id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,
}

#[derive(Debug, Args)]
struct ProposalsArgs {
    /// Only proposals in this status: pending, approved, rejected, expired.
    #[arg(long, value_name = "S", value_parser = parse_proposal_status)]
    status: Option<ProposalStatus>,
    /// At most this many (the newest).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,
}

fn parse_status(s: &str) -> Result<CommandStatus, String> {
    s.parse()
        .map_err(|e: gridward_store::UnknownStatus| e.to_string())
}

fn parse_proposal_status(s: &str) -> Result<ProposalStatus, String> {
    s.parse()
        .map_err(|e: gridward_store::UnknownStatus| e.to_string())
}

/// Runs `gridward command ...`.
pub fn run(args: CommandArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    match args.command {
        CommandCmd::Send(a) => send(&args.config, &config, a),
        CommandCmd::List(a) => list(&config, a),
        CommandCmd::Show(a) => show(&config, a),
        CommandCmd::Proposals(a) => proposals(&config, a),
    }
}

/// The configuration's database; it must exist.
fn open_store(config: &Config) -> Result<SqliteStore> {
    crate::alarms_cmd::open_store(config)
}

/// The `[commands]` settings, or why commands are off.
fn settings<'a>(config_path: &Path, config: &'a Config) -> Result<&'a CommandSettings> {
    config.commands.as_ref().with_context(|| {
        format!(
            "commands are off in {} (`[commands] signer = \"off\"`): set `signer` to a command-signer certificate's name (`gridward pki issue command-signer --dir {} headend` issues one)",
            config_path.display(),
            config.pki_dir.display()
        )
    })
}

fn parse_meter(raw: &str) -> Result<MeterId> {
    MeterId::new(raw).with_context(|| format!("--meter {raw:?} is not a meter id"))
}

/// The command body of `kind` with its flags; a flag that does not belong to `kind` is refused.
fn body(kind: KindArg, seconds: Option<u32>, tariff: Option<String>) -> Result<CommandBody> {
    if seconds.is_some() && kind != KindArg::SetReportingInterval {
        bail!("--seconds goes with set-reporting-interval only");
    }
    if tariff.is_some() && kind != KindArg::SetTariff {
        bail!("--tariff goes with set-tariff only");
    }
    let body = match kind {
        KindArg::Disconnect => CommandBody::Disconnect,
        KindArg::Reconnect => CommandBody::Reconnect,
        KindArg::SetReportingInterval => CommandBody::SetReportingInterval {
            seconds: seconds
                .context("set-reporting-interval needs --seconds N (the new interval)")?,
        },
        KindArg::SetTariff => CommandBody::SetTariff {
            tariff: tariff.context("set-tariff needs --tariff NAME")?,
        },
        KindArg::ReadNow => CommandBody::ReadNow,
    };
    body.validate()
        .map_err(|e| anyhow::anyhow!("invalid arguments for {}: {e}", body.kind()))?;
    Ok(body)
}

/// `cli:` and the operating-system user: who issued a command from the command line (API user
/// names cannot contain ':', so this never names an API user).
pub(crate) fn cli_actor() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("cli:{user}")
}

fn send(config_path: &Path, config: &Config, a: SendArgs) -> Result<()> {
    let meters = a
        .meters
        .iter()
        .map(|m| parse_meter(m))
        .collect::<Result<Vec<_>>>()?;
    let body = body(a.kind, a.seconds, a.tariff)?;
    let settings = settings(config_path, config)?;
    let policy = policy(settings);
    if policy.needs_four_eyes(body.kind(), meters.len()) {
        bail!(
            "{} to {} meters needs a second operator's approval (four eyes: more than {} meters); propose it through the HTTPS API as an operator (POST /api/v1/commands), where another operator approves it",
            body.kind(),
            meters.len(),
            policy.four_eyes_threshold
        );
    }
    let local =
        LocalCommands::open(config).context("commands cannot be issued on this configuration")?;
    let (commands, store) = (local.commands, local.store);
    let actor = cli_actor();
    let issued = commands.issue(IssueRequest {
        meters: meters.clone(),
        body,
        actor: actor.clone(),
        ttl: a.ttl.map(|s| time::Duration::seconds(i64::from(s))),
        reason: a.reason,
    })?;
    let ids = match issued {
        Issued::Queued { ids } => ids,
        Issued::Proposed {
            proposal_id,
            expires_at,
        } => {
            say!(
                "proposal {proposal_id}: needs a second operator's approval through the HTTPS API before {}",
                fmt_time(expires_at)
            );
            return Ok(());
        }
    };
    let connected: Vec<MeterId> = store
        .meters()
        .map(|rows| {
            rows.into_iter()
                .filter(|m| m.connected)
                .map(|m| m.meter_id)
                .collect()
        })
        .unwrap_or_default();
    for id in &ids {
        let Some(c) = store.command(id)? else {
            bail!("command {id} was queued but is not in the store");
        };
        say!("{id}");
        eprintln!(
            "queued {} to {} (counter {}, expires {}, issued by {actor}); {}",
            c.kind,
            c.meter_id,
            c.counter,
            fmt_time(c.expires_at),
            if connected.contains(&c.meter_id) {
                "the meter is connected: the running `gridward serve` sends it within about 10 s"
            } else {
                "it will be sent when the meter is connected (by the running `gridward serve` of this configuration)"
            }
        );
    }
    match a.wait {
        Some(secs) => wait(&store, &ids, Duration::from_secs(secs)),
        None => Ok(()),
    }
}

/// Polls the store until every command in `ids` is final or `limit` passed; prints each
/// change. Fails unless every one was acknowledged.
fn wait(store: &SqliteStore, ids: &[CommandId], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last: Vec<Option<(CommandStatus, u32)>> = vec![None; ids.len()];
    let mut finals: Vec<Option<StoredCommand>> = vec![None; ids.len()];
    loop {
        for (i, id) in ids.iter().enumerate() {
            if finals[i].is_some() {
                continue;
            }
            let Some(c) = store.command(id)? else {
                bail!("command {id} disappeared from the store");
            };
            let now = (c.status, c.attempts);
            if last[i] != Some(now) {
                last[i] = Some(now);
                match c.status {
                    CommandStatus::Queued if c.attempts == 0 => {
                        eprintln!("{id}: queued, waiting for the head-end to send it")
                    }
                    CommandStatus::Queued | CommandStatus::Sent => eprintln!(
                        "{id}: {} (published {} time(s), last {})",
                        c.status,
                        c.attempts,
                        c.sent_at.map_or_else(|| "-".to_owned(), fmt_time)
                    ),
                    _ => {}
                }
            }
            if c.status.is_final() {
                say!("{id}: {}", outcome_line(&c));
                finals[i] = Some(c);
            }
        }
        if finals.iter().all(Option::is_some) {
            break;
        }
        if Instant::now() >= deadline {
            let pending = finals.iter().filter(|f| f.is_none()).count();
            bail!(
                "{pending} command(s) not final after {} s (is `gridward serve` running with this configuration, and the meter connected?); `gridward command show ID` follows them",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let bad: Vec<&StoredCommand> = finals
        .iter()
        .flatten()
        .filter(|c| c.status != CommandStatus::Acknowledged)
        .collect();
    if let Some(first) = bad.first() {
        bail!(
            "{} of {} command(s) not executed; the first: {} {}",
            bad.len(),
            ids.len(),
            first.id,
            outcome_line(first)
        );
    }
    Ok(())
}

/// The final status and what the meter or head-end said.
fn outcome_line(c: &StoredCommand) -> String {
    let at = c.settled_at.map_or_else(|| "-".to_owned(), fmt_time);
    match c.status {
        CommandStatus::Acknowledged => {
            format!("acknowledged: meter {} executed it at {at}", c.meter_id)
        }
        CommandStatus::Refused => format!(
            "refused by meter {} at {at}: {}",
            c.meter_id,
            c.outcome.as_deref().unwrap_or("no reason given")
        ),
        CommandStatus::Expired => format!(
            "expired at {at} without an acknowledgement{}",
            c.outcome
                .as_deref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_default()
        ),
        CommandStatus::Failed => format!(
            "failed at {at}: {}",
            c.outcome.as_deref().unwrap_or("no detail")
        ),
        other => other.to_string(),
    }
}

fn list(config: &Config, a: ListArgs) -> Result<()> {
    let store = open_store(config)?;
    let q = CommandQuery {
        meter_id: a.meter.as_deref().map(parse_meter).transpose()?,
        status: a.status,
        limit: a.limit,
        ..CommandQuery::default()
    };
    let rows = store.commands(&q)?;
    let mut out = std::io::stdout().lock();
    match a.format {
        FormatArg::Json => {
            for c in &rows {
                writeln!(out, "{}", command_json(c))?;
            }
        }
        FormatArg::Text => {
            writeln!(
                out,
                "{:<32}  {:<16}  {:<22}  {:<12}  {:>8}  {:>3}  {:<20}  ISSUED BY",
                "ID", "METER", "KIND", "STATUS", "COUNTER", "TRY", "ISSUED"
            )?;
            for c in &rows {
                writeln!(
                    out,
                    "{:<32}  {:<16}  {:<22}  {:<12}  {:>8}  {:>3}  {:<20}  {}",
                    c.id.to_string(),
                    c.meter_id.as_str(),
                    c.kind.as_str(),
                    c.status.as_str(),
                    c.counter,
                    c.attempts,
                    fmt_time(c.issued_at),
                    c.issued_by
                )?;
            }
            eprintln!("{} command(s)", rows.len());
        }
    }
    Ok(())
}

fn show(config: &Config, a: ShowArgs) -> Result<()> {
    let id: CommandId = a
        .id
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}; pass the id as `gridward command list` prints it"))?;
    let store = open_store(config)?;
    let c = store
        .command(&id)?
        .with_context(|| format!("no command {id} in {}", config.store_path.display()))?;
    if a.format == FormatArg::Json {
        say!("{}", command_json(&c));
        return Ok(());
    }
    let opt = |t: Option<OffsetDateTime>| t.map_or_else(|| "-".to_owned(), fmt_time);
    say!("command        {}", c.id);
    say!("meter          {}", c.meter_id);
    say!("kind           {}", c.kind);
    say!("arguments      {}", c.args_json);
    say!("status         {}", c.status);
    say!("counter        {}", c.counter);
    say!("issued at      {}", fmt_time(c.issued_at));
    say!("expires at     {}", fmt_time(c.expires_at));
    say!("issued by      {}", c.issued_by);
    say!(
        "approved by    {}",
        c.approved_by
            .as_deref()
            .unwrap_or("- (no four eyes needed)")
    );
    say!(
        "proposal       {}",
        c.proposal_id
            .map_or_else(|| "-".to_owned(), |p| p.to_string())
    );
    say!(
        "campaign       {}",
        c.campaign_id
            .map_or_else(|| "-".to_owned(), |p| p.to_string())
    );
    say!("attempts       {}", c.attempts);
    say!("last sent at   {}", opt(c.sent_at));
    say!("settled at     {}", opt(c.settled_at));
    say!("outcome        {}", outcome_line(&c));
    say!(
        "ack message    {}",
        c.ack_message_id.map_or_else(
            || "-".to_owned(),
            |m| format!("{m} (the meter's signed acknowledgement)")
        )
    );
    say!(
        "envelope       {} bytes, SHA-256 {}",
        c.envelope.len(),
        hex::encode(Sha256::digest(&c.envelope))
    );
    Ok(())
}

fn command_json(c: &StoredCommand) -> Value {
    let opt = |t: Option<OffsetDateTime>| t.map(fmt_time);
    json!({
        "id": c.id.to_string(),
        "meter_id": c.meter_id.as_str(),
        "kind": c.kind.as_str(),
        "args": serde_json::from_str::<Value>(&c.args_json).unwrap_or(Value::String(c.args_json.clone())),
        "status": c.status.as_str(),
        "counter": c.counter,
        "issued_at": fmt_time(c.issued_at),
        "expires_at": fmt_time(c.expires_at),
        "issued_by": c.issued_by,
        "approved_by": c.approved_by,
        "proposal_id": c.proposal_id,
        "campaign_id": c.campaign_id,
        "attempts": c.attempts,
        "sent_at": opt(c.sent_at),
        "settled_at": opt(c.settled_at),
        "outcome": c.outcome,
        "ack_message_id": c.ack_message_id,
        "envelope_bytes": c.envelope.len(),
        "envelope_sha256": hex::encode(Sha256::digest(&c.envelope)),
    })
}

fn proposals(config: &Config, a: ProposalsArgs) -> Result<()> {
    let store = open_store(config)?;
    let rows = store.proposals(a.status, a.limit)?;
    let mut out = std::io::stdout().lock();
    match a.format {
        FormatArg::Json => {
            for p in &rows {
                writeln!(out, "{}", proposal_json(p))?;
            }
        }
        FormatArg::Text => {
            writeln!(
                out,
                "{:>6}  {:<22}  {:>6}  {:<9}  {:<16}  {:<20}  {:<20}  DECIDED BY / REASON",
                "ID", "KIND", "METERS", "STATUS", "PROPOSED BY", "CREATED", "EXPIRES"
            )?;
            for p in &rows {
                writeln!(
                    out,
                    "{:>6}  {:<22}  {:>6}  {:<9}  {:<16}  {:<20}  {:<20}  {} / {}",
                    p.id,
                    p.kind.as_str(),
                    p.meters.len(),
                    p.status.as_str(),
                    p.proposed_by,
                    fmt_time(p.created_at),
                    fmt_time(p.expires_at),
                    p.decided_by.as_deref().unwrap_or("-"),
                    p.reason
                )?;
            }
            eprintln!(
                "{} proposal(s); a second operator decides them through the HTTPS API",
                rows.len()
            );
        }
    }
    Ok(())
}

fn proposal_json(p: &StoredProposal) -> Value {
    json!({
        "id": p.id,
        "kind": p.kind.as_str(),
        "args": serde_json::from_str::<Value>(&p.args_json).unwrap_or(Value::String(p.args_json.clone())),
        "meters": p.meters.iter().map(MeterId::as_str).collect::<Vec<_>>(),
        "proposed_by": p.proposed_by,
        "created_at": fmt_time(p.created_at),
        "expires_at": fmt_time(p.expires_at),
        "reason": p.reason,
        "status": p.status.as_str(),
        "decided_by": p.decided_by,
        "decided_at": p.decided_at.map(fmt_time),
        "note": p.note,
    })
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The kinds `command send` offers (every kind but firmware updates, which go through
/// campaigns).
#[cfg(test)]
const SENDABLE: [gridward_core::command::CommandKind; 5] = [
    gridward_core::command::CommandKind::Disconnect,
    gridward_core::command::CommandKind::Reconnect,
    gridward_core::command::CommandKind::SetReportingInterval,
    gridward_core::command::CommandKind::SetTariff,
    gridward_core::command::CommandKind::ReadNow,
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_kind_but_firmware_maps_to_its_body() {
        let kinds: Vec<gridward_core::command::CommandKind> = KindArg::value_variants()
            .iter()
            .map(|k| {
                let (s, t) = match k {
                    KindArg::SetReportingInterval => (Some(900), None),
                    KindArg::SetTariff => (None, Some("night".to_owned())),
                    _ => (None, None),
                };
                body(*k, s, t).unwrap().kind()
            })
            .collect();
        assert_eq!(kinds, SENDABLE);
    }

    #[test]
    fn flags_that_do_not_belong_to_the_kind_are_refused() {
        let e = body(KindArg::ReadNow, Some(60), None).unwrap_err();
        assert!(e.to_string().contains("--seconds"), "{e}");
        let e = body(KindArg::Disconnect, None, Some("x".into())).unwrap_err();
        assert!(e.to_string().contains("--tariff"), "{e}");
        let e = body(KindArg::SetTariff, None, None).unwrap_err();
        assert!(e.to_string().contains("needs --tariff"), "{e}");
        let e = body(KindArg::SetReportingInterval, None, None).unwrap_err();
        assert!(e.to_string().contains("needs --seconds"), "{e}");
        // Out of bounds: the same check the meter makes.
        let e = body(KindArg::SetReportingInterval, Some(0), None).unwrap_err();
        assert!(e.to_string().contains("invalid arguments"), "{e}");
        let e = body(KindArg::SetTariff, None, Some("no spaces".into())).unwrap_err();
        assert!(e.to_string().contains("invalid arguments"), "{e}");
    }

    #[test]
    fn the_cli_actor_cannot_be_an_api_user() {
        assert!(cli_actor().starts_with("cli:"));
    }
}
