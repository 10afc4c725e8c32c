//! The forwarder against a real HTTPS server with mutual TLS on 127.0.0.1, whose answers each
//! test scripts (2xx, 5xx, 429, 4xx, down): order, retries, dead letters, outages. The server
//! checks every request's RFC 9421 signature and Content-Digest with `gridward_core::httpsig`.
//! (The reference receiver, `gridward sink`, is tested end to end in the `gridward` crate.)

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_core::httpsig::{self, HttpVerifyingKey, Request, VerifyPolicy};
use gridward_hes::forward::{
    ForwardContext, Forwarders, HttpVersion, TargetSettings, TargetSnapshot, TargetTls,
};
use gridward_hes::metrics::Metrics;
use gridward_hes::pipeline::system_clock;
use gridward_hes::writer::{Writer, WriterConfig, WriterThreads};
use gridward_pki::tls::TlsOptions;
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki};
use gridward_store::{
    Accepted, AcceptedBody, OutboxStats, SecurityEventQuery, SqliteStore, Store, TargetId,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// What the test server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    meter: String,
    counter: u64,
    nonce: String,
    http2: bool,
    status: u16,
}

type Script = dyn Fn(&str, u64, usize) -> u16 + Send + Sync;

/// The downstream service of these tests.
struct Downstream {
    seen: Mutex<Vec<Seen>>,
    /// (meter, counter, attempt number for that reading) → status to answer.
    script: Mutex<Box<Script>>,
    keys: HashMap<String, HttpVerifyingKey>,
    bad_requests: Mutex<Vec<String>>,
}

impl Downstream {
    fn attempts(&self, meter: &str, counter: u64) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.meter == meter && s.counter == counter)
            .count()
    }

    /// Counters of `meter` answered 2xx, in the order they arrived.
    fn delivered(&self, meter: &str) -> Vec<u64> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.meter == meter && (200..300).contains(&s.status))
            .map(|s| s.counter)
            .collect()
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    ds: Arc<Downstream>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let http2 = req.version() == hyper::Version::HTTP_2;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let target_uri = format!("https://{authority}{}", req.uri().path());
    let method = req.method().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let request = Request {
        method: &method,
        target_uri: &target_uri,
        headers: &pairs,
    };
    let answer = |status: u16, text: &str| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(text.to_owned())));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        Ok(r)
    };
    let verified = match httpsig::verify_request(
        &request,
        &ds.keys,
        &VerifyPolicy::default(),
        OffsetDateTime::now_utc(),
    ) {
        Ok(v) => v,
        Err(e) => {
            ds.bad_requests
                .lock()
                .unwrap()
                .push(format!("signature: {e}"));
            return answer(401, e.code());
        }
    };
    let digest = request
        .field_value("content-digest")
        .ok()
        .flatten()
        .unwrap_or_default();
    if let Err(e) = httpsig::verify_content_digest(&digest, &body) {
        ds.bad_requests.lock().unwrap().push(format!("digest: {e}"));
        return answer(400, e.code());
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let meter = v["MeterID"].as_str().unwrap().to_owned();
    let counter = v["Counter"].as_u64().unwrap();
    assert_eq!(v["ReadingID"], format!("{meter}-{counter}"));
    let attempt = ds.attempts(&meter, counter);
    let status = (ds.script.lock().unwrap())(&meter, counter, attempt);
    ds.seen.lock().unwrap().push(Seen {
        meter,
        counter,
        nonce: verified.nonce.unwrap_or_default(),
        http2,
        status,
    });
    answer(
        status,
        if status >= 400 {
            "scripted refusal"
        } else {
            "ok"
        },
    )
}

/// A running downstream server; `stop` closes the listener and every connection.
struct Server {
    addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Server {
    async fn start(addr: SocketAddr, pki_dir: &Path, ds: Arc<Downstream>) -> Self {
        let material = Pki::open(pki_dir, None)
            .unwrap()
            .tls_material(LeafKind::Server, "sink")
            .unwrap();
        let tls = gridward_pki::tls::server_config_with(
            &material,
            &TlsOptions::new().with_alpn(["h2", "http/1.1"]),
        )
        .unwrap();
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let acceptor = acceptor.clone();
                let ds = Arc::clone(&ds);
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| handle(req, Arc::clone(&ds)));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, tasks }
    }

    async fn stop(mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.tasks.shutdown().await;
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    pki_dir: PathBuf,
    store: Arc<SqliteStore>,
    target: TargetId,
    notify: Arc<Notify>,
    writer: Option<(Writer, WriterThreads)>,
    ds: Arc<Downstream>,
}

