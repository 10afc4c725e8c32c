//! [`Pki`]: the certificate authority over one PKI directory — creation, issuance, CSR signing,
//! renewal, listing and the log. Revocation and CRLs are in [`crate::crl`], PKCS#12 and TLS
//! material in [`crate::store`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::crl::{self, CrlIssuer, DEFAULT_CRL_DAYS};
use crate::csr;
use crate::error::PkiError;
use crate::fsutil::{
    DirLock, Layout, PRIVATE_MODE, PUBLIC_MODE, ensure_dir, pem_encode, read_file,
    remove_if_exists, write_atomic,
};
use crate::inventory::{
    CertKind, CertificateRecord, DEFAULT_EXPIRING_WITHIN, Inventory, InventoryEntry, Origin,
    Supersession,
};
use crate::keys::{self, CaKeyAlg, LeafKeyAlg};
use crate::oplog::{self, Draft, LogAction, LogReport, PendingRecord};
use crate::profile::{
    IssueOptions, LeafKind, LeafSpec, NOT_BEFORE_SKEW, SanValue, check_validity, random_serial,
    to_cert_time,
};

/// Default validity of the root CA: 20 years.
pub const DEFAULT_ROOT_VALIDITY_DAYS: u32 = 7305;
/// Default validity of the issuing CA: 10 years.
pub const DEFAULT_ISSUING_VALIDITY_DAYS: u32 = 3653;
/// Default organisation name in the CA subjects.
pub const DEFAULT_ORG: &str = "Gridward";
/// Bulk issuance saves the inventory and appends the log every this many certificates.
pub const BULK_BATCH: usize = 1000;

/// Options of [`Pki::init`].
#[derive(Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// CA key algorithm (both CAs).
    pub ca_key: CaKeyAlg,
    /// Encrypt both CA keys with this passphrase.
    pub passphrase: Option<String>,
    /// Who creates the CA.
    pub actor: String,
    /// The current time.
    pub now: OffsetDateTime,
    /// Root CA validity in days (default 20 years).
    pub root_validity_days: u32,
    /// Issuing CA validity in days (default 10 years; never beyond the root's).
    pub issuing_validity_days: u32,
    /// Organisation name (the O of both CA subjects, and the start of their CNs).
    pub org: String,
    /// Where the CRLs are published (an `http://` or `https://` URL of a directory): leaves
    /// then carry a CRL distribution point `{url}/issuing.crl.pem`, so relying parties other
    /// than Gridward (and scanners such as testssl.sh) find their revocation status. `None`:
    /// CRLs are distributed with the PKI directory only.
    pub crl_url: Option<String>,
}

impl InitOptions {
    /// Defaults: P-256, no passphrase, 20/10 years, organisation "Gridward".
    pub fn new(actor: impl Into<String>, now: OffsetDateTime) -> Self {
        Self {
            ca_key: CaKeyAlg::P256,
            passphrase: None,
            actor: actor.into(),
            now,
            root_validity_days: DEFAULT_ROOT_VALIDITY_DAYS,
            issuing_validity_days: DEFAULT_ISSUING_VALIDITY_DAYS,
            org: DEFAULT_ORG.into(),
            crl_url: None,
        }
    }
}

impl fmt::Debug for InitOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitOptions")
            .field("ca_key", &self.ca_key)
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "[redacted]"),
            )
            .field("actor", &self.actor)
            .field("now", &self.now)
            .field("root_validity_days", &self.root_validity_days)
            .field("issuing_validity_days", &self.issuing_validity_days)
            .field("org", &self.org)
            .field("crl_url", &self.crl_url)
            .finish()
    }
}

/// A certificate just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// Its kind.
    pub kind: LeafKind,
    /// Its identity (meter id or name).
    pub name: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Key algorithm.
    pub key_alg: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The certificate.
    pub certificate: CertificateDer<'static>,
    /// Where the certificate was written.
    pub cert_path: PathBuf,
    /// Where the chain (leaf then issuing CA) was written.
    pub chain_path: PathBuf,
    /// Where the private key was written, if the CA holds it.
    pub key_path: Option<PathBuf>,
    /// Serial of the certificate this one superseded, if any.
    pub superseded: Option<String>,
}

/// One certificate renewed by [`Pki::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// Kind.
    pub kind: LeafKind,
    /// Identity.
    pub name: String,
    /// The superseded certificate's serial.
    pub old_serial: String,
    /// Its end of validity.
    pub old_not_after: OffsetDateTime,
    /// The new certificate's serial.
    pub new_serial: String,
    /// Its end of validity.
    pub new_not_after: OffsetDateTime,
    /// Whether the new certificate has a new key.
    pub new_key: bool,
}

/// The certificate authority over one PKI directory (layout in the crate documentation).
///
/// Every operation that writes holds an exclusive lock on the directory, reloads the inventory,
/// and records what it did in the inventory and the operation log.
pub struct Pki {
    layout: Layout,
    passphrase: Option<String>,
    root: CertificateDer<'static>,
    issuing: CertificateDer<'static>,
    issuing_not_after: OffsetDateTime,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.layout.dir())
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// Facts read from a certificate.
#[derive(Debug, Clone)]
pub(crate) struct CertFacts {
    pub(crate) serial: String,
    pub(crate) subject: String,
    pub(crate) spki_raw: Vec<u8>,
    pub(crate) not_before: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
    pub(crate) fingerprint: String,
}

