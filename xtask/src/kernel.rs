//! `cargo xtask test --kernel K`: the whole test suite on another kernel, in a qemu VM.
//!
//! The guest boots K with a small initramfs (busybox and the virtio/9p modules of K), mounts
//! this machine's root file system over 9p, mounts its own proc, sys, cgroup2, bpffs and tmp,
//! and runs the test executables built here. Every test creates its own network namespaces
//! and cgroups inside the guest, so nothing reaches this machine's network or cgroups. KVM is
//! used when it boots; otherwise qemu emulates (slower).
//!
//! K is a Debian kernel package (`.deb`), a directory with `boot/vmlinuz-*` and
//! `lib/modules/*` (an unpacked package), or a name this task downloads from Debian's
//! packages: `debian-6.1` (bookworm) or `debian-6.12` (bookworm-backports).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A kernel image and its modules.
struct Kernel {
    vmlinuz: PathBuf,
    modules: PathBuf,
    release: String,
}

/// What the 9p root needs, then what the node needs (socket diagnostics, to destroy a revoked
/// identity's connections) and the tests (veth, packet sockets), in load order; ones built into the kernel are absent and skipped.
/// The guest cannot load modules on demand (this machine's root has none for its kernel).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
    "net/ipv4/inet_diag",
    "net/ipv4/tcp_diag",
    "net/ipv4/udp_diag",
    // The wire tests: a veth pair between test namespaces, captured with AF_PACKET.
    "drivers/net/veth",
    "net/packet/af_packet",
    // The server-name tests lose a segment with a token bucket.
    "net/sched/sch_tbf",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip link set lo up
