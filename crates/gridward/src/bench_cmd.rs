//! `gridward bench`: ingest throughput and latency, memory per idle meter and the reconnect
//! storm, measured on this machine next to a Mosquitto broker doing the relay job with the same
//! certificates and messages, and next to the verify-only ceiling of the envelope algorithm.
//!
//! ```text
//!  gridward bench ingest|idle|storm      this process: orchestration + the head-end, in-process
//!    ├── gridward bench setup            child: the PKI in WORK/pki-{alg} (reused when big enough)
//!    ├── gridward bench load             child: the meters (pre-sign, connect, publish);
//!    │                                   "TAG {json}" lines on stdout, "GO"/"STOP" on stdin
//!    └── mosquitto -c WORK/mosquitto.conf  child: the baseline broker on its own free port
//! ```
//!
//! The load runs in a child process, so the CPU time and peak RSS of this process during a run
//! are the head-end's; Mosquitto's are read from `/proc/PID`. Every child is killed when its
//! guard is dropped (`kill_on_drop`), and a load child whose stdin closes stops by itself.
//! Everything listens and connects on 127.0.0.1 only.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use gridward_core::MeterId;
use gridward_core::document::{Format, Reading};
use gridward_core::envelope::{self, EnvelopeParams, SigningKey};
use gridward_hes::config::{Config, RawConfig};
use gridward_hes::pipeline::system_clock;
use gridward_hes::service::Running;
use gridward_meter::identity::{Trust, list_meters, load_many, select_meters};
use gridward_mqtt::client::{self, Client, ClientOptions, Packet, Protocol, QoS};
use gridward_pki::tls::TlsOptions;
use gridward_pki::{InitOptions, IssueOptions, LeafKeyAlg, LeafKind, Pki};
use gridward_store::Store;
use hdrhistogram::Histogram;
use rustls::ClientConfig;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc};

use crate::meter_cmd::FormatArg;
use crate::sys::{check_nofile, raise_nofile};

/// Marks a work directory made by `gridward bench`, so a later run may reuse and clear it.
const MARKER: &str = ".gridward-bench";
/// Prefix of the bench meters' ids (`m000001`, ...).
const PREFIX: &str = "m";
/// Name of the server certificate both brokers present.
const SERVER_NAME: &str = "localhost";
/// Client certificate of the Mosquitto baseline's subscriber.
const SUBSCRIBER: &str = "bench-sub";
/// Longest wait for outstanding PUBACKs after a run.
const DRAIN: Duration = Duration::from_secs(5);

/// `gridward bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Ingest: accepted readings/s and publish → PUBACK latency, head-end CPU and peak RSS,
    /// against Mosquitto relaying the same messages and the verify-only ceiling.
    Ingest(IngestArgs),
    /// Memory per idle connected meter (server RSS delta / N), against Mosquitto.
    Idle(IdleArgs),
    /// Reconnect storm: N meters complete mTLS + CONNECT from cold, against Mosquitto.
    Storm(StormArgs),
    /// Forward: readings/s delivered as signed JSON over mutual TLS to a `gridward sink`, and
    /// what signing costs of it.
    Forward(crate::bench_forward::ForwardArgs),
    /// API: requests/s of an authenticated readings page against `GET /healthz`, and what a
    /// login costs with production Argon2id against the cheapest parameters.
    Api(crate::bench_api::ApiArgs),
    /// Commands: signed and queued per second, issue → stored acknowledgement per second and
    /// latency over N meters, against signed events ingested on the same connections.
    Commands(crate::bench_commands::CommandsArgs),
    /// (internal) Create or extend the bench PKI.
    #[command(hide = true)]
    Setup(SetupArgs),
    /// (internal) The load generator child process.
    #[command(hide = true)]
    Load(LoadArgs),
}

/// Options every benchmark has.
#[derive(Debug, Args)]
struct CommonArgs {
    /// Work directory: PKI, database, broker configuration. A PKI an earlier run left there is
    /// reused [default: a temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Measure Gridward only: no Mosquitto baseline (CI has no broker).
    #[arg(long)]
    no_baseline: bool,
    /// Also write the results to this file as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The Mosquitto broker binary (Debian package `mosquitto`).
    #[arg(long, value_name = "PATH", default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
}

/// Envelope and meter key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AlgArg {
    /// ECDSA P-256 / SHA-256.
    Es256,
    /// Ed25519.
    Eddsa,
    /// RSA 2048, PKCS#1 v1.5 / SHA-256.
    Rs256,
}

impl AlgArg {
    fn key_alg(self) -> LeafKeyAlg {
        match self {
            Self::Es256 => LeafKeyAlg::P256,
            Self::Eddsa => LeafKeyAlg::Ed25519,
            Self::Rs256 => LeafKeyAlg::Rsa2048,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Eddsa => "EdDSA",
            Self::Rs256 => "RS256",
        }
    }

    fn dir_name(self) -> &'static str {
        match self {
            Self::Es256 => "pki-es256",
            Self::Eddsa => "pki-eddsa",
            Self::Rs256 => "pki-rs256",
        }
    }
}

/// `gridward bench ingest`
#[derive(Debug, Args)]
#[command(after_help = "\
Each meter publishes QoS 1 envelopes signed with its own key (pre-signed before the timed run, \
so the load generator's CPU goes to TLS and MQTT only). Latency is publish → PUBACK as the meter \
sees it; Gridward sends the PUBACK after the reading is durably stored. The head-end's limits \
are raised for the bench: no per-connection rate limit, no ban, a freshness window of 1 h.")]
struct IngestArgs {
    /// Number of meters (MQTT connections).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    meters: usize,
    /// Aggregate publish rate, messages/s, or `max` (as fast as acknowledged, each meter keeping
    /// --window messages in flight).
    #[arg(long, default_value = "max", value_name = "R", value_parser = parse_rate)]
    rate: f64,
    /// Length of the timed run, seconds.
    #[arg(long, default_value_t = 20, value_name = "SECS")]
    duration: u64,
    /// Envelope (and meter key) algorithm.
    #[arg(long, value_enum, default_value_t = AlgArg::Es256)]
    alg: AlgArg,
    /// Messages in flight per meter [default: 1 at max rate, 8 at a fixed rate].
    #[arg(long, value_name = "W")]
    window: Option<u16>,
    /// Document format.
    #[arg(long, value_enum, default_value_t = FormatArg::Xml)]
    format: FormatArg,
    /// At max rate, pre-sign enough envelopes for this many messages/s (beyond, meters sign live).
    #[arg(long, default_value_t = 60_000.0, value_name = "R")]
    presign_rate: f64,
    /// Seconds of the verify-only ceiling measurement.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    ceiling_secs: f64,
    #[command(flatten)]
    common: CommonArgs,
}

/// `gridward bench idle`
#[derive(Debug, Args)]
struct IdleArgs {
    /// Number of idle meters.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    meters: usize,
    /// Meter key algorithm.
    #[arg(long, value_enum, default_value_t = AlgArg::Es256)]
    alg: AlgArg,
    /// New connections per second (staggered).
    #[arg(long, default_value_t = 1000.0, value_name = "R")]
    connect_rate: f64,
    /// Seconds to wait after the last connection before measuring.
    #[arg(long, default_value_t = 3, value_name = "SECS")]
    settle: u64,
    #[command(flatten)]
    common: CommonArgs,
}

/// `gridward bench storm`
#[derive(Debug, Args)]
struct StormArgs {
    /// Number of meters connecting at once.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    meters: usize,
    /// Meter key algorithm.
    #[arg(long, value_enum, default_value_t = AlgArg::Es256)]
    alg: AlgArg,
    /// Connection attempts in progress at once (TCP + TLS + CONNECT).
    #[arg(long, default_value_t = 256, value_name = "C")]
    concurrency: usize,
    #[command(flatten)]
    common: CommonArgs,
}

/// `gridward bench setup` (internal)
#[derive(Debug, Args)]
struct SetupArgs {
    /// Work directory.
    #[arg(long)]
    dir: PathBuf,
    /// Meter key algorithm.
    #[arg(long, value_enum)]
    alg: AlgArg,
    /// Meters needed.
    #[arg(long)]
    meters: usize,
}

/// What a load child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadMode {
    /// Publish for a duration.
    Ingest,
    /// Connect staggered and stay idle until STOP.
    Idle,
    /// Connect all at once (with a concurrency cap), then stay until STOP.
    Storm,
}

