//! The head-end's side of the audit chain (`gridward-audit`): one thread that appends what the
//! ingest path and the PKI report, and signs a checkpoint periodically.
//!
//! - Security events from the MQTT endpoint, the pipeline and the API arrive through
//!   [`AuditSink::security_event`], which never blocks (a bounded queue; under a flood the
//!   excess is counted as dropped, and the security events themselves are still in the store).
//! - The PKI's own hash-chained operation log (`DIR/log.jsonl`, written by `gridward pki`) joins
//!   the chain: [`AuditSink::import_pki_log`] appends each PKI operation not yet imported as a
//!   `pki.*` entry (at start-up and whenever the PKI files change).
//! - Every `checkpoint_interval`, if entries were added, the thread signs a checkpoint with the
//!   audit key; and once more at shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use gridward_audit::{Actor, AuditKey, AuditLog, NewEntry, Outcome, Query};

use crate::pipeline::Clock;

/// Entries waiting for the audit thread.
const QUEUE: usize = 16 * 1024;
/// Most entries per transaction.
const BATCH: usize = 512;

/// Where the audit log lives and how it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// The SQLite file.
    pub path: PathBuf,
    /// The Ed25519 key (PKCS#8 PEM, created mode 0600 if missing).
    pub key: PathBuf,
    /// The checkpoint origin, also the signer's name (e.g. `gridward.example/audit`).
    pub origin: String,
    /// How often a checkpoint is signed (if the log grew).
    pub checkpoint_interval: Duration,
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditStartError {
    /// The log.
    #[error("audit log: {0}")]
    Log(#[from] gridward_audit::AuditError),
    /// The key.
    #[error("audit key {}: {source}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// The error.
        source: gridward_audit::KeyError,
    },
    /// The thread.
    #[error("audit thread: {0}")]
    Thread(std::io::Error),
}

enum Job {
    Entry(NewEntry),
    Flush(mpsc::Sender<()>),
    Stop,
}

/// The handle: cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    log: Arc<AuditLog>,
    tx: SyncSender<Job>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("path", &self.log.path())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Entry(_) => "Entry",
            Job::Flush(_) => "Flush",
            Job::Stop => "Stop",
        })
    }
}

/// The audit thread, to join at shutdown (after every [`AuditSink`] is dropped).
#[derive(Debug)]
pub struct AuditThread(Option<thread::JoinHandle<()>>);

