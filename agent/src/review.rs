//! Reviews over recorded flows (the audit log's decision records): what a candidate policy
//! would change (`policy simulate`), which rules no flow used (`report unused`), and the
//! smallest rule set that covers what an identity did (`policy suggest`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{self, BufRead as _},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    clock::BootInstant,
    policy::{
        IdentityStatus, IdentityView, Mode, PortRange, Protocol, Rule, Subject, UnknownFlows,
        Verdict, evaluate_flow, source::PolicySet,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: not a JSON record: {source}")]
    Json {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("invalid duration {0:?}: expected a number and a unit, like 90s, 30m, 24h or 7d")]
    Duration(String),
}

/// "90s", "30m", "24h", "7d".
pub fn parse_duration(s: &str) -> Result<Duration, ReviewError> {
    let bad = || ReviewError::Duration(s.to_owned());
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => n,
        'm' => n * 60,
        'h' => n * 3600,
        'd' => n * 86400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

/// One recorded flow of a governed identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub identity: String,
    pub dest: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub fqdn: Option<String>,
    /// allow | audit | deny
    pub verdict: String,
    pub reason: Option<String>,
    pub rule_id: Option<u32>,
    pub revision: String,
    pub count: u64,
    pub time: Option<SystemTime>,
    /// From outside the host to the agent (`direction: inbound`): `dest` is the peer and
    /// `port` the agent's own.
    pub inbound: bool,
}

impl Flow {
    /// Allowed by the rules (audit records are flows the rules did not allow).
    pub fn allowed(&self) -> bool {
        self.verdict == "allow"
    }

    /// Whether the egress rules decided it (not an expired or revoked identity, say, nor a
    /// packet from outside, which ingress rules answer for).
    fn rule_decided(&self) -> bool {
        !self.inbound
            && (self.allowed()
                || matches!(
                    self.reason.as_deref(),
                    Some("no rule allows it" | "global deny list")
                ))
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    crate::clock::parse_rfc3339(s).ok().map(Into::into)
}

/// Decision records from `files` (audit log lines or `flows --output json` lines), as JSON,
/// newer than `since` when given; other records are skipped. What every review reads.
pub fn read_decisions(
    files: &[PathBuf],
    since: Option<SystemTime>,
) -> Result<Vec<serde_json::Value>, ReviewError> {
    read_records(files, since, &["decision"])
}

/// Records of the given kinds (a record without a kind counts as a decision).
fn read_records(
    files: &[PathBuf],
    since: Option<SystemTime>,
    kinds: &[&str],
) -> Result<Vec<serde_json::Value>, ReviewError> {
    let mut out = Vec::new();
    each_record(files, since, Some(kinds), |v| out.push(v))?;
    Ok(out)
}

/// Hands each record of `files`, in order, to `each`: of the given kinds (every kind when
/// None), newer than `since` when given. A line that is not JSON stops the walk with its
/// file and line.
pub fn each_record(
    files: &[PathBuf],
    since: Option<SystemTime>,
    kinds: Option<&[&str]>,
    mut each: impl FnMut(serde_json::Value),
) -> Result<(), ReviewError> {
    each_line(files, |path, line, text| {
        let json = |source| ReviewError::Json {
            path: path.to_owned(),
            line,
            source,
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => return Err(json(serde_json::Error::io(e))),
        };
        let v: serde_json::Value = serde_json::from_str(text).map_err(json)?;
        if let Some(kinds) = kinds
            && v.get("kind")
                .and_then(|k| k.as_str())
                .is_some_and(|k| !kinds.contains(&k))
        {
            return Ok(());
        }
        let time = v.get("last_seen").or_else(|| v.get("time"));
        if before(time.and_then(|t| t.as_str()), since) {
            return Ok(());
        }
        each(v);
        Ok(())
    })
}

/// Whether a record whose `last_seen` or `time` is `time` is older than `since`.
pub fn before(time: Option<&str>, since: Option<SystemTime>) -> bool {
    matches!((since, time.and_then(parse_time)), (Some(since), Some(t)) if t < since)
}

/// Hands each line of `files` that holds something to `each`, in order, with its file and
/// number (from 1): its text, or why it is none (not UTF-8). A file that cannot be read
/// stops the walk, as does the first error `each` returns.
pub fn each_line(
    files: &[PathBuf],
    mut each: impl FnMut(&std::path::Path, usize, Result<&str, io::Error>) -> Result<(), ReviewError>,
) -> Result<(), ReviewError> {
    for path in files {
        let io = |source| ReviewError::Io {
            path: path.clone(),
            source,
        };
        let mut f = io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        let mut buf = Vec::new();
        for i in 1.. {
            buf.clear();
            if f.read_until(b'\n', &mut buf).map_err(io)? == 0 {
                break;
            }
            match std::str::from_utf8(&buf) {
                Ok(t) if t.trim().is_empty() => {}
                Ok(t) => each(path, i, Ok(t.trim()))?,
                Err(e) => each(path, i, Err(io::Error::new(io::ErrorKind::InvalidData, e)))?,
            }
        }
    }
    Ok(())
}

/// A query an identity in audit mode made that its policy would refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsWish {
    pub name: String,
    /// `A`, `TXT`, ...
    pub qtype: String,
}

