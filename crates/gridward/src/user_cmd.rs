//! `gridward user`: the users of the HTTPS API, on the users database of a configuration.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gridward_access::{Access, Argon2Params, NewUser, Role, Secret, TotpEnrolment};
use gridward_audit::{Actor, AuditLog, NewEntry, Outcome};
use gridward_core::MeterId;
use time::OffsetDateTime;

use crate::serve_cmd::load_config;

/// Users of the HTTPS API: consumers (bound to meters), operators, auditors, administrators.
#[derive(Debug, Args)]
#[command(after_help = "\
Passwords are read from the terminal (twice, not echoed), or as the first line of stdin when it
is not a terminal: printf '%s\\n' \"$PW\" | gridward user add otto --role operator.
Operators, auditors and administrators get a TOTP second factor at creation: scan the QR code
(or type the secret) into an authenticator app and keep the recovery codes. Every change is an
entry in the audit log.")]
pub struct UserArgs {
    /// The configuration whose `[api] users` and `[audit]` to use.
    #[arg(
        long,
        short,
        default_value = "gridward.toml",
        value_name = "FILE",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Creates a user (password prompted; TOTP enrolled for operator, auditor and admin).
    Add {
        /// The name: lowercase letters, digits, '.', '_', '-'.
        name: String,
        /// consumer, operator, auditor or admin.
        #[arg(long, value_parser = ["consumer", "operator", "auditor", "admin"])]
        role: String,
        /// A meter the consumer may see (repeat for more; consumers need at least one).
        #[arg(long = "meter", value_name = "ID")]
        meters: Vec<String>,
    },
    /// Lists users and their state (no secrets).
    List,
    /// Disables a user: it cannot log in and its sessions end.
    Disable {
        /// The user.
        name: String,
    },
    /// Enables a disabled user and lifts a lockout.
    Enable {
        /// The user.
        name: String,
    },
    /// Sets a new password (prompted); the user's sessions end and a lockout is lifted.
    ResetPassword {
        /// The user.
        name: String,
    },
    /// Changes a user's role (its sessions end; a privileged role gets TOTP if it had none).
    SetRole {
        /// The user.
        name: String,
        /// consumer, operator, auditor or admin.
        #[arg(long, value_parser = ["consumer", "operator", "auditor", "admin"])]
        role: String,
        /// For a consumer: a meter it may see (repeat for more).
        #[arg(long = "meter", value_name = "ID")]
        meters: Vec<String>,
    },
    /// Enrols a new TOTP secret and recovery codes (the old ones stop working).
    EnrollTotp {
        /// The user.
        name: String,
    },
}

