//! Policy as code: YAML documents in a directory, validated into the rule model.
//!
//! Every error names file, line and column and the offending value. Values are checked while
//! they are deserialized (ports, CIDRs, protocols, times), so the YAML parser's own location
//! points at the value; checks across documents (names, `extends`, identities) point at the
//! document. A directory with any error yields no policy at all: nothing is half-applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};
use sha2::{Digest, Sha256};

use super::{
    fqdn::FqdnPattern,
    model::{Direction, Mode, PortRange, Protocol, Rule},
    schedule::{Schedule, Window},
};
use crate::clock::BootInstant;

/// One problem, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the file as a whole (it could not be read).
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every error found in a policy directory (parsing goes on past the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Where a document or rule came from, for errors and decision records.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// Shared by every rule of the file: a policy of 100,000 rules keeps one copy of each path.
    pub file: std::sync::Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A rule destination: an address or CIDR. Names are recognised so the error can say that
/// FQDN rules are not supported yet rather than that the value is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Dest {
    Net(IpNet),
    Name(FqdnPattern),
}

impl<'de> Deserialize<'de> for Dest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_dest(&s).map_err(de::Error::custom)
    }
}

/// A GlobalDeny entry: addresses and CIDRs only.
struct DenyDest(IpNet);

impl<'de> Deserialize<'de> for DenyDest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match parse_dest(&s).map_err(de::Error::custom)? {
            Dest::Net(n) => Ok(DenyDest(n)),
            Dest::Name(_) => Err(de::Error::custom(format!(
                "{s:?}: GlobalDeny takes addresses and CIDRs; a name is denied by leaving it out of every rule"
            ))),
        }
    }
}

/// An ingress peer: addresses and CIDRs only (a name's addresses are learned from the agent's
/// own lookups, which say nothing about who may connect in).
struct PeerSpec(IpNet);

impl<'de> Deserialize<'de> for PeerSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match parse_dest(&s).map_err(de::Error::custom)? {
            Dest::Net(n) => Ok(PeerSpec(n)),
            Dest::Name(_) => Err(de::Error::custom(format!(
                "{s:?}: ingress peers are addresses and CIDRs, not names"
            ))),
        }
    }
}

fn parse_dest(s: &str) -> Result<Dest, String> {
    if s.starts_with('*') || !s.is_ascii() || looks_like_name(s.strip_suffix('.').unwrap_or(s)) {
        return s
            .parse::<FqdnPattern>()
            .map(Dest::Name)
            .map_err(|e| e.problem.clone())
            .map_err(|p| format!("{s:?}: {p}"));
    }
    parse_net(s).map(Dest::Net)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    match s.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Ok(net),
        Ok(net) => Err(format!(
            "{s:?} has host bits set; the network is {}",
            net.trunc()
        )),
        Err(_) => Err(format!(
            "{s:?} is not an IP address or CIDR (e.g. 192.0.2.0/24, 2001:db8::/32)"
        )),
    }
}

fn looks_like_name(s: &str) -> bool {
    let s = s
        .strip_prefix("**.")
        .or_else(|| s.strip_prefix("*."))
        .unwrap_or(s);
    s.contains('.')
        && s.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        && s.bytes().any(|b| b.is_ascii_alphabetic())
}

macro_rules! deserialize_from_str {
    ($ty:ident, $inner:ty) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        struct $ty($inner);
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = StringOrNumber::deserialize(d)?.0;
                <$inner>::from_str(&s).map($ty).map_err(de::Error::custom)
            }
        }
    };
}

/// Ports may be written as numbers or strings.
struct StringOrNumber(String);

impl<'de> Deserialize<'de> for StringOrNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = StringOrNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StringOrNumber(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StringOrNumber(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StringOrNumber(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

deserialize_from_str!(PortSpec, PortRange);
deserialize_from_str!(ProtocolSpec, Protocol);
deserialize_from_str!(ModeSpec, Mode);
deserialize_from_str!(SniSpec, super::model::SniCheck);
deserialize_from_str!(IoUringSpec, super::model::IoUring);

/// An RFC 3339 time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expires(time::OffsetDateTime);

impl<'de> Deserialize<'de> for Expires {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::clock::parse_rfc3339(&s).map(Expires).map_err(|e| {
            de::Error::custom(format!(
                "expires {s:?} is not an RFC 3339 time (e.g. 2026-12-31T18:00:00Z): {e}"
            ))
        })
    }
}

/// A schedule, checked where it is written.
struct ScheduleSpec(Schedule);

impl<'de> Deserialize<'de> for ScheduleSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ScheduleSpec).map_err(de::Error::custom)
    }
}

/// An `ingress` entry: who may reach which local ports.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngressRule {
    from: Vec<PeerSpec>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    protocol: Option<ProtocolSpec>,
    #[serde(default)]
    expires: Option<Expires>,
    #[serde(default)]
    schedule: Option<ScheduleSpec>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    to: Vec<Dest>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    /// ECH public names accepted as the server name at the addresses the rule's names learn.
    #[serde(default)]
    ech: Vec<EchName>,
    #[serde(default)]
    protocol: Option<ProtocolSpec>,
    #[serde(default)]
    expires: Option<Expires>,
    #[serde(default)]
    schedule: Option<ScheduleSpec>,
    #[serde(default)]
    reason: Option<String>,
}

deserialize_from_str!(QueryTypeSpec, super::names::QueryType);

/// An `ech` entry: a name, never a pattern, lower case without a trailing dot.
struct EchName(Box<str>);

impl<'de> Deserialize<'de> for EchName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let p: FqdnPattern = s.parse().map_err(|e: super::fqdn::FqdnError| {
            de::Error::custom(format!("{s:?}: {}", e.problem))
        })?;
        if p.kind != super::fqdn::FqdnKind::Exact {
            return Err(de::Error::custom(format!(
                "{s:?}: an ECH public name is one name, not a pattern"
            )));
        }
        Ok(Self(p.suffix.into_boxed_str()))
    }
}

/// A `dns.resolve` entry.
struct ResolveSpec(super::names::Resolvable);

