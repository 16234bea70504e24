use std::path::{Path, PathBuf};

use agentwall::config::{DEFAULT_CONFIG, NodeConfig};
use anyhow::Context as _;

/// `--config FILE` for the commands that use the node's paths: what a flag does not give is
/// read from the node's config, so a node configured in one file is driven with that file.
#[derive(clap::Args, Clone, Default)]
pub struct ConfigArg {
    /// The node's TOML config: the socket, bpffs directory, policy directory and audit log
    /// this command uses come from it unless a flag names them [default:
    /// /etc/agentwall/agentwall.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// The config as commands that change things read it: any error is an error (a `down`
    /// or `policy check` of the built-in paths would act on another node's pins, or check
    /// another directory, and say all is well).
    pub fn load_strict(&self) -> anyhow::Result<NodeConfig> {
        Ok(NodeConfig::find(self.config.as_deref())?)
    }

    /// The config named with `--config` (whose errors are errors), else the default file;
    /// one that cannot be read (a user without access, a syntax error) is said and passed
    /// over for the built-in paths, so `status`, `renew` and `revoke`, which only need the
    /// socket (root's, checked), keep working for whoever may use them.
    pub fn load(&self) -> anyhow::Result<NodeConfig> {
        match NodeConfig::find(self.config.as_deref()) {
            Ok(c) => Ok(c),
            Err(e) if self.config.is_none() => {
                eprintln!("agentwall: {e}: using the built-in paths");
                Ok(NodeConfig::default())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn file(&self) -> &Path {
        self.config.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG))
    }

    /// The node's API socket: the flag, else the config's `socket`, else the default.
    pub fn socket(&self, flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
        match flag {
            Some(p) => Ok(p),
            None => Ok(self.load()?.socket()),
        }
    }

    pub fn bpffs_dir(&self, flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
        match flag {
            Some(p) => Ok(p),
            None => Ok(self.load_strict()?.bpffs_dir()),
        }
    }

    /// The directory the node enforces policy from (the control plane's bundle directory
    /// when one is configured).
    pub fn policy_dir(&self, flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
        match flag {
            Some(p) => Ok(p),
            None => Ok(self.load_strict()?.policy_dir()),
        }
    }

    /// The node's audit log: the flag, else the config's `audit_log`; there is no default.
    pub fn audit_log(&self, flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
        if let Some(p) = flag {
            return Ok(p);
        }
        self.load()?.audit_log.with_context(|| {
            format!(
                "no audit log: give --audit-log FILE or set audit_log in {}",
                self.file().display()
            )
        })
    }
}

/// The node's API socket, for the commands that talk to a running node.
#[derive(clap::Args, Clone)]
pub struct NodeSocket {
    /// The node's API socket [default: `socket` from the config, else
    /// /run/agentwall/agentwall.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
}

impl NodeSocket {
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        self.config.socket(self.socket.clone())
    }
}
