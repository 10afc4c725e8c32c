//! Man-in-the-middle: a rogue server, a rogue client, or a weakened TLS.
//!
//! 1. A rogue head-end: a TLS server on the path presenting a certificate for the target's own
//!    name, issued by a rogue CA with the same names as the real one (other keys), and by a
//!    foreign CA. The genuine meter code (`gridward_meter` identity,
//!    `gridward_mqtt::client::connect_tls`) must refuse it (bad signature, unknown issuer) and
//!    never send it a byte of MQTT. The refusal happens in the meter, so its trace is the
//!    meter's error: there is no head-end event for it.
//! 2. A captured meter posing as the head-end: a server presenting a genuine meter certificate
//!    of the real CA (wrong purpose, wrong name) is refused by the meter the same way.
//! 3. A rogue client: a certificate for a real meter id from either rogue CA is refused by the
//!    head-end, event `certificate_untrusted`.
//! 4. Protocol and cipher-suite probes: hand-made ClientHello messages (no TLS library sends
//!    these) offering only SSLv3, TLS 1.0, TLS 1.1, RSA key exchange, CBC, ChaCha20-Poly1305,
//!    NULL, export, RC4 or 3DES suites, DEFLATE compression, or TLS 1.2 without the extended
//!    master secret, each from a fresh source. The
//!    server must answer with a fatal alert (or close), never a ServerHello, and record
//!    `tls_handshake_failed`. Each hello is otherwise complete (SNI, groups, point formats,
//!    signature algorithms, extended master secret) so the protocol or suite is the only reason
//!    to refuse; two positive controls, the same hello with an allowed TLS 1.2 ECDHE-AES-GCM
//!    suite and a TLS 1.3 hello with AES-GCM, must get a ServerHello, or the refusals prove
//!    nothing (and fail with them).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gridward_core::MeterId;
use gridward_meter::identity::{MeterIdentity, Trust};
use gridward_mqtt::client::{ClientError, ClientOptions, Protocol, connect_tls};
use gridward_pki::tls::{TlsMaterial, TlsOptions};
use gridward_pki::{InitOptions, IssueOptions, Pki};
use gridward_store::StoredSecurityEvent;
use rustls::{CertificateError, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx, EVENT_WAIT};

/// The scenario's name.
pub const NAME: &str = "mitm";

/// How long a probe waits for the server's answer to its ClientHello.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = Vec::new();
    for ca in [RogueCa::SameNames, RogueCa::Foreign] {
        let case = format!(
            "a rogue head-end: the target's name, a certificate from {}",
            ca.describe()
        );
        checks.push(
            rogue_server(ctx, &case, ca)
                .await
                .unwrap_or_else(|e| Check::broken(NAME, case, e)),
        );
    }
    const CAPTURED: &str = "a captured meter's genuine certificate posing as the head-end";
    checks.push(
        captured_meter_as_server(ctx, CAPTURED)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, CAPTURED, e)),
    );
    for ca in [RogueCa::SameNames, RogueCa::Foreign] {
        let case = format!(
            "a client certificate for a real meter id from {}",
            ca.describe()
        );
        checks.push(
            rogue_client(ctx, &case, ca)
                .await
                .unwrap_or_else(|e| Check::broken(NAME, case, e)),
        );
    }
    checks.extend(probes(ctx).await);
    checks
}

/// The attacker's CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RogueCa {
    /// [`Ctx::rogue_pki`]: the real CA's names, other keys.
    SameNames,
    /// A CA of its own, other names and keys.
    Foreign,
}

