//! Sessions whose certificates come from the control plane's issuer (`launch
//! --join-token`): a join token traded, through this node's own identity at the control
//! plane, for a launcher's certificate; and each such session renewed here at half its
//! certificate's life, with a key made for the renewal (the kernel binding is what the
//! certificate is for), until the session ends.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    Node,
    journal::{AuditEvent, IdentityEvent},
};
use crate::{
    api::Response,
    control_plane::{
        client::{Client, ClientError},
        server::issuing::{SvidReply, SvidRequest},
    },
    identity::{VerifiedPeer, peer_from_cert},
};

/// Longest join token and CSR a launcher may send.
const MAX_TOKEN: usize = 256;
const MAX_CSR: usize = 16 << 10;

/// A renewal the control plane refused or did not answer is tried again after this long.
const RETRY: Duration = Duration::from_secs(5);

/// Joins asked of the control plane at once: local callers cannot queue more.
const JOINS_AT_ONCE: usize = 4;

#[derive(Default)]
pub struct Issuing {
    client: OnceLock<Arc<Client>>,
    /// By cgroup id: renewing now (None), or not before then.
    pending: Mutex<HashMap<u64, Option<Instant>>>,
    joins: OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl Issuing {
    /// A client of the control plane, with the node's own identity.
    pub fn connect(
        &self,
        cfg: &crate::config::control_plane::ClientConfig,
    ) -> Result<(), ClientError> {
        let _ = self.client.set(Arc::new(Client::new(cfg)?));
        let _ = self
            .joins
            .set(Arc::new(tokio::sync::Semaphore::new(JOINS_AT_ONCE)));
        Ok(())
    }
}

/// A launch's issued chain, checked: its leaf is the certificate the launcher proved.
pub(super) fn launched_with(issued: Option<&str>, peer: &VerifiedPeer) -> Result<(), String> {
    let Some(chain) = issued else {
        return Ok(());
    };
    if chain.len() > crate::control_plane::issuer::MAX_PEM {
        return Err("the issued chain is too long".into());
    }
    let leaf = crate::pem::certs_in(std::path::Path::new("the issued chain"), chain.as_bytes())
        .map_err(|e| e.to_string())?
        .remove(0);
    let of = peer_from_cert(&leaf).map_err(|e| e.to_string())?;
    if of.serial != peer.serial {
        return Err("the issued chain is not the certificate this launch proved".into());
    }
    Ok(())
}

/// A new key and a CSR for it (PEM): (CSR, key).
fn csr() -> Result<(String, rustls_pki_types::PrivateKeyDer<'static>), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())?;
    let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| e.to_string())?;
    Ok((csr, der))
}

async fn ask(client: &Client, req: &SvidRequest) -> Result<SvidReply, ClientError> {
    client
        .send_json(
            hyper::Method::POST,
            "/v1/node/svid",
            req,
            Duration::from_secs(30),
        )
        .await
}

impl Node {
    /// A launcher's join token and CSR, traded at the control plane for its certificate.
    pub(super) async fn join(&self, token: String, csr: String) -> Response {
        let refuse = |why: String| {
            self.counters.add(|c| c.session_rejections += 1);
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::Rejected {
                    op: "join",
                    identity: None,
                    reason: Some(why.clone()),
                }));
            Response::error(None, why)
        };
        let (Some(client), Some(joins)) = (
            self.issuing.client.get().cloned(),
            self.issuing.joins.get().cloned(),
        ) else {
            return refuse("this node has no control plane to obtain a certificate from".into());
        };
        if token.is_empty() || token.len() > MAX_TOKEN || csr.len() > MAX_CSR {
            return refuse(format!(
                "a join token is 1 to {MAX_TOKEN} bytes and a CSR at most {MAX_CSR}"
            ));
        }
        let Ok(_turn) = joins.try_acquire() else {
            return refuse(format!(
                "{JOINS_AT_ONCE} joins are being asked of the control plane already; try again"
            ));
        };
        let req = SvidRequest {
            csr,
            token: Some(token),
            renew: None,
        };
        match ask(&client, &req).await {
            Ok(r) => {
                info!(identity = %r.identity, serial = %r.serial, "certificate obtained for a launch");
                Response {
                    ok: true,
                    identity: Some(r.identity),
                    chain: Some(r.chain),
                    ..Response::default()
                }
            }
            Err(e) => refuse(format!(
                "the control plane issued no certificate: {}",
                crate::text::printable(&e.to_string())
            )),
        }
    }

    /// Starts a renewal for each session of the issuer past half its certificate's life
    /// (one at a time each; a failed one is tried again later).
    pub(super) fn renew_from_issuer(self: &Arc<Self>) {
        let Some(client) = self.issuing.client.get().cloned() else {
            return;
        };
        let now = Instant::now();
        for (session, chain) in self.sessions.due_from_issuer() {
            {
                let mut pending = self
                    .issuing
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match pending.get(&session.cgroup_id) {
                    Some(None) => continue,
                    Some(Some(at)) if *at > now => continue,
                    _ => {}
                }
                pending.insert(session.cgroup_id, None);
            }
            let node = self.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let id = session.cgroup_id;
                let done = node.renew_one(&client, &session, chain).await;
                let mut pending = node
                    .issuing
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match done {
                    Ok(()) => {
                        pending.remove(&id);
                    }
                    Err(why) => {
                        warn!(identity = %session.identity, cgroup = %session.cgroup.display(),
                            reason = %why, "renewal from the issuer failed; trying again");
                        node.journal
                            .record(&AuditEvent::Identity(IdentityEvent::Rejected {
                                op: "renew",
                                identity: Some(session.identity.clone()),
                                reason: Some(why),
                            }));
                        pending.insert(id, Some(Instant::now() + RETRY));
                    }
                }
            });
        }
        // Sessions gone or no longer due are forgotten.
        let live: std::collections::HashSet<u64> = self
            .sessions
            .due_from_issuer()
            .iter()
            .map(|(s, _)| s.cgroup_id)
            .collect();
        self.issuing
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, at| at.is_none() || live.contains(id));
    }

    async fn renew_one(
        &self,
        client: &Client,
        session: &crate::api::Session,
        chain: String,
    ) -> Result<(), String> {
        let (csr, key) = csr()?;
        let reply = ask(
            client,
            &SvidRequest {
                csr,
                token: None,
                renew: Some(chain),
            },
        )
        .await
        .map_err(|e| crate::text::printable(&e.to_string()).into_owned())?;
        let certs = crate::pem::certs_in(
            std::path::Path::new("the issuer's certificate"),
            reply.chain.as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        // Checked as any renewal: the node's trust bundle, CRLs, the same identity.
        let peer = self
            .trust
            .current()
            .trust
            .verify_pair(certs, key)
            .map_err(|e| e.to_string())?;
        if peer.id.to_string() != session.identity {
            return Err(format!(
                "the issuer signed {} for a session of {}",
                peer.id, session.identity
            ));
        }
        self.sessions
            .renew_issued(&peer, session, reply.chain)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
