//! The node's side of the local API: a TLS 1.3 handshake over the unix socket (the client
//! certificate, when there is one, is verified as an agent identity), one request line read
//! and parsed once, the root-only check made once, and the request handed to its owner.

use std::{os::fd::OwnedFd, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};
use tracing::warn;

use super::{
    Node,
    journal::{AuditEvent, IdentityEvent},
};
use crate::{
    api::{self, Request, Response},
    identity::{Rejection, VerifiedPeer},
};

/// A request line is at most this long.
const MAX_REQUEST: u64 = 64 * 1024;
/// The handshake and the request line each get this long.
const STEP: Duration = Duration::from_secs(10);

/// Who is asking: the verified certificate, the process (race-free), the uid.
struct Caller {
    peer: Result<VerifiedPeer, Rejection>,
    pidfd: std::io::Result<OwnedFd>,
    /// (uid, gid) from the socket.
    ids: Option<(u32, u32)>,
    /// Supplementary groups from the socket.
    groups: Vec<u32>,
}

pub(super) async fn handle(node: Arc<Node>, stream: UnixStream) {
    let pidfd = api::peer_pidfd(&stream);
    let ids = api::peer_ids(&stream).ok();
    let groups = api::peer_groups(&stream).unwrap_or_default();
    let tls_state = node.trust.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_state.config.clone());
    let tls = match tokio::time::timeout(STEP, acceptor.accept(stream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            warn!(error = %e, "API handshake failed");
            return;
        }
        Err(_) => {
            warn!("API handshake timed out");
            return;
        }
    };
    let caller = Caller {
        peer: tls_state.trust.verify(tls.get_ref().1.peer_certificates()),
        pidfd,
        ids,
        groups,
    };
    let (read, mut write) = tokio::io::split(tls);
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let request = match tokio::time::timeout(STEP, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line)
            .map_err(|e| Response::error(None, format!("bad request {:?}: {e}", line.trim()))),
        _ => Err(Response::error(None, "no request received")),
    };
    let reply = match &request {
        Err(refused) => refused.clone(),
        Ok(req) => match req.root_only() {
            Some(refusal) if caller.ids.map(|i| i.0) != Some(0) => Response::error(None, refusal),
            _ => node.clone().dispatch(req.clone(), caller).await,
        },
    };
    if !reply.ok {
        if let Some(op) = request.as_ref().ok().and_then(Request::binding_op) {
            node.counters.add(|c| c.session_rejections += 1);
            node.journal
                .record(&AuditEvent::Identity(IdentityEvent::Rejected {
                    op,
                    identity: reply.identity.clone(),
                    reason: reply.error.clone(),
                }));
        }
    }
    let mut out = serde_json::to_string(&reply).expect("responses serialize");
    out.push('\n');
    let _ = write.write_all(out.as_bytes()).await;
    let _ = write.shutdown().await;
}

fn rejection(r: &Rejection) -> Response {
    warn!(reason = %r, "launch rejected");
    Response::error(None, r.to_string())
}

fn no_process(e: &std::io::Error) -> Response {
    Response::error(None, format!("cannot identify the calling process: {e}"))
}

/// The files a launch or an enrollment asked to be renewed from, read once now: files the
/// node cannot follow refuse one that asked to follow them, and are not followed otherwise
/// (said in the warning).
async fn followed_files(
    follow: Option<crate::api::Follow>,
    by: super::follow::Launcher,
) -> Result<(Option<crate::api::Followed>, Option<String>), String> {
    let asked = follow.as_ref().is_some_and(|f| f.asked);
    let Some(f) = follow.map(|f| super::follow::followed(f, by)).transpose()? else {
        return Ok((None, None));
    };
    let checked =
        tokio::task::spawn_blocking(move || super::follow::check_readable(&f).map(|()| f))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
    match checked {
        Ok(f) => Ok((Some(f), None)),
        Err(why) if !asked => Ok((
            None,
            Some(format!(
                "not following the certificate files ({why}); renew by hand before it expires"
            )),
        )),
        Err(why) => Err(why),
    }
}

