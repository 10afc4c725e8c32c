//! `gridward bench api`: what the HTTPS API costs, next to baselines measured in the same
//! process on the same connections.
//!
//! ```text
//!  this process: SQLite store (N readings) ── gridward_api (OWASP Argon2id users) ◄── TLS ──┐
//!                                          └─ gridward_api (INSECURE Argon2id users) ◄─ TLS ─┤
//!                hyper client, C keep-alive HTTP/1.1 connections ───────────────────────────┘
//!                Argon2id verification alone, both parameter sets
//! ```
//!
//! - Requests/s of an authenticated `GET /api/v1/meters/{id}/readings?limit=100` (an operator's
//!   bearer session, a page from the store), next to `GET /healthz` (no credential, no store)
//!   on the same pool of keep-alive connections: both are measured alternately for a few
//!   rounds and the median round of each is reported, with their ratio.
//! - The time of one `POST /api/v1/session` (a consumer: password only) with the production
//!   Argon2id parameters (`Argon2Params::OWASP`), next to the same login against an API whose
//!   users were hashed with the cheapest parameters Argon2 accepts; and the Argon2id
//!   verification alone under both, so the report says what share of a login it is.
//!
//! Client and server share this machine's cores: the figures are for comparing, as ratios,
//! not absolute capacities. Everything listens and connects on 127.0.0.1.

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gridward_access::ratelimit::RateLimit;
use gridward_access::{Access, Argon2Params, NewUser, Role, Secret, password};
use gridward_api::{ApiConfig, ApiContext, RunningApi};
use gridward_audit::AuditLog;
use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki};
use gridward_store::{Accepted, AcceptedBody, SqliteStore, Store};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::bench_cmd::{Work, cores, loadavg, write_json};

use crate::demo_api::{HttpsClient, totp_now};

/// The password of the bench users (strong enough for the policy).
const PASSWORD: &str = "correct horse battery staple 42";
/// Name of the API's server certificate.
const SERVER: &str = "api";

/// `gridward bench api`
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  gridward bench api --readings 10000 --requests 5000 --connections 4 --logins 20"
)]
pub struct ApiArgs {
    /// Readings in the store, spread over --meters meters.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    readings: usize,
    /// Meters the readings belong to (the requests go round them).
    #[arg(long, default_value_t = 10, value_name = "N")]
    meters: usize,
    /// Page size of the readings requests.
    #[arg(long, default_value_t = 100, value_name = "N")]
    limit: usize,
    /// Requests per measurement (of each route, in each round).
    #[arg(long, default_value_t = 5_000, value_name = "N")]
    requests: usize,
    /// Requests in flight, each on its own keep-alive connection.
    #[arg(long, default_value_t = 4, value_name = "N")]
    connections: usize,
    /// Rounds of (healthz, readings); the median round of each is reported.
    #[arg(long, default_value_t = 3, value_name = "N")]
    rounds: usize,
    /// Logins timed with each Argon2id parameter set (and verifications alone).
    #[arg(long, default_value_t = 20, value_name = "N")]
    logins: usize,
    /// Work directory [default: a temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also write the results to this file as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// One measured run of requests.
#[derive(Debug, Clone, Copy)]
struct Phase {
    requests: usize,
    seconds: f64,
    bytes: u64,
    p50_us: u64,
    p99_us: u64,
}

impl Phase {
    fn per_s(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "seconds": self.seconds,
            "per_s": self.per_s(),
            "bytes_per_response": self.bytes / self.requests.max(1) as u64,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
        })
    }
}

