//! `agentwall control-plane serve`: HTTPS (rustls) in front of a [`Store`]. Nodes
//! authenticate with certificates, admins and security with certificates or bearer tokens;
//! every route names the roles that may use it and everything else is refused and logged.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Extension, FromRequest, Query, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use sha2::Digest as _;
use tracing::{error, info, warn};

use crate::{
    config::control_plane::{Access, CpConfigError, Limits, Role, ServerConfig},
    identity::CrlWatchingVerifier,
};

pub mod alerts;
mod console;
pub mod issuing;
mod review;
mod syslog;

use super::{
    Bundle, ErrorBody, FlowQuery, Ingested, NodeShadowAi, PollRequest, PushRequest, ReportBatch,
    RevokeRequest,
    store::{NodeSeen, Spend, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] CpConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
    #[error(transparent)]
    Crl(#[from] crate::identity::IdentityError),
    #[error(
        "limits.max_connections {max} does not fit the open-files limit {files} (64 kept for the server's own files): lower it, or raise LimitNOFILE"
    )]
    FdLimit { max: usize, files: u64 },
    #[error(
        "the open-files limit {files} leaves no room for connections (64 kept for the server's own files): raise LimitNOFILE"
    )]
    NoRoomForConnections { files: u64 },
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("syslog forwarding: {0}")]
    Forward(#[from] syslog::ForwardError),
    #[error("alerts.webhooks: {0}")]
    Webhook(String),
    #[error(transparent)]
    Issuer(#[from] super::issuer::IssuerError),
    #[error("signers: {0}")]
    Signers(#[from] super::signing::SigningError),
    #[error(
        "{path}: {message} (the numbers this control plane served; remove the file to number from the database's alone)"
    )]
    ServedFile { path: PathBuf, message: String },
}

/// What a replica served (or nodes showed it they hold), kept beside its state: a
/// database put back to an older state, with this replica restarted, numbers its next push
/// and revocation above them before any node has polled.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Served {
    version: u64,
    generation: u64,
    /// The database they were served from: numbers of another say nothing of this one's.
    #[serde(default)]
    lineage: Option<String>,
}

/// Who is asking: the verified certificate's SPIFFE ID and/or a bearer token.
#[derive(Clone, Debug, Default)]
struct Peer {
    spiffe_id: Option<String>,
    addr: Option<SocketAddr>,
    /// The certificate chain the handshake verified (or a resumed session carried): checked
    /// again for every request, against the CRLs and the clock of that moment.
    chain: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
    /// The connection's place under the caps.
    slot: Option<Arc<ConnSlot>>,
}

/// An authenticated caller and the roles it holds.
#[derive(Clone, Debug)]
struct Principal {
    name: String,
}

/// A refusal, as the API sends it.
struct Fail(StatusCode, ErrorBody);

impl Fail {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self(
            status,
            ErrorBody {
                error: error.into(),
                errors: Vec::new(),
            },
        )
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<StoreError> for Fail {
    /// What went wrong is logged, not sent: a caller (a node) has no business with the
    /// database's errors.
    fn from(e: StoreError) -> Self {
        error!(error = %e, "storage failed");
        if let StoreError::NotNewest { .. } = e {
            Fail::new(
                StatusCode::CONFLICT,
                format!("{e}: look at the newest (cp policy show) and push again"),
            )
        } else if let StoreError::NoProposal(_) = e {
            Fail::new(StatusCode::NOT_FOUND, e.to_string())
        } else if let StoreError::Approved { .. } | StoreError::SignedAlready { .. } = e {
            Fail::new(StatusCode::CONFLICT, e.to_string())
        } else if e.is_busy() {
            Fail::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable or busy now; send this again (the control plane's log says why)",
            )
        } else {
            Fail::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage failed (the control plane's log says why)",
            )
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// What a route needs, checked from the request head before any byte of its body is read.
struct RouteRule {
    method: Method,
    path: &'static str,
    roles: &'static [Role],
    /// Largest body the route reads (0: it reads none).
    body_cap: usize,
    /// Admin and security routes: each caller's requests count against its rate.
    rate_limited: bool,
}

const READERS: &[Role] = &[Role::Admin, Role::Security];

/// Routes anyone may use: the console's own files and its sign-in (which checks the
/// credential it is given itself).
const PUBLIC: &[Role] = &[];

/// Every route the server answers (the router below holds the same set).
const ROUTES: &[RouteRule] = &[
    RouteRule {
        method: Method::POST,
        path: "/v1/identity-tokens",
        roles: &[Role::Admin],
        body_cap: 64 << 10,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/identity-tokens",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::DELETE,
        path: "/v1/identity-tokens",
        roles: &[Role::Admin],
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/issuances",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/node/svid",
        roles: &[Role::Node],
        body_cap: 64 << 10,
        // Each is a store write, and local users reach it through a node's Join.
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/policy",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::PUT,
        path: "/v1/policy",
        roles: &[Role::Admin],
        body_cap: 16 << 20,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/policy/proposals",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/policy/approve",
        roles: &[Role::Admin],
        body_cap: 64 << 10,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/policy/versions",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/policy/diff",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/policy/simulate",
        roles: READERS,
        body_cap: 16 << 20,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/identities",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/reports/unused",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/reports/grants",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/nodes",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/flows",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/shadow-ai",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/alerts",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/audit/chain",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/revocations",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/revocations",
        roles: &[Role::Admin],
        body_cap: 64 << 10,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/metrics",
        roles: READERS,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/node/poll",
        roles: &[Role::Node],
        body_cap: 64 << 10,
        rate_limited: false,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/node/reports",
        roles: &[Role::Node],
        body_cap: 32 << 20,
        rate_limited: false,
    },
    RouteRule {
        method: Method::GET,
        path: "/v1/openapi.json",
        roles: &[Role::Admin, Role::Security, Role::Node],
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::POST,
        path: "/v1/console/links",
        roles: &[Role::Admin],
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::DELETE,
        path: "/v1/console/sessions",
        roles: &[Role::Admin],
        body_cap: 0,
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui",
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui/",
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui/app.js",
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui/app.css",
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui/uplot.js",
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui/uplot.css",
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::POST,
        path: "/ui/session",
        roles: PUBLIC,
        body_cap: 4 << 10,
        // By the caller's address: sign-ins are where credentials are guessed.
        rate_limited: true,
    },
    RouteRule {
        method: Method::GET,
        path: "/ui/session",
        // Answers whether the browser is signed in, so the pages know to ask.
        roles: PUBLIC,
        body_cap: 0,
        rate_limited: false,
    },
    RouteRule {
        method: Method::DELETE,
        path: "/ui/session",
        roles: READERS,
        body_cap: 0,
        rate_limited: true,
    },
];

/// Why the server turned a caller away before serving it: each is logged and counted
/// (`agentwall_cp_refusals_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    Unauthenticated,
    Forbidden,
    RateLimited,
    TooLarge,
    BodyTimeout,
    NoSuchRoute,
    ConnectionCap,
    AddressCap,
    HandshakeTimeout,
    HandshakeFailed,
    PollReplaced,
    WriteTimeout,
    /// accept(2) failed (out of descriptors, say).
    AcceptFailed,
    /// No room in the budget of body bytes in flight within the body timeout.
    BodyBudget,
    /// A caller already holds its share of connections.
    CallerCap,
    /// A report batch that is not one (malformed JSON, wrong types, a bad gzip stream).
    BadBatch,
    /// A poll this replica cannot answer truthfully: it has lost the database, or serves
    /// older than the node has seen.
    Stale,
    /// A state-changing request a browser made for another site, or signed in by cookie
    /// without the session's CSRF token.
    CrossSite,
}

impl Refusal {
    const ALL: [Refusal; 18] = [
        Self::Unauthenticated,
        Self::Forbidden,
        Self::RateLimited,
        Self::TooLarge,
        Self::BodyTimeout,
        Self::NoSuchRoute,
        Self::ConnectionCap,
        Self::AddressCap,
        Self::HandshakeTimeout,
        Self::HandshakeFailed,
        Self::PollReplaced,
        Self::WriteTimeout,
        Self::AcceptFailed,
        Self::BodyBudget,
        Self::CallerCap,
        Self::BadBatch,
        Self::Stale,
        Self::CrossSite,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::NoSuchRoute => "no_such_route",
            Self::ConnectionCap => "connection_cap",
            Self::AddressCap => "address_cap",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HandshakeFailed => "handshake_failed",
            Self::PollReplaced => "poll_replaced",
            Self::WriteTimeout => "write_timeout",
            Self::AcceptFailed => "accept_failed",
            Self::BodyBudget => "body_budget",
            Self::CallerCap => "caller_cap",
            Self::BadBatch => "bad_batch",
            Self::Stale => "stale",
            Self::CrossSite => "cross_site",
        }
    }
}

/// Refusal log lines written per reason per second, at most: a flood is counted in full
/// and logged in part.
const REFUSAL_LOGS_PER_SECOND: u32 = 10;

/// The server's own counters, read by `GET /v1/metrics`.
#[derive(Default)]
struct Stats {
    refusals: [std::sync::atomic::AtomicU64; Refusal::ALL.len()],
    /// (the second, refusal lines logged in it per reason).
    logged: Mutex<(u64, [u32; Refusal::ALL.len()])>,
    connections: std::sync::atomic::AtomicU64,
    polls_held: std::sync::atomic::AtomicU64,
    crl_reloads: std::sync::atomic::AtomicU64,
    crl_reload_failures: std::sync::atomic::AtomicU64,
    /// Records past `retention_days`: not stored when they arrived so, or removed since.
    records_expired: std::sync::atomic::AtomicU64,
    /// Records removed to stay under `retention_max_bytes`.
    records_over_size: std::sync::atomic::AtomicU64,
    retention_failures: std::sync::atomic::AtomicU64,
    /// Polls from nodes that knew another database (answered as new to this one).
    polls_other_lineage: std::sync::atomic::AtomicU64,
    /// Retention passes left to another replica, which held the retention lock.
    retention_skipped: std::sync::atomic::AtomicU64,
    /// 1 while the database holds older numbers than this replica served (put back to an
    /// older state) or than nodes know.
    database_behind: std::sync::atomic::AtomicU64,
    /// Events this replica sent to the syslog receiver.
    syslog_forwarded: std::sync::atomic::AtomicU64,
    /// Records forwarding passed over: no OCSF class for them (or unreadable).
    syslog_not_mapped: std::sync::atomic::AtomicU64,
    /// Forwarding attempts that failed (the receiver or the database away).
    syslog_failures: std::sync::atomic::AtomicU64,
    /// Alerts raised by this replica, by kind ([`alerts::KINDS`]).
    alerts: [std::sync::atomic::AtomicU64; alerts::KINDS.len()],
    /// Pages of records alerts could not be worked out for (retried).
    alert_failures: std::sync::atomic::AtomicU64,
    /// Alerts webhooks took.
    alerts_delivered: std::sync::atomic::AtomicU64,
    /// Webhook posts that failed (retried with backoff).
    alert_deliveries_failed: std::sync::atomic::AtomicU64,
    /// Records stored that alerts have not been worked out for yet (by any replica).
    alerts_behind: std::sync::atomic::AtomicU64,
    /// Identities (on their nodes) whose bursts this replica follows now.
    alerts_following: std::sync::atomic::AtomicU64,
    /// Identities not followed: past the most followed at once, or on one node.
    alerts_left_out: std::sync::atomic::AtomicU64,
    /// Alerts held back by the per-node, per-kind limit.
    alerts_held_back: std::sync::atomic::AtomicU64,
}

impl Stats {
    /// Counts a refusal; true while this second's log lines for its reason are under
    /// [`REFUSAL_LOGS_PER_SECOND`].
    fn refused(&self, why: Refusal) -> bool {
        self.refusals[why as usize].fetch_add(1, Ordering::Relaxed);
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut l = self.logged.lock().expect("refusal log");
        if l.0 != second {
            *l = (second, [0; Refusal::ALL.len()]);
        }
        l.1[why as usize] += 1;
        l.1[why as usize] <= REFUSAL_LOGS_PER_SECOND
    }
}

type Limiter = governor::DefaultKeyedRateLimiter<String>;

pub struct Server {
    store: Arc<dyn Store>,
    access: Vec<Access>,
    poll_timeout: Duration,
    limits: Limits,
    /// `limits.max_connections`, as settled at start.
    max_connections: usize,
    limiter: Limiter,
    /// Records each node may report a minute.
    report_quota: Limiter,
    /// Bytes (decompressed) each node may report a minute.
    byte_quota: Limiter,
    /// Nodes a quota refused lately, and until when: their next batches are refused from
    /// the request head, before their bodies are read.
    report_wait: Mutex<HashMap<String, std::time::Instant>>,
    /// Request body bytes being read or held at once, from everyone.
    body_budget: Arc<tokio::sync::Semaphore>,
    stats: Stats,
    /// The long-poll each node holds (by principal): a newer poll ends the older one.
    polls: Mutex<HashMap<String, (u64, Arc<tokio::sync::Notify>)>>,
    poll_tickets: std::sync::atomic::AtomicU64,
    /// Open connections per peer address (the total is `stats.connections`).
    conns: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Vouched connections open per caller.
    callers: Mutex<HashMap<String, usize>>,
    /// Peer addresses (blocks) that made an authorized request lately, and when: the last
    /// quarter of the connection cap is theirs.
    known: Mutex<HashMap<std::net::IpAddr, std::time::Instant>>,
    /// Nodes with a report batch being stored: one at a time each.
    reporting: Mutex<std::collections::HashSet<String>>,
    ingests: tokio::sync::Semaphore,
    /// (newest bundle version, revocation generation): long-polls wait on changes.
    changes: tokio::sync::watch::Sender<(u64, u64)>,
    /// What polls are answered with; only ever moves forward ([`Server::publish`]).
    published: std::sync::RwLock<Published>,
    /// With replicas: when this one last read the database's heads. Past [`STALE`], its
    /// polls are refused (503) so nodes move to a replica that can see the database.
    caught_up: Mutex<std::time::Instant>,
    /// (version, generation) nodes of this database's lineage showed they know, above what
    /// the database holds (it was put back to an older state): pushes and revocations are
    /// numbered above them, so those nodes take them. Bounded by [`MAX_AHEAD`].
    floor: Mutex<(u64, u64)>,
    /// Where what was served is kept ([`Served`]).
    served_file: std::sync::OnceLock<PathBuf>,
    /// Pushes must name an owner for every AgentPolicy (`require_owner`).
    require_owner: std::sync::atomic::AtomicBool,
    /// The issuer (`[issuer]`), set once at start.
    issuer: std::sync::OnceLock<Arc<super::issuer::Issuer>>,
    /// Polls not yet written to the store (written once a second, in one transaction).
    seen: Mutex<HashMap<String, NodeSeen>>,
    /// The client-certificate verifier in force (CRLs reread), for per-request rechecks.
    verifier: std::sync::OnceLock<Arc<CrlWatchingVerifier>>,
    /// How long a console sign-in lasts, in seconds; 0: the console is off.
    console_secs: std::sync::atomic::AtomicI64,
    /// Turns for fleet reviews (simulations, unused rules), which read many records.
    reviews: Arc<tokio::sync::Semaphore>,
    /// What raises alerts, as configured (shown by `GET /v1/alerts`).
    alert_thresholds: std::sync::OnceLock<crate::config::control_plane::Alerts>,
    /// The signers' keys, and how many must sign a bundle before it is published.
    approvals: std::sync::OnceLock<(super::signing::Keyring, usize, Option<usize>)>,
}

impl Server {
    pub fn new(
        store: Arc<dyn Store>,
        access: Vec<Access>,
        poll_timeout: Duration,
        limits: Limits,
    ) -> Result<Arc<Self>, StoreError> {
        let newest = store.fresh_policy(None)?;
        let (generation, revoked) = store.fresh_revocations()?;
        let published = Published {
            version: newest.as_ref().map_or(0, |b| b.version),
            bundle: newest.as_ref().map(bundle_json),
            revision: newest.as_ref().map(|b| b.revision.clone()),
            not_before: newest.as_ref().and_then(|b| b.signing.not_before.clone()),
            root: newest
                .as_ref()
                .and_then(|b| b.signing.root().map(str::to_owned)),
            lineage: store.lineage()?.map(Arc::from),
            generation,
            revoked: Arc::new(revoked.into_iter().map(|r| r.identity).collect()),
        };
        let (changes, _) = tokio::sync::watch::channel((published.version, generation));
        let per_minute = std::num::NonZeroU32::new(limits.requests_per_minute)
            .unwrap_or(std::num::NonZeroU32::MIN);
        Ok(Arc::new(Self {
            store,
            access,
            poll_timeout,
            limiter: governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute)),
            report_quota: governor::RateLimiter::keyed(
                governor::Quota::per_minute(
                    std::num::NonZeroU32::new(limits.node_records_per_minute)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                )
                // A whole batch fits however low the rate.
                .allow_burst(
                    std::num::NonZeroU32::new(
                        limits
                            .node_records_per_minute
                            .max(super::MAX_BATCH_RECORDS as u32),
                    )
                    .unwrap_or(std::num::NonZeroU32::MIN),
                ),
            ),
            byte_quota: governor::RateLimiter::keyed(
                governor::Quota::per_minute(
                    std::num::NonZeroU32::new(limits.node_bytes_per_minute)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                )
                .allow_burst(
                    std::num::NonZeroU32::new(
                        limits
                            .node_bytes_per_minute
                            .max(super::MAX_BATCH_BYTES as u32),
                    )
                    .unwrap_or(std::num::NonZeroU32::MIN),
                ),
            ),
            report_wait: Mutex::new(HashMap::new()),
            body_budget: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(limits.body_bytes_in_flight)
                    .unwrap_or(usize::MAX)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            max_connections: limits.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            limits,
            stats: Stats::default(),
            polls: Mutex::new(HashMap::new()),
            poll_tickets: std::sync::atomic::AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            callers: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            reporting: Mutex::new(std::collections::HashSet::new()),
            ingests: tokio::sync::Semaphore::new(INGESTS_AT_ONCE),
            changes,
            published: std::sync::RwLock::new(published),
            caught_up: Mutex::new(std::time::Instant::now()),
            floor: Mutex::new((0, 0)),
            served_file: std::sync::OnceLock::new(),
            require_owner: std::sync::atomic::AtomicBool::new(false),
            issuer: std::sync::OnceLock::new(),
            seen: Mutex::new(HashMap::new()),
            verifier: std::sync::OnceLock::new(),
            reviews: Arc::new(tokio::sync::Semaphore::new(review::REVIEWS_AT_ONCE)),
            alert_thresholds: std::sync::OnceLock::new(),
            approvals: std::sync::OnceLock::new(),
            console_secs: std::sync::atomic::AtomicI64::new(
                crate::config::control_plane::DEFAULT_CONSOLE_SESSION_HOURS * 3600,
            ),
        }))
    }

