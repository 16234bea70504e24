//! `cargo xtask package`: the Debian package, built by cargo-deb from `[package.metadata.deb]`
//! in agent/Cargo.toml, with the shell completions and man pages the binary generates. Also
//! what the package test needs and a fresh machine lacks: a clean Debian root to install into
//! and Prometheus's `promtool`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{apt_install, cargo, output, run};

/// cargo-deb, pinned: the package's layout is what this release makes of the metadata.
const CARGO_DEB: &str = "3.8.0";
/// The Debian release the package is built for and tested in.
const SUITE: &str = "bookworm";

/// Builds `target/debian/agentwall_VERSION_amd64.deb` and returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    let have = output(cargo(root).args(["deb", "--version"])).unwrap_or_default();
    if !have.contains(CARGO_DEB) {
        println!("installing cargo-deb {CARGO_DEB} (about a minute)");
        run(cargo(root).args(["install", &format!("cargo-deb@{CARGO_DEB}"), "--locked"]))?;
    }
    run(cargo(root).args([
        "build",
        "--release",
        "-p",
        "agentwall",
        "--bin",
        "agentwall",
    ]))?;
    let bin = root.join("target/release/agentwall");
    let out = root.join("target/package");
    let completions = out.join("completions");
    let man = out.join("man");
    // What an earlier build generated for commands since renamed must not be packaged.
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&completions).context("making target/package/completions")?;
    for (shell, file) in [
        ("bash", "agentwall.bash"),
        ("zsh", "_agentwall"),
        ("fish", "agentwall.fish"),
    ] {
        let script = output(Command::new(&bin).args(["generate", "completions", shell]))
            .with_context(|| format!("agentwall generate completions {shell}"))?;
        std::fs::write(completions.join(file), script)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    run(Command::new(&bin).args(["generate", "man"]).arg(&man))?;
    // Debian installs man pages compressed; -n keeps the archive reproducible.
    run(Command::new("sh")
        .arg("-c")
        .arg("gzip -9nf -- *.1")
        .current_dir(&man))?;
    let built = output(cargo(root).args([
        "deb",
        "-p",
        "agentwall",
        "--no-build",
        // The release profile keeps line tables for profiling; the package does not.
        "--strip",
        "--deb-revision",
        "",
        "--output",
        "target/debian/",
    ]))
    .context("cargo deb failed (run it by hand to see why)")?;
    let path = root.join(built.trim().lines().last().unwrap_or_default());
    if !path.is_file() {
        bail!("cargo deb did not name the package it built: {built:?}");
    }
    println!("{}", path.display());
    Ok(path)
}

/// A clean Debian root (minbase and systemd, as a server has: dpkg, apt, nothing of ours)
/// as a tarball the package test unpacks into a temporary directory for each run; made once
/// with mmdebstrap from Debian's packages.
pub fn debian_root(root: &Path) -> Result<PathBuf> {
    let tar = root.join(format!("target/tools/debian-{SUITE}-systemd.tar"));
    if tar.is_file() {
        return Ok(tar);
    }
    apt_install(&["mmdebstrap"], &["mmdebstrap"])?;
    std::fs::create_dir_all(root.join("target/tools"))?;
    let partial = tar.with_extension("partial.tar");
    println!(
        "making a clean Debian {SUITE} root for the package test (mmdebstrap, a minute or two)"
    );
    run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=systemd",
            "--mode=root",
            "--quiet",
            SUITE,
        ])
        .arg(&partial)
        .arg("http://deb.debian.org/debian"))?;
    std::fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// `promtool` from Debian's prometheus package, unpacked under target/tools (the package is
/// not installed: it would start a Prometheus server).
pub fn promtool(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/tools/prometheus");
    let bin = dir.join("usr/bin/promtool");
    if bin.is_file() {
        return Ok(bin);
    }
    let download = root.join("target/tools/prometheus-deb");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    let fetch = || {
        Command::new("apt-get")
            .args(["-o", "APT::Sandbox::User=root", "download", "prometheus"])
            .current_dir(&download)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !fetch() {
        run(Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        if !fetch() {
            bail!("apt-get download prometheus failed");
        }
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    if !bin.is_file() {
        bail!("{} has no usr/bin/promtool", deb.display());
    }
    Ok(bin)
}
