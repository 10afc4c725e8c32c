//! The fleet's persisted counter marks and device state: one state file per fleet, rewritten
//! atomically.
//!
//! ```text
//! STATE/counters     "gridward-meter counters v2", then one line per meter:
//!                    "{meter id} {mark}" and, once a command changed the device, " key=value"
//!                    fields (below); a v1 file (header "... v1", no fields) is still read
//! STATE/counters.tmp the next version while it is written (temp file, fsync, rename, fsync dir)
//! STATE/.lock        held (advisory lock) while a fleet uses the directory
//! ```
//!
//! Device fields ([`DeviceRecord`]): `cmd=` the counter of the last command verified (only ever
//! raised), `open=` the Unix time the relay was opened (absent: closed), `withheld=` and
//! `floor=` kWh (the register's correction for the time the relay was open), `interval=`
//! seconds, `tariff=`, `slot=A|B` the running firmware slot, `a=` / `b=` the slots' contents as
//! `{vendor}/{class}/{version}/{sequence}`. An unknown or repeated field refuses to open.
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
use gridward_core::firmware::Installed;

use crate::firmware::Slot;

/// The first line of a counters file.
const HEADER: &str = "gridward-meter counters v2";

/// The first line of a counters file written before device state was kept (still read).
const HEADER_V1: &str = "gridward-meter counters v1";

/// The device state of one meter that survives a restart: what commands changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceRecord {
    /// The counter of the last command verified.
    pub last_command: Option<u64>,
    /// When the relay was opened (Unix seconds), if it is open.
    pub relay_open_since: Option<i64>,
    /// kWh the load profile counted while the relay was open.
    pub withheld_kwh: f64,
    /// The register reads at least this (kWh).
    pub floor_kwh: f64,
    /// The reporting interval set by a command, in seconds.
    pub interval_secs: Option<u32>,
    /// The tariff set by a command.
    pub tariff: Option<String>,
    /// The running firmware slot.
    pub active_slot: Slot,
    /// The contents of slots A and B.
    pub slots: [Option<Installed>; 2],
}

impl DeviceRecord {
    fn write(&self, out: &mut String) {
        use std::fmt::Write as _;
        if let Some(c) = self.last_command {
            let _ = write!(out, " cmd={c}");
        }
        if let Some(t) = self.relay_open_since {
            let _ = write!(out, " open={t}");
        }
        if self.withheld_kwh != 0.0 {
            let _ = write!(out, " withheld={}", self.withheld_kwh);
        }
        if self.floor_kwh != 0.0 {
            let _ = write!(out, " floor={}", self.floor_kwh);
        }
        if let Some(i) = self.interval_secs {
            let _ = write!(out, " interval={i}");
        }
        if let Some(t) = &self.tariff {
            let _ = write!(out, " tariff={t}");
        }
        let _ = write!(out, " slot={}", self.active_slot);
        for (name, slot) in [("a", &self.slots[0]), ("b", &self.slots[1])] {
            if let Some(fw) = slot {
                let _ = write!(
                    out,
                    " {name}={}/{}/{}/{}",
                    fw.vendor_id, fw.class_id, fw.version, fw.sequence
                );
            }
        }
    }

