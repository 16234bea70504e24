//! The control plane's storage, behind one interface ([`Store`]): [`SqliteStore`] is the
//! embedded default (one file, WAL, one process); [`PgStore`] keeps everything in
//! PostgreSQL, which any number of control-plane replicas share.

use std::borrow::Cow;

use super::{
    Bundle, BundleFile, BundleInfo, FlowPage, FlowQuery, Ingested, NodeInfo, PollRequest, Proposal,
    Reported, Revocation,
    signing::{BundleSignature, Signing},
};

mod postgres;
mod sqlite;
#[cfg(test)]
mod tests;

pub use postgres::{PgOptions, PgStore};
pub use sqlite::SqliteStore;

#[cfg(any(test, feature = "testing"))]
pub use postgres::scratch;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `what` is the file, or the URL without its password.
    #[error("database {what}: {message}")]
    Open { what: String, message: String },
    #[error("database {what} has schema version {found}; this agentwall knows up to {known}")]
    TooNew {
        what: String,
        found: i64,
        known: i64,
    },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: {}", postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database: {0}")]
    Pool(String),
    #[error(
        "version {newest} was pushed since version {base}, which this push was made from; nothing was stored"
    )]
    NotNewest { base: u64, newest: u64 },
    #[error("no number is left above {0}")]
    Exhausted(u64),
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
    #[error("no proposal {0}")]
    NoProposal(u64),
    #[error("proposal {id} was approved already: it is bundle version {version}")]
    Approved { id: u64, version: u64 },
    #[error("proposal {id} is signed by key {key} already")]
    SignedAlready { id: u64, key: String },
}

impl StoreError {
    /// The database could not do it now (unreachable, a lock or a statement timed out, no
    /// connection free) but may a moment later: the caller may send it again.
    pub fn is_busy(&self) -> bool {
        match self {
            Self::Pool(_) => true,
            Self::Postgres(e) => match e.code() {
                // No answer from the server: the connection failed.
                None => true,
                Some(c) => {
                    let c = c.code();
                    c.starts_with("08")
                        || c.starts_with("53")
                        || c.starts_with("57")
                        || c.starts_with("40")
                        || c == "55P03"
                }
            },
            Self::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }
}

/// A node's poll, noted at `at`.
#[derive(Clone, Debug)]
pub struct NodeSeen {
    pub node: String,
    pub at: String,
    pub poll: PollRequest,
}

/// A browser signed in to the console. The store holds the cookie's SHA-256 only: a copy of
/// the database signs no one in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSession {
    pub id_sha256: String,
    /// What the browser signed in with, from which its roles are worked out at each request
    /// (a token or certificate taken out of the access list takes its sessions' rights with
    /// it): `token:<the token's SHA-256>` or `cert:<SPIFFE ID>`.
    pub credential: String,
    /// A certificate sign-in's chain (DER, hex, one per line): checked again at each request
    /// against the CRLs and the clock of that moment.
    pub chain: Option<String>,
    /// What state-changing requests must carry in `X-Agentwall-CSRF`.
    pub csrf: String,
    pub created: String,
    /// RFC 3339 (UTC, as `crate::clock::now_rfc3339` writes it, so text order is time order).
    pub expires: String,
}

/// A one-time sign-in link an admin made: whoever opens it first is signed in with the
/// admin's credential (its roles worked out when used, as a session's are).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleLink {
    pub code_sha256: String,
    /// As [`ConsoleSession::credential`].
    pub credential: String,
    pub chain: Option<String>,
    pub expires: String,
}

/// A join token an admin minted for an identity (`cp identity token`): kept by its SHA-256,
/// never the token; spent once per issuance, until it runs out, expires or is cancelled.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JoinToken {
    /// Names the token in lists and to cancel it (not the secret).
    pub id: String,
    #[serde(skip)]
    pub sha256: String,
    pub identity: String,
    pub expires: String,
    pub uses_left: u32,
    pub created_by: String,
    pub created: String,
    pub cancelled: bool,
}

