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

use crate::forward::{HttpVersion, TargetSettings, TargetTls};
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
    /// `[[forward]]`: downstream targets.
    #[serde(default)]
    pub forward: Vec<RawForward>,
    /// `[api]`
    #[serde(default)]
    pub api: RawApi,
    /// `[audit]`
    #[serde(default)]
    pub audit: RawAudit,
    /// `[syslog]`
    #[serde(default)]
    pub syslog: RawSyslog,
    /// `[commands]`
    #[serde(default)]
    pub commands: RawCommands,
    /// `[firmware]`
    #[serde(default)]
    pub firmware: RawFirmware,
    /// `[detection]` (thresholds of the detectors) and `[[detection.feeder]]`.
    #[serde(default)]
    pub detection: gridward_detect::DetectionConfig,
}

/// `[commands]`: signed commands to meters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommands {
    /// The command-signer certificate (DIR/command-signers/NAME), or "off".
    pub signer: Option<String>,
    /// Default lifetime of a command, seconds.
    pub ttl_secs: Option<u64>,
    /// Critical kinds (four eyes above the threshold).
    pub critical: Option<Vec<String>>,
    /// A critical command to more meters than this needs a second operator.
    pub four_eyes_threshold: Option<usize>,
    /// How long a proposal waits for its approval, seconds.
    pub approval_window_secs: Option<u64>,
    /// Commands dispatched per second at most (bulk rate limit).
    pub dispatch_rate_per_sec: Option<f64>,
}

/// `[firmware]`: manufacturer keys that firmware uploads must be signed with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFirmware {
    /// SPKI PEM files of the trusted manufacturer keys.
    pub manufacturers: Option<Vec<PathBuf>>,
}

/// Checked `[commands]` and `[firmware]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSettings {
    /// DIR/command-signers/NAME.
    pub signer: String,
    /// Default command lifetime.
    pub ttl: Duration,
    /// Kinds that need four eyes above the threshold.
    pub critical: Vec<gridward_core::command::CommandKind>,
    /// More meters than this: a proposal.
    pub four_eyes_threshold: usize,
    /// Proposal lifetime.
    pub approval_window: Duration,
    /// Dispatch rate limit, commands per second.
    pub dispatch_rate_per_sec: f64,
    /// Manufacturer public keys (SPKI PEM files).
    pub manufacturers: Vec<PathBuf>,
}

/// `[api]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// Listen address of the HTTPS API; `"off"` for none.
    pub listen: Option<String>,
    /// Users and sessions database.
    pub users: Option<PathBuf>,
}

/// `[audit]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// The audit log's SQLite file.
    pub path: Option<PathBuf>,
    /// The audit key (Ed25519, PKCS#8 PEM).
    pub key: Option<PathBuf>,
    /// Checkpoint origin (and signer name).
    pub origin: Option<String>,
    /// Seconds between checkpoints.
    pub checkpoint_secs: Option<u64>,
}

/// `[syslog]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSyslog {
    /// The collector, `host:port` (an IP address); absent: no syslog.
    pub address: Option<String>,
    /// `udp`, `tcp` or `tls`.
    pub transport: Option<String>,
    /// Facility name (`auth`, `authpriv`, `local0`..`local7`, ...).
    pub facility: Option<String>,
    /// TLS: the collector's certificate name (checked against this PKI's CA).
    pub server_name: Option<String>,
    /// TLS: our client certificate, DIR/clients/NAME.
    pub client: Option<String>,
}

/// The HTTPS API's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The users database.
    pub users_path: PathBuf,
}

/// Where security events go as syslog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogSettings {
    /// The collector.
    pub address: SocketAddr,
    /// `udp`, `tcp` or `tls`.
    pub transport: SyslogTransport,
    /// The facility.
    pub facility: gridward_syslog::Facility,
}

/// How syslog travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTransport {
    /// One datagram per message (RFC 5426).
    Udp,
    /// Octet-counted frames over TCP (RFC 6587).
    Tcp,
    /// Octet-counted frames over TLS (RFC 5425), with a client certificate of the PKI.
    Tls {
        /// The collector's certificate name.
        server_name: String,
        /// Our client certificate (DIR/clients/NAME).
        client: String,
    },
}

