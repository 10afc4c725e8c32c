//! [`MeterId`]: the one identifier a meter has everywhere (certificate, MQTT ClientID, topic, documents).

use std::fmt;
use std::str::FromStr;

/// Longest meter id accepted, in bytes.
pub const MAX_METER_ID_LEN: usize = 64;

/// A validated meter identifier.
///
/// 1 to [`MAX_METER_ID_LEN`] ASCII characters from `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
/// The alphabet excludes everything that has a meaning in MQTT topics (`/ + #`), in URIs, XML or shells,
/// so a meter id can be embedded in a topic, a certificate SAN (`urn:gridward:meter:{id}`) and a file name as is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MeterId(String);

/// Why a string is not a valid [`MeterId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeterIdError {
    /// The id is empty.
    #[error("meter id is empty")]
    Empty,
    /// The id is longer than [`MAX_METER_ID_LEN`] bytes.
    #[error("meter id is {0} bytes long; at most {MAX_METER_ID_LEN} are allowed")]
    TooLong(usize),
    /// The id contains a character outside `A-Z a-z 0-9 . _ -`.
    #[error("meter id contains {0:?}; only A-Z a-z 0-9 . _ - are allowed")]
    InvalidChar(char),
    /// The id starts with `.` or `-`.
    #[error("meter id must not start with '.' or '-'")]
    BadStart,
}

impl MeterId {
    /// Validates `s` as a meter id.
    pub fn new(s: &str) -> Result<Self, MeterIdError> {
        if s.is_empty() {
            return Err(MeterIdError::Empty);
        }
        if s.len() > MAX_METER_ID_LEN {
            return Err(MeterIdError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(MeterIdError::InvalidChar(c));
        }
        if s.starts_with(['.', '-']) {
            return Err(MeterIdError::BadStart);
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URI SAN that carries this identity in a meter certificate: `urn:gridward:meter:{id}`.
    pub fn to_uri(&self) -> String {
        format!("{METER_URI_PREFIX}{}", self.0)
    }

    /// The topic a meter publishes readings to: `meters/{id}/readings`.
    pub fn readings_topic(&self) -> String {
        format!("meters/{}/readings", self.0)
    }

    /// The topic a meter publishes events to: `meters/{id}/events`.
    pub fn events_topic(&self) -> String {
        format!("meters/{}/events", self.0)
    }

    /// The topic a meter receives commands on: `meters/{id}/commands`.
    pub fn commands_topic(&self) -> String {
        format!("meters/{}/commands", self.0)
    }

    /// The topic a meter receives firmware manifests and images on: `meters/{id}/firmware`.
    pub fn firmware_topic(&self) -> String {
        format!("meters/{}/firmware", self.0)
    }
}

/// The prefix of a meter identity URI SAN.
pub const METER_URI_PREFIX: &str = "urn:gridward:meter:";

impl FromStr for MeterId {
    type Err = MeterIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for MeterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MeterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeterId({})", self.0)
    }
}

impl AsRef<str> for MeterId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in ["123456789", "m-001", "A.b_c-9", &"x".repeat(64)] {
            assert_eq!(MeterId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_topic_and_uri_metacharacters() {
        assert_eq!(MeterId::new(""), Err(MeterIdError::Empty));
        assert_eq!(
            MeterId::new(&"x".repeat(65)),
            Err(MeterIdError::TooLong(65))
        );
        for (bad, c) in [
            ("a/b", '/'),
            ("a+", '+'),
            ("#", '#'),
            ("a b", ' '),
            ("ä", 'ä'),
            ("a:b", ':'),
        ] {
            assert_eq!(
                MeterId::new(bad),
                Err(MeterIdError::InvalidChar(c)),
                "{bad}"
            );
        }
        assert_eq!(MeterId::new("-a"), Err(MeterIdError::BadStart));
        assert_eq!(MeterId::new(".."), Err(MeterIdError::BadStart));
    }

    #[test]
    fn topics_and_uri() {
        let id = MeterId::new("123").unwrap();
        assert_eq!(id.readings_topic(), "meters/123/readings");
        assert_eq!(id.events_topic(), "meters/123/events");
        assert_eq!(id.commands_topic(), "meters/123/commands");
        assert_eq!(id.firmware_topic(), "meters/123/firmware");
        assert_eq!(id.to_uri(), "urn:gridward:meter:123");
    }
}
