//! The control plane: a server where admins push policy bundles and security reads what every
//! node reported, and the node's side of the conversation (long-poll for policy and
//! revocations, reports through an on-disk spool).
//!
//! The wire types below are the whole API; the README documents it route by route.

pub mod chain;
pub mod client;
pub mod issuer;
pub mod link;
pub mod server;
pub mod signing;
pub mod spool;
pub mod store;

use serde::{Deserialize, Serialize};

/// One policy file of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleFile {
    pub name: String,
    pub text: String,
}

/// What an admin pushes: the files of a policy directory.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PushRequest {
    pub files: Vec<BundleFile>,
    /// The newest version this push was made from (as `GET /v1/policy` showed it; 0: none
    /// yet). When set and another version was pushed since, nothing is stored (409): two
    /// admins editing at once do not silently undo each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// The bundle's signed validity and the pusher's signatures (`cp policy push
    /// --sign-key`). With fewer than the control plane's `approvals_required`, the push is
    /// stored as a proposal for others to approve, not published.
    #[serde(default, skip_serializing_if = "signing::Signing::is_empty")]
    pub signing: signing::Signing,
}

/// A push waiting for approvals (`approvals_required`): published as the next bundle
/// version once enough admins signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Proposal {
    pub id: u64,
    pub revision: String,
    pub pushed_at: String,
    pub pushed_by: String,
    pub signing: signing::Signing,
    /// The bundle version it became, once approved.
    pub version: Option<u64>,
    /// Left out of lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<BundleFile>,
}

/// What `PUT /v1/policy` did: published a bundle, or stored a proposal awaiting approvals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Pushed {
    Bundle(Bundle),
    Proposal {
        proposal: Proposal,
        approvals_required: usize,
    },
}

/// `POST /v1/policy/approve`: one more signer's signature of proposal `id`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    pub id: u64,
    pub signature: signing::BundleSignature,
}

/// A stored policy bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bundle {
    /// 1, 2, 3... in push order.
    pub version: u64,
    /// The same content hash the node computes (`policy check` prints it).
    pub revision: String,
    pub pushed_at: String,
    pub pushed_by: String,
    pub files: Vec<BundleFile>,
    /// Its signed validity and signatures, when it was signed.
    #[serde(default, skip_serializing_if = "signing::Signing::is_empty")]
    pub signing: signing::Signing,
}

/// A stored bundle's version, without its files: what `GET /v1/policy/versions` lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleInfo {
    pub version: u64,
    pub revision: String,
    pub pushed_at: String,
    pub pushed_by: String,
}

/// What changed between two bundle versions, file by file (`GET /v1/policy/diff`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyDiff {
    pub from: u64,
    pub to: u64,
    /// Files that differ, by name; files the same in both are left out.
    pub files: Vec<FileDiff>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileDiff {
    pub name: String,
    /// added | removed | changed
    pub change: String,
    /// A unified diff (three lines of context).
    pub diff: String,
}

/// A candidate bundle to replay the fleet's recorded flows against (`POST
/// /v1/policy/simulate`); nothing is stored.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SimulateRequest {
    pub files: Vec<BundleFile>,
    /// RFC 3339 (UTC): only flows recorded at or after it (default: every one held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// The flows whose verdict a candidate would change, across every node's records.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SimulateReply {
    /// The candidate's revision (as a push of it would store).
    pub revision: String,
    /// What would change, as `agentwall policy simulate --output json` gives it on a node:
    /// `newly_denied`, `newly_allowed` (identity, dest, fqdn, port, protocol, count, why),
    /// `replayed` (recorded flows replayed, counts summed).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub simulation: crate::review::Simulation,
    /// Decision records read.
    pub records: u64,
    /// More records were held than [`REVIEW_RECORDS`]: the answer covers the first read
    /// (in the order they arrived); narrow it with `since`.
    pub truncated: bool,
}

/// The newest bundle's rules no node recorded a flow for (`GET /v1/reports/unused`).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UnusedReply {
    pub version: u64,
    pub revision: String,
    /// `rules` (each with its identity, owner, rule number and place), `archetypes`, `hits`:
    /// as `agentwall report unused --output json` gives it on a node.
    #[schema(value_type = Object)]
    pub report: crate::review::UnusedReport,
    pub records: u64,
    /// As in [`SimulateReply`].
    pub truncated: bool,
}

