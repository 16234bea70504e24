//! cgroup2 discovery and the few operations agentwall needs: open by path, create, move a
//! process in, remove, and read the kernel's cgroup id (what the eBPF programs see).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2Mount,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not on the cgroup2 filesystem mounted at {root}")]
    NotCgroup2 { path: PathBuf, root: PathBuf },
    #[error("{path} did not freeze within {secs} s (a process stuck in the kernel?)")]
    FreezeTimeout { path: PathBuf, secs: u64 },
    #[error(
        "{path} is frozen already (cgroup.freeze is 1: by its owner, or by another freeze in progress); thaw it to go on"
    )]
    AlreadyFrozen { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The cgroup2 path in a `/proc/PID/cgroup` text (its `0::` line).
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Where cgroup2 is mounted, and which cgroup that mount shows at its top (not "/" inside a
/// cgroup namespace), so levels can be counted from the real root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub mount_point: PathBuf,
    pub root_depth: u32,
}

impl Cgroup2Mount {
    /// Finds the cgroup2 mount from `/proc/self/mountinfo`; never assumes `/sys/fs/cgroup`.
    pub fn discover() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_mountinfo(&text).ok_or(CgroupError::NoCgroup2Mount)
    }

    /// The cgroup2 directory of process `pid` (the `0::` line of `/proc/PID/cgroup`), if it is
    /// still there to ask.
    pub fn cgroup_of(&self, pid: u32) -> Option<PathBuf> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Some(self.path_of(parse_proc_cgroup(&text)?))
    }

    /// The directory of a cgroup path as `/proc/PID/cgroup` writes it.
    pub fn path_of(&self, rel: &str) -> PathBuf {
        self.mount_point.join(rel.trim_start_matches('/'))
    }

    pub fn from_mountinfo(text: &str) -> Option<Self> {
        text.lines().find_map(|line| {
            // Fields: id parent major:minor root mount_point options [optional...] - fstype ...
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = pre.split_whitespace();
            let root = f.nth(3)?;
            let mount_point = f.next()?;
            Some(Self {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                root_depth: Path::new(root)
                    .components()
                    .filter(|c| matches!(c, std::path::Component::Normal(_)))
                    .count() as u32,
            })
        })
    }

    pub fn root(&self) -> Result<Cgroup, CgroupError> {
        Cgroup::open_in(self, &self.mount_point)
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One cgroup2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
    level: u32,
}