for m in $(cat /modules); do
  [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko"
done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap hostroot /newroot; then
  echo "AW_KERNEL_EXIT=98"; poweroff -f
fi
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
# The guest's own tmp and run would hide a workspace that lives under them (a clone in
# /tmp, say): hold it aside and put it back on top.
ws=$(sed -n 's/.*aw.ws=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /ws && mount -o bind "/newroot$ws" /ws
mount -t tmpfs tmp /newroot/tmp
mount -t tmpfs run /newroot/run
mkdir -p "/newroot$ws" && mount -o bind /ws "/newroot$ws"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount -t bpf bpf /newroot/sys/fs/bpf
echo "AW_KERNEL_UP $(uname -r) clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
script=$(sed -n 's/.*aw.run=\([^ ]*\).*/\1/p' /proc/cmdline)
# Into the new root with switch_root, not chroot: the kernel refuses a chrooted process a new
# user namespace, which the tests' unprivileged `unshare -Urn` needs. busybox goes along on the
# guest's own tmpfs, to report and power off.
mkdir -p /newroot/run/aw && cp /bin/busybox /newroot/run/aw/busybox
exec switch_root /newroot /run/aw/busybox sh -c '/bin/sh "$0"; echo "AW_KERNEL_EXIT=$?"; /run/aw/busybox poweroff -f' "$script"
"#;

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// qemu and a static busybox, from Debian's packages (idempotent).
fn install_tools() -> Result<()> {
    if Path::new("/usr/bin/qemu-system-x86_64").exists() && Path::new("/bin/busybox").exists() {
        return Ok(());
    }
    println!("installing qemu-system-x86 and busybox-static (Debian packages)");
    crate::run(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "qemu-system-x86",
                "busybox-static",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The newest `linux-image-<series>.*-amd64` package of `suite`, downloaded into `dir`.
fn download(dir: &Path, suite: &str, series: &str) -> Result<PathBuf> {
    // A private apt state, so the machine's own sources stay as they are.
    let apt = dir.join("apt");
    std::fs::create_dir_all(apt.join("lists/partial"))?;
    std::fs::write(
        apt.join("sources.list"),
        format!("deb http://deb.debian.org/debian {suite} main\n"),
    )?;
    let opts: Vec<String> = vec![
        format!(
            "-o=Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "-o=Dir::Etc::SourceParts=/dev/null".into(),
        format!("-o=Dir::State::Lists={}", apt.join("lists").display()),
        format!("-o=Dir::Cache={}", apt.join("cache").display()),
    ];
    std::fs::create_dir_all(apt.join("cache/archives/partial"))?;
    sh(Command::new("apt-get").args(&opts).arg("update"))?;
    let found = sh(Command::new("apt-cache").args(&opts).args([
        "search",
        "--names-only",
        &format!("^linux-image-{}[.0-9]", series.replace('.', "\\.")),
    ]))?;
    // The generic flavour (not cloud, rt, unsigned or debug symbols): 6.1.0-50-amd64,
    // 6.12.57+deb12-amd64.
    let mut names: Vec<&str> = found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.ends_with("-amd64")
                && !["cloud", "-rt-", "unsigned", "-dbg"]
                    .iter()
                    .any(|x| n.contains(x))
        })
        .collect();
    // Newest ABI last (6.1.0-9 < 6.1.0-47).
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    let Some(name) = names.last() else {
        bail!("{suite} has no linux-image-{series}*-amd64 package");
    };
    println!("downloading {name} from {suite}");
    sh(Command::new("apt-get")
        .args(&opts)
        .args(["download", name])
        .current_dir(dir))?;
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
        })
        .context("the downloaded package is not where apt-get put it")
}

fn resolve(root: &Path, kernel: &str) -> Result<Kernel> {
    let cache = root.join("target/kernels");
    std::fs::create_dir_all(&cache)?;
    let path = match kernel {
        "debian-6.1" => download(&cache, "bookworm", "6.1")?,
        "debian-6.12" => download(&cache, "bookworm-backports", "6.12")?,
        p => PathBuf::from(p),
    };
    let tree = if path.is_dir() {
        path
    } else if path.extension().is_some_and(|e| e == "deb") {
        let stem = path.file_stem().context("package name")?;
        let tree = cache.join(stem);
        if !tree.exists() {
            sh(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&tree))?;
        }
        tree
    } else {
        bail!(
            "--kernel {kernel}: not a .deb, an unpacked kernel package, debian-6.1 or debian-6.12"
        );
    };
    let vmlinuz = std::fs::read_dir(tree.join("boot"))
        .with_context(|| format!("{}: no boot/ directory", tree.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{}: no boot/vmlinuz-*", tree.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel release")?
        .to_owned();
    let modules = tree.join("lib/modules").join(&release);
    if !modules.is_dir() {
        bail!("{}: no modules for {release}", modules.display());
    }
    Ok(Kernel {
        vmlinuz,
        modules,
        release,
    })
}

/// busybox, the modules (decompressed: busybox's insmod reads plain .ko) and the init script.
fn initramfs(root: &Path, k: &Kernel) -> Result<PathBuf> {
    let dir = root
        .join("target/kernels")
        .join(format!("initrd-{}", k.release));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["bin", "lib/modules", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))?;
    let mut loaded = Vec::new();
    for m in MODULES {
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(m);
        let plain = k.modules.join("kernel").join(format!("{m}.ko"));
        let xz = k.modules.join("kernel").join(format!("{m}.ko.xz"));
        let out = dir.join("lib/modules").join(format!("{name}.ko"));
        if plain.exists() {
            std::fs::copy(&plain, &out)?;
        } else if xz.exists() {
            let bytes = Command::new("xz")
                .args(["-dc"])
                .arg(&xz)
                .output()
                .context("xz")?
                .stdout;
            std::fs::write(&out, bytes)?;
        } else {
            continue;
        }
        loaded.push(name);
    }
    std::fs::write(dir.join("modules"), loaded.join("\n"))?;
    std::fs::write(dir.join("init"), INIT)?;
    sh(Command::new("chmod").arg("+x").arg(dir.join("init")))?;
    let image = root
        .join("target/kernels")
        .join(format!("initrd-{}.cpio.gz", k.release));
    sh(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        dir.display(),
        image.display()
    )))?;
    Ok(image)
}

/// Every test executable of the default members, built here, with the directory cargo would
/// run it in.
fn test_executables(root: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = crate::cargo(root)
        .args(["test", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("building the tests")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) = (v["executable"].as_str(), v["manifest_path"].as_str())
        else {
            continue;
        };
        let dir = Path::new(manifest).parent().unwrap_or(root).to_owned();
        found.push((PathBuf::from(exe), dir));
    }
    if found.is_empty() {
        bail!("no test executables were built");
    }
    Ok(found)
}

