//! [`identity_of`]: the one function that maps a certificate to the identity it proves.
//!
//! Every part of Gridward that authenticates a peer by certificate (the MQTT endpoint, the HTTPS
//! API, the downstream forwarder) asks this function who the peer is, and nothing else.
//! It checks the certificate's *content*; the TLS layer has already checked the chain, validity and
//! revocation.

use std::fmt;

use gridward_core::meter_id::METER_URI_PREFIX;
use gridward_core::{MeterId, MeterIdError};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The prefix of a client identity URI SAN: `urn:gridward:client:{name}`.
pub const CLIENT_URI_PREFIX: &str = "urn:gridward:client:";

/// The prefix of the URI SAN that binds an API role to a client certificate:
/// `urn:gridward:role:{role}` (see [`client_role_of`]).
pub const ROLE_URI_PREFIX: &str = "urn:gridward:role:";

/// The prefix of a concentrator identity URI SAN: `urn:gridward:concentrator:{id}`.
pub const CONCENTRATOR_URI_PREFIX: &str = "urn:gridward:concentrator:";

/// The prefix every Gridward identity URI starts with.
const GRIDWARD_URI_PREFIX: &str = "urn:gridward:";

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A meter: URI SAN `urn:gridward:meter:{id}`, CN = id, EKU clientAuth.
    Meter(MeterId),
    /// A client (downstream forwarder, API client): URI SAN `urn:gridward:client:{name}`,
    /// CN = name, EKU clientAuth.
    Client(String),
    /// A server: CN = name, EKU serverAuth.
    Server(String),
    /// A data concentrator: URI SAN `urn:gridward:concentrator:{id}`, CN = id, EKU
    /// clientAuth. Its id has the syntax of a meter id and is never also a meter's.
    Concentrator(MeterId),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Meter(id) => write!(f, "meter {id}"),
            Self::Client(name) => write!(f, "client {name}"),
            Self::Server(name) => write!(f, "server {name}"),
            Self::Concentrator(id) => write!(f, "concentrator {id}"),
        }
    }
}

