//! Just-in-time grants: a `kind: Grant` file added to the newest bundle, pushed as any
//! bundle is (the same signatures and approvals), whose rules end at its deadline in the
//! kernel. What `agentwall cp grant` writes and `agentwall cp grants` lists.

use serde::Serialize;

use super::source::{Grant, PolicySet};

/// Longest grant: temporary access is hours, not a standing rule.
pub const MAX_GRANT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Longest break-glass grant: applied on fewer signatures than a bundle needs, it is
/// short, and reviewed afterwards.
pub const MAX_BREAK_GLASS: std::time::Duration = std::time::Duration::from_secs(4 * 3600);

/// Clock skew allowed between whoever made a grant and whoever checks its length: the one
/// signed bundles are checked with.
pub const SKEW: time::Duration =
    time::Duration::seconds(crate::control_plane::signing::CLOCK_SKEW_SECS);

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("a grant lasts more than 0 s and at most 7 days ({0} s asked)")]
    Length(u64),
    #[error("a break-glass grant lasts at most 4 hours ({0} s asked)")]
    BreakGlassLength(u64),
    #[error("a grant needs at least one destination (--to)")]
    NoDestination,
    #[error(
        "grant {name:?} lasts until {until}, more than {most} (and 5 minutes of clock skew) after {from}: temporary access is not a standing rule"
    )]
    EndsTooLate {
        name: String,
        until: String,
        from: String,
        most: &'static str,
    },
}

/// The grants of `set` that end later than a grant made at `from` may: more than
/// [`MAX_GRANT`] after it (a break-glass grant, [`MAX_BREAK_GLASS`]), plus [`SKEW`]. A grant
/// carried on from an older bundle ended no later than that bundle's time plus its length,
/// so it passes in every later bundle too.
pub fn ending_too_late(set: &PolicySet, from: time::OffsetDateTime) -> Vec<(&Grant, GrantError)> {
    set.grants
        .iter()
        .filter_map(|g| {
            let (most, words) = if g.break_glass {
                (MAX_BREAK_GLASS, "4 hours")
            } else {
                (MAX_GRANT, "7 days")
            };
            (g.until > from + most + SKEW).then(|| {
                let error = GrantError::EndsTooLate {
                    name: g.name.clone(),
                    until: crate::clock::rfc3339(g.until.into()),
                    from: crate::clock::rfc3339(from.into()),
                    most: words,
                };
                (g, error)
            })
        })
        .collect()
}

/// What an admin asks for.
pub struct GrantRequest<'a> {
    pub identity: &'a str,
    pub to: &'a [String],
    pub ports: &'a [String],
    pub protocol: Option<&'a str>,
    pub lasting: std::time::Duration,
    pub reason: &'a str,
    pub break_glass: bool,
}

#[derive(Serialize)]
struct GrantDoc<'a> {
    kind: &'static str,
    name: &'a str,
    identity: &'a str,
    reason: &'a str,
    until: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    break_glass: bool,
    egress: [GrantRule<'a>; 1],
}

#[derive(Serialize)]
struct GrantRule<'a> {
    to: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    ports: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'a str>,
}

/// The file (name, YAML text) that grants `req` from `now`: written by serde, so nothing an
/// admin types can add a key or a rule of its own. The policy parser checks the rest.
pub fn grant_file(
    req: &GrantRequest<'_>,
    now: std::time::SystemTime,
) -> Result<(String, String), GrantError> {
    if req.lasting.is_zero() || req.lasting > MAX_GRANT {
        return Err(GrantError::Length(req.lasting.as_secs()));
    }
    if req.break_glass && req.lasting > MAX_BREAK_GLASS {
        return Err(GrantError::BreakGlassLength(req.lasting.as_secs()));
    }
    if req.to.is_empty() {
        return Err(GrantError::NoDestination);
    }
    let stamp = crate::clock::rfc3339(now);
    // Unique and in time order: the file name is the grant's name.
    let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
    let name = format!("grant-{digits}");
    let doc = GrantDoc {
        kind: "Grant",
        name: &name,
        identity: req.identity,
        reason: req.reason,
        until: crate::clock::rfc3339(now + req.lasting),
        break_glass: req.break_glass,
        egress: [GrantRule {
            to: req.to,
            ports: req.ports,
            protocol: req.protocol,
        }],
    };
    let text = serde_yaml_ng::to_string(&doc).expect("grants serialize");
    Ok((format!("{name}.yaml"), text))
}

