//! The Redis cache: cache-aside entries that are never behind a committed write, over the
//! shared connection ([`Redis`]: timeouts, breaker, run tag, scripts).
//!
//! # Keys
//! Every key starts with the configured prefix and carries a hash tag, so that every script
//! touches the keys of one tag only (Redis Cluster ready). The cache's keys (the flash gate's
//! and the carts' are in [`crate::redis::gate`] and [`crate::redis::cart`]):
//!
//! | key                         | holds                                              |
//! |-----------------------------|----------------------------------------------------|
//! | `{prefix}{o:<order_id>}:d`  | the order: `<version>:<tag>:<codec bytes>`         |
//! | `{prefix}{o:<order_id>}:w`  | write marker: the highest version written lately   |
//! | `{prefix}{u:<user_id>}:p`   | the user profile: `1:<tag>:<codec bytes>`          |
//! | `{prefix}{u:<user_id>}:w`   | its write marker                                   |
//! | `{prefix}{u:<user_id>}:l`   | first page of the user's orders: `<tag>:<bytes>`   |
//! | `{prefix}{u:<user_id>}:g`   | the page's generation, bumped by every order write |
//! | `{prefix}{o:<order_id>}:f`  | fill lease: the token of the miss that may fill    |
//! | `{prefix}{u:<user_id>}:f`   | the same for the profile; `:pf` for the page       |
//!
//! "Absent" (no such order or user) is version 0 with an empty payload, kept
//! `absent_ttl_secs`. `<tag>` is the first [`TAG_LEN`](crate::redis::TAG_LEN) characters of the `run_id` of the
//! Redis server that the writing connection talks to: a value whose tag is not the tag of the
//! connection that reads it is a miss.
//!
//! # Reads
//! A read skips Redis when the breaker is open or its key has an undelivered invalidation
//! (below). Otherwise it GETs the entry (MGET entry and generation for a page); a hit with the
//! right tag that decodes is the answer and touches no database. A miss reads the entry's
//! marker and joins the single flight of its key, marker (or generation) and tag
//! ([`FlightKey`]); the flight's leader sets the key's fill lease to a token of its own and
//! GETs again (with Redis `TIME`), takes a fill permit
//! of the entry's database (a bound per database: a stalled one holds only its own), loads,
//! and fills with a conditional script, only over a connection with the tag its GET saw,
//! and only within `fill_lease_ms` of the start of its load. Redis errors never reach the
//! caller: they count for the breaker and the read answers from its loader.
//!
//! Nothing a fill relies on to be current lives in Redis: the loader reads a server that
//! holds every write acknowledged before the load began (the replica read's fence, see
//! [`crate::storage::replicas`]), so a Redis that lost its keys (`FLUSHALL`, a restart
//! without persistence, a failover, an eviction) never makes a fill older than a write
//! acknowledged before its miss. Markers fence the writes that commit *during* a load, and
//! the fill lease the loss of those markers: a fill lands only while the lease still holds
//! the token its leader set before loading, so a Redis that lost its keys (the marker with
//! them) between the load and the fill refuses it.
//!
//! # Writes
//! `order_written` sends, in one round trip, a script that raises the order's marker to the
//! written version (for `write_marker_ms`) and replaces the entry with the given snapshot or
//! deletes it when it is older, and a script that bumps the owner's page generation and
//! deletes the page. A notice that cannot be delivered is kept in-process and replayed.
//!
//! # Interleavings ruled out
//! 1. *A slow reader loaded version v before write v+1 committed and fills after the write's
//!    notice*: the notice left a marker at v+1; the fill script refuses a version below the
//!    marker.
//! 2. *The stale fill lands before the notice*: the notice deletes (or replaces with its
//!    snapshot) every entry older than its version.
//! 3. *The reader is slower than the marker's life*: a fill is not sent once `fill_lease_ms`
//!    has passed since its load started, and the script itself refuses it once Redis's clock
//!    passes the lease counted from the leader's GET (so a fill delayed in a socket is refused
//!    too). The marker lives `write_marker_ms` >= 2 x `fill_lease_ms` from the notice, which
//!    came after the load started, so any fill that could still land meets the marker.
//! 4. *"Absent" is cached, then the order is created*: creation's notice is version 1 > 0:
//!    it replaces or deletes the absent entry, and its marker refuses a late absent fill.
//! 5. *A page loaded before a write is filled after it*: the leader notes the generation
//!    before its load; the write bumps it; the fill script sets the page only if the
//!    generation is unchanged.
//! 6. *Redis unreachable when a write committed*: the notice goes into the pending set; reads
//!    of a pending key skip Redis (and fills of it are dropped) until the notice has been
//!    replayed, which happens before the cache is used for that key again. Above
//!    `max_pending_invalidations` the set is dropped for a purge flag: every read skips Redis
//!    until every data key of the prefix has been unlinked (markers and generations are kept:
//!    they still fence fills of other processes).
//! 7. *Redis restarted from an old snapshot*, with entries (and without markers) from before
//!    invalidations it had already received: its `run_id` is new, so every old entry carries
//!    another tag and reads as a miss (and is overwritten by fills); a fill whose GET was
//!    answered before the restart is dropped because the current connection's tag differs.
//! 8. *A command that timed out on our side is executed late by Redis*: every script is
//!    conditional (marker, version, tag, generation, deadline in Redis's clock), so a late
//!    notice only raises a marker or removes an entry, and a late fill is refused once its
//!    deadline has passed.
//! 9. *A miss that starts after a write was acknowledged joins a flight whose load began
//!    before the write committed* (the consistency checker found this one: first pages one
//!    version behind): a miss shares a flight only with misses that saw the same marker or
//!    generation, which the write raised before it was acknowledged, so the flight's leader
//!    saw the raised value before it loaded; and never a flight older than the fill lease.
//! 10. *Redis lost its keys* (markers, generations and entries gone together: `FLUSHALL`, an
//!     empty restart, a failover to a replica that had not received them) and a miss of
//!     another process reads a lagging replica: the load's fence holds every acknowledged
//!     write, so the lagging replica is waited for or the primary answers; the fill is as new
//!     as any write acknowledged before the miss.
//! 11. *Redis lost its keys during a load*, after the notice of a write that committed
//!     during it (so its marker is gone): the fill lease went with them, and the fill script
//!     refuses a fill whose lease no longer holds its token.
//!
//! # Not covered
//! - An eviction that removes a fresh marker but not the fill lease of a load racing its
//!   write (an eviction policy that picks keys by nearest expiry, `volatile-ttl`, would):
//!   run Redis with `allkeys-lru`, `allkeys-lfu` or `noeviction`.
//! - Another process that never saw Redis fail keeps serving entries that a partitioned
//!   process could not invalidate, until that process replays its pending notices or the
//!   entries' TTL ends (the pending set lives in the process that failed).
//! - After a purge, a fill of this process that was sent before the purge flag was raised and
//!   executed by Redis after the purge's scan passed its key is not fenced by a marker.
//! - Redis Cluster would need a run tag per node (a restarted node with an old snapshot is
//!   detected only through the node the connection's `INFO` answered for), scripts sent to
//!   each key's node, and a purge per node.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use redis::{Cmd, Script};
use tokio::sync::{oneshot, Notify, Semaphore};