/// Why a certificate does not prove an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The bytes are not a DER X.509 certificate, or one of its extensions is malformed or duplicated.
    #[error("not a well-formed X.509 certificate: {0}")]
    Malformed(String),
    /// The certificate is a CA certificate (basicConstraints CA:true); CAs are not peers.
    #[error("certificate is a CA certificate (CA:true) and cannot identify a peer")]
    IsCa,
    /// The subject has no common name.
    #[error("certificate subject has no common name")]
    MissingCommonName,
    /// The subject has more than one common name.
    #[error("certificate subject has {0} common names; exactly one is required")]
    MultipleCommonNames(usize),
    /// The certificate carries more than one meter URI SAN.
    #[error("certificate carries {0} urn:gridward:meter: URIs; exactly one is required")]
    MultipleMeterUris(usize),
    /// The certificate carries more than one client URI SAN.
    #[error("certificate carries {0} urn:gridward:client: URIs; exactly one is required")]
    MultipleClientUris(usize),
    /// The certificate carries more than one role URI SAN.
    #[error("certificate carries {0} urn:gridward:role: URIs; at most one is allowed")]
    MultipleRoleUris(usize),
    /// A role URI SAN on a certificate that is not a client certificate.
    #[error("certificate carries a urn:gridward:role: URI but is not a client certificate")]
    RoleWithoutClient,
    /// The role in the role URI SAN is not 1 to 32 lowercase letters.
    #[error("role in the certificate is invalid: {0:?}")]
    InvalidRole(String),
    /// The certificate carries more than one concentrator URI SAN.
    #[error("certificate carries {0} urn:gridward:concentrator: URIs; exactly one is required")]
    MultipleConcentratorUris(usize),
    /// The certificate carries identity URIs of more than one kind (meter, client,
    /// concentrator).
    #[error(
        "certificate carries identity URIs of more than one kind (meter, client, concentrator)"
    )]
    MixedIdentityUris,
    /// A `urn:gridward:` URI SAN is neither a meter, a client nor a concentrator identity (nor
    /// a role).
    #[error("certificate carries an unknown Gridward identity URI {0:?}")]
    UnknownGridwardUri(String),
    /// The meter (or concentrator) id in the URI SAN is not a valid meter id.
    #[error("meter id in the certificate is invalid: {0}")]
    InvalidMeterId(#[from] MeterIdError),
    /// The client name in the URI SAN is empty.
    #[error("client name in the certificate is empty")]
    EmptyClientName,
    /// The common name differs from the identity in the URI SAN.
    #[error("certificate CN {cn:?} does not match its identity URI {uri:?}")]
    CommonNameMismatch {
        /// The subject common name.
        cn: String,
        /// The identity URI SAN.
        uri: String,
    },
    /// The certificate has no extended key usage extension.
    #[error("certificate has no extended key usage; {0} is required")]
    MissingEku(&'static str),
    /// The extended key usage does not include the purpose this identity needs.
    #[error("certificate's extended key usage lacks {0}")]
    WrongEku(&'static str),
    /// The certificate carries no Gridward identity URI and is not a server certificate.
    #[error(
        "certificate carries no Gridward identity (no urn:gridward: URI SAN, no serverAuth EKU)"
    )]
    NoIdentity,
    /// The certificate carries the command-signing EKU: it signs commands and never
    /// authenticates a TLS peer, whatever else it carries.
    #[error(
        "certificate is a command-signer certificate (Gridward command-signing EKU) and cannot identify a TLS peer"
    )]
    CommandSigner,
    /// The certificate is not a command-signer certificate: its extended key usage is missing
    /// or is not exactly the Gridward command-signing EKU.
    #[error(
        "certificate's extended key usage is not exactly the Gridward command-signing EKU {}",
        crate::profile::COMMAND_SIGNING_EKU
    )]
    NotCommandSigner,
    /// A command-signer certificate carries a subject alternative name (it names no peer).
    #[error("command-signer certificate carries a subject alternative name; it must carry none")]
    CommandSignerWithSan,
}

