//! Spoofing: meter A (`x-spoof-a`, a valid certificate of the head-end's PKI) posing as meter B
//! (`x-spoof-b`, also genuine, never connected). Each case also demands that nothing was stored
//! for B, and says what the attacker saw.
//!
//! 1. A's certificate with ClientID B: CONNACK 0x87, `client_id_mismatch` (about A).
//! 2. A, connected as A, publishes a reading for B (signed by A's key over B's topic) to B's
//!    topic: PUBACK 0x87, then DISCONNECT 0x87; `topic_not_authorized`.
//! 3. A, on its own topic, sends an envelope whose protected header claims B, signed by A's key:
//!    `key_mismatch` (the envelope's meter id is not the certificate's:
//!    `EnvelopeError::MeterMismatch`, recorded as `key_mismatch`), PUBACK 0x87.
//! 4. A's own envelope (header A, signed by A) carrying a document whose MeterID is B:
//!    `invalid_document` (`EnvelopeError::DocumentMeterMismatch`), PUBACK 0x99.
//! 5. A self-signed certificate carrying B's identity (URI SAN and CN, EKU clientAuth), made with
//!    rcgen: the handshake is refused, `certificate_untrusted`.
//! 6. A certificate for B issued by a rogue CA (same names as the head-end's CA, other keys):
//!    `certificate_untrusted`.

use gridward_core::MeterId;
use gridward_mqtt::client::{ClientError, Protocol};
use gridward_pki::{Identity, IssueOptions, Pki, identity_of};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use super::revocation::{await_close, connect_error, from_source, handshake_refusal, next_counter};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx};

/// The scenario's name.
pub const NAME: &str = "spoofing";

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let (a, b) = match (ctx.attack_meter("spoof-a"), ctx.attack_meter("spoof-b")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return vec![Check::broken(NAME, "meters A and B", e)],
    };
    let b_stored = ctx.stored_counters(&b.id).len();
    let mut checks = Vec::new();
    let cases: [(&str, Case); 6] = [
        (
            "meter A's valid certificate with ClientID B",
            Case::ClientId,
        ),
        ("A publishes a reading for B to B's topic", Case::OtherTopic),
        (
            "A's key signs an envelope claiming B (A's topic)",
            Case::ClaimInHeader,
        ),
        (
            "A's envelope carries a document for B (A's topic)",
            Case::ClaimInDocument,
        ),
        (
            "a self-signed certificate with B's identity",
            Case::SelfSigned,
        ),
        ("a rogue CA's certificate with B's identity", Case::RogueCa),
    ];
    for (n, (name, case)) in cases.into_iter().enumerate() {
        // Distinctive registers: nothing stored for B may carry one.
        let kwh = 9100.25 + n as f64;
        let check = match run_case(ctx, case, name, &a, &b, kwh).await {
            Ok(c) => c,
            Err(e) => Check::broken(NAME, name, e),
        };
        checks.push(nothing_for_b(ctx, check, &b.id, b_stored, kwh));
    }
    checks
}

#[derive(Debug, Clone, Copy)]
enum Case {
    ClientId,
    OtherTopic,
    ClaimInHeader,
    ClaimInDocument,
    SelfSigned,
    RogueCa,
}

