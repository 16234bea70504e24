use std::{path::PathBuf, process::ExitCode};

use agentwall::{
    policy::source::load_dir,
    review::{self, Flow},
};

use super::node_config::ConfigArg;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Rules (and whole archetypes) no allowed flow used, per owner and identity: candidates
    /// for removal. Counts flows recorded under the policy revision in force.
    Unused {
        /// Only flows from this long ago on (90s, 30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The audit log to read [default: `audit_log` from the node's config].
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// The policy directory in force [default: the node config's].
        #[arg(long, value_name = "DIR")]
        policy: Option<PathBuf>,
        /// text for a person, json for programs.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        output: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// The files to read (`--flows FILE`, else the audit log and its rotations) and the start of
/// the `--since` window.
pub fn sources(
    file: Option<PathBuf>,
    audit: Option<PathBuf>,
    config: &ConfigArg,
    since: Option<&str>,
) -> anyhow::Result<(Vec<PathBuf>, Option<std::time::SystemTime>)> {
    let since = since
        .map(review::parse_duration)
        .transpose()?
        .map(|d| std::time::SystemTime::now() - d);
    let files = match file {
        Some(f) => vec![f],
        None => review::audit_files(&config.audit_log(audit)?),
    };
    Ok((files, since))
}

/// Recorded flows from `--flows FILE` or the audit log, since `since`.
pub fn flows(
    file: Option<PathBuf>,
    audit: Option<PathBuf>,
    config: &ConfigArg,
    since: Option<&str>,
) -> anyhow::Result<Vec<Flow>> {
    let (files, since) = sources(file, audit, config, since)?;
    Ok(review::read_flows(&files, since)?)
}

/// Recorded flows and would-be-refused DNS queries (audit mode) of `identity`, from the
/// audit log, since `since`.
pub fn flows_and_wishes(
    audit: Option<PathBuf>,
    config: &ConfigArg,
    since: Option<&str>,
    identity: &str,
) -> anyhow::Result<(Vec<Flow>, Vec<review::DnsWish>)> {
    let (files, since) = sources(None, audit, config, since)?;
    Ok((
        review::read_flows(&files, since)?,
        review::read_dns_wishes(&files, since, identity)?,
    ))
}

pub fn run(cmd: Command) -> ExitCode {
    let Command::Unused {
        since,
        audit_log,
        policy,
        output,
        config,
    } = cmd;
    let policy = match config.policy_dir(policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentwall report unused: {e:#}");
            return ExitCode::from(2);
        }
    };
    let set = match load_dir(&policy) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("{}: invalid policy:\n{errors}", policy.display());
            return ExitCode::FAILURE;
        }
    };
    let flows = match flows(None, audit_log, &config, since.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("agentwall report unused: {e}");
            return ExitCode::from(2);
        }
    };
    let report = review::unused(&set, &flows);
    if output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializable")
        );
        return ExitCode::SUCCESS;
    }
    print_unused(&report, &set.revision);
    ExitCode::SUCCESS
}

/// `report unused` for a person: by owner, then the totals. The node's and the control
/// plane's reports print alike.
pub fn print_unused(report: &review::UnusedReport, revision: &str) {
    let mut owner = None;
    for r in &report.rules {
        if owner != Some(&r.owner) {
            owner = Some(&r.owner);
            match &r.owner {
                Some(o) => println!("owner {o}:"),
                None => println!("no owner:"),
            }
        }
        println!(
            "  unused: {} rule {} ({}, {})",
            r.identity, r.rule_id, r.place, r.from
        );
    }
    for a in &report.archetypes {
        println!("unused archetype: {a}");
    }
    println!(
        "{} unused rule(s), {} unused archetype(s); {} allowed flow(s) counted under revision {revision}",
        report.rules.len(),
        report.archetypes.len(),
        report.hits,
    );
}
