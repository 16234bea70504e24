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
//! agent only through `pidfd_getfd` (refused here too: the receipt hooks let every file but
//! a socket through), or kept across the launcher's exec (which the node refuses, whatever
//! the policy); SCM_RIGHTS refuses rings in the kernel. EPERM is what
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
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;

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
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter: another architecture's system calls, and x32 ones, get EPERM; so do the
/// io_uring calls when refused.
fn program(io_uring: IoUring) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let refused: &[libc::c_long] = match io_uring {
        IoUring::Refuse => &[
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_pidfd_getfd,
        ],
        IoUring::Allow => &[],
    };
    // Jumps count the instructions they skip: each test's way to EPERM is the distance to
    // the last instruction.
    let n = refused.len() as u8;
    let mut p = vec![
        stmt(LD_W_ABS, ARCH),
        jump(JEQ_K, NATIVE_ARCH, 0, 3 + n),
        stmt(LD_W_ABS, NR),
        jump(JGE_K, X32_SYSCALL_BIT, 1 + n, 0),
    ];
    for (i, nr) in refused.iter().enumerate() {
        p.push(jump(JEQ_K, *nr as u32, n - i as u8, 0));
    }
    p.push(stmt(RET_K, SECCOMP_RET_ALLOW));
    p.push(stmt(RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32));
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
    match install() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(NativeError::Install {
                    io_uring,
                    error: std::io::Error::last_os_error(),
                });
            }
            install().map_err(|error| NativeError::Install { io_uring, error })
        }
        Err(error) => Err(NativeError::Install { io_uring, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every test that refuses lands on the EPERM return, and nothing else does.
    #[test]
    fn every_refusing_jump_lands_on_eperm() {
        for io_uring in [IoUring::Refuse, IoUring::Allow] {
            let p = program(io_uring);
            let last = p.len() - 1;
            assert_eq!(p[last].k, SECCOMP_RET_ERRNO | libc::EPERM as u32);
            assert_eq!(p[last - 1].k, SECCOMP_RET_ALLOW);
            let mut refusing = Vec::new();
            for (i, ins) in p.iter().enumerate() {
                if ins.code & 0x07 != libc::BPF_JMP as u16 {
                    continue;
                }
                let (jt, jf) = (i + 1 + ins.jt as usize, i + 1 + ins.jf as usize);
                // The architecture test refuses when false; the others when true.
                let (refuse, go_on) = if ins.k == NATIVE_ARCH {
                    (jf, jt)
                } else {
                    (jt, jf)
                };
                assert_eq!(refuse, last, "instruction {i}");
                assert_eq!(go_on, i + 1, "instruction {i}");
                refusing.push(ins.k);
            }
            let uring = [
                libc::SYS_io_uring_setup as u32,
                libc::SYS_io_uring_enter as u32,
                libc::SYS_io_uring_register as u32,
                libc::SYS_pidfd_getfd as u32,
            ];
            let want: Vec<u32> = [NATIVE_ARCH, X32_SYSCALL_BIT]
                .into_iter()
                .chain(uring.into_iter().filter(|_| io_uring == IoUring::Refuse))
                .collect();
            assert_eq!(refusing, want, "{io_uring:?}");
        }
    }
}
