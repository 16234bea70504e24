//! The kernel datapath: load the eBPF programs or adopt pinned ones, attach them to a cgroup,
//! and keep their maps in sync with bindings, identities and rules.
//!
//! Everything lives under `<bpffs_dir>/v<ABI_VERSION>/{links,maps}`. Links are pinned, so
//! enforcement outlives the process that attached it; a later start adopts the pins instead of
//! attaching twice, and [`teardown`] is the only way enforcement goes away.

mod bindings;
pub mod event;
#[cfg(test)]
mod frames;
pub mod layout;
pub mod sni;
pub mod sys;
pub mod tasks;

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::{
    self as c, ABI_VERSION, ALL_MAPS, ALL_PROGRAMS, Addr, Binding, Config, IdentityState,
    KernelLayout, MAX_IDENTITIES, PortSet, RuleSet, TaskLayout,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, LsmCgroup,
        links::{FdLink, PinnedLink},
    },
};
use ipnet::IpNet;
use tracing::{debug, info, warn};

pub use event::{
    EventKind, EventReader, EventRecord, Hook, family_name, socket_detail, sockopt_name,
};

use crate::{
    cgroup::{Cgroup, CgroupError},
    clock::BootInstant,
    policy::{
        CompileError, CompiledTrie, IdentityStatus, Mode, Net, Rule, UnknownFlows, compile_rules,
        model::{IoUring, SniCheck},
    },
};

/// The compiled eBPF object, built by build.rs from agent-ebpf.
/// BPF_F_NO_PREALLOC: LPM tries must not preallocate.
const BPF_F_NO_PREALLOC: u32 = 1;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("TLS server names: {0}")]
    Sni(#[from] sni::SniError),
    #[error(
        "{path} is not on a bpf filesystem (mount one with `mount -t bpf -o mode=0700 bpf {path}`)"
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "no bpf filesystem is mounted at /sys/fs/bpf, and {why}: one the node mounted could go, and every pin and program with it, when the node stops; mount it on the host first (`mount -t bpf -o mode=0700 bpf /sys/fs/bpf`)"
    )]
    BpffsNotShared { why: String },
    #[error(
        "{path} is not a safe pin directory: {why}; remove it (another user may have made it to take the node's pins over) and start again"
    )]
    UnsafePinDir { path: PathBuf, why: String },
    #[error("another agentwall node holds {path}: one node per pin directory")]
    Busy { path: PathBuf },
    #[error(
        "the attach cgroup {attach} is in a cgroup tree whose top, {top}, is not the host's root cgroup (a cgroup namespace, or a subtree mounted alone): the programs read cgroups by their depth from the host's root, which cannot be read from here; run the node in the host's cgroup namespace with the whole cgroup2 hierarchy mounted"
    )]
    AttachOutOfSight { attach: PathBuf, top: PathBuf },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error(
        "the BPF LSM line is pinned and running, and this build cannot keep it: {0}. The pinned programs stay; `agentwall down` first to start without the line"
    )]
    LsmLine(String),
    #[error(
        "the pinned link {path} ({name}) enforces cgroup {cgroup}, not the attach point {attach}: set attach_cgroup back, or `agentwall down` first to move enforcement"
    )]
    PinnedElsewhere {
        name: &'static str,
        path: PathBuf,
        cgroup: u64,
        attach: PathBuf,
    },
    #[error(
        "replacing the program of the pinned link {name} (it keeps its old one; links replaced before it run this build's; a start of this build finishes the swap): {source}"
    )]
    Replace {
        name: &'static str,
        source: io::Error,
    },
    #[error("attaching eBPF program {name}: {source}")]
    Attach {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error(
        "swapping rule tries: {source} after {applied} of {total} identities were swapped \
         (those run the new rules, the rest the old)"
    )]
    Swap {
        applied: usize,
        total: usize,
        source: io::Error,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("identity {0} is out of range: identities are 1..{max}", max = MAX_IDENTITIES - 1)]
    IdentityOutOfRange(u32),
    #[error("cgroup level {level} of {path} is deeper than the {max} levels the datapath walks")]
    TooDeep { path: PathBuf, level: u32, max: u32 },
    #[error(
        "the datapath's binding table is full ({max} cgroups bound): nothing was bound; a launched agent's binding is freed once all its processes have exited"
    )]
    BindingsFull { max: u32 },
    #[error("{path} still has processes; unbinding it would leave them ungoverned")]
    Populated { path: PathBuf },
    #[error("rules for identity {identity}: {source}")]
    Compile { identity: u32, source: CompileError },
    #[error(
        "rules for identity {identity}: the kernel holds at most {max} port sets (rules listing more port ranges than a trie entry holds) and all are in use (nothing was changed; the previous rules stay in force)"
    )]
    PortSetsFull { identity: u32, max: u32 },
    #[error(
        "rules for identity {identity}: storing a port set: {source} (nothing was changed; the previous rules stay in force)"
    )]
    PortSet {
        identity: u32,
        source: Box<MapError>,
    },
    #[error("{what}: {source} (nothing was changed; the previous rules stay in force)")]
    Apply { what: String, source: Box<MapError> },
    #[error(
        "filling the trie of identity {identity}: {source} after {done} of {total} entries (nothing was changed; the previous rules stay in force)"
    )]
    Fill {
        identity: u32,
        done: usize,
        total: usize,
        source: io::Error,
    },
    #[error("identity {0} has no trie from this process yet: apply its rules first")]
    NoTrie(u32),
    #[error("identity {0}'s trie was built to learn no hosts (it has no name rules)")]
    HostsNotKept(u32),
    #[error(
        "writing identity states: {source} ({failed} of {total} not written; the new rules are in force, their modes and DNS steering are not all)"
    )]
    States {
        failed: usize,
        total: usize,
        source: Box<MapError>,
    },
}

impl DatapathError {
    /// The kernel took part of the change before it failed (a partial swap, identity states
    /// not written): trying the same change again finishes it.
    pub fn changed_kernel(&self) -> bool {
        matches!(self, Self::Swap { applied, .. } if *applied > 0)
            || matches!(self, Self::States { .. })
    }

    /// The identity whose rules the error is about, if it is about one.
    pub fn identity(&self) -> Option<u32> {
        match self {
            Self::Compile { identity, .. }
            | Self::Fill { identity, .. }
            | Self::PortSetsFull { identity, .. }
            | Self::PortSet { identity, .. } => Some(*identity),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        source: Box::new(e),
    }
}

/// Where to attach and where to pin.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// The cgroup the programs attach to; it and every cgroup below it are judged.
    pub attach_cgroup: PathBuf,
    /// Base directory in bpffs; pins go to `<bpffs_dir>/v<ABI_VERSION>`.
    pub bpffs_dir: PathBuf,
    pub unknown_flows: UnknownFlows,
    /// Identical events inside this window are counted, not written again.
    pub rate_window: Duration,
    /// Entries every identity's trie can take beyond its compiled rules: the host entries
    /// learned from DNS answers. LPM tries allocate per entry, so room costs nothing unused.
    pub host_headroom: u32,
    /// Report flows a rule allows as well (rate-limited like every record).
    pub record_allowed: bool,
}

impl DatapathConfig {
    pub fn new(attach_cgroup: impl Into<PathBuf>, bpffs_dir: impl Into<PathBuf>) -> Self {
        Self {
            attach_cgroup: attach_cgroup.into(),
            bpffs_dir: bpffs_dir.into(),
            unknown_flows: UnknownFlows::default(),
            rate_window: Duration::from_secs(1),
            host_headroom: 4096,
            record_allowed: false,
        }
    }
}

/// Occupancy of the datapath's fixed-size maps (for `status` and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    pub bindings: usize,
    pub bindings_max: usize,
    pub identities: usize,
    pub identities_max: usize,
    /// Rules applied, over all identities (each identity's trie is sized to its rules).
    pub rules: usize,
    /// (identity, address, name) entries of the TLS server-name check, shared by all
    /// identities: when full, new names are refused (their connections with them).
    #[serde(default)]
    pub server_names: usize,
    #[serde(default)]
    pub server_names_max: usize,
}

/// Whether socket families other than inet are judged: the BPF LSM line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", content = "why", rename_all = "snake_case")]
pub enum SocketFamilies {
    /// Every family but unix, netlink, inet and inet6 is refused to governed agents.
    Enforced,
    /// The kernel runs no BPF LSM programs here (the reason); only inet sockets are judged
    /// (`sock_create`), and other families rely on the agent lacking capabilities. Socket
    /// options are judged by the cgroup hook, which compat (32-bit) system calls skip:
    /// `launch` refuses those to the agent.
    Unenforced(String),
}

/// Claims nothing until the datapath has said.
impl Default for SocketFamilies {
    fn default() -> Self {
        Self::Unenforced("not reported".into())
    }
}

/// Whether the TLS server-name check runs: its program (`aw_egress_sni`) in the packet line's
/// slot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", content = "why", rename_all = "snake_case")]
pub enum ServerNameCheck {
    /// Connections only a name rule allows have their first data checked.
    Loaded,
    /// The kernel refused the check's program (the reason: `lockdown=confidentiality`
    /// withholds the kernel reads it needs). A policy's `sni: enforce` then refuses, at
    /// connect, the TCP connections only a name rule allows; `sni: audit` records them
    /// there and lets them through. The slot holds no earlier build's check either.
    Unavailable(String),
}

/// The LSM hook an `lsm_cgroup` program attaches to.
fn lsm_hook(name: &str) -> &'static str {
    match name {
        c::PROG_LSM_SETSOCKOPT => "socket_setsockopt",
        c::PROG_LSM_RECVMSG => "socket_recvmsg",
        c::PROG_LSM_SENDMSG => "socket_sendmsg",
        c::PROG_LSM_FILE_RECEIVE => "file_receive",
        c::PROG_LSM_BIND => "socket_bind",
        c::PROG_LSM_RING_SETUP => "inode_init_security_anon",
        _ => "socket_create",
    }
}

/// Whether this kernel runs BPF LSM programs: `bpf` in its active LSM list.
pub fn lsm_line() -> SocketFamilies {
    judge_lsms(sys::active_lsms())
}

/// [`lsm_line`] without mounting securityfs where it is not mounted (`node --check-config`).
pub fn lsm_line_as_mounted() -> SocketFamilies {
    judge_lsms(std::fs::read_to_string("/sys/kernel/security/lsm"))
}

fn judge_lsms(list: io::Result<String>) -> SocketFamilies {
    match list {
        Ok(list) if list.trim().split(',').any(|l| l == "bpf") => SocketFamilies::Enforced,
        Ok(list) => SocketFamilies::Unenforced(format!(
            "the kernel's active LSMs ({}) do not include bpf; add lsm=...,bpf to its command line",
            list.trim()
        )),
        Err(e) => SocketFamilies::Unenforced(format!("cannot read /sys/kernel/security/lsm: {e}")),
    }
}

/// Records lost because their ring buffer was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingDrops {
    /// Governed identities' records.
    pub governed: u64,
    /// Records of cgroups bound to no identity.
    pub unknown: u64,
}

/// How [`Datapath::start`] found the programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartReport {
    /// Programs this start attached.
    pub attached: usize,
    /// Programs whose pinned links were already in place.
    pub adopted: usize,
    /// Of those, links whose program this start replaced (another build's), or attached again
    /// (the pinned link had been detached).
    pub replaced: usize,
    /// Pinned links of programs this build does not have, detached.
    pub removed: usize,
}

pub fn pin_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(format!("v{ABI_VERSION}"))
}

fn attach_type(name: &str) -> u32 {
    match name {
        c::PROG_CONNECT4 => sys::ATTACH_INET4_CONNECT,
        c::PROG_CONNECT6 => sys::ATTACH_INET6_CONNECT,
        c::PROG_SENDMSG4 => sys::ATTACH_UDP4_SENDMSG,
        c::PROG_SENDMSG6 => sys::ATTACH_UDP6_SENDMSG,
        c::PROG_RECVMSG4 => sys::ATTACH_UDP4_RECVMSG,
        c::PROG_RECVMSG6 => sys::ATTACH_UDP6_RECVMSG,
        c::PROG_GETPEERNAME4 => sys::ATTACH_INET4_GETPEERNAME,
        c::PROG_GETPEERNAME6 => sys::ATTACH_INET6_GETPEERNAME,
        c::PROG_EGRESS => sys::ATTACH_INET_EGRESS,
        c::PROG_INGRESS => sys::ATTACH_INET_INGRESS,
        c::PROG_SETSOCKOPT => sys::ATTACH_CGROUP_SETSOCKOPT,
        c::PROG_SOCKET_FAMILY
        | c::PROG_LSM_SETSOCKOPT
        | c::PROG_LSM_RECVMSG
        | c::PROG_LSM_SENDMSG
        | c::PROG_LSM_FILE_RECEIVE
        | c::PROG_LSM_BIND
        | c::PROG_LSM_RING_SETUP => sys::ATTACH_LSM_CGROUP,
        _ => sys::ATTACH_INET_SOCK_CREATE,
    }
}

