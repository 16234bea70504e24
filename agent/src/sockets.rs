//! Destroying an identity's established TCP connections (revocation), or every TCP and UDP
//! socket of its sessions (an upgrade to a new map layout), with SOCK_DESTROY over
//! NETLINK_SOCK_DIAG. A netlink socket only sees its own network namespace, so the work runs
//! once per namespace the identity's processes use, on a thread that has entered it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID`: the socket's cgroup id, a u64 attribute of every dump record.
const INET_DIAG_CGROUP_ID: u16 = 21;

/// Which sockets a sweep destroys.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sweep {
    /// TCP connections, not listeners: revocation ends connections, not a server's accept
    /// queue (its new connections already fail in the kernel).
    Connections,
    /// Every TCP and UDP socket, listeners included: sockets whose state the datapath no
    /// longer holds (made under an earlier map layout) must be made again.
    Everything,
}

impl Sweep {
    fn states(self) -> StateFlags {
        match self {
            Self::Connections => StateFlags::all() - StateFlags::LISTEN,
            Self::Everything => StateFlags::all(),
        }
    }

    fn protocols(self) -> &'static [u8] {
        match self {
            Self::Connections => &[IPPROTO_TCP],
            Self::Everything => &[IPPROTO_TCP, IPPROTO_UDP],
        }
    }
}

fn send(
    sock: &Socket,
    msg: &mut NetlinkMessage<impl netlink_packet_core::NetlinkSerializable>,
) -> io::Result<()> {
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.send(&buf, 0).map(drop)
}

/// A TCP or UDP socket a sock_diag dump listed.
struct Listed {
    family: u8,
    protocol: u8,
    socket_id: SocketId,
    inode: u32,
    cgroup: Option<u64>,
}

fn diag_socket() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

/// Every socket of `protocols` (IPv4 and IPv6) in `states`, in the calling thread's network
/// namespace, with its cgroup id.
fn dump_here(sock: &Socket, protocols: &[u8], states: StateFlags) -> io::Result<Vec<Listed>> {
    let mut listed = Vec::new();
    for (family, protocol) in [AF_INET, AF_INET6]
        .into_iter()
        .flat_map(|f| protocols.iter().map(move |p| (f, *p)))
    {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let req = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: states.clone(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        });
        send(
            sock,
            &mut NetlinkMessage::new(header, NetlinkPayload::from(req)),
        )?;
        let mut buf = vec![0u8; 1 << 16];
        'dump: loop {
            let n = sock.recv(&mut &mut buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n])
                    .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(io::Error::other(format!("sock_diag dump: {e:?}")));
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let cgroup = r.nlas.iter().find_map(|nla| match nla {
                            Nla::Other(o)
                                if o.kind() == INET_DIAG_CGROUP_ID && o.value_len() == 8 =>
                            {
                                let mut v = [0u8; 8];
                                o.emit_value(&mut v);
                                Some(u64::from_ne_bytes(v))
                            }
                            _ => None,
                        });
                        listed.push(Listed {
                            family,
                            protocol,
                            socket_id: r.header.socket_id.clone(),
                            inode: r.header.inode,
                            cgroup,
                        });
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
    Ok(listed)
}

/// Destroys, in the calling thread's network namespace, every socket whose cgroup is in
/// `cgroups` (of the kinds `sweep` names); returns how many.
fn destroy_here(
    cgroups: &HashSet<u64>,
    sweep: Sweep,
    pick: impl Fn(&SocketId) -> bool,
) -> io::Result<usize> {
    let sock = diag_socket()?;
    let victims: Vec<Listed> = dump_here(&sock, sweep.protocols(), sweep.states())?
        .into_iter()
        .filter(|l| l.cgroup.is_some_and(|id| cgroups.contains(&id)) && pick(&l.socket_id))
        .collect();
    let mut destroyed = 0;
    for Listed {
        family,
        protocol,
        socket_id,
        ..
    } in victims
    {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let req = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: sweep.states(),
            socket_id,
        }));
        send(
            &sock,
            &mut NetlinkMessage::new(header, NetlinkPayload::from(req)),
        )?;
        let mut buf = vec![0u8; 4096];
        let n = sock.recv(&mut &mut buf[..], 0)?;
        if let Ok(msg) = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..n]) {
            match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    let errno = e.code.map_or(0, |c| -c.get());
                    // Every socket of an upgrade's sweep must go: only one that is already
                    // gone is no failure there (a kernel without SOCK_DESTROY says so here).
                    if sweep == Sweep::Everything && errno != libc::ENOENT {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    tracing::debug!(error = ?e, "SOCK_DESTROY refused (socket already gone?)");
                }
                _ => destroyed += 1,
            }
        }
    }
    Ok(destroyed)
}

/// Destroys the TCP connections of every socket that belongs to one of `cgroups` (and the
/// cgroups below them), in every network namespace their processes live in. Returns the number
/// destroyed.
pub fn destroy_tcp_in(cgroups: &[&Path]) -> io::Result<usize> {
    destroy_in(cgroups, Sweep::Connections, |_| true)
}

/// Ends the TCP connections of `cgroups` (and the cgroups below them) that `which` names, each
/// by its local port and peer (an IPv4 peer matches its IPv4-mapped form too), in every
/// network namespace their processes live in: one dump per namespace for all of them.
/// Returns how many were destroyed (those already gone are not counted).
pub fn destroy_connections(
    cgroups: &[&Path],
    which: &[(u16, std::net::SocketAddr)],
) -> io::Result<usize> {
    let which: std::sync::Arc<HashSet<(u16, u16, std::net::IpAddr)>> = std::sync::Arc::new(
        which
            .iter()
            .map(|(local, peer)| (*local, peer.port(), peer.ip().to_canonical()))
            .collect(),
    );
    destroy_in(cgroups, Sweep::Connections, move |id: &SocketId| {
        which.contains(&(
            id.source_port,
            id.destination_port,
            id.destination_address.to_canonical(),
        ))
    })
}

/// Destroys every TCP socket (listeners included) and every UDP socket of `cgroups` and the
/// cgroups below them, in every network namespace their processes live in: after an upgrade
/// to a new map layout, sockets made before it carry no state the new programs could judge
/// their packets by. Returns the number destroyed.
pub fn destroy_all_in(cgroups: &[&Path]) -> io::Result<usize> {
    destroy_in(cgroups, Sweep::Everything, |_| true)
}

fn destroy_in(
    cgroups: &[&Path],
    sweep: Sweep,
    pick: impl Fn(&SocketId) -> bool + Send + Sync + Clone + 'static,
) -> io::Result<usize> {
    let mut ids = HashSet::new();
    let mut pids = Vec::new();
    for cg in cgroups {
        crate::cgroup::subtree_ids(cg, &mut ids);
        // A cgroup already gone has no process left to sweep.
        if let Ok((p, _)) = processes_in(cg) {
            pids.extend(p);
        }
    }
    let mut namespaces = BTreeMap::new();
    for pid in pids {
        for task in tasks_of(pid) {
            note_namespace(&task.join("ns/net"), &mut namespaces);
        }
    }
    let ids = std::sync::Arc::new(ids);
    Ok(
        in_each(namespaces, move || destroy_here(&ids, sweep, &pick))?
            .into_iter()
            .sum(),
    )
}

