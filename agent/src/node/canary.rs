//! The node's self-check: that the kernel lines refuse, not only that they loaded.
//!
//! A program can be loaded and attached and still let everything through: a kernel bug (one
//! 6.1 run saw the receipt line refuse nothing), a link someone detached, a line the kernel
//! no longer runs. At start and every [`EVERY`] the node forks a canary process into a cgroup
//! of its own, bound to an identity that has no rules, in a network namespace of its own (so
//! nothing it tries can leave the host even where a line fails open), and has it do what each
//! line must refuse. A line that lets its act through fails the check: `status` says which,
//! the node logs an error, counts it in `agentwall_selfcheck_failures_total`, and refuses new
//! launches and enrollments until a check passes again.
//!
//! The canary's own records are the node's, not an agent's: they are not reported.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{Cgroup, CgroupError},
    datapath::{Datapath, DatapathError, SocketFamilies},
    policy::{IdentityStatus, Mode},
};

/// The identity number the canary's cgroup is bound to: the last the kernel's tables hold,
/// never given to a policy's identity (the registry stops one short of it). It has no rules.
pub const CANARY_IDENTITY: u32 = agent_common::MAX_IDENTITIES - 1;

/// How often the check runs after the first.
pub const EVERY: Duration = Duration::from_secs(300);

/// The canary's cgroup, beside the agents' (`agentwall/`) under the attach point.
pub const CGROUP_NAME: &str = "agentwall-canary";

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("binding the canary's cgroup: {0}")]
    Datapath(#[from] DatapathError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("the canary process did not answer within {0:?}")]
    Silent(Duration),
    #[error("the canary process could not {0}")]
    Setup(&'static str),
    #[error(
        "identity number {CANARY_IDENTITY}, the self-check's, is held by {0} (numbered before the self-check existed): the check does not run rather than change that identity's state"
    )]
    NumberTaken(String),
}

/// What one line did with the act the canary tried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Refused with EPERM, as the line refuses.
    Refused,
    /// Not refused by the line: what the canary saw instead.
    NotRefused(String),
    /// The line is not in force here (status says why), so there was nothing to check.
    NotChecked,
}

impl Outcome {
    fn failed(&self) -> bool {
        matches!(self, Self::NotRefused(_))
    }
}