/// One identity's trie as this process made it: the map, and what it was compiled from.
struct Trie {
    map: Mutex<aya::maps::Map>,
    fd: u32,
    /// The rules compiled into it, host entries learned later aside (those are written in
    /// place by [`Datapath::update_hosts_with`], which needs them). Kept only for identities
    /// that learn hosts: the rest are known by `fingerprint`, so a node keeps each rule once.
    base: Option<Arc<[Rule]>>,
    /// SHA-256 of the entries compiled from `base` and the deny list, for a trie that keeps
    /// no `base`: the next change skips it when it would compile to the same.
    fingerprint: Option<[u8; 32]>,
    /// Rules compiled into it.
    rules: usize,
    global_deny: Arc<[IpNet]>,
    /// Keys of the port sets its entries name, released when it goes.
    sets: Mutex<Vec<u32>>,
    port_sets: Arc<PortSets>,
}

impl Drop for Trie {
    fn drop(&mut self) {
        for k in std::mem::take(&mut *lock(&self.sets)) {
            self.port_sets.release(k);
        }
    }
}

/// The keys of `compiled`'s port sets, acquired for `trie` (host entries written in place):
/// a key the trie names already is released again, the others join its list.
fn trie_sets(
    trie: &Trie,
    identity: u32,
    compiled: &CompiledTrie,
) -> Result<Vec<u32>, DatapathError> {
    let mut keys = Vec::with_capacity(compiled.sets.len());
    for set in &compiled.sets {
        match trie.port_sets.acquire(identity, set) {
            Ok(k) => keys.push(k),
            Err(e) => {
                for k in keys {
                    trie.port_sets.release(k);
                }
                return Err(e);
            }
        }
    }
    let mut held = lock(&trie.sets);
    for &k in &keys {
        if held.contains(&k) {
            trie.port_sets.release(k);
        } else {
            held.push(k);
        }
    }
    Ok(keys)
}

/// One trie to build: whose, from what, and whether it keeps its rules (it learns hosts).
struct Build {
    identity: u32,
    base: Arc<[Rule]>,
    hosts: Vec<Rule>,
    keep_base: bool,
}

/// Tries built by one thread, and the entries written into them.
type Built = (Vec<(u32, Arc<Trie>)>, usize);

/// What a compiled trie holds, as a digest.
fn fingerprint(t: &CompiledTrie) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (net, set) in &t.entries {
        h.update(net.addr);
        h.update([net.len]);
        // SAFETY: RuleSet is repr(C) plain old data with explicit padding (zeroed by the
        // compiler that built it), the bytes the kernel gets.
        h.update(unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(set).cast::<u8>(), size_of::<RuleSet>())
        });
    }
    for set in &t.sets {
        for w in &set.bits {
            h.update(w.to_le_bytes());
        }
    }
    h.finalize().into()
}

/// The port sets in the kernel (`AW_PORT_SETS`), stored once per content and counted by the
/// tries that name them: a set goes in before the first trie naming it is swapped in, and
/// out after the last one is replaced.
struct PortSets {
    map: Mutex<HashMap<MapData, u32, PortSet>>,
    /// Key, content and how many tries name it.
    table: Mutex<std::collections::HashMap<u32, (Box<PortSet>, usize)>>,
    /// Sets an earlier process left, named by the tries it swapped in: kept until this one
    /// has replaced every trie.
    inherited: Mutex<Vec<u32>>,
    /// The datapath is going away (a clean stop): the pinned tries stay in force and keep
    /// naming their sets, so nothing leaves the kernel from here on.
    closing: std::sync::atomic::AtomicBool,
}

impl PortSets {
    fn new(map: HashMap<MapData, u32, PortSet>) -> Result<Self, DatapathError> {
        let mut table = std::collections::HashMap::new();
        for entry in map.iter() {
            let (k, v) = entry.map_err(map_err(c::MAP_PORT_SETS))?;
            table.insert(k, (Box::new(v), 1));
        }
        let inherited = table.keys().copied().collect();
        Ok(Self {
            map: Mutex::new(map),
            table: Mutex::new(table),
            inherited: Mutex::new(inherited),
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The key of `set` in the kernel, stored now if it was not; one more reference.
    fn acquire(&self, identity: u32, set: &PortSet) -> Result<u32, DatapathError> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for w in &set.bits {
            h.update(w.to_le_bytes());
        }
        let d = h.finalize();
        let mut key = u32::from_le_bytes([d[0], d[1], d[2], d[3]]).max(1);
        let mut table = lock(&self.table);
        loop {
            match table.get_mut(&key) {
                Some((stored, refs)) if **stored == *set => {
                    *refs += 1;
                    return Ok(key);
                }
                // Another set under this digest's first bytes: the next key.
                Some(_) => key = key.checked_add(1).unwrap_or(1),
                None => break,
            }
        }
        if table.len() >= c::MAX_PORT_SETS as usize {
            return Err(DatapathError::PortSetsFull {
                identity,
                max: c::MAX_PORT_SETS,
            });
        }
        lock(&self.map)
            .insert(key, set, 0)
            .map_err(|e| DatapathError::PortSet {
                identity,
                source: Box::new(e),
            })?;
        table.insert(key, (Box::new(*set), 1));
        Ok(key)
    }

    /// One reference fewer; the last takes the set out of the kernel.
    fn release(&self, key: u32) {
        let mut table = lock(&self.table);
        let Some((_, refs)) = table.get_mut(&key) else {
            return;
        };
        *refs -= 1;
        if *refs == 0 {
            table.remove(&key);
            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if let Err(e) = lock(&self.map).remove(&key) {
                warn!(key, error = %e, "could not remove an unused port set");
            }
        }
    }

    /// Every trie an earlier process made has been replaced: its sets are this process's to
    /// count from now on.
    fn release_inherited(&self) {
        let keys = std::mem::take(&mut *lock(&self.inherited));
        for k in keys {
            self.release(k);
        }
    }
}

/// The tries this process swapped in, and those staged by a change in progress: host
/// updates reach both, so an address learned while a change is being applied is in the new
/// trie too.
struct Tries {
    current: BTreeMap<u32, Arc<Trie>>,
    staged: BTreeMap<u32, Arc<Trie>>,
    /// The deny list new tries are compiled with.
    global_deny: Arc<[IpNet]>,
}

impl Default for Tries {
    fn default() -> Self {
        Self {
            current: BTreeMap::new(),
            staged: BTreeMap::new(),
            global_deny: Arc::from(Vec::new()),
        }
    }
}

/// One identity's rules for [`Datapath::apply`].
#[derive(Clone, Debug)]
pub struct IdentityRules {
    pub identity: u32,
    /// The policy's rules.
    pub base: Arc<[Rule]>,
    /// Compiled in with `base` when the trie is rebuilt (learned host entries).
    pub hosts: Vec<Rule>,
    /// Hosts may be learned for it (it has name rules): its trie keeps `base` for them.
    pub learns: bool,
}

/// What the kernel knows of an identity besides its rules and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    pub identity: u32,
    pub mode: Mode,
    /// Its DNS goes to the node's proxy (it has name rules).
    pub dns: bool,
    /// The TLS server-name check of connections only its name rules allow.
    pub sni: SniCheck,
    /// Whether its tasks may make and map io_uring instances (the BPF LSM line).
    pub io_uring: IoUring,
}

/// Tries a thread builds at least (fewer are not worth a thread).
const MIN_TRIES_PER_THREAD: usize = 64;

/// What [`Datapath::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Tries built and swapped in (identities whose rules or deny list changed).
    pub rebuilt: usize,
    /// Entries written into them.
    pub entries: usize,
    /// Compiling, creating and filling the changed tries (wall time, on every core), and
    /// swapping them in.
    pub build: Duration,
    pub swap: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while a map handle was held leaves the handle as usable as before.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running datapath: handles to the pinned maps. Every method takes `&self`: each map has
/// its own lock, held only for its syscalls, so owners share one `Arc<Datapath>`.
pub struct Datapath {
    /// The pin directory, locked (`flock`) for as long as this lives: two nodes starting at
    /// once would swap and remove each other's links.
    _lock: fs::File,
    pin_dir: PathBuf,
    attach: Cgroup,
    bindings: Mutex<bindings::Bindings>,
    identities: Mutex<Array<MapData, IdentityState>>,
    /// The outer array of per-identity tries; written with batch updates (see `swap_tries`).
    rules: MapData,
    config: Mutex<Array<MapData, Config>>,
    drops: PerCpuArray<MapData, u64>,
    families: SocketFamilies,
    /// Kernel fields the BTF did not give, each refusing what it would have judged.
    layout_gaps: Vec<LayoutGap>,
    /// The task census `enroll` reads, or why it is not loaded.
    census: Result<tasks::TaskCensus, String>,
    server_names: ServerNameCheck,
    /// Rate-limit tables: governed identities', then unbound cgroups'.
    rate: [HashMap<MapData, c::RateKey, c::RateState>; 2],
    hits: Mutex<aya::maps::PerCpuHashMap<MapData, u64, u64>>,
    /// The ring buffers of governed and of unbound records, until the reader is taken.
    events: Mutex<Option<(RingBuf<MapData>, RingBuf<MapData>)>>,
    /// Set once the programs are attached ([`Datapath::attach`]).
    report: std::sync::OnceLock<StartReport>,
    tries: Mutex<Tries>,
    /// One change of rules at a time, from compile to swap.
    applying: Mutex<()>,
    /// Room left in every trie for host entries learned after it was built.
    host_headroom: u32,
    port_sets: Arc<PortSets>,
    /// Identities whose trie in the kernel an earlier process swapped in (found at start):
    /// the first full apply replaces them all, emptying those the policy no longer names,
    /// and only then are the port sets they name this process's to count.
    foreign: Mutex<std::collections::BTreeSet<u32>>,
    /// Server names for the TLS check, and the ones it refused.
    sni: Mutex<sni::SniMaps>,
    /// Each governed socket's state (`AW_SOCKS`), read and cleared here only where a binding
    /// made by a refused `enroll` is withdrawn.
    socks: Mutex<aya::maps::SkStorage<MapData, c::SockState>>,
}

/// A clean stop leaves enforcement in place (pins), port sets included.
impl Drop for Datapath {
    fn drop(&mut self) {
        self.port_sets
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Datapath {
    /// Loads and attaches the programs, or adopts those already pinned for this ABI version.
    /// A failure part-way detaches whatever this call attached.
    pub fn start(cfg: &DatapathConfig) -> Result<Self, DatapathError> {
        let dp = Self::load(cfg)?.attach()?;
        dp.retire_older_layouts()?;
        Ok(dp)
    }

    /// The pins of other map-layout versions under the bpffs dir whose links still enforce
    /// (`v1`, `v2`, ...): an upgrade in progress. Their maps hold the bindings and socket
    /// state of the agents running from before; this version's maps know none of it until
    /// its owner puts the bindings in again.
    pub fn older_layouts(&self) -> Result<Vec<String>, DatapathError> {
        Ok(other_versions(self.bpffs_dir())?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// The cgroups bound in the maps of every other map-layout version still pinned (ids;
    /// only the keys are read, which every layout keeps as cgroup ids).
    pub fn older_bindings(&self) -> Result<Vec<u64>, DatapathError> {
        let mut ids = Vec::new();
        for (_, path) in other_versions(self.bpffs_dir())? {
            let pin = path.join("maps").join(c::MAP_BINDINGS);
            if pin.exists() {
                ids.extend(sys::pinned_u64_keys(&pin).map_err(io_err(&pin))?);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Detaches and removes the pins of every other map-layout version. Called once this
    /// version's programs are attached and its maps hold what the old ones held (the node:
    /// policy applied, sessions bound, sockets made under the old layout ended): until then
    /// the old programs go on judging beside the new ones, so there is no moment without
    /// enforcement. Returns the versions removed.
    pub fn retire_older_layouts(&self) -> Result<Vec<String>, DatapathError> {
        let mut retired = Vec::new();
        for (name, path) in other_versions(self.bpffs_dir())? {
            remove_pins(&path, self.bpffs_dir())?;
            info!(version = %name, "detached the pins of an earlier map layout");
            retired.push(name);
        }
        Ok(retired)
    }

    /// The first half of [`Datapath::start`]: maps made or adopted, and every program that
    /// must be attached loaded and checked by the kernel's verifier (the slow part), but
    /// nothing attached. Dropping the result attaches nothing.
    pub fn load(cfg: &DatapathConfig) -> Result<Loaded, DatapathError> {
        let attach = Cgroup::open(&cfg.attach_cgroup)?;
        check_attach(&attach)?;
        let sys_bpf = Path::new("/sys/fs/bpf");
        if sys::bpffs_missing(&cfg.bpffs_dir).map_err(io_err(sys_bpf))? {
            not_shared()?;
            sys::mount_bpffs().map_err(io_err(sys_bpf))?;
        }
        let dir = pin_dir(&cfg.bpffs_dir);
        let (maps_dir, links_dir) = (dir.join("maps"), dir.join("links"));
        // Each level checked before anything is made in it, and made root's only: a link a
        // user left where a level should be is never followed.
        for d in [&cfg.bpffs_dir, &dir, &maps_dir, &links_dir] {
            match fs::symlink_metadata(d) {
                Ok(_) => check_pin_dir(d)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    use std::os::unix::fs::DirBuilderExt as _;
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(d)
                        .map_err(io_err(d))?;
                }
                Err(e) => return Err(io_err(d)(e)),
            }
        }
        if !sys::is_bpffs(&dir).map_err(io_err(&dir))? {
            return Err(DatapathError::NotBpffs { path: dir });
        }
        for d in [&cfg.bpffs_dir, &dir, &maps_dir, &links_dir] {
            check_pin_dir(d)?;
        }
        let lock = fs::File::open(&dir).map_err(io_err(&dir))?;
        // SAFETY: a plain system call on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DatapathError::Busy { path: dir }
            } else {
                io_err(&dir)(e)
            });
        }

        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, PathBuf)> =
            ALL_MAPS.iter().map(|n| (*n, maps_dir.join(n))).collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let fresh = !ALL_PROGRAMS.iter().any(|n| links_dir.join(n).exists());
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let swaps = if fresh {
            Swaps::new()
        } else {
            pinned_swaps(&ebpf, &links_dir, &attach)?
        };
        let mut families = if links_dir.join(c::PROG_SOCKET_FAMILY).exists() {
            SocketFamilies::Enforced
        } else {
            lsm_line()
        };
        let mut btf = None;
        let server_names = load_programs(&mut ebpf, &links_dir, &mut families, &swaps, &mut btf)?;
        // After the loads, before anything is attached: an LSM line found wrong here is
        // never attached.
        let (layout, task_layout, mut layout_gaps) = kernel_layout(&mut families);
        let census = load_census(&mut ebpf, task_layout, &mut btf);
        if let Err(why) = &census {
            warn!(why = %why, "{ENROLL_REFUSED}");
            layout_gaps.push(LayoutGap {
                unknown: why.clone(),
                effect: ENROLL_REFUSED.to_owned(),
            });
        }
        if let SocketFamilies::Unenforced(why) = &families
            && links_dir.join(c::PROG_SOCKET_FAMILY).exists()
        {
            // The pinned LSM links would run on with an unknown layout while status said
            // the line is off: refused, the pinned programs left as they are.
            return Err(DatapathError::LsmLine(why.clone()));
        }
        Ok(Loaded {
            fresh,
            lock,
            families,
            server_names,
            swaps,
            layout,
            layout_gaps,
            census,
            cfg: cfg.clone(),
            attach,
            dir,
            links_dir,
            ebpf,
        })
    }
}

/// A datapath loaded but not attached (see [`Datapath::load`]).
pub struct Loaded {
    /// No link was pinned before: this load made the pin directory's maps.
    fresh: bool,
    lock: fs::File,
    families: SocketFamilies,
    server_names: ServerNameCheck,
    /// Pinned links whose program this start replaces.
    swaps: Swaps,
    layout: KernelLayout,
    layout_gaps: Vec<LayoutGap>,
    census: Result<tasks::TaskCensus, String>,
    cfg: DatapathConfig,
    attach: Cgroup,
    dir: PathBuf,
    links_dir: PathBuf,
    ebpf: Ebpf,
}

impl Loaded {
    /// No program was attached before this load: dropping it and tearing the pin directory
    /// down leaves nothing behind.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Attaches (or adopts) every program, and takes the maps.
    pub fn attach(self) -> Result<Datapath, DatapathError> {
        let (dp, programs) = self.open()?;
        dp.attach(programs)?;
        Ok(dp)
    }

    /// Takes the maps, to be filled, and keeps the programs unattached: after an upgrade to
    /// a new map layout the new programs must not judge before their maps hold the policy and
    /// the sessions (the old layout's programs judge meanwhile); [`Datapath::attach`] then
    /// attaches them. Pins of the running layout keep judging with these same maps throughout.
    pub fn open(self) -> Result<(Datapath, Programs), DatapathError> {
        let Self {
            fresh: _,
            lock: pins_lock,
            families,
            server_names,
            swaps,
            layout,
            layout_gaps,
            census,
            cfg,
            attach,
            dir,
            links_dir,
            mut ebpf,
        } = self;
        let cfg = &cfg;

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))
        };
        let bindings = bindings::Bindings::open(
            HashMap::try_from(take(&mut ebpf, c::MAP_BINDINGS)?)
                .map_err(map_err(c::MAP_BINDINGS))?,
            Array::try_from(take(&mut ebpf, c::MAP_BINDING_SLOTS)?)
                .map_err(map_err(c::MAP_BINDING_SLOTS))?,
        )?;
        let identities = Array::try_from(take(&mut ebpf, c::MAP_IDENTITIES)?)
            .map_err(map_err(c::MAP_IDENTITIES))?;
        let rules = match take(&mut ebpf, c::MAP_RULES)? {
            aya::maps::Map::ArrayOfMaps(data) => data,
            _ => {
                return Err(map_err(c::MAP_RULES)(MapError::InvalidName {
                    name: c::MAP_RULES.into(),
                }));
            }
        };
        let config =
            Array::try_from(take(&mut ebpf, c::MAP_CONFIG)?).map_err(map_err(c::MAP_CONFIG))?;
        let mut layout_map: Array<_, KernelLayout> =
            Array::try_from(take(&mut ebpf, c::MAP_LAYOUT)?).map_err(map_err(c::MAP_LAYOUT))?;
        layout_map
            .set(0, layout, 0)
            .map_err(map_err(c::MAP_LAYOUT))?;
        let drops = PerCpuArray::try_from(take(&mut ebpf, c::MAP_EVENT_DROPS)?)
            .map_err(map_err(c::MAP_EVENT_DROPS))?;
        let events =
            RingBuf::try_from(take(&mut ebpf, c::MAP_EVENTS)?).map_err(map_err(c::MAP_EVENTS))?;
        let unknown_events = RingBuf::try_from(take(&mut ebpf, c::MAP_UNKNOWN_EVENTS)?)
            .map_err(map_err(c::MAP_UNKNOWN_EVENTS))?;
        let rate =
            HashMap::try_from(take(&mut ebpf, c::MAP_RATE)?).map_err(map_err(c::MAP_RATE))?;
        let unknown_rate = HashMap::try_from(take(&mut ebpf, c::MAP_UNKNOWN_RATE)?)
            .map_err(map_err(c::MAP_UNKNOWN_RATE))?;
        let hits = aya::maps::PerCpuHashMap::try_from(take(&mut ebpf, c::MAP_RULE_HITS)?)
            .map_err(map_err(c::MAP_RULE_HITS))?;
        let port_sets = PortSets::new(
            HashMap::try_from(take(&mut ebpf, c::MAP_PORT_SETS)?)
                .map_err(map_err(c::MAP_PORT_SETS))?,
        )?;
        let sni = sni::SniMaps::open(
            HashMap::try_from(take(&mut ebpf, c::MAP_SNI_NAMES)?)
                .map_err(map_err(c::MAP_SNI_NAMES))?,
            HashMap::try_from(take(&mut ebpf, c::MAP_SNI_SEEN)?)
                .map_err(map_err(c::MAP_SNI_SEEN))?,
        )?;
        // The check goes in its slot before the first apply writes identity states that
        // send connections to it: a connection made meanwhile finds it there rather than
        // waiting for it. (A check the kernel refused is cleared at attach instead, after that
        // apply has said so in the states: until then, the one in the slot checks.)
        if server_names == ServerNameCheck::Loaded {
            set_tails(&mut ebpf, &server_names)?;
        }
        let socks = aya::maps::SkStorage::try_from(take(&mut ebpf, c::MAP_SOCKS)?)
            .map_err(map_err(c::MAP_SOCKS))?;
        let foreign = sys::filled_slots(rules.fd().as_fd(), MAX_IDENTITIES)
            .map_err(io_err(Path::new(c::MAP_RULES)))?
            .into_iter()
            .collect();

