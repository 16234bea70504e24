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

use crate::config::Anchors;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("trust bundle {path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("CRL {path}: {message}")]
    Crl { path: PathBuf, message: String },
    #[error("CRL numbers kept in {path}: {message}")]
    CrlNumbersFile { path: PathBuf, message: String },
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

/// Longest SPIFFE ID, in bytes (the SPIFFE ID standard, section 2.3).
pub const MAX_SPIFFE_ID: usize = 2048;
/// Longest trust domain name, in characters (the SPIFFE ID standard, section 2.1).
const MAX_TRUST_DOMAIN: usize = 255;

impl FromStr for AgentId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The SPIFFE standard's bounds: a name that long is an attack on whatever keeps it,
        // and is not echoed whole in the error either.
        if s.len() > MAX_SPIFFE_ID {
            return Err(IdentityError::BadSpiffe {
                id: format!("{}…", s.chars().take(64).collect::<String>()),
                why: "a SPIFFE ID is at most 2048 bytes",
            });
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        let bad = |why| IdentityError::BadSpiffe {
            id: s.to_owned(),
            why,
        };
        if domain.len() > MAX_TRUST_DOMAIN {
            return Err(bad("the trust domain is at most 255 characters"));
        }
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
    pub not_before: SystemTime,
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
    #[error("no trust bundle for trust domain {domain}: its identities are not accepted here")]
    NoBundle { domain: String },
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
            // Ours, from the choice of a trust domain's bundle.
            CertificateError::Other(o) if o.0.downcast_ref::<Rejection>().is_some() => {
                o.0.downcast_ref::<Rejection>()
                    .cloned()
                    .unwrap_or(Rejection::UnknownIssuer)
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

/// webpki's verifier per trust domain: a certificate is verified against the bundle of the
/// trust domain its SPIFFE ID names, and no other (bundles are never merged, so one domain's
/// CA cannot vouch for another's identities).
#[derive(Debug)]
struct PerDomainVerifier {
    domains: std::collections::BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    hints: Vec<DistinguishedName>,
}

impl PerDomainVerifier {
    fn refuse(r: Rejection) -> TlsError {
        TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(r))))
    }

    fn any(&self) -> &Arc<dyn ClientCertVerifier> {
        self.domains
            .values()
            .next()
            .expect("at least one trust domain")
    }
}

impl ClientCertVerifier for PerDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        // Read before it is verified, only to choose the bundle that then verifies it.
        let peer = peer_from_cert(end_entity).map_err(Self::refuse)?;
        let domain = peer.id.trust_domain();
        let verifier = self.domains.get(domain).ok_or_else(|| {
            Self::refuse(Rejection::NoBundle {
                domain: domain.to_owned(),
            })
        })?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.any().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.any().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.any().supported_verify_schemes()
    }
}

