//! The DNS proxy: one UDP socket and one TCP listener per identity with name rules, on that
//! identity's proxy address (`127.77.x.y`, see `agent_common::dns_proxy_addr`). The datapath
//! steers the identity's DNS there, so the address a query arrives on says who asked.
//!
//! Each query is first put to the [`AnswerSink`]: one the identity's DNS policy refuses is
//! answered REFUSED and nothing leaves the host. The rest are forwarded unchanged to the
//! upstream resolvers in order; the answer is checked (id, question), handed to the sink
//! (which makes its addresses enforceable) and only then passed on, so the agent can never
//! connect before the kernel allows the address.

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Handle,
    task::JoinHandle,
};
use tracing::{debug, warn};

use super::{Answer, read_answer};

/// What happens to a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Forward,
    /// Answered REFUSED; nothing is sent upstream.
    Refuse,
}

/// Decides every query before anything leaves the host, and receives every answer before the
/// agent does.
pub trait AnswerSink: Send + Sync + 'static {
    /// `name` lower-case without a trailing dot; `qtype` the query type's code.
    fn admit(&self, identity: u32, name: &str, qtype: u16) -> Admit;
    fn answered(&self, identity: u32, answer: &Answer);
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub port: u16,
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream gets before the next is tried.
    pub timeout: Duration,
}

/// Queries larger than this are not DNS any resolver sends over UDP.
const MAX_UDP_QUERY: usize = 4096;
/// A TCP client that says nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Latency histogram bucket bounds, seconds (Prometheus `le`).
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];

/// Counters, read by the metrics page.
#[derive(Debug, Default)]
pub struct Stats {
    pub queries_udp: AtomicU64,
    pub queries_tcp: AtomicU64,
    /// Answered REFUSED by the identity's DNS policy.
    pub refused: AtomicU64,
    pub answers: AtomicU64,
    /// Upstream gave no usable answer in time; the agent got SERVFAIL.
    pub upstream_failures: AtomicU64,
    pub dropped_malformed_query: AtomicU64,
    pub dropped_oversized_query: AtomicU64,
    pub dropped_malformed_response: AtomicU64,
    pub dropped_mismatched_response: AtomicU64,
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    pub latency_count: AtomicU64,
    /// Sum of latencies in microseconds.
    pub latency_sum_us: AtomicU64,
}

impl Stats {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    cfg: ProxyConfig,
    sink: Arc<dyn AnswerSink>,
    stats: Arc<Stats>,
}

/// The tasks serving one identity; they stop when this is dropped.
struct Listener {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct Proxy {
    shared: Arc<Shared>,
    handle: Handle,
    /// By (identity, network namespace inode; 0 = the node's own).
    listeners: Mutex<BTreeMap<(u32, u64), Listener>>,
}

/// The address identity `n`'s DNS to IPv4 resolvers is steered to.
pub fn proxy_addr(identity: u32, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(agent_common::dns_proxy_addr(identity)), port))
}

/// The address identity `n`'s DNS to IPv6 resolvers is steered to.
pub fn proxy_addr6(identity: u32, port: u16) -> SocketAddr {
    SocketAddr::from((
        std::net::Ipv6Addr::from(agent_common::dns_proxy_addr6(identity)),
        port,
    ))
}

