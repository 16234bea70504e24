//! Kernel deadlines are CLOCK_BOOTTIME nanoseconds (what `bpf_ktime_get_boot_ns` reads), so they
//! keep counting through suspend and need no daemon to fire. This module converts wall-clock
//! times into that clock.

use std::time::{Duration, SystemTime};

/// A point on CLOCK_BOOTTIME, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(pub u64);

impl BootInstant {
    pub fn now() -> Self {
        Self(clock_ns(libc::CLOCK_BOOTTIME))
    }

    /// The boot-clock instant at which wall-clock `t` arrives. Times already past map to
    /// now-or-earlier (never 0, which the datapath reads as "no deadline").
    pub fn from_system_time(t: SystemTime) -> Self {
        let boot_now = clock_ns(libc::CLOCK_BOOTTIME);
        let wall_now = SystemTime::now();
        let ns = match t.duration_since(wall_now) {
            Ok(ahead) => boot_now.saturating_add(duration_ns(ahead)),
            Err(e) => boot_now.saturating_sub(duration_ns(e.duration())),
        };
        Self(ns.max(1))
    }

    pub fn after(d: Duration) -> Self {
        Self(clock_ns(libc::CLOCK_BOOTTIME).saturating_add(duration_ns(d)))
    }

    pub fn is_past(self) -> bool {
        Self::now() >= self
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_BOOTTIME exists on every kernel agentwall supports.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn future_wall_time_maps_to_future_boot_time() {
        let d = BootInstant::from_system_time(SystemTime::now() + Duration::from_secs(60));
        let now = BootInstant::now();
        assert!(d.0 > now.0 + 59_000_000_000 && d.0 < now.0 + 61_000_000_000);
    }

    #[test]
    fn past_wall_time_is_past_and_never_zero() {
        let d = BootInstant::from_system_time(SystemTime::UNIX_EPOCH);
        assert!(d.is_past());
        assert_ne!(d.0, 0);
    }
}
