//! `gridward sink`: the reference downstream service (`gridward_sink`) on the command line, and
//! `gridward sink show` to print what it stored.
//!
//! Arguments are checked and every file is loaded (keys, certificates, CRLs) before anything
//! listens; a bad argument exits with code 2, like clap's own usage errors.

use std::fmt::Display;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::error::ErrorKind;
use clap::{Args, Subcommand, ValueEnum};
use gridward_core::MeterId;
use gridward_core::document::format_timestamp;
use gridward_sink::check::{DEFAULT_PATH, Rules};
use gridward_sink::config::{DEFAULT_LISTEN, DEFAULT_SERVER_NAME};
use gridward_sink::{Keys, SinkConfig, SinkStore, tls_from_pki};

/// `gridward sink`
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "\
Every request must arrive over TLS with a client certificate of the PKI's CA (or of a --client-ca), \
not revoked. Its RFC 9421 signature (label gridward, covering @method, @target-uri, content-digest \
and content-type, with created, expires, nonce and keyid) must verify with the --key named by its \
keyid and be at most --max-age seconds old; Content-Digest must match the body; the nonce must be \
new (nonces are kept in the store, so a restart does not forget them). Each reading is stored once, \
de-duplicated on ReadingID: 201 {\"status\":\"stored\"}, then 200 {\"status\":\"duplicate\"}. \
Refusals are answered {\"error\":CODE} (401 signature, nonce_replayed; 400 digest, body; 404, 405, \
413, 415; 409 reading_conflict) and logged on stderr with the peer and its certificate.

Set up, with the head-end's PKI:
  gridward pki issue server --dir pki --name sink --san 127.0.0.1 --san localhost
  gridward pki issue client --dir pki --name hes
  gridward sink --dir pki --key hes=pki/clients/hes/cert.pem --store sink.db

and in the head-end's gridward.toml:
  [[forward]]
  name = \"billing\"
  url = \"https://127.0.0.1:8443/readings\"
  client = \"hes\"

A forwarder under another CA: add --client-ca its-root.pem --client-crl its-crls.pem.
Scripts: --listen 127.0.0.1:0 --ready-file sink.addr writes the bound address once listening.
Look at what arrived: gridward sink show --store sink.db [--meter m000001] [--format json]"
)]
pub struct SinkArgs {
    #[command(subcommand)]
    command: Option<SinkCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum SinkCommand {
    /// Print the readings a sink stored, in arrival order.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address to listen on (port 0 picks a free one; see --ready-file).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The PKI directory: the server certificate (--name), and the CA and CRLs that client certificates are checked against.
    #[arg(long, value_name = "DIR", required = true)]
    dir: Option<PathBuf>,
    /// The server certificate's name in the PKI (DIR/servers/NAME/); its SANs must include the host in the forwarder's URL.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_SERVER_NAME)]
    name: String,
    /// The SQLite database of readings and nonces (created, mode 0600, if absent).
    #[arg(long, value_name = "FILE", default_value = "sink.db")]
    store: PathBuf,
    /// A signer's key: the keyid its signatures carry, and a PEM file with its certificate, public key or private key (Ed25519 or P-256). At least one; repeat for more.
    #[arg(long = "key", value_name = "KEYID=PATH", value_parser = parse_key_arg)]
    keys: Vec<(String, PathBuf)>,
    /// Oldest accepted signature, in seconds (now - created).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    max_age: u64,
    /// The path readings are posted to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PATH, value_parser = parse_path)]
    path: String,
    /// Also trust client certificates of this CA (PEM); repeat for more. Give its CRLs with --client-crl.
    #[arg(long, value_name = "FILE")]
    client_ca: Vec<PathBuf>,
    /// CRLs (PEM) of the --client-ca CAs; without them their certificates are refused (revocation fails closed).
    #[arg(long, value_name = "FILE")]
    client_crl: Vec<PathBuf>,
    /// Print the counts every this many seconds when they changed (0: only at the end).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stats_every: u64,
    /// Write the bound address (e.g. 127.0.0.1:40321) to this file once listening.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Most client connections at once.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_connections: u64,
}

/// Output format of `gridward sink show`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ShowFormat {
    /// A table with the sequence number, key id and arrival time.
    Table,
    /// One line per reading: the JSON body exactly as received.
    Json,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The sink's database.
    #[arg(long, value_name = "FILE", default_value = "sink.db")]
    store: PathBuf,
    /// Only this meter's readings.
    #[arg(long, value_name = "ID", value_parser = parse_meter)]
    meter: Option<MeterId>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ShowFormat::Table)]
    format: ShowFormat,
}

/// `KEYID=PATH`.
fn parse_key_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            Ok((id.to_owned(), PathBuf::from(path)))
        }
        _ => Err("expected KEYID=PATH, e.g. hes=pki/clients/hes/cert.pem".to_owned()),
    }
}

/// A path beginning with `/`, without query or fragment.
fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    {
        Ok(s.to_owned())
    } else {
        Err("expected a path such as /readings (starting with /, no spaces, ? or #)".to_owned())
    }
}