/// Every grant the bundles since a time held, with who asked, who signed, and the flows
/// it allowed (`GET /v1/reports/grants`): the review after the fact.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GrantsReply {
    /// Newest first.
    pub grants: Vec<GrantReview>,
    /// Bundle versions read (at most [`REVIEW_VERSIONS`], the newest).
    pub versions: u64,
    pub records: u64,
    /// As in [`SimulateReply`].
    pub truncated: bool,
}

/// Most bundle versions one grants review reads.
pub const REVIEW_VERSIONS: usize = 1_000;

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GrantReview {
    #[serde(flatten)]
    pub grant: crate::policy::grant::GrantView,
    /// The bundle version that first held it, and who pushed that.
    pub version: u64,
    /// `version` is the oldest of the versions reviewed and more are stored: the grant may
    /// have come in an older one, pushed and signed by others.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held_before: bool,
    pub pushed_at: String,
    pub pushed_by: String,
    /// Who signed that version (the signers' names).
    pub signed_by: Vec<String>,
    /// Flows its rules allowed, by node, destination, port and protocol.
    pub flows: Vec<GrantFlow>,
    /// Their sum.
    pub allowed: u64,
}

#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct GrantFlow {
    pub node: String,
    pub dest: String,
    pub port: u16,
    pub protocol: String,
    pub count: u64,
}

/// Most decision records one fleet review (simulation, unused rules, identities) reads.
pub const REVIEW_RECORDS: u64 = 200_000;

/// A node's long-poll: what it has, and how it is doing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PollRequest {
    /// The newest bundle version the node has seen (0: none).
    pub known_version: u64,
    /// The newest revocation generation the node has seen.
    pub revocation_gen: u64,
    pub applied_version: Option<u64>,
    pub applied_revision: Option<String>,
    /// Why the last bundle was not applied.
    pub error: Option<String>,
    pub agent_version: String,
    /// How long the server may hold the request when nothing is new (capped by the server).
    pub wait_ms: u64,
    /// The lineage of the database `known_version` and `revocation_gen` came from: a
    /// control plane on another database answers as if the node knew nothing.
    #[serde(default)]
    pub lineage: Option<String>,
    /// Who answers for the node's host, and its labels (its config's `owner`, `[labels]`).
    /// Ones this control plane does not take (another version's rules) are left out, never
    /// a reason to refuse the poll: a node must get its bundles and revocations.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::policy::owner::lenient_owner"
    )]
    #[schema(value_type = Option<String>)]
    pub owner: Option<crate::policy::owner::Owner>,
    #[serde(
        default,
        skip_serializing_if = "crate::policy::owner::Labels::is_empty",
        deserialize_with = "crate::policy::owner::lenient_labels"
    )]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub labels: crate::policy::owner::Labels,
    /// Records waiting in the node's spool for the control plane, and records it lost
    /// since it started keeping count (its spool full, its disk full): shown with the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_records: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_lost: Option<u64>,
    /// Live sessions per identity (at most [`POLL_SESSIONS`] identities, those with the most
    /// first). One the control plane does not take (too many, not SPIFFE IDs) is left out
    /// rather than refusing the poll.
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        deserialize_with = "lenient_sessions"
    )]
    pub sessions: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PollReply {
    /// The newest bundle version (0: nothing pushed yet).
    pub version: u64,
    /// Present when `version` is newer than the node's `known_version`.
    pub bundle: Option<Bundle>,
    pub revocation_gen: u64,
    /// Every identity revoked fleet-wide (present when the generation moved).
    pub revoked: Vec<String>,
    /// Answered early because a newer poll of the same node came: another process holds
    /// this node's certificate, or this node gave up on this poll's connection.
    #[serde(default)]
    pub replaced: bool,
    /// The lineage of the control plane's database (made with it, kept by its backups):
    /// numbers of another lineage are not comparable with these.
    #[serde(default)]
    pub lineage: Option<String>,
}

/// A batch of records from a node's spool. `epoch` is chosen when the spool is created and
/// `rid` counts up within it, so (node, epoch, rid) names a record for good: a batch sent
/// twice is stored once.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportBatch {
    pub epoch: u64,
    pub records: Vec<Reported>,
}

