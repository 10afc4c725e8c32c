//! The certificate authority end to end, on real directories: init, every leaf profile, CSR
//! signing, revocation and CRLs, renewal, listing, the log chain, PKCS#12 and TLS material.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gridward_core::MeterId;
use gridward_pki::{
    CaKeyAlg, CertKind, CertStatus, ChainStatus, CrlIssuer, Identity, IdentityError, InitOptions,
    IssueOptions, LeafKeyAlg, LeafKind, LogAction, Origin, Pki, PkiError, RevocationReason,
    RevokeTarget, client_role_of, identity_of,
};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

const NOW: OffsetDateTime = datetime!(2025-03-01 12:00:00 UTC);
const ACTOR: &str = "tester";
const PASS: &str = "changeit";

fn init_with(dir: &Path, f: impl FnOnce(&mut InitOptions)) -> Pki {
    let mut opts = InitOptions::new(ACTOR, NOW);
    f(&mut opts);
    Pki::init(dir, &opts).expect("init")
}

fn new_pki() -> (tempfile::TempDir, Pki) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = init_with(&tmp.path().join("pki"), |_| {});
    (tmp, pki)
}

fn opts() -> IssueOptions {
    IssueOptions::new(ACTOR)
}

fn meter(id: &str) -> MeterId {
    MeterId::new(id).expect("meter id")
}

fn read_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("certificate PEM")
}

fn read_crl(path: &Path) -> CertificateRevocationListDer<'static> {
    CertificateRevocationListDer::from_pem_file(path).expect("CRL PEM")
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).expect("parse certificate");
    assert!(rest.is_empty());
    cert
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

fn ski(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("SKI")
}

fn aki(exts: &[x509_parser::extensions::X509Extension<'_>]) -> Vec<u8> {
    exts.iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("AKI")
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .expect("SAN parses")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn cn(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .expect("CN")
        .as_str()
        .expect("CN string")
        .to_owned()
}

/// Checks the parts every leaf shares: CA:false (critical), KU digitalSignature (critical),
/// SKI, AKI = issuing CA's SKI, validity now − 5 min .. now + days, 16-byte positive serial,
/// signed by the issuing CA.
fn check_common_leaf(pki: &Pki, cert: &X509Certificate<'_>, days: i64) {
    let bc = cert
        .basic_constraints()
        .expect("bc")
        .expect("basicConstraints present");
    assert!(bc.critical);
    assert!(!bc.value.ca);
    let ku = cert.key_usage().expect("ku").expect("keyUsage present");
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let issuing = parse(pki.issuing_certificate());
    assert_eq!(aki(cert.extensions()), ski(&issuing));
    assert!(!ski(cert).is_empty());
    assert_eq!(
        cert.validity().not_before.to_datetime(),
        NOW - Duration::minutes(5)
    );
    assert_eq!(
        cert.validity().not_after.to_datetime(),
        NOW + Duration::days(days)
    );
    assert_eq!(cert.raw_serial().len(), 16);
    assert!(cert.raw_serial()[0] & 0x80 == 0 && cert.raw_serial()[0] != 0);
    assert_eq!(cert.issuer().as_raw(), issuing.subject().as_raw());
    cert.verify_signature(Some(issuing.public_key()))
        .expect("signed by the issuing CA");
}

// ----- init -------------------------------------------------------------------------------------

#[test]
fn init_p256_creates_the_ca_files_with_private_modes() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    for f in [
        "ca/root.crt.pem",
        "ca/root.key.pem",
        "ca/issuing.crt.pem",
        "ca/issuing.key.pem",
        "ca/chain.pem",
        "crl/root.crl.pem",
        "crl/issuing.crl.pem",
        "inventory.json",
        "log.jsonl",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(mode(&dir.join("ca/root.key.pem")), 0o600);
    assert_eq!(mode(&dir.join("ca/issuing.key.pem")), 0o600);
    let key = fs::read_to_string(dir.join("ca/root.key.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));

    let root = parse(pki.root_certificate());
    let bc = root.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(1));
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert_eq!(root.subject().as_raw(), root.issuer().as_raw());
    root.verify_signature(None).expect("self-signed");
    assert_eq!(
        root.validity().not_after.to_datetime(),
        NOW + Duration::days(7305)
    );

    let issuing = parse(pki.issuing_certificate());
    let bc = issuing.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    assert_eq!(aki(issuing.extensions()), ski(&root));
    issuing
        .verify_signature(Some(root.public_key()))
        .expect("signed by root");
    assert_eq!(cn(&issuing), "Gridward Issuing CA");

    // chain.pem: issuing then root.
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("ca/chain.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        chain,
        vec![
            pki.issuing_certificate().clone(),
            pki.root_certificate().clone()
        ]
    );

    // Empty CRLs, number 1, signed by their CA.
    for (file, ca) in [
        ("crl/root.crl.pem", &root),
        ("crl/issuing.crl.pem", &issuing),
    ] {
        let der = read_crl(&dir.join(file));
        let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
        assert_eq!(crl.iter_revoked_certificates().count(), 0, "{file}");
        assert_eq!(crl.crl_number().map(|n| n.to_string()), Some("1".into()));
        assert_eq!(crl.issuer().as_raw(), ca.subject().as_raw());
        crl.verify_signature(ca.public_key())
            .expect("CRL signature");
        assert_eq!(aki(crl.extensions()), ski(ca));
    }

    let list = pki.list(NOW).unwrap();
    assert_eq!(
        list.iter().map(|r| r.entry.kind).collect::<Vec<_>>(),
        vec![CertKind::RootCa, CertKind::IssuingCa]
    );
    let log = pki.log().unwrap();
    assert_eq!(log.status, ChainStatus::Intact);
    let actions: Vec<_> = log.entries.iter().map(|e| e.record.action).collect();
    assert_eq!(
        actions,
        vec![
            LogAction::Init,
            LogAction::Init,
            LogAction::Crl,
            LogAction::Crl
        ]
    );
    assert_eq!(
        identity_of(pki.issuing_certificate()),
        Err(IdentityError::IsCa)
    );
}

#[test]
fn init_rsa_makes_rsa_cas_that_sign_rsa_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = init_with(&tmp.path().join("pki"), |o| o.ca_key = CaKeyAlg::Rsa3072);
    let root = parse(pki.root_certificate());
    assert_eq!(root.public_key().parsed().unwrap().key_size(), 3072);
    assert_eq!(
        root.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA
    );
    let issued = pki
        .issue_server("hes", &["hes.example".into()], &opts(), NOW)
        .unwrap();
    let cert = parse(&issued.certificate);
    assert_eq!(
        cert.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA
    );
    check_common_leaf(&pki, &cert, 365);
}

#[test]
fn init_refuses_to_overwrite() {
    let (tmp, _pki) = new_pki();
    let dir = tmp.path().join("pki");
    let before = fs::read(dir.join("ca/root.key.pem")).unwrap();
    let err = Pki::init(&dir, &InitOptions::new(ACTOR, NOW)).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyInitialised { .. }), "{err}");
    assert_eq!(fs::read(dir.join("ca/root.key.pem")).unwrap(), before);
}

#[test]
fn open_without_ca_says_to_run_init() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Pki::open(tmp.path(), None).unwrap_err();
    assert!(matches!(err, PkiError::NotInitialised { .. }));
    assert!(err.to_string().contains("gridward pki init --dir"), "{err}");
}

#[test]
fn encrypted_ca_keys_need_the_passphrase() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    init_with(&dir, |o| o.passphrase = Some("s3cret passphrase".into()));
    for key in ["ca/root.key.pem", "ca/issuing.key.pem"] {
        let pem = fs::read_to_string(dir.join(key)).unwrap();
        assert!(
            pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
            "{key}"
        );
        assert_eq!(mode(&dir.join(key)), 0o600);
    }

    let no_pass = Pki::open(&dir, None).unwrap();
    assert!(no_pass.ca_key_encrypted().unwrap());
    let err = no_pass.issue_meter(&meter("m1"), &opts(), NOW).unwrap_err();
    assert!(matches!(err, PkiError::CaKeyEncrypted { .. }));
    assert!(
        err.to_string()
            .contains("CA key is encrypted: pass --passphrase-file"),
        "{err}"
    );
    // Reading needs no passphrase.
    assert_eq!(no_pass.list(NOW).unwrap().len(), 2);

    let wrong = Pki::open(&dir, Some("wrong".into())).unwrap();
    assert!(matches!(
        wrong.write_crls(NOW, 7, ACTOR),
        Err(PkiError::WrongPassphrase { .. })
    ));

    let right = Pki::open(&dir, Some("s3cret passphrase".into())).unwrap();
    right.issue_meter(&meter("m1"), &opts(), NOW).unwrap();
    right.write_crls(NOW, 7, ACTOR).unwrap();

    assert!(matches!(
        Pki::open(&dir, Some(String::new())),
        Err(PkiError::EmptyPassphrase)
    ));
}

// ----- leaf profiles ---------------------------------------------------------------------------

#[test]
fn meter_profile() {
    let (tmp, pki) = new_pki();
    let issued = pki.issue_meter(&meter("MTR-0001"), &opts(), NOW).unwrap();
    let dir = tmp.path().join("pki/meters/MTR-0001");
    assert_eq!(issued.cert_path, dir.join("cert.pem"));
    assert_eq!(
        issued.key_path.as_deref(),
        Some(dir.join("key.pem").as_path())
    );
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(read_cert(&dir.join("cert.pem")), issued.certificate);
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("chain.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        chain,
        vec![
            issued.certificate.clone(),
            pki.issuing_certificate().clone()
        ]
    );

    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 3650);
    assert_eq!(cn(&cert), "MTR-0001");
    assert_eq!(uris(&cert), vec!["urn:gridward:meter:MTR-0001".to_owned()]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && eku.other.is_empty());
    assert!(!cert.key_usage().unwrap().unwrap().value.key_encipherment());
    assert_eq!(issued.key_alg, "p256");
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Meter(meter("MTR-0001")))
    );

    // The key on disk belongs to the certificate.
    let key = KeyPair::from_pem(&fs::read_to_string(dir.join("key.pem")).unwrap()).unwrap();
    assert_eq!(key.subject_public_key_info(), cert.public_key().raw);
}

