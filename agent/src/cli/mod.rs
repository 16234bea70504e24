use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Prints a line for a person's terminal. Control characters in what nodes, agents and
/// records supplied (a process name, a version string, an error) are shown escaped, never
/// sent raw: an agent naming itself with an escape sequence must not drive the terminal of
/// whoever reads its records.
macro_rules! say {
    ($($t:tt)*) => { println!("{}", crate::cli::shown(&format!($($t)*))) };
}

/// `s` with every control character escaped (`\u{1b}`), and every character that changes how
/// the text around it shows without being seen (a direction override).
pub(crate) fn shown(s: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| c.is_control() || agentwall::policy::owner::is_hidden_format(c);
    if !s.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(s);
    }
    s.chars()
        .map(|c| {
            if hidden(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

mod audit;
mod control_plane;
mod cp;
mod down;
mod enroll;
mod flows;
mod generate;
mod launch;
mod node;
mod node_config;
mod policy;
mod renew;
mod report;
mod revoke;
mod shadow_ai;
mod status;

#[derive(Parser)]
#[command(
    name = "agentwall",
    version,
    about = "Identity-bound egress allowlists for AI agents, enforced by eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detach the datapath and remove every pin: enforcement ends.
    Down(down::Args),
    /// Run the node: datapath, policy, identities, local API.
    Node(Box<node::Args>),
    /// Prove an identity to the node and run a command confined to it.
    Launch(launch::Args),
    /// Bind an existing cgroup (a systemd unit, a container) to a certificate's identity.
    Enroll(enroll::Args),
    /// From inside a bound cgroup: extend its deadline with a newer certificate.
    Renew(renew::Args),
    /// Deny an identity everything, at once, on every cgroup bound to it.
    Revoke(revoke::Args),
    /// The node's state: revision, identities, sessions.
    Status(status::Args),
    /// Recorded flows (denied, audited, unknown, allowed), recent and (with --follow) live.
    Flows(flows::Args),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::Command),
    /// Policy as code: check, test, simulate and suggest policy.
    #[command(subcommand)]
    Policy(policy::Command),
    /// Reports over recorded flows.
    #[command(subcommand)]
    Report(report::Command),
    /// Process groups that reached AI services without an identity (shadow AI).
    ShadowAi(shadow_ai::Args),
    /// The control plane server.
    #[command(subcommand)]
    ControlPlane(control_plane::Command),
    /// Talk to a control plane: push policy, list nodes, read flows and shadow AI, revoke.
    Cp(Box<cp::Args>),
    /// For packagers: shell completions and man pages.
    #[command(subcommand)]
    Generate(generate::Command),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = agentwall::logging::init(
        std::env::var("AGENTWALL_LOG").ok().as_deref(),
        std::env::var("AGENTWALL_LOG_FORMAT").ok().as_deref(),
    ) {
        eprintln!("agentwall: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Down(args) => down::run(args),
        Command::Node(args) => node::run(*args),
        Command::Launch(args) => return launch::run(args),
        Command::Enroll(args) => return enroll::run(args),
        Command::Renew(args) => return renew::run(args),
        Command::Revoke(args) => revoke::run(args),
        Command::Status(args) => status::run(args),
        Command::Flows(args) => flows::run(args),
        Command::Policy(cmd) => return policy::run(cmd),
        Command::Audit(cmd) => return audit::run(cmd),
        Command::Report(cmd) => return report::run(cmd),
        Command::ShadowAi(args) => return shadow_ai::run(args),
        Command::ControlPlane(cmd) => control_plane::run(cmd),
        Command::Cp(args) => cp::run(*args),
        Command::Generate(cmd) => generate::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentwall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every flag and argument of every subcommand says what it is for in `--help` and in
    /// the man pages.
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && !cmd.is_hide_set() {
                missing.push(format!("{path} (the command itself)"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" || arg.is_hide_set() {
                    continue;
                }
                if arg
                    .get_help()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "no help line:\n{}", missing.join("\n"));
    }
}
