//! Verification of a chain and its checkpoints (sans-IO): names the first problem.
//!
//! The entries are taken as read, ordered by `seq`. Walking them from the first, with
//! `expected` = the previous entry's `seq + 1` (1 for the first) and `link` = the previous
//! entry's stored hash (32 zero bytes for the first), the first entry `e` where something is
//! wrong is classified, in this order:
//!
//! 1. `e.seq < expected`: the same `seq` twice, or a `seq` before 1 → [`Finding::Inserted`];
//!    otherwise (going backwards) → [`Finding::Reordered`].
//! 2. `e.seq > expected`: a gap → [`Finding::Deleted`] at `expected`, the first missing seq
//!    (or [`Finding::Reordered`] at `e.seq` if `expected` comes later in the slice).
//! 3. `e.prev == link` but `e`'s fields do not hash to its stored hash → [`Finding::Changed`].
//! 4. `e.prev != link`, and `e.prev` is the stored hash of an entry that comes *later*
//!    → [`Finding::Reordered`] at `e.seq` (rows were swapped or renumbered).
//! 5. `e.prev` is the hash of an entry further back than the previous one, or the next entry
//!    links to the previous one (skipping `e`) → [`Finding::Inserted`] at the first entry
//!    that sits between.
//! 6. `e.prev` matches no entry, and `e` does not hash to its stored hash: if `e` would hash
//!    correctly under a higher `seq` (rows were renumbered to close a gap)
//!    → [`Finding::Deleted`] at `e.seq`; otherwise `e` itself was edited
//!    → [`Finding::Changed`] at `e.seq`.
//! 7. `e.prev` matches no entry, and `e` hashes correctly: the previous entry was edited and
//!    its hash recomputed → [`Finding::Changed`] at the previous entry (at `e` if it is the
//!    first).
//!
//! Then each checkpoint is opened with the verifier key ([`Finding::BadCheckpoint`] if it does
//! not open), and compared with the entry of `seq` = its size: none that far
//! → [`Finding::Truncated`]; another hash → [`Finding::CheckpointMismatch`].
//!
//! A checkpoint that does not open is reported first (a wrong verifier key shows at once);
//! otherwise the chain finding and the checkpoint findings are ranked by [`Finding::seq`],
//! the chain finding winning a tie.

use std::collections::HashMap;
use std::fmt;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::entry::{Entry, GENESIS};
use crate::key::VerifierKey;

/// How far back a renumbered entry is searched for (rule 6).
const MAX_RENUMBER: u64 = 4096;

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// Entry `seq`'s stored fields do not hash to its stored hash, or they do but the next
    /// entry does not link to it (it was edited and its hash recomputed).
    Changed {
        /// The entry.
        seq: u64,
    },
    /// Entry `seq` (and maybe more after it) is missing from the chain.
    Deleted {
        /// The first missing entry.
        seq: u64,
    },
    /// Entry `seq` is not part of the chain as written: the entries around it link past it,
    /// or its `seq` is used twice.
    Inserted {
        /// The inserted entry.
        seq: u64,
    },
    /// The entry stored as `seq` belongs elsewhere in the chain: it links to a later entry.
    Reordered {
        /// Where the misplaced entry is stored.
        seq: u64,
    },
    /// A signed checkpoint covers `expected` entries but the log ends at `found`.
    Truncated {
        /// The checkpoint's size.
        expected: u64,
        /// The last `seq` in the log (0 if it is empty).
        found: u64,
    },
    /// Entry `size` does not have the hash a signed checkpoint of that size records: the log
    /// was rewritten (consistently) after the checkpoint was signed.
    CheckpointMismatch {
        /// The checkpoint's size.
        size: u64,
    },
    /// A stored checkpoint does not open with the verifier key.
    BadCheckpoint {
        /// Its 1-based position among the stored checkpoints (in the order stored).
        index: usize,
        /// Why it does not open.
        error: CheckpointError,
    },
}