impl RawConfig {
    /// A head-end on this machine alone: the PKI at `pki_dir`, MQTT on a free loopback port,
    /// 127.0.0.1 exempt from bans (the meters and tools of a demo, benchmark or harness all
    /// come from there), the store at `store`, the audit log and its key beside it, no API
    /// (set `api.listen` to `127.0.0.1:0` for one). Everything else default; adjust the fields.
    pub fn loopback(pki_dir: &Path, store: &Path) -> Self {
        let mut raw = Self::default();
        raw.pki.dir = Some(pki_dir.to_owned());
        raw.mqtt.listen = Some("127.0.0.1:0".to_owned());
        raw.mqtt.ban_exempt = Some(vec!["127.0.0.1".to_owned()]);
        raw.store.path = Some(store.to_owned());
        raw.api.listen = Some("off".to_owned());
        raw.api.users = Some(store.with_file_name("users.db"));
        raw.audit.path = Some(store.with_file_name("audit.db"));
        raw.audit.key = Some(store.with_file_name("audit.key"));
        raw
    }
}

impl RawForward {
    /// A target `name` at `url`, reached with the PKI's client certificate `client` (which also
    /// signs), retrying at most every `retry_max_secs`.
    pub fn pki_client(name: &str, url: String, client: &str, retry_max_secs: u64) -> Self {
        Self {
            name: Some(name.to_owned()),
            url: Some(url),
            client: Some(client.to_owned()),
            retry_max_secs: Some(retry_max_secs),
            ..Self::default()
        }
    }
}

/// `[[forward]]`: one downstream target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    /// Short, stable name.
    pub name: Option<String>,
    /// `https://` URL readings are posted to.
    pub url: Option<String>,
    /// A client certificate of the PKI (DIR/clients/NAME).
    pub client: Option<String>,
    /// Or: our certificate chain file.
    pub cert: Option<PathBuf>,
    /// Or: its key file.
    pub key: Option<PathBuf>,
    /// Or: trust anchors for the target.
    pub ca: Option<Vec<PathBuf>>,
    /// Or: CRLs of those CAs.
    pub crl: Option<Vec<PathBuf>>,
    /// Request signing key (default: the client certificate's key).
    pub signing_key: Option<PathBuf>,
    /// `keyid` of the signatures.
    pub key_id: Option<String>,
    /// Rows read per batch.
    pub batch_size: Option<usize>,
    /// Requests in flight.
    pub concurrency: Option<usize>,
    /// Connection deadline, seconds.
    pub connect_timeout_secs: Option<u64>,
    /// Request deadline, seconds.
    pub request_timeout_secs: Option<u64>,
    /// Signature validity, seconds.
    pub signature_validity_secs: Option<u64>,
    /// `auto`, `http1` or `http2`.
    pub http: Option<String>,
    /// First retry delay, milliseconds.
    pub retry_initial_ms: Option<u64>,
    /// Longest retry delay, seconds.
    pub retry_max_secs: Option<u64>,
    /// Whether each reading carries the meter's envelope (`Envelope`, wire-format §7.1).
    pub envelope: Option<bool>,
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
    /// Sustained packets per second per meter (across its connections).
    pub rate_per_second: Option<f64>,
    /// Burst of the per-meter rate limit, packets.
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
    /// The key-encryption key file (default: the database's path with extension `.key`).
    pub key_file: Option<PathBuf>,
    /// Take the key-encryption key from a passphrase in this environment variable (Argon2id)
    /// instead of a key file.
    pub passphrase_env: Option<String>,
    /// Days a data key stays active before a new one is started.
    pub key_period_days: Option<u64>,
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

/// Where the store's key-encryption key comes from (`[store] key_file`, `passphrase_env`).
#[derive(Debug, Clone)]
pub struct StoreKeys {
    /// The key file (used unless `passphrase_env` is set).
    pub key_file: PathBuf,
    /// The environment variable holding the passphrase.
    pub passphrase_env: Option<String>,
    /// How long a data key stays active.
    pub period: Duration,
}

