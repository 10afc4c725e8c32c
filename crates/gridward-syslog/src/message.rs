//! RFC 5424 messages, sans-IO: [`Severity`], [`Facility`], [`SyslogMessage`], the
//! [`Formatter`] that turns a message into the exact bytes of RFC 5424 §6, and
//! [`octet_counted`] framing (RFC 6587 §3.4.1, RFC 5425 §4.3).
//!
//! ```text
//! SYSLOG-MSG = HEADER SP STRUCTURED-DATA [SP MSG]
//! HEADER     = "<" PRIVAL ">" "1" SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID
//! ```
//!
//! The time is part of the message (the caller reads the clock); nothing here does IO.
//!
//! What the formatter does with values that do not fit the grammar:
//!
//! - Header fields (HOSTNAME, APP-NAME, PROCID, MSGID): every character outside PRINTUSASCII
//!   (`%d33-126`) becomes `_`, the value is cut to its limit (255, 48, 128, 32), and an empty
//!   value becomes the NILVALUE `-`.
//! - PARAM-NAMEs: characters outside PRINTUSASCII and `=`, `]`, `"` become `_`, the name is
//!   cut to 32 characters, and an empty name becomes `_`.
//! - PARAM-VALUEs: `"`, `\` and `]` are escaped with `\`; nothing is lost.
//! - The SD-ID is configuration and is validated instead ([`Formatter::with_sd_id`]).
//! - A TIMESTAMP is written in UTC with six fractional digits (microseconds) and `Z`;
//!   a year outside 0000..=9999 becomes the NILVALUE.
//! - MSG is UTF-8, preceded by the BOM; an empty MSG is left out (with its SP).

use std::fmt;
use std::str::FromStr;

use time::{OffsetDateTime, UtcOffset};

/// The NILVALUE of RFC 5424.
const NIL: &str = "-";
/// The UTF-8 byte order mark that starts MSG-UTF8.
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Longest HOSTNAME (RFC 5424 §6.2.4).
pub const MAX_HOSTNAME: usize = 255;
/// Longest APP-NAME (§6.2.5).
pub const MAX_APP_NAME: usize = 48;
/// Longest PROCID (§6.2.6).
pub const MAX_PROCID: usize = 128;
/// Longest MSGID (§6.2.7).
pub const MAX_MSGID: usize = 32;
/// Longest SD-NAME: SD-ID and PARAM-NAME (§6.3).
pub const MAX_SD_NAME: usize = 32;
/// The default SD-ID: `gridward` under 32473, the documentation PEN of RFC 5612.
pub const DEFAULT_SD_ID: &str = "gridward@32473";
/// The default APP-NAME.
pub const DEFAULT_APP_NAME: &str = "gridward";
/// SD-IDs registered with IANA (RFC 5424 §7), the only ones allowed without `@`.
const IANA_SD_IDS: [&str; 3] = ["timeQuality", "origin", "meta"];

/// Errors of this module: configuration values that are not what RFC 5424 allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A facility name that is none of `kern`, `user`, …, `local7`.
    #[error(
        "unknown syslog facility {0:?} (expected kern, user, mail, daemon, auth, syslog, lpr, news, uucp, cron, authpriv, ftp, ntp, audit, alert, clock or local0..local7)"
    )]
    UnknownFacility(String),
    /// A facility number above 23.
    #[error("syslog facility {0} out of range 0..=23")]
    FacilityOutOfRange(u8),
    /// A severity name that is none of `emerg`, `alert`, …, `debug`.
    #[error(
        "unknown syslog severity {0:?} (expected emerg, alert, crit, err, warning, notice, info or debug)"
    )]
    UnknownSeverity(String),
    /// A severity number above 7.
    #[error("syslog severity {0} out of range 0..=7")]
    SeverityOutOfRange(u8),
    /// An SD-ID that RFC 5424 §6.3.2 does not allow.
    #[error("invalid SD-ID {sd_id:?}: {reason}")]
    InvalidSdId {
        /// The SD-ID given.
        sd_id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// How urgent a message is (RFC 5424 §6.2.1, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Severity {
    /// 0: system is unusable.
    Emergency = 0,
    /// 1: action must be taken immediately.
    Alert = 1,
    /// 2: critical conditions.
    Critical = 2,
    /// 3: error conditions.
    Error = 3,
    /// 4: warning conditions.
    Warning = 4,
    /// 5: normal but significant condition.
    Notice = 5,
    /// 6: informational messages.
    Informational = 6,
    /// 7: debug-level messages.
    Debug = 7,
}