/// Largest decompressed report batch (a node sends at most 5,000 records a batch).
pub const MAX_BATCH_BYTES: u64 = 32 << 20;
/// Most records in one batch.
pub const MAX_BATCH_RECORDS: usize = 10_000;
/// Largest record (its JSON) in a batch. The node's own records stay far below it (command
/// lines are cut at 1 KiB); a node that meets it drops that record and counts it lost.
pub const MAX_RECORD_BYTES: usize = 256 << 10;
/// Deepest nesting of arrays and objects in a record. A node's records are at most three
/// levels deep; what reads stored records (exports, reviews, the console) parses them, and
/// a record nested thousands deep is only a way to make that fail or run out of stack.
pub const MAX_RECORD_DEPTH: usize = 16;

/// Why a report body is not a batch the control plane stores.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("gzip body: {0}")]
    Gzip(std::io::Error),
    #[error("a batch decompresses to more than {MAX_BATCH_BYTES} bytes")]
    TooLarge,
    #[error("body is not a report batch: {0}")]
    NotABatch(serde_json::Error),
    #[error(
        "a batch of more than {MAX_BATCH_RECORDS} records; at most {MAX_BATCH_RECORDS} a batch"
    )]
    TooManyRecords,
    #[error("record {index} of the batch is {bytes} bytes; at most {MAX_RECORD_BYTES} a record")]
    RecordTooLarge { index: usize, bytes: usize },
    #[error(
        "record {index} of the batch nests arrays and objects deeper than {MAX_RECORD_DEPTH} levels"
    )]
    RecordTooDeep { index: usize },
}

impl BatchError {
    /// Over a size or count bound (413), as opposed to malformed (400).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            Self::TooLarge | Self::TooManyRecords | Self::RecordTooLarge { .. }
        )
    }
}

impl ReportBatch {
    /// A node's report body (gzip-compressed or not), bounded however it decompresses. The
    /// record count and each record's size are checked as the records are read: a body of a
    /// million tiny records stops at the first one over the count, not after parsing all.
    /// Returns the batch and its size decompressed (what a node's byte quota counts).
    pub fn decode(body: &[u8], gzip: bool) -> Result<(Self, usize), BatchError> {
        let inflated;
        let text = if gzip {
            use std::io::Read as _;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .take(MAX_BATCH_BYTES + 1)
                .read_to_end(&mut out)
                .map_err(BatchError::Gzip)?;
            if out.len() as u64 > MAX_BATCH_BYTES {
                return Err(BatchError::TooLarge);
            }
            inflated = out;
            &inflated[..]
        } else {
            if body.len() as u64 > MAX_BATCH_BYTES {
                return Err(BatchError::TooLarge);
            }
            body
        };
        let mut over = None;
        let mut de = serde_json::Deserializer::from_slice(text);
        let batch = serde::Deserializer::deserialize_struct(
            &mut de,
            "ReportBatch",
            &["epoch", "records"],
            BoundedBatch { over: &mut over },
        )
        .and_then(|b| de.end().map(|()| b));
        match (batch, over) {
            (_, Some(e)) => Err(e),
            (Ok(b), None) => Ok((b, text.len())),
            (Err(e), None) => Err(BatchError::NotABatch(e)),
        }
    }
}

/// Reads a [`ReportBatch`], stopping at the first bound passed (noted in `over`).
struct BoundedBatch<'a> {
    over: &'a mut Option<BatchError>,
}

impl<'de> serde::de::Visitor<'de> for BoundedBatch<'_> {
    type Value = ReportBatch;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a report batch {\"epoch\": N, \"records\": [...]}")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ReportBatch, A::Error> {
        use serde::de::Error as _;
        let (mut epoch, mut records) = (None, None);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "epoch" if epoch.is_none() => epoch = Some(map.next_value()?),
                "records" if records.is_none() => {
                    records = Some(map.next_value_seed(BoundedRecords {
                        over: &mut *self.over,
                    })?);
                }
                "epoch" | "records" => {
                    return Err(A::Error::custom(format!("duplicate field `{key}`")));
                }
                // Unknown fields are skipped, as the derived reader did.
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(ReportBatch {
            epoch: epoch.ok_or_else(|| A::Error::missing_field("epoch"))?,
            records: records.ok_or_else(|| A::Error::missing_field("records"))?,
        })
    }
}

