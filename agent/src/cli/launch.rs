use std::{
    ffi::OsString,
    os::{
        fd::OwnedFd,
        unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::ExitCode,
};

use agentwall::{
    api::{self, Credentials, Request},
    identity::peer_from_cert,
    workload_api,
};

use super::node_config::NodeSocket;

/// The identity to prove and the node to prove it to (shared by launch, enroll, renew).
#[derive(clap::Args)]
pub struct CertArgs {
    /// The agent's certificate (PEM; chain allowed).
    #[arg(long)]
    pub cert: PathBuf,
    /// The certificate's private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    #[command(flatten)]
    pub socket: NodeSocket,
}

impl CertArgs {
    /// Sends a request that proves the identity of `cert`. On refusal prints one line naming
    /// the reason and the identity and returns exit status 2.
    pub fn call(
        &self,
        verb: &str,
        req: &Request,
        check: impl FnOnce() -> Result<(), String>,
    ) -> Result<api::Response, ExitCode> {
        let creds = Credentials::load(&self.cert, &self.key).map_err(|e| e.to_string());
        call_node(
            &self.socket,
            verb,
            &claimed_identity(&self.cert),
            creds,
            req,
            check,
        )
    }
}

/// Sends a request proven with `creds` to the node. On refusal prints one line naming the
/// reason and the identity claimed and returns exit status 2.
fn call_node(
    socket: &NodeSocket,
    verb: &str,
    claimed: &str,
    creds: Result<Credentials, String>,
    req: &Request,
    check: impl FnOnce() -> Result<(), String>,
) -> Result<api::Response, ExitCode> {
    let fail = |msg: String| {
        eprintln!("agentwall {verb}: rejected: {msg} (identity {claimed})");
        ExitCode::from(2)
    };
    let creds = creds.map_err(fail)?;
    check().map_err(fail)?;
    let socket = socket.path().map_err(|e| fail(format!("{e:#}")))?;
    match api::call(&socket, Some(creds), req) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => Err(fail(r.error.unwrap_or_else(|| "refused".into()))),
        Err(e) => Err(fail(e.to_string())),
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The agent's certificate (PEM; chain allowed).
    #[arg(
        long,
        required_unless_present_any = ["workload_api", "join_token"],
        requires = "key"
    )]
    cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Take the agent's X509-SVID from the SPIFFE Workload API at SOCKET (`unix:/path`, a
    /// path, or `tcp://ip:port`; without a value, $SPIFFE_ENDPOINT_SOCKET) instead of
    /// --cert/--key. A keeper left in the session holds the API's stream: each rotation
    /// renews the session, and an SVID taken away ends it.
    #[arg(
        long,
        value_name = "SOCKET",
        num_args = 0..=1,
        default_missing_value = "",
        conflicts_with_all = ["cert", "key", "follow"]
    )]
    workload_api: Option<String>,
    /// Obtain the agent's certificate from the control plane's issuer, through the node,
    /// with this join token (`agentwall cp identity token`); the node renews it at half
    /// its life. Prefer the environment variable: a command line is visible to other users.
    #[arg(
        long,
        env = "AGENTWALL_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["cert", "key", "follow", "workload_api"]
    )]
    join_token: Option<String>,
    /// With --workload-api: use the SVID with this hint when the API issues several
    /// [default: the first, as the SPIFFE standard says].
    #[arg(long, requires = "workload_api")]
    svid_hint: Option<String>,
    #[command(flatten)]
    socket: NodeSocket,
    /// Run the command as this user (name or uid) after placement.
    #[arg(long)]
    user: Option<String>,
    /// Have the node renew the session from --cert and --key whenever they are rewritten (by
    /// a rotator), reading them as the user who runs this command [default: on when the
    /// certificate lives less than a day].
    #[arg(long, overrides_with = "no_follow")]
    follow: bool,
    /// Renew only by hand (`agentwall renew`), however short the certificate's life.
    #[arg(long)]
    no_follow: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// The identity a certificate file claims, for messages (not verified: the node does that).
fn claimed_identity(cert: &Path) -> String {
    agentwall::pem::certs(cert)
        .ok()
        .and_then(|c| c.into_iter().next())
        .and_then(|c| peer_from_cert(&c).ok())
        .map_or_else(|| "unknown".to_owned(), |p| p.id.to_string())
}

