//! The HTTPS server: TCP → TLS (the Gridward profile: client certificate required, CRLs
//! checked) → HTTP/1.1 or HTTP/2 (ALPN) → [`check`](crate::check::check) → the
//! [`Writer`] → the answer.
//!
//! - At most `max_connections` connections; the accept loop waits for a free slot.
//! - Deadlines: TLS handshake, request header (HTTP/1.1), request body; bodies are read up
//!   to the limit and no further.
//! - Answers: 201 `{"status":"stored","reading_id":…}`, 200 `{"status":"duplicate",…}`,
//!   a refusal's status with `{"error":"<code>"}`, 503 `{"error":"store_unavailable"}`.
//! - One log event (`tracing`) per refusal and per refused handshake, in a span per connection
//!   (`peer`, then `client`, the certificate identity).
//! - [`RunningSink::shutdown`]: stop accepting, let requests in flight finish (HTTP/2
//!   GOAWAY, HTTP/1.1 close after the answer), then stop the writer after its last commit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gridward_pki::tls::{TlsOptions, server_config_with};
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming as Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::check::{self, Refusal, RequestParts};
use crate::config::{Clock, Keys, SinkConfig};
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{Outcome, SinkStore};
use crate::writer::{WriteError, Writer};
use crate::{Rules, SinkError};

/// How long [`RunningSink::shutdown`] waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest detail written to the log.
const MAX_DETAIL_CHARS: usize = 300;

/// A sink that is listening. Dropping it without [`RunningSink::shutdown`] leaves it running
/// until the runtime ends.
#[derive(Debug)]
pub struct RunningSink {
    local_addr: SocketAddr,
    store: PathBuf,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    writer_thread: std::thread::JoinHandle<()>,
}

impl RunningSink {
    /// The address it listens on (the port chosen for `127.0.0.1:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The store's file (open it with [`SinkStore::open_existing`] to look while it runs).
    pub fn store_path(&self) -> &Path {
        &self.store
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The live counters, to read from elsewhere while the sink runs.
    pub fn stats_handle(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Stops accepting, waits (up to 10 s) for requests in flight, stops the writer after its
    /// last commit, and returns the final counters.
    pub async fn shutdown(self) -> StatsSnapshot {
        self.cancel.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, self.tracker.wait())
            .await
            .is_ok();
        if drained {
            // Every task is gone and with them every writer handle: the thread ends after
            // answering what was queued.
            let thread = self.writer_thread;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.stats.snapshot()
    }
}

/// What every connection shares.
struct Shared {
    keys: Keys,
    rules: Rules,
    clock: Clock,
    writer: Writer,
    stats: Arc<Stats>,
    http: auto::Builder<TokioExecutor>,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    body_timeout: Duration,
}

/// Opens the store, binds `config.listen`, and serves until [`RunningSink::shutdown`].
///
/// # Errors
///
/// [`SinkError::NoKeys`], [`SinkError::Tls`], [`SinkError::Store`], [`SinkError::Bind`],
/// [`SinkError::Thread`].
pub async fn start(config: SinkConfig) -> Result<RunningSink, SinkError> {
    if config.keys.is_empty() {
        return Err(SinkError::NoKeys);
    }
    let tls = server_config_with(
        &config.tls,
        &TlsOptions::new().with_alpn(["h2", "http/1.1"]),
    )?;
    let store = SinkStore::open(&config.store)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| SinkError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| SinkError::Bind {
        addr: config.listen,
        source,
    })?;
    let (writer, writer_thread) =
        Writer::start(store, Arc::clone(&config.clock)).map_err(SinkError::Thread)?;

    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.max_streams)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));

    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared {
        keys: config.keys,
        rules: config.rules,
        clock: config.clock,
        writer,
        stats: Arc::clone(&stats),
        http,
        acceptor: TlsAcceptor::from(tls),
        handshake_timeout: config.handshake_timeout,
        body_timeout: config.body_timeout,
    });
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(accept_loop(
        listener,
        shared,
        Arc::new(Semaphore::new(config.max_connections.max(1))),
        cancel.clone(),
        tracker.clone(),
    ));
    Ok(RunningSink {
        local_addr,
        store: config.store,
        stats,
        cancel,
        tracker,
        writer_thread,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, addr) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, then go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let span = tracing::info_span!("sink", peer = %addr, client = tracing::field::Empty);
        tracker
            .spawn(connection(Arc::clone(&shared), tcp, permit, cancel.clone()).instrument(span));
    }
}

/// One connection: TLS handshake, then HTTP until the client or the shutdown ends it (in the
/// connection's span, which carries the peer address).
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::select! {
        () = cancel.cancelled() => return,
        r = tokio::time::timeout(shared.handshake_timeout, shared.acceptor.accept(tcp)) => r,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.stats.tls_refused();
            tracing::info!(error = %one_line(&e.to_string()), "TLS handshake refused");
            return;
        }
        Err(_) => {
            shared.stats.tls_refused();
            tracing::info!("TLS handshake refused: not complete within the deadline");
            return;
        }
    };
    // The connection's span says who is on the other end from here on.
    let client = identity(tls.get_ref().1.peer_certificates());
    tracing::Span::current().record("client", tracing::field::debug(&client));
    tracing::debug!("TLS handshake complete");
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| {
            let shared = Arc::clone(&shared);
            // Each request runs to its end in a task of its own: a client that goes away
            // mid-request (a crashed forwarder, a timeout) must not cancel a write the store
            // is about to commit, nor its count and log line.
            async move {
                let task =
                    tokio::spawn(async move { handle(&shared, req).await }.in_current_span());
                Ok::<_, Infallible>(task.await.unwrap_or_else(|_| {
                    answer(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"error": "internal"}),
                    )
                }))
            }
        })
    };
    let conn = shared.http.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