/// What an identity in audit mode asked the DNS proxy for that its policy would refuse, from
/// `query_would_refuse` records.
pub fn read_dns_wishes(
    files: &[PathBuf],
    since: Option<SystemTime>,
    identity: &str,
) -> Result<Vec<DnsWish>, ReviewError> {
    Ok(read_records(files, since, &["dns"])?
        .into_iter()
        .filter(|v| v["event"] == "query_would_refuse" && v["identity"] == identity)
        .filter_map(|v| {
            Some(DnsWish {
                name: v["name"].as_str()?.to_owned(),
                qtype: v["type"].as_str()?.to_owned(),
            })
        })
        .collect())
}

/// The flows of governed identities among [`read_decisions`]' records.
pub fn read_flows(files: &[PathBuf], since: Option<SystemTime>) -> Result<Vec<Flow>, ReviewError> {
    Ok(read_decisions(files, since)?
        .iter()
        .filter_map(Flow::of_record)
        .collect())
}

/// A record's `fqdn`, if it is a host name a rule could name: a node's report is not
/// trusted to hold one, and what reviews suggest is written into policy text.
pub fn host_name(fqdn: Option<String>) -> Option<String> {
    fqdn.filter(|n| {
        n.parse::<crate::policy::fqdn::FqdnPattern>()
            .is_ok_and(|p| p.kind == crate::policy::fqdn::FqdnKind::Exact)
    })
}

/// Where a record says a flow went, as reviews count it: its host name (or its address),
/// its port and protocol (tcp or udp, else empty); what a node sent bounded to what a review
/// can stand behind.
pub fn destination_of<F: crate::audit::Fields>(r: &F) -> (Option<String>, u16, String) {
    let dest = host_name(r.text("fqdn")).or_else(|| {
        r.text("dest")
            .and_then(|d| d.parse::<std::net::IpAddr>().ok())
            .map(|a| a.to_string())
    });
    let port = r
        .u64("port")
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0);
    let protocol = match r.text("protocol").as_deref() {
        Some(p @ ("tcp" | "udp")) => p.to_owned(),
        _ => String::new(),
    };
    (dest, port, protocol)
}

impl Flow {
    /// A governed identity's flow from its decision record (as a node writes or reports
    /// it); None for records of no identity, or that no review replays.
    pub fn of_record(v: &serde_json::Value) -> Option<Flow> {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let (identity, dest, verdict) = (s("identity")?, s("dest")?, s("verdict")?);
        // What a review keeps of a record is bounded whatever a node wrote: a SPIFFE ID, an
        // address, a host name, a revision and a reason of sane lengths.
        identity.parse::<crate::identity::AgentId>().ok()?;
        let dest = dest.parse::<IpAddr>().ok()?;
        let inbound = v.get("direction").and_then(|d| d.as_str()) == Some("inbound");
        let protocol = match s("protocol").as_deref() {
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            _ => return None,
        };
        if !matches!(verdict.as_str(), "allow" | "audit" | "deny") {
            return None;
        }
        // A number out of range is not a port or a rule: the record is not replayed, never
        // wrapped onto another port or rule.
        let port = match v.get("port") {
            None => 0,
            Some(p) => u16::try_from(p.as_u64()?).ok()?,
        };
        let rule_id = match v.get("rule_id").filter(|r| !r.is_null()) {
            None => None,
            Some(r) => Some(u32::try_from(r.as_u64()?).ok()?),
        };
        Some(Flow {
            identity,
            dest,
            port,
            protocol,
            fqdn: host_name(s("fqdn")),
            verdict,
            reason: s("reason").filter(|r| r.len() <= 256),
            rule_id,
            revision: s("revision").filter(|r| r.len() <= 64).unwrap_or_default(),
            count: v.get("count").and_then(|c| c.as_u64()).unwrap_or(1),
            time: s("last_seen")
                .or_else(|| s("time"))
                .and_then(|t| parse_time(&t)),
            inbound,
        })
    }
}