impl Cgroup {
    /// Opens an existing cgroup directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CgroupError> {
        Self::open_in(&Cgroup2Mount::discover()?, path.as_ref())
    }

    fn open_in(mount: &Cgroup2Mount, path: &Path) -> Result<Self, CgroupError> {
        let path = path.canonicalize().map_err(io_err(path))?;
        let rel = path
            .strip_prefix(&mount.mount_point)
            .map_err(|_| CgroupError::NotCgroup2 {
                path: path.clone(),
                root: mount.mount_point.clone(),
            })?;
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        // On cgroup2 the directory's inode number is the cgroup id that
        // bpf_get_current_cgroup_id() returns.
        let level = mount.root_depth + rel.components().count() as u32;
        let procs = path.join("cgroup.procs");
        if !procs.exists() {
            return Err(CgroupError::NotCgroup2 {
                path,
                root: mount.mount_point.clone(),
            });
        }
        Ok(Self {
            id: meta.ino(),
            path,
            level,
        })
    }

    /// Creates `path` (and missing parents) as a cgroup, or opens it if it exists.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, CgroupError> {
        let path = path.as_ref();
        fs::create_dir_all(path).map_err(io_err(path))?;
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cgroup id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether its path still holds this cgroup, not one made there since (a unit its manager
    /// restarted).
    pub fn still_here(&self) -> bool {
        holds(&self.path, self.id)
    }

    /// Depth under the cgroup2 root (the root is level 0), as `bpf_get_current_ancestor_cgroup_id`
    /// counts it.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(io_err(&procs))?;
        f.write_all(pid.to_string().as_bytes())
            .map_err(io_err(&procs))
    }

    /// Whether any process lives in this cgroup or below it.
    pub fn is_populated(&self) -> Result<bool, CgroupError> {
        let events = self.path.join("cgroup.events");
        let text = fs::read_to_string(&events).map_err(io_err(&events))?;
        Ok(text.lines().any(|l| l.trim() == "populated 1"))
    }

    /// Freezes every process in this cgroup and below it until the guard is dropped, and
    /// waits until the kernel says the whole subtree is frozen, at most `within`. A cgroup
    /// frozen already is refused: a freeze someone else holds can be lifted under the caller.
    pub fn freeze(&self, within: std::time::Duration) -> Result<Frozen<'_>, CgroupError> {
        let control = self.path.join("cgroup.freeze");
        let was = fs::read_to_string(&control).map_err(io_err(&control))?;
        if was.trim() == "1" {
            return Err(CgroupError::AlreadyFrozen {
                path: self.path.clone(),
            });
        }
        let guard = Frozen { cgroup: self };
        fs::write(&control, "1").map_err(io_err(&control))?;
        let events = self.path.join("cgroup.events");
        let f = fs::File::open(&events).map_err(io_err(&events))?;
        let deadline = std::time::Instant::now() + within;
        loop {
            let mut text = String::new();
            use std::io::{Read as _, Seek as _};
            (&f).seek(io::SeekFrom::Start(0))
                .and_then(|_| (&f).read_to_string(&mut text))
                .map_err(io_err(&events))?;
            if text.lines().any(|l| l.trim() == "frozen 1") {
                return Ok(guard);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(CgroupError::FreezeTimeout {
                    path: self.path.clone(),
                    secs: within.as_secs(),
                });
            }
            // cgroup.events wakes a poller when it changed since it was last read.
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&f),
                events: libc::POLLPRI,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    /// Whether every task of this cgroup is frozen now (`cgroup.events`' `frozen 1`).
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        let events = self.path.join("cgroup.events");
        let text = fs::read_to_string(&events).map_err(io_err(&events))?;
        Ok(text.lines().any(|l| l.trim() == "frozen 1"))
    }

    /// Kills every process in this cgroup and below it (`cgroup.kill`, Linux 5.14; before it,
    /// SIGKILL to each process listed, which must not fork meanwhile: a frozen cgroup).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let control = self.path.join("cgroup.kill");
        match fs::write(&control, "1") {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other.map_err(io_err(&control)),
        }
        fn walk(cg: &Path) -> Result<(), CgroupError> {
            let procs = cg.join("cgroup.procs");
            let text = fs::read_to_string(&procs).map_err(io_err(&procs))?;
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: a signal to a process number; one gone meanwhile is ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            for e in fs::read_dir(cg).map_err(io_err(cg))? {
                let e = e.map_err(io_err(cg))?;
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path())?;
                }
            }
            Ok(())
        }
        walk(&self.path)
    }

    /// Opens (creating if needed) the child cgroup `name`.
    pub fn child(&self, name: &str) -> Result<Self, CgroupError> {
        Self::create(self.path.join(name))
    }

    /// Removes this cgroup and every cgroup below it, deepest first. Processes still inside make
    /// this fail with EBUSY; move them out first.
    pub fn remove_tree(&self) -> Result<(), CgroupError> {
        remove_tree(&self.path)
    }
}

/// A cgroup [`Cgroup::freeze`] froze; thawed when dropped.
pub struct Frozen<'a> {
    cgroup: &'a Cgroup,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = thaw(&self.cgroup.path) {
            tracing::error!(cgroup = %self.cgroup.path.display(), error = %e,
                "cannot thaw a cgroup frozen for a socket scan");
        }
    }
}

/// Lifts a freeze of the cgroup at `path`.
/// Whether `path` holds the cgroup `id` (on cgroup2 a directory's inode number is its cgroup's
/// id): false when it is gone or another cgroup was made there since.
pub fn holds(path: &Path, id: u64) -> bool {
    fs::metadata(path).is_ok_and(|m| m.ino() == id)
}

pub fn thaw(path: &Path) -> Result<(), CgroupError> {
    let control = path.join("cgroup.freeze");
    fs::write(&control, "0").map_err(io_err(&control))
}