impl CertFacts {
    /// Reads the facts of `der`; `origin` names the file or entry in errors.
    pub(crate) fn read(der: &[u8], origin: &Path) -> Result<Self, PkiError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| {
            PkiError::bad_file(origin, format!("not a valid X.509 certificate: {e}"))
        })?;
        if !rest.is_empty() {
            return Err(PkiError::bad_file(
                origin,
                "trailing bytes after the certificate",
            ));
        }
        Ok(Self {
            serial: serial_hex(cert.raw_serial()),
            subject: cert.subject().to_string(),
            spki_raw: cert.public_key().raw.to_vec(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            fingerprint: oplog::sha256_hex(der),
        })
    }
}

/// Lowercase hex of a serial without leading zero bytes ("00" for zero).
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let trimmed = &raw[start..];
    if trimmed.is_empty() {
        "00".to_owned()
    } else {
        hex::encode(trimmed)
    }
}

/// Checks a CRL publication URL: `http://` or `https://`, a host, no spaces or quotes.
fn check_crl_url(url: &str) -> Result<(), PkiError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r)
            if !r.is_empty()
                && !r.starts_with('/')
                && r.bytes().all(|b| b.is_ascii_graphic() && b != b'"') =>
        {
            Ok(())
        }
        _ => Err(PkiError::InvalidCrlUrl(url.to_owned())),
    }
}

/// Normalises a serial typed by a user (`0A:1B:...`, `0x0a1b...`, any case) to the inventory form:
/// lowercase hex without leading zero bytes.
pub fn normalize_serial(input: &str) -> Result<String, PkiError> {
    let invalid = || PkiError::InvalidSerial {
        value: input.to_owned(),
    };
    let mut s: String = input
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '\t'))
        .collect();
    if let Some(rest) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        s = rest.to_owned();
    }
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    if s.len() % 2 == 1 {
        s.insert(0, '0');
    }
    let bytes = hex::decode(&s).map_err(|_| invalid())?;
    Ok(serial_hex(&bytes))
}

/// PEM of one certificate.
pub(crate) fn cert_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// Reads the first certificate of a PEM file.
pub(crate) fn load_cert(path: &Path, hint: &str) -> Result<CertificateDer<'static>, PkiError> {
    let bytes = read_file(path, hint)?;
    CertificateDer::from_pem_slice(&bytes)
        .map_err(|e| PkiError::bad_file(path, format!("no readable CERTIFICATE PEM block: {e}")))
}

/// The state of one writing operation: the inventory, the issuer and the log lines to append.
pub(crate) struct OpCtx {
    pub(crate) inv: Inventory,
    serials: HashSet<String>,
    current: HashMap<(CertKind, String), usize>,
    pub(crate) pending: Vec<PendingRecord>,
}

impl OpCtx {
    pub(crate) fn new(inv: Inventory) -> Self {
        let serials = inv.serials();
        let current = inv.current_index();
        Self {
            inv,
            serials,
            current,
            pending: Vec::new(),
        }
    }

    pub(crate) fn log(
        &mut self,
        now: OffsetDateTime,
        actor: &str,
        action: LogAction,
        draft: Draft,
    ) {
        self.pending.push(PendingRecord {
            time: now,
            actor: actor.to_owned(),
            action,
            draft,
        });
    }

    pub(crate) fn push_entry(&mut self, entry: InventoryEntry) {
        self.serials.insert(entry.serial.clone());
        if entry.kind.leaf().is_some() && entry.is_current() {
            self.current.insert(
                (entry.kind, entry.name.clone()),
                self.inv.certificates.len(),
            );
        }
        self.inv.certificates.push(entry);
    }

    pub(crate) fn current(&self, kind: LeafKind, name: &str) -> Option<usize> {
        self.current
            .get(&(CertKind::from(kind), name.to_owned()))
            .copied()
    }

    pub(crate) fn forget_current(&mut self, kind: CertKind, name: &str) {
        self.current.remove(&(kind, name.to_owned()));
    }

