//! The cart store: carts in Redis, written behind to MySQL (see [`crate::service::cart`]).
//! [`CartStore`] runs its scripts over the shared connection ([`Redis`]: its timeouts and
//! breaker; every call answers `None` when Redis does not answer).
//!
//! Keys (one hash tag per bucket of users, `{ct:<bucket>}`, so that a change script touches
//! its cart and its bucket's dirty set in one slot, and the flusher reads a bucket's carts
//! from one slot):
//!
//! | key                             | holds                                                   |
//! |---------------------------------|---------------------------------------------------------|
//! | `{prefix}{ct:<b>}:c:<user_id>`  | the cart: `_v` version, `_c` last checkouts, product → quantity |
//! | `{prefix}{ct:<b>}:dirty`        | sorted set: user → the version of their last unflushed change |
//!
//! Every change script checks that the cart is there (a cart that is not was never loaded, or
//! was evicted, or Redis restarted empty: the service reads it back from MySQL first, so a
//! change never starts from a blank cart), changes it, bumps `_v` and sets the user's score
//! in the dirty set to the new version, in one script. The flusher removes a user from the
//! dirty set only if the score is still the version it wrote ([`scripts::CLEAN`]), so a
//! change racing a flush stays dirty.

use std::collections::BTreeMap;
use std::sync::Arc;

use redis::Script;

use super::{evalsha, Redis};
use crate::domain::cart::{parse_checkouts, Cart, StoredCart};
use crate::domain::ids::{OrderId, ProductId, UserId};
use crate::domain::order::{NewLine, MAX_LINES};

/// Buckets of users, each a hash tag with its own dirty set. 16 spread the carts over 16
/// slots (nodes of a Redis Cluster) while the flusher reads them all in two round trips.
pub const CART_BUCKETS: i64 = 16;

/// A cart lives this long in Redis after its last change or load. A dirty cart is flushed
/// within a loss window (a second), so only clean carts ever expire: a week keeps every
/// active buyer's cart in memory and lets abandoned ones go (MySQL keeps them).
const CART_TTL_MS: u64 = 7 * 86_400_000;

pub fn bucket_of(user: UserId) -> i64 {
    user.get().rem_euclid(CART_BUCKETS)
}

/// Redis key of `user`'s cart.
pub fn cart_key(prefix: &str, user: UserId) -> String {
    format!("{prefix}{{ct:{}}}:c:{user}", bucket_of(user))
}

/// Redis key of a bucket's dirty set.
pub fn dirty_key(prefix: &str, bucket: i64) -> String {
    format!("{prefix}{{ct:{bucket}}}:dirty")
}

/// What a change script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartWrite {
    /// The cart after the change (or unchanged, when the change changed nothing).
    Done(StoredCart),
    /// No cart in Redis: load it from MySQL, fill, try again.
    Missing,
    /// A new line would pass the line limit.
    TooManyLines,
}

/// A dirty cart as the flusher read it: the user, the score it had in the dirty set, and the
/// cart (`None`: the key is gone, evicted or expired before its flush).
#[derive(Debug, Clone)]
pub struct DirtyCart {
    pub user: UserId,
    pub score: i64,
    pub cart: Option<StoredCart>,
}

/// Parses `HGETALL` pairs. `None`: no cart (no `_v`) or a malformed one.
fn parse_hash(pairs: &[String]) -> Option<StoredCart> {
    let mut version = None;
    let mut checkouts = Vec::new();
    let mut lines = BTreeMap::new();
    for kv in pairs.chunks_exact(2) {
        match kv[0].as_str() {
            "_v" => version = kv[1].parse().ok(),
            "_c" => checkouts = parse_checkouts(&kv[1])?,
            p => {
                lines.insert(ProductId::parse(p)?, kv[1].parse().ok()?);
            }
        }
    }
    Some(StoredCart {
        version: version?,
        cart: Cart { lines, checkouts },
    })
}

fn parse_write(answer: &[String]) -> CartWrite {
    match answer.first().map(String::as_str) {
        Some("ok") => match parse_hash(&answer[1..]) {
            Some(c) => CartWrite::Done(c),
            None => CartWrite::Missing,
        },
        Some("full") => CartWrite::TooManyLines,
        _ => CartWrite::Missing,
    }
}

/// The carts in Redis; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct CartStore {
    redis: Redis,
    scripts: Arc<Scripts>,
}

