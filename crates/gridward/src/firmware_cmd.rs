//! `gridward firmware ...`: firmware updates on the command line.
//!
//! The manufacturer's side: a signing key pair (`keygen`), signed manifests (`sign`), and
//! checking a manifest and its image (`inspect`). The manufacturer key never goes to the
//! head-end: the head-end only distributes manifests and images, and meters trust the
//! manufacturer's public key (`gridward_core::firmware`).
//!
//! Argument parsing, files and printing only; the manifest format and its checks are
//! `gridward_core::firmware`. This is the only place this code gets the clock.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gridward_core::envelope::{SigningKey, VerifyingKey};
use gridward_core::firmware::{
    MANIFEST_VERSION, MAX_IMAGE_BYTES, MAX_MANIFEST_BYTES, Manifest, decode_unverified,
    sign_manifest, verify_manifest,
};
use gridward_pki::{LeafKeyAlg, StandaloneKeyPair};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Prints a line to stdout, ignoring write errors (a closed pipe, as in `| head`, must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// File name of the manufacturer's private key in `keygen --out DIR`.
pub const PRIVATE_KEY_FILE: &str = "manufacturer.key.pem";
/// File name of the manufacturer's public key in `keygen --out DIR`.
pub const PUBLIC_KEY_FILE: &str = "manufacturer.pub.pem";

/// Firmware updates: the manufacturer's key, signed manifests, checks.
#[derive(Debug, Subcommand)]
pub enum FirmwareCmd {
    /// Generate a manufacturer signing key pair: DIR/manufacturer.key.pem (PKCS#8, mode 0600)
    /// and DIR/manufacturer.pub.pem (the public key meters trust).
    Keygen(KeygenArgs),
    /// Sign a manifest for a firmware image with the manufacturer key (SHA-256 and size of the
    /// image, vendor, class, version, sequence) and write it as COSE_Sign1.
    Sign(SignArgs),
    /// Show a manifest's fields; with --manufacturer, check its signature; with --image, check
    /// the image's size and digest. Exits non-zero if a check fails.
    Inspect(InspectArgs),
    /// Store a signed manifest and its image in the head-end (the signature must be a key of
    /// `[firmware] manufacturers`, the image must match); prints the firmware id.
    Upload(crate::firmware_ops::UploadArgs),
    /// The firmware uploaded to the head-end.
    List(crate::firmware_ops::ListArgs),
    /// Roll an uploaded firmware out to meters: a pilot stage, then the rest once enough of
    /// the pilot confirmed; pauses on failures. The running head-end dispatches it.
    Campaign(crate::firmware_ops::CampaignArgs),
    /// Campaigns and, for one, each meter's state.
    Status(crate::firmware_ops::StatusArgs),
    /// Pause a campaign (its unsent commands are withdrawn).
    Pause(crate::firmware_ops::ChangeArgs),
    /// Resume a paused campaign (failed members are tried again).
    Resume(crate::firmware_ops::ChangeArgs),
    /// Cancel a campaign for good.
    Cancel(crate::firmware_ops::ChangeArgs),
}

/// Signature algorithm of a manufacturer key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgArg {
    /// Ed25519 (COSE EdDSA).
    Eddsa,
    /// ECDSA P-256 with SHA-256 (COSE ES256).
    Es256,
}

impl From<AlgArg> for LeafKeyAlg {
    fn from(a: AlgArg) -> Self {
        match a {
            AlgArg::Eddsa => Self::Ed25519,
            AlgArg::Es256 => Self::P256,
        }
    }
}

/// Arguments of `gridward firmware keygen`.
#[derive(Debug, Args)]
#[command(
    after_help = "Keep manufacturer.key.pem offline; give manufacturer.pub.pem to the meters (and to `gridward firmware inspect --manufacturer`). Existing files are never overwritten."
)]
pub struct KeygenArgs {
    /// Directory for the key pair (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Signature algorithm.
    #[arg(long, value_enum, default_value = "eddsa")]
    alg: AlgArg,
}

/// Arguments of `gridward firmware sign`.
#[derive(Debug, Args)]
// `--version` is the firmware version here, not the program's.
#[command(disable_version_flag = true)]
pub struct SignArgs {
    /// The manufacturer's private key (PKCS#8 PEM, from `gridward firmware keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The firmware image.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Vendor id (1 to 64 characters from A-Z a-z 0-9 _ . -).
    #[arg(long, value_name = "V")]
    vendor: String,
    /// Device class id (1 to 64 characters from A-Z a-z 0-9 _ . -).
    #[arg(long, value_name = "C")]
    class: String,
    /// Firmware version X.Y.Z.
    #[arg(long, value_name = "X.Y.Z")]
    version: String,
    /// Sequence number: meters install only a sequence greater than the installed one.
    #[arg(long, value_name = "N")]
    sequence: u64,
    /// Meters refuse the manifest after this instant (RFC 3339, e.g. 2026-01-31T00:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    expires: Option<OffsetDateTime>,
    /// An explicit rollback: meters may install this manifest over installed sequence SEQ
    /// although its own sequence is not greater (and over nothing else).
    #[arg(long, value_name = "SEQ")]
    rollback_from: Option<u64>,
    /// Where to write the manifest [default: IMAGE.manifest].
    #[arg(long, value_name = "MANIFEST")]
    out: Option<PathBuf>,
    /// Overwrite the manifest file if it exists.
    #[arg(long)]
    force: bool,
}

