//! A process that tests place inside a cgroup (and optionally a fresh network namespace) and
//! drive over stdin: each command line performs one socket operation and answers one line,
//! `ok` or `err ERRNO`, which is what the kernel verdict looks like from an agent's side.
//!
//! Commands:
//!   connect tcp|udp ADDR PORT      connect() a new socket
//!   sendto udp ADDR PORT           unconnected sendto()
//!   sendmmsg udp ADDR PORT         unconnected sendmmsg() of two datagrams
//!   fastopen ADDR PORT             TCP Fast Open: sendto(MSG_FASTOPEN) on a fresh socket
//!   socket FAMILY TYPE PROTO       socket(); FAMILY inet, inet6, unix, netlink, packet, vsock,
//!                                  xdp, tipc, rds, can, bluetooth, alg, key or llc; TYPE
//!                                  stream|dgram|raw|seqpacket|rdm; PROTO a number
//!   listen tcp ADDR PORT           bind+listen, kept open until exit
//!   connect-loop tcp ADDR PORT N   N connects; answers `eperm=X other=Y`
//!   sweep tcp ADDR LO HI           one connect to each port LO..=HI; answers `eperm=X other=Y`
//!   bench-connect ADDR PORT N      listen on ADDR:PORT, time N TCP connects to it; answers
//!                                  `p50=NS p99=NS`
//!   bench-connect-block ADDR PORT N
//!                                  the same, the listener kept for the next block; answers
//!                                  `samples=NS,NS,..` (each connect, in order)
//!   bench-proxy PADDR PPORT ADDR PORT N
//!                                  N HTTP CONNECTs through the proxy at PADDR:PPORT to a
//!                                  listener at ADDR:PORT; `p50=NS p99=NS`
//!   bench-sendto ADDR PORT N [SIZE]
//!                                  N unconnected sendto()s of SIZE bytes (default 1) to a
//!                                  local sink; `pps=N`
//!   bench-send ADDR PORT N [SIZE]  N send()s on a connected UDP socket to a local sink (the
//!                                  packet line alone); `pps=N`
//!   bench-sendto-out ADDR PORT N [SIZE], bench-send-out ADDR PORT N [SIZE]
//!                                  the same to an address behind one of this namespace's
//!                                  devices (no local sink: the datagrams leave by the device)
//!   send-bulk ADDR PORT MIB        MIB MiB over one TCP connection to ADDR:PORT; `ok` or
//!                                  `err ERRNO`
//!   bench-bulk ADDR PORT MIB       MIB MiB over one TCP connection to a local reader;
//!                                  `mibps=N`
//!   bench-udp ADDR PORT N          time N connect() calls re-connecting one UDP socket (no
//!                                  handshake: the hook's own cost stands out); `p50=NS p99=NS`
//!   hold tcp ADDR PORT             connect and keep the connection open
//!   held                           answers `alive=N closed=M` for the kept connections
//!   hold udp ADDR PORT             connect a UDP socket and keep it (an established flow)
//!   hold mptcp ADDR PORT           a multipath TCP connection, kept with the TCP ones
//!   hold listener ADDR PORT        a TCP listener, kept with the TCP connections
//!   hold bound-udp ADDR PORT       a UDP socket bound to ADDR:PORT with no peer, kept
//!   hold udp-loop PORT             a UDP socket bound to 127.0.0.1:PORT (kept apart) and one
//!                                  connected to it, kept: what it sends arrives
//!   send-held                      one datagram on each kept UDP socket: `ok` or `err ERRNO`
//!   send-held-tcp                  four bytes on each kept TCP connection (not waiting)
//!   fd-inbox NAME                  binds a unix datagram socket at the abstract address NAME
//!   pass-held NAME                 hands every kept TCP and UDP socket to NAME (SCM_RIGHTS) and
//!                                  closes its own descriptors
//!   take-passed                    receives sockets handed to the inbox and keeps them as its
//!                                  own held ones: `ok N`
//!   keep tcp|udp                   an IPv6 (dual-stack) socket, kept with no address
//!   raw-keep                       an IPv4 raw TCP socket, kept (needs CAP_NET_RAW)
//!   raw-send-tcp ADDR PORT         a hand-made TCP segment on the kept raw socket
//!   listen-kept PORT               the kept TCP socket: bind [::]:PORT and listen
//!   bind-kept PORT                 the kept UDP socket: bind [::]:PORT (then `udp-recv PORT`)
//!   rthdr udp|tcp ADDR PORT VIA    an IPv6 socket with a type-4 segment routing header
//!                                  [ADDR, VIA] (setsockopt IPV6_RTHDR): sendto, or a
//!                                  non-blocking connect whose socket is kept; `ok`/`err ERRNO`,
//!                                  `setsockopt ERRNO` when the kernel refuses the header
//!   rthdr-cmsg srh|type2 ADDR PORT VIA
//!                                  the same header (or a type-2 one) as sendmsg ancillary data
//!   ipopt lsrr|rr ADDR PORT VIA    an IPv4 UDP socket with IP_OPTIONS (loose source route via
//!                                  VIA, or record route), then sendto
//!   ip6opt hop|dst ADDR PORT       IPV6_HOPOPTS / IPV6_DSTOPTS (a PadN option), then sendto
//!   resolve NAME SERVER MODE TYPE  one DNS query to SERVER:53 the way stub resolvers send it;
//!                                  MODE udp (connected, like glibc), udpu (unconnected, like
//!                                  musl), tcp, or auto (udp, then tcp when truncated); TYPE A or
//!                                  AAAA. Answers `ok ADDR,..` (sorted), `rcode NAME`, `tc`, or
//!                                  `err ...`; a reply or peer address other than SERVER:53 is
//!                                  `err source ADDR` / `err peer ADDR`, as a stub would reject it
//!   gai NAME                       getaddrinfo(); `ok ADDR,..` (sorted) or `err EAI CODE`
//!   dns-garbage SERVER             sends a query with a compression loop and an oversized one
//!   bench-dns SERVER N QPS NAMES   N A queries for n0..n{NAMES-1}.example.com, paced at QPS,
//!                                  each on a fresh connected UDP socket as a stub resolver
//!                                  does; answers `p50=NS p99=NS fail=K` (socket to answer)
//!   uring-connect ADDR PORT        TCP connect() submitted through io_uring
//!   uring-sendmsg ADDR PORT        unconnected UDP sendmsg() submitted through io_uring
//!   hide-in-ring                   registers the held UDP sockets with a new io_uring and
//!                                  closes their descriptors (the ring is kept)
//!   packet-ring                    an AF_PACKET socket with a receive ring mapped, its
//!                                  descriptor closed (the mapping is kept)
//!   write PATH TEXT                write TEXT to PATH (cgroup.procs, say)
//!   mkdir PATH                     create a directory (a child cgroup, say)
//!   connect-unix PATH              connect to a unix stream socket
//!   fork-storm N tcp ADDR PORT     N children, each one connect(); `eperm=X other=Y`
//!   recv-socket PATH               listen on unix socket PATH; a socket sent there over
//!                                  SCM_RIGHTS is kept (answers at once)
//!   send-socket PATH               make a TCP socket and send it to PATH over SCM_RIGHTS
//!   connect-received ADDR PORT     connect() the socket received over SCM_RIGHTS
//!   spawn-on-ring PROGRAM ARGS..   as `spawn`, with an SQPOLL io_uring instance as its
//!                                  standard input
//!   send-ring PATH                 an io_uring instance sent to PATH over SCM_RIGHTS
//!   spawn-seccomp-faked PROGRAM ARGS..
//!                                  as `spawn`, under a seccomp filter that answers
//!                                  seccomp() with 0 without running it
//!   pidfd-getfd-self               pidfd_getfd() of its own standard input; `ok` or `err ERRNO`
//!   pidfd-getfd PID FD             pidfd_getfd() of process PID's descriptor FD (closed again)
//!   take-fd PID FD                 the same, the descriptor kept; answers `ok FD`
//!   keep-ring [sqpoll|sparse|pipe|hidden|registered|registered-open]
//!                                  a new io_uring instance (with an SQPOLL thread; with a
//!                                  registered file table of 4 empty slots; with a pipe's
//!                                  two ends registered; with a UDP socket registered and
//!                                  the ring's descriptor closed, its mapping kept; with a
//!                                  UDP socket registered, never mapped, the ring registered
//!                                  with the calling thread and its descriptor closed; with
//!                                  nothing registered, registered with the thread, its
//!                                  descriptor kept), kept; answers `ok FD` (`ok -` where
//!                                  none is left)
//!   fork-sharing-files             a child cloned with CLONE_FILES (sharing this process's
//!                                  descriptor table), waiting; answers `ok PID`
//!   sharing-leader-exits           that child starts a thread and its leader exits; `ok TID`
//!   fork-hopping-sharer            a child (sharing its descriptor table) that waits;
//!                                  answers `ok PID`
//!   sharers-hop SECS               it starts a chain of processes sharing this process's
//!                                  descriptor table, each cloning the next and exiting, for
//!                                  at most SECS seconds; `ok`
//!   sharers-stop                   ends the chain (it ends once a descriptor of the shared
//!                                  table is closed); `ok`
//!   hold-ring-lock FD              holds io_uring instance FD's lock (a buffer registration
//!                                  waits on a userfaultfd page never served); needs root
//!   release-ring-lock              lets it go; `ok registered` or `ok failed`
//!   seccomp-listener               installs an allow-all seccomp filter asking for a
//!                                  listener; `ok` or `err ERRNO`
//!   uring-calls                    io_uring_setup(), then io_uring_enter() and
//!                                  io_uring_register() on descriptor -1; answers
//!                                  `setup=ok|ERRNO enter=ERRNO register=ERRNO`
//!   exit
//! Startup: `aw-probe [--cgroup DIR] [--netns] [--resolv-conf FILE] [--cpu N]` prints
//! `ready PID` once in place; `--resolv-conf` bind-mounts FILE over /etc/resolv.conf in a
//! private mount namespace; `--cpu` pins the probe to one CPU, so the packets it sends reach a
//! veth peer in the order it sent them.

use std::{
    io::{self, BufRead, Write},
    mem,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EINPROGRESS => "EINPROGRESS".into(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT".into(),
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EISCONN => "EISCONN".into(),
        libc::ECONNABORTED => "ECONNABORTED".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EBADF => "EBADF".into(),
        other => format!("E{other}"),
    }
}

fn last_err() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family-specific prefix.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn new_socket(family: i32, ty: i32, proto: i32) -> Result<OwnedFd, i32> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn family(addr: &SocketAddr) -> i32 {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn kind(proto: &str) -> Result<(i32, i32), String> {
    match proto {
        "tcp" => Ok((libc::SOCK_STREAM, libc::IPPROTO_TCP)),
        "udp" => Ok((libc::SOCK_DGRAM, libc::IPPROTO_UDP)),
        other => Err(format!("bad protocol {other}")),
    }
}

fn do_connect(proto: &str, addr: SocketAddr) -> Result<(), i32> {
    let (ty, p) = kind(proto).map_err(|_| libc::EINVAL)?;
    let s = new_socket(family(&addr), ty, p)?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and address.
    let rc = unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) };
    if rc < 0 { Err(last_err()) } else { Ok(()) }
}

fn do_sendto(addr: SocketAddr, flags: i32, ty: i32, proto: i32) -> Result<(), i32> {
    let s = new_socket(family(&addr), ty, proto)?;
    let (ss, len) = sockaddr(addr);
    let buf = b"agentwall-probe";
    // SAFETY: valid fd, buffer and address.
    let rc = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags,
            (&raw const ss).cast(),
            len,
        )
    };
    if rc < 0 { Err(last_err()) } else { Ok(()) }
}

fn do_sendmmsg(addr: SocketAddr) -> Result<(), i32> {
    let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)?;
    let (mut ss, len) = sockaddr(addr);
    let mut buf = *b"agentwall-probe";
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed mmsghdr is valid; fields set below point to live locals.
    let mut msgs: [libc::mmsghdr; 2] = unsafe { mem::zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_name = (&raw mut ss).cast();
        m.msg_hdr.msg_namelen = len;
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: as above.
    let rc = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), 2, 0) };
    if rc < 0 { Err(last_err()) } else { Ok(()) }
}

fn do_listen(addr: SocketAddr) -> Result<OwnedFd, i32> {
    listen_on(
        new_socket(family(&addr), libc::SOCK_STREAM, libc::IPPROTO_TCP)?,
        addr,
    )
}

fn listen_on(s: OwnedFd, addr: SocketAddr) -> Result<OwnedFd, i32> {
    let one: i32 = 1;
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        )
    };
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and address.
    if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
        return Err(last_err());
    }
    // SAFETY: valid fd.
    if unsafe { libc::listen(s.as_raw_fd(), 4096) } < 0 {
        return Err(last_err());
    }
    Ok(s)
}

fn answer(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("err {}", errno_name(e)),
    }
}

fn tally(proto: &str, addrs: impl Iterator<Item = SocketAddr>) -> String {
    let (mut eperm, mut other) = (0u64, 0u64);
    for a in addrs {
        match do_connect(proto, a) {
            Err(libc::EPERM) => eperm += 1,
            _ => other += 1,
        }
    }
    format!("eperm={eperm} other={other}")
}

/// The background connect loop of `loop-start`: its stop flag, its thread, and the count of
/// each outcome (`ok` or the errno's name).
type ConnectLoop = (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<std::collections::BTreeMap<String, u64>>,
);

fn connect_loop() -> std::sync::MutexGuard<'static, Option<ConnectLoop>> {
    static LOOP: std::sync::Mutex<Option<ConnectLoop>> = std::sync::Mutex::new(None);
    LOOP.lock().expect("loop lock")
}

/// Connects to `addr` over and over on a thread of its own until `loop-stop`; answers once
/// the first connect is done, so the loop is known to run.
fn loop_start(proto: &str, addr: SocketAddr) -> String {
    let mut slot = connect_loop();
    if slot.is_some() {
        return "err a loop runs already".into();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let proto = proto.to_owned();
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut counts = std::collections::BTreeMap::new();
        loop {
            let outcome = match do_connect(&proto, addr) {
                Ok(()) => "ok".to_owned(),
                Err(e) => errno_name(e),
            };
            *counts.entry(outcome).or_insert(0u64) += 1;
            let _ = first_tx.send(());
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return counts;
            }
        }
    });
    let _ = first_rx.recv();
    *slot = Some((stop, thread));
    "ok".into()
}

