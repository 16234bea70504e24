//! [`PgStore`]: PostgreSQL, which any number of control-plane replicas share. Replicas keep
//! nothing of their own: what one stores every other reads, and pushes and revocations are
//! announced to all of them (`NOTIFY agentwall_changes`, sent when the change commits).

use std::{future::Future, path::PathBuf, str::FromStr as _, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use tokio_postgres::{
    AsyncMessage, Config, NoTls, Socket,
    config::SslMode,
    tls::{MakeTlsConnect, TlsConnect},
    types::ToSql,
};
use tracing::{info, warn};

use super::{
    Arg, ConsoleLink, ConsoleSession, Issuance, JoinToken, NodeSeen, Row, Store, StoreError,
    add_approval, bundle_of, now, number, proposal_of, published, signing_text,
};
use crate::control_plane::{
    Bundle, BundleFile, BundleInfo, FlowPage, FlowQuery, Ingested, NodeInfo, Proposal, Reported,
    Revocation,
    signing::{BundleSignature, Signing},
};

/// How to reach the database: the `database`, `database_password_file` and `database_ca`
/// settings.
#[derive(Clone)]
pub struct PgOptions {
    pub url: String,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub retention: super::Retention,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &crate::config::control_plane::redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("ca", &self.ca)
            .field("retention", &self.retention)
            .finish()
    }
}

/// Whether every host `config` names is this machine (loopback, or a Unix socket), where a
/// plain connection crosses no network.
fn on_this_machine(config: &Config) -> bool {
    use tokio_postgres::config::Host;
    let local = |name: &str| {
        name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    config.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => local(name),
        Host::Unix(_) => true,
    }) && config.get_hostaddrs().iter().all(|a| a.is_loopback())
}

/// The channel pushes and revocations are announced on.
const CHANNEL: &str = "agentwall_changes";

/// Advisory lock keys (one namespace, the first word): the schema's migrations, and the
/// numbering of bundle versions and revocation generations. Each is taken for one
/// transaction, so two replicas never migrate at once nor give out one number twice, and
/// numbers become visible in the order they were given.
pub(super) const LOCKS: i32 = 0x6177_6c6c; // "awll"
const SCHEMA_LOCK: i32 = 1;
const POLICY_LOCK: i32 = 2;
const REVOKE_LOCK: i32 = 3;
const PARTITION_LOCK: i32 = 4;
/// Held by each report batch's insert until it commits: ids are given in commit order, so
/// a reader paging with `after` never passes an id that a batch still in flight would
/// fill in below it.
const INGEST_LOCK: i32 = 6;
pub(super) const RETAIN_LOCK: i32 = 5;

/// Connections each replica holds at most, besides [`CONTROL_POOL_SIZE`] and the one
/// listening for changes.
const POOL_SIZE: usize = 16;
const CONTROL_POOL_SIZE: usize = 2;

/// Longest one store call may take (a node's whole audit chain excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest one statement may run, on the database's side (`statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(50);

/// Longest a new day's partition waits for its lock on `flows` (behind a retention pass
/// detaching one): the batch that needs it is refused as busy and sent again, rather than
/// every report waiting in line behind it.
const PARTITION_LOCK_TIMEOUT: &str = "5s";

/// Longest migrating the schema may take (replicas starting meanwhile wait for it).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Longest a retention pass may take, from this side (it waits for readers older than
/// the partition it detaches; it runs off the request path).
const RETAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// Records are kept in one partition of `flows` per day they are filed under
/// ([`super::file_day`]): retention drops whole partitions, which costs the reports stored
/// meanwhile nothing. The unique keys hold the day, which a record sent again has too.
/// Versioned schema: migration `i` takes a database from version `i` to `i + 1` (kept in
/// `agentwall_schema`). Never edit one that has shipped; add the next.
const MIGRATIONS: &[&str] = &["CREATE TABLE policy (
        version BIGINT PRIMARY KEY,
        revision TEXT NOT NULL,
        pushed_at TEXT NOT NULL,
        pushed_by TEXT NOT NULL,
        files TEXT NOT NULL
    );
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        applied_version BIGINT,
        applied_revision TEXT,
        agent_version TEXT,
        error TEXT
    );
    CREATE SEQUENCE flows_ids;
    CREATE TABLE flows (
        id BIGINT NOT NULL DEFAULT nextval('flows_ids'),
        day DATE NOT NULL,
        node TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        rid BIGINT NOT NULL,
        kind TEXT NOT NULL,
        time TEXT NOT NULL,
        verdict TEXT,
        identity TEXT,
        dest TEXT,
        service TEXT,
        record TEXT NOT NULL,
        audit_seq BIGINT,
        audit_hash TEXT,
        UNIQUE (node, epoch, rid, day)
    ) PARTITION BY RANGE (day);
    CREATE INDEX flows_id ON flows (id);
    CREATE INDEX flows_time ON flows (time);
    CREATE UNIQUE INDEX flows_audit_hash ON flows (node, audit_hash, day) WHERE audit_hash IS NOT NULL;
    CREATE INDEX flows_audit_seq ON flows (node, audit_seq) WHERE audit_seq IS NOT NULL;
    CREATE INDEX flows_node_id ON flows (node, id);
    CREATE INDEX flows_identity_id ON flows (identity, id);
    CREATE INDEX flows_dest_id ON flows (dest, id);
    CREATE INDEX flows_service_id ON flows (service, id);
    CREATE INDEX flows_tagged ON flows (id) WHERE service IS NOT NULL;
    CREATE TABLE revocations (
        generation BIGINT PRIMARY KEY,
        identity TEXT NOT NULL UNIQUE,
        at TEXT NOT NULL,
        by TEXT NOT NULL
    );",
    // Bytes of records held per node and day: what `retention_max_bytes` counts, and whose
    // records go first past it (the largest holder's).
    "CREATE TABLE record_bytes (
        node TEXT NOT NULL,
        day DATE NOT NULL,
        bytes BIGINT NOT NULL,
        PRIMARY KEY (node, day)
    );
    INSERT INTO record_bytes (node, day, bytes)
        SELECT node, day, SUM(octet_length(record) + 512) FROM flows GROUP BY node, day;",
    // The database's lineage, written once (see `Store::lineage`) and kept by its copies.
    "CREATE TABLE agentwall_lineage (one INTEGER PRIMARY KEY CHECK (one = 1), id TEXT NOT NULL);",
    // Each node's report quotas, shared by every replica (their state: the theoretical
    // arrival time of the generic cell rate algorithm, in seconds by the database's clock).
    "CREATE TABLE report_quota (
        node TEXT NOT NULL,
        kind TEXT NOT NULL,
        tat DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (node, kind)
    );",
    // Who answers for each node's host, and its labels (JSON), as the node last said.
    "ALTER TABLE nodes ADD COLUMN owner TEXT, ADD COLUMN labels TEXT;",
    // Why an identity was revoked, as the admin said; the console's sign-ins (the cookie's
    // SHA-256, never the cookie), which every replica honours.
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
    ALTER TABLE nodes ADD COLUMN spool_records BIGINT, ADD COLUMN records_lost BIGINT;
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
        after BIGINT NOT NULL,
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
        id BIGINT PRIMARY KEY,
        revision TEXT NOT NULL,
        pushed_at TEXT NOT NULL,
        pushed_by TEXT NOT NULL,
        files TEXT NOT NULL,
        signing TEXT NOT NULL,
        version BIGINT
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
        uses_left BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        created TEXT NOT NULL,
        cancelled BOOLEAN NOT NULL DEFAULT false
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

pub struct PgStore {
    /// Drives the connections; the store's calls block on it (they are made off the
    /// server's async workers, as every store call is).
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    /// A few connections of their own for what replicas must always manage: reading the
    /// heads (catch-up), bundles and revocations, and making pushes and revocations. Report
    /// batches waiting on the database cannot take them all.
    control: Pool,
    changes: tokio::sync::watch::Receiver<u64>,
    retention: super::Retention,
    /// The days whose partition this process made or saw.
    partitions: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropped wherever the server ends, perhaps on an async worker, where waiting for
        // the runtime's threads is not allowed.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A PostgreSQL error with what the server said (its message, detail and hint), not only
/// "db error".
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(c) = source {
                let text = c.to_string();
                if !s.contains(&text) {
                    s.push_str(&format!(": {text}"));
                }
                source = c.source();
            }
            s
        }
    }
}

