//! The node's side: long-polls the control plane for policy bundles and revocations, and
//! ships the node's records through the spool.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tracing::{error, info, warn};

use crate::config::control_plane::ClientConfig;

use super::{
    Bundle, PollReply, PollRequest, ReportBatch,
    client::{Client, ClientError},
    spool::Spool,
};

/// Why the node did not apply a bundle (its own error, whatever the node's type).
pub type ApplyError = Box<dyn std::error::Error + Send + Sync>;

/// Most of an error a node keeps and sends in its polls: what a control plane sent can be in
/// it, and a poll too large to take would keep the node away for good.
const MAX_ERROR: usize = 2048;

/// `e` cut to [`MAX_ERROR`] bytes (at a character), marked when cut.
fn bounded(mut e: String) -> String {
    if e.len() > MAX_ERROR {
        e.truncate(crate::text::prefix(&e, MAX_ERROR).len());
        e.push_str(" (cut)");
    }
    e
}

/// What the node does with what the control plane sends.
pub trait NodeSide: Send + Sync + 'static {
    /// Applies a validated bundle (already written to `policy_dir`); why, when it was refused.
    fn apply_bundle(&self, set: crate::policy::source::PolicySet) -> Result<(), ApplyError>;
    /// Revokes identities fleet-wide (known to this node or not); returns those it could not
    /// revoke (the link asks again until each is done).
    fn revoke_all(&self, identities: &[String]) -> Vec<String>;
    /// Records written since the last call, oldest first.
    fn take_outbox(&self) -> Vec<serde_json::Value>;
    /// Live sessions per identity (the control plane shows them with the identity).
    fn sessions_by_identity(&self) -> std::collections::BTreeMap<String, u64> {
        Default::default()
    }
    /// The revision in force, and why the policy it read last was not applied (a node
    /// that started on its last good revision says so here).
    fn policy_in_force(&self) -> (String, Option<String>) {
        (String::new(), None)
    }
}

/// Counters for the node's metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connected: AtomicBool,
    /// Poll answers older than what the node had (refused).
    pub stale_answers: AtomicU64,
    /// The control plane (of several replicas, the one) polled.
    pub polling: std::sync::OnceLock<super::client::CurrentUrl>,
    pub applied_version: AtomicU64,
    pub spool_records: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub sent: AtomicU64,
    pub duplicates: AtomicU64,
    pub lost: AtomicU64,
    /// Fleet-wide revocations this node has not managed to apply yet (retried).
    pub revocations_pending: Mutex<Vec<String>>,
    /// Polls a newer poll as this node ended (another holder of its certificate?).
    pub polls_replaced: AtomicU64,
    /// Report batches the control plane asked to send again later (over a quota, busy).
    pub reports_deferred: AtomicU64,
    /// Records the control plane refused as too large even alone: dropped from the spool
    /// (counted in `lost` too).
    pub records_refused: AtomicU64,
    /// Why the newest bundle from the control plane was not applied (shown by `status`).
    pub bundle_refused: Mutex<Option<String>>,
}

/// At most [`super::POLL_SESSIONS`] identities, those with the most sessions.
fn polled_sessions(
    all: std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    if all.len() <= super::POLL_SESSIONS {
        return all;
    }
    let mut v: Vec<(String, u64)> = all.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(super::POLL_SESSIONS);
    v.into_iter().collect()
}

/// The count (and the span of audit seqs) a spool or outbox loss record carries, when
/// `records` is one.
fn loss_count(records: &[super::Reported]) -> Option<(u64, Option<(u64, u64)>)> {
    let [r] = records else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(r.record.get()).ok()?;
    if v.get("kind")? != "loss" {
        return None;
    }
    // The counts a node's own loss records carry for records the control plane never got.
    let spool = v
        .get("spool_records_lost")
        .and_then(serde_json::Value::as_u64);
    let outbox = v
        .get("outbox_records_lost")
        .and_then(serde_json::Value::as_u64);
    if spool.is_none() && outbox.is_none() {
        return None;
    }
    let span = ["spool_seqs_lost", "outbox_seqs_lost"]
        .iter()
        .filter_map(|k| super::chain::seq_span(v.get(*k)?))
        .reduce(|(a, b), (x, y)| (a.min(x), b.max(y)));
    Some((spool.unwrap_or(0).saturating_add(outbox.unwrap_or(0)), span))
}

