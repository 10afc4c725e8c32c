//! Revocation and validity: certificates the head-end once trusted, or will trust, but not now;
//! and the CRL itself gone stale (the head-end must fail closed).
//!
//! 1. An expired certificate (`x-rev-expired`, valid one day, ten days ago): the handshake is
//!    refused, `certificate_expired`.
//! 2. A certificate not valid yet (`x-rev-future`, from ten days ahead): `certificate_not_yet_valid`.
//! 3. A meter connected when its certificate is revoked (`x-rev-live`): after the head-end
//!    reloads its CRLs, the session is closed (MQTT 5: DISCONNECT 0x87), `certificate_revoked`
//!    about that meter.
//! 4. A revoked certificate (`x-rev-revoked`, revoked for key compromise) on a new connection
//!    after the reload: the handshake is refused, `certificate_revoked`.
//! 5. An expired issuing CRL (nextUpdate 23 days ago) in the head-end's PKI, reloaded: a valid
//!    meter's new connection is refused, `crl_unavailable` (fail closed) ...
//! 6. ... while the genuine fleet's sessions, already open, keep getting readings through.
//! 7. Fresh CRLs written and reloaded: meters connect, and their readings are accepted, again.
//!
//! Cases 3 to 7 need the head-end to reload its CRLs; a target the harness cannot reload (an
//! external head-end without a pid) fails them with "cannot reload" rather than passing them
//! silently. The CRL files are saved before case 5 and restored (and reloaded) after case 7.
//!
//! The helpers at the end (handshake refusals attributed to their source address, watching a
//! connection close, the next unused counter) are shared with the spoofing and tampering
//! scenarios.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gridward_mqtt::client::{Client, ClientError, Packet, Protocol};
use gridward_pki::crl::DEFAULT_CRL_DAYS;
use gridward_pki::{CrlIssuer, LeafKind, RevocationReason, RevokeTarget};
use rustls::ClientConfig;
use time::OffsetDateTime;

use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx, PubOutcome};

/// The scenario's name.
pub const NAME: &str = "revocation";

/// Who the PKI operations are recorded for.
const ACTOR: &str = "gridward-attack";

const CASE_LIVE: &str = "a connected meter's certificate revoked, then the head-end reloads";
const CASE_REVOKED: &str = "a revoked certificate (new connection after the reload)";
const CASE_CRL: &str = "an expired issuing CRL: a valid meter's new connection";
const CASE_FLEET: &str = "an expired issuing CRL: the genuine fleet's open sessions";
const CASE_FRESH: &str = "after a fresh CRL, meters connect again";
const EXPECT_FLEET: &str = "open sessions keep sending, nothing refused, no connection lost";
const EXPECT_FRESH: &str = "CONNACK success, reading accepted";

/// How long the CRL stays expired while the genuine fleet is watched.
const EXPIRED_WINDOW: Duration = Duration::from_millis(1500);

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = vec![
        validity_case(
            ctx,
            "rev-expired",
            -10,
            Some(1),
            "an expired certificate (valid one day, ten days ago)",
            "certificate_expired",
        )
        .await,
        validity_case(
            ctx,
            "rev-future",
            10,
            None,
            "a certificate not valid yet (valid from ten days ahead)",
            "certificate_not_yet_valid",
        )
        .await,
    ];
    if !ctx.target.can_reload() {
        let why = "cannot reload the head-end (an external target without a pid): not run";
        for (case, expected) in [
            (CASE_LIVE, "session closed, event certificate_revoked"),
            (CASE_REVOKED, "refused, event certificate_revoked"),
            (CASE_CRL, "refused, event crl_unavailable"),
            (CASE_FLEET, EXPECT_FLEET),
            (CASE_FRESH, EXPECT_FRESH),
        ] {
            checks.push(Check::new(NAME, case, expected).observed(why).pass(false));
        }
        return checks;
    }
    match revoked_cases(ctx).await {
        Ok(mut c) => checks.append(&mut c),
        Err(e) => checks.push(Check::broken(NAME, "revoked certificates", e)),
    }
    checks.append(&mut crl_cases(ctx).await);
    checks
}

