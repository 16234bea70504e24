//! `cargo xtask demo`: agentwall end to end on this machine, in plain words, then cleaned up.
//!
//! A throwaway CA and two agent certificates (rcgen), a control plane on loopback with its own
//! CA, a node attached to a private cgroup subtree that takes its policy from the control
//! plane, a push from the admin CLI, agents launched into private network namespaces: an
//! allowed connection, a denied one, an audit-mode would-deny, an unknown flow, `status`,
//! `flows` and the same denials read back from the control plane.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

const SUPPORT: &str = "spiffe://demo.agentwall/agent/support-bot";
const RESEARCH: &str = "spiffe://demo.agentwall/agent/research-bot";
const NODE: &str = "spiffe://demo.agentwall/node/demo";
const ADMIN: &str = "spiffe://demo.agentwall/admin/demo";

const POLICY: &str = "\
# The support bot may reach its LLM API range on 443 and a local tool server on 8080.
kind: AgentPolicy
name: support-bot
identity: spiffe://demo.agentwall/agent/support-bot
owner: support-team@demo.agentwall
labels:
  team: support
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
    reason: LLM API
  - to: [127.0.0.1]
    ports: [8080]
    protocol: tcp
    reason: tool server
  - to: [169.254.0.0/16]
    ports: [80]
    protocol: tcp
    reason: link-local device API (the cloud metadata address inside stays denied)
---
# The research bot is being rolled out: audit mode reports what enforce mode would deny.
kind: AgentPolicy
name: research-bot
identity: spiffe://demo.agentwall/agent/research-bot
owner: research-team@demo.agentwall
labels:
  team: research
mode: audit
egress:
  - to: [198.51.100.0/24]
    ports: [443]
    protocol: tcp
";

/// Everything the demo creates, removed on drop (also on error or panic).
struct Cleanup {
    children: Vec<Child>,
    node: Option<Child>,
    /// Stopped after the node, which would otherwise report it unreachable.
    control_plane: Option<Child>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    agentwall: PathBuf,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut n) = self.node.take() {
            let _ = Command::new("kill").arg(n.id().to_string()).status();
            let _ = n.wait();
        }
        if let Some(mut c) = self.control_plane.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(&self.agentwall)
            .args(["down", "--bpffs-dir"])
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .status();
        let kill = self.cgroup.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(kill, "1");
        }
        // Deepest first; a cgroup whose processes are still exiting refuses, so retry briefly.
        for _ in 0..50 {
            if remove_cgroups(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn remove_cgroups(p: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(p)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_cgroups(&e.path())?;
        }
    }
    std::fs::remove_dir(p)
}

struct Agent {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Agent {
    fn start(cmd: &mut Command, cleanup: &mut Cleanup) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting an agent")?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        cleanup.children.push(child);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("ready ") {
            bail!("the agent did not start (launch refused it?)");
        }
        Ok(Self { stdin, stdout })
    }

    fn ask(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }
}

fn explain(answer: &str) -> &'static str {
    match answer {
        "ok" => "ALLOWED - connected",
        "err ENETUNREACH" => {
            "ALLOWED by the kernel (the private namespace has no route, so nothing left the machine)"
        }
        "err EPERM" => "DENIED by the kernel: Operation not permitted",
        _ => "unexpected answer",
    }
}

fn write_identity(
    dir: &Path,
    ca: &CertifiedIssuer<'_, KeyPair>,
    name: &str,
    id: &str,
) -> Result<(PathBuf, PathBuf)> {
    write_cert(
        dir,
        ca,
        name,
        SanType::URI(id.try_into()?),
        ExtendedKeyUsagePurpose::ClientAuth,
    )
}

fn new_ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(CertifiedIssuer::self_signed(
        ca_params,
        KeyPair::generate()?,
    )?)
}