/// A socket a process holds that the packet line could not govern as its cgroup's: made in
/// another cgroup (systemd socket activation hands a unit PID 1's listener; a process moved
/// in keeps what it made before), of a kind a governed task may not make, or held where no
/// descriptor shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unjudged {
    pub pid: u32,
    /// The process's name, as it set it (shown escaped).
    pub comm: String,
    /// The descriptor, where one holds it.
    pub fd: Option<u32>,
    /// The kernel's name for the socket's protocol (`TCP`, `UDPv6`, `PACKET`, ...).
    pub kind: String,
    pub why: Unjudgeable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unjudgeable {
    /// A TCP or UDP socket of another cgroup (its id), with its local and peer addresses.
    OtherCgroup {
        cgroup: u64,
        local: std::net::SocketAddr,
        peer: Option<std::net::SocketAddr>,
    },
    /// A TCP or UDP socket no dump lists (neither bound nor connected): where it was made
    /// cannot be read.
    Unlisted,
    /// A kind sock_create refuses governed tasks.
    Kind,
    /// Mapped into the process's memory (a packet socket's ring takes packets without a
    /// descriptor).
    Mapped,
    /// Registered with an io_uring instance (used through the ring without a descriptor).
    Registered,
    /// An io_uring instance whose registered files were not all printed, which before Linux
    /// 6.15 does not tell a sparse table from a ring a process outside keeps busy.
    UnreadRing,
    /// An io_uring instance mapped with no descriptor left (its ring registered): what it
    /// holds cannot be read.
    HiddenRing,
    /// An io_uring instance a task registered with itself (`IORING_REGISTER_RING_FDS`) that
    /// no descriptor shows (closed, its memory the task's own or unmapped): what it holds
    /// cannot be read.
    UnheldRing,
    /// An io_uring instance a launcher would hand to the agent (kept across exec): its work
    /// runs with what its maker holds, and with an SQPOLL thread in its maker's cgroup,
    /// without a system call of the agent's.
    InheritedRing,
    /// An io_uring instance whose SQPOLL thread is a task outside the unit (the ring was made
    /// by another process, then taken): it carries out what the unit submits, as that task.
    ForeignRingThread,
    /// An io_uring instance whose lock was held at every read of its `fdinfo`: the unit is
    /// frozen, so a process outside it is working the ring, and what the ring holds and who
    /// carries out its work cannot be read.
    BusyRing,
    /// An io_uring instance read once, past the scan's budget of reads again: whether a
    /// process outside the unit works it (its SQPOLL thread, shown only when its lock is
    /// free) was not settled.
    UnsettledRing,
}

impl std::fmt::Display for Unjudged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({:?})", self.pid, self.comm)?;
        if let Some(fd) = self.fd {
            write!(f, " fd {fd}")?;
        }
        match &self.why {
            Unjudgeable::Mapped => {
                return f.write_str(
                    ": a socket mapped into memory (a packet ring takes packets without a descriptor)",
                );
            }
            Unjudgeable::Registered => {
                return f.write_str(
                    ": an io_uring instance with a registered socket (used without a descriptor)",
                );
            }
            Unjudgeable::UnreadRing => {
                return f.write_str(
                    ": an io_uring instance whose registered files were not all shown (a sparse table, or a ring a process outside the cgroup keeps busy: kernels before 6.15 print the two alike)",
                );
            }
            Unjudgeable::HiddenRing => {
                return f.write_str(
                    ": an io_uring instance mapped without a descriptor (what it holds cannot be read)",
                );
            }
            Unjudgeable::UnheldRing => {
                return f.write_str(
                    ": an io_uring instance registered with the task that no descriptor shows (what it holds cannot be read)",
                );
            }
            Unjudgeable::InheritedRing => {
                return f.write_str(
                    ": an io_uring instance the agent would keep (its work runs as the process that made it, an SQPOLL ring's outside the agent's cgroup)",
                );
            }
            Unjudgeable::ForeignRingThread => {
                return f.write_str(
                    ": an io_uring instance whose SQPOLL thread is outside the cgroup (it carries out what the unit submits, ungoverned)",
                );
            }
            Unjudgeable::BusyRing => {
                return f.write_str(
                    ": an io_uring instance a process outside the cgroup keeps busy (its lock held at every read, so what it holds and who works it cannot be read)",
                );
            }
            Unjudgeable::UnsettledRing => {
                return f.write_str(
                    ": an io_uring instance past the rings a scan reads again (its SQPOLL thread unsettled: close the unit's spare rings)",
                );
            }
            _ => write!(f, ": {} socket ", self.kind)?,
        }
        match &self.why {
            Unjudgeable::OtherCgroup {
                cgroup,
                local,
                peer: Some(peer),
            } => write!(f, "{local} -> {peer} made in cgroup id {cgroup}"),
            Unjudgeable::OtherCgroup {
                cgroup,
                local,
                peer: None,
            } => write!(f, "on {local} made in cgroup id {cgroup}"),
            Unjudgeable::Unlisted => {
                f.write_str("neither bound nor connected, so where it was made cannot be read")
            }
            Unjudgeable::Kind
            | Unjudgeable::Mapped
            | Unjudgeable::Registered
            | Unjudgeable::UnreadRing
            | Unjudgeable::HiddenRing
            | Unjudgeable::UnheldRing
            | Unjudgeable::InheritedRing
            | Unjudgeable::ForeignRingThread
            | Unjudgeable::BusyRing
            | Unjudgeable::UnsettledRing => f.write_str("of a kind governed agents may not use"),
        }
    }
}

/// The protocols whose sockets are governed by the cgroup that made them.
const JUDGED_KINDS: [&str; 4] = ["TCP", "TCPv6", "UDP", "UDPv6"];
/// Local sockets: they reach no other host.
const LOCAL_KINDS: [&str; 3] = ["UNIX", "UNIX-STREAM", "NETLINK"];
/// Descriptors read in one scan, at most: a unit cannot hold the node in its scan for long.
const SCAN_BUDGET: usize = 1 << 20;

/// Which descriptors of a process count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Descriptors {
    /// Every one it holds.
    All,
    /// Those it keeps across exec (not close-on-exec): what a launcher hands the agent.
    KeptAcrossExec,
}

/// A socket one of the scanned tasks holds.
struct Held {
    pid: u32,
    fd: u32,
    link: std::path::PathBuf,
    inode: u64,
    kind: String,
}

/// What a scan found: sockets held by descriptor, sockets held otherwise, and a handle on
/// each network namespace the tasks are in.
#[derive(Default)]
struct Scan {
    held: Vec<Held>,
    elsewhere: Vec<(u32, Option<u32>, Unjudgeable)>,
    namespaces: BTreeMap<u64, OwnedFd>,
    read: usize,
    /// Each process's io_uring mappings, by the inode each maps.
    ring_maps: BTreeMap<u32, HashSet<u64>>,
    /// The processes holding a ring by descriptor, and the inodes of the rings read so.
    ring_holders: HashSet<u32>,
    rings_read: HashSet<u64>,
    /// Each ring's settled reading, by inode: its other descriptors are not read again.
    ring_reads: HashMap<u64, (String, RingThread)>,
    /// Reads again so far, of [`RING_REREADS`].
    rereads: usize,
}

/// The tasks (threads) of `pid`: a thread may have its own namespace.
fn tasks_of(pid: u32) -> Vec<std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A task that is gone is not an error: it holds nothing any more.
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn scan_error(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn socket_inode(link: &Path) -> io::Result<Option<u64>> {
    let target = fs::read_link(link)?;
    Ok(target
        .to_str()
        .and_then(|t| t.strip_prefix("socket:["))
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse().ok()))
}

/// `system.sockprotoname`: sockfs names every socket's protocol in this attribute.
fn protocol_name(link: &Path) -> io::Result<String> {
    let path =
        std::ffi::CString::new(link.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut buf = [0u8; 64];
    // SAFETY: a valid C string and a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"system.sockprotoname".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let name = buf[..n].split(|b| *b == 0).next().unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// Whether the descriptor behind `fdinfo` is close-on-exec (`flags:` in octal).
fn close_on_exec(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|f| f & libc::O_CLOEXEC as u32 != 0)
}

/// What an io_uring instance's `fdinfo` says of the files registered with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingFiles {
    /// None, or none but files and pseudo-files other than sockets (a pipe, an eventfd).
    NoSocket,
    /// A socket: printed as `socket:[N]`, or by its protocol (`UDP`) on kernels before the
    /// path form, so anything not in the path form counts.
    Socket,
    /// Fewer entries than it says it has, where that does not tell a sparse table (empty slots
    /// are left out) from a busy ring (every entry left out), or no count at all.
    Unread,
}