/// A certificate the control plane's issuer signed: for a join (`token` names the token
/// spent) or a renewal, through `node`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Issuance {
    /// Hex, as nodes write serials.
    pub serial: String,
    pub identity: String,
    pub node: String,
    /// `join` or `renewal`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub issued: String,
    pub not_after: String,
    /// The chain (PEM) it was renewed into, once: asked again, the same is answered.
    #[serde(skip)]
    pub renewed_into: Option<String>,
}

/// Live console sign-ins kept per credential: signing in again past it ends the oldest, so
/// no one fills the database by signing in over and over.
pub const CONSOLE_SESSIONS_PER_CREDENTIAL: i64 = 16;

/// Everything the server keeps.
pub trait Store: Send + Sync {
    /// The database's lineage: [`lineage_of`] its first change, written into the database
    /// the first time it is asked for after that change (and kept there by every copy,
    /// backup and restore), never another after; None until the database has a change.
    fn lineage(&self) -> Result<Option<String>, StoreError>;
    /// Stores a validated bundle as the next version, numbered above `above` too: what a
    /// replica served, which a database put back to an older state no longer holds. With
    /// `base`, only while the newest stored version is `base` ([`StoreError::NotNewest`]).
    fn push_policy(
        &self,
        revision: &str,
        files: &[BundleFile],
        by: &str,
        above: u64,
        base: Option<u64>,
        signing: &Signing,
    ) -> Result<Bundle, StoreError>;
    /// Stores a validated push that awaits approvals.
    fn propose(
        &self,
        revision: &str,
        files: &[BundleFile],
        by: &str,
        signing: &Signing,
    ) -> Result<Proposal, StoreError>;
    /// The newest 1,000 proposals, newest first, without their files.
    fn proposals(&self) -> Result<Vec<Proposal>, StoreError>;
    /// A proposal with its files.
    fn proposal(&self, id: u64) -> Result<Option<Proposal>, StoreError>;
    /// Adds a checked signature to open proposal `id`; once signed by `required` distinct
    /// keys, stores it as the next bundle version (numbered above `above` too, as
    /// [`Store::push_policy`]) in the same transaction, and returns that bundle.
    fn approve(
        &self,
        id: u64,
        signature: &BundleSignature,
        required: usize,
        above: u64,
    ) -> Result<(Proposal, Option<Bundle>), StoreError>;
    /// A bundle by version, or the newest one.
    fn policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError>;
    /// The same, for what a replica serves (catch-up): over connections no reader takes.
    fn fresh_policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError> {
        self.policy(version)
    }
    /// Every stored version, newest first, without files.
    fn policy_versions(&self) -> Result<Vec<BundleInfo>, StoreError>;
    /// The revision stored as `version`, cheaply: a replica checks that what it serves
    /// under a number is what the database holds under it.
    fn revision_of(&self, version: u64) -> Result<Option<String>, StoreError> {
        Ok(self.fresh_policy(Some(version))?.map(|b| b.revision))
    }
    /// The newest bundle version (0: none) and the revocation generation, cheaply: what a
    /// replica compares with what it serves.
    fn heads(&self) -> Result<(u64, u64), StoreError>;
    /// Notes nodes' polls: last seen, applied revision, version, error.
    fn nodes_seen(&self, seen: &[NodeSeen]) -> Result<(), StoreError>;
    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;
    /// Stores reported records; ones already stored (same node, epoch, rid) are skipped, and
    /// ones older than the retention are not stored (counted as expired).
    fn ingest(&self, node: &str, epoch: u64, records: &[Reported]) -> Result<Ingested, StoreError>;
    /// Removes what the retention no longer keeps, as of `today`: records filed under an
    /// earlier day than `retention_days` before, then the oldest past `retention_max_bytes`.
    /// Done a little at a time: reports are stored meanwhile.
    fn retain(&self, today: time::Date) -> Result<Retained, StoreError>;
    fn flows(&self, q: &FlowQuery) -> Result<FlowPage, StoreError>;
    /// How the database runs the flows query `q` (its plan, one step a line): which index
    /// each filter uses.
    fn explain_flows(&self, q: &FlowQuery) -> Result<String, StoreError>;
    /// Revokes an identity fleet-wide; returns the new revocation generation, numbered above
    /// `above` too (unchanged when it was already revoked).
    fn revoke(
        &self,
        identity: &str,
        by: &str,
        reason: Option<&str>,
        above: u64,
    ) -> Result<u64, StoreError>;
    /// The revocation generation and every revocation.
    fn revocations(&self) -> Result<(u64, Vec<Revocation>), StoreError>;
    /// The same, for what a replica serves (catch-up): over connections no reader takes.
    fn fresh_revocations(&self) -> Result<(u64, Vec<Revocation>), StoreError> {
        self.revocations()
    }
    /// Walks what is held of `node`'s audit chain: each chained record (stored id, text) in
    /// ascending seq, then each of its loss records. False when nothing of the node is held.
    fn audit_chain(
        &self,
        node: &str,
        check: &mut super::chain::ChainCheck,
    ) -> Result<bool, StoreError>;
    /// Ticks whenever another process may have pushed a bundle or revoked an identity (and
    /// whenever that could have been missed, as when the database connection was lost), so
    /// a replica can compare [`Store::heads`] with what it serves. None when this process is
    /// the only writer.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Keeps a console sign-in, and forgets expired ones and all but the newest
    /// [`CONSOLE_SESSIONS_PER_CREDENTIAL`] of its credential's.
    fn console_open(&self, session: &ConsoleSession) -> Result<(), StoreError>;
    /// Ends every console sign-in, or those whose credential is `credential` (a token's may
    /// be given by its first hex digits, `token:0123456789ab`, as principals are named), and
    /// their unused sign-in links with them. Returns how many sessions ended.
    fn console_close_all(&self, credential: Option<&str>) -> Result<u64, StoreError>;
    /// The unexpired console sign-in whose cookie hashes to `id_sha256`.
    fn console_session(&self, id_sha256: &str) -> Result<Option<ConsoleSession>, StoreError>;
    /// Ends a console sign-in (sign-out); false when there was none.
    fn console_close(&self, id_sha256: &str) -> Result<bool, StoreError>;
    /// Takes, or keeps, the lease on forwarding `name` for `holder` for `lease` (by the
    /// database's clock where replicas share one, so a replica whose clock runs ahead cannot
    /// hold it past its death), unless another holder's lease is unexpired: the cursor
    /// (records with ids above it are not forwarded yet; the first claim starts it at the
    /// newest record stored), or None while another replica forwards. A lease that reaches
    /// further ahead than twice `lease` (written by a clock since set back) counts as run out.
    fn forward_claim(
        &self,
        name: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<Option<u64>, StoreError>;
    /// Moves the cursor of forwarding `name` on to `after` (never back); false when `holder`
    /// no longer holds it (another replica took over and may send those records again).
    fn forward_advance(&self, name: &str, holder: &str, after: u64) -> Result<bool, StoreError>;
    /// How many records the cursor of forwarding `name` is behind the newest stored (None:
    /// no such forwarding yet).
    fn forward_behind(&self, name: &str) -> Result<Option<u64>, StoreError>;
    /// The baseline entries held of `keys` ((subject, what): an identity on a node, a
    /// destination or process group; `what` empty for the subject itself): when each was
    /// first seen. Reads only: what a page of records saw is noted by
    /// [`Store::baseline_note`] once its alerts are stored.
    fn baseline(&self, keys: &[(String, String)]) -> Result<Baseline, StoreError>;
    /// Notes (subject, what, time) seen: an entry's first time only ever moves back, and
    /// each entry noted is kept for the retention's days from `today` (then forgotten, as
    /// the records are).
    fn baseline_note(
        &self,
        seen: &[(String, String, String)],
        today: &str,
    ) -> Result<(), StoreError>;
    /// Keeps a one-time sign-in link (its code's SHA-256), and forgets expired ones.
    fn console_link_open(&self, link: &ConsoleLink) -> Result<(), StoreError>;
    /// Takes the unexpired link whose code hashes to `code_sha256`: it is gone after, so it
    /// signs in once, on any replica.
    fn console_link_take(&self, code_sha256: &str) -> Result<Option<ConsoleLink>, StoreError>;
    /// Keeps a new join token.
    fn token_create(&self, t: &JoinToken) -> Result<(), StoreError>;
    /// Every join token, newest first (at most 1,000), expired ones up to a day after.
    fn tokens(&self) -> Result<Vec<JoinToken>, StoreError>;
    /// Cancels a token by its id; false when there is none (or it was cancelled already).
    fn token_cancel(&self, id: &str) -> Result<bool, StoreError>;
    /// Spends one use of the live token whose SHA-256 is `sha256`, atomically across
    /// replicas; None when there is no such token, or it is spent, expired or cancelled.
    fn token_spend(&self, sha256: &str) -> Result<Option<JoinToken>, StoreError>;
    /// The identity of the live token whose SHA-256 is `sha256`, without spending it.
    fn token_identity(&self, sha256: &str) -> Result<Option<String>, StoreError>;
    /// Whether the token with this id was cancelled (cancelled tokens are kept).
    fn token_cancelled(&self, id: &str) -> Result<bool, StoreError>;
    /// Notes that the certificate `serial` was renewed into `chain`, unless it was renewed
    /// already: false then (one renewal a certificate, across replicas).
    fn renewed(&self, serial: &str, chain: &str) -> Result<bool, StoreError>;
    /// Records an issuance, and forgets those whose certificates ended more than the
    /// retention's days ago.
    fn issued(&self, i: &Issuance) -> Result<(), StoreError>;
    /// The issuance of the certificate with this serial.
    fn issuance(&self, serial: &str) -> Result<Option<Issuance>, StoreError>;
    /// Issuances, newest first (at most `limit`).
    fn issuances(&self, limit: usize) -> Result<Vec<Issuance>, StoreError>;
    /// Spends a node's report quotas that every replica on this database shares: all of
    /// `spend` or nothing. Some(seconds to wait) when one is spent. Without other replicas
    /// (SQLite) there is nothing to share: the server's own count is the whole.
    fn spend_shared(&self, _node: &str, _spend: &[Spend]) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

/// What [`Store::baseline`] found: (subject, what) to the time first seen.
pub type Baseline = std::collections::HashMap<(String, String), String>;

/// Lease ends are compared as text: one format, to the millisecond, everywhere.
pub fn lease_end(lease: std::time::Duration) -> (String, String, String) {
    let now = std::time::SystemTime::now();
    (
        crate::clock::rfc3339(now),
        crate::clock::rfc3339(now + lease),
        crate::clock::rfc3339(now + lease * 2),
    )
}

/// Part of a node's report quota to spend: `n` of what it may send `per_minute`, with
/// bursts of up to `burst`.
#[derive(Clone, Copy, Debug)]
pub struct Spend {
    pub kind: &'static str,
    pub n: u64,
    pub per_minute: u64,
    pub burst: u64,
}

impl Spend {
    /// (the quota's new state, or the seconds to wait): the generic cell rate algorithm,
    /// its state the theoretical arrival time `tat` (seconds), at `now`.
    fn at(&self, tat: f64, now: f64) -> Result<f64, f64> {
        let interval = 60.0 / self.per_minute.max(1) as f64;
        let next = tat.max(now) + self.n as f64 * interval;
        let late = next - now - self.burst.max(1) as f64 * interval;
        if late <= 0.0 { Ok(next) } else { Err(late) }
    }
}

/// The first change a database holds: the earlier of its first bundle and its first
/// revocation (by their times; the bundle on a tie). Never removed, and never another once
/// there is one (a later push or revocation is later), so it names the database's history:
/// every copy, backup and restore of it has it, and another database's is another.
const FIRST_CHANGE: &str = "SELECT what, a, b, c FROM (
        SELECT 'policy' AS what, revision AS a, pushed_at AS b, pushed_by AS c, 0 AS o
        FROM (SELECT * FROM policy ORDER BY version LIMIT 1) p
        UNION ALL
        SELECT 'revocation', identity, at, by, 1
        FROM (SELECT * FROM revocations ORDER BY generation LIMIT 1) r
    ) f ORDER BY b, o LIMIT 1";

/// A database's lineage: a digest of its first change ([`FIRST_CHANGE`]), the same for
/// every replica on it and kept by its backups (taken before or after an upgrade, restored
/// whole or data only). Numbers of another lineage say nothing about this one's.
fn lineage_of(what: &str, a: &str, b: &str, c: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(format!("{what}\n{a}\n{b}\n{c}").as_bytes());
    hex::encode(&d[..16])
}

/// A number to give above, as both databases keep numbers (64-bit signed).
fn number(above: u64) -> Result<i64, StoreError> {
    i64::try_from(above)
        .ok()
        .filter(|n| *n < i64::MAX)
        .ok_or(StoreError::Exhausted(above))
}

/// What is kept of stored records (`retention_days`, `retention_max_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub days: u32,
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            days: 90,
            max_bytes: None,
        }
    }
}

