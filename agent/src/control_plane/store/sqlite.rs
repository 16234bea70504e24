//! [`SqliteStore`]: the embedded default, one file (WAL) written by one process.

use std::{path::Path, sync::Mutex};

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{
    Arg, BundleRow, ConsoleLink, ConsoleSession, Issuance, JoinToken, NodeSeen, ProposalRow, Row,
    Store, StoreError, add_approval, bundle_of, now, number, proposal_of, published, signing_text,
};
use crate::control_plane::{
    Bundle, BundleFile, BundleInfo, FlowPage, FlowQuery, Ingested, NodeInfo, Proposal, Reported,
    Revocation,
    signing::{BundleSignature, Signing},
};

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
    // The day each record is filed under, which retention goes by (see `file_day`), and an
    // index for each filter of the flows query, in id order (its paging).
    "ALTER TABLE flows ADD COLUMN day TEXT;
    UPDATE flows SET day = CASE
        WHEN substr(time, 1, 10) GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]' THEN substr(time, 1, 10)
        ELSE date('now') END;
    CREATE INDEX flows_day ON flows (day);
    CREATE INDEX flows_node_id ON flows (node, id);
    CREATE INDEX flows_identity_id ON flows (identity, id);
    CREATE INDEX flows_dest_id ON flows (dest, id);
    CREATE INDEX flows_service_id ON flows (service, id);
    CREATE INDEX flows_tagged ON flows (id) WHERE service IS NOT NULL;",
    // Bytes of records held per node and day: what `retention_max_bytes` counts, and whose
    // records go first past it (the largest holder's).
    "CREATE TABLE record_bytes (
        node TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (node, day)
    );
    INSERT INTO record_bytes (node, day, bytes)
        SELECT node, day, SUM(length(CAST(record AS BLOB)) + 512) FROM flows GROUP BY node, day;",
    // The database's lineage, written once (see `Store::lineage`) and kept by its copies.
    "CREATE TABLE lineage (one INTEGER PRIMARY KEY CHECK (one = 1), id TEXT NOT NULL);",
    // Who answers for each node's host, and its labels (JSON), as the node last said.
    "ALTER TABLE nodes ADD COLUMN owner TEXT;
    ALTER TABLE nodes ADD COLUMN labels TEXT;",
    // Why an identity was revoked, as the admin said; the console's sign-ins (the cookie's
    // SHA-256, never the cookie).
    "ALTER TABLE revocations ADD COLUMN reason TEXT;
    CREATE TABLE console_sessions (
        id_sha256 TEXT PRIMARY KEY,
        credential TEXT NOT NULL,
        chain TEXT,
        csrf TEXT NOT NULL,
        created TEXT NOT NULL,
        expires TEXT NOT NULL
    );
    CREATE INDEX console_sessions_expires ON console_sessions (expires);
    ALTER TABLE nodes ADD COLUMN spool_records INTEGER;
    ALTER TABLE nodes ADD COLUMN records_lost INTEGER;
    ALTER TABLE nodes ADD COLUMN sessions TEXT;
    CREATE TABLE console_links (
        code_sha256 TEXT PRIMARY KEY,
        credential TEXT NOT NULL,
        chain TEXT,
        expires TEXT NOT NULL
    );",
    // Forwarding to a SIEM: how far it got, and which replica holds it until when; what
    // alerts have seen of each identity (its baseline).
    "CREATE TABLE forwarding (
        name TEXT PRIMARY KEY,
        after INTEGER NOT NULL,
        holder TEXT NOT NULL,
        lease_until TEXT NOT NULL
    );
    CREATE TABLE alert_seen (
        subject TEXT NOT NULL,
        what TEXT NOT NULL,
        first TEXT NOT NULL,
        PRIMARY KEY (subject, what)
    );
    ALTER TABLE flows ADD COLUMN owner TEXT;
    CREATE INDEX flows_owner_id ON flows (owner, id);",
    // Signed bundles: a bundle's validity and signatures, and pushes awaiting approvals.
    "ALTER TABLE policy ADD COLUMN signing TEXT;
    CREATE TABLE proposals (
        id INTEGER PRIMARY KEY,
        revision TEXT NOT NULL,
        pushed_at TEXT NOT NULL,
        pushed_by TEXT NOT NULL,
        files TEXT NOT NULL,
        signing TEXT NOT NULL,
        version INTEGER
    );",
    // Alerts' baseline is kept as long as records are: each entry's last day seen.
    "ALTER TABLE alert_seen ADD COLUMN last TEXT;
    UPDATE alert_seen SET last = substr(first, 1, 10);
    CREATE INDEX alert_seen_last ON alert_seen (last);",
    // The issuer: join tokens (their SHA-256) and the certificates it signed.
    "CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        identity TEXT NOT NULL,
        expires TEXT NOT NULL,
        uses_left INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        created TEXT NOT NULL,
        cancelled INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE issuances (
        serial TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        node TEXT NOT NULL,
        kind TEXT NOT NULL,
        token TEXT,
        issued TEXT NOT NULL,
        not_after TEXT NOT NULL,
        renewed_into TEXT
    );
    CREATE INDEX issuances_issued ON issuances (issued);
    CREATE INDEX issuances_not_after ON issuances (not_after);",
];