/// `gridward bench load` (internal)
#[derive(Debug, Args)]
struct LoadArgs {
    /// PKI directory.
    #[arg(long)]
    pki: PathBuf,
    /// Number of meters.
    #[arg(long)]
    meters: usize,
    /// Server port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// What to do.
    #[arg(long, value_enum)]
    mode: LoadMode,
    /// Aggregate rate, messages/s (0: max).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Timed run, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Messages in flight per meter.
    #[arg(long, default_value_t = 1)]
    window: u16,
    /// Document format.
    #[arg(long, value_enum, default_value_t = FormatArg::Xml)]
    format: FormatArg,
    /// Envelopes pre-signed per meter.
    #[arg(long, default_value_t = 16)]
    per_meter: usize,
    /// Longest pre-signing phase, seconds.
    #[arg(long, default_value_t = 90.0)]
    presign_secs: f64,
    /// Reuse the pre-signed envelopes in a cycle (a broker that does not check counters).
    #[arg(long)]
    cycle: bool,
    /// Connection attempts in progress at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// New connections per second (0: no pacing).
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(0.0);
    }
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate: give messages per second or `max`"
        )),
    }
}

/// Runs `gridward bench ...`.
pub fn run(args: BenchArgs) -> Result<()> {
    let nofile = raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match args.command {
        BenchCommand::Ingest(a) => rt.block_on(ingest(a, nofile)),
        BenchCommand::Idle(a) => rt.block_on(idle(a, nofile)),
        BenchCommand::Storm(a) => rt.block_on(storm(a, nofile)),
        BenchCommand::Forward(a) => rt.block_on(crate::bench_forward::run(a)),
        BenchCommand::Api(a) => rt.block_on(crate::bench_api::run(a)),
        BenchCommand::Commands(a) => rt.block_on(crate::bench_commands::run(a)),
        BenchCommand::Setup(a) => setup(&a),
        BenchCommand::Load(a) => rt.block_on(load(a)),
    }
}

// ----- machine ----------------------------------------------------------------------------

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU time (user + system) of this process, seconds.
pub(crate) fn self_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// What `/proc/PID` says about a process.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    /// utime + stime, seconds.
    pub(crate) cpu: f64,
    /// VmRSS, bytes.
    pub(crate) rss: u64,
    /// VmHWM (peak RSS), bytes.
    pub(crate) hwm: u64,
}

/// Reads `/proc/{pid}` (`None`: this process; CPU then from getrusage, finer than clock ticks).
pub(crate) fn proc_sample(pid: Option<u32>) -> Result<ProcSample> {
    let dir = pid.map_or_else(
        || PathBuf::from("/proc/self"),
        |p| PathBuf::from(format!("/proc/{p}")),
    );
    let status = std::fs::read_to_string(dir.join("status"))
        .with_context(|| format!("reading {}", dir.join("status").display()))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |v| v * 1024)
    };
    let cpu = match pid {
        None => self_cpu(),
        Some(_) => {
            let stat = std::fs::read_to_string(dir.join("stat"))
                .with_context(|| format!("reading {}", dir.join("stat").display()))?;
            // Fields after the command name, which is in parentheses and may contain spaces:
            // state(3) ... utime(14) stime(15) → indexes 11 and 12 after ')'.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .filter(|&h| h > 0)
                .unwrap_or(100) as f64;
            (ticks(11) + ticks(12)) as f64 / hz
        }
    };
    Ok(ProcSample {
        cpu,
        rss: kb("VmRSS:"),
        hwm: kb("VmHWM:"),
    })
}

// ----- work directory and PKI --------------------------------------------------------------

/// The work directory: given, or temporary (removed on drop).
pub(crate) struct Work {
    pub(crate) path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Work {
    pub(crate) fn new(dir: Option<&Path>) -> Result<Self> {
        match dir {
            Some(d) => {
                if d.exists() {
                    let empty = d
                        .read_dir()
                        .with_context(|| format!("reading {}", d.display()))?
                        .next()
                        .is_none();
                    if !empty && !d.join(MARKER).exists() {
                        bail!(
                            "{} exists and was not made by `gridward bench`; pass another --dir",
                            d.display()
                        );
                    }
                }
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                std::fs::write(d.join(MARKER), "made by gridward bench; safe to delete\n")
                    .with_context(|| format!("writing in {}", d.display()))?;
                let path = std::fs::canonicalize(d)
                    .with_context(|| format!("resolving {}", d.display()))?;
                Ok(Self { path, _tmp: None })
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("gridward-bench-")
                    .tempdir()
                    .context("creating a temporary work directory")?;
                Ok(Self {
                    path: tmp.path().to_owned(),
                    _tmp: Some(tmp),
                })
            }
        }
    }

    fn pki(&self, alg: AlgArg) -> PathBuf {
        self.path.join(alg.dir_name())
    }
}

/// `gridward bench setup`: a PKI with a server certificate, the subscriber's client certificate
/// and at least `meters` meters of `alg`, in DIR/pki-{alg}. Runs in a child process so that
/// issuing thousands of keys does not shape the head-end process' memory.
fn setup(args: &SetupArgs) -> Result<()> {
    let pki_dir = args.dir.join(args.alg.dir_name());
    let now = OffsetDateTime::now_utc();
    let pki = if pki_dir.join("inventory.json").exists() {
        Pki::open(&pki_dir, None)?
    } else {
        if pki_dir.exists() {
            std::fs::remove_dir_all(&pki_dir)
                .with_context(|| format!("clearing {}", pki_dir.display()))?;
        }
        Pki::init(&pki_dir, &InitOptions::new("gridward-bench", now))?
    };
    let mut opts = IssueOptions::new("gridward-bench");
    if !pki_dir
        .join("servers")
        .join(SERVER_NAME)
        .join("key.pem")
        .exists()
    {
        pki.issue_server(
            SERVER_NAME,
            &[SERVER_NAME.to_owned(), "127.0.0.1".to_owned()],
            &opts,
            now,
        )?;
    }
    if !pki_dir
        .join("clients")
        .join(SUBSCRIBER)
        .join("key.pem")
        .exists()
    {
        pki.issue_client(SUBSCRIBER, &opts, now)?;
    }
    let have = list_meters(&pki_dir, PREFIX)?.len();
    if have < args.meters {
        opts.key_alg = args.alg.key_alg();
        let missing = args.meters - have;
        eprintln!(
            "  issuing {missing} meter certificates ({}) in {}",
            args.alg.key_alg(),
            pki_dir.display()
        );
        let started = Instant::now();
        let mut last = Instant::now();
        pki.issue_meters(PREFIX, missing, &opts, now, &mut |n| {
            if last.elapsed() >= Duration::from_secs(2) {
                last = Instant::now();
                eprintln!(
                    "  ... {n}/{missing} ({:.0}/s)",
                    n as f64 / started.elapsed().as_secs_f64().max(0.001)
                );
            }
        })?;
    }
    Ok(())
}

fn run_setup(work: &Work, alg: AlgArg, meters: usize) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the gridward binary")?;
    let status = std::process::Command::new(exe)
        .args(["bench", "setup", "--alg"])
        .arg(alg_value(alg))
        .arg("--meters")
        .arg(meters.to_string())
        .arg("--dir")
        .arg(&work.path)
        .stdin(Stdio::null())
        .status()
        .context("running `gridward bench setup`")?;
    if !status.success() {
        bail!("creating the bench PKI failed ({status})");
    }
    Ok(work.pki(alg))
}

fn alg_value(alg: AlgArg) -> &'static str {
    match alg {
        AlgArg::Es256 => "es256",
        AlgArg::Eddsa => "eddsa",
        AlgArg::Rs256 => "rs256",
    }
}

// ----- the head-end --------------------------------------------------------------------------

/// Starts the head-end in this process on 127.0.0.1:0 with a fresh database and the bench
/// limits: no rate limit, no ban, room for every meter, a 1 h freshness window.
async fn start_headend(
    work: &Work,
    pki_dir: &Path,
    meters: usize,
    window: u16,
    tag: &str,
) -> Result<(Running, Config)> {
    let db = work.path.join(format!("gridward-{tag}.db"));
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    let mut raw = RawConfig::loopback(pki_dir, &db);
    raw.pki.server_name = Some(SERVER_NAME.to_owned());
    raw.mqtt.max_connections = Some(meters.saturating_add(1000).max(20_000));
    raw.mqtt.connect_timeout_secs = Some(60);
    raw.mqtt.max_inflight = Some(window.max(32));
    raw.mqtt.rate_per_second = Some(1_000_000.0);
    raw.mqtt.rate_burst = Some(1_000_000);
    raw.mqtt.ban_after_failures = Some(0);
    raw.ingest.max_skew_secs = Some(3600);
    let config = Config::from_raw(raw, Path::new("(bench)"), &work.path)?;
    let running = gridward_hes::service::start(&config, system_clock())
        .await
        .context("starting the head-end")?;
    Ok((running, config))
}

// ----- children -----------------------------------------------------------------------------

