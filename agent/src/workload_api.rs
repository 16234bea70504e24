//! The SPIFFE Workload API as a session's source of certificates (`launch --workload-api`).
//!
//! The launcher fetches the workload's X509-SVID, launches with it, and leaves a keeper in the
//! session: a small process that holds the API's stream open (the API attests whoever
//! connects, so it must be a process of the workload, not the node) and, at each rotation,
//! renews the session through the node's socket with the new SVID, or ends the session when
//! the API says the workload has no SVID any more. The node checks every SVID like any other
//! certificate, against its own trust bundles: what the API says about bundles is not used.
//!
//! Failing closed: a keeper that dies, or an API that stays unreachable, renews nothing, and
//! the kernel cuts the session at its certificate's deadline.

use std::{
    future::Future,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::StreamExt as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};

use crate::api::{self, Credentials, Request};

/// Where the SPIFFE standard says a workload finds its Workload API.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The first SVID must come within this long: a launch does not hang on a dead API.
pub const FIRST_FETCH: Duration = Duration::from_secs(15);

/// Reconnection backoff after the API fails or ends the stream (Unavailable, a restart).
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How often a renewal or an end the node could not be asked for is asked again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("no Workload API endpoint: give --workload-api SOCKET or set {ENDPOINT_ENV}")]
    NoEndpoint,
    #[error("Workload API endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("Workload API at {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("Workload API at {endpoint} issues this workload no SVID: {message}")]
    Gone { endpoint: String, message: String },
    #[error("Workload API at {endpoint}: no SVID with hint {hint:?} (the hints it gave: {given})")]
    NoHint {
        endpoint: String,
        hint: String,
        given: String,
    },
    #[error("Workload API at {endpoint}: no SVID within {} s", FIRST_FETCH.as_secs())]
    Timeout { endpoint: String },
}

impl WorkloadError {
    /// The API says this workload has no (such) SVID: the session it renews must end.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone { .. } | Self::NoHint { .. })
    }
}