/// What a record counts against `retention_max_bytes`: its text, and [`ROW_COST`] for the
/// row and its index entries, so a flood of tiny records is counted near what it takes on
/// disk. (The stores' SQL adds the same 512.)
pub const ROW_COST: i64 = 512;

fn charged(text: &str) -> i64 {
    text.len() as i64 + ROW_COST
}

/// Rows read at a time when evicting a node's oldest records past `retention_max_bytes`.
const EVICT_BATCH: i64 = 2_000;

/// Of `rows` (id, bytes) in id order, the last id to remove to free at least `bytes`.
fn evict_through(rows: &[(i64, i64)], bytes: u64) -> Option<i64> {
    let mut freed = 0u64;
    for (id, b) in rows {
        freed += (*b).max(0) as u64;
        if freed >= bytes {
            return Some(*id);
        }
    }
    rows.last().map(|(id, _)| *id)
}

/// What one pass of [`Store::retain`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retained {
    /// Records filed under days past the retention.
    pub expired: u64,
    /// Records removed, oldest first, to keep under `retention_max_bytes`.
    pub over_size: u64,
    /// Another replica was removing them (it held the retention lock).
    pub skipped: bool,
}

/// Under `retention_max_bytes`, whose records go next, and how many of their bytes: the
/// node holding the most, so a node's flood (records dated today, say) evicts its own before
/// anyone else's history; down to the next-largest holder at most, so holders are levelled
/// rather than one emptied. `held`: bytes of records per node. None when within `max`.
fn evict_next(held: &[(String, u64)], max: u64) -> Option<(&str, u64)> {
    let total: u64 = held.iter().map(|(_, b)| b).sum();
    if total <= max {
        return None;
    }
    let mut by_size: Vec<&(String, u64)> = held.iter().filter(|(_, b)| *b > 0).collect();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let (node, most) = by_size.first()?;
    let next = by_size.get(1).map_or(0, |(_, b)| *b);
    // Holders level with each other give a share each of what is over, not a row each.
    let over = total - max;
    let share = over.div_ceil(by_size.len() as u64);
    Some((node, over.min((most - next).max(share)).max(1)))
}

