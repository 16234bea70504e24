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
#[derive(Clone, Debug, Deserialize, PartialEq)]
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
    /// Where everything is stored: an SQLite file (created when missing), the embedded
    /// default for one control plane, or `postgres://USER@HOST:PORT/DB`, which any number of
    /// replicas share.
    pub database: Database,
    /// The PostgreSQL password, read from this file (its first line) rather than written in
    /// the URL. It must not be readable by group or others.
    #[serde(default)]
    pub database_password_file: Option<PathBuf>,
    /// CA bundle (PEM) the PostgreSQL server's certificate must chain to: the connection is
    /// TLS, the server's name checked. Without it the connection is plain (loopback or a
    /// Unix socket); `sslmode=require` in the URL then is an error.
    #[serde(default)]
    pub database_ca: Option<PathBuf>,
    /// Where this process keeps its own state (the newest CRL number of each client CA).
    /// Default: beside an SQLite database; with PostgreSQL it must be set when `client_crl`
    /// is.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Days stored records are kept, by their `time` (1 to 3,650; default 90). Older ones
    /// are removed in the background without holding up reports, and a record already older
    /// when it arrives is not stored (counted as expired).
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Most bytes of records held (each its text plus 512 for its row and index entries);
    /// past it the node holding the most
    /// loses its oldest first, down to the next holder's level. Default: no limit but
    /// `retention_days`.
    #[serde(default)]
    pub retention_max_bytes: Option<u64>,
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
    /// Refuse a policy push with an AgentPolicy that names no `owner` (default off:
    /// `policy check` warns about it).
    #[serde(default)]
    pub require_owner: bool,
    /// How many admins' signatures a pushed bundle needs before it is published (default 0:
    /// published as pushed). With fewer, a push is a proposal others approve (`cp policy
    /// approve`), each with their own key; the keys are `signers`.
    #[serde(default)]
    pub approvals_required: u32,
    /// How many signatures publish a break-glass grant at once (`cp grant --break-glass`),
    /// fewer than `approvals_required`: a bundle that only adds files of break-glass grants
    /// (each at most 4 hours) to the newest. Unset: break-glass grants wait for approvals
    /// as any push does.
    #[serde(default)]
    pub break_glass_approvals: Option<u32>,
    /// The admins who sign bundles: a name for each (an e-mail, say) and their public key
    /// (SPKI PEM, `openssl pkey -pubout`). Signatures by other keys are refused.
    #[serde(default)]
    pub signers: std::collections::BTreeMap<String, PathBuf>,
    /// Serve the console (the browser pages under `/ui` and their sign-in; default on).
    #[serde(default = "yes")]
    pub console: bool,
    /// How long a console sign-in lasts, in hours (1 to 168; default 8). Signing out ends it
    /// sooner.
    #[serde(default = "default_console_session_hours")]
    pub console_session_hours: u32,
    #[serde(default)]
    pub limits: Limits,
    /// Stream every decision record nodes send to a syslog receiver over TLS, as OCSF
    /// events (RFC 5424 messages, RFC 5425 framing). Off unless set.
    #[serde(default)]
    pub syslog: Option<Syslog>,
    /// Anomaly alerts over what nodes report, per identity against its own baseline.
    #[serde(default)]
    pub alerts: Alerts,
    /// `[issuer]`: an intermediate CA that issues short-lived X509-SVIDs for join tokens,
    /// and renews them, through enrolled nodes. Off unless set.
    #[serde(default)]
    pub issuer: Option<crate::control_plane::issuer::IssuerConfig>,
}

