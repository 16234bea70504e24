//! A small authoritative DNS server for tests, built on hickory-proto: UDP and TCP on one
//! address, answers from a JSON zone file that is read again whenever it changes (tests edit it
//! to change answers).
//!
//! Zone file:
//! ```json
//! { "records": [{"name": "api.example.com", "type": "A", "value": "203.0.113.10", "ttl": 300},
//!               {"name": "www.example.com", "type": "CNAME", "value": "api.example.com"}],
//!   "truncate": ["big.example.com"],   // over UDP: TC=1 and no records
//!   "garbage": ["bad.example.com"],    // answered with a compression loop
//!   "mismatch": ["mis.example.com"],   // a reply with the wrong id first, then the right one
//!   "silent": ["slow.example.com"] }   // never answered
//! ```
//! Usage: `aw-dns LISTEN_ADDR ZONE_FILE`; prints `ready` once both sockets are bound.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    str::FromStr,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata},
};

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Zone {
    records: Vec<Rec>,
    truncate: Vec<String>,
    garbage: Vec<String>,
    mismatch: Vec<String>,
    silent: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Rec {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    value: String,
    #[serde(default = "ttl")]
    ttl: u32,
}

fn ttl() -> u32 {
    300
}

fn norm(n: &str) -> String {
    n.trim_end_matches('.').to_ascii_lowercase()
}

fn has(list: &[String], name: &str) -> bool {
    list.iter().any(|n| norm(n) == name)
}

type Stamp = (Option<std::time::SystemTime>, u64);

/// The zone, parsed again only when the file changed (tests edit it to change answers).
fn zone(path: &str) -> std::sync::Arc<Zone> {
    static CACHE: std::sync::Mutex<Option<(Stamp, std::sync::Arc<Zone>)>> =
        std::sync::Mutex::new(None);
    let meta = std::fs::metadata(path).ok();
    let stamp = (
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map_or(0, |m| m.len()),
    );
    let mut cache = CACHE.lock().unwrap();
    if let Some((s, z)) = cache.as_ref() {
        if *s == stamp {
            return z.clone();
        }
    }
    let z: std::sync::Arc<Zone> = std::sync::Arc::new(
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
    );
    *cache = Some((stamp, z.clone()));
    z
}

enum Reply {
    Bytes(Vec<Vec<u8>>),
    Nothing,
}

fn answer(zone_path: &str, query: &[u8], udp: bool) -> Reply {
    let zone = zone(zone_path);
    let Ok(q) = Message::from_vec(query) else {
        return Reply::Nothing;
    };
    let Some(question) = q.queries().first().cloned() else {
        return Reply::Nothing;
    };
    let qname = norm(&question.name().to_ascii());
    if has(&zone.silent, &qname) {
        return Reply::Nothing;
    }
    if has(&zone.garbage, &qname) {
        // Header (id, QR, 1 question, 1 answer), then an answer whose name points at itself.
        let mut end = 12;
        while end < query.len() && query[end] != 0 {
            end += usize::from(query[end]) + 1;
        }
        let end = (end + 5).min(query.len());
        let mut b = Vec::new();
        b.extend_from_slice(&q.id().to_be_bytes());
        b.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&query[12..end]);
        let here = b.len() as u16;
        b.extend_from_slice(&(0xC000 | here).to_be_bytes());
        b.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 99]);
        return Reply::Bytes(vec![b]);
    }
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .add_query(question.clone());
    if udp && has(&zone.truncate, &qname) {
        m.set_truncated(true);
        return Reply::Bytes(vec![m.to_vec().unwrap()]);
    }
    let mut current = qname.clone();
    let mut found = false;
    for _ in 0..16 {
        let here: Vec<&Rec> = zone
            .records
            .iter()
            .filter(|r| norm(&r.name) == current)
            .collect();
        found |= !here.is_empty();
        let mut next = None;
        for r in here {
            let name = Name::from_str(&format!("{}.", r.name.trim_end_matches('.'))).unwrap();
            let data = match r.ty.as_str() {
                "A" if question.query_type() == RecordType::A => {
                    RData::A(rdata::A(r.value.parse().unwrap()))
                }
                "AAAA" if question.query_type() == RecordType::AAAA => {
                    RData::AAAA(rdata::AAAA(r.value.parse().unwrap()))
                }
                "CNAME" => {
                    next = Some(norm(&r.value));
                    RData::CNAME(rdata::CNAME(
                        Name::from_str(&format!("{}.", r.value.trim_end_matches('.'))).unwrap(),
                    ))
                }
                _ => continue,
            };
            m.add_answer(Record::from_rdata(name, r.ttl, data));
        }
        match next {
            Some(n) => current = n,
            None => break,
        }
    }
    if !found {
        m.set_response_code(ResponseCode::NXDomain);
    }
    let good = m.to_vec().unwrap();
    if has(&zone.mismatch, &qname) {
        let mut wrong = good.clone();
        wrong[0] ^= 0x55;
        return Reply::Bytes(vec![wrong, good]);
    }
    Reply::Bytes(vec![good])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, zone] = args.as_slice() else {
        panic!("usage: aw-dns LISTEN_ADDR ZONE_FILE");
    };
    let addr: SocketAddr = listen.parse().expect("listen address");
    let udp = UdpSocket::bind(addr).expect("bind udp");
    let tcp = TcpListener::bind(addr).expect("bind tcp");
    println!("ready");
    std::io::stdout().flush().unwrap();
    let zone_tcp = zone.clone();
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut c) = conn else { continue };
            let zone = zone_tcp.clone();
            std::thread::spawn(move || {
                loop {
                    let mut len = [0u8; 2];
                    if c.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if c.read_exact(&mut q).is_err() {
                        return;
                    }
                    if let Reply::Bytes(rs) = answer(&zone, &q, false) {
                        for r in rs {
                            let mut out = (r.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&r);
                            if c.write_all(&out).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf) else {
            continue;
        };
        if let Reply::Bytes(rs) = answer(zone, &buf[..n], true) {
            for r in rs {
                let _ = udp.send_to(&r, from);
            }
        }
    }
}
