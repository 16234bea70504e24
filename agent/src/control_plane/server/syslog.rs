//! Forwarding to a SIEM: every record nodes send (decisions, DNS, identities), as an OCSF event in an RFC 5424
//! message over TLS (RFC 5425: octet-counted frames). One replica forwards at a time (a
//! lease in the store, renewed every turn). The stored cursor moves past a page only once
//! it was sent and lingered on a connection the receiver kept open; a crash, a failed
//! connection or a takeover sends what was not confirmed again (at least once: a receiver
//! may see a page twice, and never miss one it stayed up for).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::io::AsyncWriteExt as _;
use tracing::{info, warn};

use super::Server;
use crate::{config::control_plane::Syslog, control_plane::FlowQuery};

/// The store's name for this forwarding (its cursor and lease).
const NAME: &str = "syslog";
/// How long a lease lasts; renewed at every page, so a replica that stops is taken over
/// after at most this.
const LEASE: Duration = Duration::from_secs(30);
/// Records read and sent at a time ...
const PAGE: u32 = 500;
/// ... or fewer, once their frames reach this many bytes.
const PAGE_BYTES: usize = 2 << 20;
/// The wait before trying again after a failure (a dead receiver, the database away).
const RETRY: Duration = Duration::from_secs(2);
/// The wait for new records when all are sent.
const IDLE: Duration = Duration::from_millis(500);
/// How long a page stays unconfirmed on an open link: a receiver that goes away within it
/// gets the page again on the next link.
const LINGER: Duration = Duration::from_secs(2);
/// syslog facility 13, "log audit" (RFC 5424 table 1).
const FACILITY: u8 = 13;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
}

/// What forwarding needs, settled at start: a bad CA or key stops the start.
pub struct Forwarder {
    host: String,
    port: u16,
    name: rustls::pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    /// This process, as the lease names it.
    holder: &'static str,
}