/// `[alerts]`: what raises an alert, and where alerts are sent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Alerts {
    /// Raise alerts at all (default on).
    pub enabled: bool,
    /// An identity's destinations in its first this many hours (from its first record)
    /// are its baseline; a destination (host name, or address without one) it reaches after
    /// that and never reached before raises `new_destination` (default 24).
    pub learning_hours: f64,
    /// `denial_burst`: at least this many denials of one identity ...
    pub denials: u64,
    /// ... within this many seconds (by the records' times).
    pub denial_window_secs: u64,
    /// `dns_tunnel`: at least this many refused DNS queries of one identity ...
    pub dns_refusals: u64,
    /// ... within this many seconds;
    pub dns_window_secs: u64,
    /// or a query name with a label at least this long ...
    pub dns_label_length: usize,
    /// ... and at least this many bits of entropy per character over its labels below the
    /// last two (what tunnels encode data in).
    pub dns_entropy_bits: f64,
    /// At most this many alerts of one kind about one identity (or one node's shadow AI) a
    /// minute of the records' times; the ones past it are counted
    /// (`agentwall_cp_alerts_held_back_total`) and told with the next one raised (default
    /// 30).
    pub per_minute: u64,
    /// At most this many alerts of one kind from one node a minute of the control plane's
    /// clock, whatever the records say of their times and identities (default 300).
    pub node_per_minute: u64,
    /// Where alerts are POSTed, in the Alertmanager webhook format: `https://...`, or
    /// `http://` to a loopback address only.
    pub webhooks: Vec<String>,
    /// CA bundle (PEM) an https webhook's certificate chains to.
    #[schema(value_type = Option<String>)]
    pub webhook_ca: Option<PathBuf>,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            enabled: true,
            learning_hours: 24.0,
            denials: 20,
            denial_window_secs: 60,
            dns_refusals: 20,
            dns_window_secs: 60,
            dns_label_length: 40,
            dns_entropy_bits: 3.5,
            per_minute: 30,
            node_per_minute: 300,
            webhooks: Vec::new(),
            webhook_ca: None,
        }
    }
}

impl Alerts {
    fn check(&self) -> Result<(), String> {
        if !(self.learning_hours >= 0.0 && self.learning_hours <= 24.0 * 365.0) {
            return Err(format!(
                "alerts.learning_hours is {}; it is 0 to 8760",
                self.learning_hours
            ));
        }
        for (key, v) in [
            ("denials", self.denials),
            ("denial_window_secs", self.denial_window_secs),
            ("dns_refusals", self.dns_refusals),
            ("dns_window_secs", self.dns_window_secs),
            ("dns_label_length", self.dns_label_length as u64),
            ("per_minute", self.per_minute),
            ("node_per_minute", self.node_per_minute),
        ] {
            if v == 0 {
                return Err(format!("alerts.{key} must be at least 1"));
            }
        }
        if !(self.dns_entropy_bits > 0.0 && self.dns_entropy_bits <= 8.0) {
            return Err(format!(
                "alerts.dns_entropy_bits is {}; it is above 0 and at most 8",
                self.dns_entropy_bits
            ));
        }
        for w in &self.webhooks {
            let u: hyper::Uri = w
                .parse()
                .map_err(|e| format!("alerts.webhooks: {w:?} is not a URL: {e}"))?;
            let host = u.host().unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback());
            match u.scheme_str() {
                Some("https") if self.webhook_ca.is_some() => {}
                Some("https") => {
                    return Err(format!(
                        "alerts.webhooks: {w:?} is https: set alerts.webhook_ca to the CA its certificate chains to"
                    ));
                }
                Some("http") if loopback => {}
                _ => {
                    return Err(format!(
                        "alerts.webhooks: {w:?} must be https (http only to a loopback address: alerts name identities and hosts)"
                    ));
                }
            }
            if host.is_empty() {
                return Err(format!("alerts.webhooks: {w:?} names no host"));
            }
        }
        Ok(())
    }
}

/// `[syslog]`: where the control plane forwards what nodes report, for a SIEM.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Syslog {
    /// The receiver, `HOST:PORT` (syslog over TLS is port 6514); its certificate must name
    /// HOST.
    pub address: String,
    /// CA bundle (PEM) the receiver's certificate must chain to.
    pub ca: PathBuf,
    /// A client certificate and key (PEM) for receivers that authenticate senders.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl Syslog {
    /// The receiver's host and port.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let (host, port) = self
            .address
            .rsplit_once(':')
            .ok_or_else(|| format!("syslog.address {:?} is not HOST:PORT", self.address))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("syslog.address {:?}: {port:?} is not a port", self.address)
            })?;
        if host.is_empty() {
            return Err(format!("syslog.address {:?} names no host", self.address));
        }
        Ok((host.to_owned(), port))
    }
}

/// How long a console sign-in lasts unless configured: a working day.
pub const DEFAULT_CONSOLE_SESSION_HOURS: i64 = 8;

fn default_console_session_hours() -> u32 {
    DEFAULT_CONSOLE_SESSION_HOURS as u32
}

