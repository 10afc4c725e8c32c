//! `gridward audit`: verify, show and checkpoint the tamper-evident audit log.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gridward_audit::{AuditKey, AuditLog, Query, VerifierKey};

use crate::serve_cmd::{load_config, parse_time};

/// The audit log: every login, lockout, user change, PKI operation, refusal and security event,
/// hash-chained, with signed checkpoints (docs/audit-format.md).
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The configuration whose `[audit]` to use.
    #[arg(
        long,
        short,
        default_value = "gridward.toml",
        value_name = "FILE",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Checks the chain and every checkpoint; names the first entry changed, deleted, inserted
    /// or reordered. Exit status 1 if the log was tampered with.
    Verify {
        /// Check against this verifier key (NAME+KEYID+KEY, from `gridward audit key`) instead
        /// of the configured key file: what a third party who kept the key does.
        #[arg(long, value_name = "VKEY")]
        verifier: Option<String>,
    },
    /// Shows entries, oldest first.
    Show {
        /// Only entries at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only this actor (user:NAME, cert:NAME, system) or a prefix ending in ':' (user:).
        #[arg(long, value_name = "ACTOR")]
        actor: Option<String>,
        /// Only this action (login.failure) or a prefix ending in '.' (login.).
        #[arg(long, value_name = "ACTION")]
        action: Option<String>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
    },
    /// Prints the latest signed checkpoint (a C2SP signed note) for a third party to keep;
    /// with --sign, signs one now first.
    Checkpoint {
        /// Sign a checkpoint of the current log now.
        #[arg(long)]
        sign: bool,
    },
    /// Prints the verifier key (NAME+KEYID+KEY) that checks the checkpoints.
    Key,
}

/// Runs `gridward audit`.
pub fn run(args: AuditArgs) -> Result<ExitCode> {
    let config = load_config(&args.config)?;
    let settings = &config.audit;
    let open = || {
        if !settings.path.exists() {
            anyhow::bail!(
                "no audit log at {} (has `gridward serve` run with this configuration?)",
                settings.path.display()
            );
        }
        AuditLog::open(&settings.path)
            .with_context(|| format!("opening {}", settings.path.display()))
    };
    let key = || {
        AuditKey::load_or_create(&settings.key)
            .with_context(|| format!("audit key {}", settings.key.display()))
    };
    match args.command {
        AuditCommand::Verify { verifier } => {
            let log = open()?;
            let vkey = match verifier {
                Some(v) => VerifierKey::parse(&v).context("--verifier")?,
                None => key()?.verifier(&settings.origin)?,
            };
            let report = log.verify(&vkey)?;
            println!("{report}");
            if let Some(finding) = &report.finding {
                eprintln!("TAMPERED: {finding}");
                return Ok(ExitCode::from(1));
            }
        }
        AuditCommand::Show {
            since,
            actor,
            action,
            limit,
            json,
        } => {
            let log = open()?;
            let q = Query {
                since: since
                    .as_deref()
                    .map(|s| parse_time(s, "--since"))
                    .transpose()?,
                actor,
                action,
                limit,
                ..Query::default()
            };
            for e in log.entries(&q)? {
                if json {
                    let v = serde_json::json!({
                        "seq": e.seq,
                        "time": gridward_audit::entry::format_time(e.time).unwrap_or_default(),
                        "actor": e.actor.to_string(),
                        "action": e.action,
                        "target": e.target,
                        "outcome": e.outcome.as_str(),
                        "source": e.source,
                        "detail": e.detail,
                        "hash": hex::encode(e.hash),
                    });
                    println!("{v}");
                } else {
                    println!(
                        "{:>6} {} {:<24} {:<28} {:<16} {:<8} {} {}",
                        e.seq,
                        gridward_audit::entry::format_time(e.time).unwrap_or_default(),
                        e.actor.to_string(),
                        e.action,
                        e.target,
                        e.outcome.as_str(),
                        e.source.as_deref().unwrap_or("-"),
                        e.detail
                    );
                }
            }
        }
        AuditCommand::Checkpoint { sign } => {
            let log = open()?;
            if sign {
                log.checkpoint(&key()?, &settings.origin, time::OffsetDateTime::now_utc())?;
            }
            match log.latest_checkpoint()? {
                Some(note) => print!("{note}"),
                None => {
                    anyhow::bail!("no checkpoint yet: `gridward audit checkpoint --sign` makes one")
                }
            }
        }
        AuditCommand::Key => {
            println!("{}", key()?.verifier(&settings.origin)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
