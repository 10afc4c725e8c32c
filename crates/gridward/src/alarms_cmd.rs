//! `gridward alarms ...`: the detectors' alarms from the command line: list, show, acknowledge,
//! clear.
//!
//! Works on the store of a configuration, next to a running `gridward serve` (SQLite serialises
//! the writers; every change is one durable transaction). Acknowledging and clearing act as the
//! operating-system user, `cli:$USER` (audit actor `user:cli:$USER`, the same name the
//! `gridward command` CLI issues commands under), and append one entry to the configuration's
//! audit log (`alarm.acknowledge`, `alarm.clear`, target `alarm:ID`), as the HTTPS API does.
//!
//! Argument parsing, the clock and printing only; the lifecycle rules are the store's.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gridward_api::routes::alarms::{DEFAULT_CLEAR_REASON, SEVERITIES, alarm_view};
use gridward_audit::{Actor, AuditLog, NewEntry, Outcome};
use gridward_core::document::format_timestamp;
use gridward_hes::config::Config;
use gridward_store::{AlarmChangeError, AlarmQuery, AlarmStore, SqliteStore, StoredAlarm};
use time::OffsetDateTime;

use crate::command_cmd::cli_actor;
use crate::serve_cmd::load_config;

/// How many alarms `gridward alarms` lists unless told.
const DEFAULT_LIMIT: usize = 100;

/// Longest `--reason`, in characters (as the API).
const MAX_REASON_CHARS: usize = 1000;

/// Alarms: list (the default), show, ack, clear.
#[derive(Debug, Args)]
#[command(after_help = "\
Without a subcommand, lists alarms, newest first: id, severity, type, originator, state, first \
and last seen, count, summary.
Alarm types: tamper, power_failure, outage, theft_suspected, register_stalled, refusal_burst, \
refusal_burst_fleet, cloned_meter, silent_after_revocation, plc_meter_lost, relay_refused.
Severities: critical, major, minor, warning. States: active_unacknowledged, active_acknowledged, \
cleared (final: the next raise of the same type and originator opens a new alarm).
`ack` and `clear` act as cli:$USER and are entries in the audit log (actor user:cli:$USER).

Examples:
  gridward alarms --active --severity critical
  gridward alarms --type tamper --json
  gridward alarms show 42
  gridward alarms ack 42
  gridward alarms clear 42 --reason 'seal replaced on site'")]
pub struct AlarmsArgs {
    /// The configuration whose `[store]` and `[audit]` to use.
    #[arg(
        long,
        short,
        default_value = "gridward.toml",
        value_name = "FILE",
        global = true
    )]
    config: PathBuf,
    #[command(flatten)]
    list: ListArgs,
    #[command(subcommand)]
    command: Option<AlarmsCmd>,
}

