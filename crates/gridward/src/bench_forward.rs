//! `gridward bench forward`: how fast the forwarder delivers signed readings to a sink over
//! mutual TLS on loopback, and what share of its CPU time signing takes.
//!
//! ```text
//!  this process: store (N readings + outbox rows) ── Forwarders ──► gridward sink (child process)
//!                sign-only and verify-only loops,                   its own CPU from /proc/PID
//!                same key and request shape, same run
//! ```
//!
//! The outbox is filled before the clock starts, so the run measures delivery alone: readings/s
//! from the first request until no row is pending. The signing share is the CPU time of
//! `signed_request` (measured alone, single thread, same key) times the deliveries, over the
//! forwarder process's CPU time during the run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_core::httpsig::{self, HttpSigningKey, HttpVerifyingKey, Request, VerifyPolicy};
use gridward_hes::forward::body::signed_request;
use gridward_hes::forward::{ForwardContext, Forwarders, HttpVersion, TargetSettings, TargetTls};
use gridward_hes::metrics::Metrics;
use gridward_hes::pipeline::system_clock;
use gridward_hes::writer::{Writer, WriterConfig};
use gridward_pki::{InitOptions, IssueOptions, LeafKeyAlg, Pki};
use gridward_store::{Accepted, AcceptedBody, OutboxItem, SqliteStore, Store, TargetId};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::bench_cmd::{Work, cores, loadavg, proc_sample, self_cpu, write_json};

/// `gridward bench forward`
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  gridward bench forward --readings 20000 --alg ed25519 --concurrency 32"
)]
pub struct ForwardArgs {
    /// Readings to deliver (queued before the clock starts).
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    readings: usize,
    /// Meters they come from (each meter's readings are delivered in order).
    #[arg(long, default_value_t = 1_000, value_name = "N")]
    meters: usize,
    /// Requests in flight (the sink allows 32 HTTP/2 streams per connection).
    #[arg(long, default_value_t = 32, value_name = "N")]
    concurrency: usize,
    /// Outbox rows read per batch.
    #[arg(long, default_value_t = 512, value_name = "N")]
    batch: usize,
    /// Signature algorithm of the requests.
    #[arg(long, value_enum, default_value_t = SigAlg::Ed25519)]
    alg: SigAlg,
    /// HTTP version.
    #[arg(long, value_enum, default_value_t = HttpArg::Auto)]
    http: HttpArg,
    /// Work directory [default: a temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also write the results to this file as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Request signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SigAlg {
    /// ed25519.
    Ed25519,
    /// ecdsa-p256-sha256.
    Es256,
}

/// HTTP version offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HttpArg {
    /// HTTP/2 or HTTP/1.1 by ALPN (the sink picks HTTP/2).
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// The sink child process; killed when dropped.
struct SinkChild {
    child: tokio::process::Child,
    port: u16,
}

impl SinkChild {
    async fn start(work: &Path, pki_dir: &Path, key_id: &str, key_cert: &Path) -> Result<Self> {
        let ready = work.join("sink.addr");
        let _ = std::fs::remove_file(&ready);
        let store = work.join("sink.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", store.display()));
        }
        let exe = std::env::current_exe().context("locating the gridward binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("sink")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--name",
                "sink",
                "--stats-every",
                "0",
            ])
            .arg("--dir")
            .arg(pki_dir)
            .arg("--store")
            .arg(&store)
            .arg("--key")
            .arg(format!("{key_id}={}", key_cert.display()))
            .arg("--ready-file")
            .arg(&ready)
            .arg("--max-connections")
            .arg("1024")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting `gridward sink`")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Some(port) = text
                    .trim()
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
            {
                return Ok(Self { child, port });
            }
            if let Some(status) = child.try_wait()? {
                bail!("`gridward sink` exited before listening ({status})");
            }
            if Instant::now() > deadline {
                bail!("`gridward sink` did not start listening within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn cpu(&self) -> f64 {
        self.child
            .id()
            .and_then(|pid| proc_sample(Some(pid)).ok())
            .map_or(0.0, |s| s.cpu)
    }

    fn peak_rss(&self) -> u64 {
        self.child
            .id()
            .and_then(|pid| proc_sample(Some(pid)).ok())
            .map_or(0, |s| s.hwm)
    }
}

