use std::path::PathBuf;

use agentwall::{
    api::{self, Request},
    config::DEFAULT_SOCKET,
};
use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    /// The SPIFFE ID to revoke.
    identity: String,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let r = api::call(
        &args.socket,
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