/// Stops the loop and says how each connect ended: `EPERM=1234 ENETUNREACH=2`.
fn loop_stop() -> String {
    let Some((stop, thread)) = connect_loop().take() else {
        return "err no loop runs".into();
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let counts = thread.join().expect("the loop thread");
    counts
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// UDP sockets connected by `hold udp`.
fn held_udp() -> std::sync::MutexGuard<'static, Vec<OwnedFd>> {
    static HELD: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().expect("held lock")
}

/// A type-4 (segment routing) header listing `segments`, the last one first on the wire.
fn srh(segments: &[std::net::Ipv6Addr]) -> Vec<u8> {
    let n = segments.len() as u8;
    let mut h = vec![0u8, 2 * n, 4, n - 1, n - 1, 0, 0, 0];
    for s in segments {
        h.extend_from_slice(&s.octets());
    }
    h
}

/// A type-2 routing header (Mobile IPv6) carrying `via`.
fn rthdr2(via: std::net::Ipv6Addr) -> Vec<u8> {
    let mut h = vec![0u8, 2, 2, 1, 0, 0, 0, 0];
    h.extend_from_slice(&via.octets());
    h
}

fn setsockopt_bytes(fd: &OwnedFd, level: i32, name: i32, v: &[u8]) -> Result<(), i32> {
    // SAFETY: valid fd; the buffer outlives the call.
    if unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            v.as_ptr().cast(),
            v.len() as libc::socklen_t,
        )
    } < 0
    {
        return Err(last_err());
    }
    Ok(())
}

fn sendto_one(fd: &OwnedFd, addr: SocketAddr) -> String {
    sendto_bytes(fd, addr, b"x")
}

fn sendto_bytes(fd: &OwnedFd, addr: SocketAddr, bytes: &[u8]) -> String {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd, buffer and address.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&raw const ss).cast(),
            len,
        )
    };
    if n < 0 {
        format!("err {}", errno_name(last_err()))
    } else {
        "ok".into()
    }
}

fn v6(ip: &str) -> Result<std::net::Ipv6Addr, String> {
    ip.parse()
        .map_err(|e| format!("bad IPv6 address {ip}: {e}"))
}

/// One datagram from a new IPv6 UDP socket to `addr`, with one IPPROTO_IPV6 ancillary item
/// (`ty`, `data`): "ok" or "err ERRNO".
fn sendmsg_cmsg(addr: SocketAddr, ty: i32, data: &[u8]) -> Result<String, String> {
    let s = new_socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
        .map_err(|e| format!("socket: {}", errno_name(e)))?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(data.len() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut payload = *b"x";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives sendmsg.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw const ss).cast_mut().cast();
    msg.msg_namelen = len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one header of CMSG_SPACE(len) bytes.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::IPPROTO_IPV6;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
    }
    // SAFETY: valid fd and message.
    Ok(
        if unsafe { libc::sendmsg(s.as_raw_fd(), &raw const msg, 0) } < 0 {
            format!("err {}", errno_name(last_err()))
        } else {
            "ok".into()
        },
    )
}

/// The abstract unix address NAME (network-namespace scoped: the test's own).
fn abstract_addr(name: &str) -> Result<std::os::unix::net::SocketAddr, String> {
    use std::os::linux::net::SocketAddrExt as _;
    std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(|e| format!("{name}: {e}"))
}

/// The inbox `fd-inbox` bound.
fn inbox() -> std::sync::MutexGuard<'static, Option<std::os::unix::net::UnixDatagram>> {
    static INBOX: std::sync::Mutex<Option<std::os::unix::net::UnixDatagram>> =
        std::sync::Mutex::new(None);
    INBOX.lock().expect("inbox")
}

/// Sends `fds` in one datagram over `sock` (SCM_RIGHTS), `kinds` (one byte per descriptor)
/// as its payload.
fn pass_fds(sock: &std::os::unix::net::UnixDatagram, fds: &[i32], kinds: &[u8]) -> String {
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut payload = kinds.to_vec();
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives sendmsg.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one header of CMSG_SPACE(bytes) bytes.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
    }
    // SAFETY: valid fd and message.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0) } < 0 {
        format!("err {}", errno_name(last_err()))
    } else {
        "ok".into()
    }
}

/// Receives one datagram of descriptors `pass_fds` sent: each with its kind byte.
fn take_fds(sock: &std::os::unix::net::UnixDatagram) -> Result<Vec<(u8, OwnedFd)>, String> {
    const MAX: usize = 16;
    let mut kinds = [0u8; MAX];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX * 4) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: kinds.as_mut_ptr().cast(),
        iov_len: MAX,
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives recvmsg.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: valid fd and message.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(format!("recvmsg: {}", errno_name(last_err())));
    }
    let mut out = Vec::new();
    // SAFETY: walks the control messages the kernel wrote; each descriptor is now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                let data = libc::CMSG_DATA(c).cast::<i32>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    out.push((kinds.get(i).copied().unwrap_or(0), fd));
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok(out)
}

/// Connections kept open by `hold`.
/// setsockopt(fd, level, name, &value, 4) through the i386 system call gate; the kernel's
/// return value (a negative errno on failure).
#[cfg(target_arch = "x86_64")]
fn compat_setsockopt(fd: i32, level: i32, name: i32, value: i32) -> i32 {
    const I386_SETSOCKOPT: i32 = 366;
    // SAFETY: an anonymous page below 4 GiB, where a 32-bit pointer can reach it.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return -last_err();
    }
    // SAFETY: the page is ours and writable.
    unsafe { *page.cast::<i32>() = value };
    let mut ret = I386_SETSOCKOPT;
    // SAFETY: a system call through the compat gate with 32-bit arguments; LLVM reserves rbx,
    // so the first argument is swapped in and out around the call.
    unsafe {
        std::arch::asm!(
            "xchg {fd:e}, ebx",
            "int 0x80",
            "xchg {fd:e}, ebx",
            fd = inout(reg) fd => _,
            inout("eax") ret,
            in("ecx") level,
            in("edx") name,
            in("esi") page as u32,
            in("edi") 4,
        );
        libc::munmap(page, 4096);
    }
    ret
}

/// UDP sockets bound by `udp-bind`, by local port.
fn bound_udp() -> std::sync::MutexGuard<'static, Vec<(u16, std::net::UdpSocket)>> {
    static BOUND: std::sync::Mutex<Vec<(u16, std::net::UdpSocket)>> =
        std::sync::Mutex::new(Vec::new());
    BOUND.lock().expect("bound lock")
}

/// The socket `udp-bind` bound to local port `port`.
fn bound_on(port: &str) -> Result<std::net::UdpSocket, String> {
    let port: u16 = port.parse().map_err(|e| format!("bad port {port}: {e}"))?;
    bound_udp()
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, s)| s.try_clone().expect("clone"))
        .ok_or_else(|| format!("nothing bound on {port}"))
}

/// Children left running by `spawn-many`.
fn spawned() -> std::sync::MutexGuard<'static, Vec<std::process::Child>> {
    static SPAWNED: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());
    SPAWNED.lock().expect("spawned lock")
}

/// Sockets made and kept with no address (`keep`), with their type.
fn kept() -> std::sync::MutexGuard<'static, Vec<(i32, OwnedFd)>> {
    static KEPT: std::sync::Mutex<Vec<(i32, OwnedFd)>> = std::sync::Mutex::new(Vec::new());
    KEPT.lock().expect("kept lock")
}

fn take_kept(ty: i32) -> Result<OwnedFd, String> {
    let mut k = kept();
    let i = k
        .iter()
        .position(|(t, _)| *t == ty)
        .ok_or("no kept socket of that type")?;
    Ok(k.remove(i).1)
}

fn held() -> std::sync::MutexGuard<'static, Vec<OwnedFd>> {
    static HELD: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().expect("held lock")
}

fn percentiles(mut samples: Vec<u64>) -> String {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!("p50={} p99={}", at(0.50), at(0.99))
}

/// One `connect()`, timed alone.
fn timed_connect(
    s: &OwnedFd,
    ss: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Result<u64, String> {
    let t0 = std::time::Instant::now();
    // SAFETY: valid fd and address.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    let dt = t0.elapsed();
    if rc < 0 {
        return Err(format!("connect: {}", errno_name(last_err())));
    }
    Ok(dt.as_nanos() as u64)
}

/// N HTTP CONNECTs through the proxy at `proxy` to a listener this probe opens at `dest`,
/// each timed from connect() to the proxy's "200"; answers `p50=NS p99=NS`.
fn bench_proxy(proxy: SocketAddr, dest: SocketAddr, n: usize) -> Result<String, String> {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind(dest).map_err(|e| format!("listen: {e}"))?;
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let req = format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n");
    let warmup = n / 10;
    let mut samples = Vec::with_capacity(n);
    let mut buf = [0u8; 512];
    for i in 0..warmup + n {
        let t0 = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect(proxy).map_err(|e| format!("proxy: {e}"))?;
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut got = 0;
        while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
            if got == buf.len() {
                break;
            }
        }
        let ns = t0.elapsed().as_nanos() as u64;
        let head = String::from_utf8_lossy(&buf[..got]);
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Ok(format!(
                "err proxy said {:?}",
                head.lines().next().unwrap_or("")
            ));
        }
        if i >= warmup {
            samples.push(ns);
        }
    }
    Ok(percentiles(samples))
}

/// A local socket at `addr` that drains what is sent to it, for as long as the process lives.
fn udp_sink(addr: SocketAddr) -> Result<(), String> {
    let sink = std::net::UdpSocket::bind(addr).map_err(|e| format!("bind: {e}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while sink.recv(&mut buf).is_ok() {}
    });
    Ok(())
}

/// Unconnected sendto() of N datagrams of `size` bytes to `addr` (a local sink drains them
/// when `sink`); answers `pps=N` (datagrams per second).
fn bench_sendto(addr: SocketAddr, n: usize, size: usize, sink: bool) -> Result<String, String> {
    if sink {
        udp_sink(addr)?;
    }
    let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
        .map_err(|e| format!("socket: {}", errno_name(e)))?;
    let (ss, len) = sockaddr(addr);
    let payload = vec![0u8; size];
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        // SAFETY: valid fd, buffer and address.
        let rc = unsafe {
            libc::sendto(
                s.as_raw_fd(),
                payload.as_ptr().cast(),
                size,
                0,
                (&raw const ss).cast(),
                len,
            )
        };
        if rc < 0 {
            return Ok(format!("err {}", errno_name(last_err())));
        }
    }
    Ok(format!(
        "pps={}",
        (n as f64 / t0.elapsed().as_secs_f64()) as u64
    ))
}

/// `n` send()s of `size` bytes on one connected UDP socket to `addr` (a local sink drains
/// them when `sink`): no hook runs per datagram, only the packet line.
fn bench_send(addr: SocketAddr, n: usize, size: usize, sink: bool) -> Result<String, String> {
    if sink {
        udp_sink(addr)?;
    }
    let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
        .map_err(|e| format!("socket: {}", errno_name(e)))?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and address.
    if unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
        return Ok(format!("err {}", errno_name(last_err())));
    }
    let payload = vec![0u8; size];
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        // SAFETY: valid fd and buffer.
        if unsafe { libc::send(s.as_raw_fd(), payload.as_ptr().cast(), size, 0) } < 0 {
            return Ok(format!("err {}", errno_name(last_err())));
        }
    }
    Ok(format!(
        "pps={}",
        (n as f64 / t0.elapsed().as_secs_f64()) as u64
    ))
}

/// `mib` MiB written over one TCP connection to a local reader, in 64 KiB writes.
fn bench_bulk(addr: SocketAddr, mib: usize) -> Result<String, String> {
    bench_bulk_after(addr, &[], mib)
}

/// `first`, then `mib` MiB over one connection: MiB/s.
fn bench_bulk_after(addr: SocketAddr, first: &[u8], mib: usize) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("bind: {e}"))?;
    // After a ClientHello, the server answers (a ServerHello) before the client goes on, as
    // TLS does: until then the check lets the client send only records that hold no hello.
    let hello = first.len();
    let reader = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        if hello > 0 {
            // The answer to the hello, once it came.
            let mut got = vec![0u8; hello];
            c.read_exact(&mut got).expect("the hello");
            c.write_all(&server_hello()).expect("answer");
        }
        let mut buf = vec![0u8; 1 << 16];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let chunk = vec![0u8; 1 << 16];
    let t0 = std::time::Instant::now();
    c.write_all(first).map_err(|e| format!("write: {e}"))?;
    if hello > 0 {
        let mut answer = vec![0u8; server_hello().len()];
        c.read_exact(&mut answer)
            .map_err(|e| format!("read the answer: {e}"))?;
    }
    for _ in 0..mib * 16 {
        c.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
    }
    drop(c);
    reader.join().map_err(|_| "reader panicked".to_owned())?;
    Ok(format!(
        "mibps={}",
        (mib as f64 / t0.elapsed().as_secs_f64()) as u64
    ))
}

/// TLS-shaped connections: each connects, writes a ClientHello naming `name` (the first data,
/// which a name rule's connection has checked), and closes with RST; a thread accepts and
/// closes. Times connect and write (the packet line runs inside the write on loopback).
fn bench_hello(
    addr: SocketAddr,
    name: &str,
    n: usize,
    keep: &mut Vec<OwnedFd>,
) -> Result<String, String> {
    use std::io::Write as _;
    listen_once(addr, keep)?;
    let hello = client_hello(&[name]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t0 = std::time::Instant::now();
        let mut c = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        c.write_all(&hello).map_err(|e| format!("write: {e}"))?;
        let ns = t0.elapsed().as_nanos() as u64;
        reset_on_close(c.as_raw_fd());
        drop(c);
        if i >= n / 10 {
            samples.push(ns);
        }
    }
    Ok(percentiles(samples))
}

/// [`bench_bulk`] after a ClientHello naming `name`: a long TLS-shaped flow.
fn bench_bulk_hello(addr: SocketAddr, name: &str, mib: usize) -> Result<String, String> {
    bench_bulk_after(addr, &client_hello(&[name]), mib)
}

fn bench_udp(addr: SocketAddr, n: usize) -> Result<String, String> {
    let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
        .map_err(|e| format!("socket: {}", errno_name(e)))?;
    let (ss, len) = sockaddr(addr);
    let warmup = n / 10;
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let ns = timed_connect(&s, &ss, len)?;
        if i >= warmup {
            samples.push(ns);
        }
    }
    Ok(percentiles(samples))
}

/// Times `connect()` alone (socket creation and close are outside the clock). Client sockets
/// close with RST (linger 0) so no TIME_WAIT piles up; a thread drains the accept queue.
/// Pins this thread (and the threads it starts later) to the machine's last CPU. Probes
/// compared block by block then all run their connects and accepts on one and the same CPU:
/// where the scheduler happens to put a process's two threads otherwise moves its connect
/// time by about a microsecond, for the life of the process.
fn pin_to_last_cpu() -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    unsafe { libc::CPU_SET(cpus - 1, &mut set) };
    // SAFETY: valid set of the size passed.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) } < 0 {
        return Err(format!("sched_setaffinity: {}", errno_name(last_err())));
    }
    Ok(())
}