/// A node's labels as stored: JSON, or NULL when it has none.
fn labels_text(l: &crate::policy::owner::Labels) -> Option<String> {
    (!l.is_empty()).then(|| serde_json::to_string(l).expect("labels serialize"))
}

/// A stored node with the owner and labels it last said, checked as when it said them: one
/// this version does not take is left out of that node's row (and logged), never a reason to
/// fail the whole listing.
fn described(mut n: NodeInfo, owner: Option<String>, labels: Option<String>) -> NodeInfo {
    if let Some(o) = owner {
        match o.parse() {
            Ok(o) => n.owner = Some(o),
            Err(e) => tracing::warn!(node = %n.node, error = %e, "stored owner left out"),
        }
    }
    if let Some(l) = labels {
        match serde_json::from_str(&l) {
            Ok(l) => n.labels = l,
            Err(e) => tracing::warn!(node = %n.node, error = %e, "stored labels left out"),
        }
    }
    n
}

/// Today (UTC), as records are filed.
pub fn today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}

/// The day a record is filed under, which retention goes by: the day of its `time`; a
/// record with no readable time, or one from more than a day ahead (a clock far off), is
/// filed under `today` (or tomorrow). None: older than the retention, not stored. A record
/// sent again (a node retrying) is filed under the same day as before, so the two are one.
fn file_day(time: &str, today: time::Date, r: &Retention) -> Option<time::Date> {
    let tomorrow = today.next_day().unwrap_or(today);
    let first = today
        .checked_sub(time::Duration::days(i64::from(r.days)))
        .unwrap_or(time::Date::MIN);
    match time.get(..10).and_then(|d| time::Date::parse(d, DAY).ok()) {
        None => Some(today),
        Some(d) if d < first => None,
        Some(d) if d > tomorrow => Some(tomorrow),
        Some(d) => Some(d),
    }
}

