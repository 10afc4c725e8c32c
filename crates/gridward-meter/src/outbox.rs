//! Unacknowledged messages kept on disk, so resending survives a crash of the meter process.
//!
//! One append-only file per fleet, next to the counters (`STATE/outbox`):
//!
//! ```text
//! S {meter} {counter} {topic} {envelope hex}    appended before the message is published
//! D {meter} {counter}                           appended when it is acknowledged (or refused)
//! ```
//!
//! On open, the entries with an `S` but no `D` are the messages to resend, and the file is
//! compacted to them. While running, the file is compacted again whenever it holds far more
//! records than unacknowledged messages.
//!
//! Appends are plain `write`s, not fsync'd: they survive a crash of the meter process
//! (`kill -9`), which is what the resend promise is about, but not necessarily a crash of the
//! operating system. The counters ([`crate::state`]) are fsync'd, so even then no counter is
//! reused; a message could only be lost, never duplicated under another counter.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use gridward_core::MeterId;

use crate::state::{CounterStore, StateError, write_atomically};

/// File name of the outbox inside the state directory.
const FILE: &str = "outbox";

/// Compaction happens when the file holds this many more records than there are live entries.
const COMPACT_SLACK: u64 = 8192;

/// A message that was (or is about to be) published and is not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The sending meter.
    pub meter: MeterId,
    /// The envelope's counter.
    pub counter: u64,
    /// The MQTT topic.
    pub topic: String,
    /// The signed envelope, byte for byte.
    pub envelope: Bytes,
}

/// The on-disk outbox of a fleet.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    file: File,
    live: HashMap<(MeterId, u64), (String, Bytes)>,
    records: u64,
}

impl Outbox {
    /// Opens the outbox in `store`'s directory (whose lock `store` holds) and returns the
    /// unacknowledged entries, in the order they were first recorded.
    pub fn open(store: &CounterStore) -> Result<(Self, Vec<OutboxEntry>), StateError> {
        let dir = store.dir().to_owned();
        let path = dir.join(FILE);
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StateError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        let live = entries
            .iter()
            .map(|e| {
                (
                    (e.meter.clone(), e.counter),
                    (e.topic.clone(), e.envelope.clone()),
                )
            })
            .collect();
        let outbox = Self {
            file: rewrite(&dir, &entries)?,
            dir,
            live,
            records: entries.len() as u64,
        };
        Ok((outbox, entries))
    }

    /// Number of unacknowledged entries.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether every recorded message has been acknowledged.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Records a message about to be published. Recording it again (a resend) is a no-op.
    pub fn record_sent(&mut self, e: &OutboxEntry) -> Result<(), StateError> {
        let key = (e.meter.clone(), e.counter);
        if self.live.contains_key(&key) {
            return Ok(());
        }
        let line = format!(
            "S {} {} {} {}\n",
            e.meter,
            e.counter,
            e.topic,
            hex::encode(&e.envelope)
        );
        self.append(&line)?;
        self.live.insert(key, (e.topic.clone(), e.envelope.clone()));
        Ok(())
    }

    /// Records that a message was acknowledged (or refused for good): it is not resent.
    pub fn record_done(&mut self, meter: &MeterId, counter: u64) -> Result<(), StateError> {
        if self.live.remove(&(meter.clone(), counter)).is_none() {
            return Ok(());
        }
        self.append(&format!("D {meter} {counter}\n"))?;
        if self.records > 2 * self.live.len() as u64 + COMPACT_SLACK {
            self.compact()?;
        }
        Ok(())
    }

    fn append(&mut self, line: &str) -> Result<(), StateError> {
        // One write per record, so a crash leaves at most a torn last line.
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| StateError::Io {
                action: "appending to",
                path: self.dir.join(FILE),
                source,
            })?;
        self.records += 1;
        Ok(())
    }

    fn compact(&mut self) -> Result<(), StateError> {
        let mut entries: Vec<OutboxEntry> = self
            .live
            .iter()
            .map(|((meter, counter), (topic, envelope))| OutboxEntry {
                meter: meter.clone(),
                counter: *counter,
                topic: topic.clone(),
                envelope: envelope.clone(),
            })
            .collect();
        entries.sort_by(|a, b| (&a.meter, a.counter).cmp(&(&b.meter, b.counter)));
        self.file = rewrite(&self.dir, &entries)?;
        self.records = entries.len() as u64;
        Ok(())
    }
}

/// Atomically replaces the outbox with `entries` and opens it for appending.
fn rewrite(dir: &Path, entries: &[OutboxEntry]) -> Result<File, StateError> {
    let mut text = String::new();
    for e in entries {
        text.push_str(&format!(
            "S {} {} {} {}\n",
            e.meter,
            e.counter,
            e.topic,
            hex::encode(&e.envelope)
        ));
    }
    write_atomically(dir, FILE, text.as_bytes())?;
    let path = dir.join(FILE);
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|source| StateError::Io {
            action: "opening",
            path,
            source,
        })
}

