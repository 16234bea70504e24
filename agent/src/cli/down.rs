use std::path::PathBuf;

use anyhow::Context as _;

use super::node_config::ConfigArg;

#[derive(clap::Args)]
pub struct Args {
    /// The bpffs directory the node pins under [default: `bpffs_dir` from the config, else
    /// /sys/fs/bpf/agentwall].
    #[arg(long, value_name = "DIR")]
    bpffs_dir: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bpffs_dir = args.config.bpffs_dir(args.bpffs_dir)?;
    let removed = agentwall::datapath::teardown_all(&bpffs_dir)
        .with_context(|| format!("tearing down {}", bpffs_dir.display()))?;
    if removed.is_empty() {
        println!(
            "agentwall: nothing pinned under {} (no datapath there to detach)",
            bpffs_dir.display()
        );
    } else {
        println!(
            "agentwall: datapath under {} detached and unpinned ({})",
            bpffs_dir.display(),
            removed.join(", ")
        );
    }
    // The node routes its IPv6 DNS proxy prefix to lo when name rules need it.
    agentwall::dns::route::remove_local_route().with_context(|| {
        format!(
            "removing the route of {}/96",
            agentwall::dns::route::proxy_net6()
        )
    })?;
    Ok(())
}