fn write_cert(
    dir: &Path,
    ca: &CertifiedIssuer<'_, KeyPair>,
    name: &str,
    san: SanType,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(PathBuf, PathBuf)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![san];
    params.extended_key_usages = vec![usage];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::hours(1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

/// Asks `done` every 50 ms for up to 10 s (the node and the control plane work
/// asynchronously); whether it said yes.
fn eventually(mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    for _ in 0..200 {
        if done()? {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(false)
}

fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 filesystem is mounted")
}

pub fn run(root: &Path, keep: bool) -> Result<()> {
    let bin = root.join("target/debug");
    let agentwall = bin.join("agentwall");
    let probe = bin.join("aw-probe");
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("agentwall-demo-{id}"));
    std::fs::create_dir_all(dir.join("policy"))?;
    let mut cleanup = Cleanup {
        children: Vec::new(),
        node: None,
        control_plane: None,
        cgroup: cgroup2_mount()?.join(format!("agentwall-demo-{id}")),
        bpffs: PathBuf::from(format!("/sys/fs/bpf/agentwall-demo-{id}")),
        agentwall: agentwall.clone(),
        dir: dir.clone(),
    };
    std::fs::create_dir_all(&cleanup.cgroup)?;

    println!("== 1. A throwaway CA and two agent certificates (rcgen)");
    let ca = new_ca("agentwall demo CA")?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let (scert, skey) = write_identity(&dir, &ca, "support-bot", SUPPORT)?;
    let (rcert, rkey) = write_identity(&dir, &ca, "research-bot", RESEARCH)?;
    println!("   {SUPPORT}\n   {RESEARCH}");

    println!(
        "\n== 2. A control plane on 127.0.0.1, with its own CA: a server certificate, the node's ({NODE}) and an admin's ({ADMIN})"
    );
    let cp_dir = dir.join("control-plane");
    std::fs::create_dir_all(&cp_dir)?;
    let cp_ca = new_ca("agentwall demo control plane CA")?;
    std::fs::write(cp_dir.join("cp-ca.pem"), cp_ca.pem())?;
    write_cert(
        &cp_dir,
        &cp_ca,
        "server",
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (ncert, nkey) = write_identity(&cp_dir, &cp_ca, "node", NODE)?;
    let (acert, akey) = write_identity(&cp_dir, &cp_ca, "admin", ADMIN)?;
    std::fs::write(
        cp_dir.join("cp.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = [\"cp-ca.pem\"]\ndatabase = \"cp.db\"\n\n[[access]]\nrole = \"admin\"\nspiffe_ids = [\"{ADMIN}\"]\n\n[[access]]\nrole = \"node\"\nspiffe_ids = [\"spiffe://demo.agentwall/node/*\"]\n"
        ),
    )?;
    let mut cp = Command::new(&agentwall)
        .args(["control-plane", "serve", "--config"])
        .arg(cp_dir.join("cp.toml"))
        .env("AGENTWALL_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting agentwall control-plane serve")?;
    let mut cp_ready = String::new();
    BufReader::new(cp.stdout.take().expect("piped")).read_line(&mut cp_ready)?;
    cleanup.control_plane = Some(cp);
    let url = match cp_ready
        .trim()
        .strip_prefix("agentwall control plane ready: listen=")
    {
        Some(addr) => format!("https://{addr}"),
        None => bail!("the control plane did not start"),
    };
    print!("   {cp_ready}");
    let admin_cli = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(&agentwall)
            .arg("cp")
            .args(["--url", &url, "--ca"])
            .arg(cp_dir.join("cp-ca.pem"))
            .arg("--cert")
            .arg(&acert)
            .arg("--key")
            .arg(&akey)
            .args(args)
            .output()?)
    };

    println!(
        "\n== 3. The node, attached to a private cgroup subtree ({}), taking policy from the control plane",
        cleanup.cgroup.display()
    );
    let socket = dir.join("agentwall.sock");
    let mut node = Command::new(&agentwall)
        .args(["node", "--trust-domain", "demo.agentwall"])
        .arg("--trust-bundle")
        .arg(dir.join("ca.pem"))
        .args(["--control-plane-url", &url, "--control-plane-ca"])
        .arg(cp_dir.join("cp-ca.pem"))
        .arg("--control-plane-cert")
        .arg(&ncert)
        .arg("--control-plane-key")
        .arg(&nkey)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--bpffs-dir")
        .arg(&cleanup.bpffs)
        .arg("--attach-cgroup")
        .arg(&cleanup.cgroup)
        // The demo stays on this machine: no resolution of the AI catalog's names.
        .args(["--catalog-refresh-secs", "0"])
        // Who answers for this host: shown beside the node at the control plane.
        .args([
            "--owner",
            "platform-team@demo.agentwall",
            "--label",
            "site=demo",
        ])
        .env("AGENTWALL_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting agentwall node")?;
    let mut ready = String::new();
    BufReader::new(node.stdout.take().expect("piped")).read_line(&mut ready)?;
    cleanup.node = Some(node);
    if !ready.starts_with("agentwall node ready") {
        bail!("the node did not start");
    }
    print!("   {ready}");

    println!(
        "\n== 4. The admin pushes a sample policy ({}) with `agentwall cp policy push`",
        dir.join("policy/agents.yaml").display()
    );
    std::fs::write(dir.join("policy/agents.yaml"), POLICY)?;
    print!("{POLICY}");
    let out = admin_cli(&[
        "policy",
        "push",
        dir.join("policy").to_str().unwrap_or_default(),
    ])?;
    if !out.status.success() {
        bail!("push refused: {}", String::from_utf8_lossy(&out.stderr));
    }
    let pushed = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("   {pushed}");
    let revision = pushed
        .split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    // The node takes it on its long-poll; wait until it enforces that revision.
    let status_json = || -> Result<String> {
        let out = Command::new(&agentwall)
            .args(["status", "--output", "json", "--socket"])
            .arg(&socket)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let enforced =
        eventually(|| Ok(status_json()?.contains(&format!("\"revision\": \"{revision}\""))))?;
    if !enforced {
        bail!("the node did not take revision {revision} from the control plane");
    }
    println!("   the node enforces revision {revision}");

    let launch = |cert: &Path, key: &Path| {
        let mut c = Command::new(&agentwall);
        c.arg("launch")
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--socket")
            .arg(&socket);
        c.arg("--").arg(&probe).arg("--netns");
        c
    };

    println!(
        "\n== 5. The support bot, launched with its certificate into its own network namespace"
    );
    let mut support = Agent::start(&mut launch(&scert, &skey), &mut cleanup)?;
    support.ask("listen tcp 127.0.0.1 8080")?;
    for (what, cmd) in [
        (
            "tool server 127.0.0.1:8080 (allowed by policy)",
            "connect tcp 127.0.0.1 8080",
        ),
        (
            "LLM API 192.0.2.10:443 (allowed by policy)",
            "connect tcp 192.0.2.10 443",
        ),
        (
            "unknown service 203.0.113.7:443 (not in the policy)",
            "connect tcp 203.0.113.7 443",
        ),
        (
            "cloud metadata 169.254.169.254:80 (inside an allowed range, on the global deny list)",
            "connect tcp 169.254.169.254 80",
        ),
    ] {
        println!("   {what}: {}", explain(&support.ask(cmd)?));
    }

    println!("\n== 6. The research bot, in audit mode");
    let mut research = Agent::start(&mut launch(&rcert, &rkey), &mut cleanup)?;
    println!(
        "   unknown service 203.0.113.7:443: {} - recorded as an audit would-deny",
        explain(&research.ask("connect tcp 203.0.113.7 443")?)
    );

    println!("\n== 7. A process nobody enrolled (shadow AI)");
    let unenrolled = cleanup.cgroup.join("unenrolled");
    std::fs::create_dir_all(&unenrolled)?;
    let mut shadow = Agent::start(
        Command::new(&probe)
            .arg("--cgroup")
            .arg(&unenrolled)
            .arg("--netns"),
        &mut cleanup,
    )?;
    println!(
        "   203.0.113.9:443: {} - recorded as an unknown flow",
        explain(&shadow.ask("connect tcp 203.0.113.9 443")?)
    );

    // Records reach the node asynchronously; wait until all four are there.
    let flows = |extra: &[&str]| -> Result<String> {
        let out = Command::new(&agentwall)
            .arg("flows")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    eventually(|| Ok(flows(&[])?.lines().count() >= 4))?;
    println!("\n== 8. agentwall flows");
    print!("{}", flows(&[])?);
    println!("\n== 9. agentwall status");
    let out = Command::new(&agentwall)
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n== 10. The same flows at the control plane: agentwall cp flows --verdict deny");
    let mut denials = String::new();
    eventually(|| {
        denials = String::from_utf8_lossy(&admin_cli(&["flows", "--verdict", "deny"])?.stdout)
            .into_owned();
        Ok(denials.contains("203.0.113.7") && denials.contains("169.254.169.254"))
    })?;
    print!("{denials}");
    println!("\n== 11. agentwall cp nodes");
    print!(
        "{}",
        String::from_utf8_lossy(&admin_cli(&["nodes"])?.stdout)
    );

    println!("\n== 12. The console: agentwall cp console-link");
    let link = String::from_utf8_lossy(&admin_cli(&["console-link"])?.stdout).into_owned();
    println!("   {url}/ui/ (sign in with a token or a client certificate), or once, as the admin:");
    for line in link.lines() {
        println!("   {line}");
    }
    if keep && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        println!("   everything keeps running: press Enter to clean up");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    } else if keep {
        println!("   (--keep waits for Enter on a terminal; stdin is not one)");
    }

    println!(
        "\n== 13. Cleaning up: agents, node and control plane stopped, datapath detached, cgroups removed"
    );
    drop(cleanup);
    println!("   done");
    Ok(())
}
