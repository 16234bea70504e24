//! Configuration of the control plane server, of the admin CLI's client and of the node's
//! link to a control plane. TOML with defaults; unknown keys are errors; relative paths are
//! relative to the file they are written in.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CpConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What a principal may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Push policy, revoke, and read everything.
    Admin,
    /// Read nodes, flows, policy and shadow-AI reports.
    Security,
    /// Fetch policy and post reports.
    Node,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Security => "security",
            Role::Node => "node",
        })
    }
}

/// Who gets a role: certificates by SPIFFE ID (exact, or a prefix ending in `/*`) and bearer
/// tokens by their SHA-256 (hex), so the file holds no secret.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Access {
    pub role: Role,
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    #[serde(default)]
    pub token_sha256: Vec<String>,
}

/// `agentwall control-plane serve --config FILE`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (default 127.0.0.1:8443).
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// The server's certificate chain and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundles client certificates (nodes', admins') must chain to.
    #[serde(default)]
    pub client_ca: Vec<PathBuf>,
    /// The SQLite database file (created when missing).
    pub database: PathBuf,
    /// Longest a node's long-poll is held, in seconds (default 25).
    #[serde(default)]
    pub poll_timeout_secs: Option<u64>,
    #[serde(default)]
    pub access: Vec<Access>,
    /// CRLs (PEM) client certificates are checked against: a revoked node or admin
    /// certificate fails the handshake. Reread when a file changes. Each CA in `client_ca`
    /// needs its CRL here once any is given (a certificate whose revocation status is unknown
    /// is refused).
    #[serde(default)]
    pub client_crl: Vec<PathBuf>,
    /// Take a CRL past its nextUpdate as current. Off (the default), a client certificate
    /// checked against such a CRL fails: a CRL no one renewed says nothing of revocations
    /// since.
    #[serde(default)]
    pub accept_expired_crl: bool,
    #[serde(default)]
    pub limits: Limits,
}

/// What one caller, or everyone together, may take of the server before being refused.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest a TLS handshake may take, in seconds.
    pub handshake_timeout_secs: u64,
    /// Longest a request head may take to arrive, and a kept-alive connection may sit idle
    /// waiting for the next one, in seconds.
    pub header_timeout_secs: u64,
    /// Longest an authorized request's body may take to arrive, in seconds.
    pub body_timeout_secs: u64,
    /// Longest an answer may wait for the client to take its bytes, in seconds: a client that
    /// stops reading loses its connection.
    pub write_timeout_secs: u64,
    /// Connections open at once, from everyone. Default: 4,096, or what the open-files limit
    /// leaves room for (64 kept for the server's own files) when that is less; a value set
    /// here that does not fit is refused at start.
    pub max_connections: Option<usize>,
    /// Connections open at once from one peer address that no request with a role vouched
    /// for yet.
    pub max_connections_per_address: usize,
    /// Connections open at once that one caller (a node, an admin, a security reader) made
    /// an authorized request on: one stolen credential cannot hold every connection, nor,
    /// through them, the budget of bodies in flight.
    pub max_connections_per_caller: usize,
    /// Requests per minute one admin or security caller may make (bursts of as many).
    pub requests_per_minute: u32,
    /// Records one node may report a minute (a whole batch, up to 10,000, may come at once).
    pub node_records_per_minute: u32,
    /// Bytes (of JSON, decompressed) one node may report a minute (a whole batch, up to
    /// 32 MiB, may come at once).
    pub node_bytes_per_minute: u32,
    /// Request body bytes the server reads or holds at once, from all callers together (at
    /// least 32 MiB, the largest body a route takes): a body that finds no room is answered
    /// 503 with Retry-After at once.
    pub body_bytes_in_flight: u64,
    /// The per-address cap counts an IPv6 peer by its address's first this many bits (64:
    /// one host usually holds a whole /64; 128: each address alone).
    pub ipv6_prefix_len: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_secs: 10,
            header_timeout_secs: 10,
            body_timeout_secs: 60,
            write_timeout_secs: 30,
            max_connections: None,
            max_connections_per_address: 256,
            max_connections_per_caller: 64,
            requests_per_minute: 600,
            node_records_per_minute: 600_000,
            node_bytes_per_minute: 512 << 20,
            body_bytes_in_flight: 256 << 20,
            ipv6_prefix_len: 64,
        }
    }
}

fn default_listen() -> std::net::SocketAddr {
    ([127, 0, 0, 1], 8443).into()
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, CpConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = super::toml_position(text, &e);
        CpConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: e.message().to_owned(),
        }
    })
}