        let dp = Datapath {
            _lock: pins_lock,
            pin_dir: dir,
            attach,
            bindings: Mutex::new(bindings),
            identities: Mutex::new(identities),
            rules,
            config: Mutex::new(config),
            drops,
            families,
            layout_gaps,
            census,
            server_names,
            rate: [rate, unknown_rate],
            hits: Mutex::new(hits),
            events: Mutex::new(Some((events, unknown_events))),
            report: std::sync::OnceLock::new(),
            tries: Mutex::new(Tries::default()),
            applying: Mutex::new(()),
            host_headroom: cfg.host_headroom,
            port_sets: Arc::new(port_sets),
            foreign: Mutex::new(foreign),
            sni: Mutex::new(sni),
            socks: Mutex::new(socks),
        };
        // Rebuild what the kernel reads from config: a restarted daemon keeps the bindings the
        // pinned map holds.
        let mut levels = 0u32;
        for (_, b) in lock(&dp.bindings).entries()? {
            levels |= 1u32.checked_shl(u32::from(b.level)).unwrap_or(0);
        }
        let (attach_cgroup, attach_level) = (dp.attach.id(), dp.attach.level());
        dp.update_config(|conf| {
            conf.attach_cgroup = attach_cgroup;
            conf.attach_level = attach_level;
            conf.bound_levels |= levels;
            conf.unknown_flows = cfg.unknown_flows.code();
            conf.record_allowed = u8::from(cfg.record_allowed);
            conf.rate_window_ns = u64::try_from(cfg.rate_window.as_nanos()).unwrap_or(u64::MAX);
            if !swaps.is_empty() {
                // In flux until every link is swapped: a start that stops part-way leaves
                // links of two builds, which no build's revision may claim (a rollback would
                // adopt them).
                conf.programs = 0;
            }
        })?;
        Ok((
            dp,
            Programs {
                ebpf,
                links_dir,
                swaps,
            },
        ))
    }
}

/// This build's programs, loaded and not yet attached ([`Loaded::open`]).
pub struct Programs {
    ebpf: Ebpf,
    links_dir: PathBuf,
    swaps: Swaps,
}

impl Datapath {
    /// Attaches (or adopts, or swaps into the pinned links) every program of `programs`.
    pub fn attach(&self, programs: Programs) -> Result<StartReport, DatapathError> {
        let Programs {
            mut ebpf,
            links_dir,
            swaps,
        } = programs;
        if self.server_names != ServerNameCheck::Loaded {
            set_tails(&mut ebpf, &self.server_names)?;
        }
        let report = attach_all(&mut ebpf, &self.attach, &links_dir, &self.families, &swaps)?;
        if let SocketFamilies::Unenforced(why) = &self.families {
            warn!(
                why = %why,
                "socket families other than inet are not judged: governed agents can create vsock, packet or other sockets their capabilities allow"
            );
        }
        info!(
            cgroup = %self.attach.path().display(),
            attached = report.attached,
            adopted = report.adopted,
            replaced = report.replaced,
            pins = %self.pin_dir.display(),
            "datapath ready"
        );
        // Every link now runs this build's programs.
        self.update_config(|conf| conf.programs = program_revision())?;
        let _ = self.report.set(report);
        Ok(report)
    }

    /// How the programs were found at attach (all zero before [`Datapath::attach`]).
    pub fn start_report(&self) -> StartReport {
        self.report.get().copied().unwrap_or_default()
    }

    /// Whether socket families beyond inet are judged here.
    pub fn socket_families(&self) -> &SocketFamilies {
        &self.families
    }

    pub fn server_name_check(&self) -> &ServerNameCheck {
        &self.server_names
    }

    /// What the kernel's BTF did not say (see [`LayoutGap`]); empty when it said everything.
    pub fn layout_gaps(&self) -> &[LayoutGap] {
        &self.layout_gaps
    }