struct BoundedRecords<'a> {
    over: &'a mut Option<BatchError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for BoundedRecords<'_> {
    type Value = Vec<Reported>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<Reported>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BoundedRecords<'_> {
    type Value = Vec<Reported>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Vec<Reported>, A::Error> {
        use serde::de::Error as _;
        let mut out = Vec::new();
        while let Some(r) = seq.next_element::<Reported>()? {
            let bytes = r.record.get().len();
            if bytes > MAX_RECORD_BYTES {
                *self.over = Some(BatchError::RecordTooLarge {
                    index: out.len(),
                    bytes,
                });
                return Err(A::Error::custom("record too large"));
            }
            if depth(r.record.get()) > MAX_RECORD_DEPTH {
                *self.over = Some(BatchError::RecordTooDeep { index: out.len() });
                return Err(A::Error::custom("record too deep"));
            }
            if out.len() == MAX_BATCH_RECORDS {
                *self.over = Some(BatchError::TooManyRecords);
                return Err(A::Error::custom("too many records"));
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// How deep `json` (valid JSON) nests arrays and objects, read byte by byte: brackets inside
/// strings do not count.
fn depth(json: &str) -> usize {
    let (mut deepest, mut now, mut in_string, mut escaped) = (0, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                now += 1;
                deepest = deepest.max(now);
            }
            b']' | b'}' => now = now.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reported {
    pub rid: u64,
    /// A record as the node's audit log holds it.
    #[schema(value_type = Object)]
    pub record: Box<serde_json::value::RawValue>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ingested {
    pub accepted: u64,
    pub duplicates: u64,
    /// Records older than the control plane's retention when they arrived: not stored.
    #[serde(default)]
    pub expired: u64,
}

/// A node as the control plane knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// The node's SPIFFE ID.
    pub node: String,
    pub first_seen: String,
    pub last_seen: String,
    pub applied_version: Option<u64>,
    pub applied_revision: Option<String>,
    pub agent_version: Option<String>,
    pub error: Option<String>,
    /// Who answers for the node's host, and its labels, as the node last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub owner: Option<crate::policy::owner::Owner>,
    #[serde(
        default,
        skip_serializing_if = "crate::policy::owner::Labels::is_empty"
    )]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub labels: crate::policy::owner::Labels,
    /// Records waiting in its spool, and records it lost, as it last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_records: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_lost: Option<u64>,
    /// Its live sessions per identity, as it last said.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sessions: std::collections::BTreeMap<String, u64>,
}

/// Most identities a poll names sessions for.
pub const POLL_SESSIONS: usize = 256;

/// A poll's `sessions`, or none when it does not fit (more than [`POLL_SESSIONS`], or a key
/// that is no SPIFFE ID): a node's listing, never its poll, pays for it.
fn lenient_sessions<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, u64>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    let Some(serde_json::Value::Object(m)) = v else {
        return Ok(Default::default());
    };
    if m.len() > POLL_SESSIONS {
        return Ok(Default::default());
    }
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in m {
        match (k.parse::<crate::identity::AgentId>(), v.as_u64()) {
            (Ok(_), Some(n)) => {
                out.insert(k, n);
            }
            _ => return Ok(Default::default()),
        }
    }
    Ok(out)
}

/// Filters of `GET /v1/flows`; every one optional.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FlowQuery {
    pub node: Option<String>,
    pub identity: Option<String>,
    /// deny | audit | unknown | socket-deny | allow
    pub verdict: Option<String>,
    /// An address as written in records (`203.0.113.7`, `2001:db8::1`).
    pub dest: Option<String>,
    pub service: Option<String>,
    /// Records of identities this owner answers for (as their policies name it).
    pub owner: Option<String>,
    /// RFC 3339 (UTC); records at or after.
    pub since: Option<String>,
    /// RFC 3339 (UTC); records before.
    pub until: Option<String>,
    /// Records with an id above this one (the `next` of the previous page).
    pub after: Option<u64>,
    /// Page size (default 100, at most 10,000).
    pub limit: Option<u32>,
    /// `decision` (default) or `loss`.
    pub kind: Option<String>,
    /// `ocsf`: the page's records as OCSF 1.3.0 events (an [`OcsfPage`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Only records tagged with a service (shadow AI); not a query parameter.
    #[serde(skip)]
    pub tagged: bool,
    /// Records of every kind (forwarding to a SIEM), `kind` ignored; not a query parameter.
    #[serde(skip)]
    pub every_kind: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredFlow {
    /// Ascending in arrival order; pages continue after it.
    pub id: u64,
    pub node: String,
    /// As the node sent it: kept as text, because a record parsed into a tree takes many
    /// times its size and a page holds thousands.
    #[schema(value_type = Object)]
    pub record: Box<serde_json::value::RawValue>,
}

impl StoredFlow {
    /// The record parsed, one at a time; None when it is not a JSON object.
    pub fn value(&self) -> Option<serde_json::Value> {
        serde_json::from_str(self.record.get())
            .ok()
            .filter(serde_json::Value::is_object)
    }
}

/// `GET /v1/alerts`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertsReply {
    /// What raises an alert (`[alerts]` of the control plane's config; webhooks by host).
    pub thresholds: crate::config::control_plane::Alerts,
    /// Alert records, oldest first: `alert` (its kind), `time`, `identity` or `subject`,
    /// `node`, `severity`, `summary`, `evidence`, `fingerprint`.
    #[schema(value_type = Vec<Object>)]
    pub alerts: Vec<serde_json::Value>,
}

/// The node name the control plane's alert records are stored under: no node's (theirs are
/// SPIFFE IDs), so a node cannot send a record that passes for an alert.
pub const ALERTS_NODE: &str = "control-plane";

/// A page of `GET /v1/flows?format=ocsf`.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OcsfPage {
    /// OCSF events, each with the stored record under `unmapped.agentwall` and its node
    /// under `unmapped.node`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Box<serde_json::value::RawValue>>,
    /// Records of the page with no OCSF class here (`kind=loss`) or no readable time.
    pub not_mapped: u64,
    /// Pass as `after` for the next page; absent on the last one.
    pub next: Option<u64>,
}

