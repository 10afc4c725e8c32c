//! The sink end to end over real sockets: a PKI on disk, the sink on 127.0.0.1:0, and an HTTPS
//! client (hyper over rustls with the Gridward TLS profile, HTTP/1.1 and HTTP/2) that signs
//! requests the way the head-end's forwarder does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gridward_core::httpsig::{self, HttpSigningKey, Request, SignParams};
use gridward_pki::tls::TlsMaterial;
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki};
use gridward_sink::{Keys, RunningSink, SinkConfig, SinkStore, tls_from_pki};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// Deadline of every request in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

/// A PKI with the sink's server certificate (`sink`, SAN 127.0.0.1) and the forwarder's client
/// certificate (`hes`, whose key signs the requests).
fn make_pki(dir: &Path, org: &str) -> Pki {
    let now = OffsetDateTime::now_utc();
    let mut init = InitOptions::new("test", now);
    init.org = org.to_owned();
    let pki = Pki::init(dir, &init).expect("init");
    let opts = IssueOptions::new("test");
    pki.issue_server(
        "sink",
        &["127.0.0.1".to_owned(), "localhost".to_owned()],
        &opts,
        now,
    )
    .expect("server");
    pki.issue_client("hes", &opts, now).expect("client");
    pki
}

fn signing_key(pki: &Path, client: &str, key_id: &str) -> HttpSigningKey {
    let pem = std::fs::read_to_string(pki.join(format!("clients/{client}/key.pem"))).expect("key");
    HttpSigningKey::from_pkcs8_pem(&pem, key_id).expect("signing key")
}

fn keys(pki: &Path) -> Keys {
    let mut keys = Keys::new();
    let path = pki.join("clients/hes/cert.pem");
    assert!(keys.insert(Keys::load("hes", &path).expect("load key")));
    keys
}

async fn start_sink(pki: &Path, store: &Path, listen: &str) -> RunningSink {
    start_sink_with(pki, store, listen, (&[], &[]), keys(pki)).await
}

/// A sink whose clients may also come from the CAs in `extra` (CA files, CRL files).
async fn start_sink_with(
    pki: &Path,
    store: &Path,
    listen: &str,
    extra: (&[PathBuf], &[PathBuf]),
    keys: Keys,
) -> RunningSink {
    let tls = tls_from_pki(pki, "sink", extra.0, extra.1).expect("tls");
    let config = SinkConfig::new(listen.parse().expect("addr"), tls, keys, store.to_owned());
    gridward_sink::start(config).await.expect("start")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS client like the forwarder's: our TLS profile, a client certificate (unless
/// `config` is given), HTTP/1.1 or HTTP/2 by ALPN.
fn client_with(config: rustls::ClientConfig, version: Version) -> HttpsClient {
    let mut config = config;
    // The connector sets ALPN from the enabled versions.
    config.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = match version {
        Version::Http1 => builder.enable_http1().wrap_connector(http),
        Version::Http2 => builder.enable_http2().wrap_connector(http),
    };
    let mut client = Client::builder(TokioExecutor::new());
    if version == Version::Http2 {
        client.http2_only(true);
    }
    client.build(connector)
}

fn client_config(pki: &Path, client: &str) -> rustls::ClientConfig {
    let material = Pki::open(pki, None)
        .expect("open")
        .tls_material(LeafKind::Client, client)
        .expect("material");
    (*gridward_pki::tls::client_config(&material).expect("client config")).clone()
}

fn client(pki: &Path, version: Version) -> HttpsClient {
    client_with(client_config(pki, "hes"), version)
}

/// The same TLS profile and trust, but no client certificate.
fn anonymous_config(pki: &Path) -> rustls::ClientConfig {
    let material: TlsMaterial = Pki::open(pki, None)
        .expect("open")
        .tls_material(LeafKind::Client, "hes")
        .expect("material");
    let mut roots = rustls::RootCertStore::empty();
    for root in material.roots {
        roots.add(root).expect("root");
    }
    rustls::ClientConfig::builder_with_provider(gridward_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn reading(meter: &str, counter: u64, kwh: f64) -> Vec<u8> {
    format!(
        r#"{{"ReadingID":"{meter}-{counter}","MeterID":"{meter}","Counter":{counter},"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":{kwh}}}"#
    )
    .into_bytes()
}

/// A request signed the way the forwarder signs (gridward-hes/src/forward/body.rs).
#[derive(Debug, Clone)]
struct Signed {
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn sign_at(
    key: &HttpSigningKey,
    url: &str,
    body: Vec<u8>,
    created: OffsetDateTime,
    validity: time::Duration,
    nonce: &str,
) -> Signed {
    let digest = httpsig::content_digest(&body);
    let fields = [
        ("content-type", "application/json"),
        ("content-digest", digest.as_str()),
    ];
    let sig = httpsig::sign_request(
        &Request {
            method: "POST",
            target_uri: url,
            headers: &fields,
        },
        key,
        &SignParams {
            label: "gridward".into(),
            components: ["@method", "@target-uri", "content-digest", "content-type"]
                .map(String::from)
                .to_vec(),
            created,
            expires: created + validity,
            nonce: nonce.into(),
        },
    )
    .expect("sign");
    Signed {
        url: url.to_owned(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-digest".into(), digest),
            ("signature-input".into(), sig.signature_input),
            ("signature".into(), sig.signature),
        ],
        body,
    }
}

fn sign(key: &HttpSigningKey, url: &str, body: Vec<u8>) -> Signed {
    let nonce = format!("{:032x}", rand::random::<u128>());
    sign_at(
        key,
        url,
        body,
        OffsetDateTime::now_utc(),
        time::Duration::MINUTE,
        &nonce,
    )
}

impl Signed {
    fn set(mut self, name: &str, value: &str) -> Self {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.into(), value.into()));
        self
    }

    fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(n, _)| n != name);
        self
    }
}

