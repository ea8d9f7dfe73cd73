//! Identifiers and the order-id generator.
//!
//! # Order id layout (63 bits, always positive as `i64`)
//!
//! ```text
//!  62                        23 22      13 12    7 6     0
//! +----------------------------+----------+-------+-------+
//! | milliseconds since EPOCH   |   gene   | worker|  seq  |
//! |          40 bits           |  10 bits | 6 bits| 7 bits|
//! +----------------------------+----------+-------+-------+
//! ```
//!
//! - *time* first, so ids sort by creation time and a date converts to an id bound
//!   ([`OrderId::lower_bound_at`]). 40 bits of milliseconds last 34 years from 2025.
//! - *gene*: the user's shard bits ([`Gene::of_user`]); the order is found from its id alone.
//! - *worker*: one per live process (settings, or a lease in the commerce database), so
//!   processes never collide.
//! - *seq*: 128 ids per millisecond per process = 128 000 ids/s; when a millisecond is used
//!   up the generator moves to the next one.
//!
//! The generator never goes back in time: when the clock steps back by up to
//! [`MAX_BACKWARD_WAIT_MS`] it waits it out, beyond that it refuses.
//!
//! # The issuing window
//!
//! A generator issues ids only for milliseconds in `[floor, until)`:
//! - the *floor* ([`IdGenerator::raise_floor`]) is the bound under which an earlier holder of
//!   the same worker id may have issued ids; it carries the "never back in time" rule across
//!   processes and restarts, so a clock stepped back across a restart is refused (or waited
//!   out, if within [`MAX_BACKWARD_WAIT_MS`]) like a step back within one process;
//! - *until* ([`IdGenerator::set_until`]) is the local deadline of the worker-id lease: no id
//!   carries a millisecond at or after it, so the next holder (whose floor is at least that
//!   deadline) can never issue one of ours. [`IdGenerator::revoke`] closes the window and
//!   says below which millisecond every issued id lies.
//!
//! The window is checked on the millisecond the id actually carries, under the same lock that
//! moves it, so an id is never issued past a deadline that was checked a moment earlier.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, TimeZone, Utc};

use super::shard::{Gene, GENE_BITS};

/// 2025-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: i64 = 1_735_689_600_000;
pub const TIME_BITS: u32 = 40;
pub const WORKER_BITS: u32 = 6;
pub const SEQ_BITS: u32 = 7;
pub const MAX_WORKERS: u16 = 1 << WORKER_BITS;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const WORKER_SHIFT: u32 = SEQ_BITS;
const GENE_SHIFT: u32 = SEQ_BITS + WORKER_BITS;
const TIME_SHIFT: u32 = SEQ_BITS + WORKER_BITS + GENE_BITS;
/// A backward clock step this small (NTP slew, VM migration) is waited out; a larger one is
/// refused so that an operator notices rather than the service stalling for minutes.
pub const MAX_BACKWARD_WAIT_MS: i64 = 50;

/// Plain ASCII digits only: no sign, no spaces, no exponent, at most 19 digits.
fn parse_decimal(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// One macro for the plain positive 64-bit ids of the commerce data.
macro_rules! positive_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(i64);

        impl $name {
            pub fn new(v: i64) -> Option<Self> {
                (v > 0).then_some($name(v))
            }
            pub fn get(self) -> i64 {
                self.0
            }
            /// Parses the decimal-string form used in JSON and paths.
            pub fn parse(s: &str) -> Option<Self> {
                parse_decimal(s).and_then(Self::new)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        /// JSON carries 64-bit ids as decimal strings (JavaScript cannot hold them).
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }
    };
}

positive_id!(
    /// A buyer.
    UserId
);
positive_id!(
    /// A shop (merchant).
    ShopId
);
positive_id!(
    /// A product of a shop's catalog.
    ProductId
);
positive_id!(
    /// A coupon issued to one user.
    CouponId
);
positive_id!(
    /// A flash sale of one product.
    FlashSaleId
);

/// An order id; see the module docs for its layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId(i64);

/// The parts of an order id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdParts {
    pub unix_ms: i64,
    pub gene: Gene,
    pub worker: u16,
    pub seq: u16,
}

impl OrderId {
    pub fn new(v: i64) -> Option<Self> {
        (v > 0).then_some(OrderId(v))
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn parse(s: &str) -> Option<Self> {
        parse_decimal(s).and_then(Self::new)
    }

    pub fn compose(parts: IdParts) -> Self {
        let t = (parts.unix_ms - EPOCH_MS) as u64 & ((1 << TIME_BITS) - 1);
        let v = (t << TIME_SHIFT)
            | (u64::from(parts.gene.get()) << GENE_SHIFT)
            | (u64::from(parts.worker) << WORKER_SHIFT)
            | u64::from(parts.seq);
        OrderId(v as i64)
    }

    pub fn parts(self) -> IdParts {
        let v = self.0 as u64;
        IdParts {
            unix_ms: (v >> TIME_SHIFT) as i64 + EPOCH_MS,
            gene: Gene::from_bits(v >> GENE_SHIFT),
            worker: ((v >> WORKER_SHIFT) & u64::from(MAX_WORKERS - 1)) as u16,
            seq: (v & SEQ_MASK) as u16,
        }
    }

    pub fn gene(self) -> Gene {
        self.parts().gene
    }

    pub fn created_at(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.parts().unix_ms)
            .single()
            .unwrap_or_default()
    }