/// Most record text a page of flows holds: a page ends at `limit` records or at the first
/// record past this many bytes, whichever comes first (records may be `MAX_RECORD_BYTES`).
pub const PAGE_BYTES: usize = 8 << 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlowPage {
    pub flows: Vec<StoredFlow>,
    /// Pass as `after` for the next page; absent on the last one.
    pub next: Option<u64>,
}

/// Shadow AI seen by one node.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeShadowAi {
    pub node: String,
    /// Who answers for the node's host, and its labels, as the node last said: whom to ask
    /// about what runs there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub owner: Option<crate::policy::owner::Owner>,
    #[serde(
        default,
        skip_serializing_if = "crate::policy::owner::Labels::is_empty"
    )]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub labels: crate::policy::owner::Labels,
    pub groups: Vec<crate::discovery::ShadowGroup>,
    /// Records of process groups past the first [`crate::discovery::SHADOW_GROUPS`], counted
    /// and not shown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub records_left_out: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revocation {
    pub identity: String,
    pub generation: u64,
    pub at: String,
    pub by: String,
    /// Why, as the admin who revoked it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevokeRequest {
    pub identity: String,
    /// Why (kept with the revocation; at most 1,024 characters, no control characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `POST /v1/revocations` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revoked {
    pub identity: String,
    /// The revocation generation it made; nodes catch up to it.
    pub generation: u64,
}

/// One policy problem, as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WireError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every refusal's body.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// For a refused push: every problem in the bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<WireError>,
}

/// A bundle file name that is not a plain `*.yaml` / `*.yml` name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bundle file name {0:?} is not a plain *.yaml or *.yml file name")]
pub struct BadFileName(pub String);

/// Bundle file names are plain `*.yaml` / `*.yml` names: no directories, nothing hidden.
pub fn check_file_name(name: &str) -> Result<(), BadFileName> {
    let ok_ext = name.ends_with(".yaml") || name.ends_with(".yml");
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || !ok_ext
        || name.len() > 255
    {
        return Err(BadFileName(name.to_owned()));
    }
    Ok(())
}

