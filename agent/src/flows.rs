//! Decision records from the kernel, enriched for people: identity, process, cgroup, rule,
//! policy revision. The node keeps the most recent ones for `agentwall flows`.

use std::{collections::VecDeque, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    clock::{rfc3339, wall_time},
    datapath::EventRecord,
    policy::owner::{Labels, Owner},
};

/// How many records the node keeps in memory.
pub const RECENT: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    /// deny | audit | unknown | socket-deny | allow
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The SPIFFE ID, or none for cgroups bound to no identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Who answers for the identity, and its labels, as its AgentPolicy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<IpAddr>,
    /// The name the identity last resolved to `dest` through the DNS proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    /// The local port for an inbound record, the destination's otherwise.
    pub port: u16,
    /// "inbound" for a packet a governed socket received (`dest` is then its peer); absent
    /// for what an agent sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The rule involved (overruled by the global deny list, say), as file:line egress[i].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// That rule's number among the identity's effective rules (from 1), in `revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<u32>,
    pub revision: String,
    /// Flows this record stands for: identical flows are folded into one record, by the
    /// kernel (within its rate window) and by the node (within `aggregate_window`).
    pub count: u64,
    /// With `count` > 1: when the first and the last of them happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The process's command line (arguments joined by spaces, at most 1 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The systemd unit the process runs in, from its cgroup path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The container id (64 hex digits) in its cgroup path, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The AI service the destination belongs to (shadow-AI catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Serial number (hex) of the certificate the governing session presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The kernel event this record was made from (`BOOT_NS-TID`): a node that crashed after
    /// writing the record and before it let go of the event reads the event again at its
    /// next start, and knows it by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_event: Option<String>,
    /// The server name a TLS ClientHello carried, on records of the server-name check
    /// (`fqdn` is then what the identity resolved to `dest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl std::fmt::Display for FlowRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = self
            .identity
            .clone()
            .or_else(|| self.cgroup.clone())
            .unwrap_or_else(|| format!("cgroup {}", self.cgroup_id));
        write!(f, "{} {:<7} {who}", self.time, self.verdict)?;
        if let Some(o) = &self.owner {
            write!(f, " (owner {o})")?;
        }
        write!(f, " pid={} ({})", self.pid, self.comm)?;
        let proto = self.protocol.as_deref().unwrap_or("?");
        match (self.dest, &self.fqdn) {
            (Some(a), _) if self.direction.is_some() => {
                let a = match a {
                    IpAddr::V6(a) => format!("[{a}]"),
                    a => a.to_string(),
                };
                write!(f, " <- {a} to local port {}/{proto}", self.port)?
            }
            (Some(a), Some(n)) => write!(f, " -> {n} ({a}):{}/{proto}", self.port)?,
            (Some(IpAddr::V6(a)), None) => write!(f, " -> [{a}]:{}/{proto}", self.port)?,
            (Some(a), None) => write!(f, " -> {a}:{}/{proto}", self.port)?,
            (None, _) => write!(f, " {proto}")?,
        }
        if let Some(s) = &self.service {
            write!(f, " [{s}]")?;
        }
        if let Some(r) = &self.reason {
            write!(f, ": {r}")?;
        }
        match (&self.rule, self.verdict.as_str()) {
            (Some(r), "allow") => write!(f, " [rule {r}]")?,
            // A recorded rule on a denial is one the global deny list overruled.
            (Some(r), _) => write!(f, " [overrules rule {r}]")?,
            (None, _) => {}
        }
        if self.count > 1 {
            write!(f, " (x{})", self.count)?;
        }
        Ok(())
    }
}

/// The process's executable, if it is still there to ask.
pub fn exe_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Recent records, oldest first, with increasing sequence numbers.
#[derive(Debug, Default)]
pub struct Recent {
    records: VecDeque<FlowRecord>,
    next_seq: u64,
}

impl Recent {
    /// The number the next record pushed gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq + 1
    }

    pub fn push(&mut self, mut r: FlowRecord) {
        self.next_seq += 1;
        r.seq = self.next_seq;
        if self.records.len() == RECENT {
            self.records.pop_front();
        }
        self.records.push_back(r);
    }

    /// Records after `after`, optionally of one verdict.
    pub fn since(&self, after: u64, verdict: Option<&str>) -> Vec<FlowRecord> {
        self.records
            .iter()
            .filter(|r| r.seq > after && verdict.is_none_or(|v| r.verdict == v))
            .cloned()
            .collect()
    }
}

