//! Sessions that renew themselves from their certificate and key files: when a rotator
//! (spiffe-helper, cert-manager's CSI driver, step, a cron job) rewrites them, the node reads
//! the new pair, checks it as a launch is checked (chain, validity, EKU, CRLs, trust domain,
//! the same SPIFFE ID, the key the certificate's), and moves the session's kernel deadline.
//!
//! The files are named by whoever launched the session, so they are read with that user's
//! filesystem credentials, never the node's: a path to a file the launcher could not read
//! reads nothing. A file that is not a regular file (a FIFO would hold the reader) or is
//! larger than any certificate is refused without being read. A pair that fails is tried
//! again for a few seconds (a rotator may write the certificate before the key), then
//! refused with a record, once per state of the files; the session runs on until its
//! current deadline.

use std::{
    collections::HashMap, io::Read as _, os::unix::fs::OpenOptionsExt as _, path::Path, sync::Arc,
    time::Duration,
};

use sha2::Digest as _;
use tracing::{error, info, warn};

use super::{
    Node,
    journal::{AuditEvent, IdentityEvent},
};
use crate::api::{Follow, Followed, Session};

/// How often the files are looked at: well inside any certificate's life.
const TICK: Duration = Duration::from_secs(1);
/// Larger than any certificate chain or key file (each is read every second).
const MAX_FILE: u64 = 64 << 10;
/// Looks at a failing pair before it is refused (a rotator between its two writes).
const SETTLE: u32 = 5;

/// Longest path taken (PATH_MAX).
const MAX_PATH: usize = 4096;

/// Who launched: (uid, gid, supplementary groups), from the socket.
pub(super) struct Launcher {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// The files of a launch request, checked, with whose credentials they are read: the
/// launcher's; a root launcher's as the user the agent runs as, when it names one (that user
/// may write where the files are).
pub(super) fn followed(f: Follow, by: Launcher) -> Result<Followed, String> {
    for p in [&f.cert, &f.key] {
        let text = p.as_os_str().as_encoded_bytes();
        if !p.is_absolute() || text.len() > MAX_PATH || text.iter().any(u8::is_ascii_control) {
            return Err(format!(
                "follow: {p:?} is not an absolute path of at most {MAX_PATH} bytes without control characters"
            ));
        }
    }
    let (uid, gid, groups) = match f.user {
        Some((uid, gid)) if by.uid == 0 => (uid, gid, Vec::new()),
        _ => (by.uid, by.gid, by.groups),
    };
    Ok(Followed {
        cert: f.cert,
        key: f.key,
        uid,
        gid,
        groups,
    })
}

/// Whether the node can read the pair now, as it will later: a launch whose files it cannot
/// follow is refused rather than cut off at its first deadline. On a thread of its own (its
/// credentials change while it reads).
pub(super) fn check_readable(f: &Followed) -> Result<(), String> {
    const WITHIN: Duration = Duration::from_secs(5);
    let f = f.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_pair(&f).map(|_| ()));
    });
    // A file on a filesystem that does not answer holds its reader, not the launch.
    rx.recv_timeout(WITHIN)
        .unwrap_or_else(|_| Err(format!("the files were not read within {WITHIN:?}")))
        .map_err(|e| format!("--follow: {e}"))
}

/// What tells one state of a file from another: its content's digest (exact, where times
/// and sizes may repeat within a clock tick).
type Stamp = [u8; 32];
/// A regular file of at most [`MAX_FILE`] bytes. Found without following /proc's magic
/// links (they would lead past directories the user cannot enter) and without opening what
/// it names until it is known to be a regular file (opening a device can act on it).
fn read_file(path: &Path) -> Result<(Stamp, Vec<u8>), String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: has a NUL byte", path.display()))?;
    // SAFETY: open_how is plain data; zero is its every field's default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid C string and open_how of its own size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor the call just made, owned here.
    let found = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let m = std::fs::File::from(found.try_clone().map_err(fail)?)
        .metadata()
        .map_err(fail)?;
    if !m.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    // The kernel's own files: the node may see more of them than the user (it keeps
    // CAP_SYS_PTRACE), and no certificate lives there.
    // SAFETY: fstatfs into a zeroed statfs on a descriptor owned here.
    let fs = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::fstatfs(found.as_raw_fd(), &mut st) == 0).then_some(st.f_type)
    };
    if matches!(fs, None | Some(libc::PROC_SUPER_MAGIC | libc::SYSFS_MAGIC)) {
        return Err(format!(
            "{}: not a file on a disk filesystem",
            path.display()
        ));
    }
    if m.len() > MAX_FILE {
        return Err(format!(
            "{}: {} bytes, more than any certificate or key",
            path.display(),
            m.len()
        ));
    }
    // Opened for reading through the descriptor found, checked against the user's
    // permissions like any open.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", found.as_raw_fd()))
        .map_err(fail)?;
    let mut text = Vec::with_capacity(m.len() as usize);
    f.take(MAX_FILE + 1).read_to_end(&mut text).map_err(fail)?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!(
            "{}: grew past {MAX_FILE} bytes while read",
            path.display()
        ));
    }
    Ok((sha2::Sha256::digest(&text).into(), text))
}

