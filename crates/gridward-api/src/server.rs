//! The HTTPS server: TCP → TLS (the Gridward profile, client certificate optional, CRLs
//! enforced on any presented) → HTTP/1.1 or HTTP/2 (ALPN) → the axum router, with what TLS
//! learnt about the peer in every request's extensions ([`ConnInfo`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gridward_pki::tls::{TlsMaterial, TlsOptions, server_config_with};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::{ConnInfo, cert_credential};
use crate::routes::router_and_doc;
use crate::state::ApiContext;

/// How the API listens.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiConfig {
    /// The address to bind (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The server certificate, key, trust anchors and CRLs.
    pub tls: TlsMaterial,
    /// At most this many connections at once.
    pub max_connections: usize,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// An HTTP/1.1 request header must arrive within this.
    pub header_timeout: Duration,
}

impl ApiConfig {
    /// Defaults: 1024 connections, 10 s handshake and header deadlines.
    pub fn new(listen: SocketAddr, tls: TlsMaterial) -> Self {
        Self {
            listen,
            tls,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the API cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// rustls refused the TLS material.
    #[error("API TLS: {0}")]
    Tls(#[from] gridward_pki::tls::TlsError),
    /// The address cannot be bound.
    #[error("cannot listen on {addr} for the API: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A running API. Dropping it without [`RunningApi::shutdown`] leaves it running until the
/// runtime ends.
#[derive(Debug)]
pub struct RunningApi {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    tls: tokio::sync::watch::Sender<Arc<rustls::ServerConfig>>,
    options: TlsOptions,
}

impl RunningApi {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Uses new TLS material (renewed certificate, new CRLs) for the connections that follow.
    ///
    /// # Errors
    ///
    /// [`ApiError::Tls`] if the material is refused; the old configuration stays.
    pub fn reload_tls(&self, tls: &TlsMaterial) -> Result<(), ApiError> {
        let config = server_config_with(tls, &self.options)?;
        self.tls.send_replace(config);
        Ok(())
    }

    /// Stops accepting and waits (up to 10 s) for requests in flight.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
    }
}

fn tls_options() -> TlsOptions {
    TlsOptions::new()
        .with_alpn(["h2", "http/1.1"])
        .with_optional_client_certificate()
}

/// Binds `config.listen` and serves the API until [`RunningApi::shutdown`].
///
/// # Errors
///
/// [`ApiError::Tls`], [`ApiError::Bind`].
pub async fn start(config: ApiConfig, ctx: Arc<ApiContext>) -> Result<RunningApi, ApiError> {
    let options = tls_options();
    let tls = server_config_with(&config.tls, &options)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: config.listen,
        source,
    })?;
    let (tls_tx, tls_rx) = tokio::sync::watch::channel(tls);
    let events = Arc::clone(&ctx);
    let (router, _) = router_and_doc(ctx);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let loop_cancel = cancel.clone();
    let loop_tracker = tracker.clone();
    let handshake_timeout = config.handshake_timeout;
    tracker.spawn(async move {
        loop {
            let permit = tokio::select! {
                () = loop_cancel.cancelled() => return,
                p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (tcp, peer) = tokio::select! {
                () = loop_cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = TlsAcceptor::from(Arc::clone(&tls_rx.borrow()));
            let router = router.clone();
            let http = http.clone();
            let events = Arc::clone(&events);
            let cancel = loop_cancel.clone();
            loop_tracker.spawn(async move {
                let _permit = permit;
                let span = tracing::info_span!("api_connection", %peer);
                let _guard = span.enter();
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let reason = gridward_pki::tls::handshake_error_reason(&e);
                        tracing::info!(error = %e, reason = reason.code(), "API TLS handshake refused");
                        events.security_event(reason.code(), None, peer.ip(), format!("HTTPS API: TLS handshake refused: {e}"));
                        return;
                    }
                    Err(_) => {
                        tracing::info!("API TLS handshake timed out");
                        events.security_event(gridward_core::security::Reason::Timeout.code(), None, peer.ip(), "HTTPS API: TLS handshake not finished in time");
                        return;
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| cert_credential(c.as_ref()));
                let info = ConnInfo { peer, cert };
                let service =
                    hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                        req.extensions_mut().insert(info.clone());
                        router.clone().oneshot(req.map(axum::body::Body::new))
                    });
                drop(_guard);
                let conn = http.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "API connection ended with an error");
                        }
                    }
                    () = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    Ok(RunningApi {
        local_addr,
        cancel,
        tracker,
        tls: tls_tx,
        options,
    })
}
