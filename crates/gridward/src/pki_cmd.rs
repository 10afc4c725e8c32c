//! `gridward pki ...`: the certificate authority on the command line.
//!
//! Argument parsing and printing only; everything else is `gridward_pki::Pki`.
//! This is the only place the PKI code gets the clock (`OffsetDateTime::now_utc()`), the
//! environment (`$USER`) and secrets from files.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gridward_core::MeterId;
use gridward_pki::crl::DEFAULT_CRL_DAYS;
use gridward_pki::{
    CaKeyAlg, CertKind, CertificateRecord, ChainStatus, InitOptions, IssueOptions,
    IssuedCertificate, LeafKeyAlg, LeafKind, LogReport, Pki, RevocationReason, RevokeTarget,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Prints a line to stdout, ignoring write errors (a closed pipe, as in `| head`, must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The certificate authority: CA set-up, issuance, CSR signing, revocation, CRLs, PKCS#12.
#[derive(Debug, Args)]
#[command(
    after_help = "Every command works on one PKI directory (--dir). Start with `gridward pki init --dir DIR`."
)]
pub struct PkiArgs {
    #[command(subcommand)]
    command: PkiCommand,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a new CA (root and issuing CA, empty CRLs) in an empty PKI directory.
    Init(InitArgs),
    /// Issue a certificate with a new key (meter, server, client or command-signer).
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Certify the public key of a CSR (OpenSSL or keytool) under a profile; requested extensions are ignored.
    SignCsr(SignCsrArgs),
    /// Revoke a certificate and write a new issuing CRL.
    Revoke(RevokeArgs),
    /// Write fresh CRLs for both CAs (new CRL number, new nextUpdate).
    Crl(CrlArgs),
    /// Re-issue every valid certificate that expires within a number of days.
    Renew(RenewArgs),
    /// List every certificate ever issued, with its status.
    List(ListArgs),
    /// Show the operation log and verify its hash chain.
    Log(LogArgs),
    /// Export a key and its chain, or the CA certificates, as a PKCS#12 file (keytool-compatible).
    Export(ExportArgs),
    /// Import a PKCS#12 file: keys issued by this CA, and trusted certificates.
    Import(ImportArgs),
    /// Try it out: create a CA, a server, a client and a batch of meters, revoke one, list them.
    Quickstart(QuickstartArgs),
}

/// Arguments of `gridward pki quickstart`.
#[derive(Debug, Args)]
struct QuickstartArgs {
    #[command(flatten)]
    dir: DirArg,
    /// How many meters to issue (ids m000001, m000002, ...).
    #[arg(long, default_value_t = 100, value_name = "N")]
    meters: usize,
}

/// The PKI directory.
#[derive(Debug, Args)]
struct DirArg {
    /// The PKI directory (created by `gridward pki init`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Who acts, and the CA key passphrase, for commands that sign.
#[derive(Debug, Args)]
struct SignerArgs {
    /// File whose first line is the passphrase of the CA keys (needed when they are encrypted).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Name recorded as the actor in the log and inventory [default: $USER, else gridward-cli].
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
}

impl SignerArgs {
    fn passphrase(&self) -> Result<Option<String>> {
        self.passphrase_file
            .as_deref()
            .map(|p| read_secret(p, "passphrase"))
            .transpose()
    }
    fn actor(&self) -> String {
        actor(self.actor.as_deref())
    }
    fn open(&self, dir: &Path) -> Result<Pki> {
        Ok(Pki::open(dir, self.passphrase()?)?)
    }
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Use RSA 3072 CA keys instead of ECDSA P-256.
    #[arg(long)]
    rsa: bool,
    /// Encrypt the CA keys with the passphrase in the first line of this file (PBES2, AES-256-CBC).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Organisation name in the CA subjects.
    #[arg(long, value_name = "NAME", default_value = gridward_pki::ca::DEFAULT_ORG)]
    org: String,
    /// Root CA validity in days.
    #[arg(long, value_name = "DAYS", default_value_t = gridward_pki::ca::DEFAULT_ROOT_VALIDITY_DAYS)]
    root_days: u32,
    /// Issuing CA validity in days (never beyond the root's).
    #[arg(long, value_name = "DAYS", default_value_t = gridward_pki::ca::DEFAULT_ISSUING_VALIDITY_DAYS)]
    issuing_days: u32,
    /// Where the CRLs in DIR/crl will be published (http:// or https:// URL of a directory):
    /// every leaf then names {URL}/issuing.crl.pem as its CRL distribution point, for relying
    /// parties and scanners outside Gridward.
    #[arg(long, value_name = "URL")]
    crl_url: Option<String>,
    /// Name recorded as the actor in the log and inventory [default: $USER, else gridward-cli].
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
}

/// Key algorithm of a generated leaf key.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum AlgArg {
    /// ECDSA P-256.
    P256,
    /// Ed25519.
    Ed25519,
    /// RSA 2048.
    Rsa2048,
    /// RSA 3072.
    Rsa3072,
}

