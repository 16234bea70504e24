//! `agentwall policy test`: scenarios that say what the policy must allow and deny, judged by
//! the same reference evaluator that the kernel datapath is tested against.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{
    eval::{Subject, Verdict, evaluate_flow},
    model::{IdentityStatus, IdentityView, Protocol, UnknownFlows},
    source::{PolicyError, PolicyErrors, PolicySet},
};
use crate::clock::BootInstant;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[serde(default)]
    name: Option<String>,
    identity: String,
    to: IpAddr,
    port: u16,
    protocol: ScenarioProto,
    expect: Expect,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ScenarioProto {
    Tcp,
    Udp,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.passed { "ok  " } else { "FAIL" };
        write!(f, "{word} {}: {}", self.name, self.detail)
    }
}

/// Runs every scenario in `file` against `set`. Malformed scenario files are errors with
/// file:line:col, like policy files.
pub fn run_file(set: &PolicySet, file: &Path) -> Result<Vec<Outcome>, PolicyErrors> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            message: e.to_string(),
        }])
    })?;
    run(set, file.to_owned(), &text)
}

pub fn run(set: &PolicySet, file: PathBuf, text: &str) -> Result<Vec<Outcome>, PolicyErrors> {
    let raw: Vec<RawScenario> = serde_yaml_ng::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let msg = e.to_string();
        let msg = msg
            .find(" at line ")
            .map_or(msg.clone(), |i| msg[..i].to_owned());
        PolicyErrors(vec![PolicyError {
            file: file.clone(),
            line,
            column,
            message: msg,
        }])
    })?;
    let gd = set.global_deny();
    let now = BootInstant::now();
    Ok(raw
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let proto = match s.protocol {
                ScenarioProto::Tcp => Protocol::Tcp,
                ScenarioProto::Udp => Protocol::Udp,
            };
            let name = s.name.unwrap_or_else(|| format!("scenario {}", i + 1));
            let dest = match s.to {
                IpAddr::V6(a) => format!("[{a}]:{}/{proto}", s.port),
                IpAddr::V4(a) => format!("{a}:{}/{proto}", s.port),
            };
            let Some(agent) = set.agent(&s.identity) else {
                return Outcome {
                    name,
                    passed: false,
                    detail: format!("no AgentPolicy for identity {}", s.identity),
                };
            };
            let rules = set.effective_rules(agent);
            let model: Vec<_> = rules.iter().map(|r| r.rule.clone()).collect();
            let view = IdentityView {
                status: IdentityStatus::Active,
                mode: agent.mode,
                not_after: None,
            };
            let d = evaluate_flow(
                Subject::Bound {
                    view: Some(view),
                    rules: &model,
                },
                &gd,
                UnknownFlows::Report,
                s.to,
                s.port,
                proto,
                now,
            );
            let got = match d.verdict {
                Verdict::Allow => Expect::Allow,
                Verdict::Deny => Expect::Deny,
            };
            let why = match (d.rule_id, d.reason) {
                (id, reason) if id > 0 => {
                    let r = &rules[id as usize - 1];
                    match reason {
                        Some(reason) => {
                            format!("{reason}, over rule {} ({})", r.source.place(), r.from)
                        }
                        None => format!("rule {} ({})", r.source.place(), r.from),
                    }
                }
                (_, Some(reason)) => reason.to_string(),
                (_, None) => "allowed".into(),
            };
            let audit = if d.event_kind == agent_common::EVENT_AUDIT {
                " (audit mode: would deny)"
            } else {
                ""
            };
            Outcome {
                name,
                passed: got == s.expect,
                detail: format!(
                    "{} -> {dest}: expected {}, got {}{audit} [{why}]",
                    s.identity,
                    word(s.expect),
                    word(got)
                ),
            }
        })
        .collect())
}

fn word(e: Expect) -> &'static str {
    match e {
        Expect::Allow => "allow",
        Expect::Deny => "deny",
    }
}
