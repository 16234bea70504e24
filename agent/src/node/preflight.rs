//! `agentwall node --check-config`: what a start would read, checked the way the start checks
//! it, and what the kernel offers, with nothing started, attached, written or kept.

use std::path::Path;

use serde::Serialize;

use crate::{
    cgroup::Cgroup2Mount,
    config::NodeConfig,
    datapath::{SocketFamilies, layout::KERNEL_BTF},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// The node starts, with less than it could do (said in the detail).
    Warning,
    /// The node would not start, or would not do what the config says.
    Error,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub what: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Error => "ERROR",
        };
        write!(
            f,
            "{v:<7} {}: {}",
            self.what,
            self.detail.replace('\n', "\n        ")
        )
    }
}

fn finding(what: &'static str, verdict: Verdict, detail: impl Into<String>) -> Finding {
    Finding {
        what,
        verdict,
        detail: detail.into(),
    }
}

/// Every finding for `cfg`, configuration first, then the kernel.
pub fn check(cfg: &NodeConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(match cfg.check() {
        Ok(()) => finding("settings", Verdict::Ok, "no settings conflict"),
        Err(e) => finding("settings", Verdict::Error, e.to_string()),
    });
    let anchors = cfg.anchors();
    let bundles = anchors.as_ref().map_or_else(
        |_| "?".to_owned(),
        |a| {
            a.files()
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    out.push(match super::trust::Trust::check(cfg) {
        Ok((cas, crls, serials)) => finding(
            "trust bundle and CRLs",
            Verdict::Ok,
            format!(
                "{bundles}: {cas} CA certificate(s); {crls} CRL(s) in force listing {serials} serial(s)"
            ),
        ),
        Err(e) => finding("trust bundle and CRLs", Verdict::Error, e.to_string()),
    });
    out.push(match anchors {
        Ok(crate::config::Anchors::PerDomain(per)) => finding(
            "trust domain",
            Verdict::Ok,
            format!(
                "only identities in {} are accepted, each verified against its own domain's bundle",
                per.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ),
        Ok(crate::config::Anchors::Shared {
            domain: Some(d), ..
        }) => finding(
            "trust domain",
            Verdict::Ok,
            format!("only identities in {d} are accepted"),
        ),
        _ => finding(
            "trust domain",
            Verdict::Warning,
            "not set: an identity of any trust domain the bundle's CAs sign is accepted",
        ),
    });
    out.push(policy(cfg));
    if let Some(cp) = &cfg.control_plane {
        out.push(match cp.urls().as_deref() {
            Err(e) => finding(
                "control plane",
                Verdict::Error,
                format!("[control_plane]: {e}"),
            ),
            Ok([]) => finding(
                "control plane",
                Verdict::Error,
                "[control_plane] has no url",
            ),
            Ok(urls) => files(
                "control plane",
                &[
                    ("ca", cp.ca.as_deref()),
                    ("cert", cp.cert.as_deref()),
                    ("key", cp.key.as_deref()),
                    ("token_file", cp.token_file.as_deref()),
                ],
                &urls.join(", "),
            ),
        });
    }
    out.push(audit(cfg));
    for (key, group) in [
        ("socket_group", &cfg.socket_group),
        ("audit_log_group", &cfg.audit_log_group),
    ] {
        if let Some(g) = group {
            out.push(match super::group_id(g) {
                Ok(gid) => finding("groups", Verdict::Ok, format!("{key} {g} is gid {gid}")),
                Err(e) => finding("groups", Verdict::Error, format!("{key}: {e}")),
            });
        }
    }
    out.extend(kernel());
    let attach = match &cfg.attach_cgroup {
        Some(p) => Ok(p.clone()),
        None => crate::cgroup::Cgroup2Mount::discover().map(|m| m.mount_point),
    };
    out.push(
        match attach.and_then(|p| crate::cgroup::Cgroup::open(&p).map(|cg| (p, cg))) {
            Ok((p, cg)) => match crate::datapath::check_attach(&cg) {
                Ok(()) if cfg.attach_cgroup.is_none() => finding(
                    "attach cgroup",
                    Verdict::Ok,
                    format!("the cgroup v2 mount point, {}", p.display()),
                ),
                Ok(()) => finding("attach cgroup", Verdict::Ok, p.display().to_string()),
                Err(e) => finding("attach cgroup", Verdict::Error, e.to_string()),
            },
            Err(e) => finding("attach cgroup", Verdict::Error, e.to_string()),
        },
    );
    out.push(match crate::datapath::check_pins(&cfg.bpffs_dir()) {
        Ok(said) => finding("bpffs", Verdict::Ok, said),
        Err(e) => finding("bpffs", Verdict::Error, e.to_string()),
    });
    out.extend(open_parent(&cfg.bpffs_dir()));
    out
}

/// A pin directory's parent anyone may write to (bpffs mounted without `mode=0700`): a user
/// can make the pin directory first, their own, and the node then refuses to start.
fn open_parent(bpffs_dir: &Path) -> Option<Finding> {
    use std::os::unix::fs::MetadataExt as _;
    let parent = bpffs_dir.parent()?;
    let mode = std::fs::metadata(parent).ok()?.mode();
    (mode & 0o002 != 0).then(|| {
        finding(
            "bpffs",
            Verdict::Warning,
            format!(
                "{} is writable by anyone (mode {:o}): a user can make {} before the node does and keep it from starting; mount bpffs with mode=0700 (as systemd does) or `chmod o-w {}`",
                parent.display(),
                mode & 0o7777,
                bpffs_dir.display(),
                parent.display()
            ),
        )
    })
}

/// The audit log's directory and the checkpoint signing key, as the start opens them.
fn audit(cfg: &NodeConfig) -> Finding {
    let mut said = Vec::new();
    match &cfg.audit_log {
        Some(log) => {
            if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
                match std::fs::metadata(dir) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        let why =
                            format!("{}: {} is not a directory", log.display(), dir.display());
                        return finding("audit", Verdict::Error, why);
                    }
                    Err(e) => {
                        let why = format!("{}: {}: {e}", log.display(), dir.display());
                        return finding("audit", Verdict::Error, why);
                    }
                }
            }
            said.push(format!("audit log {}", log.display()));
        }
        None => said.push("no audit log".to_owned()),
    }
    if let Some(key) = &cfg.audit_signing_key {
        match crate::audit::Signer::load(key) {
            Ok(s) => said.push(format!("checkpoints signed with key {}", s.id())),
            Err(e) => {
                return finding("audit", Verdict::Error, format!("audit_signing_key: {e}"));
            }
        }
    }
    finding("audit", Verdict::Ok, said.join("; "))
}