/// An answer: status and JSON body.
#[derive(Debug, PartialEq)]
struct Answer(u16, serde_json::Value);

async fn try_post(
    client: &HttpsClient,
    method: &str,
    url: &str,
    req: &Signed,
) -> Result<Answer, String> {
    let mut builder = hyper::Request::builder().method(method).uri(url);
    for (name, value) in &req.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body.clone())))
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, client.request(request))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Ok(Answer(status, json))
}

async fn post(client: &HttpsClient, req: &Signed) -> Answer {
    try_post(client, "POST", &req.url, req)
        .await
        .expect("answer")
}

fn stored(status: u16, reading_id: &str) -> Answer {
    let word = if status == 201 { "stored" } else { "duplicate" };
    Answer(
        status,
        serde_json::json!({"status": word, "reading_id": reading_id}),
    )
}

fn refused(status: u16, code: &str) -> Answer {
    Answer(status, serde_json::json!({"error": code}))
}

fn stored_ids(store: &Path) -> Vec<String> {
    SinkStore::open_existing(store)
        .expect("open store")
        .readings(None)
        .expect("readings")
        .into_iter()
        .map(|r| r.reading.reading_id)
        .collect()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    pki: PathBuf,
    store: PathBuf,
    key: HttpSigningKey,
    sink: RunningSink,
    url: String,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    make_pki(&pki, "Gridward");
    let store = tmp.path().join("sink.db");
    let sink = start_sink(&pki, &store, "127.0.0.1:0").await;
    let url = format!("https://{}/readings", sink.local_addr());
    Fixture {
        key: signing_key(&pki, "hes", "hes"),
        _tmp: tmp,
        pki,
        store,
        sink,
        url,
    }
}

