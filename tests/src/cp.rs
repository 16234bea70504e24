//! Driving the real control plane: `agentwall control-plane serve` on loopback with its own
//! PKI (server, node and admin certificates from a CA apart from the agents'), and the
//! `agentwall cp` CLI.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use agentwall::{
    config::control_plane::ClientConfig,
    control_plane::{client::Client, store::scratch},
};

use crate::{
    bin_path,
    node::write_cert,
    pki::{Ca, CertSpec},
};

pub const NODE_ID: &str = "spiffe://example.org/node/test";

/// Which store the control-plane tests run on: `sqlite` (the default) or `postgres` (a
/// database of each fixture's own in the server `cargo xtask test` starts). The suite runs
/// the control-plane tests once with each.
pub const STORE: &str = "AGENTWALL_TEST_STORE";

/// The store `AGENTWALL_TEST_STORE` names; anything else is a loud failure.
pub fn postgres_store() -> bool {
    match std::env::var(STORE).as_deref() {
        Err(_) | Ok("sqlite") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("{STORE}={other:?}: sqlite or postgres"),
    }
}
pub const ADMIN_ID: &str = "spiffe://example.org/admin/alice";

/// Files of a control plane and of everyone who talks to it.
pub struct CpFixture {
    pub dir: PathBuf,
    pub ca: Ca,
    pub config: PathBuf,
    pub ca_pem: PathBuf,
    pub admin: (PathBuf, PathBuf),
    pub node: (PathBuf, PathBuf),
    pub admin_token: PathBuf,
    pub security_token: PathBuf,
    /// The PostgreSQL database, when the fixture's store is one.
    pub postgres: Option<scratch::ScratchDb>,
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

impl CpFixture {
    /// Writes everything under `dir/cp`, on the store `AGENTWALL_TEST_STORE` names.
    pub fn new(dir: &Path) -> Self {
        Self::on(dir, postgres_store())
    }

    /// Writes everything under `dir/cp`; the database is PostgreSQL when `postgres`.
    pub fn on(dir: &Path, postgres: bool) -> Self {
        let dir = dir.join("cp");
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("agentwall control plane CA");
        let ca_pem = dir.join("cp-ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        write_cert(
            &dir,
            "server",
            &ca.issue_server(std::net::Ipv4Addr::LOCALHOST.into()),
        );
        let admin = write_cert(&dir, "admin", &ca.issue(&CertSpec::agent(ADMIN_ID)));
        let node = write_cert(&dir, "node", &ca.issue(&CertSpec::agent(NODE_ID)));
        let (admin_tok, security_tok) = ("admin-token-0123456789", "security-token-9876543210");
        let admin_token = dir.join("admin.token");
        let security_token = dir.join("security.token");
        std::fs::write(&admin_token, admin_tok).unwrap();
        std::fs::write(&security_token, security_tok).unwrap();
        let config = dir.join("cp.toml");
        let postgres = postgres.then(scratch::database);
        let database = match &postgres {
            Some(db) => format!("database = \"{}\"\nstate_dir = \"state\"", db.url),
            None => "database = \"db/cp.db\"".to_owned(),
        };
        std::fs::write(
            &config,
            format!(
                r#"listen = "127.0.0.1:0"
# The tests' records carry fixed times (2026).
retention_days = 3650
cert = "server.pem"
key = "server.key"
client_ca = ["cp-ca.pem"]
{database}

[[access]]
role = "admin"
spiffe_ids = ["{ADMIN_ID}"]
token_sha256 = ["{}"]

[[access]]
role = "security"
token_sha256 = ["{}"]

[[access]]
role = "node"
spiffe_ids = ["spiffe://example.org/node/*"]
"#,
                sha256_hex(admin_tok),
                sha256_hex(security_tok)
            ),
        )
        .unwrap();
        Self {
            dir,
            ca,
            config,
            ca_pem,
            admin,
            node,
            admin_token,
            security_token,
            postgres,
        }
    }

    /// Where the server keeps the newest CRL numbers.
    pub fn crl_numbers(&self) -> PathBuf {
        match self.postgres {
            Some(_) => self.dir.join("state/crl-numbers.json"),
            None => self.dir.join("db/cp.db.crl-numbers.json"),
        }
    }

    /// Adds to the server's config: `top` before its first table (top-level keys), `tables`
    /// at the end.
    pub fn configure(&self, top: &str, tables: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, format!("{top}{text}\n{tables}")).unwrap();
    }

