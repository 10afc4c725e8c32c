//! Certificate signing requests: parsing (PEM or DER, OpenSSL's `CERTIFICATE REQUEST` and
//! keytool's `NEW CERTIFICATE REQUEST`), self-signature verification, and what is taken from them.
//!
//! Only two things are taken from a CSR: the subject public key and the subject common name.
//! Requested extensions (CA:true, key usages, EKUs, SANs, keytool's SubjectKeyIdentifier) are
//! read past and never honoured; the certificate is built from the profile alone.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::error::PkiError;
use crate::keys::{describe_public_key, pem_block};

/// What a verified CSR contributes to a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrInfo {
    /// The subject public key (DER SubjectPublicKeyInfo).
    pub spki_der: Vec<u8>,
    /// The subject common name, if there is exactly one.
    pub common_name: Option<String>,
    /// Key algorithm (`p256`, `rsa2048`, `ed25519`, ...).
    pub key_alg: String,
    /// Number of extensions the CSR requested (all ignored).
    pub ignored_extensions: usize,
}

/// Parses `input` (PEM or DER), checks the key is one this CA certifies, and verifies the CSR's
/// self-signature.
///
/// Errors: [`PkiError::CsrParse`], [`PkiError::UnsupportedKey`], [`PkiError::CsrSignature`].
pub fn parse_and_verify(input: &[u8]) -> Result<CsrInfo, PkiError> {
    let der = csr_der(input)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|e| PkiError::CsrParse {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(PkiError::CsrParse {
            reason: "trailing bytes after the request".into(),
        });
    }
    let info = &csr.certification_request_info;
    let spki_der = info.subject_pki.raw.to_vec();
    // Refuse unsupported keys before checking the signature, so the error says what is wrong.
    let key_alg = describe_public_key(&spki_der)?;
    csr.verify_signature().map_err(|_| PkiError::CsrSignature)?;

    let cns: Vec<_> = info.subject.iter_common_name().collect();
    let common_name = match cns.as_slice() {
        [one] => Some(
            one.as_str()
                .map_err(|e| PkiError::CsrParse {
                    reason: format!("subject common name: {e}"),
                })?
                .to_owned(),
        ),
        _ => None,
    };
    let ignored_extensions = csr.requested_extensions().map(Iterator::count).unwrap_or(0);
    Ok(CsrInfo {
        spki_der,
        common_name,
        key_alg,
        ignored_extensions,
    })
}

/// The DER of a CSR given as PEM (any label ending in `CERTIFICATE REQUEST`, text around it
/// allowed) or as DER.
fn csr_der(input: &[u8]) -> Result<Vec<u8>, PkiError> {
    if input.first() == Some(&0x30) {
        return Ok(input.to_vec());
    }
    if let Some((_, der)) = pem_block(input, |label| label.ends_with("CERTIFICATE REQUEST")) {
        return Ok(der);
    }
    Err(PkiError::CsrParse {
        reason:
            "no PEM block labelled CERTIFICATE REQUEST (or NEW CERTIFICATE REQUEST) and not DER"
                .into(),
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};

    use super::*;

    fn csr(key: &KeyPair, cn: Option<&str>) -> rcgen::CertificateSigningRequest {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.serialize_request(key).unwrap()
    }

    #[test]
    fn pem_der_and_keytool_label() {
        let key = KeyPair::generate().unwrap();
        let req = csr(&key, Some("MTR-1"));
        let pem = req.pem().unwrap();
        let a = parse_and_verify(pem.as_bytes()).unwrap();
        assert_eq!(a.common_name.as_deref(), Some("MTR-1"));
        assert_eq!(a.key_alg, "p256");
        assert_eq!(a.spki_der, key.subject_public_key_info());
        let b = parse_and_verify(req.der()).unwrap();
        assert_eq!(a, b);
        let keytool = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        assert_eq!(parse_and_verify(keytool.as_bytes()).unwrap(), a);
    }

    #[test]
    fn corrupted_signature_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut der = csr(&key, Some("x")).der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert!(matches!(
            parse_and_verify(&der),
            Err(PkiError::CsrSignature)
        ));
    }

    #[test]
    fn no_cn_and_garbage() {
        let key = KeyPair::generate().unwrap();
        assert_eq!(
            parse_and_verify(csr(&key, None).der()).unwrap().common_name,
            None
        );
        assert!(matches!(
            parse_and_verify(b"hello"),
            Err(PkiError::CsrParse { .. })
        ));
        assert!(matches!(
            parse_and_verify(b"\x30\x03\x02\x01\x00"),
            Err(PkiError::CsrParse { .. })
        ));
    }
}