/// Boots the guest; returns its console lines as they come, through `each`, and whether it
/// came up at all (`AW_KERNEL_UP`).
fn boot(
    k: &Kernel,
    initrd: &Path,
    script: &Path,
    kvm: bool,
    up_within: Option<Duration>,
    mut each: impl FnMut(&str),
) -> Result<(bool, Option<i32>)> {
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm {
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "max"]);
    }
    cmd.args([
        "-m",
        "4G",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-net",
        "none",
    ])
    .arg("-kernel")
    .arg(&k.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(format!(
        // tsc=reliable: an emulated guest's clocksource watchdog otherwise finds the TSC
        // "unstable" under load and falls back to a slow emulated timer.
        "console=ttyS0 panic=-1 quiet tsc=reliable aw.run={} aw.ws={}",
        script.display(),
        // The script is WORKSPACE/target/kernels/run-tests.sh.
        script
            .ancestors()
            .nth(3)
            .unwrap_or(Path::new("/"))
            .display()
    ))
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let pid = child.id();
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut up, mut exit) = (false, None);
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                // Strip terminal control sequences the firmware writes.
                let clean: String = line
                    .chars()
                    .filter(|c| !c.is_control() || *c == '\t')
                    .collect();
                if clean.contains("AW_KERNEL_UP") {
                    up = true;
                }
                if let Some(code) = clean.trim().strip_prefix("AW_KERNEL_EXIT=") {
                    exit = code.parse().ok();
                }
                each(&clean);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !up && up_within.is_some_and(|d| started.elapsed() > d) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let _ = child.wait();
            return Ok((false, None));
        }
    }
    let _ = child.wait();
    Ok((up, exit))
}

pub fn run(root: &Path, kernel: &str, only: &[String], filter: Option<&str>) -> Result<()> {
    install_tools()?;
    let k = resolve(root, kernel)?;
    println!("kernel {} ({})", k.release, k.vmlinuz.display());
    let initrd = initramfs(root, &k)?;
    crate::run(crate::cargo(root).args(["build", "--bins"]))?;
    let mut tests = test_executables(root)?;
    if !only.is_empty() {
        // Test executables are named `<target>-<hash>`.
        tests.retain(|(exe, _)| {
            exe.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit_once('-'))
                .is_some_and(|(target, _)| only.iter().any(|o| o == target))
        });
        if tests.is_empty() {
            bail!("no test target named {}", only.join(", "));
        }
    }
    let dir = root.join("target/kernels");
    let script = dir.join("run-tests.sh");

    // KVM when it boots (nested virtualization may not), else emulation.
    let probe = dir.join("probe.sh");
    std::fs::write(&probe, "exit 0\n")?;
    let kvm = Path::new("/dev/kvm").exists()
        && boot(
            &k,
            &initrd,
            &probe,
            true,
            Some(Duration::from_secs(60)),
            |_| {},
        )?
        .0;
    println!(
        "booting {} with {}",
        k.release,
        if kvm {
            "KVM"
        } else {
            "emulation (no usable KVM)"
        }
    );
    // An emulated guest runs everything many times slower: the tests' deadlines (never their
    // synchronisation) stretch by this factor.
    // The matrix's kernels run BPF LSM programs: a node that leaves that line unenforced
    // there fails the tests that ask (see `lsm_line` in the tests crate).
    let mut text = String::from("export AGENTWALL_TEST_EXPECT_LSM=1\n");
    text.push_str(if kvm {
        "status=0\n"
    } else {
        "export AGENTWALL_TEST_PATIENCE=10\nstatus=0\n"
    });
    // The filter goes to the harness as its one argument, quoted for the guest's shell.
    let filter = filter.map_or(String::new(), |f| {
        format!(" '{}'", f.replace('\'', "'\\''"))
    });
    for (exe, cwd) in &tests {
        text.push_str(&format!(
            "echo \"     Running {}\"\ncd '{}' && '{}'{filter} || status=1\n",
            exe.display(),
            cwd.display(),
            exe.display()
        ));
    }
    text.push_str("exit $status\n");
    std::fs::write(&script, text)?;
    let mut summary = crate::Summary::default();
    let (up, exit) = boot(&k, &initrd, &script, kvm, None, |line| {
        println!("{line}");
        summary.line(line);
    })?;
    println!();
    println!(
        "kernel {}: summary: {} passed, {} failed",
        k.release, summary.passed, summary.failed
    );
    if !up {
        bail!("the guest never came up");
    }
    match exit {
        Some(0) if summary.passed > 0 => Ok(()),
        Some(0) => bail!("no test ran in the guest"),
        Some(code) => bail!("tests failed on {} (exit {code})", k.release),
        None => bail!("the guest stopped before the tests finished"),
    }
}
