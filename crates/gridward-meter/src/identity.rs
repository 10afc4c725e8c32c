//! A meter's identity from a PKI directory: its TLS client configuration and its envelope key.
//!
//! ```text
//! DIR/ca/root.crt.pem          trust anchor for the head-end's server certificate   ┐ Trust, loaded
//! DIR/crl/*.crl.pem            CRLs (revocation is checked, fail closed)            │ once per fleet
//! DIR/command-signers/*/cert.pem  pinned command signers (several during a rotation) ┘
//! DIR/meters/{id}/chain.pem    the meter's certificate, then the issuing CA         ┐ MeterIdentity,
//! DIR/meters/{id}/key.pem      its PKCS#8 key: TLS client key and envelope key      ┘ one per meter
//! ```
//!
//! The certificate's key decides the envelope algorithm: P-256 → ES256, Ed25519 → EdDSA,
//! RSA → RS256. The certificate must identify the meter it is loaded for ([`gridward_pki::identity_of`]).
//!
//! Command signers are *pinned*: a meter executes commands signed by the key of a certificate in
//! `command-signers/`, within that certificate's validity, and by nothing else (not the TLS
//! server key, not a CA). Firmware manufacturer keys are SPKI PEM files
//! ([`load_manufacturer_keys`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gridward_core::MeterId;
use gridward_core::command::TrustedSigner;
use gridward_core::envelope::{Algorithm, KeyError, SigningKey, VerifyingKey};
use gridward_pki::Identity;
use gridward_pki::tls::{TlsError, TlsMaterial, TlsOptions, client_config_with};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Why a meter identity could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A PEM file is malformed or holds nothing of the expected kind.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The PKI directory has no CRL; TLS would fail closed anyway.
    #[error("no CRL (*.crl.pem) in {0}; revocation checking is mandatory")]
    NoCrl(PathBuf),
    /// The key cannot sign envelopes (not P-256, Ed25519 or RSA ≥ 2048).
    #[error("{path}: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: KeyError,
    },
    /// The certificate does not identify a meter.
    #[error("{path}: the certificate does not identify a meter: {reason}")]
    NotAMeter {
        /// The chain file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate identifies another device than the (non-meter) one asked for.
    #[error("{path}: the certificate identifies {found}, not {expected}")]
    WrongIdentity {
        /// The chain file.
        path: PathBuf,
        /// The device asked for.
        expected: String,
        /// What the certificate identifies (or why it identifies nothing).
        found: String,
    },
    /// The certificate identifies another meter than the one asked for.
    #[error("{path}: the certificate is meter {found}'s, not {expected}'s")]
    WrongMeter {
        /// The chain file.
        path: PathBuf,
        /// The meter asked for.
        expected: MeterId,
        /// The meter the certificate names.
        found: MeterId,
    },
    /// The envelope key is not the certificate's key.
    #[error("{path}: the private key does not belong to the certificate")]
    KeyMismatch {
        /// The key file.
        path: PathBuf,
    },
    /// The TLS client configuration could not be built.
    #[error("TLS configuration of meter {meter}: {source}")]
    Tls {
        /// The meter.
        meter: MeterId,
        /// The cause.
        source: TlsError,
    },
    /// Fewer meters with keys exist in the PKI directory than were asked for.
    #[error(
        "{wanted} meters wanted but only {found} with a key in {dir} match prefix {prefix:?}; \
         issue more with `gridward pki issue meter --dir {dir} --count N --prefix PREFIX`"
    )]
    NotEnoughMeters {
        /// The `meters` directory.
        dir: PathBuf,
        /// The id prefix.
        prefix: String,
        /// How many were asked for.
        wanted: usize,
        /// How many exist.
        found: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pem_err(path: &Path, reason: impl ToString) -> LoadError {
    LoadError::Pem {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// What every meter of a PKI directory trusts: the root CA, the CRLs and the pinned command
/// signers.
#[derive(Debug, Clone)]
pub struct Trust {
    roots: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    command_signers: Vec<TrustedSigner>,
}

/// The directory of command-signer certificates under a PKI directory.
pub const COMMAND_SIGNERS_DIR: &str = "command-signers";

impl Trust {
    /// Reads `DIR/ca/root.crt.pem`, every `DIR/crl/*.crl.pem`, and every
    /// `DIR/command-signers/*/cert.pem` (none if the directory does not exist: the meters then
    /// refuse every command as `unknown_signer`).
    pub fn load(pki_dir: &Path) -> Result<Self, LoadError> {
        let root_path = pki_dir.join("ca").join("root.crt.pem");
        let roots = read_certs(&root_path)?;
        let crl_dir = pki_dir.join("crl");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&crl_dir)
            .map_err(io_err(&crl_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".crl.pem"))
            .collect();
        files.sort();
        let mut crls = Vec::new();
        for path in &files {
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            let items = CertificateRevocationListDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(path, e))?;
            if items.is_empty() {
                return Err(pem_err(path, "no X509 CRL block"));
            }
            crls.extend(items);
        }
        if crls.is_empty() {
            return Err(LoadError::NoCrl(crl_dir));
        }
        let command_signers = load_command_signers(&pki_dir.join(COMMAND_SIGNERS_DIR))?;
        Ok(Self {
            roots,
            crls,
            command_signers,
        })
    }

    /// A client configuration of the Gridward TLS profile that trusts these roots and presents
    /// no certificate: an outsider (a brute-forcing source, [`crate::scenario::Behaviour`]).
    ///
    /// # Errors
    ///
    /// A root the verifier does not accept, or no usable protocol version.
    pub fn outsider_config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for r in &self.roots {
            roots.add(r.clone()).map_err(|e| e.to_string())?;
        }
        let config = ClientConfig::builder_with_provider(gridward_pki::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Trust from certificates and CRLs already in memory (no command signer).
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Self {
        Self {
            roots,
            crls,
            command_signers: Vec::new(),
        }
    }

    /// As [`load`](Self::load), but pins the command signers the PKI lists at `now`
    /// ([`gridward_pki::Pki::command_signers`]): during a rotation the superseded certificate
    /// too (from the archive), never a revoked or expired one.
    pub fn load_at(pki_dir: &Path, now: time::OffsetDateTime) -> Result<Self, LoadError> {
        let trust = Self::load(pki_dir)?;
        let pki = gridward_pki::Pki::open(pki_dir, None).map_err(|e| pem_err(pki_dir, e))?;
        let certs = pki
            .command_signers(now)
            .map_err(|e| pem_err(&pki_dir.join(COMMAND_SIGNERS_DIR), e))?;
        let signers = certs
            .iter()
            .map(|c| {
                command_signer_der(&c.certificate).map_err(|reason| {
                    pem_err(&pki_dir.join(COMMAND_SIGNERS_DIR).join(&c.name), reason)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(trust.with_command_signers(signers))
    }

    /// The same trust with `signers` pinned instead.
    pub fn with_command_signers(mut self, signers: Vec<TrustedSigner>) -> Self {
        self.command_signers = signers;
        self
    }

    /// The pinned command signers.
    pub fn command_signers(&self) -> &[TrustedSigner] {
        &self.command_signers
    }
}

/// Every `dir/*/cert.pem`, sorted by path, as pinned command signers; none if `dir` does not
/// exist.
pub fn load_command_signers(dir: &Path) -> Result<Vec<TrustedSigner>, LoadError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path().join("cert.pem")))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().map(|p| command_signer(p)).collect()
}

/// The command signer of one certificate file (PEM): its key and validity window.
pub fn command_signer(cert_path: &Path) -> Result<TrustedSigner, LoadError> {
    let certs = read_certs(cert_path)?;
    let der = certs
        .first()
        .ok_or_else(|| pem_err(cert_path, "no CERTIFICATE block"))?;
    command_signer_der(der).map_err(|reason| pem_err(cert_path, reason))
}

/// The command signer of one DER certificate: its key and validity window.
pub fn command_signer_der(der: &[u8]) -> Result<TrustedSigner, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("bad certificate: {e}"))?;
    let key = VerifyingKey::from_spki_der(cert.tbs_certificate.subject_pki.raw)
        .map_err(|e| format!("the certificate's key cannot verify commands: {e}"))?;
    let validity = cert.validity();
    Ok(TrustedSigner {
        key,
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
    })
}

/// Firmware manufacturer keys from SPKI PEM files (`-----BEGIN PUBLIC KEY-----`), e.g. as
/// `openssl pkey -pubout` writes them.
pub fn load_manufacturer_keys(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>, LoadError> {
    paths
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p).map_err(io_err(p))?;
            VerifyingKey::from_spki_pem(&pem).map_err(|source| LoadError::Key {
                path: p.clone(),
                source,
            })
        })
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// A meter ready to connect and sign: its id, TLS client configuration and envelope key.
pub struct MeterIdentity {
    id: MeterId,
    client_config: Arc<ClientConfig>,
    signing_key: SigningKey,
}

