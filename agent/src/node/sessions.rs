//! The session table: every cgroup this node bound to an identity (launched or enrolled),
//! with the certificate behind it. Admits, binds, renews and collects sessions, records
//! their expiry, cuts off those a CRL lists, and ends the established connections of a
//! revoked identity. The table is state: written to `state_dir/sessions.json` on every
//! change and read back at start, so a CRL, `renew`, a revocation and collection reach
//! sessions launched before a restart, and bindings whose cgroups are gone are freed.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tracing::{error, info, warn};

use super::journal::{AuditEvent, Bound, IdentityEvent, Journal};
pub use crate::api::Session;
use crate::{
    api,
    cgroup::{Cgroup, Cgroup2Mount},
    clock::BootInstant,
    datapath::Datapath,
    identity::VerifiedPeer,
    sockets::Descriptors,
};

/// Why a launch, enrollment or renewal was turned down: each says so in one line.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no AgentPolicy for identity {0}")]
    NoPolicy(String),
    #[error("identity {0} is revoked")]
    Revoked(String),
    #[error("{0}")]
    SelfCheck(String),
    #[error("the launching process is gone: {0}")]
    LauncherGone(std::io::Error),
    #[error(
        "this launcher does not keep io_uring from the agent, and the identity's policy refuses io_uring (an `agentwall launch` older than the node?): launch with the node's own agentwall, or set `io_uring: allow` in the policy"
    )]
    LauncherKeepsIoUring,
    #[error(
        "{path}: {tasks} used io_uring, which the identity's policy refuses: what a ring holds or has in flight (a socket made elsewhere, a send) cannot all be read, so it could carry a socket past the binding. Start the processes without io_uring (or in a unit with `SystemCallFilter=~io_uring_setup io_uring_enter io_uring_register`), or set `io_uring: allow` in the policy"
    )]
    UsesIoUring { path: PathBuf, tasks: String },
    #[error("the launching process exited during placement")]
    ExitedDuringPlacement,
    #[error("creating the agent's cgroup: {0}")]
    CreateCgroup(crate::cgroup::CgroupError),
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        source: crate::datapath::DatapathError,
    },
    #[error("moving pid {pid} into {path}: {source}")]
    Move {
        pid: u32,
        path: PathBuf,
        source: crate::cgroup::CgroupError,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{path} is not below the attach cgroup {attach}; the datapath would not see it")]
    NotBelowAttach { path: PathBuf, attach: PathBuf },
    #[error("cannot find the calling process's cgroup")]
    NoCallerCgroup,
    #[error("certificate is revoked")]
    CertificateRevoked,
    #[error(
        "this session was cut off by a CRL listing its certificate; it is not renewed (launch a new one)"
    )]
    SessionCutOff,
    #[error("session {0} has ended")]
    SessionGone(PathBuf),
    #[error("{0} was removed and made again while it was being enrolled; enroll it again")]
    Replaced(PathBuf),
    #[error("{0} is not bound by this node; run renew from inside the agent")]
    NotBound(PathBuf),
    #[error("this cgroup belongs to {owner}, not to {claimed}")]
    OtherIdentity { owner: String, claimed: String },
    #[error(
        "the calling process is already governed: {cgroup} is bound to {identity}; launch and enroll are refused from inside a bound cgroup (renew extends the identity it has)"
    )]
    CallerGoverned { cgroup: PathBuf, identity: String },
    #[error(
        "{path} is already governed by {identity} (bound at {bound}); revoke that identity or end its session first"
    )]
    Governed {
        path: PathBuf,
        bound: PathBuf,
        identity: String,
    },
    #[error("reading the binding of {path}: {source}")]
    Lookup {
        path: PathBuf,
        source: crate::datapath::DatapathError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not a session table ({source}); the sessions it held stay bound in the kernel, fix or move the file to start"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the datapath's bindings: {0}")]
    Bindings(crate::datapath::DatapathError),
    #[error(
        "{whose} hold sockets agentwall cannot govern as this identity's: {}; a socket keeps the cgroup it was made in (systemd socket activation passes the unit sockets PID 1 made; a process moved in keeps the ones it made before). Close them or start the processes without them, then try again",
        listed(list)
    )]
    UnjudgedSockets {
        whose: String,
        list: Vec<crate::sockets::Unjudged>,
    },
    #[error("{path}: {source}")]
    Stirred {
        path: PathBuf,
        source: crate::sockets::Stir,
    },
    #[error(
        "{path}: {source}; and its binding, made meanwhile, could not be removed ({unbind}): the cgroup stays governed by this identity without a session until its cgroup is removed"
    )]
    StirredBound {
        path: PathBuf,
        source: crate::sockets::Stir,
        unbind: Box<crate::datapath::DatapathError>,
    },
    #[error("{path}: {source}")]
    SharedTable {
        path: PathBuf,
        source: crate::datapath::tasks::CensusError,
    },
    #[error("reading the sockets {whose} hold: {source}")]
    SocketScan {
        whose: String,
        source: std::io::Error,
    },
    #[error("{0}; its sockets cannot be read while its processes run")]
    Freeze(crate::cgroup::CgroupError),
    #[error("the node itself runs in {0}; it cannot freeze its own cgroup to read its sockets")]
    NodeInside(PathBuf),
    #[error(
        "{path}: the node sees cgroups only from {top} down, and that is not the host's root cgroup (the node runs in a cgroup namespace, or only a subtree is mounted): whether a cgroup above it is delegated to a user cannot be read; run the node in the host's cgroup namespace with the whole cgroup2 tree mounted"
    )]
    AncestorsOutOfSight { path: PathBuf, top: PathBuf },
    #[error(
        "{path}: {procs} may be written by uid {uid} (mode {mode:o}): a process of that user could move the unit's tasks out after the binding, new ones in unscanned, or one past the scan; enroll only cgroups in, and with, no subtree delegated to a user (such as user@.service's, or a service's with Delegate=yes and User=): their and their ancestors' cgroup.procs and cgroup.threads only root may write"
    )]
    Delegated {
        path: PathBuf,
        procs: PathBuf,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{path} holds the session at {below}; enroll that cgroup's own (unbound) children instead"
    )]
    HoldsSessions { path: PathBuf, below: PathBuf },
    #[error("recording the freeze at {path}: {source}")]
    FreezeMarker {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether a session may hold sockets without state: an enrolled cgroup's (its processes ran
/// before it was bound) or one older than these maps. The packet line looks for such sockets
/// only while one does.
fn holds_strays(table: &Table) -> bool {
    table
        .by_id
        .values()
        .any(|s| s.pid == 0 || s.layout != agent_common::ABI_VERSION)
}

/// At most ten of `list`, and how many more: a unit can hold a great many.
fn listed(list: &[crate::sockets::Unjudged]) -> String {
    const SHOWN: usize = 10;
    let mut text = list
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if list.len() > SHOWN {
        text.push_str(&format!("; and {} more", list.len() - SHOWN));
    }
    text
}

/// A unit frozen for `enroll`, and the note that says so (`state_dir/enroll-frozen`), which
/// a node that dies before the thaw finds at start: thawed, then the note removed.
struct FrozenForEnroll<'a> {
    frozen: Option<crate::cgroup::Frozen<'a>>,
    marker: &'a Path,
}

