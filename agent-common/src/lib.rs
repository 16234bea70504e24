//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Every struct is `#[repr(C)]` with explicit padding and no `bool`, so the kernel and userspace
//! agree on the bytes without relying on compiler layout choices.
#![no_std]

pub mod http;

/// Bumped whenever a map layout changes: pins live under `<bpffs_dir>/v{ABI_VERSION}`, so a new
/// layout never adopts maps written by an old one.
pub const ABI_VERSION: u32 = 12;

pub const MAP_BINDINGS: &str = "AW_BINDINGS";
pub const MAP_IDENTITIES: &str = "AW_IDENTITIES";
pub const MAP_RULES: &str = "AW_RULES";
pub const MAP_CONFIG: &str = "AW_CONFIG";
pub const MAP_LAYOUT: &str = "AW_LAYOUT";
pub const MAP_EVENTS: &str = "AW_EVENTS";
pub const MAP_EVENT_DROPS: &str = "AW_EVENT_DROPS";
pub const MAP_RATE: &str = "AW_RATE";
pub const MAP_DNS_ORIGIN: &str = "AW_DNS_ORIGIN";
pub const MAP_RULE_HITS: &str = "AW_RULE_HITS";
pub const MAP_SOCKS: &str = "AW_SOCKS";
pub const MAP_UNKNOWN_EVENTS: &str = "AW_UNKNOWN_EVENTS";
pub const MAP_UNKNOWN_RATE: &str = "AW_UNKNOWN_RATE";
pub const MAP_RECORD_USAGE: &str = "AW_RECORD_USAGE";
pub const MAP_PORT_SETS: &str = "AW_PORT_SETS";
pub const MAP_BINDING_SLOTS: &str = "AW_BINDING_SLOTS";
pub const MAP_SNI_NAMES: &str = "AW_SNI_NAMES";
pub const MAP_SNI_SEEN: &str = "AW_SNI_SEEN";
pub const MAP_SNI_SCRATCH: &str = "AW_SNI_SCRATCH";
/// The token of the check that holds a CPU's scratch: pinned with the scratch, so that while
/// a start swaps programs the two builds' checks guard the one scratch they share.
pub const MAP_SNI_GUARD: &str = "AW_SNI_GUARD";
/// The programs `aw_egress` tail-calls (`TAIL_SNI`): pinned, since a program array whose
/// last user reference goes is emptied, and the pinned egress program runs on between nodes.
pub const MAP_TAILS: &str = "AW_TAILS";
pub const TAILS: u32 = 1;
/// `AW_TAILS` slot of the server-name check ([`PROG_EGRESS_SNI`]). What `aw_egress` hands
/// it is part of the map layout: a change to it bumps [`ABI_VERSION`].
pub const TAIL_SNI: u32 = 0;

/// Where this kernel keeps what the task census reads ([`TaskLayout`]); made at each start,
/// never pinned (the census runs only while its node does).
pub const MAP_TASK_LAYOUT: &str = "AW_TASK_LAYOUT";

/// Every map the programs use, in a stable order (pinning, adoption and teardown walk it).
pub const ALL_MAPS: [&str; 21] = [
    MAP_BINDINGS,
    MAP_IDENTITIES,
    MAP_RULES,
    MAP_CONFIG,
    MAP_EVENTS,
    MAP_EVENT_DROPS,
    MAP_RATE,
    MAP_DNS_ORIGIN,
    MAP_RULE_HITS,
    MAP_SOCKS,
    MAP_UNKNOWN_EVENTS,
    MAP_UNKNOWN_RATE,
    MAP_RECORD_USAGE,
    MAP_PORT_SETS,
    MAP_BINDING_SLOTS,
    MAP_LAYOUT,
    MAP_SNI_NAMES,
    MAP_SNI_SEEN,
    MAP_SNI_SCRATCH,
    MAP_TAILS,
    MAP_SNI_GUARD,
];

pub const PROG_CONNECT4: &str = "aw_connect4";
pub const PROG_CONNECT6: &str = "aw_connect6";
pub const PROG_SENDMSG4: &str = "aw_sendmsg4";
pub const PROG_SENDMSG6: &str = "aw_sendmsg6";
pub const PROG_SOCK_CREATE: &str = "aw_sock_create";
pub const PROG_RECVMSG4: &str = "aw_recvmsg4";
pub const PROG_RECVMSG6: &str = "aw_recvmsg6";
pub const PROG_GETPEERNAME4: &str = "aw_getpeername4";
pub const PROG_GETPEERNAME6: &str = "aw_getpeername6";
pub const PROG_EGRESS: &str = "aw_egress";
/// The server-name check, tail-called by `aw_egress` (never attached itself).
pub const PROG_EGRESS_SNI: &str = "aw_egress_sni";
pub const PROG_INGRESS: &str = "aw_ingress";
pub const PROG_SETSOCKOPT: &str = "aw_setsockopt";
/// BPF LSM (`lsm_cgroup/socket_create`): optional, where the kernel's LSM list has `bpf`.
pub const PROG_SOCKET_FAMILY: &str = "aw_socket_family";
/// BPF LSM (`lsm_cgroup/socket_setsockopt`): with the socket-family program, the LSM line.
/// It judges the address options on every path, compat system calls included, which the
/// cgroup `aw_setsockopt` does not see.
pub const PROG_LSM_SETSOCKOPT: &str = "aw_lsm_setsockopt";
/// BPF LSM (`lsm_cgroup/socket_recvmsg`): a governed task reads no socket error queue, however
/// the queue was opened (a compat setsockopt skips the cgroup hook that keeps it closed), and
/// reads only sockets governed as its own (see [`PROG_LSM_SENDMSG`]).
pub const PROG_LSM_RECVMSG: &str = "aw_lsm_recvmsg";
/// BPF LSM (`lsm_cgroup/socket_sendmsg`): a governed task sends on no socket another binding
/// governs, nor on one of a family it may not create.
pub const PROG_LSM_SENDMSG: &str = "aw_lsm_sendmsg";
/// BPF LSM (`lsm_cgroup/file_receive`): a socket handed to a governed task (SCM_RIGHTS,
/// pidfd_getfd) is taken only as one it could have made itself, and is governed as its own.
pub const PROG_LSM_FILE_RECEIVE: &str = "aw_lsm_file_receive";
/// BPF LSM (`lsm_cgroup/socket_bind`): a governed socket binds no address the host does not
/// hold: refused while FREEBIND or TRANSPARENT is set on it, however the flag got there (a
/// helper's setsockopt that raced the receipt, a unit's socket from before `enroll`).
pub const PROG_LSM_BIND: &str = "aw_lsm_bind";
/// BPF LSM (`lsm_cgroup/inode_init_security_anon`): a governed task makes no io_uring
/// instance where its identity's policy refuses io_uring (`enroll` refuses a unit that has
/// one; this keeps it so after). Every ring's file is an anonymous inode of its own, made
/// through this hook, since Linux 5.15.
pub const PROG_LSM_RING_SETUP: &str = "aw_lsm_ring_setup";

