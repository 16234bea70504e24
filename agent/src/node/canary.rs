//! The node's self-check: that the kernel lines refuse, not only that they loaded.
//!
//! A program can be loaded and attached and still let everything through: a kernel bug (one
//! 6.1 run saw the receipt line refuse nothing), a link someone detached, a line the kernel
//! no longer runs. At start and every [`EVERY`] the node checks that every pinned link still
//! runs on the attach point, and forks a canary process into a cgroup of its own, bound to a
//! number of the identity table that no identity gets and that has no rules, in a network
//! namespace of its own (so nothing it tries can leave the host even where a line fails
//! open), and has it do what each line must refuse. A detached link or a line that lets its
//! act through fails the check: `status` says which, the node logs an error, counts it in
//! `agentwall_selfcheck_failures_total`, and refuses new launches and enrollments until a
//! check passes. A check that could not run (no fork, no cgroup, no answer) is not a
//! failure of a line: it is said as such and tried again after [`RETRY`]; only
//! [`ERRORS_REFUSE`] of them in a row refuse sessions (a node that cannot check does not
//! vouch for its lines).
//!
//! The canary's own records are the node's, not an agent's: they are not reported.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{Cgroup, CgroupError},
    datapath::{Datapath, DatapathError, SocketFamilies},
    policy::{IdentityStatus, Mode},
};

/// How often the check runs after one that ran.
pub const EVERY: Duration = Duration::from_secs(300);

/// How soon a check that could not run is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// Checks in a row that could not run before new sessions are refused.
pub const ERRORS_REFUSE: u32 = 3;

/// The canary's cgroup, beside the agents' (`agentwall/`) under the attach point.
pub const CGROUP_NAME: &str = "agentwall-canary";

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("binding the canary's cgroup: {0}")]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Number(#[from] super::registry::RegistryError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("the canary process did not answer within {0:?}")]
    Silent(Duration),
    #[error("the canary process could not {0}")]
    Setup(&'static str),
    #[error("the canary process (pid {0}) did not die when killed")]
    Straggler(libc::pid_t),
}

/// What one line did with the act the canary tried.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Refused with EPERM, as the line refuses.
    Refused,
    /// Not refused by the line: what the canary saw instead.
    NotRefused(String),
    /// The line is not in force here (status says why, under `socket_families`), or the
    /// kernel lacks the socket family tried. What a node's answer that has no such line
    /// (an older node's) reads as.
    #[default]
    NotChecked,
    /// The act could not be tried (the canary could not make its socket, say): no verdict.
    Error(String),
}

/// One self-check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfCheck {
    /// When it ran (RFC 3339).
    pub at: String,
    /// Whether every line in force refused what it must and every link runs.
    pub ok: bool,
    /// Programs whose pinned link runs on the attach point no longer (detached).
    #[serde(default)]
    pub detached: Vec<String>,
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
    /// A raw IPv4 socket (the cgroup `sock_create` hook).
    pub raw: Outcome,
    /// A packet socket (the BPF LSM `socket_create` line).
    pub families: Outcome,
    /// A UDP socket bound to the wildcard and connected to nothing, made by the canary before
    /// it joined its cgroup and taken over a unix socket after (the receipt line,
    /// `file_receive`).
    pub receipt: Outcome,
    /// `io_uring_setup` (the BPF LSM ring line; the canary's number refuses io_uring). Not
    /// checked where the canary could not make a ring before it joined its cgroup (the host
    /// refuses io_uring to it, `kernel.io_uring_disabled`, a filter, or has none).
    #[serde(default)]
    pub ring: Outcome,
    /// Why the check itself could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The acts the canary tries, one per line, in [`SelfCheck::lines`]' order.
const LINES: usize = 9;

