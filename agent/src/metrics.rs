//! Prometheus text exposition of the node's counters and gauges (`metrics_listen`).

use std::{collections::BTreeMap, fmt::Write as _};

/// Counters the node keeps as records and applies happen.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// (identity or "" for cgroups bound to none, verdict) → decisions, kernel-suppressed
    /// repeats included.
    pub decisions: BTreeMap<(String, String), u64>,
    pub policy_applies: u64,
    /// Policy changes refused (invalid, or more than the datapath holds).
    pub policy_rejections: u64,
    /// Ticks at which a changed policy directory was not read because a file of it was
    /// still open for writing.
    pub policy_reads_held: u64,
    /// Launches, enrollments and renewals turned down (certificate, admission, datapath).
    pub session_rejections: u64,
    pub last_apply_seconds: f64,
    /// Addresses DNS answers made allowed.
    pub dns_learned: u64,
    /// Addresses a cap kept out.
    pub dns_refused: u64,
}

/// Point-in-time values read when scraped.
#[derive(Debug, Default)]
pub struct Gauges {
    pub dropped_events: crate::datapath::RingDrops,
    pub bindings: usize,
    pub bindings_max: usize,
    pub identities_active: usize,
    pub identities_revoked: usize,
    pub identities_max: usize,
    pub server_names: usize,
    pub server_names_max: usize,
    pub sessions: usize,
    pub audit_write_failures: u64,
    pub audit_ocsf_write_failures: u64,
    /// Enforcement self-checks that failed, and whether the last one passed (1) or not (0).
    pub selfcheck_failures: u64,
    pub selfcheck_ok: bool,
    /// The DNS proxy's counters, when it runs.
    pub dns: Option<std::sync::Arc<crate::dns::proxy::Stats>>,
    pub dns_learned_addresses: usize,
    /// (identity, rule id, rule place, flows the kernel counted for it).
    pub rule_hits: Vec<(String, u32, String, u64)>,
    /// (identity, seconds to its earliest session deadline).
    pub session_expiry: Vec<(String, f64)>,
    /// The control plane link's counters, when there is one.
    pub control_plane: Option<std::sync::Arc<crate::control_plane::link::LinkStats>>,
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
        "Decision records the kernel could not write because their ring buffer was full (governed identities' and unbound cgroups' records have one each).",
    );
    let _ = writeln!(
        out,
        "agentwall_events_dropped_total{{records=\"governed\"}} {}",
        g.dropped_events.governed
    );
    let _ = writeln!(
        out,
        "agentwall_events_dropped_total{{records=\"unknown\"}} {}",
        g.dropped_events.unknown
    );
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
    let _ = writeln!(
        out,
        "agentwall_map_entries{{map=\"server_names\"}} {}",
        g.server_names
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
    let _ = writeln!(
        out,
        "agentwall_map_capacity{{map=\"server_names\"}} {}",
        g.server_names_max
    );
    header(
        &mut out,
        "agentwall_map_fill_ratio",
        "gauge",
        "Entries over capacity of the datapath's fixed-size maps (0 to 1).",
    );
    let ratio = |n: usize, max: usize| if max == 0 { 0.0 } else { n as f64 / max as f64 };
    let _ = writeln!(
        out,
        "agentwall_map_fill_ratio{{map=\"bindings\"}} {}",
        ratio(g.bindings, g.bindings_max)
    );
    let _ = writeln!(
        out,
        "agentwall_map_fill_ratio{{map=\"identities\"}} {}",
        ratio(g.identities_active + g.identities_revoked, g.identities_max)
    );
    let _ = writeln!(
        out,
        "agentwall_map_fill_ratio{{map=\"server_names\"}} {}",
        ratio(g.server_names, g.server_names_max)
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
        "agentwall_session_expiry_seconds",
        "gauge",
        "Seconds until the earliest certificate deadline among an identity's sessions (the kernel cuts the session then unless it is renewed).",
    );
    for (identity, left) in &g.session_expiry {
        let _ = writeln!(
            out,
            "agentwall_session_expiry_seconds{{identity=\"{}\"}} {left:.3}",
            escape(identity)
        );
    }
    header(
        &mut out,
        "agentwall_session_rejections_total",
        "counter",
        "Launches, enrollments and renewals the node turned down (each also an audit record).",
    );
    let _ = writeln!(
        out,
        "agentwall_session_rejections_total {}",
        c.session_rejections
    );
    header(
        &mut out,
        "agentwall_policy_applies_total",
        "counter",
        "Policy revisions applied to the kernel.",
    );
    let _ = writeln!(out, "agentwall_policy_applies_total {}", c.policy_applies);
    header(
        &mut out,
        "agentwall_policy_rejections_total",
        "counter",
        "Policy changes refused (invalid, or more than the datapath holds); the last good revision stayed.",
    );
    let _ = writeln!(
        out,
        "agentwall_policy_rejections_total {}",
        c.policy_rejections
    );
    header(
        &mut out,
        "agentwall_policy_reads_held_total",
        "counter",
        "Ticks at which a changed policy directory was not read: a file of it was still open for writing.",
    );
    let _ = writeln!(
        out,
        "agentwall_policy_reads_held_total {}",
        c.policy_reads_held
    );
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
    header(
        &mut out,
        "agentwall_audit_ocsf_write_failures_total",
        "counter",
        "Audit records written to the native log but not to the OCSF file (audit_format = \"ocsf\").",
    );
    let _ = writeln!(
        out,
        "agentwall_audit_ocsf_write_failures_total {}",
        g.audit_ocsf_write_failures
    );
    header(
        &mut out,
        "agentwall_selfcheck_failures_total",
        "counter",
        "Enforcement self-checks in which a kernel line let through what it must refuse.",
    );
    let _ = writeln!(
        out,
        "agentwall_selfcheck_failures_total {}",
        g.selfcheck_failures
    );
    header(
        &mut out,
        "agentwall_selfcheck_ok",
        "gauge",
        "1 while the last enforcement self-check passed; 0 after a failed one (new sessions are refused).",
    );
    let _ = writeln!(out, "agentwall_selfcheck_ok {}", u8::from(g.selfcheck_ok));
    header(
        &mut out,
        "agentwall_rule_hits_total",
        "counter",
        "Flows each rule allowed, counted in the kernel (with record_allowed); reset when a new revision renumbers the rules.",
    );
    for (identity, id, place, n) in &g.rule_hits {
        let _ = writeln!(
            out,
            "agentwall_rule_hits_total{{identity=\"{}\",rule_id=\"{id}\",rule=\"{}\"}} {n}",
            escape(identity),
            escape(place)
        );
    }
    if let Some(d) = &g.dns {
        render_dns(&mut out, c, g, d);
    }
    if let Some(l) = &g.control_plane {
        render_link(&mut out, l);
    }
    out
}