#[test]
fn meter_with_ed25519_and_custom_days() {
    let (_tmp, pki) = new_pki();
    let mut o = opts();
    o.key_alg = LeafKeyAlg::Ed25519;
    o.validity_days = Some(90);
    let issued = pki.issue_meter(&meter("ed-1"), &o, NOW).unwrap();
    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 90);
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ED25519
    );
}

#[test]
fn server_profile() {
    let (_tmp, pki) = new_pki();
    let issued = pki
        .issue_server(
            "hes",
            &["hes.example.com".into(), "127.0.0.1".into(), "::1".into()],
            &opts(),
            NOW,
        )
        .unwrap();
    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 365);
    assert_eq!(cn(&cert), "hes");
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(|n| format!("{n:?}")).collect();
    assert_eq!(san.general_names.len(), 3, "{names:?}");
    assert!(matches!(
        san.general_names[0],
        GeneralName::DNSName("hes.example.com")
    ));
    assert!(matches!(
        san.general_names[1],
        GeneralName::IPAddress([127, 0, 0, 1])
    ));
    assert!(matches!(san.general_names[2], GeneralName::IPAddress(b) if b.len() == 16));
    assert!(!cert.key_usage().unwrap().unwrap().value.key_encipherment());
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Server("hes".into()))
    );

    assert!(matches!(
        pki.issue_server("h2", &[], &opts(), NOW),
        Err(PkiError::NoSans)
    ));
    assert!(matches!(
        pki.issue_server("h2", &["not a name".into()], &opts(), NOW),
        Err(PkiError::InvalidSan { .. })
    ));
    assert!(matches!(
        pki.issue_server("../x", &["a".into()], &opts(), NOW),
        Err(PkiError::InvalidName { .. })
    ));
}

#[test]
fn rsa_server_keys_also_get_key_encipherment() {
    let (_tmp, pki) = new_pki();
    let mut o = opts();
    o.key_alg = LeafKeyAlg::Rsa2048;
    let issued = pki
        .issue_server("rsa-hes", &["rsa.example".into()], &o, NOW)
        .unwrap();
    let cert = parse(&issued.certificate);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    assert_eq!(cert.public_key().parsed().unwrap().key_size(), 2048);
    // An RSA meter key is for signatures only.
    let issued = pki.issue_meter(&meter("rsa-m"), &o, NOW).unwrap();
    assert!(
        !parse(&issued.certificate)
            .key_usage()
            .unwrap()
            .unwrap()
            .value
            .key_encipherment()
    );
}

#[test]
fn client_profile() {
    let (_tmp, pki) = new_pki();
    let issued = pki.issue_client("billing", &opts(), NOW).unwrap();
    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 730);
    assert_eq!(uris(&cert), vec!["urn:gridward:client:billing".to_owned()]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Client("billing".into()))
    );
}

#[test]
fn leaf_validity_is_capped_at_the_issuing_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = init_with(&tmp.path().join("pki"), |o| o.issuing_validity_days = 100);
    let issued = pki.issue_meter(&meter("m"), &opts(), NOW).unwrap();
    assert_eq!(issued.not_after, NOW + Duration::days(100));
    let mut o = opts();
    o.validity_days = Some(0);
    assert!(matches!(
        pki.issue_client("c", &o, NOW),
        Err(PkiError::InvalidValidity { days: 0, .. })
    ));
}

#[test]
fn serials_are_random_and_distinct() {
    let (_tmp, pki) = new_pki();
    let issued = pki
        .issue_meters("S-", 40, &opts(), NOW, &mut |_| {})
        .unwrap();
    let mut serials: Vec<_> = issued.iter().map(|i| i.serial.clone()).collect();
    assert!(serials.iter().all(|s| s.len() == 32));
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 40);
}

#[test]
fn existing_identity_needs_replace_and_old_one_is_archived() {
    let (tmp, pki) = new_pki();
    let first = pki.issue_meter(&meter("m1"), &opts(), NOW).unwrap();
    let err = pki.issue_meter(&meter("m1"), &opts(), NOW).unwrap_err();
    assert!(
        matches!(&err, PkiError::AlreadyIssued { kind: LeafKind::Meter, serial, .. } if *serial == first.serial)
    );
    assert!(err.to_string().contains("--replace"));

    let mut o = opts();
    o.replace = true;
    let second = pki.issue_meter(&meter("m1"), &o, NOW).unwrap();
    assert_eq!(second.superseded.as_deref(), Some(first.serial.as_str()));
    let archived = tmp
        .path()
        .join(format!("pki/archive/{}.crt.pem", first.serial));
    assert_eq!(read_cert(&archived), first.certificate);
    let list = pki.list(NOW).unwrap();
    let status = |serial: &str| {
        list.iter()
            .find(|r| r.entry.serial == serial)
            .unwrap()
            .status
    };
    assert_eq!(status(&first.serial), CertStatus::Superseded);
    assert_eq!(status(&second.serial), CertStatus::Valid);

    // An expired certificate does not block a new one.
    let later = NOW + Duration::days(3651);
    let third = pki.issue_meter(&meter("m1"), &opts(), later).unwrap();
    assert_eq!(third.superseded.as_deref(), Some(second.serial.as_str()));
}

#[test]
fn bulk_issuance_numbers_on_and_logs_once_per_certificate() {
    let (tmp, pki) = new_pki();
    let mut seen = Vec::new();
    let issued = pki
        .issue_meters("B-", 25, &opts(), NOW, &mut |n| seen.push(n))
        .unwrap();
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    assert_eq!(issued.first().unwrap().name, "B-000001");
    assert_eq!(issued.last().unwrap().name, "B-000025");
    let more = pki
        .issue_meters("B-", 2, &opts(), NOW, &mut |_| {})
        .unwrap();
    assert_eq!(
        more.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["B-000026", "B-000027"]
    );
    assert!(tmp.path().join("pki/meters/B-000027/key.pem").is_file());
    assert_eq!(pki.list(NOW).unwrap().len(), 2 + 27);
    let log = pki.log().unwrap();
    assert_eq!(log.status, ChainStatus::Intact);
    assert_eq!(
        log.entries
            .iter()
            .filter(|e| e.record.action == LogAction::Issue)
            .count(),
        27
    );

    // A taken id stops the whole batch before anything is issued.
    pki.issue_meter(&meter("C-000001"), &opts(), NOW).unwrap();
    // (numbering starts after C-000001, so clash on purpose with a manual C-000002)
    pki.issue_meter(&meter("C-000003"), &opts(), NOW).unwrap();
    let next = pki
        .issue_meters("C-", 1, &opts(), NOW, &mut |_| {})
        .unwrap();
    assert_eq!(next[0].name, "C-000004");
}

// ----- CSR signing -----------------------------------------------------------------------------

fn csr_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

#[test]
fn csr_requests_are_not_honoured() {
    let (_tmp, pki) = new_pki();
    let key = KeyPair::generate().unwrap();
    let mut p = csr_params("csr-1");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::CodeSigning,
        ExtendedKeyUsagePurpose::Any,
    ];
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::URI("urn:gridward:meter:someone-else".try_into().unwrap()),
    ];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let issued = pki
        .sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW)
        .unwrap();
    assert!(issued.key_path.is_none());
    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 3650);
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    assert_eq!(uris(&cert), vec!["urn:gridward:meter:csr-1".to_owned()]);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 1);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.code_signing && !eku.any);
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Meter(meter("csr-1")))
    );

    let list = pki.list(NOW).unwrap();
    let rec = list
        .iter()
        .find(|r| r.entry.serial == issued.serial)
        .unwrap();
    assert_eq!(rec.entry.origin, Origin::Csr);
    assert!(!rec.entry.key_on_disk);
    let log = pki.log().unwrap();
    let last = &log.entries.last().unwrap().record;
    assert_eq!(last.action, LogAction::SignCsr);
    assert!(
        last.detail.as_deref().unwrap().contains("ignored"),
        "{last:?}"
    );

    // The reply chain: leaf, issuing, root.
    let chain: Vec<_> =
        CertificateDer::pem_slice_iter(pki.reply_chain_pem(&issued.certificate).as_bytes())
            .map(Result::unwrap)
            .collect();
    assert_eq!(
        chain,
        vec![
            issued.certificate.clone(),
            pki.issuing_certificate().clone(),
            pki.root_certificate().clone()
        ]
    );
}

#[test]
fn csr_with_corrupted_signature_is_refused() {
    let (_tmp, pki) = new_pki();
    let key = KeyPair::generate().unwrap();
    let mut der = csr_params("m-bad")
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let at = der.len() - 3;
    der[at] ^= 0x40;
    let err = pki
        .sign_csr(&der, LeafKind::Meter, None, &[], &opts(), NOW)
        .unwrap_err();
    assert!(matches!(err, PkiError::CsrSignature), "{err}");
    assert_eq!(pki.list(NOW).unwrap().len(), 2, "nothing issued");
}

