//! agentwall's kernel datapath: cgroup hooks that judge every connect, unconnected UDP send and
//! socket creation of governed cgroups against per-identity allowlists.
//!
//! Each program is a thin entry calling a `try_…` function; the verdict never depends on whether
//! the event record could be written.
#![no_std]
#![no_main]
// The BPF target has no atomic types with read-modify-write; the intrinsic lowers to BPF_XADD.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use agent_common::{
    AF_INET, AF_INET6, AF_NETLINK, AF_UNIX, Addr, BINDING_SLOTS, Binding, BindingSlot, Config,
    DEFAULT_RATE_WINDOW_NS, DNS_ORIGIN_ENTRIES, DNS_PORT, DROPS_GOVERNED, DROPS_UNKNOWN, DnsOrigin,
    EVENT_ALLOW, EVENT_AUDIT, EVENT_DENY, EVENT_SOCK_DENY, EVENT_UNKNOWN_FLOW, EVENTS_RING_BYTES,
    Event, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_EGRESS, HOOK_ERROR_QUEUE, HOOK_INGRESS,
    HOOK_IO_URING, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SETSOCKOPT, HOOK_SOCK_CREATE,
    HOOK_SOCKET_BIND, HOOK_SOCKET_FAMILY, HOOK_SOCKET_RECEIVE, HOOK_SOCKET_USE, IDENTITY_ACTIVE,
    IdentityState, KernelLayout, LOOPBACK_IFINDEX, LOUD_RECORDS, MAX_BINDINGS, MAX_CGROUP_LEVELS,
    MAX_IDENTITIES, MAX_PORT_ENTRIES, MAX_PORT_SETS, MAX_REGISTERED_RINGS, MODE_AUDIT,
    PORT_SET_WORDS, PROTO_TCP, PROTO_UDP, PortSet, RATE_ENTRIES, REASON_AFTER_HELLO,
    REASON_ERROR_QUEUE, REASON_EXPIRED, REASON_FOREIGN_RING, REASON_FOREIGN_SOCKET,
    REASON_GLOBAL_DENY, REASON_HANDED_SOCKET, REASON_INBOUND, REASON_IO_URING,
    REASON_LOOPBACK_SOURCE, REASON_NO_RULE, REASON_NO_STORAGE, REASON_NONE, REASON_OUTSIDE_ATTACH,
    REASON_PACKET_OPTIONS, REASON_REVOKED, REASON_SNI_MISMATCH, REASON_SNI_MISSING,
    REASON_SNI_UNCHECKED, REASON_SOCKET_FAMILY, REASON_SOCKET_OPTION, REASON_SOCKET_TYPE,
    REASON_UNBOUND, REASON_WIRE, REASON_ZERO_COPY, RESERVED_RING_QUARTERS, RULE_HIT_ENTRIES,
    RateKey, RateState, RecordUsage, RuleSet, SERVER_HELLO, SERVER_RETRY, SERVER_UNSEEN,
    SLOT_CLAIMED, SNI_AUDIT, SNI_ENFORCE, SNI_MODE, SNI_NAME_ENTRIES, SNI_NAME_MAX, SNI_NONE,
    SNI_OFF, SNI_PENDING_AUDIT, SNI_PENDING_ENFORCE, SNI_REFUSED, SNI_RETRY, SNI_RULES,
    SNI_SEEN_ENTRIES, SNI_UNCHECKED, SNI_UNCHECKED_AUDIT, SNI_WATCH, SOCK_DEST_CONNECTED,
    SOCK_DEST_SENT, SOCK_DESTS, SniName, SockState, TAIL_SNI, TAILS, TaskLayout, TaskTable,
    UNKNOWN_DENY, UNKNOWN_EVENTS_RING_BYTES, UNKNOWN_IGNORE, dns_proxy_addr, dns_proxy_addr6, http,
    rate_keyed_by_socket, rule_hit_key,
};
use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock_addr,
    },
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray,
        ProgramArray, RingBuf, lpm_trie::Key,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task_btf, bpf_get_prandom_u32, bpf_get_socket_uid, bpf_ringbuf_query,
            bpf_seq_write, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id,
            bpf_skb_cgroup_id, bpf_skb_load_bytes, bpf_skc_to_tcp_sock, bpf_sock_from_file,
            bpf_task_pt_regs,
        },
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, lsm_cgroup},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext, SockoptContext},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// Internal verdict: allow, after pointing the socket at the identity's DNS proxy address.
const STEER: i32 = 2;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[btf_map]
static AW_BINDINGS: HashMap<u64, Binding, { MAX_BINDINGS as usize }> = HashMap::new();
#[btf_map]
static AW_BINDING_SLOTS: Array<BindingSlot, { BINDING_SLOTS as usize }> = Array::new();
#[btf_map]
static AW_IDENTITIES: Array<IdentityState, { MAX_IDENTITIES as usize }> = Array::new();
/// Slot n holds identity n's LPM trie (global deny list compiled in). Userspace swaps a whole
/// trie in one update, which is what makes a policy change atomic for a connecting process.
#[btf_map]
static AW_RULES: ArrayOfMaps<LpmTrie<Addr, RuleSetWords, 1>, { MAX_IDENTITIES as usize }> =
    ArrayOfMaps::new();

/// A [`RuleSet`] as the template's BTF describes it: words, not a struct. Userspace creates
/// the tries it swaps in without BTF, and Linux before 6.2 only accepts an inner map whose
/// BTF-derived value layout (`timer_off`) matches the template's; a struct value gives
/// -ENOENT there, a non-struct the same -EINVAL as no BTF at all.
type RuleSetWords = [u64; core::mem::size_of::<RuleSet>() / 8];
const _: () = assert!(core::mem::size_of::<RuleSet>() % 8 == 0);
#[btf_map]
static AW_CONFIG: Array<Config, 1> = Array::new();
/// Where this kernel keeps the socket fields the receipt line reads; userspace fills it
/// from the kernel's BTF.
#[btf_map]
static AW_LAYOUT: Array<KernelLayout, 1> = Array::new();
/// Ports of rules with more ranges than a trie value holds (see `PortEntry::port_set`).
#[btf_map]
static AW_PORT_SETS: HashMap<
    u32,
    PortSet,
    { MAX_PORT_SETS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
/// Records of governed identities.
#[btf_map]
static AW_EVENTS: RingBuf<Event, { EVENTS_RING_BYTES as usize }> = RingBuf::new();
/// Records of cgroups bound to no identity: any local user can fill this one, never the other.
#[btf_map]
static AW_UNKNOWN_EVENTS: RingBuf<Event, { UNKNOWN_EVENTS_RING_BYTES as usize }> = RingBuf::new();
/// Slot DROPS_GOVERNED / DROPS_UNKNOWN: records that found their ring buffer full.
#[btf_map]
static AW_EVENT_DROPS: PerCpuArray<u64, 2> = PerCpuArray::new();
/// Governed records each identity wrote in the current window: the loud one loses the reserved
/// room of the governed ring first.
#[btf_map]
static AW_RECORD_USAGE: Array<RecordUsage, { MAX_IDENTITIES as usize }> = Array::new();
/// Rate-limit state of governed records; unbound cgroups have their own table, so their flood
/// never evicts a governed identity's counts.
#[btf_map]
static AW_RATE: LruHashMap<RateKey, RateState, { RATE_ENTRIES as usize }> = LruHashMap::new();
#[btf_map]
static AW_UNKNOWN_RATE: LruHashMap<RateKey, RateState, { RATE_ENTRIES as usize }> =
    LruHashMap::new();
/// The server names each identity resolved to each address it learned, with the name rules
/// allowing them: what a connection only a name rule allows may name in its ClientHello.
#[btf_map]
static AW_SNI_NAMES: HashMap<
    SniName,
    [u32; SNI_RULES],
    { SNI_NAME_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
/// Refused server names by their record's time, with the connection's ports: the node names
/// them in the record and ends the connection.
#[btf_map]
static AW_SNI_SEEN: LruHashMap<u64, SniName, { SNI_SEEN_ENTRIES as usize }> = LruHashMap::new();
/// Where the check builds a name (too big for the stack).
#[btf_map]
static AW_SNI_SCRATCH: PerCpuArray<SniName, 1> = PerCpuArray::new();
/// The programs `aw_egress` hands packets on to (`TAIL_SNI`: the server-name check).
#[btf_map]
static AW_TAILS: ProgramArray<{ TAILS as usize }> = ProgramArray::new();
/// Where the check reads an HTTP request's head (too big for the stack).
#[btf_map]
static AW_HTTP_SCRATCH: PerCpuArray<HttpScratch, 1> = PerCpuArray::new();
/// The token of the check that holds this CPU's scratch.
#[btf_map]
static AW_SNI_GUARD: PerCpuArray<u64, 1> = PerCpuArray::new();
/// Socket storage of every socket a governed task created, connected or sent on: its binding
/// and where it was allowed to send. Written out by hand rather than with aya-ebpf's
/// `SkStorage`, whose flags are fixed: BPF_F_CLONE makes a connection a governed listener
/// accepts inherit the listener's storage, so revocation and expiry reach it too.
#[repr(C)]
struct SockStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}
// SAFETY: placeholder pointers the loader patches; never dereferenced.
unsafe impl Sync for SockStorage {}
#[btf_map]
static AW_SOCKS: SockStorage = SockStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The storage of `sk`, created (zeroed) when `create` and missing; null when there is none
/// or it cannot be made.
#[inline(always)]
fn sock_state(sk: *mut core::ffi::c_void, create: bool) -> *mut SockState {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `sk` is a socket pointer the verifier has typed; plain-old-data value.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&AW_SOCKS).cast_mut().cast(),
            sk,
            core::ptr::null_mut(),
            flags,
        )
    }
    .cast::<SockState>()
}
/// Flows each rule allowed, per CPU (key: `rule_hit_key`).
#[btf_map]
static AW_RULE_HITS: LruPerCpuHashMap<u64, u64, { RULE_HIT_ENTRIES as usize }> =
    LruPerCpuHashMap::new();
#[btf_map]
static AW_DNS_ORIGIN: LruHashMap<u64, DnsOrigin, { DNS_ORIGIN_ENTRIES as usize }> =
    LruHashMap::new();

/// `::ffff:0:0/96`'s third word, as the hooks hold it (network byte order in memory).
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// What a hook saw, in the one address space the tries use.
#[derive(Clone, Copy)]
struct Flow {
    addr: Addr,
    port: u16,
    proto: u8,
    hook: u8,
    /// Socket family, on socket records.
    family: u16,
    sock_type: u16,
    sock_protocol: u16,
}

impl Flow {
    /// A socket record: no address, port or protocol bit, the socket's own facts instead.
    #[inline(always)]
    const fn socket(hook: u8, family: u16, sock_type: u16, sock_protocol: u16) -> Flow {
        Flow {
            addr: [0; 16],
            port: 0,
            proto: 0,
            hook,
            family,
            sock_type,
            sock_protocol,
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn aw_connect4(ctx: SockAddrContext) -> i32 {
    try_sock_addr4(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn aw_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sock_addr4(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(connect6)]
pub fn aw_connect6(ctx: SockAddrContext) -> i32 {
    try_sock_addr6(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn aw_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sock_addr6(&ctx, HOOK_SENDMSG6)
}

#[cgroup_sock(sock_create)]
pub fn aw_sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx)
}

/// Every socket family, where the kernel runs BPF LSM programs: a governed agent creates only
/// unix, netlink, inet and inet6 sockets (`sock_create` sees inet ones only).
#[lsm_cgroup(hook = "socket_create")]
pub fn aw_socket_family(ctx: LsmContext) -> i32 {
    try_socket_family(&ctx)
}

/// The packet line: every packet a governed socket puts on the wire goes where the hooks
/// allowed that socket to send, from an identity that is still live.
#[cgroup_skb(egress)]
pub fn aw_egress(ctx: SkBuffContext) -> i32 {
    let verdict = try_egress(&ctx);
    if verdict != SNI_TAIL {
        return verdict;
    }
    // SAFETY: a tail call with this program's context; it returns only when it fails.
    unsafe { AW_TAILS.tail_call(&ctx, TAIL_SNI) };
    no_check(ctx.skb.skb)
}

/// A packet for the server-name check whose program is not in its slot: a start the kernel
/// refused this build's check cleared it (a connection an earlier build let start, or one
/// the packet line took over, waits for the check), or a start that loads it has not filled
/// it yet. In the check's audit, the packet goes and the connection is done with, recorded
/// as unchecked; otherwise it does not go, and the connection's state is left as it is: a
/// slot filled a moment later checks its next try.
#[inline(never)]
fn no_check(skb: *mut __sk_buff) -> i32 {
    let Some((st, identity)) = sni_owner(skb) else {
        return DENY;
    };
    // SAFETY: non-null storage pointer.
    if unsafe { core::ptr::read_volatile(&raw const (*st).sni) } & SNI_MODE != SNI_PENDING_AUDIT {
        return DENY;
    }
    // SAFETY: as above.
    let flow = unsafe {
        core::ptr::write_volatile(&raw mut (*st).sni, SNI_NONE);
        Flow {
            addr: (*st).dests[SOCK_DEST_CONNECTED],
            port: (*st).ports[SOCK_DEST_CONNECTED],
            proto: PROTO_TCP,
            hook: HOOK_EGRESS,
            family: 0,
            sock_type: 0,
            sock_protocol: 0,
        }
    };
    let (leaf, who) = whose(skb);
    report(
        &flow,
        leaf,
        identity,
        EVENT_AUDIT,
        REASON_SNI_UNCHECKED,
        0,
        0,
        who,
    );
    ALLOW
}

/// The server-name check of a packet the packet line allowed, on a connection only a name
/// rule allows (see [`sni_check`]), reached from `aw_egress` by a tail call: a program of its
/// own, the kernel's verifier checks it once rather than once for every way through
/// `aw_egress` that reaches it.
#[cgroup_skb(egress)]
pub fn aw_egress_sni(ctx: SkBuffContext) -> i32 {
    try_egress_sni(&ctx)
}

/// The packet line inbound: every packet a governed socket receives from outside the host is
/// a reply to what it was allowed to send, or allowed by an ingress rule.
#[cgroup_skb(ingress)]
pub fn aw_ingress(ctx: SkBuffContext) -> i32 {
    try_ingress(&ctx)
}

/// Socket options that would let a governed socket send from an address the host does not
/// hold: the packet line checks where packets go, not where they claim to come from.
#[cgroup_sockopt(setsockopt)]
pub fn aw_setsockopt(ctx: SockoptContext) -> i32 {
    try_setsockopt(&ctx)
}

/// The same, where the kernel runs BPF LSM programs: compat system calls included.
#[lsm_cgroup(hook = "socket_setsockopt")]
pub fn aw_lsm_setsockopt(ctx: LsmContext) -> i32 {
    try_lsm_setsockopt(&ctx)
}

/// The ICMP error queue, where the kernel runs BPF LSM programs: a governed task reads none;
/// and it reads only sockets governed as its own.
#[lsm_cgroup(hook = "socket_recvmsg")]
pub fn aw_lsm_recvmsg(ctx: LsmContext) -> i32 {
    try_lsm_recvmsg(&ctx)
}

/// A governed task sends only on sockets governed as its own, where the kernel runs BPF LSM
/// programs.
#[lsm_cgroup(hook = "socket_sendmsg")]
pub fn aw_lsm_sendmsg(ctx: LsmContext) -> i32 {
    try_socket_use(&ctx, true)
}

/// A descriptor a governed task receives (SCM_RIGHTS, pidfd_getfd): a socket made elsewhere
/// is taken only as one the task could have made itself, and is governed as its own from
/// then on.
#[lsm_cgroup(hook = "file_receive")]
pub fn aw_lsm_file_receive(ctx: LsmContext) -> i32 {
    try_file_receive(&ctx)
}

/// A governed socket binds only addresses the host holds, where the kernel runs BPF LSM
/// programs.
#[lsm_cgroup(hook = "socket_bind")]
pub fn aw_lsm_bind(ctx: LsmContext) -> i32 {
    try_socket_bind(&ctx)
}

/// A governed task makes no io_uring instance where its identity's policy refuses io_uring:
/// what a ring holds and has in flight is more than any hook reads.
#[lsm_cgroup(hook = "inode_init_security_anon")]
pub fn aw_lsm_ring_setup(ctx: LsmContext) -> i32 {
    try_ring_setup(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn aw_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername4)]
pub fn aw_getpeername4(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn aw_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn aw_getpeername6(ctx: SockAddrContext) -> i32 {
    try_restore(&ctx, true)
}

/// Replies from the proxy, and the peer of a socket connected to it, show the resolver the
/// socket asked: stub resolvers drop answers from any other address. Always returns 1 (these
/// hooks cannot deny).
#[inline(always)]
fn try_restore(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: a cookie lookup on the context's socket; plain-old-data map value.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    let Some(o) = (unsafe { AW_DNS_ORIGIN.get(cookie) }) else {
        return ALLOW;
    };
    let o = *o;
    // SAFETY: recvmsg and getpeername programs may read and write user_ip4/user_ip6/user_port.
    unsafe {
        if (*sa).user_port as u16 != o.proxy_port {
            return ALLOW;
        }
        if v6 {
            let (w0, w1, w2, w3) = (
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            );
            if [w0, w1, w2, w3] == o.proxy {
                (*sa).user_ip6[0] = o.resolver[0];
                (*sa).user_ip6[1] = o.resolver[1];
                (*sa).user_ip6[2] = o.resolver[2];
                (*sa).user_ip6[3] = o.resolver[3];
                (*sa).user_port = u32::from(o.resolver_port);
            }
        } else if o.proxy[0] == 0
            && o.proxy[1] == 0
            && o.proxy[2] == MAPPED_WORD
            && (*sa).user_ip4 == o.proxy[3]
        {
            (*sa).user_ip4 = o.resolver[3];
            (*sa).user_port = u32::from(o.resolver_port);
        }
    }
    ALLOW
}

/// How a steered socket addresses its resolver.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// AF_INET: `user_ip4`.
    V4,
    /// AF_INET6 with an IPv4-mapped resolver: `user_ip6`, IPv4 proxy address mapped.
    Mapped,
    /// AF_INET6 with an IPv6 resolver: `user_ip6`, the IPv6 proxy address.
    V6,
}

/// Points a DNS socket at the proxy address of `identity` and remembers where it meant to go.
/// `resolver` is the destination in `user_ip6` layout, `port` the context's (network byte
/// order). Returns the proxy's address as the packet line compares it, and its port.
#[inline(always)]
fn steer(
    ctx: &SockAddrContext,
    identity: u32,
    resolver: [u32; 4],
    port: u32,
    fam: Family,
) -> (Addr, u16) {
    let dns_port = match config() {
        Some(c) => c.dns_port,
        None => 0,
    };
    let v4 = dns_proxy_addr(identity);
    let mut judged = [0u8; 16];
    let proxy = if fam == Family::V6 {
        let a = dns_proxy_addr6(identity);
        judged = a;
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    } else {
        judged[10] = 0xff;
        judged[11] = 0xff;
        judged[12] = v4[0];
        judged[13] = v4[1];
        judged[14] = v4[2];
        judged[15] = v4[3];
        [0, 0, MAPPED_WORD, u32::from_ne_bytes(v4)]
    };
    let proxy_port = dns_port.to_be();
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: connect and sendmsg programs may write the destination; the cookie helper takes
    // the context.
    unsafe {
        let cookie = bpf_get_socket_cookie(sa as *mut _);
        // A full LRU evicts the oldest socket's entry; a failed insert only means replies keep
        // the proxy's address, which stub resolvers reject: closed, not open.
        let _ = AW_DNS_ORIGIN.insert(
            cookie,
            DnsOrigin {
                resolver,
                proxy,
                resolver_port: port as u16,
                proxy_port,
                _pad: 0,
            },
            0,
        );
        match fam {
            Family::V4 => (*sa).user_ip4 = proxy[3],
            Family::Mapped => (*sa).user_ip6[3] = proxy[3],
            Family::V6 => {
                (*sa).user_ip6[0] = proxy[0];
                (*sa).user_ip6[1] = proxy[1];
                (*sa).user_ip6[2] = proxy[2];
                (*sa).user_ip6[3] = proxy[3];
            }
        }
        (*sa).user_port = u32::from(proxy_port);
    }
    (judged, dns_port)
}

#[inline(always)]
fn proto_bit(protocol: u32) -> u8 {
    match protocol {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => 0,
    }
}

/// The slot of [`SockState::dests`] a hook's verdict fills.
#[inline(always)]
fn slot_of(hook: u8) -> usize {
    if hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6 {
        SOCK_DEST_CONNECTED
    } else {
        SOCK_DEST_SENT
    }
}

/// Writes down, on the socket, a destination the hooks allowed a governed task: the packet
/// line lets the socket's packets go there. Without the record the packets would not be
/// recognised, so a socket that cannot get storage is denied (closed, not open).
#[inline(always)]
fn remember(ctx: &SockAddrContext, flow: &Flow, j: &Judged, addr: Addr, port: u16) -> i32 {
    // SAFETY: the context's socket, as the kernel hands it to sock_addr programs.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let st = sock_state(sk.cast(), true);
    if st.is_null() {
        report(
            flow,
            j.leaf,
            j.identity,
            EVENT_DENY,
            REASON_NO_STORAGE,
            0,
            j.now,
            Who::Task,
        );
        return DENY;
    }
    let slot = slot_of(flow.hook);
    // The binding only where none is written yet: a socket another binding governs keeps it
    // (its packets are judged by that binding's rules, and this one's verdict says nothing
    // about them).
    // SAFETY: a non-null pointer from the storage helper.
    let held = unsafe { atomic_cmpxchg(&raw mut (*st).binding_cgroup, 0, j.binding_cgroup) };
    if held != 0 && held != j.binding_cgroup {
        report(
            flow,
            j.leaf,
            j.identity,
            EVENT_DENY,
            REASON_FOREIGN_SOCKET,
            0,
            j.now,
            Who::Task,
        );
        return DENY;
    }
    // SAFETY: as above.
    unsafe {
        (*st).binding_slot = j.binding_slot;
        (*st).dests[slot] = addr;
        (*st).ports[slot] = port;
        if slot == SOCK_DEST_CONNECTED {
            (*st).sni = j.sni;
        }
    }
    ALLOW
}

/// After the verdict: steer DNS, write down what a governed socket may send to, and record
/// the allowed flow (`record_allowed`).
#[inline(always)]
fn conclude(
    ctx: &SockAddrContext,
    flow: &Flow,
    j: &Judged,
    port: u32,
    resolver: [u32; 4],
    fam: Family,
) -> i32 {
    match j.verdict {
        STEER => {
            let (proxy, proxy_port) = steer(ctx, j.identity, resolver, port, fam);
            remember(ctx, flow, j, proxy, proxy_port)
        }
        ALLOW if j.binding_cgroup != 0 => {
            let v = remember(ctx, flow, j, flow.addr, flow.port);
            if v == ALLOW && j.allowed_rule != 0 && record_allowed() {
                count_hit(j.identity, j.allowed_rule);
                report(
                    flow,
                    j.leaf,
                    j.identity,
                    EVENT_ALLOW,
                    REASON_NONE,
                    j.allowed_rule,
                    j.now,
                    Who::Task,
                );
            }
            v
        }
        v => v,
    }
}

#[inline(always)]
fn record_allowed() -> bool {
    match config() {
        Some(c) => c.record_allowed != 0,
        None => false,
    }
}

#[inline(always)]
fn try_sock_addr4(ctx: &SockAddrContext, hook: u8) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands sock_addr programs a valid context; the verifier checks each
    // field access.
    let (ip, port, protocol, ty) =
        unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol, (*sa).type_) };
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    // user_ip4 holds the address in network byte order, so its in-memory bytes are the octets.
    // 0.0.0.0 is where the kernel sends to loopback (127.0.0.1) after this hook: it is judged
    // as that.
    let octets = if ip == 0 {
        [127, 0, 0, 1]
    } else {
        ip.to_ne_bytes()
    };
    addr[12] = octets[0];
    addr[13] = octets[1];
    addr[14] = octets[2];
    addr[15] = octets[3];
    let flow = flow_of(addr, port, protocol, ty, hook);
    // SAFETY: the context's socket, as the kernel hands it to sock_addr programs.
    let j = judge(&flow, unsafe { (*sa).__bindgen_anon_1.sk }.cast());
    conclude(ctx, &flow, &j, port, [0, 0, MAPPED_WORD, ip], Family::V4)
}

