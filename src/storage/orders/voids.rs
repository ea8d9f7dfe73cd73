//! Void order ids: a late create never lands after its stock went back.
//!
//! The sweeper may give back the reservation of an order it did not find; a create whose
//! shard commit is merely slow must then never commit. Both sides use the shard's void table
//! in a Dekker-style handshake, each writing its own row first and then reading the other's
//! with a locking read, inside one shard transaction (both transactions run in the door,
//! [`super::commit`]; the locking reads are here):
//! - a create (`OrderWrite::Create`) inserts the order row (and its lines), then reads the
//!   void row `LOCK IN SHARE MODE` ([`is_void_locked`]); if the id is void it rolls back
//!   ([`super::NotWritten::Voided`]).
//! - [`super::void_unless_written`] inserts the void row, then reads the order row
//!   `FOR UPDATE` ([`written_hash_locked`]); if the order is there it rolls back, otherwise it
//!   commits the void.
//!
//! Whichever read comes second waits for the other transaction's row lock, so it sees the
//! other side's outcome: either the order commits and the sweeper finds it, or the void
//! commits and the create finds it; never both absent, never both present. (Racing reads
//! that wait on each other are a deadlock: InnoDB rolls one side back, and either outcome
//! is safe.) The sweeper's session has short lock-wait timeouts ([`sweeper_connection`]),
//! so an order whose commit is stalled makes it skip the claim, never return it.

use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::ids::OrderId;
use crate::storage::shards::ShardTables;
use crate::storage::Result;

/// How long the sweeper waits for a row lock (InnoDB) or a metadata or backup lock (the
/// server) before it gives up on a claim. An order insert holding the row is a create whose
/// commit is in flight; normally that takes milliseconds, so seconds mean the shard server
/// is stalled, and the claim is better left for the next step than waited on (the server
/// default is 50 s for row locks and a year for the others).
pub const SWEEPER_LOCK_WAIT_SECS: u32 = 5;

/// A connection of its own for the sweeper's void transactions, with short lock waits. It is
/// detached from the pool, so its session settings never reach another request; it closes
/// when dropped.
pub async fn sweeper_connection(pool: &crate::storage::Db) -> Result<MySqlConnection> {
    let mut conn = pool.acquire().await?.detach();
    sqlx::query(AssertSqlSafe(format!(
        "SET SESSION innodb_lock_wait_timeout = {SWEEPER_LOCK_WAIT_SECS},
                     lock_wait_timeout = {SWEEPER_LOCK_WAIT_SECS}"
    )))
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

/// What [`super::void_unless_written`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidOutcome {
    /// The id is void (now or before): no order will ever be written under it.
    Voided,
    /// The order is committed, with this request hash; nothing was voided.
    Written(Vec<u8>),
}

/// The create's half of the handshake, after its order row: whether `id` is void, read
/// `LOCK IN SHARE MODE` in the create's transaction.
pub(super) async fn is_void_locked(conn: &mut MySqlConnection, t: &ShardTables, id: OrderId) -> Result<bool> {
    let void = sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE order_id = ? LOCK IN SHARE MODE",
        t.voids
    )))
    .bind(id.get())
    .fetch_optional(conn)
    .await?;
    Ok(void.is_some())
}

/// The sweeper's half of the handshake, after its void row: the request hash of `id`'s
/// order if it is written, read `FOR UPDATE` in the sweeper's transaction.
pub(super) async fn written_hash_locked(
    conn: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
) -> Result<Option<Vec<u8>>> {
    let order = sqlx::query(AssertSqlSafe(format!(
        "SELECT request_hash FROM {} WHERE order_id = ? FOR UPDATE",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(conn)
    .await?;
    Ok(order.map(|row| row.try_get(0)).transpose()?)
}
