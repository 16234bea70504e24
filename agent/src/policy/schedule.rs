//! Rule schedules: "Mon-Fri 09:00-18:00 Europe/Berlin". A schedule becomes a kernel deadline:
//! while its window is open the rule expires at the window's end (so it closes on time with
//! the node down); while it is closed the rule is applied already expired, and the node
//! re-applies the policy when the next window opens.

use std::{fmt, str::FromStr, time::SystemTime};

use jiff::{Timestamp, ToSpan as _, civil::Weekday, tz::TimeZone};

#[derive(Clone)]
pub struct Schedule {
    text: String,
    /// Monday first.
    days: [bool; 7],
    start: (i8, i8),
    end: (i8, i8),
    tz: TimeZone,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Schedule {}

/// Where a schedule stands at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Open until this instant.
    Open { until: SystemTime },
    /// Closed; opens next at this instant (none if no day is selected).
    Closed { opens: Option<SystemTime> },
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn day(s: &str) -> Option<usize> {
    DAYS.iter().position(|d| d.eq_ignore_ascii_case(s))
}

fn hhmm(s: &str) -> Option<(i8, i8)> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is the end of the day.
    ((0..=23).contains(&h) && (0..=59).contains(&m) || (h, m) == (24, 0)).then_some((h, m))
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("schedule {s:?}: {why}");
        let parts: Vec<&str> = s.split_whitespace().collect();
        let (days_s, times_s, tz_s) = match parts.as_slice() {
            [d, t] => (*d, *t, "UTC"),
            [d, t, z] => (*d, *t, *z),
            _ => {
                return Err(bad(
                    "expected DAYS HH:MM-HH:MM [TIME_ZONE], e.g. \"Mon-Fri 09:00-18:00 Europe/Berlin\"",
                ));
            }
        };
        let mut days = [false; 7];
        for item in days_s.split(',') {
            if item.eq_ignore_ascii_case("daily") {
                days = [true; 7];
                continue;
            }
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (Some(a), Some(b)) = (day(a), day(b)) else {
                return Err(bad(&format!(
                    "{item:?} is not a day or day range (Mon..Sun, daily)"
                )));
            };
            let mut d = a;
            loop {
                days[d] = true;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        let (a, b) = times_s
            .split_once('-')
            .ok_or_else(|| bad("times must be HH:MM-HH:MM"))?;
        let start = hhmm(a).ok_or_else(|| bad(&format!("{a:?} is not a time HH:MM")))?;
        let end = hhmm(b).ok_or_else(|| bad(&format!("{b:?} is not a time HH:MM")))?;
        if start == end {
            return Err(bad("the window is empty (start equals end)"));
        }
        let tz = jiff::tz::db().get(tz_s).map_err(|_| {
            bad(&format!(
                "{tz_s:?} is not a known time zone (e.g. Europe/Berlin, UTC)"
            ))
        })?;
        Ok(Self {
            text: s.to_owned(),
            days,
            start,
            end,
            tz,
        })
    }
}

fn weekday_index(w: Weekday) -> usize {
    w.to_monday_zero_offset() as usize
}

fn to_system(t: Timestamp) -> SystemTime {
    SystemTime::from(t)
}

impl Schedule {
    /// The window state at `now`. A window may run past midnight (22:00-06:00); it belongs to
    /// the day it starts on.
    pub fn at(&self, now: SystemTime) -> Window {
        let now = Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH);
        let today = now.to_zoned(self.tz.clone()).date();
        let mut next_open: Option<Timestamp> = None;
        for offset in -1i64..=7 {
            let Ok(date) = today.checked_add(offset.days()) else {
                continue;
            };
            if !self.days[weekday_index(date.weekday())] {
                continue;
            }
            let at = |(h, m): (i8, i8), extra_days: i64| -> Option<Timestamp> {
                let d = date
                    .checked_add((extra_days + i64::from(h == 24)).days())
                    .ok()?;
                let h = if h == 24 { 0 } else { h };
                d.at(h, m, 0, 0)
                    .to_zoned(self.tz.clone())
                    .ok()
                    .map(|z| z.timestamp())
            };
            let Some(start) = at(self.start, 0) else {
                continue;
            };
            let overnight = self.end <= self.start;
            let Some(end) = at(self.end, i64::from(overnight)) else {
                continue;
            };
            if start <= now && now < end {
                return Window::Open {
                    until: to_system(end),
                };
            }
            if start > now && next_open.is_none_or(|n| start < n) {
                next_open = Some(start);
            }
        }
        Window::Closed {
            opens: next_open.map(to_system),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<Timestamp>().unwrap())
    }

    #[test]
    fn office_hours_in_berlin() {
        let s: Schedule = "Mon-Fri 09:00-18:00 Europe/Berlin".parse().unwrap();
        // 2026-11-23 is a Monday; Berlin is UTC+1 in November.
        assert_eq!(
            s.at(ts("2026-11-23T10:00:00Z")),
            Window::Open {
                until: ts("2026-11-23T17:00:00Z")
            }
        );
        assert_eq!(
            s.at(ts("2026-11-23T17:00:00Z")),
            Window::Closed {
                opens: Some(ts("2026-11-24T08:00:00Z"))
            }
        );
        // Saturday: closed until Monday 08:00 UTC.
        assert_eq!(
            s.at(ts("2026-11-28T12:00:00Z")),
            Window::Closed {
                opens: Some(ts("2026-11-30T08:00:00Z"))
            }
        );
    }

    #[test]
    fn overnight_and_wrapping_days() {
        let s: Schedule = "Fri-Mon 22:00-06:00".parse().unwrap();
        // Monday 2026-11-23 03:00 UTC belongs to Sunday night's window.
        assert_eq!(
            s.at(ts("2026-11-23T03:00:00Z")),
            Window::Open {
                until: ts("2026-11-23T06:00:00Z")
            }
        );
        // Tuesday night is not selected: next window is Friday 22:00.
        assert_eq!(
            s.at(ts("2026-11-24T23:00:00Z")),
            Window::Closed {
                opens: Some(ts("2026-11-27T22:00:00Z"))
            }
        );
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (text, want) in [
            ("Mon-Fri", "expected DAYS HH:MM-HH:MM [TIME_ZONE]"),
            (
                "Mon-Fry 09:00-18:00",
                "\"Mon-Fry\" is not a day or day range",
            ),
            ("Mon 9:00-18:00", "\"9:00\" is not a time HH:MM"),
            ("Mon 09:00-09:00", "the window is empty"),
            (
                "Mon 09:00-18:00 Europe/Berln",
                "\"Europe/Berln\" is not a known time zone",
            ),
        ] {
            let e = text.parse::<Schedule>().unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