#[test]
fn keytool_style_rsa_csr_with_ski_request() {
    let (_tmp, pki) = new_pki();
    let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let mut p = csr_params("kt-meter");
    // keytool's SubjectKeyIdentifier extension request: OCTET STRING of 20 bytes.
    let mut requested_ski = vec![0x04, 20];
    requested_ski.extend_from_slice(&[0xab; 20]);
    p.custom_extensions = vec![CustomExtension::from_oid_content(
        &[2, 5, 29, 14],
        requested_ski,
    )];
    let pem = p
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
        .replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
    let issued = pki
        .sign_csr(pem.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW)
        .unwrap();
    assert_eq!(issued.key_alg, "rsa2048");
    let cert = parse(&issued.certificate);
    assert_ne!(
        ski(&cert),
        vec![0xab; 20],
        "the requested SKI must not be copied"
    );
}

#[test]
fn csr_identity_server_sans_and_unsupported_keys() {
    let (_tmp, pki) = new_pki();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut p = csr_params("whatever");
    p.subject_alt_names = vec![SanType::DnsName("csr-chosen.example".try_into().unwrap())];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();

    // Server: SANs only from the command line, never from the CSR.
    assert!(matches!(
        pki.sign_csr(
            csr.as_bytes(),
            LeafKind::Server,
            Some("web"),
            &[],
            &opts(),
            NOW
        ),
        Err(PkiError::NoSans)
    ));
    let issued = pki
        .sign_csr(
            csr.as_bytes(),
            LeafKind::Server,
            Some("web"),
            &["web.example".into()],
            &opts(),
            NOW,
        )
        .unwrap();
    let cert = parse(&issued.certificate);
    assert_eq!(cn(&cert), "web");
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 1);
    assert!(matches!(
        san.general_names[0],
        GeneralName::DNSName("web.example")
    ));

    // Client with an explicit identity.
    let issued = pki
        .sign_csr(
            csr.as_bytes(),
            LeafKind::Client,
            Some("api-1"),
            &[],
            &opts(),
            NOW,
        )
        .unwrap();
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Client("api-1".into()))
    );

    // No CN and no identity.
    let nocn = CertificateParams::default();
    let mut nocn = nocn;
    nocn.distinguished_name = rcgen::DistinguishedName::new();
    let csr = nocn.serialize_request(&key).unwrap().pem().unwrap();
    assert!(matches!(
        pki.sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW),
        Err(PkiError::CsrMissingCommonName)
    ));
    // A CN that is not a meter id.
    let csr = csr_params("bad id/1")
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    assert!(matches!(
        pki.sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW),
        Err(PkiError::InvalidMeterId(_))
    ));

    // P-521 keys are not certified.
    let p521 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
    let csr = csr_params("m521")
        .serialize_request(&p521)
        .unwrap()
        .pem()
        .unwrap();
    assert!(matches!(
        pki.sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW),
        Err(PkiError::UnsupportedKey { .. })
    ));
    assert!(matches!(
        pki.sign_csr(b"garbage", LeafKind::Meter, None, &[], &opts(), NOW),
        Err(PkiError::CsrParse { .. })
    ));
}

// ----- revocation and CRLs ---------------------------------------------------------------------

fn issuing_crl(dir: &Path) -> Vec<u8> {
    read_crl(&dir.join("crl/issuing.crl.pem")).to_vec()
}

#[test]
fn revoke_writes_the_issuing_crl() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let a = pki.issue_meter(&meter("m-a"), &opts(), NOW).unwrap();
    let b = pki.issue_client("cli", &opts(), NOW).unwrap();
    let later = NOW + Duration::hours(1);

    let r = pki
        .revoke(
            &RevokeTarget::Identity {
                kind: None,
                name: "m-a".into(),
            },
            RevocationReason::KeyCompromise,
            ACTOR,
            later,
        )
        .unwrap();
    assert_eq!(r.serial, a.serial);
    assert_eq!(r.crl.number, 2);
    // By serial, typed with colons and upper case.
    let colon_serial = b
        .serial
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let r2 = pki
        .revoke(
            &RevokeTarget::Serial(colon_serial),
            RevocationReason::CessationOfOperation,
            ACTOR,
            later,
        )
        .unwrap();
    assert_eq!(r2.serial, b.serial);
    assert_eq!(r2.crl.number, 3);
    assert_eq!(r2.crl.revoked, 2);

    let der = issuing_crl(&dir);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let issuing = parse(pki.issuing_certificate());
    crl.verify_signature(issuing.public_key()).unwrap();
    assert_eq!(crl.crl_number().unwrap().to_string(), "3");
    assert_eq!(crl.last_update().to_datetime(), later);
    assert_eq!(
        crl.next_update().unwrap().to_datetime(),
        later + Duration::days(7)
    );
    assert_eq!(aki(crl.extensions()), ski(&issuing));
    let revoked: Vec<(String, Option<u8>)> = crl
        .iter_revoked_certificates()
        .map(|r| {
            (
                hex::encode(r.raw_serial()),
                r.reason_code().map(|(_, c)| c.0),
            )
        })
        .collect();
    assert!(
        revoked.contains(&(a.serial.clone(), Some(1))),
        "{revoked:?}"
    );
    assert!(
        revoked.contains(&(b.serial.clone(), Some(5))),
        "{revoked:?}"
    );

    // The root CRL is untouched and empty.
    let root_der = read_crl(&dir.join("crl/root.crl.pem"));
    let (_, root_crl) = CertificateRevocationList::from_der(&root_der).unwrap();
    assert_eq!(root_crl.iter_revoked_certificates().count(), 0);

    let list = pki.list(later).unwrap();
    assert_eq!(
        list.iter()
            .filter(|r| r.status == CertStatus::Revoked)
            .count(),
        2
    );
    let log = pki.log().unwrap();
    let revokes: Vec<_> = log
        .entries
        .iter()
        .filter(|e| e.record.action == LogAction::Revoke)
        .collect();
    assert_eq!(revokes.len(), 2);
    assert_eq!(revokes[0].record.reason.as_deref(), Some("keyCompromise"));
    assert_eq!(
        revokes[0].record.fingerprint.as_deref(),
        Some(a.fingerprint.as_str())
    );
}

#[test]
fn revocation_errors() {
    let (_tmp, pki) = new_pki();
    let a = pki.issue_meter(&meter("dup"), &opts(), NOW).unwrap();
    pki.issue_client("dup", &opts(), NOW).unwrap();
    let reason = RevocationReason::Unspecified;
    assert!(matches!(
        pki.revoke(&RevokeTarget::Identity { kind: None, name: "dup".into() }, reason, ACTOR, NOW),
        Err(PkiError::AmbiguousIdentity { kinds, .. }) if kinds == vec![LeafKind::Meter, LeafKind::Client]
    ));
    pki.revoke(
        &RevokeTarget::Identity {
            kind: Some(LeafKind::Meter),
            name: "dup".into(),
        },
        reason,
        ACTOR,
        NOW,
    )
    .unwrap();
    assert!(matches!(
        pki.revoke(&RevokeTarget::Serial(a.serial.clone()), reason, ACTOR, NOW),
        Err(PkiError::AlreadyRevoked { .. })
    ));
    assert!(matches!(
        pki.revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Meter),
                name: "dup".into()
            },
            reason,
            ACTOR,
            NOW
        ),
        Err(PkiError::NotFound { .. })
    ));
    assert!(matches!(
        pki.revoke(&RevokeTarget::Serial("0abc".into()), reason, ACTOR, NOW),
        Err(PkiError::NotFound { .. })
    ));
    assert!(matches!(
        pki.revoke(&RevokeTarget::Serial("zz".into()), reason, ACTOR, NOW),
        Err(PkiError::InvalidSerial { .. })
    ));
    let root_serial = pki.list(NOW).unwrap()[0].entry.serial.clone();
    assert!(matches!(
        pki.revoke(&RevokeTarget::Serial(root_serial), reason, ACTOR, NOW),
        Err(PkiError::CannotRevokeCa { .. })
    ));
}

#[test]
fn crl_numbers_increase_and_an_expired_crl_can_be_written() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let infos = pki.write_crls(NOW, 3, ACTOR).unwrap();
    assert_eq!(
        infos
            .iter()
            .map(|i| (i.issuer, i.number))
            .collect::<Vec<_>>(),
        [(CrlIssuer::Root, 2), (CrlIssuer::Issuing, 2)]
    );
    let infos = pki.write_crls(NOW, 3, ACTOR).unwrap();
    assert_eq!(infos[1].number, 3);
    let der = issuing_crl(&dir);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    assert_eq!(
        crl.next_update().unwrap().to_datetime(),
        NOW + Duration::days(3)
    );

    let info = pki
        .write_crl(
            CrlIssuer::Issuing,
            NOW - Duration::days(10),
            NOW - Duration::days(1),
            ACTOR,
        )
        .unwrap();
    assert_eq!(info.number, 4);
    let der = issuing_crl(&dir);
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    assert!(
        crl.next_update().unwrap().to_datetime() < NOW,
        "the CRL is expired at NOW"
    );
    assert!(matches!(
        pki.write_crl(CrlIssuer::Root, NOW, NOW, ACTOR),
        Err(PkiError::InvalidCrlWindow { .. })
    ));
    assert!(matches!(
        pki.write_crls(NOW, 0, ACTOR),
        Err(PkiError::InvalidValidity { .. })
    ));
}

