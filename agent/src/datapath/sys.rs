//! The few bpf(2) and filesystem calls aya 0.14 does not expose.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The link-create member of union bpf_attr (no target-specific part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// The pin member of union bpf_attr.
#[repr(C)]
#[derive(Default)]
struct PinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// One bpf(2) call: `cmd` with `attr`, a `repr(C)` prefix of union bpf_attr (the kernel
/// takes the size given and requires the rest zero). The kernel's non-negative result (a
/// descriptor, for the commands that make one), or the error it gave.
///
/// # Safety
/// Every pointer `attr` holds must be valid for what `cmd` reads or writes through it, for the
/// duration of the call.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<i64> {
    // SAFETY: the caller's promise about attr's pointers; attr itself is live and sized.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches `prog` to `cgroup` with a BPF link and pins the link at `pin`, for program types
/// whose aya links cannot be pinned (cgroup sockopt in aya 0.14). The link lives as long as
/// the pin: the descriptor made here is closed on return.
pub fn attach_pinned_link(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
    pin: &Path,
) -> io::Result<()> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix that outlives the call.
    let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
    // SAFETY: a fresh descriptor the kernel just returned, owned here.
    let link = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    pin_object(link.as_fd(), pin)
}

const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// Links the loaded iterator program `prog` (no target: every object of its kind).
pub fn iter_link(prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_ITER,
        ..Default::default()
    };
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix that outlives the call.
    let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
    // SAFETY: a fresh descriptor the kernel just returned, owned here.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// A new iterator from iterator link `link`: reading it to its end runs the program over
/// every object once.
pub fn iter_create(link: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // The iter_create member of union bpf_attr: link_fd, flags.
    let mut attr = [link.as_raw_fd() as u32, 0u32];
    // SAFETY: attr is a valid bpf_attr prefix that outlives the call.
    let fd = unsafe { bpf(BPF_ITER_CREATE, &mut attr) }?;
    // SAFETY: a fresh descriptor the kernel just returned, owned here.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Pins the bpf object `fd` (a link, a map, a program) at `path`.
pub fn pin_object(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = PinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr points at a NUL-terminated path that outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// The element-operation member of union bpf_attr.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Removes `key` and returns its value in one step, so a concurrent writer cannot slip an
/// update between the read and the delete. `Ok(false)`: no such key.
pub fn map_lookup_and_delete(
    map: std::os::fd::BorrowedFd<'_>,
    key: &[u8],
    value: &mut [u8],
) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at key and value buffers the size the map was made with; they
    // outlive the call.
    match unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The bpf object pinned at `path`, opened with `file_flags` (`BPF_F_RDONLY`, ...).
fn pinned_object(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = PinAttr {
        pathname: c.as_ptr() as u64,
        file_flags,
        ..Default::default()
    };
    // SAFETY: attr points at a NUL-terminated path that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: a fresh descriptor the kernel just returned, owned here.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// The link pinned at `path`, opened.
pub fn pinned_link(path: &Path) -> io::Result<OwnedFd> {
    pinned_object(path, 0)
}

const BPF_LINK_DETACH: libc::c_long = 34;

/// Stops `link` running its program now (`BPF_LINK_DETACH`). Removing a link's last pin
/// detaches it too, but later: bpffs frees the pin after an RCU grace period and the link's
/// release then waits for a workqueue.
pub fn detach_link(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
        _pad: u32,
    }
    let mut attr = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
        _pad: 0,
    };
    // SAFETY: attr holds no pointers.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(|_| ())
}

/// `struct bpf_link_info` up to its cgroup member.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The cgroup a cgroup link is attached to: 0 once it has been detached (its cgroup gone,
/// or `BPF_LINK_DETACH`), when the link no longer runs its program anywhere.
pub fn link_cgroup(link: BorrowedFd<'_>) -> io::Result<u64> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<LinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: attr points at an info buffer of the length it gives, live across the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info.cgroup_id)
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Puts `prog` in place of the program `link` runs, in one step: the hook never runs
/// neither.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: plain descriptors.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(|_| ())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;

/// The keys of the hash map pinned at `path`, read as u64s (its keys must be 8 bytes, as
/// the bindings map's cgroup ids are in every map layout): for a map of a layout this build
/// does not know the values of.
pub fn pinned_u64_keys(path: &Path) -> io::Result<Vec<u64>> {
    // BPF_F_RDONLY: only keys are read.
    let map = pinned_object(path, 1 << 3)?;
    let mut keys = Vec::new();
    let mut next = 0u64;
    loop {
        let prev = keys.last().copied();
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: prev.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64),
            value: (&raw mut next) as u64,
            ..Default::default()
        };
        // SAFETY: attr points at an 8-byte key (or none: the first key) and an 8-byte
        // next-key buffer, both live across the call.
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            // A map changing under the walk can restart it: no walk outlasts every key twice.
            Ok(_) if keys.len() > 2 * 1024 * 1024 => {
                return Err(io::Error::other("map keys changed through the whole walk"));
            }
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

/// The slots of an array of maps or of programs (`max` of them) that hold one.
pub fn filled_slots(map: std::os::fd::BorrowedFd<'_>, max: u32) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for slot in 0..max {
        let mut id = 0u32;
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: (&raw const slot) as u64,
            value: (&raw mut id) as u64,
            ..Default::default()
        };
        // SAFETY: attr points at a 4-byte key and a 4-byte value (a map or program id), both
        // live.
        match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
            Ok(_) => out.push(slot),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Attach types the datapath uses (enum bpf_attach_type).
pub const ATTACH_INET_INGRESS: u32 = 0;
pub const ATTACH_INET_EGRESS: u32 = 1;
pub const ATTACH_CGROUP_SETSOCKOPT: u32 = 22;
pub const ATTACH_LSM_CGROUP: u32 = 43;
pub const ATTACH_INET_SOCK_CREATE: u32 = 2;
pub const ATTACH_INET4_CONNECT: u32 = 10;
pub const ATTACH_INET6_CONNECT: u32 = 11;
pub const ATTACH_UDP4_SENDMSG: u32 = 14;
pub const ATTACH_UDP6_SENDMSG: u32 = 15;
pub const ATTACH_UDP4_RECVMSG: u32 = 19;
pub const ATTACH_UDP6_RECVMSG: u32 = 20;
pub const ATTACH_INET4_GETPEERNAME: u32 = 29;
pub const ATTACH_INET6_GETPEERNAME: u32 = 30;

/// The BPF_PROG_QUERY member of union bpf_attr.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached directly to `cgroup` for `attach_type` (not inherited ones).
pub fn prog_query(cgroup: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    let dir = std::fs::File::open(cgroup)?;
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid BPF_PROG_QUERY attribute whose prog_ids buffer outlives the call.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(statfs_magic(path)? == BPF_FS_MAGIC)
}

/// Whether bpffs must be mounted at `/sys/fs/bpf` for `dir`: it lives below it, and nothing
/// is mounted there yet (some hosts do not mount it at boot).
pub fn bpffs_missing(dir: &Path) -> io::Result<bool> {
    let sys = Path::new("/sys/fs/bpf");
    Ok(dir.starts_with(sys) && !is_bpffs(sys)?)
}

/// Mounts bpffs at `/sys/fs/bpf`, root's only (mode 0700: a world-writable bpffs lets any
/// user make the pin directories before the node does).
pub fn mount_bpffs() -> io::Result<()> {
    mount_kernel_fs("bpf", "/sys/fs/bpf", Some("mode=0700"))
}

/// The initial PID namespace's inode number, fixed by the kernel (PROC_PID_INIT_INO).
const INIT_PID_NS: u64 = 0xEFFF_FFFC;

/// Whether this process runs in the initial PID namespace and `/proc` is that namespace's
/// (it names this process by the number the process has): only then does `/proc` list every
/// task on the host.
pub fn sees_every_task() -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::process::id().to_string();
    Ok(std::fs::metadata("/proc/self/ns/pid")?.ino() == INIT_PID_NS
        && std::fs::read_link("/proc/self")?.as_os_str() == own.as_str())
}

/// Whether this process shares the host's mount namespace (PID 1's). A file system mounted
/// in a namespace of its own (a systemd sandbox, say) goes when its last process does.
pub fn in_host_mount_namespace() -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    // PID 1 of the initial PID namespace: in a container, PID 1 is the container's init,
    // whose mounts go with the container.
    if std::fs::metadata("/proc/1/ns/pid")?.ino() != INIT_PID_NS {
        return Ok(false);
    }
    let ours = std::fs::metadata("/proc/self/ns/mnt")?;
    let host = std::fs::metadata("/proc/1/ns/mnt")?;
    Ok(ours.ino() == host.ino() && ours.dev() == host.dev())
}