impl From<AlgArg> for LeafKeyAlg {
    fn from(a: AlgArg) -> Self {
        match a {
            AlgArg::P256 => Self::P256,
            AlgArg::Ed25519 => Self::Ed25519,
            AlgArg::Rsa2048 => Self::Rsa2048,
            AlgArg::Rsa3072 => Self::Rsa3072,
        }
    }
}

/// Leaf certificate profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KindArg {
    /// Meter: CN = id, URI SAN urn:gridward:meter:{id}, EKU clientAuth.
    Meter,
    /// Server: CN = name, DNS/IP SANs from --san, EKU serverAuth.
    Server,
    /// Client: CN = name, URI SAN urn:gridward:client:{name}, EKU clientAuth.
    Client,
    /// Command signer: CN = name, no SAN, EKU Gridward command signing only (never TLS).
    CommandSigner,
    /// Data concentrator: CN = id, URI SAN urn:gridward:concentrator:{id}, EKU clientAuth.
    Concentrator,
}

impl From<KindArg> for LeafKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Meter => Self::Meter,
            KindArg::Server => Self::Server,
            KindArg::Client => Self::Client,
            KindArg::CommandSigner => Self::CommandSigner,
            KindArg::Concentrator => Self::Concentrator,
        }
    }
}

/// Options shared by every issuance.
#[derive(Debug, Args)]
struct LeafOpts {
    /// Validity in days [default: meter and concentrator 3650, server 365, client 730, command-signer 365; capped at the issuing CA's end].
    #[arg(long, value_name = "N")]
    days: Option<u32>,
    /// Supersede the identity's current valid certificate instead of refusing.
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    signer: SignerArgs,
}

impl LeafOpts {
    fn issue_options(&self, alg: Option<AlgArg>) -> IssueOptions {
        let mut opts = IssueOptions::new(self.signer.actor());
        if let Some(alg) = alg {
            opts.key_alg = alg.into();
        }
        opts.validity_days = self.days;
        opts.replace = self.replace;
        opts
    }
}

#[derive(Debug, Subcommand)]
enum IssueCommand {
    /// A meter certificate (or --count of them); key and certificate go to DIR/meters/{id}/.
    Meter(IssueMeterArgs),
    /// A server certificate for the HES endpoints; goes to DIR/servers/{name}/.
    Server(IssueServerArgs),
    /// A client certificate (forwarder, API client); goes to DIR/clients/{name}/.
    Client(IssueClientArgs),
    /// The head-end's command-signing certificate: signs commands to meters, never TLS
    /// (EKU 2.25.69624272076528213008981749226765987101 only); goes to DIR/command-signers/{name}/.
    #[command(
        after_help = "Rotate with --replace (or `gridward pki renew`): the superseded certificate stays pinned by meters until it expires or is revoked. Profile and OID: docs/pki.md."
    )]
    CommandSigner(IssueCommandSignerArgs),
    /// A data concentrator certificate (or --count of them); key and certificate go to
    /// DIR/concentrators/{id}/.
    #[command(
        after_help = "A concentrator relays its meters' own signed envelopes on concentrators/{id}/relay and signs its own events (docs/wire-format.md §11). Its id has a meter id's syntax and is never also a meter's: an id ever issued to a meter is refused, and `issue meter` refuses a concentrator's id. Profile: docs/pki.md."
    )]
    Concentrator(IssueConcentratorArgs),
}

