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
    os::fd::OwnedFd,
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
    if raw.starts_with("tcp:") {
        // Any local user may listen on a port the API left: its answers could end a
        // session, or launch one as an identity of that user's choosing.
        return Err(WorkloadError::Endpoint {
            endpoint: raw,
            message: "a tcp endpoint cannot be told from another local user's listener; use the API's unix socket".into(),
        });
    }
    let e = if raw.starts_with("unix:") {
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
    Ok(svid_of(svid))
}

fn svid_of(svid: &spiffe::X509Svid) -> Svid {
    Svid {
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
    }
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

/// What a keeper tells its user (the launcher's standard error): best effort, never
/// blocking or failing (the keeper's stderr is its own file description, made non-blocking,
/// so an agent that fills or stops the terminal cannot hold the keeper up), and text from
/// the API made printable.
fn say(what: &str) {
    use std::io::Write as _;
    let line = format!(
        "agentwall launch (Workload API keeper): {}\n",
        crate::text::printable(what)
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
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
    /// The node answered no, or the credentials cannot be used: asking again changes
    /// nothing.
    Refused(String),
    /// The node could not be asked (restarting): ask again.
    Unasked(String),
}

/// The stream, or when to open it again.
enum Stream {
    Open(
        std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<X509Context, WorkloadApiError>> + Send>,
        >,
    ),
    Closed {
        retry_at: tokio::time::Instant,
    },
}

impl Keeper {
    fn ask(&self, svid: &Svid, req: &Request) -> Answer {
        match api::call(&self.socket, Some(svid.credentials()), req) {
            Ok(r) if r.ok => Answer::Done,
            Ok(r) => Answer::Refused(r.error.unwrap_or_else(|| "refused".to_owned())),
            Err(e @ (api::ApiError::NotRunning { .. } | api::ApiError::Protocol(_))) => {
                Answer::Unasked(e.to_string())
            }
            Err(e) => Answer::Refused(e.to_string()),
        }
    }

    /// One update of the stream: the SVID to renew with, or why the session ends. The SVID
    /// is the one the hint names, else the one of the session's own identity (the API may
    /// list others, in any order).
    fn judge(&self, ctx: &X509Context) -> Result<Svid, String> {
        let picked = match &self.hint {
            Some(_) => {
                pick(&self.endpoint, ctx, self.hint.as_deref()).map_err(|e| e.to_string())?
            }
            None => {
                let own = ctx
                    .svids()
                    .iter()
                    .position(|s| s.spiffe_id().to_string() == self.current.id);
                match own {
                    Some(i) => svid_of(&ctx.svids()[i]),
                    None => {
                        return Err(format!(
                            "the Workload API at {} no longer issues {} (it issues {})",
                            self.endpoint,
                            self.current.id,
                            ctx.svids()
                                .iter()
                                .map(|s| s.spiffe_id().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
            }
        };
        if picked.id != self.current.id {
            return Err(format!(
                "the Workload API at {} now issues {} instead of {}",
                self.endpoint, picked.id, self.current.id
            ));
        }
        Ok(picked)
    }

    async fn connect(&self) -> Result<Stream, WorkloadError> {
        let client = WorkloadApiClient::connect_to(&self.endpoint)
            .await
            .map_err(|e| classify(&self.endpoint, e))?;
        let s = client
            .stream_x509_contexts()
            .await
            .map_err(|e| classify(&self.endpoint, e))?;
        Ok(Stream::Open(Box::pin(s)))
    }

    /// Follows the API until it says the SVID is gone (the session is ended) or `stop`
    /// (the agent exited) completes. One loop: the stream is read while a renewal or an end
    /// waits for the node (the newest SVID wins), and `stop` is heard whatever is pending.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = BACKOFF_MIN;
        let mut said_down = false;
        let mut stream = Stream::Closed {
            retry_at: tokio::time::Instant::now(),
        };
        // The SVID to renew with, and when to ask the node (again).
        let mut pending: Option<(Svid, tokio::time::Instant)> = None;
        // A leaf the node refused: not offered again.
        let mut refused: Vec<u8> = Vec::new();
        // Why the session must end, and when to ask the node (again).
        let mut ending: Option<(String, tokio::time::Instant)> = None;
        let mut said_unasked = false;
        loop {
            let now = tokio::time::Instant::now();
            if let Some((why, at)) = &ending {
                if *at <= now {
                    let req = Request::End {
                        reason: why.clone(),
                    };
                    match self.ask(&self.current, &req) {
                        Answer::Done => {
                            say(&format!("session ended: {why}"));
                            return;
                        }
                        Answer::Refused(e) => {
                            say(&format!("the node did not end the session ({e}): {why}"));
                            return;
                        }
                        Answer::Unasked(e) => {
                            if !said_unasked {
                                say(&format!("cannot end the session yet ({e}); asking again"));
                                said_unasked = true;
                            }
                            ending = Some((why.clone(), now + RETRY));
                        }
                    }
                }
            } else if let Some((next, at)) = pending.take() {
                if at <= now {
                    match self.ask(&next, &Request::Renew) {
                        Answer::Done => {
                            self.current = next;
                            said_unasked = false;
                        }
                        Answer::Refused(e) => {
                            say(&format!(
                                "the node refused the rotated SVID for {}: {e}",
                                next.id
                            ));
                            refused = next.leaf().to_vec();
                        }
                        Answer::Unasked(e) => {
                            if !said_unasked {
                                say(&format!("cannot renew yet ({e}); asking again"));
                                said_unasked = true;
                            }
                            pending = Some((next, now + RETRY));
                        }
                    }
                } else {
                    pending = Some((next, at));
                }
            }
            let wake = [
                pending.as_ref().map(|p| p.1),
                ending.as_ref().map(|e| e.1),
                match &stream {
                    Stream::Closed { retry_at } => Some(*retry_at),
                    Stream::Open(_) => None,
                },
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let item = async {
                match &mut stream {
                    Stream::Open(s) => Some(s.next().await),
                    Stream::Closed { .. } => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => return,
                () = sleep => {
                    if let Stream::Closed { retry_at } = stream {
                        if retry_at <= tokio::time::Instant::now() {
                            let opened = tokio::select! {
                                () = &mut stop => return,
                                o = self.connect() => o,
                            };
                            stream = match opened {
                                Ok(s) => s,
                                Err(e) if e.is_gone() => {
                                    ending.get_or_insert((e.to_string(), tokio::time::Instant::now()));
                                    Stream::Closed { retry_at: far_future() }
                                }
                                Err(e) => {
                                    if !said_down {
                                        say(&format!("{e}; trying again with backoff"));
                                        said_down = true;
                                    }
                                    let at = tokio::time::Instant::now() + backoff;
                                    backoff = (backoff * 2).min(BACKOFF_MAX);
                                    Stream::Closed { retry_at: at }
                                }
                            };
                        }
                    }
                }
                item = item => {
                    let item = item.flatten();
                    match item.map(|r| r.map_err(|e| classify(&self.endpoint, e))) {
                        Some(Ok(ctx)) => {
                            backoff = BACKOFF_MIN;
                            said_down = false;
                            if ending.is_none() {
                                match self.judge(&ctx) {
                                    Ok(next) if next.leaf() == self.current.leaf() || next.leaf() == refused.as_slice() => {
                                        pending = None;
                                    }
                                    Ok(next) => pending = Some((next, tokio::time::Instant::now())),
                                    Err(why) => {
                                        ending = Some((why, tokio::time::Instant::now()));
                                    }
                                }
                            }
                        }
                        Some(Err(e)) if e.is_gone() => {
                            ending.get_or_insert((e.to_string(), tokio::time::Instant::now()));
                            stream = Stream::Closed { retry_at: far_future() };
                        }
                        other => {
                            if let Some(Err(e)) = other {
                                if !said_down {
                                    say(&format!("{e}; reconnecting"));
                                    said_down = true;
                                }
                            }
                            let at = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            stream = Stream::Closed { retry_at: at };
                        }
                    }
                }
            }
        }
    }
}

/// Never, as a time (a stream not to be opened again).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// Completes when the process behind `pidfd` has exited (a pidfd reads as readable then).
pub async fn exited(pidfd: OwnedFd) {
    // SAFETY: the AsyncFd owns the pidfd, so it stays open for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(e) => {
            // The keeper cannot know when to go: it goes now, and the session runs to its
            // certificate's deadline.
            say(&format!("cannot watch the agent ({e}); not renewing"));
        }
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
        let e = endpoint(Some("tcp://127.0.0.1:8081")).unwrap_err();
        assert!(e.to_string().contains("use the API's unix socket"), "{e}");
    }
}
