use std::{path::PathBuf, process::ExitCode};

use agentwall::{discovery, review};

#[derive(clap::Args)]
pub struct Args {
    /// Only flows from this long ago on (90s, 30m, 24h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// The audit log to read [default: `audit_log` from the node's config].
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// text for a person, json for programs.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
    #[command(flatten)]
    config: super::node_config::ConfigArg,
}

fn records(args: &Args) -> anyhow::Result<Vec<serde_json::Value>> {
    let (files, since) = super::report::sources(
        None,
        args.audit_log.clone(),
        &args.config,
        args.since.as_deref(),
    )?;
    Ok(review::read_decisions(&files, since)?)
}

pub fn run(args: Args) -> ExitCode {
    let recs = match records(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentwall shadow-ai: {e}");
            return ExitCode::from(2);
        }
    };
    let groups = discovery::shadow_ai(&recs);
    if args.output == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&groups).expect("serializable")
        );
        return ExitCode::SUCCESS;
    }
    print_groups(&groups, "");
    println!(
        "{} process group(s) reached AI services without an identity",
        groups.len()
    );
    ExitCode::SUCCESS
}

/// The text form of shadow-AI groups, each line after `indent`.
pub fn print_groups(groups: &[discovery::ShadowGroup], indent: &str) {
    for g in groups {
        say!("{indent}{}", g.group);
        for s in &g.services {
            let more = if s.destinations_left_out > 0 {
                format!(" and {} more destination(s)", s.destinations_left_out)
            } else {
                String::new()
            };
            say!(
                "{indent}  {}: {} flow(s), first {}, last {}: {}{more}",
                s.service,
                s.count,
                s.first_seen,
                s.last_seen,
                s.destinations
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        say!("{indent}  suggested policy:");
        for l in g.suggested_policy.lines() {
            say!("{indent}    {l}");
        }
    }
}
