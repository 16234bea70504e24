//! Threads for parallel work (parsing policy, building tries), and the priority of policy
//! work that runs while the node serves agents. Such background work runs below the priority
//! of DNS answers, the local API and records, and leaves one core to them: on a busy host a
//! large apply takes a little longer, and an answer does not wait for a core.

use std::cell::Cell;

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// The nice value background work runs at.
const BACKGROUND_NICE: libc::c_int = 10;

/// How many threads a job started from this thread may use.
pub fn threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if BACKGROUND.with(Cell::get) {
        cores.saturating_sub(1).max(1)
    } else {
        cores
    }
}

/// While held, this thread (and the threads it starts, which inherit its nice value) does
/// background work.
pub struct Background {
    tid: libc::id_t,
    nice: libc::c_int,
    was: bool,
}

impl Background {
    pub fn enter() -> Self {
        // SAFETY: plain syscalls on this thread's own id.
        let (tid, nice) = unsafe {
            let tid = libc::gettid() as libc::id_t;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            if nice < BACKGROUND_NICE {
                libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE);
            }
            (tid, nice)
        };
        let was = BACKGROUND.with(|b| b.replace(true));
        Self { tid, nice, was }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        BACKGROUND.with(|b| b.set(self.was));
        // SAFETY: as in enter. Raising it back needs CAP_SYS_NICE, which the node has.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, self.tid, self.nice);
        }
    }
}
