//! Fleet reviews: what the stored bundles are and how they differ, and what a candidate or
//! the bundle in force means against every node's recorded flows. The same reviews a node
//! gives of its own records (`crate::review`), over what the control plane holds.

use axum::{Json, extract::State, http::StatusCode};

use super::{Capped, Fail, Params, S, Server, blocking, normal_time};
use crate::{
    control_plane::{
        BundleInfo, FileDiff, FlowQuery, PolicyDiff, REVIEW_RECORDS, SimulateReply,
        SimulateRequest, UnusedReply, store::Store,
    },
    review::Flow,
};

/// Records read per store query while gathering a review's flows.
const PAGE: u32 = 10_000;

/// Every node's decision records at or after `since`, as flows, up to [`REVIEW_RECORDS`]
/// records (oldest stored first); and whether more were left unread.
fn fleet_flows(
    store: &dyn Store,
    since: Option<String>,
) -> Result<(Vec<Flow>, u64, bool), crate::control_plane::store::StoreError> {
    let mut q = FlowQuery {
        since,
        limit: Some(PAGE),
        ..FlowQuery::default()
    };
    let (mut flows, mut read) = (Vec::new(), 0u64);
    loop {
        let page = store.flows(&q)?;
        read += page.flows.len() as u64;
        flows.extend(page.flows.iter().filter_map(|f| Flow::of_record(&f.record)));
        match page.next {
            Some(_) if read >= REVIEW_RECORDS => return Ok((flows, read, true)),
            Some(n) => q.after = Some(n),
            None => return Ok((flows, read, false)),
        }
    }
}

fn since_of(since: Option<&str>) -> Result<Option<String>, Fail> {
    since.map(|s| normal_time("since", s)).transpose()
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
    let (a, b) = blocking(move || Ok((store.policy(Some(from))?, store.policy(Some(to))?))).await?;
    let missing = |v| Fail::new(StatusCode::NOT_FOUND, format!("no policy version {v}"));
    let a = a.ok_or_else(|| missing(from))?;
    let b = b.ok_or_else(|| missing(to))?;
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
    let files = names
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
            let diff = similar::TextDiff::from_lines(&old, &new)
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
        .collect();
    Ok(Json(PolicyDiff { from, to, files }))
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
    let since = since_of(req.since.as_deref())?;
    let store = s.store.clone();
    let _turn = s.review_turn()?;
    let answer = blocking(move || {
        let set = match crate::control_plane::validate(&req.files) {
            Ok(set) => set,
            Err(errors) => return Ok(Err(errors)),
        };
        let (flows, records, truncated) = fleet_flows(&*store, since)?;
        Ok(Ok(SimulateReply {
            revision: set.revision.clone(),
            simulation: crate::review::simulate(&set, &flows),
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
    let since = since_of(q.since.as_deref())?;
    let store = s.store.clone();
    let _turn = s.review_turn()?;
    let found = blocking(move || {
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

/// Fleet reviews a replica runs at once: each may read [`REVIEW_RECORDS`] records.
pub(super) const REVIEWS_AT_ONCE: usize = 2;

impl Server {
    /// A turn to run a fleet review, or 503 (with Retry-After) while others hold them all.
    fn review_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Fail> {
        self.reviews.try_acquire().map_err(|_| {
            Fail::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{REVIEWS_AT_ONCE} fleet reviews are running on this replica already; try again shortly"
                ),
            )
        })
    }
}