impl SelfCheck {
    fn lines(&self) -> [(&'static str, &Outcome); LINES] {
        [
            ("connect4", &self.connect4),
            ("connect6", &self.connect6),
            ("sendmsg4", &self.sendmsg4),
            ("sendmsg6", &self.sendmsg6),
            ("sockopt", &self.sockopt),
            ("raw", &self.raw),
            ("families", &self.families),
            ("receipt", &self.receipt),
            ("ring", &self.ring),
        ]
    }

    fn of(
        at: String,
        detached: Vec<String>,
        outcomes: [Outcome; LINES],
        error: Option<String>,
    ) -> Self {
        let [
            connect4,
            connect6,
            sendmsg4,
            sendmsg6,
            sockopt,
            raw,
            families,
            receipt,
            ring,
        ] = outcomes;
        let mut c = Self {
            at,
            ok: false,
            detached,
            connect4,
            connect6,
            sendmsg4,
            sendmsg6,
            sockopt,
            raw,
            families,
            receipt,
            ring,
            error,
        };
        c.ok = c.error.is_none()
            && !c.failed_line()
            && !c
                .lines()
                .iter()
                .any(|(_, o)| matches!(o, Outcome::Error(_)));
        c
    }

    /// A line found not enforcing: a detached link, or an act let through.
    pub fn failed_line(&self) -> bool {
        !self.detached.is_empty()
            || self
                .lines()
                .iter()
                .any(|(_, o)| matches!(o, Outcome::NotRefused(_)))
    }

    /// What failed, for messages: "connect4 (Network is unreachable ...), link aw_egress
    /// detached", or why the check could not run.
    pub fn failures(&self) -> String {
        let mut said: Vec<String> = self
            .detached
            .iter()
            .map(|p| format!("link {p} detached"))
            .collect();
        for (line, o) in self.lines() {
            match o {
                Outcome::NotRefused(what) => said.push(format!("{line} ({what})")),
                Outcome::Error(what) => said.push(format!("{line} could not be tried ({what})")),
                _ => {}
            }
        }
        if let Some(e) = &self.error {
            said.push(format!("the check could not run: {e}"));
        }
        said.join(", ")
    }
}

/// The last check and when the next is due.
pub struct Canary {
    cgroup: PathBuf,
    state: Mutex<State>,
    /// One check at a time: the API's and the schedule's share the cgroup.
    running: Mutex<()>,
    /// The number the canary is bound to (0 until the first check): its records are dropped.
    number: AtomicU32,
}

struct State {
    last: Option<SelfCheck>,
    /// The last check that found a line not enforcing, until one passes: a check that
    /// could not run since says nothing of that line.
    failed: Option<SelfCheck>,
    next: Instant,
    failures: u64,
    /// Checks in a row that could not run.
    errors: u32,
    /// A canary that did not die when killed (uninterruptible sleep): reaped later.
    stragglers: Vec<libc::pid_t>,
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
                failed: None,
                next: Instant::now(),
                failures: 0,
                errors: 0,
                stragglers: Vec::new(),
            }),
            running: Mutex::new(()),
            number: AtomicU32::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a record of identity `number` is the canary's own.
    pub fn owns(&self, number: u32) -> bool {
        number != 0 && number == self.number.load(Ordering::Relaxed)
    }

    /// Runs a check if one is due and none is running.
    pub fn run_if_due(&self, dp: &Datapath, number: impl FnOnce() -> Result<u32, CanaryError>) {
        if Instant::now() < self.state().next {
            return;
        }
        let Ok(one) = self.running.try_lock() else {
            return;
        };
        self.run_locked(dp, number, one);
    }

    /// Runs a check now (after one that is running) and keeps its result. `number`: the
    /// identity table's number for the canary.
    pub fn run(
        &self,
        dp: &Datapath,
        number: impl FnOnce() -> Result<u32, CanaryError>,
    ) -> SelfCheck {
        let one = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.run_locked(dp, number, one)
    }

    fn run_locked(
        &self,
        dp: &Datapath,
        number: impl FnOnce() -> Result<u32, CanaryError>,
        _one: std::sync::MutexGuard<'_, ()>,
    ) -> SelfCheck {
        reap(&mut self.state().stragglers);
        let at = crate::clock::now_rfc3339();
        let detached: Vec<String> = dp.detached_links().into_iter().map(str::to_owned).collect();
        let checked = number().and_then(|n| {
            self.number.store(n, Ordering::Relaxed);
            self.check(dp, n)
        });
        if let Err(CanaryError::Straggler(pid)) = &checked {
            self.state().stragglers.push(*pid);
        }
        let check = match checked {
            Ok(outcomes) => SelfCheck::of(at, detached, outcomes, None),
            Err(e) => SelfCheck::of(
                at,
                detached,
                std::array::from_fn(|_| Outcome::NotChecked),
                Some(e.to_string()),
            ),
        };
        let mut st = self.state();
        let could_not = !check.ok && !check.failed_line();
        let was_refusing = refuses(st.failed.as_ref(), st.errors);
        st.errors = if could_not { st.errors + 1 } else { 0 };
        if check.failed_line() {
            st.failures += 1;
            tracing::error!(
                failed = %check.failures(),
                "enforcement self-check failed: a kernel line does not refuse what it must; new launches and enrollments are refused until a check passes"
            );
        } else if could_not {
            tracing::warn!(
                problem = %check.failures(),
                errors_in_a_row = st.errors,
                "the enforcement self-check could not run; trying again soon"
            );
        } else if was_refusing {
            tracing::info!("the self-check passes again: launches and enrollments resume");
        }
        st.next = Instant::now() + if could_not { RETRY } else { EVERY };
        if check.ok {
            st.failed = None;
        } else if check.failed_line() {
            st.failed = Some(check.clone());
        }
        st.last = Some(check.clone());
        check
    }

    /// The last check, if any ran.
    pub fn last(&self) -> Option<SelfCheck> {
        self.state().last.clone()
    }

    /// Checks that found a line not enforcing since the node started.
    pub fn failures(&self) -> u64 {
        self.state().failures
    }

    /// Why new sessions are refused now: the last check found a line not enforcing, or
    /// [`ERRORS_REFUSE`] checks in a row could not run.
    pub fn refusal(&self) -> Option<String> {
        let st = self.state();
        if !refuses(st.failed.as_ref(), st.errors) {
            return None;
        }
        let said = st.failed.as_ref().or(st.last.as_ref())?;
        Some(format!(
            "the node's enforcement self-check at {} failed ({}): new sessions are refused until one passes",
            said.at,
            said.failures()
        ))
    }

    fn check(&self, dp: &Datapath, number: u32) -> Result<[Outcome; LINES], CanaryError> {
        let lsm = *dp.socket_families() == SocketFamilies::Enforced;
        if self.cgroup.exists() {
            remove(&self.cgroup);
        }
        let cgroup = Cgroup::create(&self.cgroup)?;
        let result = (|| {
            dp.set_identity(number, IdentityStatus::Active, Mode::Enforce)?;
            dp.bind(&cgroup, number, None)?;
            run_canary(&cgroup, lsm)
        })();
        // The binding goes with its cgroup, whatever happened; its folded counts too, which
        // would otherwise come back as records of a cgroup nobody knows.
        if let Err(e) = dp.unbind(&cgroup) {
            tracing::warn!(error = %e, "unbinding the self-check's cgroup");
        }
        if let Err(e) = dp.forget_counts(cgroup.id()) {
            tracing::warn!(error = %e, "forgetting the self-check's folded counts");
        }
        remove(&self.cgroup);
        result
    }
}