    /// The roles a certificate's SPIFFE ID or a token (by its SHA-256) holds.
    fn roles_of(&self, spiffe_id: Option<&str>, token_hash: Option<&str>) -> Vec<Role> {
        Self::roles_in(&self.access, spiffe_id, token_hash)
    }

    /// [`Server::roles_of`] in an access list.
    fn roles_in(access: &[Access], spiffe_id: Option<&str>, token_hash: Option<&str>) -> Vec<Role> {
        access
            .iter()
            .filter(|a| {
                let by_cert = spiffe_id.is_some_and(|id| {
                    a.spiffe_ids.iter().any(|p| match p.strip_suffix("/*") {
                        Some(prefix) => id
                            .strip_prefix(prefix)
                            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
                        None => p == id,
                    })
                });
                let by_token = token_hash
                    .is_some_and(|h| a.token_sha256.iter().any(|t| t.eq_ignore_ascii_case(h)));
                by_cert || by_token
            })
            .map(|a| a.role)
            .collect()
    }

    /// The caller, if it holds one of `roles`; a refusal (logged) otherwise. A console
    /// session counts only when the request has neither a certificate nor a token.
    fn allow(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        route: &str,
        roles: &[Role],
        session: Option<&console::Signed>,
    ) -> Result<Principal, Fail> {
        let token = bearer(headers);
        let (name, held) = match (&peer.spiffe_id, token) {
            // One credential names the caller, grants its roles and spends its rate: a token
            // beside a certificate would do the one under the other's name.
            (Some(_), Some(_)) => {
                if self.stats.refused(Refusal::Unauthenticated) {
                    warn!(route, peer = ?peer.addr, "request refused: both a client certificate and a bearer token");
                }
                return Err(Fail::new(
                    StatusCode::UNAUTHORIZED,
                    "present a client certificate or a bearer token, not both",
                ));
            }
            (Some(id), None) => (id.clone(), self.roles_of(Some(id), None)),
            (None, Some(t)) => {
                let hash = sha256_hex(t.as_bytes());
                (
                    format!("token:{}", &hash[..12]),
                    self.roles_of(None, Some(&hash)),
                )
            }
            (None, None) if session.is_some() => {
                let Some(console::Signed(session)) = session else {
                    unreachable!()
                };
                match self.session_roles(session) {
                    Ok(held) => held,
                    Err(f) => {
                        if self.stats.refused(Refusal::Unauthenticated) {
                            warn!(route, peer = ?peer.addr, error = %f.1.error, "request refused: console session");
                        }
                        return Err(f);
                    }
                }
            }
            (None, None) => {
                if self.stats.refused(Refusal::Unauthenticated) {
                    warn!(route, peer = ?peer.addr, "request refused: no client certificate and no bearer token");
                }
                return Err(Fail::new(
                    StatusCode::UNAUTHORIZED,
                    "no credentials: present a client certificate or a bearer token",
                ));
            }
        };
        if held.is_empty() {
            if self.stats.refused(Refusal::Forbidden) {
                warn!(route, principal = %name, peer = ?peer.addr, "request refused: no role");
            }
            return Err(Fail::new(
                StatusCode::FORBIDDEN,
                format!("{name} holds no role on this control plane"),
            ));
        }
        if !held.iter().any(|r| roles.contains(r)) {
            let needs: Vec<String> = roles.iter().map(Role::to_string).collect();
            let has: Vec<String> = held.iter().map(Role::to_string).collect();
            if self.stats.refused(Refusal::Forbidden) {
                warn!(route, principal = %name, roles = %has.join(","), needs = %needs.join("|"),
                    peer = ?peer.addr, "request refused: outside the caller's rights");
            }
            return Err(Fail::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{name} (role {}) may not use {route}: it needs role {}",
                    has.join(", "),
                    needs.join(" or ")
                ),
            ));
        }
        Ok(Principal { name })
    }

    /// Serves `bundle` and the revocations of `generation`, each only when newer than what
    /// is served: a replica hears of other replicas' changes and makes its own, in any
    /// order, and must never go back to an older one. (A bundle of the served number but
    /// another revision, read from the database, replaces the served one: see `catch_up`.)
    fn publish(&self, bundle: Option<&Bundle>, revocations: Option<(u64, Vec<super::Revocation>)>) {
        let mut p = self.published.write().expect("published");
        let mut moved = false;
        if let Some(b) = bundle.filter(|b| {
            b.version > p.version
                || (b.version == p.version && p.revision.as_deref() != Some(b.revision.as_str()))
        }) {
            p.version = b.version;
            p.bundle = Some(bundle_json(b));
            p.revision = Some(b.revision.clone());
            p.not_before = b.signing.not_before.clone();
            p.root = b.signing.root().map(str::to_owned);
            moved = true;
        }
        if let Some((generation, all)) = revocations.filter(|(g, _)| *g > p.generation) {
            let now: std::collections::HashSet<&str> =
                all.iter().map(|r| r.identity.as_str()).collect();
            let lost: Vec<&String> = p
                .revoked
                .iter()
                .filter(|i| !now.contains(i.as_str()))
                .collect();
            if !lost.is_empty() {
                // Nodes that applied them keep them (revocations only add up on a node), but
                // nodes that did not, and new ones, will not learn them from this database.
                error!(identities = ?lost, generation,
                    "identities revoked before are missing from the database's revocation list (was it put back to an older state?): revoke them again");
            }
            p.generation = generation;
            p.revoked = Arc::new(all.into_iter().map(|r| r.identity).collect());
            moved = true;
        }
        if moved {
            self.changes.send_replace((p.version, p.generation));
        }
    }

    /// After a change is served: learns the database's lineage once it has one (its first
    /// bundle or revocation), and keeps what was served.
    fn settle(&self) -> Result<(), StoreError> {
        if self.published.read().expect("published").lineage.is_none()
            && let Some(l) = self.store.lineage()?
        {
            self.published.write().expect("published").lineage = Some(Arc::from(l));
        }
        if let Some(path) = self.served_file.get() {
            let (version, generation) = self.number_above();
            let lineage = self.published.read().expect("published").lineage.clone();
            let text = serde_json::to_vec(&Served {
                version,
                generation,
                lineage: lineage.as_deref().map(str::to_owned),
            })
            .expect("numbers serialize");
            if let Err(e) = crate::files::write_atomic(path, &text) {
                error!(path = %path.display(), error = %e, "could not keep the numbers served");
            }
        }
        Ok(())
    }

    /// What raises alerts (shown by `GET /v1/alerts`).
    pub fn alert_thresholds(&self, a: crate::config::control_plane::Alerts) {
        let _ = self.alert_thresholds.set(a);
    }

    /// The signers' keys, and how many of them must sign a bundle before it is published
    /// (`approvals_required`; fewer make a push a proposal).
    pub fn approvals(
        &self,
        keyring: super::signing::Keyring,
        required: usize,
        break_glass: Option<usize>,
    ) {
        let _ = self.approvals.set((keyring, required, break_glass));
    }

    /// The signers' keys and `approvals_required` (none and 0 until set).
    fn signers(&self) -> (&super::signing::Keyring, usize) {
        static NONE: std::sync::OnceLock<super::signing::Keyring> = std::sync::OnceLock::new();
        match self.approvals.get() {
            Some((k, r, _)) => (k, *r),
            None => (NONE.get_or_init(Default::default), 0),
        }
    }

    /// `break_glass_approvals`, when set.
    fn break_glass_approvals(&self) -> Option<usize> {
        self.approvals.get().and_then(|(_, _, b)| *b)
    }

    /// Checks a push's signing: its times (`not_before` within the clock skew of now,
    /// `expires_at` after it) and each signature against the signers' keys, naming each
    /// signer as `[signers]` does; then [`Server::current`]. Returns how many signatures
    /// publish a bundle.
    fn signed_as_asked(
        &self,
        digest: &str,
        signing: &mut super::signing::Signing,
    ) -> Result<usize, Fail> {
        let (keyring, required) = self.signers();
        if signing.is_empty() {
            return Ok(required);
        }
        let bad = |m: String| Fail::new(StatusCode::BAD_REQUEST, m);
        let Some(nb) = signing.not_before.clone() else {
            return Err(bad(
                "a signed push names its not_before (the time its signatures date it from)".into(),
            ));
        };
        let time = |field: &str, t: &str| {
            crate::clock::parse_rfc3339(t)
                .map_err(|e| bad(format!("{field} {t:?} is not an RFC 3339 time: {e}")))
        };
        let (nb_time, now) = (time("not_before", &nb)?, time::OffsetDateTime::now_utc());
        let skew = super::signing::CLOCK_SKEW_SECS;
        if (nb_time - now).whole_seconds().abs() > skew {
            return Err(bad(format!(
                "not_before {nb} is more than {skew} s from the control plane's clock ({})",
                crate::clock::rfc3339(now.into())
            )));
        }
        if let Some(exp) = &signing.expires_at
            && time("expires_at", exp)? <= nb_time
        {
            return Err(bad(format!(
                "expires_at {exp} is not after not_before {nb}"
            )));
        }
        // Bases after the bundle's own time (adds_to, carries_from).
        signing.dated_sanely(now).map_err(|e| bad(e.to_string()))?;
        let dated = signing.clone();
        let mut seen = std::collections::BTreeSet::new();
        for sig in &mut signing.signatures {
            keyring
                .check_one(digest, &dated, sig)
                .map_err(|e| bad(e.to_string()))?;
            if !seen.insert(sig.key.clone()) {
                return Err(bad(format!("key {} signs the push twice", sig.key)));
            }
            sig.signer = keyring.name_of(&sig.key).unwrap_or_default().to_owned();
        }
        self.current(signing)?;
        Ok(required)
    }

    /// Refuses (409) what nodes would: a bundle past its `expires_at`, or older than the
    /// bundle in force by its signed `not_before`.
    fn current(&self, signing: &super::signing::Signing) -> Result<(), Fail> {
        let conflict = |m: String| Fail::new(StatusCode::CONFLICT, m);
        let now = time::OffsetDateTime::now_utc();
        if let Some(exp) = &signing.expires_at
            && crate::clock::parse_rfc3339(exp).is_ok_and(|e| e <= now)
        {
            return Err(conflict(format!(
                "the bundle expired at {exp}: push it again"
            )));
        }
        let (newest, root) = {
            let p = self.published.read().expect("published");
            (p.not_before.clone(), p.root.clone())
        };
        let Some(newest) = newest else {
            return Ok(());
        };
        let root = root.unwrap_or_else(|| newest.clone());
        let before = |t: &str, than: &str| {
            matches!(
                (crate::clock::parse_rfc3339(t), crate::clock::parse_rfc3339(than)),
                (Ok(a), Ok(b)) if a < b
            )
        };
        let before_newest = |t: &str| before(t, &newest);
        if let Some(nb) = signing.not_before.as_deref().filter(|t| before_newest(t)) {
            return Err(conflict(format!(
                "the bundle is dated {nb}, before the bundle in force ({newest}): nodes would refuse it as a rollback; push it again"
            )));
        }
        if let Some(from) = signing.carries_from.as_deref().filter(|t| before(t, &root)) {
            return Err(conflict(format!(
                "the bundle carries grants over from one dated {from}, before the bundle under the one in force ({root}): nodes would refuse it; push again"
            )));
        }
        if let Some(base) = signing.adds_to.as_deref().filter(|t| before(t, &root)) {
            return Err(conflict(format!(
                "the bundle adds grants to one dated {base}, before the bundle under the one in force ({root}): nodes would refuse it; grant again"
            )));
        }
        Ok(())
    }

    /// Issues certificates with `issuer` (`[issuer]`).
    pub fn issue_with(&self, issuer: super::issuer::Issuer) {
        let _ = self.issuer.set(Arc::new(issuer));
    }

    /// Refuses pushes with an AgentPolicy that names no owner (`require_owner`).
    pub fn require_owners(&self, on: bool) {
        self.require_owner.store(on, Ordering::Relaxed);
    }

    /// How long a console sign-in lasts; None turns the console off (its routes answer
    /// 404).
    pub fn console(&self, session_hours: Option<u32>) {
        self.console_secs.store(
            session_hours.map_or(0, |h| i64::from(h) * 3600),
            Ordering::Relaxed,
        );
    }

    fn console_ttl(&self) -> time::Duration {
        time::Duration::seconds(self.console_secs.load(Ordering::Relaxed))
    }

    /// Keeps what is served in `path` from now on, and numbers above what it holds already.
    fn keep_served_in(&self, path: PathBuf) -> Result<(), ServerError> {
        let fail = |message: String| ServerError::ServedFile {
            path: path.clone(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let kept: Served = match std::fs::read(&path) {
            Ok(t) => serde_json::from_slice(&t).map_err(|e| fail(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Served::default(),
            Err(e) => return Err(fail(e.to_string())),
        };
        let ours = self.published.read().expect("published").lineage.clone();
        if kept.lineage.is_some() && kept.lineage.as_deref() == ours.as_deref() {
            let mut f = self.floor.lock().expect("floor");
            *f = (f.0.max(kept.version), f.1.max(kept.generation));
        }
        let _ = self.served_file.set(path);
        Ok(())
    }

    /// Reads what other replicas stored since this one last looked, and serves it.
    fn catch_up(&self) -> Result<(), StoreError> {
        let looked = std::time::Instant::now();
        let (version, generation) = self.store.heads()?;
        let (served_version, served_generation) = *self.changes.borrow();
        let above = self.number_above();
        let behind = version < above.0 || generation < above.1;
        if self
            .stats
            .database_behind
            .swap(u64::from(behind), Ordering::Relaxed)
            == 0
            && behind
        {
            error!(database_version = version, database_generation = generation,
                served_version, served_generation, floor = ?*self.floor.lock().expect("floor"),
                "the database holds older numbers than this replica served (restored from a backup, or a standby promoted without the last commits): what was served stays, and the next push and revocation are numbered above it");
        }
        // The same number may hold another bundle than the one served: pushed here before
        // the database went back, and given again to another push since. The database's is
        // served from now on.
        let served_revision = self.published.read().expect("published").revision.clone();
        let bundle = if version > served_version
            || (version == served_version
                && version != 0
                && self.store.revision_of(version)? != served_revision)
        {
            self.store.fresh_policy(Some(version))?
        } else {
            None
        };
        let revocations = if generation > served_generation {
            Some(self.store.fresh_revocations()?)
        } else {
            None
        };
        self.publish(bundle.as_ref(), revocations);
        self.settle()?;
        *self.caught_up.lock().expect("caught up") = looked;
        Ok(())
    }

    /// Why this replica must not answer a poll now: it has not read the database for
    /// [`STALE`] (503: a partition; the node moves to another replica). A node that knows
    /// newer numbers than this replica serves, even after it looked again, is answered all
    /// the same (held like any other): the database holds less than the node saw (it was
    /// put back to an older state, or the node lies). Its numbers raise the floor pushes and
    /// revocations are numbered above, and its answers carry this database's revocation
    /// list, which a node applies whatever its number.
    fn behind(&self, known: (u64, u64)) -> Option<(StatusCode, String)> {
        let replicas = self.store.changes().is_some();
        let age = self.caught_up.lock().expect("caught up").elapsed();
        if replicas && age > STALE {
            return Some((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "this replica has not reached the database for {} s; try another",
                    age.as_secs()
                ),
            ));
        }
        let served = *self.changes.borrow();
        if known.0 > served.0 || known.1 > served.1 {
            // Looked again at most once a second on a node's word: a node claiming numbers
            // that do not exist cannot make every poll of its cost database reads.
            if replicas
                && age > Duration::from_secs(1)
                && let Err(e) = self.catch_up()
            {
                error!(error = %e, "reading what the database holds failed");
                return Some((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this replica cannot read the database now; try another".to_owned(),
                ));
            }
            let served = *self.changes.borrow();
            if known.0 > served.0 || known.1 > served.1 {
                self.raise_floor(known, served);
            }
        }
        None
    }

    /// Notes numbers a node of this lineage knows above what this replica serves after
    /// looking again: the database was put back to an older state (or the node lies, which
    /// [`MAX_AHEAD`] bounds). The next push and revocation are numbered above them.
    fn raise_floor(&self, known: (u64, u64), served: (u64, u64)) {
        let bounded = (
            known.0.min(served.0.saturating_add(MAX_AHEAD)),
            known.1.min(served.1.saturating_add(MAX_AHEAD)),
        );
        let mut f = self.floor.lock().expect("floor");
        let raised = (f.0.max(bounded.0), f.1.max(bounded.1));
        if raised != *f {
            *f = raised;
            self.stats.database_behind.store(1, Ordering::Relaxed);
            error!(
                node_version = known.0,
                node_generation = known.1,
                database_version = served.0,
                database_generation = served.1,
                "a node knows newer numbers than the database holds (restored from a backup?): it keeps what it has until a push or revocation numbered above them"
            );
        }
    }

    /// What a push (`.0`) and a revocation (`.1`) are numbered above: what this replica
    /// served and what nodes showed they know.
    fn number_above(&self) -> (u64, u64) {
        // Never more than MAX_AHEAD above what the database holds: a number served from a
        // database someone tampered with (a bundle numbered near the end of the numbers)
        // must not leave no number for the next push once the database is put right.
        let served = *self.changes.borrow();
        let f = *self.floor.lock().expect("floor");
        (
            served.0.max(f.0.min(served.0.saturating_add(MAX_AHEAD))),
            served.1.max(f.1.min(served.1.saturating_add(MAX_AHEAD))),
        )
    }

    /// Writes the polls noted since the last flush.
    fn flush_seen(&self) -> Result<(), StoreError> {
        let batch: Vec<NodeSeen> = std::mem::take(&mut *self.seen.lock().expect("seen"))
            .into_values()
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.store.nodes_seen(&batch)
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/policy", get(get_policy).put(put_policy))
            .route("/v1/policy/proposals", get(get_proposals))
            .route("/v1/policy/approve", post(post_approve))
            .route("/v1/policy/versions", get(review::get_versions))
            .route("/v1/policy/diff", get(review::get_diff))
            .route("/v1/policy/simulate", post(review::post_simulate))
            .route("/v1/reports/unused", get(review::get_unused))
            .route("/v1/reports/grants", get(review::get_grants))
            .route("/v1/identities", get(review::get_identities))
            .route("/v1/nodes", get(get_nodes))
            .route("/v1/flows", get(get_flows))
            .route("/v1/shadow-ai", get(get_shadow_ai))
            .route("/v1/alerts", get(get_alerts))
            .route("/v1/audit/chain", get(get_audit_chain))
            .route(
                "/v1/revocations",
                get(get_revocations).post(post_revocation),
            )
            .route("/v1/metrics", get(get_metrics))
            .route(
                "/v1/identity-tokens",
                get(issuing::get_tokens)
                    .post(issuing::post_token)
                    .delete(issuing::delete_token),
            )
            .route("/v1/issuances", get(issuing::get_issuances))
            .route("/v1/node/svid", post(issuing::post_svid))
            .route("/v1/node/poll", post(node_poll))
            .route("/v1/node/reports", post(node_reports))
            .route("/v1/openapi.json", get(get_openapi))
            .route("/v1/console/links", post(console::make_link))
            .route(
                "/v1/console/sessions",
                axum::routing::delete(console::end_sessions),
            )
            .route("/ui", get(console::to_index))
            .route("/ui/", get(console::index))
            .route("/ui/app.js", get(console::app_js))
            .route("/ui/app.css", get(console::app_css))
            .route("/ui/uplot.js", get(console::uplot_js))
            .route("/ui/uplot.css", get(console::uplot_css))
            .route(
                "/ui/session",
                get(console::session)
                    .post(console::sign_in)
                    .delete(console::sign_out),
            )
            // Bodies are read only through `Capped`, under each route's own cap.
            .layer(DefaultBodyLimit::disable())
            .layer(axum::middleware::from_fn_with_state(self.clone(), gate))
            .with_state(self.clone())
    }

    /// Spends one of the caller's address's requests (a failed credential, a sign-in, an
    /// unknown cookie: where credentials are guessed); the refusal once they are spent.
    fn spend_address(&self, peer: &Peer) -> Option<Response> {
        let block = match peer.addr {
            Some(a) => caller_block(a.ip(), self.limits.ipv6_prefix_len).to_string(),
            None => "unknown".to_owned(),
        };
        let not_until = self.limiter.check_key(&format!("address:{block}")).err()?;
        let secs = retry_secs(&not_until);
        Some(self.too_many(
            Refusal::RateLimited,
            format!(
                "{block} made more than {} failed or anonymous requests a minute; try again in {secs} s",
                self.limits.requests_per_minute
            ),
            secs,
        ))
    }

    /// A 429 with `Retry-After` (at least 1 s), refused as `why`.
    fn too_many(&self, why: Refusal, message: String, secs: u64) -> Response {
        let mut r = self.refuse(why, Fail::new(StatusCode::TOO_MANY_REQUESTS, message));
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs.max(1)),
        );
        r
    }

    /// A refusal answered before the request was served: logged (a flood in samples) and
    /// counted; the connection is closed after the answer, so an unread body is never read.
    fn refuse(&self, why: Refusal, fail: Fail) -> Response {
        if self.stats.refused(why) {
            warn!(reason = why.label(), status = fail.0.as_u16(), error = %fail.1.error,
                "request refused");
        }
        closing(fail.into_response())
    }
}

