//! Circuit breaker in front of Redis.
//!
//! Closed: calls go through; `failures_to_open` failures in a row open it. Open: callers skip
//! Redis until `probe_interval_ms` has passed, then exactly one caller wins the probe
//! ([`Breaker::try_begin_probe`]); its outcome closes the breaker or keeps it open for another
//! interval. A closed breaker whose connection was dropped also reconnects through a probe, so
//! at most one caller at a time ever waits on a connect.
//!
//! Only atomics: the hot path (a closed breaker and a successful call) is two relaxed loads.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Breaker {
    epoch: Instant,
    /// Failed calls in a row.
    failures: AtomicU32,
    /// 0: closed. Otherwise milliseconds since `epoch`, plus one, from which a probe may go.
    open_until: AtomicU64,
    /// A caller is probing (reconnecting); others do not wait for it.
    probing: AtomicBool,
    failures_to_open: u32,
    probe_interval_ms: u64,
}

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// Open, and the next probe is not due yet: skip Redis.
    Open,
    /// Open and a probe is due: whoever wins [`Breaker::try_begin_probe`] probes.
    ProbeDue,
}

impl Breaker {
    pub fn new(failures_to_open: u32, probe_interval: Duration) -> Breaker {
        Breaker {
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            failures_to_open: failures_to_open.max(1),
            probe_interval_ms: probe_interval.as_millis() as u64,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn state(&self) -> State {
        match self.open_until.load(Ordering::Acquire) {
            0 => State::Closed,
            until if self.now_ms() + 1 < until => State::Open,
            _ => State::ProbeDue,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.open_until.load(Ordering::Acquire) == 0
    }

    /// Claims the one probe; `false` when another caller is probing.
    pub fn try_begin_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Ends the probe this caller claimed: success closes the breaker, failure counts as a
    /// failed call (and keeps an open breaker open for another interval).
    pub fn end_probe(&self, ok: bool) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.open_until.store(0, Ordering::Release);
        } else {
            self.failure();
        }
        self.probing.store(false, Ordering::Release);
    }

    /// A call succeeded. It does not close an open breaker: only a probe does, because only a
    /// probe reconnects (and replays what the open period left pending).
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A call failed or timed out.
    pub fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.failures_to_open || !self.is_closed() {
            self.trip();
        }
    }

    /// Opens now, for one probe interval.
    pub fn trip(&self) {
        let until = self.now_ms() + self.probe_interval_ms + 1;
        self.open_until.store(until, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_and_a_probe_closes_it() {
        let b = Breaker::new(3, Duration::from_millis(30));
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert_eq!(b.state(), State::Closed);
        b.failure();
        assert_eq!(b.state(), State::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), State::ProbeDue);
        assert!(b.try_begin_probe());
        assert!(!b.try_begin_probe(), "exactly one caller probes");
        b.end_probe(false);
        assert_eq!(b.state(), State::Open, "a failed probe waits another interval");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.try_begin_probe());
        b.end_probe(true);
        assert_eq!(b.state(), State::Closed);
        assert!(b.is_closed());
    }

    #[test]
    fn a_success_does_not_close_an_open_breaker() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.failure();
        b.success();
        assert_eq!(b.state(), State::Open);
    }
}