/// An address held as four 32-bit words in network order (how the kernel's contexts hold
/// IPv6 addresses) as the 16 bytes rules are keyed by.
#[inline(always)]
fn addr_of_words(words: [u32; 4]) -> Addr {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}

#[inline(always)]
fn try_sock_addr6(ctx: &SockAddrContext, hook: u8) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as above; user_ip6 must be read one 32-bit word at a time.
    let (w0, w1, w2, w3, port, protocol, ty) = unsafe {
        (
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
            (*sa).user_port,
            (*sa).protocol,
            (*sa).type_,
        )
    };
    let mut addr = addr_of_words([w0, w1, w2, w3]);
    // `::` is where the kernel sends to loopback (::1) after this hook, and `::ffff:0.0.0.0`
    // to 127.0.0.1: each is judged as that.
    if w0 == 0 && w1 == 0 && w3 == 0 {
        if w2 == 0 {
            addr[15] = 1;
        } else if w2 == MAPPED_WORD {
            addr[12] = 127;
            addr[15] = 1;
        }
    }
    // An IPv4-mapped destination (::ffff:a.b.c.d) already sits where IPv4 rules live in the
    // trie, so it is judged as its IPv4 address without a special case.
    let flow = flow_of(addr, port, protocol, ty, hook);
    // SAFETY: as above.
    let j = judge(&flow, unsafe { (*sa).__bindgen_anon_1.sk }.cast());
    let fam = if w0 == 0 && w1 == 0 && w2 == MAPPED_WORD {
        Family::Mapped
    } else {
        Family::V6
    };
    conclude(ctx, &flow, &j, port, [w0, w1, w2, w3], fam)
}

