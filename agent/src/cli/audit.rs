use std::{path::PathBuf, process::ExitCode};

use agentwall::audit::{Anchor, ChainStart, SignerKey, chain_files, verify_signed};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check an audit log's hash chain; with one file, its rotated predecessors (FILE.1,
    /// FILE.2, ...) are checked first, and every one of them must be there. The chain must
    /// start at its genesis (seq 1) unless --from names the trusted point it continues.
    /// With the node's anchor (--anchor, or --config), records cut off the end are caught
    /// too. Reports the first broken or missing record.
    Verify {
        /// The log (its rotated files are found beside it), or every file in order. With
        /// --config, the node's `audit_log` when none is given.
        files: Vec<PathBuf>,
        /// The node's config: its `audit_log` and the anchor in its `state_dir`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The anchor file the node keeps (STATE_DIR/audit.anchor).
        #[arg(long)]
        anchor: Option<PathBuf>,
        /// SEQ:HASH of the last record before the files given (a point an earlier check
        /// trusted, when older files were archived or removed on purpose).
        #[arg(long, value_parser = parse_point)]
        from: Option<ChainStart>,
        /// The public key (SPKI PEM) the node signs checkpoints with: every `checkpoint`
        /// record must carry a valid signature by it over the record before it, and a log
        /// with records must have at least one.
        #[arg(long)]
        signer: Option<PathBuf>,
        /// With --signer: fail when more than N records follow the last checkpoint (a node
        /// signs every `audit_checkpoint_secs` and when it stops, so a stopped node's log
        /// ends signed: 0).
        #[arg(long, requires = "signer")]
        max_unsigned: Option<u64>,
    },
    /// Write the log's records as OCSF 1.3.0 events for a SIEM, one JSON object a line,
    /// oldest first (its rotated files first): decisions as Network Activity, DNS records as
    /// DNS Activity, identity records as Authentication or Account Change, each with the
    /// native record under `unmapped.agentwall`. Records of other kinds (policy changes,
    /// losses, checkpoints) are counted on stderr, not written. The native log keeps the
    /// hash chain; check it with `audit verify`.
    Export {
        /// ocsf: the format to write.
        #[arg(long, value_parser = ["ocsf"])]
        format: String,
        /// Only records from this long ago on (90s, 30m, 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The audit log to read [default: `audit_log` from the node's config].
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        #[command(flatten)]
        config: super::node_config::ConfigArg,
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

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("agentwall audit verify: {e}");
    ExitCode::FAILURE
}

/// Exit 0 when the chain is intact, 1 at the first broken or missing record (2 when the
/// command itself is wrong).
pub fn run(cmd: Command) -> ExitCode {
    let (mut files, config, mut anchor, from, signer, max_unsigned) = match cmd {
        Command::Verify {
            files,
            config,
            anchor,
            from,
            signer,
            max_unsigned,
        } => (files, config, anchor, from, signer, max_unsigned),
        Command::Export {
            format: _,
            since,
            audit_log,
            config,
        } => {
            return match export(audit_log, &config, since.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentwall audit export: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let signer = match signer.as_deref().map(SignerKey::load).transpose() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    if let Some(c) = &config {
        let cfg = match agentwall::config::NodeConfig::load(c) {
            Ok(cfg) => cfg,
            Err(e) => return fail(e),
        };
        if files.is_empty() {
            match cfg.audit_log.clone() {
                Some(p) => files.push(p),
                None => return fail(format!("{}: sets no audit_log", c.display())),
            }
        }
        anchor.get_or_insert_with(|| agentwall::config::audit_anchor(&cfg.state_dir()));
    }
    if files.is_empty() {
        eprintln!("agentwall audit verify: name the log (FILE) or the node's --config");
        return ExitCode::from(2);
    }
    let anchor = match anchor.as_deref().map(Anchor::read).transpose() {
        Ok(a) => anchor.zip(a.flatten()),
        Err(e) => return fail(e),
    };
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
    let with = anchor.as_ref().map(|(p, a)| (a, p.as_path()));
    match verify_signed(
        &chain,
        from.as_ref().unwrap_or(&ChainStart::Genesis),
        with,
        signer.as_ref(),
    ) {
        Ok(v) => {
            let anchored = match &anchor {
                Some((_, a)) => format!(", up to the anchor's seq {} and on", a.seq),
                None => String::new(),
            };
            println!(
                "{} records in {} file(s), chain intact{anchored}",
                v.records,
                chain.len()
            );
            if signer.is_some() {
                match v.signed_through {
                    Some(s) => {
                        // The checkpoint record itself follows the seq it signs.
                        let unsigned = v.last_seq.saturating_sub(s + 1);
                        println!(
                            "{} signed checkpoint(s), the last signing seq {s}; {unsigned} record(s) after it not yet signed",
                            v.checkpoints
                        );
                        if let Some(max) = max_unsigned
                            && unsigned > max
                        {
                            return fail(format!(
                                "{unsigned} record(s) follow the last signed checkpoint (at most {max} allowed): checkpoints after it were removed, or the records were added without the key"
                            ));
                        }
                    }
                    None if v.records > 0 => {
                        return fail(format!(
                            "{} record(s) and no signed checkpoint: checkpoints were removed, or the log was not written by a node signing with this key",
                            v.records
                        ));
                    }
                    None => {}
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `audit export --format ocsf`: every record as an OCSF event on stdout, a line each.
fn export(
    audit_log: Option<PathBuf>,
    config: &super::node_config::ConfigArg,
    since: Option<&str>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let (files, since) = super::report::sources(None, audit_log, config, since)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut counted = agentwall::ocsf::Exported::default();
    // A line that is no JSON object (a record cut short by a crash, a damaged file) is
    // left out and counted, with where the first one is: an export goes on past it.
    let mut unreadable = (0u64, None);
    agentwall::review::each_line(&files, |path, line, text| {
        let record = text
            .ok()
            .and_then(|t| serde_json::from_str::<&serde_json::value::RawValue>(t).ok())
            .filter(|r| r.get().starts_with('{'));
        let Some(record) = record else {
            unreadable.0 += 1;
            unreadable
                .1
                .get_or_insert_with(|| format!("{}:{line}", path.display()));
            return Ok(());
        };
        if since.is_some() {
            let view = agentwall::audit::RecordView::parse(record.get());
            let time = view.and_then(|v| v.text("last_seen").or_else(|| v.text("time")));
            if agentwall::review::before(time.as_deref(), since) {
                return Ok(());
            }
        }
        if let Some(e) = counted.map(record, agentwall::ocsf::Origin::Log) {
            serde_json::to_writer(&mut out, &e)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|source| agentwall::review::ReviewError::Io {
                    path: "standard output".into(),
                    source,
                })?;
        }
        Ok(())
    })?;
    out.flush()?;
    if let (n @ 1.., Some(first)) = unreadable {
        eprintln!("{n} line(s) that are no JSON record left out (the first at {first})");
    }
    eprintln!(
        "{} event(s) written (OCSF {}); {} record(s) of kinds OCSF has no class for here (policy, loss, checkpoint) left out",
        counted.events,
        agentwall::ocsf::VERSION,
        counted.not_mapped
    );
    Ok(())
}