/// A socket bound to `addr` with IPV6_FREEBIND: the address is routed here (a `local`
/// route) but is on no interface.
fn bind_freebind(addr: SocketAddr, stream: bool) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let SocketAddr::V6(a) = addr else {
        return Err(io::Error::other("not an IPv6 address"));
    };
    let ty = if stream {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain syscalls on a descriptor this function owns; the sockaddr is fully
    // initialised.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET6,
            ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for (level, opt) in [
            (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
        ] {
            if libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let sin6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: a.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: a.ip().octets(),
            },
            sin6_scope_id: 0,
        };
        if libc::bind(
            fd.as_raw_fd(),
            (&raw const sin6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if stream && libc::listen(fd.as_raw_fd(), 1024) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

impl Proxy {
    /// Must be called inside the tokio runtime the proxy will run on.
    pub fn new(cfg: ProxyConfig, sink: Arc<dyn AnswerSink>) -> Self {
        Self {
            shared: Arc::new(Shared {
                cfg,
                sink,
                stats: Arc::default(),
            }),
            handle: Handle::current(),
            listeners: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    pub fn port(&self) -> u16 {
        self.shared.cfg.port
    }

    /// Listens for exactly these identities, each in the node's own network namespace and in
    /// the namespaces given with it (where its agents run): new pairs get sockets, others
    /// lose theirs. Returns what could not be opened, with why.
    pub fn sync(&self, want: &BTreeMap<u32, Vec<Netns>>) -> Vec<(u32, String, io::Error)> {
        let mut listeners = self.listeners.lock().expect("proxy listeners");
        listeners.retain(|(id, ns), _| {
            want.get(id)
                .is_some_and(|v| *ns == 0 || v.iter().any(|n| n.inode == *ns))
        });
        let mut failed = Vec::new();
        for (&id, spaces) in want {
            let places =
                std::iter::once((0, None)).chain(spaces.iter().map(|n| (n.inode, Some(n))));
            for (inode, ns) in places {
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    listeners.entry((id, inode))
                {
                    match self.listen(id, ns) {
                        Ok(l) => {
                            slot.insert(l);
                        }
                        Err(e) => failed.push((
                            id,
                            ns.map_or("the node's network namespace".into(), |n| {
                                n.path.display().to_string()
                            }),
                            e,
                        )),
                    }
                }
            }
        }
        failed
    }

    /// Binds an identity's proxy sockets, in `ns` when given (a socket stays in the namespace
    /// it was made in; forwarding happens from the node's own).
    fn listen(&self, identity: u32, ns: Option<&Netns>) -> io::Result<Listener> {
        let port = self.shared.cfg.port;
        let bound = match ns {
            None => bind_all(identity, port),
            Some(ns) => {
                let path = ns.path.clone();
                std::thread::scope(|s| {
                    s.spawn(move || {
                        use std::os::fd::AsRawFd as _;
                        let f = std::fs::File::open(&path)?;
                        // SAFETY: setns on this short-lived thread only.
                        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if let Err(e) = super::route::ensure_local_route() {
                            debug!(error = %e, "no IPv6 proxy route in the agent's namespace");
                        }
                        bind_all(identity, port)
                    })
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("binding thread panicked")))
                })
            }
        }?;
        let _guard = self.handle.enter();
        let s = self.shared.clone();
        let mut tasks = Vec::new();
        for (udp, tcp) in bound {
            let udp = Arc::new(UdpSocket::from_std(udp)?);
            let tcp = TcpListener::from_std(tcp)?;
            tasks.push(self.handle.spawn(serve_udp(udp, identity, s.clone())));
            tasks.push(self.handle.spawn(serve_tcp(tcp, identity, s.clone())));
        }
        debug!(identity, netns = ?ns.map(|n| n.inode), "DNS proxy listening");
        Ok(Listener { tasks })
    }
}

/// A network namespace agents of an identity run in: its inode (identity) and a path that
/// opens it now (`/proc/PID/ns/net`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    pub path: std::path::PathBuf,
}

/// The IPv4 sockets (required) and the IPv6 ones (best effort: without IPv6 there is no IPv6
/// DNS to steer, and such lookups fail, closed) of one identity, in the calling thread's
/// network namespace.
fn bind_all(
    identity: u32,
    port: u16,
) -> io::Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>> {
    let addr = proxy_addr(identity, port);
    let udp = std::net::UdpSocket::bind(addr)?;
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    let mut out = vec![(udp, tcp)];
    let addr6 = proxy_addr6(identity, port);
    match (|| -> io::Result<_> {
        Ok((
            std::net::UdpSocket::from(bind_freebind(addr6, false)?),
            std::net::TcpListener::from(bind_freebind(addr6, true)?),
        ))
    })() {
        Ok(pair) => out.push(pair),
        Err(e) => warn!(identity, addr = %addr6, error = %e, "DNS proxy not listening on IPv6"),
    }
    Ok(out)
}

/// What the proxy does with bytes it did not make: an agent's query (parsed, its name read
/// as policy reads it, answered REFUSED) and an upstream's answer to it (checked against
/// the query, its addresses read). The `dns` fuzz target drives it: no input may panic.
pub fn examine_untrusted(query: &[u8], response: &[u8]) -> Option<super::Answer> {
    let q = parse_query(query)?;
    let _ = crate::policy::fqdn::normalize(&q.queries()[0].name().to_ascii());
    let _ = empty_answer(&q, ResponseCode::Refused);
    let r = check_response(&q, response, &Stats::default())?;
    super::read_answer(&q, &r)
}

/// A query worth forwarding: one question, opcode QUERY, not a response.
fn parse_query(bytes: &[u8]) -> Option<Message> {
    let m = Message::from_vec(bytes).ok()?;
    (m.message_type() == MessageType::Query
        && m.op_code() == OpCode::Query
        && m.queries().len() == 1)
        .then_some(m)
}

/// Whether `bytes` answers `query`; counts what it is not.
fn check_response(query: &Message, bytes: &[u8], stats: &Stats) -> Option<Message> {
    let Ok(r) = Message::from_vec(bytes) else {
        bump(&stats.dropped_malformed_response);
        return None;
    };
    if r.id() != query.id()
        || r.message_type() != MessageType::Response
        || r.queries().len() != 1
        || r.queries()[0].name() != query.queries()[0].name()
        || r.queries()[0].query_type() != query.queries()[0].query_type()
    {
        bump(&stats.dropped_mismatched_response);
        return None;
    }
    Some(r)
}

/// An answer with no records and `code`, to `query`.
fn empty_answer(query: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code)
        .add_queries(query.queries().to_vec());
    m.to_vec().unwrap_or_default()
}

async fn forward_udp(query: &Message, bytes: &[u8], sh: &Shared) -> Option<(Vec<u8>, Message)> {
    for &up in &sh.cfg.upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(bytes).await.is_err() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + sh.cfg.timeout;
        let mut buf = vec![0u8; 65535];
        // Wrong ids and garbage are dropped and counted; the right answer may still come.
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            if let Some(m) = check_response(query, &buf[..n], &sh.stats) {
                buf.truncate(n);
                return Some((buf, m));
            }
        }
    }
    None
}

