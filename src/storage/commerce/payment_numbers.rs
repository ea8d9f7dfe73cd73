//! Payment numbers: a channel's transaction number claimed once across every shard, in the
//! commerce database, before the payment is recorded on the order's shard (the shard's own
//! unique key covers one shard only).

use crate::storage::Db;
use chrono::{DateTime, Utc};

use crate::domain::ids::OrderId;
use crate::domain::money::Money;
use crate::domain::order::PaymentKind;

use crate::storage::{ts, Result, StorageError};

// ---------------------------------------------------------------- payment numbers

/// A payment or refund number as claimed across every shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentNumber<'a> {
    pub transaction_no: &'a str,
    pub kind: PaymentKind,
    pub order_id: OrderId,
    pub channel: &'a str,
    pub amount: Money,
    /// A random token of this call: it claims the number or takes it over (see
    /// [`release_payment_number`]).
    pub attempt: i64,
}

/// What claiming a payment number did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberClaim {
    /// This call claimed the number.
    Claimed,
    /// The number was claimed before with the same order, kind, channel and amount: a
    /// replay, or a retry after a crash between the claim and the shard's record.
    Same,
    /// The number belongs to another order, kind, channel or amount.
    Conflict,
    /// The claim was given back while we looked (a refused attempt): try again.
    Vanished,
}

/// Claims a payment or refund number for one order, so that one number can never be
/// recorded on two orders (the shards only see their own tables).
pub async fn claim_payment_number(
    pool: &Db,
    n: &PaymentNumber<'_>,
    now: DateTime<Utc>,
) -> Result<NumberClaim> {
    let inserted = sqlx::query(
        "INSERT INTO payment_numbers (transaction_no, kind, order_id, channel, amount, attempt, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(n.transaction_no)
    .bind(n.kind as i8)
    .bind(n.order_id.get())
    .bind(n.channel)
    .bind(n.amount.minor())
    .bind(n.attempt)
    .bind(ts(now))
    .execute(pool)
    .await;
    match inserted.map_err(StorageError::from) {
        Ok(_) => return Ok(NumberClaim::Claimed),
        Err(StorageError::Duplicate(_)) => {}
        Err(e) => return Err(e),
    }
    // The same callback again (a retry, or a replay of one already recorded) takes the
    // claim over, so an earlier call that is about to give it back cannot.
    let taken_over = sqlx::query(
        "UPDATE payment_numbers SET attempt = ?
         WHERE transaction_no = ? AND kind = ? AND order_id = ? AND channel = ? AND amount = ?",
    )
    .bind(n.attempt)
    .bind(n.transaction_no)
    .bind(n.kind as i8)
    .bind(n.order_id.get())
    .bind(n.channel)
    .bind(n.amount.minor())
    .execute(pool)
    .await?;
    if taken_over.rows_affected() == 1 {
        return Ok(NumberClaim::Same);
    }
    let exists = sqlx::query("SELECT 1 FROM payment_numbers WHERE transaction_no = ?")
        .bind(n.transaction_no)
        .fetch_optional(pool)
        .await?;
    Ok(if exists.is_some() {
        NumberClaim::Conflict
    } else {
        NumberClaim::Vanished
    })
}

/// Gives a number back that the shard refused for good (wrong amount, invalid transition,
/// no such order: nothing was recorded under it), so the channel may use it again. Only the
/// call that claimed or last took over the number may: a retry that took it over meanwhile
/// may be recording it right now.
pub async fn release_payment_number(pool: &Db, n: &PaymentNumber<'_>) -> Result<()> {
    sqlx::query("DELETE FROM payment_numbers WHERE transaction_no = ? AND attempt = ?")
        .bind(n.transaction_no)
        .bind(n.attempt)
        .execute(pool)
        .await?;
    Ok(())
}