/// Listens on `addr` (once per process), accepting and closing whatever arrives.
fn listen_once(addr: SocketAddr, keep: &mut Vec<OwnedFd>) -> Result<(), String> {
    static LISTENING: std::sync::Mutex<Vec<SocketAddr>> = std::sync::Mutex::new(Vec::new());
    let mut listening = LISTENING.lock().unwrap();
    if listening.contains(&addr) {
        return Ok(());
    }
    let listener = do_listen(addr).map_err(|e| format!("listen: {}", errno_name(e)))?;
    let lfd = listener.as_raw_fd();
    keep.push(listener);
    listening.push(addr);
    std::thread::spawn(move || {
        loop {
            // SAFETY: lfd stays open for the life of the process (kept in `keep`).
            let c = unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
            if c >= 0 {
                // SAFETY: c is a fresh descriptor we own.
                unsafe { libc::close(c) };
            }
        }
    });
    Ok(())
}

/// `n` TCP connects to `addr`, each on a fresh socket closed with a reset (SO_LINGER 0, so
/// no TIME_WAIT piles up); the time of each connect() alone, ns.
fn connect_samples(addr: SocketAddr, n: usize) -> Result<Vec<u64>, String> {
    let (ss, len) = sockaddr(addr);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let s = new_socket(family(&addr), libc::SOCK_STREAM, libc::IPPROTO_TCP)
            .map_err(|e| format!("socket: {}", errno_name(e)))?;
        reset_on_close(s.as_raw_fd());
        samples.push(timed_connect(&s, &ss, len)?);
    }
    Ok(samples)
}

/// A TCP socket that closes with a reset (SO_LINGER 0), so no TIME_WAIT piles up.
fn reset_on_close(fd: i32) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            mem::size_of::<libc::linger>() as u32,
        )
    };
}

fn bench_connect(addr: SocketAddr, n: usize, keep: &mut Vec<OwnedFd>) -> Result<String, String> {
    listen_once(addr, keep)?;
    connect_samples(addr, n / 10)?;
    Ok(percentiles(connect_samples(addr, n)?))
}

fn set_lo_up() -> Result<(), i32> {
    let s = new_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: zeroed ifreq is valid; name copied in below.
    let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: valid fd and ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(last_err());
    }
    // SAFETY: union access of the flags member, which SIOCGIFFLAGS filled.
    unsafe { ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16 };
    // SAFETY: as above.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(last_err());
    }
    Ok(())
}