impl RogueCa {
    fn describe(self) -> &'static str {
        match self {
            Self::SameNames => "a rogue CA with the real CA's names",
            Self::Foreign => "a foreign CA",
        }
    }

    /// The CA's PKI directory, created on first use.
    fn dir(self, ctx: &Ctx) -> Result<PathBuf, AttackError> {
        match self {
            Self::SameNames => ctx.rogue_pki(),
            Self::Foreign => {
                let dir = ctx.work().join("mitm-foreign-ca");
                if !dir.join("ca").exists() {
                    let mut opts = InitOptions::new("gridward-attack", OffsetDateTime::now_utc());
                    opts.org = "Mallory Metering".to_owned();
                    Pki::init(&dir, &opts)?;
                }
                Ok(dir)
            }
        }
    }

    /// Issues (again) a server certificate for the target's name in this CA; its files.
    fn server(self, ctx: &Ctx) -> Result<Creds, AttackError> {
        let dir = self.dir(ctx)?;
        let name = &ctx.target.server_name;
        if self == Self::Foreign {
            let mut opts = IssueOptions::new("gridward-attack");
            opts.replace = true;
            let sans = [name.clone(), "127.0.0.1".to_owned()];
            Pki::open(&dir, None)?.issue_server(name, &sans, &opts, OffsetDateTime::now_utc())?;
        }
        Ok(Creds::in_pki(&dir, "servers", name))
    }

    /// Issues (again) a meter certificate for `id` in this CA; its files.
    fn meter(self, ctx: &Ctx, id: &str) -> Result<Creds, AttackError> {
        let dir = self.dir(ctx)?;
        let mut opts = IssueOptions::new("gridward-attack");
        opts.replace = true;
        Pki::open(&dir, None)?.issue_meter(&MeterId::new(id)?, &opts, OffsetDateTime::now_utc())?;
        Ok(Creds::in_pki(&dir, "meters", id))
    }
}

// ---------------------------------------------------------------------------------------------
// 1 and 2: servers the meter must refuse.

/// What a server on the attacker's side saw of one connection.
#[derive(Debug)]
struct ServerSide {
    /// How its handshake ended (`Ok` if it completed).
    handshake: Result<(), String>,
    /// Application data it decrypted (a meter's CONNECT, if it got that far).
    received: Vec<u8>,
}

impl ServerSide {
    fn describe(&self) -> String {
        let hs = match &self.handshake {
            Ok(()) => "its handshake completed".to_owned(),
            Err(e) => format!("its handshake failed ({e})"),
        };
        format!("{hs}, {} MQTT byte(s) received", self.received.len())
    }
}

/// A TLS server on 127.0.0.1:0 presenting `material`'s chain to anyone (no client
/// authentication, as an attacker would run it), with the Gridward suites so that only the
/// certificate can be the reason for a refusal.
async fn attacker_server(material: TlsMaterial) -> Result<(TcpListener, TlsAcceptor), AttackError> {
    let config = ServerConfig::builder_with_provider(gridward_pki::tls::provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth()
                .with_single_cert(material.chain, material.key)
        })
        .map_err(|e| AttackError::Setup(format!("the attacker's server: {e}")))?;
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| AttackError::Setup(format!("the attacker's listener: {e}")))?;
    Ok((listener, TlsAcceptor::from(Arc::new(config))))
}

/// Accepts one connection and records what the TLS server gets out of it.
async fn serve_once(listener: &TcpListener, acceptor: &TlsAcceptor) -> ServerSide {
    let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
    let tcp = match accepted {
        Ok(Ok((tcp, _))) => tcp,
        Ok(Err(e)) => {
            return ServerSide {
                handshake: Err(format!("accept: {e}")),
                received: Vec::new(),
            };
        }
        Err(_) => {
            return ServerSide {
                handshake: Err("nobody connected".to_owned()),
                received: Vec::new(),
            };
        }
    };
    let mut tls = match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return ServerSide {
                handshake: Err(e.to_string()),
                received: Vec::new(),
            };
        }
        Err(_) => {
            return ServerSide {
                handshake: Err("timed out".to_owned()),
                received: Vec::new(),
            };
        }
    };
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
        match buf.get(..n) {
            Some(data) if n > 0 => received.extend_from_slice(data),
            _ => break,
        }
    }
    ServerSide {
        handshake: Ok(()),
        received,
    }
}

/// A genuine meter (`x-{name}` of the target's PKI) as `gridward-meter` loads it: its own
/// certificate, the target's root and CRLs, the Gridward profile.
fn genuine_meter(ctx: &Ctx, name: &str) -> Result<MeterIdentity, AttackError> {
    let creds = ctx.attack_meter(name)?;
    let dir = &ctx.target.pki_dir;
    let trust = Trust::load(dir).map_err(|e| AttackError::Setup(e.to_string()))?;
    MeterIdentity::load(dir, &MeterId::new(&creds.id)?, &trust, &TlsOptions::new())
        .map_err(|e| AttackError::Setup(e.to_string()))
}