async fn read_framed(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed(s: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let len = u16::try_from(bytes.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    s.write_all(&out).await
}

async fn forward_tcp(query: &Message, bytes: &[u8], sh: &Shared) -> Option<(Vec<u8>, Message)> {
    for &up in &sh.cfg.upstreams {
        let attempt = async {
            let mut s = TcpStream::connect(up).await.ok()?;
            write_framed(&mut s, bytes).await.ok()?;
            let resp = read_framed(&mut s).await.ok()?;
            let m = check_response(query, &resp, &sh.stats)?;
            Some((resp, m))
        };
        if let Ok(Some(r)) = tokio::time::timeout(sh.cfg.timeout, attempt).await {
            return Some(r);
        }
    }
    None
}

/// Forwards, learns, and returns the bytes for the agent (SERVFAIL when no upstream answered).
async fn resolve(identity: u32, query: &Message, bytes: &[u8], tcp: bool, sh: &Shared) -> Vec<u8> {
    let t0 = Instant::now();
    let q = &query.queries()[0];
    let name = crate::policy::fqdn::normalize(&q.name().to_ascii());
    if sh.sink.admit(identity, &name, u16::from(q.query_type())) == Admit::Refuse {
        bump(&sh.stats.refused);
        return empty_answer(query, ResponseCode::Refused);
    }
    let got = if tcp {
        forward_tcp(query, bytes, sh).await
    } else {
        forward_udp(query, bytes, sh).await
    };
    let out = match got {
        Some((resp, m)) => {
            bump(&sh.stats.answers);
            if let Some(a) = read_answer(query, &m) {
                // The agent gets the answer only after the kernel allows what it names.
                sh.sink.answered(identity, &a);
            }
            resp
        }
        None => {
            bump(&sh.stats.upstream_failures);
            warn!(identity, upstreams = ?sh.cfg.upstreams, "no upstream resolver answered; SERVFAIL");
            empty_answer(query, ResponseCode::ServFail)
        }
    };
    sh.stats.observe(t0.elapsed());
    out
}

async fn serve_udp(sock: Arc<UdpSocket>, identity: u32, sh: Arc<Shared>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(identity, error = %e, "DNS proxy receive failed");
                continue;
            }
        };
        bump(&sh.stats.queries_udp);
        if n > MAX_UDP_QUERY {
            bump(&sh.stats.dropped_oversized_query);
            continue;
        }
        let bytes = buf[..n].to_vec();
        let Some(query) = parse_query(&bytes) else {
            bump(&sh.stats.dropped_malformed_query);
            continue;
        };
        let (sock, sh) = (sock.clone(), sh.clone());
        tokio::spawn(async move {
            let out = resolve(identity, &query, &bytes, false, &sh).await;
            let _ = sock.send_to(&out, from).await;
        });
    }
}

async fn serve_tcp(listener: TcpListener, identity: u32, sh: Arc<Shared>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            loop {
                let bytes = match tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await {
                    Ok(Ok(b)) => b,
                    _ => return,
                };
                bump(&sh.stats.queries_tcp);
                let Some(query) = parse_query(&bytes) else {
                    bump(&sh.stats.dropped_malformed_query);
                    return;
                };
                let out = resolve(identity, &query, &bytes, true, &sh).await;
                if write_framed(&mut conn, &out).await.is_err() {
                    return;
                }
            }
        });
    }
}