/// How this kernel prints an io_uring instance's registered files in its `fdinfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingForm {
    /// Every slot, a file by its last name as it is (newlines and all: a name can forge
    /// lines) and an empty slot as `<none>`, the slots only where the ring's lock was free
    /// (Linux before 6.14).
    Names,
    /// The filled slots only, each its path with newlines escaped (Linux 6.14 on).
    /// `quiet_when_busy`: a ring whose lock is busy shows nothing past the generic lines
    /// (6.15, and 6.14.8 on), rather than its count with no slots, which a table of empty
    /// slots shows too.
    Paths { quiet_when_busy: bool },
    /// Neither: no ring with registered files is read as holding no socket.
    Unknown,
}

/// What this kernel does with io_uring, learned once from rings the node makes: how it prints
/// registered files, and whether each ring has an inode of its own (so a mapping names the
/// ring it maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingKernel {
    form: RingForm,
    own_inodes: bool,
}

/// The name of the file the node registers in its own ring: a newline shows whether names are
/// escaped.
const FORM_FILE: &std::ffi::CStr = c"agentwall\nring";

/// The form of `fdinfo`, the text of a ring with [`FORM_FILE`] in slot 0 and slot 1 empty.
fn form_of(fdinfo: &str, release: (u32, u32, u32)) -> RingForm {
    let lines: Vec<&str> = fdinfo.lines().collect();
    let Some(files) = lines.iter().position(|l| *l == "UserFiles:\t2") else {
        return RingForm::Unknown;
    };
    let slots: Vec<&str> = lines[files + 1..]
        .iter()
        .take_while(|l| !l.starts_with("UserBufs:"))
        .copied()
        .collect();
    match slots.as_slice() {
        [one] if one.starts_with("    0: /memfd:agentwall\\012ring") => RingForm::Paths {
            quiet_when_busy: quiet_when_busy(release),
        },
        ["    0: memfd:agentwall", "ring", "    1: <none>"] => RingForm::Names,
        _ => RingForm::Unknown,
    }
}

/// Whether a kernel of `release` prints nothing of a ring whose lock is busy (6.15, and the
/// stable 6.14.8 on; a distribution's own numbering is taken as without).
fn quiet_when_busy(release: (u32, u32, u32)) -> bool {
    release >= (6, 15, 0) || (release.0, release.1) == (6, 14) && release.2 >= 8
}

/// `major.minor.patch` of the running kernel; zeros where it cannot be read.
fn kernel_release() -> (u32, u32, u32) {
    let text = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut n = text
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
    )
}

/// Two rings of the node's own: their inodes, and the `fdinfo` of one with [`FORM_FILE`] and an
/// empty slot registered.
fn learn_ring_kernel() -> io::Result<RingKernel> {
    use std::os::fd::FromRawFd as _;
    let (a, b) = (io_uring::IoUring::new(1)?, io_uring::IoUring::new(1)?);
    let ino = |fd: i32| {
        fs::metadata(format!("/proc/self/fd/{fd}")).map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    let own_inodes = ino(a.as_raw_fd())? != ino(b.as_raw_fd())?;
    // SAFETY: memfd_create with a C string; the result is a new descriptor or -1.
    let memfd = unsafe { libc::memfd_create(FORM_FILE.as_ptr(), libc::MFD_CLOEXEC) };
    if memfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just made, owned here.
    let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
    a.submitter().register_files(&[memfd.as_raw_fd(), -1])?;
    let text = fs::read(format!("/proc/self/fdinfo/{}", a.as_raw_fd()))?;
    Ok(RingKernel {
        form: form_of(&String::from_utf8_lossy(&text), kernel_release()),
        own_inodes,
    })
}

/// [`RingKernel`], learned at the first ring a scan meets. A node that cannot make a ring
/// (io_uring disabled for it, out of descriptors) takes the form its kernel's version prints,
/// and rings as sharing one inode, and tries again at the next scan.
fn ring_kernel() -> RingKernel {
    static KERNEL: std::sync::OnceLock<RingKernel> = std::sync::OnceLock::new();
    if let Some(k) = KERNEL.get() {
        return *k;
    }
    match learn_ring_kernel() {
        Ok(k) => {
            if k.form == RingForm::Unknown {
                tracing::warn!(
                    "this kernel prints an io_uring instance's registered files in a form the node does not know: a unit holding a ring with registered files is refused"
                );
            } else {
                tracing::info!(form = ?k.form, own_inodes = k.own_inodes, "io_uring fdinfo form learned from a ring of the node's own");
            }
            *KERNEL.get_or_init(|| k)
        }
        Err(e) => {
            let release = kernel_release();
            let form = if release >= (6, 14, 0) {
                RingForm::Paths {
                    quiet_when_busy: quiet_when_busy(release),
                }
            } else {
                RingForm::Names
            };
            tracing::warn!(error = %e, form = ?form, "the node could not make an io_uring instance to learn how this kernel prints one: the form is taken from the kernel's version");
            RingKernel {
                form,
                own_inodes: false,
            }
        }
    }
}

/// [`RingFiles`] of a ring's `fdinfo`, printed in `form`. The path form has a count mean every
/// file is printed, empty slots left out; the names form prints every slot, and there only a
/// table of empty slots is known to hold no socket, and only where the lines are exactly what
/// the kernel prints for one.
fn ring_files(fdinfo: &str, form: RingForm) -> RingFiles {
    let lines: Vec<&str> = fdinfo.lines().collect();
    let at = |prefix: &str| -> Vec<usize> {
        (0..lines.len())
            .filter(|&i| lines[i].starts_with(prefix))
            .collect()
    };
    let (files, bufs) = (at("UserFiles:"), at("UserBufs:"));
    // No count at all: the ring was busy (Linux 6.15 and later print nothing then).
    if files.is_empty() {
        return RingFiles::Unread;
    }
    // More than one of either, or out of order: a file's name made to look like them.
    let (&[files], &[bufs]) = (files.as_slice(), bufs.as_slice()) else {
        return RingFiles::Socket;
    };
    let count = lines[files]
        .strip_prefix("UserFiles:")
        .and_then(|n| n.trim().parse::<usize>().ok());
    let (Some(count), true) = (count, files < bufs) else {
        return RingFiles::Socket;
    };
    let entries = &lines[files + 1..bufs];
    let paths = match form {
        RingForm::Paths { quiet_when_busy } => {
            // A busy ring shows its count and no slots where it is not quiet.
            if !quiet_when_busy && entries.is_empty() && count > 0 {
                return RingFiles::Unread;
            }
            true
        }
        RingForm::Names if entries.is_empty() && count > 0 => return RingFiles::Unread,
        RingForm::Names => false,
        RingForm::Unknown if count > 0 => return RingFiles::Unread,
        RingForm::Unknown => false,
    };
    let mut next = 0;
    for line in entries {
        // `%5u: ` and the slot, in order: every slot in the names form, the filled ones in
        // the path form.
        let Some((slot, name)) = line.split_once(": ") else {
            return RingFiles::Socket;
        };
        let Ok(i) = slot.trim_start().parse::<usize>() else {
            return RingFiles::Socket;
        };
        let in_order = if paths { i >= next } else { i == next };
        if slot != format!("{i:5}") || !in_order || i >= count {
            return RingFiles::Socket;
        }
        next = i + 1;
        let no_socket = if paths {
            // A socket is `socket:[N]`; a file a path, an anonymous inode, a pipe.
            name.starts_with('/')
                || name.starts_with("anon_inode:")
                || name
                    .split_once(":[")
                    .is_some_and(|(kind, _)| kind != "socket" && !kind.is_empty())
        } else {
            // A socket is its protocol's name (`UDP`), a file its last name: any name may
            // be a socket.
            name == "<none>"
        };
        if !no_socket {
            return RingFiles::Socket;
        }
    }
    if !paths && entries.len() != count {
        return RingFiles::Unread;
    }
    RingFiles::NoSocket
}

/// How many times the scan reads a ring's `fdinfo` while it names no SQPOLL thread, and how
/// long it waits between reads (another reader of the same `fdinfo` holds the ring's lock for
/// as long as its read takes).
const RING_READS: usize = 8;
const RING_READ_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);
/// The reads again one scan makes in all (about 4 s of pauses): a unit holding many rings
/// (or one ring behind many descriptors, each ring read once) cannot stretch an enroll, which
/// holds up every other, for hours. Past it, a ring whose first read settles nothing refuses.
const RING_REREADS: usize = 2048;