impl Severity {
    /// All severities, by number.
    pub const ALL: [Self; 8] = [
        Self::Emergency,
        Self::Alert,
        Self::Critical,
        Self::Error,
        Self::Warning,
        Self::Notice,
        Self::Informational,
        Self::Debug,
    ];

    /// The numerical code, 0..=7.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The severity of a numerical code.
    ///
    /// # Errors
    ///
    /// [`MessageError::SeverityOutOfRange`] above 7.
    pub fn from_code(code: u8) -> Result<Self, MessageError> {
        Self::ALL
            .get(usize::from(code))
            .copied()
            .ok_or(MessageError::SeverityOutOfRange(code))
    }

    /// The usual short name (`emerg`, `alert`, `crit`, `err`, `warning`, `notice`, `info`, `debug`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Emergency => "emerg",
            Self::Alert => "alert",
            Self::Critical => "crit",
            Self::Error => "err",
            Self::Warning => "warning",
            Self::Notice => "notice",
            Self::Informational => "info",
            Self::Debug => "debug",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = MessageError;

    /// Parses a short name (case-insensitive), also `emergency`, `critical`, `error`, `warn`
    /// and `informational`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let found = match lower.as_str() {
            "emergency" => Some(Self::Emergency),
            "critical" => Some(Self::Critical),
            "error" => Some(Self::Error),
            "warn" => Some(Self::Warning),
            "informational" => Some(Self::Informational),
            other => Self::ALL.into_iter().find(|v| v.as_str() == other),
        };
        found.ok_or_else(|| MessageError::UnknownSeverity(s.to_owned()))
    }
}

/// Which part of the system a message comes from (RFC 5424 §6.2.1, table 1): a number 0..=23.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Facility(u8);

/// Facility names, by number (the names of syslog(3) and rsyslog).
const FACILITY_NAMES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

impl Facility {
    /// 4: security/authorization messages.
    pub const AUTH: Self = Self(4);
    /// 10: security/authorization messages (private).
    pub const AUTHPRIV: Self = Self(10);
    /// 13: log audit.
    pub const AUDIT: Self = Self(13);
    /// 16: local use 0.
    pub const LOCAL0: Self = Self(16);

    /// The facility of a numerical code.
    ///
    /// # Errors
    ///
    /// [`MessageError::FacilityOutOfRange`] above 23.
    pub fn new(code: u8) -> Result<Self, MessageError> {
        if usize::from(code) < FACILITY_NAMES.len() {
            Ok(Self(code))
        } else {
            Err(MessageError::FacilityOutOfRange(code))
        }
    }

    /// The numerical code, 0..=23.
    pub fn code(self) -> u8 {
        self.0
    }

    /// The name (`auth`, `local0`, …).
    pub fn as_str(self) -> &'static str {
        FACILITY_NAMES
            .get(usize::from(self.0))
            .copied()
            .unwrap_or("?")
    }
}

impl fmt::Display for Facility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Facility {
    type Err = MessageError;

    /// Parses a name (case-insensitive): `kern`, `user`, `mail`, `daemon`, `auth`, `syslog`,
    /// `lpr`, `news`, `uucp`, `cron`, `authpriv`, `ftp`, `ntp`, `audit`, `alert`, `clock`,
    /// `local0`..`local7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FACILITY_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(s))
            .and_then(|i| u8::try_from(i).ok())
            .map(Self)
            .ok_or_else(|| MessageError::UnknownFacility(s.to_owned()))
    }
}

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogMessage {
    /// When the event happened (written in UTC).
    pub time: OffsetDateTime,
    /// Its severity.
    pub severity: Severity,
    /// The type of message, e.g. a security event's reason code (at most 32 PRINTUSASCII).
    pub msgid: String,
    /// SD-PARAMs of the one SD-ELEMENT under the formatter's SD-ID, in order.
    pub structured: Vec<(String, String)>,
    /// Free text (UTF-8).
    pub msg: String,
}