/// A batch the database would not store for what a record holds (a data exception, a value
/// over a limit): the node's to split and drop (422), not a server failure.
fn refused_record(e: tokio_postgres::Error) -> StoreError {
    match e.code().map(|c| c.code()) {
        Some(c) if c.starts_with("22") || c.starts_with("54") => StoreError::Corrupt(format!(
            "a record the database cannot store: {}",
            describe(&e)
        )),
        _ => StoreError::Postgres(e),
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Pool(other.to_string()),
    }
}

impl PgStore {
    /// Connects, checks the schema and migrates it (once, however many replicas start
    /// together), and starts listening for other replicas' changes.
    pub fn open(o: &PgOptions) -> Result<Self, StoreError> {
        let what = crate::config::control_plane::redact_url(&o.url);
        let fail = |message: String| StoreError::Open {
            what: what.clone(),
            message,
        };
        let mut config = Config::from_str(&o.url).map_err(|e| fail(describe(&e)))?;
        if let Some(p) = &o.password_file {
            let pw = crate::files::read_secret(p)
                .map_err(|e| fail(format!("database_password_file {}: {e}", p.display())))?;
            config.password(pw);
        }
        if config.get_application_name().is_none() {
            config.application_name("agentwall-control-plane");
        }
        config.connect_timeout(Duration::from_secs(10));
        // A database that vanishes without a reset (a partition) is noticed in seconds.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(Duration::from_secs(20));
        // The database ends a statement before this process gives up on it (a call is
        // given up after CALL_TIMEOUT), so a connection goes back to the pool idle; and it
        // notices a client that went away while a statement waits (on a lock), so what the
        // statement held is let go.
        let options = format!(
            "{} -c statement_timeout={} -c client_connection_check_interval=10000",
            config.get_options().unwrap_or_default(),
            STATEMENT_TIMEOUT.as_millis()
        );
        config.options(options.trim());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("agentwall-db")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting the database runtime: {e}")))?;
        let (tx, changes) = tokio::sync::watch::channel(0u64);
        let (pool, control) = match &o.ca {
            Some(ca) => {
                let roots = crate::pem::roots([ca.as_path()]).map_err(|e| fail(e.to_string()))?;
                let tls = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| fail(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.ssl_mode(SslMode::Require);
                start(&rt, config, tokio_postgres_rustls::MakeRustlsConnect::new(tls), tx)
            }
            None => {
                if config.get_ssl_mode() == SslMode::Require {
                    return Err(fail(
                        "sslmode=require needs database_ca, the CA the server's certificate must chain to"
                            .into(),
                    ));
                }
                // Plain text only where it crosses no network: anyone on the path could read
                // the password and forge what replicas serve.
                if !on_this_machine(&config) {
                    return Err(fail(
                        "the database is not on this machine: set database_ca (TLS, the server's certificate and name checked)"
                            .into(),
                    ));
                }
                config.ssl_mode(SslMode::Disable);
                start(&rt, config, NoTls, tx)
            }
        }
        .map_err(|e| fail(e.to_string()))?;
        let store = Self {
            rt: Some(rt),
            pool,
            control,
            changes,
            retention: o.retention,
            partitions: std::sync::Mutex::default(),
        };
        // A migration may rewrite every stored record (a backfill): it is not cut short.
        store
            .block_for(MIGRATE_TIMEOUT, store.migrate(&what))
            .map_err(|e| match e {
                e @ StoreError::TooNew { .. } => e,
                StoreError::Postgres(e) => fail(describe(&e)),
                e => fail(e.to_string()),
            })?;
        Ok(store)
    }

    /// Runs `f` on the store's runtime, for at most [`CALL_TIMEOUT`]: a database that stops
    /// answering (a partition that drops packets) fails the call rather than holding it.
    fn block<T>(&self, f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.block_for(CALL_TIMEOUT, f)
    }

    fn block_for<T>(
        &self,
        limit: Duration,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.rt
            .as_ref()
            .expect("runtime until dropped")
            .block_on(async {
                tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
                    Err(StoreError::Pool(format!(
                        "no answer from the database within {} s",
                        limit.as_secs()
                    )))
                })
            })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn control_client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.control.get().await.map_err(pool_error)
    }

    async fn migrate(&self, what: &str) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // Waiting for another replica's migration, and migrating, take what they take.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&LOCKS, &SCHEMA_LOCK],
        )
        .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS agentwall_schema (version INTEGER NOT NULL)")
            .await?;
        let found: i32 = match tx
            .query_opt("SELECT version FROM agentwall_schema", &[])
            .await?
        {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO agentwall_schema (version) VALUES (0)", &[])
                    .await?;
                0
            }
        };
        let known = MIGRATIONS.len() as i32;
        if found > known {
            return Err(StoreError::TooNew {
                what: what.to_owned(),
                found: found.into(),
                known: known.into(),
            });
        }
        for sql in &MIGRATIONS[found as usize..] {
            tx.batch_execute(sql).await?;
        }
        if found < known {
            tx.execute("UPDATE agentwall_schema SET version = $1", &[&known])
                .await?;
            info!(database = %what, from = found, to = known, "database schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The partition of `flows` that holds the records filed under `day` (`YYYY-MM-DD`).
fn partition(day: &str) -> String {
    format!("flows_d{}", day.replace('-', ""))
}

/// The day a partition's name says.
fn partition_day(name: &str) -> Option<time::Date> {
    let d = name.strip_prefix("flows_d")?;
    let text = format!("{}-{}-{}", d.get(..4)?, d.get(4..6)?, d.get(6..)?);
    time::Date::parse(&text, super::DAY).ok()
}

impl PgStore {
    /// Makes the partitions of `days` that this process has not seen (all of them with
    /// `again`), one replica at a time.
    async fn partitions_for(
        &self,
        c: &mut deadpool_postgres::Object,
        days: &std::collections::BTreeSet<String>,
        again: bool,
    ) -> Result<(), StoreError> {
        let missing: Vec<&String> = {
            let known = self.partitions.lock().expect("partitions");
            days.iter()
                .filter(|d| again || !known.contains(*d))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let tx = c.transaction().await?;
        // Made as a table, then attached: attaching locks `flows` only against other
        // attaches and detaches (SHARE UPDATE EXCLUSIVE), where `CREATE TABLE ... PARTITION
        // OF` would lock out every report and reader (ACCESS EXCLUSIVE) while it waits
        // behind a long reader. Waits are bounded: the batch is refused as busy instead.
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'"
        ))
        .await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&LOCKS, &PARTITION_LOCK],
        )
        .await?;
        for day in &missing {
            let d = time::Date::parse(day, super::DAY)
                .map_err(|e| StoreError::Corrupt(format!("day {day}: {e}")))?;
            let next = super::day_text(d.next_day().unwrap_or(d));
            let name = partition(day);
            let (exists, attached): (bool, bool) = {
                let r = tx
                    .query_one(
                        "SELECT to_regclass($1) IS NOT NULL,
                                EXISTS (SELECT 1 FROM pg_inherits
                                        WHERE inhrelid = to_regclass($1) AND inhparent = 'flows'::regclass)",
                        &[&name],
                    )
                    .await?;
                (r.get(0), r.get(1))
            };
            if attached {
                continue;
            }
            // A table left detached by a retention pass cut short before its drop is
            // attached again with what it holds: nothing leaves uncounted, and the next
            // pass decides again.
            if !exists {
                tx.batch_execute(&format!(
                    "CREATE TABLE {name} (LIKE flows INCLUDING DEFAULTS)"
                ))
                .await?;
            }
            tx.batch_execute(&format!(
                "ALTER TABLE flows ATTACH PARTITION {name} FOR VALUES FROM ('{day}') TO ('{next}')"
            ))
            .await?;
        }
        tx.commit().await?;
        self.partitions
            .lock()
            .expect("partitions")
            .extend(missing.into_iter().cloned());
        Ok(())
    }

    /// The partitions of `flows`, oldest first: (name, day).
    async fn partitions(
        &self,
        c: &deadpool_postgres::Object,
    ) -> Result<Vec<(String, time::Date)>, StoreError> {
        let rows = c
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'flows'::regclass",
                &[],
            )
            .await?;
        let mut all: Vec<(String, time::Date)> = rows
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                partition_day(&name).map(|d| (name, d))
            })
            .collect();
        all.sort_by_key(|(_, d)| *d);
        Ok(all)
    }

    /// Tables named as partitions that are not attached to `flows`: left by a retention
    /// pass cut short between its detach and its drop. (A partition being made is attached
    /// in the transaction that makes it, so none is seen half made.)
    async fn orphans(&self, c: &deadpool_postgres::Object) -> Result<Vec<String>, StoreError> {
        let rows = c
            .query(
                "SELECT c.relname::text FROM pg_class c
                 WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'flows'::regclass) AND c.relkind = 'r'
                   AND c.relname LIKE 'flows\\_d%'
                   AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|n| partition_day(n).is_some())
            .collect())
    }

    /// Drops the table `name` (detached); the records it held.
    async fn drop_table(
        &self,
        c: &deadpool_postgres::Object,
        name: &str,
    ) -> Result<u64, StoreError> {
        let n: i64 = c
            .query_one(&format!("SELECT COUNT(*) FROM {name}"), &[])
            .await?
            .get(0);
        // The table and its day's byte counts go together (one transaction).
        let counts = partition_day(name).map_or(String::new(), |d| {
            format!(
                "DELETE FROM record_bytes WHERE day = '{}';",
                super::day_text(d)
            )
        });
        c.batch_execute(&format!(
            "BEGIN; DROP TABLE IF EXISTS {name}; {counts} COMMIT"
        ))
        .await?;
        if let Some(d) = partition_day(name) {
            self.partitions
                .lock()
                .expect("partitions")
                .remove(&super::day_text(d));
        }
        Ok(n as u64)
    }

    /// Detaches and drops `name`; the records it held.
    async fn drop_partition(
        &self,
        c: &deadpool_postgres::Object,
        name: &str,
    ) -> Result<u64, StoreError> {
        // Concurrently: reports stored meanwhile are not held up. A detach cut short before
        // (a crash) is finished first.
        if let Err(e) = c
            .batch_execute(&format!(
                "ALTER TABLE flows DETACH PARTITION {name} CONCURRENTLY"
            ))
            .await
        {
            if e.code() != Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
            {
                return Err(e.into());
            }
            c.batch_execute(&format!(
                "ALTER TABLE flows DETACH PARTITION {name} FINALIZE"
            ))
            .await?;
        }
        self.drop_table(c, name).await
    }
}

