//! The reference evaluator: the verdict the kernel gives, computed from the rule model directly
//! (not from compiled entries), so a differential test checks compiler and kernel together.

use std::net::IpAddr;

use agent_common as c;
use ipnet::IpNet;

use super::model::{
    Direction, IdentityStatus, IdentityView, Mode, Net, Protocol, Reason, Rule, UnknownFlows,
};
use crate::clock::BootInstant;

/// Who is asking: a cgroup bound to no identity, or an identity (whose state may be unknown to
/// the datapath, which fails closed).
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    Unbound,
    Bound {
        view: Option<IdentityView>,
        rules: &'a [Rule],
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// A verdict and the record it produces, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// `agent_common::EVENT_*`, 0 when nothing is reported.
    pub event_kind: u8,
    pub reason: Option<Reason>,
    /// The rule that allowed the flow (or was overruled by the global deny list); 0 = none.
    pub rule_id: u32,
}

impl Decision {
    const fn allow() -> Self {
        Self {
            verdict: Verdict::Allow,
            event_kind: 0,
            reason: None,
            rule_id: 0,
        }
    }

    const fn deny(reason: Reason) -> Self {
        Self {
            verdict: Verdict::Deny,
            event_kind: c::EVENT_DENY,
            reason: Some(reason),
            rule_id: 0,
        }
    }
}

/// Judges a connect or an unconnected UDP send. `proto` is Tcp or Udp.
pub fn evaluate_flow(
    subject: Subject<'_>,
    global_deny: &[IpNet],
    unknown: UnknownFlows,
    dest: IpAddr,
    port: u16,
    proto: Protocol,
    now: BootInstant,
) -> Decision {
    let (view, rules) = match subject {
        Subject::Unbound => {
            return match unknown {
                UnknownFlows::Ignore => Decision::allow(),
                UnknownFlows::Deny => Decision::deny(Reason::Unbound),
                UnknownFlows::Report => Decision {
                    event_kind: c::EVENT_UNKNOWN_FLOW,
                    ..Decision::allow()
                },
            };
        }
        Subject::Bound { view, rules } => (view, rules),
    };
    let Some(view) = view.filter(|v| v.status == IdentityStatus::Active) else {
        return Decision::deny(Reason::Revoked);
    };
    if view.not_after.is_some_and(|t| now >= t) {
        return Decision::deny(Reason::Expired);
    }
    let host = Net::host(super::model::judged_destination(dest));
    let v4 = host.is_v4();
    let best = rules
        .iter()
        .filter(|r| r.expires.is_none_or(|e| now < e))
        .filter(|r| r.direction == Direction::Egress && r.protocol.mask() & proto.mask() != 0)
        .filter(|r| r.ports.is_empty() || r.ports.iter().any(|p| p.contains(port)))
        .flat_map(|r| {
            r.to.iter()
                .map(|n| Net::from(*n))
                .filter(|n| n.is_v4() == v4 && n.contains(&host))
                .map(move |n| (n.len, r.id))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let (reason, rule_id) = match best {
        None => (Reason::NoRule, 0),
        Some((len, id)) => {
            let deny_len = global_deny
                .iter()
                .map(|n| Net::from(*n))
                .filter(|n| n.is_v4() == v4 && n.contains(&host))
                .map(|n| n.len)
                .max();
            match deny_len {
                Some(d) if len < d => (Reason::GlobalDeny, id),
                _ => {
                    return Decision {
                        rule_id: id,
                        ..Decision::allow()
                    };
                }
            }
        }
    };
    match view.mode {
        Mode::Audit => Decision {
            verdict: Verdict::Allow,
            event_kind: c::EVENT_AUDIT,
            reason: Some(reason),
            rule_id,
        },
        Mode::Enforce => Decision {
            rule_id,
            ..Decision::deny(reason)
        },
    }
}

/// Judges socket creation: governed identities may open TCP and UDP sockets only.
pub fn evaluate_socket(subject: Subject<'_>, sock_type: i32, protocol: i32) -> Decision {
    let tcp_or_udp = (sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP)
        || (sock_type == libc::SOCK_DGRAM && protocol == libc::IPPROTO_UDP);
    let Subject::Bound { view, .. } = subject else {
        return Decision::allow();
    };
    if tcp_or_udp {
        return Decision::allow();
    }
    let audit = view.is_some_and(|v| v.status == IdentityStatus::Active && v.mode == Mode::Audit);
    Decision {
        verdict: if audit { Verdict::Allow } else { Verdict::Deny },
        event_kind: if audit {
            c::EVENT_AUDIT
        } else {
            c::EVENT_SOCK_DENY
        },
        reason: Some(Reason::SocketType),
        rule_id: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIVE: IdentityView = IdentityView {
        status: IdentityStatus::Active,
        mode: Mode::Enforce,
        not_after: None,
    };

    fn rule(id: u32, to: &str, ports: &[&str]) -> Rule {
        Rule {
            id,
            fqdns: Vec::new(),
            to: vec![to.parse().unwrap()],
            ports: ports.iter().map(|s| s.parse().unwrap()).collect(),
            protocol: Protocol::Any,
            direction: crate::policy::model::Direction::Egress,
            expires: None,
            ech: Box::default(),
            learned: false,
        }
    }

    fn eval(rules: &[Rule], gd: &[&str], dest: &str, port: u16) -> Decision {
        let gd: Vec<IpNet> = gd.iter().map(|s| s.parse().unwrap()).collect();
        evaluate_flow(
            Subject::Bound {
                view: Some(ACTIVE),
                rules,
            },
            &gd,
            UnknownFlows::Report,
            dest.parse().unwrap(),
            port,
            Protocol::Tcp,
            BootInstant::now(),
        )
    }

    #[test]
    fn wider_rule_ports_stay_visible_under_a_narrower_cidr() {
        let rules = [
            rule(1, "10.0.0.0/8", &["443"]),
            rule(2, "10.1.0.0/16", &["80"]),
        ];
        assert_eq!(eval(&rules, &[], "10.1.2.3", 443).verdict, Verdict::Allow);
        assert_eq!(eval(&rules, &[], "10.1.2.3", 80).rule_id, 2);
        assert_eq!(
            eval(&rules, &[], "10.2.2.3", 80).reason,
            Some(Reason::NoRule)
        );
    }

    #[test]
    fn global_deny_yields_only_to_an_exact_rule() {
        let wide = [rule(1, "169.254.0.0/16", &[])];
        let d = eval(&wide, &["169.254.169.254/32"], "169.254.169.254", 80);
        assert_eq!(
            (d.verdict, d.reason, d.rule_id),
            (Verdict::Deny, Some(Reason::GlobalDeny), 1)
        );
        let exact = [rule(1, "169.254.169.254/32", &[])];
        let d = eval(&exact, &["169.254.169.254/32"], "169.254.169.254", 80);
        assert_eq!(d.verdict, Verdict::Allow);
    }

    #[test]
    fn ipv6_rules_never_cover_ipv4() {
        let rules = [rule(1, "::/0", &[])];
        assert_eq!(eval(&rules, &[], "192.0.2.1", 80).verdict, Verdict::Deny);
        assert_eq!(
            eval(&rules, &[], "::ffff:192.0.2.1", 80).verdict,
            Verdict::Deny
        );
        assert_eq!(eval(&rules, &[], "2001:db8::1", 80).verdict, Verdict::Allow);
    }
}
