//! The operation log: `DIR/log.jsonl`, append-only, one JSON object per line, hash-chained.
//!
//! Every line carries `prev`, the SHA-256 (hex) of the previous line's bytes (without its newline;
//! 64 zeros for the first line), and `seq`, its 1-based line number.
//! Editing or deleting a line breaks the chain at the next line; the inventory records the number
//! and hash of the last line written, so cutting lines off the end is detected too.
//! The file is opened with `O_APPEND` and each operation's lines are written in one `write`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::PkiError;
use crate::fsutil::PUBLIC_MODE;

/// `prev` of the first line.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogAction {
    /// CA creation (one line per CA certificate).
    Init,
    /// A leaf issued with a generated key (or superseded by one).
    Issue,
    /// A leaf certified from a CSR (or superseded by one).
    SignCsr,
    /// A revocation.
    Revoke,
    /// A renewal (one line for the old certificate, one for the new).
    Renew,
    /// A CRL written.
    Crl,
    /// A PKCS#12 export.
    Export,
    /// A PKCS#12 import.
    Import,
}

impl LogAction {
    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Issue => "issue",
            Self::SignCsr => "sign-csr",
            Self::Revoke => "revoke",
            Self::Renew => "renew",
            Self::Crl => "crl",
            Self::Export => "export",
            Self::Import => "import",
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// 1-based line number.
    pub seq: u64,
    /// When (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Who.
    pub actor: String,
    /// What.
    pub action: LogAction,
    /// Kind of certificate concerned (`meter`, `server`, `client`, `root-ca`, `issuing-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Identity concerned (meter id, name, CA name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Serial (hex) of the certificate concerned, or CRL number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// SHA-256 (hex) of the certificate's (or CRL's) DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Revocation reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Free text: what else happened ("superseded by ...", file names ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// SHA-256 (hex) of the previous line.
    pub prev: String,
}

/// A log line to be written; `seq` and `prev` are filled in on append.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Draft {
    pub(crate) kind: Option<String>,
    pub(crate) identity: Option<String>,
    pub(crate) serial: Option<String>,
    pub(crate) fingerprint: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) detail: Option<String>,
}

/// A draft with its action, actor and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingRecord {
    pub(crate) time: OffsetDateTime,
    pub(crate) actor: String,
    pub(crate) action: LogAction,
    pub(crate) draft: Draft,
}

/// The last line written, as recorded in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHead {
    /// Number of lines.
    pub lines: u64,
    /// SHA-256 (hex) of the last line.
    pub hash: String,
}

/// Whether the chain holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum ChainStatus {
    /// Every line chains to the one before, and the last line is the one the inventory recorded.
    Intact,
    /// The chain is broken: lines were edited, removed, reordered or cut off.
    Broken {
        /// The first line (1-based) where the break shows.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

/// One verified line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// 1-based line number in the file.
    pub line: u64,
    /// The record.
    #[serde(flatten)]
    pub record: LogRecord,
    /// Whether this line chains correctly to the previous one.
    pub chain_ok: bool,
}

/// The whole log, verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReport {
    /// Every line that parses as a record.
    pub entries: Vec<LogEntry>,
    /// Number of lines in the file.
    pub lines: u64,
    /// The verdict on the chain.
    pub status: ChainStatus,
}