impl StoreKeys {
    /// The key source for the store: the passphrase from the environment if configured, else
    /// the key file (created with a new database only when `create`).
    ///
    /// # Errors
    ///
    /// The passphrase variable is not set or empty.
    pub fn source(&self, create: bool) -> Result<gridward_store::KeySource, String> {
        match &self.passphrase_env {
            Some(var) => {
                let pass = std::env::var(var).map_err(|_| {
                    format!(
                        "store.passphrase_env names {var}, which is not set: export the store's passphrase in {var}"
                    )
                })?;
                if pass.is_empty() {
                    return Err(format!("the passphrase in {var} is empty"));
                }
                Ok(gridward_store::KeySource::Passphrase {
                    passphrase: std::sync::Arc::new(zeroize::Zeroizing::new(pass.into_bytes())),
                    params: gridward_vault::KdfParams::DEFAULT,
                })
            }
            None => Ok(gridward_store::KeySource::File {
                path: self.key_file.clone(),
                create,
            }),
        }
    }
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
    /// Encryption at rest of the store.
    pub store_keys: StoreKeys,
    /// Pipeline checks.
    pub pipeline: PipelineConfig,
    /// Writer queue and batch sizes.
    pub writer: WriterConfig,
    /// Downstream targets (none: readings are stored, not forwarded).
    pub forward: Vec<TargetSettings>,
    /// The HTTPS API (`None`: off).
    pub api: Option<ApiSettings>,
    /// The audit log.
    pub audit: crate::audit::AuditSettings,
    /// Syslog of security events (`None`: off).
    pub syslog: Option<SyslogSettings>,
    /// Commands and firmware (`None`: off).
    pub commands: Option<CommandSettings>,
    /// The detectors and their thresholds.
    pub detection: gridward_detect::DetectionConfig,
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
# Rate limit of each meter (kept across its reconnections): sustained packets per second, and
# the burst allowed above it.
rate_per_second = 50.0
rate_burst = 200
# Failed handshakes or CONNECTs, and sessions cut for abuse (rate limit, oversize or malformed
# packets), from one address within ban_window_secs that ban it for ban_duration_secs (0 never
# bans). Exempt addresses (a concentrator, a NAT gateway) are listed.
ban_after_failures = 10
ban_window_secs = 60
ban_duration_secs = 300
ban_exempt = []
# Connections are closed after this many hours, so certificates are re-checked at reconnection.
max_connection_lifetime_hours = 48

[store]
# SQLite database (WAL; every acknowledged reading is durable before its PUBACK).
path = "gridward.db"
# Readings, events and envelopes are encrypted in the database (AES-256-GCM) under data keys
# wrapped by a key-encryption key. The key file is created (mode 0600) with a new database;
# keep a copy apart from the data and its backups: without it nothing can be read.
# Default: the database's path with the extension .key (gridward.key here).
# key_file = "/etc/gridward/keys/gridward.key"
# Or derive the key-encryption key from a passphrase held in this environment variable
# (Argon2id, 64 MiB, 3 passes; the salt is kept in the database) instead of a key file.
# passphrase_env = "GRIDWARD_PASSPHRASE"
# A new data key is started after this many days (`gridward keys rotate` starts one at once).
key_period_days = 30

[ingest]
# A message's signing time may differ from the head-end's clock by this many seconds either way.
max_skew_secs = 300
# Largest document inside an envelope, bytes.
max_document_bytes = 65536
# Most messages per store transaction (batches grow with load, up to this).
batch_size = 1000
# Messages waiting for the store before the endpoint slows down (back-pressure, nothing dropped).
queue_depth = 8192

[api]
# The HTTPS REST API for people and programs (/api/v1; TLS with the server certificate above,
# client certificates optional and checked against the CRLs). "off" disables it.
listen = "127.0.0.1:9443"
# Users, password hashes (Argon2id), TOTP secrets and sessions (`gridward user`).
users = "users.db"

[audit]
# The tamper-evident audit log (`gridward audit verify`, docs/audit-format.md).
path = "audit.db"
# Its Ed25519 signing key for checkpoints, created (mode 0600) if missing.
key = "audit.key"
# The checkpoint origin line and signer name (C2SP signed note); give third parties the
# verifier key from `gridward audit key`.
origin = "gridward.local/audit"
# A signed checkpoint every this many seconds, when the log grew.
checkpoint_secs = 60

[commands]
# Signed commands to meters (disconnect, reconnect, settings, read now, firmware). Signed with
# the command-signer certificate DIR/command-signers/NAME (`gridward pki issue command-signer`),
# never with a TLS key; "off" disables commands. Without that certificate, commands are off
# and the head-end says so at start.
signer = "headend"
# A command not delivered and executed within this many seconds expires.
ttl_secs = 3600
# Kinds that need a second operator's approval (four eyes) when sent to more meters than
# four_eyes_threshold; the proposal waits approval_window_secs.
critical = ["disconnect"]
four_eyes_threshold = 10
approval_window_secs = 1800
# At most this many commands per second go out (a mass action cannot storm the fleet).
dispatch_rate_per_sec = 50.0

[firmware]
# SPKI PEM public keys of the manufacturers whose signed manifests may be uploaded
# (`gridward firmware keygen` writes one); the meters check the same signature themselves.
manufacturers = []

[detection]
# Detectors over what arrives (pure rules, thresholds below): tamper, outage, theft suspicion,
# intrusion. Alarms are kept in the store (`gridward alarms`, /api/v1/alarms); a new critical
# alarm also goes to syslog. false turns detection off.
enabled = true

[detection.outage]
# PowerFail ("last gasp") from this many meters of one group (a concentrator's meters, or a
# [[detection.feeder]]) within window_secs is one outage alarm for the group; fewer are minor
# alarms per meter. The outage clears when clear_share of the failed meters have restored.
min_meters = 3
window_secs = 120
clear_share = 1.0

[detection.theft]
# After a tamper signal, consumption is watched for observe_secs (at least min_observed_secs of
# readings) and compared with the meter's own baseline: the same hours of the previous
# baseline_days days, else its mean rate before the signal; either needs min_baseline_secs of readings.
# Below ratio x baseline is a theft suspicion.
observe_secs = 21600
baseline_days = 7
min_baseline_secs = 7200
ratio = 0.7
min_observed_secs = 3600
# A register that does not advance for stall_secs while its group's median advanced by more
# than stall_min_neighbour_kwh is stalled.
stall_secs = 21600
stall_min_neighbour_kwh = 0.5

[detection.intrusion]
# Refusals (bad signatures, replays, certificate failures, failed logins) within window_secs:
# per_meter naming one meter, per_source from one address, per_user failed logins of one user,
# and fleet-wide max(fleet_min, fleet_factor x the usual count) are bursts. A burst repeats
# into its active alarm at most every repeat_secs.
window_secs = 300
per_meter = 5
per_source = 10
per_user = 5
fleet_min = 100
fleet_factor = 5.0
repeat_secs = 30
# clone_takeovers session takeovers of one meter's certificate from different addresses within
# clone_window_secs: a cloned meter.
clone_takeovers = 3
clone_window_secs = 600
# A meter silent this long after a connection attempt with its revoked certificate.
silence_secs = 3600

# Feeders: groups of meters for outage and stall detection besides concentrators. One section
# per feeder, meters listed and/or by id prefix:
# [[detection.feeder]]
# name = "feeder-7"
# meters = ["m000001", "m000002"]
# prefix = "f7-"

# Security events as RFC 5424 syslog to a SIEM (absent: none).
# [syslog]
# address = "127.0.0.1:514"
# # "udp" (RFC 5426), "tcp" (octet counting, RFC 6587) or "tls" (RFC 5425, needs the two below).
# transport = "udp"
# facility = "auth"
# # server_name = "siem"
# # client = "hes"

# Downstream targets (billing, MDM): every stored reading is queued for each target in the same
# transaction and POSTed as signed JSON over HTTPS with mutual TLS until the target answers 2xx.
# A 4xx other than 408/429 makes it a dead letter (`gridward outbox`, `gridward outbox retry`).
# No [[forward]] section: readings are stored only. One section per target:
#
# [[forward]]
# # Short, stable name: the outbox keeps each target's rows under it.
# name = "billing"
# url = "https://127.0.0.1:8443/readings"
# # Our client certificate: one of this PKI's (DIR/clients/NAME, `gridward pki issue client`);
# # the target's server certificate is checked against this PKI's CA and CRLs.
# client = "hes"
# # ... or files, for a target under another CA (all four together):
# # cert = "client-chain.pem"
# # key = "client-key.pem"
# # ca = ["billing-ca.pem"]
# # crl = ["billing-ca.crl.pem"]
# # RFC 9421 request signatures: the key (PKCS#8 PEM, Ed25519 or P-256; default: the client
# # certificate's key) and the keyid the target knows it by (default: the client name).
# # signing_key = "pki/clients/hes/key.pem"
# # key_id = "hes"
# # Rows read from the outbox at once, and requests in flight (one meter's rows go in order).
# batch_size = 256
# concurrency = 32
# connect_timeout_secs = 5
# request_timeout_secs = 10
# # Each request's signature expires this many seconds after it was made.
# signature_validity_secs = 60
# # "auto" (HTTP/2 or HTTP/1.1 by ALPN), "http1" or "http2".
# http = "auto"
# # Retries: exponential backoff with full jitter, from retry_initial_ms up to retry_max_secs.
# retry_initial_ms = 500
# retry_max_secs = 30
# # Send each reading with the meter's own signed envelope (member "Envelope", base64), so the
# # target can verify the meter's signature itself.
# envelope = false
"#;

impl Config {
    /// Reads and checks `path`; relative paths inside are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let config = Self::parse(&text, path, base)?;
        config.check_store_path(path)?;
        Ok(config)
    }

