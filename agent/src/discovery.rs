//! Shadow-AI discovery: a catalog of AI and LLM service endpoints (name patterns), the
//! addresses they are known to have, and the report of which unenrolled processes reached
//! them.
//!
//! Addresses come from two places: the node resolves the catalog's exact names through its
//! upstream resolvers every `catalog_refresh_secs`, and every answer the DNS proxy passes on
//! for a catalog name is remembered too.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use hickory_proto::{
    op::{Message, MessageType, Query},
    rr::{Name, RecordType},
};
use serde::{Deserialize, Serialize};

use crate::{
    policy::{FqdnKind, FqdnPattern},
    review::Flow,
};

/// One service and the names it answers on.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub service: String,
    /// Exact names, `*.` and `**.` patterns.
    pub names: Vec<String>,
}

/// The catalog that ships with agentwall; `ai_catalog` in the node config adds to it.
pub const BUILTIN: &[(&str, &[&str])] = &[
    (
        "OpenAI",
        &["api.openai.com", "**.openai.com", "**.chatgpt.com"],
    ),
    (
        "Anthropic",
        &["api.anthropic.com", "**.anthropic.com", "**.claude.ai"],
    ),
    (
        "Google Gemini / Vertex AI",
        &[
            "generativelanguage.googleapis.com",
            "aiplatform.googleapis.com",
            "us-central1-aiplatform.googleapis.com",
            "us-east4-aiplatform.googleapis.com",
            "europe-west4-aiplatform.googleapis.com",
            "asia-northeast1-aiplatform.googleapis.com",
        ],
    ),
    (
        "AWS Bedrock",
        &[
            "bedrock-runtime.us-east-1.amazonaws.com",
            "bedrock-runtime.us-west-2.amazonaws.com",
            "bedrock-runtime.eu-central-1.amazonaws.com",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "bedrock-runtime.ap-northeast-1.amazonaws.com",
            "bedrock.us-east-1.amazonaws.com",
            "bedrock.us-west-2.amazonaws.com",
        ],
    ),
    (
        "Azure OpenAI",
        &["**.openai.azure.com", "**.cognitiveservices.azure.com"],
    ),
    ("Mistral", &["api.mistral.ai", "**.mistral.ai"]),
    (
        "Cohere",
        &["api.cohere.com", "api.cohere.ai", "**.cohere.com"],
    ),
    (
        "Hugging Face",
        &["huggingface.co", "**.huggingface.co", "**.hf.space"],
    ),
    ("Groq", &["api.groq.com"]),
    ("Together AI", &["api.together.xyz", "api.together.ai"]),
    ("Perplexity", &["api.perplexity.ai"]),
    (
        "MCP (public server)",
        &[
            "mcp.atlassian.com",
            "mcp.notion.com",
            "mcp.linear.app",
            "mcp.stripe.com",
            "mcp.sentry.dev",
            "mcp.deepwiki.com",
            "api.githubcopilot.com",
        ],
    ),
];

#[derive(Debug, thiserror::Error)]
#[error("ai_catalog entry {service:?}: {source}")]
pub struct CatalogError {
    service: String,
    source: crate::policy::FqdnError,
}

/// Services with parsed patterns, and the addresses seen for them.
#[derive(Debug)]
pub struct Catalog {
    services: Vec<(String, Vec<FqdnPattern>)>,
    /// address → (service, name, when learned; kept until `until`)
    addrs: HashMap<IpAddr, (String, String, Instant)>,
}

impl Catalog {
    /// The built-in catalog plus `extra`; a bad name in `extra` is an error naming it.
    pub fn new(extra: &[CatalogEntry]) -> Result<Self, CatalogError> {
        let mut services = Vec::new();
        for (service, names) in BUILTIN {
            let pats = names
                .iter()
                .map(|n| n.parse().expect("built-in catalog names are valid"))
                .collect();
            services.push(((*service).to_owned(), pats));
        }
        for e in extra {
            let pats = e
                .names
                .iter()
                .map(|n| n.parse())
                .collect::<Result<Vec<FqdnPattern>, _>>()
                .map_err(|source| CatalogError {
                    service: e.service.clone(),
                    source,
                })?;
            services.push((e.service.clone(), pats));
        }
        Ok(Self {
            services,
            addrs: HashMap::new(),
        })
    }

