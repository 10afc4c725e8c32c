//! Second factors: RFC 6238 TOTP codes and single-use recovery codes.
//!
//! TOTP: HMAC-SHA-1, 6 digits, 30-second steps, a 160-bit secret; a code is accepted for the
//! current step and one step either side ([`SKEW_STEPS`]), and each step only once: the caller
//! keeps the last accepted step per user and [`check_code`] refuses any step not after it as a
//! replay (RFC 6238 §5.2).
//!
//! Recovery codes: [`RECOVERY_CODES`] per enrolment, each 96 random bits shown once as
//! `xxxxxx-xxxxxx-xxxxxx-xxxxxx` (lower-case hex) and stored as SHA-256 (a fast hash is
//! enough for values with 96 bits of entropy; a guess is one of 2^96).

use std::fmt;

use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Builder, Secret as TotpSecret, Totp};

/// The issuer shown by authenticator apps.
pub const ISSUER: &str = "Gridward";

/// Seconds per TOTP step.
pub const STEP_SECS: u64 = 30;

/// Steps accepted either side of the current one.
pub const SKEW_STEPS: u64 = 1;

/// Digits per TOTP code.
pub const DIGITS: usize = 6;

/// Recovery codes per enrolment.
pub const RECOVERY_CODES: usize = 10;

/// Bytes of a TOTP secret (160 bits, RFC 4226's recommendation).
pub const SECRET_LEN: usize = 20;

/// Random bytes per recovery code (96 bits).
const RECOVERY_CODE_BYTES: usize = 12;

/// Why a second factor could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TotpError {
    /// totp-rs refused the secret or the account name, or could not build the URI.
    #[error("totp: {0}")]
    Totp(String),
    /// The QR code could not be rendered (data too long).
    #[error("qr code: {0}")]
    Qr(String),
    /// The random number generator failed.
    #[error("random number generator failed: {0}")]
    Rng(String),
}

/// What a user needs to set up their authenticator, shown once. `Debug` redacts everything but
/// the number of recovery codes.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpEnrolment {
    /// The `otpauth://totp/Gridward:NAME?secret=...&issuer=Gridward` URI.
    pub uri: String,
    /// [`TotpEnrolment::uri`] as a QR code for a terminal (Unicode half blocks, light modules on
    /// a dark background).
    pub qr: String,
    /// The secret in base32, for typing into an app by hand.
    pub secret_base32: String,
    /// [`RECOVERY_CODES`] single-use codes, each usable once instead of a TOTP code.
    pub recovery_codes: Vec<String>,
}

impl fmt::Debug for TotpEnrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpEnrolment")
            .field("uri", &"[redacted]")
            .field("qr", &"[redacted]")
            .field("secret_base32", &"[redacted]")
            .field(
                "recovery_codes",
                &format_args!("[{} redacted]", self.recovery_codes.len()),
            )
            .finish()
    }
}

/// The outcome of [`check_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    /// The code is right for this step, which is later than the last accepted one.
    Accepted {
        /// The step to remember as the last accepted one.
        step: u64,
    },
    /// The code is right, but for a step already accepted (or earlier): a replay.
    Replayed,
    /// The code is wrong (or not 6 digits).
    Wrong,
}

/// A fresh random TOTP secret.
///
/// # Errors
///
/// [`TotpError::Rng`].
pub fn new_secret(rng: &mut (impl RngCore + CryptoRng)) -> Result<Vec<u8>, TotpError> {
    let mut secret = vec![0u8; SECRET_LEN];
    rng.try_fill_bytes(&mut secret)
        .map_err(|e| TotpError::Rng(e.to_string()))?;
    Ok(secret)
}

fn totp(secret: &[u8], account: &str) -> Result<Totp, TotpError> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(STEP_SECS)
        .with_secret(secret.to_vec())
        .with_account_name(account)
        .with_issuer(Some(ISSUER))
        .build()
        .map_err(|e| TotpError::Totp(e.to_string()))
}

/// The enrolment of `username` with `secret` and the (plain) `recovery_codes`.
///
/// # Errors
///
/// [`TotpError::Totp`], [`TotpError::Qr`].
pub fn enrolment(
    secret: &[u8],
    username: &str,
    recovery_codes: Vec<String>,
) -> Result<TotpEnrolment, TotpError> {
    let t = totp(secret, username)?;
    let uri = t.to_url().map_err(|e| TotpError::Totp(e.to_string()))?;
    let qr = render_qr(&uri)?;
    Ok(TotpEnrolment {
        qr,
        secret_base32: TotpSecret::from(secret.to_vec()).to_base32(),
        uri,
        recovery_codes,
    })
}

