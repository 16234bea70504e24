//! The wire: two test network namespaces joined by a veth pair, and the packets the agent's side
//! puts on it, captured on the peer's end with an AF_PACKET socket. What a test asserts here is
//! what actually left, not the errno the agent saw.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use crate::NetNs;

pub const AGENT_V4: &str = "192.0.2.1";
pub const PEER_V4: &str = "192.0.2.2";
pub const AGENT_V6: &str = "2001:db8::1";
pub const PEER_V6: &str = "2001:db8::2";
/// Routed through the peer from the agent's side: destinations beyond it.
pub const BEYOND_V4: &str = "198.51.100.7";
pub const BEYOND_V6: &str = "2001:db8:1::7";

const AGENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: &str = "02:00:00:00:00:02";
const PEER_MAC_BYTES: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// An agent namespace and a peer namespace joined by `veth-a` / `veth-p`; both deleted on drop.
pub struct Link {
    pub agent: NetNs,
    pub peer: NetNs,
}

impl Link {
    pub fn new(tag: &str) -> Self {
        let agent = NetNs::new(&format!("{tag}-a"));
        let peer = NetNs::new(&format!("{tag}-p"));
        agent.ip(&[
            "link",
            "add",
            "veth-a",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "veth-p",
            "address",
            PEER_MAC,
            "netns",
            &peer.name,
        ]);
        for (ns, dev, v4, v6) in [
            (&agent, "veth-a", AGENT_V4, AGENT_V6),
            (&peer, "veth-p", PEER_V4, PEER_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        // Beyond the peer, and the peer's link-layer address known up front: the first packet
        // leaves at once instead of waiting on neighbour discovery.
        agent.ip(&["route", "add", "198.51.100.0/24", "via", PEER_V4]);
        agent.ip(&["-6", "route", "add", "2001:db8:1::/48", "via", PEER_V6]);
        for addr in [PEER_V4, PEER_V6] {
            agent.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                PEER_MAC,
                "dev",
                "veth-a",
                "nud",
                "permanent",
            ]);
        }
        Self { agent, peer }
    }
}

/// One IP packet the agent's side sent, as the peer received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol, or the IPv6 header's next header (43 for a routing header).
    pub next: u8,
    /// IPv4 header longer than 20 bytes (options).
    pub ip_options: bool,
    /// Source and destination port, when TCP or UDP follows the IP header directly.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// The IP packet, headers included.
    pub data: Vec<u8>,
}

impl Packet {
    /// Whether the packet's bytes hold `needle` (a TLS server name, say).
    pub fn carries(&self, needle: &[u8]) -> bool {
        self.data.windows(needle.len()).any(|w| w == needle)
    }

    /// Whether this is a TCP or UDP packet to `dst:port` (`dst` as text).
    pub fn is_to(&self, dst: &str, port: u16) -> bool {
        self.dst == dst.parse::<IpAddr>().expect("address") && self.dport == Some(port)
    }

    /// The frame, when its sender's link-layer address is `from`.
    fn parse(frame: &[u8], from: &[u8; 6]) -> Option<Self> {
        if frame.len() < 14 || frame[6..12] != from[..] {
            return None;
        }
        let ip = &frame[14..];
        let port_at = |off: usize| {
            ip.get(off..off + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 if ip.len() >= 20 => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let next = ip[9];
                Some(Self {
                    src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                    dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
                    next,
                    ip_options: ihl > 20,
                    sport: (next == 6 || next == 17).then(|| port_at(ihl)).flatten(),
                    dport: (next == 6 || next == 17)
                        .then(|| port_at(ihl + 2))
                        .flatten(),
                    data: ip.to_vec(),
                })
            }
            0x86dd if ip.len() >= 40 => {
                let next = ip[6];
                let mut d = [0u8; 16];
                d.copy_from_slice(&ip[24..40]);
                let mut s = [0u8; 16];
                s.copy_from_slice(&ip[8..24]);
                Some(Self {
                    src: IpAddr::V6(Ipv6Addr::from(s)),
                    dst: IpAddr::V6(Ipv6Addr::from(d)),
                    next,
                    ip_options: false,
                    sport: (next == 6 || next == 17).then(|| port_at(40)).flatten(),
                    dport: (next == 6 || next == 17).then(|| port_at(42)).flatten(),
                    data: ip.to_vec(),
                })
            }
            _ => None,
        }
    }
}

