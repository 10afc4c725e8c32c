//! File helpers: the directory layout, atomic writes, private files, the directory lock.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::error::PkiError;
use crate::profile::LeafKind;

/// File mode of private keys and anything else secret.
pub(crate) const PRIVATE_MODE: u32 = 0o600;
/// File mode of public files (certificates, CRLs, inventory, log).
pub(crate) const PUBLIC_MODE: u32 = 0o644;

/// Where everything lives inside a PKI directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    dir: PathBuf,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
    pub(crate) fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
    /// Where the CRL publication URL is kept (`gridward pki init --crl-url`).
    pub(crate) fn crl_url(&self) -> PathBuf {
        self.dir.join("ca/crl-url.txt")
    }
    pub(crate) fn root_cert(&self) -> PathBuf {
        self.dir.join("ca/root.crt.pem")
    }
    pub(crate) fn root_key(&self) -> PathBuf {
        self.dir.join("ca/root.key.pem")
    }
    pub(crate) fn issuing_cert(&self) -> PathBuf {
        self.dir.join("ca/issuing.crt.pem")
    }
    pub(crate) fn issuing_key(&self) -> PathBuf {
        self.dir.join("ca/issuing.key.pem")
    }
    pub(crate) fn ca_chain(&self) -> PathBuf {
        self.dir.join("ca/chain.pem")
    }
    pub(crate) fn crl_dir(&self) -> PathBuf {
        self.dir.join("crl")
    }
    pub(crate) fn root_crl(&self) -> PathBuf {
        self.dir.join("crl/root.crl.pem")
    }
    pub(crate) fn issuing_crl(&self) -> PathBuf {
        self.dir.join("crl/issuing.crl.pem")
    }
    pub(crate) fn kind_dir(&self, kind: LeafKind) -> PathBuf {
        self.dir.join(kind.dir_name())
    }
    pub(crate) fn leaf_dir(&self, kind: LeafKind, name: &str) -> PathBuf {
        self.kind_dir(kind).join(name)
    }
    pub(crate) fn leaf_cert(&self, kind: LeafKind, name: &str) -> PathBuf {
        self.leaf_dir(kind, name).join("cert.pem")
    }
    pub(crate) fn leaf_key(&self, kind: LeafKind, name: &str) -> PathBuf {
        self.leaf_dir(kind, name).join("key.pem")
    }
    pub(crate) fn leaf_chain(&self, kind: LeafKind, name: &str) -> PathBuf {
        self.leaf_dir(kind, name).join("chain.pem")
    }
    pub(crate) fn archive_dir(&self) -> PathBuf {
        self.dir.join("archive")
    }
    pub(crate) fn archived_cert(&self, serial: &str) -> PathBuf {
        self.archive_dir().join(format!("{serial}.crt.pem"))
    }
    pub(crate) fn trusted_dir(&self) -> PathBuf {
        self.dir.join("trusted")
    }
    pub(crate) fn inventory(&self) -> PathBuf {
        self.dir.join("inventory.json")
    }
    pub(crate) fn log(&self) -> PathBuf {
        self.dir.join("log.jsonl")
    }
    pub(crate) fn lock(&self) -> PathBuf {
        self.dir.join(".lock")
    }
}

/// Creates `path` (and its parents) if missing; a newly created leaf directory gets `mode`.
pub(crate) fn ensure_dir(path: &Path, mode: u32) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(PkiError::io("creating directory", path))
}

/// Reads a whole file; a missing file becomes [`PkiError::MissingFile`] with `hint`.
pub(crate) fn read_file(path: &Path, hint: &str) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            PkiError::MissingFile {
                path: path.to_path_buf(),
                hint: hint.to_owned(),
            }
        } else {
            PkiError::Io {
                action: "reading",
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Writes `bytes` to `path` atomically: a new temporary file in the same directory, created with
/// `mode` (so a private file is never readable by others, not even briefly), written, optionally
/// fsynced, then renamed over `path`.
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    sync: bool,
) -> Result<(), PkiError> {
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{file_name}.tmp.{:016x}",
        rand::rngs::OsRng.next_u64()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(PkiError::io("creating", &tmp))?;
        file.write_all(bytes)
            .map_err(PkiError::io("writing", &tmp))?;
        if sync {
            file.sync_all().map_err(PkiError::io("syncing", &tmp))?;
        }
        drop(file);
        fs::rename(&tmp, path).map_err(PkiError::io("renaming into place", path))?;
        if sync {
            // Make the rename itself durable.
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes a file if it exists.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), PkiError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PkiError::Io {
            action: "removing",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// An exclusive advisory lock on the PKI directory, released when dropped.
///
/// Two `gridward pki` commands on the same directory run one after the other, so the inventory,
/// the CRL numbers and the log chain never interleave.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Blocks until the lock on `layout`'s directory is held.
    pub(crate) fn acquire(layout: &Layout) -> Result<Self, PkiError> {
        let path = layout.lock();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PUBLIC_MODE)
            .open(&path)
            .map_err(PkiError::io("opening lock file", &path))?;
        file.lock().map_err(PkiError::io("locking", &path))?;
        Ok(Self { _file: file })
    }
}

/// Encodes DER bytes as PEM with `label` (LF line endings).
pub(crate) fn pem_encode(label: &'static str, der: &[u8]) -> String {
    // Encoding only fails on an invalid label or a length overflow, neither possible here;
    // fall back to an empty string rather than panicking.
    pkcs8::der::pem::encode_string(label, pkcs8::LineEnding::LF, der).unwrap_or_default()
}
