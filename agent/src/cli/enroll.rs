use std::{path::PathBuf, process::ExitCode};

use agentwall::api::Request;

use super::launch::CertArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The existing cgroup to bind (a systemd unit, a container), below the attach cgroup.
    #[arg(long)]
    cgroup: PathBuf,
    #[command(flatten)]
    id: CertArgs,
}

pub fn run(args: Args) -> ExitCode {
    let req = Request::Enroll {
        cgroup: args.cgroup.clone(),
    };
    match args.id.call("enroll", &req, || Ok(())) {
        Ok(r) => {
            println!(
                "agentwall enroll: {} bound to {}",
                args.cgroup.display(),
                r.identity.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