/// A `gridward bench load` child: killed when dropped.
struct LoadChild {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl LoadChild {
    fn spawn(args: &[String]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the gridward binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["bench", "load"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load generator (`gridward bench load`)")?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("the load generator has no stdout")?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next `TAG {json}` line.
    async fn next(&mut self) -> Result<(String, Value)> {
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .context("reading from the load generator")?;
            let Some(line) = line else {
                let status = self.child.wait().await.ok();
                bail!(
                    "the load generator stopped early ({})",
                    status.map_or_else(|| "unknown status".to_owned(), |s| s.to_string())
                );
            };
            let (tag, rest) = line.split_once(' ').unwrap_or((line.as_str(), "{}"));
            if let Ok(v) = serde_json::from_str::<Value>(rest) {
                return Ok((tag.to_owned(), v));
            }
        }
    }

    /// Waits for `tag`, passing `PROGRESS` lines to `on_progress`.
    async fn expect(&mut self, tag: &str, on_progress: &mut dyn FnMut(&Value)) -> Result<Value> {
        loop {
            let (t, v) = self.next().await?;
            if t == tag {
                return Ok(v);
            }
            if t == "PROGRESS" {
                on_progress(&v);
                continue;
            }
            if t == "ERROR" {
                bail!(
                    "load generator: {}",
                    v.get("error").and_then(Value::as_str).unwrap_or("failed")
                );
            }
        }
    }

    async fn send(&mut self, command: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the load generator's stdin is closed")?;
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .context("writing to the load generator")?;
        stdin.flush().await.context("writing to the load generator")
    }

    /// Closes stdin and waits for the child to exit (killed after 15 s).
    async fn finish(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A Mosquitto broker of our own: generated config, free port, killed when dropped.
struct Mosquitto {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
}

impl Mosquitto {
    async fn start(exe: &Path, work: &Work, pki_dir: &Path) -> Result<Self> {
        if !exe.exists() {
            bail!(
                "{} not found: install the Debian package `mosquitto`, pass --mosquitto PATH, \
                 or run with --no-baseline",
                exe.display()
            );
        }
        let port = free_port()?;
        let conf = work.path.join("mosquitto.conf");
        let p = |rel: &str| pki_dir.join(rel).display().to_string();
        let text = format!(
            "# Written by gridward bench: a throwaway broker on 127.0.0.1:{port}.\n\
             per_listener_settings false\n\
             persistence false\n\
             user root\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             set_tcp_nodelay true\n\
             # QoS 1 towards the subscriber: no in-flight cap, no queue cap (nothing dropped).\n\
             max_inflight_messages 0\n\
             max_queued_messages 0\n\
             max_keepalive 65535\n\
             allow_anonymous false\n\
             listener {port} 127.0.0.1\n\
             max_connections -1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             crlfile {}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            p("ca/root.crt.pem"),
            p(&format!("servers/{SERVER_NAME}/chain.pem")),
            p(&format!("servers/{SERVER_NAME}/key.pem")),
            p("crl/issuing.crl.pem"),
        );
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        let log_path = work.path.join("mosquitto.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let pid = child.id().context("mosquitto exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("mosquitto exited ({status}): {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on port {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { child, pid, port })
    }

    fn sample(&self) -> Result<ProcSample> {
        proc_sample(Some(self.pid))
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

/// The Mosquitto baseline's subscriber: `meters/+/readings` at QoS 1, counts and acknowledges.
struct Subscriber {
    count: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(port: u16, pki_dir: &Path) -> Result<Self> {
        let material = Pki::open(pki_dir, None)?.tls_material(LeafKind::Client, SUBSCRIBER)?;
        let config = gridward_pki::tls::client_config(&material)?;
        let mut opts = ClientOptions::new(SUBSCRIBER);
        opts.protocol = Protocol::V311;
        opts.keep_alive = Duration::from_secs(3600);
        let (client, _) = client::connect_tls(("127.0.0.1", port), SERVER_NAME, config, &opts)
            .await
            .context("connecting the subscriber to mosquitto")?;
        let (mut r, mut w) = client.into_split();
        w.subscribe(1, "meters/+/readings", QoS::AtLeastOnce)
            .await
            .context("subscribing")?;
        match tokio::time::timeout(Duration::from_secs(5), r.recv()).await {
            Ok(Ok(Packet::SubAck { return_codes, .. })) if return_codes == [1] => {}
            other => bail!("mosquitto refused the subscription: {other:?}"),
        }
        let count = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel::<u16>();
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            while let Some(pkid) = rx.recv().await {
                buf.clear();
                buf.extend_from_slice(&puback_311(pkid));
                while let Ok(p) = rx.try_recv() {
                    buf.extend_from_slice(&puback_311(p));
                }
                if w.send_raw(&buf).await.is_err() {
                    break;
                }
            }
        });
        let c = Arc::clone(&count);
        let reader = tokio::spawn(async move {
            while let Ok(p) = r.recv().await {
                if let Packet::Publish { qos, pkid, .. } = p {
                    c.fetch_add(1, Ordering::Relaxed);
                    if qos == QoS::AtLeastOnce && tx.send(pkid).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self {
            count,
            reader,
            writer,
        })
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn stop(self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// An MQTT 3.1.1 PUBACK.
fn puback_311(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 0x02, hi, lo]
}

// ----- messages ------------------------------------------------------------------------------

/// A reading envelope as a meter sends it: counter `counter`, a register that grows with it.
fn reading_envelope(
    key: &SigningKey,
    id: &MeterId,
    topic: &str,
    counter: u64,
    timestamp: i64,
    format: Format,
) -> Result<Vec<u8>> {
    let at = OffsetDateTime::from_unix_timestamp(timestamp).context("timestamp")?;
    // Exact binary fractions: the register never goes backwards and round-trips exactly.
    let kwh = 1000.0 + counter as f64 * 0.125;
    let reading = Reading::new(id.clone(), at, kwh).context("reading")?;
    let doc = match format {
        Format::Xml => reading.to_xml(),
        Format::Json => reading.to_json(),
    };
    let params = EnvelopeParams {
        meter_id: id,
        counter,
        timestamp,
        content_type: format,
        topic,
    };
    Ok(envelope::sign(key, &params, doc.as_bytes())?)
}

fn readings_topic(id: &MeterId) -> String {
    format!("meters/{id}/readings")
}

/// Verify-only ceiling: `threads` threads verifying one pre-signed envelope in a tight loop with
/// `gridward_core::envelope::verify` (decode + checks + signature) for `secs` seconds.
fn verify_ceiling(pki_dir: &Path, format: Format, secs: f64) -> Result<(f64, usize, usize)> {
    let ids = select_meters(pki_dir, PREFIX, 1)?;
    let id = ids.first().context("no meter in the bench PKI")?.clone();
    let key_path = pki_dir.join("meters").join(id.as_str()).join("key.pem");
    let pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let key = SigningKey::from_pkcs8_pem(&pem)?;
    let vk = key.verifying_key()?;
    let topic = readings_topic(&id);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let env = reading_envelope(&key, &id, &topic, 1, now, format)?;
    envelope::verify(&env, &vk, &id, &topic).context("the ceiling's envelope does not verify")?;
    let threads = cores();
    let run_for = Duration::from_secs_f64(secs.max(0.1));
    let started = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (env, vk, id, topic) = (&env, &vk, &id, &topic);
                s.spawn(move || {
                    let t0 = Instant::now();
                    let mut n = 0u64;
                    while t0.elapsed() < run_for {
                        for _ in 0..32 {
                            if envelope::verify(env, vk, id, topic).is_ok() {
                                n += 1;
                            }
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    Ok((total as f64 / elapsed, threads, env.len()))
}

// ----- results -------------------------------------------------------------------------------

/// A table printed on stdout: a label and one cell per system.
struct Table {
    header: Vec<String>,
    rows: Vec<(String, Vec<String>)>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, label: &str, cells: Vec<String>) {
        self.rows.push((label.to_owned(), cells));
    }

    fn render(&self) -> String {
        let label_w = self
            .rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0)
            .max(10);
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for (_, cells) in &self.rows {
            for (i, c) in cells.iter().enumerate().take(cols) {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let mut out = String::new();
        let _ = write!(out, "{:label_w$}", "");
        for (h, w) in self.header.iter().zip(&widths) {
            let _ = write!(out, "  {h:>w$}");
        }
        out.push('\n');
        for (label, cells) in &self.rows {
            let _ = write!(out, "{label:label_w$}");
            for (c, w) in cells.iter().zip(&widths) {
                let _ = write!(out, "  {c:>w$}");
            }
            out.push('\n');
        }
        out
    }
}

pub(crate) fn write_json(path: Option<&Path>, value: &Value) -> Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn ms_us(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(crate) fn rate_str(r: f64) -> String {
    format!("{r:.0}/s")
}

fn dash() -> String {
    "-".to_owned()
}

// ----- bench ingest ---------------------------------------------------------------------------

/// One system's ingest run, as measured.
#[derive(Debug, Default)]
struct IngestRun {
    /// The load generator's RESULT.
    client: Value,
    /// Server CPU seconds during the timed run (and drain).
    server_cpu: f64,
    /// Server wall seconds of that interval.
    server_wall: f64,
    /// Server peak RSS, bytes.
    server_hwm: u64,
    /// Extra figures of this system.
    extra: Value,
}

impl IngestRun {
    fn acked_per_sec(&self) -> f64 {
        u(&self.client, "acked_in_window") as f64 / f(&self.client, "duration_s").max(0.001)
    }
}

fn ingest_load_args(
    args: &IngestArgs,
    pki_dir: &Path,
    port: u16,
    window: u16,
    per_meter: usize,
    cycle: bool,
) -> Vec<String> {
    let mut v = vec![
        "--pki".to_owned(),
        pki_dir.display().to_string(),
        "--meters".to_owned(),
        args.meters.to_string(),
        "--port".to_owned(),
        port.to_string(),
        "--mode".to_owned(),
        "ingest".to_owned(),
        "--rate".to_owned(),
        args.rate.to_string(),
        "--duration".to_owned(),
        args.duration.to_string(),
        "--window".to_owned(),
        window.to_string(),
        "--format".to_owned(),
        match args.format {
            FormatArg::Xml => "xml",
            FormatArg::Json => "json",
        }
        .to_owned(),
        "--per-meter".to_owned(),
        per_meter.to_string(),
        "--concurrency".to_owned(),
        "64".to_owned(),
        "--connect-rate".to_owned(),
        "2000".to_owned(),
    ];
    if cycle {
        v.push("--cycle".to_owned());
    }
    v
}

fn progress_line(label: &str, started: Instant, v: &Value, server: &str) {
    eprintln!(
        "  [{label} {:>4.0} s] meters: {} sent, {} acknowledged ({:.0}/s){server}",
        started.elapsed().as_secs_f64(),
        u(v, "sent"),
        u(v, "acked"),
        f(v, "acked_rate"),
    );
}

async fn ingest(args: IngestArgs, nofile: Option<(u64, u64)>) -> Result<()> {
    if args.meters == 0 || args.duration == 0 {
        bail!("--meters and --duration must be at least 1");
    }
    check_nofile(nofile, args.meters + 16)?;
    let window = args
        .window
        .unwrap_or(if args.rate > 0.0 { 8 } else { 1 })
        .max(1);
    let load_before = loadavg();
    let rate_text = if args.rate > 0.0 {
        format!("{:.0} messages/s", args.rate)
    } else {
        format!("max rate (window {window} per meter)")
    };
    eprintln!(
        "gridward bench ingest: {} meters, {rate_text}, {} s, {}, {:?}; {} cores, load average {load_before}",
        args.meters,
        args.duration,
        args.alg.name(),
        args.format,
        cores()
    );
    let work = Work::new(args.common.dir.as_deref())?;
    eprintln!("1. PKI in {}", work.path.display());
    let pki_dir = run_setup(&work, args.alg, args.meters)?;
    let planned_rate = if args.rate > 0.0 {
        args.rate * 1.05
    } else {
        args.presign_rate
    };
    let per_meter =
        ((planned_rate * args.duration as f64) / args.meters as f64).ceil() as usize + 2;

    // Gridward.
    eprintln!("2. Gridward: head-end in this process, meters in a child process");
    let (running, config) = start_headend(&work, &pki_dir, args.meters, window, "ingest").await?;
    let port = running.local_addr.port();
    let mut child = LoadChild::spawn(&ingest_load_args(
        &args, &pki_dir, port, window, per_meter, false,
    ))?;
    let ready = child.expect("READY", &mut |_| {}).await?;
    eprintln!(
        "   {} meters connected, {} envelopes pre-signed; running {} s",
        u(&ready, "connected"),
        u(&ready, "presigned"),
        args.duration
    );
    let m0 = running.metrics.snapshot();
    let cpu0 = self_cpu();
    let started = Instant::now();
    child.send("GO").await?;
    let mut last = (Instant::now(), m0.accepted);
    let metrics = Arc::clone(&running.metrics);
    let result = child
        .expect("RESULT", &mut |v| {
            let m = metrics.snapshot();
            let rate = (m.accepted - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
            last = (Instant::now(), m.accepted);
            let server = format!(
                " · head-end: {} stored ({rate:.0}/s), {} refused",
                m.accepted - m0.accepted,
                m.rejected_total() - m0.rejected_total()
            );
            progress_line("gridward", started, v, &server);
        })
        .await?;
    let cpu1 = self_cpu();
    let wall = started.elapsed().as_secs_f64();
    let m1 = running.metrics.snapshot();
    let me = proc_sample(None)?;
    child.finish().await;
    let sessions_peak = u(&ready, "connected");
    let stored = running.store.counts().map(|c| c.readings).unwrap_or(0);
    running.shutdown().await;
    let mut rejected = serde_json::Map::new();
    for (reason, n) in &m1.rejected {
        let before = m0.rejected_for(*reason);
        if *n > before {
            rejected.insert(reason.code().to_owned(), json!(n - before));
        }
    }
    let gw = IngestRun {
        client: result,
        server_cpu: cpu1 - cpu0,
        server_wall: wall,
        server_hwm: me.hwm,
        extra: json!({
            "stored_during_run": m1.accepted - m0.accepted,
            "readings_in_store": stored,
            "duplicates": m1.duplicates - m0.duplicates,
            "refused": rejected,
            "store_batches": m1.batches - m0.batches,
            "server_rss_end_bytes": me.rss,
            "server_ingest_latency_p50_us": m1.p50.as_micros() as u64,
            "server_ingest_latency_p99_us": m1.p99.as_micros() as u64,
            "server_ingest_latency_max_us": m1.max.as_micros() as u64,
            "meters_connected": sessions_peak,
            "database": config.store_path.display().to_string(),
        }),
    };

    // The verify-only ceiling.
    eprintln!(
        "3. verify-only ceiling: {} on {} threads for {:.0} s",
        args.alg.name(),
        cores(),
        args.ceiling_secs
    );
    let pki_for_ceiling = pki_dir.clone();
    let format: Format = args.format.into();
    let ceiling_secs = args.ceiling_secs;
    let (ceiling, ceiling_threads, envelope_bytes) =
        tokio::task::spawn_blocking(move || verify_ceiling(&pki_for_ceiling, format, ceiling_secs))
            .await
            .context("the ceiling measurement panicked")??;

    // Mosquitto.
    let mq = if args.common.no_baseline {
        None
    } else {
        eprintln!("4. Mosquitto: the same meters and messages, relayed to one subscriber");
        Some(ingest_mosquitto(&args, &work, &pki_dir, window).await?)
    };
    let load_after = loadavg();

    // Report.
    let gw_rate = gw.acked_per_sec();
    let mut t = Table::new(if mq.is_some() {
        &["Gridward", "Mosquitto"]
    } else {
        &["Gridward"]
    });
    let both = |g: String, m: &dyn Fn(&IngestRun) -> String| {
        let mut v = vec![g];
        if let Some(mq) = &mq {
            v.push(m(mq));
        }
        v
    };
    t.row(
        "acknowledged messages/s",
        both(rate_str(gw_rate), &|m| rate_str(m.acked_per_sec())),
    );
    t.row(
        "  (Gridward: accepted = stored)",
        both(
            format!(
                "{} in {} s",
                u(&gw.client, "acked_in_window"),
                args.duration
            ),
            &|m| format!("{} in {} s", u(&m.client, "acked_in_window"), args.duration),
        ),
    );
    for (label, key) in [
        ("latency publish → PUBACK p50", "p50_us"),
        ("latency p99", "p99_us"),
        ("latency max", "max_us"),
    ] {
        t.row(
            label,
            both(ms_us(f(&gw.client, key)), &|m| ms_us(f(&m.client, key))),
        );
    }
    t.row(
        "delivered to the subscriber/s",
        both(dash(), &|m| rate_str(f(&m.extra, "delivered_per_s"))),
    );
    t.row(
        "server CPU seconds",
        both(
            format!("{:.1} s of {:.1} s", gw.server_cpu, gw.server_wall),
            &|m| format!("{:.1} s of {:.1} s", m.server_cpu, m.server_wall),
        ),
    );
    let per_msg = |r: &IngestRun| {
        let n = u(&r.client, "acked_total").max(1) as f64;
        format!("{:.0} µs", r.server_cpu * 1e6 / n)
    };
    t.row("server CPU per message", both(per_msg(&gw), &per_msg));
    t.row(
        "server peak RSS (VmHWM)",
        both(mib(gw.server_hwm), &|m| mib(m.server_hwm)),
    );
    t.row(
        "load generator CPU seconds",
        both(format!("{:.1} s", f(&gw.client, "cpu_s")), &|m| {
            format!("{:.1} s", f(&m.client, "cpu_s"))
        }),
    );
    t.row(
        "refused / unacknowledged / errors",
        both(
            format!(
                "{} / {} / {}",
                u(&gw.client, "refused"),
                u(&gw.client, "unacked"),
                u(&gw.client, "errors")
            ),
            &|m| {
                format!(
                    "{} / {} / {}",
                    u(&m.client, "refused"),
                    u(&m.client, "unacked"),
                    u(&m.client, "errors")
                )
            },
        ),
    );
    println!(
        "\n== gridward bench ingest: {} meters, {rate_text}, {} s, {} {:?} envelopes of {envelope_bytes} bytes ==",
        args.meters,
        args.duration,
        args.alg.name(),
        args.format
    );
    println!(
        "machine: {} cores; load average before {load_before}, after {load_after}",
        cores()
    );
    print!("{}", t.render());
    println!(
        "Gridward: {} stored in the run ({} readings in the store), head-end ingest latency p99 {}",
        u(&gw.extra, "stored_during_run"),
        u(&gw.extra, "readings_in_store"),
        ms_us(f(&gw.extra, "server_ingest_latency_p99_us")),
    );
    if u(&gw.client, "signed_live") > 0 {
        println!(
            "note: {} envelopes were signed live by the load generator (pre-signed pool exhausted)",
            u(&gw.client, "signed_live")
        );
    }
    println!(
        "verify-only ceiling ({}, {ceiling_threads} threads): {:.0} verifications/s",
        args.alg.name(),
        ceiling
    );
    println!(
        "Gridward accepted/s as a share of the ceiling: {:.0} %",
        100.0 * gw_rate / ceiling.max(1.0)
    );
    let mut ratios = json!({ "gridward_over_verify_ceiling": gw_rate / ceiling.max(1.0) });
    if let Some(mq) = &mq {
        let r = gw_rate / mq.acked_per_sec().max(1.0);
        println!("Gridward / Mosquitto throughput: {r:.2}");
        ratios["gridward_over_mosquitto"] = json!(r);
        let d = f(&mq.extra, "delivered_per_s");
        if d > 0.0 {
            ratios["gridward_over_mosquitto_delivered"] = json!(gw_rate / d);
        }
    }
    let run_json = |r: &IngestRun| {
        json!({
            "acked_per_s": r.acked_per_sec(),
            "client": r.client,
            "server_cpu_s": r.server_cpu,
            "server_wall_s": r.server_wall,
            "server_peak_rss_bytes": r.server_hwm,
            "extra": r.extra,
        })
    };
    let out = json!({
        "bench": "ingest",
        "machine": { "cores": cores(), "loadavg_before": load_before, "loadavg_after": load_after },
        "params": {
            "meters": args.meters, "rate": if args.rate > 0.0 { json!(args.rate) } else { json!("max") },
            "window": window, "duration_s": args.duration, "alg": args.alg.name(),
            "format": format!("{:?}", args.format), "envelope_bytes": envelope_bytes,
        },
        "gridward": run_json(&gw),
        "mosquitto": mq.as_ref().map(run_json),
        "verify_ceiling": { "alg": args.alg.name(), "threads": ceiling_threads, "per_s": ceiling },
        "ratios": ratios,
    });
    write_json(args.common.json.as_deref(), &out)
}

async fn ingest_mosquitto(
    args: &IngestArgs,
    work: &Work,
    pki_dir: &Path,
    window: u16,
) -> Result<IngestRun> {
    let mq = Mosquitto::start(&args.common.mosquitto, work, pki_dir).await?;
    let sub = Subscriber::start(mq.port, pki_dir).await?;
    // Mosquitto does not look at counters: a small pool per meter, reused in a cycle.
    let mut child = LoadChild::spawn(&ingest_load_args(args, pki_dir, mq.port, window, 32, true))?;
    let ready = child.expect("READY", &mut |_| {}).await?;
    eprintln!(
        "   {} meters connected to mosquitto (pid {}); running {} s",
        u(&ready, "connected"),
        mq.pid,
        args.duration
    );
    let s0 = mq.sample()?;
    let d0 = sub.count();
    let started = Instant::now();
    child.send("GO").await?;
    let mut last = (Instant::now(), d0);
    let mut delivered_in_window = None;
    let window_end = Duration::from_secs(args.duration);
    let result = child
        .expect("RESULT", &mut |v| {
            let d = sub.count();
            if delivered_in_window.is_none() && started.elapsed() >= window_end {
                delivered_in_window = Some(d - d0);
            }
            let rate = (d - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
            last = (Instant::now(), d);
            let server = format!(" · subscriber: {} delivered ({rate:.0}/s)", d - d0);
            progress_line("mosquitto", started, v, &server);
        })
        .await?;
    let s1 = mq.sample()?;
    let wall = started.elapsed().as_secs_f64();
    // Let the last deliveries arrive.
    let mut settled = sub.count();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sub.count();
        if now == settled {
            break;
        }
        settled = now;
    }
    let delivered_total = settled - d0;
    let delivered_in_window = delivered_in_window.unwrap_or(delivered_total);
    child.finish().await;
    sub.stop();
    mq.stop().await;
    let acked_total = u(&result, "acked_total");
    Ok(IngestRun {
        server_cpu: s1.cpu - s0.cpu,
        server_wall: wall,
        server_hwm: s1.hwm,
        extra: json!({
            "delivered_in_window": delivered_in_window,
            "delivered_per_s": delivered_in_window as f64 / args.duration as f64,
            "delivered_total": delivered_total,
            "acked_not_delivered": acked_total.saturating_sub(delivered_total),
            "server_rss_end_bytes": s1.rss,
            "meters_connected": u(&ready, "connected"),
        }),
        client: result,
    })
}

// ----- bench idle -----------------------------------------------------------------------------

/// One system's idle run.
#[derive(Debug)]
struct IdleRun {
    connected: u64,
    failed: u64,
    rss_before: u64,
    rss_after: u64,
    connect_secs: f64,
    /// Sessions the server counted while the meters were connected (Gridward only).
    server_sessions: Option<u64>,
}

impl IdleRun {
    fn per_conn(&self) -> f64 {
        (self.rss_after as f64 - self.rss_before as f64) / self.connected.max(1) as f64
    }
}

fn idle_load_args(
    pki_dir: &Path,
    meters: usize,
    port: u16,
    mode: &str,
    rate: f64,
    concurrency: usize,
) -> Vec<String> {
    vec![
        "--pki".to_owned(),
        pki_dir.display().to_string(),
        "--meters".to_owned(),
        meters.to_string(),
        "--port".to_owned(),
        port.to_string(),
        "--mode".to_owned(),
        mode.to_owned(),
        "--connect-rate".to_owned(),
        rate.to_string(),
        "--concurrency".to_owned(),
        concurrency.to_string(),
    ]
}

/// Connects the meters of a load child to a server whose RSS `sample` reads.
async fn idle_run(
    load_args: &[String],
    settle: u64,
    sample: &dyn Fn() -> Result<ProcSample>,
    sessions: &dyn Fn() -> Option<u64>,
    label: &str,
) -> Result<IdleRun> {
    let mut child = LoadChild::spawn(load_args)?;
    child.expect("READY", &mut |_| {}).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sample()?;
    let started = Instant::now();
    child.send("GO").await?;
    let connected = child
        .expect("CONNECTED", &mut |v| {
            eprintln!(
                "  [{label} {:>4.0} s] {} connected",
                started.elapsed().as_secs_f64(),
                u(v, "connected")
            );
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = sample()?;
    let server_sessions = sessions();
    child.send("STOP").await?;
    let _ = child.expect("RESULT", &mut |_| {}).await;
    child.finish().await;
    Ok(IdleRun {
        connected: u(&connected, "connected"),
        failed: u(&connected, "failed"),
        rss_before: before.rss,
        rss_after: after.rss,
        connect_secs: f(&connected, "secs"),
        server_sessions,
    })
}

async fn idle(args: IdleArgs, nofile: Option<(u64, u64)>) -> Result<()> {
    if args.meters == 0 || args.connect_rate.is_nan() || args.connect_rate <= 0.0 {
        bail!("--meters and --connect-rate must be positive");
    }
    check_nofile(nofile, args.meters + 16)?;
    let load_before = loadavg();
    eprintln!(
        "gridward bench idle: {} idle meters ({}), {} connections/s; {} cores, load average {load_before}",
        args.meters,
        args.alg.key_alg(),
        args.connect_rate,
        cores()
    );
    let work = Work::new(args.common.dir.as_deref())?;
    eprintln!("1. PKI in {}", work.path.display());
    let pki_dir = run_setup(&work, args.alg, args.meters)?;

    eprintln!("2. Gridward: head-end in this process");
    let (running, _config) = start_headend(&work, &pki_dir, args.meters, 32, "idle").await?;
    let port = running.local_addr.port();
    let gw = idle_run(
        &idle_load_args(&pki_dir, args.meters, port, "idle", args.connect_rate, 64),
        args.settle,
        &|| proc_sample(None),
        &|| Some(running.endpoint.stats().sessions),
        "gridward",
    )
    .await?;
    running.shutdown().await;
    eprintln!(
        "   {} connected ({} sessions at the head-end), RSS {} → {}",
        gw.connected,
        gw.server_sessions.unwrap_or(0),
        mib(gw.rss_before),
        mib(gw.rss_after)
    );

    let mq = if args.common.no_baseline {
        None
    } else {
        eprintln!("3. Mosquitto");
        let mq = Mosquitto::start(&args.common.mosquitto, &work, &pki_dir).await?;
        let pid = mq.pid;
        let run = idle_run(
            &idle_load_args(
                &pki_dir,
                args.meters,
                mq.port,
                "idle",
                args.connect_rate,
                64,
            ),
            args.settle,
            &|| proc_sample(Some(pid)),
            &|| None,
            "mosquitto",
        )
        .await?;
        mq.stop().await;
        eprintln!(
            "   {} connected, RSS {} → {}",
            run.connected,
            mib(run.rss_before),
            mib(run.rss_after)
        );
        Some(run)
    };
    let load_after = loadavg();

    let mut t = Table::new(if mq.is_some() {
        &["Gridward", "Mosquitto"]
    } else {
        &["Gridward"]
    });
    let both = |m: &dyn Fn(&IdleRun) -> String| {
        let mut v = vec![m(&gw)];
        if let Some(mq) = &mq {
            v.push(m(mq));
        }
        v
    };
    t.row(
        "idle meters connected",
        both(&|r| format!("{} ({} failed)", r.connected, r.failed)),
    );
    t.row("server RSS before", both(&|r| mib(r.rss_before)));
    t.row("server RSS with the meters", both(&|r| mib(r.rss_after)));
    t.row(
        "bytes per idle connection",
        both(&|r| format!("{:.0} B ({:.1} KiB)", r.per_conn(), r.per_conn() / 1024.0)),
    );
    t.row(
        "time to connect them",
        both(&|r| format!("{:.1} s", r.connect_secs)),
    );
    println!(
        "\n== gridward bench idle: {} idle meters over mutual TLS ({}) ==",
        args.meters,
        args.alg.key_alg()
    );
    println!(
        "machine: {} cores; load average before {load_before}, after {load_after}",
        cores()
    );
    print!("{}", t.render());
    let mut ratios = json!({});
    if let Some(mq) = &mq {
        let r = gw.per_conn() / mq.per_conn().max(1.0);
        println!("Gridward / Mosquitto memory per idle connection: {r:.2}");
        ratios["gridward_over_mosquitto_bytes_per_conn"] = json!(r);
    }
    let run_json = |r: &IdleRun| {
        json!({
            "connected": r.connected, "failed": r.failed,
            "rss_before_bytes": r.rss_before, "rss_after_bytes": r.rss_after,
            "bytes_per_connection": r.per_conn(), "connect_s": r.connect_secs,
            "server_sessions": r.server_sessions,
        })
    };
    let out = json!({
        "bench": "idle",
        "machine": { "cores": cores(), "loadavg_before": load_before, "loadavg_after": load_after },
        "params": { "meters": args.meters, "key": args.alg.key_alg().to_string(), "connect_rate": args.connect_rate, "settle_s": args.settle },
        "gridward": run_json(&gw),
        "mosquitto": mq.as_ref().map(run_json),
        "ratios": ratios,
    });
    write_json(args.common.json.as_deref(), &out)
}

// ----- bench storm ----------------------------------------------------------------------------

/// One system's storm run.
#[derive(Debug)]
struct StormRun {
    result: Value,
    server_cpu: f64,
}

impl StormRun {
    fn rate(&self) -> f64 {
        u(&self.result, "connected") as f64 / f(&self.result, "secs").max(0.001)
    }
}

async fn storm_run(load_args: &[String], cpu: &dyn Fn() -> f64, label: &str) -> Result<StormRun> {
    let mut child = LoadChild::spawn(load_args)?;
    child.expect("READY", &mut |_| {}).await?;
    let cpu0 = cpu();
    let started = Instant::now();
    child.send("GO").await?;
    let result = child
        .expect("CONNECTED", &mut |v| {
            eprintln!(
                "  [{label} {:>4.0} s] {} connected",
                started.elapsed().as_secs_f64(),
                u(v, "connected")
            );
        })
        .await?;
    let cpu1 = cpu();
    child.send("STOP").await?;
    let _ = child.expect("RESULT", &mut |_| {}).await;
    child.finish().await;
    Ok(StormRun {
        result,
        server_cpu: cpu1 - cpu0,
    })
}

async fn storm(args: StormArgs, nofile: Option<(u64, u64)>) -> Result<()> {
    if args.meters == 0 || args.concurrency == 0 {
        bail!("--meters and --concurrency must be at least 1");
    }
    check_nofile(nofile, args.meters + 16)?;
    let load_before = loadavg();
    eprintln!(
        "gridward bench storm: {} meters ({}) connect at once, {} at a time; {} cores, load average {load_before}",
        args.meters,
        args.alg.key_alg(),
        args.concurrency,
        cores()
    );
    let work = Work::new(args.common.dir.as_deref())?;
    eprintln!("1. PKI in {}", work.path.display());
    let pki_dir = run_setup(&work, args.alg, args.meters)?;

    eprintln!("2. Gridward: head-end in this process");
    let (running, _config) = start_headend(&work, &pki_dir, args.meters, 32, "storm").await?;
    let port = running.local_addr.port();
    let gw = storm_run(
        &idle_load_args(&pki_dir, args.meters, port, "storm", 0.0, args.concurrency),
        &self_cpu,
        "gridward",
    )
    .await?;
    let failures = running.endpoint.stats().handshake_failures;
    running.shutdown().await;

    let mq = if args.common.no_baseline {
        None
    } else {
        eprintln!("3. Mosquitto");
        let mq = Mosquitto::start(&args.common.mosquitto, &work, &pki_dir).await?;
        let pid = mq.pid;
        let cpu = move || proc_sample(Some(pid)).map_or(0.0, |s| s.cpu);
        let run = storm_run(
            &idle_load_args(
                &pki_dir,
                args.meters,
                mq.port,
                "storm",
                0.0,
                args.concurrency,
            ),
            &cpu,
            "mosquitto",
        )
        .await?;
        mq.stop().await;
        Some(run)
    };
    let load_after = loadavg();

    let mut t = Table::new(if mq.is_some() {
        &["Gridward", "Mosquitto"]
    } else {
        &["Gridward"]
    });
    let both = |m: &dyn Fn(&StormRun) -> String| {
        let mut v = vec![m(&gw)];
        if let Some(mq) = &mq {
            v.push(m(mq));
        }
        v
    };
    t.row(
        "meters connected",
        both(&|r| {
            format!(
                "{} ({} failed, {} retries)",
                u(&r.result, "connected"),
                u(&r.result, "failed"),
                u(&r.result, "retries")
            )
        }),
    );
    t.row(
        "time for all (mTLS + CONNECT)",
        both(&|r| format!("{:.2} s", f(&r.result, "secs"))),
    );
    t.row("new connections/s", both(&|r| rate_str(r.rate())));
    for (label, key) in [
        ("connect latency p50", "p50_us"),
        ("connect latency p99", "p99_us"),
        ("connect latency max", "max_us"),
    ] {
        t.row(label, both(&|r| ms_us(f(&r.result, key))));
    }
    t.row(
        "server CPU per connection",
        both(&|r| {
            format!(
                "{:.2} ms",
                r.server_cpu * 1000.0 / u(&r.result, "connected").max(1) as f64
            )
        }),
    );
    t.row(
        "client CPU per connection",
        both(&|r| {
            format!(
                "{:.2} ms",
                f(&r.result, "cpu_s") * 1000.0 / u(&r.result, "connected").max(1) as f64
            )
        }),
    );
    println!(
        "\n== gridward bench storm: {} meters ({}) from cold, {} connecting at a time ==",
        args.meters,
        args.alg.key_alg(),
        args.concurrency
    );
    println!(
        "machine: {} cores; load average before {load_before}, after {load_after}",
        cores()
    );
    print!("{}", t.render());
    if failures > 0 {
        println!("Gridward counted {failures} failed handshakes");
    }
    let mut ratios = json!({});
    if let Some(mq) = &mq {
        let r = gw.rate() / mq.rate().max(0.001);
        println!("Gridward / Mosquitto new connections per second: {r:.2}");
        ratios["gridward_over_mosquitto_connections_per_s"] = json!(r);
    }
    let run_json = |r: &StormRun| json!({ "connections_per_s": r.rate(), "server_cpu_s": r.server_cpu, "client": r.result });
    let out = json!({
        "bench": "storm",
        "machine": { "cores": cores(), "loadavg_before": load_before, "loadavg_after": load_after },
        "params": { "meters": args.meters, "key": args.alg.key_alg().to_string(), "concurrency": args.concurrency },
        "gridward": run_json(&gw),
        "mosquitto": mq.as_ref().map(run_json),
        "ratios": ratios,
    });
    write_json(args.common.json.as_deref(), &out)
}

// ----- the load generator (child process) -------------------------------------------------------

/// Writes one protocol line to stdout.
fn emit(tag: &str, v: &Value) {
    println!("{tag} {v}");
}

/// Commands from the parent on stdin; `None` once stdin closed (the parent is gone).
fn stdin_commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for `word` on stdin; false if stdin closed first.
async fn wait_for(rx: &mut mpsc::UnboundedReceiver<String>, word: &str) -> bool {
    while let Some(line) = rx.recv().await {
        if line == word {
            return true;
        }
    }
    false
}

/// One simulated meter of the load generator.
struct LoadMeter {
    id: MeterId,
    topic: String,
    config: Arc<ClientConfig>,
    key: SigningKey,
    pool: Vec<Bytes>,
    next: usize,
    /// Next counter to sign live once the pool is used up.
    next_counter: u64,
    cycle: bool,
    format: Format,
}

impl LoadMeter {
    /// The next envelope and whether it had to be signed now.
    fn next_envelope(&mut self) -> Result<(Bytes, bool)> {
        if self.cycle && !self.pool.is_empty() {
            let i = self.next % self.pool.len();
            self.next = self.next.wrapping_add(1);
            if let Some(b) = self.pool.get(i) {
                return Ok((b.clone(), false));
            }
        }
        if let Some(b) = self.pool.get(self.next) {
            self.next += 1;
            return Ok((b.clone(), false));
        }
        let env = reading_envelope(
            &self.key,
            &self.id,
            &self.topic,
            self.next_counter,
            OffsetDateTime::now_utc().unix_timestamp(),
            self.format,
        )?;
        self.next_counter += 1;
        Ok((Bytes::from(env), true))
    }
}

async fn load(args: LoadArgs) -> Result<()> {
    match load_inner(args).await {
        Ok(()) => Ok(()),
        Err(e) => {
            emit("ERROR", &json!({ "error": format!("{e:#}") }));
            Err(e)
        }
    }
}

async fn load_inner(args: LoadArgs) -> Result<()> {
    if args.meters == 0 {
        bail!("--meters must be at least 1");
    }
    let mut commands = stdin_commands();
    let trust = Trust::load(&args.pki)?;
    let ids = select_meters(&args.pki, PREFIX, args.meters)?;
    let pki = args.pki.clone();
    let loaded_at = Instant::now();
    let identities = tokio::task::spawn_blocking(move || {
        load_many(&pki, &ids, &trust, &TlsOptions::new(), &|_| {})
    })
    .await
    .context("loading the meters panicked")??;
    eprintln!(
        "   load generator: {} meters loaded in {:.1} s",
        identities.len(),
        loaded_at.elapsed().as_secs_f64()
    );
    let format: Format = args.format.into();
    let mut meters: Vec<LoadMeter> = identities
        .into_iter()
        .map(|m| {
            let (id, config, key) = m.into_parts();
            LoadMeter {
                topic: readings_topic(&id),
                id,
                config,
                key,
                pool: Vec::new(),
                next: 0,
                next_counter: 1,
                cycle: args.cycle,
                format,
            }
        })
        .collect();
    let addr = format!("127.0.0.1:{}", args.port);
    match args.mode {
        LoadMode::Ingest => {
            let presigned = presign(&mut meters, args.per_meter, args.presign_secs).await?;
            let (clients, stats) =
                connect_all(&meters, &addr, args.concurrency, args.connect_rate, false).await;
            let connected = clients.iter().filter(|c| c.is_some()).count();
            emit(
                "READY",
                &json!({ "connected": connected, "failed": stats.failed, "presigned": presigned }),
            );
            if !wait_for(&mut commands, "GO").await {
                return Ok(());
            }
            let result = publish_all(meters, clients, &args).await;
            emit("RESULT", &result);
        }
        LoadMode::Idle | LoadMode::Storm => {
            emit("READY", &json!({ "meters": meters.len() }));
            if !wait_for(&mut commands, "GO").await {
                return Ok(());
            }
            let cpu0 = self_cpu();
            let rate = if args.mode == LoadMode::Idle {
                args.connect_rate
            } else {
                0.0
            };
            let (clients, stats) = connect_all(&meters, &addr, args.concurrency, rate, true).await;
            let connected = clients.iter().filter(|c| c.is_some()).count();
            let v = json!({
                "connected": connected,
                "failed": stats.failed,
                "retries": stats.retries,
                "secs": stats.secs,
                "p50_us": stats.p50_us, "p99_us": stats.p99_us, "max_us": stats.max_us,
                "cpu_s": self_cpu() - cpu0,
                "first_error": stats.first_error,
            });
            emit("CONNECTED", &v);
            // Idle until told to stop (or the parent is gone).
            wait_for(&mut commands, "STOP").await;
            drop(clients);
            emit("RESULT", &v);
        }
    }
    Ok(())
}

/// Signs `per_meter` envelopes for every meter (counters 1..), on every core, in rounds so that
/// all meters get the same depth if the time budget runs out. Returns how many were signed.
async fn presign(meters: &mut [LoadMeter], per_meter: usize, budget_secs: f64) -> Result<u64> {
    let threads = cores();
    let chunk = meters.len().div_ceil(threads).max(1);
    let total = (meters.len() * per_meter) as u64;
    let budget = Duration::from_secs_f64(budget_secs.max(1.0));
    let started = Instant::now();
    let done = AtomicU64::new(0);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // Scoped threads borrow the meters mutably, one chunk each.
    let result: Result<()> = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let done = &done;
            let handles: Vec<_> = meters
                .chunks_mut(chunk)
                .map(|part| {
                    s.spawn(move || -> Result<()> {
                        for round in 0..per_meter {
                            if started.elapsed() > budget {
                                break;
                            }
                            let counter = round as u64 + 1;
                            for m in part.iter_mut() {
                                let env = reading_envelope(
                                    &m.key, &m.id, &m.topic, counter, now, m.format,
                                )?;
                                m.pool.push(Bytes::from(env));
                                m.next_counter = counter + 1;
                            }
                            done.fetch_add(part.len() as u64, Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })
                .collect();
            let mut last = Instant::now();
            loop {
                if handles.iter().all(|h| h.is_finished()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() >= Duration::from_secs(3) {
                    last = Instant::now();
                    eprintln!(
                        "   load generator: pre-signed {}/{total}",
                        done.load(Ordering::Relaxed)
                    );
                }
            }
            for h in handles {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a signing thread panicked")))?;
            }
            Ok(())
        })
    });
    result?;
    let signed = done.load(Ordering::Relaxed);
    eprintln!(
        "   load generator: {signed} envelopes pre-signed in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        if signed < total {
            " (time budget reached: the rest is signed live)"
        } else {
            ""
        }
    );
    Ok(signed)
}

/// How connecting went.
#[derive(Debug, Default)]
struct ConnectStats {
    failed: u64,
    retries: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    first_error: Option<String>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits: constant bounds, creation cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

fn client_options(id: &MeterId) -> ClientOptions {
    let mut opts = ClientOptions::new(id.as_str());
    opts.protocol = Protocol::V5;
    // Idle meters stay silent through a run; the servers grant this or their maximum.
    opts.keep_alive = Duration::from_secs(900);
    opts.connect_timeout = Duration::from_secs(30);
    opts
}

/// Connects every meter (paced at `rate`/s unless 0, at most `concurrency` at once), retrying
/// each up to 5 times. Client `i` belongs to meter `i`.
async fn connect_all(
    meters: &[LoadMeter],
    addr: &str,
    concurrency: usize,
    rate: f64,
    report: bool,
) -> (Vec<Option<Client>>, ConnectStats) {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let connected = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let progress = {
        let connected = Arc::clone(&connected);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if report {
                    emit(
                        "PROGRESS",
                        &json!({ "connected": connected.load(Ordering::Relaxed) }),
                    );
                }
            }
        })
    };
    let mut tasks = Vec::with_capacity(meters.len());
    for (i, m) in meters.iter().enumerate() {
        let sem = Arc::clone(&sem);
        let connected = Arc::clone(&connected);
        let config = Arc::clone(&m.config);
        let opts = client_options(&m.id);
        let addr = addr.to_owned();
        let at = if rate > 0.0 {
            started + Duration::from_secs_f64(i as f64 / rate)
        } else {
            started
        };
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let Ok(_permit) = sem.acquire_owned().await else {
                return (
                    None,
                    Duration::ZERO,
                    0u64,
                    Some("semaphore closed".to_owned()),
                );
            };
            let t0 = Instant::now();
            let mut retries = 0;
            let mut last_err = None;
            for attempt in 0..5u32 {
                if attempt > 0 {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                match client::connect_tls(addr.as_str(), SERVER_NAME, Arc::clone(&config), &opts)
                    .await
                {
                    Ok((c, _)) => {
                        connected.fetch_add(1, Ordering::Relaxed);
                        return (Some(c), t0.elapsed(), retries, None);
                    }
                    Err(e) => last_err = Some(e.to_string()),
                }
            }
            (None, t0.elapsed(), retries, last_err)
        }));
    }
    let mut clients = Vec::with_capacity(meters.len());
    let mut stats = ConnectStats::default();
    let mut hist = new_histogram();
    for t in tasks {
        match t.await {
            Ok((Some(c), took, retries, _)) => {
                hist.saturating_record(took.as_micros().max(1) as u64);
                stats.retries += retries;
                clients.push(Some(c));
            }
            Ok((None, _, retries, err)) => {
                stats.failed += 1;
                stats.retries += retries;
                if stats.first_error.is_none() {
                    stats.first_error = err;
                }
                clients.push(None);
            }
            Err(_) => {
                stats.failed += 1;
                clients.push(None);
            }
        }
    }
    stats.secs = started.elapsed().as_secs_f64();
    progress.abort();
    if !hist.is_empty() {
        stats.p50_us = hist.value_at_quantile(0.5);
        stats.p99_us = hist.value_at_quantile(0.99);
        stats.max_us = hist.max();
    }
    if stats.failed > 0 {
        eprintln!(
            "   load generator: {} meters could not connect (first error: {})",
            stats.failed,
            stats.first_error.as_deref().unwrap_or("?")
        );
    }
    (clients, stats)
}

/// Counters shared by the publishing tasks (for progress).
#[derive(Debug, Default)]
struct Live {
    sent: AtomicU64,
    acked: AtomicU64,
}

/// What one meter's publishing task measured.
#[derive(Debug)]
struct MeterRun {
    hist: Histogram<u64>,
    sent: u64,
    acked_in_window: u64,
    acked_total: u64,
    refused: u64,
    refused_codes: Vec<(u8, u64)>,
    unacked: u64,
    signed_live: u64,
    error: Option<String>,
}

/// What the publishing tasks share: timing and pacing.
#[derive(Debug, Clone, Copy)]
struct Plan {
    start: tokio::time::Instant,
    deadline: tokio::time::Instant,
    /// Seconds between two messages of one meter (0: as fast as the window allows).
    interval: f64,
    window: usize,
}

async fn publish_all(
    meters: Vec<LoadMeter>,
    clients: Vec<Option<Client>>,
    args: &LoadArgs,
) -> Value {
    let cpu0 = self_cpu();
    let live = Arc::new(Live::default());
    let n = clients.iter().filter(|c| c.is_some()).count().max(1);
    let start = tokio::time::Instant::now();
    let plan = Plan {
        start,
        deadline: start + Duration::from_secs_f64(args.duration.max(0.1)),
        interval: if args.rate > 0.0 {
            n as f64 / args.rate
        } else {
            0.0
        },
        window: usize::from(args.window.max(1)),
    };
    let progress = {
        let live = Arc::clone(&live);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = (Instant::now(), 0u64);
            loop {
                tick.tick().await;
                let acked = live.acked.load(Ordering::Relaxed);
                let rate = (acked - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
                last = (Instant::now(), acked);
                emit(
                    "PROGRESS",
                    &json!({ "sent": live.sent.load(Ordering::Relaxed), "acked": acked, "acked_rate": rate }),
                );
            }
        })
    };
    let mut tasks = Vec::new();
    for (k, (meter, client)) in meters.into_iter().zip(clients).enumerate() {
        let Some(client) = client else { continue };
        let live = Arc::clone(&live);
        // Spread the meters' first messages over one interval.
        let offset = if plan.interval > 0.0 {
            plan.interval * (k % n) as f64 / n as f64
        } else {
            0.0
        };
        tasks.push(tokio::spawn(drive_meter(meter, client, plan, offset, live)));
    }
    let mut hist = new_histogram();
    let (mut sent, mut in_window, mut total, mut refused, mut unacked, mut signed_live, mut errors) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut codes = std::collections::BTreeMap::<u8, u64>::new();
    let mut first_error = None;
    for t in tasks {
        let Ok(r) = t.await else {
            errors += 1;
            continue;
        };
        let _ = hist.add(&r.hist);
        sent += r.sent;
        in_window += r.acked_in_window;
        total += r.acked_total;
        refused += r.refused;
        unacked += r.unacked;
        signed_live += r.signed_live;
        for (c, k) in r.refused_codes {
            *codes.entry(c).or_default() += k;
        }
        if let Some(e) = r.error {
            errors += 1;
            first_error.get_or_insert(e);
        }
    }
    progress.abort();
    let q = |p: f64| {
        if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(p)
        }
    };
    json!({
        "duration_s": (plan.deadline - plan.start).as_secs_f64(),
        "sent": sent,
        "acked_in_window": in_window,
        "acked_total": total,
        "refused": refused,
        "refused_codes": codes.iter().map(|(c, k)| (format!("{c:#04x}"), json!(k))).collect::<serde_json::Map<_, _>>(),
        "unacked": unacked,
        "signed_live": signed_live,
        "errors": errors,
        "first_error": first_error,
        "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999),
        "max_us": if hist.is_empty() { 0 } else { hist.max() },
        "mean_us": hist.mean(),
        "cpu_s": self_cpu() - cpu0,
    })
}

/// One meter: publish QoS 1 (paced or window-limited) until the deadline, then wait for the
/// outstanding PUBACKs (at most [`DRAIN`]).
async fn drive_meter(
    mut meter: LoadMeter,
    client: Client,
    plan: Plan,
    offset: f64,
    live: Arc<Live>,
) -> MeterRun {
    let (mut r, mut w) = client.into_split();
    let mut run = MeterRun {
        hist: new_histogram(),
        sent: 0,
        acked_in_window: 0,
        acked_total: 0,
        refused: 0,
        refused_codes: Vec::new(),
        unacked: 0,
        signed_live: 0,
        error: None,
    };
    let mut inflight: VecDeque<(u16, Instant)> = VecDeque::with_capacity(plan.window);
    let mut pkid: u16 = 0;
    let mut next_due = plan.start + Duration::from_secs_f64(offset);
    let interval = Duration::from_secs_f64(plan.interval);
    let mut sending = true;
    let mut drain_until = plan.deadline + DRAIN;
    loop {
        let now = tokio::time::Instant::now();
        if sending && now >= plan.deadline {
            sending = false;
            drain_until = now + DRAIN;
        }
        if !sending && (inflight.is_empty() || now >= drain_until) {
            break;
        }
        if sending {
            let mut queued = 0u64;
            while inflight.len() < plan.window && (plan.interval == 0.0 || next_due <= now) {
                let (env, signed_now) = match meter.next_envelope() {
                    Ok(e) => e,
                    Err(e) => {
                        run.error = Some(format!("signing: {e:#}"));
                        break;
                    }
                };
                if signed_now {
                    run.signed_live += 1;
                }
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                if let Err(e) = w.queue_publish(&meter.topic, env, QoS::AtLeastOnce, pkid) {
                    run.error = Some(e.to_string());
                    break;
                }
                inflight.push_back((pkid, Instant::now()));
                queued += 1;
                if plan.interval > 0.0 {
                    next_due += interval;
                }
            }
            if run.error.is_some() {
                break;
            }
            if queued > 0 {
                if let Err(e) = w.flush().await {
                    run.error = Some(e.to_string());
                    break;
                }
                run.sent += queued;
                live.sent.fetch_add(queued, Ordering::Relaxed);
            }
        }
        let wake = if !sending {
            drain_until
        } else if plan.interval > 0.0 && inflight.len() < plan.window {
            next_due.min(plan.deadline)
        } else {
            plan.deadline
        };
        tokio::select! {
            p = r.recv() => match p {
                Ok(Packet::PubAck { pkid: acked, reason_code }) => {
                    let pos = inflight.iter().position(|(id, _)| *id == acked);
                    if let Some((_, sent_at)) = pos.and_then(|i| inflight.remove(i)) {
                        let at = tokio::time::Instant::now();
                        // 0x00 success; 0x10 "no matching subscribers" (a broker) is a success too.
                        if reason_code == 0 || reason_code == 0x10 {
                            run.hist.saturating_record(sent_at.elapsed().as_micros().max(1) as u64);
                            run.acked_total += 1;
                            if at <= plan.deadline {
                                run.acked_in_window += 1;
                            }
                            live.acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            run.refused += 1;
                            match run.refused_codes.iter_mut().find(|(c, _)| *c == reason_code) {
                                Some((_, n)) => *n += 1,
                                None => run.refused_codes.push((reason_code, 1)),
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    run.error = Some(e.to_string());
                    break;
                }
            },
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    run.unacked = inflight.len() as u64;
    let _ = w.disconnect().await;
    run
}
