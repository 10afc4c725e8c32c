//! The IO around [`Formatter`]: one tokio task per collector that takes messages from a
//! bounded queue and sends them over UDP (RFC 5426), TCP (RFC 6587 octet counting) or TLS
//! (RFC 5425).
//!
//! ```text
//!  SyslogHandle::send ── try_send ──► bounded queue ──► task: format, frame ──► collector
//!  (never waits: full → dropped)                         reconnect with capped backoff
//! ```
//!
//! - UDP: one message per datagram, cut to 2048 bytes at a UTF-8 boundary
//!   ([`Formatter::format_truncated`]); a failed send is counted and the message dropped.
//! - TCP and TLS: octet-counted frames on one connection, opened when the first message
//!   comes and again after an error, with capped exponential backoff and full jitter.
//!   A message whose write failed is sent again, once, on the next connection.
//!   While idle, the task reads from the connection so that a collector closing it is noticed
//!   before the next message is written into a dead socket. (A write that TCP accepted can
//!   still be lost if the collector dies before reading it: syslog has no acknowledgements.)
//! - Shutdown (the [`CancellationToken`]): the queue is closed, what it holds is sent within
//!   [`SenderConfig::flush_timeout`], the rest is counted as failed, the connection is closed
//!   (TLS with `close_notify`), and [`SyslogHandle::stopped`] completes.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::message::{Formatter, SyslogMessage, octet_counted};

/// Largest UDP datagram sent (RFC 5426 §3.2: every receiver should accept 2048 bytes).
pub const MAX_UDP_MESSAGE: usize = 2048;

/// How messages reach the collector.
#[derive(Clone)]
#[non_exhaustive]
pub enum Transport {
    /// UDP, one message per datagram (RFC 5426).
    Udp,
    /// TCP with octet-counting framing (RFC 6587 §3.4.1).
    Tcp,
    /// TLS with octet-counting framing (RFC 5425).
    Tls {
        /// The client configuration, e.g. from `gridward_pki::tls::client_config`.
        config: Arc<ClientConfig>,
        /// The name the collector's certificate must carry.
        server_name: ServerName<'static>,
    },
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Udp => f.write_str("Udp"),
            Self::Tcp => f.write_str("Tcp"),
            Self::Tls { server_name, .. } => f
                .debug_struct("Tls")
                .field("server_name", server_name)
                .finish_non_exhaustive(),
        }
    }
}

/// Where and how to send.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SenderConfig {
    /// The collector.
    pub addr: SocketAddr,
    /// UDP, TCP or TLS.
    pub transport: Transport,
    /// Facility, HOSTNAME, APP-NAME, PROCID, SD-ID.
    pub formatter: Formatter,
    /// Most messages waiting to be sent; more are dropped (and counted).
    pub queue: usize,
    /// Deadline of TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Deadline of writing one message; a collector slower than that is reconnected.
    pub write_timeout: Duration,
    /// First delay before reconnecting after an error.
    pub backoff_initial: Duration,
    /// Longest delay before reconnecting.
    pub backoff_max: Duration,
    /// How long shutdown may take to send what is queued.
    pub flush_timeout: Duration,
}

impl SenderConfig {
    /// A configuration with the defaults: a queue of 4096 messages, 5 s to connect, 10 s to
    /// write, reconnecting after 100 ms doubling up to 30 s, 2 s to flush at shutdown.
    pub fn new(addr: SocketAddr, transport: Transport, formatter: Formatter) -> Self {
        Self {
            addr,
            transport,
            formatter,
            queue: 4096,
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            flush_timeout: Duration::from_secs(2),
        }
    }
}

/// Counters of one sender.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyslogStats {
    /// Messages written to the socket (TCP, TLS) or sent as a datagram (UDP).
    pub sent: u64,
    /// Messages refused by [`SyslogHandle::send`]: queue full, or the sender stopped.
    pub dropped: u64,
    /// Messages given up after they were queued: a second failed write, a failed datagram,
    /// or still queued when the shutdown flush ran out of time.
    pub failed: u64,
    /// Failed connects, handshakes and writes, and connections the collector closed.
    pub connection_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    connection_errors: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The caller's side of a running sender; cheap to clone.
#[derive(Debug, Clone)]
pub struct SyslogHandle {
    tx: mpsc::Sender<SyslogMessage>,
    counters: Arc<Counters>,
    stopped: CancellationToken,
}

