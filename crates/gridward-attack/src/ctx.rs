//! What every scenario gets: the target, attack identities, connections from fresh source
//! addresses, signing, and the head-end's records (security events, stored readings).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::document::{Format, Reading};
use gridward_core::envelope::{self, EnvelopeParams, SigningKey};
use gridward_mqtt::client::{Client, ClientError, ClientOptions, ConnAck, Packet, Protocol, QoS};
use gridward_pki::tls::{TlsMaterial, TlsOptions};
use gridward_pki::{InitOptions, IssueOptions, Pki};
use gridward_store::{ReadingQuery, SecurityEventQuery, SqliteStore, Store, StoredSecurityEvent};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::AttackError;
use crate::check::Check;
use crate::fleet::GenuineFleet;
use crate::target::Target;

/// How long a scenario waits for the security event a refusal must leave.
pub const EVENT_WAIT: Duration = Duration::from_secs(4);

/// A key and certificate chain, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// The identity's name (a meter id for meters).
    pub id: String,
    /// The certificate chain (PEM, leaf first).
    pub chain: PathBuf,
    /// The private key (PKCS#8 PEM).
    pub key: PathBuf,
}

impl Creds {
    /// The files of `kind` (`meters`, `servers`, `clients`) `name` in the PKI at `dir`.
    pub fn in_pki(dir: &Path, kind: &str, name: &str) -> Self {
        let d = dir.join(kind).join(name);
        Self {
            id: name.to_owned(),
            chain: d.join("chain.pem"),
            key: d.join("key.pem"),
        }
    }

    /// The signing key (for envelopes).
    pub fn signing_key(&self) -> Result<SigningKey, AttackError> {
        let pem = std::fs::read_to_string(&self.key)
            .map_err(|e| AttackError::Setup(format!("{}: {e}", self.key.display())))?;
        SigningKey::from_pkcs8_pem(&pem).map_err(|e| AttackError::Setup(e.to_string()))
    }
}

/// What happened to one PUBLISH at QoS 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubOutcome {
    /// PUBACK with this reason code (0 = success; 3.1.1 has no codes, a refusal closes or stays
    /// silent).
    Acked(u8),
    /// The head-end closed the connection.
    Closed,
    /// No answer in time.
    Silent,
}

impl PubOutcome {
    /// Whether the head-end did not accept the message: no successful PUBACK.
    pub fn refused(&self) -> bool {
        !matches!(self, Self::Acked(0))
    }
}

impl std::fmt::Display for PubOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Acked(0) => f.write_str("PUBACK success"),
            Self::Acked(c) => write!(f, "PUBACK {c:#04x}"),
            Self::Closed => f.write_str("connection closed"),
            Self::Silent => f.write_str("no PUBACK"),
        }
    }
}

/// The context of a run.
pub struct Ctx {
    /// The head-end under attack.
    pub target: Target,
    /// The genuine fleet sending alongside.
    pub fleet: GenuineFleet,
    work: PathBuf,
    pki: Pki,
    store: SqliteStore,
    next_source: AtomicU32,
    rogue: Mutex<Option<PathBuf>>,
    issued: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// A context over `target`, using `work` for attack material, with the genuine fleet
    /// already running.
    pub fn new(target: Target, fleet: GenuineFleet, work: &Path) -> Result<Self, AttackError> {
        let pki = Pki::open(&target.pki_dir, None)?;
        let store = SqliteStore::open_existing(&target.store, target.store_keys.clone())
            .map_err(|e| AttackError::Setup(format!("{}: {e}", target.store.display())))?;
        Ok(Self {
            target,
            fleet,
            work: work.to_owned(),
            pki,
            store,
            next_source: AtomicU32::new(0),
            rogue: Mutex::new(None),
            issued: Mutex::new(Vec::new()),
        })
    }

    /// A work directory for a scenario's files.
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// The target's PKI (to issue attack identities, revoke, write CRLs).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The target's store (read only: events, readings).
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// A loopback source address no case has used yet (127.1.0.1, 127.1.0.2, ...): a ban one
    /// attack earns never falls on another, nor on the genuine fleet (127.0.0.1).
    pub fn fresh_source(&self) -> IpAddr {
        let n = self.next_source.fetch_add(1, Ordering::Relaxed);
        IpAddr::V4(Ipv4Addr::new(
            127,
            1 + (n / 250) as u8,
            0,
            1 + (n % 250) as u8,
        ))
    }

    /// A meter of the target's PKI for attacks (`x-{name}`), issued on first use with `now`
    /// shifted by `days` (negative: in the past).
    pub fn attack_meter(&self, name: &str) -> Result<Creds, AttackError> {
        self.attack_meter_at(name, 0, None)
    }