fn run(line: &str, keep: &mut Vec<OwnedFd>) -> Result<String, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let sa = |ip: &str, port: &str| -> Result<SocketAddr, String> {
        let ip: IpAddr = ip.parse().map_err(|e| format!("bad address {ip}: {e}"))?;
        let port: u16 = port.parse().map_err(|e| format!("bad port {port}: {e}"))?;
        Ok(SocketAddr::new(ip, port))
    };
    Ok(match w.as_slice() {
        ["connect", proto, ip, port] => {
            kind(proto)?;
            answer(do_connect(proto, sa(ip, port)?))
        }
        ["sendto", "udp", ip, port] => answer(do_sendto(
            sa(ip, port)?,
            0,
            libc::SOCK_DGRAM,
            libc::IPPROTO_UDP,
        )),
        ["sendmmsg", "udp", ip, port] => answer(do_sendmmsg(sa(ip, port)?)),
        ["fastopen", ip, port] => answer(do_sendto(
            sa(ip, port)?,
            libc::MSG_FASTOPEN,
            libc::SOCK_STREAM,
            libc::IPPROTO_TCP,
        )),
        ["socket", fam, ty, proto] => {
            let fam = match *fam {
                "inet" => libc::AF_INET,
                "inet6" => libc::AF_INET6,
                "packet" => libc::AF_PACKET,
                "unix" => libc::AF_UNIX,
                "netlink" => libc::AF_NETLINK,
                "vsock" => libc::AF_VSOCK,
                "xdp" => libc::AF_XDP,
                "tipc" => libc::AF_TIPC,
                "rds" => libc::AF_RDS,
                "can" => libc::AF_CAN,
                "bluetooth" => libc::AF_BLUETOOTH,
                "alg" => libc::AF_ALG,
                "key" => libc::AF_KEY,
                "llc" => libc::AF_LLC,
                f => return Err(format!("bad family {f}")),
            };
            let ty = match *ty {
                "stream" => libc::SOCK_STREAM,
                "dgram" => libc::SOCK_DGRAM,
                "raw" => libc::SOCK_RAW,
                "seqpacket" => libc::SOCK_SEQPACKET,
                "rdm" => libc::SOCK_RDM,
                t => return Err(format!("bad type {t}")),
            };
            let proto: i32 = proto.parse().map_err(|e| format!("bad protocol: {e}"))?;
            answer(new_socket(fam, ty, proto).map(drop))
        }
        ["listen", "tcp", ip, port] => match do_listen(sa(ip, port)?) {
            Ok(fd) => {
                keep.push(fd);
                "ok".into()
            }
            Err(e) => format!("err {}", errno_name(e)),
        },
        ["keep", proto] => {
            let (ty, protocol) = kind(proto)?;
            match new_socket(libc::AF_INET6, ty, protocol) {
                Ok(fd) => {
                    kept().push((ty, fd));
                    "ok".into()
                }
                Err(e) => format!("err {}", errno_name(e)),
            }
        }
        ["listen-kept", port] => {
            let fd = take_kept(libc::SOCK_STREAM)?;
            match listen_on(fd, sa("::", port)?) {
                Ok(fd) => {
                    keep.push(fd);
                    "ok".into()
                }
                Err(e) => format!("err {}", errno_name(e)),
            }
        }
        ["bind-kept", port] => {
            let s = std::net::UdpSocket::from(take_kept(libc::SOCK_DGRAM)?);
            let (ss, len) = sockaddr(sa("::", port)?);
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                let p = s.local_addr().map_err(|e| e.to_string())?.port();
                bound_udp().push((p, s));
                "ok".into()
            }
        }
        ["udp-bind", ip, port] => match std::net::UdpSocket::bind(sa(ip, port)?) {
            Ok(s) => {
                let p = s.local_addr().map_err(|e| e.to_string())?.port();
                bound_udp().push((p, s));
                "ok".into()
            }
            Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
        },
        // Sends from the socket bound on `lport`, so a reply comes back to it.
        ["udp-send", lport, ip, port] => {
            let s = bound_on(lport)?;
            match s.send_to(b"probe", sa(ip, port)?) {
                Ok(_) => "ok".into(),
                Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
            }
        }
        // The next datagram on the socket bound on `lport`: "from ADDR PAYLOAD", or "timeout".
        ["udp-recv", lport, ms] => {
            let s = bound_on(lport)?;
            let ms: u64 = ms.parse().map_err(|e| format!("bad timeout: {e}"))?;
            s.set_read_timeout(Some(std::time::Duration::from_millis(ms)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            match s.recv_from(&mut buf) {
                Ok((n, from)) => format!("from {from} {}", String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    "timeout".into()
                }
                Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
            }
        }
        ["loop-start", proto, ip, port] => {
            kind(proto)?;
            let addr = sa(ip, port)?;
            loop_start(proto, addr)
        }
        ["loop-stop"] => loop_stop(),
        ["connect-loop", proto, ip, port, n] => {
            kind(proto)?;
            let addr = sa(ip, port)?;
            let n: u64 = n.parse().map_err(|e| format!("bad count: {e}"))?;
            tally(proto, (0..n).map(|_| addr))
        }
        ["sweep", proto, ip, lo, hi] => {
            kind(proto)?;
            let base = sa(ip, lo)?;
            let hi: u16 = hi.parse().map_err(|e| format!("bad port: {e}"))?;
            tally(
                proto,
                (base.port()..=hi).map(|p| SocketAddr::new(base.ip(), p)),
            )
        }
        ["hold", "tcp", ip, port] => {
            let addr = sa(ip, port)?;
            let s = new_socket(family(&addr), libc::SOCK_STREAM, libc::IPPROTO_TCP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let (ss, len) = sockaddr(addr);
            // SAFETY: valid fd and address.
            if unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                held().push(s);
                "ok".into()
            }
        }
        ["hold", "mptcp", ip, port] => {
            let addr = sa(ip, port)?;
            let s = new_socket(family(&addr), libc::SOCK_STREAM, libc::IPPROTO_MPTCP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let (ss, len) = sockaddr(addr);
            // SAFETY: valid fd and address.
            if unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                held().push(s);
                "ok".into()
            }
        }
        ["hold", "listener", ip, port] => match do_listen(sa(ip, port)?) {
            Ok(fd) => {
                held().push(fd);
                "ok".into()
            }
            Err(e) => format!("err {}", errno_name(e)),
        },
        ["hold", "bound-udp", ip, port] => {
            let addr = sa(ip, port)?;
            let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let (ss, len) = sockaddr(addr);
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                held_udp().push(s);
                "ok".into()
            }
        }
        ["hold", "udp-loop", port] => {
            let to = sa("127.0.0.1", port)?;
            let (ss, len) = sockaddr(to);
            let mut made = Vec::new();
            for _ in 0..2 {
                made.push(
                    new_socket(family(&to), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                        .map_err(|e| format!("socket: {}", errno_name(e)))?,
                );
            }
            let (receiver, sender) = (made.remove(0), made.remove(0));
            // SAFETY: valid fds and address.
            let failed = unsafe {
                libc::bind(receiver.as_raw_fd(), (&raw const ss).cast(), len) < 0
                    || libc::connect(sender.as_raw_fd(), (&raw const ss).cast(), len) < 0
            };
            if failed {
                format!("err {}", errno_name(last_err()))
            } else {
                KEPT_FDS.lock().expect("kept").push(receiver);
                held_udp().push(sender);
                "ok".into()
            }
        }
        // `udp-recverr`: with its ICMP error queue turned on first (IP_RECVERR, or
        // IPV6_RECVERR for an IPv6 peer), which only an unenrolled maker keeps on.
        ["hold", kind @ ("udp" | "udp-recverr"), ip, port] => {
            let addr = sa(ip, port)?;
            let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            if *kind == "udp-recverr" {
                match recverr(&s, false) {
                    Ok(true) => {}
                    Ok(false) => return Ok("recverr off".into()),
                    Err(e) => return Ok(format!("setsockopt {}", errno_name(e))),
                }
            }
            let (ss, len) = sockaddr(addr);
            // SAFETY: valid fd and address.
            if unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                held_udp().push(s);
                "ok".into()
            }
        }
        // A socket made and neither bound nor connected, to be lent to another process.
        ["hold-fresh", proto, fam] => {
            let family = match *fam {
                "4" => libc::AF_INET,
                "6" => libc::AF_INET6,
                other => return Err(format!("bad family {other:?}: 4 or 6")),
            };
            let (ty, protocol) = match *proto {
                "tcp" => (libc::SOCK_STREAM, libc::IPPROTO_TCP),
                "udp" => (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
                "udplite" => (libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
                other => return Err(format!("bad protocol {other:?}: tcp, udp or udplite")),
            };
            let s = new_socket(family, ty, protocol)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            if ty == libc::SOCK_STREAM {
                held().push(s);
            } else {
                held_udp().push(s);
            }
            "ok".into()
        }
        // Connects every held socket to ADDR PORT: "ok", or the first failure's errno.
        ["connect-held", ip, port] => {
            let (ss, len) = sockaddr(sa(ip, port)?);
            let mut reply = "ok".to_owned();
            for s in held().iter().chain(held_udp().iter()) {
                // SAFETY: valid fd and address.
                if unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0
                    && reply == "ok"
                {
                    reply = format!("err {}", errno_name(last_err()));
                }
            }
            reply
        }
        // Sets IP_FREEBIND (IPV6_FREEBIND on IPv6 sockets) on every held socket.
        ["freebind-held"] => {
            let mut reply = "ok".to_owned();
            for s in held().iter().chain(held_udp().iter()) {
                if let Err(e) = set_freebind(s, true)
                    && reply == "ok"
                {
                    reply = format!("err {}", errno_name(e));
                }
            }
            reply
        }
        // A UDP socket with IP_FREEBIND (IPV6_FREEBIND) set, bound to SRC, which the host
        // need not hold, and connected to IP PORT: it sends from SRC. `freebind-cleared-udp`
        // turns the option off again after the bind, which leaves the address bound.
        [
            "hold",
            how @ ("freebind-udp" | "freebind-cleared-udp"),
            src,
            ip,
            port,
        ] => {
            let addr = sa(ip, port)?;
            let from = sa(src, "0")?;
            let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            set_freebind(&s, true).map_err(|e| format!("setsockopt: {}", errno_name(e)))?;
            let (ss, len) = sockaddr(from);
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                return Ok(format!("bind err {}", errno_name(last_err())));
            }
            if *how == "freebind-cleared-udp" {
                set_freebind(&s, false).map_err(|e| format!("setsockopt: {}", errno_name(e)))?;
            }
            let (ss, len) = sockaddr(addr);
            // SAFETY: valid fd and address.
            if unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                return Ok(format!("connect err {}", errno_name(last_err())));
            }
            held_udp().push(s);
            "ok".into()
        }
        // Waits up to MS milliseconds for a datagram queued on each held UDP socket.
        ["wait-queued", ms] => {
            let ms: i32 = ms.parse().map_err(|e| format!("bad timeout: {e}"))?;
            for s in held_udp().iter() {
                let mut p = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&raw mut p, 1, ms) } != 1 {
                    return Ok("timeout".into());
                }
            }
            "ok".into()
        }
        // The local port of the last held UDP socket.
        ["held-port"] => {
            let held = held_udp();
            let s = held.last().ok_or("no held UDP socket")?;
            // SAFETY: zeroed sockaddr_storage is valid; the kernel fills up to `len`.
            let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
            let mut len = mem::size_of_val(&ss) as libc::socklen_t;
            // SAFETY: valid fd and an address buffer of the length given.
            if unsafe { libc::getsockname(s.as_raw_fd(), (&raw mut ss).cast(), &raw mut len) } < 0 {
                return Ok(format!("err {}", errno_name(last_err())));
            }
            // sin_port and sin6_port sit at the same place, in network byte order.
            // SAFETY: the storage holds a sockaddr_in or sockaddr_in6.
            let port = unsafe { (*(&raw const ss).cast::<libc::sockaddr_in>()).sin_port };
            format!("ok {}", u16::from_be(port))
        }
        // Disconnects every held UDP socket (connect to AF_UNSPEC), which unhashes one whose
        // port the connect chose: it then looks unbound, whatever its queue holds.
        // Binds the last held UDP socket to ADDR PORT: "ok" or "err ERRNO".
        ["bind-held", ip, port] => {
            let held = held_udp();
            let s = held.last().ok_or("no held UDP socket")?;
            let (ss, len) = sockaddr(sa(ip, port)?);
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                "ok".into()
            }
        }
        ["disconnect-held"] => {
            let mut reply = "ok".to_owned();
            for s in held_udp().iter() {
                // SAFETY: zeroed sockaddr is valid; AF_UNSPEC is 0.
                let sa: libc::sockaddr = unsafe { mem::zeroed() };
                // SAFETY: valid fd and address of the length given.
                if unsafe {
                    libc::connect(
                        s.as_raw_fd(),
                        &raw const sa,
                        mem::size_of_val(&sa) as libc::socklen_t,
                    )
                } < 0
                    && reply == "ok"
                {
                    reply = format!("err {}", errno_name(last_err()));
                }
            }
            reply
        }
        // Accepts one connection on the last held socket (a listener), which it then closes:
        // the connection is held in its place.
        ["accept-held"] => {
            let listener = held().pop().ok_or("no held listener")?;
            // SAFETY: a valid listening fd; no peer address asked for.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return Ok(format!("err {}", errno_name(last_err())));
            }
            // SAFETY: a descriptor accept4 just returned, owned by nothing else.
            held().push(unsafe { OwnedFd::from_raw_fd(fd) });
            "ok".into()
        }
        ["drop-held"] => {
            held().clear();
            held_udp().clear();
            "ok".into()
        }
        ["send-held"] => {
            let mut reply = "ok".to_owned();
            for s in held_udp().iter() {
                // SAFETY: valid fd and buffer.
                if unsafe { libc::send(s.as_raw_fd(), b"held".as_ptr().cast(), 4, 0) } < 0 {
                    reply = format!("err {}", errno_name(last_err()));
                }
            }
            reply
        }
        // A TLS ClientHello naming `name` (a server_name extension for each of its
        // comma-separated names) on every held TCP socket: `whole` in one write,
        // `split` after its first 10 bytes (with TCP_NODELAY: two packets, the name in the
        // second), `urgent` in one write whose last byte is urgent data (MSG_OOB), `big` in
        // one write, padded past one segment. Sent from pages the sender keeps:
        // `msg-zerocopy` (send with MSG_ZEROCOPY, which the kernel copies on a socket
        // without SO_ZEROCOPY), `zerocopy` (SO_ZEROCOPY on, then MSG_ZEROCOPY),
        // `zerocopy-set` (SO_ZEROCOPY on, then a plain send: copied), `sendfile` (from a
        // memfd), `uring-zc` (io_uring's zero-copy send).
        ["send-held-hello", name, how] => {
            let names: Vec<&str> = name.split(',').collect();
            let hello = if *how == "big" {
                padded_hello(&names, 1800)
            } else {
                client_hello(&names)
            };
            let mut reply = "ok".to_owned();
            for s in held().iter() {
                let fd = s.as_raw_fd();
                if matches!(
                    *how,
                    "msg-zerocopy" | "zerocopy" | "zerocopy-set" | "sendfile" | "uring-zc"
                ) {
                    reply = send_kept_pages(fd, &hello, how)?;
                    continue;
                }
                let parts: Vec<&[u8]> = if *how == "split" {
                    no_delay(fd);
                    vec![&hello[..10], &hello[10..]]
                } else {
                    vec![&hello[..]]
                };
                let flags = if *how == "urgent" { libc::MSG_OOB } else { 0 };
                if let Some(err) = send_apart(fd, &parts, flags) {
                    reply = err;
                }
            }
            reply
        }
        // Two TLS ClientHellos, naming `first` and then `second`, on every held TCP socket
        // before the server answers: `together` in one write, `apart` in two (with
        // TCP_NODELAY, 50 ms apart: two packets). `early`: the hello of `first` and an
        // application-data record (TLS 1.3 early data) in one write, then another record
        // apart; `second` is then that record's payload.
        ["send-held-hellos", first, second, how] => {
            let one = client_hello(&[first]);
            let (a, b) = if *how == "early" {
                let mut a = one;
                a.extend_from_slice(&tls_record(0x17, b"EARLY-DATA-1"));
                (a, tls_record(0x17, second.as_bytes()))
            } else {
                (one, client_hello(&[second]))
            };
            let parts: Vec<Vec<u8>> = if *how == "together" {
                vec![[a, b].concat()]
            } else {
                vec![a, b]
            };
            let mut reply = "ok".to_owned();
            for s in held().iter() {
                let fd = s.as_raw_fd();
                no_delay(fd);
                let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                if let Some(err) = send_apart(fd, &parts, 0) {
                    reply = err;
                }
            }
            reply
        }
        // A TLS 1.3 ClientHello naming `first` with a key share for x25519 alone (P-256 also
        // offered) on every held TCP socket; then, once the server's answer is a
        // HelloRetryRequest: `hello` a change cipher spec record and a second hello naming
        // `second` with a P-256 key share, in one write; `http` an HTTP request for `first`
        // (not a hello); `ccs-sendfile` the change cipher spec record alone sent with sendfile
        // from a memfd, whose page is then rewritten as the head of an application-data record
        // that would swallow the next write (a second hello naming `first`, then a record
        // hiding a hello naming `second`, which a server would read as the hello). "hrr ok",
        // or what went otherwise.
        ["retry-held-hello", first, second, how] => {
            let mut reply = "ok".to_owned();
            for s in held().iter() {
                let fd = s.as_raw_fd();
                no_delay(fd);
                let hello = tls13_hello(first, GROUP_X25519, &[0x42; 32]);
                // SAFETY: valid fd and buffer.
                if unsafe { libc::send(fd, hello.as_ptr().cast(), hello.len(), 0) } < 0 {
                    return Ok(format!("err first {}", errno_name(last_err())));
                }
                let answer = read_at_least(fd, 43, 10)?;
                if answer.get(11..43) != Some(&HRR_RANDOM[..]) {
                    return Ok(format!("no hrr: {answer:02x?}"));
                }
                let mut share = vec![4u8];
                share.extend_from_slice(&[0x42; 64]);
                let again = match *how {
                    "hello" => [&CCS_RECORD[..], &tls13_hello(second, GROUP_P256, &share)].concat(),
                    "http" => {
                        format!("GET / HTTP/1.1\r\nHost: {first}\r\nConnection: close\r\n\r\n")
                            .into_bytes()
                    }
                    "ccs-sendfile" => {
                        let checked = tls13_hello(first, GROUP_P256, &share);
                        let hidden = tls_record(0x17, &tls13_hello(second, GROUP_P256, &share));
                        // The record head the page becomes: its length covers its own last
                        // byte, the checked hello and the hidden record's head.
                        let l = ((1 + checked.len() + 5) as u16).to_be_bytes();
                        let cover = [0x17, 3, 3, l[0], l[1], 0];
                        let page = shared_page(&CCS_RECORD)?;
                        let mut off: libc::off_t = 0;
                        // SAFETY: valid descriptors and offset.
                        if unsafe { libc::sendfile(fd, page.as_raw_fd(), &raw mut off, 6) } < 0 {
                            return Ok(format!("hrr err sendfile {}", errno_name(last_err())));
                        }
                        // SAFETY: valid fd and buffer.
                        unsafe { libc::pwrite(page.as_raw_fd(), cover.as_ptr().cast(), 6, 0) };
                        [checked, hidden].concat()
                    }
                    other => return Err(format!("retry-held-hello: no way {other:?}")),
                };
                // SAFETY: valid fd and buffer.
                if unsafe { libc::send(fd, again.as_ptr().cast(), again.len(), 0) } < 0 {
                    reply = format!("err {}", errno_name(last_err()));
                }
            }
            format!("hrr {reply}")
        }
        // Reads at least N bytes from every held socket (10 s each at most).
        ["read-held", n] => {
            let n: usize = n.parse().map_err(|e| format!("bad count {n:?}: {e}"))?;
            let mut reply = Vec::new();
            for s in held().iter() {
                reply.push(match read_at_least(s.as_raw_fd(), n, 10) {
                    Ok(got) => format!("got {}", got.len()),
                    Err(e) => e,
                });
            }
            reply.join(" ")
        }
        // Waits (at most 20 s) until every held TCP socket is ended, and says how: the
        // socket's pending error.
        ["await-end-held"] => {
            let mut reply = Vec::new();
            for s in held().iter() {
                let mut pfd = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let n = unsafe { libc::poll(&raw mut pfd, 1, 20_000) };
                if n <= 0 {
                    reply.push("open".to_owned());
                    continue;
                }
                let mut err: libc::c_int = 0;
                let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: valid fd and an int-sized option buffer.
                unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&raw mut err).cast(),
                        &raw mut len,
                    )
                };
                reply.push(if err == 0 {
                    "closed".to_owned()
                } else {
                    errno_name(err)
                });
            }
            reply.join(" ")
        }
        ["pin-last-cpu"] => {
            pin_to_last_cpu()?;
            "ok".into()
        }
        ["fd-inbox", name] => {
            let sock = std::os::unix::net::UnixDatagram::bind_addr(&abstract_addr(name)?)
                .map_err(|e| format!("bind {name}: {e}"))?;
            *inbox() = Some(sock);
            "ok".into()
        }
        ["pass-held", name] => {
            let sock =
                std::os::unix::net::UnixDatagram::unbound().map_err(|e| format!("socket: {e}"))?;
            sock.connect_addr(&abstract_addr(name)?)
                .map_err(|e| format!("connect {name}: {e}"))?;
            let tcp: Vec<OwnedFd> = held().drain(..).collect();
            let udp: Vec<OwnedFd> = held_udp().drain(..).collect();
            let mut fds = Vec::new();
            let mut kinds = Vec::new();
            for s in &tcp {
                fds.push(s.as_raw_fd());
                kinds.push(b't');
            }
            for s in &udp {
                fds.push(s.as_raw_fd());
                kinds.push(b'u');
            }
            pass_fds(&sock, &fds, &kinds)
        }
        ["take-passed"] => {
            let got = take_fds(inbox().as_ref().ok_or("no fd-inbox")?)?;
            let n = got.len();
            for (kind, fd) in got {
                if kind == b't' {
                    held().push(fd);
                } else {
                    held_udp().push(fd);
                }
            }
            format!("ok {n}")
        }
        ["hide-in-ring"] => {
            static RINGS: std::sync::Mutex<Vec<io_uring::IoUring>> =
                std::sync::Mutex::new(Vec::new());
            let ring = io_uring::IoUring::new(4).map_err(|e| format!("io_uring: {e}"))?;
            let held: Vec<OwnedFd> = held_udp().drain(..).collect();
            let fds: Vec<i32> = held.iter().map(AsRawFd::as_raw_fd).collect();
            ring.submitter()
                .register_files(&fds)
                .map_err(|e| format!("register_files: {e}"))?;
            drop(held);
            RINGS.lock().expect("rings").push(ring);
            "ok".into()
        }
        ["packet-ring"] => {
            let s = new_socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let req = libc::tpacket_req {
                tp_block_size: 4096,
                tp_block_nr: 1,
                tp_frame_size: 2048,
                tp_frame_nr: 2,
            };
            // SAFETY: valid fd and option value of its size.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_RX_RING,
                    (&raw const req).cast(),
                    std::mem::size_of_val(&req) as u32,
                )
            };
            if rc < 0 {
                return Ok(format!("err {}", errno_name(last_err())));
            }
            // SAFETY: maps the ring the kernel made; the mapping outlives the descriptor.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    s.as_raw_fd(),
                    0,
                )
            };
            if map == libc::MAP_FAILED {
                return Ok(format!("err {}", errno_name(last_err())));
            }
            drop(s);
            "ok".into()
        }
        ["raw-keep"] => match new_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) {
            Ok(fd) => {
                kept().push((libc::SOCK_RAW, fd));
                "ok".into()
            }
            Err(e) => format!("err {}", errno_name(e)),
        },
        ["raw-send-tcp", ip, port] => {
            let addr = sa(ip, port)?;
            let k = kept();
            let (_, s) = k
                .iter()
                .find(|(t, _)| *t == libc::SOCK_RAW)
                .ok_or("no kept raw socket")?;
            // A TCP header (source port 40000, PSH|ACK) and a payload, made by hand.
            let mut seg = vec![0u8; 20];
            seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
            seg[2..4].copy_from_slice(&addr.port().to_be_bytes());
            seg[12] = 5 << 4;
            seg[13] = 0x18;
            seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
            seg.extend_from_slice(b"raw");
            sendto_bytes(s, addr, &seg)
        }
        ["send-held-tcp"] => {
            let mut reply = "ok".to_owned();
            for s in held().iter() {
                // SAFETY: valid fd and buffer.
                let n = unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        b"held".as_ptr().cast(),
                        4,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    reply = format!("err {}", errno_name(last_err()));
                }
            }
            reply
        }
        ["rthdr", proto, ip, port, via] => {
            let (ty, p) = kind(proto)?;
            let dest = v6(ip)?;
            let addr = sa(ip, port)?;
            let s = new_socket(libc::AF_INET6, ty, p)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            if let Err(e) = setsockopt_bytes(
                &s,
                libc::IPPROTO_IPV6,
                libc::IPV6_RTHDR,
                &srh(&[dest, v6(via)?]),
            ) {
                return Ok(format!("setsockopt {}", errno_name(e)));
            }
            if ty == libc::SOCK_DGRAM {
                sendto_one(&s, addr)
            } else {
                // SAFETY: valid fd.
                unsafe {
                    let fl = libc::fcntl(s.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(s.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
                let (ss, len) = sockaddr(addr);
                // SAFETY: valid fd and address.
                let r = unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) };
                let reply = if r < 0 {
                    format!("err {}", errno_name(last_err()))
                } else {
                    "ok".into()
                };
                // Kept: the kernel retransmits the SYN from it.
                held().push(s);
                reply
            }
        }
        ["rthdr-cmsg", which, ip, port, via] => {
            let dest = v6(ip)?;
            let hdr = match *which {
                "srh" => srh(&[dest, v6(via)?]),
                "type2" => rthdr2(v6(via)?),
                other => return Err(format!("bad header kind {other}")),
            };
            sendmsg_cmsg(sa(ip, port)?, libc::IPV6_RTHDR, &hdr)?
        }
        // One datagram sent with IPV6_PKTINFO asking for source `src`.
        ["pktinfo6", src, ip, port] => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6(src)?.octets(),
                },
                ipi6_ifindex: 0,
            };
            // SAFETY: in6_pktinfo is plain data; viewed as its bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&raw const info).cast::<u8>(),
                    mem::size_of::<libc::in6_pktinfo>(),
                )
            };
            sendmsg_cmsg(sa(ip, port)?, libc::IPV6_PKTINFO, bytes)?
        }
        ["ipopt", which, ip, port, via] => {
            let addr = sa(ip, port)?;
            let via: std::net::Ipv4Addr =
                via.parse().map_err(|e| format!("bad IPv4 address: {e}"))?;
            let opts: Vec<u8> = match *which {
                // Loose source route: type 131, length 7, pointer 4, one hop; then padding.
                "lsrr" => {
                    let mut o = vec![131u8, 7, 4];
                    o.extend_from_slice(&via.octets());
                    o.push(1);
                    o
                }
                // Record route with room for one address, then padding.
                "rr" => vec![7u8, 7, 4, 0, 0, 0, 0, 1],
                other => return Err(format!("bad option kind {other}")),
            };
            let s = new_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            if let Err(e) = setsockopt_bytes(&s, libc::IPPROTO_IP, libc::IP_OPTIONS, &opts) {
                return Ok(format!("setsockopt {}", errno_name(e)));
            }
            sendto_one(&s, addr)
        }
        // A datagram to ip:port from `src`, an address this host does not hold, with the
        // option that allows binding one (IP_FREEBIND / IPV6_FREEBIND). Answers the first
        // step that fails.
        ["spoof", src, ip, port] => {
            let addr = sa(ip, port)?;
            let from = sa(src, "0")?;
            let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let (level, name) = if addr.is_ipv4() {
                (libc::IPPROTO_IP, libc::IP_FREEBIND)
            } else {
                (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
            };
            if let Err(e) = setsockopt_bytes(&s, level, name, &1i32.to_ne_bytes()) {
                return Ok(format!("setsockopt {}", errno_name(e)));
            }
            let (ss, len) = sockaddr(from);
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                return Ok(format!("bind {}", errno_name(last_err())));
            }
            sendto_one(&s, addr)
        }
        // The same, with the option set through the 32-bit system call gate (`int 0x80`),
        // which the kernel's cgroup setsockopt hook does not see.
        ["spoof32", src, ip, port] => {
            let addr = sa(ip, port)?;
            let from = sa(src, "0")?;
            let s = new_socket(family(&addr), libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let (level, name) = if addr.is_ipv4() {
                (libc::IPPROTO_IP, libc::IP_FREEBIND)
            } else {
                (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
            };
            let rc = compat_setsockopt(s.as_raw_fd(), level, name, 1);
            if rc < 0 {
                return Ok(format!("setsockopt {}", errno_name(-rc)));
            }
            let (ss, len) = sockaddr(from);
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ss).cast(), len) } < 0 {
                return Ok(format!("bind {}", errno_name(last_err())));
            }
            sendto_one(&s, addr)
        }
        // A connect the hook allows and the kernel then fails at once, on a socket that then
        // listens on `lport`: `mismatch` gives an AF_INET socket an address whose family
        // field says AF_INET6, `v6only` connects an IPV6_V6ONLY socket to an IPv4-mapped
        // address.
        ["listen-after-failed-connect", how, ip, port, lport] => {
            let addr = sa(ip, port)?;
            let lport: u16 = lport.parse().map_err(|e| format!("bad port: {e}"))?;
            let (fam, any): (i32, IpAddr) = match *how {
                "mismatch" => (libc::AF_INET, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                "v6only" => (libc::AF_INET6, IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
                other => return Err(format!("bad trick {other}")),
            };
            let s = new_socket(fam, libc::SOCK_STREAM, libc::IPPROTO_TCP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let (mut ss, len) = match (*how, addr) {
                ("v6only", SocketAddr::V4(v4)) => {
                    setsockopt_bytes(
                        &s,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        &1i32.to_ne_bytes(),
                    )
                    .map_err(|e| format!("v6only: {}", errno_name(e)))?;
                    sockaddr(SocketAddr::new(
                        IpAddr::V6(v4.ip().to_ipv6_mapped()),
                        v4.port(),
                    ))
                }
                _ => sockaddr(addr),
            };
            if *how == "mismatch" {
                ss.ss_family = libc::AF_INET6 as u16;
            }
            // SAFETY: valid fd and address buffer.
            let rc = unsafe { libc::connect(s.as_raw_fd(), (&raw const ss).cast(), len) };
            let connect = if rc < 0 {
                errno_name(last_err())
            } else {
                "connected".into()
            };
            let (ls, llen) = sockaddr(SocketAddr::new(any, lport));
            // SAFETY: valid fd and address.
            if unsafe { libc::bind(s.as_raw_fd(), (&raw const ls).cast(), llen) } < 0 {
                return Ok(format!(
                    "connect {connect}; bind {}",
                    errno_name(last_err())
                ));
            }
            // SAFETY: valid fd.
            if unsafe { libc::listen(s.as_raw_fd(), 16) } < 0 {
                return Ok(format!(
                    "connect {connect}; listen {}",
                    errno_name(last_err())
                ));
            }
            keep.push(s);
            format!("connect {connect}; listening")
        }
        // Whether the ICMP error queue may be opened on a UDP socket of this family; `long`
        // passes the value in a buffer of two pages (the kernel reads its first int).
        ["recverr", fam, size] => {
            let f = match *fam {
                "inet" => libc::AF_INET,
                "inet6" => libc::AF_INET6,
                other => return Err(format!("bad family {other}")),
            };
            let s = new_socket(f, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            match recverr(&s, *size == "long") {
                Ok(true) => "ok on".into(),
                Ok(false) => "ok off".into(),
                Err(e) => format!("setsockopt {}", errno_name(e)),
            }
        }
        // Turns the error queue on for every held UDP socket: "ok on" if any was left on.
        ["recverr-held"] => {
            let mut on = false;
            for s in held_udp().iter() {
                on |= recverr(s, false).map_err(|e| format!("setsockopt {}", errno_name(e)))?;
            }
            if on { "ok on".into() } else { "ok off".into() }
        }
        // The same through the 32-bit system call gate (`int 0x80`), which the cgroup
        // setsockopt hook does not see: "ok on" if any was left on.
        ["recverr32-held"] => {
            let mut on = false;
            for s in held_udp().iter() {
                let (level, name) = if socket_family(s) == libc::AF_INET6 {
                    (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
                } else {
                    (libc::IPPROTO_IP, libc::IP_RECVERR)
                };
                let rc = compat_setsockopt(s.as_raw_fd(), level, name, 1);
                if rc < 0 {
                    return Ok(format!("setsockopt {}", errno_name(-rc)));
                }
                on |= getsockopt_int(s, level, name) != 0;
            }
            if on { "ok on".into() } else { "ok off".into() }
        }
        ["errqueue", fam] => {
            let f = match *fam {
                "inet" => libc::AF_INET,
                "inet6" => libc::AF_INET6,
                other => return Err(format!("bad family {other}")),
            };
            let s = new_socket(f, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let mut buf = [0u8; 256];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: a zeroed msghdr is valid; it points at one live iovec.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: valid fd and message header.
            let n = unsafe {
                libc::recvmsg(
                    s.as_raw_fd(),
                    &raw mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                format!("ok {n}")
            }
        }
        ["ip6opt", which, ip, port] => {
            let name = match *which {
                "hop" => libc::IPV6_HOPOPTS,
                "dst" => libc::IPV6_DSTOPTS,
                other => return Err(format!("bad option kind {other}")),
            };
            let addr = sa(ip, port)?;
            let s = new_socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            // Next header (filled by the kernel), length 0 (8 bytes), PadN of 4 bytes.
            let h = [0u8, 0, 1, 4, 0, 0, 0, 0];
            if let Err(e) = setsockopt_bytes(&s, libc::IPPROTO_IPV6, name, &h) {
                return Ok(format!("setsockopt {}", errno_name(e)));
            }
            sendto_one(&s, addr)
        }
        // Held sockets with nothing to read, no end and no error (alive), and the others.
        // Asked with poll, which no hook refuses (a read can be refused to a revoked task
        // whatever the connection's state).
        ["held"] => {
            let (mut alive, mut closed) = (0, 0);
            for s in held().iter() {
                let mut pfd = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; no wait.
                let n = unsafe { libc::poll(&raw mut pfd, 1, 0) };
                if n == 0 {
                    alive += 1;
                } else {
                    closed += 1;
                }
            }
            format!("alive={alive} closed={closed}")
        }
        // A read of each held socket (TCP and UDP) that waits for nothing and takes nothing:
        // `ok` unless one was refused or failed otherwise than with nothing to read.
        ["peek-held"] => {
            let mut reply = "ok".to_owned();
            let (tcp, udp) = (held(), held_udp());
            for s in tcp.iter().chain(udp.iter()) {
                let mut b = [0u8; 1];
                // SAFETY: valid fd and buffer.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        b.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 && last_err() != libc::EAGAIN {
                    reply = format!("err {}", errno_name(last_err()));
                }
            }
            reply
        }
        ["bench-proxy", pip, pport, ip, port, n] => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            bench_proxy(sa(pip, pport)?, sa(ip, port)?, n)?
        }
        [
            cmd @ ("bench-sendto" | "bench-sendto-out" | "bench-send" | "bench-send-out"),
            ip,
            port,
            n,
            size @ ..,
        ] if size.len() <= 1 => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            let size: usize = match size {
                [s] => s.parse().map_err(|e| format!("bad size: {e}"))?,
                _ => 1,
            };
            let sink = !cmd.ends_with("-out");
            if cmd.starts_with("bench-sendto") {
                bench_sendto(sa(ip, port)?, n, size, sink)?
            } else {
                bench_send(sa(ip, port)?, n, size, sink)?
            }
        }
        ["send-bulk", ip, port, mib] => {
            use std::io::Write as _;
            let mib: usize = mib.parse().map_err(|e| format!("bad size: {e}"))?;
            match std::net::TcpStream::connect(sa(ip, port)?) {
                Ok(mut c) => {
                    let chunk = vec![0u8; 1 << 16];
                    let mut reply = "ok".to_owned();
                    for _ in 0..mib * 16 {
                        if let Err(e) = c.write_all(&chunk) {
                            reply = format!("err {}", errno_name(e.raw_os_error().unwrap_or(0)));
                            break;
                        }
                    }
                    reply
                }
                Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
            }
        }
        ["bench-bulk", ip, port, mib] => {
            let mib: usize = mib.parse().map_err(|e| format!("bad size: {e}"))?;
            bench_bulk(sa(ip, port)?, mib)?
        }
        ["bench-hello", ip, port, name, n] => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            bench_hello(sa(ip, port)?, name, n, keep)?
        }
        ["bench-bulk-hello", ip, port, name, mib] => {
            let mib: usize = mib.parse().map_err(|e| format!("bad size: {e}"))?;
            bench_bulk_hello(sa(ip, port)?, name, mib)?
        }
        ["bench-udp", ip, port, n] => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            bench_udp(sa(ip, port)?, n)?
        }
        ["bench-connect-block", ip, port, n] => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            let addr = sa(ip, port)?;
            pin_to_last_cpu()?;
            listen_once(addr, keep)?;
            let samples = connect_samples(addr, n)?;
            let mut out = String::from("samples=");
            for (i, ns) in samples.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&ns.to_string());
            }
            out
        }
        ["bench-connect", ip, port, n] => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            bench_connect(sa(ip, port)?, n, keep)?
        }
        ["resolve", name, server, mode, ty] => resolve(name, server, mode, ty)?,
        ["gai", name] => gai(name),
        ["uring-connect", ip, port] => uring(sa(ip, port)?, false)?,
        ["uring-sendmsg", ip, port] => uring(sa(ip, port)?, true)?,
        ["write", path, text] => match std::fs::write(path, text) {
            Ok(()) => "ok".into(),
            Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
        },
        ["mkdir", path] => match std::fs::create_dir(path) {
            Ok(()) => "ok".into(),
            Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
        },
        ["connect-unix", path] => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => "ok".into(),
            Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
        },
        ["fork-storm", n, "tcp", ip, port] => {
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            fork_storm(n, sa(ip, port)?)
        }
        ["recv-socket", path] => recv_socket(path)?,
        ["send-socket", path] => send_socket(path)?,
        // Its own stdin: what another process's descriptors would take, with no ptrace
        // permission in the way.
        // SAFETY: getpid has no arguments.
        ["pidfd-getfd-self"] => pidfd_getfd(unsafe { libc::getpid() }, 0, false),
        [take @ ("pidfd-getfd" | "take-fd"), pid, fd] => pidfd_getfd(
            pid.parse().map_err(|_| format!("bad pid {pid}"))?,
            fd.parse().map_err(|_| format!("bad descriptor {fd}"))?,
            *take == "take-fd",
        ),
        ["fork-sharing-files"] => fork_sharing_files(),
        ["fork-hopping-sharer"] => fork_hopping_sharer(),
        ["sharers-hop", secs] => {
            sharers_hop(secs.parse().map_err(|_| format!("bad seconds {secs}"))?)?
        }
        ["sharers-stop"] => sharers_stop()?,
        ["ring-hop", secs] => ring_hop(secs.parse().map_err(|_| format!("bad seconds {secs}"))?),
        ["sharing-leader-exits"] => sharing_leader_exits()?,
        ["catch-rt"] => catch_rt(),
        ["hold-null", n] => hold_null(n.parse().map_err(|_| format!("bad count {n}"))?),
        ["hold-ring-lock", fd] => {
            hold_ring_lock(fd.parse().map_err(|_| format!("bad descriptor {fd}"))?)?
        }
        ["release-ring-lock"] => release_ring_lock()?,
        ["keep-ring", how @ ("registered" | "registered-open")] => {
            let open = *how == "registered-open";
            // Raw calls: the crate maps every ring it makes, and registers no ring with a
            // task. With `IORING_SETUP_NO_MMAP` (Linux 6.5) the ring's memory would be the
            // process's own, and it could submit through it too.
            let udp = new_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
                .map_err(|e| format!("socket: {}", errno_name(e)))?;
            let mut params = [0u32; 30];
            // SAFETY: io_uring_setup with a zeroed `struct io_uring_params` (120 bytes).
            let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            if ring < 0 {
                return Ok(format!("err io_uring_setup {}", errno_name(last_err())));
            }
            let ring = ring as i32;
            let files = [udp.as_raw_fd()];
            // `struct io_uring_rsrc_update`: offset (a slot of its own for each kind), resv,
            // data (the ring's descriptor).
            let update: [u64; 2] = [u64::from(open), ring as u64];
            // SAFETY: io_uring_register with arrays of the lengths given.
            let (registered, kept) = unsafe {
                (
                    if open {
                        0
                    } else {
                        libc::syscall(libc::SYS_io_uring_register, ring, 2, files.as_ptr(), 1)
                    },
                    libc::syscall(libc::SYS_io_uring_register, ring, 20, update.as_ptr(), 1),
                )
            };
            if registered < 0 || kept != 1 {
                return Ok(format!("err io_uring_register {registered} {kept}"));
            }
            if open {
                // SAFETY: the ring's new descriptor, owned from here.
                KEPT_FDS
                    .lock()
                    .expect("kept")
                    .push(unsafe { OwnedFd::from_raw_fd(ring) });
                return Ok(format!("ok {ring}"));
            }
            // SAFETY: the ring's descriptor, which nothing uses from here.
            unsafe { libc::close(ring) };
            "ok -".into()
        }
        ["keep-ring", how @ ..] => {
            let mut b = io_uring::IoUring::builder();
            match how {
                [] => {}
                ["sqpoll"] => {
                    // Idle for a minute: the thread stays, asleep, as long as the ring.
                    b.setup_sqpoll(60_000);
                }
                ["sparse" | "pipe" | "hidden"] => {}
                _ => return Err(format!("bad ring kind {how:?}")),
            }
            let ring = b.build(4).map_err(|e| format!("io_uring: {e}"))?;
            match how {
                // A registered file table with empty slots (liburing's direct descriptors).
                ["sparse"] => ring
                    .submitter()
                    .register_files_sparse(4)
                    .map_err(|e| format!("register sparse: {e}"))?,
                // A pipe registered (splice-style programs), its ends kept.
                ["pipe"] => {
                    let mut ends = [0; 2];
                    // SAFETY: pipe2 with an array of two.
                    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                        return Ok(format!("err pipe {}", errno_name(last_err())));
                    }
                    ring.submitter()
                        .register_files(&ends)
                        .map_err(|e| format!("register pipe: {e}"))?;
                    let mut kept = KEPT_FDS.lock().expect("kept");
                    // SAFETY: the pipe's new descriptors, owned from here.
                    kept.extend(ends.map(|e| unsafe { OwnedFd::from_raw_fd(e) }));
                }
                // A socket held through a ring that no descriptor shows: the mapping keeps
                // the ring (and what it holds) alive.
                ["hidden"] => {
                    let udp = new_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
                        .map_err(|e| format!("socket: {}", errno_name(e)))?;
                    ring.submitter()
                        .register_files(&[udp.as_raw_fd()])
                        .map_err(|e| format!("register: {e}"))?;
                    let fd = ring.as_raw_fd();
                    std::mem::forget(ring);
                    // SAFETY: the ring's descriptor, which nothing uses from here.
                    unsafe { libc::close(fd) };
                    return Ok("ok -".into());
                }
                _ => {}
            }
            let fd = ring.as_raw_fd();
            KEPT_RINGS.lock().expect("rings").push(ring);
            format!("ok {fd}")
        }
        ["seccomp-listener"] => {
            // A filter that allows everything, asking for a listener: whoever holds one can
            // install files in this process (SECCOMP_IOCTL_NOTIF_ADDFD).
            let allow = [libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            }];
            let prog = libc::sock_fprog {
                len: 1,
                filter: allow.as_ptr().cast_mut(),
            };
            // SAFETY: prctl with integers; seccomp with a filter that outlives the call.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Ok(format!("err no_new_privs {}", errno_name(last_err())));
                }
                let fd = libc::syscall(libc::SYS_seccomp, 1, 1 << 3, &raw const prog);
                if fd < 0 {
                    format!("err {}", errno_name(last_err()))
                } else {
                    libc::close(fd as i32);
                    "ok".into()
                }
            }
        }
        ["uring-calls"] => {
            let setup = match io_uring::IoUring::new(4) {
                Ok(_) => "ok".to_owned(),
                Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
            };
            // On no ring at all: a filter answers before the kernel looks at the descriptor
            // (which would be EBADF).
            let answer = |rc: libc::c_long| {
                if rc < 0 {
                    errno_name(last_err())
                } else {
                    "ok".to_owned()
                }
            };
            // SAFETY: both calls on descriptor -1 with no arguments read no memory.
            let (enter, register) = unsafe {
                (
                    answer(libc::syscall(
                        libc::SYS_io_uring_enter,
                        -1,
                        0,
                        0,
                        0,
                        std::ptr::null::<libc::c_void>(),
                        0,
                    )),
                    answer(libc::syscall(
                        libc::SYS_io_uring_register,
                        -1,
                        0,
                        std::ptr::null::<libc::c_void>(),
                        0,
                    )),
                )
            };
            format!("setup={setup} enter={enter} register={register}")
        }
        ["connect-received", ip, port] => {
            let fd = received()?;
            let (ss, len) = sockaddr(sa(ip, port)?);
            // SAFETY: a valid fd and address.
            let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const ss).cast(), len) };
            if rc < 0 {
                format!("err {}", errno_name(last_err()))
            } else {
                "ok".into()
            }
        }
        ["bench-dns", server, n, qps, names] => {
            let parse = |v: &str| v.parse::<u64>().map_err(|e| format!("bad number {v}: {e}"));
            bench_dns(server, parse(n)?, parse(qps)?, parse(names)?)?
        }
        ["dns-garbage", server] => {
            let to = SocketAddr::new(server.parse().map_err(|e| format!("bad address: {e}"))?, 53);
            let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            // Header with one question whose name is a pointer to itself.
            let looped = [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1,
            ];
            s.send_to(&looped, to).map_err(|e| e.to_string())?;
            s.send_to(&[0u8; 5000], to).map_err(|e| e.to_string())?;
            "sent".into()
        }
        ["spawn", program, args @ ..] => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args).stdin(std::process::Stdio::null());
            exit_answer(cmd, program)?
        }
        ["spawn-on-ring", program, args @ ..] => {
            // As `spawn`, with an io_uring instance (an SQPOLL one: its thread does the ring's
            // work without io_uring_enter) as the child's standard input.
            let ring: io_uring::IoUring = io_uring::IoUring::builder()
                .setup_sqpoll(20_000)
                .build(4)
                .map_err(|e| format!("io_uring: {e}"))?;
            // SAFETY: the ring's descriptor is live while `ring` is.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ring.as_raw_fd()) }
                .try_clone_to_owned()
                .map_err(|e| format!("dup: {e}"))?;
            let mut cmd = std::process::Command::new(program);
            cmd.args(args).stdin(std::process::Stdio::from(fd));
            exit_answer(cmd, program)?
        }
        ["spawn-seccomp-faked", program, args @ ..] => {
            // As `spawn`, under a filter that answers seccomp() with 0 without running it:
            // a parent that would have its child believe a filter was installed.
            use std::os::unix::process::CommandExt as _;
            let ret = (libc::BPF_RET | libc::BPF_K) as u16;
            let fake = [
                libc::sock_filter {
                    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_seccomp as u32,
                },
                libc::sock_filter {
                    code: ret,
                    jt: 0,
                    jf: 0,
                    k: 0x0005_0000,
                },
                libc::sock_filter {
                    code: ret,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                },
            ];
            let mut cmd = std::process::Command::new(program);
            cmd.args(args).stdin(std::process::Stdio::null());
            // SAFETY: only prctl and seccomp between fork and exec, on memory the child has.
            unsafe {
                cmd.pre_exec(move || {
                    let prog = libc::sock_fprog {
                        len: fake.len() as u16,
                        filter: fake.as_ptr().cast_mut(),
                    };
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || libc::syscall(libc::SYS_seccomp, 1, 0, &raw const prog) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            exit_answer(cmd, program)?
        }
        ["send-ring", path] => {
            let ring = io_uring::IoUring::new(4).map_err(|e| format!("io_uring: {e}"))?;
            send_fd(path, ring.as_raw_fd())?
        }
        ["spawn-many", n, program, args @ ..] => {
            // N children left running (until this probe's cgroup is killed).
            let n: usize = n.parse().map_err(|e| format!("bad count: {e}"))?;
            for _ in 0..n {
                let child = std::process::Command::new(program)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| format!("spawning {program}: {e}"))?;
                spawned().push(child);
            }
            format!("spawned {n}")
        }
        // How `spawn-many`'s children are doing: "alive=N exited=M" and the first exit status.
        ["children"] => {
            let (mut alive, mut exited, mut first) = (0, 0, None);
            for c in spawned().iter_mut() {
                match c.try_wait() {
                    Ok(None) => alive += 1,
                    Ok(Some(status)) => {
                        exited += 1;
                        first.get_or_insert(status.to_string());
                    }
                    Err(e) => return Ok(format!("err {e}")),
                }
            }
            match first {
                Some(f) => format!("alive={alive} exited={exited} first: {f}"),
                None => format!("alive={alive} exited={exited}"),
            }
        }
        _ => return Err(format!("unknown command: {line}")),
    })
}