/// Sessions are refused from a check that found a line not enforcing (`failed`) until one
/// passes, and after [`ERRORS_REFUSE`] checks in a row that could not run.
fn refuses(failed: Option<&SelfCheck>, errors: u32) -> bool {
    failed.is_some() || errors >= ERRORS_REFUSE
}

/// Reaps canaries that did not die in time before.
fn reap(stragglers: &mut Vec<libc::pid_t>) {
    // SAFETY: our own children; WNOHANG never blocks.
    stragglers
        .retain(|&pid| unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == 0);
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

/// What the child writes back per act: 0 refused with EPERM, [`DONE`], [`NO_FAMILY`],
/// [`NOT_TRIED`], a positive errno the act got instead, or an errno + [`TRY_FAILED`] when
/// its socket could not be made.
const DONE: i32 = -1;
/// The kernel has no such socket family (IPv6 or packet sockets compiled out or disabled):
/// nothing to refuse.
const NO_FAMILY: i32 = -2;
/// A line not in force here (the BPF LSM ones where it does not load).
const NOT_TRIED: i32 = -3;
/// The handed socket did not arrive, yet the receive was not cut short: not the receipt
/// line's doing.
const LOST: i32 = -4;
/// Added to an errno from making the act's own socket: the act could not be tried.
const TRY_FAILED: i32 = 1 << 16;

/// How long the parent waits for the child's answer, then for it to die once killed.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
const DEATH_WITHIN: Duration = Duration::from_secs(2);

/// Forks the canary into `cgroup` and reads its answers.
fn run_canary(cgroup: &Cgroup, lsm: bool) -> Result<[Outcome; LINES], CanaryError> {
    let io = |what| move |source| CanaryError::Io { what, source };
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .map_err(io("opening the canary cgroup's cgroup.procs"))?;
    let (ours, theirs) = socketpair().map_err(io("socketpair"))?;
    // Where the host refuses io_uring to every process, a refusal says nothing of the line
    // (the canary also tries one before it is governed).
    let rings = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map_or(true, |v| v.trim() != "2");
    // Signals stay blocked across the fork: the child must never run the parent's handlers
    // (tokio's write to the runtime's own pipe), and resets them before unblocking.
    // SAFETY: sigset operations on stack values.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // SAFETY: the child runs only async-signal-safe system calls on memory prepared before
    // the fork, then _exit()s (see `canary_child`).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        canary_child(procs.as_raw_fd(), theirs.as_raw_fd(), lsm, rings);
    }
    // SAFETY: restores this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(io("fork")(io::Error::last_os_error()));
    }
    drop(theirs);
    drop(procs);
    let answer = read_answer(&ours);
    if answer.is_err() {
        // SAFETY: our own child, not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if !wait_for(pid, DEATH_WITHIN) {
        return Err(CanaryError::Straggler(pid));
    }
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
        "created",
        "taken",
        "made",
    ];
    let errno = |e: i32| io::Error::from_raw_os_error(e).to_string();
    Ok(std::array::from_fn(|i| match words[i] {
        0 => Outcome::Refused,
        DONE => Outcome::NotRefused(DONE_AS[i].to_owned()),
        NO_FAMILY | NOT_TRIED => Outcome::NotChecked,
        LOST => {
            Outcome::Error("the handed socket did not arrive, the receive not cut short".into())
        }
        e if e >= TRY_FAILED => Outcome::Error(format!("its socket: {}", errno(e - TRY_FAILED))),
        e => Outcome::NotRefused(errno(e)),
    }))
}

