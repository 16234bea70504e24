//! The journal: everything the node reports goes through here, to the hash-chained audit log
//! and, with a control plane, to the outbox its link drains into the report spool. Nothing is
//! dropped without being counted: records the log could not take become a `loss` record in
//! the log once it takes records again, and so do records the outbox had no room for.

use std::{net::IpAddr, path::Path, sync::Mutex};

use serde::Serialize;
use serde_json::Value;
use tracing::{error, info};

use crate::{
    audit::AuditLog,
    flows::FlowRecord,
    policy::owner::{Labels, Owner},
};

/// Records the outbox holds at most before new ones count as lost.
const OUTBOX_MAX: usize = 1 << 20;

/// A certificate-bound session came to be or changed (`launched`, `enrolled`, `renewed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bound {
    pub identity: String,
    pub serial: String,
    pub cgroup: std::path::PathBuf,
    pub pid: u32,
    pub not_after: String,
}

/// `kind: identity` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum IdentityEvent {
    Launched(Bound),
    Enrolled(Bound),
    Renewed(Bound),
    SessionEnded {
        identity: String,
        cgroup: std::path::PathBuf,
        serial: String,
    },
    RevokedByCrl {
        identity: String,
        serial: String,
        cgroup: std::path::PathBuf,
        connections_destroyed: usize,
    },
    /// A session cut off for `reason`, for good: at its own request (its Workload API said
    /// its SVID is gone), or by the node (it used io_uring, which its identity's policy came
    /// to refuse).
    Ended {
        identity: String,
        serial: String,
        cgroup: std::path::PathBuf,
        connections_destroyed: usize,
        reason: String,
    },
    Expired {
        identity: String,
        cgroup: std::path::PathBuf,
        serial: String,
        not_after: String,
    },
    /// Past 90% of its certificate's life with no renewal yet.
    ExpiresSoon {
        identity: String,
        cgroup: std::path::PathBuf,
        serial: String,
        not_after: String,
        /// How the session is renewed (`from FILE (followed)`, `by hand`).
        renewed: String,
    },
    Revoked {
        identity: String,
        connections_destroyed: usize,
        /// `control-plane` for a fleet-wide revocation.
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<&'static str>,
    },
    /// A launch, enrollment or renewal turned down.
    Rejected {
        op: &'static str,
        identity: Option<String>,
        reason: Option<String>,
    },
}

/// `kind: policy` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum PolicyEvent {
    Applied {
        revision: String,
        identities: usize,
    },
    /// A change refused: invalid (no `revision`: it never had one), or valid and beyond what
    /// the datapath holds.
    Rejected {
        #[serde(skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
        errors: String,
        revision_in_force: String,
    },
}

/// `kind: dns` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DnsEvent {
    /// An answer named an address DNS may not open (deny list, rebinding).
    Refused {
        identity: String,
        name: String,
        addr: IpAddr,
        why: &'static str,
    },
    /// Addresses a cap kept out.
    Cap {
        identity: String,
        name: String,
        cap: &'static str,
        refused: Vec<IpAddr>,
    },
    Learned {
        identity: String,
        name: String,
        addrs: Vec<IpAddr>,
        rule_id: u32,
    },
    InstallFailed {
        identity: String,
        name: String,
        error: String,
    },
    /// A query the identity's DNS policy does not allow: answered REFUSED, nothing sent.
    QueryRefused {
        identity: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
        #[serde(skip_serializing_if = "Labels::is_empty")]
        labels: Labels,
        name: String,
        #[serde(rename = "type")]
        qtype: String,
        why: String,
        /// Queries this record stands for (the ones after the first within a second are
        /// counted, not written one by one).
        count: u64,
    },
    /// The same in audit mode: forwarded, and recorded as what would have been refused.
    QueryWouldRefuse {
        identity: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
        #[serde(skip_serializing_if = "Labels::is_empty")]
        labels: Labels,
        name: String,
        #[serde(rename = "type")]
        qtype: String,
        why: String,
        count: u64,
    },
    /// An agent's network namespace got no proxy: a cap was reached.
    NamespaceCap {
        identity: String,
        /// The namespace's inode.
        netns: u64,
        per_identity: usize,
        total: usize,
    },
}