/// Removes `node`'s oldest records, at least `bytes` of them (one batch at most), in one
/// transaction with their count in `record_bytes`; how many.
async fn evict(
    c: &mut deadpool_postgres::Object,
    node: &str,
    bytes: u64,
) -> Result<u64, StoreError> {
    let tx = c.transaction().await?;
    let rows: Vec<(i64, i64)> = tx
        .query(
            "SELECT id, octet_length(record)::bigint + 512 FROM flows WHERE node = $1 ORDER BY id LIMIT $2",
            &[&node, &super::EVICT_BATCH],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let Some(through) = super::evict_through(&rows, bytes) else {
        // Counted but not held (cannot be, but must not loop forever).
        tx.execute("DELETE FROM record_bytes WHERE node = $1", &[&node])
            .await?;
        tx.commit().await?;
        return Ok(0);
    };
    let n: i64 = tx
        .query_one(
            "WITH gone AS (
                 DELETE FROM flows WHERE node = $1 AND id <= $2
                 RETURNING day, octet_length(record)::bigint + 512 AS b
             ), per_day AS (SELECT day, SUM(b)::bigint AS b, COUNT(*) AS n FROM gone GROUP BY day),
             counted AS (
                 UPDATE record_bytes r SET bytes = r.bytes - p.b FROM per_day p
                 WHERE r.node = $1 AND r.day = p.day
             )
             SELECT COALESCE(SUM(n), 0)::bigint FROM per_day",
            &[&node, &through],
        )
        .await?
        .get(0);
    tx.execute(
        "DELETE FROM record_bytes WHERE node = $1 AND bytes <= 0",
        &[&node],
    )
    .await?;
    tx.commit().await?;
    Ok(n as u64)
}

impl PgStore {
    fn policy_from(&self, pool: &Pool, version: Option<u64>) -> Result<Option<Bundle>, StoreError> {
        let row = self.block(async {
            let c = pool.get().await.map_err(pool_error)?;
            Ok::<_, StoreError>(match version {
                Some(v) => {
                    c.query_opt(
                        "SELECT version, revision, pushed_at, pushed_by, files, signing FROM policy WHERE version = $1",
                        &[&(v as i64)],
                    )
                    .await?
                }
                None => {
                    c.query_opt(
                        "SELECT version, revision, pushed_at, pushed_by, files, signing FROM policy ORDER BY version DESC LIMIT 1",
                        &[],
                    )
                    .await?
                }
            })
        })?;
        row.map(|r| {
            bundle_of(
                r.get::<_, i64>(0) as u64,
                r.get(1),
                r.get(2),
                r.get(3),
                r.get::<_, &str>(4),
                r.get(5),
            )
        })
        .transpose()
    }

    fn revocations_from(&self, pool: &Pool) -> Result<(u64, Vec<Revocation>), StoreError> {
        let all: Vec<Revocation> = self.block(async {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    "SELECT identity, generation, at, by, reason FROM revocations ORDER BY generation",
                    &[],
                )
                .await?;
            Ok::<_, StoreError>(
                rows.iter()
                    .map(|r| Revocation {
                        identity: r.get(0),
                        generation: r.get::<_, i64>(1) as u64,
                        at: r.get(2),
                        by: r.get(3),
                        reason: r.get(4),
                    })
                    .collect(),
            )
        })?;
        Ok((all.last().map_or(0, |r| r.generation), all))
    }
}

/// A pooled connection that is closed when dropped instead of going back to the pool.
struct Discarded(Option<deadpool_postgres::Object>);

impl Discarded {
    fn get(&mut self) -> &mut deadpool_postgres::Object {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for Discarded {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            drop(deadpool_postgres::Object::take(o));
        }
    }
}

/// The pools (reports and reads; control), and the task that listens for changes (it
/// ticks `tx`).
fn start<T>(
    rt: &tokio::runtime::Runtime,
    config: Config,
    tls: T,
    tx: tokio::sync::watch::Sender<u64>,
) -> Result<(Pool, Pool), deadpool_postgres::BuildError>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let build = |manager, size| {
        Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
    };
    let pool = build(manager, POOL_SIZE)?;
    let control = build(
        Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        ),
        CONTROL_POOL_SIZE,
    )?;
    rt.spawn(listen(config, tls, tx));
    Ok((pool, control))
}

/// Listens on [`CHANNEL`] over a connection of its own, for as long as anyone watches `tx`;
/// reconnects when the connection is lost. Ticks on each notification, and once each time
/// listening (re)starts: what was announced while no one listened is then read from the
/// tables.
async fn listen<T>(config: Config, tls: T, tx: tokio::sync::watch::Sender<u64>)
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let mut lost = false;
    while !tx.is_closed() {
        match config.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (note, mut notes) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => {
                                if note.send(()).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                warn!(error = %describe(&e), "database: the connection listening for changes failed");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        if lost {
                            info!("database: listening for changes again");
                        }
                        tx.send_modify(|n| *n += 1);
                        while notes.recv().await.is_some() {
                            tx.send_modify(|n| *n += 1);
                        }
                    }
                    Err(e) => {
                        warn!(error = %describe(&e), "database: LISTEN failed");
                    }
                }
                driver.abort();
            }
            Err(e) => {
                warn!(error = %describe(&e), "database: cannot connect to listen for changes; retrying");
            }
        }
        lost = true;
        // Whatever was announced meanwhile is read once listening is back; a replica
        // serves what it has until then.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn issuance_row(r: &tokio_postgres::Row) -> Issuance {
    Issuance {
        serial: r.get(0),
        identity: r.get(1),
        node: r.get(2),
        kind: r.get(3),
        token: r.get(4),
        issued: r.get(5),
        not_after: r.get(6),
        renewed_into: r.get(7),
    }
}