#[test]
fn tls_material_needs_both_crls() {
    let (tmp, pki) = new_pki();
    pki.issue_server("localhost", &["localhost".into()], &opts(), NOW)
        .unwrap();
    let m = pki.tls_material(LeafKind::Server, "localhost").unwrap();
    assert_eq!(m.chain.len(), 2);
    assert_eq!(m.roots, vec![pki.root_certificate().clone()]);
    assert_eq!(m.crls.len(), 2);
    gridward_pki::tls::server_config(&m).expect("server config");

    fs::remove_file(tmp.path().join("pki/crl/root.crl.pem")).unwrap();
    assert!(matches!(
        pki.tls_material(LeafKind::Server, "localhost"),
        Err(PkiError::CrlMissing { .. })
    ));
    assert!(matches!(
        pki.tls_material(LeafKind::Client, "nobody"),
        Err(PkiError::MissingFile { .. })
    ));
}

// ----- renewal, listing, log -------------------------------------------------------------------

#[test]
fn renew_reissues_what_expires_soon() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let mut short = opts();
    short.validity_days = Some(20);
    let soon = pki.issue_meter(&meter("soon"), &short, NOW).unwrap();
    let keep = pki.issue_client("keeper", &short, NOW).unwrap();
    let csr_key = KeyPair::generate().unwrap();
    let csr = csr_params("by-csr")
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    let from_csr = pki
        .sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &short, NOW)
        .unwrap();
    let far = pki.issue_meter(&meter("far"), &opts(), NOW).unwrap();

    assert!(
        pki.renew(10, false, ACTOR, NOW).unwrap().is_empty(),
        "nothing within 10 days"
    );

    let at = NOW + Duration::days(15);
    let renewals = pki.renew(30, false, ACTOR, at).unwrap();
    assert_eq!(renewals.len(), 3);
    let r = renewals.iter().find(|r| r.name == "soon").unwrap();
    assert_eq!(r.old_serial, soon.serial);
    assert!(r.new_key);
    assert_eq!(r.new_not_after, at + Duration::days(20));
    let new = read_cert(&dir.join("meters/soon/cert.pem"));
    assert_ne!(
        parse(&new).public_key().raw,
        parse(&soon.certificate).public_key().raw
    );
    assert_eq!(
        read_cert(&dir.join(format!("archive/{}.crt.pem", soon.serial))),
        soon.certificate
    );
    assert_eq!(identity_of(&new), Ok(Identity::Meter(meter("soon"))));
    // A renewed CSR certificate got a new key the CA holds.
    assert!(dir.join("meters/by-csr/key.pem").is_file());

    let list = pki.list(at).unwrap();
    let status = |serial: &str| {
        list.iter()
            .find(|r| r.entry.serial == serial)
            .unwrap()
            .status
    };
    assert_eq!(status(&soon.serial), CertStatus::Superseded);
    assert_eq!(status(&keep.serial), CertStatus::Superseded);
    assert_eq!(status(&from_csr.serial), CertStatus::Superseded);
    assert_eq!(status(&far.serial), CertStatus::Valid);
    assert_eq!(
        status(&r.new_serial),
        CertStatus::Expiring,
        "20 days left: expiring"
    );
    let log = pki.log().unwrap();
    assert_eq!(log.status, ChainStatus::Intact);
    assert_eq!(
        log.entries
            .iter()
            .filter(|e| e.record.action == LogAction::Renew)
            .count(),
        6
    );
}

#[test]
fn renew_keep_key_reuses_keys() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let mut short = opts();
    short.validity_days = Some(5);
    let generated = pki.issue_meter(&meter("gen"), &short, NOW).unwrap();
    let key_before = fs::read(dir.join("meters/gen/key.pem")).unwrap();
    let csr_key = KeyPair::generate().unwrap();
    let csr = csr_params("dev")
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    let dev = pki
        .sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &short, NOW)
        .unwrap();

    let renewals = pki.renew(30, true, ACTOR, NOW).unwrap();
    assert_eq!(renewals.len(), 2);
    assert!(renewals.iter().all(|r| !r.new_key));
    let new_gen = read_cert(&dir.join("meters/gen/cert.pem"));
    assert_ne!(new_gen, generated.certificate);
    assert_eq!(
        parse(&new_gen).public_key().raw,
        parse(&generated.certificate).public_key().raw
    );
    let key_after = KeyPair::from_pem(
        &String::from_utf8(fs::read(dir.join("meters/gen/key.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    let key_before = KeyPair::from_pem(&String::from_utf8(key_before).unwrap()).unwrap();
    assert_eq!(key_after.public_key_raw(), key_before.public_key_raw());
    let new_dev = read_cert(&dir.join("meters/dev/cert.pem"));
    assert_eq!(
        parse(&new_dev).public_key().raw,
        csr_key.subject_public_key_info().as_slice()
    );
    assert_ne!(new_dev, dev.certificate);
    assert!(!dir.join("meters/dev/key.pem").exists());
}

#[test]
fn list_statuses_with_injected_time() {
    let (_tmp, pki) = new_pki();
    let mut o = opts();
    o.validity_days = Some(100);
    let valid = pki.issue_meter(&meter("valid"), &opts(), NOW).unwrap();
    let expiring = pki.issue_meter(&meter("expiring"), &o, NOW).unwrap();
    o.validity_days = Some(10);
    let expired = pki.issue_meter(&meter("expired"), &o, NOW).unwrap();
    let revoked = pki.issue_meter(&meter("revoked"), &opts(), NOW).unwrap();
    pki.revoke(
        &RevokeTarget::Serial(revoked.serial.clone()),
        RevocationReason::Superseded,
        ACTOR,
        NOW,
    )
    .unwrap();

    let at = NOW + Duration::days(80);
    let list = pki.list(at).unwrap();
    let status = |serial: &str| {
        list.iter()
            .find(|r| r.entry.serial == serial)
            .unwrap()
            .status
    };
    assert_eq!(status(&valid.serial), CertStatus::Valid);
    assert_eq!(status(&expiring.serial), CertStatus::Expiring);
    assert_eq!(status(&expired.serial), CertStatus::Expired);
    assert_eq!(status(&revoked.serial), CertStatus::Revoked);
    // A wider threshold.
    let list = pki.list_with(at, Duration::days(10)).unwrap();
    assert_eq!(
        list.iter()
            .find(|r| r.entry.serial == expiring.serial)
            .unwrap()
            .status,
        CertStatus::Valid
    );
    // JSON carries the status.
    let json = serde_json::to_value(&list).unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == "revoked" && r["name"] == "revoked")
    );
}

#[test]
fn log_records_who_what_when_and_detects_an_edited_line() {
    let (tmp, pki) = new_pki();
    let issued = pki.issue_meter(&meter("logged"), &opts(), NOW).unwrap();
    pki.issue_client("c1", &opts(), NOW).unwrap();
    let log = pki.log().unwrap();
    assert_eq!(log.status, ChainStatus::Intact);
    let rec = &log
        .entries
        .iter()
        .find(|e| e.record.identity.as_deref() == Some("logged"))
        .unwrap()
        .record;
    assert_eq!(rec.action, LogAction::Issue);
    assert_eq!(rec.actor, ACTOR);
    assert_eq!(rec.time, NOW);
    assert_eq!(rec.serial.as_deref(), Some(issued.serial.as_str()));
    assert_eq!(
        rec.fingerprint.as_deref(),
        Some(issued.fingerprint.as_str())
    );
    let json = serde_json::to_value(rec).unwrap();
    assert_eq!(json["time"], "2025-03-01T12:00:00Z");

    // Edit the meter's line (line 5): the chain breaks at line 6.
    let path = tmp.path().join("pki/log.jsonl");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replacen(
            "\"actor\":\"tester\",\"action\":\"issue\"",
            "\"actor\":\"mallory\",\"action\":\"issue\"",
            1,
        ),
    )
    .unwrap();
    let log = pki.log().unwrap();
    assert!(
        matches!(log.status, ChainStatus::Broken { line: 6, .. }),
        "{:?}",
        log.status
    );
    assert!(!log.entries[5].chain_ok);

    // Appending after the break still works (the break stays visible).
    pki.issue_client("c2", &opts(), NOW).unwrap();
    assert!(matches!(
        pki.log().unwrap().status,
        ChainStatus::Broken { line: 6, .. }
    ));
}

#[test]
fn log_truncation_is_detected() {
    let (tmp, pki) = new_pki();
    pki.issue_client("c1", &opts(), NOW).unwrap();
    let path = tmp.path().join("pki/log.jsonl");
    let text = fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().take(4).collect();
    fs::write(&path, format!("{}\n", kept.join("\n"))).unwrap();
    assert!(matches!(
        pki.log().unwrap().status,
        ChainStatus::Broken { line: 5, .. }
    ));
}

// ----- PKCS#12 -----------------------------------------------------------------------------------

