//! The control plane's check of a node's audit chain: the records it was sent carry their
//! place in the node's hash-chained log (seq, prev, hash), so it finds, from its own copies,
//! records changed on the way or in the database, seqs missing between the ones it holds,
//! and a log that was started again or rewritten. What the node itself reported lost is
//! summed beside the gaps, so a reader can tell a counted loss from an unexplained one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Gaps and breaks listed one by one, at most; the rest are counted.
pub const LISTED: usize = 100;

/// The newest record held: the chain's head as the node last sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
    pub time: Option<String>,
}

/// Seqs missing between two records held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChainGap {
    /// The record before the gap.
    pub after_seq: u64,
    /// The record after it.
    pub before_seq: u64,
    pub missing: u64,
}

/// A record that does not check out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChainBreak {
    pub seq: u64,
    /// The stored flow's id (`GET /v1/flows`).
    pub id: u64,
    pub problem: String,
}

/// `GET /v1/audit/chain`: what the control plane holds of a node's audit chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChainReport {
    pub node: String,
    /// Records of the chain held.
    pub records: u64,
    /// The oldest held (records before it were written before the node had a control plane,
    /// or are gone from the database).
    pub first_seq: Option<u64>,
    pub head: Option<ChainHead>,
    /// The first [`LISTED`] gaps.
    pub gaps: Vec<ChainGap>,
    /// Seqs missing in all gaps.
    pub missing: u64,
    /// The first [`LISTED`] breaks.
    pub breaks: Vec<ChainBreak>,
    pub breaks_total: u64,
    /// Records the node reported it could not send, by where they were lost
    /// (`spool_records_lost`, `outbox_records_lost`), summed from its loss records.
    pub reported_lost: BTreeMap<String, u64>,
    /// Missing seqs outside every span of seqs the node reported lost.
    pub unexplained: u64,
    /// The node's records held outside the chain (besides its spool's and outbox's loss
    /// records), and how many of them its log said it could not write (the only ones that
    /// belong there).
    pub unchained: u64,
    pub audit_write_failures: u64,
    /// No break, and no gap beyond the losses the node reported.
    pub intact: bool,
}

/// Loss counts that stand for records the control plane never got.
const SENT_LOSSES: &[&str] = &["spool_records_lost", "outbox_records_lost"];

/// Where the seqs a loss record stands for are named: `[first, last]`.
const LOST_SPANS: &[&str] = &["spool_seqs_lost", "outbox_seqs_lost"];

/// A `[first, last]` span of audit seqs, as loss records carry it.
pub fn seq_span(v: &Value) -> Option<(u64, u64)> {
    let [a, b] = v.as_array()?.as_slice() else {
        return None;
    };
    let (a, b) = (a.as_u64()?, b.as_u64()?);
    (a <= b).then_some((a, b))
}

/// Walks a node's chain in seq order, one record at a time (its loss records first: a gap
/// is a reported loss only inside a span of seqs one of them names).
pub struct ChainCheck {
    report: ChainReport,
    last: Option<(u64, String)>,
    /// Spans of seqs reported lost, merged and sorted once the walk starts.
    spans: Vec<(u64, u64)>,
    merged: bool,
}

impl ChainCheck {
    pub fn new(node: &str) -> Self {
        Self {
            report: ChainReport {
                node: node.to_owned(),
                ..ChainReport::default()
            },
            last: None,
            spans: Vec::new(),
            merged: false,
        }
    }