/// The audit seq of the record `records` is, when it is one record from the log.
fn lone_seq(records: &[super::Reported]) -> Option<u64> {
    let [r] = records else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(r.record.get()).ok()?;
    v.get("hash")?;
    v.get("seq")?.as_u64()
}

/// Longest wait a `Retry-After` may impose on the report loop.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long the link waits after a poll a newer one as the same node ended.
const REPLACED_PAUSE: Duration = Duration::from_secs(5);

/// Kept in `state_dir/control-plane/link.json`: where the conversation stands.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct LinkState {
    known_version: u64,
    revocation_gen: u64,
    applied_version: Option<u64>,
    applied_revision: Option<String>,
    error: Option<String>,
    /// The lineage of the database the numbers above came from.
    #[serde(default)]
    lineage: Option<String>,
    /// The signed `not_before` of the bundle applied: no older signed bundle is taken,
    /// whatever number a control plane gives it.
    #[serde(default)]
    applied_not_before: Option<String>,
    /// The revision of the bundle that set `applied_not_before` (kept before it is applied,
    /// so the same bundle is taken again after a crash in between).
    #[serde(default)]
    floor_revision: Option<String>,
    /// The full bundle under the one applied (its `adds_to`, or its own `not_before`):
    /// grants are taken only on that bundle or a later one. A state kept before it was
    /// recorded counts the one applied as full (stricter).
    #[serde(default)]
    applied_root: Option<String>,
}

impl LinkState {
    fn load(path: &Path) -> Self {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => return Self::lost(path, &e.to_string()),
        };
        serde_json::from_str(&text).unwrap_or_else(|e| Self::lost(path, &e.to_string()))
    }

    /// A state that could not be read: the rollback floor it held is unknown, so it is
    /// taken as now (only bundles signed from now on are taken), never as none.
    fn lost(path: &Path, why: &str) -> Self {
        error!(path = %path.display(), error = why,
            "the control plane link state is unreadable; taking only bundles signed from now on");
        LinkState {
            applied_not_before: Some(crate::clock::now_rfc3339()),
            ..Self::default()
        }
    }

    fn save(&self, path: &Path) {
        if let Err(e) = self.write(path) {
            warn!(error = %e, path = %path.display(), "could not keep the control plane link state");
        }
    }

    fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("link state");
        crate::files::write_atomic(path, &text)
    }
}

/// The files (name, text) of the bundle in force: what the node saved when it applied it.
fn in_force(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            files.push((name.to_owned(), std::fs::read_to_string(&p)?));
        }
    }
    Ok(files)
}

pub struct Link {
    poll: Client,
    reports: Client,
    spool: Arc<Mutex<Spool>>,
    state_path: PathBuf,
    policy_dir: PathBuf,
    pub stats: Arc<LinkStats>,
    /// Who answers for this host, and its labels: said in every poll.
    owner: Option<crate::policy::owner::Owner>,
    labels: crate::policy::owner::Labels,
    /// The keys bundles must be signed with, how many of them (0: bundles need none), and
    /// how many suffice for a bundle that only adds break-glass grants.
    signers: Arc<(super::signing::Keyring, usize, Option<usize>)>,
}

const BATCH: usize = 5000;

impl Link {
    pub fn new(cfg: &ClientConfig, state_dir: &Path) -> Result<Self, LinkError> {
        let dir = state_dir.join("control-plane");
        let spool = Spool::open(&dir.join("spool"), cfg.spool_max_bytes())?;
        let stats = Arc::new(LinkStats::default());
        stats.spool_records.store(spool.pending(), Relaxed);
        stats.spool_bytes.store(spool.bytes(), Relaxed);
        std::fs::create_dir_all(crate::config::control_plane_policy_dir(state_dir)).map_err(
            |source| LinkError::Io {
                path: crate::config::control_plane_policy_dir(state_dir),
                source,
            },
        )?;
        let keyring = super::signing::Keyring::load_files(&cfg.trusted_signers)?;
        // Several keys and no count: the two-person rule is the node's to enforce, so the
        // count is said, never assumed.
        let required = match cfg.signatures_required {
            Some(n) => n as usize,
            None if keyring.len() > 1 => {
                return Err(LinkError::Signers(format!(
                    "trusted_signers names {} keys: set signatures_required, how many of them must sign a bundle",
                    keyring.len()
                )));
            }
            None => usize::from(!keyring.is_empty()),
        };
        if required > keyring.len() {
            return Err(LinkError::Signers(format!(
                "signatures_required is {required}, and trusted_signers names {} key(s): no bundle could be applied",
                keyring.len()
            )));
        }
        let break_glass = cfg.break_glass_signatures.map(|n| n as usize);
        // At or above signatures_required it changes nothing.
        if let Some(n) = break_glass
            && (n == 0 || n > keyring.len())
        {
            return Err(LinkError::Signers(format!(
                "break_glass_signatures is {n}: it is 1 to the {} key(s) trusted_signers names",
                keyring.len()
            )));
        }
        let poll = Client::new(cfg)?;
        let _ = stats.polling.set(poll.current_url());
        Ok(Self {
            poll,
            reports: Client::new(cfg)?,
            spool: Arc::new(Mutex::new(spool)),
            state_path: dir.join("link.json"),
            policy_dir: crate::config::control_plane_policy_dir(state_dir),
            stats,
            owner: None,
            labels: Default::default(),
            signers: Arc::new((keyring, required, break_glass)),
        })
    }