use super::codec;
use super::flight::Flights;
use super::CacheHealth;
use crate::config::CacheSettings;
use crate::domain::consistency::DatabaseRef;
use crate::domain::ids::{OrderId, UserId};
use crate::domain::order::Order;
use crate::domain::user::User;
use crate::redis::conn::Conn;
use crate::redis::{evalsha, Redis};

/// A page generation lives this long after its last bump. It only has to outlive the fill
/// lease of readers that noted it (seconds); a day keeps idle users' counters from piling up.
const GENERATION_TTL_MS: u64 = 86_400_000;

/// Pending notices replayed per round trip: a few hundred small scripts run in well under a
/// millisecond in Redis, so a batch fits the per-call timeout with room to spare.
const REPLAY_BATCH: usize = 256;

/// Keys asked per `SCAN` step of a purge: large enough to get through a big key space in few
/// round trips, small enough that one step stays far below the per-call timeout.
const PURGE_SCAN_COUNT: usize = 1_000;

/// The version of every user profile: profiles never change after they are created.
const USER_VERSION: i64 = 1;

/// Redis key of the cached order `id`.
pub fn order_key(prefix: &str, id: OrderId) -> String {
    format!("{prefix}{{o:{id}}}:d")
}

fn order_marker_key(prefix: &str, id: OrderId) -> String {
    format!("{prefix}{{o:{id}}}:w")
}

fn user_key(prefix: &str, id: UserId) -> String {
    format!("{prefix}{{u:{id}}}:p")
}

fn user_marker_key(prefix: &str, id: UserId) -> String {
    format!("{prefix}{{u:{id}}}:w")
}

fn page_key(prefix: &str, user: UserId) -> String {
    format!("{prefix}{{u:{user}}}:l")
}

fn generation_key(prefix: &str, user: UserId) -> String {
    format!("{prefix}{{u:{user}}}:g")
}

fn page_lease_key(prefix: &str, user: UserId) -> String {
    format!("{prefix}{{u:{user}}}:pf")
}

/// A fill lease token: random, so no other read (of this or another process) holds it.
fn lease_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether a key is an entry (not a marker or a generation): what a purge removes.
fn is_entry_key(key: &[u8]) -> bool {
    key.ends_with(b":d") || key.ends_with(b":p") || key.ends_with(b":l")
}

/// Escapes `*?[]\` for a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Lua scripts. Values are parsed with `^(%d+):([^:]*):` (version, tag).
mod lua {
    /// KEYS[1] entry, KEYS[2] its marker, KEYS[3] its fill lease. ARGV[1] version loaded,
    /// ARGV[2] tag of the read, ARGV[3] value, ARGV[4] TTL ms, ARGV[5] deadline (Redis time,
    /// µs), ARGV[6] the lease token of the read.
    /// Returns 1 set, 0 refused (marker, lease or a current entry), -1 too late.
    pub const FILL_ENTRY: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[5]) then return -1 end
if redis.call('GET', KEYS[3]) ~= ARGV[6] then return 0 end
local v = tonumber(ARGV[1])
local m = redis.call('GET', KEYS[2])
if m and tonumber(m) and tonumber(m) > v then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local sv, st = string.match(cur, '^(%d+):([^:]*):')
  if st == ARGV[2] and tonumber(sv) >= v then return 0 end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
";

    /// KEYS[1] entry, KEYS[2] its marker. ARGV[1] version written, ARGV[2] marker TTL ms,
    /// ARGV[3] tag of this connection, ARGV[4] value at that version ('' when none), ARGV[5]
    /// TTL ms. Raises the marker; then keeps an entry of this run at that version or newer,
    /// else replaces it with the value (unless a newer write's marker stands) or deletes it.
    /// Returns 1 replaced, 2 deleted, 0 left alone.
    pub const ENTRY_WRITTEN: &str = r"
