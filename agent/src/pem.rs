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

/// Certificates as PEM text (64 columns, as RFC 7468 writes them).
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The CA certificates of a trust bundle file: PEM, or a SPIFFE bundle (a JSON JWK set, as
/// `spire-server bundle show -format spiffe` writes it), read as the X509-SVID standard
/// (section 6.2) says: the first `x5c` certificate of each key whose `use` is `x509-svid`;
/// other keys (JWT-SVID ones) and keys without `x5c` are passed over.
pub fn anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let text = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return certs_in(path, &text);
    }
    #[derive(serde::Deserialize)]
    struct Bundle {
        keys: Vec<Jwk>,
    }
    #[derive(serde::Deserialize)]
    struct Jwk {
        #[serde(rename = "use", default)]
        usage: Option<String>,
        #[serde(default)]
        x5c: Vec<String>,
    }
    let bundle: Bundle = serde_json::from_slice(&text)
        .map_err(|e| err(path, format!("not a SPIFFE bundle: {e}")))?;
    let mut cas = Vec::new();
    for (i, key) in bundle.keys.iter().enumerate() {
        let (Some("x509-svid"), Some(first)) = (key.usage.as_deref(), key.x5c.first()) else {
            continue;
        };
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(first)
            .map_err(|e| err(path, format!("keys[{i}].x5c[0] is not base64: {e}")))?;
        cas.push(CertificateDer::from(der));
    }
    if cas.is_empty() {
        return Err(err(
            path,
            "the SPIFFE bundle has no x509-svid key with a certificate: its trust domain issues no X509-SVIDs",
        ));
    }
    Ok(cas)
}

/// The CA certificates of one or more bundles, as trust anchors.
pub fn roots<'a>(bundles: impl IntoIterator<Item = &'a Path>) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for path in bundles {
        for c in anchors(path)? {
            roots
                .add(c)
                .map_err(|e| err(path, format!("not a usable CA certificate: {e}")))?;
        }
    }
    Ok(roots)
}