/// Validates a bundle with the same code as `policy check`.
pub fn validate(files: &[BundleFile]) -> Result<crate::policy::source::PolicySet, Vec<WireError>> {
    let mut bad = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        if let Err(m) = check_file_name(&f.name) {
            bad.push(WireError {
                file: f.name.clone(),
                line: 0,
                column: 0,
                message: m.to_string(),
            });
        } else if !seen.insert(f.name.as_str()) {
            bad.push(WireError {
                file: f.name.clone(),
                line: 0,
                column: 0,
                message: "file name given twice".into(),
            });
        }
    }
    if !bad.is_empty() {
        return Err(bad);
    }
    let mut sorted: Vec<(std::path::PathBuf, String)> = files
        .iter()
        .map(|f| (std::path::PathBuf::from(&f.name), f.text.clone()))
        .collect();
    // The order `load_dir` reads a directory in, so the revision matches the node's.
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let wire = |errors: crate::policy::source::PolicyErrors| -> Vec<WireError> {
        errors
            .0
            .into_iter()
            .map(|e| WireError {
                file: e.file.display().to_string(),
                line: e.line,
                column: e.column,
                message: e.message,
            })
            .collect()
    };
    let set = crate::policy::source::parse_sources(sorted).map_err(wire)?;
    crate::policy::source::check_compiles(&set).map_err(wire)?;
    // A file named grant-* holds grants only: such files are what grants added to a bundle
    // may change (`policy::grant::grants_only_change`), so rules in one would pass as grants.
    let in_grant_file = |o: &crate::policy::source::Origin| {
        o.file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("grant-"))
    };
    let misplaced: Vec<WireError> = set
        .agents
        .iter()
        .map(|a| (&a.origin, "AgentPolicy", &a.name))
        .chain(
            set.archetypes
                .values()
                .map(|a| (&a.origin, "Archetype", &a.name)),
        )
        .filter(|(o, _, _)| in_grant_file(o))
        .map(|(o, kind, name)| WireError {
            file: o.file.display().to_string(),
            line: o.line,
            column: 1,
            message: format!(
                "{kind} {name:?} is in a file named grant-*, which holds grants only: name the file otherwise"
            ),
        })
        .collect();
    if !misplaced.is_empty() {
        return Err(misplaced);
    }
    Ok(set)
}

/// Every AgentPolicy of `set` that names no owner, as an error at its document: what a control
/// plane with `require_owner` refuses.
pub fn unowned(set: &crate::policy::source::PolicySet) -> Vec<WireError> {
    set.agents
        .iter()
        .filter(|a| a.owner.is_none())
        .map(|a| WireError {
            file: a.origin.file.display().to_string(),
            line: a.origin.line,
            column: 1,
            message: format!(
                "AgentPolicy {:?} has no owner, and this control plane requires one (require_owner): add `owner:`, a person or team",
                a.name
            ),
        })
        .collect()
}

