//! `gridward firmware upload|list|campaign|status|pause|resume|cancel`: the head-end's side of
//! firmware from the command line, beside a running `gridward serve` of the same configuration
//! (which dispatches what is queued here). The logic is `gridward_command`'s.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use gridward_command::CampaignRequest;
use gridward_core::MeterId;
use gridward_hes::commands::LocalCommands;
use gridward_store::{CommandStore, Store};

use crate::serve_cmd::load_config;

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Arguments of `gridward firmware upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The head-end's configuration.
    #[arg(long, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
    /// The signed manifest (`gridward firmware sign`).
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// The image.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
}

/// Arguments of `gridward firmware list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The head-end's configuration.
    #[arg(long, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
}

/// Arguments of `gridward firmware campaign`.
#[derive(Debug, Args)]
pub struct CampaignArgs {
    /// The head-end's configuration.
    #[arg(long, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
    /// The uploaded firmware's id (`gridward firmware list`).
    #[arg(long, value_name = "ID")]
    firmware: i64,
    /// A target meter; repeat, in rollout order (the first ones are the pilot).
    #[arg(long = "meter", value_name = "ID", required = true)]
    meters: Vec<String>,
    /// Pilot size [default: min(3, meters)].
    #[arg(long, value_name = "N")]
    first_stage: Option<u32>,
    /// Share of the pilot that must confirm before the rest follows (0 to 1) [default: 0.9].
    #[arg(long, value_name = "SHARE")]
    success_threshold: Option<f64>,
    /// Failures in the second stage tolerated before the campaign pauses [default: 1].
    #[arg(long, value_name = "N")]
    max_failures: Option<u32>,
}

/// Arguments of `gridward firmware status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The head-end's configuration.
    #[arg(long, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
    /// A campaign (default: every campaign, one line each).
    #[arg(value_name = "CAMPAIGN")]
    campaign: Option<i64>,
}

/// Arguments of `gridward firmware pause|resume|cancel`.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// The head-end's configuration.
    #[arg(long, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
    /// The campaign.
    #[arg(value_name = "CAMPAIGN")]
    campaign: i64,
}

/// What to do to a campaign.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// Stop dispatching (unsent commands are withdrawn).
    Pause,
    /// Continue (failed members are retried).
    Resume,
    /// Stop for good.
    Cancel,
}

