//! The scenarios, one module per threat of the design's threat table. Each is
//! `async fn run(ctx: &Ctx) -> Vec<Check>`: it attacks, observes what the attacker saw, and
//! demands the security event the refusal must leave (see [`Ctx::refusal`]).
//!
//! Attacks that need a meter's own key (a counter reused with other content, a captured
//! message injected later) stand for a compromised concentrator or broker on the path, which
//! holds captured envelopes but not the meter's key, or for a cloned meter; they use dedicated
//! victim meters (`x-…`) so the genuine fleet's counters are never disturbed.

use std::future::Future;
use std::pin::Pin;

use crate::check::Check;
use crate::ctx::Ctx;

pub mod replay;

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
pub const ALL: &[Scenario] = &[Scenario {
    name: replay::NAME,
    threat: "replay: a captured or withheld message sent again",
    run: |c| Box::pin(replay::run(c)),
}];