/// Whether `l` is a database lineage as a control plane gives it (32 hex digits): anything
/// else is no lineage of any database, and neither side keeps or logs it.
pub fn is_lineage(l: &str) -> bool {
    l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The grants of `set` that end later than a grant made `now` may
/// ([`crate::policy::grant::ending_too_late`]), where each is.
pub fn grants_ending_too_late(
    set: &crate::policy::source::PolicySet,
    now: time::OffsetDateTime,
) -> Vec<WireError> {
    crate::policy::grant::ending_too_late(set, now)
        .into_iter()
        .map(|(g, e)| WireError {
            file: g.origin.file.display().to_string(),
            line: g.origin.line,
            column: 1,
            message: e.to_string(),
        })
        .collect()
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// `N` bytes from the system's random source; None when it fails.
pub(crate) fn random_bytes<const N: usize>() -> Option<[u8; N]> {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).ok()?;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_plain() {
        for bad in ["", ".x.yaml", "a/b.yaml", "../x.yaml", "x.txt", "x.yaml\0"] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        check_file_name("agents.yaml").unwrap();
        check_file_name("a.yml").unwrap();
    }

    #[test]
    fn a_bundle_has_the_revision_load_dir_gives() {
        let dir = tempfile::tempdir().unwrap();
        let text = "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\negress:\n  - to: [192.0.2.0/24]\n    ports: [443]\n    protocol: tcp\n";
        std::fs::write(dir.path().join("b.yaml"), text).unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: GlobalDeny\nto: [169.254.169.254]\n",
        )
        .unwrap();
        let from_dir = crate::policy::source::load_dir(dir.path());
        let files = vec![
            BundleFile {
                name: "b.yaml".into(),
                text: text.into(),
            },
            BundleFile {
                name: "a.yaml".into(),
                text: "kind: GlobalDeny\nto: [169.254.169.254]\n".into(),
            },
        ];
        match (from_dir, validate(&files)) {
            (Ok(d), Ok(b)) => assert_eq!(d.revision, b.revision),
            (d, b) => panic!("both should parse: {:?} / {:?}", d.err(), b.err()),
        }
    }

    #[test]
    fn a_push_the_datapath_could_not_hold_is_refused() {
        // Seventeen rules, each with a port of its own, on one prefix: even one entry per
        // rule does not fit.
        let rules: String = (0..17)
            .map(|i| format!("  - to: [192.0.2.0/24]\n    ports: [{}]\n", 8000 + i))
            .collect();
        let files = vec![BundleFile {
            name: "a.yaml".into(),
            text: format!(
                "kind: AgentPolicy\nname: many\nidentity: spiffe://example.org/agent/many\negress:\n{rules}"
            ),
        }];
        let errs = validate(&files).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].column), (1, 1));
        assert!(
            errs[0]
                .message
                .starts_with("AgentPolicy \"many\": 192.0.2.0/24 needs 17 port entries"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn a_file_named_grant_holds_grants_only() {
        let files = vec![BundleFile {
            name: "grant-team.yaml".into(),
            text: "kind: AgentPolicy\nname: team\nidentity: spiffe://example.org/agent/team\n"
                .into(),
        }];
        let errs = validate(&files).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "grant-team.yaml:1:1: AgentPolicy \"team\" is in a file named grant-*, which holds grants only: name the file otherwise"
        );
        assert!(is_lineage("0123456789abcdef0123456789ABCDEF"));
        assert!(!is_lineage("zzz") && !is_lineage(&"a".repeat(70_000)));
    }

    #[test]
    fn a_batch_is_bounded_as_it_is_read() {
        let rec = |i: usize| format!(r#"{{"rid":{i},"record":{{"kind":"decision"}}}}"#);
        let body = |n: usize| {
            let recs: Vec<String> = (0..n).map(rec).collect();
            format!(r#"{{"epoch":7,"x":[1],"records":[{}]}}"#, recs.join(","))
        };
        let (b, len) = ReportBatch::decode(body(3).as_bytes(), false).unwrap();
        assert_eq!((b.epoch, b.records.len(), len), (7, 3, body(3).len()));
        let e = ReportBatch::decode(body(MAX_BATCH_RECORDS + 1).as_bytes(), false).unwrap_err();
        assert!(matches!(e, BatchError::TooManyRecords), "{e}");
        assert!(e.is_too_large());
        let big = format!(
            r#"{{"epoch":1,"records":[{},{{"rid":2,"record":"{}"}}]}}"#,
            rec(1),
            "z".repeat(MAX_RECORD_BYTES)
        );
        let e = ReportBatch::decode(big.as_bytes(), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "record 1 of the batch is {} bytes; at most {MAX_RECORD_BYTES} a record",
                MAX_RECORD_BYTES + 2
            )
        );
        // Nesting past the bound is refused however it is spelled; brackets in strings are
        // text.
        let nested = |n: usize| {
            format!(
                r#"{{"epoch":1,"records":[{},{{"rid":2,"record":{{"a":{}1{}}}}}]}}"#,
                rec(1),
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(ReportBatch::decode(nested(MAX_RECORD_DEPTH - 1).as_bytes(), false).is_ok());
        for n in [MAX_RECORD_DEPTH, 100_000] {
            let e = ReportBatch::decode(nested(n).as_bytes(), false).unwrap_err();
            assert!(
                matches!(e, BatchError::RecordTooDeep { index: 1 }),
                "{n}: {e}"
            );
        }
        let strings = format!(
            r#"{{"epoch":1,"records":[{{"rid":1,"record":{{"a":"{}\"[{{","b":[]}}}}]}}"#,
            "[{".repeat(100)
        );
        assert!(ReportBatch::decode(strings.as_bytes(), false).is_ok());
        for bad in [
            r#"{"epoch":1}"#,
            r#"{"epoch":1,"records":[],"epoch":2}"#,
            r#"{"epoch":1,"records":[]} trailing"#,
            r#"[1,2]"#,
        ] {
            let e = ReportBatch::decode(bad.as_bytes(), false).unwrap_err();
            assert!(matches!(e, BatchError::NotABatch(_)), "{bad}: {e}");
        }
    }
}