impl AuditThread {
    /// Waits for the thread to sign its last checkpoint and end.
    pub fn join(mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

impl AuditSink {
    /// Opens the log and the key (creating both if missing) and starts the thread.
    pub fn start(
        settings: &AuditSettings,
        clock: Clock,
    ) -> Result<(AuditSink, AuditThread), AuditStartError> {
        let log = Arc::new(AuditLog::open(&settings.path)?);
        let key =
            AuditKey::load_or_create(&settings.key).map_err(|source| AuditStartError::Key {
                path: settings.key.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let thread_log = Arc::clone(&log);
        let origin = settings.origin.clone();
        let interval = settings.checkpoint_interval;
        let thread_clock = clock;
        let handle = thread::Builder::new()
            .name("gridward-audit".into())
            .spawn(move || run(&thread_log, &key, &origin, interval, &thread_clock, &rx))
            .map_err(AuditStartError::Thread)?;
        Ok((
            AuditSink {
                log,
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            AuditThread(Some(handle)),
        ))
    }

    /// The log (for the API and reports).
    pub fn log(&self) -> Arc<AuditLog> {
        Arc::clone(&self.log)
    }

    /// Queues an entry without waiting; counts it as dropped if the queue is full.
    pub fn append(&self, entry: NewEntry) {
        if self.tx.try_send(Job::Entry(entry)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a security event of the ingest path as an audit entry (`security.{reason}`).
    pub fn security_event(&self, event: &gridward_store::SecurityEvent) {
        let target = event
            .meter_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let mut entry = NewEntry::new(
            event.at,
            Actor::System,
            format!("security.{}", event.reason),
            target,
            Outcome::Denied,
        )
        .detail(cut(&event.detail, 1000));
        if let Some(source) = &event.source {
            entry = entry.source(source.clone());
        }
        self.append(entry);
    }

    /// Writes what is queued, signs a last checkpoint and stops the thread; entries queued
    /// later are counted as dropped.
    pub fn close(&self) {
        let _ = self.tx.send(Job::Stop);
    }

    /// Entries that could not be queued.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything queued before this call is written.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Appends the PKI operations of `pki_dir`'s log that the audit log does not have yet, as
    /// `pki.{action}` entries (actor: the PKI log's actor; detail starts `pki-log #N`).
    /// Returns how many were appended.
    ///
    /// # Errors
    ///
    /// The PKI log cannot be read, or the audit log refused the entries.
    pub fn import_pki_log(&self, pki_dir: &Path) -> Result<usize, String> {
        let pki = gridward_pki::Pki::open(pki_dir, None).map_err(|e| e.to_string())?;
        let report = pki.log().map_err(|e| e.to_string())?;
        let done = self.imported_pki_lines().map_err(|e| e.to_string())?;
        let fresh: Vec<NewEntry> = report
            .entries
            .iter()
            .filter(|e| e.line > done)
            .map(|e| {
                let r = &e.record;
                let target = r
                    .identity
                    .clone()
                    .or_else(|| r.serial.clone())
                    .unwrap_or_default();
                let mut detail = format!("pki-log #{}", e.line);
                for (k, v) in [
                    ("kind", &r.kind),
                    ("serial", &r.serial),
                    ("sha256", &r.fingerprint),
                    ("reason", &r.reason),
                    ("detail", &r.detail),
                ] {
                    if let Some(v) = v {
                        detail.push_str(&format!(" {k}={v}"));
                    }
                }
                let outcome = if e.chain_ok {
                    Outcome::Success
                } else {
                    Outcome::Failure
                };
                NewEntry::new(
                    r.time,
                    Actor::Certificate(format!("pki:{}", r.actor)),
                    format!("pki.{}", r.action.as_str()),
                    target,
                    outcome,
                )
                .detail(cut(&detail, 4000))
            })
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        for chunk in fresh.chunks(BATCH) {
            self.log.append_all(chunk).map_err(|e| e.to_string())?;
        }
        Ok(fresh.len())
    }

    /// The highest PKI log line already imported.
    fn imported_pki_lines(&self) -> Result<u64, gridward_audit::AuditError> {
        // The newest `pki.` entry carries the highest line: imports are in line order.
        let mut after = None;
        let mut last = 0;
        loop {
            let page = self.log.entries(&Query {
                action: Some("pki.".into()),
                after_seq: after,
                limit: 1000,
                ..Query::default()
            })?;
            let Some(tail) = page.last() else {
                return Ok(last);
            };
            after = Some(tail.seq);
            if let Some(n) = tail
                .detail
                .strip_prefix("pki-log #")
                .and_then(|d| d.split(' ').next())
                .and_then(|n| n.parse().ok())
            {
                last = n;
            }
            if page.len() < 1000 {
                return Ok(last);
            }
        }
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn run(
    log: &AuditLog,
    key: &AuditKey,
    origin: &str,
    interval: Duration,
    clock: &Clock,
    rx: &mpsc::Receiver<Job>,
) {
    let mut next_checkpoint = Instant::now() + interval;
    let checkpoint = || match log.checkpoint(key, origin, clock()) {
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "audit checkpoint not signed"),
    };
    loop {
        let wait = next_checkpoint.saturating_duration_since(Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                checkpoint();
                return;
            }
        };
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut next = first;
        let mut stop = false;
        while let Some(job) = next.take() {
            match job {
                Job::Entry(e) => batch.push(e),
                Job::Flush(done) => flushes.push(done),
                Job::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty()
            && let Err(e) = log.append_all(&batch)
        {
            tracing::error!(error = %e, entries = batch.len(), "audit entries not written");
        }
        for done in flushes {
            let _ = done.send(());
        }
        if stop {
            checkpoint();
            return;
        }
        if Instant::now() >= next_checkpoint {
            checkpoint();
            next_checkpoint = Instant::now() + interval;
        }
    }
}