impl Node {
    async fn dispatch(self: Arc<Self>, req: Request, caller: Caller) -> Response {
        let check = matches!(req, Request::Check);
        match req {
            Request::Launch {
                follow,
                workload_api,
                issued,
                refuses_io_uring,
            } => match (caller.peer, caller.pidfd, caller.ids) {
                (Ok(peer), Ok(pidfd), Some((uid, gid))) => {
                    let ways = usize::from(follow.is_some())
                        + usize::from(workload_api.is_some())
                        + usize::from(issued.is_some());
                    if let Err(why) =
                        super::follow::workload_api_endpoint(workload_api.as_deref(), ways)
                            .and_then(|()| super::issuing::launched_with(issued.as_deref(), &peer))
                    {
                        return Response::error(Some(peer.id.to_string()), why);
                    }
                    let by = super::follow::Launcher {
                        uid,
                        gid,
                        groups: caller.groups,
                    };
                    match followed_files(follow, by).await {
                        Ok((follow, warning)) => Response {
                            warning,
                            ..self.launch(
                                peer,
                                pidfd,
                                follow,
                                workload_api,
                                issued,
                                refuses_io_uring,
                            )
                        },
                        Err(why) => Response::error(Some(peer.id.to_string()), why),
                    }
                }
                (Err(r), _, _) => rejection(&r),
                (_, Err(e), _) => no_process(&e),
                (_, _, None) => Response::error(None, "cannot identify the calling user"),
            },
            Request::Enroll { cgroup, follow } => match (caller.peer, caller.pidfd, caller.ids) {
                (Ok(peer), Ok(pidfd), Some((uid, gid))) => {
                    let by = super::follow::Launcher {
                        uid,
                        gid,
                        groups: caller.groups,
                    };
                    let (follow, warning) = match followed_files(follow, by).await {
                        Ok(f) => f,
                        Err(why) => return Response::error(Some(peer.id.to_string()), why),
                    };
                    // Off the runtime's workers: it freezes the unit and reads every descriptor
                    // its processes hold.
                    let node = self.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        node.enroll(peer, pidfd, &cgroup, follow)
                    })
                    .await
                    .unwrap_or_else(|e| Response::error(None, format!("enroll failed: {e}")));
                    Response { warning, ..r }
                }
                (Err(r), _, _) => rejection(&r),
                (_, Err(e), _) => no_process(&e),
                (_, _, None) => Response::error(None, "cannot identify the calling user"),
            },
            Request::Renew => match (caller.peer, caller.pidfd) {
                (Ok(peer), Ok(pidfd)) => self.renew(peer, pidfd),
                (Err(r), _) => rejection(&r),
                (_, Err(e)) => no_process(&e),
            },
            Request::Join { token, csr } => self.join(token, csr).await,
            Request::End { reason } => match (caller.peer, caller.pidfd) {
                (Ok(peer), Ok(pidfd)) => self.end(peer, pidfd, &reason),
                (Err(r), _) => rejection(&r),
                (_, Err(e)) => no_process(&e),
            },
            Request::Revoke { identity } => match self.revoke(&identity, None) {
                Ok(()) => Response {
                    ok: true,
                    identity: Some(identity),
                    ..Response::default()
                },
                Err(e) => Response::error(Some(identity), e.to_string()),
            },
            Request::Reload => {
                let node = self.clone();
                let _ = tokio::task::spawn_blocking(move || node.reload_policy(true)).await;
                let error = self.enforcer.last_error();
                Response {
                    ok: error.is_none(),
                    error,
                    revision: Some(self.enforcer.applied().revision().to_owned()),
                    ..Response::default()
                }
            }
            Request::Status | Request::Check => {
                let node = self.clone();
                let status = tokio::task::spawn_blocking(move || {
                    if check {
                        node.self_check();
                    }
                    node.status()
                })
                .await
                .unwrap_or_default();
                Response {
                    ok: true,
                    status: Some(Box::new(status)),
                    ..Response::default()
                }
            }
            Request::Flows { after, verdict } => Response {
                ok: true,
                flows: Some(self.records.since(after, verdict.as_deref())),
                ..Response::default()
            },
        }
    }
}