/// The calling thread's filesystem credentials and groups, changed for `f` and put back.
/// Raw system calls: each changes this thread only (the C library's wrappers would change
/// every thread of the node). Leaving uid 0 for the filesystem drops the capabilities that
/// would bypass file permissions; coming back restores them.
struct AsUser {
    groups: Vec<libc::gid_t>,
    dumpable: libc::c_int,
}

impl AsUser {
    fn enter(uid: u32, gid: u32, groups: &[u32]) -> Result<Self, String> {
        // SAFETY: getgroups with a buffer of the size it asked for; prctl reads a flag.
        let me = unsafe {
            let n = libc::getgroups(0, std::ptr::null_mut());
            let mut g = vec![0; n.max(0) as usize];
            let n = libc::getgroups(n, g.as_mut_ptr());
            g.truncate(n.max(0) as usize);
            Self {
                groups: g,
                dumpable: libc::prctl(libc::PR_GET_DUMPABLE),
            }
        };
        // SAFETY: plain system calls on this thread's credentials.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                let e = std::io::Error::last_os_error();
                drop(me);
                return Err(format!("cannot take the groups of uid {uid}: {e}"));
            }
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
            // Each returns the value in force; -1 changes nothing.
            let fsuid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
            let fsgid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
            if fsuid != uid || fsgid != gid {
                drop(me);
                return Err(format!(
                    "cannot read files as uid {uid} gid {gid} (the kernel kept {fsuid}/{fsgid}: the node lacks CAP_SETUID or CAP_SETGID)"
                ));
            }
        }
        Ok(me)
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // SAFETY: plain system calls on this thread's credentials; prctl sets a flag.
        let ok = unsafe {
            libc::syscall(libc::SYS_setfsuid, 0u32);
            libc::syscall(libc::SYS_setfsgid, 0u32);
            let groups =
                libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) == 0;
            // Changing the filesystem uid makes the process undumpable; it was not before.
            libc::prctl(libc::PR_SET_DUMPABLE, self.dumpable as libc::c_ulong);
            groups && libc::syscall(libc::SYS_setfsuid, u32::MAX) == 0
        };
        if !ok {
            // This thread reads nothing else; following stops and sessions run out.
            error!("could not take back the node's own credentials after reading followed files");
            panic!("credentials not restored");
        }
    }
}

/// Both files, read as their user.
fn read_pair(f: &Followed) -> Result<[(Stamp, Vec<u8>); 2], String> {
    let _as = AsUser::enter(f.uid, f.gid, &f.groups)?;
    Ok([read_file(&f.cert)?, read_file(&f.key)?])
}

/// A state of the files a verdict was reached on: what they held, or why they could not be
/// read.
#[derive(Clone, PartialEq, Eq)]
enum State {
    Files([Stamp; 2]),
    Unreadable(String),
}

/// Where one followed session stands.
#[derive(Default)]
struct Seen {
    /// The state last judged for good (renewed, unchanged or refused).
    judged: Option<State>,
    /// Looks at a failing state so far.
    tries: u32,
}

impl Node {
    /// Follows every session launched with `--follow`, for as long as the node runs.
    pub(super) fn spawn_follower(self: &Arc<Self>) {
        let node = self.clone();
        let spawned = std::thread::Builder::new()
            .name("agentwall-follow".into())
            .spawn(move || {
                let mut seen: HashMap<u64, Seen> = HashMap::new();
                loop {
                    std::thread::sleep(TICK);
                    node.follow_once(&mut seen);
                }
            });
        if let Err(e) = spawned {
            error!(error = %e, "sessions launched with --follow will not be renewed: no thread to follow them");
        }
    }

    fn follow_once(&self, seen: &mut HashMap<u64, Seen>) {
        let sessions: Vec<Session> = self
            .sessions
            .list()
            .into_iter()
            .filter(|s| s.follow.is_some() && !s.revoked)
            .collect();
        seen.retain(|id, _| sessions.iter().any(|s| s.cgroup_id == *id));
        for s in sessions {
            let st = seen.entry(s.cgroup_id).or_default();
            self.follow_session(&s, st);
        }
    }

