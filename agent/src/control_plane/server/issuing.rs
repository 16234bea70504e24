//! The issuer's routes: admins mint, list and cancel join tokens and read what was issued;
//! nodes (their node identity) trade a token, or a certificate the issuer signed for them,
//! and a CSR for a short-lived X509-SVID.

use std::{sync::Arc, time::Duration};

use axum::{Extension, Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Capped, Fail, Params, Principal, S, blocking};
use crate::control_plane::ErrorBody;
use crate::{
    control_plane::{
        issuer::{self, Issuer},
        store::{Issuance, JoinToken},
    },
    identity::AgentId,
};

/// `POST /v1/identity-tokens`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenRequest {
    /// The SPIFFE ID the token lets a node obtain a certificate for (in the issuer's trust
    /// domain).
    identity: String,
    /// Seconds the token lives (default 600).
    #[serde(default)]
    ttl_secs: Option<u64>,
    /// Certificates it can be traded for (default 1).
    #[serde(default)]
    uses: Option<u32>,
}

/// A minted token: shown once, kept only as its SHA-256.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MintedToken {
    pub token: String,
    pub id: String,
    pub identity: String,
    pub expires: String,
    pub uses: u32,
}

/// `DELETE /v1/identity-tokens?id=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenId {
    /// The token's id (as listed), not the token.
    id: String,
}

/// A token cancelled.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Cancelled {
    pub id: String,
    pub cancelled: bool,
}

/// `GET /v1/issuances?limit=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct IssuancesQuery {
    /// At most this many, newest first (default and most 1,000).
    #[serde(default)]
    limit: Option<usize>,
}

/// `POST /v1/node/svid`: a CSR, and a join token or the certificate to renew (one of them).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SvidRequest {
    /// PKCS#10 request (PEM); only its key is used.
    pub csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The certificate chain (PEM) this issuer gave for the session, to renew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew: Option<String>,
}

/// A certificate the issuer signed.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SvidReply {
    /// The certificate, then the issuer's CA certificate(s) (PEM).
    pub chain: String,
    pub identity: String,
    pub serial: String,
    pub not_after: String,
}

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);

/// Work off the async workers that may refuse as well as fail in the store.
async fn work<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    blocking(move || Ok(f())).await?
}

fn issuer_of(s: &super::Server) -> Result<Arc<Issuer>, Fail> {
    s.issuer.get().cloned().ok_or_else(|| {
        Fail::new(
            StatusCode::CONFLICT,
            "this control plane issues no certificates: it has no [issuer] in its config",
        )
    })
}

/// The identity, checked: a SPIFFE ID of the issuer's trust domain, not a principal of the
/// control plane itself (an `[[access]]` entry names it: its certificate would hold that
/// role here), not revoked.
fn issuable(
    store: &dyn crate::control_plane::store::Store,
    issuer: &Issuer,
    access: &[crate::config::control_plane::Access],
    id: &str,
) -> Result<AgentId, Fail> {
    let parsed: AgentId = id.parse().map_err(|e| {
        Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{:?} is not a SPIFFE ID: {e}", crate::text::prefix(id, 256)),
        )
    })?;
    if parsed.trust_domain() != issuer.trust_domain() {
        return Err(Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{parsed} is outside the issuer's trust domain {}",
                issuer.trust_domain()
            ),
        ));
    }
    let text = parsed.to_string();
    if !super::Server::roles_in(access, Some(&text), None).is_empty() {
        return Err(Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{parsed} is a principal of this control plane ([[access]] names it): the issuer does not issue it"
            ),
        ));
    }
    let (_, revoked) = store.revocations()?;
    if revoked.iter().any(|r| r.identity == text) {
        return Err(Fail::new(
            StatusCode::FORBIDDEN,
            format!("{parsed} is revoked: no certificate is issued for it"),
        ));
    }
    Ok(parsed)
}

/// The reply for a chain already issued.
fn reply_of(chain: &str, id: &AgentId) -> SvidReply {
    let leaf = crate::pem::certs_in(std::path::Path::new("-"), chain.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next())
        .and_then(|c| crate::identity::peer_from_cert(&c).ok());
    SvidReply {
        chain: chain.to_owned(),
        identity: id.to_string(),
        serial: leaf
            .as_ref()
            .map(|p| p.serial.to_lowercase())
            .unwrap_or_default(),
        not_after: leaf
            .map(|p| crate::clock::rfc3339(p.not_after))
            .unwrap_or_default(),
    }
}