/// The request's bearer token, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn closing(mut r: Response) -> Response {
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

/// The body limit of the route a request was let through to, for [`Capped`].
#[derive(Clone, Copy)]
struct BodyCap {
    cap: usize,
    timeout: Duration,
    route: &'static RouteRule,
}

/// Runs before every handler, from the request head alone: the route must exist, the caller
/// must hold one of its roles and be within its rate, and a declared body must fit the
/// route's cap. Anything else is answered at once and the connection closed.
async fn gate(
    State(s): S,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let console_off = s.console_secs.load(Ordering::Relaxed) == 0;
    let Some(rule) = ROUTES
        .iter()
        .find(|r| r.method == method && r.path == path)
        .filter(|r| !(console_off && r.path.starts_with("/ui")))
    else {
        let known = ROUTES
            .iter()
            .any(|r| r.path == path && !(console_off && r.path.starts_with("/ui")));
        return s.refuse(
            Refusal::NoSuchRoute,
            if known {
                Fail::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{path} does not take {method} (see the README's API table)"),
                )
            } else {
                Fail::new(
                    StatusCode::NOT_FOUND,
                    "no such route (see the README's API table)",
                )
            },
        );
    };
    let route = format!("{method} {path}");
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
    let changes = !matches!(method, Method::GET | Method::HEAD);
    if changes && let Some(why) = console::cross_site(req.headers()) {
        return s.refuse(Refusal::CrossSite, Fail::new(StatusCode::FORBIDDEN, why));
    }
    // A certificate revoked (or expired) since the handshake loses its connection now.
    if let (Some(v), Some(chain)) = (s.verifier.get(), peer.chain.as_deref())
        && let Some((ee, rest)) = chain.split_first()
        && let Err(e) = rustls::server::danger::ClientCertVerifier::verify_client_cert(
            &**v,
            ee,
            rest,
            rustls::pki_types::UnixTime::now(),
        )
    {
        return s.refuse(
            Refusal::Unauthenticated,
            Fail::new(
                StatusCode::UNAUTHORIZED,
                format!("the client certificate is no longer valid: {e}"),
            ),
        );
    }
    if rule.roles.is_empty() {
        // Anyone's: the console's files, and its sign-in, whose guesses count against the
        // caller's address.
        if rule.rate_limited
            && let Some(r) = s.spend_address(&peer)
        {
            return r;
        }
        req.extensions_mut().insert(peer);
        return pass_on(&s, req, next, rule).await;
    }
    // A console session, when the request has no other credential.
    // (Not with the console off: turning it off ends what its cookies could do.)
    let signed = match console::cookie(req.headers()) {
        Some(id) if !console_off && peer.spiffe_id.is_none() && bearer(req.headers()).is_none() => {
            let (store, hash) = (s.store.clone(), sha256_hex(id.as_bytes()));
            // A value no sign-in could have given is unknown without asking the database.
            let found = if console::well_formed(id) {
                blocking(move || store.console_session(&hash)).await
            } else {
                Ok(None)
            };
            match found {
                Ok(Some(session)) if s.live(&session) => Some(console::Signed(Arc::new(session))),
                Ok(_) => {
                    if let Some(r) = s.spend_address(&peer) {
                        return r;
                    }
                    return s.refuse(
                        Refusal::Unauthenticated,
                        Fail::new(
                            StatusCode::UNAUTHORIZED,
                            "the console session has ended or expired; sign in again",
                        ),
                    );
                }
                Err(f) => return f.into_response(),
            }
        }
        _ => None,
    };
    if changes && let Some(console::Signed(session)) = &signed {
        let sent = req
            .headers()
            .get(console::CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Compared by hash: how long the comparison takes says nothing of the token.
        if sha256_hex(sent) != sha256_hex(session.csrf.as_bytes()) {
            return s.refuse(
                Refusal::CrossSite,
                Fail::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "a state-changing request signed in by the console's cookie must carry the session's {} header",
                        console::CSRF_HEADER
                    ),
                ),
            );
        }
    }
    let who = match s.allow(&peer, req.headers(), &route, rule.roles, signed.as_ref()) {
        Ok(p) => {
            if let Some(a) = peer.addr {
                s.known(a.ip());
            }
            // A caller with a role no longer counts against its address's cap: the cap is
            // for connections no one has vouched for, and several nodes behind one address
            // (a NAT, a shared /64) must not shut each other out. It counts against the
            // caller's own cap instead.
            if let Some(slot) = &peer.slot
                && !slot.vouched(&p.name)
            {
                return closing(s.too_many(
                    Refusal::CallerCap,
                    format!(
                        "{} holds {} connections already, its most; try again in 1 s",
                        p.name, s.limits.max_connections_per_caller
                    ),
                    1,
                ));
            }
            p
        }
        // `allow` has counted and logged it. Failures spend the caller's address's rate,
        // which sign-ins spend too: credentials are guessed at most that fast, on any route.
        Err(f) => {
            if let Some(r) = s.spend_address(&peer) {
                return r;
            }
            return closing(f.into_response());
        }
    };
    if rule.rate_limited
        && let Err(not_until) = s.limiter.check_key(&who.name)
    {
        let secs = retry_secs(&not_until);
        return s.too_many(
            Refusal::RateLimited,
            format!(
                "{} made more than {} requests a minute; try again in {secs} s",
                who.name, s.limits.requests_per_minute
            ),
            secs,
        );
    }
    req.extensions_mut().insert(who);
    if let Some(signed) = signed {
        req.extensions_mut().insert(signed);
    }
    let mut r = pass_on(&s, req, next, rule).await;
    // What the API answers is its callers' alone: no cache keeps it, no browser guesses
    // another type for it.
    let h = r.headers_mut();
    h.entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    h.entry(axum::http::header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(axum::http::HeaderValue::from_static("nosniff"));
    r
}