/// Arguments of `gridward firmware inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The manifest (COSE_Sign1, from `gridward firmware sign`).
    #[arg(value_name = "MANIFEST")]
    manifest: PathBuf,
    /// A trusted manufacturer public key (SPKI PEM); repeat for several. The signature must
    /// verify with one of them.
    #[arg(long, value_name = "PUB")]
    manufacturer: Vec<PathBuf>,
    /// The image: its size and SHA-256 must be the manifest's.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
}

/// Runs `gridward firmware ...`.
pub fn run(cmd: FirmwareCmd) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    match cmd {
        FirmwareCmd::Keygen(a) => keygen(a),
        FirmwareCmd::Sign(a) => sign(a, now),
        FirmwareCmd::Inspect(a) => inspect(a, now),
        FirmwareCmd::Upload(a) => crate::firmware_ops::upload(a),
        FirmwareCmd::List(a) => crate::firmware_ops::list(a),
        FirmwareCmd::Campaign(a) => crate::firmware_ops::campaign(a),
        FirmwareCmd::Status(a) => crate::firmware_ops::status(a),
        FirmwareCmd::Pause(a) => crate::firmware_ops::change(a, crate::firmware_ops::Change::Pause),
        FirmwareCmd::Resume(a) => {
            crate::firmware_ops::change(a, crate::firmware_ops::Change::Resume)
        }
        FirmwareCmd::Cancel(a) => {
            crate::firmware_ops::change(a, crate::firmware_ops::Change::Cancel)
        }
    }
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time such as 2026-01-31T00:00:00Z: {e}"))
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn keygen(a: KeygenArgs) -> Result<()> {
    let private = a.out.join(PRIVATE_KEY_FILE);
    let public = a.out.join(PUBLIC_KEY_FILE);
    // Check both before writing either, so a refusal leaves nothing half-done.
    for path in [&private, &public] {
        if path.exists() {
            bail!(
                "{} exists; refusing to overwrite a manufacturer key (images signed with it would no longer verify). Move it away or pick another --out",
                path.display()
            );
        }
    }
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pair = StandaloneKeyPair::generate(a.alg.into()).context("generating the key pair")?;
    // The same checks a signer and a meter make, before anything is written.
    let key = SigningKey::from_pkcs8_pem(&pair.private_key_pem)
        .context("the generated private key does not load")?;
    write_new(&private, pair.private_key_pem.as_bytes(), 0o600)?;
    write_new(&public, pair.public_key_pem.as_bytes(), 0o644)?;
    say!(
        "generated a manufacturer key pair ({})",
        key.algorithm().name()
    );
    say!(
        "  private key: {} (mode 0600; keep it offline)",
        private.display()
    );
    say!(
        "  public key:  {} (give it to the meters)",
        public.display()
    );
    say!("  key id:      {}", hex::encode(key.kid()));
    Ok(())
}

/// Creates `path` with `mode`, refusing to replace an existing file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                anyhow::anyhow!("{} exists; refusing to overwrite it", path.display())
            } else {
                anyhow::Error::new(e).context(format!("creating {}", path.display()))
            }
        })?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Reads a file of at most `max` bytes (checked before reading), naming `what` in errors.
fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?
        .len();
    if len > max {
        bail!(
            "the {what} {} is {len} bytes; at most {max} are accepted",
            path.display()
        );
    }
    fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// SHA-256 and size of an image file (at most [`MAX_IMAGE_BYTES`]).
fn measure_image(path: &Path) -> Result<([u8; 32], u64)> {
    let image = read_bounded(path, MAX_IMAGE_BYTES, "image")?;
    let digest: [u8; 32] = Sha256::digest(&image).into();
    Ok((digest, image.len() as u64))
}