/// Runs `gridward bench forward`.
pub async fn run(args: ForwardArgs) -> Result<()> {
    if args.readings == 0 || args.meters == 0 || args.concurrency == 0 || args.batch == 0 {
        bail!("--readings, --meters, --concurrency and --batch must be at least 1");
    }
    eprintln!(
        "gridward bench forward: {} readings from {} meters, {} in flight, {:?} signatures, {:?}; {} cores, load average {}",
        args.readings,
        args.meters,
        args.concurrency,
        args.alg,
        args.http,
        cores(),
        loadavg()
    );
    let work = Work::new(args.dir.as_deref())?;
    let pki_dir = work.path.join("pki-forward");
    let now = OffsetDateTime::now_utc();
    let (signer, key_cert) = prepare_pki(&pki_dir, args.alg, now)?;
    eprintln!("1. PKI in {}", pki_dir.display());

    // The outbox, filled before the clock starts.
    let db = work.path.join("forward.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let _ = std::fs::remove_file(db.with_extension("key"));
    let store = Arc::new(SqliteStore::open(
        &db,
        gridward_store::KeySource::file(db.with_extension("key")),
    )?);
    let target = store.register_outbox_target("sink")?;
    let fill_started = Instant::now();
    fill(&store, target, args.readings, args.meters)?;
    eprintln!(
        "2. {} readings and their outbox rows committed in {:.1} s",
        args.readings,
        fill_started.elapsed().as_secs_f64()
    );

    // Signing and verification alone, same key and request shape.
    let key_pem = std::fs::read_to_string(&signer.1).context("reading the signing key")?;
    let key = HttpSigningKey::from_pkcs8_pem(&key_pem, signer.0.as_str())?;
    let (sign_us, verify_us) = sign_verify_cost(&key, Duration::from_secs(1))?;
    eprintln!(
        "3. {} alone, one core: sign {:.1} µs, verify {:.1} µs per request",
        key.alg(),
        sign_us,
        verify_us
    );

    let sink = SinkChild::start(&work.path, &pki_dir, &signer.0, &key_cert).await?;
    let url = format!("https://127.0.0.1:{}/readings", sink.port);
    let mut settings = TargetSettings::new(
        "sink",
        url.clone(),
        TargetTls::Pki {
            dir: pki_dir.clone(),
            client: "hes".into(),
        },
    );
    settings.signing_key = Some(signer.1.clone());
    settings.key_id = signer.0.clone();
    settings.concurrency = args.concurrency;
    settings.batch_size = args.batch;
    settings.http = match args.http {
        HttpArg::Auto => HttpVersion::Auto,
        HttpArg::Http1 => HttpVersion::Http1,
        HttpArg::Http2 => HttpVersion::Http2,
    };
    settings.retry_initial = Duration::from_millis(50);
    settings.retry_max = Duration::from_secs(1);
    let loaded = settings.load()?;
    let dyn_store: Arc<dyn Store> = store.clone();
    let (writer, writer_threads) = Writer::start(
        Arc::clone(&dyn_store),
        WriterConfig::default(),
        Arc::new(Metrics::new()),
        Box::new(|_: &[(MeterId, u64)]| {}),
        vec![target],
    )?;
    eprintln!("4. delivering to {url}");
    let cpu0 = self_cpu();
    let sink_cpu0 = sink.cpu();
    let started = Instant::now();
    let forwarders = Forwarders::start(
        ForwardContext {
            store: dyn_store,
            writer: writer.clone(),
            clock: system_clock(),
        },
        vec![(target, loaded, Arc::new(Notify::new()))],
    );
    let bar = indicatif::ProgressBar::new(args.readings as u64).with_style(
        indicatif::ProgressStyle::with_template("   {bar:40} {pos}/{len} delivered ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let deadline = started + Duration::from_secs(600);
    let stats = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stats = store.outbox_stats()?.remove(0);
        bar.set_position(stats.delivered);
        if stats.pending == 0 {
            break stats;
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!("not delivered within 10 minutes: {stats:?}");
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = self_cpu() - cpu0;
    let sink_cpu = sink.cpu() - sink_cpu0;
    bar.finish_and_clear();
    let snapshot = forwarders.snapshot();
    forwarders.shutdown().await;
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_threads.join()).await;
    let sink_peak = sink.peak_rss();
    drop(sink);

    let delivered = stats.delivered;
    let rate = delivered as f64 / elapsed;
    let sign_cpu = delivered as f64 * sign_us / 1e6;
    let share = if cpu > 0.0 { sign_cpu / cpu } else { 0.0 };
    let failed = snapshot.first().map_or(0, |s| s.failed_attempts);
    println!();
    println!(
        "gridward bench forward ({} signatures, {:?})",
        key.alg(),
        args.http
    );
    println!(
        "  delivered                {delivered} readings in {elapsed:.2} s: {rate:.0} readings/s"
    );
    println!("  dead / failed attempts   {} / {failed}", stats.dead);
    println!(
        "  forwarder CPU            {cpu:.2} s ({:.0} µs per reading; outbox reads and settles included)",
        cpu / delivered.max(1) as f64 * 1e6
    );
    println!(
        "  sink CPU                 {sink_cpu:.2} s ({:.0} µs per reading), peak RSS {}",
        sink_cpu / delivered.max(1) as f64 * 1e6,
        crate::bench_cmd::mib(sink_peak)
    );
    println!(
        "  signing                  {sign_us:.1} µs per request alone: {sign_cpu:.2} s of the forwarder's {cpu:.2} s CPU = {:.1} %",
        share * 100.0
    );
    println!(
        "  verifying (sink side)    {verify_us:.1} µs per request alone: {:.1} % of the sink's CPU",
        if sink_cpu > 0.0 {
            delivered as f64 * verify_us / 1e6 / sink_cpu * 100.0
        } else {
            0.0
        }
    );
    write_json(
        args.json.as_deref(),
        &json!({
            "readings": args.readings,
            "meters": args.meters,
            "concurrency": args.concurrency,
            "alg": key.alg().name(),
            "http": format!("{:?}", args.http),
            "delivered": delivered,
            "dead": stats.dead,
            "failed_attempts": failed,
            "seconds": elapsed,
            "per_s": rate,
            "forwarder_cpu_s": cpu,
            "sink_cpu_s": sink_cpu,
            "sign_us": sign_us,
            "verify_us": verify_us,
            "signing_share_of_forwarder_cpu": share,
            "cores": cores(),
        }),
    )?;
    Ok(())
}

/// A PKI with the sink's server certificate, the head-end's client certificate and, for
/// Ed25519, a signing key of its own. Returns ((key id, signing key file), the certificate the
/// sink verifies with).
fn prepare_pki(
    dir: &Path,
    alg: SigAlg,
    now: OffsetDateTime,
) -> Result<((String, PathBuf), PathBuf)> {
    let pki = if dir.join("inventory.json").exists() {
        Pki::open(dir, None)?
    } else {
        Pki::init(dir, &InitOptions::new("gridward-bench", now))?
    };
    let opts = IssueOptions::new("gridward-bench");
    if !dir.join("servers/sink/key.pem").exists() {
        pki.issue_server("sink", &["127.0.0.1".to_owned()], &opts, now)?;
    }
    if !dir.join("clients/hes/key.pem").exists() {
        pki.issue_client("hes", &opts, now)?;
    }
    let name = match alg {
        SigAlg::Es256 => "hes",
        SigAlg::Ed25519 => {
            if !dir.join("clients/hes-ed25519/key.pem").exists() {
                let mut ed = IssueOptions::new("gridward-bench");
                ed.key_alg = LeafKeyAlg::Ed25519;
                pki.issue_client("hes-ed25519", &ed, now)?;
            }
            "hes-ed25519"
        }
    };
    let client = dir.join("clients").join(name);
    Ok((
        (name.to_owned(), client.join("key.pem")),
        client.join("cert.pem"),
    ))
}

/// Commits `n` readings spread over `meters` meters, with their outbox rows.
fn fill(store: &SqliteStore, target: TargetId, n: usize, meters: usize) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let ids = (1..=meters)
        .map(|i| MeterId::new(&format!("f{i:06}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let meter = &ids[i % meters];
        let counter = (i / meters) as u64 + 1;
        batch.push(Accepted {
            meter_id: meter.clone(),
            counter,
            taken_at: now,
            received_at: now,
            body: AcceptedBody::Reading {
                energy_kwh: counter as f64 * 0.25,
            },
            envelope: format!("bench {meter} {counter}").into_bytes(),
            content_type: Format::Xml,
            source: None,
        });
        if batch.len() == 1000 {
            store.commit_with_outbox(&batch, &[target])?;
            batch.clear();
        }
    }
    store.commit_with_outbox(&batch, &[target])?;
    Ok(())
}

/// Microseconds per `signed_request` and per verification (signature + digest), single
/// thread, for about `budget` each.
fn sign_verify_cost(key: &HttpSigningKey, budget: Duration) -> Result<(f64, f64)> {
    let url = "https://127.0.0.1:8443/readings";
    let item = OutboxItem {
        id: 1,
        target: TargetId(1),
        message_id: 1,
        meter_id: MeterId::new("f000001")?,
        counter: 42,
        taken_at: OffsetDateTime::now_utc(),
        energy_kwh: 350.5,
        queued_at: OffsetDateTime::now_utc(),
        attempts: 0,
        envelope: Vec::new(),
    };
    let mut n = 0u64;
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < budget {
        let now = OffsetDateTime::now_utc();
        last = Some(signed_request(
            url,
            key,
            &item,
            false,
            now,
            Duration::from_secs(60),
            format!("{n:032x}"),
        )?);
        n += 1;
    }
    let sign_us = started.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    let Some(signed) = last else {
        bail!("no request signed");
    };
    let verifying: HttpVerifyingKey = key.verifying_key();
    let headers: Vec<(&str, &str)> = signed
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let req = Request {
        method: "POST",
        target_uri: url,
        headers: &headers,
    };
    let policy = VerifyPolicy::default();
    let mut m = 0u64;
    let started = Instant::now();
    while started.elapsed() < budget {
        httpsig::verify_request(&req, &verifying, &policy, OffsetDateTime::now_utc())?;
        httpsig::verify_request_content_digest(&req, &signed.body)?;
        m += 1;
    }
    let verify_us = started.elapsed().as_secs_f64() * 1e6 / m.max(1) as f64;
    Ok((sign_us, verify_us))
}
