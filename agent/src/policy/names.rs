//! DNS policy: which names an identity may resolve through the node's proxy, and which query
//! types. A name is resolvable when one of the identity's name rules allows it (resolving is
//! how those rules are used) or its `dns.resolve` list names it (resolve without connect
//! rights). Query types are those that lead to addresses (A, AAAA, CNAME, HTTPS, SVCB) plus
//! the ones `dns.types` lists. Everything else gets REFUSED, and nothing leaves the host: a
//! DNS query is a channel out, and an agent must not be able to use it as one.

use std::{collections::BTreeSet, fmt, str::FromStr};

use super::{
    fqdn::FqdnPattern,
    source::{AgentPolicy, PolicySet},
};

/// Query types every identity may ask for (A, CNAME, AAAA, SVCB, HTTPS).
pub const DEFAULT_QUERY_TYPES: [u16; 5] = [1, 5, 28, 64, 65];

/// A DNS query type, by its name in policy files (`TXT`, `MX`, `PTR`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueryType(pub u16);

impl FromStr for QueryType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = hickory_proto::rr::RecordType::from_str(&s.to_ascii_uppercase())
            .map_err(|_| format!("{s:?} is not a DNS query type (e.g. TXT, MX, SRV, PTR)"))?;
        match t {
            hickory_proto::rr::RecordType::Unknown(_) => Err(format!(
                "{s:?} is not a DNS query type (e.g. TXT, MX, SRV, PTR)"
            )),
            t => Ok(Self(u16::from(t))),
        }
    }
}

impl fmt::Display for QueryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hickory_proto::rr::RecordType::from(self.0))
    }
}

/// A `dns.resolve` entry: a name pattern, or `**` (any name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolvable {
    Any,
    Name(FqdnPattern),
}

impl FromStr for Resolvable {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "**" {
            return Ok(Self::Any);
        }
        s.parse::<FqdnPattern>()
            .map(Self::Name)
            .map_err(|e| e.to_string())
    }
}

/// An AgentPolicy's `dns` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsSection {
    pub resolve: Vec<Resolvable>,
    pub types: Vec<QueryType>,
}

/// Why a query is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Name,
    Type(QueryType),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name => f.write_str("no name rule or dns.resolve entry allows the name"),
            Self::Type(t) => write!(f, "query type {t} is not allowed (dns.types)"),
        }
    }
}

/// What one identity may resolve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamePolicy {
    pub names: Vec<FqdnPattern>,
    /// `dns.resolve: ["**"]`.
    pub any: bool,
    pub types: BTreeSet<u16>,
}

impl NamePolicy {
    /// The names and types `agent` may resolve in `set` (its archetypes' name rules too).
    /// What `agent` may resolve at `now`: the names of its rules in force then (an ended
    /// rule or grant, or one outside its schedule window, lets nothing be resolved; the
    /// node applies the policy again at each such change, see
    /// [`PolicySet::next_schedule_change`]).
    pub fn of(set: &PolicySet, agent: &AgentPolicy, now: std::time::SystemTime) -> Self {
        let at = time::OffsetDateTime::from(now);
        let mut names: Vec<FqdnPattern> = set
            .rule_sources(agent)
            .into_iter()
            .filter(|(_, r)| r.expires.is_none_or(|e| at < e))
            .filter(|(_, r)| {
                r.schedule.as_ref().is_none_or(|s| {
                    matches!(s.at(now), crate::policy::schedule::Window::Open { .. })
                })
            })
            .flat_map(|(_, r)| r.fqdns.iter().cloned())
            .collect();
        let mut any = false;
        for r in &agent.dns.resolve {
            match r {
                Resolvable::Any => any = true,
                Resolvable::Name(p) => names.push(p.clone()),
            }
        }
        names.sort();
        names.dedup();
        let types = DEFAULT_QUERY_TYPES
            .into_iter()
            .chain(agent.dns.types.iter().map(|t| t.0))
            .collect();
        Self { names, any, types }
    }

