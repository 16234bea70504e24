use std::{path::PathBuf, process::ExitCode};

use agentwall::{
    config::{DEFAULT_CONFIG, DEFAULT_POLICY_DIR, NodeConfig},
    policy::source::load_dir,
    review::{self, Flow},
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Rules (and whole archetypes) no allowed flow used, per identity: candidates for
    /// removal. Counts flows recorded under the policy revision in force.
    Unused {
        /// Only flows from this long ago on (90s, 30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Default: `audit_log` from the node's config.
        #[arg(long)]
        audit_log: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_POLICY_DIR)]
        policy: PathBuf,
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
}

/// The audit log to read: the flag, else the node config's `audit_log`.
pub fn audit_log(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let path = std::path::Path::new(DEFAULT_CONFIG);
    if path.exists() {
        if let Some(p) = NodeConfig::load(path)?.audit_log {
            return Ok(p);
        }
    }
    anyhow::bail!("no audit log: give --audit-log FILE or set audit_log in {DEFAULT_CONFIG}")
}

/// The files to read (`--flows FILE`, else the audit log and its rotations) and the start of
/// the `--since` window.
pub fn sources(
    file: Option<PathBuf>,
    audit: Option<PathBuf>,
    since: Option<&str>,
) -> anyhow::Result<(Vec<PathBuf>, Option<std::time::SystemTime>)> {
    let since = since
        .map(review::parse_duration)
        .transpose()?
        .map(|d| std::time::SystemTime::now() - d);
    let files = match file {
        Some(f) => vec![f],
        None => review::audit_files(&audit_log(audit)?),
    };
    Ok((files, since))
}

/// Recorded flows from `--flows FILE` or the audit log, since `since`.
pub fn flows(
    file: Option<PathBuf>,
    audit: Option<PathBuf>,
    since: Option<&str>,
) -> anyhow::Result<Vec<Flow>> {
    let (files, since) = sources(file, audit, since)?;
    Ok(review::read_flows(&files, since)?)
}

/// Recorded flows and would-be-refused DNS queries (audit mode) of `identity`, from the
/// audit log, since `since`.
pub fn flows_and_wishes(
    audit: Option<PathBuf>,
    since: Option<&str>,
    identity: &str,
) -> anyhow::Result<(Vec<Flow>, Vec<review::DnsWish>)> {
    let (files, since) = sources(None, audit, since)?;
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
    } = cmd;
    let set = match load_dir(&policy) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("{}: invalid policy:\n{errors}", policy.display());
            return ExitCode::FAILURE;
        }
    };
    let flows = match flows(None, audit_log, since.as_deref()) {
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
    for r in &report.rules {
        println!(
            "unused: {} rule {} ({}, {})",
            r.identity, r.rule_id, r.place, r.from
        );
    }
    for a in &report.archetypes {
        println!("unused archetype: {a}");
    }
    println!(
        "{} unused rule(s), {} unused archetype(s); {} allowed flow(s) counted under revision {}",
        report.rules.len(),
        report.archetypes.len(),
        report.hits,
        set.revision
    );
    ExitCode::SUCCESS
}
