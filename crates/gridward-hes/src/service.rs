//! The running head-end: the MQTT endpoint, the pipeline, the writer and the store, wired
//! together. `gridward serve` and `gridward demo` both start one of these.

use std::net::SocketAddr;
use std::sync::Arc;

use gridward_core::MeterId;
use gridward_core::security::SecurityEvent;
use gridward_mqtt::{Endpoint, EndpointError, EventSink, InboundPublish, PublishHandler, Verdict};
use gridward_pki::{LeafKind, Pki, PkiError};
use gridward_store::{SqliteStore, Store, StoreError};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::audit::AuditSink;
use crate::config::{Config, SyslogSettings, SyslogTransport};
use crate::forward::{ForwardContext, ForwardError, Forwarders, TargetSnapshot};
use crate::metrics::Metrics;
use crate::pipeline::{Clock, Decision, Message, Pipeline};
use crate::writer::{Writer, WriterThreads};

/// Why the head-end could not start or reload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The PKI directory or the server certificate could not be loaded.
    #[error("PKI: {0}")]
    Pki(#[from] PkiError),
    /// The TLS configuration could not be built.
    #[error("TLS: {0}")]
    Tls(#[from] gridward_pki::tls::TlsError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The endpoint refused its configuration, or reloading failed.
    #[error("MQTT endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    /// A downstream target's certificates or keys could not be loaded.
    #[error("downstream {0}")]
    Forward(#[from] ForwardError),
    /// The audit log or its key could not be opened.
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditStartError),
    /// The users database could not be opened.
    #[error("users database: {0}")]
    Access(#[from] gridward_access::AccessError),
    /// The HTTPS API could not start.
    #[error("{0}")]
    Api(#[from] gridward_api::ApiError),
    /// The syslog collector's TLS material could not be loaded.
    #[error("syslog: {0}")]
    Syslog(String),
    /// Commands could not be set up (a manufacturer key file, the policy).
    #[error(transparent)]
    Commands(#[from] crate::commands::CommandSetupError),
    /// The listen address could not be bound, or a thread could not start.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The pipeline as the endpoint's [`PublishHandler`]; a concentrator's publishes go through
/// [`Relays`](crate::relay::Relays).
#[derive(Debug, Clone)]
pub struct Ingest {
    pipeline: Arc<Pipeline>,
    relays: crate::relay::Relays,
}

impl PublishHandler for Ingest {
    fn handle(&self, msg: InboundPublish) -> impl Future<Output = Verdict> + Send + 'static {
        let pipeline = Arc::clone(&self.pipeline);
        let relays = self.relays.clone();
        async move {
            if msg.device == gridward_mqtt::DeviceKind::Concentrator {
                return relays.handle(msg).await;
            }
            let message = Message {
                meter_id: msg.meter_id,
                cert_spki: msg.cert_spki,
                other_keys: Vec::new(),
                relayed_by: None,
                topic: msg.topic,
                payload: msg.payload.to_vec(),
                source: Some(msg.source.to_string()),
                received_at: msg.received_at,
            };
            match pipeline.handle(message).await {
                Decision::Accepted => Verdict::Accepted,
                Decision::Duplicate => Verdict::Duplicate,
                Decision::Rejected(reason) => Verdict::Rejected(reason),
                Decision::Unavailable => Verdict::Unavailable,
            }
        }
    }
}

/// The endpoint's [`EventSink`]: security events and connection changes to the store, counted,
/// and connections and takeovers to the detectors.
#[derive(Debug, Clone)]
struct Events {
    writer: Writer,
    metrics: Arc<Metrics>,
    commands: Option<Arc<gridward_command::Commands>>,
    detection: Option<crate::detection::DetectionHandle>,
}

impl EventSink for Events {
    fn security_event(&self, event: SecurityEvent) {
        self.metrics.rejected(event.reason);
        self.writer.security_event(event);
    }

    fn connection(&self, meter: &MeterId, connected: bool, at: OffsetDateTime) {
        self.writer.connection(meter, connected, at);
    }

    fn device_connection(
        &self,
        device: &MeterId,
        _kind: gridward_mqtt::DeviceKind,
        source: SocketAddr,
        connected: bool,
        at: OffsetDateTime,
    ) {
        self.writer.connection(device, connected, at);
        if let Some(d) = &self.detection {
            d.signal(if connected {
                gridward_detect::Signal::Connected {
                    meter: device.clone(),
                    at,
                    source: Some(source.to_string()),
                }
            } else {
                gridward_detect::Signal::Disconnected {
                    meter: device.clone(),
                    at,
                }
            });
        }
    }

    fn session_replaced(
        &self,
        device: &MeterId,
        previous: SocketAddr,
        current: SocketAddr,
        at: OffsetDateTime,
    ) {
        if let Some(d) = &self.detection {
            d.signal(gridward_detect::Signal::SessionReplaced {
                meter: device.clone(),
                at,
                previous: previous.to_string(),
                current: current.to_string(),
            });
        }
    }

    fn subscribed(&self, meter: &MeterId, topic: &str, _at: OffsetDateTime) {
        if let Some(commands) = &self.commands
            && topic == meter.commands_topic()
        {
            commands.meter_reachable(meter);
        }
    }
}

/// A running head-end.
#[derive(Debug)]
pub struct Running {
    /// The address the MQTT endpoint listens on.
    pub local_addr: SocketAddr,
    /// The endpoint (reload, connected meters, statistics).
    pub endpoint: Endpoint<Ingest>,
    /// Ingest metrics.
    pub metrics: Arc<Metrics>,
    /// The store.
    pub store: Arc<SqliteStore>,
    /// The HTTPS API's address, when it runs.
    pub api_addr: Option<SocketAddr>,
    /// Users and sessions, when the API runs.
    pub access: Option<Arc<gridward_access::Access>>,
    /// The audit chain.
    pub audit: AuditSink,
    /// Commands and firmware, when a command signer is configured and present.
    pub commands: Option<crate::commands::CommandService>,
    dispatcher: Option<(tokio_util::sync::CancellationToken, JoinHandle<()>)>,
    detection: Option<crate::detection::DetectionThread>,
    meter_keys: Arc<crate::relay::KeyDirectory>,
    api: Option<gridward_api::RunningApi>,
    audit_thread: Option<crate::audit::AuditThread>,
    syslog_stop: tokio_util::sync::CancellationToken,
    forwarders: Forwarders,
    config: Config,
    task: JoinHandle<Result<(), EndpointError>>,
    writer_threads: WriterThreads,
}

/// Starts the head-end described by `config` on the current tokio runtime.
pub async fn start(config: &Config, clock: Clock) -> Result<Running, ServiceError> {
    let material =
        Pki::open(&config.pki_dir, None)?.tls_material(LeafKind::Server, &config.server_name)?;
    let tls = gridward_pki::tls::server_config(&material)?;
    let api_clock = Arc::clone(&clock);
    // Every target's certificates and keys load before anything starts.
    let mut loaded = Vec::with_capacity(config.forward.len());
    for target in &config.forward {
        loaded.push(target.clone().load()?);
    }
    let store = Arc::new(config.open_store()?);
    store.disconnect_all(clock())?;
    let (audit, audit_thread) = AuditSink::start(&config.audit, Arc::clone(&clock))?;
    if let Err(e) = audit.import_pki_log(&config.pki_dir) {
        tracing::warn!(error = %e, "PKI operations not imported into the audit log");
    }
    audit.append(gridward_audit::NewEntry::new(
        clock(),
        gridward_audit::Actor::System,
        "service.start",
        config.listen.to_string(),
        gridward_audit::Outcome::Success,
    ));
    let syslog_stop = tokio_util::sync::CancellationToken::new();
    let syslog = match &config.syslog {
        Some(s) => Some(start_syslog(s, &config.pki_dir, syslog_stop.clone())?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let (detection, detection_thread) = if config.detection.enabled {
        let (handle, thread) = crate::detection::start(
            config.detection.clone(),
            crate::detection::DetectionContext {
                store: Arc::clone(&store) as Arc<dyn gridward_store::AlarmStore>,
                metrics: Arc::clone(&metrics),
                audit: audit.clone(),
                syslog: syslog.clone(),
                clock: Arc::clone(&clock),
            },
        )
        .map_err(|source| ServiceError::Io {
            addr: "detection thread".into(),
            source,
        })?;
        (Some(handle), Some(thread))
    } else {
        tracing::info!("detection is off ([detection] enabled = false)");
        (None, None)
    };
    let hook: crate::writer::SecurityHook = {
        let audit = audit.clone();
        let detection = detection.clone();
        Arc::new(move |event: &gridward_store::SecurityEvent| {
            audit.security_event(event);
            if let Some(syslog) = &syslog {
                syslog.send(syslog_message(event));
            }
            if let Some(d) = &detection {
                d.signal(crate::detection::security_signal(event));
            }
        })
    };
    let mut targets = Vec::with_capacity(loaded.len());
    for t in loaded {
        let id = store.register_outbox_target(&t.settings.name)?;
        targets.push((id, t, Arc::new(Notify::new())));
    }
    let target_ids = targets.iter().map(|(id, _, _)| *id).collect();
    let notifies: Vec<Arc<Notify>> = targets.iter().map(|(_, _, n)| Arc::clone(n)).collect();
    let access = match &config.api {
        Some(settings) => Some(Arc::new(gridward_access::Access::open(
            &settings.users_path,
            gridward_access::Argon2Params::OWASP,
        )?)),
        None => None,
    };
    let command_service = start_commands(config, &store, &audit, access.as_ref(), &clock)?;
    let (last, update_last) = Pipeline::last_counters_table(store.last_counters()?);
    let on_commit: crate::writer::OnCommit = Box::new(move |advanced: &[(MeterId, u64)]| {
        update_last(advanced);
        if !advanced.is_empty() {
            crate::forward::wake_all(&notifies);
        }
    });
    let dyn_store: Arc<dyn Store> = store.clone();
    let (writer, writer_threads) = Writer::start(
        Arc::clone(&dyn_store),
        config.writer,
        Arc::clone(&metrics),
        on_commit,
        target_ids,
    )
    .map_err(|source| ServiceError::Io {
        addr: "writer thread".into(),
        source,
    })?;
    let writer = writer.with_security_hook(Arc::clone(&hook));
    let api_store = Arc::clone(&dyn_store);
    let forwarders = Forwarders::start(
        ForwardContext {
            store: dyn_store,
            writer: writer.clone(),
            clock: Arc::clone(&clock),
        },
        targets,
    );
    let mut pipeline = Pipeline::new(
        config.pipeline,
        writer.clone(),
        Arc::clone(&metrics),
        Arc::clone(&clock),
        last,
    );
    if let Some(service) = &command_service {
        pipeline = pipeline.with_ack_hook(ack_hook(Arc::clone(&service.commands)));
    }
    if let Some(d) = &detection {
        let d = d.clone();
        pipeline = pipeline.with_stored_hook(Arc::new(move |stored, document| {
            if let Some(signal) = crate::detection::stored_signal(stored, document) {
                d.signal(signal);
            }
        }));
    }
    let pipeline = Arc::new(pipeline);
    let meter_keys = Arc::new(crate::relay::KeyDirectory::load(&config.pki_dir)?);
    let relays = crate::relay::Relays {
        pipeline: Arc::clone(&pipeline),
        topology: Arc::clone(&store) as Arc<dyn gridward_store::AlarmStore>,
        keys: Arc::clone(&meter_keys),
        writer: writer.clone(),
    };
    let events = Arc::new(Events {
        writer,
        metrics: Arc::clone(&metrics),
        commands: command_service.as_ref().map(|c| Arc::clone(&c.commands)),
        detection,
    });
    let endpoint = Endpoint::new(
        config.endpoint.clone(),
        tls,
        Arc::new(Ingest { pipeline, relays }),
        events,
        clock,
    )?;
    metrics.watch_endpoint(endpoint.stats_reader());
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServiceError::Io {
            addr: config.listen.to_string(),
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServiceError::Io {
        addr: config.listen.to_string(),
        source,
    })?;
    let ep = endpoint.clone();
    let task = tokio::spawn(async move { ep.run(listener, std::future::pending()).await });
    let dispatcher = command_service.as_ref().map(|service| {
        let stop = tokio_util::sync::CancellationToken::new();
        let dispatcher = gridward_command::Dispatcher::new(
            Arc::clone(&service.commands),
            Arc::new(crate::commands::EndpointTransport::new(endpoint.clone())),
        );
        let handle = tokio::spawn(dispatcher.run(stop.clone()));
        (stop, handle)
    });
    let (api, access) = match (&config.api, access) {
        (Some(settings), Some(access)) => {
            let mut ctx = gridward_api::ApiContext::new(
                api_store,
                Arc::clone(&access),
                audit.log(),
                Arc::clone(&api_clock),
            );
            ctx.pki_dir = Some(config.pki_dir.clone());
            let api_metrics = Arc::clone(&metrics);
            ctx.on_security_event = Some(Arc::new(move |event: &gridward_store::SecurityEvent| {
                api_metrics.record_security_event(&event.reason);
                hook(event);
            }));
            ctx.observer = Some(Arc::new(ApiMetrics(Arc::clone(&metrics))));
            let alarm_store: Arc<dyn gridward_store::AlarmStore> = store.clone();
            ctx = ctx.with_alarms(alarm_store);
            if let Some(service) = &command_service {
                let command_store: Arc<dyn gridward_store::CommandStore> = store.clone();
                ctx = ctx.with_commands(
                    Arc::clone(&service.commands),
                    command_store,
                    Arc::clone(&service.manufacturers),
                );
            }
            let api = gridward_api::start(
                gridward_api::ApiConfig::new(settings.listen, material),
                Arc::new(ctx),
            )
            .await?;
            (Some(api), Some(access))
        }
        _ => (None, None),
    };
    Ok(Running {
        local_addr,
        api_addr: api.as_ref().map(gridward_api::RunningApi::local_addr),
        access,
        audit,
        commands: command_service,
        dispatcher,
        detection: detection_thread,
        meter_keys,
        api,
        audit_thread: Some(audit_thread),
        syslog_stop,
        endpoint,
        metrics,
        store,
        forwarders,
        config: config.clone(),
        task,
        writer_threads,
    })
}

impl Running {
    /// Re-reads the server certificate, the roots and the CRLs from the PKI directory: new
    /// handshakes use them, and connected meters whose certificate is now revoked are
    /// disconnected. Returns how many were.
    ///
    /// Downstream targets rebuild their HTTPS clients from their files the same way; a target
    /// whose files fail to load keeps its current client and the failure is returned.
    pub fn reload(&self) -> Result<usize, ServiceError> {
        let result = self.reload_inner();
        self.audit.append(
            gridward_audit::NewEntry::new(
                time::OffsetDateTime::now_utc(),
                gridward_audit::Actor::System,
                "service.reload",
                self.config.pki_dir.display().to_string(),
                if result.is_ok() {
                    gridward_audit::Outcome::Success
                } else {
                    gridward_audit::Outcome::Failure
                },
            )
            .detail(match &result {
                Ok(n) => format!("certificates and CRLs reloaded; {n} revoked meters disconnected"),
                Err(e) => format!("reload failed: {e}"),
            }),
        );
        result
    }

    fn reload_inner(&self) -> Result<usize, ServiceError> {
        let closed = self
            .endpoint
            .reload_from_pki(&self.config.pki_dir, &self.config.server_name)?;
        if let Some(api) = &self.api {
            let material = Pki::open(&self.config.pki_dir, None)?
                .tls_material(LeafKind::Server, &self.config.server_name)?;
            api.reload_tls(&material)?;
        }
        if let Err(e) = self.audit.import_pki_log(&self.config.pki_dir) {
            tracing::warn!(error = %e, "PKI operations not imported into the audit log");
        }
        self.reload_command_signer();
        if let Err(e) = self.meter_keys.refresh() {
            tracing::warn!(error = %e, "meter keys for relayed envelopes not reloaded");
        }
        if let Some((_, e)) = self
            .forwarders
            .reload(crate::forward::client::HttpsClient::load)
            .into_iter()
            .next()
        {
            return Err(e.into());
        }
        Ok(closed)
    }

    /// Rotation of the command key: the command signer's current certificate (renewed with
    /// `gridward pki renew`, or re-issued) signs from now on; queued commands keep their bytes.
    /// A signer that no longer loads keeps the current key (and says why).
    fn reload_command_signer(&self) {
        let (Some(service), Some(settings)) = (&self.commands, &self.config.commands) else {
            return;
        };
        match crate::commands::load_signer(
            &self.config.pki_dir,
            settings,
            time::OffsetDateTime::now_utc(),
        ) {
            Ok(key) if key.kid() != service.commands.signer().kid() => {
                tracing::info!(signer = %settings.signer, "command key rotated");
                service
                    .commands
                    .set_signer(Arc::new(key), gridward_audit::Actor::System);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("command key not reloaded, the current one stays: {e}"),
        }
    }

    /// Delivery metrics of every downstream target.
    pub fn forward_snapshot(&self) -> Vec<TargetSnapshot> {
        self.forwarders.snapshot()
    }

    /// Stops accepting, lets connections drain, writes what is queued, and returns when all is
    /// durable.
    pub async fn shutdown(mut self) {
        if let Some(api) = self.api.take() {
            api.shutdown().await;
        }
        if let Some((stop, handle)) = self.dispatcher.take() {
            stop.cancel();
            let _ = handle.await;
        }
        self.endpoint.shutdown();
        let _ = self.task.await;
        // The endpoint (and with it the pipeline's writer handles) is gone once every clone is
        // dropped; then the writer threads finish their queues and stop.
        let Running {
            endpoint,
            writer_threads,
            forwarders,
            audit,
            audit_thread,
            syslog_stop,
            detection,
            ..
        } = self;
        // The forwarders hold writer handles (for dead-letter events): stop them first.
        forwarders.shutdown().await;
        drop(endpoint);
        let _ = tokio::task::spawn_blocking(move || writer_threads.join()).await;
        // The detectors decide on what was queued, and write their last alarms (and audit
        // entries) before the audit log closes.
        if let Some(d) = detection {
            let _ = tokio::task::spawn_blocking(move || d.stop()).await;
        }
        // Every security event is queued by now: the audit thread writes them, signs a last
        // checkpoint and ends; then syslog flushes.
        audit.append(gridward_audit::NewEntry::new(
            time::OffsetDateTime::now_utc(),
            gridward_audit::Actor::System,
            "service.stop",
            "",
            gridward_audit::Outcome::Success,
        ));
        audit.close();
        if let Some(t) = audit_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        syslog_stop.cancel();
    }
}

/// The command service of `[commands]`, or `None` when commands are off or no command signer
/// is there (said at start: the head-end runs, commands are refused until one is issued).
fn start_commands(
    config: &Config,
    store: &Arc<SqliteStore>,
    audit: &AuditSink,
    access: Option<&Arc<gridward_access::Access>>,
    clock: &Clock,
) -> Result<Option<crate::commands::CommandService>, ServiceError> {
    let Some(settings) = &config.commands else {
        return Ok(None);
    };
    let manufacturers = crate::commands::load_manufacturers(settings)?;
    let signer = match crate::commands::load_signer(&config.pki_dir, settings, clock()) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("commands are off: {e}");
            return Ok(None);
        }
    };
    let recorder = {
        let audit = audit.clone();
        move |entry: gridward_audit::NewEntry| audit.append(entry)
    };
    // A proposer may still have their proposal approved while their account is an enabled
    // operator (without a users database there are no operators, so nothing is approved).
    let proposers = crate::commands::proposer_check(access.cloned(), config.pki_dir.clone());
    let commands = gridward_command::Commands::new(
        Arc::clone(store) as Arc<dyn gridward_store::CommandStore>,
        Arc::new(signer),
        Arc::clone(clock),
        Arc::new(recorder),
        proposers,
        crate::commands::policy(settings),
    )
    .map_err(crate::commands::CommandSetupError::from)?;
    tracing::info!(signer = %settings.signer, "commands on");
    Ok(Some(crate::commands::CommandService {
        commands: Arc::new(commands),
        manufacturers: Arc::new(manufacturers),
    }))
}

/// What the pipeline calls with a stored acknowledgement: the command service audits it and
/// advances campaigns (on a blocking thread: it reads the store).
fn ack_hook(commands: Arc<gridward_command::Commands>) -> crate::pipeline::AckHook {
    Arc::new(move |notice: &crate::pipeline::AckNotice| {
        let commands = Arc::clone(&commands);
        let notice = notice.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = commands.on_ack(&notice.meter_id, &notice.command_id, &notice.outcome) {
                tracing::warn!(meter = %notice.meter_id, command = %notice.command_id, error = %e,
                    "acknowledgement stored, but the command service could not follow it up");
            }
        });
    })
}

/// Starts the syslog sender of `settings`.
fn start_syslog(
    settings: &SyslogSettings,
    pki_dir: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
) -> Result<gridward_syslog::SyslogHandle, ServiceError> {
    let transport = match &settings.transport {
        SyslogTransport::Udp => gridward_syslog::Transport::Udp,
        SyslogTransport::Tcp => gridward_syslog::Transport::Tcp,
        SyslogTransport::Tls {
            server_name,
            client,
        } => {
            let material = Pki::open(pki_dir, None)?.tls_material(LeafKind::Client, client)?;
            let config = gridward_pki::tls::client_config(&material)?;
            let server_name = rustls_pki_types::ServerName::try_from(server_name.clone())
                .map_err(|e| ServiceError::Syslog(format!("server_name {server_name:?}: {e}")))?;
            gridward_syslog::Transport::Tls {
                config,
                server_name,
            }
        }
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "gridward".to_owned());
    let formatter = gridward_syslog::Formatter::new(settings.facility, &hostname)
        .with_procid(&std::process::id().to_string());
    let config = gridward_syslog::SenderConfig::new(settings.address, transport, formatter);
    Ok(gridward_syslog::Sender::start(config, stop))
}

/// A security event as a syslog message: the reason code as MSGID, meter and source as
/// structured data, the detail as MSG.
pub fn syslog_message(event: &gridward_store::SecurityEvent) -> gridward_syslog::SyslogMessage {
    let mut m = gridward_syslog::SyslogMessage::new(
        event.at,
        gridward_syslog::Severity::Warning,
        event.reason.clone(),
        event.detail.clone(),
    )
    .with_param("reason", event.reason.clone());
    if let Some(meter) = &event.meter_id {
        m = m.with_param("meter", meter.to_string());
    }
    if let Some(source) = &event.source {
        m = m.with_param("source", source.clone());
    }
    m
}

/// The ingest metrics as the API's [`gridward_api::Observer`].
struct ApiMetrics(Arc<Metrics>);

impl gridward_api::Observer for ApiMetrics {
    fn login(&self, success: bool) {
        self.0.record_login(success);
    }

    fn lockout(&self) {
        self.0.record_lockout();
    }

    fn exposition(&self) -> (String, &'static str) {
        (self.0.encode_prometheus(), crate::metrics::CONTENT_TYPE)
    }
}