/// The genuine meter `meter` connects (TLS, then CONNECT) to a server presenting `material`
/// under the target's name; returns the meter's result and what the server saw.
async fn meter_meets(
    ctx: &Ctx,
    meter: &MeterIdentity,
    material: TlsMaterial,
) -> Result<(Result<(), ClientError>, ServerSide), AttackError> {
    let (listener, acceptor) = attacker_server(material).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let mut opts = ClientOptions::new(meter.id().as_str());
    opts.protocol = Protocol::V5;
    opts.connect_timeout = Duration::from_secs(4);
    let (server, client) = tokio::join!(
        serve_once(&listener, &acceptor),
        connect_tls(
            addr,
            &ctx.target.server_name,
            Arc::clone(meter.client_config()),
            &opts
        ),
    );
    Ok((client.map(|_| ()), server))
}

fn describe_client(r: &Result<(), ClientError>) -> String {
    match r {
        Ok(()) => "the meter connected and got a CONNACK".to_owned(),
        Err(e) => match e.tls_error() {
            Some(t) => format!("the meter refused: {t}"),
            None => format!("the meter failed: {e}"),
        },
    }
}

async fn rogue_server(ctx: &Ctx, case: &str, ca: RogueCa) -> Result<Check, AttackError> {
    let server = ca.server(ctx)?;
    let material = TlsMaterial::from_pem_files(&server.chain, &server.key, &[], &[])?;
    let meter = genuine_meter(ctx, "mitm-meter")?;
    let (client, server) = meter_meets(ctx, &meter, material).await?;
    let error = client.as_ref().err().and_then(ClientError::tls_error);
    // A foreign CA is unknown. A CA with the real one's names is found by name and then fails
    // on its key: webpki reports a bad signature (or an unknown issuer, as older versions did).
    let (untrusted, expected) = match ca {
        RogueCa::Foreign => (
            matches!(
                error,
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "refused by the meter (unknown issuer); no MQTT byte reaches the rogue server",
        ),
        RogueCa::SameNames => (
            matches!(
                error,
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                ))
            ),
            "refused by the meter (issuer not trusted: bad signature or unknown issuer); no \
             MQTT byte reaches the rogue server",
        ),
    };
    Ok(Check::new(NAME, case, expected)
        .observed(format!(
            "{}; rogue server: {}; the meter's error is the trace (no head-end is involved)",
            describe_client(&client),
            server.describe()
        ))
        .pass(untrusted && server.received.is_empty()))
}

async fn captured_meter_as_server(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let captured = ctx.attack_meter("mitm-captured")?;
    let material = TlsMaterial::from_pem_files(&captured.chain, &captured.key, &[], &[])?;
    let meter = genuine_meter(ctx, "mitm-meter")?;
    let (client, server) = meter_meets(ctx, &meter, material).await?;
    // A meter certificate has the client-auth EKU and no DNS name: either refusal will do.
    let refused_cert = matches!(
        client.as_ref().err().and_then(ClientError::tls_error),
        Some(rustls::Error::InvalidCertificate(_))
    );
    Ok(Check::new(
        NAME,
        case,
        "refused by the meter (not a server certificate for that name); no MQTT byte sent",
    )
    .observed(format!(
        "{}; attacker's server: {}; the meter's error is the trace",
        describe_client(&client),
        server.describe()
    ))
    .pass(refused_cert && server.received.is_empty()))
}

// ---------------------------------------------------------------------------------------------
// 3: a client the head-end must refuse.

async fn rogue_client(ctx: &Ctx, case: &str, ca: RogueCa) -> Result<Check, AttackError> {
    // The id is a real meter's of the target (issued there), so only the issuer is wrong.
    let victim = ctx.attack_meter("mitm-victim")?;
    let creds = ca.meter(ctx, &victim.id)?;
    // It trusts the real CA, so that it accepts the real head-end: only its own certificate
    // can be the reason for a refusal.
    let config = ctx.client_config_trusting(&creds, &ctx.target.pki_dir)?;
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let result = ctx
        .mqtt_from(source, config, &victim.id, Protocol::V5)
        .await;
    let observed = match &result {
        Ok((_, ack)) => format!("CONNACK {:#04x}: connected", ack.code),
        Err(e) => match e.tls_error() {
            Some(t) => format!("refused: {t}"),
            None => format!("refused: {e}"),
        },
    };
    Ok(refusal_from(
        ctx,
        NAME,
        case,
        "certificate_untrusted",
        source,
        before,
        result.is_err(),
        observed,
    )
    .await)
}

// ---------------------------------------------------------------------------------------------
// Events by source (shared with `eavesdropping`).