/// Text PostgreSQL can hold: it refuses NUL in text, which JSON may carry escaped in a
/// field that is indexed (the record's own text keeps the escape).
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn opt_text<S: AsRef<str>>(s: &Option<S>) -> Option<String> {
    s.as_ref().map(|s| text(s.as_ref()))
}

fn values(args: Vec<Arg>) -> Vec<Box<dyn ToSql + Sync + Send>> {
    args.into_iter()
        .map(|a| -> Box<dyn ToSql + Sync + Send> {
            match a {
                Arg::Text(t) => Box::new(text(&t)),
                Arg::Int(i) => Box::new(i),
            }
        })
        .collect()
}

fn proposal_row(r: &tokio_postgres::Row) -> super::ProposalRow {
    (
        r.get::<_, i64>(0) as u64,
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get::<_, Option<i64>>(6).map(|v| v as u64),
    )
}

/// Inserts the next bundle version in `tx` (which holds the policy lock), numbered above
/// the newest and `above`, and tells the replicas.
async fn insert_bundle(
    tx: &tokio_postgres::Transaction<'_>,
    revision: &str,
    files_text: &str,
    by: &str,
    at: &str,
    above: i64,
    signing: &Signing,
) -> Result<u64, StoreError> {
    let signing = signing_text(signing);
    let v: i64 = tx
        .query_one(
            "INSERT INTO policy (version, revision, pushed_at, pushed_by, files, signing)
             SELECT GREATEST(COALESCE(MAX(version), 0), $5) + 1, $1, $2, $3, $4, $6 FROM policy
             RETURNING version",
            &[&revision, &at, &by, &files_text, &above, &signing],
        )
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, 'policy')", &[&CHANNEL])
        .await?;
    Ok(v as u64)
}

impl Store for PgStore {
    fn lineage(&self) -> Result<Option<String>, StoreError> {
        self.block(async {
            let c = self.control_client().await?;
            let kept = "SELECT id FROM agentwall_lineage";
            if let Some(r) = c.query_opt(kept, &[]).await? {
                return Ok(Some(r.get(0)));
            }
            let Some(r) = c.query_opt(super::FIRST_CHANGE, &[]).await? else {
                return Ok(None);
            };
            let id = super::lineage_of(r.get(0), r.get(1), r.get(2), r.get(3));
            // The first replica to see a change writes it; every other reads that one.
            c.execute(
                "INSERT INTO agentwall_lineage (one, id) VALUES (1, $1) ON CONFLICT DO NOTHING",
                &[&id],
            )
            .await?;
            Ok(c.query_opt(kept, &[]).await?.map(|r| r.get(0)))
        })
    }