local v = tonumber(ARGV[1])
local ms = redis.call('GET', KEYS[2])
local m = (ms and tonumber(ms)) or 0
if v >= m then ms = ARGV[1] end
redis.call('SET', KEYS[2], ms, 'PX', ARGV[2])
local cur = redis.call('GET', KEYS[1])
if cur then
  local sv, st = string.match(cur, '^(%d+):([^:]*):')
  if st == ARGV[3] and tonumber(sv) >= v then return 0 end
end
if ARGV[4] ~= '' and v >= m then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
  return 1
end
if cur then
  redis.call('DEL', KEYS[1])
  return 2
end
return 0
";

    /// KEYS[1] page, KEYS[2] generation, KEYS[3] its fill lease. ARGV[1] generation seen
    /// before the load ('0': none), ARGV[2] value, ARGV[3] TTL ms, ARGV[4] deadline (Redis
    /// time, µs), ARGV[5] the lease token of the read.
    pub const FILL_PAGE: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[4]) then return -1 end
if redis.call('GET', KEYS[3]) ~= ARGV[5] then return 0 end
local g = redis.call('GET', KEYS[2]) or '0'
if g ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

    /// KEYS[1] page, KEYS[2] generation. ARGV[1] generation TTL ms.
    pub const PAGE_WRITTEN: &str = r"
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
";

    pub const ALL: [&str; 4] = [FILL_ENTRY, ENTRY_WRITTEN, FILL_PAGE, PAGE_WRITTEN];
}

/// The cache's scripts, loaded by every new connection (see [`crate::redis`]).
pub(crate) const SCRIPTS: [&str; 4] = lua::ALL;

struct Scripts {
    fill_entry: Script,
    entry_written: Script,
    fill_page: Script,
    page_written: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            fill_entry: Script::new(lua::FILL_ENTRY),
            entry_written: Script::new(lua::ENTRY_WRITTEN),
            fill_page: Script::new(lua::FILL_PAGE),
            page_written: Script::new(lua::PAGE_WRITTEN),
        }
    }
}

/// Counts a read of `key` by outcome: `hit` (answered from Redis, the leader's second look
/// included), `skipped` (Redis not used: breaker open or a pending notice); the rest are
/// misses, counted by their fills.
fn count(key: EntryKey, outcome: &'static str) {
    let kind = match key {
        EntryKey::Order(_) => "order",
        EntryKey::User(_) => "user",
        EntryKey::Page(_) => "page",
    };
    metrics::counter!("orderly_cache_reads_total", "kind" => kind, "outcome" => outcome).increment(1);
}

/// Counts a fill by what its script answered: `stored`, `refused` (a newer write's marker, a
/// current entry or a moved generation), `late` (past its deadline), `failed`.
fn count_fill(outcome: Option<i64>) {
    let outcome = match outcome {
        Some(1) => "stored",
        Some(0) => "refused",
        Some(_) => "late",
        None => "failed",
    };
    metrics::counter!("orderly_cache_fills_total", "outcome" => outcome).increment(1);
}

/// What a cache entry is about: the key of flights, fill pauses and pending notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EntryKey {
    Order(OrderId),
    User(UserId),
    Page(UserId),
}

/// What a miss may share a flight on: the entry, the write marker (order, user) or generation
/// (page) the miss saw in Redis, and the server's run tag.
///
/// A read must see every write acknowledged before it started. A write's notice raises the
/// marker or generation before the write is acknowledged, so a read that starts after the
/// acknowledgement sees the raised value, and joins only a flight whose leader saw the same
/// value before it loaded: that load started after the write committed. (A flight is also
/// never joined once older than the fill lease, which the marker outlives.)
type FlightKey = (EntryKey, Option<String>, String);

/// A versioned entry (order or user) and its marker.
struct EntryKeys {
    key: EntryKey,
    data: String,
    marker: String,
    lease: String,
}

impl EntryKeys {
    fn order(prefix: &str, id: OrderId) -> EntryKeys {
        EntryKeys {
            key: EntryKey::Order(id),
            data: order_key(prefix, id),
            marker: order_marker_key(prefix, id),
            lease: format!("{prefix}{{o:{id}}}:f"),
        }
    }

    fn user(prefix: &str, id: UserId) -> EntryKeys {
        EntryKeys {
            key: EntryKey::User(id),
            data: user_key(prefix, id),
            marker: user_marker_key(prefix, id),
            lease: format!("{prefix}{{u:{id}}}:f"),
        }
    }
}

/// What the versioned entries hold.
trait Entity: Clone + Send + Sync + 'static {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Option<Self>;
    fn version(&self) -> i64;
}