#[derive(Debug, Subcommand)]
enum AlarmsCmd {
    /// Show one alarm with its evidence (the events that triggered it).
    Show(ShowArgs),
    /// Acknowledge an active alarm (as cli:$USER; audited).
    Ack(AckArgs),
    /// Clear an active alarm, acknowledged or not (as cli:$USER; audited). Final.
    Clear(ClearArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only active (not cleared) alarms.
    #[arg(long)]
    active: bool,
    /// Only alarms of this type (e.g. tamper, outage, cloned_meter).
    #[arg(long = "type", value_name = "TYPE")]
    alarm_type: Option<String>,
    /// Only alarms of this severity: critical, major, minor, warning.
    #[arg(long, value_name = "S", value_parser = parse_severity)]
    severity: Option<String>,
    /// Only alarms of this originator (e.g. meter:m000001, concentrator:dc-1, fleet).
    #[arg(long, value_name = "O")]
    originator: Option<String>,
    /// At most this many (the newest).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
    limit: usize,
    /// One JSON object per line (as the HTTPS API shows an alarm) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The alarm's id (as `gridward alarms` lists it).
    #[arg(value_name = "ID")]
    id: i64,
    /// One JSON object instead of one field per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct AckArgs {
    /// The alarm's id.
    #[arg(value_name = "ID")]
    id: i64,
}

#[derive(Debug, Args)]
struct ClearArgs {
    /// The alarm's id.
    #[arg(value_name = "ID")]
    id: i64,
    /// Why (kept with the alarm and in the audit log) [default: "cleared by an operator"].
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

fn parse_severity(s: &str) -> Result<String, String> {
    if SEVERITIES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not one of {}", SEVERITIES.join(", ")))
    }
}

/// Runs `gridward alarms ...`.
pub fn run(args: AlarmsArgs) -> Result<()> {
    check(&args)?;
    let config = load_config(&args.config)?;
    let store = open_store(&config)?;
    match args.command {
        None => list(&store, &args.list),
        Some(AlarmsCmd::Show(a)) => show(&store, &a),
        Some(AlarmsCmd::Ack(a)) => {
            let audit = open_audit(&config)?;
            ack(&store, &audit, a.id, OffsetDateTime::now_utc())
        }
        Some(AlarmsCmd::Clear(a)) => {
            let audit = open_audit(&config)?;
            clear(&store, &audit, &a, OffsetDateTime::now_utc())
        }
    }
}

/// Refuses listing flags given with a subcommand (`gridward alarms --active ack 3`).
fn check(args: &AlarmsArgs) -> Result<()> {
    let l = &args.list;
    let listing = l.active
        || l.alarm_type.is_some()
        || l.severity.is_some()
        || l.originator.is_some()
        || l.limit != DEFAULT_LIMIT
        || l.json;
    if args.command.is_some() && listing {
        bail!(
            "--active, --type, --severity, --originator, --limit and --json are for listing (gridward alarms without a subcommand)"
        );
    }
    Ok(())
}

/// The configuration's database; it must exist (a mistyped path must not get a new, empty one
/// that no head-end reads).
pub(crate) fn open_store(config: &Config) -> Result<SqliteStore> {
    let path = &config.store_path;
    if !path.exists() {
        bail!(
            "no database at {} (has `gridward serve` run with this configuration?)",
            path.display()
        );
    }
    config
        .open_existing_store()
        .with_context(|| format!("opening the database {}", path.display()))
}

/// The configuration's audit log.
pub(crate) fn open_audit(config: &Config) -> Result<AuditLog> {
    AuditLog::open(&config.audit.path)
        .with_context(|| format!("opening the audit log {}", config.audit.path.display()))
}

/// The audit actor of the command line: `user:cli:$USER`.
pub(crate) fn actor() -> Actor {
    Actor::User(cli_actor())
}

/// Appends one entry for an act of the command line; a failed append is reported on stderr
/// (the act already happened).
pub(crate) fn record(
    audit: &AuditLog,
    at: OffsetDateTime,
    action: &str,
    target: &str,
    outcome: Outcome,
    detail: &str,
) {
    let entry = NewEntry::new(at, actor(), action, target, outcome)
        .detail(format!("{detail}; via the command line"));
    if let Err(e) = audit.append(&entry) {
        eprintln!("warning: the audit log did not take the entry: {e}");
    }
}

/// Prints a line to stdout, ignoring write errors (a closed pipe, as in `| head`).
fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn query(a: &ListArgs) -> Result<AlarmQuery> {
    if a.limit == 0 {
        bail!("--limit must be at least 1");
    }
    Ok(AlarmQuery {
        active_only: a.active,
        alarm_type: a.alarm_type.clone(),
        severity: a.severity.clone(),
        originator: a.originator.clone(),
        before: None,
        limit: a.limit,
    })
}

/// One table row.
fn row(a: &StoredAlarm) -> String {
    format!(
        "{:>6}  {:<8}  {:<23}  {:<28}  {:<21}  {:<20}  {:<20}  {:>6}  {}",
        a.id,
        a.severity,
        a.alarm_type,
        a.originator,
        a.state.code(),
        format_timestamp(a.first_seen),
        format_timestamp(a.last_seen),
        a.count,
        a.summary
    )
}

fn list(store: &SqliteStore, a: &ListArgs) -> Result<()> {
    let rows = store.alarms(&query(a)?)?;
    if a.json {
        for r in &rows {
            say(&serde_json::to_string(&alarm_view(r))?);
        }
        return Ok(());
    }
    say(&format!(
        "{:>6}  {:<8}  {:<23}  {:<28}  {:<21}  {:<20}  {:<20}  {:>6}  SUMMARY",
        "ID", "SEVERITY", "TYPE", "ORIGINATOR", "STATE", "FIRST SEEN", "LAST SEEN", "COUNT"
    ));
    for r in &rows {
        say(&row(r));
    }
    eprintln!("{} alarm(s)", rows.len());
    Ok(())
}

fn get(store: &SqliteStore, id: i64) -> Result<StoredAlarm> {
    store
        .alarm(id)?
        .with_context(|| format!("alarm {id} does not exist"))
}

/// One field per line, then the evidence, one entry per line.
fn details(a: &StoredAlarm) -> Vec<String> {
    let mut out = vec![
        format!("id:           {}", a.id),
        format!("type:         {}", a.alarm_type),
        format!("severity:     {}", a.severity),
        format!("originator:   {}", a.originator),
        format!("state:        {}", a.state.code()),
        format!("first seen:   {}", format_timestamp(a.first_seen)),
        format!("last seen:    {}", format_timestamp(a.last_seen)),
        format!("count:        {}", a.count),
        format!("summary:      {}", a.summary),
    ];
    match &a.acknowledged {
        Some((by, at)) => out.push(format!("acknowledged: {} by {by}", format_timestamp(*at))),
        None => out.push("acknowledged: -".to_owned()),
    }
    match &a.cleared {
        Some((by, at, reason)) => out.push(format!(
            "cleared:      {} by {by}: {reason}",
            format_timestamp(*at)
        )),
        None => out.push("cleared:      -".to_owned()),
    }
    let evidence = alarm_view(a).evidence;
    out.push(format!("evidence:     {} entr(ies)", evidence.len()));
    out.extend(evidence.iter().map(|e| format!("  {e}")));
    out
}

fn show(store: &SqliteStore, a: &ShowArgs) -> Result<()> {
    let alarm = get(store, a.id)?;
    if a.json {
        say(&serde_json::to_string(&alarm_view(&alarm))?);
    } else {
        for line in details(&alarm) {
            say(&line);
        }
    }
    Ok(())
}

/// Records the outcome of an acknowledgement or clear and turns a refusal into an error.
fn finish(
    audit: &AuditLog,
    at: OffsetDateTime,
    action: &str,
    id: i64,
    result: Result<StoredAlarm, AlarmChangeError>,
    done: impl FnOnce(&StoredAlarm) -> String,
) -> Result<StoredAlarm> {
    let target = format!("alarm:{id}");
    match result {
        Ok(a) => {
            let detail = done(&a);
            record(audit, at, action, &target, Outcome::Success, &detail);
            say(&detail);
            Ok(a)
        }
        Err(e) => {
            record(audit, at, action, &target, Outcome::Failure, &e.to_string());
            Err(e.into())
        }
    }
}

fn ack(store: &SqliteStore, audit: &AuditLog, id: i64, at: OffsetDateTime) -> Result<()> {
    let by = actor().to_string();
    let result = store.acknowledge_alarm(id, &by, at);
    finish(audit, at, "alarm.acknowledge", id, result, |a| {
        format!(
            "acknowledged alarm {id} ({} {} of {}) as {by}",
            a.severity, a.alarm_type, a.originator
        )
    })?;
    Ok(())
}

fn clear(store: &SqliteStore, audit: &AuditLog, a: &ClearArgs, at: OffsetDateTime) -> Result<()> {
    let reason = match a.reason.as_deref().map(str::trim) {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => {
            bail!("--reason is longer than {MAX_REASON_CHARS} characters")
        }
        Some(r) if !r.is_empty() => r.to_owned(),
        _ => DEFAULT_CLEAR_REASON.to_owned(),
    };
    let by = actor().to_string();
    let id = a.id;
    let result = store.clear_alarm(id, &by, at, &reason);
    finish(audit, at, "alarm.clear", id, result, |al| {
        format!(
            "cleared alarm {id} ({} {} of {}) as {by}: {reason}",
            al.severity, al.alarm_type, al.originator
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::Parser;
    use gridward_store::RaiseAlarm;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: AlarmsArgs,
    }

    fn parse(argv: &[&str]) -> Result<AlarmsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("alarms").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn arguments_parse() {
        let a = parse(&[
            "--active",
            "--type",
            "tamper",
            "--severity",
            "major",
            "--json",
        ])
        .unwrap();
        assert!(a.command.is_none());
        assert!(a.list.active && a.list.json);
        assert_eq!(a.list.alarm_type.as_deref(), Some("tamper"));
        assert_eq!(a.list.limit, 100);
        assert!(parse(&["--severity", "huge"]).is_err());
        let a = parse(&["-c", "x.toml", "clear", "7", "--reason", "fixed"]).unwrap();
        assert_eq!(a.config, PathBuf::from("x.toml"));
        match a.command {
            Some(AlarmsCmd::Clear(c)) => {
                assert_eq!(c.id, 7);
                assert_eq!(c.reason.as_deref(), Some("fixed"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["ack", "3", "--config", "y.toml"]).unwrap().command,
            Some(AlarmsCmd::Ack(AckArgs { id: 3 }))
        ));
        assert!(parse(&["ack", "three"]).is_err());
        assert!(parse(&["show"]).is_err(), "show needs an id");
        assert!(
            check(&parse(&["--active", "ack", "3"]).unwrap()).is_err(),
            "filters are for listing"
        );
        assert!(check(&parse(&["-c", "x.toml", "ack", "3"]).unwrap()).is_ok());
        assert!(check(&parse(&["--active", "--limit", "5"]).unwrap()).is_ok());
    }

    #[test]
    fn ack_and_clear_are_audited_as_the_cli_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("g.db"),
            gridward_store::KeySource::ephemeral().unwrap(),
        )
        .unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.db")).unwrap();
        let now = OffsetDateTime::now_utc();
        let id = store
            .raise_alarm(&RaiseAlarm {
                alarm_type: "tamper".into(),
                severity: "major".into(),
                originator: "meter:m-1".into(),
                at: now,
                summary: "cover opened".into(),
                evidence_json: r#"[{"event":"CoverOpened"}]"#.into(),
            })
            .unwrap()
            .alarm()
            .id;
        ack(&store, &audit, id, now).unwrap();
        let err = ack(&store, &audit, id, now).unwrap_err();
        assert!(err.to_string().contains("already acknowledged"), "{err}");
        let args = ClearArgs { id, reason: None };
        clear(&store, &audit, &args, now).unwrap();
        let a = store.alarm(id).unwrap().unwrap();
        let by = a.acknowledged.as_ref().unwrap().0.clone();
        assert!(by.starts_with("user:cli:"), "{by}");
        assert_eq!(a.cleared.as_ref().unwrap().2, DEFAULT_CLEAR_REASON);
        let entries = audit.entries(&gridward_audit::Query::default()).unwrap();
        let mine: Vec<_> = entries
            .iter()
            .filter(|e| e.action.starts_with("alarm."))
            .map(|e| (e.action.as_str(), e.outcome, e.actor.to_string()))
            .collect();
        assert_eq!(
            mine,
            vec![
                ("alarm.acknowledge", Outcome::Success, by.clone()),
                ("alarm.acknowledge", Outcome::Failure, by.clone()),
                ("alarm.clear", Outcome::Success, by.clone()),
            ]
        );
        assert!(
            entries
                .iter()
                .all(|e| e.target.is_empty() || e.target == format!("alarm:{id}"))
        );
        let text = details(&a).join("\n");
        assert!(
            text.contains("CoverOpened") && text.contains("cleared:"),
            "{text}"
        );
        assert!(row(&a).contains("cleared"));
    }
}
