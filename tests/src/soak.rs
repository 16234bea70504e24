//! A soak run: a control plane, a node reporting to it and governed agents, for a while, with
//! churn (launches, exits, renewals, pushes, revocations, DNS lookups, a control plane
//! restart) and a probe loop checking every verdict. What it returns says whether anything
//! grew once warm, whether every denial the agents met reached the control plane or was
//! counted lost, and how many verdicts were wrong. `cargo xtask soak` prints it; the test
//! suite runs two minutes of it.

use std::{
    collections::VecDeque,
    fmt,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    Probe,
    cp::{CpFixture, CpProc, admin_creds, cp, cp_json},
    node::{NodeProc, eventually, launch_probe, loopback_addr, metric, scrape, setup, write_cert},
    pki::{Ca, CertSpec},
};

/// The identities agents run as; `doomed-N` are revoked one by one.
const STEADY: [&str; 3] = [
    "spiffe://example.org/agent/soak-a",
    "spiffe://example.org/agent/soak-b",
    "spiffe://example.org/agent/soak-c",
];
/// Agents alive at once, at most.
const POOL: usize = 4;
/// How often RSS and descriptors are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

fn doomed(n: usize) -> String {
    format!("spiffe://example.org/agent/doomed-{n}")
}

/// The policy of push `version`: the steady identities always reach 192.0.2.0/24:443 and
/// never 203.0.113.0/24; the extra port they are given changes with every push. The next
/// doomed identity has the same rules (revoked ones leave the policy, so it does not grow).
fn policy(version: usize, doomed_n: usize) -> String {
    let extra = 8000 + version % 2;
    let ids = STEADY
        .iter()
        .map(|s| (*s).to_owned())
        .chain(std::iter::once(doomed(doomed_n)));
    let mut out = String::new();
    for (i, id) in ids.enumerate() {
        out.push_str(&format!(
            "---\nkind: AgentPolicy\nname: p{i}\nidentity: {id}\negress:\n  - to: [192.0.2.0/24]\n    ports: [443, {extra}]\n    protocol: tcp\n"
        ));
    }
    out
}

/// One sample of a process's resources.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: u64,
}

/// One sample: seconds since the start, distinct identities used so far, the node's and the
/// control plane's resources.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: u64,
    pub identities: u64,
    pub node: Usage,
    pub cp: Usage,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    Usage { rss_kib, fds }
}

/// What a soak run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub seconds: u64,
    pub samples: Vec<Sample>,
    /// Denials the agents met (EPERM), each one record's worth at the node.
    pub denials_made: u64,
    /// The denials the control plane stored (the records' counts summed).
    pub denials_stored: u64,
    /// Records the node counted lost (spool or outbox).
    pub records_lost: u64,
    /// Verdicts that were not what the policy in force says, with what was asked.
    pub wrong: Vec<String>,
    pub launches: u64,
    pub exits: u64,
    pub renewals: u64,
    pub pushes: u64,
    pub revocations: u64,
    pub dns_lookups: u64,
    /// Lookups from a namespace the node had not started a proxy in yet (refused, closed).
    pub dns_not_served_yet: u64,
    /// Lookups the proxy decided (refused) but whose answer did not reach the agent within
    /// 3 s: an availability problem, not a way out; shown, not failed on.
    pub dns_timeouts: u64,
    pub cp_restarts: u64,
}

impl Report {
    /// The first warm sample (a third of the way in) and the last.
    pub fn warm_and_last(&self) -> Option<(Sample, Sample)> {
        let warm = *self.samples.get(self.samples.len() / 3)?;
        Some((warm, *self.samples.last()?))
    }

