//! `gridward concentrator ...`: the concentrator topology from the command line: which meters
//! are registered behind which data concentrator (a concentrator relays only for those).
//!
//! Works on the store of a configuration, next to a running `gridward serve`. `attach` and
//! `detach` act as `cli:$USER` and append one entry to the audit log
//! (`concentrator.topology`, target `concentrator:ID`, with the counts), as the HTTPS API does.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gridward_audit::{AuditLog, Outcome};
use gridward_core::MeterId;
use gridward_store::{AlarmStore, SqliteStore};
use serde_json::json;
use time::OffsetDateTime;

use crate::alarms_cmd::{open_audit, open_store, record};
use crate::serve_cmd::load_config;

/// The concentrator topology: list, attach, detach.
#[derive(Debug, Args)]
#[command(after_help = "\
A meter is registered behind at most one concentrator: attaching it to another one moves it. \
A concentrator's identity is its certificate (`gridward pki issue concentrator --name ID`); its \
relayed envelopes are each verified with the meter's own key, and relaying for a meter not \
registered behind it is refused with a security event.
`attach` and `detach` act as cli:$USER and are entries in the audit log (actor user:cli:$USER).

Examples:
  gridward concentrator list
  gridward concentrator attach dc-1 m000001 m000002 m000003
  gridward concentrator detach dc-1 m000003")]
pub struct ConcentratorArgs {
    /// The configuration whose `[store]` and `[audit]` to use.
    #[arg(
        long,
        short,
        default_value = "gridward.toml",
        value_name = "FILE",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: ConcentratorCmd,
}

#[derive(Debug, Subcommand)]
enum ConcentratorCmd {
    /// List the concentrators and the meters behind each (or one concentrator's meters).
    List(ListArgs),
    /// Register meters behind a concentrator (moving those registered behind another one).
    Attach(ChangeArgs),
    /// Remove meters from behind a concentrator.
    Detach(ChangeArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only this concentrator's meters.
    #[arg(value_name = "ID")]
    id: Option<String>,
    /// One JSON object per concentrator and line: {"concentrator_id", "meters"}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ChangeArgs {
    /// The concentrator's id.
    #[arg(value_name = "ID")]
    id: String,
    /// The meters (each named once; repeats are ignored).
    #[arg(value_name = "METER", required = true, num_args = 1..)]
    meters: Vec<String>,
}

/// Runs `gridward concentrator ...`.
pub fn run(args: ConcentratorArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let store = open_store(&config)?;
    match args.command {
        ConcentratorCmd::List(a) => list(&store, &a),
        ConcentratorCmd::Attach(a) => {
            let audit = open_audit(&config)?;
            change(&store, &audit, &a, true, OffsetDateTime::now_utc())
        }
        ConcentratorCmd::Detach(a) => {
            let audit = open_audit(&config)?;
            change(&store, &audit, &a, false, OffsetDateTime::now_utc())
        }
    }
}

fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn concentrator(raw: &str) -> Result<MeterId> {
    MeterId::new(raw).with_context(|| format!("{raw:?} is not a concentrator id"))
}

/// The meters of a change: valid ids, each once, not the concentrator itself.
fn meters(id: &MeterId, raw: &[String]) -> Result<Vec<MeterId>> {
    let set = raw
        .iter()
        .map(|m| MeterId::new(m).with_context(|| format!("{m:?} is not a meter id")))
        .collect::<Result<BTreeSet<_>>>()?;
    if set.contains(id) {
        bail!("{id} is the concentrator itself, not a meter behind it");
    }
    Ok(set.into_iter().collect())
}

/// The topology grouped by concentrator.
fn grouped(pairs: Vec<(MeterId, MeterId)>) -> Vec<(MeterId, Vec<MeterId>)> {
    let mut out: Vec<(MeterId, Vec<MeterId>)> = Vec::new();
    for (c, m) in pairs {
        match out.last_mut() {
            Some((last, ms)) if *last == c => ms.push(m),
            _ => out.push((c, vec![m])),
        }
    }
    out
}

fn list(store: &SqliteStore, a: &ListArgs) -> Result<()> {
    let groups = match &a.id {
        Some(raw) => {
            let id = concentrator(raw)?;
            let ms = store.concentrator_meters(&id)?;
            vec![(id, ms)]
        }
        None => grouped(store.topology()?),
    };
    for (c, ms) in &groups {
        if a.json {
            let meters: Vec<&str> = ms.iter().map(MeterId::as_str).collect();
            say(&json!({"concentrator_id": c.as_str(), "meters": meters}).to_string());
        } else {
            let names: Vec<&str> = ms.iter().map(MeterId::as_str).collect();
            say(&format!("{c}  {} meter(s)  {}", ms.len(), names.join(" ")));
        }
    }
    if !a.json {
        eprintln!("{} concentrator(s)", groups.len());
    }
    Ok(())
}

fn change(
    store: &SqliteStore,
    audit: &AuditLog,
    a: &ChangeArgs,
    attach: bool,
    at: OffsetDateTime,
) -> Result<()> {
    let id = concentrator(&a.id)?;
    let ms = meters(&id, &a.meters)?;
    let target = format!("concentrator:{id}");
    let result = if attach {
        store.attach_meters(&id, &ms, at)
    } else {
        store.detach_meters(&id, &ms)
    }
    .and_then(|n| Ok((n, store.concentrator_meters(&id)?.len())));
    match result {
        Ok((n, now)) => {
            let detail = if attach {
                format!(
                    "attach {} ({n} changed), detach 0 (0 were there); {now} meters behind it now",
                    ms.len()
                )
            } else {
                format!(
                    "attach 0 (0 changed), detach {} ({n} were there); {now} meters behind it now",
                    ms.len()
                )
            };
            record(
                audit,
                at,
                "concentrator.topology",
                &target,
                Outcome::Success,
                &detail,
            );
            say(&format!("{id}: {detail}"));
            Ok(())
        }
        Err(e) => {
            record(
                audit,
                at,
                "concentrator.topology",
                &target,
                Outcome::Failure,
                &e.to_string(),
            );
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConcentratorArgs,
    }

    fn parse(argv: &[&str]) -> Result<ConcentratorArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("concentrator").chain(argv.iter().copied()))
            .map(|c| c.args)
    }

