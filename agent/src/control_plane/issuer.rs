//! The control plane's issuer, for fleets without SPIRE: an intermediate CA (its key file
//! readable by the control plane's user only) signs short-lived X509-SVIDs for identities an
//! admin minted a join token for, and renews them for the node that holds them. Requests come
//! from nodes only (their node identity), so a token works only through an enrolled node,
//! and the key a certificate certifies stays on that host (the request is a CSR).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{CertificateDer, UnixTime},
    server::WebPkiClientVerifier,
};
use sha2::{Digest as _, Sha256};

use std::str::FromStr as _;

use crate::identity::{AgentId, peer_from_cert, provider};

/// Shortest and longest life of an issued certificate, and the default.
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
pub const DEFAULT_TTL: Duration = Duration::from_secs(3_600);

/// Longest a join token may live, and most uses it may have.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
pub const MAX_TOKEN_USES: u32 = 10_000;

/// Largest CSR or certificate chain a request may carry (PEM text).
pub const MAX_PEM: usize = 16 << 10;

/// Join tokens begin so, for secret scanners and for people reading logs.
const TOKEN_PREFIX: &str = "awjt_";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("issuer {what} {path}: {message}")]
    Config {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("the certificate signing request cannot be used: {0}")]
    Csr(String),
    #[error("the certificate to renew cannot be used: {0}")]
    Renewal(String),
    #[error("signing: {0}")]
    Sign(String),
}

/// `[issuer]` in the control plane's config.
#[derive(Clone, Debug, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The CA certificate (PEM) it signs with: an intermediate of the trust bundle nodes
    /// verify agents against.
    pub ca_cert: PathBuf,
    /// Its private key (PEM); refused when group or others may read the file.
    pub ca_key: PathBuf,
    /// The trust domain it issues identities in.
    pub trust_domain: String,
    /// Life of each certificate, in seconds (10 to 2,592,000; default 3,600). Nodes renew at
    /// half of it.
    #[serde(default)]
    pub svid_ttl_secs: Option<u64>,
}

pub struct Issuer {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate file's text: the CA, and any intermediates above it, sent after
    /// each certificate.
    chain_tail: String,
    /// Verifies a certificate to renew: ours, valid now, for client authentication.
    ours: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    trust_domain: String,
    ttl: Duration,
}

/// What was signed.
#[derive(Debug)]
pub struct Issued {
    /// The certificate, then the CA's (PEM).
    pub chain_pem: String,
    pub serial: String,
    pub not_after: SystemTime,
}