impl Finding {
    /// The first entry the finding concerns (for ranking findings): the entry's `seq`,
    /// `found + 1` for [`Finding::Truncated`], the size for [`Finding::CheckpointMismatch`];
    /// `None` for [`Finding::BadCheckpoint`].
    pub fn seq(&self) -> Option<u64> {
        match self {
            Self::Changed { seq }
            | Self::Deleted { seq }
            | Self::Inserted { seq }
            | Self::Reordered { seq } => Some(*seq),
            Self::Truncated { found, .. } => Some(found.saturating_add(1)),
            Self::CheckpointMismatch { size } => Some(*size),
            Self::BadCheckpoint { .. } => None,
        }
    }
}

const RESTORE: &str = "Restore the audit database from a backup and compare it with the checkpoints you kept \
                       (`gridward audit verify` on the backup); treat the gap as a security incident.";

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Changed { seq } => write!(
                f,
                "entry {seq} was changed: its stored fields no longer match the hash chain. {RESTORE}"
            ),
            Self::Deleted { seq } => write!(
                f,
                "entry {seq} was deleted (and maybe more after it): the chain skips it. {RESTORE}"
            ),
            Self::Inserted { seq } => write!(
                f,
                "entry {seq} was inserted: it is not part of the chain as it was written. {RESTORE}"
            ),
            Self::Reordered { seq } => write!(
                f,
                "entry {seq} is out of order: entries were moved or renumbered. {RESTORE}"
            ),
            Self::Truncated { expected, found } => write!(
                f,
                "the log ends at entry {found} but a signed checkpoint covers {expected} entries: \
                 entries {} to {expected} were deleted. {RESTORE}",
                found.saturating_add(1)
            ),
            Self::CheckpointMismatch { size } => write!(
                f,
                "entry {size} does not match the signed checkpoint of size {size}: the log up to \
                 entry {size} was rewritten after that checkpoint was signed. {RESTORE}"
            ),
            Self::BadCheckpoint { index, error } => write!(
                f,
                "stored checkpoint {index} does not verify ({error}): check that this is the \
                 audit verifier key; if it is, the checkpoints were tampered with. Compare them \
                 with the checkpoints you kept."
            ),
        }
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Entries examined.
    pub entries_checked: u64,
    /// Checkpoints examined.
    pub checkpoints_checked: usize,
    /// The largest size of a checkpoint that opened and matched: entries after it are
    /// protected by the chain only (0 if none).
    pub covered: u64,
    /// The first problem, if any.
    pub finding: Option<Finding>,
}

impl Report {
    /// Whether nothing was found.
    pub fn is_ok(&self) -> bool {
        self.finding.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.finding {
            None => write!(
                f,
                "ok: {} entries, {} checkpoints; entries 1 to {} are covered by a signed checkpoint",
                self.entries_checked, self.checkpoints_checked, self.covered
            ),
            Some(finding) => write!(
                f,
                "TAMPERED: {finding} ({} entries, {} checkpoints examined)",
                self.entries_checked, self.checkpoints_checked
            ),
        }
    }
}

/// Verifies `entries` (as read, ordered by `seq`) and the signed checkpoint notes by `key`;
/// see the module documentation for the rules.
pub fn verify(entries: &[Entry], checkpoints: &[String], key: &VerifierKey) -> Report {
    let chain = walk(entries, 1, GENESIS);
    let last = entries.iter().map(|e| e.seq).max().unwrap_or(0);
    let mut by_seq: HashMap<u64, [u8; 32]> = HashMap::with_capacity(entries.len());
    for e in entries {
        by_seq.entry(e.seq).or_insert(e.hash);
    }
    let mut bad = None;
    let mut first_cp: Option<Finding> = None;
    let mut covered = 0;
    for (i, note) in checkpoints.iter().enumerate() {
        let cp = match Checkpoint::open(note, key) {
            Ok(cp) => cp,
            Err(error) => {
                bad.get_or_insert(Finding::BadCheckpoint {
                    index: i + 1,
                    error,
                });
                continue;
            }
        };
        let finding = check_checkpoint(&cp, last, &by_seq);
        match finding {
            None => covered = covered.max(cp.size),
            Some(f) => {
                if first_cp.as_ref().is_none_or(|prev| f.seq() < prev.seq()) {
                    first_cp = Some(f);
                }
            }
        }
    }
    let finding = bad.or(match (chain, first_cp) {
        (Some(c), Some(p)) => Some(if p.seq() < c.seq() { p } else { c }),
        (c, p) => c.or(p),
    });
    Report {
        entries_checked: entries.len() as u64,
        checkpoints_checked: checkpoints.len(),
        covered,
        finding,
    }
}

