//! State files: each is replaced whole or not at all, and is on disk once the call returns.
//! Every file the node and the control-plane link keep goes through here, so none can be
//! left half-written or lost to a power cut after it was reported saved.

use std::{
    ffi::OsStr,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

/// A small record of fixed size, rewritten in place and synced: `bytes` (always the same
/// length for one file, at most one 512-byte sector, so a power cut leaves the old bytes or
/// the new) over `path`. Needs no new block, so it works on a full disk, where a replacement
/// file could not be made. The first write (no file yet, or one of another size) goes
/// through [`write_atomic`].
pub fn write_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    debug_assert!(bytes.len() <= 512);
    match std::fs::metadata(path) {
        Ok(m) if m.len() == bytes.len() as u64 => {}
        Ok(_) => return write_atomic(path, bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return write_atomic(path, bytes),
        Err(e) => return Err(e),
    }
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()
}

/// A secret's first line (a password): refused when group or others may read the file, so a
/// secret another user could read is never relied on.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let text = read_secret_file(path)?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// A secret file's whole text (a private key), refused as [`read_secret`] refuses one.
pub fn read_secret_file(path: &Path) -> io::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let f = std::fs::File::open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "mode {:04o} lets group or others read it; chmod 600 it",
                mode & 0o7777
            ),
        ));
    }
    io::read_to_string(f)
}

/// Replaces `path` with `bytes`: a temporary file beside it is written and fsync'd, renamed
/// over `path`, and the directory fsync'd.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = atomic_write_file::AtomicWriteFile::open(path)?;
    f.write_all(bytes)?;
    crate::failpoint!("state-file-before-rename");
    f.commit()
}

/// Replaces the directory `dir` with one holding exactly `files` (name, bytes). The new
/// directory is written beside it and synced first; then the two are exchanged in one step
/// (`renameat2(RENAME_EXCHANGE)`), so a crash leaves the old directory or the new, never
/// neither or a mix.
pub fn replace_dir<'a>(
    dir: &Path,
    files: impl IntoIterator<Item = (&'a OsStr, &'a [u8])>,
) -> io::Result<()> {
    let staged = sibling(dir, "new");
    remove_dir_if_any(&staged)?;
    std::fs::create_dir_all(&staged)?;
    for (name, bytes) in files {
        let p = staged.join(name);
        if p.parent() != Some(staged.as_path()) {
            return Err(io::Error::other(format!(
                "{}: not a plain file name",
                Path::new(name).display()
            )));
        }
        std::fs::write(&p, bytes)?;
    }
    // One sync for the whole file system instead of one per file: a directory of thousands
    // of policy files is written in one go.
    let handle = std::fs::File::open(&staged)?;
    // SAFETY: a valid descriptor of an open directory.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    drop(handle);
    if dir.exists() {
        exchange(&staged, dir)?;
        sync_parent(dir)?;
        remove_dir_if_any(&staged)?;
    } else {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&staged, dir)?;
        sync_parent(dir)?;
    }
    Ok(())
}

/// What some files looked like when last read (path, modification time, length): a
/// different stamp means one of them changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamp(Vec<(PathBuf, Option<std::time::SystemTime>, u64)>);

impl Stamp {
    pub fn of(paths: &[PathBuf]) -> Self {
        Self(
            paths
                .iter()
                .map(|p| {
                    let m = std::fs::metadata(p).ok();
                    (
                        p.clone(),
                        m.as_ref().and_then(|m| m.modified().ok()),
                        m.map_or(0, |m| m.len()),
                    )
                })
                .collect(),
        )
    }

    /// Every file in `dir`.
    pub fn of_dir(dir: &Path) -> Self {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        Self::of(&files)
    }
}

/// `dir` with `.ext` added to its last component.
fn sibling(dir: &Path, ext: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_owned();
    name.push(".");
    name.push(ext);
    dir.with_file_name(name)
}

