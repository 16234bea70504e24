//! Project tasks: `cargo xtask setup | build | test [--kernel K] | bench … | demo | fuzz`.
//!
//! Every task runs `setup` first, which installs what a fresh machine lacks for building the
//! eBPF programs (rust-src for the nightly toolchain, bpf-linker 0.10.0) and is quick when
//! everything is already there.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

mod demo;
mod kernel;
mod package;
mod postgres;
use clap::{Parser, Subcommand};

/// bpf-linker 0.10.0 is the last release that loads rustc's own LLVM (see KERNEL-NOTES).
const BPF_LINKER_VERSION: &str = "0.10.0";
const NIGHTLY: &str = "nightly";

#[derive(Parser)]
#[command(about = "agentwall project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain prerequisites (idempotent).
    Setup,
    /// Build every crate, the eBPF object included.
    Build,
    /// Build and run the whole test suite: unit tests and the privileged kernel tests (root).
    Test {
        /// Run it in a VM on this kernel instead: a Debian kernel package (.deb), an unpacked
        /// one, or `debian-6.1` / `debian-6.12` (downloaded from Debian's packages).
        #[arg(long)]
        kernel: Option<String>,
        /// With --kernel: only these test targets (comma-separated, e.g. `wire,datapath`), for
        /// a quick look at a change on another kernel. The matrix's results are whole runs.
        #[arg(long, requires = "kernel", value_delimiter = ',')]
        only: Vec<String>,
        /// With --kernel: only the tests whose names contain this (the test harness's filter).
        #[arg(long, requires = "kernel")]
        filter: Option<String>,
    },
    /// A node, a control plane and agents for N minutes with churn; prints RSS and
    /// descriptors over time, denials made vs stored vs lost, and wrong verdicts (exit 1 on
    /// any problem). The test suite runs two minutes of it.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run a benchmark and print its table.
    Bench {
        #[arg(value_parser = ["datapath", "dns", "node", "records", "compare", "control-plane"])]
        which: String,
        /// Operations measured per configuration and round (default: 20,000 connects for
        /// datapath, 2,000 lookups for dns, 5 starts for node, 60,000 flows for records, 40,000 connects for compare, 10 pushes for control-plane).
        #[arg(long)]
        iterations: Option<u32>,
    },
    /// agentwall end to end on this machine: certificates, policy, node, agents, flows; ends
    /// with the console's address and a one-time sign-in link.
    Demo {
        /// Keep everything running until Enter (on a terminal), to look at the console.
        #[arg(long)]
        keep: bool,
    },
    /// Build the Debian package (target/debian/agentwall_VERSION_amd64.deb) with cargo-deb:
    /// the binary, systemd units, default configs, completions, man pages, alerting rules
    /// and a Grafana dashboard.
    Package,
    /// Run COMMAND with a PostgreSQL server of its own, as the test suite has one
    /// (`AGENTWALL_TEST_POSTGRES`, `AGENTWALL_TEST_POSTGRES_CA` set), e.g.
    /// `cargo xtask with-postgres cargo test -p agentwall store`.
    WithPostgres {
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Fuzz a parser for a bounded time (libFuzzer via cargo-fuzz, nightly). Crashes are copied
    /// to fuzz/regressions/<target>/, which a regular test replays.
    Fuzz {
        #[arg(value_parser = ["policy", "dns", "cp_report", "cp_push"])]
        target: String,
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            run(cargo(&root).args(["build", "--all-targets"]))
        }
        Task::Test {
            kernel: Some(k),
            only,
            filter,
        } => {
            setup()?;
            require_root("the VM mounts this machine's root and the tests load eBPF programs")?;
            // The guest runs this machine's programs: enroll's tests run strace.
            apt_install(&["strace"], &["strace"])?;
            install_schemathesis(&root)?;
            install_ocsf_schemas(&root)?;
            kernel::run(&root, &k, &only, filter.as_deref())
        }
        Task::Test { kernel: None, .. } => {
            setup()?;
            require_root("the kernel tests load eBPF programs and create cgroups")?;
            // A real DNS server for the DNS policy tests, from Debian's packages.
            apt_install(&["dnsmasq"], &["dnsmasq-base"])?;
            // Real TLS clients and a real TLS server for the server-name check's tests.
            apt_install(&["curl", "openssl"], &["curl", "openssl"])?;
            // A unit with a process under a debugger, as users have them, for enroll's tests.
            apt_install(&["strace"], &["strace"])?;
            install_schemathesis(&root)?;
            install_ocsf_schemas(&root)?;
            install_browser(&root)?;
            // Unit tests and integration tests of every default member; the tests crate builds
            // its helper binaries (aw-probe, aw-loader) first.
            // The tests crate drives the real `agentwall` binary, which `cargo test` alone does
            // not build for another package's tests.
            run(cargo(&root).args(["build", "--bins"]))?;
            // The package test installs the package into a clean Debian root and checks the
            // alerting rules with promtool.
            package::build(&root)?;
            package::debian_root(&root)?;
            package::promtool(&root)?;
            // The control plane's PostgreSQL store and replicas are tested against a real
            // server, stopped when the suite ends.
            let pg = postgres::start()?;
            let suite = run_tests(cargo(&root).args(["test", "--no-fail-fast"]).envs(pg.env()));
            // The control plane's end-to-end tests once more, on PostgreSQL (the suite ran
            // them on SQLite).
            println!("the control plane's tests again, on PostgreSQL");
            let on_postgres = run_tests(
                cargo(&root)
                    .args(["test", "--no-fail-fast", "-p", "agentwall-tests"])
                    .args(["--test", "control_plane", "--test", "api_schema"])
                    .envs(pg.env())
                    .env("AGENTWALL_TEST_STORE", "postgres"),
            );
            suite.and(on_postgres)
        }
        Task::Bench { which, iterations } => {
            setup()?;
            require_root("the benchmark attaches eBPF programs")?;
            // The benchmark drives aw-probe (and the dns one the agentwall binary), so every
            // binary must be fresh.
            run(cargo(&root).args(["build", "--release", "--bins"]))?;
            let iterations = iterations.unwrap_or(match which.as_str() {
                "dns" => 2_000,
                "compare" => 40_000,
                // Pushes timed per fleet size.
                "control-plane" => 10,
                // Distinct flows per round.
                "records" => 60_000,
                // Starts per build.
                "node" => 5,
                _ => 20_000,
            });
            if which == "compare" {
                install_peers()?;
            }
            // The control plane is measured on SQLite and on a real PostgreSQL.
            let pg = (which == "control-plane")
                .then(postgres::start)
                .transpose()?;
            run(cargo(&root)
                .envs(pg.iter().flat_map(postgres::Server::env))
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "agentwall-tests",
                    "--bin",
                    "aw-bench",
                    "--",
                    &which,
                    "--iterations",
                    &iterations.to_string(),
                ]))
        }
        Task::Fuzz { target, seconds } => {
            setup()?;
            fuzz(&root, &target, seconds)
        }
        Task::Soak { minutes } => {
            setup()?;
            require_root("the soak run attaches eBPF programs and creates cgroups")?;
            run(cargo(&root).args(["build", "--bins"]))?;
            run(cargo(&root).args([
                "run",
                "--quiet",
                "-p",
                "agentwall-tests",
                "--bin",
                "aw-soak",
                "--",
                "--minutes",
                &minutes.to_string(),
            ]))
        }
        Task::WithPostgres { command } => {
            let pg = postgres::start()?;
            run(Command::new(&command[0]).args(&command[1..]).envs(pg.env()))
        }
        Task::Package => {
            setup()?;
            package::build(&root).map(drop)
        }
        Task::Demo { keep } => {
            setup()?;
            require_root("the demo attaches eBPF programs and creates cgroups")?;
            run(cargo(&root).args(["build", "--bins", "--quiet"]))?;
            demo::run(&root, keep)
        }
    }
}