/// SHA-256 (hex) of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Appends `records` to the log at `path` in one write, chained to the current last line.
/// Returns the new head.
pub(crate) fn append(
    path: &Path,
    records: Vec<PendingRecord>,
) -> Result<Option<LogHead>, PkiError> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(PUBLIC_MODE)
        .open(path)
        .map_err(PkiError::io("opening", path))?;
    let (last_line, ends_with_newline) =
        last_line(&mut file).map_err(PkiError::io("reading", path))?;
    let (mut seq, mut prev) = match &last_line {
        None => (0, GENESIS_HASH.to_owned()),
        Some(line) => {
            let seq = serde_json::from_slice::<LogRecord>(line)
                .map(|r| r.seq)
                .or_else(|_| count_lines(path))?;
            (seq, sha256_hex(line))
        }
    };
    if records.is_empty() {
        return Ok(last_line.map(|_| LogHead {
            lines: seq,
            hash: prev,
        }));
    }
    let mut out = Vec::new();
    if !ends_with_newline {
        // A previous write was cut short: end that line so ours start cleanly (the torn line will
        // show as a break when the log is verified).
        out.push(b'\n');
    }
    for r in records {
        seq += 1;
        let rec = LogRecord {
            seq,
            time: r.time,
            actor: r.actor,
            action: r.action,
            kind: r.draft.kind,
            identity: r.draft.identity,
            serial: r.draft.serial,
            fingerprint: r.draft.fingerprint,
            reason: r.draft.reason,
            detail: r.draft.detail,
            prev: prev.clone(),
        };
        let line = serde_json::to_vec(&rec)
            .map_err(|e| PkiError::bad_file(path, format!("encoding log line: {e}")))?;
        prev = sha256_hex(&line);
        out.extend_from_slice(&line);
        out.push(b'\n');
    }
    file.write_all(&out)
        .map_err(PkiError::io("appending to", path))?;
    file.sync_data().map_err(PkiError::io("syncing", path))?;
    Ok(Some(LogHead {
        lines: seq,
        hash: prev,
    }))
}

/// Number of lines of the file at `path` (used only when the last line does not parse).
fn count_lines(path: &Path) -> Result<u64, PkiError> {
    let bytes = std::fs::read(path).map_err(PkiError::io("reading", path))?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64)
}

/// The last non-empty line of `file` (without newline) and whether the file ends with a newline.
/// Reads backwards from the end in growing windows, so appending stays cheap on a long log.
fn last_line(file: &mut File) -> io::Result<(Option<Vec<u8>>, bool)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((None, true));
    }
    let mut window: u64 = 8 * 1024;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        let ends_with_newline = buf.last() == Some(&b'\n');
        let trimmed = buf.strip_suffix(b"\n").unwrap_or(&buf);
        match trimmed.iter().rposition(|b| *b == b'\n') {
            Some(pos) => return Ok((Some(trimmed[pos + 1..].to_vec()), ends_with_newline)),
            None if start == 0 => {
                return Ok((
                    (!trimmed.is_empty()).then(|| trimmed.to_vec()),
                    ends_with_newline,
                ));
            }
            None => window = window.saturating_mul(4),
        }
    }
}