/// An audit log and its rotated predecessors, oldest first.
pub fn audit_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = crate::audit::rotated(path)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    files.push(path.to_owned());
    files
}

/// A flow whose verdict a candidate policy changes, with how often it was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Change {
    pub identity: String,
    pub dest: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    pub port: u16,
    pub protocol: String,
    pub count: u64,
    /// The candidate's rule (allowed) or reason (denied).
    pub why: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dest = match (&self.fqdn, self.dest) {
            (Some(n), a) => format!("{n} ({a})"),
            (None, IpAddr::V6(a)) => format!("[{a}]"),
            (None, a) => a.to_string(),
        };
        write!(
            f,
            "{} -> {dest}:{}/{} (x{}): {}",
            self.identity, self.port, self.protocol, self.count, self.why
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Simulation {
    pub newly_denied: Vec<Change>,
    pub newly_allowed: Vec<Change>,
    /// Recorded flows replayed (counts summed).
    pub replayed: u64,
    /// The time given ran out before every flow was replayed: the changes are those of the
    /// flows replayed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_early: bool,
}

/// An identity's rules under `set`, with a host rule for `fqdn` where a name rule allows it
/// (the address the name resolved to when the flow was recorded).
/// An identity's rules in a candidate, worked out once per simulation: its effective rules
/// and where each is written.
struct IdentityRules {
    known: bool,
    rules: Vec<Rule>,
    places: Vec<String>,
}

impl IdentityRules {
    fn of(set: &PolicySet, identity: &str) -> Self {
        let Some(agent) = set.agent(identity) else {
            return IdentityRules {
                known: false,
                rules: Vec::new(),
                places: Vec::new(),
            };
        };
        let (rules, places) = set
            .effective_rules(agent)
            .into_iter()
            .map(|r| (r.rule, r.source.place()))
            .unzip();
        IdentityRules {
            known: true,
            rules,
            places,
        }
    }

    /// The rules for a flow to `dest` learned as `fqdn`: a name rule that matches allows
    /// that address. None when no name rule matches (the plain rules serve).
    fn for_name(&self, dest: IpAddr, fqdn: &str) -> Option<Vec<Rule>> {
        let hosts: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| r.fqdns.iter().any(|p| p.matches(fqdn)))
            .map(|r| Rule {
                to: vec![IpNet::from(dest)],
                fqdns: Vec::new(),
                ..r.clone()
            })
            .collect();
        (!hosts.is_empty()).then(|| self.rules.iter().cloned().chain(hosts).collect())
    }

    /// Where the rule at `index` of the list the flow was judged by is written: past the
    /// plain rules come the name rules' copies, in order.
    fn place(&self, index: usize, fqdn: Option<&str>) -> Option<&String> {
        match index.checked_sub(self.rules.len()) {
            None => self.places.get(index),
            Some(copy) => {
                let name = fqdn?;
                let (i, _) = self
                    .rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.fqdns.iter().any(|p| p.matches(name)))
                    .nth(copy)?;
                self.places.get(i)
            }
        }
    }
}

/// Replays `flows` against `candidate` with the reference evaluator (the one the kernel is
/// tested against) and lists the flows whose verdict by the rules would change.
pub fn simulate(candidate: &PolicySet, flows: &[Flow]) -> Simulation {
    simulate_until(candidate, flows, None)
}