fn remove_dir_if_any(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid C strings; AT_FDCWD resolves them like open(2) would.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sync_parent(p: &Path) -> io::Result<()> {
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

/// The files of a directory that a process has written to and not yet closed (inotify: a
/// modification, truncation included, opens a write; closing a file written to, removing it
/// or renaming it ends it), so a reader never takes a file half-written (`cat > f`, an
/// editor without rename, a slow copy), whose start is often a valid file by itself.
pub struct Writes {
    dir: PathBuf,
    /// None where inotify could not watch the directory: then nothing is known to be open.
    watch: Option<(inotify::Inotify, u64)>,
    open: std::collections::BTreeSet<std::ffi::OsString>,
}

impl Writes {
    pub fn watch(dir: &Path) -> Self {
        let mut w = Self {
            dir: dir.to_owned(),
            watch: None,
            open: Default::default(),
        };
        w.rewatch();
        w
    }

    fn dir_inode(&self) -> Option<u64> {
        std::fs::metadata(&self.dir)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    }

    /// A watch on the directory as it is now (it may have been replaced by another).
    fn rewatch(&mut self) {
        use inotify::WatchMask as M;
        self.open.clear();
        self.watch = None;
        let Some(ino) = self.dir_inode() else {
            return;
        };
        let made = inotify::Inotify::init().and_then(|i| {
            i.watches().add(
                &self.dir,
                M::MODIFY | M::CLOSE_WRITE | M::DELETE | M::MOVED_FROM | M::MOVED_TO,
            )?;
            Ok(i)
        });
        match made {
            Ok(i) => self.watch = Some((i, ino)),
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e,
                "cannot watch the directory for files being written; only a settled directory is read"),
        }
    }

    /// The files written to and not closed since, after taking in what happened.
    pub fn open(&mut self) -> Vec<std::ffi::OsString> {
        use inotify::EventMask as E;
        if self.watch.as_ref().map(|w| w.1) != self.dir_inode() {
            self.rewatch();
        }
        let mut overflowed = false;
        if let Some((inotify, _)) = &mut self.watch {
            let mut buf = [0u8; 4096];
            while let Ok(events) = inotify.read_events(&mut buf) {
                for e in events {
                    overflowed |= e.mask.contains(E::Q_OVERFLOW);
                    let Some(name) = e.name else { continue };
                    if e.mask.contains(E::MODIFY) {
                        self.open.insert(name.to_owned());
                    } else {
                        self.open.remove(name);
                    }
                }
            }
        }
        // What is open can no longer be known; a fresh watch knows nothing open.
        if overflowed {
            self.rewatch();
        }
        self.open.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_and_not_closed_is_open_until_closed_renamed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.yaml"), "a").unwrap();
        let mut w = Writes::watch(dir.path());
        assert!(w.open().is_empty());
        let mut f = std::fs::File::create(dir.path().join("old.yaml")).unwrap();
        assert_eq!(w.open(), ["old.yaml"], "truncated, still open");
        f.write_all(b"kind:").unwrap();
        assert_eq!(w.open(), ["old.yaml"]);
        drop(f);
        assert!(w.open().is_empty(), "closed");
        // Written beside and renamed into place: never open under its own name.
        let mut t = std::fs::File::create(dir.path().join(".new.tmp")).unwrap();
        t.write_all(b"x").unwrap();
        assert_eq!(w.open(), [".new.tmp"]);
        std::fs::rename(dir.path().join(".new.tmp"), dir.path().join("new.yaml")).unwrap();
        assert!(w.open().is_empty(), "renamed away while open");
        t.write_all(b"y").unwrap();
        assert_eq!(w.open(), ["new.yaml"], "written under its new name");
        std::fs::remove_file(dir.path().join("new.yaml")).unwrap();
        assert!(w.open().is_empty(), "removed");
        drop(t);
        // The directory replaced by another: watched anew.
        let moved = tempfile::tempdir().unwrap();
        std::fs::rename(dir.path(), moved.path().join("gone")).unwrap();
        std::fs::create_dir(dir.path()).unwrap();
        let mut g = std::fs::File::create(dir.path().join("g.yaml")).unwrap();
        assert!(w.open().is_empty(), "a fresh watch knows of no writer yet");
        g.write_all(b"z").unwrap();
        assert_eq!(w.open(), ["g.yaml"]);
    }

    #[test]
    fn a_file_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_directory_is_exchanged_whole() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("policy");
        replace_dir(&dir, [(OsStr::new("a.yaml"), &b"a"[..])]).unwrap();
        replace_dir(
            &dir,
            [
                (OsStr::new("b.yaml"), &b"b"[..]),
                (OsStr::new("c.yaml"), &b"c"[..]),
            ],
        )
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["b.yaml", "c.yaml"]);
        assert!(!sibling(&dir, "new").exists());
        let e = replace_dir(&dir, [(OsStr::new("../x.yaml"), &b"x"[..])]).unwrap_err();
        assert!(e.to_string().contains("not a plain file name"), "{e}");
        assert!(
            dir.join("b.yaml").exists(),
            "a refused write changes nothing"
        );
    }
}