/// The policy a start would enforce, compiled against every capacity the way an apply is.
fn policy(cfg: &NodeConfig) -> Finding {
    let dir = cfg.policy_dir();
    if cfg.control_plane.is_some() && !dir.exists() {
        return finding(
            "policy",
            Verdict::Ok,
            "comes from the control plane (no bundle received yet: every bound identity is denied everything until one is)",
        );
    }
    let compiled = |dir: &Path| {
        crate::policy::source::load_dir(dir).and_then(|set| {
            crate::policy::source::check_compiles(&set)?;
            Ok(set)
        })
    };
    let errors = match compiled(&dir) {
        Ok(set) => {
            return finding(
                "policy",
                Verdict::Ok,
                format!(
                    "{}: {} AgentPolicy, {} Archetype, revision {}",
                    dir.display(),
                    set.agents.len(),
                    set.archetypes.len(),
                    set.revision
                ),
            );
        }
        Err(errors) => errors,
    };
    let what = format!("{}: {} error(s):\n{errors}", dir.display(), errors.0.len());
    // A start on a directory that does not load runs the last good revision it kept, as the
    // running node does: the check must not refuse a start the node would make. One that
    // loads and does not fit the maps is refused by the start.
    if crate::policy::source::load_dir(&dir).is_ok() {
        return finding("policy", Verdict::Error, what);
    }
    match compiled(&super::enforcer::last_good_dir(&cfg.state_dir())) {
        Ok(good) => finding(
            "policy",
            Verdict::Warning,
            format!(
                "{what}\nthe node starts on the last good revision {} (kept in {}) until the directory is fixed",
                good.revision,
                super::enforcer::last_good_dir(&cfg.state_dir()).display()
            ),
        ),
        Err(_) => finding("policy", Verdict::Error, what),
    }
}