/// What an io_uring instance's `fdinfo` says of its SQPOLL thread. The kernel reads the
/// thread only when it takes the ring's lock at once: since Linux 6.15 a ring whose lock it
/// did not take shows nothing past the generic lines ([`RingThread::Busy`]); before, it
/// shows `SqThread: -1`, as for a ring without a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingThread {
    Busy,
    None,
    Task(u32),
}

fn sq_thread(fdinfo: &str) -> RingThread {
    match fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("SqThread:"))
        .map(|t| {
            t.trim()
                .parse::<i64>()
                .ok()
                .and_then(|t| u32::try_from(t).ok())
        }) {
        None => RingThread::Busy,
        Some(Some(t)) if t > 0 => RingThread::Task(t),
        Some(_) => RingThread::None,
    }
}

const CAP_SYS_PTRACE: u32 = 19;

/// Whether this process may read every task of a unit (`enroll` refuses otherwise): without
/// `CAP_SYS_PTRACE` the kernel keeps another user's descriptors and address space from it;
/// in a PID namespace of its own, the numbers `cgroup.threads` gives it are not the host's
/// that the task census writes (and tasks of the host's namespace are listed as 0).
pub fn can_read_every_task() -> io::Result<()> {
    let status = Path::new("/proc/thread-self/status");
    let text = fs::read_to_string(status).map_err(|e| scan_error(status, e))?;
    if !has_effective_capability(&text, CAP_SYS_PTRACE) {
        return Err(io::Error::other(
            "the node lacks CAP_SYS_PTRACE, without which the kernel keeps another user's descriptors from it (a unit's sockets cannot be read): give the node CAP_SYS_PTRACE",
        ));
    }
    match crate::datapath::sys::sees_every_task() {
        Ok(true) => Ok(()),
        Ok(false) => Err(io::Error::other(
            "the node runs in a PID namespace other than the host's, or /proc is another namespace's: a unit's tasks outside that namespace are out of its sight, and their numbers are not those the kernel's task census gives; run the node in the host's PID namespace",
        )),
        Err(e) => Err(io::Error::other(format!(
            "cannot tell whether the node sees every task on the host (its PID namespace): {e}"
        ))),
    }
}

/// Whether a `/proc/*/status` text's effective set (`CapEff`, hex) holds capability `cap`;
/// false when it says nothing readable.
fn has_effective_capability(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1 << cap) != 0)
}

/// Whether the task at `/proc/PID/task/TID` has exited (a zombie, or dead): its descriptor
/// table and memory are released, so it holds nothing. A task whose state cannot be read has
/// not, as far as the caller may assume.
fn exited(task: &Path) -> bool {
    fs::read_to_string(task.join("stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))
    })
}

/// `kcmp` kinds: the address space, the descriptor table.
const KCMP_VM: i32 = 1;
const KCMP_FILES: i32 = 2;

/// Whether task `tid` shares `pid`'s object of `kind` (kcmp); false when unknown (a zombie
/// leader has neither), so it is read anyway.
fn shares(pid: u32, tid: u32, kind: i32) -> bool {
    // SAFETY: kcmp only compares kernel objects of two tasks.
    unsafe { libc::syscall(libc::SYS_kcmp, pid, tid, kind, 0, 0) == 0 }
}

impl Scan {
    /// A ring's `fdinfo` (through `info`), read again while it names no thread (the lock busy:
    /// nothing past the generic lines since 6.15, `SqThread: -1` before, where a free lock
    /// shows the same); the first read that names one settles it, a busy read never replaces
    /// a settled one, and where a busy ring shows nothing `SqThread: -1` settles it too. True
    /// third: the scan's reads again ran out before it settled.
    fn read_ring(
        &mut self,
        info: &dyn Fn() -> io::Result<String>,
    ) -> io::Result<(String, RingThread, bool)> {
        let told_when_busy = matches!(
            ring_kernel().form,
            RingForm::Paths {
                quiet_when_busy: true
            }
        );
        let mut text = info()?;
        let mut thread = sq_thread(&text);
        for _ in 1..RING_READS {
            if matches!(thread, RingThread::Task(_)) || told_when_busy && thread == RingThread::None
            {
                return Ok((text, thread, false));
            }
            if self.rereads >= RING_REREADS {
                return Ok((text, thread, true));
            }
            self.rereads += 1;
            std::thread::sleep(RING_READ_PAUSE);
            let again = info()?;
            let now = sq_thread(&again);
            if now != RingThread::Busy || thread == RingThread::Busy {
                (text, thread) = (again, now);
            }
        }
        Ok((text, thread, false))
    }

    /// Counts `n` more reads against [`SCAN_BUDGET`].
    fn spend(&mut self, n: usize) -> io::Result<()> {
        self.read += n;
        if self.read > SCAN_BUDGET {
            return Err(io::Error::other(format!(
                "more than {SCAN_BUDGET} descriptors to read"
            )));
        }
        Ok(())
    }

