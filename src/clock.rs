//! The time the services read: [`Clock`], the system's by default, or a manual clock a test
//! sets and advances ([`ManualClock`]).
//!
//! Every service holds one (built once in [`crate::app`] and handed to each), so the time a
//! use case stamps on what it writes comes from one place and a test can move it. Background
//! steps take their time as an argument instead (`*_once(at)`), so a test drives them at any
//! moment without a clock.
//!
//! Invariant: a time from [`Clock::now`] has whole microseconds, as the database stores them,
//! so an order built in memory and the same order read back are equal.
//!
//! The id generator keeps its own millisecond clock ([`crate::domain::ids::Clock`]): ids
//! must stay monotonic whatever a test does to this one.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// A source of the current time; cheap to clone (clones share a manual clock's time).
#[derive(Debug, Clone, Default)]
pub struct Clock(Source);

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    System,
    /// Microseconds since the Unix epoch, shared with the [`ManualClock`] that made it.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// The current time, truncated to microseconds (database time has microseconds).
    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            Source::System => {
                let t = Utc::now();
                t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t)
            }
            Source::Manual(us) => from_micros(us.load(Ordering::Acquire)),
        }
    }
}

/// A clock that stands still until it is set or advanced: hand [`ManualClock::clock`] to
/// the services under test and move time from the test.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `at` (truncated to microseconds).
    pub fn at(at: DateTime<Utc>) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(at.timestamp_micros())))
    }

    /// The [`Clock`] that reads this one.
    pub fn clock(&self) -> Clock {
        Clock(Source::Manual(self.0.clone()))
    }

    pub fn now(&self) -> DateTime<Utc> {
        from_micros(self.0.load(Ordering::Acquire))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        self.0.store(at.timestamp_micros(), Ordering::Release);
    }

    /// Moves the time by `by` (which may be negative: a clock stepped back).
    pub fn advance(&self, by: TimeDelta) {
        let by = by.num_microseconds().unwrap_or(i64::MAX);
        self.0.fetch_add(by, Ordering::AcqRel);
    }
}

/// Microseconds since the Unix epoch as a time; out of range (never from `now` or `set`)
/// reads as the epoch.
fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_time_has_whole_microseconds() {
        let t = Clock::system().now();
        assert_eq!(t.timestamp_subsec_nanos() % 1_000, 0);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_follow() {
        let start = DateTime::from_timestamp_micros(1_760_000_000_123_456).unwrap();
        let manual = ManualClock::at(start);
        let clock = manual.clock();
        let copy = clock.clone();
        assert_eq!(clock.now(), start);
        manual.advance(TimeDelta::seconds(90));
        assert_eq!(copy.now(), start + TimeDelta::seconds(90));
        manual.set(start);
        assert_eq!(clock.now(), start);
        manual.advance(TimeDelta::seconds(-1));
        assert_eq!(manual.now(), start - TimeDelta::seconds(1));
    }
}
