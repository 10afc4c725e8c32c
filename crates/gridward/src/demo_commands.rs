//! The demo's tour of the downward path, while the fleet runs: one meter disconnected and
//! reconnected by signed commands, a forged command refused by the meter, and a small firmware
//! campaign (a tampered image refused at upload, then a staged rollout that the meters verify
//! and confirm).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gridward_command::{CampaignRequest, Commands, IssueRequest, Issued};
use gridward_core::MeterId;
use gridward_core::command::{self, Command, CommandBody, CommandId};
use gridward_core::envelope::{SigningKey, VerifyingKey};
use gridward_core::firmware::{self, Manifest};
use gridward_hes::service::Running;
use gridward_meter::fleet::Fleet;
use gridward_store::{CampaignState, CommandStatus, CommandStore, SecurityEventQuery, Store};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The demo operator's name in the audit log.
const ACTOR: &str = "demo-operator";

/// The simulated meters' firmware identity (`gridward-meter`'s defaults).
const VENDOR: &str = "gridward-sim";
const CLASS: &str = "sim-meter-1";

/// A manufacturer key pair for the demo: `DIR/manufacturer.key.pem` (PKCS#8) and
/// `DIR/manufacturer.pub.pem` (SPKI), as `gridward firmware keygen` writes them.
pub struct Manufacturer {
    key: SigningKey,
    /// The public key file, for `[firmware] manufacturers`.
    pub public_pem: PathBuf,
}

impl Manufacturer {
    /// Makes the key pair in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("generating the demo manufacturer key"))?;
        let key = SigningKey::from_pkcs8_der(pkcs8.as_ref())
            .map_err(|e| anyhow::anyhow!("demo manufacturer key: {e}"))?;
        let private = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
        let public = pem::encode(&pem::Pem::new("PUBLIC KEY", key.public_key_spki().to_vec()));
        let key_path = dir.join("manufacturer.key.pem");
        std::fs::write(&key_path, private)
            .with_context(|| format!("writing {}", key_path.display()))?;
        let public_pem = dir.join("manufacturer.pub.pem");
        std::fs::write(&public_pem, public)
            .with_context(|| format!("writing {}", public_pem.display()))?;
        Ok(Self { key, public_pem })
    }

    /// The verifying key the meters pin.
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        self.key
            .verifying_key()
            .map_err(|e| anyhow::anyhow!("demo manufacturer key: {e}"))
    }
}

