//! Decision records from the kernel's ring buffer, decoded for userspace.

use std::{
    fmt,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use agent_common::{self as c, Event};
use aya::maps::{MapData, RingBuf};

use crate::{
    clock::BootInstant,
    policy::{Protocol, Reason, model::addr_from16},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Denied in enforce mode (or for a revoked/expired identity, or an unbound cgroup under
    /// `unknown_flows = deny`).
    Deny,
    /// Audit mode: would have been denied, was allowed.
    Audit,
    /// A cgroup bound to no identity made this flow (allowed, reported).
    UnknownFlow,
    /// A governed identity tried to open a socket other than TCP or UDP.
    SocketDeny,
    /// Allowed by a rule (recorded when `record_allowed` is on).
    Allow,
}

impl EventKind {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            c::EVENT_DENY => Self::Deny,
            c::EVENT_AUDIT => Self::Audit,
            c::EVENT_UNKNOWN_FLOW => Self::UnknownFlow,
            c::EVENT_SOCK_DENY => Self::SocketDeny,
            c::EVENT_ALLOW => Self::Allow,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            Self::Deny => c::EVENT_DENY,
            Self::Audit => c::EVENT_AUDIT,
            Self::UnknownFlow => c::EVENT_UNKNOWN_FLOW,
            Self::SocketDeny => c::EVENT_SOCK_DENY,
            Self::Allow => c::EVENT_ALLOW,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::UnknownFlow => "unknown",
            Self::SocketDeny => "socket-deny",
            Self::Allow => "allow",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    SockCreate,
    /// The packet line (cgroup_skb egress): a packet a governed socket sent.
    Egress,
    /// The packet line inbound (cgroup_skb ingress): a packet a governed socket received;
    /// `dest` is its peer and `port` the local port.
    Ingress,
    /// BPF LSM `socket_create`: a socket of any family.
    SocketFamily,
    /// cgroup setsockopt: an option a governed agent may not set.
    SetSockopt,
    /// BPF LSM `socket_recvmsg`: a read of a socket's error queue.
    ErrorQueue,
    /// BPF LSM `socket_sendmsg`/`socket_recvmsg`: a socket the task may not use (a family it
    /// may not create, or one another binding governs).
    SocketUse,
    /// BPF LSM `file_receive`: a socket handed to a governed task that it may not take. A
    /// refused peer is in `dest` and `port`.
    SocketReceive,
    /// BPF LSM `socket_bind`: a governed socket's bind while FREEBIND or TRANSPARENT is set.
    SocketBind,
    /// BPF LSM `inode_init_security_anon`: an io_uring instance a governed task made where its
    /// identity's policy refuses io_uring.
    IoUring,
}

impl Hook {
    /// Records about a socket (its family, type, options), not a flow: no address or port.
    pub fn is_socket(self) -> bool {
        matches!(
            self,
            Self::SockCreate
                | Self::SocketFamily
                | Self::SetSockopt
                | Self::ErrorQueue
                | Self::SocketUse
                | Self::SocketReceive
                | Self::SocketBind
                | Self::IoUring
        )
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            c::HOOK_CONNECT4 => Self::Connect4,
            c::HOOK_CONNECT6 => Self::Connect6,
            c::HOOK_SENDMSG4 => Self::Sendmsg4,
            c::HOOK_SENDMSG6 => Self::Sendmsg6,
            c::HOOK_SOCK_CREATE => Self::SockCreate,
            c::HOOK_EGRESS => Self::Egress,
            c::HOOK_INGRESS => Self::Ingress,
            c::HOOK_SETSOCKOPT => Self::SetSockopt,
            c::HOOK_ERROR_QUEUE => Self::ErrorQueue,
            c::HOOK_SOCKET_USE => Self::SocketUse,
            c::HOOK_SOCKET_RECEIVE => Self::SocketReceive,
            c::HOOK_SOCKET_BIND => Self::SocketBind,
            c::HOOK_IO_URING => Self::IoUring,
            c::HOOK_SOCKET_FAMILY => Self::SocketFamily,
            _ => return None,
        })
    }
}