    /// Whether seqs `a..=b` lie inside one reported span.
    fn covered(&mut self, a: u64, b: u64) -> bool {
        if !self.merged {
            self.spans.sort_unstable();
            let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.spans.len());
            for &(x, y) in &self.spans {
                match out.last_mut() {
                    Some(last) if x <= last.1.saturating_add(1) => last.1 = last.1.max(y),
                    _ => out.push((x, y)),
                }
            }
            self.spans = out;
            self.merged = true;
        }
        let i = self.spans.partition_point(|&(x, _)| x <= a);
        i > 0 && self.spans[i - 1].1 >= b
    }

    fn broken(&mut self, seq: u64, id: u64, problem: String) {
        self.report.breaks_total += 1;
        if self.report.breaks.len() < LISTED {
            self.report.breaks.push(ChainBreak { seq, id, problem });
        }
    }

    /// The next record (stored flow `id`, its text), in ascending seq.
    pub fn record(&mut self, id: u64, text: &str) {
        let Ok(Value::Object(r)) = serde_json::from_str::<Value>(text) else {
            self.broken(0, id, "not a JSON object".into());
            return;
        };
        let seq = r.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let hash = r
            .get("hash")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let prev = r.get("prev").and_then(Value::as_str).unwrap_or("");
        self.report.records += 1;
        if crate::audit::record_hash(&r) != hash {
            self.broken(
                seq,
                id,
                "its hash does not match its contents (changed after the node wrote it)".into(),
            );
        }
        match &self.last {
            None => {
                self.report.first_seq = Some(seq);
                if seq == 1 && prev != crate::audit::GENESIS {
                    self.broken(seq, id, "seq 1 does not start from the genesis".into());
                }
            }
            // The store hands records over in ascending seq; anyone else gets a break, not a
            // wrapped subtraction.
            Some((l, _)) if seq < *l => {
                let l = *l;
                self.broken(seq, id, format!("comes after seq {l}: out of order"));
            }
            Some((l, _)) if *l == seq => self.broken(
                seq,
                id,
                format!(
                    "seq {seq} is held twice with different contents: the node's log was started again or rewritten"
                ),
            ),
            Some((l, lhash)) if *l + 1 == seq => {
                if prev != lhash {
                    self.broken(
                        seq,
                        id,
                        format!(
                            "does not follow seq {l}: its prev is not that record's hash (records changed or forged)"
                        ),
                    );
                }
            }
            Some((l, _)) => {
                let l = *l;
                let missing = seq - l - 1;
                self.report.missing = self.report.missing.saturating_add(missing);
                if !self.covered(l + 1, seq - 1) {
                    self.report.unexplained = self.report.unexplained.saturating_add(missing);
                }
                if self.report.gaps.len() < LISTED {
                    self.report.gaps.push(ChainGap {
                        after_seq: l,
                        before_seq: seq,
                        missing,
                    });
                }
            }
        }
        self.report.head = Some(ChainHead {
            seq,
            hash: hash.clone(),
            time: r.get("time").and_then(Value::as_str).map(str::to_owned),
        });
        self.last = Some((seq, hash));
    }

    /// A loss record of the node (chained or not).
    pub fn loss(&mut self, text: &str) {
        let Ok(r) = serde_json::from_str::<Map<String, Value>>(text) else {
            return;
        };
        for key in LOST_SPANS {
            if let Some(span) = r.get(*key).and_then(seq_span) {
                self.spans.push(span);
                self.merged = false;
            }
        }
        // Node-supplied counts: added without overflow.
        for key in SENT_LOSSES {
            if let Some(n) = r.get(*key).and_then(Value::as_u64) {
                let sum = self
                    .report
                    .reported_lost
                    .entry((*key).to_owned())
                    .or_default();
                *sum = sum.saturating_add(n);
            }
        }
        // Records the log could not take went out unchained; only a loss record of the chain
        // (the log's own: seq, prev and its own hash) speaks for them.
        let chained = r.get("seq").and_then(Value::as_u64).is_some()
            && r.get("prev").and_then(Value::as_str).is_some()
            && r.get("hash").and_then(Value::as_str)
                == Some(crate::audit::record_hash(&r).as_str());
        if chained && let Some(n) = r.get("audit_records_lost").and_then(Value::as_u64) {
            self.report.audit_write_failures = self.report.audit_write_failures.saturating_add(n);
        }
    }

    /// Records of the node held outside the chain, loss records aside.
    pub fn unchained(&mut self, n: u64) {
        self.report.unchained = n;
    }

    pub fn finish(mut self) -> ChainReport {
        // A node that keeps a chain sends everything through it but what its log failed to
        // write.
        let stray =
            self.report.records > 0 && self.report.unchained > self.report.audit_write_failures;
        self.report.intact =
            self.report.breaks_total == 0 && self.report.unexplained == 0 && !stray;
        self.report
    }
}