    /// Whether a task outside the unit (its cgroups `own`, its tasks `unit`, frozen) shares
    /// one of the unit's descriptor tables (see [`tasks`]); where none does, what the census
    /// says of the unit's io_uring use.
    pub fn table_sharers(
        &self,
        own: &std::collections::HashSet<u64>,
        unit: &std::collections::HashSet<u32>,
    ) -> Result<tasks::UnitRings, tasks::CensusError> {
        match &self.census {
            Ok(census) => census.sharers(own, unit),
            Err(why) => Err(tasks::CensusError::Unavailable(why.clone())),
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The bpffs directory the versions' pin directories live in.
    fn bpffs_dir(&self) -> &Path {
        self.pin_dir.parent().unwrap_or(&self.pin_dir)
    }

    pub fn attach_cgroup(&self) -> &Cgroup {
        &self.attach
    }

    fn update_config(&self, f: impl FnOnce(&mut Config)) -> Result<(), DatapathError> {
        let mut map = lock(&self.config);
        let mut conf = map.get(&0, 0).map_err(map_err(c::MAP_CONFIG))?;
        f(&mut conf);
        map.set(0, conf, 0).map_err(map_err(c::MAP_CONFIG))
    }

    pub fn set_unknown_flows(&self, unknown: UnknownFlows) -> Result<(), DatapathError> {
        self.update_config(|conf| conf.unknown_flows = unknown.code())
    }

    fn check_identity(identity: u32) -> Result<(), DatapathError> {
        if identity == 0 || identity >= MAX_IDENTITIES {
            return Err(DatapathError::IdentityOutOfRange(identity));
        }
        Ok(())
    }

    /// What the kernel holds for an identity. Without the check's program, `sni: enforce` is
    /// written as [`c::SNI_UNCHECKED`] (refused at connect) and `sni: audit` as
    /// [`c::SNI_UNCHECKED_AUDIT`] (recorded at connect).
    fn state_value(
        &self,
        status: IdentityStatus,
        mode: Mode,
        dns: u8,
        sni: SniCheck,
        io_uring: IoUring,
    ) -> IdentityState {
        let checked = self.server_names == ServerNameCheck::Loaded;
        IdentityState {
            state: match status {
                IdentityStatus::Active => c::IDENTITY_ACTIVE,
                IdentityStatus::Revoked => c::IDENTITY_REVOKED,
            },
            mode: match mode {
                Mode::Enforce => c::MODE_ENFORCE,
                Mode::Audit => c::MODE_AUDIT,
            },
            dns,
            sni: match sni {
                SniCheck::Enforce if checked => c::SNI_ENFORCE,
                SniCheck::Enforce => c::SNI_UNCHECKED,
                SniCheck::Audit if checked => c::SNI_AUDIT,
                SniCheck::Audit => c::SNI_UNCHECKED_AUDIT,
                SniCheck::Off => c::SNI_OFF,
            },
            io_uring: u8::from(io_uring == IoUring::Allow),
            _pad: [0; 3],
        }
    }

    /// Sets what the kernel knows of an identity. Write the identity before binding cgroups to
    /// it; until then its cgroups are denied everything.
    /// An identity's status as the kernel holds it (unset reads as none).
    pub fn identity_status(&self, identity: u32) -> Result<Option<IdentityStatus>, DatapathError> {
        Self::check_identity(identity)?;
        let st = lock(&self.identities)
            .get(&identity, 0)
            .map_err(map_err(c::MAP_IDENTITIES))?;
        Ok(match st.state {
            c::IDENTITY_ACTIVE => Some(IdentityStatus::Active),
            c::IDENTITY_REVOKED => Some(IdentityStatus::Revoked),
            _ => None,
        })
    }

    /// Whether the kernel let the identity's tasks make io_uring instances until now: its
    /// policy allowed io_uring, or it was in audit mode (which makes the ring and records
    /// it). `None`: the kernel holds no state of it (unset: no policy named it, or the maps
    /// are a new layout's, not yet filled), so it cannot say.
    pub fn rings_were_open(&self, identity: u32) -> Result<Option<bool>, DatapathError> {
        Self::check_identity(identity)?;
        let st = lock(&self.identities)
            .get(&identity, 0)
            .map_err(map_err(c::MAP_IDENTITIES))?;
        Ok((st.state != c::IDENTITY_UNSET).then_some(st.io_uring != 0 || st.mode == c::MODE_AUDIT))
    }

    /// The tasks in the cgroups `own` that use io_uring, from one reading of the task census:
    /// each with an io_uring context, or with a ring registered with itself. Unlike
    /// [`Self::table_sharers`], for a unit that runs: nothing else is judged.
    pub fn ring_users(
        &self,
        own: &std::collections::HashSet<u64>,
    ) -> Result<Vec<u32>, tasks::CensusError> {
        match &self.census {
            Ok(census) => census.ring_users(own),
            Err(why) => Err(tasks::CensusError::Unavailable(why.clone())),
        }
    }

    pub fn set_identity(
        &self,
        identity: u32,
        status: IdentityStatus,
        mode: Mode,
    ) -> Result<(), DatapathError> {
        Self::check_identity(identity)?;
        let mut map = lock(&self.identities);
        // DNS steering is set on its own (set_dns) and survives a change of status or mode, as
        // do the server-name check and io_uring (an apply sets them).
        let (dns, sni, io_uring) =
            map.get(&identity, 0)
                .map_or((0, SniCheck::Off, IoUring::Refuse), |s| {
                    let io_uring = if s.io_uring != 0 {
                        IoUring::Allow
                    } else {
                        IoUring::Refuse
                    };
                    (s.dns, Self::sni_of(s.sni), io_uring)
                });
        map.set(
            identity,
            self.state_value(status, mode, dns, sni, io_uring),
            0,
        )
        .map_err(map_err(c::MAP_IDENTITIES))
    }

    fn sni_of(code: u8) -> SniCheck {
        match code {
            c::SNI_ENFORCE | c::SNI_UNCHECKED => SniCheck::Enforce,
            c::SNI_AUDIT | c::SNI_UNCHECKED_AUDIT => SniCheck::Audit,
            _ => SniCheck::Off,
        }
    }

    /// The TLS server-name check of the identity's connections only its name rules allow (an
    /// apply sets it from the policy; this sets it alone).
    pub fn set_sni_check(&self, identity: u32, sni: SniCheck) -> Result<(), DatapathError> {
        Self::check_identity(identity)?;
        let mut map = lock(&self.identities);
        let mut state = map.get(&identity, 0).map_err(map_err(c::MAP_IDENTITIES))?;
        state.sni = self
            .state_value(
                IdentityStatus::Active,
                Mode::Enforce,
                0,
                sni,
                IoUring::Refuse,
            )
            .sni;
        map.set(identity, state, 0)
            .map_err(map_err(c::MAP_IDENTITIES))
    }

    /// Whether the identity's DNS (port 53 to IPv4 resolvers, UDP and TCP) goes to the proxy.
    pub fn set_dns(&self, identity: u32, steer: bool) -> Result<(), DatapathError> {
        Self::check_identity(identity)?;
        let mut map = lock(&self.identities);
        let mut state = map.get(&identity, 0).map_err(map_err(c::MAP_IDENTITIES))?;
        let want = u8::from(steer);
        if state.dns == want {
            return Ok(());
        }
        state.dns = want;
        map.set(identity, state, 0)
            .map_err(map_err(c::MAP_IDENTITIES))
    }

    /// The server names the TLS check accepts for (identity, ip): exactly `names`.
    pub fn set_sni_names(
        &self,
        identity: u32,
        ip: std::net::IpAddr,
        names: &sni::Names,
    ) -> Result<(), DatapathError> {
        Ok(lock(&self.sni).set(identity, ip, names)?)
    }

    /// The server names the TLS check accepts, for every identity and address: exactly
    /// `want`.
    pub fn set_all_sni_names(
        &self,
        want: &std::collections::BTreeMap<(u32, std::net::IpAddr), sni::Names>,
    ) -> Result<(), DatapathError> {
        Ok(lock(&self.sni).set_all(want)?)
    }

    /// The refusal of the TLS check behind a record (its time), taken out.
    pub fn take_sni_refused(&self, time_ns: u64) -> Option<sni::Refused> {
        lock(&self.sni).take_refused(time_ns)
    }

    /// Refusals of the TLS check older than `before_ns` whose records the kernel folded.
    pub fn take_stale_sni_refused(&self, before_ns: u64) -> Vec<sni::Refused> {
        lock(&self.sni).take_stale(before_ns)
    }

    /// Whether a bound cgroup may hold sockets without state, which the packet line then
    /// governs from their first packet (see `Config::strays`).
    pub fn set_strays(&self, on: bool) -> Result<(), DatapathError> {
        self.update_config(|conf| conf.strays = u8::from(on))
    }

    /// Whether flows that rules allow are reported and counted per rule.
    pub fn set_record_allowed(&self, on: bool) -> Result<(), DatapathError> {
        self.update_config(|conf| conf.record_allowed = u8::from(on))
    }

    /// The port the DNS proxy listens on at every identity's proxy address; 0 turns steering
    /// off for everyone.
    pub fn set_dns_port(&self, port: u16) -> Result<(), DatapathError> {
        self.update_config(|conf| conf.dns_port = port)
    }

    /// Rewrites the host entries (/32, /128) of `addrs` in an identity's trie in place, from
    /// `rules`: every rule covering those addresses, learned host rules included (rules
    /// covering none of them are ignored). Other entries are untouched, so no trie swap (and
    /// no RCU wait) is needed: this is what makes a DNS answer's addresses usable within
    /// microseconds. A host left with nothing to say is removed from the trie.
    pub fn update_hosts(
        &self,
        identity: u32,
        rules: &[Rule],
        addrs: &[std::net::IpAddr],
    ) -> Result<(), DatapathError> {
        self.update_hosts_with(identity, addrs, |_, _| rules.to_vec())
    }

    /// The rules of the identity's trie in force and, while a change is being applied, of the
    /// trie staged to replace it: what a name must match to be learned (empty for an identity
    /// whose tries learn no hosts).
    pub fn learning_rules(&self, identity: u32) -> Vec<Arc<[Rule]>> {
        let t = lock(&self.tries);
        t.current
            .get(&identity)
            .into_iter()
            .chain(t.staged.get(&identity))
            .filter_map(|t| t.base.clone())
            .collect()
    }

    /// [`Datapath::update_hosts`] for the trie in force and, while a change is being applied,
    /// the one staged to replace it: `rules_for(base, global_deny)` gives each trie's rules
    /// for those hosts from what that trie was compiled from.
    pub fn update_hosts_with(
        &self,
        identity: u32,
        addrs: &[std::net::IpAddr],
        rules_for: impl Fn(&[Rule], &[IpNet]) -> Vec<Rule>,
    ) -> Result<(), DatapathError> {
        Self::check_identity(identity)?;
        let targets: Vec<Arc<Trie>> = {
            let t = lock(&self.tries);
            t.current
                .get(&identity)
                .into_iter()
                .chain(t.staged.get(&identity))
                .cloned()
                .collect()
        };
        if targets.is_empty() {
            return Err(DatapathError::NoTrie(identity));
        }
        for t in targets {
            let base = t
                .base
                .as_deref()
                .ok_or(DatapathError::HostsNotKept(identity))?;
            let rules = rules_for(base, &t.global_deny);
            Self::write_hosts(&t, identity, &rules, addrs)?;
        }
        Ok(())
    }

    fn write_hosts(
        trie: &Trie,
        identity: u32,
        rules: &[Rule],
        addrs: &[std::net::IpAddr],
    ) -> Result<(), DatapathError> {
        let mut map = lock(&trie.map);
        let mut trie_map: LpmTrie<&mut MapData, Addr, RuleSet> =
            (&mut *map).try_into().map_err(map_err(c::MAP_RULES))?;
        for &ip in addrs {
            let host = Net::host(ip);
            // Only rules and deny prefixes covering the host matter to its entry.
            let covering: Vec<Rule> = rules
                .iter()
                .filter(|r| r.to.iter().any(|n| Net::from(*n).contains(&host)))
                .map(|r| Rule {
                    to: r
                        .to
                        .iter()
                        .copied()
                        .filter(|n| Net::from(*n).contains(&host))
                        .collect(),
                    ..r.clone()
                })
                .collect();
            let deny: Vec<IpNet> = trie
                .global_deny
                .iter()
                .copied()
                .filter(|n| Net::from(*n).contains(&host))
                .collect();
            let compiled = compile_rules(&covering, &deny)
                .map_err(|source| DatapathError::Compile { identity, source })?;
            let key = Key::new(u32::from(host.len), host.addr);
            let apply = |source: MapError| DatapathError::Apply {
                what: format!("host entry {ip} for identity {identity}"),
                source: Box::new(source),
            };
            match compiled.entries.iter().find(|(n, _)| *n == host) {
                Some((_, set)) => {
                    let keys = trie_sets(trie, identity, &compiled)?;
                    trie_map
                        .insert(&key, Self::with_set_keys(set, &keys), 0)
                        .map_err(apply)?
                }
                None => match trie_map.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(apply(e)),
                },
            }
        }
        Ok(())
    }

    /// Binds `cgroup` and every cgroup below it to `identity` until `not_after` (the
    /// certificate's expiry; the kernel enforces it). Bound cgroups are default-deny. Binding an
    /// already bound cgroup again replaces its identity and deadline (renewal).
    pub fn bind(
        &self,
        cgroup: &Cgroup,
        identity: u32,
        not_after: Option<BootInstant>,
    ) -> Result<(), DatapathError> {
        Self::check_identity(identity)?;
        if cgroup.level() >= c::MAX_CGROUP_LEVELS {
            return Err(DatapathError::TooDeep {
                path: cgroup.path().to_owned(),
                level: cgroup.level(),
                max: c::MAX_CGROUP_LEVELS,
            });
        }
        // The level bit goes in first so the binding is found the moment it exists.
        self.update_config(|conf| conf.bound_levels |= 1 << cgroup.level())?;
        let b = Binding {
            not_after_ns: not_after.map_or(0, |t| t.0.max(1)),
            identity,
            slot: 0,
            level: cgroup.level() as u8,
            revoked: 0,
            _pad: [0; 6],
        };
        lock(&self.bindings).insert(cgroup.id(), b)?;
        debug!(cgroup_id = cgroup.id(), identity, "bound cgroup");
        Ok(())
    }

    /// Marks one binding revoked (its certificate is on a CRL): the cgroup stays bound and is
    /// denied everything, whatever its identity's state.
    pub fn revoke_binding(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        lock(&self.bindings).revoke(cgroup_id)
    }

    /// Removes a binding. Refused while processes live in the cgroup: unbinding must never turn
    /// a governed process into an ungoverned one (revoke the identity instead).
    pub fn unbind(&self, cgroup: &Cgroup) -> Result<(), DatapathError> {
        if cgroup.is_populated()? {
            return Err(DatapathError::Populated {
                path: cgroup.path().to_owned(),
            });
        }
        self.unbind_id(cgroup.id())
    }

    /// Clears `socket`'s state if it names `cgroup_id`'s binding: a binding withdrawn (an
    /// `enroll` refused once it was in force) leaves the unit's sockets that carried a packet
    /// meanwhile adopted as that binding's, which the packet line would drop from then on as
    /// sockets of an ended session. The binding must be gone first, or a packet would adopt
    /// them again. Whether it was cleared.
    pub fn forget_socket_state(&self, cgroup_id: u64, socket: &std::os::fd::OwnedFd) -> bool {
        let mut socks = lock(&self.socks);
        matches!(socks.get(socket, 0), Ok(st) if st.binding_cgroup == cgroup_id)
            && socks.remove(socket).is_ok()
    }

    /// Removes the binding of a cgroup id whose cgroup is gone.
    pub fn unbind_id(&self, cgroup_id: u64) -> Result<(), DatapathError> {
        lock(&self.bindings).remove(cgroup_id)
    }

    /// The identity a cgroup is bound to (its own binding; not an ancestor's).
    pub fn binding(&self, cgroup_id: u64) -> Result<Option<u32>, DatapathError> {
        Ok(lock(&self.bindings).get(cgroup_id)?.map(|b| b.identity))
    }

    /// The bindings in force: cgroup id → identity.
    pub fn bindings(&self) -> Result<Vec<(u64, u32)>, DatapathError> {
        Ok(lock(&self.bindings)
            .entries()?
            .into_iter()
            .map(|(k, b)| (k, b.identity))
            .collect())
    }

    /// Replaces an identity's rules in one step: a new trie is built and filled on the side,
    /// then swapped in with a single map update, so a connecting process sees the old rules or
    /// the new ones, never a mix. On any error the old rules stay.
    pub fn set_rules(&self, identity: u32, rules: &[Rule]) -> Result<usize, DatapathError> {
        self.set_rules_many(&[(identity, rules)])
    }

    /// Replaces the rules of several identities: every trie is compiled and filled first, then
    /// all are swapped in by one batch update (each identity's swap is atomic, and the kernel
    /// waits for one RCU grace period for the lot instead of one per identity). Returns the
    /// number of trie entries written. A compile or fill error changes nothing.
    pub fn set_rules_many(&self, sets: &[(u32, &[Rule])]) -> Result<usize, DatapathError> {
        let _one = lock(&self.applying);
        let deny = self.global_deny();
        let builds = sets
            .iter()
            .map(|&(identity, rules)| Build {
                identity,
                base: Arc::from(rules),
                hosts: Vec::new(),
                keep_base: true,
            })
            .collect();
        Ok(self.rebuild(&deny, builds, false, || {})?.entries)
    }

    /// The deny list the tries in force were compiled with.
    fn global_deny(&self) -> Arc<[IpNet]> {
        lock(&self.tries).global_deny.clone()
    }

    /// Applies a policy as one change, all or nothing up to the swap: every changed trie is
    /// compiled, created and filled first (any error changes nothing in the kernel), then all
    /// are swapped in by one batch update, then the identities' modes and DNS steering are
    /// written in one more. Identities with a trie but absent from `sets` get none (deny-all),
    /// so a policy that drops an identity never leaves its cgroups on stale rules. An identity
    /// whose rules and deny list are what its trie was built from keeps its trie.
    ///
    /// `staged` runs once the new tries are registered, before the swap: host updates from
    /// then on reach them, and what was learned since `sets` was computed is written then.
    /// `status_of` gives each identity's status at the moment the states are written, so a
    /// revocation racing the change is never undone.
    pub fn apply(
        &self,
        global_deny: &[IpNet],
        sets: Vec<IdentityRules>,
        configs: &[IdentityConfig],
        staged: impl FnOnce(),
        status_of: impl Fn(u32) -> IdentityStatus,
    ) -> Result<Applied, DatapathError> {
        let _one = lock(&self.applying);
        for c in configs {
            Self::check_identity(c.identity)?;
        }
        let deny: Arc<[IpNet]> = Arc::from(global_deny);
        let builds = sets
            .into_iter()
            .map(|s| Build {
                identity: s.identity,
                base: s.base,
                hosts: s.hosts,
                keep_base: s.learns,
            })
            .collect();
        let applied = self.rebuild(&deny, builds, true, staged)?;
        // Every identity's trie is now this process's.
        lock(&self.foreign).clear();
        self.port_sets.release_inherited();
        self.write_states(configs, &status_of)?;
        Ok(applied)
    }

    fn write_states(
        &self,
        configs: &[IdentityConfig],
        status_of: &dyn Fn(u32) -> IdentityStatus,
    ) -> Result<(), DatapathError> {
        if configs.is_empty() {
            return Ok(());
        }
        let states: Vec<(u32, IdentityState)> = configs
            .iter()
            .map(|c| {
                let v = self.state_value(
                    status_of(c.identity),
                    c.mode,
                    u8::from(c.dns),
                    c.sni,
                    c.io_uring,
                );
                (c.identity, v)
            })
            .collect();
        let mut keys: Vec<u8> = Vec::with_capacity(states.len() * 4);
        let mut values: Vec<u8> = Vec::with_capacity(states.len() * size_of::<IdentityState>());
        for (identity, v) in &states {
            keys.extend_from_slice(&identity.to_ne_bytes());
            // SAFETY: IdentityState is repr(C) plain old data with explicit padding.
            values.extend_from_slice(unsafe {
                std::slice::from_raw_parts(
                    std::ptr::from_ref(v).cast::<u8>(),
                    size_of::<IdentityState>(),
                )
            });
        }
        let mut map = lock(&self.identities);
        let fd = aya::maps::IterableMap::map(&*map).fd().as_fd();
        if sys::map_update_batch_raw(fd, &keys, &values, states.len()).is_ok() {
            return Ok(());
        }
        // One by one, then: what one entry refuses does not keep the others from being written.
        let (mut failed, mut first) = (0, None);
        for (identity, v) in states {
            if let Err(e) = map.set(identity, v, 0) {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(DatapathError::States {
                failed,
                total: configs.len(),
                source: Box::new(e),
            }),
        }
    }

    /// Replaces the global deny list. It lives inside every identity's trie, so every trie is
    /// recompiled and all are swapped in one batch; a list that cannot be compiled changes
    /// nothing.
    pub fn set_global_deny(&self, nets: &[IpNet]) -> Result<(), DatapathError> {
        let _one = lock(&self.applying);
        let builds = lock(&self.tries)
            .current
            .iter()
            .map(|(&id, t)| {
                t.base
                    .clone()
                    .map(|base| Build {
                        identity: id,
                        base,
                        hosts: Vec::new(),
                        keep_base: true,
                    })
                    .ok_or(DatapathError::HostsNotKept(id))
            })
            .collect::<Result<_, _>>()?;
        self.rebuild(&Arc::from(nets), builds, false, || {})?;
        Ok(())
    }

    /// Compiles, fills and swaps in the tries of `builds` whose rules or deny list differ from
    /// their trie's. With `all`, identities holding a trie but absent from `builds` get an
    /// empty one. The caller holds `applying`.
    fn rebuild(
        &self,
        deny: &Arc<[IpNet]>,
        mut builds: Vec<Build>,
        all: bool,
        staged: impl FnOnce(),
    ) -> Result<Applied, DatapathError> {
        let t0 = std::time::Instant::now();
        let current: BTreeMap<u32, Arc<Trie>> = lock(&self.tries).current.clone();
        if all {
            let listed: std::collections::BTreeSet<u32> =
                builds.iter().map(|b| b.identity).collect();
            let foreign = lock(&self.foreign).clone();
            let unlisted: std::collections::BTreeSet<u32> = current
                .keys()
                .chain(&foreign)
                .copied()
                .filter(|id| !listed.contains(id))
                .collect();
            for id in unlisted {
                builds.push(Build {
                    identity: id,
                    base: Arc::from(Vec::new()),
                    hosts: Vec::new(),
                    keep_base: false,
                });
            }
        }
        for b in &builds {
            Self::check_identity(b.identity)?;
        }
        // A trie that keeps its rules is left alone while they and the deny list are the same
        // (its learned hosts are current); the others are compared by fingerprint once
        // compiled.
        builds.retain(|b| {
            !(b.keep_base
                && current.get(&b.identity).is_some_and(|t| {
                    t.base.as_deref() == Some(&*b.base) && *t.global_deny == **deny
                }))
        });
        builds.sort_by_key(|b| b.identity);
        let current = &current;
        // Tries are independent: they are compiled and filled on every core, each compiled
        // trie dropped once its map is filled. The first error (in identity order) is the
        // one reported, and every trie built is dropped with it: nothing changes.
        let per_thread = builds
            .len()
            .div_ceil(
                crate::workers::threads()
                    .min(builds.len().div_ceil(MIN_TRIES_PER_THREAD))
                    .max(1),
            )
            .max(1);
        let parts: Vec<Result<Built, DatapathError>> = std::thread::scope(|s| {
            let handles: Vec<_> = builds
                .chunks(per_thread)
                .map(|part| s.spawn(move || self.build_tries(part, deny, current)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        drop(builds);
        let mut tries = Vec::new();
        let mut entries = 0;
        for part in parts {
            let (t, n) = part?;
            tries.extend(t);
            entries += n;
        }
        let build = t0.elapsed();
        let rebuilt = tries.len();
        if tries.is_empty() {
            lock(&self.tries).global_deny = deny.clone();
            return Ok(Applied {
                build,
                ..Applied::default()
            });
        }
        lock(&self.tries).staged = tries.iter().cloned().collect();
        staged();
        let t2 = std::time::Instant::now();
        let result = self.swap_tries(&tries);
        let swap = t2.elapsed();
        let swapped = match &result {
            Ok(()) => tries.len(),
            Err(DatapathError::Swap { applied, .. }) => *applied,
            Err(_) => 0,
        };
        {
            let mut t = lock(&self.tries);
            t.staged.clear();
            if swapped == tries.len() {
                t.global_deny = deny.clone();
            }
            for (id, trie) in tries.into_iter().take(swapped) {
                t.current.insert(id, trie);
            }
        }
        result.map(|()| Applied {
            rebuilt,
            entries,
            build,
            swap,
        })
    }

    /// Compiles and fills the tries of `part`, one at a time; the entries written. A trie
    /// that keeps no rules and compiles to what is in force is skipped.
    fn build_tries(
        &self,
        part: &[Build],
        deny: &Arc<[IpNet]>,
        current: &BTreeMap<u32, Arc<Trie>>,
    ) -> Result<Built, DatapathError> {
        let mut out = Vec::with_capacity(part.len());
        let mut entries = 0;
        for b in part {
            let identity = b.identity;
            let t = if b.hosts.is_empty() {
                compile_rules(&b.base, deny)
            } else {
                let all: Vec<Rule> = b.base.iter().chain(&b.hosts).cloned().collect();
                compile_rules(&all, deny)
            }
            .map_err(|source| DatapathError::Compile { identity, source })?;
            let fp = (!b.keep_base).then(|| fingerprint(&t));
            if fp.is_some()
                && current
                    .get(&identity)
                    .is_some_and(|c| c.fingerprint == fp && *c.global_deny == **deny)
            {
                continue;
            }
            entries += t.len();
            let (map, sets) = self.fill_trie(identity, &t)?;
            let fd = match &map {
                aya::maps::Map::LpmTrie(d) => d.fd().as_fd().as_raw_fd() as u32,
                _ => unreachable!("built as LpmTrie"),
            };
            out.push((
                identity,
                Arc::new(Trie {
                    map: Mutex::new(map),
                    fd,
                    base: b.keep_base.then(|| b.base.clone()),
                    fingerprint: fp,
                    rules: b.base.len(),
                    global_deny: deny.clone(),
                    sets: Mutex::new(sets),
                    port_sets: self.port_sets.clone(),
                }),
            ));
        }
        Ok((out, entries))
    }

    /// The port sets of `t` stored (or found) in the kernel, as keys in `t.sets`' order; on
    /// error none stays acquired.
    fn acquire_sets(&self, identity: u32, t: &CompiledTrie) -> Result<Vec<u32>, DatapathError> {
        let mut keys = Vec::with_capacity(t.sets.len());
        for set in &t.sets {
            match self.port_sets.acquire(identity, set) {
                Ok(k) => keys.push(k),
                Err(e) => {
                    for k in keys {
                        self.port_sets.release(k);
                    }
                    return Err(e);
                }
            }
        }
        Ok(keys)
    }

    /// A rule set as the kernel takes it: port-set indices of the compile replaced by keys.
    fn with_set_keys(set: &RuleSet, keys: &[u32]) -> RuleSet {
        let mut out = *set;
        for e in &mut out.entries[..usize::from(set.count)] {
            if e.port_set != 0 {
                e.port_set = keys[e.port_set as usize - 1];
            }
        }
        out
    }

    /// A new trie holding `t`, created and filled, not yet in force, and the keys of the port
    /// sets it names (acquired; released again if filling fails).
    fn fill_trie(
        &self,
        identity: u32,
        t: &CompiledTrie,
    ) -> Result<(aya::maps::Map, Vec<u32>), DatapathError> {
        let keys = self.acquire_sets(identity, t)?;
        match self.fill_trie_with(identity, t, &keys) {
            Ok(map) => Ok((map, keys)),
            Err(e) => {
                for k in keys {
                    self.port_sets.release(k);
                }
                Err(e)
            }
        }
    }

    fn fill_trie_with(
        &self,
        identity: u32,
        t: &CompiledTrie,
        set_keys: &[u32],
    ) -> Result<aya::maps::Map, DatapathError> {
        let apply = |source: MapError| DatapathError::Apply {
            what: format!("rules for identity {identity}"),
            source: Box::new(source),
        };
        let capacity = u32::try_from(t.len().max(1))
            .unwrap_or(u32::MAX)
            .saturating_add(self.host_headroom);
        // The suite's stand-in for the kernel's ENOMEM where no memory group can make one (no
        // cgroup v1 memory controller): a trie too small for its entries, which the kernel
        // refuses part-way (ENOSPC) exactly where ENOMEM would.
        #[cfg(feature = "failpoints")]
        let capacity = fail::eval("trie-capacity", |v| v.and_then(|v| v.parse().ok()))
            .flatten()
            .unwrap_or(capacity);
        let def = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LPM_TRIE as u32,
            std::mem::size_of::<Key<Addr>>() as u32,
            std::mem::size_of::<RuleSet>() as u32,
            capacity,
            BPF_F_NO_PREALLOC,
        );
        let mut map =
            aya::maps::Map::LpmTrie(MapData::create(def, "aw_rules", None).map_err(apply)?);
        // One batch call fills the new trie (one syscall, not one per entry); a kernel
        // without batch updates for LPM tries gets them one by one.
        let mut keys: Vec<u8> = Vec::with_capacity(t.len() * size_of::<Key<Addr>>());
        let mut values: Vec<u8> = Vec::with_capacity(t.len() * size_of::<RuleSet>());
        for (net, set) in &t.entries {
            let k = Key::new(u32::from(net.len), net.addr);
            let set = &Self::with_set_keys(set, set_keys);
            // SAFETY: Key<Addr> and RuleSet are plain old data with no padding holes the
            // kernel would read (repr(C) with explicit fields).
            unsafe {
                keys.extend_from_slice(std::slice::from_raw_parts(
                    (&raw const k).cast::<u8>(),
                    size_of::<Key<Addr>>(),
                ));
                values.extend_from_slice(std::slice::from_raw_parts(
                    std::ptr::from_ref(set).cast::<u8>(),
                    size_of::<RuleSet>(),
                ));
            }
        }
        let batched = match &map {
            aya::maps::Map::LpmTrie(d) => {
                sys::map_update_batch_raw(d.fd().as_fd(), &keys, &values, t.len())
            }
            _ => unreachable!("built as LpmTrie above"),
        };
        if let Err((done, e)) = batched {
            // EINVAL or EOPNOTSUPP with nothing written: this kernel has no batch update
            // for LPM tries. Anything else (ENOMEM above all) is the fill failing.
            let unsupported =
                done == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP));
            if !unsupported {
                return Err(DatapathError::Fill {
                    identity,
                    done,
                    total: t.len(),
                    source: e,
                });
            }
            debug!(error = %e, "no batch update for LPM tries; inserting one by one");
            let mut trie: LpmTrie<&mut MapData, Addr, RuleSet> =
                (&mut map).try_into().map_err(apply)?;
            for (net, set) in &t.entries {
                let set = Self::with_set_keys(set, set_keys);
                trie.insert(&Key::new(u32::from(net.len), net.addr), set, 0)
                    .map_err(apply)?;
            }
        }
        Ok(map)
    }

    fn swap_tries(&self, tries: &[(u32, Arc<Trie>)]) -> Result<(), DatapathError> {
        let keys: Vec<u32> = tries.iter().map(|(id, _)| *id).collect();
        let fds: Vec<u32> = tries.iter().map(|(_, t)| t.fd).collect();
        sys::map_update_batch(self.rules.fd().as_fd(), &keys, &fds).map_err(|(applied, e)| {
            DatapathError::Swap {
                applied,
                total: keys.len(),
                source: e,
            }
        })
    }

    /// Port sets in the kernel now (`AW_PORT_SETS`), counted there.
    pub fn port_sets_in_kernel(&self) -> Result<usize, DatapathError> {
        let map = lock(&self.port_sets.map);
        let mut n = 0;
        for k in map.keys() {
            k.map_err(map_err(c::MAP_PORT_SETS))?;
            n += 1;
        }
        Ok(n)
    }

    /// How full the maps with fixed capacity are.
    pub fn fill(&self) -> Result<MapFill, DatapathError> {
        let bindings = lock(&self.bindings).count();
        let t = lock(&self.tries);
        Ok(MapFill {
            bindings,
            bindings_max: c::MAX_BINDINGS as usize,
            identities: t.current.len(),
            // Less the self-check's.
            identities_max: MAX_IDENTITIES as usize - 2,
            rules: t.current.values().map(|t| t.rules).sum(),
            server_names: lock(&self.sni).len(),
            server_names_max: c::SNI_NAME_ENTRIES as usize,
        })
    }

    /// Records that could not be written to their ring buffer, summed over CPUs and both
    /// rings.
    pub fn dropped_events(&self) -> Result<u64, DatapathError> {
        let d = self.dropped_by_ring()?;
        Ok(d.governed.saturating_add(d.unknown))
    }

    /// Records lost to a full ring buffer, per ring.
    pub fn dropped_by_ring(&self) -> Result<RingDrops, DatapathError> {
        let slot = |i: u32| -> Result<u64, DatapathError> {
            let per_cpu = self.drops.get(&i, 0).map_err(map_err(c::MAP_EVENT_DROPS))?;
            Ok(per_cpu.iter().fold(0u64, |a, n| a.saturating_add(*n)))
        };
        Ok(RingDrops {
            governed: slot(c::DROPS_GOVERNED)?,
            unknown: slot(c::DROPS_UNKNOWN)?,
        })
    }

    /// Flows each rule allowed since the counters were last cleared, summed over CPUs:
    /// (identity, rule id) → count. Counted while `record_allowed` is on.
    pub fn rule_hits(&self) -> Result<BTreeMap<(u32, u32), u64>, DatapathError> {
        let mut out = BTreeMap::new();
        for entry in lock(&self.hits).iter() {
            let (k, per_cpu) = entry.map_err(map_err(c::MAP_RULE_HITS))?;
            let n: u64 = per_cpu.iter().sum();
            out.insert(((k >> 32) as u32, k as u32), n);
        }
        Ok(out)
    }

    /// Forgets every rule's count (rule ids are renumbered by a new policy revision).
    pub fn clear_rule_hits(&self) -> Result<(), DatapathError> {
        let mut hits = lock(&self.hits);
        let keys: Vec<u64> = hits.keys().filter_map(Result::ok).collect();
        for k in keys {
            match hits.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(c::MAP_RULE_HITS)(e)),
            }
        }
        Ok(())
    }
    /// Takes the counts the kernel's rate limit holds for flows that went quiet at least
    /// `idle` ago. Those counts ride on the next identical record, which may never come; taken
    /// here (atomically, with lookup-and-delete), they are reported instead of lost.
    /// Returns (key, count, first and last suppressed event).
    pub fn drain_idle_counts(
        &self,
        idle: Duration,
    ) -> Result<Vec<(c::RateKey, u64, BootInstant, BootInstant)>, DatapathError> {
        let now = BootInstant::now().0;
        let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for table in &self.rate {
            let mut due = Vec::new();
            for entry in table.iter() {
                let Ok((k, v)) = entry else { continue };
                let last = v.last_ns.max(v.seen_ns);
                if v.suppressed > 0 && now.saturating_sub(last) >= idle {
                    due.push(k);
                }
            }
            for k in due {
                let mut v = c::RateState::default();
                // SAFETY: both are plain old data; the byte views cover exactly the map's key
                // and value sizes.
                let (kb, vb) = unsafe {
                    (
                        std::slice::from_raw_parts(
                            (&raw const k).cast::<u8>(),
                            size_of::<c::RateKey>(),
                        ),
                        std::slice::from_raw_parts_mut(
                            (&raw mut v).cast::<u8>(),
                            size_of::<c::RateState>(),
                        ),
                    )
                };
                let fd = aya::maps::IterableMap::map(table).fd().as_fd();
                if sys::map_lookup_and_delete(fd, kb, vb).map_err(io_err(Path::new(c::MAP_RATE)))?
                    && v.suppressed > 0
                {
                    out.push((
                        k,
                        v.suppressed,
                        BootInstant(v.first_ns),
                        BootInstant(v.seen_ns),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Forgets the kernel's folded counts of records about `cgroup_id` (a cgroup gone whose
    /// records nobody is to see): they are never drained into records.
    pub fn forget_counts(&self, cgroup_id: u64) -> Result<usize, DatapathError> {
        let mut forgotten = 0;
        for table in &self.rate {
            let keys: Vec<c::RateKey> = table
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.cgroup_id == cgroup_id)
                .collect();
            for k in keys {
                // SAFETY: plain old data; the view covers exactly the map's key size.
                let kb = unsafe {
                    std::slice::from_raw_parts((&raw const k).cast::<u8>(), size_of::<c::RateKey>())
                };
                let mut vb = [0u8; size_of::<c::RateState>()];
                let fd = aya::maps::IterableMap::map(table).fd().as_fd();
                if sys::map_lookup_and_delete(fd, kb, &mut vb)
                    .map_err(io_err(Path::new(c::MAP_RATE)))?
                {
                    forgotten += 1;
                }
            }
        }
        Ok(forgotten)
    }

    /// Programs whose pinned link no longer runs them on the attach point (detached behind
    /// the node's back), or whose pin is gone.
    pub fn detached_links(&self) -> Vec<&'static str> {
        let links = self.pin_dir.join("links");
        let attach = self.attach.id();
        ALL_PROGRAMS
            .iter()
            .filter(|name| {
                if c::LSM_PROGRAMS.contains(name) && self.families != SocketFamilies::Enforced {
                    return false;
                }
                let path = links.join(name);
                !sys::pinned_link(&path)
                    .and_then(|l| sys::link_cgroup(l.as_fd()))
                    .is_ok_and(|cgroup| cgroup == attach)
            })
            .copied()
            .collect()
    }

    /// The reader of decision records; there is one, and this hands it out once.
    pub fn take_events(&self) -> Option<EventReader> {
        lock(&self.events)
            .take()
            .map(|(governed, unknown)| EventReader::new(governed, unknown))
    }
}

/// A kernel field the node did not find in the kernel's BTF, and what the line that reads
/// it does instead (refuse what it would have judged by it, mostly).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayoutGap {
    /// What could not be found, and why.
    pub unknown: String,
    /// What governed agents meet because of it.
    pub effect: String,
}

/// Refuses an attach cgroup whose levels, as this mount shows them, are not the kernel's:
/// the programs look bindings up by ancestor level (`bpf_get_current_ancestor_cgroup_id`)
/// and follow a handed socket's cgroup to the attach point's level, and inside a cgroup
/// namespace (or a subtree mounted alone) every level read here would be short, putting
/// nested units' bindings and the attach point where the kernel never looks.
pub fn check_attach(attach: &Cgroup) -> Result<(), DatapathError> {
    match crate::cgroup::top_not_root(attach.path()) {
        Some(top) => Err(DatapathError::AttachOutOfSight {
            attach: attach.path().to_owned(),
            top,
        }),
        None => Ok(()),
    }
}

/// What [`kernel_layout`] finds for this kernel, with nothing loaded (`node --check-config`):
/// every field, the LSM line's too, whether or not securityfs is mounted to say it runs.
pub fn layout_gaps_here() -> Vec<LayoutGap> {
    kernel_layout(&mut SocketFamilies::Enforced).2
}

/// What a node whose task census is not loaded does (see [`tasks`]).
const ENROLL_REFUSED: &str = "every enroll is refused: whether a task outside a unit shares its descriptor tables cannot be read";

/// Finds in the kernel's BTF where the packet line reads whether a packet's data is in pages
/// its sender shares; and, where the LSM line would load, checks the kernel struct fields its
/// programs read at fixed offsets (a kernel that differs leaves the line unenforced, said in
/// `families`) and finds the fields the receipt line reads at offsets that move between
/// kernels. One not found is unknown (zero), and the line that reads it refuses what it
/// would have judged by it: each such gap is logged here and kept for `status`.
fn kernel_layout(
    families: &mut SocketFamilies,
) -> (KernelLayout, Option<TaskLayout>, Vec<LayoutGap>) {
    let mut gaps = Vec::new();
    let mut gap = |e: &dyn std::fmt::Display, effect: &str| {
        warn!(error = %e, "{effect}");
        gaps.push(LayoutGap {
            unknown: e.to_string(),
            effect: effect.to_owned(),
        });
    };
    const SNI: &str = "the first data of every connection the server-name check watches is refused (recorded as a zero-copy or spliced send: whether its pages are shared cannot be read)";
    // A test has a kernel without BTF with the `kernel-btf-unreadable` fail point.
    #[cfg(feature = "failpoints")]
    let btf_at = (|| {
        fail::fail_point!("kernel-btf-unreadable", |_| Path::new(
            "/nonexistent/kernel-btf-unreadable"
        ));
        Path::new(layout::KERNEL_BTF)
    })();
    #[cfg(not(feature = "failpoints"))]
    let btf_at = Path::new(layout::KERNEL_BTF);
    let btf = match layout::KernelBtf::read(btf_at) {
        Ok(btf) => btf,
        Err(e) => {
            gap(&e, SNI);
            gap(&e, ENROLL_REFUSED);
            if *families == SocketFamilies::Enforced {
                *families = SocketFamilies::Unenforced(e.to_string());
            }
            return (KernelLayout::default(), None, gaps);
        }
    };
    // The task census's: whatever the other lines do.
    let tasks = btf
        .task_layout()
        .inspect_err(|e| gap(e, ENROLL_REFUSED))
        .ok();
    // The packet line's: whatever the LSM line does.
    let frags = btf.shared_frags().unwrap_or_else(|e| {
        gap(&e, SNI);
        KernelLayout::default()
    });
    if *families != SocketFamilies::Enforced {
        return (frags, tasks, gaps);
    }
    if let Err(e) = btf.check_fields() {
        gap(
            &e,
            "the BPF LSM line is not loaded: socket families beyond inet, socket options and handed-in sockets are not judged",
        );
        *families = SocketFamilies::Unenforced(e.to_string());
        return (frags, tasks, gaps);
    }
    let mut found = btf.inet_flags().unwrap_or_else(|e| {
        gap(&e, "inet sockets handed to governed agents, and every bind of a governed socket, are refused");
        KernelLayout::default()
    });
    (found.bindaddr_at, found.bindaddr_mask) = btf.bindaddr_lock().unwrap_or_else(|e| {
        gap(&e, "inet sockets handed to governed agents are refused");
        (0, 0)
    });
    found.owned_at = btf.owned_at().unwrap_or_else(|e| {
        gap(&e, "inet sockets handed to governed agents are refused");
        0
    });
    found.protocol_at = btf.protocol_at().unwrap_or_else(|e| {
        gap(&e, "UDP sockets handed to governed agents are refused");
        0
    });
    found.skb_head_at = frags.skb_head_at;
    found.skb_end_at = frags.skb_end_at;
    found.shinfo_flags_at = frags.shinfo_flags_at;
    found.shared_frag_mask = frags.shared_frag_mask;
    found.msg_flags_at = btf.msg_flags_at().unwrap_or_else(|e| {
        gap(
            &e,
            "every send on a connection whose server name is still to be checked is refused",
        );
        0
    });
    found.rmem_alloc_at = btf.rmem_alloc_at().unwrap_or_else(|e| {
        gap(&e, "UDP sockets handed to governed agents are refused");
        0
    });
    (found.recverr_at, found.recverr_mask) = btf.recverr().unwrap_or_else(|e| {
        gap(&e, "inet sockets handed to governed agents, and every send and read of a governed agent on an inet socket, are refused (whether its ICMP error queue is open cannot be read)");
        (0, 0)
    });
    let queue = btf.recverr6().unwrap_or_else(|e| {
        gap(&e, "IPv6 sockets handed to governed agents, and every send and read of a governed agent on an IPv6 socket, are refused (whether its ICMP error queue is open cannot be read)");
        KernelLayout::default()
    });
    (found.recverr6_at, found.recverr6_mask, found.pinet6_at) =
        (queue.recverr6_at, queue.recverr6_mask, queue.pinet6_at);
    (found.syscall_nr_at, found.setsockopt_nr) = btf.syscall_nr().unwrap_or_else(|e| {
        gap(&e, "an error-queue option set on a governed socket other than by the native setsockopt (a compat call, io_uring) is not refused; the socket's sends and reads are");
        (0, 0)
    });
    let cgroup = btf.socket_cgroup().unwrap_or_else(|e| {
        gap(&e, "with an attach point below the root, every inet socket handed to a governed agent is refused (whether it was made within the attach point cannot be read)");
        KernelLayout::default()
    });
    found.sk_cgroup_at = cgroup.sk_cgroup_at;
    found.cgroup_level_at = cgroup.cgroup_level_at;
    found.cgroup_ancestors_at = cgroup.cgroup_ancestors_at;
    found.cgroup_kn_at = cgroup.cgroup_kn_at;
    found.kn_id_at = cgroup.kn_id_at;
    (found.file_dentry_at, found.dentry_len_at, found.dentry_name_at) =
        btf.file_name().unwrap_or_else(|e| {
            gap(&e, "every file that is no socket is refused to governed agents that take it from another process (an io_uring instance is told by its name)");
            (0, 0, 0)
        });
    (found, tasks, gaps)
}

/// Loads the task census and links it as an iterator, with `layout` in its map; why not,
/// where it cannot be (a layout not found, a kernel that refuses the program: enroll then
/// refuses). A test has the kernel's refusal with the `task-census-refused` fail point.
fn load_census(
    ebpf: &mut Ebpf,
    layout: Option<TaskLayout>,
    btf: &mut Option<aya::Btf>,
) -> Result<tasks::TaskCensus, String> {
    let Some(layout) = layout else {
        return Err("the task layout is not known".to_owned());
    };
    #[cfg(feature = "failpoints")]
    fail::fail_point!("task-census-refused", |_| Err(
        "the kernel refused the task census program: refused at the fail point task-census-refused"
            .to_owned()
    ));
    let name = c::PROG_TASK_TABLES;
    let refused = |e: &dyn std::fmt::Display| {
        format!("the kernel refused the task census program ({name}): {e}")
    };
    let mut map: Array<_, TaskLayout> = ebpf
        .take_map(c::MAP_TASK_LAYOUT)
        .ok_or_else(|| format!("the eBPF object has no map {}", c::MAP_TASK_LAYOUT))
        .and_then(|m| Array::try_from(m).map_err(|e| refused(&e)))?;
    map.set(0, layout, 0).map_err(|e| refused(&e))?;
    if btf.is_none() {
        *btf = Some(aya::Btf::from_sys_fs().map_err(|e| refused(&e))?);
    }
    let btf = btf.as_ref().expect("parsed above");
    let prog: &mut aya::programs::Iter = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e| refused(&e))?;
    prog.load("task", btf).map_err(|e| refused(&e))?;
    let fd = prog.fd().map_err(|e| refused(&e))?;
    tasks::TaskCensus::link(fd.as_fd()).map_err(|e| refused(&e))
}

/// What a start does with a pinned link other than adopt it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Swap {
    /// Attached, running another build's program: this build's takes its place in the link,
    /// atomically (`BPF_LINK_UPDATE`).
    Update,
    /// Detached (by `BPF_LINK_DETACH`, or its cgroup was another): it runs nothing, and a new
    /// link replaces its pin.
    Reattach,
}

type Swaps = BTreeMap<&'static str, Swap>;

/// This build's programs, as [`Config::programs`] names them: the first four bytes of the
/// eBPF object's SHA-256 (never 0, which pins from before the revision was kept hold).
fn program_revision() -> u32 {
    use sha2::Digest as _;
    static REVISION: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *REVISION.get_or_init(|| {
        let digest = sha2::Sha256::digest(EBPF_OBJECT);
        u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]).max(1)
    })
}