    /// Opens (creating it, and its key file, if new) the store, encrypted at rest as
    /// `[store]` says (`gridward serve`).
    ///
    /// # Errors
    ///
    /// The store's errors; a missing passphrase variable as [`StoreError::InvalidRequest`].
    ///
    /// [`StoreError::InvalidRequest`]: gridward_store::StoreError::InvalidRequest
    pub fn open_store(&self) -> Result<gridward_store::SqliteStore, gridward_store::StoreError> {
        let source = self
            .store_keys
            .source(true)
            .map_err(gridward_store::StoreError::InvalidRequest)?;
        let store = gridward_store::SqliteStore::open(&self.store_path, source)?;
        store.set_key_period(self.store_keys.period);
        Ok(store)
    }

    /// Opens the existing store (commands that look or change a running head-end's store):
    /// neither the database nor a key file is created.
    ///
    /// # Errors
    ///
    /// As [`Config::open_store`].
    pub fn open_existing_store(
        &self,
    ) -> Result<gridward_store::SqliteStore, gridward_store::StoreError> {
        let source = self
            .store_keys
            .source(false)
            .map_err(gridward_store::StoreError::InvalidRequest)?;
        let store = gridward_store::SqliteStore::open_existing(&self.store_path, source)?;
        store.set_key_period(self.store_keys.period);
        Ok(store)
    }