    /// Like [`Ctx::attack_meter`], issued `days` from now and valid `validity_days` (default
    /// the profile's): an expired (`days` = -10, validity 1) or not yet valid (`days` = 10)
    /// certificate.
    pub fn attack_meter_at(
        &self,
        name: &str,
        days: i64,
        validity_days: Option<u32>,
    ) -> Result<Creds, AttackError> {
        let id = format!("x-{name}");
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        if !issued.contains(&id) {
            let mut opts = IssueOptions::new("gridward-attack");
            opts.validity_days = validity_days;
            opts.replace = true;
            let at = OffsetDateTime::now_utc() + time::Duration::days(days);
            self.pki.issue_meter(&MeterId::new(&id)?, &opts, at)?;
            issued.push(id.clone());
        }
        Ok(Creds::in_pki(&self.target.pki_dir, "meters", &id))
    }

    /// A rogue CA (same names as the target's, other keys) in the work directory, created on
    /// first use; returns its directory.
    pub fn rogue_pki(&self) -> Result<PathBuf, AttackError> {
        let mut rogue = self.rogue.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(dir) = rogue.as_ref() {
            return Ok(dir.clone());
        }
        let dir = self.work.join("rogue-pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&dir, &InitOptions::new("gridward-attack", now))?;
        let opts = IssueOptions::new("gridward-attack");
        let sans = [self.target.server_name.clone(), "127.0.0.1".to_owned()];
        pki.issue_server(&self.target.server_name, &sans, &opts, now)?;
        *rogue = Some(dir.clone());
        Ok(dir)
    }

    /// A client configuration presenting `creds` and trusting the target's CA (with its CRLs).
    pub fn client_config(&self, creds: &Creds) -> Result<Arc<ClientConfig>, AttackError> {
        self.client_config_trusting(creds, &self.target.pki_dir)
    }

    /// A client configuration presenting `creds` and trusting the CA of the PKI at `trust`.
    pub fn client_config_trusting(
        &self,
        creds: &Creds,
        trust: &Path,
    ) -> Result<Arc<ClientConfig>, AttackError> {
        let crl_dir = trust.join("crl");
        let crls: Vec<PathBuf> = std::fs::read_dir(&crl_dir)
            .map_err(|e| AttackError::Setup(format!("{}: {e}", crl_dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".crl.pem"))
            .collect();
        let material = TlsMaterial::from_pem_files(
            &creds.chain,
            &creds.key,
            &[trust.join("ca/root.crt.pem")],
            &crls,
        )?;
        Ok(gridward_pki::tls::client_config_with(
            &material,
            &TlsOptions::new(),
        )?)
    }

    /// A TCP connection to `addr` from `source`.
    pub async fn tcp_from(&self, source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// TCP + TLS to the head-end from `source` with `config`.
    pub async fn tls_from(
        &self,
        source: IpAddr,
        config: Arc<ClientConfig>,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let name = ServerName::try_from(self.target.server_name.clone())
            .map_err(|_| ClientError::InvalidServerName(self.target.server_name.clone()))?;
        let tcp = self
            .tcp_from(source, self.target.mqtt)
            .await
            .map_err(ClientError::Connect)?;
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(ClientError::Handshake)
    }

    /// Connects to the head-end as an MQTT client from `source`: TLS with `config`, CONNECT
    /// with `client_id`; within 10 s.
    pub async fn mqtt_from(
        &self,
        source: IpAddr,
        config: Arc<ClientConfig>,
        client_id: &str,
        protocol: Protocol,
    ) -> Result<(Client, ConnAck), ClientError> {
        let mut opts = ClientOptions::new(client_id);
        opts.protocol = protocol;
        tokio::time::timeout(Duration::from_secs(10), async {
            let stream = self.tls_from(source, config).await?;
            Client::handshake(stream, &opts).await
        })
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    /// Connects as the meter `creds` (ClientID = its id) from a fresh source, MQTT 5.
    pub async fn connect_meter(&self, creds: &Creds) -> Result<Client, AttackError> {
        let config = self.client_config(creds)?;
        let (client, _) = self
            .mqtt_from(self.fresh_source(), config, &creds.id, Protocol::V5)
            .await
            .map_err(|e| AttackError::Setup(format!("{} cannot connect: {e}", creds.id)))?;
        Ok(client)
    }

    /// A reading document of `meter` (XML), taken now, with register `kwh`.
    pub fn reading_xml(meter: &str, kwh: f64) -> Result<String, AttackError> {
        let now = OffsetDateTime::now_utc();
        let now = OffsetDateTime::from_unix_timestamp(now.unix_timestamp())
            .map_err(|e| AttackError::Setup(e.to_string()))?;
        Ok(Reading {
            meter_id: MeterId::new(meter)?,
            timestamp: now,
            energy_kwh: kwh,
        }
        .to_xml())
    }

    /// An envelope: `doc` signed by `key` as meter `meter` with `counter`, for `topic`, now.
    pub fn sign(
        key: &SigningKey,
        meter: &str,
        counter: u64,
        topic: &str,
        doc: &str,
    ) -> Result<Vec<u8>, AttackError> {
        let meter = MeterId::new(meter)?;
        Ok(envelope::sign(
            key,
            &EnvelopeParams {
                meter_id: &meter,
                counter,
                timestamp: OffsetDateTime::now_utc().unix_timestamp(),
                content_type: Format::Xml,
                topic,
            },
            doc.as_bytes(),
        )?)
    }

    /// A genuine reading envelope of `creds`' meter with `counter` and register `kwh`.
    pub fn genuine(creds: &Creds, counter: u64, kwh: f64) -> Result<Vec<u8>, AttackError> {
        let topic = format!("meters/{}/readings", creds.id);
        Self::sign(
            &creds.signing_key()?,
            &creds.id,
            counter,
            &topic,
            &Self::reading_xml(&creds.id, kwh)?,
        )
    }

    /// Publishes at QoS 1 and waits (up to 5 s) for the PUBACK of `pkid`.
    pub async fn publish(
        client: &mut Client,
        topic: &str,
        payload: Vec<u8>,
        pkid: u16,
    ) -> PubOutcome {
        if client
            .publish(topic, payload, QoS::AtLeastOnce, pkid)
            .await
            .is_err()
        {
            return PubOutcome::Closed;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, client.recv()).await {
                Ok(Ok(Packet::PubAck {
                    pkid: p,
                    reason_code,
                })) if p == pkid => {
                    return PubOutcome::Acked(reason_code);
                }
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return PubOutcome::Closed,
                Err(_) => return PubOutcome::Silent,
            }
        }
    }

    /// The id of the newest security event (0 if none): events after it belong to what
    /// follows.
    pub fn last_event_id(&self) -> i64 {
        self.store
            .security_events(&SecurityEventQuery {
                limit: 1,
                ..SecurityEventQuery::default()
            })
            .ok()
            .and_then(|v| v.last().map(|e| e.id))
            .unwrap_or(0)
    }

    /// Security events recorded after event `after`, oldest first.
    pub fn events_after(&self, after: i64) -> Vec<StoredSecurityEvent> {
        let mut out = Vec::new();
        let mut limit = 1000;
        loop {
            let Ok(events) = self.store.security_events(&SecurityEventQuery {
                limit,
                ..SecurityEventQuery::default()
            }) else {
                return out;
            };
            let n = events.len();
            out = events.into_iter().filter(|e| e.id > after).collect();
            // The newest `limit` events cover everything after `after`, or there are no more.
            if n < limit || out.len() < n {
                return out;
            }
            limit *= 4;
        }
    }

    /// Waits (up to [`EVENT_WAIT`]) for a security event after `after` with `reason` (a
    /// [`Reason`](gridward_core::security::Reason) code) and, if given, about `meter`.
    pub async fn wait_event(
        &self,
        after: i64,
        reason: &str,
        meter: Option<&str>,
    ) -> Option<StoredSecurityEvent> {
        let deadline = tokio::time::Instant::now() + EVENT_WAIT;
        loop {
            let found = self.events_after(after).into_iter().find(|e| {
                e.event.reason == reason
                    && meter.is_none_or(|m| {
                        e.event.meter_id.as_ref().is_some_and(|id| id.as_str() == m)
                    })
            });
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to `wait`) for a security event after `after` that satisfies `pred`.
    pub async fn wait_event_where(
        &self,
        after: i64,
        wait: Duration,
        pred: impl Fn(&StoredSecurityEvent) -> bool,
    ) -> Option<StoredSecurityEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = self.events_after(after).into_iter().find(&pred);
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The counters of `meter`'s stored readings.
    pub fn stored_counters(&self, meter: &str) -> Vec<u64> {
        MeterId::new(meter)
            .ok()
            .and_then(|m| self.store.readings(&ReadingQuery::new(m)).ok())
            .map(|rows| rows.iter().map(|r| r.counter).collect())
            .unwrap_or_default()
    }

    /// The registers of `meter`'s stored readings.
    pub fn stored_kwh(&self, meter: &str) -> Vec<f64> {
        MeterId::new(meter)
            .ok()
            .and_then(|m| self.store.readings(&ReadingQuery::new(m)).ok())
            .map(|rows| rows.iter().map(|r| r.energy_kwh).collect())
            .unwrap_or_default()
    }

    /// The verdict on a refusal: it passes when the client saw a refusal (`refused`) and the
    /// head-end recorded an event with `reason` after `before` (about `meter` if given).
    #[allow(clippy::too_many_arguments)]
    pub async fn refusal(
        &self,
        scenario: &'static str,
        case: impl Into<String>,
        reason: &str,
        meter: Option<&str>,
        before: i64,
        refused: bool,
        observed: impl Into<String>,
    ) -> Check {
        let event = self.wait_event(before, reason, meter).await;
        let mut observed = observed.into();
        match &event {
            Some(e) => observed.push_str(&format!("; event {}", e.event.reason)),
            None => {
                let others: Vec<String> = self
                    .events_after(before)
                    .iter()
                    .map(|e| e.event.reason.clone())
                    .collect();
                observed.push_str(&format!("; no {reason} event (events: {others:?})"));
            }
        }
        Check::new(scenario, case, format!("refused, event {reason}"))
            .observed(observed)
            .pass(refused && event.is_some())
            .event(event.map(|e| e.id))
    }
}
