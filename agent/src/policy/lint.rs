//! `agentwall policy check` warnings: rules wider than anyone asked for, duplicated and
//! shadowed rules, archetypes nobody uses, rules already expired. Warnings never block a policy.

use std::fmt;

use ipnet::IpNet;

use super::{
    fqdn::{FqdnKind, FqdnPattern},
    model::{Direction, Net, PortRange, Protocol},
    source::{EffectiveRule, Origin, PolicySet},
};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    /// The document the warning is about.
    pub origin: Origin,
    /// The rule's section and position in the document, when it is about a rule.
    pub index: Option<(Direction, usize)>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: ", self.origin)?;
        if let Some((d, i)) = self.index {
            write!(f, "{d}[{i}]: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Ports a name rule is taken to carry TLS or HTTP on without a warning.
const WEB_PORTS: [(u16, u16); 4] = [(80, 80), (443, 443), (8080, 8080), (8443, 8443)];

fn ports_cover(a: &[PortRange], b: &[PortRange]) -> bool {
    if a.is_empty() {
        return true;
    }
    if b.is_empty() {
        return false;
    }
    b.iter()
        .all(|r| a.iter().any(|o| o.lo <= r.lo && r.hi <= o.hi))
}

fn proto_covers(a: Protocol, b: Protocol) -> bool {
    a.mask() & b.mask() == b.mask()
}

fn nets_cover(a: &[IpNet], b: &[IpNet]) -> bool {
    b.iter().all(|n| {
        let n = Net::from(*n);
        a.iter()
            .map(|o| Net::from(*o))
            .any(|o| o.is_v4() == n.is_v4() && o.contains(&n))
    })
}

/// Whether `a` allows everything `b` allows, for at least as long.
fn covers(a: &EffectiveRule, b: &EffectiveRule) -> bool {
    let lasts = match (a.rule.expires, b.rule.expires) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => x >= y,
    };
    lasts
        && a.rule.direction == b.rule.direction
        && proto_covers(a.rule.protocol, b.rule.protocol)
        && ports_cover(&a.rule.ports, &b.rule.ports)
        && nets_cover(&a.rule.to, &b.rule.to)
        && names_cover(&a.rule.fqdns, &b.rule.fqdns)
}

fn names_cover(a: &[FqdnPattern], b: &[FqdnPattern]) -> bool {
    b.iter().all(|q| a.iter().any(|p| pattern_covers(p, q)))
}

/// Whether every name `q` matches is matched by `p`.
fn pattern_covers(p: &FqdnPattern, q: &FqdnPattern) -> bool {
    let below = |name: &str, suffix: &str| {
        name.strip_suffix(suffix)
            .is_some_and(|f| f.ends_with('.') && f.len() > 1)
    };
    match (p.kind, q.kind) {
        _ if p == q => true,
        (FqdnKind::AnyDepth, FqdnKind::Exact) => below(&q.suffix, &p.suffix),
        (FqdnKind::AnyDepth, _) => q.suffix == p.suffix || below(&q.suffix, &p.suffix),
        (FqdnKind::OneLabel, FqdnKind::Exact) => p.matches(&q.suffix),
        _ => false,
    }
}

pub fn lint(set: &PolicySet) -> Vec<Warning> {
    let mut out = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    let mut seen_sources = std::collections::BTreeSet::new();
    for agent in &set.agents {
        if agent.owner.is_none() {
            out.push(Warning {
                origin: agent.origin.clone(),
                index: None,
                message: format!(
                    "AgentPolicy {:?} has no owner: its records name no one who answers for it (add `owner:`, a person or team)",
                    agent.name
                ),
            });
        }
        if agent.dns.resolve.contains(&super::names::Resolvable::Any) {
            out.push(Warning {
                origin: agent.origin.clone(),
                index: None,
                message: format!(
                    "AgentPolicy {:?} may resolve any name (dns.resolve: [\"**\"]): its DNS queries are a channel out",
                    agent.name
                ),
            });
        }
        if agent.io_uring == super::model::IoUring::Allow {
            out.push(Warning {
                origin: agent.origin.clone(),
                index: None,
                message: format!(
                    "AgentPolicy {:?} allows io_uring (io_uring: allow): a process outside it that holds one of the agent's rings can put its own sockets there (IORING_OP_MSG_RING), which the agent then uses unjudged",
                    agent.name
                ),
            });
        }
        let rules = set.effective_rules(agent);
        for (i, r) in rules.iter().enumerate() {
            let warn = |message: String| Warning {
                origin: r.source.origin.clone(),
                index: Some((r.source.direction, r.source.index)),
                message,
            };
            // Archetype rules are reported once, not once per agent that extends them.
            let first_time = seen_sources.insert(r.source.place());
            if first_time {
                for net in &r.rule.to {
                    if net.prefix_len() == 0 {
                        let family = if matches!(net, IpNet::V4(_)) {
                            "IPv4"
                        } else {
                            "IPv6"
                        };
                        out.push(warn(format!("rule allows every {family} address ({net})")));
                    }
                }
                if r.rule.ports.is_empty() {
                    out.push(warn("rule allows every port (no `ports`)".into()));
                }
                if let Some(t) = r.source.expires.filter(|t| *t <= now) {
                    out.push(warn(format!("rule expired at {t}; it allows nothing")));
                }
            }
            // Name rules under the server-name check: their connections must open with a TLS
            // ClientHello, which other protocols on other ports do not send.
            if agent.sni != super::model::SniCheck::Off
                && r.rule.direction == Direction::Egress
                && !r.rule.fqdns.is_empty()
                && (r.rule.ports.is_empty()
                    || r.rule
                        .ports
                        .iter()
                        .any(|p| !WEB_PORTS.contains(&(p.lo, p.hi))))
            {
                out.push(warn(format!(
                    "a name rule for ports other than 80, 443, 8080 and 8443 in AgentPolicy {:?} (sni: {}): its connections must open with a TLS ClientHello or an HTTP/1 request naming the server, so SSH or a database's own protocol are refused; set `sni: off` or give those destinations an address rule",
                    agent.name,
                    agent.sni.as_str()
                )));
            }
            let same = |o: &EffectiveRule| {
                r.rule.direction == o.rule.direction
                    && r.rule.to == o.rule.to
                    && r.rule.fqdns == o.rule.fqdns
                    && r.rule.ports == o.rule.ports
                    && r.rule.protocol == o.rule.protocol
                    && r.rule.expires == o.rule.expires
            };
            if let Some(first) = rules[..i].iter().find(|o| same(o)) {
                out.push(warn(format!(
                    "duplicates {} (in the rules of {:?})",
                    first.source.place(),
                    agent.name
                )));
            } else if let Some(wider) = rules
                .iter()
                .enumerate()
                .find(|&(j, o)| j != i && !same(o) && covers(o, r))
                .map(|(_, o)| o)
            {
                out.push(warn(format!(
                    "shadowed by {} (in the rules of {:?}): it allows nothing more",
                    wider.source.place(),
                    agent.name
                )));
            }
        }
    }
    for a in set.unused_archetypes() {
        out.push(Warning {
            origin: a.origin.clone(),
            index: None,
            message: format!("Archetype {:?} is not extended by any AgentPolicy", a.name),
        });
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::source::parse_sources;

    #[test]
    fn warns_about_wide_duplicate_shadowed_expired_and_unused() {
        let text = "\
kind: Archetype
name: web
egress:
  - to: [192.0.2.0/24]
    ports: [443]
    protocol: tcp
---
kind: Archetype
name: unused
egress:
  - to: [203.0.113.0/24]
    ports: [1]
---
kind: AgentPolicy
name: bot
identity: spiffe://example.org/bot
extends: [web]
egress:
  - to: [192.0.2.10]
    ports: [443]
    protocol: tcp
  - to: [\"::/0\"]
  - to: [198.51.100.0/24]
    ports: [80]
  - to: [198.51.100.0/24]
    ports: [80]
  - to: [198.51.100.7]
    ports: [81]
    expires: 2001-01-01T00:00:00Z
";
        let set = parse_sources(vec![(PathBuf::from("p.yaml"), text.into())]).unwrap();
        let got: Vec<String> = lint(&set).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "p.yaml:8: warning: Archetype \"unused\" is not extended by any AgentPolicy",
                "p.yaml:14: warning: AgentPolicy \"bot\" has no owner: its records name no one who answers for it (add `owner:`, a person or team)",
                "p.yaml:14: warning: egress[0]: shadowed by p.yaml:1 egress[0] (in the rules of \"bot\"): it allows nothing more",
                "p.yaml:14: warning: egress[1]: rule allows every IPv6 address (::/0)",
                "p.yaml:14: warning: egress[1]: rule allows every port (no `ports`)",
                "p.yaml:14: warning: egress[3]: duplicates p.yaml:14 egress[2] (in the rules of \"bot\")",
                "p.yaml:14: warning: egress[4]: rule expired at 2001-01-01 0:00:00.0 +00:00:00; it allows nothing",
            ]
        );
    }

    #[test]
    fn name_rules_for_ports_without_tls_are_warned_about_under_the_server_name_check() {
        let policy = |sni: &str| {
            format!(
                "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\nowner: t\n{sni}\
                 egress:\n  - to: [api.example.com]\n    ports: [443]\n\
                 \x20 - to: [db.example.com]\n    ports: [5432]\n  - to: [192.0.2.1]\n    ports: [22]\n"
            )
        };
        let lint_of = |text: String| -> Vec<String> {
            let set = parse_sources(vec![(PathBuf::from("p.yaml"), text)]).unwrap();
            lint(&set).iter().map(ToString::to_string).collect()
        };
        assert_eq!(
            lint_of(policy("")),
            [
                "p.yaml:1: warning: egress[1]: a name rule for ports other than 80, 443, 8080 and 8443 in AgentPolicy \"a\" (sni: enforce): its connections must open with a TLS ClientHello or an HTTP/1 request naming the server, so SSH or a database's own protocol are refused; set `sni: off` or give those destinations an address rule"
            ]
        );
        assert!(lint_of(policy("sni: off\n")).is_empty());
        let bad = parse_sources(vec![(PathBuf::from("p.yaml"), policy("sni: strict\n"))])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("invalid sni \"strict\": expected enforce, audit or off"),
            "{bad}"
        );
    }

    #[test]
    fn io_uring_is_refused_unless_allowed_and_allowing_it_is_warned_about() {
        let parse = |line: &str| {
            parse_sources(vec![(
                PathBuf::from("p.yaml"),
                format!(
                    "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\nowner: t\n{line}"
                ),
            )])
        };
        let set = parse("").unwrap();
        assert_eq!(set.agents[0].io_uring, super::super::model::IoUring::Refuse);
        assert!(lint(&set).is_empty());
        let set = parse("io_uring: allow\n").unwrap();
        assert_eq!(set.agents[0].io_uring, super::super::model::IoUring::Allow);
        let w: Vec<String> = lint(&set).iter().map(ToString::to_string).collect();
        assert_eq!(
            w,
            [
                "p.yaml:1: warning: AgentPolicy \"a\" allows io_uring (io_uring: allow): a process outside it that holds one of the agent's rings can put its own sockets there (IORING_OP_MSG_RING), which the agent then uses unjudged"
            ]
        );
        let bad = parse("io_uring: yes\n").unwrap_err().to_string();
        assert!(
            bad.contains("p.yaml:5:11")
                && bad.contains("invalid io_uring \"yes\": expected refuse or allow"),
            "{bad}"
        );
    }

    #[test]
    fn resolving_any_name_is_warned_about() {
        let set = parse_sources(vec![(
            PathBuf::from("p.yaml"),
            "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\ndns:\n  resolve: [\"**\"]\n".into(),
        )])
        .unwrap();
        let w: Vec<String> = lint(&set).iter().map(ToString::to_string).collect();
        assert!(
            w.iter().any(|w| w.starts_with("p.yaml:1: warning: AgentPolicy \"a\" may resolve any name")),
            "{w:?}"
        );
    }
}
