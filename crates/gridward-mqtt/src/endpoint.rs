//! The device-facing MQTT endpoint: TCP accept, admission (bans, connection limit), mutual TLS
//! with the `gridward-pki` server profile, certificate identity, and a thin I/O loop around the
//! sans-IO [`Session`].
//!
//! ```text
//! accept ─► banned? ─► connection permit? ─► TLS (client cert, CRLs) ─► identity_of = Meter(id) | Concentrator(id)?
//!        ─► Session: CONNECT (ClientID = id) ─► registry (takeover, revocation) ─► PUBLISH ─► PublishHandler
//!                                                                     PUBACK ◄─ verdict (in order)
//!
//! head-end: Endpoint::publish(meter, topic, payload) ─► registry ─► that meter's session loop
//!        ─► Session::publish ─► PUBLISH QoS 1 (once subscribed) ─► meter's PUBACK ─► oneshot: OutboundResult
//! ```
//!
//! Meters and data concentrators connect alike ([`DeviceKind`]); each has its own topics, and
//! a concentrator a larger packet size and rate limit (see [`crate::session`] for the ACL).
//! The registry holds one live session per device: a newer connection with the same identity
//! takes over the older one ([`EventSink::session_replaced`] with both addresses).
//!
//! Every refusal goes to the [`EventSink`] as a `SecurityEvent`; connects and disconnects too
//! ([`EventSink::device_connection`], by default [`EventSink::connection`]),
//! and each new subscription of a meter to its commands or firmware topic
//! ([`EventSink::subscribed`]): from then on [`Endpoint::publish`] reaches it there.
//! A message handed to [`Endpoint::publish`] is sent at most once on that connection; if the
//! connection ends before the meter's PUBACK, its receiver gets [`OutboundResult::Disconnected`]
//! and the head-end resends on the next connection (no MQTT session state is kept).
//! [`Endpoint::reload`] swaps the TLS configuration for new handshakes and disconnects live
//! sessions whose certificate is now revoked. [`Endpoint::run`] serves one listener until its
//! shutdown future resolves (or [`Endpoint::shutdown`] is called), then drains: connections get
//! [`EndpointConfig::shutdown_grace`] to receive the PUBACKs of messages in flight.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gridward_core::MeterId;
use gridward_core::security::{Reason, SecurityEvent};
use gridward_pki::tls::{TlsError, TlsMaterial, server_config};
use gridward_pki::{LeafKind, Pki, PkiError};
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::codec::{self, frame_len};
use crate::config::{ConfigError, EndpointConfig};
use crate::handler::{DeviceKind, EventSink, InboundPublish, PublishHandler, Verdict};
use crate::limits::{Admission, BanList, BanPolicy, MeterBuckets};
use crate::peer::{PeerCert, RevocationError, Revocations, handshake_reason};
use crate::session::{Action, Cancel, OutboundResult, Session};