/// The name of a socket option the setsockopt line refuses.
pub fn sockopt_name(level: u16, name: u16) -> &'static str {
    match (i32::from(level), i32::from(name)) {
        (libc::SOL_IP, libc::IP_FREEBIND) => "IP_FREEBIND",
        (libc::SOL_IP, libc::IP_TRANSPARENT) => "IP_TRANSPARENT",
        (libc::SOL_IPV6, libc::IPV6_FREEBIND) => "IPV6_FREEBIND",
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT) => "IPV6_TRANSPARENT",
        (libc::SOL_IP, libc::IP_RECVERR) => "IP_RECVERR",
        (libc::SOL_IP, 26) => "IP_RECVERR_RFC4884",
        (libc::SOL_IPV6, libc::IPV6_RECVERR) => "IPV6_RECVERR",
        (libc::SOL_IPV6, 31) => "IPV6_RECVERR_RFC4884",
        _ => "other",
    }
}

/// What refused a socket received from another process, or a send on one, beyond its
/// family and type (the receipt and socket-use lines' `sock_protocol`), as the tail of its
/// description: the option it had set, for a datagram socket refused for its kind its
/// protocol, or an address its sender chose. Nothing for 0.
pub fn socket_detail(reason: Option<Reason>, code: u16) -> String {
    match (reason, code) {
        (_, 0) => String::new(),
        (Some(Reason::SocketType), u16::MAX) => ", its protocol unreadable on this kernel".into(),
        (Some(Reason::SocketType), p) => format!(", protocol {p} (not UDP)"),
        (_, c) if i32::from(c) == libc::IP_FREEBIND => ", with FREEBIND set".into(),
        (_, c) if i32::from(c) == libc::IP_TRANSPARENT => ", with TRANSPARENT set".into(),
        (_, 0xfffe) => ", bound by its sender to an address of its choosing".into(),
        (_, 0xfffd) => ", in use by its sender (a call on it in progress)".into(),
        (_, c) if i32::from(c) == libc::IP_RECVERR => ", with IP_RECVERR set".into(),
        (_, c) if i32::from(c) == libc::IPV6_RECVERR => ", with IPV6_RECVERR set".into(),
        (_, 0xfffc) => ", its error-queue flags unreadable on this kernel".into(),
        _ => ", its FREEBIND and TRANSPARENT flags unreadable on this kernel".into(),
    }
}

/// The name of a socket family (`AF_*`), as `socket(2)` spells it without the prefix.
pub fn family_name(family: u16) -> &'static str {
    match i32::from(family) {
        libc::AF_UNIX => "unix",
        libc::AF_INET => "inet",
        libc::AF_INET6 => "inet6",
        libc::AF_NETLINK => "netlink",
        libc::AF_PACKET => "packet",
        libc::AF_VSOCK => "vsock",
        libc::AF_XDP => "xdp",
        libc::AF_TIPC => "tipc",
        libc::AF_RDS => "rds",
        libc::AF_CAN => "can",
        libc::AF_BLUETOOTH => "bluetooth",
        libc::AF_ALG => "alg",
        libc::AF_KEY => "key",
        libc::AF_LLC => "llc",
        libc::AF_IEEE802154 => "ieee802154",
        libc::AF_ISDN => "isdn",
        libc::AF_PPPOX => "pppox",
        _ => "other",
    }
}

/// One decision record as the kernel wrote it, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub time: BootInstant,
    pub kind: EventKind,
    pub reason: Option<Reason>,
    pub hook: Hook,
    /// 0 when the cgroup is bound to no identity.
    pub identity: u32,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub dest: IpAddr,
    pub port: u16,
    /// Tcp or Udp for flows; None for socket records and other protocols.
    pub proto: Option<Protocol>,
    pub rule_id: u32,
    /// Identical records folded into this one by the kernel's rate limit.
    pub suppressed: u32,
    /// Socket family (`AF_*`) of socket records; 0 on flows.
    pub family: u16,
    pub sock_type: u16,
    pub sock_protocol: u16,
    /// The kernel's rate-limit key of this record: counts the kernel still holds for it
    /// (see `Datapath::drain_idle_counts`) belong to the same flow.
    pub rate_key: c::RateKey,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed event record: {0}")]
pub struct DecodeError(String);

