//! Builds agent-ebpf for bpfel-unknown-none with the nightly toolchain and leaves the object in
//! OUT_DIR, where `datapath` embeds it with `include_bytes_aligned!`.
//!
//! The nested build is run here rather than through aya-build, which forwards every line the
//! nested cargo prints ("Compiling core", "Finished") as a `cargo:warning`, so a clean build
//! showed dozens of warnings. Here only the compiler's own warnings are forwarded, and the
//! nested cargo's whole output is printed when it fails.
use std::{
    io::{BufReader, Read as _},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::{Message, diagnostic::DiagnosticLevel};

/// The toolchain that builds the eBPF object (`-Z build-std=core` needs nightly).
const TOOLCHAIN: &str = "nightly";
const PACKAGE: &str = "agent-ebpf";

fn main() -> anyhow::Result<()> {
    console_packages()?;
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == PACKAGE)
        .ok_or_else(|| anyhow!("{PACKAGE} package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{PACKAGE} manifest has no parent directory"))?
        .to_owned();
    println!("cargo:rerun-if-changed={root_dir}");
    // The common crate is part of the eBPF object too.
    println!("cargo:rerun-if-changed=../agent-common/src");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // A target directory of its own: the outer cargo holds the lock on the workspace's.
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--release", "--message-format=json"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler is the stable one; the nested build must pick nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut stderr = child.stderr.take().context("the nested cargo's stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut object = None;
    let mut diagnostics = Vec::new();
    let stdout = BufReader::new(child.stdout.take().context("the nested cargo's stdout")?);
    for message in Message::parse_stream(stdout) {
        match message.context("the nested cargo's JSON messages")? {
            Message::CompilerArtifact(a) if a.target.name.as_str() == PACKAGE => {
                object = a.executable.map(|p| p.into_std_path_buf());
            }
            Message::CompilerMessage(m) => {
                let rendered = m.message.rendered.unwrap_or(m.message.message);
                if matches!(m.message.level, DiagnosticLevel::Warning) {
                    for line in rendered.lines() {
                        println!("cargo:warning={line}");
                    }
                }
                diagnostics.push(rendered);
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "building the eBPF object failed ({status}): {cmd:?}\n{}\n{stderr}",
            diagnostics.join("\n")
        );
    }
    let object = object.with_context(|| format!("the nested cargo built no {PACKAGE} binary"))?;
    std::fs::copy(&object, out_dir.join(PACKAGE))
        .with_context(|| format!("copying {} to {}", object.display(), out_dir.display()))?;
    Ok(())
}

/// The console's files from the npm registry (agent/console/package-lock.json), which
/// `cargo xtask setup` installs: copied into OUT_DIR, where the console embeds them. The
/// installed version must be the locked one.
fn console_packages() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?)
        .join("console");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("package-lock.json").display()
    );
    let lock: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("package-lock.json"))
            .context("console/package-lock.json")?,
    )
    .context("console/package-lock.json")?;
    for (package, files) in [("uplot", ["dist/uPlot.iife.min.js", "dist/uPlot.min.css"])] {
        let locked = lock["packages"][format!("node_modules/{package}")]["version"]
            .as_str()
            .with_context(|| format!("console/package-lock.json locks no {package}"))?;
        let installed_at = dir.join("node_modules").join(package);
        println!(
            "cargo:rerun-if-changed={}",
            installed_at.join("package.json").display()
        );
        let installed = std::fs::read_to_string(installed_at.join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|p| p["version"].as_str().map(str::to_owned));
        if installed.as_deref() != Some(locked) {
            bail!(
                "the console needs {package} {locked} from the npm registry in {} (found {}): run `cargo xtask setup`",
                installed_at.display(),
                installed.as_deref().unwrap_or("none")
            );
        }
        for f in files {
            let from = installed_at.join(f);
            let name = from.file_name().context("a file name")?;
            std::fs::copy(&from, out_dir.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}
