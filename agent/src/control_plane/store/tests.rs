//! The stores' tests: each runs against SQLite and against a real PostgreSQL (a database of
//! its own in the server `cargo xtask test` starts).

use super::*;
use crate::control_plane::{BundleFile, FlowQuery, Ingested, Reported};

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
        store: Box::new(SqliteStore::open(&dir.path().join("cp.db")).unwrap()),
        _dir: Some(dir),
        _db: None,
    }
}

fn pg_options(url: &str) -> PgOptions {
    PgOptions {
        url: url.to_owned(),
        password_file: None,
        ca: None,
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
    let fill = |s: &dyn Store| {
        assert_eq!(s.push_policy("r1", &files, "admin").unwrap().version, 1);
        assert_eq!(s.push_policy("r2", &files, "admin").unwrap().version, 2);
        assert_eq!(s.revoke("spiffe://example.org/a", "admin").unwrap(), 1);
        assert_eq!(s.revoke("spiffe://example.org/a", "admin").unwrap(), 1);
        assert_eq!(s.revoke("spiffe://example.org/b", "admin").unwrap(), 2);
        assert_eq!(s.heads().unwrap(), (2, 2));
    };
    let kept = |s: &dyn Store| {
        assert_eq!(s.policy(None).unwrap().unwrap().revision, "r2");
        assert_eq!(s.policy(Some(1)).unwrap().unwrap().revision, "r1");
        assert!(s.policy(Some(3)).unwrap().is_none());
        assert_eq!(s.revocations().unwrap().0, 2);
        assert_eq!(s.heads().unwrap(), (2, 2));
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.db");
    fill(&SqliteStore::open(&path).unwrap());
    kept(&SqliteStore::open(&path).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let e = SqliteStore::open(&path).err().unwrap().to_string();
    assert!(
        e.contains("has schema version 99; this agentwall knows up to 2"),
        "{e}"
    );

    let db = scratch::database();
    fill(&PgStore::open(&pg_options(&db.url)).unwrap());
    kept(&PgStore::open(&pg_options(&db.url)).unwrap());
    scratch::admin(&db.url, "UPDATE agentwall_schema SET version = 99").unwrap();
    let e = PgStore::open(&pg_options(&db.url))
        .err()
        .unwrap()
        .to_string();
    let shown = crate::config::control_plane::redact_url(&db.url);
    assert!(
        e.contains(&format!(
            "database {shown} has schema version 99; this agentwall knows up to 1"
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
    assert_eq!(a.push_policy("r1", &files, "admin").unwrap().version, 1);
    let after_push = wait(start);
    assert_eq!(b.heads().unwrap(), (1, 0));
    assert_eq!(a.revoke("spiffe://example.org/a", "admin").unwrap(), 1);
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
                    s.push_policy(&format!("r{i}-{j}"), files, "admin").unwrap();
                    s.revoke(&format!("spiffe://example.org/{i}/{j}"), "admin")
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

/// A name PostgreSQL cannot hold as text (NUL, escaped in the JSON) is stored all the same.
#[test]
fn a_record_whose_indexed_text_holds_nul_is_stored_by_both() {
    for f in both() {
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
        assert_eq!(page.flows.len(), 1, "{}", f.name);
    }
}
