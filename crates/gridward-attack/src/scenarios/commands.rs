//! Commands: forged, replayed, stale and misdirected commands reaching a meter, a meter posing
//! as the head-end on another meter's command topic, and one operator trying to disconnect many
//! meters alone.
//!
//! The meters attacked are victims of the harness (`x-cmd-a`, `x-cmd-b`, `x-cmd-c`:
//! [`Victims`], pinning the command signers of the target's PKI as a deployed meter would). A
//! command reaches them by injection, as from a compromised broker or a man in the middle
//! ([`Victims::inject_command`]); the meter checks it and answers the head-end with a signed
//! acknowledgement, and the head-end records a refusal as a `command_refused` security event
//! whose detail names the command and the meter's code. Each case demands that event (for that
//! command, with that code) **and** that the meter's state did not change.
//!
//! The harness is an insider with the PKI directory: it holds the head-end's command key
//! (`DIR/command-signers/NAME/key.pem`), so it can sign commands that pass the signature check
//! and reach the rule under test (the counter, the expiry, the target).
//!
//! 1. A command signed by a fresh key: `unknown_signer`.
//! 2. A command signed by a meter's key (`x-cmd-b`'s, from the PKI directory): `unknown_signer`.
//! 3. A command signed with the head-end's key but not sent by the head-end (a stolen key): the
//!    meter executes it, and the head-end flags its acknowledgement: `command_refused` ("did not
//!    send").
//! 4. ... the same bytes again (captured and replayed): `counter_not_fresh`.
//! 5. A new command with the head-end's key and a lower counter: `counter_not_fresh`.
//! 6. An expired command (head-end key, fresh counter): `expired`.
//! 7. A command for meter B delivered to meter A on A's topic: `bad_signature` (the topic is
//!    the external AAD, checked before the target).
//! 8. ... delivered to A as if on B's topic (a broker routing B's topic to A): `wrong_meter`.
//! 9. A meter (`x-cmd-pub`) publishing a command on A's command topic over MQTT: PUBACK 0x87,
//!    disconnected, `topic_not_authorized`; A never sees it.
//! 10. Genuine: an operator's `set_tariff` to `x-cmd-c` through the API
//!     (`POST /api/v1/meters/{id}/commands`): 202, sent by the head-end, executed, stored as
//!     acknowledged, nothing refused.
//! 11. ... that command's envelope, read from the store (read-only) and injected again:
//!     `counter_not_fresh`.
//! 12. One operator disconnecting more meters than the four-eyes threshold (12 of the genuine
//!     fleet) through the API (`POST /api/v1/commands`): 202, a pending proposal, no command
//!     stored.
//! 13. ... and the same operator approving it (`POST /api/v1/proposals/{id}/approve`): 403
//!     `four_eyes`, the API's `four_eyes_violation` event from that source, the proposal still
//!     pending, no command stored.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gridward_access::{Access, Argon2Params, NewUser, Role, Secret};
use gridward_core::MeterId;
use gridward_core::command::{self, Command, CommandBody, CommandId};
use gridward_core::envelope::SigningKey;
use gridward_meter::command::{DeviceState, Relay};
use gridward_pki::{LeafKeyAlg, StandaloneKeyPair};
use gridward_store::{
    CommandQuery, CommandStatus, CommandStore, ProposalStatus, StoredCommand, StoredSecurityEvent,
};
use time::OffsetDateTime;

use super::access::{PASSWORD, Session, User, api_request, describe, login_body, totp_of};
use super::dos::anonymous_config;
use super::revocation::{await_close, event_ip};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx};
use crate::fleet::Victims;
use crate::target::{ApiTarget, FLEET_PREFIX};

/// The scenario's name.
pub const NAME: &str = "commands";

/// How long a case waits for the meter's acknowledgement to become a security event.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(10);

/// The API's security event when an operator approves their own proposal.
const SELF_APPROVAL_REASON: &str = "four_eyes_violation";