/// A certificate outside its validity period, issued `days` from now for `validity` days.
async fn validity_case(
    ctx: &Ctx,
    name: &str,
    days: i64,
    validity: Option<u32>,
    case: &str,
    reason: &str,
) -> Check {
    let config = ctx
        .attack_meter_at(name, days, validity)
        .and_then(|creds| Ok((ctx.client_config(&creds)?, creds.id)));
    match config {
        Ok((config, id)) => handshake_refusal(ctx, NAME, case, reason, config, &id).await,
        Err(e) => Check::broken(NAME, case, e),
    }
}

/// Cases 3 and 4: one meter connected when revoked, one connecting after.
async fn revoked_cases(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    let revoked = ctx.attack_meter("rev-revoked")?;
    let live = ctx.attack_meter("rev-live")?;
    // Built now: the attacker's client does not care about its own revocation.
    let revoked_config = ctx.client_config(&revoked)?;

    let mut client = ctx.connect_meter(&live).await?;
    let topic = format!("meters/{}/readings", live.id);
    let counter = next_counter(ctx, &live.id);
    let env = Ctx::genuine(&live, counter, next_kwh(ctx, &live.id))?;
    let out = Ctx::publish(&mut client, &topic, env, 1).await;
    if out != PubOutcome::Acked(0) {
        return Err(AttackError::Setup(format!(
            "{} could not send a genuine reading before its revocation: {out}",
            live.id
        )));
    }

    let now = OffsetDateTime::now_utc();
    for m in [&live, &revoked] {
        ctx.pki().revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Meter),
                name: m.id.clone(),
            },
            RevocationReason::KeyCompromise,
            ACTOR,
            now,
        )?;
    }
    let before = ctx.last_event_id();
    let started = Instant::now();
    let mut checks = Vec::new();
    match ctx.target.reload() {
        Ok(()) => {
            let (closed, seen) = await_close(&mut client, Duration::from_secs(5)).await;
            let observed = format!(
                "connected and sending; revoked and reloaded: {seen} after {} ms",
                started.elapsed().as_millis()
            );
            checks.push(
                ctx.refusal(
                    NAME,
                    CASE_LIVE,
                    "certificate_revoked",
                    Some(&live.id),
                    before,
                    closed,
                    observed,
                )
                .await,
            );
            checks.push(
                handshake_refusal(
                    ctx,
                    NAME,
                    CASE_REVOKED,
                    "certificate_revoked",
                    revoked_config,
                    &revoked.id,
                )
                .await,
            );
        }
        Err(e) => {
            for case in [CASE_LIVE, CASE_REVOKED] {
                checks.push(
                    Check::new(NAME, case, "refused, event certificate_revoked")
                        .observed(format!("cannot reload the head-end: {e}"))
                        .pass(false),
                );
            }
        }
    }
    Ok(checks)
}

/// Cases 5 to 7, with the CRL files saved before and restored after, whatever happened.
async fn crl_cases(ctx: &Ctx) -> Vec<Check> {
    let crl_dir = ctx.target.pki_dir.join("crl");
    let saved = match save_crls(&crl_dir) {
        Ok(s) => s,
        Err(e) => return vec![Check::broken(NAME, "an expired CRL", e)],
    };
    let mut checks = match expired_crl(ctx).await {
        Ok(c) => c,
        Err(e) => vec![Check::broken(NAME, "an expired CRL", e)],
    };
    // Leave the PKI as it was found (the CRL files; the inventory keeps its CRL numbers).
    if let Err(e) = restore_crls(&saved).and_then(|()| ctx.target.reload()) {
        checks.push(Check::broken(NAME, "restoring the original CRLs", e));
    }
    checks
}

