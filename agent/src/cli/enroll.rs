use std::{path::PathBuf, process::ExitCode};

use agentwall::{api::Request, config::DEFAULT_SOCKET};

use super::launch::call_with_cert;

#[derive(clap::Args)]
pub struct Args {
    /// The existing cgroup to bind (a systemd unit, a container), below the attach cgroup.
    #[arg(long)]
    cgroup: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub fn run(args: Args) -> ExitCode {
    let req = Request::Enroll {
        cgroup: args.cgroup.clone(),
    };
    match call_with_cert("enroll", &args.socket, &args.cert, &args.key, &req, || {
        Ok(())
    }) {
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
