//! # gridward-pki
//!
//! The Gridward certificate authority: a root CA, one issuing CA, and the leaf certificates of
//! meters, servers, clients and the head-end's command signer, kept in one PKI directory.
//!
//! ```text
//!   root CA (self-signed, CA:true pathlen 1)  ── root CRL (lists a revoked issuing CA)
//!      └── issuing CA (CA:true pathlen 0)     ── issuing CRL (lists revoked leaves)
//!             ├── meter  leaves: CN = id,   URI SAN urn:gridward:meter:{id},   EKU clientAuth
//!             ├── server leaves: CN = name, DNS/IP SANs,                        EKU serverAuth
//!             ├── client leaves: CN = name, URI SAN urn:gridward:client:{name}, EKU clientAuth
//!             ├── concentrator leaves: CN = id, URI SAN urn:gridward:concentrator:{id}, EKU clientAuth
//!             └── command signers: CN = name, no SAN, EKU COMMAND_SIGNING_EKU only (critical):
//!                                  signs commands to meters, never authenticates TLS
//! ```
//!
//! The profiles, with the command-signing OID, are in `docs/pki.md`.
//!
//! ## Modules
//!
//! - [`ca`]: [`Pki`], the CA over one directory: [`Pki::init`], [`Pki::open`], issuance
//!   ([`Pki::issue_meter`], [`Pki::issue_concentrator`], [`Pki::issue_server`],
//!   [`Pki::issue_client`], bulk [`Pki::issue_meters`] and [`Pki::issue_concentrators`]),
//!   [`Pki::issue_command_signer`], CSR signing ([`Pki::sign_csr`]), [`Pki::renew`], [`Pki::list`],
//!   [`Pki::log`].
//! - [`command_signer`]: the command-signer certificates meters pin ([`Pki::command_signers`]) and
//!   the one the head-end signs with ([`Pki::current_command_signer`],
//!   [`Pki::command_signer_key_path`]).
//! - [`crl`]: revocation ([`Pki::revoke`]) and CRL generation ([`Pki::write_crls`], [`Pki::write_crl`]).
//! - [`store`]: PKCS#12 export and import, and [`Pki::tls_material`] for the rustls builders.
//! - [`identity`]: [`identity_of`], the one function that maps a peer certificate to an [`Identity`]
//!   (it refuses command signers), and [`command_signer_name_of`].
//! - [`profile`]: leaf kinds ([`LeafKind`]), issuance options, the certificate profiles.
//! - [`meter_keys`]: [`Pki::meter_keys`], the keys of every meter's valid certificates, to verify
//!   envelopes a data concentrator relays.
//! - [`keys`]: key algorithms, key files, passphrase encryption of CA keys.
//! - [`csr`]: parsing and verifying certificate signing requests (OpenSSL and keytool).
//! - [`inventory`]: the record of every certificate ever issued, and its status.
//! - [`oplog`]: the append-only, hash-chained operation log.
//! - [`p12`]: PKCS#12 key stores and trust stores that Java keytool reads and writes.
//! - [`tls`]: rustls server and client configurations (the TLS policy of Gridward).
//! - [`error`]: the error type, [`PkiError`].
//!
//! ## The PKI directory
//!
//! ```text
//! DIR/ca/root.crt.pem      ca/root.key.pem      root CA certificate and key
//! DIR/ca/issuing.crt.pem   ca/issuing.key.pem   issuing CA certificate and key
//! DIR/ca/chain.pem                              issuing CA then root CA
//! DIR/crl/root.crl.pem     crl/issuing.crl.pem  a CRL per issuer: root's covers the issuing CA,
//!                                               issuing's covers the leaves
//! DIR/meters/{id}/cert.pem key.pem chain.pem    chain.pem: leaf then issuing CA
//! DIR/servers/{name}/...   DIR/clients/{name}/...   DIR/command-signers/{name}/...
//! DIR/concentrators/{id}/...
//! DIR/archive/{serial-hex}.crt.pem              superseded certificates
//! DIR/trusted/{alias}.crt.pem                   imported trust anchors (added to TLS roots)
//! DIR/inventory.json                            every certificate ever issued, with status;
//!                                               rewritten atomically (temp file, fsync, rename)
//! DIR/log.jsonl                                 append-only operation log, one JSON object per
//!                                               line, each carrying the SHA-256 of the line before
//! DIR/.lock                                     advisory lock held by every operation that writes
//! ```
//!
//! Private keys are PKCS#8 PEM files created with mode 0600.
//! CA keys may be encrypted with a passphrase (PKCS#8 `EncryptedPrivateKeyInfo`, PBES2 with
//! PBKDF2-HMAC-SHA256 and AES-256-CBC, readable by `openssl pkey -passin`); every signing
//! operation then needs the passphrase.
//!
//! ## Rules this crate keeps
//!
//! - Time is injected: every operation takes `now`; nothing here reads the clock.
//! - The only files touched are inside the PKI directory.
//! - A CSR contributes its public key and its common name, nothing else: requested extensions
//!   (CA:true, EKUs, SANs) are ignored and every certificate is built from its profile.

#![forbid(unsafe_code)]

pub mod ca;
pub mod command_signer;
pub mod crl;
pub mod csr;
pub mod error;
mod fsutil;
pub mod identity;
pub mod inventory;
pub mod keys;
pub mod meter_keys;
pub mod oplog;
pub mod p12;
pub mod profile;
pub mod store;
pub mod tls;

pub use ca::{InitOptions, IssuedCertificate, Pki, Renewal};
pub use command_signer::CommandSignerCert;
pub use crl::{CrlInfo, CrlIssuer, RevocationReason, RevokeTarget, Revoked};
pub use error::PkiError;
pub use identity::{
    CLIENT_URI_PREFIX, Identity, IdentityError, ROLE_URI_PREFIX, client_role_of,
    command_signer_name_of, identity_of,
};
pub use inventory::{CertKind, CertStatus, CertificateRecord, InventoryEntry, Origin};
pub use keys::{CaKeyAlg, LeafKeyAlg, StandaloneKeyPair};
pub use meter_keys::{MeterKey, MeterKeys};
pub use oplog::{ChainStatus, LogAction, LogEntry, LogRecord, LogReport};
pub use profile::{
    COMMAND_SIGNING_EKU, IssueOptions, LeafKind, MAX_ROLE_LEN, SanValue, command_signing_eku_der,
    validate_role,
};
pub use store::ImportReport;