/// Reaps `pid`, waiting at most `within`; false if it is still there (it stays a straggler).
fn wait_for(pid: libc::pid_t, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        // SAFETY: our own child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if r != 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The child's first word when it could not set itself up; the second says which step.
/// (The BPF LSM acts are tried only where the line is in force: elsewhere the kernel lets
/// them through by design, which `status` says under `socket_families`.)
const SETUP_FAILED: i32 = i32::MIN;
const SETUP_STEPS: [&str; 3] = [
    "move into its cgroup",
    "make a network namespace of its own",
    "make the socket it hands itself",
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
    let mut words = [0i32; LINES];
    // SAFETY: valid fd; the buffer is the words' own bytes.
    let n = unsafe {
        libc::read(
            ours.as_raw_fd(),
            words.as_mut_ptr().cast(),
            std::mem::size_of_val(&words),
        )
    };
    if n != std::mem::size_of_val(&words) as isize {
        return Err(CanaryError::Silent(ANSWER_WITHIN));
    }
    Ok(words)
}

/// The canary itself, in the forked child: only async-signal-safe system calls (the parent
/// has threads whose locks the child inherits held), no allocation, then `_exit`.
fn canary_child(procs: RawFd, chan: RawFd, lsm: bool, rings: bool) -> ! {
    // SAFETY: system calls on the child's own descriptors, stack and signal state.
    unsafe {
        // The parent's handlers are not the child's: defaults, then unblocked.
        let mut sig = 1;
        while sig < 65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
            sig += 1;
        }
        let mut none: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, core::ptr::null_mut());
        // Only its own two descriptors (no exec follows, so close-on-exec closes nothing).
        let (lo, hi) = (procs.min(chan), procs.max(chan));
        if lo > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (lo - 1) as u32, 0u32);
        }
        if hi > lo + 1 {
            libc::syscall(
                libc::SYS_close_range,
                (lo + 1) as u32,
                (hi - 1) as u32,
                0u32,
            );
        }
        libc::syscall(libc::SYS_close_range, (hi + 1) as u32, u32::MAX, 0u32);
        let answer = |words: [i32; LINES]| -> ! {
            libc::write(chan, words.as_ptr().cast(), core::mem::size_of_val(&words));
            libc::_exit(0)
        };
        let mut setup_failed = [0i32; LINES];
        setup_failed[0] = SETUP_FAILED;
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            setup_failed[1] = 1;
            answer(setup_failed);
        }
        // The socket the receipt line must refuse, made while the canary is not yet governed,
        // in its own namespace (no one else's ports to compete for): UDP, bound to the
        // wildcard, connected to nothing; queued to itself on a pair of its own.
        let mut pair = [-1i32; 2];
        if lsm {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let mut any: libc::sockaddr_in = core::mem::zeroed();
            any.sin_family = libc::AF_INET as libc::sa_family_t;
            let ready = s >= 0
                && libc::bind(
                    s,
                    (&raw const any).cast(),
                    core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                ) == 0
                && libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    0,
                    pair.as_mut_ptr(),
                ) == 0
                && send_fd(pair[0], s) == 0;
            if !ready {
                setup_failed[1] = 2;
                answer(setup_failed);
            }
            libc::close(s);
        }
        // Ungoverned yet, a ring it cannot make (a seccomp filter the node runs under,
        // `io_uring_disabled=1` without CAP_SYS_ADMIN, another LSM) says nothing of the line.
        let rings = lsm && rings && try_ring() == DONE;
        // "0": the writing process itself.
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            answer(setup_failed);
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
        let mut v6: libc::sockaddr_in6 = core::mem::zeroed();
        v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        v6.sin6_port = 9u16.to_be();
        v6.sin6_addr.s6_addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let v6_len = core::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        words[1] = try_connect(libc::AF_INET6, (&raw const v6).cast(), v6_len, false);
        words[3] = try_connect(libc::AF_INET6, (&raw const v6).cast(), v6_len, true);
        words[4] = try_freebind();
        // A raw socket that hears nothing it did not ask for (ICMP).
        words[5] = try_create(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if lsm {
            // A packet socket that hears nothing (protocol 0).
            words[6] = try_create(libc::AF_PACKET, libc::SOCK_DGRAM, 0);
            words[7] = try_receive(pair[1]);
            if rings {
                words[8] = try_ring();
            }
        }
        answer(words)
    }
}