impl<'de> Deserialize<'de> for ResolveSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ResolveSpec).map_err(de::Error::custom)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    resolve: Vec<ResolveSpec>,
    #[serde(default)]
    types: Vec<QueryTypeSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentPolicy {
    #[allow(dead_code)]
    kind: String,
    name: String,
    identity: String,
    #[serde(default)]
    owner: Option<super::owner::Owner>,
    #[serde(default)]
    labels: super::owner::Labels,
    #[serde(default)]
    mode: Option<ModeSpec>,
    #[serde(default)]
    sni: Option<SniSpec>,
    #[serde(default)]
    io_uring: Option<IoUringSpec>,
    #[serde(default)]
    extends: Vec<String>,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    egress: Vec<RawRule>,
    #[serde(default)]
    ingress: Vec<RawIngressRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArchetype {
    #[allow(dead_code)]
    kind: String,
    name: String,
    #[serde(default)]
    extends: Vec<String>,
    #[serde(default)]
    egress: Vec<RawRule>,
    #[serde(default)]
    ingress: Vec<RawIngressRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobalDeny {
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    to: Vec<DenyDest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[allow(dead_code)]
    kind: String,
    name: String,
    identity: String,
    reason: String,
    until: Expires,
    #[serde(default)]
    break_glass: Option<bool>,
    egress: Vec<RawRule>,
}

#[derive(Deserialize)]
struct KindOnly {
    kind: Option<String>,
}

/// A rule as written, with where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSource {
    /// Inline for the common one address; a policy keeps every rule for its whole life.
    pub to: smallvec::SmallVec<[IpNet; 1]>,
    /// Name patterns; their addresses are learned from the identity's own DNS answers.
    pub fqdns: Vec<FqdnPattern>,
    /// ECH public names the server-name check accepts at the addresses `fqdns` learn.
    pub ech: Box<[Box<str>]>,
    /// Empty means any port.
    pub ports: smallvec::SmallVec<[PortRange; 2]>,
    pub protocol: Protocol,
    pub expires: Option<time::OffsetDateTime>,
    /// Allowed only inside these windows.
    /// Boxed: few rules have one, and every rule pays for the field.
    pub schedule: Option<Box<Schedule>>,
    pub reason: Option<Box<str>>,
    /// `egress` (`to` are destinations) or `ingress` (`to` are the peers allowed in, and
    /// `ports` local ports).
    pub direction: Direction,
    /// The document the rule is in, and its position in that document's `egress` or
    /// `ingress`.
    pub origin: Origin,
    pub index: usize,
}

impl RuleSource {
    /// "file:line egress[i]" (or ingress[i]), for messages.
    pub fn place(&self) -> String {
        format!("{} {}[{}]", self.origin, self.direction, self.index)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archetype {
    pub name: String,
    pub extends: Vec<String>,
    pub egress: Vec<RuleSource>,
    pub ingress: Vec<RuleSource>,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPolicy {
    pub name: String,
    pub identity: String,
    /// Who answers for it: carried into its records.
    pub owner: Option<super::owner::Owner>,
    pub labels: super::owner::Labels,
    pub mode: Mode,
    /// The TLS server-name check of its connections that only a name rule allows.
    pub sni: super::model::SniCheck,
    /// Whether the agents `launch` starts under it may use io_uring (read at launch).
    pub io_uring: super::model::IoUring,
    pub extends: Vec<String>,
    /// What it may resolve beyond its name rules, and which query types.
    pub dns: super::names::DnsSection,
    pub egress: Vec<RuleSource>,
    /// Who may reach its listeners and sockets from outside the host.
    pub ingress: Vec<RuleSource>,
    pub origin: Origin,
}

/// Temporary access on top of an identity's AgentPolicy (`agentwall cp grant`): its egress
/// rules are the identity's too, each ending at `until` at the latest, in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub identity: String,
    /// Why it was given: kept for the review afterwards.
    pub reason: String,
    pub until: time::OffsetDateTime,
    /// Given in an emergency, ahead of the approvals a bundle needs: flagged for review.
    pub break_glass: bool,
    pub egress: Vec<RuleSource>,
    pub origin: Origin,
}

/// Longest grant reason.
pub const MAX_GRANT_REASON: usize = 1024;

/// A validated policy directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    /// Content hash of every file (name and bytes): carried by every decision record.
    pub revision: String,
    /// The whole SHA-256 `revision` is the first 8 bytes of: what signatures cover (64 bits
    /// are few enough to find two bundles of one revision).
    pub digest: String,
    pub agents: Vec<AgentPolicy>,
    pub archetypes: BTreeMap<String, Archetype>,
    /// From `GlobalDeny` documents; when there is none, the built-in default applies.
    pub global_deny: Option<Vec<IpNet>>,
    /// Where each identity's AgentPolicy is in `agents`.
    pub by_identity: std::collections::HashMap<String, usize>,
    /// Grants, in the order written; their rules are in their identities' `egress` too.
    pub grants: Vec<Grant>,
    /// The files this was read from (name, text), so the node can keep the last good policy.
    pub sources: Vec<(PathBuf, String)>,
}

fn err_at(file: &Path, line: usize, column: usize, message: impl Into<String>) -> PolicyError {
    PolicyError {
        file: file.to_owned(),
        line,
        column,
        message: message.into(),
    }
}

/// Splits a YAML stream into documents at `---` lines; returns (first line, text) pairs.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs.into_iter()
        .filter(|(_, t)| {
            t.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// The kind of a document whose top level states a known one on a line of its own.
fn plain_kind(doc: &str) -> Option<&str> {
    let mut kinds = doc.lines().filter_map(|l| l.strip_prefix("kind:"));
    let k = kinds.next()?.trim();
    // Twice is the parser's to report.
    if kinds.next().is_some() {
        return None;
    }
    matches!(k, "AgentPolicy" | "Archetype" | "GlobalDeny" | "Grant").then_some(k)
}

fn yaml_err(file: &Path, doc: &str, first_line: usize, e: &serde_yaml_ng::Error) -> PolicyError {
    // The library appends "at line X column Y" relative to the document; we give our own.
    let msg = e.to_string();
    let msg = match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg,
    };
    let (line, col) = match e.location() {
        Some(l) => refine(doc, l.line(), l.column(), &msg),
        None => (1, 1),
    };
    // `*.example.com` unquoted is an alias to YAML, and the parser's complaint says nothing
    // of that: point at the star and say what to write.
    if let Some(text) = doc.lines().nth(line.saturating_sub(1)) {
        if let Some(star) = text
            .find("*.")
            .filter(|&i| !text[..i].ends_with(['"', '\'']))
        {
            let name: String = text[star..]
                .chars()
                .take_while(|c| !matches!(c, ',' | ']' | ' ' | '}'))
                .collect();
            return err_at(
                file,
                first_line + line - 1,
                text[..star].chars().count() + 1,
                format!(
                    "a wildcard name must be quoted in YAML ({name:?}): an unquoted `*` starts an alias"
                ),
            );
        }
    }
    err_at(file, first_line + line - 1, col, msg)
}

/// The parser places errors raised by our value checks at the enclosing collection; the
/// message quotes the offending value (`"x"` or `` `x` ``), so look for it from there on.
fn refine(doc: &str, line: usize, col: usize, msg: &str) -> (usize, usize) {
    let quoted = ['"', '`'].iter().find_map(|&q| {
        let start = msg.find(q)? + 1;
        let len = msg[start..].find(q)?;
        Some(&msg[start..start + len])
    });
    let Some(value) = quoted.filter(|v| !v.is_empty()) else {
        return (line, col);
    };
    // Columns count characters, not bytes.
    for (i, text) in doc.lines().enumerate().skip(line.saturating_sub(1)) {
        let from = if i + 1 == line {
            text.char_indices()
                .nth(col.saturating_sub(1))
                .map_or(text.len(), |(b, _)| b)
        } else {
            0
        };
        if let Some(pos) = text[from..].find(value) {
            let mut pos = from + pos;
            // Point at the opening quote when the value is quoted in the file.
            if text[..pos].ends_with(['"', '\'']) {
                pos -= 1;
            }
            return (i + 1, text[..pos].chars().count() + 1);
        }
    }
    (line, col)
}

/// `ech` names what is accepted beside a rule's names: a rule without names has nothing to
/// accept it beside.
fn ech_on_names(raw: Vec<RawRule>, file: &Path, first: usize) -> Result<Vec<RawRule>, PolicyError> {
    if let Some(i) = raw
        .iter()
        .position(|r| !r.ech.is_empty() && !r.to.iter().any(|d| matches!(d, Dest::Name(_))))
    {
        return Err(err_at(
            file,
            first,
            1,
            format!(
                "egress[{i}]: `ech` lists ECH public names accepted at the addresses a rule's names learn; this rule names no host"
            ),
        ));
    }
    Ok(raw)
}

fn rules(raw: Vec<RawRule>, origin: &Origin) -> Vec<RuleSource> {
    // Not collected in place: that would keep the larger RawRule allocation for good.
    let mut out = Vec::with_capacity(raw.len());
    out.extend(raw.into_iter().enumerate().map(|(index, r)| {
        RuleSource {
            to: r
                .to
                .iter()
                .filter_map(|d| match d {
                    Dest::Net(n) => Some(*n),
                    Dest::Name(_) => None,
                })
                .collect(),
            fqdns: r
                .to
                .into_iter()
                .filter_map(|d| match d {
                    Dest::Name(n) => Some(n),
                    Dest::Net(_) => None,
                })
                .collect(),
            ech: r.ech.into_iter().map(|n| n.0).collect(),
            ports: r.ports.into_iter().map(|p| p.0).collect(),
            protocol: r.protocol.map_or(Protocol::Any, |p| p.0),
            expires: r.expires.map(|e| e.0),
            schedule: r.schedule.map(|s| Box::new(s.0)),
            reason: r.reason.map(String::into_boxed_str),
            direction: Direction::Egress,
            origin: origin.clone(),
            index,
        }
    }));
    out
}

fn ingress_rules(raw: Vec<RawIngressRule>, origin: &Origin) -> Vec<RuleSource> {
    raw.into_iter()
        .enumerate()
        .map(|(index, r)| RuleSource {
            to: r.from.iter().map(|p| p.0).collect(),
            fqdns: Vec::new(),
            ech: Box::default(),
            ports: r.ports.into_iter().map(|p| p.0).collect(),
            protocol: r.protocol.map_or(Protocol::Any, |p| p.0),
            expires: r.expires.map(|e| e.0),
            schedule: r.schedule.map(|s| Box::new(s.0)),
            reason: r.reason.map(String::into_boxed_str),
            direction: Direction::Ingress,
            origin: origin.clone(),
            index,
        })
        .collect()
}

/// Reads and validates every `*.yaml` / `*.yml` file in `dir`.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let io = |e: std::io::Error| PolicyErrors(vec![err_at(dir, 0, 0, e.to_string())]);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml") | Some("yml")
                )
        })
        .collect();
    files.sort();
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        let text = std::fs::read_to_string(&f)
            .map_err(|e| PolicyErrors(vec![err_at(&f, 0, 0, e.to_string())]))?;
        sources.push((f, text));
    }
    parse_sources(sources)
}