async fn run_case(
    ctx: &Ctx,
    case: Case,
    name: &str,
    a: &Creds,
    b: &Creds,
    kwh: f64,
) -> Result<Check, AttackError> {
    let a_topic = format!("meters/{}/readings", a.id);
    let b_topic = format!("meters/{}/readings", b.id);
    let a_key = a.signing_key()?;
    let b_doc = Ctx::reading_xml(&b.id, kwh)?;
    Ok(match case {
        Case::ClientId => {
            let source = ctx.fresh_source();
            let before = ctx.last_event_id();
            let config = ctx.client_config(a)?;
            let (refused, observed) = match ctx.mqtt_from(source, config, &b.id, Protocol::V5).await
            {
                Ok((mut client, ack)) => {
                    let _ = client.disconnect().await;
                    (false, format!("connected as B: CONNACK {:#04x}", ack.code))
                }
                Err(ClientError::Refused(ack)) => {
                    (true, format!("CONNACK {:#04x} (not authorized)", ack.code))
                }
                Err(e) => (true, connect_error(&e)),
            };
            let check = ctx
                .refusal(
                    NAME,
                    name,
                    "client_id_mismatch",
                    Some(&a.id),
                    before,
                    refused,
                    observed,
                )
                .await;
            from_source(ctx, check, before, source)
        }
        Case::OtherTopic => {
            let env = Ctx::sign(&a_key, &b.id, next_counter(ctx, &b.id), &b_topic, &b_doc)?;
            let mut client = ctx.connect_meter(a).await?;
            let before = ctx.last_event_id();
            let out = Ctx::publish(&mut client, &b_topic, env, 1).await;
            let (closed, after) = await_close(&mut client, std::time::Duration::from_secs(5)).await;
            ctx.refusal(
                NAME,
                name,
                "topic_not_authorized",
                Some(&a.id),
                before,
                out.refused() && closed,
                format!("{out}, then {after}"),
            )
            .await
        }
        Case::ClaimInHeader | Case::ClaimInDocument => {
            let (claimed, reason) = match case {
                Case::ClaimInHeader => (&b.id, "key_mismatch"),
                _ => (&a.id, "invalid_document"),
            };
            let env = Ctx::sign(
                &a_key,
                claimed,
                next_counter(ctx, claimed),
                &a_topic,
                &b_doc,
            )?;
            let mut client = ctx.connect_meter(a).await?;
            let before = ctx.last_event_id();
            let out = Ctx::publish(&mut client, &a_topic, env, 1).await;
            let _ = client.disconnect().await;
            let stored_for_a = ctx.stored_kwh(&a.id).contains(&kwh);
            ctx.refusal(
                NAME,
                name,
                reason,
                Some(&a.id),
                before,
                out.refused() && !stored_for_a,
                format!("{out}{}", if stored_for_a { "; stored for A" } else { "" }),
            )
            .await
        }
        Case::SelfSigned => {
            let creds = self_signed(ctx, &b.id)?;
            let config = ctx.client_config(&creds)?;
            handshake_refusal(ctx, NAME, name, "certificate_untrusted", config, &b.id).await
        }
        Case::RogueCa => {
            let dir = ctx.rogue_pki()?;
            let mut opts = IssueOptions::new("gridward-attack");
            opts.replace = true;
            Pki::open(&dir, None)?.issue_meter(
                &MeterId::new(&b.id)?,
                &opts,
                OffsetDateTime::now_utc(),
            )?;
            let creds = Creds::in_pki(&dir, "meters", &b.id);
            let config = ctx.client_config(&creds)?;
            handshake_refusal(ctx, NAME, name, "certificate_untrusted", config, &b.id).await
        }
    })
}

/// Fails `check` if anything new was stored for B, or a reading with register `kwh`.
fn nothing_for_b(ctx: &Ctx, mut check: Check, b: &str, stored_before: usize, kwh: f64) -> Check {
    let now = ctx.stored_counters(b).len();
    let forged = ctx.stored_kwh(b).contains(&kwh);
    if now != stored_before || forged {
        check.pass = false;
        check.observed.push_str(&format!(
            "; STORED for B: {} reading(s)",
            now.saturating_sub(stored_before)
        ));
    } else {
        check.observed.push_str("; nothing stored for B");
    }
    check
}

/// A self-signed leaf certificate with `id`'s meter identity (URI SAN, CN, EKU clientAuth, as
/// the head-end's CA would issue it), written to the work directory; its identity is checked
/// with the head-end's own `identity_of` first, so that only trust can refuse it.
fn self_signed(ctx: &Ctx, id: &str) -> Result<Creds, AttackError> {
    let (cert, key, der) = self_signed_pem(id)?;
    match identity_of(&der) {
        Ok(Identity::Meter(m)) if m.as_str() == id => {}
        other => {
            return Err(AttackError::Setup(format!(
                "the self-signed certificate does not carry {id}'s identity: {other:?}"
            )));
        }
    }
    let dir = ctx
        .work()
        .join("spoofing")
        .join(format!("self-signed-{id}"));
    let creds = Creds {
        id: id.to_owned(),
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&creds.chain, cert))
        .and_then(|()| std::fs::write(&creds.key, key))
        .map_err(|e| AttackError::Setup(format!("{}: {e}", dir.display())))?;
    Ok(creds)
}

/// The certificate (PEM), key (PKCS#8 PEM) and certificate (DER) of [`self_signed`].
fn self_signed_pem(id: &str) -> Result<(String, String, Vec<u8>), AttackError> {
    let setup = |e: rcgen::Error| AttackError::Setup(format!("self-signed {id}: {e}"));
    let key = KeyPair::generate().map_err(setup)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(setup)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    params.distinguished_name = dn;
    let uri = MeterId::new(id)?.to_uri();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(setup)?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params.self_signed(&key).map_err(setup)?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_self_signed_certificate_carries_the_victims_identity() {
        let (pem, key, der) = self_signed_pem("x-spoof-b").unwrap();
        assert_eq!(
            identity_of(&der).unwrap(),
            Identity::Meter(MeterId::new("x-spoof-b").unwrap())
        );
        assert!(pem.contains("BEGIN CERTIFICATE") && key.contains("BEGIN PRIVATE KEY"));
    }
}