#[derive(Debug, Args)]
struct IssueConcentratorArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The concentrator id (its CN, URI SAN urn:gridward:concentrator:{id}, MQTT ClientID and
    /// directory name): A-Z a-z 0-9 . _ -, at most 64 characters, e.g. dc-1.
    #[arg(
        long,
        visible_alias = "id",
        value_name = "ID",
        required_unless_present = "count",
        conflicts_with = "count"
    )]
    name: Option<String>,
    /// Issue this many concentrators at once, with ids {prefix}{n:06} numbered on from the highest existing one.
    #[arg(long, value_name = "N", requires = "prefix")]
    count: Option<usize>,
    /// Id prefix for --count (e.g. DC-).
    #[arg(long, value_name = "P", requires = "count")]
    prefix: Option<String>,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    alg: AlgArg,
    #[command(flatten)]
    opts: LeafOpts,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("signer_name").required(true).args(["name", "name_flag"]))]
struct IssueCommandSignerArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The command signer's name (its CN and directory name), e.g. hes.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// The name, as a flag (like the other kinds).
    #[arg(long = "name", value_name = "NAME", conflicts_with = "name")]
    name_flag: Option<String>,
    /// Key algorithm (the command envelope's COSE algorithm follows from it).
    #[arg(long, value_enum, default_value = "p256")]
    alg: AlgArg,
    #[command(flatten)]
    opts: LeafOpts,
}

#[derive(Debug, Args)]
struct IssueMeterArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The meter id (A-Z a-z 0-9 . _ -, at most 64 characters).
    #[arg(
        long,
        value_name = "ID",
        required_unless_present = "count",
        conflicts_with = "count"
    )]
    id: Option<String>,
    /// Issue this many meters at once, with ids {prefix}{n:06} numbered on from the highest existing one.
    #[arg(long, value_name = "N", requires = "prefix")]
    count: Option<usize>,
    /// Id prefix for --count (e.g. MTR-).
    #[arg(long, value_name = "P", requires = "count")]
    prefix: Option<String>,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    alg: AlgArg,
    #[command(flatten)]
    opts: LeafOpts,
}

#[derive(Debug, Args)]
struct IssueServerArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The server name (its CN and directory name).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Subject alternative names: IP addresses or DNS names (repeat, or separate with commas). At least one.
    #[arg(long, value_name = "DNS/IP", required = true, num_args = 1.., value_delimiter = ',')]
    san: Vec<String>,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    alg: AlgArg,
    #[command(flatten)]
    opts: LeafOpts,
}

#[derive(Debug, Args)]
struct IssueClientArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The client name (its CN, URI SAN urn:gridward:client:{name} and directory name).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// The API role this certificate grants (URI SAN urn:gridward:role:{role}): a program
    /// presenting it to the HTTPS API acts with that role. Without it the certificate is for
    /// downstream forwarding only and the API refuses it.
    #[arg(long, value_name = "ROLE", value_parser = ["operator", "auditor", "admin"])]
    role: Option<String>,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "p256")]
    alg: AlgArg,
    #[command(flatten)]
    opts: LeafOpts,
}

#[derive(Debug, Args)]
struct SignCsrArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The CSR file (PEM, including keytool's NEW CERTIFICATE REQUEST, or DER).
    #[arg(long, value_name = "FILE")]
    csr: PathBuf,
    /// The profile the certificate is built from (the CSR's requested extensions are ignored).
    #[arg(long, value_enum)]
    profile: KindArg,
    /// Where to write the PEM chain: certificate, issuing CA, root CA (a keytool certificate reply).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The identity (meter id or name) [default: the CSR's subject CN].
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Server profile only: subject alternative names (IP or DNS; repeat or comma-separate). Required for servers.
    #[arg(long, value_name = "DNS/IP", num_args = 1.., value_delimiter = ',')]
    san: Vec<String>,
    #[command(flatten)]
    opts: LeafOpts,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["serial", "id"]))]