/// The pinned links this start must replace: each one detached or attached elsewhere, and
/// every one when the pins' programs are another build's. Read only: nothing changes here.
fn pinned_swaps(ebpf: &Ebpf, links_dir: &Path, attach: &Cgroup) -> Result<Swaps, DatapathError> {
    let config: Array<_, Config> = Array::try_from(
        ebpf.map(c::MAP_CONFIG)
            .ok_or(DatapathError::MissingMap(c::MAP_CONFIG))?,
    )
    .map_err(map_err(c::MAP_CONFIG))?;
    let pinned = config.get(&0, 0).map_err(map_err(c::MAP_CONFIG))?.programs;
    let stale = pinned != program_revision();
    let mut swaps = Swaps::new();
    for name in ALL_PROGRAMS {
        let path = links_dir.join(name);
        if !path.exists() {
            continue;
        }
        let cgroup = sys::pinned_link(&path)
            .and_then(|l| sys::link_cgroup(l.as_fd()))
            .map_err(io_err(&path))?;
        if cgroup == 0 {
            warn!(
                program = name,
                "a pinned link runs nowhere (detached): attaching it again"
            );
            swaps.insert(name, Swap::Reattach);
        } else if cgroup != attach.id() {
            // Enforcing another cgroup (attach_cgroup changed with the pins kept): taking it
            // away from there would leave that cgroup's agents unjudged.
            return Err(DatapathError::PinnedElsewhere {
                name,
                path,
                cgroup,
                attach: attach.path().to_owned(),
            });
        } else if stale {
            swaps.insert(name, Swap::Update);
        }
    }
    if stale {
        info!(
            pinned = format!("{pinned:08x}"),
            this = format!("{:08x}", program_revision()),
            "the pinned links run another build's programs: replacing each in its link"
        );
    }
    Ok(swaps)
}

