use std::time::Duration;

use agentwall::api::{self, Request};
use anyhow::bail;

use super::node_config::NodeSocket;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    socket: NodeSocket,
    /// Keep printing new records as they arrive.
    #[arg(long)]
    follow: bool,
    /// Only records of this verdict.
    #[arg(long, value_parser = ["deny", "audit", "unknown", "socket-deny", "allow"])]
    verdict: Option<String>,
    /// text for a person, json (one record per line) for programs.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let socket = args.socket.path()?;
    let mut after = 0;
    loop {
        let r = api::call(
            &socket,
            None,
            &Request::Flows {
                after,
                verdict: args.verdict.clone(),
            },
        )?;
        if !r.ok {
            bail!("{}", r.error.unwrap_or_else(|| "refused".into()));
        }
        for f in r.flows.unwrap_or_default() {
            after = after.max(f.seq);
            if args.output == "json" {
                println!("{}", serde_json::to_string(&f)?);
            } else {
                say!("{f}");
            }
        }
        if !args.follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