/// The wall clock of the endpoint (for `received_at` and event times). The binary passes
/// `Arc::new(time::OffsetDateTime::now_utc)`; tests may pass a fixed or stepping clock.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// Errors of the endpoint's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The configuration is unusable.
    #[error("invalid endpoint configuration: {0}")]
    Config(#[from] ConfigError),
    /// The server TLS configuration could not be built.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] TlsError),
    /// The PKI directory could not be read.
    #[error("cannot read the PKI: {0}")]
    Pki(#[from] PkiError),
    /// A CRL does not parse.
    #[error("{0}")]
    Revocation(#[from] RevocationError),
    /// The listener failed.
    #[error("listener error: {0}")]
    Listener(#[source] io::Error),
}

/// Why [`Endpoint::publish`] could not hand a message to a meter's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The meter has no live MQTT session (never connected, disconnected, or its session is
    /// ending): keep the message and send it when the meter connects and subscribes again.
    #[error("the meter is not connected: send when it reconnects")]
    NotConnected,
    /// The meter's session has not yet taken up the messages handed to it before (its
    /// connection is slow to write): retry shortly.
    #[error("the meter's session is busy with earlier messages: retry shortly")]
    Busy,
}

/// Head-end → meter messages one session loop accepts before it has taken them up; beyond,
/// [`Endpoint::publish`] answers [`PublishError::Busy`]. The session's own queue is bounded by
/// [`EndpointConfig::max_outbound_queue`].
const OUTBOUND_CHANNEL: usize = 64;

/// One message from [`Endpoint::publish`] to a session loop.
#[derive(Debug)]
struct OutboundRequest {
    topic: String,
    payload: Bytes,
    done: oneshot::Sender<OutboundResult>,
}

/// Counters of an endpoint (since it was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// TCP connections admitted (not banned, under the connection limit).
    pub accepted: u64,
    /// Connections open now (TLS handshakes included).
    pub open: u64,
    /// Devices (meters and concentrators) with a live MQTT session now.
    pub sessions: u64,
    /// Failed TLS handshakes (including timeouts) and refused certificate identities.
    pub handshake_failures: u64,
    /// Connections refused because their source was banned.
    pub refused_banned: u64,
    /// Connections refused at the connection limit.
    pub refused_limit: u64,
    /// PUBLISH packets handed to the pipeline.
    pub publishes: u64,
    /// Security events raised.
    pub security_events: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    handshake_failures: AtomicU64,
    refused_banned: AtomicU64,
    refused_limit: AtomicU64,
    publishes: AtomicU64,
    security_events: AtomicU64,
}

/// A live session in the registry.
#[derive(Debug)]
struct Live {
    conn_id: u64,
    /// The peer's address (reported when a newer connection takes over).
    addr: SocketAddr,
    cert: Arc<PeerCert>,
    control: oneshot::Sender<Cancel>,
    /// Head-end → meter messages for the session loop.
    outbound: mpsc::Sender<OutboundRequest>,
}

#[derive(Debug, Default)]
struct Registry {
    /// By kind and id: a concentrator never takes over a meter's session (their ids are
    /// distinct by PKI rule; this keeps it so whatever a certificate says).
    live: HashMap<(DeviceKind, MeterId), Live>,
    revoked: Revocations,
}

struct Inner<H> {
    config: EndpointConfig,
    tls: RwLock<Arc<ServerConfig>>,
    handler: Arc<H>,
    events: Arc<dyn EventSink>,
    clock: Clock,
    registry: Mutex<Registry>,
    bans: Mutex<BanList>,
    /// Each meter's rate-limit bucket, kept across its connections.
    buckets: Mutex<MeterBuckets>,
    /// Each concentrator's, likewise (a different rate).
    concentrator_buckets: Mutex<MeterBuckets>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    next_conn_id: AtomicU64,
    counters: Counters,
}

/// Locks a mutex, recovering the data if another thread panicked while holding it
/// (the registry and ban list stay consistent at every step, so the data is usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The MQTT endpoint. Cheap to clone (a handle); all clones share state.
pub struct Endpoint<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for Endpoint<H> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<H> std::fmt::Debug for Endpoint<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl<H: PublishHandler> Endpoint<H> {
    /// An endpoint with `tls` (build it with `gridward_pki::tls::server_config`: client
    /// certificate required, CRLs enforced), handing messages to `handler` and events to `events`.
    ///
    /// # Errors
    ///
    /// [`EndpointError::Config`] if `config` does not validate.
    pub fn new(
        config: EndpointConfig,
        tls: Arc<ServerConfig>,
        handler: Arc<H>,
        events: Arc<dyn EventSink>,
        clock: Clock,
    ) -> Result<Self, EndpointError> {
        config.validate()?;
        let bans = BanList::new(BanPolicy {
            threshold: config.ban_after_failures,
            window: config.ban_window,
            duration: config.ban_duration,
            exempt: config.ban_exempt.clone(),
            max_tracked: config.ban_max_tracked,
        });
        let buckets = MeterBuckets::new(config.max_connections);
        Ok(Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(config.max_connections)),
                concentrator_buckets: Mutex::new(buckets.clone()),
                buckets: Mutex::new(buckets),
                config,
                tls: RwLock::new(tls),
                handler,
                events,
                clock,
                registry: Mutex::new(Registry::default()),
                bans: Mutex::new(bans),
                shutdown: CancellationToken::new(),
                next_conn_id: AtomicU64::new(1),
                counters: Counters::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EndpointConfig {
        &self.inner.config
    }

    /// Uses `tls` for handshakes from now on, and disconnects every live session whose
    /// certificate is in `revoked` (security event `certificate_revoked` each).
    /// `revoked` is also remembered: a handshake that started before the reload and completes
    /// after it is refused if its certificate is in the set. Returns how many sessions were
    /// disconnected.
    pub fn reload(&self, tls: Arc<ServerConfig>, revoked: Revocations) -> usize {
        {
            let mut cfg = self
                .inner
                .tls
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *cfg = tls;
        }
        let mut reg = lock(&self.inner.registry);
        let doomed: Vec<(DeviceKind, MeterId)> = reg
            .live
            .iter()
            .filter(|(_, l)| revoked.contains(&l.cert))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &doomed {
            if let Some(live) = reg.live.remove(key) {
                // The session task reports the disconnect (its entry is gone, so it reports it
                // itself) and raises the security event.
                let _ = live.control.send(Cancel::Revoked);
            }
        }
        reg.revoked = revoked;
        doomed.len()
    }

    /// [`Endpoint::reload`] from TLS material: builds the server configuration of the Gridward
    /// profile and takes the revoked certificates from the material's CRLs.
    ///
    /// # Errors
    ///
    /// [`EndpointError::Tls`], [`EndpointError::Revocation`]; nothing changes then.
    pub fn reload_material(&self, material: &TlsMaterial) -> Result<usize, EndpointError> {
        let config = server_config(material)?;
        let revoked = Revocations::from_crls(&material.crls)?;
        Ok(self.reload(config, revoked))
    }

    /// [`Endpoint::reload_material`] from a PKI directory and the server's name in it
    /// (`DIR/servers/{name}/...`, both CRLs, the roots): what `gridward pki revoke` changed
    /// takes effect.
    ///
    /// # Errors
    ///
    /// [`EndpointError::Pki`], [`EndpointError::Tls`], [`EndpointError::Revocation`].
    pub fn reload_from_pki(&self, dir: &Path, server_name: &str) -> Result<usize, EndpointError> {
        let material = Pki::open(dir, None)?.tls_material(LeafKind::Server, server_name)?;
        self.reload_material(&material)
    }

    /// Disconnects the meter or concentrator `meter` if it is connected (MQTT 5: DISCONNECT
    /// 0x98 administrative action).
    pub fn disconnect(&self, meter: &MeterId) -> bool {
        let mut reg = lock(&self.inner.registry);
        let mut any = false;
        for kind in [DeviceKind::Meter, DeviceKind::Concentrator] {
            if let Some(l) = reg.live.remove(&(kind, meter.clone())) {
                any |= l.control.send(Cancel::Admin).is_ok();
            }
        }
        any
    }

    /// Sends `payload` to `meter` on `topic` (its `meters/{id}/commands` or
    /// `meters/{id}/firmware`) as a QoS 1 PUBLISH, once the meter has subscribed to that topic.
    /// The receiver resolves with how it ended: [`OutboundResult::Acked`] with the meter's
    /// PUBACK, [`OutboundResult::Refused`] if the session refused it unsent (another topic, too
    /// large for the meter, queue full), [`OutboundResult::Disconnected`] if the connection ended
    /// first (resend on the next one).
    ///
    /// Meters only: a data concentrator has no downward path, so for a concentrator's id this
    /// answers [`PublishError::NotConnected`] whether it is connected or not.
    ///
    /// # Errors
    ///
    /// [`PublishError::NotConnected`] if the meter has no live session,
    /// [`PublishError::Busy`] if its session has not taken up earlier messages yet.
    pub fn publish(
        &self,
        meter: &MeterId,
        topic: String,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<OutboundResult>, PublishError> {
        let (done, rx) = oneshot::channel();
        let request = OutboundRequest {
            topic,
            payload,
            done,
        };
        let reg = lock(&self.inner.registry);
        let live = reg
            .live
            .get(&(DeviceKind::Meter, meter.clone()))
            .ok_or(PublishError::NotConnected)?;
        match live.outbound.try_send(request) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => Err(PublishError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PublishError::NotConnected),
        }
    }

    /// Meters with a live MQTT session (concentrators: [`Endpoint::connected_concentrators`]).
    pub fn connected_meters(&self) -> Vec<MeterId> {
        self.connected(DeviceKind::Meter)
    }

    /// Concentrators with a live MQTT session.
    pub fn connected_concentrators(&self) -> Vec<MeterId> {
        self.connected(DeviceKind::Concentrator)
    }

    fn connected(&self, kind: DeviceKind) -> Vec<MeterId> {
        lock(&self.inner.registry)
            .live
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Whether the meter `meter` has a live MQTT session.
    pub fn is_connected(&self, meter: &MeterId) -> bool {
        self.is_device_connected(DeviceKind::Meter, meter)
    }

    /// Whether the device `id` of `kind` has a live MQTT session.
    pub fn is_device_connected(&self, kind: DeviceKind, id: &MeterId) -> bool {
        lock(&self.inner.registry)
            .live
            .contains_key(&(kind, id.clone()))
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.inner.stats()
    }

    /// A reader of [`Endpoint::stats`] that does not keep the endpoint alive, for a metrics
    /// registry that may outlive it (a strong handle there would keep the handler, and
    /// whatever it holds, alive after shutdown). `None` once every handle is gone.
    pub fn stats_reader(&self) -> impl Fn() -> Option<EndpointStats> + Send + Sync + 'static {
        let weak = Arc::downgrade(&self.inner);
        move || weak.upgrade().map(|inner| inner.stats())
    }

    /// Stops every [`Endpoint::run`] of this endpoint (as if each one's shutdown future resolved).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Serves `listener` until `shutdown` resolves or [`Endpoint::shutdown`] is called, then
    /// stops accepting, lets every connection drain (at most
    /// [`EndpointConfig::shutdown_grace`] for verdicts, then the write timeout) and returns when
    /// all of this listener's connections are closed.
    ///
    /// Accept errors (e.g. out of file descriptors) do not end the loop: it backs off and retries.
    ///
    /// # Errors
    ///
    /// None at present; the `Result` leaves room for listener errors that should be fatal.
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), EndpointError> {
        let token = self.inner.shutdown.child_token();
        let tracker = TaskTracker::new();
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(5);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = token.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        backoff = Duration::from_millis(5);
                        if let Some(permit) = self.admit(addr) {
                            let inner = Arc::clone(&self.inner);
                            let token = token.clone();
                            // One span per connection: the peer, then the meter once its
                            // certificate has proved it.
                            let span = tracing::info_span!(
                                "mqtt",
                                peer = %addr,
                                meter = tracing::field::Empty,
                                device = tracing::field::Empty
                            );
                            tracker.spawn(
                                async move {
                                    serve(inner, tcp, addr, permit, token).await;
                                }
                                .instrument(span),
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "MQTT accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        }
        token.cancel();
        drop(listener);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Ban check and connection permit; raises the events of a refusal.
    fn admit(&self, addr: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let inner = &self.inner;
        if let Admission::Banned { .. } = lock(&inner.bans).admit(addr.ip(), Instant::now()) {
            tracing::debug!(peer = %addr, "connection refused: source banned");
            inner
                .counters
                .refused_banned
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match Arc::clone(&inner.permits).try_acquire_owned() {
            Ok(permit) => {
                inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
                Some(permit)
            }
            Err(_) => {
                inner.counters.refused_limit.fetch_add(1, Ordering::Relaxed);
                let _span = tracing::info_span!("mqtt", peer = %addr).entered();
                inner.event(
                    Reason::ConnectionLimit,
                    None,
                    addr,
                    format!(
                        "connection limit of {} reached",
                        inner.config.max_connections
                    ),
                );
                None
            }
        }
    }
}

impl<H> Inner<H> {
    fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    fn stats(&self) -> EndpointStats {
        let c = &self.counters;
        EndpointStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            open: c.open.load(Ordering::Relaxed),
            sessions: lock(&self.registry).live.len() as u64,
            handshake_failures: c.handshake_failures.load(Ordering::Relaxed),
            refused_banned: c.refused_banned.load(Ordering::Relaxed),
            refused_limit: c.refused_limit.load(Ordering::Relaxed),
            publishes: c.publishes.load(Ordering::Relaxed),
            security_events: c.security_events.load(Ordering::Relaxed),
        }
    }

    fn event(&self, reason: Reason, meter: Option<&MeterId>, addr: SocketAddr, detail: String) {
        self.counters
            .security_events
            .fetch_add(1, Ordering::Relaxed);
        // Inside the connection's span (peer, meter); the detail names certificates, topics
        // and limits, never a payload.
        tracing::info!(reason = reason.code(), detail = ?detail, "security event");
        let mut e = SecurityEvent::new(self.now(), reason, detail).source(addr);
        if let Some(m) = meter {
            e = e.meter(m);
        }
        self.events.security_event(e);
    }

    /// Counts a failed handshake / CONNECT of `addr`; may start a ban.
    fn failure(&self, addr: SocketAddr) {
        let banned = lock(&self.bans).record_failure(addr.ip(), Instant::now());
        if banned.is_some() {
            let c = &self.config;
            self.event(
                Reason::SourceBanned,
                None,
                addr,
                format!(
                    "{} failed handshakes or CONNECTs within {} s: {} banned for {} s",
                    c.ban_after_failures,
                    c.ban_window.as_secs(),
                    addr.ip(),
                    c.ban_duration.as_secs()
                ),
            );
        }
    }

    fn is_revoked(&self, cert: &PeerCert) -> bool {
        lock(&self.registry).revoked.contains(cert)
    }

    /// The rate-limit buckets of devices of `kind`.
    fn buckets(&self, kind: DeviceKind) -> MutexGuard<'_, MeterBuckets> {
        match kind {
            DeviceKind::Meter => lock(&self.buckets),
            DeviceKind::Concentrator => lock(&self.concentrator_buckets),
        }
    }
}

/// A pipeline future for one message.
type VerdictFuture = Pin<Box<dyn Future<Output = Verdict> + Send>>;

/// Every verdict ready among `pending` (at least one), polling oldest first so that futures are
/// first polled in PUBLISH order; several verdicts at once make one write of PUBACKs.
/// Cancel safe: verdicts are taken out only when returned.
fn next_verdicts(
    pending: &mut Vec<(u64, VerdictFuture)>,
) -> impl Future<Output = Vec<(u64, Verdict)>> + '_ {
    std::future::poll_fn(move |cx| {
        let mut ready = Vec::new();
        pending.retain_mut(|(seq, fut)| match fut.as_mut().poll(cx) {
            Poll::Ready(verdict) => {
                ready.push((*seq, verdict));
                false
            }
            Poll::Pending => true,
        });
        if ready.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(ready)
        }
    })
}

/// Decrements the open-connection counter when the connection task ends, however it ends.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection: TLS, identity, then the session loop.
async fn serve<H: PublishHandler>(
    inner: Arc<Inner<H>>,
    tcp: TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _permit = permit;
    inner.counters.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&inner.counters.open);
    let accepted_at = Instant::now();
    // Latency of small packets matters more than segment count.
    let _ = tcp.set_nodelay(true);

    let acceptor = {
        let cfg = inner
            .tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TlsAcceptor::from(Arc::clone(&cfg))
    };
    let deadline = tokio::time::Instant::from_std(accepted_at + inner.config.connect_timeout);
    let handshake = tokio::select! {
        () = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => r,
    };
    let mut tls = match handshake {
        Err(_) => {
            inner
                .counters
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            inner.event(
                Reason::Timeout,
                None,
                addr,
                "TLS handshake not complete within the connect timeout".into(),
            );
            inner.failure(addr);
            return;
        }
        Ok(Err(e)) => {
            inner
                .counters
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            inner.event(
                handshake_reason(&e),
                None,
                addr,
                format!("TLS handshake failed: {e}"),
            );
            inner.failure(addr);
            return;
        }
        Ok(Ok(tls)) => tls,
    };

    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(crate::peer::PeerError::NoCertificate)
        .and_then(|der| PeerCert::from_der(der));
    let peer = match peer {
        Ok(p) => {
            let span = tracing::Span::current();
            span.record("meter", tracing::field::display(&p.meter));
            span.record("device", p.kind.as_str());
            Arc::new(p)
        }
        Err(e) => {
            inner
                .counters
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            inner.event(Reason::BadIdentity, None, addr, e.to_string());
            inner.failure(addr);
            let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
            return;
        }
    };
    if inner.is_revoked(&peer) {
        inner
            .counters
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        inner.event(
            Reason::CertificateRevoked,
            Some(&peer.meter),
            addr,
            format!("certificate {} is revoked", peer.serial),
        );
        inner.failure(addr);
        return;
    }

    let well_behaved = SessionLoop::new(&inner, &peer, addr, accepted_at)
        .run(&mut tls, &shutdown)
        .await;
    if !well_behaved {
        inner.failure(addr);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
}

/// The I/O loop around a [`Session`].
struct SessionLoop<'a, H> {
    inner: &'a Arc<Inner<H>>,
    peer: &'a Arc<PeerCert>,
    addr: SocketAddr,
    session: Session,
    conn_id: u64,
    /// The pipeline's futures for messages in flight, oldest first.
    pending: Vec<(u64, VerdictFuture)>,
    control_tx: Option<oneshot::Sender<Cancel>>,
    control_rx: oneshot::Receiver<Cancel>,
    /// Moved into the registry when the session is registered.
    outbound_tx: Option<mpsc::Sender<OutboundRequest>>,
    outbound_rx: mpsc::Receiver<OutboundRequest>,
    /// The receivers of head-end → meter messages handed to the session, by tag.
    waiting: HashMap<u64, oneshot::Sender<OutboundResult>>,
    next_tag: u64,
    /// CONNECT accepted and the session entered the registry.
    connected: bool,
    /// The session was cut for abuse (rate limit, oversize or malformed packet): it counts
    /// towards a ban of the source like a failed CONNECT, so that reconnecting to abuse again
    /// (a full mutual-TLS handshake and a security event each time) ends in a ban.
    abused: bool,
    closing: bool,
    wbuf: BytesMut,
}

