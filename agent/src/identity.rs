//! Agent identity: SPIFFE IDs from X.509 certificates.
//!
//! rustls/webpki validate the chain (trust bundle, validity, clientAuth EKU, CRLs). Our own
//! checks wrap that verifier and never replace it: [`DeferringVerifier`] lets the handshake
//! finish when webpki rejects a certificate only so the node can tell the launcher *why*,
//! and every such connection is refused before anything else happens. Proof of possession
//! (the handshake signature) is never deferred.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("trust bundle {path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("CRL {path}: {message}")]
    Crl { path: PathBuf, message: String },
    #[error("{0:?} is not a SPIFFE ID (spiffe://trust-domain/path)")]
    NotSpiffe(String),
    #[error("{id:?}: {why}")]
    BadSpiffe { id: String, why: &'static str },
}

/// A verified agent identity: the SPIFFE ID from a certificate's URI SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId {
    trust_domain: String,
    path: String,
}

impl AgentId {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl FromStr for AgentId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        let bad = |why| IdentityError::BadSpiffe {
            id: s.to_owned(),
            why,
        };
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(bad(
                "the trust domain must be lowercase letters, digits, '-', '.', '_'",
            ));
        }
        if path.is_empty()
            || path
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(bad(
                "the path must be one or more non-empty segments (spiffe://domain/agent/name)",
            ));
        }
        if !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b))
        {
            return Err(bad("the path may hold only letters, digits, '-', '.', '_'"));
        }
        Ok(Self {
            trust_domain: domain.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

/// What the node learned from a verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPeer {
    pub id: AgentId,
    pub not_after: SystemTime,
    /// Hex serial number of the certificate.
    pub serial: String,
}

/// Why a presented certificate was refused, in words for the launcher and the audit log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("certificate is not signed by a trusted CA (unknown issuer)")]
    UnknownIssuer,
    #[error("certificate is revoked")]
    Revoked,
    #[error("certificate is not valid for client authentication (EKU clientAuth missing)")]
    NotClientAuth,
    #[error("certificate rejected: {0}")]
    Invalid(String),
    #[error("certificate has no SPIFFE ID (expected one URI SAN spiffe://...)")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; exactly one SPIFFE ID is allowed")]
    SeveralUris(usize),
    #[error("malformed SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("identity {id} is outside the trust domain {expected}")]
    WrongTrustDomain { id: String, expected: String },
}

fn rejection_of(e: &TlsError) -> Rejection {
    match e {
        TlsError::NoCertificatesPresented => Rejection::NoCertificate,
        TlsError::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                Rejection::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Rejection::NotYetValid
            }
            CertificateError::UnknownIssuer => Rejection::UnknownIssuer,
            CertificateError::Revoked => Rejection::Revoked,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Rejection::NotClientAuth
            }
            other => Rejection::Invalid(format!("{other:?}")),
        },
        other => Rejection::Invalid(other.to_string()),
    }
}

fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Wraps webpki's client verifier. A certificate webpki rejects still completes the handshake
/// (the key must still sign it), and the rejection is kept for the connection to report;
/// [`TrustStore::verify`] refuses such a peer before anything else.
#[derive(Debug)]
pub struct DeferringVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    outcomes: Mutex<HashMap<[u8; 32], Result<(), TlsError>>>,
}

impl ClientCertVerifier for DeferringVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Root may call status without a certificate; launch refuses a peer without one.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let outcome = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ());
        let mut map = self.outcomes.lock().expect("verifier lock");
        // Bounded: entries are taken by the connection that made them.
        if map.len() > 4096 {
            map.clear();
        }
        map.insert(fingerprint(end_entity), outcome);
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The control plane's client-certificate verifier: webpki against its CAs and CRLs, the
/// CRLs reread whenever one of their files changes ([`CrlWatchingVerifier::refresh`]).
/// Callers without a certificate pass the handshake (they present bearer tokens); a
/// certificate that fails, revoked included, fails it.
pub struct CrlWatchingVerifier {
    roots: Arc<rustls::RootCertStore>,
    crls: Vec<PathBuf>,
    /// A certificate checked against a CRL past its nextUpdate fails (no stale "not
    /// revoked"); off with `accept_expired_crl`.
    enforce_expiry: bool,
    /// The highest CRL number each issuer's CRLs have had: an older CRL put back (one that
    /// does not list a later revocation) is refused.
    numbers: Mutex<CrlNumbers>,
    current: std::sync::RwLock<Arc<dyn ClientCertVerifier>>,
    /// What each CRL file was when last read: (modified, length, inode).
    seen: Mutex<Vec<Option<(SystemTime, u64, u64)>>>,
    hints: Vec<DistinguishedName>,
}

impl fmt::Debug for CrlWatchingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrlWatchingVerifier")
            .field("crls", &self.crls)
            .finish_non_exhaustive()
    }
}

