//! Replay: a message that was genuine once, sent again.
//!
//! 1. A captured envelope sent again, byte for byte: acknowledged as a duplicate (that is what a
//!    meter's retry after a lost PUBACK looks like) and stored once: the replay gains nothing.
//! 2. A counter used again with other content (a cloned meter, or a forged resend): `replay`.
//! 3. A captured message withheld and injected after newer ones: its counter is below the
//!    last accepted one and nothing byte-identical is stored: `replay`.
//! 4. A captured message whose counter was never used, injected after the freshness window:
//!    `stale`.
//! 5. A valid envelope re-published on another topic (readings → events): the topic is signed
//!    (external AAD), so `bad_signature`.
//! 6. A downstream request replayed to the sink: `401 nonce_replayed`.

use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_core::envelope::{self, EnvelopeParams};
use gridward_core::httpsig::HttpSigningKey;
use gridward_hes::forward::body::signed_request;
use gridward_store::{OutboxItem, TargetId};
use time::OffsetDateTime;

use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx, PubOutcome};

/// The scenario's name.
pub const NAME: &str = "replay";

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = Vec::new();
    match mqtt_cases(ctx).await {
        Ok(mut c) => checks.append(&mut c),
        Err(e) => checks.push(Check::broken(NAME, "replays over MQTT", e)),
    }
    checks.push(match sink_case(ctx).await {
        Ok(c) => c,
        Err(e) => Check::broken(NAME, "a downstream request replayed to the sink", e),
    });
    checks
}