fn check_checkpoint(
    cp: &Checkpoint,
    last: u64,
    by_seq: &HashMap<u64, [u8; 32]>,
) -> Option<Finding> {
    if cp.size == 0 {
        return (cp.head != GENESIS).then_some(Finding::CheckpointMismatch { size: 0 });
    }
    if cp.size > last {
        return Some(Finding::Truncated {
            expected: cp.size,
            found: last,
        });
    }
    match by_seq.get(&cp.size) {
        Some(h) if *h == cp.head => None,
        _ => Some(Finding::CheckpointMismatch { size: cp.size }),
    }
}

/// Walks `entries`, the first of which should have `seq` = `first_seq` and `prev` = `anchor`;
/// returns the first problem (rules 1 to 7 of the module documentation).
pub(crate) fn walk(entries: &[Entry], first_seq: u64, anchor: [u8; 32]) -> Option<Finding> {
    let mut by_hash: HashMap<[u8; 32], usize> = HashMap::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        by_hash.entry(e.hash).or_insert(i);
    }
    for (i, e) in entries.iter().enumerate() {
        let previous = i.checked_sub(1).and_then(|p| entries.get(p));
        let (expected, link) = match previous {
            None => (first_seq, anchor),
            Some(p) => match p.seq.checked_add(1) {
                Some(s) => (s, p.hash),
                None => return Some(Finding::Inserted { seq: e.seq }),
            },
        };
        // Rules 1 and 2.
        if e.seq < expected {
            return Some(match previous {
                Some(p) if p.seq != e.seq => Finding::Reordered { seq: e.seq },
                _ => Finding::Inserted { seq: e.seq },
            });
        }
        if e.seq > expected {
            return Some(
                if entries[i + 1..].iter().any(|later| later.seq == expected) {
                    Finding::Reordered { seq: e.seq }
                } else {
                    Finding::Deleted { seq: expected }
                },
            );
        }
        // Rule 3.
        if e.prev == link {
            if e.hash_ok() {
                continue;
            }
            return Some(Finding::Changed { seq: e.seq });
        }
        // Rules 4 and 5. Positions: 0 is the anchor, entry i is at position i + 1.
        let pos = if e.prev == anchor {
            Some(0)
        } else {
            by_hash.get(&e.prev).map(|&j| j + 1)
        };
        match pos {
            Some(p) if p > i + 1 => return Some(Finding::Reordered { seq: e.seq }),
            Some(p) if p < i => {
                return Some(Finding::Inserted {
                    seq: entries[p].seq,
                });
            }
            _ => {}
        }
        if entries.get(i + 1).is_some_and(|next| next.prev == link) {
            return Some(Finding::Inserted { seq: e.seq });
        }
        // Rules 6 and 7.
        if !e.hash_ok() {
            return Some(if renumbered_down(e) {
                Finding::Deleted { seq: e.seq }
            } else {
                Finding::Changed { seq: e.seq }
            });
        }
        return Some(Finding::Changed {
            seq: previous.map_or(e.seq, |p| p.seq),
        });
    }
    None
}