struct RevokeArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Serial number of the certificate (hex; colons allowed).
    #[arg(long, value_name = "S")]
    serial: Option<String>,
    /// Identity whose current certificate to revoke (meter id, server, client or command-signer name).
    #[arg(long, value_name = "ID", visible_alias = "name")]
    id: Option<String>,
    /// Kind of the identity given with --id [default: whichever kind has it].
    #[arg(long, value_enum, requires = "id")]
    kind: Option<KindArg>,
    /// Reason: unspecified, keyCompromise, caCompromise, affiliationChanged, superseded, cessationOfOperation, privilegeWithdrawn.
    #[arg(long, value_name = "R")]
    reason: RevocationReason,
    #[command(flatten)]
    signer: SignerArgs,
}

#[derive(Debug, Args)]
struct CrlArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Days until nextUpdate.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CRL_DAYS)]
    days: u32,
    #[command(flatten)]
    signer: SignerArgs,
}

#[derive(Debug, Args)]
struct RenewArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Renew every valid certificate that expires within this many days.
    #[arg(long, value_name = "DAYS")]
    within: u32,
    /// Keep the existing key (or, for CSR certificates, re-certify the same public key) instead of generating a new one.
    #[arg(long)]
    keep_key: bool,
    #[command(flatten)]
    signer: SignerArgs,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Print JSON (one array of records) instead of a table.
    #[arg(long)]
    json: bool,
    /// Count certificates expiring within this many days as "expiring".
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    expiring_within: u32,
}

#[derive(Debug, Args)]
struct LogArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Print JSON (entries and chain status) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["id", "truststore"]))]
struct ExportArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Identity to export (a meter id unless --kind says otherwise).
    #[arg(long, value_name = "ID", visible_alias = "name")]
    id: Option<String>,
    /// Kind of the identity [default: meter].
    #[arg(long, value_enum, requires = "id")]
    kind: Option<KindArg>,
    /// Export the root and issuing CA certificates as trusted entries (a trust store) instead.
    #[arg(long)]
    truststore: bool,
    /// The PKCS#12 file to write (created with mode 0600).
    #[arg(long, value_name = "FILE")]
    p12: PathBuf,
    /// File whose first line is the PKCS#12 password.
    #[arg(long, value_name = "F")]
    password_file: PathBuf,
    /// Overwrite the PKCS#12 file if it exists.
    #[arg(long)]
    force: bool,
    /// Name recorded as the actor in the log [default: $USER, else gridward-cli].
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
}

#[derive(Debug, Args)]
struct ImportArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The PKCS#12 file to read.
    #[arg(long, value_name = "FILE")]
    p12: PathBuf,
    /// File whose first line is the PKCS#12 password.
    #[arg(long, value_name = "F")]
    password_file: PathBuf,
    /// Name recorded as the actor in the log [default: $USER, else gridward-cli].
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
}

