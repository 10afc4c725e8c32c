//! `gridward serve`, `gridward config init`, and the operator's views of the store:
//! `gridward readings`, `gridward events`, `gridward meters`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gridward_core::MeterId;
use gridward_core::document::format_timestamp;
use gridward_hes::config::{Config, DEFAULT_TOML};
use gridward_hes::pipeline::system_clock;
use gridward_pki::CrlInfo;
use gridward_store::{ReadingQuery, SecurityEventQuery, SqliteStore, Store};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `gridward serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (`gridward config init` writes a commented one).
    #[arg(long, short, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
}

/// `gridward config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Write a commented default configuration file.
    Init {
        /// Where to write it.
        #[arg(long, short, default_value = "gridward.toml", value_name = "FILE")]
        config: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check a configuration file and print what it resolves to.
    Check {
        /// The file.
        #[arg(long, short, default_value = "gridward.toml", value_name = "FILE")]
        config: PathBuf,
    },
}

/// Where the store is: a config file, or the database directly.
#[derive(Debug, Args)]
pub struct StoreArg {
    /// The configuration file whose `[store] path` to read.
    #[arg(long, short, default_value = "gridward.toml", value_name = "FILE")]
    config: PathBuf,
    /// The SQLite database itself (instead of --config).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// With --db: the key file of its encryption at rest (default: the database's path with
    /// extension .key, as `gridward serve` makes it).
    #[arg(long, value_name = "FILE", requires = "db")]
    key_file: Option<PathBuf>,
}

impl StoreArg {
    /// Opens the store the arguments name; fails with a hint if there is none yet.
    pub(crate) fn open(&self) -> Result<SqliteStore> {
        let (path, config) = match &self.db {
            Some(p) => (p.clone(), None),
            None => {
                let config = load_config(&self.config)?;
                (config.store_path.clone(), Some(config))
            }
        };
        if !path.exists() {
            bail!(
                "no database at {} (has `gridward serve` run with this configuration?)",
                path.display()
            );
        }
        let opened = match config {
            Some(config) => config.open_existing_store(),
            None => SqliteStore::open_existing(
                &path,
                gridward_store::KeySource::existing_file(
                    self.key_file
                        .clone()
                        .unwrap_or_else(|| path.with_extension("key")),
                ),
            ),
        };
        opened.with_context(|| format!("opening {}", path.display()))
    }
}

/// Output format of `gridward readings`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per line, as forwarded downstream: ReadingID, MeterID, Counter,
    /// Timestamp, EnergyConsumed.
    Json,
    /// One XML document per line.
    Xml,
    /// A table.
    Table,
}

/// `gridward readings`
#[derive(Debug, Args)]
pub struct ReadingsArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The meter.
    #[arg(long, value_name = "ID")]
    meter: String,
    /// Only readings taken at or after this time (RFC 3339, e.g. 2024-02-06T12:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Most readings shown.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
}

/// `gridward events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Show the events meters reported (tamper, power) instead of the security events.
    #[arg(long)]
    meter_events: bool,
    /// With --meter-events: only this meter's.
    #[arg(long, value_name = "ID", requires = "meter_events")]
    meter: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Most events shown.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

/// `gridward meters`
#[derive(Debug, Args)]
pub struct MetersArgs {
    #[command(flatten)]
    store: StoreArg,
}

/// Exit code for a configuration error.
pub const EXIT_CONFIG: u8 = 2;

/// A configuration error, carried to `main` so it can exit with code 2.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BadConfig(#[from] pub gridward_hes::config::ConfigError);

/// A downstream target whose certificates or keys cannot be loaded: also a configuration
/// error (exit code 2), found when the head-end starts.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BadTarget(#[from] gridward_hes::forward::ForwardError);

pub(crate) fn load_config(path: &Path) -> Result<Config> {
    Ok(Config::load(path).map_err(BadConfig)?)
}

/// The exit code for `err`: 2 for a bad configuration, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<BadConfig>().is_some() || err.downcast_ref::<BadTarget>().is_some() {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

pub(crate) fn parse_time(s: &str, flag: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .with_context(|| format!("{flag} {s:?} is not an RFC 3339 time like 2024-02-06T12:00:00Z"))
}