/// Renders `data` as a QR code for a terminal (Unicode `Dense1x2`, with a quiet zone).
///
/// # Errors
///
/// [`TotpError::Qr`].
pub fn render_qr(data: &str) -> Result<String, TotpError> {
    let code = QrCode::new(data.as_bytes()).map_err(|e| TotpError::Qr(e.to_string()))?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Whether `code` looks like a TOTP code (6 ASCII digits, spaces ignored) rather than a
/// recovery code.
pub fn looks_like_totp(code: &str) -> bool {
    let digits: Vec<char> = code.chars().filter(|c| *c != ' ').collect();
    digits.len() == DIGITS && digits.iter().all(char::is_ascii_digit)
}

/// Checks `code` against `secret` at `now_unix` (seconds since the epoch), with
/// [`SKEW_STEPS`] either side, refusing steps not after `last_step`.
///
/// Every step of the window is computed (no early exit) and compared in constant time.
pub fn check_code(secret: &[u8], code: &str, now_unix: u64, last_step: Option<u64>) -> CodeCheck {
    let code: String = code.chars().filter(|c| *c != ' ').collect();
    if !looks_like_totp(&code) {
        return CodeCheck::Wrong;
    }
    // The account name does not enter the code.
    let Ok(t) = totp(secret, "x") else {
        return CodeCheck::Wrong;
    };
    let origin = now_unix / STEP_SECS;
    let mut accepted = None;
    let mut replayed = false;
    for step in origin.saturating_sub(SKEW_STEPS)..=origin.saturating_add(SKEW_STEPS) {
        let expected = t.generate(step.saturating_mul(STEP_SECS)).to_string();
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) {
            if last_step.is_none_or(|last| step > last) {
                accepted = Some(step);
            } else {
                replayed = true;
            }
        }
    }
    match (accepted, replayed) {
        (Some(step), _) => CodeCheck::Accepted { step },
        (None, true) => CodeCheck::Replayed,
        (None, false) => CodeCheck::Wrong,
    }
}

/// [`RECOVERY_CODES`] fresh recovery codes, as shown to the user.
///
/// # Errors
///
/// [`TotpError::Rng`].
pub fn new_recovery_codes(rng: &mut (impl RngCore + CryptoRng)) -> Result<Vec<String>, TotpError> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut bytes = [0u8; RECOVERY_CODE_BYTES];
            rng.try_fill_bytes(&mut bytes)
                .map_err(|e| TotpError::Rng(e.to_string()))?;
            let hex = hex::encode(bytes);
            Ok(hex
                .as_bytes()
                .chunks(6)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("-"))
        })
        .collect()
}

/// The stored form of a recovery code: SHA-256 (hex) of its normalised form (lower case, without
/// `-` and spaces), or `None` if `code` cannot be a recovery code.
pub fn recovery_code_hash(code: &str) -> Option<String> {
    let normal: String = code
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if normal.len() != RECOVERY_CODE_BYTES * 2 || !normal.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(hex::encode(Sha256::digest(normal.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn code_at(secret: &[u8], unix: u64) -> String {
        Builder::new()
            .with_secret(secret.to_vec())
            .build()
            .unwrap()
            .generate(unix)
            .to_string()
    }

    #[test]
    fn rfc6238_test_vector() {
        // RFC 6238 appendix B, SHA-1, T = 59 s: 94287082 (8 digits); 6 digits: 287082.
        let secret = b"12345678901234567890";
        assert_eq!(code_at(secret, 59), "287082");
        assert_eq!(
            check_code(secret, "287082", 59, None),
            CodeCheck::Accepted { step: 1 }
        );
    }

    #[test]
    fn skew_of_one_step_either_side() {
        let secret = new_secret(&mut OsRng).unwrap();
        let now = 1_700_000_000 - 1_700_000_000 % 30 + 10;
        let step = now / 30;
        for (t, ok) in [
            (now - 60, false),
            (now - 30, true),
            (now, true),
            (now + 30, true),
            (now + 60, false),
        ] {
            let got = check_code(&secret, &code_at(&secret, t), now, None);
            if ok {
                assert_eq!(got, CodeCheck::Accepted { step: t / 30 }, "{t}");
            } else {
                assert_eq!(got, CodeCheck::Wrong, "{t}");
            }
        }
        assert_eq!(
            check_code(&secret, &code_at(&secret, now), now, Some(step)),
            CodeCheck::Replayed
        );
        assert_eq!(
            check_code(&secret, &code_at(&secret, now - 30), now, Some(step - 1)),
            CodeCheck::Replayed
        );
        assert_eq!(check_code(&secret, "12345", now, None), CodeCheck::Wrong);
        assert_eq!(check_code(&secret, "+12345", now, None), CodeCheck::Wrong);
    }

    #[test]
    fn enrolment_uri_and_qr() {
        let secret = new_secret(&mut OsRng).unwrap();
        let codes = new_recovery_codes(&mut OsRng).unwrap();
        let e = enrolment(&secret, "alice", codes).unwrap();
        assert!(
            e.uri.starts_with("otpauth://totp/Gridward:alice?secret="),
            "{}",
            e.uri
        );
        assert!(e.uri.contains("issuer=Gridward"), "{}", e.uri);
        assert!(e.uri.contains(&e.secret_base32));
        assert!(e.qr.contains('\u{2588}') || e.qr.contains('\u{2580}'));
        assert!(e.qr.lines().count() > 10);
        let dbg = format!("{e:?}");
        assert!(
            !dbg.contains(&e.secret_base32) && !dbg.contains(&e.recovery_codes[0]),
            "{dbg}"
        );
    }

    #[test]
    fn recovery_codes_are_distinct_and_96_bits() {
        let codes = new_recovery_codes(&mut OsRng).unwrap();
        assert_eq!(codes.len(), RECOVERY_CODES);
        let mut set = std::collections::HashSet::new();
        for c in &codes {
            assert_eq!(c.len(), 27, "{c}");
            assert!(recovery_code_hash(c).is_some());
            assert_eq!(
                recovery_code_hash(c),
                recovery_code_hash(&c.to_uppercase().replace('-', " "))
            );
            assert!(!looks_like_totp(c));
            set.insert(c.clone());
        }
        assert_eq!(set.len(), RECOVERY_CODES);
        assert_eq!(recovery_code_hash("123456"), None);
        assert!(looks_like_totp("123 456"));
    }
}