/// A request let through to its route: a declared body over the route's cap is refused
/// before a byte of it is read, the handler reads under the cap and the body timeout, and a
/// body refused (too large, too slow) ends the connection.
async fn pass_on(
    s: &Server,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
    rule: &'static RouteRule,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > rule.body_cap as u64) {
        return s.refuse(Refusal::TooLarge, too_large(rule, declared));
    }
    req.extensions_mut().insert(BodyCap {
        cap: rule.body_cap,
        timeout: Duration::from_secs(s.limits.body_timeout_secs),
        route: rule,
    });
    let r = next.run(req).await;
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => closing(r),
        _ => r,
    }
}

fn too_large(rule: &RouteRule, declared: Option<u64>) -> Fail {
    let what = match declared {
        Some(n) => format!("a body of {n} bytes"),
        None => "a body".to_owned(),
    };
    Fail::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        if rule.body_cap == 0 {
            format!(
                "{} {} takes no body; the request has {what}",
                rule.method, rule.path
            )
        } else {
            format!(
                "{} {} takes a body of at most {} bytes; the request has {what} over that",
                rule.method, rule.path, rule.body_cap
            )
        },
    )
}

/// A request body read under its route's cap and the body timeout ([`gate`] let it through
/// with both): over the cap is 413, too slow is 408. The body's bytes count against the
/// server's budget of body bytes in flight until the value is dropped: a body that finds no
/// room is answered 503 with Retry-After at once (load shed, not queued: a queue would hold
/// connections and their memory all the same).
struct Capped(
    axum::body::Bytes,
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
);

impl FromRequest<Arc<Server>> for Capped {
    type Rejection = Response;

    async fn from_request(
        req: axum::extract::Request,
        s: &Arc<Server>,
    ) -> Result<Self, Self::Rejection> {
        let Some(cap) = req.extensions().get::<BodyCap>().copied() else {
            return Err(Fail::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "route without a body cap",
            )
            .into_response());
        };
        // What the body may take: its declared length ([`gate`] checked it against the
        // cap), or the whole cap when it declares none.
        let claim = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(cap.cap)
            .min(cap.cap);
        let budget = match s
            .body_budget
            .clone()
            .try_acquire_many_owned(u32::try_from(claim.max(1)).unwrap_or(u32::MAX))
        {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(
                    Fail::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
                );
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let mut r = s.refuse(
                    Refusal::BodyBudget,
                    Fail::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the server is reading {} bytes of request bodies already; send this one again later",
                            s.limits.body_bytes_in_flight
                        ),
                    ),
                );
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(1u32),
                );
                return Err(r);
            }
        };
        match tokio::time::timeout(cap.timeout, axum::body::to_bytes(req.into_body(), cap.cap))
            .await
        {
            Ok(Ok(b)) => Ok(Capped(b, budget)),
            Ok(Err(e)) => {
                let over = std::error::Error::source(&e)
                    .is_some_and(|e| e.is::<http_body_util::LengthLimitError>())
                    || e.to_string().contains("length limit");
                Err(if over {
                    s.refuse(Refusal::TooLarge, too_large(cap.route, None))
                } else {
                    Fail::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
                        .into_response()
                })
            }
            Err(_) => Err(s.refuse(
                Refusal::BodyTimeout,
                Fail::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {} s", cap.timeout.as_secs()),
                ),
            )),
        }
    }
}

/// A query string read into `T`; one that does not fit is 400 with the API's JSON error
/// body, like every other refusal.
struct Params<T>(T);

impl<T: serde::de::DeserializeOwned, St: Send + Sync> axum::extract::FromRequestParts<St>
    for Params<T>
{
    type Rejection = Fail;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &St,
    ) -> Result<Self, Fail> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| Fail::new(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

/// What a replica serves to polls: built once per change, shared by every poll.
#[derive(Clone)]
struct Published {
    version: u64,
    /// The newest bundle, serialized.
    bundle: Option<Arc<serde_json::value::RawValue>>,
    revision: Option<String>,
    /// The newest bundle's signed `not_before`.
    not_before: Option<String>,
    /// The full bundle under it ([`super::signing::Signing::root`]).
    root: Option<String>,
    /// The database's lineage, once it has one (its first change).
    lineage: Option<Arc<str>>,
    generation: u64,
    /// Every revoked identity, as of `generation`.
    revoked: Arc<Vec<String>>,
}

fn bundle_json(b: &Bundle) -> Arc<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(b)
        .expect("bundles serialize")
        .into()
}

/// Report batches stored at once, from all nodes: the store has one writer.
const INGESTS_AT_ONCE: usize = 2;

type S = State<Arc<Server>>;

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ChainQuery {
    /// The node's SPIFFE ID.
    node: String,
}

/// What the control plane holds of a node's audit chain, checked record by record: changed
/// or forged records, seqs missing between the ones held, the head, and what the node itself
/// reported lost.
#[utoipa::path(get, path = "/v1/audit/chain", tag = "reports", params(ChainQuery),
    responses((status = 200, description = "The chain as held", body = super::chain::ChainReport),
        (status = 404, description = "No such node", body = ErrorBody)))]
async fn get_audit_chain(
    State(s): S,
    Params(q): Params<ChainQuery>,
) -> Result<Json<super::chain::ChainReport>, Fail> {
    let store = s.store.clone();
    let node = q.node.clone();
    let report = blocking(move || {
        s.flush_seen()?;
        let mut check = super::chain::ChainCheck::new(&node);
        Ok(store
            .audit_chain(&node, &mut check)?
            .then(|| check.finish()))
    })
    .await?;
    report.map(Json).ok_or_else(|| {
        Fail::new(
            StatusCode::NOT_FOUND,
            format!("no node {:?} is known to this control plane", q.node),
        )
    })
}

/// The verdicts decision records carry.
const VERDICTS: [&str; 5] = ["deny", "audit", "unknown", "socket-deny", "allow"];

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            // What failed is the log's to say, not a caller's to read.
            error!(error = %e, "a request's work failed");
            Fail::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request failed inside the control plane (logged there)",
            )
        })?
        .map_err(Fail::from)
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct VersionQuery {
    /// A bundle version (default: the newest).
    version: Option<u64>,
}

/// A policy bundle: the newest, or the version asked for.
#[utoipa::path(get, path = "/v1/policy", tag = "policy", params(VersionQuery),
    responses((status = 200, description = "The bundle", body = Bundle),
        (status = 404, description = "No such version, or nothing pushed yet", body = ErrorBody)))]
async fn get_policy(State(s): S, Params(q): Params<VersionQuery>) -> Result<Json<Bundle>, Fail> {
    let store = s.store.clone();
    match blocking(move || store.policy(q.version)).await? {
        Some(b) => Ok(Json(b)),
        None => Err(Fail::new(
            StatusCode::NOT_FOUND,
            match q.version {
                Some(v) => format!("no policy version {v}"),
                None => "no policy has been pushed yet".to_owned(),
            },
        )),
    }
}

/// Pushes a policy bundle: validated whole with the node's own parser, stored as the next
/// version, and sent to every node's long-poll; or, signed by fewer than
/// `approvals_required` signers, stored as a proposal for others to approve.
#[utoipa::path(put, path = "/v1/policy", tag = "policy", request_body = PushRequest,
    responses((status = 200, description = "Stored as the next version", body = Bundle),
        (status = 202, description = "Stored as a proposal awaiting approvals", body = super::Pushed),
        (status = 400, description = "A signature or time that does not check; nothing stored", body = ErrorBody),
        (status = 409, description = "`base_version` is not the newest version: another was pushed since; nothing stored", body = ErrorBody),
        (status = 422, description = "Invalid; nothing stored: every problem, by file, line and column", body = ErrorBody)))]
async fn put_policy(
    State(s): S,
    Extension(who): Extension<Principal>,
    Capped(body, _budget): Capped,
) -> Result<Response, Fail> {
    let req: PushRequest = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not a policy bundle ({{\"files\": [{{\"name\", \"text\"}}]}}): {e}"),
        )
    })?;
    let files = req.files;
    let mut signing = req.signing;
    let require_owner = s.require_owner.load(Ordering::Relaxed);
    let (files, checked) = tokio::task::spawn_blocking(move || {
        let r = super::validate(&files).and_then(|set| {
            let mut bad = if require_owner {
                super::unowned(&set)
            } else {
                Vec::new()
            };
            // A grant is checked against this clock here, and against the signed
            // not_before at the nodes: one lasting a year would be a standing rule.
            bad.extend(super::grants_ending_too_late(
                &set,
                time::OffsetDateTime::now_utc(),
            ));
            if bad.is_empty() { Ok(set) } else { Err(bad) }
        });
        (files, r)
    })
    .await
    .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let set = match checked {
        Ok(set) => set,
        Err(errors) => {
            warn!(principal = %who.name, problems = errors.len(), "policy push rejected");
            return Err(Fail(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorBody {
                    error: format!(
                        "the bundle is invalid ({} problem(s)); nothing was stored",
                        errors.len()
                    ),
                    errors,
                },
            ));
        }
    };
    let required = s.signed_as_asked(&set.digest, &mut signing)?;
    let store = s.store.clone();
    let by = who.name.clone();
    let revision = set.revision.clone();
    // Break-glass: signed by enough for it, and only adding break-glass grants to the
    // newest bundle (the one the push names as its base, so nothing came between).
    let mut break_glass = None;
    if signing.signatures.len() < required
        && let Some(n) = s.break_glass_approvals()
        && signing.signatures.len() >= n
        && let Some(base) = req.base_version
    {
        let st = store.clone();
        let newest = blocking(move || st.policy(None)).await?;
        if let Some(b) = newest.filter(|b| b.version == base) {
            let before: Vec<(String, String)> =
                b.files.into_iter().map(|f| (f.name, f.text)).collect();
            match crate::policy::grant::break_glass_addition(
                &before,
                &set,
                time::OffsetDateTime::now_utc(),
            ) {
                Ok(grants) => break_glass = Some(grants),
                Err(e) => {
                    info!(principal = %who.name, why = %e, "not a break-glass bundle: it awaits approvals")
                }
            }
        }
    }
    if signing.signatures.len() < required && break_glass.is_none() {
        let proposal = blocking(move || store.propose(&revision, &files, &by, &signing)).await?;
        info!(principal = %who.name, proposal = proposal.id, revision = %proposal.revision,
            signatures = proposal.signing.signatures.len(), approvals_required = required,
            "policy proposed: it awaits approvals");
        return Ok((
            StatusCode::ACCEPTED,
            Json(super::Pushed::Proposal {
                proposal: super::Proposal {
                    files: Vec::new(),
                    ..proposal
                },
                approvals_required: required,
            }),
        )
            .into_response());
    }
    let (above, base) = (s.number_above().0, req.base_version);
    let bundle =
        blocking(move || store.push_policy(&revision, &files, &by, above, base, &signing)).await?;
    info!(principal = %who.name, version = bundle.version, revision = %bundle.revision,
        identities = set.agents.len(), signatures = bundle.signing.signatures.len(), "policy pushed");
    if let Some(grants) = &break_glass {
        warn!(principal = %who.name, version = bundle.version, grants = ?grants,
            signatures = bundle.signing.signatures.len(), approvals_required = required,
            "break-glass grants published ahead of the approvals a bundle needs; review them (cp report grants)");
    }
    s.publish(Some(&bundle), None);
    let s2 = s.clone();
    blocking(move || s2.settle()).await?;
    Ok(Json(bundle).into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ProposalQuery {
    /// One proposal, with its files (default: the newest 1,000, without files).
    id: Option<u64>,
}

/// Pushes awaiting approvals, and those approved (with the version they became).
#[utoipa::path(get, path = "/v1/policy/proposals", tag = "policy", params(ProposalQuery),
    responses((status = 200, description = "Proposals, newest first", body = Vec<super::Proposal>),
        (status = 404, description = "No such proposal", body = ErrorBody)))]
async fn get_proposals(
    State(s): S,
    Params(q): Params<ProposalQuery>,
) -> Result<Json<Vec<super::Proposal>>, Fail> {
    let store = s.store.clone();
    Ok(Json(
        blocking(move || match q.id {
            Some(id) => store
                .proposal(id)?
                .map(|p| vec![p])
                .ok_or(StoreError::NoProposal(id)),
            None => store.proposals(),
        })
        .await?,
    ))
}

/// One more signer's approval of a proposal: its signature, checked against the signers'
/// keys. The approval that brings it to `approvals_required` publishes it as the next
/// bundle version.
#[utoipa::path(post, path = "/v1/policy/approve", tag = "policy", request_body = super::Approval,
    responses((status = 200, description = "The bundle published, or the proposal still awaiting approvals", body = super::Pushed),
        (status = 400, description = "The signature does not check", body = ErrorBody),
        (status = 404, description = "No such proposal", body = ErrorBody),
        (status = 409, description = "Approved already, signed by this key already, expired, or older than the bundle in force", body = ErrorBody)))]