/// Who acts: `cli:` and the operating-system user, as in `gridward command`.
fn actor() -> String {
    crate::command_cmd::cli_actor()
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn open(config: &std::path::Path) -> Result<LocalCommands> {
    let config = load_config(config)?;
    LocalCommands::open(&config).context("firmware needs the head-end's command service")
}

/// `gridward firmware upload`.
pub fn upload(a: UploadArgs) -> Result<()> {
    let local = open(&a.config)?;
    if local.manufacturers.is_empty() {
        bail!(
            "no manufacturer key is trusted: list the manufacturer's public key in [firmware] manufacturers of {}",
            a.config.display()
        );
    }
    let manifest =
        std::fs::read(&a.manifest).with_context(|| format!("reading {}", a.manifest.display()))?;
    let image =
        std::fs::read(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
    let who = actor();
    let id = match local
        .commands
        .upload_firmware(&manifest, &image, &local.manufacturers, &who)
    {
        Ok(id) => id,
        Err(e) => {
            if e.is_security_refusal() {
                // As through the API: an image that does not verify is a security event.
                let event = gridward_store::SecurityEvent {
                    at: time::OffsetDateTime::now_utc(),
                    meter_id: None,
                    source: None,
                    reason: "firmware_refused".into(),
                    detail: format!("{who} uploaded firmware that was refused: {e}"),
                };
                if let Err(se) = local.store.record_security_events(&[event]) {
                    eprintln!("warning: the security event was not recorded: {se}");
                }
            }
            bail!("upload refused: {e}");
        }
    };
    let stored = local
        .store
        .firmware(id)?
        .context("the firmware was stored but cannot be read back")?;
    say!("{id}");
    eprintln!(
        "stored firmware {id}: {}/{} {} (sequence {}, {} bytes, sha256 {}); roll it out with `gridward firmware campaign --firmware {id} --meter ...`",
        stored.vendor_id,
        stored.class_id,
        stored.version,
        stored.sequence,
        stored.size,
        hex::encode(stored.digest)
    );
    Ok(())
}

/// `gridward firmware list`.
pub fn list(a: ListArgs) -> Result<()> {
    let local = open(&a.config)?;
    let all = local.store.firmwares()?;
    if all.is_empty() {
        eprintln!("no firmware uploaded (gridward firmware upload)");
    }
    for f in all {
        say!(
            "{:>4}  {}/{} {:<10} sequence {:<4} {:>9} bytes  sha256 {}  by {} at {}",
            f.id,
            f.vendor_id,
            f.class_id,
            f.version,
            f.sequence,
            f.size,
            hex::encode(f.digest),
            f.uploaded_by,
            fmt_time(f.uploaded_at)
        );
    }
    Ok(())
}

/// `gridward firmware campaign`.
pub fn campaign(a: CampaignArgs) -> Result<()> {
    let local = open(&a.config)?;
    let meters = a
        .meters
        .iter()
        .map(|m| MeterId::new(m).with_context(|| format!("--meter {m:?} is not a meter id")))
        .collect::<Result<Vec<_>>>()?;
    let id = local
        .commands
        .create_campaign(CampaignRequest {
            firmware_id: a.firmware,
            meters,
            first_stage: a.first_stage,
            success_threshold: a.success_threshold,
            max_failures: a.max_failures,
            actor: actor(),
        })
        .map_err(|e| anyhow::anyhow!("campaign refused: {e}"))?;
    say!("{id}");
    eprintln!(
        "campaign {id} created; the running head-end rolls it out (gridward firmware status {id})"
    );
    Ok(())
}

/// `gridward firmware status`.
pub fn status(a: StatusArgs) -> Result<()> {
    let local = open(&a.config)?;
    let Some(id) = a.campaign else {
        for c in local.store.campaigns()? {
            say!(
                "{:>4}  firmware {:<4} {:<9} stage {}  by {}  updated {}{}",
                c.id,
                c.firmware_id,
                c.state.to_string(),
                c.stage,
                c.created_by,
                fmt_time(c.updated_at),
                c.note.map(|n| format!("  ({n})")).unwrap_or_default()
            );
        }
        return Ok(());
    };
    let c = local
        .store
        .campaign(id)?
        .with_context(|| format!("no campaign {id} (gridward firmware status lists them)"))?;
    say!(
        "campaign {}: firmware {}, {} in stage {} (pilot {}, threshold {}, max failures {}){}",
        c.id,
        c.firmware_id,
        c.state,
        c.stage,
        c.first_stage,
        c.success_threshold,
        c.max_failures,
        c.note.map(|n| format!(": {n}")).unwrap_or_default()
    );
    for m in local.store.campaign_members(id)? {
        say!(
            "  stage {}  {:<16} {:<12} {}",
            m.stage,
            m.meter_id.as_str(),
            m.status.map_or("not issued".to_owned(), |s| s.to_string()),
            m.outcome.unwrap_or_default()
        );
    }
    Ok(())
}

/// `gridward firmware pause|resume|cancel`.
pub fn change(a: ChangeArgs, change: Change) -> Result<()> {
    let local = open(&a.config)?;
    let who = actor();
    let result = match change {
        Change::Pause => local.commands.pause_campaign(a.campaign, &who),
        Change::Resume => local.commands.resume_campaign(a.campaign, &who),
        Change::Cancel => local.commands.cancel_campaign(a.campaign, &who),
    };
    result.map_err(|e| anyhow::anyhow!("campaign {}: {e}", a.campaign))?;
    eprintln!("campaign {}: {change:?} done", a.campaign);
    Ok(())
}
