//! Configuration: TOML files with defaults, unknown keys refused with file:line:column. The
//! node's (`agentwall.toml`, every key also a flag) here; the control plane's and its
//! clients' in [`control_plane`]. These types describe settings and know no running component.

pub mod control_plane;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::UnknownFlows;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    #[error("missing setting `{0}` (in the config file or as --{flag})", flag = .0.replace('_', "-"))]
    Missing(&'static str),
    #[error("{0}")]
    Conflict(String),
}

/// `/etc/agentwall/agentwall.toml`. Unknown keys are errors.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Directory of policy YAML files.
    pub policy_dir: Option<PathBuf>,
    /// CA certificates agents' certificates must chain to: PEM, or a SPIFFE bundle (JSON).
    pub trust_bundle: Option<PathBuf>,
    /// Only SPIFFE IDs in this trust domain are accepted.
    pub trust_domain: Option<String>,
    /// `[trust_bundles]`: a bundle per trust domain (`"example.org" = "FILE"`), never merged:
    /// an identity of a domain is verified against that domain's bundle only, and domains
    /// without one are refused.
    pub trust_bundles: std::collections::BTreeMap<String, PathBuf>,
    /// PEM CRL files; reloaded when they change.
    pub crl: Vec<PathBuf>,
    /// Take a CRL past its nextUpdate as current (default false: a certificate checked
    /// against such a CRL is refused, since it says nothing of revocations since).
    pub accept_expired_crl: Option<bool>,
    /// The node's API socket.
    pub socket: Option<PathBuf>,
    /// Group allowed to use the socket (default: root only).
    pub socket_group: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub bpffs_dir: Option<PathBuf>,
    /// Where the programs attach; cgroups the node creates live below it.
    pub attach_cgroup: Option<PathBuf>,
    pub unknown_flows: Option<UnknownFlowsSetting>,
    pub audit_log: Option<PathBuf>,
    /// The audit log is rotated past this many bytes (default 64 MiB).
    pub audit_log_max_bytes: Option<u64>,
    /// Group that may read the audit log (0640); without one, root only (0600).
    pub audit_log_group: Option<String>,
    /// `native` (default): the hash-chained log only. `ocsf`: each record is also written
    /// as an OCSF event to a second file ([`NodeConfig::audit_ocsf_log`]); the chain stays
    /// on the native log.
    pub audit_format: Option<AuditFormat>,
    /// The OCSF file of `audit_format = "ocsf"` (default: beside `audit_log`, named
    /// `NAME.ocsf.jsonl` for `NAME.jsonl`).
    pub audit_ocsf_log: Option<PathBuf>,
    /// Ed25519 private key (PKCS#8 PEM) the node signs audit checkpoints with.
    pub audit_signing_key: Option<PathBuf>,
    /// Seconds between signed checkpoints (default 60).
    pub audit_checkpoint_secs: Option<u64>,
    /// Address for the Prometheus text endpoint (`GET /metrics`); off when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Port of the DNS proxy at every identity's proxy address (default 15053; 0 turns the
    /// proxy off, and name rules then allow nothing).
    pub dns_listen_port: Option<u16>,
    /// Resolvers the proxy forwards to, tried in order (default: the host's resolv.conf).
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// Seconds a learned address stays allowed after its TTL ran out (default 60).
    pub dns_grace_secs: Option<u64>,
    /// TTLs below this many seconds count as this (default 5).
    pub dns_min_ttl_secs: Option<u64>,
    /// Names with live addresses one identity may have (default 1024).
    pub dns_max_names: Option<usize>,
    /// Addresses one name may have per identity (default 32).
    pub dns_max_addresses: Option<usize>,
    /// Milliseconds one upstream gets to answer before the next is tried (default 2000).
    pub dns_timeout_ms: Option<u64>,
    /// Network namespaces besides the node's own in which the DNS proxy listens for one
    /// identity (default 16); past it, DNS from that identity's further namespaces is refused.
    pub dns_max_namespaces_per_identity: Option<usize>,
    /// Network namespaces besides the node's own in which the proxy listens in all (default
    /// 256): an agent that makes namespaces cannot exhaust the node's descriptors.
    pub dns_max_namespaces: Option<usize>,
    /// Identical flows within this many seconds of the first are folded into one record
    /// (default 10; 0 writes every kernel record as it comes).
    pub aggregate_window_secs: Option<u64>,
    /// Record flows rules allow, too (default true): what `report unused` and `policy
    /// simulate` read.
    pub record_allowed: Option<bool>,
    /// Seconds between resolutions of the AI catalog's names (default 300; 0 = never, and
    /// catalog addresses then come from the DNS proxy's answers only).
    pub catalog_refresh_secs: Option<u64>,
    /// Services added to the built-in AI catalog: `[[ai_catalog]]` tables with `service` and
    /// `names` (exact names, `*.` and `**.` patterns).
    pub ai_catalog: Vec<crate::discovery::CatalogEntry>,
    /// `[control_plane]`: url, ca, cert, key (the node's certificate), spool_max_bytes. With
    /// it, policy comes from the control plane (and `policy_dir` must not be set).
    pub control_plane: Option<control_plane::ClientConfig>,
    /// Who answers for this host (a person or team): the control plane names it beside the
    /// node, and beside the shadow AI found on it.
    pub owner: Option<crate::policy::owner::Owner>,
    /// `[labels]`: this host's labels (`key = "value"`, Kubernetes-style names), sent along.
    pub labels: crate::policy::owner::Labels,
}