async fn post_approve(
    State(s): S,
    Extension(who): Extension<Principal>,
    Capped(body, _budget): Capped,
) -> Result<Json<super::Pushed>, Fail> {
    let req: super::Approval = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not an approval ({{\"id\", \"signature\"}}): {e}"),
        )
    })?;
    let store = s.store.clone();
    let p = blocking(move || {
        store
            .proposal(req.id)?
            .ok_or(StoreError::NoProposal(req.id))
    })
    .await?;
    let (keyring, required) = s.signers();
    let mut signature = req.signature;
    // What is signed is the whole hash of the proposal's files, worked out here.
    let files = p.files.clone();
    let digest = blocking(move || {
        Ok(super::validate(&files)
            .map(|set| set.digest)
            .unwrap_or_default())
    })
    .await?;
    keyring
        .check_one(&digest, &p.signing, &signature)
        .and_then(|()| p.signing.dated_sanely(time::OffsetDateTime::now_utc()))
        .map_err(|e| Fail::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    signature.signer = keyring
        .name_of(&signature.key)
        .unwrap_or_default()
        .to_owned();
    s.current(&p.signing)?;
    let (store, above, signer) = (
        s.store.clone(),
        s.number_above().0,
        signature.signer.clone(),
    );
    let (proposal, bundle) =
        blocking(move || store.approve(p.id, &signature, required, above)).await?;
    info!(principal = %who.name, proposal = proposal.id, signer = %signer,
        signatures = proposal.signing.signatures.len(), approvals_required = required,
        "policy proposal approved");
    let Some(bundle) = bundle else {
        return Ok(Json(super::Pushed::Proposal {
            proposal: super::Proposal {
                files: Vec::new(),
                ..proposal
            },
            approvals_required: required,
        }));
    };
    info!(version = bundle.version, revision = %bundle.revision, proposal = proposal.id,
        "policy published: its approvals are complete");
    s.publish(Some(&bundle), None);
    let s2 = s.clone();
    blocking(move || s2.settle()).await?;
    Ok(Json(super::Pushed::Bundle(bundle)))
}

/// Every node that has polled, with the bundle it applied.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, description = "The nodes", body = Vec<super::NodeInfo>)))]
async fn get_nodes(State(s): S) -> Result<Json<Vec<super::NodeInfo>>, Fail> {
    let s2 = s.clone();
    Ok(Json(
        blocking(move || {
            s2.flush_seen()?;
            s2.store.nodes()
        })
        .await?,
    ))
}

/// RFC 3339 as the records write it (UTC, milliseconds), so text order is time order.
fn normal_time(what: &str, s: &str) -> Result<String, Fail> {
    crate::clock::parse_rfc3339(s)
        .map(|t| crate::clock::rfc3339(t.into()))
        .map_err(|e| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                format!("{what} {s:?} is not an RFC 3339 time (2026-11-23T10:00:00Z): {e}"),
            )
        })
}

/// Stored records, filtered, a page at a time; with `format=ocsf`, as OCSF events.
#[utoipa::path(get, path = "/v1/flows", tag = "reports", params(FlowQuery),
    responses((status = 200, description = "A page of records (an OcsfPage with format=ocsf)", body = super::FlowPage)))]
async fn get_flows(State(s): S, Params(mut q): Params<FlowQuery>) -> Result<Response, Fail> {
    let ocsf = match q.format.as_deref() {
        None => false,
        Some("ocsf") => true,
        Some(f) => {
            return Err(Fail::new(
                StatusCode::BAD_REQUEST,
                format!("format {f:?} is not ocsf (leave it out for the stored records)"),
            ));
        }
    };
    if let Some(t) = &q.since {
        q.since = Some(normal_time("since", t)?);
    }
    if let Some(t) = &q.until {
        q.until = Some(normal_time("until", t)?);
    }
    if let Some(d) = &q.dest {
        // Stored as the address's canonical text.
        let ip: std::net::IpAddr = d.parse().map_err(|_| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                format!("dest {d:?} is not an IP address"),
            )
        })?;
        q.dest = Some(ip.to_string());
    }
    if let Some(v) = &q.verdict
        && !VERDICTS.contains(&v.as_str())
    {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            format!("verdict {v:?} is not one of {}", VERDICTS.join(", ")),
        ));
    }
    if let Some(l) = q.limit
        && !(1..=10_000).contains(&l)
    {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            format!("limit {l} is outside 1..=10000"),
        ));
    }
    let store = s.store.clone();
    // The page is read, mapped and written out off the async workers: an OCSF page is
    // mapped event by event from the stored text, so what it holds is its answer's bytes.
    let body = blocking(move || {
        let page = store.flows(&q)?;
        if !ocsf {
            return Ok(serde_json::to_vec(&page).expect("pages serialize"));
        }
        let mut counted = crate::ocsf::Exported::default();
        let events = page
            .flows
            .iter()
            .filter_map(|f| {
                let at = crate::ocsf::Origin::Stored {
                    node: &f.node,
                    id: f.id,
                };
                let e = counted.map(&f.record, at)?;
                Some(serde_json::value::to_raw_value(&e).expect("events serialize"))
            })
            .collect();
        Ok(serde_json::to_vec(&super::OcsfPage {
            events,
            not_mapped: counted.not_mapped,
            next: page.next,
        })
        .expect("pages serialize"))
    })
    .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SinceQuery {
    /// RFC 3339 (UTC): records at or after.
    since: Option<String>,
}

/// Unknown flows to AI services, grouped per node by unit, container or executable, with a
/// suggested policy for each group.
#[utoipa::path(get, path = "/v1/shadow-ai", tag = "reports", params(SinceQuery),
    responses((status = 200, description = "Per node", body = Vec<NodeShadowAi>)))]
async fn get_shadow_ai(
    State(s): S,
    Params(q): Params<SinceQuery>,
) -> Result<Json<Vec<NodeShadowAi>>, Fail> {
    let since = since_param(q.since.as_deref())?;
    let store = s.store.clone();
    let out = blocking(move || {
        // Folded a page at a time: memory grows with what is distinct, not with the records.
        let mut by_node: std::collections::BTreeMap<String, crate::discovery::ShadowFold> =
            Default::default();
        let mut after = None;
        loop {
            let page = store.flows(&FlowQuery {
                verdict: Some("unknown".into()),
                tagged: true,
                since: since.clone(),
                after,
                limit: Some(10_000),
                ..FlowQuery::default()
            })?;
            for f in page.flows {
                // Read from the stored text: only the fields the fold looks at.
                if let Some(r) = crate::audit::RecordView::parse(f.record.get()) {
                    by_node.entry(f.node.clone()).or_default().add(&r);
                }
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let mut about: HashMap<String, super::NodeInfo> = if by_node.is_empty() {
            HashMap::new()
        } else {
            store
                .nodes()?
                .into_iter()
                .filter(|n| by_node.contains_key(&n.node))
                .map(|n| (n.node.clone(), n))
                .collect()
        };
        Ok(by_node
            .into_iter()
            .map(|(node, fold)| {
                let (owner, labels) = about
                    .remove(&node)
                    .map(|n| (n.owner, n.labels))
                    .unwrap_or_default();
                NodeShadowAi {
                    node,
                    owner,
                    labels,
                    records_left_out: fold.left_out(),
                    groups: fold.finish(),
                }
            })
            .filter(|n| !n.groups.is_empty())
            .collect())
    })
    .await?;
    Ok(Json(out))
}

/// This process as the leases of syslog forwarding and alerts name it: its host, pid and
/// start time, so no two replicas (nor one restarted) take each other for themselves.
fn replica_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}-{}-{started}", host.trim(), std::process::id())
    })
}

/// A store call off the async workers, for background tasks: its failure as text.
async fn store_call<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the store call panicked: {e}")),
    }
}

/// A `since` query parameter, checked and made UTC.
fn since_param(since: Option<&str>) -> Result<Option<String>, Fail> {
    since.map(|t| normal_time("since", t)).transpose()
}

/// Most alerts one answer lists (the newest).
const MAX_ALERTS: usize = 1_000;

/// The alerts raised, oldest first (at most the newest 1,000), and the thresholds that
/// raise them.
#[utoipa::path(get, path = "/v1/alerts", tag = "reports", params(SinceQuery),
    responses((status = 200, description = "Alerts and thresholds", body = super::AlertsReply)))]
async fn get_alerts(
    State(s): S,
    Params(q): Params<SinceQuery>,
) -> Result<Json<super::AlertsReply>, Fail> {
    let since = since_param(q.since.as_deref())?;
    let store = s.store.clone();
    let mut alerts = blocking(move || {
        let mut out = std::collections::VecDeque::new();
        let mut q = FlowQuery {
            node: Some(alerts::ALERTS_NODE.into()),
            kind: Some("alert".into()),
            since,
            limit: Some(1_000),
            ..FlowQuery::default()
        };
        loop {
            let page = store.flows(&q)?;
            for f in page.flows {
                if let Some(v) = f.value() {
                    out.push_back(v);
                    if out.len() > MAX_ALERTS {
                        out.pop_front();
                    }
                }
            }
            match page.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        Ok(out)
    })
    .await?;
    let mut thresholds = s.alert_thresholds.get().cloned().unwrap_or_default();
    // Webhook URLs may carry a secret in their path or query: shown by host only.
    thresholds.webhooks = thresholds
        .webhooks
        .iter()
        .map(|w| {
            w.parse::<hyper::Uri>()
                .ok()
                .and_then(|u| Some(format!("{}://{}/…", u.scheme_str()?, u.authority()?)))
                .unwrap_or_else(|| "…".into())
        })
        .collect();
    Ok(Json(super::AlertsReply {
        thresholds,
        alerts: alerts.drain(..).collect(),
    }))
}

/// Every identity revoked fleet-wide.
#[utoipa::path(get, path = "/v1/revocations", tag = "revocations",
    responses((status = 200, description = "The revocations", body = Vec<super::Revocation>)))]
async fn get_revocations(State(s): S) -> Result<Json<Vec<super::Revocation>>, Fail> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.revocations()).await?.1))
}

/// Longest reason a revocation keeps, in characters.
const MAX_REASON: usize = 1024;

/// Revokes an identity on every node.
#[utoipa::path(post, path = "/v1/revocations", tag = "revocations", request_body = RevokeRequest,
    responses((status = 200, description = "Revoked; nodes learn it at their next poll", body = super::Revoked)))]
async fn post_revocation(
    State(s): S,
    Extension(who): Extension<Principal>,
    Capped(body, _budget): Capped,
) -> Result<Json<super::Revoked>, Fail> {
    let req: RevokeRequest = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not {{\"identity\": SPIFFE ID}}: {e}"),
        )
    })?;
    let id: crate::identity::AgentId = req.identity.parse().map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a SPIFFE ID: {e}", req.identity),
        )
    })?;
    let reason = match req.reason.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(r) if r.chars().count() > MAX_REASON => {
            return Err(Fail::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the reason has {} characters; at most {MAX_REASON}",
                    r.chars().count()
                ),
            ));
        }
        Some(r) => {
            if let Some(c) = r
                .chars()
                .find(|&c| c.is_control() || crate::policy::owner::is_hidden_format(c))
            {
                return Err(Fail::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the reason holds {:?} (U+{:04X}): control and invisible characters are refused",
                        c, c as u32
                    ),
                ));
            }
            Some(r.to_owned())
        }
    };
    let store = s.store.clone();
    let (ident, by) = (id.to_string(), who.name.clone());
    let above = s.number_above().1;
    let (generation, all) = blocking(move || {
        let generation = store.revoke(&ident, &by, reason.as_deref(), above)?;
        // The whole list once, for every poll that needs it.
        Ok((generation, store.fresh_revocations()?))
    })
    .await?;
    warn!(principal = %who.name, identity = %id, generation, "identity revoked fleet-wide");
    s.publish(None, Some(all));
    let s2 = s.clone();
    blocking(move || s2.settle()).await?;
    Ok(Json(super::Revoked {
        identity: id.to_string(),
        generation,
    }))
}

/// A node's long-poll: answered when a newer bundle or revocation exists, or after the poll
/// timeout with nothing new.
#[utoipa::path(post, path = "/v1/node/poll", tag = "node", request_body = PollRequest,
    responses((status = 200, description = "What is new (maybe nothing)", body = super::PollReply)))]
async fn node_poll(
    State(s): S,
    Extension(who): Extension<Principal>,
    Capped(body, _budget): Capped,
) -> Result<Response, Fail> {
    let req: PollRequest = serde_json::from_slice(&body)
        .map_err(|e| Fail::new(StatusCode::BAD_REQUEST, format!("body is not a poll: {e}")))?;
    s.seen.lock().expect("seen").insert(
        who.name.clone(),
        NodeSeen {
            node: who.name.clone(),
            at: crate::clock::now_rfc3339(),
            poll: req.clone(),
        },
    );
    // A node that knows another database's lineage knows numbers that say nothing here: it
    // is answered as a node that knows nothing (it takes this database's bundle and list).
    // A node that names no lineage (an older agentwall) is taken at its numbers.
    let lineage = s.published.read().expect("published").lineage.clone();
    // A lineage is 32 hex digits; anything else (a node given junk by whoever held the
    // control plane) is no lineage of ours: answered as another database's, so the node
    // takes this database's bundle and list and its lineage with them, never refused (a
    // refusal would keep the node away for good). Only a well-formed one is logged.
    let theirs = req
        .lineage
        .as_deref()
        .map(|l| super::is_lineage(l).then_some(l));
    let known = if theirs
        .is_none_or(|l| l.is_some_and(|l| lineage.as_deref().is_none_or(|ours| l == ours)))
    {
        (req.known_version, req.revocation_gen)
    } else {
        // Logged once for every 1,000 (the first included): a node may ask this every poll.
        if s.stats.polls_other_lineage.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
            warn!(node = %who.name, node_lineage = ?theirs.flatten(), lineage = ?lineage,
                "a node that knows another database: answered with this database's bundle and revocations");
        }
        (0, 0)
    };
    let s2 = s.clone();
    if let Some((status, why)) = tokio::task::spawn_blocking(move || s2.behind(known))
        .await
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    {
        if s.stats.refused(Refusal::Stale) {
            warn!(node = %who.name, reason = %why, "poll refused: this replica is behind");
        }
        return Err(Fail::new(status, why));
    }
    let mut rx = s.changes.subscribe();
    let wait = Duration::from_millis(req.wait_ms).min(s.poll_timeout);
    let deadline = tokio::time::Instant::now() + wait;
    let held = HeldPoll::new(&s, &who.name);
    let mut replaced = false;
    loop {
        rx.borrow_and_update();
        let p = s.published.read().expect("published").clone();
        let (version, generation) = (p.version, p.generation);
        // News is only what is newer. An answer sent anyway (news of the other number, the
        // end of the wait) carries the revocation list whenever the node's number differs
        // (it applies the list whatever its number: revocations only add up), and the bundle
        // when the node's is numbered as this one but is another (two pushes given one
        // number by a database put back). Never an older bundle.
        let news = version > known.0 || generation > known.1;
        if news || replaced || tokio::time::Instant::now() >= deadline {
            let revoked: &[String] = if generation != known.1 {
                &p.revoked
            } else {
                &[]
            };
            let other = version == known.0
                && req
                    .applied_revision
                    .as_deref()
                    .is_some_and(|r| Some(r) != p.revision.as_deref());
            let bundle = (version > known.0 || (version != 0 && other))
                .then_some(p.bundle)
                .flatten();
            let body = serde_json::to_vec(&PollReplyOut {
                version,
                bundle: bundle.as_deref(),
                revocation_gen: generation,
                revoked,
                replaced,
                lineage: lineage.as_deref(),
            })
            .expect("replies serialize");
            return Ok((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response());
        }
        tokio::select! {
            r = tokio::time::timeout_at(deadline, rx.changed()) => {
                if r.is_ok_and(|r| r.is_err()) {
                    return Err(Fail::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
                }
            }
            () = held.replaced.notified() => {
                // The same node polls again (a new connection): this one answers now, with
                // what there is, so a node holds one poll however many it opens.
                if s.stats.refused(Refusal::PollReplaced) {
                    warn!(node = %who.name, "a newer poll from the same node ended an older one");
                }
                replaced = true;
            }
        }
    }
}

/// A node storing a batch, taken off the nodes storing one when dropped.
struct Reporting<'a>(&'a Server, &'a str);

impl Drop for Reporting<'_> {
    fn drop(&mut self) {
        self.0.reporting.lock().expect("reporting").remove(self.1);
    }
}

