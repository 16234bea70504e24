//! Prometheus text exposition of the node's counters and gauges (`metrics_listen`).

use std::{collections::BTreeMap, fmt::Write as _};

/// Counters the node keeps as records and applies happen.
#[derive(Debug, Default)]
pub struct Counters {
    /// (identity or "" for cgroups bound to none, verdict) → decisions, kernel-suppressed
    /// repeats included.
    pub decisions: BTreeMap<(String, String), u64>,
    pub policy_applies: u64,
    pub last_apply_seconds: f64,
}

/// Point-in-time values read when scraped.
#[derive(Debug, Default)]
pub struct Gauges {
    pub dropped_events: u64,
    pub bindings: usize,
    pub bindings_max: usize,
    pub identities_active: usize,
    pub identities_revoked: usize,
    pub identities_max: usize,
    pub sessions: usize,
    pub audit_write_failures: u64,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn render(c: &Counters, g: &Gauges) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "agentwall_decisions_total",
        "counter",
        "Decision records by identity and verdict (deny, audit, unknown, socket-deny), identical repeats folded by the kernel included.",
    );
    for ((identity, verdict), n) in &c.decisions {
        let _ = writeln!(
            out,
            "agentwall_decisions_total{{identity=\"{}\",verdict=\"{}\"}} {n}",
            escape(identity),
            escape(verdict)
        );
    }
    header(
        &mut out,
        "agentwall_events_dropped_total",
        "counter",
        "Decision records the kernel could not write because the ring buffer was full.",
    );
    let _ = writeln!(out, "agentwall_events_dropped_total {}", g.dropped_events);
    header(
        &mut out,
        "agentwall_map_entries",
        "gauge",
        "Entries in the datapath's fixed-size maps.",
    );
    let _ = writeln!(
        out,
        "agentwall_map_entries{{map=\"bindings\"}} {}",
        g.bindings
    );
    let _ = writeln!(
        out,
        "agentwall_map_entries{{map=\"identities\"}} {}",
        g.identities_active + g.identities_revoked
    );
    header(
        &mut out,
        "agentwall_map_capacity",
        "gauge",
        "Capacity of the datapath's fixed-size maps.",
    );
    let _ = writeln!(
        out,
        "agentwall_map_capacity{{map=\"bindings\"}} {}",
        g.bindings_max
    );
    let _ = writeln!(
        out,
        "agentwall_map_capacity{{map=\"identities\"}} {}",
        g.identities_max
    );
    header(
        &mut out,
        "agentwall_identities",
        "gauge",
        "Identities known to the node, by state.",
    );
    let _ = writeln!(
        out,
        "agentwall_identities{{state=\"active\"}} {}",
        g.identities_active
    );
    let _ = writeln!(
        out,
        "agentwall_identities{{state=\"revoked\"}} {}",
        g.identities_revoked
    );
    header(
        &mut out,
        "agentwall_sessions",
        "gauge",
        "Launched or enrolled cgroups bound now.",
    );
    let _ = writeln!(out, "agentwall_sessions {}", g.sessions);
    header(
        &mut out,
        "agentwall_policy_applies_total",
        "counter",
        "Policy revisions applied to the kernel.",
    );
    let _ = writeln!(out, "agentwall_policy_applies_total {}", c.policy_applies);
    header(
        &mut out,
        "agentwall_policy_apply_seconds",
        "gauge",
        "How long the last policy apply took, compile to kernel.",
    );
    let _ = writeln!(
        out,
        "agentwall_policy_apply_seconds {}",
        c.last_apply_seconds
    );
    header(
        &mut out,
        "agentwall_audit_write_failures_total",
        "counter",
        "Audit records that could not be written.",
    );
    let _ = writeln!(
        out,
        "agentwall_audit_write_failures_total {}",
        g.audit_write_failures
    );
    out
}
