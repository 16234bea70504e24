//! `cargo xtask bench control-plane`: the real server process (SQLite, WAL) on loopback, fed
//! and polled by simulated nodes that use the real client (`agentwall::control_plane::client`).
//!
//! - Ingest: nodes post gzip'd batches of 1,000 decision records back to back for a fixed
//!   time; the baseline is the same batches written straight into a `SqliteStore` in this
//!   process, so the ratio is what HTTPS, TLS, gzip and JSON cost on top of the database.
//! - Push-to-enforced: nodes long-poll; an admin pushes a bundle and each node counts it
//!   enforced once it has validated it (the node's own check before it applies). Latency runs
//!   from the push being sent to that moment, with 1 node (baseline) and with 1,000.
//! - Server memory while 1,000 long-polls are held.

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
    store::{SqliteStore, Store},
};
use agentwall_tests::cp::{CpFixture, CpProc};
use bytes::Bytes;

const BATCH: usize = 1000;
const INGEST_NODES: usize = 16;
const INGEST_SECS: u64 = 8;
const FLEET: usize = 1000;

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

/// Pushes `pushes` bundles to `n` polling nodes; latencies from each push to each node.
/// The server under test, as the simulated nodes reach it.
struct Target<'a> {
    rt: &'a tokio::runtime::Runtime,
    fx: &'a CpFixture,
    url: &'a str,
}

fn push_latency(
    t: &Target<'_>,
    n: usize,
    pushes: usize,
    first_push: usize,
    check: bool,
    revoke: bool,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<Client> = (0..n)
        .map(|i| t.fx.node_client(t.url, &format!("sim{n}-{i}")))
        .collect();
    let admin = t.fx.client(t.url, Some(t.fx.admin.clone()), None);
    t.rt.block_on(async {
        let mut tasks = Vec::new();
        for c in clients {
            tasks.push(tokio::spawn(sim_node(c, check, tx.clone(), rtx.clone())));
        }
        // Each node takes the current bundle first.
        let mut current = 0;
        if first_push > 1 {
            for _ in 0..n {
                rx.recv().await.unwrap();
            }
            current = first_push - 1;
        }
        let _ = current;
        let mut lat = Vec::with_capacity(n * pushes);
        let mut delivered = Vec::with_capacity(n * pushes);
        for p in 0..pushes {
            // Let every node get back into its wait before the next push.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent = Instant::now();
            let b: agentwall::control_plane::Bundle = admin
                .send_json(
                    hyper::Method::PUT,
                    "/v1/policy",
                    &bundle(first_push + p),
                    Duration::from_secs(30),
                )
                .await
                .expect("push");
            let mut got = 0;
            while got < n {
                let (v, received, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .expect("every node enforces within 60 s")
                    .unwrap();
                assert_eq!(v, b.version);
                lat.push(at - sent);
                delivered.push(received - sent);
                got += 1;
            }
        }
        // A fleet-wide revocation, timed the same way.
        let mut revocation = Vec::new();
        if revoke {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent = Instant::now();
            let _: serde_json::Value = admin
                .send_json(
                    hyper::Method::POST,
                    "/v1/revocations",
                    &serde_json::json!({ "identity": "spiffe://example.org/agent/a7" }),
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

pub fn run(pushes: usize) {
    raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let fx = CpFixture::new(tmp.path());
    let server = CpProc::start(&fx, None);
    let url = server.url.clone();
    let pid = server.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Ingest.
    let records = records_json();
    let baseline = {
        let store = SqliteStore::open(&tmp.path().join("baseline.db"), Default::default()).unwrap();
        let parsed: Vec<Reported> = serde_json::from_str(&records).unwrap();
        let t0 = Instant::now();
        let mut n = 0u64;
        let mut epoch = 1u64;
        while t0.elapsed() < Duration::from_secs(3) {
            n += store.ingest("node", epoch, &parsed).unwrap().accepted;
            epoch += 1;
        }
        n as f64 / t0.elapsed().as_secs_f64()
    };
    let per_node = ((baseline * INGEST_SECS as f64 * 1.5) as usize / BATCH / INGEST_NODES).max(20);
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
    let clients: Vec<Client> = (0..INGEST_NODES)
        .map(|i| fx.node_client(&url, &format!("ingest{i}")))
        .collect();
    let accepted = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(INGEST_SECS);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (c, batches) in clients.into_iter().zip(bodies) {
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
    let elapsed = t0.elapsed().as_secs_f64();
    let ingested = accepted.load(Relaxed) as f64 / elapsed;

    // Push-to-enforced.
    let target = Target {
        rt: &rt,
        fx: &fx,
        url: &url,
    };
    let (_, one, _) = push_latency(&target, 1, pushes, 1, true, false);
    // Delivery alone (each simulated node only decodes the answer), then with every node's
    // validation on this machine's two cores.
    let (fleet_delivered, _, revocation) =
        push_latency(&target, FLEET, pushes, pushes + 1, false, true);
    let (_, fleet, _) = push_latency(&target, FLEET, pushes, 2 * pushes + 1, true, false);
    // What one node's check of this bundle costs: all simulated nodes share this machine's
    // two cores, where a real fleet checks in parallel.
    let b = bundle(0);
    let t = Instant::now();
    for _ in 0..20 {
        agentwall::control_plane::validate(&b.files).unwrap();
    }
    let check = t.elapsed() / 20;
    let rss = vm(pid, "VmRSS:");
    let hwm = vm(pid, "VmHWM:");

    println!();
    println!("control plane: real server (SQLite, WAL), real client over TLS on loopback");
    println!();
    println!(
        "ingest: {INGEST_NODES} nodes posting gzip'd batches of {BATCH} records for {elapsed:.1} s"
    );
    println!("| | records/s |");
    println!("|---|---|");
    println!("| SqliteStore::ingest in process (baseline) | {baseline:.0} |");
    println!(
        "| through the server (HTTPS, gzip, JSON, SQLite) | {ingested:.0} ({:.2}x baseline) |",
        ingested / baseline
    );
    if exhausted.load(Relaxed) > 0 {
        println!("(some nodes ran out of prepared batches: the rate is a lower bound)");
    }
    println!();
    println!(
        "push-to-enforced over {pushes} pushes of a bundle of 50 identities x 10 rules ({} KiB), from the push being sent:",
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
    row("1 node: received and validated (baseline)".into(), &one);
    row(format!("{FLEET} nodes: received"), &fleet_delivered);
    row(
        format!(
            "{FLEET} nodes: received and validated, all {FLEET} validations on this machine's 2 cores"
        ),
        &fleet,
    );
    row(
        format!("{FLEET} nodes: a fleet-wide revocation received"),
        &revocation,
    );
    let real = percentile(&fleet_delivered, 0.99) + check;
    println!(
        "one node's validation: {}; a fleet where each node validates on its own CPU: p99 received + validation = {}",
        ms(check),
        ms(real)
    );
    println!(
        "p99 received by {FLEET} nodes / p99 enforced on 1: {:.1}x",
        percentile(&fleet_delivered, 0.99).as_secs_f64() / percentile(&one, 0.99).as_secs_f64()
    );
    println!();
    println!(
        "server memory with {FLEET} long-polls held: RSS {:.1} MiB, peak {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "targets: 50,000 records/s ingested; push-to-enforced p99 under 1 s with {FLEET} nodes; revocation on every connected node within 2 s"
    );
}