/// Each named file, when set, must be readable.
fn files(what: &'static str, named: &[(&str, Option<&Path>)], about: &str) -> Finding {
    let unreadable: Vec<String> = named
        .iter()
        .filter_map(|(key, p)| Some((key, (*p)?)))
        .filter_map(|(key, p)| {
            std::fs::File::open(p)
                .err()
                .map(|e| format!("{key} {}: {e}", p.display()))
        })
        .collect();
    if unreadable.is_empty() {
        finding(what, Verdict::Ok, about.to_owned())
    } else {
        finding(what, Verdict::Error, unreadable.join("; "))
    }
}

/// What this kernel offers the node. Only a missing cgroup v2 stops a start; the rest is
/// enforcement the node says it cannot give.
pub fn kernel() -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(match Cgroup2Mount::discover() {
        Ok(m) => finding(
            "cgroup v2",
            Verdict::Ok,
            format!("mounted at {}", m.mount_point.display()),
        ),
        Err(e) => finding("cgroup v2", Verdict::Error, e.to_string()),
    });
    out.push(if Path::new(KERNEL_BTF).exists() {
        finding("BTF", Verdict::Ok, KERNEL_BTF)
    } else {
        finding(
            "BTF",
            Verdict::Warning,
            format!("{KERNEL_BTF} is missing: the socket flags a handed-in socket carries cannot be read, so every inet socket handed to an agent is refused"),
        )
    });
    out.push(match crate::datapath::lsm_line_as_mounted() {
        SocketFamilies::Enforced => finding(
            "BPF LSM",
            Verdict::Ok,
            "bpf is among the kernel's active LSMs: the node loads its BPF LSM programs at start (socket families, socket options, handed-in sockets, binds), and `status` says whether they run",
        ),
        SocketFamilies::Unenforced(why) => finding(
            "BPF LSM",
            Verdict::Warning,
            format!("{why}: socket families beyond inet, socket options and handed-in sockets are not judged"),
        ),
    });
    out.push(layout(&crate::datapath::layout_gaps_here()));
    out.push(lockdown(std::fs::read_to_string(
        "/sys/kernel/security/lockdown",
    )));
    out.push(io_uring_here());
    out.push(binder_here());
    out.push(match crate::api::has_peer_pidfd() {
        Ok(true) => finding("SO_PEERPIDFD", Verdict::Ok, "launch names its caller by pidfd"),
        Ok(false) => finding(
            "SO_PEERPIDFD",
            Verdict::Warning,
            "this kernel has none (Linux 6.5): launch names its caller by the pid recorded at connect",
        ),
        Err(e) => finding("SO_PEERPIDFD", Verdict::Warning, format!("cannot tell: {e}")),
    });
    out
}