/// A node's held long-poll, registered for as long as it lives: a newer poll of the same
/// node wakes it ([`HeldPoll::replaced`]) to answer at once.
struct HeldPoll<'a> {
    server: &'a Server,
    node: String,
    ticket: u64,
    replaced: Arc<tokio::sync::Notify>,
}

impl<'a> HeldPoll<'a> {
    fn new(server: &'a Server, node: &str) -> Self {
        let ticket = server.poll_tickets.fetch_add(1, Ordering::Relaxed) + 1;
        let replaced = Arc::new(tokio::sync::Notify::new());
        let older = server
            .polls
            .lock()
            .expect("polls")
            .insert(node.to_owned(), (ticket, replaced.clone()));
        match older {
            // notify_one keeps a permit if the older poll is not waiting at this instant.
            Some((_, older)) => older.notify_one(),
            None => {
                server.stats.polls_held.fetch_add(1, Ordering::Relaxed);
            }
        }
        Self {
            server,
            node: node.to_owned(),
            ticket,
            replaced,
        }
    }
}

impl Drop for HeldPoll<'_> {
    fn drop(&mut self) {
        let mut polls = self.server.polls.lock().expect("polls");
        if polls
            .get(&self.node)
            .is_some_and(|(t, _)| *t == self.ticket)
        {
            polls.remove(&self.node);
            self.server.stats.polls_held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The control plane's own counters, in the Prometheus text format.
#[utoipa::path(get, path = "/v1/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain", body = String)))]
async fn get_metrics(State(s): S) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    let st = &s.stats;
    let _ = writeln!(
        out,
        "# HELP agentwall_cp_refusals_total Requests and connections the control plane turned away, by reason.\n# TYPE agentwall_cp_refusals_total counter"
    );
    for r in Refusal::ALL {
        let _ = writeln!(
            out,
            "agentwall_cp_refusals_total{{reason=\"{}\"}} {}",
            r.label(),
            st.refusals[r as usize].load(Ordering::Relaxed)
        );
    }
    for (name, kind, help, v) in [
        (
            "agentwall_cp_connections",
            "gauge",
            "Connections open now.",
            st.connections.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_polls_held",
            "gauge",
            "Node long-polls held now (one per node at most).",
            st.polls_held.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_report_batches_in_progress",
            "gauge",
            "Report batches being received, decoded or stored now (one per node at most).",
            s.reporting.lock().expect("reporting").len() as u64,
        ),
        (
            "agentwall_cp_body_bytes_in_flight",
            "gauge",
            "Request body bytes being read or held now, out of limits.body_bytes_in_flight.",
            s.limits
                .body_bytes_in_flight
                .min(tokio::sync::Semaphore::MAX_PERMITS as u64)
                .saturating_sub(s.body_budget.available_permits() as u64),
        ),
        (
            "agentwall_cp_crl_reloads_total",
            "counter",
            "Times changed client CRL files were read and put in force.",
            st.crl_reloads.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_crl_reload_failures_total",
            "counter",
            "Times changed client CRL files could not be read (the last good CRLs stay in force).",
            st.crl_reload_failures.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_records_expired_total",
            "counter",
            "Records past retention_days, by this process: not stored when they arrived so, or removed since.",
            st.records_expired.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_records_over_size_total",
            "counter",
            "Records removed, by this process, to stay under retention_max_bytes.",
            st.records_over_size.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_retention_failures_total",
            "counter",
            "Retention passes that failed (retried a minute later).",
            st.retention_failures.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_retention_skipped_total",
            "counter",
            "Retention passes this replica left to another, which was removing records then.",
            st.retention_skipped.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_polls_other_lineage_total",
            "counter",
            "Polls from nodes that knew another database (a fresh one was put in place of theirs): answered with this database's bundle and revocations.",
            st.polls_other_lineage.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alert_failures_total",
            "counter",
            "Pages of records alerts could not be worked out for (the database away; retried).",
            st.alert_failures.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alerts_delivered_total",
            "counter",
            "Alerts webhooks took (2xx).",
            st.alerts_delivered.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alert_deliveries_failed_total",
            "counter",
            "Webhook posts of alerts that failed (retried with backoff up to a minute).",
            st.alert_deliveries_failed.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alerts_behind_records",
            "gauge",
            "Records stored that alerts have not been worked out for yet (by whichever replica holds the lease): above a page for long, the detector is stuck or its holder died.",
            st.alerts_behind.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alerts_following",
            "gauge",
            "Identities (each on its node) whose denial and DNS bursts this replica follows now.",
            st.alerts_following.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alerts_left_out_total",
            "counter",
            "Records of identities not followed for bursts: past 100,000 followed at once, or 10,000 on one node.",
            st.alerts_left_out.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_alerts_held_back_total",
            "counter",
            "Alerts not raised because one node raised alerts.per_minute of that kind within the minute (counted into the next one's evidence).",
            st.alerts_held_back.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_syslog_forwarded_total",
            "counter",
            "Events this replica sent to the syslog receiver (OCSF over RFC 5425).",
            st.syslog_forwarded.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_syslog_not_mapped_total",
            "counter",
            "Records syslog forwarding passed over: unreadable, or of no OCSF class.",
            st.syslog_not_mapped.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_syslog_failures_total",
            "counter",
            "Syslog forwarding attempts that failed (retried every 2 s; the records wait in the store).",
            st.syslog_failures.load(Ordering::Relaxed),
        ),
        (
            "agentwall_cp_database_behind",
            "gauge",
            "1 while the database holds older bundle or revocation numbers than this replica served or nodes know (put back to an older state).",
            st.database_behind.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP agentwall_cp_alerts_total Alerts this replica raised, by kind.\n# TYPE agentwall_cp_alerts_total counter"
    );
    for (kind, n) in alerts::KINDS.iter().zip(&st.alerts) {
        let _ = writeln!(
            out,
            "agentwall_cp_alerts_total{{kind=\"{kind}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// A poll's answer as sent: [`PollReply`] with the bundle as the bytes serialized once at
/// push time (a push wakes every node, and the bundle is the bulk of each answer).
#[derive(serde::Serialize)]
struct PollReplyOut<'a> {
    version: u64,
    bundle: Option<&'a serde_json::value::RawValue>,
    revocation_gen: u64,
    revoked: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replaced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    lineage: Option<&'a str>,
}

/// A batch of a node's records (gzip with `Content-Encoding: gzip`, or plain JSON). A batch
/// sent twice is stored once.
#[utoipa::path(post, path = "/v1/node/reports", tag = "node", request_body = ReportBatch,
    responses((status = 200, description = "Stored", body = Ingested),
        (status = 422, description = "A record of the batch cannot be stored (a field of the wrong type)", body = ErrorBody)))]
async fn node_reports(
    State(s): S,
    Extension(who): Extension<Principal>,
    req: axum::extract::Request,
) -> Response {
    match store_reports(&s, &who, req).await {
        Ok(ingested) => Json(ingested).into_response(),
        Err(Refused::Plain(f)) => f.into_response(),
        Err(Refused::Body(r)) => *r,
        Err(Refused::Later(f, secs)) => {
            let mut r = s.refuse(Refusal::RateLimited, f);
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(1)),
            );
            r
        }
    }
}

/// Why a report batch was not stored.
enum Refused {
    Plain(Fail),
    /// Answered while reading the body ([`Capped`]).
    Body(Box<Response>),
    /// Over a quota or already reporting: send it again in this many seconds.
    Later(Fail, u64),
}

/// Seconds until a quota has room, from a refusal of `governor`'s.
fn retry_secs(
    not_until: &governor::NotUntil<
        <governor::clock::DefaultClock as governor::clock::Clock>::Instant,
    >,
) -> u64 {
    use governor::clock::Clock as _;
    let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl Server {
    /// Takes `n` of `node`'s report quota `q` (records or bytes), or says when to come back
    /// (and refuses the node's batches from their heads until then).
    fn spend(
        &self,
        q: &Limiter,
        node: &str,
        n: usize,
        what: &str,
        per_minute: u64,
    ) -> Result<(), Refused> {
        let Some(n) = std::num::NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        let secs = match q.check_key_n(&node.to_owned(), n) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(not_until)) => retry_secs(&not_until),
            // More than the quota's burst: never storable; the batch caps keep this out.
            Err(_) => 60,
        };
        self.wait_until(node, secs);
        Self::over_quota(node, what, per_minute, secs)
    }

    /// Notes that `node` was told to send its reports again in `secs`: until then it is
    /// refused from the request head.
    fn wait_until(&self, node: &str, secs: u64) {
        let mut wait = self.report_wait.lock().expect("report waits");
        // Bounded: what has expired goes first, then (a flood of names) everything.
        if wait.len() >= KNOWN_PEERS {
            let now = std::time::Instant::now();
            wait.retain(|_, until| *until > now);
            if wait.len() >= KNOWN_PEERS {
                wait.clear();
            }
        }
        wait.insert(
            node.to_owned(),
            std::time::Instant::now() + Duration::from_secs(secs),
        );
    }

    /// Refused from the head: `node` was told to come back later, and it is not later yet.
    fn still_waiting(&self, node: &str) -> Option<u64> {
        let mut wait = self.report_wait.lock().expect("report waits");
        let until = *wait.get(node)?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            wait.remove(node);
            return None;
        }
        Some(left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }

    fn over_quota(node: &str, what: &str, per_minute: u64, secs: u64) -> Result<(), Refused> {
        Err(Refused::Later(
            Fail::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{node} reported more than {per_minute} {what} a minute; send this batch again in {} s",
                    secs.max(1)
                ),
            ),
            secs,
        ))
    }
}

/// A node's report batch: one at a time per node and within the node's quotas, both checked
/// from the request head before any byte of the body is read; then the body read within the
/// server's budget of bytes in flight, decoded under the batch bounds, charged to the
/// quotas and stored.
async fn store_reports(
    s: &Arc<Server>,
    who: &Principal,
    req: axum::extract::Request,
) -> Result<Ingested, Refused> {
    let gzip = req
        .headers()
        .get(axum::http::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    // One batch per node at a time, and few at once from all: a node cannot hold the
    // store's writer (or the server's memory) with batch after batch.
    if !s
        .reporting
        .lock()
        .expect("reporting")
        .insert(who.name.clone())
    {
        return Err(Refused::Later(
            Fail::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("a report batch from {} is already being stored", who.name),
            ),
            1,
        ));
    }
    let _reporting = Reporting(s, &who.name);
    let (records_a_minute, bytes_a_minute) = (
        u64::from(s.limits.node_records_per_minute),
        u64::from(s.limits.node_bytes_per_minute),
    );
    // A node a quota turned away is turned away again before it sends its body, until the
    // time it was given.
    if let Some(secs) = s.still_waiting(&who.name) {
        return Err(Refused::Later(
            Fail::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} is over its report quota ({records_a_minute} records and {bytes_a_minute} bytes a minute); send this batch again in {secs} s",
                    who.name
                ),
            ),
            secs,
        ));
    }
    let Capped(body, _budget) = Capped::from_request(req, s)
        .await
        .map_err(|r| Refused::Body(Box::new(r)))?;
    let _permit =
        s.ingests.acquire().await.map_err(|_| {
            Refused::Plain(Fail::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))
        })?;
    let (batch, bytes) = tokio::task::spawn_blocking(move || {
        ReportBatch::decode(&body, gzip).map_err(|e| {
            let status = if e.is_too_large() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            Fail::new(status, e.to_string())
        })
    })
    .await
    .map_err(|e| Refused::Plain(Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))?
    .map_err(|f| {
        let why = if f.0 == StatusCode::PAYLOAD_TOO_LARGE {
            Refusal::TooLarge
        } else {
            Refusal::BadBatch
        };
        if s.stats.refused(why) {
            warn!(node = %who.name, error = %f.1.error, "report batch refused");
        }
        // A batch that fails to decode costs the node a whole batch's bytes of its quota:
        // sending broken batches back to back would otherwise keep a core busy for free.
        let _ = s.spend(
            &s.byte_quota,
            &who.name,
            super::MAX_BATCH_BYTES as usize,
            "bytes",
            bytes_a_minute,
        );
        Refused::Plain(f)
    })?;
    // Each node's records and bytes a minute: one node cannot fill the store for all. A
    // batch over a quota is stored whole later (the node keeps it in its spool and sends it
    // again).
    let n = batch.records.len();
    s.spend(&s.byte_quota, &who.name, bytes, "bytes", bytes_a_minute)?;
    s.spend(&s.report_quota, &who.name, n, "records", records_a_minute)?;
    let store = s.store.clone();
    let node = who.name.clone();
    // The quotas again, shared by every replica on the database: a node that sends to
    // several replicas at once gets one quota, not one each.
    let shared = [
        Spend {
            kind: "records",
            n: n as u64,
            per_minute: records_a_minute,
            burst: records_a_minute.max(super::MAX_BATCH_RECORDS as u64),
        },
        Spend {
            kind: "bytes",
            n: bytes as u64,
            per_minute: bytes_a_minute,
            burst: bytes_a_minute.max(super::MAX_BATCH_BYTES),
        },
    ];
    let ingested = tokio::task::spawn_blocking(move || {
        if let Some(secs) = store.spend_shared(&node, &shared).map_err(Fail::from)? {
            return Ok(Err(secs));
        }
        store
            .ingest(&node, batch.epoch, &batch.records)
            .map(Ok)
            .map_err(|e| match e {
                // A record of the batch that cannot be stored (a field of the wrong type): 422,
                // which the node answers by sending the batch again in halves, down to that
                // record alone, and dropping it counted. A 400 (the whole body unreadable, or
                // a proxy's refusal) it retries as it is.
                StoreError::Corrupt(m) => Fail::new(StatusCode::UNPROCESSABLE_ENTITY, m),
                e => Fail::from(e),
            })
    })
    .await
    .map_err(|e| Refused::Plain(Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))?
    .map_err(|f| {
        if f.0 == StatusCode::UNPROCESSABLE_ENTITY && s.stats.refused(Refusal::BadBatch) {
            warn!(node = %who.name, error = %f.1.error, "report batch refused");
        }
        Refused::Plain(f)
    })?;
    let ingested = match ingested {
        Ok(i) => i,
        Err(secs) => {
            s.wait_until(&who.name, secs);
            return Err(Refused::Later(
                Fail::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{} is over its report quota across the control plane's replicas ({records_a_minute} records and {bytes_a_minute} bytes a minute); send this batch again in {} s",
                        who.name,
                        secs.max(1)
                    ),
                ),
                secs,
            ));
        }
    };
    tracing::debug!(node = %who.name, records = n, bytes, accepted = ingested.accepted,
        duplicates = ingested.duplicates, expired = ingested.expired, "reports ingested");
    s.stats
        .records_expired
        .fetch_add(ingested.expired, Ordering::Relaxed);
    Ok(ingested)
}