    fn spend_shared(&self, node: &str, spend: &[super::Spend]) -> Result<Option<u64>, StoreError> {
        let node = text(node);
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let kinds: Vec<&str> = spend.iter().map(|s| s.kind).collect();
            tx.execute(
                "INSERT INTO report_quota (node, kind, tat) SELECT $1, k, 0 FROM UNNEST($2::text[]) AS k
                 ON CONFLICT DO NOTHING",
                &[&node, &kinds],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT kind, tat, extract(epoch FROM clock_timestamp())::float8 FROM report_quota
                     WHERE node = $1 AND kind = ANY($2) ORDER BY kind FOR UPDATE",
                    &[&node, &kinds],
                )
                .await?;
            let mut next = Vec::with_capacity(spend.len());
            let mut wait = 0f64;
            for r in &rows {
                let (kind, tat, now): (&str, f64, f64) = (r.get(0), r.get(1), r.get(2));
                let Some(s) = spend.iter().find(|s| s.kind == kind) else {
                    continue;
                };
                match s.at(tat, now) {
                    Ok(t) => next.push((kind.to_owned(), t)),
                    Err(late) => wait = wait.max(late),
                }
            }
            if wait > 0.0 {
                tx.rollback().await?;
                return Ok(Some(wait.ceil() as u64));
            }
            for (kind, t) in &next {
                tx.execute(
                    "UPDATE report_quota SET tat = $3 WHERE node = $1 AND kind = $2",
                    &[&node, kind, t],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(None)
        })
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
        let files_text = serde_json::to_string(files).expect("files serialize");
        let at = now();
        let above = number(above)?;
        let version: u64 = self.block(async {
            let mut c = self.control_client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCKS, &POLICY_LOCK],
            )
            .await?;
            if let Some(base) = base {
                let newest: i64 = tx
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM policy", &[])
                    .await?
                    .get(0);
                if newest as u64 != base {
                    return Err(StoreError::NotNewest {
                        base,
                        newest: newest as u64,
                    });
                }
            }
            let v = insert_bundle(&tx, revision, &files_text, by, &at, above, signing).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(v)
        })?;
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
        let files_text = serde_json::to_string(files).expect("files serialize");
        let at = now();
        let signing_stored = signing_text(signing).unwrap_or_default();
        let id: i64 = self.block(async {
            let mut c = self.control_client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCKS, &POLICY_LOCK],
            )
            .await?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO proposals (id, revision, pushed_at, pushed_by, files, signing)
                     SELECT COALESCE(MAX(id), 0) + 1, $1, $2, $3, $4, $5 FROM proposals
                     RETURNING id",
                    &[&revision, &at, &by, &files_text, &signing_stored],
                )
                .await?
                .get(0);
            tx.commit().await?;
            Ok::<_, StoreError>(id)
        })?;
        Ok(Proposal {
            id: id as u64,
            revision: revision.to_owned(),
            pushed_at: at,
            pushed_by: by.to_owned(),
            signing: signing.clone(),
            version: None,
            files: files.to_vec(),
        })
    }

    fn proposals(&self) -> Result<Vec<Proposal>, StoreError> {
        let rows = self.block(async {
            let c = self.client().await?;
            Ok::<_, StoreError>(
                c.query(
                    "SELECT id, revision, pushed_at, pushed_by, '[]', signing, version FROM proposals
                     ORDER BY id DESC LIMIT 1000",
                    &[],
                )
                .await?,
            )
        })?;
        rows.iter().map(|r| proposal_of(proposal_row(r))).collect()
    }

    fn proposal(&self, id: u64) -> Result<Option<Proposal>, StoreError> {
        // No number past i64 was ever given to a proposal.
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let row = self.block(async {
            let c = self.client().await?;
            Ok::<_, StoreError>(
                c.query_opt(
                    "SELECT id, revision, pushed_at, pushed_by, files, signing, version FROM proposals
                     WHERE id = $1",
                    &[&id],
                )
                .await?,
            )
        })?;
        row.map(|r| proposal_of(proposal_row(&r))).transpose()
    }

    fn approve(
        &self,
        id: u64,
        signature: &BundleSignature,
        required: usize,
        above: u64,
    ) -> Result<(Proposal, Option<Bundle>), StoreError> {
        let above = number(above)?;
        let Ok(id) = i64::try_from(id) else {
            return Err(StoreError::NoProposal(id));
        };
        self.block(async {
            let mut c = self.control_client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCKS, &POLICY_LOCK],
            )
            .await?;
            let row = tx
                .query_opt(
                    "SELECT id, revision, pushed_at, pushed_by, files, signing, version FROM proposals
                     WHERE id = $1",
                    &[&id],
                )
                .await?
                .ok_or(StoreError::NoProposal(id as u64))?;
            let mut p = proposal_of(proposal_row(&row))?;
            let bundle = if add_approval(&mut p, signature, required)? {
                let files_text = serde_json::to_string(&p.files).expect("files serialize");
                let at = now();
                let version = insert_bundle(
                    &tx,
                    &p.revision,
                    &files_text,
                    &p.pushed_by,
                    &at,
                    above,
                    &p.signing,
                )
                .await?;
                Some(published(&mut p, version, at))
            } else {
                None
            };
            tx.execute(
                "UPDATE proposals SET signing = $2, version = $3 WHERE id = $1",
                &[
                    &id,
                    &signing_text(&p.signing).unwrap_or_default(),
                    &p.version.map(|v| v as i64),
                ],
            )
            .await?;
            tx.commit().await?;
            Ok((p, bundle))
        })
    }

    fn policy_versions(&self) -> Result<Vec<BundleInfo>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query(
                "SELECT version, revision, pushed_at, pushed_by FROM policy ORDER BY version DESC",
                &[],
            )
            .await?
            .iter()
            .map(|r| BundleInfo {
                version: r.get::<_, i64>(0) as u64,
                revision: r.get(1),
                pushed_at: r.get(2),
                pushed_by: r.get(3),
            })
            .collect())
        })
    }

    fn policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError> {
        self.policy_from(&self.pool, version)
    }

    fn fresh_policy(&self, version: Option<u64>) -> Result<Option<Bundle>, StoreError> {
        self.policy_from(&self.control, version)
    }

    fn revocations(&self) -> Result<(u64, Vec<Revocation>), StoreError> {
        self.revocations_from(&self.pool)
    }

    fn console_open(&self, session: &ConsoleSession) -> Result<(), StoreError> {
        let s = session.clone();
        let credential = text(&s.credential);
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "DELETE FROM console_sessions WHERE expires <= $1",
                &[&now()],
            )
            .await?;
            tx.execute(
                "INSERT INTO console_sessions (id_sha256, credential, chain, csrf, created, expires)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &s.id_sha256,
                    &credential,
                    &s.chain,
                    &s.csrf,
                    &s.created,
                    &s.expires,
                ],
            )
            .await?;
            tx.execute(
                "DELETE FROM console_sessions WHERE credential = $1 AND id_sha256 NOT IN
                 (SELECT id_sha256 FROM console_sessions WHERE credential = $1
                  ORDER BY created DESC, id_sha256 LIMIT $2)",
                &[&credential, &super::CONSOLE_SESSIONS_PER_CREDENTIAL],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn forward_claim(
        &self,
        name: &str,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        let (name, holder) = (text(name), text(holder));
        let secs = lease.as_secs_f64();
        self.block(async {
            let c = self.client().await?;
            // The database's clock, the one every replica shares: a replica whose own clock
            // runs ahead cannot write a lease that outlives it.
            let row = c
                .query_opt(
                    "WITH t AS (SELECT clock_timestamp() AT TIME ZONE 'UTC' AS now)
                     INSERT INTO forwarding (name, after, holder, lease_until)
                     SELECT $1, (SELECT COALESCE(MAX(id), 0) FROM flows), $2,
                            to_char(t.now + make_interval(secs => $3), 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                     FROM t
                     ON CONFLICT (name) DO UPDATE SET holder = $2, lease_until = EXCLUDED.lease_until
                     WHERE forwarding.holder = $2
                        OR forwarding.lease_until <= to_char((SELECT now FROM t), 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                        OR forwarding.lease_until
                           > to_char((SELECT now FROM t) + make_interval(secs => 2 * $3), 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                     RETURNING after",
                    &[&name, &holder, &secs],
                )
                .await?;
            Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
        })
    }

    fn forward_behind(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let name = text(name);
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT (SELECT COALESCE(MAX(id), 0) FROM flows) - after FROM forwarding
                     WHERE name = $1",
                    &[&name],
                )
                .await?;
            Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
        })
    }

    fn baseline(&self, keys: &[(String, String)]) -> Result<super::Baseline, StoreError> {
        let (subjects, whats): (Vec<String>, Vec<String>) =
            keys.iter().map(|(s, w)| (text(s), text(w))).unzip();
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT a.subject, a.what, a.first FROM alert_seen a
                     JOIN UNNEST($1::text[], $2::text[]) AS k(subject, what)
                       ON a.subject = k.subject AND a.what = k.what",
                    &[&subjects, &whats],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                .collect())
        })
    }

    fn baseline_note(
        &self,
        seen: &[(String, String, String)],
        today: &str,
    ) -> Result<(), StoreError> {
        // One row per key: ON CONFLICT cannot touch a row twice in one statement.
        let mut first: std::collections::BTreeMap<(String, String), String> =
            std::collections::BTreeMap::new();
        for (s, w, t) in seen {
            let t = text(t);
            let e = first.entry((text(s), text(w))).or_insert_with(|| t.clone());
            if t < *e {
                *e = t;
            }
        }
        let (keys, times): (Vec<_>, Vec<String>) = first.into_iter().unzip();
        let (subjects, whats): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
        let today = text(today);
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO alert_seen (subject, what, first, last)
                 SELECT s, w, t, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(s, w, t)
                 ON CONFLICT (subject, what) DO UPDATE SET
                    first = LEAST(alert_seen.first, EXCLUDED.first),
                    last = GREATEST(COALESCE(alert_seen.last, ''), EXCLUDED.last)",
                &[&subjects, &whats, &times, &today],
            )
            .await?;
            Ok(())
        })
    }

    fn forward_advance(&self, name: &str, holder: &str, after: u64) -> Result<bool, StoreError> {
        let (name, holder) = (text(name), text(holder));
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE forwarding SET after = GREATEST(after, $3) WHERE name = $1 AND holder = $2",
                    &[&name, &holder, &(after as i64)],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn console_link_open(&self, link: &ConsoleLink) -> Result<(), StoreError> {
        let l = link.clone();
        let credential = text(&l.credential);
        self.block(async {
            let c = self.client().await?;
            c.execute("DELETE FROM console_links WHERE expires <= $1", &[&now()])
                .await?;
            c.execute(
                "INSERT INTO console_links (code_sha256, credential, chain, expires)
                 VALUES ($1, $2, $3, $4)",
                &[&l.code_sha256, &credential, &l.chain, &l.expires],
            )
            .await?;
            Ok(())
        })
    }

    fn console_link_take(&self, code_sha256: &str) -> Result<Option<ConsoleLink>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt(
                "DELETE FROM console_links WHERE code_sha256 = $1 AND expires > $2
                 RETURNING code_sha256, credential, chain, expires",
                &[&code_sha256, &now()],
            )
            .await?
            .map(|r| ConsoleLink {
                code_sha256: r.get(0),
                credential: r.get(1),
                chain: r.get(2),
                expires: r.get(3),
            }))
        })
    }

    fn token_create(&self, t: &JoinToken) -> Result<(), StoreError> {
        let t = t.clone();
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM join_tokens WHERE expires <= $1 AND NOT cancelled",
                &[&super::days_ago(1)],
            )
            .await?;
            c.execute(
                "INSERT INTO join_tokens (id, sha256, identity, expires, uses_left, created_by, created)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &t.id,
                    &t.sha256,
                    &text(&t.identity),
                    &t.expires,
                    &i64::from(t.uses_left),
                    &text(&t.created_by),
                    &t.created,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT id, identity, expires, uses_left, created_by, created, cancelled
                     FROM join_tokens WHERE expires > $1 ORDER BY created DESC, id LIMIT 1000",
                    &[&super::days_ago(1)],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| JoinToken {
                    id: r.get(0),
                    sha256: String::new(),
                    identity: r.get(1),
                    expires: r.get(2),
                    uses_left: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                    created_by: r.get(4),
                    created: r.get(5),
                    cancelled: r.get(6),
                })
                .collect())
        })
    }

    fn token_cancel(&self, id: &str) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE join_tokens SET cancelled = true WHERE id = $1 AND NOT cancelled",
                    &[&id],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn token_spend(&self, sha256: &str) -> Result<Option<JoinToken>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt(
                "UPDATE join_tokens SET uses_left = uses_left - 1
                 WHERE sha256 = $1 AND uses_left > 0 AND NOT cancelled AND expires > $2
                 RETURNING id, identity, expires, uses_left, created_by, created",
                &[&sha256, &now()],
            )
            .await?
            .map(|r| JoinToken {
                id: r.get(0),
                sha256: sha256.to_owned(),
                identity: r.get(1),
                expires: r.get(2),
                uses_left: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                created_by: r.get(4),
                created: r.get(5),
                cancelled: false,
            }))
        })
    }

    fn token_identity(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt(
                "SELECT identity FROM join_tokens
                 WHERE sha256 = $1 AND uses_left > 0 AND NOT cancelled AND expires > $2",
                &[&sha256, &now()],
            )
            .await?
            .map(|r| r.get(0)))
        })
    }

    fn token_cancelled(&self, id: &str) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(
                c.query_opt("SELECT cancelled FROM join_tokens WHERE id = $1", &[&id])
                    .await?
                    .is_some_and(|r| r.get::<_, bool>(0)),
            )
        })
    }

    fn renewed(&self, serial: &str, chain: &str) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE issuances SET renewed_into = $2
                     WHERE serial = $1 AND renewed_into IS NULL",
                    &[&serial, &chain],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn issued(&self, i: &Issuance) -> Result<(), StoreError> {
        let i = i.clone();
        let cutoff = super::days_ago(self.retention.days);
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM issuances WHERE serial IN
                 (SELECT serial FROM issuances WHERE not_after < $1 LIMIT 100)",
                &[&cutoff],
            )
            .await?;
            c.execute(
                "INSERT INTO issuances (serial, identity, node, kind, token, issued, not_after)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &i.serial,
                    &text(&i.identity),
                    &text(&i.node),
                    &i.kind,
                    &i.token,
                    &i.issued,
                    &i.not_after,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn issuance(&self, serial: &str) -> Result<Option<Issuance>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt(
                "SELECT serial, identity, node, kind, token, issued, not_after, renewed_into
                 FROM issuances WHERE serial = $1",
                &[&serial],
            )
            .await?
            .map(|r| issuance_row(&r)))
        })
    }

    fn issuances(&self, limit: usize) -> Result<Vec<Issuance>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT serial, identity, node, kind, token, issued, not_after,
                            NULL::TEXT
                     FROM issuances ORDER BY issued DESC, serial LIMIT $1",
                    &[&(limit as i64)],
                )
                .await?;
            Ok(rows.iter().map(issuance_row).collect())
        })
    }

    fn console_close_all(&self, credential: Option<&str>) -> Result<u64, StoreError> {
        let credential = credential.map(text);
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let mut ended = 0;
            for table in ["console_sessions", "console_links"] {
                let n = match &credential {
                    None => tx.execute(&format!("DELETE FROM {table}"), &[]).await?,
                    Some(p) => {
                        tx.execute(
                            &format!(
                                "DELETE FROM {table} WHERE credential = $1
                                 OR (left($1, 6) = 'token:' AND left(credential, length($1)) = $1)"
                            ),
                            &[p],
                        )
                        .await?
                    }
                };
                if table == "console_sessions" {
                    ended = n;
                }
            }
            tx.commit().await?;
            Ok(ended)
        })
    }

    fn console_session(&self, id_sha256: &str) -> Result<Option<ConsoleSession>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt(
                "SELECT id_sha256, credential, chain, csrf, created, expires
                 FROM console_sessions WHERE id_sha256 = $1 AND expires > $2",
                &[&id_sha256, &now()],
            )
            .await?
            .map(|r| ConsoleSession {
                id_sha256: r.get(0),
                credential: r.get(1),
                chain: r.get(2),
                csrf: r.get(3),
                created: r.get(4),
                expires: r.get(5),
            }))
        })
    }

    fn console_close(&self, id_sha256: &str) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.execute(
                "DELETE FROM console_sessions WHERE id_sha256 = $1",
                &[&id_sha256],
            )
            .await?
                == 1)
        })
    }

    fn fresh_revocations(&self) -> Result<(u64, Vec<Revocation>), StoreError> {
        self.revocations_from(&self.control)
    }
    fn revision_of(&self, version: u64) -> Result<Option<String>, StoreError> {
        let version = number(version)?;
        self.block(async {
            let c = self.control_client().await?;
            Ok(c.query_opt(
                "SELECT revision FROM policy WHERE version = $1",
                &[&version],
            )
            .await?
            .map(|r| r.get(0)))
        })
    }

    fn heads(&self) -> Result<(u64, u64), StoreError> {
        self.block(async {
            let c = self.control_client().await?;
            let r = c
                .query_one(
                    "SELECT (SELECT COALESCE(MAX(version), 0) FROM policy),
                            (SELECT COALESCE(MAX(generation), 0) FROM revocations)",
                    &[],
                )
                .await?;
            Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
        })
    }

    fn nodes_seen(&self, seen: &[NodeSeen]) -> Result<(), StoreError> {
        // In one order on every replica, so two flushes that touch the same nodes wait for
        // each other rather than deadlock.
        let mut seen: Vec<&NodeSeen> = seen.iter().collect();
        seen.sort_by(|a, b| a.node.cmp(&b.node));
        let node: Vec<String> = seen.iter().map(|s| text(&s.node)).collect();
        let version: Vec<Option<i64>> = seen
            .iter()
            .map(|s| s.poll.applied_version.map(|v| v as i64))
            .collect();
        let revision: Vec<Option<String>> = seen
            .iter()
            .map(|s| opt_text(&s.poll.applied_revision))
            .collect();
        let agent: Vec<Option<String>> = seen
            .iter()
            .map(|s| Some(text(&s.poll.agent_version)))
            .collect();
        let error: Vec<Option<String>> = seen.iter().map(|s| opt_text(&s.poll.error)).collect();
        let owner: Vec<Option<String>> = seen
            .iter()
            .map(|s| s.poll.owner.as_ref().map(|o| text(o.as_str())))
            .collect();
        let labels: Vec<Option<String>> = seen
            .iter()
            .map(|s| super::labels_text(&s.poll.labels))
            .collect();
        let spooled: Vec<Option<i64>> = seen
            .iter()
            .map(|s| s.poll.spool_records.map(super::clamp_i64))
            .collect();
        let lost: Vec<Option<i64>> = seen
            .iter()
            .map(|s| s.poll.records_lost.map(super::clamp_i64))
            .collect();
        let sessions: Vec<Option<String>> = seen
            .iter()
            .map(|s| super::sessions_text(&s.poll.sessions))
            .collect();
        self.block(async {
            let c = self.client().await?;
            // Times by the database's clock, not each replica's: a replica whose clock is
            // ahead must not make a node look alive, nor hide a later note.
            c.execute(
                "INSERT INTO nodes (node, first_seen, last_seen, applied_version, applied_revision, agent_version, error, owner, labels,
                         spool_records, records_lost, sessions)
                 SELECT n, t.now, t.now, v, r, a, e, o, l, sp, lo, se
                 FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::text[])
                     WITH ORDINALITY AS u(n, v, r, a, e, o, l, sp, lo, se, i),
                     (SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC',
                         'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS now) AS t
                 ORDER BY i
                 ON CONFLICT (node) DO UPDATE SET last_seen = EXCLUDED.last_seen,
                     applied_version = EXCLUDED.applied_version,
                     applied_revision = EXCLUDED.applied_revision,
                     agent_version = EXCLUDED.agent_version, error = EXCLUDED.error,
                     owner = EXCLUDED.owner, labels = EXCLUDED.labels,
                     spool_records = EXCLUDED.spool_records, records_lost = EXCLUDED.records_lost,
                     sessions = EXCLUDED.sessions",
                &[
                    &node, &version, &revision, &agent, &error, &owner, &labels, &spooled, &lost,
                    &sessions,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT node, first_seen, last_seen, applied_version, applied_revision, agent_version, error,
                         owner, labels, spool_records, records_lost, sessions
                     FROM nodes ORDER BY node",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    super::described(
                        NodeInfo {
                            node: r.get(0),
                            first_seen: r.get(1),
                            last_seen: r.get(2),
                            applied_version: r.get::<_, Option<i64>>(3).map(|v| v as u64),
                            applied_revision: r.get(4),
                            agent_version: r.get(5),
                            error: r.get(6),
                            owner: None,
                            labels: Default::default(),
                            spool_records: r
                                .get::<_, Option<i64>>(9)
                                .map(|v| v.max(0) as u64),
                            records_lost: r
                                .get::<_, Option<i64>>(10)
                                .map(|v| v.max(0) as u64),
                            sessions: super::sessions_of(r.get::<_, Option<String>>(11).as_deref()),
                        },
                        r.get(7),
                        r.get(8),
                    )
                })
                .collect::<Vec<_>>())
        })
    }

    fn ingest(&self, node: &str, epoch: u64, records: &[Reported]) -> Result<Ingested, StoreError> {
        let today = super::today();
        let mut rows = Vec::with_capacity(records.len());
        for r in records {
            if let Some(row) = Row::of(epoch, r, today, &self.retention)? {
                rows.push(row);
            }
        }
        let expired = (records.len() - rows.len()) as u64;
        if rows.is_empty() {
            return Ok(Ingested {
                expired,
                ..Ingested::default()
            });
        }
        let days: std::collections::BTreeSet<String> = rows.iter().map(|r| r.day.clone()).collect();
        // One statement over arrays: the whole batch in one round trip and one transaction.
        let rid: Vec<i64> = rows.iter().map(|r| r.rid).collect();
        let kind: Vec<String> = rows.iter().map(|r| text(&r.kind)).collect();
        let time: Vec<String> = rows.iter().map(|r| text(&r.time)).collect();
        let verdict: Vec<Option<String>> = rows.iter().map(|r| opt_text(&r.verdict)).collect();
        let identity: Vec<Option<String>> = rows.iter().map(|r| opt_text(&r.identity)).collect();
        let dest: Vec<Option<String>> = rows.iter().map(|r| r.dest.clone()).collect();
        let service: Vec<Option<String>> = rows.iter().map(|r| opt_text(&r.service)).collect();
        let record: Vec<&str> = rows.iter().map(|r| r.text).collect();
        let seq: Vec<Option<i64>> = rows.iter().map(|r| r.audit_seq).collect();
        let hash: Vec<Option<String>> = rows.iter().map(|r| opt_text(&r.audit_hash)).collect();
        let day: Vec<&str> = rows.iter().map(|r| r.day.as_str()).collect();
        let owner: Vec<Option<String>> = rows.iter().map(|r| opt_text(&r.owner)).collect();
        let (node, epoch) = (text(node), epoch as i64);
        let accepted = self.block(async {
            let mut c = self.client().await?;
            self.partitions_for(&mut c, &days, false).await?;
            let st = c
                .prepare_cached(
                    "INSERT INTO flows (node, epoch, rid, kind, time, verdict, identity, dest, service, record, audit_seq, audit_hash, day, owner)
                     SELECT $1, $2, rid, kind, time, verdict, identity, dest, service, record, seq, hash, day::date, owner
                     FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                                 $9::text[], $10::text[], $11::bigint[], $12::text[], $13::text[], $14::text[])
                         WITH ORDINALITY AS u(rid, kind, time, verdict, identity, dest, service, record, seq, hash, day, owner, i)
                     ORDER BY i
                     ON CONFLICT DO NOTHING
                     RETURNING day::text, octet_length(record)::bigint + 512",
                )
                .await?;
            let params: [&(dyn ToSql + Sync); 14] = [
                &node, &epoch, &rid, &kind, &time, &verdict, &identity, &dest, &service, &record,
                &seq, &hash, &day, &owner,
            ];
            let insert = async |c: &mut deadpool_postgres::Object| {
                let tx = c.transaction().await?;
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    &[&LOCKS, &INGEST_LOCK],
                )
                .await?;
                let stored = tx.query(&st, &params).await?;
                let mut by_day: std::collections::BTreeMap<String, i64> =
                    std::collections::BTreeMap::new();
                for r in &stored {
                    *by_day.entry(r.get(0)).or_default() += r.get::<_, i64>(1);
                }
                let (days, bytes): (Vec<String>, Vec<i64>) = by_day.into_iter().unzip();
                tx.execute(
                    "INSERT INTO record_bytes (node, day, bytes)
                     SELECT $1, d::date, b FROM UNNEST($2::text[], $3::bigint[]) AS u(d, b)
                     ON CONFLICT (node, day) DO UPDATE SET bytes = record_bytes.bytes + EXCLUDED.bytes",
                    &[&node, &days, &bytes],
                )
                .await?;
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(stored.len() as u64)
            };
            match insert(&mut c).await {
                Ok(n) => Ok::<_, StoreError>(n),
                // A partition another replica's retention dropped (their clocks differ):
                // made again, once.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) => {
                    self.partitions_for(&mut c, &days, true).await?;
                    insert(&mut c).await.map_err(refused_record)
                }
                Err(e) => Err(refused_record(e)),
            }
        })?;
        Ok(Ingested {
            accepted,
            duplicates: rows.len() as u64 - accepted,
            expired,
        })
    }

    fn retain(&self, today: time::Date) -> Result<super::Retained, StoreError> {
        let first = today
            .checked_sub(time::Duration::days(i64::from(self.retention.days)))
            .unwrap_or(time::Date::MIN);
        self.block_for(RETAIN_TIMEOUT, async {
            // A connection of this pass alone, closed at its end however it ends (a
            // timeout included): the session lock below and anything a statement cut short
            // held go with it, never back to the pool.
            let mut c = Discarded(Some(self.client().await?));
            let mut out = super::Retained::default();
            // Today's and the next two days' partitions ahead of the reports that need
            // them, so the report path makes none in the normal course.
            let ahead: std::collections::BTreeSet<String> =
                std::iter::successors(Some(today), |d| d.next_day())
                    .take(3)
                    .map(super::day_text)
                    .collect();
            self.partitions_for(c.get(), &ahead, false).await?;
            // One replica at a time; the others find nothing left to do.
            let locked: bool = c
                .get()
                .query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LOCKS, &RETAIN_LOCK],
                )
                .await?
                .get(0);
            if !locked {
                out.skipped = true;
                return Ok(out);
            }
            let c = c.get();
            // The database waits for readers older than a partition it detaches, however
            // long they take: this pass runs off the request path.
            c.batch_execute("SET statement_timeout = 0").await?;
            // Tables a pass cut short detached and did not drop.
            for name in self.orphans(c).await? {
                let n = self.drop_table(c, &name).await?;
                if partition_day(&name).is_some_and(|d| d < first) {
                    out.expired += n;
                } else {
                    out.over_size += n;
                }
            }
            let all = self.partitions(c).await?;
            for (name, _) in all.iter().filter(|(_, d)| *d < first) {
                out.expired += self.drop_partition(c, name).await?;
            }
            // Counts of days no partition holds (a table dropped by hand, say) count for
            // nothing: left, they would have eviction empty a node of what it does hold.
            let held: Vec<String> = self
                .partitions(c)
                .await?
                .into_iter()
                .map(|(_, d)| super::day_text(d))
                .collect();
            c.execute(
                "DELETE FROM record_bytes WHERE day::text <> ALL($1::text[])",
                &[&held],
            )
            .await?;
            c.execute(
                "DELETE FROM alert_seen WHERE last < $1",
                &[&super::day_text(first)],
            )
            .await?;
            if let Some(max) = self.retention.max_bytes {
                loop {
                    let held: Vec<(String, u64)> = c
                        .query(
                            "SELECT node, SUM(bytes)::bigint FROM record_bytes GROUP BY node",
                            &[],
                        )
                        .await?
                        .iter()
                        .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64))
                        .collect();
                    let Some((node, bytes)) = super::evict_next(&held, max) else {
                        break;
                    };
                    out.over_size += evict(c, node, bytes).await?;
                }
            }
            Ok(out)
        })
    }

    fn explain_flows(&self, q: &FlowQuery) -> Result<String, StoreError> {
        let (sql, args, _) = super::flows_sql(q, |n| format!("${n}"));
        let args = values(args);
        let rows = self.block(async {
            let c = self.client().await?;
            let params: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|a| a.as_ref() as &(dyn ToSql + Sync))
                .collect();
            Ok::<_, StoreError>(c.query(&format!("EXPLAIN {sql}"), &params).await?)
        })?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    fn flows(&self, q: &FlowQuery) -> Result<FlowPage, StoreError> {
        let (sql, args, limit) = super::flows_sql(q, |n| format!("${n}"));
        let args = values(args);
        self.block(async {
            let mut c = self.client().await?;
            let params: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|a| a.as_ref() as &(dyn ToSql + Sync))
                .collect();
            // Through a portal, so a page of large records stops at its byte budget
            // without the rest crossing the wire.
            let tx = c.build_transaction().read_only(true).start().await?;
            let portal = tx.bind(&sql, &params).await?;
            let mut page = super::Pager::new(limit);
            let mut bad = None;
            walk(&tx, &portal, |r| {
                match page.push(r.get::<_, i64>(0), r.get(1), r.get(2)) {
                    Ok(more) => more,
                    Err(e) => {
                        bad = Some(e);
                        false
                    }
                }
            })
            .await?;
            tx.commit().await?;
            match bad {
                Some(e) => Err(e),
                None => Ok(page.finish()),
            }
        })
    }

    fn revoke(
        &self,
        identity: &str,
        by: &str,
        reason: Option<&str>,
        above: u64,
    ) -> Result<u64, StoreError> {
        let (identity, at, reason) = (text(identity), now(), reason.map(text));
        let above = number(above)?;
        self.block(async {
            let mut c = self.control_client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCKS, &REVOKE_LOCK],
            )
            .await?;
            let added = tx
                .execute(
                    "INSERT INTO revocations (generation, identity, at, by, reason)
                     SELECT GREATEST(COALESCE(MAX(generation), 0), $4) + 1, $1, $2, $3, $5 FROM revocations
                     ON CONFLICT (identity) DO NOTHING",
                    &[&identity, &at, &by, &above, &reason],
                )
                .await?;
            if added == 1 {
                tx.execute("SELECT pg_notify($1, 'revocation')", &[&CHANNEL])
                    .await?;
            }
            let g: i64 = tx
                .query_one("SELECT COALESCE(MAX(generation), 0) FROM revocations", &[])
                .await?
                .get(0);
            tx.commit().await?;
            Ok(g as u64)
        })
    }
    fn audit_chain(
        &self,
        node: &str,
        check: &mut crate::control_plane::chain::ChainCheck,
    ) -> Result<bool, StoreError> {
        let node = text(node);
        self.block_for(Duration::from_secs(600), async {
            let mut c = self.client().await?;
            // One snapshot for the whole walk: records stored meanwhile are not half seen.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let known: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM nodes WHERE node = $1) OR EXISTS (SELECT 1 FROM flows WHERE node = $1)",
                    &[&node],
                )
                .await?
                .get(0);
            if !known {
                return Ok(false);
            }
            // Loss records first: the spans of seqs they name explain the gaps.
            let losses = tx
                .bind("SELECT record FROM flows WHERE node = $1 AND kind = 'loss'", &[&node])
                .await?;
            walk(&tx, &losses, |r| {
                check.loss(r.get::<_, &str>(0));
                true
            })
            .await?;
            let chained = tx
                .bind(
                    "SELECT id, record FROM flows WHERE node = $1 AND audit_seq IS NOT NULL
                     ORDER BY audit_seq, id",
                    &[&node],
                )
                .await?;
            walk(&tx, &chained, |r| {
                check.record(r.get::<_, i64>(0) as u64, r.get::<_, &str>(1));
                true
            })
            .await?;
            // Records outside the chain (loss records of the spool and the outbox are, by
            // design): the ones a chain's own loss records do not account for are suspect.
            // Since the first chained record: what an earlier version sent is not suspect.
            let unchained: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM flows WHERE node = $1 AND audit_seq IS NULL AND kind != 'loss'
                     AND id > (SELECT MIN(id) FROM flows WHERE node = $1 AND audit_seq IS NOT NULL)",
                    &[&node],
                )
                .await?
                .get(0);
            check.unchained(unchained as u64);
            tx.commit().await?;
            Ok(true)
        })
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}