/// Loads (the kernel verifies) every program whose link is not pinned yet. The LSM line is
/// loaded where the kernel runs BPF LSM programs; a kernel that then refuses it (before 6.0,
/// no `lsm_cgroup`) leaves it unenforced, said in `families`.
/// The server-name check's program is loaded with the egress program, and where an adopted
/// egress program's slot is empty (an earlier start could not load it); a kernel that
/// refuses it leaves the slot empty, said in the answer.
fn load_programs(
    ebpf: &mut Ebpf,
    links_dir: &Path,
    families: &mut SocketFamilies,
    swaps: &Swaps,
    btf: &mut Option<aya::Btf>,
) -> Result<ServerNameCheck, DatapathError> {
    for name in ALL_PROGRAMS {
        if links_dir.join(name).exists() {
            if swaps.contains_key(name) {
                // A pinned link's replacement must load: its old program keeps running
                // otherwise, and the start is refused.
                load_program(ebpf, name, btf)?;
            }
            continue;
        }
        if c::LSM_PROGRAMS.contains(&name) {
            if *families == SocketFamilies::Enforced
                && let Err(e) = load_program(ebpf, name, btf)
            {
                // Pinned LSM links run on: the line cannot be said unenforced, nor left half
                // this build's. The start is refused, the pinned programs left running.
                if links_dir.join(c::PROG_SOCKET_FAMILY).exists() {
                    return Err(e);
                }
                *families = SocketFamilies::Unenforced(format!(
                    "the kernel refused the BPF LSM {} program: {e}",
                    lsm_hook(name)
                ));
            }
            continue;
        }
        load_program(ebpf, name, btf)?;
    }
    // The egress program's tail, with it: a pinned egress program adopted as it is keeps
    // the tail its start put in the pinned array, if that start had one.
    if ebpf.program(c::PROG_EGRESS).is_some_and(|p| p.fd().is_ok()) || !tail_filled(ebpf)? {
        if let Err(e) = load_sni_check(ebpf, btf) {
            let why = format!("the kernel refused the server-name check: {e}");
            warn!(
                why = %why,
                "connections only a name rule allows are refused at connect where a policy says `sni: enforce`, and recorded there and let through unchecked where it says `sni: audit`"
            );
            return Ok(ServerNameCheck::Unavailable(why));
        }
    }
    Ok(ServerNameCheck::Loaded)
}