/// Waits (up to [`EVENT_WAIT`]) for a security event after `after` with `reason` whose source
/// is `source` (any port): with a fresh source per case, it is this case's event and no other.
pub(crate) async fn event_from(
    ctx: &Ctx,
    after: i64,
    reason: &str,
    source: IpAddr,
) -> Option<StoredSecurityEvent> {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        let found = ctx
            .events_after(after)
            .into_iter()
            .find(|e| e.event.reason == reason && from_source(e, source));
        if found.is_some() || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn from_source(e: &StoredSecurityEvent, source: IpAddr) -> bool {
    e.event
        .source
        .as_deref()
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .is_some_and(|a| a.ip() == source)
}

/// Like [`Ctx::refusal`], but the event must come from `source`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn refusal_from(
    ctx: &Ctx,
    scenario: &'static str,
    case: impl Into<String>,
    reason: &str,
    source: IpAddr,
    before: i64,
    refused: bool,
    observed: impl Into<String>,
) -> Check {
    let event = event_from(ctx, before, reason, source).await;
    let mut observed = observed.into();
    match &event {
        Some(e) => observed.push_str(&format!("; event {} from {source}", e.event.reason)),
        None => {
            let others: Vec<String> = ctx
                .events_after(before)
                .iter()
                .filter(|e| from_source(e, source))
                .map(|e| e.event.reason.clone())
                .collect();
            observed.push_str(&format!(
                "; no {reason} event from {source} (its events: {others:?})"
            ));
        }
    }
    Check::new(scenario, case, format!("refused, event {reason}"))
        .observed(observed)
        .pass(refused && event.is_some())
        .event(event.map(|e| e.id))
}

// ---------------------------------------------------------------------------------------------
// 4: protocol and suite probes.

/// TLS 1.2 suites of the Gridward profile (ECDHE + AES-GCM), ECDSA and RSA certificates.
const ALLOWED_12: &[u16] = &[0xc02b, 0xc02c, 0xc02f, 0xc030];
/// What a TLS 1.0/1.1 client offers: the allowed AEAD suites (so the version is the only
/// reason to refuse) and the CBC suites it could actually use.
const LEGACY: &[u16] = &[
    0xc02b, 0xc02f, 0xc009, 0xc013, 0xc00a, 0xc014, 0x002f, 0x0035,
];
/// Static RSA key exchange (no forward secrecy).
const RSA_KX: &[u16] = &[0x009c, 0x009d, 0x003c, 0x002f, 0x0035];
/// ECDHE with CBC (SHA-1 and SHA-2 MACs), for ECDSA and RSA certificates, and DHE-RSA-CBC.
const CBC: &[u16] = &[
    0xc009, 0xc00a, 0xc023, 0xc024, 0xc013, 0xc014, 0xc027, 0xc028, 0x0033, 0x0067,
];
/// ECDHE with ChaCha20-Poly1305: sound, but not in the profile.
const CHACHA_12: &[u16] = &[0xcca9, 0xcca8];
/// NULL encryption.
const NULL: &[u16] = &[0xc006, 0xc010, 0x003b, 0x0002, 0x0001];
/// Export-grade (40/56-bit) suites.
const EXPORT: &[u16] = &[0x0003, 0x0006, 0x0008, 0x0014, 0x0062, 0x0064];
/// RC4.
const RC4: &[u16] = &[0xc007, 0xc011, 0x0005, 0x0004];
/// 3DES.
const TRIPLE_DES: &[u16] = &[0xc008, 0xc012, 0x000a, 0x0016];
/// TLS 1.3 AES-GCM suites (allowed).
const ALLOWED_13: &[u16] = &[0x1301, 0x1302];
/// TLS 1.3 ChaCha20-Poly1305 (not in the profile).
const CHACHA_13: &[u16] = &[0x1303];

/// One ClientHello.
#[derive(Debug, Clone, Copy)]
struct Hello {
    /// Version in the record header.
    record_version: u16,
    /// `legacy_version` (`client_version`) of the hello.
    version: u16,
    suites: &'static [u16],
    compression: &'static [u8],
    /// Adds `supported_versions` (TLS 1.3 only) and a `key_share` (x25519).
    tls13: bool,
    /// Offers extended_master_secret (RFC 7627).
    ems: bool,
}