/// The kernel fields the node finds in the BTF at start (also in `status`).
fn layout(gaps: &[crate::datapath::LayoutGap]) -> Finding {
    const WHAT: &str = "kernel layout";
    if gaps.is_empty() {
        return finding(
            WHAT,
            Verdict::Ok,
            "every kernel field the node reads at offsets that move between kernels is in the BTF",
        );
    }
    finding(
        WHAT,
        Verdict::Warning,
        gaps.iter()
            .map(|g| format!("{}: {}", g.unknown, g.effect))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The kernel's lockdown (`none [integrity] confidentiality`): at confidentiality the kernel
/// withholds the kernel-memory reads the server-name check and some BPF LSM programs need.
fn lockdown(file: std::io::Result<String>) -> Finding {
    const WHAT: &str = "kernel lockdown";
    let Ok(levels) = file else {
        return finding(WHAT, Verdict::Ok, "no lockdown LSM here");
    };
    let chosen = levels
        .split_whitespace()
        .find_map(|l| l.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("none");
    if chosen == "confidentiality" {
        finding(
            WHAT,
            Verdict::Warning,
            "confidentiality: the kernel refuses BPF reads of its memory, so the TLS server-name check does not load (`sni: enforce` policies refuse the connections only a name rule allows, `sni: audit` ones record them unchecked) nor do the BPF LSM programs that read socket fields; `status` says what runs",
        )
    } else {
        finding(WHAT, Verdict::Ok, chosen.to_owned())
    }
}

/// What this host's `kernel.io_uring_disabled` leaves open (also said at start).
pub fn io_uring_here() -> Finding {
    io_uring(std::fs::read_to_string(
        "/proc/sys/kernel/io_uring_disabled",
    ))
}

/// Whether binder is on this host (also said at start).
pub fn binder_here() -> Finding {
    binder(
        std::fs::read_to_string("/proc/misc"),
        std::fs::read_to_string("/proc/filesystems"),
    )
}

/// Binder (Android's IPC) hands files from process to process without the `file_receive`
/// hook the receipt line judges in: a binder device (`/proc/misc`) or binderfs, which a user
/// may mount in a user namespace of their own (`/proc/filesystems`), lets an ungoverned
/// helper pass a governed agent sockets that no rule judged.
fn binder(misc: std::io::Result<String>, filesystems: std::io::Result<String>) -> Finding {
    const WHAT: &str = "binder";
    let (misc, filesystems) = match (misc, filesystems) {
        (Ok(m), Ok(f)) => (m, f),
        (Err(e), _) | (_, Err(e)) => {
            return finding(
                WHAT,
                Verdict::Warning,
                format!(
                    "cannot tell whether binder is here (reading /proc/misc and /proc/filesystems: {e})"
                ),
            );
        }
    };
    let devices: Vec<&str> = misc
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // Names are the admin's (`binder.devices=`, the module's `devices=`): binder,
        // hwbinder, binder1, binder-redroid...
        .filter(|name| name.contains("binder"))
        .collect();
    let binderfs = filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("binder"));
    let mut here = devices
        .iter()
        .map(|d| format!("the device /dev/{d}"))
        .collect::<Vec<_>>();
    if binderfs {
        here.push("binderfs (any user may mount it in a user namespace)".into());
    }
    if here.is_empty() {
        return finding(
            WHAT,
            Verdict::Ok,
            "no binder device or binderfs on this host",
        );
    }
    finding(
        WHAT,
        Verdict::Warning,
        format!(
            "{}: binder passes files between processes without the hook that judges what a governed agent receives, so a helper outside governance could hand an agent a socket no rule judged; unload binder_linux, or keep agents from it (DevicePolicy=closed, no user namespaces)",
            here.join(", ")
        ),
    )
}

/// `kernel.io_uring_disabled` (Linux 6.6; before, io_uring is open to all): `launch` keeps
/// io_uring from agents whose policy does not allow it, and `enroll` refuses a unit that used
/// it; an `enroll`ed unit's processes are kept from it afterwards by the BPF LSM line alone,
/// which this check cannot tell will load.
fn io_uring(file: std::io::Result<String>) -> Finding {
    const WHAT: &str = "io_uring";
    const UNITS: &str = "agents `launch` starts are refused it unless their policy says `io_uring: allow`; `enroll` refuses a unit whose processes used it under such a policy, and once enrolled its tasks make no ring only where the node's BPF LSM line is enforced (`status`: socket_families); where it is not, give units `SystemCallFilter=~io_uring_setup io_uring_enter io_uring_register pidfd_getfd`, or set kernel.io_uring_disabled=2";
    match file.as_deref().map(str::trim) {
        Ok("2") => finding(
            WHAT,
            Verdict::Ok,
            "disabled on this host (kernel.io_uring_disabled=2)",
        ),
        Ok("1") => finding(
            WHAT,
            Verdict::Warning,
            format!(
                "open to processes in kernel.io_uring_group or with CAP_SYS_ADMIN (kernel.io_uring_disabled=1): {UNITS}"
            ),
        ),
        Ok(v) => finding(
            WHAT,
            Verdict::Warning,
            format!("open to every process (kernel.io_uring_disabled={v}): {UNITS}"),
        ),
        Err(_) => finding(
            WHAT,
            Verdict::Warning,
            format!("open to every process (this kernel has no kernel.io_uring_disabled): {UNITS}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_open_to_units_is_a_warning_that_says_how_to_close_it() {
        let f = io_uring(Ok("2\n".into()));
        assert_eq!(
            (f.verdict, f.detail.as_str()),
            (
                Verdict::Ok,
                "disabled on this host (kernel.io_uring_disabled=2)"
            )
        );
        for f in [
            io_uring(Ok("0\n".into())),
            io_uring(Ok("1\n".into())),
            io_uring(Err(std::io::ErrorKind::NotFound.into())),
        ] {
            assert_eq!(f.verdict, Verdict::Warning);
            assert!(f.detail.starts_with("open to "), "{}", f.detail);
            assert!(
                f.detail.contains("SystemCallFilter=~io_uring_setup"),
                "{}",
                f.detail
            );
        }
    }

    #[test]
    fn binder_is_a_warning_where_a_device_or_binderfs_is_here() {
        let misc = "234 btrfs-control\n200 tun\n";
        let fs = "nodev\tsysfs\nnodev\tcgroup2\n\text4\n";
        let f = binder(Ok(misc.into()), Ok(fs.into()));
        assert_eq!(f.verdict, Verdict::Ok, "{f}");
        let f = binder(
            Ok(format!("{misc} 59 binder\n 58 hwbinder\n")),
            Ok(fs.into()),
        );
        assert_eq!(f.verdict, Verdict::Warning);
        assert!(
            f.detail.starts_with(
                "the device /dev/binder, the device /dev/hwbinder: binder passes files"
            ),
            "{f}"
        );
        let f = binder(Ok(format!("{misc} 57 binder-redroid\n")), Ok(fs.into()));
        assert_eq!(f.verdict, Verdict::Warning);
        assert!(
            f.detail.starts_with("the device /dev/binder-redroid:"),
            "{f}"
        );
        let f = binder(Ok(misc.into()), Ok(format!("{fs}nodev\tbinder\n")));
        assert_eq!(f.verdict, Verdict::Warning);
        assert!(
            f.detail.starts_with("binderfs (any user may mount it"),
            "{f}"
        );
        // Unreadable: not taken for absent.
        let gone = Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        let f = binder(gone, Ok(fs.into()));
        assert_eq!(f.verdict, Verdict::Warning);
        assert!(
            f.detail.starts_with("cannot tell whether binder is here"),
            "{f}"
        );
    }

    #[test]
    fn an_unknown_kernel_field_is_a_warning_naming_it_and_what_it_refuses() {
        assert_eq!(layout(&[]).verdict, Verdict::Ok);
        let gaps = [
            crate::datapath::LayoutGap {
                unknown: "the kernel's BTF at /sys/kernel/btf/vmlinux has no field dentry.d_name"
                    .into(),
                effect: "every file that is no socket is refused".into(),
            },
            crate::datapath::LayoutGap {
                unknown: "no SKBFL_SHARED_FRAG".into(),
                effect: "first data refused".into(),
            },
        ];
        let f = layout(&gaps);
        assert_eq!(f.verdict, Verdict::Warning);
        assert_eq!(
            f.to_string(),
            "warning kernel layout: the kernel's BTF at /sys/kernel/btf/vmlinux has no field dentry.d_name: every file that is no socket is refused\n        no SKBFL_SHARED_FRAG: first data refused"
        );
    }

    #[test]
    fn lockdown_at_confidentiality_is_a_warning_with_what_it_costs() {
        let f = lockdown(Ok("none [integrity] confidentiality\n".into()));
        assert_eq!((f.verdict, f.detail.as_str()), (Verdict::Ok, "integrity"));
        let f = lockdown(Ok("none integrity [confidentiality]\n".into()));
        assert_eq!(f.verdict, Verdict::Warning);
        assert!(f.detail.starts_with("confidentiality: "), "{}", f.detail);
        assert!(
            f.detail.contains("`sni: enforce` policies refuse"),
            "{}",
            f.detail
        );
        let f = lockdown(Err(std::io::ErrorKind::NotFound.into()));
        assert_eq!(
            (f.verdict, f.detail.as_str()),
            (Verdict::Ok, "no lockdown LSM here")
        );
    }
}
