use std::path::PathBuf;

use agentwall::{
    api::{self, Request},
    config::DEFAULT_SOCKET,
};
use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let r = api::call(&args.socket, None, &Request::Status)?;
    if !r.ok {
        bail!("{}", r.error.unwrap_or_else(|| "refused".into()));
    }
    let s = r.status.unwrap_or_default();
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "node: {} (agentwall {})",
        s["node"].as_str().unwrap_or("?"),
        s["version"].as_str().unwrap_or("?")
    );
    println!("revision: {}", s["revision"].as_str().unwrap_or("?"));
    for id in s["revoked"].as_array().into_iter().flatten() {
        println!("revoked identity: {}", id.as_str().unwrap_or("?"));
    }
    if let Some(e) = s["policy_error"].as_str() {
        println!("rejected policy change (last good revision in force):\n{e}");
    }
    println!("dropped events: {}", s["dropped_events"]);
    let cp = &s["control_plane"];
    if !cp.is_null() {
        println!(
            "control plane: {} ({}), bundle version {} applied, {} record(s) spooled, {} lost",
            cp["url"].as_str().unwrap_or("?"),
            if cp["connected"] == true {
                "connected"
            } else {
                "unreachable"
            },
            cp["applied_version"],
            cp["spool_records"],
            cp["records_lost"]
        );
    }
    let f = &s["map_fill"];
    println!(
        "maps: bindings {}/{}, identities {}/{}, rules {}",
        f["bindings"], f["bindings_max"], f["identities"], f["identities_max"], f["rules"]
    );
    for id in s["identities"].as_array().into_iter().flatten() {
        let sessions = id["sessions"].as_array().map_or(0, Vec::len);
        println!(
            "{}  policy={} mode={} rules={} sessions={}",
            id["identity"].as_str().unwrap_or("?"),
            id["policy"].as_str().unwrap_or("?"),
            id["mode"].as_str().unwrap_or("?"),
            id["rules"],
            sessions
        );
        for s in id["sessions"].as_array().into_iter().flatten() {
            println!(
                "    pid {} cgroup {} not_after {}{}",
                s["pid"],
                s["cgroup"].as_str().unwrap_or("?"),
                s["not_after"].as_str().unwrap_or("?"),
                if s["revoked"] == true {
                    " REVOKED (CRL)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}