    /// Every socket the process `pid` holds: through each descriptor table of its tasks,
    /// mapped into its memory, or registered with an io_uring instance it holds.
    fn process(
        &mut self,
        pid: u32,
        which: Descriptors,
        unit_tasks: Option<&HashSet<u32>>,
    ) -> io::Result<()> {
        let tasks = format!("/proc/{pid}/task");
        let tasks: Vec<(u32, std::path::PathBuf)> = match fs::read_dir(&tasks) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
                .collect(),
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(scan_error(Path::new(&tasks), e)),
        };
        // A thread outside the unit is not frozen with it, and shares what it holds. An exited
        // one holds nothing, and leaves the cgroup's listing (a leader that called
        // pthread_exit stays a zombie until its last thread exits).
        if let Some(unit) = unit_tasks {
            if let Some((tid, _)) = tasks
                .iter()
                .find(|(tid, task)| !unit.contains(tid) && !exited(task))
            {
                return Err(io::Error::other(format!(
                    "pid {pid} has a thread ({tid}) outside the cgroup, which is not frozen with it"
                )));
            }
        }
        let mut seen = HashSet::new();
        let mut mapped = false;
        for (tid, task) in tasks {
            note_namespace(&task.join("ns/net"), &mut self.namespaces);
            // Each address space once (a leader that exited shows an empty map; its live
            // threads do not).
            if tid == pid || !shares(pid, tid, KCMP_VM) {
                let maps = task.join("maps");
                match fs::read_to_string(&maps) {
                    Ok(text) => {
                        for l in text.lines() {
                            mapped |= l.ends_with(']') && l.contains(" socket:[");
                            if l.ends_with("anon_inode:[io_uring]") {
                                // `address perms offset dev inode path`; an unread inode
                                // (0) is no ring's.
                                let ino = l
                                    .split_whitespace()
                                    .nth(4)
                                    .and_then(|i| i.parse().ok())
                                    .unwrap_or(0);
                                self.ring_maps.entry(pid).or_default().insert(ino);
                            }
                        }
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(scan_error(&maps, e)),
                }
            }
            if tid != pid && shares(pid, tid, KCMP_FILES) {
                continue;
            }
            let fd_dir = task.join("fd");
            let fds = match fs::read_dir(&fd_dir) {
                Ok(rd) => rd,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(scan_error(&fd_dir, e)),
            };
            for e in fds {
                let e = e.map_err(|e| scan_error(&fd_dir, e))?;
                self.spend(1)?;
                let link = e.path();
                let fd: u32 = e
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                let info_path = task.join("fdinfo").join(e.file_name());
                let target = match fs::read_link(&link) {
                    Ok(t) => t,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(scan_error(&link, e)),
                };
                let target = target.to_string_lossy();
                // Lossy: a name that is not UTF-8 is read as no socket's line would be.
                let info = || match fs::read(&info_path) {
                    Ok(t) => Ok(String::from_utf8_lossy(&t).into_owned()),
                    Err(e) if gone(&e) => Ok(String::new()),
                    Err(e) => Err(scan_error(&info_path, e)),
                };
                if target == "anon_inode:[io_uring]" {
                    let ino = match fs::metadata(&link) {
                        Ok(m) => std::os::unix::fs::MetadataExt::ino(&m),
                        Err(e) if gone(&e) => continue,
                        Err(e) => return Err(scan_error(&link, e)),
                    };
                    self.ring_holders.insert(pid);
                    let (text, thread, unsettled) = match self.ring_reads.get(&ino) {
                        // Another descriptor of a ring read already; what a launcher keeps
                        // is told by this descriptor's own flags.
                        Some((text, thread)) if which == Descriptors::All => {
                            (text.clone(), *thread, false)
                        }
                        Some((_, thread)) => (info()?, *thread, false),
                        None => {
                            let (text, thread, unsettled) = self.read_ring(&info)?;
                            if !text.is_empty() && !unsettled {
                                self.ring_reads.insert(ino, (text.clone(), thread));
                            }
                            (text, thread, unsettled)
                        }
                    };
                    // Empty: the process exited meanwhile.
                    if !text.is_empty() {
                        self.rings_read.insert(ino);
                    }
                    let why = if text.is_empty() {
                        None
                    } else if unsettled {
                        Some(Unjudgeable::UnsettledRing)
                    } else if thread == RingThread::Busy {
                        Some(Unjudgeable::BusyRing)
                    } else if let files @ (RingFiles::Socket | RingFiles::Unread) =
                        ring_files(&text, ring_kernel().form)
                    {
                        Some(if files == RingFiles::Socket {
                            Unjudgeable::Registered
                        } else {
                            Unjudgeable::UnreadRing
                        })
                    } else if which == Descriptors::KeptAcrossExec && !close_on_exec(&text) {
                        Some(Unjudgeable::InheritedRing)
                    } else {
                        match (unit_tasks, thread) {
                            (Some(unit), RingThread::Task(t)) if !unit.contains(&t) => {
                                Some(Unjudgeable::ForeignRingThread)
                            }
                            _ => None,
                        }
                    };
                    if let Some(why) = why {
                        self.elsewhere.push((pid, Some(fd), why));
                    }
                    continue;
                }
                let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    continue;
                };
                if which == Descriptors::KeptAcrossExec && close_on_exec(&info()?) {
                    continue;
                }
                if !seen.insert(inode) {
                    continue;
                }
                let kind = match protocol_name(&link) {
                    Ok(k) => k,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(scan_error(&link, e)),
                };
                self.held.push(Held {
                    pid,
                    fd,
                    link,
                    inode,
                    kind,
                });
            }
        }
        if mapped {
            self.elsewhere.push((pid, None, Unjudgeable::Mapped));
        }
        Ok(())
    }

    /// The processes that hold a ring by descriptor or map one, in order, each once.
    fn holders(&self) -> Vec<u32> {
        let mut holders: Vec<u32> = self
            .ring_holders
            .iter()
            .chain(self.ring_maps.keys())
            .copied()
            .collect();
        holders.sort_unstable();
        holders.dedup();
        holders
    }

    /// The processes mapping an io_uring instance whose `fdinfo` no descriptor of the scan
    /// showed: a mapping's inode must be a ring read, and where rings may share one inode
    /// (as some kernels make them, or where the node could not tell), the process must hold
    /// a ring by descriptor itself too.
    fn hidden_rings(&self) -> Vec<u32> {
        let own_inodes = !self.ring_maps.is_empty() && ring_kernel().own_inodes;
        self.ring_maps
            .iter()
            .filter(|(pid, inodes)| {
                !inodes.is_subset(&self.rings_read)
                    || !own_inodes && !self.ring_holders.contains(pid)
            })
            .map(|(pid, _)| *pid)
            .collect()
    }
}

fn note_namespace(path: &Path, namespaces: &mut BTreeMap<u64, OwnedFd>) {
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    if let std::collections::btree_map::Entry::Vacant(v) = namespaces.entry(ino) {
        if let Ok(f) = fs::File::open(path) {
            v.insert(OwnedFd::from(f));
        }
    }
}

/// Runs `work` once in each of `namespaces` (this thread's own in place, the others on a
/// thread that entered them) and gathers the answers.
fn in_each<T: Send + 'static>(
    namespaces: BTreeMap<u64, OwnedFd>,
    work: impl Fn() -> io::Result<T> + Send + Clone + 'static,
) -> io::Result<Vec<T>> {
    let own = fs::metadata("/proc/self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    let mut out = vec![work()?];
    for (ino, fd) in namespaces {
        if Some(ino) == own {
            continue;
        }
        let work = work.clone();
        let t = std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: setns on this thread only; the thread ends right after.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            work()
        })
        .join()
        .map_err(|_| io::Error::other("socket diagnostics thread panicked"))??;
        out.push(t);
    }
    Ok(out)
}

/// The sockets the processes `pids` hold that the packet line would not govern as sockets of
/// a cgroup in `own` (cgroup ids): TCP and UDP sockets made in another cgroup or not listed
/// anywhere, sockets of any kind but TCP, UDP, unix and netlink (of the descriptors `which`
/// names), and sockets held without a descriptor (mapped, registered with io_uring). A
/// descriptor that cannot be read is an error, never a pass. `enroll` and `launch` refuse
/// while any is held: a socket keeps the cgroup it was made in, and the packet line knows a
/// socket's binding only by that cgroup (or by a governed task's own use of it). The
/// processes must not run meanwhile (a frozen cgroup), or what is read can change under the
/// scan. Also the io_uring instances it read (see [`RingsRead`]).
pub fn unjudged(
    pids: &[u32],
    own: &HashSet<u64>,
    which: Descriptors,
    unit_tasks: Option<&HashSet<u32>>,
) -> io::Result<(Vec<Unjudged>, RingsRead)> {
    if unit_tasks.is_some() {
        can_read_every_task()?;
    }
    let mut scan = Scan::default();
    for &pid in pids {
        scan.process(pid, which, unit_tasks)?;
    }
    for pid in scan.hidden_rings() {
        scan.elsewhere.push((pid, None, Unjudgeable::HiddenRing));
    }
    let holders = scan.holders();
    let mut found: Vec<Unjudged> = scan
        .elsewhere
        .into_iter()
        .map(|(pid, fd, why)| Unjudged {
            pid,
            comm: comm(pid),
            fd,
            kind: match why {
                Unjudgeable::Registered
                | Unjudgeable::UnreadRing
                | Unjudgeable::HiddenRing
                | Unjudgeable::UnheldRing
                | Unjudgeable::InheritedRing
                | Unjudgeable::ForeignRingThread
                | Unjudgeable::BusyRing => "io_uring".to_owned(),
                _ => "mapped".to_owned(),
            },
            why,
        })
        .collect();
    let mut inet = Vec::new();
    for h in scan.held {
        if LOCAL_KINDS.contains(&h.kind.as_str()) {
            continue;
        }
        if JUDGED_KINDS.contains(&h.kind.as_str()) {
            inet.push(h);
            continue;
        }
        found.push(Unjudged {
            pid: h.pid,
            comm: comm(h.pid),
            fd: Some(h.fd),
            kind: h.kind,
            why: Unjudgeable::Kind,
        });
    }
    if !inet.is_empty() {
        let listed: std::collections::HashMap<u64, Listed> = in_each(scan.namespaces, || {
            dump_here(
                &diag_socket()?,
                &[IPPROTO_TCP, IPPROTO_UDP],
                StateFlags::all(),
            )
        })?
        .into_iter()
        .flatten()
        .map(|l| (u64::from(l.inode), l))
        .collect();
        for h in inet {
            let why = match listed.get(&h.inode) {
                Some(l) if l.cgroup.is_some_and(|c| own.contains(&c)) => continue,
                Some(l) => {
                    let peer = std::net::SocketAddr::new(
                        l.socket_id.destination_address,
                        l.socket_id.destination_port,
                    );
                    Unjudgeable::OtherCgroup {
                        cgroup: l.cgroup.unwrap_or(0),
                        local: std::net::SocketAddr::new(
                            l.socket_id.source_address,
                            l.socket_id.source_port,
                        ),
                        peer: (!peer.ip().is_unspecified() || peer.port() != 0).then_some(peer),
                    }
                }
                // Closed between the listing and the dump (a process killed while frozen):
                // nothing held any more.
                None if !matches!(socket_inode(&h.link), Ok(Some(i)) if i == h.inode) => continue,
                None => Unjudgeable::Unlisted,
            };
            found.push(Unjudged {
                pid: h.pid,
                comm: comm(h.pid),
                fd: Some(h.fd),
                kind: h.kind,
                why,
            });
        }
    }
    Ok((
        found,
        RingsRead {
            inodes: scan.rings_read,
            holders,
        },
    ))
}