impl SyslogHandle {
    /// Queues `message` without waiting. Returns `false` (and counts it as dropped) if the
    /// queue is full or the sender has stopped: the caller never waits on the collector.
    pub fn send(&self, message: SyslogMessage) -> bool {
        match self.tx.try_send(message) {
            Ok(()) => true,
            Err(_) => {
                Counters::add(&self.counters.dropped, 1);
                false
            }
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> SyslogStats {
        let c = &self.counters;
        SyslogStats {
            sent: c.sent.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            connection_errors: c.connection_errors.load(Ordering::Relaxed),
        }
    }

    /// Completes when the task has ended (after the shutdown token was cancelled and the
    /// queue flushed or the flush timed out).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.stopped.clone();
        async move { token.cancelled().await }
    }
}

/// Starts senders.
#[derive(Debug)]
#[non_exhaustive]
pub struct Sender;

impl Sender {
    /// Spawns the task that sends to `config.addr` until `shutdown` is cancelled.
    ///
    /// Nothing is connected here: the first message opens the connection, and errors are
    /// counted in [`SyslogHandle::stats`], never returned.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (as [`tokio::spawn`]).
    pub fn start(config: SenderConfig, shutdown: CancellationToken) -> SyslogHandle {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let counters = Arc::new(Counters::default());
        let stopped = CancellationToken::new();
        let task = Task {
            config,
            rx,
            counters: Arc::clone(&counters),
            shutdown,
        };
        let done = stopped.clone();
        tokio::spawn(async move {
            let _done = done.drop_guard();
            task.run().await;
        });
        SyslogHandle {
            tx,
            counters,
            stopped,
        }
    }
}

/// The delay before reconnection attempt `failures` (1 = after the first failure):
/// `initial * 2^(failures-1)` capped at `max`, scaled by `jitter` in `[0, 1]` (full jitter),
/// and never under 1 ms.
pub fn backoff_delay(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = initial.saturating_mul(1u32 << (failures - 1).min(20));
    let capped = exp.min(max);
    capped
        .mul_f64(jitter.clamp(0.0, 1.0))
        .max(Duration::from_millis(1))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = Box<dyn Io>;

struct Task {
    config: SenderConfig,
    rx: mpsc::Receiver<SyslogMessage>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
}

/// What became of one frame.
enum Outcome {
    /// Written.
    Sent,
    /// Written twice without success.
    Failed,
    /// Shutdown came while waiting to reconnect; the frame is still to send.
    Interrupted,
}

/// What woke the idle loop.
enum Wake {
    Shutdown,
    Message(Option<SyslogMessage>),
    Closed,
}

impl Task {
    async fn run(mut self) {
        match self.config.transport.clone() {
            Transport::Udp => self.run_udp().await,
            Transport::Tcp => self.run_stream(None).await,
            Transport::Tls {
                config,
                server_name,
            } => {
                self.run_stream(Some((TlsConnector::from(config), server_name)))
                    .await;
            }
        }
    }

    fn error(&self) {
        Counters::add(&self.counters.connection_errors, 1);
    }

    // ----- UDP -----------------------------------------------------------------------------

    async fn run_udp(&mut self) {
        let mut socket: Option<UdpSocket> = None;
        loop {
            let message = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                m = self.rx.recv() => m,
            };
            let Some(message) = message else { break };
            self.send_datagram(&mut socket, &message).await;
        }
        self.rx.close();
        let deadline = Instant::now() + self.config.flush_timeout;
        while let Ok(message) = self.rx.try_recv() {
            if Instant::now() >= deadline {
                self.count_left_failed(1);
                break;
            }
            self.send_datagram(&mut socket, &message).await;
        }
    }

    async fn send_datagram(&self, socket: &mut Option<UdpSocket>, message: &SyslogMessage) {
        if socket.is_none() {
            let local: SocketAddr = if self.config.addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            match UdpSocket::bind(local).await {
                Ok(s) => *socket = Some(s),
                Err(_) => {
                    self.error();
                    Counters::add(&self.counters.failed, 1);
                    return;
                }
            }
        }
        let Some(s) = socket.as_ref() else { return };
        let bytes = self
            .config
            .formatter
            .format_truncated(message, MAX_UDP_MESSAGE);
        let sent = tokio::time::timeout(
            self.config.write_timeout,
            s.send_to(&bytes, self.config.addr),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Counters::add(&self.counters.sent, 1),
            _ => {
                // An ICMP error from an earlier datagram can surface here; a new socket
                // starts clean.
                *socket = None;
                self.error();
                Counters::add(&self.counters.failed, 1);
            }
        }
    }

    /// Counts `n` plus whatever is still queued as failed.
    fn count_left_failed(&mut self, n: u64) {
        let mut left = n;
        while self.rx.try_recv().is_ok() {
            left += 1;
        }
        Counters::add(&self.counters.failed, left);
    }

    // ----- TCP and TLS ---------------------------------------------------------------------

    async fn run_stream(&mut self, tls: Option<(TlsConnector, ServerName<'static>)>) {
        let mut link = Link {
            conn: None,
            failures: 0,
            tls,
        };
        let mut pending: Option<(Vec<u8>, bool)> = None;
        loop {
            let (frame, retried) = match pending.take() {
                Some(p) => p,
                None => {
                    let wake = tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => Wake::Shutdown,
                        () = peer_closed(link.conn.as_mut()) => Wake::Closed,
                        m = self.rx.recv() => Wake::Message(m),
                    };
                    match wake {
                        Wake::Shutdown | Wake::Message(None) => break,
                        Wake::Closed => {
                            link.conn = None;
                            self.error();
                            continue;
                        }
                        Wake::Message(Some(m)) => {
                            (octet_counted(&self.config.formatter.format(&m)), false)
                        }
                    }
                }
            };
            let stop = self.shutdown.clone();
            match self.deliver(&mut link, &frame, retried, &stop).await {
                Outcome::Sent | Outcome::Failed => {}
                Outcome::Interrupted => {
                    pending = Some((frame, retried));
                    break;
                }
            }
        }
        self.flush(&mut link, pending).await;
        if let Some(mut conn) = link.conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.shutdown()).await;
        }
    }

    /// Sends what is left within the flush timeout; counts the rest as failed.
    async fn flush(&mut self, link: &mut Link, pending: Option<(Vec<u8>, bool)>) {
        self.rx.close();
        let deadline = Instant::now() + self.config.flush_timeout;
        let never = CancellationToken::new();
        let mut next = pending;
        loop {
            let (frame, retried) = match next.take() {
                Some(p) => p,
                None => match self.rx.try_recv() {
                    Ok(m) => (octet_counted(&self.config.formatter.format(&m)), false),
                    Err(_) => return,
                },
            };
            let result =
                tokio::time::timeout_at(deadline, self.deliver(link, &frame, retried, &never))
                    .await;
            if result.is_err() {
                link.conn = None;
                self.count_left_failed(1);
                return;
            }
        }
    }

    /// Writes one frame, connecting (with backoff) as needed; a frame whose write failed is
    /// written once more on the next connection unless `retried` already.
    async fn deliver(
        &self,
        link: &mut Link,
        frame: &[u8],
        mut retried: bool,
        stop: &CancellationToken,
    ) -> Outcome {
        loop {
            if link.conn.is_none() {
                if link.failures > 0 {
                    let delay = backoff_delay(
                        link.failures,
                        self.config.backoff_initial,
                        self.config.backoff_max,
                        rand::random::<f64>(),
                    );
                    tokio::select! {
                        () = stop.cancelled() => return Outcome::Interrupted,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                match self.connect(link.tls.as_ref()).await {
                    Ok(conn) => link.conn = Some(conn),
                    Err(_) => {
                        self.error();
                        link.failures = link.failures.saturating_add(1);
                        continue;
                    }
                }
            }
            let Some(conn) = link.conn.as_mut() else {
                continue;
            };
            let written = tokio::time::timeout(self.config.write_timeout, async {
                conn.write_all(frame).await?;
                conn.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    link.failures = 0;
                    Counters::add(&self.counters.sent, 1);
                    return Outcome::Sent;
                }
                _ => {
                    link.conn = None;
                    link.failures = link.failures.saturating_add(1);
                    self.error();
                    if retried {
                        Counters::add(&self.counters.failed, 1);
                        return Outcome::Failed;
                    }
                    retried = true;
                }
            }
        }
    }

    async fn connect(&self, tls: Option<&(TlsConnector, ServerName<'static>)>) -> io::Result<Conn> {
        let addr = self.config.addr;
        let open = async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let conn: Conn = match tls {
                None => Box::new(tcp),
                Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
            };
            Ok(conn)
        };
        match tokio::time::timeout(self.config.connect_timeout, open).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }
}

/// The connection of a TCP or TLS sender.
struct Link {
    conn: Option<Conn>,
    /// Failed connects and writes since the last successful write.
    failures: u32,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// Completes when the collector closes `conn` (or it fails); never without a connection.
/// Anything the collector sends is ignored. Cancel-safe: it only reads.
fn peer_closed(conn: Option<&mut Conn>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let Some(conn) = conn else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 512];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(30);
        assert_eq!(backoff_delay(0, i, m, 1.0), Duration::ZERO);
        assert_eq!(backoff_delay(1, i, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(2, i, m, 1.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(4, i, m, 1.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(20, i, m, 1.0), m);
        assert_eq!(backoff_delay(u32::MAX, i, m, 1.0), m);
        assert_eq!(backoff_delay(2, i, m, 0.5), Duration::from_millis(100));
        assert_eq!(backoff_delay(2, i, m, 0.0), Duration::from_millis(1));
        assert_eq!(backoff_delay(2, i, m, 7.0), Duration::from_millis(200));
    }
}
