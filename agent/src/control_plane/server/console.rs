//! The console: a browser's way into the API. Its pages are files inside the binary, served
//! under `/ui` on the API's own listener; they read and act through the same `/v1` routes,
//! with the same roles, signed in by a cookie this module hands out for a bearer token or a
//! client certificate.
//!
//! A cookie the browser sends on its own needs two guards the bearer token does not: a
//! state-changing request must carry the session's CSRF token in a header (which another
//! site cannot set), and the browser must say it came from this origin ([`cross_site`]).

use std::sync::Arc;

use axum::{
    Json,
    extract::{Extension, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use tracing::{info, warn};

use super::{Capped, Fail, Peer, Principal, Refusal, S, Server, blocking, sha256_hex};
use crate::{config::control_plane::Role, control_plane::store::ConsoleSession};

/// The session cookie. `__Host-` makes the browser keep it only as set over HTTPS for this
/// host and path `/`: no subdomain or plain-HTTP page can plant or shadow it.
pub(super) const COOKIE: &str = "__Host-agentwall-session";

/// The header a state-changing request signed in by cookie carries its CSRF token in.
pub(super) const CSRF_HEADER: &str = "x-agentwall-csrf";

const INDEX: &str = include_str!("../../../console/index.html");
const APP_JS: &str = include_str!("../../../console/app.js");
const APP_CSS: &str = include_str!("../../../console/app.css");
/// The chart library (uPlot, from the npm registry: agent/console/package-lock.json).
const UPLOT_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/uPlot.iife.min.js"));
const UPLOT_CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/uPlot.min.css"));

/// Where the console's pages may load from and send to: this origin only, scripts from its
/// files only (no inline code, so injected markup runs nothing), never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// A browser's signed-in session, as a request's extension (set by the gate).
#[derive(Clone, Debug)]
pub(super) struct Signed(pub Arc<ConsoleSession>);

/// Headers every console answer carries.
fn guarded(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    r
}

pub(super) async fn index() -> Response {
    guarded(INDEX.into_response(), "text/html; charset=utf-8")
}

pub(super) async fn app_js() -> Response {
    guarded(APP_JS.into_response(), "text/javascript; charset=utf-8")
}

pub(super) async fn app_css() -> Response {
    guarded(APP_CSS.into_response(), "text/css; charset=utf-8")
}

pub(super) async fn uplot_js() -> Response {
    guarded(UPLOT_JS.into_response(), "text/javascript; charset=utf-8")
}

pub(super) async fn uplot_css() -> Response {
    guarded(UPLOT_CSS.into_response(), "text/css; charset=utf-8")
}

/// `/ui` without the slash: the page's relative links need the directory.
pub(super) async fn to_index() -> Response {
    guarded(
        (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/ui/")]).into_response(),
        "text/plain; charset=utf-8",
    )
}

/// The session cookie's value, if the request has one.
pub(super) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// Refuses a state-changing request a browser says another site made: `Sec-Fetch-Site`
/// (every current browser sends it) must be this origin or the user's own action, and an
/// `Origin` must be this host. A browser presenting a client certificate sends it with
/// cross-site requests too, so this holds for every credential, not only the cookie.
/// Clients that are not browsers send neither header.
pub(super) fn cross_site(headers: &HeaderMap) -> Option<String> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        if !matches!(site, "same-origin" | "none") {
            return Some(format!(
                "a state-changing request from another site (Sec-Fetch-Site: {site}) is refused"
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin = origin.to_str().unwrap_or("?");
        if host.is_none_or(|h| origin != format!("https://{h}")) {
            return Some(format!(
                "a state-changing request from origin {origin:?} is refused: only this control plane's own pages may make one"
            ));
        }
    }
    None
}

/// Whether a cookie's value is of the form sessions are given in ([`random_hex`]).
pub(super) fn well_formed(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_hex() -> Result<String, Fail> {
    let b = crate::control_plane::random_bytes::<32>().ok_or_else(|| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the system's random source failed",
        )
    })?;
    Ok(hex::encode(b))
}

/// What `GET /ui/session` and a sign-in answer: enough for the pages to show who is signed
/// in, which actions to offer, and the CSRF token to send with them.
#[derive(serde::Serialize)]
pub(super) struct SessionView {
    signed_in: bool,
    principal: String,
    roles: Vec<Role>,
    csrf: String,
    expires: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    /// A bearer token; without it (or a link), the client certificate the browser presented.
    #[serde(default)]
    token: Option<String>,
    /// A one-time sign-in link's code.
    #[serde(default)]
    link: Option<String>,
}

/// How long a sign-in link lasts unused.
const LINK_MINUTES: i64 = 10;

/// The chain a certificate credential was verified with, as a session keeps it.
fn chain_of(credential: &str, peer: &Peer) -> Option<String> {
    credential.starts_with("cert:").then(|| {
        peer.chain
            .as_deref()
            .map(|c| c.iter().map(hex::encode).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    })
}

/// Largest client certificate chain (DER bytes) a console sign-in keeps.
const MAX_CHAIN_BYTES: usize = 16 << 10;

impl Server {
    /// Whether a stored session still lasts: before its expiry, and within the sign-in
    /// length configured now (shortening `console_session_hours` shortens sessions already
    /// given).
    pub(super) fn live(&self, session: &ConsoleSession) -> bool {
        let now = time::OffsetDateTime::now_utc();
        let by = |t: &str| crate::clock::parse_rfc3339(t).is_ok_and(|t| now < t);
        by(&session.expires)
            && crate::clock::parse_rfc3339(&session.created)
                .is_ok_and(|c| now < c + self.console_ttl())
    }

    /// The principal name and the people's roles (admin, security) a session's credential
    /// holds now (not when it signed in), and, for a certificate, whether the chain still
    /// verifies. A node's role is never a console session's: a cookie cannot poll or report.
    pub(super) fn session_roles(
        &self,
        session: &ConsoleSession,
    ) -> Result<(String, Vec<Role>), Fail> {
        let (name, mut roles) = self.credential_roles(session)?;
        roles.retain(|r| matches!(r, Role::Admin | Role::Security));
        Ok((name, roles))
    }

    fn credential_roles(&self, session: &ConsoleSession) -> Result<(String, Vec<Role>), Fail> {
        if let Some(hash) = session.credential.strip_prefix("token:") {
            return Ok((
                format!("token:{}", &hash[..hash.len().min(12)]),
                self.roles_of(None, Some(hash)),
            ));
        }
        if let Some(id) = session.credential.strip_prefix("cert:") {
            let chain: Vec<rustls::pki_types::CertificateDer<'static>> = session
                .chain
                .as_deref()
                .unwrap_or("")
                .lines()
                .filter_map(|l| hex::decode(l).ok())
                .map(rustls::pki_types::CertificateDer::from)
                .collect();
            let (Some(v), Some((ee, rest))) = (self.verifier.get(), chain.split_first()) else {
                return Err(Fail::new(
                    StatusCode::UNAUTHORIZED,
                    "the session's client certificate can no longer be checked; sign in again",
                ));
            };
            rustls::server::danger::ClientCertVerifier::verify_client_cert(
                &**v,
                ee,
                rest,
                rustls::pki_types::UnixTime::now(),
            )
            .map_err(|e| {
                Fail::new(
                    StatusCode::UNAUTHORIZED,
                    format!("the session's client certificate is no longer valid: {e}"),
                )
            })?;
            return Ok((id.to_owned(), self.roles_of(Some(id), None)));
        }
        Err(Fail::new(
            StatusCode::UNAUTHORIZED,
            "the session names no credential; sign in again",
        ))
    }

    fn view(&self, session: &ConsoleSession) -> Result<SessionView, Fail> {
        let (principal, roles) = self.session_roles(session)?;
        Ok(SessionView {
            signed_in: true,
            principal,
            roles,
            csrf: session.csrf.clone(),
            expires: session.expires.clone(),
        })
    }
}

/// `POST /ui/session`: signs a browser in with a bearer token (in the body) or the client
/// certificate it presented, for `console_session_hours`. Anything that holds no role is
/// refused without saying more.
pub(super) async fn sign_in(
    State(s): S,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Capped(body, _budget): Capped,
) -> Result<Response, Fail> {
    // A form on another site cannot send this type without the browser asking first (CORS),
    // which this server never allows: no one can be signed in as someone else by a page.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim() == "application/json")
        });
    if !json {
        return Err(Fail::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "sign in with a JSON body (Content-Type: application/json)",
        ));
    }
    let req: SignIn = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not {{\"token\": TEXT}} or {{}}: {e}"),
        )
    })?;
    let linked = match req.link.as_deref().map(str::trim) {
        Some(code) if !code.is_empty() => {
            let (store, hash) = (s.store.clone(), sha256_hex(code.as_bytes()));
            let taken = blocking(move || store.console_link_take(&hash)).await?;
            let Some(link) = taken else {
                s.stats.refused(Refusal::Unauthenticated);
                return Err(Fail::new(
                    StatusCode::UNAUTHORIZED,
                    "that sign-in link was used already, has expired, or never was",
                ));
            };
            Some(link)
        }
        _ => None,
    };
    let credential = match (req.token.as_deref().map(str::trim), &peer.spiffe_id) {
        _ if linked.is_some() => linked
            .as_ref()
            .map(|l| l.credential.clone())
            .unwrap_or_default(),
        (Some(t), _) if !t.is_empty() => format!("token:{}", sha256_hex(t.as_bytes())),
        (_, Some(id)) => format!("cert:{id}"),
        _ => {
            s.stats.refused(Refusal::Unauthenticated);
            return Err(Fail::new(
                StatusCode::UNAUTHORIZED,
                "sign in with a token, or with a client certificate the browser presents",
            ));
        }
    };
    let chain = match &linked {
        Some(l) => l.chain.clone(),
        None => chain_of(&credential, &peer),
    };
    // The chain is kept with the session (to check it again at each request): a bounded
    // one, so sign-ins cannot be made to fill the database.
    if let Some(c) = chain.as_ref().filter(|c| c.len() > 2 * MAX_CHAIN_BYTES) {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the client certificate chain has {} bytes; a console sign-in keeps at most {MAX_CHAIN_BYTES}",
                c.len() / 2
            ),
        ));
    }
    let ttl = s.console_ttl();
    let now = time::OffsetDateTime::now_utc();
    let id = random_hex()?;
    let session = ConsoleSession {
        id_sha256: sha256_hex(id.as_bytes()),
        credential,
        chain,
        csrf: random_hex()?,
        created: crate::clock::rfc3339(now.into()),
        expires: crate::clock::rfc3339((now + ttl).into()),
    };
    let view = match s.view(&session) {
        // The console is for people: a node's certificate opens none.
        Ok(v) if !v.roles.is_empty() => v,
        _ => {
            if s.stats.refused(Refusal::Unauthenticated) {
                warn!(peer = ?peer.addr, "console sign-in refused: the credential holds no role");
            }
            return Err(Fail::new(
                StatusCode::UNAUTHORIZED,
                "that credential holds no role on this control plane",
            ));
        }
    };
    let store = s.store.clone();
    let kept = session.clone();
    blocking(move || store.console_open(&kept)).await?;
    info!(principal = %view.principal, peer = ?peer.addr, expires = %session.expires,
        "console sign-in");
    let mut r = Json(view).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
            ttl.whole_seconds()
        ))
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    );
    Ok(guarded(r, "application/json"))
}

