use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use agentwall::{
    api::{self, Credentials, Request},
    identity::peer_from_cert,
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
        let fail = |msg: String| {
            eprintln!(
                "agentwall {verb}: rejected: {msg} (identity {})",
                claimed_identity(&self.cert)
            );
            ExitCode::from(2)
        };
        let creds = Credentials::load(&self.cert, &self.key).map_err(|e| fail(e.to_string()))?;
        check().map_err(fail)?;
        let socket = self.socket.path().map_err(|e| fail(format!("{e:#}")))?;
        match api::call(&socket, Some(creds), req) {
            Ok(r) if r.ok => Ok(r),
            Ok(r) => Err(fail(r.error.unwrap_or_else(|| "refused".into()))),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    id: CertArgs,
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
    let follow = match follow_files(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("agentwall launch: {e}");
            return ExitCode::from(2);
        }
    };
    match args.id.call("launch", &Request::Launch { follow }, check) {
        Err(code) => return code,
        Ok(r) => {
            if let Some(w) = r.warning {
                eprintln!("agentwall launch: {w}");
            }
        }
    }
    let mut cmd = std::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    if let Some((uid, gid)) = user {
        // std drops supplementary groups (setgroups(0)) itself when root changes uid.
        cmd.uid(uid).gid(gid);
    }
    // Compat system calls pass the cgroup setsockopt hook unjudged.
    if let Err(e) = agentwall::native::native_syscalls_only() {
        eprintln!("agentwall launch: {e}");
        return ExitCode::from(2);
    }
    let err = cmd.exec();
    eprintln!(
        "agentwall launch: cannot run {}: {err}",
        args.command[0].to_string_lossy()
    );
    ExitCode::from(127)
}

/// The files the node is to follow: asked for, or by default when the certificate lives less
/// than a day (short-lived credentials are only practical when they renew themselves).
fn follow_files(args: &Args) -> Result<Option<api::Follow>, String> {
    const SHORT: std::time::Duration = std::time::Duration::from_secs(86_400);
    let short = || {
        agentwall::pem::certs(&args.id.cert)
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
    if args.no_follow || !(args.follow || short()) {
        return Ok(None);
    }
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(|e| format!("cannot follow {}: {e}", p.display()))
    };
    Ok(Some(api::Follow {
        cert: abs(&args.id.cert)?,
        key: abs(&args.id.key)?,
        user: args.user.as_deref().map(lookup_user).transpose()?,
        asked: args.follow,
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
