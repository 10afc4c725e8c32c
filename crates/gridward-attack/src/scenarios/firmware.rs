//! Firmware: modified, foreign, older and incomplete images reaching a meter, and a manifest
//! signed by the head-end's key instead of the manufacturer's.
//!
//! The harness holds a manufacturer key pair the target trusts (`Target::manufacturer_key`,
//! in the head-end's `[firmware] manufacturers`; an in-process target makes one), and its
//! victim meter (`x-fw-a`, [`Victims`]) trusts that manufacturer. Images reach the meter as a
//! compromised path would deliver them: a `firmware_update` command (signed with the head-end's
//! key, which the harness holds as an insider with the PKI directory, so the command itself
//! passes and the case tests the firmware rule alone) and then the image in chunks
//! ([`Victims::inject_chunk`]). The meter refuses with a firmware code in its signed
//! acknowledgement, which the head-end records as `command_refused` naming the command and the
//! code; each case demands that event and that the running firmware did not change.
//!
//! 1. Genuine: a manufacturer-signed update (sequence 2) is installed and confirmed (so the
//!    refusals below are for their fault alone); the head-end flags its acknowledgement, since
//!    it did not send that command: `command_refused` ("did not send").
//! 2. The image with one byte changed (manifest genuine): `firmware_digest_mismatch`.
//! 3. The manifest signed by the head-end's command key: `firmware_bad_signature`.
//! 4. ... the same manifest uploaded to the API: 422, `firmware_refused`.
//! 5. Genuine: the manufacturer-signed manifest of case 2 uploaded to the API: accepted.
//! 6. An older sequence number (1, below the installed 2): `firmware_rollback`.
//! 7. Another class id: `firmware_wrong_class`.
//! 8. A truncated image (the last 100 bytes never arrive): `firmware_incomplete` when the
//!    transfer's deadline passes.

use std::time::Duration;

use base64::Engine as _;
use gridward_core::command::{CommandBody, CommandId};
use gridward_core::envelope::SigningKey;
use gridward_core::firmware::{self, MANIFEST_VERSION, Manifest};
use gridward_meter::command::{DEFAULT_CLASS_ID, DEFAULT_VENDOR_ID, DeviceState};
use sha2::{Digest as _, Sha256};

use super::access::describe;
use super::commands::{
    ACK_WAIT, Judged, Operator, ack_event, command_for, commands_topic, headend_key, now_s, signed,
    verdict,
};
use super::revocation::event_ip;
use crate::AttackError;
use crate::check::Check;
use crate::ctx::Ctx;
use crate::fleet::{VICTIM_FIRMWARE_TIMEOUT, Victims};

/// The scenario's name.
pub const NAME: &str = "firmware";

/// Size of the test images (two chunks).
const IMAGE_LEN: usize = 20_000;

const CASE_GENUINE: &str = "genuine: a manufacturer-signed update, injected";
const CASE_TAMPERED: &str = "the image with one byte changed (manifest genuine)";
const CASE_HEADEND_SIGNED: &str = "a manifest signed by the head-end's command key";
const CASE_UPLOAD_HEADEND: &str = "that manifest uploaded to the API";
const CASE_UPLOAD_OK: &str = "genuine: a manufacturer-signed manifest uploaded";
const CASE_ROLLBACK: &str = "an older sequence number (1 after 2)";
const CASE_CLASS: &str = "a manifest for another class id";
const CASE_TRUNCATED: &str = "a truncated image (last 100 bytes missing)";

/// Every case and what it expects, for a target the scenario cannot run against.
const CASES: &[(&str, &str)] = &[
    (CASE_GENUINE, EXPECT_GENUINE),
    (
        CASE_TAMPERED,
        "meter refuses firmware_digest_mismatch, event command_refused",
    ),
    (
        CASE_HEADEND_SIGNED,
        "meter refuses firmware_bad_signature, event command_refused",
    ),
    (CASE_UPLOAD_HEADEND, EXPECT_UPLOAD_REFUSED),
    (CASE_UPLOAD_OK, EXPECT_UPLOAD_OK),
    (
        CASE_ROLLBACK,
        "meter refuses firmware_rollback, event command_refused",
    ),
    (
        CASE_CLASS,
        "meter refuses firmware_wrong_class, event command_refused",
    ),
    (
        CASE_TRUNCATED,
        "meter refuses firmware_incomplete, event command_refused",
    ),
];
const EXPECT_GENUINE: &str =
    "installed and confirmed, and flagged: event command_refused (not sent)";
