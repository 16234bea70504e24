//! The node's local API: one JSON request and one JSON response per connection, inside TLS 1.3
//! over a unix socket. The client certificate is the agent's identity (proof of possession is
//! the handshake itself); the server is authenticated by the socket: clients refuse a socket
//! not owned by root.

use std::{
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::MetadataExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, SignatureScheme,
    StreamOwned,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};
use serde::{Deserialize, Serialize};

use crate::identity::{TrustStore, provider};

/// The name the node's ephemeral server certificate carries.
pub const SERVER_NAME: &str = "agentwall.node";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Place the calling process in a cgroup bound to the certificate's identity; with
    /// `follow`, the node renews the session from those files whenever they are rewritten.
    /// `workload_api`: the launcher keeps a SPIFFE Workload API stream at that endpoint and
    /// renews (or ends) the session from it (shown in `status`).
    Launch {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        follow: Option<Follow>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload_api: Option<String>,
        /// The chain (PEM) the control plane's issuer signed for this launch (from `Join`):
        /// the node renews the session from the issuer at half its certificate's life.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued: Option<String>,
        /// The launcher keeps io_uring from the agent when the answer says `refuse`. A
        /// launcher that does not say so (one older than the answer's `io_uring`) is refused
        /// a launch whose policy refuses io_uring.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        refuses_io_uring: bool,
    },
    /// Anyone the socket lets in: trade a join token and a CSR, through the node's control
    /// plane, for a certificate (answered in `chain`) to launch with.
    Join { token: String, csr: String },
    /// Root only, with the identity's certificate: bind an existing cgroup (a systemd unit, a
    /// container) to the certificate's identity; with `follow`, renewed from those files.
    Enroll {
        cgroup: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        follow: Option<Follow>,
    },
    /// From inside a bound cgroup, with a newer certificate for the same identity: extend the
    /// cgroup's deadline to the new certificate's expiry.
    Renew,
    /// From inside a bound cgroup, with a certificate of its identity: end the session now
    /// (denied everything, its connections destroyed), for `reason`. What a Workload API
    /// keeper asks when the API says the workload's SVID is gone.
    End { reason: String },
    /// Root only: deny the identity everything at once, on every cgroup bound to it.
    Revoke { identity: String },
    /// Root only: re-read the policy directory now (as the node does on its own every half
    /// second); answers with the revision in force and the rejection, if any.
    Reload,
    /// Root only: the node's state.
    Status,
    /// Root only: run the enforcement self-check now, then answer with the node's state.
    Check,
    /// Root only: decision records after sequence number `after`.
    Flows {
        #[serde(default)]
        after: u64,
        #[serde(default)]
        verdict: Option<String>,
    },
}

impl Request {
    /// The refusal a caller who is not root gets, for requests only root may make.
    pub fn root_only(&self) -> Option<&'static str> {
        match self {
            Self::Launch { .. } | Self::Renew | Self::End { .. } | Self::Join { .. } => None,
            Self::Enroll { .. } => Some("enroll is for root only"),
            Self::Revoke { .. } => Some("revoke is for root only"),
            Self::Reload => Some("policy apply is for root only"),
            Self::Status | Self::Check => Some("status is for root only"),
            Self::Flows { .. } => Some("flows are for root only"),
        }
    }

    /// The operation a refusal is recorded under, for those that bind a cgroup.
    pub fn binding_op(&self) -> Option<&'static str> {
        match self {
            Self::Launch { .. } => Some("launch"),
            Self::Enroll { .. } => Some("enroll"),
            Self::Renew => Some("renew"),
            Self::End { .. } => Some("end"),
            _ => None,
        }
    }
}

/// The certificate and key files a launched session is renewed from (absolute paths).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Follow {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// (uid, gid) the agent runs as (`launch --user`): a root launcher's files are read as
    /// that user, who may write where they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<(u32, u32)>,
    /// Asked for (`--follow`): files the node cannot read refuse the launch. Otherwise (the
    /// default for short-lived certificates) the session is launched without following them,
    /// and the answer says why.
    #[serde(default)]
    pub asked: bool,
}

/// What a session is renewed from: the files, read with the filesystem credentials of the
/// user who launched it (or, for a root launcher, of the user the agent runs as), never the
/// node's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Followed {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Status>>,
    /// The revision in force (answer to `Reload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<crate::flows::FlowRecord>>,
    /// Done, with something the caller should know (a launch not following its files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// A certificate chain (PEM), the answer to `Join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The answer to `Launch`: whether the agent may use io_uring, as its AgentPolicy says.
    /// The launcher refuses it when a node says nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_uring: Option<crate::policy::model::IoUring>,
}