const CASE_FRESH_KEY: &str = "a command signed by a fresh key, injected";
const CASE_METER_KEY: &str = "a command signed by a meter's key (from the PKI dir)";
const CASE_STOLEN: &str = "a command signed with the head-end's key, not sent by it";
const CASE_REPLAY: &str = "that command captured and injected again";
const CASE_LOWER: &str = "the head-end's key, a lower counter";
const CASE_EXPIRED: &str = "the head-end's key, fresh counter, expired";
const CASE_OTHER_TOPIC: &str = "a command for meter B injected to A on A's topic";
const CASE_ROUTED: &str = "a command for meter B injected to A on B's topic";
const CASE_PUBLISH: &str = "a meter publishes a command on another meter's topic";
const CASE_API: &str = "genuine: an operator's command through the API";
const CASE_API_REPLAY: &str = "that command captured from the store, injected again";
const CASE_MASS: &str = "one operator disconnects more meters than the threshold";
const CASE_SELF: &str = "the same operator approves that proposal";
const EXPECT_API: &str = "202 queued, executed, acknowledged, nothing refused";
const EXPECT_MASS: &str = "202 proposed, nothing queued";
const EXPECT_SELF: &str = "403, event four_eyes_violation";

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let operator = Operator::new(ctx, "cmd-operator").await;
    let op = operator.as_ref().ok().and_then(Option::as_ref);
    let mut checks = match meter_cases(ctx, op).await {
        Ok(c) => c,
        Err(e) => vec![Check::broken(NAME, "commands injected to victim meters", e)],
    };
    checks.append(&mut match &operator {
        Ok(Some(op)) => match four_eyes(ctx, op).await {
            Ok(c) => c,
            Err(e) => vec![Check::broken(NAME, "four eyes through the API", e)],
        },
        Ok(None) => vec![
            Check::new(NAME, CASE_MASS, EXPECT_MASS).observed(NO_API),
            Check::new(NAME, CASE_SELF, EXPECT_SELF).observed(NO_API),
        ],
        Err(e) => vec![Check::broken(NAME, "an operator of the API", e)],
    });
    checks
}

/// Why a case that needs the API did not run.
pub(crate) const NO_API: &str =
    "the target runs no HTTPS API (its [api] listen is \"off\"): not run";

/// An operator of the target's API (added to its users database as `gridward user add` would),
/// logged in.
pub(crate) struct Operator {
    api: ApiTarget,
    config: Arc<rustls::ClientConfig>,
    session: Session,
}

impl Operator {
    /// A new operator `x-{what}-{tag}`, logged in from a fresh source; `None` if the target runs
    /// no API.
    pub(crate) async fn new(ctx: &Ctx, what: &str) -> Result<Option<Self>, AttackError> {
        let Some(api) = ctx.target.api.clone() else {
            return Ok(None);
        };
        let user = operator(&api, what).await?;
        let config = anonymous_config(ctx)?;
        let session = login(ctx, &api, &config, &user).await?;
        Ok(Some(Self {
            api,
            config,
            session,
        }))
    }

    /// POSTs `body` to `path` with the session from a fresh source: the source and the answer.
    pub(crate) async fn post(
        &self,
        ctx: &Ctx,
        path: &str,
        body: &serde_json::Value,
    ) -> (IpAddr, Result<(u16, String), String>) {
        self.send(ctx, "POST", path, body).await
    }

    /// Sends `body` to `path` with `method` and the session from a fresh source: the source
    /// and the answer.
    pub(crate) async fn send(
        &self,
        ctx: &Ctx,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (IpAddr, Result<(u16, String), String>) {
        let source = ctx.fresh_source();
        let answer = api_request(
            ctx,
            &self.api,
            source,
            &self.config,
            method,
            path,
            &[self.session.bearer()],
            Some(body.to_string()),
        )
        .await;
        (source, answer)
    }
}

/// The head-end's command key, as the PKI directory holds it (the current command signer).
pub(crate) fn headend_key(ctx: &Ctx) -> Result<SigningKey, AttackError> {
    let now = OffsetDateTime::now_utc();
    let cert = ctx.pki().current_command_signer(now)?;
    let path = ctx.pki().command_signer_key_path(&cert.name)?;
    let pem = std::fs::read_to_string(&path)
        .map_err(|e| AttackError::Setup(format!("{}: {e}", path.display())))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| AttackError::Setup(e.to_string()))
}

/// A key no one trusts (Ed25519, generated now).
pub(crate) fn fresh_key() -> Result<SigningKey, AttackError> {
    let pair = StandaloneKeyPair::generate(LeafKeyAlg::Ed25519)?;
    SigningKey::from_pkcs8_pem(&pair.private_key_pem).map_err(|e| AttackError::Setup(e.to_string()))
}

/// Now, in whole seconds (commands are signed so).
pub(crate) fn now_s() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// A command to `meter` with `counter`, issued at `issued` and valid `minutes`.
pub(crate) fn command_for(
    meter: &str,
    body: CommandBody,
    counter: u64,
    issued: OffsetDateTime,
    minutes: i64,
) -> Result<Command, AttackError> {
    Ok(Command {
        id: CommandId::random(),
        meter_id: MeterId::new(meter)?,
        body,
        counter,
        issued_at: issued,
        expires_at: issued + time::Duration::minutes(minutes),
    })
}

