//! Trust: the trust bundle, the CRLs and the TLS configuration built on them, replaced
//! together when a CRL file changes. A connection uses one pair from handshake to verdict.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use tracing::error;

use super::Snapshot;
use crate::{
    config::{ConfigError, NodeConfig},
    files::Stamp,
    identity::{CrlNumbers, CrlNumbersFile, CrlSet, IdentityError, TrustStore},
};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
}

/// A trust store and the TLS server configuration that verifies with it.
pub struct Tls {
    pub trust: TrustStore,
    pub config: Arc<rustls::ServerConfig>,
}

impl Tls {
    fn load(cfg: &NodeConfig, crls: &CrlSet) -> Result<Self, TrustError> {
        let trust = TrustStore::load(
            &cfg.anchors()?,
            crls,
            !cfg.accept_expired_crl.unwrap_or(false),
        )?;
        let config = crate::api::server_config(&trust)?;
        Ok(Self { trust, config })
    }
}

pub struct Trust {
    cfg: NodeConfig,
    current: Snapshot<Tls>,
    crls: Mutex<Stamp>,
    /// The CRL numbers in force: an older CRL put back is refused.
    numbers: Mutex<CrlNumbers>,
    /// The serials the CRLs in force list.
    serials: Mutex<BTreeSet<String>>,
    /// Where the numbers are kept across restarts (`state_dir/crl-numbers.json`).
    kept: CrlNumbersFile,
}

/// The trust bundles' CAs, one of which must sign every CRL.
fn cas(cfg: &NodeConfig) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TrustError> {
    let mut cas = Vec::new();
    for bundle in cfg.anchors()?.files() {
        cas.extend(crate::pem::anchors(bundle).map_err(|e| {
            TrustError::Identity(IdentityError::Bundle {
                path: bundle.to_owned(),
                message: e.message,
            })
        })?);
    }
    Ok(cas)
}

impl Trust {
    /// The trust bundle and CRLs in force at start. CRLs older than the ones in force when
    /// the node last ran (numbers kept in `state_dir`) refuse the start: a CRL put back
    /// while the node was down would bring back a revoked certificate.
    pub fn load(cfg: &NodeConfig) -> Result<Self, TrustError> {
        let kept = CrlNumbersFile(crate::config::crl_numbers(&cfg.state_dir()));
        let before = kept.load()?;
        let set = CrlSet::read(&cfg.crl, &cas(cfg)?, &before)?;
        let tls = Tls::load(cfg, &set)?;
        kept.keep(&before, &set.numbers);
        Ok(Self {
            current: Snapshot::new(tls),
            crls: Mutex::new(Stamp::of(&cfg.crl)),
            numbers: Mutex::new(set.numbers),
            serials: Mutex::new(set.serials),
            kept,
            cfg: cfg.clone(),
        })
    }

    /// What [`Trust::load`] reads, checked the same way and kept nowhere (`node
    /// --check-config`): (CA certificates, CRLs in force, serials they list).
    pub fn check(cfg: &NodeConfig) -> Result<(usize, usize, usize), TrustError> {
        let before = CrlNumbersFile(crate::config::crl_numbers(&cfg.state_dir())).load()?;
        let cas = cas(cfg)?;
        let set = CrlSet::read(&cfg.crl, &cas, &before)?;
        Tls::load(cfg, &set)?;
        Ok((cas.len(), set.ders.len(), set.serials.len()))
    }

    /// The pair a new connection uses.
    pub fn current(&self) -> Arc<Tls> {
        self.current.get()
    }

    /// The serials the CRLs in force list.
    pub fn revoked(&self) -> BTreeSet<String> {
        self.serials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads changed CRL files (once: what is checked is what is used): new handshakes
    /// use them. Returns the serials they revoke (running sessions with one of them must be
    /// cut off), or nothing when they did not change or were refused (the previous CRLs
    /// stay in force).
    pub fn reload_crls(&self) -> Option<BTreeSet<String>> {
        let stamp = Stamp::of(&self.cfg.crl);
        {
            let mut old = self.crls.lock().unwrap_or_else(|p| p.into_inner());
            if *old == stamp {
                return None;
            }
            *old = stamp;
        }
        let mut numbers = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = cas(&self.cfg).and_then(|cas| {
            let set = CrlSet::read(&self.cfg.crl, &cas, &numbers)?;
            let tls = Tls::load(&self.cfg, &set)?;
            Ok((set, tls))
        });
        match loaded {
            Ok((set, tls)) => {
                self.current.set(tls);
                self.kept.keep(&numbers, &set.numbers);
                *numbers = set.numbers;
                *self.serials.lock().unwrap_or_else(|p| p.into_inner()) = set.serials.clone();
                Some(set.serials)
            }
            Err(e) => {
                error!(error = %e, "CRL change rejected; the previous CRLs stay in force");
                None
            }
        }
    }
}