/// Runs `gridward bench api`.
pub async fn run(args: ApiArgs) -> Result<()> {
    if [
        args.readings,
        args.meters,
        args.limit,
        args.requests,
        args.connections,
        args.rounds,
        args.logins,
    ]
    .contains(&0)
    {
        bail!(
            "--readings, --meters, --limit, --requests, --connections, --rounds and --logins must be at least 1"
        );
    }
    eprintln!(
        "gridward bench api: {} readings of {} meters, pages of {}, {} requests × {} rounds over {} keep-alive connections, {} logins; {} cores, load average {}",
        args.readings,
        args.meters,
        args.limit,
        args.requests,
        args.rounds,
        args.connections,
        args.logins,
        cores(),
        loadavg()
    );
    let work = Work::new(args.dir.as_deref())?;
    let now = OffsetDateTime::now_utc();
    let pki_dir = work.path.join("pki-api");
    prepare_pki(&pki_dir, now)?;
    eprintln!("1. PKI in {}", pki_dir.display());

    let db = work.path.join("api.db");
    let _ = std::fs::remove_file(db.with_extension("key"));
    let store = Arc::new(fresh(&db, |p| {
        SqliteStore::open(p, gridward_store::KeySource::file(p.with_extension("key")))
    })?);
    let meters = (1..=args.meters)
        .map(|i| MeterId::new(&format!("a{i:06}")))
        .collect::<Result<Vec<_>, _>>()?;
    let fill_started = Instant::now();
    fill(&store, &meters, args.readings, now)?;
    eprintln!(
        "2. {} readings committed in {:.1} s",
        args.readings,
        fill_started.elapsed().as_secs_f64()
    );

    let audit = Arc::new(fresh(&work.path.join("audit.db"), AuditLog::open)?);
    let dyn_store: Arc<dyn Store> = store.clone();
    let owasp = BenchApi::start(
        &work.path.join("users-owasp.db"),
        Argon2Params::OWASP,
        &dyn_store,
        &audit,
        &pki_dir,
        &meters[0],
        now,
    )
    .await?;
    let cheap = BenchApi::start(
        &work.path.join("users-insecure.db"),
        Argon2Params::insecure_test_params(),
        &dyn_store,
        &audit,
        &pki_dir,
        &meters[0],
        now,
    )
    .await?;
    eprintln!(
        "3. APIs on {} (OWASP Argon2id) and {} (insecure Argon2id, the login baseline)",
        owasp.base, cheap.base
    );

    let client = client(&pki_dir)?;
    let token = owasp.operator_token(&client).await?;

    // Requests/s: healthz and readings alternately on the same pool of connections.
    let health_paths = vec!["/healthz".to_owned()];
    let readings_paths: Vec<String> = meters
        .iter()
        .map(|m| format!("/api/v1/meters/{m}/readings?limit={}", args.limit))
        .collect();
    let warm = (args.connections * 10).min(args.requests);
    drive(
        &client,
        &owasp.base,
        &health_paths,
        None,
        warm,
        args.connections,
    )
    .await?;
    drive(
        &client,
        &owasp.base,
        &readings_paths,
        Some(&token),
        warm,
        args.connections,
    )
    .await?;
    let mut health = Vec::new();
    let mut readings = Vec::new();
    for round in 1..=args.rounds {
        let h = drive(
            &client,
            &owasp.base,
            &health_paths,
            None,
            args.requests,
            args.connections,
        )
        .await?;
        let r = drive(
            &client,
            &owasp.base,
            &readings_paths,
            Some(&token),
            args.requests,
            args.connections,
        )
        .await?;
        eprintln!(
            "4. round {round}/{}: healthz {:.0}/s, readings {:.0}/s",
            args.rounds,
            h.per_s(),
            r.per_s()
        );
        health.push(h);
        readings.push(r);
    }
    let health = median(health);
    let readings = median(readings);

    // Login cost: the same login against both APIs, then Argon2id verification alone.
    let login_owasp = time_logins(&client, &owasp.base, args.logins).await?;
    let login_cheap = time_logins(&client, &cheap.base, args.logins).await?;
    let verify_owasp = time_verify(Argon2Params::OWASP, args.logins)?;
    let verify_cheap = time_verify(Argon2Params::insecure_test_params(), args.logins)?;
    eprintln!(
        "5. {} logins and verifications with each parameter set",
        args.logins
    );
    owasp.api.shutdown().await;
    cheap.api.shutdown().await;

    let ratio = readings.per_s() / health.per_s().max(1e-9);
    let login_ratio = login_owasp / login_cheap.max(1e-9);
    let verify_ratio = verify_owasp / verify_cheap.max(1e-9);
    let verify_share = verify_owasp / login_owasp.max(1e-9);
    let o = Argon2Params::OWASP;
    let c = Argon2Params::insecure_test_params();
    println!();
    println!(
        "gridward bench api (HTTP/1.1 keep-alive over TLS, {} connections; client and server share {} cores)",
        args.connections,
        cores()
    );
    println!(
        "  GET /healthz                     {:>8.0} requests/s   p50 {:.2} ms  p99 {:.2} ms   baseline: no credential, no store",
        health.per_s(),
        ms(health.p50_us),
        ms(health.p99_us)
    );
    println!(
        "  GET readings?limit={:<5}         {:>8.0} requests/s   p50 {:.2} ms  p99 {:.2} ms   {} bytes a page, {} readings in the store",
        args.limit,
        readings.per_s(),
        ms(readings.p50_us),
        ms(readings.p99_us),
        readings.bytes / readings.requests.max(1) as u64,
        args.readings
    );
    println!(
        "  readings / healthz               {ratio:>8.3}   (an authenticated page from the store costs {:.1}× a health check)",
        1.0 / ratio.max(1e-9)
    );
    println!(
        "  POST /api/v1/session, Argon2id m={} KiB t={} p={} (production)   {login_owasp:>7.2} ms",
        o.m_kib(),
        o.t(),
        o.p()
    );
    println!(
        "  POST /api/v1/session, Argon2id m={} KiB t={} p={} (INSECURE baseline)  {login_cheap:>7.2} ms",
        c.m_kib(),
        c.t(),
        c.p()
    );
    println!("  login production / baseline      {login_ratio:>8.1}");
    println!(
        "  Argon2id verify alone: production {verify_owasp:.2} ms, baseline {verify_cheap:.3} ms: ratio {verify_ratio:.0}; {:.0} % of a production login",
        verify_share * 100.0
    );
    write_json(
        args.json.as_deref(),
        &json!({
            "readings_in_store": args.readings,
            "meters": args.meters,
            "limit": args.limit,
            "connections": args.connections,
            "rounds": args.rounds,
            "cores": cores(),
            "healthz": health.json(),
            "readings": readings.json(),
            "readings_over_healthz": ratio,
            "login_ms": {
                "owasp": login_owasp,
                "insecure_baseline": login_cheap,
                "owasp_over_baseline": login_ratio,
            },
            "argon2id_verify_ms": {
                "owasp": verify_owasp,
                "insecure_baseline": verify_cheap,
                "owasp_over_baseline": verify_ratio,
                "share_of_owasp_login": verify_share,
            },
            "argon2id_owasp": { "m_kib": o.m_kib(), "t": o.t(), "p": o.p() },
        }),
    )?;
    Ok(())
}