/// Maps a certificate (DER) to the identity it proves.
///
/// Rules:
/// - a CA certificate (basicConstraints CA:true) never identifies a peer;
/// - exactly one subject common name;
/// - a meter certificate carries exactly one `urn:gridward:meter:{id}` URI SAN, a valid meter id,
///   CN equal to the id, and EKU clientAuth;
/// - a client certificate carries exactly one `urn:gridward:client:{name}` URI SAN, CN equal to
///   the name, and EKU clientAuth;
/// - a data concentrator certificate carries exactly one `urn:gridward:concentrator:{id}` URI
///   SAN, a valid meter id, CN equal to the id, and EKU clientAuth; with a meter or client URI
///   as well it names no one ([`IdentityError::MixedIdentityUris`]);
/// - a certificate with no Gridward URI and EKU serverAuth is a server named by its CN;
/// - a certificate carrying the command-signing EKU ([`crate::COMMAND_SIGNING_EKU`]) is never a
///   TLS identity, even if it also carries clientAuth or serverAuth
///   ([`IdentityError::CommandSigner`]);
/// - anything else is refused with the reason.
///
/// This function does not check signatures, validity or revocation: the TLS layer does that
/// before a peer certificate reaches it.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, IdentityError> {
    let malformed = |e: &dyn fmt::Display| IdentityError::Malformed(e.to_string());
    let (rest, cert) = X509Certificate::from_der(cert_der).map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }

    let basic = cert.basic_constraints().map_err(|e| malformed(&e))?;
    if basic.is_some_and(|b| b.value.ca) {
        return Err(IdentityError::IsCa);
    }

    let cn = common_name(&cert)?;

    let san = cert.subject_alternative_name().map_err(|e| malformed(&e))?;
    let mut meter_uris = Vec::new();
    let mut client_uris = Vec::new();
    let mut concentrator_uris = Vec::new();
    let mut role_uris = 0usize;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(METER_URI_PREFIX) {
                    meter_uris.push((*uri, id));
                } else if let Some(name) = uri.strip_prefix(CLIENT_URI_PREFIX) {
                    client_uris.push((*uri, name));
                } else if let Some(id) = uri.strip_prefix(CONCENTRATOR_URI_PREFIX) {
                    concentrator_uris.push((*uri, id));
                } else if uri.starts_with(ROLE_URI_PREFIX) {
                    role_uris += 1;
                } else if uri.starts_with(GRIDWARD_URI_PREFIX) {
                    return Err(IdentityError::UnknownGridwardUri((*uri).to_owned()));
                }
            }
        }
    }

    let eku = cert
        .extended_key_usage()
        .map_err(|e| malformed(&e))?
        .map(|e| e.value);
    if eku.is_some_and(has_command_signing_eku) {
        return Err(IdentityError::CommandSigner);
    }
    let require_eku =
        |purpose: &'static str, has: fn(&x509_parser::extensions::ExtendedKeyUsage) -> bool| {
            match eku {
                None => Err(IdentityError::MissingEku(purpose)),
                Some(e) if !has(e) => Err(IdentityError::WrongEku(purpose)),
                Some(_) => Ok(()),
            }
        };

    if role_uris > 1 {
        return Err(IdentityError::MultipleRoleUris(role_uris));
    }
    if role_uris == 1
        && (client_uris.is_empty() || !meter_uris.is_empty() || !concentrator_uris.is_empty())
    {
        return Err(IdentityError::RoleWithoutClient);
    }
    if !concentrator_uris.is_empty() {
        if !meter_uris.is_empty() || !client_uris.is_empty() {
            return Err(IdentityError::MixedIdentityUris);
        }
        let [(uri, id)] = concentrator_uris.as_slice() else {
            return Err(IdentityError::MultipleConcentratorUris(
                concentrator_uris.len(),
            ));
        };
        let id = MeterId::new(id)?;
        if cn != id.as_str() {
            return Err(IdentityError::CommonNameMismatch {
                cn,
                uri: (*uri).to_owned(),
            });
        }
        require_eku("clientAuth", |e| e.client_auth)?;
        return Ok(Identity::Concentrator(id));
    }
    match (meter_uris.as_slice(), client_uris.as_slice()) {
        ([], []) => {
            // No Gridward identity URI: only a server certificate remains possible.
            match eku {
                Some(e) if e.server_auth => Ok(Identity::Server(cn)),
                _ => Err(IdentityError::NoIdentity),
            }
        }
        (_, [_, ..]) if !meter_uris.is_empty() => Err(IdentityError::MixedIdentityUris),
        ([(uri, id)], []) => {
            let id = MeterId::new(id)?;
            if cn != id.as_str() {
                return Err(IdentityError::CommonNameMismatch {
                    cn,
                    uri: (*uri).to_owned(),
                });
            }
            require_eku("clientAuth", |e| e.client_auth)?;
            Ok(Identity::Meter(id))
        }
        (many, []) => Err(IdentityError::MultipleMeterUris(many.len())),
        ([], [(uri, name)]) => {
            if name.is_empty() {
                return Err(IdentityError::EmptyClientName);
            }
            if cn != *name {
                return Err(IdentityError::CommonNameMismatch {
                    cn,
                    uri: (*uri).to_owned(),
                });
            }
            require_eku("clientAuth", |e| e.client_auth)?;
            Ok(Identity::Client((*name).to_owned()))
        }
        ([], many) => Err(IdentityError::MultipleClientUris(many.len())),
        (_, _) => Err(IdentityError::MixedIdentityUris),
    }
}

/// Whether an EKU extension lists the command-signing purpose.
fn has_command_signing_eku(eku: &x509_parser::extensions::ExtendedKeyUsage<'_>) -> bool {
    let ours = crate::profile::command_signing_eku_der();
    eku.other
        .iter()
        .any(|oid| oid.as_bytes() == ours.as_slice())
}

