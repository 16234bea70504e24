use std::{path::PathBuf, process::ExitCode};

use agentwall::audit::{rotated, verify};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check an audit log's hash chain; with one file, its rotated predecessors (FILE.1,
    /// FILE.2, ...) are checked first. Reports the first broken or missing record.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Exit 0 when the chain is intact, 1 at the first broken record.
pub fn run(cmd: Command) -> ExitCode {
    let Command::Verify { files } = cmd;
    let chain = match files.as_slice() {
        [one] => {
            let mut v = rotated(one);
            v.push(one.clone());
            v
        }
        many => many.to_vec(),
    };
    match verify(&chain) {
        Ok(n) => {
            println!("{n} records in {} file(s), chain intact", chain.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentwall audit verify: {e}");
            ExitCode::FAILURE
        }
    }
}