/// `port` as the context holds it (network byte order in the low 16 bits).
#[inline(always)]
fn flow_of(addr: Addr, port: u32, protocol: u32, ty: u32, hook: u8) -> Flow {
    Flow {
        addr,
        port: u16::from_be(port as u16),
        proto: proto_bit(protocol),
        hook,
        family: 0,
        sock_type: ty as u16,
        sock_protocol: protocol as u16,
    }
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) -> i32 {
    // SAFETY: the kernel hands sock programs a valid bpf_sock.
    let (family, ty, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((binding_cgroup, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    let identity = binding.identity;
    let flow = Flow::socket(HOOK_SOCK_CREATE, family as u16, ty as u16, protocol as u16);
    if (ty == SOCK_STREAM && protocol == IPPROTO_TCP)
        || (ty == SOCK_DGRAM && protocol == IPPROTO_UDP)
    {
        // The socket is governed from birth: a listener, and (storage cloned) every
        // connection it accepts, stop at the packet line when the binding is revoked or
        // expires, even though no hook ever judges them.
        let st = sock_state(ctx.sock.cast(), true);
        if st.is_null() {
            report(
                &flow,
                leaf,
                identity,
                EVENT_SOCK_DENY,
                REASON_NO_STORAGE,
                0,
                0,
                Who::Task,
            );
            return DENY;
        }
        // SAFETY: a non-null pointer from the storage helper.
        unsafe {
            (*st).binding_cgroup = binding_cgroup;
            (*st).binding_slot = binding.slot;
        }
        return ALLOW;
    }
    refuse_task(&flow, leaf, &binding, REASON_SOCKET_TYPE)
}

/// A socket operation refused to a governed task (a socket type or family, a socket option,
/// an error-queue read): recorded, then refused, or in audit mode let through. Revoked and
/// expired identities are refused in either mode.
#[inline(always)]
fn refuse_task(flow: &Flow, leaf: u64, binding: &Binding, reason: u8) -> i32 {
    let audit = match AW_IDENTITIES.get(binding.identity) {
        Some(st) => st.mode == MODE_AUDIT && liveness(st.state, binding, &mut 0) == REASON_NONE,
        None => false,
    };
    let kind = if audit { EVENT_AUDIT } else { EVENT_SOCK_DENY };
    report(flow, leaf, binding.identity, kind, reason, 0, 0, Who::Task);
    if audit { ALLOW } else { DENY }
}

/// `socket_create(int family, int type, int protocol, int kern)`. BPF LSM cgroup programs
/// return 1 to allow and 0 to refuse (EPERM).
#[inline(always)]
fn try_socket_family(ctx: &LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let ty: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    // The kernel's own sockets (a namespace's ICMP and TCP control sockets, say).
    if kern != 0 {
        return ALLOW;
    }
    let family = family as u16;
    if family == AF_UNIX || family == AF_INET || family == AF_INET6 || family == AF_NETLINK {
        return ALLOW;
    }
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((_, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    // SOCK_NONBLOCK and SOCK_CLOEXEC ride in the type's high bits.
    let flow = Flow::socket(
        HOOK_SOCKET_FAMILY,
        family,
        (ty & 0xff) as u16,
        protocol as u16,
    );
    refuse_task(&flow, leaf, &binding, REASON_SOCKET_FAMILY)
}

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_RECVERR: i32 = 11;
const IP_FREEBIND: i32 = 15;
const IP_TRANSPARENT: i32 = 19;
const IP_RECVERR_RFC4884: i32 = 26;
const IPV6_RECVERR: i32 = 25;
const IPV6_RECVERR_RFC4884: i32 = 31;
const IPV6_TRANSPARENT: i32 = 75;
const IPV6_FREEBIND: i32 = 78;
/// setsockopt programs see at most a page of the option; the kernel's own buffer is used
/// whole when the program sets `optlen` to 0.
const PAGE_SIZE: i32 = 4096;

/// cgroup sockopt programs return 1 to let the kernel go on, 0 to refuse (EPERM).
#[inline(always)]
fn try_setsockopt(ctx: &SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the kernel hands sockopt programs a valid bpf_sockopt; the verifier checks each
    // field access.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    if is_recverr(level, optname) && quiet_recverr(ctx, optlen) {
        return ALLOW;
    }
    // SAFETY: the kernel hands sockopt programs their socket.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    let verdict = judge_sockopt(level, optname, sk.cast());
    if verdict == ALLOW && optlen > PAGE_SIZE {
        // The int options the receipt reads back (the error queue's, FREEBIND, TRANSPARENT)
        // keep this copy of their value: with 0 the kernel reads the caller's buffer again,
        // later, and a helper could stall that read (a page its FUSE server holds back)
        // until a receipt's checks have passed.
        let int_option = is_recverr(level, optname) || is_nonlocal(level, optname);
        // SAFETY: setsockopt programs may write optlen, down to what they were given.
        unsafe { (*so).optlen = if int_option { 4 } else { 0 } };
    }
    verdict
}

#[inline(always)]
fn is_nonlocal(level: i32, optname: i32) -> bool {
    (level == SOL_IP && (optname == IP_FREEBIND || optname == IP_TRANSPARENT))
        || (level == SOL_IPV6 && (optname == IPV6_FREEBIND || optname == IPV6_TRANSPARENT))
}

#[inline(always)]
fn is_recverr(level: i32, optname: i32) -> bool {
    (level == SOL_IP && (optname == IP_RECVERR || optname == IP_RECVERR_RFC4884))
        || (level == SOL_IPV6 && (optname == IPV6_RECVERR || optname == IPV6_RECVERR_RFC4884))
}

/// The ICMP error queue stays closed to a governed agent: an ICMP error quotes whatever bytes
/// its sender chose and reaches the queue without passing the ingress line, a channel in.
/// Refusing the option would break glibc's resolver (it gives up on a socket where enabling
/// it fails), so the call succeeds with the value turned to 0: nothing is queued. Not a
/// denial, so no record. True when it did so (a governed task or socket).
#[inline(always)]
fn quiet_recverr(ctx: &SockoptContext, optlen: i32) -> bool {
    let so = ctx.sockopt;
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the kernel hands sockopt programs their socket.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    // A governed socket lent to a task no binding governs stays quiet too: the agent keeps
    // a descriptor to it.
    if matches!(governing(leaf, sk.cast()), Holder::Nobody) {
        return false;
    }
    // SAFETY: optval..optval_end is the kernel's copy of the value (its first page), which
    // setsockopt programs may rewrite; every write is checked against the end. The length is
    // cut to the int the kernel reads: a longer one (over a page, say) would otherwise have
    // the kernel read the caller's own buffer instead of this copy.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as usize;
        let end = (*so).__bindgen_anon_3.optval_end as usize;
        if optlen >= 4 && start + 4 <= end {
            *(start as *mut u32) = 0;
            (*so).optlen = 4;
        } else if optlen >= 1 && start + 1 <= end {
            *(start as *mut u8) = 0;
            (*so).optlen = 1;
        }
    }
    true
}

/// The same judgement on the BPF LSM's `socket_setsockopt(sock, level, optname)`, which the
/// kernel also calls for compat (32-bit) system calls; the cgroup hook does not run for those.
#[inline(always)]
fn try_lsm_setsockopt(ctx: &LsmContext) -> i32 {
    let sock: *const KernelSocket = ctx.arg(0);
    let level: i32 = ctx.arg(1);
    let optname: i32 = ctx.arg(2);
    // SAFETY: a BTF-typed kernel pointer the verifier checks the load against.
    let sk = if sock.is_null() {
        core::ptr::null_mut()
    } else {
        unsafe { (*sock).sk }
    };
    // The native call goes on to the cgroup program, which turns the error-queue options to
    // 0; every other path skips it (a compat or x32 call, io_uring's setsockopt on a ring
    // made through the compat gate), and with the queue open the socket's errors (SO_ERROR,
    // POLLERR, the queue's size) carry what ICMP senders chose, no send or read needed.
    if is_recverr(level, optname) && native_setsockopt() == Some(false) {
        return refuse_option(level, optname, sk.cast(), REASON_ERROR_QUEUE);
    }
    judge_sockopt(level, optname, sk.cast())
}

/// Whether the current task is in the native `setsockopt` system call (a register that
/// cannot be read: not); None where that cannot be known (see
/// [`KernelLayout::syscall_nr_at`]).
#[inline(always)]
fn native_setsockopt() -> Option<bool> {
    let (at, native) = (
        layout_field(|at| at.syscall_nr_at),
        layout_field(|at| at.setsockopt_nr),
    );
    if at == 0 || native == 0 {
        return None;
    }
    // SAFETY: helpers on the current task, which lives through this call; the registers it
    // saved on entering the kernel.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *mut core::ffi::c_void;
    Some(kernel_bytes::<u32>(regs, at).is_some_and(|nr| nr == u32::from(native)))
}

/// `MSG_ERRQUEUE`, from the kernel's socket.h.
const MSG_ERRQUEUE: i32 = 0x2000;

/// The cgroup setsockopt program keeps `IP_RECVERR` off, but a compat (32-bit) setsockopt
/// skips it, and an enrolled agent has no seccomp filter against those: the queue's reads are
/// refused here, however it was opened.
#[inline(always)]
fn try_lsm_recvmsg(ctx: &LsmContext) -> i32 {
    let flags: i32 = ctx.arg(3);
    if flags & MSG_ERRQUEUE == 0 {
        return try_socket_use(ctx, false);
    }
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((_, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    let flow = Flow::socket(HOOK_ERROR_QUEUE, 0, 0, 0);
    refuse_task(&flow, leaf, &binding, REASON_ERROR_QUEUE)
}

/// `struct socket` up to its `sk`, a layout unchanged since Linux 2.6. The node checks these
/// offsets (`agent_common::KERNEL_FIELDS`) against the running kernel's BTF before it loads
/// the programs that read them; a kernel that differs has the LSM line unenforced, said in
/// its status.
#[repr(C)]
struct KernelSocket {
    state: u32,
    kind: i16,
    _pad: u16,
    flags: u64,
    file: u64,
    sk: *mut core::ffi::c_void,
}

/// `struct sock_common` up to `skc_v6_daddr`, the head of every `struct sock`; the offsets
/// are checked as `KernelSocket`'s are.
#[repr(C)]
struct KernelSockCommon {
    daddr: u32,
    rcv_saddr: u32,
    hash: u32,
    /// Network byte order.
    dport: u16,
    /// Host byte order.
    num: u16,
    family: u16,
    state: u8,
    _flags: u8,
    _bound_dev_if: i32,
    _bind_node: [u64; 2],
    _prot: u64,
    _net: u64,
    v6_daddr: [u32; 4],
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(KernelSocket, kind) == agent_common::SOCKET_TYPE_AT);
    assert!(offset_of!(KernelSocket, file) == agent_common::SOCKET_FILE_AT);
    assert!(offset_of!(KernelSocket, sk) == agent_common::SOCKET_SK_AT);
    assert!(offset_of!(KernelSockCommon, daddr) == agent_common::SKC_DADDR_AT);
    assert!(offset_of!(KernelSockCommon, dport) == agent_common::SKC_DPORT_AT);
    assert!(offset_of!(KernelSockCommon, num) == agent_common::SKC_NUM_AT);
    assert!(offset_of!(KernelSockCommon, family) == agent_common::SKC_FAMILY_AT);
    assert!(offset_of!(KernelSockCommon, state) == agent_common::SKC_STATE_AT);
    assert!(offset_of!(KernelSockCommon, v6_daddr) == agent_common::SKC_V6_DADDR_AT);
};

/// A send or receive by a governed task (LSM `socket_sendmsg`/`socket_recvmsg`, first
/// argument the socket): a family the task may not create is refused, and so is an inet
/// socket another binding governs (the packet line would judge it by the other binding's
/// rules). Nothing is claimed here: the kernel's own users of a socket (NFS, NBD) send in
/// whatever task's context wakes them, and a claim there would put the host's storage under
/// the agent's rules. Sockets handed over are claimed where they are received. A send on a
/// socket with FREEBIND or TRANSPARENT set is refused: only one handed over can have them,
/// set while the receipt was claiming it, and with them a datagram's ancillary data (or a
/// bind) picks a source the host does not hold.
#[inline(always)]
fn try_socket_use(ctx: &LsmContext, send: bool) -> i32 {
    let sock: *const KernelSocket = ctx.arg(0);
    if sock.is_null() {
        return ALLOW;
    }
    // SAFETY: a BTF-typed kernel pointer the verifier checks the load against.
    let (sk, file) = unsafe { ((*sock).sk, (*sock).file) };
    // Without `sk`: being released, the call fails in the kernel anyway. Without a file: a
    // kernel socket, in no task's descriptor table.
    if sk.is_null() || file == 0 {
        return ALLOW;
    }
    // The family first: the host's unix and netlink traffic pays for no binding lookup.
    // SAFETY: as above; `sk` points at a `struct sock`, which begins with `sock_common`.
    let family = unsafe { (*sk.cast::<KernelSockCommon>()).family };
    if family == AF_UNIX || family == AF_NETLINK {
        return ALLOW;
    }
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((binding_cgroup, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    let flow = Flow::socket(HOOK_SOCKET_USE, family, 0, 0);
    if family != AF_INET && family != AF_INET6 {
        return refuse_task(&flow, leaf, &binding, REASON_SOCKET_FAMILY);
    }
    let at = layout();
    if send {
        let option = nonlocal_option(sk, &at, false);
        if option != 0 {
            let flow = Flow {
                sock_protocol: option,
                ..flow
            };
            return refuse_task(&flow, leaf, &binding, REASON_SOCKET_OPTION);
        }
    }
    // The setsockopt program keeps the error queue shut on a governed task's sockets, but a
    // compat (32-bit) setsockopt skips it, as does a socket the unit had before its
    // binding: with the queue open, soft ICMP errors, whose sender the ingress line never
    // judged, come back as errors of the next send or read.
    let queue = error_queue_open(sk, family);
    if queue != 0 {
        let flow = Flow {
            sock_protocol: queue,
            ..flow
        };
        return refuse_task(&flow, leaf, &binding, REASON_ERROR_QUEUE);
    }
    let st = sock_state(sk, false);
    if st.is_null() {
        return ALLOW;
    }
    // SAFETY: a non-null pointer from the storage helper.
    let owner = unsafe { core::ptr::read_volatile(&raw const (*st).binding_cgroup) };
    if owner != 0 && owner != binding_cgroup {
        return refuse_task(&flow, leaf, &binding, REASON_FOREIGN_SOCKET);
    }
    // A session cut off (revoked, past its certificate's deadline) uses none of its sockets:
    // what they queued before the cut is not read, and a send is refused at the call, with
    // its record, not only dropped at the packet line. Only its own: a socket no binding
    // claimed may be the kernel's (NFS, NBD send in whatever task's context wakes them), and
    // an agent whose certificate expires must not take the host's storage down with it.
    if owner == binding_cgroup {
        let state = AW_IDENTITIES.get(binding.identity).map_or(0, |st| st.state);
        let mut now = 0u64;
        let gone = liveness(state, &binding, &mut now);
        if gone != REASON_NONE {
            report(
                &flow,
                leaf,
                binding.identity,
                EVENT_SOCK_DENY,
                gone,
                0,
                now,
                Who::Task,
            );
            return DENY;
        }
    }
    if send {
        // SAFETY: as above.
        let sni = unsafe { core::ptr::read_volatile(&raw const (*st).sni) } & SNI_MODE;
        if (sni == SNI_PENDING_ENFORCE || sni == SNI_PENDING_AUDIT) && !copied_send(ctx) {
            let kind = if sni == SNI_PENDING_ENFORCE {
                EVENT_SOCK_DENY
            } else {
                EVENT_AUDIT
            };
            // The record names the destination the socket was allowed to reach.
            // SAFETY: as above; a BTF-typed kernel pointer the verifier checks the load
            // against.
            let flow = unsafe {
                Flow {
                    addr: (*st).dests[0],
                    port: (*st).ports[0],
                    proto: if (*sock).kind == SOCK_STREAM as i16 {
                        PROTO_TCP
                    } else {
                        PROTO_UDP
                    },
                    ..flow
                }
            };
            report(
                &flow,
                leaf,
                binding.identity,
                kind,
                REASON_ZERO_COPY,
                0,
                0,
                Who::Task,
            );
            if sni == SNI_PENDING_ENFORCE {
                return DENY;
            }
        }
    }
    ALLOW
}

/// Whether packet `skb`'s data lies (in part) in pages its sender shares with the kernel
/// (`SKBFL_SHARED_FRAG`: spliced, sendfile and zero-copy sends; `SKBFL_ZEROCOPY_ENABLE`),
/// read from the kernel's `sk_buff` at offsets userspace found in its BTF. True when that
/// cannot be read (unknown offsets, a failed read): the data is then refused.
#[inline(never)]
fn shared_pages(skb: *mut __sk_buff) -> bool {
    let at = layout();
    if at.shared_frag_mask == 0 {
        return true;
    }
    // The context of a cgroup_skb program is the kernel's `struct sk_buff`.
    let base = skb as usize;
    // SAFETY: the helper reads kernel memory without faulting; userspace found the offsets
    // in the kernel's BTF.
    unsafe {
        let Ok(head) =
            bpf_probe_read_kernel(base.wrapping_add(usize::from(at.skb_head_at)) as *const u64)
        else {
            return true;
        };
        let Ok(end) =
            bpf_probe_read_kernel(base.wrapping_add(usize::from(at.skb_end_at)) as *const u32)
        else {
            return true;
        };
        let flags = (head as usize)
            .wrapping_add(end as usize)
            .wrapping_add(usize::from(at.shinfo_flags_at));
        match bpf_probe_read_kernel(flags as *const u8) {
            Ok(f) => f & at.shared_frag_mask != 0,
            Err(_) => true,
        }
    }
}

/// `MSG_ZEROCOPY` (also what io_uring's zero-copy sends pass) and `MSG_SPLICE_PAGES`
/// (sendfile and splice into a socket, from Linux 6.5), from the kernel's socket.h.
const MSG_ZEROCOPY: u32 = 0x0400_0000;
const MSG_SPLICE_PAGES: u32 = 0x0800_0000;

/// Whether the send of `socket_sendmsg(sock, msg, size)` copies its data into the kernel:
/// not zero-copy, not spliced pages, whose bytes the sender can still change after the
/// packet line read them. False when the flags cannot be read (their place unknown here).
#[inline(always)]
fn copied_send(ctx: &LsmContext) -> bool {
    let msg: *const u8 = ctx.arg(1);
    let at = layout().msg_flags_at;
    if msg.is_null() || at == 0 {
        return false;
    }
    // SAFETY: the helper reads kernel memory without faulting; userspace found the offset in
    // the kernel's BTF.
    match unsafe { bpf_probe_read_kernel(msg.wrapping_add(usize::from(at)).cast::<u32>()) } {
        Ok(flags) => flags & (MSG_ZEROCOPY | MSG_SPLICE_PAGES) == 0,
        Err(_) => false,
    }
}

/// `socket_bind(sock, address, addrlen)`. The setsockopt lines keep FREEBIND and TRANSPARENT
/// off a governed socket, but a flag can still be on one: set by a helper whose setsockopt
/// hooks ran before the receipt claimed the socket and whose bit landed after both of the
/// receipt's reads, or by a unit on its socket before `enroll` bound it. With the flag, a
/// bind takes any address, and everything the socket sends after (a TCP handshake too)
/// leaves from it. So a bind of a governed socket (by the task's binding, else the socket's)
/// is refused while either flag is set, whatever address it names.
#[inline(always)]
fn try_socket_bind(ctx: &LsmContext) -> i32 {
    let sock: *const KernelSocket = ctx.arg(0);
    if sock.is_null() {
        return ALLOW;
    }
    // SAFETY: a BTF-typed kernel pointer the verifier checks the load against.
    let sk = unsafe { (*sock).sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: as above; `sk` points at a `struct sock`, which begins with `sock_common`.
    let family = unsafe { (*sk.cast::<KernelSockCommon>()).family };
    if family != AF_INET && family != AF_INET6 {
        return ALLOW;
    }
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let binding = match governing(leaf, sk) {
        Holder::Binding(_, b) => b,
        Holder::Nobody => return ALLOW,
        Holder::Ended => return DENY,
    };
    let option = nonlocal_option(sk, &layout(), false);
    if option == 0 {
        return ALLOW;
    }
    let flow = Flow::socket(HOOK_SOCKET_BIND, family, 0, option);
    refuse_task(&flow, leaf, &binding, REASON_SOCKET_OPTION)
}

/// `file_receive(file)`, in the receiving task's context. A socket a governed task receives
/// is taken only if the task could have made it itself and nothing it holds was let in
/// unjudged: unix and netlink sockets as they are; an inet socket only if it is plain TCP or
/// UDP (multipath TCP's subflows and SCTP's associations are sockets no hook of the binding
/// sees), not a listener (its accept queue holds connections no ingress rule judged), not a
/// bound datagram socket without a peer (its queue holds datagrams from anyone), connected
/// only to a peer the binding's rules allow (an egress rule, or for TCP an ingress rule on its
/// port), and not another binding's. Taken, it is claimed for the task's binding, which the
/// packet line settles at its next packet, whatever cgroup it was made in. Refused: EPERM to
/// the receive, with a record.
#[inline(always)]
fn try_file_receive(ctx: &LsmContext) -> i32 {
    let file: *mut aya_ebpf::bindings::file = ctx.arg(0);
    // SAFETY: a BTF-typed kernel pointer; the helper answers null for anything not a socket.
    let sock = unsafe { bpf_sock_from_file(file) }.cast::<KernelSocket>();
    if sock.is_null() {
        return receive_file(file.cast());
    }
    // SAFETY: as above, a `struct socket` the helper typed.
    let (sk, kind) = unsafe { ((*sock).sk, (*sock).kind) };
    if sk.is_null() {
        return ALLOW;
    }
    let common = sk.cast::<KernelSockCommon>();
    // SAFETY: `sk` points at a `struct sock`, which begins with `sock_common`.
    let family = unsafe { (*common).family };
    if family == AF_UNIX || family == AF_NETLINK {
        return ALLOW;
    }
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((binding_cgroup, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    let mut flow = Flow::socket(HOOK_SOCKET_RECEIVE, family, kind as u16, 0);
    if family != AF_INET && family != AF_INET6 {
        return refuse_task(&flow, leaf, &binding, REASON_SOCKET_FAMILY);
    }
    let ty = kind as u32;
    // SAFETY: a socket pointer the verifier typed; null unless its protocol is TCP.
    let tcp = ty == SOCK_STREAM && !unsafe { bpf_skc_to_tcp_sock(sk) }.is_null();
    if !tcp && ty != SOCK_DGRAM {
        return refuse_task(&flow, leaf, &binding, REASON_SOCKET_TYPE);
    }
    if !tcp {
        // Datagram sockets of other protocols (ICMP echo, UDP-Lite, L2TP) are ones the agent
        // may not make; their traffic would be dropped unrecorded at the packet line.
        let protocol =
            kernel_bytes::<u16>(sk, layout_field(|at| at.protocol_at)).unwrap_or(u16::MAX);
        if u32::from(protocol) != IPPROTO_UDP {
            flow.sock_protocol = protocol;
            return refuse_task(&flow, leaf, &binding, REASON_SOCKET_TYPE);
        }
    }
    flow.proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    if made_outside(sk) {
        return refuse_task(&flow, leaf, &binding, REASON_OUTSIDE_ATTACH);
    }
    // Governed already: the agent's own (passed between its processes), kept as it is; another
    // session's, refused.
    let st = sock_state(sk, false);
    if !st.is_null() {
        // SAFETY: a non-null pointer from the storage helper.
        let owner = unsafe { core::ptr::read_volatile(&raw const (*st).binding_cgroup) };
        if owner == binding_cgroup {
            return ALLOW;
        }
        if owner != 0 {
            return refuse_task(&flow, leaf, &binding, REASON_FOREIGN_SOCKET);
        }
    }
    // SAFETY: as above.
    let (state, port, local_port, v4, v6) = unsafe {
        (
            u32::from(core::ptr::read_volatile(&raw const (*common).state)),
            u16::from_be(core::ptr::read_volatile(&raw const (*common).dport)),
            core::ptr::read_volatile(&raw const (*common).num),
            core::ptr::read_volatile(&raw const (*common).daddr),
            [
                core::ptr::read_volatile(&raw const (*common).v6_daddr[0]),
                core::ptr::read_volatile(&raw const (*common).v6_daddr[1]),
                core::ptr::read_volatile(&raw const (*common).v6_daddr[2]),
                core::ptr::read_volatile(&raw const (*common).v6_daddr[3]),
            ],
        )
    };
    // Whoever made it: a governed task cannot set these, and with them the socket binds, and
    // sends from, addresses the host does not hold; nor can the receipt tell whether an
    // address its maker chose with bind() is one the host holds, unless a TCP handshake
    // completed from it (an accepted connection keeps its listener's choice).
    let chosen_matters = !(tcp && state == TCP_ESTABLISHED);
    let option = unsafe_source(sk, chosen_matters);
    if option != 0 {
        flow.sock_protocol = option;
        if refuse_task(&flow, leaf, &binding, REASON_SOCKET_OPTION) == DENY {
            return DENY;
        }
        flow.sock_protocol = 0;
    }
    let queue = error_queue_open(sk, family);
    if queue != 0 {
        flow.sock_protocol = queue;
        if refuse_task(&flow, leaf, &binding, REASON_ERROR_QUEUE) == DENY {
            return DENY;
        }
        flow.sock_protocol = 0;
    }
    // A fresh socket (no port, no peer) holds nothing: it is judged where it connects or
    // sends, by the receiver's binding. A UDP socket may hold datagrams from anyone whatever
    // it looks like now (received before it was connected, or kept when a connect to
    // AF_UNSPEC unhashed it); a TCP connection's queue holds only its peer's bytes.
    let unjudged_queue = if tcp {
        state == TCP_LISTEN
    } else {
        (port == 0 && local_port != 0) || holds_data(sk)
    };
    if unjudged_queue {
        if refuse_task(&flow, leaf, &binding, REASON_HANDED_SOCKET) == DENY {
            return DENY;
        }
    } else if port != 0 {
        flow.addr = addr_of_words(if family == AF_INET6 {
            v6
        } else {
            [0, 0, MAPPED_WORD, v4]
        });
        flow.port = port;
        if judge_peer(binding.identity, &mut flow, local_port, tcp) == Peer::Refused
            && refuse_task(&flow, leaf, &binding, REASON_NO_RULE) == DENY
        {
            return DENY;
        }
    }
    let st = sock_state(sk, true);
    if st.is_null() {
        return refuse_task(&flow, leaf, &binding, REASON_NO_STORAGE);
    }
    // Claimed only if no binding holds it: the mark first, then the binding in one
    // compare-and-swap, so two claims (or a claim and an adoption) cannot both win. A loser
    // leaves the mark, which the packet line settles as the winner's binding.
    // SAFETY: a non-null pointer from the storage helper; the binding is only written
    // whole, by this exchange or by `adopt`.
    let owner = unsafe {
        let owner = core::ptr::read_volatile(&raw const (*st).binding_cgroup);
        if owner == 0 {
            core::ptr::write_volatile(&raw mut (*st).binding_slot, SLOT_CLAIMED);
            atomic_cmpxchg(&raw mut (*st).binding_cgroup, 0, binding_cgroup)
        } else {
            owner
        }
    };
    if owner != 0 && owner != binding_cgroup {
        return refuse_task(&flow, leaf, &binding, REASON_FOREIGN_SOCKET);
    }
    // Claimed, no setsockopt changes these any more (each is judged by the binding now), but
    // one whose hooks ran before the claim may have set its flag since the read above, and a
    // bind begun since may hold the lock. What lands later still is refused where the socket
    // sends.
    // The state again: the lock is let go only if the connection was established at both
    // reads (one disconnected since the first may have been bound anew).
    // SAFETY: as above.
    let state = u32::from(unsafe { core::ptr::read_volatile(&raw const (*common).state) });
    let option = unsafe_source(sk, chosen_matters || !(tcp && state == TCP_ESTABLISHED));
    if option != 0 {
        flow.sock_protocol = option;
        // Refused after the claim: the socket is left to no session, so that handing it in
        // again is not taken for the agent's own socket (and the packet line and connect
        // hooks keep it closed, as a socket whose session has ended).
        if refuse_task(&flow, leaf, &binding, REASON_SOCKET_OPTION) == DENY {
            // SAFETY: a non-null pointer from the storage helper.
            unsafe { core::ptr::write_volatile(&raw mut (*st).binding_cgroup, REFUSED_SOCKET) };
            return DENY;
        }
    }
    // The error queue alike: a native setsockopt whose cgroup program ran before the claim
    // (nothing then turned its value to 0) may land after the read above.
    let queue = error_queue_open(sk, family);
    if queue != 0 {
        flow.sock_protocol = queue;
        if refuse_task(&flow, leaf, &binding, REASON_ERROR_QUEUE) == DENY {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&raw mut (*st).binding_cgroup, REFUSED_SOCKET) };
            return DENY;
        }
    }
    ALLOW
}

/// A file that is no socket, taken by a task from another process (`pidfd_getfd`, a seccomp
/// listener's `ADDFD`; the kernel refuses io_uring instances over `SCM_RIGHTS`
/// itself): an io_uring instance is refused to a governed task. Its work runs as the process
/// that made it, which no hook judges as the agent (a connect its SQPOLL thread submits, a
/// socket registered in it). Other files carry no network of their own.
#[inline(always)]
fn receive_file(file: *mut core::ffi::c_void) -> i32 {
    // SAFETY: a helper without arguments.
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((_, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    if !is_ring(file, &layout()) {
        return ALLOW;
    }
    let flow = Flow::socket(HOOK_SOCKET_RECEIVE, 0, 0, 0);
    refuse_task(&flow, leaf, &binding, REASON_FOREIGN_RING)
}

/// The name of every io_uring instance's file (an anonymous inode's, which only the kernel
/// names), as its first eight bytes and last two, read as words in the machine's order.
const RING_NAME: &[u8; 10] = b"[io_uring]";
const RING_NAME_HEAD: u64 = u64::from_ne_bytes([
    RING_NAME[0],
    RING_NAME[1],
    RING_NAME[2],
    RING_NAME[3],
    RING_NAME[4],
    RING_NAME[5],
    RING_NAME[6],
    RING_NAME[7],
]);
const RING_NAME_TAIL: u16 = u16::from_ne_bytes([RING_NAME[8], RING_NAME[9]]);

/// Whether `file` is an io_uring instance, told by its name; yes when the name cannot be
/// read. A file on a real file system named `[io_uring]` is taken for one too: refused, not
/// let through.
#[inline(always)]
fn is_ring(file: *mut core::ffi::c_void, at: &KernelLayout) -> bool {
    if at.file_dentry_at == 0 || at.dentry_len_at == 0 || at.dentry_name_at == 0 {
        return true;
    }
    let Some(dentry) = kernel_bytes::<u64>(file, at.file_dentry_at) else {
        return true;
    };
    let dentry = dentry as *mut core::ffi::c_void;
    match kernel_bytes::<u32>(dentry, at.dentry_len_at) {
        Some(len) if len as usize == RING_NAME.len() => {}
        Some(_) => return false,
        None => return true,
    }
    kernel_bytes::<u64>(dentry, at.dentry_name_at)
        .and_then(ring_named)
        .unwrap_or(true)
}

/// Whether the `RING_NAME.len()` bytes at `name` are [`RING_NAME`]; `None` when unreadable.
#[inline(always)]
fn ring_named(name: u64) -> Option<bool> {
    // SAFETY: the helper reads kernel memory without faulting.
    let (head, tail) = unsafe {
        (
            bpf_probe_read_kernel(name as *const u64).ok()?,
            bpf_probe_read_kernel((name + 8) as *const u16).ok()?,
        )
    };
    Some(head == RING_NAME_HEAD && tail == RING_NAME_TAIL)
}

/// `struct qstr` on a little-endian kernel: `u32 hash; u32 len;` (one `u64 hash_len`), then
/// `const unsigned char *name`; so since Linux 3.10.
const QSTR_LEN_AT: u16 = 4;
const QSTR_NAME_AT: u16 = 8;

/// `inode_init_security_anon(struct inode *inode, const struct qstr *name, const struct
/// inode *context_inode)`: the file of an io_uring instance being made is `[io_uring]`.
#[inline(always)]
fn try_ring_setup(ctx: &LsmContext) -> i32 {
    let name: *mut core::ffi::c_void = ctx.arg(1);
    if name.is_null() {
        return ALLOW;
    }
    // Unreadable, it counts as a ring's: judged by the identity's policy, not let through.
    let ring = match kernel_bytes::<u32>(name, QSTR_LEN_AT) {
        Some(len) if len as usize != RING_NAME.len() => false,
        Some(_) => kernel_bytes::<u64>(name, QSTR_NAME_AT)
            .and_then(ring_named)
            .unwrap_or(true),
        None => true,
    };
    if !ring {
        return ALLOW;
    }
    // SAFETY: a helper without arguments.
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let Some((_, binding)) = task_binding(leaf) else {
        return ALLOW;
    };
    // Allowed only to a live session of an identity whose policy allows io_uring.
    if binding.revoked == 0
        && AW_IDENTITIES
            .get(binding.identity)
            .is_some_and(|st| st.io_uring != 0 && st.state == IDENTITY_ACTIVE)
    {
        return ALLOW;
    }
    let flow = Flow::socket(HOOK_IO_URING, 0, 0, 0);
    refuse_task(&flow, leaf, &binding, REASON_IO_URING)
}

/// The binding a socket refused after its claim is left under: no session has it, so every
/// receipt refuses it as another's and every hook as one whose session has ended.
const REFUSED_SOCKET: u64 = u64::MAX;

/// What [`unsafe_source`] answers for a socket whose lock a task holds.
const SOURCE_BUSY: u16 = u16::MAX - 2;

/// Why the receipt cannot trust the source address of handed socket `sk`: a task holds its
/// lock ([`SOURCE_BUSY`]: a call on it in progress, such as a bind between its address check
/// and `SOCK_BINDADDR_LOCK`, which a helper can stretch over a whole receipt), else
/// [`nonlocal_option`]'s answer. 0: none. Its own BPF function: see [`made_outside`].
#[inline(never)]
fn unsafe_source(sk: *mut core::ffi::c_void, chosen: bool) -> u16 {
    let at = &layout();
    match kernel_bytes::<i32>(sk, at.owned_at) {
        Some(0) => nonlocal_option(sk, at, chosen),
        Some(_) => SOURCE_BUSY,
        None => NONLOCAL_UNKNOWN,
    }
}

/// What [`nonlocal_option`] answers when it cannot read the flags (their place unknown on
/// this kernel, or the read failed): the socket is refused as if one were set.
const NONLOCAL_UNKNOWN: u16 = u16::MAX;

/// [`KernelLayout`], all unknown until userspace has written it.
#[inline(always)]
fn layout() -> KernelLayout {
    AW_LAYOUT.get(0).copied().unwrap_or_default()
}

/// One field of [`KernelLayout`] (0, unknown, until userspace has written it), read in
/// place: a frame near the verifier's limit has no room for a copy of the whole.
#[inline(always)]
fn layout_field(field: impl FnOnce(&KernelLayout) -> u16) -> u16 {
    AW_LAYOUT.get(0).map_or(0, field)
}

/// A `T` at `offset` in the kernel struct at `sk` (a socket, a file, a dentry), read with the
/// helper that reads any kernel address: the verifier checks a direct load only at an offset
/// fixed when the program was built, and these move between kernels. None: unknown (offset
/// 0) or unreadable.
#[inline(always)]
fn kernel_bytes<T>(sk: *mut core::ffi::c_void, offset: u16) -> Option<T> {
    if offset == 0 {
        return None;
    }
    // SAFETY: the helper reads kernel memory without faulting; `sk` is a live socket the
    // verifier typed, and userspace keeps the offset inside the socket's struct.
    unsafe { bpf_probe_read_kernel(sk.cast::<u8>().wrapping_add(usize::from(offset)).cast()) }.ok()
}

/// What [`nonlocal_option`] answers for a socket whose local address its maker chose with
/// `bind()` (`SOCK_BINDADDR_LOCK`): with one of the options, or the host's `ip_nonlocal_bind`,
/// any address, and clearing the option afterwards leaves the address bound.
const NONLOCAL_BOUND: u16 = u16::MAX - 1;

/// The option (`IP_FREEBIND`, `IP_TRANSPARENT`; their IPv6 forms set the same flags) that
/// lets inet socket `sk` bind addresses the host does not hold, [`NONLOCAL_BOUND`] for an
/// address bound by choice when `bound` is asked about, 0 if none.
#[inline(always)]
fn nonlocal_option(sk: *mut core::ffi::c_void, at: &KernelLayout, bound: bool) -> u16 {
    let checks = [
        (at.freebind_at, at.freebind_mask, IP_FREEBIND as u16),
        (
            at.transparent_at,
            at.transparent_mask,
            IP_TRANSPARENT as u16,
        ),
        (at.bindaddr_at, at.bindaddr_mask, NONLOCAL_BOUND),
    ];
    for (i, (offset, mask, option)) in checks.into_iter().enumerate() {
        if i == 2 && !bound {
            break;
        }
        if mask == 0 {
            return NONLOCAL_UNKNOWN;
        }
        match kernel_bytes::<u8>(sk, offset) {
            Some(flags) if flags & mask == 0 => {}
            Some(_) => return option,
            None => return NONLOCAL_UNKNOWN,
        }
    }
    0
}

/// Whether `sk` holds received data (or cannot be read): a datagram socket's queues hold
/// whatever reached it before it was handed over, from anyone, unjudged by the binding.
#[inline(always)]
fn holds_data(sk: *mut core::ffi::c_void) -> bool {
    kernel_bytes::<i32>(sk, layout_field(|at| at.rmem_alloc_at)).is_none_or(|bytes| bytes != 0)
}

/// The deepest attach point [`made_outside`] follows (the kernel nests cgroups at most
/// `cgroup.max.depth` deep, unlimited by default; an attach point deeper than this is
/// treated as unknown).
const MAX_ATTACH_LEVEL: u32 = 1024;

/// Whether inet socket `sk` was made in a cgroup outside the node's attach point
/// ([`Config::attach_cgroup`]): its cgroup's ancestor at the attach point's level is
/// another cgroup, or it is shallower. None of the node's programs run for such a socket
/// (the cgroup hooks, the packet line and the LSM socket hooks all run by the socket's
/// cgroup). True where it cannot be read, unless the attach point is the root.
/// Its own BPF function, as [`error_queue_open`]: the receipt's frame, with `emit`'s
/// beneath it, is near the verifier's 512 bytes.
#[inline(never)]
fn made_outside(sk: *mut core::ffi::c_void) -> bool {
    let at = &layout();
    let Some(conf) = AW_CONFIG.get(0) else {
        return true;
    };
    let level = conf.attach_level;
    if level == 0 {
        return false;
    }
    if level > MAX_ATTACH_LEVEL || at.cgroup_ancestors_at == 0 {
        return true;
    }
    let Some(cgroup) = kernel_bytes::<u64>(sk, at.sk_cgroup_at).filter(|&p| p != 0) else {
        return true;
    };
    let cgroup = cgroup as *mut core::ffi::c_void;
    match kernel_bytes::<i32>(cgroup, at.cgroup_level_at) {
        Some(depth) if depth >= level as i32 => {}
        _ => return true,
    }
    let Ok(slot) = u16::try_from(u32::from(at.cgroup_ancestors_at) + 8 * level) else {
        return true;
    };
    let id = kernel_bytes::<u64>(cgroup, slot)
        .filter(|&p| p != 0)
        .and_then(|ancestor| {
            kernel_bytes::<u64>(ancestor as *mut core::ffi::c_void, at.cgroup_kn_at)
        })
        .filter(|&p| p != 0)
        .and_then(|kn| kernel_bytes::<u64>(kn as *mut core::ffi::c_void, at.kn_id_at));
    id != Some(conf.attach_cgroup)
}

/// What [`error_queue_open`] answers when it cannot read the flags: the socket is refused
/// as if one were set.
const QUEUE_UNKNOWN: u16 = u16::MAX - 3;

/// The option (`IP_RECVERR`, `IPV6_RECVERR`) that has opened inet socket `sk`'s ICMP error
/// queue, [`QUEUE_UNKNOWN`] where its flags cannot be read, 0 if the queue is shut. An IPv6
/// socket has both: the IPv4 one serves its IPv4-mapped peers.
#[inline(never)]
fn error_queue_open(sk: *mut core::ffi::c_void, family: u16) -> u16 {
    let at = &layout();
    let set = |base: *mut core::ffi::c_void, offset: u16, mask: u8| {
        if mask == 0 {
            return None;
        }
        kernel_bytes::<u8>(base, offset).map(|flags| flags & mask != 0)
    };
    match set(sk, at.recverr_at, at.recverr_mask) {
        Some(false) => {}
        Some(true) => return IP_RECVERR as u16,
        None => return QUEUE_UNKNOWN,
    }
    if family != AF_INET6 {
        return 0;
    }
    let pinfo = if at.pinet6_at == 0 {
        sk
    } else {
        match kernel_bytes::<u64>(sk, at.pinet6_at) {
            Some(p) if p != 0 => p as *mut core::ffi::c_void,
            _ => return QUEUE_UNKNOWN,
        }
    };
    match set(pinfo, at.recverr6_at, at.recverr6_mask) {
        Some(false) => 0,
        Some(true) => IPV6_RECVERR as u16,
        None => QUEUE_UNKNOWN,
    }
}

/// How a governed socket's peer stands with its binding's rules.
#[derive(PartialEq, Eq)]
enum Peer {
    /// An egress rule allows the peer.
    Egress,
    /// Only a name rule allows the peer, of a TCP connection no hook saw the first data of,
    /// under the server-name check's audit: taken, and the check reads (and records) its
    /// next data; without the check's program, that data is recorded as unchecked.
    Audited,
    /// A TCP connection an ingress rule allows (peer, this end's port): what a governed
    /// listener would have accepted.
    Accepted,
    Refused,
}

/// [`Peer`] for `flow`'s address and port (port 0: no peer an egress rule could allow).
/// `flow` is left with its port and protocol as given.
#[inline(always)]
fn judge_peer(identity: u32, flow: &mut Flow, local_port: u16, tcp: bool) -> Peer {
    let mut now = 0u64;
    let mut named = false;
    // A TCP connection only a name rule allows, made or used where no hook saw its first
    // data: the server-name check cannot vouch for it (in its audit, it reads what comes
    // next, or records it unchecked).
    if flow.port != 0 && check_rules(identity, flow, &mut now, &mut named).0 == REASON_NONE {
        let sni = if tcp && named {
            identity_sni(identity)
        } else {
            SNI_OFF
        };
        if sni == SNI_OFF {
            return Peer::Egress;
        }
        if sni == SNI_AUDIT || sni == SNI_UNCHECKED_AUDIT {
            return Peer::Audited;
        }
    }
    if !tcp {
        return Peer::Refused;
    }
    let (port, proto) = (flow.port, flow.proto);
    flow.port = local_port;
    flow.proto = proto << 2;
    let inbound = check_rules(identity, flow, &mut now, &mut false).0;
    (flow.port, flow.proto) = (port, proto);
    if inbound == REASON_NONE {
        Peer::Accepted
    } else {
        Peer::Refused
    }
}

/// The identity's server-name check (`IdentityState::sni`; one the kernel does not know:
/// enforced).
#[inline(always)]
fn identity_sni(identity: u32) -> u8 {
    match AW_IDENTITIES.get(identity) {
        Some(s) => s.sni,
        None => SNI_ENFORCE,
    }
}

/// Refuses a governed task, with a record, the options that bind non-local addresses.
#[inline(always)]
fn judge_sockopt(level: i32, optname: i32, sk: *mut core::ffi::c_void) -> i32 {
    if !is_nonlocal(level, optname) {
        return ALLOW;
    }
    refuse_option(level, optname, sk, REASON_SOCKET_OPTION)
}

/// Option `optname` refused for `reason` to a governed task or on a governed socket.
#[inline(always)]
fn refuse_option(level: i32, optname: i32, sk: *mut core::ffi::c_void, reason: u8) -> i32 {
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    // A governed socket keeps to its rules whoever sets its options.
    let binding = match governing(leaf, sk) {
        Holder::Binding(_, b) => b,
        Holder::Nobody => return ALLOW,
        Holder::Ended => return DENY,
    };
    let flow = Flow::socket(HOOK_SETSOCKOPT, 0, level as u16, optname as u16);
    refuse_task(&flow, leaf, &binding, reason)
}

/// IP headers without options or extension headers, the only ones a governed socket sends.
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_TLV_JUMBO: u8 = 0xc2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `bpf_sock::state` of a listening TCP socket.
const TCP_LISTEN: u32 = 10;
/// `sock_common::skc_state` of an established TCP connection.
const TCP_ESTABLISHED: u32 = 1;

/// What the packet line reads of a packet: its IP header and its ports. Aligned, with the
/// address first, so filling and comparing it takes word stores and loads: BPF has no
/// unaligned access, and LLVM turns byte-wise zeroing and copying into calls of byte-loop
/// `memset`/`memmove` functions that cost more than the rest of the fast path.
#[repr(C, align(8))]
struct Headers {
    /// The far end: the destination of a packet sent, the source of one received.
    addr: Addr,
    ip_proto: u8,
    /// `PROTO_TCP`, `PROTO_UDP`, or 0 for any other protocol.
    proto: u8,
    /// The far end's port and ours, host byte order (0 when not TCP or UDP).
    far_port: u16,
    near_port: u16,
    /// IPv4 options, IPv6 extension headers (BIG TCP's jumbo header aside), or a protocol
    /// other than TCP and UDP.
    options: bool,
    /// Every header the verdict needs could be read.
    ok: bool,
    /// A packet sent from a loopback source address (127.0.0.0/8, ::1): it has no business
    /// on any other device.
    loop_src: bool,
    /// Where the TCP or UDP header starts.
    l4: u16,
}

/// `N` bytes at `off` of the packet into `buf`: straight from the packet's linear data,
/// where the headers almost always are, else through the copying helper.
#[inline(always)]
fn load<const N: usize>(skb: *mut __sk_buff, off: usize, buf: &mut [u8; N]) -> bool {
    // SAFETY: the verifier types `data`/`data_end` as packet pointers and checks every access
    // against the bound tested here.
    unsafe {
        let data = (*skb).data as usize;
        let end = (*skb).data_end as usize;
        if data + off + N <= end {
            // A copy the compiler expands inline (a plain assignment becomes a `memmove`
            // call).
            core::ptr::copy_nonoverlapping((data + off) as *const u8, buf.as_mut_ptr(), N);
            return true;
        }
        bpf_skb_load_bytes(
            skb as *const _,
            off as u32,
            buf.as_mut_ptr().cast(),
            N as u32,
        ) == 0
    }
}

/// Reads the headers of a packet the socket sends (`ingress` false) or receives. cgroup_skb
/// programs see the network header at offset 0 in both directions. A function of its own, so
/// its buffers are not in the frame that also calls the record's (Linux 6.1 holds the two
/// to 512 bytes together). `h` is as [`Headers::new`] made it.
#[inline(never)]
fn read_headers(skb: *mut __sk_buff, ingress: bool, h: &mut Headers) {
    // SAFETY: a field of the context.
    let proto_be = unsafe { (*skb).protocol };
    // Only the bytes the verdict needs are read, straight into place: whole headers copied
    // to the stack would not fit Linux 6.1's 512 bytes beside the record's frame.
    let l4;
    // The first bytes of either header (a one-byte load at the packet's start compiles to a
    // bound check, `data < end`, the verifier grants no range for). Words, not a byte array:
    // see `Headers`.
    let mut head = [0u64; 2];
    // SAFETY: 16 bytes of plain data viewed as bytes.
    let hb = unsafe { &mut *head.as_mut_ptr().cast::<[u8; 16]>() };
    if proto_be == u32::from(ETH_P_IP.to_be()) {
        let at = if ingress { 12 } else { 16 };
        let mut a = 0u32;
        // SAFETY: four bytes of plain data viewed as bytes.
        let ab = unsafe { &mut *(&raw mut a).cast::<[u8; 4]>() };
        h.ok = load(skb, 0, hb) && load(skb, at, ab);
        let (ihl, proto) = (hb[0] & 0x0f, hb[9]);
        h.loop_src = !ingress && hb[12] == 127;
        h.options = ihl != 5;
        h.ip_proto = proto;
        h.set_v4(a);
        // Options make a packet sent a refusal whatever follows; a packet received is read
        // past them.
        l4 = if ingress && ihl >= 5 {
            usize::from(ihl) * 4
        } else {
            IPV4_HEADER
        };
    } else if proto_be == u32::from(ETH_P_IPV6.to_be()) {
        let at = if ingress { 8 } else { 24 };
        h.ok = load(skb, 0, hb) && load(skb, at, &mut h.addr);
        if !ingress {
            // The source, for ::1 (an unprivileged sender can ask for it with IPV6_PKTINFO).
            let mut src = [0u64; 2];
            // SAFETY: 16 bytes of plain data viewed as bytes.
            let sb = unsafe { &mut *src.as_mut_ptr().cast::<[u8; 16]>() };
            h.ok = h.ok && load(skb, 8, sb);
            h.loop_src = src[0] == 0 && src[1] == u64::from_ne_bytes([0, 0, 0, 0, 0, 0, 0, 1]);
        }
        // An IPv4-mapped address on an IPv6 packet would be judged by IPv4 rules, and looks
        // like IPv4 to the application: no real peer sends one.
        if h.is_v4_mapped() {
            h.ok = false;
        }
        // One extension header is looked through, so the record still names the protocol and
        // port the packet was for; the packet is refused either way.
        let next = hb[6];
        if next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DEST_OPTS {
            let mut ext = 0u32;
            // SAFETY: four bytes of plain data viewed as bytes.
            let eb = unsafe { &mut *(&raw mut ext).cast::<[u8; 4]>() };
            if load(skb, IPV6_HEADER, eb) {
                h.ip_proto = eb[0];
                l4 = IPV6_HEADER + (usize::from(eb[1]) + 1) * 8;
                // The one extension header the kernel adds itself: BIG TCP's hop-by-hop
                // header of 8 bytes carrying only the jumbo payload length. It steers nothing.
                let jumbo = next == IPV6_HOP_BY_HOP
                    && eb[1] == 0
                    && eb[2] == IPV6_TLV_JUMBO
                    && eb[3] == 4
                    && eb[0] == IPPROTO_TCP as u8;
                h.options = !jumbo;
            } else {
                h.options = true;
                h.ip_proto = next;
                l4 = IPV6_HEADER;
            }
        } else {
            h.ip_proto = next;
            l4 = IPV6_HEADER;
        }
    } else {
        // Neither IPv4 nor IPv6 on an inet socket: nothing it was allowed.
        h.ok = false;
        l4 = 0;
    }
    h.proto = match u32::from(h.ip_proto) {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => {
            h.options = true;
            0
        }
    };
    if h.ok && h.proto != 0 {
        let mut ports = 0u32;
        // SAFETY: four bytes of plain data viewed as bytes.
        let pb = unsafe { &mut *(&raw mut ports).cast::<[u8; 4]>() };
        h.ok = load(skb, l4, pb);
        h.l4 = l4 as u16;
        let (src, dst) = (
            u16::from_be_bytes([pb[0], pb[1]]),
            u16::from_be_bytes([pb[2], pb[3]]),
        );
        (h.far_port, h.near_port) = if ingress { (src, dst) } else { (dst, src) };
    }
}

impl Headers {
    /// All zero: `read_headers` sets what each branch reads and leaves the rest so.
    #[inline(always)]
    fn new() -> Self {
        Self {
            addr: words_to_addr(0, 0),
            ip_proto: 0,
            proto: 0,
            far_port: 0,
            near_port: 0,
            options: false,
            ok: false,
            loop_src: false,
            l4: 0,
        }
    }

    /// The address as IPv4-mapped IPv6, from the IPv4 address as it sits in the packet.
    #[inline(always)]
    fn set_v4(&mut self, a: u32) {
        let [a0, a1, a2, a3] = a.to_ne_bytes();
        self.addr = words_to_addr(0, u64::from_ne_bytes([0, 0, 0xff, 0xff, a0, a1, a2, a3]));
    }

    #[inline(always)]
    fn is_v4_mapped(&self) -> bool {
        let (w0, w1) = addr_words(&self.addr);
        let b = w1.to_ne_bytes();
        w0 == 0 && b[0] == 0 && b[1] == 0 && b[2] == 0xff && b[3] == 0xff
    }
}

/// An address as two native words, memory order kept (`addr_words` back).
#[inline(always)]
fn words_to_addr(w0: u64, w1: u64) -> Addr {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&w0.to_ne_bytes());
    a[8..].copy_from_slice(&w1.to_ne_bytes());
    a
}

#[inline(always)]
fn addr_words(a: &Addr) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// The governed socket a packet belongs to: its state and the binding behind it.
/// `Err(verdict)` ends the packet's judgement there (not governed, or its session ended).
struct Owner {
    sk: *mut aya_ebpf::bindings::bpf_sock,
    st: *mut SockState,
    binding: Binding,
    state: u8,
    mode: u8,
}

/// The socket storage and identity of a packet `aw_egress` allowed and handed to the
/// server-name check: the storage and its binding are there (`owner_of` found or made them).
#[inline(always)]
fn sni_owner(skb: *mut __sk_buff) -> Option<(*mut SockState, u32)> {
    // SAFETY: the kernel hands cgroup_skb programs a valid __sk_buff; `sk` may be null, which
    // is checked.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return None;
    }
    let st = sock_state(sk.cast(), false);
    if st.is_null() {
        return None;
    }
    Some((st, stored_binding(st)?.identity))
}

/// The binding a socket's storage names: its copy in the binding's slot (an array lookup)
/// while the slot still holds that cgroup's binding, else the binding itself; none once the
/// session ended or its cgroup was unbound.
#[inline(always)]
fn stored_binding(st: *mut SockState) -> Option<Binding> {
    // SAFETY: non-null storage pointer. The binding before its slot: both writers put the
    // slot first.
    let (binding_cgroup, slot) = unsafe {
        let c = core::ptr::read_volatile(&raw const (*st).binding_cgroup);
        (c, core::ptr::read_volatile(&raw const (*st).binding_slot))
    };
    match AW_BINDING_SLOTS.get(slot) {
        Some(s) if binding_cgroup != 0 && s.cgroup_id == binding_cgroup => Some(s.binding),
        // SAFETY: a read-only lookup of a plain-old-data value.
        _ => unsafe { AW_BINDINGS.get(binding_cgroup) }.copied(),
    }
}

#[inline(always)]
fn owner_of(skb: *mut __sk_buff) -> Result<Owner, i32> {
    // SAFETY: the kernel hands cgroup_skb programs a valid __sk_buff; `sk` may be null, which
    // is checked.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Err(ALLOW);
    }
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return Err(ALLOW);
    }
    let mut st = sock_state(sk.cast(), false);
    if st.is_null() {
        // No governed task made, connected or sent on it. Only where a bound cgroup may hold
        // such a socket is its cgroup asked about.
        let bound_levels = match config() {
            Some(c) if c.strays != 0 => c.bound_levels,
            _ => return Err(ALLOW),
        };
        st = adopt(skb, sk, bound_levels, core::ptr::null_mut());
        if st.is_null() {
            return Err(ALLOW);
        }
        if st == NO_ROOM {
            return Err(DENY);
        }
    }
    // SAFETY: non-null storage pointer.
    if unsafe { core::ptr::read_volatile(&raw const (*st).binding_slot) } == SLOT_CLAIMED {
        // A governed task took the socket up (the LSM line): settled as its binding's now.
        st = adopt(skb, sk, 0, st);
        if st.is_null() || st == NO_ROOM {
            return Err(DENY);
        }
    }
    // The session whose socket this is has ended (or its cgroup was unbound), yet the socket
    // is still in use: a socket handed out of a governed session stays closed.
    let Some(binding) = stored_binding(st) else {
        return Err(DENY);
    };
    let (state, mode) = match AW_IDENTITIES.get(binding.identity) {
        Some(s) => (s.state, s.mode),
        None => (0, 0),
    };
    Ok(Owner {
        sk,
        st,
        binding,
        state,
        mode,
    })
}

/// [`adopt`]'s answer for a governed socket that could not get storage (never a real
/// pointer: the storage helper's values are kernel addresses).
const NO_ROOM: *mut SockState = 1 as *mut SockState;

/// A socket without state whose own cgroup is governed: made before its cgroup was bound
/// (an `enroll`ed unit's), or before the map layout in force (one an upgrade's socket sweep
/// could not see: no port yet, held in flight in a unix socket's queue). It gets state at
/// its first packet, as a socket of that binding: a peer it is connected to is what it may
/// talk to only if the binding's egress rules allow that peer (or, for a TCP connection, an
/// ingress rule allows it as an accepted one); a TCP connection to any other is marked so
/// that neither line takes its packets as the socket's own. A socket of a kind sock_create
/// refuses governed tasks (raw) is dropped. Null: not governed.
/// Costs a socket with no state, the host's ungoverned traffic, a cgroup lookup.
///
/// `claimed` (not null): the storage of a socket the LSM line claimed for a governed task's
/// binding (one handed to it); settled the same way as that binding's, whatever cgroup the
/// socket was made in. Null then: the claiming session has ended.
// Its own frame: inlined, its locals would push the packet line past the 512-byte stack
// beside the record's frame.
#[inline(never)]
fn adopt(
    skb: *mut __sk_buff,
    sk: *mut aya_ebpf::bindings::bpf_sock,
    bound_levels: u32,
    claimed: *mut SockState,
) -> *mut SockState {
    let (binding_cgroup, binding) = if claimed.is_null() {
        // SAFETY: helpers on the context's packet and socket.
        let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
        match find_binding(
            cgroup,
            || bound_levels,
            |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) },
        ) {
            Some(b) => b,
            None => return core::ptr::null_mut(),
        }
    } else {
        // SAFETY: a non-null storage pointer.
        let c = unsafe { core::ptr::read_volatile(&raw const (*claimed).binding_cgroup) };
        // The claiming task's session has ended: null, and the socket stays closed.
        match unsafe { AW_BINDINGS.get(c) } {
            Some(b) => (c, *b),
            None => return core::ptr::null_mut(),
        }
    };
    // SAFETY: a full socket the verifier typed.
    let (family, ty, protocol, state, port, local_port) = unsafe {
        (
            (*sk).family,
            (*sk).type_,
            (*sk).protocol,
            (*sk).state,
            u16::from_be((*sk).dst_port),
            (*sk).src_port as u16,
        )
    };
    let tcp = ty == SOCK_STREAM && protocol == IPPROTO_TCP;
    let udp = ty == SOCK_DGRAM && protocol == IPPROTO_UDP;
    // Only the kinds sock_create lets a governed task make: a raw socket made before the
    // binding stays closed.
    if !tcp && !udp {
        return NO_ROOM;
    }
    let st = if claimed.is_null() {
        sock_state(sk.cast(), true)
    } else {
        claimed
    };
    if st.is_null() {
        return NO_ROOM;
    }
    // A listener, or a UDP socket with no peer: nothing to keep; each packet is judged.
    let has_peer = if tcp { state != TCP_LISTEN } else { port != 0 };
    if has_peer {
        // As the packet line holds a far end: IPv4 mapped. Each field read where it is, both
        // families' (volatile: the verifier refuses the pointer arithmetic a choice between
        // two fields compiles to).
        // SAFETY: as above.
        let (v6, v4) = unsafe {
            (
                [
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
                ],
                core::ptr::read_volatile(&raw const (*sk).dst_ip4),
            )
        };
        let words = if family == u32::from(AF_INET6) {
            v6
        } else {
            [0, 0, MAPPED_WORD, v4]
        };
        let addr = addr_of_words(words);
        let mut flow = Flow {
            addr,
            port,
            proto: proto_bit(protocol),
            hook: HOOK_EGRESS,
            family: 0,
            sock_type: 0,
            sock_protocol: 0,
        };
        let kept = match judge_peer(binding.identity, &mut flow, local_port, tcp) {
            Peer::Egress => Some((addr, port)),
            Peer::Audited => {
                // SAFETY: non-null storage pointer.
                unsafe { core::ptr::write_volatile(&raw mut (*st).sni, SNI_PENDING_AUDIT) };
                Some((addr, port))
            }
            // Never port 0 here: that is the mark of a listener or an accepted connection.
            Peer::Refused if tcp => Some((NOWHERE, if port == 0 { u16::MAX } else { port })),
            // Accepted: kept as accepted connections are, judged inbound.
            _ => None,
        };
        if let Some((a, p)) = kept {
            // SAFETY: non-null storage pointer. Volatile: these stores stay before the
            // binding's (below).
            unsafe {
                core::ptr::write_volatile(&raw mut (*st).dests[SOCK_DEST_CONNECTED], a);
                core::ptr::write_volatile(&raw mut (*st).ports[SOCK_DEST_CONNECTED], p);
            }
        }
    }
    // The binding last: until it is written, a packet of this socket on another CPU finds no
    // binding and is dropped, never judged by half-written state.
    // SAFETY: non-null storage pointer.
    unsafe {
        core::ptr::write_volatile(&raw mut (*st).binding_slot, binding.slot);
        core::ptr::write_volatile(&raw mut (*st).binding_cgroup, binding_cgroup);
    }
    st
}

/// A destination no packet has (ff..ff: multicast, never a TCP peer): an adopted TCP
/// connection its binding's rules do not allow is marked with it.
const NOWHERE: Addr = [0xff; 16];

/// Revocation and the certificate deadline, on every packet and call either way: the reason
/// `binding` (of an identity in `state`) is no longer live, or `REASON_NONE`. `now` gets the
/// clock if it was read. Nothing is read of the packet: a verdict that needs no headers is
/// taken without them.
#[inline(always)]
fn liveness(state: u8, binding: &Binding, now: &mut u64) -> u8 {
    if state != IDENTITY_ACTIVE || binding.revoked != 0 {
        return REASON_REVOKED;
    }
    if binding.not_after_ns != 0 {
        *now = unsafe { bpf_ktime_get_boot_ns() };
        if *now >= binding.not_after_ns {
            return REASON_EXPIRED;
        }
    }
    REASON_NONE
}

/// A packet of a binding that is no longer live: recorded (whatever the mode) and dropped.
#[inline(always)]
fn dead(skb: *mut __sk_buff, o: &Owner, flow: &Flow, reason: u8, now: u64) -> i32 {
    let (leaf, who) = whose(skb);
    report(
        flow,
        leaf,
        o.binding.identity,
        EVENT_DENY,
        reason,
        0,
        now,
        who,
    );
    DENY
}

/// A packet the line would drop: recorded, then dropped, or in audit mode let through.
#[inline(always)]
fn refuse(skb: *mut __sk_buff, o: &Owner, flow: &Flow, reason: u8, rule_id: u32, now: u64) -> i32 {
    let (kind, pass) = if o.mode == MODE_AUDIT {
        (EVENT_AUDIT, ALLOW)
    } else {
        (EVENT_DENY, DENY)
    };
    let (leaf, who) = whose(skb);
    report(
        flow,
        leaf,
        o.binding.identity,
        kind,
        reason,
        rule_id,
        now,
        who,
    );
    pass
}

/// Who a packet-line record is about, read only when one is written: the fast path needs
/// neither.
#[inline(always)]
fn whose(skb: *mut __sk_buff) -> (u64, Who) {
    // SAFETY: helpers on the context's packet.
    unsafe { (bpf_skb_cgroup_id(skb), Who::Socket(bpf_get_socket_uid(skb))) }
}

#[inline(always)]
fn try_egress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let o = match owner_of(skb) {
        Ok(o) => o,
        Err(v) => return v,
    };
    let identity = o.binding.identity;
    let mut now = 0u64;
    let gone = liveness(o.state, &o.binding, &mut now);
    let mut h = Headers::new();
    read_headers(skb, false, &mut h);
    // The flow as records and the rules take it, made where one is needed: kept across the
    // function, it would push Linux 6.1's 512-byte stack (its frames rounded up to 32
    // bytes) past the limit on the way down to `adopt`.
    if gone != REASON_NONE {
        return dead(skb, &o, &egress_flow(&h), gone, now);
    }
    if !h.ok || h.options {
        return refuse(skb, &o, &egress_flow(&h), REASON_PACKET_OPTIONS, 0, now);
    }
    // SAFETY: a field of the context (the device the packet leaves by).
    if h.loop_src && unsafe { (*skb).ifindex } != LOOPBACK_IFINDEX {
        return refuse(skb, &o, &egress_flow(&h), REASON_LOOPBACK_SOURCE, 0, now);
    }
    let st = o.st;
    // A connection only a name rule allowed: its first data names the server it is for,
    // which the check behind the tail call reads once the packet is allowed here.
    let mut allowed = ALLOW;
    if h.proto == PROTO_TCP {
        // SAFETY: non-null storage pointer.
        let sni = unsafe { core::ptr::read_volatile(&raw const (*st).sni) };
        if sni == SNI_REFUSED {
            // A refused connection sends no more data; its bare ACKs, FIN and the RST of
            // its end still go, so the server lets go of it too.
            if tcp_data_at(skb, &h) < unsafe { (*skb).len } {
                return DENY;
            }
        } else if sni != SNI_NONE {
            allowed = SNI_TAIL;
        }
    }
    // A TCP socket no connect() was judged for is a listener or a connection it accepted
    // (storage from creation, cloned): its peer passed the ingress line, which judges every
    // packet such a connection receives.
    // SAFETY: non-null storage pointer.
    if h.proto == PROTO_TCP && unsafe { (*st).ports[SOCK_DEST_CONNECTED] } == 0 {
        return allowed;
    }
    // The fast path: a destination the hooks allowed this socket.
    if sent_there(st, &h) {
        return allowed;
    }
    // Somewhere else: allowed only if the identity's rules allow that destination by
    // themselves (a socket sending from several threads at once to several destinations), or
    // it is the identity's DNS proxy.
    if is_dns_proxy(identity, &h.addr, h.far_port) {
        return allowed;
    }
    let mut named = false;
    let (reason, _) = check_rules(identity, &egress_flow(&h), &mut now, &mut named);
    if reason == REASON_NONE {
        // A TCP connection only a name rule allows, that the packet line took over (its peer
        // refused by `judge_peer`): no hook saw its first data, so the name rule is not
        // enough where the server-name check is on; in its audit, recorded.
        let sni = identity_sni(identity);
        if h.proto != PROTO_TCP || !named || sni == SNI_OFF {
            return allowed;
        }
        if sni == SNI_AUDIT || sni == SNI_UNCHECKED_AUDIT {
            let (leaf, who) = whose(skb);
            report(
                &egress_flow(&h),
                leaf,
                identity,
                EVENT_AUDIT,
                REASON_WIRE,
                0,
                now,
                who,
            );
            return allowed;
        }
    }
    refuse(skb, &o, &egress_flow(&h), REASON_WIRE, 0, now)
}

/// What the packet line's records and rule lookups take of a packet it sends.
#[inline(always)]
fn egress_flow(h: &Headers) -> Flow {
    Flow {
        addr: h.addr,
        port: h.far_port,
        proto: h.proto,
        hook: HOOK_EGRESS,
        family: 0,
        sock_type: 0,
        sock_protocol: u16::from(h.ip_proto),
    }
}

/// `try_egress`'s verdict for a packet it allows on a connection whose first data the
/// server-name check has still to read: `aw_egress` hands it to the check.
const SNI_TAIL: i32 = 0x100;

/// The server-name check of a packet `try_egress` allowed. Whatever cannot be read again
/// here is refused: `try_egress` found all of it a moment ago.
#[inline(always)]
fn try_egress_sni(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // The name in the data read first, before anything else is known of the packet: the
    // verifier then checks the reading once, not once for each way on to it.
    let token = read_name(skb);
    let mut h = Headers::new();
    read_headers(skb, false, &mut h);
    if !h.ok || h.options || h.proto != PROTO_TCP {
        return DENY;
    }
    let Some((st, identity)) = sni_owner(skb) else {
        return DENY;
    };
    // SAFETY: non-null storage pointer.
    let sni = unsafe { core::ptr::read_volatile(&raw const (*st).sni) };
    if sni == SNI_NONE {
        return ALLOW;
    }
    if sni == SNI_REFUSED {
        return DENY;
    }
    let c = Check {
        // SAFETY: a helper without arguments.
        now: unsafe { bpf_ktime_get_boot_ns() },
        token,
        identity,
        _pad: 0,
    };
    let r = if sni & SNI_WATCH != 0 {
        // What the ingress line saw of the server's first answer: this line alone moves the
        // state on (a TCP socket's packets leave one at a time; the ingress line runs beside
        // them), so a refusal here is never undone there.
        // SAFETY: as above.
        let server = unsafe { core::ptr::read_volatile(&raw const (*st).server) };
        if server == SERVER_HELLO {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&raw mut (*st).sni, SNI_NONE) };
            return ALLOW;
        }
        if server == SERVER_RETRY {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&raw mut (*st).sni, SNI_RETRY | (sni & SNI_MODE)) };
            sni_check(skb, &h, &c, st)
        } else {
            sni_watch(skb, &h, &c, st)
        }
    } else {
        sni_check(skb, &h, &c, st)
    };
    if r != FIRST_NOT_YET && r != REASON_NONE {
        // SAFETY: as above.
        let cut = unsafe { core::ptr::read_volatile(&raw const (*st).sni) } == SNI_REFUSED;
        let (leaf, who) = whose(skb);
        let kind = if cut { EVENT_DENY } else { EVENT_AUDIT };
        report(&egress_flow(&h), leaf, c.identity, kind, r, 0, c.now, who);
        if cut {
            return DENY;
        }
    }
    ALLOW
}

