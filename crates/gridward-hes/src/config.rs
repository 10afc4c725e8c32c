//! `gridward.toml`: the head-end's configuration, in two stages (ripgrep's lowargs/hiargs):
//! [`RawConfig`] is what the file says, [`Config`] is what was checked and will run.
//!
//! Every field has a safe default; an unknown key, a wrong type or an impossible value is an
//! error that names the key (and, for syntax errors, the line).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gridward_core::document::Limits;
use gridward_core::replay::FreshnessPolicy;
use gridward_mqtt::EndpointConfig;
use serde::Deserialize;

use crate::pipeline::PipelineConfig;
use crate::writer::WriterConfig;

/// Why a configuration cannot be used. The binary exits with code 2 on any of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source} (create one with `gridward config init`)")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The file as written. Every field is optional; absent means the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[pki]`
    #[serde(default)]
    pub pki: RawPki,
    /// `[mqtt]`
    #[serde(default)]
    pub mqtt: RawMqtt,
    /// `[store]`
    #[serde(default)]
    pub store: RawStore,
    /// `[ingest]`
    #[serde(default)]
    pub ingest: RawIngest,
}

/// `[pki]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPki {
    /// PKI directory.
    pub dir: Option<PathBuf>,
    /// Server certificate to present (DIR/servers/NAME).
    pub server_name: Option<String>,
}

/// `[mqtt]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// Listen address.
    pub listen: Option<String>,
    /// Largest packet, bytes.
    pub max_packet_size: Option<usize>,
    /// Most simultaneous connections.
    pub max_connections: Option<usize>,
    /// TLS handshake + CONNECT deadline, seconds.
    pub connect_timeout_secs: Option<u64>,
    /// Longest keep-alive granted, seconds.
    pub max_keep_alive_secs: Option<u64>,
    /// Messages of one connection awaiting their verdict.
    pub max_inflight: Option<u16>,
    /// Sustained packets per second per connection.
    pub rate_per_second: Option<f64>,
    /// Burst of the per-connection rate limit, packets.
    pub rate_burst: Option<u32>,
    /// Failures from one address that ban it (0: never ban).
    pub ban_after_failures: Option<u32>,
    /// Window over which failures count, seconds.
    pub ban_window_secs: Option<u64>,
    /// Ban duration, seconds.
    pub ban_duration_secs: Option<u64>,
    /// Addresses never banned.
    pub ban_exempt: Option<Vec<String>>,
    /// Longest connection lifetime, hours.
    pub max_connection_lifetime_hours: Option<u64>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// SQLite database file.
    pub path: Option<PathBuf>,
}

/// `[ingest]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Freshness window, seconds either way.
    pub max_skew_secs: Option<u64>,
    /// Largest document, bytes.
    pub max_document_bytes: Option<usize>,
    /// Most messages per store transaction.
    pub batch_size: Option<usize>,
    /// Messages waiting for the writer before senders wait.
    pub queue_depth: Option<usize>,
}

/// A checked configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// PKI directory.
    pub pki_dir: PathBuf,
    /// Server certificate name (DIR/servers/NAME).
    pub server_name: String,
    /// MQTT listen address.
    pub listen: SocketAddr,
    /// Endpoint limits.
    pub endpoint: EndpointConfig,
    /// SQLite database file.
    pub store_path: PathBuf,
    /// Pipeline checks.
    pub pipeline: PipelineConfig,
    /// Writer queue and batch sizes.
    pub writer: WriterConfig,
}

/// The commented default configuration that `gridward config init` writes.
pub const DEFAULT_TOML: &str = r#"# Gridward head-end configuration.
# Every key is optional; the value shown is the default. Relative paths are relative to this file.

[pki]
# The PKI directory made by `gridward pki init` (CA, CRLs, server certificate).
dir = "pki"
# The server certificate the MQTT endpoint presents: DIR/servers/NAME (`gridward pki issue server`).
server_name = "localhost"

[mqtt]
# Where meters connect: MQTT 3.1.1 and 5 over mutual TLS (TLS 1.3, or 1.2 with ECDHE + AES-GCM).
listen = "127.0.0.1:8883"
# Largest MQTT packet accepted, bytes; bigger ones are refused and the connection closed.
max_packet_size = 65536
# Most simultaneous connections, handshakes in progress included.
max_connections = 20000
# Deadline from TCP accept to a complete CONNECT (TLS handshake included), seconds.
connect_timeout_secs = 10
# Longest keep-alive granted to a meter, seconds; silence for 1.5 x keep-alive closes the connection.
max_keep_alive_secs = 1200
# Messages of one connection waiting for their verdict; at the limit the endpoint stops reading.
max_inflight = 32
# Per-connection rate limit: sustained packets per second, and the burst allowed above it.
rate_per_second = 50.0
rate_burst = 200
# Failed handshakes or CONNECTs from one address within ban_window_secs that ban it for
# ban_duration_secs (0 never bans). Exempt addresses (a concentrator, a NAT gateway) are listed.
ban_after_failures = 10
ban_window_secs = 60
ban_duration_secs = 300
ban_exempt = []
# Connections are closed after this many hours, so certificates are re-checked at reconnection.
max_connection_lifetime_hours = 48

[store]
# SQLite database (WAL; every acknowledged reading is durable before its PUBACK).
path = "gridward.db"

[ingest]
# A message's signing time may differ from the head-end's clock by this many seconds either way.
max_skew_secs = 300
# Largest document inside an envelope, bytes.
max_document_bytes = 65536
# Most messages per store transaction (batches grow with load, up to this).
batch_size = 1000
# Messages waiting for the store before the endpoint slows down (back-pressure, nothing dropped).
queue_depth = 8192
"#;

