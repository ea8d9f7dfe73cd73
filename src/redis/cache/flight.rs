//! Single flight: concurrent misses of one key in this process share one load.
//!
//! Each caller brings its own closure. The first runs it; the others wait for its value. If
//! that load fails or its caller is dropped, one of the waiters runs its own closure
//! (`OnceCell::get_or_try_init`), so an error is only ever returned to the caller whose load
//! produced it. The map entry is removed as soon as a flight completes, so the next miss
//! starts afresh (and finds the fill the flight left in Redis). A flight older than `max_age`
//! is never joined: a miss then starts its own (see `FlightKey` in the Redis cache for why
//! sharing a load is safe at all).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// A flight: its value once loaded, and when it began.
type Flight<V> = (Arc<OnceCell<V>>, Instant);

pub struct Flights<K, V> {
    map: Mutex<HashMap<K, Flight<V>>>,
    max_age: Duration,
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    pub fn new(max_age: Duration) -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            max_age,
        }
    }

    /// `load`'s value, or the value of the flight of `key` already under way.
    pub async fn run<E, F, Fut>(&self, key: K, load: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map
                .entry(key.clone())
                .or_insert_with(|| (Arc::default(), Instant::now()));
            if entry.1.elapsed() > self.max_age {
                *entry = (Arc::default(), Instant::now());
            }
            entry.0.clone()
        };
        let result = cell.get_or_try_init(load).await.cloned();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|(c, _)| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        result
    }

    /// Flights under way (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flights = Arc::new(Flights::<u32, Arc<String>>::new(Duration::from_secs(60)));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flights, loads) = (flights.clone(), loads.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(7, || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, ()>(Arc::new("v".to_owned()))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().as_str(), "v");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0, "the entry is removed after completion");
    }

    #[tokio::test]
    async fn a_failed_leader_hands_over_to_a_waiter() {
        let flights = Arc::new(Flights::<u32, u32>::new(Duration::from_secs(60)));
        let f = flights.clone();
        let leader = tokio::spawn(async move {
            f.run(1, || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err::<u32, &str>("db down")
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = flights.run(1, || async { Ok::<u32, &str>(5) }).await;
        assert_eq!(leader.await.unwrap(), Err("db down"));
        assert_eq!(waiter, Ok(5));
    }

    #[tokio::test]
    async fn a_dropped_leader_hands_over_to_a_waiter() {
        let flights = Arc::new(Flights::<u32, u32>::new(Duration::from_secs(60)));
        let f = flights.clone();
        let leader = tokio::spawn(async move {
            f.run(1, || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<u32, ()>(1)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let f = flights.clone();
        let waiter = tokio::spawn(async move { f.run(1, || async { Ok::<u32, ()>(2) }).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let waiter = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a dropped leader does not block its waiters")
            .unwrap();
        assert_eq!(waiter, Ok(2));
    }
}
