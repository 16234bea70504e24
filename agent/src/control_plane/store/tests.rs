//! The stores' tests: each runs against SQLite and against a real PostgreSQL (a database of
//! its own in the server `cargo xtask test` starts).

use super::*;
use std::time::Duration;

use crate::control_plane::{BundleFile, FlowQuery, Ingested, Reported};

/// Records of fixed times (2026) stay for the tests' lifetime.
const KEEP: Retention = Retention {
    days: 3650,
    max_bytes: None,
};

/// A store and what holds its data, dropped after it.
struct Fixture {
    name: &'static str,
    store: Box<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _db: Option<scratch::ScratchDb>,
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        name: "sqlite",
        store: Box::new(SqliteStore::open(&dir.path().join("cp.db"), KEEP).unwrap()),
        _dir: Some(dir),
        _db: None,
    }
}

fn pg_options(url: &str) -> PgOptions {
    PgOptions {
        url: url.to_owned(),
        password_file: None,
        ca: None,
        retention: KEEP,
    }
}

fn postgres() -> Fixture {
    let db = scratch::database();
    Fixture {
        name: "postgres",
        store: Box::new(PgStore::open(&pg_options(&db.url)).unwrap()),
        _dir: None,
        _db: Some(db),
    }
}

fn both() -> [Fixture; 2] {
    [sqlite(), postgres()]
}

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
    for f in both() {
        let s = &*f.store;
        let batch: Vec<Reported> = (1..=5)
            .map(|i| rec(i, "deny", &format!("2026-11-23T00:00:0{i}.000Z")))
            .collect();
        assert_eq!(
            s.ingest("n1", 7, &batch).unwrap(),
            Ingested {
                accepted: 5,
                duplicates: 0,
                expired: 0
            }
        );
        assert_eq!(
            s.ingest("n1", 7, &batch[2..]).unwrap(),
            Ingested {
                accepted: 0,
                duplicates: 3,
                expired: 0
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
}

#[test]
fn a_page_of_large_records_ends_at_its_byte_budget_and_the_next_goes_on() {
    use crate::control_plane::{MAX_RECORD_BYTES, PAGE_BYTES};
    for f in both() {
        let s = &*f.store;
        // 40 records of nearly the largest size a node may send: 10 MiB in all.
        let pad = MAX_RECORD_BYTES - 200;
        let total = 40u64;
        for i in 1..=total {
            let r = at(
                i,
                "2026-11-23T00:00:00.000Z",
                "spiffe://example.org/a",
                "203.0.113.7",
                pad,
            );
            assert_eq!(s.ingest("n1", 1, &[r]).unwrap().accepted, 1);
        }
        let (mut q, mut seen, mut pages) = (
            FlowQuery {
                limit: Some(10_000),
                ..FlowQuery::default()
            },
            Vec::new(),
            0,
        );
        loop {
            let p = s.flows(&q).unwrap();
            pages += 1;
            let bytes: usize = p.flows.iter().map(|f| f.record.get().len()).sum();
            // At most one record past the budget.
            assert!(
                bytes < PAGE_BYTES + MAX_RECORD_BYTES,
                "{}: a page of {bytes} bytes",
                f.name
            );
            seen.extend(p.flows.iter().map(|f| f.id));
            match p.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        assert!(pages >= 2, "{}: one page held 10 MiB", f.name);
        assert_eq!(seen.len() as u64, total, "{}", f.name);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{}", f.name);
    }
}

#[test]
fn escaped_text_and_a_dest_that_is_no_address_are_stored() {
    for f in both() {
        let s = &*f.store;
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
}

#[test]
fn a_chained_record_sent_again_under_a_new_id_is_stored_once_and_its_chain_checked() {
    for f in both() {
        let s = &*f.store;
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
                duplicates: 1,
                expired: 0
            }
        );
        let mut check = crate::control_plane::chain::ChainCheck::new("n1");
        assert!(s.audit_chain("n1", &mut check).unwrap());
        let r = check.finish();
        assert!(r.intact && r.records == 3, "{r:?}");
        let mut nobody = crate::control_plane::chain::ChainCheck::new("n9");
        assert!(!s.audit_chain("n9", &mut nobody).unwrap());
    }
}

/// What a holder of a node's certificate might send to muddy its chain, each found.
#[test]
fn a_node_cannot_talk_its_chain_into_looking_whole() {
    use crate::control_plane::chain::ChainCheck;
    for f in both() {
        let s = &*f.store;
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
}

#[test]
fn reopening_keeps_everything_and_a_newer_schema_is_refused() {
    let files = vec![BundleFile {
        name: "a.yaml".into(),
        text: "x".into(),
    }];
    // Numbers go on from the highest stored, and above what the caller says it served (a
    // database put back to an older state): 2 → 6, and a revocation already made keeps
    // its generation.
    let fill = |s: &dyn Store| {
        assert_eq!(
            s.push_policy("r1", &files, "admin", 0, None, &Default::default())
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            s.push_policy("r2", &files, "admin", 0, None, &Default::default())
                .unwrap()
                .version,
            2
        );
        assert_eq!(
            s.push_policy("r6", &files, "admin", 5, None, &Default::default())
                .unwrap()
                .version,
            6
        );
        // Made from version 2 while 6 is the newest: refused, nothing stored.
        let e = s
            .push_policy("r7", &files, "admin", 0, Some(2), &Default::default())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "version 6 was pushed since version 2, which this push was made from; nothing was stored"
        );
        assert_eq!(s.heads().unwrap().0, 6);
        assert_eq!(
            s.push_policy("r7", &files, "admin", 0, Some(6), &Default::default())
                .unwrap()
                .version,
            7
        );
        assert_eq!(
            s.revoke("spiffe://example.org/a", "admin", None, 0)
                .unwrap(),
            1
        );
        assert_eq!(
            s.revoke("spiffe://example.org/a", "admin", None, 9)
                .unwrap(),
            1
        );
        assert_eq!(
            s.revoke("spiffe://example.org/b", "admin", None, 1)
                .unwrap(),
            2
        );
        assert_eq!(
            s.revoke("spiffe://example.org/c", "admin", None, 7)
                .unwrap(),
            8
        );
        let e = s
            .revoke("spiffe://example.org/d", "admin", None, u64::MAX)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("no number is left above {}", u64::MAX)
        );
        assert_eq!(s.heads().unwrap(), (7, 8));
        let lineage = s.lineage().unwrap().unwrap();
        assert_eq!(lineage.len(), 32, "{lineage}");
        lineage
    };
    let kept = |s: &dyn Store, lineage: &str| {
        assert_eq!(s.policy(None).unwrap().unwrap().revision, "r7");
        assert_eq!(s.policy(Some(1)).unwrap().unwrap().revision, "r1");
        assert!(s.policy(Some(3)).unwrap().is_none());
        assert_eq!(s.revocations().unwrap().0, 8);
        assert_eq!(s.heads().unwrap(), (7, 8));
        assert_eq!(s.lineage().unwrap().as_deref(), Some(lineage));
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.db");
    let lineage = fill(&SqliteStore::open(&path, KEEP).unwrap());
    kept(&SqliteStore::open(&path, KEEP).unwrap(), &lineage);
    // Another database: none until its first change, then another.
    let other = SqliteStore::open(&dir.path().join("other.db"), KEEP).unwrap();
    assert_eq!(other.lineage().unwrap(), None);
    other
        .revoke("spiffe://example.org/a", "admin", None, 0)
        .unwrap();
    let first = other.lineage().unwrap().unwrap();
    assert_ne!(first, lineage);
    // A later push does not move it: every replica, started before or after, agrees.
    other
        .push_policy("r1", &files, "admin", 0, None, &Default::default())
        .unwrap();
    assert_eq!(other.lineage().unwrap().unwrap(), first);
    // Records stored before the byte counts existed are counted by the migration.
    let s = SqliteStore::open(&path, KEEP).unwrap();
    let r = at(
        1,
        "2026-11-30T12:00:00.000Z",
        "spiffe://example.org/a",
        "203.0.113.1",
        10,
    );
    let len = charged(r.record.get());
    assert_eq!(s.ingest("n1", 1, &[r]).unwrap().accepted, 1);
    drop(s);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "DROP TABLE record_bytes; DROP TABLE lineage; ALTER TABLE nodes DROP COLUMN owner;
         ALTER TABLE nodes DROP COLUMN labels; ALTER TABLE revocations DROP COLUMN reason;
         ALTER TABLE nodes DROP COLUMN spool_records; ALTER TABLE nodes DROP COLUMN records_lost;
         ALTER TABLE nodes DROP COLUMN sessions;
         DROP TABLE console_sessions; DROP TABLE console_links; DROP TABLE forwarding; DROP TABLE alert_seen;
         DROP INDEX flows_owner_id; ALTER TABLE flows DROP COLUMN owner;
         DROP TABLE proposals; ALTER TABLE policy DROP COLUMN signing;
         DROP TABLE join_tokens; DROP TABLE issuances;
         PRAGMA user_version = 3",
    )
    .unwrap();
    drop(c);
    drop(SqliteStore::open(&path, KEEP).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    let counted: (String, String, i64) = c
        .query_row("SELECT node, day, bytes FROM record_bytes", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(counted, ("n1".into(), "2026-11-30".into(), len));
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let e = SqliteStore::open(&path, KEEP).err().unwrap().to_string();
    assert!(
        e.contains("has schema version 99; this agentwall knows up to 11"),
        "{e}"
    );

    let db = scratch::database();
    let lineage = fill(&PgStore::open(&pg_options(&db.url)).unwrap());
    kept(&PgStore::open(&pg_options(&db.url)).unwrap(), &lineage);
    let other = scratch::database();
    let other = PgStore::open(&pg_options(&other.url)).unwrap();
    assert_eq!(other.lineage().unwrap(), None);
    other
        .push_policy("r1", &files, "admin", 0, None, &Default::default())
        .unwrap();
    assert_ne!(other.lineage().unwrap().unwrap(), lineage);
    scratch::admin(&db.url, "UPDATE agentwall_schema SET version = 99").unwrap();
    let e = PgStore::open(&pg_options(&db.url))
        .err()
        .unwrap()
        .to_string();
    let shown = crate::config::control_plane::redact_url(&db.url);
    assert!(
        e.contains(&format!(
            "database {shown} has schema version 99; this agentwall knows up to 10"
        )),
        "{e}"
    );
    assert!(!e.contains(&pw(&db.url)), "{e}");
}

/// The password in a scratch URL (the admin's).
fn pw(url: &str) -> String {
    let userinfo = url.split("://").nth(1).unwrap().split('@').next().unwrap();
    userinfo.split_once(':').unwrap().1.to_owned()
}

/// Replicas starting together on an empty database migrate it once, and the changes one
/// makes are announced to the others.
#[test]
fn replicas_on_one_database_migrate_once_and_hear_each_other() {
    let db = scratch::database();
    let opened: Vec<PgStore> = std::thread::scope(|t| {
        let all: Vec<_> = (0..4)
            .map(|_| t.spawn(|| PgStore::open(&pg_options(&db.url))))
            .collect();
        all.into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let (a, b) = (&opened[0], &opened[1]);
    let mut heard = b.changes().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut wait = |past: u64| {
        rt.block_on(async {
            *tokio::time::timeout(
                std::time::Duration::from_secs(10),
                heard.wait_for(|n| *n > past),
            )
            .await
            .expect("a change heard within 10 s")
            .unwrap()
        })
    };
    // Listening has started once the first tick is there.
    let start = wait(0);
    let files = vec![BundleFile {
        name: "a.yaml".into(),
        text: "x".into(),
    }];
    assert_eq!(
        a.push_policy("r1", &files, "admin", 0, None, &Default::default())
            .unwrap()
            .version,
        1
    );
    let after_push = wait(start);
    assert_eq!(b.heads().unwrap(), (1, 0));
    assert_eq!(
        a.revoke("spiffe://example.org/a", "admin", None, 0)
            .unwrap(),
        1
    );
    wait(after_push);
    assert_eq!(b.heads().unwrap(), (1, 1));
    assert_eq!(
        b.revocations().unwrap().1[0].identity,
        "spiffe://example.org/a"
    );

    // Versions and generations given out by several replicas at once are distinct and
    // dense.
    std::thread::scope(|t| {
        for (i, s) in opened.iter().enumerate() {
            let files = &files;
            t.spawn(move || {
                for j in 0..10 {
                    s.push_policy(
                        &format!("r{i}-{j}"),
                        files,
                        "admin",
                        0,
                        None,
                        &Default::default(),
                    )
                    .unwrap();
                    s.revoke(&format!("spiffe://example.org/{i}/{j}"), "admin", None, 0)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(a.heads().unwrap(), (41, 41));
    let gens: Vec<u64> = a
        .revocations()
        .unwrap()
        .1
        .iter()
        .map(|r| r.generation)
        .collect();
    assert_eq!(gens, (1..=41).collect::<Vec<_>>());
    // Four admins push from version 41 at once, through four replicas: one is stored.
    let stored = std::thread::scope(|t| {
        let all: Vec<_> = opened
            .iter()
            .map(|s| {
                let files = &files;
                t.spawn(move || {
                    s.push_policy("r-base", files, "admin", 0, Some(41), &Default::default())
                        .is_ok()
                })
            })
            .collect();
        all.into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(stored, 1);
    assert_eq!(a.heads().unwrap().0, 42);
}

/// What goes wrong on the way to the database is said, without the password.
#[test]
fn connection_settings_are_checked_and_errors_say_what_was_wrong() {
    use std::os::unix::fs::PermissionsExt as _;
    let db = scratch::database();
    let password = pw(&db.url);
    let without = db.url.replace(&format!(":{password}@"), "@");
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{password}\n")).unwrap();

    // A password file others may read is refused; a private one is used.
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = PgOptions {
        url: without.clone(),
        password_file: Some(pwfile.clone()),
        ca: None,
        retention: KEEP,
    };
    let e = PgStore::open(&o).err().unwrap().to_string();
    assert!(
        e.contains("database_password_file") && e.contains("mode 0644"),
        "{e}"
    );
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    PgStore::open(&o).unwrap();

    // A wrong password: the server's refusal.
    std::fs::write(&pwfile, "wrong\n").unwrap();
    let e = PgStore::open(&o).err().unwrap().to_string();
    assert!(e.contains("password authentication failed"), "{e}");

    // sslmode=require without a CA to check the server by.
    let e = PgStore::open(&pg_options(&format!("{}?sslmode=require", db.url)))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sslmode=require needs database_ca"), "{e}");
    assert!(!e.contains(&password), "{e}");

    // TLS, the server checked against the CA; another CA is refused.
    let tls = PgOptions {
        url: db.url.clone(),
        password_file: None,
        ca: Some(scratch::server_ca()),
        retention: KEEP,
    };
    let s = PgStore::open(&tls).unwrap();
    assert_eq!(s.heads().unwrap(), (0, 0));
    let other = dir.path().join("other-ca.pem");
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&other, ca.pem()).unwrap();
    let e = PgStore::open(&PgOptions {
        ca: Some(other),
        ..tls
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("certificate"), "{e}");

    // A database elsewhere without TLS: refused before anything is sent.
    let e = PgStore::open(&pg_options(
        "postgres://cp:hunter2@db.example.org/agentwall",
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("the database is not on this machine: set database_ca")
            && !e.contains("hunter2"),
        "{e}"
    );

    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = PgStore::open(&pg_options(&format!(
        "postgres://cp:hunter2@127.0.0.1:{port}/agentwall"
    )))
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.starts_with(&format!(
            "database postgres://cp:***@127.0.0.1:{port}/agentwall: "
        )) && e.contains("onnection refused"),
        "{e}"
    );
}

/// A name PostgreSQL cannot hold as text (NUL, escaped in the JSON), or fields too long for
/// an index entry, are stored all the same (the record whole, its indexed columns cut).
#[test]
fn a_record_whose_indexed_text_holds_nul_is_stored_by_both() {
    for f in both() {
        let long = "x".repeat(20_000);
        let text = serde_json::json!({
            "kind": "decision", "time": format!("2026-11-23T00:00:01.000Z{long}"),
            "verdict": long, "identity": format!("spiffe://example.org/{long}"), "service": long,
        })
        .to_string();
        let r = Reported {
            rid: 2,
            record: serde_json::value::RawValue::from_string(text).unwrap(),
        };
        assert_eq!(
            f.store.ingest("n1", 1, &[r]).unwrap().accepted,
            1,
            "{}",
            f.name
        );
        let text = r#"{"kind":"decision","time":"2026-11-23T00:00:01.000Z","verdict":"deny","identity":"spiffe://example.org/a\u0000b"}"#;
        let r = Reported {
            rid: 1,
            record: serde_json::value::RawValue::from_string(text.to_owned()).unwrap(),
        };
        assert_eq!(
            f.store.ingest("n1", 1, &[r]).unwrap().accepted,
            1,
            "{}",
            f.name
        );
        let page = f.store.flows(&FlowQuery::default()).unwrap();
        assert_eq!(page.flows.len(), 2, "{}", f.name);
    }
}

fn postgres_plan(plan: &str) -> bool {
    plan.contains("cost=")
}

/// A record of `identity` to `dest` at `time`, padded with `pad` bytes.
fn at(rid: u64, time: &str, identity: &str, dest: &str, pad: usize) -> Reported {
    let text = serde_json::json!({
        "kind": "decision", "time": time, "verdict": "deny", "identity": identity,
        "dest": dest, "port": 443, "note": "x".repeat(pad),
    })
    .to_string();
    Reported {
        rid,
        record: serde_json::value::RawValue::from_string(text).unwrap(),
    }
}

fn days_ago(today: time::Date, n: i64) -> time::Date {
    today - time::Duration::days(n)
}

fn noon(d: time::Date) -> String {
    format!("{}T12:00:00.000Z", day_text(d))
}

fn with_retention(postgres: bool, retention: Retention) -> Fixture {
    if postgres {
        let db = scratch::database();
        Fixture {
            name: "postgres",
            store: Box::new(
                PgStore::open(&PgOptions {
                    retention,
                    ..pg_options(&db.url)
                })
                .unwrap(),
            ),
            _dir: None,
            _db: Some(db),
        }
    } else {
        let dir = tempfile::tempdir().unwrap();
        Fixture {
            name: "sqlite",
            store: Box::new(SqliteStore::open(&dir.path().join("cp.db"), retention).unwrap()),
            _dir: Some(dir),
            _db: None,
        }
    }
}

fn times_kept(s: &dyn Store) -> Vec<String> {
    times_kept_of(s, None)
}

/// The times of the records kept (of `node`, or of all), in order.
fn times_kept_of(s: &dyn Store, node: Option<&str>) -> Vec<String> {
    let mut all: Vec<String> = s
        .flows(&FlowQuery {
            node: node.map(str::to_owned),
            limit: Some(10_000),
            ..FlowQuery::default()
        })
        .unwrap()
        .flows
        .iter()
        .map(|f| {
            f.value().unwrap()["time"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    all.sort();
    all
}

/// Records are kept `retention_days` by the day of their time: one already older when it
/// arrives is not stored (and counted), older ones go when the days pass, and a record
/// sent again is still stored once.
#[test]
fn retention_removes_what_is_past_it_and_stores_nothing_past_it() {
    let today = today();
    let r = Retention {
        days: 30,
        max_bytes: None,
    };
    for postgres in [false, true] {
        let f = with_retention(postgres, r);
        let s = &*f.store;
        let id = "spiffe://example.org/a";
        let batch = vec![
            at(1, &noon(days_ago(today, 40)), id, "203.0.113.1", 0),
            at(2, &noon(days_ago(today, 20)), id, "203.0.113.2", 0),
            at(3, &noon(days_ago(today, 5)), id, "203.0.113.3", 0),
            at(4, &noon(today), id, "203.0.113.4", 0),
            at(5, "", id, "203.0.113.5", 0),
        ];
        assert_eq!(
            s.ingest("n1", 1, &batch).unwrap(),
            Ingested {
                accepted: 4,
                duplicates: 0,
                expired: 1
            },
            "{}",
            f.name
        );
        // Alerts' baseline is kept as long as records are, from the day it was last seen.
        let key = |w: &str| (id.to_owned(), w.to_owned());
        let seen_on = |w: &str, d: time::Date| {
            s.baseline_note(&[(id.into(), w.into(), noon(d))], &day_text(d))
                .unwrap()
        };
        seen_on("dest old", days_ago(today, 20));
        seen_on("dest both", days_ago(today, 20));
        seen_on("dest both", today);
        // Nothing is past the retention yet.
        assert_eq!(s.retain(today).unwrap(), Retained::default(), "{}", f.name);
        // Sixteen days on, the record of twenty days ago is past it.
        let later = today + time::Duration::days(16);
        assert_eq!(
            s.retain(later).unwrap(),
            Retained {
                expired: 1,
                ..Retained::default()
            },
            "{}",
            f.name
        );
        let held = s.baseline(&[key("dest old"), key("dest both")]).unwrap();
        assert_eq!(
            held.keys().collect::<Vec<_>>(),
            [&key("dest both")],
            "{}",
            f.name
        );
        let kept = times_kept(s);
        assert_eq!(kept.len(), 3, "{}: {kept:?}", f.name);
        assert!(
            !kept.contains(&noon(days_ago(today, 20))),
            "{}: {kept:?}",
            f.name
        );
        // Sent again (a node that did not hear the answer): stored once still.
        assert_eq!(
            s.ingest("n1", 1, &batch[2..4]).unwrap(),
            Ingested {
                accepted: 0,
                duplicates: 2,
                expired: 0
            },
            "{}",
            f.name
        );
    }
}

/// Past `retention_max_bytes`, the oldest records go first: whole days in PostgreSQL
/// (never today's), a batch of the oldest at a time in SQLite.
#[test]
fn whose_records_go_first_past_the_size_cap() {
    let held = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(n, b)| ((*n).to_owned(), *b)).collect()
    };
    assert_eq!(evict_next(&held(&[("a", 10), ("b", 20)]), 30), None);
    // The largest first, down to the next one's level at most.
    assert_eq!(
        evict_next(&held(&[("a", 100), ("b", 300)]), 200),
        Some(("b", 200))
    );
    assert_eq!(
        evict_next(&held(&[("a", 100), ("b", 300)]), 350),
        Some(("b", 50))
    );
    // Level holders share what is over.
    assert_eq!(
        evict_next(&held(&[("a", 100), ("b", 100)]), 100),
        Some(("a", 50))
    );
    assert_eq!(
        evict_next(&held(&[("a", 100), ("b", 101)]), 100),
        Some(("b", 51))
    );
    assert_eq!(evict_through(&[(1, 10), (2, 10), (3, 10)], 15), Some(2));
    assert_eq!(evict_through(&[(1, 10), (2, 10)], 50), Some(2));
    assert_eq!(evict_through(&[], 50), None);
}

/// Past `retention_max_bytes`, the node holding the most loses its oldest records first:
/// one node's flood of records dated today cannot evict another node's history below an
/// equal share.
#[test]
fn a_size_cap_evicts_the_largest_holder_first() {
    let today = today();
    let id = "spiffe://example.org/a";
    let record =
        |rid: u64, back: i64| at(rid, &noon(days_ago(today, back)), id, "203.0.113.1", 1000);
    let len = charged(record(1, 0).record.get()) as u64;
    for postgres in [false, true] {
        let f = with_retention(
            postgres,
            Retention {
                days: 30,
                max_bytes: Some(200 * len),
            },
        );
        let s = &*f.store;
        // An honest node's history: fifty records on each of three days.
        let mut rid = 0;
        for back in [3, 2, 1] {
            let batch: Vec<Reported> = (0..50)
                .map(|_| {
                    rid += 1;
                    record(rid, back)
                })
                .collect();
            assert_eq!(s.ingest("honest", 1, &batch).unwrap().accepted, 50);
        }
        // A flood of three hundred dated today.
        let flood: Vec<Reported> = (1..=300).map(|rid| record(rid, 0)).collect();
        assert_eq!(s.ingest("flood", 1, &flood).unwrap().accepted, 300);
        let r = s.retain(today).unwrap();
        assert_eq!((r.over_size, r.expired), (250, 0), "{}", f.name);
        let kept = |node: &str| times_kept_of(s, Some(node));
        let honest = kept("honest");
        assert_eq!(honest.len(), 100, "{}", f.name);
        assert!(
            honest.iter().all(|t| *t != noon(days_ago(today, 3))),
            "{}",
            f.name
        );
        assert_eq!(kept("flood").len(), 100, "{}", f.name);
        // Within the cap now: the next pass removes nothing, and reports are still taken.
        assert_eq!(s.retain(today).unwrap(), Retained::default(), "{}", f.name);
        assert_eq!(s.ingest("honest", 2, &[record(1, 0)]).unwrap().accepted, 1);
    }
}

/// Each filter of the flows query is served by an index, in id order (the plan is printed:
/// `cargo xtask with-postgres cargo test -p agentwall --lib query_plans -- --nocapture`).
#[test]
fn each_flows_filter_uses_an_index_query_plans() {
    let today = today();
    for f in both() {
        let s = &*f.store;
        // Enough rows, spread over enough values, that an index is worth it to a planner.
        for b in 0..200u64 {
            let batch: Vec<Reported> = (0..100u64)
                .map(|i| {
                    let n = b * 100 + i;
                    let mut r = at(
                        n,
                        &format!(
                            "{}T{:02}:{:02}:{:02}.000Z",
                            day_text(days_ago(today, (n % 3) as i64)),
                            (n / 3600) % 24,
                            (n / 60) % 60,
                            n % 60
                        ),
                        &format!("spiffe://example.org/agent/{}", n % 200),
                        &format!("203.0.{}.{}", (n / 250) % 250, n % 250),
                        0,
                    );
                    if n % 50 == 0 {
                        let mut v: serde_json::Value =
                            serde_json::from_str(r.record.get()).unwrap();
                        v["service"] = format!("Service {}", n % 7).into();
                        r.record = serde_json::value::RawValue::from_string(v.to_string()).unwrap();
                    }
                    if n % 40 == 1 {
                        let mut v: serde_json::Value =
                            serde_json::from_str(r.record.get()).unwrap();
                        v["owner"] = format!("team-{}@example.org", n % 9).into();
                        r.record = serde_json::value::RawValue::from_string(v.to_string()).unwrap();
                    }
                    r
                })
                .collect();
            s.ingest(&format!("spiffe://example.org/node/{b}"), 1, &batch)
                .unwrap();
        }
        if let Some(db) = &f._db {
            scratch::admin(&db.url, "ANALYZE flows").unwrap();
        }
        let q = FlowQuery::default;
        let cases: [(&str, FlowQuery, &str); 8] = [
            (
                "node",
                FlowQuery {
                    node: Some("spiffe://example.org/node/3".into()),
                    ..q()
                },
                "node_id",
            ),
            (
                "identity",
                FlowQuery {
                    identity: Some("spiffe://example.org/agent/7".into()),
                    ..q()
                },
                "identity_id",
            ),
            (
                "dest",
                FlowQuery {
                    dest: Some("203.0.1.7".into()),
                    ..q()
                },
                "dest_id",
            ),
            (
                "service",
                FlowQuery {
                    service: Some("Service 3".into()),
                    ..q()
                },
                "service_id",
            ),
            (
                "tagged",
                FlowQuery {
                    tagged: true,
                    ..q()
                },
                "tagged",
            ),
            (
                "owner",
                FlowQuery {
                    owner: Some("team-4@example.org".into()),
                    ..q()
                },
                "owner_id",
            ),
            (
                "since, until",
                FlowQuery {
                    since: Some(format!("{}T01:00:00.000Z", day_text(today))),
                    until: Some(format!("{}T01:10:00.000Z", day_text(today))),
                    ..q()
                },
                "time",
            ),
            (
                "after (paging)",
                FlowQuery {
                    after: Some(19_000),
                    ..q()
                },
                "id",
            ),
        ];
        for (filter, query, index) in cases {
            let plan = s.explain_flows(&query).unwrap();
            println!("--- {} flows filtered by {filter}:\n{plan}", f.name);
            assert!(
                !plan.contains("Seq Scan")
                    && !plan.contains("SCAN flows\n")
                    && !plan.ends_with("SCAN flows"),
                "{}: {filter} scans the table:\n{plan}",
                f.name
            );
            // SQLite names the index; PostgreSQL names each partition's copy of it (named
            // after the columns; the planner may take another index that serves the filter).
            assert!(
                plan.contains(&format!("flows_{index}"))
                    || (index == "id" && plan.contains("INTEGER PRIMARY KEY"))
                    || (postgres_plan(&plan) && plan.contains("Index")),
                "{}: {filter} does not use the {index} index:\n{plan}",
                f.name
            );
        }
    }
}

#[test]
fn records_are_filed_by_their_day_within_the_retention() {
    let today = time::macros::date!(2026 - 12 - 04);
    let r = Retention {
        days: 30,
        max_bytes: None,
    };
    let day = |t: &str| file_day(t, today, &r).map(day_text);
    assert_eq!(
        day("2026-12-03T23:59:59.999Z").as_deref(),
        Some("2026-12-03")
    );
    assert_eq!(
        day("2026-11-04T00:00:00.000Z").as_deref(),
        Some("2026-11-04")
    );
    assert_eq!(day("2026-11-03T23:59:59.999Z"), None);
    assert_eq!(
        day("2026-12-05T10:00:00.000Z").as_deref(),
        Some("2026-12-05")
    );
    assert_eq!(
        day("2031-01-01T00:00:00.000Z").as_deref(),
        Some("2026-12-05")
    );
    assert_eq!(day("").as_deref(), Some("2026-12-04"));
    assert_eq!(day("not a time").as_deref(), Some("2026-12-04"));
    assert_eq!(day("0000-01-01T00:00:00Z"), None);
}

/// Ids are given in commit order: a reader that follows new records with `after` while
/// several report batches are stored at once sees every one of them.
#[test]
fn a_reader_paging_with_after_misses_nothing_stored_meanwhile() {
    for f in both() {
        let s = &*f.store;
        let done = std::sync::atomic::AtomicBool::new(false);
        let seen = std::thread::scope(|t| {
            let reader = t.spawn(|| {
                let mut after = None;
                let mut seen = std::collections::BTreeSet::new();
                loop {
                    let last = done.load(std::sync::atomic::Ordering::SeqCst);
                    let page = s
                        .flows(&FlowQuery {
                            after,
                            limit: Some(500),
                            ..FlowQuery::default()
                        })
                        .unwrap();
                    for fl in &page.flows {
                        seen.insert((
                            fl.node.clone(),
                            fl.value().unwrap()["port"].as_u64().unwrap(),
                        ));
                    }
                    if let Some(last_id) = page.flows.last().map(|fl| fl.id) {
                        after = Some(last_id);
                    } else if last {
                        return seen;
                    }
                }
            });
            let writers: Vec<_> = (0..4)
                .map(|w| {
                    t.spawn(move || {
                        for b in 0..25u64 {
                            let batch: Vec<Reported> = (0..40u64)
                                .map(|i| {
                                    let text = format!(
                                        r#"{{"kind":"decision","time":"2026-11-23T00:00:00.000Z","verdict":"deny","port":{}}}"#,
                                        b * 40 + i
                                    );
                                    Reported {
                                        rid: b * 40 + i + 1,
                                        record: serde_json::value::RawValue::from_string(text)
                                            .unwrap(),
                                    }
                                })
                                .collect();
                            s.ingest(&format!("n{w}"), 1, &batch).unwrap();
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            reader.join().unwrap()
        });
        assert_eq!(
            seen.len(),
            4 * 1000,
            "{}: the reader missed records",
            f.name
        );
    }
}

/// A node's owner and labels are kept as it last said them, and gone when it stops saying.
#[test]
fn nodes_keep_the_owner_and_labels_they_last_said() {
    for f in both() {
        let seen = |owner: Option<&str>, labels: &[&str]| NodeSeen {
            node: "spiffe://example.org/node/a".into(),
            at: "2026-12-01T00:00:00.000Z".into(),
            poll: crate::control_plane::PollRequest {
                agent_version: "x".into(),
                owner: owner.map(|o| o.parse().unwrap()),
                labels: crate::policy::owner::Labels::from_assignments(labels.iter().copied())
                    .unwrap(),
                ..Default::default()
            },
        };
        f.store
            .nodes_seen(&[seen(Some("platform@example.com"), &["site=fra1", "tier=1"])])
            .unwrap();
        let n = &f.store.nodes().unwrap()[0];
        assert_eq!(
            n.owner.as_ref().map(|o| o.as_str()),
            Some("platform@example.com"),
            "{}",
            f.name
        );
        assert_eq!(n.labels.to_string(), "site=fra1,tier=1", "{}", f.name);
        f.store.nodes_seen(&[seen(None, &[])]).unwrap();
        let n = &f.store.nodes().unwrap()[0];
        assert!(
            n.owner.is_none() && n.labels.is_empty(),
            "{}: {n:?}",
            f.name
        );
    }
}

/// A node's last poll is noted by the database's clock, whatever the replica's says.
#[test]
fn nodes_are_seen_by_the_database_clock() {
    let f = postgres();
    let at = |t: &str| NodeSeen {
        node: "spiffe://example.org/node/a".into(),
        at: t.into(),
        poll: crate::control_plane::PollRequest {
            applied_version: Some(2),
            agent_version: "x".into(),
            ..Default::default()
        },
    };
    f.store
        .nodes_seen(&[at("2099-01-01T00:00:00.000Z")])
        .unwrap();
    let n = f.store.nodes().unwrap();
    let now = crate::clock::now_rfc3339();
    assert!(
        n[0].last_seen.as_str() <= now.as_str() && n[0].last_seen[..10] == now[..10],
        "{n:?} at {now}"
    );
    assert_eq!(n[0].applied_version, Some(2));
}

/// A day's partition is made beside readers that hold `flows` (an audit chain walk holds a
/// transaction for minutes) and never makes reports wait in line: one that cannot get its
/// lock soon (a retention pass detaching) refuses its batch as busy, while batches for
/// days that have a partition go on. A retention pass cut short between detach and drop
/// is finished by the next, and one replica's pass at a time.
#[test]
fn partitions_are_made_beside_readers_and_retention_leaves_nothing_behind() {
    let today = today();
    let db = scratch::database();
    let s = PgStore::open(&PgOptions {
        retention: Retention {
            days: 30,
            max_bytes: None,
        },
        ..pg_options(&db.url)
    })
    .unwrap();
    let id = "spiffe://example.org/a";
    let one =
        |rid: u64, day: time::Date| s.ingest("n1", 1, &[at(rid, &noon(day), id, "203.0.113.1", 0)]);
    assert_eq!(one(1, today).unwrap().accepted, 1);
    let reader = scratch::hold(&db.url, "BEGIN; SELECT count(*) FROM flows");
    assert_eq!(one(2, days_ago(today, 20)).unwrap().accepted, 1);
    drop(reader);

    let detaching = scratch::hold(
        &db.url,
        "BEGIN; LOCK TABLE flows IN SHARE UPDATE EXCLUSIVE MODE",
    );
    let e = one(3, days_ago(today, 21)).unwrap_err();
    assert!(e.is_busy(), "{e}");
    assert_eq!(one(4, today).unwrap().accepted, 1);
    drop(detaching);
    assert_eq!(one(3, days_ago(today, 21)).unwrap().accepted, 1);

    // Detached, not dropped (a pass cut short): the next pass drops it (its record
    // counted), and a record of that day later makes the partition again.
    let detach = |n: i64| {
        scratch::admin(
            &db.url,
            &format!(
                "ALTER TABLE flows DETACH PARTITION flows_d{}",
                day_text(days_ago(today, n)).replace('-', "")
            ),
        )
        .unwrap();
    };
    detach(20);
    let r = s.retain(today).unwrap();
    assert_eq!((r.expired + r.over_size, r.skipped), (1, false));
    assert_eq!(one(5, days_ago(today, 20)).unwrap().accepted, 1);
    // A record of a day whose table is left detached attaches it again, with what it held.
    detach(21);
    assert_eq!(one(6, days_ago(today, 21)).unwrap().accepted, 1);
    assert_eq!(times_kept(&s).len(), 5, "{:?}", times_kept(&s));

    // Another replica's pass holds the retention lock: this one's is left to it.
    let other = scratch::hold(
        &db.url,
        &format!(
            "SELECT pg_advisory_lock({}, {})",
            postgres::LOCKS,
            postgres::RETAIN_LOCK
        ),
    );
    assert!(s.retain(today).unwrap().skipped);
    drop(other);
    assert!(!s.retain(today).unwrap().skipped);
}

/// A node's report quota is one across replicas: what it spent through one is gone
/// through the other; a batch over one of its quotas spends none of them.
#[test]
fn replicas_share_a_nodes_report_quota() {
    let db = scratch::database();
    let a = PgStore::open(&pg_options(&db.url)).unwrap();
    let b = PgStore::open(&pg_options(&db.url)).unwrap();
    let records = |n| Spend {
        kind: "records",
        n,
        per_minute: 60,
        burst: 10,
    };
    let bytes = |n| Spend {
        kind: "bytes",
        n,
        per_minute: 6_000,
        burst: 1_000,
    };
    assert_eq!(
        a.spend_shared("n1", &[records(6), bytes(100)]).unwrap(),
        None
    );
    // Over the bytes: refused whole, the records not spent.
    let wait = b.spend_shared("n1", &[records(4), bytes(1_000)]).unwrap();
    assert!(wait.is_some_and(|s| (1..=2).contains(&s)), "{wait:?}");
    assert_eq!(
        b.spend_shared("n1", &[records(4), bytes(100)]).unwrap(),
        None
    );
    // Ten records spent through both: the next waits about a second.
    let wait = a.spend_shared("n1", &[records(1), bytes(1)]).unwrap();
    assert!(wait.is_some_and(|s| (1..=2).contains(&s)), "{wait:?}");
    // Another node has its own.
    assert_eq!(
        b.spend_shared("n2", &[records(10), bytes(1)]).unwrap(),
        None
    );
    // SQLite has one process: nothing to share.
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("cp.db"), KEEP).unwrap();
    assert_eq!(s.spend_shared("n1", &[records(1_000)]).unwrap(), None);
}

#[test]
fn the_cell_rate_algorithm_allows_bursts_and_says_how_long_to_wait() {
    let s = |n| Spend {
        kind: "records",
        n,
        per_minute: 60,
        burst: 10,
    };
    assert_eq!(s(10).at(0.0, 100.0), Ok(110.0));
    assert_eq!(s(1).at(110.0, 100.0), Err(1.0));
    assert_eq!(s(1).at(110.0, 101.0), Ok(111.0));
    assert_eq!(s(11).at(0.0, 100.0), Err(1.0));
}

#[test]
fn console_sessions_are_kept_by_hash_end_on_sign_out_and_expire() {
    for f in both() {
        let s = &*f.store;
        let session = |id: &str, expires: &str| ConsoleSession {
            id_sha256: id.into(),
            credential: "token:ab".into(),
            chain: None,
            csrf: format!("csrf-{id}"),
            created: "2026-12-01T00:00:00.000Z".into(),
            expires: expires.into(),
        };
        let live = session("live", "2999-01-01T00:00:00.000Z");
        s.console_open(&live).unwrap();
        s.console_open(&session("old", "2020-01-01T00:00:00.000Z"))
            .unwrap();
        assert_eq!(s.console_session("live").unwrap(), Some(live.clone()));
        assert_eq!(s.console_session("old").unwrap(), None, "expired");
        assert_eq!(s.console_session("nobody").unwrap(), None);
        // The same cookie hash twice is an error, not a second session.
        assert!(s.console_open(&live).is_err());
        assert!(s.console_close("live").unwrap());
        assert!(!s.console_close("live").unwrap());
        assert_eq!(s.console_session("live").unwrap(), None, "signed out");

        // A sign-in link works once.
        let link = ConsoleLink {
            code_sha256: "code".into(),
            credential: "token:ab".into(),
            chain: None,
            expires: "2999-01-01T00:00:00.000Z".into(),
        };
        s.console_link_open(&link).unwrap();
        s.console_link_open(&ConsoleLink {
            code_sha256: "stale".into(),
            expires: "2020-01-01T00:00:00.000Z".into(),
            ..link.clone()
        })
        .unwrap();
        assert_eq!(s.console_link_take("code").unwrap(), Some(link));
        assert_eq!(s.console_link_take("code").unwrap(), None, "taken once");
        assert_eq!(s.console_link_take("stale").unwrap(), None, "expired");

        s.revoke("spiffe://example.org/a", "admin", Some("leaked key"), 0)
            .unwrap();
        s.revoke("spiffe://example.org/b", "admin", None, 0)
            .unwrap();
        let (_, all) = s.revocations().unwrap();
        assert_eq!(all[0].reason.as_deref(), Some("leaked key"));
        assert_eq!(all[1].reason, None);
    }
}

#[test]
fn one_replica_forwards_at_a_time_and_the_next_goes_on_from_its_cursor() {
    for f in both() {
        let s = &*f.store;
        let batch: Vec<Reported> = (1..=3)
            .map(|i| rec(i, "deny", &format!("2026-11-23T00:00:0{i}.000Z")))
            .collect();
        s.ingest("n1", 1, &batch).unwrap();
        let newest = s.flows(&FlowQuery::default()).unwrap().flows[2].id;
        let (long, none) = (Duration::from_secs(3600), Duration::ZERO);
        // The first claim starts at the newest record stored: forwarding begins now.
        assert_eq!(
            s.forward_claim("syslog", "a", long).unwrap(),
            Some(newest),
            "{}",
            f.name
        );
        assert_eq!(s.forward_behind("syslog").unwrap(), Some(0), "{}", f.name);
        assert_eq!(s.forward_behind("nothing").unwrap(), None, "{}", f.name);
        assert_eq!(
            s.forward_claim("syslog", "b", long).unwrap(),
            None,
            "{}",
            f.name
        );
        assert!(
            !s.forward_advance("syslog", "b", newest + 9).unwrap(),
            "{}",
            f.name
        );
        let more: Vec<Reported> = (4..=5)
            .map(|i| rec(i, "deny", &format!("2026-11-23T00:00:0{i}.000Z")))
            .collect();
        s.ingest("n1", 1, &more).unwrap();
        assert_eq!(s.forward_behind("syslog").unwrap(), Some(2), "{}", f.name);
        assert!(
            s.forward_advance("syslog", "a", newest + 2).unwrap(),
            "{}",
            f.name
        );
        assert_eq!(s.forward_behind("syslog").unwrap(), Some(0), "{}", f.name);
        // Never back.
        assert!(s.forward_advance("syslog", "a", 1).unwrap(), "{}", f.name);
        assert_eq!(
            s.forward_claim("syslog", "a", none).unwrap(),
            Some(newest + 2)
        );
        // A lease run out is taken over, from where it got.
        assert_eq!(
            s.forward_claim("syslog", "b", long).unwrap(),
            Some(newest + 2),
            "{}",
            f.name
        );
        assert!(
            !s.forward_advance("syslog", "a", newest).unwrap(),
            "{}",
            f.name
        );
        // A lease written further ahead than twice the lease asked for (a clock set back
        // since, or one that ran ahead) counts as run out.
        assert_eq!(
            s.forward_claim("syslog", "a", Duration::from_secs(60))
                .unwrap(),
            Some(newest + 2),
            "{}",
            f.name
        );
        // Another forwarding is another cursor, starting at the newest record stored.
        assert_eq!(
            s.forward_claim("other", "a", long).unwrap(),
            Some(newest + 2),
            "{}",
            f.name
        );
        // A baseline: what a subject was seen with, and since when; read without writing,
        // noted after.
        let (t1, t5, t6) = (
            "2026-11-23T00:00:01.000Z",
            "2026-11-23T00:00:05.000Z",
            "2026-11-23T00:00:06.000Z",
        );
        let a = "spiffe://example.org/a n1";
        let key = |s: &str, w: &str| (s.to_owned(), w.to_owned());
        let keys = [
            key(a, ""),
            key(a, "dest api.example.com"),
            key(a, "dest 203.0.113.9"),
        ];
        assert!(s.baseline(&keys).unwrap().is_empty(), "{}", f.name);
        let note = |w: &str, t: &str| (a.to_owned(), w.to_owned(), t.to_owned());
        s.baseline_note(
            &[
                note("", t5),
                note("dest api.example.com", t5),
                note("", t6),
                note("dest api.example.com", t6),
            ],
            "2026-11-23",
        )
        .unwrap();
        // An earlier record noted later moves the start back.
        s.baseline_note(&[note("", t1), note("dest 203.0.113.9", t1)], "2026-11-24")
            .unwrap();
        let held = s.baseline(&keys).unwrap();
        assert_eq!(held.len(), 3, "{}", f.name);
        assert_eq!(held[&keys[0]], t1, "{}", f.name);
        assert_eq!(held[&keys[1]], t5, "{}", f.name);
    }
}

#[test]
fn a_proposal_becomes_the_next_version_with_its_last_approval_and_only_then() {
    use crate::control_plane::signing::{BundleSignature, Signing};
    let files = vec![BundleFile {
        name: "a.yaml".into(),
        text: "x".into(),
    }];
    let sig = |key: &str| BundleSignature {
        key: key.into(),
        signer: format!("{key}@example.org"),
        signature: "00".into(),
    };
    for f in both() {
        let s = &*f.store;
        let signing = Signing {
            not_before: Some("2026-12-05T00:00:00.000Z".into()),
            expires_at: None,
            adds_to: None,
            carries_from: None,
            signatures: vec![sig("a")],
        };
        assert_eq!(
            s.push_policy("r1", &files, "admin", 0, None, &signing)
                .unwrap()
                .version,
            1
        );
        // What was pushed signed is read back signed.
        assert_eq!(s.policy(Some(1)).unwrap().unwrap().signing, signing);
        let p = s.propose("r2", &files, "alice", &signing).unwrap();
        assert_eq!((p.id, p.version), (1, None), "{}", f.name);
        assert_eq!(s.proposal(1).unwrap().unwrap(), p, "{}", f.name);
        // The same key twice is refused, and stores nothing.
        let e = s.approve(1, &sig("a"), 3, 0).unwrap_err().to_string();
        assert_eq!(e, "proposal 1 is signed by key a already", "{}", f.name);
        let (p, b) = s.approve(1, &sig("b"), 3, 0).unwrap();
        assert!(b.is_none(), "{}", f.name);
        assert_eq!(p.signing.signatures.len(), 2);
        assert_eq!(s.policy(None).unwrap().unwrap().version, 1, "{}", f.name);
        // The last approval publishes it, numbered above what the caller served.
        let (p, b) = s.approve(1, &sig("c"), 3, 6).unwrap();
        let b = b.unwrap();
        assert_eq!((b.version, p.version), (7, Some(7)), "{}", f.name);
        assert_eq!(b.signing.signatures.len(), 3);
        assert_eq!(s.policy(None).unwrap().unwrap(), b, "{}", f.name);
        let e = s.approve(1, &sig("d"), 3, 0).unwrap_err().to_string();
        assert_eq!(
            e, "proposal 1 was approved already: it is bundle version 7",
            "{}",
            f.name
        );
        assert!(matches!(
            s.approve(9, &sig("d"), 1, 0),
            Err(StoreError::NoProposal(9))
        ));
        // A number no proposal can have is none, not a storage failure.
        assert!(s.proposal(u64::MAX).unwrap().is_none());
        assert!(matches!(
            s.approve(u64::MAX, &sig("d"), 1, 0),
            Err(StoreError::NoProposal(u64::MAX))
        ));
        // Listed without files, newest first.
        s.propose("r3", &files, "bob", &Signing::default()).unwrap();
        let all = s.proposals().unwrap();
        assert_eq!(
            all.iter().map(|p| (p.id, p.version)).collect::<Vec<_>>(),
            [(2, None), (1, Some(7))],
            "{}",
            f.name
        );
        assert!(all.iter().all(|p| p.files.is_empty()));
    }
}

#[test]
fn join_tokens_are_spent_once_a_use_and_issuances_kept() {
    use super::{Issuance, JoinToken};
    for f in both() {
        let s = &*f.store;
        let later = crate::clock::rfc3339(
            std::time::SystemTime::now() + std::time::Duration::from_secs(600),
        );
        let token = |id: &str, sha: &str, uses: u32, expires: &str| JoinToken {
            id: id.into(),
            sha256: sha.into(),
            identity: "spiffe://example.org/agent/a".into(),
            expires: expires.into(),
            uses_left: uses,
            created_by: "admin".into(),
            created: crate::clock::now_rfc3339(),
            cancelled: false,
        };
        s.token_create(&token("t1", "h1", 2, &later)).unwrap();
        s.token_create(&token("t2", "h2", 1, &later)).unwrap();
        // Ended a moment ago: not spent, still listed for a day.
        s.token_create(&token("t3", "h3", 1, &crate::clock::now_rfc3339()))
            .unwrap();
        let spent = s.token_spend("h1").unwrap().expect(f.name);
        assert_eq!((spent.id.as_str(), spent.uses_left), ("t1", 1));
        assert_eq!(s.token_spend("h1").unwrap().map(|t| t.uses_left), Some(0));
        assert_eq!(s.token_spend("h1").unwrap(), None, "{}: used up", f.name);
        assert_eq!(s.token_spend("h3").unwrap(), None, "{}: expired", f.name);
        assert_eq!(s.token_spend("nope").unwrap(), None);
        assert!(s.token_cancel("t2").unwrap());
        assert!(!s.token_cancel("t2").unwrap(), "{}: cancelled once", f.name);
        assert_eq!(s.token_spend("h2").unwrap(), None, "{}: cancelled", f.name);
        let listed = s.tokens().unwrap();
        assert_eq!(listed.len(), 3, "{}", f.name);
        assert!(listed.iter().all(|t| t.sha256.is_empty()), "never the hash");
        assert!(listed.iter().any(|t| t.id == "t2" && t.cancelled));

        let i = |serial: &str, kind: &str| Issuance {
            serial: serial.into(),
            identity: "spiffe://example.org/agent/a".into(),
            node: "spiffe://example.org/node/n1".into(),
            kind: kind.into(),
            token: (kind == "join").then(|| "t1".into()),
            issued: crate::clock::now_rfc3339(),
            not_after: later.clone(),
            renewed_into: None,
        };
        s.issued(&i("0a", "join")).unwrap();
        s.issued(&i("0b", "renewal")).unwrap();
        assert_eq!(
            s.issuance("0a").unwrap(),
            Some(i("0a", "join")).map(|mut x| {
                x.issued = s.issuance("0a").unwrap().unwrap().issued;
                x
            })
        );
        assert_eq!(s.issuance("ff").unwrap(), None);
        // Renewed once: the chain it went into is kept, a second renewal is refused.
        assert!(s.renewed("0a", "CHAIN").unwrap());
        assert!(!s.renewed("0a", "OTHER").unwrap(), "{}", f.name);
        assert_eq!(
            s.issuance("0a").unwrap().unwrap().renewed_into.as_deref(),
            Some("CHAIN")
        );
        assert_eq!(s.token_identity("h1").unwrap(), None, "used up");
        s.token_create(&token("t4", "h4", 1, &later)).unwrap();
        assert_eq!(
            s.token_identity("h4").unwrap().as_deref(),
            Some("spiffe://example.org/agent/a")
        );
        assert!(s.token_identity("h4").unwrap().is_some(), "not spent");
        assert!(s.token_cancelled("t2").unwrap() && !s.token_cancelled("t4").unwrap());
        assert_eq!(s.issuances(10).unwrap().len(), 2, "{}", f.name);
        assert_eq!(s.issuances(1).unwrap().len(), 1);
    }
}
