//! The rule model shared by the compiler, the reference evaluator and the datapath.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use agent_common as c;
use ipnet::IpNet;

use crate::clock::BootInstant;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("invalid port {value:?}: expected a number 1-65535 or a range like \"8000-8100\"")]
    BadPort { value: String },
    #[error("invalid port range {value:?}: the first port is greater than the last")]
    ReversedRange { value: String },
    #[error("invalid protocol {value:?}: expected tcp, udp or any")]
    BadProtocol { value: String },
    #[error("invalid mode {value:?}: expected enforce or audit")]
    BadMode { value: String },
    #[error("invalid sni {value:?}: expected enforce, audit or off")]
    BadSni { value: String },
    #[error("invalid io_uring {value:?}: expected refuse or allow")]
    BadIoUring { value: String },
    #[error("invalid unknown_flows {value:?}: expected report, deny or ignore")]
    BadUnknownFlows { value: String },
}

/// Protocols a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

impl Protocol {
    pub fn mask(self) -> u8 {
        match self {
            Self::Tcp => c::PROTO_TCP,
            Self::Udp => c::PROTO_UDP,
            Self::Any => c::PROTO_ANY,
        }
    }
}

impl FromStr for Protocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "any" => Ok(Self::Any),
            _ => Err(ModelError::BadProtocol { value: s.into() }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Any => "any",
        })
    }
}

/// Which way a rule lets traffic go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Out: `to` are destinations and `ports` theirs.
    #[default]
    Egress,
    /// In from outside the host: `to` are the peers allowed, `ports` the agent's own.
    Ingress,
}

impl Direction {
    /// The protocol bits a rule's entries carry in the shared trie.
    pub fn mask(self, protocol: Protocol) -> u8 {
        match self {
            Self::Egress => protocol.mask(),
            Self::Ingress => protocol.mask() << 2,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        })
    }
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: Self = Self { lo: 0, hi: 65535 };

    pub fn single(p: u16) -> Self {
        Self { lo: p, hi: p }
    }

    pub fn contains(self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

impl FromStr for PortRange {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::BadPort { value: s.into() };
        let port = |t: &str| -> Result<u16, ModelError> {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            match t.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad()),
            }
        };
        let r = match s.split_once('-') {
            Some((a, b)) => Self {
                lo: port(a)?,
                hi: port(b)?,
            },
            None => Self::single(port(s)?),
        };
        if r.lo > r.hi {
            return Err(ModelError::ReversedRange { value: s.into() });
        }
        Ok(r)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::ANY {
            f.write_str("any")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A prefix in the datapath's single address space: IPv6 as is, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`, length + 96). Host bits are always zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Net {
    pub addr: [u8; 16],
    pub len: u8,
}

/// `::ffff:0:0/96`, where every IPv4 address lives.
pub const V4_SPACE: Net = Net {
    addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0],
    len: 96,
};

impl Net {
    pub fn new(addr: [u8; 16], len: u8) -> Self {
        let len = len.min(128);
        Self {
            addr: mask(addr, len),
            len,
        }
    }

    /// The /128 of an address; IPv4 and IPv4-mapped IPv6 give the same key.
    pub fn host(ip: IpAddr) -> Self {
        Self::new(addr16(ip), 128)
    }

    pub fn contains(&self, other: &Net) -> bool {
        self.len <= other.len && mask(other.addr, self.len) == self.addr
    }

    /// Whether this prefix lies in the IPv4 space (and so is judged by IPv4 rules only).
    pub fn is_v4(&self) -> bool {
        V4_SPACE.contains(self)
    }
}

