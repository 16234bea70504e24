use std::{io::Write as _, path::PathBuf};

use agentwall::{config::control_plane::ServerConfig, control_plane::server};
use anyhow::Context as _;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run the control plane server.
    Serve(Box<ServeArgs>),
    /// Print a new random bearer token and the `token_sha256` line for the server's config.
    Token,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML config: listen, cert, key, client_ca, database, [[access]] (see the README).
    #[arg(long)]
    config: PathBuf,
    /// Overrides `listen` (port 0 picks a free port; the ready line names it).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Overrides `database`: an SQLite file, or postgres://USER@HOST:PORT/DB (replicas).
    #[arg(long, value_name = "FILE|URL")]
    database: Option<String>,
    /// Overrides `require_owner`: refuse pushes with an AgentPolicy that names no owner.
    #[arg(long)]
    require_owner: bool,
    /// Overrides `approvals_required`: how many signers' signatures a bundle needs before it
    /// is published.
    #[arg(long, value_name = "N")]
    approvals_required: Option<u32>,
    /// Overrides `break_glass_approvals`: how many signatures publish a bundle that only
    /// adds break-glass grants (fewer than approvals_required).
    #[arg(long, value_name = "N")]
    break_glass_approvals: Option<u32>,
    /// Adds to `[signers]`: NAME=FILE, an admin's name and public key (SPKI PEM).
    /// Repeatable.
    #[arg(long = "signer", value_name = "NAME=FILE")]
    signers: Vec<String>,
    /// Overrides `console`: serve no console (its routes answer 404).
    #[arg(long)]
    no_console: bool,
    /// Overrides `console_session_hours`: how long a console sign-in lasts (1 to 168).
    #[arg(long, value_name = "HOURS")]
    console_session_hours: Option<u32>,
    /// Overrides `syslog.address`: forward records as OCSF events to this syslog-over-TLS
    /// receiver (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    syslog: Option<String>,
    /// Overrides `syslog.ca`: the CA bundle (PEM) the receiver's certificate chains to.
    #[arg(long, value_name = "FILE")]
    syslog_ca: Option<PathBuf>,
    /// Overrides `syslog.cert`: a client certificate (PEM) for the receiver.
    #[arg(long, value_name = "FILE", requires = "syslog_key")]
    syslog_cert: Option<PathBuf>,
    /// Overrides `syslog.key`: the client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "syslog_cert")]
    syslog_key: Option<PathBuf>,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Token => {
            let mut b = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                .context("reading /dev/urandom")?;
            let token = hex::encode(b);
            let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
            println!("token: {token}");
            println!("token_sha256 = [\"{hash}\"]");
            Ok(())
        }
        Command::Serve(args) => {
            let mut cfg = ServerConfig::load(&args.config)?;
            if let Some(l) = args.listen {
                cfg.listen = l;
            }
            if let Some(d) = &args.database {
                cfg.set_database(d)?;
            }
            cfg.require_owner |= args.require_owner;
            for s in &args.signers {
                let (name, file) = s
                    .split_once('=')
                    .with_context(|| format!("--signer {s:?} is not NAME=FILE"))?;
                cfg.signers.insert(name.to_owned(), file.into());
            }
            if let Some(n) = args.approvals_required {
                cfg.approvals_required = n;
            }
            if let Some(n) = args.break_glass_approvals {
                cfg.break_glass_approvals = Some(n);
            }
            cfg.check_approvals().map_err(|e| anyhow::anyhow!(e))?;
            cfg.console &= !args.no_console;
            if let Some(h) = args.console_session_hours {
                cfg.set_console_session_hours(h)?;
            }
            cfg.set_syslog(
                args.syslog,
                args.syslog_ca,
                args.syslog_cert.zip(args.syslog_key),
            )?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let notify = std::env::var("NOTIFY_SOCKET").ok();
            rt.block_on(server::serve(cfg, |addr| {
                println!("agentwall control plane ready: listen={addr}");
                let _ = std::io::stdout().flush();
                agentwall::node::sd_notify(
                    notify.as_deref(),
                    &format!("READY=1\nSTATUS=listening on {addr}"),
                );
            }))?;
            agentwall::node::sd_notify(notify.as_deref(), "STOPPING=1");
            Ok(())
        }
    }
}