/// The node's state, as `agentwall status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The host's name.
    pub node: String,
    /// agentwall's version.
    pub version: String,
    /// Identities revoked on this node.
    pub revoked: Vec<String>,
    /// The policy revision in force.
    pub revision: String,
    /// Why the last policy change was refused (the revision in force stays).
    pub policy_error: Option<String>,
    /// Policy files a process is still writing: the directory is read once they are closed.
    #[serde(default)]
    pub policy_files_being_written: Vec<String>,
    pub identities: Vec<StatusIdentity>,
    /// Kernel records the ring buffer had no room for, since the maps were made.
    pub dropped_events: Option<u64>,
    pub map_fill: Option<crate::datapath::MapFill>,
    /// Whether socket families beyond inet are judged (the BPF LSM line).
    pub socket_families: crate::datapath::SocketFamilies,
    /// Kernel fields the node reads at offsets that move between kernels and that this
    /// kernel's BTF did not give: each line that reads one refuses what it would have judged
    /// by it (empty: every one was found; none: a node older than this list).
    #[serde(default)]
    pub kernel_layout: Option<Vec<crate::datapath::LayoutGap>>,
    /// Whether the TLS server-name check's program runs (what `sni:` policies get without it
    /// is said on [`crate::datapath::ServerNameCheck`]); none from a node built before it.
    #[serde(default)]
    pub server_name_check: Option<crate::datapath::ServerNameCheck>,
    /// The last enforcement self-check: whether each kernel line refused what it must.
    #[serde(default)]
    pub self_check: Option<crate::node::canary::SelfCheck>,
    /// Where links and maps are pinned.
    pub pins: PathBuf,
    pub catalog: StatusCatalog,
    pub dns: StatusDns,
    pub control_plane: Option<StatusLink>,
}

/// A launched or enrolled agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub identity: String,
    pub number: u32,
    pub cgroup_id: u64,
    pub cgroup: PathBuf,
    pub pid: u32,
    pub serial: String,
    pub not_after: String,
    /// Its certificate is on a CRL: the cgroup stays bound and is denied everything.
    pub revoked: bool,
    /// The files the node renews it from when they are rewritten; none: renewed by hand
    /// (`agentwall renew`) or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<Followed>,
    /// The Workload API endpoint its launcher renews it from (`launch --workload-api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_api: Option<String>,
    /// The chain (PEM) the control plane's issuer signed last for it (`launch
    /// --join-token`): the node renews it from the issuer at half its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<String>,
    /// When the certificate began (RFC 3339): with `not_after`, its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// The certificate's expiry was recorded (the kernel cut the session off on its own).
    #[serde(skip)]
    pub expiry_noted: bool,
    /// The session was recorded as past 90% of its certificate's life without a renewal.
    #[serde(skip)]
    pub aging_noted: bool,
    /// The map layout (`ABI_VERSION`) its binding was made under; 0: unknown or older than
    /// the maps in force.
    #[serde(skip)]
    pub layout: u32,
}

/// One identity of the policy in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusIdentity {
    pub identity: String,
    /// The AgentPolicy's name.
    pub policy: String,
    /// Who answers for it, and its labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::policy::owner::Owner>,
    #[serde(
        default,
        skip_serializing_if = "crate::policy::owner::Labels::is_empty"
    )]
    pub labels: crate::policy::owner::Labels,
    pub number: Option<u32>,
    /// `enforce` or `audit`.
    pub mode: String,
    /// Its effective rules.
    pub rules: usize,
    pub sessions: Vec<Session>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCatalog {
    /// AI service addresses known.
    pub addresses: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDns {
    /// The proxy's port, when it runs.
    pub port: Option<u16>,
    pub learned_addresses: usize,
    /// Why the proxy cannot serve some identity.
    pub error: Option<String>,
}

/// The control plane link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusLink {
    pub url: Option<String>,
    pub connected: bool,
    pub applied_version: u64,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub records_lost: u64,
    /// Fleet-wide revocations not applied on this node yet (retried until they are).
    #[serde(default)]
    pub revocations_pending: Vec<String>,
    /// Why the newest bundle from the control plane was not applied (the previous one is in
    /// force): invalid, or not signed as this node requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_refused: Option<String>,
}