/// The identity of the client certificate: what `gridward_pki::identity_of` says, else its
/// subject (a certificate of another CA).
fn identity(chain: Option<&[CertificateDer<'_>]>) -> String {
    let Some(leaf) = chain.and_then(<[_]>::first) else {
        return "(no certificate)".to_owned();
    };
    match gridward_pki::identity_of(leaf) {
        Ok(id) => id.to_string(),
        Err(_) => match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => format!("subject {}", cert.subject()),
            Err(_) => "(unparseable certificate)".to_owned(),
        },
    }
}

/// What the handler decided, besides a refusal.
enum Failure {
    Refused(Refusal),
    Store(WriteError),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

async fn handle(shared: &Shared, req: http::Request<Body>) -> Response<Full<Bytes>> {
    shared.stats.received();
    match receive(shared, req).await {
        Ok((Outcome::Stored { .. }, reading_id)) => {
            shared.stats.stored();
            answer(
                StatusCode::CREATED,
                &serde_json::json!({"status": "stored", "reading_id": reading_id}),
            )
        }
        Ok((_, reading_id)) => {
            shared.stats.duplicate();
            answer(
                StatusCode::OK,
                &serde_json::json!({"status": "duplicate", "reading_id": reading_id}),
            )
        }
        Err(Failure::Refused(r)) => {
            shared.stats.refused(r.code());
            tracing::info!(
                status = r.status(),
                reason = r.code(),
                detail = %one_line(&r.to_string()),
                "request refused"
            );
            let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let mut response = answer(status, &serde_json::json!({"error": r.code()}));
            if status == StatusCode::METHOD_NOT_ALLOWED {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
            }
            response
        }
        Err(Failure::Store(e)) => {
            shared.stats.store_failure();
            tracing::error!(status = 503, error = %e, "store_unavailable");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"error": "store_unavailable"}),
            )
        }
    }
}

/// Reads, checks and stores one request; returns the store's outcome (never `Replay` or
/// `Conflict`, which become refusals) and the reading id.
async fn receive(shared: &Shared, req: http::Request<Body>) -> Result<(Outcome, String), Failure> {
    let (parts, body) = req.into_parts();
    // Header values that are not visible ASCII are kept (lossily), so that a covered one
    // fails the signature check instead of vanishing.
    let owned: Vec<(&str, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let headers: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let hosts: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| *n == "host")
        .map(|(_, v)| *v)
        .collect();
    let authority = check::authority(parts.uri.authority().map(|a| a.as_str()), &hosts);
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target_uri = authority
        .as_ref()
        .map(|a| check::target_uri(a, path_and_query))
        .unwrap_or_default();
    let request = RequestParts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        target_uri: &target_uri,
        headers: &headers,
    };
    let rules = &shared.rules;
    check::check_head(&request, rules)?;
    authority?;

    let too_large = Refusal::BodyTooLarge {
        max: rules.max_body,
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > rules.max_body as u64) {
        return Err(too_large.into());
    }
    let collected = tokio::time::timeout(
        shared.body_timeout,
        Limited::new(body, rules.max_body).collect(),
    )
    .await;
    let body = match collected {
        Err(_) => return Err(Refusal::BodyTimeout(shared.body_timeout.as_secs()).into()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(too_large.into());
        }
        Ok(Err(e)) => return Err(Refusal::BodyIncomplete(e.to_string()).into()),
        Ok(Ok(b)) => b.to_bytes(),
    };

    let incoming = check::check(&request, &body, &shared.keys, rules, (shared.clock)())?;
    let reading_id = incoming.reading().reading_id.clone();
    let key_id = incoming.key_id().to_owned();
    let nonce = incoming.nonce().to_owned();
    match shared.writer.write(incoming).await {
        Ok(Outcome::Replay) => Err(Refusal::NonceReplayed { key_id, nonce }.into()),
        Ok(Outcome::Conflict) => Err(Refusal::ReadingConflict(reading_id).into()),
        Ok(outcome) => Ok((outcome, reading_id)),
        Err(e) => Err(Failure::Store(e)),
    }
}

/// A JSON answer.
fn answer(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(check::CONTENT_TYPE));
    response
}

/// `text` on one line of printable characters, at most [`MAX_DETAIL_CHARS`] long (details
/// may quote what a client sent).
fn one_line(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_DETAIL_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX_DETAIL_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_details_are_single_short_lines() {
        assert_eq!(one_line("a\nb\r\u{1b}[31mc"), "a b  [31mc");
        let long = "x".repeat(1000);
        assert_eq!(one_line(&long).chars().count(), MAX_DETAIL_CHARS + 1);
    }

    #[test]
    fn answers_are_json() {
        let r = answer(
            StatusCode::CREATED,
            &serde_json::json!({"status": "stored"}),
        );
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    }
}