/// The processes of `pids` that hold an io_uring instance by descriptor or map one, read
/// while they run (a process gone meanwhile holds nothing).
pub fn ring_holders(pids: &[u32]) -> io::Result<Vec<u32>> {
    let mut scan = Scan::default();
    for &pid in pids {
        scan.process(pid, Descriptors::All, None)?;
    }
    Ok(scan.holders())
}

/// A task's name (`/proc/TID/comm`), for a message; empty once it is gone.
pub fn comm(tid: u32) -> String {
    fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// The io_uring instances whose `fdinfo` a scan read through a descriptor, by inode, and the
/// processes that hold a ring by descriptor or map one.
#[derive(Debug, Default)]
pub struct RingsRead {
    inodes: HashSet<u64>,
    /// In order, each once.
    pub holders: Vec<u32>,
}

impl RingsRead {
    /// The rings of `registered` (`(task, inode)`: the io_uring instances the unit's tasks
    /// registered with themselves, which they use with no descriptor, as the task census read
    /// them) the scan did not read: what each holds cannot be read. Where every ring has one
    /// inode, none can be told from another, and each is unread.
    pub fn unread(&self, registered: &[(u32, u64)]) -> Vec<Unjudged> {
        let own_inodes = !registered.is_empty() && ring_kernel().own_inodes;
        registered
            .iter()
            .filter(|(_, ino)| !own_inodes || *ino == 0 || !self.inodes.contains(ino))
            .map(|&(tid, _)| Unjudged {
                pid: tid,
                comm: comm(tid),
                fd: None,
                kind: "io_uring".to_owned(),
                why: Unjudgeable::UnheldRing,
            })
            .collect()
    }
}

/// How many times each of a frozen unit's tasks has been switched out (`/proc/TID/status`'s
/// voluntary and involuntary context switches), with its start time (so a number is its
/// task's, not a later one's): a task that runs while the unit is frozen
/// switches out again before it counts as frozen, so two equal readings with the unit frozen
/// at the second say none ran in between. Each task must be asleep in the freezer (`S`) or
/// stopped (`T`), from where a wake-up only takes it back to the freezer until the thaw, or
/// in the stop of a tracer inside the unit (`t`: strace, a debugger), which is frozen too: a
/// task woken and not yet run (`R`), or in a vfork parent's wait (`D`), refuses, and so does
/// one traced from outside the unit (`TracerPid`), whose tracer can resume it at will. A
/// tracee resumed by its tracer's exit (killed from outside) runs, and so shows at the next
/// reading; `enroll` takes the last once the binding is in force, so a tracee resumed after
/// it runs governed.
#[derive(Debug, PartialEq, Eq)]
pub struct Stillness(std::collections::BTreeMap<u32, Still>);

/// One task at one reading: when it started (`/proc/TID/stat`'s start time: the number is
/// its task's, not a later one's) and how many times it has switched out.
#[derive(Debug, PartialEq, Eq)]
struct Still {
    start: u64,
    switches: u64,
}

/// How long the first reading waits for a task woken in the freezer to run back into it.
const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a frozen unit's tasks are not known to have stayed still.
#[derive(Debug, thiserror::Error)]
pub enum Stir {
    #[error("task {0} of the unit exited (or was killed) while the unit was frozen")]
    Exited(u32),
    #[error(
        "task {0} of the unit left it while it was frozen (it exited, was killed or was moved out, its number now another task's or none): what it did was not read; enroll again"
    )]
    Left(u32),
    #[error(
        "task {tid} of the unit is traced by task {tracer}, outside it: a task its tracer stopped at a system call's entry counts as frozen, and the tracer can have it make that call at any time (detach the tracer and enroll again)"
    )]
    TracedFromOutside { tid: u32, tracer: u64 },
    #[error(
        "task {0} of the unit is in a tracer's stop with no tracer (one detached while the unit was frozen): it runs when it is let go; enroll again"
    )]
    Untraced(u32),
    #[error(
        "task {tid} of the unit is {state:?} while the unit is frozen, not asleep in the freezer, stopped, or in the stop of a tracer inside the unit: a task woken and not yet run, or in a vfork parent's wait, can still make a system call (enroll again)"
    )]
    Awake { tid: u32, state: String },
    #[error(
        "task {0} ran while the unit was frozen for the scan (woken by a signal, or resumed by a tracer): what it did was not read; enroll again"
    )]
    Ran(u32),
    #[error(
        "task {0} is in the unit's cgroups and was not when the unit's descriptors were read (moved in while it was frozen, or made by a task that ran): what it holds was not read; enroll again"
    )]
    Joined(u32),
    #[error(
        "the unit was thawed while it was frozen for the scan (its cgroup.freeze written by root: a container runtime's unpause, systemctl thaw): what its tasks did was not read; enroll again"
    )]
    Thawed,
    #[error(
        "the identity's policy came to refuse io_uring while the unit was frozen for the scan, and its tasks used io_uring: enroll again (refused, or restart them without it)"
    )]
    IoUringRefused,
    #[error("{0}")]
    Read(#[source] io::Error),
    #[error("{0}")]
    Events(#[source] crate::cgroup::CgroupError),
}

impl Stillness {
    fn read(unit: &HashSet<u32>) -> Result<Self, Stir> {
        let mut out = std::collections::BTreeMap::new();
        for &tid in unit {
            // A file of the task's, gone with it.
            let of_task = |path: &str| {
                fs::read_to_string(path).map_err(|e| {
                    if gone(&e) {
                        Stir::Exited(tid)
                    } else {
                        Stir::Read(scan_error(Path::new(path), e))
                    }
                })
            };
            let path = format!("/proc/{tid}/status");
            let text = of_task(&path)?;
            let field = |name: &str| -> Result<u64, Stir> {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| Stir::Read(io::Error::other(format!("{path}: no {name} line"))))
            };
            let tracer = field("TracerPid:")?;
            if tracer != 0 && !u32::try_from(tracer).is_ok_and(|t| unit.contains(&t)) {
                return Err(Stir::TracedFromOutside { tid, tracer });
            }
            let state = text
                .lines()
                .find_map(|l| l.strip_prefix("State:"))
                .map(str::trim)
                .unwrap_or_default();
            if state.starts_with(['Z', 'X']) {
                return Err(Stir::Exited(tid));
            }
            if state.starts_with('t') && tracer == 0 {
                return Err(Stir::Untraced(tid));
            }
            if !matches!(state.chars().next(), Some('S' | 'T' | 't')) {
                return Err(Stir::Awake {
                    tid,
                    state: state.to_owned(),
                });
            }
            let stat_path = format!("/proc/{tid}/stat");
            let start = of_task(&stat_path)?
                .rsplit_once(") ")
                // The fields after the name, from the third (the state): the start time is
                // the 22nd.
                .and_then(|(_, rest)| rest.split(' ').nth(19)?.parse().ok())
                .ok_or_else(|| {
                    Stir::Read(io::Error::other(format!("{stat_path}: no start time")))
                })?;
            out.insert(
                tid,
                Still {
                    start,
                    switches: field("voluntary_ctxt_switches:")?
                        + field("nonvoluntary_ctxt_switches:")?,
                },
            );
        }
        Ok(Self(out))
    }

    /// The first reading, once no task is `R`. A task thawed (by the last enroll's thaw, say)
    /// and frozen again before it ran still counts as frozen, and is `R` until it has run back
    /// into the freezer: from a frozen cgroup it returns to no user code. Until then it cannot
    /// be a reading's baseline; what it does meanwhile is there before the scan.
    pub fn settled(unit: &HashSet<u32>) -> Result<Self, Stir> {
        let until = std::time::Instant::now() + SETTLE_WITHIN;
        loop {
            match Self::read(unit) {
                Err(Stir::Awake { state, .. })
                    if state.starts_with('R') && std::time::Instant::now() < until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                done => return done,
            }
        }
    }

    /// Still since `self`: the unit at `cgroup` frozen now, listing the tasks `self` read and
    /// no other, each the same task (started when it did) and none switched out since (each
    /// read again, in `S`, `T` or its tracer's `t`). A number a task of the unit left, taken
    /// by a task outside, is not in the listing; moved in (by root), it started later.
    pub fn held(&self, cgroup: &crate::cgroup::Cgroup) -> Result<(), Stir> {
        if !cgroup.is_frozen().map_err(Stir::Events)? {
            return Err(Stir::Thawed);
        }
        let (_, listed) = processes_in(cgroup.path()).map_err(Stir::Read)?;
        if let Some(&tid) = listed.iter().find(|t| !self.0.contains_key(t)) {
            return Err(Stir::Joined(tid));
        }
        if let Some(&tid) = self.0.keys().find(|t| !listed.contains(t)) {
            return Err(Stir::Left(tid));
        }
        let unit: HashSet<u32> = self.0.keys().copied().collect();
        let now = Self::read(&unit)?;
        for (&tid, then) in &self.0 {
            match now.0.get(&tid) {
                Some(n) if n.start != then.start => return Err(Stir::Left(tid)),
                Some(n) if n.switches == then.switches => {}
                _ => return Err(Stir::Ran(tid)),
            }
        }
        Ok(())
    }
}