async fn expired_crl(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    let probe = ctx.attack_meter("rev-crl-probe")?;
    // The probe's own view of the head-end is built from today's CRLs, so that any refusal is
    // the head-end's.
    let config = ctx.client_config(&probe)?;
    let now = OffsetDateTime::now_utc();
    let crl = ctx.pki().write_crl(
        CrlIssuer::Issuing,
        now - time::Duration::days(30),
        now - time::Duration::days(23),
        ACTOR,
    )?;
    let fleet_before = ctx.fleet.snapshot();
    let started = Instant::now();
    let mut checks = Vec::new();
    match ctx.target.reload() {
        Ok(()) => {
            let mut check =
                handshake_refusal(ctx, NAME, CASE_CRL, "crl_unavailable", config, &probe.id).await;
            check.observed = format!(
                "issuing CRL {} with nextUpdate {}: {}",
                crl.number,
                crl.next_update.date(),
                check.observed
            );
            checks.push(check);
        }
        Err(e) => checks.push(
            Check::new(NAME, CASE_CRL, "refused, event crl_unavailable")
                .observed(format!("cannot reload the head-end: {e}"))
                .pass(false),
        ),
    }
    if let Some(rest) = EXPIRED_WINDOW.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let fleet_after = ctx.fleet.snapshot();
    let acked = fleet_after.acked.saturating_sub(fleet_before.acked);
    let refused = fleet_after.rejected.saturating_sub(fleet_before.rejected);
    let lost = fleet_after
        .disconnects
        .saturating_sub(fleet_before.disconnects);
    checks.push(
        Check::new(NAME, CASE_FLEET, EXPECT_FLEET)
            .observed(format!(
                "over {} ms with the expired CRL: {acked} genuine readings acknowledged, \
                 {refused} refused, {lost} connections lost",
                started.elapsed().as_millis()
            ))
            .pass(acked > 0 && refused == 0 && lost == 0),
    );

    ctx.pki()
        .write_crls(OffsetDateTime::now_utc(), DEFAULT_CRL_DAYS, ACTOR)?;
    checks.push(match ctx.target.reload() {
        Ok(()) => reconnect_case(ctx, &probe).await?,
        Err(e) => Check::new(NAME, CASE_FRESH, EXPECT_FRESH)
            .observed(format!("cannot reload the head-end: {e}"))
            .pass(false),
    });
    Ok(checks)
}

/// Case 7: the probe connects with fresh CRLs and sends a reading; nothing is refused.
async fn reconnect_case(ctx: &Ctx, probe: &Creds) -> Result<Check, AttackError> {
    let config = ctx.client_config(probe)?;
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let (ok, observed) = match ctx.mqtt_from(source, config, &probe.id, Protocol::V5).await {
        Ok((mut client, ack)) => {
            let topic = format!("meters/{}/readings", probe.id);
            let counter = next_counter(ctx, &probe.id);
            let env = Ctx::genuine(probe, counter, next_kwh(ctx, &probe.id))?;
            let out = Ctx::publish(&mut client, &topic, env, 1).await;
            let _ = client.disconnect().await;
            let stored = ctx.stored_counters(&probe.id).contains(&counter);
            (
                out == PubOutcome::Acked(0) && stored,
                format!(
                    "CONNACK {:#04x}; reading {counter}: {out}{}",
                    ack.code,
                    if stored { ", stored" } else { ", not stored" }
                ),
            )
        }
        Err(e) => (false, connect_error(&e)),
    };
    let ours: Vec<String> = ctx
        .events_after(before)
        .into_iter()
        .filter(|e| event_ip(e.event.source.as_deref()) == Some(source))
        .map(|e| e.event.reason)
        .collect();
    let observed = if ours.is_empty() {
        observed
    } else {
        format!("{observed}; refusals recorded: {ours:?}")
    };
    Ok(Check::new(NAME, CASE_FRESH, EXPECT_FRESH)
        .observed(observed)
        .pass(ok && ours.is_empty()))
}

/// The CRL files (`*.crl.pem`) of `dir` and their bytes.
fn save_crls(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut saved = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.to_string_lossy().ends_with(".crl.pem") {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            saved.push((path, bytes));
        }
    }
    if saved.is_empty() {
        return Err(format!("no CRL files in {}", dir.display()));
    }
    Ok(saved)
}