impl Hello {
    const fn tls12(suites: &'static [u16]) -> Self {
        Self {
            record_version: 0x0301,
            version: 0x0303,
            suites,
            compression: &[0],
            tls13: false,
            ems: true,
        }
    }

    const fn legacy(version: u16) -> Self {
        Self {
            record_version: if version < 0x0301 { version } else { 0x0301 },
            version,
            suites: LEGACY,
            compression: &[0],
            tls13: false,
            ems: true,
        }
    }

    const fn tls13(suites: &'static [u16]) -> Self {
        Self {
            record_version: 0x0301,
            version: 0x0303,
            suites,
            compression: &[0],
            tls13: true,
            ems: true,
        }
    }
}

/// Whether a probe depends on the TLS 1.2 or the TLS 1.3 control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Tls12,
    Tls13,
}

fn push_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends `body` preceded by its length in `width` bytes (1, 2 or 3).
fn push_vec(out: &mut Vec<u8>, width: usize, body: &[u8]) {
    let len = (body.len() as u32).to_be_bytes();
    out.extend_from_slice(len.get(4 - width..).unwrap_or(&len));
    out.extend_from_slice(body);
}

fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    push_u16(out, kind);
    push_vec(out, 2, body);
}

/// A complete ClientHello record for `server_name` (SNI only for DNS names).
fn client_hello(server_name: &str, h: &Hello) -> Vec<u8> {
    let mut random = [0u8; 32];
    let mut session = [0u8; 32];
    let mut share = [0u8; 32];
    let mut rng = rand::thread_rng();
    rand::RngCore::fill_bytes(&mut rng, &mut random);
    rand::RngCore::fill_bytes(&mut rng, &mut session);
    rand::RngCore::fill_bytes(&mut rng, &mut share);

    let mut ext = Vec::new();
    if server_name.parse::<IpAddr>().is_err() {
        let mut entry = vec![0u8]; // host_name
        push_vec(&mut entry, 2, server_name.as_bytes());
        let mut list = Vec::new();
        push_vec(&mut list, 2, &entry);
        extension(&mut ext, 0x0000, &list);
    }
    // supported_groups: x25519, secp256r1, secp384r1.
    let mut groups = Vec::new();
    for g in [0x001du16, 0x0017, 0x0018] {
        push_u16(&mut groups, g);
    }
    let mut body = Vec::new();
    push_vec(&mut body, 2, &groups);
    extension(&mut ext, 0x000a, &body);
    // ec_point_formats: uncompressed.
    extension(&mut ext, 0x000b, &[1, 0]);
    // signature_algorithms: ECDSA P-256/P-384, RSA-PSS, RSA PKCS#1, Ed25519.
    let mut algs = Vec::new();
    for a in [
        0x0403u16, 0x0503, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0807,
    ] {
        push_u16(&mut algs, a);
    }
    let mut body = Vec::new();
    push_vec(&mut body, 2, &algs);
    extension(&mut ext, 0x000d, &body);
    // extended_master_secret (the profile requires it for TLS 1.2).
    if h.ems {
        extension(&mut ext, 0x0017, &[]);
    }
    // renegotiation_info: initial handshake.
    extension(&mut ext, 0xff01, &[0]);
    if h.tls13 {
        // supported_versions: TLS 1.3 only.
        extension(&mut ext, 0x002b, &[2, 0x03, 0x04]);
        // psk_key_exchange_modes: psk_dhe_ke.
        extension(&mut ext, 0x002d, &[1, 1]);
        // key_share: one x25519 share.
        let mut entry = Vec::new();
        push_u16(&mut entry, 0x001d);
        push_vec(&mut entry, 2, &share);
        let mut body = Vec::new();
        push_vec(&mut body, 2, &entry);
        extension(&mut ext, 0x0033, &body);
    }

    let mut hello = Vec::new();
    push_u16(&mut hello, h.version);
    hello.extend_from_slice(&random);
    push_vec(&mut hello, 1, &session);
    let mut suites = Vec::new();
    for s in h.suites {
        push_u16(&mut suites, *s);
    }
    push_vec(&mut hello, 2, &suites);
    push_vec(&mut hello, 1, h.compression);
    push_vec(&mut hello, 2, &ext);

    let mut handshake = vec![1u8]; // client_hello
    push_vec(&mut handshake, 3, &hello);
    let mut record = vec![22u8]; // handshake
    push_u16(&mut record, h.record_version);
    push_vec(&mut record, 2, &handshake);
    record
}