/// The name (CN) of a command-signer certificate: what a meter checks, besides the signature
/// chain and validity, before it trusts a certificate's key for commands.
///
/// Rules: not a CA; exactly one common name, a valid name (as for `gridward pki issue
/// command-signer`); an extended key usage of exactly one purpose, [`crate::COMMAND_SIGNING_EKU`]
/// (no anyExtendedKeyUsage, no serverAuth or clientAuth); no subject alternative name.
///
/// Like [`identity_of`], this does not check signatures, validity or revocation.
pub fn command_signer_name_of(cert_der: &[u8]) -> Result<String, IdentityError> {
    let malformed = |e: &dyn fmt::Display| IdentityError::Malformed(e.to_string());
    let (rest, cert) = X509Certificate::from_der(cert_der).map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }
    let basic = cert.basic_constraints().map_err(|e| malformed(&e))?;
    if basic.is_some_and(|b| b.value.ca) {
        return Err(IdentityError::IsCa);
    }
    let cn = common_name(&cert)?;
    let eku = cert
        .extended_key_usage()
        .map_err(|e| malformed(&e))?
        .map(|e| e.value);
    let Some(eku) = eku else {
        return Err(IdentityError::NotCommandSigner);
    };
    let only_ours = has_command_signing_eku(eku)
        && eku.other.len() == 1
        && !(eku.any
            || eku.server_auth
            || eku.client_auth
            || eku.code_signing
            || eku.email_protection
            || eku.time_stamping
            || eku.ocsp_signing);
    if !only_ours {
        return Err(IdentityError::NotCommandSigner);
    }
    if cert
        .subject_alternative_name()
        .map_err(|e| malformed(&e))?
        .is_some()
    {
        return Err(IdentityError::CommandSignerWithSan);
    }
    crate::profile::validate_name(crate::profile::LeafKind::CommandSigner, &cn)
        .map_err(|e| IdentityError::Malformed(format!("common name: {e}")))?;
    Ok(cn)
}

/// The API role bound to a client certificate (URI SAN `urn:gridward:role:{role}`), if any.
///
/// Checks the certificate as [`identity_of`] does first, so a role is only ever returned for a
/// valid client identity. The role comes from the certificate the CA signed, never from a
/// request; which role names mean what is decided by the API, not here.
pub fn client_role_of(cert_der: &[u8]) -> Result<Option<String>, IdentityError> {
    let malformed = |e: &dyn fmt::Display| IdentityError::Malformed(e.to_string());
    let identity = identity_of(cert_der)?;
    if !matches!(identity, Identity::Client(_)) {
        return Ok(None);
    }
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| malformed(&e))?;
    let san = cert.subject_alternative_name().map_err(|e| malformed(&e))?;
    let role = san
        .into_iter()
        .flat_map(|s| s.value.general_names.iter())
        .find_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(ROLE_URI_PREFIX),
            _ => None,
        });
    match role {
        None => Ok(None),
        Some(role) if crate::profile::validate_role(role).is_ok() => Ok(Some(role.to_owned())),
        Some(role) => Err(IdentityError::InvalidRole(role.to_owned())),
    }
}