/// Runs `gridward pki ...`.
pub fn run(args: PkiArgs) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    match args.command {
        PkiCommand::Init(a) => init(a, now),
        PkiCommand::Issue(c) => issue(c, now),
        PkiCommand::SignCsr(a) => sign_csr(a, now),
        PkiCommand::Revoke(a) => revoke(a, now),
        PkiCommand::Crl(a) => {
            let pki = a.signer.open(&a.dir.dir)?;
            for crl in pki.write_crls(now, a.days, &a.signer.actor())? {
                say!(
                    "wrote {} (CRL number {}, {} revoked, next update {})",
                    crl.path.display(),
                    crl.number,
                    crl.revoked,
                    fmt_time(crl.next_update)
                );
            }
            Ok(())
        }
        PkiCommand::Renew(a) => {
            let pki = a.signer.open(&a.dir.dir)?;
            let renewals = pki.renew(a.within, a.keep_key, &a.signer.actor(), now)?;
            if renewals.is_empty() {
                say!("nothing expires within {} days", a.within);
            }
            for r in renewals {
                say!(
                    "renewed {} {}: {} (until {}) -> {} (until {}){}",
                    r.kind,
                    r.name,
                    r.old_serial,
                    fmt_date(r.old_not_after),
                    r.new_serial,
                    fmt_date(r.new_not_after),
                    if r.new_key { ", new key" } else { ", same key" }
                );
            }
            Ok(())
        }
        PkiCommand::List(a) => list(a, now),
        PkiCommand::Log(a) => log(a),
        PkiCommand::Quickstart(a) => quickstart(a, now),
        PkiCommand::Export(a) => export(a, now),
        PkiCommand::Import(a) => {
            let password = read_secret(&a.password_file, "password")?;
            let bytes = fs::read(&a.p12).with_context(|| format!("reading {}", a.p12.display()))?;
            let pki = Pki::open(&a.dir.dir, None)?;
            let report = pki
                .import_p12(&bytes, &password, &actor(a.actor.as_deref()), now)
                .with_context(|| format!("importing {}", a.p12.display()))?;
            for k in &report.keys {
                say!(
                    "imported key {:?}: {} {} (serial {}{})",
                    k.alias,
                    k.kind,
                    k.name,
                    k.serial,
                    if k.new_to_inventory {
                        ", added to the inventory"
                    } else {
                        ", key restored"
                    }
                );
            }
            for t in &report.trusted {
                say!(
                    "imported trusted certificate {:?} -> {}",
                    t.alias,
                    t.path.display()
                );
            }
            for s in &report.skipped {
                say!("skipped {s:?}: it is this CA's own certificate");
            }
            if report.keys.is_empty() && report.trusted.is_empty() {
                say!("nothing to import");
            }
            Ok(())
        }
    }
}

fn quickstart(a: QuickstartArgs, now: OffsetDateTime) -> Result<()> {
    if a.meters == 0 {
        bail!("--meters must be at least 1");
    }
    let dir = &a.dir.dir;
    let actor = actor(None);
    say!(
        "1. creating a CA (root and issuing CA, P-256) in {}",
        dir.display()
    );
    let pki = Pki::init(dir, &InitOptions::new(actor.clone(), now))
        .with_context(|| format!("{} already holds a CA? pick another --dir", dir.display()))?;
    let opts = IssueOptions::new(actor.clone());
    say!(
        "2. issuing the head-end's server certificate (localhost, 127.0.0.1) and a billing client"
    );
    pki.issue_server(
        "localhost",
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        &opts,
        now,
    )?;
    pki.issue_client("billing", &opts, now)?;
    say!("3. issuing {} meter certificates", a.meters);
    let bar = indicatif::ProgressBar::new(a.meters as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("   {bar:40} {pos}/{len} meters ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let issued = pki.issue_meters("m", a.meters, &opts, now, &mut |n| {
        bar.set_position(n as u64)
    });
    bar.finish_and_clear();
    let issued = issued?;
    let Some(victim) = issued.last() else {
        bail!("no meter was issued")
    };
    say!(
        "4. revoking meter {} (keyCompromise) and writing the CRL",
        victim.name
    );
    pki.revoke(
        &RevokeTarget::Identity {
            kind: Some(LeafKind::Meter),
            name: victim.name.clone(),
        },
        RevocationReason::KeyCompromise,
        &actor,
        now,
    )?;
    let records = pki.list(now)?;
    let count = |kind: LeafKind| {
        records
            .iter()
            .filter(|r| r.entry.kind == CertKind::from(kind))
            .count()
    };
    say!(
        "\ndone: {} meters, {} server, {} client certificates in {}",
        count(LeafKind::Meter),
        count(LeafKind::Server),
        count(LeafKind::Client),
        dir.display()
    );
    let d = dir.display();
    say!("\nlook at it:");
    say!("  gridward pki list --dir {d}");
    say!("  gridward pki log --dir {d}");
    say!(
        "  openssl x509 -in {d}/meters/{}/cert.pem -noout -text",
        issued[0].name
    );
    say!(
        "  openssl verify -crl_check -CAfile {d}/ca/root.crt.pem -untrusted {d}/ca/issuing.crt.pem -CRLfile {d}/crl/issuing.crl.pem {d}/meters/{}/cert.pem",
        victim.name
    );
    Ok(())
}

