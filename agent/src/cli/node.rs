use std::{io::Write as _, path::PathBuf};

use agentwall::{
    config::{DEFAULT_CONFIG, NodeConfig, UnknownFlowsSetting},
    node::Node,
};
use anyhow::Context as _;

#[derive(clap::Args)]
pub struct Args {
    /// TOML config file; flags override its settings.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    #[arg(long)]
    trust_domain: Option<String>,
    /// CRL file (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// Take a CRL past its nextUpdate as current (true|false; default false).
    #[arg(long)]
    accept_expired_crl: Option<bool>,
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long)]
    socket_group: Option<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    #[arg(long)]
    attach_cgroup: Option<PathBuf>,
    #[arg(long, value_parser = ["report", "deny", "ignore"])]
    unknown_flows: Option<String>,
    #[arg(long)]
    audit_log: Option<PathBuf>,
    #[arg(long)]
    audit_log_max_bytes: Option<u64>,
    /// Group that may read the audit log (0640); without one, root only (0600).
    #[arg(long)]
    audit_log_group: Option<String>,
    /// Ed25519 private key (PKCS#8 PEM) to sign audit checkpoints with; `audit verify
    /// --signer` checks them against its public key.
    #[arg(long)]
    audit_signing_key: Option<PathBuf>,
    /// Seconds between signed audit checkpoints (default 60).
    #[arg(long)]
    audit_checkpoint_secs: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// DNS proxy port at each identity's proxy address (0 = off).
    #[arg(long)]
    dns_listen_port: Option<u16>,
    /// Upstream resolver for the DNS proxy, e.g. 192.0.2.53:53 (repeatable; default: resolv.conf).
    #[arg(long)]
    dns_upstream: Vec<std::net::SocketAddr>,
    #[arg(long)]
    dns_grace_secs: Option<u64>,
    #[arg(long)]
    dns_min_ttl_secs: Option<u64>,
    #[arg(long)]
    dns_max_names: Option<usize>,
    #[arg(long)]
    dns_max_addresses: Option<usize>,
    #[arg(long)]
    dns_timeout_ms: Option<u64>,
    /// Network namespaces (besides the node's) the DNS proxy serves one identity in (default 16).
    #[arg(long)]
    dns_max_namespaces_per_identity: Option<usize>,
    /// Network namespaces (besides the node's) the DNS proxy serves in all (default 256).
    #[arg(long)]
    dns_max_namespaces: Option<usize>,
    /// Fold identical flows within this many seconds into one record (0 = off).
    #[arg(long)]
    aggregate_window_secs: Option<u64>,
    /// Record flows rules allow too (true|false; default true).
    #[arg(long)]
    record_allowed: Option<bool>,
    /// Seconds between resolutions of the AI catalog's names (0 = never).
    #[arg(long)]
    catalog_refresh_secs: Option<u64>,
    /// Control plane URL (https://HOST:PORT); policy then comes from it.
    #[arg(long)]
    control_plane_url: Option<String>,
    /// CA bundle of the control plane's certificate.
    #[arg(long)]
    control_plane_ca: Option<PathBuf>,
    /// This node's certificate (a SPIFFE ID such as spiffe://example.org/node/HOST) and key.
    #[arg(long)]
    control_plane_cert: Option<PathBuf>,
    #[arg(long)]
    control_plane_key: Option<PathBuf>,
    /// Size limit of the report spool, in bytes (default 64 MiB).
    #[arg(long)]
    control_plane_spool_max_bytes: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(p) => NodeConfig::load(p)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            NodeConfig::load(std::path::Path::new(DEFAULT_CONFIG))?
        }
        None => NodeConfig::default(),
    };
    let flags = NodeConfig {
        policy_dir: args.policy_dir,
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        crl: args.crl,
        accept_expired_crl: args.accept_expired_crl,
        socket: args.socket,
        socket_group: args.socket_group,
        state_dir: args.state_dir,
        bpffs_dir: args.bpffs_dir,
        attach_cgroup: args.attach_cgroup,
        unknown_flows: args.unknown_flows.map(|s| match s.as_str() {
            "deny" => UnknownFlowsSetting::Deny,
            "ignore" => UnknownFlowsSetting::Ignore,
            _ => UnknownFlowsSetting::Report,
        }),
        audit_log: args.audit_log,
        audit_log_max_bytes: args.audit_log_max_bytes,
        audit_log_group: args.audit_log_group,
        audit_signing_key: args.audit_signing_key,
        audit_checkpoint_secs: args.audit_checkpoint_secs,
        metrics_listen: args.metrics_listen,
        dns_listen_port: args.dns_listen_port,
        dns_upstream: args.dns_upstream,
        dns_grace_secs: args.dns_grace_secs,
        dns_min_ttl_secs: args.dns_min_ttl_secs,
        dns_max_names: args.dns_max_names,
        dns_max_addresses: args.dns_max_addresses,
        dns_timeout_ms: args.dns_timeout_ms,
        dns_max_namespaces_per_identity: args.dns_max_namespaces_per_identity,
        dns_max_namespaces: args.dns_max_namespaces,
        aggregate_window_secs: args.aggregate_window_secs,
        record_allowed: args.record_allowed,
        catalog_refresh_secs: args.catalog_refresh_secs,
        ai_catalog: Vec::new(),
        control_plane: {
            let cp = agentwall::config::control_plane::ClientConfig {
                url: args.control_plane_url,
                ca: args.control_plane_ca,
                cert: args.control_plane_cert,
                key: args.control_plane_key,
                token_file: None,
                spool_max_bytes: args.control_plane_spool_max_bytes,
            };
            (cp != Default::default()).then_some(cp)
        },
    };
    let cfg = file.overlay(flags);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let notify = std::env::var("NOTIFY_SOCKET").ok();
    // The main thread only waits for the node's task: everything that touches the kernel runs
    // on runtime threads, which all descend from the workers. An operator (or the fault suite)
    // can then put those threads in a cgroup v1 memory group of their own, charging the
    // datapath's kernel memory there while the process's pages stay with the main thread.
    let node_task = async move {
        let node = Node::start(cfg)?;
        node.serve(|socket, revision| {
            println!(
                "agentwall node ready: socket={} revision={revision}",
                socket.display()
            );
            let _ = std::io::stdout().flush();
            agentwall::node::sd_notify(
                notify.as_deref(),
                &format!("READY=1\nSTATUS=policy revision {revision}"),
            );
        })
        .await?;
        agentwall::node::sd_notify(notify.as_deref(), "STOPPING=1");
        anyhow::Ok(())
    };
    rt.block_on(async move { tokio::spawn(node_task).await })
        .context("the node's task panicked")?
}
