//! What `launch` holds the agent to before it runs: native system calls only.
//!
//! The kernel skips cgroup setsockopt programs for compat (32-bit) system calls, so an agent
//! issuing `int 0x80` (or running a 32-bit binary) could set options the datapath refuses.
//! Where the BPF LSM runs, its setsockopt program sees those too; everywhere, the agent gets
//! a seccomp filter that answers every non-native system call with EPERM. Inherited by every
//! child and never removable.

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
    #[error("cannot install the seccomp filter that keeps the agent to native system calls: {0}")]
    Install(std::io::Error),
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

/// The filter: another architecture's system calls, and x32 ones, get EPERM.
fn program() -> [libc::sock_filter; 6] {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    [
        stmt(LD_W_ABS, ARCH),
        jump(JEQ_K, NATIVE_ARCH, 0, 3),
        stmt(LD_W_ABS, NR),
        jump(JGE_K, X32_SYSCALL_BIT, 1, 0),
        stmt(RET_K, SECCOMP_RET_ALLOW),
        stmt(RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ]
}

/// Installs the filter on every thread of this process (kept across `execve`). Without
/// CAP_SYS_ADMIN the kernel asks for no_new_privs first, which is set then: a governed agent
/// has no use for setuid binaries.
pub fn native_syscalls_only() -> Result<(), NativeError> {
    let filter = program();
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
                return Err(NativeError::Install(std::io::Error::last_os_error()));
            }
            install().map_err(NativeError::Install)
        }
        Err(e) => Err(NativeError::Install(e)),
    }
}
