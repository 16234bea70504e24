//! Compiles an identity's rules into LPM trie entries.
//!
//! The kernel does one longest-prefix match and then scans the port entries stored under that
//! prefix. So that a more specific CIDR never hides the ports of a less specific one, every
//! prefix carries the entries of every rule whose CIDR contains it, most specific rule first.
//! IPv4 prefixes only ever carry IPv4 rules: when an IPv6 rule covers the IPv4-mapped space
//! (`::/0`, say), a barrier entry at `::ffff:0:0/96` keeps it out of IPv4 lookups.
//!
//! A prefix holds at most 16 port entries. Where the rules covering it need more, the rules
//! with the most ranges each take a single entry naming a port set (a 65,536-bit map the
//! kernel looks up), so a rule may list any number of ports; only more than 16 distinct rules
//! covering one address are refused.
//!
//! The global deny list is compiled into the same trie: its prefixes become keys too, and every
//! value records the longest deny prefix covering it (`deny_len`). The longest match for a
//! destination then tells both which rules contain it and which deny prefix covers it, so the
//! kernel needs a single lookup.

use agent_common::{MAX_PORT_ENTRIES, PortEntry, PortSet, RuleSet};
use ipnet::IpNet;

use super::model::{Net, PortRange, Rule, V4_SPACE};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{prefix} needs {count} port entries once the rules covering it are merged \
         (rules {rules}), even with each rule's ports in one entry; at most {max} fit: \
         merge rules or split the CIDR"
    )]
    TooManyPortEntries {
        prefix: String,
        count: usize,
        max: usize,
        rules: String,
    },
    #[error("rule id 0 is reserved; rule ids start at 1")]
    ZeroRuleId,
}

/// Trie entries ready for the datapath: key prefix and value, and the port sets the entries
/// name (`PortEntry::port_set` is an index into `sets` plus one; the datapath stores each set
/// and writes its key there instead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledTrie {
    pub entries: Vec<(Net, RuleSet)>,
    pub sets: Vec<PortSet>,
}

impl CompiledTrie {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Sorted, overlapping and adjacent ranges merged; empty means any.
fn merged_ports(ports: &[PortRange]) -> Vec<PortRange> {
    if ports.is_empty() {
        return vec![PortRange::ANY];
    }
    let mut v = ports.to_vec();
    v.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => last.hi = last.hi.max(r.hi),
            _ => out.push(r),
        }
    }
    out
}