impl Entity for Order {
    fn encode(&self) -> Vec<u8> {
        codec::encode_order(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        codec::decode_order(bytes)
    }
    fn version(&self) -> i64 {
        self.version
    }
}

impl Entity for User {
    fn encode(&self) -> Vec<u8> {
        codec::encode_user(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        codec::decode_user(bytes)
    }
    fn version(&self) -> i64 {
        USER_VERSION
    }
}

/// `<version>:<tag>:<payload>`.
fn entry_value(version: i64, tag: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!("{version}:{tag}:").into_bytes();
    v.extend_from_slice(payload);
    v
}

/// `<tag>:<payload>`.
fn page_value(tag: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + 1 + payload.len());
    v.extend_from_slice(tag.as_bytes());
    v.push(b':');
    v.extend_from_slice(payload);
    v
}

/// The answer an entry gives a reader on a connection tagged `tag`: `Some(None)` absent,
/// `Some(Some(v))` the value, `None` a miss (another run's entry, or undecodable).
fn entry_hit<T: Entity>(raw: &[u8], tag: &str) -> Option<Option<T>> {
    let colon = raw.iter().position(|&b| b == b':')?;
    let version: i64 = std::str::from_utf8(&raw[..colon]).ok()?.parse().ok()?;
    let rest = &raw[colon + 1..];
    let payload = rest.strip_prefix(tag.as_bytes())?.strip_prefix(b":")?;
    if version == 0 {
        return payload.is_empty().then_some(None);
    }
    let value = T::decode(payload)?;
    (value.version() == version).then_some(Some(value))
}

fn page_hit(raw: &[u8], tag: &str) -> Option<Vec<Order>> {
    let payload = raw.strip_prefix(tag.as_bytes())?.strip_prefix(b":")?;
    codec::decode_page(payload)
}

/// The bound on concurrent loads of misses, one per database: a database that stalls holds
/// only its own permits, never the fills of the others.
struct FillPermits {
    per_database: usize,
    semaphores: Mutex<HashMap<DatabaseRef, Arc<Semaphore>>>,
}

impl FillPermits {
    fn new(per_database: usize) -> FillPermits {
        FillPermits {
            per_database: per_database.max(1),
            semaphores: Mutex::new(HashMap::new()),
        }
    }

    async fn acquire(&self, db: DatabaseRef) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = self
            .semaphores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(db)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_database)))
            .clone();
        semaphore.acquire_owned().await.ok()
    }
}

/// Write notices that could not be delivered.
struct Pending {
    /// Fast path: false when there is nothing pending and no purge to do.
    dirty: AtomicBool,
    state: Mutex<PendingState>,
    max: usize,
}

#[derive(Default)]
struct PendingState {
    /// Key -> (highest version to replay, sequence number of its last addition).
    map: HashMap<EntryKey, (i64, u64)>,
    seq: u64,
    /// The set overflowed: every entry of the prefix must go. Holds the sequence number of
    /// the overflow, so a purge clears only the request it served.
    purge: Option<u64>,
}

