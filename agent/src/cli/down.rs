use std::path::PathBuf;

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct Args {
    /// The bpffs directory the node pins under.
    #[arg(long, default_value = "/sys/fs/bpf/agentwall")]
    bpffs_dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    agentwall::datapath::teardown(&args.bpffs_dir)
        .with_context(|| format!("tearing down {}", args.bpffs_dir.display()))?;
    println!(
        "agentwall: datapath under {} detached and unpinned",
        args.bpffs_dir.display()
    );
    // The node routes its IPv6 DNS proxy prefix to lo when name rules need it.
    agentwall::dns::route::remove_local_route().with_context(|| {
        format!(
            "removing the route of {}/96",
            agentwall::dns::route::proxy_net6()
        )
    })?;
    Ok(())
}
