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

/// Joins asked of the control plane at once, and a second: local callers cannot queue more,
/// nor keep the control plane busy.
const JOINS_AT_ONCE: usize = 4;
const JOINS_A_SECOND: u32 = 10;

/// A renewal the control plane refused (a 4xx: not this node's, cancelled, revoked) is not
/// asked again for this long; the session runs to its deadline.
const REFUSED_PAUSE: Duration = Duration::from_secs(3_600);

#[derive(Default)]
pub struct Issuing {
    client: OnceLock<Arc<Client>>,
    /// By cgroup id: renewing now (None), or not before then.
    pending: Mutex<HashMap<u64, Option<Instant>>>,
    joins: OnceLock<Arc<tokio::sync::Semaphore>>,
    /// Joins this second: (the second's start, how many).
    rate: Mutex<Option<(Instant, u32)>>,
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
    if of.serial != peer.serial || of.id != peer.id || of.not_after != peer.not_after {
        return Err("the issued chain is not the certificate this launch proved".into());
    }
    Ok(())
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
        {
            let mut rate = self.issuing.rate.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (start, n) = rate.get_or_insert((now, 0));
            if now.duration_since(*start) >= Duration::from_secs(1) {
                (*start, *n) = (now, 0);
            }
            *n += 1;
            if *n > JOINS_A_SECOND {
                return refuse(format!(
                    "more than {JOINS_A_SECOND} joins a second; try again"
                ));
            }
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
        // A revoked identity's sessions are not renewed (the control plane would refuse).
        let revoked = self.registry.revoked();
        let due: Vec<_> = self
            .sessions
            .due_from_issuer()
            .into_iter()
            .filter(|(s, _)| !revoked.contains(&s.identity))
            .collect();
        // Sessions gone or no longer due are forgotten (renewals under way are kept).
        let live: std::collections::HashSet<u64> = due.iter().map(|(s, _)| s.cgroup_id).collect();
        self.issuing
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, at| at.is_none() || live.contains(id));
        for (session, chain) in due {
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
                    Err((why, refused)) => {
                        warn!(identity = %session.identity, cgroup = %session.cgroup.display(),
                            reason = %why, refused, "renewal from the issuer failed");
                        node.journal
                            .record(&AuditEvent::Identity(IdentityEvent::Rejected {
                                op: "renew",
                                identity: Some(session.identity.clone()),
                                reason: Some(why),
                            }));
                        let pause = if refused { REFUSED_PAUSE } else { RETRY };
                        pending.insert(id, Some(Instant::now() + pause));
                    }
                }
            });
        }
    }

    /// Err: why, and whether the control plane refused (not asked again for long).
    async fn renew_one(
        &self,
        client: &Client,
        session: &crate::api::Session,
        chain: String,
    ) -> Result<(), (String, bool)> {
        // The key is for the CSR only: the binding is what the certificate is for here, and
        // a renewal answered again (its first answer lost) certifies an earlier key.
        let (csr, _key) =
            crate::control_plane::issuer::new_csr().map_err(|e| (e.to_string(), false))?;
        let reply = ask(
            client,
            &SvidRequest {
                csr,
                token: None,
                renew: Some(chain),
            },
        )
        .await
        .map_err(|e| {
            let refused = matches!(&e, ClientError::Refused { status, .. }
                if status.is_client_error() && status.as_u16() != 429);
            (crate::text::printable(&e.to_string()).into_owned(), refused)
        })?;
        self.check_and_renew(session, reply).map_err(|e| (e, true))
    }

    fn check_and_renew(
        &self,
        session: &crate::api::Session,
        reply: SvidReply,
    ) -> Result<(), String> {
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
            .verify_chain(certs)
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