/// `cmd` signed with `key`.
pub(crate) fn signed(key: &SigningKey, cmd: &Command) -> Result<Vec<u8>, AttackError> {
    command::sign(key, cmd).map_err(|e| AttackError::Setup(format!("signing a command: {e}")))
}

/// `meters/{id}/commands`.
pub(crate) fn commands_topic(meter: &str) -> String {
    format!("meters/{meter}/commands")
}

/// What a command may change on a meter, to compare before and after.
pub(crate) fn effect(s: &DeviceState) -> String {
    format!(
        "relay {}, tariff {}, firmware {} (sequence {}), last command {}",
        s.relay,
        s.tariff.as_deref().unwrap_or("none"),
        s.firmware.version,
        s.firmware.sequence,
        s.last_command
            .map_or_else(|| "none".to_owned(), |c| c.to_string())
    )
}

/// Waits for the head-end's `command_refused` event about `meter` naming command `id` (and,
/// if given, containing `code`), within `wait`.
pub(crate) async fn ack_event(
    ctx: &Ctx,
    after: i64,
    meter: &str,
    id: CommandId,
    code: Option<&str>,
    wait: Duration,
) -> Option<StoredSecurityEvent> {
    ctx.wait_event_where(after, wait, |e| names(e, meter, id, code))
        .await
}

/// Whether `e` is the head-end's `command_refused` event about `meter` for command `id`, with
/// the meter's refusal `code` if given (the detail ends with `: {code}`).
fn names(e: &StoredSecurityEvent, meter: &str, id: CommandId, code: Option<&str>) -> bool {
    e.event.reason == "command_refused"
        && e.event
            .meter_id
            .as_ref()
            .is_some_and(|m| m.as_str() == meter)
        && e.event.detail.contains(&id.to_string())
        && code.is_none_or(|c| e.event.detail.ends_with(&format!(": {c}")))
}

/// The verdict on a command delivered to a victim: refused by the meter with `code` (its
/// acknowledgement recorded as `command_refused` naming the command and the code), and the
/// meter's state unchanged.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn meter_refuses(
    ctx: &Ctx,
    victims: &Victims,
    scenario: &'static str,
    case: &str,
    meter: &str,
    topic: &str,
    bytes: Vec<u8>,
    id: CommandId,
    code: &str,
) -> Check {
    let expected = format!("meter refuses {code}, event command_refused");
    let Some(before_state) = victims.state(meter) else {
        return Check::broken(scenario, case, format!("{meter} is not a running victim"));
    };
    let before = ctx.last_event_id();
    if !victims.inject_command(meter, topic, bytes) {
        return Check::broken(scenario, case, format!("{meter} did not take the command"));
    }
    let event = ack_event(ctx, before, meter, id, Some(code), ACK_WAIT).await;
    verdict(
        ctx,
        victims,
        Check::new(scenario, case, expected),
        Judged {
            meter,
            before_state: &before_state,
            before,
            id,
            code,
            effect,
        },
        event,
    )
}

/// What [`verdict`] judges: `meter`'s refusal of command `id` with `code`, `effect` of its
/// state unchanged since `before_state`, the event recorded after event `before`.
pub(crate) struct Judged<'a> {
    pub(crate) meter: &'a str,
    pub(crate) before_state: &'a DeviceState,
    pub(crate) before: i64,
    pub(crate) id: CommandId,
    pub(crate) code: &'a str,
    pub(crate) effect: fn(&DeviceState) -> String,
}

/// Judges a refusal (see [`Judged`]): the event with the code, the state unchanged and no
/// transfer left running.
pub(crate) fn verdict(
    ctx: &Ctx,
    victims: &Victims,
    check: Check,
    j: Judged<'_>,
    event: Option<StoredSecurityEvent>,
) -> Check {
    let Judged {
        meter,
        before_state,
        before,
        id,
        code,
        effect,
    } = j;
    let after_state = victims.state(meter);
    let unchanged = after_state
        .as_ref()
        .is_some_and(|s| effect(s) == effect(before_state) && s.transfer.is_none());
    let state = match &after_state {
        Some(s) if unchanged => format!("{meter} unchanged ({})", effect(s)),
        Some(s) => format!(
            "{meter} CHANGED: {} → {}{}",
            effect(before_state),
            effect(s),
            if s.transfer.is_some() {
                ", a transfer still running"
            } else {
                ""
            }
        ),
        None => format!("{meter} no longer runs"),
    };
    let observed = match &event {
        Some(e) => format!("{state}; event command_refused ({})", e.event.detail),
        None => {
            let id = id.to_string();
            let said: Vec<String> = ctx
                .events_after(before)
                .into_iter()
                .filter(|e| e.event.detail.contains(&id))
                .map(|e| format!("{}: {}", e.event.reason, e.event.detail))
                .collect();
            format!("{state}; no command_refused event with {code} (about this command: {said:?})")
        }
    };
    let pass = unchanged && event.is_some();
    check
        .observed(observed)
        .pass(pass)
        .event(event.map(|e| e.id))
}