    /// Why the run failed, if it did: wrong verdicts, denials neither stored nor counted
    /// lost (or stored twice), descriptors or memory that grew once warm.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .wrong
            .iter()
            .map(|w| format!("wrong verdict: {w}"))
            .collect();
        // Lost records may be of any kind, so with a loss the stored denials may fall
        // short of those made by at most the loss; without one they must match exactly.
        let (made, stored, lost) = (self.denials_made, self.denials_stored, self.records_lost);
        let accounted = if lost == 0 {
            stored == made
        } else {
            stored <= made && stored + lost >= made
        };
        if !accounted {
            out.push(format!(
                "{} denials made, {} stored, {} counted lost",
                self.denials_made, self.denials_stored, self.records_lost
            ));
        }
        if let Some((warm, last)) = self.warm_and_last() {
            // Descriptors come and go with connections; a handful is noise, a leak is not.
            // The node holds one rule trie (a map descriptor) for every identity it has
            // numbered, kept for good (see the README): each new identity is one more.
            let new_ids = last.identities - warm.identities;
            for (who, w, l, per_id) in [
                ("node", warm.node, last.node, new_ids),
                ("control plane", warm.cp, last.cp, 0),
            ] {
                if l.fds > w.fds + 16 + per_id {
                    out.push(format!(
                        "{who} descriptors grew once warm: {} -> {}",
                        w.fds, l.fds
                    ));
                }
                // Allocators keep some of what they freed; a leak grows without bound.
                if l.rss_kib > w.rss_kib + w.rss_kib / 2 + 16 * 1024 {
                    out.push(format!(
                        "{who} memory grew once warm: {} KiB -> {} KiB",
                        w.rss_kib, l.rss_kib
                    ));
                }
            }
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak: {} s", self.seconds)?;
        writeln!(
            f,
            "churn: {} launches, {} exits, {} renewals, {} pushes, {} revocations, {} DNS lookups ({} before the node served the agent's new namespace: refused), {} control plane restarts",
            self.launches,
            self.exits,
            self.renewals,
            self.pushes,
            self.revocations,
            self.dns_lookups,
            self.dns_not_served_yet,
            self.cp_restarts
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| s | identities | node RSS (KiB) | node fds | control plane RSS (KiB) | control plane fds |"
        )?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|")?;
        for s in &self.samples {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} |",
                s.at, s.identities, s.node.rss_kib, s.node.fds, s.cp.rss_kib, s.cp.fds
            )?;
        }
        writeln!(f)?;
        if let Some((w, l)) = self.warm_and_last() {
            let ratio = |a: u64, b: u64| b as f64 / a.max(1) as f64;
            writeln!(
                f,
                "once warm ({} s -> {} s, {} new identities): node RSS x{:.2}, fds {} -> {}; control plane RSS x{:.2}, fds {} -> {}",
                w.at,
                l.at,
                l.identities - w.identities,
                ratio(w.node.rss_kib, l.node.rss_kib),
                w.node.fds,
                l.node.fds,
                ratio(w.cp.rss_kib, l.cp.rss_kib),
                w.cp.fds,
                l.cp.fds
            )?;
        }
        writeln!(
            f,
            "denials: {} made, {} stored at the control plane, {} counted lost",
            self.denials_made, self.denials_stored, self.records_lost
        )?;
        writeln!(f, "wrong verdicts: {}", self.wrong.len())?;
        writeln!(
            f,
            "DNS lookups unanswered within 3 s (refused, nothing forwarded): {}",
            self.dns_timeouts
        )?;
        for p in self.problems() {
            writeln!(f, "PROBLEM: {p}")?;
        }
        Ok(())
    }
}

struct Agent {
    probe: Probe,
    id: String,
    cert: PathBuf,
    key: PathBuf,
}

struct Rig {
    dir: PathBuf,
    ca: Ca,
    fx: CpFixture,
    server: Option<CpProc>,
    url: String,
    addr: std::net::SocketAddr,
    node: NodeProc,
    metrics: std::net::SocketAddr,
    certs: usize,
}

impl Rig {
    fn cert(&mut self, id: &str) -> (PathBuf, PathBuf) {
        self.certs += 1;
        write_cert(
            &self.dir,
            &format!("soak-{}", self.certs),
            &self.ca.issue(&CertSpec::agent(id)),
        )
    }

    fn launch(&mut self, id: &str) -> Agent {
        let (cert, key) = self.cert(id);
        Agent {
            probe: launch_probe(&self.node.socket, &cert, &key),
            id: id.to_owned(),
            cert,
            key,
        }
    }

