//! agentwall: identity-bound egress allowlists for AI agents, enforced by eBPF cgroup hooks.
//!
//! The library owns all logic; the `agentwall` binary is a thin CLI over it.

pub mod api;
pub mod audit;
pub mod cgroup;
pub mod clock;
pub mod config;
pub mod control_plane;
pub mod datapath;
pub mod discovery;
pub mod dns;
pub mod files;
pub mod flows;
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod native;
pub mod node;
pub mod pem;
pub mod policy;
pub mod review;
pub mod sockets;
pub mod workers;