struct Scripts {
    set: Script,
    clear: Script,
    check_out: Script,
    fill: Script,
    clean: Script,
    drop_older: Script,
}

/// The cart scripts, loaded by every new connection (see [`crate::redis`]).
pub(crate) const SCRIPTS: [&str; 6] = [
    scripts::SET,
    scripts::CLEAR,
    scripts::CHECK_OUT,
    scripts::FILL,
    scripts::CLEAN,
    scripts::DROP_OLDER,
];

impl CartStore {
    pub fn new(redis: Redis) -> CartStore {
        CartStore {
            redis,
            scripts: Arc::new(Scripts {
                set: Script::new(scripts::SET),
                clear: Script::new(scripts::CLEAR),
                check_out: Script::new(scripts::CHECK_OUT),
                fill: Script::new(scripts::FILL),
                clean: Script::new(scripts::CLEAN),
                drop_older: Script::new(scripts::DROP_OLDER),
            }),
        }
    }

    /// The cart of `user` as Redis holds it. `None`: Redis does not answer; `Some(None)`: no
    /// cart there.
    pub async fn get(&self, user: UserId) -> Option<Option<StoredCart>> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let pairs: Vec<String> = redis
            .query(&conn, redis::cmd("HGETALL").arg(cart_key(redis.prefix(), user)))
            .await?;
        Some(parse_hash(&pairs))
    }

    /// Puts a cart read from MySQL into Redis, unless one is there already (a change or
    /// another fill got there first: that one is as new or newer). Not dirty: MySQL has it.
    pub async fn fill(&self, user: UserId, stored: &StoredCart) -> Option<()> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let [cart, dirty] = self.keys(user);
        let mut cmd = evalsha(&self.scripts.fill, &[&cart, &dirty]);
        cmd.arg(user.get())
            .arg(stored.version)
            .arg(stored.cart.checkouts_text())
            .arg(CART_TTL_MS);
        for (p, q) in &stored.cart.lines {
            cmd.arg(p.get()).arg(*q);
        }
        redis.query::<i64>(&conn, &cmd).await.map(|_| ())
    }

    fn keys(&self, user: UserId) -> [String; 2] {
        let prefix = self.redis.prefix();
        [cart_key(prefix, user), dirty_key(prefix, bucket_of(user))]
    }

    async fn change(
        &self,
        script: &redis::Script,
        user: UserId,
        args: impl FnOnce(&mut redis::Cmd),
    ) -> Option<CartWrite> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let [cart, dirty] = self.keys(user);
        let mut cmd = evalsha(script, &[&cart, &dirty]);
        cmd.arg(user.get()).arg(CART_TTL_MS);
        args(&mut cmd);
        let answer: Vec<String> = redis.query(&conn, &cmd).await?;
        Some(parse_write(&answer))
    }

    /// Sets one line (0 removes it). `None`: Redis does not answer.
    pub async fn set(&self, user: UserId, product: ProductId, quantity: i64) -> Option<CartWrite> {
        let script = &self.scripts.set;
        self.change(script, user, |c| {
            c.arg(product.get()).arg(quantity).arg(MAX_LINES);
        })
        .await
    }

    /// Empties the cart.
    pub async fn clear(&self, user: UserId) -> Option<CartWrite> {
        let script = &self.scripts.clear;
        self.change(script, user, |_| {}).await
    }

    /// Removes what `order` bought, once per order (see [`Cart::check_out`]).
    pub async fn check_out(&self, user: UserId, order: OrderId, bought: &[NewLine]) -> Option<CartWrite> {
        let script = &self.scripts.check_out;
        self.change(script, user, |c| {
            c.arg(order.get()).arg(crate::domain::cart::KEPT_CHECKOUTS);
            for l in bought {
                c.arg(l.product_id.get()).arg(l.quantity);
            }
        })
        .await
    }

    /// Drops the Redis copy of `user`'s cart if it is older than `version` (MySQL holds a
    /// newer one, written while Redis did not answer): the next read loads MySQL's.
    pub async fn drop_older(&self, user: UserId, version: i64) -> Option<bool> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let [cart, dirty] = self.keys(user);
        let mut cmd = evalsha(&self.scripts.drop_older, &[&cart, &dirty]);
        cmd.arg(user.get()).arg(version);
        redis.query::<i64>(&conn, &cmd).await.map(|n| n == 1)
    }

    /// [`Self::drop_older`] for many carts in one round trip; whether each was dropped.
    pub async fn drop_older_many(&self, carts: &[(UserId, i64)]) -> Option<Vec<bool>> {
        if carts.is_empty() {
            return Some(Vec::new());
        }
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let mut pipe = redis::pipe();
        for &(user, version) in carts {
            let [cart, dirty] = self.keys(user);
            let mut cmd = evalsha(&self.scripts.drop_older, &[&cart, &dirty]);
            cmd.arg(user.get()).arg(version);
            pipe.add_command(cmd);
        }
        let answers: Vec<i64> = redis.query_pipe(&conn, &pipe).await?;
        Some(answers.into_iter().map(|n| n == 1).collect())
    }

    /// Up to `batch` dirty carts of every bucket, lowest score first, with their content:
    /// two round trips (the dirty sets, then the carts). Answers per bucket.
    pub async fn dirty(&self, batch: usize) -> Option<Vec<Vec<DirtyCart>>> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let mut pipe = redis::pipe();
        for b in 0..CART_BUCKETS {
            pipe.cmd("ZRANGE")
                .arg(dirty_key(redis.prefix(), b))
                .arg(0)
                .arg(batch.saturating_sub(1))
                .arg("WITHSCORES");
        }
        let sets: Vec<Vec<(String, f64)>> = redis.query_pipe(&conn, &pipe).await?;
        let mut members: Vec<Vec<(UserId, i64)>> = Vec::with_capacity(sets.len());
        let mut pipe = redis::pipe();
        for set in sets {
            let mut bucket = Vec::with_capacity(set.len());
            for (m, score) in set {
                // A member that is no user id cannot come from our scripts: skipped.
                if let Some(user) = m.parse().ok().and_then(UserId::new) {
                    pipe.cmd("HGETALL").arg(cart_key(redis.prefix(), user));
                    bucket.push((user, score as i64));
                }
            }
            members.push(bucket);
        }
        if members.iter().all(Vec::is_empty) {
            return Some(members.into_iter().map(|_| Vec::new()).collect());
        }
        let carts: Vec<Vec<String>> = redis.query_pipe(&conn, &pipe).await?;
        let mut carts = carts.into_iter();
        Some(
            members
                .into_iter()
                .map(|bucket| {
                    bucket
                        .into_iter()
                        .map(|(user, score)| DirtyCart {
                            user,
                            score,
                            cart: carts.next().and_then(|pairs| parse_hash(&pairs)),
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// These carts were written at these versions: each user leaves the dirty set if its
    /// score is still that version (a later change keeps it there).
    pub async fn clean(&self, done: &[(UserId, i64)]) -> Option<()> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let mut by_bucket: BTreeMap<i64, Vec<(UserId, i64)>> = BTreeMap::new();
        for &(u, v) in done {
            by_bucket.entry(bucket_of(u)).or_default().push((u, v));
        }
        let mut pipe = redis::pipe();
        for (b, pairs) in by_bucket {
            let mut cmd = evalsha(&self.scripts.clean, &[&dirty_key(redis.prefix(), b)]);
            for (u, v) in pairs {
                cmd.arg(u.get()).arg(v);
            }
            pipe.add_command(cmd).ignore();
        }
        redis.query_pipe::<()>(&conn, &pipe).await
    }
}

/// The cart scripts. Change scripts take KEYS cart, dirty and ARGV[1] user, ARGV[2] TTL ms,
/// then their own; they answer `ok` and the cart's `HGETALL`, `missing`, or `full`.
mod scripts {
    /// ARGV[3] product, ARGV[4] quantity (0 removes), ARGV[5] line limit.
    pub const SET: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local cur = redis.call('HGET', KEYS[1], ARGV[3])
local q = tonumber(ARGV[4])
local changed = false
if q == 0 then
  if cur then redis.call('HDEL', KEYS[1], ARGV[3]); changed = true end
elseif cur ~= ARGV[4] then
  if not cur then
    local n = redis.call('HLEN', KEYS[1]) - 1 - redis.call('HEXISTS', KEYS[1], '_c')
    if n >= tonumber(ARGV[5]) then return {'full'} end
  end
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
  changed = true
end
if changed then
  local v = redis.call('HINCRBY', KEYS[1], '_v', 1)
  redis.call('ZADD', KEYS[2], v, ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local r = redis.call('HGETALL', KEYS[1])
table.insert(r, 1, 'ok')
return r
";

    /// No arguments of its own. Keeps `_c` (the checkouts).
    pub const CLEAR: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local v = redis.call('HGET', KEYS[1], '_v')
local c = redis.call('HGET', KEYS[1], '_c')
local n = redis.call('HLEN', KEYS[1]) - 1 - (c and 1 or 0)
if n > 0 then
  redis.call('DEL', KEYS[1])
  v = tonumber(v) + 1
  redis.call('HSET', KEYS[1], '_v', v)
  if c then redis.call('HSET', KEYS[1], '_c', c) end
  redis.call('ZADD', KEYS[2], v, ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local r = redis.call('HGETALL', KEYS[1])
table.insert(r, 1, 'ok')
return r
";

    /// ARGV[3] order id, ARGV[4] checkouts kept, then (product, quantity bought) pairs.
    pub const CHECK_OUT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local ids = {}
for id in string.gmatch(redis.call('HGET', KEYS[1], '_c') or '', '%d+') do
  if id == ARGV[3] then
    local r = redis.call('HGETALL', KEYS[1])
    table.insert(r, 1, 'ok')
    return r
  end
  ids[#ids + 1] = id
end
for i = 5, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local left = tonumber(cur) - tonumber(ARGV[i + 1])
    if left > 0 then redis.call('HSET', KEYS[1], ARGV[i], left) else redis.call('HDEL', KEYS[1], ARGV[i]) end
  end
end
ids[#ids + 1] = ARGV[3]
while #ids > tonumber(ARGV[4]) do table.remove(ids, 1) end
redis.call('HSET', KEYS[1], '_c', table.concat(ids, ','))
local v = redis.call('HINCRBY', KEYS[1], '_v', 1)
redis.call('ZADD', KEYS[2], v, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local r = redis.call('HGETALL', KEYS[1])
table.insert(r, 1, 'ok')
return r
";

    /// KEYS cart, dirty. ARGV[1] user, ARGV[2] version, ARGV[3] checkouts, ARGV[4] TTL ms,
    /// then (product, quantity) pairs. Returns 1 filled, 0 a cart was there.
    ///
    /// The version starts at least at the user's score in the dirty set (a cart evicted
    /// before its flush leaves one): the next change then scores above it, so a flusher that
    /// saw the evicted cart's score cannot clean the new change's mark.
    pub const FILL: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local v = tonumber(ARGV[2])
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if s and tonumber(s) > v then v = tonumber(s) end
redis.call('HSET', KEYS[1], '_v', v)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], '_c', ARGV[3]) end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

    /// KEYS dirty. ARGV (user, version) pairs: each user whose score is still that version
    /// leaves the set.
    pub const CLEAN: &str = r"
local n = 0
for i = 1, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
";

    /// KEYS cart, dirty. ARGV[1] user, ARGV[2] version MySQL holds. Drops the cart and its
    /// dirty mark if the cart is older. Returns 1 dropped, 0 kept.
    pub const DROP_OLDER: &str = r"
local v = redis.call('HGET', KEYS[1], '_v')
if v and tonumber(v) >= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if s and tonumber(s) < tonumber(ARGV[2]) then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cart_and_its_dirty_set_share_one_hash_tag() {
        let u = UserId::new(12345).unwrap();
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
        assert_eq!(tag(&cart_key("p:", u)), tag(&dirty_key("p:", bucket_of(u))));
        assert_ne!(
            tag(&cart_key("p:", u)),
            tag(&cart_key("p:", UserId::new(12346).unwrap()))
        );
    }

    #[test]
    fn hashes_parse_into_carts() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let c = parse_hash(&s(&["_v", "3", "7", "2", "_c", "11,12", "5", "1"])).unwrap();
        assert_eq!(c.version, 3);
        assert_eq!(c.cart.lines.len(), 2);
        assert_eq!(c.cart.checkouts.len(), 2);
        assert_eq!(parse_hash(&[]), None, "no cart");
        assert_eq!(parse_write(&s(&["full"])), CartWrite::TooManyLines);
        assert_eq!(parse_write(&s(&["missing"])), CartWrite::Missing);
    }
}