    /// Whether a query for `name` of type `qtype` may be forwarded.
    pub fn check(&self, name: &str, qtype: u16) -> Result<(), Refusal> {
        if !self.types.contains(&qtype) {
            return Err(Refusal::Type(QueryType(qtype)));
        }
        if self.any || self.names.iter().any(|p| p.matches(name)) {
            return Ok(());
        }
        Err(Refusal::Name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> PolicySet {
        super::super::source::parse_sources(vec![("p.yaml".into(), text.into())]).unwrap()
    }

    #[test]
    fn names_come_from_name_rules_and_the_resolve_list() {
        let set = policy(
            "kind: Archetype\nname: base\negress:\n  - to: [\"*.cdn.example\"]\n    ports: [443]\n---\n\
             kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\nextends: [base]\n\
             dns:\n  resolve: [db.internal.example]\n  types: [txt]\negress:\n  - to: [api.example.com, 192.0.2.0/24]\n    ports: [443]\n",
        );
        let p = NamePolicy::of(&set, &set.agents[0], std::time::SystemTime::now());
        let (a, txt, mx) = (1, 16, 15);
        assert_eq!(p.check("API.example.com.", a), Ok(()));
        assert_eq!(p.check("x.cdn.example", a), Ok(()));
        assert_eq!(p.check("db.internal.example", txt), Ok(()));
        assert_eq!(p.check("data123.attacker.example", txt), Err(Refusal::Name));
        assert_eq!(
            p.check("api.example.com", mx),
            Err(Refusal::Type(QueryType(mx)))
        );
        assert_eq!(
            Refusal::Type(QueryType(mx)).to_string(),
            "query type MX is not allowed (dns.types)"
        );
    }

    #[test]
    fn an_ended_rule_or_grant_lets_nothing_be_resolved_and_its_end_reapplies_the_policy() {
        let set = super::super::source::parse_sources(vec![
            (
                "a.yaml".into(),
                "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\negress:\n  - to: [api.example.com]\n    expires: 2030-01-01T00:00:00Z\n".into(),
            ),
            (
                "grant-1.yaml".into(),
                "kind: Grant\nname: g\nidentity: spiffe://example.org/a\nreason: r\nuntil: 2030-01-01T01:00:00Z\negress:\n  - to: [\"**.attacker.example\"]\n".into(),
            ),
        ])
        .unwrap();
        let t = |s: &str| std::time::SystemTime::from(crate::clock::parse_rfc3339(s).unwrap());
        let a = &set.agents[0];
        let before = NamePolicy::of(&set, a, t("2029-12-31T23:00:00Z"));
        assert_eq!(before.check("x.attacker.example", 1), Ok(()));
        assert_eq!(before.check("api.example.com", 1), Ok(()));
        let between = NamePolicy::of(&set, a, t("2030-01-01T00:30:00Z"));
        assert_eq!(between.check("api.example.com", 1), Err(Refusal::Name));
        assert_eq!(between.check("x.attacker.example", 1), Ok(()));
        let after = NamePolicy::of(&set, a, t("2030-01-01T01:00:00Z"));
        assert_eq!(after.check("x.attacker.example", 1), Err(Refusal::Name));
        // The node applies the policy again at each end.
        assert_eq!(
            set.next_schedule_change(t("2029-12-31T23:00:00Z")),
            Some(t("2030-01-01T00:00:00Z"))
        );
        assert_eq!(
            set.next_schedule_change(t("2030-01-01T00:30:00Z")),
            Some(t("2030-01-01T01:00:00Z"))
        );
        assert_eq!(set.next_schedule_change(t("2030-01-01T01:00:00Z")), None);
    }

    #[test]
    fn any_name_is_an_explicit_choice() {
        let set = policy(
            "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\ndns:\n  resolve: [\"**\"]\n",
        );
        let p = NamePolicy::of(&set, &set.agents[0], std::time::SystemTime::now());
        assert_eq!(p.check("anything.example", 28), Ok(()));
        assert_eq!(
            p.check("anything.example", 16),
            Err(Refusal::Type(QueryType(16)))
        );
        let bare = policy("kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\n");
        assert_eq!(
            NamePolicy::of(&bare, &bare.agents[0], std::time::SystemTime::now())
                .check("api.example.com", 1),
            Err(Refusal::Name)
        );
    }
}