/// The single subject common name of `cert`.
fn common_name(cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
    let cns: Vec<_> = cert.subject().iter_common_name().collect();
    match cns.as_slice() {
        [] => Err(IdentityError::MissingCommonName),
        [one] => one
            .as_str()
            .map(str::to_owned)
            .map_err(|e| IdentityError::Malformed(format!("common name: {e}"))),
        many => Err(IdentityError::MultipleCommonNames(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType,
    };

    use super::*;

    fn cert(cn: &[&str], uris: &[&str], eku: &[ExtendedKeyUsagePurpose], ca: bool) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for c in cn {
            p.distinguished_name.push(DnType::CommonName, *c);
        }
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.extended_key_usages = eku.to_vec();
        p.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.self_signed(&key).unwrap().der().to_vec()
    }

    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};

    #[test]
    fn meter_identity() {
        let der = cert(
            &["MTR-1"],
            &["urn:gridward:meter:MTR-1"],
            &[ClientAuth],
            false,
        );
        assert_eq!(
            identity_of(&der),
            Ok(Identity::Meter(MeterId::new("MTR-1").unwrap()))
        );
    }

    #[test]
    fn concentrator_identity() {
        let der = cert(
            &["dc-1"],
            &["urn:gridward:concentrator:dc-1"],
            &[ClientAuth],
            false,
        );
        assert_eq!(
            identity_of(&der),
            Ok(Identity::Concentrator(MeterId::new("dc-1").unwrap()))
        );
        assert_eq!(client_role_of(&der), Ok(None));
        let refused = |cn: &str, uris: &[&str], eku: &[ExtendedKeyUsagePurpose]| {
            identity_of(&cert(&[cn], uris, eku, false))
        };
        assert_eq!(
            refused(
                "dc-1",
                &["urn:gridward:concentrator:dc-1", "urn:gridward:meter:dc-1"],
                &[ClientAuth]
            ),
            Err(IdentityError::MixedIdentityUris)
        );
        assert_eq!(
            refused(
                "dc-1",
                &["urn:gridward:meter:dc-1", "urn:gridward:concentrator:dc-1"],
                &[ClientAuth]
            ),
            Err(IdentityError::MixedIdentityUris)
        );
        assert_eq!(
            refused(
                "dc-1",
                &["urn:gridward:concentrator:dc-1", "urn:gridward:client:dc-1"],
                &[ClientAuth]
            ),
            Err(IdentityError::MixedIdentityUris)
        );
        assert_eq!(
            refused(
                "dc-1",
                &[
                    "urn:gridward:concentrator:dc-1",
                    "urn:gridward:concentrator:dc-2"
                ],
                &[ClientAuth]
            ),
            Err(IdentityError::MultipleConcentratorUris(2))
        );
        assert_eq!(
            refused("dc-2", &["urn:gridward:concentrator:dc-1"], &[ClientAuth]),
            Err(IdentityError::CommonNameMismatch {
                cn: "dc-2".into(),
                uri: "urn:gridward:concentrator:dc-1".into()
            })
        );
        assert_eq!(
            refused("dc-1", &["urn:gridward:concentrator:dc-1"], &[ServerAuth]),
            Err(IdentityError::WrongEku("clientAuth"))
        );
        assert_eq!(
            refused("dc-1", &["urn:gridward:concentrator:dc-1"], &[]),
            Err(IdentityError::MissingEku("clientAuth"))
        );
        assert_eq!(
            refused("a/b", &["urn:gridward:concentrator:a/b"], &[ClientAuth]),
            Err(IdentityError::InvalidMeterId(MeterIdError::InvalidChar(
                '/'
            )))
        );
        assert_eq!(
            refused(
                "dc-1",
                &["urn:gridward:concentrator:dc-1", "urn:gridward:role:admin"],
                &[ClientAuth]
            ),
            Err(IdentityError::RoleWithoutClient)
        );
        assert_eq!(
            identity_of(&cert(
                &["dc-1"],
                &["urn:gridward:concentrator:dc-1"],
                &[ClientAuth],
                true
            )),
            Err(IdentityError::IsCa)
        );
    }

    #[test]
    fn client_identity() {
        let der = cert(
            &["billing"],
            &["urn:gridward:client:billing"],
            &[ClientAuth],
            false,
        );
        assert_eq!(identity_of(&der), Ok(Identity::Client("billing".into())));
    }

    #[test]
    fn server_identity() {
        let der = cert(&["hes.example"], &[], &[ServerAuth], false);
        assert_eq!(
            identity_of(&der),
            Ok(Identity::Server("hes.example".into()))
        );
    }

    #[test]
    fn ca_is_refused() {
        let der = cert(
            &["MTR-1"],
            &["urn:gridward:meter:MTR-1"],
            &[ClientAuth],
            true,
        );
        assert_eq!(identity_of(&der), Err(IdentityError::IsCa));
    }

    #[test]
    fn cn_mismatch_is_refused() {
        let der = cert(
            &["MTR-2"],
            &["urn:gridward:meter:MTR-1"],
            &[ClientAuth],
            false,
        );
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::CommonNameMismatch {
                cn: "MTR-2".into(),
                uri: "urn:gridward:meter:MTR-1".into()
            })
        );
        let der = cert(
            &["x"],
            &["urn:gridward:client:billing"],
            &[ClientAuth],
            false,
        );
        assert!(matches!(
            identity_of(&der),
            Err(IdentityError::CommonNameMismatch { .. })
        ));
    }

    #[test]
    fn two_meter_uris_are_refused() {
        let der = cert(
            &["MTR-1"],
            &["urn:gridward:meter:MTR-1", "urn:gridward:meter:MTR-2"],
            &[ClientAuth],
            false,
        );
        assert_eq!(identity_of(&der), Err(IdentityError::MultipleMeterUris(2)));
        let der = cert(
            &["a"],
            &["urn:gridward:client:a", "urn:gridward:client:b"],
            &[ClientAuth],
            false,
        );
        assert_eq!(identity_of(&der), Err(IdentityError::MultipleClientUris(2)));
    }

    #[test]
    fn mixed_uris_are_refused() {
        let der = cert(
            &["MTR-1"],
            &["urn:gridward:meter:MTR-1", "urn:gridward:client:MTR-1"],
            &[ClientAuth],
            false,
        );
        assert_eq!(identity_of(&der), Err(IdentityError::MixedIdentityUris));
        let der = cert(
            &["MTR-1"],
            &[
                "urn:gridward:meter:MTR-1",
                "urn:gridward:meter:MTR-2",
                "urn:gridward:client:x",
            ],
            &[ClientAuth],
            false,
        );
        assert_eq!(identity_of(&der), Err(IdentityError::MixedIdentityUris));
    }

    #[test]
    fn eku_is_required() {
        let der = cert(&["MTR-1"], &["urn:gridward:meter:MTR-1"], &[], false);
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::MissingEku("clientAuth"))
        );
        let der = cert(
            &["MTR-1"],
            &["urn:gridward:meter:MTR-1"],
            &[ServerAuth],
            false,
        );
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::WrongEku("clientAuth"))
        );
        let der = cert(
            &["billing"],
            &["urn:gridward:client:billing"],
            &[ServerAuth],
            false,
        );
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::WrongEku("clientAuth"))
        );
    }

    #[test]
    fn invalid_meter_id_is_refused() {
        let der = cert(&["a/b"], &["urn:gridward:meter:a/b"], &[ClientAuth], false);
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::InvalidMeterId(MeterIdError::InvalidChar(
                '/'
            )))
        );
        let der = cert(&[""], &["urn:gridward:meter:"], &[ClientAuth], false);
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::InvalidMeterId(MeterIdError::Empty))
        );
    }

    #[test]
    fn common_name_rules() {
        let der = cert(&[], &["urn:gridward:meter:M"], &[ClientAuth], false);
        assert_eq!(identity_of(&der), Err(IdentityError::MissingCommonName));
        // Two CN attributes: rcgen keys its DN by type, so the second goes in under the raw OID.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "M");
        p.distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "N");
        p.subject_alt_names = vec![SanType::URI("urn:gridward:meter:M".try_into().unwrap())];
        p.extended_key_usages = vec![ClientAuth];
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::MultipleCommonNames(2))
        );
    }

    #[test]
    fn empty_client_name_is_refused() {
        let der = cert(&[""], &["urn:gridward:client:"], &[ClientAuth], false);
        assert_eq!(identity_of(&der), Err(IdentityError::EmptyClientName));
    }

    #[test]
    fn no_identity_and_unknown_uri() {
        let der = cert(&["x"], &[], &[ClientAuth], false);
        assert_eq!(identity_of(&der), Err(IdentityError::NoIdentity));
        let der = cert(&["x"], &["urn:gridward:operator:x"], &[ClientAuth], false);
        assert_eq!(
            identity_of(&der),
            Err(IdentityError::UnknownGridwardUri(
                "urn:gridward:operator:x".into()
            ))
        );
    }

    fn command_signing() -> ExtendedKeyUsagePurpose {
        // rcgen's Other takes u64 arcs, too small for the UUID arc; build the extension by hand.
        ExtendedKeyUsagePurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 99])
    }

    /// A certificate with the given EKU purposes plus (if `ours`) the command-signing OID, as a
    /// raw extension, and the given URIs.
    fn signer_cert(
        cn: &str,
        uris: &[&str],
        eku: &[ExtendedKeyUsagePurpose],
        ours: bool,
    ) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.is_ca = IsCa::ExplicitNoCa;
        // One EKU extension holding the listed purposes (DER written here) and ours.
        let mut oids: Vec<Vec<u8>> = eku
            .iter()
            .map(|e| match e {
                ClientAuth => vec![0x2b, 6, 1, 5, 5, 7, 3, 2],
                ServerAuth => vec![0x2b, 6, 1, 5, 5, 7, 3, 1],
                _ => vec![0x2b, 6, 1, 5, 5, 7, 3, 99],
            })
            .collect();
        if ours {
            oids.push(crate::profile::command_signing_eku_der());
        }
        if !oids.is_empty() {
            let mut seq = Vec::new();
            for o in oids {
                seq.push(0x06);
                seq.push(o.len() as u8);
                seq.extend(o);
            }
            let mut content = vec![0x30, seq.len() as u8];
            content.extend(seq);
            p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 37],
                content,
            )];
        }
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn command_signing_eku_is_never_a_tls_identity() {
        // Exactly what the CA issues.
        let der = signer_cert("hes", &[], &[], true);
        assert_eq!(identity_of(&der), Err(IdentityError::CommandSigner));
        assert_eq!(command_signer_name_of(&der), Ok("hes".into()));
        // Even dressed up as a server, a meter or a client.
        let der = signer_cert("hes", &[], &[ServerAuth], true);
        assert_eq!(identity_of(&der), Err(IdentityError::CommandSigner));
        let der = signer_cert("M1", &["urn:gridward:meter:M1"], &[ClientAuth], true);
        assert_eq!(identity_of(&der), Err(IdentityError::CommandSigner));
        let der = signer_cert("c", &["urn:gridward:client:c"], &[ClientAuth], true);
        assert_eq!(identity_of(&der), Err(IdentityError::CommandSigner));
        assert_eq!(client_role_of(&der), Err(IdentityError::CommandSigner));
    }

    #[test]
    fn command_signer_needs_exactly_the_command_signing_eku_and_no_san() {
        // No EKU, a TLS EKU only, an unrelated EKU: not command signers.
        for der in [
            signer_cert("hes", &[], &[], false),
            signer_cert("hes", &[], &[ServerAuth], false),
            signer_cert("hes", &[], &[command_signing()], false),
            // Ours plus another purpose: not exactly ours.
            signer_cert("hes", &[], &[ClientAuth], true),
            signer_cert("hes", &[], &[command_signing()], true),
        ] {
            assert_eq!(
                command_signer_name_of(&der),
                Err(IdentityError::NotCommandSigner)
            );
        }
        let der = signer_cert("hes", &["urn:gridward:client:hes"], &[], true);
        assert_eq!(
            command_signer_name_of(&der),
            Err(IdentityError::CommandSignerWithSan)
        );
        let der = signer_cert("a b", &[], &[], true);
        assert!(matches!(
            command_signer_name_of(&der),
            Err(IdentityError::Malformed(_))
        ));
        let der = cert(&["hes"], &[], &[], true);
        assert_eq!(command_signer_name_of(&der), Err(IdentityError::IsCa));
        assert!(matches!(
            command_signer_name_of(b"junk"),
            Err(IdentityError::Malformed(_))
        ));
        let mut der = signer_cert("hes", &[], &[], true);
        der.push(0);
        assert!(matches!(
            command_signer_name_of(&der),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            identity_of(b"not a cert"),
            Err(IdentityError::Malformed(_))
        ));
        let mut der = cert(&["hes"], &[], &[ServerAuth], false);
        der.push(0);
        assert!(matches!(
            identity_of(&der),
            Err(IdentityError::Malformed(_))
        ));
    }
}