fn fixture(script: Box<Script>) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let now = OffsetDateTime::now_utc();
    let pki = Pki::init(&pki_dir, &InitOptions::new("test", now)).unwrap();
    let opts = IssueOptions::new("test");
    pki.issue_server("sink", &["127.0.0.1".to_owned()], &opts, now)
        .unwrap();
    pki.issue_client("hes", &opts, now).unwrap();
    let cert = std::fs::read_to_string(pki_dir.join("clients/hes/cert.pem")).unwrap();
    let keys = HashMap::from([(
        "hes".to_owned(),
        HttpVerifyingKey::from_pem(&cert, "hes").unwrap(),
    )]);
    let store = Arc::new(
        SqliteStore::open(
            &tmp.path().join("gridward.db"),
            gridward_store::KeySource::file(tmp.path().join("gridward.db").with_extension("key")),
        )
        .unwrap(),
    );
    let target = store.register_outbox_target("billing").unwrap();
    let dyn_store: Arc<dyn Store> = store.clone();
    let writer = Writer::start(
        dyn_store,
        WriterConfig::default(),
        Arc::new(Metrics::new()),
        Box::new(|_: &[(MeterId, u64)]| {}),
        vec![target],
    )
    .unwrap();
    Fixture {
        _tmp: tmp,
        pki_dir,
        store,
        target,
        notify: Arc::new(Notify::new()),
        writer: Some(writer),
        ds: Arc::new(Downstream {
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(script),
            keys,
            bad_requests: Mutex::new(Vec::new()),
        }),
    }
}

fn reading(meter: &str, counter: u64) -> Accepted {
    let at = OffsetDateTime::now_utc();
    Accepted {
        meter_id: MeterId::new(meter).unwrap(),
        counter,
        taken_at: at,
        received_at: at,
        body: AcceptedBody::Reading {
            energy_kwh: counter as f64 * 0.25,
        },
        envelope: format!("envelope {meter} {counter}").into_bytes(),
        content_type: Format::Xml,
        source: None,
    }
}

impl Fixture {
    fn settings(&self, addr: SocketAddr, http: HttpVersion) -> TargetSettings {
        let mut t = TargetSettings::new(
            "billing",
            format!("https://127.0.0.1:{}/readings", addr.port()),
            TargetTls::Pki {
                dir: self.pki_dir.clone(),
                client: "hes".into(),
            },
        );
        t.http = http;
        t.concurrency = 8;
        t.batch_size = 64;
        t.retry_initial = Duration::from_millis(20);
        t.retry_max = Duration::from_millis(200);
        t.request_timeout = Duration::from_secs(5);
        t
    }

    fn forwarders(&self, settings: TargetSettings) -> Forwarders {
        let (writer, _) = self.writer.as_ref().unwrap();
        Forwarders::start(
            ForwardContext {
                store: self.store.clone(),
                writer: writer.clone(),
                clock: system_clock(),
            },
            vec![(
                self.target,
                settings.load().unwrap(),
                Arc::clone(&self.notify),
            )],
        )
    }

    /// Commits `per_meter` readings for each of `meters`, interleaved, in batches.
    fn commit(&self, meters: &[&str], counters: std::ops::RangeInclusive<u64>) {
        let batch: Vec<Accepted> = counters
            .flat_map(|c| meters.iter().map(move |m| reading(m, c)))
            .collect();
        for chunk in batch.chunks(50) {
            self.store
                .commit_with_outbox(chunk, &[self.target])
                .unwrap();
        }
        self.notify.notify_one();
    }