impl std::fmt::Debug for MeterIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeterIdentity")
            .field("id", &self.id)
            .field("alg", &self.signing_key.algorithm())
            .finish_non_exhaustive()
    }
}

impl MeterIdentity {
    /// Loads meter `id` from `DIR/meters/{id}/` (chain.pem, key.pem) with `trust`, and builds
    /// its TLS client configuration with `opts` (ALPN, verification clock).
    pub fn load(
        pki_dir: &Path,
        id: &MeterId,
        trust: &Trust,
        opts: &TlsOptions,
    ) -> Result<Self, LoadError> {
        let dir = pki_dir.join("meters").join(id.as_str());
        Self::from_files(
            id,
            &dir.join("chain.pem"),
            &dir.join("key.pem"),
            trust,
            opts,
        )
    }

    /// Loads meter `id` from explicit chain and key files.
    pub fn from_files(
        id: &MeterId,
        chain_path: &Path,
        key_path: &Path,
        trust: &Trust,
        opts: &TlsOptions,
    ) -> Result<Self, LoadError> {
        let material = load_material(id, chain_path, key_path, trust)?;
        let signing_key = envelope_key(key_path, chain_path, &material)?;
        let client_config =
            client_config_with(&material, opts).map_err(|source| LoadError::Tls {
                meter: id.clone(),
                source,
            })?;
        Ok(Self {
            id: id.clone(),
            client_config,
            signing_key,
        })
    }

