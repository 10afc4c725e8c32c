//! Detection: attacks that are alarm conditions must not only be refused but raise their alarm
//! (issue 11). Each case attacks, demands the refusal and its security event as every other
//! scenario does, and then the alarm in the head-end's store (type and originator, seen since
//! the case began), whose id the case records.
//!
//! 1. A meter reports its terminal cover opened (a signed `MeterEvent`): stored, alarm
//!    `tamper` on the meter.
//! 2. A data concentrator (`x-det-dc`, its own certificate, one PLC meter `x-det-plc` attached
//!    by an operator through the API) relays its meter's genuine reading: stored with the
//!    meter's own envelope.
//! 3. It relays the envelope of a meter not registered behind it (captured, genuinely signed):
//!    refused, `relay_not_authorized` naming the concentrator, alarm `relay_refused`.
//! 4. It relays its meter's envelope altered: refused, `bad_signature` about the meter.
//! 5. It publishes on its meter's topic directly: `topic_not_authorized`, disconnected.
//! 6. It subscribes to its meter's commands topic: SUBACK failure, `subscribe_not_authorized`.
//! 7. One meter certificate connecting from four addresses in turn, each taking over the live
//!    session (a cloned meter): alarm `cloned_meter` (the head-end's default is three takeovers
//!    from differing addresses).
//! 8. One source brute-forcing the handshake with rogue certificates: refused, banned
//!    (`source_banned`), alarm `refusal_burst` on the source.

use std::net::IpAddr;
use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::document::{Event, EventKind};
use gridward_core::relay::{self, RelayItem};
use gridward_mqtt::client::{Client, Packet, Protocol, QoS};
use gridward_pki::{IssueOptions, Pki};
use gridward_store::{AlarmQuery, AlarmStore, MeterEventQuery, ReadingQuery, Store, StoredAlarm};
use time::OffsetDateTime;

use super::commands::{NO_API, Operator};
use super::revocation::{await_close, connect_error, from_source, next_counter, next_kwh};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx};

/// The scenario's name.
pub const NAME: &str = "detection";

/// How long a case waits for its alarm (the detection thread decides after the event is stored).
const ALARM_WAIT: Duration = Duration::from_secs(10);

/// Connections of the cloned meter's certificate, each from another address.
const CLONE_CONNECTIONS: usize = 4;

/// Handshakes at most the brute-forcing source tries (the head-end's defaults ban it and raise
/// the burst after ten).
const BRUTE_FORCE_ATTEMPTS: usize = 14;

const CASE_TAMPER: &str = "a meter reports its terminal cover opened";
const CASE_RELAY_GENUINE: &str = "genuine: a concentrator relays its PLC meter's reading";
const CASE_RELAY_FOREIGN: &str = "a concentrator relays for a meter not behind it";
const CASE_RELAY_ALTERED: &str = "a concentrator relays its meter's envelope altered";
const CASE_ACL_PUBLISH: &str = "a concentrator publishes on its meter's topic";
const CASE_ACL_SUBSCRIBE: &str = "a concentrator subscribes to its meter's commands";
const CASE_CLONE: &str = "one meter certificate from four addresses in turn";
const CASE_BRUTE: &str = "one source brute-forces the handshake";

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = vec![or_broken(CASE_TAMPER, tamper(ctx).await)];
    checks.extend(match relay_cases(ctx).await {
        Ok(c) => c,
        Err(e) => vec![Check::broken(NAME, "a data concentrator relaying", e)],
    });
    checks.push(or_broken(CASE_CLONE, clone(ctx).await));
    checks.push(or_broken(CASE_BRUTE, brute_force(ctx).await));
    checks
}

fn or_broken(case: &str, result: Result<Check, AttackError>) -> Check {
    result.unwrap_or_else(|e| Check::broken(NAME, case, e))
}