pub fn compile_rules(rules: &[Rule], global_deny: &[IpNet]) -> Result<CompiledTrie, CompileError> {
    // Each rule's ports are merged once and shared by all of its destinations. (prefix, rule
    // index) pairs sorted by prefix let each prefix's rules be found by binary search, with no
    // allocation per destination.
    let mut ports: Vec<Vec<PortRange>> = Vec::with_capacity(rules.len());
    let mut by_net: Vec<(Net, u32)> = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        if rule.id == 0 {
            return Err(CompileError::ZeroRuleId);
        }
        ports.push(merged_ports(&rule.ports));
        by_net.extend(rule.to.iter().map(|to| (Net::from(*to), i as u32)));
    }
    by_net.sort_unstable();
    let rules_of = |q: &Net| {
        let lo = by_net.partition_point(|(n, _)| n < q);
        let hi = lo + by_net[lo..].partition_point(|(n, _)| n == q);
        &by_net[lo..hi]
    };
    let mut deny: Vec<Net> = global_deny.iter().map(|n| Net::from(*n)).collect();
    deny.sort_unstable();
    deny.dedup();
    let lens = sorted_lens(by_net.iter().map(|(n, _)| n.len));
    let deny_lens = sorted_lens(deny.iter().map(|n| n.len));

    let mut prefixes: Vec<Net> = by_net.iter().map(|(n, _)| *n).collect();
    prefixes.extend(deny.iter().copied());
    if prefixes.iter().any(|n| !n.is_v4() && n.contains(&V4_SPACE)) {
        prefixes.push(V4_SPACE);
    }
    prefixes.sort_unstable();
    prefixes.dedup();

    let mut entries = Vec::with_capacity(prefixes.len());
    let mut sets: Vec<PortSet> = Vec::new();
    // Each set made, by the ranges it holds, as an index into `sets`.
    let mut set_of: std::collections::HashMap<Vec<(u16, u16)>, u32> = Default::default();
    let mut found: Vec<PortEntry> = Vec::new();
    for p in prefixes {
        // The longest deny prefix of the same family covering p.
        let deny_len = deny_lens
            .iter()
            .rev()
            .filter(|&&len| len <= p.len)
            .map(|&len| Net::new(p.addr, len))
            .find(|q| q.is_v4() == p.is_v4() && deny.binary_search(q).is_ok())
            .map_or(0, |q| q.len);
        let mut set = RuleSet {
            prefix_len: p.len,
            deny_len,
            ..RuleSet::default()
        };
        found.clear();
        for &len in lens.iter().take_while(|&&len| len <= p.len) {
            let q = Net::new(p.addr, len);
            if q.is_v4() != p.is_v4() {
                continue;
            }
            for &(_, i) in rules_of(&q) {
                let rule = &rules[i as usize];
                for r in &ports[i as usize] {
                    found.push(PortEntry {
                        port_lo: r.lo,
                        port_hi: r.hi,
                        proto: rule.direction.mask(rule.protocol),
                        prefix_len: q.len,
                        rule_id: rule.id,
                        expires_ns: rule.expires.map_or(0, |e| e.0),
                        name: u8::from(rule.learned),
                        ..PortEntry::default()
                    });
                }
            }
        }
        found.sort_unstable_by(|a, b| {
            b.prefix_len
                .cmp(&a.prefix_len)
                .then(a.rule_id.cmp(&b.rule_id))
                .then(a.port_lo.cmp(&b.port_lo))
                .then(a.port_hi.cmp(&b.port_hi))
                .then(a.proto.cmp(&b.proto))
                .then(a.expires_ns.cmp(&b.expires_ns))
                .then(a.name.cmp(&b.name))
        });
        found.dedup();
        if found.len() > MAX_PORT_ENTRIES {
            found = in_port_sets(&found, &mut sets, &mut set_of).ok_or_else(|| {
                let mut ids: Vec<u32> = found.iter().map(|e| e.rule_id).collect();
                ids.dedup();
                CompileError::TooManyPortEntries {
                    prefix: p.to_string(),
                    count: runs(&found)
                        .iter()
                        .map(|&(start, len)| parts(&found[start..start + len]).len())
                        .sum(),
                    max: MAX_PORT_ENTRIES,
                    rules: ids
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
        }
        set.count = found.len() as u8;
        set.entries[..found.len()].copy_from_slice(&found);
        entries.push((p, set));
    }
    Ok(CompiledTrie { entries, sets })
}

/// The runs of `found` (sorted) that come from one rule at one prefix length, as (start,
/// length). Within a run only the ranges, and (host entries learned from DNS beside the
/// rule's own) the expiry, differ; every entry of a run names the same rule.
fn runs(found: &[PortEntry]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, e) in found.iter().enumerate() {
        match out.last_mut() {
            Some((start, len))
                if found[*start].rule_id == e.rule_id
                    && found[*start].prefix_len == e.prefix_len =>
            {
                *len += 1
            }
            _ => out.push((i, 1)),
        }
    }
    out
}

/// A run's entries by (protocol, expiry, learned for a name), in order of first appearance: each part folds into
/// one entry of its own, so no entry outlives or outreaches what it stands for.
fn parts(run: &[PortEntry]) -> Vec<Vec<PortEntry>> {
    let mut out: Vec<Vec<PortEntry>> = Vec::new();
    for e in run {
        match out.iter_mut().find(|p| {
            p[0].proto == e.proto && p[0].expires_ns == e.expires_ns && p[0].name == e.name
        }) {
            Some(p) => p.push(*e),
            None => out.push(vec![*e]),
        }
    }
    out
}

/// `found` in at most `MAX_PORT_ENTRIES` entries: the runs that save the most become one entry
/// per part naming a port set, in place, so the first match is still the most specific rule.
/// None when even that does not fit.
fn in_port_sets(
    found: &[PortEntry],
    sets: &mut Vec<PortSet>,
    set_of: &mut std::collections::HashMap<Vec<(u16, u16)>, u32>,
) -> Option<Vec<PortEntry>> {
    let runs = runs(found);
    let split: Vec<Vec<Vec<PortEntry>>> = runs
        .iter()
        .map(|&(start, len)| parts(&found[start..start + len]))
        .collect();
    if split.iter().map(Vec::len).sum::<usize>() > MAX_PORT_ENTRIES {
        return None;
    }
    let saving = |r: usize| runs[r].1 - split[r].len();
    let mut by_saving: Vec<usize> = (0..runs.len()).collect();
    by_saving.sort_by_key(|&r| std::cmp::Reverse(saving(r)));
    let mut fold = vec![false; runs.len()];
    let mut total = found.len();
    for r in by_saving {
        if total <= MAX_PORT_ENTRIES {
            break;
        }
        fold[r] = true;
        total -= saving(r);
    }
    let mut out = Vec::with_capacity(total);
    for (r, &(start, len)) in runs.iter().enumerate() {
        if !fold[r] {
            out.extend_from_slice(&found[start..start + len]);
            continue;
        }
        for part in &split[r] {
            let ranges: Vec<(u16, u16)> = part.iter().map(|e| (e.port_lo, e.port_hi)).collect();
            let index = match set_of.get(&ranges) {
                Some(&i) => i,
                None => {
                    let mut set = PortSet::default();
                    for &(lo, hi) in &ranges {
                        for port in lo..=hi {
                            set.insert(port);
                        }
                    }
                    sets.push(set);
                    let i = sets.len() as u32 - 1;
                    set_of.insert(ranges, i);
                    i
                }
            };
            out.push(PortEntry {
                port_lo: part.iter().map(|e| e.port_lo).min().unwrap_or(0),
                port_hi: part.iter().map(|e| e.port_hi).max().unwrap_or(0),
                port_set: index + 1,
                ..part[0]
            });
        }
    }
    Some(out)
}

/// The distinct prefix lengths, shortest first.
fn sorted_lens(lens: impl Iterator<Item = u8>) -> Vec<u8> {
    let mut v: Vec<u8> = lens.collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Protocol;

    fn rule(id: u32, to: &[&str], ports: &[&str], protocol: Protocol) -> Rule {
        Rule {
            id,
            fqdns: Vec::new(),
            to: to.iter().map(|s| s.parse().unwrap()).collect(),
            ports: ports.iter().map(|s| s.parse().unwrap()).collect(),
            protocol,
            direction: crate::policy::model::Direction::Egress,
            expires: None,
            ech: Box::default(),
            learned: false,
        }
    }

    fn find<'a>(t: &'a CompiledTrie, net: &str) -> &'a RuleSet {
        let n = Net::from(net.parse::<IpNet>().unwrap());
        &t.entries.iter().find(|(k, _)| *k == n).unwrap().1
    }

    #[test]
    fn specific_prefix_carries_ports_of_wider_rules_most_specific_first() {
        let t = compile_rules(
            &[
                rule(1, &["10.0.0.0/8"], &["443"], Protocol::Tcp),
                rule(
                    2,
                    &["10.1.0.0/16"],
                    &["80", "81", "8000-8100"],
                    Protocol::Any,
                ),
            ],
            &[],
        )
        .unwrap();
        let s = find(&t, "10.1.0.0/16");
        assert_eq!(s.count, 3);
        assert_eq!(
            (
                s.entries[0].rule_id,
                s.entries[0].port_lo,
                s.entries[0].port_hi
            ),
            (2, 80, 81)
        );
        assert_eq!(s.entries[1].port_lo, 8000);
        assert_eq!((s.entries[2].rule_id, s.entries[2].prefix_len), (1, 104));
        assert_eq!(find(&t, "10.0.0.0/8").count, 1);
    }

    #[test]
    fn ipv6_default_route_gets_a_barrier_over_ipv4() {
        let t = compile_rules(&[rule(1, &["::/0"], &[], Protocol::Any)], &[]).unwrap();
        let barrier = find(&t, "0.0.0.0/0");
        assert_eq!(barrier.count, 0);
        let t = compile_rules(&[rule(1, &["2001:db8::/32"], &[], Protocol::Any)], &[]).unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn global_deny_is_compiled_into_the_trie() {
        let gd: Vec<IpNet> = vec!["169.254.169.254/32".parse().unwrap()];
        let t = compile_rules(&[rule(1, &["169.254.0.0/16"], &[], Protocol::Tcp)], &gd).unwrap();
        let host = find(&t, "169.254.169.254/32");
        assert_eq!(
            (host.count, host.deny_len, host.entries[0].prefix_len),
            (1, 128, 112)
        );
        assert_eq!(find(&t, "169.254.0.0/16").deny_len, 0);
    }

    #[test]
    fn a_rule_with_hundreds_of_ports_takes_one_entry_naming_its_port_set() {
        let ports: Vec<String> = (1..=300).map(|p| (1000 + p * 2).to_string()).collect();
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        let t = compile_rules(
            &[
                rule(1, &["192.0.2.7/32"], &["443"], Protocol::Tcp),
                rule(7, &["192.0.2.0/24"], &ports, Protocol::Tcp),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(t.sets.len(), 1);
        let set = &t.sets[0];
        assert!(set.contains(1002) && set.contains(1600) && !set.contains(1001));
        assert_eq!((1..=65535).filter(|&p| set.contains(p)).count(), 300);
        // Under the host: the host's own rule first, then rule 7's one set entry.
        let host = find(&t, "192.0.2.7/32");
        assert_eq!(host.count, 2);
        assert_eq!((host.entries[0].rule_id, host.entries[0].port_set), (1, 0));
        let e = host.entries[1];
        assert_eq!(
            (e.rule_id, e.port_set, e.port_lo, e.port_hi),
            (7, 1, 1002, 1600)
        );
        assert_eq!(find(&t, "192.0.2.0/24").entries[0].port_set, 1);
    }

    #[test]
    fn a_folded_rule_keeps_each_expiry_of_its_entries() {
        // A rule and the host entry DNS learned for it: same id, same /32, same ports, the
        // host's deadline earlier. Folded, each keeps its own deadline.
        let ports: Vec<String> = (0..20).map(|i| (9000 + 2 * i).to_string()).collect();
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        let base = rule(3, &["203.0.113.7/32"], &ports, Protocol::Tcp);
        let host = Rule {
            expires: Some(crate::clock::BootInstant(5_000)),
            ..base.clone()
        };
        let t = compile_rules(&[base, host], &[]).unwrap();
        let s = find(&t, "203.0.113.7/32");
        assert_eq!(s.count, 2);
        let mut deadlines: Vec<u64> = s.entries[..2].iter().map(|e| e.expires_ns).collect();
        deadlines.sort_unstable();
        assert_eq!(deadlines, [0, 5_000]);
        assert!(s.entries[..2].iter().all(|e| e.port_set == 1));
        assert_eq!(t.sets.len(), 1, "one content, one set");
    }

    #[test]
    fn more_rules_than_a_prefix_holds_is_a_clear_error() {
        let rules: Vec<Rule> = (1..=17)
            .map(|i| {
                let port = (8000 + i).to_string();
                rule(i, &["192.0.2.0/24"], &[port.as_str()], Protocol::Tcp)
            })
            .collect();
        let err = compile_rules(&rules, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "192.0.2.0/24 needs 17 port entries once the rules covering it are merged (rules \
             1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17), even with each rule's \
             ports in one entry; at most 16 fit: merge rules or split the CIDR"
        );
    }

    #[test]
    fn adjacent_ports_merge() {
        let t = compile_rules(
            &[rule(
                1,
                &["192.0.2.1/32"],
                &["80", "81", "82-90", "100"],
                Protocol::Tcp,
            )],
            &[],
        )
        .unwrap();
        let s = find(&t, "192.0.2.1/32");
        assert_eq!(s.count, 2);
        assert_eq!((s.entries[0].port_lo, s.entries[0].port_hi), (80, 90));
    }
}
