//! Driving the real `agentwall` binary: a node process, launches, status and flows.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    NetNs, Probe, TestEnv, bin_path,
    pki::{Ca, Issued},
};

/// The identity most node tests launch agents as.
pub const SUPPORT_ID: &str = "spiffe://example.org/agent/support";

/// Its policy: 192.0.2.0/24 on 443/tcp, nothing else.
pub const SUPPORT_POLICY: &str = "\
kind: AgentPolicy
name: support
identity: spiffe://example.org/agent/support
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
";

/// A running `agentwall node`; SIGKILLed on drop if the test did not stop it.
pub struct NodeProc {
    pub child: Child,
    pub socket: PathBuf,
}

impl NodeProc {
    pub fn start(env: &TestEnv, dir: &Path) -> Self {
        Self::start_with(env, dir, &[])
    }

    pub fn start_with(env: &TestEnv, dir: &Path, extra: &[&str]) -> Self {
        Self::start_env(env, dir, extra, &[])
    }

    pub fn start_env(env: &TestEnv, dir: &Path, extra: &[&str], vars: &[(&str, &Path)]) -> Self {
        Self::start_in(env, dir, extra, vars, None)
    }

    /// Starts the node inside `netns` when given (its DNS proxy then serves that namespace).
    pub fn start_in(
        env: &TestEnv,
        dir: &Path,
        extra: &[&str],
        vars: &[(&str, &Path)],
        netns: Option<&NetNs>,
    ) -> Self {
        Self::start_bin(&bin_path("agentwall"), env, dir, extra, vars, netns)
    }

    /// [`NodeProc::start_in`] with another build of the binary (a benchmark's baseline).
    pub fn start_bin(
        bin: &Path,
        env: &TestEnv,
        dir: &Path,
        extra: &[&str],
        vars: &[(&str, &Path)],
        netns: Option<&NetNs>,
    ) -> Self {
        Self::spawn(dir, Self::command(bin, env, dir, extra, vars, netns))
    }

    /// [`NodeProc::start_with`] with its command changed by `edit` first (started with fewer
    /// capabilities than root has, or through a wrapper, say).
    pub fn start_edited(
        env: &TestEnv,
        dir: &Path,
        extra: &[&str],
        edit: impl FnOnce(Command) -> Command,
    ) -> Self {
        let cmd = Self::command(&bin_path("agentwall"), env, dir, extra, &[], None);
        Self::spawn(dir, edit(cmd))
    }