/// A running API with its users: an operator (with TOTP) and a consumer (password only).
struct BenchApi {
    api: RunningApi,
    base: String,
    operator_totp: String,
}

impl BenchApi {
    async fn start(
        users_db: &Path,
        params: Argon2Params,
        store: &Arc<dyn Store>,
        audit: &Arc<AuditLog>,
        pki_dir: &Path,
        consumer_meter: &MeterId,
        now: OffsetDateTime,
    ) -> Result<Self> {
        // No login rate limit: the bench logs in from one address many times.
        let limit = RateLimit {
            burst: 1_000_000,
            per_minute: 1_000_000,
            max_sources: 16,
        };
        let access = Arc::new(fresh(users_db, |p| {
            Access::open_with_rate_limit(p, params, limit)
        })?);
        let mut operator_totp = None;
        for (name, role, meters) in [
            ("otto", Role::Operator, vec![]),
            ("carol", Role::Consumer, vec![consumer_meter.clone()]),
        ] {
            let enrolment = access.add_user(
                NewUser {
                    username: name.to_owned(),
                    role,
                    meters,
                    password: Secret::new(PASSWORD),
                },
                now,
            )?;
            if role == Role::Operator {
                operator_totp = enrolment.map(|e| e.secret_base32);
            }
        }
        let operator_totp = operator_totp.context("the operator got no TOTP enrolment")?;
        let material = Pki::open(pki_dir, None)?.tls_material(LeafKind::Server, SERVER)?;
        let ctx = ApiContext::new(
            Arc::clone(store),
            access,
            Arc::clone(audit),
            Arc::new(OffsetDateTime::now_utc),
        );
        let api = gridward_api::start(
            ApiConfig::new(([127, 0, 0, 1], 0).into(), material),
            Arc::new(ctx),
        )
        .await?;
        let base = format!("https://{}", api.local_addr());
        Ok(Self {
            api,
            base,
            operator_totp,
        })
    }

    /// Logs the operator in (password and TOTP) and returns the session token.
    async fn operator_token(&self, client: &HttpsClient) -> Result<String> {
        let body = json!({
            "username": "otto",
            "password": PASSWORD,
            "totp": totp_now(&self.operator_totp)?,
        })
        .to_string();
        let (status, text) = post_session(client, &self.base, body).await?;
        if status != 201 {
            bail!("operator login answered {status}: {text}");
        }
        let v: Value = serde_json::from_str(&text)?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in the login answer")
    }
}

/// Opens `path` afresh with `open` (removing what an earlier run left there).
fn fresh<T, E>(path: &Path, open: impl FnOnce(&Path) -> Result<T, E>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    open(path).with_context(|| format!("opening {}", path.display()))
}

fn prepare_pki(dir: &Path, now: OffsetDateTime) -> Result<()> {
    let pki = if dir.join("inventory.json").exists() {
        Pki::open(dir, None)?
    } else {
        Pki::init(dir, &InitOptions::new("gridward-bench", now))?
    };
    if !dir.join("servers").join(SERVER).join("key.pem").exists() {
        pki.issue_server(
            SERVER,
            &["127.0.0.1".to_owned()],
            &IssueOptions::new("gridward-bench"),
            now,
        )?;
    }
    Ok(())
}