/// Rows removed per transaction by retention: short enough that reports stored meanwhile
/// wait little for the one writer.
const RETAIN_BATCH: usize = 2_000;

pub struct SqliteStore {
    /// Writes go through one connection (SQLite has one writer); reads use their own, which
    /// WAL lets run beside a write.
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// For reads that take long (a node's whole audit chain): their own connection, so the
    /// other reads do not wait behind them.
    path: std::path::PathBuf,
    retention: super::Retention,
}

fn issuance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Issuance> {
    Ok(Issuance {
        serial: r.get(0)?,
        identity: r.get(1)?,
        node: r.get(2)?,
        kind: r.get(3)?,
        token: r.get(4)?,
        issued: r.get(5)?,
        not_after: r.get(6)?,
        renewed_into: r.get(7)?,
    })
}

/// A connection's lock; one a panic left poisoned is still usable (SQLite rolled back
/// whatever the panicking call had open), so one bad request cannot take every later one
/// down with it.
fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SqliteStore {
    pub fn open(path: &Path, retention: super::Retention) -> Result<Self, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            what: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        }
        let writer = Connection::open(path).map_err(|e| open_err(&e))?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| open_err(&e))?;
        // A node drops records from its spool once they are acknowledged, so an
        // acknowledged batch must survive a power cut: FULL syncs the WAL at each commit
        // (one per batch, not per record).
        writer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| open_err(&e))?;
        writer.busy_timeout(std::time::Duration::from_secs(5))?;
        let found: i64 = writer.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew {
                what: path.display().to_string(),
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
        let reader = Connection::open(path).map_err(|e| open_err(&e))?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self {
            writer: Mutex::new(writer),
            path: path.to_owned(),
            reader: Mutex::new(reader),
            retention,
        })
    }

    fn bundle_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BundleRow> {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    }

    fn proposal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProposalRow> {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        ))
    }

    /// Inserts the next bundle version in `tx`: numbered above the newest and `above`.
    fn insert_bundle(
        tx: &rusqlite::Transaction<'_>,
        revision: &str,
        files_text: &str,
        by: &str,
        at: &str,
        above: i64,
        signing: &Signing,
    ) -> Result<u64, StoreError> {
        tx.execute(
            "INSERT INTO policy (version, revision, pushed_at, pushed_by, files, signing)
             SELECT max(COALESCE(MAX(version), 0), ?5) + 1, ?1, ?2, ?3, ?4, ?6 FROM policy",
            params![revision, at, by, files_text, above, signing_text(signing)],
        )?;
        Ok(tx.last_insert_rowid() as u64)
    }
}

fn values(args: Vec<Arg>) -> impl Iterator<Item = rusqlite::types::Value> {
    args.into_iter().map(|a| match a {
        Arg::Text(t) => rusqlite::types::Value::Text(t),
        Arg::Int(i) => rusqlite::types::Value::Integer(i),
    })
}

