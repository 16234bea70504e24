//! Fleet reviews: what the stored bundles are and how they differ, and what a candidate or
//! the bundle in force means against every node's recorded flows. The same reviews a node
//! gives of its own records (`crate::review`), over what the control plane holds.

use axum::{Json, extract::State, http::StatusCode};

use super::{Capped, Fail, Params, S, Server, blocking};
use crate::{
    control_plane::{
        BundleInfo, FileDiff, FlowQuery, PolicyDiff, REVIEW_RECORDS, SimulateReply,
        SimulateRequest, UnusedReply, store::Store,
    },
    identity::AgentId,
    policy::owner::Owner,
    review::Flow,
};

/// Records read per store query while gathering a review's flows: a record may be as large
/// as `MAX_RECORD_BYTES`, so a page is at most a few hundred MiB however a node wrote them.
const PAGE: u32 = 500;

/// Longest a simulation replays before answering with what it has.
const SIMULATION_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Every node's decision records at or after `since`, as flows, up to [`REVIEW_RECORDS`]
/// records (oldest stored first), the same flows merged (their counts summed); and whether
/// more were left unread.
fn fleet_flows(
    store: &dyn Store,
    since: Option<String>,
) -> Result<(Vec<Flow>, u64, bool), crate::control_plane::store::StoreError> {
    type Key = (
        String,
        std::net::IpAddr,
        u16,
        crate::policy::Protocol,
        Option<String>,
        String,
        Option<String>,
        Option<u32>,
        String,
        bool,
    );
    let mut merged: std::collections::HashMap<Key, Flow> = std::collections::HashMap::new();
    let (read, truncated) = each_record(store, since, |_, r| {
        let Some(f) = Flow::of_record(r) else {
            return;
        };
        let key = (
            f.identity.clone(),
            f.dest,
            f.port,
            f.protocol,
            f.fqdn.clone(),
            f.verdict.clone(),
            f.reason.clone(),
            f.rule_id,
            f.revision.clone(),
            f.inbound,
        );
        match merged.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let c = &mut e.get_mut().count;
                *c = c.saturating_add(f.count);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Flow { time: None, ..f });
            }
        }
    })?;
    Ok((merged.into_values().collect(), read, truncated))
}

/// Hands every node's decision records at or after `since` to `each` (with the node that
/// sent it), oldest stored first, a page at a time, at most [`REVIEW_RECORDS`]: the records
/// read, and whether more were left unread.
fn each_record(
    store: &dyn Store,
    since: Option<String>,
    mut each: impl FnMut(&str, &serde_json::Value),
) -> Result<(u64, bool), crate::control_plane::store::StoreError> {
    let mut q = FlowQuery {
        since,
        limit: Some(PAGE),
        ..FlowQuery::default()
    };
    let mut read = 0u64;
    loop {
        let page = store.flows(&q)?;
        read += page.flows.len() as u64;
        for f in &page.flows {
            // Parsed one at a time: a page is held as text.
            if let Some(r) = f.value() {
                each(&f.node, &r);
            }
        }
        match page.next {
            Some(_) if read >= REVIEW_RECORDS => return Ok((read, true)),
            Some(n) => q.after = Some(n),
            None => return Ok((read, false)),
        }
    }
}

/// Every stored bundle version, newest first: who pushed it and when.
#[utoipa::path(get, path = "/v1/policy/versions", tag = "policy",
    responses((status = 200, description = "Stored versions, newest first", body = Vec<BundleInfo>)))]