    /// The service a name belongs to.
    pub fn service_of_name(&self, name: &str) -> Option<&str> {
        self.services
            .iter()
            .find(|(_, pats)| pats.iter().any(|p| p.matches(name)))
            .map(|(s, _)| s.as_str())
    }

    /// The service and name an address is known for.
    pub fn service_of_addr(&self, ip: IpAddr) -> Option<(&str, &str)> {
        self.addrs
            .get(&ip)
            .filter(|(_, _, until)| *until > Instant::now())
            .map(|(s, n, _)| (s.as_str(), n.as_str()))
    }

    /// Remembers that `name` resolved to `addrs`, for `keep`, when the name is in the catalog.
    pub fn observe(&mut self, name: &str, addrs: &[IpAddr], keep: Duration) {
        let Some(service) = self.service_of_name(name).map(str::to_owned) else {
            return;
        };
        let until = Instant::now() + keep;
        for ip in addrs {
            self.addrs
                .insert(*ip, (service.clone(), name.to_owned(), until));
        }
        self.addrs.retain(|_, (_, _, u)| *u > Instant::now());
    }

    /// The exact names worth resolving (patterns with wildcards cannot be).
    pub fn exact_names(&self) -> Vec<String> {
        self.services
            .iter()
            .flat_map(|(_, pats)| pats.iter())
            .filter(|p| p.kind == FqdnKind::Exact)
            .map(|p| p.suffix.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn known_addresses(&self) -> usize {
        let now = Instant::now();
        self.addrs.values().filter(|(_, _, u)| *u > now).count()
    }
}

/// A/AAAA addresses of `name` from the first upstream that answers (blocking; run off the
/// async workers).
pub fn resolve(upstreams: &[SocketAddr], name: &str, timeout: Duration) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Ok(qname) = Name::from_ascii(format!("{name}.")) else {
        return out;
    };
    for rtype in [RecordType::A, RecordType::AAAA] {
        for up in upstreams {
            let bind = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let Ok(sock) = UdpSocket::bind(bind) else {
                continue;
            };
            let _ = sock.set_read_timeout(Some(timeout));
            let id: u16 = rand_id();
            let mut q = Message::new();
            q.set_id(id)
                .set_recursion_desired(true)
                .add_query(Query::query(qname.clone(), rtype));
            let Ok(bytes) = q.to_vec() else { continue };
            if sock.connect(up).is_err() || sock.send(&bytes).is_err() {
                continue;
            }
            let mut buf = [0u8; 4096];
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let Ok(r) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if r.id() != id || r.message_type() != MessageType::Response {
                continue;
            }
            if let Some(a) = crate::dns::read_answer(&q, &r) {
                out.extend(a.addrs.into_iter().map(|(ip, _)| ip));
            }
            break;
        }
    }
    out
}

fn rand_id() -> u16 {
    // The clock's low bits: only a guard against stale replies on a fresh socket.
    (SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        & 0xffff) as u16
}

/// What one process group reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ServiceUse {
    pub service: String,
    /// Names and addresses, with ports.
    pub destinations: BTreeSet<String>,
    /// Distinct destinations seen past the [`SHADOW_DESTINATIONS`] listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub destinations_left_out: u64,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most process groups one fold keeps: the group key is made of what a node reports (unit
/// names, executables), so a node could name millions. Records of further groups are
/// counted ([`ShadowFold::left_out`]), not kept.
pub const SHADOW_GROUPS: usize = 1_000;
/// Most destinations listed per group and service, and distinct flows kept per group (for
/// its suggested policy).
pub const SHADOW_DESTINATIONS: usize = 256;
/// Services kept per group (the catalog names a few dozen): a node sending free-form service
/// names cannot grow one group without bound. Records of the others are counted as left out.
pub const SHADOW_SERVICES: usize = 64;

/// A process group that talked to AI services without an identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ShadowGroup {
    /// `unit NAME`, `container ID` or `exe PATH (uid N)`.
    pub group: String,
    pub services: Vec<ServiceUse>,
    /// An AgentPolicy to enroll it with.
    pub suggested_policy: String,
}