/// What the check of one packet carries besides the packet.
#[repr(C)]
struct Check {
    /// The record's time: a refusal is kept for the node under it.
    now: u64,
    /// What [`read_name`] put in this CPU's guard.
    token: u64,
    identity: u32,
    _pad: u32,
}

/// [`sni_check`]'s answer for a packet without data (the handshake, a bare ACK): the check
/// waits for the first one with data.
const FIRST_NOT_YET: u8 = 0xff;
/// TLS extensions a ClientHello may carry: each is read (more are refused).
const MAX_TLS_EXTENSIONS: u32 = 48;

/// `N` bytes at `off` of the packet through the copying helper (offsets read from the packet
/// are too loosely bounded for direct access).
#[inline(always)]
fn skb_bytes<const N: usize>(skb: *mut __sk_buff, off: u32, buf: &mut [u8; N]) -> bool {
    // SAFETY: the helper checks the range against the packet.
    unsafe { bpf_skb_load_bytes(skb as *const _, off, buf.as_mut_ptr().cast(), N as u32) == 0 }
}

/// Where a TCP packet's data starts (past the header and its options); 0 when the header
/// cannot be read, which counts as data (refused, not let through).
#[inline(always)]
fn tcp_data_at(skb: *mut __sk_buff, h: &Headers) -> u32 {
    tcp_data_at_l4(skb, u32::from(h.l4))
}