/// `GET /ui/session`: who this browser is signed in as, or `{"signed_in": false}` (an
/// answer, not a refusal: the pages ask before anyone has signed in).
pub(super) async fn session(State(s): S, headers: HeaderMap) -> Result<Response, Fail> {
    let not_signed_in = || {
        guarded(
            Json(serde_json::json!({ "signed_in": false })).into_response(),
            "application/json",
        )
    };
    let Some(id) = cookie(&headers) else {
        return Ok(not_signed_in());
    };
    let (store, hash) = (s.store.clone(), sha256_hex(id.as_bytes()));
    let Some(session) = blocking(move || store.console_session(&hash))
        .await?
        .filter(|session| s.live(session))
    else {
        return Ok(not_signed_in());
    };
    match s.view(&session) {
        Ok(v) if !v.roles.is_empty() => Ok(guarded(Json(v).into_response(), "application/json")),
        _ => Ok(not_signed_in()),
    }
}

/// `DELETE /ui/session`: signs out. The session ends on the server, whatever the browser
/// keeps of the cookie.
pub(super) async fn sign_out(
    State(s): S,
    Extension(who): Extension<Principal>,
    signed: Option<Extension<Signed>>,
) -> Result<Response, Fail> {
    let Some(Extension(Signed(session))) = signed else {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "sign-out ends a console session; this request has none",
        ));
    };
    let store = s.store.clone();
    let id = session.id_sha256.clone();
    blocking(move || store.console_close(&id)).await?;
    info!(principal = %who.name, "console sign-out");
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"
        ))
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    );
    Ok(guarded(r, "text/plain; charset=utf-8"))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EndQuery {
    /// Only this principal's sessions, as the API names it: a SPIFFE ID, or `token:` and the
    /// first 12 hex digits of the token's SHA-256. Without it, everyone's.
    principal: Option<String>,
}