/// How days are written (and partitions named after them).
const DAY: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

fn day_text(d: time::Date) -> String {
    d.format(DAY).expect("dates format")
}

/// Opens the database `cfg` names, migrating its schema. Blocks: call it off the async
/// runtime's workers.
pub fn open(
    cfg: &crate::config::control_plane::ServerConfig,
) -> Result<Box<dyn Store>, StoreError> {
    use crate::config::control_plane::Database;
    Ok(match &cfg.database {
        Database::Sqlite(path) => Box::new(SqliteStore::open(path, cfg.retention())?),
        Database::Postgres(url) => Box::new(PgStore::open(&PgOptions {
            url: url.clone(),
            password_file: cfg.database_password_file.clone(),
            ca: cfg.database_ca.clone(),
            retention: cfg.retention(),
        })?),
    })
}

/// The fields a record is indexed by. Text is borrowed where it can be and copied where the
/// JSON escaped it (a quote or a non-ASCII letter in a name).
#[derive(serde::Deserialize)]
struct Indexed<'a> {
    #[serde(default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    verdict: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    identity: Option<Cow<'a, str>>,
    /// Kept as text: a record whose `dest` is not an address is stored without one.
    #[serde(default, borrow)]
    dest: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    service: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    owner: Option<Cow<'a, str>>,
    /// The record's place in the node's audit chain, when it came from the log.
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    prev: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    hash: Option<Cow<'a, str>>,
}