/// Exit status 2 for every refusal; otherwise the command's own (it replaces this process).
pub fn run(args: Args) -> ExitCode {
    // Only stdin, stdout and stderr go on to the agent: a socket this process inherited was
    // made (and maybe connected) outside governance, and would leave the cgroup's rules with
    // the agent. Marked before the node is asked, which refuses a socket kept across exec.
    if let Err(e) = cloexec_from(3) {
        eprintln!("agentwall launch: cannot keep inherited descriptors from the agent: {e}");
        return ExitCode::from(2);
    }
    let mut user = None;
    let check = || {
        user = args.user.as_deref().map(lookup_user).transpose()?;
        Ok(())
    };
    let mut keeper = None;
    let launched = match (&args.workload_api, &args.cert, &args.key) {
        _ if args.join_token.is_some() => {
            let token = args.join_token.clone().unwrap_or_default();
            let (chain, creds) = match joined(&args.socket, token) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!(
                        "agentwall launch: rejected: {}",
                        agentwall::text::printable(&e)
                    );
                    return ExitCode::from(2);
                }
            };
            let claimed = agentwall::pem::certs_in(Path::new("-"), chain.as_bytes())
                .ok()
                .and_then(|c| c.into_iter().next())
                .and_then(|c| peer_from_cert(&c).ok())
                .map_or_else(|| "unknown".to_owned(), |p| p.id.to_string());
            let req = Request::Launch {
                follow: None,
                workload_api: None,
                issued: Some(chain),
                refuses_io_uring: true,
            };
            call_node(&args.socket, "launch", &claimed, Ok(creds), &req, check)
        }
        (Some(given), _, _) => {
            let endpoint = match workload_api::endpoint(Some(given)) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("agentwall launch: {e}");
                    return ExitCode::from(2);
                }
            };
            let svid = match first_svid(&endpoint, args.svid_hint.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "agentwall launch: rejected: {}",
                        agentwall::text::printable(&e.to_string())
                    );
                    return ExitCode::from(2);
                }
            };
            let req = Request::Launch {
                follow: None,
                workload_api: Some(endpoint.clone()),
                issued: None,
                refuses_io_uring: true,
            };
            let r = call_node(
                &args.socket,
                "launch",
                &svid.id,
                Ok(svid.credentials()),
                &req,
                check,
            );
            let socket = args.socket.path();
            keeper = socket.ok().map(|socket| workload_api::Keeper {
                endpoint,
                hint: args.svid_hint.clone(),
                socket,
                current: svid,
            });
            r
        }
        (None, Some(cert), Some(key)) => {
            let follow =
                match follow_files(args.follow, args.no_follow, args.user.as_deref(), cert, key) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("agentwall launch: {e}");
                        return ExitCode::from(2);
                    }
                };
            let req = Request::Launch {
                follow,
                workload_api: None,
                issued: None,
                refuses_io_uring: true,
            };
            let creds = Credentials::load(cert, key).map_err(|e| e.to_string());
            call_node(
                &args.socket,
                "launch",
                &claimed_identity(cert),
                creds,
                &req,
                check,
            )
        }
        _ => {
            eprintln!("agentwall launch: give --cert and --key, or --workload-api");
            return ExitCode::from(2);
        }
    };
    let io_uring = match launched {
        Err(code) => return code,
        Ok(r) => {
            if let Some(w) = r.warning {
                eprintln!("agentwall launch: {w}");
            }
            // A node that does not say (an older one) gets the closed default.
            r.io_uring.unwrap_or_default()
        }
    };
    // Compat system calls pass the cgroup setsockopt hook unjudged, and io_uring installs
    // files no hook judges: refused before the keeper is forked, so it runs under the same
    // filter as the agent.
    if let Err(e) = agentwall::native::native_syscalls_only(io_uring) {
        eprintln!("agentwall launch: {e}");
        return ExitCode::from(2);
    }
    if let Some(k) = keeper {
        if let Err(e) = spawn_keeper(k) {
            eprintln!("agentwall launch: cannot leave a Workload API keeper in the session: {e}");
            return ExitCode::from(2);
        }
    }
    let mut cmd = std::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    // The token stays with the launcher: the agent has its certificate's session.
    cmd.env_remove("AGENTWALL_JOIN_TOKEN");
    if let Some((uid, gid)) = user {
        // std drops supplementary groups (setgroups(0)) itself when root changes uid.
        cmd.uid(uid).gid(gid);
    }
    let err = cmd.exec();
    eprintln!(
        "agentwall launch: cannot run {}: {err}",
        args.command[0].to_string_lossy()
    );
    ExitCode::from(127)
}