impl SyslogMessage {
    /// A message without structured data.
    pub fn new(
        time: OffsetDateTime,
        severity: Severity,
        msgid: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Self {
            time,
            severity,
            msgid: msgid.into(),
            structured: Vec::new(),
            msg: msg.into(),
        }
    }

    /// Adds an SD-PARAM.
    #[must_use]
    pub fn with_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.structured.push((name.into(), value.into()));
        self
    }
}

/// Turns [`SyslogMessage`]s into RFC 5424 bytes for one sender: facility, HOSTNAME, APP-NAME,
/// PROCID and SD-ID are the same for every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formatter {
    facility: Facility,
    hostname: String,
    app_name: String,
    procid: String,
    sd_id: String,
}

impl Formatter {
    /// A formatter for `facility` and `hostname`, APP-NAME `gridward`, PROCID NILVALUE and
    /// SD-ID [`DEFAULT_SD_ID`]. The hostname is made to fit (see the module documentation).
    pub fn new(facility: Facility, hostname: &str) -> Self {
        Self {
            facility,
            hostname: header_field(hostname, MAX_HOSTNAME),
            app_name: DEFAULT_APP_NAME.to_owned(),
            procid: NIL.to_owned(),
            sd_id: DEFAULT_SD_ID.to_owned(),
        }
    }

    /// Sets the APP-NAME (made to fit: PRINTUSASCII, at most 48).
    #[must_use]
    pub fn with_app_name(mut self, app_name: &str) -> Self {
        self.app_name = header_field(app_name, MAX_APP_NAME);
        self
    }

    /// Sets the PROCID, e.g. the process id (made to fit: PRINTUSASCII, at most 128).
    #[must_use]
    pub fn with_procid(mut self, procid: &str) -> Self {
        self.procid = header_field(procid, MAX_PROCID);
        self
    }

    /// Sets the SD-ID of the structured data: `name@PEN` (your private enterprise number),
    /// or one of the IANA-registered `timeQuality`, `origin`, `meta`.
    ///
    /// # Errors
    ///
    /// [`MessageError::InvalidSdId`] if it is not an SD-NAME (1 to 32 PRINTUSASCII other than
    /// `=`, SP, `]`, `"`) or not of one of those two forms.
    pub fn with_sd_id(mut self, sd_id: &str) -> Result<Self, MessageError> {
        validate_sd_id(sd_id)?;
        self.sd_id = sd_id.to_owned();
        Ok(self)
    }

    /// The facility.
    pub fn facility(&self) -> Facility {
        self.facility
    }

    /// The HOSTNAME as written.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The APP-NAME as written.
    pub fn app_name(&self) -> &str {
        &self.app_name
    }

    /// The PROCID as written.
    pub fn procid(&self) -> &str {
        &self.procid
    }

    /// The SD-ID.
    pub fn sd_id(&self) -> &str {
        &self.sd_id
    }

    /// The message as RFC 5424 bytes (without framing).
    pub fn format(&self, m: &SyslogMessage) -> Vec<u8> {
        let mut out = self.header_and_sd(m, m.structured.len());
        push_msg(&mut out, m.msg.as_bytes());
        out
    }

    /// The message as RFC 5424 bytes of at most `max` bytes (a UDP datagram, RFC 5426 §3.2).
    ///
    /// If the whole message is too long, MSG is cut at a UTF-8 character boundary; if HEADER
    /// and STRUCTURED-DATA alone are too long, SD-PARAMs are left out from the last one, and
    /// MSG then cut. The result is always a valid message, except when `max` is shorter than
    /// the header itself (under 512 bytes; never with the 2048 of RFC 5426): the header is
    /// then returned whole.
    pub fn format_truncated(&self, m: &SyslogMessage, max: usize) -> Vec<u8> {
        let full = self.format(m);
        if full.len() <= max {
            return full;
        }
        let mut params = m.structured.len();
        loop {
            let mut out = self.header_and_sd(m, params);
            if out.len() <= max || params == 0 {
                // SP + BOM + at least one byte of MSG must fit to be worth it.
                let room = max.saturating_sub(out.len() + 1 + BOM.len());
                if room > 0 {
                    push_msg(&mut out, utf8_prefix(&m.msg, room).as_bytes());
                }
                return out;
            }
            params -= 1;
        }
    }