/// The API as an OpenAPI 3.1 document, derived from the handlers and wire types above (and
/// checked against [`ROUTES`] by a test, so the two cannot drift).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "agentwall control plane",
        description = "Admins push policy bundles, nodes long-poll for them and report records, security reads the reports. Every route authenticates from the request head (a client certificate or a bearer token) and names the roles that may use it; see the README's API table."
    ),
    paths(
        get_policy,
        put_policy,
        get_proposals,
        post_approve,
        review::get_versions,
        review::get_diff,
        review::post_simulate,
        review::get_unused,
        review::get_grants,
        review::get_identities,
        get_nodes,
        get_flows,
        get_shadow_ai,
        get_alerts,
        get_audit_chain,
        get_revocations,
        post_revocation,
        get_metrics,
        console::end_sessions,
        console::make_link,
        node_poll,
        node_reports,
        issuing::post_token,
        issuing::get_tokens,
        issuing::delete_token,
        issuing::get_issuances,
        issuing::post_svid,
        get_openapi
    ),
    modifiers(&Refusals)
)]
struct ApiDoc;

/// Adds what every route may answer besides its own results: the refusals [`gate`] and
/// [`Capped`] make, and the security schemes.
struct Refusals;

impl utoipa::Modify for Refusals {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{
            ContentBuilder, Ref, ResponseBuilder,
            security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
        };
        let refusal = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A client certificate whose SPIFFE ID the access list names".into(),
                ),
                extensions: None,
            },
        );
        let schema = <ErrorBody as utoipa::PartialSchema>::schema();
        components.schemas.insert("ErrorBody".into(), schema);
        api.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("client_certificate", Vec::<String>::new()),
        ]);
        for (path, item) in &mut api.paths.paths {
            for (method, op) in [
                (Method::GET, item.get.as_mut()),
                (Method::PUT, item.put.as_mut()),
                (Method::POST, item.post.as_mut()),
                (Method::DELETE, item.delete.as_mut()),
            ] {
                let Some(op) = op else { continue };
                let body = ROUTES
                    .iter()
                    .find(|r| r.method == method && r.path == path)
                    .is_some_and(|r| r.body_cap > 0);
                let mut add = vec![
                    ("400", "A malformed request (query or body)"),
                    (
                        "401",
                        "No credentials, both kinds, or a certificate no longer valid",
                    ),
                    ("403", "The caller holds none of the route's roles"),
                    (
                        "413",
                        "A body over the route's cap (or any body where the route takes none)",
                    ),
                    (
                        "429",
                        "Over the caller's rate or a node's report quota (Retry-After)",
                    ),
                    ("500", "The store failed"),
                ];
                if body {
                    add.extend([
                        ("408", "The body did not arrive within the body timeout"),
                        (
                            "503",
                            "No room in the budget of body bytes in flight (Retry-After)",
                        ),
                    ]);
                }
                for (code, what) in add {
                    op.responses
                        .responses
                        .entry(code.into())
                        .or_insert_with(|| refusal(what).into());
                }
            }
        }
    }
}

/// This API's OpenAPI 3.1 document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi()
}

/// The API document (OpenAPI 3.1).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object)))]
async fn get_openapi() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOC.get_or_init(|| {
        openapi()
            .to_pretty_json()
            .expect("the API document serializes")
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text.as_str(),
    )
        .into_response()
}

/// The TLS set-up: the server's certificate; client certificates verified against
/// `client_ca` and `client_crl` when presented (bearer-token callers present none). The
/// verifier is returned too, for the task that rereads the CRLs.
fn tls_config(
    cfg: &ServerConfig,
) -> Result<(Arc<rustls::ServerConfig>, Option<Arc<CrlWatchingVerifier>>), ServerError> {
    let (chain, key) = crate::pem::chain_and_key(&cfg.cert, &cfg.key)?;
    let provider = crate::identity::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let (builder, verifier) = if cfg.client_ca.is_empty() {
        (builder.with_no_client_auth(), None)
    } else {
        let roots = crate::pem::roots(cfg.client_ca.iter().map(PathBuf::as_path))?;
        let mut cas = Vec::new();
        for path in &cfg.client_ca {
            cas.extend(crate::pem::certs(path)?);
        }
        let verifier = Arc::new(CrlWatchingVerifier::new(
            roots,
            cas,
            &cfg.client_crl,
            !cfg.accept_expired_crl,
            cfg.crl_numbers().map(crate::identity::CrlNumbersFile),
        )?);
        (
            builder.with_client_cert_verifier(verifier.clone()),
            Some(verifier),
        )
    };
    let mut c = builder
        .with_single_cert(chain, key)
        .map_err(|e| crate::pem::PemError {
            path: cfg.key.clone(),
            message: format!("does not fit {}: {e}", cfg.cert.display()),
        })?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A resumed session skips the client-certificate verifier (CRLs and expiry): none.
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok((Arc::new(c), verifier))
}

/// How often a replica reads the database's heads without an announcement: the longest it
/// serves an older bundle or revocation list than the database holds, should one be missed.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Longest a replica answers polls without having read the database's heads; past it,
/// polls get 503 so nodes move to another replica.
const STALE: Duration = Duration::from_secs(15);

/// How far above what a replica serves a node's word may raise the numbers it gives
/// ([`Server::raise_floor`]): past any honest gap (pushes made after a backup), far from
/// the end of the numbers however often a lying node says so.
const MAX_AHEAD: u64 = 1 << 20;

/// How often records past the retention are looked for.
const RETAIN_EVERY: Duration = Duration::from_secs(60);

/// How often changed CRL files are looked for.
const CRL_CHECK: Duration = Duration::from_secs(1);

/// A connection's place under the caps, held as long as the connection lives.
struct ConnSlot {
    server: Arc<Server>,
    block: std::net::IpAddr,
    /// Still counted against its block's per-address cap (until a request with a role).
    per_address: std::sync::atomic::AtomicBool,
    /// The caller whose cap it counts against once vouched for.
    caller: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSlot")
            .field("block", &self.block)
            .finish()
    }
}

impl Server {
    /// A slot for a new connection from `addr`, or the cap it would pass.
    fn admit(self: &Arc<Self>, addr: std::net::IpAddr) -> Result<ConnSlot, Refusal> {
        let block = self.block_of(addr);
        let mut by_addr = self.conns.lock().expect("connections");
        let open = self.stats.connections.load(Ordering::Relaxed);
        if open >= self.max_connections as u64 {
            return Err(Refusal::ConnectionCap);
        }
        // The last quarter of the cap is kept for peers that made an authorized request
        // lately: connections from unknown addresses cannot shut nodes and admins out.
        let open_to_all = self.max_connections - self.max_connections / 4;
        if open >= open_to_all as u64 && !self.is_known(block) {
            return Err(Refusal::ConnectionCap);
        }
        let n = by_addr.entry(block).or_default();
        if *n >= self.limits.max_connections_per_address {
            return Err(Refusal::AddressCap);
        }
        *n += 1;
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        Ok(ConnSlot {
            server: self.clone(),
            block,
            per_address: std::sync::atomic::AtomicBool::new(true),
            caller: std::sync::OnceLock::new(),
        })
    }

    /// Notes that `addr` (its block) made an authorized request now.
    fn known(&self, addr: std::net::IpAddr) {
        let block = self.block_of(addr);
        let mut known = self.known.lock().expect("known peers");
        // Bounded: the oldest half goes when it is full.
        if known.len() >= KNOWN_PEERS {
            let mut times: Vec<std::time::Instant> = known.values().copied().collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            known.retain(|_, t| *t > cut);
        }
        known.insert(block, std::time::Instant::now());
    }

    fn is_known(&self, block: std::net::IpAddr) -> bool {
        self.known
            .lock()
            .expect("known peers")
            .get(&block)
            .is_some_and(|t| t.elapsed() < KNOWN_FOR)
    }

    fn block_of(&self, addr: std::net::IpAddr) -> std::net::IpAddr {
        caller_block(addr, self.limits.ipv6_prefix_len)
    }
}

/// Peer blocks remembered as authorized, at most.
const KNOWN_PEERS: usize = 65_536;
/// How long an authorized request keeps its peer block in the reserve.
const KNOWN_FOR: Duration = Duration::from_secs(3600);

/// What the per-address cap counts a peer under: an IPv4 address, or an IPv6 address's first
/// `v6_prefix` bits (one host is usually given a whole /64, and could open connections from
/// each address in it). An IPv4-mapped address is its IPv4 address.
fn caller_block(addr: std::net::IpAddr, v6_prefix: u8) -> std::net::IpAddr {
    match addr {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => {
                let keep = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
                std::net::Ipv6Addr::from(u128::from(v6) & mask).into()
            }
        },
        v4 => v4,
    }
}

impl ConnSlot {
    /// The connection made a request with a role, as `caller`: it leaves its block's
    /// per-address count for the caller's (it stays in the total). False when the caller
    /// holds its most already (the connection is then to be closed).
    fn vouched(&self, caller: &str) -> bool {
        if self.caller.get().is_none() {
            let mut by_caller = self.server.callers.lock().expect("callers");
            let n = by_caller.entry(caller.to_owned()).or_default();
            if *n >= self.server.limits.max_connections_per_caller {
                return false;
            }
            *n += 1;
            let _ = self.caller.set(caller.to_owned());
        }
        if self.per_address.swap(false, Ordering::Relaxed) {
            self.server.release_block(self.block);
        }
        true
    }
}