/// Every frame arriving on one interface of a namespace, from the moment it is made.
pub struct Capture {
    fd: OwnedFd,
    /// Whose frames are kept: the agent's side's, or the peer's.
    from: [u8; 6],
}

impl Capture {
    /// Captures on `ifname` inside `ns`; packets the agent's side sends after this returns
    /// are seen.
    pub fn start(ns: &NetNs, ifname: &str) -> Self {
        Self::of(ns, ifname, AGENT_MAC)
    }

    /// As [`Capture::start`], for the packets the peer sends.
    pub fn from_peer(ns: &NetNs, ifname: &str) -> Self {
        Self::of(ns, ifname, PEER_MAC_BYTES)
    }

    fn of(ns: &NetNs, ifname: &str, from: [u8; 6]) -> Self {
        let ifname = std::ffi::CString::new(ifname).expect("interface name");
        let fd = ns.run_in(|| {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain syscalls; the results are checked.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                );
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let fd = OwnedFd::from_raw_fd(fd);
                let index = libc::if_nametoindex(ifname.as_ptr());
                assert!(index != 0, "no interface {ifname:?}");
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert!(
                    rc == 0,
                    "bind AF_PACKET: {}",
                    std::io::Error::last_os_error()
                );
                // Room for everything a test sends between two reads (an emulated guest's
                // stretched waits send thousands of packets): a full buffer would drop the
                // very marker a test waits for.
                let room: i32 = 64 << 20;
                let rc = libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const room).cast(),
                    4,
                );
                assert!(
                    rc == 0,
                    "SO_RCVBUFFORCE: {}",
                    std::io::Error::last_os_error()
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                fd
            }
        });
        Self { fd, from }
    }

    /// Packets from the agent's side until one that `last` accepts (included), in arrival
    /// order; panics when none arrives within `within`.
    pub fn until(&mut self, within: Duration, last: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        let deadline = crate::deadline(within);
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: valid fd and buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            if let Some(p) = Packet::parse(&buf[..n as usize], &self.from) {
                let done = last(&p);
                seen.push(p);
                if done {
                    return seen;
                }
            }
        }
        panic!("no awaited packet within {within:?}; saw {seen:?}");
    }
}

/// A TCP connection from `src` (address and port) to `dst`, made inside `ns`: what `connect`
/// answers within `within` (`TimedOut` when no SYN-ACK came back).
pub fn connect_from(
    ns: &NetNs,
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    within: Duration,
) -> std::io::Result<()> {
    let sockaddr = |a: std::net::SocketAddr| -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: zeroed sockaddr_storage is valid; the family's prefix is filled below.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            std::net::SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage.
                unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    };
    ns.run_in(|| {
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket calls on a descriptor owned here; every result is checked.
        unsafe {
            let fd = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                4,
            );
            let (ss, len) = sockaddr(src);
            if libc::bind(fd.as_raw_fd(), (&raw const ss).cast(), len) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (ss, len) = sockaddr(dst);
            if libc::connect(fd.as_raw_fd(), (&raw const ss).cast(), len) < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINPROGRESS) {
                    return Err(e);
                }
            }
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
            match libc::poll(&raw mut pfd, 1, ms) {
                0 => return Err(std::io::ErrorKind::TimedOut.into()),
                n if n < 0 => return Err(std::io::Error::last_os_error()),
                _ => {}
            }
            let mut err: libc::c_int = 0;
            let mut len = 4 as libc::socklen_t;
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &raw mut len,
            );
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
            Ok(())
        }
    })
}
