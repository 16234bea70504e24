use std::{path::PathBuf, process::ExitCode};

use agentwall::policy::{lint::lint, scenario, source::load_dir};

/// Where the node reads policy when no directory is given.
const DEFAULT_POLICY_DIR: &str = "/etc/agentwall/policy";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Validate a policy directory and warn about risky or useless rules.
    Check {
        /// Directory of *.yaml policy files.
        #[arg(default_value = DEFAULT_POLICY_DIR)]
        dir: PathBuf,
    },
    /// Make the running node apply its policy directory now; prints the revision in force, or
    /// why the change was refused (the last good revision stays).
    Apply {
        #[arg(long, default_value = agentwall::config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Run scenarios (identity, destination, port, protocol, expected verdict) against a policy.
    Test {
        /// Directory of *.yaml policy files.
        #[arg(long, default_value = DEFAULT_POLICY_DIR)]
        policy: PathBuf,
        /// YAML list of scenarios.
        scenarios: PathBuf,
    },
}

/// Exit codes: 0 good, 1 policy errors or failed scenarios, 2 unreadable input (from clap).
pub fn run(cmd: Command) -> ExitCode {
    match cmd {
        Command::Check { dir } => match load_dir(&dir) {
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
        },
        Command::Apply { socket } => {
            match agentwall::api::call(&socket, None, &agentwall::api::Request::Reload) {
                Ok(r) => {
                    let revision = r
                        .status
                        .as_ref()
                        .and_then(|s| s["revision"].as_str())
                        .unwrap_or("?")
                        .to_owned();
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
        Command::Test { policy, scenarios } => {
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
