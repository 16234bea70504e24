//! Destroying an identity's established TCP connections (revocation), or every TCP and UDP
//! socket of its sessions (an upgrade to a new map layout), with SOCK_DESTROY over
//! NETLINK_SOCK_DIAG. A netlink socket only sees its own network namespace, so the work runs
//! once per namespace the identity's processes use, on a thread that has entered it.

use std::{
    collections::{BTreeMap, HashSet},
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
fn destroy_here(cgroups: &HashSet<u64>, sweep: Sweep) -> io::Result<usize> {
    let sock = diag_socket()?;
    let victims: Vec<Listed> = dump_here(&sock, sweep.protocols(), sweep.states())?
        .into_iter()
        .filter(|l| l.cgroup.is_some_and(|id| cgroups.contains(&id)))
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

/// Every process in `cgroup` and below it.
fn pids_in(cgroup: &Path, out: &mut Vec<u32>) {
    if let Ok(t) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(t.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids_in(&e.path(), out);
            }
        }
    }
}

/// Destroys the TCP connections of every socket that belongs to one of `cgroups` (and the
/// cgroups below them), in every network namespace their processes live in. Returns the number
/// destroyed.
pub fn destroy_tcp_in(cgroups: &[&Path]) -> io::Result<usize> {
    destroy_in(cgroups, Sweep::Connections)
}

/// Destroys every TCP socket (listeners included) and every UDP socket of `cgroups` and the
/// cgroups below them, in every network namespace their processes live in: after an upgrade
/// to a new map layout, sockets made before it carry no state the new programs could judge
/// their packets by. Returns the number destroyed.
pub fn destroy_all_in(cgroups: &[&Path]) -> io::Result<usize> {
    destroy_in(cgroups, Sweep::Everything)
}

fn destroy_in(cgroups: &[&Path], sweep: Sweep) -> io::Result<usize> {
    let mut ids = HashSet::new();
    let mut pids = Vec::new();
    for cg in cgroups {
        crate::cgroup::subtree_ids(cg, &mut ids);
        pids_in(cg, &mut pids);
    }
    let mut namespaces = BTreeMap::new();
    for pid in pids {
        for task in tasks_of(pid) {
            note_namespace(&task.join("ns/net"), &mut namespaces);
        }
    }
    let ids = std::sync::Arc::new(ids);
    Ok(in_each(namespaces, move || destroy_here(&ids, sweep))?
        .into_iter()
        .sum())
}

/// A socket a process holds that the packet line could not govern as its cgroup's: made in
/// another cgroup (systemd socket activation hands a unit PID 1's listener; a process moved
/// in keeps what it made before), or of a kind a governed task may not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unjudged {
    pub pid: u32,
    /// The process's name, as it set it (shown escaped).
    pub comm: String,
    pub fd: u32,
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
}

impl std::fmt::Display for Unjudged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({:?}) fd {}: {} socket ",
            self.pid, self.comm, self.fd, self.kind
        )?;
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
            Unjudgeable::Kind => f.write_str("of a kind governed agents may not use"),
        }
    }
}

/// The protocols whose sockets are governed by the cgroup that made them.
const JUDGED_KINDS: [&str; 4] = ["TCP", "TCPv6", "UDP", "UDPv6"];
/// Local sockets: they reach no other host.
const LOCAL_KINDS: [&str; 3] = ["UNIX", "UNIX-STREAM", "NETLINK"];

/// A socket one of `pids`' tasks holds: (pid, fd, inode, protocol name).
struct Held {
    pid: u32,
    fd: u32,
    link: std::path::PathBuf,
    inode: u64,
    kind: String,
}

fn socket_inode(link: &Path) -> Option<u64> {
    let target = fs::read_link(link).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `system.sockprotoname`: sockfs names every socket's protocol in this attribute.
fn protocol_name(link: &Path) -> Option<String> {
    let path = std::ffi::CString::new(link.as_os_str().as_encoded_bytes()).ok()?;
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
    let n = usize::try_from(n).ok()?;
    let name = buf[..n].split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}

/// The tasks (threads) of `pid`: a thread may have its own file table and namespace.
fn tasks_of(pid: u32) -> Vec<std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Which descriptors of a process count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Descriptors {
    /// Every one it holds.
    All,
    /// Those it keeps across exec (not close-on-exec): what a launcher hands the agent.
    KeptAcrossExec,
}

/// Whether the descriptor behind `fdinfo` is close-on-exec (`flags:` in octal).
fn close_on_exec(fdinfo: &Path) -> bool {
    fs::read_to_string(fdinfo).is_ok_and(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|f| f & libc::O_CLOEXEC as u32 != 0)
    })
}

/// Every socket the processes `pids` hold (each once), and a handle on each network
/// namespace their tasks are in.
fn held_by(pids: &[u32], which: Descriptors) -> (Vec<Held>, BTreeMap<u64, OwnedFd>) {
    let mut held = Vec::new();
    let mut seen = HashSet::new();
    let mut namespaces = BTreeMap::new();
    for &pid in pids {
        for task in tasks_of(pid) {
            note_namespace(&task.join("ns/net"), &mut namespaces);
            let Ok(fds) = fs::read_dir(task.join("fd")) else {
                continue;
            };
            for e in fds.flatten() {
                let link = e.path();
                let Some(inode) = socket_inode(&link) else {
                    continue;
                };
                if which == Descriptors::KeptAcrossExec
                    && close_on_exec(&task.join("fdinfo").join(e.file_name()))
                {
                    continue;
                }
                if !seen.insert(inode) {
                    continue;
                }
                let Some(kind) = protocol_name(&link) else {
                    continue;
                };
                let fd = e.file_name().to_str().and_then(|s| s.parse().ok());
                held.push(Held {
                    pid,
                    fd: fd.unwrap_or(u32::MAX),
                    link,
                    inode,
                    kind,
                });
            }
        }
    }
    (held, namespaces)
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
/// anywhere, and sockets of any kind but TCP, UDP, unix and netlink (of the descriptors
/// `which` names). `enroll` and `launch`
/// refuse while any is held: a socket keeps the cgroup it was made in, and the packet line
/// knows a socket's binding only by that cgroup (or by a governed task's own use of it).
pub fn unjudged(pids: &[u32], own: &HashSet<u64>, which: Descriptors) -> io::Result<Vec<Unjudged>> {
    let (held, namespaces) = held_by(pids, which);
    let comm = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default()
    };
    let mut found = Vec::new();
    let mut inet = Vec::new();
    for h in held {
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
            fd: h.fd,
            kind: h.kind,
            why: Unjudgeable::Kind,
        });
    }
    if !inet.is_empty() {
        let listed: std::collections::HashMap<u64, Listed> = in_each(namespaces, || {
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
                // Closed between the listing and the dump: nothing held any more.
                None if socket_inode(&h.link) != Some(h.inode) => {
                    continue;
                }
                None => Unjudgeable::Unlisted,
            };
            found.push(Unjudged {
                pid: h.pid,
                comm: comm(h.pid),
                fd: h.fd,
                kind: h.kind,
                why,
            });
        }
    }
    Ok(found)
}

/// Every process in `cgroup` and below it.
pub fn processes_in(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    pids_in(cgroup, &mut pids);
    pids
}
