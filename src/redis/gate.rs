//! The flash-sale gate: a sale's remaining units, its buyers' units and the orders that took
//! units, in Redis, so that most buyers of a sold-out sale are answered without MySQL.
//! [`FlashGate`] runs its scripts over the shared connection ([`Redis`]: its timeouts and
//! breaker; a Redis that does not answer is [`GateAnswer::Unavailable`]).
//!
//! Keys (one hash tag per sale, `{fs:<sale_id>}`, so every script touches one slot):
//!
//! | key                      | holds                                                  |
//! |--------------------------|--------------------------------------------------------|
//! | `{prefix}{fs:<id>}:m`    | meta hash: `starts`, `ends` (ms since the epoch), `limit` |
//! | `{prefix}{fs:<id>}:left` | units left                                             |
//! | `{prefix}{fs:<id>}:b`    | hash: buyer → units taken                              |
//! | `{prefix}{fs:<id>}:o`    | hash: order id → `<buyer>:<units>`                     |
//! | `{prefix}{fs:<id>}:s`    | set: every order id that ever took units of the sale   |
//!
//! [`scripts::TAKE`] checks the window (Redis time), the units left and the buyer's
//! limit, and takes the units, once per order id (a retried create finds its order there).
//! A refused order id the sale has seen before (a replay of an order since closed, or one
//! made while the gate was down and rebuilt since) is answered `Known`: the caller takes the
//! database path, which knows what that id did. So a refusal never needs MySQL, and a replay
//! is never refused.
//! [`scripts::GIVE_BACK`] returns an order's units once (it removes the order).
//! The database stays the truth: [`scripts::REBUILD`] replaces the whole gate with a
//! state read from MySQL (on start, when a take finds no gate, and periodically). Redis keeps
//! nothing on disk for the gate; a gate that is gone is rebuilt, one that is behind only lets
//! a few more buyers through to the database, which refuses them.

use std::sync::Arc;

use redis::Script;

use super::{evalsha, Redis};
use crate::domain::flash::FlashSale;
use crate::domain::ids::{FlashSaleId, OrderId, UserId};

/// What the gate said to a buyer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAnswer {
    /// Units taken for this order now.
    Took,
    /// This order took its units before (a retried create).
    Already,
    /// Fewer units left than asked for.
    SoldOut,
    /// The buyer's units would pass the sale's per-user limit.
    OverLimit,
    /// Outside the sale's window (Redis's clock).
    Closed,
    /// No units for this order now, but the sale has seen this order id before: let the
    /// database decide (a replay is answered as it was).
    Known,
    /// No gate for this sale in Redis (never built, or Redis restarted empty): rebuild it;
    /// meanwhile the database decides.
    Missing,
    /// Redis does not answer: the database decides.
    Unavailable,
}

fn keys(prefix: &str, sale: FlashSaleId) -> [String; 5] {
    ["m", "left", "b", "o", "s"].map(|k| format!("{prefix}{{fs:{sale}}}:{k}"))
}

/// How long a gate outlives its sale's end: late give-backs still find it, then it goes.
const GATE_AFTER_END_MS: i64 = 3_600_000;

/// The flash-sale gates of every sale; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct FlashGate {
    redis: Redis,
    scripts: Arc<Scripts>,
}

struct Scripts {
    take: Script,
    give_back: Script,
    rebuild: Script,
}

/// The gate's scripts, loaded by every new connection (see [`crate::redis`]).
pub(crate) const SCRIPTS: [&str; 3] = [scripts::TAKE, scripts::GIVE_BACK, scripts::REBUILD];

impl FlashGate {
    pub fn new(redis: Redis) -> FlashGate {
        FlashGate {
            redis,
            scripts: Arc::new(Scripts {
                take: Script::new(scripts::TAKE),
                give_back: Script::new(scripts::GIVE_BACK),
                rebuild: Script::new(scripts::REBUILD),
            }),
        }
    }

    /// Takes `units` of `sale` for `order` (see [`scripts::TAKE`]).
    pub async fn take(&self, sale: FlashSaleId, order: OrderId, user: UserId, units: i64) -> GateAnswer {
        let redis = &self.redis;
        let Some(conn) = redis.conn().await else {
            return GateAnswer::Unavailable;
        };
        let k = keys(redis.prefix(), sale);
        let mut cmd = evalsha(&self.scripts.take, &[&k[0], &k[1], &k[2], &k[3], &k[4]]);
        cmd.arg(order.get()).arg(user.get()).arg(units);
        match redis.query::<i64>(&conn, &cmd).await {
            None => GateAnswer::Unavailable,
            Some(1) => GateAnswer::Took,
            Some(2) => GateAnswer::Already,
            Some(3) => GateAnswer::Known,
            Some(0) => GateAnswer::SoldOut,
            Some(-1) => GateAnswer::OverLimit,
            Some(-2) => GateAnswer::Closed,
            Some(_) => GateAnswer::Missing,
        }
    }