/// Each row of `portal`, a page at a time: a node's whole chain is never held at once.
async fn walk(
    tx: &tokio_postgres::Transaction<'_>,
    portal: &tokio_postgres::Portal,
    mut each: impl FnMut(&tokio_postgres::Row) -> bool,
) -> Result<(), tokio_postgres::Error> {
    // Rows fetched at once: records may be `MAX_RECORD_BYTES` each.
    const CHUNK: i32 = 100;
    loop {
        let rows = tx.query_portal(portal, CHUNK).await?;
        for r in &rows {
            if !each(r) {
                return Ok(());
            }
        }
        if rows.len() < CHUNK as usize {
            return Ok(());
        }
    }
}

/// Databases of their own for tests and benchmarks, in the PostgreSQL server that
/// `AGENTWALL_TEST_POSTGRES` names (`cargo xtask test` starts one and sets it).
#[cfg(any(test, feature = "testing"))]
pub mod scratch {
    use std::str::FromStr as _;

    /// The server's admin URL (`postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres`).
    pub const SERVER: &str = "AGENTWALL_TEST_POSTGRES";
    /// The CA (PEM) the server's certificate chains to; the server takes TLS.
    pub const SERVER_CA: &str = "AGENTWALL_TEST_POSTGRES_CA";

    /// A database made for one test, dropped with this (connections to it closed first).
    pub struct ScratchDb {
        /// The database's URL, with the admin's password in it.
        pub url: String,
        pub name: String,
        admin: String,
    }