/// A certificate from the control plane's issuer, through the node: a key made here (it
/// never leaves this process), its CSR and the join token traded for the chain.
fn joined(socket: &NodeSocket, token: String) -> Result<(String, Credentials), String> {
    let (csr, key) = agentwall::control_plane::issuer::new_csr().map_err(|e| e.to_string())?;
    let socket = socket.path().map_err(|e| format!("{e:#}"))?;
    let r = api::call(&socket, None, &Request::Join { token, csr }).map_err(|e| e.to_string())?;
    let chain = match (r.ok, r.chain) {
        (true, Some(c)) => c,
        _ => return Err(r.error.unwrap_or_else(|| "refused".into())),
    };
    let certs = agentwall::pem::certs_in(Path::new("the issued chain"), chain.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok((
        chain,
        Credentials::from_der(certs, key, "the control plane's issuer"),
    ))
}

/// The workload's SVID, fetched on a runtime that is gone (its threads with it) before the
/// keeper is forked.
fn first_svid(
    endpoint: &str,
    hint: Option<&str>,
) -> Result<workload_api::Svid, workload_api::WorkloadError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| workload_api::WorkloadError::Unreachable {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    let svid = rt.block_on(workload_api::fetch(endpoint, hint));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    svid
}

/// Leaves a keeper in the session: a grandchild (reaped by init, not the agent) in the
/// agent's cgroup that follows the Workload API until the agent exits.
fn spawn_keeper(keeper: workload_api::Keeper) -> Result<(), String> {
    // The children run Rust code after fork: only safe when no other thread held a lock.
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
    if threads != Some(1) {
        return Err(format!(
            "the launcher runs {threads:?} threads; it forks only with one"
        ));
    }
    // Not open to ptrace from birth: the keeper is a process of the agent's cgroup, and an
    // agent of the same user must not take it over (its filter, its SVID key). The agent's
    // exec makes the launcher's process dumpable again.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(PR_SET_DUMPABLE): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: pidfd_open of this very process; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor of our own (close-on-exec: the agent does not get it).
    let agent = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: single-threaded (checked above).
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: as above; this child only forks and exits.
            match unsafe { libc::fork() } {
                0 => {
                    keeper_main(keeper, agent);
                    // SAFETY: leaves without running the launcher's exit handlers.
                    unsafe { libc::_exit(0) }
                }
                // SAFETY: as above.
                -1 => unsafe { libc::_exit(1) },
                // SAFETY: as above.
                _ => unsafe { libc::_exit(0) },
            }
        }
        pid => {
            let mut status = 0;
            // SAFETY: our own child.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    break;
                }
            }
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err("the keeper could not be forked".to_owned())
            }
        }
    }
}

/// The keeper's life: out of the terminal's session (a Ctrl-C is the agent's to handle),
/// with a standard error of its own that never blocks (the agent shares the launcher's: it
/// could fill or stop it), holding no network socket the launcher inherited (made outside
/// governance; the agent's exec closed them, the keeper must too), and leaving at once on a
/// panic (no unwinding into a runtime that waits on threads).
fn keeper_main(keeper: workload_api::Keeper, agent: OwnedFd) {
    use std::os::fd::AsRawFd as _;
    std::panic::set_hook(Box::new(|_| {
        // SAFETY: leaves at once.
        unsafe { libc::_exit(101) }
    }));
    // SAFETY: plain system calls on descriptors this process holds.
    unsafe {
        libc::setsid();
        let null = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null");
        if let Ok(null) = &null {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
        // Opening the descriptor's file again makes a file description of our own (for a
        // pipe or a terminal), whose O_NONBLOCK the agent does not share.
        let own = std::fs::File::options()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/proc/self/fd/2");
        match (&own, &null) {
            (Ok(f), _) | (Err(_), Ok(f)) => {
                libc::dup2(f.as_raw_fd(), 2);
            }
            (Err(_), Err(_)) => {}
        }
    }
    close_network_sockets();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(keeper.run(workload_api::exited(agent)));
}

/// Closes every socket this process holds that is not a unix one.
fn close_network_sockets() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an out-buffer of the right size; a descriptor that is not a socket (or the
        // listing's own, closed by now) fails harmlessly.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                (&raw mut domain).cast(),
                &mut len,
            )
        };
        if rc == 0 && domain != libc::AF_UNIX {
            // SAFETY: a socket no Rust object of this process owns (inherited).
            unsafe { libc::close(fd) };
        }
    }
}

/// The files the node is to follow: asked for, or by default when the certificate lives less
/// than a day (short-lived credentials are only practical when they renew themselves).
pub fn follow_files(
    follow: bool,
    no_follow: bool,
    user: Option<&str>,
    cert: &Path,
    key: &Path,
) -> Result<Option<api::Follow>, String> {
    const SHORT: std::time::Duration = std::time::Duration::from_secs(86_400);
    let short = || {
        agentwall::pem::certs(cert)
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|c| {
                x509_parser::parse_x509_certificate(c.as_ref())
                    .ok()
                    .map(|(_, x)| {
                        let v = x.validity();
                        v.not_after.timestamp() - v.not_before.timestamp()
                    })
            })
            .is_some_and(|life| life < SHORT.as_secs() as i64)
    };
    if no_follow || !(follow || short()) {
        return Ok(None);
    }
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(|e| format!("cannot follow {}: {e}", p.display()))
    };
    Ok(Some(api::Follow {
        cert: abs(cert)?,
        key: abs(key)?,
        user: user.map(lookup_user).transpose()?,
        asked: follow,
    }))
}

/// Marks every descriptor from `first` on close-on-exec.
fn cloexec_from(first: u32) -> std::io::Result<()> {
    // SAFETY: close_range only changes descriptor flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Before Linux 5.11: one descriptor at a time.
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if fd >= first as i32 {
            // SAFETY: flag change on a descriptor this process holds (or one the listing
            // itself held, now closed: EBADF, ignored).
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFD);
                if fl >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, fl | libc::FD_CLOEXEC);
                }
            }
        }
    }
    Ok(())
}

fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let c = std::ffi::CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    // SAFETY: valid C string; the result points to static storage or is null.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if !pw.is_null() {
        // SAFETY: non-null passwd entry.
        return Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) });
    }
    match name.parse::<u32>() {
        Ok(uid) => Ok((uid, uid)),
        Err(_) => Err(format!("no such user {name:?}")),
    }
}