/// The endpoint as the Workload API client takes it: `unix:/path` or `tcp://ip:port` as
/// given, a bare path as a unix socket, nothing given: `SPIFFE_ENDPOINT_SOCKET`.
pub fn endpoint(given: Option<&str>) -> Result<String, WorkloadError> {
    let raw = match given.filter(|g| !g.is_empty()) {
        Some(g) => g.to_owned(),
        None => std::env::var(ENDPOINT_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or(WorkloadError::NoEndpoint)?,
    };
    let e = if raw.starts_with("unix:") || raw.starts_with("tcp:") {
        raw
    } else {
        let abs = std::path::absolute(Path::new(&raw)).map_err(|e| WorkloadError::Endpoint {
            endpoint: raw.clone(),
            message: e.to_string(),
        })?;
        format!("unix://{}", abs.display())
    };
    spiffe::transport::Endpoint::parse(&e).map_err(|err| WorkloadError::Endpoint {
        endpoint: e.clone(),
        message: err.to_string(),
    })?;
    Ok(e)
}

/// One X509-SVID as the API gave it.
pub struct Svid {
    pub id: String,
    pub hint: Option<String>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Svid {
    pub fn credentials(&self) -> Credentials {
        Credentials::from_der(
            self.chain.clone(),
            self.key.clone_key(),
            &format!("the Workload API's SVID for {}", self.id),
        )
    }

    fn leaf(&self) -> &[u8] {
        self.chain.first().map_or(&[], |c| c.as_ref())
    }
}

fn classify(endpoint: &str, e: WorkloadApiError) -> WorkloadError {
    let endpoint = endpoint.to_owned();
    match e {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::EmptyResponse => {
            WorkloadError::Gone {
                endpoint,
                message: e.to_string(),
            }
        }
        WorkloadApiError::PermissionDenied(m) => WorkloadError::Gone {
            endpoint,
            message: format!("permission denied: {m}"),
        },
        other => WorkloadError::Unreachable {
            endpoint,
            message: other.to_string(),
        },
    }
}

/// The SVID to use from one update: the one with `hint`, or the first (the default the
/// standard gives).
fn pick(endpoint: &str, ctx: &X509Context, hint: Option<&str>) -> Result<Svid, WorkloadError> {
    let svid = match hint {
        Some(h) => ctx
            .svids()
            .iter()
            .find(|s| s.hint() == Some(h))
            .ok_or_else(|| WorkloadError::NoHint {
                endpoint: endpoint.to_owned(),
                hint: h.to_owned(),
                given: ctx
                    .svids()
                    .iter()
                    .map(|s| format!("{:?}", s.hint().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
        None => ctx.default_svid().ok_or_else(|| WorkloadError::Gone {
            endpoint: endpoint.to_owned(),
            message: "an update with no SVID".to_owned(),
        })?,
    };
    Ok(Svid {
        id: svid.spiffe_id().to_string(),
        hint: svid.hint().map(str::to_owned),
        chain: svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        )),
    })
}

/// The workload's SVID now (the launcher's first fetch).
pub async fn fetch(endpoint: &str, hint: Option<&str>) -> Result<Svid, WorkloadError> {
    let get = async {
        let client = WorkloadApiClient::connect_to(endpoint)
            .await
            .map_err(|e| classify(endpoint, e))?;
        let ctx = client
            .fetch_x509_context()
            .await
            .map_err(|e| classify(endpoint, e))?;
        pick(endpoint, &ctx, hint)
    };
    tokio::time::timeout(FIRST_FETCH, get)
        .await
        .unwrap_or_else(|_| {
            Err(WorkloadError::Timeout {
                endpoint: endpoint.to_owned(),
            })
        })
}

/// What a keeper tells its user (the launcher's standard error).
fn say(what: &str) {
    eprintln!("agentwall launch (Workload API keeper): {what}");
}

/// A session's keeper: holds the Workload API's stream and renews or ends the session.
pub struct Keeper {
    pub endpoint: String,
    pub hint: Option<String>,
    /// The node's socket.
    pub socket: PathBuf,
    /// The SVID the session runs on now.
    pub current: Svid,
}

/// What the node said to a renewal or an end.
enum Answer {
    Done,
    /// The node answered no: asking again changes nothing.
    Refused(String),
    /// The node could not be asked (restarting): ask again.
    Unasked(String),
}

impl Keeper {
    fn ask(&self, svid: &Svid, req: &Request) -> Answer {
        match api::call(&self.socket, Some(svid.credentials()), req) {
            Ok(r) if r.ok => Answer::Done,
            Ok(r) => Answer::Refused(r.error.unwrap_or_else(|| "refused".to_owned())),
            Err(e) => Answer::Unasked(e.to_string()),
        }
    }

    /// Renews the session with `next` until the node answers; a refusal keeps the session on
    /// its current certificate (the node records why).
    async fn renew(&mut self, next: Svid) {
        if next.leaf() == self.current.leaf() {
            return;
        }
        loop {
            match self.ask(&next, &Request::Renew) {
                Answer::Done => {
                    self.current = next;
                    return;
                }
                Answer::Refused(why) => {
                    say(&format!(
                        "the node refused the rotated SVID for {}: {why}",
                        next.id
                    ));
                    return;
                }
                Answer::Unasked(why) => {
                    say(&format!("cannot renew yet: {why}"));
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Ends the session with the SVID it runs on, asking until the node answers (or the
    /// certificate ran out, when the kernel has ended it already).
    async fn end(&self, reason: &str) {
        say(&format!("ending the session: {reason}"));
        let req = Request::End {
            reason: reason.to_owned(),
        };
        loop {
            match self.ask(&self.current, &req) {
                Answer::Done => return,
                Answer::Refused(why) => {
                    say(&format!("the node did not end the session: {why}"));
                    return;
                }
                Answer::Unasked(why) => {
                    say(&format!("cannot end the session yet: {why}"));
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One update of the stream: the SVID to renew with, or why the session ends.
    fn judge(&self, ctx: &X509Context) -> Result<Svid, String> {
        match pick(&self.endpoint, ctx, self.hint.as_deref()) {
            Ok(s) if s.id != self.current.id => Err(format!(
                "the Workload API at {} now issues {} instead of {}",
                self.endpoint, s.id, self.current.id
            )),
            Ok(s) => Ok(s),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Follows the API until it says the SVID is gone (the session is ended) or `stop`
    /// (the agent exited) completes.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = BACKOFF_MIN;
        let mut said_down = false;
        loop {
            let opened = async {
                let client = WorkloadApiClient::connect_to(&self.endpoint)
                    .await
                    .map_err(|e| classify(&self.endpoint, e))?;
                client
                    .stream_x509_contexts()
                    .await
                    .map_err(|e| classify(&self.endpoint, e))
            };
            let stream = tokio::select! {
                () = &mut stop => return,
                s = opened => s,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) if e.is_gone() => return self.end(&e.to_string()).await,
                Err(e) => {
                    if !said_down {
                        say(&format!("{e}; trying again with backoff"));
                        said_down = true;
                    }
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    () = &mut stop => return,
                    i = stream.next() => i,
                };
                match item.map(|r| r.map_err(|e| classify(&self.endpoint, e))) {
                    Some(Ok(ctx)) => {
                        backoff = BACKOFF_MIN;
                        said_down = false;
                        match self.judge(&ctx) {
                            Ok(next) => self.renew(next).await,
                            Err(why) => return self.end(&why).await,
                        }
                    }
                    Some(Err(e)) if e.is_gone() => return self.end(&e.to_string()).await,
                    Some(Err(e)) => {
                        if !said_down {
                            say(&format!("{e}; reconnecting"));
                            said_down = true;
                        }
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Completes when the process behind `pidfd` has exited (a pidfd polls readable then).
pub async fn exited(pidfd: OwnedFd) {
    let waited = tokio::task::spawn_blocking(move || {
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for as long as the call.
        while unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
    })
    .await;
    if let Err(e) = waited {
        // The keeper cannot know when to go: it goes now, and the session runs to its
        // certificate's deadline.
        say(&format!("cannot watch the agent ({e}); not renewing"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_read_as_the_standard_writes_them() {
        assert_eq!(
            endpoint(Some("unix:///run/spire/agent.sock")).unwrap(),
            "unix:///run/spire/agent.sock"
        );
        assert_eq!(
            endpoint(Some("/run/spire/agent.sock")).unwrap(),
            "unix:///run/spire/agent.sock"
        );
        assert_eq!(
            endpoint(Some("tcp://127.0.0.1:8081")).unwrap(),
            "tcp://127.0.0.1:8081"
        );
        let e = endpoint(Some("tcp://localhost:8081")).unwrap_err();
        assert!(e.to_string().contains("tcp://localhost:8081"), "{e}");
    }
}