/// The schemathesis release the API schema test drives (`tests/tests/api_schema.rs`).
const SCHEMATHESIS: &str = "4.32.5";

/// schemathesis from PyPI, pinned, in a virtualenv under `target/tools` (idempotent): the
/// API schema test runs it against a real control plane.
fn install_schemathesis(root: &Path) -> Result<()> {
    let venv = root.join("target/tools/schemathesis");
    let bin = venv.join("bin/schemathesis");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(SCHEMATHESIS));
    if installed {
        return Ok(());
    }
    python_venv(&venv)?;
    println!("installing schemathesis {SCHEMATHESIS} (PyPI)");
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("schemathesis=={SCHEMATHESIS}")))
}

/// The ocsf-json-schema release that builds the OCSF JSON Schemas the OCSF tests check
/// events against, and the OCSF version the events follow (`agentwall::ocsf::VERSION`).
const OCSF_JSON_SCHEMA: &str = "1.2.0";
const OCSF: &str = "1.3.0";

/// The JSON Schemas of the OCSF classes agentwall writes, built by ocsf-json-schema (PyPI,
/// pinned, in a virtualenv under `target/tools`) into `target/tools/ocsf/VERSION`
/// (idempotent; `tests/ocsf/schemas.py` says which classes).
fn install_ocsf_schemas(root: &Path) -> Result<()> {
    let venv = root.join("target/tools/ocsf-json-schema");
    let out = root.join("target/tools/ocsf").join(OCSF);
    let stamp = out.join(".built-by");
    // Built again when the generator (the classes it writes) changes.
    let script = std::fs::read_to_string(root.join("tests/ocsf/schemas.py"))?;
    let want = format!("ocsf-json-schema {OCSF_JSON_SCHEMA}\n{script}");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    python_venv(&venv)?;
    println!("installing ocsf-json-schema {OCSF_JSON_SCHEMA} (PyPI)");
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("ocsf-json-schema=={OCSF_JSON_SCHEMA}")))?;
    run(Command::new(venv.join("bin/python"))
        .arg(root.join("tests/ocsf/schemas.py"))
        .arg(&out)
        .arg(OCSF))?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