    /// The admin URL; a missing server is a loud failure, never a skip.
    pub fn server() -> String {
        std::env::var(SERVER).unwrap_or_else(|_| {
            panic!(
                "{SERVER} is not set: the PostgreSQL tests need the server `cargo xtask test` starts (or set {SERVER} to a postgres:// admin URL)"
            )
        })
    }

    pub fn server_ca() -> std::path::PathBuf {
        std::env::var_os(SERVER_CA)
            .unwrap_or_else(|| panic!("{SERVER_CA} is not set (see {SERVER})"))
            .into()
    }

    /// Runs `sql` on the server as its admin, from a thread of its own (callers may be on
    /// an async runtime, where blocking on another is not allowed).
    pub fn admin(url: &str, sql: &str) -> Result<(), String> {
        let (url, sql) = (url.to_owned(), sql.to_owned());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let config = tokio_postgres::Config::from_str(&url).map_err(|e| e.to_string())?;
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
                    format!(
                        "connecting to {}: {}",
                        crate::config::control_plane::redact_url(&url),
                        super::describe(&e)
                    )
                })?;
                tokio::spawn(conn);
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| format!("{sql}: {}", super::describe(&e)))
            })
        })
        .join()
        .map_err(|_| "the admin thread panicked".to_owned())?
    }

    /// A session that ran `sql` and is kept open (with what it holds: a transaction, a
    /// lock) until this is dropped.
    pub struct Held(
        Option<std::sync::mpsc::Sender<()>>,
        Option<std::thread::JoinHandle<()>>,
    );

    /// Runs `sql` as the admin on a session kept open until the answer is dropped; waits
    /// until `sql` is done.
    pub fn hold(url: &str, sql: &str) -> Held {
        let (url, sql) = (url.to_owned(), sql.to_owned());
        let (done, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let config = tokio_postgres::Config::from_str(&url).expect("a URL");
                let (client, conn) = match config.connect(tokio_postgres::NoTls).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done.send(Err(super::describe(&e)));
                        return;
                    }
                };
                let driver = tokio::spawn(conn);
                let r = client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| format!("{sql}: {}", super::describe(&e)));
                let _ = done.send(r);
                let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
                drop(client);
                let _ = driver.await;
            });
        });
        ready
            .recv()
            .expect("the holding thread answers")
            .unwrap_or_else(|e| panic!("{e}"));
        Held(Some(stop), Some(thread))
    }

    impl Drop for Held {
        fn drop(&mut self) {
            drop(self.0.take());
            if let Some(t) = self.1.take() {
                let _ = t.join();
            }
        }
    }

    /// `url` with its database replaced by `db`.
    pub fn with_database(url: &str, db: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let (scheme, rest) = base.split_once("://").expect("a URL");
        let authority = rest.split('/').next().unwrap_or(rest);
        let mut out = format!("{scheme}://{authority}/{db}");
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    /// A fresh, empty database.
    pub fn database() -> ScratchDb {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let admin_url = server();
        let name = format!(
            "t_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        admin(&admin_url, &format!("CREATE DATABASE {name}")).unwrap_or_else(|e| panic!("{e}"));
        ScratchDb {
            url: with_database(&admin_url, &name),
            name,
            admin: admin_url,
        }
    }

    impl Drop for ScratchDb {
        fn drop(&mut self) {
            let dropped = admin(
                &self.admin,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            );
            if let Err(e) = dropped {
                eprintln!("scratch database {}: {e}", self.name);
            }
        }
    }
}