/// `kind: loss` records the node writes about the kernel's ring buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelLoss {
    pub records_lost: u64,
    pub total_lost: u64,
}

/// One audit event.
#[derive(Clone, Debug, PartialEq)]
pub enum AuditEvent<'a> {
    Identity(IdentityEvent),
    Policy(PolicyEvent),
    Dns(DnsEvent),
    Loss(KernelLoss),
    Decision(&'a FlowRecord),
}

impl AuditEvent<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Identity(_) => "identity",
            Self::Policy(_) => "policy",
            Self::Dns(_) => "dns",
            Self::Loss(_) => "loss",
            Self::Decision(_) => "decision",
        }
    }

    /// The record's own fields (the log adds seq, kind, time, prev and hash).
    pub fn fields(&self) -> Value {
        let v = match self {
            Self::Identity(e) => serde_json::to_value(e),
            Self::Policy(e) => serde_json::to_value(e),
            Self::Dns(e) => serde_json::to_value(e),
            Self::Loss(e) => serde_json::to_value(e),
            Self::Decision(r) => serde_json::to_value(r),
        };
        v.expect("audit events serialize")
    }
}

struct State {
    log: Option<AuditLog>,
    /// Where the chain's head is anchored (`state_dir/audit.anchor`).
    anchor: Option<std::path::PathBuf>,
    /// Records the log could not take.
    failures: u64,
    /// Of those, the ones no `loss` record in the log accounts for yet.
    unlogged: u64,
    /// Records bound for the control plane, when there is one (taken by its link).
    outbox: Option<Vec<Value>>,
    /// Records the outbox could not hold (the link stalled); reported with the next one.
    outbox_lost: u64,
    /// The audit seqs of those records (first, last), when they came from the log.
    outbox_lost_span: Option<(u64, u64)>,
    /// The kernel events of the log's last records at start.
    recent_events: std::collections::HashSet<String>,
    /// Signs a checkpoint of the chain's head every so often (see [`Journal::sign_with`]).
    signing: Option<Signing>,
}

struct Signing {
    signer: crate::audit::Signer,
    every: std::time::Duration,
    last_at: std::time::Instant,
    /// The seq of the last checkpoint record written.
    last_seq: u64,
}