/// What `DELETE /v1/console/sessions` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct Ended {
    /// Console sessions ended.
    ended: u64,
}

/// Ends console sessions at once, on every replica: everyone's, or one principal's (a
/// stolen cookie, a person who left).
#[utoipa::path(delete, path = "/v1/console/sessions", tag = "console", params(EndQuery),
    responses((status = 200, description = "Sessions ended", body = Ended)))]
pub(super) async fn end_sessions(
    State(s): S,
    Extension(who): Extension<Principal>,
    super::Params(q): super::Params<EndQuery>,
) -> Result<Json<Ended>, Fail> {
    let credential = match q.principal.as_deref() {
        None => None,
        Some(p) if p.starts_with("token:") => {
            let hex = &p["token:".len()..];
            if hex.len() < 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Fail::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "principal {p:?}: a token is named by `token:` and at least 12 hex digits of its SHA-256"
                    ),
                ));
            }
            Some(format!("token:{}", hex.to_ascii_lowercase()))
        }
        Some(p) => Some(format!("cert:{p}")),
    };
    let store = s.store.clone();
    let ended = blocking(move || store.console_close_all(credential.as_deref())).await?;
    warn!(principal = %who.name, whose = q.principal.as_deref().unwrap_or("everyone"), ended,
        "console sessions ended");
    Ok(Json(Ended { ended }))
}