#[test]
fn p12_export_import_round_trip() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let issued = pki.issue_meter(&meter("p12-m"), &opts(), NOW).unwrap();
    let bytes = pki
        .export_p12(LeafKind::Meter, "p12-m", PASS, ACTOR, NOW)
        .unwrap();
    let contents = gridward_pki::p12::read(&bytes, PASS).unwrap();
    assert_eq!(contents.keys.len(), 1);
    assert_eq!(contents.keys[0].alias, "p12-m");
    assert_eq!(contents.keys[0].chain.len(), 3);

    // Lose the key, import it back.
    let key_path = dir.join("meters/p12-m/key.pem");
    let key = fs::read(&key_path).unwrap();
    fs::remove_file(&key_path).unwrap();
    let report = pki.import_p12(&bytes, PASS, ACTOR, NOW).unwrap();
    assert_eq!(report.keys.len(), 1);
    assert_eq!(report.keys[0].serial, issued.serial);
    assert!(!report.keys[0].new_to_inventory);
    assert_eq!(mode(&key_path), 0o600);
    let back = KeyPair::from_pem(&fs::read_to_string(&key_path).unwrap()).unwrap();
    assert_eq!(
        back.public_key_raw(),
        KeyPair::from_pem(&String::from_utf8(key).unwrap())
            .unwrap()
            .public_key_raw()
    );
    let log = pki.log().unwrap();
    assert!(
        log.entries
            .iter()
            .any(|e| e.record.action == LogAction::Export)
    );
    assert!(
        log.entries
            .iter()
            .any(|e| e.record.action == LogAction::Import)
    );

    // Another CA refuses it.
    let other_tmp = tempfile::tempdir().unwrap();
    let other = init_with(&other_tmp.path().join("pki"), |_| {});
    let err = other.import_p12(&bytes, PASS, ACTOR, NOW).unwrap_err();
    assert!(matches!(err, PkiError::NotIssuedByThisCa { .. }), "{err}");
    assert!(err.to_string().contains("not issued by this CA"));

    // Wrong password.
    assert!(matches!(
        pki.import_p12(&bytes, "wrong-password", ACTOR, NOW),
        Err(PkiError::P12(_))
    ));

    // A revoked certificate cannot come back.
    pki.revoke(
        &RevokeTarget::Serial(issued.serial),
        RevocationReason::KeyCompromise,
        ACTOR,
        NOW,
    )
    .unwrap();
    assert!(matches!(
        pki.import_p12(&bytes, PASS, ACTOR, NOW),
        Err(PkiError::ImportStale {
            status: "revoked",
            ..
        })
    ));

    // No key on disk for CSR certificates.
    let k = KeyPair::generate().unwrap();
    let csr = csr_params("nokey")
        .serialize_request(&k)
        .unwrap()
        .pem()
        .unwrap();
    pki.sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW)
        .unwrap();
    assert!(matches!(
        pki.export_p12(LeafKind::Meter, "nokey", PASS, ACTOR, NOW),
        Err(PkiError::NoPrivateKey { .. })
    ));
    assert!(matches!(
        pki.export_p12(LeafKind::Meter, "none", PASS, ACTOR, NOW),
        Err(PkiError::NotFound { .. })
    ));
}

#[test]
fn trust_store_export_and_import_into_another_pki() {
    let (_tmp, pki) = new_pki();
    let bytes = pki.export_trust_store(PASS, ACTOR, NOW).unwrap();
    let contents = gridward_pki::p12::read(&bytes, PASS).unwrap();
    assert_eq!(contents.trusted.len(), 2);

    // Importing our own trust store changes nothing.
    let report = pki.import_p12(&bytes, PASS, ACTOR, NOW).unwrap();
    assert_eq!(report.skipped.len(), 2);
    assert!(report.trusted.is_empty());

    let other_tmp = tempfile::tempdir().unwrap();
    let other = init_with(&other_tmp.path().join("pki"), |_| {});
    let report = other.import_p12(&bytes, PASS, ACTOR, NOW).unwrap();
    assert_eq!(report.trusted.len(), 2);
    for t in &report.trusted {
        assert!(t.path.starts_with(other_tmp.path().join("pki/trusted")));
        assert!(t.path.is_file());
    }
    // Imported anchors become TLS roots.
    other.issue_client("fwd", &opts(), NOW).unwrap();
    let m = other.tls_material(LeafKind::Client, "fwd").unwrap();
    assert_eq!(m.roots.len(), 3);
    assert!(m.roots.contains(pki.root_certificate()));
}

#[test]
fn import_of_an_unknown_certificate_from_this_ca_adds_it() {
    let (tmp, pki) = new_pki();
    let issued = pki.issue_client("roam", &opts(), NOW).unwrap();
    let bytes = pki
        .export_p12(LeafKind::Client, "roam", PASS, ACTOR, NOW)
        .unwrap();
    // Simulate a lost inventory entry: a second PKI directory sharing the CA files.
    let copy = tmp.path().join("copy");
    fs::create_dir_all(copy.join("ca")).unwrap();
    fs::create_dir_all(copy.join("crl")).unwrap();
    for f in [
        "ca/root.crt.pem",
        "ca/root.key.pem",
        "ca/issuing.crt.pem",
        "ca/issuing.key.pem",
        "ca/chain.pem",
    ] {
        fs::copy(tmp.path().join("pki").join(f), copy.join(f)).unwrap();
    }
    let inv = fs::read_to_string(tmp.path().join("pki/inventory.json")).unwrap();
    let mut inv: serde_json::Value = serde_json::from_str(&inv).unwrap();
    inv["certificates"].as_array_mut().unwrap().truncate(2);
    inv.as_object_mut().unwrap().remove("log_head");
    fs::write(
        copy.join("inventory.json"),
        serde_json::to_vec(&inv).unwrap(),
    )
    .unwrap();
    let copy_pki = Pki::open(&copy, None).unwrap();
    let report = copy_pki.import_p12(&bytes, PASS, ACTOR, NOW).unwrap();
    assert!(report.keys[0].new_to_inventory);
    let list = copy_pki.list(NOW).unwrap();
    let rec = list
        .iter()
        .find(|r| r.entry.serial == issued.serial)
        .unwrap();
    assert_eq!(rec.entry.origin, Origin::Imported);
    assert_eq!(rec.entry.kind, CertKind::Client);
    assert!(copy.join("clients/roam/key.pem").is_file());
}

#[test]
fn leaf_key_files_are_private() {
    let (tmp, pki) = new_pki();
    pki.issue_server("s", &["s.example".into()], &opts(), NOW)
        .unwrap();
    pki.issue_client("c", &opts(), NOW).unwrap();
    assert_eq!(mode(&tmp.path().join("pki/servers/s/key.pem")), 0o600);
    assert_eq!(mode(&tmp.path().join("pki/clients/c/key.pem")), 0o600);
    assert_eq!(mode(&tmp.path().join("pki/ca")), 0o700);
}