    /// The smallest id that can have been made at or after `at`: `id >= lower_bound_at(t)`
    /// selects orders created from `t` on, whatever their gene or worker.
    pub fn lower_bound_at(at: DateTime<Utc>) -> i64 {
        let ms = at
            .timestamp_millis()
            .clamp(EPOCH_MS, EPOCH_MS + (1 << TIME_BITS) - 1);
        (ms - EPOCH_MS) << TIME_SHIFT
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl serde::Serialize for OrderId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A worker id in `0..64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerId(u16);

impl WorkerId {
    pub fn new(v: u16) -> Option<Self> {
        (v < MAX_WORKERS).then_some(WorkerId(v))
    }
    pub fn get(self) -> u16 {
        self.0
    }
}

/// Wall-clock milliseconds; a trait so tests can step the clock back.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("clock moved back by {0} ms; refusing to issue ids")]
    ClockMovedBack(i64),
    #[error("clock is before the id epoch")]
    BeforeEpoch,
    /// An earlier holder of this worker id may have issued ids up to the floor: the clock is
    /// behind it (stepped back across a restart) by this many ms.
    #[error("clock is {0} ms behind the ids already issued under this worker id; refusing to issue ids")]
    BelowFloor(i64),
    /// The window is closed: the lease deadline passed or was revoked.
    #[error("the worker id is not held; not issuing ids")]
    NotHeld,
}

/// Makes order ids for one process. Cheap to share (`Arc`); a mutex guards two integers.
pub struct IdGenerator<C = SystemClock> {
    worker: WorkerId,
    clock: C,
    state: Mutex<GenState>,
}

#[derive(Debug)]
struct GenState {
    /// Millisecond of the last id issued (0 before the first).
    last_ms: i64,
    seq: u64,
    /// No id below this millisecond (see the module docs).
    floor_ms: i64,
    /// No id at or after this millisecond.
    until_ms: i64,
}

impl Default for GenState {
    fn default() -> Self {
        GenState {
            last_ms: 0,
            seq: 0,
            floor_ms: 0,
            until_ms: i64::MAX,
        }
    }
}

impl GenState {
    fn issued_below(&self) -> i64 {
        if self.last_ms > 0 {
            self.floor_ms.max(self.last_ms + 1)
        } else {
            self.floor_ms
        }
    }
}

impl IdGenerator<SystemClock> {
    pub fn new(worker: WorkerId) -> Self {
        Self::with_clock(worker, SystemClock)
    }
}

impl<C: Clock> IdGenerator<C> {
    pub fn with_clock(worker: WorkerId, clock: C) -> Self {
        IdGenerator {
            worker,
            clock,
            state: Mutex::new(GenState::default()),
        }
    }

    pub fn worker(&self) -> WorkerId {
        self.worker
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GenState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on no id below millisecond `ms` (never lowers the floor).
    pub fn raise_floor(&self, ms: i64) {
        let mut st = self.state();
        st.floor_ms = st.floor_ms.max(ms);
    }

    /// Ids only below millisecond `ms` from now on (the lease deadline; may move either way).
    pub fn set_until(&self, ms: i64) {
        self.state().until_ms = ms;
    }

    /// Closes the window and returns the millisecond below which every id this generator
    /// issued lies (at least the floor): what the next holder's floor must be.
    pub fn revoke(&self) -> i64 {
        let mut st = self.state();
        st.until_ms = i64::MIN;
        st.issued_below()
    }

    /// The millisecond below which every id issued so far lies (at least the floor).
    pub fn issued_below(&self) -> i64 {
        self.state().issued_below()
    }

    /// A fresh id for an order of `user`.
    pub fn next_for(&self, user: UserId) -> Result<OrderId, IdError> {
        let gene = Gene::of_user(user);
        let (ms, seq) = self.next_slot()?;
        Ok(OrderId::compose(IdParts {
            unix_ms: ms,
            gene,
            worker: self.worker.get(),
            seq: seq as u16,
        }))
    }

    /// The next (millisecond, sequence) pair, strictly increasing per process.
    fn next_slot(&self) -> Result<(i64, u64), IdError> {
        let mut st = self.state();
        loop {
            let now = self.clock.now_ms();
            if now < EPOCH_MS {
                return Err(IdError::BeforeEpoch);
            }
            if now >= st.until_ms {
                return Err(IdError::NotHeld);
            }
            if now < st.last_ms {
                let back = st.last_ms - now;
                if back > MAX_BACKWARD_WAIT_MS {
                    return Err(IdError::ClockMovedBack(back));
                }
                std::thread::sleep(Duration::from_millis(back as u64));
                continue;
            }
            if now < st.floor_ms {
                let behind = st.floor_ms - now;
                if behind > MAX_BACKWARD_WAIT_MS {
                    return Err(IdError::BelowFloor(behind));
                }
                std::thread::sleep(Duration::from_millis(behind as u64));
                continue;
            }
            if now == st.last_ms {
                if st.seq < SEQ_MASK {
                    st.seq += 1;
                    return Ok((now, st.seq));
                }
                // This millisecond is used up: wait for the next one.
                std::thread::yield_now();
                continue;
            }
            st.last_ms = now;
            st.seq = 0;
            return Ok((now, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    struct FakeClock(AtomicI64);
    impl Clock for Arc<FakeClock> {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn user(n: i64) -> UserId {
        UserId::new(n).unwrap()
    }

    #[test]
    fn ids_decode_to_their_parts() {
        let g = IdGenerator::new(WorkerId::new(37).unwrap());
        let id = g.next_for(user(42)).unwrap();
        let p = id.parts();
        assert_eq!(p.worker, 37);
        assert_eq!(p.gene, Gene::of_user(user(42)));
        assert!((SystemClock.now_ms() - p.unix_ms).abs() < 5_000);
        assert!(id.get() > 0);
    }

    #[test]
    fn waits_out_a_small_backward_step_and_refuses_a_large_one() {
        let clock = Arc::new(FakeClock(AtomicI64::new(EPOCH_MS + 10_000)));
        let g = IdGenerator::with_clock(WorkerId::new(1).unwrap(), clock.clone());
        let first = g.next_for(user(1)).unwrap();
        clock.0.store(EPOCH_MS + 5_000, Ordering::SeqCst);
        assert_eq!(g.next_for(user(1)), Err(IdError::ClockMovedBack(5_000)));
        // Back to the old time: ids continue strictly after the first.
        clock.0.store(EPOCH_MS + 10_000, Ordering::SeqCst);
        let second = g.next_for(user(1)).unwrap();
        assert!(second > first);
    }

    #[test]
    fn a_used_up_millisecond_moves_to_the_next() {
        let clock = Arc::new(FakeClock(AtomicI64::new(EPOCH_MS + 1)));
        let g = Arc::new(IdGenerator::with_clock(WorkerId::new(1).unwrap(), clock.clone()));
        let mut seen = HashSet::new();
        for _ in 0..128 {
            assert!(seen.insert(g.next_for(user(1)).unwrap()));
        }
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.next_for(user(1)).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        clock.0.store(EPOCH_MS + 2, Ordering::SeqCst);
        let next = h.join().unwrap();
        assert_eq!(next.parts().unix_ms, EPOCH_MS + 2);
        assert!(seen.insert(next));
    }

    #[test]
    fn never_issues_below_the_floor_waits_a_small_gap_and_refuses_a_large_one() {
        let clock = Arc::new(FakeClock(AtomicI64::new(EPOCH_MS + 10_000)));
        let g = IdGenerator::with_clock(WorkerId::new(1).unwrap(), clock.clone());
        // A previous holder issued ids up to 10 s after our clock: refuse, like a step back.
        g.raise_floor(EPOCH_MS + 20_000);
        assert_eq!(g.next_for(user(1)), Err(IdError::BelowFloor(10_000)));
        // The floor never goes down.
        g.raise_floor(EPOCH_MS);
        assert_eq!(g.next_for(user(1)), Err(IdError::BelowFloor(10_000)));
        clock.0.store(EPOCH_MS + 20_000, Ordering::SeqCst);
        let id = g.next_for(user(1)).unwrap();
        assert_eq!(id.parts().unix_ms, EPOCH_MS + 20_000);
        assert_eq!(g.issued_below(), EPOCH_MS + 20_001);
    }

    #[test]
    fn a_floor_within_the_tolerance_is_waited_out() {
        let g = IdGenerator::new(WorkerId::new(2).unwrap());
        let floor = SystemClock.now_ms() + 30;
        g.raise_floor(floor);
        let id = g.next_for(user(7)).unwrap();
        assert!(id.parts().unix_ms >= floor);
    }

    #[test]
    fn the_window_closes_at_the_deadline_and_on_revoke() {
        let clock = Arc::new(FakeClock(AtomicI64::new(EPOCH_MS + 1_000)));
        let g = IdGenerator::with_clock(WorkerId::new(3).unwrap(), clock.clone());
        assert_eq!(g.issued_below(), 0, "nothing issued, no floor");
        g.set_until(EPOCH_MS + 1_001);
        g.next_for(user(1)).unwrap();
        clock.0.store(EPOCH_MS + 1_001, Ordering::SeqCst);
        assert_eq!(g.next_for(user(1)), Err(IdError::NotHeld));
        g.set_until(EPOCH_MS + 5_000);
        g.next_for(user(1)).unwrap();
        assert_eq!(g.revoke(), EPOCH_MS + 1_002);
        assert_eq!(g.next_for(user(1)), Err(IdError::NotHeld));
    }

    #[test]
    fn a_used_up_millisecond_never_spills_past_the_deadline() {
        let clock = Arc::new(FakeClock(AtomicI64::new(EPOCH_MS + 1)));
        let g = IdGenerator::with_clock(WorkerId::new(1).unwrap(), clock.clone());
        g.set_until(EPOCH_MS + 2);
        for _ in 0..128 {
            g.next_for(user(1)).unwrap();
        }
        // The 129th id would need the next millisecond, which is the deadline.
        let g = Arc::new(g);
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.next_for(user(1)));
        std::thread::sleep(Duration::from_millis(20));
        clock.0.store(EPOCH_MS + 2, Ordering::SeqCst);
        assert_eq!(h.join().unwrap(), Err(IdError::NotHeld));
    }

    proptest::proptest! {
        /// Whatever the clock does and however the floor and deadline move, every id issued
        /// lies in the window of its moment, ids strictly increase, and `revoke` bounds them.
        #[test]
        fn ids_stay_within_the_window_and_increase(
            steps in proptest::collection::vec((-100i64..100, 0i64..300, 0i64..300, 0u8..4), 1..200)
        ) {
            let base = EPOCH_MS + 1_000_000;
            let clock = Arc::new(FakeClock(AtomicI64::new(base)));
            let g = IdGenerator::with_clock(WorkerId::new(5).unwrap(), clock.clone());
            let mut floor = 0i64;
            let mut last: Option<OrderId> = None;
            for (jump, floor_ahead, until_ahead, action) in steps {
                // The clock moves either way, but not into a backward wait (no sleeping here).
                let now = (clock.0.load(Ordering::SeqCst) + jump).max(base);
                clock.0.store(now, Ordering::SeqCst);
                let until = now + until_ahead;
                match action {
                    0 => {
                        floor = floor.max(now + floor_ahead);
                        g.raise_floor(now + floor_ahead);
                    }
                    1 => g.set_until(until),
                    _ => {}
                }
                let (floor_now, until_now) = {
                    let st = g.state();
                    (st.floor_ms, st.until_ms)
                };
                proptest::prop_assert_eq!(floor_now, floor);
                let last_ms = last.map_or(0, |l| l.parts().unix_ms);
                // Skip the cases that would make the generator sleep (covered above).
                if (last_ms > now && last_ms - now <= MAX_BACKWARD_WAIT_MS)
                    || (floor > now && floor - now <= MAX_BACKWARD_WAIT_MS)
                {
                    continue;
                }
                match g.next_for(user(9)) {
                    Ok(id) => {
                        let ms = id.parts().unix_ms;
                        proptest::prop_assert!(ms >= floor && ms < until_now);
                        proptest::prop_assert!(last.is_none_or(|l| id > l));
                        last = Some(id);
                    }
                    Err(IdError::NotHeld) => proptest::prop_assert!(now >= until_now),
                    Err(IdError::BelowFloor(b)) => proptest::prop_assert_eq!(b, floor - now),
                    Err(IdError::ClockMovedBack(b)) => proptest::prop_assert_eq!(b, last_ms - now),
                    Err(IdError::BeforeEpoch) => proptest::prop_assert!(false, "clock after epoch"),
                }
            }
            let below = g.revoke();
            proptest::prop_assert!(below >= floor);
            proptest::prop_assert!(last.is_none_or(|l| l.parts().unix_ms < below));
            proptest::prop_assert_eq!(g.next_for(user(9)), Err(IdError::NotHeld));
        }
    }

    #[test]
    fn lower_bound_selects_ids_from_a_time_on() {
        let g = IdGenerator::new(WorkerId::new(63).unwrap());
        let id = g.next_for(user(u32::MAX as i64)).unwrap();
        let at = id.created_at();
        assert!(id.get() >= OrderId::lower_bound_at(at));
        assert!(id.get() < OrderId::lower_bound_at(at + chrono::Duration::milliseconds(1)));
    }

    #[test]
    fn parse_accepts_only_positive_decimal_strings() {
        assert!(OrderId::parse("123").is_some());
        for bad in ["", "0", "-1", "+1", "1e3", " 1", "99999999999999999999", "abc"] {
            assert!(OrderId::parse(bad).is_none(), "{bad:?}");
        }
    }
}