impl SqliteStore {
    /// Removes `node`'s oldest records, at least `bytes` of them (one batch at most), in one
    /// transaction with their count in `record_bytes`; how many.
    fn evict(&self, node: &str, bytes: u64) -> Result<u64, StoreError> {
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        let rows: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT id, length(CAST(record AS BLOB)) + 512 FROM flows WHERE node = ?1 ORDER BY id LIMIT ?2",
            )?
            .query_map(params![node, super::EVICT_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let Some(through) = super::evict_through(&rows, bytes) else {
            // Counted but not held (cannot be, but must not loop forever).
            tx.execute("DELETE FROM record_bytes WHERE node = ?1", [node])?;
            tx.commit()?;
            return Ok(0);
        };
        let freed: Vec<(String, i64)> = tx
            .prepare_cached(
                "DELETE FROM flows WHERE node = ?1 AND id <= ?2 RETURNING day, length(CAST(record AS BLOB)) + 512",
            )?
            .query_map(params![node, through], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut by_day: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (day, b) in &freed {
            *by_day.entry(day).or_default() += b;
        }
        for (day, b) in by_day {
            tx.execute(
                "UPDATE record_bytes SET bytes = bytes - ?3 WHERE node = ?1 AND day = ?2",
                params![node, day, b],
            )?;
        }
        tx.execute(
            "DELETE FROM record_bytes WHERE node = ?1 AND bytes <= 0",
            [node],
        )?;
        tx.commit()?;
        Ok(freed.len() as u64)
    }
}

impl Store for SqliteStore {
    fn lineage(&self) -> Result<Option<String>, StoreError> {
        let kept = |db: &Connection| {
            db.query_row("SELECT id FROM lineage", [], |r| r.get::<_, String>(0))
                .optional()
        };
        if let Some(id) = kept(&lock(&self.reader))? {
            return Ok(Some(id));
        }
        let db = lock(&self.writer);
        let first = db
            .query_row(super::FIRST_CHANGE, [], |r| {
                Ok(super::lineage_of(
                    &r.get::<_, String>(0)?,
                    &r.get::<_, String>(1)?,
                    &r.get::<_, String>(2)?,
                    &r.get::<_, String>(3)?,
                ))
            })
            .optional()?;
        if let Some(id) = first {
            db.execute(
                "INSERT OR IGNORE INTO lineage (one, id) VALUES (1, ?1)",
                [&id],
            )?;
        }
        Ok(kept(&db)?)
    }

    fn push_policy(
        &self,
        revision: &str,
        files: &[BundleFile],
        by: &str,
        above: u64,
        base: Option<u64>,
        signing: &Signing,
    ) -> Result<Bundle, StoreError> {
        let text = serde_json::to_string(files).expect("files serialize");
        let at = now();
        let above = number(above)?;
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        if let Some(base) = base {
            let newest: i64 =
                tx.query_row("SELECT COALESCE(MAX(version), 0) FROM policy", [], |r| {
                    r.get(0)
                })?;
            if newest as u64 != base {
                return Err(StoreError::NotNewest {
                    base,
                    newest: newest as u64,
                });
            }
        }
        let version = Self::insert_bundle(&tx, revision, &text, by, &at, above, signing)?;
        tx.commit()?;
        Ok(Bundle {
            version,
            revision: revision.to_owned(),
            pushed_at: at,
            pushed_by: by.to_owned(),
            files: files.to_vec(),
            signing: signing.clone(),
        })
    }

    fn propose(
        &self,
        revision: &str,
        files: &[BundleFile],
        by: &str,
        signing: &Signing,
    ) -> Result<Proposal, StoreError> {
        let text = serde_json::to_string(files).expect("files serialize");
        let at = now();
        let db = lock(&self.writer);
        db.execute(
            "INSERT INTO proposals (revision, pushed_at, pushed_by, files, signing)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                revision,
                at,
                by,
                text,
                signing_text(signing).unwrap_or_default()
            ],
        )?;
        Ok(Proposal {
            id: db.last_insert_rowid() as u64,
            revision: revision.to_owned(),
            pushed_at: at,
            pushed_by: by.to_owned(),
            signing: signing.clone(),
            version: None,
            files: files.to_vec(),
        })
    }

    fn proposals(&self) -> Result<Vec<Proposal>, StoreError> {
        let db = lock(&self.reader);
        let mut st = db.prepare(
            "SELECT id, revision, pushed_at, pushed_by, '[]', signing, version FROM proposals
             ORDER BY id DESC LIMIT 1000",
        )?;
        let rows = st
            .query_map([], Self::proposal_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(proposal_of).collect()
    }

    fn proposal(&self, id: u64) -> Result<Option<Proposal>, StoreError> {
        // No number past i64 was ever given to a proposal.
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let db = lock(&self.reader);
        db.query_row(
            "SELECT id, revision, pushed_at, pushed_by, files, signing, version FROM proposals
             WHERE id = ?1",
            [id],
            Self::proposal_row,
        )
        .optional()?
        .map(proposal_of)
        .transpose()
    }

    fn approve(
        &self,
        id: u64,
        signature: &BundleSignature,
        required: usize,
        above: u64,
    ) -> Result<(Proposal, Option<Bundle>), StoreError> {
        let above = number(above)?;
        let Ok(row_id) = i64::try_from(id) else {
            return Err(StoreError::NoProposal(id));
        };
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        let mut p = tx
            .query_row(
                "SELECT id, revision, pushed_at, pushed_by, files, signing, version FROM proposals
                 WHERE id = ?1",
                [row_id],
                Self::proposal_row,
            )
            .optional()?
            .map(proposal_of)
            .transpose()?
            .ok_or(StoreError::NoProposal(id))?;
        let bundle = if add_approval(&mut p, signature, required)? {
            let files_text = serde_json::to_string(&p.files).expect("files serialize");
            let at = now();
            let version = Self::insert_bundle(
                &tx,
                &p.revision,
                &files_text,
                &p.pushed_by,
                &at,
                above,
                &p.signing,
            )?;
            Some(published(&mut p, version, at))
        } else {
            None
        };
        tx.execute(
            "UPDATE proposals SET signing = ?2, version = ?3 WHERE id = ?1",
            params![
                row_id,
                signing_text(&p.signing).unwrap_or_default(),
                p.version.map(|v| v as i64)
            ],
        )?;
        tx.commit()?;
        Ok((p, bundle))
    }

    fn policy_versions(&self) -> Result<Vec<BundleInfo>, StoreError> {
        let db = lock(&self.reader);
        let mut st = db.prepare(
            "SELECT version, revision, pushed_at, pushed_by FROM policy ORDER BY version DESC",
        )?;
        let all = st
            .query_map([], |r| {
                Ok(BundleInfo {
                    version: r.get::<_, i64>(0)? as u64,
                    revision: r.get(1)?,
                    pushed_at: r.get(2)?,
                    pushed_by: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(all)
    }

    fn policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError> {
        let db = lock(&self.reader);
        let row = match version {
            Some(v) => db
                .query_row(
                    "SELECT version, revision, pushed_at, pushed_by, files, signing FROM policy WHERE version = ?1",
                    [v as i64],
                    Self::bundle_row,
                )
                .optional()?,
            None => db
                .query_row(
                    "SELECT version, revision, pushed_at, pushed_by, files, signing FROM policy ORDER BY version DESC LIMIT 1",
                    [],
                    Self::bundle_row,
                )
                .optional()?,
        };
        row.map(
            |(version, revision, pushed_at, pushed_by, files, signing)| {
                bundle_of(
                    version,
                    revision,
                    pushed_at,
                    pushed_by,
                    &files,
                    signing.as_deref(),
                )
            },
        )
        .transpose()
    }

    fn nodes_seen(&self, seen: &[NodeSeen]) -> Result<(), StoreError> {
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO nodes (node, first_seen, last_seen, applied_version, applied_revision, agent_version, error, owner, labels,
                     spool_records, records_lost, sessions)
                 VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (node) DO UPDATE SET last_seen = ?2, applied_version = ?3,
                     applied_revision = ?4, agent_version = ?5, error = ?6, owner = ?7,
                     labels = ?8, spool_records = ?9, records_lost = ?10, sessions = ?11",
            )?;
            for s in seen {
                st.execute(params![
                    s.node,
                    s.at,
                    s.poll.applied_version.map(|v| v as i64),
                    s.poll.applied_revision,
                    s.poll.agent_version,
                    s.poll.error,
                    s.poll.owner.as_ref().map(|o| o.as_str()),
                    super::labels_text(&s.poll.labels),
                    s.poll.spool_records.map(super::clamp_i64),
                    s.poll.records_lost.map(super::clamp_i64),
                    super::sessions_text(&s.poll.sessions)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let db = lock(&self.reader);
        let mut st = db.prepare(
            "SELECT node, first_seen, last_seen, applied_version, applied_revision, agent_version, error,
                 owner, labels, spool_records, records_lost, sessions
             FROM nodes ORDER BY node",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                NodeInfo {
                    node: r.get(0)?,
                    first_seen: r.get(1)?,
                    last_seen: r.get(2)?,
                    applied_version: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    applied_revision: r.get(4)?,
                    agent_version: r.get(5)?,
                    error: r.get(6)?,
                    owner: None,
                    labels: Default::default(),
                    spool_records: r.get::<_, Option<i64>>(9)?.map(|v| v.max(0) as u64),
                    records_lost: r.get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64),
                    sessions: super::sessions_of(r.get::<_, Option<String>>(11)?.as_deref()),
                },
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        })?;
        rows.map(|row| {
            let (n, owner, labels) = row?;
            Ok(super::described(n, owner, labels))
        })
        .collect()
    }

    fn ingest(&self, node: &str, epoch: u64, records: &[Reported]) -> Result<Ingested, StoreError> {
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        let mut out = Ingested::default();
        let mut bytes: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO flows (node, epoch, rid, kind, time, verdict, identity, dest, service, record, audit_seq, audit_hash, day, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let today = super::today();
            for r in records {
                let Some(row) = Row::of(epoch, r, today, &self.retention)? else {
                    out.expired += 1;
                    continue;
                };
                let n = st.execute(params![
                    node,
                    epoch as i64,
                    row.rid,
                    row.kind,
                    row.time,
                    row.verdict,
                    row.identity,
                    row.dest,
                    row.service,
                    row.text,
                    row.audit_seq,
                    row.audit_hash,
                    row.day,
                    row.owner,
                ])?;
                if n == 1 {
                    out.accepted += 1;
                    *bytes.entry(row.day.clone()).or_default() += super::charged(row.text);
                } else {
                    out.duplicates += 1;
                }
            }
            let mut held = tx.prepare_cached(
                "INSERT INTO record_bytes (node, day, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (node, day) DO UPDATE SET bytes = bytes + excluded.bytes",
            )?;
            for (day, b) in &bytes {
                held.execute(params![node, day, b])?;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn explain_flows(&self, q: &FlowQuery) -> Result<String, StoreError> {
        let (sql, args, _) = super::flows_sql(q, |n| format!("?{n}"));
        let db = lock(&self.reader);
        let mut st = db.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let steps = st
            .query_map(rusqlite::params_from_iter(values(args)), |r| {
                r.get::<_, String>(3)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(steps.join("\n"))
    }

    fn flows(&self, q: &FlowQuery) -> Result<FlowPage, StoreError> {
        let (sql, args, limit) = super::flows_sql(q, |n| format!("?{n}"));
        let args = values(args);
        let db = lock(&self.reader);
        let mut st = db.prepare(&sql)?;
        let mut page = super::Pager::new(limit);
        // Read a row at a time, so a page of large records stops at its byte budget.
        let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        for row in rows {
            let (id, node, text) = row?;
            if !page.push(id, node, text)? {
                break;
            }
        }
        Ok(page.finish())
    }

    fn retain(&self, today: time::Date) -> Result<super::Retained, StoreError> {
        let mut out = super::Retained::default();
        let first = super::day_text(
            today
                .checked_sub(time::Duration::days(i64::from(self.retention.days)))
                .unwrap_or(time::Date::MIN),
        );
        // A batch per transaction, the writer let go between them.
        let batch = |sql: &str, arg: Option<&str>| -> Result<usize, StoreError> {
            let db = lock(&self.writer);
            Ok(match arg {
                Some(a) => db.execute(sql, params![a, RETAIN_BATCH as i64])?,
                None => db.execute(sql, params![RETAIN_BATCH as i64])?,
            })
        };
        loop {
            let n = batch(
                "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE day < ?1 LIMIT ?2)",
                Some(&first),
            )?;
            out.expired += n as u64;
            if n < RETAIN_BATCH {
                break;
            }
        }
        lock(&self.writer).execute("DELETE FROM record_bytes WHERE day < ?1", [&first])?;
        loop {
            let n = batch(
                "DELETE FROM alert_seen WHERE rowid IN
                 (SELECT rowid FROM alert_seen WHERE last < ?1 LIMIT ?2)",
                Some(&first),
            )?;
            if n < RETAIN_BATCH {
                break;
            }
        }
        if let Some(max) = self.retention.max_bytes {
            loop {
                let held: Vec<(String, u64)> = {
                    let db = lock(&self.reader);
                    let mut st =
                        db.prepare("SELECT node, SUM(bytes) FROM record_bytes GROUP BY node")?;
                    st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?
                        .collect::<Result<_, _>>()?
                };
                let Some((node, bytes)) = super::evict_next(&held, max) else {
                    break;
                };
                out.over_size += self.evict(node, bytes)?;
            }
        }
        Ok(out)
    }

    fn heads(&self) -> Result<(u64, u64), StoreError> {
        let db = lock(&self.reader);
        let (v, g): (i64, i64) = db.query_row(
            "SELECT (SELECT COALESCE(MAX(version), 0) FROM policy),
                    (SELECT COALESCE(MAX(generation), 0) FROM revocations)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((v as u64, g as u64))
    }

    fn revoke(
        &self,
        identity: &str,
        by: &str,
        reason: Option<&str>,
        above: u64,
    ) -> Result<u64, StoreError> {
        let above = number(above)?;
        let db = lock(&self.writer);
        db.execute(
            "INSERT OR IGNORE INTO revocations (generation, identity, at, by, reason)
             SELECT max(COALESCE(MAX(generation), 0), ?4) + 1, ?1, ?2, ?3, ?5 FROM revocations",
            params![identity, now(), by, above, reason],
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
        check: &mut crate::control_plane::chain::ChainCheck,
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
        let mut st = db.prepare(
            "SELECT identity, generation, at, by, reason FROM revocations ORDER BY generation",
        )?;
        let all: Vec<Revocation> = st
            .query_map([], |r| {
                Ok(Revocation {
                    identity: r.get(0)?,
                    generation: r.get::<_, i64>(1)? as u64,
                    at: r.get(2)?,
                    by: r.get(3)?,
                    reason: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok((all.last().map_or(0, |r| r.generation), all))
    }

    fn console_open(&self, session: &ConsoleSession) -> Result<(), StoreError> {
        let db = lock(&self.writer);
        db.execute(
            "DELETE FROM console_sessions WHERE expires <= ?1",
            params![now()],
        )?;
        let tx = db.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO console_sessions (id_sha256, credential, chain, csrf, created, expires)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                session.id_sha256,
                session.credential,
                session.chain,
                session.csrf,
                session.created,
                session.expires
            ],
        )?;
        tx.execute(
            "DELETE FROM console_sessions WHERE credential = ?1 AND id_sha256 NOT IN
             (SELECT id_sha256 FROM console_sessions WHERE credential = ?1
              ORDER BY created DESC, id_sha256 LIMIT ?2)",
            params![session.credential, super::CONSOLE_SESSIONS_PER_CREDENTIAL],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn forward_claim(
        &self,
        name: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        // One machine holds a SQLite file: its clock is every replica's.
        let (now, until, too_far) = super::lease_end(lease);
        let db = lock(&self.writer);
        let after: Option<i64> = db
            .query_row(
                "INSERT INTO forwarding (name, after, holder, lease_until)
                 VALUES (?1, (SELECT COALESCE(MAX(id), 0) FROM flows), ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = ?2, lease_until = ?3
                 WHERE forwarding.holder = ?2 OR forwarding.lease_until <= ?4
                    OR forwarding.lease_until > ?5
                 RETURNING after",
                params![name, holder, until, now, too_far],
                |r| r.get(0),
            )
            .optional()?;
        Ok(after.map(|a| a.max(0) as u64))
    }

    fn forward_behind(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let db = lock(&self.reader);
        let behind: Option<i64> = db
            .query_row(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM flows) - after FROM forwarding
                 WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(behind.map(|b| b.max(0) as u64))
    }

    fn baseline(&self, keys: &[(String, String)]) -> Result<super::Baseline, StoreError> {
        let db = lock(&self.reader);
        let mut st =
            db.prepare_cached("SELECT first FROM alert_seen WHERE subject = ?1 AND what = ?2")?;
        let mut out = super::Baseline::new();
        for (subject, what) in keys {
            if let Some(first) = st
                .query_row(params![subject, what], |r| r.get::<_, String>(0))
                .optional()?
            {
                out.insert((subject.clone(), what.clone()), first);
            }
        }
        Ok(out)
    }

    fn baseline_note(
        &self,
        seen: &[(String, String, String)],
        today: &str,
    ) -> Result<(), StoreError> {
        let mut db = lock(&self.writer);
        let tx = db.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO alert_seen (subject, what, first, last) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (subject, what) DO UPDATE SET first = MIN(first, excluded.first),
                    last = MAX(COALESCE(last, ''), excluded.last)",
            )?;
            for (subject, what, time) in seen {
                st.execute(params![subject, what, time, today])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn forward_advance(&self, name: &str, holder: &str, after: u64) -> Result<bool, StoreError> {
        let n = lock(&self.writer).execute(
            "UPDATE forwarding SET after = MAX(after, ?3) WHERE name = ?1 AND holder = ?2",
            params![name, holder, after as i64],
        )?;
        Ok(n == 1)
    }

    fn console_link_open(&self, link: &ConsoleLink) -> Result<(), StoreError> {
        let db = lock(&self.writer);
        db.execute(
            "DELETE FROM console_links WHERE expires <= ?1",
            params![now()],
        )?;
        db.execute(
            "INSERT INTO console_links (code_sha256, credential, chain, expires)
             VALUES (?1, ?2, ?3, ?4)",
            params![link.code_sha256, link.credential, link.chain, link.expires],
        )?;
        Ok(())
    }

    fn console_link_take(&self, code_sha256: &str) -> Result<Option<ConsoleLink>, StoreError> {
        let db = lock(&self.writer);
        Ok(db
            .query_row(
                "DELETE FROM console_links WHERE code_sha256 = ?1 AND expires > ?2
                 RETURNING code_sha256, credential, chain, expires",
                params![code_sha256, now()],
                |r| {
                    Ok(ConsoleLink {
                        code_sha256: r.get(0)?,
                        credential: r.get(1)?,
                        chain: r.get(2)?,
                        expires: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    fn token_create(&self, t: &JoinToken) -> Result<(), StoreError> {
        let db = lock(&self.writer);
        // Tokens a day past their end are of no use even to a list; cancelled ones are
        // kept (a cancelled token's certificates are no longer renewed).
        db.execute(
            "DELETE FROM join_tokens WHERE expires <= ?1 AND cancelled = 0",
            params![super::days_ago(1)],
        )?;
        db.execute(
            "INSERT INTO join_tokens (id, sha256, identity, expires, uses_left, created_by, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.id,
                t.sha256,
                t.identity,
                t.expires,
                t.uses_left,
                t.created_by,
                t.created
            ],
        )?;
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        let db = lock(&self.reader);
        let mut q = db.prepare(
            "SELECT id, identity, expires, uses_left, created_by, created, cancelled
             FROM join_tokens WHERE expires > ?1 ORDER BY created DESC, id LIMIT 1000",
        )?;
        let rows = q.query_map(params![super::days_ago(1)], |r| {
            Ok(JoinToken {
                id: r.get(0)?,
                sha256: String::new(),
                identity: r.get(1)?,
                expires: r.get(2)?,
                uses_left: r.get(3)?,
                created_by: r.get(4)?,
                created: r.get(5)?,
                cancelled: r.get::<_, i64>(6)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn token_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let n = lock(&self.writer).execute(
            "UPDATE join_tokens SET cancelled = 1 WHERE id = ?1 AND cancelled = 0",
            params![id],
        )?;
        Ok(n == 1)
    }

    fn token_spend(&self, sha256: &str) -> Result<Option<JoinToken>, StoreError> {
        let db = lock(&self.writer);
        Ok(db
            .query_row(
                "UPDATE join_tokens SET uses_left = uses_left - 1
                 WHERE sha256 = ?1 AND uses_left > 0 AND cancelled = 0 AND expires > ?2
                 RETURNING id, identity, expires, uses_left, created_by, created",
                params![sha256, now()],
                |r| {
                    Ok(JoinToken {
                        id: r.get(0)?,
                        sha256: sha256.to_owned(),
                        identity: r.get(1)?,
                        expires: r.get(2)?,
                        uses_left: r.get(3)?,
                        created_by: r.get(4)?,
                        created: r.get(5)?,
                        cancelled: false,
                    })
                },
            )
            .optional()?)
    }

    fn token_identity(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        let db = lock(&self.reader);
        Ok(db
            .query_row(
                "SELECT identity FROM join_tokens
                 WHERE sha256 = ?1 AND uses_left > 0 AND cancelled = 0 AND expires > ?2",
                params![sha256, now()],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn token_cancelled(&self, id: &str) -> Result<bool, StoreError> {
        let db = lock(&self.reader);
        Ok(db
            .query_row(
                "SELECT cancelled FROM join_tokens WHERE id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .is_some_and(|c| c != 0))
    }

    fn renewed(&self, serial: &str, chain: &str) -> Result<bool, StoreError> {
        let n = lock(&self.writer).execute(
            "UPDATE issuances SET renewed_into = ?2 WHERE serial = ?1 AND renewed_into IS NULL",
            params![serial, chain],
        )?;
        Ok(n == 1)
    }

    fn issued(&self, i: &Issuance) -> Result<(), StoreError> {
        let db = lock(&self.writer);
        db.execute(
            "DELETE FROM issuances WHERE serial IN
             (SELECT serial FROM issuances WHERE not_after < ?1 LIMIT 100)",
            params![super::days_ago(self.retention.days)],
        )?;
        db.execute(
            "INSERT INTO issuances (serial, identity, node, kind, token, issued, not_after)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                i.serial,
                i.identity,
                i.node,
                i.kind,
                i.token,
                i.issued,
                i.not_after
            ],
        )?;
        Ok(())
    }

    fn issuance(&self, serial: &str) -> Result<Option<Issuance>, StoreError> {
        let db = lock(&self.reader);
        Ok(db
            .query_row(
                "SELECT serial, identity, node, kind, token, issued, not_after, renewed_into
                 FROM issuances WHERE serial = ?1",
                params![serial],
                issuance_row,
            )
            .optional()?)
    }

    fn issuances(&self, limit: usize) -> Result<Vec<Issuance>, StoreError> {
        let db = lock(&self.reader);
        let mut q = db.prepare(
            "SELECT serial, identity, node, kind, token, issued, not_after, NULL
             FROM issuances ORDER BY issued DESC, serial LIMIT ?1",
        )?;
        let rows = q.query_map(params![limit as i64], issuance_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn console_close_all(&self, credential: Option<&str>) -> Result<u64, StoreError> {
        let db = lock(&self.writer);
        let tx = db.unchecked_transaction()?;
        let mut ended = 0;
        for table in ["console_sessions", "console_links"] {
            let n = match credential {
                None => tx.execute(&format!("DELETE FROM {table}"), [])?,
                Some(c) => tx.execute(
                    &format!(
                        "DELETE FROM {table} WHERE credential = ?1
                         OR (substr(?1, 1, 6) = 'token:' AND substr(credential, 1, length(?1)) = ?1)"
                    ),
                    params![c],
                )?,
            };
            if table == "console_sessions" {
                ended = n as u64;
            }
        }
        tx.commit()?;
        Ok(ended)
    }

    fn console_session(&self, id_sha256: &str) -> Result<Option<ConsoleSession>, StoreError> {
        let db = lock(&self.reader);
        Ok(db
            .query_row(
                "SELECT id_sha256, credential, chain, csrf, created, expires
                 FROM console_sessions WHERE id_sha256 = ?1 AND expires > ?2",
                params![id_sha256, now()],
                |r| {
                    Ok(ConsoleSession {
                        id_sha256: r.get(0)?,
                        credential: r.get(1)?,
                        chain: r.get(2)?,
                        csrf: r.get(3)?,
                        created: r.get(4)?,
                        expires: r.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    fn console_close(&self, id_sha256: &str) -> Result<bool, StoreError> {
        let db = lock(&self.writer);
        Ok(db.execute(
            "DELETE FROM console_sessions WHERE id_sha256 = ?1",
            params![id_sha256],
        )? == 1)
    }
}