    fn admin(&self) -> Vec<String> {
        admin_creds(&self.fx)
    }

    fn push(&self, version: usize, doomed_n: usize) {
        let dir = self.dir.join(format!("push-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("agents.yaml"), policy(version, doomed_n)).unwrap();
        let admin = self.admin();
        let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
        let out = cp(
            &self.fx,
            &self.url,
            &admin,
            &["policy", "push", dir.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "push {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the node applied bundle `version`.
    fn applied(&self, version: usize) {
        eventually("the push applied", Duration::from_secs(60), || {
            let v = metric(
                &scrape(self.metrics),
                "agentwall_control_plane_applied_version",
                &[],
            );
            if v >= version as f64 {
                Ok(())
            } else {
                Err(format!("applied {v}"))
            }
        });
    }
}

/// Runs for `length`; the report says what was seen. Needs root (cgroups, eBPF).
pub fn run(length: Duration) -> Report {
    let (env, tmp, ca) = setup("soak", &policy(0, 0));
    let dir = tmp.path().to_owned();
    let fx = CpFixture::new(&dir);
    let server = CpProc::start(&fx, None);
    let (url, addr) = (server.url.clone(), server.addr);
    let metrics = loopback_addr();
    let m = metrics.to_string();
    let mut args: Vec<String> = fx.node_flags(&url);
    args.extend(
        ["--aggregate-window-secs", "0", "--metrics-listen", &m]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = NodeProc::start_with(&env, &dir, &args);
    let mut rig = Rig {
        dir: dir.clone(),
        ca,
        fx,
        server: Some(server),
        url,
        addr,
        node,
        metrics,
        certs: 0,
    };
    let mut report = Report::default();
    let mut version = 1;
    let mut doomed_n = 0;
    rig.push(version, doomed_n);
    rig.applied(version);
    report.pushes += 1;

    let start = Instant::now();
    let mut pool: VecDeque<Agent> = VecDeque::new();
    let mut next_sample = start;
    let mut restarted = false;
    let mut tick = 0usize;
    while start.elapsed() < length {
        tick += 1;
        if Instant::now() >= next_sample {
            let cp_pid = rig.server.as_ref().map_or(0, |s| s.child.id());
            report.samples.push(Sample {
                at: start.elapsed().as_secs(),
                identities: (STEADY.len() + doomed_n + 1) as u64,
                node: usage(rig.node.child.id()),
                cp: usage(cp_pid),
            });
            next_sample += SAMPLE_EVERY;
        }
        // Launches and exits: a new agent every third tick, the oldest goes past the pool.
        if tick % 3 == 1 || pool.is_empty() {
            let id = STEADY[tick % STEADY.len()];
            pool.push_back(rig.launch(id));
            report.launches += 1;
            if pool.len() > POOL {
                drop(pool.pop_front());
                report.exits += 1;
            }
        }
        // The probe loop: each agent reaches what its rules allow (unreachable in its empty
        // namespace) and nothing else (EPERM, one denial record each).
        for a in pool.iter_mut() {
            let allowed = a.probe.cmd("connect tcp 192.0.2.10 443");
            if allowed != "err ENETUNREACH" {
                report
                    .wrong
                    .push(format!("{} to 192.0.2.10:443: {allowed}", a.id));
            }
            let port = 1000 + (tick % 5000);
            let denied = a.probe.cmd(&format!("connect tcp 203.0.113.7 {port}"));
            if denied == "err EPERM" {
                report.denials_made += 1;
            } else {
                report
                    .wrong
                    .push(format!("{} to 203.0.113.7:{port}: {denied}", a.id));
            }
        }
        // DNS: a name no rule allows is refused by the node's proxy, nothing forwarded. A
        // probe makes its own network namespace after its launch, and the node starts a
        // proxy there at its next tick: until then the lookup fails (ECONNREFUSED), closed,
        // and is counted apart. Any answer is a wrong verdict.
        if let Some(a) = pool.front_mut() {
            let r = a
                .probe
                .cmd(&format!("resolve n{tick}.soak.example 203.0.113.53 udp A"));
            report.dns_lookups += 1;
            match r.as_str() {
                "rcode Refused" => {}
                "err ECONNREFUSED" => report.dns_not_served_yet += 1,
                // No answer within the probe's 3 s: nothing leaked, but the agent waited.
                "err ETIMEDOUT" | "err EAGAIN" => report.dns_timeouts += 1,
                _ => report
                    .wrong
                    .push(format!("{} DNS n{tick}.soak.example: {r}", a.id)),
            }
        }
        // Renewal: the newest agent renews with a new certificate from inside its cgroup.
        if tick.is_multiple_of(7) && !pool.is_empty() {
            let id = pool.back().unwrap().id.clone();
            let (cert, key) = rig.cert(&id);
            let socket = rig.node.socket.clone();
            let a = pool.back_mut().unwrap();
            let r = a.probe.cmd(&format!(
                "spawn {} renew --cert {} --key {} --socket {}",
                crate::bin_path("agentwall").display(),
                cert.display(),
                key.display(),
                socket.display()
            ));
            if r.starts_with("exit 0") {
                report.renewals += 1;
                a.cert = cert;
                a.key = key;
            } else {
                report.wrong.push(format!("{id} renew: {r}"));
            }
        }
        // A push every fifth tick (the extra port flips), waited for.
        if tick.is_multiple_of(5) {
            version += 1;
            rig.push(version, doomed_n);
            rig.applied(version);
            report.pushes += 1;
        }
        // A revocation every eleventh tick: an agent of a doomed identity is cut off.
        if tick.is_multiple_of(11) {
            let id = doomed(doomed_n);
            let mut a = rig.launch(&id);
            report.launches += 1;
            let admin = rig.admin();
            let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
            let r = cp_json(&rig.fx, &rig.url, &admin, &["revoke", &id]);
            assert_eq!(r["identity"], id.as_str(), "{r}");
            report.revocations += 1;
            // Revoked: everything is denied (each an EPERM and a record), once the node
            // has the revocation.
            let mut denied_once = false;
            eventually("the revocation applied", Duration::from_secs(60), || {
                let r = a.probe.cmd("connect tcp 192.0.2.10 443");
                match r.as_str() {
                    "err EPERM" => {
                        denied_once = true;
                        Ok(())
                    }
                    "err ENETUNREACH" => Err("not yet".into()),
                    other => Err(other.to_owned()),
                }
            });
            if denied_once {
                report.denials_made += 1;
            }
            drop(a);
            report.exits += 1;
            doomed_n += 1;
            // The next doomed identity needs a policy before it can launch.
            version += 1;
            rig.push(version, doomed_n);
            rig.applied(version);
            report.pushes += 1;
        }
        // Half way: the control plane is killed and started again where it was.
        if !restarted && start.elapsed() >= length / 2 {
            rig.server = None;
            rig.server = Some(CpProc::start(&rig.fx, Some(rig.addr)));
            report.cp_restarts += 1;
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    report.seconds = start.elapsed().as_secs();
    drop(pool);

    // Every denial at the control plane or counted lost: the spool drains, then the
    // stored denials' counts are summed.
    eventually("the spool drained", Duration::from_secs(120), || {
        let w = metric(
            &scrape(rig.metrics),
            "agentwall_control_plane_spool_records",
            &[],
        );
        if w == 0.0 {
            Ok(())
        } else {
            Err(format!("{w}"))
        }
    });
    report.records_lost = metric(
        &scrape(rig.metrics),
        "agentwall_control_plane_records_lost_total",
        &[],
    ) as u64;
    report.denials_stored = stored_denials(&rig);
    report
}

/// The soak identities' denials the control plane holds, their counts summed.
fn stored_denials(rig: &Rig) -> u64 {
    let admin = rig.admin();
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let page = cp_json(
        &rig.fx,
        &rig.url,
        &admin,
        &["flows", "--verdict", "deny", "--all"],
    );
    page["flows"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| {
                    f["record"]["identity"]
                        .as_str()
                        .is_some_and(|i| i.starts_with("spiffe://example.org/agent/"))
                })
                .map(|f| f["record"]["count"].as_u64().unwrap_or(1))
                .sum()
        })
        .unwrap_or(0)
}