/// Whether `e` hashes correctly under a slightly higher `seq`.
fn renumbered_down(e: &Entry) -> bool {
    let mut moved = e.clone();
    (1..=MAX_RENUMBER).any(|d| {
        e.seq.checked_add(d).is_some_and(|s| {
            moved.seq = s;
            moved.hash_ok()
        })
    })
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use time::macros::datetime;

    use super::*;
    use crate::entry::{Actor, NewEntry, Outcome};
    use crate::key::AuditKey;

    const ORIGIN: &str = "gridward.test/audit";

    fn chain(n: u64) -> Vec<Entry> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let e = Entry::seal(
                    seq,
                    &NewEntry::new(
                        datetime!(2026-03-01 12:00 UTC) + Duration::seconds(seq as i64),
                        Actor::User(format!("u{seq}")),
                        "user.add",
                        format!("t{seq}"),
                        Outcome::Success,
                    ),
                    prev,
                )
                .unwrap();
                prev = e.hash;
                e
            })
            .collect()
    }

    fn reseal(e: &mut Entry) {
        e.hash = e.compute_hash().unwrap();
    }

    fn check(entries: &[Entry]) -> Option<Finding> {
        walk(entries, 1, GENESIS)
    }

    #[test]
    fn an_intact_chain_passes() {
        assert_eq!(check(&chain(10)), None);
        assert_eq!(check(&[]), None);
    }

    #[test]
    fn changed_entries() {
        let mut c = chain(10);
        c[4].target = "evil".into();
        assert_eq!(check(&c), Some(Finding::Changed { seq: 5 }));
        reseal(&mut c[4]);
        assert_eq!(check(&c), Some(Finding::Changed { seq: 5 }));
        let mut c = chain(10);
        c[0].prev = [1; 32];
        assert_eq!(check(&c), Some(Finding::Changed { seq: 1 }));
        reseal(&mut c[0]);
        assert_eq!(check(&c), Some(Finding::Changed { seq: 1 }));
        let mut c = chain(10);
        c[9].detail = "x".into();
        assert_eq!(check(&c), Some(Finding::Changed { seq: 10 }));
        let mut c = chain(10);
        c[3].hash = [7; 32];
        assert_eq!(check(&c), Some(Finding::Changed { seq: 4 }));
    }

    #[test]
    fn deleted_entries() {
        let mut c = chain(10);
        c.remove(4);
        assert_eq!(check(&c), Some(Finding::Deleted { seq: 5 }));
        let mut c = chain(10);
        c.drain(3..6);
        assert_eq!(check(&c), Some(Finding::Deleted { seq: 4 }));
        let mut c = chain(10);
        c.remove(0);
        assert_eq!(check(&c), Some(Finding::Deleted { seq: 1 }));
        // Renumbered to close the gap.
        let mut c = chain(10);
        c.drain(3..5);
        for e in &mut c[3..] {
            e.seq -= 2;
        }
        assert_eq!(check(&c), Some(Finding::Deleted { seq: 4 }));
    }

    #[test]
    fn inserted_entries() {
        // Renumbered to make room, forged with a correct prev and hash.
        let mut c = chain(10);
        let mut forged = c[4].clone();
        forged.seq = 6;
        forged.target = "forged".into();
        forged.prev = c[4].hash;
        reseal(&mut forged);
        for e in &mut c[5..] {
            e.seq += 1;
        }
        c.insert(5, forged.clone());
        assert_eq!(check(&c), Some(Finding::Inserted { seq: 6 }));
        // With a made-up prev.
        let mut c2 = c.clone();
        c2[5].prev = [9; 32];
        reseal(&mut c2[5]);
        assert_eq!(check(&c2), Some(Finding::Inserted { seq: 6 }));
        // Before the first entry, under seq 0.
        let mut c3 = chain(3);
        let mut first = c3[0].clone();
        first.seq = 0;
        c3.insert(0, first);
        assert_eq!(check(&c3), Some(Finding::Inserted { seq: 0 }));
        // The same seq twice.
        let mut c4 = chain(5);
        let dup = c4[2].clone();
        c4.insert(3, dup);
        assert_eq!(check(&c4), Some(Finding::Inserted { seq: 3 }));
        // Two forged entries at the start, chained to each other, renumbered.
        let mut c5 = chain(5);
        let mut a = c5[0].clone();
        a.target = "a".into();
        reseal(&mut a);
        let mut b = c5[0].clone();
        b.seq = 2;
        b.prev = a.hash;
        reseal(&mut b);
        for e in &mut c5 {
            e.seq += 2;
        }
        c5.insert(0, b);
        c5.insert(0, a);
        assert_eq!(check(&c5), Some(Finding::Inserted { seq: 1 }));
    }

    #[test]
    fn reordered_entries() {
        let mut c = chain(10);
        c.swap(4, 5);
        let (a, b) = (c[4].seq, c[5].seq);
        c[4].seq = b;
        c[5].seq = a;
        assert_eq!(check(&c), Some(Finding::Reordered { seq: 5 }));
        let mut c = chain(10);
        c.swap(2, 8);
        c[2].seq = 3;
        c[8].seq = 9;
        assert_eq!(check(&c), Some(Finding::Reordered { seq: 3 }));
        // Out of order in the slice itself.
        let mut c = chain(5);
        c.swap(1, 2);
        assert_eq!(check(&c), Some(Finding::Reordered { seq: 3 }));
    }

    #[test]
    fn checkpoints_catch_truncation_and_rewrites() {
        let key = AuditKey::generate().unwrap();
        let v = key.verifier(ORIGIN).unwrap();
        let c = chain(10);
        let cp = |e: &Entry| {
            Checkpoint {
                origin: ORIGIN.into(),
                size: e.seq,
                head: e.hash,
                time: datetime!(2026-03-02 0:00 UTC),
            }
            .sign(&key)
            .unwrap()
        };
        let notes = vec![cp(&c[4]), cp(&c[9])];
        let r = verify(&c, &notes, &v);
        assert_eq!(
            r,
            Report {
                entries_checked: 10,
                checkpoints_checked: 2,
                covered: 10,
                finding: None
            }
        );
        assert!(r.to_string().starts_with("ok: 10 entries"));

        assert_eq!(
            verify(&c[..7], &notes, &v).finding,
            Some(Finding::Truncated {
                expected: 10,
                found: 7
            })
        );
        assert_eq!(
            verify(&[], &notes, &v).finding,
            Some(Finding::Truncated {
                expected: 5,
                found: 0
            })
        );

        // Rewrite from entry 3 on, consistently.
        let mut w = c.clone();
        w[2].target = "rewritten".into();
        let mut prev = w[1].hash;
        for e in &mut w[2..] {
            e.prev = prev;
            reseal(e);
            prev = e.hash;
        }
        assert_eq!(check(&w), None);
        assert_eq!(
            verify(&w, &notes, &v).finding,
            Some(Finding::CheckpointMismatch { size: 5 })
        );

        // A chain finding before the checkpoint mismatch wins.
        let mut x = w.clone();
        x[1].detail = "x".into();
        assert_eq!(
            verify(&x, &notes, &v).finding,
            Some(Finding::Changed { seq: 2 })
        );

        // A forged checkpoint is named first.
        let mut forged = notes.clone();
        forged[1] = forged[1].replacen("\n10\n", "\n9\n", 1);
        let r = verify(&x, &forged, &v);
        assert_eq!(
            r.finding,
            Some(Finding::BadCheckpoint {
                index: 2,
                error: CheckpointError::BadSignature { key: ORIGIN.into() }
            })
        );
        assert!(
            r.to_string()
                .contains("stored checkpoint 2 does not verify")
        );

        // The wrong verifier key.
        let other = AuditKey::generate().unwrap().verifier(ORIGIN).unwrap();
        assert!(matches!(
            verify(&c, &notes, &other).finding,
            Some(Finding::BadCheckpoint {
                index: 1,
                error: CheckpointError::UnknownKey { .. }
            })
        ));
    }

    #[test]
    fn findings_read_well() {
        let text = Finding::Changed { seq: 17 }.to_string();
        assert!(text.starts_with("entry 17 was changed: "), "{text}");
        assert!(text.contains("backup"));
        assert!(
            Finding::Truncated {
                expected: 20,
                found: 17
            }
            .to_string()
            .contains("entries 18 to 20 were deleted")
        );
    }
}
