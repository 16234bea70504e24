use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print the shell completion script for SHELL on standard output.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write a man page for agentwall and for each of its subcommands into DIR.
    Man {
        /// The directory to write agentwall.1, agentwall-node.1, ... into (made if missing).
        dir: PathBuf,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let mut cli = super::Cli::command();
    match cmd {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut cli, "agentwall", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
            clap_mangen::generate_to(cli, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))
        }
    }
}
