//! [`SinkConfig`]: everything a sink needs, loaded and checked before it starts: the TLS
//! material, the signers' keys ([`Keys`]), the store's path, the request [`Rules`] and the
//! limits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gridward_core::httpsig::{HttpVerifyingKey, KeyLookup};
use gridward_pki::tls::TlsMaterial;
use gridward_pki::{LeafKind, Pki};
use time::OffsetDateTime;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::SinkError;
use crate::check::Rules;

/// Where the sink reads the time: signature freshness, nonce expiry, `received_at`.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(OffsetDateTime::now_utc)
}

/// The address `gridward sink` listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// The server certificate's name in the PKI unless told otherwise (`DIR/servers/sink/`).
pub const DEFAULT_SERVER_NAME: &str = "sink";

/// The signers' public keys by key id (the `keyid` of their signatures).
#[derive(Debug, Clone, Default)]
pub struct Keys(BTreeMap<String, HttpVerifyingKey>);

impl Keys {
    /// No keys (a sink refuses to start without one).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` under its key id; returns false (and keeps the first) if the id is taken.
    pub fn insert(&mut self, key: HttpVerifyingKey) -> bool {
        match self.0.entry(key.key_id().to_owned()) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(key);
                true
            }
        }
    }

    /// Reads the key of `key_id` from a PEM file: a certificate (`gridward pki issue client`
    /// writes `DIR/clients/NAME/cert.pem`), a public key, or a PKCS#8 private key (only its
    /// public half is kept); Ed25519 or P-256.
    ///
    /// # Errors
    ///
    /// [`SinkError::Key`].
    pub fn load(key_id: &str, path: &Path) -> Result<HttpVerifyingKey, SinkError> {
        let bad = |reason: String| SinkError::Key {
            key_id: key_id.to_owned(),
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        HttpVerifyingKey::from_pem(&pem, key_id).map_err(|e| bad(e.to_string()))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl KeyLookup for Keys {
    fn key(&self, key_id: &str) -> Option<HttpVerifyingKey> {
        self.0.get(key_id).cloned()
    }
}

/// Everything a sink needs. [`SinkConfig::new`] fills in the defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct SinkConfig {
    /// Where to listen (`127.0.0.1:0` picks a free port; see `RunningSink::local_addr`).
    pub listen: SocketAddr,
    /// The server certificate, its key, and the trust anchors and CRLs client certificates
    /// are checked against (see [`tls_from_pki`]).
    pub tls: TlsMaterial,
    /// The signers' keys; at least one.
    pub keys: Keys,
    /// The SQLite database (created if absent).
    pub store: PathBuf,
    /// Path, body limit, signature age and skew.
    pub rules: Rules,
    /// Most connections at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Most concurrent requests (HTTP/2 streams) on one connection.
    pub max_streams: u32,
    /// Deadline of the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline of a request's header (HTTP/1.1), counted from when the connection waits for
    /// it: an HTTP/1.1 keep-alive connection idle this long is closed too.
    pub header_timeout: Duration,
    /// Deadline of a request's body.
    pub body_timeout: Duration,
    /// The clock.
    pub clock: Clock,
}

impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConfig")
            .field("listen", &self.listen)
            .field("keys", &self.keys)
            .field("store", &self.store)
            .field("rules", &self.rules)
            .field("max_connections", &self.max_connections)
            .field("max_streams", &self.max_streams)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

impl SinkConfig {
    /// A configuration with the defaults: [`Rules::default`] (path `/readings`, 64 KiB bodies,
    /// signatures at most 300 s old), 256 connections, 32 streams per connection, 10 s for the
    /// handshake and the header, 30 s for the body, the system clock.
    pub fn new(listen: SocketAddr, tls: TlsMaterial, keys: Keys, store: PathBuf) -> Self {
        Self {
            listen,
            tls,
            keys,
            store,
            rules: Rules::default(),
            max_connections: 256,
            max_streams: 32,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            clock: system_clock(),
        }
    }
}

/// The TLS material of server certificate `name` in the PKI at `dir` (`DIR/servers/NAME/`):
/// client certificates must chain to that PKI's root (or a certificate in `DIR/trusted/`),
/// and are checked against its CRLs. `extra_ca` adds trust anchors from PEM files, for clients
/// under another CA; `extra_crl` adds the CRLs of that CA (without them its certificates are
/// refused: revocation fails closed).
///
/// # Errors
///
/// [`SinkError::Pki`], [`SinkError::TrustFile`].
pub fn tls_from_pki(
    dir: &Path,
    name: &str,
    extra_ca: &[PathBuf],
    extra_crl: &[PathBuf],
) -> Result<TlsMaterial, SinkError> {
    let pki = Pki::open(dir, None)?;
    let mut material = pki.tls_material(LeafKind::Server, name)?;
    for path in extra_ca {
        material
            .roots
            .extend(read_pem::<CertificateDer<'static>>(path, "CERTIFICATE")?);
    }
    for path in extra_crl {
        material
            .crls
            .extend(read_pem::<CertificateRevocationListDer<'static>>(
                path, "X509 CRL",
            )?);
    }
    Ok(material)
}

/// Every `what` block of a PEM file; at least one.
fn read_pem<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, SinkError> {
    let bad = |reason: String| SinkError::TrustFile {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let items = T::pem_slice_iter(&bytes)
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| bad(format!("malformed PEM: {e}")))?;
    if items.is_empty() {
        return Err(bad(format!("no {what} PEM block")));
    }
    Ok(items)
}
