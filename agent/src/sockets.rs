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

/// Destroys, in the calling thread's network namespace, every non-listening TCP socket whose
/// cgroup is in `cgroups` (of the kinds `sweep` names); returns how many.
fn destroy_here(cgroups: &HashSet<u64>, sweep: Sweep) -> io::Result<usize> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut victims = Vec::new();
    for (family, protocol) in [AF_INET, AF_INET6]
        .into_iter()
        .flat_map(|f| sweep.protocols().iter().map(move |p| (f, *p)))
    {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let req = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: sweep.states(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        });
        send(
            &sock,
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
                        let cg = r.nlas.iter().find_map(|nla| match nla {
                            Nla::Other(o)
                                if o.kind() == INET_DIAG_CGROUP_ID && o.value_len() == 8 =>
                            {
                                let mut v = [0u8; 8];
                                o.emit_value(&mut v);
                                Some(u64::from_ne_bytes(v))
                            }
                            _ => None,
                        });
                        if cg.is_some_and(|id| cgroups.contains(&id)) {
                            victims.push((family, protocol, r.header.socket_id.clone()));
                        }
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
    let mut destroyed = 0;
    for (family, protocol, socket_id) in victims {
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
    // One entry per network namespace (by inode), with a handle to enter it.
    let mut namespaces: BTreeMap<u64, OwnedFd> = BTreeMap::new();
    for pid in pids {
        let path = format!("/proc/{pid}/ns/net");
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        if let std::collections::btree_map::Entry::Vacant(v) = namespaces.entry(ino) {
            if let Ok(f) = fs::File::open(&path) {
                v.insert(OwnedFd::from(f));
            }
        }
    }
    let mut total = destroy_here(&ids, sweep)?;
    let own = fs::metadata("/proc/self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    for (ino, fd) in namespaces {
        if Some(ino) == own {
            continue;
        }
        let ids = ids.clone();
        let n = std::thread::spawn(move || -> io::Result<usize> {
            // SAFETY: setns on this thread only; the thread ends right after.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            destroy_here(&ids, sweep)
        })
        .join()
        .map_err(|_| io::Error::other("socket destroy thread panicked"))??;
        total += n;
    }
    Ok(total)
}