/// The task census (`iter/task`): a row for each task on the host that has a descriptor
/// table (see [`TaskTable`]). Loaded beside the programs and never attached to a cgroup:
/// `enroll` reads it to find tasks outside a unit that share a unit's table.
pub const PROG_TASK_TABLES: &str = "aw_task_tables";

/// The BPF LSM programs: loaded and attached together, or not at all.
pub const LSM_PROGRAMS: [&str; 7] = [
    PROG_SOCKET_FAMILY,
    PROG_LSM_SETSOCKOPT,
    PROG_LSM_RECVMSG,
    PROG_LSM_SENDMSG,
    PROG_LSM_FILE_RECEIVE,
    PROG_LSM_BIND,
    PROG_LSM_RING_SETUP,
];

pub const ALL_PROGRAMS: [&str; 19] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_SOCK_CREATE,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_EGRESS,
    PROG_INGRESS,
    PROG_SETSOCKOPT,
    PROG_SOCKET_FAMILY,
    PROG_LSM_SETSOCKOPT,
    PROG_LSM_RECVMSG,
    PROG_LSM_SENDMSG,
    PROG_LSM_FILE_RECEIVE,
    PROG_LSM_BIND,
    PROG_LSM_RING_SETUP,
];

/// Capacity of the identity table; identity 0 is reserved (it means "no identity" in event
/// records), so usable identities are `1..MAX_IDENTITIES`.
pub const MAX_IDENTITIES: u32 = 16384;
pub const MAX_BINDINGS: u32 = 65536;
/// Entries of `AW_BINDING_SLOTS`: one per binding, plus one spare so a renewal still finds a
/// fresh slot when the table is full.
pub const BINDING_SLOTS: u32 = MAX_BINDINGS + 1;
/// [`SockState::binding_slot`] of a socket claimed by the LSM line and not yet settled (never a
/// slot: slots are below [`BINDING_SLOTS`]).
pub const SLOT_CLAIMED: u32 = u32::MAX;
/// Port entries one LPM prefix can carry after less specific rules are merged into it. A rule
/// whose ports would not fit takes one entry that names a [`PortSet`].
pub const MAX_PORT_ENTRIES: usize = 16;
/// Port sets the kernel holds at once, over all identities (content-addressed: identical sets
/// are stored once). Allocated as used.
pub const MAX_PORT_SETS: u32 = 4096;
/// 65,536 ports, one bit each.
pub const PORT_SET_WORDS: usize = 1024;
/// Cgroup levels the ancestor walk looks at (level 0 is the cgroup2 root).
pub const MAX_CGROUP_LEVELS: u32 = 32;
/// Governed identities' records and unbound cgroups' records have a ring buffer each, so a
/// flood of unknown flows can never take the room of a governed denial.
pub const EVENTS_RING_BYTES: u32 = 1024 * 1024;
pub const UNKNOWN_EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Slots of `AW_EVENT_DROPS`: records lost because their ring buffer was full.
pub const DROPS_GOVERNED: u32 = 0;
pub const DROPS_UNKNOWN: u32 = 1;
pub const RATE_ENTRIES: u32 = 16384;
/// Reserved room in the governed ring: once this much of it waits unread, an identity that
/// has written `LOUD_RECORDS` records in the current window writes no more there (counted as
/// dropped), so one identity's flood of distinct flows leaves room for every other
/// identity's records. A window ends once the node has read a quarter of the ring, not on a
/// clock and not on every read: a node that is down or stuck keeps the reserve for the quiet
/// ones, and a node that reads slower than a flood gives the flooder at most
/// `LOUD_RECORDS` of each quarter it reads.
pub const RESERVED_RING_QUARTERS: u64 = 1;
pub const LOUD_RECORDS: u64 = 512;
/// Identical events inside this window are counted instead of written again.
pub const DEFAULT_RATE_WINDOW_NS: u64 = 1_000_000_000;
/// Rules whose hits the kernel counts (LRU: the least recently hit go first when full).
pub const RULE_HIT_ENTRIES: u32 = 65536;

/// Key of `AW_RULE_HITS`: identity in the high 32 bits, rule id in the low.
pub const fn rule_hit_key(identity: u32, rule_id: u32) -> u64 {
    ((identity as u64) << 32) | rule_id as u64
}

/// Server names the TLS check knows, over all identities: (identity, address, name) for every
/// name an identity resolved to an address it learned.
pub const SNI_NAME_ENTRIES: u32 = 65536;
/// Bytes of a server name the check reads (DNS names are at most 253 without the dot).
pub const SNI_NAME_MAX: usize = 256;
/// Refused server names kept for the node to read with their records (LRU).
pub const SNI_SEEN_ENTRIES: u32 = 1024;
/// Rules one (identity, address, name) entry names; a name more rules allow keeps the first.
pub const SNI_RULES: usize = 4;

