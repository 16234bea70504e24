//! Destroying an identity's established TCP connections (revocation), with SOCK_DESTROY over
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
    AF_INET, AF_INET6, IPPROTO_TCP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID`: the socket's cgroup id, a u64 attribute of every dump record.
const INET_DIAG_CGROUP_ID: u16 = 21;

fn states() -> StateFlags {
    // Everything but listeners: revocation ends connections, not a server's accept queue.
    StateFlags::all() - StateFlags::LISTEN
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
/// cgroup is in `cgroups`; returns how many.
fn destroy_here(cgroups: &HashSet<u64>) -> io::Result<usize> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut victims = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let req = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: states(),
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
                            victims.push((family, r.header.socket_id.clone()));
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
    for (family, socket_id) in victims {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let req = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: states(),
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
    let mut ids = HashSet::new();
    let mut pids = Vec::new();
    for cg in cgroups {
        collect_ids(cg, &mut ids);
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
    let mut total = destroy_here(&ids)?;
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
            destroy_here(&ids)
        })
        .join()
        .map_err(|_| io::Error::other("socket destroy thread panicked"))??;
        total += n;
    }
    Ok(total)
}

fn collect_ids(cgroup: &Path, out: &mut HashSet<u64>) {
    if let Ok(m) = fs::metadata(cgroup) {
        out.insert(std::os::unix::fs::MetadataExt::ino(&m));
    }
    if let Ok(entries) = fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_ids(&e.path(), out);
            }
        }
    }
}