    /// Loads meter `id` like [`load`](Self::load), but clones `base` (another meter's
    /// configuration, built by [`load`](Self::load)) and only swaps the client certificate, so
    /// that thousands of meters share one server verifier (roots, parsed CRLs) and one crypto
    /// provider: about 4 KiB less memory per meter. The TLS profile is `base`'s.
    pub fn load_sharing(
        pki_dir: &Path,
        id: &MeterId,
        trust: &Trust,
        base: &Arc<ClientConfig>,
    ) -> Result<Self, LoadError> {
        let dir = pki_dir.join("meters").join(id.as_str());
        let (chain_path, key_path) = (dir.join("chain.pem"), dir.join("key.pem"));
        let material = load_material(id, &chain_path, &key_path, trust)?;
        let signing_key = envelope_key(&key_path, &chain_path, &material)?;
        let certified =
            CertifiedKey::from_der(material.chain, material.key, base.crypto_provider()).map_err(
                |e| LoadError::Tls {
                    meter: id.clone(),
                    source: match e {
                        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                            TlsError::KeyMismatch
                        }
                        other => TlsError::Key(other),
                    },
                },
            )?;
        let mut config = ClientConfig::clone(base);
        config.client_auth_cert_resolver = Arc::new(OwnCertificate(Arc::new(certified)));
        Ok(Self {
            id: id.clone(),
            client_config: Arc::new(config),
            signing_key,
        })
    }

    /// The meter id (certified by its certificate).
    pub fn id(&self) -> &MeterId {
        &self.id
    }

    /// The envelope algorithm, from the certificate key.
    pub fn algorithm(&self) -> Algorithm {
        self.signing_key.algorithm()
    }

    /// The TLS client configuration: presents the meter certificate, verifies the head-end
    /// against the PKI's root and CRLs.
    pub fn client_config(&self) -> &Arc<ClientConfig> {
        &self.client_config
    }

    /// The envelope signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing_key
    }

    /// Splits into id, TLS configuration and signing key.
    pub fn into_parts(self) -> (MeterId, Arc<ClientConfig>, SigningKey) {
        (self.id, self.client_config, self.signing_key)
    }
}