impl<'a> FrozenForEnroll<'a> {
    fn freeze(cg: &'a Cgroup, marker: &'a Path) -> Result<Self, SessionError> {
        crate::files::write_atomic(marker, cg.path().as_os_str().as_encoded_bytes()).map_err(
            |source| SessionError::FreezeMarker {
                path: marker.to_owned(),
                source,
            },
        )?;
        let mut me = Self {
            frozen: None,
            marker,
        };
        me.frozen = Some(cg.freeze(FREEZE_WITHIN).map_err(SessionError::Freeze)?);
        Ok(me)
    }
}

impl Drop for FrozenForEnroll<'_> {
    fn drop(&mut self) {
        drop(self.frozen.take());
        let _ = std::fs::remove_file(self.marker);
    }
}

/// How long `enroll` waits for a unit to freeze.
const FREEZE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// `sessions.json`: a session with what the table remembers about it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    #[serde(flatten)]
    session: Session,
    #[serde(default)]
    expiry_noted: bool,
    #[serde(default)]
    aging_noted: bool,
    #[serde(default)]
    layout: u32,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct StoredTable {
    sessions: Vec<Stored>,
    #[serde(default)]
    seq: u64,
}

#[derive(Default)]
struct Table {
    /// By cgroup id, in the order they were made.
    by_id: BTreeMap<u64, Session>,
    /// Cgroup path → id, to find the session governing a cgroup by walking up its path.
    by_path: HashMap<PathBuf, u64>,
    /// Numbers the cgroups the node makes.
    seq: u64,
}

impl Table {
    fn insert(&mut self, s: Session) {
        self.remove(s.cgroup_id);
        self.by_path.insert(s.cgroup.clone(), s.cgroup_id);
        self.by_id.insert(s.cgroup_id, s);
    }

    /// The session of cgroup `cgroup_id` goes; its path stays another's if a session of a
    /// cgroup made there since holds it.
    fn remove(&mut self, cgroup_id: u64) {
        if let Some(old) = self.by_id.remove(&cgroup_id)
            && self.by_path.get(&old.cgroup) == Some(&cgroup_id)
        {
            self.by_path.remove(&old.cgroup);
        }
    }

    /// `s` as the table holds it now (judged under its lock, not as the caller last saw it).
    fn now(&self, s: &Session) -> Result<Session, SessionError> {
        self.by_id
            .get(&s.cgroup_id)
            .cloned()
            .ok_or_else(|| SessionError::SessionGone(s.cgroup.clone()))
    }

    /// The session whose cgroup is `cgroup` or the nearest bound one above it, passing over a
    /// session whose path holds another cgroup now (a unit restarted, whose old session is
    /// still to be collected).
    fn governing(&self, cgroup: &Path) -> Option<&Session> {
        cgroup
            .ancestors()
            .filter_map(|p| self.by_id.get(self.by_path.get(p)?))
            .find(|s| cgroup_alive(s))
    }
}

/// Where a binding goes: the cgroup, the process launched into it (0: enrolled), and the
/// files it is renewed from.
struct Placed<'a> {
    cg: &'a Cgroup,
    pid: u32,
    follow: Option<api::Followed>,
    workload_api: Option<String>,
    issued: Option<String>,
    /// Asked once the binding is in the kernel, before it is recorded: a refusal unbinds it.
    confirm: Option<&'a dyn Fn() -> Result<(), crate::sockets::Stir>>,
}

/// What enrichment needs of a session: the cgroup's path and the governing certificate.
pub struct Governing {
    pub cgroup: Option<String>,
    pub serial: Option<String>,
}

pub struct Sessions {
    datapath: Arc<Datapath>,
    journal: Arc<Journal>,
    /// `state_dir/sessions.json`.
    path: PathBuf,
    /// Cgroups the node creates live here, below the attach point.
    agents: Cgroup,
    mount: Cgroup2Mount,
    table: Mutex<Table>,
    /// Serials the CRLs in force list: no session binds with one.
    crl: Mutex<std::collections::BTreeSet<String>>,
    /// One enroll at a time: two freezing the same unit would thaw it under each other,
    /// and two identities could each bind a cgroup the other had just checked.
    enrolling: Mutex<()>,
    /// `state_dir/enroll-frozen`: the cgroup an enroll froze, until it is thawed; a node that
    /// died in between thaws it at start.
    frozen_marker: PathBuf,
    /// `state_dir/rings-closing.json`: see [`Sessions::note_rings_closing`].
    rings_note: PathBuf,
}

/// How much of the reason a session's own end request gives is kept (audit, logs).
const MAX_END_REASON: usize = 512;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the cgroup `session` was bound in is still there: its path holds that cgroup, not
/// one made there since.
fn cgroup_alive(session: &Session) -> bool {
    crate::cgroup::holds(&session.cgroup, session.cgroup_id)
}

/// Where the session table is kept.
pub fn kept(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions.json")
}