/// Where agents' certificates are verified from ([`NodeConfig::anchors`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anchors {
    /// One bundle; with `domain`, only that trust domain's identities are accepted.
    Shared {
        bundle: PathBuf,
        domain: Option<String>,
    },
    /// A bundle per trust domain, each used for its own domain's identities only.
    PerDomain(std::collections::BTreeMap<String, PathBuf>),
}

impl Anchors {
    /// Every bundle file.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Self::Shared { bundle, .. } => vec![bundle.as_path()],
            Self::PerDomain(per) => per.values().map(PathBuf::as_path).collect(),
        }
    }
}

/// `audit_format` as written in TOML.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    Native,
    Ocsf,
}

/// `unknown_flows` as written in TOML.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFlowsSetting {
    Report,
    Deny,
    Ignore,
}

impl From<UnknownFlowsSetting> for UnknownFlows {
    fn from(s: UnknownFlowsSetting) -> Self {
        match s {
            UnknownFlowsSetting::Report => Self::Report,
            UnknownFlowsSetting::Deny => Self::Deny,
            UnknownFlowsSetting::Ignore => Self::Ignore,
        }
    }
}

pub const DEFAULT_CONFIG: &str = "/etc/agentwall/agentwall.toml";
pub const DEFAULT_SOCKET: &str = "/run/agentwall/agentwall.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentwall";

/// Each CRL issuer's newest CRL number in force, kept across restarts.
pub fn crl_numbers(state_dir: &Path) -> PathBuf {
    state_dir.join("crl-numbers.json")
}

/// Where the node anchors its audit log's head (see [`crate::audit::Anchor`]).
pub fn audit_anchor(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.anchor")
}

/// The kernel's count of lost records (ring buffer full) as last reported: the count is kept
/// in a pinned map across restarts, so a new process reports only what it adds.
pub fn kernel_lost(state_dir: &Path) -> PathBuf {
    state_dir.join("kernel-lost")
}
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/agentwall";
pub const DEFAULT_POLICY_DIR: &str = "/etc/agentwall/policy";

/// The directory the node enforces policy from when a control plane is configured: the
/// control-plane link writes each bundle there.
pub fn control_plane_policy_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("control-plane").join("policy")
}

/// Where in `text` a TOML error is (line and column from 1).
pub fn toml_position(text: &str, e: &toml::de::Error) -> (usize, usize) {
    e.span().map_or((1, 1), |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    })
}