/// The longest text an indexed column takes from a record (the record's own text keeps it
/// whole): an index entry has a size limit, and a node's record must not fail its batch on
/// it.
const MAX_INDEXED: usize = 1024;
/// The longest `time` taken (an RFC 3339 time is some 30 bytes).
const MAX_TIME: usize = 64;

/// `s` cut to at most `max` bytes, at a character boundary.
fn bounded(s: Cow<'_, str>, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return s;
    }
    Cow::Owned(crate::text::prefix(&s, max).to_owned())
}

/// A reported record as both stores keep it: its text and the columns it is found by.
struct Row<'a> {
    rid: i64,
    kind: Cow<'a, str>,
    time: Cow<'a, str>,
    verdict: Option<Cow<'a, str>>,
    identity: Option<Cow<'a, str>>,
    /// The address's canonical text, as the flows filter asks for it.
    dest: Option<String>,
    service: Option<Cow<'a, str>>,
    owner: Option<Cow<'a, str>>,
    text: &'a str,
    audit_seq: Option<i64>,
    /// Set only when the hash is the record's own.
    audit_hash: Option<Cow<'a, str>>,
    /// The day it is filed under ([`file_day`]), written as text.
    day: String,
}

impl<'a> Row<'a> {
    /// The record as stored; None when it is older than the retention.
    fn of(
        epoch: u64,
        r: &'a Reported,
        today: time::Date,
        retention: &Retention,
    ) -> Result<Option<Self>, StoreError> {
        let text = r.record.get();
        let ix: Indexed<'a> = serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("record {} of epoch {epoch}: {e}", r.rid)))?;
        let chained = match (ix.seq, &ix.prev, ix.hash) {
            (Some(seq), Some(_), Some(hash)) => Some((seq.min(i64::MAX as u64) as i64, hash)),
            _ => None,
        };
        // Kept by its hash only when the hash is its own: a record carrying another one's
        // hash (sent first) must not shut the real one out as a duplicate. It is still in the
        // chain by its seq, where the check names it.
        let own_hash = chained.as_ref().is_some_and(|(_, hash)| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                .is_ok_and(|m| crate::audit::record_hash(&m) == *hash)
        });
        let (audit_seq, audit_hash) = match chained {
            Some((seq, hash)) => (Some(seq), own_hash.then_some(hash)),
            None => (None, None),
        };
        let time = bounded(ix.time.unwrap_or_default(), MAX_TIME);
        let Some(day) = file_day(&time, today, retention) else {
            return Ok(None);
        };
        Ok(Some(Row {
            rid: r.rid as i64,
            kind: bounded(ix.kind.unwrap_or(Cow::Borrowed("decision")), MAX_INDEXED),
            time,
            verdict: ix.verdict.map(|v| bounded(v, MAX_INDEXED)),
            identity: ix.identity.map(|v| bounded(v, MAX_INDEXED)),
            dest: ix
                .dest
                .as_deref()
                .and_then(|d| d.parse::<std::net::IpAddr>().ok())
                .map(|d| d.to_string()),
            service: ix.service.map(|v| bounded(v, MAX_INDEXED)),
            owner: ix.owner.map(|v| bounded(v, MAX_INDEXED)),
            text,
            audit_seq,
            audit_hash,
            day: day_text(day),
        }))
    }
}

