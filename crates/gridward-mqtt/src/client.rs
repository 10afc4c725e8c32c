//! A minimal async MQTT 3.1.1 / 5 client over TLS: what simulated meters and concentrators,
//! tests and the attack harness need, and nothing more.
//!
//! It knows no topic: the caller names each one, so a meter publishes to `meters/{id}/readings`
//! and a data concentrator to `concentrators/{id}/relay` (relay batches up to
//! `gridward_core::relay::MAX_RELAY_BYTES`; outgoing packets are not size-limited here, the
//! endpoint's per-device maximum applies) with the same client.
//!
//! - [`connect_tls`]: TCP + TLS (the caller's rustls [`ClientConfig`]) + CONNECT / CONNACK.
//! - Publishing with caller-chosen packet ids, without waiting for PUBACKs (pipelining):
//!   [`ClientWriter::publish`], or [`ClientWriter::queue_publish`] + [`ClientWriter::flush`]
//!   to put several publishes into one write.
//! - Receiving whatever the server sends: [`ClientReader::recv`] returns one [`Packet`]
//!   (`PubAck { pkid, reason_code }`, `SubAck`, `PingResp`, `Publish`, `Disconnect`, ...).
//! - [`Client::into_split`]: a reader and a writer half for two tasks.
//! - Raw bytes for malformed-frame tests: [`ClientWriter::send_raw`], and [`tls_connect`] +
//!   [`Client::new`] for a TLS connection on which no CONNECT has been sent yet.
//!
//! The client does no keep-alive on its own: call [`ClientWriter::ping`] within the keep-alive
//! interval when idle. It does not acknowledge incoming QoS 1 publishes either (Gridward's
//! command topic is the only thing a meter subscribes to; use [`ClientWriter::puback`]).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(config: std::sync::Arc<rustls::ClientConfig>) -> Result<(), gridward_mqtt::client::ClientError> {
//! use std::time::Duration;
//! use gridward_mqtt::client::{connect_tls, ClientOptions, Packet, Protocol, QoS};
//!
//! let opts = ClientOptions {
//!     client_id: "MTR-0001".into(),
//!     keep_alive: Duration::from_secs(60),
//!     clean_session: true,
//!     protocol: Protocol::V311,
//!     connect_timeout: Duration::from_secs(10),
//! };
//! let (client, _connack) = connect_tls("127.0.0.1:8883", "localhost", config, &opts).await?;
//! let (mut reader, mut writer) = client.into_split();
//! // Two publishes in flight at once (caller-chosen packet ids 1 and 2).
//! writer.publish("meters/MTR-0001/readings", b"envelope 1".to_vec(), QoS::AtLeastOnce, 1).await?;
//! writer.publish("meters/MTR-0001/readings", b"envelope 2".to_vec(), QoS::AtLeastOnce, 2).await?;
//! for _ in 0..2 {
//!     match reader.recv().await? {
//!         Packet::PubAck { pkid, reason_code } => println!("acked {pkid}: {reason_code:#x}"),
//!         other => println!("unexpected {}", other.name()),
//!     }
//! }
//! writer.disconnect().await?;
//! # Ok(()) }
//! ```

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::codec::{self, frame_len};
pub use crate::codec::{CodecError, Packet, Protocol, QoS};

/// Default limit on the size of a packet the client accepts from the server: 1 MiB.
pub const DEFAULT_MAX_INCOMING_PACKET: usize = 1 << 20;

/// What to send in CONNECT, and how long connecting may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// The MQTT ClientID (for a Gridward meter: its meter id).
    pub client_id: String,
    /// Keep-alive announced in CONNECT (whole seconds, at most 65,535; zero disables it).
    pub keep_alive: Duration,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_session: bool,
    /// Protocol version.
    pub protocol: Protocol,
    /// Bound on TCP connect + TLS handshake + CONNECT/CONNACK together.
    pub connect_timeout: Duration,
}

