use std::{path::PathBuf, process::ExitCode};

use agentwall::audit::{ChainStart, chain_files, verify};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check an audit log's hash chain; with one file, its rotated predecessors (FILE.1,
    /// FILE.2, ...) are checked first, and every one of them must be there. The chain must
    /// start at its genesis (seq 1) unless --from names the trusted point it continues.
    /// Reports the first broken or missing record.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// SEQ:HASH of the last record before the files given (a point an earlier check
        /// trusted, when older files were archived or removed on purpose).
        #[arg(long, value_parser = parse_point)]
        from: Option<ChainStart>,
    },
}

fn parse_point(s: &str) -> Result<ChainStart, String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not SEQ:HASH"))?;
    let seq = seq
        .parse()
        .map_err(|e| format!("{seq:?} is not a sequence number: {e}"))?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{hash:?} is not a record hash (64 hex digits)"));
    }
    Ok(ChainStart::After {
        seq,
        hash: hash.to_ascii_lowercase(),
    })
}

/// Exit 0 when the chain is intact, 1 at the first broken or missing record.
pub fn run(cmd: Command) -> ExitCode {
    let Command::Verify { files, from } = cmd;
    let chain = match files.as_slice() {
        [one] => match chain_files(one) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("agentwall audit verify: {e}");
                return ExitCode::FAILURE;
            }
        },
        many => many.to_vec(),
    };
    match verify(&chain, from.as_ref().unwrap_or(&ChainStart::Genesis)) {
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
