use agentwall::api::{self, Request};
use anyhow::bail;

use super::node_config::NodeSocket;

#[derive(clap::Args)]
pub struct Args {
    /// The SPIFFE ID to revoke.
    identity: String,
    #[command(flatten)]
    socket: NodeSocket,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let r = api::call(
        &args.socket.path()?,
        None,
        &Request::Revoke {
            identity: args.identity.clone(),
        },
    )?;
    if !r.ok {
        bail!("{}", r.error.unwrap_or_else(|| "refused".into()));
    }
    println!(
        "agentwall revoke: {} is denied everything from now on",
        args.identity
    );
    Ok(())
}
