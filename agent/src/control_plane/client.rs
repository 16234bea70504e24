//! The control plane's client, used by the node and by `agentwall cp`: HTTPS over rustls,
//! one kept-alive HTTP/1.1 connection per client, opened again when it breaks. Given several
//! URLs (replicas), it stays with one until it fails, then moves to the next.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, client::conn::http1::SendRequest};
use rustls::pki_types::ServerName;

use super::ErrorBody;
use crate::config::control_plane::ClientConfig;

/// The largest answer read: a bundle with room to spare, a page of flows unless its records
/// are huge (then a smaller `--limit` reads it).
const MAX_ANSWER: usize = 256 << 20;

/// A `Retry-After` value in seconds from `now`: delay-seconds, or an HTTP-date (RFC 9110,
/// IMF-fixdate and the other forms RFC 2822 reads), a date already past being 0.
fn retry_after_secs(v: &str, now: jiff::Timestamp) -> Option<u64> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let at = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let secs = at.as_second().saturating_sub(now.as_second());
    Some(u64::try_from(secs).unwrap_or(0))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane client: {0}")]
    Config(String),
    #[error(transparent)]
    Credentials(#[from] crate::pem::PemError),
    #[error("{path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the control plane at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("the control plane at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the control plane refused {what}: {status}: {body}")]
    Refused {
        what: String,
        status: StatusCode,
        body: String,
        /// Per-file problems of a refused policy push.
        errors: Vec<super::WireError>,
        /// Seconds the server asked the caller to wait (`Retry-After`).
        retry_after: Option<u64>,
    },
    #[error("the control plane answered {what} with something unreadable: {0}", what = .1)]
    BadAnswer(String, String),
}

