//! What `launch` holds the agent to before it runs: native system calls only, and no
//! io_uring unless its policy allows it.
//!
//! The kernel skips cgroup setsockopt programs for compat (32-bit) system calls, so an agent
//! issuing `int 0x80` (or running a 32-bit binary) could set options the datapath refuses.
//! Where the BPF LSM runs, its setsockopt program sees those too; everywhere, the agent gets
//! a seccomp filter that answers every non-native system call with EPERM.
//!
//! io_uring installs files no hook judges: `IORING_OP_MSG_RING` puts another process's
//! socket into the agent's ring, and a ring handed in may hold registered sockets. Without
//! `io_uring_setup`, `io_uring_enter` and `io_uring_register` the agent has no ring to put
//! them in and cannot enter one it is given. A ring with an SQPOLL thread needs no
//! `io_uring_enter`, and runs its work as the process that made it: such a ring reaches an
//! agent only through `pidfd_getfd` or a seccomp listener's `SECCOMP_IOCTL_NOTIF_ADDFD`
//! (both refused here too: the receipt hooks let every file but a socket through), or kept
//! across the launcher's exec (which the node refuses, whatever the policy); SCM_RIGHTS
//! refuses rings in the kernel. After installing, the launcher checks the filter is in force.
//! EPERM is what
//! `kernel.io_uring_disabled` answers, which runtimes that try io_uring (libuv, say) take as
//! "use something else".
//!
//! The filter is inherited by every child and never removable.

use crate::policy::model::IoUring;

/// The native architecture, as seccomp reports it (`AUDIT_ARCH_*`).
#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xc000_00b7;
/// x32 system calls run under the x86_64 arch with this bit set in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
#[cfg(not(target_arch = "x86_64"))]
const X32_SYSCALL_BIT: u32 = u32::MAX;

const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const SECCOMP_FILTER_FLAG_TSYNC: libc::c_ulong = 1;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: u32 = 1 << 3;
/// Offsets in `struct seccomp_data`: the call's number, its architecture, and the low half
/// of its second argument (little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const ARG1_LOW: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(
        "cannot install the seccomp filter that keeps the agent to native system calls{}: {error}",
        if *io_uring == IoUring::Refuse { " without io_uring" } else { "" }
    )]
    Install {
        io_uring: IoUring,
        error: std::io::Error,
    },
    #[error(
        "the seccomp filter that keeps the agent to native system calls is not in force after its install ({0}): something in this process's ancestry answers seccomp() itself"
    )]
    NotInForce(String),
}

/// Where a test goes when it holds or not: symbolic, so that no distance is counted by hand.
#[derive(Clone, Copy)]
enum To {
    Next,
    Allow,
    Deny,
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The filter: another architecture's system calls, and x32 ones, get EPERM; so, when
/// io_uring is refused, do its calls, `pidfd_getfd`, and a `seccomp` call asking for a
/// listener (`SECCOMP_IOCTL_NOTIF_ADDFD` on one installs any file in the agent, a ring too).
fn program(io_uring: IoUring) -> Vec<libc::sock_filter> {
    use To::{Allow, Deny, Next};
    let mut steps: Vec<(u16, u32, To, To)> = vec![
        (LD_W_ABS, ARCH, Next, Next),
        (JEQ_K, NATIVE_ARCH, Next, Deny),
        (LD_W_ABS, NR, Next, Next),
        (JGE_K, X32_SYSCALL_BIT, Deny, Next),
    ];
    if io_uring == IoUring::Refuse {
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_pidfd_getfd,
        ] {
            steps.push((JEQ_K, nr as u32, Deny, Next));
        }
        steps.push((JEQ_K, libc::SYS_seccomp as u32, Next, Allow));
        steps.push((LD_W_ABS, ARG1_LOW, Next, Next));
        steps.push((JSET_K, SECCOMP_FILTER_FLAG_NEW_LISTENER, Deny, Next));
    }
    let allow = steps.len();
    let deny = allow + 1;
    let mut p: Vec<libc::sock_filter> = steps
        .iter()
        .enumerate()
        .map(|(i, &(code, k, jt, jf))| {
            let to = |t: To| {
                let target = match t {
                    Next => i + 1,
                    Allow => allow,
                    Deny => deny,
                };
                u8::try_from(target - (i + 1)).expect("a short filter")
            };
            libc::sock_filter {
                code,
                jt: to(jt),
                jf: to(jf),
                k,
            }
        })
        .collect();
    for k in [SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | libc::EPERM as u32] {
        p.push(libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k,
        });
    }
    p
}