/// Runs `gridward user`.
pub fn run(args: UserArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let api = config.api.as_ref().with_context(|| {
        format!(
            "{} has `[api] listen = \"off\"`: there are no API users to manage",
            args.config.display()
        )
    })?;
    let access = Access::open(&api.users_path, Argon2Params::OWASP)
        .with_context(|| format!("opening the users database {}", api.users_path.display()))?;
    let audit = AuditLog::open(&config.audit.path)
        .with_context(|| format!("opening the audit log {}", config.audit.path.display()))?;
    let now = OffsetDateTime::now_utc();
    let record = |action: &str, target: &str, outcome: Outcome, detail: String| {
        let who = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        let entry = NewEntry::new(now, Actor::System, action, target, outcome).detail(format!(
            "command line (unix user {who}){}{detail}",
            if detail.is_empty() { "" } else { ": " }
        ));
        if let Err(e) = audit.append(&entry) {
            eprintln!("warning: the audit log did not take the entry: {e}");
        }
    };
    let done = |action: &str,
                name: &str,
                detail: String,
                r: Result<(), gridward_access::AccessError>|
     -> Result<()> {
        match r {
            Ok(()) => {
                record(action, name, Outcome::Success, detail);
                Ok(())
            }
            Err(e) => {
                record(action, name, Outcome::Failure, format!("{detail} {e}"));
                Err(e.into())
            }
        }
    };
    match args.command {
        UserCommand::Add { name, role, meters } => {
            let role: Role = role.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let meters = parse_meters(&meters)?;
            let password = read_password(&format!("password for {name}"))?;
            let user = NewUser {
                username: name.clone(),
                role,
                meters,
                password,
            };
            let mut enrolment = None;
            done(
                "user.add",
                &name,
                format!("role {}", role.as_str()),
                access.add_user(user, now).map(|e| enrolment = e),
            )?;
            println!("added {name} ({})", role.as_str());
            if let Some(e) = enrolment {
                print_enrolment(&name, &e);
            }
        }
        UserCommand::List => {
            let users = access.list_users()?;
            println!(
                "{:<20} {:<9} {:<8} {:<5} {:<9} meters",
                "user", "role", "state", "totp", "recovery"
            );
            for u in users {
                let state = if u.disabled {
                    "disabled"
                } else if u.locked_until.is_some_and(|t| t > now) {
                    "locked"
                } else {
                    "active"
                };
                let meters: Vec<String> = u.meters.iter().map(ToString::to_string).collect();
                println!(
                    "{:<20} {:<9} {:<8} {:<5} {:<9} {}",
                    u.username,
                    u.role.as_str(),
                    state,
                    if u.totp_enrolled { "yes" } else { "no" },
                    u.recovery_codes_left,
                    meters.join(",")
                );
            }
        }
        UserCommand::Disable { name } => {
            done(
                "user.disable",
                &name,
                String::new(),
                access.disable_user(&name, now),
            )?;
            println!("disabled {name}; its sessions ended");
        }
        UserCommand::Enable { name } => {
            done(
                "user.enable",
                &name,
                String::new(),
                access
                    .enable_user(&name, now)
                    .and_then(|()| access.unlock_user(&name, now)),
            )?;
            println!("enabled {name}");
        }
        UserCommand::ResetPassword { name } => {
            let password = read_password(&format!("new password for {name}"))?;
            done(
                "user.reset-password",
                &name,
                String::new(),
                access.reset_password(&name, &password, now),
            )?;
            println!("password of {name} changed; its sessions ended");
        }
        UserCommand::SetRole { name, role, meters } => {
            let role: Role = role.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let meters = parse_meters(&meters)?;
            let mut enrolment = None;
            done(
                "user.set-role",
                &name,
                format!("role {}", role.as_str()),
                access
                    .set_role(&name, role, meters, now)
                    .map(|e| enrolment = e),
            )?;
            println!("{name} is now {}; its sessions ended", role.as_str());
            if let Some(e) = enrolment {
                print_enrolment(&name, &e);
            }
        }
        UserCommand::EnrollTotp { name } => {
            let mut enrolment = None;
            done(
                "user.enroll-totp",
                &name,
                String::new(),
                access.enroll_totp(&name, now).map(|e| enrolment = Some(e)),
            )?;
            if let Some(e) = enrolment {
                print_enrolment(&name, &e);
            }
        }
    }
    Ok(())
}

fn parse_meters(raw: &[String]) -> Result<Vec<MeterId>> {
    raw.iter()
        .map(|m| MeterId::new(m).with_context(|| format!("--meter {m:?}")))
        .collect()
}

/// Shows a TOTP enrolment once.
pub(crate) fn print_enrolment(name: &str, e: &TotpEnrolment) {
    println!();
    println!(
        "Second factor for {name}: scan this with an authenticator app (TOTP, SHA-1, 6 digits, 30 s)"
    );
    println!("{}", e.qr);
    println!("  or open: {}", e.uri);
    println!("  or type the secret: {}", e.secret_base32);
    println!("Recovery codes (each works once instead of a code; shown only now, keep them safe):");
    for c in &e.recovery_codes {
        println!("  {c}");
    }
}

/// Reads a password: from the terminal twice without echo, or the first line of stdin.
fn read_password(prompt: &str) -> Result<Secret> {
    if std::io::stdin().is_terminal() {
        let first =
            rpassword::prompt_password(format!("{prompt}: ")).context("reading the password")?;
        let second = rpassword::prompt_password("again: ").context("reading the password")?;
        if first != second {
            bail!("the two passwords differ; nothing was changed");
        }
        return Ok(Secret::new(first));
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let _ = std::io::stderr().flush();
    let pw = line.trim_end_matches(['\n', '\r']).to_owned();
    if pw.is_empty() {
        bail!(
            "no password on stdin: pipe it in (printf '%s\\n' \"$PW\" | gridward user ...) or run in a terminal"
        );
    }
    Ok(Secret::new(pw))
}