    /// A client for a node certificate (`spiffe://example.org/node/NAME`).
    pub fn node_client(&self, url: &str, name: &str) -> Client {
        let (cert, key) = write_cert(
            &self.dir,
            &format!("node-{name}"),
            &self.ca.issue(&CertSpec::agent(&format!(
                "spiffe://example.org/node/{name}"
            ))),
        );
        self.client(url, Some((cert, key)), None)
    }

    pub fn client(
        &self,
        url: &str,
        cert: Option<(PathBuf, PathBuf)>,
        token: Option<&Path>,
    ) -> Client {
        let (cert, key) = cert.unzip();
        Client::new(&ClientConfig {
            url: Some(url.to_owned()),
            urls: Vec::new(),
            ca: Some(self.ca_pem.clone()),
            cert,
            key,
            token_file: token.map(Path::to_owned),
            ..ClientConfig::default()
        })
        .unwrap()
    }

    /// The node's flags for this control plane.
    pub fn node_flags(&self, url: &str) -> Vec<String> {
        self.node_flags_for(&[url])
    }

    /// The node's flags for these control-plane replicas, tried in this order.
    pub fn node_flags_for(&self, urls: &[&str]) -> Vec<String> {
        let mut flags: Vec<String> = urls
            .iter()
            .flat_map(|u| ["--control-plane-url".to_owned(), (*u).to_owned()])
            .collect();
        flags.extend([
            "--control-plane-ca".into(),
            self.ca_pem.display().to_string(),
            "--control-plane-cert".into(),
            self.node.0.display().to_string(),
            "--control-plane-key".into(),
            self.node.1.display().to_string(),
        ]);
        flags
    }
}

/// A running control plane; SIGKILLed on drop. Its log goes to `log`.
pub struct CpProc {
    pub child: Child,
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub log: PathBuf,
}

impl CpProc {
    /// Starts on a free loopback port, or on `addr` (to come back where it was).
    pub fn start(fx: &CpFixture, addr: Option<std::net::SocketAddr>) -> Self {
        Self::start_named(fx, addr, "cp")
    }

    /// The same, logging to `NAME.log` (one of several replicas).
    pub fn start_named(fx: &CpFixture, addr: Option<std::net::SocketAddr>, name: &str) -> Self {
        Self::start_with(fx, addr, name, &[])
    }

    /// The same, with more flags (`--database` ...).
    pub fn start_with(
        fx: &CpFixture,
        addr: Option<std::net::SocketAddr>,
        name: &str,
        extra: &[&str],
    ) -> Self {
        Self::start_in(fx, addr, name, extra, None)
    }