/// The server's answer to a ClientHello, from its first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A ServerHello choosing `suite`.
    ServerHello { suite: u16 },
    /// Another handshake message first.
    Handshake(u8),
    /// An alert.
    Alert { level: u8, description: u8 },
    /// A record of another content type.
    Record(u8),
    /// Bytes that are not a TLS record.
    NotTls(Vec<u8>),
    /// The connection closed without a byte.
    Closed,
    /// Nothing within the wait.
    Silent,
}

impl Answer {
    /// A refusal: a fatal alert, or a close without a byte.
    pub(crate) fn refusal(&self) -> bool {
        matches!(self, Self::Alert { level: 2, .. } | Self::Closed)
    }
}

pub(crate) fn alert_name(d: u8) -> &'static str {
    match d {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => "unknown",
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ServerHello { suite } => write!(f, "ServerHello (suite {suite:#06x})"),
            Self::Handshake(t) => write!(f, "handshake message type {t}"),
            Self::Alert { level, description } => write!(
                f,
                "{} alert {} ({description})",
                if *level == 2 { "fatal" } else { "warning" },
                alert_name(*description)
            ),
            Self::Record(t) => write!(f, "a record of content type {t}"),
            Self::NotTls(b) => write!(f, "non-TLS bytes {}", hex::encode(b)),
            Self::Closed => f.write_str("connection closed without a byte"),
            Self::Silent => f.write_str("no answer"),
        }
    }
}

/// The records of `bytes` as (content type, payload); a trailing partial record is left out.
pub(crate) fn records(bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let [ct, _, _, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(payload) = tail.get(..len) else {
            break;
        };
        out.push((*ct, payload));
        rest = tail.get(len..).unwrap_or_default();
    }
    out
}

/// The answer in the server's first record.
pub(crate) fn first_answer(bytes: &[u8]) -> Option<Answer> {
    let (ct, payload) = records(bytes).into_iter().next()?;
    Some(match (ct, payload) {
        (21, [level, description, ..]) => Answer::Alert {
            level: *level,
            description: *description,
        },
        (22, [2, body @ ..]) => {
            // length (3), legacy_version (2), random (32), session id, cipher suite.
            let suite = body
                .get(37)
                .map(|n| 38 + usize::from(*n))
                .and_then(|at| body.get(at..at + 2))
                .and_then(|s| <[u8; 2]>::try_from(s).ok())
                .map_or(0, u16::from_be_bytes);
            Answer::ServerHello { suite }
        }
        (22, [t, ..]) => Answer::Handshake(*t),
        (ct, _) => Answer::Record(ct),
    })
}

/// Whether a ServerHello is anywhere in `bytes` (a refusal must not send one at all).
fn any_server_hello(bytes: &[u8]) -> bool {
    records(bytes)
        .iter()
        .any(|(ct, p)| *ct == 22 && p.first() == Some(&2))
}

/// Sends `hello` from `source` and reads the answer: all of it until the server closes (or
/// [`ANSWER_WAIT`]), or only the first record if `first_only`.
async fn send_hello(
    ctx: &Ctx,
    source: IpAddr,
    hello: &[u8],
    first_only: bool,
) -> std::io::Result<(Answer, Vec<u8>)> {
    let mut tcp = ctx.tcp_from(source, ctx.target.mqtt).await?;
    tcp.write_all(hello).await?;
    read_answer(&mut tcp, first_only).await
}

/// Reads what the server sends back (see [`send_hello`]).
pub(crate) async fn read_answer(
    tcp: &mut tokio::net::TcpStream,
    first_only: bool,
) -> std::io::Result<(Answer, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    loop {
        if first_only && !records(&got).is_empty() {
            break;
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                // A reset after a fatal alert is a close too.
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(_) => break,
        }
    }
    let answer = match first_answer(&got) {
        Some(a) => a,
        None if !got.is_empty() => Answer::NotTls(got.iter().take(16).copied().collect()),
        None if closed => Answer::Closed,
        None => Answer::Silent,
    };
    Ok((answer, got))
}

/// One probe that must be refused.
struct Probe {
    case: &'static str,
    family: Family,
    hello: Hello,
}

