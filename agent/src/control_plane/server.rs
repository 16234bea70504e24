//! `agentwall control-plane serve`: HTTPS (rustls) in front of a [`Store`]. Nodes
//! authenticate with certificates, admins and security with certificates or bearer tokens;
//! every route names the roles that may use it and everything else is refused and logged.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Extension, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use sha2::Digest as _;
use tracing::{error, info, warn};

use crate::config::control_plane::{Access, CpConfigError, Role, ServerConfig};

use super::{
    Bundle, ErrorBody, FlowQuery, Ingested, NodeShadowAi, PollRequest, PushRequest, ReportBatch,
    RevokeRequest,
    store::{NodeSeen, SqliteStore, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] CpConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Who is asking: the verified certificate's SPIFFE ID and/or a bearer token.
#[derive(Clone, Debug, Default)]
struct Peer {
    spiffe_id: Option<String>,
    addr: Option<SocketAddr>,
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
    fn from(e: StoreError) -> Self {
        error!(error = %e, "storage failed");
        Fail::new(StatusCode::INTERNAL_SERVER_ERROR, format!("storage: {e}"))
    }
}

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub struct Server {
    store: Arc<dyn Store>,
    access: Vec<Access>,
    poll_timeout: Duration,
    /// (newest bundle version, revocation generation): long-polls wait on changes.
    changes: tokio::sync::watch::Sender<(u64, u64)>,
    /// The newest bundle, serialized once for every poll that gets it.
    latest: std::sync::RwLock<Option<Arc<serde_json::value::RawValue>>>,
    /// Polls not yet written to the store (written once a second, in one transaction).
    seen: Mutex<HashMap<String, NodeSeen>>,
}

impl Server {
    pub fn new(
        store: Arc<dyn Store>,
        access: Vec<Access>,
        poll_timeout: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let newest = store.policy(None)?;
        let (generation, _) = store.revocations()?;
        let (changes, _) =
            tokio::sync::watch::channel((newest.as_ref().map_or(0, |b| b.version), generation));
        let latest = newest.as_ref().map(bundle_json);
        Ok(Arc::new(Self {
            store,
            access,
            poll_timeout,
            changes,
            latest: std::sync::RwLock::new(latest),
            seen: Mutex::new(HashMap::new()),
        }))
    }

    fn roles_of(&self, peer: &Peer, token: Option<&str>) -> Vec<Role> {
        let token_hash = token.map(|t| sha256_hex(t.as_bytes()));
        self.access
            .iter()
            .filter(|a| {
                let by_cert = peer.spiffe_id.as_deref().is_some_and(|id| {
                    a.spiffe_ids.iter().any(|p| match p.strip_suffix("/*") {
                        Some(prefix) => id
                            .strip_prefix(prefix)
                            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
                        None => p == id,
                    })
                });
                let by_token = token_hash
                    .as_deref()
                    .is_some_and(|h| a.token_sha256.iter().any(|t| t.eq_ignore_ascii_case(h)));
                by_cert || by_token
            })
            .map(|a| a.role)
            .collect()
    }

    /// The caller, if it holds one of `roles`; a refusal (logged) otherwise.
    fn allow(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        route: &str,
        roles: &[Role],
    ) -> Result<Principal, Fail> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let name = match (&peer.spiffe_id, token) {
            (Some(id), _) => id.clone(),
            (None, Some(t)) => format!("token:{}", &sha256_hex(t.as_bytes())[..12]),
            (None, None) => {
                warn!(route, peer = ?peer.addr, "request refused: no client certificate and no bearer token");
                return Err(Fail::new(
                    StatusCode::UNAUTHORIZED,
                    "no credentials: present a client certificate or a bearer token",
                ));
            }
        };
        let held = self.roles_of(peer, token);
        if held.is_empty() {
            warn!(route, principal = %name, peer = ?peer.addr, "request refused: no role");
            return Err(Fail::new(
                StatusCode::FORBIDDEN,
                format!("{name} holds no role on this control plane"),
            ));
        }
        if !held.iter().any(|r| roles.contains(r)) {
            let needs: Vec<String> = roles.iter().map(Role::to_string).collect();
            let has: Vec<String> = held.iter().map(Role::to_string).collect();
            warn!(route, principal = %name, roles = %has.join(","), needs = %needs.join("|"),
                peer = ?peer.addr, "request refused: outside the caller's rights");
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
            .route("/v1/nodes", get(get_nodes))
            .route("/v1/flows", get(get_flows))
            .route("/v1/shadow-ai", get(get_shadow_ai))
            .route(
                "/v1/revocations",
                get(get_revocations).post(post_revocation),
            )
            .route("/v1/node/poll", post(node_poll))
            .route("/v1/node/reports", post(node_reports))
            .fallback(|| async {
                Fail::new(
                    StatusCode::NOT_FOUND,
                    "no such route (see the README's API table)",
                )
            })
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }
}

fn bundle_json(b: &Bundle) -> Arc<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(b)
        .expect("bundles serialize")
        .into()
}