impl ClientOptions {
    /// Options for `client_id`: keep-alive 60 s, clean session, MQTT 3.1.1, connect timeout 10 s.
    pub fn new(client_id: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            keep_alive: Duration::from_secs(60),
            clean_session: true,
            protocol: Protocol::V311,
            connect_timeout: Duration::from_secs(10),
        }
    }

    fn keep_alive_secs(&self) -> u16 {
        u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX)
    }
}

/// The server's answer to CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Session present flag.
    pub session_present: bool,
    /// 3.1.1 return code (5 = not authorized) or MQTT 5 reason code (0x87 = not authorized);
    /// 0 is success.
    pub code: u8,
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    InvalidServerName(String),
    /// The TLS handshake failed (see [`ClientError::tls_error`] for rustls' reason).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// Connecting (TCP + TLS + CONNACK) took longer than [`ClientOptions::connect_timeout`].
    #[error("connect timed out")]
    Timeout,
    /// The server answered CONNECT with a failure code.
    #[error("connection refused by the server: code {:#04x}", .0.code)]
    Refused(ConnAck),
    /// The server sent something other than CONNACK first.
    #[error("expected CONNACK, got {0}")]
    UnexpectedPacket(&'static str),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// Reading or writing failed (a TLS alert from the server shows up here too).
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// A packet could not be encoded, or the server sent one that does not decode.
    #[error("{0}")]
    Codec(#[from] CodecError),
}

impl ClientError {
    /// The rustls error behind a handshake or I/O failure, if there is one
    /// (e.g. `AlertReceived(CertificateRevoked)` when the server refused our certificate).
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            Self::Handshake(e) | Self::Io(e) | Self::Connect(e) => e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            _ => None,
        }
    }
}

/// Opens TCP to `addr` and runs the TLS handshake with `config`, without sending CONNECT
/// (for [`Client::new`] / [`Client::handshake`], or to send raw bytes).
///
/// # Errors
///
/// [`ClientError::InvalidServerName`], [`ClientError::Connect`], [`ClientError::Handshake`].
pub async fn tls_connect(
    addr: impl ToSocketAddrs,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| ClientError::InvalidServerName(server_name.to_owned()))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(ClientError::Connect)?;
    // Small packets, latency matters (PUBACK round trips).
    tcp.set_nodelay(true).map_err(ClientError::Connect)?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(ClientError::Handshake)
}

/// Like [`tls_connect`], from the local address `source` (port chosen by the system): a
/// simulated device on an address of its own, e.g. another loopback address.
///
/// # Errors
///
/// As [`tls_connect`]; binding `source` fails as [`ClientError::Connect`].
pub async fn tls_connect_from(
    source: std::net::IpAddr,
    addr: std::net::SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| ClientError::InvalidServerName(server_name.to_owned()))?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(ClientError::Connect)?;
    socket
        .bind(std::net::SocketAddr::new(source, 0))
        .map_err(ClientError::Connect)?;
    let tcp = socket.connect(addr).await.map_err(ClientError::Connect)?;
    tcp.set_nodelay(true).map_err(ClientError::Connect)?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(ClientError::Handshake)
}