/// Commits `n` readings, round the meters, 15 minutes apart, the newest now.
fn fill(store: &SqliteStore, meters: &[MeterId], n: usize, now: OffsetDateTime) -> Result<()> {
    let per_meter = n.div_ceil(meters.len());
    let mut batch = Vec::with_capacity(1000);
    for i in 0..n {
        let meter = &meters[i % meters.len()];
        let counter = (i / meters.len()) as u64 + 1;
        let back = i64::try_from(per_meter).unwrap_or(i64::MAX) - counter as i64;
        let taken_at = now - time::Duration::minutes(15 * back);
        batch.push(Accepted {
            meter_id: meter.clone(),
            counter,
            taken_at,
            received_at: taken_at + time::Duration::seconds(1),
            body: AcceptedBody::Reading {
                energy_kwh: counter as f64 * 0.25,
            },
            envelope: format!("bench {meter} {counter}").into_bytes(),
            content_type: Format::Json,
            source: None,
        });
        if batch.len() == 1000 {
            store.commit(&batch)?;
            batch.clear();
        }
    }
    store.commit(&batch)?;
    Ok(())
}

/// A client that trusts the bench PKI; HTTP/1.1, keep-alive (the pool keeps connections).
fn client(pki_dir: &Path) -> Result<HttpsClient> {
    crate::demo_api::api_client(pki_dir, SERVER)
}

/// Sends `requests` GETs of `paths` (in turn) with `connections` in flight; every answer must
/// be a 200.
async fn drive(
    client: &HttpsClient,
    base: &str,
    paths: &[String],
    token: Option<&str>,
    requests: usize,
    connections: usize,
) -> Result<Phase> {
    let next = Arc::new(AtomicUsize::new(0));
    let uris: Arc<Vec<http::Uri>> = Arc::new(
        paths
            .iter()
            .map(|p| format!("{base}{p}").parse())
            .collect::<Result<_, _>>()?,
    );
    let auth = token.map(|t| format!("Bearer {t}"));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (client, next, uris, auth) = (
            client.clone(),
            Arc::clone(&next),
            Arc::clone(&uris),
            auth.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let mut req = http::Request::get(uris[i % uris.len()].clone());
                if let Some(a) = &auth {
                    req = req.header(http::header::AUTHORIZATION, a.as_str());
                }
                let sent = Instant::now();
                let resp = client.request(req.body(Full::new(Bytes::new()))?).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                hist.saturating_record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(0));
                if status != http::StatusCode::OK {
                    bail!(
                        "{} answered {status}: {}",
                        uris[i % uris.len()],
                        String::from_utf8_lossy(&body)
                    );
                }
                bytes += body.len() as u64;
            }
            anyhow::Ok((hist, bytes))
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut bytes = 0u64;
    for task in tasks {
        let (h, b) = task.await??;
        hist.add(&h)?;
        bytes += b;
    }
    Ok(Phase {
        requests,
        seconds: started.elapsed().as_secs_f64(),
        bytes,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
    })
}

/// The round with the median rate.
fn median(mut phases: Vec<Phase>) -> Phase {
    phases.sort_by(|a, b| a.per_s().total_cmp(&b.per_s()));
    phases[phases.len() / 2]
}

/// Mean milliseconds of one consumer login (after one untimed login), one at a time.
async fn time_logins(client: &HttpsClient, base: &str, n: usize) -> Result<f64> {
    let body = json!({ "username": "carol", "password": PASSWORD }).to_string();
    let mut total = Duration::ZERO;
    for i in 0..=n {
        let started = Instant::now();
        let (status, text) = post_session(client, base, body.clone()).await?;
        if i > 0 {
            total += started.elapsed();
        }
        if status != 201 {
            bail!("login answered {status}: {text}");
        }
    }
    Ok(total.as_secs_f64() * 1000.0 / n as f64)
}

/// Mean milliseconds of one Argon2id verification under `params`, single thread.
fn time_verify(params: Argon2Params, n: usize) -> Result<f64> {
    let phc = password::hash_password(&params, PASSWORD, &mut rand::rngs::OsRng)?;
    let started = Instant::now();
    for _ in 0..n {
        if !password::verify_password(&phc, PASSWORD)? {
            bail!("the password did not verify");
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0 / n as f64)
}

async fn post_session(client: &HttpsClient, base: &str, body: String) -> Result<(u16, String)> {
    let req = http::Request::post(format!("{base}/api/v1/session"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("the API did not answer a login in 30 s")??;
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}