fn sign(a: SignArgs, now: OffsetDateTime) -> Result<()> {
    let pem = fs::read_to_string(&a.key)
        .with_context(|| format!("reading the manufacturer key {}", a.key.display()))?;
    let key = SigningKey::from_pkcs8_pem(&pem).with_context(|| {
        format!(
            "{}: not a manufacturer private key (unencrypted PKCS#8 PEM, from `gridward firmware keygen`)",
            a.key.display()
        )
    })?;
    if let Some(expires) = a.expires
        && expires <= now
    {
        bail!(
            "--expires {} is in the past: every meter would refuse the manifest",
            fmt_time(expires)
        );
    }
    let out = a.out.clone().unwrap_or_else(|| {
        let mut name = a.image.clone().into_os_string();
        name.push(".manifest");
        PathBuf::from(name)
    });
    if !a.force && out.exists() {
        bail!("{} exists; pass --force to overwrite it", out.display());
    }
    let (digest, size) = measure_image(&a.image)?;
    if size == 0 {
        bail!("the image {} is empty", a.image.display());
    }
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        sequence: a.sequence,
        vendor_id: a.vendor,
        class_id: a.class,
        version: a.version,
        digest,
        size,
        expires_at: a.expires,
        rollback_from: a.rollback_from,
    };
    let signed = sign_manifest(&key, &manifest).context("signing the manifest")?;
    // Check what we are about to hand out, as a meter would.
    let verifying = key
        .verifying_key()
        .context("deriving the manufacturer public key")?;
    verify_manifest(&signed, &[verifying]).context("the manifest just signed does not verify")?;
    if a.force {
        match fs::remove_file(&out) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", out.display())),
        }
    }
    write_new(&out, &signed, 0o644)?;
    say!(
        "signed manifest for {}/{} version {} (sequence {})",
        manifest.vendor_id,
        manifest.class_id,
        manifest.version,
        manifest.sequence
    );
    print_fields(&manifest);
    say!(
        "  signed by:     {} key {}",
        key.algorithm().name(),
        hex::encode(key.kid())
    );
    say!("  image:         {}", a.image.display());
    say!(
        "  manifest:      {} ({} bytes)",
        out.display(),
        signed.len()
    );
    Ok(())
}

/// Prints the fields of a manifest, one per line.
fn print_fields(m: &Manifest) {
    say!("  vendor:        {}", m.vendor_id);
    say!("  class:         {}", m.class_id);
    say!("  version:       {}", m.version);
    say!("  sequence:      {}", m.sequence);
    say!("  image size:    {} bytes", m.size);
    say!("  image sha256:  {}", hex::encode(m.digest));
    say!(
        "  expires:       {}",
        m.expires_at.map_or_else(|| "never".to_owned(), fmt_time)
    );
    match m.rollback_from {
        Some(seq) => say!("  rollback from: sequence {seq} (explicit rollback)"),
        None => say!("  rollback from: - (not a rollback)"),
    }
}

fn inspect(a: InspectArgs, now: OffsetDateTime) -> Result<()> {
    let bytes = read_bounded(&a.manifest, MAX_MANIFEST_BYTES as u64, "manifest")?;
    let manifest = decode_unverified(&bytes)
        .with_context(|| format!("{} is not a firmware manifest", a.manifest.display()))?;
    say!("manifest {} ({} bytes)", a.manifest.display(), bytes.len());
    print_fields(&manifest);
    if manifest.expires_at.is_some_and(|t| t <= now) {
        say!("  note:          expired: meters refuse it now");
    }

    if a.manufacturer.is_empty() {
        say!("  signature:     not checked (pass --manufacturer PUB)");
    } else {
        let mut keys = Vec::with_capacity(a.manufacturer.len());
        for path in &a.manufacturer {
            let pem = fs::read_to_string(path)
                .with_context(|| format!("reading the manufacturer key {}", path.display()))?;
            keys.push(VerifyingKey::from_spki_pem(&pem).with_context(|| {
                format!(
                    "{}: not a public key (SPKI PEM, `-----BEGIN PUBLIC KEY-----`)",
                    path.display()
                )
            })?);
        }
        let verified = verify_manifest(&bytes, &keys).with_context(|| {
            format!(
                "REFUSED: {} is not validly signed by the manufacturer key(s) given",
                a.manifest.display()
            )
        })?;
        // The verified fields are the ones shown (decoding is deterministic, but say so only
        // if they agree).
        if verified.manifest() != &manifest {
            bail!("REFUSED: the verified manifest differs from its unverified reading");
        }
        say!(
            "  signature:     ok (manufacturer key {})",
            hex::encode(verified.signer_kid())
        );
    }

    match &a.image {
        None => say!("  image:         not checked (pass --image FILE)"),
        Some(path) => {
            let (digest, size) = measure_image(path)?;
            if size != manifest.size {
                bail!(
                    "REFUSED: the image {} is {size} bytes, the manifest says {}",
                    path.display(),
                    manifest.size
                );
            }
            if digest != manifest.digest {
                bail!(
                    "REFUSED: the image {} has SHA-256 {}, the manifest says {}",
                    path.display(),
                    hex::encode(digest),
                    hex::encode(manifest.digest)
                );
            }
            say!(
                "  image:         ok ({} matches size and SHA-256)",
                path.display()
            );
        }
    }
    Ok(())
}