/// A Python virtualenv at `venv` (made again from scratch).
fn python_venv(venv: &Path) -> Result<()> {
    apt_install(&["python3"], &["python3"])?;
    let venv_made = || {
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(venv)
            .status()
            .is_ok_and(|s| s.success())
            && venv.join("bin/pip").exists()
    };
    // Debian's python3 makes virtualenvs only with python3-venv (ensurepip).
    if !venv_made() {
        apt_get_install(&["python3-venv"])?;
        if !venv_made() {
            bail!("python3 -m venv {} failed", venv.display());
        }
    }
    Ok(())
}

/// The console's browser tests: Debian's Chromium and Firefox ESR, Playwright's driver for
/// the one and puppeteer-core (WebDriver BiDi) for the other, as
/// tests/browser/package-lock.json pins them, from the npm registry (idempotent).
fn install_browser(root: &Path) -> Result<()> {
    apt_install(&["chromium", "firefox-esr"], &["chromium", "firefox-esr"])?;
    npm_ci(&root.join("tests/browser"), "playwright-core")?;
    npm_ci(&root.join("tests/browser"), "puppeteer-core")
}

/// `npm ci` in `dir` (its package-lock.json) unless `package` is installed there at the
/// locked version already; no package's install scripts run.
fn npm_ci(dir: &Path, package: &str) -> Result<()> {
    let lock: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("package-lock.json"))
            .with_context(|| format!("{}/package-lock.json", dir.display()))?,
    )?;
    let pinned = lock["packages"][format!("node_modules/{package}")]["version"]
        .as_str()
        .with_context(|| format!("{}/package-lock.json locks no {package}", dir.display()))?
        .to_owned();
    let installed =
        std::fs::read_to_string(dir.join("node_modules").join(package).join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|p| p["version"] == pinned.as_str());
    if installed {
        return Ok(());
    }
    apt_install(&["node", "npm"], &["nodejs", "npm"])?;
    println!("installing {package} {pinned} (npm, in {})", dir.display());
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(dir))
}