    #[test]
    fn arguments_parse() {
        match parse(&["attach", "dc-1", "m1", "m2"]).unwrap().command {
            ConcentratorCmd::Attach(a) => {
                assert_eq!(a.id, "dc-1");
                assert_eq!(a.meters, ["m1", "m2"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["detach", "dc-1"]).is_err(), "needs meters");
        assert!(matches!(
            parse(&["list", "--json"]).unwrap().command,
            ConcentratorCmd::List(ListArgs {
                id: None,
                json: true
            })
        ));
        assert!(parse(&[]).is_err(), "needs a subcommand");
    }

    #[test]
    fn attach_move_and_detach_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("g.db"),
            gridward_store::KeySource::ephemeral().unwrap(),
        )
        .unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.db")).unwrap();
        let now = OffsetDateTime::now_utc();
        let args = |id: &str, ms: &[&str]| ChangeArgs {
            id: id.to_owned(),
            meters: ms.iter().map(|m| (*m).to_owned()).collect(),
        };
        change(
            &store,
            &audit,
            &args("dc-1", &["m1", "m2", "m1"]),
            true,
            now,
        )
        .unwrap();
        change(&store, &audit, &args("dc-2", &["m2"]), true, now).unwrap();
        change(&store, &audit, &args("dc-1", &["m1", "m9"]), false, now).unwrap();
        assert!(change(&store, &audit, &args("dc-1", &["bad id"]), true, now).is_err());
        assert!(change(&store, &audit, &args("dc-1", &["dc-1"]), true, now).is_err());
        let topo = grouped(store.topology().unwrap());
        assert_eq!(topo.len(), 1);
        assert_eq!(topo[0].0.as_str(), "dc-2");
        assert_eq!(topo[0].1.len(), 1);
        let entries = audit.entries(&gridward_audit::Query::default()).unwrap();
        let details: Vec<&str> = entries
            .iter()
            .filter(|e| e.action == "concentrator.topology")
            .map(|e| e.detail.as_str())
            .collect();
        assert_eq!(details.len(), 3, "{details:?}");
        assert!(
            details[0].starts_with("attach 2 (2 changed)"),
            "{details:?}"
        );
        assert!(
            details[1].starts_with("attach 1 (1 changed)"),
            "{details:?}"
        );
        assert!(
            details[2].contains("detach 2 (1 were there); 0 meters"),
            "{details:?}"
        );
        assert!(
            entries
                .iter()
                .filter(|e| e.action == "concentrator.topology")
                .all(|e| e.actor.to_string().starts_with("user:cli:"))
        );
    }
}