impl Forwarder {
    pub fn new(cfg: &Syslog) -> Result<Self, ForwardError> {
        let (host, port) = cfg.host_port().map_err(ForwardError::Config)?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| ForwardError::Config(format!("syslog.address host {host:?}: {e}")))?;
        let roots = crate::pem::roots([cfg.ca.as_path()])?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ForwardError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let tls = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => {
                let (chain, k) = crate::pem::chain_and_key(cert, key)?;
                builder.with_client_auth_cert(chain, k).map_err(|e| {
                    ForwardError::Config(format!(
                        "syslog.cert {} and syslog.key {} do not make a usable credential: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Forwarder {
            host,
            port,
            name: name.to_owned(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            holder: super::replica_id(),
        })
    }

    /// Forwards for as long as the process runs.
    pub async fn run(self, server: Arc<Server>) {
        let mut link = None;
        let mut failing: Option<String> = None;
        loop {
            match self.step(&server, &mut link).await {
                Ok(sent) => {
                    if failing.take().is_some() {
                        info!(receiver = %self.host, "forwarding to the syslog receiver again");
                    }
                    if sent == 0 {
                        tokio::time::sleep(IDLE).await;
                    }
                }
                Err(e) => {
                    // What was sent on the link and not yet confirmed goes again on the next.
                    link = None;
                    server.stats.syslog_failures.fetch_add(1, Ordering::Relaxed);
                    // Logged when the reason changes, counted at every try.
                    if failing.as_deref() != Some(e.as_str()) {
                        warn!(receiver = %self.host, port = self.port, error = %e,
                            "forwarding to the syslog receiver failed; records wait in the store and are sent when it answers");
                        failing = Some(e);
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn connect(&self) -> Result<Stream, String> {
        let tcp = tokio::time::timeout(
            RETRY * 5,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(RETRY * 5, self.tls.connect(self.name.clone(), tcp))
            .await
            .map_err(|_| "the TLS handshake timed out".to_owned())?
            .map_err(|e| format!("TLS: {e}"))
    }

    /// One turn: the lease renewed, what lingered on a live link confirmed (the stored
    /// cursor moved past it), and the next page sent. How many records were sent (0:
    /// nothing new, or another replica forwards).
    async fn step(&self, server: &Arc<Server>, link: &mut Option<Link>) -> Result<usize, String> {
        let (store, holder) = (server.store.clone(), self.holder);
        let Some(confirmed) =
            super::store_call(move || store.forward_claim(NAME, holder, LEASE)).await?
        else {
            // Another replica forwards; a link of ours would only send twice.
            *link = None;
            return Ok(0);
        };
        if link.is_none() {
            let stream = self.connect().await?;
            info!(receiver = %self.host, port = self.port, after = confirmed,
                "forwarding to the syslog receiver: the records stored after this id on");
            *link = Some(Link {
                stream,
                sent: confirmed,
                pending: std::collections::VecDeque::new(),
            });
        }
        let l = link.as_mut().expect("linked above");
        l.sent = l.sent.max(confirmed);
        // A receiver gone (closed, crashed: its end of the connection shut) fails the link
        // before anything it may not have read counts as delivered.
        l.alive().await?;
        // Pages count as delivered once they lingered on a live link and the receiver's
        // host acknowledged every byte sent: a receiver that stopped reading keeps them
        // unconfirmed (sent again on the next link), however long the link stays up.
        let lingered = if l.unacknowledged() == 0 {
            l.pending
                .iter()
                .take_while(|(_, at)| at.elapsed() >= LINGER)
                .count()
        } else {
            0
        };
        if let Some(&(upto, _)) = lingered.checked_sub(1).and_then(|i| l.pending.get(i)) {
            let (store, holder) = (server.store.clone(), self.holder);
            if !super::store_call(move || store.forward_advance(NAME, holder, upto)).await? {
                // Taken over meanwhile: the other replica goes on from the stored cursor.
                *link = None;
                return Ok(0);
            }
            l.pending.drain(..lingered);
        }
        let (store, after) = (server.store.clone(), l.sent);
        // Read, mapped and framed off the async workers: events are made one at a time
        // from the stored text, so the page holds its frames and no record's tree.
        let page = super::store_call(move || {
            let page = store.flows(&FlowQuery {
                after: Some(after),
                limit: Some(PAGE),
                every_kind: true,
                ..FlowQuery::default()
            })?;
            let mut frames = Vec::new();
            let (mut not_mapped, mut read, mut last) = (0u64, 0usize, None);
            for f in &page.flows {
                if frames.len() >= PAGE_BYTES {
                    break;
                }
                let at = crate::ocsf::Origin::Stored {
                    node: &f.node,
                    id: f.id,
                };
                match crate::ocsf::event(&f.record, at) {
                    Some(e) => frame(&mut frames, &e, &f.node),
                    None => not_mapped += 1,
                }
                (read, last) = (read + 1, Some(f.id));
            }
            Ok(last.map(|id| (id, read, frames, not_mapped)))
        })
        .await?;
        let Some((last, read, frames, not_mapped)) = page else {
            return Ok(0);
        };
        let stream = &mut l.stream;
        tokio::time::timeout(LEASE / 2, async {
            stream.write_all(&frames).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| "sending timed out".to_owned())?
        .map_err(|e| format!("sending: {e}"))?;
        l.pending.push_back((last, std::time::Instant::now()));
        l.sent = last;
        let st = &server.stats;
        st.syslog_forwarded
            .fetch_add(read as u64 - not_mapped, Ordering::Relaxed);
        st.syslog_not_mapped
            .fetch_add(not_mapped, Ordering::Relaxed);
        Ok(read)
    }
}

type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A connection to the receiver and what was sent on it: up to `sent`, of which the
/// `pending` pages (their last record id, when sent) are not yet confirmed. syslog has no
/// acknowledgements: a page counts as delivered once it has lingered [`LINGER`] on a link
/// still open, and a link that fails sends everything unconfirmed again on the next.
struct Link {
    stream: Stream,
    sent: u64,
    pending: std::collections::VecDeque<(u64, std::time::Instant)>,
}

impl Link {
    /// Bytes sent on the link that the receiver's host has not acknowledged yet (the
    /// socket's send queue, SIOCOUTQ); all of them when that cannot be told.
    fn unacknowledged(&self) -> usize {
        use std::os::fd::AsRawFd as _;
        let fd = self.stream.get_ref().0.as_raw_fd();
        let mut queued: libc::c_int = 0;
        // SAFETY: an open socket's descriptor and a c_int for the kernel to fill.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
            return usize::MAX;
        }
        usize::try_from(queued).unwrap_or(usize::MAX)
    }

    /// Err when the receiver has closed its end (a receiver sends nothing otherwise).
    async fn alive(&mut self) -> Result<(), String> {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(Duration::ZERO, self.stream.read(&mut buf)).await {
                // Nothing to read: open.
                Err(_) => return Ok(()),
                Ok(Ok(0)) => return Err("the receiver closed the connection".into()),
                // Whatever a receiver says is not ours to act on.
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(format!("the connection failed: {e}")),
            }
        }
    }
}

/// Appends `event` as one RFC 5424 message in an RFC 5425 frame (`LEN SP MSG`).
fn frame(out: &mut Vec<u8>, event: &crate::ocsf::Event, node: &str) {
    // OCSF severity to syslog severity: informational, notice, warning, error.
    let severity = match event.mapped["severity_id"].as_i64() {
        Some(1) => 6,
        Some(2) => 5,
        Some(3) => 4,
        Some(4..) => 3,
        _ => 5,
    };
    let pri = u32::from(FACILITY) * 8 + severity;
    // Written again as RFC 5424 takes it (upper-case T and Z, at most six fractional
    // digits, no leap second), whatever spelling of RFC 3339 the node used.
    let time = event.mapped["metadata"]["original_time"]
        .as_str()
        .and_then(|t| crate::clock::parse_rfc3339(t).ok())
        .map(|t| crate::clock::rfc3339(t.into()))
        .filter(|t| t.len() == 24)
        .unwrap_or_else(|| "-".into());
    let msg = format!(
        "<{pri}>1 {time} {} agentwall - ocsf - {}",
        header_field(node, 255),
        serde_json::to_string(event).expect("events serialize")
    );
    out.extend_from_slice(format!("{} ", msg.len()).as_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// A header field as RFC 5424 takes it: printable US-ASCII without spaces, at most `max`
/// characters; `-` when a node's name is none of that.
fn header_field(s: &str, max: usize) -> &str {
    if !s.is_empty() && s.len() <= max && s.bytes().all(|b| (33..=126).contains(&b)) {
        s
    } else {
        "-"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_octet_counted_rfc_5424_messages() {
        let serde_json::Value::Object(mapped) = serde_json::json!({
            "severity_id": 3,
            "metadata": {"original_time": "2026-12-05T01:02:03.456Z"},
            "message": "a\nb",
        }) else {
            unreachable!()
        };
        let record = serde_json::value::to_raw_value(&serde_json::json!({"a": "b\nc"})).unwrap();
        let e = crate::ocsf::Event {
            mapped,
            unmapped: crate::ocsf::Unmapped {
                agentwall: &record,
                node: None,
            },
        };
        let mut out = Vec::new();
        frame(&mut out, &e, "spiffe://example.org/node/n1");
        let mut other = e.mapped.clone();
        other["metadata"]["original_time"] = "2026-12-05t01:02:03.456789+01:00".into();
        let respelled = crate::ocsf::Event {
            mapped: other,
            unmapped: crate::ocsf::Unmapped {
                agentwall: &record,
                node: None,
            },
        };
        frame(&mut out, &respelled, "a node with spaces");
        let text = String::from_utf8(out).unwrap();
        let (len, rest) = text.split_once(' ').unwrap();
        let len: usize = len.parse().unwrap();
        let first = &rest[..len];
        assert!(
            first.starts_with(
                "<108>1 2026-12-05T01:02:03.456Z spiffe://example.org/node/n1 agentwall - ocsf - {"
            ),
            "{first}"
        );
        // The event is JSON: a newline in it is escaped, never a frame's end.
        assert!(!first.contains('\n'), "{first}");
        let second = &rest[len..];
        assert!(
            second.contains("<108>1 2026-12-05T00:02:03.456Z - agentwall - ocsf - "),
            "{second}"
        );
    }
}