/// `gridward serve`: runs until Ctrl-C / SIGTERM; SIGHUP reloads certificates and CRLs.
pub fn serve(args: ServeArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    if let Some((soft, _)) = crate::sys::raise_nofile()
        && soft < config.endpoint.max_connections as u64 + 256
    {
        tracing::warn!(
            nofile = soft,
            max_connections = config.endpoint.max_connections,
            "the open-file limit is below mqtt.max_connections + 256: meters beyond it will be \
             refused at accept (raise LimitNOFILE / ulimit -n)"
        );
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let running = match gridward_hes::service::start(&config, system_clock()).await {
            Ok(r) => r,
            Err(gridward_hes::service::ServiceError::Forward(e)) => {
                return Err(anyhow::Error::new(BadTarget(e))
                    .context(format!("[[forward]] in {}", args.config.display())));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("starting the head-end from {}", args.config.display())));
            }
        };
        tracing::info!(
            listen = %running.local_addr,
            server_certificate = %config.server_name,
            pki = %config.pki_dir.display(),
            store = %config.store_path.display(),
            "MQTT over mutual TLS"
        );
        if let Some(api) = running.api_addr {
            tracing::info!(listen = %api, users = %config.api.as_ref().map(|a| a.users_path.display().to_string()).unwrap_or_default(), "HTTPS API (/api/v1; `gridward user add` creates users)");
        }
        tracing::info!(audit = %config.audit.path.display(), key = %config.audit.key.display(), "audit log (`gridward audit verify`)");
        for t in &config.forward {
            tracing::info!(target_name = %t.name, url = %t.url, key_id = %t.key_id, "forwarding readings (client certificate and signature key id)");
        }
        tracing::info!(
            watch_every_s = PKI_WATCH.as_secs(),
            "SIGHUP reloads certificates and CRLs (so does a change of them on disk); Ctrl-C stops"
        );
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("SIGHUP handler")?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        let mut tick = tokio::time::interval(STATUS_TICK);
        let mut status_line = StatusLine::default();
        let mut watch = tokio::time::interval(PKI_WATCH);
        let mut seen = pki_fingerprint(&config.pki_dir, &config.server_name);
        // The CRLs are read again only when the files change; their nextUpdate is compared with
        // the clock at every look.
        let mut crls = read_crls(&config.pki_dir);
        let mut crl_warned: Option<(CrlState, std::time::Instant)> = None;
        let mut last_accepted = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => match running.reload() {
                    Ok(n) => tracing::info!(revoked_disconnected = n, "reloaded certificates and CRLs"),
                    Err(e) => tracing::error!(error = %e, "reload failed, keeping the previous configuration"),
                },
                _ = watch.tick() => {
                    let now = pki_fingerprint(&config.pki_dir, &config.server_name);
                    if now != seen {
                        seen = now;
                        crls = read_crls(&config.pki_dir);
                        match running.reload() {
                            Ok(n) => tracing::info!(revoked_disconnected = n, "certificates or CRLs changed on disk: reloaded"),
                            Err(e) => tracing::error!(error = %e, "certificates or CRLs changed on disk, but the reload failed, keeping the previous configuration"),
                        }
                    }
                    warn_about_crls(&config.pki_dir, &crls, &mut crl_warned);
                }
                _ = tick.tick() => {
                    let m = running.metrics.snapshot();
                    let s = running.endpoint.stats();
                    let forward = running.forward_snapshot();
                    let status = Status {
                        sessions: s.sessions,
                        accepted: m.accepted,
                        duplicates: m.duplicates,
                        rejected: m.rejected_total(),
                        forward: forward.iter().map(|t| (t.delivered, t.failed_attempts, t.dead)).collect(),
                    };
                    if status_line.due(&status, std::time::Instant::now()) {
                        tracing::info!(
                            meters_connected = s.sessions,
                            accepted = m.accepted,
                            per_second = (m.accepted - last_accepted) / STATUS_TICK.as_secs(),
                            duplicates = m.duplicates,
                            rejected = m.rejected_total(),
                            p99 = ?m.p99,
                            "ingest status"
                        );
                        for t in forward.iter().filter(|t| t.delivered > 0 || t.failed_attempts > 0 || t.dead > 0) {
                            tracing::info!(
                                target_name = %t.name,
                                delivered = t.delivered,
                                failed_attempts = t.failed_attempts,
                                dead = t.dead,
                                lag_p50 = ?t.lag_p50,
                                lag_p99 = ?t.lag_p99,
                                "forward status"
                            );
                        }
                    }
                    last_accepted = m.accepted;
                }
            }
        }
        tracing::info!("stopping; writing what is queued");
        running.shutdown().await;
        Ok(())
    })
}