    fn follow_session(&self, s: &Session, st: &mut Seen) {
        let Some(f) = &s.follow else { return };
        let read = read_pair(f);
        let state = match &read {
            Ok([c, k]) => State::Files([c.0, k.0]),
            Err(why) => State::Unreadable(why.clone()),
        };
        if st.judged.as_ref() == Some(&state) {
            return;
        }
        match read.and_then(|[c, k]| self.judge_pair(s, f, &c.1, &k.1)) {
            Ok(None) => {
                st.judged = Some(state);
                st.tries = 0;
            }
            Ok(Some(peer)) => {
                st.judged = Some(state);
                st.tries = 0;
                match self.sessions.renew(&peer, s, true) {
                    Ok(Some(_)) => info!(identity = %s.identity, cgroup = %s.cgroup.display(),
                        serial = %peer.serial, cert = %f.cert.display(),
                        "session renewed from its rotated files"),
                    Ok(None) => {}
                    Err(e) => self.follow_refused(s, f, &e.to_string()),
                }
            }
            // Refused once a state has failed a few looks in a row (a rotator may be between
            // its writes), and not again for the same state.
            Err(why) => {
                st.tries += 1;
                if st.tries >= SETTLE {
                    st.tries = 0;
                    st.judged = Some(state);
                    self.follow_refused(s, f, &why);
                }
            }
        }
    }

    /// The rotated pair's peer when it is another certificate the session may move to (the
    /// renewal takes only a later one); None when it is the one in force.
    fn judge_pair(
        &self,
        s: &Session,
        f: &Followed,
        cert: &[u8],
        key: &[u8],
    ) -> Result<Option<crate::identity::VerifiedPeer>, String> {
        // The parser's complaint quotes what it read: none of it goes into records.
        let chain = crate::pem::certs_in(&f.cert, cert)
            .map_err(|_| format!("{}: not a PEM certificate chain", f.cert.display()))?;
        let key = crate::pem::key_in(&f.key, key)
            .map_err(|_| format!("{}: not a PEM private key", f.key.display()))?;
        let peer = self
            .trust
            .current()
            .trust
            .verify_pair(chain, key)
            .map_err(|e| e.to_string())?;
        if peer.id.to_string() != s.identity {
            return Err(format!(
                "the certificate is for {}, not the session's {}",
                peer.id, s.identity
            ));
        }
        if peer.serial == s.serial {
            return Ok(None);
        }
        self.admissible(&s.identity).map_err(|e| e.to_string())?;
        Ok(Some(peer))
    }

    fn follow_refused(&self, s: &Session, f: &Followed, why: &str) {
        let reason = format!(
            "rotated files {} and {} refused: {why}; the session runs on until {}",
            f.cert.display(),
            f.key.display(),
            s.not_after
        );
        warn!(identity = %s.identity, cgroup = %s.cgroup.display(), reason, "renewal refused");
        self.counters.add(|c| c.session_rejections += 1);
        self.journal
            .record(&AuditEvent::Identity(IdentityEvent::Rejected {
                op: "renew",
                identity: Some(s.identity.clone()),
                reason: Some(reason),
            }));
    }
}

/// For `status`: how a session is renewed.
pub fn renews(s: &Session) -> String {
    match (&s.follow, &s.workload_api, &s.issued) {
        (Some(f), _, _) => format!("from {} (followed)", f.cert.display()),
        (None, Some(endpoint), _) => format!("from the Workload API at {endpoint}"),
        (None, None, Some(_)) => "from the control plane's issuer".to_owned(),
        (None, None, None) => "by hand".to_owned(),
    }
}

/// The longest Workload API endpoint a launch may name (a unix socket path is at most 108
/// bytes; `tcp://` endpoints are shorter still).
const MAX_ENDPOINT: usize = 256;

/// Checks the Workload API endpoint a launch says it renews from: one way of renewing a
/// session (`ways`: how many the launch names), and a name `status` can show.
pub(super) fn workload_api_endpoint(endpoint: Option<&str>, ways: usize) -> Result<(), String> {
    if ways > 1 {
        return Err(
            "a session renews one way: from its files, its Workload API or the issuer".to_owned(),
        );
    }
    let Some(e) = endpoint else {
        return Ok(());
    };
    if e.is_empty()
        || e.len() > MAX_ENDPOINT
        || e.chars()
            .any(|c| c.is_control() || crate::policy::owner::is_hidden_format(c))
    {
        return Err(format!(
            "the Workload API endpoint must be 1 to {MAX_ENDPOINT} bytes of printable text"
        ));
    }
    Ok(())
}