fn check_console_session_hours(hours: u32) -> Result<(), String> {
    if (1..=168).contains(&hours) {
        Ok(())
    } else {
        Err(format!("console_session_hours is {hours}; it is 1 to 168"))
    }
}

fn yes() -> bool {
    true
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

/// The control plane's database, as `database` names it.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL (libpq's URI form).
    Postgres(String),
}

impl Database {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            Err("database is empty: name an SQLite file or a postgres:// URL".into())
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            // The client takes the credentials to the first `@`: a second one means an `@`
            // in the password, whose tail would then be read as the host and shown in every
            // error. (The URL itself is not shown here for the same reason.)
            let after = text.split_once("://").map_or(text, |(_, r)| r);
            if after
                .split_once('@')
                .is_some_and(|(_, rest)| rest.split('?').next().unwrap_or(rest).contains('@'))
            {
                return Err(
                    "database: the URL has more than one '@': write an '@' in the user name or password as %40"
                        .into(),
                );
            }
            Ok(Database::Postgres(text.to_owned()))
        } else {
            Ok(Database::Sqlite(PathBuf::from(text)))
        }
    }
}

impl<'de> Deserialize<'de> for Database {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Database::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Never shows a password written in the URL: the text goes to logs and errors.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// `url` with its password replaced by `***`, read the way the PostgreSQL client reads it:
/// the credentials run to the first `@` (a `/` or `?` in a password included), and a
/// `password` parameter is found by its percent-decoded name.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (creds, rest) = match rest.split_once('@') {
        Some((creds, rest)) => {
            let user = creds.split(':').next().unwrap_or_default();
            let shown = if creds.contains(':') {
                format!("{user}:***@")
            } else {
                format!("{user}@")
            };
            (shown, rest)
        }
        None => (String::new(), rest),
    };
    let shown_rest = match rest.split_once('?') {
        Some((host_path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _))
                        if percent_encoding::percent_decode_str(k)
                            .decode_utf8_lossy()
                            .eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_owned(),
                })
                .collect();
            format!("{host_path}?{}", params.join("&"))
        }
        None => rest.to_owned(),
    };
    format!("{scheme}://{creds}{shown_rest}")
}

