use agentwall::api::{self, Request};
use anyhow::bail;

use super::node_config::NodeSocket;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    socket: NodeSocket,
    /// text for a person, json for programs (the same fields as the API's status).
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
    /// Run the enforcement self-check now (a canary process tries what each kernel line must
    /// refuse) before answering; the node also runs it at start and every five minutes.
    #[arg(long)]
    check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let request = if args.check {
        Request::Check
    } else {
        Request::Status
    };
    let r = api::call(&args.socket.path()?, None, &request)?;
    if !r.ok {
        bail!("{}", r.error.unwrap_or_else(|| "refused".into()));
    }
    let s = r.status.unwrap_or_default();
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let or_null = |v: Option<u64>| v.map_or_else(|| "null".to_owned(), |n| n.to_string());
    println!("node: {} (agentwall {})", s.node, s.version);
    println!("revision: {}", s.revision);
    for id in &s.revoked {
        println!("revoked identity: {id}");
    }
    if let Some(e) = &s.policy_error {
        println!("rejected policy change (last good revision in force):\n{e}");
    }
    for f in &s.policy_files_being_written {
        say!("policy file being written (read once closed): {f}");
    }
    println!("dropped events: {}", or_null(s.dropped_events));
    match &s.socket_families {
        agentwall::datapath::SocketFamilies::Enforced => {
            println!("socket families: only unix, netlink, inet and inet6 (BPF LSM)")
        }
        agentwall::datapath::SocketFamilies::Unenforced(why) => {
            println!("socket families: NOT judged beyond inet: {why}")
        }
    }
    match s.kernel_layout.as_deref() {
        None => println!("kernel layout: not reported by this node"),
        Some([]) => println!("kernel layout: every field found in the BTF"),
        Some(gaps) => {
            for gap in gaps {
                println!("kernel layout: UNKNOWN: {}: {}", gap.unknown, gap.effect);
            }
        }
    }
    match &s.server_name_check {
        Some(agentwall::datapath::ServerNameCheck::Loaded) => {
            println!("server-name check: loaded")
        }
        Some(agentwall::datapath::ServerNameCheck::Unavailable(why)) => println!(
            "server-name check: NOT loaded: {why} (sni: enforce refuses, at connect, connections only a name rule allows; sni: audit records them)"
        ),
        None => println!("server-name check: not reported by this node"),
    }
    match &s.self_check {
        Some(c) if c.ok => println!("self-check: passed at {}", c.at),
        Some(c) => println!(
            "self-check: FAILED at {}: {} (new launches and enrollments are refused)",
            c.at,
            c.failures()
        ),
        None => println!("self-check: not run yet"),
    }
    if let Some(cp) = &s.control_plane {
        println!(
            "control plane: {} ({}), bundle version {} applied, {} record(s) spooled, {} lost",
            cp.url.as_deref().unwrap_or("?"),
            if cp.connected {
                "connected"
            } else {
                "unreachable"
            },
            cp.applied_version,
            cp.spool_records,
            cp.records_lost
        );
    }
    if let Some(f) = &s.map_fill {
        println!(
            "maps: bindings {}/{}, identities {}/{}, rules {}, server names {}/{}",
            f.bindings,
            f.bindings_max,
            f.identities,
            f.identities_max,
            f.rules,
            f.server_names,
            f.server_names_max
        );
    }
    for id in &s.identities {
        println!(
            "{}  policy={} mode={} rules={} sessions={}{}",
            id.identity,
            id.policy,
            id.mode,
            id.rules,
            id.sessions.len(),
            agentwall::policy::owner::describe(id.owner.as_ref(), &id.labels)
        );
        for s in &id.sessions {
            say!(
                "    pid {} cgroup {} not_after {} renewed {}{}",
                s.pid,
                s.cgroup.display(),
                s.not_after,
                agentwall::node::follow::renews(s),
                if s.revoked { " REVOKED (CRL)" } else { "" }
            );
        }
    }
    Ok(())
}