/// [`IdentityState::sni`]: the TLS server-name check of flows only a name rule allows.
pub const SNI_OFF: u8 = 0;
pub const SNI_AUDIT: u8 = 1;
pub const SNI_ENFORCE: u8 = 2;
/// The check's program is not loaded (the kernel refused it): a TCP connection only a name
/// rule allows is refused at connect ([`REASON_SNI_UNCHECKED`]; recorded and let through in
/// audit mode). What the node writes for [`SNI_ENFORCE`] while the check is unavailable; a
/// program built before it reads the value as [`SNI_ENFORCE`], whose first data then finds
/// no check to run and does not go (closed either way).
pub const SNI_UNCHECKED: u8 = 3;
/// [`SNI_UNCHECKED`] for [`SNI_AUDIT`]: such a connection is recorded (audit, with
/// [`REASON_SNI_UNCHECKED`]) and let through. A program built before it reads the value as
/// [`SNI_ENFORCE`] (closed).
pub const SNI_UNCHECKED_AUDIT: u8 = 4;

/// [`SockState::sni`]: what the packet line still has to do for a connection.
/// Nothing (an address rule allowed it, or its first data passed).
pub const SNI_NONE: u8 = 0;
/// Its first data must name, in a TLS ClientHello, a server the identity resolved to the
/// address; a refusal is recorded and the data let through (audit).
pub const SNI_PENDING_AUDIT: u8 = 1;
/// The same; a refusal drops the data and marks the connection refused.
pub const SNI_PENDING_ENFORCE: u8 = 2;
/// Refused: every later packet with data is dropped (the node ends the connection).
pub const SNI_REFUSED: u8 = 3;
/// The mode bits of a state: [`SNI_PENDING_AUDIT`] or [`SNI_PENDING_ENFORCE`] (what a
/// refusal does), kept through the phases below.
pub const SNI_MODE: u8 = 3;
/// Or-ed with a mode: a TLS ClientHello passed and the server has not answered yet. Until it
/// does, the client may send after the hello (from [`SockState::sni_next`]) only TLS records
/// that cannot carry a hello (change cipher spec, alert, application data): a second hello
/// sent early could be the one a server reads after a HelloRetryRequest.
pub const SNI_WATCH: u8 = 4;
/// Or-ed with a mode: the server's first answer was a HelloRetryRequest (or not a
/// ServerHello): the client's next data, at [`SockState::sni_next`], must be a ClientHello
/// checked like the first (one change cipher spec record may come before it).
pub const SNI_RETRY: u8 = 8;

/// [`SockState::server`]: what the ingress line saw of the server's first data while the
/// connection was in [`SNI_WATCH`]; the egress line, which alone moves [`SockState::sni`] on,
/// acts on it at the client's next packet.
pub const SERVER_UNSEEN: u8 = 0;
/// A ServerHello that is not a HelloRetryRequest: the handshake goes on under the checked
/// hello.
pub const SERVER_HELLO: u8 = 1;
/// A HelloRetryRequest, or anything else than a ServerHello.
pub const SERVER_RETRY: u8 = 2;

/// Sockets whose DNS traffic was steered to the proxy, remembered until they are reused.
pub const DNS_ORIGIN_ENTRIES: u32 = 65536;
/// DNS from identities with name rules is steered to `127.77.(n >> 8).(n & 0xff)`, the proxy
/// address of identity n: the address the proxy receives a query on says who asked, so no
/// lookup can race with a socket being closed and reused.
pub const DNS_PROXY_NET: [u8; 2] = [127, 77];
pub const DNS_PORT: u16 = 53;
/// `fd61:7761:6c6c::/96`: DNS to IPv6 resolvers goes to this prefix + n. The node routes the
/// prefix to itself (a `local` route on `lo`) and binds with IPV6_FREEBIND.
pub const DNS_PROXY_NET6: [u8; 12] = [0xfd, 0x61, 0x77, 0x61, 0x6c, 0x6c, 0, 0, 0, 0, 0, 0];
pub const DNS_PROXY_NET6_LEN: u8 = 96;

/// The IPv6 proxy address of an identity.
pub const fn dns_proxy_addr6(identity: u32) -> [u8; 16] {
    let n = identity.to_be_bytes();
    let p = DNS_PROXY_NET6;
    [
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], n[0], n[1], n[2],
        n[3],
    ]
}

/// The proxy address of an identity, as its four octets.
pub const fn dns_proxy_addr(identity: u32) -> [u8; 4] {
    [
        DNS_PROXY_NET[0],
        DNS_PROXY_NET[1],
        (identity >> 8) as u8,
        identity as u8,
    ]
}

/// Protocol bits in [`PortEntry::proto`] and [`Event::proto`].
pub const PROTO_TCP: u8 = 1;
pub const PROTO_UDP: u8 = 2;
pub const PROTO_ANY: u8 = PROTO_TCP | PROTO_UDP;
/// Ingress rules share the tries with egress rules, under their own protocol bits: an egress
/// lookup (bits 1-2) never matches an ingress entry, nor an ingress lookup an egress one.
pub const PROTO_IN_TCP: u8 = PROTO_TCP << 2;
pub const PROTO_IN_UDP: u8 = PROTO_UDP << 2;

/// [`IdentityState::state`]. Zero is what an unwritten slot reads as, and fails closed.
pub const IDENTITY_UNSET: u8 = 0;
pub const IDENTITY_ACTIVE: u8 = 1;
pub const IDENTITY_REVOKED: u8 = 2;

/// [`IdentityState::mode`].
pub const MODE_ENFORCE: u8 = 0;
pub const MODE_AUDIT: u8 = 1;

/// [`Config::unknown_flows`]: what happens to flows from cgroups bound to no identity.
pub const UNKNOWN_REPORT: u8 = 0;
pub const UNKNOWN_DENY: u8 = 1;
pub const UNKNOWN_IGNORE: u8 = 2;

/// [`Event::kind`].
pub const EVENT_DENY: u8 = 1;
pub const EVENT_AUDIT: u8 = 2;
pub const EVENT_UNKNOWN_FLOW: u8 = 3;
pub const EVENT_SOCK_DENY: u8 = 4;
/// Allowed by a rule (`Config::record_allowed`); carries the rule.
pub const EVENT_ALLOW: u8 = 5;