    /// Says in every poll who answers for this host, and its labels.
    pub fn describing(
        mut self,
        owner: Option<crate::policy::owner::Owner>,
        labels: crate::policy::owner::Labels,
    ) -> Self {
        (self.owner, self.labels) = (owner, labels);
        self
    }

    /// The seq of the last audit record the spool took (see [`Spool::handled`]); a new
    /// spool starts after `head`, the audit log's head now (none: no audit log).
    pub fn handled(&self, head: Option<u64>) -> Result<Option<u64>, LinkError> {
        let mut s = self.spool.lock().expect("spool");
        if let Some(h) = head {
            s.start_at(h)?;
        }
        Ok(s.handled())
    }

    /// Runs both loops for as long as the node runs.
    pub fn spawn(self, node: Arc<dyn NodeSide>) {
        let link = Arc::new(self);
        tokio::spawn(link.clone().poll_loop(node.clone()));
        tokio::spawn(link.report_loop(node));
    }

    async fn poll_loop(self: Arc<Self>, node: Arc<dyn NodeSide>) {
        let mut st = LinkState::load(&self.state_path);
        // Junk a control plane gave an earlier version is cleaned, so every poll is one a
        // control plane takes. A junk lineage came with numbers of no database: dropped as a
        // move to another database, numbers and all, or a number near the end kept with it
        // would make every honest answer look old.
        if st.lineage.as_deref().is_some_and(|l| !super::is_lineage(l)) {
            warn!(
                "the control plane link state names no database's lineage; its numbers are dropped with it"
            );
            st.lineage = None;
            st.known_version = 0;
            st.revocation_gen = 0;
        }
        st.error = st.error.map(bounded);
        // No state beside bundles it kept (the file deleted): the floor it held is unknown,
        // as for a state that cannot be read, not none.
        if self.signers.1 > 0
            && !self.state_path.exists()
            && in_force(&self.policy_dir).is_ok_and(|f| !f.is_empty())
        {
            st = LinkState::lost(&self.state_path, "it is missing beside the bundles kept");
        }
        // A node that started on its last good revision (the kernel refused the bundle it
        // kept) does not have the bundle the state names: not named as applied, it is taken
        // again when served (and refused again, said in the poll, or applied).
        let (in_force, _) = node.policy_in_force();
        if !in_force.is_empty()
            && st
                .applied_revision
                .as_deref()
                .is_some_and(|r| r != in_force)
        {
            warn!(state = ?st.applied_revision, in_force = %in_force,
                "the bundle the link applied last is not the one in force; it is taken again when served");
            st.applied_revision = Some(in_force);
        }
        if let Some(v) = st.applied_version {
            self.stats.applied_version.store(v, Relaxed);
        }
        let mut backoff = Backoff::default();
        let mut complained = false;
        let mut twin_warned = false;
        // After an answer older than what this node knows, with signed bundles: the next
        // poll asks for the control plane's bundle as if it knew none, and takes it only if
        // signed later than the one in force (the number may be what was tampered with).
        let mut probe = false;
        // The first poll of this process asks for the whole revocation list: applied again
        // (what is done already is skipped), it restores any revocation whose mark could
        // not be saved before a restart, whatever number was kept.
        let mut first = true;
        loop {
            let req = PollRequest {
                known_version: if probe { 0 } else { st.known_version },
                revocation_gen: if first { 0 } else { st.revocation_gen },
                applied_version: st.applied_version,
                applied_revision: st.applied_revision.clone(),
                error: st
                    .error
                    .clone()
                    .or_else(|| node.policy_in_force().1)
                    .map(bounded),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                wait_ms: 25_000,
                lineage: st.lineage.clone(),
                owner: self.owner.clone(),
                labels: self.labels.clone(),
                spool_records: Some(self.stats.spool_records.load(Relaxed)),
                records_lost: Some(self.stats.lost.load(Relaxed)),
                sessions: polled_sessions(node.sessions_by_identity()),
            };
            let reply: Result<PollReply, ClientError> = self
                .poll
                .send_json(
                    hyper::Method::POST,
                    "/v1/node/poll",
                    &req,
                    Duration::from_secs(40),
                )
                .await;
            let reply = match reply {
                Ok(r) => {
                    first = false;
                    r
                }
                Err(e) => {
                    self.stats.connected.store(false, Relaxed);
                    if !complained {
                        error!(error = %e, url = self.poll.url(),
                            "control plane unreachable; enforcing the last good policy, reports go to the spool");
                        complained = true;
                    }
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };
            // Another database (a fresh one, or one put in place of the old): its numbers
            // start again and say nothing of ours. The control plane answered this poll as
            // if the node knew nothing, so its bundle and revocations are all here; taking
            // them cannot undo a revocation (they only add up on a node).
            let mut moved_lineage = false;
            // Only a lineage as a database gives it is kept: junk sent back in every poll
            // would be refused by every control plane, for good.
            if let Some(now) = reply.lineage.as_ref().filter(|l| super::is_lineage(l))
                && st.lineage.as_ref() != Some(now)
            {
                if let Some(had) = &st.lineage {
                    warn!(url = self.poll.url(), from = %had, to = %now, version = reply.version,
                        "the control plane answers from another database: its bundle and revocations are taken as new");
                    st.known_version = 0;
                    st.revocation_gen = 0;
                }
                st.lineage = Some(now.clone());
                moved_lineage = true;
            }
            // Never back: an answer older than what this node already had comes from a
            // replica behind the others (or a database put back to an older state). The
            // node keeps what it has and asks another. An answer older on one number and
            // newer on the other is taken for its newer part only. A bundle numbered as
            // the one this node has but another (two pushes given one number by a database
            // put back) is the database's: taken.
            //
            // With signed bundles the signed time orders them, not the control plane's
            // number: a bundle signed after the one in force is looked at whatever its
            // number, so one numbered near u64::MAX by a hostile control plane (or whoever
            // held its database) cannot freeze the node once the control plane is put right.
            let signing = self.signers.1 > 0;
            let floor = st
                .applied_not_before
                .as_deref()
                .map(crate::clock::parse_rfc3339);
            let signed_later = |b: &Bundle| {
                let nb = b
                    .signing
                    .not_before
                    .as_deref()
                    .map(crate::clock::parse_rfc3339);
                match (nb, &floor) {
                    (Some(Ok(nb)), Some(Ok(floor))) => nb > *floor,
                    (Some(Ok(_)), None) => true,
                    _ => false,
                }
            };
            let probed = std::mem::take(&mut probe);
            let bundle = reply.bundle.filter(|b| {
                if probed {
                    return signing && signed_later(b);
                }
                b.version > st.known_version
                    || (b.version == st.known_version
                        && st.applied_revision.as_deref() != Some(b.revision.as_str()))
                    || (signing && signed_later(b))
            });
            // Only a bundle numbered below what this node knows is older news: a revocation
            // list is applied whatever its number (revocations only add up on a node), so
            // one numbered lower (a database put back, or numbered near the end of the
            // numbers once by whoever held it) is taken, and its number with it.
            let older = reply.version < st.known_version;
            let newer = bundle.is_some() || reply.revocation_gen > st.revocation_gen;
            if older {
                self.stats.stale_answers.fetch_add(1, Relaxed);
            }
            // Revocations only add up on a node: a list is applied whatever its number, so
            // one numbered below what this node saw (by a database put back) still counts.
            let (revoked, retry) = self
                .take_revocations(&node, &mut st, reply.revocation_gen, &reply.revoked)
                .await;
            if older && !newer {
                if revoked || moved_lineage {
                    st.save(&self.state_path);
                }
                error!(
                    url = self.poll.url(),
                    version = reply.version,
                    known = st.known_version,
                    revocation_gen = reply.revocation_gen,
                    known_gen = st.revocation_gen,
                    "the control plane answered with an older bundle or revocation list than this node has; kept what it has"
                );
                probe = signing && !probed;
                self.poll.skip();
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
            if complained {
                info!(url = self.poll.url(), "control plane reachable again");
                complained = false;
            }
            backoff = Backoff::default();
            self.stats.connected.store(true, Relaxed);
            let mut changed = moved_lineage || revoked;
            if let Some(b) = bundle {
                self.take_bundle(&node, &mut st, b).await;
                changed = true;
            }
            if changed {
                st.save(&self.state_path);
            }
            if retry {
                tokio::time::sleep(backoff.next()).await;
            } else if reply.replaced && !changed {
                // Two processes polling as one node end each other's polls at once: each
                // waits before polling again, or together they poll as fast as the network
                // lets them.
                if !twin_warned {
                    warn!(
                        url = self.poll.url(),
                        "a newer poll as this node ended this one: is this node's certificate used by another process?"
                    );
                    twin_warned = true;
                }
                self.stats.polls_replaced.fetch_add(1, Relaxed);
                tokio::time::sleep(REPLACED_PAUSE).await;
            }
        }
    }

    /// Applies the revocations of a poll answer (all of `ids`, whatever `generation`); the
    /// generation becomes the list's once every one is applied: until then the next poll,
    /// still at the old generation, gets the list again at once. (whether the state
    /// changed, whether to retry.)
    async fn take_revocations(
        &self,
        node: &Arc<dyn NodeSide>,
        st: &mut LinkState,
        generation: u64,
        ids: &[String],
    ) -> (bool, bool) {
        if ids.is_empty() && generation <= st.revocation_gen {
            return (false, false);
        }
        let list = ids.to_vec();
        let n = node.clone();
        let failed = tokio::task::spawn_blocking(move || n.revoke_all(&list))
            .await
            .unwrap_or_else(|_| ids.to_vec());
        let ok = failed.is_empty();
        if !ok {
            error!(pending = ?failed, "fleet-wide revocations not applied on this node; retrying");
        }
        *self
            .stats
            .revocations_pending
            .lock()
            .expect("pending revocations") = failed;
        // Once every one is applied, the list's number is this node's, lower or higher: a
        // number kept above every list a control plane sends would make every answer look
        // old.
        if ok && generation != st.revocation_gen {
            st.revocation_gen = generation;
            return (true, false);
        }
        (false, !ok)
    }

    async fn take_bundle(&self, node: &Arc<dyn NodeSide>, st: &mut LinkState, b: Bundle) {
        // The state as it stands, for the floor kept before applying: only the floor moves
        // there (a crash before the apply must not leave the node saying it applied this).
        let before = st.clone();
        st.known_version = b.version;
        let files = b.files.clone();
        let dir = self.policy_dir.clone();
        let node = node.clone();
        let signers = self.signers.clone();
        let applied = st.applied_not_before.clone().map(|nb| {
            let r = st
                .floor_revision
                .clone()
                .or_else(|| st.applied_revision.clone());
            let root = st.applied_root.clone().unwrap_or_else(|| nb.clone());
            (nb, r.unwrap_or_default(), root)
        });
        let signing = b.signing.clone();
        let revision = b.revision.clone();
        // The rollback floor this bundle sets, kept before the bundle is applied: a node
        // that could not keep it would take an older signed bundle after a restart.
        let floor = (self.signers.1 > 0 && b.signing.not_before.is_some()).then(|| {
            let mut next = before;
            next.applied_not_before = b.signing.not_before.clone();
            next.floor_revision = Some(b.revision.clone());
            next.applied_root = b.signing.root().map(str::to_owned);
            (next, self.state_path.clone())
        });
        // Checked again here: the node trusts the control plane's TLS, not its validation.
        let outcome = tokio::task::spawn_blocking(move || {
            let set = super::validate(&files).map_err(BundleRefused::Invalid)?;
            // The files in force, read once: what grants are judged against, and what is
            // put back if the kernel refuses the new ones (a restart enforces the directory).
            let previous = in_force(&dir);
            let before = || {
                previous
                    .as_ref()
                    .map_err(|e| BundleRefused::Write {
                        dir: dir.clone(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    })
            };
            let (keyring, required, break_glass) = &*signers;
            if *required > 0 {
                // What was signed is the revision: the files must hash to it here.
                if set.revision != revision {
                    return Err(BundleRefused::NotWhatWasSigned {
                        ours: set.revision.clone(),
                        theirs: revision,
                    });
                }
                let now = time::OffsetDateTime::now_utc();
                let admit = |n: usize| {
                    keyring.admit(
                        &set.digest,
                        &set.revision,
                        &signing,
                        n,
                        applied
                            .as_ref()
                            .map(|(nb, r, root)| super::signing::InForce {
                                not_before: nb,
                                revision: r,
                                root,
                            }),
                        now,
                    )
                };
                // Whether `base` is the full bundle under the one in force.
                let same_root = |base: &str| {
                    let t = |s: &str| crate::clock::parse_rfc3339(s).ok();
                    applied
                        .as_ref()
                        .is_some_and(|(_, _, root)| t(base).is_some() && t(base) == t(root))
                };
                match admit(*required) {
                    Ok(()) => {}
                    // Fewer signatures than a bundle needs: enough for break-glass grants
                    // only, judged against the files in force here, not the control
                    // plane's word.
                    Err(e @ super::signing::SigningError::TooFew { .. }) => {
                        let Some(n) = *break_glass else {
                            return Err(BundleRefused::Signing(e));
                        };
                        admit(n).map_err(|_| BundleRefused::Signing(e))?;
                        // Signed as grants on the bundle in force (as `cp grant` signs
                        // them), not as a full bundle: taken as one, it would move the base
                        // grants are judged against.
                        if !signing.adds_to.as_deref().is_some_and(same_root) {
                            return Err(BundleRefused::NotBreakGlass(
                                crate::policy::grant::BreakGlassError::NotOnBase,
                            ));
                        }
                        let grants = crate::policy::grant::break_glass_addition(before()?, &set, now)
                            .map_err(BundleRefused::NotBreakGlass)?;
                        warn!(grants = ?grants, signatures = signing.signatures.len(),
                            "break-glass grants applied on fewer signatures than a bundle needs");
                    }
                    Err(e) => return Err(BundleRefused::Signing(e)),
                }
                // Grants added to the full bundle under the one in force: checked here
                // against the files in force, whatever its signers were shown, so only
                // grants differ (a break-glass bundle was held to more already).
                if signing.adds_to.as_deref().is_some_and(same_root) {
                    crate::policy::grant::grants_only_change(before()?, &set)
                        .map_err(BundleRefused::NotGrantsOn)?;
                }
                // Grants last as long as the signers' own time says they may: a control
                // plane cannot stretch one, and a signer's slip does not become a standing
                // rule.
                let signed_at = signing
                    .not_before
                    .as_deref()
                    .and_then(|t| crate::clock::parse_rfc3339(t).ok())
                    .unwrap_or(now);
                if let Some((_, e)) = crate::policy::grant::ending_too_late(&set, signed_at)
                    .into_iter()
                    .next()
                {
                    return Err(BundleRefused::Grant(e));
                }
            }
            if let Some((next, path)) = floor {
                next.write(&path)
                    .map_err(|source| BundleRefused::Floor { path, source })?;
            }
            if let Err(e) = &previous {
                warn!(dir = %dir.display(), error = %e,
                    "the policy files in force could not be read: they cannot be put back if the kernel refuses this bundle (a restart then starts on the last good revision)");
            }
            crate::policy::source::save_dir(&set, &dir).map_err(|source| BundleRefused::Write {
                dir: dir.clone(),
                source,
            })?;
            let applied = set.revision.clone();
            node.apply_bundle(set).map(|()| applied).map_err(|e| {
                if let Ok(files) = &previous {
                    let back = files
                        .iter()
                        .map(|(n, t)| (std::ffi::OsStr::new(n.as_str()), t.as_bytes()));
                    if let Err(err) = crate::files::replace_dir(&dir, back) {
                        error!(dir = %dir.display(), error = %err,
                            "the policy files in force could not be put back after the kernel refused a bundle; a restart would enforce the refused one");
                    }
                }
                BundleRefused::Apply(e)
            })
        })
        .await
        .unwrap_or_else(|e| Err(BundleRefused::Apply(e.into())));
        match outcome {
            // The revision its files hash to here, not the one the control plane named.
            Ok(revision) => {
                info!(version = b.version, %revision, "policy bundle from the control plane applied");
                st.applied_version = Some(b.version);
                st.applied_revision = Some(revision);
                // A floor only from a bundle whose signatures were checked.
                if self.signers.1 > 0 && b.signing.not_before.is_some() {
                    st.applied_not_before = b.signing.not_before.clone();
                    st.floor_revision = Some(b.revision.clone());
                    st.applied_root = b.signing.root().map(str::to_owned);
                }
                st.error = None;
                self.stats.applied_version.store(b.version, Relaxed);
                *self.stats.bundle_refused.lock().expect("bundle refused") = None;
            }
            Err(e) => {
                error!(version = b.version, error = %e, "policy bundle from the control plane not applied; the previous one stays");
                st.error = Some(bounded(format!("version {}: {e}", b.version)));
                *self.stats.bundle_refused.lock().expect("bundle refused") = st.error.clone();
            }
        }
    }

    async fn report_loop(self: Arc<Self>, node: Arc<dyn NodeSide>) {
        let mut backoff = Backoff::default();
        let mut retry_at = tokio::time::Instant::now();
        let mut complained = false;
        let mut spool_failures = 0u64;
        let mut batch_limit = BATCH;
        let mut deferred = false;
        let mut lone_refusals = 0u32;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let records = node.take_outbox();
            let spool = self.spool.clone();
            let stats = self.stats.clone();
            let appended = tokio::task::spawn_blocking(move || {
                let mut s = spool.lock().expect("spool");
                let r = s.append(records);
                stats.lost.store(s.lost_total, Relaxed);
                stats.spool_records.store(s.pending(), Relaxed);
                stats.spool_bytes.store(s.bytes(), Relaxed);
                r
            })
            .await;
            if let Ok(Err(e)) = appended {
                spool_failures += 1;
                // A full disk fails every tick: say so at 1, 2, 4, 8... failures, not each.
                if spool_failures.is_power_of_two() {
                    error!(error = %e, failures = spool_failures,
                        "records could not be spooled (counted in agentwall_control_plane_records_lost_total)");
                }
            }
            if tokio::time::Instant::now() < retry_at {
                continue;
            }
            // Sends until the spool is empty or the control plane fails.
            loop {
                let spool = self.spool.clone();
                let batch = tokio::task::spawn_blocking(move || {
                    let mut s = spool.lock().expect("spool");
                    let epoch = s.epoch;
                    s.peek(batch_limit).map(|b| (epoch, b))
                })
                .await;
                let (epoch, batch) = match batch {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        error!(error = %e, "reading the report spool failed");
                        break;
                    }
                    Err(_) => break,
                };
                if batch.records.is_empty() {
                    break;
                }
                let end = batch.end;
                let body = ReportBatch {
                    epoch,
                    records: batch.records,
                };
                let sent = body.records.len();
                let result = self.reports.post_reports(&body).await;
                let sent_records = body.records;
                match result {
                    Ok(ingested) => {
                        lone_refusals = 0;
                        if complained {
                            info!("reports reach the control plane again");
                            complained = false;
                        }
                        backoff = Backoff::default();
                        batch_limit = (batch_limit * 2).min(BATCH);
                        self.stats.connected.store(true, Relaxed);
                        self.stats.sent.fetch_add(ingested.accepted, Relaxed);
                        self.stats
                            .duplicates
                            .fetch_add(ingested.duplicates, Relaxed);
                        if !self.ack(end).await {
                            break;
                        }
                    }
                    // Over a size bound: the batch again in halves, down to one record; one
                    // record refused alone is dropped and counted lost, or it would hold
                    // back every record after it for good.
                    // The same for a record the control plane cannot store (422): one record it
                    // cannot take must not hold back the rest. A 400 is not one of these: a
                    // proxy in front answers 400 to a certificate it refuses, and the spool
                    // must then wait, not empty itself into counted losses.
                    Err(ClientError::Refused { status, body, .. })
                        if status == hyper::StatusCode::PAYLOAD_TOO_LARGE
                            || status == hyper::StatusCode::UNPROCESSABLE_ENTITY =>
                    {
                        self.stats.connected.store(true, Relaxed);
                        if sent > 1 {
                            batch_limit = (sent / 2).max(1);
                            continue;
                        }
                        // A loss record refused is not one more record lost: the count it
                        // carried is owed still. A server (or a proxy) that refuses every
                        // record alone would otherwise have the counter grow on its own.
                        let owed = loss_count(&sent_records);
                        let seq = lone_seq(&sent_records);
                        if owed.is_none() {
                            error!(error = %body, %status, "the control plane refused a record alone; dropped (counted in agentwall_control_plane_records_lost_total)");
                            self.stats.records_refused.fetch_add(1, Relaxed);
                        }
                        let spool = self.spool.clone();
                        let stats = self.stats.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            let mut s = spool.lock().expect("spool");
                            match owed {
                                Some((n, span)) => s.owe_lost(n, span),
                                None => s.count_lost(1, seq),
                            }
                            stats.lost.store(s.lost_total, Relaxed);
                        })
                        .await;
                        if !self.ack(end).await {
                            break;
                        }
                        // Refused alone again and again: not faster than the backoff.
                        lone_refusals += 1;
                        if lone_refusals > 1 {
                            tokio::time::sleep(backoff.next()).await;
                        }
                        continue;
                    }
                    // Asked to come back later (a quota, a busy server): the control plane is
                    // there; the batch waits in the spool as long as it says.
                    Err(ClientError::Refused {
                        status,
                        retry_after,
                        body,
                        ..
                    }) if status == hyper::StatusCode::TOO_MANY_REQUESTS
                        || (status == hyper::StatusCode::SERVICE_UNAVAILABLE
                            && retry_after.is_some()) =>
                    {
                        self.stats.connected.store(true, Relaxed);
                        self.stats.reports_deferred.fetch_add(1, Relaxed);
                        let wait = Duration::from_secs(retry_after.unwrap_or(1).max(1))
                            .min(MAX_RETRY_AFTER);
                        if !deferred {
                            warn!(error = %body, wait_secs = wait.as_secs(),
                                "the control plane asked for reports later; kept in the spool");
                            deferred = true;
                        }
                        retry_at = tokio::time::Instant::now() + wait;
                        break;
                    }
                    Err(e) => {
                        self.stats.connected.store(false, Relaxed);
                        if !complained {
                            warn!(error = %e, "reports not delivered; kept in the spool and retried");
                            complained = true;
                        }
                        retry_at = tokio::time::Instant::now() + backoff.next();
                        break;
                    }
                }
                deferred = false;
            }
        }
    }

    /// Forgets the spooled records before `end` (the control plane has them, or refused them
    /// for good); false when that failed (logged).
    async fn ack(&self, end: super::spool::Cursor) -> bool {
        let spool = self.spool.clone();
        let stats = self.stats.clone();
        let acked = tokio::task::spawn_blocking(move || {
            let mut s = spool.lock().expect("spool");
            let r = s.ack(end);
            stats.spool_records.store(s.pending(), Relaxed);
            stats.spool_bytes.store(s.bytes(), Relaxed);
            r
        })
        .await;
        match acked {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                error!(error = %e, "acknowledging spooled records failed");
                false
            }
            Err(_) => false,
        }
    }
}