/// Submits `sqe` alone on `ring` and waits for its completion.
///
/// # Safety
/// Every buffer `sqe` points at must live until the completion (and, for a zero-copy send,
/// its notification) is reaped.
/// Rings `keep-ring` made, kept open until exit.
static KEPT_RINGS: std::sync::Mutex<Vec<io_uring::IoUring>> = std::sync::Mutex::new(Vec::new());

/// The child `fork-sharing-files` made: the pipe that tells it to go on, the pipe it answers
/// on.
static SHARING_CHILD: std::sync::Mutex<Option<(RawFd, RawFd)>> = std::sync::Mutex::new(None);

/// Clones a child sharing this process's descriptor table (`CLONE_FILES`), killed when this
/// process dies: 0 in the child, its pid (or -1) in this process.
///
/// # Safety
/// Behaves as fork: the child must make only async-signal-safe calls until it exits.
unsafe fn clone_sharing_files() -> libc::c_long {
    // SAFETY: as the caller promises.
    unsafe {
        let parent = libc::getpid();
        let child = libc::syscall(
            libc::SYS_clone,
            libc::CLONE_FILES | libc::SIGCHLD,
            0,
            0,
            0,
            0,
        );
        if child == 0 {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::syscall(libc::SYS_exit_group, 1);
            }
        }
        child
    }
}