impl Config {
    /// Reads and checks `path`; relative paths inside are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Parses and checks `text` (named `path` in errors), resolving relative paths against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_raw(raw, path, base)
    }

    /// Checks a [`RawConfig`].
    pub fn from_raw(raw: RawConfig, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let listen_text = raw
            .mqtt
            .listen
            .unwrap_or_else(|| "127.0.0.1:8883".to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|e| {
            invalid(
                "mqtt.listen",
                format!("{listen_text:?} is not an address:port ({e})"),
            )
        })?;

        let d = EndpointConfig::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        let mut ban_exempt = Vec::new();
        for a in raw.mqtt.ban_exempt.unwrap_or_default() {
            ban_exempt.push(a.parse().map_err(|e| {
                invalid(
                    "mqtt.ban_exempt",
                    format!("{a:?} is not an IP address ({e})"),
                )
            })?);
        }
        let mut endpoint = EndpointConfig::default();
        endpoint.max_packet_size = raw.mqtt.max_packet_size.unwrap_or(d.max_packet_size);
        endpoint.max_connections = raw.mqtt.max_connections.unwrap_or(d.max_connections);
        endpoint.connect_timeout = secs(raw.mqtt.connect_timeout_secs, d.connect_timeout);
        endpoint.max_keep_alive = secs(raw.mqtt.max_keep_alive_secs, d.max_keep_alive);
        endpoint.max_inflight = raw.mqtt.max_inflight.unwrap_or(d.max_inflight);
        endpoint.rate_per_second = raw.mqtt.rate_per_second.unwrap_or(d.rate_per_second);
        endpoint.rate_burst = raw.mqtt.rate_burst.unwrap_or(d.rate_burst);
        endpoint.ban_after_failures = raw.mqtt.ban_after_failures.unwrap_or(d.ban_after_failures);
        endpoint.ban_window = secs(raw.mqtt.ban_window_secs, d.ban_window);
        endpoint.ban_duration = secs(raw.mqtt.ban_duration_secs, d.ban_duration);
        endpoint.ban_exempt = ban_exempt;
        endpoint.max_connection_lifetime = raw
            .mqtt
            .max_connection_lifetime_hours
            .map_or(d.max_connection_lifetime, |h| {
                Duration::from_secs(h.saturating_mul(3600))
            });
        endpoint
            .validate()
            .map_err(|e| invalid("mqtt", e.to_string()))?;

        let max_skew = raw.ingest.max_skew_secs.unwrap_or(300);
        if max_skew == 0 || max_skew > 7 * 24 * 3600 {
            return Err(invalid(
                "ingest.max_skew_secs",
                format!("{max_skew} is outside 1..=604800"),
            ));
        }
        let max_document_bytes = raw.ingest.max_document_bytes.unwrap_or(64 * 1024);
        if !(128..=1024 * 1024).contains(&max_document_bytes) {
            return Err(invalid(
                "ingest.max_document_bytes",
                format!("{max_document_bytes} is outside 128..=1048576"),
            ));
        }
        let batch_size = raw.ingest.batch_size.unwrap_or(1000);
        if !(1..=100_000).contains(&batch_size) {
            return Err(invalid(
                "ingest.batch_size",
                format!("{batch_size} is outside 1..=100000"),
            ));
        }
        let queue_depth = raw.ingest.queue_depth.unwrap_or(8192);
        if !(1..=10_000_000).contains(&queue_depth) {
            return Err(invalid(
                "ingest.queue_depth",
                format!("{queue_depth} is outside 1..=10000000"),
            ));
        }
        let server_name = raw
            .pki
            .server_name
            .unwrap_or_else(|| "localhost".to_owned());
        if server_name.is_empty() {
            return Err(invalid("pki.server_name", "must not be empty".to_owned()));
        }
        Ok(Self {
            pki_dir: resolve(raw.pki.dir.unwrap_or_else(|| PathBuf::from("pki"))),
            server_name,
            listen,
            endpoint,
            store_path: resolve(
                raw.store
                    .path
                    .unwrap_or_else(|| PathBuf::from("gridward.db")),
            ),
            pipeline: PipelineConfig {
                freshness: FreshnessPolicy {
                    max_skew: time::Duration::seconds(max_skew as i64),
                },
                limits: Limits {
                    max_bytes: max_document_bytes,
                },
            },
            writer: WriterConfig {
                batch_size,
                queue_depth,
                ..WriterConfig::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("gridward.toml"), Path::new("/etc/gridward"))
    }

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        let c = parse(DEFAULT_TOML).unwrap();
        let e = parse("").unwrap();
        assert_eq!(c.listen, e.listen);
        assert_eq!(c.endpoint, e.endpoint);
        assert_eq!(c.pki_dir, Path::new("/etc/gridward/pki"));
        assert_eq!(c.store_path, Path::new("/etc/gridward/gridward.db"));
        assert_eq!(c.writer.batch_size, 1000);
        assert_eq!(c.pipeline.freshness.max_skew, time::Duration::minutes(5));
        assert_eq!(c.endpoint, EndpointConfig::default());
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[mqtt]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "mqtt.listen",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse("[mqtt]\nlisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::Syntax { .. }) && e.to_string().contains("lisen"),
            "{e}"
        );
        let e = parse("[ingest]\nbatch_size = 0\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "ingest.batch_size",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse("[ingest]\nmax_skew_secs = \"5\"\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = parse("[mqtt]\nmax_inflight = 0\n").unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "mqtt", .. }), "{e}");
        let e = parse("[mqtt]\nban_exempt = [\"x\"]\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "mqtt.ban_exempt",
                    ..
                }
            ),
            "{e}"
        );
        let e = Config::load(Path::new("/nonexistent/gridward.toml")).unwrap_err();
        assert!(e.to_string().contains("gridward config init"), "{e}");
    }
}