impl From<IpNet> for Net {
    fn from(n: IpNet) -> Self {
        match n {
            IpNet::V4(v4) => Self::new(v4.addr().to_ipv6_mapped().octets(), v4.prefix_len() + 96),
            IpNet::V6(v6) => Self::new(v6.addr().octets(), v6.prefix_len()),
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_v4() {
            let a = &self.addr;
            write!(
                f,
                "{}/{}",
                Ipv4Addr::new(a[12], a[13], a[14], a[15]),
                self.len - 96
            )
        } else {
            write!(f, "{}/{}", Ipv6Addr::from(self.addr), self.len)
        }
    }
}

pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a datapath key stands for: IPv4 for the IPv4-mapped space.
pub fn addr_from16(a: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn mask(mut a: [u8; 16], len: u8) -> [u8; 16] {
    for (i, b) in a.iter_mut().enumerate() {
        let bit = (i * 8) as u8;
        if bit >= len {
            *b = 0;
        } else if len - bit < 8 {
            *b &= 0xffu8 << (8 - (len - bit));
        }
    }
    a
}

/// The global deny list when the policy has no `GlobalDeny` document: the cloud metadata
/// endpoints, denied to every identity unless a rule names them exactly.
pub const DEFAULT_GLOBAL_DENY: [&str; 2] = ["169.254.169.254/32", "fd00:ec2::254/128"];

/// Where the kernel sends a connect or send to `ip`: the unspecified address (`0.0.0.0`,
/// `::`, `::ffff:0.0.0.0`) means loopback there, so that is what is judged.
pub fn judged_destination(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified()) => {
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        other => other,
    }
}

/// One allow rule of an identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Reported in decision records; unique within an identity, never 0.
    pub id: u32,
    pub to: Vec<IpNet>,
    /// Name patterns: their addresses reach the trie as host rules once the identity's own
    /// DNS answers name them (see `crate::dns`).
    pub fqdns: Vec<super::fqdn::FqdnPattern>,
    /// ECH public names (the outer server name of an Encrypted ClientHello) the server-name
    /// check accepts at the addresses `fqdns` learn.
    pub ech: Box<[Box<str>]>,
    /// Empty means any port.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub direction: Direction,
    pub expires: Option<BootInstant>,
    /// A host rule learned from the identity's DNS answer for one of this rule's names: a
    /// connection only such rules allow has its TLS server name checked.
    pub learned: bool,
}

/// `enforce` denies; `audit` reports what would be denied and allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl FromStr for Mode {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "audit" => Ok(Self::Audit),
            _ => Err(ModelError::BadMode { value: s.into() }),
        }
    }
}

/// The TLS server-name check of connections only a name rule allows (their address was
/// learned from the identity's DNS answers and no address rule allows it): `enforce` cuts a
/// connection whose ClientHello names a server the identity did not resolve to that address,
/// `audit` records it, `off` does not look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SniCheck {
    #[default]
    Enforce,
    Audit,
    Off,
}

impl FromStr for SniCheck {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "audit" => Ok(Self::Audit),
            "off" => Ok(Self::Off),
            _ => Err(ModelError::BadSni { value: s.into() }),
        }
    }
}

impl SniCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Off => "off",
        }
    }
}

/// Whether an agent `launch` starts may use io_uring. Refused by default: another process
/// holding the agent's ring can put a socket into its fixed-file table
/// (`IORING_OP_MSG_RING`), past every hook that judges sockets an agent receives, and a
/// ring handed in may hold sockets the agent never had a descriptor for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoUring {
    #[default]
    Refuse,
    Allow,
}

impl FromStr for IoUring {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "allow" => Ok(Self::Allow),
            _ => Err(ModelError::BadIoUring { value: s.into() }),
        }
    }
}

impl IoUring {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::Allow => "allow",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityStatus {
    Active,
    Revoked,
}

/// What the datapath knows of an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityView {
    pub status: IdentityStatus,
    pub mode: Mode,
    pub not_after: Option<BootInstant>,
}

/// What happens to flows from cgroups bound to no identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UnknownFlows {
    /// Allow and report (the raw material of shadow-AI discovery).
    #[default]
    Report,
    Deny,
    Ignore,
}

impl UnknownFlows {
    pub fn code(self) -> u8 {
        match self {
            Self::Report => c::UNKNOWN_REPORT,
            Self::Deny => c::UNKNOWN_DENY,
            Self::Ignore => c::UNKNOWN_IGNORE,
        }
    }
}

impl FromStr for UnknownFlows {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "report" => Ok(Self::Report),
            "deny" => Ok(Self::Deny),
            "ignore" => Ok(Self::Ignore),
            _ => Err(ModelError::BadUnknownFlows { value: s.into() }),
        }
    }
}