pub struct Journal {
    state: Mutex<State>,
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {message}")]
pub struct JournalError {
    path: std::path::PathBuf,
    message: String,
}

impl Journal {
    /// A journal writing to the audit log at `path` (none: records go to the outbox only),
    /// its head anchored at `anchor`. Records cut off the end of the log while the node was
    /// down (the anchor is ahead of the log) are said so, in the log too.
    pub fn open(
        path: Option<&Path>,
        max_bytes: u64,
        anchor: Option<&Path>,
        reader_gid: Option<u32>,
    ) -> Result<Self, JournalError> {
        let mut log = path
            .map(|p| {
                AuditLog::open_for(p, max_bytes, reader_gid).map_err(|e| JournalError {
                    path: p.to_owned(),
                    message: e.to_string(),
                })
            })
            .transpose()?;
        if let (Some(log), Some(at), Some(p)) = (&mut log, anchor, path) {
            let held = crate::audit::Anchor::read(at).map_err(|e| JournalError {
                path: at.to_owned(),
                message: e.to_string(),
            })?;
            let (seq, hash) = log.head();
            if let Some(a) = held.filter(|a| a.log == p)
                && (a.seq > seq || (a.seq == seq && a.hash != hash))
            {
                error!(anchor = %at.display(), anchored_seq = a.seq, log_seq = seq,
                    "audit records were cut off the end of the log while the node was down");
                let _ = log.append(
                    "loss",
                    serde_json::json!({
                        "audit_records_cut": a.seq.saturating_sub(seq),
                        "anchored_seq": a.seq,
                        "anchored_hash": a.hash,
                    }),
                );
            }
        }
        let recent_events = log
            .as_ref()
            .map(|l| l.recent_events().iter().cloned().collect())
            .unwrap_or_default();
        Ok(Self {
            state: Mutex::new(State {
                recent_events,
                signing: None,
                log,
                anchor: anchor.map(Path::to_owned),
                failures: 0,
                unlogged: 0,
                outbox: None,
                outbox_lost: 0,
                outbox_lost_span: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The seq of the audit log's last record (none without a log).
    pub fn head(&self) -> Option<u64> {
        self.lock().log.as_ref().map(|l| l.head().0)
    }

    /// The kernel events (see [`crate::flows::FlowRecord::kernel_event`]) of the records
    /// the log ended with when the node started.
    pub fn recent_events(&self) -> std::collections::HashSet<String> {
        self.lock().recent_events.clone()
    }

    /// Records written since the last call, oldest first.
    pub fn take_outbox(&self) -> Vec<Value> {
        self.lock()
            .outbox
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// From now on a `checkpoint` record signed by `signer` goes in every `every` (when
    /// records were written since the last one).
    pub fn sign_with(&self, signer: crate::audit::Signer, every: std::time::Duration) {
        self.lock().signing = Some(Signing {
            signer,
            every,
            last_at: std::time::Instant::now(),
            last_seq: 0,
        });
    }

    /// Syncs the audit log and moves its anchor to the chain's head (called every tick, and
    /// at shutdown), signing a checkpoint first when one is due (`last`: at once, the node
    /// is stopping). A failure is logged; the next call tries again.
    pub fn checkpoint(&self, last: bool) {
        let mut st = self.lock();
        let st = &mut *st;
        if let (Some(sg), Some(log)) = (&mut st.signing, &mut st.log)
            && (last || sg.last_at.elapsed() >= sg.every)
            && log.head().0 > sg.last_seq
        {
            sg.last_at = std::time::Instant::now();
            match log.sign_checkpoint(&sg.signer) {
                Ok((seq, r)) => {
                    sg.last_seq = seq;
                    Self::push_out(st, r);
                }
                Err(e) => error!(error = %e, "the audit checkpoint could not be written"),
            }
        }
        let State {
            log: Some(log),
            anchor: Some(at),
            ..
        } = &mut *st
        else {
            return;
        };
        if let Err(e) = log.anchor_to(at) {
            error!(error = %e, "the audit log's anchor could not be moved");
        }
    }

    /// Audit records that could not be written (a full disk, say).
    pub fn failures(&self) -> u64 {
        self.lock().failures
    }

    /// Also writes each record from now on to `path` as an OCSF event
    /// ([`AuditLog::copy_as_ocsf`]); only with an audit log.
    pub fn copy_as_ocsf(&self, path: &Path) -> Result<(), JournalError> {
        let mut st = self.lock();
        let log = st.log.as_mut().ok_or_else(|| JournalError {
            path: path.to_owned(),
            message: "an OCSF copy needs an audit log to copy".into(),
        })?;
        log.copy_as_ocsf(path).map_err(|e| JournalError {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Records the OCSF file could not take.
    pub fn ocsf_failures(&self) -> u64 {
        self.lock().log.as_ref().map_or(0, AuditLog::ocsf_failures)
    }

    /// Writes an event to the audit log and the outbox. A failure is logged and counted; it
    /// never stops enforcement. The control plane is sent the record as the log holds it
    /// (seq, prev and hash included), so it can check the chain of what it was sent.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let kind = event.kind();
        let fields = event.fields();
        let mut st = self.lock();
        let unlogged = (st.outbox.is_some() && st.log.is_none()).then(|| fields.clone());
        let written = Self::log(&mut st, kind, fields);
        let r = match (written, unlogged) {
            (Ok(Some(r)), _) => r,
            // Not in the log: the control plane gets it unchained.
            (Ok(None), Some(fields)) | (Err(fields), _) => {
                let mut r = match fields {
                    Value::Object(m) => m,
                    other => {
                        let mut m = serde_json::Map::new();
                        m.insert("value".into(), other);
                        m
                    }
                };
                r.insert("kind".into(), kind.into());
                r.entry("time")
                    .or_insert(crate::clock::now_rfc3339().into());
                r
            }
            (Ok(None), None) => return,
        };
        Self::push_out(&mut st, r);
    }

    /// Puts a record in the outbox, when there is one.
    fn push_out(st: &mut State, r: serde_json::Map<String, Value>) {
        let Some(out) = &mut st.outbox else {
            return;
        };
        if out.len() >= OUTBOX_MAX {
            st.outbox_lost += 1;
            let seq = r.get("hash").and(r.get("seq")).and_then(Value::as_u64);
            st.outbox_lost_span = crate::control_plane::spool::widen(st.outbox_lost_span, seq);
            return;
        }
        if st.outbox_lost > 0 {
            let now = crate::clock::now_rfc3339();
            let mut loss = serde_json::json!({ "kind": "loss", "time": now, "outbox_records_lost": st.outbox_lost });
            if let Some((a, b)) = st.outbox_lost_span.take() {
                loss["outbox_seqs_lost"] = serde_json::json!([a, b]);
            }
            out.push(loss);
            st.outbox_lost = 0;
        }
        out.push(Value::Object(r));
    }

    /// From now on, records also go to the outbox (a control plane link runs), starting with
    /// those the log holds after seq `after`: what the spool had not taken when the node last
    /// stopped (a crash between a write to the log and the spool). `None`: from now on only.
    pub fn enable_outbox_from(&self, after: Option<u64>) {
        let mut st = self.lock();
        st.outbox.get_or_insert_with(Vec::new);
        let (Some(after), Some(log)) = (after, &st.log) else {
            return;
        };
        match log.records_after(after, OUTBOX_MAX) {
            Ok((records, more, more_span)) => {
                if !records.is_empty() || more > 0 {
                    info!(
                        after,
                        records = records.len(),
                        left_out = more,
                        "audit records the report spool had not taken go to the control plane"
                    );
                }
                for r in records {
                    Self::push_out(&mut st, r);
                }
                st.outbox_lost += more;
                if let Some((a, b)) = more_span {
                    st.outbox_lost_span =
                        crate::control_plane::spool::join(st.outbox_lost_span, Some((a, b)));
                }
            }
            Err(e) => {
                error!(error = %e, after, "the audit log could not be read back for the control plane; records written just before the node stopped may be missing there");
            }
        }
    }

    /// Appends to the audit log: the record as written; `Ok(None)` without a log; the fields
    /// back when the write failed. A loss record the log writes itself goes to the outbox.
    fn log(
        st: &mut State,
        kind: &str,
        fields: Value,
    ) -> Result<Option<serde_json::Map<String, Value>>, Value> {
        let Some(log) = st.log.as_mut() else {
            return Ok(None);
        };
        // Records that could not be written earlier are a counted loss in the log itself,
        // once it takes records again.
        if st.unlogged > 0 {
            let loss = serde_json::json!({ "audit_records_lost": st.unlogged });
            if let Ok((_, r)) = log.append_record("loss", loss) {
                st.unlogged = 0;
                Self::push_out(st, r);
            }
        }
        let log = st.log.as_mut().expect("checked above");
        let kept = st.outbox.is_some().then(|| fields.clone());
        match log.append_record(kind, fields) {
            Ok((_, r)) => Ok(Some(r)),
            Err(e) => {
                st.failures += 1;
                st.unlogged += 1;
                // A full disk fails every record: say so at 1, 2, 4, 8... failures, not each.
                if st.failures.is_power_of_two() {
                    error!(error = %e, failures = st.failures,
                        "audit records not written (counted in agentwall_audit_write_failures_total)");
                }
                Err(kept.unwrap_or(Value::Null))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each event against the `json!` the node wrote before its events were typed (the
    //! literals below are those of the node of the commit that introduced this file, with
    //! sample values): the audit log's records keep their keys and values.

    use super::*;
    use serde_json::json;

    fn bound() -> Bound {
        Bound {
            identity: "spiffe://example.org/agent/a".into(),
            serial: "0a1b".into(),
            cgroup: "/sys/fs/cgroup/agentwall/a-1-1".into(),
            pid: 42,
            not_after: "2026-12-01T10:00:00.000Z".into(),
        }
    }

    fn same(e: AuditEvent<'_>, kind: &str, want: Value) {
        assert_eq!(e.kind(), kind);
        assert_eq!(e.fields(), want, "{e:?}");
    }

    #[test]
    fn identity_events_keep_their_shape() {
        let (id, serial, cg, pid, not_after) = (
            "spiffe://example.org/agent/a",
            "0a1b",
            "/sys/fs/cgroup/agentwall/a-1-1",
            42,
            "2026-12-01T10:00:00.000Z",
        );
        for (ev, e) in [
            ("launched", IdentityEvent::Launched(bound())),
            ("enrolled", IdentityEvent::Enrolled(bound())),
            ("renewed", IdentityEvent::Renewed(bound())),
        ] {
            same(
                AuditEvent::Identity(e),
                "identity",
                json!({
                    "event": ev, "identity": id, "serial": serial,
                    "cgroup": cg, "pid": pid, "not_after": not_after,
                }),
            );
        }
        same(
            AuditEvent::Identity(IdentityEvent::SessionEnded {
                identity: id.into(),
                cgroup: cg.into(),
                serial: serial.into(),
            }),
            "identity",
            json!({ "event": "session-ended", "identity": id, "cgroup": cg, "serial": serial }),
        );
        same(
            AuditEvent::Identity(IdentityEvent::RevokedByCrl {
                identity: id.into(),
                serial: serial.into(),
                cgroup: cg.into(),
                connections_destroyed: 2,
            }),
            "identity",
            json!({ "event": "revoked-by-crl", "identity": id, "serial": serial, "cgroup": cg, "connections_destroyed": 2 }),
        );
        same(
            AuditEvent::Identity(IdentityEvent::Ended {
                identity: id.into(),
                serial: serial.into(),
                cgroup: cg.into(),
                connections_destroyed: 1,
                reason: "no identity issued".into(),
            }),
            "identity",
            json!({ "event": "ended", "identity": id, "serial": serial, "cgroup": cg, "connections_destroyed": 1, "reason": "no identity issued" }),
        );
        same(
            AuditEvent::Identity(IdentityEvent::Expired {
                identity: id.into(),
                cgroup: cg.into(),
                serial: serial.into(),
                not_after: not_after.into(),
            }),
            "identity",
            json!({ "event": "expired", "identity": id, "cgroup": cg, "serial": serial, "not_after": not_after }),
        );
        same(
            AuditEvent::Identity(IdentityEvent::Revoked {
                identity: id.into(),
                connections_destroyed: 1,
                by: None,
            }),
            "identity",
            json!({ "event": "revoked", "identity": id, "connections_destroyed": 1 }),
        );
        same(
            AuditEvent::Identity(IdentityEvent::Revoked {
                identity: id.into(),
                connections_destroyed: 0,
                by: Some("control-plane"),
            }),
            "identity",
            json!({ "event": "revoked", "identity": id, "connections_destroyed": 0, "by": "control-plane" }),
        );
        let reason: Option<String> = Some("identity x is revoked".into());
        same(
            AuditEvent::Identity(IdentityEvent::Rejected {
                op: "launch",
                identity: None,
                reason: reason.clone(),
            }),
            "identity",
            json!({ "event": "rejected", "op": "launch", "identity": None::<String>, "reason": reason }),
        );
    }

    #[test]
    fn policy_dns_and_loss_events_keep_their_shape() {
        same(
            AuditEvent::Policy(PolicyEvent::Applied {
                revision: "abcd".into(),
                identities: 3,
            }),
            "policy",
            json!({ "event": "applied", "revision": "abcd", "identities": 3 }),
        );
        same(
            AuditEvent::Policy(PolicyEvent::Rejected {
                revision: Some("beef".into()),
                errors: "too many".into(),
                revision_in_force: "abcd".into(),
            }),
            "policy",
            json!({ "event": "rejected", "revision": "beef", "errors": "too many", "revision_in_force": "abcd" }),
        );
        same(
            AuditEvent::Policy(PolicyEvent::Rejected {
                revision: None,
                errors: "a.yaml:1:1: bad".into(),
                revision_in_force: "abcd".into(),
            }),
            "policy",
            json!({ "event": "rejected", "errors": "a.yaml:1:1: bad", "revision_in_force": "abcd" }),
        );
        let (id, name) = ("spiffe://example.org/agent/a", "api.example.com");
        let ip: IpAddr = "169.254.169.254".parse().unwrap();
        same(
            AuditEvent::Dns(DnsEvent::Refused {
                identity: id.into(),
                name: name.into(),
                addr: ip,
                why: "global deny list",
            }),
            "dns",
            json!({ "event": "refused", "identity": id, "name": name, "addr": ip.to_string(), "why": "global deny list" }),
        );
        let addrs: Vec<IpAddr> = vec![
            "203.0.113.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ];
        let strings: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        same(
            AuditEvent::Dns(DnsEvent::Cap {
                identity: id.into(),
                name: name.into(),
                cap: "addresses per name",
                refused: addrs.clone(),
            }),
            "dns",
            json!({ "event": "cap", "identity": id, "name": name, "cap": "addresses per name", "refused": strings }),
        );
        same(
            AuditEvent::Dns(DnsEvent::Learned {
                identity: id.into(),
                name: name.into(),
                addrs,
                rule_id: 2,
            }),
            "dns",
            json!({ "event": "learned", "identity": id, "name": name, "addrs": strings, "rule_id": 2 }),
        );
        same(
            AuditEvent::Dns(DnsEvent::InstallFailed {
                identity: id.into(),
                name: name.into(),
                error: "ENOMEM".into(),
            }),
            "dns",
            json!({ "event": "install_failed", "identity": id, "name": name, "error": "ENOMEM" }),
        );
        same(
            AuditEvent::Loss(KernelLoss {
                records_lost: 5,
                total_lost: 9,
            }),
            "loss",
            json!({ "records_lost": 5, "total_lost": 9 }),
        );
    }

    #[test]
    fn records_cut_off_while_the_node_was_down_are_recorded_at_start() {
        let d = tempfile::tempdir().unwrap();
        let (p, at) = (d.path().join("audit.jsonl"), d.path().join("audit.anchor"));
        let j = Journal::open(Some(&p), 0, Some(&at), None).unwrap();
        for n in 1..=3 {
            j.record(&AuditEvent::Loss(KernelLoss {
                records_lost: 1,
                total_lost: n,
            }));
        }
        j.checkpoint(false);
        drop(j);
        let text = std::fs::read_to_string(&p).unwrap();
        let kept: Vec<&str> = text.lines().take(2).collect();
        std::fs::write(&p, kept.join("\n") + "\n").unwrap();
        drop(Journal::open(Some(&p), 0, Some(&at), None).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["kind"], "loss", "{last}");
        assert_eq!(last["audit_records_cut"], 1, "{last}");
        assert_eq!(last["anchored_seq"], 3, "{last}");
    }

    #[test]
    fn records_reach_log_and_outbox_with_their_place_in_the_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let j = Journal::open(Some(&p), 0, None, None).unwrap();
        j.record(&AuditEvent::Loss(KernelLoss {
            records_lost: 1,
            total_lost: 1,
        }));
        j.enable_outbox_from(None);
        j.record(&AuditEvent::Policy(PolicyEvent::Applied {
            revision: "r".into(),
            identities: 0,
        }));
        let out = j.take_outbox();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["kind"], "policy");
        assert_eq!(out[0]["seq"], 2);
        // The record as the log holds it: its hash checks out wherever it is sent.
        let text = std::fs::read_to_string(&p).unwrap();
        let logged: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(out[0], logged);
        let r = out[0].as_object().unwrap();
        assert_eq!(crate::audit::record_hash(r), r["hash"].as_str().unwrap());
        assert!(j.take_outbox().is_empty());
        assert_eq!(
            crate::audit::verify(&[p], &crate::audit::ChainStart::Genesis, None).unwrap(),
            2
        );
    }

    #[test]
    fn records_the_spool_had_not_taken_are_read_back_from_the_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        // Small files: the records asked for reach back into rotated ones.
        let j = Journal::open(Some(&p), 400, None, None).unwrap();
        for n in 1..=12 {
            j.record(&AuditEvent::Loss(KernelLoss {
                records_lost: 1,
                total_lost: n,
            }));
        }
        assert!(crate::audit::rotated(&p).len() >= 3);
        j.enable_outbox_from(Some(4));
        j.record(&AuditEvent::Policy(PolicyEvent::Applied {
            revision: "r".into(),
            identities: 0,
        }));
        let seqs: Vec<u64> = j
            .take_outbox()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (5..=13).collect::<Vec<_>>());
    }
}