#[test]
fn corrupt_inventory_is_named() {
    let (tmp, pki) = new_pki();
    fs::write(tmp.path().join("pki/inventory.json"), b"{not json").unwrap();
    let err = pki.list(NOW).unwrap_err();
    assert!(matches!(err, PkiError::InventoryCorrupt { .. }));
    assert!(err.to_string().contains("inventory.json"), "{err}");
    fs::remove_file(tmp.path().join("pki/ca/issuing.key.pem")).unwrap();
    let err = pki.issue_client("x", &opts(), NOW).unwrap_err();
    assert!(matches!(err, PkiError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("issuing.key.pem"), "{err}");
}

/// The CRL distribution point URIs of a certificate.
fn crl_distribution_points(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::CRLDistributionPoints(points) = ext.parsed_extension() {
            for point in points.iter() {
                if let Some(x509_parser::extensions::DistributionPointName::FullName(names)) =
                    &point.distribution_point
                {
                    for name in names {
                        if let GeneralName::URI(u) = name {
                            out.push((*u).to_owned());
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn a_crl_url_gives_every_leaf_a_distribution_point() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = init_with(&tmp.path().join("pki"), |o| {
        o.crl_url = Some("https://pki.example.net/gridward/crl/".to_owned());
    });
    assert_eq!(
        pki.crl_url().expect("read").as_deref(),
        Some("https://pki.example.net/gridward/crl/")
    );
    let server = pki
        .issue_server("hes", &["hes.example.net".to_owned()], &opts(), NOW)
        .expect("server");
    let m = pki.issue_meter(&meter("m1"), &opts(), NOW).expect("meter");
    for issued in [&server, &m] {
        let der = read_cert(&issued.cert_path);
        assert_eq!(
            crl_distribution_points(&parse(&der)),
            ["https://pki.example.net/gridward/crl/issuing.crl.pem"],
            "{}",
            issued.name
        );
    }
    // Without a URL, no distribution point (CRLs travel with the PKI directory).
    let (_tmp2, plain) = new_pki();
    let s = plain
        .issue_server("hes", &["hes.example.net".to_owned()], &opts(), NOW)
        .expect("server");
    assert!(crl_distribution_points(&parse(&read_cert(&s.cert_path))).is_empty());
    assert_eq!(plain.crl_url().expect("read"), None);
}

#[test]
fn a_crl_url_that_is_not_http_is_refused() {
    for bad in [
        "ftp://x/crl",
        "https://",
        "https:///crl",
        "https://a b/",
        "crl.example",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut o = InitOptions::new(ACTOR, NOW);
        o.crl_url = Some(bad.to_owned());
        let err = Pki::init(&tmp.path().join("pki"), &o).expect_err(bad);
        assert!(matches!(err, PkiError::InvalidCrlUrl(_)), "{bad}: {err}");
        assert!(
            !tmp.path().join("pki/ca/root.crt.pem").exists(),
            "{bad}: nothing created"
        );
    }
}

#[test]
fn client_certificates_bind_an_api_role_that_renewal_keeps() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let mut with_role = opts();
    with_role.role = Some("operator".into());
    with_role.validity_days = Some(20);
    let issued = pki.issue_client("ops-1", &with_role, NOW).unwrap();
    let cert = parse(&issued.certificate);
    assert_eq!(
        uris(&cert),
        vec![
            "urn:gridward:client:ops-1".to_owned(),
            "urn:gridward:role:operator".to_owned()
        ]
    );
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Client("ops-1".into()))
    );
    assert_eq!(
        client_role_of(&issued.certificate),
        Ok(Some("operator".into()))
    );

    // No role: none in the certificate.
    let plain = pki.issue_client("billing", &opts(), NOW).unwrap();
    assert_eq!(client_role_of(&plain.certificate), Ok(None));

    // Renewal keeps the role.
    let renewals = pki
        .renew(30, false, ACTOR, NOW + Duration::days(15))
        .unwrap();
    assert!(renewals.iter().any(|r| r.name == "ops-1"));
    let renewed = read_cert(&dir.join("clients/ops-1/cert.pem"));
    assert_ne!(renewed, issued.certificate);
    assert_eq!(client_role_of(&renewed), Ok(Some("operator".into())));

    // A role on a meter or a malformed role is refused before anything is issued.
    assert!(matches!(
        pki.issue_meter(&meter("M-role"), &with_role, NOW),
        Err(PkiError::RoleOnlyForClients { .. })
    ));
    let mut bad = opts();
    bad.role = Some("Operator; admin".into());
    assert!(matches!(
        pki.issue_client("ops-2", &bad, NOW),
        Err(PkiError::InvalidRole { .. })
    ));
}

#[test]
fn a_role_uri_on_a_non_client_certificate_is_refused() {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "M1");
    params.subject_alt_names = vec![
        SanType::URI("urn:gridward:meter:M1".try_into().unwrap()),
        SanType::URI("urn:gridward:role:admin".try_into().unwrap()),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let der = params.self_signed(&key).unwrap().der().to_vec();
    assert_eq!(identity_of(&der), Err(IdentityError::RoleWithoutClient));
    assert_eq!(client_role_of(&der), Err(IdentityError::RoleWithoutClient));
}

// ----- command signers --------------------------------------------------------------------------

/// The DER content octets of every OID in the certificate's EKU extension, and its criticality.
fn eku_oids(cert: &X509Certificate<'_>) -> (bool, Vec<Vec<u8>>) {
    let ext = cert
        .extended_key_usage()
        .expect("EKU parses")
        .expect("EKU present");
    let mut oids: Vec<Vec<u8>> = ext
        .value
        .other
        .iter()
        .map(|o| o.as_bytes().to_vec())
        .collect();
    if ext.value.server_auth {
        oids.push(b"serverAuth".to_vec());
    }
    if ext.value.client_auth {
        oids.push(b"clientAuth".to_vec());
    }
    if ext.value.any {
        oids.push(b"any".to_vec());
    }
    (ext.critical, oids)
}

#[test]
fn command_signer_profile() {
    let (tmp, pki) = new_pki();
    let issued = pki
        .issue_command_signer("hes-commands", &opts(), NOW)
        .unwrap();
    assert_eq!(issued.kind, LeafKind::CommandSigner);
    let dir = tmp.path().join("pki/command-signers/hes-commands");
    assert_eq!(issued.cert_path, dir.join("cert.pem"));
    assert_eq!(
        issued.key_path.as_deref(),
        Some(dir.join("key.pem").as_path())
    );
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 365);
    assert_eq!(cn(&cert), "hes-commands");
    assert!(cert.subject_alternative_name().unwrap().is_none(), "no SAN");
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_encipherment() && !ku.non_repudiation());
    assert_eq!(
        eku_oids(&cert),
        (true, vec![gridward_pki::command_signing_eku_der()]),
        "EKU critical, exactly the command-signing OID"
    );
    // Never a TLS identity: not as a meter, a client or a server.
    assert_eq!(
        identity_of(&issued.certificate),
        Err(IdentityError::CommandSigner)
    );
    assert_eq!(
        client_role_of(&issued.certificate),
        Err(IdentityError::CommandSigner)
    );
    assert_eq!(
        gridward_pki::command_signer_name_of(&issued.certificate),
        Ok("hes-commands".into())
    );
    // No TLS material for it.
    assert!(matches!(
        pki.tls_material(LeafKind::CommandSigner, "hes-commands"),
        Err(PkiError::NotForTls {
            kind: LeafKind::CommandSigner
        })
    ));
    // The inventory and the log name the kind.
    let list = pki.list(NOW).unwrap();
    let rec = list
        .iter()
        .find(|r| r.entry.serial == issued.serial)
        .unwrap();
    assert_eq!(rec.entry.kind, CertKind::CommandSigner);
    assert_eq!(rec.entry.kind.to_string(), "command-signer");
    let inv = fs::read_to_string(tmp.path().join("pki/inventory.json")).unwrap();
    assert!(
        inv.contains("\"kind\": \"command-signer\"") || inv.contains("\"kind\":\"command-signer\"")
    );
    let log = pki.log().unwrap();
    assert!(
        log.entries
            .iter()
            .any(|e| e.record.kind.as_deref() == Some("command-signer")
                && e.record.serial.as_deref() == Some(issued.serial.as_str()))
    );
    // Roles and bad names are refused.
    let mut with_role = opts();
    with_role.role = Some("operator".into());
    assert!(matches!(
        pki.issue_command_signer("x", &with_role, NOW),
        Err(PkiError::RoleOnlyForClients { .. })
    ));
    assert!(matches!(
        pki.issue_command_signer("../etc", &opts(), NOW),
        Err(PkiError::InvalidName { .. })
    ));
    assert!(matches!(
        pki.issue_command_signer("hes-commands", &opts(), NOW),
        Err(PkiError::AlreadyIssued { .. })
    ));
}

#[test]
fn command_signer_key_is_usable_for_cose_signing() {
    let (_tmp, pki) = new_pki();
    let mut ed = opts();
    ed.key_alg = LeafKeyAlg::Ed25519;
    for (name, o) in [("p256", opts()), ("ed", ed)] {
        let issued = pki.issue_command_signer(name, &o, NOW).unwrap();
        let path = pki.command_signer_key_path(name).unwrap();
        assert_eq!(Some(path.clone()), issued.key_path);
        let key = gridward_core::envelope::SigningKey::from_pkcs8_pem(
            &fs::read_to_string(&path).unwrap(),
        )
        .unwrap();
        let signer = pki
            .command_signers(NOW)
            .unwrap()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap();
        assert_eq!(key.public_key_spki(), signer.spki_der.as_slice());
        gridward_core::envelope::VerifyingKey::from_spki_der(&signer.spki_der).unwrap();
    }
}

#[test]
fn command_signers_during_a_rotation() {
    let (tmp, pki) = new_pki();
    assert!(matches!(
        pki.current_command_signer(NOW),
        Err(PkiError::NotFound { .. })
    ));
    assert!(pki.command_signers(NOW).unwrap().is_empty());
    let old = pki.issue_command_signer("hes", &opts(), NOW).unwrap();
    let later = NOW + Duration::days(300);
    let mut replace = opts();
    replace.replace = true;
    let new = pki.issue_command_signer("hes", &replace, later).unwrap();
    assert_eq!(new.superseded.as_deref(), Some(old.serial.as_str()));

    // Both are pinned, newest first; only the new one is current and has its key.
    let all = pki.command_signers(later).unwrap();
    assert_eq!(
        all.iter().map(|c| c.serial.as_str()).collect::<Vec<_>>(),
        vec![new.serial.as_str(), old.serial.as_str()]
    );
    assert!(all[0].current && all[0].key_on_disk);
    assert!(!all[1].current && !all[1].key_on_disk);
    assert_eq!(all[1].certificate, old.certificate);
    assert_eq!(all[1].not_after, old.not_after);
    assert_eq!(all[1].not_before, old.not_before);
    assert_eq!(
        parse(&all[0].certificate).public_key().raw,
        all[0].spki_der.as_slice()
    );
    assert_eq!(
        pki.current_command_signer(later).unwrap().serial,
        new.serial
    );

    // A second name issued later is newer still and becomes the one the head-end signs with.
    let next = pki
        .issue_command_signer("hes-next", &opts(), later + Duration::days(1))
        .unwrap();
    let now = later + Duration::days(2);
    assert_eq!(pki.command_signers(now).unwrap().len(), 3);
    assert_eq!(pki.current_command_signer(now).unwrap().serial, next.serial);

    // The old one drops out when it expires, a revoked one at once.
    let after_old = old.not_after + Duration::seconds(1);
    let pinned: Vec<String> = pki
        .command_signers(after_old)
        .unwrap()
        .into_iter()
        .map(|c| c.serial)
        .collect();
    assert!(!pinned.contains(&old.serial));
    pki.revoke(
        &RevokeTarget::Identity {
            kind: None,
            name: "hes-next".into(),
        },
        RevocationReason::KeyCompromise,
        ACTOR,
        now,
    )
    .unwrap();
    let pinned: Vec<String> = pki
        .command_signers(now)
        .unwrap()
        .into_iter()
        .map(|c| c.serial)
        .collect();
    assert_eq!(pinned, vec![new.serial.clone(), old.serial.clone()]);
    assert_eq!(pki.current_command_signer(now).unwrap().serial, new.serial);
    // The revocation is on the issuing CRL.
    let crl = issuing_crl(&tmp.path().join("pki"));
    let (_, crl) = CertificateRevocationList::from_der(&crl).unwrap();
    assert!(
        crl.iter_revoked_certificates()
            .any(|r| hex::encode(r.raw_serial()).trim_start_matches("00") == next.serial)
    );
    assert!(matches!(
        pki.command_signer_key_path("hes-next"),
        Err(PkiError::NotFound { .. })
    ));

    // Renewal re-issues a command signer like any leaf, with the same profile.
    let renewals = pki.renew(400, false, ACTOR, now).unwrap();
    let r = renewals
        .iter()
        .find(|r| r.kind == LeafKind::CommandSigner)
        .expect("command signer renewed");
    assert_eq!(r.old_serial, new.serial);
    let current = pki.current_command_signer(now).unwrap();
    assert_eq!(current.serial, r.new_serial);
    assert_eq!(
        identity_of(&current.certificate),
        Err(IdentityError::CommandSigner)
    );
    assert_eq!(pki.command_signers(now).unwrap().len(), 3);
}

#[test]
fn command_signer_key_path_errors() {
    let (tmp, pki) = new_pki();
    assert!(matches!(
        pki.command_signer_key_path("nobody"),
        Err(PkiError::NotFound { .. })
    ));
    assert!(matches!(
        pki.command_signer_key_path("a/b"),
        Err(PkiError::InvalidName { .. })
    ));
    // Made from a CSR (key in an HSM, say): no key on disk, but pinned and current.
    let k = KeyPair::generate().unwrap();
    let mut p = csr_params("hsm-signer");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let csr = p.serialize_request(&k).unwrap().pem().unwrap();
    let issued = pki
        .sign_csr(
            csr.as_bytes(),
            LeafKind::CommandSigner,
            None,
            &[],
            &opts(),
            NOW,
        )
        .unwrap();
    assert_eq!(
        identity_of(&issued.certificate),
        Err(IdentityError::CommandSigner),
        "the CSR's clientAuth request is ignored"
    );
    assert!(matches!(
        pki.command_signer_key_path("hsm-signer"),
        Err(PkiError::NoPrivateKey { .. })
    ));
    let current = pki.current_command_signer(NOW).unwrap();
    assert_eq!(current.serial, issued.serial);
    assert!(!current.key_on_disk);
    assert_eq!(current.spki_der, k.subject_public_key_info());

    // A key file that is not the certificate's key.
    pki.issue_command_signer("hes", &opts(), NOW).unwrap();
    let key_path = tmp.path().join("pki/command-signers/hes/key.pem");
    fs::write(&key_path, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let err = pki.command_signer_key_path("hes").unwrap_err();
    assert!(matches!(err, PkiError::BadFile { .. }), "{err}");
    assert!(err.to_string().contains("does not belong"), "{err}");

    // A certificate file that is not the one in the inventory.
    fs::copy(
        tmp.path().join("pki/command-signers/hsm-signer/cert.pem"),
        tmp.path().join("pki/command-signers/hes/cert.pem"),
    )
    .unwrap();
    assert!(matches!(
        pki.command_signers(NOW),
        Err(PkiError::BadFile { .. })
    ));
}

#[test]
fn command_signer_p12_round_trip() {
    let (tmp, pki) = new_pki();
    let issued = pki.issue_command_signer("hes", &opts(), NOW).unwrap();
    let bytes = pki
        .export_p12(LeafKind::CommandSigner, "hes", PASS, ACTOR, NOW)
        .unwrap();
    let contents = gridward_pki::p12::read(&bytes, PASS).unwrap();
    assert_eq!(contents.keys[0].alias, "hes");
    assert_eq!(contents.keys[0].chain.len(), 3);
    let key_path = tmp.path().join("pki/command-signers/hes/key.pem");
    fs::remove_file(&key_path).unwrap();
    let report = pki.import_p12(&bytes, PASS, ACTOR, NOW).unwrap();
    assert_eq!(report.keys.len(), 1);
    assert_eq!(report.keys[0].kind, LeafKind::CommandSigner);
    assert_eq!(report.keys[0].name, "hes");
    assert_eq!(report.keys[0].serial, issued.serial);
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(pki.command_signer_key_path("hes").unwrap(), key_path);
}

/// Runs a TLS handshake in memory; returns the first error and whether the server raised it.
fn handshake(
    client: std::sync::Arc<rustls::ClientConfig>,
    server: std::sync::Arc<rustls::ServerConfig>,
    server_name: &str,
) -> Result<(), (bool, rustls::Error)> {
    use rustls::{ClientConnection, Connection, ServerConnection};
    fn transfer(from: &mut Connection, to: &mut Connection) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).expect("write TLS");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).expect("read TLS");
        }
    }
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).expect("server name");
    let mut c = Connection::Client(ClientConnection::new(client, name).expect("client connection"));
    let mut s = Connection::Server(ServerConnection::new(server).expect("server connection"));
    for _ in 0..10 {
        transfer(&mut c, &mut s);
        s.process_new_packets().map_err(|e| (true, e))?;
        transfer(&mut s, &mut c);
        c.process_new_packets().map_err(|e| (false, e))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn tls_refuses_a_command_signer_as_client_and_as_server() {
    use gridward_pki::tls::{TlsOptions, client_config_with, server_config_with};
    let (tmp, pki) = new_pki();
    pki.issue_server("localhost", &["localhost".into()], &opts(), NOW)
        .unwrap();
    pki.issue_client("billing", &opts(), NOW).unwrap();
    pki.issue_command_signer("localhost", &opts(), NOW).unwrap();
    let server = pki.tls_material(LeafKind::Server, "localhost").unwrap();
    let client = pki.tls_material(LeafKind::Client, "billing").unwrap();
    // The command signer's certificate and key, in otherwise complete material.
    let signer = {
        let mut m = server.clone();
        let dir = tmp.path().join("pki/command-signers/localhost");
        m.chain = vec![
            read_cert(&dir.join("cert.pem")),
            pki.issuing_certificate().clone(),
        ];
        m.key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
        m
    };
    let at = TlsOptions::new().with_fixed_time(NOW + Duration::minutes(1));
    let server_cfg = |m| server_config_with(m, &at).unwrap();
    let client_cfg = |m| client_config_with(m, &at).unwrap();
    let purpose = |e: &rustls::Error| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose
                    | rustls::CertificateError::InvalidPurposeContext { .. }
            )
        )
    };

    // The genuine pair works, so the refusals below are about the command signer.
    handshake(client_cfg(&client), server_cfg(&server), "localhost").unwrap();
    // As a client certificate: the server's verifier refuses it (no clientAuth).
    let err = handshake(client_cfg(&signer), server_cfg(&server), "localhost").unwrap_err();
    assert!(err.0 && purpose(&err.1), "{err:?}");
    // As a server certificate: the client refuses it (no serverAuth).
    let err = handshake(client_cfg(&client), server_cfg(&signer), "localhost").unwrap_err();
    assert!(!err.0 && purpose(&err.1), "{err:?}");
}