/// [`Event::reason`]: why a flow was (or would have been) denied.
pub const REASON_NONE: u8 = 0;
pub const REASON_NO_RULE: u8 = 1;
pub const REASON_GLOBAL_DENY: u8 = 2;
pub const REASON_REVOKED: u8 = 3;
pub const REASON_EXPIRED: u8 = 4;
pub const REASON_UNBOUND: u8 = 5;
pub const REASON_SOCKET_TYPE: u8 = 6;
/// A packet's destination on the wire is not one its socket was allowed (and no rule allows
/// it): a routing header, a rewrite after the hooks, a path not thought of.
pub const REASON_WIRE: u8 = 7;
/// A packet carries IPv4 options or IPv6 extension headers, which can steer it past the
/// destination that was judged.
pub const REASON_PACKET_OPTIONS: u8 = 8;
/// A socket of a family a governed agent has no use for (anything but unix, netlink, inet,
/// inet6): vsock, packet, XDP, TIPC, RDS, Bluetooth, CAN, ...
pub const REASON_SOCKET_FAMILY: u8 = 9;
/// The kernel could not keep the socket's state (its storage: kernel memory); without it the
/// packet line could not tell the socket's packets apart, so the socket is refused.
pub const REASON_NO_STORAGE: u8 = 10;
/// A connection or datagram from outside the host that no ingress rule allows.
pub const REASON_INBOUND: u8 = 11;
/// A socket option that lets a socket send from an address the host does not hold
/// (IP_FREEBIND, IPV6_FREEBIND; the TRANSPARENT ones need CAP_NET_ADMIN but are refused too).
pub const REASON_SOCKET_OPTION: u8 = 12;
/// A read of a socket's error queue (`MSG_ERRQUEUE`): ICMP errors reach it without passing the
/// packet line, quoting whatever bytes their sender chose.
pub const REASON_ERROR_QUEUE: u8 = 13;
/// A packet from a loopback source address (127.0.0.0/8, ::1) leaving by another device: an
/// unprivileged sender can ask for `::1` with `IPV6_PKTINFO`.
pub const REASON_LOOPBACK_SOURCE: u8 = 14;
/// A socket another binding governs, used by a governed task (handed over a unix socket): the
/// packet line would judge its packets by the other identity's rules.
pub const REASON_FOREIGN_SOCKET: u8 = 15;
/// A socket handed to a governed task whose queue may hold what no rule judged: a listener (its
/// accept queue), a bound datagram socket without a peer (datagrams from anyone).
pub const REASON_HANDED_SOCKET: u8 = 16;
/// A connection only a name rule allows named, in its TLS ClientHello, a server the identity
/// did not resolve to that address (or one no rule allowing the port names).
pub const REASON_SNI_MISMATCH: u8 = 17;
/// A connection only a name rule allows sent first data that is not a TLS ClientHello with a
/// server name in its first packet (no name, another protocol, a hello split before it).
pub const REASON_SNI_MISSING: u8 = 18;
/// A connection only a name rule allows put its first data out before the check in pages
/// the sender can still change (MSG_ZEROCOPY, io_uring's zero-copy sends, spliced or
/// sendfile pages): what the check read would not be what reaches the peer.
pub const REASON_ZERO_COPY: u8 = 19;
/// A connection whose ClientHello passed the check sent, before the server answered it, data
/// that could hold a second hello (a handshake record, a record cut by its packet's end,
/// bytes never seen, urgent data), or something else than one hello after a
/// HelloRetryRequest: a server could read that hello rather than the one checked.
pub const REASON_AFTER_HELLO: u8 = 20;
/// A TCP connection only a name rule allows, while the server-name check is not loaded
/// ([`SNI_UNCHECKED`]): nothing could read its first data.
pub const REASON_SNI_UNCHECKED: u8 = 21;
/// An io_uring instance taken by a governed task from another process (`pidfd_getfd`, a
/// seccomp listener's `ADDFD`): the ring's work runs as the process that made it,
/// which no hook judges as the agent's.
pub const REASON_FOREIGN_RING: u8 = 22;
/// An io_uring instance a governed task made where its identity's policy refuses
/// io_uring ([`IdentityState::io_uring`] 0): what a ring holds and has in flight is more
/// than any hook reads (a socket another process puts in its table with `MSG_RING`).
pub const REASON_IO_URING: u8 = 23;
/// An inet socket a governed task takes from another process that was made in a cgroup
/// outside the node's attach point ([`Config::attach_cgroup`]): none of the node's programs
/// run for it, so nothing would judge where it connects or sends.
pub const REASON_OUTSIDE_ATTACH: u8 = 24;

/// [`Event::hook`].
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
pub const HOOK_SOCK_CREATE: u8 = 5;
/// The packet line: cgroup_skb egress, every packet a governed socket sends.
pub const HOOK_EGRESS: u8 = 6;
/// BPF LSM `socket_create`: every socket family.
pub const HOOK_SOCKET_FAMILY: u8 = 7;
/// The packet line inbound: cgroup_skb ingress, every packet a governed socket receives. Its
/// records carry the peer in `addr` and the local port in `port`.
pub const HOOK_INGRESS: u8 = 8;
/// cgroup setsockopt: options a governed agent may not set. Records carry the level in
/// `sock_type` and the option in `sock_protocol`.
pub const HOOK_SETSOCKOPT: u8 = 9;
/// BPF LSM `socket_recvmsg`: a governed task reading a socket's error queue.
pub const HOOK_ERROR_QUEUE: u8 = 10;
/// BPF LSM `socket_sendmsg`/`socket_recvmsg`: a governed task using a socket it may not (one of
/// a family it may not create, or one another binding governs). `family` carries its family.
pub const HOOK_SOCKET_USE: u8 = 11;
/// BPF LSM `file_receive`: a socket handed to a governed task that it may not take. `family`
/// and `sock_type` carry the socket's; a refused peer is in `addr` and `port`.
pub const HOOK_SOCKET_RECEIVE: u8 = 12;
/// BPF LSM `socket_bind`: a governed socket's bind refused (FREEBIND or TRANSPARENT set).
/// `family` carries its family and `sock_protocol` the option.
pub const HOOK_SOCKET_BIND: u8 = 13;
/// BPF LSM `inode_init_security_anon`: an io_uring instance a governed task makes
/// (`io_uring_setup`) where its identity's policy refuses io_uring.
pub const HOOK_IO_URING: u8 = 14;
/// Whether a record of `hook` (with `port`) is told apart from others in the rate limiter by
/// its socket type and protocol (`sock_type`, `sock_protocol`) rather than by its port and
/// protocol: the records of a socket without a peer. The kernel's rate key and the node's,
/// which finds a folded record's first record by it, must agree (`report_to` in the eBPF).
pub const fn rate_keyed_by_socket(hook: u8, port: u16) -> bool {
    hook == HOOK_SOCK_CREATE
        || hook == HOOK_SOCKET_FAMILY
        || hook == HOOK_SETSOCKOPT
        || hook == HOOK_IO_URING
        || (hook == HOOK_SOCKET_RECEIVE && port == 0)
}