/// A `cgroup.procs` or `cgroup.threads` file, of `cgroup`, of a cgroup below it or of one of
/// its ancestors, that someone other than root may write, with its owner and mode: `(file,
/// uid, mode)`. Moving a task between cgroups takes write access to the `cgroup.procs` of the
/// common ancestor of where it comes from and where it goes: across `cgroup`'s boundary that
/// is an ancestor, and within its subtree a cgroup of the subtree (a move there, mid-scan, can
/// hide a task from the listing). Where none is writable by anyone but root, only root moves
/// tasks (`clone3(CLONE_INTO_CGROUP)` included). A file that cannot be read counts as
/// writable (fail closed); so does group write, whatever the group.
pub fn delegated(cgroup: &Path) -> Option<(PathBuf, u32, u32)> {
    fn open_to_others(file: PathBuf) -> Option<(PathBuf, u32, u32)> {
        match fs::metadata(&file) {
            Ok(m) if m.uid() == 0 && m.mode() & 0o022 == 0 => None,
            Ok(m) => Some((file, m.uid(), m.mode() & 0o7777)),
            Err(_) => Some((file, u32::MAX, 0)),
        }
    }
    fn subtree(dir: &Path) -> Option<(PathBuf, u32, u32)> {
        for name in ["cgroup.procs", "cgroup.threads"] {
            if let Some(found) = open_to_others(dir.join(name)) {
                return Some(found);
            }
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return Some((dir.to_owned(), u32::MAX, 0));
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|e| subtree(&e.path()))
    }
    // Whoever may write the unit's own `cgroup.freeze` can thaw it under `enroll`'s scan
    // (an ancestor's or a descendant's cannot: a cgroup frozen itself stays frozen).
    if let Some(found) = open_to_others(cgroup.join("cgroup.freeze")) {
        return Some(found);
    }
    for dir in cgroup.ancestors().skip(1) {
        // Above the cgroup file system's root; a fault there is not taken for it.
        match is_cgroup(dir) {
            Ok(true) => {}
            Ok(false) => break,
            Err(_) => return Some((dir.join("cgroup.controllers"), u32::MAX, 0)),
        }
        if let Some(found) = open_to_others(dir.join("cgroup.procs")) {
            return Some(found);
        }
    }
    subtree(cgroup)
}

/// The top of the cgroup tree the node sees above `cgroup`, when it is not the host's root
/// cgroup: inside a cgroup namespace, or where only a subtree is mounted. The ancestors above
/// it are out of sight, so whether one is delegated to a user cannot be read. Only the root
/// cgroup lacks `cgroup.type`.
pub fn top_not_root(cgroup: &Path) -> Option<PathBuf> {
    let mut top = None;
    for dir in cgroup.ancestors() {
        match is_cgroup(dir) {
            Ok(true) => top = Some(dir),
            Ok(false) => break,
            // A fault is not taken for the top.
            Err(_) => return Some(dir.to_owned()),
        }
    }
    let top = top?;
    match fs::symlink_metadata(top.join("cgroup.type")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(top.to_owned()),
    }
}

/// Whether `dir` is a cgroup2 directory (it has `cgroup.controllers`); an error other than
/// its absence is one.
fn is_cgroup(dir: &Path) -> std::io::Result<bool> {
    match fs::symlink_metadata(dir.join("cgroup.controllers")) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The ids of `cgroup` and of every cgroup below it (a cgroup2 directory's inode number is
/// its id). Unreadable directories are left out.
pub fn subtree_ids(cgroup: &Path, out: &mut std::collections::HashSet<u64>) {
    if let Ok(m) = fs::metadata(cgroup) {
        out.insert(m.ino());
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                subtree_ids(&e.path(), out);
            }
        }
    }
}

fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    for entry in fs::read_dir(path).map_err(io_err(path))? {
        let entry = entry.map_err(io_err(path))?;
        if entry.file_type().map_err(io_err(path))?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_whose_top_is_not_the_root_cgroup_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("top");
        let unit = top.join("slice/unit");
        fs::create_dir_all(&unit).unwrap();
        for d in [&top, &top.join("slice"), &unit] {
            fs::write(d.join("cgroup.controllers"), "").unwrap();
        }
        for d in [&top.join("slice"), &unit] {
            fs::write(d.join("cgroup.type"), "domain\n").unwrap();
        }
        assert_eq!(top_not_root(&unit), None);
        // A cgroup namespace's top is an ordinary cgroup: it has a type.
        fs::write(top.join("cgroup.type"), "domain\n").unwrap();
        assert_eq!(top_not_root(&unit), Some(top.clone()));
        // The host's own tree: its top is the root.
        let mount = Cgroup2Mount::discover().unwrap();
        assert_eq!(top_not_root(&mount.mount_point), None);
    }

    #[test]
    fn finds_cgroup2_among_v1_mounts() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let m = Cgroup2Mount::from_mountinfo(text).unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m.root_depth, 0);
    }

    #[test]
    fn namespaced_root_and_escaped_mount_point() {
        let text = "41 31 0:38 /a/b /mnt/my\\040cg rw shared:1 - cgroup2 cgroup2 rw\n";
        let m = Cgroup2Mount::from_mountinfo(text).unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/mnt/my cg"));
        assert_eq!(m.root_depth, 2);
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert!(Cgroup2Mount::from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n").is_none());
    }
}