fn init(a: InitArgs, now: OffsetDateTime) -> Result<()> {
    let mut opts = InitOptions::new(actor(a.actor.as_deref()), now);
    opts.ca_key = if a.rsa {
        CaKeyAlg::Rsa3072
    } else {
        CaKeyAlg::P256
    };
    opts.passphrase = a
        .passphrase_file
        .as_deref()
        .map(|p| read_secret(p, "passphrase"))
        .transpose()?;
    opts.org = a.org;
    opts.root_validity_days = a.root_days;
    opts.issuing_validity_days = a.issuing_days;
    opts.crl_url = a.crl_url;
    let pki = Pki::init(&a.dir.dir, &opts)?;
    let dir = pki.dir().display();
    say!("created a CA in {dir}");
    say!("  root CA:    {dir}/ca/root.crt.pem");
    say!("  issuing CA: {dir}/ca/issuing.crt.pem");
    say!("  CRLs:       {dir}/crl/root.crl.pem, {dir}/crl/issuing.crl.pem");
    if opts.passphrase.is_some() {
        say!("  CA keys are encrypted: pass --passphrase-file to every signing command");
    }
    Ok(())
}

fn issue(c: IssueCommand, now: OffsetDateTime) -> Result<()> {
    match c {
        IssueCommand::Meter(a) => {
            let pki = a.opts.signer.open(&a.dir.dir)?;
            let opts = a.opts.issue_options(Some(a.alg));
            if let (Some(count), Some(prefix)) = (a.count, a.prefix.as_deref()) {
                return issue_bulk(&pki, LeafKind::Meter, prefix, count, &opts, now);
            }
            let Some(id) = a.id.as_deref() else {
                bail!("give --id ID (or --count N --prefix P)")
            };
            let id = MeterId::new(id).with_context(|| format!("--id {id:?}"))?;
            print_issued(&pki.issue_meter(&id, &opts, now)?);
            Ok(())
        }
        IssueCommand::Server(a) => {
            let pki = a.opts.signer.open(&a.dir.dir)?;
            print_issued(&pki.issue_server(
                &a.name,
                &a.san,
                &a.opts.issue_options(Some(a.alg)),
                now,
            )?);
            Ok(())
        }
        IssueCommand::Client(a) => {
            let pki = a.opts.signer.open(&a.dir.dir)?;
            let mut opts = a.opts.issue_options(Some(a.alg));
            opts.role = a.role.clone();
            print_issued(&pki.issue_client(&a.name, &opts, now)?);
            if let Some(role) = &a.role {
                say!("  api role:    {role}");
            }
            Ok(())
        }
        IssueCommand::Concentrator(a) => {
            let pki = a.opts.signer.open(&a.dir.dir)?;
            let opts = a.opts.issue_options(Some(a.alg));
            if let (Some(count), Some(prefix)) = (a.count, a.prefix.as_deref()) {
                return issue_bulk(&pki, LeafKind::Concentrator, prefix, count, &opts, now);
            }
            let Some(id) = a.name.as_deref() else {
                bail!("give --name ID (or --count N --prefix P)")
            };
            let id = MeterId::new(id).with_context(|| format!("--name {id:?}"))?;
            print_issued(&pki.issue_concentrator(&id, &opts, now)?);
            say!(
                "  mqtt:        ClientID {id}, publishes to concentrators/{id}/relay and concentrators/{id}/events"
            );
            Ok(())
        }
        IssueCommand::CommandSigner(a) => {
            let Some(name) = a.name.as_deref().or(a.name_flag.as_deref()) else {
                bail!("give the command signer's NAME")
            };
            let pki = a.opts.signer.open(&a.dir.dir)?;
            print_issued(&pki.issue_command_signer(
                name,
                &a.opts.issue_options(Some(a.alg)),
                now,
            )?);
            say!(
                "  eku:         {} (command signing only; not valid for TLS)",
                gridward_pki::COMMAND_SIGNING_EKU
            );
            Ok(())
        }
    }
}