    /// Checks on disk that the store can be created or opened at `store_path`: its directory
    /// exists, and the path is not a directory itself (`path` names the file in the error).
    pub fn check_store_path(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: "store.path",
            message,
        };
        let store = &self.store_path;
        if store.is_dir() {
            return Err(invalid(format!(
                "{} is a directory; name the database file in it, e.g. {}",
                store.display(),
                store.join("gridward.db").display()
            )));
        }
        let dir = match store.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(invalid(format!(
                "the directory {} of {} does not exist; create it (mkdir -p {}) or choose another path",
                dir.display(),
                store.display(),
                dir.display()
            )));
        }
        Ok(())
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
        let pki_dir = resolve(raw.pki.dir.unwrap_or_else(|| PathBuf::from("pki")));
        let mut forward: Vec<TargetSettings> = Vec::new();
        for (i, f) in raw.forward.into_iter().enumerate() {
            let target = forward_target(f, i, &pki_dir, &resolve, path)?;
            if forward.iter().any(|t| t.name == target.name) {
                return Err(invalid(
                    "forward.name",
                    format!("two targets are named {:?}", target.name),
                ));
            }
            forward.push(target);
        }
        let server_name = raw
            .pki
            .server_name
            .unwrap_or_else(|| "localhost".to_owned());
        if server_name.is_empty() {
            return Err(invalid("pki.server_name", "must not be empty".to_owned()));
        }
        let api = match raw.api.listen.as_deref() {
            Some("off") => None,
            other => {
                let text = other.unwrap_or("127.0.0.1:9443");
                let listen = text.parse().map_err(|e| {
                    invalid(
                        "api.listen",
                        format!("{text:?} is not an address:port or \"off\" ({e})"),
                    )
                })?;
                Some(ApiSettings {
                    listen,
                    users_path: resolve(raw.api.users.unwrap_or_else(|| PathBuf::from("users.db"))),
                })
            }
        };
        let checkpoint_secs = raw.audit.checkpoint_secs.unwrap_or(60);
        if !(1..=86_400).contains(&checkpoint_secs) {
            return Err(invalid(
                "audit.checkpoint_secs",
                format!("{checkpoint_secs} is outside 1..=86400"),
            ));
        }
        let origin = raw
            .audit
            .origin
            .unwrap_or_else(|| "gridward.local/audit".to_owned());
        if origin.is_empty()
            || origin.len() > 128
            || origin.chars().any(|c| c.is_whitespace() || c == '+')
        {
            return Err(invalid(
                "audit.origin",
                format!(
                    "{origin:?}: use 1 to 128 characters, no spaces or '+', e.g. example.org/audit"
                ),
            ));
        }
        let audit = crate::audit::AuditSettings {
            path: resolve(raw.audit.path.unwrap_or_else(|| PathBuf::from("audit.db"))),
            key: resolve(raw.audit.key.unwrap_or_else(|| PathBuf::from("audit.key"))),
            origin,
            checkpoint_interval: Duration::from_secs(checkpoint_secs),
        };
        let syslog = match raw.syslog.address {
            None => None,
            Some(text) => {
                let address = text.parse().map_err(|e| {
                    invalid(
                        "syslog.address",
                        format!("{text:?} is not an IP address:port ({e})"),
                    )
                })?;
                let transport = match raw.syslog.transport.as_deref().unwrap_or("udp") {
                    "udp" => SyslogTransport::Udp,
                    "tcp" => SyslogTransport::Tcp,
                    "tls" => SyslogTransport::Tls {
                        server_name: raw.syslog.server_name.ok_or_else(|| {
                            invalid(
                                "syslog.server_name",
                                "required with transport = \"tls\"".into(),
                            )
                        })?,
                        client: raw.syslog.client.ok_or_else(|| {
                            invalid("syslog.client", "required with transport = \"tls\"".into())
                        })?,
                    },
                    other => {
                        return Err(invalid(
                            "syslog.transport",
                            format!("{other:?}: use \"udp\", \"tcp\" or \"tls\""),
                        ));
                    }
                };
                let facility_text = raw.syslog.facility.unwrap_or_else(|| "auth".to_owned());
                let facility = facility_text
                    .parse()
                    .map_err(|e| invalid("syslog.facility", format!("{e}")))?;
                Some(SyslogSettings {
                    address,
                    transport,
                    facility,
                })
            }
        };
        let commands = match raw.commands.signer.as_deref() {
            Some("off") => None,
            signer => {
                let ttl_secs = raw.commands.ttl_secs.unwrap_or(3600);
                if !(1..=7 * 24 * 3600).contains(&ttl_secs) {
                    return Err(invalid(
                        "commands.ttl_secs",
                        format!("{ttl_secs} is outside 1..=604800"),
                    ));
                }
                let mut critical = Vec::new();
                for k in raw
                    .commands
                    .critical
                    .unwrap_or_else(|| vec!["disconnect".to_owned()])
                {
                    critical.push(k.parse().map_err(|_| {
                        invalid(
                            "commands.critical",
                            format!(
                                "{k:?} is not a command kind ({})",
                                gridward_core::command::CommandKind::ALL
                                    .map(|k| k.as_str())
                                    .join(", ")
                            ),
                        )
                    })?);
                }
                let window = raw.commands.approval_window_secs.unwrap_or(1800);
                if !(1..=7 * 24 * 3600).contains(&window) {
                    return Err(invalid(
                        "commands.approval_window_secs",
                        format!("{window} is outside 1..=604800"),
                    ));
                }
                let rate = raw.commands.dispatch_rate_per_sec.unwrap_or(50.0);
                if !(rate.is_finite() && (0.1..=100_000.0).contains(&rate)) {
                    return Err(invalid(
                        "commands.dispatch_rate_per_sec",
                        format!("{rate} is outside 0.1..=100000"),
                    ));
                }
                Some(CommandSettings {
                    signer: signer.unwrap_or("headend").to_owned(),
                    ttl: Duration::from_secs(ttl_secs),
                    critical,
                    four_eyes_threshold: raw.commands.four_eyes_threshold.unwrap_or(10),
                    approval_window: Duration::from_secs(window),
                    dispatch_rate_per_sec: rate,
                    manufacturers: raw
                        .firmware
                        .manufacturers
                        .unwrap_or_default()
                        .into_iter()
                        .map(resolve)
                        .collect(),
                })
            }
        };
        raw.detection
            .validate()
            .map_err(|e| invalid("detection", e.to_string()))?;
        Ok(Self {
            detection: raw.detection,
            api,
            audit,
            syslog,
            commands,
            pki_dir,
            server_name,
            listen,
            endpoint,
            store_keys: StoreKeys {
                key_file: match raw.store.key_file {
                    Some(p) => resolve(p),
                    None => resolve(
                        raw.store
                            .path
                            .clone()
                            .unwrap_or_else(|| PathBuf::from("gridward.db")),
                    )
                    .with_extension("key"),
                },
                passphrase_env: match raw.store.passphrase_env {
                    Some(v) if v.is_empty() => {
                        return Err(invalid(
                            "store.passphrase_env",
                            "name an environment variable, or remove the key".into(),
                        ));
                    }
                    other => other,
                },
                period: match raw.store.key_period_days {
                    Some(0) => {
                        return Err(invalid(
                            "store.key_period_days",
                            "must be at least 1 (`gridward keys rotate` rotates at once)".into(),
                        ));
                    }
                    Some(d) if d > 3650 => {
                        return Err(invalid(
                            "store.key_period_days",
                            "at most 3650 (ten years)".into(),
                        ));
                    }
                    Some(d) => Duration::from_secs(d * 24 * 3600),
                    None => gridward_store::DEFAULT_KEY_PERIOD,
                },
            },
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
            forward,
        })
    }
}