fn read(path: &Path) -> Result<String, CpConfigError> {
    std::fs::read_to_string(path).map_err(|source| CpConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// `p` as written, or relative to the directory of the file it was written in.
pub(crate) fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl ServerConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, CpConfigError> {
        let mut c: Self = parse_toml(path, text)?;
        c.cert = resolve(path, &c.cert);
        c.key = resolve(path, &c.key);
        c.database = resolve(path, &c.database);
        for ca in c.client_ca.iter_mut().chain(&mut c.client_crl) {
            *ca = resolve(path, ca);
        }
        let invalid = |message: String| CpConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        for a in &c.access {
            for id in &a.spiffe_ids {
                let literal = id.strip_suffix("/*").unwrap_or(id);
                if literal.contains('*') || !literal.starts_with("spiffe://") {
                    return Err(invalid(format!(
                        "access for role {}: {id:?} is neither a SPIFFE ID nor a prefix ending in /*",
                        a.role
                    )));
                }
            }
            for t in &a.token_sha256 {
                if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(format!(
                        "access for role {}: token_sha256 {t:?} is not 64 hex digits (`agentwall control-plane token` prints one)",
                        a.role
                    )));
                }
            }
        }
        if !c.client_crl.is_empty() && c.client_ca.is_empty() {
            return Err(invalid(
                "client_crl is set but client_ca is empty: there are no client certificates to check".into(),
            ));
        }
        let l = &c.limits;
        for (key, v) in [
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("header_timeout_secs", l.header_timeout_secs),
            ("body_timeout_secs", l.body_timeout_secs),
            ("write_timeout_secs", l.write_timeout_secs),
            ("max_connections", l.max_connections.unwrap_or(1) as u64),
            (
                "max_connections_per_address",
                l.max_connections_per_address as u64,
            ),
            ("requests_per_minute", u64::from(l.requests_per_minute)),
            (
                "node_records_per_minute",
                u64::from(l.node_records_per_minute),
            ),
            ("node_bytes_per_minute", u64::from(l.node_bytes_per_minute)),
            ("ipv6_prefix_len", u64::from(l.ipv6_prefix_len)),
            (
                "max_connections_per_caller",
                l.max_connections_per_caller as u64,
            ),
        ] {
            if v == 0 {
                return Err(invalid(format!("limits.{key} must be at least 1")));
            }
        }
        if l.ipv6_prefix_len > 128 {
            return Err(invalid(format!(
                "limits.ipv6_prefix_len is {}; an IPv6 prefix is at most 128 bits",
                l.ipv6_prefix_len
            )));
        }
        if l.body_bytes_in_flight < crate::control_plane::MAX_BATCH_BYTES {
            return Err(invalid(format!(
                "limits.body_bytes_in_flight is {}; it must hold the largest body a route takes ({} bytes)",
                l.body_bytes_in_flight,
                crate::control_plane::MAX_BATCH_BYTES
            )));
        }
        if c.access.iter().any(|a| !a.spiffe_ids.is_empty()) && c.client_ca.is_empty() {
            return Err(invalid(
                "access names SPIFFE IDs but client_ca is empty: no client certificate could be verified".into(),
            ));
        }
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Self, CpConfigError> {
        Self::parse(path, &read(path)?)
    }

    /// Where the newest CRL number of each client CA is kept across restarts: beside the
    /// database (`cp.db` keeps them in `cp.db.crl-numbers.json`).
    pub fn crl_numbers(&self) -> PathBuf {
        let mut name = self.database.as_os_str().to_owned();
        name.push(".crl-numbers.json");
        name.into()
    }

    pub fn poll_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.poll_timeout_secs.unwrap_or(25).max(1))
    }
}

/// How a client reaches the control plane: the admin CLI's file, and the node's
/// `[control_plane]` section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// `https://HOST:PORT`.
    pub url: Option<String>,
    /// CA bundle the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A file holding a bearer token (used when no certificate is given).
    pub token_file: Option<PathBuf>,
    /// Node only: the report spool's size limit in bytes (default 64 MiB).
    pub spool_max_bytes: Option<u64>,
}

impl ClientConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, CpConfigError> {
        let mut c: Self = parse_toml(path, text)?;
        c.resolve_paths(path);
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Self, CpConfigError> {
        Self::parse(path, &read(path)?)
    }

    /// Makes relative paths relative to `file`'s directory.
    pub fn resolve_paths(&mut self, file: &Path) {
        for p in [
            &mut self.ca,
            &mut self.cert,
            &mut self.key,
            &mut self.token_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = resolve(file, p);
        }
    }

    /// Settings of `over` win.
    pub fn overlay(self, over: ClientConfig) -> ClientConfig {
        ClientConfig {
            url: over.url.or(self.url),
            ca: over.ca.or(self.ca),
            cert: over.cert.or(self.cert),
            key: over.key.or(self.key),
            token_file: over.token_file.or(self.token_file),
            spool_max_bytes: over.spool_max_bytes.or(self.spool_max_bytes),
        }
    }

    pub fn spool_max_bytes(&self) -> u64 {
        self.spool_max_bytes.unwrap_or(64 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_config_errors_say_where() {
        let p = Path::new("/etc/agentwall/cp.toml");
        let e = ServerConfig::parse(
            p,
            "cert = \"c.pem\"\nkey = \"k.pem\"\ndatabase = \"x.db\"\nlisten = 5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/etc/agentwall/cp.toml:4:10: "), "{e}");
        let e = ServerConfig::parse(
            p,
            "cert = \"c.pem\"\nkey = \"k.pem\"\ndatabase = \"x.db\"\nclient_ca = [\"ca.pem\"]\n[[access]]\nrole = \"admin\"\nspiffe_ids = [\"spiffe://example.org/*/x\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"spiffe://example.org/*/x\" is neither"), "{e}");
        let e = ServerConfig::parse(
            p,
            "cert = \"c.pem\"\nkey = \"k.pem\"\ndatabase = \"x.db\"\n[[access]]\nrole = \"security\"\ntoken_sha256 = [\"abc\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("token_sha256 \"abc\" is not 64 hex digits"),
            "{e}"
        );
        let e = ServerConfig::parse(
            p,
            "cert = \"c.pem\"\nkey = \"k.pem\"\ndatabase = \"x.db\"\n[[access]]\nrole = \"root\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(":5:8: unknown variant `root`"), "{e}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let c = ServerConfig::parse(
            Path::new("/srv/cp/cp.toml"),
            "cert = \"c.pem\"\nkey = \"/k.pem\"\ndatabase = \"db/cp.db\"\n",
        )
        .unwrap();
        assert_eq!(c.cert, Path::new("/srv/cp/c.pem"));
        assert_eq!(c.key, Path::new("/k.pem"));
        assert_eq!(c.database, Path::new("/srv/cp/db/cp.db"));
        assert_eq!(c.listen, default_listen());
    }
}