fn parse(path: &Path, text: &str) -> Result<Vec<OutboxEntry>, StateError> {
    let corrupt = |line: usize, reason: &str| StateError::Corrupt {
        path: path.to_owned(),
        line,
        reason: reason.to_owned(),
    };
    // A torn last line (no newline) was being appended when the process died: the message it
    // describes was never published, so it is dropped.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut order: Vec<(MeterId, u64)> = Vec::new();
    let mut live: HashMap<(MeterId, u64), (String, Bytes)> = HashMap::new();
    for (i, line) in complete.lines().enumerate() {
        let n = i + 1;
        let mut f = line.split(' ');
        let kind = f.next();
        let meter = f
            .next()
            .and_then(|s| MeterId::new(s).ok())
            .ok_or_else(|| corrupt(n, "bad meter id"))?;
        let counter: u64 = f
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(n, "bad counter"))?;
        match kind {
            Some("S") => {
                let topic = f.next().ok_or_else(|| corrupt(n, "missing topic"))?;
                let envelope = f
                    .next()
                    .and_then(|s| hex::decode(s).ok())
                    .ok_or_else(|| corrupt(n, "bad envelope hex"))?;
                if f.next().is_some() {
                    return Err(corrupt(n, "trailing fields"));
                }
                let key = (meter, counter);
                if !live.contains_key(&key) {
                    order.push(key.clone());
                }
                live.insert(key, (topic.to_owned(), Bytes::from(envelope)));
            }
            Some("D") => {
                if f.next().is_some() {
                    return Err(corrupt(n, "trailing fields"));
                }
                live.remove(&(meter, counter));
            }
            _ => return Err(corrupt(n, "unknown record kind")),
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|key| {
            let (topic, envelope) = live.remove(&key)?;
            Some(OutboxEntry {
                meter: key.0,
                counter: key.1,
                topic,
                envelope,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(m: &str, c: u64) -> OutboxEntry {
        OutboxEntry {
            meter: MeterId::new(m).unwrap(),
            counter: c,
            topic: format!("meters/{m}/readings"),
            envelope: Bytes::from(vec![0xd2, c as u8, 0xff]),
        }
    }

    #[test]
    fn unacknowledged_entries_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CounterStore::open(dir.path()).unwrap();
            let (mut ob, pending) = Outbox::open(&store).unwrap();
            assert!(pending.is_empty());
            for c in 1..=5 {
                ob.record_sent(&entry("M1", c)).unwrap();
            }
            ob.record_sent(&entry("M2", 9)).unwrap();
            ob.record_done(&MeterId::new("M1").unwrap(), 2).unwrap();
            ob.record_done(&MeterId::new("M1").unwrap(), 4).unwrap();
            ob.record_sent(&entry("M1", 3)).unwrap(); // a resend: not recorded twice
            assert_eq!(ob.len(), 4);
            // kill -9: no clean shutdown.
        }
        let store = CounterStore::open(dir.path()).unwrap();
        let (ob, pending) = Outbox::open(&store).unwrap();
        let keys: Vec<(String, u64)> = pending
            .iter()
            .map(|e| (e.meter.to_string(), e.counter))
            .collect();
        assert_eq!(
            keys,
            [
                ("M1".into(), 1),
                ("M1".into(), 3),
                ("M1".into(), 5),
                ("M2".into(), 9)
            ]
        );
        assert_eq!(pending[1], entry("M1", 3));
        assert_eq!(ob.len(), 4);
        // Compacted on open.
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 4);
    }

    #[test]
    fn torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            "S M1 1 meters/M1/readings d201\nS M1 2 meters/M1/rea",
        )
        .unwrap();
        let store = CounterStore::open(dir.path()).unwrap();
        let (_, pending) = Outbox::open(&store).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].envelope.as_ref(), [0xd2, 0x01]);
    }

    #[test]
    fn corrupt_lines_are_refused() {
        let cases = [
            ("X M1 1\n", "unknown record kind"),
            ("S M/1 1 t 00\n", "bad meter id"),
            ("S M1 one t 00\n", "bad counter"),
            ("S M1 1 t zz\n", "bad envelope hex"),
            ("S M1 1\n", "missing topic"),
            ("D M1 1 extra\n", "trailing fields"),
        ];
        for (text, why) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(FILE), text).unwrap();
            let store = CounterStore::open(dir.path()).unwrap();
            match Outbox::open(&store) {
                Err(StateError::Corrupt {
                    line: 1, reason, ..
                }) => assert_eq!(reason, why),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn file_is_compacted_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let store = CounterStore::open(dir.path()).unwrap();
        let (mut ob, _) = Outbox::open(&store).unwrap();
        let m = MeterId::new("M1").unwrap();
        ob.record_sent(&entry("M1", 0)).unwrap(); // stays unacknowledged
        for c in 1..=10_000 {
            ob.record_sent(&entry("M1", c)).unwrap();
            ob.record_done(&m, c).unwrap();
        }
        let lines = std::fs::read_to_string(dir.path().join(FILE))
            .unwrap()
            .lines()
            .count() as u64;
        assert!(lines <= COMPACT_SLACK + 3, "{lines}");
        drop(ob);
        let (_, pending) = Outbox::open(&store).unwrap();
        assert_eq!(pending, [entry("M1", 0)]);
    }
}