/// Checks the `index`-th `[[forward]]` section.
fn forward_target(
    f: RawForward,
    index: usize,
    pki_dir: &Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    path: &Path,
) -> Result<TargetSettings, ConfigError> {
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key,
        message: format!("[[forward]] #{}: {message}", index + 1),
    };
    let name = f
        .name
        .ok_or_else(|| invalid("forward.name", "missing".to_owned()))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(
            "forward.name",
            format!("{name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"),
        ));
    }
    let url = f
        .url
        .ok_or_else(|| invalid("forward.url", "missing".to_owned()))?;
    let url = crate::forward::normalize_https_url(&url)
        .map_err(|m| invalid("forward.url", format!("{url:?}: {m}")))?;
    let tls = match (f.client, f.cert, f.key, f.ca, f.crl) {
        (Some(client), None, None, None, None) => {
            if client.is_empty() {
                return Err(invalid("forward.client", "must not be empty".to_owned()));
            }
            TargetTls::Pki {
                dir: pki_dir.to_owned(),
                client,
            }
        }
        (None, Some(cert), Some(key), Some(ca), Some(crl)) if !ca.is_empty() && !crl.is_empty() => {
            TargetTls::Files {
                cert: resolve(cert),
                key: resolve(key),
                ca: ca.into_iter().map(resolve).collect(),
                crl: crl.into_iter().map(resolve).collect(),
            }
        }
        _ => {
            return Err(invalid(
                "forward.client",
                "give either `client` (a client certificate of the PKI) or all of `cert`, `key`, \
                 `ca` and `crl` (non-empty lists)"
                    .to_owned(),
            ));
        }
    };
    let mut t = TargetSettings::new(name, url, tls);
    if let Some(k) = f.signing_key {
        t.signing_key = Some(resolve(k));
    }
    if let Some(id) = f.key_id {
        if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(invalid(
                "forward.key_id",
                format!("{id:?}: use 1 to 256 printable ASCII characters"),
            ));
        }
        t.key_id = id;
    }
    let range = |key: &'static str, v: Option<u64>, default: u64, lo: u64, hi: u64| {
        let v = v.unwrap_or(default);
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(invalid(key, format!("{v} is outside {lo}..={hi}")))
        }
    };
    let d = TargetSettings::new("", "", t.tls.clone());
    t.batch_size = range(
        "forward.batch_size",
        f.batch_size.map(|v| v as u64),
        d.batch_size as u64,
        1,
        10_000,
    )? as usize;
    t.concurrency = range(
        "forward.concurrency",
        f.concurrency.map(|v| v as u64),
        d.concurrency as u64,
        1,
        1024,
    )? as usize;
    t.connect_timeout = Duration::from_secs(range(
        "forward.connect_timeout_secs",
        f.connect_timeout_secs,
        d.connect_timeout.as_secs(),
        1,
        300,
    )?);
    t.request_timeout = Duration::from_secs(range(
        "forward.request_timeout_secs",
        f.request_timeout_secs,
        d.request_timeout.as_secs(),
        1,
        600,
    )?);
    t.signature_validity = Duration::from_secs(range(
        "forward.signature_validity_secs",
        f.signature_validity_secs,
        d.signature_validity.as_secs(),
        1,
        3600,
    )?);
    t.retry_initial = Duration::from_millis(range(
        "forward.retry_initial_ms",
        f.retry_initial_ms,
        500,
        1,
        600_000,
    )?);
    t.retry_max = Duration::from_secs(range(
        "forward.retry_max_secs",
        f.retry_max_secs,
        d.retry_max.as_secs(),
        1,
        86_400,
    )?);
    t.envelope = f.envelope.unwrap_or(false);
    t.http = match f.http.as_deref() {
        None | Some("auto") => HttpVersion::Auto,
        Some("http1") => HttpVersion::Http1,
        Some("http2") => HttpVersion::Http2,
        Some(other) => {
            return Err(invalid(
                "forward.http",
                format!("{other:?}: use \"auto\", \"http1\" or \"http2\""),
            ));
        }
    };
    Ok(t)
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
        assert!(c.forward.is_empty());
    }

    #[test]
    fn forward_targets_are_checked_and_resolved() {
        // The commented example in the default file, uncommented, is a valid target.
        let example: String = DEFAULT_TOML
            .split_once("# [[forward]]")
            .map(|(_, rest)| format!("# [[forward]]{rest}"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("# # "))
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&example).unwrap();
        assert_eq!(c.forward.len(), 1);
        let t = &c.forward[0];
        assert_eq!(t.name, "billing");
        assert_eq!(t.url, "https://127.0.0.1:8443/readings");
        assert_eq!(
            t.tls,
            TargetTls::Pki {
                dir: PathBuf::from("/etc/gridward/pki"),
                client: "hes".into()
            }
        );
        assert_eq!(t.key_id, "hes");
        let d = TargetSettings::new("billing", "https://127.0.0.1:8443/readings", t.tls.clone());
        assert_eq!(*t, d, "the example shows the defaults");

        let c = parse(
            "[[forward]]\nname = \"mdm\"\nurl = \"https://mdm.example:9443/in\"\n\
             cert = \"c.pem\"\nkey = \"k.pem\"\nca = [\"ca.pem\"]\ncrl = [\"ca.crl\"]\n\
             signing_key = \"/keys/sign.pem\"\nkey_id = \"gridward-2026\"\nhttp = \"http1\"\n\
             batch_size = 10\nconcurrency = 2\nretry_initial_ms = 100\nretry_max_secs = 5\n",
        )
        .unwrap();
        let t = &c.forward[0];
        assert_eq!(
            t.tls,
            TargetTls::Files {
                cert: "/etc/gridward/c.pem".into(),
                key: "/etc/gridward/k.pem".into(),
                ca: vec!["/etc/gridward/ca.pem".into()],
                crl: vec!["/etc/gridward/ca.crl".into()],
            }
        );
        assert_eq!(t.signing_key.as_deref(), Some(Path::new("/keys/sign.pem")));
        assert_eq!(t.key_id, "gridward-2026");
        assert_eq!(t.http, HttpVersion::Http1);
        assert_eq!((t.batch_size, t.concurrency), (10, 2));
        assert_eq!(t.retry_initial, Duration::from_millis(100));
        assert_eq!(t.retry_max, Duration::from_secs(5));
    }

    /// Issue 17: `config check` accepted a store in a directory that does not exist, and
    /// `serve` then failed with exit 1 and no key named.
    #[test]
    fn store_path_in_a_missing_directory_is_refused_naming_store_path() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("gridward.toml");
        let load = |store: &str| {
            std::fs::write(&file, format!("[store]\npath = {store:?}\n")).unwrap();
            Config::load(&file)
        };
        let err = load("no/such/dir/gridward.db").unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "store.path",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::create_dir(tmp.path().join("data")).unwrap();
        let err = load("data").unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let ok = load("data/gridward.db").unwrap();
        assert_eq!(ok.store_path, tmp.path().join("data/gridward.db"));
        load("gridward.db").unwrap();
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
        let e = parse("[[forward]]\nname = \"b\"\nurl = \"http://x/\"\nclient = \"hes\"\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "forward.url",
                    ..
                }
            ) && e.to_string().contains("https://"),
            "{e}"
        );
        let e = parse("[[forward]]\nname = \"b\"\nurl = \"https://x/\"\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "forward.client",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(
            "[[forward]]\nname = \"b\"\nurl = \"https://x/\"\nclient = \"hes\"\ncert = \"c.pem\"\n",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "forward.client",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse("[[forward]]\nname = \"b c\"\nurl = \"https://x/\"\nclient = \"hes\"\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "forward.name",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(
            "[[forward]]\nname = \"b\"\nurl = \"https://x/\"\nclient = \"hes\"\nhttp = \"spdy\"\n",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "forward.http",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(
            "[[forward]]\nname = \"b\"\nurl = \"https://x/\"\nclient = \"hes\"\nconcurrency = 0\n",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: "forward.concurrency",
                    ..
                }
            ),
            "{e}"
        );
        for (given, normalized) in [
            (
                "https://billing.example:443/in",
                "https://billing.example/in",
            ),
            ("https://billing.example", "https://billing.example/"),
            (
                "https://127.0.0.1:8443/readings?x=1",
                "https://127.0.0.1:8443/readings?x=1",
            ),
            ("https://[::1]:443/r", "https://[::1]/r"),
        ] {
            let c = parse(&format!(
                "[[forward]]\nname = \"b\"\nurl = \"{given}\"\nclient = \"hes\"\n"
            ))
            .unwrap();
            assert_eq!(c.forward[0].url, normalized, "{given}");
        }
        let two = "[[forward]]\nname = \"b\"\nurl = \"https://x/\"\nclient = \"hes\"\n";
        let e = parse(&format!("{two}{two}")).unwrap_err();
        assert!(e.to_string().contains("two targets"), "{e}");
        let e = Config::load(Path::new("/nonexistent/gridward.toml")).unwrap_err();
        assert!(e.to_string().contains("gridward config init"), "{e}");
    }
}