/// Why a bundle is not the bundle in force with break-glass grants added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BreakGlassError {
    #[error("{0} of the bundle in force is changed or gone")]
    Changed(String),
    #[error("{0} is not a grant file (grant-*.yaml)")]
    NotGrant(String),
    #[error("{file} holds something other than break-glass grants")]
    NotBreakGlass { file: String },
    #[error("{file} holds something other than grants")]
    NotGrants { file: String },
    #[error(
        "grant {name} lasts until {until}, more than 4 hours (and 5 minutes of clock skew) from now"
    )]
    TooLong { name: String, until: String },
    #[error("it adds no grant")]
    Nothing,
    #[error("its GlobalDeny is not the one in force")]
    GlobalDeny,
    #[error("it is not signed as grants added to the bundle in force (adds_to)")]
    NotOnBase,
}

/// Whether `after` is the bundle whose files are `before` (name, text) with files of
/// break-glass grants added and nothing else changed, each grant ending within
/// [`MAX_BREAK_GLASS`] of `now`: what may be applied on fewer signatures than a bundle
/// needs. The names of the grants added.
pub fn break_glass_addition(
    before: &[(String, String)],
    after: &PolicySet,
    now: time::OffsetDateTime,
) -> Result<Vec<String>, BreakGlassError> {
    let after_files = files_of(after);
    for (name, text) in before {
        if after_files.get(name) != Some(&text.as_str()) {
            return Err(BreakGlassError::Changed(name.clone()));
        }
    }
    let latest = now + MAX_BREAK_GLASS + SKEW;
    let mut added = Vec::new();
    for name in after_files.keys() {
        if before.iter().any(|(n, _)| n == name) {
            continue;
        }
        if !name.starts_with("grant-") {
            return Err(BreakGlassError::NotGrant(name.clone()));
        }
        let grants = only_grants(after, name)
            .filter(|g| g.iter().all(|g| g.break_glass))
            .ok_or_else(|| BreakGlassError::NotBreakGlass { file: name.clone() })?;
        for g in grants {
            if g.until > latest {
                return Err(BreakGlassError::TooLong {
                    name: g.name.clone(),
                    until: crate::clock::rfc3339(g.until.into()),
                });
            }
            added.push(g.name.clone());
        }
    }
    if added.is_empty() {
        return Err(BreakGlassError::Nothing);
    }
    same_global_deny(before, after)?;
    Ok(added)
}

/// Whether `after` holds the rules of the bundle whose files are `before` (name, text) with
/// only grants added, changed or taken away: every file not named `grant-*` the same, and
/// each `grant-*` file of `after` holding grants only. What a bundle that adds grants to the
/// full bundle under the one in force may differ from it by.
pub fn grants_only_change(
    before: &[(String, String)],
    after: &PolicySet,
) -> Result<(), BreakGlassError> {
    let after_files = files_of(after);
    let rules = |name: &str| !name.starts_with("grant-");
    for (name, text) in before.iter().filter(|(n, _)| rules(n)) {
        if after_files.get(name) != Some(&text.as_str()) {
            return Err(BreakGlassError::Changed(name.clone()));
        }
    }
    for name in after_files.keys() {
        if rules(name) {
            if !before.iter().any(|(n, _)| n == name) {
                return Err(BreakGlassError::NotGrant(name.clone()));
            }
        } else if only_grants(after, name).is_none() {
            return Err(BreakGlassError::NotGrants { file: name.clone() });
        }
    }
    same_global_deny(before, after)
}