    /// HEADER SP STRUCTURED-DATA with the first `params` SD-PARAMs.
    fn header_and_sd(&self, m: &SyslogMessage, params: usize) -> Vec<u8> {
        let pri = u16::from(self.facility.code()) * 8 + u16::from(m.severity.code());
        let mut s = format!(
            "<{pri}>1 {} {} {} {} {} ",
            timestamp(m.time),
            self.hostname,
            self.app_name,
            self.procid,
            header_field(&m.msgid, MAX_MSGID),
        );
        if params == 0 {
            s.push_str(NIL);
        } else {
            s.push('[');
            s.push_str(&self.sd_id);
            for (name, value) in m.structured.iter().take(params) {
                s.push(' ');
                s.push_str(&param_name(name));
                s.push_str("=\"");
                escape_param_value(&mut s, value);
                s.push('"');
            }
            s.push(']');
        }
        s.into_bytes()
    }
}

/// Appends SP BOM MSG, unless MSG is empty.
fn push_msg(out: &mut Vec<u8>, msg: &[u8]) {
    if !msg.is_empty() {
        out.push(b' ');
        out.extend_from_slice(BOM);
        out.extend_from_slice(msg);
    }
}

/// Octet-counting framing: `MSG-LEN SP SYSLOG-MSG` (RFC 6587 §3.4.1, RFC 5425 §4.3).
pub fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg);
    out
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn utf8_prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

fn is_printusascii(c: char) -> bool {
    ('!'..='~').contains(&c)
}

/// A header field: non-PRINTUSASCII characters replaced by `_`, cut to `max`, NILVALUE if empty.
fn header_field(value: &str, max: usize) -> String {
    let s: String = value
        .chars()
        .map(|c| if is_printusascii(c) { c } else { '_' })
        .take(max)
        .collect();
    if s.is_empty() { NIL.to_owned() } else { s }
}

fn is_sd_name_char(c: char) -> bool {
    is_printusascii(c) && !matches!(c, '=' | ']' | '"')
}

/// A PARAM-NAME: SD-NAME characters only (others replaced by `_`), at most 32, `_` if empty.
fn param_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if is_sd_name_char(c) { c } else { '_' })
        .take(MAX_SD_NAME)
        .collect();
    if s.is_empty() { "_".to_owned() } else { s }
}

/// Checks an SD-ID (RFC 5424 §6.3.2 and §7).
fn validate_sd_id(sd_id: &str) -> Result<(), MessageError> {
    let err = |reason| {
        Err(MessageError::InvalidSdId {
            sd_id: sd_id.to_owned(),
            reason,
        })
    };
    if sd_id.is_empty() {
        return err("empty");
    }
    if sd_id.len() > MAX_SD_NAME {
        return err("longer than 32 characters");
    }
    if !sd_id.chars().all(is_sd_name_char) {
        return err("only printable US-ASCII other than '=', ' ', ']' and '\"' is allowed");
    }
    if IANA_SD_IDS.contains(&sd_id) {
        return Ok(());
    }
    match sd_id.split_once('@') {
        Some((name, pen))
            if !name.is_empty()
                && !pen.is_empty()
                && pen
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Ok(())
        }
        _ => err("must be name@PEN (a private enterprise number) or an IANA-registered SD-ID"),
    }
}