/// [`simulate`], stopping at `deadline` (the answer says so): a candidate of many rules
/// against many flows is the caller's to bound.
pub fn simulate_until(
    candidate: &PolicySet,
    flows: &[Flow],
    deadline: Option<std::time::Instant>,
) -> Simulation {
    let deny = candidate.global_deny();
    let mut by_identity: BTreeMap<&str, IdentityRules> = BTreeMap::new();
    let view = IdentityView {
        status: IdentityStatus::Active,
        mode: Mode::Enforce,
        not_after: None,
    };
    type Key = (String, IpAddr, u16, Protocol, Option<String>);
    let mut changes: BTreeMap<Key, (bool, String, u64)> = BTreeMap::new();
    let mut sim = Simulation::default();
    for f in flows.iter().filter(|f| f.rule_decided()) {
        // At every flow: one flow against a candidate of many rules is not free.
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            sim.stopped_early = true;
            break;
        }
        sim.replayed = sim.replayed.saturating_add(f.count);
        let ir = by_identity
            .entry(f.identity.as_str())
            .or_insert_with(|| IdentityRules::of(candidate, &f.identity));
        let named = f.fqdn.as_deref().and_then(|n| ir.for_name(f.dest, n));
        let d = evaluate_flow(
            Subject::Bound {
                view: Some(view),
                rules: named.as_ref().unwrap_or(&ir.rules),
            },
            &deny,
            UnknownFlows::Report,
            f.dest,
            f.port,
            f.protocol,
            BootInstant::now(),
        );
        let after = d.verdict == Verdict::Allow;
        if after == f.allowed() {
            continue;
        }
        let why = if !ir.known {
            "no AgentPolicy for this identity".to_owned()
        } else if after {
            d.rule_id
                .checked_sub(1)
                .and_then(|i| ir.place(i as usize, f.fqdn.as_deref()))
                .map(|p| format!("rule {p}"))
                .unwrap_or_else(|| "allowed".into())
        } else {
            d.reason.map_or("denied".into(), |r| r.to_string())
        };
        let e = changes
            .entry((
                f.identity.clone(),
                f.dest,
                f.port,
                f.protocol,
                f.fqdn.clone(),
            ))
            .or_insert((after, why, 0));
        e.2 = e.2.saturating_add(f.count);
    }
    for ((identity, dest, port, protocol, fqdn), (after, why, count)) in changes {
        let c = Change {
            identity,
            dest,
            fqdn,
            port,
            protocol: protocol.to_string(),
            count,
            why,
        };
        if after {
            sim.newly_allowed.push(c);
        } else {
            sim.newly_denied.push(c);
        }
    }
    sim
}

/// The rules no recorded flow used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UnusedReport {
    /// Each with `hits` 0.
    pub rules: Vec<RuleUse>,
    /// Archetypes none of whose rules was used by any identity that extends them.
    pub archetypes: Vec<String>,
    /// Allowed flows counted (of the revision in force).
    pub hits: u64,
}

/// Rules of `set` with no allowed flow recorded under its revision (records carry the
/// revision and the rule number, which are stable together).
pub fn unused(set: &PolicySet, flows: &[Flow]) -> UnusedReport {
    let used = rules_with_hits(set, flows);
    let mut report = UnusedReport {
        hits: used.iter().fold(0u64, |n, r| n.saturating_add(r.hits)),
        ..UnusedReport::default()
    };
    // Per archetype: (used anywhere, extended by anyone).
    let mut archetype_used: BTreeMap<String, bool> = BTreeMap::new();
    for r in used {
        if let Some(name) = r
            .from
            .strip_prefix("Archetype \"")
            .and_then(|n| n.strip_suffix('"'))
        {
            *archetype_used.entry(name.to_owned()).or_default() |= r.hits > 0;
        }
        if r.hits == 0 {
            report.rules.push(r);
        }
    }
    // Each owner's rules together, owners in order, rules nobody owns last.
    report
        .rules
        .sort_by(|a, b| (a.owner.is_none(), &a.owner).cmp(&(b.owner.is_none(), &b.owner)));
    report.archetypes = archetype_used
        .into_iter()
        .filter(|(_, used)| !used)
        .map(|(n, _)| n)
        .collect();
    report
}

/// An egress rule of `set` and the allowed flows recorded under it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RuleUse {
    pub identity: String,
    /// Who answers for the identity: reports are grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::policy::owner::Owner>,
    /// The rule's number among the identity's effective rules (from 1).
    pub rule_id: u32,
    /// file:line egress[i]
    pub place: String,
    /// `AgentPolicy "name"` or `Archetype "name"`.
    pub from: String,
    /// Allowed flows recorded under it (counts summed), under `set`'s revision.
    pub hits: u64,
}