/// `ifindex` of the loopback device in every network namespace: traffic between local
/// processes, governed by the sender's egress rules.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Socket families a governed agent may create; the LSM line refuses every other one.
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const AF_NETLINK: u16 = 16;

/// Destinations a socket's [`SockState`] remembers: the connected peer and the latest
/// unconnected send.
pub const SOCK_DESTS: usize = 2;
/// [`SockState::dests`] slot of the peer `connect()` was allowed.
pub const SOCK_DEST_CONNECTED: usize = 0;
/// Slot of the destination the latest unconnected send was allowed.
pub const SOCK_DEST_SENT: usize = 1;

/// Value of `AW_BINDINGS` (key: cgroup id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// CLOCK_BOOTTIME deadline in ns after which this binding's certificate has expired and
    /// the cgroup is denied everything; 0 = none. Per binding, because each launch presents
    /// its own certificate.
    pub not_after_ns: u64,
    pub identity: u32,
    /// Index of this binding's copy in `AW_BINDING_SLOTS`, which sockets note at creation.
    pub slot: u32,
    /// Level of the bound cgroup under the cgroup2 root, kept so a restarted daemon can rebuild
    /// [`Config::bound_levels`] from the pinned map alone.
    pub level: u8,
    /// Non-zero: the certificate behind this binding was revoked (a CRL lists it); the cgroup
    /// stays bound and is denied everything.
    pub revoked: u8,
    pub _pad: [u8; 6],
}

/// Value of `AW_BINDING_SLOTS` (index: [`Binding::slot`]): a copy of one binding, so the
/// packet line reads a socket's binding with an array lookup rather than a hash lookup on
/// every packet. Valid only while `cgroup_id` is the socket's [`SockState::binding_cgroup`];
/// otherwise the packet line falls back to `AW_BINDINGS`, which stays the authority.
/// Userspace writes a slot in full before any socket can name it, changes nothing but
/// `revoked` while its cgroup id stands, and takes the cgroup id away before reusing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindingSlot {
    pub cgroup_id: u64,
    pub binding: Binding,
}

/// Value of `AW_IDENTITIES` (index: identity number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityState {
    pub state: u8,
    pub mode: u8,
    /// Non-zero: the identity has name rules, so its DNS goes through the node's proxy.
    pub dns: u8,
    /// [`SNI_OFF`], [`SNI_AUDIT`], [`SNI_ENFORCE`], [`SNI_UNCHECKED`] or
    /// [`SNI_UNCHECKED_AUDIT`].
    pub sni: u8,
    /// Non-zero: the identity's policy allows io_uring (`io_uring: allow`); otherwise its
    /// tasks make no ring, where the kernel runs BPF LSM programs. A map written
    /// before the field had it 0: refusing until the node writes its policy.
    pub io_uring: u8,
    pub _pad: [u8; 3],
}

/// Value of `AW_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub rate_window_ns: u64,
    /// Bit n set: some cgroup at level n is bound. The ancestor walk skips the other levels.
    pub bound_levels: u32,
    pub unknown_flows: u8,
    /// Non-zero: flows a rule allows are reported too (rate-limited like every record), the
    /// raw material of unused-rule reports and policy simulation.
    pub record_allowed: u8,
    /// Port the DNS proxy listens on at every identity's proxy address; 0 = no proxy, and
    /// nothing is steered.
    pub dns_port: u16,
    /// Non-zero: a bound cgroup may hold sockets without state (made before it was bound,
    /// or before this map layout), so the packet line asks, for a socket without state,
    /// whether its cgroup is bound. Zero spares the host's ungoverned traffic that lookup.
    pub strays: u8,
    pub _pad: [u8; 3],
    /// The revision of the programs the pinned links run (a digest of the eBPF object that
    /// attached or last replaced them), written by userspace and read by no program: a
    /// node whose build differs replaces each program in its link. Zero in pins from before
    /// it was kept, in what was padding.
    pub programs: u32,
    /// The cgroup the programs are attached to (its kernfs id) and its depth: a socket made
    /// in a cgroup outside it runs none of the programs, so a governed task may not take
    /// one from another process. Level 0 (the root) holds every cgroup.
    pub attach_cgroup: u64,
    pub attach_level: u32,
    pub _pad2: u32,
}

/// A field of a kernel struct the BPF LSM programs read at an offset fixed when they are
/// built: `struct socket` (unchanged since Linux 2.6) and the head of `struct sock_common`
/// (the same wherever network namespaces and IPv6 are built in, as on every kernel with BPF
/// LSM we know). The verifier checks only that a load stays inside some field, so the node
/// checks each offset against the running kernel's BTF before it loads those programs.
pub struct KernelField {
    pub strukt: &'static str,
    pub field: &'static str,
    /// Bytes from the start of the struct.
    pub at: usize,
}

pub const SOCKET_TYPE_AT: usize = 4;
pub const SOCKET_FILE_AT: usize = 16;
pub const SOCKET_SK_AT: usize = 24;
pub const SKC_DADDR_AT: usize = 0;
pub const SKC_DPORT_AT: usize = 12;
pub const SKC_NUM_AT: usize = 14;
pub const SKC_FAMILY_AT: usize = 16;
pub const SKC_STATE_AT: usize = 18;
pub const SKC_V6_DADDR_AT: usize = 56;

