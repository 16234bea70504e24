//! The session table: every cgroup this node bound to an identity (launched or enrolled),
//! with the certificate behind it. Admits, binds, renews and collects sessions, records
//! their expiry, cuts off those a CRL lists, and ends the established connections of a
//! revoked identity.

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
};

/// Why a launch, enrollment or renewal was turned down: each says so in one line.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no AgentPolicy for identity {0}")]
    NoPolicy(String),
    #[error("identity {0} is revoked")]
    Revoked(String),
    #[error("the launching process is gone: {0}")]
    LauncherGone(std::io::Error),
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
    #[error("{0} is not bound by this node; run renew from inside the agent")]
    NotBound(PathBuf),
    #[error("this cgroup belongs to {owner}, not to {claimed}")]
    OtherIdentity { owner: String, claimed: String },
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
        if let Some(old) = self.by_id.remove(&s.cgroup_id) {
            self.by_path.remove(&old.cgroup);
        }
        self.by_path.insert(s.cgroup.clone(), s.cgroup_id);
        self.by_id.insert(s.cgroup_id, s);
    }

    fn remove(&mut self, cgroup_id: u64) {
        if let Some(old) = self.by_id.remove(&cgroup_id) {
            self.by_path.remove(&old.cgroup);
        }
    }

    /// The session whose cgroup is `cgroup` or the nearest bound one above it.
    fn governing(&self, cgroup: &Path) -> Option<&Session> {
        cgroup
            .ancestors()
            .find_map(|p| self.by_path.get(p))
            .and_then(|id| self.by_id.get(id))
    }
}

/// What enrichment needs of a session: the cgroup's path and the governing certificate.
pub struct Governing {
    pub cgroup: Option<String>,
    pub serial: Option<String>,
}

pub struct Sessions {
    datapath: Arc<Datapath>,
    journal: Arc<Journal>,
    /// Cgroups the node creates live here, below the attach point.
    agents: Cgroup,
    mount: Cgroup2Mount,
    table: Mutex<Table>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    pub fn new(
        datapath: Arc<Datapath>,
        journal: Arc<Journal>,
        agents: Cgroup,
        mount: Cgroup2Mount,
    ) -> Self {
        Self {
            datapath,
            journal,
            agents,
            mount,
            table: Mutex::new(Table::default()),
        }
    }

