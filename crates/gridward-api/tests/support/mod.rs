//! A real API over real TLS for the tests: a PKI on disk (server certificate, API client
//! certificates with roles, one revoked), a SQLite store with readings, an access database
//! with one user per role (and a second operator, for four eyes), an audit log, a command
//! service with its own command key and a trusted manufacturer key, and a clock the test moves.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gridward_access::ratelimit::RateLimit;
use gridward_access::{Access, Argon2Params, NewUser, Role, Secret};
use gridward_api::{ApiConfig, ApiContext, RunningApi};
use gridward_audit::{AuditKey, AuditLog};
use gridward_command::{Commands, Policy};
use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_core::envelope::SigningKey;
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki, RevocationReason, RevokeTarget};
use gridward_store::{Accepted, AcceptedBody, SqliteStore, Store};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use time::OffsetDateTime;
use time::macros::datetime;

pub const T0: OffsetDateTime = datetime!(2026-12-03 08:00 UTC);
pub const PASSWORD: &str = "correct horse battery staple 42";

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The fixture's metrics: logins and lockouts counted, served as a tiny exposition.
#[derive(Debug, Default)]
pub struct Counts {
    pub logins_ok: AtomicI64,
    pub logins_failed: AtomicI64,
    pub lockouts: AtomicI64,
}

impl gridward_api::Observer for Counts {
    fn login(&self, success: bool) {
        if success {
            &self.logins_ok
        } else {
            &self.logins_failed
        }
        .fetch_add(1, Ordering::SeqCst);
    }
    fn lockout(&self) {
        self.lockouts.fetch_add(1, Ordering::SeqCst);
    }
    fn exposition(&self) -> (String, &'static str) {
        (
            format!(
                "# TYPE logins counter\nlogins_total {}\n# EOF\n",
                self.logins_ok.load(Ordering::SeqCst)
            ),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    }
}

/// A user of the fixture, with what logging in needs.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub totp_secret: Option<String>,
}

pub struct Fixture {
    pub observer: Arc<Counts>,
    pub dir: tempfile::TempDir,
    pub api: RunningApi,
    pub store: Arc<SqliteStore>,
    pub access: Arc<Access>,
    pub audit: Arc<AuditLog>,
    pub audit_key: AuditKey,
    pub clock: Arc<AtomicI64>,
    pub users: Vec<(Role, User)>,
    /// A second operator, `olga`, for four eyes.
    pub olga: User,
    pub base: String,
    /// The command service (`None` with [`start_without_commands`]).
    pub commands: Option<Arc<Commands>>,
    /// The manufacturer's key, trusted for firmware uploads.
    pub manufacturer: Arc<SigningKey>,
    /// The head-end's command key.
    pub signer: Arc<SigningKey>,
}

impl Fixture {
    pub fn pki(&self) -> std::path::PathBuf {
        self.dir.path().join("pki")
    }