/// How often `serve` looks at its counters for the status line.
const STATUS_TICK: Duration = Duration::from_secs(10);

/// The longest `serve` stays silent while nothing changes: one line then says it is alive.
const STATUS_CALM: Duration = Duration::from_secs(15 * 60);

/// The counters the status line reports: a line is due when one of them moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Status {
    sessions: u64,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    /// Per target: delivered, failed attempts, dead.
    forward: Vec<(u64, u64, u64)>,
}

/// Decides when `serve` prints its status: when the counters changed since the last line, and
/// otherwise once every [`STATUS_CALM`] (an idle head-end does not fill its log).
#[derive(Debug, Default)]
struct StatusLine {
    last: Option<(Status, std::time::Instant)>,
}

impl StatusLine {
    /// Whether to print `status` at `now`; if so, it becomes the last line printed.
    fn due(&mut self, status: &Status, now: std::time::Instant) -> bool {
        let due = match &self.last {
            None => *status != Status::default(),
            Some((last, at)) => last != status || now.duration_since(*at) >= STATUS_CALM,
        };
        if due {
            self.last = Some((status.clone(), now));
        }
        due
    }
}

/// How often `serve` looks at the PKI files it loaded (and at the CRLs' nextUpdate).
const PKI_WATCH: Duration = Duration::from_secs(5);

/// The files the head-end loads from the PKI directory, with their modification time and size:
/// a change means `gridward pki revoke`, `pki crl`, `pki renew` or an import ran.
fn pki_fingerprint(dir: &Path, server: &str) -> Vec<(PathBuf, Option<std::time::SystemTime>, u64)> {
    let mut files = vec![
        dir.join("ca/root.crt.pem"),
        dir.join("ca/chain.pem"),
        dir.join("crl/root.crl.pem"),
        dir.join("crl/issuing.crl.pem"),
        dir.join("servers").join(server).join("cert.pem"),
        dir.join("servers").join(server).join("key.pem"),
    ];
    if let Ok(entries) = std::fs::read_dir(dir.join("trusted")) {
        let mut trusted: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        trusted.sort();
        files.extend(trusted);
    }
    files
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (p, modified, len)
        })
        .collect()
}

/// What the CRLs on disk mean for new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CrlState {
    /// Valid for more than a day.
    Fine,
    /// Valid for less than a day: renew now.
    ExpiresSoon(String),
    /// Past nextUpdate: every new handshake is refused (fail closed).
    Expired(String),
    /// Cannot be read.
    Unreadable(String),
}

/// Warns when a CRL is about to expire or has expired: once when that becomes so, then hourly.
fn warn_about_crls(
    dir: &Path,
    crls: &Result<Vec<CrlInfo>, String>,
    warned: &mut Option<(CrlState, std::time::Instant)>,
) {
    let state = crl_state(crls, OffsetDateTime::now_utc());
    let repeat = match warned {
        Some((s, at)) => *s != state || at.elapsed() >= Duration::from_secs(3600),
        None => state != CrlState::Fine,
    };
    if !repeat {
        return;
    }
    let fix = format!("run `gridward pki crl --dir {}`", dir.display());
    match &state {
        CrlState::Fine => {}
        CrlState::ExpiresSoon(what) => tracing::warn!(
            crl = %what,
            fix = %fix,
            "a CRL expires within a day: renew it before then (after it, every new connection is refused)"
        ),
        CrlState::Expired(what) => tracing::error!(
            crl = %what,
            fix = %fix,
            "a CRL has expired: every new connection is refused (revocation status unknown, fail closed)"
        ),
        CrlState::Unreadable(e) => tracing::error!(error = %e, "cannot read the CRLs"),
    }
    *warned = Some((state, std::time::Instant::now()));
}

/// The CRLs of the PKI at `dir`, as on disk now.
fn read_crls(dir: &Path) -> Result<Vec<CrlInfo>, String> {
    gridward_pki::Pki::open(dir, None)
        .and_then(|p| p.current_crls())
        .map_err(|e| e.to_string())
}

