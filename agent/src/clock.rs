//! Time, in one place. Kernel deadlines are CLOCK_BOOTTIME nanoseconds (what
//! `bpf_ktime_get_boot_ns` reads), so they keep counting through suspend and need no daemon to
//! fire; this module converts wall-clock times into that clock and back. Records, state files
//! and the API write times as RFC 3339 in UTC, formatted and parsed here.

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

/// Wall-clock time of a boot-clock instant.
pub fn wall_time(t: BootInstant) -> SystemTime {
    let now = BootInstant::now();
    let ago = Duration::from_nanos(now.0.saturating_sub(t.0));
    SystemTime::now() - ago
}

/// RFC 3339 in UTC with milliseconds: `2026-12-01T10:00:00.000Z`.
pub fn rfc3339(t: SystemTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from(t)
        .format(FORMAT)
        .unwrap_or_default()
}

/// Now, as [`rfc3339`] writes it.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Parses an RFC 3339 time (any offset).
pub fn parse_rfc3339(s: &str) -> Result<time::OffsetDateTime, time::error::Parse> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
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
    fn rfc3339_round_trips_at_millisecond_precision() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let s = rfc3339(t);
        assert_eq!(s, "2025-11-24T16:00:00.123Z");
        assert_eq!(SystemTime::from(parse_rfc3339(&s).unwrap()), t);
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn past_wall_time_is_past_and_never_zero() {
        let d = BootInstant::from_system_time(SystemTime::UNIX_EPOCH);
        assert!(d.is_past());
        assert_ne!(d.0, 0);
    }
}