/// Mints a join token for an identity.
#[utoipa::path(post, path = "/v1/identity-tokens", tag = "issuer", request_body = TokenRequest,
    responses((status = 200, description = "The token, shown this once", body = MintedToken),
        (status = 403, description = "The identity is revoked", body = ErrorBody),
        (status = 409, description = "This control plane has no issuer", body = ErrorBody),
        (status = 422, description = "Not an identity the issuer issues (another trust domain, or a principal of this control plane), or a TTL or count out of bounds", body = ErrorBody)))]
pub(super) async fn post_token(
    State(s): S,
    Extension(who): Extension<Principal>,
    Capped(body, _budget): Capped,
) -> Result<Json<MintedToken>, Fail> {
    let issuer = issuer_of(&s)?;
    let req: TokenRequest = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not {{\"identity\", \"ttl_secs\", \"uses\"}}: {e}"),
        )
    })?;
    let ttl = req.ttl_secs.map_or(DEFAULT_TOKEN_TTL, Duration::from_secs);
    if ttl.is_zero() || ttl > issuer::MAX_TOKEN_TTL {
        return Err(Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "ttl_secs {} is outside 1 to {}",
                ttl.as_secs(),
                issuer::MAX_TOKEN_TTL.as_secs()
            ),
        ));
    }
    let uses = req.uses.unwrap_or(1);
    if !(1..=issuer::MAX_TOKEN_USES).contains(&uses) {
        return Err(Fail::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("uses {uses} is outside 1 to {}", issuer::MAX_TOKEN_USES),
        ));
    }
    let store = s.store.clone();
    let by = who.name.clone();
    let access = s.access.clone();
    let minted = work(move || {
        let id = issuable(&*store, &issuer, &access, &req.identity)?;
        let (token, sha256, tid) = issuer::mint_token().ok_or_else(|| {
            Fail::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the system's random source failed",
            )
        })?;
        let t = JoinToken {
            id: tid,
            sha256,
            identity: id.to_string(),
            expires: crate::clock::rfc3339(std::time::SystemTime::now() + ttl),
            uses_left: uses,
            created_by: by,
            created: crate::clock::now_rfc3339(),
            cancelled: false,
        };
        store.token_create(&t)?;
        Ok::<_, Fail>(MintedToken {
            token,
            id: t.id,
            identity: t.identity,
            expires: t.expires,
            uses,
        })
    })
    .await?;
    info!(principal = %who.name, identity = %minted.identity, token = %minted.id,
        expires = %minted.expires, uses, "join token minted");
    Ok(Json(minted))
}

/// Join tokens (never the tokens themselves), newest first.
#[utoipa::path(get, path = "/v1/identity-tokens", tag = "issuer",
    responses((status = 200, description = "Tokens, live and ended within a day", body = Vec<JoinToken>)))]
pub(super) async fn get_tokens(State(s): S) -> Result<Json<Vec<JoinToken>>, Fail> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.tokens()).await?))
}

/// Cancels a join token.
#[utoipa::path(delete, path = "/v1/identity-tokens", tag = "issuer", params(TokenId),
    responses((status = 200, description = "Cancelled", body = Cancelled),
        (status = 404, description = "No token not yet cancelled has that id", body = ErrorBody)))]
pub(super) async fn delete_token(
    State(s): S,
    Extension(who): Extension<Principal>,
    Params(q): Params<TokenId>,
) -> Result<Json<Cancelled>, Fail> {
    let store = s.store.clone();
    let id = q.id.clone();
    if !blocking(move || store.token_cancel(&id)).await? {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            format!(
                "no token not yet cancelled has id {:?}",
                crate::text::prefix(&q.id, 64)
            ),
        ));
    }
    warn!(principal = %who.name, token = %q.id, "join token cancelled");
    Ok(Json(Cancelled {
        id: q.id,
        cancelled: true,
    }))
}

/// The certificates the issuer signed, newest first: every join and renewal, by node.
#[utoipa::path(get, path = "/v1/issuances", tag = "issuer", params(IssuancesQuery),
    responses((status = 200, description = "Issuances", body = Vec<Issuance>)))]
pub(super) async fn get_issuances(
    State(s): S,
    Params(q): Params<IssuancesQuery>,
) -> Result<Json<Vec<Issuance>>, Fail> {
    let store = s.store.clone();
    let limit = q.limit.unwrap_or(1_000).clamp(1, 1_000);
    Ok(Json(blocking(move || store.issuances(limit)).await?))
}