/// What `crls` mean for new connections at `now`.
fn crl_state(crls: &Result<Vec<CrlInfo>, String>, now: OffsetDateTime) -> CrlState {
    match crls {
        Err(e) => CrlState::Unreadable(e.clone()),
        Ok(crls) => {
            let soonest = crls.iter().min_by_key(|c| c.next_update);
            match soonest {
                Some(c) if c.next_update <= now => CrlState::Expired(format!(
                    "the {:?} CRL expired at {}",
                    c.issuer,
                    format_timestamp(c.next_update)
                )),
                Some(c) if c.next_update <= now + time::Duration::days(1) => {
                    CrlState::ExpiresSoon(format!(
                        "the {:?} CRL expires at {}",
                        c.issuer,
                        format_timestamp(c.next_update)
                    ))
                }
                _ => CrlState::Fine,
            }
        }
    }
}

/// `gridward config ...`
pub fn config(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Init { config, force } => {
            if config.exists() && !force {
                bail!("{} exists; pass --force to overwrite it", config.display());
            }
            std::fs::write(&config, DEFAULT_TOML)
                .with_context(|| format!("writing {}", config.display()))?;
            println!(
                "wrote {}; edit it, then `gridward serve --config {}`",
                config.display(),
                config.display()
            );
            Ok(())
        }
        ConfigCommand::Check { config } => {
            let c = load_config(&config)?;
            println!("{} is valid:", config.display());
            println!("  listen       {}", c.listen);
            println!(
                "  pki          {} (server certificate {:?})",
                c.pki_dir.display(),
                c.server_name
            );
            println!("  store        {}", c.store_path.display());
            println!(
                "  freshness    ±{} s",
                c.pipeline.freshness.max_skew.whole_seconds()
            );
            println!("  connections  at most {}", c.endpoint.max_connections);
            for t in &c.forward {
                println!(
                    "  forward      {} → {} (key id {:?})",
                    t.name, t.url, t.key_id
                );
            }
            Ok(())
        }
    }
}

/// `gridward readings`
pub fn readings(a: ReadingsArgs) -> Result<()> {
    let store = a.store.open()?;
    let meter = MeterId::new(&a.meter).with_context(|| format!("--meter {:?}", a.meter))?;
    let mut q = ReadingQuery::new(meter).limit(a.limit);
    if let Some(s) = &a.since {
        q = q.since(parse_time(s, "--since")?);
    }
    let rows = store.readings(&q)?;
    let mut out = std::io::stdout().lock();
    match a.format {
        OutputFormat::Json => {
            for r in &rows {
                writeln!(out, "{}", r.to_forwarded().to_json())?;
            }
        }
        OutputFormat::Xml => {
            for r in &rows {
                writeln!(out, "{}", r.to_xml())?;
            }
        }
        OutputFormat::Table => {
            writeln!(
                out,
                "{:>10}  {:<20}  {:>14}  {:>10}  RECEIVED",
                "ID", "TIMESTAMP", "KWH", "COUNTER"
            )?;
            for r in &rows {
                let reading = r.to_reading();
                writeln!(
                    out,
                    "{:>10}  {:<20}  {:>14}  {:>10}  {}",
                    r.id,
                    format_timestamp(reading.timestamp),
                    reading.energy_kwh,
                    r.counter,
                    format_timestamp(r.received_at)
                )?;
            }
            eprintln!("{} reading(s)", rows.len());
        }
    }
    Ok(())
}

/// `gridward events`
pub fn events(a: EventsArgs) -> Result<()> {
    let store = a.store.open()?;
    if a.meter_events {
        return meter_events(&store, &a);
    }
    let mut q = SecurityEventQuery {
        limit: a.limit,
        ..SecurityEventQuery::default()
    };
    if let Some(s) = &a.since {
        q.since = Some(parse_time(s, "--since")?);
    }
    let rows = store.security_events(&q)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>8}  {:<20}  {:<24}  {:<12}  {:<22}  DETAIL",
        "ID", "TIME", "REASON", "METER", "SOURCE"
    )?;
    for e in &rows {
        let ev = &e.event;
        writeln!(
            out,
            "{:>8}  {:<20}  {:<24}  {:<12}  {:<22}  {}",
            e.id,
            format_timestamp(ev.at),
            ev.reason,
            ev.meter_id.as_ref().map_or("-", MeterId::as_str),
            ev.source.as_deref().unwrap_or("-"),
            ev.detail
        )?;
    }
    eprintln!("{} security event(s)", rows.len());
    Ok(())
}