/// Cases 1 to 11.
async fn meter_cases(ctx: &Ctx, op: Option<&Operator>) -> Result<Vec<Check>, AttackError> {
    let a = ctx.attack_meter("cmd-a")?;
    let b = ctx.attack_meter("cmd-b")?;
    let c = ctx.attack_meter("cmd-c")?;
    let publisher = ctx.attack_meter("cmd-pub")?;
    let headend = headend_key(ctx)?;
    let victims = Victims::start(
        &ctx.target,
        &ctx.work().join("commands-victims"),
        &[a.clone(), b.clone(), c.clone()],
        None,
    )
    .await?;
    let mut checks = Vec::new();
    let a_topic = commands_topic(&a.id);
    let b_topic = commands_topic(&b.id);
    // Counters above any this meter executed in an earlier run (its state file is new, but an
    // external head-end keeps nothing of it: the meter decides alone).
    let base = victims
        .state(&a.id)
        .and_then(|s| s.last_command)
        .unwrap_or(0);

    // 1. A fresh key.
    let cmd = command_for(&a.id, CommandBody::Disconnect, base + 1000, now_s(), 5)?;
    let bytes = signed(&fresh_key()?, &cmd)?;
    checks.push(
        meter_refuses(
            ctx,
            &victims,
            NAME,
            CASE_FRESH_KEY,
            &a.id,
            &a_topic,
            bytes,
            cmd.id,
            "unknown_signer",
        )
        .await,
    );

    // 2. A meter's key.
    let cmd = command_for(&a.id, CommandBody::Disconnect, base + 1001, now_s(), 5)?;
    let bytes = signed(&b.signing_key()?, &cmd)?;
    checks.push(
        meter_refuses(
            ctx,
            &victims,
            NAME,
            CASE_METER_KEY,
            &a.id,
            &a_topic,
            bytes,
            cmd.id,
            "unknown_signer",
        )
        .await,
    );

    // 3. The head-end's key, a command the head-end never sent: executed, and flagged.
    let tariff = format!("harness-{}", base + 5);
    let genuine = command_for(
        &a.id,
        CommandBody::SetTariff {
            tariff: tariff.clone(),
        },
        base + 5,
        now_s(),
        5,
    )?;
    let captured = signed(&headend, &genuine)?;
    checks.push(
        stolen_key(
            ctx, &victims, &a.id, &a_topic, &captured, genuine.id, &tariff,
        )
        .await,
    );

    // 4. The same bytes again.
    checks.push(
        meter_refuses(
            ctx,
            &victims,
            NAME,
            CASE_REPLAY,
            &a.id,
            &a_topic,
            captured,
            genuine.id,
            "counter_not_fresh",
        )
        .await,
    );

    // 5. A lower counter, signed with the head-end's key.
    let cmd = command_for(&a.id, CommandBody::Disconnect, base + 4, now_s(), 5)?;
    let bytes = signed(&headend, &cmd)?;
    checks.push(
        meter_refuses(
            ctx,
            &victims,
            NAME,
            CASE_LOWER,
            &a.id,
            &a_topic,
            bytes,
            cmd.id,
            "counter_not_fresh",
        )
        .await,
    );

    // 6. Expired: issued 10 minutes ago, valid 5.
    let cmd = command_for(
        &a.id,
        CommandBody::Disconnect,
        base + 6,
        now_s() - time::Duration::minutes(10),
        5,
    )?;
    let bytes = signed(&headend, &cmd)?;
    checks.push(
        meter_refuses(
            ctx,
            &victims,
            NAME,
            CASE_EXPIRED,
            &a.id,
            &a_topic,
            bytes,
            cmd.id,
            "expired",
        )
        .await,
    );

    // 7 and 8. A command for B (head-end's key, a counter B would take) delivered to A.
    let b_base = victims
        .state(&b.id)
        .and_then(|s| s.last_command)
        .unwrap_or(0);
    let for_b = command_for(&b.id, CommandBody::Disconnect, b_base + 1, now_s(), 5)?;
    let bytes = signed(&headend, &for_b)?;
    let b_before = victims.state(&b.id);
    for (case, topic, code) in [
        (CASE_OTHER_TOPIC, &a_topic, "bad_signature"),
        (CASE_ROUTED, &b_topic, "wrong_meter"),
    ] {
        let check = meter_refuses(
            ctx,
            &victims,
            NAME,
            case,
            &a.id,
            topic,
            bytes.clone(),
            for_b.id,
            code,
        )
        .await;
        checks.push(b_untouched(&victims, check, &b.id, b_before.as_ref()));
    }

    // 9. A meter publishing a command (validly signed for A) on A's topic.
    let cmd = command_for(&a.id, CommandBody::Disconnect, base + 7, now_s(), 5)?;
    let bytes = signed(&headend, &cmd)?;
    checks.push(
        match publish_case(ctx, &victims, &publisher, &a.id, bytes).await {
            Ok(c) => c,
            Err(e) => Check::broken(NAME, CASE_PUBLISH, e),
        },
    );

    // 10 and 11. A command the head-end sends (an operator's, through the API), captured from
    // the store and injected again.
    let expect_replay = "meter refuses counter_not_fresh, event command_refused";
    match op {
        Some(op) => {
            let (check, sent) = through_api(ctx, &victims, op, &c.id).await;
            checks.push(check);
            checks.push(match sent {
                Some(cmd) => {
                    meter_refuses(
                        ctx,
                        &victims,
                        NAME,
                        CASE_API_REPLAY,
                        &c.id,
                        &commands_topic(&c.id),
                        cmd.envelope,
                        cmd.id,
                        "counter_not_fresh",
                    )
                    .await
                }
                None => Check::new(NAME, CASE_API_REPLAY, expect_replay)
                    .observed("no command was sent to capture (see the case before)"),
            });
        }
        None => {
            checks.push(Check::new(NAME, CASE_API, EXPECT_API).observed(NO_API));
            checks.push(Check::new(NAME, CASE_API_REPLAY, expect_replay).observed(NO_API));
        }
    }
    victims.stop().await;
    Ok(checks)
}