    /// [`CpProc::start_with`], inside `netns` when given.
    pub fn start_in(
        fx: &CpFixture,
        addr: Option<std::net::SocketAddr>,
        name: &str,
        extra: &[&str],
        netns: Option<&crate::NetNs>,
    ) -> Self {
        let log = fx.dir.join(format!("{name}.log"));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let listen = addr.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut cmd = Command::new(bin_path("agentwall"));
        cmd.args(["control-plane", "serve", "--config"])
            .arg(&fx.config)
            .args(["--listen", &listen])
            .args(extra)
            .env("AGENTWALL_LOG", "info")
            .env("AGENTWALL_LOG_FORMAT", "text")
            .stdout(Stdio::piped())
            .stderr(err);
        if let Some(ns) = netns {
            ns.enter(&mut cmd);
        }
        let mut child = cmd.spawn().expect("spawn control plane");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: std::net::SocketAddr = line
            .trim()
            .strip_prefix("agentwall control plane ready: listen=")
            .unwrap_or_else(|| {
                panic!(
                    "control plane did not start: {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .parse()
            .unwrap();
        Self {
            child,
            url: format!("https://{addr}"),
            addr,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the server expecting it to refuse to start; returns what it said on stderr.
    pub fn start_refused(fx: &CpFixture) -> String {
        let out = Command::new(bin_path("agentwall"))
            .args(["control-plane", "serve", "--config"])
            .arg(&fx.config)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .expect("run control plane");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && !stdout.contains("ready"),
            "the control plane started: {stdout}"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for CpProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `agentwall cp ARGS` against `url` with `creds` (`--cert/--key` or `--token-file`).
pub fn cp(fx: &CpFixture, url: &str, creds: &[&str], args: &[&str]) -> Output {
    cp_in(None, fx, url, creds, args)
}

/// [`cp`], run inside `netns` when given (a control plane listening in a test namespace).
pub fn cp_in(
    netns: Option<&crate::NetNs>,
    fx: &CpFixture,
    url: &str,
    creds: &[&str],
    args: &[&str],
) -> Output {
    let mut c = Command::new(bin_path("agentwall"));
    c.arg("cp")
        .args(["--url", url, "--ca"])
        .arg(&fx.ca_pem)
        .args(creds)
        .args(args);
    if let Some(ns) = netns {
        ns.enter(&mut c);
    }
    c.output().unwrap()
}

/// `--cert C --key K` of the admin.
pub fn admin_creds(fx: &CpFixture) -> Vec<String> {
    vec![
        "--cert".into(),
        fx.admin.0.display().to_string(),
        "--key".into(),
        fx.admin.1.display().to_string(),
    ]
}

/// Runs `agentwall cp … --output json` and parses what it printed; panics with stderr when it
/// fails.
pub fn cp_json(fx: &CpFixture, url: &str, creds: &[&str], args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output", "json"]);
    let out = cp(fx, url, creds, &all);
    assert!(
        out.status.success(),
        "agentwall cp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The support agent's policy narrowed to 198.51.100.0/24 (what a second push makes of
/// [`crate::node::SUPPORT_POLICY`]).
pub const POLICY_B: &str = "\
kind: AgentPolicy
name: support
identity: spiffe://example.org/agent/support
egress:
  - to: [198.51.100.0/24]
    ports: [443]
    protocol: tcp
";

/// Pushes `text` as `agents.yaml` (written under `fx.dir/NAME`) with the admin's
/// certificate, through the control plane at `url`; returns the revision.
pub fn push(fx: &CpFixture, url: &str, name: &str, text: &str) -> String {
    push_signed(fx, url, name, text, &[])["revision"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// [`push`], signed with each of `keys` (`--sign-key`): what `policy push --output json`
/// said (a version, or a proposal short of its approvals).
pub fn push_signed(
    fx: &CpFixture,
    url: &str,
    name: &str,
    text: &str,
    keys: &[&Path],
) -> serde_json::Value {
    let d = fx.dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("agents.yaml"), text).unwrap();
    let admin = admin_creds(fx);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let dir = d.display().to_string();
    let keys: Vec<String> = keys.iter().map(|k| k.display().to_string()).collect();
    let mut args = vec!["policy", "push", dir.as_str()];
    for k in &keys {
        args.extend(["--sign-key", k.as_str()]);
    }
    cp_json(fx, url, &admin, &args)
}

/// `--token-file` of the security reader.
pub fn security(fx: &CpFixture) -> [String; 2] {
    [
        "--token-file".into(),
        fx.security_token.display().to_string(),
    ]
}

/// The node's flags for a control plane, then `extra`.
pub fn node_args<'a>(flags: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = flags.iter().map(String::as_str).collect();
    v.extend_from_slice(extra);
    v
}

/// Stored decisions of the support agent with `verdict`, every page, read through `url`.
pub fn stored(fx: &CpFixture, url: &str, verdict: &str) -> Vec<serde_json::Value> {
    let sec = security(fx);
    let sec: Vec<&str> = sec.iter().map(String::as_str).collect();
    let all = cp_json(
        fx,
        url,
        &sec,
        &[
            "flows",
            "--verdict",
            verdict,
            "--identity",
            crate::node::SUPPORT_ID,
            "--all",
            "--limit",
            "1000",
        ],
    );
    all["flows"].as_array().unwrap().clone()
}

/// A webhook receiver on loopback (plain HTTP/1.1; in a namespace when started inside
/// [`crate::NetNs::run_in`]): each POST's JSON body goes to `bodies`.
/// It answers 503 to the first `refuse` requests, then 200.
pub struct WebhookReceiver {
    pub addr: std::net::SocketAddr,
    pub bodies: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl WebhookReceiver {
    pub fn start(refuse: usize) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, bodies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut answered = 0usize;
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let mut r = std::io::BufReader::new(tcp.try_clone().unwrap());
                // Requests on this connection, one after another.
                loop {
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        head.push_str(&line);
                    }
                    if head.is_empty() {
                        break;
                    }
                    assert!(head.starts_with("POST /hook HTTP/1.1"), "{head}");
                    let mut body = vec![0; len];
                    std::io::Read::read_exact(&mut r, &mut body).unwrap();
                    answered += 1;
                    let mut w = &tcp;
                    if answered <= refuse {
                        let _ = std::io::Write::write_all(
                            &mut w,
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                        );
                        continue;
                    }
                    let _ = std::io::Write::write_all(
                        &mut w,
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                    );
                    if tx.send(serde_json::from_slice(&body).unwrap()).is_err() {
                        return;
                    }
                }
            }
        });
        WebhookReceiver { addr, bodies }
    }
}