/// The files of `set` by name (the bundle's file names: a node holds them under a path).
fn files_of(set: &PolicySet) -> std::collections::BTreeMap<String, &str> {
    set.sources
        .iter()
        .map(|(p, t)| (name_of(p), t.as_str()))
        .collect()
}

fn name_of(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The grants of the file `name` of `set`, when it holds at least one and nothing else:
/// its documents counted against its grants (a file with an AgentPolicy beside its grant is
/// refused).
fn only_grants<'a>(set: &'a PolicySet, name: &str) -> Option<Vec<&'a Grant>> {
    let grants: Vec<&Grant> = set
        .grants
        .iter()
        .filter(|g| name_of(&g.origin.file) == name)
        .collect();
    let others = set
        .agents
        .iter()
        .filter(|a| name_of(&a.origin.file) == name)
        .count()
        + set
            .archetypes
            .values()
            .filter(|a| name_of(&a.origin.file) == name)
            .count();
    (!grants.is_empty() && others == 0).then_some(grants)
}

/// A GlobalDeny beside a grant would replace the built-in list: the deny list must be the
/// one of the files `before`.
fn same_global_deny(before: &[(String, String)], after: &PolicySet) -> Result<(), BreakGlassError> {
    let in_force = super::source::parse_sources(
        before
            .iter()
            .map(|(n, t)| (std::path::PathBuf::from(n), t.clone()))
            .collect(),
    )
    .map_err(|_| BreakGlassError::Changed("the bundle in force (it no longer parses)".into()))?;
    if in_force.global_deny != after.global_deny {
        return Err(BreakGlassError::GlobalDeny);
    }
    Ok(())
}

/// A grant as `cp grants` shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct GrantView {
    pub name: String,
    pub identity: String,
    pub reason: String,
    pub until: String,
    /// In force now (its deadline not passed).
    pub active: bool,
    pub break_glass: bool,
    /// Each granted rule as `DEST[,DEST] ports P protocol X`.
    pub rules: Vec<String>,
    /// The file it is written in.
    pub file: String,
}

impl GrantView {
    pub fn of(g: &Grant, now: time::OffsetDateTime) -> Self {
        GrantView {
            name: g.name.clone(),
            identity: g.identity.clone(),
            reason: g.reason.clone(),
            until: crate::clock::rfc3339(g.until.into()),
            active: now < g.until,
            break_glass: g.break_glass,
            rules: g
                .egress
                .iter()
                .map(|r| {
                    let to: Vec<String> =
                        r.to.iter()
                            .map(ToString::to_string)
                            .chain(r.fqdns.iter().map(ToString::to_string))
                            .collect();
                    let ports: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
                    format!(
                        "{} ports {} protocol {}",
                        to.join(","),
                        if ports.is_empty() {
                            "any".to_owned()
                        } else {
                            ports.join(",")
                        },
                        r.protocol
                    )
                })
                .collect(),
            file: g.origin.file.display().to_string(),
        }
    }
}

