//! The JSON form of a command's arguments, stored beside the signed bytes for operators
//! ([`gridward_store::NewCommand::args_json`]) and in proposals, from which an approved
//! proposal's commands are rebuilt.
//!
//! | kind | JSON |
//! |---|---|
//! | `disconnect`, `reconnect`, `read_now` | `{}` |
//! | `set_reporting_interval` | `{"seconds":900}` |
//! | `set_tariff` | `{"tariff":"night"}` |
//! | `firmware_update` | `{"firmware_id":3,"firmware_digest":"<64 hex>","version":"1.2.0","sequence":5}` |
//!
//! A firmware update names the stored firmware by digest; the manifest itself (up to 4 KiB) is
//! in the signed command and in the firmware table, not repeated here.

use gridward_core::command::{CommandBody, CommandKind};
use gridward_store::StoredFirmware;
use serde_json::{Value, json};

/// Why stored arguments cannot be turned back into a command body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgsError {
    /// The text is not a JSON object with the fields the kind needs.
    #[error("arguments of {kind} are malformed: {detail}")]
    Malformed {
        /// The command kind.
        kind: CommandKind,
        /// What is wrong.
        detail: String,
    },
    /// A firmware update names an image that is not stored (any more).
    #[error("firmware with digest {0} is not stored; upload it first")]
    FirmwareNotStored(String),
}

/// The JSON arguments of `body`; `firmware` is the stored firmware a `FirmwareUpdate` installs
/// (ignored for other kinds).
pub fn args_json(body: &CommandBody, firmware: Option<&StoredFirmware>) -> String {
    let v = match body {
        CommandBody::Disconnect | CommandBody::Reconnect | CommandBody::ReadNow => json!({}),
        CommandBody::SetReportingInterval { seconds } => json!({ "seconds": seconds }),
        CommandBody::SetTariff { tariff } => json!({ "tariff": tariff }),
        CommandBody::FirmwareUpdate { .. } => match firmware {
            Some(f) => json!({
                "firmware_id": f.id,
                "firmware_digest": hex::encode(f.digest),
                "version": f.version,
                "sequence": f.sequence,
            }),
            None => json!({}),
        },
    };
    v.to_string()
}

/// The firmware digest named by the arguments of a `firmware_update`, if any.
pub fn firmware_digest(args_json: &str) -> Option<[u8; 32]> {
    let v: Value = serde_json::from_str(args_json).ok()?;
    let hex_digest = v.get("firmware_digest")?.as_str()?;
    let bytes = hex::decode(hex_digest).ok()?;
    bytes.try_into().ok()
}

/// Rebuilds the body of `kind` from its JSON arguments; `manifest_of` finds the stored manifest
/// of a firmware digest.
///
/// # Errors
///
/// [`ArgsError::Malformed`] if a field is missing or of the wrong type,
/// [`ArgsError::FirmwareNotStored`] if `manifest_of` knows no such image.
pub fn body_from_args(
    kind: CommandKind,
    args_json: &str,
    manifest_of: impl FnOnce(&[u8; 32]) -> Option<Vec<u8>>,
) -> Result<CommandBody, ArgsError> {
    let malformed = |detail: &str| ArgsError::Malformed {
        kind,
        detail: detail.to_owned(),
    };
    let v: Value = serde_json::from_str(args_json).map_err(|e| malformed(&e.to_string()))?;
    if !v.is_object() {
        return Err(malformed("not a JSON object"));
    }
    Ok(match kind {
        CommandKind::Disconnect => CommandBody::Disconnect,
        CommandKind::Reconnect => CommandBody::Reconnect,
        CommandKind::ReadNow => CommandBody::ReadNow,
        CommandKind::SetReportingInterval => {
            let seconds = v
                .get("seconds")
                .and_then(Value::as_u64)
                .and_then(|s| u32::try_from(s).ok())
                .ok_or_else(|| malformed("`seconds` must be a 32-bit unsigned integer"))?;
            CommandBody::SetReportingInterval { seconds }
        }
        CommandKind::SetTariff => {
            let tariff = v
                .get("tariff")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("`tariff` must be a string"))?;
            CommandBody::SetTariff {
                tariff: tariff.to_owned(),
            }
        }
        CommandKind::FirmwareUpdate => {
            let digest = firmware_digest(args_json)
                .ok_or_else(|| malformed("`firmware_digest` must be 64 hex digits"))?;
            let manifest = manifest_of(&digest)
                .ok_or_else(|| ArgsError::FirmwareNotStored(hex::encode(digest)))?;
            CommandBody::FirmwareUpdate { manifest }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn firmware() -> StoredFirmware {
        StoredFirmware {
            id: 3,
            digest: [7; 32],
            manifest: b"manifest".to_vec(),
            vendor_id: "acme".into(),
            class_id: "m1".into(),
            version: "1.2.0".into(),
            sequence: 5,
            uploaded_by: "alice".into(),
            uploaded_at: datetime!(2025-01-01 0:00 UTC),
            size: 10,
        }
    }

    #[test]
    fn round_trips_every_kind() {
        let fw = firmware();
        for body in [
            CommandBody::Disconnect,
            CommandBody::Reconnect,
            CommandBody::ReadNow,
            CommandBody::SetReportingInterval { seconds: 900 },
            CommandBody::SetTariff {
                tariff: "night".into(),
            },
            CommandBody::FirmwareUpdate {
                manifest: b"manifest".to_vec(),
            },
        ] {
            let kind = match &body {
                CommandBody::Disconnect => CommandKind::Disconnect,
                CommandBody::Reconnect => CommandKind::Reconnect,
                CommandBody::ReadNow => CommandKind::ReadNow,
                CommandBody::SetReportingInterval { .. } => CommandKind::SetReportingInterval,
                CommandBody::SetTariff { .. } => CommandKind::SetTariff,
                CommandBody::FirmwareUpdate { .. } => CommandKind::FirmwareUpdate,
            };
            let json = args_json(&body, Some(&fw));
            let back = body_from_args(kind, &json, |d| {
                (*d == fw.digest).then(|| fw.manifest.clone())
            });
            assert_eq!(back, Ok(body), "{json}");
        }
    }

    #[test]
    fn refuses_malformed_arguments() {
        assert!(matches!(
            body_from_args(
                CommandKind::SetReportingInterval,
                r#"{"seconds":"x"}"#,
                |_| None
            ),
            Err(ArgsError::Malformed { .. })
        ));
        assert!(matches!(
            body_from_args(
                CommandKind::SetReportingInterval,
                r#"{"seconds":5000000000}"#,
                |_| None
            ),
            Err(ArgsError::Malformed { .. })
        ));
        assert!(matches!(
            body_from_args(CommandKind::SetTariff, "[]", |_| None),
            Err(ArgsError::Malformed { .. })
        ));
        assert!(matches!(
            body_from_args(CommandKind::Disconnect, "not json", |_| None),
            Err(ArgsError::Malformed { .. })
        ));
        assert!(matches!(
            body_from_args(
                CommandKind::FirmwareUpdate,
                r#"{"firmware_digest":"00"}"#,
                |_| None
            ),
            Err(ArgsError::Malformed { .. })
        ));
        let json = args_json(
            &CommandBody::FirmwareUpdate { manifest: vec![] },
            Some(&firmware()),
        );
        assert_eq!(
            body_from_args(CommandKind::FirmwareUpdate, &json, |_| None),
            Err(ArgsError::FirmwareNotStored(hex::encode([7u8; 32])))
        );
    }
}