/// What `POST /v1/console/links` answers.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SignInLink {
    /// Append to the control plane's address: `/ui/#link=CODE`. The code travels in the
    /// fragment, which browsers never send to a server or in a Referer.
    pub path: String,
    pub expires: String,
}

/// A one-time sign-in link for the caller's own credential (a certificate, a token or a
/// console session), good for ten minutes: to hand a browser a session without typing a
/// token into it. Whoever opens it first is signed in; the roles are worked out then.
#[utoipa::path(post, path = "/v1/console/links", tag = "console",
    responses((status = 200, description = "A link", body = SignInLink)))]
pub(super) async fn make_link(
    State(s): S,
    Extension(who): Extension<Principal>,
    peer: Option<Extension<Peer>>,
    signed: Option<Extension<Signed>>,
    headers: HeaderMap,
) -> Result<Json<SignInLink>, Fail> {
    let peer = peer.map(|Extension(p)| p).unwrap_or_default();
    let (credential, chain) = match (&peer.spiffe_id, super::bearer(&headers), signed) {
        (Some(id), _, _) => {
            let c = format!("cert:{id}");
            let chain = chain_of(&c, &peer);
            (c, chain)
        }
        (None, Some(t), _) => (format!("token:{}", sha256_hex(t.as_bytes())), None),
        // A cookie hands on nothing: a session could otherwise outlive its own end, and
        // an admin's end of it, by a chain of links.
        (None, None, _) => {
            return Err(Fail::new(
                StatusCode::FORBIDDEN,
                "a sign-in link is made with a certificate or a token, not from a console session",
            ));
        }
    };
    if chain
        .as_ref()
        .is_some_and(|c| c.len() > 2 * MAX_CHAIN_BYTES)
    {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            format!("the client certificate chain is over {MAX_CHAIN_BYTES} bytes"),
        ));
    }
    let code = random_hex()?;
    let expires = crate::clock::rfc3339(
        (time::OffsetDateTime::now_utc() + time::Duration::minutes(LINK_MINUTES)).into(),
    );
    let link = crate::control_plane::store::ConsoleLink {
        code_sha256: sha256_hex(code.as_bytes()),
        credential,
        chain,
        expires: expires.clone(),
    };
    let store = s.store.clone();
    blocking(move || store.console_link_open(&link)).await?;
    info!(principal = %who.name, expires = %expires, "console sign-in link made");
    Ok(Json(SignInLink {
        path: format!("/ui/#link={code}"),
        expires,
    }))
}
