use std::{path::PathBuf, process::ExitCode};

use agentwall::policy::{lint::lint, scenario, source::load_dir};

use super::node_config::{ConfigArg, NodeSocket};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a policy directory and warn about risky or useless rules.
    Check {
        /// Directory of *.yaml policy files [default: the node config's policy directory,
        /// else /etc/agentwall/policy].
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make the running node apply its policy directory now; prints the revision in force, or
    /// why the change was refused (the last good revision stays).
    Apply {
        #[command(flatten)]
        socket: NodeSocket,
    },
    /// Run scenarios (identity, destination, port, protocol, expected verdict) against a policy.
    Test {
        /// Directory of *.yaml policy files [default: the node config's policy directory,
        /// else /etc/agentwall/policy].
        #[arg(long, value_name = "DIR")]
        policy: Option<PathBuf>,
        /// YAML list of scenarios.
        scenarios: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Replay recorded flows against a candidate policy: what would newly be denied or
    /// allowed, per identity. Exits 1 when anything would newly be denied.
    Simulate {
        /// The candidate policy directory.
        #[arg(long)]
        policy: PathBuf,
        /// Flows to replay: audit log lines or `agentwall flows --output json` lines.
        #[arg(long, conflicts_with = "since")]
        flows: Option<PathBuf>,
        /// Replay the audit log's flows from this long ago on (90s, 30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The audit log to read [default: `audit_log` from the node's config].
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// Exit 0 even when flows would newly be denied.
        #[arg(long)]
        allow_new_denials: bool,
        /// text for a person, json for programs.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        output: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The smallest AgentPolicy covering an identity's recorded flows (for audit-then-enforce
    /// rollouts), as YAML.
    Suggest {
        /// The SPIFFE ID whose flows to cover.
        #[arg(long)]
        identity: String,
        /// Only flows from this long ago on (90s, 30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The audit log to read [default: `audit_log` from the node's config].
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Exit codes: 0 good, 1 policy errors or failed scenarios, 2 unreadable input (from clap).
pub fn run(cmd: Command) -> ExitCode {
    match cmd {
        Command::Check { dir, config } => {
            let dir = match config.policy_dir(dir) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("agentwall policy check: {e:#}");
                    return ExitCode::from(2);
                }
            };
            check(&dir)
        }
        Command::Apply { socket } => {
            let socket = match socket.path() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("agentwall policy apply: {e:#}");
                    return ExitCode::from(2);
                }
            };
            match agentwall::api::call(&socket, None, &agentwall::api::Request::Reload) {
                Ok(r) => {
                    let revision = r.revision.clone().unwrap_or_else(|| "?".into());
                    if r.ok {
                        println!("applied: revision {revision} in force");
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("{}", r.error.unwrap_or_default());
                        eprintln!("refused: revision {revision} stays in force");
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("agentwall policy apply: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Simulate {
            policy,
            flows,
            since,
            audit_log,
            allow_new_denials,
            output,
            config,
        } => {
            let set = match load_dir(&policy) {
                Ok(set) => set,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    eprintln!(
                        "{}: invalid policy; nothing was simulated",
                        policy.display()
                    );
                    return ExitCode::FAILURE;
                }
            };
            let recorded = match super::report::flows(flows, audit_log, &config, since.as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("agentwall policy simulate: {e}");
                    return ExitCode::from(2);
                }
            };
            let sim = agentwall::review::simulate(&set, &recorded);
            if output == "json" {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&sim).expect("serializable")
                );
            } else {
                print_simulation(&sim, &set.revision);
            }
            if sim.newly_denied.is_empty() || allow_new_denials {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Suggest {
            identity,
            since,
            audit_log,
            config,
        } => match super::report::flows_and_wishes(audit_log, &config, since.as_deref(), &identity)
        {
            Ok((f, dns)) => {
                print!("{}", agentwall::review::suggest(&identity, &f, &dns));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agentwall policy suggest: {e}");
                ExitCode::from(2)
            }
        },
        Command::Test {
            policy,
            scenarios,
            config,
        } => {
            let policy = match config.policy_dir(policy) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("agentwall policy test: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let set = match load_dir(&policy) {
                Ok(set) => set,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    eprintln!("{}: invalid policy; no scenario was run", policy.display());
                    return ExitCode::FAILURE;
                }
            };
            let outcomes = match scenario::run_file(&set, &scenarios) {
                Ok(o) => o,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            let failed = outcomes.iter().filter(|o| !o.passed).count();
            for o in &outcomes {
                println!("{o}");
            }
            println!(
                "{} passed, {} failed (policy revision {})",
                outcomes.len() - failed,
                failed,
                set.revision
            );
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `policy check DIR`: every error with its place, or the set's summary and its warnings.
fn check(dir: &std::path::Path) -> ExitCode {
    match load_dir(dir).and_then(|set| {
        agentwall::policy::source::check_compiles(&set)?;
        Ok(set)
    }) {
        Ok(set) => {
            let warnings = lint(&set);
            for w in &warnings {
                println!("{w}");
            }
            println!(
                "{}: valid: {} AgentPolicy, {} Archetype, revision {}, {} warning(s)",
                dir.display(),
                set.agents.len(),
                set.archetypes.len(),
                set.revision,
                warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "{}: invalid: {} error(s); nothing applied",
                dir.display(),
                errors.0.len()
            );
            ExitCode::FAILURE
        }
    }
}

/// `policy simulate` for a person: each change, then the totals. The node's and the control
/// plane's simulations print alike.
pub fn print_simulation(sim: &agentwall::review::Simulation, revision: &str) {
    for c in &sim.newly_denied {
        println!("newly denied: {c}");
    }
    for c in &sim.newly_allowed {
        println!("newly allowed: {c}");
    }
    println!(
        "{} flow(s) replayed against revision {revision}: {} newly denied, {} newly allowed",
        sim.replayed,
        sim.newly_denied.len(),
        sim.newly_allowed.len()
    );
}