fn file_state(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl CrlWatchingVerifier {
    pub fn new(
        roots: rustls::RootCertStore,
        crls: &[PathBuf],
        enforce_expiry: bool,
    ) -> Result<Self, IdentityError> {
        let roots = Arc::new(roots);
        let seen = crls.iter().map(|p| file_state(p)).collect();
        let (current, numbers) = Self::build(&roots, crls, enforce_expiry, &HashMap::new())?;
        let hints = current.root_hint_subjects().to_vec();
        Ok(Self {
            roots,
            crls: crls.to_vec(),
            enforce_expiry,
            numbers: Mutex::new(numbers),
            current: std::sync::RwLock::new(current),
            seen: Mutex::new(seen),
            hints,
        })
    }

    /// A verifier over the CRLs in `crls`, and each issuer's highest CRL number among them;
    /// refused when an issuer's number is below `before`'s.
    fn build(
        roots: &Arc<rustls::RootCertStore>,
        crls: &[PathBuf],
        enforce_expiry: bool,
        before: &CrlNumbers,
    ) -> Result<(Arc<dyn ClientCertVerifier>, CrlNumbers), IdentityError> {
        let numbers = crl_numbers_after(crls, before)?;
        let read = read_crls(crls)?;
        let ders: Vec<_> = read.into_iter().flat_map(|(_, ders)| ders).collect();
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(ders)
            .allow_unauthenticated();
        if enforce_expiry {
            builder = builder.enforce_revocation_expiration();
        }
        let v = builder.build().map_err(|e| IdentityError::Crl {
            path: crls.first().cloned().unwrap_or_default(),
            message: e.to_string(),
        })?;
        Ok((v, numbers))
    }

    /// Rereads the CRLs when a file changed: `Ok(true)` when new ones are in force. A file
    /// that cannot be read or parsed leaves the last good CRLs in force (the error says
    /// why), and is tried again at the next call.
    pub fn refresh(&self) -> Result<bool, IdentityError> {
        let now: Vec<_> = self.crls.iter().map(|p| file_state(p)).collect();
        if *self.seen.lock().expect("crl state") == now {
            return Ok(false);
        }
        let before = self.numbers.lock().expect("crl numbers").clone();
        let (v, numbers) = Self::build(&self.roots, &self.crls, self.enforce_expiry, &before)?;
        *self.current.write().expect("verifier") = v;
        *self.numbers.lock().expect("crl numbers") = numbers;
        *self.seen.lock().expect("crl state") = now;
        Ok(true)
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().expect("verifier").clone()
    }
}

impl ClientCertVerifier for CrlWatchingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// The trust configuration of a node: CA bundle, CRLs, optional trust domain.
#[derive(Debug)]
pub struct TrustStore {
    verifier: Arc<DeferringVerifier>,
    trust_domain: Option<String>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TrustStore {
    pub fn load(
        bundle: &Path,
        crls: &[PathBuf],
        trust_domain: Option<&str>,
    ) -> Result<Self, IdentityError> {
        let bundle_err = |message: String| IdentityError::Bundle {
            path: bundle.to_owned(),
            message,
        };
        let roots = crate::pem::roots([bundle]).map_err(|e| bundle_err(e.message))?;
        let crl_ders: Vec<_> = read_crls(crls)?
            .into_iter()
            .flat_map(|(_, ders)| ders)
            .collect();
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crl_ders)
            .build()
            .map_err(|e| bundle_err(e.to_string()))?;
        if let Some(td) = trust_domain {
            AgentId::from_str(&format!("spiffe://{td}/x"))?;
        }
        Ok(Self {
            verifier: Arc::new(DeferringVerifier {
                inner,
                outcomes: Mutex::new(HashMap::new()),
            }),
            trust_domain: trust_domain.map(str::to_owned),
        })
    }

    pub fn client_verifier(&self) -> Arc<DeferringVerifier> {
        self.verifier.clone()
    }

    /// The verdict on a peer after the handshake: webpki's, then the SPIFFE ID checks.
    pub fn verify(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<VerifiedPeer, Rejection> {
        let end_entity = chain
            .and_then(<[_]>::first)
            .ok_or(Rejection::NoCertificate)?;
        let outcome = self
            .verifier
            .outcomes
            .lock()
            .expect("verifier lock")
            .remove(&fingerprint(end_entity))
            .ok_or_else(|| Rejection::Invalid("certificate was not verified".into()))?;
        outcome.map_err(|e| rejection_of(&e))?;
        let peer = peer_from_cert(end_entity)?;
        if let Some(td) = &self.trust_domain {
            if peer.id.trust_domain() != td {
                return Err(Rejection::WrongTrustDomain {
                    id: peer.id.to_string(),
                    expected: td.clone(),
                });
            }
        }
        Ok(peer)
    }
}

/// The SPIFFE ID, expiry and serial of a certificate webpki has already accepted.
pub fn peer_from_cert(der: &CertificateDer<'_>) -> Result<VerifiedPeer, Rejection> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| Rejection::Invalid(format!("unparsable certificate: {e}")))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(Rejection::NoSpiffeId),
        [one] => *one,
        more => return Err(Rejection::SeveralUris(more.len())),
    };
    if !uri.starts_with("spiffe://") {
        return Err(Rejection::NoSpiffeId);
    }
    let id = AgentId::from_str(uri).map_err(|e| Rejection::BadSpiffeId(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Ok(VerifiedPeer {
        id,
        not_after,
        serial: cert.raw_serial_as_string().replace(':', ""),
    })
}

/// Each CRL issuer's (its raw name's) highest CRL number.
pub type CrlNumbers = HashMap<Vec<u8>, x509_parser::num_bigint::BigUint>;

/// Each issuer's highest CRL number in the files `crls`; refused when an issuer's is below
/// its number in `before` (the CRLs in force): an older CRL put back, which would bring
/// back a revoked certificate, is not taken.
pub fn crl_numbers_after(
    crls: &[PathBuf],
    before: &CrlNumbers,
) -> Result<CrlNumbers, IdentityError> {
    let mut numbers = CrlNumbers::new();
    for (path, ders) in read_crls(crls)? {
        for der in &ders {
            let (_, crl) =
                x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| IdentityError::Crl {
                    path: path.clone(),
                    message: format!("unparsable CRL: {e}"),
                })?;
            let Some(n) = crl.crl_number() else { continue };
            let e = numbers
                .entry(crl.issuer().as_raw().to_vec())
                .or_insert_with(|| n.clone());
            if n > e {
                *e = n.clone();
            }
        }
    }
    for (issuer, old) in before {
        if let Some(n) = numbers.get(issuer).filter(|n| *n < old) {
            let name =
                <x509_parser::x509::X509Name as x509_parser::prelude::FromDer<_>>::from_der(issuer)
                    .map_or_else(|_| "an issuer".to_owned(), |(_, n)| n.to_string());
            return Err(IdentityError::Crl {
                path: crls.first().cloned().unwrap_or_default(),
                message: format!(
                    "the newest CRL of {name} is number {n}, below {old} already in force: an older CRL put back is not taken"
                ),
            });
        }
    }
    Ok(numbers)
}

/// Every CRL in each PEM file; a file with none is an error.
fn read_crls(
    crls: &[PathBuf],
) -> Result<Vec<(&PathBuf, Vec<CertificateRevocationListDer<'static>>)>, IdentityError> {
    crls.iter()
        .map(|path| {
            let crl_err = |message: String| IdentityError::Crl {
                path: path.clone(),
                message,
            };
            let list: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_file_iter(path)
                    .map_err(|e| crl_err(e.to_string()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| crl_err(e.to_string()))?;
            if list.is_empty() {
                return Err(crl_err("no X509 CRL blocks found".into()));
            }
            Ok((path, list))
        })
        .collect()
}

/// Hex serial numbers (as [`VerifiedPeer::serial`] writes them) listed in PEM CRL files.
pub fn revoked_serials(
    crls: &[PathBuf],
) -> Result<std::collections::HashSet<String>, IdentityError> {
    let mut out = std::collections::HashSet::new();
    for (path, ders) in read_crls(crls)? {
        for der in &ders {
            let (_, crl) =
                x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| IdentityError::Crl {
                    path: path.clone(),
                    message: format!("unparsable CRL: {e}"),
                })?;
            out.extend(
                crl.iter_revoked_certificates()
                    .map(|r| r.raw_serial_as_string().replace(':', "")),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_crl_put_back_is_refused() {
        use rcgen::{
            CertificateParams, CertificateRevocationListParams, IsCa, KeyIdMethod, KeyPair,
            KeyUsagePurpose, SerialNumber,
        };
        let key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::KeyCertSign];
        let issuer = rcgen::Issuer::new(ca, key);
        let dir = tempfile::tempdir().unwrap();
        let crl = |n: u64| {
            let now = time::OffsetDateTime::now_utc();
            let pem = CertificateRevocationListParams {
                this_update: now,
                next_update: now + time::Duration::hours(1),
                crl_number: SerialNumber::from(n),
                issuing_distribution_point: None,
                revoked_certs: vec![],
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&issuer)
            .unwrap()
            .pem()
            .unwrap();
            let path = dir.path().join(format!("{n}.crl"));
            std::fs::write(&path, pem).unwrap();
            vec![path]
        };
        let five = crl_numbers_after(&crl(5), &CrlNumbers::new()).unwrap();
        assert_eq!(
            five.values().map(ToString::to_string).collect::<Vec<_>>(),
            ["5"]
        );
        crl_numbers_after(&crl(6), &five).unwrap();
        crl_numbers_after(&crl(5), &five).unwrap();
        let err = crl_numbers_after(&crl(3), &five).unwrap_err().to_string();
        assert!(
            err.contains(
                "is number 3, below 5 already in force: an older CRL put back is not taken"
            ),
            "{err}"
        );
    }

    #[test]
    fn spiffe_ids_parse_strictly() {
        let id: AgentId = "spiffe://example.org/agent/support".parse().unwrap();
        assert_eq!(
            (id.trust_domain(), id.path()),
            ("example.org", "agent/support")
        );
        assert_eq!(id.to_string(), "spiffe://example.org/agent/support");
        for bad in [
            "https://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe:///a",
            "spiffe://example.org/a?b",
        ] {
            assert!(bad.parse::<AgentId>().is_err(), "{bad}");
        }
    }
}