pub const KERNEL_FIELDS: [KernelField; 9] = [
    KernelField {
        strukt: "socket",
        field: "type",
        at: SOCKET_TYPE_AT,
    },
    KernelField {
        strukt: "socket",
        field: "file",
        at: SOCKET_FILE_AT,
    },
    KernelField {
        strukt: "socket",
        field: "sk",
        at: SOCKET_SK_AT,
    },
    KernelField {
        strukt: "sock_common",
        field: "skc_daddr",
        at: SKC_DADDR_AT,
    },
    KernelField {
        strukt: "sock_common",
        field: "skc_dport",
        at: SKC_DPORT_AT,
    },
    KernelField {
        strukt: "sock_common",
        field: "skc_num",
        at: SKC_NUM_AT,
    },
    KernelField {
        strukt: "sock_common",
        field: "skc_family",
        at: SKC_FAMILY_AT,
    },
    KernelField {
        strukt: "sock_common",
        field: "skc_state",
        at: SKC_STATE_AT,
    },
    KernelField {
        strukt: "sock_common",
        field: "skc_v6_daddr",
        at: SKC_V6_DADDR_AT,
    },
];

/// Value of `AW_LAYOUT[0]`: where this kernel keeps what the receipt line reads at offsets
/// that move between kernels, found in its BTF. Offsets are bytes from the start of
/// `struct sock` unless a field says otherwise; 0 (or a zero mask) is unknown, and the receipt line then refuses what it
/// cannot judge.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// An inet socket's FREEBIND and TRANSPARENT flags (bits of `inet_sock.inet_flags` from
    /// Linux 6.5, bitfields of `inet_sock` before); the bit of each within its byte below.
    pub freebind_at: u16,
    pub transparent_at: u16,
    /// `sk_backlog.rmem_alloc`: the bytes of received data a socket holds, in every queue.
    pub rmem_alloc_at: u16,
    /// `sk_protocol`: a datagram socket's protocol (UDP; or ICMP, UDP-Lite, L2TP, which
    /// governed agents may not make).
    pub protocol_at: u16,
    /// `sk_userlocks`' `SOCK_BINDADDR_LOCK`: the socket's local address was chosen by
    /// `bind()`, not by the kernel (a bitfield before Linux 6.x, a byte since).
    pub bindaddr_at: u16,
    /// `sk_lock.owned`: a task holds the socket's lock, in the middle of a call on it (a
    /// bind between its address check and `SOCK_BINDADDR_LOCK`, say).
    pub owned_at: u16,
    pub freebind_mask: u8,
    pub transparent_mask: u8,
    pub bindaddr_mask: u8,
    pub _pad: u8,
    /// `msg_flags` in `struct msghdr` (bytes from its start), which moves as the kernel's
    /// `iov_iter` grows: where a send says it is zero-copy or spliced.
    pub msg_flags_at: u16,
    /// `head` and `end` in `struct sk_buff`, and `flags` in `struct skb_shared_info` (which
    /// sits at `head + end`): whether a packet's data is in pages its sender can still
    /// change. These three are read by the packet line whatever the BPF LSM line does.
    pub skb_head_at: u16,
    pub skb_end_at: u16,
    pub shinfo_flags_at: u16,
    /// `SKBFL_SHARED_FRAG | SKBFL_ZEROCOPY_ENABLE` on this kernel; zero: unknown, and the
    /// first data of a connection the server-name check watches is refused.
    pub shared_frag_mask: u8,
    pub _pad2: u8,
    /// `f_path.dentry` in `struct file`, and `d_name.len` and `d_name.name` in `struct
    /// dentry`: the name an io_uring instance's file has (`[io_uring]`), read where a
    /// governed task receives a file that is no socket. Any zero: unknown, and every such
    /// file is refused to governed tasks.
    pub file_dentry_at: u16,
    pub dentry_len_at: u16,
    pub dentry_name_at: u16,
    /// An inet socket's `IP_RECVERR` flag (`INET_FLAGS_RECVERR` in `inet_flags` from Linux
    /// 6.5, the `inet_sock.recverr` bitfield before), found as the FREEBIND flag is: a
    /// socket with its ICMP error queue open, which the setsockopt program keeps shut on
    /// governed sockets but cannot for one made elsewhere or set through a compat call.
    pub recverr_at: u16,
    /// `IPV6_RECVERR`: `INET_FLAGS_RECVERR6` in `inet_flags` from Linux 6.7 (`pinet6_at`
    /// then 0, and this offset is from the socket), the `ipv6_pinfo.recverr` bitfield
    /// before (this offset then from the `ipv6_pinfo` that `inet_sock.pinet6`, at
    /// `pinet6_at`, points to).
    pub recverr6_at: u16,
    pub pinet6_at: u16,
    pub recverr_mask: u8,
    pub recverr6_mask: u8,
    /// `sk_cgrp_data.cgroup` in `struct sock` (the cgroup the socket was made in, whose
    /// programs run for it), then `level`, `ancestors` and `kn` in `struct cgroup`, and `id`
    /// in `struct kernfs_node`: whether a handed socket's cgroup is within the attach point
    /// ([`Config::attach_cgroup`]). Any zero: unknown, and with an attach point below the
    /// root every inet socket handed to a governed task is refused.
    pub sk_cgroup_at: u16,
    pub cgroup_level_at: u16,
    pub cgroup_ancestors_at: u16,
    pub cgroup_kn_at: u16,
    pub kn_id_at: u16,
    /// Where the current task's saved registers (`struct pt_regs`) keep the number of the
    /// system call it is in (`orig_ax` on x86-64, `syscallno` on arm64), and the number of
    /// the native `setsockopt`: only that call runs the cgroup setsockopt program after the
    /// LSM hook (a compat or x32 call, or io_uring's `SOCKET_URING_OP_SETSOCKOPT` on a ring
    /// made through the compat gate, skips it). Either zero: unknown, and an error-queue
    /// option set on another path is refused only where the socket is used.
    pub syscall_nr_at: u16,
    pub setsockopt_nr: u16,
}