/// The identity numbers of the sessions the kept table lists (none when there is no table;
/// one that cannot be read is [`Sessions::load`]'s to refuse).
pub fn kept_numbers(state_dir: &Path) -> Vec<u32> {
    std::fs::read(kept(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<StoredTable>(&b).ok())
        .map_or_else(Vec::new, |t| {
            t.sessions.iter().map(|s| s.session.number).collect()
        })
}

impl Sessions {
    /// The table as the last run left it, reconciled with the kernel: sessions whose cgroup
    /// is gone end (their binding is freed), and so do bindings of cgroups that no longer
    /// exist. A binding whose cgroup still exists stays, with or without a session: unbinding
    /// must never turn a governed process into an ungoverned one.
    pub fn load(
        datapath: Arc<Datapath>,
        journal: Arc<Journal>,
        agents: Cgroup,
        mount: Cgroup2Mount,
        state_dir: &Path,
    ) -> Result<Self, SessionError> {
        let path = kept(state_dir);
        let stored: StoredTable = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| SessionError::Corrupt {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoredTable::default(),
            Err(source) => return Err(SessionError::Io { path, source }),
        };
        let frozen_marker = state_dir.join("enroll-frozen");
        if let Ok(cg) = std::fs::read_to_string(&frozen_marker) {
            let cg = PathBuf::from(cg);
            match crate::cgroup::thaw(&cg) {
                Ok(()) => {
                    warn!(cgroup = %cg.display(), "thawed a cgroup an unfinished enroll froze")
                }
                Err(e) => {
                    warn!(cgroup = %cg.display(), error = %e, "thawing a cgroup an unfinished enroll froze")
                }
            }
            let _ = std::fs::remove_file(&frozen_marker);
        }
        let me = Self {
            datapath,
            journal,
            path,
            agents,
            mount,
            table: Mutex::new(Table::default()),
            crl: Mutex::new(Default::default()),
            enrolling: Mutex::new(()),
            frozen_marker,
            rings_note: state_dir.join("rings-closing.json"),
        };
        me.reconcile(stored)?;
        Ok(me)
    }

    fn reconcile(&self, stored: StoredTable) -> Result<(), SessionError> {
        use std::os::unix::fs::MetadataExt as _;
        let mut table = lock(&self.table);
        table.seq = stored.seq;
        let (mut kept, mut ended, mut rebound) = (0, 0, 0);
        for Stored {
            mut session,
            expiry_noted,
            aging_noted,
            layout,
        } in stored.sessions
        {
            session.layout = layout;
            if cgroup_alive(&session) {
                // The kernel holds the binding across restarts; not after an upgrade to a new
                // map layout (the old layout's maps hold it), nor after its pins were removed.
                if self
                    .datapath
                    .binding(session.cgroup_id)
                    .map_err(SessionError::Bindings)?
                    .is_none()
                {
                    self.bind_again(&session)?;
                    // Its sockets' state was in maps that are gone.
                    session.layout = 0;
                    rebound += 1;
                }
                // Whatever the kernel holds, a revoked session stays revoked there (a crash
                // between binding again and revoking must not bring it back).
                if session.revoked {
                    self.datapath
                        .revoke_binding(session.cgroup_id)
                        .map_err(|source| SessionError::Bind {
                            path: session.cgroup.clone(),
                            source,
                        })?;
                }
                session.expiry_noted = expiry_noted;
                session.aging_noted = aging_noted;
                table.insert(session);
                kept += 1;
                continue;
            }
            if let Err(e) = self.datapath.unbind_id(session.cgroup_id) {
                warn!(error = %e, cgroup = %session.cgroup.display(), "freeing the binding of a session whose cgroup is gone");
                continue;
            }
            ended += 1;
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::SessionEnded {
                    identity: session.identity,
                    cgroup: session.cgroup,
                    serial: session.serial,
                }));
        }
        // Bindings the table does not know (a crash between binding and saving): those of
        // cgroups that are gone are freed; the others stay, governed.
        let attach = self.agents.path().parent().unwrap_or(Path::new("/"));
        let mut present = std::collections::HashSet::new();
        let mut stack = vec![attach.to_owned()];
        while let Some(dir) = stack.pop() {
            if let Ok(m) = std::fs::metadata(&dir) {
                present.insert(m.ino());
            }
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        let (mut freed, mut orphans) = (0, 0);
        for (id, _) in self.datapath.bindings().map_err(SessionError::Bindings)? {
            if table.by_id.contains_key(&id) {
                continue;
            }
            if present.contains(&id) {
                orphans += 1;
            } else if self.datapath.unbind_id(id).is_ok() {
                freed += 1;
            }
        }
        if orphans > 0 {
            warn!(
                bindings = orphans,
                "bound cgroups without a session (left bound and governed; not reached by renew or CRLs)"
            );
        }
        info!(
            sessions = kept,
            ended, freed, rebound, "sessions read back from the last run"
        );
        self.save(&table);
        Ok(())
    }

    /// Binds a session's cgroup again as the table knows it: identity and certificate
    /// deadline (the caller applies a revocation). A failure refuses the start: a session the kernel does not hold is
    /// not governed.
    fn bind_again(&self, s: &Session) -> Result<(), SessionError> {
        let failed = |source| SessionError::Bind {
            path: s.cgroup.clone(),
            source,
        };
        let cg = Cgroup::open(&s.cgroup).map_err(|e| failed(e.into()))?;
        // Made at its path since it was found alive: not the session's.
        if cg.id() != s.cgroup_id {
            return Err(SessionError::Replaced(s.cgroup.clone()));
        }
        let deadline = crate::clock::parse_rfc3339(&s.not_after)
            .map(|t| BootInstant::from_system_time(t.into()))
            .unwrap_or(BootInstant(1));
        self.datapath
            .bind(&cg, s.number, Some(deadline))
            .map_err(failed)?;
        warn!(identity = %s.identity, cgroup = %s.cgroup.display(), revoked = s.revoked,
            "session bound again: the kernel did not hold its binding (new map layout or pins removed)");
        Ok(())
    }

    /// Destroys every TCP and UDP socket (listeners included) of every session: after an
    /// upgrade to a new map layout, sockets made before it carry state only the old layout's
    /// maps held, so the new programs could not judge their packets. Agents make them again,
    /// under the new programs. Returns how many were destroyed; an error when any could not
    /// be.
    pub fn end_all_sockets(&self) -> std::io::Result<usize> {
        let cgroups = self.cgroups_where(|_| true);
        let paths: Vec<&Path> = cgroups.iter().map(PathBuf::as_path).collect();
        crate::sockets::destroy_all_in(&paths)
    }

    /// Writes the table (atomically, synced). A failure is logged: the kernel holds the
    /// bindings either way, and the next change writes the table again.
    fn save(&self, table: &Table) {
        let stored = StoredTable {
            sessions: table
                .by_id
                .values()
                .map(|s| Stored {
                    session: s.clone(),
                    expiry_noted: s.expiry_noted,
                    aging_noted: s.aging_noted,
                    layout: s.layout,
                })
                .collect(),
            seq: table.seq,
        };
        let strays = holds_strays(table);
        if let Err(e) = self.datapath.set_strays(strays) {
            error!(error = %e, strays,
                "the datapath could not be told whether sockets older than their binding exist");
        }
        let bytes = serde_json::to_vec_pretty(&stored).expect("sessions serialize");
        crate::failpoint!("sessions-save");
        if let Err(e) = crate::files::write_atomic(&self.path, &bytes) {
            error!(error = %e, path = %self.path.display(),
                "the session table could not be saved; a restart would not know these sessions");
        }
    }

    /// Binds the cgroup to the peer's identity until its certificate expires and records the
    /// session.
    fn bind(
        &self,
        table: &mut Table,
        event: fn(Bound) -> IdentityEvent,
        peer: &VerifiedPeer,
        number: u32,
        placed: Placed<'_>,
    ) -> Result<(), SessionError> {
        let Placed {
            cg,
            pid,
            follow,
            workload_api,
            issued,
            confirm,
        } = placed;
        // A handshake can finish just before a CRL lists the certificate: it binds nothing
        // afterwards.
        if lock(&self.crl).contains(&peer.serial) {
            return Err(SessionError::CertificateRevoked);
        }
        let deadline = BootInstant::from_system_time(peer.not_after);
        self.datapath
            .bind(cg, number, Some(deadline))
            .map_err(|source| SessionError::Bind {
                path: cg.path().to_owned(),
                source,
            })?;
        #[cfg(feature = "failpoints")]
        if confirm.is_some() {
            fail::eval("enroll-after-bind", crate::hold_at);
        }
        if let Some(Err(source)) = confirm.map(|c| c()) {
            let path = cg.path().to_owned();
            return Err(match self.datapath.unbind_id(cg.id()) {
                Ok(()) => {
                    // Its sockets that carried a packet while it was bound are the
                    // binding's now; as they were, they are the unit's again. Not where a
                    // binding above still governs it: they stay closed there.
                    match self.governing_binding(&path) {
                        Ok(None) => self.let_go(cg),
                        governed => {
                            warn!(cgroup = %path.display(), governed = ?governed.map(|b| b.map(|(p, _)| p)),
                            "a refused enroll's sockets that carried a packet while it was bound stay closed: a binding above governs the cgroup")
                        }
                    }
                    // As before the enroll: the packet line looks for strays only where a
                    // session may hold them.
                    if let Err(e) = self.datapath.set_strays(holds_strays(table)) {
                        warn!(error = %e, "the datapath could not be told that no stray sockets are left");
                    }
                    SessionError::Stirred { path, source }
                }
                Err(unbind) => {
                    error!(cgroup = %path.display(), error = %unbind,
                        "a refused enroll's binding could not be removed; the cgroup stays governed");
                    SessionError::StirredBound {
                        path,
                        source,
                        unbind: Box::new(unbind),
                    }
                }
            });
        }
        let not_after = crate::clock::rfc3339(peer.not_after);
        let ev = event(Bound {
            identity: peer.id.to_string(),
            serial: peer.serial.clone(),
            cgroup: cg.path().to_owned(),
            pid,
            not_after: not_after.clone(),
        });
        info!(identity = %peer.id, cgroup_id = cg.id(), pid, serial = %peer.serial, %not_after, event = ?ev, "cgroup bound");
        self.journal.record(&AuditEvent::Identity(ev));
        table.insert(Session {
            identity: peer.id.to_string(),
            number,
            cgroup_id: cg.id(),
            cgroup: cg.path().to_owned(),
            pid,
            serial: peer.serial.clone(),
            not_after,
            revoked: false,
            follow,
            workload_api,
            issued,
            not_before: Some(crate::clock::rfc3339(peer.not_before)),
            expiry_noted: false,
            aging_noted: false,
            layout: agent_common::ABI_VERSION,
        });
        self.save(table);
        Ok(())
    }

    /// Clears the state naming `cg`'s binding, withdrawn, from the sockets its tasks hold.
    fn let_go(&self, cg: &Cgroup) {
        let mut cleared = 0;
        let taken = crate::sockets::each_held_socket(cg.path(), |s| {
            cleared += usize::from(self.datapath.forget_socket_state(cg.id(), s));
        });
        match taken {
            Ok(0) => info!(cgroup = %cg.path().display(), sockets = cleared,
                "a withdrawn binding's sockets are the unit's again"),
            Ok(missed) => warn!(cgroup = %cg.path().display(), sockets = cleared, missed,
                "a withdrawn binding's sockets are the unit's again, but some could not be taken: those that carried a packet while it was bound stay closed, and an enroll of the same cgroup would govern them with what that binding judged"),
            Err(e) => warn!(cgroup = %cg.path().display(), error = %e,
                "the sockets of a unit whose binding was withdrawn could not be read: those that carried a packet while it was bound stay closed, and an enroll of the same cgroup would govern them with what that binding judged"),
        }
    }

    /// The binding that governs `cgroup`: its own or its nearest bound ancestor's, up to the
    /// attach cgroup, as (bound cgroup, identity number). Read from the kernel's table, so
    /// bindings from before a restart count too.
    pub fn governing_binding(&self, cgroup: &Path) -> Result<Option<(PathBuf, u32)>, SessionError> {
        use std::os::unix::fs::MetadataExt as _;
        let attach = self.agents.path().parent().unwrap_or(Path::new("/"));
        for p in cgroup.ancestors().take_while(|p| p.starts_with(attach)) {
            let Ok(meta) = std::fs::metadata(p) else {
                continue;
            };
            let found =
                self.datapath
                    .binding(meta.ino())
                    .map_err(|source| SessionError::Lookup {
                        path: p.to_owned(),
                        source,
                    })?;
            if let Some(n) = found {
                return Ok(Some((p.to_owned(), n)));
            }
        }
        Ok(None)
    }

    /// Refuses a caller that runs inside a bound cgroup: it would otherwise move itself to
    /// another identity. `name` turns an identity number into its SPIFFE ID.
    pub fn refuse_governed_caller(
        &self,
        pidfd: &OwnedFd,
        name: impl Fn(u32) -> String,
    ) -> Result<(), SessionError> {
        let pid = api::pidfd_pid(pidfd).map_err(SessionError::LauncherGone)?;
        let cgroup = self
            .mount
            .cgroup_of(pid)
            .ok_or(SessionError::NoCallerCgroup)?;
        match self.governing_binding(&cgroup)? {
            Some((bound, n)) => Err(SessionError::CallerGoverned {
                cgroup: bound,
                identity: name(n),
            }),
            None => Ok(()),
        }
    }

    /// Places the process behind `pidfd` in a new cgroup bound to the peer's identity.
    pub fn launch(
        &self,
        peer: &VerifiedPeer,
        pidfd: &OwnedFd,
        number: u32,
        follow: Option<api::Followed>,
        workload_api: Option<String>,
        issued: Option<String>,
    ) -> Result<PathBuf, SessionError> {
        let pid = api::pidfd_pid(pidfd).map_err(SessionError::LauncherGone)?;
        // The cgroup is new: every TCP or UDP socket the launcher holds was made elsewhere.
        // Close-on-exec ones stay behind at the agent's exec. The launcher waits for this
        // answer, so nothing it holds changes meanwhile.
        refuse_unjudged(
            format!("the launching process (pid {pid})"),
            &[pid],
            &Default::default(),
            Descriptors::KeptAcrossExec,
            None,
        )?;
        let mut table = lock(&self.table);
        table.seq += 1;
        let name = format!(
            "{}-{}-{}",
            peer.id
                .to_string()
                .trim_start_matches("spiffe://")
                .replace('/', "_"),
            pid,
            table.seq
        );
        let cg = self
            .agents
            .child(&name)
            .map_err(SessionError::CreateCgroup)?;
        let placed = Placed {
            cg: &cg,
            pid,
            follow,
            workload_api,
            issued,
            confirm: None,
        };
        if let Err(e) = self.bind(&mut table, IdentityEvent::Launched, peer, number, placed) {
            let _ = cg.remove_tree();
            return Err(e);
        }
        // The pid came from the pidfd; if the process is still alive after the move, the pid
        // we wrote was the launcher's and not a reused one.
        cg.add_process(pid).map_err(|source| SessionError::Move {
            pid,
            path: cg.path().to_owned(),
            source,
        })?;
        if !api::pidfd_alive(pidfd) {
            return Err(SessionError::ExitedDuringPlacement);
        }
        Ok(cg.path().to_owned())
    }

    /// Binds an existing cgroup below the attach point to the peer's identity; `admit` (the
    /// identity's number, or why it may not be bound) is asked once the cgroup is known good.
    pub fn enroll(
        &self,
        peer: &VerifiedPeer,
        path: &Path,
        follow: Option<api::Followed>,
        io_uring: impl Fn() -> crate::policy::model::IoUring,
        admit: impl FnOnce() -> Result<u32, SessionError>,
        owner: impl Fn(u32) -> String,
    ) -> Result<PathBuf, SessionError> {
        let cg = Cgroup::open(path)?;
        let attach = self.agents.path().parent().unwrap_or(Path::new("/"));
        if !cg.path().starts_with(attach) || cg.path() == attach {
            return Err(SessionError::NotBelowAttach {
                path: cg.path().to_owned(),
                attach: attach.to_owned(),
            });
        }
        if let Some(top) = crate::cgroup::top_not_root(cg.path()) {
            return Err(SessionError::AncestorsOutOfSight {
                path: cg.path().to_owned(),
                top,
            });
        }
        if let Some((procs, uid, mode)) = crate::cgroup::delegated(cg.path()) {
            return Err(SessionError::Delegated {
                path: cg.path().to_owned(),
                procs,
                uid,
                mode,
            });
        }
        let number = admit()?;
        let _one = lock(&self.enrolling);
        // Enrolling again under the same identity moves its deadline; another identity's
        // cgroup (or one below it) is not taken over.
        let mut bound_here = false;
        if let Some((bound, n)) = self.governing_binding(cg.path())? {
            if n != number {
                return Err(SessionError::Governed {
                    path: cg.path().to_owned(),
                    bound,
                    identity: owner(n),
                });
            }
            bound_here = bound == cg.path();
        }
        // Frozen from the scan until the binding is in force: no socket is made, passed or
        // closed in between, and no process slips out of the listing.
        let me = std::process::id();
        if self
            .mount
            .cgroup_of(me)
            .is_some_and(|c| c.starts_with(cg.path()))
        {
            return Err(SessionError::NodeInside(cg.path().to_owned()));
        }
        // Nor one that holds sessions below it: its enroll would freeze them.
        if let Some(below) = lock(&self.table)
            .by_path
            .keys()
            .find(|p| p.starts_with(cg.path()) && p.as_path() != cg.path())
        {
            return Err(SessionError::HoldsSessions {
                path: cg.path().to_owned(),
                below: below.clone(),
            });
        }
        let whose = format!("{}: its processes", cg.path().display());
        let _frozen = FrozenForEnroll::freeze(&cg, &self.frozen_marker)?;
        // Frozen by its path: the cgroup opened, not one its manager made there since, or the
        // reading below would be of another cgroup than the one bound.
        if !cg.still_here() {
            return Err(SessionError::Replaced(cg.path().to_owned()));
        }
        let (pids, tasks) =
            crate::sockets::processes_in(cg.path()).map_err(|source| SessionError::SocketScan {
                whose: whose.clone(),
                source,
            })?;
        let stirred = |source| SessionError::Stirred {
            path: cg.path().to_owned(),
            source,
        };
        let still = crate::sockets::Stillness::settled(&tasks).map_err(stirred)?;
        let mut own = std::collections::HashSet::new();
        crate::cgroup::subtree_ids(cg.path(), &mut own);
        let rings_read =
            refuse_unjudged(whose.clone(), &pids, &own, Descriptors::All, Some(&tasks))?;
        // Last: a sharer outside is not frozen, and the census counts it even where it was
        // made after the walk passed its number.
        let rings = self
            .datapath
            .table_sharers(&own, &tasks)
            .map_err(|source| SessionError::SharedTable {
                path: cg.path().to_owned(),
                source,
            })?;
        // A task with an io_uring context may have requests in flight that hold a ring, and
        // with it sockets, that no descriptor, mapping or registration shows (a ring kept
        // alive by a poll on itself, worked by its SQPOLL thread): only a policy that allows
        // io_uring takes that. Nor does a policy that refuses it take a ring held with no
        // context (inherited over fork, taken with `pidfd_getfd` before the binding): once
        // bound, the unit makes no ring, and any ring it holds is one a process outside can
        // fill with sockets (`IORING_OP_MSG_RING`, `IORING_REGISTER_FILES`).
        let mut used: Vec<u32> = rings
            .users
            .iter()
            .copied()
            .chain(rings_read.holders.iter().copied())
            .chain(rings.registered.iter().map(|&(tid, _)| tid))
            .collect();
        used.sort_unstable();
        used.dedup();
        let judged = io_uring();
        if judged == crate::policy::model::IoUring::Refuse && !used.is_empty() {
            return Err(SessionError::UsesIoUring {
                path: cg.path().to_owned(),
                tasks: named_tasks(&used),
            });
        }
        // A ring a task registered with itself and holds by no descriptor: the scan could not
        // read it.
        let list = rings_read.unread(&rings.registered);
        if !list.is_empty() {
            return Err(SessionError::UnjudgedSockets { whose, list });
        }
        // Frozen throughout: frozen now, and no task switched out since the first reading (a
        // task that ran meanwhile, resumed by a tracer, say, did before it froze again).
        still.held(&cg).map_err(stirred)?;
        // Its processes may hold sockets made before now: the packet line looks for such
        // sockets before the binding exists, so none passes in between.
        self.datapath
            .set_strays(true)
            .map_err(|source| SessionError::Bind {
                path: cg.path().to_owned(),
                source,
            })?;
        // Where root could thaw the unit, or move a task in: a test does, here.
        #[cfg(feature = "failpoints")]
        fail::eval("enroll-before-bind", crate::hold_at);
        // Frozen still once the binding is in force: a thaw (root's) before it would have let
        // the unit's tasks run ungoverned. A cgroup bound here already was governed by this
        // identity throughout, and a refusal would take its binding away.
        // And judged under the policy in force: one applied since that refuses io_uring
        // refuses a unit that used it (once bound, it is judged as rings made before).
        let confirm = || {
            still.held(&cg)?;
            if judged == crate::policy::model::IoUring::Allow
                && !used.is_empty()
                && io_uring() == crate::policy::model::IoUring::Refuse
            {
                return Err(crate::sockets::Stir::IoUringRefused);
            }
            Ok(())
        };
        let mut table = lock(&self.table);
        let placed = Placed {
            cg: &cg,
            pid: 0,
            follow,
            workload_api: None,
            issued: None,
            confirm: (!bound_here).then_some(&confirm as &dyn Fn() -> _),
        };
        self.bind(&mut table, IdentityEvent::Enrolled, peer, number, placed)?;
        Ok(cg.path().to_owned())
    }

    /// The session the process behind `pidfd` runs in (its own cgroup's or the nearest bound
    /// one above it), checked to belong to the peer's identity.
    pub fn session_of_caller(
        &self,
        peer: &VerifiedPeer,
        pidfd: &OwnedFd,
    ) -> Result<Session, SessionError> {
        let cgroup = api::pidfd_pid(pidfd)
            .ok()
            .and_then(|pid| self.mount.cgroup_of(pid))
            .ok_or(SessionError::NoCallerCgroup)?;
        let table = lock(&self.table);
        let session = table
            .governing(&cgroup)
            .cloned()
            .ok_or(SessionError::NotBound(cgroup))?;
        let id = peer.id.to_string();
        if session.identity != id {
            return Err(SessionError::OtherIdentity {
                owner: session.identity,
                claimed: id,
            });
        }
        Ok(session)
    }

    /// Moves a session's deadline to the peer's (newer) certificate. A session a CRL cut off
    /// stays cut off. `forward_only`: only to a later deadline than the one in force (a
    /// followed file may hold an older certificate than a renewal by hand gave it); Ok(None)
    /// when it is not later. Judged under the table's lock, against the session as it is
    /// then.
    pub fn renew(
        &self,
        peer: &VerifiedPeer,
        session: &Session,
        forward_only: bool,
    ) -> Result<Option<PathBuf>, SessionError> {
        self.renew_with(peer, session, forward_only, None)
    }

    /// [`Sessions::renew`] with a chain the control plane's issuer signed, kept as the one
    /// to renew from next.
    pub fn renew_issued(
        &self,
        peer: &VerifiedPeer,
        session: &Session,
        chain: String,
    ) -> Result<Option<PathBuf>, SessionError> {
        self.renew_with(peer, session, true, Some(chain))
    }

    fn renew_with(
        &self,
        peer: &VerifiedPeer,
        session: &Session,
        forward_only: bool,
        issued: Option<String>,
    ) -> Result<Option<PathBuf>, SessionError> {
        let cg = Cgroup::open(&session.cgroup)?;
        let mut table = lock(&self.table);
        // Another cgroup at its path (a unit restarted, maybe enrolled while this waited for
        // the lock): bound only by `enroll`, which reads what its processes hold first.
        if cg.id() != session.cgroup_id || !cg.still_here() {
            return Err(SessionError::SessionGone(session.cgroup.clone()));
        }
        let now = table.now(session)?;
        if now.revoked {
            return Err(SessionError::SessionCutOff);
        }
        if forward_only {
            let current = crate::clock::parse_rfc3339(&now.not_after)
                .map(std::time::SystemTime::from)
                .ok();
            if now.serial == peer.serial || current.is_some_and(|c| peer.not_after <= c) {
                return Ok(None);
            }
        }
        // Renewed by hand or from its files, it goes on following them (or its Workload API).
        let placed = Placed {
            cg: &cg,
            pid: now.pid,
            follow: now.follow.clone(),
            workload_api: now.workload_api.clone(),
            // Renewed otherwise (by hand), it no longer runs on the issuer's certificate.
            issued,
            confirm: None,
        };
        self.bind(&mut table, IdentityEvent::Renewed, peer, now.number, placed)?;
        Ok(Some(now.cgroup))
    }

    /// Sessions the issuer renews whose certificate is past half its life: (session, the
    /// chain to renew from).
    pub fn due_from_issuer(&self) -> Vec<(Session, String)> {
        let now = time::OffsetDateTime::now_utc();
        lock(&self.table)
            .by_id
            .values()
            .filter(|s| !s.revoked)
            .filter_map(|s| {
                let chain = s.issued.clone()?;
                let end = crate::clock::parse_rfc3339(&s.not_after).ok()?;
                let start = crate::clock::parse_rfc3339(s.not_before.as_deref()?).ok()?;
                (now >= start + (end - start) / 2 && now < end).then(|| (s.clone(), chain))
            })
            .collect()
    }

    /// Ends launched sessions whose processes have all exited: the binding goes (nothing is
    /// left to govern) and so does the cgroup the node made. Enrolled cgroups are kept: they
    /// belong to someone else and may be repopulated.
    pub fn collect(&self) {
        let mut table = lock(&self.table);
        // A cgroup that is gone (its owner removed it, or a renew raced its last process) has
        // nothing left to govern either, enrolled or launched; so for one whose path now holds
        // another cgroup (a unit its manager restarted), which the binding does not govern.
        let gone = |s: &Session| !cgroup_alive(s);
        let done: Vec<Session> = table
            .by_id
            .values()
            .filter(|s| {
                gone(s)
                    || (s.cgroup.starts_with(self.agents.path())
                        && Cgroup::open(&s.cgroup)
                            .is_ok_and(|c| c.is_populated().is_ok_and(|p| !p)))
            })
            .cloned()
            .collect();
        for s in done {
            if gone(&s) {
                if let Err(e) = self.datapath.unbind_id(s.cgroup_id) {
                    warn!(error = %e, cgroup = %s.cgroup.display(), "ending a session");
                    continue;
                }
            } else if let Ok(cg) = Cgroup::open(&s.cgroup) {
                if let Err(e) = self.datapath.unbind(&cg) {
                    warn!(error = %e, cgroup = %s.cgroup.display(), "ending a session");
                    continue;
                }
                let _ = cg.remove_tree();
            }
            info!(identity = %s.identity, cgroup = %s.cgroup.display(), "session ended");
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::SessionEnded {
                    identity: s.identity.clone(),
                    cgroup: s.cgroup.clone(),
                    serial: s.serial.clone(),
                }));
            table.remove(s.cgroup_id);
            self.save(&table);
        }
    }

    /// Cuts off running sessions whose certificate serial is in `serials` (the CRLs now in
    /// force): the binding is revoked in the kernel and the connections destroyed. From now on
    /// no session binds with one of them.
    pub fn cut_off(&self, serials: &std::collections::BTreeSet<String>) {
        let mut table = lock(&self.table);
        lock(&self.crl).clone_from(serials);
        let hit: Vec<Session> = table
            .by_id
            .values()
            .filter(|s| !s.revoked && serials.contains(&s.serial))
            .cloned()
            .collect();
        for s in hit {
            let Ok(destroyed) = self.cut(&mut table, &s) else {
                continue;
            };
            warn!(identity = %s.identity, serial = %s.serial, cgroup = %s.cgroup.display(),
                connections_destroyed = destroyed, "certificate revoked by CRL; session cut off");
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::RevokedByCrl {
                    identity: s.identity.clone(),
                    serial: s.serial.clone(),
                    cgroup: s.cgroup.clone(),
                    connections_destroyed: destroyed,
                }));
        }
    }

    /// Ends one session at its own request (its SVID is gone), for `reason`: cut off like a
    /// revoked certificate's, for good. A session already cut off stays so.
    pub fn end(&self, session: &Session, reason: &str) -> Result<(), SessionError> {
        self.end_for(session, reason, "session ended at its own request", false)
    }

    /// The identities a change noted (see [`Self::note_rings_closing`]) whose sessions' rings
    /// are still to be read; none: a note that cannot be read, which stands for every identity.
    pub fn rings_noted(&self) -> Option<std::collections::BTreeSet<String>> {
        let read = match std::fs::read(&self.rings_note) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Default::default()),
            read => read.map_err(|e| e.to_string()),
        };
        read.and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            .inspect_err(|e| {
                error!(path = %self.rings_note.display(), error = %e,
                    "the note of sessions whose io_uring use is to be read is unreadable: reading every identity's that refuses io_uring");
            })
            .ok()
    }

    /// Notes (`state_dir/rings-closing.json`, atomically) the identities whose sessions'
    /// rings [`Self::end_ring_users`] is to read once a change is in the kernel: a node that
    /// dies in between, or a change the kernel took part of, still reads them at the next
    /// apply, when the kernel says they refuse io_uring already.
    pub fn note_rings_closing<'a>(
        &self,
        identities: impl Iterator<Item = &'a String>,
    ) -> Result<(), SessionError> {
        let identities: Vec<&String> = identities.collect();
        if identities.is_empty() {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&identities).expect("strings serialize");
        crate::files::write_atomic(&self.rings_note, &bytes).map_err(|source| SessionError::Io {
            path: self.rings_note.clone(),
            source,
        })
    }

    /// Reads each session (cut off already or not) of `identities` (each with whether the
    /// policy names it), which from this apply are refused io_uring in enforce mode and whose tasks the kernel
    /// let make rings until it (`allow`, or audit mode), or a change before noted: a ring
    /// made then stays usable, and a process outside can fill it with sockets no hook judges
    /// (`IORING_OP_MSG_RING`, `IORING_REGISTER_FILES`) that the session's tasks then use.
    /// Cutting the binding off does not take the ring away, so a session whose tasks use
    /// io_uring is cut off and its processes killed, frozen throughout (no task runs another
    /// instruction with its ring); so is one that cannot be read. Read once the kernel refuses
    /// the identity new rings. The note is done with once every session was. How many were
    /// ended.
    pub fn end_ring_users(&self, identities: &BTreeMap<String, bool>) -> usize {
        let sessions: Vec<Session> = if identities.is_empty() {
            Vec::new()
        } else {
            // Cut off already (a CRL, its own end) too: a cut binding leaves its processes,
            // and their rings, running.
            self.list()
                .into_iter()
                .filter(|s| identities.contains_key(&s.identity))
                .collect()
        };
        let mut ended = 0;
        for s in sessions {
            // Gone: collected as any ended unit is.
            // Gone, or another cgroup made at its path since (collected as any ended unit
            // is): nothing of the new one is frozen or killed.
            if !cgroup_alive(&s) {
                continue;
            }
            let refused = if identities.get(&s.identity) == Some(&true) {
                "which the identity's policy came to refuse"
            } else {
                "which the identity may not use now that no policy names it"
            };
            // One freeze at a time, with its note: an enroll's, or this.
            let _one = lock(&self.enrolling);
            // Checked again once opened: the path may have changed hands since.
            let cg = match Cgroup::open(&s.cgroup) {
                Ok(cg) if cg.id() != s.cgroup_id => continue,
                cg => cg,
            };
            let frozen = match &cg {
                Ok(cg) => self.freeze_to_read(cg).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            // Frozen by its path: one made there since the check above is not this session's.
            if cg.as_ref().is_ok_and(|cg| !cg.still_here()) {
                continue;
            }
            let users = match &frozen {
                Ok(_) => self.ring_users(&s.cgroup).map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            let reason = match users {
                Ok(None) => continue,
                Ok(Some(users)) => format!(
                    "{users} used io_uring, {refused}: a ring made before stays usable, so the session's processes were killed; start the agent again"
                ),
                Err(e) => format!(
                    "whether its tasks use io_uring, {refused}, could not be read ({e}): the session's processes were killed"
                ),
            };
            if let Err(e) = self.end_for(&s, &reason, "session cut off: io_uring", true) {
                error!(identity = %s.identity, cgroup = %s.cgroup.display(), error = %e,
                    "could not cut off a session using io_uring its identity is refused");
            } else {
                ended += 1;
            }
            let killed = match &cg {
                Ok(cg) => cg.kill_all().map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = killed {
                error!(identity = %s.identity, cgroup = %s.cgroup.display(), error = %e,
                    "could not kill the processes of a session using io_uring its identity is refused");
            }
            drop(frozen);
        }
        match std::fs::remove_file(&self.rings_note) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                error!(path = %self.rings_note.display(), error = %e,
                    "could not remove the note of sessions whose io_uring use is read");
            }
            _ => {}
        }
        ended
    }

    /// `cg` frozen for a reading, as `enroll` freezes a unit: a unit that runs could keep a
    /// ring ahead of any listing (each process handing it to a child it forks, then exiting;
    /// the child has no io_uring context). None: frozen already (a runtime's pause), and read
    /// as it is once every task is (only root lifts it).
    fn freeze_to_read<'a>(
        &'a self,
        cg: &'a Cgroup,
    ) -> Result<Option<FrozenForEnroll<'a>>, SessionError> {
        match FrozenForEnroll::freeze(cg, &self.frozen_marker) {
            Ok(f) => Ok(Some(f)),
            Err(SessionError::Freeze(crate::cgroup::CgroupError::AlreadyFrozen { .. }))
                if cg.is_frozen().unwrap_or(false) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The tasks of the unit at `cgroup` (and below), frozen, that use io_uring: with an
    /// io_uring context or a ring registered with itself (the task census), or whose process
    /// holds a ring by descriptor or maps one. Named while frozen (a task of a chain is gone
    /// once thawed); none: it uses no io_uring.
    fn ring_users(&self, cgroup: &Path) -> Result<Option<String>, SessionError> {
        let whose = format!("{}: its processes", cgroup.display());
        let scan = |source| SessionError::SocketScan {
            whose: whose.clone(),
            source,
        };
        let (pids, _) = crate::sockets::processes_in(cgroup).map_err(scan)?;
        let mut own = std::collections::HashSet::new();
        crate::cgroup::subtree_ids(cgroup, &mut own);
        let mut users =
            self.datapath
                .ring_users(&own)
                .map_err(|source| SessionError::SharedTable {
                    path: cgroup.to_owned(),
                    source,
                })?;
        users.extend(crate::sockets::ring_holders(&pids).map_err(scan)?);
        users.sort_unstable();
        users.dedup();
        Ok((!users.is_empty()).then(|| named_tasks(&users)))
    }

    /// Cuts the session off for `reason` and records it; one cut off already is recorded
    /// again only where `recut` (its processes were killed for this reason).
    fn end_for(
        &self,
        session: &Session,
        reason: &str,
        what: &str,
        recut: bool,
    ) -> Result<(), SessionError> {
        let mut table = lock(&self.table);
        let now = table.now(session)?;
        if now.revoked && !recut {
            return Ok(());
        }
        let destroyed = if now.revoked {
            0
        } else {
            self.cut(&mut table, &now)
                .map_err(|source| SessionError::Bind {
                    path: now.cgroup.clone(),
                    source,
                })?
        };
        // Text from the Workload API, by way of the keeper: kept printable.
        let reason =
            crate::text::printable(crate::text::prefix(reason, MAX_END_REASON)).into_owned();
        warn!(identity = %now.identity, serial = %now.serial, cgroup = %now.cgroup.display(),
            connections_destroyed = destroyed, %reason, "{what}");
        self.journal
            .record(&AuditEvent::Identity(IdentityEvent::Ended {
                identity: now.identity,
                serial: now.serial,
                cgroup: now.cgroup,
                connections_destroyed: destroyed,
                reason,
            }));
        Ok(())
    }

    /// Revokes a session's binding in the kernel, destroys its connections and keeps it cut
    /// off; how many connections went.
    fn cut(&self, table: &mut Table, s: &Session) -> Result<usize, crate::datapath::DatapathError> {
        self.datapath.revoke_binding(s.cgroup_id).inspect_err(
            |e| error!(error = %e, cgroup = %s.cgroup.display(), "revoking a binding failed"),
        )?;
        // By path: a cgroup made there since (a unit restarted) is not the session's.
        let destroyed = if cgroup_alive(s) {
            crate::sockets::destroy_tcp_in(&[s.cgroup.as_path()]).unwrap_or_else(|e| {
                error!(error = %e, "could not destroy the session's connections");
                0
            })
        } else {
            0
        };
        if let Some(x) = table.by_id.get_mut(&s.cgroup_id) {
            x.revoked = true;
        }
        self.save(table);
        Ok(destroyed)
    }

    /// Records each session whose certificate has expired, once: the kernel already denies
    /// it everything at the deadline, with or without the node. Before that, records each
    /// one past 90% of its certificate's life, once a certificate: a warning while there is
    /// still time to renew.
    pub fn note_expiries(&self) {
        let now = time::OffsetDateTime::now_utc();
        let mut expired = Vec::new();
        let mut aging = Vec::new();
        {
            let mut table = lock(&self.table);
            for s in table.by_id.values_mut().filter(|s| !s.expiry_noted) {
                let Ok(end) = crate::clock::parse_rfc3339(&s.not_after) else {
                    continue;
                };
                if end <= now {
                    s.expiry_noted = true;
                    expired.push(s.clone());
                } else if !s.aging_noted && !s.revoked {
                    let start = s
                        .not_before
                        .as_deref()
                        .and_then(|t| crate::clock::parse_rfc3339(t).ok());
                    if let Some(start) = start.filter(|b| *b < end) {
                        if now >= start + (end - start) * 0.9 {
                            s.aging_noted = true;
                            aging.push(s.clone());
                        }
                    }
                }
            }
            if !expired.is_empty() || !aging.is_empty() {
                self.save(&table);
            }
        }
        for s in aging {
            let renewed = super::follow::renews(&s);
            warn!(identity = %s.identity, cgroup = %s.cgroup.display(), not_after = %s.not_after,
                renewed, "certificate past 90% of its life without a renewal");
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::ExpiresSoon {
                    identity: s.identity,
                    cgroup: s.cgroup,
                    serial: s.serial,
                    not_after: s.not_after,
                    renewed,
                }));
        }
        for s in expired {
            warn!(identity = %s.identity, cgroup = %s.cgroup.display(), "certificate expired; the session is denied everything");
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::Expired {
                    identity: s.identity,
                    cgroup: s.cgroup,
                    serial: s.serial,
                    not_after: s.not_after,
                }));
        }
    }

    /// Ends the established connections of every session of `identity` (its new ones already
    /// fail in the kernel). Returns how many were destroyed.
    pub fn end_connections(&self, identity: &str) -> usize {
        let cgroups = self.cgroups_where(|s| s.identity == identity);
        let paths: Vec<&Path> = cgroups.iter().map(PathBuf::as_path).collect();
        match crate::sockets::destroy_tcp_in(&paths) {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, identity, "could not destroy the identity's connections");
                0
            }
        }
    }

    /// Ends connections of the sessions of `identity`, each by its local port and peer.
    /// Returns how many were destroyed (those already gone are not counted).
    pub fn end_these_connections(
        &self,
        identity: &str,
        which: &[(u16, std::net::SocketAddr)],
    ) -> usize {
        let cgroups = self.cgroups_where(|s| s.identity == identity);
        let paths: Vec<&Path> = cgroups.iter().map(PathBuf::as_path).collect();
        crate::sockets::destroy_connections(&paths, which).unwrap_or_else(|e| {
            error!(error = %e, identity, "could not end connections the TLS check refused");
            0
        })
    }

    /// The cgroups of the sessions `pred` picks, those still at their paths (a cgroup made at
    /// a session's path since is not the session's).
    fn cgroups_where(&self, pred: impl Fn(&Session) -> bool) -> Vec<PathBuf> {
        lock(&self.table)
            .by_id
            .values()
            .filter(|s| pred(s) && cgroup_alive(s))
            .map(|s| s.cgroup.clone())
            .collect()
    }

    /// Every session, in the order they were made.
    pub fn list(&self) -> Vec<Session> {
        lock(&self.table).by_id.values().cloned().collect()
    }

    /// Per identity with a session whose certificate has not expired: the seconds left to
    /// the earliest such deadline.
    pub fn expiry_seconds(&self) -> Vec<(String, f64)> {
        let now = time::OffsetDateTime::now_utc();
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for s in lock(&self.table).by_id.values().filter(|s| !s.revoked) {
            let Ok(end) = crate::clock::parse_rfc3339(&s.not_after) else {
                continue;
            };
            let left = (end - now).as_seconds_f64();
            if left > 0.0 {
                let e = out.entry(s.identity.clone()).or_insert(left);
                *e = e.min(left);
            }
        }
        out.into_iter().collect()
    }

    pub fn len(&self) -> usize {
        lock(&self.table).by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each identity number's session cgroups.
    pub fn cgroups_by_identity(&self) -> BTreeMap<u32, Vec<PathBuf>> {
        let mut out: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
        for s in lock(&self.table).by_id.values() {
            out.entry(s.number).or_default().push(s.cgroup.clone());
        }
        out
    }

    /// The cgroup of a record (the session's, else where process `pid` is now) and the serial
    /// of the certificate governing it.
    pub fn describe(&self, cgroup_id: u64, pid: u32) -> Governing {
        let known = lock(&self.table)
            .by_id
            .get(&cgroup_id)
            .map(|s| (s.cgroup.clone(), s.serial.clone()));
        if let Some((cg, serial)) = known {
            return Governing {
                cgroup: Some(cg.display().to_string()),
                serial: Some(serial),
            };
        }
        // Read outside the lock: /proc is the slow part of a record.
        let Some(cg) = self.mount.cgroup_of(pid) else {
            return Governing {
                cgroup: None,
                serial: None,
            };
        };
        let serial = lock(&self.table).governing(&cg).map(|s| s.serial.clone());
        Governing {
            cgroup: Some(cg.display().to_string()),
            serial,
        }
    }
}

