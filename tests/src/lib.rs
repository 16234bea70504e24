//! Harness for agentwall's privileged tests: every test gets its own cgroup subtree (the attach
//! point), its own bpffs pin directory, and probes in their own network namespaces; guards tear
//! all of it down, also when a test panics.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

pub mod cp;
pub mod node;
pub mod ocsf;
pub mod pki;
pub mod soak;
pub mod wire;
pub mod workload;

use agentwall::{
    cgroup::{Cgroup, Cgroup2Mount},
    datapath::{self, DatapathConfig},
};

/// Privileged tests must run as root; without it they fail loudly instead of skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "agentwall's kernel tests need root (cgroups, bpffs, network namespaces); run `cargo xtask test` as root"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private cgroup subtree and bpffs pin directory for one test.
pub struct TestEnv {
    pub root: Cgroup,
    pub bpffs_dir: PathBuf,
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        require_root();
        let mount = Cgroup2Mount::discover().expect("cgroup2 mount");
        let id = unique(name);
        let root = Cgroup::create(mount.mount_point.join("agentwall-test").join(&id))
            .expect("create test cgroup");
        Self {
            root,
            bpffs_dir: PathBuf::from("/sys/fs/bpf/agentwall-test").join(id),
        }
    }

    pub fn config(&self) -> DatapathConfig {
        DatapathConfig::new(self.root.path(), &self.bpffs_dir)
    }

    /// A cgroup below the test's attach point (created if missing).
    pub fn cgroup(&self, rel: &str) -> Cgroup {
        Cgroup::create(self.root.path().join(rel)).expect("create cgroup")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = datapath::teardown(&self.bpffs_dir);
        // A teardown keeps the pin directory's parent (see `remove_pins`); the test's goes.
        let _ = std::fs::remove_dir(&self.bpffs_dir);
        kill_tree(self.root.path());
        let _ = self.root.remove_tree();
        // The shared parents go too once the last test has left them (best effort: another
        // test may still be using them).
        for parent in [self.root.path().parent(), self.bpffs_dir.parent()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A named network namespace made for one test (`ip netns add`), with `lo` up; deleted on
/// drop. Outside addresses are unreachable from inside it.
pub struct NetNs {
    pub name: String,
    file: std::fs::File,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        require_root();
        let name = unique(&format!("aw-{tag}"));
        run_ip(&["netns", "add", &name]);
        let ns = Self {
            file: std::fs::File::open(format!("/run/netns/{name}")).expect("open netns"),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all);
    }

    /// Runs `f` on a thread inside this namespace (sockets it opens belong there).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd as _;
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only; the fd is open for the call.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    panic!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .expect("thread in namespace")
        })
    }

    /// Makes `cmd` start inside this namespace.
    pub fn enter(&self, cmd: &mut Command) {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the forked child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's `ip` is needed by the tests");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// aw-dns inside the namespace; killed on drop.
pub struct DnsServer(Child);

impl DnsServer {
    /// Serves `zone` (see aw-dns) on `listen` (UDP and TCP) inside `ns`.
    pub fn start(ns: &NetNs, listen: &str, zone: &Path) -> Self {
        Self::start_in(Some(ns), listen, zone)
    }

    /// As [`DnsServer::start`]; with no namespace, in this one (loopback addresses only).
    pub fn start_in(ns: Option<&NetNs>, listen: &str, zone: &Path) -> Self {
        let mut cmd = Command::new(bin_path("aw-dns"));
        cmd.arg(listen).arg(zone).stdout(Stdio::piped());
        if let Some(ns) = ns {
            ns.enter(&mut cmd);
        }
        let mut child = cmd.spawn().expect("spawn aw-dns");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "aw-dns did not start");
        Self(child)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node routes its IPv6 DNS proxy prefix to `lo` on this host when agents run in
/// namespaces of their own; this puts the host back as it was (the route removed unless it
/// was there before).
pub struct ProxyRouteGuard(bool);

impl ProxyRouteGuard {
    pub fn new() -> Self {
        let routed_before = !Command::new("ip")
            .args([
                "-6",
                "route",
                "show",
                "table",
                "local",
                "fd61:7761:6c6c::/96",
            ])
            .output()
            .unwrap()
            .stdout
            .is_empty();
        Self(routed_before)
    }
}

impl Default for ProxyRouteGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ProxyRouteGuard {
    fn drop(&mut self) {
        if !self.0 {
            let _ = agentwall::dns::route::remove_local_route();
        }
    }
}

/// `strace -f` running `sleep 600`, both started in a cgroup (a unit with a process under a
/// debugger, as users have them), once strace traces its child. Killed and reaped on drop.
pub struct Straced {
    child: Child,
    pub tracer: u32,
    pub tracee: u32,
}

impl Straced {
    pub fn start(cgroup: &Cgroup) -> Self {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.path().join("cgroup.procs"))
            .expect("the cgroup's cgroup.procs");
        let fd = procs.as_raw_fd();
        let mut c = Command::new("strace");
        c.args(["-f", "-qq", "-o", "/dev/null", "sleep", "600"])
            .stdin(Stdio::null());
        // SAFETY: one write between fork and exec: "0" moves the writer into the cgroup.
        unsafe {
            c.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("strace must be installed for the tests");
        let tracer = child.id();
        let tracee = node::eventually(
            "strace's tracee",
            std::time::Duration::from_secs(10),
            || {
                let children =
                    std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children"))
                        .map_err(|e| e.to_string())?;
                let child = children.split_whitespace().next().ok_or("no child yet")?;
                let status = std::fs::read_to_string(format!("/proc/{child}/status"))
                    .map_err(|e| e.to_string())?;
                if status.contains("Name:\tsleep")
                    && status.contains(&format!("TracerPid:\t{tracer}\n"))
                {
                    child.parse().map_err(|_| children.clone())
                } else {
                    Err(status)
                }
            },
        );
        Self {
            child,
            tracer,
            tracee,
        }
    }

    /// Kills strace alone (SIGKILL) and reaps it; its tracee is let go.
    pub fn kill_tracer(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Straced {
    fn drop(&mut self) {
        // SAFETY: kill with a pid and a signal.
        unsafe { libc::kill(self.tracee as i32, libc::SIGKILL) };
        self.kill_tracer();
        // Gone from its cgroup (exited: a zombie or reaped) before the next step reads it.
        let stat = format!("/proc/{}/stat", self.tracee);
        node::eventually(
            "strace's tracee to exit",
            std::time::Duration::from_secs(10),
            || match std::fs::read_to_string(&stat) {
                Ok(s) if !s.contains(") Z ") => Err(s),
                _ => Ok(()),
            },
        );
    }
}

/// Kills every process in a cgroup subtree and waits until it is empty.
pub fn kill_tree(path: &Path) {
    let kill = path.join("cgroup.kill");
    if kill.exists() {
        let _ = std::fs::write(&kill, "1");
    }
    for _ in 0..500 {
        match std::fs::read_to_string(path.join("cgroup.events")) {
            Ok(t) if t.lines().any(|l| l.trim() == "populated 0") => return,
            Err(_) => return,
            _ => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
}

/// dnsmasq (Debian's), authoritative for a few names, logging every query it gets: the query
/// log shows what reached the upstream. Killed on drop.
pub struct Dnsmasq {
    child: Child,
    pub log: PathBuf,
}

impl Dnsmasq {
    /// Listens on `ip`:53 inside `ns`; `hosts` are (name, address) records, `txt` (name, text).
    pub fn start(
        ns: &NetNs,
        ip: &str,
        hosts: &[(&str, &str)],
        txt: &[(&str, &str)],
        dir: &Path,
    ) -> Self {
        let log = dir.join(format!("dnsmasq-{ip}.log"));
        let mut cmd = Command::new("dnsmasq");
        ns.enter(&mut cmd);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--pid-file=",
            "--log-queries=extra",
        ])
        .arg(format!("--listen-address={ip}"))
        .arg(format!("--log-facility={}", log.display()));
        for (name, addr) in hosts {
            cmd.arg(format!("--host-record={name},{addr}"));
        }
        for (name, text) in txt {
            cmd.arg(format!("--txt-record={name},{text}"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq must be installed (cargo xtask test installs dnsmasq-base)");
        // dnsmasq writes "started" once it has bound its sockets.
        let deadline = deadline(std::time::Duration::from_secs(10));
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("started, version")) {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq did not start ({})",
                log.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { child, log }
    }

    /// Every query line of the log (`query[TXT] name from ...`).
    pub fn queries(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" query["))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`bin_path`] as another user can run it: a copy in a directory every user may enter (the
/// checkout may live where only root can, a 0700 temporary directory say). One copy per
/// binary and test process.
pub fn bin_for_anyone(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        // A static is never dropped: the copies of test processes that are gone are removed
        // here instead.
        for e in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("agentwall-bin-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = PathBuf::from(format!("/tmp/agentwall-bin-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a directory for binaries");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    });
    static COPYING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = COPYING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let to = dir.join(name);
    if !to.exists() {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        // Copied by another process: a descriptor this process opened for writing would be
        // inherited by any child another test thread forks meanwhile, and held until that
        // child execs, so running the copy could fail with ETXTBSY.
        node::run_ok(
            Command::new("install")
                .args(["-m", "0755"])
                .arg(bin_path(name))
                .arg(&tmp),
        );
        std::fs::rename(&tmp, &to).unwrap();
    }
    to
}

/// Linux's (major, minor), from the running kernel's release.
pub fn kernel_release() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// How long to wait for something the node or the kernel does on its own time: `d`, times
/// `AGENTWALL_TEST_PATIENCE` where the runner sets it (the kernel matrix's emulated guests
/// run everything many times slower). A deadline, never a synchronisation: the waits return
/// as soon as what they wait for holds.
pub fn patience(d: std::time::Duration) -> std::time::Duration {
    let factor = std::env::var("AGENTWALL_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}

/// The instant [`patience`]`(d)` from now.
pub fn deadline(d: std::time::Duration) -> std::time::Instant {
    std::time::Instant::now() + patience(d)
}

/// Path of a binary built by this crate (next to the test executable's deps dir).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built; run through `cargo xtask test`",
        p.display()
    );
    p
}

/// An aw-probe process inside a cgroup and (optionally) its own network namespace.
pub struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Probe {
    /// Starts a probe in `cgroup` and a fresh network namespace with only `lo` up.
    pub fn spawn(cgroup: &Cgroup) -> Self {
        Self::spawn_args(&["--cgroup", &cgroup.path().display().to_string(), "--netns"])
    }

    pub fn spawn_args(args: &[&str]) -> Self {
        let mut c = Command::new(bin_path("aw-probe"));
        c.args(args);
        Self::from_command(c)
    }

    /// Starts a probe through another command (e.g. `agentwall launch ... -- aw-probe`).
    pub fn from_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the probe");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read ready line");
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("aw-probe did not get ready: {line:?}"))
            .parse()
            .expect("pid");
        Self {
            child,
            stdin,
            stdout,
            pid,
        }
    }

    /// Runs one command and returns its one-line answer.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to probe");
        self.stdin.flush().expect("flush");
        self.read_answer(line)
    }

    /// Runs one command whose answer must be `ok VALUE`, and returns VALUE.
    pub fn ok_value(&mut self, line: &str) -> String {
        let got = self.cmd(line);
        match got.strip_prefix("ok ") {
            Some(value) => value.to_owned(),
            None => panic!("{line}: {got}"),
        }
    }

    /// Sends one command without waiting; [`Probe::answer`] reads its reply later, so the test
    /// can act while the probe works.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to probe");
        self.stdin.flush().expect("flush");
    }

    /// The reply to the command [`Probe::send`] sent.
    pub fn answer(&mut self, line: &str) -> String {
        self.read_answer(line)
    }

    fn read_answer(&mut self, line: &str) -> String {
        let mut out = String::new();
        self.stdout.read_line(&mut out).expect("read from probe");
        assert!(!out.is_empty(), "probe exited while answering {line:?}");
        let out = out.trim().to_owned();
        assert!(!out.starts_with("bad "), "probe rejected {line:?}: {out}");
        out
    }

    /// Sends many commands at once, then reads every answer in order.
    pub fn batch(&mut self, lines: &[String]) -> Vec<String> {
        let mut buf = String::new();
        for l in lines {
            buf.push_str(l);
            buf.push('\n');
        }
        let writer = {
            let mut stdin = self.stdin.try_clone_handle();
            std::thread::spawn(move || {
                stdin.write_all(buf.as_bytes()).expect("write batch");
                stdin.flush().expect("flush");
            })
        };
        let answers = lines.iter().map(|l| self.read_answer(l)).collect();
        writer.join().expect("batch writer");
        answers
    }
}

trait CloneHandle {
    fn try_clone_handle(&self) -> std::fs::File;
}

impl CloneHandle for ChildStdin {
    fn try_clone_handle(&self) -> std::fs::File {
        use std::os::fd::AsFd;
        std::fs::File::from(self.as_fd().try_clone_to_owned().expect("dup stdin"))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small tmpfs (a disk that fills up), unmounted on drop.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", at.display());
        Self(at.to_owned())
    }

    /// Gives the disk room again.
    pub fn grow(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "growing the tmpfs at {}", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A cgroup v1 memory group for the ENOMEM fault test. The threads moved into it have their
/// kernel allocations (new eBPF maps and their elements) charged to its limit, while a
/// process's pages stay charged to the group of its main thread. Its OOM killer is off, so an
/// allocation over the limit fails with ENOMEM instead of killing anything. cgroup v2 cannot
/// split a process's threads across memory groups, hence v1.
pub struct MemoryGroup {
    path: PathBuf,
    root: PathBuf,
    /// Set when this guard mounted the v1 memory hierarchy itself.
    mounted: Option<PathBuf>,
}

impl MemoryGroup {
    /// The group, or why this kernel cannot make one: no cgroup v1 memory hierarchy is mounted
    /// and mounting one fails (a kernel built without `CONFIG_MEMCG_V1`, as Debian's 6.12, or
    /// one whose memory controller cgroup v2 already uses).
    pub fn create(name: &str, limit_bytes: u64) -> Result<Self, String> {
        let (root, mounted) = match v1_memory_root() {
            Some(root) => (root, None),
            None => {
                let at =
                    std::env::temp_dir().join(format!("agentwall-memcg-{}", std::process::id()));
                std::fs::create_dir_all(&at).unwrap();
                let ok = Command::new("mount")
                    .args(["-t", "cgroup", "-o", "memory", "agentwall-memcg"])
                    .arg(&at)
                    .status()
                    .unwrap()
                    .success();
                if !ok {
                    let _ = std::fs::remove_dir(&at);
                    return Err(format!(
                        "no cgroup v1 memory hierarchy is mounted and mounting one at {} failed",
                        at.display()
                    ));
                }
                (at.clone(), Some(at))
            }
        };
        let path = root.join(format!("agentwall-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let group = Self {
            path,
            root,
            mounted,
        };
        group.write("memory.oom_control", "1");
        group.write("memory.limit_in_bytes", &limit_bytes.to_string());
        Ok(group)
    }

    fn write(&self, file: &str, value: &str) {
        let p = self.path.join(file);
        std::fs::write(&p, value)
            .unwrap_or_else(|e| panic!("writing {value} to {}: {e}", p.display()));
    }

    /// Moves every thread of `pid` except its main thread into the group, until none is left
    /// outside (a thread started meanwhile is created where its parent is). Returns how many.
    pub fn adopt_threads(&self, pid: u32) -> usize {
        loop {
            let inside: std::collections::BTreeSet<u32> =
                std::fs::read_to_string(self.path.join("tasks"))
                    .unwrap()
                    .lines()
                    .map(|l| l.parse().unwrap())
                    .collect();
            let outside: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|tid| *tid != pid && !inside.contains(tid))
                .collect();
            if outside.is_empty() {
                return inside.len();
            }
            for tid in outside {
                // A thread that has just exited cannot be moved; the next pass does not see it.
                let _ = std::fs::write(self.path.join("tasks"), tid.to_string());
            }
        }
    }

    /// Kernel allocations the group refused since it was made.
    pub fn failures(&self) -> u64 {
        std::fs::read_to_string(self.path.join("memory.failcnt"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn lift_limit(&self) {
        self.write("memory.limit_in_bytes", "-1");
    }
}

fn v1_memory_root() -> Option<PathBuf> {
    // mountinfo: "... mount-point ... - fstype source super-options"
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let opts = post.nth(1)?;
            let at = pre.split(' ').nth(4)?;
            (fstype == "cgroup" && opts.split(',').any(|o| o == "memory"))
                .then(|| PathBuf::from(at))
        })
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        if let Ok(tasks) = std::fs::read_to_string(self.path.join("tasks")) {
            for tid in tasks.lines() {
                let _ = std::fs::write(self.root.join("tasks"), tid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
        if let Some(at) = &self.mounted {
            let _ = Command::new("umount").arg(at).status();
            let _ = std::fs::remove_dir(at);
        }
    }
}

/// Detaches the link pinned at `pin` behind its node's back (as another tool, or a kernel
/// that stopped running the program, would leave it): the pin stays, the program no longer
/// runs.
pub fn detach_pinned_link(pin: &Path) {
    use std::os::fd::AsFd as _;
    let link = agentwall::datapath::sys::pinned_link(pin)
        .unwrap_or_else(|e| panic!("opening the link pinned at {}: {e}", pin.display()));
    agentwall::datapath::sys::detach_link(link.as_fd()).expect("BPF_LINK_DETACH");
}

/// Pins the link pinned at `pin` a second time, at `at`.
pub fn pin_again(pin: &Path, at: &Path) {
    use std::os::fd::AsFd as _;
    let link = agentwall::datapath::sys::pinned_link(pin)
        .unwrap_or_else(|e| panic!("opening the link pinned at {}: {e}", pin.display()));
    agentwall::datapath::sys::pin_object(link.as_fd(), at)
        .unwrap_or_else(|e| panic!("pinning at {}: {e}", at.display()));
}

/// Writes `programs` into the pinned config under `bpffs_dir`, as pins another build
/// attached would hold it: the next start swaps every program.
pub fn set_pinned_revision(bpffs_dir: &Path, programs: u32) {
    let path = agentwall::datapath::pin_dir(bpffs_dir)
        .join("maps")
        .join(agent_common::MAP_CONFIG);
    let data = aya::maps::MapData::from_pin(&path).unwrap();
    let mut config: aya::maps::Array<_, agent_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    let mut c = config.get(&0, 0).unwrap();
    c.programs = programs;
    config.set(0, c, 0).unwrap();
}