    fn spawn(dir: &Path, mut cmd: Command) -> Self {
        let socket = dir.join("aw.sock");
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("agentwall node ready: socket="),
            "node did not start: {line:?}"
        );
        Self { child, socket }
    }

    /// `agentwall node --check-config` with the flags [`NodeProc::start_with`] would give.
    pub fn check_config(env: &TestEnv, dir: &Path, extra: &[&str]) -> std::process::Output {
        Self::command(&bin_path("agentwall"), env, dir, extra, &[], None)
            .arg("--check-config")
            .output()
            .expect("run node --check-config")
    }

    /// Runs the node as [`NodeProc::start_with`] would, expecting it to refuse to start;
    /// returns what it said on stderr.
    pub fn start_refused(env: &TestEnv, dir: &Path, extra: &[&str]) -> String {
        let out = Self::command(&bin_path("agentwall"), env, dir, extra, &[], None)
            .output()
            .expect("run node");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && !stdout.contains("ready"),
            "the node started: {stdout}"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn command(
        bin: &Path,
        env: &TestEnv,
        dir: &Path,
        extra: &[&str],
        vars: &[(&str, &Path)],
        netns: Option<&NetNs>,
    ) -> Command {
        let socket = dir.join("aw.sock");
        let mut cmd = Command::new(bin);
        if let Some(ns) = netns {
            ns.enter(&mut cmd);
        }
        cmd.args(["node", "--trust-domain", "example.org"]);
        // The node resolves the AI catalog's names through the host's resolvers unless told
        // not to: tests never send DNS out of the machine.
        if !extra.contains(&"--catalog-refresh-secs") {
            cmd.args(["--catalog-refresh-secs", "0"]);
        }
        cmd.args(extra)
            .envs(vars.iter().copied())
            .arg("--trust-bundle")
            .arg(dir.join("ca.pem"));
        // With a control plane, policy comes from it.
        if !extra.contains(&"--control-plane-url") {
            cmd.arg("--policy-dir").arg(dir.join("policy"));
        }
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpffs-dir")
            .arg(&env.bpffs_dir)
            .arg("--attach-cgroup")
            .arg(env.root.path())
            .env("AGENTWALL_LOG", "warn");
        cmd
    }

    /// Starts the node writing its audit log to `audit` and serving metrics on a free
    /// loopback address, which it returns.
    pub fn start_observed(env: &TestEnv, dir: &Path, audit: &Path) -> (Self, std::net::SocketAddr) {
        let addr = loopback_addr();
        let node = Self::start_with(
            env,
            dir,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--metrics-listen",
                &addr.to_string(),
            ],
        );
        (node, addr)
    }

    pub fn stop(mut self) -> i32 {
        self.terminate()
    }

    /// [`NodeProc::stop`] in place (a test then starts another node in its place).
    pub fn terminate(&mut self) -> i32 {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serials as the node writes them: hex, without leading zero bytes.
pub fn serial_of(c: &Issued) -> String {
    let skip = c.serial.iter().take_while(|b| **b == 0).count();
    hex::encode(&c.serial[skip..])
}

/// A certificate as a rotator gets one: valid from now, for `secs`.
pub fn fresh(id: &str, secs: i64) -> crate::pki::CertSpec {
    crate::pki::CertSpec {
        not_before: time::OffsetDateTime::now_utc() - time::Duration::seconds(1),
        ..crate::pki::CertSpec::agent_expiring(id, secs)
    }
}

/// Waits until the (first) session runs on the certificate with `serial`.
pub fn wait_serial(socket: &Path, what: &str, serial: &str) {
    wait_status(socket, what, |s| {
        s["identities"][0]["sessions"][0]["serial"]
            .as_str()
            .is_some_and(|x| x.eq_ignore_ascii_case(serial))
    });
}

pub fn write_cert(dir: &Path, name: &str, c: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &c.cert_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    (cert, key)
}

pub fn launch_args(socket: &Path, cert: &Path, key: &Path) -> Command {
    let mut c = Command::new(bin_path("agentwall"));
    c.arg("launch")
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--socket")
        .arg(socket)
        .arg("--");
    c
}

/// `agentwall launch` of aw-probe under the identity as `nobody` (the binary copied where
/// nobody can run it); the caller adds probe arguments and the namespace.
pub fn launch_as_nobody(socket: &Path, cert: &Path, key: &Path) -> Command {
    let mut c = Command::new(bin_path("agentwall"));
    c.arg("launch")
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--socket")
        .arg(socket)
        .args(["--user", "nobody", "--"])
        .arg(crate::bin_for_anyone("aw-probe"));
    c
}

/// Launches aw-probe under the identity; it unshares its own network namespace.
pub fn launch_probe(socket: &Path, cert: &Path, key: &Path) -> Probe {
    let mut c = launch_args(socket, cert, key);
    c.arg(bin_path("aw-probe")).arg("--netns");
    Probe::from_command(c)
}

/// The agentwall binary, as a command to add arguments to.
pub fn agentwall() -> Command {
    Command::new(bin_path("agentwall"))
}

/// `agentwall enroll` of the cgroup at `unit` with that certificate and key, through the node
/// at `socket`, as a command to run.
pub fn enroll_command(socket: &Path, unit: &Path, cert: &Path, key: &Path) -> Command {
    let mut c = agentwall();
    c.arg("enroll")
        .arg("--cgroup")
        .arg(unit)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--socket")
        .arg(socket);
    c
}

/// [`enroll_command`], which must succeed.
pub fn enroll(socket: &Path, unit: &Path, cert: &Path, key: &Path) {
    run_ok(&mut enroll_command(socket, unit, cert, key));
}

/// Runs `cmd`; panics with its stderr unless it succeeds, and returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// [`run_ok`], its output read as JSON.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    serde_json::from_slice(&run_ok(cmd)).unwrap()
}

pub fn status_json(socket: &Path) -> serde_json::Value {
    run_json(
        agentwall()
            .args(["status", "--output", "json", "--socket"])
            .arg(socket),
    )
}

/// `agentwall status` as a person reads it.
pub fn status_text(socket: &Path) -> String {
    String::from_utf8(run_ok(agentwall().args(["status", "--socket"]).arg(socket)))
        .expect("status is text")
}