/// Case 3: executed by the meter (the signature is the head-end's), and the head-end flags the
/// acknowledgement of a command it never sent.
async fn stolen_key(
    ctx: &Ctx,
    victims: &Victims,
    meter: &str,
    topic: &str,
    bytes: &[u8],
    id: CommandId,
    tariff: &str,
) -> Check {
    let check = Check::new(
        NAME,
        CASE_STOLEN,
        "executed (the signature holds), and flagged: event command_refused (not sent)",
    );
    let before = ctx.last_event_id();
    if !victims.inject_command(meter, topic, bytes.to_vec()) {
        return Check::broken(
            NAME,
            CASE_STOLEN,
            format!("{meter} did not take the command"),
        );
    }
    let state = victims
        .wait_state(meter, ACK_WAIT, |s| s.tariff.as_deref() == Some(tariff))
        .await;
    let executed = state
        .as_ref()
        .is_some_and(|s| s.tariff.as_deref() == Some(tariff));
    let event = ack_event(ctx, before, meter, id, None, ACK_WAIT)
        .await
        .filter(|e| e.event.detail.contains("did not send"));
    let observed = format!(
        "{}; {}",
        state.as_ref().map_or_else(|| "no state".to_owned(), effect),
        event.as_ref().map_or_else(
            || "no command_refused event for it".to_owned(),
            |e| format!("event command_refused ({})", e.event.detail)
        )
    );
    check
        .observed(observed)
        .pass(executed && event.is_some())
        .event(event.map(|e| e.id))
}