/// Making an io_uring instance, which the ring line must refuse: 0 refused, [`DONE`] made,
/// [`NO_FAMILY`] where the kernel has no io_uring, or the errno it got instead.
///
/// # Safety
/// Plain system calls.
unsafe fn try_ring() -> i32 {
    // SAFETY: io_uring_setup with a zeroed `struct io_uring_params` (120 bytes) on the stack.
    unsafe {
        let mut params = [0u32; 30];
        let fd = libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr());
        if fd >= 0 {
            libc::close(fd as i32);
            return DONE;
        }
        match errno_or_refused() {
            libc::ENOSYS => NO_FAMILY,
            e => e,
        }
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

/// A socket the act needs, or the word that says it could not be made.
///
/// # Safety
/// Plain system calls.
unsafe fn own_socket(family: i32, ty: i32, protocol: i32) -> Result<i32, i32> {
    // SAFETY: a plain system call; errno read right after.
    unsafe {
        let s = libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol);
        if s >= 0 {
            return Ok(s);
        }
        Err(match *libc::__errno_location() {
            libc::EAFNOSUPPORT => NO_FAMILY,
            e => e + TRY_FAILED,
        })
    }
}

/// Making a socket the line must refuse: 0 refused, [`DONE`] made, [`NO_FAMILY`], or the
/// errno it got instead.
///
/// # Safety
/// Plain system calls.
unsafe fn try_create(family: i32, ty: i32, protocol: i32) -> i32 {
    // SAFETY: plain system calls.
    unsafe {
        let s = libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol);
        if s >= 0 {
            libc::close(s);
            return DONE;
        }
        match errno_or_refused() {
            libc::EAFNOSUPPORT => NO_FAMILY,
            e => e,
        }
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
        let s = match own_socket(family, libc::SOCK_DGRAM, 0) {
            Ok(s) => s,
            Err(word) => return word,
        };
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
        let s = match own_socket(libc::AF_INET, libc::SOCK_DGRAM, 0) {
            Ok(s) => s,
            Err(word) => return word,
        };
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

/// Takes the socket queued on `chan`: 0 when the receipt line refused it (it does not come,
/// and the receive says it was cut short), [`DONE`] when it came, [`LOST`] when it did not
/// come for another reason.
///
/// # Safety
/// `chan` is a unix socket of the child's.
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
            return LOST;
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
        if taken {
            DONE
        } else if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            0
        } else {
            LOST
        }
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

