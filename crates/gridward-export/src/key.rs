//! The export key: 32 secret bytes, one per recipient, kept in a file of 64 hexadecimal digits
//! readable by its owner only.
//!
//! The same key gives the same pseudonyms every time (a recipient can follow a meter from one
//! export to the next); another recipient's key gives unrelated ones (two recipients cannot join
//! their exports on pseudonyms). Whoever holds the key can test a guessed meter id against a
//! pseudonym, so the key never leaves the head-end's operators.

use std::io::{Read, Write};
use std::path::Path;

use zeroize::Zeroize;

use crate::error::ExportError;

/// Bytes in an export key.
pub const KEY_LEN: usize = 32;

/// The longest key file read (a key is 64 digits and a newline; more is not a key file).
const MAX_KEY_FILE: u64 = 256;

/// An export key. Its `Debug` prints nothing of it; it is wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct ExportKey([u8; KEY_LEN]);

impl std::fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportKey(..)")
    }
}

impl Drop for ExportKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ExportKey {
    /// A key from its bytes (the caller's randomness: `gridward export keygen` uses the
    /// operating system's).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses a key file's text (`path` only names it in errors): 64 hexadecimal digits,
    /// surrounding whitespace ignored.
    ///
    /// # Errors
    ///
    /// [`ExportError::KeyFileMalformed`], [`ExportError::KeyWrongLength`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ExportError> {
        let digits = text.trim();
        let malformed = |reason| ExportError::KeyFileMalformed {
            path: path.to_owned(),
            reason,
        };
        if digits.is_empty() {
            return Err(malformed("it is empty"));
        }
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("it is not one line of hexadecimal digits"));
        }
        if !digits.len().is_multiple_of(2) {
            return Err(malformed("it has an odd number of hexadecimal digits"));
        }
        let mut bytes =
            hex::decode(digits).map_err(|_| malformed("it is not hexadecimal digits"))?;
        let key =
            <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| ExportError::KeyWrongLength {
                path: path.to_owned(),
                found: bytes.len(),
                expected: KEY_LEN,
            });
        bytes.zeroize();
        key.map(Self)
    }

    /// Loads the key file at `path`. On Unix the file must not be open to its group or to
    /// others (no permission bit in `0o077`).
    ///
    /// # Errors
    ///
    /// [`ExportError::KeyFileMissing`], [`ExportError::KeyFileUnreadable`],
    /// [`ExportError::KeyFileExposed`], [`ExportError::KeyFileMalformed`],
    /// [`ExportError::KeyWrongLength`].
    pub fn load(path: &Path) -> Result<Self, ExportError> {
        let unreadable = |source| ExportError::KeyFileUnreadable {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ExportError::KeyFileMissing {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(unreadable(e)),
        };
        let meta = file.metadata().map_err(unreadable)?;
        if !meta.is_file() {
            return Err(ExportError::KeyFileMalformed {
                path: path.to_owned(),
                reason: "it is not a regular file",
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(ExportError::KeyFileExposed {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let mut text = String::new();
        let read = file
            .take(MAX_KEY_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    ExportError::KeyFileMalformed {
                        path: path.to_owned(),
                        reason: "it is not text",
                    }
                } else {
                    unreadable(e)
                }
            });
        let parsed = read.and_then(|n| {
            if n as u64 > MAX_KEY_FILE {
                Err(ExportError::KeyFileMalformed {
                    path: path.to_owned(),
                    reason: "it is far longer than a key",
                })
            } else {
                Self::parse(&text, path)
            }
        });
        text.zeroize();
        parsed
    }

    /// Writes the key to a new file at `path` (64 hexadecimal digits and a newline), readable
    /// and writable by its owner only (mode 0600 on Unix), synced to disk. An existing file is
    /// never overwritten.
    ///
    /// # Errors
    ///
    /// [`ExportError::KeyFileExists`], [`ExportError::KeyFileWrite`].
    pub fn write_new(&self, path: &Path) -> Result<(), ExportError> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ExportError::KeyFileExists {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(ExportError::KeyFileWrite {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut text = hex::encode(self.0);
        text.push('\n');
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        text.zeroize();
        written.map_err(|source| ExportError::KeyFileWrite {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join("k.hex");
        std::fs::write(&path, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = mode;
        path
    }

    #[test]
    fn a_written_key_loads_back_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipient.key");
        let key = ExportKey::from_bytes([7; KEY_LEN]);
        key.write_new(&path).unwrap();
        assert_eq!(ExportKey::load(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", "07".repeat(KEY_LEN)));
    }

    #[test]
    fn keygen_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), "old", 0o600);
        let err = ExportKey::from_bytes([1; KEY_LEN])
            .write_new(&path)
            .unwrap_err();
        assert!(matches!(err, ExportError::KeyFileExists { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
    }

    #[test]
    fn a_missing_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = ExportKey::load(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, ExportError::KeyFileMissing { .. }), "{err}");
        assert!(err.to_string().contains("gridward export keygen"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            let path = key_file(dir.path(), &"ab".repeat(KEY_LEN), mode);
            let err = ExportKey::load(&path).unwrap_err();
            assert!(
                matches!(err, ExportError::KeyFileExposed { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        let path = key_file(dir.path(), &"ab".repeat(KEY_LEN), 0o400);
        assert!(ExportKey::load(&path).is_ok(), "owner read-only is fine");
    }

    #[test]
    fn a_key_of_the_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, found) in [
            ("ab".repeat(16), 16),
            ("ab".repeat(33), 33),
            ("00".into(), 1),
        ] {
            let path = key_file(dir.path(), &text, 0o600);
            let err = ExportKey::load(&path).unwrap_err();
            assert!(
                matches!(err, ExportError::KeyWrongLength { found: f, expected: KEY_LEN, .. } if f == found),
                "{err}"
            );
        }
    }

    #[test]
    fn a_key_file_that_is_not_hex_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "",
            "\n",
            "zz".repeat(KEY_LEN).as_str(),
            "abc",
            "ab ab",
            &"a".repeat(1000),
        ] {
            let path = key_file(dir.path(), text, 0o600);
            let err = ExportKey::load(&path).unwrap_err();
            assert!(
                matches!(err, ExportError::KeyFileMalformed { .. }),
                "{text:?}: {err}"
            );
        }
        // Binary bytes are not text.
        let path = dir.path().join("bin");
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = ExportKey::load(&path).unwrap_err();
        assert!(matches!(err, ExportError::KeyFileMalformed { .. }), "{err}");
        // A directory is not a key file.
        let err = ExportKey::load(dir.path()).unwrap_err();
        assert!(matches!(err, ExportError::KeyFileMalformed { .. }), "{err}");
    }

    #[test]
    fn debug_prints_nothing_of_the_key() {
        let key = ExportKey::from_bytes([0xab; KEY_LEN]);
        assert_eq!(format!("{key:?}"), "ExportKey(..)");
    }
}