/// Case 10: `POST /api/v1/meters/{meter}/commands` (set_tariff) as an operator; the head-end
/// signs and sends it, the meter executes it, the store has it acknowledged, and nothing is
/// refused. Returns the stored command (its envelope as the head-end sent it).
async fn through_api(
    ctx: &Ctx,
    victims: &Victims,
    op: &Operator,
    meter: &str,
) -> (Check, Option<StoredCommand>) {
    let check = Check::new(NAME, CASE_API, EXPECT_API);
    let tariff = format!("api-{:04x}", rand::random::<u16>());
    let before = ctx.last_event_id();
    let body = serde_json::json!({
        "kind": "set_tariff",
        "tariff": tariff,
        "reason": "attack harness: a genuine command",
    });
    let (_, answer) = op
        .post(ctx, &format!("/api/v1/meters/{meter}/commands"), &body)
        .await;
    let id = match &answer {
        Ok((202, body)) => serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["commands"][0]["id"].as_str().map(str::to_owned))
            .and_then(|id| id.parse::<CommandId>().ok()),
        _ => None,
    };
    let Some(id) = id else {
        return (
            check.observed(format!("{} (no queued command)", describe(&answer))),
            None,
        );
    };
    let state = victims
        .wait_state(meter, ACK_WAIT, |s| {
            s.tariff.as_deref() == Some(tariff.as_str())
        })
        .await;
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    let stored = loop {
        let stored = ctx.store().command(&id).ok().flatten();
        if stored
            .as_ref()
            .is_some_and(|c| c.status == CommandStatus::Acknowledged)
            || tokio::time::Instant::now() >= deadline
        {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let executed = state
        .as_ref()
        .is_some_and(|s| s.tariff.as_deref() == Some(tariff.as_str()));
    let acknowledged = stored
        .as_ref()
        .is_some_and(|c| c.status == CommandStatus::Acknowledged);
    let id_text = id.to_string();
    let refusals: Vec<String> = ctx
        .events_after(before)
        .into_iter()
        .filter(|e| e.event.detail.contains(&id_text))
        .map(|e| format!("{}: {}", e.event.reason, e.event.detail))
        .collect();
    let observed = format!(
        "202 queued {id}; {}; stored {}{}",
        state.as_ref().map_or_else(|| "no state".to_owned(), effect),
        stored.as_ref().map_or("nowhere", |c| c.status.as_str()),
        if refusals.is_empty() {
            String::new()
        } else {
            format!("; refusals recorded: {refusals:?}")
        }
    );
    (
        check
            .observed(observed)
            .pass(executed && acknowledged && refusals.is_empty()),
        stored.filter(|_| acknowledged),
    )
}

/// Fails `check` if meter B's state changed.
fn b_untouched(
    victims: &Victims,
    mut check: Check,
    b: &str,
    before: Option<&DeviceState>,
) -> Check {
    let now = victims.state(b);
    match (before, now.as_ref()) {
        (Some(x), Some(y)) if effect(x) == effect(y) => {
            check.observed.push_str(&format!("; {b} unchanged"));
        }
        _ => {
            check.pass = false;
            check.observed.push_str(&format!("; {b} CHANGED or gone"));
        }
    }
    check
}

/// Case 9: over MQTT, as meter `publisher`, on `victim`'s command topic.
async fn publish_case(
    ctx: &Ctx,
    victims: &Victims,
    publisher: &Creds,
    victim: &str,
    bytes: Vec<u8>,
) -> Result<Check, AttackError> {
    let topic = commands_topic(victim);
    let before_state = victims.state(victim);
    let mut client = ctx.connect_meter(publisher).await?;
    let before = ctx.last_event_id();
    let out = Ctx::publish(&mut client, &topic, bytes, 1).await;
    let (closed, after) = await_close(&mut client, Duration::from_secs(5)).await;
    // Give a delivery, had there been one, time to reach the victim.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now_state = victims.state(victim);
    let untouched = match (&before_state, &now_state) {
        (Some(x), Some(y)) => effect(x) == effect(y) && y.relay == Relay::Connected,
        _ => false,
    };
    let mut check = ctx
        .refusal(
            NAME,
            CASE_PUBLISH,
            "topic_not_authorized",
            Some(&publisher.id),
            before,
            out.refused() && closed && untouched,
            format!("{out}, then {after}"),
        )
        .await;
    check.observed.push_str(&match &now_state {
        Some(s) if untouched => format!("; {victim} unchanged ({})", effect(s)),
        Some(s) => format!("; {victim} CHANGED ({})", effect(s)),
        None => format!("; {victim} no longer runs"),
    });
    Ok(check)
}

// ---- Four eyes, through the API -------------------------------------------------------------

/// Cases 12 and 13.
async fn four_eyes(ctx: &Ctx, op: &Operator) -> Result<Vec<Check>, AttackError> {
    // More meters than the four-eyes threshold (the default 10): the genuine fleet's.
    let meters: Vec<String> = (1..=12).map(|n| format!("{FLEET_PREFIX}{n:06}")).collect();
    let queued_before = queued_for(ctx, &meters);
    let before = ctx.last_event_id();
    let body = serde_json::json!({
        "kind": "disconnect",
        "meters": meters,
        "reason": "attack harness: one operator disconnecting many meters alone",
    });
    let (_, answer) = op.post(ctx, "/api/v1/commands", &body).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proposal = proposal_id(&answer);
    let pending = proposal.and_then(|id| ctx.store().proposal(id).ok().flatten());
    let queued = queued_for(ctx, &meters);
    let is_pending = pending
        .as_ref()
        .is_some_and(|p| p.status == ProposalStatus::Pending);
    let mut checks = vec![
        Check::new(NAME, CASE_MASS, EXPECT_MASS)
            .observed(format!(
                "{}; proposal {}; commands queued for those meters: {} (before {queued_before})",
                describe(&answer),
                match (&proposal, &pending) {
                    (Some(id), Some(p)) => format!("{id} {}", p.status.as_str()),
                    (Some(id), None) => format!("{id} not in the store"),
                    _ => "none".to_owned(),
                },
                queued
            ))
            .pass(matches!(answer, Ok((202, _))) && is_pending && queued == queued_before),
    ];
    let Some(id) = proposal else {
        checks.push(
            Check::new(NAME, CASE_SELF, EXPECT_SELF)
                .observed("no proposal to approve (see the case before)"),
        );
        return Ok(checks);
    };

    // 13. The proposer approves their own proposal.
    let before_approve = ctx.last_event_id();
    let (source, answer) = op
        .post(
            ctx,
            &format!("/api/v1/proposals/{id}/approve"),
            &serde_json::json!({}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still = ctx.store().proposal(id).ok().flatten().map(|p| p.status);
    let queued_after = queued_for(ctx, &meters);
    let event = ctx
        .wait_event_where(before_approve, crate::ctx::EVENT_WAIT, |e| {
            e.event.reason == SELF_APPROVAL_REASON
                && event_ip(e.event.source.as_deref()) == Some(source)
        })
        .await;
    let refused = matches!(answer, Ok((403, _)));
    let ok = refused
        && still == Some(ProposalStatus::Pending)
        && queued_after == queued_before
        && event.is_some();
    checks.push(
        Check::new(NAME, CASE_SELF, EXPECT_SELF)
            .observed(format!(
                "{}; proposal {id} {}; commands queued: {queued_after}; {}",
                describe(&answer),
                still.map_or("gone", |s| s.as_str()),
                match &event {
                    Some(e) => format!("event {} ({})", e.event.reason, e.event.detail),
                    None => format!(
                        "no {SELF_APPROVAL_REASON} event from {source} (events: {:?})",
                        reasons_from(ctx, before, source)
                    ),
                }
            ))
            .pass(ok)
            .event(event.map(|e| e.id)),
    );
    Ok(checks)
}

/// Commands stored for `meters`, in any status.
fn queued_for(ctx: &Ctx, meters: &[String]) -> usize {
    meters
        .iter()
        .filter_map(|m| MeterId::new(m).ok())
        .map(|m| {
            ctx.store()
                .commands(&CommandQuery {
                    meter_id: Some(m),
                    ..CommandQuery::default()
                })
                .map_or(0, |c| c.len())
        })
        .sum()
}

/// The proposal id of a 202 answer (`proposal_id`, or `proposal.id`, or `id`).
fn proposal_id(answer: &Result<(u16, String), String>) -> Option<i64> {
    let Ok((202, body)) = answer else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["proposal_id"]
        .as_i64()
        .or_else(|| v["proposal"]["id"].as_i64())
        .or_else(|| v["id"].as_i64())
}

fn reasons_from(ctx: &Ctx, after: i64, source: IpAddr) -> Vec<String> {
    ctx.events_after(after)
        .into_iter()
        .filter(|e| event_ip(e.event.source.as_deref()) == Some(source))
        .map(|e| e.event.reason)
        .collect()
}

/// An operator of the API's users database (`x-{what}-{tag}`), added as `gridward user add`
/// would, with its TOTP enrolment.
pub(crate) async fn operator(api: &ApiTarget, what: &str) -> Result<User, AttackError> {
    let tag = format!("{:06x}", rand::random::<u32>() & 0x00ff_ffff);
    let name = format!("x-{what}-{tag}");
    let path = api.users.clone();
    let n = name.clone();
    // Argon2id hashing is slow on purpose.
    tokio::task::spawn_blocking(move || {
        let setup =
            |e: &dyn std::fmt::Display| AttackError::Setup(format!("{}: {e}", path.display()));
        let access = Access::open(&path, Argon2Params::OWASP).map_err(|e| setup(&e))?;
        let enrolment = access
            .add_user(
                NewUser {
                    username: n.clone(),
                    role: Role::Operator,
                    meters: Vec::new(),
                    password: Secret::new(PASSWORD),
                },
                OffsetDateTime::now_utc(),
            )
            .map_err(|e| setup(&format_args!("adding {n}: {e}")))?;
        let totp = match enrolment {
            Some(e) => Some(totp_of(&e.secret_base32).map_err(|e| setup(&e))?),
            None => None,
        };
        Ok(User { name: n, totp })
    })
    .await
    .map_err(|e| AttackError::Setup(format!("creating {name}: {e}")))?
}

/// Logs `user` in from a fresh source.
pub(crate) async fn login(
    ctx: &Ctx,
    api: &ApiTarget,
    config: &Arc<rustls::ClientConfig>,
    user: &User,
) -> Result<Session, AttackError> {
    let body = login_body(user, PASSWORD, user.code().as_deref());
    let answer = api_request(
        ctx,
        api,
        ctx.fresh_source(),
        config,
        "POST",
        "/api/v1/session",
        &[],
        Some(body),
    )
    .await;
    Session::from_answer(&answer).ok_or_else(|| {
        AttackError::Setup(format!(
            "{} cannot log in: {}",
            user.name,
            describe(&answer)
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use gridward_core::command::{CommandKind, TrustedSigner, VerifyContext};
    use gridward_store::SecurityEvent;

    use super::*;

    fn event(meter: &str, detail: &str) -> StoredSecurityEvent {
        StoredSecurityEvent {
            id: 1,
            event: SecurityEvent {
                at: OffsetDateTime::now_utc(),
                meter_id: Some(MeterId::new(meter).unwrap()),
                source: None,
                reason: "command_refused".to_owned(),
                detail: detail.to_owned(),
            },
        }
    }

    #[test]
    fn an_event_counts_only_for_its_meter_command_and_code() {
        let id = CommandId([7; 16]);
        let detail = format!("meter refused command {id} that this head-end did not send: expired");
        let e = event("x-cmd-a", &detail);
        assert!(names(&e, "x-cmd-a", id, Some("expired")));
        assert!(names(&e, "x-cmd-a", id, None));
        assert!(!names(&e, "x-cmd-a", id, Some("not_yet_valid")));
        assert!(!names(&e, "x-cmd-b", id, Some("expired")));
        assert!(!names(&e, "x-cmd-a", CommandId([8; 16]), Some("expired")));
        let mut other = e.clone();
        other.event.reason = "replay".to_owned();
        assert!(!names(&other, "x-cmd-a", id, Some("expired")));
    }

    #[test]
    fn only_a_202_proposal_has_an_id() {
        let proposed = r#"{"status":"proposed","proposal":{"id":7,"expires_at":"x"}}"#;
        assert_eq!(proposal_id(&Ok((202, proposed.to_owned()))), Some(7));
        assert_eq!(proposal_id(&Ok((200, proposed.to_owned()))), None);
        let queued = r#"{"status":"queued","commands":[{"id":"00","meter_id":"g000001"}]}"#;
        assert_eq!(proposal_id(&Ok((202, queued.to_owned()))), None);
        assert_eq!(proposal_id(&Err("no answer".to_owned())), None);
    }

    #[test]
    fn commands_signed_here_verify_only_on_their_topic_and_with_their_key() {
        let key = fresh_key().unwrap();
        let cmd = command_for("x-cmd-a", CommandBody::Disconnect, 3, now_s(), 5).unwrap();
        let bytes = signed(&key, &cmd).unwrap();
        let meter = MeterId::new("x-cmd-a").unwrap();
        let pinned = [TrustedSigner {
            key: key.verifying_key().unwrap(),
            not_before: now_s() - time::Duration::days(1),
            not_after: now_s() + time::Duration::days(1),
        }];
        let verify = |topic: &str, signers: &[TrustedSigner]| {
            command::verify(
                &bytes,
                &VerifyContext {
                    meter_id: &meter,
                    topic,
                    signers,
                    last_counter: None,
                    now: OffsetDateTime::now_utc(),
                    allowed: &CommandKind::ALL,
                    max_skew_secs: 300,
                },
            )
            .map(|_| ())
            .map_err(|e| e.reason.code())
        };
        assert_eq!(verify("meters/x-cmd-a/commands", &pinned), Ok(()));
        assert_eq!(
            verify("meters/x-cmd-b/commands", &pinned),
            Err("bad_signature")
        );
        assert_eq!(
            verify("meters/x-cmd-a/commands", &[]),
            Err("unknown_signer")
        );
    }
}