/// Where the data of a TCP packet whose header is at `l4` starts (see [`tcp_data_at`]).
#[inline(always)]
fn tcp_data_at_l4(skb: *mut __sk_buff, l4: u32) -> u32 {
    let mut b = [0u8; 1];
    if !skb_bytes(skb, l4 + 12, &mut b) {
        return 0;
    }
    l4 + u32::from(b[0] >> 4) * 4
}

/// The first data of a connection only a name rule allows: a TLS ClientHello (or an HTTP/1
/// request) whose name (in this packet) the identity resolved to the packet's destination,
/// under a name rule that allows its port, in pages only the kernel holds. `REASON_NONE`
/// when it is, `FIRST_NOT_YET` for a packet with nothing to check, else why not. Moves the
/// socket's `sni` on (done, watching a TLS connection until the server answers, refused, or
/// done in audit) and keeps a refused name in `AW_SNI_SEEN` under `now`. After a
/// HelloRetryRequest (`SNI_RETRY`), the same for the hello the client sends next.
#[inline(never)]
fn sni_check(skb: *mut __sk_buff, h: &Headers, c: &Check, st: *mut SockState) -> u8 {
    // SAFETY: a field of the context.
    let len = unsafe { (*skb).len };
    let data = tcp_data_at(skb, h);
    if data >= len {
        return FIRST_NOT_YET;
    }
    let mut t = TcpHead::default();
    if !t.read(skb, u32::from(h.l4)) {
        return refused(st, REASON_SNI_MISSING, h, c);
    }
    // Urgent data: a receiver takes the urgent byte out of the stream, so it would read
    // other bytes than these.
    if t.flags & TCP_URG != 0 {
        return refused(st, REASON_SNI_MISSING, h, c);
    }
    // In pages its sender can still change (zero-copy, spliced, sendfile): what is read here
    // need not be what reaches the peer. First, before anything moves `sni_next` past these
    // bytes: every byte before it passes unread from then on.
    if shared_pages(skb) {
        return refused(st, REASON_ZERO_COPY, h, c);
    }
    // SAFETY: non-null storage pointer.
    let sni = unsafe { core::ptr::read_volatile(&raw const (*st).sni) };
    if sni & SNI_RETRY != 0 {
        // The hello after a HelloRetryRequest starts where the first one's records ended:
        // bytes before that were read (sent again, they pass); bytes never seen are refused.
        // SAFETY: as above.
        let next = unsafe { core::ptr::read_volatile(&raw const (*st).sni_next) };
        if before_or_at(t.seq.wrapping_add(len - data), next) {
            return FIRST_NOT_YET;
        }
        if t.seq != next {
            return refused(st, REASON_AFTER_HELLO, h, c);
        }
        // The change cipher spec record a client may send before it (RFC 8446, D.4), alone.
        if len - data == CCS.len() as u32 && is_ccs(skb, data) {
            // SAFETY: as above.
            unsafe {
                core::ptr::write_volatile(&raw mut (*st).sni_next, next.wrapping_add(len - data))
            };
            return FIRST_NOT_YET;
        }
    }
    let verdict = name_allowed(h, c);
    if verdict != REASON_NONE {
        return refused(st, verdict, h, c);
    }
    // Done with the bytes: TCP sends them again only from where they are now, pages the
    // kernel alone holds (none was in pages the sender could change), so what it sends
    // again (whole or in pieces cut to its segment size) needs no look. A TLS connection is
    // watched on until the server answers: a second hello sent behind this one could be the
    // one a server reads after a HelloRetryRequest.
    let past = hello_end(skb, data, len);
    // After a HelloRetryRequest only a ClientHello will do: an HTTP request there would
    // end the watch with the TLS records after it unread.
    if past == NOT_TLS && sni & SNI_RETRY != 0 {
        return refused(st, REASON_AFTER_HELLO, h, c);
    }
    if past == NOT_TLS {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*st).sni, SNI_NONE) };
        return REASON_NONE;
    }
    if past == UNREAD {
        return refused(st, REASON_AFTER_HELLO, h, c);
    }
    // SAFETY: as above. The state last: the ingress line reads it before the rest.
    unsafe {
        core::ptr::write_volatile(&raw mut (*st).sni_next, t.seq.wrapping_add(past - data));
        // The server's first data starts where this packet acknowledges (nothing came from
        // it before the hello); a Fast Open SYN carries no acknowledgement, and the server's
        // SYN-ACK says where (see server_answer).
        let first = if t.flags & TCP_ACK != 0 { t.ack } else { 0 };
        core::ptr::write_volatile(&raw mut (*st).server_first, first);
        core::ptr::write_volatile(&raw mut (*st).server, SERVER_UNSEEN);
        core::ptr::write_volatile(&raw mut (*st).sni, SNI_WATCH | (sni & SNI_MODE));
    }
    REASON_NONE
}

