//! Name rules, made enforceable: the DNS proxy sees each governed identity's own DNS answers
//! (the datapath steers them to it), and the addresses an allowed name resolves to become host
//! rules of that identity until the answer's TTL plus a grace period.
//!
//! This module owns what is learned; [`proxy`] owns the sockets.

pub mod proxy;
pub mod route;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hickory_proto::{
    op::Message,
    rr::{RData, RecordType},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    clock::BootInstant,
    policy::{Protocol, Rule, fqdn::normalize},
};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a learned-address file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no upstream resolver: none configured and none in {0}")]
    NoUpstream(String),
}

/// What one DNS answer says about the name that was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The name the agent asked for, lower-case, no trailing dot.
    pub qname: String,
    /// Addresses the name resolves to (through CNAMEs), each with the smallest TTL on its
    /// chain.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// CNAME chains longer than this are not followed (resolvers give up at about 8-16 too).
const MAX_CHAIN: usize = 16;

/// Reads the addresses that answer `query`'s one question: A and AAAA records of the name,
/// or of the names a CNAME chain from it leads to. Records for other names are ignored, so
/// an answer cannot make an unasked name's addresses look like the asked one's.
pub fn read_answer(query: &Message, response: &Message) -> Option<Answer> {
    let q = query.queries().first()?;
    let qname = normalize(&q.name().to_ascii());
    let mut chain = vec![qname.clone()];
    let mut chain_ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let current = chain.last().expect("chain starts with qname").clone();
        let next = response.answers().iter().find_map(|r| {
            (r.record_type() == RecordType::CNAME && normalize(&r.name().to_ascii()) == current)
                .then(|| match r.data() {
                    RData::CNAME(c) => Some((normalize(&c.0.to_ascii()), r.ttl())),
                    _ => None,
                })
                .flatten()
        });
        match next {
            Some((target, ttl)) if !chain.contains(&target) => {
                chain_ttl = chain_ttl.min(ttl);
                chain.push(target);
            }
            _ => break,
        }
    }
    let mut addrs = Vec::new();
    for r in response.answers() {
        let ip = match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if chain.contains(&normalize(&r.name().to_ascii())) && !addrs.iter().any(|(a, _)| *a == ip)
        {
            addrs.push((ip, r.ttl().min(chain_ttl)));
        }
    }
    Some(Answer { qname, addrs })
}

/// Why an answer's address is never learned, if it is not: DNS must not open what the global
/// deny list closes, nor loopback, link-local, multicast or unspecified addresses (DNS
/// rebinding onto the host or the cloud metadata service). A rule may still name such an
/// address directly.
pub fn unlearnable(ip: IpAddr, global_deny: &[IpNet]) -> Option<&'static str> {
    let host = crate::policy::Net::host(ip);
    if global_deny
        .iter()
        .any(|n| crate::policy::Net::from(*n).contains(&host))
    {
        return Some("on the global deny list");
    }
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let special = match (v4, ip) {
        (Some(a), _) => {
            a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_unspecified()
                || a.is_broadcast()
        }
        (None, IpAddr::V6(a)) => {
            a.is_loopback()
                || a.is_multicast()
                || a.is_unspecified()
                || (a.segments()[0] & 0xffc0) == 0xfe80
        }
        (None, IpAddr::V4(_)) => false,
    };
    special.then_some("loopback, link-local, multicast or unspecified address")
}

/// Limits on what one identity's DNS answers may add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub names_per_identity: usize,
    pub addresses_per_name: usize,
}

/// What a call to [`Learned::learn`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LearnOutcome {
    /// Addresses whose host entry must be rewritten (new, or a later deadline).
    pub changed: Vec<IpAddr>,
    /// Of those, the ones that were not allowed for this name before.
    pub added: Vec<IpAddr>,
    /// Addresses refused by a cap, with the cap that refused them.
    pub refused: Vec<(IpAddr, &'static str)>,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Addresses learned from allowed names, per identity: identity → name → address → deadline
/// (ms since the Unix epoch, wall clock, so the file means the same after a reboot).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    identities: BTreeMap<u32, BTreeMap<String, BTreeMap<IpAddr, u64>>>,
    /// (identity, address) → names: an answer's host entries are rebuilt from the names of
    /// its addresses alone, not from everything the identity ever learned.
    #[serde(skip)]
    by_addr: HashMap<(u32, IpAddr), std::collections::BTreeSet<String>>,
}