/// Value of `AW_TASK_LAYOUT[0]`: where this kernel keeps what the task census reads, bytes
/// from the start of each struct, found in its BTF. `files_at` zero: unknown, and the census
/// writes no row (an enroll then refuses, finding none of the unit's tasks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskLayout {
    /// `task_struct.files`, `.pid` (the task's number on the host), `.cgroups`.
    pub files_at: u32,
    pub pid_at: u32,
    pub cgroups_at: u32,
    /// `files_struct.count.counter`: the references to a descriptor table, one for each task
    /// using it.
    pub count_at: u32,
    /// `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`: the task's cgroup (v2) id.
    pub dfl_cgrp_at: u32,
    pub kn_at: u32,
    pub kn_id_at: u32,
    /// `task_struct.io_uring` (zero: a kernel without io_uring), then
    /// `io_uring_task.registered_rings`, `file.f_inode`, `inode.i_ino`: the io_uring
    /// instances a task registered with itself (`IORING_REGISTER_RING_FDS`), which it uses
    /// with no descriptor. `rings_at` zero: a kernel without them (before Linux 5.18), and no
    /// row has any.
    pub uring_at: u32,
    pub rings_at: u32,
    pub f_inode_at: u32,
    pub i_ino_at: u32,
}

/// `IO_RINGFD_REG_MAX`: the io_uring instances a task can register with itself.
pub const MAX_REGISTERED_RINGS: usize = 16;

/// One row of the task census: a task, its descriptor table's address (compared, never shown;
/// 0 for a task without one) and the table's count of references, read at the row.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskTable {
    pub files: u64,
    /// The task's cgroup id; 0 where it could not be read.
    pub cgroup: u64,
    pub tid: u32,
    pub count: u32,
    /// How many slots follow the row, each two `u64`s, the file in one of the slots where a
    /// task registers io_uring instances with itself (0: empty; compared, never shown) and
    /// its inode: none for a task without an io_uring context or a kernel without them,
    /// [`MAX_REGISTERED_RINGS`] else (one, a file of unread inode, where the context could
    /// not be read).
    pub rings: u32,
    /// Non-zero: the task has an io_uring context (it made or entered a ring, or is a ring's
    /// SQPOLL thread: whatever it has in flight is held there), or that could not be read.
    pub uring: u32,
}

/// LPM key data: an IPv6 address; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`, prefix + 96).
pub type Addr = [u8; 16];

/// One allowed port range for one protocol mask, from one rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    /// Prefix length (in the 128-bit key space) of the rule this entry came from; compared with
    /// the global deny prefix for the exact-address exception.
    pub prefix_len: u8,
    /// Non-zero: a host entry learned from the identity's DNS answers for a name rule. A
    /// connection only such entries allow has its TLS server name checked.
    pub name: u8,
    pub _pad: u8,
    pub rule_id: u32,
    /// 0: the range is the entry's ports. Otherwise the key of a [`PortSet`] in
    /// `AW_PORT_SETS` holding them (within the range); a missing set allows nothing.
    pub port_set: u32,
    /// CLOCK_BOOTTIME deadline in ns after which the entry no longer allows; 0 = none.
    pub expires_ns: u64,
}

/// Value of `AW_PORT_SETS`: the ports of a rule with more ranges than a trie value holds,
/// bit `p % 64` of word `p / 64` for port p.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSet {
    pub bits: [u64; PORT_SET_WORDS],
}

impl Default for PortSet {
    fn default() -> Self {
        Self {
            bits: [0; PORT_SET_WORDS],
        }
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] |= 1 << (port % 64);
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port) / 64] >> (port % 64) & 1 != 0
    }
}

/// Value of a per-identity LPM trie.
///
/// Entries are sorted by `prefix_len` descending, then `rule_id` ascending, so the first entry
/// that matches is the most specific rule. The global deny list is compiled into every
/// identity's trie: `deny_len` is the longest global deny prefix covering this key (0 = none),
/// and an entry less specific than it does not allow. One lookup answers both questions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub count: u8,
    /// Prefix length of the trie key this value is stored under.
    pub prefix_len: u8,
    pub deny_len: u8,
    pub _pad: [u8; 5],
    pub entries: [PortEntry; MAX_PORT_ENTRIES],
}

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            count: 0,
            prefix_len: 0,
            deny_len: 0,
            _pad: [0; 5],
            entries: [PortEntry::default(); MAX_PORT_ENTRIES],
        }
    }
}

/// Value of `AW_DNS_ORIGIN` (key: socket cookie): where a steered socket meant to go, so
/// replies and `getpeername` show the resolver it asked instead of the proxy. Addresses are
/// 32-bit words in the hooks' `user_ip6` layout (IPv4 as `::ffff:a.b.c.d`); addresses and
/// ports in network byte order, as the hooks see them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrigin {
    pub resolver: [u32; 4],
    pub proxy: [u32; 4],
    pub resolver_port: u16,
    pub proxy_port: u16,
    pub _pad: u32,
}

/// Value of `AW_SOCKS`, socket storage of every socket a governed task connected or sent on:
/// where the hooks allowed it to send, checked against every packet it puts on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The cgroup whose binding governs the socket (the key of `AW_BINDINGS`): revocation
    /// and the certificate deadline are read from it on every packet.
    pub binding_cgroup: u64,
    /// Destinations as judged (IPv4 mapped, unspecified addresses as their loopback); the
    /// DNS proxy's address for a steered socket.
    pub dests: [Addr; SOCK_DESTS],
    /// Ports in host byte order; 0 = slot empty.
    pub ports: [u16; SOCK_DESTS],
    /// [`Binding::slot`] of the binding at creation: where the packet line looks first.
    /// [`SLOT_CLAIMED`]: a governed task took the socket up before any hook of its binding
    /// saw it; the packet line settles it as that binding's at its next packet.
    pub binding_slot: u32,
    /// [`SNI_NONE`], [`SNI_PENDING_AUDIT`], [`SNI_PENDING_ENFORCE`] or [`SNI_REFUSED`]; a
    /// mode or-ed with [`SNI_WATCH`] or [`SNI_RETRY`]. Once the first data (and for TLS the
    /// server's first answer) passed, `SNI_NONE`: the data passed only if none of it was in
    /// pages its sender could change, so the same bytes sent again (whole or in pieces) need
    /// no look.
    pub sni: u8,
    /// [`SERVER_UNSEEN`], [`SERVER_HELLO`] or [`SERVER_RETRY`].
    pub server: u8,
    pub _pad: [u8; 2],
    /// [`SNI_WATCH`] and [`SNI_RETRY`]: the client's sequence number where its next TLS record
    /// starts; every byte before it was read.
    pub sni_next: u32,
    /// [`SNI_WATCH`]: the server's sequence number where its first data starts.
    pub server_first: u32,
    pub _pad2: u32,
}

