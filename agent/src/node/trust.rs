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
    identity::{IdentityError, TrustStore},
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
    fn load(cfg: &NodeConfig) -> Result<Self, TrustError> {
        let trust = TrustStore::load(cfg.trust_bundle()?, &cfg.crl, cfg.trust_domain.as_deref())?;
        let config = crate::api::server_config(&trust)?;
        Ok(Self { trust, config })
    }
}

pub struct Trust {
    cfg: NodeConfig,
    current: Snapshot<Tls>,
    crls: Mutex<Stamp>,
    /// The CRL numbers in force: an older CRL put back is refused.
    numbers: Mutex<crate::identity::CrlNumbers>,
}

impl Trust {
    pub fn load(cfg: &NodeConfig) -> Result<Self, TrustError> {
        let tls = Tls::load(cfg)?;
        let numbers = crate::identity::crl_numbers_after(&cfg.crl, &Default::default())
            .map_err(TrustError::from)?;
        Ok(Self {
            current: Snapshot::new(tls),
            crls: Mutex::new(Stamp::of(&cfg.crl)),
            numbers: Mutex::new(numbers),
            cfg: cfg.clone(),
        })
    }

    /// The pair a new connection uses.
    pub fn current(&self) -> Arc<Tls> {
        self.current.get()
    }

    /// Re-reads changed CRL files: new handshakes use them. Returns the serials they revoke
    /// (running sessions with one of them must be cut off), or nothing when they did not
    /// change or were refused (the previous CRLs stay in force).
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
        let newer = match crate::identity::crl_numbers_after(&self.cfg.crl, &numbers) {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, "CRL change rejected; the previous CRLs stay in force");
                return None;
            }
        };
        match Tls::load(&self.cfg) {
            Ok(t) => self.current.set(t),
            Err(e) => {
                error!(error = %e, "CRL change rejected; the previous CRLs stay in force");
                return None;
            }
        }
        *numbers = newer;
        match crate::identity::revoked_serials(&self.cfg.crl) {
            Ok(s) => Some(s.into_iter().collect()),
            Err(e) => {
                error!(error = %e, "reading CRLs");
                None
            }
        }
    }
}