#[tokio::test]
async fn genuine_readings_are_stored_once_over_http1_and_http2() {
    let f = fixture().await;
    for (version, meter) in [(Version::Http1, "m000001"), (Version::Http2, "m000002")] {
        let client = client(&f.pki, version);
        let first = sign(&f.key, &f.url, reading(meter, 42, 350.5));
        let id = format!("{meter}-42");
        assert_eq!(post(&client, &first).await, stored(201, &id), "{version:?}");
        // The same request again (same nonce): a replay.
        assert_eq!(
            post(&client, &first).await,
            refused(401, "nonce_replayed"),
            "{version:?}"
        );
        // The same reading signed anew (a retry of the forwarder): a duplicate.
        let retry = sign(&f.key, &f.url, reading(meter, 42, 350.5));
        assert_eq!(post(&client, &retry).await, stored(200, &id), "{version:?}");
        // The same ReadingID with another value: a conflict, nothing overwritten.
        let changed = sign(&f.key, &f.url, reading(meter, 42, 1.0));
        assert_eq!(
            post(&client, &changed).await,
            refused(409, "reading_conflict"),
            "{version:?}"
        );
    }
    assert_eq!(stored_ids(&f.store), ["m000001-42", "m000002-42"]);
    let rows = SinkStore::open_existing(&f.store)
        .expect("store")
        .readings(None)
        .expect("rows");
    assert_eq!(rows[0].reading.energy_kwh, 350.5);
    assert_eq!(rows[0].key_id, "hes");
    assert_eq!(
        rows[0].body.as_bytes(),
        reading("m000001", 42, 350.5).as_slice()
    );
    let stats = f.sink.shutdown().await;
    assert_eq!(stats.received, 8);
    assert_eq!(stats.stored, 2);
    assert_eq!(stats.duplicates, 2);
    assert_eq!(stats.refused("nonce_replayed"), 2);
    assert_eq!(stats.refused("reading_conflict"), 2);
    assert_eq!(stats.tls_refused, 0);
}

#[tokio::test]
async fn forged_stale_and_malformed_requests_are_refused_and_nothing_is_stored() {
    let f = fixture().await;
    let client = client(&f.pki, Version::Http1);
    let genuine = || sign(&f.key, &f.url, reading("m000001", 1, 10.0));
    let now = OffsetDateTime::now_utc();

    // One byte of the body changed in transit.
    let mut tampered = genuine();
    tampered.body = reading("m000001", 1, 90.0);
    assert_eq!(
        post(&client, &tampered).await,
        refused(400, "content_digest_mismatch")
    );
    // ... and the digest recomputed: the signature covers the digest.
    let digest = httpsig::content_digest(&tampered.body);
    let tampered = tampered.set("content-digest", &digest);
    assert_eq!(
        post(&client, &tampered).await,
        refused(401, "bad_signature")
    );
    // No signature at all.
    let unsigned = genuine().without("signature").without("signature-input");
    assert_eq!(
        post(&client, &unsigned).await,
        refused(401, "signature_missing")
    );
    // Expired; not expired but older than the maximum age (300 s); from the future.
    let minutes = time::Duration::minutes;
    for (created, validity, code) in [
        (now - minutes(2), minutes(1), "signature_expired"),
        (now - minutes(6), minutes(60), "signature_too_old"),
        (now + minutes(2), minutes(1), "created_in_future"),
    ] {
        let stale = sign_at(
            &f.key,
            &f.url,
            reading("m000001", 1, 10.0),
            created,
            validity,
            code,
        );
        assert_eq!(post(&client, &stale).await, refused(401, code));
    }
    // A key id the sink does not know (the key itself is the genuine one).
    let stranger = signing_key(&f.pki, "hes", "stranger");
    let unknown = sign(&stranger, &f.url, reading("m000001", 1, 10.0));
    assert_eq!(post(&client, &unknown).await, refused(401, "unknown_key"));
    // Signed for another sink.
    let elsewhere = sign(
        &f.key,
        "https://billing.example/readings",
        reading("m000001", 1, 10.0),
    );
    assert_eq!(
        try_post(&client, "POST", &f.url, &elsewhere).await,
        Ok(refused(401, "bad_signature"))
    );
    // Not a reading (signed and digested correctly).
    let nonsense = sign(&f.key, &f.url, b"{\"MeterID\":\"m000001\"}".to_vec());
    assert_eq!(
        post(&client, &nonsense).await,
        refused(400, "body_malformed")
    );
    let mismatch = sign(
        &f.key,
        &f.url,
        br#"{"ReadingID":"m000009-1","MeterID":"m000001","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#.to_vec(),
    );
    assert_eq!(
        post(&client, &mismatch).await,
        refused(400, "reading_id_mismatch")
    );
    // Too large.
    let mut big = genuine();
    big.body = vec![b' '; 64 * 1024 + 1];
    assert_eq!(post(&client, &big).await, refused(413, "body_too_large"));
    // Wrong content type, method, path.
    let text = genuine().set("content-type", "text/plain");
    assert_eq!(
        post(&client, &text).await,
        refused(415, "content_type_unsupported")
    );
    assert_eq!(
        try_post(&client, "PUT", &f.url, &genuine()).await,
        Ok(refused(405, "method_not_allowed"))
    );
    let other_path = f.url.replace("/readings", "/other");
    assert_eq!(
        try_post(&client, "POST", &other_path, &genuine()).await,
        Ok(refused(404, "not_found"))
    );

    assert!(stored_ids(&f.store).is_empty());
    // The genuine request still goes through afterwards.
    assert_eq!(post(&client, &genuine()).await, stored(201, "m000001-1"));
    let stats = f.sink.shutdown().await;
    assert_eq!(stats.stored, 1);
    assert_eq!(stats.refused_total(), 14);
    assert_eq!(stats.refused("bad_signature"), 2);
}

