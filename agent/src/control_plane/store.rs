//! The control plane's storage, behind one interface ([`Store`]) so another database can
//! follow; [`SqliteStore`] is the embedded default (one file, WAL).

use std::{borrow::Cow, path::Path, sync::Mutex};

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{
    Bundle, BundleFile, FlowPage, FlowQuery, Ingested, NodeInfo, PollRequest, Reported, Revocation,
    StoredFlow,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} has schema version {found}; this agentwall knows up to {known}")]
    TooNew {
        path: std::path::PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
}

/// A node's poll, noted at `at`.
#[derive(Clone, Debug)]
pub struct NodeSeen {
    pub node: String,
    pub at: String,
    pub poll: PollRequest,
}

/// Everything the server keeps.
pub trait Store: Send + Sync {
    /// Stores a validated bundle as the next version.
    fn push_policy(
        &self,
        revision: &str,
        files: &[BundleFile],
        by: &str,
    ) -> Result<Bundle, StoreError>;
    /// A bundle by version, or the newest one.
    fn policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError>;
    /// Notes nodes' polls: last seen, applied revision, version, error.
    fn nodes_seen(&self, seen: &[NodeSeen]) -> Result<(), StoreError>;
    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;
    /// Stores reported records; ones already stored (same node, epoch, rid) are skipped.
    fn ingest(&self, node: &str, epoch: u64, records: &[Reported]) -> Result<Ingested, StoreError>;
    fn flows(&self, q: &FlowQuery) -> Result<FlowPage, StoreError>;
    /// Revokes an identity fleet-wide; returns the new revocation generation (unchanged when
    /// it was already revoked).
    fn revoke(&self, identity: &str, by: &str) -> Result<u64, StoreError>;
    /// The revocation generation and every revocation.
    fn revocations(&self) -> Result<(u64, Vec<Revocation>), StoreError>;
    /// Walks what is held of `node`'s audit chain: each chained record (stored id, text) in
    /// ascending seq, then each of its loss records. False when nothing of the node is held.
    fn audit_chain(
        &self,
        node: &str,
        check: &mut super::chain::ChainCheck,
    ) -> Result<bool, StoreError>;
}

/// Versioned schema: migration `i` takes a database from version `i` to `i + 1`
/// (`PRAGMA user_version`). Never edit one that has shipped; add the next.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE policy (
        version INTEGER PRIMARY KEY,
        revision TEXT NOT NULL,
        pushed_at TEXT NOT NULL,
        pushed_by TEXT NOT NULL,
        files TEXT NOT NULL
    );
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        applied_version INTEGER,
        applied_revision TEXT,
        agent_version TEXT,
        error TEXT
    );
    CREATE TABLE flows (
        id INTEGER PRIMARY KEY,
        node TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        rid INTEGER NOT NULL,
        kind TEXT NOT NULL,
        time TEXT NOT NULL,
        verdict TEXT,
        identity TEXT,
        dest TEXT,
        service TEXT,
        record TEXT NOT NULL,
        UNIQUE (node, epoch, rid)
    );
    CREATE INDEX flows_time ON flows (time);
    CREATE TABLE revocations (
        generation INTEGER PRIMARY KEY,
        identity TEXT NOT NULL UNIQUE,
        at TEXT NOT NULL,
        by TEXT NOT NULL
    );",
    // Records carry their place in the node's audit chain: the control plane checks the
    // chain of what it holds, and a record sent twice (read back from the log after a crash)
    // is stored once.
    "ALTER TABLE flows ADD COLUMN audit_seq INTEGER;
    ALTER TABLE flows ADD COLUMN audit_hash TEXT;
    CREATE UNIQUE INDEX flows_audit_hash ON flows (node, audit_hash) WHERE audit_hash IS NOT NULL;
    CREATE INDEX flows_audit_seq ON flows (node, audit_seq) WHERE audit_seq IS NOT NULL;",
];

pub struct SqliteStore {
    /// Writes go through one connection (SQLite has one writer); reads use their own, which
    /// WAL lets run beside a write.
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// For reads that take long (a node's whole audit chain): their own connection, so the
    /// other reads do not wait behind them.
    path: std::path::PathBuf,
}

/// A connection's lock; one a panic left poisoned is still usable (SQLite rolled back
/// whatever the panicking call had open), so one bad request cannot take every later one
/// down with it.
fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> String {
    crate::clock::now_rfc3339()
}