fn parse_meter(s: &str) -> Result<MeterId, String> {
    MeterId::new(s).map_err(|e| e.to_string())
}

/// A usage error of `gridward sink`: printed with the usage line, exit code 2.
fn usage_error(kind: ErrorKind, message: impl Display) -> clap::Error {
    RunArgs::augment_args(clap::Command::new("gridward sink")).error(kind, message)
}

impl RunArgs {
    /// Checks the arguments and loads every file they name.
    fn resolve(&self) -> Result<SinkConfig, clap::Error> {
        let invalid = |m: String| usage_error(ErrorKind::ValueValidation, m);
        if self.keys.is_empty() {
            return Err(usage_error(
                ErrorKind::MissingRequiredArgument,
                "no signer key: pass --key KEYID=PATH at least once, with the keyid the forwarder's \
                 signatures carry and its certificate, e.g. --key hes=pki/clients/hes/cert.pem \
                 (the head-end signs with its client certificate's key, keyid = the client name)",
            ));
        }
        let mut keys = Keys::new();
        for (id, path) in &self.keys {
            let key = Keys::load(id, path).map_err(|e| invalid(format!("--key {id}=...: {e}")))?;
            if !keys.insert(key) {
                return Err(invalid(format!("--key {id} is given twice")));
            }
        }
        let dir = self.dir.as_deref().unwrap_or(Path::new("pki"));
        let tls = tls_from_pki(dir, &self.name, &self.client_ca, &self.client_crl)
            .map_err(|e| invalid(format!("--dir {} --name {}: {e}", dir.display(), self.name)))?;
        let mut config = SinkConfig::new(self.listen, tls, keys, self.store.clone());
        config.rules = Rules {
            path: self.path.clone(),
            max_age: Duration::from_secs(self.max_age),
            ..Rules::default()
        };
        config.max_connections = usize::try_from(self.max_connections).unwrap_or(usize::MAX);
        Ok(config)
    }
}

/// `gridward sink ...`
pub fn run(args: SinkArgs) -> Result<()> {
    match args.command {
        Some(SinkCommand::Show(show)) => self::show(&show),
        None => serve(&args.run),
    }
}

/// `gridward sink`: runs until Ctrl-C / SIGTERM.
fn serve(args: &RunArgs) -> Result<()> {
    let config = args.resolve().unwrap_or_else(|e| e.exit());
    let key_ids: Vec<String> = config.keys.ids().map(str::to_owned).collect();
    let path = config.rules.path.clone();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let sink = gridward_sink::start(config)
            .await
            .context("starting the sink")?;
        let addr = sink.local_addr();
        tracing::info!(
            url = %format_args!("https://{addr}{path}"),
            server_certificate = %args.name,
            signer_keys = %key_ids.join(", "),
            store = %args.store.display(),
            "sink listening; Ctrl-C stops"
        );
        if let Some(file) = &args.ready_file {
            write_ready_file(file, addr)?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        let period = Duration::from_secs(args.stats_every.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut last = sink.stats();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick(), if args.stats_every > 0 => {
                    let now = sink.stats();
                    if now != last {
                        say(&format!("sink: {now}"));
                        last = now;
                    }
                }
            }
        }
        tracing::info!("sink stopping; answering the requests in flight");
        let stats = sink.shutdown().await;
        say(&format!("sink: final: {stats}"));
        Ok(())
    })
}

/// Prints a line on stdout, ignoring a closed pipe.
fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Writes `addr` to `file` by renaming a temporary file, so a reader never sees half of it.
fn write_ready_file(file: &Path, addr: SocketAddr) -> Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, file))
        .with_context(|| format!("writing --ready-file {}", file.display()))
}

/// `gridward sink show`
fn show(args: &ShowArgs) -> Result<()> {
    let store = SinkStore::open_existing(&args.store)
        .with_context(|| format!("opening {}", args.store.display()))?;
    let rows = store.readings(args.meter.as_ref())?;
    let mut out = std::io::stdout().lock();
    match args.format {
        ShowFormat::Json => {
            for r in &rows {
                writeln!(out, "{}", r.body)?;
            }
        }
        ShowFormat::Table => {
            writeln!(
                out,
                "{:>8}  {:<24}  {:<16}  {:>10}  {:<20}  {:>14}  {:<12}  RECEIVED",
                "SEQ", "READING ID", "METER", "COUNTER", "TIMESTAMP", "KWH", "KEY"
            )?;
            for r in &rows {
                let reading = &r.reading;
                writeln!(
                    out,
                    "{:>8}  {:<24}  {:<16}  {:>10}  {:<20}  {:>14}  {:<12}  {}",
                    r.seq,
                    reading.reading_id,
                    reading.meter_id.as_str(),
                    reading.counter,
                    format_timestamp(reading.taken_at),
                    reading.energy_kwh,
                    r.key_id,
                    format_timestamp(r.received_at)
                )?;
            }
        }
    }
    let counts = store.counts()?;
    eprintln!(
        "{} reading(s) shown; the store holds {} reading(s) of {} meter(s)",
        rows.len(),
        counts.readings,
        counts.meters
    );
    Ok(())
}