/// What `bench compare` measures agentwall against, from Debian's packages (idempotent).
fn install_peers() -> Result<()> {
    apt_install(
        &["nft", "iptables-restore", "tinyproxy"],
        &["nftables", "iptables", "tinyproxy"],
    )
}

/// Installs Debian `packages` unless every command of `commands` is already there; the
/// package lists are fetched first when a fresh machine has none.
fn apt_install(commands: &[&str], packages: &[&str]) -> Result<()> {
    let have = |cmd: &str| {
        Command::new("sh")
            .args([
                "-c",
                &format!("command -v {cmd} || test -x /usr/sbin/{cmd}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if commands.iter().all(|c| have(c)) {
        return Ok(());
    }
    apt_get_install(packages)
}

/// Installs Debian `packages` (fetching the package lists first when a fresh machine has
/// none).
fn apt_get_install(packages: &[&str]) -> Result<()> {
    println!("installing {} (Debian packages)", packages.join(", "));
    let install = || {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    if run(&mut install()).is_ok() {
        return Ok(());
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(&mut install())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root);
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Totals over the `test result:` lines of many test executables.
#[derive(Default)]
struct Summary {
    passed: u64,
    failed: u64,
}

impl Summary {
    fn line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(word), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let n: u64 = n.parse().unwrap_or(0);
            match word {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs cargo test, passing its output through, and closes with one summary line over all
/// test binaries so the total is not lost among per-binary results.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut summary = Summary::default();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        summary.line(&line);
    }
    let Summary { passed, failed } = summary;
    let status = child.wait()?;
    println!();
    println!("summary: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root(why: &str) -> Result<()> {
    // `id -u` keeps libc out of xtask.
    let uid = output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        bail!("this task must run as root: {why}");
    }
    Ok(())
}

fn fuzz(root: &Path, target: &str, seconds: u32) -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        eprintln!("setup: installing cargo-fuzz (about a minute)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let corpus = root.join("fuzz/corpus").join(target);
    // libFuzzer adds what it finds to the first corpus directory: a working one under
    // target/, so the repository keeps only its seeds.
    let work = root.join("fuzz/target/corpus").join(target);
    std::fs::create_dir_all(&work)?;
    let artifacts = root.join("fuzz/artifacts").join(target);
    let regressions = root.join("fuzz/regressions").join(target);
    std::fs::create_dir_all(&regressions)?;
    let before: Vec<_> = std::fs::read_dir(&artifacts)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let status = Command::new("rustup")
        .args(["run", NIGHTLY, "cargo", "fuzz", "run", target])
        .arg(&work)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .current_dir(root)
        .status()
        .context("running cargo fuzz")?;
    let found: Vec<PathBuf> = std::fs::read_dir(&artifacts)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    for p in &found {
        let dest = regressions.join(p.file_name().expect("file name"));
        std::fs::copy(p, &dest)?;
        eprintln!("fuzz: new crash kept as {}", dest.display());
    }
    if !status.success() || !found.is_empty() {
        bail!(
            "fuzzing {target} found {} crash(es); they are in {} and the regression test replays them",
            found.len(),
            regressions.display()
        );
    }
    println!("fuzz: {target}: no crash in {seconds} s");
    Ok(())
}

fn setup() -> Result<()> {
    // The console's chart library, which the agentwall binary embeds (agent/build.rs).
    npm_ci(&workspace_root().join("agent/console"), "uplot")?;
    // The nightly toolchain builds agent-ebpf with -Z build-std=core, which needs rust-src.
    if output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])).is_none() {
        eprintln!("setup: installing the {NIGHTLY} toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot =
        output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
            .context("asking the nightly toolchain for its sysroot")?;
    let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !core_src.exists() {
        eprintln!("setup: adding rust-src to {NIGHTLY}");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}