/// A value a flows query binds.
enum Arg {
    Text(String),
    Int(i64),
}

/// The flows query, for both stores: `placeholder(n)` writes the n-th (from 1) parameter
/// the way the database spells it. The filters are columns with indexes (see the
/// migrations); ordered by id, a page at a time.
fn flows_sql(q: &FlowQuery, placeholder: impl Fn(usize) -> String) -> (String, Vec<Arg>, usize) {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000) as usize;
    let mut sql = String::from("SELECT id, node, record FROM flows WHERE TRUE");
    let mut args = Vec::new();
    let mut filter = |col: &str, op: &str, v: Arg| {
        args.push(v);
        sql.push_str(&format!(" AND {col} {op} {}", placeholder(args.len())));
    };
    if !q.every_kind {
        filter(
            "kind",
            "=",
            Arg::Text(q.kind.clone().unwrap_or_else(|| "decision".into())),
        );
    }
    for (col, v) in [
        ("node", &q.node),
        ("identity", &q.identity),
        ("verdict", &q.verdict),
        ("dest", &q.dest),
        ("service", &q.service),
        ("owner", &q.owner),
    ] {
        if let Some(v) = v {
            filter(col, "=", Arg::Text(v.clone()));
        }
    }
    if let Some(s) = &q.since {
        filter("time", ">=", Arg::Text(s.clone()));
    }
    if let Some(u) = &q.until {
        filter("time", "<", Arg::Text(u.clone()));
    }
    if let Some(a) = q.after {
        filter("id", ">", Arg::Int(a as i64));
    }
    if q.tagged {
        sql.push_str(" AND service IS NOT NULL");
    }
    sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
    (sql, args, limit)
}

/// A page of flows being filled from the rows a query gives, in id order: full at `limit`
/// records or once past [`super::PAGE_BYTES`] of record text.
struct Pager {
    flows: Vec<super::StoredFlow>,
    bytes: usize,
    limit: usize,
}

impl Pager {
    fn new(limit: usize) -> Self {
        Pager {
            flows: Vec::new(),
            bytes: 0,
            limit,
        }
    }

    fn full(&self) -> bool {
        self.flows.len() >= self.limit || self.bytes >= super::PAGE_BYTES
    }

