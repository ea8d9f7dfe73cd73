//! Read-your-writes watermarks kept in this process.
//!
//! Every committed order write records its watermark (database and GTID) for the order and
//! for its owner. A write's `Consistency-Token` header is read from here, and a `session`
//! read raises its fence with the later of this process's watermark and the client's token
//! (the fence, the primary's position read after the read began, already holds them: see
//! [`crate::storage::replicas`]).
//!
//! Entries expire after `replicas.watermark_ttl_ms` (by then every replica in rotation has
//! the write); expired ones are swept as new ones come in, so memory follows the write rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::consistency::Watermark;
use crate::domain::ids::{OrderId, UserId};

/// Whose watermark: an order's (its own writes) or a user's (the writes of all their orders,
/// for their list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatermarkOf {
    Order(OrderId),
    User(UserId),
}

/// Inserts between two sweeps of expired entries: a sweep walks the whole map, so it runs once
/// per this many writes (amortised O(1) per write) and at most this many expired entries
/// linger beyond a sweep.
const SWEEP_EVERY: usize = 4096;

pub struct LocalWatermarks {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    marks: HashMap<WatermarkOf, (Watermark, Instant)>,
    since_sweep: usize,
}

impl LocalWatermarks {
    pub fn new(ttl: Duration) -> LocalWatermarks {
        LocalWatermarks {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Records `w` for each of `of`, keeping a later watermark already there.
    pub fn record(&self, of: &[WatermarkOf], w: Watermark) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in of {
            let mark = match s.marks.get(key) {
                Some((old, at)) if now.duration_since(*at) < self.ttl => old.max(w),
                _ => w,
            };
            s.marks.insert(*key, (mark, now));
        }
        s.since_sweep += 1;
        if s.since_sweep >= SWEEP_EVERY {
            s.since_sweep = 0;
            let ttl = self.ttl;
            s.marks.retain(|_, (_, at)| now.duration_since(*at) < ttl);
        }
    }

    /// The watermark of `of`, if one was recorded within the TTL.
    pub fn get(&self, of: WatermarkOf) -> Option<Watermark> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.marks
            .get(&of)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(w, _)| *w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::UserId;

    #[test]
    fn keeps_the_later_watermark_until_it_expires() {
        let marks = LocalWatermarks::new(Duration::from_millis(50));
        let user = WatermarkOf::User(UserId::new(7).unwrap());
        let w = |s: &str| Watermark::parse(s).unwrap();
        assert_eq!(marks.get(user), None);
        marks.record(&[user], w("o0:0-1-9"));
        marks.record(&[user], w("o0:0-1-5"));
        assert_eq!(
            marks.get(user),
            Some(w("o0:0-1-9")),
            "a late notice of an older write"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(marks.get(user), None);
        marks.record(&[user], w("o0:0-1-5"));
        assert_eq!(
            marks.get(user),
            Some(w("o0:0-1-5")),
            "an expired one does not count"
        );
    }
}
