//! # gridward-attack
//!
//! The attack harness: every threat of the design's threat table, run against a head-end while
//! a genuine fleet keeps sending, each case ending in a verdict that demands the defence **and**
//! its trace (the security event the refusal must leave).
//!
//! ```text
//!  run(target) ── GenuineFleet (g000001.. from 127.0.0.1, a reading every 200 ms each)
//!      │
//!      ├─ scenarios::eavesdropping  ┐  each: fn run(&Ctx) -> Vec<Check>
//!      ├─ scenarios::mitm           │  attacks come from 127.1.x.y (a fresh loopback
//!      ├─ scenarios::spoofing       │  address per case, so bans never hit the fleet)
//!      ├─ scenarios::replay         │  and are judged by what the attacker saw and by
//!      ├─ scenarios::tampering      │  the head-end's security events (Ctx::refusal)
//!      ├─ scenarios::revocation     │
//!      ├─ scenarios::access         │  (the HTTPS API: people and programs)
//!      ├─ scenarios::commands       │  (victim meters get forged commands; four eyes)
//!      ├─ scenarios::firmware       │  (victim meters get bad images)
//!      ├─ scenarios::detection      │  (refused and alarmed: tamper, relays, clones)
//!      ├─ scenarios::dos            │
//!      └─ scenarios::malformed      ┘
//!      ▼
//!  Report: table (scenario · case · expected · observed · PASS/FAIL · event) and JSON
//! ```
//!
//! - [`target`]: what is attacked ([`Target`]), and [`InProcess`], a head-end and sink the
//!   harness starts itself.
//! - [`ctx`]: [`Ctx`], what scenarios share: attack identities, connections from fresh
//!   sources, signing, the head-end's records.
//! - [`fleet`]: [`GenuineFleet`], the meters that must keep getting through, and [`Victims`],
//!   the meters that forged commands and bad firmware are delivered to.
//! - [`check`]: [`Check`] and [`Report`].
//! - [`scenarios`]: one module per threat.

#![forbid(unsafe_code)]

pub mod check;
pub mod ctx;
pub mod fleet;
pub mod scenarios;
pub mod target;

use std::path::Path;
use std::time::{Duration, Instant};

pub use check::{Check, FleetSummary, Report};
pub use ctx::Ctx;
pub use fleet::{GenuineFleet, Victims};
pub use target::{ApiTarget, InProcess, SinkTarget, Target};

/// Why the harness could not run (as opposed to an attack that succeeded, which is a failed
/// [`Check`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttackError {
    /// The target or the harness could not be set up.
    #[error("set-up: {0}")]
    Setup(String),
    /// The PKI refused an operation.
    #[error("PKI: {0}")]
    Pki(#[from] gridward_pki::PkiError),
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] gridward_pki::tls::TlsError),
    /// The sink could not start.
    #[error("sink: {0}")]
    Sink(#[from] gridward_sink::SinkError),
    /// A meter id was refused.
    #[error("meter id: {0}")]
    MeterId(#[from] gridward_core::MeterIdError),
    /// An envelope could not be made.
    #[error("envelope: {0}")]
    Envelope(#[from] gridward_core::envelope::EnvelopeError),
    /// A name is not a scenario.
    #[error("unknown scenario {0:?}; the scenarios are: {1}")]
    UnknownScenario(String, String),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these scenarios (names from [`scenarios::ALL`]); empty: all.
    pub only: Vec<String>,
    /// Genuine meters sending alongside (at most this many of the target's `g…` meters).
    pub fleet: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            only: Vec::new(),
            fleet: 20,
        }
    }
}

/// Runs the scenarios against `target` with a genuine fleet alongside; `progress` is told
/// each scenario's name as it starts. `work` holds attack material (rogue CAs, meter state).
pub async fn run(
    target: Target,
    work: &Path,
    opts: &Options,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report, AttackError> {
    let names: Vec<&str> = scenarios::ALL.iter().map(|s| s.name).collect();
    for only in &opts.only {
        if !names.contains(&only.as_str()) {
            return Err(AttackError::UnknownScenario(only.clone(), names.join(", ")));
        }
    }
    let started = Instant::now();
    progress("starting the genuine fleet");
    let fleet = GenuineFleet::start(&target, &work.join("fleet-state"), opts.fleet).await?;
    let rate_before = fleet.rate_over(Duration::from_secs(2)).await;
    let ctx = Ctx::new(target, fleet, work)?;
    let mut checks = Vec::new();
    for s in scenarios::ALL {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == s.name) {
            continue;
        }
        progress(s.name);
        checks.extend((s.run)(&ctx).await);
    }
    let Ctx { fleet, .. } = ctx;
    let meters = fleet.meters();
    let report = fleet.stop(Duration::from_secs(10)).await;
    let s = &report.stats;
    let summary = FleetSummary {
        meters,
        rate_before,
        acked: s.acked,
        refused: s.rejected,
        unacknowledged: s.unacknowledged(),
    };
    checks.push(
        Check::new(
            "fleet",
            format!("{meters} genuine meters sending throughout"),
            "every genuine reading accepted, none refused or lost",
        )
        .observed(format!(
            "{} acknowledged, {} refused, {} unacknowledged, {} connection losses",
            s.acked,
            s.rejected,
            s.unacknowledged(),
            s.disconnects
        ))
        .pass(s.acked > 0 && s.rejected == 0 && s.unacknowledged() == 0),
    );
    Ok(Report {
        checks,
        fleet: summary,
        seconds: started.elapsed().as_secs_f64(),
    })
}