/// Validates policy given as (file name, text) pairs; `load_dir` reads them from disk.
/// One document on its own, before any check that involves another.
enum Doc {
    Agent(AgentPolicy),
    Archetype(Archetype),
    GlobalDeny(Vec<IpNet>),
    Grant(Grant),
}

fn parse_document(
    file_arc: &std::sync::Arc<Path>,
    first: usize,
    doc: &str,
) -> Result<Doc, PolicyError> {
    let file: &Path = file_arc;
    let origin = Origin {
        file: file_arc.clone(),
        line: first,
    };
    // Parsing a document just for its kind doubles the cost of a policy: a plain top-level
    // `kind:` line is read directly; anything else goes to the parser.
    let kind = match plain_kind(doc) {
        Some(k) => Some(k.to_owned()),
        None => {
            serde_yaml_ng::from_str::<KindOnly>(doc)
                .map_err(|e| yaml_err(file, doc, first, &e))?
                .kind
        }
    };
    match kind.as_deref() {
        Some("AgentPolicy") => {
            let raw = serde_yaml_ng::from_str::<RawAgentPolicy>(doc)
                .map_err(|e| yaml_err(file, doc, first, &e))?;
            if let Err(e) = raw.identity.parse::<crate::identity::AgentId>() {
                return Err(err_at(file, first, 1, format!("identity {e}")));
            }
            Ok(Doc::Agent(AgentPolicy {
                name: raw.name,
                identity: raw.identity,
                owner: raw.owner,
                labels: raw.labels,
                mode: raw.mode.map_or(Mode::Enforce, |m| m.0),
                sni: raw.sni.map(|m| m.0).unwrap_or_default(),
                io_uring: raw.io_uring.map(|m| m.0).unwrap_or_default(),
                extends: raw.extends,
                dns: super::names::DnsSection {
                    resolve: raw.dns.resolve.into_iter().map(|r| r.0).collect(),
                    types: raw.dns.types.into_iter().map(|t| t.0).collect(),
                },
                egress: rules(ech_on_names(raw.egress, file, first)?, &origin),
                ingress: ingress_rules(raw.ingress, &origin),
                origin,
            }))
        }
        Some("Archetype") => {
            let raw = serde_yaml_ng::from_str::<RawArchetype>(doc)
                .map_err(|e| yaml_err(file, doc, first, &e))?;
            Ok(Doc::Archetype(Archetype {
                name: raw.name,
                extends: raw.extends,
                egress: rules(ech_on_names(raw.egress, file, first)?, &origin),
                ingress: ingress_rules(raw.ingress, &origin),
                origin,
            }))
        }
        Some("GlobalDeny") => {
            let raw = serde_yaml_ng::from_str::<RawGlobalDeny>(doc)
                .map_err(|e| yaml_err(file, doc, first, &e))?;
            Ok(Doc::GlobalDeny(raw.to.into_iter().map(|d| d.0).collect()))
        }
        Some("Grant") => {
            let raw = serde_yaml_ng::from_str::<RawGrant>(doc)
                .map_err(|e| yaml_err(file, doc, first, &e))?;
            if let Err(e) = raw.identity.parse::<crate::identity::AgentId>() {
                return Err(err_at(file, first, 1, format!("identity {e}")));
            }
            let reason = raw.reason.trim();
            if reason.is_empty() || reason.len() > MAX_GRANT_REASON {
                return Err(err_at(
                    file,
                    first,
                    1,
                    format!(
                        "Grant {:?}: a reason is 1 to {MAX_GRANT_REASON} characters ({} given)",
                        raw.name,
                        reason.len()
                    ),
                ));
            }
            if raw.egress.is_empty() {
                return Err(err_at(
                    file,
                    first,
                    1,
                    format!("Grant {:?} grants nothing: its egress is empty", raw.name),
                ));
            }
            let until = raw.until.0;
            let mut egress = rules(ech_on_names(raw.egress, file, first)?, &origin);
            for r in &mut egress {
                r.expires = Some(r.expires.map_or(until, |e| e.min(until)));
            }
            Ok(Doc::Grant(Grant {
                name: raw.name,
                identity: raw.identity,
                reason: reason.to_owned(),
                until,
                break_glass: raw.break_glass.unwrap_or(false),
                egress,
                origin,
            }))
        }
        Some(other) => Err(err_at(
            file,
            first,
            1,
            format!("unknown kind {other:?}: expected AgentPolicy, Archetype, GlobalDeny or Grant"),
        )),
        None => Err(err_at(file, first, 1, "document has no `kind`")),
    }
}