pub(super) async fn get_versions(State(s): S) -> Result<Json<Vec<BundleInfo>>, Fail> {
    let store = s.store.clone();
    Ok(Json(blocking(move || store.policy_versions()).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DiffQuery {
    /// The older version.
    from: u64,
    /// The newer version.
    to: u64,
}

/// What changed from one stored version to another, file by file.
#[utoipa::path(get, path = "/v1/policy/diff", tag = "policy", params(DiffQuery),
    responses((status = 200, description = "The files that differ", body = PolicyDiff),
        (status = 404, description = "No such version", body = crate::control_plane::ErrorBody)))]
pub(super) async fn get_diff(
    State(s): S,
    Params(q): Params<DiffQuery>,
) -> Result<Json<PolicyDiff>, Fail> {
    let store = s.store.clone();
    let (from, to) = (q.from, q.to);
    let turn = s.review_turn()?;
    let found = blocking(move || {
        let _turn = turn;
        let (Some(a), Some(b)) = (store.policy(Some(from))?, store.policy(Some(to))?) else {
            return Ok(None);
        };
        Ok(Some(diff(&a, &b)))
    })
    .await?;
    let files = found.ok_or_else(|| {
        Fail::new(
            StatusCode::NOT_FOUND,
            format!("no policy version {from} or no policy version {to}"),
        )
    })?;
    Ok(Json(PolicyDiff { from, to, files }))
}

/// Longest a diff may take; past it the files left are diffed coarser (whole blocks), not
/// wrong.
const DIFF_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The files that differ between two bundles, with unified diffs.
fn diff(a: &crate::control_plane::Bundle, b: &crate::control_plane::Bundle) -> Vec<FileDiff> {
    let (from, to) = (a.version, b.version);
    let text = |files: &[crate::control_plane::BundleFile], name: &str| {
        files
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.text.clone())
    };
    let names: std::collections::BTreeSet<&str> = a
        .files
        .iter()
        .chain(&b.files)
        .map(|f| f.name.as_str())
        .collect();
    // One deadline for the whole diff: past it, every file left is diffed coarsely.
    let deadline = std::time::Instant::now() + DIFF_TIME;
    names
        .into_iter()
        .filter_map(|name| {
            let (old, new) = (text(&a.files, name), text(&b.files, name));
            let change = match (&old, &new) {
                (None, Some(_)) => "added",
                (Some(_), None) => "removed",
                (Some(o), Some(n)) if o != n => "changed",
                _ => return None,
            };
            let (old, new) = (old.unwrap_or_default(), new.unwrap_or_default());
            let diff = similar::TextDiff::configure()
                .deadline(deadline)
                .diff_lines(&old, &new)
                .unified_diff()
                .context_radius(3)
                .header(
                    &format!("version {from}/{name}"),
                    &format!("version {to}/{name}"),
                )
                .to_string();
            Some(FileDiff {
                name: name.to_owned(),
                change: change.to_owned(),
                diff,
            })
        })
        .collect()
}

/// Replays every node's recorded flows against a candidate bundle (validated as a push is;
/// nothing is stored): the flows it would newly deny and newly allow.
#[utoipa::path(post, path = "/v1/policy/simulate", tag = "policy", request_body = SimulateRequest,
    responses((status = 200, description = "The flows whose verdict would change", body = SimulateReply),
        (status = 422, description = "The candidate is invalid: every problem at its file, line and column", body = crate::control_plane::ErrorBody)))]
pub(super) async fn post_simulate(
    State(s): S,
    Capped(body, _budget): Capped,
) -> Result<Json<SimulateReply>, Fail> {
    let req: SimulateRequest = serde_json::from_slice(&body).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            format!(
                "body is not a candidate bundle ({{\"files\": [{{\"name\", \"text\"}}], \"since\"?}}): {e}"
            ),
        )
    })?;
    let since = super::since_param(req.since.as_deref())?;
    let store = s.store.clone();
    let turn = s.review_turn()?;
    let answer = blocking(move || {
        let _turn = turn;
        let set = match crate::control_plane::validate(&req.files) {
            Ok(set) => set,
            Err(errors) => return Ok(Err(errors)),
        };
        let (flows, records, truncated) = fleet_flows(&*store, since)?;
        Ok(Ok(SimulateReply {
            revision: set.revision.clone(),
            simulation: crate::review::simulate_until(
                &set,
                &flows,
                Some(std::time::Instant::now() + SIMULATION_TIME),
            ),
            records,
            truncated,
        }))
    })
    .await?;
    answer.map(Json).map_err(|errors| {
        Fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            crate::control_plane::ErrorBody {
                error: format!("the candidate is invalid ({} problem(s))", errors.len()),
                errors,
            },
        )
    })
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct UnusedQuery {
    /// RFC 3339 (UTC): only flows recorded at or after it.
    since: Option<String>,
}

/// The newest bundle's rules that no node recorded a flow for (under that bundle's
/// revision), grouped by owner as `report unused` does on a node.
#[utoipa::path(get, path = "/v1/reports/unused", tag = "reports", params(UnusedQuery),
    responses((status = 200, description = "Rules no flow used", body = UnusedReply),
        (status = 404, description = "No policy pushed yet", body = crate::control_plane::ErrorBody)))]