/// Connects over TLS and sends CONNECT; returns once a successful CONNACK arrived.
///
/// Note for TLS 1.3: the server checks our certificate after the client considers the
/// handshake complete, so a refused certificate usually surfaces while waiting for CONNACK,
/// as [`ClientError::Io`] or [`ClientError::Closed`] ([`ClientError::tls_error`] tells the alert).
///
/// # Errors
///
/// Those of [`tls_connect`] and [`Client::handshake`], and [`ClientError::Timeout`].
pub async fn connect_tls(
    addr: impl ToSocketAddrs,
    server_name: &str,
    config: Arc<ClientConfig>,
    opts: &ClientOptions,
) -> Result<(Client, ConnAck), ClientError> {
    tokio::time::timeout(opts.connect_timeout, async {
        let stream = tls_connect(addr, server_name, config).await?;
        Client::handshake(stream, opts).await
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// A connected client: a [`ClientReader`] and a [`ClientWriter`] on one stream.
#[derive(Debug)]
pub struct Client<S = TlsStream<TcpStream>> {
    reader: ClientReader<S>,
    writer: ClientWriter<S>,
}

impl<S: AsyncRead + AsyncWrite> Client<S> {
    /// Wraps an established stream without sending anything (raw mode: call
    /// [`ClientWriter::send_raw`] or [`Client::send_connect`] yourself).
    pub fn new(stream: S, protocol: Protocol) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            reader: ClientReader {
                io: r,
                buf: BytesMut::with_capacity(1024),
                protocol,
                max_packet_size: DEFAULT_MAX_INCOMING_PACKET,
            },
            writer: ClientWriter {
                io: w,
                buf: BytesMut::with_capacity(1024),
                protocol,
            },
        }
    }

    /// Sends CONNECT on `stream` and waits for CONNACK (no timeout: wrap it in one).
    ///
    /// # Errors
    ///
    /// [`ClientError::Refused`] for a non-zero CONNACK code, [`ClientError::UnexpectedPacket`],
    /// [`ClientError::Closed`], [`ClientError::Io`], [`ClientError::Codec`].
    pub async fn handshake(
        stream: S,
        opts: &ClientOptions,
    ) -> Result<(Self, ConnAck), ClientError> {
        let mut client = Self::new(stream, opts.protocol);
        client
            .writer
            .send_connect(&opts.client_id, opts.keep_alive_secs(), opts.clean_session)
            .await?;
        match client.reader.recv().await? {
            Packet::ConnAck {
                session_present,
                code,
            } => {
                let ack = ConnAck {
                    session_present,
                    code,
                };
                if code == 0 {
                    Ok((client, ack))
                } else {
                    Err(ClientError::Refused(ack))
                }
            }
            other => Err(ClientError::UnexpectedPacket(other.name())),
        }
    }

    /// Splits into a reader and a writer for two tasks.
    pub fn into_split(self) -> (ClientReader<S>, ClientWriter<S>) {
        (self.reader, self.writer)
    }

    /// The reader half.
    pub fn reader(&mut self) -> &mut ClientReader<S> {
        &mut self.reader
    }

    /// The writer half.
    pub fn writer(&mut self) -> &mut ClientWriter<S> {
        &mut self.writer
    }

    /// See [`ClientReader::recv`].
    ///
    /// # Errors
    ///
    /// As [`ClientReader::recv`].
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        self.reader.recv().await
    }

    /// See [`ClientWriter::send_connect`].
    ///
    /// # Errors
    ///
    /// As [`ClientWriter::send_connect`].
    pub async fn send_connect(
        &mut self,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
    ) -> Result<(), ClientError> {
        self.writer.send_connect(client_id, keep_alive, clean).await
    }

    /// See [`ClientWriter::publish`].
    ///
    /// # Errors
    ///
    /// As [`ClientWriter::publish`].
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        pkid: u16,
    ) -> Result<(), ClientError> {
        self.writer.publish(topic, payload, qos, pkid).await
    }

    /// See [`ClientWriter::subscribe`].
    ///
    /// # Errors
    ///
    /// As [`ClientWriter::subscribe`].
    pub async fn subscribe(
        &mut self,
        pkid: u16,
        filter: &str,
        qos: QoS,
    ) -> Result<(), ClientError> {
        self.writer.subscribe(pkid, filter, qos).await
    }

    /// See [`ClientWriter::ping`].
    ///
    /// # Errors
    ///
    /// As [`ClientWriter::ping`].
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.writer.ping().await
    }

    /// See [`ClientWriter::send_raw`].
    ///
    /// # Errors
    ///
    /// As [`ClientWriter::send_raw`].
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.send_raw(bytes).await
    }

    /// See [`ClientWriter::disconnect`].
    ///
    /// # Errors
    ///
    /// As [`ClientWriter::disconnect`].
    pub async fn disconnect(&mut self) -> Result<(), ClientError> {
        self.writer.disconnect().await
    }
}