/// Writes the saved CRL files back, each through a temporary file and a rename.
fn restore_crls(saved: &[(PathBuf, Vec<u8>)]) -> Result<(), String> {
    for (path, bytes) in saved {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{}.restore", name.unwrap_or_default()));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("restoring {}: {e}", path.display()))?;
    }
    Ok(())
}

// ---- Shared with the spoofing and tampering scenarios -------------------------------------

/// Connects from a fresh source with `config` and ClientID `client_id` (MQTT 5) and demands a
/// refusal before or at CONNECT, and the security event `reason` from that very source (these
/// events name no meter: the certificate was never accepted).
pub(crate) async fn handshake_refusal(
    ctx: &Ctx,
    scenario: &'static str,
    case: &str,
    reason: &str,
    config: Arc<ClientConfig>,
    client_id: &str,
) -> Check {
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let (refused, observed) = match ctx.mqtt_from(source, config, client_id, Protocol::V5).await {
        Ok((mut client, ack)) => {
            let _ = client.disconnect().await;
            (false, format!("connected: CONNACK {:#04x}", ack.code))
        }
        Err(e) => (true, connect_error(&e)),
    };
    let check = ctx
        .refusal(scenario, case, reason, None, before, refused, observed)
        .await;
    from_source(ctx, check, before, source)
}

/// Fails `check` unless its event came from `source`.
pub(crate) fn from_source(ctx: &Ctx, mut check: Check, after: i64, source: IpAddr) -> Check {
    let Some(id) = check.event_id else {
        return check;
    };
    let recorded = ctx
        .events_after(after)
        .into_iter()
        .find(|e| e.id == id)
        .and_then(|e| e.event.source);
    if event_ip(recorded.as_deref()) != Some(source) {
        check.pass = false;
        check.observed.push_str(&format!(
            " (from {}, not from this case's {source})",
            recorded.as_deref().unwrap_or("no source")
        ));
    }
    check
}

/// The IP address of an event's `source` (`ip:port`, or a bare address).
pub(crate) fn event_ip(source: Option<&str>) -> Option<IpAddr> {
    let s = source?;
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| s.parse::<IpAddr>())
        .ok()
}

/// What the attacker saw of a refused connection.
pub(crate) fn connect_error(e: &ClientError) -> String {
    match (e, e.tls_error()) {
        (ClientError::Refused(ack), _) => format!("CONNACK {:#04x}", ack.code),
        (_, Some(tls)) => format!("TLS refused ({tls})"),
        (ClientError::Closed, None) => "connection closed before CONNACK".to_owned(),
        _ => e.to_string(),
    }
}

/// Reads what the head-end still sends until it closes the connection (true) or `wait` passes
/// (false); says what was seen (`DISCONNECT 0x87, then closed`).
pub(crate) async fn await_close(client: &mut Client, wait: Duration) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, client.recv()).await {
            Ok(Ok(Packet::Disconnect { reason_code })) => {
                seen.push(format!("DISCONNECT {reason_code:#04x}"));
            }
            Ok(Ok(other)) => seen.push(other.name().to_owned()),
            Ok(Err(_)) => {
                seen.push("connection closed".to_owned());
                return (true, seen.join(", then "));
            }
            Err(_) => {
                seen.push(format!("still open after {} s", wait.as_secs()));
                return (false, seen.join(", then "));
            }
        }
    }
}

/// A counter above every stored one of `meter` (attack meters keep their store rows across
/// runs against an external head-end).
pub(crate) fn next_counter(ctx: &Ctx, meter: &str) -> u64 {
    ctx.stored_counters(meter)
        .into_iter()
        .max()
        .map_or(1, |c| c + 1)
}

/// A register above every stored one of `meter` (a register must not go backwards).
pub(crate) fn next_kwh(ctx: &Ctx, meter: &str) -> f64 {
    ctx.stored_kwh(meter)
        .into_iter()
        .fold(0.0, f64::max)
        .floor()
        + 1.0
}
