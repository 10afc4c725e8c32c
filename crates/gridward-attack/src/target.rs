//! What is attacked: where the head-end (and its downstream sink) listen, where their records
//! are, and — for a head-end the harness starts itself — the handles to reload it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gridward_hes::config::{Config, RawConfig, RawForward};
use gridward_hes::pipeline::system_clock;
use gridward_hes::service::Running;
use gridward_pki::{InitOptions, IssueOptions, LeafKeyAlg, Pki, StandaloneKeyPair};
use gridward_sink::{Keys, RunningSink, SinkConfig, StatsSnapshot, tls_from_pki};
use time::OffsetDateTime;

use crate::AttackError;

/// Prefix of the genuine fleet's meter ids (`g000001`, ...).
pub const FLEET_PREFIX: &str = "g";

/// The command signer of an in-process target (`DIR/command-signers/headend`, the head-end's
/// default `[commands] signer`).
pub const COMMAND_SIGNER: &str = "headend";

/// The head-end under attack.
#[derive(Clone)]
pub struct Target {
    /// The MQTT over TLS endpoint.
    pub mqtt: SocketAddr,
    /// The name its server certificate carries.
    pub server_name: String,
    /// Its PKI directory: attack identities are issued there, as an operator would for a test.
    pub pki_dir: PathBuf,
    /// Its SQLite store, read for security events and stored readings.
    pub store: PathBuf,
    /// The store's key-encryption key (by default the key file beside it, `.key`).
    pub store_keys: gridward_store::KeySource,
    /// The downstream sink it forwards to, if the replay of downstream requests is to be tried.
    pub sink: Option<SinkTarget>,
    /// The HTTPS API for people it runs, if any (the `access` scenario attacks it).
    pub api: Option<ApiTarget>,
    /// The head-end's process id, for its memory; `None`: it runs in this process.
    pub pid: Option<u32>,
    /// The private key (PKCS#8 PEM) of a firmware manufacturer whose public key the head-end
    /// trusts (`[firmware] manufacturers`); the `firmware` scenario signs genuine manifests
    /// with it, and its victim meters trust it. `None`: the firmware cases are not run.
    pub manufacturer_key: Option<PathBuf>,
    reload: Option<Arc<dyn Fn() -> Result<(), String> + Send + Sync>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("mqtt", &self.mqtt)
            .field("server_name", &self.server_name)
            .field("pki_dir", &self.pki_dir)
            .field("store", &self.store)
            .field("sink", &self.sink)
            .field("api", &self.api)
            .field("pid", &self.pid)
            .field("manufacturer_key", &self.manufacturer_key)
            .finish_non_exhaustive()
    }
}

/// A downstream sink the head-end forwards to.
#[derive(Clone)]
pub struct SinkTarget {
    /// Its HTTPS address.
    pub addr: SocketAddr,
    /// The client certificate (in the target's PKI) whose key the forwarder signs with, and
    /// the key id the sink knows it by.
    pub client: String,
    /// Its refusal counters, when it runs in this process.
    pub stats: Option<Arc<dyn Fn() -> StatsSnapshot + Send + Sync>>,
}

impl std::fmt::Debug for SinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkTarget")
            .field("addr", &self.addr)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// The HTTPS API of the head-end (`[api]`), and its users database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTarget {
    /// Its HTTPS address.
    pub addr: SocketAddr,
    /// The users database (`[api] users`): the harness creates its users there, as
    /// `gridward user add` would.
    pub users: PathBuf,
}