    fn parse_field(&mut self, key: &str, value: &str) -> Result<(), String> {
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("bad {key}= value {v:?}"))
        };
        let kwh = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("bad {key}= value {v:?}"))
        };
        match key {
            "cmd" => self.last_command = Some(num(value)?),
            "open" => {
                self.relay_open_since = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| format!("bad open= value {value:?}"))?,
                );
            }
            "withheld" => self.withheld_kwh = kwh(value)?,
            "floor" => self.floor_kwh = kwh(value)?,
            "interval" => {
                self.interval_secs = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| format!("bad interval= value {value:?}"))?,
                );
            }
            "tariff" if !value.is_empty() => self.tariff = Some(value.to_owned()),
            "slot" => {
                self.active_slot = match value {
                    "A" => Slot::A,
                    "B" => Slot::B,
                    _ => return Err(format!("bad slot= value {value:?} (A or B)")),
                };
            }
            "a" | "b" => {
                let parts: Vec<&str> = value.split('/').collect();
                let [vendor, class, version, sequence] = parts[..] else {
                    return Err(format!(
                        "bad {key}= value {value:?} (vendor/class/version/sequence)"
                    ));
                };
                if [vendor, class, version].iter().any(|p| p.is_empty()) {
                    return Err(format!("bad {key}= value {value:?} (an empty part)"));
                }
                let fw = Installed {
                    vendor_id: vendor.to_owned(),
                    class_id: class.to_owned(),
                    version: version.to_owned(),
                    sequence: num(sequence)?,
                };
                self.slots[usize::from(key == "b")] = Some(fw);
            }
            _ => return Err(format!("unknown field {key:?}")),
        }
        Ok(())
    }
}

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
    devices: BTreeMap<MeterId, DeviceRecord>,
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
        let (marks, devices) = match fs::read_to_string(&path) {
            Ok(text) => parse(&path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (BTreeMap::new(), BTreeMap::new()),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
            marks,
            devices,
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

    /// The persisted device state of `meter`, if a command ever changed it.
    pub fn device(&self, meter: &MeterId) -> Option<&DeviceRecord> {
        self.devices.get(meter)
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
        self.persist_all(updates, std::iter::empty())
    }

    /// Raises marks as [`persist`](Self::persist) does and replaces the device state of the
    /// meters in `devices` (a record's command counter is never lowered), in one durable
    /// rewrite. Nothing is written if nothing changes.
    pub fn persist_all<'a>(
        &mut self,
        marks: impl IntoIterator<Item = (&'a MeterId, u64)>,
        devices: impl IntoIterator<Item = (&'a MeterId, &'a DeviceRecord)>,
    ) -> Result<(), StateError> {
        let mut changed = false;
        for (id, mark) in marks {
            let entry = self.marks.entry(id.clone()).or_insert(0);
            if mark > *entry {
                *entry = mark;
                changed = true;
            }
        }
        for (id, record) in devices {
            let mut record = record.clone();
            let old = self.devices.get(id);
            record.last_command = record.last_command.max(old.and_then(|o| o.last_command));
            if old != Some(&record) {
                self.marks.entry(id.clone()).or_insert(0);
                self.devices.insert(id.clone(), record);
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
            if let Some(d) = self.devices.get(id) {
                d.write(&mut text);
            }
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

type Parsed = (BTreeMap<MeterId, u64>, BTreeMap<MeterId, DeviceRecord>);

fn parse(path: &Path, text: &str) -> Result<Parsed, StateError> {
    let corrupt = |line: usize, reason: String| StateError::Corrupt {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut lines = text.lines();
    let v2 = match lines.next() {
        Some(HEADER) => true,
        Some(HEADER_V1) => false,
        _ => {
            return Err(corrupt(
                1,
                format!("expected the header {HEADER:?} (or {HEADER_V1:?})"),
            ));
        }
    };
    if !text.ends_with('\n') {
        return Err(corrupt(
            text.lines().count(),
            "the file is truncated (no final newline)".into(),
        ));
    }
    let mut marks = BTreeMap::new();
    let mut devices = BTreeMap::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let mut words = line.split(' ');
        let (Some(id), Some(mark)) = (words.next(), words.next()) else {
            return Err(corrupt(n, "expected \"{meter id} {mark}\"".into()));
        };
        let id = MeterId::new(id).map_err(|e| corrupt(n, format!("bad meter id: {e}")))?;
        let mark: u64 = mark
            .parse()
            .map_err(|_| corrupt(n, format!("bad mark {mark:?}")))?;
        let fields: Vec<&str> = words.collect();
        if !fields.is_empty() {
            if !v2 {
                return Err(corrupt(n, "a v1 file has no device fields".into()));
            }
            let mut record = DeviceRecord::default();
            let mut seen = std::collections::BTreeSet::new();
            for f in fields {
                let (k, v) = f
                    .split_once('=')
                    .ok_or_else(|| corrupt(n, format!("expected key=value, found {f:?}")))?;
                if !seen.insert(k) {
                    return Err(corrupt(n, format!("field {k:?} repeated")));
                }
                record.parse_field(k, v).map_err(|r| corrupt(n, r))?;
            }
            devices.insert(id.clone(), record);
        }
        if marks.insert(id, mark).is_some() {
            return Err(corrupt(n, "duplicate meter id".into()));
        }
    }
    Ok((marks, devices))
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

    fn record() -> DeviceRecord {
        DeviceRecord {
            last_command: Some(42),
            relay_open_since: Some(1_741_586_400),
            withheld_kwh: 1.25,
            floor_kwh: 1_234.567_890_123,
            interval_secs: Some(900),
            tariff: Some("night".into()),
            active_slot: Slot::B,
            slots: [
                Some(Installed {
                    vendor_id: "gridward-sim".into(),
                    class_id: "sim-meter-1".into(),
                    version: "1.0.0".into(),
                    sequence: 0,
                }),
                Some(Installed {
                    vendor_id: "gridward-sim".into(),
                    class_id: "sim-meter-1".into(),
                    version: "1.5.0".into(),
                    sequence: 5,
                }),
            ],
        }
    }

    #[test]
    fn device_records_survive_reopen_and_the_command_counter_never_drops() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (id("A-000001"), id("A-000002"));
        let rec = record();
        {
            let mut s = CounterStore::open(dir.path()).unwrap();
            s.persist([(&a, 10), (&b, 20)]).unwrap();
            s.persist_all([], [(&a, &rec)]).unwrap();
            s.persist_all([], [(&a, &rec)]).unwrap(); // unchanged: not written
            assert_eq!(s.writes(), 2);
            let mut lower = rec.clone();
            lower.last_command = Some(3);
            lower.tariff = None;
            s.persist_all([], [(&a, &lower)]).unwrap();
            assert_eq!(s.device(&a).unwrap().last_command, Some(42));
            assert_eq!(s.device(&a).unwrap().tariff, None);
            s.persist_all([], [(&a, &rec)]).unwrap();
        }
        let text = fs::read_to_string(dir.path().join("counters")).unwrap();
        assert!(text.starts_with("gridward-meter counters v2\n"), "{text}");
        assert!(text.contains("A-000002 20\n"), "{text}");
        let s = CounterStore::open(dir.path()).unwrap();
        assert_eq!(s.device(&a), Some(&rec));
        assert_eq!(s.device(&b), None);
        assert_eq!((s.mark(&a), s.mark(&b)), (Some(10), Some(20)));
    }

    #[test]
    fn a_v1_file_is_read_and_rewritten_as_v2() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("counters"),
            "gridward-meter counters v1\nM1 1025\n",
        )
        .unwrap();
        let mut s = CounterStore::open(dir.path()).unwrap();
        assert_eq!(s.mark(&id("M1")), Some(1025));
        assert_eq!(s.device(&id("M1")), None);
        s.persist([(&id("M1"), 2049)]).unwrap();
        let text = fs::read_to_string(dir.path().join("counters")).unwrap();
        assert_eq!(text, "gridward-meter counters v2\nM1 2049\n");
    }

    #[test]
    fn corrupt_device_fields_refuse_to_open() {
        let cases = [
            "M1 1 cmd=x",
            "M1 1 cmd=1 cmd=2",
            "M1 1 colour=blue",
            "M1 1 slot=C",
            "M1 1 a=v/c/1.0.0",
            "M1 1 a=v//1.0.0/1",
            "M1 1 withheld=-1",
            "M1 1 floor=NaN",
            "M1 1 interval=0",
            "M1 1 open=soon",
            "M1 1 cmd",
        ];
        for line in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::write(
                dir.path().join("counters"),
                format!("gridward-meter counters v2\n{line}\n"),
            )
            .unwrap();
            assert!(
                matches!(
                    CounterStore::open(dir.path()),
                    Err(StateError::Corrupt { line: 2, .. })
                ),
                "{line}"
            );
        }
        // Device fields in a v1 file are not guessed at either.
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("counters"),
            "gridward-meter counters v1\nM1 1 cmd=3\n",
        )
        .unwrap();
        assert!(matches!(
            CounterStore::open(dir.path()),
            Err(StateError::Corrupt { line: 2, .. })
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