/// A data packet of a TLS connection whose hello passed, before the server answered
/// (`SNI_WATCH`): past what was read (from `sni_next`), only TLS records that cannot carry a
/// hello. `FIRST_NOT_YET` when it passes, else why not.
#[inline(never)]
fn sni_watch(skb: *mut __sk_buff, h: &Headers, c: &Check, st: *mut SockState) -> u8 {
    // SAFETY: a field of the context.
    let len = unsafe { (*skb).len };
    let data = tcp_data_at(skb, h);
    if data >= len {
        return FIRST_NOT_YET;
    }
    let mut t = TcpHead::default();
    if !t.read(skb, u32::from(h.l4)) || t.flags & TCP_URG != 0 {
        return refused(st, REASON_AFTER_HELLO, h, c);
    }
    // SAFETY: non-null storage pointer.
    let next = unsafe { core::ptr::read_volatile(&raw const (*st).sni_next) };
    if before_or_at(t.seq.wrapping_add(len - data), next) {
        return FIRST_NOT_YET;
    }
    // Bytes between what was read and this packet never passed here.
    if !before_or_at(t.seq, next) {
        return refused(st, REASON_AFTER_HELLO, h, c);
    }
    if shared_pages(skb) {
        return refused(st, REASON_ZERO_COPY, h, c);
    }
    let past = tls_walk(skb, data + next.wrapping_sub(t.seq), len);
    if past == UNREAD {
        return refused(st, REASON_AFTER_HELLO, h, c);
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*st).sni_next, t.seq.wrapping_add(past - data)) };
    FIRST_NOT_YET
}

/// A TCP header's sequence and acknowledgement numbers and flags.
#[derive(Default)]
struct TcpHead {
    /// The sequence number of the first data byte (a SYN takes one before it: Fast Open).
    seq: u32,
    ack: u32,
    flags: u8,
}

impl TcpHead {
    /// The header at `l4`; false when it cannot be read.
    #[inline(always)]
    fn read(&mut self, skb: *mut __sk_buff, l4: u32) -> bool {
        // Sequence number, acknowledgement number, data offset, flags.
        let mut b = [0u8; 10];
        if !skb_bytes(skb, l4 + 4, &mut b) {
            return false;
        }
        self.flags = b[9];
        self.seq = u32::from_be_bytes([b[0], b[1], b[2], b[3]])
            .wrapping_add(u32::from(b[9] & TCP_SYN != 0));
        self.ack = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        true
    }
}

/// Sequence number `a` is at or before `b` (modulo 2^32, RFC 793).
#[inline(always)]
fn before_or_at(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// A TLS change cipher spec record as TLS 1.3 clients send it for middleboxes (RFC 8446, D.4).
const CCS: [u8; 6] = [0x14, 3, 3, 0, 1, 1];

/// The packet holds [`CCS`] at `at`.
#[inline(always)]
fn is_ccs(skb: *mut __sk_buff, at: u32) -> bool {
    let mut b = [0u8; 6];
    skb_bytes(skb, at, &mut b) && b == CCS
}

/// [`hello_end`]: the first data is not a TLS record (an HTTP request).
const NOT_TLS: u32 = 0;
/// [`hello_end`], [`tls_walk`]: what follows cannot be read as records that carry no hello.
const UNREAD: u32 = 1;
/// Records [`tls_walk`] reads in one packet: a hello's sender has no call for more before the
/// server answered (early data is a few records), and more are refused.
const MAX_WALKED_RECORDS: u32 = 8;

/// Where the TLS records that follow the checked hello in the first data at `data` end (past
/// the packet's end when the last goes on in the next one): [`NOT_TLS`] for an HTTP request,
/// [`UNREAD`] when what follows the hello could carry another.
#[inline(never)]
fn hello_end(skb: *mut __sk_buff, data: u32, len: u32) -> u32 {
    // As read_name read it: one change cipher spec record may come first.
    let at = if is_ccs(skb, data) {
        data + CCS.len() as u32
    } else {
        data
    };
    let mut hd = [0u8; 5];
    if !skb_bytes(skb, at, &mut hd) {
        return UNREAD;
    }
    if hd[0] != 0x16 {
        return NOT_TLS;
    }
    tls_walk(
        skb,
        at + 5 + u32::from(u16::from_be_bytes([hd[3], hd[4]])),
        len,
    )
}

/// The TLS records from `at` to the packet's end (`len`), each a change cipher spec, an
/// alert or application data (TLS 1.3 early data): none can carry a hello, and a server
/// frames them as read here. Returns where the last ends (past `len` when it goes on in
/// the next packet), or [`UNREAD`]: a handshake record, another type, a header cut by the
/// packet's end, more than [`MAX_WALKED_RECORDS`].
#[inline(never)]
fn tls_walk(skb: *mut __sk_buff, from: u32, len: u32) -> u32 {
    let mut at = from;
    let mut i = 0;
    while i < MAX_WALKED_RECORDS {
        if at >= len {
            return at;
        }
        let mut hd = [0u8; 5];
        if !skb_bytes(skb, at, &mut hd) || !matches!(hd[0], 0x14 | 0x15 | 0x17) {
            return UNREAD;
        }
        at += 5 + u32::from(u16::from_be_bytes([hd[3], hd[4]]));
        i += 1;
    }
    if at >= len { at } else { UNREAD }
}

/// The HelloRetryRequest's random (RFC 8446, 4.1.3: SHA-256 of "HelloRetryRequest").
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// The ingress line's look at a packet from the server of a connection in `SNI_WATCH`: its
/// first data, at `server_first`, is a ServerHello ([`SERVER_HELLO`]: the handshake goes on
/// under the checked hello) or not ([`SERVER_RETRY`]: a HelloRetryRequest, or anything else,
/// after which the client's next data must be a hello the check reads). Alerts and change
/// cipher spec records before it are read past. Later data arrived first is left for the
/// first. It runs before TCP has checked the packet (sum, window): a forged packet from the
/// server's address that lands at `server_first` is taken as the answer.
#[inline(never)]
fn server_answer(skb: *mut __sk_buff, st: *mut SockState) {
    // SAFETY: non-null storage pointer.
    if unsafe { core::ptr::read_volatile(&raw const (*st).server) } != SERVER_UNSEEN {
        return;
    }
    let mut ip = [0u8; 10];
    if !skb_bytes(skb, 0, &mut ip) {
        return;
    }
    let l4 = if ip[0] >> 4 == 4 {
        if u32::from(ip[9]) != IPPROTO_TCP {
            return;
        }
        u32::from(ip[0] & 0xf) * 4
    } else {
        if u32::from(ip[6]) != IPPROTO_TCP {
            return;
        }
        IPV6_HEADER as u32
    };
    let mut t = TcpHead::default();
    let mut off = [0u8; 1];
    if !t.read(skb, l4) || !skb_bytes(skb, l4 + 12, &mut off) {
        return;
    }
    if t.flags & TCP_SYN != 0 {
        // Fast Open: the hello went with the SYN, the server's first data comes after its
        // SYN-ACK (whose data, if any, is at `seq`, one past the SYN).
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*st).server_first, t.seq) };
        return;
    }
    // SAFETY: a field of the context.
    let len = unsafe { (*skb).len };
    let data = l4 + u32::from(off[0] >> 4) * 4;
    // SAFETY: as above.
    let first = unsafe { core::ptr::read_volatile(&raw const (*st).server_first) };
    if data >= len || !before_or_at(t.seq, first) || first.wrapping_sub(t.seq) >= len - data {
        return;
    }
    let start = data + first.wrapping_sub(t.seq);
    let mut at = start;
    let mut said = SERVER_RETRY;
    let mut i = 0;
    while i < 3 {
        let mut hd = [0u8; 5];
        if !skb_bytes(skb, at, &mut hd) {
            break;
        }
        // An alert (a TLS 1.2 server's warning), or a change cipher spec record (a TLS 1.3
        // server's after its HelloRetryRequest, written apart from it): read past.
        let alert = hd[0] == 0x15 && hd[3] == 0 && hd[4] == 2;
        let ccs = hd[0] == 0x14 && hd[3] == 0 && hd[4] == 1;
        if alert || ccs {
            at += 5 + u32::from(hd[4]);
            if at >= len {
                // SAFETY: as above.
                unsafe {
                    core::ptr::write_volatile(
                        &raw mut (*st).server_first,
                        first.wrapping_add(at - start),
                    )
                };
                return;
            }
            i += 1;
            continue;
        }
        // Record header, handshake type and length, version, random.
        let mut sh = [0u8; 43];
        if hd[0] == 0x16 && skb_bytes(skb, at, &mut sh) && sh[5] == 2 {
            // Without a branch per byte: each would be a path for the verifier to walk.
            let mut diff = 0u8;
            let mut k = 0;
            while k < HRR_RANDOM.len() {
                diff |= sh[11 + k] ^ HRR_RANDOM[k];
                k += 1;
            }
            if diff != 0 {
                said = SERVER_HELLO;
            }
        }
        break;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*st).server, said) };
}

/// The name the first data at `data` carries (a TLS ClientHello's `server_name`, else an
/// HTTP/1 request's Host) read into this CPU's scratch, and whether it could be read kept
/// beside it. Returns the token it put in this CPU's guard: a softirq's check of another
/// packet can run on this CPU before the name is looked up and take the scratch over, which
/// the guard then shows.
#[inline(never)]
fn read_name(skb: *mut __sk_buff) -> u64 {
    let (Some(k), Some(guard), Some(s)) = (
        AW_SNI_SCRATCH.get_ptr_mut(0),
        AW_SNI_GUARD.get_ptr_mut(0),
        AW_HTTP_SCRATCH.get_ptr_mut(0),
    ) else {
        // No token: the guard never matches (a token has bit 32 set), the name is refused.
        return 0;
    };
    // A packet without data (the handshake, a bare ACK) leaves this CPU's scratch and guard
    // to a check another packet may have under way: nothing is read for it.
    let mut b = [0u8; 1];
    let l4 = if !skb_bytes(skb, 0, &mut b) || b[0] >> 4 == 4 {
        IPV4_HEADER as u32
    } else {
        IPV6_HEADER as u32
    };
    // SAFETY: a field of the context.
    if tcp_data_at_l4(skb, l4) >= unsafe { (*skb).len } {
        return 0;
    }
    // SAFETY: a helper without arguments.
    let token = u64::from(unsafe { bpf_get_prandom_u32() }) | 1 << 32;
    // SAFETY: per-CPU values of this program's; the name is 8-aligned (checked in
    // agent-common), viewed as words.
    unsafe {
        core::ptr::write_volatile(guard, token);
        let words = (&raw mut (*k).name).cast::<u64>();
        let mut i = 0;
        while i < SNI_NAME_MAX / 8 {
            *words.add(i) = 0;
            i += 1;
        }
        (*k).identity = 0;
        (*k).len = 0;
        (*k).local_port = 0;
        (*k).port = 0;
        (*k).cut = 0;
    }
    // Where the data starts: past an IP header without options or extension headers (the
    // packet line refused the others) and the TCP header. Through map memory, which the
    // verifier does not track: what it keeps of the two is their bounds, not the IPv4 and
    // IPv6 ways to them (each a separate parse to check).
    let data = tcp_data_at_l4(skb, l4);
    // The change cipher spec record a TLS 1.3 client may send before its hello after a
    // HelloRetryRequest (RFC 8446, D.4) is read past (a server does the same, or refuses it).
    let data = if is_ccs(skb, data) {
        data + CCS.len() as u32
    } else {
        data
    };
    // SAFETY: a field of the context; this CPU's scratch.
    let (data, len) = unsafe {
        core::ptr::write_volatile(&raw mut (*s).name_at, data);
        core::ptr::write_volatile(&raw mut (*s).name_len, (*skb).len);
        (
            core::ptr::read_volatile(&raw const (*s).name_at),
            core::ptr::read_volatile(&raw const (*s).name_len),
        )
    };
    // A TLS record, else an HTTP/1 request.
    let mut first = [0u8; 1];
    let mut read = if data >= len || !skb_bytes(skb, data, &mut first) {
        REASON_SNI_MISSING
    } else if first[0] == 0x16 {
        client_hello(skb, data, len)
    } else {
        let read = http_host(skb, data, len);
        // The fields the scan counted (see HttpScratch): checked here, past the frame of the
        // scan.
        // SAFETY: as above.
        let fields = unsafe { core::ptr::read_volatile(&raw const (*s).fields) };
        let count = |at: u32| (fields >> at & 0xffff) as u32;
        if http::fields_right(count(0), count(16), count(32), count(48)) {
            read
        } else {
            REASON_SNI_MISSING
        }
    };
    if read == REASON_NONE {
        // SAFETY: as above.
        read = unsafe {
            take_name(
                skb,
                core::ptr::read_volatile(&raw const (*s).name_at),
                core::ptr::read_volatile(&raw const (*s).name_len),
            )
        };
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*s).read, u32::from(read)) };
    token
}

/// Whether the name [`read_name`] read is one the identity resolved to the packet's
/// destination, under a name rule that allows its port.
#[inline(never)]
fn name_allowed(h: &Headers, c: &Check) -> u8 {
    let (Some(k), Some(guard), Some(s)) = (
        AW_SNI_SCRATCH.get_ptr_mut(0),
        AW_SNI_GUARD.get_ptr_mut(0),
        AW_HTTP_SCRATCH.get_ptr_mut(0),
    ) else {
        return REASON_SNI_MISSING;
    };
    // SAFETY: per-CPU values of this program's.
    let mut verdict = unsafe { core::ptr::read_volatile(&raw const (*s).read) } as u8;
    if verdict == REASON_NONE {
        // SAFETY: as above; the scratch is the lookup's key.
        verdict = unsafe {
            (*k).identity = c.identity;
            (*k).addr = h.addr;
            match AW_SNI_NAMES.get(&*k) {
                Some(rules) if named_rule_allows(c.identity, h, rules) => REASON_NONE,
                _ => REASON_SNI_MISMATCH,
            }
        };
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(guard) } != c.token {
        return REASON_SNI_MISMATCH;
    }
    verdict
}

/// A refusal of the check: the socket refused (enforce) or done with (audit), and the name
/// read (if any) kept for the node under `now`, with the connection's ports. A frame of its
/// own: inlined at each refusal, the check's frame would pass Linux's 512 bytes for the chain.
#[inline(never)]
fn refused(st: *mut SockState, reason: u8, h: &Headers, c: &Check) -> u8 {
    // SAFETY: non-null storage pointer.
    let cut = unsafe { (*st).sni & SNI_MODE == SNI_PENDING_ENFORCE };
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&raw mut (*st).sni, if cut { SNI_REFUSED } else { SNI_NONE })
    };
    if let (Some(k), Some(guard)) = (AW_SNI_SCRATCH.get_ptr_mut(0), AW_SNI_GUARD.get_ptr_mut(0)) {
        // SAFETY: per-CPU values of this program's.
        unsafe {
            // The scratch holds this connection's name only when the refusal is of a name
            // read: the others come before any reading (or from one that failed, or read
            // what the refused data does not start with), and the scratch may hold another
            // connection's; as it does when another check took this CPU's scratch over since.
            let ours = core::ptr::read_volatile(guard) == c.token;
            (*k).identity = c.identity;
            (*k).addr = h.addr;
            if reason == REASON_SNI_MISSING || reason == REASON_AFTER_HELLO || !ours {
                (*k).len = 0;
            }
            (*k).local_port = h.near_port;
            (*k).port = h.far_port;
            (*k).cut = u8::from(cut);
            let _ = AW_SNI_SEEN.insert(c.now, &*k, 0);
        }
    }
    reason
}

/// TCP header flags (the byte at offset 13).
const TCP_URG: u8 = 0x20;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

/// The TLS ClientHello at `data`, looked through for its `server_name` (see [`sni_check`]).
#[inline(never)]
fn client_hello(skb: *mut __sk_buff, data: u32, len: u32) -> u8 {
    let mut b = [0u8; 1];
    // Record header (type, version, length), handshake header (type, length), version.
    let mut hd = [0u8; 11];
    if !skb_bytes(skb, data, &mut hd) || hd[0] != 0x16 || hd[1] != 3 || hd[5] != 1 {
        return REASON_SNI_MISSING;
    }
    let record_end = data + 5 + u32::from(u16::from_be_bytes([hd[3], hd[4]]));
    // The handshake message, filling this record, in this packet: what follows the record is
    // read as records that cannot carry a hello (hello_end), and another message in the
    // record could be a second hello.
    let hs_end = data + 9 + (u32::from(hd[6]) << 16 | u32::from(hd[7]) << 8 | u32::from(hd[8]));
    if hs_end != record_end || hs_end > len {
        return REASON_SNI_MISSING;
    }
    // Past the random: the session id, cipher suites, compression methods, extensions.
    let mut pos = data + 43;
    if !skb_bytes(skb, pos, &mut b) {
        return REASON_SNI_MISSING;
    }
    pos += 1 + u32::from(b[0]);
    let mut w = [0u8; 2];
    if !skb_bytes(skb, pos, &mut w) {
        return REASON_SNI_MISSING;
    }
    pos += 2 + u32::from(u16::from_be_bytes(w));
    if !skb_bytes(skb, pos, &mut b) {
        return REASON_SNI_MISSING;
    }
    pos += 1 + u32::from(b[0]);
    if !skb_bytes(skb, pos, &mut w) {
        return REASON_SNI_MISSING;
    }
    pos += 2;
    let ext_end = pos + u32::from(u16::from_be_bytes(w));
    // The extensions fill the rest of the hello.
    if ext_end != hs_end {
        return REASON_SNI_MISSING;
    }
    // Every extension, so that a second `server_name` (which a server might read instead of
    // the first) is seen: the list must end within this packet.
    let mut sni_at = 0u32;
    let mut sni_len = 0u32;
    let mut i = 0;
    while i < MAX_TLS_EXTENSIONS {
        if pos == ext_end {
            break;
        }
        let mut x = [0u8; 4];
        if pos + 4 > ext_end || !skb_bytes(skb, pos, &mut x) {
            return REASON_SNI_MISSING;
        }
        let ext_len = u32::from(u16::from_be_bytes([x[2], x[3]]));
        if x[0] == 0 && x[1] == 0 {
            if sni_at != 0 {
                return REASON_SNI_MISSING;
            }
            sni_at = pos + 4;
            sni_len = ext_len;
        }
        pos += 4 + ext_len;
        if pos > ext_end {
            return REASON_SNI_MISSING;
        }
        i += 1;
    }
    if pos != ext_end || sni_at == 0 {
        return REASON_SNI_MISSING;
    }
    server_name(skb, sni_at, sni_len)
}

/// The `server_name` extension's host name at `at` (`ext_len` bytes) into this CPU's scratch,
/// lower-cased without a trailing dot: `REASON_NONE` when it holds one name that fits.
#[inline(never)]
fn server_name(skb: *mut __sk_buff, at: u32, ext_len: u32) -> u8 {
    // The list's length, the name's type (0: host name) and length.
    let mut n5 = [0u8; 5];
    if ext_len < 5 || !skb_bytes(skb, at, &mut n5) || n5[2] != 0 {
        return REASON_SNI_MISSING;
    }
    let name_len = u32::from(u16::from_be_bytes([n5[3], n5[4]]));
    let list_len = u32::from(u16::from_be_bytes([n5[0], n5[1]]));
    // One name, filling the list, which fills the extension.
    if name_len == 0 || list_len != name_len + 3 || ext_len != list_len + 2 {
        return REASON_SNI_MISSING;
    }
    found_name(at + 5, name_len)
}