    fn stats(&self) -> OutboxStats {
        self.store.outbox_stats().unwrap().remove(0)
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&OutboxStats) -> bool) {
        for _ in 0..300 {
            if done(&self.stats()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: not reached; outbox {:?}", self.stats());
    }

    fn security_reasons(&self) -> Vec<(String, String)> {
        self.store
            .security_events(&SecurityEventQuery::default())
            .unwrap()
            .into_iter()
            .map(|e| (e.event.reason, e.event.detail))
            .collect()
    }

    async fn finish(mut self, forwarders: Forwarders) -> Vec<TargetSnapshot> {
        let snapshot = forwarders.snapshot();
        forwarders.shutdown().await;
        let (writer, threads) = self.writer.take().unwrap();
        drop(writer);
        tokio::task::spawn_blocking(move || threads.join())
            .await
            .unwrap();
        assert!(
            self.ds.bad_requests.lock().unwrap().is_empty(),
            "requests that failed verification: {:?}",
            self.ds.bad_requests.lock().unwrap()
        );
        snapshot
    }
}

const METERS: [&str; 12] = [
    "m01", "m02", "m03", "m04", "m05", "m06", "m07", "m08", "m09", "m10", "m11", "m12",
];

async fn delivers_everything_in_per_meter_order(http: HttpVersion) {
    let fx = fixture(Box::new(|_, _, _| 201));
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        &fx.pki_dir,
        Arc::clone(&fx.ds),
    )
    .await;
    let fw = fx.forwarders(fx.settings(server.addr, http));
    fx.commit(&METERS, 1..=10);
    fx.wait_until("all delivered", |s| s.delivered == 120).await;
    // More readings later wake the idle forwarder.
    fx.commit(&METERS, 11..=15);
    fx.wait_until("all delivered", |s| s.delivered == 180).await;
    for m in METERS {
        assert_eq!(fx.ds.delivered(m), (1..=15).collect::<Vec<_>>(), "{m}");
    }
    let seen = fx.ds.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 180, "each reading sent exactly once");
    assert!(
        seen.iter().all(|s| s.http2 == (http != HttpVersion::Http1)),
        "{http:?}"
    );
    let s = fx.stats();
    assert_eq!((s.pending, s.dead, s.oldest_pending), (0, 0, None));
    server.stop().await;
    let snap = fx.finish(fw).await;
    assert_eq!(snap[0].delivered, 180);
    assert_eq!(snap[0].failed_attempts, 0);
    assert!(snap[0].lag_p99 >= snap[0].lag_p50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_in_per_meter_order_over_http2() {
    delivers_everything_in_per_meter_order(HttpVersion::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_in_per_meter_order_over_http1() {
    delivers_everything_in_per_meter_order(HttpVersion::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_fresh_signatures_and_order_holds() {
    // m03's third reading fails twice (503, then 429), m05's first times out once (408).
    let fx = fixture(Box::new(|meter, counter, attempt| {
        match (meter, counter, attempt) {
            ("m03", 3, 0) => 503,
            ("m03", 3, 1) => 429,
            ("m05", 1, 0) => 408,
            _ => 200,
        }
    }));
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        &fx.pki_dir,
        Arc::clone(&fx.ds),
    )
    .await;
    let fw = fx.forwarders(fx.settings(server.addr, HttpVersion::Auto));
    fx.commit(&METERS[..6], 1..=8);
    fx.wait_until("all delivered", |s| s.delivered == 48).await;
    for m in &METERS[..6] {
        assert_eq!(fx.ds.delivered(m), (1..=8).collect::<Vec<_>>(), "{m}");
    }
    assert_eq!(fx.ds.attempts("m03", 3), 3);
    assert_eq!(fx.ds.attempts("m05", 1), 2);
    assert_eq!(
        fx.ds.attempts("m03", 4),
        1,
        "nothing after a failure is sent early"
    );
    let seen = fx.ds.seen.lock().unwrap().clone();
    let nonces: std::collections::HashSet<&str> = seen.iter().map(|s| s.nonce.as_str()).collect();
    assert_eq!(
        nonces.len(),
        seen.len(),
        "every attempt carries a new nonce"
    );
    server.stop().await;
    let snap = fx.finish(fw).await;
    assert_eq!(snap[0].delivered, 48);
    assert_eq!(snap[0].failed_attempts, 3);
    assert_eq!(snap[0].dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reading_becomes_a_dead_letter_with_an_event_and_can_be_retried() {
    let fx = fixture(Box::new(|meter, counter, attempt| {
        match (meter, counter, attempt) {
            ("m02", 2, 0) => 422,
            _ => 200,
        }
    }));
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        &fx.pki_dir,
        Arc::clone(&fx.ds),
    )
    .await;
    let fw = fx.forwarders(fx.settings(server.addr, HttpVersion::Auto));
    fx.commit(&METERS[..3], 1..=4);
    fx.wait_until("settled", |s| s.delivered == 11 && s.dead == 1)
        .await;
    // The dead letter does not hold back the meter's later readings.
    assert_eq!(fx.ds.delivered("m02"), vec![1, 3, 4]);
    let dead = fx.store.outbox_dead(Some("billing"), 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].meter_id.as_str(), dead[0].counter), ("m02", 2));
    assert!(dead[0].reason.contains("HTTP 422"), "{}", dead[0].reason);
    tokio::time::sleep(Duration::from_millis(300)).await; // the event thread
    let events = fx.security_reasons();
    assert!(
        events.iter().any(|(r, d)| r == "downstream_rejected"
            && d.contains("m02-2")
            && d.contains("billing")),
        "{events:?}"
    );

    // An operator puts it back; the target now takes it.
    assert_eq!(fx.store.outbox_retry(Some("billing"), &[]).unwrap(), 1);
    fx.wait_until("retried", |s| s.delivered == 12 && s.dead == 0)
        .await;
    assert_eq!(fx.ds.delivered("m02"), vec![1, 3, 4, 2]);
    server.stop().await;
    let snap = fx.finish(fw).await;
    assert_eq!(snap[0].dead, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_sends_nothing_twice() {
    let fx = fixture(Box::new(|_, _, _| 200));
    // Take a free port, then keep the target down.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let fw = fx.forwarders(fx.settings(addr, HttpVersion::Auto));
    fx.commit(&METERS[..4], 1..=5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = fx.stats();
    assert_eq!((s.pending, s.delivered), (20, 0));
    assert!(s.oldest_pending.is_some());

    let server = Server::start(addr, &fx.pki_dir, Arc::clone(&fx.ds)).await;
    fx.wait_until("delivered after the outage", |s| s.delivered == 20)
        .await;
    fx.commit(&METERS[..4], 6..=7);
    fx.wait_until("and later ones", |s| s.delivered == 28).await;
    // Down again in the middle of the stream, then up.
    server.stop().await;
    fx.commit(&METERS[..4], 8..=10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = Server::start(addr, &fx.pki_dir, Arc::clone(&fx.ds)).await;
    fx.wait_until("delivered after the second outage", |s| s.delivered == 40)
        .await;
    for m in &METERS[..4] {
        assert_eq!(fx.ds.delivered(m), (1..=10).collect::<Vec<_>>(), "{m}");
    }
    server.stop().await;
    let snap = fx.finish(fw).await;
    assert_eq!(snap[0].delivered, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_another_ca_is_never_sent_a_reading() {
    // The target presents a certificate from a CA the forwarder does not trust.
    let fx = fixture(Box::new(|_, _, _| 200));
    let rogue_dir = fx._tmp.path().join("rogue");
    let now = OffsetDateTime::now_utc();
    let rogue = Pki::init(&rogue_dir, &InitOptions::new("rogue", now)).unwrap();
    let opts = IssueOptions::new("rogue");
    rogue
        .issue_server("sink", &["127.0.0.1".to_owned()], &opts, now)
        .unwrap();
    rogue.issue_client("hes", &opts, now).unwrap();
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        &rogue_dir,
        Arc::clone(&fx.ds),
    )
    .await;
    let fw = fx.forwarders(fx.settings(server.addr, HttpVersion::Auto));
    fx.commit(&["m01"], 1..=3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(fx.ds.seen.lock().unwrap().is_empty());
    let s = fx.stats();
    assert_eq!((s.pending, s.delivered), (3, 0));
    server.stop().await;
    let snap = fx.finish(fw).await;
    assert!(snap[0].failed_attempts > 0);
}