/// Largest request body (a compressed report batch, a policy bundle).
const MAX_BODY: usize = 32 << 20;
/// Largest decompressed report batch.
const MAX_BATCH_BYTES: u64 = 256 << 20;

type S = State<Arc<Server>>;

/// The verdicts decision records carry.
const VERDICTS: [&str; 5] = ["deny", "audit", "unknown", "socket-deny", "allow"];

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(Fail::from)
}

#[derive(serde::Deserialize)]
struct VersionQuery {
    version: Option<u64>,
}

async fn get_policy(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Query(q): Query<VersionQuery>,
) -> Result<Json<Bundle>, Fail> {
    s.allow(
        &peer,
        &headers,
        "GET /v1/policy",
        &[Role::Admin, Role::Security],
    )?;
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

async fn put_policy(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Bundle>, Fail> {
    let who = s.allow(&peer, &headers, "PUT /v1/policy", &[Role::Admin])?;
    let req: PushRequest = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not a policy bundle ({{\"files\": [{{\"name\", \"text\"}}]}}): {e}"),
        )
    })?;
    let files = req.files;
    let (files, checked) = tokio::task::spawn_blocking(move || {
        let r = super::validate(&files);
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
    let store = s.store.clone();
    let by = who.name.clone();
    let revision = set.revision.clone();
    let bundle = blocking(move || store.push_policy(&revision, &files, &by)).await?;
    info!(principal = %who.name, version = bundle.version, revision = %bundle.revision,
        identities = set.agents.len(), "policy pushed");
    *s.latest.write().expect("latest") = Some(bundle_json(&bundle));
    s.changes.send_modify(|c| c.0 = bundle.version);
    Ok(Json(bundle))
}

async fn get_nodes(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Vec<super::NodeInfo>>, Fail> {
    s.allow(
        &peer,
        &headers,
        "GET /v1/nodes",
        &[Role::Admin, Role::Security],
    )?;
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

async fn get_flows(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    query: Result<Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<super::FlowPage>, Fail> {
    s.allow(
        &peer,
        &headers,
        "GET /v1/flows",
        &[Role::Admin, Role::Security],
    )?;
    let Query(mut q) = query.map_err(|e| Fail::new(StatusCode::BAD_REQUEST, e.body_text()))?;
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
    Ok(Json(blocking(move || store.flows(&q)).await?))
}

#[derive(serde::Deserialize)]
struct SinceQuery {
    since: Option<String>,
}

async fn get_shadow_ai(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Query(q): Query<SinceQuery>,
) -> Result<Json<Vec<NodeShadowAi>>, Fail> {
    s.allow(
        &peer,
        &headers,
        "GET /v1/shadow-ai",
        &[Role::Admin, Role::Security],
    )?;
    let since = q
        .since
        .as_deref()
        .map(|t| normal_time("since", t))
        .transpose()?;
    let store = s.store.clone();
    let out = blocking(move || {
        let mut by_node: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
            Default::default();
        let mut after = None;
        loop {
            let page = store.flows(&FlowQuery {
                verdict: Some("unknown".into()),
                since: since.clone(),
                after,
                limit: Some(10_000),
                ..FlowQuery::default()
            })?;
            for f in page.flows {
                by_node.entry(f.node).or_default().push(f.record);
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        Ok(by_node
            .into_iter()
            .map(|(node, records)| NodeShadowAi {
                node,
                groups: crate::discovery::shadow_ai(&records),
            })
            .filter(|n| !n.groups.is_empty())
            .collect())
    })
    .await?;
    Ok(Json(out))
}

async fn get_revocations(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Vec<super::Revocation>>, Fail> {
    s.allow(
        &peer,
        &headers,
        "GET /v1/revocations",
        &[Role::Admin, Role::Security],
    )?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.revocations()).await?.1))
}

async fn post_revocation(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Fail> {
    let who = s.allow(&peer, &headers, "POST /v1/revocations", &[Role::Admin])?;
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
    let store = s.store.clone();
    let (ident, by) = (id.to_string(), who.name.clone());
    let generation = blocking(move || store.revoke(&ident, &by)).await?;
    warn!(principal = %who.name, identity = %id, generation, "identity revoked fleet-wide");
    s.changes.send_modify(|c| c.1 = generation);
    Ok(Json(
        serde_json::json!({ "identity": id.to_string(), "generation": generation }),
    ))
}

async fn node_poll(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Fail> {
    let who = s.allow(&peer, &headers, "POST /v1/node/poll", &[Role::Node])?;
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
    let mut rx = s.changes.subscribe();
    let wait = Duration::from_millis(req.wait_ms).min(s.poll_timeout);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (version, generation) = *rx.borrow_and_update();
        let news =
            (version != 0 && version != req.known_version) || generation != req.revocation_gen;
        if news || tokio::time::Instant::now() >= deadline {
            let revoked: Vec<String> = if generation != req.revocation_gen {
                let store = s.store.clone();
                blocking(move || store.revocations())
                    .await?
                    .1
                    .into_iter()
                    .map(|r| r.identity)
                    .collect()
            } else {
                Vec::new()
            };
            let bundle = (version != 0 && version != req.known_version)
                .then(|| s.latest.read().expect("latest").clone())
                .flatten();
            let body = serde_json::to_vec(&PollReplyOut {
                version,
                bundle: bundle.as_deref(),
                revocation_gen: generation,
                revoked: &revoked,
            })
            .expect("replies serialize");
            return Ok((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response());
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            return Err(Fail::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
        }
    }
}

/// A poll's answer as sent: [`PollReply`] with the bundle as the bytes serialized once at
/// push time (a push wakes every node, and the bundle is the bulk of each answer).
#[derive(serde::Serialize)]
struct PollReplyOut<'a> {
    version: u64,
    bundle: Option<&'a serde_json::value::RawValue>,
    revocation_gen: u64,
    revoked: &'a [String],
}

async fn node_reports(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Ingested>, Fail> {
    let who = s.allow(&peer, &headers, "POST /v1/node/reports", &[Role::Node])?;
    let gzip = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let store = s.store.clone();
    let node = who.name.clone();
    let (n, ingested) = tokio::task::spawn_blocking(move || {
        let text = if gzip {
            use std::io::Read as _;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .take(MAX_BATCH_BYTES + 1)
                .read_to_end(&mut out)
                .map_err(|e| Fail::new(StatusCode::BAD_REQUEST, format!("gzip body: {e}")))?;
            if out.len() as u64 > MAX_BATCH_BYTES {
                return Err(Fail::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a batch decompresses to more than {MAX_BATCH_BYTES} bytes"),
                ));
            }
            out
        } else {
            body.to_vec()
        };
        let batch: ReportBatch = serde_json::from_slice(&text).map_err(|e| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                format!("body is not a report batch: {e}"),
            )
        })?;
        let r = store
            .ingest(&node, batch.epoch, &batch.records)
            .map_err(|e| match e {
                StoreError::Corrupt(m) => Fail::new(StatusCode::BAD_REQUEST, m),
                e => Fail::from(e),
            })?;
        Ok((batch.records.len(), r))
    })
    .await
    .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    tracing::debug!(node = %who.name, records = n, accepted = ingested.accepted,
        duplicates = ingested.duplicates, "reports ingested");
    Ok(Json(ingested))
}

/// The TLS set-up: the server's certificate; client certificates verified against
/// `client_ca` when presented (bearer-token callers present none).
fn tls_config(cfg: &ServerConfig) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let (chain, key) = crate::pem::chain_and_key(&cfg.cert, &cfg.key)?;
    let provider = crate::identity::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let builder = if cfg.client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let roots = crate::pem::roots(cfg.client_ca.iter().map(PathBuf::as_path))?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| ServerError::Tls(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut c = builder
        .with_single_cert(chain, key)
        .map_err(|e| crate::pem::PemError {
            path: cfg.key.clone(),
            message: format!("does not fit {}: {e}", cfg.cert.display()),
        })?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Serves until SIGTERM or SIGINT. `ready` gets the bound address once connections are
/// accepted.
pub async fn serve(cfg: ServerConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    let tls = tls_config(&cfg)?;
    let db = cfg.database.clone();
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || SqliteStore::open(&db))
            .await
            .map_err(|e| ServerError::Tls(format!("opening the database: {e}")))??,
    );
    let server = Server::new(store, cfg.access.clone(), cfg.poll_timeout())?;
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
    info!(%addr, database = %cfg.database.display(), "control plane listening");
    ready(addr);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServerError::Tls(format!("SIGTERM handler: {e}")))?;
    loop {
        let (tcp, from) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => { warn!(error = %e, "accept failed"); continue; }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        warn!(peer = %from, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        warn!(peer = %from, "TLS handshake timed out");
                        return;
                    }
                };
            // webpki has verified the chain; the SPIFFE ID names the caller.
            let spiffe_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first)
                .and_then(|c| crate::identity::peer_from_cert(c).ok())
                .map(|p| p.id.to_string());
            let peer = Peer {
                spiffe_id,
                addr: Some(from),
            };
            if let Err(e) = crate::http::serve_connection(tls, router, peer, true).await {
                tracing::debug!(peer = %from, error = %e, "connection ended");
            }
        });
    }
    let s = server.clone();
    let _ = tokio::task::spawn_blocking(move || s.flush_seen()).await;
    info!("control plane stopped");
    Ok(())
}