/// Runs `openssl ARGS`; fails with an install hint if it is missing.
fn openssl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); install it (Debian: openssl)"))
}

#[test]
fn openssl_shows_the_command_signing_eku_and_no_tls_eku() {
    let (tmp, pki) = new_pki();
    pki.issue_command_signer("hes", &opts(), NOW).unwrap();
    let d = tmp.path().join("pki");
    let cert = d.join("command-signers/hes/cert.pem");
    let cert_s = cert.to_str().unwrap();
    let out = openssl(&["x509", "-in", cert_s, "-noout", "-text"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let eku = text
        .split("X509v3 Extended Key Usage:")
        .nth(1)
        .expect("openssl shows an EKU extension");
    assert!(
        text.contains("X509v3 Extended Key Usage: critical"),
        "{text}"
    );
    let eku_line = eku.lines().nth(1).unwrap_or_default().trim();
    assert_eq!(eku_line, gridward_pki::COMMAND_SIGNING_EKU, "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    assert!(!text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("Subject Alternative Name"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(text.contains("Subject: CN = hes"), "{text}");

    // The chain verifies, but not for either TLS purpose.
    let root = d.join("ca/root.crt.pem");
    let issuing = d.join("ca/issuing.crt.pem");
    let verify = |purpose: Option<&str>| {
        let mut args = vec![
            "verify",
            "-attime",
            "1740830400", // NOW + 0 s: 2025-03-01T12:00:00Z
            "-CAfile",
            root.to_str().unwrap(),
            "-untrusted",
            issuing.to_str().unwrap(),
        ];
        if let Some(p) = purpose {
            args.extend(["-purpose", p]);
        }
        args.push(cert_s);
        openssl(&args)
    };
    let ok = verify(None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    for p in ["sslclient", "sslserver"] {
        let out = verify(Some(p));
        assert!(
            !out.status.success(),
            "openssl accepted the command signer for {p}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

// ----- data concentrators (issue 11) ------------------------------------------------------------

#[test]
fn concentrator_profile() {
    let (tmp, pki) = new_pki();
    let issued = pki
        .issue_concentrator(&meter("dc-1"), &opts(), NOW)
        .unwrap();
    let dir = tmp.path().join("pki/concentrators/dc-1");
    assert_eq!(issued.kind, LeafKind::Concentrator);
    assert_eq!(issued.cert_path, dir.join("cert.pem"));
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(read_cert(&dir.join("cert.pem")), issued.certificate);
    let cert = parse(&issued.certificate);
    check_common_leaf(&pki, &cert, 3650);
    assert_eq!(cn(&cert), "dc-1");
    assert_eq!(
        uris(&cert),
        vec!["urn:gridward:concentrator:dc-1".to_owned()]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && eku.other.is_empty());
    assert_eq!(
        identity_of(&issued.certificate),
        Ok(Identity::Concentrator(meter("dc-1")))
    );
    let key = KeyPair::from_pem(&fs::read_to_string(dir.join("key.pem")).unwrap()).unwrap();
    assert_eq!(key.subject_public_key_info(), cert.public_key().raw);

    // The inventory names the kind "concentrator".
    let list = pki.list(NOW).unwrap();
    let rec = list
        .iter()
        .find(|r| r.entry.serial == issued.serial)
        .unwrap();
    assert_eq!(rec.entry.kind, CertKind::Concentrator);
    assert_eq!(rec.entry.kind.as_str(), "concentrator");
    assert_eq!(rec.entry.kind.leaf(), Some(LeafKind::Concentrator));
    let inventory = fs::read_to_string(tmp.path().join("pki/inventory.json")).unwrap();
    assert!(
        inventory.contains("\"kind\": \"concentrator\""),
        "{inventory}"
    );
    assert_eq!(
        "concentrator".parse::<LeafKind>(),
        Ok(LeafKind::Concentrator)
    );

    // Issuing the same id again needs --replace, as for meters.
    assert!(matches!(
        pki.issue_concentrator(&meter("dc-1"), &opts(), NOW),
        Err(PkiError::AlreadyIssued {
            kind: LeafKind::Concentrator,
            ..
        })
    ));
}

#[test]
fn meter_and_concentrator_ids_are_one_namespace() {
    let (_tmp, pki) = new_pki();
    let m = pki.issue_meter(&meter("shared-1"), &opts(), NOW).unwrap();
    let err = pki
        .issue_concentrator(&meter("shared-1"), &opts(), NOW)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PkiError::DeviceIdTaken {
                kind: LeafKind::Concentrator,
                name,
                taken_by: LeafKind::Meter,
                serial,
            } if name == "shared-1" && *serial == m.serial
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("never also a concentrator's"),
        "{err}"
    );
    // Not even with --replace, nor once the meter's certificate is revoked.
    let mut replace = opts();
    replace.replace = true;
    assert!(matches!(
        pki.issue_concentrator(&meter("shared-1"), &replace, NOW),
        Err(PkiError::DeviceIdTaken { .. })
    ));
    pki.revoke(
        &RevokeTarget::Serial(m.serial.clone()),
        RevocationReason::CessationOfOperation,
        ACTOR,
        NOW,
    )
    .unwrap();
    assert!(matches!(
        pki.issue_concentrator(&meter("shared-1"), &opts(), NOW),
        Err(PkiError::DeviceIdTaken { .. })
    ));

    // And the other way round, by single, bulk and CSR issuance.
    let c = pki
        .issue_concentrator(&meter("DC-000001"), &opts(), NOW)
        .unwrap();
    let err = pki
        .issue_meter(&meter("DC-000001"), &opts(), NOW)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PkiError::DeviceIdTaken {
                kind: LeafKind::Meter,
                taken_by: LeafKind::Concentrator,
                serial,
                ..
            } if *serial == c.serial
        ),
        "{err}"
    );
    let before = pki.list(NOW).unwrap().len();
    // Bulk meters numbered from DC-000001 (there is no meter DC-*): refused before any is issued.
    assert!(matches!(
        pki.issue_meters("DC-", 3, &opts(), NOW, &mut |_| {}),
        Err(PkiError::DeviceIdTaken { .. })
    ));
    assert_eq!(pki.list(NOW).unwrap().len(), before);
    let csr_key = KeyPair::generate().unwrap();
    let csr = csr_params("DC-000001")
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    assert!(matches!(
        pki.sign_csr(csr.as_bytes(), LeafKind::Meter, None, &[], &opts(), NOW),
        Err(PkiError::DeviceIdTaken { .. })
    ));
    // A concentrator CSR works like a meter's.
    let csr = csr_params("dc-csr")
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    let from_csr = pki
        .sign_csr(
            csr.as_bytes(),
            LeafKind::Concentrator,
            None,
            &[],
            &opts(),
            NOW,
        )
        .unwrap();
    assert_eq!(
        identity_of(&from_csr.certificate),
        Ok(Identity::Concentrator(meter("dc-csr")))
    );
    // Bulk concentrators number on from their own kind.
    let bulk = pki
        .issue_concentrators("DC-", 2, &opts(), NOW, &mut |_| {})
        .unwrap();
    let names: Vec<_> = bulk.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["DC-000002", "DC-000003"]);
}

#[test]
fn concentrators_renew_revoke_and_export_like_meters() {
    let (tmp, pki) = new_pki();
    let dir = tmp.path().join("pki");
    let mut short = opts();
    short.validity_days = Some(20);
    let old = pki.issue_concentrator(&meter("dc-r"), &short, NOW).unwrap();
    let at = NOW + Duration::days(15);
    let renewals = pki.renew(30, false, ACTOR, at).unwrap();
    assert_eq!(renewals.len(), 1);
    assert_eq!(renewals[0].kind, LeafKind::Concentrator);
    assert_eq!(renewals[0].old_serial, old.serial);
    let new = read_cert(&dir.join("concentrators/dc-r/cert.pem"));
    assert_eq!(identity_of(&new), Ok(Identity::Concentrator(meter("dc-r"))));
    assert_eq!(
        read_cert(&dir.join(format!("archive/{}.crt.pem", old.serial))),
        old.certificate
    );

    let bytes = pki
        .export_p12(LeafKind::Concentrator, "dc-r", PASS, ACTOR, at)
        .unwrap();
    let contents = gridward_pki::p12::read(&bytes, PASS).unwrap();
    assert_eq!(contents.keys.len(), 1);
    assert_eq!(contents.keys[0].alias, "dc-r");
    assert_eq!(contents.keys[0].chain[0], new);
    // Import it back after losing the key: it is recognised as a concentrator.
    fs::remove_file(dir.join("concentrators/dc-r/key.pem")).unwrap();
    let report = pki.import_p12(&bytes, PASS, ACTOR, at).unwrap();
    assert_eq!(report.keys.len(), 1);
    assert!(dir.join("concentrators/dc-r/key.pem").is_file());

    let revoked = pki
        .revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Concentrator),
                name: "dc-r".into(),
            },
            RevocationReason::KeyCompromise,
            ACTOR,
            at,
        )
        .unwrap();
    assert_eq!(revoked.kind, CertKind::Concentrator);
    let crl = issuing_crl(&dir);
    let (_, crl) = CertificateRevocationList::from_der(&crl).unwrap();
    let serial = parse(&new).raw_serial().to_vec();
    assert!(
        crl.iter_revoked_certificates()
            .any(|r| r.raw_serial() == serial)
    );
    // Without a kind, the name alone finds it.
    pki.issue_concentrator(&meter("dc-s"), &opts(), at).unwrap();
    pki.revoke(
        &RevokeTarget::Identity {
            kind: None,
            name: "dc-s".into(),
        },
        RevocationReason::Superseded,
        ACTOR,
        at,
    )
    .unwrap();
}