/// Runs the tour; `meters` are genuine meters of the running fleet (at least five).
pub async fn show(
    running: &Running,
    fleet: &Fleet,
    manufacturer: &Manufacturer,
    meters: &[MeterId],
) -> Result<()> {
    let Some(service) = &running.commands else {
        bail!("commands are off in the demo head-end (no command signer)");
    };
    let commands = &service.commands;
    let Some(target) = meters.first() else {
        bail!("the demo needs at least one meter");
    };
    println!("4b. the downward path (signed commands, COSE_Sign1 by the command-signer key):");

    // Disconnect and reconnect one meter.
    for (body, what) in [
        (CommandBody::Disconnect, "disconnect"),
        (CommandBody::Reconnect, "reconnect"),
    ] {
        let started = Instant::now();
        let id = issue_one(commands, target, body)?;
        let c = settle(running, &id).await?;
        let relay = fleet
            .relay_state(target)
            .map_or("unknown".to_owned(), |r| format!("{r:?}").to_lowercase());
        println!(
            "   {what:<10} {target}: counter {}, {} after {} ms; the meter's relay is {relay}",
            c.counter,
            c.status,
            started.elapsed().as_millis()
        );
    }

    // A forged command (signed with a key that is not the head-end's), delivered to a meter as
    // a compromised broker would: the meter refuses it and says so, signed.
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("generating the forger's key"))?;
    let forger = SigningKey::from_pkcs8_der(pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("forger key: {e}"))?;
    let now = whole_second(OffsetDateTime::now_utc());
    let forged = Command {
        id: CommandId::random(),
        meter_id: target.clone(),
        body: CommandBody::Disconnect,
        counter: u64::from(u32::MAX),
        issued_at: now,
        expires_at: now + time::Duration::minutes(5),
    };
    let bytes = command::sign(&forger, &forged).map_err(|e| anyhow::anyhow!("{e}"))?;
    fleet.inject_command(target, &target.commands_topic(), bytes);
    let event = wait(Duration::from_secs(15), || {
        let events = running
            .store
            .security_events(&SecurityEventQuery {
                reason: Some("command_refused".into()),
                ..Default::default()
            })
            .ok()?;
        events
            .into_iter()
            .map(|e| e.event)
            .find(|e| e.detail.contains(&forged.id.to_string()))
    })
    .await
    .context("the forged command's refusal did not arrive")?;
    println!(
        "   forged     disconnect signed by another key → refused by the meter; security event: {}",
        event.detail
    );

    // Firmware: a tampered image is refused at upload; the genuine one rolls out in two stages.
    let image = demo_image();
    let manifest = Manifest {
        manifest_version: firmware::MANIFEST_VERSION,
        sequence: 1,
        vendor_id: VENDOR.into(),
        class_id: CLASS.into(),
        version: "1.1.0".into(),
        digest: Sha256::digest(&image).into(),
        size: image.len() as u64,
        expires_at: None,
        rollback_from: None,
    };
    let signed = firmware::sign_manifest(&manufacturer.key, &manifest)
        .map_err(|e| anyhow::anyhow!("signing the demo manifest: {e}"))?;
    let manufacturers = [manufacturer.verifying_key()?];
    let mut tampered = image.clone();
    if let Some(b) = tampered.get_mut(1000) {
        *b ^= 0x01;
    }
    match commands.upload_firmware(&signed, &tampered, &manufacturers, ACTOR) {
        Ok(_) => bail!("a tampered firmware image was accepted"),
        Err(e) => println!("   firmware   1.1.0 with one byte changed → upload refused: {e}"),
    }
    let firmware_id = commands
        .upload_firmware(&signed, &image, &manufacturers, ACTOR)
        .map_err(|e| anyhow::anyhow!("uploading the demo firmware: {e}"))?;
    let targets: Vec<MeterId> = meters.iter().take(5).cloned().collect();
    let started = Instant::now();
    let campaign = commands
        .create_campaign(CampaignRequest {
            firmware_id,
            meters: targets.clone(),
            first_stage: Some(1),
            success_threshold: Some(1.0),
            max_failures: Some(0),
            actor: ACTOR.into(),
        })
        .map_err(|e| anyhow::anyhow!("creating the demo campaign: {e}"))?;
    let done = wait(Duration::from_secs(60), || {
        let c = running.store.campaign(campaign).ok()??;
        matches!(c.state, CampaignState::Completed | CampaignState::Paused).then_some(c)
    })
    .await
    .context("the demo campaign did not finish within 60 s")?;
    let members = running.store.campaign_members(campaign)?;
    let confirmed = members
        .iter()
        .filter(|m| m.status == Some(CommandStatus::Acknowledged))
        .count();
    println!(
        "   firmware   1.1.0 (sequence 1, {} KiB, manufacturer-signed) to {} meters: pilot of 1, then the rest; \
         campaign {} in {:.1} s, {confirmed}/{} confirmed",
        image.len() / 1024,
        targets.len(),
        done.state,
        started.elapsed().as_secs_f64(),
        members.len()
    );
    if let Some(state) = fleet.device_state(target) {
        println!(
            "              {target} now runs {} {} (sequence {}) in slot {:?}",
            state.firmware.class_id,
            state.firmware.version,
            state.firmware.sequence,
            state.active_slot
        );
    }
    Ok(())
}

fn issue_one(commands: &Commands, meter: &MeterId, body: CommandBody) -> Result<CommandId> {
    match commands.issue(IssueRequest {
        meters: vec![meter.clone()],
        body,
        actor: ACTOR.into(),
        ttl: None,
        reason: "gridward demo".into(),
    }) {
        Ok(Issued::Queued { ids }) => ids
            .first()
            .copied()
            .context("the command service queued nothing"),
        Ok(other) => bail!("unexpected: {other:?}"),
        Err(e) => Err(anyhow::anyhow!("issuing a command: {e}")),
    }
}

async fn settle(running: &Running, id: &CommandId) -> Result<gridward_store::StoredCommand> {
    wait(Duration::from_secs(30), || {
        let c = running.store.command(id).ok()??;
        c.status.is_final().then_some(c)
    })
    .await
    .with_context(|| format!("command {id} not settled within 30 s"))
}

async fn wait<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(v) = f() {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn whole_second(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// 48 KiB of deterministic bytes standing in for an image (three chunks).
fn demo_image() -> Vec<u8> {
    let mut image = Vec::with_capacity(48 * 1024);
    let mut block: [u8; 32] = Sha256::digest(b"gridward demo firmware 1.1.0").into();
    while image.len() < 48 * 1024 {
        image.extend_from_slice(&block);
        block = Sha256::digest(block).into();
    }
    image
}