/// The envelope key in `key_path`, checked against the certificate of `material`.
fn envelope_key(
    key_path: &Path,
    chain_path: &Path,
    material: &TlsMaterial,
) -> Result<SigningKey, LoadError> {
    let key_pem = std::fs::read_to_string(key_path).map_err(io_err(key_path))?;
    let signing_key = SigningKey::from_pkcs8_pem(&key_pem).map_err(|source| LoadError::Key {
        path: key_path.to_owned(),
        source,
    })?;
    // The certificate's SubjectPublicKeyInfo must be the envelope key's, or the head-end
    // would refuse every envelope (and rustls would refuse the TLS key).
    let leaf = material
        .chain
        .first()
        .ok_or_else(|| pem_err(chain_path, "no CERTIFICATE block"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| pem_err(chain_path, format!("bad certificate: {e}")))?;
    if cert.tbs_certificate.subject_pki.raw != signing_key.public_key_spki() {
        return Err(LoadError::KeyMismatch {
            path: key_path.to_owned(),
        });
    }
    Ok(signing_key)
}

/// Always presents one meter's certificate.
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OwnCertificate {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // As rustls' own single-certificate resolver: only if the key can sign what the server accepts.
        self.0
            .key
            .choose_scheme(sigschemes)
            .map(|_| Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS material of meter `id`: chain and key from the files, roots and CRLs from `trust`.
/// Checks that the certificate identifies meter `id`.
pub fn load_material(
    id: &MeterId,
    chain_path: &Path,
    key_path: &Path,
    trust: &Trust,
) -> Result<TlsMaterial, LoadError> {
    let chain = read_certs(chain_path)?;
    let leaf = chain
        .first()
        .ok_or_else(|| pem_err(chain_path, "no CERTIFICATE block"))?;
    match gridward_pki::identity_of(leaf) {
        Ok(Identity::Meter(found)) if &found == id => {}
        Ok(Identity::Meter(found)) => {
            return Err(LoadError::WrongMeter {
                path: chain_path.to_owned(),
                expected: id.clone(),
                found,
            });
        }
        Ok(other) => {
            return Err(LoadError::NotAMeter {
                path: chain_path.to_owned(),
                reason: format!("it identifies {other}"),
            });
        }
        Err(e) => {
            return Err(LoadError::NotAMeter {
                path: chain_path.to_owned(),
                reason: e.to_string(),
            });
        }
    }
    let key_bytes = std::fs::read(key_path).map_err(io_err(key_path))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| pem_err(key_path, e))?;
    Ok(TlsMaterial {
        chain,
        key,
        roots: trust.roots.clone(),
        crls: trust.crls.clone(),
    })
}

/// The TLS configuration and envelope key of concentrator `id` from its chain and key files:
/// the certificate must identify concentrator `id`.
pub fn load_concentrator(
    id: &MeterId,
    chain_path: &Path,
    key_path: &Path,
    trust: &Trust,
    opts: &TlsOptions,
) -> Result<(Arc<ClientConfig>, SigningKey), LoadError> {
    let expected = Identity::Concentrator(id.clone());
    let chain = read_certs(chain_path)?;
    let leaf = chain
        .first()
        .ok_or_else(|| pem_err(chain_path, "no CERTIFICATE block"))?;
    match gridward_pki::identity_of(leaf) {
        Ok(found) if found == expected => {}
        other => {
            return Err(LoadError::WrongIdentity {
                path: chain_path.to_owned(),
                expected: expected.to_string(),
                found: match other {
                    Ok(found) => found.to_string(),
                    Err(e) => e.to_string(),
                },
            });
        }
    }
    let key_bytes = std::fs::read(key_path).map_err(io_err(key_path))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| pem_err(key_path, e))?;
    let material = TlsMaterial {
        chain,
        key,
        roots: trust.roots.clone(),
        crls: trust.crls.clone(),
    };
    let signing_key = envelope_key(key_path, chain_path, &material)?;
    let client_config = client_config_with(&material, opts).map_err(|source| LoadError::Tls {
        meter: id.clone(),
        source,
    })?;
    Ok((client_config, signing_key))
}

/// The meters of a PKI directory that can be simulated (a `key.pem` next to `chain.pem`),
/// whose id starts with `prefix`, sorted by id.
pub fn list_meters(pki_dir: &Path, prefix: &str) -> Result<Vec<MeterId>, LoadError> {
    let dir = pki_dir.join("meters");
    let mut ids: Vec<MeterId> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.starts_with(prefix) {
                return None;
            }
            let p = e.path();
            if !(p.join("key.pem").is_file() && p.join("chain.pem").is_file()) {
                return None;
            }
            MeterId::new(&name).ok()
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// The first `count` meters of [`list_meters`], or [`LoadError::NotEnoughMeters`].
pub fn select_meters(
    pki_dir: &Path,
    prefix: &str,
    count: usize,
) -> Result<Vec<MeterId>, LoadError> {
    let mut ids = list_meters(pki_dir, prefix)?;
    if ids.len() < count {
        return Err(LoadError::NotEnoughMeters {
            dir: pki_dir.join("meters"),
            prefix: prefix.to_owned(),
            wanted: count,
            found: ids.len(),
        });
    }
    ids.truncate(count);
    Ok(ids)
}

/// Loads many meters, on every available core; `progress` is called with the number loaded so far.
/// The first meter's configuration is built with `opts` ([`MeterIdentity::load`]); the others
/// share it ([`MeterIdentity::load_sharing`]).
pub fn load_many(
    pki_dir: &Path,
    ids: &[MeterId],
    trust: &Trust,
    opts: &TlsOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<MeterIdentity>, LoadError> {
    let Some((first, rest)) = ids.split_first() else {
        return Ok(Vec::new());
    };
    let first = MeterIdentity::load(pki_dir, first, trust, opts)?;
    let base = Arc::clone(first.client_config());
    let base = &base;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let chunk = rest.len().div_ceil(threads).max(1);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Vec<MeterIdentity>, LoadError>> = std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .chunks(chunk)
            .map(|part| {
                let done = &done;
                s.spawn(move || {
                    part.iter()
                        .map(|id| {
                            let m = MeterIdentity::load_sharing(pki_dir, id, trust, base)?;
                            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 2;
                            if n.is_multiple_of(256) {
                                progress(n);
                            }
                            Ok(m)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut all = Vec::with_capacity(ids.len());
    all.push(first);
    for r in results {
        all.extend(r?);
    }
    progress(all.len());
    Ok(all)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use gridward_pki::{InitOptions, IssueOptions, LeafKeyAlg, Pki};
    use time::OffsetDateTime;

    use super::*;

    /// A PKI with meters `T-000001..=T-00000{n}` (P-256, except the second: Ed25519, third: RSA)
    /// and a server certificate `hes` for 127.0.0.1 and localhost.
    pub(crate) fn test_pki(n: usize) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&dir, &InitOptions::new("test", now)).unwrap();
        let opts = IssueOptions::new("test");
        pki.issue_meters("T-", n, &opts, now, &mut |_| {}).unwrap();
        for (id, alg) in [
            ("T-ED25519", LeafKeyAlg::Ed25519),
            ("T-RSA", LeafKeyAlg::Rsa2048),
        ] {
            let o = IssueOptions {
                key_alg: alg,
                ..IssueOptions::new("test")
            };
            pki.issue_meter(&MeterId::new(id).unwrap(), &o, now)
                .unwrap();
        }
        pki.issue_server("hes", &["127.0.0.1".into(), "localhost".into()], &opts, now)
            .unwrap();
        (tmp, dir)
    }

    #[test]
    fn loads_meters_of_every_algorithm() {
        let (_tmp, dir) = test_pki(2);
        let trust = Trust::load(&dir).unwrap();
        let opts = TlsOptions::default();
        for (id, alg) in [
            ("T-000001", Algorithm::Es256),
            ("T-ED25519", Algorithm::EdDsa),
            ("T-RSA", Algorithm::Rs256),
        ] {
            let m = MeterIdentity::load(&dir, &MeterId::new(id).unwrap(), &trust, &opts).unwrap();
            assert_eq!((m.id().as_str(), m.algorithm()), (id, alg));
        }
        let all = list_meters(&dir, "").unwrap();
        assert_eq!(all.len(), 4);
        let t: Vec<String> = select_meters(&dir, "T-0", 2)
            .unwrap()
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(t, ["T-000001", "T-000002"]);
        assert!(matches!(
            select_meters(&dir, "T-0", 3),
            Err(LoadError::NotEnoughMeters {
                wanted: 3,
                found: 2,
                ..
            })
        ));
        let loaded = load_many(&dir, &all, &trust, &opts, &|_| {}).unwrap();
        let ids: Vec<&str> = loaded.iter().map(|m| m.id().as_str()).collect();
        assert_eq!(ids, ["T-000001", "T-000002", "T-ED25519", "T-RSA"]);
        // Meter 2's key and meter 1's certificate cannot be combined this way either.
        let base = Arc::clone(loaded[0].client_config());
        let m2 = MeterId::new("T-000002").unwrap();
        std::fs::copy(
            dir.join("meters/T-000001/key.pem"),
            dir.join("meters/T-000002/key.pem"),
        )
        .unwrap();
        assert!(matches!(
            MeterIdentity::load_sharing(&dir, &m2, &trust, &base),
            Err(LoadError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn misplaced_or_broken_files_are_refused() {
        let (_tmp, dir) = test_pki(2);
        let trust = Trust::load(&dir).unwrap();
        let opts = TlsOptions::default();
        let m1 = MeterId::new("T-000001").unwrap();
        let m2 = MeterId::new("T-000002").unwrap();
        let d1 = dir.join("meters/T-000001");
        let d2 = dir.join("meters/T-000002");
        // Meter 1's chain under meter 2's id.
        assert!(matches!(
            MeterIdentity::from_files(&m2, &d1.join("chain.pem"), &d1.join("key.pem"), &trust, &opts),
            Err(LoadError::WrongMeter { ref found, .. }) if found == &m1
        ));
        // Meter 2's key with meter 1's certificate.
        assert!(matches!(
            MeterIdentity::from_files(
                &m1,
                &d1.join("chain.pem"),
                &d2.join("key.pem"),
                &trust,
                &opts
            ),
            Err(LoadError::KeyMismatch { .. })
        ));
        // A server certificate is not a meter.
        let s = dir.join("servers/hes");
        assert!(matches!(
            MeterIdentity::from_files(&m1, &s.join("chain.pem"), &s.join("key.pem"), &trust, &opts),
            Err(LoadError::NotAMeter { .. })
        ));
        // Missing files and junk.
        assert!(matches!(
            MeterIdentity::load(&dir, &MeterId::new("nobody").unwrap(), &trust, &opts),
            Err(LoadError::Io { .. })
        ));
        std::fs::write(d2.join("chain.pem"), "junk").unwrap();
        assert!(matches!(
            MeterIdentity::load(&dir, &m2, &trust, &opts),
            Err(LoadError::Pem { .. })
        ));
    }

    #[test]
    fn command_signers_are_pinned_from_the_pki_directory() {
        let (_tmp, dir) = test_pki(1);
        // None issued yet: no signer, not an error.
        assert!(Trust::load(&dir).unwrap().command_signers().is_empty());
        let now = OffsetDateTime::now_utc();
        let pki = Pki::open(&dir, None).unwrap();
        let opts = IssueOptions::new("test");
        pki.issue_command_signer("hes-commands", &opts, now)
            .unwrap();
        let key_pem =
            std::fs::read_to_string(dir.join("command-signers/hes-commands/key.pem")).unwrap();
        let key = SigningKey::from_pkcs8_pem(&key_pem).unwrap();
        let trust = Trust::load(&dir).unwrap();
        let [signer] = trust.command_signers() else {
            panic!("{:?}", trust.command_signers())
        };
        assert_eq!(signer.key.kid(), key.kid());
        assert!(signer.not_before <= now && now < signer.not_after);
        // Rotation: the superseded certificate stays pinned through the PKI's listing.
        let rotated = IssueOptions {
            replace: true,
            ..IssueOptions::new("test")
        };
        pki.issue_command_signer("hes-commands", &rotated, now)
            .unwrap();
        assert_eq!(Trust::load(&dir).unwrap().command_signers().len(), 1);
        let both = Trust::load_at(&dir, now).unwrap();
        assert_eq!(both.command_signers().len(), 2);
        assert!(
            both.command_signers()
                .iter()
                .any(|s| s.key.kid() == key.kid())
        );
        // A file that is no certificate is refused with its path.
        std::fs::create_dir_all(dir.join("command-signers/junk")).unwrap();
        std::fs::write(dir.join("command-signers/junk/cert.pem"), "junk").unwrap();
        assert!(matches!(Trust::load(&dir), Err(LoadError::Pem { .. })));
    }

    /// Manufacturer keys as OpenSSL writes them (`openssl pkey -pubout`).
    #[test]
    fn manufacturer_keys_load_from_openssl_spki_pem() {
        let tmp = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for alg in ["ed25519", "EC"] {
            let key = tmp.path().join(format!("{alg}.key"));
            let public = tmp.path().join(format!("{alg}.pub.pem"));
            let mut genpkey = std::process::Command::new("openssl");
            genpkey.arg("genpkey").arg("-algorithm").arg(alg);
            if alg == "EC" {
                genpkey.args(["-pkeyopt", "ec_paramgen_curve:P-256"]);
            }
            let ok = genpkey.arg("-out").arg(&key).status().unwrap().success();
            assert!(ok);
            let ok = std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(&public)
                .status()
                .unwrap()
                .success();
            assert!(ok);
            paths.push(public);
        }
        let keys = load_manufacturer_keys(&paths).unwrap();
        assert_eq!(
            keys.iter().map(VerifyingKey::algorithm).collect::<Vec<_>>(),
            [Algorithm::EdDsa, Algorithm::Es256]
        );
        let missing = tmp.path().join("missing.pem");
        assert!(matches!(
            load_manufacturer_keys(&[missing]),
            Err(LoadError::Io { .. })
        ));
        std::fs::write(tmp.path().join("bad.pem"), "junk").unwrap();
        assert!(matches!(
            load_manufacturer_keys(&[tmp.path().join("bad.pem")]),
            Err(LoadError::Key { .. })
        ));
    }

    #[test]
    fn trust_requires_a_crl() {
        let (_tmp, dir) = test_pki(1);
        for f in std::fs::read_dir(dir.join("crl")).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        assert!(matches!(Trust::load(&dir), Err(LoadError::NoCrl(_))));
    }
}