/// Every grant of `set`, newest deadline first.
pub fn views(set: &PolicySet, now: time::OffsetDateTime) -> Vec<GrantView> {
    let mut all: Vec<GrantView> = set.grants.iter().map(|g| GrantView::of(g, now)).collect();
    all.sort_by(|a, b| b.until.cmp(&a.until).then(a.name.cmp(&b.name)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_file_is_a_policy_document_that_nothing_typed_can_widen() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let to = ["198.51.100.7".to_owned()];
        let ports = ["443".to_owned()];
        let req = GrantRequest {
            identity: "spiffe://example.org/a",
            to: &to,
            ports: &ports,
            protocol: Some("tcp"),
            lasting: std::time::Duration::from_secs(1800),
            // A reason that tries to add a rule of its own stays a reason.
            reason: "ticket 7\negress:\n  - to: [0.0.0.0/0]",
            break_glass: false,
        };
        let (name, text) = grant_file(&req, now).unwrap();
        assert_eq!(name, "grant-20270115080000000.yaml");
        let policy = "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\n";
        let set = super::super::source::parse_sources(vec![
            ("a.yaml".into(), policy.into()),
            (name.into(), text),
        ])
        .unwrap();
        let g = &set.grants[0];
        assert_eq!(g.reason, "ticket 7\negress:\n  - to: [0.0.0.0/0]");
        assert_eq!(g.egress.len(), 1);
        let v = GrantView::of(g, now.into());
        assert!(v.active);
        assert_eq!(v.until, "2027-01-15T08:30:00.000Z");
        assert_eq!(v.rules, ["198.51.100.7/32 ports 443 protocol tcp"]);
        assert!(!GrantView::of(g, (now + req.lasting).into()).active);
        // Break-glass: only files of break-glass grants added, nothing else changed.
        let glass = GrantRequest {
            break_glass: true,
            lasting: std::time::Duration::from_secs(3600),
            ..req
        };
        let before = vec![("a.yaml".to_owned(), policy.to_owned())];
        let with = |extra: Vec<(&str, String)>| {
            let mut all: Vec<(std::path::PathBuf, String)> =
                before.iter().map(|(n, t)| (n.into(), t.clone())).collect();
            all.extend(extra.into_iter().map(|(n, t)| (n.into(), t)));
            super::super::source::parse_sources(all).unwrap()
        };
        let (gname, gtext) = grant_file(&glass, now).unwrap();
        let at = time::OffsetDateTime::from(now);
        assert_eq!(
            break_glass_addition(&before, &with(vec![(&gname, gtext.clone())]), at),
            Ok(vec![gname.trim_end_matches(".yaml").to_owned()])
        );
        let e = |extra: Vec<(&str, String)>, at| {
            break_glass_addition(&before, &with(extra), at)
                .unwrap_err()
                .to_string()
        };
        // Not break-glass, too long for it, beside a policy change, under another name,
        // or with a GlobalDeny that would replace the built-in one.
        let (n2, t2) = grant_file(&req, now).unwrap();
        assert!(e(vec![(&n2, t2)], at).contains("other than break-glass grants"));
        assert!(
            e(vec![(&gname, gtext.clone())], at - time::Duration::hours(4))
                .contains("more than 4 hours")
        );
        let mut changed = with(vec![(&gname, gtext.clone())]);
        changed.sources[0].1.push_str("owner: x@example.org\n");
        assert!(
            break_glass_addition(&before, &changed, at)
                .unwrap_err()
                .to_string()
                .contains("a.yaml of the bundle in force is changed")
        );
        assert!(e(vec![("b.yaml", gtext.clone())], at).contains("b.yaml is not a grant file"));
        let deny = format!("{gtext}---\nkind: GlobalDeny\nto: [192.0.2.99]\n");
        assert!(e(vec![(&gname, deny)], at).contains("GlobalDeny is not the one in force"));
        let with_policy =
            format!("{gtext}---\nkind: AgentPolicy\nname: b\nidentity: spiffe://example.org/b\n");
        assert!(e(vec![(&gname, with_policy)], at).contains("other than break-glass grants"));
        assert!(e(vec![], at).contains("adds no grant"));
        assert!(
            grant_file(
                &GrantRequest {
                    lasting: std::time::Duration::from_secs(5 * 3600),
                    ..glass
                },
                now
            )
            .is_err()
        );
        for long in [0, 8 * 24 * 3600] {
            let r = GrantRequest {
                lasting: std::time::Duration::from_secs(long),
                ..req
            };
            assert!(grant_file(&r, now).is_err());
        }
    }

    #[test]
    fn grants_on_the_bundle_in_force_change_grants_only() {
        let policy = "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\n";
        let grant = |to: &str| {
            format!(
                "kind: Grant\nname: g{to}\nidentity: spiffe://example.org/a\nreason: r\nuntil: 2027-01-15T08:00:00Z\negress:\n  - to: [{to}]\n"
            )
        };
        let before = vec![
            ("a.yaml".to_owned(), policy.to_owned()),
            ("grant-1.yaml".to_owned(), grant("198.51.100.1")),
        ];
        let check = |files: Vec<(&str, String)>| {
            let set = super::super::source::parse_sources(
                files.into_iter().map(|(n, t)| (n.into(), t)).collect(),
            )
            .unwrap();
            grants_only_change(&before, &set).map_err(|e| e.to_string())
        };
        // A grant added, one taken away, one changed: grants only.
        let a = || ("a.yaml", policy.to_owned());
        check(vec![
            a(),
            ("grant-1.yaml", grant("198.51.100.1")),
            ("grant-2.yaml", grant("198.51.100.2")),
        ])
        .unwrap();
        check(vec![a()]).unwrap();
        check(vec![a(), ("grant-1.yaml", grant("198.51.100.3"))]).unwrap();
        // The rules changed, a file of rules added, rules in a grant file, another deny list.
        let wider = format!("{policy}egress:\n  - to: [0.0.0.0/0]\n");
        assert_eq!(
            check(vec![("a.yaml", wider)]).unwrap_err(),
            "a.yaml of the bundle in force is changed or gone"
        );
        let b = "kind: AgentPolicy\nname: b\nidentity: spiffe://example.org/b\n";
        assert!(
            check(vec![a(), ("b.yaml", b.into())])
                .unwrap_err()
                .contains("b.yaml is not a grant file")
        );
        assert!(
            check(vec![
                a(),
                ("grant-2.yaml", format!("{}---\n{b}", grant("192.0.2.1")))
            ])
            .unwrap_err()
            .contains("grant-2.yaml holds something other than grants")
        );
        let deny = format!(
            "{}---\nkind: GlobalDeny\nto: [192.0.2.99]\n",
            grant("192.0.2.1")
        );
        assert!(
            check(vec![a(), ("grant-2.yaml", deny)])
                .unwrap_err()
                .contains("GlobalDeny")
        );
    }

    #[test]
    fn a_grant_ends_within_its_length_of_when_it_was_made() {
        let policy = "kind: AgentPolicy\nname: a\nidentity: spiffe://example.org/a\n";
        let grant = |until: &str, glass: bool| {
            format!(
                "kind: Grant\nname: g\nidentity: spiffe://example.org/a\nreason: r\nuntil: {until}\nbreak_glass: {glass}\negress:\n  - to: [198.51.100.7]\n"
            )
        };
        let made = time::macros::datetime!(2027-01-15 08:00 UTC);
        let late = |until: &str, glass: bool| -> Vec<String> {
            let set = super::super::source::parse_sources(vec![
                ("a.yaml".into(), policy.into()),
                ("grant-1.yaml".into(), grant(until, glass)),
            ])
            .unwrap();
            ending_too_late(&set, made)
                .into_iter()
                .map(|(_, e)| e.to_string())
                .collect()
        };
        // Seven days and the skew pass; a minute more is a standing rule.
        assert!(late("2027-01-22T08:05:00Z", false).is_empty());
        assert_eq!(
            late("2027-01-22T08:06:00Z", false),
            [
                "grant \"g\" lasts until 2027-01-22T08:06:00.000Z, more than 7 days (and 5 minutes of clock skew) after 2027-01-15T08:00:00.000Z: temporary access is not a standing rule"
            ]
        );
        // Break-glass: four hours.
        assert!(late("2027-01-15T12:05:00Z", true).is_empty());
        assert!(late("2027-01-15T12:06:00Z", true)[0].contains("more than 4 hours"));
        // Spelled in another offset, the same instant.
        assert!(late("2027-01-22T10:05:00+02:00", false).is_empty());
        assert_eq!(late("2027-01-22T10:06:00+02:00", false).len(), 1);
    }
}