impl Response {
    pub fn error(identity: Option<String>, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            identity,
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    // The cause is in the text, not a `source`: callers print both `{e}` and `{e:#}`, and
    // the chain would say it twice.
    #[error("node is not running: cannot connect to {path}: {error}")]
    NotRunning {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not owned by root; refusing to trust it as the node's socket")]
    UntrustedSocket { path: PathBuf },
    #[error("{path}: {message}")]
    Credential { path: PathBuf, message: String },
    #[error("private key {key} does not match certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("talking to the node: {0}")]
    Protocol(String),
}

/// The node's TLS configuration: TLS 1.3 only, an ephemeral self-signed server certificate,
/// client certificates verified by the trust store.
pub fn server_config(trust: &TrustStore) -> Result<Arc<ServerConfig>, rustls::Error> {
    let key = rcgen::KeyPair::generate().map_err(|e| rustls::Error::General(e.to_string()))?;
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| rustls::Error::General(e.into()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(trust.client_verifier())
        .with_single_cert(vec![cert.der().clone()], key)?;
    Ok(Arc::new(cfg))
}

/// The node is authenticated by the root-owned socket, not by its certificate; this still
/// checks that the server holds the key of the certificate it sent.
#[derive(Debug)]
struct SocketAuthenticated(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for SocketAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client certificate chain and its key, read from PEM files.
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Credentials {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, ApiError> {
        let cred = |path: &Path, message: String| ApiError::Credential {
            path: path.to_owned(),
            message,
        };
        let chain = crate::pem::certs(cert).map_err(|e| cred(cert, e.message))?;
        let k = crate::pem::key(key).map_err(|e| cred(key, e.message))?;
        Ok(Self {
            chain,
            key: k,
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
        })
    }

    /// A chain and key held in memory (an SVID from the Workload API); `from` names where
    /// they came from in errors.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        from: &str,
    ) -> Self {
        Self {
            chain,
            key,
            cert_path: PathBuf::from(format!("{from} (certificate)")),
            key_path: PathBuf::from(format!("{from} (key)")),
        }
    }
}

/// Sends one request to the node and returns its response.
pub fn call(
    socket: &Path,
    creds: Option<Credentials>,
    req: &Request,
) -> Result<Response, ApiError> {
    let meta = std::fs::metadata(socket).map_err(|error| ApiError::NotRunning {
        path: socket.to_owned(),
        error,
    })?;
    if meta.uid() != 0 {
        return Err(ApiError::UntrustedSocket {
            path: socket.to_owned(),
        });
    }
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ApiError::Protocol(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SocketAuthenticated(p.clone())));
    let config = match creds {
        Some(c) => {
            let key = p
                .key_provider
                .load_private_key(c.key.clone_key())
                .map_err(|e| ApiError::Credential {
                    path: c.key_path.clone(),
                    message: e.to_string(),
                })?;
            let certified = rustls::sign::CertifiedKey::new(c.chain.clone(), key);
            if certified.keys_match().is_err() {
                return Err(ApiError::KeyMismatch {
                    cert: c.cert_path,
                    key: c.key_path,
                });
            }
            builder
                .with_client_auth_cert(c.chain, c.key)
                .map_err(|e| ApiError::Credential {
                    path: c.cert_path,
                    message: e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    let stream = UnixStream::connect(socket).map_err(|error| ApiError::NotRunning {
        path: socket.to_owned(),
        error,
    })?;
    let conn = ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(SERVER_NAME).expect("valid name"),
    )
    .map_err(|e| ApiError::Protocol(e.to_string()))?;
    let mut tls = StreamOwned::new(conn, stream);
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    tls.write_all(line.as_bytes())
        .and_then(|()| tls.flush())
        .map_err(|e| ApiError::Protocol(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(&mut tls)
        .read_line(&mut reply)
        .map_err(|e| ApiError::Protocol(e.to_string()))?;
    serde_json::from_str(&reply)
        .map_err(|e| ApiError::Protocol(format!("bad response {reply:?}: {e}")))
}

const SO_PEERPIDFD: libc::c_int = 77;

/// Whether this kernel hands out a unix socket peer's pidfd (Linux 6.5), asked of a socket
/// pair of our own.
pub fn has_peer_pidfd() -> std::io::Result<bool> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    match peer_pidfd_raw(&a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn peer_pidfd_raw(sock: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket and out-buffer of the right size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel handed us a new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd for the process at the other end of a unix socket, taken by the kernel when it
/// connected: it cannot name another process later, whatever happens to the pid.
///
/// Kernels before 6.5 have no SO_PEERPIDFD: there the pidfd is opened from the pid the kernel
/// recorded at connect (SO_PEERCRED). That names the right process unless the peer exited and
/// its pid was reused in between; the README's threat model says what that allows.
pub fn peer_pidfd(sock: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    match peer_pidfd_raw(sock) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.raw_os_error() != Some(libc::ENOPROTOOPT) => return Err(e),
        Err(_) => {}
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!("this kernel has no SO_PEERPIDFD (Linux 6.5): launch identifies callers by the pid recorded at connect");
    });
    let pid = peer_cred(sock)?.pid;
    // SAFETY: plain syscall; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel handed us a new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The peer credentials of a unix socket, as the kernel recorded them at connect.
fn peer_cred(sock: &impl AsRawFd) -> std::io::Result<libc::ucred> {
    // SAFETY: zeroed ucred is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket and out-buffer.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// The uid of the peer of a unix socket (SO_PEERCRED).
pub fn peer_uid(sock: &impl AsRawFd) -> std::io::Result<u32> {
    Ok(peer_cred(sock)?.uid)
}

/// The peer's (uid, gid), as the kernel saw them when it connected.
pub fn peer_ids(sock: &impl AsRawFd) -> std::io::Result<(u32, u32)> {
    let c = peer_cred(sock)?;
    Ok((c.uid, c.gid))
}

/// The peer's supplementary groups, as the kernel saw them when it connected.
pub fn peer_groups(sock: &impl AsRawFd) -> std::io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: valid socket and out-buffer of `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // Too small: `len` says how much it needs.
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

/// The pid a pidfd refers to now (from /proc/self/fdinfo), if the process is alive.
pub fn pidfd_pid(pidfd: &OwnedFd) -> std::io::Result<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let pid: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no Pid in pidfd fdinfo"))?;
    u32::try_from(pid).map_err(|_| std::io::Error::other("process has exited"))
}

/// Whether the process behind a pidfd is still alive.
pub fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks; valid pidfd.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}
