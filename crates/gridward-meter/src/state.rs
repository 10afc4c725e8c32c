//! The fleet's persisted counter marks: one state file per fleet, rewritten atomically.
//!
//! ```text
//! STATE/counters     "gridward-meter counters v1", then one "{meter id} {mark}" line per meter
//! STATE/counters.tmp the next version while it is written (temp file, fsync, rename, fsync dir)
//! STATE/.lock        held (advisory lock) while a fleet uses the directory
//! ```
//!
//! Why one file per fleet rather than one per meter: a fleet reserves counter blocks for many
//! meters at once (at start-up for all of them), and one atomic rewrite of a 10,000-line file
//! costs one fsync, where 10,000 files cost 10,000. Every reservation is batched into the same
//! rewrite, so the number of fsyncs grows with blocks used, not with meters or messages.
//!
//! A mark is only ever raised. A state file that cannot be read refuses to open: reusing a counter
//! is the one thing a meter must never do, so guessing is not an option.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use gridward_core::MeterId;

/// The first line of a counters file.
const HEADER: &str = "gridward-meter counters v1";

/// Why the counter state could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Reading, writing or syncing a state file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process holds the state directory.
    #[error("state directory {0} is in use by another process (lock held on .lock)")]
    Locked(PathBuf),
    /// The counters file is not in the expected format; nothing is guessed.
    #[error(
        "counters file {path} line {line}: {reason}; refusing to start (a counter must never be reused)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The persisted high-water marks of every meter that ever used this state directory.
#[derive(Debug)]
pub struct CounterStore {
    dir: PathBuf,
    _lock: File,
    marks: BTreeMap<MeterId, u64>,
    writes: u64,
}

impl CounterStore {
    /// Opens (creating if needed) the state directory `dir`, locks it, and reads the marks.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let lock_path = dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StateError::Locked(dir.to_owned())),
            Err(TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
        }
        let path = dir.join("counters");
        let marks = match fs::read_to_string(&path) {
            Ok(text) => parse(&path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
            marks,
            writes: 0,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The persisted mark of `meter`: the first counter it may use after a restart.
    pub fn mark(&self, meter: &MeterId) -> Option<u64> {
        self.marks.get(meter).copied()
    }

    /// How many times the counters file was rewritten since [`open`](Self::open).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Raises the marks of `updates` (a mark is never lowered) and durably rewrites the file:
    /// when this returns `Ok`, every counter below the new marks may be used.
    /// Nothing is written if no mark rises.
    pub fn persist<'a>(
        &mut self,
        updates: impl IntoIterator<Item = (&'a MeterId, u64)>,
    ) -> Result<(), StateError> {
        let mut changed = false;
        for (id, mark) in updates {
            let entry = self.marks.entry(id.clone()).or_insert(0);
            if mark > *entry {
                *entry = mark;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        let mut text = String::with_capacity(HEADER.len() + 1 + self.marks.len() * 24);
        text.push_str(HEADER);
        text.push('\n');
        for (id, mark) in &self.marks {
            text.push_str(id.as_str());
            text.push(' ');
            text.push_str(&mark.to_string());
            text.push('\n');
        }
        write_atomically(&self.dir, "counters", text.as_bytes())?;
        self.writes += 1;
        Ok(())
    }
}

/// Writes `dir/name` atomically and durably: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))?;
    Ok(())
}

fn parse(path: &Path, text: &str) -> Result<BTreeMap<MeterId, u64>, StateError> {
    let corrupt = |line: usize, reason: String| StateError::Corrupt {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(corrupt(1, format!("expected the header {HEADER:?}")));
    }
    if !text.ends_with('\n') {
        return Err(corrupt(
            text.lines().count(),
            "the file is truncated (no final newline)".into(),
        ));
    }
    let mut marks = BTreeMap::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let (id, mark) = line
            .split_once(' ')
            .ok_or_else(|| corrupt(n, "expected \"{meter id} {mark}\"".into()))?;
        let id = MeterId::new(id).map_err(|e| corrupt(n, format!("bad meter id: {e}")))?;
        let mark: u64 = mark
            .parse()
            .map_err(|_| corrupt(n, format!("bad mark {mark:?}")))?;
        if marks.insert(id, mark).is_some() {
            return Err(corrupt(n, "duplicate meter id".into()));
        }
    }
    Ok(marks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::counter::CounterBlock;

    fn id(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    #[test]
    fn marks_survive_reopen_and_only_rise() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (id("A-000001"), id("A-000002"));
        {
            let mut s = CounterStore::open(dir.path()).unwrap();
            assert_eq!(s.mark(&a), None);
            s.persist([(&a, 1025), (&b, 2049)]).unwrap();
            s.persist([(&a, 10)]).unwrap(); // lower: ignored, not written
            assert_eq!(s.writes(), 1);
        }
        let s = CounterStore::open(dir.path()).unwrap();
        assert_eq!((s.mark(&a), s.mark(&b)), (Some(1025), Some(2049)));
        assert!(!dir.path().join("counters.tmp").exists());
    }

    #[test]
    fn a_second_process_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let _s = CounterStore::open(dir.path()).unwrap();
        assert!(matches!(
            CounterStore::open(dir.path()),
            Err(StateError::Locked(_))
        ));
    }

    /// Simulates many crashes: after each, the meter resumes from the persisted mark, uses part
    /// of its block, and "crashes" again (the store is dropped without any final write).
    #[test]
    fn counters_are_never_reused_across_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let m = id("M1");
        let mut used = std::collections::BTreeSet::new();
        for crash in 0..50u64 {
            let mut store = CounterStore::open(dir.path()).unwrap();
            let mut block = CounterBlock::resume(store.mark(&m));
            // Use a varying number of counters, reserving blocks of 8 as a fleet would.
            for _ in 0..(crash * 7 % 23) {
                if block.wants_reservation(8) {
                    store.persist([(&m, block.reservation(8))]).unwrap();
                    block.granted(store.mark(&m).unwrap());
                }
                let c = block.take().unwrap();
                assert!(used.insert(c), "counter {c} reused after crash {crash}");
            }
            // Crash: in-memory state is lost.
        }
        assert!(used.len() > 400);
    }

    #[test]
    fn corrupt_files_refuse_to_open() {
        let cases: [(&str, usize); 6] = [
            ("", 1),
            ("something else\n", 1),
            ("gridward-meter counters v1\nM1 12", 2),
            ("gridward-meter counters v1\nM1\n", 2),
            ("gridward-meter counters v1\nM1 x\n", 2),
            ("gridward-meter counters v1\nM1 1\nM/2 3\n", 3),
        ];
        for (text, line) in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("counters"), text).unwrap();
            match CounterStore::open(dir.path()) {
                Err(StateError::Corrupt { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("counters"),
            "gridward-meter counters v1\nM1 1\nM1 2\n",
        )
        .unwrap();
        assert!(matches!(
            CounterStore::open(dir.path()),
            Err(StateError::Corrupt { line: 3, ref reason, .. }) if reason == "duplicate meter id"
        ));
    }

    #[test]
    fn empty_state_file_with_header_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("counters"), "gridward-meter counters v1\n").unwrap();
        let s = CounterStore::open(dir.path()).unwrap();
        assert_eq!(s.mark(&id("X")), None);
    }
}