impl ClientError {
    /// Whether trying again later may work (the server is down or busy), as opposed to a
    /// refusal that will not change.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Refused { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// One control-plane URL.
struct Endpoint {
    url: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, ClientError> {
        let url = url.to_owned();
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| ClientError::Config(format!("url {url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(ClientError::Config(format!(
                "url {url:?} must start with https://"
            )));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(ClientError::Config(format!(
                "url {url:?} must not have a path"
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Config(format!("url {url:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| ClientError::Config(format!("url {url:?}: host: {e}")))?;
        Ok(Self {
            url,
            host,
            port,
            server_name,
        })
    }
}

pub struct Client {
    endpoints: Vec<Endpoint>,
    /// The endpoint in use: requests go there until one fails to reach it.
    current: Arc<std::sync::atomic::AtomicUsize>,
    tls: tokio_rustls::TlsConnector,
    token: Option<String>,
    /// The kept connection, and the endpoint it goes to.
    conn: tokio::sync::Mutex<Option<(usize, SendRequest<Full<Bytes>>)>>,
}

/// A client's URL in use, as it moves from replica to replica.
#[derive(Clone, Debug)]
pub struct CurrentUrl {
    urls: Arc<[String]>,
    at: Arc<std::sync::atomic::AtomicUsize>,
}

impl CurrentUrl {
    pub fn get(&self) -> &str {
        &self.urls[self.at.load(std::sync::atomic::Ordering::Relaxed)]
    }
}

/// Whether a failure says the replica is gone or broken (try another), as opposed to an
/// answer that another replica would give too.
fn is_failover(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } | ClientError::Timeout { .. } => true,
        ClientError::Refused {
            status,
            retry_after,
            ..
        } => {
            matches!(
                *status,
                StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
            ) || (*status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_none())
                || *status == StatusCode::INTERNAL_SERVER_ERROR
                // A replica behind what the node has seen.
                || *status == StatusCode::CONFLICT
        }
        _ => false,
    }
}

impl Client {
    pub fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let urls = cfg.urls().map_err(ClientError::Config)?;
        if urls.is_empty() {
            return Err(ClientError::Config(
                "no url (https://HOST:PORT) is set".into(),
            ));
        }
        let endpoints = urls
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let ca = cfg.ca.as_ref().ok_or_else(|| {
            ClientError::Config("no ca (the CA bundle of the server's certificate) is set".into())
        })?;
        let roots = crate::pem::roots([ca.as_path()])?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => {
                let (chain, k) = crate::pem::chain_and_key(cert, key)?;
                builder.with_client_auth_cert(chain, k).map_err(|e| {
                    ClientError::Config(format!(
                        "{} and {} do not make a usable credential: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(ClientError::Config(
                    "cert and key go together: set both or neither".into(),
                ));
            }
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = match &cfg.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| ClientError::Token {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        if cfg.cert.is_none() && token.is_none() {
            return Err(ClientError::Config(
                "no credentials: set cert and key, or token_file".into(),
            ));
        }
        Ok(Self {
            endpoints,
            current: Arc::default(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            token,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The URL requests go to now.
    pub fn url(&self) -> &str {
        &self.endpoints[self.current.load(std::sync::atomic::Ordering::Relaxed)].url
    }

    /// Moves to the next URL (with several): the caller judged the answer of this one wrong
    /// (a replica behind the others).
    pub fn skip(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.endpoints.len();
        let at = self.current.load(Relaxed);
        if n > 1
            && self
                .current
                .compare_exchange(at, (at + 1) % n, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(from = %self.endpoints[at].url, to = %self.endpoints[(at + 1) % n].url,
                "control plane behind; moving to the next URL");
        }
    }

    /// The URL requests go to, readable from elsewhere as it changes (a status view).
    pub fn current_url(&self) -> CurrentUrl {
        CurrentUrl {
            urls: self.endpoints.iter().map(|e| e.url.clone()).collect(),
            at: self.current.clone(),
        }
    }

    async fn connect(&self, ep: &Endpoint) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let unreachable = |message: String| ClientError::Unreachable {
            url: ep.url.clone(),
            message,
        };
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(ep.server_name.clone(), tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// Sends one request and returns the answer's status, body and `Retry-After` (in
    /// seconds). When the control plane in use cannot be reached, fails, or says it is
    /// going away, the request is sent to the next URL (each tried once), which is used from
    /// then on. Every route may be sent twice: reports are stored once by their ids, polls
    /// and revocations are idempotent.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, bool)>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes, Option<u64>), ClientError> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.endpoints.len();
        // A push sent once may have been stored though no answer came: sent again to another
        // replica it would be stored twice, perhaps after a later one. Only a push that never
        // left is sent elsewhere; every other route may be sent twice.
        let once = method == Method::PUT;
        let mut tries = 0;
        loop {
            let at = self.current.load(Relaxed);
            let sent = std::sync::atomic::AtomicBool::new(false);
            let r = self
                .request_at(at, method.clone(), path, body.clone(), timeout, &sent, once)
                .await;
            if once && sent.load(Relaxed) {
                return r;
            }
            let failed = match &r {
                Ok((status, _, retry_after)) => {
                    n > 1
                        && is_failover(&ClientError::Refused {
                            what: String::new(),
                            status: *status,
                            body: String::new(),
                            errors: Vec::new(),
                            retry_after: *retry_after,
                        })
                }
                Err(e) => n > 1 && is_failover(e),
            };
            tries += 1;
            if !failed || tries >= n {
                return r;
            }
            // Another request may have moved on already: move only from where this one was.
            let next = (at + 1) % n;
            if self
                .current
                .compare_exchange(at, next, Relaxed, Relaxed)
                .is_ok()
            {
                tracing::warn!(from = %self.endpoints[at].url, to = %self.endpoints[next].url,
                    "control plane failed; moving to the next URL");
            }
        }
    }

    /// One request to the `at`-th URL; `sent` is set once its bytes may have left. A
    /// request sent `once` is not sent again on a new connection either.
    #[allow(clippy::too_many_arguments)]
    async fn request_at(
        &self,
        at: usize,
        method: Method,
        path: &str,
        body: Option<(Bytes, bool)>,
        timeout: Duration,
        sent: &std::sync::atomic::AtomicBool,
        once: bool,
    ) -> Result<(StatusCode, Bytes, Option<u64>), ClientError> {
        let ep = &self.endpoints[at];
        let fut = async {
            let mut guard = self.conn.lock().await;
            for attempt in 0..2 {
                let mut send = match guard.take() {
                    Some((to, s)) if to == at && !s.is_closed() => s,
                    _ => self.connect(ep).await?,
                };
                if send.ready().await.is_err() {
                    continue;
                }
                let mut req = Request::builder()
                    .method(method.clone())
                    .uri(path)
                    .header(hyper::header::HOST, format!("{}:{}", ep.host, ep.port));
                if let Some(t) = &self.token {
                    req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                let payload = match &body {
                    Some((b, gzip)) => {
                        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                        if *gzip {
                            req = req.header(hyper::header::CONTENT_ENCODING, "gzip");
                        }
                        b.clone()
                    }
                    None => Bytes::new(),
                };
                let req = req
                    .body(Full::new(payload))
                    .map_err(|e| ClientError::Config(e.to_string()))?;
                sent.store(true, std::sync::atomic::Ordering::Relaxed);
                match send.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let retry_after = resp
                            .headers()
                            .get(hyper::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| retry_after_secs(v, jiff::Timestamp::now()));
                        // Bounded: a hostile or broken server cannot make the node (or the
                        // CLI) hold an answer of any size. The connection is not reused.
                        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                            .collect()
                            .await
                            .map_err(|e| ClientError::Unreachable {
                                url: ep.url.clone(),
                                message: if e.is::<http_body_util::LengthLimitError>() {
                                    format!("an answer over {} MiB", MAX_ANSWER >> 20)
                                } else {
                                    e.to_string()
                                },
                            })?
                            .to_bytes();
                        *guard = Some((at, send));
                        return Ok((status, bytes, retry_after));
                    }
                    // A kept-alive connection the server closed meanwhile: once more on a
                    // new one (not a push: its bytes may have reached the server).
                    Err(e)
                        if attempt == 0
                            && !once
                            && (e.is_closed() || e.is_incomplete_message()) =>
                    {
                        continue;
                    }
                    Err(e) => {
                        return Err(ClientError::Unreachable {
                            url: ep.url.clone(),
                            message: e.to_string(),
                        });
                    }
                }
            }
            Err(ClientError::Unreachable {
                url: ep.url.clone(),
                message: "the connection closed".into(),
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => {
                // Whatever the connection was in the middle of is unusable now.
                *self.conn.lock().await = None;
                Err(ClientError::Timeout {
                    url: ep.url.clone(),
                    secs: timeout.as_secs(),
                })
            }
        }
    }

    /// A request whose answer is JSON; refusals become [`ClientError::Refused`] with the
    /// server's message.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, bool)>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let what = format!("{method} {path}");
        let (status, bytes, retry_after) = self.request(method, path, body, timeout).await?;
        if !status.is_success() {
            let parsed: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            return Err(ClientError::Refused {
                what,
                status,
                body: parsed.as_ref().map_or_else(
                    || String::from_utf8_lossy(&bytes).into_owned(),
                    |b| b.error.clone(),
                ),
                errors: parsed.map(|b| b.errors).unwrap_or_default(),
                retry_after,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer(e.to_string(), what))
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None, Duration::from_secs(30))
            .await
    }

    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let b = Bytes::from(serde_json::to_vec(body).expect("requests serialize"));
        self.call(method, path, Some((b, false)), timeout).await
    }

    /// Posts a report batch, gzip-compressed.
    pub async fn post_reports(
        &self,
        batch: &super::ReportBatch,
    ) -> Result<super::Ingested, ClientError> {
        use std::io::Write as _;
        let json = serde_json::to_vec(batch).expect("batches serialize");
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(json.len() / 4),
            flate2::Compression::fast(),
        );
        enc.write_all(&json)
            .map_err(|e| ClientError::Config(format!("compressing a batch: {e}")))?;
        let body = enc
            .finish()
            .map_err(|e| ClientError::Config(format!("compressing a batch: {e}")))?;
        self.post_compressed(Bytes::from(body)).await
    }

    /// Posts a report batch already serialized and gzip-compressed.
    pub async fn post_compressed(&self, body: Bytes) -> Result<super::Ingested, ClientError> {
        self.call(
            Method::POST,
            "/v1/node/reports",
            Some((body, true)),
            Duration::from_secs(60),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicUsize};

    /// A TLS server on loopback that reads each request's head and closes the connection
    /// without an answer (a replica that died while the request was in it); counts the
    /// requests that reached it.
    async fn mute_server(ca: &std::path::Path) -> (String, Arc<AtomicUsize>) {
        use rcgen::{CertificateParams, IsCa, Issuer, KeyPair};
        use tokio::io::AsyncReadExt as _;
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        std::fs::write(ca, p.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = Issuer::new(p, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(crate::identity::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let heard = Arc::new(AtomicUsize::new(0));
        let h = heard.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, h) = (acceptor.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        (url, heard)
    }

    /// A push whose bytes reached a replica that then died is sent neither to another
    /// replica nor again to the same one (it may have been stored); a poll is.
    #[tokio::test]
    async fn a_push_that_left_is_sent_once_and_a_poll_again() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (a, heard_a) = mute_server(&dir.path().join("a.pem")).await;
        let (b, heard_b) = mute_server(&dir.path().join("b.pem")).await;
        let bundle = dir.path().join("cas.pem");
        std::fs::write(
            &bundle,
            [
                std::fs::read_to_string(dir.path().join("a.pem")).unwrap(),
                std::fs::read_to_string(dir.path().join("b.pem")).unwrap(),
            ]
            .concat(),
        )
        .unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "admin-token-0123456789").unwrap();
        let c = super::Client::new(&crate::config::control_plane::ClientConfig {
            url: None,
            urls: vec![a, b],
            ca: Some(bundle),
            cert: None,
            key: None,
            token_file: Some(token),
            ..Default::default()
        })
        .unwrap();
        let body = Some((bytes::Bytes::from_static(b"{}"), false));
        let timeout = std::time::Duration::from_secs(10);
        let e = c
            .request(hyper::Method::PUT, "/v1/policy", body.clone(), timeout)
            .await
            .unwrap_err();
        assert!(matches!(e, super::ClientError::Unreachable { .. }), "{e}");
        assert_eq!((heard_a.load(SeqCst), heard_b.load(SeqCst)), (1, 0));
        // A poll: again on a new connection, then at the next replica.
        c.request(hyper::Method::POST, "/v1/node/poll", body, timeout)
            .await
            .unwrap_err();
        assert!(heard_a.load(SeqCst) >= 2 && heard_b.load(SeqCst) >= 1);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_a_date() {
        let now: jiff::Timestamp = "2026-12-03T08:49:30Z".parse().unwrap();
        assert_eq!(super::retry_after_secs("120", now), Some(120));
        assert_eq!(
            super::retry_after_secs("Thu, 03 Dec 2026 08:50:00 GMT", now),
            Some(30)
        );
        assert_eq!(
            super::retry_after_secs("Thu, 03 Dec 2026 08:00:00 GMT", now),
            Some(0)
        );
        assert_eq!(super::retry_after_secs("soon", now), None);
        assert_eq!(super::retry_after_secs("-5", now), None);
    }
}
