//! The scenarios, one module per threat of the design's threat table. Each is
//! `async fn run(ctx: &Ctx) -> Vec<Check>`: it attacks, observes what the attacker saw, and
//! demands the security event the refusal must leave (see [`Ctx::refusal`]).
//!
//! The `commands` and `firmware` scenarios attack meters rather than the head-end: victim meters
//! of their own ([`crate::fleet::Victims`]) get what a compromised broker would deliver, and the
//! head-end must record the refusal their signed acknowledgements report.
//!
//! Attacks that need a meter's own key (a counter reused with other content, a captured
//! message injected later) stand for a compromised concentrator or broker on the path, which
//! holds captured envelopes but not the meter's key, or for a cloned meter; they use dedicated
//! victim meters (`x-…`) so the genuine fleet's counters are never disturbed.

use std::future::Future;
use std::pin::Pin;

use crate::check::Check;
use crate::ctx::Ctx;

pub mod access;
pub mod commands;
pub mod detection;
pub mod dos;
pub mod eavesdropping;
pub mod firmware;
pub mod malformed;
pub mod mitm;
pub mod replay;
pub mod revocation;
pub mod spoofing;
pub mod tampering;

/// A boxed future borrowing the context.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name (`gridward attack --only NAME`).
    pub name: &'static str,
    /// The threat, as the design's table names it.
    pub threat: &'static str,
    /// Runs it.
    pub run: for<'a> fn(&'a Ctx) -> BoxFuture<'a, Vec<Check>>,
}

/// Every scenario, in the order they run.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: eavesdropping::NAME,
        threat: "eavesdropping: reading the traffic between meter and head-end",
        run: |c| Box::pin(eavesdropping::run(c)),
    },
    Scenario {
        name: mitm::NAME,
        threat: "man-in-the-middle: a rogue server or client, or a weakened TLS",
        run: |c| Box::pin(mitm::run(c)),
    },
    Scenario {
        name: spoofing::NAME,
        threat: "spoofing: one meter posing as another",
        run: |c| Box::pin(spoofing::run(c)),
    },
    Scenario {
        name: replay::NAME,
        threat: "replay: a captured or withheld message sent again",
        run: |c| Box::pin(replay::run(c)),
    },
    Scenario {
        name: tampering::NAME,
        threat: "tampering in transit: a changed message",
        run: |c| Box::pin(tampering::run(c)),
    },
    Scenario {
        name: revocation::NAME,
        threat: "revoked, expired and not yet valid certificates; an expired CRL",
        run: |c| Box::pin(revocation::run(c)),
    },
    Scenario {
        name: access::NAME,
        threat: "unauthorised access: guessed passwords, replayed codes, stolen or forged \
                 sessions, cross-site requests, roles overstepped, revoked API certificates",
        run: |c| Box::pin(access::run(c)),
    },
    Scenario {
        name: commands::NAME,
        threat: "forged, replayed, stale and misdirected commands; a meter on another meter's \
                 command topic; one operator disconnecting many meters alone",
        run: |c| Box::pin(commands::run(c)),
    },
    Scenario {
        name: firmware::NAME,
        threat: "malware / bad firmware: a modified, foreign-signed, older, foreign-class or \
                 truncated image",
        run: |c| Box::pin(firmware::run(c)),
    },
    Scenario {
        name: detection::NAME,
        threat: "alarm conditions: tamper, a concentrator relaying for others or altering, \
                 a cloned meter, a brute-forcing source (refused and alarmed)",
        run: |c| Box::pin(detection::run(c)),
    },
    Scenario {
        name: malformed::NAME,
        threat: "malformed input: garbage, truncated and oversized frames, hostile XML",
        run: |c| Box::pin(malformed::run(c)),
    },
    Scenario {
        name: dos::NAME,
        threat: "denial of service: floods, oversize packets, slow and half-open connections",
        run: |c| Box::pin(dos::run(c)),
    },
];