impl<'a, H: PublishHandler> SessionLoop<'a, H> {
    fn new(
        inner: &'a Arc<Inner<H>>,
        peer: &'a Arc<PeerCert>,
        addr: SocketAddr,
        accepted_at: Instant,
    ) -> Self {
        let (control_tx, control_rx) = oneshot::channel();
        let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_CHANNEL);
        Self {
            inner,
            peer,
            addr,
            session: Session::for_device(peer.meter.clone(), peer.kind, &inner.config, accepted_at),
            conn_id: inner.next_conn_id.fetch_add(1, Ordering::Relaxed),
            pending: Vec::new(),
            control_tx: Some(control_tx),
            control_rx,
            outbound_tx: Some(outbound_tx),
            outbound_rx,
            waiting: HashMap::new(),
            next_tag: 0,
            connected: false,
            abused: false,
            closing: false,
            wbuf: BytesMut::new(),
        }
    }

    /// Runs the session to its end; returns whether it went well: CONNECT accepted and the
    /// session not cut for abuse.
    async fn run(mut self, tls: &mut TlsStream<TcpStream>, shutdown: &CancellationToken) -> bool {
        self.drive(tls, shutdown).await;
        self.end_outbound();
        self.finish();
        self.orphan_pending().await;
        self.connected && !self.abused
    }

    /// Runs until the session closes or the connection fails.
    async fn drive(&mut self, tls: &mut TlsStream<TcpStream>, shutdown: &CancellationToken) {
        let inner: &Arc<Inner<H>> = self.inner;
        let cfg = &inner.config;
        let lifetime_end = Instant::now() + cfg.max_connection_lifetime;
        let mut rbuf = BytesMut::new();
        let mut actions = Vec::new();
        let mut control_done = false;
        let mut outbound_done = false;
        let mut shutdown_seen = false;
        let mut drain_deadline: Option<Instant> = None;
        let mut lifetime_done = false;
        // One timer for the connection, moved when the next deadline changes.
        let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(lifetime_end));
        tokio::pin!(timer);
        let mut timer_at = Some(lifetime_end);

        loop {
            // Feed complete frames already buffered, as long as the session takes them.
            let mut fed = false;
            while self.session.wants_read() && !self.closing {
                match frame_len(&rbuf, self.session.max_packet_size()) {
                    Ok(Some(n)) => {
                        fed = true;
                        let frame = rbuf.split_to(n);
                        match codec::decode(self.session.protocol(), &frame) {
                            Ok(packet) => {
                                self.session.on_packet(packet, Instant::now(), &mut actions)
                            }
                            Err(e) => self.session.on_decode_error(&e, &mut actions),
                        }
                    }
                    Ok(None) => break,
                    Err(e) => self.session.on_decode_error(&e, &mut actions),
                }
                self.apply(&mut actions);
            }
            if fed && self.connected {
                // The device's bucket as this connection leaves it, for its next connection.
                inner.buckets(self.peer.kind).put(
                    &self.peer.meter,
                    self.session.bucket(),
                    Instant::now(),
                );
            }
            if rbuf.is_empty() && rbuf.capacity() > 16 * 1024 {
                rbuf = BytesMut::new();
            }
            if !self.flush(tls).await || self.closing {
                return;
            }

            let now = Instant::now();
            if self.session.is_draining() && drain_deadline.is_none() {
                // The session stopped reading (ACL refusal under MQTT 5, rate limit): bound the
                // wait for the verdicts still due.
                drain_deadline = Some(now + cfg.shutdown_grace);
            }
            // The next instant something is due: session deadline (CONNECT / keep-alive),
            // connection lifetime (once), drain deadline. None: an hour from now.
            let wake = [
                self.session.deadline(),
                (!lifetime_done).then_some(lifetime_end),
                drain_deadline,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
            if timer_at != Some(wake) {
                timer_at = Some(wake);
                timer.as_mut().reset(tokio::time::Instant::from_std(wake));
            }
            let want_read = self.session.wants_read();
            tokio::select! {
                biased;
                cause = &mut self.control_rx, if !control_done => {
                    control_done = true;
                    if let Ok(cause) = cause {
                        if cause == Cancel::Shutdown {
                            drain_deadline = Some(now + cfg.shutdown_grace);
                        }
                        self.session.on_cancel(cause, &mut actions);
                    }
                }
                () = shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    drain_deadline = Some(now + cfg.shutdown_grace);
                    self.session.on_cancel(Cancel::Shutdown, &mut actions);
                }
                verdicts = next_verdicts(&mut self.pending), if !self.pending.is_empty() => {
                    for (seq, verdict) in verdicts {
                        self.session.on_verdict(seq, verdict, &mut actions);
                    }
                }
                request = self.outbound_rx.recv(), if !outbound_done => match request {
                    Some(OutboundRequest { topic, payload, done }) => {
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        self.waiting.insert(tag, done);
                        self.session.publish(&topic, payload, tag, &mut actions);
                    }
                    // Out of the registry (taken over, revoked, disconnected): no more requests.
                    None => outbound_done = true,
                },
                read = tls.read_buf(&mut rbuf), if want_read => match read {
                    // The client closed the connection (or it broke): nothing more to send.
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    // Fired: re-arm on the next turn even if the instant did not change.
                    timer_at = None;
                    let now = Instant::now();
                    if drain_deadline.is_some_and(|d| now >= d) {
                        self.session.force_close(&mut actions);
                    } else if now >= lifetime_end && !lifetime_done {
                        lifetime_done = true;
                        self.session.on_cancel(Cancel::Lifetime, &mut actions);
                        drain_deadline.get_or_insert(now + cfg.shutdown_grace);
                    } else {
                        self.session.on_tick(now, &mut actions);
                    }
                }
            }
            self.apply(&mut actions);
        }
    }

    /// Writes what the session queued; false if the connection is unusable.
    async fn flush(&mut self, tls: &mut TlsStream<TcpStream>) -> bool {
        if self.wbuf.is_empty() {
            return true;
        }
        let data = self.wbuf.split();
        let write = async {
            tls.write_all(&data).await?;
            tls.flush().await
        };
        matches!(
            tokio::time::timeout(self.inner.config.write_timeout, write).await,
            Ok(Ok(()))
        )
    }

    /// Carries out the session's actions (except writing, done by [`Self::flush`]).
    fn apply(&mut self, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Send(bytes) => self.wbuf.extend_from_slice(&bytes),
                Action::Deliver(d) => {
                    self.inner
                        .counters
                        .publishes
                        .fetch_add(1, Ordering::Relaxed);
                    let msg = InboundPublish {
                        meter_id: self.peer.meter.clone(),
                        device: self.peer.kind,
                        cert_spki: Arc::clone(&self.peer.spki),
                        cert_serial: self.peer.serial.clone(),
                        topic: d.topic,
                        payload: d.payload,
                        qos: d.qos as u8,
                        source: self.addr,
                        received_at: self.inner.now(),
                    };
                    // Called here, in PUBLISH order; the future is polled by this loop.
                    let fut = self.inner.handler.handle(msg);
                    self.pending.push((d.seq, Box::pin(fut)));
                }
                Action::Event { reason, detail } => {
                    if matches!(
                        reason,
                        Reason::RateLimited | Reason::PacketTooLarge | Reason::MalformedPacket
                    ) {
                        self.abused = true;
                    }
                    self.inner
                        .event(reason, Some(&self.peer.meter), self.addr, detail);
                }
                Action::Connected { .. } => self.register(),
                Action::Subscribed { topic } => {
                    tracing::debug!(topic = %topic, "meter subscribed");
                    self.inner
                        .events
                        .subscribed(&self.peer.meter, &topic, self.inner.now());
                }
                Action::OutboundDone { tag, result } => {
                    if let OutboundResult::Refused(why) = &result {
                        tracing::debug!(reason = %why, "head-end publish refused");
                    }
                    if let Some(done) = self.waiting.remove(&tag) {
                        // The caller may have stopped waiting: nothing to do then.
                        let _ = done.send(result);
                    }
                }
                Action::Close => self.closing = true,
            }
        }
    }

    /// CONNECT accepted: enter the registry, taking over an older session of the same device.
    fn register(&mut self) {
        let Some(control) = self.control_tx.take() else {
            return;
        };
        let meter = self.peer.meter.clone();
        let kind = self.peer.kind;
        let mut reg = lock(&self.inner.registry);
        if reg.revoked.contains(self.peer) {
            drop(reg);
            // Revoked between the handshake and now (a reload raced us).
            let mut actions = Vec::new();
            self.session.on_cancel(Cancel::Revoked, &mut actions);
            self.apply(&mut actions);
            return;
        }
        // The meter's message rate is limited per meter, not per connection: this connection
        // continues with the bucket the meter's earlier ones left (reconnecting refills nothing).
        if let Some(bucket) = self.inner.buckets(kind).get(&meter) {
            self.session.set_bucket(bucket);
        }
        let Some(outbound) = self.outbound_tx.take() else {
            return;
        };
        let old = reg.live.insert(
            (kind, meter.clone()),
            Live {
                conn_id: self.conn_id,
                addr: self.addr,
                cert: Arc::clone(self.peer),
                control,
                outbound,
            },
        );
        let previous = old.map(|old| {
            tracing::debug!(previous = %old.addr, "takes over the {kind}'s older session");
            let _ = old.control.send(Cancel::TakenOver);
            old.addr
        });
        tracing::debug!(%kind, "session started");
        self.connected = true;
        // Reported under the registry lock so that connect / disconnect / takeover reports of
        // one device reach the sink in registry order (the sink does not block).
        let now = self.inner.now();
        self.inner
            .events
            .device_connection(&meter, kind, self.addr, true, now);
        if let Some(previous) = previous {
            self.inner
                .events
                .session_replaced(&meter, previous, self.addr, now);
        }
    }

    /// The connection is over: closes the session (if the connection ended under it), so every
    /// head-end → meter message not acknowledged ends with [`OutboundResult::Disconnected`],
    /// and answers the same to requests that had not reached the session yet. Closing the
    /// channel first makes [`Endpoint::publish`] answer `NotConnected` from here on.
    fn end_outbound(&mut self) {
        let mut actions = Vec::new();
        self.session.on_connection_lost(&mut actions);
        self.apply(&mut actions);
        self.outbound_rx.close();
        while let Ok(request) = self.outbound_rx.try_recv() {
            let _ = request.done.send(OutboundResult::Disconnected);
        }
        for (_, done) in self.waiting.drain() {
            let _ = done.send(OutboundResult::Disconnected);
        }
    }

    /// The connection is over: verdicts still due are no longer needed, but the pipeline's work
    /// must finish. Polls every pending future once more (so each was started, in order), then
    /// hands the unfinished ones to tasks of their own.
    async fn orphan_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let mut unfinished = Vec::with_capacity(pending.len());
        let mut pending = pending.into_iter();
        std::future::poll_fn(|cx| {
            for (_, mut fut) in pending.by_ref() {
                if fut.as_mut().poll(cx).is_pending() {
                    unfinished.push(fut);
                }
            }
            Poll::Ready(())
        })
        .await;
        for fut in unfinished {
            tokio::spawn(fut.in_current_span());
        }
    }

    /// Leaves the registry (if still ours) and reports the disconnect, unless a newer session of
    /// the same meter has taken over (it owns the meter's connection state).
    fn finish(&mut self) {
        if !self.connected {
            return;
        }
        let meter = &self.peer.meter;
        let key = (self.peer.kind, meter.clone());
        let mut reg = lock(&self.inner.registry);
        let report = match reg.live.get(&key) {
            Some(l) if l.conn_id == self.conn_id => {
                reg.live.remove(&key);
                true
            }
            Some(_) => false,
            // Removed by a reload (revoked) or an operator.
            None => true,
        };
        tracing::debug!(abused = self.abused, "session ended");
        if report {
            self.inner.events.device_connection(
                meter,
                self.peer.kind,
                self.addr,
                false,
                self.inner.now(),
            );
        }
    }
}