async fn mqtt_cases(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    let victim = ctx.attack_meter("replay-victim")?;
    let key = victim.signing_key()?;
    let readings = format!("meters/{}/readings", victim.id);
    let mut client = ctx.connect_meter(&victim).await?;
    let mut checks = Vec::new();

    // Counters 1..=3 genuine; counter 4 signed now but withheld (captured on the way).
    let mut captured = Vec::new();
    for counter in 1..=3u64 {
        let env = Ctx::genuine(&victim, counter, counter as f64)?;
        let out = Ctx::publish(&mut client, &readings, env.clone(), counter as u16).await;
        if out != PubOutcome::Acked(0) {
            return Err(AttackError::Setup(format!(
                "the victim's genuine reading {counter} was not accepted: {out}"
            )));
        }
        captured.push(env);
    }
    let withheld = Ctx::genuine(&victim, 4, 4.0)?;
    for counter in 5..=6u64 {
        let env = Ctx::genuine(&victim, counter, counter as f64)?;
        Ctx::publish(&mut client, &readings, env, counter as u16).await;
    }

    // 1. Byte-identical resend.
    let before = ctx.last_event_id();
    let out = Ctx::publish(&mut client, &readings, captured[1].clone(), 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = ctx.stored_counters(&victim.id);
    let twice = stored.iter().filter(|&&c| c == 2).count();
    let events = ctx.events_after(before);
    checks.push(
        Check::new(
            NAME,
            "a captured envelope sent again, byte for byte",
            "acknowledged as a duplicate, stored once, no alarm",
        )
        .observed(format!(
            "{out}; counter 2 stored {twice} time(s); {} event(s)",
            events.len()
        ))
        .pass(out == PubOutcome::Acked(0) && twice == 1 && events.is_empty()),
    );

    // 2. A used counter with other content.
    let before = ctx.last_event_id();
    let topic = readings.clone();
    let forged = Ctx::sign(
        &key,
        &victim.id,
        3,
        &topic,
        &Ctx::reading_xml(&victim.id, 99.0)?,
    )?;
    let out = Ctx::publish(&mut client, &readings, forged, 101).await;
    checks.push(
        ctx.refusal(
            NAME,
            "counter 3 used again with other content",
            "replay",
            Some(&victim.id),
            before,
            out.refused() && !ctx.stored_kwh(&victim.id).contains(&99.0),
            out.to_string(),
        )
        .await,
    );

    // 3. The withheld message, injected after newer ones.
    let before = ctx.last_event_id();
    let out = Ctx::publish(&mut client, &readings, withheld, 102).await;
    checks.push(
        ctx.refusal(
            NAME,
            "a withheld message (counter 4) injected after counters 5 and 6",
            "replay",
            Some(&victim.id),
            before,
            out.refused() && !ctx.stored_counters(&victim.id).contains(&4),
            out.to_string(),
        )
        .await,
    );

    // 4. A message signed 10 minutes ago with a fresh counter, injected now.
    let before = ctx.last_event_id();
    let meter = MeterId::new(&victim.id)?;
    let old = envelope::sign(
        &key,
        &EnvelopeParams {
            meter_id: &meter,
            counter: 50,
            timestamp: (OffsetDateTime::now_utc() - time::Duration::minutes(10)).unix_timestamp(),
            content_type: Format::Xml,
            topic: &readings,
        },
        Ctx::reading_xml(&victim.id, 50.0)?.as_bytes(),
    )?;
    let out = Ctx::publish(&mut client, &readings, old, 103).await;
    checks.push(
        ctx.refusal(
            NAME,
            "a message held back for 10 minutes, then injected",
            "stale",
            Some(&victim.id),
            before,
            out.refused() && !ctx.stored_counters(&victim.id).contains(&50),
            out.to_string(),
        )
        .await,
    );

    // 5. A valid reading envelope re-published on the events topic.
    let before = ctx.last_event_id();
    let env = Ctx::genuine(&victim, 60, 60.0)?;
    let events_topic = format!("meters/{}/events", victim.id);
    let out = Ctx::publish(&mut client, &events_topic, env, 104).await;
    checks.push(
        ctx.refusal(
            NAME,
            "a valid envelope re-published on another topic (readings → events)",
            "bad_signature",
            Some(&victim.id),
            before,
            out.refused() && !ctx.stored_counters(&victim.id).contains(&60),
            out.to_string(),
        )
        .await,
    );
    let _ = client.disconnect().await;
    Ok(checks)
}

/// Sends a genuine signed request to the sink once, then the same bytes again.
async fn sink_case(ctx: &Ctx) -> Result<Check, AttackError> {
    const CASE: &str = "a downstream request replayed to the sink";
    let Some(sink) = ctx.target.sink.clone() else {
        return Ok(Check::new(NAME, CASE, "401 nonce_replayed")
            .observed("no sink configured for this target: not run (give --sink)")
            .pass(false));
    };
    let creds = Creds::in_pki(&ctx.target.pki_dir, "clients", &sink.client);
    let pem = std::fs::read_to_string(&creds.key)
        .map_err(|e| AttackError::Setup(format!("{}: {e}", creds.key.display())))?;
    let key = HttpSigningKey::from_pkcs8_pem(&pem, sink.client.as_str())
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let url = format!("https://127.0.0.1:{}/readings", sink.addr.port());
    let item = OutboxItem {
        id: 1,
        target: TargetId(1),
        message_id: 1,
        meter_id: MeterId::new("x-sink-replay")?,
        counter: u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(1),
        taken_at: OffsetDateTime::now_utc(),
        energy_kwh: 1.5,
        queued_at: OffsetDateTime::now_utc(),
        attempts: 0,
        envelope: Vec::new(),
    };
    let mut nonce = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
    let request = signed_request(
        &url,
        &key,
        &item,
        false,
        OffsetDateTime::now_utc(),
        Duration::from_secs(60),
        hex::encode(nonce),
    )
    .map_err(|e| AttackError::Setup(e.to_string()))?;
    let config = ctx.client_config(&creds)?;
    let refused_before = sink.stats.as_ref().map(|s| s().refused("nonce_replayed"));
    let first = https::post(ctx, config.clone(), &url, &request).await;
    let second = https::post(ctx, config, &url, &request).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused_after = sink.stats.as_ref().map(|s| s().refused("nonce_replayed"));
    let counted = match (refused_before, refused_after) {
        (Some(b), Some(a)) => a == b + 1,
        // An external sink: its log line is the trace; the answer's code is what we can see.
        _ => true,
    };
    let replay_refused = matches!(&second, Ok((401, body)) if body.contains("nonce_replayed"));
    Ok(Check::new(
        NAME,
        CASE,
        "first 201, again 401 nonce_replayed, counted by the sink",
    )
    .observed(format!(
        "first {}, again {}{}",
        describe(&first),
        describe(&second),
        if counted {
            "; the sink counted it"
        } else {
            "; the sink did not count it"
        }
    ))
    .pass(matches!(first, Ok((201, _))) && replay_refused && counted))
}

fn describe(r: &Result<(u16, String), String>) -> String {
    match r {
        Ok((status, body)) => format!("{status} {}", body.trim()),
        Err(e) => format!("failed: {e}"),
    }
}

/// A minimal HTTPS client for the sink cases: one request per connection, from a fresh source.
pub mod https {
    use std::sync::Arc;

    use bytes::Bytes;
    use gridward_hes::forward::body::SignedRequest;
    use http_body_util::{BodyExt, Full};
    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;
    use tokio_rustls::TlsConnector;

    use crate::ctx::Ctx;

    /// POSTs `request` to `url` over TLS with `config`; returns the status and the body.
    pub async fn post(
        ctx: &Ctx,
        config: Arc<ClientConfig>,
        url: &str,
        request: &SignedRequest,
    ) -> Result<(u16, String), String> {
        let Some(sink) = ctx.target.sink.as_ref() else {
            return Err("no sink".to_owned());
        };
        let tcp = ctx
            .tcp_from(ctx.fresh_source(), sink.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(conn);
        let mut builder =
            hyper::Request::post(url).header("host", format!("127.0.0.1:{}", sink.addr.port()));
        for (name, value) in &request.headers {
            builder = builder.header(*name, value.as_str());
        }
        let req = builder
            .body(Full::new(Bytes::from(request.body.clone())))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok((status, body))
    }
}