    /// Binds `cg` to the peer's identity until its certificate expires and records the session.
    fn bind(
        &self,
        table: &mut Table,
        event: fn(Bound) -> IdentityEvent,
        peer: &VerifiedPeer,
        number: u32,
        cg: &Cgroup,
        pid: u32,
    ) -> Result<(), SessionError> {
        let deadline = BootInstant::from_system_time(peer.not_after);
        self.datapath
            .bind(cg, number, Some(deadline))
            .map_err(|source| SessionError::Bind {
                path: cg.path().to_owned(),
                source,
            })?;
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
            expiry_noted: false,
        });
        Ok(())
    }

    /// Places the process behind `pidfd` in a new cgroup bound to the peer's identity.
    pub fn launch(
        &self,
        peer: &VerifiedPeer,
        pidfd: &OwnedFd,
        number: u32,
    ) -> Result<PathBuf, SessionError> {
        let pid = api::pidfd_pid(pidfd).map_err(SessionError::LauncherGone)?;
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
        if let Err(e) = self.bind(&mut table, IdentityEvent::Launched, peer, number, &cg, pid) {
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
        admit: impl FnOnce() -> Result<u32, SessionError>,
    ) -> Result<PathBuf, SessionError> {
        let cg = Cgroup::open(path)?;
        let attach = self.agents.path().parent().unwrap_or(Path::new("/"));
        if !cg.path().starts_with(attach) || cg.path() == attach {
            return Err(SessionError::NotBelowAttach {
                path: cg.path().to_owned(),
                attach: attach.to_owned(),
            });
        }
        let number = admit()?;
        let mut table = lock(&self.table);
        self.bind(&mut table, IdentityEvent::Enrolled, peer, number, &cg, 0)?;
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

    /// Moves a session's deadline to the peer's (newer) certificate.
    pub fn renew(&self, peer: &VerifiedPeer, session: &Session) -> Result<PathBuf, SessionError> {
        let cg = Cgroup::open(&session.cgroup)?;
        let mut table = lock(&self.table);
        self.bind(
            &mut table,
            IdentityEvent::Renewed,
            peer,
            session.number,
            &cg,
            session.pid,
        )?;
        Ok(session.cgroup.clone())
    }

    /// Ends launched sessions whose processes have all exited: the binding goes (nothing is
    /// left to govern) and so does the cgroup the node made. Enrolled cgroups are kept: they
    /// belong to someone else and may be repopulated.
    pub fn collect(&self) {
        let mut table = lock(&self.table);
        let done: Vec<Session> = table
            .by_id
            .values()
            .filter(|s| s.cgroup.starts_with(self.agents.path()))
            .filter(|s| Cgroup::open(&s.cgroup).is_ok_and(|c| c.is_populated().is_ok_and(|p| !p)))
            .cloned()
            .collect();
        for s in done {
            if let Ok(cg) = Cgroup::open(&s.cgroup) {
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
        }
    }

    /// Cuts off running sessions whose certificate serial is in `serials`: the binding is
    /// revoked in the kernel and the connections destroyed.
    pub fn cut_off(&self, serials: &std::collections::BTreeSet<String>) {
        let mut table = lock(&self.table);
        let hit: Vec<Session> = table
            .by_id
            .values()
            .filter(|s| !s.revoked && serials.contains(&s.serial))
            .cloned()
            .collect();
        for s in hit {
            if let Err(e) = self.datapath.revoke_binding(s.cgroup_id) {
                error!(error = %e, cgroup = %s.cgroup.display(), "revoking a binding failed");
                continue;
            }
            let destroyed =
                crate::sockets::destroy_tcp_in(&[s.cgroup.as_path()]).unwrap_or_else(|e| {
                    error!(error = %e, "could not destroy the session's connections");
                    0
                });
            warn!(identity = %s.identity, serial = %s.serial, cgroup = %s.cgroup.display(),
                connections_destroyed = destroyed, "certificate revoked by CRL; session cut off");
            self.journal
                .record(&AuditEvent::Identity(IdentityEvent::RevokedByCrl {
                    identity: s.identity.clone(),
                    serial: s.serial.clone(),
                    cgroup: s.cgroup.clone(),
                    connections_destroyed: destroyed,
                }));
            if let Some(x) = table.by_id.get_mut(&s.cgroup_id) {
                x.revoked = true;
            }
        }
    }

    /// Records each session whose certificate has expired, once: the kernel already denies
    /// it everything at the deadline, with or without the node.
    pub fn note_expiries(&self) {
        let now = time::OffsetDateTime::now_utc();
        let mut expired = Vec::new();
        {
            let mut table = lock(&self.table);
            for s in table.by_id.values_mut().filter(|s| !s.expiry_noted) {
                if crate::clock::parse_rfc3339(&s.not_after).is_ok_and(|t| t <= now) {
                    s.expiry_noted = true;
                    expired.push(s.clone());
                }
            }
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
        let cgroups: Vec<PathBuf> = lock(&self.table)
            .by_id
            .values()
            .filter(|s| s.identity == identity)
            .map(|s| s.cgroup.clone())
            .collect();
        let paths: Vec<&Path> = cgroups.iter().map(PathBuf::as_path).collect();
        match crate::sockets::destroy_tcp_in(&paths) {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, identity, "could not destroy the identity's connections");
                0
            }
        }
    }

    /// Every session, in the order they were made.
    pub fn list(&self) -> Vec<Session> {
        lock(&self.table).by_id.values().cloned().collect()
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