/// A child cloned with `CLONE_FILES` (it shares this process's descriptor table), which waits
/// to be told to start a thread and end its leader (`sharing-leader-exits`): a thread of a
/// process whose leader is gone, sharing the table. `ok PID`.
fn fork_sharing_files() -> String {
    let (mut go, mut back) = ([0; 2], [0; 2]);
    // SAFETY: pipe2 with arrays of two; clone without a new stack behaves as fork. The child
    // makes only system calls (async-signal-safe) until it exits, and its thread runs on a
    // stack of its own mapped for it, calling nothing but pause.
    unsafe {
        if libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) != 0
            || libc::pipe2(back.as_mut_ptr(), libc::O_CLOEXEC) != 0
        {
            return format!("err pipe {}", errno_name(last_err()));
        }
        let child = clone_sharing_files();
        if child == 0 {
            let mut byte = 0u8;
            if libc::read(go[0], (&raw mut byte).cast(), 1) != 1 {
                libc::syscall(libc::SYS_exit_group, 1);
            }
            extern "C" fn sleep_forever(_: *mut libc::c_void) -> libc::c_int {
                loop {
                    // SAFETY: pause has no arguments.
                    unsafe { libc::syscall(libc::SYS_pause) };
                }
            }
            let stack = libc::mmap(
                std::ptr::null_mut(),
                1 << 16,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            let tid = libc::clone(
                sleep_forever,
                stack.cast::<u8>().add(1 << 16).cast(),
                libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_SYSVSEM,
                std::ptr::null_mut(),
            );
            libc::write(back[1], (&raw const tid).cast(), 4);
            // The leader alone: the thread lives on.
            libc::syscall(libc::SYS_exit, 0);
        }
        if child < 0 {
            return format!("err {}", errno_name(last_err()));
        }
        *SHARING_CHILD.lock().expect("sharing child") = Some((go[1], back[0]));
        format!("ok {child}")
    }
}

/// The `fork-hopping-sharer` child: the pipe that tells it to start the chain, the pipe it
/// answers on, and the descriptor whose close in the shared table ends the chain.
static HOPPING: std::sync::Mutex<Option<(RawFd, RawFd, RawFd)>> = std::sync::Mutex::new(None);

/// A child sharing this process's descriptor table that, told to (`sharers-hop`), clones a
/// process sharing it too, then takes a copy of its own: from there the sharers are a chain, each cloning the next
/// (`CLONE_PARENT`, so all are the child's, which reaps them by ignoring SIGCHLD) and exiting
/// at once, until the marker descriptor is closed in the shared table or the seconds
/// `sharers-hop` gives have passed.
/// No sharer lives longer than one clone. `ok PID`.
fn fork_hopping_sharer() -> String {
    let (mut go, mut back, mut marker) = ([0; 2], [0; 2], [0; 2]);
    // SAFETY: pipe2 with arrays of two; clone without a new stack behaves as fork. The child
    // and its clones make only system calls (async-signal-safe) until they exit.
    unsafe {
        if libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) != 0
            || libc::pipe2(back.as_mut_ptr(), libc::O_CLOEXEC) != 0
            || libc::pipe2(marker.as_mut_ptr(), libc::O_CLOEXEC) != 0
        {
            return format!("err pipe {}", errno_name(last_err()));
        }
        let child = clone_sharing_files();
        if child == 0 {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            let mut limit = 0i64;
            if libc::read(go[0], (&raw mut limit).cast(), 8) != 8 {
                libc::syscall(libc::SYS_exit_group, 1);
            }
            let mut start = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut start);
            // The first sharer takes the parent's table from this child, which then takes a
            // copy of its own and shares nothing.
            let first = libc::syscall(
                libc::SYS_clone,
                libc::CLONE_FILES | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            );
            if first == 0 {
                loop {
                    let mut now = start;
                    libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now);
                    if libc::fcntl(marker[0], libc::F_GETFD) < 0
                        || now.tv_sec - start.tv_sec > limit
                    {
                        libc::syscall(libc::SYS_exit, 0);
                    }
                    let next = libc::syscall(
                        libc::SYS_clone,
                        libc::CLONE_FILES | libc::CLONE_PARENT | libc::SIGCHLD,
                        0,
                        0,
                        0,
                        0,
                    );
                    if next != 0 {
                        // This one's turn is over (or the clone failed: the chain ends).
                        libc::syscall(libc::SYS_exit, 0);
                    }
                }
            }
            if first < 0 || libc::unshare(libc::CLONE_FILES) != 0 {
                libc::syscall(libc::SYS_exit_group, 1);
            }
            libc::write(back[1], (&raw const first).cast(), 8);
            // Children ignored: wait returns once the last sharer has gone.
            while libc::wait4(-1, std::ptr::null_mut(), libc::__WALL, std::ptr::null_mut()) >= 0
                || last_err() == libc::EINTR
            {}
            libc::syscall(libc::SYS_exit_group, 0);
        }
        if child < 0 {
            return format!("err {}", errno_name(last_err()));
        }
        *HOPPING.lock().expect("hopping") = Some((go[1], back[0], marker[0]));
        format!("ok {child}")
    }
}

/// A chain of processes holding one io_uring instance for `secs` seconds: a child of this
/// process (which reaps the chain by ignoring SIGCHLD, and holds no ring) forks the first,
/// which makes the ring; from there each forks the next (`CLONE_PARENT`) and exits at once.
/// Only the first has an io_uring context (a fork clears it), and no listing of processes
/// made before a reading holds the one alive at it, unless the chain is frozen. `ok` once
/// the ring is made.
fn ring_hop(secs: i64) -> String {
    let mut back = [0; 2];
    // SAFETY: pipe2 with an array of two; clone without a new stack behaves as fork. The
    // children make only system calls (async-signal-safe) until they exit.
    unsafe {
        if libc::pipe2(back.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return format!("err pipe {}", errno_name(last_err()));
        }
        let reaper = libc::fork();
        if reaper == 0 {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            let mut start = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut start);
            let first = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
            if first == 0 {
                let mut params = [0u32; 30];
                let mut ring = libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr());
                if ring < 0 {
                    ring = -i64::from(last_err());
                }
                libc::write(back[1], (&raw const ring).cast(), 8);
                if ring < 0 {
                    libc::syscall(libc::SYS_exit, 1);
                }
                loop {
                    let mut now = start;
                    libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now);
                    if now.tv_sec - start.tv_sec > secs {
                        libc::syscall(libc::SYS_exit, 0);
                    }
                    let next = libc::syscall(
                        libc::SYS_clone,
                        libc::CLONE_PARENT | libc::SIGCHLD,
                        0,
                        0,
                        0,
                        0,
                    );
                    if next != 0 {
                        // This one's turn is over (or the clone failed: the chain ends).
                        libc::syscall(libc::SYS_exit, 0);
                    }
                }
            }
            if first < 0 {
                libc::syscall(libc::SYS_exit_group, 1);
            }
            libc::close(back[1]);
            // Children ignored: wait returns once the last of the chain has gone.
            while libc::wait4(-1, std::ptr::null_mut(), libc::__WALL, std::ptr::null_mut()) >= 0
                || last_err() == libc::EINTR
            {}
            libc::syscall(libc::SYS_exit_group, 0);
        }
        libc::close(back[1]);
        if reaper < 0 {
            libc::close(back[0]);
            return format!("err fork {}", errno_name(last_err()));
        }
        let mut ring = -1i64;
        let read = libc::read(back[0], (&raw mut ring).cast(), 8);
        libc::close(back[0]);
        if read != 8 {
            return "err the chain's first process".into();
        }
        if ring < 0 {
            return format!("err io_uring_setup {}", errno_name(-ring as i32));
        }
        "ok".into()
    }
}