impl Learned {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("dns-learned.json")
    }

    pub fn load(path: &Path) -> Result<Self, DnsError> {
        match std::fs::read_to_string(path) {
            Ok(t) => {
                let mut l: Self = serde_json::from_str(&t).map_err(|source| DnsError::Corrupt {
                    path: path.to_owned(),
                    source,
                })?;
                l.reindex();
                Ok(l)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(DnsError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn reindex(&mut self) {
        self.by_addr.clear();
        for (&id, names) in &self.identities {
            for (name, addrs) in names {
                for ip in addrs.keys() {
                    self.by_addr
                        .entry((id, *ip))
                        .or_default()
                        .insert(name.clone());
                }
            }
        }
    }

    /// Replaced whole and synced (see [`crate::files::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), DnsError> {
        Self::store(path, &self.encode())
    }

    /// What [`Learned::save`] writes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializable")
    }

    /// Writes what [`Learned::encode`] gave (so a caller can write outside its lock).
    pub fn store(path: &Path, bytes: &[u8]) -> Result<(), DnsError> {
        crate::files::write_atomic(path, bytes).map_err(|source| DnsError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Records that `name` (allowed for `identity`) resolves to `addrs` until their deadlines.
    /// A known address keeps the later deadline. New names and addresses beyond the caps are
    /// refused, and say so.
    pub fn learn(
        &mut self,
        identity: u32,
        name: &str,
        addrs: &[(IpAddr, SystemTime)],
        caps: Caps,
        now: SystemTime,
    ) -> LearnOutcome {
        let mut out = LearnOutcome::default();
        let names = self.identities.entry(identity).or_default();
        let now_ms = millis(now);
        if !names.contains_key(name) {
            let live = names
                .values()
                .filter(|a| a.values().any(|&d| d > now_ms))
                .count();
            if live >= caps.names_per_identity {
                out.refused = addrs
                    .iter()
                    .map(|(ip, _)| (*ip, "names per identity"))
                    .collect();
                return out;
            }
        }
        let known = names.entry(name.to_owned()).or_default();
        for &(ip, deadline) in addrs {
            let d = millis(deadline);
            match known.get_mut(&ip) {
                Some(old) if *old >= d => {}
                Some(old) => {
                    if *old <= now_ms {
                        out.added.push(ip);
                    }
                    *old = d;
                    out.changed.push(ip);
                }
                None => {
                    let live = known.values().filter(|&&d| d > now_ms).count();
                    if live >= caps.addresses_per_name {
                        out.refused.push((ip, "addresses per name"));
                        continue;
                    }
                    known.insert(ip, d);
                    self.by_addr
                        .entry((identity, ip))
                        .or_default()
                        .insert(name.to_owned());
                    out.changed.push(ip);
                    out.added.push(ip);
                }
            }
        }
        out
    }

    /// `base` plus one host rule per learned address and rule that allows one of its names:
    /// same id, ports and protocol as the rule, expiring at the latest deadline of those names
    /// (or the rule's own expiry, if sooner).
    pub fn host_rules(&self, identity: u32, base: &[Rule], global_deny: &[IpNet]) -> Vec<Rule> {
        let mut out = base.to_vec();
        out.extend(self.hosts(identity, base, global_deny));
        out
    }

    /// The host rules alone of [`Learned::host_rules`]: what a trie built from `base` needs
    /// on top of it for everything this identity learned.
    pub fn hosts(&self, identity: u32, base: &[Rule], global_deny: &[IpNet]) -> Vec<Rule> {
        let Some(names) = self.identities.get(&identity) else {
            return Vec::new();
        };
        Self::with_hosts(
            base,
            global_deny,
            names
                .iter()
                .flat_map(|(n, a)| a.iter().map(move |(ip, d)| (n.as_str(), *ip, *d))),
        )
    }

    /// Like [`Learned::host_rules`], with host rules for `addrs` only: enough to rewrite
    /// those addresses' entries, at a cost that does not grow with what else was learned.
    pub fn host_rules_for(
        &self,
        identity: u32,
        base: &[Rule],
        addrs: &[IpAddr],
        global_deny: &[IpNet],
    ) -> Vec<Rule> {
        let mut out = base.to_vec();
        let Some(names) = self.identities.get(&identity) else {
            return out;
        };
        let mut found = Vec::new();
        for ip in addrs {
            for n in self.by_addr.get(&(identity, *ip)).into_iter().flatten() {
                if let Some(d) = names.get(n).and_then(|a| a.get(ip)) {
                    found.push((n.as_str(), *ip, *d));
                }
            }
        }
        out.extend(Self::with_hosts(base, global_deny, found.into_iter()));
        out
    }

    /// One host rule per learned address and base rule allowing one of its names. Addresses
    /// [`unlearnable`] refuses get none, whatever the learned file says (the deny list may
    /// have grown since).
    fn with_hosts<'a>(
        base: &[Rule],
        global_deny: &[IpNet],
        learned: impl Iterator<Item = (&'a str, IpAddr, u64)>,
    ) -> Vec<Rule> {
        let mut out = Vec::new();
        let mut best: BTreeMap<(IpAddr, usize), u64> = BTreeMap::new();
        for (name, ip, d) in learned {
            if unlearnable(ip, global_deny).is_some() {
                continue;
            }
            for (i, r) in base.iter().enumerate() {
                if r.fqdns.iter().any(|p| p.matches(name)) {
                    let e = best.entry((ip, i)).or_insert(0);
                    *e = (*e).max(d);
                }
            }
        }
        for ((ip, i), d) in best {
            let r = &base[i];
            let deadline = BootInstant::from_system_time(UNIX_EPOCH + Duration::from_millis(d));
            out.push(Rule {
                id: r.id,
                to: vec![IpNet::from(ip)],
                fqdns: Vec::new(),
                ports: r.ports.clone(),
                // UDP (QUIC) to a shared address would carry its server name where the
                // packet line does not read it: a name opens UDP only where its rule says
                // `protocol: udp`.
                protocol: match r.protocol {
                    Protocol::Any => Protocol::Tcp,
                    p => p,
                },
                direction: r.direction,
                expires: Some(r.expires.map_or(deadline, |e| e.min(deadline))),
                ech: Box::default(),
                learned: true,
            });
        }
        out
    }

    /// Forgets addresses whose deadline has passed (the kernel already stopped allowing them);
    /// returns them per identity so their host entries can be rewritten.
    pub fn expire(&mut self, now: SystemTime) -> BTreeMap<u32, Vec<IpAddr>> {
        let now_ms = millis(now);
        let mut gone: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for (&id, names) in &mut self.identities {
            for (name, addrs) in names.iter_mut() {
                addrs.retain(|&ip, &mut d| {
                    if d <= now_ms {
                        gone.entry(id).or_default().push(ip);
                        if let Some(set) = self.by_addr.get_mut(&(id, ip)) {
                            set.remove(name);
                            if set.is_empty() {
                                self.by_addr.remove(&(id, ip));
                            }
                        }
                    }
                    d > now_ms
                });
            }
            names.retain(|_, a| !a.is_empty());
        }
        self.identities.retain(|_, n| !n.is_empty());
        for v in gone.values_mut() {
            v.sort();
            v.dedup();
        }
        gone
    }

    /// Drops identities `keep` says no (they left the policy).
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> bool {
        let before = self.identities.len();
        self.identities.retain(|&id, _| keep(id));
        if before == self.identities.len() {
            return false;
        }
        self.reindex();
        true
    }

    /// Learned addresses, all identities (for metrics and status).
    pub fn len(&self) -> usize {
        self.identities
            .values()
            .flat_map(|n| n.values())
            .map(BTreeMap::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// A copy holding only `identities` (without the by-address index: enough for
    /// [`Learned::hosts`]), so host rules can be computed away from whatever guards this one.
    pub fn subset(&self, identities: &std::collections::BTreeSet<u32>) -> Self {
        Self {
            identities: self
                .identities
                .iter()
                .filter(|(id, _)| identities.contains(id))
                .map(|(id, names)| (*id, names.clone()))
                .collect(),
            by_addr: HashMap::new(),
        }
    }

    /// The names an identity resolved to an address (and has not forgotten).
    pub fn names_at(&self, identity: u32, ip: IpAddr) -> impl Iterator<Item = &str> + '_ {
        self.by_addr
            .get(&(identity, ip))
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Every learned (identity, address), each once.
    pub fn addresses(&self) -> impl Iterator<Item = (u32, IpAddr)> + '_ {
        self.by_addr.keys().copied()
    }

    /// (name, address, deadline) of one identity, for `status`.
    pub fn entries(&self, identity: u32) -> Vec<(String, IpAddr, SystemTime)> {
        self.identities
            .get(&identity)
            .into_iter()
            .flatten()
            .flat_map(|(n, a)| {
                a.iter()
                    .map(move |(ip, d)| (n.clone(), *ip, UNIX_EPOCH + Duration::from_millis(*d)))
            })
            .collect()
    }
}

/// The last name each identity resolved to each address, allowed or not: decision records
/// carry it, so a denial reads "api.unknown-llm.com (203.0.113.7)". Bounded; the oldest
/// observation goes first.
#[derive(Debug)]
pub struct Observed {
    names: HashMap<(u32, IpAddr), String>,
    order: VecDeque<(u32, IpAddr)>,
    cap: usize,
}

impl Observed {
    pub fn new(cap: usize) -> Self {
        Self {
            names: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn insert(&mut self, identity: u32, ip: IpAddr, name: &str) {
        if self.names.insert((identity, ip), name.to_owned()).is_none() {
            self.order.push_back((identity, ip));
            while self.order.len() > self.cap {
                if let Some(k) = self.order.pop_front() {
                    self.names.remove(&k);
                }
            }
        }
    }

    pub fn get(&self, identity: u32, ip: IpAddr) -> Option<&str> {
        self.names.get(&(identity, ip)).map(String::as_str)
    }
}

/// The nameservers of a resolv.conf, on port 53.
pub fn resolv_conf_upstreams(path: &Path) -> Result<Vec<std::net::SocketAddr>, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let ups: Vec<std::net::SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect();
    if ups.is_empty() {
        return Err(DnsError::NoUpstream(path.display().to_string()));
    }
    Ok(ups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{FqdnPattern, Protocol};
    use hickory_proto::{
        op::{MessageType, Query},
        rr::{Name, Record, rdata},
    };
    use std::str::FromStr;

    fn query(name: &str) -> Message {
        let mut m = Message::new();
        m.set_id(7)
            .add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        m
    }

    fn rec(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_str(name).unwrap(), ttl, data)
    }

    #[test]
    fn answers_follow_cnames_and_ignore_other_names() {
        let q = query("API.example.com.");
        let mut r = q.clone();
        r.set_message_type(MessageType::Response);
        r.add_answer(rec(
            "api.example.com.",
            300,
            RData::CNAME(rdata::CNAME(
                Name::from_str("edge.cdn.example.net.").unwrap(),
            )),
        ));
        r.add_answer(rec(
            "edge.cdn.example.net.",
            60,
            RData::A(rdata::A("203.0.113.5".parse().unwrap())),
        ));
        r.add_answer(rec(
            "other.example.org.",
            60,
            RData::A(rdata::A("203.0.113.66".parse().unwrap())),
        ));
        let a = read_answer(&q, &r).unwrap();
        assert_eq!(a.qname, "api.example.com");
        assert_eq!(a.addrs, vec![("203.0.113.5".parse().unwrap(), 60)]);
    }

    #[test]
    fn dns_never_opens_denied_or_host_local_addresses() {
        let deny: Vec<IpNet> = vec!["169.254.169.254/32".parse().unwrap()];
        for bad in [
            "169.254.169.254",
            "127.0.0.1",
            "127.77.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "fe80::1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(unlearnable(bad.parse().unwrap(), &deny).is_some(), "{bad}");
        }
        for good in ["203.0.113.7", "10.1.2.3", "2001:db8::1"] {
            assert_eq!(unlearnable(good.parse().unwrap(), &deny), None, "{good}");
        }
    }

    #[test]
    fn learn_caps_refresh_and_expire() {
        let caps = Caps {
            names_per_identity: 2,
            addresses_per_name: 2,
        };
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s| t0 + Duration::from_secs(s);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut l = Learned::default();
        let out = l.learn(
            1,
            "a.example.com",
            &[
                (ip("192.0.2.1"), at(60)),
                (ip("192.0.2.2"), at(60)),
                (ip("192.0.2.3"), at(60)),
            ],
            caps,
            t0,
        );
        assert_eq!(out.added, vec![ip("192.0.2.1"), ip("192.0.2.2")]);
        assert_eq!(out.refused, vec![(ip("192.0.2.3"), "addresses per name")]);
        // Same deadline: nothing to rewrite. Later: rewritten, not "added".
        let out = l.learn(1, "a.example.com", &[(ip("192.0.2.1"), at(60))], caps, t0);
        assert!(out.changed.is_empty());
        let out = l.learn(1, "a.example.com", &[(ip("192.0.2.1"), at(90))], caps, t0);
        assert_eq!((out.changed.len(), out.added.len()), (1, 0));
        l.learn(1, "b.example.com", &[(ip("192.0.2.9"), at(30))], caps, t0);
        let out = l.learn(1, "c.example.com", &[(ip("192.0.2.10"), at(30))], caps, t0);
        assert_eq!(out.refused, vec![(ip("192.0.2.10"), "names per identity")]);

        let rule = Rule {
            id: 4,
            to: vec![],
            fqdns: vec![FqdnPattern::from_str("*.example.com").unwrap()],
            ports: vec!["443".parse().unwrap()],
            protocol: Protocol::Tcp,
            direction: crate::policy::model::Direction::Egress,
            expires: None,
            ech: Box::default(),
            learned: false,
        };
        let rules = l.host_rules(1, std::slice::from_ref(&rule), &[]);
        assert_eq!(rules.len(), 4, "{rules:?}");
        assert!(
            rules[1..]
                .iter()
                .all(|r| r.id == 4 && r.to[0].prefix_len() == 32)
        );
        assert!(l.host_rules(2, std::slice::from_ref(&rule), &[]).len() == 1);
        // A deny list that grew since: the address gets no host rule.
        let deny: Vec<IpNet> = vec!["192.0.2.0/30".parse().unwrap()];
        assert_eq!(l.host_rules(1, std::slice::from_ref(&rule), &deny).len(), 2);

        let only = l.host_rules_for(1, std::slice::from_ref(&rule), &[ip("192.0.2.9")], &[]);
        assert_eq!(only.len(), 2);
        assert_eq!(only[1].to[0].to_string(), "192.0.2.9/32");

        // Host rules are marked learned (their connections' server names are checked), and
        // a rule for any protocol opens only TCP by name; one that names UDP opens UDP.
        assert!(rules[1..].iter().all(|r| r.learned));
        for (given, opened) in [
            (Protocol::Any, Protocol::Tcp),
            (Protocol::Udp, Protocol::Udp),
            (Protocol::Tcp, Protocol::Tcp),
        ] {
            let r = Rule {
                protocol: given,
                ..rule.clone()
            };
            let hosts = l.host_rules_for(1, std::slice::from_ref(&r), &[ip("192.0.2.9")], &[]);
            assert_eq!(hosts[1].protocol, opened);
        }
        assert_eq!(
            l.names_at(1, ip("192.0.2.1")).collect::<Vec<_>>(),
            ["a.example.com"]
        );

        let gone = l.expire(at(45));
        assert_eq!(gone.get(&1), Some(&vec![ip("192.0.2.9")]));
        assert_eq!(l.len(), 2);
        assert!(
            l.host_rules_for(1, std::slice::from_ref(&rule), &[ip("192.0.2.9")], &[])
                .len()
                == 1
        );
    }
}
