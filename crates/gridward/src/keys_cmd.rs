//! `gridward keys`: the store's encryption at rest: list the data keys, rotate, re-wrap them
//! under a new key-encryption key, destroy one (crypto-shredding). Every change is audited as
//! `cli:$USER`. They work while `gridward serve` runs: it picks the change up at its next batch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gridward_audit::Outcome;
use gridward_core::document::format_timestamp;
use gridward_hes::config::Config;
use gridward_store::{KeySource, SqliteStore, StoreError};
use time::OffsetDateTime;

use crate::alarms_cmd::{open_audit, open_store, record};
use crate::serve_cmd::load_config;

/// `gridward keys`
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The configuration file (its `[store]` names the database and the key).
    #[arg(
        long,
        short,
        default_value = "gridward.toml",
        value_name = "FILE",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<KeysCmd>,
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// List the data keys: id, created, destroyed, messages sealed under each, the active one,
    /// and the key-encryption key's fingerprint (the default).
    List,
    /// Start a new data key now: new rows are sealed with it, older rows stay readable with
    /// theirs.
    Rotate,
    /// Wrap every data key under a new key-encryption key; the data is not touched and the old
    /// key opens nothing afterwards. With a key file, the new key is written to FILE.new, the
    /// keys re-wrapped, then FILE.new renamed over the key file.
    Rewrap {
        /// Take the new key from a passphrase in this environment variable instead (set
        /// `[store] passphrase_env` to it and restart `gridward serve` afterwards).
        #[arg(long, value_name = "VAR")]
        new_passphrase_env: Option<String>,
    },
    /// Destroy a data key: the readings and envelopes sealed under it can no longer be read by
    /// anyone (crypto-shredding for retention). Refused for the active key and while readings
    /// under it wait for delivery. Back-ups taken before still hold the key wrapped.
    Destroy {
        /// The data key's id (`gridward keys list`).
        id: u32,
        /// Confirm: the data is gone for good.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs `gridward keys`.
pub fn run(args: KeysArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    match args.command.unwrap_or(KeysCmd::List) {
        KeysCmd::List => list(&open_store(&config)?),
        KeysCmd::Rotate => {
            let store = open_store(&config)?;
            let audit = open_audit(&config)?;
            let now = OffsetDateTime::now_utc();
            let result = store.rotate_key();
            finish(
                &audit,
                now,
                "keys.rotate",
                "store",
                result
                    .as_ref()
                    .map(|id| format!("started data key {id}: new rows are sealed with it")),
            )?;
            Ok(())
        }
        KeysCmd::Rewrap { new_passphrase_env } => {
            let store = open_store(&config)?;
            let audit = open_audit(&config)?;
            rewrap(&config, &store, &audit, new_passphrase_env.as_deref())
        }
        KeysCmd::Destroy { id, yes } => {
            if !yes {
                bail!(
                    "destroying data key {id} makes what it sealed unreadable for good; add --yes to confirm"
                );
            }
            let store = open_store(&config)?;
            let audit = open_audit(&config)?;
            let now = OffsetDateTime::now_utc();
            let result = store.destroy_key(id);
            finish(
                &audit,
                now,
                "keys.destroy",
                &format!("data_key:{id}"),
                result.as_ref().map(|n| {
                    format!("destroyed data key {id}: {n} messages sealed under it are unreadable")
                }),
            )?;
            Ok(())
        }
    }
}

fn finish(
    audit: &gridward_audit::AuditLog,
    at: OffsetDateTime,
    action: &str,
    target: &str,
    result: Result<String, &StoreError>,
) -> Result<()> {
    match result {
        Ok(detail) => {
            record(audit, at, action, target, Outcome::Success, &detail);
            println!("{detail}");
            Ok(())
        }
        Err(e) => {
            record(audit, at, action, target, Outcome::Failure, &e.to_string());
            bail!("{e}")
        }
    }
}

fn list(store: &SqliteStore) -> Result<()> {
    let status = store.key_status().context("reading the keys")?;
    println!(
        "key-encryption key  {} ({})",
        status.kek_fingerprint,
        if status.kdf == "argon2id" {
            "passphrase, Argon2id"
        } else {
            "key file"
        }
    );
    println!(
        "{:>4}  {:<24}  {:<24}  {:>10}  ",
        "ID", "CREATED", "DESTROYED", "MESSAGES"
    );
    for k in &status.keys {
        let t = format_timestamp;
        println!(
            "{:>4}  {:<24}  {:<24}  {:>10}  {}",
            k.id,
            t(k.created_at),
            k.destroyed_at.map_or_else(|| "-".to_owned(), t),
            k.messages,
            if k.active { "active" } else { "" }
        );
    }
    if status.plaintext_messages > 0 {
        println!(
            "{} messages from before encryption at rest are not sealed yet (they are sealed when `gridward serve` opens the database)",
            status.plaintext_messages
        );
    }
    Ok(())
}

fn rewrap(
    config: &Config,
    store: &SqliteStore,
    audit: &gridward_audit::AuditLog,
    new_passphrase_env: Option<&str>,
) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    if let Some(var) = new_passphrase_env {
        let pass = std::env::var(var)
            .with_context(|| format!("{var} is not set: export the new passphrase in it"))?;
        if pass.is_empty() {
            bail!("the passphrase in {var} is empty");
        }
        let source = KeySource::Passphrase {
            passphrase: std::sync::Arc::new(zeroize::Zeroizing::new(pass.into_bytes())),
            params: gridward_vault::KdfParams::DEFAULT,
        };
        let result = store.rewrap(&source);
        return finish(audit, now, "keys.rewrap", "store", result.as_ref().map(|fp| {
            format!(
                "re-wrapped the data keys under a passphrase (fingerprint {fp}); set `[store] passphrase_env = \"{var}\"` and restart `gridward serve`"
            )
        }));
    }
    if config.store_keys.passphrase_env.is_some() {
        bail!(
            "the store's key comes from a passphrase: give the new one with --new-passphrase-env VAR"
        );
    }
    let key_file = &config.store_keys.key_file;
    let new_file = with_suffix(key_file, ".new");
    if new_file.exists() {
        bail!(
            "{} exists: an earlier re-wrap may have stopped half-way. If `gridward keys list` works with {}, delete {}; otherwise the database is wrapped under {}: move it over {}",
            new_file.display(),
            key_file.display(),
            new_file.display(),
            new_file.display(),
            key_file.display()
        );
    }
    let result = store.rewrap(&KeySource::file(&new_file));
    if result.is_ok() {
        std::fs::rename(&new_file, key_file).with_context(|| {
            format!(
                "the data keys are wrapped under {}, but it could not be moved over {}: move it by hand",
                new_file.display(),
                key_file.display()
            )
        })?;
    } else {
        let _ = std::fs::remove_file(&new_file);
    }
    finish(audit, now, "keys.rewrap", "store", result.as_ref().map(|fp| {
        format!(
            "re-wrapped the data keys under a new key-encryption key (fingerprint {fp}) in {}; the old key opens nothing now: replace every copy of it",
            key_file.display()
        )
    }))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