/// Whether the pinned `AW_TAILS` holds the server-name check.
fn tail_filled(ebpf: &Ebpf) -> Result<bool, DatapathError> {
    let Some(aya::maps::Map::ProgramArray(map)) = ebpf.map(c::MAP_TAILS) else {
        return Err(DatapathError::MissingMap(c::MAP_TAILS));
    };
    let filled =
        sys::filled_slots(map.fd().as_fd(), c::TAILS).map_err(io_err(Path::new(c::MAP_TAILS)))?;
    Ok(filled.contains(&c::TAIL_SNI))
}

/// Loads the server-name check's program (a test can have the kernel's refusal of it, as
/// under `lockdown=confidentiality`, with the `sni-program-refused` fail point).
fn load_sni_check(ebpf: &mut Ebpf, btf: &mut Option<aya::Btf>) -> Result<(), DatapathError> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("sni-program-refused", |_| Err(DatapathError::Program {
        name: c::PROG_EGRESS_SNI,
        source: Box::new(aya::programs::ProgramError::IOError(io::Error::other(
            "refused at the fail point sni-program-refused"
        ))),
    }));
    load_program(ebpf, c::PROG_EGRESS_SNI, btf)
}

/// Puts this build's tail programs in the pinned `AW_TAILS`, before its egress program is
/// attached: a packet it hands on never finds the slot empty. (The earlier build's egress
/// program, still attached until it is swapped, hands its packets to this build's check,
/// which reads the same layout.)
fn set_tails(ebpf: &mut Ebpf, check: &ServerNameCheck) -> Result<(), DatapathError> {
    let name = c::PROG_EGRESS_SNI;
    let prog_err = |e: aya::programs::ProgramError| DatapathError::Program {
        name,
        source: Box::new(e),
    };
    let Some(prog) = ebpf.program(name) else {
        return Err(DatapathError::MissingProgram(name));
    };
    let fd = match prog.fd() {
        Ok(fd) => Some(
            fd.try_clone()
                .map_err(|e| prog_err(aya::programs::ProgramError::IOError(e)))?,
        ),
        // Not loaded: the egress program was adopted as it is, with its tail.
        Err(_) if *check == ServerNameCheck::Loaded => return Ok(()),
        // The kernel refused the check: an earlier build's left in the slot would run for
        // a build whose status says none does, and a later start of this build would take
        // it for its own. Connections that build let start with their check pending then
        // send no data (closed); this build's connect hook starts none.
        Err(_) => None,
    };
    let map = ebpf
        .map_mut(c::MAP_TAILS)
        .ok_or(DatapathError::MissingMap(c::MAP_TAILS))?;
    let mut tails = aya::maps::ProgramArray::try_from(map).map_err(map_err(c::MAP_TAILS))?;
    match fd {
        Some(fd) => tails.set(c::TAIL_SNI, &fd, 0),
        None => match tails.clear_index(&c::TAIL_SNI) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            other => other,
        },
    }
    .map_err(map_err(c::MAP_TAILS))
}