/// `issue meter|concentrator --count N --prefix P`, with a progress bar.
fn issue_bulk(
    pki: &Pki,
    kind: LeafKind,
    prefix: &str,
    count: usize,
    opts: &IssueOptions,
    now: OffsetDateTime,
) -> Result<()> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let bar = indicatif::ProgressBar::new(count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {} ({{per_sec}}, eta {{eta}})",
            kind.dir_name()
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |n: usize| bar.set_position(n as u64);
    let issued = match kind {
        LeafKind::Concentrator => pki.issue_concentrators(prefix, count, opts, now, &mut progress),
        _ => pki.issue_meters(prefix, count, opts, now, &mut progress),
    };
    bar.finish_and_clear();
    let issued = issued?;
    if let (Some(first), Some(last)) = (issued.first(), issued.last()) {
        say!(
            "issued {} {kind} certificates: {} .. {}",
            issued.len(),
            first.name,
            last.name
        );
    }
    Ok(())
}

fn print_issued(c: &IssuedCertificate) {
    say!("issued {} certificate for {}", c.kind, c.name);
    say!("  serial:      {}", c.serial);
    say!("  sha256:      {}", c.fingerprint);
    say!("  key:         {}", c.key_alg);
    say!(
        "  valid:       {} .. {}",
        fmt_time(c.not_before),
        fmt_time(c.not_after)
    );
    say!("  certificate: {}", c.cert_path.display());
    say!("  chain:       {}", c.chain_path.display());
    if let Some(k) = &c.key_path {
        say!("  key file:    {}", k.display());
    }
    if let Some(old) = &c.superseded {
        say!("  superseded:  {old} (archived)");
    }
}

fn sign_csr(a: SignCsrArgs, now: OffsetDateTime) -> Result<()> {
    let profile = LeafKind::from(a.profile);
    if profile != LeafKind::Server && !a.san.is_empty() {
        bail!(
            "--san applies to the server profile only; {profile} certificates carry their identity URI"
        );
    }
    let csr = fs::read(&a.csr).with_context(|| format!("reading the CSR {}", a.csr.display()))?;
    let pki = a.opts.signer.open(&a.dir.dir)?;
    let issued = pki
        .sign_csr(
            &csr,
            profile,
            a.id.as_deref(),
            &a.san,
            &a.opts.issue_options(None),
            now,
        )
        .with_context(|| format!("signing {}", a.csr.display()))?;
    fs::write(&a.out, pki.reply_chain_pem(&issued.certificate))
        .with_context(|| format!("writing {}", a.out.display()))?;
    print_issued(&issued);
    say!(
        "  reply:       {} (certificate, issuing CA, root CA)",
        a.out.display()
    );
    Ok(())
}

fn revoke(a: RevokeArgs, now: OffsetDateTime) -> Result<()> {
    let target = match (a.serial, a.id) {
        (Some(serial), None) => RevokeTarget::Serial(serial),
        (None, Some(name)) => RevokeTarget::Identity {
            kind: a.kind.map(LeafKind::from),
            name,
        },
        _ => bail!("give exactly one of --serial and --id"),
    };
    let pki = a.signer.open(&a.dir.dir)?;
    let r = pki.revoke(&target, a.reason, &a.signer.actor(), now)?;
    say!(
        "revoked {} {} (serial {}, reason {})",
        r.kind,
        r.name,
        r.serial,
        r.reason
    );
    say!(
        "wrote {} (CRL number {}, {} revoked)",
        r.crl.path.display(),
        r.crl.number,
        r.crl.revoked
    );
    Ok(())
}