impl EventRecord {
    /// What tells this event from every other: when (CLOCK_BOOTTIME ns) and which thread.
    pub fn key(&self) -> String {
        format!("{}-{}", self.time.0, self.tid)
    }

    /// Decodes the raw bytes of one ring buffer item (which need not be aligned).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return Err(DecodeError(format!(
                "{} bytes, expected {}",
                bytes.len(),
                std::mem::size_of::<Event>()
            )));
        }
        // SAFETY: length checked; Event is plain old data valid for any bit pattern.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Self::from_raw(&e)
    }

    pub fn from_raw(e: &Event) -> Result<Self, DecodeError> {
        let kind = EventKind::from_code(e.kind)
            .ok_or_else(|| DecodeError(format!("unknown kind {}", e.kind)))?;
        let hook = Hook::from_code(e.hook)
            .ok_or_else(|| DecodeError(format!("unknown hook {}", e.hook)))?;
        let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
        Ok(Self {
            time: BootInstant(e.ts_ns),
            kind,
            reason: Reason::from_code(e.reason),
            hook,
            identity: e.identity,
            cgroup_id: e.cgroup_id,
            pid: (e.pid_tgid >> 32) as u32,
            tid: e.pid_tgid as u32,
            uid: e.uid_gid as u32,
            gid: (e.uid_gid >> 32) as u32,
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
            dest: addr_from16(e.addr),
            port: e.port,
            proto: match e.proto {
                c::PROTO_TCP => Some(Protocol::Tcp),
                c::PROTO_UDP => Some(Protocol::Udp),
                _ => None,
            },
            rule_id: e.rule_id,
            suppressed: e.suppressed,
            family: e.family,
            sock_type: e.sock_type,
            sock_protocol: e.sock_protocol,
            rate_key: {
                let socket = c::rate_keyed_by_socket(e.hook, e.port);
                c::RateKey {
                    cgroup_id: e.cgroup_id,
                    addr: e.addr,
                    port: if socket { e.sock_type } else { e.port },
                    kind: e.kind,
                    proto: if socket {
                        e.sock_protocol as u8
                    } else {
                        e.proto
                    },
                    reason: e.reason,
                    family: e.family as u8,
                    inbound: if e.hook == c::HOOK_INGRESS {
                        c::HOOK_INGRESS
                    } else {
                        0
                    },
                    _pad: 0,
                }
            },
        })
    }
}

impl fmt::Display for EventRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pid={} comm={} ",
            self.kind.as_str(),
            self.pid,
            self.comm
        )?;
        if self.hook.is_socket() {
            write!(
                f,
                "socket family={} type={} protocol={}",
                self.family, self.sock_type, self.sock_protocol
            )?;
        } else {
            let proto = self.proto.map_or("other".to_owned(), |p| p.to_string());
            match self.dest {
                IpAddr::V4(a) => write!(f, "{proto} {a}:{}", self.port)?,
                IpAddr::V6(a) => write!(f, "{proto} [{a}]:{}", self.port)?,
            }
        }
        if let Some(r) = self.reason {
            write!(f, " ({r})")?;
        }
        Ok(())
    }
}

/// Reads decision records from the pinned ring buffers: governed identities' first, so a flood
/// of unknown flows never holds them up.
pub struct EventReader {
    governed: RingBuf<MapData>,
    unknown: RingBuf<MapData>,
    /// Readable when either ring is.
    epoll: OwnedFd,
    /// See [`EventReader::skip_first`].
    skip: std::collections::HashSet<String>,
    first_governed: bool,
    first_unknown: bool,
}