pub(super) async fn get_unused(
    State(s): S,
    Params(q): Params<UnusedQuery>,
) -> Result<Json<UnusedReply>, Fail> {
    let since = super::since_param(q.since.as_deref())?;
    let store = s.store.clone();
    let turn = s.review_turn()?;
    let found = blocking(move || {
        let _turn = turn;
        let Some(bundle) = store.policy(None)? else {
            return Ok(None);
        };
        let (flows, records, truncated) = fleet_flows(&*store, since)?;
        let report = crate::control_plane::validate(&bundle.files)
            .map(|set| crate::review::unused(&set, &flows));
        Ok(Some((bundle, report, records, truncated)))
    })
    .await?;
    let Some((bundle, report, records, truncated)) = found else {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "no policy has been pushed yet",
        ));
    };
    let report = report.map_err(|e| {
        Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "stored version {} no longer validates ({} problem(s))",
                bundle.version,
                e.len()
            ),
        )
    })?;
    Ok(Json(UnusedReply {
        version: bundle.version,
        revision: bundle.revision,
        report,
        records,
        truncated,
    }))
}

/// Every grant the bundles held (since `since`, by the versions' push times), with who
/// pushed and signed the version that brought it, and the flows its rules allowed.
#[utoipa::path(get, path = "/v1/reports/grants", tag = "reports", params(UnusedQuery),
    responses((status = 200, description = "Grants and what they allowed", body = crate::control_plane::GrantsReply)))]
pub(super) async fn get_grants(
    State(s): S,
    Params(q): Params<UnusedQuery>,
) -> Result<Json<crate::control_plane::GrantsReply>, Fail> {
    let since = super::since_param(q.since.as_deref())?;
    let store = s.store.clone();
    let turn = s.review_turn()?;
    let reply = blocking(move || {
        let _turn = turn;
        grants(&*store, since)
    })
    .await?;
    Ok(Json(reply))
}

fn grants(
    store: &dyn Store,
    since: Option<String>,
) -> Result<crate::control_plane::GrantsReply, crate::control_plane::store::StoreError> {
    use crate::control_plane::{GrantFlow, GrantReview};
    let now = time::OffsetDateTime::now_utc();
    let mut versions = store.policy_versions()?;
    let cut = versions.len() > crate::control_plane::REVIEW_VERSIONS;
    versions.truncate(crate::control_plane::REVIEW_VERSIONS);
    let read = versions.len() as u64;
    // Newest first: the oldest read, whose grants may have come in a version not read.
    let oldest = versions.last().map(|v| v.version).filter(|_| cut);
    // Oldest first: a grant is told with the version that first held it.
    let mut found: Vec<GrantReview> = Vec::new();
    // Each distinct grant (a file may hold several, and a later version may rewrite one):
    // told with the version that first held it as it is.
    let mut seen: std::collections::BTreeSet<String> = Default::default();
    let mut files: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for info in versions.iter().rev() {
        let Some(bundle) = store.policy(Some(info.version))? else {
            continue;
        };
        let Ok(set) = crate::control_plane::validate(&bundle.files) else {
            continue;
        };
        for g in &set.grants {
            let view = crate::policy::grant::GrantView::of(g, now);
            let key = format!(
                "{}\0{}\0{}\0{}\0{}\0{}",
                view.file,
                view.name,
                view.identity,
                view.until,
                view.break_glass,
                view.rules.join("\0")
            );
            if !seen.insert(key) {
                continue;
            }
            // A grant that ended before `since` is not one of this review's.
            if since.as_deref().is_some_and(|s| view.until.as_str() < s) {
                continue;
            }
            files
                .entry(view.file.clone())
                .or_default()
                .push(found.len());
            found.push(GrantReview {
                grant: view,
                version: bundle.version,
                held_before: oldest == Some(bundle.version),
                pushed_at: bundle.pushed_at.clone(),
                pushed_by: bundle.pushed_by.clone(),
                signed_by: bundle
                    .signing
                    .signatures
                    .iter()
                    .map(|s| s.signer.clone())
                    .collect(),
                flows: Vec::new(),
                allowed: 0,
            });
        }
    }
    let mut counted: std::collections::BTreeMap<(usize, GrantFlow), u64> = Default::default();
    let (records, truncated) = each_record(store, since, |node, r| {
        let text = |k: &str| r.get(k).and_then(|v| v.as_str());
        if !matches!(text("verdict"), Some("allow" | "audit")) {
            return;
        }
        // "FILE:LINE egress[i]", FILE as the node holds it (a path ending in the name).
        let Some(file) = text("rule")
            .and_then(|p| p.rsplit_once(':'))
            .and_then(|(f, _)| std::path::Path::new(f).file_name())
            .and_then(|f| f.to_str())
        else {
            return;
        };
        // The newest grant of that file for that identity.
        let Some(&i) = files.get(file).and_then(|all| {
            all.iter()
                .rev()
                .find(|&&i| text("identity") == Some(found[i].grant.identity.as_str()))
        }) else {
            return;
        };
        let (dest, port, protocol) = crate::review::destination_of(r);
        let flow = GrantFlow {
            node: node.to_owned(),
            dest: dest.unwrap_or_default(),
            port,
            protocol,
            count: 0,
        };
        let n = counted.entry((i, flow)).or_default();
        *n = n.saturating_add(r.get("count").and_then(|c| c.as_u64()).unwrap_or(1));
    })?;
    for ((i, mut flow), n) in counted {
        flow.count = n;
        found[i].allowed = found[i].allowed.saturating_add(n);
        found[i].flows.push(flow);
    }
    found.reverse();
    Ok(crate::control_plane::GrantsReply {
        grants: found,
        versions: read,
        records,
        truncated,
    })
}