fn render_dns(out: &mut String, c: &Counters, g: &Gauges, d: &crate::dns::proxy::Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    header(
        out,
        "agentwall_dns_queries_total",
        "counter",
        "Queries the DNS proxy received, by transport.",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_queries_total{{transport=\"udp\"}} {}",
        d.queries_udp.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "agentwall_dns_queries_total{{transport=\"tcp\"}} {}",
        d.queries_tcp.load(Relaxed)
    );
    header(
        out,
        "agentwall_dns_queries_refused_total",
        "counter",
        "Queries answered REFUSED because the identity's DNS policy does not allow the name or type; nothing was sent upstream.",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_queries_refused_total {}",
        d.refused.load(Relaxed)
    );
    header(
        out,
        "agentwall_dns_answers_total",
        "counter",
        "Upstream answers passed on to agents.",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_answers_total {}",
        d.answers.load(Relaxed)
    );
    header(
        out,
        "agentwall_dns_upstream_failures_total",
        "counter",
        "Queries no upstream answered in time (the agent got SERVFAIL).",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_upstream_failures_total {}",
        d.upstream_failures.load(Relaxed)
    );
    header(
        out,
        "agentwall_dns_dropped_total",
        "counter",
        "DNS messages the proxy dropped, by reason.",
    );
    for (reason, v) in [
        ("malformed_query", &d.dropped_malformed_query),
        ("oversized_query", &d.dropped_oversized_query),
        ("malformed_response", &d.dropped_malformed_response),
        ("mismatched_response", &d.dropped_mismatched_response),
    ] {
        let _ = writeln!(
            out,
            "agentwall_dns_dropped_total{{reason=\"{reason}\"}} {}",
            v.load(Relaxed)
        );
    }
    header(
        out,
        "agentwall_dns_learned_addresses",
        "gauge",
        "Addresses allowed now because an allowed name resolved to them.",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_learned_addresses {}",
        g.dns_learned_addresses
    );
    header(
        out,
        "agentwall_dns_addresses_learned_total",
        "counter",
        "Addresses DNS answers made allowed.",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_addresses_learned_total {}",
        c.dns_learned
    );
    header(
        out,
        "agentwall_dns_addresses_refused_total",
        "counter",
        "Addresses of allowed names a cap kept denied.",
    );
    let _ = writeln!(
        out,
        "agentwall_dns_addresses_refused_total {}",
        c.dns_refused
    );
    header(
        out,
        "agentwall_dns_proxy_latency_seconds",
        "histogram",
        "Time from a query's arrival to its answer going out, upstream and kernel update included.",
    );
    for (i, le) in crate::dns::proxy::LATENCY_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "agentwall_dns_proxy_latency_seconds_bucket{{le=\"{le}\"}} {}",
            d.latency_buckets[i].load(Relaxed)
        );
    }
    let count = d.latency_count.load(Relaxed);
    let _ = writeln!(
        out,
        "agentwall_dns_proxy_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "agentwall_dns_proxy_latency_seconds_sum {}",
        d.latency_sum_us.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "agentwall_dns_proxy_latency_seconds_count {count}");
}

