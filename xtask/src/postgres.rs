//! A real PostgreSQL server for the test suite and the benchmarks: Debian's server binaries
//! (installed when missing), a cluster made with `initdb` in a temporary directory, on a
//! port of its own on loopback, TLS on (a CA made here), stopped and removed when dropped.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_get_install, apt_install, run};

/// The user the server runs as: PostgreSQL refuses to run as root.
const USER: &str = "postgres";

pub struct Server {
    bin: PathBuf,
    dir: PathBuf,
    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres`.
    pub url: String,
    /// The CA (PEM) the server's certificate chains to.
    pub ca: PathBuf,
}

/// The newest installed server's binaries (`/usr/lib/postgresql/N/bin`).
fn binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn as_user(bin: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", USER, "--"]).arg(bin.join(program));
    c
}

fn random_hex() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub fn start() -> Result<Server> {
    let bin = match binaries() {
        Some(b) => b,
        None => {
            apt_get_install(&["postgresql"])?;
            binaries().context("the postgresql package is installed but no /usr/lib/postgresql/*/bin/initdb is there")?
        }
    };
    apt_install(&["openssl"], &["openssl"])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("agentwall-test-postgres-{port}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let password = random_hex()?;
    let pwfile = dir.join("password");
    std::fs::write(&pwfile, &password)?;
    let ca = dir.join("ca.pem");
    let tls = dir.join("tls");
    std::fs::create_dir(&tls)?;
    // A CA, and the server's certificate for 127.0.0.1 and localhost.
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "2", "-subj", "/CN=agentwall test PostgreSQL CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .stderr(std::process::Stdio::null()))?;
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(tls.join("server.key"))
        .arg("-out")
        .arg(dir.join("server.csr"))
        .stderr(std::process::Stdio::null()))?;
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2"])
        .arg("-in")
        .arg(dir.join("server.csr"))
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(tls.join("server.pem"))
        .stderr(std::process::Stdio::null()))?;
    run(Command::new("chown")
        .args(["-R", &format!("{USER}:")])
        .arg(&dir))?;
    run(Command::new("chmod").arg("600").arg(tls.join("server.key")))?;
    let data = dir.join("data");
    run(as_user(&bin, "initdb")
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-E", "UTF8", "--locale=C"])
        .args(["--auth-local=peer", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .stdout(std::process::Stdio::null()))?;
    let options = format!(
        "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=400 \
         -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}",
        sock = dir.display(),
        cert = tls.join("server.pem").display(),
        key = tls.join("server.key").display(),
    );
    let server = Server {
        bin,
        dir: dir.clone(),
        url: format!("postgres://postgres:{password}@127.0.0.1:{port}/postgres"),
        ca,
    };
    // -w: returns once the server accepts connections.
    let started = as_user(&server.bin, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "60", "-o", &options, "start"])
        .stdout(std::process::Stdio::null())
        .status()?;
    if !started.success() {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        bail!("PostgreSQL did not start ({started}):\n{log}");
    }
    println!(
        "PostgreSQL {} on 127.0.0.1:{port} (TLS on; data in {})",
        server
            .bin
            .parent()
            .and_then(Path::file_name)
            .map_or_else(String::new, |v| v.to_string_lossy().into_owned()),
        dir.display()
    );
    Ok(server)
}

impl Server {
    /// The variables the tests read (`agentwall::control_plane::store::scratch`).
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("AGENTWALL_TEST_POSTGRES", self.url.clone()),
            ("AGENTWALL_TEST_POSTGRES_CA", self.ca.display().to_string()),
        ]
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = as_user(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