/// The fields a record is indexed by. Text is borrowed where it can be and copied where the
/// JSON escaped it (a quote or a non-ASCII letter in a name).
#[derive(serde::Deserialize)]
struct Indexed<'a> {
    #[serde(default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    verdict: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    identity: Option<Cow<'a, str>>,
    /// Kept as text: a record whose `dest` is not an address is stored without one.
    #[serde(default, borrow)]
    dest: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    service: Option<Cow<'a, str>>,
    /// The record's place in the node's audit chain, when it came from the log.
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    prev: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    hash: Option<Cow<'a, str>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let writer = Connection::open(path).map_err(open_err)?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // A node drops records from its spool once they are acknowledged, so an
        // acknowledged batch must survive a power cut: FULL syncs the WAL at each commit
        // (one per batch, not per record).
        writer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        writer.busy_timeout(std::time::Duration::from_secs(5))?;
        let found: i64 = writer.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = writer.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        let reader = Connection::open(path).map_err(open_err)?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            writer: Mutex::new(writer),
            path: path.to_owned(),
            reader: Mutex::new(reader),
        })
    }

    fn bundle_row(
        r: &rusqlite::Row<'_>,
    ) -> rusqlite::Result<(u64, String, String, String, String)> {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
        ))
    }
}

impl Store for SqliteStore {
    fn push_policy(
        &self,
        revision: &str,
        files: &[BundleFile],
        by: &str,
    ) -> Result<Bundle, StoreError> {
        let text = serde_json::to_string(files).expect("files serialize");
        let at = now();
        let db = lock(&self.writer);
        db.execute(
            "INSERT INTO policy (revision, pushed_at, pushed_by, files) VALUES (?1, ?2, ?3, ?4)",
            params![revision, at, by, text],
        )?;
        Ok(Bundle {
            version: db.last_insert_rowid() as u64,
            revision: revision.to_owned(),
            pushed_at: at,
            pushed_by: by.to_owned(),
            files: files.to_vec(),
        })
    }

    fn policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError> {
        let db = lock(&self.reader);
        let row = match version {
            Some(v) => db
                .query_row(
                    "SELECT version, revision, pushed_at, pushed_by, files FROM policy WHERE version = ?1",
                    [v as i64],
                    Self::bundle_row,
                )
                .optional()?,
            None => db
                .query_row(
                    "SELECT version, revision, pushed_at, pushed_by, files FROM policy ORDER BY version DESC LIMIT 1",
                    [],
                    Self::bundle_row,
                )
                .optional()?,
        };
        row.map(|(version, revision, pushed_at, pushed_by, files)| {
            Ok(Bundle {
                version,
                revision,
                pushed_at,
                pushed_by,
                files: serde_json::from_str(&files)
                    .map_err(|e| StoreError::Corrupt(format!("policy version {version}: {e}")))?,
            })
        })
        .transpose()
    }