/// Why a flow was (or in audit mode would have been) denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    NoRule,
    GlobalDeny,
    Revoked,
    Expired,
    Unbound,
    SocketType,
    /// The packet line: a packet's destination on the wire is not one its socket was allowed.
    Wire,
    /// The packet line: IPv4 options or IPv6 extension headers.
    PacketOptions,
    /// A socket family a governed agent has no use for (the BPF LSM line).
    SocketFamily,
    /// The kernel could not keep the socket's state (socket storage).
    NoStorage,
    /// From outside the host, and no ingress rule allows it.
    Inbound,
    /// A socket option that would let the agent send from an address the host does not hold.
    SocketOption,
    /// A read of a socket's error queue (the BPF LSM line).
    ErrorQueue,
    /// The packet line: a loopback source address on a packet leaving by another device.
    LoopbackSource,
    /// A socket another binding governs, sent or read on by a governed task (the BPF LSM line).
    ForeignSocket,
    /// A listener, or a bound datagram socket without a peer, handed to a governed task: its
    /// queue may hold what no rule judged (the BPF LSM line).
    HandedSocket,
    /// The packet line: a connection only a name rule allows named, in its TLS ClientHello,
    /// a server the identity did not resolve to that address under a rule for that port.
    SniMismatch,
    /// The packet line: a connection only a name rule allows sent first data that is not a
    /// TLS ClientHello with a server name in its first packet.
    SniMissing,
    /// A connection only a name rule allows sent its first data, or was set to send it, from
    /// pages its task could change after the check read them (zero-copy, spliced pages).
    ZeroCopy,
    /// A connection whose ClientHello passed sent, before the server answered, data that could
    /// hold a second hello; or, after a HelloRetryRequest, something else than one hello.
    AfterHello,
    /// A TCP connection only a name rule allows, refused at connect: the kernel did not load
    /// the server-name check's program, so nothing could read its first data.
    SniUnchecked,
    /// An io_uring instance taken by a governed task from another process (the BPF LSM line):
    /// its work would run as the process that made it.
    ForeignRing,
    /// An io_uring instance a governed task made where its identity's policy refuses
    /// io_uring (the BPF LSM line).
    IoUring,
    /// A socket taken from another process that was made in a cgroup outside the node's
    /// attach point, where none of its programs run (the BPF LSM line).
    OutsideAttach,
}

