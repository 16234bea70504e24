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
    /// Have the node renew the enrollment from --cert and --key whenever they are rewritten
    /// (by a rotator) [default: on when the certificate lives less than a day].
    #[arg(long, overrides_with = "no_follow")]
    follow: bool,
    /// Renew only by hand, however short the certificate's life.
    #[arg(long)]
    no_follow: bool,
}

pub fn run(args: Args) -> ExitCode {
    let follow = match super::launch::follow_files(
        args.follow,
        args.no_follow,
        None,
        &args.id.cert,
        &args.id.key,
    ) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("agentwall enroll: {e}");
            return ExitCode::from(2);
        }
    };
    let req = Request::Enroll {
        cgroup: args.cgroup.clone(),
        follow,
    };
    match args.id.call("enroll", &req, || Ok(())) {
        Ok(r) => {
            if let Some(w) = r.warning {
                eprintln!("agentwall enroll: {w}");
            }
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