    /// Returns `order`'s units to the gate, if the gate holds them. `None`: Redis did not
    /// answer (the next rebuild sets the gate right).
    pub async fn give_back(&self, sale: FlashSaleId, order: OrderId) -> Option<bool> {
        let redis = &self.redis;
        let conn = redis.conn().await?;
        let k = keys(redis.prefix(), sale);
        let mut cmd = evalsha(&self.scripts.give_back, &[&k[0], &k[1], &k[2], &k[3], &k[4]]);
        cmd.arg(order.get());
        redis.query::<i64>(&conn, &cmd).await.map(|n| n == 1)
    }

    /// Replaces the gate of `sale` with `left` units, these buyers' units, these live orders
    /// and these order ids seen by the sale (live or given back).
    pub async fn rebuild(
        &self,
        sale: &FlashSale,
        left: i64,
        buyers: &[(UserId, i64)],
        orders: &[(OrderId, UserId, i64)],
        seen: &[OrderId],
    ) -> bool {
        let redis = &self.redis;
        let Some(conn) = redis.conn().await else {
            return false;
        };
        let k = keys(redis.prefix(), sale.sale_id);
        let ends = sale.ended_at.map_or(sale.ends_at, |e| e.min(sale.ends_at));
        let mut cmd = evalsha(&self.scripts.rebuild, &[&k[0], &k[1], &k[2], &k[3], &k[4]]);
        cmd.arg(sale.starts_at.timestamp_millis())
            .arg(ends.timestamp_millis())
            .arg(sale.per_user_limit)
            .arg(left.max(0))
            .arg(ends.timestamp_millis() + GATE_AFTER_END_MS)
            .arg(buyers.len())
            .arg(seen.len());
        for (user, units) in buyers {
            cmd.arg(user.get()).arg(*units);
        }
        for order in seen {
            cmd.arg(order.get());
        }
        for (order, user, units) in orders {
            cmd.arg(order.get()).arg(format!("{user}:{units}"));
        }
        redis.query::<i64>(&conn, &cmd).await.is_some()
    }
}

/// The gate's scripts.
mod scripts {
    /// KEYS meta, left, buyers, orders, seen. ARGV[1] order, ARGV[2] buyer, ARGV[3] units.
    /// Returns 1 took, 2 already taken by this order, 3 refused but seen before, 0 sold out,
    /// -1 over the buyer's limit, -2 outside the window, -3 no gate.
    pub const TAKE: &str = r"
local meta = redis.call('HMGET', KEYS[1], 'starts', 'ends', 'limit')
if not meta[1] then return -3 end
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then return 2 end
local refuse = function(code)
  if redis.call('SISMEMBER', KEYS[5], ARGV[1]) == 1 then return 3 end
  return code
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(meta[1]) or now >= tonumber(meta[2]) then return refuse(-2) end
local units = tonumber(ARGV[3])
local left = tonumber(redis.call('GET', KEYS[2]) or '0')
if left < units then return refuse(0) end
local mine = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
if mine + units > tonumber(meta[3]) then return refuse(-1) end
redis.call('DECRBY', KEYS[2], units)
redis.call('HINCRBY', KEYS[3], ARGV[2], units)
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('SADD', KEYS[5], ARGV[1])
return 1
";

    /// KEYS meta, left, buyers, orders, seen. ARGV[1] order. Returns 1 given back, 0 not held.
    /// The order stays seen.
    pub const GIVE_BACK: &str = r"
local v = redis.call('HGET', KEYS[4], ARGV[1])
if not v then return 0 end
local buyer, units = string.match(v, '^(%d+):(%d+)$')
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], units) end
local mine = redis.call('HINCRBY', KEYS[3], buyer, -tonumber(units))
if mine <= 0 then redis.call('HDEL', KEYS[3], buyer) end
return 1
";

    /// KEYS meta, left, buyers, orders, seen. ARGV[1] starts ms, ARGV[2] ends ms, ARGV[3]
    /// limit, ARGV[4] units left, ARGV[5] expiry (ms since the epoch), ARGV[6] number of
    /// buyers, ARGV[7] number of seen orders, then that many (buyer, units) pairs, then the
    /// seen order ids, then (order, '<buyer>:<units>') pairs of the live orders.
    pub const REBUILD: &str = r"
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[1], 'starts', ARGV[1], 'ends', ARGV[2], 'limit', ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
local i = 8
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for _ = 1, tonumber(ARGV[7]) do
  redis.call('SADD', KEYS[5], ARGV[i])
  i = i + 1
end
while i < #ARGV do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  redis.call('SADD', KEYS[5], ARGV[i])
  i = i + 2
end
for j = 1, 5 do redis.call('PEXPIREAT', KEYS[j], ARGV[5]) end
return 1
";
}