/// The kernel's active LSMs, in order (`/sys/kernel/security/lsm`), mounting securityfs
/// first when nothing is mounted there.
pub fn active_lsms() -> io::Result<String> {
    let list = Path::new("/sys/kernel/security/lsm");
    if !list.exists() {
        mount_kernel_fs("securityfs", "/sys/kernel/security", None)?;
    }
    std::fs::read_to_string(list)
}

/// Mounts a kernel pseudo file system of type `fstype` at `target`, with `options`.
fn mount_kernel_fs(fstype: &str, target: &str, options: Option<&str>) -> io::Result<()> {
    let src = CString::new(fstype).expect("no NUL");
    let target = CString::new(target).expect("no NUL");
    let options = options.map(|o| CString::new(o).expect("no NUL"));
    // SAFETY: valid C strings; the data argument is a C string or null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            options
                .as_ref()
                .map_or(std::ptr::null(), |o| o.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The BPF_MAP_*_BATCH member of union bpf_attr.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `count` entries (keys and values packed at the sizes the map was made with) in one
/// call. Returns how many were applied on failure; a kernel whose map type has no batch
/// update says EINVAL or EOPNOTSUPP before applying any.
pub fn map_update_batch_raw(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<(), (usize, io::Error)> {
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr points at packed key and value arrays of `count` elements, each of the
    // sizes the map was created with; they outlive the call.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }
        .map(drop)
        .map_err(|e| (attr.count as usize, e))
}

/// Updates many u32 → u32 entries in one call. For map-in-map outer maps the kernel waits for
/// one RCU grace period per call rather than per element, which is what makes swapping many
/// identities' tries at once fast. On failure, returns how many entries were applied.
pub fn map_update_batch(
    map: std::os::fd::BorrowedFd<'_>,
    keys: &[u32],
    values: &[u32],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
    map_update_batch_raw(map, &bytes(keys), &bytes(values), keys.len())
}