/// Whether the node enforces the BPF LSM line (socket families, socket use, options, error
/// queue): `None` when it does; the node's reason when it says it does not, which it must
/// then say in `status`. The kernel matrix's guests run BPF LSM programs and set
/// `AGENTWALL_TEST_EXPECT_LSM`: there a node that does not enforce the line fails the test
/// (a program the kernel's verifier refused, say), rather than taking the other branch.
pub fn lsm_line(socket: &Path) -> Option<String> {
    let status = status_json(socket);
    let families = &status["socket_families"];
    match families["state"].as_str() {
        Some("enforced") => None,
        Some("unenforced") => {
            let why = families["why"].as_str().unwrap_or_default().to_owned();
            assert!(!why.is_empty(), "{status}");
            assert!(
                std::env::var_os("AGENTWALL_TEST_EXPECT_LSM").is_none(),
                "this kernel runs BPF LSM programs, yet the node does not enforce the line: {why}"
            );
            eprintln!("BPF LSM unavailable on this kernel: {why}");
            Some(why)
        }
        other => panic!("socket_families: {other:?} in {status}"),
    }
}

/// Every record of an audit log (none while it does not exist yet).
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls `f` until it gives a value, for up to `within`; panics naming `what` (and the last
/// thing `f` said) when it never does. The node and the kernel report asynchronously; this is
/// the one waiting loop the tests share.
pub fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = crate::deadline(within);
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `status` until `pred` holds (the node reloads policy on its own schedule). Generous,
/// for the kernel matrix's emulated guests: it returns as soon as `pred` holds.
pub fn wait_status(
    socket: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(what, Duration::from_secs(60), || {
        let s = status_json(socket);
        if pred(&s) { Ok(s) } else { Err(s.to_string()) }
    })
}

/// A test's cgroup subtree and pin dir, a temp dir holding `policy/agents.yaml` and `ca.pem`,
/// and the CA.
pub fn setup(name: &str, policy: &str) -> (TestEnv, tempfile::TempDir, Ca) {
    let env = TestEnv::new(name);
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("agentwall test CA");
    std::fs::create_dir(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/agents.yaml"), policy).unwrap();
    std::fs::write(tmp.path().join("ca.pem"), ca.pem()).unwrap();
    (env, tmp, ca)
}

/// A free loopback TCP address (bound and released), for the node's metrics endpoint.
/// Taken below the kernel's ephemeral range, each port once per test process: a port the
/// kernel hands out for `bind(0)` (a control plane's, a client's) between this release and
/// the node's bind would otherwise be taken under it.
pub fn loopback_addr() -> std::net::SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let low = 10_000u32;
    let span = ephemeral_low.saturating_sub(low).max(1);
    // Processes of the suite run one after another; each starts somewhere else anyway.
    let start = std::process::id() * 7919 % span;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < span, "no free loopback port below {ephemeral_low}");
        let port = low + (start + n) % span;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap();
        }
    }
}

pub fn flows(socket: &Path, verdict: &str) -> Vec<serde_json::Value> {
    let out = Command::new(bin_path("agentwall"))
        .args([
            "flows",
            "--output",
            "json",
            "--verdict",
            verdict,
            "--socket",
        ])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls `flows` until a record of `verdict` for `port` shows up (records arrive from the
/// kernel asynchronously).
pub fn wait_flow(socket: &Path, verdict: &str, port: u16) -> serde_json::Value {
    wait_flow_where(socket, verdict, |r| r["port"] == port)
}

/// Polls `flows` until a record of `verdict` that `pred` accepts shows up.
pub fn wait_flow_where(
    socket: &Path,
    verdict: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(
        &format!("a {verdict} record"),
        Duration::from_secs(10),
        || {
            let all = flows(socket, verdict);
            let n = all.len();
            all.into_iter()
                .find(|r| pred(r))
                .ok_or_else(|| format!("{n} other {verdict} records"))
        },
    )
}

/// `GET /metrics` from the node on `addr`, parsed as Prometheus text.
pub fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    try_scrape(addr).unwrap_or_else(|| panic!("no metrics at {addr}"))
}

/// [`scrape`], or nothing when the endpoint does not answer (its node died).
pub fn try_scrape(addr: std::net::SocketAddr) -> Option<prometheus_parse::Scrape> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: agentwall\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    Some(prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap())
}

/// [`scrape`] from inside `ns`, for a node that listens on that namespace's loopback.
pub fn scrape_in(ns: &NetNs, addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on this thread only; it ends right after.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        scrape(addr)
    })
    .join()
    .unwrap()
}

/// One sample's value; panics naming the metric when it is not there.
pub fn metric(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("{metric} {labels:?} not scraped"))
}