/// `task 812 ("server")`, for up to three tasks, and how many more.
fn named_tasks(tids: &[u32]) -> String {
    let mut out: Vec<String> = tids
        .iter()
        .take(3)
        .map(|&tid| format!("task {tid} ({:?})", crate::sockets::comm(tid)))
        .collect();
    if tids.len() > 3 {
        out.push(format!("{} more", tids.len() - 3));
    }
    let last = out.pop().unwrap_or_default();
    if out.is_empty() {
        last
    } else {
        format!("{} and {last}", out.join(", "))
    }
}

/// Refuses while the processes `pids` (`whose`, for the message) hold a socket the packet line would not
/// govern as one of the cgroups `own`; the io_uring instances it read, otherwise.
fn refuse_unjudged(
    whose: String,
    pids: &[u32],
    own: &std::collections::HashSet<u64>,
    which: Descriptors,
    unit_tasks: Option<&std::collections::HashSet<u32>>,
) -> Result<crate::sockets::RingsRead, SessionError> {
    match crate::sockets::unjudged(pids, own, which, unit_tasks) {
        Err(source) => Err(SessionError::SocketScan { whose, source }),
        Ok((list, read)) if list.is_empty() => Ok(read),
        Ok((list, _)) => Err(SessionError::UnjudgedSockets { whose, list }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    /// A unit restarted at its path and enrolled again before its old session is collected:
    /// the old session's end leaves the path to the new one, and a path that holds another
    /// cgroup than a session's is governed by none.
    #[test]
    fn a_session_removed_leaves_its_path_to_the_cgroup_made_there_since() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unit");
        std::fs::create_dir(&path).unwrap();
        let now = std::fs::metadata(&path).unwrap().ino();
        let gone = now + 1;
        let session = |cgroup_id| Session {
            cgroup: path.clone(),
            cgroup_id,
            ..Default::default()
        };
        let mut table = Table::default();
        table.insert(session(gone));
        assert!(table.governing(&path).is_none());
        assert!(table.governing(&path.join("child")).is_none());
        table.insert(session(now));
        table.remove(gone);
        assert_eq!(table.governing(&path).map(|s| s.cgroup_id), Some(now));
        assert_eq!(
            table.governing(&path.join("child")).map(|s| s.cgroup_id),
            Some(now)
        );
        table.remove(now);
        assert!(table.governing(&path).is_none());
        assert!(table.by_path.is_empty());
    }
}