/// Waits (up to [`ALARM_WAIT`]) for an active alarm of `alarm_type` on `originator` seen at or
/// after `since`; records it in `check` (or fails it, listing the alarms there are).
async fn with_alarm(
    ctx: &Ctx,
    mut check: Check,
    alarm_type: &str,
    originator: &str,
    since: OffsetDateTime,
) -> Check {
    let query = AlarmQuery {
        active_only: true,
        alarm_type: Some(alarm_type.to_owned()),
        originator: Some(originator.to_owned()),
        ..AlarmQuery::default()
    };
    // Store times are whole seconds or finer: a second of slack for the comparison.
    let since = since - time::Duration::seconds(1);
    let deadline = tokio::time::Instant::now() + ALARM_WAIT;
    let found: Option<StoredAlarm> = loop {
        let found = ctx
            .store()
            .alarms(&query)
            .ok()
            .and_then(|v| v.into_iter().find(|a| a.last_seen >= since));
        if found.is_some() || tokio::time::Instant::now() >= deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match &found {
        Some(a) => {
            check.observed.push_str(&format!(
                "; alarm {} ({}) on {}, count {}",
                a.alarm_type, a.severity, a.originator, a.count
            ));
        }
        None => {
            let active: Vec<String> = ctx
                .store()
                .alarms(&AlarmQuery {
                    active_only: true,
                    ..AlarmQuery::default()
                })
                .unwrap_or_default()
                .iter()
                .map(|a| format!("{} on {}", a.alarm_type, a.originator))
                .collect();
            check.pass = false;
            check.observed.push_str(&format!(
                "; NO {alarm_type} alarm on {originator} (active: {active:?})"
            ));
        }
    }
    check.alarm(found.map(|a| a.id))
}

async fn tamper(ctx: &Ctx) -> Result<Check, AttackError> {
    let meter = ctx.attack_meter("det-tamper")?;
    let id = MeterId::new(&meter.id)?;
    let started = OffsetDateTime::now_utc();
    let now = OffsetDateTime::from_unix_timestamp(started.unix_timestamp())
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let doc = Event {
        meter_id: id.clone(),
        timestamp: now,
        kind: EventKind::TerminalCoverOpened,
    }
    .to_xml();
    let topic = id.events_topic();
    let counter = next_counter(ctx, &meter.id).max(unix_counter());
    let env = Ctx::sign(&meter.signing_key()?, &meter.id, counter, &topic, &doc)?;
    let mut client = ctx.connect_meter(&meter).await?;
    let out = Ctx::publish(&mut client, &topic, env, 1).await;
    let _ = client.disconnect().await;
    let stored = ctx
        .store()
        .meter_events(&MeterEventQuery {
            meter: Some(id),
            ..MeterEventQuery::default()
        })
        .map(|v| {
            v.iter()
                .any(|e| e.kind == EventKind::TerminalCoverOpened && e.counter == counter)
        })
        .unwrap_or(false);
    let check = Check::new(NAME, CASE_TAMPER, "PUBACK success, stored, alarm tamper")
        .observed(format!(
            "{out}; {}",
            if stored { "stored" } else { "NOT stored" }
        ))
        .pass(!out.refused() && stored);
    Ok(with_alarm(
        ctx,
        check,
        "tamper",
        &format!("meter:{}", meter.id),
        started,
    )
    .await)
}

/// A counter above any a previous run against the same head-end used for a meter whose stored
/// readings do not show it (events): the clock in milliseconds.
fn unix_counter() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(1)
}

/// The concentrator `x-{name}` of the target's PKI, issued now.
fn attack_concentrator(ctx: &Ctx, name: &str) -> Result<Creds, AttackError> {
    let id = format!("x-{name}");
    let mut opts = IssueOptions::new("gridward-attack");
    opts.replace = true;
    ctx.pki()
        .issue_concentrator(&MeterId::new(&id)?, &opts, OffsetDateTime::now_utc())?;
    Ok(Creds::in_pki(&ctx.target.pki_dir, "concentrators", &id))
}

/// A concentrator connected from a fresh source.
async fn connect_concentrator(ctx: &Ctx, dc: &Creds) -> Result<Client, AttackError> {
    let config = ctx.client_config(dc)?;
    let (client, _) = ctx
        .mqtt_from(ctx.fresh_source(), config, &dc.id, Protocol::V5)
        .await
        .map_err(|e| {
            AttackError::Setup(format!("{} cannot connect: {}", dc.id, connect_error(&e)))
        })?;
    Ok(client)
}

/// A genuine reading envelope of `meter` as relayed: its readings topic, its own signature.
fn relay_item(ctx: &Ctx, meter: &Creds, counter: u64) -> Result<RelayItem, AttackError> {
    let topic = format!("meters/{}/readings", meter.id);
    Ok(RelayItem {
        envelope: Ctx::genuine(meter, counter, next_kwh(ctx, &meter.id))?,
        topic,
    })
}

fn stored_envelope(ctx: &Ctx, meter: &str, counter: u64) -> Option<Vec<u8>> {
    let id = MeterId::new(meter).ok()?;
    let rows = ctx.store().readings(&ReadingQuery::new(id)).ok()?;
    let row = rows.iter().find(|r| r.counter == counter)?;
    ctx.store().envelope(row.id).ok().flatten()
}

