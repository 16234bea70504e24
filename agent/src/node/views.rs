//! Views: `status` and the metrics page, read from the owners (snapshots and short locks;
//! neither waits on a policy apply), and the metrics endpoint on the HTTP stack the control
//! plane uses.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use tracing::warn;

use super::Node;
use crate::{
    api::{Status, StatusCatalog, StatusDns, StatusIdentity, StatusLink},
    dns::proxy::Proxy,
    policy::Mode,
};

impl Node {
    pub fn status(&self) -> Status {
        let applied = self.enforcer.applied();
        let sessions = self.sessions.list();
        let identities = applied
            .policy
            .agents
            .iter()
            .map(|a| {
                let number = applied.identities.number(&a.identity);
                StatusIdentity {
                    identity: a.identity.clone(),
                    policy: a.name.clone(),
                    owner: a.owner.clone(),
                    labels: a.labels.clone(),
                    number,
                    mode: match a.mode {
                        Mode::Enforce => "enforce",
                        Mode::Audit => "audit",
                    }
                    .into(),
                    rules: applied.policy.rule_sources(a).len(),
                    sessions: sessions
                        .iter()
                        .filter(|s| s.identity == a.identity)
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Status {
            node,
            version: env!("CARGO_PKG_VERSION").into(),
            revoked: self.registry.revoked().into_iter().collect(),
            revision: applied.revision().to_owned(),
            policy_error: self.enforcer.last_error(),
            policy_files_being_written: self.enforcer.being_written(),
            identities,
            dropped_events: self.datapath.dropped_events().ok(),
            map_fill: self.datapath.fill().ok(),
            socket_families: self.datapath.socket_families().clone(),
            kernel_layout: Some(self.datapath.layout_gaps().to_vec()),
            server_name_check: Some(self.datapath.server_name_check().clone()),
            self_check: self.canary.last(),
            pins: self.datapath.pin_dir().to_owned(),
            catalog: StatusCatalog {
                addresses: self.catalog().known_addresses(),
            },
            dns: StatusDns {
                port: self.dns.proxy().map(Proxy::port),
                learned_addresses: self.dns.learned_addresses(),
                error: self.dns.error(),
            },
            control_plane: self.link.get().map(|l| StatusLink {
                url: l.polling.get().map(|u| u.get().to_owned()),
                connected: l.connected.load(Relaxed),
                applied_version: l.applied_version.load(Relaxed),
                spool_records: l.spool_records.load(Relaxed),
                spool_bytes: l.spool_bytes.load(Relaxed),
                records_lost: l.lost.load(Relaxed),
                revocations_pending: l
                    .revocations_pending
                    .lock()
                    .expect("pending revocations")
                    .clone(),
                bundle_refused: l.bundle_refused.lock().expect("bundle refused").clone(),
            }),
        }
    }

    /// Each rule's kernel hit count: (identity, rule id, file:line egress[i], count).
    fn rule_hits(&self) -> Vec<(String, u32, String, u64)> {
        let Ok(hits) = self.datapath.rule_hits() else {
            return Vec::new();
        };
        let applied = self.enforcer.applied();
        let mut out = Vec::new();
        for agent in &applied.policy.agents {
            let Some(n) = applied.identities.number(&agent.identity) else {
                continue;
            };
            for (i, (_, src)) in applied.policy.rule_sources(agent).into_iter().enumerate() {
                let id = i as u32 + 1;
                let count = hits.get(&(n, id)).copied().unwrap_or(0);
                out.push((agent.identity.clone(), id, src.place(), count));
            }
        }
        out
    }

    /// The metrics page, read now.
    pub fn metrics(&self) -> String {
        let fill = self.datapath.fill().ok();
        let table = self.registry.table();
        let revoked = self.registry.revoked().len();
        let g = crate::metrics::Gauges {
            dropped_events: self.datapath.dropped_by_ring().unwrap_or_default(),
            bindings: fill.map_or(0, |f| f.bindings),
            bindings_max: fill.map_or(0, |f| f.bindings_max),
            identities_active: table.len().saturating_sub(revoked),
            identities_revoked: revoked,
            identities_max: fill.map_or(0, |f| f.identities_max),
            server_names: fill.map_or(0, |f| f.server_names),
            server_names_max: fill.map_or(0, |f| f.server_names_max),
            sessions: self.sessions.len(),
            audit_write_failures: self.journal.failures(),
            audit_ocsf_write_failures: self.journal.ocsf_failures(),
            selfcheck_failures: self.canary.failures(),
            selfcheck_ok: self.canary.refusal().is_none(),
            dns: self.dns.proxy().map(Proxy::stats),
            dns_learned_addresses: self.dns.learned_addresses(),
            rule_hits: self.rule_hits(),
            session_expiry: self.sessions.expiry_seconds(),
            control_plane: self.link.get().cloned(),
        };
        crate::metrics::render(&self.counters.snapshot(), &g)
    }
}

/// Answers `GET /metrics` on `listener`; anything else gets 404. One answer per connection.
pub async fn serve_metrics(node: Arc<Node>, listener: tokio::net::TcpListener) {
    use axum::{http::header::CONTENT_TYPE, response::IntoResponse as _, routing::get};
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let node = node.clone();
                async move {
                    let page = tokio::task::spawn_blocking(move || node.metrics())
                        .await
                        .unwrap_or_default();
                    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], page)
                }
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                "not found: try GET /metrics\n",
            )
                .into_response()
        });
    loop {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::http::serve_connection(conn, router, (), false, None),
            )
            .await;
        });
    }
}