impl EventReader {
    pub(crate) fn new(governed: RingBuf<MapData>, unknown: RingBuf<MapData>) -> Self {
        // SAFETY: epoll_create1 has no preconditions; its result is checked.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            raw >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor this reader owns from here.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        for ring in [&governed, &unknown] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0,
            };
            // SAFETY: both descriptors are open; `ev` outlives the call.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    ring.as_raw_fd(),
                    &raw mut ev,
                )
            };
            assert!(rc == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Self {
            governed,
            unknown,
            epoll,
            skip: std::collections::HashSet::new(),
            first_governed: false,
            first_unknown: false,
        }
    }

    /// The next record, if one is waiting. Records that fail to decode are skipped with a
    /// warning: a newer kernel object must never wedge the reader.
    pub fn try_next(&mut self) -> Option<EventRecord> {
        loop {
            let item = match self.governed.next() {
                Some(i) => i,
                None => self.unknown.next()?,
            };
            match EventRecord::decode(&item) {
                Ok(r) => return Some(r),
                Err(e) => tracing::warn!(error = %e, "skipping event record"),
            }
        }
    }

    /// Drains every waiting record.
    pub fn drain(&mut self) -> Vec<EventRecord> {
        std::iter::from_fn(|| self.try_next()).collect()
    }

    /// Hands every waiting record to `each`, one at a time, letting go of each in the ring
    /// only once `each` returned: a crash before then leaves it there for the next start
    /// (which skips, by [`EventReader::skip_first`], the one whose record was written).
    pub fn drain_with(&mut self, mut each: impl FnMut(EventRecord)) {
        // Governed identities' records first, as in `try_next`.
        for unknown in [false, true] {
            loop {
                let ring = if unknown {
                    &mut self.unknown
                } else {
                    &mut self.governed
                };
                let Some(item) = ring.next() else {
                    break;
                };
                let first = if unknown {
                    std::mem::take(&mut self.first_unknown)
                } else {
                    std::mem::take(&mut self.first_governed)
                };
                match EventRecord::decode(&item) {
                    Ok(r) if first && self.skip.contains(&r.key()) => {
                        tracing::info!(event = %r.key(), "event recorded before the node stopped, not recorded again");
                    }
                    Ok(r) => each(r),
                    Err(e) => tracing::warn!(error = %e, "skipping event record"),
                }
                drop(item);
            }
        }
    }

    /// Events whose records the audit log ends with: skipped when either ring starts with
    /// one (the node stopped after writing its record and before letting go of it; other
    /// records may have been written in between).
    pub fn skip_first(&mut self, keys: std::collections::HashSet<String>) {
        self.skip = keys;
        self.first_governed = true;
        self.first_unknown = true;
    }
}

/// Becomes readable when records are waiting (for epoll or tokio's AsyncFd).
impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record's rate key as the kernel makes it (`report_to`): the node finds a folded
    /// record's first record by it, and a key made otherwise leaves the fold nameless.
    #[test]
    fn the_rate_key_is_the_kernels() {
        let event = |hook: u8, port: u16| Event {
            kind: c::EVENT_SOCK_DENY,
            hook,
            port,
            proto: c::PROTO_TCP,
            sock_type: 1,
            sock_protocol: 6,
            identity: 1,
            ..Event::default()
        };
        // The send hook's refusal of a connection's zero-copy send names the connection.
        let k = EventRecord::from_raw(&event(c::HOOK_SOCKET_USE, 443))
            .expect("decodes")
            .rate_key;
        assert_eq!((k.port, k.proto), (443, c::PROTO_TCP));
        // A refused socket is told apart by its type and protocol.
        let k = EventRecord::from_raw(&event(c::HOOK_SOCK_CREATE, 0))
            .expect("decodes")
            .rate_key;
        assert_eq!((k.port, k.proto), (1, 6));
        let k = EventRecord::from_raw(&event(c::HOOK_SOCKET_RECEIVE, 0))
            .expect("decodes")
            .rate_key;
        assert_eq!((k.port, k.proto), (1, 6));
        let k = EventRecord::from_raw(&event(c::HOOK_SOCKET_RECEIVE, 8080))
            .expect("decodes")
            .rate_key;
        assert_eq!((k.port, k.proto), (8080, c::PROTO_TCP));
        // A ring made: a record about no socket and no flow.
        let ring = EventRecord::from_raw(&Event {
            sock_type: 0,
            sock_protocol: 0,
            reason: c::REASON_IO_URING,
            ..event(c::HOOK_IO_URING, 0)
        })
        .expect("decodes");
        assert_eq!(ring.hook, Hook::IoUring);
        assert!(ring.hook.is_socket());
        assert_eq!(ring.reason, Some(Reason::IoUring));
        assert_eq!((ring.rate_key.port, ring.rate_key.proto), (0, 0));
    }
}