/// Every identity's egress rules under `set`, in order, with the allowed flows recorded
/// under each (records carry the revision and the rule number, which are stable together).
/// Ingress rules leave no allow records (a reply and an allowed peer look the same on the
/// packet line), so they are not counted.
pub fn rules_with_hits(set: &PolicySet, flows: &[Flow]) -> Vec<RuleUse> {
    let mut hits: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    for f in flows
        .iter()
        .filter(|f| f.allowed() && f.revision == set.revision)
    {
        if let Some(id) = f.rule_id {
            let h = hits.entry((f.identity.as_str(), id)).or_default();
            *h = h.saturating_add(f.count);
        }
    }
    let mut out = Vec::new();
    for agent in &set.agents {
        for r in set
            .effective_rules(agent)
            .into_iter()
            .filter(|r| r.rule.direction == crate::policy::Direction::Egress)
        {
            out.push(RuleUse {
                identity: agent.identity.clone(),
                owner: agent.owner.clone(),
                rule_id: r.rule.id,
                place: r.source.place(),
                from: r.from.clone(),
                hits: hits
                    .get(&(agent.identity.as_str(), r.rule.id))
                    .copied()
                    .unwrap_or(0),
            });
        }
    }
    out
}

/// The smallest AgentPolicy (as YAML) whose rules allow every flow recorded for `identity`:
/// one rule per set of destinations that share protocol and ports, names where the agent
/// resolved one, addresses otherwise. Inbound flows an audit-mode identity would have refused
/// become `ingress` rules (peers as host addresses); inbound denials in enforce mode do not,
/// since anyone who can reach the host can cause them.
pub fn suggest(identity: &str, flows: &[Flow], dns: &[DnsWish]) -> String {
    let mine: Vec<Flow> = flows
        .iter()
        .filter(|f| f.identity == identity)
        .cloned()
        .collect();
    suggest_for(identity, &mine, dns)
}

/// [`suggest`] over flows already chosen (any identity field), for `identity`. `dns`: the
/// (name, query type) queries it would have been refused, proposed as `dns.resolve` (and
/// `dns.types`) entries for the names no proposed rule already allows.
pub fn suggest_for(identity: &str, flows: &[Flow], dns: &[DnsWish]) -> String {
    let rules = grouped(flows.iter().filter(|f| !f.inbound));
    let ingress = grouped(
        flows
            .iter()
            .filter(|f| f.inbound && f.verdict == "audit" && f.fqdn.is_none()),
    );
    let name = identity.rsplit('/').next().unwrap_or(identity);
    let mut out = format!("kind: AgentPolicy\nname: {name}\nidentity: {identity}\nmode: enforce\n");
    let reached: BTreeSet<&str> = rules.values().flatten().map(String::as_str).collect();
    let resolve: BTreeSet<&str> = dns
        .iter()
        .map(|w| w.name.as_str())
        .filter(|n| !reached.contains(n))
        .collect();
    let default_types: BTreeSet<String> = crate::policy::names::DEFAULT_QUERY_TYPES
        .iter()
        .map(|t| crate::policy::names::QueryType(*t).to_string())
        .collect();
    let types: BTreeSet<&str> = dns
        .iter()
        .map(|w| w.qtype.as_str())
        .filter(|t| !default_types.contains(*t))
        .collect();
    if !resolve.is_empty() || !types.is_empty() {
        out.push_str("dns:\n");
        if !resolve.is_empty() {
            let names: Vec<&str> = resolve.into_iter().collect();
            out.push_str(&format!("  resolve: [{}]\n", names.join(", ")));
        }
        if !types.is_empty() {
            let types: Vec<&str> = types.into_iter().collect();
            out.push_str(&format!("  types: [{}]\n", types.join(", ")));
        }
    }
    out.push_str("egress:\n");
    if rules.is_empty() {
        out.push_str("  []\n");
    }
    write_rules(&mut out, "to", rules);
    if !ingress.is_empty() {
        out.push_str("ingress:\n");
        write_rules(&mut out, "from", ingress);
    }
    out
}

/// Rules that allow `flows`: per destination (name or address) the ports it was reached on,
/// as ranges; then one rule per (protocol, ports) over every destination that shares them.
fn grouped<'a>(
    flows: impl Iterator<Item = &'a Flow>,
) -> BTreeMap<(Protocol, Vec<PortRange>), BTreeSet<String>> {
    let mut by_dest: BTreeMap<(String, Protocol), BTreeSet<u16>> = BTreeMap::new();
    for f in flows {
        let dest = f.fqdn.clone().unwrap_or_else(|| f.dest.to_string());
        by_dest
            .entry((dest, f.protocol))
            .or_default()
            .insert(f.port);
    }
    let mut rules: BTreeMap<(Protocol, Vec<PortRange>), BTreeSet<String>> = BTreeMap::new();
    for ((dest, proto), ports) in by_dest {
        let mut ranges: Vec<PortRange> = Vec::new();
        for p in ports {
            match ranges.last_mut() {
                Some(r) if u32::from(r.hi) + 1 == u32::from(p) => r.hi = p,
                _ => ranges.push(PortRange::single(p)),
            }
        }
        rules.entry((proto, ranges)).or_default().insert(dest);
    }
    rules
}

