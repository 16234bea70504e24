//! PEM files: certificates, keys and CA bundles, read one way for the node, the launcher, the
//! control plane and its clients.

use std::path::{Path, PathBuf};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PemError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, message: impl Into<String>) -> PemError {
    PemError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Every CERTIFICATE block of a PEM file; at least one.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(path, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(path, "no CERTIFICATE blocks found"));
    }
    Ok(certs)
}

/// Every CERTIFICATE block of PEM text read from `path`; at least one.
pub fn certs_in(path: &Path, text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text)
        .collect::<Result<_, _>>()
        .map_err(|e| err(path, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(path, "no CERTIFICATE blocks found"));
    }
    Ok(certs)
}

/// The private key in PEM text read from `path`.
pub fn key_in(path: &Path, text: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(text).map_err(|e| err(path, e.to_string()))
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| err(path, e.to_string()))
}

/// A certificate chain and its key.
pub fn chain_and_key(
    cert: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    Ok((certs(cert)?, key(key_path)?))
}

/// The CA certificates of one or more bundles, as trust anchors.
pub fn roots<'a>(bundles: impl IntoIterator<Item = &'a Path>) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for path in bundles {
        for c in certs(path)? {
            roots
                .add(c)
                .map_err(|e| err(path, format!("not a usable CA certificate: {e}")))?;
        }
    }
    Ok(roots)
}