/// The receiving half of a [`Client`].
#[derive(Debug)]
pub struct ClientReader<S = TlsStream<TcpStream>> {
    io: ReadHalf<S>,
    buf: BytesMut,
    protocol: Protocol,
    max_packet_size: usize,
}

impl<S: AsyncRead> ClientReader<S> {
    /// Receives the next packet.
    ///
    /// Cancel safe: bytes already read stay buffered if the future is dropped
    /// (so `recv` can sit in a `tokio::select!` next to a timer).
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] at end of stream (also mid-packet), [`ClientError::Io`],
    /// [`ClientError::Codec`] for an oversize or undecodable packet.
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            if let Some(n) = frame_len(&self.buf, self.max_packet_size)? {
                let frame = self.buf.split_to(n);
                return Ok(codec::decode(self.protocol, &frame)?);
            }
            let read = self.io.read_buf(&mut self.buf).await.map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    ClientError::Closed
                } else {
                    ClientError::Io(e)
                }
            })?;
            if read == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Sets the largest packet accepted from the server ([`DEFAULT_MAX_INCOMING_PACKET`] by default).
    pub fn set_max_packet_size(&mut self, max: usize) {
        self.max_packet_size = max;
    }
}

/// The sending half of a [`Client`]. Every method but [`ClientWriter::queue_publish`] writes and
/// flushes; none waits for an answer.
#[derive(Debug)]
pub struct ClientWriter<S = TlsStream<TcpStream>> {
    io: WriteHalf<S>,
    buf: BytesMut,
    protocol: Protocol,
}

impl<S: AsyncWrite> ClientWriter<S> {
    /// The protocol version this client speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Sends CONNECT (no will, no user name, no properties).
    ///
    /// # Errors
    ///
    /// [`ClientError::Codec`] for an over-long client id, [`ClientError::Io`].
    pub async fn send_connect(
        &mut self,
        client_id: &str,
        keep_alive: u16,
        clean: bool,
    ) -> Result<(), ClientError> {
        codec::encode_connect(&mut self.buf, self.protocol, client_id, keep_alive, clean)?;
        self.flush().await
    }