/// Parses every document, in order, spread over the machine's cores when there are enough
/// of them to be worth a thread.
fn parse_documents(
    docs: &[(std::sync::Arc<Path>, usize, String)],
) -> Vec<Result<Doc, PolicyError>> {
    const PER_THREAD: usize = 64;
    let parse = |d: &(std::sync::Arc<Path>, usize, String)| parse_document(&d.0, d.1, &d.2);
    let threads = crate::workers::threads().min(docs.len() / PER_THREAD);
    if threads <= 1 {
        return docs.iter().map(parse).collect();
    }
    std::thread::scope(|s| {
        let parts: Vec<_> = docs
            .chunks(docs.len().div_ceil(threads))
            .map(|part| s.spawn(move || part.iter().map(parse).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

pub fn parse_sources(sources: Vec<(PathBuf, String)>) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let mut hash = Sha256::new();
    let mut agents: Vec<AgentPolicy> = Vec::new();
    let mut archetypes: BTreeMap<String, Archetype> = BTreeMap::new();
    let mut global_deny: Option<Vec<IpNet>> = None;
    let mut grants: Vec<Grant> = Vec::new();
    let mut docs: Vec<(std::sync::Arc<Path>, usize, String)> = Vec::new();
    let files: Vec<std::sync::Arc<Path>> =
        sources.iter().map(|(f, _)| f.as_path().into()).collect();
    for ((_, text), file) in sources.iter().zip(&files) {
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update((text.len() as u64).to_le_bytes());
        hash.update(text.as_bytes());
        for (first, doc) in documents(text) {
            docs.push((file.clone(), first, doc));
        }
    }
    // Documents parse on their own, so a large policy parses on every core; what one
    // document says about another is checked afterwards, in order.
    let mut by_name: std::collections::HashMap<String, usize> = Default::default();
    let mut by_identity: std::collections::HashMap<String, usize> = Default::default();
    for parsed in parse_documents(&docs) {
        match parsed {
            Err(e) => errors.push(e),
            Ok(Doc::Agent(a)) => {
                let (file, first) = (&a.origin.file, a.origin.line);
                if let Some(&prev) = by_name.get(&a.name) {
                    errors.push(err_at(
                        file,
                        first,
                        1,
                        format!(
                            "AgentPolicy {:?} is defined twice (first at {})",
                            a.name, agents[prev].origin
                        ),
                    ));
                    continue;
                }
                if let Some(&prev) = by_identity.get(&a.identity) {
                    let prev = &agents[prev];
                    errors.push(err_at(file, first, 1, format!(
                        "identity {} already has AgentPolicy {:?} (at {}); one policy per identity",
                        a.identity, prev.name, prev.origin
                    )));
                    continue;
                }
                by_name.insert(a.name.clone(), agents.len());
                by_identity.insert(a.identity.clone(), agents.len());
                agents.push(a);
            }
            Ok(Doc::Archetype(a)) => {
                if let Some(prev) = archetypes.get(&a.name) {
                    errors.push(err_at(
                        &a.origin.file,
                        a.origin.line,
                        1,
                        format!(
                            "Archetype {:?} is defined twice (first at {})",
                            a.name, prev.origin
                        ),
                    ));
                    continue;
                }
                archetypes.insert(a.name.clone(), a);
            }
            Ok(Doc::GlobalDeny(to)) => global_deny.get_or_insert_with(Vec::new).extend(to),
            Ok(Doc::Grant(g)) => grants.push(g),
        }
    }
    // A grant adds to an identity's policy: one there must be.
    let mut grant_names: std::collections::HashMap<String, Origin> = Default::default();
    for g in &grants {
        if let Some(prev) = grant_names.insert(g.name.clone(), g.origin.clone()) {
            errors.push(err_at(
                &g.origin.file,
                g.origin.line,
                1,
                format!("Grant {:?} is defined twice (first at {prev})", g.name),
            ));
            continue;
        }
        match by_identity.get(&g.identity) {
            Some(&i) => agents[i].egress.extend(g.egress.iter().cloned()),
            None => errors.push(err_at(
                &g.origin.file,
                g.origin.line,
                1,
                format!(
                    "Grant {:?} is for {}, which has no AgentPolicy: a grant adds to a policy",
                    g.name, g.identity
                ),
            )),
        }
    }
    // Cross-document checks: every `extends` names an archetype, and there are no cycles.
    let extends_of = |name: &str| archetypes.get(name).map(|a| a.extends.as_slice());
    for (who, origin, extends) in agents
        .iter()
        .map(|a| (format!("AgentPolicy {:?}", a.name), &a.origin, &a.extends))
        .chain(
            archetypes
                .values()
                .map(|a| (format!("Archetype {:?}", a.name), &a.origin, &a.extends)),
        )
    {
        for e in extends {
            if !archetypes.contains_key(e) {
                errors.push(err_at(
                    &origin.file,
                    origin.line,
                    1,
                    format!("{who} extends {e:?}, which is not an Archetype"),
                ));
            }
        }
    }
    for name in archetypes.keys() {
        if let Some(cycle) = find_cycle(name, &extends_of) {
            let a = &archetypes[name];
            if cycle.first() == Some(&name.as_str()) {
                errors.push(err_at(
                    &a.origin.file,
                    a.origin.line,
                    1,
                    format!("Archetype {name:?} extends itself: {}", cycle.join(" -> ")),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let full = hash.finalize();
    Ok(PolicySet {
        revision: hex::encode(&full[..8]),
        digest: hex::encode(full),
        agents,
        archetypes,
        global_deny,
        by_identity,
        grants,
        sources,
    })
}

/// Compiles every identity's rules the way the datapath will, so what `policy check` and a
/// control plane push accept is what a node applies (identity-table capacity aside, which
/// depends on the node). Errors point at the AgentPolicy.
pub fn check_compiles(set: &PolicySet) -> Result<(), PolicyErrors> {
    let now = std::time::SystemTime::now();
    let deny = set.global_deny();
    let mut port_sets: std::collections::HashSet<agent_common::PortSet> = Default::default();
    let mut errors: Vec<PolicyError> = set
        .agents
        .iter()
        .filter_map(
            |a| match super::compile::compile_rules(&set.rules_at(a, now), &deny) {
                Ok(t) => {
                    port_sets.extend(t.sets);
                    None
                }
                Err(e) => Some(err_at(
                    &a.origin.file,
                    a.origin.line,
                    1,
                    format!("AgentPolicy {:?}: {e}", a.name),
                )),
            },
        )
        .collect();
    // A node holds the sets of the rules in force and of the change replacing them at once.
    let room = agent_common::MAX_PORT_SETS as usize / 2;
    if port_sets.len() > room
        && let Some((file, _)) = set.sources.first()
    {
        errors.push(err_at(
            file,
            0,
            0,
            format!(
                "the policy needs {} distinct port sets (rules listing more port ranges than a trie entry holds); a node holds {room} per policy: list ranges instead of single ports, or share port lists between rules",
                port_sets.len()
            ),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(errors))
    }
}

/// Writes `set`'s files into `dir` (replacing what was there) so [`load_dir`] can read the
/// same revision back: the old directory or the new, never a mix (see
/// [`crate::files::replace_dir`]).
pub fn save_dir(set: &PolicySet, dir: &Path) -> std::io::Result<()> {
    let mut files = Vec::with_capacity(set.sources.len());
    for (path, text) in &set.sources {
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
        files.push((name, text.as_bytes()));
    }
    crate::files::replace_dir(dir, files)
}

/// A path from `start` back to itself through `extends`, if there is one.
fn find_cycle<'a>(
    start: &'a str,
    extends_of: &dyn Fn(&str) -> Option<&'a [String]>,
) -> Option<Vec<&'a str>> {
    fn walk<'a>(
        at: &'a str,
        start: &'a str,
        path: &mut Vec<&'a str>,
        seen: &mut BTreeSet<&'a str>,
        extends_of: &dyn Fn(&str) -> Option<&'a [String]>,
    ) -> bool {
        for next in extends_of(at).unwrap_or(&[]) {
            if next == start {
                path.push(next);
                return true;
            }
            if seen.insert(next) {
                path.push(next);
                if walk(next, start, path, seen, extends_of) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start];
    let mut seen = BTreeSet::new();
    walk(start, start, &mut path, &mut seen, extends_of).then_some(path)
}

/// The document a rule of an identity's effective set is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleOwner<'a> {
    Agent(&'a str),
    Archetype(&'a str),
}

impl fmt::Display for RuleOwner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(n) => write!(f, "AgentPolicy {n:?}"),
            Self::Archetype(n) => write!(f, "Archetype {n:?}"),
        }
    }
}

/// A rule as the datapath takes it, as of `now` (its schedule's window decides its expiry).
fn compile_source(src: &RuleSource, id: u32, now: std::time::SystemTime) -> Rule {
    let mut deadline: Option<std::time::SystemTime> = src.expires.map(Into::into);
    if let Some(s) = &src.schedule {
        let close = match s.at(now) {
            Window::Open { until } => until,
            // Already over: the kernel entry never matches.
            Window::Closed { .. } => std::time::SystemTime::UNIX_EPOCH,
        };
        deadline = Some(deadline.map_or(close, |d| d.min(close)));
    }
    Rule {
        id,
        to: src.to.to_vec(),
        fqdns: src.fqdns.clone(),
        ech: src.ech.clone(),
        ports: src.ports.to_vec(),
        protocol: src.protocol,
        direction: src.direction,
        expires: deadline.map(BootInstant::from_system_time),
        learned: false,
    }
}

/// One rule of an identity's effective set, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveRule {
    pub rule: Rule,
    /// "AgentPolicy x" or "Archetype y".
    pub from: String,
    pub source: RuleSource,
}

impl PolicySet {
    pub fn agent(&self, identity: &str) -> Option<&AgentPolicy> {
        self.by_identity.get(identity).map(|&i| &self.agents[i])
    }

    /// The global deny list in force: the documents' entries, or the built-in default.
    pub fn global_deny(&self) -> Vec<IpNet> {
        self.global_deny.clone().unwrap_or_else(|| {
            super::model::DEFAULT_GLOBAL_DENY
                .iter()
                .map(|s| s.parse().expect("valid default"))
                .collect()
        })
    }

    /// An agent's rules with archetypes layered in (each archetype once, depth first, in
    /// `extends` order, before the agent's own rules). Rule ids count from 1 in that order.
    pub fn effective_rules(&self, agent: &AgentPolicy) -> Vec<EffectiveRule> {
        self.effective_rules_at(agent, std::time::SystemTime::now())
    }

    /// The effective rules as of `now`: a scheduled rule expires when its open window ends,
    /// and is already expired while its window is closed (rule ids never shift).
    pub fn effective_rules_at(
        &self,
        agent: &AgentPolicy,
        now: std::time::SystemTime,
    ) -> Vec<EffectiveRule> {
        self.rule_sources(agent)
            .into_iter()
            .enumerate()
            .map(|(i, (from, src))| EffectiveRule {
                rule: compile_source(src, i as u32 + 1, now),
                from: from.to_string(),
                source: src.clone(),
            })
            .collect()
    }

    /// An agent's compiled rules as of `now` (rule ids count from 1), without the copies of
    /// their sources that [`PolicySet::effective_rules_at`] makes: what the node keeps.
    pub fn rules_at(&self, agent: &AgentPolicy, now: std::time::SystemTime) -> Vec<Rule> {
        let sources = self.rule_sources(agent);
        let mut out = Vec::with_capacity(sources.len());
        out.extend(
            sources
                .into_iter()
                .enumerate()
                .map(|(i, (_, src))| compile_source(src, i as u32 + 1, now)),
        );
        out
    }

    /// The sources of an agent's effective rules in rule-id order (each archetype once, depth
    /// first, in `extends` order, before the agent's own rules; every egress rule before the
    /// first ingress rule, so adding ingress rules never renumbers egress ones), with where
    /// each came from.
    pub fn rule_sources<'a>(
        &'a self,
        agent: &'a AgentPolicy,
    ) -> Vec<(RuleOwner<'a>, &'a RuleSource)> {
        fn layer<'a>(
            set: &'a PolicySet,
            extends: &'a [String],
            seen: &mut BTreeSet<&'a str>,
            out: &mut Vec<(RuleOwner<'a>, &'a RuleSource)>,
            ingress: bool,
        ) {
            for name in extends {
                if !seen.insert(name.as_str()) {
                    continue;
                }
                if let Some(a) = set.archetypes.get(name) {
                    layer(set, &a.extends, seen, out, ingress);
                    let rules = if ingress { &a.ingress } else { &a.egress };
                    out.extend(rules.iter().map(|r| (RuleOwner::Archetype(name), r)));
                }
            }
        }
        let mut out = Vec::new();
        layer(self, &agent.extends, &mut BTreeSet::new(), &mut out, false);
        out.extend(
            agent
                .egress
                .iter()
                .map(|r| (RuleOwner::Agent(&agent.name), r)),
        );
        layer(self, &agent.extends, &mut BTreeSet::new(), &mut out, true);
        out.extend(
            agent
                .ingress
                .iter()
                .map(|r| (RuleOwner::Agent(&agent.name), r)),
        );
        out
    }

    /// The source of rule `id` (from 1) of an agent's effective rules.
    pub fn rule_source<'a>(&'a self, agent: &'a AgentPolicy, id: u32) -> Option<&'a RuleSource> {
        let i = usize::try_from(id).ok()?.checked_sub(1)?;
        self.rule_sources(agent).get(i).map(|(_, s)| *s)
    }

    /// The next instant after `now` at which a schedule window opens or closes, or a rule
    /// (a grant's included) ends: the policy must be applied again then (the kernel ends
    /// the rule on its own; what the identity may resolve is the node's to change).
    pub fn next_schedule_change(
        &self,
        now: std::time::SystemTime,
    ) -> Option<std::time::SystemTime> {
        let rules = || {
            self.agents
                .iter()
                .flat_map(|a| a.egress.iter().chain(&a.ingress))
                .chain(
                    self.archetypes
                        .values()
                        .flat_map(|a| a.egress.iter().chain(&a.ingress)),
                )
        };
        let windows = rules()
            .filter_map(|r| r.schedule.as_ref())
            .filter_map(|s| match s.at(now) {
                Window::Open { until } => Some(until),
                Window::Closed { opens } => opens,
            });
        let ends = rules()
            .filter_map(|r| r.expires)
            .map(std::time::SystemTime::from)
            .filter(|e| *e > now);
        windows.chain(ends).min()
    }

    /// Archetypes no AgentPolicy reaches, directly or through other archetypes.
    pub fn unused_archetypes(&self) -> Vec<&Archetype> {
        let mut used = BTreeSet::new();
        let mut stack: Vec<&str> = self
            .agents
            .iter()
            .flat_map(|a| a.extends.iter().map(String::as_str))
            .collect();
        while let Some(n) = stack.pop() {
            if used.insert(n) {
                if let Some(a) = self.archetypes.get(n) {
                    stack.extend(a.extends.iter().map(String::as_str));
                }
            }
        }
        self.archetypes
            .values()
            .filter(|a| !used.contains(a.name.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(files: &[(&str, &str)]) -> Result<PolicySet, PolicyErrors> {
        let sources: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(n, t)| (PathBuf::from(n), (*t).to_owned()))
            .collect();
        parse_sources(sources)
    }

    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        parse(files)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn ech_names_are_names_beside_a_rule_that_names_hosts() {
        let doc = |rule: &str| {
            format!(
                "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/agent/a\negress:\n{rule}"
            )
        };
        let set = parse(&[(
            "p.yaml",
            &doc("  - to: [api.example.com]\n    ports: [443]\n    ech: [ECH.Provider.example.]\n"),
        )])
        .unwrap();
        assert_eq!(
            &*set.agents[0].egress[0].ech,
            [Box::from("ech.provider.example")]
        );
        let e = errors(&[(
            "p.yaml",
            &doc("  - to: [192.0.2.1]\n    ports: [443]\n    ech: [ech.provider.example]\n"),
        )]);
        assert_eq!(
            e,
            [
                "p.yaml:1:1: egress[0]: `ech` lists ECH public names accepted at the addresses a rule's names learn; this rule names no host"
            ]
        );
        let e = errors(&[(
            "p.yaml",
            &doc("  - to: [api.example.com]\n    ech: [\"*.provider.example\"]\n"),
        )]);
        assert!(
            e[0].contains("\"*.provider.example\": an ECH public name is one name, not a pattern"),
            "{e:?}"
        );
    }

    #[test]
    fn a_large_policy_parses_in_parallel_and_reports_in_document_order() {
        // 600 documents: enough for every core to take a share. Errors sit in different
        // shares, and a duplicate refers back across shares.
        let mut text = String::new();
        for i in 0..600 {
            let (name, identity) = match i {
                450 => (
                    "a10".to_owned(),
                    "spiffe://example.org/agent/x450".to_owned(),
                ),
                500 => (
                    "b500".to_owned(),
                    "spiffe://example.org/agent/a20".to_owned(),
                ),
                _ => (format!("a{i}"), format!("spiffe://example.org/agent/a{i}")),
            };
            let ports = if i == 5 || i == 590 {
                "[http]"
            } else {
                "[443]"
            };
            text.push_str(&format!(
                "---\nkind: AgentPolicy\nname: {name}\nidentity: {identity}\negress:\n  - to: [192.0.2.1]\n    ports: {ports}\n"
            ));
        }
        let line = |doc: usize| 1 + doc * 7;
        let got = errors(&[("big.yaml", &text)]);
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(
            got[0].starts_with(&format!("big.yaml:{}:", line(5) + 6)),
            "{}",
            got[0]
        );
        assert_eq!(
            got[1],
            format!(
                "big.yaml:{}:1: AgentPolicy \"a10\" is defined twice (first at big.yaml:{})",
                line(450) + 1,
                line(10) + 1
            )
        );
        assert!(
            got[2].contains("already has AgentPolicy \"a20\""),
            "{}",
            got[2]
        );
        assert!(
            got[3].starts_with(&format!("big.yaml:{}:", line(590) + 6)),
            "{}",
            got[3]
        );
    }

    #[test]
    fn a_grant_adds_rules_to_its_identity_that_end_at_its_deadline() {
        let policy = "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\negress:\n  - to: [192.0.2.1]\n    ports: [443]\n";
        let grant = "kind: Grant\nname: g1\nidentity: spiffe://example.org/a\nreason: incident 42\nuntil: 2026-12-05T12:00:00Z\negress:\n  - to: [198.51.100.7]\n    ports: [443]\n  - to: [203.0.113.0/24]\n    expires: 2027-01-01T00:00:00Z\n";
        let set = parse(&[("a.yaml", policy), ("grant-g1.yaml", grant)]).unwrap();
        assert_eq!(set.grants.len(), 1);
        let g = &set.grants[0];
        assert_eq!((g.name.as_str(), g.reason.as_str()), ("g1", "incident 42"));
        assert!(!g.break_glass);
        let until = crate::clock::parse_rfc3339("2026-12-05T12:00:00Z").unwrap();
        let agent = set.agent("spiffe://example.org/a").unwrap();
        assert_eq!(agent.egress.len(), 3);
        // Each granted rule ends at the grant's deadline at the latest, and says where it
        // was written.
        for r in &agent.egress[1..] {
            assert_eq!(r.expires, Some(until));
            assert!(
                r.place().starts_with("grant-g1.yaml:1 egress["),
                "{}",
                r.place()
            );
        }
        assert_eq!(agent.egress[0].expires, None);
        // Compiled with a kernel deadline.
        let before = std::time::SystemTime::from(until) - std::time::Duration::from_secs(60);
        assert_eq!(
            set.rules_at(agent, before)
                .iter()
                .filter(|r| r.expires.is_some())
                .count(),
            2
        );

        // Refused: for an identity without a policy, without a reason, granting nothing,
        // twice, or with an unreadable deadline.
        let e = |text: &str| errors(&[("a.yaml", policy), ("g.yaml", text)]).join("\n");
        let head = "kind: Grant\nname: g\nidentity: spiffe://example.org/a\nreason: r\nuntil: 2026-12-05T12:00:00Z\n";
        let rule = "egress:\n  - to: [198.51.100.7]\n";
        assert!(
            e(&format!("{}{rule}", head.replace("/a\n", "/b\n")))
                .contains("Grant \"g\" is for spiffe://example.org/b, which has no AgentPolicy"),
        );
        assert!(
            e(&format!(
                "{}{rule}",
                head.replace("reason: r", "reason: \"  \"")
            ))
            .contains("a reason is 1 to 1024 characters (0 given)")
        );
        assert!(e(&format!("{head}egress: []\n")).contains("grants nothing"));
        assert!(
            e(&format!("{head}{rule}---\n{head}{rule}")).contains("Grant \"g\" is defined twice")
        );
        assert!(
            e(&format!(
                "{}{rule}",
                head.replace("2026-12-05T12:00:00Z", "soon")
            ))
            .contains("is not an RFC 3339 time")
        );
    }

    #[test]
    fn owner_and_labels_are_read_and_checked_where_written() {
        let set = parse(&[(
            "p.yaml",
            "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\nowner: payments@example.com\nlabels:\n  team: payments\n  tier: \"1\"\n  example.com/data-class: pii\n",
        )])
        .unwrap();
        let a = &set.agents[0];
        assert_eq!(a.owner.as_ref().unwrap().as_str(), "payments@example.com");
        assert_eq!(
            a.labels.iter().collect::<Vec<_>>(),
            [
                ("example.com/data-class", "pii"),
                ("team", "payments"),
                ("tier", "1")
            ]
        );
        let head = "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\n";
        for (tail, want) in [
            ("owner: \"\"\n", "p.yaml:4:1: `owner:` is empty"),
            (
                "labels:\n  team: pay ments\n",
                "p.yaml:5:9: labels: label value `pay ments` of `team` is not a label value",
            ),
            (
                "labels:\n  -team: x\n",
                "p.yaml:5:3: labels: label name `-team` is not a label name",
            ),
            (
                "labels:\n  tier: 1.10\n",
                "p.yaml:5:3: labels: label `tier` is not text: quote its value (as written)",
            ),
            (
                "labels: [team]\n",
                "p.yaml:4:9: labels: invalid type: sequence, expected a map of label names to values",
            ),
        ] {
            let got = errors(&[("p.yaml", &format!("{head}{tail}"))]);
            assert!(got[0].starts_with(want), "{tail:?}: {got:?}");
        }
    }

    const GOOD: &str = "\
kind: Archetype
name: web
egress:
  - to: [0.0.0.0/0]
    ports: [443]
    protocol: tcp
---
kind: AgentPolicy
name: support-bot
identity: spiffe://example.org/agent/support
mode: audit
extends: [web]
egress:
  - to: [192.0.2.10, 2001:db8::/32]
    ports: [\"8000-8100\", 53]
    protocol: udp
    expires: 2099-01-01T00:00:00Z
    reason: ticket 42
";

    #[test]
    fn layers_archetypes_before_own_rules() {
        let set = parse(&[("a.yaml", GOOD)]).unwrap();
        let agent = set.agent("spiffe://example.org/agent/support").unwrap();
        assert_eq!(agent.mode, Mode::Audit);
        assert_eq!(agent.origin.line, 8);
        let rules = set.effective_rules(agent);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].rule.id, rules[0].from.as_str()),
            (1, "Archetype \"web\"")
        );
        assert_eq!(rules[1].rule.to[0].to_string(), "192.0.2.10/32");
        assert_eq!(
            rules[1].rule.ports,
            vec![PortRange { lo: 8000, hi: 8100 }, PortRange::single(53)]
        );
        assert!(rules[1].rule.expires.is_some());
        assert_eq!(
            set.global_deny().len(),
            2,
            "built-in default when no GlobalDeny"
        );
        assert!(set.unused_archetypes().is_empty());
    }

    #[test]
    fn ingress_rules_follow_every_egress_rule_and_take_addresses_only() {
        let text = "\
kind: Archetype
name: served
ingress:
  - from: [198.51.100.0/24]
    ports: [8443]
    protocol: tcp
---
kind: AgentPolicy
name: bot
identity: spiffe://example.org/agent/bot
extends: [served]
egress:
  - to: [192.0.2.1]
    ports: [443]
ingress:
  - from: [192.0.2.0/24, 2001:db8::/32]
    ports: [8080, \"9000-9100\"]
";
        let set = parse(&[("a.yaml", text)]).unwrap();
        let rules = set.effective_rules(&set.agents[0]);
        let got: Vec<(u32, Direction, String)> = rules
            .iter()
            .map(|r| (r.rule.id, r.rule.direction, r.source.place()))
            .collect();
        assert_eq!(
            got,
            [
                (1, Direction::Egress, "a.yaml:8 egress[0]".to_owned()),
                (2, Direction::Ingress, "a.yaml:1 ingress[0]".to_owned()),
                (3, Direction::Ingress, "a.yaml:8 ingress[0]".to_owned()),
            ]
        );
        assert_eq!(rules[2].rule.protocol, Protocol::Any);
        assert_eq!(rules[2].rule.ports.len(), 2);
        let trie = super::super::compile::compile_rules(
            &set.rules_at(&set.agents[0], std::time::SystemTime::now()),
            &[],
        )
        .unwrap();
        let masks: BTreeSet<u8> = trie
            .entries
            .iter()
            .flat_map(|(_, s)| s.entries[..s.count as usize].iter().map(|e| e.proto))
            .collect();
        assert_eq!(
            masks,
            BTreeSet::from([
                agent_common::PROTO_ANY,
                agent_common::PROTO_IN_TCP,
                agent_common::PROTO_IN_TCP | agent_common::PROTO_IN_UDP
            ])
        );
        let bad = text.replace("[192.0.2.0/24, 2001:db8::/32]", "[peer.example.com]");
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            [
                "a.yaml:16:12: ingress[0].from: \"peer.example.com\": ingress peers are addresses and CIDRs, not names"
            ]
        );
    }

    #[test]
    fn revision_is_a_content_hash() {
        let a = parse(&[("a.yaml", GOOD)]).unwrap().revision;
        assert_eq!(a, parse(&[("a.yaml", GOOD)]).unwrap().revision);
        assert_ne!(
            a,
            parse(&[("a.yaml", &GOOD.replace("42", "43"))])
                .unwrap()
                .revision
        );
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn bad_values_are_reported_where_they_are() {
        let bad = GOOD.replace(
            "ports: [\"8000-8100\", 53]",
            "ports: [\"8000-8100\", 99999]",
        );
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            [
                "a.yaml:15:26: egress[0].ports: invalid port \"99999\": expected a number 1-65535 or a range like \"8000-8100\""
            ]
        );
        let bad = GOOD.replace("protocol: udp", "protocol: icmp");
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            ["a.yaml:16:15: egress[0]: invalid protocol \"icmp\": expected tcp, udp or any"]
        );
        let bad = GOOD.replace("2001:db8::/32", "\"*.com\"");
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            [
                "a.yaml:14:22: egress[0].to: \"*.com\": a wildcard over a top-level domain (\"com\") allows a whole TLD; name at least two labels"
            ]
        );
        // Unquoted, `*` starts a YAML alias: say so instead of the parser's riddle.
        let bad = GOOD.replace("2001:db8::/32", "*.example.com");
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            [
                "a.yaml:14:22: a wildcard name must be quoted in YAML (\"*.example.com\"): an unquoted `*` starts an alias"
            ]
        );
        let bad = GOOD.replace("192.0.2.10,", "192.0.2.10/24,");
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            [
                "a.yaml:14:10: egress[0].to: \"192.0.2.10/24\" has host bits set; the network is 192.0.2.0/24"
            ]
        );
        let bad = GOOD.replace("    reason: ticket 42", "    reasons: ticket 42");
        let e = errors(&[("a.yaml", &bad)]);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("a.yaml:18:5: egress[0]: unknown field `reasons`, expected one of"),
            "{e:?}"
        );
        let bad = GOOD.replace("2099-01-01T00:00:00Z", "next tuesday");
        assert!(errors(&[("a.yaml", &bad)])[0].starts_with(
            "a.yaml:17:14: egress[0]: expires \"next tuesday\" is not an RFC 3339 time"
        ));
    }

    #[test]
    fn cross_document_errors_name_the_document() {
        let bad = GOOD.replace("extends: [web]", "extends: [web, mobile]");
        assert_eq!(
            errors(&[("a.yaml", &bad)]),
            [
                "a.yaml:8:1: AgentPolicy \"support-bot\" extends \"mobile\", which is not an Archetype"
            ]
        );
        let cyc =
            "kind: Archetype\nname: a\nextends: [b]\n---\nkind: Archetype\nname: b\nextends: [a]\n";
        assert_eq!(
            errors(&[("c.yaml", cyc)]),
            [
                "c.yaml:1:1: Archetype \"a\" extends itself: a -> b -> a",
                "c.yaml:5:1: Archetype \"b\" extends itself: b -> a -> b"
            ]
        );
        let twice = format!(
            "{GOOD}---\n{}",
            GOOD.split("---\n")
                .nth(1)
                .unwrap()
                .replace("support-bot", "other")
        );
        assert_eq!(
            errors(&[("a.yaml", &twice)]),
            [
                "a.yaml:20:1: identity spiffe://example.org/agent/support already has AgentPolicy \"support-bot\" (at a.yaml:8); one policy per identity"
            ]
        );
        assert_eq!(
            errors(&[("k.yaml", "kind: Agent\nname: x\n")]),
            [
                "k.yaml:1:1: unknown kind \"Agent\": expected AgentPolicy, Archetype, GlobalDeny or Grant"
            ]
        );
        let bad_id = GOOD.replace(
            "spiffe://example.org/agent/support",
            "https://example.org/x",
        );
        assert_eq!(
            errors(&[("a.yaml", &bad_id)]),
            [
                "a.yaml:8:1: identity \"https://example.org/x\" is not a SPIFFE ID (spiffe://trust-domain/path)"
            ]
        );
    }

    #[test]
    fn every_error_in_every_file_is_reported() {
        let e = errors(&[
            (
                "a.yaml",
                "kind: AgentPolicy\nname: a\nidentity: spiffe://x.org/a\negress:\n  - to: [nope]\n",
            ),
            ("b.yaml", "kind: GlobalDeny\nto: [10.0.0.0/33]\n"),
        ]);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("a.yaml:5:"), "{e:?}");
        assert!(e[1].starts_with("b.yaml:2:"), "{e:?}");
    }
}
