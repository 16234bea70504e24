use std::{path::PathBuf, process::ExitCode};

use agentwall::{api::Request, config::DEFAULT_SOCKET};

use super::launch::call_with_cert;

#[derive(clap::Args)]
pub struct Args {
    /// A newer certificate for the same identity.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub fn run(args: Args) -> ExitCode {
    match call_with_cert(
        "renew",
        &args.socket,
        &args.cert,
        &args.key,
        &Request::Renew,
        || Ok(()),
    ) {
        Ok(r) => {
            println!(
                "agentwall renew: {} extended for {}",
                r.cgroup
                    .map(|c| c.display().to_string())
                    .unwrap_or_default(),
                r.identity.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