/// A node trades a join token, or a certificate this issuer signed through it, and a CSR,
/// for a new certificate.
#[utoipa::path(post, path = "/v1/node/svid", tag = "node", request_body = SvidRequest,
    responses((status = 200, description = "The certificate", body = SvidReply),
        (status = 403, description = "The token does not work, the certificate to renew is not one issued through this node or its token was cancelled, or the identity is revoked", body = ErrorBody),
        (status = 409, description = "This control plane has no issuer", body = ErrorBody),
        (status = 422, description = "The CSR cannot be signed, or the identity is not one the issuer issues", body = ErrorBody),
        (status = 503, description = "Two replicas renewed the certificate at once; ask again", body = ErrorBody)))]
pub(super) async fn post_svid(
    State(s): S,
    Extension(who): Extension<Principal>,
    Capped(body, _budget): Capped,
) -> Result<Json<SvidReply>, Fail> {
    let issuer = issuer_of(&s)?;
    let req: SvidRequest = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!("body is not {{\"csr\", \"token\" or \"renew\"}}: {e}"),
        )
    })?;
    let store = s.store.clone();
    let node = who.name.clone();
    let access = s.access.clone();
    let reply = work(move || {
        // A request that cannot be signed spends no token.
        issuer
            .check_csr(&req.csr)
            .map_err(|e| Fail::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        let unusable = || {
            // One answer for every token that does not work: no oracle of which exist.
            Fail::new(
                StatusCode::FORBIDDEN,
                "the join token is unknown, used up, expired or cancelled",
            )
        };
        let (id, kind, token, renewing) = match (&req.token, &req.renew) {
            (Some(t), None) => {
                let sha = issuer::token_sha256(t);
                // Checked before the token is spent: a token for an identity revoked since
                // it was minted is refused, not used up.
                let named = store.token_identity(&sha)?.ok_or_else(unusable)?;
                issuable(&*store, &issuer, &access, &named)?;
                let spent = store.token_spend(&sha)?.ok_or_else(unusable)?;
                let id = issuable(&*store, &issuer, &access, &spent.identity)?;
                (id, "join", Some(spent.id), None)
            }
            (None, Some(chain)) => {
                let (id, serial) = issuer
                    .verify_ours(chain)
                    .map_err(|e| Fail::new(StatusCode::FORBIDDEN, e.to_string()))?;
                let before = store
                    .issuance(&serial)?
                    .filter(|i| i.node == node)
                    .ok_or_else(|| {
                        Fail::new(
                            StatusCode::FORBIDDEN,
                            format!("certificate {serial} was not issued through this node"),
                        )
                    })?;
                // A token cancelled ends the certificates that descend from it.
                if let Some(t) = &before.token {
                    if store.token_cancelled(t)? {
                        return Err(Fail::new(
                            StatusCode::FORBIDDEN,
                            format!(
                                "join token {t} was cancelled: its certificates are not renewed"
                            ),
                        ));
                    }
                }
                let id = issuable(&*store, &issuer, &access, &id.to_string())?;
                // One renewal a certificate: asked again (a reply lost on the way), the same
                // certificate is answered, never a second one.
                if let Some(chain) = before.renewed_into {
                    return Ok(reply_of(&chain, &id));
                }
                (id, "renewal", before.token, Some(serial))
            }
            _ => {
                return Err(Fail::new(
                    StatusCode::BAD_REQUEST,
                    "give a join token or the certificate to renew, one of them",
                ));
            }
        };
        let issued = issuer
            .sign(&req.csr, &id)
            .map_err(|e| Fail::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        let not_after = crate::clock::rfc3339(issued.not_after);
        store.issued(&Issuance {
            serial: issued.serial.clone(),
            identity: id.to_string(),
            node: node.clone(),
            kind: kind.to_owned(),
            token,
            issued: crate::clock::now_rfc3339(),
            not_after: not_after.clone(),
            renewed_into: None,
        })?;
        if let Some(old) = renewing {
            if !store.renewed(&old, &issued.chain_pem)? {
                // Another replica renewed it meanwhile: its certificate is the one.
                let winner = store
                    .issuance(&old)?
                    .and_then(|i| i.renewed_into)
                    .ok_or_else(|| {
                        Fail::new(StatusCode::SERVICE_UNAVAILABLE, "renewal raced; ask again")
                    })?;
                return Ok(reply_of(&winner, &id));
            }
        }
        Ok::<_, Fail>(SvidReply {
            chain: issued.chain_pem,
            identity: id.to_string(),
            serial: issued.serial,
            not_after,
        })
    })
    .await?;
    info!(node = %who.name, identity = %reply.identity, serial = %reply.serial,
        not_after = %reply.not_after, "certificate issued");
    Ok(Json(reply))
}