async fn relay_cases(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    let dc = attack_concentrator(ctx, "det-dc")?;
    let plc = ctx.attack_meter("det-plc")?;
    let foreign = ctx.attack_meter("det-foreign")?;
    let Some(op) = Operator::new(ctx, "det-operator").await? else {
        return Ok([CASE_RELAY_GENUINE, CASE_RELAY_FOREIGN, CASE_RELAY_ALTERED]
            .into_iter()
            .map(|c| Check::new(NAME, c, "the case runs").observed(NO_API))
            .collect());
    };
    // The operator registers the PLC meter behind the concentrator, as a utility would.
    let path = format!("/api/v1/concentrators/{}/meters", dc.id);
    let body = serde_json::json!({ "attach": [plc.id], "detach": [] });
    let (_, answer) = op.send(ctx, "PUT", &path, &body).await;
    match &answer {
        Ok((200, _)) => {}
        other => {
            return Err(AttackError::Setup(format!(
                "PUT {path} as an operator: {}",
                super::access::describe(other)
            )));
        }
    }
    // A new meter's key reaches the relay path on a reload (as `kill -HUP` after issuing), or
    // on a miss at most every few seconds.
    if ctx.target.can_reload() {
        ctx.target.reload().map_err(AttackError::Setup)?;
    } else {
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let topic = relay::relay_topic(&MeterId::new(&dc.id)?);
    let mut checks = Vec::new();

    // 2. Genuine.
    let mut client = connect_concentrator(ctx, &dc).await?;
    let before_genuine = ctx.last_event_id();
    let counter = next_counter(ctx, &plc.id);
    let item = relay_item(ctx, &plc, counter)?;
    let out = Ctx::publish(
        &mut client,
        &topic,
        relay::encode_batch(std::slice::from_ref(&item)),
        1,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let stored = loop {
        let stored = stored_envelope(ctx, &plc.id, counter);
        if stored.is_some() || tokio::time::Instant::now() >= deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let own = stored.as_deref() == Some(item.envelope.as_slice());
    let refusals: Vec<String> = ctx
        .events_after(before_genuine)
        .into_iter()
        .filter(|e| {
            e.event
                .meter_id
                .as_ref()
                .is_some_and(|m| m.as_str() == plc.id)
        })
        .map(|e| e.event.reason)
        .collect();
    checks.push(
        Check::new(
            NAME,
            CASE_RELAY_GENUINE,
            "PUBACK success, stored with the meter's own envelope",
        )
        .observed(format!(
            "{out}; {}{}",
            match &stored {
                None => "NOT stored",
                Some(_) if own => "stored, envelope byte for byte the meter's",
                Some(_) => "stored with ANOTHER envelope",
            },
            if refusals.is_empty() {
                String::new()
            } else {
                format!("; REFUSED: {refusals:?}")
            }
        ))
        .pass(!out.refused() && own && refusals.is_empty()),
    );

    // 3. A meter not behind it.
    let started = OffsetDateTime::now_utc();
    let before = ctx.last_event_id();
    let foreign_counter = next_counter(ctx, &foreign.id);
    let item = relay_item(ctx, &foreign, foreign_counter)?;
    let out = Ctx::publish(&mut client, &topic, relay::encode_batch(&[item]), 2).await;
    let check = ctx
        .refusal(
            NAME,
            CASE_RELAY_FOREIGN,
            "relay_not_authorized",
            Some(&dc.id),
            before,
            true,
            format!("batch {out}"),
        )
        .await;
    let check = nothing_stored(ctx, check, &foreign.id, foreign_counter);
    let mut check = with_alarm(
        ctx,
        check,
        "relay_refused",
        &format!("concentrator:{}", dc.id),
        started,
    )
    .await;
    check.expected = "refused, event relay_not_authorized, alarm relay_refused".into();
    checks.push(check);

    // 4. Altered.
    let before = ctx.last_event_id();
    let counter = next_counter(ctx, &plc.id);
    let mut item = relay_item(ctx, &plc, counter)?;
    item.envelope = gridward_meter::concentrator::alter(&item.envelope).to_vec();
    let out = Ctx::publish(&mut client, &topic, relay::encode_batch(&[item]), 3).await;
    let check = ctx
        .refusal(
            NAME,
            CASE_RELAY_ALTERED,
            "bad_signature",
            Some(&plc.id),
            before,
            true,
            format!("batch {out}"),
        )
        .await;
    checks.push(nothing_stored(ctx, check, &plc.id, counter));

    // 5. Its meter's topic, directly.
    let before = ctx.last_event_id();
    let meter_topic = format!("meters/{}/readings", plc.id);
    let env = Ctx::genuine(&plc, next_counter(ctx, &plc.id), next_kwh(ctx, &plc.id))?;
    let out = Ctx::publish(&mut client, &meter_topic, env, 4).await;
    let (closed, after) = await_close(&mut client, Duration::from_secs(5)).await;
    checks.push(
        ctx.refusal(
            NAME,
            CASE_ACL_PUBLISH,
            "topic_not_authorized",
            Some(&dc.id),
            before,
            out.refused() && closed,
            format!("{out}, then {after}"),
        )
        .await,
    );

    // 6. A downward topic.
    let mut client = connect_concentrator(ctx, &dc).await?;
    let before = ctx.last_event_id();
    let filter = format!("meters/{}/commands", plc.id);
    let suback = subscribe(&mut client, &filter).await;
    let _ = client.disconnect().await;
    let (refused, observed) = match &suback {
        Some(codes) => (
            codes.iter().all(|c| *c >= 0x80),
            format!("SUBACK {codes:02x?}"),
        ),
        None => (false, "no SUBACK".to_owned()),
    };
    checks.push(
        ctx.refusal(
            NAME,
            CASE_ACL_SUBSCRIBE,
            "subscribe_not_authorized",
            Some(&dc.id),
            before,
            refused,
            observed,
        )
        .await,
    );
    Ok(checks)
}

/// Fails `check` if `meter` has a stored reading with `counter`.
fn nothing_stored(ctx: &Ctx, mut check: Check, meter: &str, counter: u64) -> Check {
    if ctx.stored_counters(meter).contains(&counter) {
        check.pass = false;
        check
            .observed
            .push_str(&format!("; STORED for {meter} (counter {counter})"));
    } else {
        check
            .observed
            .push_str(&format!("; nothing stored for {meter}"));
    }
    check
}

/// Subscribes at QoS 1; the SUBACK's codes, or `None` without one in 5 s.
async fn subscribe(client: &mut Client, filter: &str) -> Option<Vec<u8>> {
    client.subscribe(1, filter, QoS::AtLeastOnce).await.ok()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, client.recv()).await {
            Ok(Ok(Packet::SubAck { return_codes, .. })) => return Some(return_codes),
            Ok(Ok(_)) => continue,
            _ => return None,
        }
    }
}

async fn clone(ctx: &Ctx) -> Result<Check, AttackError> {
    let meter = ctx.attack_meter("det-clone")?;
    let started = OffsetDateTime::now_utc();
    let mut sources: Vec<IpAddr> = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..CLONE_CONNECTIONS {
        let source = ctx.fresh_source();
        let config = ctx.client_config(&meter)?;
        let (client, _) = ctx
            .mqtt_from(source, config, &meter.id, Protocol::V5)
            .await
            .map_err(|e| {
                AttackError::Setup(format!("{} from {source}: {}", meter.id, connect_error(&e)))
            })?;
        sources.push(source);
        // The previous connection is taken over; keep the latest open.
        clients.push(client);
    }
    let check = Check::new(NAME, CASE_CLONE, "alarm cloned_meter")
        .observed(format!(
            "connected from {}, each taking over the last",
            sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .pass(true);
    let check = with_alarm(
        ctx,
        check,
        "cloned_meter",
        &format!("meter:{}", meter.id),
        started,
    )
    .await;
    for mut c in clients {
        let _ = c.disconnect().await;
    }
    Ok(check)
}

async fn brute_force(ctx: &Ctx) -> Result<Check, AttackError> {
    let dir = ctx.rogue_pki()?;
    let victim = "x-det-brute";
    let mut opts = IssueOptions::new("gridward-attack");
    opts.replace = true;
    Pki::open(&dir, None)?.issue_meter(&MeterId::new(victim)?, &opts, OffsetDateTime::now_utc())?;
    let creds = Creds::in_pki(&dir, "meters", victim);
    let config = ctx.client_config(&creds)?;
    let source = ctx.fresh_source();
    let started = OffsetDateTime::now_utc();
    let before = ctx.last_event_id();
    let mut connected = 0;
    let mut tries = 0;
    for _ in 0..BRUTE_FORCE_ATTEMPTS {
        tries += 1;
        if let Ok((mut c, _)) = ctx
            .mqtt_from(source, config.clone(), victim, Protocol::V5)
            .await
        {
            connected += 1;
            let _ = c.disconnect().await;
        }
    }
    let check = ctx
        .refusal(
            NAME,
            CASE_BRUTE,
            "source_banned",
            None,
            before,
            connected == 0,
            format!("{tries} handshakes from {source}, {connected} connected"),
        )
        .await;
    let check = from_source(ctx, check, before, source);
    let mut check = with_alarm(
        ctx,
        check,
        "refusal_burst",
        &format!("source:{source}"),
        started,
    )
    .await;
    check.expected = "refused, banned (event source_banned), alarm refusal_burst".into();
    Ok(check)
}