impl Pending {
    fn new(max: usize) -> Pending {
        Pending {
            dirty: AtomicBool::new(false),
            state: Mutex::new(PendingState::default()),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    fn add(&self, key: EntryKey, version: i64) {
        let mut s = self.lock();
        s.seq += 1;
        let seq = s.seq;
        let e = s.map.entry(key).or_insert((version, seq));
        e.0 = e.0.max(version);
        e.1 = seq;
        if s.map.len() > self.max {
            tracing::warn!(
                max = self.max,
                "too many undelivered cache invalidations: the cache will be purged"
            );
            s.map.clear();
            s.purge = Some(seq);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether reads and fills of `key` must skip Redis.
    fn blocks(&self, key: EntryKey) -> bool {
        if !self.is_dirty() {
            return false;
        }
        let s = self.lock();
        s.purge.is_some() || s.map.contains_key(&key)
    }

    fn batch(&self, n: usize) -> Vec<(EntryKey, i64, u64)> {
        self.lock()
            .map
            .iter()
            .take(n)
            .map(|(k, (v, seq))| (*k, *v, *seq))
            .collect()
    }

    /// These were delivered: forget those not added again since.
    fn delivered(&self, batch: &[(EntryKey, i64, u64)]) {
        let mut s = self.lock();
        for (key, _, seq) in batch {
            if s.map.get(key).is_some_and(|(_, now)| now == seq) {
                s.map.remove(key);
            }
        }
        self.refresh(&s);
    }

    fn purge_requested(&self) -> Option<u64> {
        self.lock().purge
    }

    fn purged(&self, seq: u64) {
        let mut s = self.lock();
        if s.purge == Some(seq) {
            s.purge = None;
        }
        self.refresh(&s);
    }

    fn refresh(&self, s: &PendingState) {
        self.dirty
            .store(s.purge.is_some() || !s.map.is_empty(), Ordering::Release);
    }
}

/// Test hook: pauses the next fill of a given entry between its database load and its Redis
/// write. Costs one atomic load on the normal path.
#[derive(Default)]
pub struct FillGate {
    armed: AtomicBool,
    slots: Mutex<Vec<Arc<GateSlot>>>,
}

struct GateSlot {
    key: EntryKey,
    loaded: Notify,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

/// A fill paused by [`FillGate`]; dropping it releases the fill too.
pub struct PausedFill {
    slot: Arc<GateSlot>,
    _release: oneshot::Sender<()>,
}

impl PausedFill {
    /// Resolves once the paused fill has loaded from the database and waits.
    pub async fn loaded(&self) {
        self.slot.loaded.notified().await
    }

    /// Lets the fill go on to Redis.
    pub fn release(self) {}
}

impl FillGate {
    pub fn pause_next_order_fill(&self, id: OrderId) -> PausedFill {
        self.pause(EntryKey::Order(id))
    }

    pub fn pause_next_user_fill(&self, id: UserId) -> PausedFill {
        self.pause(EntryKey::User(id))
    }

    pub fn pause_next_page_fill(&self, user: UserId) -> PausedFill {
        self.pause(EntryKey::Page(user))
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<GateSlot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pause(&self, key: EntryKey) -> PausedFill {
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(GateSlot {
            key,
            loaded: Notify::new(),
            release: Mutex::new(Some(rx)),
        });
        self.slots().push(slot.clone());
        self.armed.store(true, Ordering::Release);
        PausedFill { slot, _release: tx }
    }

    async fn pass(&self, key: EntryKey) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let slot = {
            let mut slots = self.slots();
            let slot = slots.iter().position(|s| s.key == key).map(|i| slots.remove(i));
            self.armed.store(!slots.is_empty(), Ordering::Release);
            slot
        };
        if let Some(slot) = slot {
            slot.loaded.notify_one();
            let release = slot.release.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(release) = release {
                // An error only means the pause was dropped: that releases it too.
                let _ = release.await;
            }
        }
    }
}

/// The Redis cache; see the module docs.
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    pending: Pending,
    /// Held by the one task replaying pending notices.
    replay: Arc<tokio::sync::Mutex<()>>,
    fills: FillPermits,
    orders: Flights<FlightKey, Arc<Option<Order>>>,
    users: Flights<FlightKey, Arc<Option<User>>>,
    pages: Flights<FlightKey, Arc<Vec<Order>>>,
    gate: FillGate,
    scripts: Scripts,
    ttl: Duration,
    page_ttl: Duration,
    absent_ttl: Duration,
    jitter_percent: u32,
    marker: Duration,
    fill_lease: Duration,
}

impl RedisCache {
    /// The cache over `redis`, with the `[cache]` settings' TTLs, leases and bounds.
    pub fn new(redis: Redis, cache: &CacheSettings) -> RedisCache {
        if cache.fill_lease_ms.saturating_mul(2) > cache.write_marker_ms {
            tracing::warn!(
                fill_lease_ms = cache.fill_lease_ms,
                write_marker_ms = cache.write_marker_ms,
                "fill_lease_ms is more than half of write_marker_ms: a slow fill may outlive the \
                 marker of a write it missed"
            );
        }
        let inner = Arc::new(Inner {
            redis: redis.clone(),
            pending: Pending::new(cache.max_pending_invalidations),
            replay: Arc::new(tokio::sync::Mutex::new(())),
            fills: FillPermits::new(cache.max_concurrent_fills),
            orders: Flights::new(Duration::from_millis(cache.fill_lease_ms)),
            users: Flights::new(Duration::from_millis(cache.fill_lease_ms)),
            pages: Flights::new(Duration::from_millis(cache.fill_lease_ms)),
            gate: FillGate::default(),
            scripts: Scripts::new(),
            ttl: Duration::from_secs(cache.ttl_secs),
            page_ttl: Duration::from_secs(cache.list_ttl_secs),
            absent_ttl: Duration::from_secs(cache.absent_ttl_secs),
            jitter_percent: cache.ttl_jitter_percent.min(100),
            marker: Duration::from_millis(cache.write_marker_ms),
            fill_lease: Duration::from_millis(cache.fill_lease_ms),
        });
        // Whoever reconnects (a read, a notice, the gate, a cart), undelivered notices are
        // replayed right after: reads of pending keys never touch Redis, so they would not.
        // Weak: the connection outlives no cache, and must not keep one alive.
        let weak = Arc::downgrade(&inner);
        redis.on_connect(move || {
            if let Some(inner) = weak.upgrade() {
                inner.schedule_recovery();
            }
        });
        RedisCache { inner }
    }

    pub async fn order<E, F, Fut>(&self, id: OrderId, db: DatabaseRef, load: F) -> Result<Option<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Order>, E>>,
    {
        let keys = EntryKeys::order(self.inner.redis.prefix(), id);
        self.inner.read_entry(keys, db, &self.inner.orders, load).await
    }

    pub async fn user<E, F, Fut>(&self, id: UserId, db: DatabaseRef, load: F) -> Result<Option<User>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<User>, E>>,
    {
        let keys = EntryKeys::user(self.inner.redis.prefix(), id);
        self.inner.read_entry(keys, db, &self.inner.users, load).await
    }

    pub async fn first_page<E, F, Fut>(&self, user: UserId, db: DatabaseRef, load: F) -> Result<Vec<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Order>, E>>,
    {
        self.inner.read_page(user, db, load).await
    }

    pub async fn order_written(&self, order: OrderId, owner: UserId, version: i64, snapshot: Option<&Order>) {
        let inner = &self.inner;
        let snapshot = snapshot.filter(|o| o.order_id == order && o.version == version);
        let keys = EntryKeys::order(inner.redis.prefix(), order);
        let delivered = match inner.redis.conn().await {
            None => false,
            Some(conn) => {
                let mut pipe = redis::pipe();
                pipe.add_command(inner.entry_written_cmd(
                    &keys,
                    version,
                    snapshot.map(Order::encode),
                    &conn.tag,
                ))
                .add_command(inner.page_written_cmd(owner));
                inner
                    .redis
                    .query_pipe::<redis::Value>(&conn, &pipe)
                    .await
                    .is_some()
            }
        };
        if !delivered {
            metrics::counter!("orderly_cache_notices_total", "outcome" => "pending").increment(1);
            inner.pending.add(EntryKey::Order(order), version);
            inner.pending.add(EntryKey::Page(owner), 0);
        }
    }

    /// The cached order `id` if Redis holds it now (`Some(None)`: cached as absent); never
    /// loads or fills. For `eventual` reads, whose own loads may come from a lagging replica.
    pub async fn order_hit(&self, id: OrderId) -> Option<Option<Order>> {
        let inner = &self.inner;
        if inner.must_skip(EntryKey::Order(id)) {
            return None;
        }
        let conn = inner.redis.conn().await?;
        let raw: Option<Vec<u8>> = inner
            .redis
            .query(&conn, redis::cmd("GET").arg(order_key(inner.redis.prefix(), id)))
            .await?;
        let hit = entry_hit::<Order>(raw.as_deref()?, &conn.tag)?;
        count(EntryKey::Order(id), "hit");
        Some(hit)
    }

    pub async fn user_written(&self, user: &User) {
        let inner = &self.inner;
        let keys = EntryKeys::user(inner.redis.prefix(), user.user_id);
        let delivered = match inner.redis.conn().await {
            None => false,
            Some(conn) => {
                let cmd = inner.entry_written_cmd(&keys, USER_VERSION, Some(user.encode()), &conn.tag);
                inner.redis.query::<redis::Value>(&conn, &cmd).await.is_some()
            }
        };
        if !delivered {
            metrics::counter!("orderly_cache_notices_total", "outcome" => "pending").increment(1);
            inner.pending.add(EntryKey::User(user.user_id), USER_VERSION);
        }
    }

    pub fn health(&self) -> CacheHealth {
        if self.inner.redis.is_up() {
            CacheHealth::Up
        } else {
            CacheHealth::Degraded
        }
    }

    pub fn fill_gate(&self) -> &FillGate {
        &self.inner.gate
    }
}

impl Inner {
    // ---- reads ------------------------------------------------------------------------

    /// Whether a read of `key` must go to its loader without touching Redis (pending notice
    /// or purge). Starts the replay of pending notices when there are some.
    fn must_skip(self: &Arc<Self>, key: EntryKey) -> bool {
        if !self.pending.is_dirty() {
            return false;
        }
        self.schedule_recovery();
        self.pending.blocks(key)
    }

    async fn read_entry<T, E, F, Fut>(
        self: &Arc<Self>,
        keys: EntryKeys,
        db: DatabaseRef,
        flights: &Flights<FlightKey, Arc<Option<T>>>,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Entity,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        if self.must_skip(keys.key) {
            count(keys.key, "skipped");
            return load().await;
        }
        let Some(conn) = self.redis.conn().await else {
            count(keys.key, "skipped");
            return load().await;
        };
        // A hit costs one GET, like a bare read of the value. Only a miss reads the marker
        // (after the GET, so still after this read started), to choose its flight.
        match self
            .redis
            .query::<Option<Vec<u8>>>(&conn, redis::cmd("GET").arg(&keys.data))
            .await
        {
            None => return load().await,
            Some(Some(raw)) => {
                if let Some(hit) = entry_hit::<T>(&raw, &conn.tag) {
                    count(keys.key, "hit");
                    return Ok(hit);
                }
            }
            Some(None) => {}
        }
        let Some(marker) = self
            .redis
            .query::<Option<String>>(&conn, redis::cmd("GET").arg(&keys.marker))
            .await
        else {
            return load().await;
        };
        let shared = flights
            .run((keys.key, marker, conn.tag.clone()), || async {
                self.lead_entry::<T, E, F, Fut>(&keys, db, load)
                    .await
                    .map(Arc::new)
            })
            .await?;
        Ok((*shared).clone())
    }

    /// The flight leader of an entry: GET again, load, fill.
    ///
    /// Its load begins after every follower's miss began (a follower shares this flight only
    /// if it saw the same marker, which every write raises before it is acknowledged), so
    /// what it loads holds every write acknowledged before any of them.
    async fn lead_entry<T, E, F, Fut>(
        self: &Arc<Self>,
        keys: &EntryKeys,
        db: DatabaseRef,
        load: F,
    ) -> Result<Option<T>, E>
    where
        T: Entity,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let Some(conn) = self.redis.conn().await else {
            return load().await;
        };
        let token = lease_token();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&keys.lease)
            .arg(&token)
            .arg("PX")
            .arg(self.lease_ms())
            .ignore()
            .cmd("GET")
            .arg(&keys.data)
            .cmd("TIME");
        type Seen = (Option<Vec<u8>>, (i64, i64));
        let Some((raw, time)) = self.redis.query_pipe::<Seen>(&conn, &pipe).await else {
            return load().await;
        };
        if let Some(hit) = raw.as_deref().and_then(|r| entry_hit::<T>(r, &conn.tag)) {
            count(keys.key, "hit");
            return Ok(hit);
        }
        let deadline = self.deadline(time);
        let _permit = self.fills.acquire(db).await;
        let started = Instant::now();
        let loaded = load().await?;
        self.gate.pass(keys.key).await;
        let (version, payload, ttl) = match &loaded {
            Some(v) => (v.version(), v.encode(), self.ttl),
            None => (0, Vec::new(), self.absent_ttl),
        };
        if let Some(fill_conn) = self.fill_conn(keys.key, &conn.tag, started) {
            let mut cmd = evalsha(&self.scripts.fill_entry, &[&keys.data, &keys.marker, &keys.lease]);
            cmd.arg(version)
                .arg(&conn.tag)
                .arg(entry_value(version, &conn.tag, &payload))
                .arg(self.jittered_ms(ttl))
                .arg(deadline)
                .arg(&token);
            let outcome: Option<i64> = self.redis.query(&fill_conn, &cmd).await;
            tracing::trace!(key = %keys.data, ?outcome, "fill");
            count_fill(outcome);
        }
        Ok(loaded)
    }

    async fn read_page<E, F, Fut>(
        self: &Arc<Self>,
        user: UserId,
        db: DatabaseRef,
        load: F,
    ) -> Result<Vec<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Order>, E>>,
    {
        let key = EntryKey::Page(user);
        if self.must_skip(key) {
            count(key, "skipped");
            return load().await;
        }
        let Some(conn) = self.redis.conn().await else {
            count(key, "skipped");
            return load().await;
        };
        let (page, generation) = (
            page_key(self.redis.prefix(), user),
            generation_key(self.redis.prefix(), user),
        );
        let mut mget = redis::cmd("MGET");
        mget.arg(&page).arg(&generation);
        let seen = match self
            .redis
            .query::<(Option<Vec<u8>>, Option<String>)>(&conn, &mget)
            .await
        {
            None => return load().await,
            Some((Some(raw), seen)) => {
                if let Some(hit) = page_hit(&raw, &conn.tag) {
                    count(key, "hit");
                    return Ok(hit);
                }
                seen
            }
            Some((None, seen)) => seen,
        };
        let shared = self
            .pages
            .run((key, seen, conn.tag.clone()), || async {
                self.lead_page(key, db, &page, &generation, load)
                    .await
                    .map(Arc::new)
            })
            .await?;
        Ok((*shared).clone())
    }

    /// The flight leader of a page: MGET again (noting the generation), load, fill.
    async fn lead_page<E, F, Fut>(
        self: &Arc<Self>,
        key: EntryKey,
        db: DatabaseRef,
        page: &str,
        generation: &str,
        load: F,
    ) -> Result<Vec<Order>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Order>, E>>,
    {
        let Some(conn) = self.redis.conn().await else {
            return load().await;
        };
        let EntryKey::Page(user) = key else {
            return load().await;
        };
        let lease = page_lease_key(self.redis.prefix(), user);
        let token = lease_token();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&lease)
            .arg(&token)
            .arg("PX")
            .arg(self.lease_ms())
            .ignore()
            .cmd("MGET")
            .arg(page)
            .arg(generation)
            .cmd("TIME");
        type Seen = ((Option<Vec<u8>>, Option<String>), (i64, i64));
        let Some(((raw, seen), time)) = self.redis.query_pipe::<Seen>(&conn, &pipe).await else {
            return load().await;
        };
        if let Some(hit) = raw.as_deref().and_then(|r| page_hit(r, &conn.tag)) {
            count(key, "hit");
            return Ok(hit);
        }
        let seen = seen.unwrap_or_else(|| "0".to_owned());
        let deadline = self.deadline(time);
        let _permit = self.fills.acquire(db).await;
        let started = Instant::now();
        let loaded = load().await?;
        self.gate.pass(key).await;
        if let Some(fill_conn) = self.fill_conn(key, &conn.tag, started) {
            let mut cmd = evalsha(&self.scripts.fill_page, &[page, generation, &lease]);
            cmd.arg(&seen)
                .arg(page_value(&conn.tag, &codec::encode_page(&loaded)))
                .arg(self.jittered_ms(self.page_ttl))
                .arg(deadline)
                .arg(&token);
            let outcome: Option<i64> = self.redis.query(&fill_conn, &cmd).await;
            tracing::trace!(key = %page, ?outcome, "page fill");
            count_fill(outcome);
        }
        Ok(loaded)
    }

    /// The connection to fill `key` over, or `None` to drop the fill: the lease has run out,
    /// a notice of the key is pending, or the server is no longer the one the read saw.
    fn fill_conn(&self, key: EntryKey, read_tag: &str, started: Instant) -> Option<Arc<Conn>> {
        if started.elapsed() > self.fill_lease {
            tracing::debug!(?key, "fill dropped: its load outlived the fill lease");
            return None;
        }
        if self.pending.blocks(key) || !self.redis.is_up() {
            return None;
        }
        let conn = self.redis.current()?;
        if conn.tag != read_tag {
            tracing::debug!(?key, "fill dropped: Redis restarted since the read");
            return None;
        }
        Some(conn)
    }

    /// How long a fill lease lives: past the fill's own deadline (the lease counted from the
    /// read), so a lease never expires before a fill that may still land.
    fn lease_ms(&self) -> u64 {
        (self.fill_lease.as_millis() as u64).saturating_mul(2).max(1)
    }

    /// The Redis-clock deadline (µs) of a fill whose read saw Redis `TIME` = `time`.
    fn deadline(&self, (secs, micros): (i64, i64)) -> i64 {
        secs.saturating_mul(1_000_000)
            .saturating_add(micros)
            .saturating_add(self.fill_lease.as_micros() as i64)
    }

    /// `ttl` in milliseconds, shortened by a random 0..=`ttl_jitter_percent` percent.
    fn jittered_ms(&self, ttl: Duration) -> u64 {
        let ms = ttl.as_millis() as u64;
        let max_cut = ms * u64::from(self.jitter_percent) / 100;
        let cut = if max_cut == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=max_cut)
        };
        (ms - cut).max(1)
    }

    // ---- write notices ----------------------------------------------------------------

    fn entry_written_cmd(&self, keys: &EntryKeys, version: i64, payload: Option<Vec<u8>>, tag: &str) -> Cmd {
        let mut cmd = evalsha(&self.scripts.entry_written, &[&keys.data, &keys.marker]);
        let value = payload.map(|p| entry_value(version, tag, &p)).unwrap_or_default();
        cmd.arg(version)
            .arg(self.marker.as_millis() as u64)
            .arg(tag)
            .arg(value)
            .arg(self.jittered_ms(self.ttl));
        cmd
    }

    fn page_written_cmd(&self, user: UserId) -> Cmd {
        let (page, generation) = (
            page_key(self.redis.prefix(), user),
            generation_key(self.redis.prefix(), user),
        );
        let mut cmd = evalsha(&self.scripts.page_written, &[&page, &generation]);
        cmd.arg(GENERATION_TTL_MS);
        cmd
    }

    // ---- recovery ---------------------------------------------------------------------

    /// Starts replaying pending notices (and the purge) in the background, unless that is
    /// already under way or Redis is still skipped. The task reconnects (probes) when the
    /// breaker allows it: reads of pending keys do not touch Redis, so they would never
    /// probe themselves.
    fn schedule_recovery(self: &Arc<Self>) {
        if !self.pending.is_dirty() || self.redis.is_skipped() {
            return;
        }
        let Ok(guard) = self.replay.clone().try_lock_owned() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            me.recover().await;
            drop(guard);
        });
    }

    async fn recover(self: &Arc<Self>) {
        loop {
            let Some(conn) = self.redis.conn().await else {
                return;
            };
            if let Some(seq) = self.pending.purge_requested() {
                if !self.purge(&conn).await {
                    return;
                }
                tracing::info!("cache purged after too many undelivered invalidations");
                self.pending.purged(seq);
                continue;
            }
            let batch = self.pending.batch(REPLAY_BATCH);
            if batch.is_empty() {
                return;
            }
            let mut pipe = redis::pipe();
            for &(key, version, _) in &batch {
                let cmd = match key {
                    EntryKey::Order(id) => self.entry_written_cmd(
                        &EntryKeys::order(self.redis.prefix(), id),
                        version,
                        None,
                        &conn.tag,
                    ),
                    EntryKey::User(id) => self.entry_written_cmd(
                        &EntryKeys::user(self.redis.prefix(), id),
                        version,
                        None,
                        &conn.tag,
                    ),
                    EntryKey::Page(user) => self.page_written_cmd(user),
                };
                pipe.add_command(cmd).ignore();
            }
            if self.redis.query_pipe::<()>(&conn, &pipe).await.is_none() {
                return;
            }
            tracing::debug!(count = batch.len(), "replayed cache invalidations");
            self.pending.delivered(&batch);
        }
    }

    /// Unlinks every entry (not markers or generations) under the prefix.
    async fn purge(&self, conn: &Arc<Conn>) -> bool {
        let pattern = format!("{}*", glob_escape(self.redis.prefix()));
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(PURGE_SCAN_COUNT);
            let Some((next, keys)) = self.redis.query::<(u64, Vec<Vec<u8>>)>(conn, &scan).await else {
                return false;
            };
            let entries: Vec<Vec<u8>> = keys.into_iter().filter(|k| is_entry_key(k)).collect();
            if !entries.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(entries);
                if self.redis.query::<i64>(conn, &unlink).await.is_none() {
                    return false;
                }
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::cache::codec::sample_order;

    #[test]
    fn keys_share_one_hash_tag_per_script() {
        let o = OrderId::new(42).unwrap();
        assert_eq!(order_key("p:", o), "p:{o:42}:d");
        assert_eq!(order_marker_key("p:", o), "p:{o:42}:w");
        let u = UserId::new(7).unwrap();
        assert_eq!(user_key("p:", u), "p:{u:7}:p");
        assert_eq!(user_marker_key("p:", u), "p:{u:7}:w");
        assert_eq!(page_key("p:", u), "p:{u:7}:l");
        assert_eq!(generation_key("p:", u), "p:{u:7}:g");
        assert!(is_entry_key(b"p:{u:7}:l") && !is_entry_key(b"p:{u:7}:g"));
    }

    #[test]
    fn an_entry_is_a_hit_only_under_its_own_tag() {
        let o = sample_order(5, 9, 3);
        let raw = entry_value(3, "abcdefabcdef", &o.encode());
        assert_eq!(entry_hit::<Order>(&raw, "abcdefabcdef"), Some(Some(o.clone())));
        assert_eq!(entry_hit::<Order>(&raw, "000000000000"), None);
        let absent = entry_value(0, "abcdefabcdef", &[]);
        assert_eq!(entry_hit::<Order>(&absent, "abcdefabcdef"), Some(None));
        // The version in front must be the order's.
        let lying = entry_value(4, "abcdefabcdef", &o.encode());
        assert_eq!(entry_hit::<Order>(&lying, "abcdefabcdef"), None);
        assert_eq!(entry_hit::<Order>(b"garbage", "abcdefabcdef"), None);
        let page = page_value("abcdefabcdef", &codec::encode_page(std::slice::from_ref(&o)));
        assert_eq!(page_hit(&page, "abcdefabcdef"), Some(vec![o]));
        assert_eq!(page_hit(&page, "abcdefabcdeX"), None);
    }

    #[test]
    fn pending_keeps_a_key_added_again_during_its_replay() {
        let p = Pending::new(10);
        let k = EntryKey::Order(OrderId::new(1).unwrap());
        p.add(k, 2);
        let batch = p.batch(10);
        p.add(k, 3);
        p.delivered(&batch);
        assert!(p.blocks(k));
        let batch = p.batch(10);
        assert_eq!(batch[0].1, 3);
        p.delivered(&batch);
        assert!(!p.blocks(k) && !p.is_dirty());
    }

    #[test]
    fn pending_overflow_turns_into_a_purge() {
        let p = Pending::new(2);
        for i in 1..=3 {
            p.add(EntryKey::Order(OrderId::new(i).unwrap()), 1);
        }
        let other = EntryKey::User(UserId::new(1).unwrap());
        assert!(p.blocks(other), "a purge blocks every key");
        let seq = p.purge_requested().unwrap();
        p.purged(seq);
        assert!(!p.blocks(other) && !p.is_dirty());
    }

    #[test]
    fn glob_characters_of_the_prefix_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