impl NodeConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = toml_position(text, &e);
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })
    }

    /// The OCSF file the node writes (`audit_format = "ocsf"`); None for the native log
    /// only. Err when `ocsf` is asked for without an `audit_log` to copy.
    pub fn audit_ocsf_log(&self) -> Result<Option<PathBuf>, ConfigError> {
        if self.audit_format != Some(AuditFormat::Ocsf) {
            return Ok(None);
        }
        let Some(log) = &self.audit_log else {
            return Err(ConfigError::Conflict(
                "audit_format = \"ocsf\" writes each audit record to a second file as well, and there is no audit_log to write".into(),
            ));
        };
        let ocsf = match &self.audit_ocsf_log {
            Some(p) => p.clone(),
            None => {
                let stem = log.file_stem().map(|s| s.to_string_lossy().into_owned());
                log.with_file_name(format!("{}.ocsf.jsonl", stem.unwrap_or_default()))
            }
        };
        if &ocsf == log {
            return Err(ConfigError::Conflict(format!(
                "audit_ocsf_log {} is the audit_log itself: the OCSF events go to a second file",
                ocsf.display()
            )));
        }
        Ok(Some(ocsf))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut c = Self::parse(path, &text)?;
        // Relative to the file, as in the control plane's config: never to whatever directory
        // a command (`agentwall down`, say) was run from.
        for p in [
            &mut c.policy_dir,
            &mut c.trust_bundle,
            &mut c.socket,
            &mut c.state_dir,
            &mut c.bpffs_dir,
            &mut c.attach_cgroup,
            &mut c.audit_log,
            &mut c.audit_ocsf_log,
            &mut c.audit_signing_key,
        ]
        .into_iter()
        .flatten()
        .chain(&mut c.crl)
        {
            *p = control_plane::resolve(path, p);
        }
        for p in c.trust_bundles.values_mut() {
            *p = control_plane::resolve(path, p);
        }
        if let Some(cp) = &mut c.control_plane {
            cp.resolve_paths(path);
        }
        Ok(c)
    }

    /// The node's config as a command finds it: `explicit` (`--config FILE`, which must be
    /// readable), else [`DEFAULT_CONFIG`] when that file exists, else every default.
    pub fn find(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        match explicit {
            Some(p) => Self::load(p),
            None if Path::new(DEFAULT_CONFIG).exists() => Self::load(Path::new(DEFAULT_CONFIG)),
            None => Ok(Self::default()),
        }
    }

    /// Settings from `over` (flags) replace those from `self` (the file).
    pub fn overlay(mut self, over: NodeConfig) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            policy_dir,
            trust_bundle,
            trust_domain,
            socket,
            socket_group,
            state_dir,
            bpffs_dir,
            attach_cgroup,
            unknown_flows,
            audit_log,
            audit_log_max_bytes,
            audit_log_group,
            audit_format,
            audit_ocsf_log,
            audit_signing_key,
            audit_checkpoint_secs,
            metrics_listen,
            dns_listen_port,
            dns_grace_secs,
            dns_min_ttl_secs,
            dns_max_names,
            dns_max_addresses,
            dns_timeout_ms,
            dns_max_namespaces_per_identity,
            dns_max_namespaces,
            aggregate_window_secs,
            record_allowed,
            catalog_refresh_secs,
            accept_expired_crl,
            owner
        );
        if !over.labels.is_empty() {
            self.labels = over.labels;
        }
        if !over.ai_catalog.is_empty() {
            self.ai_catalog = over.ai_catalog;
        }
        if !over.crl.is_empty() {
            self.crl = over.crl;
        }
        if !over.trust_bundles.is_empty() {
            self.trust_bundles = over.trust_bundles;
        }
        if !over.dns_upstream.is_empty() {
            self.dns_upstream = over.dns_upstream;
        }
        if let Some(cp) = over.control_plane {
            self.control_plane = Some(self.control_plane.unwrap_or_default().overlay(cp));
        }
        self
    }

    /// Where policy is read from: the directory the control plane's bundles are written to
    /// when there is one, `policy_dir` otherwise.
    pub fn policy_dir(&self) -> PathBuf {
        if self.control_plane.is_some() {
            return control_plane_policy_dir(&self.state_dir());
        }
        self.policy_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_POLICY_DIR.into())
    }

    /// Settings that cannot go together.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.control_plane.is_some() && self.policy_dir.is_some() {
            return Err(ConfigError::Conflict(
                "policy_dir and control_plane are both set: with a control plane, policy comes from it (remove one)".into(),
            ));
        }
        Ok(())
    }

    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }

    pub fn bpffs_dir(&self) -> PathBuf {
        self.bpffs_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_BPFFS_DIR.into())
    }

    /// The trust anchors: one bundle (for `trust_domain`, or for any domain when none is
    /// set), or a bundle per trust domain (`trust_bundles`, with `trust_bundle` as
    /// `trust_domain`'s).
    pub fn anchors(&self) -> Result<Anchors, ConfigError> {
        if self.trust_bundles.is_empty() {
            let bundle = self
                .trust_bundle
                .clone()
                .ok_or(ConfigError::Missing("trust_bundle"))?;
            return Ok(Anchors::Shared {
                bundle,
                domain: self.trust_domain.clone(),
            });
        }
        let mut per = self.trust_bundles.clone();
        match (&self.trust_bundle, &self.trust_domain) {
            (None, None) => {}
            (Some(b), Some(d)) => {
                if per.insert(d.clone(), b.clone()).is_some() {
                    return Err(ConfigError::Conflict(format!(
                        "trust domain {d} has two bundles: trust_bundle (with trust_domain) and trust_bundles.\"{d}\" (remove one)"
                    )));
                }
            }
            (Some(_), None) => {
                return Err(ConfigError::Conflict(
                    "trust_bundle without trust_domain beside trust_bundles: its CAs would be trusted for every trust domain; give trust_domain, or move it into trust_bundles".into(),
                ));
            }
            (None, Some(d)) => {
                return Err(ConfigError::Conflict(format!(
                    "trust_domain {d} beside trust_bundles: the trust domains accepted are trust_bundles' own (remove trust_domain, or give its trust_bundle)"
                )));
            }
        }
        Ok(Anchors::PerDomain(per))
    }

    pub fn dns_port(&self) -> u16 {
        self.dns_listen_port.unwrap_or(15053)
    }

    pub fn dns_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.dns_grace_secs.unwrap_or(60))
    }

    pub fn dns_min_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.dns_min_ttl_secs.unwrap_or(5))
    }

    pub fn dns_caps(&self) -> crate::dns::Caps {
        crate::dns::Caps {
            names_per_identity: self.dns_max_names.unwrap_or(1024),
            addresses_per_name: self.dns_max_addresses.unwrap_or(32),
        }
    }

    /// (per identity, in all) namespaces the DNS proxy listens in besides the node's own.
    pub fn dns_namespace_caps(&self) -> (usize, usize) {
        (
            self.dns_max_namespaces_per_identity.unwrap_or(16),
            self.dns_max_namespaces.unwrap_or(256),
        )
    }

    pub fn dns_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.dns_timeout_ms.unwrap_or(2000))
    }

    pub fn catalog_refresh(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.catalog_refresh_secs.unwrap_or(300))
    }

    pub fn aggregate_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.aggregate_window_secs.unwrap_or(10))
    }

    pub fn unknown_flows(&self) -> UnknownFlows {
        self.unknown_flows.map_or(UnknownFlows::Report, Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ocsf_file_goes_beside_the_log_and_needs_one() {
        let c = |t: &str| NodeConfig::parse(Path::new("/n.toml"), t).unwrap();
        assert_eq!(c("").audit_ocsf_log().unwrap(), None);
        assert_eq!(
            c("audit_log = \"/l/a.jsonl\"\naudit_format = \"ocsf\"\n")
                .audit_ocsf_log()
                .unwrap(),
            Some(PathBuf::from("/l/a.ocsf.jsonl"))
        );
        assert_eq!(
            c("audit_log = \"/l/a.jsonl\"\naudit_format = \"native\"\naudit_ocsf_log = \"/o\"\n")
                .audit_ocsf_log()
                .unwrap(),
            None
        );
        for (t, says) in [
            ("audit_format = \"ocsf\"\n", "there is no audit_log"),
            (
                "audit_log = \"/a\"\naudit_format = \"ocsf\"\naudit_ocsf_log = \"/a\"\n",
                "is the audit_log itself",
            ),
        ] {
            let e = c(t).audit_ocsf_log().unwrap_err().to_string();
            assert!(e.contains(says), "{t}: {e}");
        }
        let e = NodeConfig::parse(Path::new("/n.toml"), "audit_format = \"cef\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `cef`"), "{e}");
    }

    #[test]
    fn parses_with_defaults_and_flags_win() {
        let c = NodeConfig::parse(
            Path::new("a.toml"),
            "policy_dir = \"/p\"\ntrust_bundle = \"/ca.pem\"\nunknown_flows = \"deny\"\n\
             audit_log = \"/a.jsonl\"\naudit_log_max_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(c.audit_log_max_bytes, Some(1 << 20));
        assert_eq!(c.unknown_flows(), UnknownFlows::Deny);
        assert_eq!(c.socket(), PathBuf::from(DEFAULT_SOCKET));
        let c = c.overlay(NodeConfig {
            policy_dir: Some("/q".into()),
            ..Default::default()
        });
        assert_eq!(c.policy_dir(), PathBuf::from("/q"));
        assert_eq!(
            c.anchors().unwrap(),
            Anchors::Shared {
                bundle: "/ca.pem".into(),
                domain: None
            }
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = NodeConfig::parse(
            Path::new("a.toml"),
            "policy_dir = \"/p\"\nsockett = \"/s\"\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("a.toml:2:1: unknown field `sockett`"),
            "{e}"
        );
        let e = NodeConfig::parse(Path::new("a.toml"), "unknown_flows = \"maybe\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("a.toml:1:17: unknown variant `maybe`"),
            "{e}"
        );
        assert_eq!(
            NodeConfig::default().anchors().unwrap_err().to_string(),
            "missing setting `trust_bundle` (in the config file or as --trust-bundle)"
        );
    }

    #[test]
    fn bundles_per_trust_domain_are_never_merged_with_a_shared_one() {
        let c = |t: &str| NodeConfig::parse(Path::new("/n.toml"), t).unwrap();
        let per = |pairs: &[(&str, &str)]| {
            Anchors::PerDomain(
                pairs
                    .iter()
                    .map(|(d, f)| ((*d).to_owned(), PathBuf::from(f)))
                    .collect(),
            )
        };
        let two = "[trust_bundles]\n\"a.example\" = \"/a.json\"\n\"b.example\" = \"/b.pem\"\n";
        assert_eq!(
            c(two).anchors().unwrap(),
            per(&[("a.example", "/a.json"), ("b.example", "/b.pem")])
        );
        // trust_bundle is trust_domain's bundle, beside the others.
        let with = format!("trust_bundle = \"/c.pem\"\ntrust_domain = \"c.example\"\n{two}");
        assert_eq!(
            c(&with).anchors().unwrap(),
            per(&[
                ("a.example", "/a.json"),
                ("b.example", "/b.pem"),
                ("c.example", "/c.pem")
            ])
        );
        for (t, says) in [
            (
                format!("trust_bundle = \"/c.pem\"\n{two}"),
                "would be trusted for every trust domain",
            ),
            (
                format!("trust_domain = \"a.example\"\n{two}"),
                "the trust domains accepted are trust_bundles' own",
            ),
            (
                format!("trust_bundle = \"/c.pem\"\ntrust_domain = \"a.example\"\n{two}"),
                "trust domain a.example has two bundles",
            ),
        ] {
            let e = c(&t).anchors().unwrap_err().to_string();
            assert!(e.contains(says), "{t}: {e}");
        }
        // Relative to the file, and flags replace the file's table.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let f = dir.join("n.toml");
        std::fs::write(&f, "[trust_bundles]\n\"a.example\" = \"a.json\"\n").unwrap();
        let loaded = NodeConfig::load(&f).unwrap();
        assert_eq!(
            loaded.anchors().unwrap(),
            per(&[("a.example", dir.join("a.json").to_str().unwrap())])
        );
        let over = loaded.overlay(NodeConfig {
            trust_bundles: [("b.example".to_owned(), PathBuf::from("/b.pem"))].into(),
            ..Default::default()
        });
        assert_eq!(over.anchors().unwrap(), per(&[("b.example", "/b.pem")]));
    }
}