/// Loads one program, unless it is loaded already.
/// `btf`: the kernel's BTF, parsed once for every BPF LSM program (it is megabytes).
fn load_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    btf: &mut Option<aya::Btf>,
) -> Result<(), DatapathError> {
    let prog_err = |e: aya::programs::ProgramError| DatapathError::Program {
        name,
        source: Box::new(e),
    };
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    if name == c::PROG_SOCK_CREATE {
        let p: &mut CgroupSock = prog.try_into().map_err(prog_err)?;
        if p.fd().is_err() {
            p.load().map_err(prog_err)?;
        }
    } else if name == c::PROG_EGRESS || name == c::PROG_INGRESS || name == c::PROG_EGRESS_SNI {
        let p: &mut CgroupSkb = prog.try_into().map_err(prog_err)?;
        if p.fd().is_err() {
            p.load().map_err(prog_err)?;
        }
    } else if name == c::PROG_SETSOCKOPT {
        let p: &mut CgroupSockopt = prog.try_into().map_err(prog_err)?;
        if p.fd().is_err() {
            p.load().map_err(prog_err)?;
        }
    } else if c::LSM_PROGRAMS.contains(&name) {
        let p: &mut LsmCgroup = prog.try_into().map_err(prog_err)?;
        if p.fd().is_err() {
            if btf.is_none() {
                *btf = Some(aya::Btf::from_sys_fs().map_err(|e| DatapathError::Program {
                    name,
                    source: Box::new(aya::programs::ProgramError::Btf(e)),
                })?);
            }
            let btf = btf.as_ref().expect("parsed above");
            p.load(lsm_hook(name), btf).map_err(prog_err)?;
        }
    } else {
        let p: &mut CgroupSockAddr = prog.try_into().map_err(prog_err)?;
        if p.fd().is_err() {
            p.load().map_err(prog_err)?;
        }
    }
    Ok(())
}

fn attach_all(
    ebpf: &mut Ebpf,
    attach: &Cgroup,
    links_dir: &Path,
    families: &SocketFamilies,
    swaps: &Swaps,
) -> Result<StartReport, DatapathError> {
    let mut report = StartReport {
        attached: 0,
        adopted: 0,
        replaced: 0,
        removed: 0,
    };
    let mut pinned_now: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let cgroup_file = fs::File::open(attach.path()).map_err(io_err(attach.path()))?;
        for name in ALL_PROGRAMS {
            let link_err = |e: aya::programs::links::LinkError| DatapathError::Link {
                name,
                source: Box::new(e),
            };
            let link_path = links_dir.join(name);
            match swaps.get(name) {
                _ if !link_path.exists() => {}
                // A pin from an earlier start: enforcement is already in place.
                None => {
                    PinnedLink::from_pin(&link_path).map_err(link_err)?;
                    report.adopted += 1;
                    continue;
                }
                Some(Swap::Update) => {
                    let prog = ebpf
                        .program(name)
                        .ok_or(DatapathError::MissingProgram(name))?
                        .fd()
                        .map_err(|e| DatapathError::Program {
                            name,
                            source: Box::new(e),
                        })?;
                    let replaced = sys::pinned_link(&link_path)
                        .and_then(|link| sys::link_update(link.as_fd(), prog.as_fd()));
                    replaced.map_err(|source| DatapathError::Replace { name, source })?;
                    report.adopted += 1;
                    report.replaced += 1;
                    continue;
                }
                // Detached: it runs nothing. A new link takes its place.
                Some(Swap::Reattach) => {
                    fs::remove_file(&link_path).map_err(io_err(&link_path))?;
                    report.replaced += 1;
                }
            }
            if c::LSM_PROGRAMS.contains(&name) && *families != SocketFamilies::Enforced {
                continue;
            }
            // Loaded by load_programs, unless its pin vanished since.
            load_program(ebpf, name, &mut None)?;
            let prog_err = |e: aya::programs::ProgramError| DatapathError::Program {
                name,
                source: Box::new(e),
            };
            let prog = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?;
            // The program types share no trait for attach/take_link in aya 0.14.
            macro_rules! load_attach {
                ($ty:ty $(, $kind:expr)?) => {{
                    let p: &mut $ty = prog.try_into().map_err(prog_err)?;
                    let id = p
                        .attach(&cgroup_file, $($kind,)? CgroupAttachMode::Single)
                        .map_err(prog_err)?;
                    p.take_link(id)
                        .map_err(prog_err)?
                        .try_into()
                        .map_err(link_err)?
                }};
            }
            let link: FdLink = if name == c::PROG_SOCK_CREATE {
                load_attach!(CgroupSock)
            } else if c::LSM_PROGRAMS.contains(&name) {
                let p: &mut LsmCgroup = prog.try_into().map_err(prog_err)?;
                let id = p.attach(&cgroup_file).map_err(prog_err)?;
                p.take_link(id).map_err(prog_err)?.into()
            } else if name == c::PROG_EGRESS {
                load_attach!(CgroupSkb, CgroupSkbAttachType::Egress)
            } else if name == c::PROG_INGRESS {
                load_attach!(CgroupSkb, CgroupSkbAttachType::Ingress)
            } else if name == c::PROG_SETSOCKOPT {
                // aya 0.14 cannot hand out this program's link as an FdLink to pin.
                let p: &mut CgroupSockopt = prog.try_into().map_err(prog_err)?;
                let fd = p.fd().map_err(prog_err)?;
                sys::attach_pinned_link(
                    fd.as_fd(),
                    cgroup_file.as_fd(),
                    sys::ATTACH_CGROUP_SETSOCKOPT,
                    &link_path,
                )
                .map_err(|source| DatapathError::Attach { name, source })?;
                pinned_now.push(link_path);
                report.attached += 1;
                continue;
            } else {
                load_attach!(CgroupSockAddr)
            };
            link.pin(&link_path).map_err(|source| DatapathError::Pin {
                path: link_path.clone(),
                source,
            })?;
            pinned_now.push(link_path);
            report.attached += 1;
        }
        // Links of programs this build does not have (a newer build's, after a downgrade)
        // would run code no build in charge vouches for: detached, once this build's are in.
        for entry in fs::read_dir(links_dir).map_err(io_err(links_dir))? {
            let path = entry.map_err(io_err(links_dir))?.path();
            let known = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| ALL_PROGRAMS.contains(&n));
            if !known {
                warn!(pin = %path.display(), "a pinned link of a program this build does not have: detached");
                fs::remove_file(&path).map_err(io_err(&path))?;
                report.removed += 1;
            }
        }
        Ok(report)
    })();
    if result.is_err() {
        for p in &pinned_now {
            let _ = fs::remove_file(p);
        }
    }
    result
}

/// Ids of agentwall-relevant programs attached directly to `cgroup`, over every hook it uses.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<u32>, DatapathError> {
    let mut ids = Vec::new();
    for name in ALL_PROGRAMS {
        match sys::prog_query(cgroup, attach_type(name)) {
            Ok(found) => ids.extend(found),
            // A kernel without lsm_cgroup has nothing attached there to find.
            Err(_) if c::LSM_PROGRAMS.contains(&name) => {}
            Err(e) => return Err(io_err(cgroup)(e)),
        }
    }
    Ok(ids)
}

/// Detaches everything and removes every pin under `bpffs_dir` for this ABI version. Links go
/// first, so enforcement ends before its maps do. Absent pins are not an error.
pub fn teardown(bpffs_dir: &Path) -> Result<(), DatapathError> {
    remove_pins(&pin_dir(bpffs_dir), bpffs_dir)
}

/// [`teardown`] of every map-layout version pinned under `bpffs_dir` (an upgrade left
/// unfinished leaves an older one attached): `agentwall down`. Returns the versions removed.
pub fn teardown_all(bpffs_dir: &Path) -> Result<Vec<String>, DatapathError> {
    let mut removed = Vec::new();
    // Every version's directory, links or not: a teardown that stopped after the links
    // leaves maps pinned.
    for (name, path) in versions(bpffs_dir, false)? {
        remove_pins(&path, bpffs_dir)?;
        removed.push(name);
    }
    let own = pin_dir(bpffs_dir);
    if own.exists() {
        remove_pins(&own, bpffs_dir)?;
        removed.push(format!("v{ABI_VERSION}"));
    }
    Ok(removed)
}

/// What a start would find of `bpffs_dir` (`node --check-config`): its pin directories, where
/// they exist, safe to pin into; and bpffs there, or mountable where the node would mount it.
/// Nothing is made or mounted.
pub fn check_pins(bpffs_dir: &Path) -> Result<String, DatapathError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    let mounted = if sys::bpffs_missing(bpffs_dir).map_err(io_err(sys_bpf))? {
        not_shared()?;
        "no bpf filesystem at /sys/fs/bpf yet: the node mounts one (mode 0700)".to_owned()
    } else {
        let on = bpffs_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !sys::is_bpffs(on).map_err(io_err(on))? {
            return Err(DatapathError::NotBpffs {
                path: on.to_owned(),
            });
        }
        format!("{} is on bpffs", on.display())
    };
    let dir = pin_dir(bpffs_dir);
    for d in [
        bpffs_dir.to_owned(),
        dir.clone(),
        dir.join("maps"),
        dir.join("links"),
    ] {
        if fs::symlink_metadata(&d).is_ok() {
            check_pin_dir(&d)?;
        }
    }
    let pinned = other_versions(bpffs_dir)?
        .into_iter()
        .map(|(name, _)| name)
        .chain(
            fs::read_dir(dir.join("links"))
                .is_ok_and(|mut e| e.next().is_some())
                .then(|| format!("v{ABI_VERSION}")),
        )
        .collect::<Vec<_>>();
    Ok(if pinned.is_empty() {
        format!("{mounted}; nothing pinned")
    } else {
        format!("{mounted}; pinned map layouts: {}", pinned.join(", "))
    })
}

/// Refuses, when bpffs would have to be mounted, a process whose mounts the host does not
/// see (or whose namespace cannot be told): what it mounted would go when it stops.
fn not_shared() -> Result<(), DatapathError> {
    match sys::in_host_mount_namespace() {
        Ok(true) => Ok(()),
        Ok(false) => Err(DatapathError::BpffsNotShared {
            why:
                "this process runs in a mount namespace of its own (a systemd sandbox, a container)"
                    .into(),
        }),
        Err(e) => Err(DatapathError::BpffsNotShared {
            why: format!(
                "whether this process shares the host's mount namespace cannot be told (/proc/1/ns/mnt: {e})"
            ),
        }),
    }
}

/// A directory the node pins into or removes pins from must be a real directory (not a
/// link somewhere else), owned by this process's user and writable by no one else: a local
/// user who made it first would otherwise hold every pin, and could detach every program by
/// removing them, or point a teardown at files outside bpffs.
fn check_pin_dir(path: &Path) -> Result<(), DatapathError> {
    use std::os::unix::fs::MetadataExt as _;
    let unsafe_dir = |why: String| DatapathError::UnsafePinDir {
        path: path.to_owned(),
        why,
    };
    let m = fs::symlink_metadata(path).map_err(io_err(path))?;
    if !m.file_type().is_dir() {
        return Err(unsafe_dir("not a directory (a symbolic link?)".into()));
    }
    // SAFETY: a plain system call with no arguments.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(unsafe_dir(format!("owned by uid {}, not {me}", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:o}: writable by its group or by anyone",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// The pin directories of other map-layout versions under `bpffs_dir` that still hold links.
fn other_versions(bpffs_dir: &Path) -> Result<Vec<(String, PathBuf)>, DatapathError> {
    versions(bpffs_dir, true)
}

/// The pin directories of other map-layout versions under `bpffs_dir`; with `linked`, only
/// those that still hold a link.
fn versions(bpffs_dir: &Path, linked: bool) -> Result<Vec<(String, PathBuf)>, DatapathError> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(bpffs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_err(bpffs_dir)(e)),
    };
    for e in entries {
        let path = e.map_err(io_err(bpffs_dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let other = name
            .strip_prefix('v')
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|v| v != ABI_VERSION);
        // A version that still holds a link: an empty links directory (a start refused
        // before it attached anything) judges nothing and is no layout to upgrade from.
        let holds_links =
            fs::read_dir(path.join("links")).is_ok_and(|mut entries| entries.next().is_some());
        if other && (holds_links || !linked) {
            found.push((name.to_owned(), path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes one version's links, then its maps, then its directory (and `bpffs_dir` when it is
/// left empty).
fn remove_pins(dir: &Path, bpffs_dir: &Path) -> Result<(), DatapathError> {
    if !fs::exists(dir).map_err(io_err(dir))? {
        return Ok(());
    }
    // Every level checked before anything is removed: a refusal removes nothing.
    for d in [bpffs_dir, dir] {
        check_pin_dir(d)?;
    }
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if fs::symlink_metadata(&d).is_ok() {
            check_pin_dir(&d)?;
        }
    }
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        match fs::read_dir(&d) {
            Ok(entries) => {
                for e in entries {
                    let p = e.map_err(io_err(&d))?.path();
                    if sub == "links" {
                        // Detached now, so that once a teardown returns no program of it
                        // judges anything; the pin's removal alone detaches it some time
                        // later. A link that will not open or detach still goes with its pin.
                        if let Err(e) =
                            sys::pinned_link(&p).and_then(|l| sys::detach_link(l.as_fd()))
                        {
                            warn!(pin = %p.display(), error = %e, "a pinned link could not be detached at once; it is detached when the kernel frees it");
                        }
                    }
                    fs::remove_file(&p).map_err(io_err(&p))?;
                }
                fs::remove_dir(&d).map_err(io_err(&d))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&d)(e)),
        }
    }
    // `bpffs_dir` itself stays (root's, checked): removing it would let any user of a
    // world-writable bpffs make it again, their own, before the next start.
    for d in [dir] {
        match fs::remove_dir(d) {
            Ok(()) => {}
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) => return Err(io_err(d)(e)),
        }
    }
    Ok(())
}