/// `gridward events --meter-events`
fn meter_events(store: &SqliteStore, a: &EventsArgs) -> Result<()> {
    let mut q = gridward_store::MeterEventQuery {
        limit: a.limit,
        ..gridward_store::MeterEventQuery::default()
    };
    if let Some(m) = &a.meter {
        q.meter = Some(MeterId::new(m).with_context(|| format!("--meter {m:?}"))?);
    }
    if let Some(s) = &a.since {
        q.since = Some(parse_time(s, "--since")?);
    }
    let rows = store.meter_events(&q)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>10}  {:<20}  {:<16}  {:<14}  {:>10}  RECEIVED",
        "ID", "TIME", "METER", "EVENT", "COUNTER"
    )?;
    for e in &rows {
        writeln!(
            out,
            "{:>10}  {:<20}  {:<16}  {:<14}  {:>10}  {}",
            e.id,
            format_timestamp(e.taken_at),
            e.meter_id.as_str(),
            e.kind.as_str(),
            e.counter,
            format_timestamp(e.received_at)
        )?;
    }
    eprintln!("{} meter event(s)", rows.len());
    Ok(())
}

/// `gridward meters`
pub fn meters(a: MetersArgs) -> Result<()> {
    let store = a.store.open()?;
    let rows = store.meters()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16}  {:<20}  {:>12}  {:>14}  CONNECTED",
        "METER", "LAST SEEN", "LAST COUNTER", "LAST KWH"
    )?;
    for m in &rows {
        writeln!(
            out,
            "{:<16}  {:<20}  {:>12}  {:>14}  {}",
            m.meter_id.as_str(),
            m.last_seen.map_or_else(|| "-".to_owned(), format_timestamp),
            m.last_counter
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            m.last_kwh.map_or_else(|| "-".to_owned(), |k| k.to_string()),
            if m.connected { "yes" } else { "no" }
        )?;
    }
    eprintln!("{} meter(s)", rows.len());
    Ok(())
}

/// Whether `err` is only the reader of our output going away (`gridward events | head`).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use gridward_pki::{CrlIssuer, InitOptions, Pki};

    use super::*;

    /// Issue 17: `serve` printed a status line at every tick once anything had been refused,
    /// even with nothing happening.
    #[test]
    fn an_idle_serve_prints_its_status_on_change_or_at_a_calm_interval() {
        let t0 = std::time::Instant::now();
        let mut line = StatusLine::default();
        assert!(
            !line.due(&Status::default(), t0),
            "nothing yet, nothing to say"
        );
        let busy = Status {
            sessions: 3,
            accepted: 10,
            rejected: 1,
            forward: vec![(10, 0, 0)],
            ..Status::default()
        };
        assert!(line.due(&busy, t0 + STATUS_TICK));
        for tick in 2..60 {
            assert!(
                !line.due(&busy, t0 + STATUS_TICK * tick),
                "idle tick {tick}"
            );
        }
        assert!(
            line.due(&busy, t0 + STATUS_TICK + STATUS_CALM),
            "alive after the calm interval"
        );
        let delivered = Status {
            forward: vec![(11, 0, 0)],
            ..busy.clone()
        };
        assert!(line.due(&delivered, t0 + STATUS_CALM + STATUS_TICK * 2));
        assert!(!line.due(&delivered, t0 + STATUS_CALM + STATUS_TICK * 3));
    }

    #[test]
    fn crl_states_follow_next_update() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&dir, &InitOptions::new("test", now)).expect("init");
        assert_eq!(crl_state(&read_crls(&dir), now), CrlState::Fine);
        assert!(matches!(
            crl_state(
                &read_crls(&dir),
                now + time::Duration::days(7) - time::Duration::hours(1)
            ),
            CrlState::ExpiresSoon(_)
        ));
        pki.write_crl(
            CrlIssuer::Issuing,
            now - time::Duration::days(3),
            now - time::Duration::days(1),
            "test",
        )
        .expect("expired CRL");
        match crl_state(&read_crls(&dir), now) {
            CrlState::Expired(what) => assert!(what.contains("Issuing"), "{what}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.join("crl/root.crl.pem"), "garbage").expect("write");
        assert!(matches!(
            crl_state(&read_crls(&dir), now),
            CrlState::Unreadable(_)
        ));
    }

    #[test]
    fn the_fingerprint_changes_when_a_crl_is_rewritten() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&dir, &InitOptions::new("test", now)).expect("init");
        let before = pki_fingerprint(&dir, "localhost");
        assert_eq!(before, pki_fingerprint(&dir, "localhost"));
        std::thread::sleep(Duration::from_millis(20));
        pki.write_crls(now, 7, "test").expect("crls");
        assert_ne!(before, pki_fingerprint(&dir, "localhost"));
    }
}