/// Calls `f` with each socket in the descriptor tables of the tasks in `cgroup` or below it,
/// each once, as a descriptor of the node's (`pidfd_getfd`, one at a time, closed after the
/// call). How many sockets it saw and could not take (a task or descriptor gone meanwhile is
/// not counted).
pub fn each_held_socket(cgroup: &Path, mut f: impl FnMut(&OwnedFd)) -> io::Result<usize> {
    use std::os::{fd::FromRawFd as _, unix::fs::MetadataExt as _};
    let (_, tids) = processes_in(cgroup)?;
    let mut seen = HashSet::new();
    let mut missed = 0;
    for tid in tids {
        let Ok(fds) = fs::read_dir(format!("/proc/{tid}/fd")) else {
            continue;
        };
        let mut pidfd: Option<io::Result<OwnedFd>> = None;
        for e in fds.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let socket = fs::read_link(e.path()).ok().and_then(|t| {
                t.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            });
            let Some(inode) = socket.filter(|i| seen.insert(*i)) else {
                continue;
            };
            // The task's own table: a thread's pidfd (Linux 6.9), else its process's, which a
            // thread that unshared its table does not share (the inode check says so).
            let pidfd = pidfd.get_or_insert_with(|| {
                [libc::O_EXCL, 0]
                    .into_iter()
                    .find_map(|flags| {
                        // SAFETY: plain system call; the result is a new descriptor or -1.
                        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, flags) };
                        // SAFETY: the kernel handed us a new descriptor.
                        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
                    })
                    .ok_or_else(io::Error::last_os_error)
            });
            let Ok(pidfd) = pidfd else {
                missed += 1;
                continue;
            };
            // SAFETY: plain system call on a pidfd we own; the result is a new descriptor.
            let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            if got < 0 {
                // Exited, or the descriptor closed: nothing left to let go.
                let e = io::Error::last_os_error().raw_os_error();
                missed += usize::from(!matches!(e, Some(libc::ESRCH | libc::EBADF)));
                continue;
            }
            // SAFETY: as above.
            let got = unsafe { OwnedFd::from_raw_fd(got as i32) };
            match fs::metadata(format!("/proc/self/fd/{}", got.as_raw_fd())) {
                Ok(m) if m.ino() == inode => f(&got),
                _ => missed += 1,
            }
        }
    }
    Ok(missed)
}

