//! agentwall: identity-bound egress allowlists for AI agents, enforced by eBPF cgroup hooks.
//!
//! The library owns all logic; the `agentwall` binary is a thin CLI over it.

/// A named point where a test may crash the process: compiled only with the `failpoints`
/// feature (the test suite's build), and armed by [`arm_failpoints`]. The crash is a SIGKILL
/// of the whole process: nothing after the point runs, no destructor, no flush.
#[cfg(feature = "failpoints")]
macro_rules! failpoint {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::crash_here($name))
    };
}
#[cfg(not(feature = "failpoints"))]
macro_rules! failpoint {
    ($name:literal) => {};
}
pub(crate) use failpoint;

/// Kills this process where it stands (a failpoint was reached).
#[cfg(feature = "failpoints")]
pub fn crash_here(name: &str) -> ! {
    eprintln!("failpoint {name}: crashing");
    // SAFETY: plain system calls.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL is not caught")
}

/// Holds this thread at the gate a test keeps at the path `gate` (a failpoint's argument):
/// says it is there by making `GATE.reached`, and goes on once the test removes `GATE`. A
/// test stands in at such a point for another actor (root thawing a unit, say) with a
/// readiness signal, not a sleep.
#[cfg(feature = "failpoints")]
pub fn hold_at(gate: Option<String>) {
    let Some(gate) = gate else {
        panic!("a gate failpoint needs its path: NAME=return(PATH)");
    };
    let reached = format!("{gate}.reached");
    std::fs::write(&reached, b"").unwrap_or_else(|e| panic!("{reached}: {e}"));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::path::Path::new(&gate).exists() {
        assert!(
            std::time::Instant::now() < until,
            "{gate}: not opened in 300 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Arms the failpoints the environment variable `var` names (`NAME=ACTIONS;...`, fail's
/// syntax: `spool-after-write=return` crashes at the first pass, `=2*off->return` at the
/// third). The node arms `AGENTWALL_FAILPOINTS_AT_START` as it starts (the first apply
/// meets them) and `AGENTWALL_FAILPOINTS` once it is ready, so their passes are counted
/// from there. Nothing without the `failpoints` feature.
pub fn arm_failpoints(var: &str) {
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var(var) {
        for point in spec.split(';').filter(|p| !p.is_empty()) {
            let (name, actions) = point.split_once('=').unwrap_or((point, "return"));
            if let Err(e) = fail::cfg(name, actions) {
                panic!("{var} {point:?}: {e}");
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = var;
}

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
pub mod ocsf;
pub mod pem;
pub mod policy;
pub mod review;
pub mod sockets;
pub mod text;
pub mod workers;
pub mod workload_api;