const EXPECT_UPLOAD_OK: &str = "2xx, nothing refused";
const EXPECT_UPLOAD_REFUSED: &str = "422, event firmware_refused";

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let Some(key) = ctx.target.manufacturer_key.clone() else {
        let why = "the harness holds no manufacturer key the target trusts (give \
                   --manufacturer-key): not run";
        return CASES
            .iter()
            .map(|(case, expected)| Check::new(NAME, *case, *expected).observed(why))
            .collect();
    };
    match cases(ctx, &key).await {
        Ok(c) => c,
        Err(e) => vec![Check::broken(NAME, "firmware to a victim meter", e)],
    }
}

/// A test image: `IMAGE_LEN` bytes depending on `seed`.
fn image(seed: u8) -> Vec<u8> {
    (0..IMAGE_LEN).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// A manifest of the victims' vendor and class for `image`.
fn manifest(sequence: u64, version: &str, image: &[u8]) -> Manifest {
    Manifest {
        manifest_version: MANIFEST_VERSION,
        sequence,
        vendor_id: DEFAULT_VENDOR_ID.to_owned(),
        class_id: DEFAULT_CLASS_ID.to_owned(),
        version: version.to_owned(),
        digest: Sha256::digest(image).into(),
        size: image.len() as u64,
        expires_at: None,
        rollback_from: None,
    }
}

fn sign_manifest(key: &SigningKey, m: &Manifest) -> Result<Vec<u8>, AttackError> {
    firmware::sign_manifest(key, m).map_err(|e| AttackError::Setup(format!("a manifest: {e}")))
}

/// The running firmware, which no refused update may change.
fn running(s: &DeviceState) -> String {
    format!(
        "firmware {} (sequence {}, slot {})",
        s.firmware.version, s.firmware.sequence, s.active_slot
    )
}

/// What a delivery consists of: the update command and the image's chunks (none: the manifest
/// alone decides).
struct Delivery {
    id: CommandId,
    command: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

/// Signs the update command for `manifest` (the head-end's key, `counter`) with the chunks of
/// `image` named by `digest`.
fn delivery(
    headend: &SigningKey,
    meter: &str,
    counter: u64,
    manifest: Vec<u8>,
    image: Option<(&[u8; 32], &[u8])>,
) -> Result<Delivery, AttackError> {
    let cmd = command_for(
        meter,
        CommandBody::FirmwareUpdate { manifest },
        counter,
        now_s(),
        5,
    )?;
    Ok(Delivery {
        id: cmd.id,
        command: signed(headend, &cmd)?,
        chunks: image
            .map(|(digest, data)| {
                firmware::chunks(*digest, data)
                    .iter()
                    .map(firmware::Chunk::encode)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Injects `d` into `meter`; `false` if the meter did not take a part.
fn inject(victims: &Victims, meter: &str, d: &Delivery) -> bool {
    victims.inject_command(meter, &commands_topic(meter), d.command.clone())
        && d.chunks
            .iter()
            .all(|c| victims.inject_chunk(meter, c.clone()))
}

/// Delivers `d` and demands the meter's refusal `code` with the firmware unchanged.
async fn refused(
    ctx: &Ctx,
    victims: &Victims,
    case: &str,
    meter: &str,
    d: &Delivery,
    code: &str,
) -> Check {
    let expected = format!("meter refuses {code}, event command_refused");
    let Some(before_state) = victims.state(meter) else {
        return Check::broken(NAME, case, format!("{meter} is not a running victim"));
    };
    let before = ctx.last_event_id();
    if !inject(victims, meter, d) {
        return Check::broken(NAME, case, format!("{meter} did not take the update"));
    }
    // A transfer that never completes fails at its deadline.
    let wait = ACK_WAIT + VICTIM_FIRMWARE_TIMEOUT.unsigned_abs();
    let event = ack_event(ctx, before, meter, d.id, Some(code), wait).await;
    verdict(
        ctx,
        victims,
        Check::new(NAME, case, expected),
        Judged {
            meter,
            before_state: &before_state,
            before,
            id: d.id,
            code,
            effect: running,
        },
        event,
    )
}

async fn cases(ctx: &Ctx, key_path: &std::path::Path) -> Result<Vec<Check>, AttackError> {
    let pem = std::fs::read_to_string(key_path)
        .map_err(|e| AttackError::Setup(format!("{}: {e}", key_path.display())))?;
    let maker = SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        AttackError::Setup(format!(
            "{}: not a manufacturer key: {e}",
            key_path.display()
        ))
    })?;
    let trusted = maker
        .verifying_key()
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let headend = headend_key(ctx)?;
    let victim = ctx.attack_meter("fw-a")?;
    let victims = Victims::start(
        &ctx.target,
        &ctx.work().join("firmware-victims"),
        std::slice::from_ref(&victim),
        Some(trusted),
    )
    .await?;
    let m = victim.id.as_str();
    let mut counter = victims.state(m).and_then(|s| s.last_command).unwrap_or(0);
    let mut next = || {
        counter += 1;
        counter
    };
    let mut checks = Vec::new();

    // 1. Genuine: sequence 2 installed.
    let img = image(2);
    let genuine = manifest(2, "1.2.0", &img);
    let d = delivery(
        &headend,
        m,
        next(),
        sign_manifest(&maker, &genuine)?,
        Some((&genuine.digest, &img)),
    )?;
    checks.push(installed(ctx, &victims, m, &d, 2).await);

    // 2. One byte of the image changed, the manifest genuine (sequence 3).
    let img3 = image(3);
    let m3 = manifest(3, "1.3.0", &img3);
    let signed3 = sign_manifest(&maker, &m3)?;
    let mut tampered = img3.clone();
    if let Some(b) = tampered.get_mut(IMAGE_LEN / 2) {
        *b ^= 0x01;
    }
    let d = delivery(
        &headend,
        m,
        next(),
        signed3.clone(),
        Some((&m3.digest, &tampered)),
    )?;
    checks.push(
        refused(
            ctx,
            &victims,
            CASE_TAMPERED,
            m,
            &d,
            "firmware_digest_mismatch",
        )
        .await,
    );

    // 3. The manifest signed by the head-end's command key.
    let by_headend = sign_manifest(&headend, &m3)?;
    let d = delivery(
        &headend,
        m,
        next(),
        by_headend.clone(),
        Some((&m3.digest, &img3)),
    )?;
    checks.push(
        refused(
            ctx,
            &victims,
            CASE_HEADEND_SIGNED,
            m,
            &d,
            "firmware_bad_signature",
        )
        .await,
    );

    // 4 and 5. Uploads to the API.
    checks.append(&mut uploads(ctx, &by_headend, &signed3, &img3).await);

    // 6. An older sequence.
    let img1 = image(1);
    let m1 = manifest(1, "1.1.0", &img1);
    let d = delivery(
        &headend,
        m,
        next(),
        sign_manifest(&maker, &m1)?,
        Some((&m1.digest, &img1)),
    )?;
    checks.push(refused(ctx, &victims, CASE_ROLLBACK, m, &d, "firmware_rollback").await);

    // 7. Another class.
    let mut other = m3.clone();
    other.class_id = "other-meter-9".to_owned();
    let d = delivery(
        &headend,
        m,
        next(),
        sign_manifest(&maker, &other)?,
        Some((&other.digest, &img3)),
    )?;
    checks.push(refused(ctx, &victims, CASE_CLASS, m, &d, "firmware_wrong_class").await);

    // 8. Truncated: the manifest genuine, the last 100 bytes never sent.
    let short = img3.get(..IMAGE_LEN - 100).unwrap_or_default();
    let d = delivery(&headend, m, next(), signed3, Some((&m3.digest, short)))?;
    checks.push(refused(ctx, &victims, CASE_TRUNCATED, m, &d, "firmware_incomplete").await);

    victims.stop().await;
    Ok(checks)
}

/// Case 1: the genuine update is installed (sequence `sequence`) and its acknowledgement is
/// flagged by the head-end, which did not send it.
async fn installed(
    ctx: &Ctx,
    victims: &Victims,
    meter: &str,
    d: &Delivery,
    sequence: u64,
) -> Check {
    let before = ctx.last_event_id();
    if !inject(victims, meter, d) {
        return Check::broken(
            NAME,
            CASE_GENUINE,
            format!("{meter} did not take the update"),
        );
    }
    let state = victims
        .wait_state(meter, ACK_WAIT, |s| s.firmware.sequence == sequence)
        .await;
    let ok = state
        .as_ref()
        .is_some_and(|s| s.firmware.sequence == sequence && s.transfer.is_none());
    let event = ack_event(ctx, before, meter, d.id, None, ACK_WAIT)
        .await
        .filter(|e| e.event.detail.contains("did not send"));
    Check::new(NAME, CASE_GENUINE, EXPECT_GENUINE)
        .observed(format!(
            "{}; {}",
            state
                .as_ref()
                .map_or_else(|| "no state".to_owned(), running),
            event.as_ref().map_or_else(
                || "no command_refused event for it".to_owned(),
                |e| format!("event command_refused ({})", e.event.detail)
            )
        ))
        .pass(ok && event.is_some())
        .event(event.map(|e| e.id))
}

/// Cases 4 and 5: `POST /api/v1/firmware` as an operator.
async fn uploads(ctx: &Ctx, by_headend: &[u8], genuine: &[u8], image: &[u8]) -> Vec<Check> {
    let op = match Operator::new(ctx, "fw-operator").await {
        Ok(Some(op)) => op,
        Ok(None) => {
            let why = "the target runs no HTTPS API (its [api] listen is \"off\"): not run";
            return vec![
                Check::new(NAME, CASE_UPLOAD_HEADEND, EXPECT_UPLOAD_REFUSED).observed(why),
                Check::new(NAME, CASE_UPLOAD_OK, EXPECT_UPLOAD_OK).observed(why),
            ];
        }
        Err(e) => {
            return vec![
                Check::broken(NAME, CASE_UPLOAD_HEADEND, &e),
                Check::broken(NAME, CASE_UPLOAD_OK, e),
            ];
        }
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut checks = Vec::new();
    for (case, manifest) in [(CASE_UPLOAD_HEADEND, by_headend), (CASE_UPLOAD_OK, genuine)] {
        let before = ctx.last_event_id();
        let body = serde_json::json!({ "manifest": b64(manifest), "image": b64(image) });
        let (source, answer) = op.post(ctx, "/api/v1/firmware", &body).await;
        let from_here = |e: &gridward_store::StoredSecurityEvent| {
            event_ip(e.event.source.as_deref()) == Some(source)
        };
        if case == CASE_UPLOAD_HEADEND {
            let event = ctx
                .wait_event_where(before, crate::ctx::EVENT_WAIT, |e| {
                    e.event.reason == "firmware_refused" && from_here(e)
                })
                .await;
            checks.push(
                Check::new(NAME, case, EXPECT_UPLOAD_REFUSED)
                    .observed(format!(
                        "{}; {}",
                        describe(&answer),
                        event.as_ref().map_or_else(
                            || "no firmware_refused event from this source".to_owned(),
                            |e| format!("event firmware_refused ({})", e.event.detail)
                        )
                    ))
                    .pass(matches!(answer, Ok((422, _))) && event.is_some())
                    .event(event.map(|e| e.id)),
            );
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let refusals: Vec<String> = ctx
                .events_after(before)
                .into_iter()
                .filter(|e| from_here(e))
                .map(|e| e.event.reason)
                .collect();
            let ok = matches!(answer, Ok((200..=299, _)));
            checks.push(
                Check::new(NAME, case, EXPECT_UPLOAD_OK)
                    .observed(if refusals.is_empty() {
                        describe(&answer)
                    } else {
                        format!("{}; refusals recorded: {refusals:?}", describe(&answer))
                    })
                    .pass(ok && refusals.is_empty()),
            );
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn test_images_differ_and_fill_two_chunks() {
        assert_ne!(image(1), image(2));
        let m = manifest(2, "1.2.0", &image(2));
        assert_eq!(m.size, IMAGE_LEN as u64);
        assert!(m.validate().is_ok());
        assert_eq!(firmware::chunks(m.digest, &image(2)).len(), 2);
    }

    #[test]
    fn every_case_is_listed_and_genuine_ones_expect_no_event_id() {
        for (case, expected) in CASES {
            if *expected == EXPECT_UPLOAD_OK {
                assert!(!expected.contains("event"), "{case}");
            } else {
                assert!(expected.contains("event"), "{case}: {expected}");
            }
        }
        assert_eq!(CASES.len(), 8);
    }
}