fn config_err(what: &'static str, path: &Path, message: impl ToString) -> IssuerError {
    IssuerError::Config {
        what,
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl Issuer {
    pub fn load(cfg: &IssuerConfig) -> Result<Self, IssuerError> {
        let ttl = cfg.svid_ttl_secs.map_or(DEFAULT_TTL, Duration::from_secs);
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(config_err(
                "svid_ttl_secs",
                Path::new(""),
                format!(
                    "{} s is outside {} to {} s",
                    ttl.as_secs(),
                    MIN_TTL.as_secs(),
                    MAX_TTL.as_secs()
                ),
            ));
        }
        AgentId::from_str(&format!("spiffe://{}/x", cfg.trust_domain))
            .map_err(|e| config_err("trust_domain", Path::new(&cfg.trust_domain), e))?;
        let cert_pem = std::fs::read_to_string(&cfg.ca_cert)
            .map_err(|e| config_err("ca_cert", &cfg.ca_cert, e))?;
        let key_pem = crate::files::read_secret_file(&cfg.ca_key)
            .map_err(|e| config_err("ca_key", &cfg.ca_key, e))?;
        let key =
            rcgen::KeyPair::from_pem(&key_pem).map_err(|e| config_err("ca_key", &cfg.ca_key, e))?;
        let ca_der = crate::pem::certs(&cfg.ca_cert)
            .map_err(|e| config_err("ca_cert", &cfg.ca_cert, e.message))?
            .remove(0);
        let ca = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| config_err("ca_cert", &cfg.ca_cert, e))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca_der.clone())
            .map_err(|e| config_err("ca_cert", &cfg.ca_cert, e))?;
        let ours = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| config_err("ca_cert", &cfg.ca_cert, e))?;
        // Sent to every launcher: only the certificates of the file, made again from what
        // was parsed, never whatever else it holds.
        if cert_pem.contains("PRIVATE KEY-----") {
            return Err(config_err(
                "ca_cert",
                &cfg.ca_cert,
                "holds a private key: keep the key in ca_key only",
            ));
        }
        let chain_tail = crate::pem::certs_to_pem(
            &crate::pem::certs(&cfg.ca_cert)
                .map_err(|e| config_err("ca_cert", &cfg.ca_cert, e.message))?,
        );
        let issuer = Self {
            ca,
            chain_tail,
            ours,
            trust_domain: cfg.trust_domain.clone(),
            ttl,
        };
        // The key must be the certificate's: a certificate it signs must verify.
        let probe = rcgen::KeyPair::generate().map_err(|e| IssuerError::Sign(e.to_string()))?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&probe))
            .and_then(|r| r.pem())
            .map_err(|e| IssuerError::Sign(e.to_string()))?;
        let id = AgentId::from_str(&format!("spiffe://{}/issuer-check", cfg.trust_domain))
            .map_err(|e| config_err("trust_domain", Path::new(&cfg.trust_domain), e))?;
        let test = issuer.sign(&csr, &id)?;
        issuer
            .verify_ours(&test.chain_pem)
            .map_err(|_| config_err("ca_key", &cfg.ca_key, "is not the key of ca_cert"))?;
        Ok(issuer)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether a CSR can be signed: PEM, within bounds, its own signature good.
    pub fn check_csr(&self, csr_pem: &str) -> Result<(), IssuerError> {
        if csr_pem.len() > MAX_PEM {
            return Err(IssuerError::Csr(format!("over {MAX_PEM} bytes")));
        }
        rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map(|_| ())
            .map_err(|e| IssuerError::Csr(e.to_string()))
    }

    /// Signs the CSR's public key as `id` for the issuer's TTL. The CSR's own signature must
    /// verify (its sender holds the key); everything else in it (names, extensions) is
    /// ignored: the certificate says only what the issuer decides.
    pub fn sign(&self, csr_pem: &str, id: &AgentId) -> Result<Issued, IssuerError> {
        if csr_pem.len() > MAX_PEM {
            return Err(IssuerError::Csr(format!("over {MAX_PEM} bytes")));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IssuerError::Csr(e.to_string()))?;
        let now = SystemTime::now();
        let not_after = now + self.ttl;
        let mut serial = super::random_bytes::<16>()
            .ok_or_else(|| IssuerError::Sign("the system's random source failed".into()))?;
        // Positive, no leading zero byte: written the same way by every encoder.
        serial[0] = (serial[0] & 0x7f) | 0x10;
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names =
            vec![rcgen::SanType::URI(id.to_string().try_into().map_err(
                |e: rcgen::Error| IssuerError::Sign(e.to_string()),
            )?)];
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
            rcgen::KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        // A little before now (a tenth of its life, at most 30 s): a verifier whose clock
        // runs behind still takes it, and half its life is still about half the TTL.
        p.not_before = (now - (self.ttl / 10).min(Duration::from_secs(30))).into();
        p.not_after = not_after.into();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.use_authority_key_identifier_extension = true;
        let signed = rcgen::CertificateSigningRequestParams {
            params: p,
            public_key: csr.public_key,
        }
        .signed_by(&self.ca)
        .map_err(|e| IssuerError::Sign(e.to_string()))?;
        Ok(Issued {
            chain_pem: format!("{}{}", signed.pem(), self.chain_tail),
            serial: hex::encode(serial),
            not_after: SystemTime::UNIX_EPOCH
                + Duration::from_secs(
                    not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs(),
                ),
        })
    }

    /// The identity and serial of a certificate (PEM, leaf first) this issuer signed that is
    /// valid now: what a renewal must show.
    pub fn verify_ours(&self, chain_pem: &str) -> Result<(AgentId, String), IssuerError> {
        if chain_pem.len() > MAX_PEM {
            return Err(IssuerError::Renewal(format!("over {MAX_PEM} bytes")));
        }
        let chain: Vec<CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| IssuerError::Renewal(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| IssuerError::Renewal("no CERTIFICATE block".into()))?;
        self.ours
            .verify_client_cert(leaf, &[], UnixTime::now())
            .map_err(|e| {
                IssuerError::Renewal(format!("not one this issuer signed and valid now: {e}"))
            })?;
        let peer = peer_from_cert(leaf).map_err(|e| IssuerError::Renewal(e.to_string()))?;
        Ok((peer.id, peer.serial.to_lowercase()))
    }
}