/// Every process with a thread in `cgroup` or below it, and every such thread, read from
/// `cgroup.threads` (which a threaded cgroup has and `cgroup.procs` refuses): a cgroup that
/// cannot be read is an error, never an empty unit.
pub fn processes_in(cgroup: &Path) -> io::Result<(Vec<u32>, HashSet<u32>)> {
    fn walk(cg: &Path, tids: &mut HashSet<u32>) -> io::Result<()> {
        let threads = cg.join("cgroup.threads");
        let text = fs::read_to_string(&threads).map_err(|e| scan_error(&threads, e))?;
        tids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        for e in fs::read_dir(cg).map_err(|e| scan_error(cg, e))? {
            let e = e.map_err(|e| scan_error(cg, e))?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), tids)?;
            }
        }
        Ok(())
    }
    let mut tids = HashSet::new();
    walk(cgroup, &mut tids)?;
    let mut pids = std::collections::BTreeSet::new();
    for &tid in &tids {
        let status = format!("/proc/{tid}/status");
        match fs::read_to_string(&status) {
            Ok(t) => {
                if let Some(tgid) = t
                    .lines()
                    .find_map(|l| l.strip_prefix("Tgid:"))
                    .and_then(|v| v.trim().parse().ok())
                {
                    pids.insert(tgid);
                }
            }
            Err(e) if gone(&e) => {}
            Err(e) => return Err(scan_error(Path::new(&status), e)),
        }
    }
    Ok((pids.into_iter().collect(), tids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_uring_with_a_registered_socket_is_told_from_one_without() {
        use RingFiles::{NoSocket, Socket, Unread};
        const PATHS: RingForm = RingForm::Paths {
            quiet_when_busy: true,
        };
        // Linux 6.15 and later: paths, escaped; the filled slots only, under the ring's lock.
        let with = "pos:\t0\nflags:\t02000002\nUserFiles:\t2\n    0: anon_inode:[eventfd]\n    1: socket:[33337831]\nUserBufs:\t0\n";
        assert_eq!(ring_files(with, PATHS), Socket);
        let files = "UserFiles:\t3\n    0: /tmp/x\n    1: pipe:[4242]\n    2: /memfd:x (deleted)\nUserBufs:\t0\n    0: socket:[1]\n";
        assert_eq!(ring_files(files, PATHS), NoSocket);
        let sparse = "UserFiles:\t4\n    2: /tmp/x\nUserBufs:\t0\n";
        assert_eq!(ring_files(sparse, PATHS), NoSocket);
        assert_eq!(ring_files("UserFiles:\t0\nUserBufs:\t0\n", PATHS), NoSocket);
        // No count: busy (6.15 prints nothing of a ring whose lock it did not take).
        assert_eq!(ring_files("pos:\t0\nflags:\t02\n", PATHS), Unread);
        // Before 6.15: every slot, a file by its last name, an empty slot `<none>`.
        let empty = "UserFiles:\t2\n    0: <none>\n    1: <none>\nUserBufs:\t0\n";
        assert_eq!(ring_files(empty, RingForm::Names), NoSocket);
        assert_eq!(ring_files(empty, PATHS), Socket);
        let older = "UserFiles:\t2\n    0: <none>\n    1: UDP\nUserBufs:\t0\n";
        assert_eq!(ring_files(older, RingForm::Names), Socket);
        let pipe = "UserFiles:\t1\n    0: \nUserBufs:\t0\n";
        assert_eq!(ring_files(pipe, RingForm::Names), Socket);
        // Busy before 6.15: the count, no entries; a sparse table there shows `<none>`.
        assert_eq!(
            ring_files("UserFiles:\t2\nUserBufs:\t0\n", RingForm::Names),
            Unread
        );
        assert_eq!(ring_files(sparse, RingForm::Names), Socket);
        // Names that forge lines (a socket in slot 1 after them): caught by the slots' form
        // and order, and by a second `UserBufs:`.
        for forged in [
            "UserFiles:\t2\n    0: <none>\n1: <none>\nUserBufs:\n    1: UDP\nUserBufs:\t0\n",
            "UserFiles:\t2\n    0: <none>\n    1: <none>\nUserBufs:\n    1: UDP\nUserBufs:\t0\n",
            "UserFiles:\t2\n    0: a:[\n: a:[\nUserBufs:\n    1: UDP\nUserBufs:\t0\n",
            "UserFiles:\t2\n    0: <none>\n    1: <none>\n    1: UDP\nUserBufs:\t0\n",
            "UserFiles:\t1\n    0: x\nUserFiles:\t0\nUserBufs:\t0\n",
        ] {
            assert_eq!(ring_files(forged, RingForm::Names), Socket, "{forged}");
            assert_eq!(ring_files(forged, PATHS), Socket, "{forged}");
        }
        // 6.14 before 6.14.8: paths, but a busy ring shows its count and no slots, as a table
        // of empty slots does.
        let loud = RingForm::Paths {
            quiet_when_busy: false,
        };
        assert_eq!(ring_files("UserFiles:\t2\nUserBufs:\t0\n", loud), Unread);
        assert_eq!(ring_files(sparse, loud), NoSocket);
        assert_eq!(ring_files(files, loud), NoSocket);
        // A form the node does not know: no table with a slot passes.
        assert_eq!(ring_files(files, RingForm::Unknown), Unread);
        assert_eq!(ring_files(empty, RingForm::Unknown), Unread);
        assert_eq!(
            ring_files("UserFiles:\t0\nUserBufs:\t0\n", RingForm::Unknown),
            NoSocket
        );
        assert!(close_on_exec(with));
        assert!(!close_on_exec("pos:\t0\nflags:\t02\n"));
    }

    #[test]
    fn the_form_of_a_rings_files_is_learned_from_a_ring_of_the_nodes_own() {
        let paths = "pos:\t0\nUserFiles:\t2\n    0: /memfd:agentwall\\012ring (deleted)\nUserBufs:\t0\nPollList:\n";
        assert_eq!(
            form_of(paths, (6, 18, 0)),
            RingForm::Paths {
                quiet_when_busy: true
            }
        );
        for release in [(6, 14, 0), (6, 14, 7), (6, 12, 40)] {
            assert_eq!(
                form_of(paths, release),
                RingForm::Paths {
                    quiet_when_busy: false
                },
                "{release:?}"
            );
        }
        assert_eq!(
            form_of(paths, (6, 14, 8)),
            RingForm::Paths {
                quiet_when_busy: true
            }
        );
        let names = "UserFiles:\t2\n    0: memfd:agentwall\nring\n    1: <none>\nUserBufs:\t0\n";
        assert_eq!(form_of(names, (6, 1, 0)), RingForm::Names);
        for other in [
            // Newlines not escaped in a path, an empty slot printed in the path form, no
            // count, a busy ring.
            "UserFiles:\t2\n    0: /memfd:agentwall\nring (deleted)\nUserBufs:\t0\n",
            "UserFiles:\t2\n    0: /memfd:agentwall\\012ring (deleted)\n    1: <none>\nUserBufs:\t0\n",
            "UserFiles:\t2\nUserBufs:\t0\n",
            "pos:\t0\n",
        ] {
            assert_eq!(form_of(other, (6, 18, 0)), RingForm::Unknown, "{other}");
        }
        // This host: the node makes its rings, and each has an inode of its own.
        let host = learn_ring_kernel().expect("a ring of the test's own");
        assert_ne!(host.form, RingForm::Unknown);
        assert!(host.own_inodes);
    }

    #[test]
    fn the_tests_run_where_every_task_on_the_host_is_seen() {
        // Root in the host's PID namespace, as the node runs: a refusal here would refuse
        // every enroll.
        can_read_every_task().expect("the node's view of the host's tasks");
    }

    #[test]
    fn the_effective_set_is_read_from_a_status_text() {
        let root = "Name:\tagentwall\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert!(has_effective_capability(root, CAP_SYS_PTRACE));
        // CAP_SYS_PTRACE (bit 19) dropped: 0x80000 cleared.
        let without = "CapPrm:\t000001fffff7ffff\nCapEff:\t000001fffff7ffff\n";
        assert!(!has_effective_capability(without, CAP_SYS_PTRACE));
        assert!(has_effective_capability(without, 18));
        assert!(!has_effective_capability("CapEff:\tzz\n", CAP_SYS_PTRACE));
        assert!(!has_effective_capability("", CAP_SYS_PTRACE));
    }

    #[test]
    fn a_rings_sqpoll_thread_is_read_from_its_fdinfo() {
        assert_eq!(
            sq_thread("SqMask:\t0x3\nSqThread:\t4242\nSqThreadCpu:\t1\n"),
            RingThread::Task(4242)
        );
        // No SQPOLL thread (or, before Linux 6.15, the ring's lock was busy).
        assert_eq!(
            sq_thread("SqThread:\t-1\nSqThreadCpu:\t-1\n"),
            RingThread::None
        );
        // Linux 6.15 and later with the lock busy: the generic lines alone.
        let busy = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\n";
        assert_eq!(sq_thread(busy), RingThread::Busy);
        assert_eq!(
            ring_files(
                busy,
                RingForm::Paths {
                    quiet_when_busy: true
                }
            ),
            RingFiles::Unread
        );
    }

    /// A ring is read again while its reading settles nothing, within the scan's budget of
    /// reads again: past it, unsettled (which refuses) rather than read on for hours.
    #[test]
    fn a_scan_reads_rings_again_within_its_budget() {
        let reads = std::cell::Cell::new(0);
        let busy = || {
            reads.set(reads.get() + 1);
            Ok("pos:\t0\nflags:\t02000002\n".to_owned())
        };
        let mut scan = Scan::default();
        let (_, thread, unsettled) = scan.read_ring(&busy).expect("read");
        assert_eq!(
            (thread, unsettled, reads.get()),
            (RingThread::Busy, false, RING_READS)
        );
        assert_eq!(scan.rereads, RING_READS - 1);
        scan.rereads = RING_REREADS - 2;
        reads.set(0);
        let (_, _, unsettled) = scan.read_ring(&busy).expect("read");
        assert_eq!((unsettled, reads.get()), (true, 3));
        // A thread named settles it at once; so does none, where a busy ring shows nothing.
        let mut scan = Scan::default();
        let named = || Ok("SqThread:\t4242\n".to_owned());
        assert_eq!(
            scan.read_ring(&named).expect("read"),
            (
                "SqThread:\t4242\n".to_owned(),
                RingThread::Task(4242),
                false
            )
        );
        let none = || Ok("SqThread:\t-1\n".to_owned());
        let (_, thread, _) = scan.read_ring(&none).expect("read");
        assert_eq!(thread, RingThread::None);
        let told = matches!(
            ring_kernel().form,
            RingForm::Paths {
                quiet_when_busy: true
            }
        );
        assert_eq!(scan.rereads, if told { 0 } else { RING_READS - 1 });
    }
}