impl Server {
    fn release_block(&self, block: std::net::IpAddr) {
        let mut by_addr = self.conns.lock().expect("connections");
        if let Some(n) = by_addr.get_mut(&block) {
            *n -= 1;
            if *n == 0 {
                by_addr.remove(&block);
            }
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if *self.per_address.get_mut() {
            self.server.release_block(self.block);
        }
        if let Some(c) = self.caller.get() {
            let mut by_caller = self.server.callers.lock().expect("callers");
            if let Some(n) = by_caller.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    by_caller.remove(c);
                }
            }
        }
        self.server
            .stats
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections open at once when the configuration says nothing and the open-files limit
/// has room.
const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Serves until SIGTERM or SIGINT. `ready` gets the bound address once connections are
/// accepted.
pub async fn serve(cfg: ServerConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    // Every connection the caps let in needs a descriptor, and the server a few of its own.
    let files = crate::node::raise_fd_limit();
    let mut cfg = cfg;
    let room = usize::try_from(files.saturating_sub(64)).unwrap_or(usize::MAX);
    match cfg.limits.max_connections {
        Some(max) if max > room => return Err(ServerError::FdLimit { max, files }),
        Some(_) => {}
        None => {
            let max = DEFAULT_MAX_CONNECTIONS.min(room);
            if max == 0 {
                return Err(ServerError::NoRoomForConnections { files });
            }
            if max < DEFAULT_MAX_CONNECTIONS {
                warn!(
                    max_connections = max,
                    open_files = files,
                    "the open-files limit leaves room for fewer connections than the default"
                );
            }
            cfg.limits.max_connections = Some(max);
        }
    }
    let (tls, crl_verifier) = tls_config(&cfg)?;
    let forwarder = cfg
        .syslog
        .as_ref()
        .map(syslog::Forwarder::new)
        .transpose()?;
    let webhooks = cfg
        .alerts
        .webhooks
        .iter()
        .map(|u| alerts::Webhook::new(u, cfg.alerts.webhook_ca.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServerError::Webhook)?;
    let server = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let store: Arc<dyn Store> = super::store::open(&cfg)?.into();
            let server = Server::new(
                store,
                cfg.access.clone(),
                cfg.poll_timeout(),
                cfg.limits.clone(),
            )?;
            server.require_owners(cfg.require_owner);
            if let Some(ic) = &cfg.issuer {
                server.issue_with(super::issuer::Issuer::load(ic)?);
            }
            server.approvals(
                super::signing::Keyring::load(cfg.signers.clone())?,
                cfg.approvals_required as usize,
                cfg.break_glass_approvals.map(|n| n as usize),
            );
            server.alert_thresholds(cfg.alerts.clone());
            server.console(cfg.console.then_some(cfg.console_session_hours));
            // Turned off, the console's sessions and links end, not wait for it to be on.
            if !cfg.console {
                server.store.console_close_all(None)?;
            }
            if let Some(path) = cfg.served_numbers() {
                server.keep_served_in(path)?;
                server.settle()?;
            }
            Ok::<_, ServerError>(server)
        })
        .await
        .map_err(|e| ServerError::Tls(format!("opening the database: {e}")))??
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    if let Some(v) = &crl_verifier {
        let _ = server.verifier.set(v.clone());
    }
    let router = server.router();
    {
        let server = server.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let s = server.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.flush_seen()).await {
                    error!(error = %e, "recording node polls failed");
                }
            }
        });
    }
    {
        // Retention, a little at a time, off the request path.
        let server = server.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETAIN_EVERY);
            loop {
                tick.tick().await;
                let s = server.clone();
                let today = super::store::today();
                match tokio::task::spawn_blocking(move || s.store.retain(today)).await {
                    Ok(Ok(r)) => {
                        let st = &server.stats;
                        st.records_expired.fetch_add(r.expired, Ordering::Relaxed);
                        st.records_over_size
                            .fetch_add(r.over_size, Ordering::Relaxed);
                        if r.skipped {
                            server
                                .stats
                                .retention_skipped
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        if r.expired + r.over_size > 0 {
                            info!(
                                expired = r.expired,
                                over_size = r.over_size,
                                "stored records past the retention removed"
                            );
                        }
                    }
                    Ok(Err(e)) => {
                        server
                            .stats
                            .retention_failures
                            .fetch_add(1, Ordering::Relaxed);
                        error!(error = %e, "removing records past the retention failed; retried in a minute");
                    }
                    Err(e) => error!(error = %e, "retention panicked"),
                }
            }
        });
    }
    if let Some(f) = forwarder {
        tokio::spawn(f.run(server.clone()));
    }
    if cfg.alerts.enabled {
        tokio::spawn(alerts::detect(server.clone(), cfg.alerts.clone()));
        for hook in webhooks {
            tokio::spawn(alerts::deliver(server.clone(), hook));
        }
    }
    if let Some(mut heard) = server.store.changes() {
        // Replicas share the database: what another one stores is served here once it is
        // announced, and at the latest after CATCH_UP should an announcement be missed.
        let server = server.clone();
        tokio::spawn(async move {
            let mut failing: Option<String> = None;
            loop {
                if failing.is_none() {
                    tokio::select! {
                        r = heard.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(CATCH_UP) => {}
                    }
                }
                let s = server.clone();
                match tokio::task::spawn_blocking(move || s.catch_up()).await {
                    Ok(Ok(())) => failing = None,
                    Ok(Err(e)) => {
                        let text = e.to_string();
                        if failing.as_deref() != Some(text.as_str()) {
                            error!(error = %e, "reading other replicas' changes failed; retrying");
                            failing = Some(text);
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => error!(error = %e, "reading other replicas' changes panicked"),
                }
            }
        });
    }
    if let Some(v) = crl_verifier.filter(|_| !cfg.client_crl.is_empty()) {
        let server = server.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CRL_CHECK);
            let mut failing: Option<String> = None;
            loop {
                tick.tick().await;
                let v = v.clone();
                match tokio::task::spawn_blocking(move || v.refresh()).await {
                    Ok(Ok(true)) => {
                        failing = None;
                        server.stats.crl_reloads.fetch_add(1, Ordering::Relaxed);
                        info!("client CRLs reread: new handshakes use them");
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        // Counted at each try, logged when the reason changes.
                        server
                            .stats
                            .crl_reload_failures
                            .fetch_add(1, Ordering::Relaxed);
                        let text = e.to_string();
                        if failing.as_deref() != Some(text.as_str()) {
                            error!(error = %e, "client CRLs could not be reread: the last good ones stay in force");
                            failing = Some(text);
                        }
                    }
                    Err(e) => error!(error = %e, "client CRL reread panicked"),
                }
            }
        });
    }
    let limits = cfg.limits.clone();
    info!(%addr, database = %cfg.database, "control plane listening");
    // Handlers before readiness: a SIGTERM right after it stops the server cleanly.
    let signal = |k| tokio::signal::unix::signal(k).map_err(ServerError::Signal);
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    ready(addr);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, from) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: a pause, not a spin, and a log line now and
                    // then.
                    if server.stats.refused(Refusal::AcceptFailed) {
                        warn!(error = %e, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        // Over a cap the connection is closed before its handshake: it costs no TLS work.
        let slot = match server.admit(from.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                if server.stats.refused(why) {
                    warn!(peer = %from, reason = why.label(), max = server.max_connections,
                        max_per_address = limits.max_connections_per_address,
                        "connection refused: over the connection cap");
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let handshake = Duration::from_secs(limits.handshake_timeout_secs);
        let header = Duration::from_secs(limits.header_timeout_secs);
        let write = Duration::from_secs(limits.write_timeout_secs);
        let server = server.clone();
        let slot = Arc::new(slot);
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    if server.stats.refused(Refusal::HandshakeFailed) {
                        warn!(peer = %from, error = %e, "TLS handshake refused");
                    }
                    return;
                }
                Err(_) => {
                    if server.stats.refused(Refusal::HandshakeTimeout) {
                        warn!(peer = %from, "TLS handshake timed out");
                    }
                    return;
                }
            };
            // webpki has verified the chain; the SPIFFE ID names the caller.
            let certs = tls.get_ref().1.peer_certificates();
            let spiffe_id = certs
                .and_then(<[_]>::first)
                .and_then(|c| crate::identity::peer_from_cert(c).ok())
                .map(|p| p.id.to_string());
            let chain = certs.map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect()));
            let peer = Peer {
                spiffe_id,
                addr: Some(from),
                chain,
                slot: Some(slot),
            };
            // hyper has no write timeout: a client that stops reading would hold its slot.
            let mut io = tokio_io_timeout::TimeoutStream::new(tls);
            io.set_write_timeout(Some(write));
            if let Err(e) =
                crate::http::serve_connection(Box::pin(io), router, peer, true, Some(header)).await
            {
                let timed_out = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
                if timed_out && server.stats.refused(Refusal::WriteTimeout) {
                    warn!(peer = %from, "connection closed: the client stopped taking its answers");
                }
                tracing::debug!(peer = %from, error = %e, "connection ended");
            }
        });
    }
    let s = server.clone();
    let _ = tokio::task::spawn_blocking(move || s.flush_seen()).await;
    info!("control plane stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_document_names_every_route_and_only_those() {
        let doc = openapi();
        let mut documented = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (m, op) in [
                (Method::GET, &item.get),
                (Method::PUT, &item.put),
                (Method::POST, &item.post),
                (Method::DELETE, &item.delete),
                (Method::PATCH, &item.patch),
            ] {
                if let Some(op) = op {
                    documented.push(format!("{m} {path}"));
                    let codes: Vec<&String> = op.responses.responses.keys().collect();
                    for c in ["200", "401", "403", "429"] {
                        assert!(codes.iter().any(|k| *k == c), "{m} {path}: {codes:?}");
                    }
                }
            }
        }
        // The console's routes are its pages' own, not the API's.
        let mut routes: Vec<String> = ROUTES
            .iter()
            .filter(|r| r.path.starts_with("/v1/"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        documented.sort();
        routes.sort();
        assert_eq!(documented, routes);
        let text = doc.to_pretty_json().unwrap();
        assert!(text.contains("\"openapi\": \"3.1.0\""), "{}", &text[..200]);
    }

    #[test]
    fn an_ipv6_caller_is_counted_by_its_prefix() {
        let block = |a: &str| caller_block(a.parse().unwrap(), 64).to_string();
        assert_eq!(block("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(block("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_eq!(block("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(block("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(block("192.0.2.7"), "192.0.2.7");
        let by = |a: &str, n| caller_block(a.parse().unwrap(), n).to_string();
        assert_eq!(by("2001:db8:1:2:aaaa::1", 128), "2001:db8:1:2:aaaa::1");
        assert_eq!(by("2001:db8:1:2:aaaa::1", 48), "2001:db8:1::");
        assert_eq!(by("2001:db8:1:2:aaaa::1", 1), "::");
        assert_eq!(by("::ffff:192.0.2.7", 128), "192.0.2.7");
    }
}

/// The server's answers to nodes when its database was put back to an older state, driven
/// through the real poll handler on SQLite (one replica, restored from a copy and restarted).
#[cfg(test)]
mod restored {
    use super::*;
    use crate::control_plane::{BundleFile, PollReply, store::SqliteStore};

    fn server(path: &std::path::Path) -> Arc<Server> {
        let store =
            SqliteStore::open(path, crate::control_plane::store::Retention::default()).unwrap();
        Server::new(
            Arc::new(store),
            vec![],
            Duration::from_millis(300),
            Limits::default(),
        )
        .unwrap()
    }

    fn push(s: &Arc<Server>, rev: &str) -> u64 {
        let files = vec![BundleFile {
            name: "p.yaml".into(),
            text: format!("# {rev}"),
        }];
        let b = s
            .store
            .push_policy(
                rev,
                &files,
                "admin",
                s.number_above().0,
                None,
                &Default::default(),
            )
            .unwrap();
        s.publish(Some(&b), None);
        s.settle().unwrap();
        b.version
    }

    fn revoke(s: &Arc<Server>, id: &str) -> u64 {
        let g = s
            .store
            .revoke(id, "admin", None, s.number_above().1)
            .unwrap();
        s.publish(None, Some(s.store.revocations().unwrap()));
        s.settle().unwrap();
        g
    }

    /// A node's poll through the real handler (a node that applied `applied`).
    async fn poll(
        s: &Arc<Server>,
        known: (u64, u64),
        applied: Option<&str>,
        lineage: Option<&str>,
    ) -> PollReply {
        let req = PollRequest {
            known_version: known.0,
            revocation_gen: known.1,
            applied_revision: applied.map(str::to_owned),
            agent_version: "x".into(),
            wait_ms: 300,
            lineage: lineage.map(str::to_owned),
            ..PollRequest::default()
        };
        let r = send(s, &req).await;
        assert_eq!(r.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// `req` as node-1's poll, through the real handler.
    async fn send(s: &Arc<Server>, req: &PollRequest) -> Response {
        let body = axum::body::Bytes::from(serde_json::to_vec(req).unwrap());
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        node_poll(
            State(s.clone()),
            Extension(Principal {
                name: "node-1".into(),
            }),
            Capped(body, permit),
        )
        .await
        .unwrap_or_else(|f| f.into_response())
    }

    fn copy_db(from: &std::path::Path, to: &std::path::Path) {
        for ext in ["", "-wal", "-shm"] {
            let f = std::path::PathBuf::from(format!("{}{ext}", from.display()));
            let t = std::path::PathBuf::from(format!("{}{ext}", to.display()));
            let _ = std::fs::remove_file(&t);
            if f.exists() {
                std::fs::copy(&f, &t).unwrap();
            }
        }
    }

    /// Restored from last night's copy and restarted: a revocation made before any node
    /// polled is numbered below what nodes saw, and still reaches them (a list is applied
    /// whatever its number); the first poll teaches the server what nodes hold, and the next
    /// push is numbered above it. The lineage is the copy's: nodes are not reset to it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_restored_database_still_reaches_nodes_that_saw_more() {
        let dir = tempfile::tempdir().unwrap();
        let (db, backup) = (dir.path().join("cp.db"), dir.path().join("backup.db"));
        let s = server(&db);
        push(&s, "v1");
        revoke(&s, "spiffe://example.org/a");
        let lineage = s.published.read().unwrap().lineage.clone().unwrap();
        drop(s);
        copy_db(&db, &backup);
        let s = server(&db);
        push(&s, "v2");
        revoke(&s, "spiffe://example.org/b");
        revoke(&s, "spiffe://example.org/c");
        let r = poll(&s, (0, 0), None, Some(&lineage)).await;
        assert_eq!((r.version, r.revocation_gen), (2, 3));
        drop(s);

        copy_db(&backup, &db);
        let s = server(&db);
        assert_eq!(
            s.published.read().unwrap().lineage.as_deref(),
            Some(&*lineage)
        );
        let g = revoke(&s, "spiffe://example.org/compromised");
        assert_eq!(g, 2, "numbered before any node said what it holds");
        // The node at (2, 3), with v2 applied: not told to forget anything, but given the
        // list with the new revocation; no older bundle.
        let r = poll(&s, (2, 3), Some("v2"), Some(&lineage)).await;
        assert_eq!(r.lineage.as_deref(), Some(&*lineage));
        assert!(r.bundle.is_none(), "{r:?}");
        assert!(
            r.revoked
                .iter()
                .any(|i| i == "spiffe://example.org/compromised"),
            "{r:?}"
        );
        assert_eq!(s.number_above(), (2, 3));
        assert_eq!(s.stats.database_behind.load(Ordering::Relaxed), 1);
        // The next push is numbered above what the node holds, and reaches it.
        assert_eq!(push(&s, "v3-tightened"), 3);
        let r = poll(&s, (2, 3), Some("v2"), Some(&lineage)).await;
        assert_eq!(
            r.bundle.map(|b| (b.version, b.revision)),
            Some((3, "v3-tightened".to_owned()))
        );
    }

    /// A replica that keeps what it served (beside its database, or in `state_dir`)
    /// numbers above it after a restore, before any node has polled; a file it cannot read
    /// stops it, saying which.
    #[tokio::test(flavor = "multi_thread")]
    async fn what_was_served_is_kept_and_numbered_above_after_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let (db, backup) = (dir.path().join("cp.db"), dir.path().join("backup.db"));
        let kept = dir.path().join("state/served.json");
        let keeping = |db: &std::path::Path| {
            let s = server(db);
            s.keep_served_in(kept.clone()).unwrap();
            s
        };
        let s = keeping(&db);
        push(&s, "v1");
        revoke(&s, "spiffe://example.org/a");
        drop(s);
        copy_db(&db, &backup);
        let s = keeping(&db);
        push(&s, "v2");
        revoke(&s, "spiffe://example.org/b");
        revoke(&s, "spiffe://example.org/c");
        drop(s);
        copy_db(&backup, &db);
        let s = keeping(&db);
        assert_eq!(s.number_above(), (2, 3));
        assert_eq!(revoke(&s, "spiffe://example.org/compromised"), 4);
        assert_eq!(push(&s, "v3"), 3);
        drop(s);
        // Numbers served from another database say nothing of a fresh one's.
        let fresh = keeping(&dir.path().join("fresh.db"));
        assert_eq!(fresh.number_above(), (0, 0));
        assert_eq!(push(&fresh, "f1"), 1);
        drop(fresh);
        std::fs::write(&kept, "{").unwrap();
        let e = server(&db)
            .keep_served_in(kept.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}: ", kept.display()))
                && e.contains("remove the file to number from the database's alone"),
            "{e}"
        );
    }

    /// A replica still serving a bundle the database lost, under a number another push
    /// was given since, serves the database's once it catches up; a lineage that is not
    /// one is refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_lost_bundle_is_replaced_by_the_databases_of_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cp.db");
        let s1 = server(&db);
        push(&s1, "v1");
        assert_eq!(push(&s1, "a-lost"), 2);
        // The database loses it (a standby promoted without the last commit).
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("DELETE FROM policy WHERE version = 2", [])
            .unwrap();
        let s2 = server(&db);
        assert_eq!(push(&s2, "b-now"), 2);
        s1.catch_up().unwrap();
        assert_eq!(
            s1.published.read().unwrap().revision.as_deref(),
            Some("b-now")
        );
        let lineage = s1.published.read().unwrap().lineage.clone().unwrap();
        let r = poll(&s1, (2, 0), Some("a-lost"), Some(&lineage)).await;
        assert_eq!(r.bundle.map(|b| b.revision), Some("b-now".to_owned()));

        // A lineage that is none (junk a hostile control plane gave the node) is answered as
        // another database's, never refused: a refused poll would keep the node away.
        let req = PollRequest {
            known_version: 9,
            lineage: Some("\u{7f}".repeat(40)),
            ..PollRequest::default()
        };
        assert_eq!(send(&s1, &req).await.status(), StatusCode::OK);
        let r = poll(&s1, (9, 0), None, Some(&"\u{7f}".repeat(40))).await;
        assert_eq!(r.bundle.map(|b| b.revision), Some("b-now".to_owned()));
    }

    /// Two pushes given one number (one before the restore, one after, before any node
    /// polled): a node holding the other revision under that number is given this one.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_bundle_numbered_as_the_nodes_but_another_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let (db, backup) = (dir.path().join("cp.db"), dir.path().join("backup.db"));
        let s = server(&db);
        push(&s, "v1");
        let lineage = s.published.read().unwrap().lineage.clone().unwrap();
        drop(s);
        copy_db(&db, &backup);
        let s = server(&db);
        push(&s, "v2-lost");
        drop(s);
        copy_db(&backup, &db);
        let s = server(&db);
        assert_eq!(push(&s, "v2-after"), 2);
        let r = poll(&s, (2, 0), Some("v2-lost"), Some(&lineage)).await;
        assert_eq!(r.bundle.map(|b| b.revision), Some("v2-after".to_owned()));
        // A node that has it is not given it again.
        let r = poll(&s, (2, 0), Some("v2-after"), Some(&lineage)).await;
        assert!(r.bundle.is_none());
    }
}