    pub fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.clock.load(Ordering::SeqCst)).unwrap()
    }

    pub fn advance(&self, secs: i64) {
        self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    /// The command service.
    pub fn commands(&self) -> &Arc<Commands> {
        self.commands
            .as_ref()
            .expect("the fixture runs with commands")
    }

    pub fn user(&self, role: Role) -> User {
        self.users
            .iter()
            .find(|(r, _)| *r == role)
            .unwrap()
            .1
            .clone()
    }

    /// The TOTP code of `secret` now (by the fixture's clock).
    pub fn code(&self, secret: &str) -> String {
        totp_code(secret, self.now())
    }

    /// Logs `user` in (moving the clock to a fresh TOTP step first) and returns the token and
    /// the CSRF token.
    pub async fn login(&self, user: &User) -> (String, String) {
        self.advance(31);
        let body = match &user.totp_secret {
            Some(s) => format!(
                r#"{{"username":"{}","password":"{PASSWORD}","totp":"{}"}}"#,
                user.name,
                self.code(s)
            ),
            None => format!(r#"{{"username":"{}","password":"{PASSWORD}"}}"#, user.name),
        };
        let r = self
            .request(
                &anonymous(&self.pki()),
                "POST",
                "/api/v1/session",
                &[],
                Some(&body),
            )
            .await
            .expect("login request");
        assert_eq!(r.status, 201, "login of {}: {}", user.name, r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        (
            v["token"].as_str().unwrap().to_owned(),
            v["csrf_token"].as_str().unwrap().to_owned(),
        )
    }

    /// One request; `Err` when the TLS handshake (or the connection) failed.
    pub async fn request(
        &self,
        client: &HttpsClient,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Response, String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Security events with `reason`.
    pub fn events(&self, reason: &str) -> Vec<gridward_store::StoredSecurityEvent> {
        self.store
            .security_events(&gridward_store::SecurityEventQuery {
                reason: Some(reason.to_owned()),
                ..Default::default()
            })
            .unwrap()
    }

    /// Raises an alarm of `alarm_type` for `originator` in the store (as the detectors do).
    pub fn raise(&self, alarm_type: &str, severity: &str, originator: &str) -> i64 {
        use gridward_store::AlarmStore;
        self.store
            .raise_alarm(&gridward_store::RaiseAlarm {
                alarm_type: alarm_type.to_owned(),
                severity: severity.to_owned(),
                originator: originator.to_owned(),
                at: self.now(),
                summary: format!("{alarm_type} at {originator}"),
                evidence_json: format!(
                    r#"[{{"event":"CoverOpened","meter":"{originator}","counter":7}}]"#
                ),
            })
            .unwrap()
            .alarm()
            .id
    }

    /// Audit entries whose action starts with `action`.
    pub fn audit_entries(&self, action: &str) -> Vec<gridward_audit::Entry> {
        self.audit
            .entries(&gridward_audit::Query {
                action: Some(action.to_owned()),
                ..Default::default()
            })
            .unwrap()
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

pub fn totp_code(secret: &str, at: OffsetDateTime) -> String {
    let bytes = totp_rs::Secret::try_from_base32(secret).unwrap();
    totp_rs::Builder::new()
        .with_secret(bytes.as_bytes().to_vec())
        .build()
        .unwrap()
        .generate(u64::try_from(at.unix_timestamp()).unwrap())
        .to_string()
}

fn mid(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

fn reading(meter: &str, counter: u64) -> Accepted {
    let taken_at = T0 - time::Duration::hours(24) + time::Duration::minutes(counter as i64 * 15);
    Accepted {
        meter_id: mid(meter),
        counter,
        taken_at,
        received_at: taken_at + time::Duration::seconds(1),
        body: AcceptedBody::Reading {
            energy_kwh: counter as f64 * 0.25,
        },
        envelope: format!("COSE:{meter}:{counter}").into_bytes(),
        content_type: Format::Json,
        source: Some("192.0.2.7:50123".to_owned()),
    }
}

/// The client of a PKI client certificate (the Gridward TLS profile).
pub fn cert_client(pki: &Path, name: &str) -> HttpsClient {
    let material = Pki::open(pki, None)
        .unwrap()
        .tls_material(LeafKind::Client, name)
        .unwrap();
    let config = (*gridward_pki::tls::client_config(&material).unwrap()).clone();
    client_with(config)
}

/// The same profile and trust, no client certificate (people with a session).
pub fn anonymous(pki: &Path) -> HttpsClient {
    let material = Pki::open(pki, None)
        .unwrap()
        .tls_material(LeafKind::Server, "api")
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for root in material.roots {
        roots.add(root).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(gridward_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_with(config)
}

fn client_with(mut config: rustls::ClientConfig) -> HttpsClient {
    config.alpn_protocols.clear();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// A fresh Ed25519 key.
pub fn new_key() -> SigningKey {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    SigningKey::from_pkcs8_der(doc.as_ref()).unwrap()
}

/// Starts the fixture: meters m-1 (12 readings, bound to the consumer) and m-2 (3 readings),
/// commands and alarms on.
pub async fn start() -> Fixture {
    start_with(true, true).await
}

/// The fixture without a command service: the downward path answers 503.
pub async fn start_without_commands() -> Fixture {
    start_with(false, true).await
}

/// The fixture without an alarm store: alarms and the topology answer 503.
pub async fn start_without_alarms() -> Fixture {
    start_with(true, false).await
}

async fn start_with(with_commands: bool, with_alarms: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let real_now = OffsetDateTime::now_utc();
    let pki = Pki::init(&pki_dir, &InitOptions::new("test", real_now)).unwrap();
    let opts = IssueOptions::new("test");
    pki.issue_server("api", &["127.0.0.1".to_owned()], &opts, real_now)
        .unwrap();
    for (name, role) in [
        ("ops-cert", Some("operator")),
        ("audit-cert", Some("auditor")),
        ("ops-revoked", Some("operator")),
        ("forwarder", None),
    ] {
        let mut o = IssueOptions::new("test");
        o.role = role.map(str::to_owned);
        pki.issue_client(name, &o, real_now).unwrap();
    }
    pki.revoke(
        &RevokeTarget::Identity {
            kind: Some(LeafKind::Client),
            name: "ops-revoked".into(),
        },
        RevocationReason::KeyCompromise,
        "test",
        real_now,
    )
    .unwrap();

    let store = Arc::new(
        SqliteStore::open(
            &dir.path().join("gridward.db"),
            gridward_store::KeySource::file(dir.path().join("gridward.db").with_extension("key")),
        )
        .unwrap(),
    );
    let mut batch: Vec<Accepted> = (1..=12).map(|c| reading("m-1", c)).collect();
    batch.extend((1..=3).map(|c| reading("m-2", c)));
    store.commit(&batch).unwrap();

    let access = Arc::new(
        Access::open_with_rate_limit(
            &dir.path().join("users.db"),
            Argon2Params::insecure_test_params(),
            RateLimit {
                burst: 1000,
                per_minute: 1000,
                max_sources: 1000,
            },
        )
        .unwrap(),
    );
    let mut users = Vec::new();
    for (name, role, meters) in [
        ("carol", Role::Consumer, vec![mid("m-1")]),
        ("otto", Role::Operator, vec![]),
        ("alice", Role::Auditor, vec![]),
        ("adam", Role::Admin, vec![]),
        ("olga", Role::Operator, vec![]),
    ] {
        let enrol = access
            .add_user(
                NewUser {
                    username: name.into(),
                    role,
                    meters,
                    password: Secret::new(PASSWORD),
                },
                T0,
            )
            .unwrap();
        users.push((
            role,
            User {
                name: name.into(),
                totp_secret: enrol.map(|e| e.secret_base32),
            },
        ));
    }
    let olga_at = users.iter().position(|(_, u)| u.name == "olga").unwrap();
    let olga = users.remove(olga_at).1;
    let audit = Arc::new(AuditLog::open(&dir.path().join("audit.db")).unwrap());
    let audit_key = AuditKey::generate().unwrap();
    audit
        .append(&gridward_audit::NewEntry::new(
            T0,
            gridward_audit::Actor::System,
            "service.start",
            "",
            gridward_audit::Outcome::Success,
        ))
        .unwrap();
    audit
        .checkpoint(&audit_key, "test.example/audit", T0)
        .unwrap();

    let clock = Arc::new(AtomicI64::new(T0.unix_timestamp()));
    let c = Arc::clone(&clock);
    let clock_fn: gridward_api::Clock =
        Arc::new(move || OffsetDateTime::from_unix_timestamp(c.load(Ordering::SeqCst)).unwrap());
    let store_dyn: Arc<dyn Store> = store.clone();
    let mut ctx = ApiContext::new(
        store_dyn,
        Arc::clone(&access),
        Arc::clone(&audit),
        Arc::clone(&clock_fn),
    );
    let signer = Arc::new(new_key());
    let manufacturer = Arc::new(new_key());
    let mut commands = None;
    if with_commands {
        // As the head-end wires it: the audit log, and the users database for whether a
        // proposer is still an enabled operator.
        let recorder = {
            let audit = Arc::clone(&audit);
            move |entry: gridward_audit::NewEntry| {
                audit.append(&entry).unwrap();
            }
        };
        let proposers = {
            let access = Arc::clone(&access);
            move |username: &str| {
                access.list_users().is_ok_and(|users| {
                    users
                        .iter()
                        .any(|u| u.username == username && !u.disabled && u.role == Role::Operator)
                })
            }
        };
        let service = Arc::new(
            Commands::new(
                store.clone() as Arc<dyn gridward_store::CommandStore>,
                Arc::clone(&signer),
                Arc::clone(&clock_fn),
                Arc::new(recorder),
                Arc::new(proposers),
                Policy::default(),
            )
            .unwrap(),
        );
        ctx = ctx.with_commands(
            Arc::clone(&service),
            store.clone(),
            Arc::new(vec![manufacturer.verifying_key().unwrap()]),
        );
        commands = Some(service);
    }
    if with_alarms {
        ctx = ctx.with_alarms(store.clone());
    }
    ctx.pki_dir = Some(pki_dir.clone());
    let observer = Arc::new(Counts::default());
    ctx.observer = Some(observer.clone());
    let material = Pki::open(&pki_dir, None)
        .unwrap()
        .tls_material(LeafKind::Server, "api")
        .unwrap();
    let api = gridward_api::start(
        ApiConfig::new("127.0.0.1:0".parse().unwrap(), material),
        Arc::new(ctx),
    )
    .await
    .unwrap();
    let base = format!("https://127.0.0.1:{}", api.local_addr().port());
    Fixture {
        observer,
        dir,
        api,
        store,
        access,
        audit,
        audit_key,
        clock,
        users,
        olga,
        base,
        commands,
        manufacturer,
        signer,
    }
}

/// How to run the schemathesis CLI (PyPI `schemathesis`, pinned in `.ci/requirements.txt`).
#[derive(Debug, Clone)]
pub struct Schemathesis {
    program: String,
    args: Vec<String>,
    pub version: String,
}

impl Schemathesis {
    /// A command that runs it; add `run …`.
    pub fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }
}

/// Finds schemathesis 4 (`python3 -m schemathesis.cli`, else `st` on the PATH), or panics
/// with what to install: a missing tool fails the test, it never skips it.
pub fn schemathesis() -> Schemathesis {
    let candidates = [
        (
            "python3",
            vec!["-m".to_owned(), "schemathesis.cli".to_owned()],
        ),
        ("st", vec![]),
    ];
    let mut tried = Vec::new();
    for (program, args) in candidates {
        let out = std::process::Command::new(program)
            .args(&args)
            .arg("--version")
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                assert!(
                    version.contains("version 4."),
                    "{program} {args:?} is {version:?}; the tests need schemathesis 4: \
                     python3 -m pip install -r .ci/requirements.txt"
                );
                return Schemathesis {
                    program: program.to_owned(),
                    args,
                    version,
                };
            }
            Ok(out) => tried.push(format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => tried.push(format!("{program}: {e}")),
        }
    }
    panic!(
        "schemathesis is not installed (tried: {}); install the CI's Python packages: \
         python3 -m pip install -r .ci/requirements.txt",
        tried.join("; ")
    );
}

/// A firmware image of `size` bytes (its content varied by `seed`) and its manifest signed by
/// `key` (sequence `5 + seed`): `(manifest, image)`.
pub fn firmware(key: &SigningKey, seed: usize, size: usize) -> (Vec<u8>, Vec<u8>) {
    use sha2::Digest;
    let image: Vec<u8> = (0..size).map(|i| ((i + seed * 7) % 251) as u8).collect();
    let manifest = gridward_core::firmware::sign_manifest(
        key,
        &gridward_core::firmware::Manifest {
            manifest_version: gridward_core::firmware::MANIFEST_VERSION,
            sequence: 5 + seed as u64,
            vendor_id: "acme".into(),
            class_id: "em-100".into(),
            version: "1.2.0".into(),
            digest: sha2::Sha256::digest(&image).into(),
            size: image.len() as u64,
            expires_at: None,
            rollback_from: None,
        },
    )
    .unwrap();
    (manifest, image)
}

/// [`firmware`] as the JSON body of `POST /api/v1/firmware`.
pub fn firmware_body(key: &SigningKey, seed: usize, size: usize) -> String {
    use base64::Engine;
    let (manifest, image) = firmware(key, seed, size);
    let b64 = base64::engine::general_purpose::STANDARD;
    serde_json::json!({"manifest": b64.encode(&manifest), "image": b64.encode(&image)}).to_string()
}