    fn nodes_seen(&self, seen: &[NodeSeen]) -> Result<(), StoreError> {
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO nodes (node, first_seen, last_seen, applied_version, applied_revision, agent_version, error)
                 VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (node) DO UPDATE SET last_seen = ?2, applied_version = ?3,
                     applied_revision = ?4, agent_version = ?5, error = ?6",
            )?;
            for s in seen {
                st.execute(params![
                    s.node,
                    s.at,
                    s.poll.applied_version.map(|v| v as i64),
                    s.poll.applied_revision,
                    s.poll.agent_version,
                    s.poll.error
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let db = lock(&self.reader);
        let mut st = db.prepare(
            "SELECT node, first_seen, last_seen, applied_version, applied_revision, agent_version, error
             FROM nodes ORDER BY node",
        )?;
        let rows = st.query_map([], |r| {
            Ok(NodeInfo {
                node: r.get(0)?,
                first_seen: r.get(1)?,
                last_seen: r.get(2)?,
                applied_version: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                applied_revision: r.get(4)?,
                agent_version: r.get(5)?,
                error: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn ingest(&self, node: &str, epoch: u64, records: &[Reported]) -> Result<Ingested, StoreError> {
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        let mut out = Ingested::default();
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO flows (node, epoch, rid, kind, time, verdict, identity, dest, service, record, audit_seq, audit_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for r in records {
                let text = r.record.get();
                let ix: Indexed<'_> = serde_json::from_str(text).map_err(|e| {
                    StoreError::Corrupt(format!("record {} of epoch {epoch}: {e}", r.rid))
                })?;
                let chained = match (ix.seq, &ix.prev, ix.hash.as_deref()) {
                    (Some(seq), Some(_), Some(hash)) => Some((seq.min(i64::MAX as u64), hash)),
                    _ => None,
                };
                // Kept by its hash only when the hash is its own: a record carrying another
                // one's hash (sent first) must not shut the real one out as a duplicate. It is
                // still in the chain by its seq, where the check names it.
                let own_hash = chained.is_some_and(|(_, hash)| {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                        .is_ok_and(|m| crate::audit::record_hash(&m) == hash)
                });
                // Stored as the address's canonical text, as the flows filter asks for it.
                let dest = ix
                    .dest
                    .as_deref()
                    .and_then(|d| d.parse::<std::net::IpAddr>().ok());
                let n = st.execute(params![
                    node,
                    epoch as i64,
                    r.rid as i64,
                    ix.kind.as_deref().unwrap_or("decision"),
                    ix.time.as_deref().unwrap_or_default(),
                    ix.verdict.as_deref(),
                    ix.identity.as_deref(),
                    dest.map(|d| d.to_string()),
                    ix.service.as_deref(),
                    text,
                    chained.map(|(seq, _)| seq as i64),
                    chained.filter(|_| own_hash).map(|(_, hash)| hash),
                ])?;
                if n == 1 {
                    out.accepted += 1;
                } else {
                    out.duplicates += 1;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn flows(&self, q: &FlowQuery) -> Result<FlowPage, StoreError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let mut sql = String::from("SELECT id, node, record FROM flows WHERE kind = ?1");
        let mut args: Vec<rusqlite::types::Value> =
            vec![q.kind.clone().unwrap_or_else(|| "decision".into()).into()];
        let mut filter = |col: &str, op: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&format!(" AND {col} {op} ?{}", args.len()));
        };
        for (col, v) in [
            ("node", &q.node),
            ("identity", &q.identity),
            ("verdict", &q.verdict),
            ("dest", &q.dest),
            ("service", &q.service),
        ] {
            if let Some(v) = v {
                filter(col, "=", v.clone().into());
            }
        }
        if q.tagged {
            filter("service", "IS NOT", rusqlite::types::Value::Null);
        }
        if let Some(s) = &q.since {
            filter("time", ">=", s.clone().into());
        }
        if let Some(u) = &q.until {
            filter("time", "<", u.clone().into());
        }
        if let Some(a) = q.after {
            filter("id", ">", (a as i64).into());
        }
        sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
        let db = lock(&self.reader);
        let mut st = db.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut flows = Vec::new();
        for row in rows {
            let (id, node, text) = row?;
            let record = serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("flow {id}: {e}")))?;
            flows.push(StoredFlow { id, node, record });
        }
        let next = (flows.len() == limit as usize)
            .then(|| flows.last().map(|f| f.id))
            .flatten();
        Ok(FlowPage { flows, next })
    }

    fn revoke(&self, identity: &str, by: &str) -> Result<u64, StoreError> {
        let db = lock(&self.writer);
        db.execute(
            "INSERT OR IGNORE INTO revocations (identity, at, by) VALUES (?1, ?2, ?3)",
            params![identity, now(), by],
        )?;
        Ok(db.query_row(
            "SELECT COALESCE(MAX(generation), 0) FROM revocations",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    fn audit_chain(
        &self,
        node: &str,
        check: &mut super::chain::ChainCheck,
    ) -> Result<bool, StoreError> {
        let db = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let known: bool = db.query_row(
            "SELECT EXISTS (SELECT 1 FROM nodes WHERE node = ?1) OR EXISTS (SELECT 1 FROM flows WHERE node = ?1)",
            params![node],
            |r| r.get(0),
        )?;
        if !known {
            return Ok(false);
        }
        // Loss records first: the spans of seqs they name explain the gaps.
        let mut st = db.prepare("SELECT record FROM flows WHERE node = ?1 AND kind = 'loss'")?;
        let mut rows = st.query(params![node])?;
        while let Some(row) = rows.next()? {
            let text: String = row.get(0)?;
            check.loss(&text);
        }
        let mut st = db.prepare(
            "SELECT id, record FROM flows WHERE node = ?1 AND audit_seq IS NOT NULL
             ORDER BY audit_seq, id",
        )?;
        let mut rows = st.query(params![node])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let text: String = row.get(1)?;
            check.record(id as u64, &text);
        }
        // Records outside the chain (loss records of the spool and the outbox are, by
        // design): the ones a chain's own loss records do not account for are suspect.
        let unchained: i64 = db.query_row(
            // Since the first chained record: what an earlier version sent is not suspect.
            "SELECT COUNT(*) FROM flows WHERE node = ?1 AND audit_seq IS NULL AND kind != 'loss'
             AND id > (SELECT MIN(id) FROM flows WHERE node = ?1 AND audit_seq IS NOT NULL)",
            params![node],
            |r| r.get(0),
        )?;
        check.unchained(unchained as u64);
        Ok(true)
    }

    fn revocations(&self) -> Result<(u64, Vec<Revocation>), StoreError> {
        let db = lock(&self.reader);
        let mut st =
            db.prepare("SELECT identity, generation, at, by FROM revocations ORDER BY generation")?;
        let all: Vec<Revocation> = st
            .query_map([], |r| {
                Ok(Revocation {
                    identity: r.get(0)?,
                    generation: r.get::<_, i64>(1)? as u64,
                    at: r.get(2)?,
                    by: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok((all.last().map_or(0, |r| r.generation), all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` as a node sends it, under id `rid`.
    fn sent(rid: u64, text: &str) -> Reported {
        Reported {
            rid,
            record: serde_json::value::RawValue::from_string(text.to_owned()).unwrap(),
        }
    }

    fn rec(rid: u64, verdict: &str, time: &str) -> Reported {
        let text = format!(
            r#"{{"kind":"decision","time":"{time}","verdict":"{verdict}","identity":"spiffe://example.org/a","dest":"203.0.113.7","port":443}}"#
        );
        Reported {
            rid,
            record: serde_json::value::RawValue::from_string(text).unwrap(),
        }
    }

    #[test]
    fn duplicates_are_stored_once_and_pages_continue() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("cp.db")).unwrap();
        let batch: Vec<Reported> = (1..=5)
            .map(|i| rec(i, "deny", &format!("2026-11-23T00:00:0{i}.000Z")))
            .collect();
        assert_eq!(
            s.ingest("n1", 7, &batch).unwrap(),
            Ingested {
                accepted: 5,
                duplicates: 0
            }
        );
        assert_eq!(
            s.ingest("n1", 7, &batch[2..]).unwrap(),
            Ingested {
                accepted: 0,
                duplicates: 3
            }
        );
        // Another epoch (a node whose spool was recreated) or another node is new.
        assert_eq!(s.ingest("n1", 8, &batch[..1]).unwrap().accepted, 1);
        assert_eq!(s.ingest("n2", 7, &batch[..1]).unwrap().accepted, 1);
        let p1 = s
            .flows(&FlowQuery {
                node: Some("n1".into()),
                limit: Some(4),
                ..FlowQuery::default()
            })
            .unwrap();
        assert_eq!(p1.flows.len(), 4);
        let p2 = s
            .flows(&FlowQuery {
                node: Some("n1".into()),
                limit: Some(4),
                after: p1.next,
                ..FlowQuery::default()
            })
            .unwrap();
        assert_eq!(p2.flows.len(), 2);
        assert_eq!(p2.next, None);
        let timed = s
            .flows(&FlowQuery {
                since: Some("2026-11-23T00:00:02.000Z".into()),
                until: Some("2026-11-23T00:00:04.000Z".into()),
                node: Some("n1".into()),
                ..FlowQuery::default()
            })
            .unwrap();
        assert_eq!(timed.flows.len(), 2, "{timed:?}");
    }

    #[test]
    fn escaped_text_and_a_dest_that_is_no_address_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("cp.db")).unwrap();
        let text = r#"{"kind":"decision","time":"2026-11-23T00:00:01.000Z","verdict":"deny","identity":"spiffe://example.org/caf\u00e9 \"q\"","dest":"not-an-address","service":"Open\nAI"}"#;
        let r = Reported {
            rid: 1,
            record: serde_json::value::RawValue::from_string(text.to_owned()).unwrap(),
        };
        assert_eq!(s.ingest("n1", 1, &[r]).unwrap().accepted, 1);
        let page = s
            .flows(&FlowQuery {
                identity: Some("spiffe://example.org/café \"q\"".into()),
                ..FlowQuery::default()
            })
            .unwrap();
        assert_eq!(page.flows.len(), 1, "{page:?}");
    }

    #[test]
    fn a_chained_record_sent_again_under_a_new_id_is_stored_once_and_its_chain_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("cp.db")).unwrap();
        let logged = crate::control_plane::chain::logged(3, 0);
        let as_sent = sent;
        let first: Vec<Reported> = (0..2)
            .map(|i| as_sent(i + 1, &logged[i as usize]))
            .collect();
        assert_eq!(s.ingest("n1", 7, &first).unwrap().accepted, 2);
        // After a crash the node read seq 2 back from its log and spooled it again, under a
        // new id: stored once. Seq 3 is new.
        let again = vec![as_sent(3, &logged[1]), as_sent(4, &logged[2])];
        assert_eq!(
            s.ingest("n1", 7, &again).unwrap(),
            Ingested {
                accepted: 1,
                duplicates: 1
            }
        );
        let mut check = crate::control_plane::chain::ChainCheck::new("n1");
        assert!(s.audit_chain("n1", &mut check).unwrap());
        let r = check.finish();
        assert!(r.intact && r.records == 3, "{r:?}");
        let mut nobody = crate::control_plane::chain::ChainCheck::new("n9");
        assert!(!s.audit_chain("n9", &mut nobody).unwrap());
    }

    /// What a holder of a node's certificate might send to muddy its chain, each found.
    #[test]
    fn a_node_cannot_talk_its_chain_into_looking_whole() {
        use crate::control_plane::chain::ChainCheck;
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("cp.db")).unwrap();
        let logged = crate::control_plane::chain::logged(3, 0);
        let check = |node: &str| {
            let mut c = ChainCheck::new(node);
            assert!(s.audit_chain(node, &mut c).unwrap());
            c.finish()
        };
        // Seq 3's hash on a forged record, sent before the real seq 3: the real one is still
        // stored, and the forgery is named.
        let mut forged: serde_json::Value = serde_json::from_str(&logged[2]).unwrap();
        forged["port"] = 99.into();
        let batch = vec![
            sent(1, &logged[0]),
            sent(2, &logged[1]),
            sent(3, &forged.to_string()),
            sent(4, &logged[2]),
        ];
        assert_eq!(s.ingest("a", 1, &batch).unwrap().accepted, 4);
        let r = check("a");
        assert!(!r.intact && r.breaks_total >= 1, "{r:?}");
        // Loss counts that overflow are summed without a panic, and the store still reads.
        let huge = r#"{"kind":"loss","spool_records_lost":18446744073709551615}"#;
        let one = r#"{"kind":"loss","spool_records_lost":1}"#;
        assert_eq!(
            s.ingest("b", 1, &[sent(1, huge), sent(2, one), sent(3, &logged[0])])
                .unwrap()
                .accepted,
            3
        );
        assert_eq!(check("b").reported_lost["spool_records_lost"], u64::MAX);
        assert!(s.nodes().is_ok());
        // Records sent outside the chain by a node that keeps one, no write failure of its
        // log speaking for them.
        let stray =
            r#"{"kind":"decision","verdict":"deny","identity":"spiffe://example.org/other"}"#;
        assert_eq!(
            s.ingest("c", 1, &[sent(1, &logged[0]), sent(2, stray)])
                .unwrap()
                .accepted,
            2
        );
        let r = check("c");
        assert_eq!((r.unchained, r.intact), (1, false), "{r:?}");
        // ... nor with a loss record of its own making that claims log write failures: only
        // a record of the chain speaks for them.
        let fake = r#"{"kind":"loss","hash":"","audit_records_lost":1000}"#;
        assert_eq!(s.ingest("c", 1, &[sent(3, fake)]).unwrap().accepted, 1);
        let r = check("c");
        assert_eq!(
            (r.unchained, r.audit_write_failures, r.intact),
            (1, 0, false),
            "{r:?}"
        );
    }

    #[test]
    fn reopening_keeps_everything_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            let files = vec![BundleFile {
                name: "a.yaml".into(),
                text: "x".into(),
            }];
            assert_eq!(s.push_policy("r1", &files, "admin").unwrap().version, 1);
            assert_eq!(s.push_policy("r2", &files, "admin").unwrap().version, 2);
            assert_eq!(s.revoke("spiffe://example.org/a", "admin").unwrap(), 1);
            assert_eq!(s.revoke("spiffe://example.org/a", "admin").unwrap(), 1);
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.policy(None).unwrap().unwrap().revision, "r2");
        assert_eq!(s.policy(Some(1)).unwrap().unwrap().revision, "r1");
        assert_eq!(s.revocations().unwrap().0, 1);
        drop(s);
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = SqliteStore::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("has schema version 99; this agentwall knows up to 2"),
            "{e}"
        );
    }
}
