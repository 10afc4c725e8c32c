//! The HTTPS client of one target: hyper over rustls with the Gridward TLS profile (TLS 1.3, or
//! 1.2 with ECDHE + AES-GCM; the target's certificate checked against the configured CA and
//! CRLs), our client certificate, HTTP/1.1 or HTTP/2 by ALPN, and the request signing key.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use gridward_core::httpsig::{HttpSigError, HttpSigningKey};
use gridward_pki::tls::{TlsError, TlsMaterial};
use gridward_pki::{LeafKind, Pki, PkiError};
use gridward_store::OutboxItem;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::RngCore;

use super::body::{self, Disposition};
use crate::pipeline::Clock;

/// Most bytes of an answer's body read (for the record of a refusal).
const MAX_ANSWER_BYTES: usize = 4096;
/// Most bytes of an answer kept in a dead letter's reason.
const EXCERPT_BYTES: usize = 200;

/// Why a target cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The head-end's PKI (for a target using one of its client certificates) failed.
    #[error("target {target}: PKI: {source}")]
    Pki {
        /// The target.
        target: String,
        /// What failed.
        source: PkiError,
    },
    /// A certificate, key, CA or CRL file could not be loaded, or rustls refused them.
    #[error("target {target}: TLS: {source}")]
    Tls {
        /// The target.
        target: String,
        /// What failed.
        source: TlsError,
    },
    /// The URL is not an absolute `https://` URL without user info or fragment.
    #[error("target {target}: URL {url:?}: {reason}")]
    Url {
        /// The target.
        target: String,
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The request signing key could not be read or is not an Ed25519 or P-256 PKCS#8 key.
    #[error("target {target}: signing key {}: {reason}", path.display())]
    SigningKey {
        /// The target.
        target: String,
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Which HTTP versions to offer (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersion {
    /// HTTP/2 or HTTP/1.1, as the target prefers.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// Where a target's TLS material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetTls {
    /// A client certificate of the head-end's PKI (`DIR/clients/NAME`), with that PKI's roots
    /// and CRLs to check the target's server certificate.
    Pki {
        /// The PKI directory.
        dir: PathBuf,
        /// The client certificate's name.
        client: String,
    },
    /// Files, for a target under another CA.
    Files {
        /// Our certificate chain (PEM, leaf first).
        cert: PathBuf,
        /// Its private key (PEM, PKCS#8).
        key: PathBuf,
        /// Trust anchors for the target's certificate.
        ca: Vec<PathBuf>,
        /// CRLs of those CAs (revocation is checked, and fails closed).
        crl: Vec<PathBuf>,
    },
}

/// One downstream target, as configured (`[[forward]]` in `gridward.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSettings {
    /// A short name (`billing`), stable: the outbox rows are kept under it.
    pub name: String,
    /// Where readings are `POST`ed: an `https://` URL.
    pub url: String,
    /// Client certificate, trust anchors and CRLs.
    pub tls: TargetTls,
    /// The request signing key (PKCS#8 PEM, Ed25519 or P-256); `None`: the client
    /// certificate's key.
    pub signing_key: Option<PathBuf>,
    /// The `keyid` of the signatures.
    pub key_id: String,
    /// Most rows read from the outbox at once.
    pub batch_size: usize,
    /// Most requests in flight at once (different meters; one meter's rows go one by one).
    pub concurrency: usize,
    /// TCP + TLS connection deadline.
    pub connect_timeout: Duration,
    /// Deadline of one request, answer included.
    pub request_timeout: Duration,
    /// `expires - created` of the signatures.
    pub signature_validity: Duration,
    /// HTTP versions offered.
    pub http: HttpVersion,
    /// First retry delay after a failure (then doubling, with full jitter).
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Whether each reading carries the meter's envelope (`Envelope`, wire-format §7.1).
    pub envelope: bool,
}

impl TargetSettings {
    /// Settings with the defaults for `name` at `url` using `tls`; the key id is the client
    /// certificate's name (or the target's name for file-based TLS).
    pub fn new(name: impl Into<String>, url: impl Into<String>, tls: TargetTls) -> Self {
        let name = name.into();
        let key_id = match &tls {
            TargetTls::Pki { client, .. } => client.clone(),
            TargetTls::Files { .. } => name.clone(),
        };
        Self {
            name,
            url: url.into(),
            tls,
            signing_key: None,
            key_id,
            batch_size: 256,
            concurrency: 32,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            signature_validity: Duration::from_secs(60),
            http: HttpVersion::Auto,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            envelope: false,
        }
    }

    /// Normalises the URL (see [`normalize_https_url`]), loads the TLS material and the
    /// signing key, and builds the client.
    pub fn load(mut self) -> Result<LoadedTarget, ForwardError> {
        self.url = normalize_https_url(&self.url).map_err(|reason| ForwardError::Url {
            target: self.name.clone(),
            url: self.url.clone(),
            reason,
        })?;
        let client = HttpsClient::load(&self)?;
        Ok(LoadedTarget {
            settings: self,
            client,
        })
    }
}

/// A target with its client, ready for [`Forwarders::start`](super::Forwarders::start).
#[derive(Debug)]
pub struct LoadedTarget {
    /// The settings.
    pub settings: TargetSettings,
    /// The client built from them.
    pub client: HttpsClient,
}

/// An HTTPS client for one target, with its signing key.
pub struct HttpsClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    key: HttpSigningKey,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("key_id", &self.key.key_id())
            .finish_non_exhaustive()
    }
}