/// Queues `fd` on `chan` with one data byte: 0, or -1. Async-signal-safe (the child calls
/// it).
///
/// # Safety
/// Plain system calls on the descriptors given.
unsafe fn send_fd(chan: RawFd, fd: RawFd) -> i32 {
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
        if libc::sendmsg(chan, &raw const msg, 0) == 1 {
            0
        } else {
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_fails_on_a_line_that_let_its_act_through_and_says_which() {
        let all = |o: Outcome| std::array::from_fn(|_| o.clone());
        let passed = SelfCheck::of("t".into(), vec![], all(Outcome::Refused), None);
        assert!(passed.ok && !passed.failed_line());
        assert_eq!(passed.failures(), "");
        // Lines not in force here pass: status says so under socket_families.
        assert!(SelfCheck::of("t".into(), vec![], all(Outcome::NotChecked), None).ok);
        let mut outcomes: [Outcome; LINES] = all(Outcome::Refused);
        outcomes[2] = Outcome::NotRefused("sent".into());
        outcomes[7] = Outcome::NotRefused("taken".into());
        let failed = SelfCheck::of("t".into(), vec!["aw_egress".into()], outcomes, None);
        assert!(!failed.ok && failed.failed_line());
        assert_eq!(
            failed.failures(),
            "link aw_egress detached, sendmsg4 (sent), receipt (taken)"
        );
        // Could not run, or one act could not be tried: not ok, yet no line failed.
        let broken = SelfCheck::of(
            "t".into(),
            vec![],
            all(Outcome::NotChecked),
            Some("the canary process did not answer within 5s".into()),
        );
        assert!(!broken.ok && !broken.failed_line());
        assert_eq!(
            broken.failures(),
            "the check could not run: the canary process did not answer within 5s"
        );
        let mut outcomes: [Outcome; LINES] = all(Outcome::Refused);
        outcomes[0] = Outcome::Error("its socket: Too many open files".into());
        let partial = SelfCheck::of("t".into(), vec![], outcomes, None);
        assert!(!partial.ok && !partial.failed_line());
        // Sessions: refused from a failed line on (a check that could not run since leaves
        // that standing), and after three checks in a row that could not run.
        assert!(refuses(Some(&failed), 0));
        assert!(!refuses(None, ERRORS_REFUSE - 1));
        assert!(refuses(None, ERRORS_REFUSE));
    }
}