impl Target {
    /// A head-end running elsewhere on this machine (`gridward serve`): its address, server
    /// name, PKI and store; `pid` lets the harness read its memory and reload it with SIGHUP.
    pub fn external(
        mqtt: SocketAddr,
        server_name: impl Into<String>,
        pki_dir: impl Into<PathBuf>,
        store: impl Into<PathBuf>,
        pid: Option<u32>,
    ) -> Self {
        let reload: Option<Arc<dyn Fn() -> Result<(), String> + Send + Sync>> = pid.map(|pid| {
            Arc::new(move || {
                let status = std::process::Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status()
                    .map_err(|e| format!("kill -HUP {pid}: {e}"))?;
                if status.success() {
                    // The head-end reloads asynchronously.
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    Ok(())
                } else {
                    Err(format!("kill -HUP {pid}: {status}"))
                }
            }) as Arc<dyn Fn() -> Result<(), String> + Send + Sync>
        });
        let store: PathBuf = store.into();
        Self {
            mqtt,
            server_name: server_name.into(),
            pki_dir: pki_dir.into(),
            store_keys: gridward_store::KeySource::existing_file(store.with_extension("key")),
            store,
            sink: None,
            api: None,
            pid,
            manufacturer_key: None,
            reload,
        }
    }

    /// With the private key of a firmware manufacturer the head-end trusts (PKCS#8 PEM, as
    /// `gridward firmware keygen` writes it; its public key in `[firmware] manufacturers`).
    pub fn with_manufacturer_key(mut self, key: impl Into<PathBuf>) -> Self {
        self.manufacturer_key = Some(key.into());
        self
    }

    /// With the downstream sink it forwards to.
    pub fn with_sink(mut self, sink: SinkTarget) -> Self {
        self.sink = Some(sink);
        self
    }