    /// Takes a row; false once the page is full (the rest are for the next page).
    fn push(&mut self, id: i64, node: String, text: String) -> Result<bool, StoreError> {
        self.bytes = self.bytes.saturating_add(text.len());
        let record = serde_json::value::RawValue::from_string(text)
            .map_err(|e| StoreError::Corrupt(format!("flow {id}: {e}")))?;
        self.flows.push(super::StoredFlow {
            id: id as u64,
            node,
            record,
        });
        Ok(!self.full())
    }

    fn finish(self) -> FlowPage {
        let next = self
            .full()
            .then(|| self.flows.last().map(|f| f.id))
            .flatten();
        FlowPage {
            flows: self.flows,
            next,
        }
    }
}

/// A node's sessions per identity, as stored (JSON; None when it has none).
fn sessions_text(s: &std::collections::BTreeMap<String, u64>) -> Option<String> {
    (!s.is_empty()).then(|| serde_json::to_string(s).unwrap_or_default())
}

/// The stored sessions per identity (none when unreadable: the listing shows the node
/// anyway).
fn sessions_of(text: Option<&str>) -> std::collections::BTreeMap<String, u64> {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

/// A count a node said, as the database's signed integer (a lying node's u64::MAX is kept
/// as the largest it holds).
/// A `policy` row: version, revision, pushed_at, pushed_by, files, signing.
type BundleRow = (u64, String, String, String, String, Option<String>);
/// A `proposals` row: id, revision, pushed_at, pushed_by, files, signing, version.
type ProposalRow = (u64, String, String, String, String, String, Option<u64>);

/// A bundle's signing as stored: None when unsigned.
fn signing_text(s: &Signing) -> Option<String> {
    (!s.is_empty()).then(|| serde_json::to_string(s).expect("signing serializes"))
}

fn signing_of(text: Option<&str>, what: &str) -> Result<Signing, StoreError> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(Signing::default()),
        Some(t) => serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("{what}: {e}"))),
    }
}

fn bundle_of(
    version: u64,
    revision: String,
    pushed_at: String,
    pushed_by: String,
    files: &str,
    signing: Option<&str>,
) -> Result<Bundle, StoreError> {
    let what = format!("policy version {version}");
    Ok(Bundle {
        version,
        revision,
        pushed_at,
        pushed_by,
        files: serde_json::from_str(files)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?,
        signing: signing_of(signing, &what)?,
    })
}

fn proposal_of(
    (id, revision, pushed_at, pushed_by, files, signing, version): ProposalRow,
) -> Result<Proposal, StoreError> {
    let what = format!("proposal {id}");
    Ok(Proposal {
        id,
        revision,
        pushed_at,
        pushed_by,
        signing: signing_of(Some(&signing), &what)?,
        version,
        files: serde_json::from_str(&files)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?,
    })
}

/// Proposal `p` as bundle `version`, published at `at` (and noted in `p`).
fn published(p: &mut Proposal, version: u64, at: String) -> Bundle {
    p.version = Some(version);
    Bundle {
        version,
        revision: p.revision.clone(),
        pushed_at: at,
        pushed_by: p.pushed_by.clone(),
        files: p.files.clone(),
        signing: p.signing.clone(),
    }
}

/// Adds `signature` to open proposal `p`: whether it now holds `required` distinct keys'.
fn add_approval(
    p: &mut Proposal,
    signature: &BundleSignature,
    required: usize,
) -> Result<bool, StoreError> {
    if let Some(version) = p.version {
        return Err(StoreError::Approved { id: p.id, version });
    }
    if p.signing.signatures.iter().any(|s| s.key == signature.key) {
        return Err(StoreError::SignedAlready {
            id: p.id,
            key: signature.key.clone(),
        });
    }
    p.signing.signatures.push(signature.clone());
    Ok(p.signing.signatures.len() >= required)
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn now() -> String {
    crate::clock::now_rfc3339()
}

/// The time `days` ago, as stored times are written.
fn days_ago(days: u32) -> String {
    crate::clock::rfc3339(
        std::time::SystemTime::now() - std::time::Duration::from_secs(u64::from(days) * 86_400),
    )
}