/// Reads and verifies the whole log at `path` against the `head` recorded in the inventory.
pub(crate) fn verify(path: &Path, head: Option<&LogHead>) -> Result<LogReport, PkiError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(PkiError::Io {
                action: "reading",
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let mut entries = Vec::new();
    let mut status = ChainStatus::Intact;
    let mut prev = GENESIS_HASH.to_owned();
    let mut hashes = Vec::new();
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let lines: Vec<&[u8]> = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|b| *b == b'\n').collect()
    };
    fn broken(status: &mut ChainStatus, line: u64, reason: String) {
        if *status == ChainStatus::Intact {
            *status = ChainStatus::Broken { line, reason };
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let n = i as u64 + 1;
        let hash = sha256_hex(line);
        match serde_json::from_slice::<LogRecord>(line) {
            Ok(record) => {
                let mut ok = true;
                if record.prev != prev {
                    ok = false;
                    broken(
                        &mut status,
                        n,
                        format!(
                            "line {n} does not chain to line {}: a line was edited, removed or inserted",
                            n - 1
                        ),
                    );
                }
                if record.seq != n {
                    ok = false;
                    broken(
                        &mut status,
                        n,
                        format!("line {n} carries sequence number {}", record.seq),
                    );
                }
                entries.push(LogEntry {
                    line: n,
                    record,
                    chain_ok: ok,
                });
            }
            Err(e) => broken(&mut status, n, format!("line {n} is not a log record: {e}")),
        }
        prev = hash.clone();
        hashes.push(hash);
    }
    if let Some(head) = head {
        let total = lines.len() as u64;
        if head.lines > total {
            broken(
                &mut status,
                total + 1,
                format!(
                    "the log has {total} lines but the inventory recorded {}: lines were cut off the end",
                    head.lines
                ),
            );
        } else if head.lines > 0 {
            let recorded = usize::try_from(head.lines - 1)
                .ok()
                .and_then(|i| hashes.get(i));
            if recorded != Some(&head.hash) {
                broken(
                    &mut status,
                    head.lines,
                    format!(
                        "line {} is not the line the inventory recorded as the log's head",
                        head.lines
                    ),
                );
            }
        }
    }
    Ok(LogReport {
        entries,
        lines: lines.len() as u64,
        status,
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn rec(action: LogAction, serial: &str) -> PendingRecord {
        PendingRecord {
            time: datetime!(2025-01-01 0:00 UTC),
            actor: "t".into(),
            action,
            draft: Draft {
                serial: Some(serial.into()),
                ..Draft::default()
            },
        }
    }

    #[test]
    fn append_chains_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let h1 = append(
            &path,
            vec![rec(LogAction::Init, "01"), rec(LogAction::Init, "02")],
        )
        .unwrap();
        let h2 = append(&path, vec![rec(LogAction::Issue, "03")])
            .unwrap()
            .unwrap();
        assert_eq!(h1.unwrap().lines, 2);
        assert_eq!(h2.lines, 3);
        let report = verify(&path, Some(&h2)).unwrap();
        assert_eq!(report.status, ChainStatus::Intact);
        assert_eq!(report.entries.len(), 3);
        assert_eq!(report.entries[0].record.prev, GENESIS_HASH);
        assert!(report.entries.iter().all(|e| e.chain_ok));
    }

    #[test]
    fn edited_line_breaks_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let head = append(
            &path,
            (0..4)
                .map(|i| rec(LogAction::Issue, &format!("{i:02}")))
                .collect(),
        )
        .unwrap()
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\"serial\":\"01\"", "\"serial\":\"ff\"", 1),
        )
        .unwrap();
        let report = verify(&path, Some(&head)).unwrap();
        assert!(
            matches!(report.status, ChainStatus::Broken { line: 3, .. }),
            "{:?}",
            report.status
        );
        assert!(!report.entries[2].chain_ok);
        assert!(report.entries[1].chain_ok);
    }

    #[test]
    fn removed_and_truncated_lines_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let head = append(
            &path,
            (0..4)
                .map(|i| rec(LogAction::Issue, &format!("{i:02}")))
                .collect(),
        )
        .unwrap()
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Remove the middle line.
        std::fs::write(&path, format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3])).unwrap();
        assert!(matches!(
            verify(&path, Some(&head)).unwrap().status,
            ChainStatus::Broken { line: 2, .. }
        ));
        // Cut the last line off: the chain itself holds, the inventory's head shows it.
        std::fs::write(&path, format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2])).unwrap();
        assert!(matches!(
            verify(&path, Some(&head)).unwrap().status,
            ChainStatus::Broken { line: 4, .. }
        ));
        // Edit the last line: only the head hash shows it.
        std::fs::write(
            &path,
            format!(
                "{}\n{}\n{}\n{}\n",
                lines[0],
                lines[1],
                lines[2],
                lines[3].replace("\"t\"", "\"x\"")
            ),
        )
        .unwrap();
        assert!(matches!(
            verify(&path, Some(&head)).unwrap().status,
            ChainStatus::Broken { line: 4, .. }
        ));
    }

    #[test]
    fn torn_last_line_is_terminated_on_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        append(&path, vec![rec(LogAction::Issue, "01")]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        drop(f);
        let head = append(&path, vec![rec(LogAction::Issue, "02")])
            .unwrap()
            .unwrap();
        assert_eq!(head.lines, 3);
        let report = verify(&path, Some(&head)).unwrap();
        assert!(matches!(report.status, ChainStatus::Broken { line: 2, .. }));
        assert_eq!(report.entries.len(), 2);
    }

    #[test]
    fn last_line_of_long_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        for batch in 0..5 {
            append(
                &path,
                (0..100)
                    .map(|i| rec(LogAction::Issue, &format!("{batch}-{i}")))
                    .collect(),
            )
            .unwrap();
        }
        let head = append(&path, vec![]).unwrap().unwrap();
        assert_eq!(head.lines, 500);
        assert_eq!(
            verify(&path, Some(&head)).unwrap().status,
            ChainStatus::Intact
        );
    }
}