/// Fleet reviews a replica runs at once: each may read [`REVIEW_RECORDS`] records.
pub(super) const REVIEWS_AT_ONCE: usize = 2;

impl Server {
    /// A turn to run a fleet review, or 503 while others hold them all. It is held by the
    /// work itself, not the request: a caller who hangs up does not free it early.
    fn review_turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Fail> {
        self.reviews.clone().try_acquire_owned().map_err(|_| {
            Fail::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{REVIEWS_AT_ONCE} fleet reviews are running on this replica already; try again shortly"
                ),
            )
        })
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct IdentitiesQuery {
    /// RFC 3339 (UTC): only flows recorded at or after it.
    since: Option<String>,
    /// The next page: identities ordered after this one (the reply's `next_after`).
    after: Option<String>,
    /// Only this identity.
    identity: Option<String>,
}

/// Each governed identity across the fleet: its decisions, over time and by destination,
/// and its rules in the newest bundle with the flows each allowed.
#[utoipa::path(get, path = "/v1/identities", tag = "reports", params(IdentitiesQuery),
    responses((status = 200, description = "Every identity seen in records or named by the newest bundle", body = IdentitiesReply)))]
pub(super) async fn get_identities(
    State(s): S,
    Params(q): Params<IdentitiesQuery>,
) -> Result<Json<IdentitiesReply>, Fail> {
    let since = super::since_param(q.since.as_deref())?;
    let store = s.store.clone();
    let turn = s.review_turn()?;
    Ok(Json(
        blocking(move || {
            let _turn = turn;
            let page = Page::new(q.after, q.identity, MAX_IDENTITIES);
            identities(&*store, since, page)
        })
        .await?,
    ))
}

/// Decisions of one identity in one span of time (`start` and the reply's `bucket_secs`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Bucket {
    pub start: String,
    pub allow: u64,
    pub audit: u64,
    pub deny: u64,
}

/// An identity's live sessions on one node.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeSessions {
    pub node: String,
    pub sessions: u64,
}