/// Groups unknown flows tagged with a service by process group.
pub fn shadow_ai(records: &[serde_json::Value]) -> Vec<ShadowGroup> {
    let mut fold = ShadowFold::default();
    for r in records {
        fold.add(r);
    }
    fold.finish()
}

/// A distinct flow: destination, port, UDP or not, name.
type FlowKey = (IpAddr, u16, bool, Option<String>);
/// What one process group did: per service, and each distinct flow with its count.
type GroupUse = (BTreeMap<String, ServiceUse>, BTreeMap<FlowKey, u64>);

/// The process group a shadow-AI record belongs to: its systemd unit, else its container,
/// else its executable and user.
pub fn group_of(r: &impl crate::audit::Fields) -> String {
    let s = |k: &str| r.text(k);
    if let Some(u) = s("unit") {
        format!("unit {u}")
    } else if let Some(c) = s("container") {
        format!("container {c}")
    } else {
        format!(
            "exe {} (uid {})",
            s("exe").unwrap_or_else(|| s("comm").unwrap_or_default()),
            r.u64("uid").unwrap_or(0)
        )
    }
}

/// [`shadow_ai`] one record at a time: what it keeps grows with the distinct groups,
/// services and destinations, not with the records (a node can report millions).
#[derive(Default)]
pub struct ShadowFold {
    groups: BTreeMap<String, GroupUse>,
    left_out: u64,
}

impl ShadowFold {
    /// Records not folded because their group came after [`SHADOW_GROUPS`] others, or their
    /// service after [`SHADOW_SERVICES`] others of its group.
    pub fn left_out(&self) -> u64 {
        self.left_out
    }

    pub fn add(&mut self, r: &impl crate::audit::Fields) {
        let s = |k: &str| r.text(k);
        if s("verdict").as_deref() != Some("unknown") {
            return;
        }
        let Some(service) = s("service") else {
            return;
        };
        let group = group_of(r);
        let Ok(port) = u16::try_from(r.u64("port").unwrap_or(0)) else {
            self.left_out += 1;
            return;
        };
        let count = r.u64("count").unwrap_or(1);
        let dest = s("dest").unwrap_or_default();
        let name = crate::review::host_name(s("fqdn"));
        let first = s("first_seen").or_else(|| s("time")).unwrap_or_default();
        let last = s("last_seen").or_else(|| s("time")).unwrap_or_default();
        if self.groups.len() >= SHADOW_GROUPS && !self.groups.contains_key(&group) {
            self.left_out += 1;
            return;
        }
        let (acc, flows) = self.groups.entry(group).or_default();
        if acc.len() >= SHADOW_SERVICES && !acc.contains_key(&service) {
            self.left_out += 1;
            return;
        }
        let u = acc.entry(service.clone()).or_insert_with(|| ServiceUse {
            service: service.clone(),
            destinations: BTreeSet::new(),
            destinations_left_out: 0,
            count: 0,
            first_seen: first.clone(),
            last_seen: last.clone(),
        });
        let shown = match &name {
            Some(n) => format!("{n} ({dest}):{port}"),
            None => format!("{dest}:{port}"),
        };
        if u.destinations.len() < SHADOW_DESTINATIONS || u.destinations.contains(&shown) {
            u.destinations.insert(shown);
        } else {
            u.destinations_left_out += 1;
        }
        u.count = u.count.saturating_add(count);
        if first < u.first_seen {
            u.first_seen = first;
        }
        if last > u.last_seen {
            u.last_seen = last;
        }
        if let (Ok(ip), Some(proto)) = (dest.parse(), s("protocol")) {
            let key = (ip, port, proto == "udp", name);
            if flows.len() < SHADOW_DESTINATIONS || flows.contains_key(&key) {
                let n = flows.entry(key).or_default();
                *n = n.saturating_add(count);
            }
        }
    }