/// A new key and a CSR for it (PEM): what a launcher joins with and a node renews with.
pub fn new_csr() -> Result<(String, rustls_pki_types::PrivateKeyDer<'static>), IssuerError> {
    let sign = |e: rcgen::Error| IssuerError::Sign(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(sign)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(sign)?;
    let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| IssuerError::Sign(e.to_string()))?;
    Ok((csr, der))
}

/// A new join token: (the token, its SHA-256 as stored, its id as listed); None when the
/// system's random source fails.
pub fn mint_token() -> Option<(String, String, String)> {
    let token = format!(
        "{TOKEN_PREFIX}{}",
        hex::encode(super::random_bytes::<32>()?)
    );
    let id = hex::encode(super::random_bytes::<8>()?);
    Some((token.clone(), token_sha256(&token), id))
}

/// What a token is kept and looked up by.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let k = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&k).unwrap();
        let (c, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&key, k.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (c, key)
    }

    fn csr() -> String {
        let k = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec!["ignored.example".to_owned()]).unwrap();
        p.serialize_request(&k).unwrap().pem().unwrap()
    }

    #[test]
    fn it_signs_only_what_it_decides_and_knows_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ca(dir.path(), "issuer");
        let cfg = IssuerConfig {
            ca_cert: cert.clone(),
            ca_key: key.clone(),
            trust_domain: "example.org".into(),
            svid_ttl_secs: Some(60),
        };
        let issuer = Issuer::load(&cfg).unwrap();
        let id: AgentId = "spiffe://example.org/agent/a".parse().unwrap();
        // The CSR asks for a DNS name: not granted, only the identity is named.
        let issued = issuer.sign(&csr(), &id).unwrap();
        let (got, serial) = issuer.verify_ours(&issued.chain_pem).unwrap();
        assert_eq!(got, id);
        assert_eq!(serial, issued.serial);
        let leaf = crate::pem::certs_in(Path::new("x"), issued.chain_pem.as_bytes()).unwrap();
        assert_eq!(leaf.len(), 2, "the certificate, then the CA's");
        let (_, x) = x509_parser::parse_x509_certificate(leaf[0].as_ref()).unwrap();
        assert!(!x.is_ca());
        let sans = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1);
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(life, 66, "60 s, from 6 s before now");

        // Another CA's certificate, and junk, are not ours.
        let (other_cert, other_key) = ca(dir.path(), "other");
        let other = Issuer::load(&IssuerConfig {
            ca_cert: other_cert.clone(),
            ca_key: other_key,
            ..cfg.clone()
        })
        .unwrap();
        let theirs = other.sign(&csr(), &id).unwrap();
        assert!(issuer.verify_ours(&theirs.chain_pem).is_err());
        assert!(issuer.verify_ours("junk").is_err());
        assert!(
            issuer
                .sign("junk", &id)
                .unwrap_err()
                .to_string()
                .starts_with("the certificate signing request cannot be used")
        );

        // A key others may read, a key not the certificate's, a TTL out of bounds.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Issuer::load(&cfg).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Issuer::load(&IssuerConfig {
            ca_cert: other_cert,
            ..cfg.clone()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("is not the key of ca_cert"), "{e}");
        let e = Issuer::load(&IssuerConfig {
            svid_ttl_secs: Some(5),
            ..cfg.clone()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("5 s is outside 10 to 2592000 s"), "{e}");
        // A certificate file that also holds a key is refused (its text is sent to every
        // launcher).
        let combined = dir.path().join("combined.pem");
        std::fs::write(
            &combined,
            std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&key).unwrap(),
        )
        .unwrap();
        let e = Issuer::load(&IssuerConfig {
            ca_cert: combined,
            ..cfg.clone()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("holds a private key"), "{e}");
        let (t, h, id) = mint_token().unwrap();
        assert!(t.starts_with("awjt_") && t.len() == 69);
        assert_eq!(token_sha256(&t), h);
        assert_eq!(id.len(), 16);
    }
}
