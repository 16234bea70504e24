use std::{io::Write as _, path::PathBuf};

use agentwall::{
    config::{NodeConfig, UnknownFlowsSetting},
    node::Node,
};
use anyhow::Context as _;

#[derive(clap::Args)]
pub struct Args {
    /// TOML config file; flags override its settings [default: /etc/agentwall/agentwall.toml
    /// when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the config, the trust bundle, the CRLs and the policy, and say what the kernel
    /// offers (BTF, cgroup v2, BPF LSM, SO_PEERPIDFD), then exit without starting anything.
    #[arg(long)]
    check_config: bool,
    /// Directory of policy YAML files [default: /etc/agentwall/policy].
    #[arg(long, value_name = "DIR")]
    policy_dir: Option<PathBuf>,
    /// The CA certificates agents' certificates must chain to (PEM, or a SPIFFE bundle).
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// The SPIFFE trust domain agents' identities must be in (e.g. example.org).
    #[arg(long)]
    trust_domain: Option<String>,
    /// A trust domain's own bundle (PEM, or a SPIFFE bundle), never merged with another's
    /// (repeatable; replaces the config file's `[trust_bundles]`).
    #[arg(long = "trust-bundle-for", value_name = "DOMAIN=FILE", value_parser = domain_bundle)]
    trust_bundles: Vec<(String, PathBuf)>,
    /// CRL file (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// Take a CRL past its nextUpdate as current (true|false; default false).
    #[arg(long)]
    accept_expired_crl: Option<bool>,
    /// The local API socket [default: /run/agentwall/agentwall.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Group that may use the API socket (0660); without one, root only.
    #[arg(long)]
    socket_group: Option<String>,
    /// Where sessions, identities and counters are kept [default: /var/lib/agentwall].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The bpffs directory programs and maps are pinned under [default:
    /// /sys/fs/bpf/agentwall].
    #[arg(long, value_name = "DIR")]
    bpffs_dir: Option<PathBuf>,
    /// The cgroup v2 directory the programs attach to; agents are governed below it
    /// [default: the cgroup v2 mount point].
    #[arg(long, value_name = "DIR")]
    attach_cgroup: Option<PathBuf>,
    /// Flows of processes no identity is bound to: report them, deny them, or ignore them
    /// [default: report].
    #[arg(long, value_parser = ["report", "deny", "ignore"])]
    unknown_flows: Option<String>,
    /// The tamper-evident audit log (JSON lines, hash-chained); without one, no audit log.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Rotate the audit log past this size, in bytes (default 64 MiB).
    #[arg(long)]
    audit_log_max_bytes: Option<u64>,
    /// Group that may read the audit log (0640); without one, root only (0600).
    #[arg(long)]
    audit_log_group: Option<String>,
    /// `ocsf`: each audit record is also written as an OCSF event to a second file (the
    /// hash chain stays on the native log) [default: native].
    #[arg(long, value_enum)]
    audit_format: Option<agentwall::config::AuditFormat>,
    /// The OCSF file of `--audit-format ocsf` [default: NAME.ocsf.jsonl beside the audit
    /// log NAME.jsonl].
    #[arg(long, value_name = "FILE")]
    audit_ocsf_log: Option<PathBuf>,
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
    /// Seconds a learned address stays allowed after its TTL ran out (default 60).
    #[arg(long)]
    dns_grace_secs: Option<u64>,
    /// TTLs below this many seconds count as this (default 5).
    #[arg(long)]
    dns_min_ttl_secs: Option<u64>,
    /// Names with live addresses one identity may have (default 1024).
    #[arg(long)]
    dns_max_names: Option<usize>,
    /// Addresses one name may have per identity (default 32).
    #[arg(long)]
    dns_max_addresses: Option<usize>,
    /// Milliseconds one upstream gets to answer before the next is tried (default 2000).
    #[arg(long)]
    dns_timeout_ms: Option<u64>,
    /// Network namespaces (besides the node's) the DNS proxy serves one identity in (default 16).
    #[arg(long)]
    dns_max_namespaces_per_identity: Option<usize>,
    /// Network namespaces (besides the node's) the DNS proxy serves in all (default 256).
    #[arg(long)]
    dns_max_namespaces: Option<usize>,
    /// Fold identical flows within this many seconds into one record (default 10; 0 = off).
    #[arg(long)]
    aggregate_window_secs: Option<u64>,
    /// Record flows rules allow too (true|false; default true).
    #[arg(long)]
    record_allowed: Option<bool>,
    /// Seconds between resolutions of the AI catalog's names (default 300; 0 = never).
    #[arg(long)]
    catalog_refresh_secs: Option<u64>,
    /// Control plane URL (https://HOST:PORT); policy then comes from it. Repeat it for
    /// replicas: requests go to one until it fails, then to the next.
    #[arg(long)]
    control_plane_url: Vec<String>,
    /// CA bundle of the control plane's certificate.
    #[arg(long)]
    control_plane_ca: Option<PathBuf>,
    /// This node's certificate (a SPIFFE ID such as spiffe://example.org/node/HOST).
    #[arg(long, value_name = "FILE")]
    control_plane_cert: Option<PathBuf>,
    /// The private key of --control-plane-cert (PEM).
    #[arg(long, value_name = "FILE")]
    control_plane_key: Option<PathBuf>,
    /// Size limit of the report spool, in bytes (default 64 MiB).
    #[arg(long)]
    control_plane_spool_max_bytes: Option<u64>,
    /// A public key (SPKI PEM) of an admin whose signature bundles from the control plane
    /// may carry; with any, only signed bundles are applied. Repeatable.
    #[arg(long, value_name = "FILE")]
    trusted_signer: Vec<PathBuf>,
    /// How many distinct --trusted-signer keys must have signed a bundle (default 1).
    #[arg(long, value_name = "N")]
    signatures_required: Option<u32>,
    /// How many --trusted-signer keys suffice for a bundle that only adds break-glass
    /// grants (each at most 4 hours) to the one in force (fewer than
    /// --signatures-required; default: none suffice).
    #[arg(long, value_name = "N")]
    break_glass_signatures: Option<u32>,
    /// Who answers for this host, a person or team (e.g. platform@example.com).
    #[arg(long)]
    owner: Option<agentwall::policy::owner::Owner>,
    /// A label of this host, KEY=VALUE (repeatable; replaces the config's `[labels]`).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

fn domain_bundle(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((d, f)) if !d.is_empty() && !f.is_empty() => Ok((d.to_owned(), PathBuf::from(f))),
        _ => Err(format!("{s:?} is not DOMAIN=FILE")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let file = NodeConfig::find(args.config.as_deref())?;
    let check_config = args.check_config;
    let flags = NodeConfig {
        policy_dir: args.policy_dir,
        trust_bundle: args.trust_bundle,
        trust_domain: args.trust_domain,
        trust_bundles: args.trust_bundles.into_iter().collect(),
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
        audit_format: args.audit_format,
        audit_ocsf_log: args.audit_ocsf_log,
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
                url: None,
                urls: args.control_plane_url,
                ca: args.control_plane_ca,
                cert: args.control_plane_cert,
                key: args.control_plane_key,
                token_file: None,
                spool_max_bytes: args.control_plane_spool_max_bytes,
                trusted_signers: args.trusted_signer,
                signatures_required: args.signatures_required,
                break_glass_signatures: args.break_glass_signatures,
            };
            (cp != Default::default()).then_some(cp)
        },
        owner: args.owner,
        labels: agentwall::policy::owner::Labels::from_assignments(
            args.labels.iter().map(String::as_str),
        )?,
    };
    let cfg = file.overlay(flags);
    if check_config {
        let findings = agentwall::node::preflight::check(&cfg);
        for f in &findings {
            // A policy error list is several lines: each is shown on its own.
            for line in f.to_string().lines() {
                say!("{line}");
            }
        }
        let errors = findings
            .iter()
            .filter(|f| f.verdict == agentwall::node::preflight::Verdict::Error)
            .count();
        if errors > 0 {
            anyhow::bail!("{errors} error(s): the node would not start as configured");
        }
        println!("the node can start as configured");
        return Ok(());
    }
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