    pub fn finish(self) -> Vec<ShadowGroup> {
        self.groups
            .into_iter()
            .map(|(group, (acc, flows))| {
                let flows: Vec<Flow> = flows
                    .into_iter()
                    .map(|((dest, port, udp, fqdn), count)| Flow {
                        identity: String::new(),
                        dest,
                        port,
                        protocol: if udp {
                            crate::policy::Protocol::Udp
                        } else {
                            crate::policy::Protocol::Tcp
                        },
                        fqdn,
                        verdict: "unknown".into(),
                        reason: None,
                        rule_id: None,
                        revision: String::new(),
                        count,
                        time: None,
                        inbound: false,
                    })
                    .collect();
                let slug: String = group
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
                    .split('-')
                    .filter(|p| !p.is_empty())
                    .take(4)
                    .collect::<Vec<_>>()
                    .join("-");
                let identity = format!("spiffe://YOUR-TRUST-DOMAIN/agent/{slug}");
                ShadowGroup {
                    group,
                    services: acc.into_values().collect(),
                    suggested_policy: crate::review::suggest_for(&identity, &flows, &[]),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_matches_names_and_learns_addresses() {
        let mut c = Catalog::new(&[CatalogEntry {
            service: "Internal LLM".into(),
            names: vec!["llm.corp.example".into()],
        }])
        .unwrap();
        assert_eq!(c.service_of_name("API.OpenAI.com."), Some("OpenAI"));
        assert_eq!(
            c.service_of_name("x.y.openai.azure.com"),
            Some("Azure OpenAI")
        );
        assert_eq!(c.service_of_name("llm.corp.example"), Some("Internal LLM"));
        assert_eq!(c.service_of_name("example.com"), None);
        let ip: IpAddr = "203.0.113.80".parse().unwrap();
        c.observe("api.openai.com", &[ip], Duration::from_secs(60));
        assert_eq!(c.service_of_addr(ip), Some(("OpenAI", "api.openai.com")));
        assert!(c.exact_names().contains(&"api.anthropic.com".to_owned()));
        assert!(!c.exact_names().iter().any(|n| n.contains('*')));
        let err = Catalog::new(&[CatalogEntry {
            service: "Bad".into(),
            names: vec!["*.com".into()],
        }])
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("ai_catalog entry \"Bad\": \"*.com\""),
            "{err}"
        );
    }

    #[test]
    fn a_fold_keeps_a_bounded_number_of_groups_and_destinations() {
        let rec = |unit: &str, dest: &str| {
            serde_json::json!({"verdict": "unknown", "service": "OpenAI", "unit": unit,
                "dest": dest, "port": 443, "protocol": "tcp", "time": "2026-12-02T00:00:00Z"})
        };
        let mut fold = ShadowFold::default();
        for i in 0..SHADOW_GROUPS + 5 {
            fold.add(&rec(&format!("u{i}.service"), "203.0.113.1"));
        }
        // A group already kept still counts once the cap is reached.
        fold.add(&rec("u0.service", "203.0.113.1"));
        for i in 0..SHADOW_DESTINATIONS + 3 {
            let d = std::net::Ipv4Addr::from(0xc633_6400_u32 + i as u32).to_string();
            fold.add(&rec("u1.service", &d));
        }
        assert_eq!(fold.left_out(), 5);
        let groups = fold.finish();
        assert_eq!(groups.len(), SHADOW_GROUPS);
        let u0 = groups
            .iter()
            .find(|g| g.group == "unit u0.service")
            .unwrap();
        assert_eq!(u0.services[0].count, 2);
        let u1 = groups
            .iter()
            .find(|g| g.group == "unit u1.service")
            .unwrap();
        assert_eq!(u1.services[0].destinations.len(), SHADOW_DESTINATIONS);
        assert_eq!(u1.services[0].destinations_left_out, 4);

        // Free-form service names in one group stop at the cap too.
        let mut fold = ShadowFold::default();
        for i in 0..SHADOW_SERVICES + 7 {
            let mut r = rec("u.service", "203.0.113.1");
            r["service"] = format!("svc-{i}").into();
            fold.add(&r);
        }
        assert_eq!(fold.left_out(), 7);
        assert_eq!(fold.finish()[0].services.len(), SHADOW_SERVICES);
    }
}