#[test]
fn meter_keys_lists_every_valid_certificate_of_each_meter() {
    let (tmp, pki) = new_pki();
    let spki = |der: &[u8]| parse(der).public_key().raw.to_vec();
    let mut short = opts();
    short.validity_days = Some(20);
    let a1 = pki.issue_meter(&meter("ka"), &short, NOW).unwrap();
    let b = pki.issue_meter(&meter("kb"), &opts(), NOW).unwrap();
    let revoked = pki.issue_meter(&meter("kr"), &opts(), NOW).unwrap();
    pki.issue_concentrator(&meter("kdc"), &opts(), NOW).unwrap();
    pki.issue_client("kclient", &opts(), NOW).unwrap();
    pki.revoke(
        &RevokeTarget::Serial(revoked.serial.clone()),
        RevocationReason::KeyCompromise,
        ACTOR,
        NOW,
    )
    .unwrap();

    let keys = pki.meter_keys(NOW).unwrap();
    assert_eq!(
        keys.len(),
        2,
        "ka and kb; not the revoked meter, not the concentrator"
    );
    let ka = keys.get(&meter("ka"));
    assert_eq!(ka.len(), 1);
    assert_eq!(ka[0].serial, a1.serial);
    assert_eq!(&*ka[0].spki_der, spki(&a1.certificate).as_slice());
    assert_eq!(ka[0].not_after, a1.not_after);
    // The SPKI is what the envelope's verifying key is built from.
    gridward_core::envelope::VerifyingKey::from_spki_der(&ka[0].spki_der).unwrap();
    assert_eq!(keys.get(&meter("kb"))[0].serial, b.serial);
    assert!(keys.get(&meter("kr")).is_empty());
    assert!(keys.get(&meter("kdc")).is_empty());
    assert!(keys.get(&meter("nobody")).is_empty());

    // Renewal overlap: the current and the superseded certificate are both listed, newest first.
    let at = NOW + Duration::days(15);
    let renewed = pki.renew(30, false, ACTOR, at).unwrap();
    assert_eq!(renewed.len(), 1);
    let keys = pki.meter_keys(at).unwrap();
    let ka = keys.get(&meter("ka"));
    let serials: Vec<_> = ka.iter().map(|k| k.serial.as_str()).collect();
    assert_eq!(
        serials,
        [renewed[0].new_serial.as_str(), a1.serial.as_str()]
    );
    assert_ne!(ka[0].spki_der, ka[1].spki_der);
    // Once the old one expires only the new one is left.
    let later = NOW + Duration::days(21);
    let keys = pki.meter_keys(later).unwrap();
    let serials: Vec<_> = keys
        .get(&meter("ka"))
        .iter()
        .map(|k| k.serial.clone())
        .collect();
    assert_eq!(serials, [renewed[0].new_serial.clone()]);
    // Before a certificate's validity starts, it is not listed.
    assert!(pki.meter_keys(NOW - Duration::days(1)).unwrap().is_empty());
    // Revoking the superseded certificate removes it from the overlap.
    pki.revoke(
        &RevokeTarget::Serial(a1.serial.clone()),
        RevocationReason::Superseded,
        ACTOR,
        at,
    )
    .unwrap();
    assert_eq!(pki.meter_keys(at).unwrap().get(&meter("ka")).len(), 1);

    // A certificate file that is not the one the inventory records is an error, not a key.
    let path = tmp.path().join("pki/meters/kb/cert.pem");
    fs::copy(tmp.path().join("pki/meters/ka/cert.pem"), &path).unwrap();
    assert!(matches!(pki.meter_keys(at), Err(PkiError::BadFile { .. })));
    fs::remove_file(&path).unwrap();
    assert!(pki.meter_keys(at).is_err());
}