/// One self-check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfCheck {
    /// When it ran (RFC 3339).
    pub at: String,
    /// Whether every line in force refused what it must.
    pub ok: bool,
    /// `connect()` to an address no rule allows, IPv4 (the connect4 hook).
    pub connect4: Outcome,
    /// The same, IPv6 (connect6).
    pub connect6: Outcome,
    /// `sendto()` an address no rule allows, IPv4 (sendmsg4).
    pub sendmsg4: Outcome,
    /// The same, IPv6 (sendmsg6).
    pub sendmsg6: Outcome,
    /// `IP_FREEBIND` on a UDP socket (the setsockopt hook).
    pub sockopt: Outcome,
    /// A packet socket (the BPF LSM `socket_create` line).
    pub families: Outcome,
    /// A bound, unconnected UDP socket handed in over a unix socket (the receipt line,
    /// `file_receive`).
    pub receipt: Outcome,
    /// Why the check itself could not run (then `ok` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SelfCheck {
    /// What failed, for messages: "connect4 (ENETUNREACH), receipt (taken)".
    pub fn failures(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        self.lines()
            .iter()
            .filter_map(|(line, o)| match o {
                Outcome::NotRefused(what) => Some(format!("{line} ({what})")),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl SelfCheck {
    fn lines(&self) -> [(&'static str, &Outcome); LINES] {
        [
            ("connect4", &self.connect4),
            ("connect6", &self.connect6),
            ("sendmsg4", &self.sendmsg4),
            ("sendmsg6", &self.sendmsg6),
            ("sockopt", &self.sockopt),
            ("families", &self.families),
            ("receipt", &self.receipt),
        ]
    }

    fn of(at: String, outcomes: [Outcome; LINES], error: Option<String>) -> Self {
        let [
            connect4,
            connect6,
            sendmsg4,
            sendmsg6,
            sockopt,
            families,
            receipt,
        ] = outcomes;
        let mut c = Self {
            at,
            ok: false,
            connect4,
            connect6,
            sendmsg4,
            sendmsg6,
            sockopt,
            families,
            receipt,
            error,
        };
        c.ok = c.error.is_none() && !c.lines().iter().any(|(_, o)| o.failed());
        c
    }
}

/// The acts the canary tries, one per line, in [`SelfCheck::lines`]' order.
const LINES: usize = 7;

/// The last check and when the next is due.
pub struct Canary {
    cgroup: PathBuf,
    state: Mutex<State>,
    /// One check at a time: the API's and the tick's share the cgroup.
    running: Mutex<()>,
}

struct State {
    last: Option<SelfCheck>,
    next: Instant,
    failures: u64,
}

impl Canary {
    /// Clears what an earlier run may have left (its cgroup, with any process still in it):
    /// before the sessions are read back, which then free its binding.
    pub fn new(attach: &Cgroup) -> Self {
        let cgroup = attach.path().join(CGROUP_NAME);
        if cgroup.exists() {
            remove(&cgroup);
        }
        Self {
            cgroup,
            state: Mutex::new(State {
                last: None,
                next: Instant::now(),
                failures: 0,
            }),
            running: Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a check if one is due.
    pub fn run_if_due(&self, dp: &Datapath, holder: Option<&str>) {
        if Instant::now() >= self.state().next {
            self.run(dp, holder);
        }
    }

    /// Runs a check now and keeps its result. `holder`: the identity the registry numbers
    /// [`CANARY_IDENTITY`], if one does.
    pub fn run(&self, dp: &Datapath, holder: Option<&str>) -> SelfCheck {
        let _one = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = crate::clock::now_rfc3339();
        let checked = match holder {
            Some(id) => Err(CanaryError::NumberTaken(id.to_owned())),
            None => self.check(dp),
        };
        let check = match checked {
            Ok(outcomes) => SelfCheck::of(at, outcomes, None),
            Err(e) => SelfCheck::of(
                at,
                std::array::from_fn(|_| Outcome::NotChecked),
                Some(e.to_string()),
            ),
        };
        let mut st = self.state();
        if check.ok {
            if st.last.as_ref().is_some_and(|l| !l.ok) {
                tracing::info!("the self-check passes again: launches and enrollments resume");
            }
        } else {
            st.failures += 1;
            tracing::error!(
                failed = %check.failures(),
                "enforcement self-check failed: a kernel line let through what it must refuse; new launches and enrollments are refused until a check passes"
            );
        }
        st.last = Some(check.clone());
        st.next = Instant::now() + EVERY;
        check
    }

    /// The last check, if any ran.
    pub fn last(&self) -> Option<SelfCheck> {
        self.state().last.clone()
    }

    /// Checks that failed since the node started.
    pub fn failures(&self) -> u64 {
        self.state().failures
    }

    /// Why new sessions are refused now: the last check failed.
    pub fn refusal(&self) -> Option<String> {
        let st = self.state();
        let last = st.last.as_ref()?;
        (!last.ok).then(|| {
            format!(
                "the node's enforcement self-check at {} failed ({}): new sessions are refused until one passes",
                last.at,
                last.failures()
            )
        })
    }

    fn check(&self, dp: &Datapath) -> Result<[Outcome; LINES], CanaryError> {
        let lsm = *dp.socket_families() == SocketFamilies::Enforced;
        if self.cgroup.exists() {
            remove(&self.cgroup);
        }
        let cgroup = Cgroup::create(&self.cgroup)?;
        let result = (|| {
            dp.set_identity(CANARY_IDENTITY, IdentityStatus::Active, Mode::Enforce)?;
            dp.bind(&cgroup, CANARY_IDENTITY, None)?;
            run_canary(&cgroup, lsm)
        })();
        // The binding goes with its cgroup, whatever happened.
        if let Err(e) = dp.unbind(&cgroup) {
            tracing::warn!(error = %e, "unbinding the self-check's cgroup");
        }
        remove(&self.cgroup);
        result
    }
}

/// Kills whatever is left in the canary's cgroup and removes it.
fn remove(path: &std::path::Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    // The kill is asynchronous: the directory goes once the cgroup is empty.
    for _ in 0..200 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    tracing::warn!(cgroup = %path.display(), "the self-check's cgroup could not be removed");
}

/// What the child writes back per act: 0 refused with EPERM, [`DONE`], [`NO_FAMILY`], else
/// the errno it got instead.
const DONE: i32 = -1;
/// The kernel has no such socket family (IPv6 or packet sockets compiled out or disabled):
/// nothing to refuse.
const NO_FAMILY: i32 = -2;
/// A line not in force here (the BPF LSM ones where it does not load).
const NOT_TRIED: i32 = -3;

/// How long the parent waits for the child's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Forks the canary into `cgroup` and reads its four answers.
fn run_canary(cgroup: &Cgroup, lsm: bool) -> Result<[Outcome; LINES], CanaryError> {
    let io = |what| move |source| CanaryError::Io { what, source };
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .map_err(io("opening the canary cgroup's cgroup.procs"))?;
    let (ours, theirs) = socketpair().map_err(io("socketpair"))?;
    // The socket the receipt line must refuse, queued before the child exists: a UDP socket
    // bound to a loopback port and connected to nothing.
    let handed = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io("the handed socket"))?;
    send_fd(&ours, handed.as_raw_fd()).map_err(io("handing the socket over"))?;
    drop(handed);
    // SAFETY: the child runs only async-signal-safe system calls on memory prepared before
    // the fork, then _exit()s (see `canary_child`).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        canary_child(procs.as_raw_fd(), theirs.as_raw_fd(), lsm);
    }
    drop(theirs);
    drop(procs);
    let answer = read_answer(&ours);
    if answer.is_err() {
        // SAFETY: our own child, not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let words = answer?;
    if words[0] == SETUP_FAILED {
        return Err(CanaryError::Setup(
            SETUP_STEPS[words[1] as usize % SETUP_STEPS.len()],
        ));
    }
    const DONE_AS: [&str; LINES] = [
        "connected",
        "connected",
        "sent",
        "sent",
        "set",
        "created",
        "taken",
    ];
    Ok(std::array::from_fn(|i| match words[i] {
        0 => Outcome::Refused,
        DONE => Outcome::NotRefused(DONE_AS[i].to_owned()),
        NO_FAMILY | NOT_TRIED => Outcome::NotChecked,
        e => Outcome::NotRefused(io::Error::from_raw_os_error(e).to_string()),
    }))
}

/// The child's first word when it could not set itself up; the second says which step.
/// (The BPF LSM acts are tried only where the line is in force: elsewhere the kernel lets
/// them through by design, which `status` says under `socket_families`.)
const SETUP_FAILED: i32 = i32::MIN;
const SETUP_STEPS: [&str; 2] = [
    "move into its cgroup",
    "make a network namespace of its own",
];

fn read_answer(ours: &OwnedFd) -> Result<[i32; LINES], CanaryError> {
    let mut pfd = libc::pollfd {
        fd: ours.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = ANSWER_WITHIN.as_millis() as i32;
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return Err(CanaryError::Silent(ANSWER_WITHIN));
    }
    let mut buf = [0u8; LINES * 4];
    // SAFETY: valid fd and buffer.
    let n = unsafe { libc::read(ours.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n != buf.len() as isize {
        return Err(CanaryError::Silent(ANSWER_WITHIN));
    }
    let mut words = [0i32; LINES];
    for (i, w) in words.iter_mut().enumerate() {
        *w = i32::from_ne_bytes(buf[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    }
    Ok(words)
}

/// The canary itself, in the forked child: only async-signal-safe system calls (the parent
/// has threads whose locks the child inherits held), no allocation, then `_exit`.
fn canary_child(procs: RawFd, chan: RawFd, lsm: bool) -> ! {
    // SAFETY: system calls on the child's own descriptors and stack.
    unsafe {
        let answer = |words: [i32; LINES]| -> ! {
            let mut buf = [0u8; LINES * 4];
            let mut i = 0;
            while i < LINES {
                let b = words[i].to_ne_bytes();
                buf[i * 4] = b[0];
                buf[i * 4 + 1] = b[1];
                buf[i * 4 + 2] = b[2];
                buf[i * 4 + 3] = b[3];
                i += 1;
            }
            libc::write(chan, buf.as_ptr().cast(), buf.len());
            libc::_exit(0)
        };
        // "0": the writing process itself.
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            answer([SETUP_FAILED, 0, 0, 0, 0, 0, 0]);
        }
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            answer([SETUP_FAILED, 1, 0, 0, 0, 0, 0]);
        }
        let mut words = [NOT_TRIED; LINES];
        // 192.0.2.1:9 and [2001:db8::1]:9: documentation addresses, in a namespace with no
        // route anywhere. A UDP connect sends nothing.
        let mut v4: libc::sockaddr_in = core::mem::zeroed();
        v4.sin_family = libc::AF_INET as libc::sa_family_t;
        v4.sin_port = 9u16.to_be();
        v4.sin_addr.s_addr = u32::from_be_bytes([192, 0, 2, 1]).to_be();
        let v4_len = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        words[0] = try_connect(libc::AF_INET, (&raw const v4).cast(), v4_len, false);
        words[2] = try_connect(libc::AF_INET, (&raw const v4).cast(), v4_len, true);
        words[4] = try_freebind();
        let mut v6: libc::sockaddr_in6 = core::mem::zeroed();
        v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        v6.sin6_port = 9u16.to_be();
        v6.sin6_addr.s6_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let v6_len = core::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        words[1] = try_connect(libc::AF_INET6, (&raw const v6).cast(), v6_len, false);
        words[3] = try_connect(libc::AF_INET6, (&raw const v6).cast(), v6_len, true);
        if lsm {
            // A packet socket that hears nothing (protocol 0).
            let s = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            words[5] = if s >= 0 {
                libc::close(s);
                DONE
            } else {
                socket_error()
            };
            words[6] = try_receive(chan);
        }
        answer(words)
    }
}

/// 0 when the last call failed with EPERM, else its errno.
///
/// # Safety
/// Reads this thread's errno.
unsafe fn errno_or_refused() -> i32 {
    // SAFETY: the calling thread's errno.
    let e = unsafe { *libc::__errno_location() };
    if e == libc::EPERM { 0 } else { e }
}

/// [`errno_or_refused`] after a failed `socket()`, where a family the kernel lacks is
/// [`NO_FAMILY`].
///
/// # Safety
/// Reads this thread's errno.
unsafe fn socket_error() -> i32 {
    // SAFETY: as above.
    match unsafe { errno_or_refused() } {
        libc::EAFNOSUPPORT => NO_FAMILY,
        e => e,
    }
}

/// `connect()`, or with `send` one `sendto()` of a byte, on a fresh UDP socket.
///
/// # Safety
/// `addr` points to a socket address of `len` bytes.
unsafe fn try_connect(
    family: i32,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
    send: bool,
) -> i32 {
    // SAFETY: plain system calls; the caller vouches for the address.
    unsafe {
        let s = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            // Refused at creation is not what the connect line does: a governed task may make
            // UDP sockets.
            return match socket_error() {
                0 => libc::EPERM,
                e => e,
            };
        }
        let rc = if send {
            let byte = 0u8;
            libc::sendto(s, (&raw const byte).cast(), 1, 0, addr, len) as i32
        } else {
            libc::connect(s, addr, len)
        };
        let w = if rc >= 0 { DONE } else { errno_or_refused() };
        libc::close(s);
        w
    }
}

/// `IP_FREEBIND` on a fresh UDP socket.
///
/// # Safety
/// Plain system calls.
unsafe fn try_freebind() -> i32 {
    // SAFETY: plain system calls on a socket of our own.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return match socket_error() {
                0 => libc::EPERM,
                e => e,
            };
        }
        let on: i32 = 1;
        let rc = libc::setsockopt(
            s,
            libc::SOL_IP,
            libc::IP_FREEBIND,
            (&raw const on).cast(),
            core::mem::size_of::<i32>() as libc::socklen_t,
        );
        let w = if rc == 0 { DONE } else { errno_or_refused() };
        libc::close(s);
        w
    }
}

/// Takes the socket the parent queued: 0 when the receipt line refused it (the message comes
/// without it, cut short), -1 when it arrived.
///
/// # Safety
/// `chan` is the child's end of the unix socket pair.
unsafe fn try_receive(chan: RawFd) -> i32 {
    // SAFETY: a message header over buffers on this stack.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = core::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = core::mem::size_of_val(&control);
        let n = libc::recvmsg(
            chan,
            &raw mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        );
        if n < 0 {
            // Nothing queued: the parent's message is gone, which is no refusal.
            return match errno_or_refused() {
                0 => libc::EPERM,
                e => e,
            };
        }
        let mut taken = false;
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = core::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                libc::close(fd);
                taken = true;
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
        if taken { DONE } else { 0 }
    }
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a valid array of two descriptors.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors, owned from here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Queues `fd` on `chan` with one data byte.
fn send_fd(chan: &OwnedFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [1u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 4];
    // SAFETY: a message header over buffers on this stack, sized for one descriptor.
    unsafe {
        let mut msg: libc::msghdr = core::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        core::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        if libc::sendmsg(chan.as_raw_fd(), &raw const msg, 0) != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_fails_on_any_line_that_let_its_act_through_and_says_which() {
        let all = |o: Outcome| std::array::from_fn(|_| o.clone());
        let passed = SelfCheck::of("t".into(), all(Outcome::Refused), None);
        assert!(passed.ok);
        assert_eq!(passed.failures(), "");
        // Lines not in force here pass: status says so under socket_families.
        assert!(SelfCheck::of("t".into(), all(Outcome::NotChecked), None).ok);
        let mut outcomes: [Outcome; LINES] = all(Outcome::Refused);
        outcomes[2] = Outcome::NotRefused("sent".into());
        outcomes[6] = Outcome::NotRefused("taken".into());
        let failed = SelfCheck::of("t".into(), outcomes, None);
        assert!(!failed.ok);
        assert_eq!(failed.failures(), "sendmsg4 (sent), receipt (taken)");
        let broken = SelfCheck::of(
            "t".into(),
            all(Outcome::NotChecked),
            Some("the canary process did not answer within 5s".into()),
        );
        assert!(!broken.ok);
        assert_eq!(
            broken.failures(),
            "the canary process did not answer within 5s"
        );
    }
}