    /// Refuses a meter id that was ever a concentrator's, and a concentrator id that was ever a
    /// meter's ([`PkiError::DeviceIdTaken`]); other kinds have their own namespaces.
    pub(crate) fn check_device_id(&self, kind: LeafKind, name: &str) -> Result<(), PkiError> {
        let other = match kind {
            LeafKind::Meter => LeafKind::Concentrator,
            LeafKind::Concentrator => LeafKind::Meter,
            _ => return Ok(()),
        };
        let other_kind = CertKind::from(other);
        match self
            .inv
            .certificates
            .iter()
            .find(|c| c.kind == other_kind && c.name == name)
        {
            Some(c) => Err(PkiError::DeviceIdTaken {
                kind,
                name: name.to_owned(),
                taken_by: other,
                serial: c.serial.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fresh_serial(&self) -> [u8; 16] {
        loop {
            let serial = random_serial();
            if !self.serials.contains(&serial_hex(&serial)) {
                return serial;
            }
        }
    }
}

/// Where the public key of a new leaf comes from.
pub(crate) enum KeySource {
    /// Generate a new key pair of this algorithm (written to `key.pem`).
    Generate(LeafKeyAlg),
    /// Reuse this key pair (written to `key.pem`).
    Keep(KeyPair),
    /// Certify this public key; the private key stays with its owner.
    PublicKey {
        /// DER SubjectPublicKeyInfo.
        spki_der: Vec<u8>,
        /// Key algorithm name.
        key_alg: String,
    },
}

/// What [`Pki::certify`] needs besides the identity and key.
pub(crate) struct CertifyArgs<'a> {
    pub(crate) validity_days: u32,
    pub(crate) origin: Origin,
    pub(crate) action: LogAction,
    pub(crate) replace: bool,
    pub(crate) actor: &'a str,
    pub(crate) now: OffsetDateTime,
    pub(crate) sync: bool,
    pub(crate) detail: Option<String>,
}

fn sign_leaf(
    params: &CertificateParams,
    public: &impl PublicKeyData,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Certificate, PkiError> {
    Ok(params.signed_by(public, issuer)?)
}

fn ca_params(
    org: &str,
    cn: &str,
    path_len: u8,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.not_before = not_before;
    params.not_after = not_after;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl Pki {
    /// Creates a new CA in `dir`: root CA (self-signed, CA:true pathlen 1, keyCertSign + cRLSign),
    /// issuing CA (CA:true pathlen 0), empty CRLs for both, the inventory and the log.
    ///
    /// Refuses with [`PkiError::AlreadyInitialised`] if `dir/ca/root.crt.pem` exists.
    /// The root certificate is written last, so an interrupted `init` can be run again.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Self, PkiError> {
        if opts.passphrase.as_deref() == Some("") {
            return Err(PkiError::EmptyPassphrase);
        }
        check_validity(opts.root_validity_days)?;
        check_validity(opts.issuing_validity_days)?;
        if let Some(url) = &opts.crl_url {
            check_crl_url(url)?;
        }
        ensure_dir(dir, 0o755)?;
        let layout = Layout::new(dir);
        let _lock = DirLock::acquire(&layout)?;
        if layout.root_cert().exists() {
            return Err(PkiError::AlreadyInitialised {
                dir: dir.to_path_buf(),
            });
        }
        ensure_dir(&layout.ca_dir(), 0o700)?;
        for d in [layout.crl_dir(), layout.archive_dir(), layout.trusted_dir()] {
            ensure_dir(&d, 0o755)?;
        }
        for kind in LeafKind::ALL {
            ensure_dir(&layout.kind_dir(kind), 0o755)?;
        }

        let now = to_cert_time(opts.now);
        let not_before = now - NOT_BEFORE_SKEW;
        let org = if opts.org.trim().is_empty() {
            DEFAULT_ORG
        } else {
            opts.org.trim()
        };
        let root_not_after = now + Duration::days(opts.root_validity_days.into());
        let issuing_not_after =
            (now + Duration::days(opts.issuing_validity_days.into())).min(root_not_after);

        let root_key = opts.ca_key.generate()?;
        let issuing_key = opts.ca_key.generate()?;
        let root_params = ca_params(
            org,
            &format!("{org} Root CA"),
            1,
            not_before,
            root_not_after,
        );
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::from_params(&root_params, &root_key);
        let mut issuing_params = ca_params(
            org,
            &format!("{org} Issuing CA"),
            0,
            not_before,
            issuing_not_after,
        );
        issuing_params.use_authority_key_identifier_extension = true;
        let issuing_cert = issuing_params.signed_by(&issuing_key, &root_issuer)?;
        let issuing_issuer = Issuer::from_params(&issuing_params, &issuing_key);

        // Keys first (mode 0600 from creation), encrypted if a passphrase was given.
        for (key, path) in [
            (&root_key, layout.root_key()),
            (&issuing_key, layout.issuing_key()),
        ] {
            let pem = match &opts.passphrase {
                Some(p) => keys::encrypted_private_key_pem(key.serialized_der(), p)?,
                None => keys::private_key_pem(key),
            };
            write_atomic(&path, pem.as_bytes(), PRIVATE_MODE, true)?;
        }
        if let Some(url) = &opts.crl_url {
            write_atomic(&layout.crl_url(), url.trim().as_bytes(), PUBLIC_MODE, true)?;
        }
        let root_pem = cert_pem(root_cert.der());
        let issuing_pem = cert_pem(issuing_cert.der());
        write_atomic(
            &layout.issuing_cert(),
            issuing_pem.as_bytes(),
            PUBLIC_MODE,
            true,
        )?;
        write_atomic(
            &layout.ca_chain(),
            format!("{issuing_pem}{root_pem}").as_bytes(),
            PUBLIC_MODE,
            true,
        )?;

        let mut ctx = OpCtx::new(Inventory::new());
        for (der, kind, days) in [
            (root_cert.der(), CertKind::RootCa, opts.root_validity_days),
            (
                issuing_cert.der(),
                CertKind::IssuingCa,
                opts.issuing_validity_days,
            ),
        ] {
            let facts = CertFacts::read(der, &layout.root_cert())?;
            let name = if kind == CertKind::RootCa {
                format!("{org} Root CA")
            } else {
                format!("{org} Issuing CA")
            };
            let key_alg = keys::describe_public_key(&facts.spki_raw)?;
            ctx.log(
                opts.now,
                &opts.actor,
                LogAction::Init,
                Draft {
                    kind: Some(kind.as_str().into()),
                    identity: Some(name.clone()),
                    serial: Some(facts.serial.clone()),
                    fingerprint: Some(facts.fingerprint.clone()),
                    detail: Some(format!(
                        "key {key_alg}{}",
                        if opts.passphrase.is_some() {
                            ", encrypted"
                        } else {
                            ""
                        }
                    )),
                    ..Draft::default()
                },
            );
            ctx.push_entry(InventoryEntry {
                serial: facts.serial,
                kind,
                name,
                subject: facts.subject,
                sans: Vec::new(),
                role: None,
                key_alg,
                not_before: facts.not_before,
                not_after: facts.not_after,
                validity_days: days,
                fingerprint: facts.fingerprint,
                issued_at: now,
                issued_by: opts.actor.clone(),
                origin: Origin::Generated,
                key_on_disk: true,
                revoked: None,
                superseded: None,
            });
        }

        let next_update = now + Duration::days(DEFAULT_CRL_DAYS.into());
        crl::write_crl_with(
            &layout,
            &mut ctx,
            &root_issuer,
            root_cert.der(),
            CrlIssuer::Root,
            now,
            next_update,
            &opts.actor,
        )?;
        crl::write_crl_with(
            &layout,
            &mut ctx,
            &issuing_issuer,
            issuing_cert.der(),
            CrlIssuer::Issuing,
            now,
            next_update,
            &opts.actor,
        )?;
        flush(&layout, &mut ctx)?;

        write_atomic(&layout.root_cert(), root_pem.as_bytes(), PUBLIC_MODE, true)?;
        Self::open(dir, opts.passphrase.clone())
    }

    /// Opens the CA in `dir`. The passphrase (if the CA keys are encrypted) is used only when
    /// something is signed; without it, signing fails with [`PkiError::CaKeyEncrypted`].
    pub fn open(dir: &Path, passphrase: Option<String>) -> Result<Self, PkiError> {
        if passphrase.as_deref() == Some("") {
            return Err(PkiError::EmptyPassphrase);
        }
        let layout = Layout::new(dir);
        if !layout.root_cert().exists() {
            return Err(PkiError::NotInitialised {
                dir: dir.to_path_buf(),
            });
        }
        let hint = format!(
            "the CA is incomplete; restore it from a backup or re-create it with `gridward pki init --dir {}`",
            dir.display()
        );
        let root = load_cert(&layout.root_cert(), &hint)?;
        let issuing = load_cert(&layout.issuing_cert(), &hint)?;
        let facts = CertFacts::read(&issuing, &layout.issuing_cert())?;
        verify_issued_by(&issuing, &root).map_err(|reason| {
            PkiError::bad_file(
                layout.issuing_cert(),
                format!("not signed by ca/root.crt.pem: {reason}"),
            )
        })?;
        Ok(Self {
            layout,
            passphrase,
            root,
            issuing,
            issuing_not_after: facts.not_after,
        })
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        self.layout.dir()
    }

    /// Where the CRLs are published ([`InitOptions::crl_url`]), if set.
    pub fn crl_url(&self) -> Result<Option<String>, PkiError> {
        let path = self.layout.crl_url();
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => Ok(None),
            Ok(s) => {
                check_crl_url(s.trim())?;
                Ok(Some(s.trim().to_owned()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PkiError::bad_file(path, e.to_string())),
        }
    }

    /// The root CA certificate.
    pub fn root_certificate(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The issuing CA certificate.
    pub fn issuing_certificate(&self) -> &CertificateDer<'static> {
        &self.issuing
    }

    /// Whether the CA keys are encrypted (so signing needs the passphrase).
    pub fn ca_key_encrypted(&self) -> Result<bool, PkiError> {
        let path = self.layout.issuing_key();
        let pem = read_file(
            &path,
            "the issuing CA key is missing; restore it from a backup",
        )?;
        Ok(keys::is_encrypted_pem(&pem))
    }

    /// The PEM chain a CSR's requester gets back: leaf, issuing CA, root CA (what
    /// `keytool -importcert` accepts as a certificate reply).
    pub fn reply_chain_pem(&self, leaf: &CertificateDer<'_>) -> String {
        format!(
            "{}{}{}",
            cert_pem(leaf),
            cert_pem(&self.issuing),
            cert_pem(&self.root)
        )
    }

    /// The PEM of the CA chain: issuing CA then root CA (`ca/chain.pem`).
    pub fn ca_chain_pem(&self) -> String {
        format!("{}{}", cert_pem(&self.issuing), cert_pem(&self.root))
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn lock(&self) -> Result<DirLock, PkiError> {
        DirLock::acquire(&self.layout)
    }

    pub(crate) fn load_inventory(&self) -> Result<Inventory, PkiError> {
        Inventory::load(&self.layout.inventory())
    }

    /// Loads the signing key of `which` CA (decrypting it with the passphrase if needed) and checks
    /// it belongs to the CA certificate.
    pub(crate) fn load_issuer(
        &self,
        which: CrlIssuer,
    ) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let (cert, path) = match which {
            CrlIssuer::Root => (&self.root, self.layout.root_key()),
            CrlIssuer::Issuing => (&self.issuing, self.layout.issuing_key()),
        };
        let pem = read_file(&path, "the CA key is missing; restore it from a backup")?;
        let key = keys::load_private_key(&path, &pem, self.passphrase.as_deref())?;
        let facts = CertFacts::read(cert, &path)?;
        if key.subject_public_key_info() != facts.spki_raw {
            return Err(PkiError::bad_file(
                &path,
                "this key does not belong to the CA certificate next to it",
            ));
        }
        Issuer::from_ca_cert_der(cert, key).map_err(|e| {
            PkiError::bad_file(
                &path,
                format!("cannot use the CA certificate as issuer: {e}"),
            )
        })
    }

    // ----- issuance -------------------------------------------------------------------------

    /// Issues a meter certificate with a new key: CN = id, URI SAN `urn:gridward:meter:{id}`,
    /// EKU clientAuth; key, certificate and chain go to `DIR/meters/{id}/`.
    pub fn issue_meter(
        &self,
        id: &gridward_core::MeterId,
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        self.issue_one(
            LeafSpec::new(LeafKind::Meter, id.as_str(), Vec::new())?
                .with_role(opts.role.as_deref())?,
            opts,
            now,
        )
    }

    /// Issues a data concentrator certificate with a new key: CN = id, URI SAN
    /// `urn:gridward:concentrator:{id}`, EKU clientAuth; key, certificate and chain go to
    /// `DIR/concentrators/{id}/`. The id must never have been a meter's
    /// ([`PkiError::DeviceIdTaken`]); renewal ([`Pki::renew`]), revocation ([`Pki::revoke`]) and
    /// PKCS#12 export work as for meters.
    pub fn issue_concentrator(
        &self,
        id: &gridward_core::MeterId,
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        self.issue_one(
            LeafSpec::new(LeafKind::Concentrator, id.as_str(), Vec::new())?
                .with_role(opts.role.as_deref())?,
            opts,
            now,
        )
    }

    /// Issues a server certificate with a new key: CN = name, the given DNS/IP SANs (at least one;
    /// each parsed as an IP address, else a DNS name), EKU serverAuth.
    pub fn issue_server(
        &self,
        name: &str,
        sans: &[String],
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        let sans = sans
            .iter()
            .map(|s| SanValue::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.issue_one(
            LeafSpec::new(LeafKind::Server, name, sans)?.with_role(opts.role.as_deref())?,
            opts,
            now,
        )
    }

    /// Issues a client certificate with a new key: CN = name, URI SAN
    /// `urn:gridward:client:{name}`, EKU clientAuth, and, if `opts.role` is set, the API role
    /// as a second URI SAN `urn:gridward:role:{role}` (see [`crate::client_role_of`]).
    pub fn issue_client(
        &self,
        name: &str,
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        self.issue_one(
            LeafSpec::new(LeafKind::Client, name, Vec::new())?.with_role(opts.role.as_deref())?,
            opts,
            now,
        )
    }

    /// Issues a command-signer certificate with a new key: CN = name, no SAN, KeyUsage
    /// digitalSignature, EKU exactly [`crate::COMMAND_SIGNING_EKU`] (critical; no serverAuth, no
    /// clientAuth); key, certificate and chain go to `DIR/command-signers/{name}/`.
    /// The head-end signs commands with it ([`Pki::current_command_signer`]); meters pin it
    /// ([`Pki::command_signers`]). Rotate with `opts.replace` or [`Pki::renew`].
    pub fn issue_command_signer(
        &self,
        name: &str,
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        self.issue_one(
            LeafSpec::new(LeafKind::CommandSigner, name, Vec::new())?
                .with_role(opts.role.as_deref())?,
            opts,
            now,
        )
    }

    fn issue_one(
        &self,
        spec: LeafSpec,
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        let days = check_validity(
            opts.validity_days
                .unwrap_or_else(|| spec.kind.default_validity_days()),
        )?;
        let _lock = self.lock()?;
        let issuer = self.load_issuer(CrlIssuer::Issuing)?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let issued = self.certify(
            &mut ctx,
            &issuer,
            &spec,
            KeySource::Generate(opts.key_alg),
            &CertifyArgs {
                validity_days: days,
                origin: Origin::Generated,
                action: LogAction::Issue,
                replace: opts.replace,
                actor: &opts.actor,
                now,
                sync: true,
                detail: None,
            },
        )?;
        flush(&self.layout, &mut ctx)?;
        Ok(issued)
    }

    /// Issues `count` meter certificates with ids `{prefix}{n:06}`, numbering on from the highest
    /// `{prefix}NNNNNN` already in the inventory (so running it twice does not collide).
    ///
    /// All ids are checked before anything is issued. The inventory is saved and the log appended
    /// every [`BULK_BATCH`] certificates, not per meter. `progress` is called with the number of
    /// certificates issued so far.
    pub fn issue_meters(
        &self,
        prefix: &str,
        count: usize,
        opts: &IssueOptions,
        now: OffsetDateTime,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<IssuedCertificate>, PkiError> {
        self.issue_devices(LeafKind::Meter, prefix, count, opts, now, progress)
    }

    /// Issues `count` concentrator certificates with ids `{prefix}{n:06}`, as
    /// [`Pki::issue_meters`] does for meters (numbering on from the highest
    /// `{prefix}NNNNNN` concentrator; no id may have been a meter's).
    pub fn issue_concentrators(
        &self,
        prefix: &str,
        count: usize,
        opts: &IssueOptions,
        now: OffsetDateTime,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<IssuedCertificate>, PkiError> {
        self.issue_devices(LeafKind::Concentrator, prefix, count, opts, now, progress)
    }

    /// Bulk issuance of meters or concentrators (see [`Pki::issue_meters`]).
    fn issue_devices(
        &self,
        kind: LeafKind,
        prefix: &str,
        count: usize,
        opts: &IssueOptions,
        now: OffsetDateTime,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<IssuedCertificate>, PkiError> {
        let days = check_validity(
            opts.validity_days
                .unwrap_or_else(|| kind.default_validity_days()),
        )?;
        let _lock = self.lock()?;
        let issuer = self.load_issuer(CrlIssuer::Issuing)?;
        let mut ctx = OpCtx::new(self.load_inventory()?);

        let start = ctx
            .inv
            .certificates
            .iter()
            .filter(|c| c.kind == CertKind::from(kind))
            .filter_map(|c| c.name.strip_prefix(prefix))
            .filter(|n| n.len() >= 6 && n.chars().all(|c| c.is_ascii_digit()))
            .filter_map(|n| n.parse::<u64>().ok())
            .max()
            .map_or(1, |m| m.saturating_add(1));
        let mut specs = Vec::with_capacity(count);
        for n in (0..count as u64).map(|i| start.saturating_add(i)) {
            let name = format!("{prefix}{n:06}");
            let spec = LeafSpec::new(kind, &name, Vec::new())?.with_role(opts.role.as_deref())?;
            ctx.check_device_id(kind, &name)?;
            if let Some(i) = ctx.current(kind, &name) {
                let e = &ctx.inv.certificates[i];
                if now < e.not_after && !opts.replace {
                    return Err(PkiError::AlreadyIssued {
                        kind,
                        name,
                        serial: e.serial.clone(),
                        not_after: e.not_after,
                    });
                }
            }
            specs.push(spec);
        }

        let mut issued = Vec::with_capacity(count);
        for (i, spec) in specs.iter().enumerate() {
            issued.push(self.certify(
                &mut ctx,
                &issuer,
                spec,
                KeySource::Generate(opts.key_alg),
                &CertifyArgs {
                    validity_days: days,
                    origin: Origin::Generated,
                    action: LogAction::Issue,
                    replace: opts.replace,
                    actor: &opts.actor,
                    now,
                    sync: false,
                    detail: Some(format!("bulk {prefix} {}/{count}", i + 1)),
                },
            )?);
            if (i + 1) % BULK_BATCH == 0 {
                flush(&self.layout, &mut ctx)?;
            }
            progress(i + 1);
        }
        flush(&self.layout, &mut ctx)?;
        Ok(issued)
    }

    /// Certifies the public key of a CSR under `profile`.
    ///
    /// The CSR's self-signature is verified ([`PkiError::CsrSignature`] if it does not verify).
    /// Only its public key and subject CN are used: the identity is `identity` if given, else the
    /// CN. Requested extensions are ignored; the certificate is built from the profile. A server
    /// profile takes its SANs from `sans` only (at least one), never from the CSR.
    /// The certificate and chain go to the leaf directory; there is no key file.
    pub fn sign_csr(
        &self,
        csr_pem_or_der: &[u8],
        profile: LeafKind,
        identity: Option<&str>,
        sans: &[String],
        opts: &IssueOptions,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, PkiError> {
        let info = csr::parse_and_verify(csr_pem_or_der)?;
        let name = match identity {
            Some(id) => id.to_owned(),
            None => info
                .common_name
                .clone()
                .ok_or(PkiError::CsrMissingCommonName)?,
        };
        let sans = sans
            .iter()
            .map(|s| SanValue::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = LeafSpec::new(profile, &name, sans)?.with_role(opts.role.as_deref())?;
        let days = check_validity(
            opts.validity_days
                .unwrap_or_else(|| profile.default_validity_days()),
        )?;
        let _lock = self.lock()?;
        let issuer = self.load_issuer(CrlIssuer::Issuing)?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let detail = format!(
            "CSR key {}, CN {:?}; {} requested extension(s) ignored",
            info.key_alg,
            info.common_name.as_deref().unwrap_or(""),
            info.ignored_extensions
        );
        let issued = self.certify(
            &mut ctx,
            &issuer,
            &spec,
            KeySource::PublicKey {
                spki_der: info.spki_der,
                key_alg: info.key_alg,
            },
            &CertifyArgs {
                validity_days: days,
                origin: Origin::Csr,
                action: LogAction::SignCsr,
                replace: opts.replace,
                actor: &opts.actor,
                now,
                sync: true,
                detail: Some(detail),
            },
        )?;
        flush(&self.layout, &mut ctx)?;
        Ok(issued)
    }

    /// The core of every leaf issuance: checks the identity is free (or supersedes the current
    /// certificate when `replace`), builds the certificate from the profile, signs it, archives the
    /// superseded certificate, writes the files, records inventory entry and log lines in `ctx`.
    pub(crate) fn certify(
        &self,
        ctx: &mut OpCtx,
        issuer: &Issuer<'_, KeyPair>,
        spec: &LeafSpec,
        key: KeySource,
        args: &CertifyArgs<'_>,
    ) -> Result<IssuedCertificate, PkiError> {
        let kind = spec.kind;
        ctx.check_device_id(kind, &spec.name)?;
        let existing = ctx.current(kind, &spec.name);
        if let Some(i) = existing {
            let e = &ctx.inv.certificates[i];
            if args.now < e.not_after && !args.replace {
                return Err(PkiError::AlreadyIssued {
                    kind,
                    name: spec.name.clone(),
                    serial: e.serial.clone(),
                    not_after: e.not_after,
                });
            }
        }

        let now = to_cert_time(args.now);
        let not_before = now - NOT_BEFORE_SKEW;
        let not_after =
            (now + Duration::days(args.validity_days.into())).min(self.issuing_not_after);
        if not_after <= now {
            return Err(PkiError::IssuingCaExpired {
                not_after: self.issuing_not_after,
            });
        }
        let serial = ctx.fresh_serial();
        let crl_dp = self
            .crl_url()?
            .map(|u| format!("{}/issuing.crl.pem", u.trim_end_matches('/')));
        let crl_dp = crl_dp.as_deref();

        let (cert, private, key_alg) = match key {
            KeySource::Generate(alg) => {
                let kp = alg.generate()?;
                let params = spec.params(alg.is_rsa(), &serial, not_before, not_after, crl_dp)?;
                (
                    sign_leaf(&params, &kp, issuer)?,
                    Some(kp),
                    alg.as_str().to_owned(),
                )
            }
            KeySource::Keep(kp) => {
                let key_alg = keys::describe_public_key(&kp.subject_public_key_info())?;
                let params = spec.params(
                    key_alg.starts_with("rsa"),
                    &serial,
                    not_before,
                    not_after,
                    crl_dp,
                )?;
                (sign_leaf(&params, &kp, issuer)?, Some(kp), key_alg)
            }
            KeySource::PublicKey { spki_der, key_alg } => {
                let spki = rcgen::SubjectPublicKeyInfo::from_der(&spki_der).map_err(|e| {
                    PkiError::UnsupportedKey {
                        reason: e.to_string(),
                    }
                })?;
                let params = spec.params(
                    key_alg.starts_with("rsa"),
                    &serial,
                    not_before,
                    not_after,
                    crl_dp,
                )?;
                (sign_leaf(&params, &spki, issuer)?, None, key_alg)
            }
        };
        let der = cert.der().clone();
        let facts = CertFacts::read(&der, &self.layout.leaf_cert(kind, &spec.name))?;

        let cert_path = self.layout.leaf_cert(kind, &spec.name);
        let key_path = self.layout.leaf_key(kind, &spec.name);
        let chain_path = self.layout.leaf_chain(kind, &spec.name);
        ensure_dir(&self.layout.leaf_dir(kind, &spec.name), 0o755)?;

        // Supersede the current certificate of this identity.
        let mut superseded = None;
        if let Some(i) = existing {
            let old = &mut ctx.inv.certificates[i];
            old.superseded = Some(Supersession {
                at: args.now,
                by: Some(facts.serial.clone()),
            });
            old.key_on_disk = false;
            let old_serial = old.serial.clone();
            let old_fp = old.fingerprint.clone();
            if cert_path.exists() {
                let archived = self.layout.archived_cert(&old_serial);
                ensure_dir(&self.layout.archive_dir(), 0o755)?;
                std::fs::rename(&cert_path, &archived)
                    .map_err(PkiError::io("archiving", &cert_path))?;
            }
            ctx.log(
                args.now,
                args.actor,
                args.action,
                Draft {
                    kind: Some(kind.as_str().into()),
                    identity: Some(spec.name.clone()),
                    serial: Some(old_serial.clone()),
                    fingerprint: Some(old_fp),
                    detail: Some(format!("superseded by {}", facts.serial)),
                    ..Draft::default()
                },
            );
            ctx.forget_current(CertKind::from(kind), &spec.name);
            superseded = Some(old_serial);
        }

        match &private {
            Some(kp) => write_atomic(
                &key_path,
                keys::private_key_pem(kp).as_bytes(),
                PRIVATE_MODE,
                args.sync,
            )?,
            None => remove_if_exists(&key_path)?,
        }
        let leaf_pem = cert_pem(&der);
        write_atomic(&cert_path, leaf_pem.as_bytes(), PUBLIC_MODE, args.sync)?;
        let chain = format!("{leaf_pem}{}", cert_pem(&self.issuing));
        write_atomic(&chain_path, chain.as_bytes(), PUBLIC_MODE, args.sync)?;

        let mut detail = format!("key {key_alg}, valid until {}", fmt_time(facts.not_after));
        if let Some(extra) = &args.detail {
            detail.push_str("; ");
            detail.push_str(extra);
        }
        ctx.log(
            args.now,
            args.actor,
            args.action,
            Draft {
                kind: Some(kind.as_str().into()),
                identity: Some(spec.name.clone()),
                serial: Some(facts.serial.clone()),
                fingerprint: Some(facts.fingerprint.clone()),
                detail: Some(detail),
                ..Draft::default()
            },
        );
        ctx.push_entry(InventoryEntry {
            serial: facts.serial.clone(),
            kind: kind.into(),
            name: spec.name.clone(),
            subject: facts.subject,
            sans: spec.san_strings(),
            role: spec.role.clone(),
            key_alg: key_alg.clone(),
            not_before: facts.not_before,
            not_after: facts.not_after,
            validity_days: args.validity_days,
            fingerprint: facts.fingerprint.clone(),
            issued_at: args.now,
            issued_by: args.actor.to_owned(),
            origin: args.origin,
            key_on_disk: private.is_some(),
            revoked: None,
            superseded: None,
        });

        Ok(IssuedCertificate {
            kind,
            name: spec.name.clone(),
            serial: facts.serial,
            fingerprint: facts.fingerprint,
            key_alg,
            not_before: facts.not_before,
            not_after: facts.not_after,
            certificate: der,
            cert_path,
            chain_path,
            key_path: private.is_some().then_some(key_path),
            superseded,
        })
    }

    // ----- renewal --------------------------------------------------------------------------

    /// Re-issues every current leaf that is still valid at `now` and expires within
    /// `within_days`: same identity, profile, SANs and validity length, a new serial and — unless
    /// `keep_key` — a new key of the same algorithm. With `keep_key`, the key on disk is reused;
    /// for a certificate made from a CSR (no key on disk) the same public key is certified again.
    /// The old certificate goes to `archive/` and is marked superseded (not revoked).
    pub fn renew(
        &self,
        within_days: u32,
        keep_key: bool,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<Renewal>, PkiError> {
        let _lock = self.lock()?;
        let inv = self.load_inventory()?;
        let horizon = now + Duration::days(within_days.into());
        let due: Vec<InventoryEntry> = inv
            .certificates
            .iter()
            .filter(|c| {
                c.kind.leaf().is_some()
                    && c.is_current()
                    && now < c.not_after
                    && c.not_after <= horizon
            })
            .cloned()
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let issuer = self.load_issuer(CrlIssuer::Issuing)?;
        let mut ctx = OpCtx::new(inv);
        let mut renewals = Vec::with_capacity(due.len());
        for old in due {
            let Some(kind) = old.kind.leaf() else {
                continue;
            };
            let sans = old
                .sans
                .iter()
                .map(|s| SanValue::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            let spec = LeafSpec::new(kind, &old.name, sans)?.with_role(old.role.as_deref())?;
            let key_path = self.layout.leaf_key(kind, &old.name);
            let (source, new_key) = if keep_key && old.key_on_disk && key_path.exists() {
                let pem = read_file(&key_path, "the leaf key vanished while renewing")?;
                (
                    KeySource::Keep(keys::load_private_key(&key_path, &pem, None)?),
                    false,
                )
            } else if keep_key && !old.key_on_disk {
                let der = self.current_cert_der(kind, &old)?;
                let facts = CertFacts::read(&der, &self.layout.leaf_cert(kind, &old.name))?;
                (
                    KeySource::PublicKey {
                        spki_der: facts.spki_raw,
                        key_alg: old.key_alg.clone(),
                    },
                    false,
                )
            } else {
                let alg = old.key_alg.parse::<LeafKeyAlg>().unwrap_or_default();
                (KeySource::Generate(alg), true)
            };
            let origin = match (&source, old.origin) {
                (KeySource::PublicKey { .. }, _) => Origin::Csr,
                (KeySource::Keep(_), origin) => origin,
                (KeySource::Generate(_), _) => Origin::Generated,
            };
            let issued = self.certify(
                &mut ctx,
                &issuer,
                &spec,
                source,
                &CertifyArgs {
                    validity_days: old.validity_days,
                    origin,
                    action: LogAction::Renew,
                    replace: true,
                    actor,
                    now,
                    sync: true,
                    detail: Some(format!("renewal of {}", old.serial)),
                },
            )?;
            renewals.push(Renewal {
                kind,
                name: old.name.clone(),
                old_serial: old.serial.clone(),
                old_not_after: old.not_after,
                new_serial: issued.serial,
                new_not_after: issued.not_after,
                new_key,
            });
        }
        flush(&self.layout, &mut ctx)?;
        Ok(renewals)
    }

    /// The DER of the current certificate of a leaf, checked against its inventory entry.
    fn current_cert_der(
        &self,
        kind: LeafKind,
        entry: &InventoryEntry,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let path = self.layout.leaf_cert(kind, &entry.name);
        let der = load_cert(&path, "the certificate file is missing; re-issue it")?;
        if oplog::sha256_hex(&der) != entry.fingerprint {
            return Err(PkiError::bad_file(
                &path,
                format!(
                    "is not certificate {} recorded in the inventory",
                    entry.serial
                ),
            ));
        }
        Ok(der)
    }

    // ----- reading --------------------------------------------------------------------------

    /// Every certificate in the inventory with its status at `now` (expiring = within 30 days).
    pub fn list(&self, now: OffsetDateTime) -> Result<Vec<CertificateRecord>, PkiError> {
        self.list_with(now, DEFAULT_EXPIRING_WITHIN)
    }

    /// Every certificate in the inventory with its status at `now`, counting those that expire
    /// within `expiring_within` as expiring.
    pub fn list_with(
        &self,
        now: OffsetDateTime,
        expiring_within: Duration,
    ) -> Result<Vec<CertificateRecord>, PkiError> {
        Ok(self
            .load_inventory()?
            .certificates
            .into_iter()
            .map(|entry| {
                let status = entry.status(now, expiring_within);
                CertificateRecord { entry, status }
            })
            .collect())
    }

    /// The operation log, every line checked against the hash chain and the head recorded in the
    /// inventory.
    pub fn log(&self) -> Result<LogReport, PkiError> {
        let inv = self.load_inventory()?;
        oplog::verify(&self.layout.log(), inv.log_head.as_ref())
    }
}

/// Appends the pending log lines and saves the inventory with the new log head.
pub(crate) fn flush(layout: &Layout, ctx: &mut OpCtx) -> Result<(), PkiError> {
    let pending = std::mem::take(&mut ctx.pending);
    if !pending.is_empty()
        && let Some(head) = oplog::append(&layout.log(), pending)?
    {
        ctx.inv.log_head = Some(head);
    }
    ctx.inv.save(&layout.inventory())
}

/// Checks that `cert` names `issuer` as its issuer and carries its signature.
pub(crate) fn verify_issued_by(cert: &[u8], issuer: &[u8]) -> Result<(), String> {
    let (_, c) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    let (_, i) = X509Certificate::from_der(issuer).map_err(|e| e.to_string())?;
    if c.issuer().as_raw() != i.subject().as_raw() {
        return Err(format!("its issuer is {}, not {}", c.issuer(), i.subject()));
    }
    c.verify_signature(Some(i.public_key()))
        .map_err(|_| "the signature does not verify".to_owned())
}

/// RFC 3339 text of a time.
pub(crate) fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_normalisation() {
        assert_eq!(normalize_serial("0A:1b").unwrap(), "0a1b");
        assert_eq!(normalize_serial("0x00ff").unwrap(), "ff");
        assert_eq!(normalize_serial("abc").unwrap(), "0abc");
        assert_eq!(normalize_serial("00").unwrap(), "00");
        assert!(matches!(
            normalize_serial("xyz"),
            Err(PkiError::InvalidSerial { .. })
        ));
        assert!(matches!(
            normalize_serial(""),
            Err(PkiError::InvalidSerial { .. })
        ));
        assert_eq!(serial_hex(&[0, 0, 1, 2]), "0102");
    }
}