/// Where an identity went, and how often.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Destination {
    /// The name asked for, or the address.
    pub dest: String,
    pub port: u16,
    pub protocol: String,
    pub allow: u64,
    pub audit: u64,
    pub deny: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct IdentitySummary {
    pub identity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub allow: u64,
    pub audit: u64,
    pub deny: u64,
    /// Nodes whose records name it.
    pub nodes: Vec<String>,
    /// Its live sessions on each node that has one, as the node's last poll said.
    pub sessions: Vec<NodeSessions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Its decisions over time, oldest first, in the reply's buckets.
    pub buckets: Vec<Bucket>,
    /// The most used destinations (at most [`TOP_DESTINATIONS`]), most used first.
    pub top_destinations: Vec<Destination>,
    /// Its egress rules in the newest bundle, with the allowed flows recorded under each
    /// (0: unused).
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<crate::review::RuleUse>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct IdentitiesReply {
    /// The newest bundle's version, whose rules are shown (None: none pushed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The length of each bucket, chosen so the span of the records fits in at most
    /// [`BUCKETS`].
    pub bucket_secs: u64,
    /// In the order of their names, at most [`MAX_IDENTITIES`].
    pub identities: Vec<IdentitySummary>,
    /// Records of identities on later pages, not shown.
    pub identities_left_out: u64,
    /// More identities follow: ask again with this as `after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
    pub records: u64,
    pub truncated: bool,
}

/// Most identities one answer shows (the first by name after the page's start).
pub const MAX_IDENTITIES: usize = 1_000;

/// The identities one answer shows: the first `size` by name after `after` (or only
/// `only`), among those records, sessions and the newest bundle name. Kept as they come, so
/// the answer holds one page however many identities the fleet has.
struct Page {
    after: Option<String>,
    only: Option<String>,
    size: usize,
    ids: std::collections::BTreeSet<String>,
    more: bool,
}

impl Page {
    fn new(after: Option<String>, only: Option<String>, size: usize) -> Self {
        Self {
            after,
            only,
            size,
            ids: Default::default(),
            more: false,
        }
    }

    /// Whether `id` is on the page as it stands: taken when it sorts before the last of a
    /// full page, which then goes to a later page.
    fn admit(&mut self, id: &str) -> bool {
        if let Some(only) = &self.only {
            if id != only {
                return false;
            }
        } else if self.after.as_deref().is_some_and(|a| id <= a) {
            return false;
        }
        if self.ids.contains(id) {
            return true;
        }
        if self.ids.len() < self.size {
            self.ids.insert(id.to_owned());
            return true;
        }
        self.more = true;
        if self.ids.last().is_some_and(|last| id < last.as_str()) {
            self.ids.pop_last();
            self.ids.insert(id.to_owned());
            return true;
        }
        false
    }
}

/// Distinct destinations counted per identity before the rest are one row.
const MAX_DESTINATIONS: usize = 1_000;
/// The earliest time a chart places (2000-01-01).
const EARLIEST: i64 = 946_684_800;

/// Most destinations listed per identity.
pub const TOP_DESTINATIONS: usize = 10;
/// Most time buckets per identity.
pub const BUCKETS: u64 = 48;

fn identities(
    store: &dyn Store,
    since: Option<String>,
    mut page: Page,
) -> Result<IdentitiesReply, crate::control_plane::store::StoreError> {
    use std::collections::{BTreeMap, BTreeSet};
    struct Seen {
        identity: String,
        owner: Option<String>,
        node: String,
        time: Option<i64>,
        verdict: usize,
        count: u64,
        dest: String,
        port: u16,
        protocol: String,
    }
    let (mut seen, mut flows) = (Vec::new(), Vec::new());
    // Records of identities this page could hold, those it ends up holding among them.
    let mut relevant = 0u64;
    // Identities the newest bundle names and those with sessions take their places first.
    let newest = store.policy(None)?;
    let set = newest
        .as_ref()
        .and_then(|b| crate::control_plane::validate(&b.files).ok());
    let polled = store.nodes()?;
    for id in set
        .iter()
        .flat_map(|s| s.agents.iter().map(|a| &a.identity))
    {
        page.admit(id);
    }
    for n in &polled {
        for id in n.sessions.keys() {
            page.admit(id);
        }
    }
    // Times a chart can place: a node's record dated 1969 or 9999 must not stretch every
    // identity's chart (nor overflow the arithmetic).
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let plausible = EARLIEST..now.saturating_add(86_400);
    let (read, truncated) = each_record(store, since, |node, r| {
        let text = |k: &str| r.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        // Only what a review can stand behind: a SPIFFE ID, an address or host name, an
        // owner as policies write them; bounded, whatever a node sent.
        let Some(identity) = text("identity").filter(|i| i.parse::<AgentId>().is_ok()) else {
            return;
        };
        let verdict = match text("verdict").as_deref() {
            Some("allow") => 0,
            Some("audit") => 1,
            Some("deny" | "socket-deny") => 2,
            _ => return,
        };
        let after =
            page.only.is_none() && page.after.as_deref().is_none_or(|a| identity.as_str() > a);
        relevant += u64::from(after);
        if !page.admit(&identity) {
            return;
        }
        if let Some(flow) = Flow::of_record(r).filter(|f| f.allowed() && f.rule_id.is_some()) {
            flows.push(flow);
        }
        let (dest, port, protocol) = crate::review::destination_of(r);
        seen.push(Seen {
            identity,
            owner: text("owner").filter(|o| o.parse::<Owner>().is_ok()),
            node: node.to_owned(),
            time: text("time")
                .and_then(|t| crate::clock::parse_rfc3339(&t).ok())
                .map(|t| t.unix_timestamp())
                .filter(|t| plausible.contains(t)),
            verdict,
            count: r.get("count").and_then(|c| c.as_u64()).unwrap_or(1),
            dest: dest.unwrap_or_default(),
            port,
            protocol,
        });
    })?;
    // Rows of identities a later one put off the page.
    seen.retain(|s| page.ids.contains(&s.identity));
    flows.retain(|f| page.ids.contains(&f.identity));
    let left_out = if page.only.is_some() {
        0
    } else {
        relevant.saturating_sub(seen.len() as u64)
    };
    let mut rules = set
        .as_ref()
        .map(|set| crate::review::rules_with_hits(set, &flows))
        .unwrap_or_default();
    rules.retain(|r| page.ids.contains(&r.identity));

    let times = seen.iter().filter_map(|s| s.time);
    let (first, last) = (times.clone().min(), times.max());
    let span = match (first, last) {
        (Some(a), Some(b)) => (b - a).max(0) as u64,
        _ => 0,
    };
    let bucket_secs = [60, 300, 900, 3_600, 6 * 3_600, 86_400, 7 * 86_400]
        .into_iter()
        .find(|b| span / b < BUCKETS - 1)
        // Records a node dated decades apart still make at most BUCKETS.
        .unwrap_or(span / (BUCKETS - 2) + 1);
    let start = first.map(|t| t - t.rem_euclid(bucket_secs as i64));
    let buckets = start.map_or(0, |s0| (last.unwrap_or(s0) - s0) as u64 / bucket_secs + 1);

    let mut by_id: BTreeMap<String, IdentitySummary> = BTreeMap::new();
    let mut nodes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Per identity: (destination, port, protocol) -> [allow, audit, deny].
    type ByDestination = BTreeMap<(String, u16, String), [u64; 3]>;
    let mut dests: BTreeMap<String, ByDestination> = BTreeMap::new();
    let mut last_seen: BTreeMap<String, i64> = BTreeMap::new();
    let new = |identity: &str| IdentitySummary {
        identity: identity.to_owned(),
        owner: None,
        allow: 0,
        audit: 0,
        deny: 0,
        nodes: Vec::new(),
        sessions: Vec::new(),
        last_seen: None,
        buckets: (0..buckets)
            .map(|i| Bucket {
                start: crate::clock::rfc3339(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(
                            (start.unwrap_or(0) as u64).saturating_add(i * bucket_secs),
                        ),
                ),
                ..Bucket::default()
            })
            .collect(),
        top_destinations: Vec::new(),
        rules: Vec::new(),
    };
    for s in &seen {
        let e = by_id
            .entry(s.identity.clone())
            .or_insert_with(|| new(&s.identity));
        if e.owner.is_none() {
            e.owner.clone_from(&s.owner);
        }
        let slot = match s.verdict {
            0 => &mut e.allow,
            1 => &mut e.audit,
            _ => &mut e.deny,
        };
        *slot = slot.saturating_add(s.count);
        if let (Some(t), Some(s0)) = (s.time, start) {
            let b = &mut e.buckets[((t - s0) as u64 / bucket_secs) as usize];
            let n = match s.verdict {
                0 => &mut b.allow,
                1 => &mut b.audit,
                _ => &mut b.deny,
            };
            *n = n.saturating_add(s.count);
            let l = last_seen.entry(s.identity.clone()).or_insert(t);
            *l = (*l).max(t);
        }
        nodes
            .entry(s.identity.clone())
            .or_default()
            .insert(s.node.clone());
        let d = dests.entry(s.identity.clone()).or_default();
        // Past as many distinct destinations as any page would list, the rest are one row.
        let key = if d.len() >= MAX_DESTINATIONS
            && !d.contains_key(&(s.dest.clone(), s.port, s.protocol.clone()))
        {
            ("(other destinations)".to_owned(), 0, String::new())
        } else {
            (s.dest.clone(), s.port, s.protocol.clone())
        };
        let n = &mut d.entry(key).or_default()[s.verdict];
        *n = n.saturating_add(s.count);
    }
    // Sessions, as each node's last poll said them (identities with sessions and no
    // records yet included).
    for n in polled {
        for (identity, sessions) in n.sessions {
            if !page.ids.contains(&identity) {
                continue;
            }
            by_id
                .entry(identity.clone())
                .or_insert_with(|| new(&identity))
                .sessions
                .push(NodeSessions {
                    node: n.node.clone(),
                    sessions,
                });
        }
    }
    // Identities the bundle names that no record does yet.
    for id in &page.ids {
        by_id.entry(id.clone()).or_insert_with(|| new(id));
    }
    for r in rules {
        let e = by_id.get_mut(&r.identity).expect("added above");
        if let Some(o) = &r.owner {
            e.owner = Some(o.as_str().to_owned());
        }
        e.rules.push(r);
    }
    for (id, e) in &mut by_id {
        e.nodes = nodes.remove(id).unwrap_or_default().into_iter().collect();
        e.last_seen = last_seen.get(id).map(|t| {
            crate::clock::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs((*t).max(0) as u64),
            )
        });
        let mut d: Vec<Destination> = dests
            .remove(id)
            .unwrap_or_default()
            .into_iter()
            .map(
                |((dest, port, protocol), [allow, audit, deny])| Destination {
                    dest,
                    port,
                    protocol,
                    allow,
                    audit,
                    deny,
                },
            )
            .collect();
        d.sort_by_key(|d| {
            std::cmp::Reverse(d.allow.saturating_add(d.audit).saturating_add(d.deny))
        });
        d.truncate(TOP_DESTINATIONS);
        e.top_destinations = d;
    }
    Ok(IdentitiesReply {
        version: newest.map(|b| b.version),
        bucket_secs,
        identities: by_id.into_values().collect(),
        identities_left_out: left_out,
        next_after: page.more.then(|| page.ids.last().cloned()).flatten(),
        records: read,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::{BundleFile, Reported, store::SqliteStore};

    #[test]
    fn the_grants_review_tells_every_grant_of_a_file_and_every_rewrite_with_its_flows() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cp.db"), Default::default()).unwrap();
        let policy = |id: &str| {
            format!("kind: AgentPolicy\nname: {id}\nidentity: spiffe://example.org/{id}\n")
        };
        let grant = |name: &str, id: &str, to: &str| {
            format!(
                "kind: Grant\nname: {name}\nidentity: spiffe://example.org/{id}\nreason: r\nuntil: 2099-01-01T00:00:00Z\negress:\n  - to: [{to}]\n"
            )
        };
        let push = |files: Vec<(&str, String)>| {
            let files: Vec<BundleFile> = files
                .into_iter()
                .map(|(name, text)| BundleFile {
                    name: name.into(),
                    text,
                })
                .collect();
            let set = crate::control_plane::validate(&files).unwrap();
            store
                .push_policy(&set.revision, &files, "admin", 0, None, &Default::default())
                .unwrap();
        };
        let base = || vec![("a.yaml", policy("a")), ("b.yaml", policy("b"))];
        let mut v1 = base();
        v1.push((
            "grant-1.yaml",
            format!(
                "{}---\n{}",
                grant("g1", "a", "198.51.100.1"),
                grant("g2", "b", "0.0.0.0/0")
            ),
        ));
        push(v1);
        let mut v2 = base();
        v2.push(("grant-1.yaml", grant("g1", "a", "0.0.0.0/0")));
        push(v2);
        // A flow of b under grant-1.yaml, as a node records it (the file as its path).
        let flow = serde_json::json!({"time": "2026-12-05T00:00:00Z", "verdict": "allow",
            "identity": "spiffe://example.org/b", "dest": "203.0.113.5", "port": 443,
            "protocol": "tcp", "rule": "/var/lib/agentwall/policy/grant-1.yaml:5 egress[0]"});
        store
            .ingest(
                "n1",
                1,
                &[Reported {
                    rid: 1,
                    record: serde_json::value::to_raw_value(&flow).unwrap(),
                }],
            )
            .unwrap();
        let r = grants(&store, None).unwrap();
        let told: Vec<(&str, u64, &str)> = r
            .grants
            .iter()
            .map(|g| (g.grant.name.as_str(), g.version, g.grant.rules[0].as_str()))
            .collect();
        assert_eq!(
            told,
            [
                ("g1", 2, "0.0.0.0/0 ports any protocol any"),
                ("g2", 1, "0.0.0.0/0 ports any protocol any"),
                ("g1", 1, "198.51.100.1/32 ports any protocol any"),
            ]
        );
        let g2 = &r.grants[1];
        assert_eq!(g2.allowed, 1);
        assert_eq!(g2.flows[0].dest, "203.0.113.5");
        assert!(r.grants.iter().all(|g| !g.held_before));

        // More versions than a review reads: a grant held by the oldest one read is not
        // credited to that version's pusher as if it came there.
        let v = |n: usize| {
            let mut files = base();
            files.push((
                "c.yaml",
                format!("{}owner: c{n}@example.org\n", policy("c")),
            ));
            files
        };
        for n in 0..crate::control_plane::REVIEW_VERSIONS {
            let mut files = v(n);
            files.push(("grant-1.yaml", grant("g1", "a", "0.0.0.0/0")));
            if n == crate::control_plane::REVIEW_VERSIONS - 1 {
                files.push(("grant-2.yaml", grant("g3", "b", "192.0.2.1")));
            }
            push(files);
        }
        let r = grants(&store, None).unwrap();
        assert_eq!(r.versions, crate::control_plane::REVIEW_VERSIONS as u64);
        let told: Vec<(&str, u64, bool)> = r
            .grants
            .iter()
            .map(|g| (g.grant.name.as_str(), g.version, g.held_before))
            .collect();
        let top = 2 + crate::control_plane::REVIEW_VERSIONS as u64;
        assert_eq!(told, [("g3", top, false), ("g1", 3, true)]);
    }

    #[test]
    fn identities_come_a_page_at_a_time_in_the_order_of_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cp.db"), Default::default()).unwrap();
        // The bundle names b and d; records name a, c, d and e, in that order of arrival.
        let files: Vec<BundleFile> = ["b", "d"]
            .iter()
            .map(|id| BundleFile {
                name: format!("{id}.yaml"),
                text: format!(
                    "kind: AgentPolicy\nname: {id}\nidentity: spiffe://example.org/{id}\n"
                ),
            })
            .collect();
        let set = crate::control_plane::validate(&files).unwrap();
        store
            .push_policy(&set.revision, &files, "admin", 0, None, &Default::default())
            .unwrap();
        let records: Vec<Reported> = ["e", "c", "a", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let r = serde_json::json!({"time": "2026-12-05T00:00:00Z", "verdict": "deny",
                    "identity": format!("spiffe://example.org/{id}"), "dest": "203.0.113.5",
                    "port": 443, "protocol": "tcp", "reason": "no rule allows it"});
                Reported {
                    rid: i as u64 + 1,
                    record: serde_json::value::to_raw_value(&r).unwrap(),
                }
            })
            .collect();
        store.ingest("n1", 1, &records).unwrap();
        let page = |after: Option<&str>, only: Option<&str>| {
            let id = |x: &str| format!("spiffe://example.org/{x}");
            let r = identities(&store, None, Page::new(after.map(id), only.map(id), 2)).unwrap();
            let names: Vec<String> = r
                .identities
                .iter()
                .map(|i| {
                    i.identity
                        .trim_start_matches("spiffe://example.org/")
                        .to_owned()
                })
                .collect();
            let deny: u64 = r.identities.iter().map(|i| i.deny).sum();
            (names, deny, r.identities_left_out, r.next_after)
        };
        let next = |x: &str| Some(format!("spiffe://example.org/{x}"));
        assert_eq!(
            page(None, None),
            (vec!["a".into(), "b".into()], 1, 4, next("b"))
        );
        assert_eq!(
            page(Some("b"), None),
            (vec!["c".into(), "d".into()], 2, 2, next("d"))
        );
        assert_eq!(page(Some("d"), None), (vec!["e".into()], 2, 0, None));
        assert_eq!(page(None, Some("e")), (vec!["e".into()], 2, 0, None));
    }
}