fn list(a: ListArgs, now: OffsetDateTime) -> Result<()> {
    let pki = Pki::open(&a.dir.dir, None)?;
    let records = pki.list_with(now, time::Duration::days(a.expiring_within.into()))?;
    if a.json {
        say!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    print_table(
        &[
            "SERIAL",
            "KIND",
            "IDENTITY",
            "SUBJECT",
            "NOT AFTER",
            "STATUS",
        ],
        records.iter().map(|r: &CertificateRecord| {
            vec![
                r.entry.serial.clone(),
                r.entry.kind.to_string(),
                r.entry.name.clone(),
                r.entry.subject.clone(),
                fmt_date(r.entry.not_after),
                r.status.to_string(),
            ]
        }),
    );
    Ok(())
}

fn log(a: LogArgs) -> Result<()> {
    let pki = Pki::open(&a.dir.dir, None)?;
    let report: LogReport = pki.log()?;
    if a.json {
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(
            &[
                "#", "TIME", "ACTOR", "ACTION", "KIND", "IDENTITY", "SERIAL", "REASON", "CHAIN",
            ],
            report.entries.iter().map(|e| {
                let r = &e.record;
                vec![
                    e.line.to_string(),
                    fmt_time(r.time.replace_nanosecond(0).unwrap_or(r.time)),
                    r.actor.clone(),
                    r.action.as_str().to_owned(),
                    r.kind.clone().unwrap_or_default(),
                    r.identity.clone().unwrap_or_default(),
                    r.serial.clone().unwrap_or_default(),
                    r.reason.clone().unwrap_or_default(),
                    if e.chain_ok { "ok" } else { "BROKEN" }.to_owned(),
                ]
            }),
        );
    }
    match &report.status {
        ChainStatus::Intact => {
            say!(
                "log chain intact: {} lines, each chained to the one before by SHA-256",
                report.lines
            );
            Ok(())
        }
        ChainStatus::Broken { line, reason } => {
            bail!("log chain BROKEN at line {line}: {reason}")
        }
    }
}

fn export(a: ExportArgs, now: OffsetDateTime) -> Result<()> {
    let password = read_secret(&a.password_file, "password")?;
    let pki = Pki::open(&a.dir.dir, None)?;
    let actor = actor(a.actor.as_deref());
    let (bytes, what) = if a.truststore {
        (
            pki.export_trust_store(&password, &actor, now)?,
            "trust store (root CA, issuing CA)".to_owned(),
        )
    } else {
        let Some(id) = a.id.as_deref() else {
            bail!("give --id ID (or --truststore)")
        };
        let kind = a.kind.map_or(LeafKind::Meter, LeafKind::from);
        (
            pki.export_p12(kind, id, &password, &actor, now)?,
            format!("{kind} {id} (key, certificate, chain)"),
        )
    };
    write_private_file(&a.p12, &bytes, a.force)?;
    say!("wrote {}: {what}", a.p12.display());
    Ok(())
}

/// Writes a file that holds secrets: created with mode 0600; an existing file is replaced only
/// with `force`.
fn write_private_file(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    if force {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                anyhow::anyhow!("{} exists; pass --force to overwrite it", path.display())
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

/// Reads a password or passphrase file: the first line, without its line ending; empty is an error.
fn read_secret(path: &Path, what: &str) -> Result<String> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))?;
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if first.is_empty() {
        bail!(
            "the {what} file {} is empty (its first line is the {what})",
            path.display()
        );
    }
    Ok(first.to_owned())
}

/// The actor: `--actor`, else `$USER`, else `gridward-cli`.
fn actor(given: Option<&str>) -> String {
    given
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "gridward-cli".to_owned())
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn fmt_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// Prints rows under headers, columns padded to their widest cell.
fn print_table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        cells
            .into_iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| if i == last { c } else { format!("{c:<w$}") })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        line(headers.iter().map(|h| (*h).to_owned()).collect())
    );
    for row in rows {
        let _ = writeln!(out, "{}", line(row));
    }
}
