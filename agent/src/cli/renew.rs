use std::process::ExitCode;

use agentwall::api::Request;

use super::launch::CertArgs;

#[derive(clap::Args)]
pub struct Args {
    /// A newer certificate for the same identity, its key, and the node's socket.
    #[command(flatten)]
    id: CertArgs,
}

pub fn run(args: Args) -> ExitCode {
    match args.id.call("renew", &Request::Renew, || Ok(())) {
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