fn default_retention_days() -> u32 {
    90
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
    /// `approvals_required` asks for no more signers than there are.
    pub fn check_approvals(&self) -> Result<(), String> {
        if self.approvals_required as usize > self.signers.len() {
            return Err(format!(
                "approvals_required is {}, and [signers] names {}: no bundle could ever be approved",
                self.approvals_required,
                self.signers.len()
            ));
        }
        // At or above approvals_required it changes nothing (every push needs no more).
        if let Some(n) = self.break_glass_approvals
            && (n == 0 || n as usize > self.signers.len())
        {
            return Err(format!(
                "break_glass_approvals is {n}: it is 1 to the {} signers [signers] names",
                self.signers.len()
            ));
        }
        Ok(())
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, CpConfigError> {
        let mut c: Self = parse_toml(path, text)?;
        c.cert = resolve(path, &c.cert);
        c.key = resolve(path, &c.key);
        if let Database::Sqlite(db) = &c.database {
            c.database = Database::Sqlite(resolve(path, db));
        }
        for p in c
            .client_ca
            .iter_mut()
            .chain(&mut c.client_crl)
            .chain(&mut c.database_password_file)
            .chain(&mut c.database_ca)
            .chain(&mut c.state_dir)
            .chain(c.signers.values_mut())
        {
            *p = resolve(path, p);
        }
        if let Some(ca) = &mut c.alerts.webhook_ca {
            *ca = resolve(path, ca);
        }
        if let Some(is) = &mut c.issuer {
            is.ca_cert = resolve(path, &is.ca_cert);
            is.ca_key = resolve(path, &is.ca_key);
        }
        if let Some(sl) = &mut c.syslog {
            for p in std::iter::once(&mut sl.ca)
                .chain(&mut sl.cert)
                .chain(&mut sl.key)
            {
                *p = resolve(path, p);
            }
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
        c.check_database().map_err(invalid)?;
        if !(1..=3650).contains(&c.retention_days) {
            return Err(invalid(format!(
                "retention_days is {}; it is 1 to 3650",
                c.retention_days
            )));
        }
        check_console_session_hours(c.console_session_hours).map_err(invalid)?;
        c.check_approvals().map_err(invalid)?;
        c.alerts.check().map_err(invalid)?;
        if let Some(sl) = &c.syslog {
            sl.host_port().map_err(invalid)?;
            if sl.cert.is_some() != sl.key.is_some() {
                return Err(invalid(
                    "syslog.cert and syslog.key go together: give both or neither".into(),
                ));
            }
        }
        if c.retention_max_bytes == Some(0) {
            return Err(invalid(
                "retention_max_bytes must be at least 1 (leave it out for no limit)".into(),
            ));
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

    /// Replaces `database` (the `--database` flag), checked as the file's would be.
    pub fn set_database(&mut self, text: &str) -> Result<(), CpConfigError> {
        let invalid = |message| CpConfigError::Invalid {
            path: "--database".into(),
            message,
        };
        self.database = Database::parse(text).map_err(invalid)?;
        self.check_database().map_err(invalid)
    }

    /// Replaces `syslog`'s address, CA and client credential (their flags), each when given;
    /// checked as the file's would be.
    pub fn set_syslog(
        &mut self,
        address: Option<String>,
        ca: Option<PathBuf>,
        cert_key: Option<(PathBuf, PathBuf)>,
    ) -> Result<(), CpConfigError> {
        if address.is_none() && ca.is_none() && cert_key.is_none() {
            return Ok(());
        }
        let invalid = |message: String| CpConfigError::Invalid {
            path: PathBuf::from("--syslog"),
            message,
        };
        let mut s = match (self.syslog.take(), address, ca) {
            (Some(mut s), address, ca) => {
                if let Some(a) = address {
                    s.address = a;
                }
                if let Some(c) = ca {
                    s.ca = c;
                }
                s
            }
            (None, Some(address), Some(ca)) => Syslog {
                address,
                ca,
                cert: None,
                key: None,
            },
            (None, _, _) => {
                return Err(invalid(
                    "forwarding to syslog needs both an address (--syslog) and a CA (--syslog-ca) when the config has no [syslog]".into(),
                ));
            }
        };
        if let Some((c, k)) = cert_key {
            s.cert = Some(c);
            s.key = Some(k);
        }
        s.host_port().map_err(invalid)?;
        self.syslog = Some(s);
        Ok(())
    }

    /// Replaces `console_session_hours` (its flag), checked as the file's would be.
    pub fn set_console_session_hours(&mut self, hours: u32) -> Result<(), CpConfigError> {
        check_console_session_hours(hours).map_err(|message| CpConfigError::Invalid {
            path: "--console-session-hours".into(),
            message,
        })?;
        self.console_session_hours = hours;
        Ok(())
    }

    fn check_database(&self) -> Result<(), String> {
        match &self.database {
            Database::Sqlite(_) => {
                for (key, set) in [
                    (
                        "database_password_file",
                        self.database_password_file.is_some(),
                    ),
                    ("database_ca", self.database_ca.is_some()),
                ] {
                    if set {
                        return Err(format!(
                            "{key} is set but database {} is an SQLite file, not a postgres:// URL",
                            self.database
                        ));
                    }
                }
            }
            Database::Postgres(_) => {
                if !self.client_crl.is_empty() && self.state_dir.is_none() {
                    return Err(
                        "client_crl is set and the database is PostgreSQL: set state_dir, where this replica keeps the newest CRL numbers".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Where the newest CRL number of each client CA is kept across restarts: in
    /// `state_dir`, else beside an SQLite database (`cp.db` keeps them in
    /// `cp.db.crl-numbers.json`). None only with PostgreSQL and no `state_dir`, which the
    /// config allows only without `client_crl`.
    pub fn crl_numbers(&self) -> Option<PathBuf> {
        self.state_file("crl-numbers.json")
    }

    /// Where the server keeps the numbers it served: in `state_dir`, or beside an SQLite
    /// database; none for PostgreSQL without `state_dir`.
    pub fn served_numbers(&self) -> Option<PathBuf> {
        self.state_file("served.json")
    }

    /// This replica's file `name`: in `state_dir`, else beside an SQLite database
    /// (`cp.db.NAME`); none for PostgreSQL without `state_dir`.
    fn state_file(&self, name: &str) -> Option<PathBuf> {
        if let Some(dir) = &self.state_dir {
            return Some(dir.join(name));
        }
        match &self.database {
            Database::Sqlite(db) => {
                let mut beside = db.as_os_str().to_owned();
                beside.push(".");
                beside.push(name);
                Some(beside.into())
            }
            Database::Postgres(_) => None,
        }
    }

    /// What the server keeps of stored records.
    pub fn retention(&self) -> crate::control_plane::store::Retention {
        crate::control_plane::store::Retention {
            days: self.retention_days,
            max_bytes: self.retention_max_bytes,
        }
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
    /// Several control-plane replicas (`https://HOST:PORT` each), in the order they are
    /// tried: requests go to one until it fails, then to the next. Instead of `url`.
    pub urls: Vec<String>,
    /// CA bundle the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A file holding a bearer token (used when no certificate is given).
    pub token_file: Option<PathBuf>,
    /// Node only: the report spool's size limit in bytes (default 64 MiB).
    pub spool_max_bytes: Option<u64>,
    /// Node only: the public keys (SPKI PEM) of the admins whose signatures a bundle needs;
    /// with any, the node applies only signed bundles.
    pub trusted_signers: Vec<PathBuf>,
    /// Node only: how many distinct `trusted_signers` must have signed a bundle (default 1
    /// when there are any).
    pub signatures_required: Option<u32>,
    /// Node only: how many of them suffice for a bundle that only adds break-glass grants
    /// (each at most 4 hours) to the one in force, compared file by file here (fewer than
    /// `signatures_required`; unset: none suffice).
    pub break_glass_signatures: Option<u32>,
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
        .chain(&mut self.trusted_signers)
        {
            *p = resolve(file, p);
        }
    }

    /// Settings of `over` win.
    pub fn overlay(self, over: ClientConfig) -> ClientConfig {
        // A URL given over the file's replaces all of the file's.
        let over_urls = over.url.is_some() || !over.urls.is_empty();
        ClientConfig {
            url: if over_urls { over.url } else { self.url },
            urls: if over_urls { over.urls } else { self.urls },
            ca: over.ca.or(self.ca),
            cert: over.cert.or(self.cert),
            key: over.key.or(self.key),
            token_file: over.token_file.or(self.token_file),
            spool_max_bytes: over.spool_max_bytes.or(self.spool_max_bytes),
            trusted_signers: if over.trusted_signers.is_empty() {
                self.trusted_signers
            } else {
                over.trusted_signers
            },
            signatures_required: over.signatures_required.or(self.signatures_required),
            break_glass_signatures: over.break_glass_signatures.or(self.break_glass_signatures),
        }
    }

    /// The control plane's URLs, `url` or `urls`.
    pub fn urls(&self) -> Result<Vec<String>, String> {
        match (&self.url, self.urls.as_slice()) {
            (Some(_), [_, ..]) => Err("url and urls are both set: set one".into()),
            (Some(u), []) => Ok(vec![u.clone()]),
            (None, urls) => {
                let mut seen = std::collections::HashSet::new();
                if let Some(dup) = urls.iter().find(|u| !seen.insert(u.as_str())) {
                    return Err(format!("urls names {dup:?} twice"));
                }
                Ok(urls.to_vec())
            }
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
    fn syslog_is_set_by_file_or_flags_and_checked_either_way() {
        let p = Path::new("/etc/agentwall/cp.toml");
        let base = "cert = \"c.pem\"\nkey = \"k.pem\"\ndatabase = \"x.db\"\n";
        let c = ServerConfig::parse(
            p,
            &format!("{base}[syslog]\naddress = \"[2001:db8::5]:6514\"\nca = \"siem.pem\"\n"),
        )
        .unwrap();
        let sl = c.syslog.clone().unwrap();
        assert_eq!(sl.ca, Path::new("/etc/agentwall/siem.pem"));
        assert_eq!(sl.host_port().unwrap(), ("2001:db8::5".to_owned(), 6514));
        let mut c = ServerConfig::parse(p, base).unwrap();
        let e = c
            .set_syslog(Some("siem.example.org:6514".into()), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs both an address (--syslog) and a CA"),
            "{e}"
        );
        let e = c
            .set_syslog(
                Some("siem.example.org:0".into()),
                Some("ca.pem".into()),
                None,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"0\" is not a port"), "{e}");
        c.set_syslog(
            Some("siem.example.org:6514".into()),
            Some("ca.pem".into()),
            Some(("c.pem".into(), "c.key".into())),
        )
        .unwrap();
        assert_eq!(
            c.syslog.as_ref().unwrap().key.as_deref(),
            Some(Path::new("c.key"))
        );
        let e = ServerConfig::parse(
            p,
            &format!("{base}[syslog]\naddress = \"siem\"\nca = \"siem.pem\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("syslog.address \"siem\" is not HOST:PORT"),
            "{e}"
        );
    }

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
        assert_eq!(c.database, Database::Sqlite("/srv/cp/db/cp.db".into()));
        assert_eq!(c.listen, default_listen());
    }

    #[test]
    fn a_postgres_database_is_a_url_whose_password_is_never_shown() {
        let c = ServerConfig::parse(
            Path::new("/srv/cp/cp.toml"),
            "cert = \"c.pem\"\nkey = \"k.pem\"\ndatabase = \"postgres://cp:s3cret@db.example:5432/agentwall?password=x&sslmode=require\"\ndatabase_ca = \"db-ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.database.to_string(),
            "postgres://cp:***@db.example:5432/agentwall?password=***&sslmode=require"
        );
        assert_eq!(format!("{c:?}").matches("s3cret").count(), 0);
        // Read as the PostgreSQL client reads it: credentials to the first `@`, parameter
        // names percent-decoded.
        for (url, shown) in [
            (
                "postgres://cp:Zm9v/YmFy+cXV4@db:5432/agentwall",
                "postgres://cp:***@db:5432/agentwall",
            ),
            ("postgres://cp:a?b@db/x", "postgres://cp:***@db/x"),
            (
                "postgres://cp@db/x?pass%77ord=hunter2&sslmode=require",
                "postgres://cp@db/x?pass%77ord=***&sslmode=require",
            ),
            ("postgres://db/x", "postgres://db/x"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert_eq!(
            c.database_ca.as_deref(),
            Some(Path::new("/srv/cp/db-ca.pem"))
        );
        assert_eq!(c.crl_numbers(), None);
        // An '@' in a parameter is not one in the credentials.
        assert!(Database::parse("postgres://cp@db/x?sslrootcert=/a@b/ca.pem").is_ok());
        for (text, says) in [
            (
                "database = \"cp.db\"\ndatabase_ca = \"ca.pem\"\n",
                "database_ca is set but database /srv/cp/cp.db is an SQLite file",
            ),
            (
                "database = \"postgres://cp@db/agentwall\"\nclient_ca = [\"ca.pem\"]\nclient_crl = [\"crl.pem\"]\n",
                "client_crl is set and the database is PostgreSQL: set state_dir",
            ),
            ("database = \"\"\n", "database is empty"),
            (
                "database = \"postgres://cp:hunter@2@db/agentwall\"\n",
                "database: the URL has more than one '@': write an '@' in the user name or password as %40",
            ),
        ] {
            let e = ServerConfig::parse(
                Path::new("/srv/cp/cp.toml"),
                &format!("cert = \"c.pem\"\nkey = \"k.pem\"\n{text}"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(says) && !e.contains("hunter"), "{e}");
        }
    }

    #[test]
    fn a_client_takes_one_url_or_several_and_flags_replace_the_files() {
        let p = Path::new("/etc/agentwall/agentwall.toml");
        let one = ClientConfig::parse(p, "url = \"https://a:8443\"\n").unwrap();
        assert_eq!(one.urls().unwrap(), ["https://a:8443"]);
        let many =
            ClientConfig::parse(p, "urls = [\"https://a:8443\", \"https://b:8443\"]\n").unwrap();
        assert_eq!(many.urls().unwrap(), ["https://a:8443", "https://b:8443"]);
        let both = ClientConfig::parse(p, "url = \"https://a\"\nurls = [\"https://b\"]\n").unwrap();
        assert_eq!(
            both.urls().unwrap_err(),
            "url and urls are both set: set one"
        );
        let twice = ClientConfig::parse(p, "urls = [\"https://a\", \"https://a\"]\n").unwrap();
        assert_eq!(twice.urls().unwrap_err(), "urls names \"https://a\" twice");
        let flags = ClientConfig {
            url: Some("https://c:1".into()),
            ..ClientConfig::default()
        };
        assert_eq!(many.clone().overlay(flags).urls().unwrap(), ["https://c:1"]);
        assert_eq!(
            many.clone()
                .overlay(ClientConfig::default())
                .urls()
                .unwrap(),
            ["https://a:8443", "https://b:8443"]
        );
    }
}