/// Tells the `fork-hopping-sharer` child to start its chain: `ok` once it has.
fn sharers_hop(secs: i64) -> Result<String, String> {
    let (go, back, _) = HOPPING
        .lock()
        .expect("hopping")
        .ok_or("no hopping sharer")?;
    let mut first = 0i64;
    // SAFETY: eight bytes written from, and eight read into, values that live across the
    // calls.
    let read = unsafe {
        libc::write(go, (&raw const secs).cast(), 8);
        libc::read(back, (&raw mut first).cast(), 8)
    };
    if read != 8 || first <= 0 {
        return Ok(format!("err the first sharer: {first}"));
    }
    Ok("ok".into())
}

/// Ends the chain: closes the marker in the shared table, which each sharer checks.
fn sharers_stop() -> Result<String, String> {
    let (_, _, marker) = HOPPING
        .lock()
        .expect("hopping")
        .take()
        .ok_or("no hopping sharer")?;
    // SAFETY: closing a descriptor this process made and no one else uses.
    unsafe { libc::close(marker) };
    Ok("ok".into())
}

/// Opens `/dev/null` up to `n` times, as many as the descriptor limit leaves room for, and
/// keeps the descriptors (a scan of the probe's descriptors then takes a while): `ok COUNT`.
fn hold_null(n: usize) -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get and set this process's descriptor limit through a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        // Root with CAP_SYS_RESOURCE may raise the hard limit; else up to it.
        let want = n as u64 + 256;
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            lim = raised;
        } else {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let room = usize::try_from(lim.rlim_cur.saturating_sub(256)).unwrap_or(usize::MAX);
    let count = n.min(room);
    for _ in 0..count {
        match std::fs::File::open("/dev/null") {
            Ok(f) => std::mem::forget(f),
            Err(e) => return format!("err open {e}"),
        }
    }
    format!("ok {count}")
}

/// Catches SIGRTMIN with a handler that does nothing (its default ends the process): each one
/// sent wakes the probe, frozen or not, as a timer's or a peer's signal would.
fn catch_rt() -> String {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a zeroed sigaction with a handler that touches nothing.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
        act.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGRTMIN(), &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return format!("err sigaction {}", errno_name(last_err()));
    }
    "ok".into()
}

/// Tells the `fork-sharing-files` child to start its thread and end its leader: `ok TID`.
fn sharing_leader_exits() -> Result<String, String> {
    let (go, back) = SHARING_CHILD
        .lock()
        .expect("sharing child")
        .take()
        .ok_or("no sharing child")?;
    let mut tid = 0i32;
    // SAFETY: one byte written from, and four read into, values that live across the calls.
    let read = unsafe {
        libc::write(go, [1u8].as_ptr().cast(), 1);
        libc::read(back, (&raw mut tid).cast(), 4)
    };
    if read != 4 || tid <= 0 {
        return Ok(format!("err the child's thread: {tid}"));
    }
    Ok(format!("ok {tid}"))
}

/// The userfaultfd whose unserved page holds a ring's lock, and the thread blocked on it.
static RING_LOCK: std::sync::Mutex<Option<(OwnedFd, std::thread::JoinHandle<i64>)>> =
    std::sync::Mutex::new(None);

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` and `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const IORING_REGISTER_BUFFERS: libc::c_long = 0;

/// Holds io_uring instance `fd`'s lock for as long as it likes: registers as a buffer a page
/// a userfaultfd serves and never answers, so the registration waits in the kernel with the
/// lock taken. `ok` once the fault has reached the userfaultfd (the lock is held then).
fn hold_ring_lock(ring: RawFd) -> Result<String, String> {
    // SAFETY: system calls with structs that live across each call; the page stays mapped
    // until exit, and the thread only passes its address to the kernel.
    unsafe {
        let uffd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK);
        if uffd < 0 {
            return Ok(format!("err userfaultfd {}", errno_name(last_err())));
        }
        let uffd = OwnedFd::from_raw_fd(uffd as i32);
        let mut api = [UFFD_API, 0, 0];
        if libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) != 0 {
            return Ok(format!("err UFFDIO_API {}", errno_name(last_err())));
        }
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if page == libc::MAP_FAILED {
            return Ok(format!("err mmap {}", errno_name(last_err())));
        }
        let mut register = [page as u64, 4096, UFFDIO_REGISTER_MODE_MISSING, 0];
        if libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, register.as_mut_ptr()) != 0 {
            return Ok(format!("err UFFDIO_REGISTER {}", errno_name(last_err())));
        }
        let base = page as usize;
        let blocked = std::thread::spawn(move || {
            let iov = libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: 4096,
            };
            libc::syscall(
                libc::SYS_io_uring_register,
                ring,
                IORING_REGISTER_BUFFERS,
                &raw const iov,
                1,
            )
        });
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // The runner stretches deadlines on slow (emulated) kernels.
        let patience = std::env::var("AGENTWALL_TEST_PATIENCE")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1)
            .clamp(1, 100);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10) * patience;
        // A kernel that will not wait on the page for a long-term pin fails the registration
        // at once instead.
        while libc::poll(&raw mut pfd, 1, 50) != 1 {
            if blocked.is_finished() {
                let rc = blocked.join().unwrap_or(0);
                return Ok(format!("err the registration ended without waiting: {rc}"));
            }
            if std::time::Instant::now() > deadline {
                return Ok("err the registration did not fault".into());
            }
        }
        *RING_LOCK.lock().expect("ring lock") = Some((uffd, blocked));
        Ok("ok".into())
    }
}

/// Lets the ring's lock go: closing the userfaultfd lets the waiting fault go on as any
/// other. `ok registered` or `ok failed`, as the registration ended.
fn release_ring_lock() -> Result<String, String> {
    let (uffd, blocked) = RING_LOCK
        .lock()
        .expect("ring lock")
        .take()
        .ok_or("no ring lock held")?;
    drop(uffd);
    let rc = blocked
        .join()
        .map_err(|_| "the registering thread panicked")?;
    Ok(if rc < 0 {
        "ok failed".into()
    } else {
        "ok registered".into()
    })
}

/// Descriptors `take-fd` took, kept open until exit.
static KEPT_FDS: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Takes descriptor `fd` of process `pid` with pidfd_getfd(): `ok` (closed again, or with
/// `keep` kept: `ok FD`) or `err ERRNO`.
fn pidfd_getfd(pid: i32, fd: i32, keep: bool) -> String {
    // SAFETY: pidfd_open and pidfd_getfd with integer arguments; the results are closed here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return format!("err pidfd_open {}", errno_name(last_err()));
        }
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0);
        let answer = if got < 0 {
            format!("err {}", errno_name(last_err()))
        } else if keep {
            KEPT_FDS
                .lock()
                .expect("descriptors")
                .push(OwnedFd::from_raw_fd(got as i32));
            format!("ok {got}")
        } else {
            libc::close(got as i32);
            "ok".into()
        };
        libc::close(pidfd as i32);
        answer
    }
}

unsafe fn uring_once(
    ring: &mut io_uring::IoUring,
    sqe: &io_uring::squeue::Entry,
) -> Result<io_uring::cqueue::Entry, String> {
    // SAFETY: the caller keeps the entry's buffers alive.
    unsafe {
        ring.submission()
            .push(sqe)
            .map_err(|e| format!("io_uring push: {e}"))?;
    }
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring submit: {e}"))?;
    ring.completion()
        .next()
        .ok_or_else(|| "io_uring: no completion".to_owned())
}

/// One connect (TCP) or unconnected sendmsg (UDP) submitted through io_uring, which must meet
/// the same hooks as the plain system calls.
fn uring(addr: SocketAddr, udp: bool) -> Result<String, String> {
    use io_uring::{IoUring, opcode, types};
    let (ty, proto) = if udp {
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP)
    } else {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP)
    };
    let s =
        new_socket(family(&addr), ty, proto).map_err(|e| format!("socket: {}", errno_name(e)))?;
    let mut ring = IoUring::new(4).map_err(|e| format!("io_uring: {e}"))?;
    let (mut ss, len) = sockaddr(addr);
    let payload = *b"x";
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are filled with locals that outlive the
    // submission (we wait for its completion below).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut ss).cast();
    msg.msg_namelen = len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    let sqe = if udp {
        opcode::SendMsg::new(types::Fd(s.as_raw_fd()), &raw const msg).build()
    } else {
        opcode::Connect::new(types::Fd(s.as_raw_fd()), (&raw const ss).cast(), len).build()
    };
    // SAFETY: every buffer the entry points at lives until the completion is reaped.
    let cqe = unsafe { uring_once(&mut ring, &sqe)? };
    Ok(if cqe.result() < 0 {
        format!("err {}", errno_name(-cqe.result()))
    } else {
        "ok".into()
    })
}

/// `data` sent on `fd` from pages the sender keeps (see `send-held-hello`): "ok" or
/// "err ERRNO" from the send itself.
fn send_kept_pages(fd: RawFd, data: &[u8], how: &str) -> Result<String, String> {
    let sent = |rc: isize| {
        if rc < 0 {
            format!("err {}", errno_name(last_err()))
        } else {
            "ok".to_owned()
        }
    };
    match how {
        "msg-zerocopy" => {
            // SAFETY: valid fd and buffer.
            Ok(sent(unsafe {
                libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_ZEROCOPY)
            }))
        }
        "zerocopy" | "zerocopy-set" => {
            let one: libc::c_int = 1;
            // SAFETY: valid fd and option value.
            if unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ZEROCOPY,
                    (&raw const one).cast(),
                    4,
                )
            } < 0
            {
                return Ok(format!("err SO_ZEROCOPY {}", errno_name(last_err())));
            }
            let flags = if how == "zerocopy" {
                libc::MSG_ZEROCOPY
            } else {
                0
            };
            // SAFETY: valid fd and buffer.
            Ok(sent(unsafe {
                libc::send(fd, data.as_ptr().cast(), data.len(), flags)
            }))
        }
        "sendfile" => {
            let file = shared_page(data)?;
            let mut off: libc::off_t = 0;
            // SAFETY: valid descriptors and offset.
            Ok(sent(unsafe {
                libc::sendfile(fd, file.as_raw_fd(), &raw mut off, data.len())
            }))
        }
        "uring-zc" => {
            use io_uring::{IoUring, opcode, types};
            let mut ring = IoUring::new(4).map_err(|e| format!("io_uring: {e}"))?;
            let sqe = opcode::SendZc::new(types::Fd(fd), data.as_ptr(), data.len() as u32).build();
            // SAFETY: the buffer outlives the submission: its completion and notification are
            // reaped here before it goes.
            let cqe = unsafe { uring_once(&mut ring, &sqe)? };
            if io_uring::cqueue::more(cqe.flags()) {
                // The notification that the kernel let the pages go.
                ring.submit_and_wait(1)
                    .map_err(|e| format!("io_uring wait: {e}"))?;
            }
            Ok(if cqe.result() < 0 {
                format!("err {}", errno_name(-cqe.result()))
            } else {
                "ok".into()
            })
        }
        _ => Err(format!("unknown send {how}")),
    }
}

/// TCP_NODELAY on `fd`: each write leaves as its own packet.
fn no_delay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            4,
        )
    };
}

/// `parts` sent on `fd` with `flags`, 50 ms apart (apart on the wire: each leaves before the
/// next is written); the last error, if any.
fn send_apart(fd: RawFd, parts: &[&[u8]], flags: libc::c_int) -> Option<String> {
    let mut err = None;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // SAFETY: valid fd and buffer.
        if unsafe { libc::send(fd, part.as_ptr().cast(), part.len(), flags) } < 0 {
            err = Some(format!("err {}", errno_name(last_err())));
        }
    }
    err
}

/// A memfd holding `data`: pages sendfile hands to the kernel, which the sender can still
/// write.
fn shared_page(data: &[u8]) -> Result<std::fs::File, String> {
    use std::io::Write as _;
    // SAFETY: a plain system call with a static name.
    let mfd = unsafe { libc::memfd_create(c"page".as_ptr(), libc::MFD_CLOEXEC) };
    if mfd < 0 {
        return Err(format!("memfd_create: {}", errno_name(last_err())));
    }
    // SAFETY: a descriptor just made, owned by nothing else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(mfd) });
    (&file)
        .write_all(data)
        .map_err(|e| format!("memfd write: {e}"))?;
    Ok(file)
}

fn fork_storm(n: usize, addr: SocketAddr) -> String {
    let (ss, len) = sockaddr(addr);
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: the child only makes async-signal-safe calls, then _exit()s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain system calls in the child.
            unsafe {
                let s = libc::socket(family(&addr), libc::SOCK_STREAM, libc::IPPROTO_TCP);
                let rc = libc::connect(s, (&raw const ss).cast(), len);
                let code = if rc < 0 && *libc::__errno_location() == libc::EPERM {
                    0
                } else {
                    1
                };
                libc::_exit(code);
            }
        }
        if pid > 0 {
            children.push(pid);
        }
    }
    let (mut eperm, mut other) = (0, n - children.len());
    for pid in children {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            eperm += 1;
        } else {
            other += 1;
        }
    }
    format!("eperm={eperm} other={other}")
}

/// The socket received over SCM_RIGHTS, and its arrival signal.
static RECEIVED: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);
static ARRIVED: std::sync::Condvar = std::sync::Condvar::new();

fn recv_socket(path: &str) -> Result<String, String> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: a zeroed msghdr is valid; buffers are locals that outlive the call.
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = mem::size_of_val(&cbuf);
            if libc::recvmsg(conn.as_raw_fd(), &raw mut msg, 0) <= 0 {
                return;
            }
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            if !cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
                *RECEIVED.lock().unwrap() = Some(OwnedFd::from_raw_fd(fd));
                ARRIVED.notify_all();
            }
        }
    });
    Ok("ok".into())
}

/// Runs `cmd` to its end (from inside this process's cgroup and namespaces): `exit N: ` and
/// the last line it wrote to stderr.
fn exit_answer(mut cmd: std::process::Command, program: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("spawning {program}: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    Ok(format!(
        "exit {}: {}",
        out.status.code().unwrap_or(-1),
        err.lines().last().unwrap_or("").trim()
    ))
}

