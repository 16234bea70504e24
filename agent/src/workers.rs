//! Threads for parallel work (parsing policy, building tries), and the priority of policy
//! work that runs while the node serves agents. Such background work runs below the priority
//! of DNS answers, the local API and records, and leaves one core to them: on a busy host a
//! large apply takes a little longer, and an answer does not wait for a core.

use std::cell::Cell;

thread_local! {
    /// Inside [`Background`]: the nice value to return to.
    static BACKGROUND: Cell<Option<libc::c_int>> = const { Cell::new(None) };
}

/// The nice value background work runs at.
const BACKGROUND_NICE: libc::c_int = 10;

/// How many threads a job started from this thread may use.
pub fn threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if BACKGROUND.with(Cell::get).is_some() {
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
    was: Option<libc::c_int>,
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
        // Nested: the priority to return to is still the outermost one.
        let was = BACKGROUND.with(|b| b.replace(Some(b.get().unwrap_or(nice))));
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

fn set_nice(nice: libc::c_int) {
    // SAFETY: plain syscalls on this thread's own id.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice);
    }
}

/// Runs `f` at the priority this thread had before [`Background`]: for the short parts of
/// background work that hold a lock what serves agents waits on (no priority inversion).
pub fn at_normal_priority<T>(f: impl FnOnce() -> T) -> T {
    match BACKGROUND.with(Cell::get) {
        None => f(),
        Some(nice) => {
            set_nice(nice);
            let out = f();
            set_nice(BACKGROUND_NICE.max(nice));
            out
        }
    }
}