/// The `name_len` bytes at `at` into this CPU's scratch as the name to look up, lower-cased
/// without a trailing dot: `REASON_NONE` when they fit.
#[inline(never)]
fn take_name(skb: *mut __sk_buff, at: u32, name_len: u32) -> u8 {
    if name_len == 0 {
        return REASON_SNI_MISSING;
    }
    let Some(k) = AW_SNI_SCRATCH.get_ptr_mut(0) else {
        return REASON_SNI_MISSING;
    };
    // Names longer than a DNS name are read as far as they fit and never match.
    let too_long = name_len >= SNI_NAME_MAX as u32;
    // An explicit bound the verifier sees: 1..=255.
    // SAFETY: a read of a local.
    let n = unsafe { core::ptr::read_volatile(&name_len) };
    let n = if too_long { SNI_NAME_MAX as u32 - 1 } else { n };
    let n = ((n.wrapping_sub(1)) & 0xff) + 1;
    let n = if n > SNI_NAME_MAX as u32 - 1 {
        SNI_NAME_MAX as u32 - 1
    } else {
        n
    };
    // SAFETY: the helper writes at most n bytes into the scratch name, which holds 256.
    let read = unsafe { bpf_skb_load_bytes(skb as *const _, at, (&raw mut (*k).name).cast(), n) };
    if read != 0 {
        return REASON_SNI_MISSING;
    }
    let mut len = n;
    // SAFETY: as above.
    unsafe {
        let words = (&raw mut (*k).name).cast::<u64>();
        let mut i = 0;
        while i < SNI_NAME_MAX / 8 {
            *words.add(i) = lower_case(*words.add(i));
            i += 1;
        }
        let last = ((len - 1) & 0xff) as usize;
        if (*k).name[last] == b'.' {
            (*k).name[last] = 0;
            len -= 1;
        }
        (*k).len = len as u16;
    }
    if too_long {
        REASON_SNI_MISMATCH
    } else {
        REASON_NONE
    }
}

/// Where the check reads an HTTP request's head (too big for the stack), and the Host it
/// found there: kept in map memory, which the verifier does not track, so the code after the
/// scan is checked once, not once for each byte the scan could end at.
#[repr(C)]
struct HttpScratch {
    head: [u8; http::HEAD_MAX],
    /// Where the name is in the packet, and its length: what the parser found, for
    /// [`take_name`].
    name_at: u32,
    name_len: u32,
    /// What [`read_name`] found: `REASON_NONE` when it read a name.
    read: u32,
    _pad: u32,
    /// What [`http_host`] counted.
    fields: u64,
}

/// The scan's tables (see `agent_common::http`), in the program's read-only data.
static HTTP_CLASS: [u8; 256] = http::CLASS;
static HTTP_TRANSITIONS: [u16; http::STATES * http::CLASSES] = http::TRANSITIONS;

/// The Host of an HTTP/1 request at `data` into this CPU's scratch (see [`take_name`]), as
/// `agent_common::http::scan` finds it: a byte at a time through the transition table, the
/// Host's place kept without a branch. What follows the head (a body, more requests on the
/// connection) is not read.
#[inline(never)]
fn http_host(skb: *mut __sk_buff, data: u32, len: u32) -> u8 {
    const MAX: u32 = http::HEAD_MAX as u32;
    let Some(s) = AW_HTTP_SCRATCH.get_ptr_mut(0) else {
        return REASON_SNI_MISSING;
    };
    // Through map memory: the bound on the helper's size is then all the verifier keeps of
    // it, not the packet's length and the header offsets it came from (which would make
    // every way to here a separate scan to check).
    // SAFETY: this CPU's scratch.
    let avail = unsafe {
        core::ptr::write_volatile(&raw mut (*s).name_len, len - data);
        core::ptr::read_volatile(&raw const (*s).name_len)
    };
    let n = if avail > MAX { MAX } else { avail };
    // An explicit bound the verifier sees: 1..=MAX.
    let n = (n.wrapping_sub(1) & (MAX - 1)) + 1;
    // SAFETY: the helper writes at most n bytes into the head, which holds MAX.
    if unsafe { bpf_skb_load_bytes(skb as *const _, data, (&raw mut (*s).head).cast(), n) } != 0 {
        return REASON_SNI_MISSING;
    }
    let mut state = u32::from(http::START);
    // Where the Host name starts and its length, and the fields counted (Host, Connection,
    // Connection: close, Upgrade; 16 bits each in one word): kept in map memory, not in
    // registers, where each byte's path would carry its own values of them (the place a
    // copy of the byte's index) and the verifier would check the bytes after it once for
    // each.
    // SAFETY: this CPU's scratch.
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).name_at, 0);
        core::ptr::write_volatile(&raw mut (*s).name_len, 0);
        core::ptr::write_volatile(&raw mut (*s).fields, 0);
    }
    let mut i = 0u32;
    while i < MAX {
        if i >= n {
            return REASON_SNI_MISSING;
        }
        // SAFETY: indices masked below each table's length, into this CPU's head.
        let t = unsafe {
            let b = (*s).head[(i & (MAX - 1)) as usize];
            // The class added, not or-ed, in (classes are below CLASSES, so the two are the
            // same; the class is not masked, so LLVM cannot make the add an or): Linux 6.1's
            // verifier loses every bound of an or with an unknown value, and keeps an add's.
            let c = u32::from(HTTP_CLASS[usize::from(b)]);
            let at = ((state & u32::from(http::STATE_MASK)) * http::CLASSES as u32 + c)
                & (http::STATES * http::CLASSES - 1) as u32;
            u32::from(core::ptr::read_volatile(&HTTP_TRANSITIONS[at as usize]))
        };
        let start = (t >> 6) & 1;
        let more = (t >> 7) & 1;
        let m = 0u32.wrapping_sub(start);
        let w = u64::from(t);
        // SAFETY: as above.
        unsafe {
            let at = core::ptr::read_volatile(&raw const (*s).name_at);
            core::ptr::write_volatile(&raw mut (*s).name_at, (at & !m) | (i & m));
            let hl = core::ptr::read_volatile(&raw const (*s).name_len);
            core::ptr::write_volatile(&raw mut (*s).name_len, (hl & !m) + start + more);
            let f = core::ptr::read_volatile(&raw const (*s).fields);
            core::ptr::write_volatile(
                &raw mut (*s).fields,
                f + ((w >> 8 & 1) | (w >> 9 & 1) << 16 | (w >> 10 & 1) << 32 | (w >> 11 & 1) << 48),
            );
        }
        state = t & u32::from(http::STATE_MASK);
        if state == u32::from(http::REFUSE) {
            return REASON_SNI_MISSING;
        }
        if state == u32::from(http::DONE) {
            break;
        }
        i += 1;
    }
    if state != u32::from(http::DONE) {
        return REASON_SNI_MISSING;
    }
    // SAFETY: as above.
    let (at, hl) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*s).name_at),
            core::ptr::read_volatile(&raw const (*s).name_len),
        )
    };
    found_name(data + at, hl)
}

/// Keeps where a parser found the name, for [`take_name`]: in map memory, so the verifier
/// checks the taking once, not once for every place in the parse the name could be found.
#[inline(always)]
fn found_name(at: u32, len: u32) -> u8 {
    let Some(s) = AW_HTTP_SCRATCH.get_ptr_mut(0) else {
        return REASON_SNI_MISSING;
    };
    // SAFETY: this CPU's scratch.
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).name_at, at);
        core::ptr::write_volatile(&raw mut (*s).name_len, len);
    }
    REASON_NONE
}

/// ASCII upper case to lower case in each byte of a word (no carries between bytes: each
/// sum stays below 0x100).
#[inline(always)]
fn lower_case(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let low7 = w & (0x7f * ONES);
    let from_a = low7 + (0x80 - u64::from(b'A')) * ONES;
    let past_z = low7 + (0x80 - u64::from(b'Z') - 1) * ONES;
    let upper = from_a & !past_z & !w & (0x80 * ONES);
    w | (upper >> 2)
}