impl HttpsClient {
    /// Reads the material `settings` names and builds a client.
    pub fn load(settings: &TargetSettings) -> Result<Self, ForwardError> {
        let target = || settings.name.clone();
        let (material, key_path) = match &settings.tls {
            TargetTls::Pki { dir, client } => {
                let pki = Pki::open(dir, None).map_err(|source| ForwardError::Pki {
                    target: target(),
                    source,
                })?;
                let m = pki
                    .tls_material(LeafKind::Client, client)
                    .map_err(|source| ForwardError::Pki {
                        target: target(),
                        source,
                    })?;
                (m, dir.join("clients").join(client).join("key.pem"))
            }
            TargetTls::Files { cert, key, ca, crl } => (
                TlsMaterial::from_pem_files(cert, key, ca, crl).map_err(|source| {
                    ForwardError::Tls {
                        target: target(),
                        source,
                    }
                })?,
                key.clone(),
            ),
        };
        let key_path = settings.signing_key.clone().unwrap_or(key_path);
        let key = load_signing_key(&key_path, &settings.key_id).map_err(|reason| {
            ForwardError::SigningKey {
                target: target(),
                path: key_path.clone(),
                reason,
            }
        })?;
        let tls =
            gridward_pki::tls::client_config(&material).map_err(|source| ForwardError::Tls {
                target: target(),
                source,
            })?;
        let mut tls = (*tls).clone();
        // The connector sets ALPN from the enabled versions.
        tls.alpn_protocols.clear();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only();
        let connector = match settings.http {
            HttpVersion::Auto => builder.enable_http1().enable_http2().wrap_connector(http),
            HttpVersion::Http1 => builder.enable_http1().wrap_connector(http),
            HttpVersion::Http2 => builder.enable_http2().wrap_connector(http),
        };
        let mut client = Client::builder(TokioExecutor::new());
        client
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(settings.concurrency.max(1));
        if settings.http == HttpVersion::Http2 {
            client.http2_only(true);
        }
        Ok(Self {
            inner: client.build(connector),
            key,
        })
    }

    /// Sends `item` once, signed now, and classifies the answer.
    pub async fn send(
        &self,
        settings: &TargetSettings,
        item: &OutboxItem,
        clock: &Clock,
    ) -> Disposition {
        match tokio::time::timeout(
            settings.request_timeout,
            self.try_send(settings, item, clock),
        )
        .await
        {
            Ok(d) => d,
            Err(_) => Disposition::Retry(format!(
                "no answer within {} s",
                settings.request_timeout.as_secs_f64()
            )),
        }
    }

    async fn try_send(
        &self,
        settings: &TargetSettings,
        item: &OutboxItem,
        clock: &Clock,
    ) -> Disposition {
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let signed = match body::signed_request(
            &settings.url,
            &self.key,
            item,
            settings.envelope,
            clock(),
            settings.signature_validity,
            hex::encode(nonce),
        ) {
            Ok(s) => s,
            Err(e) => return Disposition::Retry(format!("cannot sign: {e}")),
        };
        let mut request = hyper::Request::post(settings.url.as_str());
        for (name, value) in &signed.headers {
            request = request.header(*name, value.as_str());
        }
        let request = match request.body(Full::new(Bytes::from(signed.body))) {
            Ok(r) => r,
            Err(e) => return Disposition::Retry(format!("cannot build the request: {e}")),
        };
        let response = match self.inner.request(request).await {
            Ok(r) => r,
            Err(e) => return Disposition::Retry(error_chain(&e)),
        };
        let status = response.status().as_u16();
        let answer = match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        body::classify(status, &body::excerpt(&answer, EXCERPT_BYTES))
    }
}

/// A signing key from a PKCS#8 PEM file.
fn load_signing_key(path: &std::path::Path, key_id: &str) -> Result<HttpSigningKey, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    HttpSigningKey::from_pkcs8_pem(&pem, key_id).map_err(|e: HttpSigError| e.to_string())
}

/// An error and its sources on one line (hyper's own message is often just "client error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Checks that `url` is an absolute `https://host[:port]/path` URL without user info or
/// fragment, and returns it as the request will carry it: without the default port 443 (an
/// HTTP/1.1 client sends `Host: host` then, and the receiver rebuilds the signed `@target-uri`
/// from it) and with `/` for an empty path.
pub fn normalize_https_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("https") {
        return Err("must start with https:// (deliveries are always over TLS)".to_owned());
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".to_owned());
    };
    if authority.as_str().contains('@') {
        return Err("must not contain user info".to_owned());
    }
    if url.contains('#') {
        return Err("must not contain a fragment".to_owned());
    }
    let host = authority.host();
    let port = match authority.port_u16() {
        None | Some(443) => String::new(),
        Some(p) => format!(":{p}"),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok(format!("https://{host}{port}{path}"))
}