/// Key of `AW_SNI_NAMES` (value: the rules allowing the name, `[u32; SNI_RULES]`, 0 = none),
/// and value of `AW_SNI_SEEN` (key: the refusal record's time) and of the per-CPU scratch the
/// check builds it in. `name` is lower case without a trailing dot, zero after `len` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniName {
    pub identity: u32,
    pub len: u16,
    /// The connection's local port in `AW_SNI_SEEN` (the node ends that connection); 0 in
    /// keys.
    pub local_port: u16,
    /// The connection's far port in `AW_SNI_SEEN`; 0 in keys.
    pub port: u16,
    /// Non-zero in `AW_SNI_SEEN`: the connection was refused (enforce), not only recorded.
    pub cut: u8,
    pub _pad: [u8; 5],
    pub addr: Addr,
    pub name: [u8; SNI_NAME_MAX],
}

impl Default for SniName {
    fn default() -> Self {
        Self {
            identity: 0,
            len: 0,
            local_port: 0,
            port: 0,
            cut: 0,
            _pad: [0; 5],
            addr: [0; 16],
            name: [0; SNI_NAME_MAX],
        }
    }
}

/// A record on the `AW_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME in ns.
    pub ts_ns: u64,
    /// The cgroup of the task (the leaf, not the bound ancestor).
    pub cgroup_id: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub addr: Addr,
    /// 0 for cgroups bound to no identity.
    pub identity: u32,
    /// Rule that allowed the flow (audit records of allowed-by-rule flows have none): 0 = none.
    pub rule_id: u32,
    /// Identical events folded into this one by the in-kernel rate limit since the last record.
    pub suppressed: u32,
    pub port: u16,
    pub kind: u8,
    pub reason: u8,
    pub proto: u8,
    pub hook: u8,
    /// Socket family of socket records (`AF_*`); 0 on the others.
    pub family: u16,
    pub sock_type: u16,
    pub sock_protocol: u16,
    pub comm: [u8; 16],
}

/// Key of the `AW_RATE` LRU map: what makes two events "identical".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub cgroup_id: u64,
    pub addr: Addr,
    pub port: u16,
    pub kind: u8,
    pub proto: u8,
    pub reason: u8,
    /// Socket family of socket records (fits a byte: `AF_MAX` is 46).
    pub family: u8,
    /// `HOOK_INGRESS` for inbound records, 0 otherwise: a peer's packets and packets to that
    /// peer are never folded together.
    pub inbound: u8,
    pub _pad: u8,
}

/// Value of `AW_RECORD_USAGE` (index: identity): governed records written in the window that
/// began with the ring's consumer at `consumer_pos` (see [`LOUD_RECORDS`]). Plain stores for
/// the position, an atomic add for the count: approximate when the node reads mid-flood,
/// which a fairness threshold can afford.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordUsage {
    pub consumer_pos: u64,
    pub written: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub last_ns: u64,
    /// Events counted since the last record; a record takes it with one atomic exchange, so
    /// two CPUs reporting the same key at once never carry the same events twice.
    pub suppressed: u64,
    /// When the first and the latest of the suppressed events happened (0: none yet). Plain
    /// stores: approximate under concurrency, which timestamps of a run can afford.
    pub first_ns: u64,
    pub seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, made of integers with explicit padding fields, so
    // every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for Binding {}
    unsafe impl aya::Pod for BindingSlot {}
    unsafe impl aya::Pod for IdentityState {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for KernelLayout {}
    unsafe impl aya::Pod for TaskLayout {}
    unsafe impl aya::Pod for PortEntry {}
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for RateKey {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for DnsOrigin {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for RecordUsage {}
    unsafe impl aya::Pod for PortSet {}
    unsafe impl aya::Pod for SniName {}
}

// Layout guards: the kernel and userspace must agree on these sizes byte for byte.
const _: () = assert!(core::mem::size_of::<IdentityState>() == 8);
const _: () = assert!(core::mem::size_of::<Config>() == 40);
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 54);
const _: () = assert!(core::mem::size_of::<TaskLayout>() == 44);
const _: () = assert!(core::mem::size_of::<TaskTable>() == 32);
const _: () = assert!(core::mem::size_of::<PortEntry>() == 24);
const _: () = assert!(core::mem::size_of::<PortSet>() == 8192);
const _: () = assert!(core::mem::size_of::<RuleSet>() == 8 + 24 * MAX_PORT_ENTRIES);
const _: () = assert!(core::mem::size_of::<Event>() == 88);
const _: () = assert!(core::mem::size_of::<RateKey>() == 32);
const _: () = assert!(core::mem::size_of::<RateState>() == 32);
const _: () = assert!(core::mem::size_of::<DnsOrigin>() == 40);
const _: () = assert!(core::mem::size_of::<SockState>() == 8 + 16 * SOCK_DESTS + 24);
const _: () = assert!(core::mem::size_of::<SniName>() == 32 + SNI_NAME_MAX);
const _: () = assert!(core::mem::offset_of!(SniName, name) % 8 == 0);
const _: () = assert!(core::mem::size_of::<Binding>() == 24);
const _: () = assert!(core::mem::size_of::<BindingSlot>() == 32);
// The packet line compares `dests` a word at a time.
const _: () = assert!(core::mem::offset_of!(SockState, dests) % 8 == 0);
const _: () = assert!(core::mem::align_of::<SockState>() == 8);