/// What `recv-socket` received, waiting up to 5 s for it.
fn received() -> Result<OwnedFd, String> {
    let (mut got, _) = ARRIVED
        .wait_timeout_while(
            RECEIVED.lock().unwrap(),
            std::time::Duration::from_secs(5),
            |r| r.is_none(),
        )
        .unwrap();
    got.take().ok_or_else(|| "nothing received".into())
}

fn send_socket(path: &str) -> Result<String, String> {
    let s = new_socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP)
        .map_err(|e| format!("socket: {}", errno_name(e)))?;
    send_fd(path, s.as_raw_fd())
}

/// Hands `fd` to the `recv-socket` listener at `path` over SCM_RIGHTS.
fn send_fd(path: &str, fd: i32) -> Result<String, String> {
    let conn = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    let byte = [1u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut _,
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in recv_socket; CMSG_* compute offsets inside cbuf.
    let rc = unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        libc::sendmsg(conn.as_raw_fd(), &raw const msg, 0)
    };
    if rc < 0 {
        return Ok(format!("err {}", errno_name(last_err())));
    }
    drop(conn);
    Ok("ok".into())
}

fn dns_query(name: &str, ty: &str) -> Result<(u16, Vec<u8>), String> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    let rtype = match <RecordType as std::str::FromStr>::from_str(ty) {
        Ok(RecordType::Unknown(_)) | Err(_) => return Err(format!("bad record type {ty}")),
        Ok(t) => t,
    };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).map_err(|e| e.to_string())?,
            rtype,
        ));
    Ok((id, m.to_vec().map_err(|e| e.to_string())?))
}

fn dns_result(id: u16, bytes: &[u8]) -> String {
    use hickory_proto::{
        op::{Message, ResponseCode},
        rr::RData,
    };
    let Ok(m) = Message::from_vec(bytes) else {
        return "err malformed".into();
    };
    if m.id() != id {
        return "err id".into();
    }
    if m.truncated() {
        return "tc".into();
    }
    if m.response_code() != ResponseCode::NoError {
        return format!("rcode {:?}", m.response_code());
    }
    let mut addrs: Vec<IpAddr> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    addrs.sort();
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    format!("ok {}", list.join(","))
}

fn io_errno(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "err ETIMEDOUT".into(),
        _ => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
    }
}

fn resolve(name: &str, server: &str, mode: &str, ty: &str) -> Result<String, String> {
    let server = SocketAddr::new(server.parse().map_err(|e| format!("bad address: {e}"))?, 53);
    let (id, q) = dns_query(name, ty)?;
    let wait = std::time::Duration::from_secs(3);
    let timeout = Some(wait);
    let udp = |connected: bool| -> String {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = match std::net::UdpSocket::bind(bind) {
            Ok(s) => s,
            Err(e) => return io_errno(&e),
        };
        let _ = s.set_read_timeout(timeout);
        let sent = if connected {
            if let Err(e) = s.connect(server) {
                return io_errno(&e);
            }
            match s.peer_addr() {
                Ok(p) if p != server => return format!("err peer {p}"),
                Err(e) => return io_errno(&e),
                Ok(_) => {}
            }
            s.send(&q)
        } else {
            s.send_to(&q, server)
        };
        if let Err(e) = sent {
            return io_errno(&e);
        }
        let mut buf = vec![0u8; 65535];
        // A receive with a timeout is not restarted after the task was woken for something
        // else (an io_uring completion's task work, a freeze): EINTR, then wait again.
        let got = loop {
            match s.recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match got {
            Ok((_, from)) if from != server => format!("err source {from}"),
            Ok((n, _)) => dns_result(id, &buf[..n]),
            Err(e) => io_errno(&e),
        }
    };
    let tcp = || -> String {
        use std::io::Read as _;
        let mut s = match std::net::TcpStream::connect_timeout(&server, wait) {
            Ok(s) => s,
            Err(e) => return io_errno(&e),
        };
        match s.peer_addr() {
            Ok(p) if p != server => return format!("err peer {p}"),
            Err(e) => return io_errno(&e),
            Ok(_) => {}
        }
        let _ = s.set_read_timeout(timeout);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        if let Err(e) = s.write_all(&out) {
            return io_errno(&e);
        }
        let mut len = [0u8; 2];
        if let Err(e) = s.read_exact(&mut len) {
            return io_errno(&e);
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if let Err(e) = s.read_exact(&mut buf) {
            return io_errno(&e);
        }
        dns_result(id, &buf)
    };
    Ok(match mode {
        "udp" => udp(true),
        "udpu" => udp(false),
        "tcp" => tcp(),
        "auto" => match udp(true) {
            r if r == "tc" => tcp(),
            r => r,
        },
        m => return Err(format!("bad mode {m}")),
    })
}

fn gai(name: &str) -> String {
    let Ok(c) = std::ffi::CString::new(name) else {
        return "err name".into();
    };
    // SAFETY: zeroed addrinfo hints are valid; we own the result list and free it.
    unsafe {
        let mut hints: libc::addrinfo = mem::zeroed();
        hints.ai_family = libc::AF_UNSPEC;
        hints.ai_socktype = libc::SOCK_STREAM;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        let rc = libc::getaddrinfo(c.as_ptr(), std::ptr::null(), &hints, &mut res);
        if rc != 0 {
            return format!("err EAI {rc}");
        }
        let mut addrs = Vec::new();
        let mut p = res;
        while !p.is_null() {
            let ai = &*p;
            match ai.ai_family {
                libc::AF_INET => {
                    let sin = &*(ai.ai_addr as *const libc::sockaddr_in);
                    addrs.push(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ai.ai_addr as *const libc::sockaddr_in6);
                    addrs.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
            p = ai.ai_next;
        }
        libc::freeaddrinfo(res);
        addrs.sort();
        addrs.dedup();
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        format!("ok {}", list.join(","))
    }
}

fn bench_dns(server: &str, n: u64, qps: u64, names: u64) -> Result<String, String> {
    let server = SocketAddr::new(server.parse().map_err(|e| format!("bad address: {e}"))?, 53);
    let queries: Vec<(u16, Vec<u8>)> = (0..names.max(1))
        .map(|i| dns_query(&format!("n{i}.example.com"), "A"))
        .collect::<Result<_, _>>()?;
    let period = std::time::Duration::from_nanos(1_000_000_000 / qps.max(1));
    let warmup = n / 10;
    let mut samples = Vec::with_capacity(n as usize);
    let mut fail = 0u64;
    let mut buf = vec![0u8; 4096];
    let start = std::time::Instant::now();
    for i in 0..warmup + n {
        let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let (id, q) = &queries[(i % names.max(1)) as usize];
        let t0 = std::time::Instant::now();
        let ok = (|| -> io::Result<bool> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            s.connect(server)?;
            s.send(q)?;
            let (got, from) = s.recv_from(&mut buf)?;
            Ok(from == server && dns_result(*id, &buf[..got]).starts_with("ok 2"))
        })()
        .unwrap_or(false);
        let ns = t0.elapsed().as_nanos() as u64;
        if i >= warmup {
            if ok {
                samples.push(ns);
            } else {
                fail += 1;
            }
        }
    }
    if samples.is_empty() {
        return Ok(format!("p50=0 p99=0 fail={fail}"));
    }
    Ok(format!("{} fail={fail}", percentiles(samples)))
}

/// Gives this process its own /etc/resolv.conf without touching the host's.
fn use_resolv_conf(file: &str) -> Result<(), String> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    // SAFETY: plain syscalls with valid C strings; single-threaded here.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNS): {}",
                io::Error::last_os_error()
            ));
        }
        let root = c("/");
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!("making / private: {}", io::Error::last_os_error()));
        }
        let (src, dst) = (c(file), c("/etc/resolv.conf"));
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "bind-mounting {file}: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--cgroup" => {
                let dir = &args[i + 1];
                std::fs::write(
                    format!("{dir}/cgroup.procs"),
                    std::process::id().to_string(),
                )
                .unwrap_or_else(|e| panic!("joining cgroup {dir}: {e}"));
                i += 2;
            }
            "--netns" => {
                // SAFETY: plain syscall; this process is single-threaded here.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
                }
                set_lo_up().unwrap_or_else(|e| panic!("bringing lo up: errno {e}"));
                i += 1;
            }
            "--resolv-conf" => {
                use_resolv_conf(&args[i + 1]).unwrap_or_else(|e| panic!("{e}"));
                i += 2;
            }
            "--cpu" => {
                let cpu: usize = args[i + 1].parse().expect("--cpu N");
                // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays inside it.
                unsafe {
                    let mut set: libc::cpu_set_t = mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                        panic!("sched_setaffinity: {}", io::Error::last_os_error());
                    }
                }
                i += 2;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {}", std::process::id()).unwrap();
    out.flush().unwrap();
    let mut keep = Vec::new();
    for line in io::stdin().lock().lines() {
        let line = line.unwrap();
        if line.trim() == "exit" {
            break;
        }
        let reply = run(&line, &mut keep).unwrap_or_else(|e| format!("bad {e}"));
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
}

/// Sets IP_FREEBIND, or IPV6_FREEBIND on an IPv6 socket, on or off: the errno of a failure.
fn set_freebind(s: &OwnedFd, on: bool) -> Result<(), i32> {
    let one: libc::c_int = on.into();
    let family = socket_family(s);
    let (level, name) = if family == libc::AF_INET6 {
        (libc::SOL_IPV6, libc::IPV6_FREEBIND)
    } else {
        (libc::SOL_IP, libc::IP_FREEBIND)
    };
    // SAFETY: valid fd and option value of its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const one).cast(),
            std::mem::size_of_val(&one) as u32,
        )
    };
    if rc < 0 { Err(last_err()) } else { Ok(()) }
}

/// Sets IP_RECVERR (IPV6_RECVERR on an IPv6 socket) to 1, with a value of a page and more
/// when `long`: whether it then reads as on, or the errno of a refusal.
fn recverr(s: &OwnedFd, long: bool) -> Result<bool, i32> {
    let family = socket_family(s);
    let (level, name) = if family == libc::AF_INET6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    };
    let mut value = vec![0u8; if long { 8192 } else { 4 }];
    value[..4].copy_from_slice(&1i32.to_ne_bytes());
    setsockopt_bytes(s, level, name, &value)?;
    Ok(getsockopt_int(s, level, name) != 0)
}

/// An int socket option's value (0 if it cannot be read).
fn getsockopt_int(s: &OwnedFd, level: i32, name: i32) -> i32 {
    let mut on = 0i32;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: valid fd; a 4-byte buffer and its length.
    unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw mut on).cast(),
            &raw mut len,
        );
    }
    on
}

/// A socket's family (`SO_DOMAIN`); 0 if it cannot be read.
fn socket_family(s: &OwnedFd) -> libc::c_int {
    let mut family: libc::c_int = 0;
    let mut flen = std::mem::size_of_val(&family) as libc::socklen_t;
    // SAFETY: valid fd and a value buffer of the length given.
    unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&raw mut family).cast(),
            &raw mut flen,
        )
    };
    family
}

/// A TLS 1.3-shaped ServerHello (not a HelloRetryRequest), its only record.
fn server_hello() -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.extend_from_slice(&[0, 0x13, 0x01, 0, 0, 0]);
    let mut hs = vec![2];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    tls_record(0x16, &hs)
}

/// One TLS record of `kind` holding `payload`.
fn tls_record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![kind, 3, 3];
    r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

/// A TLS change cipher spec record as TLS 1.3 clients send it for middleboxes.
const CCS_RECORD: [u8; 6] = [0x14, 3, 3, 0, 1, 1];

const GROUP_X25519: u16 = 0x001d;
const GROUP_P256: u16 = 0x0017;
/// A HelloRetryRequest's random (RFC 8446, 4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// A TLS 1.3 ClientHello naming `name` that offers x25519 and P-256 with a key share for
/// `group` alone: a server that prefers the other group asks for another hello.
fn tls13_hello(name: &str, group: u16, share: &[u8]) -> Vec<u8> {
    let ext = |kind: u16, data: &[u8]| {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u16).to_be_bytes());
        e.extend_from_slice(data);
        e
    };
    let n = name.as_bytes();
    let mut sni = ((n.len() + 3) as u16).to_be_bytes().to_vec();
    sni.push(0);
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut ks = ((share.len() + 4) as u16).to_be_bytes().to_vec();
    ks.extend_from_slice(&group.to_be_bytes());
    ks.extend_from_slice(&(share.len() as u16).to_be_bytes());
    ks.extend_from_slice(share);
    let exts = [
        ext(0, &sni),
        // supported_versions: TLS 1.3.
        ext(43, &[2, 3, 4]),
        // supported_groups.
        ext(10, &[0, 4, 0, 0x1d, 0, 0x17]),
        // signature_algorithms: rsa_pss_rsae_sha256, ecdsa_secp256r1_sha256.
        ext(13, &[0, 4, 8, 4, 4, 3]),
        ext(51, &ks),
    ]
    .concat();
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    // A legacy session id, as TLS 1.3 clients send for middleboxes.
    body.push(32);
    body.extend_from_slice(&[9u8; 32]);
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// At least `n` bytes read from `fd` (waiting at most `secs` seconds for each read).
fn read_at_least(fd: RawFd, n: usize, secs: i64) -> Result<Vec<u8>, String> {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: valid fd and option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < n {
        // SAFETY: valid fd and buffer.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r <= 0 {
            return Err(format!(
                "read {} bytes, then {}",
                got.len(),
                if r == 0 {
                    "end".to_owned()
                } else {
                    errno_name(last_err())
                }
            ));
        }
        got.extend_from_slice(&buf[..r as usize]);
    }
    Ok(got)
}

/// A minimal TLS 1.2-shaped ClientHello whose only extension is `server_name` = `name`.
fn client_hello(names: &[&str]) -> Vec<u8> {
    padded_hello(names, 0)
}

/// What the ClientHello of `send-held-hello … big` ends with: past one segment, so a
/// retransmission in pieces sends it in a piece of its own.
const BIG_HELLO_END: &[u8] = b"BIG-HELLO-END";

/// [`client_hello`] with a padding extension of `pad` bytes after the names (ending with
/// [`BIG_HELLO_END`] when there is room), as post-quantum key shares make hellos larger
/// than one segment.
fn padded_hello(names: &[&str], pad: usize) -> Vec<u8> {
    let mut ext = Vec::new();
    for name in names {
        let n = name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
        sni.extend_from_slice(n);
        ext.extend_from_slice(&[0, 0]);
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
    }
    if pad > 0 {
        let mut padding = vec![0u8; pad];
        if pad >= BIG_HELLO_END.len() {
            padding[pad - BIG_HELLO_END.len()..].copy_from_slice(BIG_HELLO_END);
        }
        ext.extend_from_slice(&[0, 21]);
        ext.extend_from_slice(&(pad as u16).to_be_bytes());
        ext.extend_from_slice(&padding);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}