const PROBES: &[Probe] = &[
    Probe {
        case: "SSLv3 ClientHello (0x0300)",
        family: Family::Tls12,
        hello: Hello::legacy(0x0300),
    },
    Probe {
        case: "TLS 1.0 only (legacy_version 0x0301)",
        family: Family::Tls12,
        hello: Hello::legacy(0x0301),
    },
    Probe {
        case: "TLS 1.1 only (legacy_version 0x0302)",
        family: Family::Tls12,
        hello: Hello::legacy(0x0302),
    },
    Probe {
        case: "TLS 1.2, RSA key exchange only (0x009c, 0x009d, ...)",
        family: Family::Tls12,
        hello: Hello::tls12(RSA_KX),
    },
    Probe {
        case: "TLS 1.2, CBC suites only (0xc013, 0xc027, 0xc009, ...)",
        family: Family::Tls12,
        hello: Hello::tls12(CBC),
    },
    Probe {
        case: "TLS 1.2, ChaCha20-Poly1305 only (0xcca8, 0xcca9)",
        family: Family::Tls12,
        hello: Hello::tls12(CHACHA_12),
    },
    Probe {
        case: "TLS 1.2, NULL encryption suites only",
        family: Family::Tls12,
        hello: Hello::tls12(NULL),
    },
    Probe {
        case: "TLS 1.2, export suites only",
        family: Family::Tls12,
        hello: Hello::tls12(EXPORT),
    },
    Probe {
        case: "TLS 1.2, RC4 suites only",
        family: Family::Tls12,
        hello: Hello::tls12(RC4),
    },
    Probe {
        case: "TLS 1.2, 3DES suites only",
        family: Family::Tls12,
        hello: Hello::tls12(TRIPLE_DES),
    },
    Probe {
        case: "TLS 1.2, allowed suites but DEFLATE compression only",
        family: Family::Tls12,
        hello: Hello {
            compression: &[1],
            ..Hello::tls12(ALLOWED_12)
        },
    },
    Probe {
        case: "TLS 1.2, allowed suites but no extended master secret (RFC 7627)",
        family: Family::Tls12,
        hello: Hello {
            ems: false,
            ..Hello::tls12(ALLOWED_12)
        },
    },
    Probe {
        case: "TLS 1.3, ChaCha20-Poly1305 only (0x1303)",
        family: Family::Tls13,
        hello: Hello::tls13(CHACHA_13),
    },
];

async fn control(ctx: &Ctx, case: &str, hello: &Hello) -> Check {
    let source = ctx.fresh_source();
    let bytes = client_hello(&ctx.target.server_name, hello);
    let expected = "ServerHello with an allowed suite (the probe itself is sound)";
    match send_hello(ctx, source, &bytes, true).await {
        Ok((answer, _)) => {
            let ok =
                matches!(answer, Answer::ServerHello { suite } if hello.suites.contains(&suite));
            Check::new(NAME, case, expected)
                .observed(format!("{answer} from {source}"))
                .pass(ok)
        }
        Err(e) => Check::broken(NAME, case, format!("connect from {source}: {e}")),
    }
}