/// Appends a PARAM-VALUE with `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn escape_param_value(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// TIMESTAMP: `YYYY-MM-DDThh:mm:ss.ffffffZ` in UTC, or NILVALUE for a year RFC 3339 cannot write.
fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    if !(0..=9999).contains(&t.year()) {
        return NIL.to_owned();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use time::macros::datetime;

    use super::*;

    const T: OffsetDateTime = datetime!(2025-03-04 05:06:07.123456789 UTC);

    fn fmt() -> Formatter {
        Formatter::new(Facility::AUTH, "hes-1.example.net").with_procid("4242")
    }

    fn s(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn exact_bytes_with_structured_data_and_msg() {
        let m = SyslogMessage::new(T, Severity::Warning, "signature_invalid", "refused")
            .with_param("meter", "m000001")
            .with_param("peer", "127.0.0.1:5000");
        let out = fmt().format(&m);
        assert_eq!(
            out,
            b"<36>1 2025-03-04T05:06:07.123456Z hes-1.example.net gridward 4242 signature_invalid \
              [gridward@32473 meter=\"m000001\" peer=\"127.0.0.1:5000\"] \xEF\xBB\xBFrefused"
                .to_vec()
        );
    }

    #[test]
    fn nil_values_and_no_msg() {
        let m = SyslogMessage::new(T, Severity::Emergency, "", "");
        let f = Formatter::new(Facility::new(0).unwrap(), "").with_app_name("");
        assert_eq!(
            s(&f.format(&m)),
            "<0>1 2025-03-04T05:06:07.123456Z - - - - -"
        );
    }

    #[test]
    fn highest_pri_and_offset_converted_to_utc() {
        let t = datetime!(2025-01-01 01:30:00 +02:00);
        let m = SyslogMessage::new(t, Severity::Debug, "x", "y");
        let f = Formatter::new(Facility::from_str("local7").unwrap(), "h");
        assert_eq!(
            s(&f.format(&m)),
            "<191>1 2024-12-31T23:30:00.000000Z h gridward - x - \u{FEFF}y"
        );
    }

    #[test]
    fn year_outside_rfc3339_is_nil() {
        let t = datetime!(-0001-01-01 00:00 UTC);
        let m = SyslogMessage::new(t, Severity::Notice, "x", "");
        assert_eq!(
            s(&fmt().format(&m)),
            "<37>1 - hes-1.example.net gridward 4242 x -"
        );
    }

    #[test]
    fn param_values_are_escaped() {
        let m = SyslogMessage::new(T, Severity::Error, "id", "").with_param("v", r#"a"b\c]d[e=f"#);
        assert_eq!(
            s(&fmt().format(&m)),
            r#"<35>1 2025-03-04T05:06:07.123456Z hes-1.example.net gridward 4242 id [gridward@32473 v="a\"b\\c\]d[e=f"]"#
        );
    }

    #[test]
    fn non_ascii_param_values_and_msg_stay_utf8() {
        let m = SyslogMessage::new(T, Severity::Error, "id", "Zähler ✓ 電力")
            .with_param("city", "Zürich");
        let out = s(&fmt().format(&m));
        assert!(out.ends_with("[gridward@32473 city=\"Zürich\"] \u{FEFF}Zähler ✓ 電力"));
    }

    #[test]
    fn header_fields_replaced_and_truncated() {
        let host = "a".repeat(300);
        let f = Formatter::new(Facility::AUTH, &host)
            .with_app_name(&"b".repeat(60))
            .with_procid("p i\u{e9}d\n");
        assert_eq!(f.hostname(), "a".repeat(255));
        assert_eq!(f.app_name(), "b".repeat(48));
        assert_eq!(f.procid(), "p_i_d_");
        let m = SyslogMessage::new(T, Severity::Error, format!("ü {}", "c".repeat(40)), "");
        let out = s(&f.format(&m));
        let msgid = out.split(' ').nth(5).unwrap();
        assert_eq!(msgid, format!("__{}", "c".repeat(30)));
    }

    #[test]
    fn param_names_replaced_truncated_and_never_empty() {
        let m = SyslogMessage::new(T, Severity::Error, "id", "")
            .with_param("a=b c]d\"e", "1")
            .with_param("", "2")
            .with_param("n".repeat(40), "3");
        let out = s(&fmt().format(&m));
        let sd = out.split_once("4242 id ").unwrap().1;
        assert_eq!(
            sd,
            format!(
                "[gridward@32473 a_b_c_d_e=\"1\" _=\"2\" {}=\"3\"]",
                "n".repeat(32)
            )
        );
    }

    #[test]
    fn sd_id_validated() {
        let f = fmt();
        assert_eq!(
            f.clone().with_sd_id("ev@1.2.3").unwrap().sd_id(),
            "ev@1.2.3"
        );
        assert_eq!(f.clone().with_sd_id("origin").unwrap().sd_id(), "origin");
        for bad in [
            "",
            "gridward",
            "gridward@",
            "@32473",
            "grid ward@1",
            "grid=ward@1",
            "grid]ward@1",
            "grid\"ward@1",
            "x@12a",
            "x@1..2",
            "grïd@1",
            &format!("{}@1", "a".repeat(31)),
        ] {
            let err = f.clone().with_sd_id(bad).unwrap_err();
            assert!(matches!(err, MessageError::InvalidSdId { .. }), "{bad:?}");
        }
    }

    #[test]
    fn facility_and_severity_names() {
        assert_eq!("auth".parse::<Facility>().unwrap().code(), 4);
        assert_eq!("AUTHPRIV".parse::<Facility>().unwrap().code(), 10);
        for i in 0..8u8 {
            let f: Facility = format!("local{i}").parse().unwrap();
            assert_eq!(f.code(), 16 + i);
            assert_eq!(f.to_string(), format!("local{i}"));
        }
        assert_eq!(
            "local8".parse::<Facility>(),
            Err(MessageError::UnknownFacility("local8".into()))
        );
        assert_eq!(Facility::new(24), Err(MessageError::FacilityOutOfRange(24)));
        assert_eq!("err".parse::<Severity>().unwrap(), Severity::Error);
        assert_eq!("Warn".parse::<Severity>().unwrap(), Severity::Warning);
        assert!("loud".parse::<Severity>().is_err());
        assert_eq!(Severity::from_code(6).unwrap(), Severity::Informational);
        assert_eq!(
            Severity::from_code(8),
            Err(MessageError::SeverityOutOfRange(8))
        );
        for sev in Severity::ALL {
            assert_eq!(sev.as_str().parse::<Severity>().unwrap(), sev);
        }
    }

    #[test]
    fn octet_counting() {
        assert_eq!(
            octet_counted(b"<1>1 - - - - - -"),
            b"16 <1>1 - - - - - -".to_vec()
        );
        assert_eq!(octet_counted("é".as_bytes()), b"2 \xC3\xA9".to_vec());
    }

    #[test]
    fn truncation_cuts_msg_at_char_boundary() {
        let m = SyslogMessage::new(T, Severity::Error, "id", "€".repeat(1000)).with_param("k", "v");
        let full = fmt().format(&m);
        assert!(full.len() > 2048);
        let out = fmt().format_truncated(&m, 2048);
        assert!(out.len() <= 2048 && out.len() >= 2046, "{}", out.len());
        let text = s(&out);
        assert!(text.contains("[gridward@32473 k=\"v\"] \u{FEFF}€€"));
        // Short enough: unchanged.
        assert_eq!(fmt().format_truncated(&m, full.len()), full);
    }

    #[test]
    fn truncation_drops_params_when_sd_alone_too_long() {
        let m = SyslogMessage::new(T, Severity::Error, "id", "hello")
            .with_param("a", "x".repeat(100))
            .with_param("b", "y".repeat(3000));
        let out = s(&fmt().format_truncated(&m, 2048));
        assert!(out.len() <= 2048);
        assert!(out.ends_with(&format!(
            "[gridward@32473 a=\"{}\"] \u{FEFF}hello",
            "x".repeat(100)
        )));
        let m =
            SyslogMessage::new(T, Severity::Error, "id", "hello").with_param("b", "y".repeat(3000));
        let out = s(&fmt().format_truncated(&m, 2048));
        assert!(out.ends_with("4242 id - \u{FEFF}hello"), "{out}");
    }

    #[test]
    fn utf8_prefix_never_splits() {
        assert_eq!(utf8_prefix("aé", 2), "a");
        assert_eq!(utf8_prefix("aé", 3), "aé");
        assert_eq!(utf8_prefix("€", 2), "");
    }
}