    /// Encodes a PUBLISH into the write buffer without sending it; [`ClientWriter::flush`] sends.
    /// `pkid` is ignored for QoS 0 and must be non-zero otherwise.
    ///
    /// # Errors
    ///
    /// [`ClientError::Codec`] (zero pkid with QoS > 0, over-long topic).
    pub fn queue_publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        pkid: u16,
    ) -> Result<(), ClientError> {
        codec::encode_publish(
            &mut self.buf,
            self.protocol,
            topic,
            qos,
            pkid,
            false,
            payload.into(),
        )?;
        Ok(())
    }

    /// Sends a PUBLISH (QoS 0, 1, or 2 for tests) with packet id `pkid`; does not wait for PUBACK.
    ///
    /// # Errors
    ///
    /// [`ClientError::Codec`], [`ClientError::Io`].
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        pkid: u16,
    ) -> Result<(), ClientError> {
        self.queue_publish(topic, payload, qos, pkid)?;
        self.flush().await
    }

    /// Sends SUBSCRIBE for one filter.
    ///
    /// # Errors
    ///
    /// [`ClientError::Codec`] (zero pkid), [`ClientError::Io`].
    pub async fn subscribe(
        &mut self,
        pkid: u16,
        filter: &str,
        qos: QoS,
    ) -> Result<(), ClientError> {
        codec::encode_subscribe(&mut self.buf, self.protocol, pkid, &[(filter, qos)])?;
        self.flush().await
    }

    /// Sends a PUBACK (for a QoS 1 publish received from the server).
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`].
    pub async fn puback(&mut self, pkid: u16) -> Result<(), ClientError> {
        codec::encode_puback(&mut self.buf, self.protocol, pkid, 0);
        self.flush().await
    }

    /// Sends PINGREQ.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`].
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        codec::encode_pingreq(&mut self.buf);
        self.flush().await
    }

    /// Sends DISCONNECT (normal disconnection) and shuts the stream down for writing.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`].
    pub async fn disconnect(&mut self) -> Result<(), ClientError> {
        codec::encode_disconnect(&mut self.buf, self.protocol, 0);
        self.flush().await?;
        self.io.shutdown().await.map_err(ClientError::Io)
    }

    /// Sends `bytes` as they are (after anything queued): malformed frames, partial packets, floods.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`].
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.buf.extend_from_slice(bytes);
        self.flush().await
    }

    /// Writes everything queued and flushes the stream.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`].
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.buf.is_empty() {
            let data = self.buf.split();
            self.io.write_all(&data).await.map_err(ClientError::Io)?;
        }
        self.io.flush().await.map_err(ClientError::Io)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The client against a scripted peer on an in-memory pipe.
    #[tokio::test]
    async fn connect_publish_and_acks_in_memory() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let (a, mut b) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut seen = Vec::new();
                while seen.len() < 3 {
                    b.read_buf(&mut buf).await.unwrap();
                    while let Some(n) = frame_len(&buf, 1 << 16).unwrap() {
                        let f = buf.split_to(n);
                        let p = codec::decode(protocol, &f).unwrap();
                        let mut out = BytesMut::new();
                        match &p {
                            Packet::Connect(c) => {
                                assert_eq!(c.protocol, protocol);
                                codec::encode_connack(
                                    &mut out,
                                    protocol,
                                    false,
                                    0,
                                    &Default::default(),
                                );
                            }
                            Packet::Publish { pkid, .. } => {
                                codec::encode_puback(
                                    &mut out,
                                    protocol,
                                    *pkid,
                                    if *pkid == 2 { 0x87 } else { 0 },
                                );
                            }
                            _ => {}
                        }
                        b.write_all(&out).await.unwrap();
                        seen.push(p);
                    }
                }
                seen
            });
            let mut opts = ClientOptions::new("MTR-1");
            opts.protocol = protocol;
            let (client, ack) = Client::handshake(a, &opts).await.unwrap();
            assert_eq!(
                ack,
                ConnAck {
                    session_present: false,
                    code: 0
                }
            );
            let (mut r, mut w) = client.into_split();
            w.queue_publish("meters/MTR-1/readings", b"a".to_vec(), QoS::AtLeastOnce, 1)
                .unwrap();
            w.queue_publish("meters/MTR-1/readings", b"b".to_vec(), QoS::AtLeastOnce, 2)
                .unwrap();
            w.flush().await.unwrap();
            let reason = if protocol == Protocol::V5 { 0x87 } else { 0 };
            assert_eq!(
                r.recv().await.unwrap(),
                Packet::PubAck {
                    pkid: 1,
                    reason_code: 0
                }
            );
            assert_eq!(
                r.recv().await.unwrap(),
                Packet::PubAck {
                    pkid: 2,
                    reason_code: reason
                }
            );
            let seen = server.await.unwrap();
            assert_eq!(seen.len(), 3);
            drop(w);
            assert!(matches!(r.recv().await, Err(ClientError::Closed)));
        }
    }

    #[tokio::test]
    async fn refused_connack_is_an_error() {
        let (a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            b.read_buf(&mut buf).await.unwrap();
            let mut out = BytesMut::new();
            codec::encode_connack(&mut out, Protocol::V311, false, 5, &Default::default());
            b.write_all(&out).await.unwrap();
        });
        let err = Client::handshake(a, &ClientOptions::new("X"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Refused(ConnAck { code: 5, .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn zero_pkid_qos1_is_refused_locally() {
        let (a, _b) = tokio::io::duplex(64);
        let mut c = Client::new(a, Protocol::V311);
        let err = c
            .publish("t", b"x".to_vec(), QoS::AtLeastOnce, 0)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ClientError::Codec(CodecError::Malformed { .. })
        ));
    }
}