/// A chain of `n` records as a node's log writes them (ports from `base` on).
#[cfg(test)]
pub(crate) fn logged(n: usize, base: usize) -> Vec<String> {
    let d = tempfile::tempdir().unwrap();
    let mut log = crate::audit::AuditLog::open(&d.path().join("a.jsonl"), 0).unwrap();
    (0..n)
        .map(|i| {
            let (_, r) = log
                .append_record("decision", serde_json::json!({ "port": base + i }))
                .unwrap();
            Value::Object(r).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(records: &[String], losses: &[&str]) -> ChainReport {
        let mut c = ChainCheck::new("n");
        for l in losses {
            c.loss(l);
        }
        for (i, r) in records.iter().enumerate() {
            c.record(i as u64 + 1, r);
        }
        c.finish()
    }

    #[test]
    fn a_whole_chain_is_intact_and_its_head_is_the_last_record() {
        let r = check(&super::logged(5, 0), &[]);
        assert!(r.intact, "{r:?}");
        assert_eq!(
            (r.records, r.first_seq, r.head.unwrap().seq),
            (5, Some(1), 5)
        );
    }

    #[test]
    fn gaps_breaks_and_restarts_are_found() {
        let c = super::logged(6, 0);
        // Seqs 3 and 4 never arrived.
        let gap = [&c[..2], &c[4..]].concat();
        let r = check(&gap, &[]);
        assert_eq!((r.missing, r.unexplained, r.intact), (2, 2, false));
        assert_eq!(r.gaps[0].after_seq, 2);
        // ... and the node said its spool dropped those two.
        let r = check(
            &gap,
            &[r#"{"kind":"loss","spool_records_lost":2,"spool_seqs_lost":[3,4]}"#],
        );
        assert!(r.intact, "{r:?}");
        // A count alone, or seqs elsewhere, explain nothing: a node cannot cover a gap with
        // a number.
        for claim in [
            r#"{"kind":"loss","spool_records_lost":1000}"#,
            r#"{"kind":"loss","spool_records_lost":2,"spool_seqs_lost":[4,9]}"#,
            r#"{"kind":"loss","outbox_records_lost":2,"outbox_seqs_lost":[9,3]}"#,
        ] {
            let r = check(&gap, &[claim]);
            assert_eq!((r.unexplained, r.intact), (2, false), "{claim}: {r:?}");
        }
        // Two adjacent spans from the spool and the outbox together cover it.
        let r = check(
            &gap,
            &[
                r#"{"kind":"loss","spool_records_lost":1,"spool_seqs_lost":[3,3]}"#,
                r#"{"kind":"loss","outbox_records_lost":1,"outbox_seqs_lost":[4,4]}"#,
            ],
        );
        assert!(r.intact, "{r:?}");
        // A record changed.
        let mut changed = c.clone();
        changed[3] = changed[3].replace("\"port\":3", "\"port\":4");
        let r = check(&changed, &[]);
        assert_eq!(r.breaks[0].seq, 4);
        assert!(r.breaks[0].problem.contains("hash does not match"), "{r:?}");
        // A record forged whole, hash and all, in place of seq 4: the next one does not follow.
        let mut forged: Map<String, Value> = serde_json::from_str(&c[3]).unwrap();
        forged.insert("port".into(), 99.into());
        forged.insert("prev".into(), crate::audit::GENESIS.into());
        let h = crate::audit::record_hash(&forged);
        forged.insert("hash".into(), h.into());
        let mut f = c.clone();
        f[3] = Value::Object(forged).to_string();
        let r = check(&f, &[]);
        assert_eq!(r.breaks_total, 2, "{r:?}");
        // A log started again: seq 1 twice.
        let again = super::logged(2, 100);
        let mut both = vec![c[0].clone(), again[0].clone()];
        both.extend(c[1..].iter().cloned());
        let r = check(&both, &[]);
        assert!(r.breaks[0].problem.contains("held twice"), "{r:?}");
    }
}