async fn probes(ctx: &Ctx) -> Vec<Check> {
    let mut checks = Vec::new();
    let c12 = control(
        ctx,
        "control: TLS 1.2 ClientHello, ECDHE-AES-GCM (0xc02b/0xc02f)",
        &Hello::tls12(ALLOWED_12),
    )
    .await;
    let c13 = control(
        ctx,
        "control: TLS 1.3 ClientHello, AES-GCM (0x1301/0x1302)",
        &Hello::tls13(ALLOWED_13),
    )
    .await;
    let sound = |f: Family| match f {
        Family::Tls12 => c12.pass,
        Family::Tls13 => c13.pass,
    };
    let (ok12, ok13) = (sound(Family::Tls12), sound(Family::Tls13));
    checks.push(c12);
    checks.push(c13);
    for probe in PROBES {
        let source = ctx.fresh_source();
        let bytes = client_hello(&ctx.target.server_name, &probe.hello);
        let before = ctx.last_event_id();
        let (answer, got) = match send_hello(ctx, source, &bytes, false).await {
            Ok(a) => a,
            Err(e) => {
                checks.push(Check::broken(
                    NAME,
                    probe.case,
                    format!("connect from {source}: {e}"),
                ));
                continue;
            }
        };
        let control_ok = match probe.family {
            Family::Tls12 => ok12,
            Family::Tls13 => ok13,
        };
        let mut observed = answer.to_string();
        if !control_ok {
            observed.push_str(" (its control failed: this refusal proves nothing)");
        }
        let refused = answer.refusal() && !any_server_hello(&got) && control_ok;
        checks.push(
            refusal_from(
                ctx,
                NAME,
                probe.case,
                "tls_handshake_failed",
                source,
                before,
                refused,
                observed,
            )
            .await,
        );
    }
    checks
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_crafted_hello_parses_as_one_record_with_consistent_lengths() {
        let rec = client_hello("localhost", &Hello::tls13(ALLOWED_13));
        let recs = records(&rec);
        assert_eq!(recs.len(), 1);
        let (ct, hs) = recs[0];
        assert_eq!(ct, 22);
        assert_eq!(hs[0], 1);
        let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
        assert_eq!(len + 4, hs.len());
        // legacy_version, then the random and a 32-byte session id.
        assert_eq!(&hs[4..6], &[3, 3]);
        assert_eq!(hs[38], 32);
        let suites_at = 39 + 32;
        assert_eq!(&hs[suites_at..suites_at + 2], &[0, 4]);
        assert!(rec.windows(9).any(|w| w == b"localhost"));
        // No SNI for an IP address.
        let rec = client_hello("127.0.0.1", &Hello::legacy(0x0301));
        assert!(!rec.windows(9).any(|w| w == b"127.0.0.1"));
        assert_eq!(&rec[1..3], &[3, 1]);
    }

    /// What a rustls server with `config` answers to `hello`.
    fn answer_of(config: Arc<ServerConfig>, hello: &Hello) -> Answer {
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        let bytes = client_hello("localhost", hello);
        conn.read_tls(&mut bytes.as_slice()).unwrap();
        let _ = conn.process_new_packets();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        first_answer(&out).unwrap_or(Answer::Closed)
    }

    /// The probes tell a permissive server from the Gridward profile: the same hello gets a
    /// ServerHello from rustls' defaults and an alert from the profile.
    #[test]
    fn probes_discriminate_between_a_weak_and_the_gridward_server() {
        let tmp = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(tmp.path(), &InitOptions::new("test", now)).unwrap();
        let sans = ["localhost".to_owned()];
        pki.issue_server("localhost", &sans, &IssueOptions::new("test"), now)
            .unwrap();
        let m = pki
            .tls_material(gridward_pki::LeafKind::Server, "localhost")
            .unwrap();
        let weak = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(m.chain.clone(), m.key.clone_key())
            .unwrap(),
        );
        let gridward = gridward_pki::tls::server_config(&m).unwrap();
        for suites in [CHACHA_12, CHACHA_13] {
            let hello = if suites == CHACHA_13 {
                Hello::tls13(suites)
            } else {
                Hello::tls12(suites)
            };
            assert!(
                matches!(answer_of(weak.clone(), &hello), Answer::ServerHello { suite } if suites.contains(&suite)),
                "{suites:x?}"
            );
            let refused = answer_of(gridward.clone(), &hello);
            assert!(refused.refusal(), "{refused}");
        }
        // The controls pass on the profile, the legacy versions do not.
        assert!(matches!(
            answer_of(gridward.clone(), &Hello::tls12(ALLOWED_12)),
            Answer::ServerHello { .. }
        ));
        assert!(matches!(
            answer_of(gridward.clone(), &Hello::tls13(ALLOWED_13)),
            Answer::ServerHello { .. }
        ));
        assert_eq!(
            answer_of(gridward, &Hello::legacy(0x0302)),
            Answer::Alert {
                level: 2,
                description: 70
            }
        );
    }

    #[test]
    fn answers_are_read_from_the_first_record() {
        assert_eq!(
            first_answer(&[21, 3, 3, 0, 2, 2, 70]),
            Some(Answer::Alert {
                level: 2,
                description: 70
            })
        );
        let mut sh = vec![22, 3, 3, 0, 0, 2, 0, 0, 0, 3, 3];
        sh.extend([0u8; 32]);
        sh.push(0); // empty session id
        sh.extend([0xc0, 0x2b, 0]);
        let len = (sh.len() - 5) as u16;
        sh[3..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            first_answer(&sh),
            Some(Answer::ServerHello { suite: 0xc02b })
        );
        assert!(any_server_hello(&sh));
        assert_eq!(first_answer(&[21, 3, 3, 0]), None);
        assert!(Answer::Closed.refusal());
        assert!(!Answer::Silent.refusal());
    }
}