/// `rules` as YAML list items whose addresses go under `key` (`to` or `from`).
fn write_rules(
    out: &mut String,
    key: &str,
    rules: BTreeMap<(Protocol, Vec<PortRange>), BTreeSet<String>>,
) {
    for ((proto, ports), dests) in rules {
        let quote = |d: &String| {
            if d.starts_with('*') || d.contains(':') {
                format!("{d:?}")
            } else {
                d.clone()
            }
        };
        let to: Vec<String> = dests.iter().map(quote).collect();
        let ports: Vec<String> = ports
            .iter()
            .map(|p| format!("{:?}", p.to_string()))
            .collect();
        out.push_str(&format!(
            "  - {key}: [{}]\n    ports: [{}]\n    protocol: {proto}\n",
            to.join(", "),
            ports.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            parse_duration("7w").unwrap_err().to_string(),
            "invalid duration \"7w\": expected a number and a unit, like 90s, 30m, 24h or 7d"
        );
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_reported_name_that_is_no_host_name_is_not_written_into_a_suggestion() {
        let rec = |fqdn: &str| {
            serde_json::json!({
                "identity": "spiffe://example.org/a", "dest": "203.0.113.80", "verdict": "audit",
                "protocol": "tcp", "port": 443, "fqdn": fqdn,
            })
        };
        let flows: Vec<Flow> = [
            rec("api.anthropic.com, 0.0.0.0/0"),
            rec("x]\n  - to: [0.0.0.0/0"),
            rec("*.example.com"),
        ]
        .iter()
        .filter_map(Flow::of_record)
        .collect();
        assert_eq!(flows.len(), 3);
        assert!(flows.iter().all(|f| f.fqdn.is_none()), "{flows:?}");
        let policy = suggest_for("spiffe://example.org/a", &flows, &[]);
        assert!(policy.contains("  - to: [203.0.113.80]\n"), "{policy}");
        assert!(!policy.contains("0.0.0.0/0"), "{policy}");
        let named = Flow::of_record(&rec("API.Example.com")).unwrap();
        assert_eq!(named.fqdn.as_deref(), Some("API.Example.com"));
    }

    #[test]
    fn simulation_names_the_name_rule_and_keeps_to_its_time() {
        let files = vec![crate::control_plane::BundleFile {
            name: "a.yaml".into(),
            text: "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\negress:\n  - to: [192.0.2.0/24]\n    ports: [80]\n  - to: [api.example.com]\n    ports: [443]\n".into(),
        }];
        let set = crate::control_plane::validate(&files).unwrap();
        let rec = |port: u64, fqdn: &str| {
            serde_json::json!({
                "identity": "spiffe://example.org/a", "dest": "203.0.113.80", "verdict": "deny",
                "reason": "no rule allows it", "protocol": "tcp", "port": port, "fqdn": fqdn,
            })
        };
        let flows: Vec<Flow> = [rec(443, "api.example.com"), rec(443, "other.example.com")]
            .iter()
            .filter_map(Flow::of_record)
            .collect();
        let sim = simulate(&set, &flows);
        assert_eq!(sim.newly_allowed.len(), 1, "{sim:?}");
        assert_eq!(
            sim.newly_allowed[0].why, "rule a.yaml:1 egress[1]",
            "{sim:?}"
        );
        // A port past 65535 is no port: not replayed as another one.
        assert!(Flow::of_record(&rec(65_536 + 443, "api.example.com")).is_none());
        let mut big = rec(443, "api.example.com");
        big["rule_id"] = serde_json::json!(1u64 << 32);
        assert!(Flow::of_record(&big).is_none());
        // A deadline already passed stops before the first flow, and says so.
        let late = simulate_until(&set, &flows, Some(std::time::Instant::now()));
        assert!(late.stopped_early && late.replayed == 0, "{late:?}");
    }
}