/// Why a bundle from the control plane is not in force.
#[derive(Debug, thiserror::Error)]
enum BundleRefused {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<super::WireError>),
    #[error("writing {dir}: {source}")]
    Write {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Apply(ApplyError),
    #[error(
        "its files hash to revision {ours}, not the revision {theirs} it names and was signed as"
    )]
    NotWhatWasSigned { ours: String, theirs: String },
    #[error("{0}")]
    Signing(super::signing::SigningError),
    #[error("too few signatures for a bundle, and not one for break-glass: {0}")]
    NotBreakGlass(crate::policy::grant::BreakGlassError),
    #[error("{0}")]
    Grant(crate::policy::grant::GrantError),
    #[error(
        "it adds grants to the bundle under the one in force, but is more than that bundle with grants: {0}"
    )]
    NotGrantsOn(crate::policy::grant::BreakGlassError),
    #[error("keeping its signed not_before (the rollback floor) in {path}: {source}")]
    Floor {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Spool(#[from] super::spool::SpoolError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    SignerKey(#[from] super::signing::SigningError),
    #[error("{0}")]
    Signers(String),
}

/// 0.25 s doubling to 5 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_millis(250) * 2u32.pow(self.0.min(5));
        self.0 += 1;
        d.min(Duration::from_secs(5))
    }
}