/// Sends a chunked HTTP/1.1 request of `total` body bytes over a raw TLS stream and returns the
/// status line of the answer: the limit holds without a Content-Length.
async fn chunked_status(pki: &Path, addr: std::net::SocketAddr, total: usize) -> String {
    let mut config = client_config(pki, "hes");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let head = format!(
        "POST /readings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![b' '; 8192];
    let mut sent = 0;
    while sent < total {
        let frame = format!("{:x}\r\n", chunk.len());
        // The server may answer and close before everything is sent.
        if tls.write_all(frame.as_bytes()).await.is_err()
            || tls.write_all(&chunk).await.is_err()
            || tls.write_all(b"\r\n").await.is_err()
        {
            break;
        }
        sent += chunk.len();
    }
    let _ = tls.write_all(b"0\r\n\r\n").await;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, tls.read(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn an_oversized_chunked_body_is_cut_off_at_the_limit() {
    let f = fixture().await;
    let status = chunked_status(&f.pki, f.sink.local_addr(), 1024 * 1024).await;
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
    assert!(stored_ids(&f.store).is_empty());
    let stats = f.sink.shutdown().await;
    assert_eq!(stats.refused("body_too_large"), 1);
}

/// Waits (briefly) until the sink has counted `n` refused handshakes: the client may see the
/// TLS alert before the server has counted it.
async fn tls_refused_reaches(sink: &RunningSink, n: u64) -> u64 {
    for _ in 0..100 {
        if sink.stats().tls_refused >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.stats().tls_refused
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_are_refused_at_the_handshake() {
    let f = fixture().await;
    // A client certificate from another CA, with a signature by a key the sink knows.
    let other = f._tmp.path().join("other-pki");
    make_pki(&other, "Elsewhere");
    let forged_client = client_with(client_config(&other, "hes"), Version::Http1);
    let req = sign(&f.key, &f.url, reading("m000001", 7, 1.0));
    let r = try_post(&forged_client, "POST", &f.url, &req).await;
    assert!(
        r.is_err(),
        "another CA's client certificate was accepted: {r:?}"
    );
    assert!(tls_refused_reaches(&f.sink, 1).await >= 1);
    // No client certificate at all.
    for version in [Version::Http1, Version::Http2] {
        let anonymous = client_with(anonymous_config(&f.pki), version);
        let r = try_post(&anonymous, "POST", &f.url, &req).await;
        assert!(
            r.is_err(),
            "a client without certificate was answered: {r:?}"
        );
    }
    assert!(tls_refused_reaches(&f.sink, 3).await >= 3);
    assert!(stored_ids(&f.store).is_empty());
    // The genuine client is still served, with the same signed request.
    let genuine = client(&f.pki, Version::Http2);
    assert_eq!(post(&genuine, &req).await, stored(201, "m000001-7"));
    let stats = f.sink.shutdown().await;
    assert_eq!(stats.received, 1);
}

#[tokio::test]
async fn another_ca_is_trusted_when_configured_with_its_crls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    make_pki(&pki, "Gridward");
    let billing_pki = tmp.path().join("billing-pki");
    make_pki(&billing_pki, "Billing");
    let store = tmp.path().join("sink.db");
    let mut keys = keys(&pki);
    keys.insert(Keys::load("billing-hes", &billing_pki.join("clients/hes/cert.pem")).expect("key"));
    let sink = start_sink_with(
        &pki,
        &store,
        "127.0.0.1:0",
        (
            &[billing_pki.join("ca/root.crt.pem")],
            &[
                billing_pki.join("crl/root.crl.pem"),
                billing_pki.join("crl/issuing.crl.pem"),
            ],
        ),
        keys,
    )
    .await;
    let url = format!("https://{}/readings", sink.local_addr());
    // The client trusts the sink's CA, and presents the other CA's certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            Pki::open(&pki, None)
                .expect("open")
                .root_certificate()
                .clone(),
        )
        .expect("root");
    let material = Pki::open(&billing_pki, None)
        .expect("open")
        .tls_material(LeafKind::Client, "hes")
        .expect("material");
    let config = rustls::ClientConfig::builder_with_provider(gridward_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(material.chain, material.key)
        .expect("client auth");
    let client = client_with(config, Version::Http2);
    let key = signing_key(&billing_pki, "hes", "billing-hes");
    let req = sign(&key, &url, reading("m000003", 1, 2.5));
    assert_eq!(post(&client, &req).await, stored(201, "m000003-1"));
    let stats = sink.shutdown().await;
    assert_eq!(stats.tls_refused, 0);
}

#[tokio::test]
async fn nonces_and_readings_survive_a_restart() {
    let f = fixture().await;
    let client1 = client(&f.pki, Version::Http1);
    let first = sign(&f.key, &f.url, reading("m000001", 5, 3.0));
    assert_eq!(post(&client1, &first).await, stored(201, "m000001-5"));
    let addr = f.sink.local_addr();
    let stats = f.sink.shutdown().await;
    assert_eq!(stats.stored, 1);
    drop(client1);

    // Same address (the signed target URI names it), same store.
    let sink = start_sink(&f.pki, &f.store, &addr.to_string()).await;
    let client2 = client(&f.pki, Version::Http2);
    assert_eq!(post(&client2, &first).await, refused(401, "nonce_replayed"));
    let retry = sign(&f.key, &f.url, reading("m000001", 5, 3.0));
    assert_eq!(post(&client2, &retry).await, stored(200, "m000001-5"));
    let next = sign(&f.key, &f.url, reading("m000001", 6, 3.5));
    assert_eq!(post(&client2, &next).await, stored(201, "m000001-6"));
    sink.shutdown().await;
    assert_eq!(stored_ids(&f.store), ["m000001-5", "m000001-6"]);
}

#[tokio::test]
async fn a_sink_without_keys_does_not_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    make_pki(&pki, "Gridward");
    let tls = tls_from_pki(&pki, "sink", &[], &[]).expect("tls");
    let config = SinkConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        tls,
        Keys::new(),
        tmp.path().join("sink.db"),
    );
    assert!(matches!(
        gridward_sink::start(config).await,
        Err(gridward_sink::SinkError::NoKeys)
    ));
    assert!(matches!(
        tls_from_pki(&pki, "absent", &[], &[]),
        Err(gridward_sink::SinkError::Pki(_))
    ));
    assert!(matches!(
        tls_from_pki(&pki, "sink", &[tmp.path().join("none.pem")], &[]),
        Err(gridward_sink::SinkError::TrustFile { .. })
    ));
    assert!(matches!(
        Keys::load("hes", &pki.join("crl/root.crl.pem")),
        Err(gridward_sink::SinkError::Key { .. })
    ));
}