/// The control plane's client-certificate verifier: webpki against its CAs and CRLs, the
/// CRLs reread whenever one of their files changes ([`CrlWatchingVerifier::refresh`]).
/// Callers without a certificate pass the handshake (they present bearer tokens); a
/// certificate that fails, revoked included, fails it.
pub struct CrlWatchingVerifier {
    roots: Arc<rustls::RootCertStore>,
    /// The CAs, as certificates: a CRL must be signed by one.
    cas: Vec<CertificateDer<'static>>,
    crls: Vec<PathBuf>,
    /// A certificate checked against a CRL past its nextUpdate fails (no stale "not
    /// revoked"); off with `accept_expired_crl`.
    enforce_expiry: bool,
    /// The highest CRL number each issuer's CRLs have had: an older CRL put back (one that
    /// does not list a later revocation) is refused.
    numbers: Mutex<CrlNumbers>,
    /// Where `numbers` are kept across restarts (none: no CRLs are given, nothing to keep).
    kept: Option<CrlNumbersFile>,
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
        cas: Vec<CertificateDer<'static>>,
        crls: &[PathBuf],
        enforce_expiry: bool,
        kept: Option<CrlNumbersFile>,
    ) -> Result<Self, IdentityError> {
        let roots = Arc::new(roots);
        let seen = crls.iter().map(|p| file_state(p)).collect();
        // CRLs older than those in force before a restart refuse the start.
        let before = kept
            .as_ref()
            .map(CrlNumbersFile::load)
            .transpose()?
            .unwrap_or_default();
        let (current, numbers) = Self::build(&roots, &cas, crls, enforce_expiry, &before)?;
        if let Some(k) = &kept {
            k.keep(&before, &numbers);
        }
        let hints = current.root_hint_subjects().to_vec();
        Ok(Self {
            roots,
            cas,
            crls: crls.to_vec(),
            enforce_expiry,
            numbers: Mutex::new(numbers),
            kept,
            current: std::sync::RwLock::new(current),
            seen: Mutex::new(seen),
            hints,
        })
    }

    /// A verifier over the CRLs in `crls` (see [`CrlSet::read`]), and each issuer's newest
    /// CRL number.
    fn build(
        roots: &Arc<rustls::RootCertStore>,
        cas: &[CertificateDer<'static>],
        crls: &[PathBuf],
        enforce_expiry: bool,
        before: &CrlNumbers,
    ) -> Result<(Arc<dyn ClientCertVerifier>, CrlNumbers), IdentityError> {
        let set = CrlSet::read(crls, cas, before)?;
        let numbers = set.numbers;
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(set.ders)
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
        let (v, numbers) = Self::build(
            &self.roots,
            &self.cas,
            &self.crls,
            self.enforce_expiry,
            &before,
        )?;
        *self.current.write().expect("verifier") = v;
        *self.seen.lock().expect("crl state") = now;
        if let Some(k) = &self.kept {
            k.keep(&before, &numbers);
        }
        *self.numbers.lock().expect("crl numbers") = numbers;
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
    /// `enforce_expiry`: a certificate checked against a CRL past its nextUpdate fails.
    pub fn load(
        anchors: &Anchors,
        crls: &CrlSet,
        enforce_expiry: bool,
    ) -> Result<Self, IdentityError> {
        let webpki = |bundle: &Path| {
            let bundle_err = |message: String| IdentityError::Bundle {
                path: bundle.to_owned(),
                message,
            };
            let roots = crate::pem::roots([bundle]).map_err(|e| bundle_err(e.message))?;
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .with_crls(crls.ders.clone());
            if enforce_expiry {
                builder = builder.enforce_revocation_expiration();
            }
            builder.build().map_err(|e| bundle_err(e.to_string()))
        };
        let domain_ok = |td: &str| AgentId::from_str(&format!("spiffe://{td}/x")).map(|_| ());
        let (inner, trust_domain): (Arc<dyn ClientCertVerifier>, _) = match anchors {
            Anchors::Shared { bundle, domain } => {
                if let Some(td) = domain {
                    domain_ok(td)?;
                }
                (webpki(bundle)?, domain.clone())
            }
            Anchors::PerDomain(per) => {
                let mut domains = std::collections::BTreeMap::new();
                let mut hints = Vec::new();
                for (td, bundle) in per {
                    domain_ok(td)?;
                    let v = webpki(bundle)?;
                    hints.extend_from_slice(v.root_hint_subjects());
                    domains.insert(td.clone(), v);
                }
                if domains.is_empty() {
                    return Err(IdentityError::Bundle {
                        path: PathBuf::new(),
                        message: "no trust domain has a bundle".into(),
                    });
                }
                (Arc::new(PerDomainVerifier { domains, hints }), None)
            }
        };
        Ok(Self {
            verifier: Arc::new(DeferringVerifier {
                inner,
                outcomes: Mutex::new(HashMap::new()),
            }),
            trust_domain,
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
        self.identity_of(end_entity)
    }

    /// The verdict on a certificate chain and key read from files (a rotated pair), as a
    /// handshake would give it: the chain as webpki judges it (CRLs included), the key the
    /// certificate's, then the SPIFFE ID checks.
    pub fn verify_pair(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<VerifiedPeer, Rejection> {
        let peer = self.verify_chain(chain.clone())?;
        rustls::sign::CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| Rejection::Invalid(format!("the key is not the certificate's: {e}")))?;
        Ok(peer)
    }

    /// The verdict on a certificate chain alone (one the control plane's issuer signed for a
    /// session the node renews): the chain as webpki judges it, then the SPIFFE ID checks.
    pub fn verify_chain(
        &self,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<VerifiedPeer, Rejection> {
        let (end_entity, intermediates) = chain.split_first().ok_or(Rejection::NoCertificate)?;
        self.verifier
            .inner
            .verify_client_cert(
                end_entity,
                intermediates,
                rustls::pki_types::UnixTime::now(),
            )
            .map_err(|e| rejection_of(&e))?;
        self.identity_of(end_entity)
    }

    fn identity_of(&self, end_entity: &CertificateDer<'_>) -> Result<VerifiedPeer, Rejection> {
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
    let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Ok(VerifiedPeer {
        id,
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string().replace(':', ""),
    })
}

/// Each CRL issuer's (its raw name's) highest CRL number in force.
pub type CrlNumbers = HashMap<Vec<u8>, x509_parser::num_bigint::BigUint>;

/// Where each issuer's newest CRL number in force is kept across restarts: an older CRL put
/// back while the process was down is refused at its start as it would be while it runs.
pub struct CrlNumbersFile(pub PathBuf);

#[derive(serde::Serialize, serde::Deserialize)]
struct KeptNumber {
    /// The issuer's name (DER, hex): what CRLs are matched by.
    issuer: String,
    /// The same, readable.
    name: String,
    number: String,
}

impl CrlNumbersFile {
    /// The numbers kept; none when the file does not exist yet. A file that cannot be read
    /// is an error (the caller refuses to start rather than forget them).
    pub fn load(&self) -> Result<CrlNumbers, IdentityError> {
        let err = |message: String| IdentityError::CrlNumbersFile {
            path: self.0.clone(),
            message,
        };
        let text = match std::fs::read(&self.0) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CrlNumbers::new()),
            Err(e) => return Err(err(e.to_string())),
        };
        let kept: Vec<KeptNumber> = serde_json::from_slice(&text).map_err(|e| {
            err(format!(
                "{e} (remove the file to trust the CRLs on disk as they are)"
            ))
        })?;
        kept.into_iter()
            .map(|k| {
                let issuer = hex::decode(&k.issuer)
                    .map_err(|e| err(format!("issuer {:?}: {e}", k.issuer)))?;
                let n = k
                    .number
                    .parse::<x509_parser::num_bigint::BigUint>()
                    .map_err(|e| err(format!("number {:?} of {}: {e}", k.number, k.name)))?;
                Ok((issuer, n))
            })
            .collect()
    }

    /// Keeps `now` when it differs from `before`. The CRLs behind `now` are in force either
    /// way: a file that cannot be written (a full disk) only shortens what a restart
    /// remembers, so it is logged, not fatal, and written again at the next change.
    pub fn keep(&self, before: &CrlNumbers, now: &CrlNumbers) {
        if before != now
            && let Err(e) = self.save(now)
        {
            tracing::error!(error = %e, "the CRL numbers in force could not be kept; a restart checks CRLs against older ones");
        }
    }

    /// Keeps `numbers` (written whole, synced).
    pub fn save(&self, numbers: &CrlNumbers) -> Result<(), IdentityError> {
        let mut kept: Vec<KeptNumber> = numbers
            .iter()
            .map(|(issuer, n)| KeptNumber {
                issuer: hex::encode(issuer),
                name: issuer_name(issuer),
                number: n.to_string(),
            })
            .collect();
        kept.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        let text = serde_json::to_vec_pretty(&kept).expect("CRL numbers serialize");
        let fail = |e: std::io::Error| IdentityError::CrlNumbersFile {
            path: self.0.clone(),
            message: e.to_string(),
        };
        // Its directory may not be there yet: the control plane keeps the file beside its
        // database, whose directory the store makes only after the CRLs are read.
        if let Some(dir) = self.0.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        crate::files::write_atomic(&self.0, &text).map_err(fail)
    }
}

/// An issuer's raw (DER) name, readable.
fn issuer_name(der: &[u8]) -> String {
    <x509_parser::x509::X509Name as x509_parser::prelude::FromDer<_>>::from_der(der)
        .map_or_else(|_| "an issuer".to_owned(), |(_, n)| n.to_string())
}

/// CRLs as the trust store takes them, read once from their files.
#[derive(Default)]
pub struct CrlSet {
    /// The newest CRL of each issuer, and only it: webpki judges a certificate by the first
    /// CRL that covers it, so an older one put before a newer would win.
    pub ders: Vec<CertificateRevocationListDer<'static>>,
    /// Each issuer's newest CRL number (the ones in force before, merged).
    pub numbers: CrlNumbers,
    /// Hex serials the chosen CRLs list (as [`VerifiedPeer::serial`] writes them).
    pub serials: std::collections::BTreeSet<String>,
}

impl CrlSet {
    /// Reads the CRL files `paths`. Each CRL must be signed by one of `cas` (a forged CRL is
    /// refused, never believed for its number). Refused too when an issuer whose number is
    /// in `before` (the CRLs in force) has no numbered CRL any more, or only an older one:
    /// an older CRL put back would bring back a revoked certificate.
    pub fn read(
        paths: &[PathBuf],
        cas: &[CertificateDer<'_>],
        before: &CrlNumbers,
    ) -> Result<Self, IdentityError> {
        use x509_parser::num_bigint::BigUint;
        let cas: Vec<x509_parser::certificate::X509Certificate<'_>> = cas
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, c)| c)
            .collect();
        // Per issuer: (number, thisUpdate, the CRL, its serials).
        type Newest = (
            Option<BigUint>,
            i64,
            CertificateRevocationListDer<'static>,
            Vec<String>,
        );
        let mut newest: HashMap<Vec<u8>, Newest> = HashMap::new();
        for (path, ders) in read_crls(paths)? {
            for der in ders {
                let crl_err = |message: String| IdentityError::Crl {
                    path: path.clone(),
                    message,
                };
                let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
                    .map_err(|e| crl_err(format!("unparsable CRL: {e}")))?;
                let issuer = crl.issuer().as_raw().to_vec();
                let signed = cas.iter().any(|ca| {
                    ca.subject().as_raw() == issuer.as_slice()
                        && crl.verify_signature(ca.public_key()).is_ok()
                });
                if !signed {
                    return Err(crl_err(format!(
                        "the CRL of {} is not signed by a CA of the trust bundle",
                        crl.issuer()
                    )));
                }
                let entry = (
                    crl.crl_number().cloned(),
                    crl.last_update().timestamp(),
                    der.clone(),
                    crl.iter_revoked_certificates()
                        .map(|r| r.raw_serial_as_string().replace(':', ""))
                        .collect(),
                );
                match newest.get(&issuer) {
                    Some(have) if (&have.0, have.1) >= (&entry.0, entry.1) => {}
                    _ => {
                        newest.insert(issuer, entry);
                    }
                }
            }
        }
        let mut numbers = CrlNumbers::new();
        for (issuer, (n, ..)) in &newest {
            if let Some(n) = n {
                numbers.insert(issuer.clone(), n.clone());
            }
        }
        let first = || paths.first().cloned().unwrap_or_default();
        for (issuer, old) in before {
            // A CA taken out of the bundle signs nothing any more: its number is moot.
            if !cas
                .iter()
                .any(|ca| ca.subject().as_raw() == issuer.as_slice())
            {
                continue;
            }
            let name = issuer_name(issuer);
            let message = match numbers.get(issuer) {
                None => format!(
                    "no numbered CRL of {name} any more (number {old} is in force): a CRL is not dropped or replaced by an unnumbered one"
                ),
                Some(n) if n < old => format!(
                    "the newest CRL of {name} is number {n}, below {old} already in force: an older CRL put back is not taken"
                ),
                Some(_) => continue,
            };
            return Err(IdentityError::Crl {
                path: first(),
                message,
            });
        }
        let mut set = Self {
            numbers,
            ..Self::default()
        };
        for (_, _, der, serials) in newest.into_values() {
            set.ders.push(der);
            set.serials.extend(serials);
        }
        Ok(set)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crls_are_taken_only_signed_newest_first_and_never_older() {
        use rcgen::{
            CertificateParams, CertificateRevocationListParams, DnType, IsCa, KeyIdMethod, KeyPair,
            KeyUsagePurpose, SerialNumber,
        };
        let ca_params = || {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, "crl test CA");
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::KeyCertSign];
            p
        };
        let key = KeyPair::generate().unwrap();
        let ca_cert = ca_params().self_signed(&key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(ca_params(), key);
        // Same name, another key: what a forger without the CA's key can make.
        let forger = rcgen::Issuer::new(ca_params(), KeyPair::generate().unwrap());
        let other = {
            let mut p = ca_params();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, "another CA");
            let k = KeyPair::generate().unwrap();
            (
                p.self_signed(&k).unwrap().der().clone(),
                rcgen::Issuer::new(p, k),
            )
        };
        let cas = [ca_cert, other.0.clone()];
        let dir = tempfile::tempdir().unwrap();
        let pem = |by: &rcgen::Issuer<'_, KeyPair>, n: Option<u64>, revoked: &[u8]| {
            let now = time::OffsetDateTime::now_utc();
            CertificateRevocationListParams {
                this_update: now,
                next_update: now + time::Duration::hours(1),
                crl_number: SerialNumber::from(n.unwrap_or(0)),
                issuing_distribution_point: None,
                revoked_certs: revoked
                    .iter()
                    .map(|s| rcgen::RevokedCertParams {
                        serial_number: SerialNumber::from_slice(&[*s]),
                        revocation_time: now,
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(by)
            .unwrap()
            .pem()
            .unwrap()
        };
        let file = |name: &str, pems: &[String]| {
            let path = dir.path().join(name);
            std::fs::write(&path, pems.concat()).unwrap();
            vec![path]
        };
        let read = |paths: Vec<PathBuf>, before: &CrlNumbers| CrlSet::read(&paths, &cas, before);

        let five = read(file("5", &[pem(&issuer, Some(5), &[])]), &CrlNumbers::new()).unwrap();
        assert_eq!(
            five.numbers
                .values()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["5"]
        );
        read(file("5b", &[pem(&issuer, Some(5), &[])]), &five.numbers).unwrap();
        // An older CRL put before a newer one: only the newest is handed on.
        let both = read(
            file(
                "3+6",
                &[pem(&issuer, Some(3), &[]), pem(&issuer, Some(6), &[7])],
            ),
            &five.numbers,
        )
        .unwrap();
        assert_eq!(both.ders.len(), 1);
        assert_eq!(both.serials.iter().collect::<Vec<_>>(), ["07"]);
        let refused = |paths, what: &str| {
            let err = read(paths, &five.numbers).err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains(what)), "{err:?}");
        };
        refused(
            file("3", &[pem(&issuer, Some(3), &[])]),
            "is number 3, below 5 already in force: an older CRL put back is not taken",
        );
        refused(
            file("forged", &[pem(&forger, Some(1 << 60), &[])]),
            "is not signed by a CA of the trust bundle",
        );
        refused(
            file("other", &[pem(&other.1, Some(9), &[])]),
            "no numbered CRL of CN=crl test CA any more (number 5 is in force)",
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
        // The standard's bounds, at the edge.
        let longest = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID - 21));
        assert_eq!(longest.len(), MAX_SPIFFE_ID);
        assert!(longest.parse::<AgentId>().is_ok());
        let over = format!("{longest}b");
        let e = over.parse::<AgentId>().unwrap_err().to_string();
        assert!(e.contains("at most 2048 bytes"), "{e}");
        assert!(
            e.len() < 200,
            "the error echoes the whole ID: {} bytes",
            e.len()
        );
        let domain = format!("spiffe://{}/a", "d".repeat(256));
        let e = domain.parse::<AgentId>().unwrap_err().to_string();
        assert!(e.contains("at most 255"), "{e}");
        assert!(
            format!("spiffe://{}/a", "d".repeat(255))
                .parse::<AgentId>()
                .is_ok()
        );
    }

    #[test]
    fn each_trust_domains_bundle_vouches_for_its_own_identities_only() {
        use base64::Engine as _;
        use rcgen::{
            CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
            SanType,
        };
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let k = KeyPair::generate().unwrap();
            let cert = p.self_signed(&k).unwrap();
            (cert.der().clone(), cert.pem(), rcgen::Issuer::new(p, k))
        };
        let (a_der, _, a) = ca("a.example CA");
        let (b_der, b_text, b) = ca("b.example CA");
        let leaf = |id: &str, by: &rcgen::Issuer<'_, KeyPair>| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let k = KeyPair::generate().unwrap();
            let cert = p.signed_by(&k, by).unwrap().der().clone();
            let key = rustls::pki_types::PrivateKeyDer::try_from(k.serialize_der()).unwrap();
            (vec![cert], key)
        };
        let dir = tempfile::tempdir().unwrap();
        // a.example's bundle in the SPIFFE format (a JWT-SVID key and a key without x5c are
        // passed over), b.example's as PEM.
        let b64 = |d: &CertificateDer<'_>| base64::engine::general_purpose::STANDARD.encode(d);
        let a_json = dir.path().join("a.json");
        std::fs::write(
            &a_json,
            serde_json::json!({
                "spiffe_sequence": 7,
                "keys": [
                    {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"},
                    {"use": "x509-svid", "kty": "EC"},
                    {"use": "x509-svid", "kty": "EC", "x5c": [b64(&a_der), b64(&b_der)]},
                ]
            })
            .to_string(),
        )
        .unwrap();
        let b_pem = dir.path().join("b.pem");
        std::fs::write(&b_pem, b_text).unwrap();
        assert_eq!(crate::pem::anchors(&a_json).unwrap(), vec![a_der.clone()]);
        let per = Anchors::PerDomain(
            [
                ("a.example".to_owned(), a_json.clone()),
                ("b.example".to_owned(), b_pem.clone()),
            ]
            .into(),
        );
        let trust = TrustStore::load(&per, &CrlSet::default(), true).unwrap();
        let verify = |id: &str, by| {
            let (chain, key) = leaf(id, by);
            trust.verify_pair(chain, key).map(|p| p.id.to_string())
        };
        assert_eq!(
            verify("spiffe://a.example/agent/x", &a).unwrap(),
            "spiffe://a.example/agent/x"
        );
        assert_eq!(
            verify("spiffe://b.example/agent/y", &b).unwrap(),
            "spiffe://b.example/agent/y"
        );
        // a.example's CA is not b.example's, though the node trusts both.
        assert_eq!(
            verify("spiffe://b.example/agent/z", &a).unwrap_err(),
            Rejection::UnknownIssuer
        );
        assert_eq!(
            verify("spiffe://c.example/agent/w", &a)
                .unwrap_err()
                .to_string(),
            "no trust bundle for trust domain c.example: its identities are not accepted here"
        );

        for (text, says) in [
            (
                "{\"keys\": [{\"use\": \"jwt-svid\"}]}",
                "no x509-svid key with a certificate",
            ),
            (
                "{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"%%\"]}]}",
                "keys[0].x5c[0] is not base64",
            ),
            (
                "{\"keys\": [}",
                "not a SPIFFE bundle: expected value at line 1 column 11",
            ),
        ] {
            let f = dir.path().join("bad.json");
            std::fs::write(&f, text).unwrap();
            let e = crate::pem::anchors(&f).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("bad.json"), "{text}: {e}");
        }
    }
}
