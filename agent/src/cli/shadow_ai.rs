use std::{path::PathBuf, process::ExitCode};

use agentwall::{discovery, review};

#[derive(clap::Args)]
pub struct Args {
    /// Only flows from this long ago on (90s, 30m, 24h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Default: `audit_log` from the node's config.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

fn records(args: &Args) -> anyhow::Result<Vec<serde_json::Value>> {
    let since = args
        .since
        .as_deref()
        .map(review::parse_duration)
        .transpose()?
        .map(|d| time::OffsetDateTime::now_utc() - d);
    let log = super::report::audit_log(args.audit_log.clone())?;
    let mut out = Vec::new();
    for path in review::audit_files(&log) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            if v.get("kind").is_some_and(|k| k != "decision") {
                continue;
            }
            let when = v
                .get("last_seen")
                .or_else(|| v.get("time"))
                .and_then(|t| t.as_str())
                .and_then(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .ok()
                });
            if let (Some(since), Some(t)) = (since, when) {
                if t < since {
                    continue;
                }
            }
            out.push(v);
        }
    }
    Ok(out)
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
    for g in &groups {
        println!("{}", g.group);
        for s in &g.services {
            println!(
                "  {}: {} flow(s), first {}, last {}: {}",
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
        println!("  suggested policy:");
        for l in g.suggested_policy.lines() {
            println!("    {l}");
        }
    }
    println!(
        "{} process group(s) reached AI services without an identity",
        groups.len()
    );
    ExitCode::SUCCESS
}