/// The parts of a record that come straight from the kernel.
pub fn base(e: &EventRecord, revision: &str) -> FlowRecord {
    use crate::datapath::Hook;
    let flow = !e.hook.is_socket();
    // A handed socket refused for its peer: the peer, beside the socket's description.
    let peer = e.hook == Hook::SocketReceive && e.port != 0;
    FlowRecord {
        seq: 0,
        time: rfc3339(wall_time(e.time)),
        verdict: e.kind.as_str().to_owned(),
        reason: e.reason.map(|r| r.to_string()),
        identity: None,
        owner: None,
        labels: Labels::default(),
        pid: e.pid,
        exe: exe_of(e.pid),
        comm: e.comm.clone(),
        uid: e.uid,
        cgroup_id: e.cgroup_id,
        cgroup: None,
        dest: (flow || peer).then_some(e.dest),
        fqdn: None,
        port: e.port,
        direction: (e.hook == Hook::Ingress).then(|| "inbound".to_owned()),
        protocol: if flow {
            e.proto.map(|p| p.to_string())
        } else if e.hook == Hook::SetSockopt {
            Some(format!(
                "socket option level {} name {} ({})",
                e.sock_type,
                e.sock_protocol,
                crate::datapath::sockopt_name(e.sock_type, e.sock_protocol)
            ))
        } else if e.hook == Hook::ErrorQueue {
            Some("socket error queue (recvmsg MSG_ERRQUEUE)".to_owned())
        } else if e.hook == Hook::SocketUse || e.hook == Hook::SocketBind {
            let what = if e.hook == Hook::SocketBind {
                "bind of"
            } else {
                "send or receive on"
            };
            Some(format!(
                "{what} a socket of family {} ({}){}",
                e.family,
                crate::datapath::family_name(e.family),
                crate::datapath::socket_detail(e.reason, e.sock_protocol)
            ))
        } else if e.hook == Hook::IoUring {
            Some("io_uring instance (io_uring_setup)".to_owned())
        } else if e.hook == Hook::SocketReceive
            && e.reason == Some(crate::policy::model::Reason::ForeignRing)
        {
            Some("io_uring instance received from another process".to_owned())
        } else if e.hook == Hook::SocketReceive {
            Some(format!(
                "socket of family {} ({}) type {} received from another process{}",
                e.family,
                crate::datapath::family_name(e.family),
                e.sock_type,
                crate::datapath::socket_detail(e.reason, e.sock_protocol)
            ))
        } else if e.hook == Hook::SocketFamily {
            Some(format!(
                "socket family {} ({}) type {} protocol {}",
                e.family,
                crate::datapath::family_name(e.family),
                e.sock_type,
                e.sock_protocol
            ))
        } else {
            Some(format!(
                "socket type {} protocol {}",
                e.sock_type, e.sock_protocol
            ))
        },
        rule: None,
        rule_id: (e.rule_id > 0).then_some(e.rule_id),
        revision: revision.to_owned(),
        count: 1 + u64::from(e.suppressed),
        first_seen: None,
        last_seen: None,
        cmdline: cmdline_of(e.pid),
        unit: None,
        container: None,
        service: None,
        serial: None,
        kernel_event: Some(e.key()),
        server_name: None,
    }
}

/// The process's command line, if it is still there to ask.
pub fn cmdline_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut text: String = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if text.is_empty() {
        return None;
    }
    text.truncate(crate::text::prefix(&text, 1024).len());
    Some(text)
}

/// The systemd unit and container id a cgroup path names, if any: the deepest
/// `*.service`/`*.scope` component, and a 64-hex-digit id as docker, podman, containerd and
/// CRI-O write it (`docker-ID.scope`, `/docker/ID`, `cri-containerd-ID.scope`, `libpod-ID`).
pub fn unit_and_container(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut unit = None;
    let mut container = None;
    for part in cgroup.split('/') {
        if part.ends_with(".service") || part.ends_with(".scope") {
            unit = Some(part.to_owned());
        }
        let stem = part
            .strip_suffix(".scope")
            .unwrap_or(part)
            .rsplit(['-', ':'])
            .next()
            .unwrap_or(part);
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            container = Some(stem.to_owned());
        }
    }
    (unit, container)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_containers_from_cgroup_paths() {
        let id = "a".repeat(64);
        assert_eq!(
            unit_and_container(&format!("/sys/fs/cgroup/system.slice/docker-{id}.scope")),
            (Some(format!("docker-{id}.scope")), Some(id.clone()))
        );
        assert_eq!(
            unit_and_container(&format!(
                "/sys/fs/cgroup/kubepods/burstable/pod1/cri-containerd-{id}.scope"
            ))
            .1,
            Some(id.clone())
        );
        assert_eq!(
            unit_and_container(&format!("/sys/fs/cgroup/docker/{id}")),
            (None, Some(id.clone()))
        );
        assert_eq!(
            unit_and_container("/sys/fs/cgroup/system.slice/agent.service"),
            (Some("agent.service".into()), None)
        );
        assert_eq!(
            unit_and_container("/sys/fs/cgroup/user.slice"),
            (None, None)
        );
    }
}