/// Installs the filter on every thread of this process (kept across `execve`). Without
/// CAP_SYS_ADMIN the kernel asks for no_new_privs first, which is set then: a governed agent
/// has no use for setuid binaries.
pub fn native_syscalls_only(io_uring: IoUring) -> Result<(), NativeError> {
    let filter = program(io_uring);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    let install = || {
        // SAFETY: `prog` points at a valid filter that outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_TSYNC,
                &raw const prog,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let before = filters();
    match install() {
        Ok(()) => in_force(io_uring, before),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(NativeError::Install {
                    io_uring,
                    error: std::io::Error::last_os_error(),
                });
            }
            install().map_err(|error| NativeError::Install { io_uring, error })?;
            in_force(io_uring, before)
        }
        Err(error) => Err(NativeError::Install { io_uring, error }),
    }
}

/// `Seccomp_filters` of this process (Linux 5.9).
fn filters() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
        .trim()
        .parse()
        .ok()
}

/// A filter of the launcher's parent that answers `seccomp()` with 0 without running it
/// would leave the agent unfiltered: the count must have grown, and a refused call must be
/// refused (a call the filter lets through would fail otherwise: EFAULT, EBADF).
fn in_force(io_uring: IoUring, before: Option<u32>) -> Result<(), NativeError> {
    let after = filters();
    if let (Some(b), Some(a)) = (before, after) {
        if a != b + 1 {
            return Err(NativeError::NotInForce(format!(
                "Seccomp_filters went from {b} to {a}"
            )));
        }
    }
    if io_uring == IoUring::Refuse {
        // Each answer with its own errno, read before the next call.
        let answer = |rc: libc::c_long| (rc, std::io::Error::last_os_error());
        // SAFETY: io_uring_setup with no parameters and pidfd_getfd on no descriptor read
        // no memory and make nothing.
        let answers = unsafe {
            [
                (
                    "io_uring_setup",
                    answer(libc::syscall(
                        libc::SYS_io_uring_setup,
                        1,
                        std::ptr::null::<u8>(),
                    )),
                ),
                (
                    "pidfd_getfd",
                    answer(libc::syscall(libc::SYS_pidfd_getfd, -1, -1, 0)),
                ),
            ]
        };
        for (call, (rc, errno)) in answers {
            if rc >= 0 || errno.raw_os_error() != Some(libc::EPERM) {
                return Err(NativeError::NotInForce(format!(
                    "{call} answered {}",
                    if rc >= 0 {
                        rc.to_string()
                    } else {
                        errno.to_string()
                    }
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter on one call, as the kernel's classic BPF would.
    fn verdict(p: &[libc::sock_filter], arch: u32, nr: u32, arg1: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[24..32].copy_from_slice(&arg1.to_le_bytes());
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let ins = p[pc];
            let jump = |holds: bool| 1 + usize::from(if holds { ins.jt } else { ins.jf });
            pc += match ins.code {
                LD_W_ABS => {
                    let at = ins.k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                    1
                }
                JEQ_K => jump(a == ins.k),
                JGE_K => jump(a >= ins.k),
                JSET_K => jump(a & ins.k != 0),
                RET_K => return ins.k,
                other => panic!("instruction {other:#x} at {pc}"),
            };
        }
    }

    #[test]
    fn the_filter_refuses_what_it_says_and_nothing_else() {
        const EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let nr = |n: libc::c_long| n as u32;
        let uring = [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_pidfd_getfd,
        ];
        for io_uring in [IoUring::Refuse, IoUring::Allow] {
            let p = program(io_uring);
            let v = |arch, n, arg1| verdict(&p, arch, n, arg1);
            let refused = if io_uring == IoUring::Refuse {
                EPERM
            } else {
                SECCOMP_RET_ALLOW
            };
            // Native calls go, whatever their arguments.
            for n in [libc::SYS_read, libc::SYS_connect, libc::SYS_sendmsg] {
                assert_eq!(v(NATIVE_ARCH, nr(n), u64::MAX), SECCOMP_RET_ALLOW);
            }
            // Another architecture's calls (i386's int 0x80), and x32's.
            assert_eq!(v(0x4000_0003, 3, 0), EPERM);
            #[cfg(target_arch = "x86_64")]
            assert_eq!(v(NATIVE_ARCH, X32_SYSCALL_BIT, 0), EPERM);
            for n in uring {
                assert_eq!(v(NATIVE_ARCH, nr(n), 0), refused, "{n} {io_uring:?}");
            }
            // seccomp() itself goes (a runtime may add its own filter), unless it asks for
            // a listener.
            let seccomp = nr(libc::SYS_seccomp);
            assert_eq!(v(NATIVE_ARCH, seccomp, 0), SECCOMP_RET_ALLOW);
            assert_eq!(
                v(
                    NATIVE_ARCH,
                    seccomp,
                    u64::from(SECCOMP_FILTER_FLAG_TSYNC as u32)
                ),
                SECCOMP_RET_ALLOW
            );
            assert_eq!(
                v(
                    NATIVE_ARCH,
                    seccomp,
                    u64::from(SECCOMP_FILTER_FLAG_NEW_LISTENER)
                ),
                refused
            );
        }
    }
}