    /// With the HTTPS API it runs (an unspecified listen address is reached on 127.0.0.1).
    pub fn with_api(mut self, mut api: ApiTarget) -> Self {
        if api.addr.ip().is_unspecified() {
            api.addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        self.api = Some(api);
        self
    }

    /// Makes the head-end re-read its certificates and CRLs; `Err` if it cannot be asked to.
    pub fn reload(&self) -> Result<(), String> {
        match &self.reload {
            Some(r) => r(),
            None => Err("the harness cannot reload this head-end (give its pid)".to_owned()),
        }
    }

    /// Whether [`Target::reload`] can work.
    pub fn can_reload(&self) -> bool {
        self.reload.is_some()
    }

    /// Resident memory of the head-end process, bytes (this process's if it runs here).
    pub fn rss(&self) -> Option<u64> {
        let path = match self.pid {
            Some(pid) => PathBuf::from(format!("/proc/{pid}/status")),
            None => PathBuf::from("/proc/self/status"),
        };
        let status = std::fs::read_to_string(path).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }
}

/// A head-end and a sink started by the harness in this process, with a PKI of their own and
/// `fleet` genuine meters issued (`g000001`, ...).
pub struct InProcess {
    /// How to attack them.
    pub target: Target,
    running: Arc<Running>,
    sink: RunningSink,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// Creates `work/pki` (CA, server certificates `localhost` and `sink`, client `hes`,
    /// command signer `headend`, `fleet` meters) and a manufacturer key pair in
    /// `work/manufacturer/`, starts a sink and a head-end forwarding to it, both on
    /// 127.0.0.1:0; the head-end runs its HTTPS API too (127.0.0.1:0, users in
    /// `work/users.db`, none yet: the `access` and `commands` scenarios add their own), with
    /// commands on (signed by `headend`) and the manufacturer trusted for firmware uploads.
    ///
    /// The head-end runs with its default limits, bans included; only 127.0.0.1 is exempt from
    /// bans, because the genuine fleet connects from there: every attack comes from another
    /// loopback address (127.1.x.y), so a ban it earns never touches the fleet.
    pub async fn start(work: &Path, fleet: usize) -> Result<Self, AttackError> {
        // Absolute: the configuration resolves relative paths against `work` itself.
        let work = &std::fs::canonicalize(work)
            .map_err(|e| AttackError::Setup(format!("{}: {e}", work.display())))?;
        let pki_dir = work.join("pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&pki_dir, &InitOptions::new("gridward-attack", now))?;
        let opts = IssueOptions::new("gridward-attack");
        let sans = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        pki.issue_server("localhost", &sans, &opts, now)?;
        pki.issue_server("sink", &sans, &opts, now)?;
        pki.issue_client("hes", &opts, now)?;
        pki.issue_command_signer(COMMAND_SIGNER, &opts, now)?;
        pki.issue_meters(FLEET_PREFIX, fleet, &opts, now, &mut |_| {})?;

        let mut keys = Keys::new();
        keys.insert(Keys::load("hes", &pki_dir.join("clients/hes/cert.pem"))?);
        let sink = gridward_sink::start(SinkConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_from_pki(&pki_dir, "sink", &[], &[])?,
            keys,
            work.join("sink.db"),
        ))
        .await?;

        let mut raw = RawConfig::loopback(&pki_dir, &work.join("gridward.db"));
        raw.forward = vec![RawForward::pki_client(
            "billing",
            format!("https://127.0.0.1:{}/readings", sink.local_addr().port()),
            "hes",
            2,
        )];
        raw.api.listen = Some("127.0.0.1:0".to_owned());
        raw.api.users = Some(work.join("users.db"));
        raw.commands.signer = Some(COMMAND_SIGNER.to_owned());
        let (manufacturer_key, manufacturer_pub) = manufacturer(&work.join("manufacturer"))?;
        raw.firmware.manufacturers = Some(vec![manufacturer_pub]);
        let config = Config::from_raw(raw, Path::new("(attack harness)"), work)
            .map_err(|e| AttackError::Setup(e.to_string()))?;
        let running = Arc::new(
            gridward_hes::service::start(&config, system_clock())
                .await
                .map_err(|e| AttackError::Setup(e.to_string()))?,
        );
        let r = Arc::clone(&running);
        let reload: Arc<dyn Fn() -> Result<(), String> + Send + Sync> =
            Arc::new(move || r.reload().map(|_| ()).map_err(|e| e.to_string()));
        let api = match (running.api_addr, &config.api) {
            (Some(addr), Some(settings)) => ApiTarget {
                addr,
                users: settings.users_path.clone(),
            },
            _ => {
                return Err(AttackError::Setup(
                    "the head-end did not start its API".into(),
                ));
            }
        };
        let stats = sink.stats_handle();
        let target = Target {
            mqtt: running.local_addr,
            server_name: "localhost".to_owned(),
            pki_dir,
            store: config.store_path.clone(),
            store_keys: config
                .store_keys
                .source(false)
                .map_err(AttackError::Setup)?,
            sink: Some(SinkTarget {
                addr: sink.local_addr(),
                client: "hes".to_owned(),
                stats: Some(Arc::new(move || stats.snapshot())),
            }),
            api: Some(api),
            pid: None,
            manufacturer_key: Some(manufacturer_key),
            reload: Some(reload),
        };
        Ok(Self {
            target,
            running,
            sink,
        })
    }

    /// Stops the head-end (writing what is queued) and the sink.
    pub async fn shutdown(self) {
        let Self {
            target,
            running,
            sink,
        } = self;
        // The target's reload closure holds the other reference.
        drop(target);
        if let Ok(running) = Arc::try_unwrap(running) {
            running.shutdown().await;
        }
        sink.shutdown().await;
    }
}

/// A manufacturer key pair in `dir` (`manufacturer.key.pem`, `manufacturer.pub.pem`, as
/// `gridward firmware keygen` writes them); returns the private and the public key's paths.
fn manufacturer(dir: &Path) -> Result<(PathBuf, PathBuf), AttackError> {
    let pair = StandaloneKeyPair::generate(LeafKeyAlg::Ed25519)?;
    let private = dir.join("manufacturer.key.pem");
    let public = dir.join("manufacturer.pub.pem");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&private, &pair.private_key_pem))
        .and_then(|()| std::fs::write(&public, &pair.public_key_pem))
        .map_err(|e| AttackError::Setup(format!("{}: {e}", dir.display())))?;
    Ok((private, public))
}