/// Whether a learned host entry of one of `rules` allows the packet's destination port over
/// TCP (and has not expired): a name learned under a rule for other ports does not open this
/// one.
#[inline(never)]
fn named_rule_allows(identity: u32, h: &Headers, rules: &[u32; SNI_RULES]) -> bool {
    let key = Key::new(128, h.addr);
    let Some(set) = AW_RULES.get_value_ptr_mut(identity, &key) else {
        return false;
    };
    // SAFETY: a value pointer from a successful lookup, read only (see check_rules).
    let set: &RuleSet = unsafe { &*set.cast::<RuleSet>() };
    let count = set.count as usize;
    let port = h.far_port;
    let mut now = 0u64;
    let mut i = 0;
    while i < MAX_PORT_ENTRIES {
        if i >= count {
            break;
        }
        let e = &set.entries[i];
        let ours = e.rule_id != 0
            && (e.rule_id == rules[0]
                || e.rule_id == rules[1]
                || e.rule_id == rules[2]
                || e.rule_id == rules[3]);
        if ours
            && e.name != 0
            && port >= e.port_lo
            && port <= e.port_hi
            && e.proto & PROTO_TCP != 0
            && (e.port_set == 0 || in_port_set(e.port_set, u32::from(port)))
        {
            if e.expires_ns == 0 {
                return true;
            }
            if now == 0 {
                now = unsafe { bpf_ktime_get_boot_ns() };
            }
            if now < e.expires_ns {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Whether the hooks allowed this socket to send to the packet's far end (one of its
/// remembered destinations).
#[inline(always)]
fn sent_there(st: *mut SockState, h: &Headers) -> bool {
    let mut i = 0;
    while i < SOCK_DESTS {
        // SAFETY: non-null storage pointer; index below SOCK_DESTS.
        let p = unsafe { (*st).ports[i] };
        if p != 0 && p == h.far_port && unsafe { same_place(&raw const (*st).dests[i], h) } {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether the address at `d`, in socket storage, is the packet's far end. Both sit at
/// 8-aligned places (map values are; `Headers` is declared so): two word compares instead of
/// sixteen byte compares.
///
/// # Safety
/// `d` points into a socket storage value.
#[inline(always)]
unsafe fn same_place(d: *const Addr, h: &Headers) -> bool {
    let (d, a) = (d.cast::<u64>(), (&raw const h.addr).cast::<u64>());
    // SAFETY: SockState::dests sit at 8-aligned offsets of an 8-aligned map value (checked
    // at compile time in agent-common); `Headers` is align(8) with the address first.
    unsafe { *d == *a && *d.add(1) == *a.add(1) }
}

/// The packet line inbound: a packet from outside the host reaches a governed socket only as
/// the reply of a flow its egress rules allowed, or where an ingress rule allows its peer and
/// local port. Loopback traffic is the local sender's to answer for (its own egress rules).
#[inline(always)]
fn try_ingress(ctx: &SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let o = match owner_of(skb) {
        Ok(o) => o,
        Err(v) => return v,
    };
    let mut now = 0u64;
    let gone = liveness(o.state, &o.binding, &mut now);
    // A TLS connection whose hello passed the server-name check: what the server answers
    // first, on every path in.
    // SAFETY: non-null storage pointer.
    if unsafe { core::ptr::read_volatile(&raw const (*o.st).sni) } & SNI_WATCH != 0 {
        server_answer(skb, o.st);
    }
    // SAFETY: a field of the context.
    if gone == REASON_NONE && unsafe { (*skb).ingress_ifindex } == LOOPBACK_IFINDEX {
        return ALLOW;
    }
    let identity = o.binding.identity;
    let mut h = Headers::new();
    read_headers(skb, true, &mut h);
    // One flow, its port and protocol changed in place for each question: copies of it
    // would not fit the 512-byte stack on Linux 6.1 next to the record's frame.
    let mut flow = Flow {
        addr: h.addr,
        port: h.near_port,
        proto: h.proto,
        hook: HOOK_INGRESS,
        family: 0,
        sock_type: 0,
        sock_protocol: u16::from(h.ip_proto),
    };
    if gone != REASON_NONE {
        return dead(skb, &o, &flow, gone, now);
    }
    if !h.ok || h.options {
        return refuse(skb, &o, &flow, REASON_PACKET_OPTIONS, 0, now);
    }
    let st = o.st;
    if h.proto == PROTO_TCP {
        // A connection this socket made, from the peer it was allowed. The socket's own
        // state decides, not only what the connect hook wrote: a connect the kernel then
        // failed leaves that behind on a socket that may go on to listen.
        // SAFETY: a full socket from owner_of; non-null storage pointer.
        let listening = unsafe { (*o.sk).state } == TCP_LISTEN;
        let p = unsafe { (*st).ports[SOCK_DEST_CONNECTED] };
        if !listening
            && p != 0
            && p == h.far_port
            && unsafe { same_place(&raw const (*st).dests[SOCK_DEST_CONNECTED], &h) }
        {
            return ALLOW;
        }
    } else {
        // A datagram from where the socket sent; or, to a socket that has sent, from a
        // peer and port its egress rules let it send to anyway (a reply carries nothing the
        // agent could not fetch). A socket that never sent takes only what ingress rules
        // allow.
        if sent_there(st, &h) {
            return ALLOW;
        }
        // SAFETY: non-null storage pointer.
        let has_sent =
            unsafe { (*st).ports[SOCK_DEST_CONNECTED] != 0 || (*st).ports[SOCK_DEST_SENT] != 0 };
        if has_sent {
            flow.port = h.far_port;
            let (reason, _) = ingress_rules(identity, &flow, &mut now);
            if reason == REASON_NONE {
                return ALLOW;
            }
            flow.port = h.near_port;
        }
    }
    // Inbound proper: a listener, a connection it accepted, a datagram from anywhere else.
    flow.proto = h.proto << 2;
    let (reason, rule_id) = ingress_rules(identity, &flow, &mut now);
    if reason == REASON_NONE {
        return ALLOW;
    }
    flow.proto = h.proto;
    let reason = if reason == REASON_NO_RULE {
        REASON_INBOUND
    } else {
        reason
    };
    refuse(skb, &o, &flow, reason, rule_id, now)
}

/// [`check_rules`] for the packet line inbound. A frame of its own: inlined twice, its
/// locals took `aw_ingress`'s frame past what Linux 6.1 allows beside `adopt`'s.
#[inline(never)]
fn ingress_rules(identity: u32, flow: &Flow, now: &mut u64) -> (u8, u32) {
    check_rules(identity, flow, now, &mut false)
}

#[inline(always)]
fn same_addr(a: &Addr, b: &Addr) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `addr:port` is the DNS proxy address of `identity` (either family).
#[inline(always)]
fn is_dns_proxy(identity: u32, addr: &Addr, port: u16) -> bool {
    let dns_port = match config() {
        Some(c) => c.dns_port,
        None => 0,
    };
    if dns_port == 0 || port != dns_port {
        return false;
    }
    let v6 = dns_proxy_addr6(identity);
    if same_addr(addr, &v6) {
        return true;
    }
    let v4 = dns_proxy_addr(identity);
    addr[0..10] == [0; 10]
        && addr[10] == 0xff
        && addr[11] == 0xff
        && addr[12] == v4[0]
        && addr[13] == v4[1]
        && addr[14] == v4[2]
        && addr[15] == v4[3]
}

#[inline(always)]
fn config() -> Option<Config> {
    AW_CONFIG.get(0).copied()
}

/// The binding governing cgroup `leaf`, with the cgroup it is stored under: its own
/// binding, else its deepest bound ancestor's (`ancestor(level)`: the ancestor's id). Only
/// the levels userspace marked as holding a binding (`bound_levels()`, asked only when the
/// leaf has none: a process in a bound cgroup never needs it) are looked up.
#[inline(always)]
fn find_binding(
    leaf: u64,
    bound_levels: impl FnOnce() -> u32,
    ancestor: impl Fn(i32) -> u64,
) -> Option<(u64, Binding)> {
    // SAFETY: read-only lookups of plain-old-data values.
    if let Some(b) = unsafe { AW_BINDINGS.get(leaf) } {
        return Some((leaf, *b));
    }
    let bound_levels = bound_levels();
    // Written on every path before it is read: Linux 6.1's verifier refuses a read of stack
    // the program never wrote, which an `Option` of a tuple left to the optimiser can do.
    let mut found_key = 0u64;
    let mut found = Binding::default();
    let mut level = 0u32;
    while level < MAX_CGROUP_LEVELS {
        if bound_levels >> level == 0 {
            break;
        }
        if bound_levels & (1 << level) != 0 {
            let anc = ancestor(level as i32);
            if anc == 0 || anc == leaf {
                break;
            }
            if let Some(b) = unsafe { AW_BINDINGS.get(anc) } {
                found_key = anc;
                found = *b;
            }
        }
        level += 1;
    }
    if found_key == 0 {
        None
    } else {
        Some((found_key, found))
    }
}

/// The binding governing the current task (see [`find_binding`]).
#[inline(always)]
fn task_binding(leaf: u64) -> Option<(u64, Binding)> {
    // SAFETY: a helper on the current task.
    find_binding(
        leaf,
        || config().map_or(0, |c| c.bound_levels),
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
    )
}

/// What [`judge`] decided, and for whom.
struct Judged {
    verdict: i32,
    identity: u32,
    /// The cgroup whose binding governs the task; 0 when none does.
    binding_cgroup: u64,
    /// That binding's [`Binding::slot`].
    binding_slot: u32,
    /// The rule that allowed the flow (0: none, or not allowed by a rule).
    allowed_rule: u32,
    /// The task's cgroup.
    leaf: u64,
    /// The clock, if judging read it (0: not read).
    now: u64,
    /// What the packet line checks of the connection's first data ([`SockState::sni`]).
    sni: u8,
}

/// Who governs a socket by its storage (see [`socket_binding`]).
enum Holder {
    /// No binding: a socket no governed task made, connected or took up.
    Nobody,
    Binding(u64, Binding),
    /// The binding's session has ended: the socket stays closed.
    Ended,
}

/// The binding `sk`'s storage names, for a task no binding governs: a governed socket is
/// judged by its binding's rules whoever connects it, sends on it or sets its options (an
/// agent's socket handed to an ungoverned process and back, or still held by the agent while
/// the other connects it, carries no peer its rules did not allow).
#[inline(always)]
fn socket_binding(sk: *mut core::ffi::c_void) -> Holder {
    if sk.is_null() {
        return Holder::Nobody;
    }
    let st = sock_state(sk, false);
    if st.is_null() {
        return Holder::Nobody;
    }
    // SAFETY: a non-null pointer from the storage helper.
    let owner = unsafe { core::ptr::read_volatile(&raw const (*st).binding_cgroup) };
    if owner == 0 {
        return Holder::Nobody;
    }
    // SAFETY: a read-only lookup of a plain-old-data value.
    match unsafe { AW_BINDINGS.get(owner) } {
        Some(b) => Holder::Binding(owner, *b),
        None => Holder::Ended,
    }
}

/// Who governs the current task's use of `sk`: the task's binding, else the socket's.
#[inline(always)]
fn governing(leaf: u64, sk: *mut core::ffi::c_void) -> Holder {
    match task_binding(leaf) {
        Some((c, b)) => Holder::Binding(c, b),
        None => socket_binding(sk),
    }
}

impl Judged {
    /// A verdict for a task and socket no binding governs.
    #[inline(always)]
    fn unbound(verdict: i32, leaf: u64) -> Self {
        Judged {
            verdict,
            identity: 0,
            binding_cgroup: 0,
            binding_slot: 0,
            allowed_rule: 0,
            leaf,
            now: 0,
            sni: SNI_NONE,
        }
    }
}

/// The verdict on `flow` for the current task on socket `sk` (see [`governing`]), or as a
/// flow of no identity.
#[inline(always)]
fn judge(flow: &Flow, sk: *mut core::ffi::c_void) -> Judged {
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    let (binding_cgroup, binding) = match governing(leaf, sk) {
        Holder::Binding(c, b) => (c, b),
        // As the packet line drops the packets of such a socket: without a record.
        Holder::Ended => return Judged::unbound(DENY, leaf),
        Holder::Nobody => {
            let unknown = match config() {
                Some(c) => c.unknown_flows,
                None => UNKNOWN_IGNORE,
            };
            let verdict = match unknown {
                UNKNOWN_IGNORE => ALLOW,
                UNKNOWN_DENY => {
                    report(flow, leaf, 0, EVENT_DENY, REASON_UNBOUND, 0, 0, Who::Task);
                    DENY
                }
                _ => {
                    report(
                        flow,
                        leaf,
                        0,
                        EVENT_UNKNOWN_FLOW,
                        REASON_NONE,
                        0,
                        0,
                        Who::Task,
                    );
                    ALLOW
                }
            };
            return Judged::unbound(verdict, leaf);
        }
    };
    let identity = binding.identity;
    let judged = |verdict| Judged {
        verdict,
        identity,
        binding_cgroup,
        binding_slot: binding.slot,
        allowed_rule: 0,
        leaf,
        now: 0,
        sni: SNI_NONE,
    };
    let (state, mode, dns, sni) = match AW_IDENTITIES.get(identity) {
        Some(st) => (st.state, st.mode, st.dns, st.sni),
        None => (0, 0, 0, SNI_OFF),
    };
    // Revoked, unset and expired identities (and bindings whose certificate was revoked) are
    // denied whatever the mode: audit mode is for trying out a policy, not for keeping a dead
    // identity alive. The clock is read only when a deadline needs it; 0 means "not read yet".
    let mut now = 0u64;
    let gone = liveness(state, &binding, &mut now);
    if gone != REASON_NONE {
        report(flow, leaf, identity, EVENT_DENY, gone, 0, now, Who::Task);
        return judged(DENY);
    }
    // DNS from an identity with name rules goes to its proxy, whatever the resolver: the
    // proxy learns the addresses its rules allow.
    if dns != 0 && flow.port == DNS_PORT && flow.proto != 0 {
        let dns_port = match config() {
            Some(c) => c.dns_port,
            None => 0,
        };
        if dns_port != 0 {
            return judged(STEER);
        }
    }
    let mut named = false;
    let (mut reason, rule_id) = check_rules(identity, flow, &mut now, &mut named);
    let connect = flow.hook == HOOK_CONNECT4 || flow.hook == HOOK_CONNECT6;
    let unchecked = sni >= SNI_UNCHECKED;
    if reason == REASON_NONE && named && connect && flow.proto == PROTO_TCP && unchecked {
        // The check is not loaded (the kernel refused its program): nothing could read this
        // connection's first data, so only a name rule is not enough (under `sni: audit`,
        // recorded and let through).
        reason = REASON_SNI_UNCHECKED;
    }
    if reason == REASON_NONE {
        // A TCP connection only a name rule allows: its first data must name a server the
        // identity resolved to this address.
        let sni = if !named || !connect || flow.proto != PROTO_TCP || sni == SNI_OFF {
            SNI_NONE
        } else if sni == SNI_AUDIT || mode == MODE_AUDIT {
            SNI_PENDING_AUDIT
        } else {
            SNI_PENDING_ENFORCE
        };
        // Recorded by `conclude` once the socket's storage is written: a socket that cannot
        // get it is denied after all.
        return Judged {
            verdict: ALLOW,
            identity,
            binding_cgroup,
            binding_slot: binding.slot,
            allowed_rule: rule_id,
            leaf,
            now,
            sni,
        };
    }
    let audit =
        mode == MODE_AUDIT || (reason == REASON_SNI_UNCHECKED && sni == SNI_UNCHECKED_AUDIT);
    let kind = if audit { EVENT_AUDIT } else { EVENT_DENY };
    report(flow, leaf, identity, kind, reason, rule_id, now, Who::Task);
    judged(if audit { ALLOW } else { DENY })
}

/// Longest-prefix match on the identity's trie, then the first port entry (most specific rule
/// first) that allows port, protocol and time; that rule must be at least as specific as the
/// global deny prefix covering the destination. `named` says whether only entries learned for
/// name rules allow it (no address rule does).
#[inline(always)]
fn check_rules(identity: u32, flow: &Flow, now: &mut u64, named: &mut bool) -> (u8, u32) {
    let key = Key::new(128, flow.addr);
    let Some(set) = AW_RULES.get_value_ptr_mut(identity, &key) else {
        return (REASON_NO_RULE, 0);
    };
    // SAFETY: a value pointer from a successful lookup, read only; the value is a RuleSet
    // stored as words of the same size (see RuleSetWords).
    let set: &RuleSet = unsafe { &*set.cast::<RuleSet>() };
    let count = set.count as usize;
    let mut matched: Option<(u8, u32)> = None;
    // The first match decides; when it is a learned name entry, the rest are looked through
    // for an address rule that allows the flow as well.
    let mut by_name = false;
    let mut i = 0;
    while i < MAX_PORT_ENTRIES {
        if i >= count {
            break;
        }
        let e = &set.entries[i];
        if flow.port >= e.port_lo
            && flow.port <= e.port_hi
            && e.proto & flow.proto != 0
            && (e.port_set == 0 || in_port_set(e.port_set, u32::from(flow.port)))
        {
            let live = e.expires_ns == 0 || {
                if *now == 0 {
                    *now = unsafe { bpf_ktime_get_boot_ns() };
                }
                *now < e.expires_ns
            };
            if live {
                if matched.is_none() {
                    matched = Some((e.prefix_len, e.rule_id));
                    by_name = e.name != 0;
                    if !by_name {
                        break;
                    }
                } else if e.name == 0 && e.prefix_len >= set.deny_len {
                    by_name = false;
                    break;
                }
            }
        }
        i += 1;
    }
    let Some((prefix_len, rule_id)) = matched else {
        return (REASON_NO_RULE, 0);
    };
    if prefix_len < set.deny_len {
        return (REASON_GLOBAL_DENY, rule_id);
    }
    *named = by_name;
    (REASON_NONE, rule_id)
}

/// Whether the port set `key` holds `port`; a set that is not there holds nothing. A
/// function of its own: inlined, the word index was computed before the lookup and spilled
/// to the stack, where Linux 6.1's verifier loses its bound.
#[inline(never)]
fn in_port_set(key: u32, port: u32) -> bool {
    // SAFETY: read-only lookup of a plain-old-data value.
    let Some(s) = (unsafe { AW_PORT_SETS.get(key) }) else {
        return false;
    };
    // An explicit bound the verifier sees: LLVM turns the shift-and-mask of the index into a
    // mask-and-shift whose bound only follows from the port's, which Linux 6.1 loses on the
    // way here. The volatile read keeps LLVM from proving the check away.
    // SAFETY: a read of a local.
    let port = unsafe { core::ptr::read_volatile(&port) };
    if port > u32::from(u16::MAX) {
        return false;
    }
    let word = ((port >> 6) as usize) & (PORT_SET_WORDS - 1);
    s.bits[word] >> (port & 63) & 1 != 0
}

/// Who a record is about: the task in a hook, or the socket's owner on the packet line (no
/// task of the agent need be running there: packets also leave from softirq and timers).
#[derive(Clone, Copy)]
enum Who {
    Task,
    Socket(u32),
}

/// Writes one event, unless an identical one went out within the rate window: then it is only
/// counted, and the count rides on the next record written. Governed identities and unbound
/// cgroups each have their own ring buffer and rate table. A record that does not fit in its
/// ring buffer is counted in `AW_EVENT_DROPS`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(
    flow: &Flow,
    leaf: u64,
    identity: u32,
    kind: u8,
    reason: u8,
    rule_id: u32,
    now: u64,
    who: Who,
) {
    emit(&Record {
        flow,
        leaf,
        identity,
        kind,
        reason,
        rule_id,
        now,
        who,
    });
}

/// A record to write, gathered so [`emit`] takes one argument.
struct Record<'a> {
    flow: &'a Flow,
    leaf: u64,
    identity: u32,
    kind: u8,
    reason: u8,
    rule_id: u32,
    now: u64,
    who: Who,
}

/// One function for every call site, with its own stack frame: inlined at each of them, the
/// records' temporaries would not fit the 512-byte BPF stack of a hook.
#[inline(never)]
fn emit(r: &Record) {
    if r.identity == 0 {
        report_to(
            &AW_UNKNOWN_EVENTS,
            &AW_UNKNOWN_RATE,
            DROPS_UNKNOWN,
            r.flow,
            r.leaf,
            r.identity,
            r.kind,
            r.reason,
            r.rule_id,
            r.now,
            r.who,
        );
    } else {
        report_to(
            &AW_EVENTS,
            &AW_RATE,
            DROPS_GOVERNED,
            r.flow,
            r.leaf,
            r.identity,
            r.kind,
            r.reason,
            r.rule_id,
            r.now,
            r.who,
        );
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report_to<const RING: usize, const RATE: usize>(
    ring: &RingBuf<Event, RING>,
    rate: &LruHashMap<RateKey, RateState, RATE>,
    drop_slot: u32,
    flow: &Flow,
    leaf: u64,
    identity: u32,
    kind: u8,
    reason: u8,
    rule_id: u32,
    now: u64,
    who: Who,
) {
    // Callers pass 0 when they had no reason to read the clock yet.
    let now = if now == 0 {
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        now
    };
    // A socket received without a peer is told apart by its type and what refused it (an
    // option, a protocol), as a refused socket is.
    let socket = rate_keyed_by_socket(flow.hook, flow.port);
    let rk = RateKey {
        cgroup_id: leaf,
        addr: flow.addr,
        port: if socket { flow.sock_type } else { flow.port },
        kind,
        proto: if socket {
            flow.sock_protocol as u8
        } else {
            flow.proto
        },
        reason,
        family: flow.family as u8,
        inbound: if flow.hook == HOOK_INGRESS {
            HOOK_INGRESS
        } else {
            0
        },
        _pad: 0,
    };
    let window = match config() {
        Some(c) => c.rate_window_ns,
        None => 0,
    };
    let window = if window == 0 {
        DEFAULT_RATE_WINDOW_NS
    } else {
        window
    };
    let state = rate.get_ptr_mut(rk);
    let mut suppressed = 0u64;
    if let Some(st) = state {
        // SAFETY: pointer from a successful lookup; the counter is only touched atomically.
        unsafe {
            if now.wrapping_sub((*st).last_ns) < window {
                atomic_add(&raw mut (*st).suppressed, 1);
                if (*st).first_ns == 0 {
                    (*st).first_ns = now;
                }
                (*st).seen_ns = now;
                return;
            }
            // The record takes the count whole: a CPU reporting the same flow at the same
            // moment takes what is left (nothing, or what raced in), never the same events.
            suppressed = atomic_xchg(&raw mut (*st).suppressed, 0);
        }
    }
    let dropped = || {
        if let Some(st) = state {
            // SAFETY: as above. The count goes back for the next record to carry.
            unsafe { atomic_add(&raw mut (*st).suppressed, suppressed) };
        }
        if let Some(drops) = AW_EVENT_DROPS.get_ptr_mut(drop_slot) {
            // SAFETY: per-CPU slot. Atomic even so: a packet's softirq can run this on the
            // same CPU between a task's load and store, and one of the two counts would go.
            unsafe { atomic_add(drops, 1) };
        }
    };
    if drop_slot == DROPS_GOVERNED && loud(ring, identity) {
        dropped();
        return;
    }
    let Some(mut entry) = ring.reserve(0) else {
        dropped();
        return;
    };
    let (pid_tgid, uid_gid, comm) = match who {
        Who::Task => (
            bpf_get_current_pid_tgid(),
            bpf_get_current_uid_gid(),
            bpf_get_current_comm().unwrap_or([0; 16]),
        ),
        Who::Socket(uid) => (0, u64::from(uid), [0; 16]),
    };
    // Written field by field into the ring's memory: an Event built on the stack first would
    // not fit the BPF stack next to the hook's own.
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record, which is ours until submitted.
    unsafe {
        (*e).ts_ns = now;
        (*e).cgroup_id = leaf;
        (*e).pid_tgid = pid_tgid;
        (*e).uid_gid = uid_gid;
        (*e).addr = flow.addr;
        (*e).identity = identity;
        (*e).rule_id = rule_id;
        (*e).suppressed = if suppressed > u32::MAX as u64 {
            u32::MAX
        } else {
            suppressed as u32
        };
        (*e).port = flow.port;
        (*e).kind = kind;
        (*e).reason = reason;
        (*e).proto = flow.proto;
        (*e).hook = flow.hook;
        (*e).family = flow.family;
        (*e).sock_type = flow.sock_type;
        (*e).sock_protocol = flow.sock_protocol;
        (*e).comm = comm;
    }
    entry.submit(0);
    match state {
        Some(st) => unsafe {
            (*st).last_ns = now;
            (*st).first_ns = 0;
        },
        None => {
            let _ = rate.insert(
                rk,
                RateState {
                    last_ns: now,
                    suppressed: 0,
                    first_ns: 0,
                    seen_ns: 0,
                },
                BPF_NOEXIST as u64,
            );
        }
    }
}

/// Counts a governed record of `identity` and says whether it must give way: the ring's
/// reserved room is in use and this identity has written its share of the window. The count
/// starts again once the node has read a quarter of the ring since the window began, not on
/// a clock: a node that is down or stuck keeps the reserve for the quiet identities however
/// slow the flood, and one that reads, but slower than the flood, hands the flooder only its
/// share of what it read.
#[inline(always)]
fn loud<const RING: usize>(ring: &RingBuf<Event, RING>, identity: u32) -> bool {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_CONS_POS: u64 = 2;
    let Some(u) = AW_RECORD_USAGE.get_ptr_mut(identity) else {
        return false;
    };
    let ring_ptr = core::ptr::from_ref(ring).cast_mut().cast();
    // SAFETY: a pointer into the array's value; the count is only touched atomically; the
    // query helper takes the ring map.
    unsafe {
        let consumer = bpf_ringbuf_query(ring_ptr, BPF_RB_CONS_POS);
        let start = (*u).consumer_pos;
        if consumer < start || consumer - start >= RING as u64 / 4 {
            (*u).consumer_pos = consumer;
            (*u).written = 0;
        }
        if (*u).written >= LOUD_RECORDS {
            let waiting = bpf_ringbuf_query(ring_ptr, BPF_RB_AVAIL_DATA);
            if waiting > RING as u64 * (4 - RESERVED_RING_QUARTERS) / 4 {
                return true;
            }
        }
        atomic_add(&raw mut (*u).written, 1);
    }
    false
}

/// One more flow allowed by this rule, on this CPU's counter.
#[inline(always)]
fn count_hit(identity: u32, rule_id: u32) {
    let key = rule_hit_key(identity, rule_id);
    match AW_RULE_HITS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = AW_RULE_HITS.insert(key, 1, BPF_NOEXIST as u64);
        }
    }
}

/// Atomic exchange (BPF_XCHG: BPF CPU v3, Linux 5.12+).
#[inline(always)]
unsafe fn atomic_xchg(dst: *mut u64, v: u64) -> u64 {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::Relaxed }>(dst, v)
    }
}

/// Atomic compare-and-exchange (BPF_CMPXCHG: BPF CPU v3, Linux 5.12+): the value found.
#[inline(always)]
unsafe fn atomic_cmpxchg(dst: *mut u64, old: u64, new: u64) -> u64 {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(dst, old, new)
        .0
    }
}

/// Atomic add whose result is unused, so it compiles to BPF_XADD on every BPF CPU version.
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, v: u64) {
    // SAFETY: the caller passes a pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, v,
        );
    }
}

/// Where this kernel keeps what [`aw_task_tables`] reads; userspace fills it from the kernel's
/// BTF at each start.
#[btf_map]
static AW_TASK_LAYOUT: Array<TaskLayout, 1> = Array::new();

/// `struct bpf_iter_meta`: the seq_file the rows are written to comes first.
#[repr(C)]
pub struct IterMeta {
    seq: *mut aya_ebpf::bindings::seq_file,
}

/// `struct bpf_iter__task`: what a task iterator program is given for each task (NULL once,
/// after the last).
#[repr(C)]
pub struct IterTask {
    meta: *const IterMeta,
    task: *const u8,
}

/// The task census: a [`TaskTable`] row for each task, with its descriptor table. `enroll` finds
/// by it the tasks outside a unit that share a unit's table, and by each table's count of
/// references those it could not see (a task made after the iteration passed its number).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn aw_task_tables(ctx: *const IterTask) -> i32 {
    // SAFETY: the kernel passes a `bpf_iter__task` for a task iterator program.
    let (meta, task) = unsafe { ((*ctx).meta, (*ctx).task) };
    let Some(at) = AW_TASK_LAYOUT.get(0).copied() else {
        return 0;
    };
    if let Some((row, tctx)) = try_task_table(task, &at) {
        // SAFETY: meta is the iterator's, typed by the verifier; the row is on this stack.
        unsafe {
            let seq = (*meta).seq;
            bpf_seq_write(
                seq,
                core::ptr::from_ref(&row).cast(),
                core::mem::size_of::<TaskTable>() as u32,
            );
            if row.rings != 0 {
                write_ring_slots(seq, tctx, &at);
            }
        }
    }
    0
}

/// After a row with an io_uring context `tctx` (`u64::MAX`: unread), its registered-ring
/// slots, each as `(file, inode)`: the slot's file (0: empty; compared, never shown) and its
/// inode. Without a branch on what a slot holds (a failed read leaves 0): branches would keep
/// the verifier from merging the slots' paths, past its limit on older kernels. An unread
/// context writes one slot, a ring of unread inode.
#[inline(always)]
unsafe fn write_ring_slots(seq: *mut aya_ebpf::bindings::seq_file, tctx: u64, at: &TaskLayout) {
    let word = |addr: u64| -> u64 {
        let mut v = 0u64;
        // SAFETY: the helper reads kernel memory without faulting, and zeroes `v` where it
        // cannot.
        unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                (&raw mut v).cast(),
                8,
                addr as *const core::ffi::c_void,
            );
        }
        v
    };
    if tctx == u64::MAX {
        let slot = [1u64, 0];
        // SAFETY: as the caller's.
        unsafe { bpf_seq_write(seq, slot.as_ptr().cast(), 16) };
        return;
    }
    for i in 0..MAX_REGISTERED_RINGS as u64 {
        let file = word(tctx + u64::from(at.rings_at) + 8 * i);
        let inode = word(file + u64::from(at.f_inode_at));
        let slot = [file, word(inode + u64::from(at.i_ino_at))];
        // SAFETY: as the caller's.
        unsafe { bpf_seq_write(seq, slot.as_ptr().cast(), 16) };
    }
}

/// `task`'s row, with its io_uring context (`u64::MAX`: unread; 0: none); none for the call
/// after the last task, or an unknown layout.
#[inline(always)]
fn try_task_table(task: *const u8, at: &TaskLayout) -> Option<(TaskTable, u64)> {
    if task.is_null() || at.files_at == 0 {
        return None;
    }
    // Its io_uring context; unread, it counts as there.
    let tctx: u64 = if at.uring_at != 0 {
        read_at(task, at.uring_at).unwrap_or(u64::MAX)
    } else {
        0
    };
    let uring = u32::from(tctx != 0);
    let n = match tctx {
        0 => 0,
        u64::MAX => 1,
        _ if at.rings_at != 0 => MAX_REGISTERED_RINGS as u32,
        _ => 0,
    };
    // A task without a table (a kernel thread, a vhost worker, one exiting) has a row too:
    // a unit's task must be in the census.
    let files: u64 = read_at(task, at.files_at)?;
    let count: u32 = read_at(files as *const u8, at.count_at).unwrap_or(0);
    let tid: u32 = read_at(task, at.pid_at)?;
    // The cgroup unread (0) is no unit's: the task counts as one outside.
    let cgroup = (|| {
        let set: u64 = read_at(task, at.cgroups_at)?;
        let cgrp: u64 = read_at(set as *const u8, at.dfl_cgrp_at)?;
        let kn: u64 = read_at(cgrp as *const u8, at.kn_at)?;
        read_at::<u64>(kn as *const u8, at.kn_id_at)
    })()
    .unwrap_or(0);
    Some((
        TaskTable {
            files,
            cgroup,
            tid,
            count,
            rings: n,
            uring,
        },
        tctx,
    ))
}

/// A `T` at byte `offset` of the kernel struct at `base`; none where the address is NULL or
/// cannot be read.
#[inline(always)]
fn read_at<T>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: the helper reads kernel memory without faulting.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }.ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