impl Reason {
    pub fn code(self) -> u8 {
        match self {
            Self::NoRule => c::REASON_NO_RULE,
            Self::GlobalDeny => c::REASON_GLOBAL_DENY,
            Self::Revoked => c::REASON_REVOKED,
            Self::Expired => c::REASON_EXPIRED,
            Self::Unbound => c::REASON_UNBOUND,
            Self::SocketType => c::REASON_SOCKET_TYPE,
            Self::Wire => c::REASON_WIRE,
            Self::PacketOptions => c::REASON_PACKET_OPTIONS,
            Self::SocketFamily => c::REASON_SOCKET_FAMILY,
            Self::NoStorage => c::REASON_NO_STORAGE,
            Self::Inbound => c::REASON_INBOUND,
            Self::SocketOption => c::REASON_SOCKET_OPTION,
            Self::ErrorQueue => c::REASON_ERROR_QUEUE,
            Self::LoopbackSource => c::REASON_LOOPBACK_SOURCE,
            Self::ForeignSocket => c::REASON_FOREIGN_SOCKET,
            Self::HandedSocket => c::REASON_HANDED_SOCKET,
            Self::SniMismatch => c::REASON_SNI_MISMATCH,
            Self::SniMissing => c::REASON_SNI_MISSING,
            Self::ZeroCopy => c::REASON_ZERO_COPY,
            Self::AfterHello => c::REASON_AFTER_HELLO,
            Self::SniUnchecked => c::REASON_SNI_UNCHECKED,
            Self::ForeignRing => c::REASON_FOREIGN_RING,
            Self::IoUring => c::REASON_IO_URING,
            Self::OutsideAttach => c::REASON_OUTSIDE_ATTACH,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            c::REASON_NO_RULE => Self::NoRule,
            c::REASON_GLOBAL_DENY => Self::GlobalDeny,
            c::REASON_REVOKED => Self::Revoked,
            c::REASON_EXPIRED => Self::Expired,
            c::REASON_UNBOUND => Self::Unbound,
            c::REASON_SOCKET_TYPE => Self::SocketType,
            c::REASON_WIRE => Self::Wire,
            c::REASON_PACKET_OPTIONS => Self::PacketOptions,
            c::REASON_SOCKET_FAMILY => Self::SocketFamily,
            c::REASON_NO_STORAGE => Self::NoStorage,
            c::REASON_INBOUND => Self::Inbound,
            c::REASON_SOCKET_OPTION => Self::SocketOption,
            c::REASON_ERROR_QUEUE => Self::ErrorQueue,
            c::REASON_LOOPBACK_SOURCE => Self::LoopbackSource,
            c::REASON_FOREIGN_SOCKET => Self::ForeignSocket,
            c::REASON_HANDED_SOCKET => Self::HandedSocket,
            c::REASON_SNI_MISMATCH => Self::SniMismatch,
            c::REASON_SNI_MISSING => Self::SniMissing,
            c::REASON_ZERO_COPY => Self::ZeroCopy,
            c::REASON_AFTER_HELLO => Self::AfterHello,
            c::REASON_SNI_UNCHECKED => Self::SniUnchecked,
            c::REASON_FOREIGN_RING => Self::ForeignRing,
            c::REASON_IO_URING => Self::IoUring,
            c::REASON_OUTSIDE_ATTACH => Self::OutsideAttach,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRule => "no rule allows it",
            Self::GlobalDeny => "global deny list",
            Self::Revoked => "identity revoked",
            Self::Expired => "identity expired",
            Self::Unbound => "no identity (unknown_flows = deny)",
            Self::SocketType => "socket type not allowed",
            Self::Wire => "packet sent somewhere its socket was not allowed",
            Self::PacketOptions => {
                "IP options, IPv6 extension headers or an IPv4-mapped address on IPv6"
            }
            Self::SocketFamily => "socket family not allowed",
            Self::NoStorage => "socket state could not be kept (kernel memory)",
            Self::Inbound => "no ingress rule allows it",
            Self::SocketOption => "socket option not allowed (non-local source address)",
            Self::ErrorQueue => "socket error queue closed (ICMP errors carry unjudged bytes)",
            Self::LoopbackSource => "loopback source address on a packet leaving the host",
            Self::ForeignSocket => "socket another identity's session governs",
            Self::HandedSocket => {
                "handed a listener, an unconnected bound socket or one holding datagrams (its queue was never judged)"
            }
            Self::SniMismatch => {
                "server name (TLS SNI or HTTP Host) not one the identity resolved to this address"
            }
            Self::SniMissing => {
                "first data of a connection only a name rule allows is neither a TLS ClientHello naming one server nor an HTTP/1 request with one Host and Connection: close"
            }
            Self::ZeroCopy => {
                "zero-copy or spliced send before a connection only a name rule allows had its server name checked"
            }
            Self::AfterHello => {
                "data that could hold a second ClientHello, sent after the checked one before the server answered it (or not a hello after a HelloRetryRequest)"
            }
            Self::SniUnchecked => {
                "a connection only a name rule allows, while the kernel's server-name check is not loaded (see status)"
            }
            Self::ForeignRing => {
                "io_uring instance from another process (its work would run as that process, ungoverned)"
            }
            Self::IoUring => "io_uring, which the identity's policy refuses",
            Self::OutsideAttach => {
                "socket made in a cgroup outside the node's attach point (none of its programs would judge it)"
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_with_clear_errors() {
        assert_eq!("443".parse::<PortRange>().unwrap(), PortRange::single(443));
        assert_eq!(
            "8000-8100".parse::<PortRange>().unwrap(),
            PortRange { lo: 8000, hi: 8100 }
        );
        for bad in ["0", "65536", "", "-1", "80-", "a", "1-2-3", "+80"] {
            assert_eq!(
                bad.parse::<PortRange>().unwrap_err(),
                ModelError::BadPort { value: bad.into() },
                "{bad}"
            );
        }
        assert_eq!(
            "90-80".parse::<PortRange>().unwrap_err().to_string(),
            "invalid port range \"90-80\": the first port is greater than the last"
        );
    }

    #[test]
    fn ipv4_lives_in_the_mapped_space() {
        let n: Net = "10.1.2.0/24".parse::<IpNet>().unwrap().into();
        assert_eq!(n.len, 120);
        assert!(n.is_v4());
        assert_eq!(n.to_string(), "10.1.2.0/24");
        assert!(n.contains(&Net::host("10.1.2.3".parse().unwrap())));
        assert!(n.contains(&Net::host("::ffff:10.1.2.3".parse().unwrap())));
        let v6: Net = "2001:db8::/32".parse::<IpNet>().unwrap().into();
        assert!(!v6.is_v4());
        let all6: Net = "::/0".parse::<IpNet>().unwrap().into();
        assert!(!all6.is_v4());
    }

    #[test]
    fn net_masks_host_bits() {
        let n = Net::new(addr16("10.1.2.3".parse().unwrap()), 120);
        assert_eq!(n.to_string(), "10.1.2.0/24");
        let n = Net::new(addr16("10.255.2.3".parse().unwrap()), 105);
        assert_eq!(n.to_string(), "10.128.0.0/9");
    }
}
