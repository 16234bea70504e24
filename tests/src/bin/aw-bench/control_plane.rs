//! `cargo xtask bench control-plane`: the real server process on loopback, on SQLite and on
//! PostgreSQL (the server `cargo xtask` starts), one replica and two, fed and polled by
//! simulated nodes that use the real client (`agentwall::control_plane::client`).
//!
//! - Ingest: nodes post gzip'd batches of 1,000 decision records back to back for a fixed
//!   time, spread over the replicas; the baseline is the same batches written straight into
//!   the store in this process, so the ratio is what HTTPS, TLS, gzip and JSON (and the
//!   replicas) cost on top of the database.
//! - Push-to-received: 10,000 nodes long-poll, spread over the replicas; an admin pushes a
//!   bundle through the first replica and each node notes when the bundle reaches it. With
//!   two replicas, half the fleet hears of it through the database (LISTEN/NOTIFY).
//!   Push-to-enforced (the node's own check too) with 1 node is the baseline.
//! - A fleet-wide revocation the same way.
//! - Server memory per 1,000 long-polls held.

use std::{
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use agentwall::control_plane::{
    PollReply, PollRequest, PushRequest, Reported,
    client::Client,
    store::{PgOptions, PgStore, Retention, SqliteStore, Store, scratch},
};
use agentwall_tests::{
    cp::{CpFixture, CpProc},
    node::write_cert,
    pki::CertSpec,
};
use bytes::Bytes;

const BATCH: usize = 1000;
const INGEST_NODES: usize = 16;
const INGEST_SECS: u64 = 8;
const FLEET: usize = 10_000;

fn record(i: usize) -> serde_json::Value {
    serde_json::json!({
        "kind": "decision", "seq": i, "time": "2026-11-23T00:00:00.000Z", "verdict": "deny",
        "reason": "no rule allows it", "identity": "spiffe://example.org/agent/support",
        "pid": 4242, "exe": "/usr/bin/python3", "comm": "python3", "uid": 1000,
        "cgroup_id": 12345, "cgroup": "/sys/fs/cgroup/agentwall/support-1",
        "dest": format!("203.0.113.{}", i % 250), "port": 1000 + (i % 5000), "protocol": "tcp",
        "revision": "3f2a9c0d4e5b6a7f", "count": 1, "unit": "support-agent.service",
        "cmdline": "python3 -m agent --task triage", "audit_seq": i,
    })
}

/// The JSON array of a batch's records (rid 1..=BATCH); batches differ by epoch.
fn records_json() -> String {
    let recs: Vec<String> = (0..BATCH)
        .map(|i| format!("{{\"rid\":{},\"record\":{}}}", i + 1, record(i)))
        .collect();
    format!("[{}]", recs.join(","))
}

fn gzip(text: &str) -> Bytes {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text.as_bytes()).unwrap();
    Bytes::from(enc.finish().unwrap())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A policy of 50 identities with 10 rules each; `n` makes every push a new revision.
fn bundle(n: usize) -> PushRequest {
    let mut text = format!("# push {n}\n");
    for a in 0..50 {
        text.push_str(&format!(
            "---\nkind: AgentPolicy\nname: agent-{a}\nidentity: spiffe://example.org/agent/a{a}\negress:\n"
        ));
        for r in 0..10 {
            text.push_str(&format!(
                "  - to: [198.51.100.{}/32]\n    ports: [{}]\n    protocol: tcp\n",
                (a * 10 + r) % 250,
                443 + r
            ));
        }
    }
    PushRequest {
        base_version: None,
        signing: Default::default(),
        files: vec![agentwall::control_plane::BundleFile {
            name: "agents.yaml".into(),
            text,
        }],
    }
}

fn vm(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One simulated node: long-polls, validates each bundle (when `check`) and reports when it
/// holds it.
async fn sim_node(
    c: Client,
    check: bool,
    applied: tokio::sync::mpsc::UnboundedSender<(u64, Instant, Instant)>,
    revoked: tokio::sync::mpsc::UnboundedSender<Instant>,
) {
    let (mut known, mut generation, mut applied_version) = (0u64, 0u64, None);
    loop {
        let req = PollRequest {
            known_version: known,
            revocation_gen: generation,
            applied_version,
            agent_version: "bench".into(),
            wait_ms: 25_000,
            ..PollRequest::default()
        };
        let r: PollReply = match c
            .send_json(
                hyper::Method::POST,
                "/v1/node/poll",
                &req,
                Duration::from_secs(40),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => panic!("poll failed: {e}"),
        };
        let received = Instant::now();
        if r.revocation_gen != generation && !r.revoked.is_empty() {
            let _ = revoked.send(received);
        }
        generation = r.revocation_gen;
        known = r.version;
        if let Some(b) = r.bundle {
            if check {
                let files = b.files.clone();
                tokio::task::spawn_blocking(move || {
                    agentwall::control_plane::validate(&files).expect("pushed bundles are valid")
                })
                .await
                .unwrap();
            }
            applied_version = Some(b.version);
            let _ = applied.send((b.version, received, Instant::now()));
        }
    }
}

/// Pushes `pushes` bundles through `admin_url` to polling nodes (`clients`); from each push
/// to each node: received, and received and validated (with `check`).
/// The long-polls the servers behind `readers` hold now.
async fn polls_held(readers: &[Client]) -> u64 {
    let mut n = 0;
    for r in readers {
        let (_, body, _) = r
            .request(
                hyper::Method::GET,
                "/v1/metrics",
                None,
                Duration::from_secs(10),
            )
            .await
            .expect("metrics");
        n += String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("agentwall_cp_polls_held "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    n
}

/// Waits until the servers hold `n` polls: every node is waiting for the next change.
async fn all_waiting(readers: &[Client], n: usize) {
    let t0 = Instant::now();
    while polls_held(readers).await < n as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{n} nodes not all polling within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The servers under test as the benchmark reaches them: the admin (pushes go to the first
/// replica) and a security reader of each replica (its metrics).
struct Servers<'a> {
    rt: &'a tokio::runtime::Runtime,
    admin: &'a Client,
    readers: &'a [Client],
}

fn push_latency(
    t: &Servers<'_>,
    clients: Vec<Client>,
    pushes: usize,
    check: bool,
    revoke: Option<&str>,
    mut on_ready: impl FnMut(),
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (rt, admin, readers) = (t.rt, t.admin, t.readers);
    let n = clients.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in clients {
            tasks.push(tokio::spawn(sim_node(c, check, tx.clone(), rtx.clone())));
        }
        // Each node takes the current bundle first (when there is one).
        let current: Option<agentwall::control_plane::Bundle> = admin.get("/v1/policy").await.ok();
        if current.is_some() {
            for _ in 0..n {
                tokio::time::timeout(Duration::from_secs(300), rx.recv())
                    .await
                    .expect("every node takes the current bundle within 300 s")
                    .unwrap();
            }
        }
        let first = current.map_or(0, |b| b.version as usize) + 1;
        let mut lat = Vec::with_capacity(n * pushes);
        let mut delivered = Vec::with_capacity(n * pushes);
        for p in 0..pushes {
            // Every node back in its wait before the next push.
            all_waiting(readers, n).await;
            if p == 0 {
                on_ready();
            }
            let sent = Instant::now();
            let b: agentwall::control_plane::Bundle = admin
                .send_json(
                    hyper::Method::PUT,
                    "/v1/policy",
                    &bundle(first + p),
                    Duration::from_secs(30),
                )
                .await
                .expect("push");
            let mut got = 0;
            while got < n {
                let (v, received, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .expect("every node receives it within 60 s")
                    .unwrap();
                if v != b.version {
                    continue;
                }
                lat.push(at - sent);
                delivered.push(received - sent);
                got += 1;
            }
        }
        // A fleet-wide revocation, timed the same way.
        let mut revocation = Vec::new();
        if let Some(identity) = revoke {
            all_waiting(readers, n).await;
            let sent = Instant::now();
            let _: serde_json::Value = admin
                .send_json(
                    hyper::Method::POST,
                    "/v1/revocations",
                    &serde_json::json!({ "identity": identity }),
                    Duration::from_secs(30),
                )
                .await
                .expect("revoke");
            for _ in 0..n {
                let at = tokio::time::timeout(Duration::from_secs(60), rrx.recv())
                    .await
                    .expect("every node gets the revocation within 60 s")
                    .unwrap();
                revocation.push(at - sent);
            }
            revocation.sort_unstable();
        }
        for t in tasks {
            t.abort();
        }
        lat.sort_unstable();
        delivered.sort_unstable();
        (delivered, lat, revocation)
    })
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// One store and replica count under test.
struct Setup {
    name: &'static str,
    replicas: usize,
    /// `--database` of each replica.
    database: String,
}

/// What one setup measured.
struct Measured {
    ingested: f64,
    exhausted: bool,
    delivered: Vec<Duration>,
    revocation: Vec<Duration>,
    /// Server RSS (KiB, all replicas) before the fleet polls and while it does.
    idle_rss: u64,
    held_rss: u64,
}

/// Records/s written straight into `store` for 3 s.
fn store_baseline(store: &dyn Store, records: &str) -> f64 {
    let parsed: Vec<Reported> = serde_json::from_str(records).unwrap();
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut epoch = 1u64;
    while t0.elapsed() < Duration::from_secs(3) {
        n += store.ingest("node", epoch, &parsed).unwrap().accepted;
        epoch += 1;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn measure(
    rt: &tokio::runtime::Runtime,
    fx: &CpFixture,
    setup: &Setup,
    certs: &[(std::path::PathBuf, std::path::PathBuf)],
    bodies: &[Vec<Bytes>],
    pushes: usize,
) -> Measured {
    eprintln!("{} with {} replica(s)", setup.name, setup.replicas);
    let servers: Vec<CpProc> = (0..setup.replicas)
        .map(|i| {
            CpProc::start_with(
                fx,
                None,
                &format!("cp-{}-{}-{i}", setup.name, setup.replicas),
                &["--database", &setup.database],
            )
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let rss = || -> u64 { servers.iter().map(|s| vm(s.child.id(), "VmRSS:")).sum() };

    // Ingest: the nodes spread over the replicas.
    let clients: Vec<Client> = (0..INGEST_NODES)
        .map(|i| fx.client(&urls[i % urls.len()], Some(certs[FLEET + i].clone()), None))
        .collect();
    let accepted = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(INGEST_SECS);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (c, batches) in clients.into_iter().zip(bodies.iter().cloned()) {
            let accepted = accepted.clone();
            let exhausted = exhausted.clone();
            tasks.push(tokio::spawn(async move {
                for b in batches {
                    if Instant::now() >= deadline {
                        return;
                    }
                    let r = c.post_compressed(b).await.expect("ingest");
                    assert_eq!(r.duplicates, 0);
                    accepted.fetch_add(r.accepted, Relaxed);
                }
                exhausted.fetch_add(1, Relaxed);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let ingested = accepted.load(Relaxed) as f64 / t0.elapsed().as_secs_f64();

    // The fleet, spread over the replicas; pushes and the revocation through the first.
    let admin = fx.client(&urls[0], Some(fx.admin.clone()), None);
    let idle_rss = rss();
    let fleet: Vec<Client> = (0..FLEET)
        .map(|i| fx.client(&urls[i % urls.len()], Some(certs[i].clone()), None))
        .collect();
    let readers: Vec<Client> = urls
        .iter()
        .map(|u| fx.client(u, None, Some(&fx.security_token)))
        .collect();
    let mut held_rss = 0;
    let (delivered, _, revocation) = push_latency(
        &Servers {
            rt,
            admin: &admin,
            readers: &readers,
        },
        fleet,
        pushes,
        false,
        Some(&format!("spiffe://example.org/agent/a{}", setup.replicas)),
        || held_rss = rss(),
    );

    drop(servers);
    Measured {
        ingested,
        exhausted: exhausted.load(Relaxed) > 0,
        delivered,
        revocation,
        idle_rss,
        held_rss,
    }
}

pub fn run(pushes: usize) {
    raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::on(tmp.path(), false);
    // Ten thousand nodes on one address, each with a connection or two.
    fx.configure(
        "",
        "[limits]\nmax_connections = 16000\nmax_connections_per_address = 16000\n",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    eprintln!("issuing {} node certificates", FLEET + INGEST_NODES);
    let certs: Vec<(std::path::PathBuf, std::path::PathBuf)> = (0..FLEET + INGEST_NODES)
        .map(|i| {
            let id = format!("spiffe://example.org/node/sim-{i}");
            write_cert(
                &fx.dir,
                &format!("sim-{i}"),
                &fx.ca.issue(&CertSpec::agent(&id)),
            )
        })
        .collect();

    // The stores' own rates, in this process: the baselines.
    let records = records_json();
    let keep = Retention {
        days: 3650,
        max_bytes: None,
    };
    let sqlite_baseline = store_baseline(
        &SqliteStore::open(&tmp.path().join("baseline.db"), keep).unwrap(),
        &records,
    );
    let pg_baseline_db = scratch::database();
    let pg_baseline = store_baseline(
        &PgStore::open(&PgOptions {
            url: pg_baseline_db.url.clone(),
            password_file: None,
            ca: None,
            retention: keep,
        })
        .unwrap(),
        &records,
    );
    let fastest = sqlite_baseline.max(pg_baseline) * 2.0;
    let per_node = ((fastest * INGEST_SECS as f64 * 1.5) as usize / BATCH / INGEST_NODES).max(20);
    eprintln!(
        "preparing {} batches of {BATCH} records",
        per_node * INGEST_NODES
    );
    let bodies: Vec<Vec<Bytes>> = (0..INGEST_NODES)
        .map(|node| {
            (0..per_node)
                .map(|b| {
                    gzip(&format!(
                        "{{\"epoch\":{},\"records\":{records}}}",
                        1 + node * per_node + b
                    ))
                })
                .collect()
        })
        .collect();

    // Push-to-enforced with one node, validation included: the baseline for the fan-out.
    let one = {
        let server = CpProc::start_with(&fx, None, "cp-one", &[]);
        let admin = fx.client(&server.url, Some(fx.admin.clone()), None);
        let node = fx.client(&server.url, Some(certs[0].clone()), None);
        let reader = fx.client(&server.url, None, Some(&fx.security_token));
        let readers = [reader];
        let servers = Servers {
            rt: &rt,
            admin: &admin,
            readers: &readers,
        };
        push_latency(&servers, vec![node], pushes, true, None, || {}).1
    };

    let pg1 = scratch::database();
    let pg2 = scratch::database();
    let setups = [
        Setup {
            name: "SQLite",
            replicas: 1,
            database: tmp.path().join("bench.db").display().to_string(),
        },
        Setup {
            name: "PostgreSQL",
            replicas: 1,
            database: pg1.url.clone(),
        },
        Setup {
            name: "PostgreSQL",
            replicas: 2,
            database: pg2.url.clone(),
        },
    ];
    let measured: Vec<Measured> = setups
        .iter()
        .map(|s| measure(&rt, &fx, s, &certs, &bodies, pushes))
        .collect();

    let b = bundle(0);
    println!();
    println!(
        "control plane: real server processes, real client over TLS on loopback; PostgreSQL 15 on the same machine"
    );
    println!();
    println!(
        "ingest: {INGEST_NODES} nodes posting gzip'd batches of {BATCH} records for {INGEST_SECS} s, spread over the replicas"
    );
    println!("| | records/s |");
    println!("|---|---|");
    println!("| SQLite store in process (baseline) | {sqlite_baseline:.0} |");
    println!("| PostgreSQL store in process (baseline) | {pg_baseline:.0} |");
    for (s, m) in setups.iter().zip(&measured) {
        let base = if s.name == "SQLite" {
            sqlite_baseline
        } else {
            pg_baseline
        };
        println!(
            "| {}, {} replica(s), through the server | {:.0} ({:.2}x its baseline){} |",
            s.name,
            s.replicas,
            m.ingested,
            m.ingested / base,
            if m.exhausted {
                " (ran out of prepared batches: a lower bound)"
            } else {
                ""
            }
        );
    }
    println!();
    println!(
        "from the push (or revocation) being sent through the first replica, {pushes} pushes of 50 identities x 10 rules ({} KiB), {FLEET} nodes spread over the replicas:",
        b.files[0].text.len() / 1024
    );
    println!("| | p50 | p99 | max |");
    println!("|---|---|---|---|");
    let row = |what: String, l: &[Duration]| {
        println!(
            "| {what} | {} | {} | {} |",
            ms(percentile(l, 0.5)),
            ms(percentile(l, 0.99)),
            ms(*l.last().unwrap())
        )
    };
    row(
        "1 node (SQLite): received and validated (baseline)".into(),
        &one,
    );
    for (s, m) in setups.iter().zip(&measured) {
        row(
            format!(
                "{}, {} replica(s): {FLEET} nodes received the push",
                s.name, s.replicas
            ),
            &m.delivered,
        );
        row(
            format!(
                "{}, {} replica(s): {FLEET} nodes received the revocation",
                s.name, s.replicas
            ),
            &m.revocation,
        );
    }
    println!();
    println!("| server memory (all replicas) | idle | {FLEET} polls held | per 1,000 polls |");
    println!("|---|---|---|---|");
    for (s, m) in setups.iter().zip(&measured) {
        println!(
            "| {}, {} replica(s) | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            s.name,
            s.replicas,
            m.idle_rss as f64 / 1024.0,
            m.held_rss as f64 / 1024.0,
            m.held_rss.saturating_sub(m.idle_rss) as f64 / 1024.0 / (FLEET as f64 / 1000.0)
        );
    }
    println!();
    println!(
        "targets: PostgreSQL ingest at least 100,000 records/s with two replicas; push to {FLEET} nodes received under 1 s p99"
    );
}