fn render_link(out: &mut String, l: &crate::control_plane::link::LinkStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let rows: [(&str, &str, &str, u64); 11] = [
        (
            "agentwall_control_plane_connected",
            "gauge",
            "1 while the last exchange with the control plane (a poll or a report) succeeded.",
            u64::from(l.connected.load(Relaxed)),
        ),
        (
            "agentwall_control_plane_applied_version",
            "gauge",
            "The control plane's policy bundle version in force.",
            l.applied_version.load(Relaxed),
        ),
        (
            "agentwall_control_plane_spool_records",
            "gauge",
            "Records in the spool not yet acknowledged by the control plane.",
            l.spool_records.load(Relaxed),
        ),
        (
            "agentwall_control_plane_spool_bytes",
            "gauge",
            "Bytes the report spool takes on disk.",
            l.spool_bytes.load(Relaxed),
        ),
        (
            "agentwall_control_plane_records_sent_total",
            "counter",
            "Records the control plane stored.",
            l.sent.load(Relaxed),
        ),
        (
            "agentwall_control_plane_records_duplicate_total",
            "counter",
            "Records sent again that the control plane already had.",
            l.duplicates.load(Relaxed),
        ),
        (
            "agentwall_control_plane_records_lost_total",
            "counter",
            "Records dropped because the spool was full or could not be written, or because the control plane refused them as too large.",
            l.lost.load(Relaxed),
        ),
        (
            "agentwall_control_plane_records_refused_total",
            "counter",
            "Records the control plane refused as too large even alone (counted lost too).",
            l.records_refused.load(Relaxed),
        ),
        (
            "agentwall_control_plane_reports_deferred_total",
            "counter",
            "Report batches the control plane asked to send again later (over the node's quota, or busy); they wait in the spool for the Retry-After it gave.",
            l.reports_deferred.load(Relaxed),
        ),
        (
            "agentwall_control_plane_polls_replaced_total",
            "counter",
            "Polls a newer poll as this node ended (another process with this node's certificate?); each is followed by a 5 s pause.",
            l.polls_replaced.load(Relaxed),
        ),
        (
            "agentwall_control_plane_stale_answers_total",
            "counter",
            "Poll answers older than the bundle or revocations this node had (a replica behind, or a database put back): refused, the next URL asked.",
            l.stale_answers.load(Relaxed),
        ),
    ];
    for (name, kind, help, v) in rows {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
}
