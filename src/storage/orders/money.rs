//! Payments and refunds: what the channel's callback says ([`MoneyMovement`]) and what it
//! does to an order, by [`money_rule`]'s answer for the status, amount due and net paid read
//! under the order's lock. The plans here are read in the door's transaction
//! ([`super::commit`]), which then writes them: on a shard the payment row, the order's move
//! and its event; on an archived order its document and its event in the archive's outbox.
//!
//! Idempotent by transaction number: the same number with the same content is a
//! [`NotWritten::Replay`], with other content a [`NotWritten::Conflict`]. The number is unique
//! per shard here; across shards the service claims it in the commerce database first
//! (`commerce::claim_payment_number`).

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::events::{OrderSnapshot, PaymentSnapshot};
use crate::domain::ids::OrderId;
use crate::domain::money::Money;
use crate::domain::order::PaymentKind;
use crate::domain::payment_rules::{money_rule, MoneyEffect, MoneyRefusal};
use crate::domain::status::OrderStatus;
use crate::storage::shards::ShardTables;
use crate::storage::{corrupt, Result};

use super::commit::NotWritten;

/// A payment or refund callback from the channel.
#[derive(Debug, Clone)]
pub struct MoneyMovement {
    pub kind: PaymentKind,
    pub transaction_no: String,
    pub channel: String,
    pub amount: Money,
    pub reason: String,
}

/// What a payment or refund of a hot order writes: its payment row, and the order's move
/// from `from` to `to` (maybe the same) at `version + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MoneyPlan {
    pub from: OrderStatus,
    pub to: OrderStatus,
    /// The order's version read under the lock.
    pub version: i64,
    /// A full refund of a paid order closes it.
    pub closes: bool,
    /// The `refund_required` flag to set, if the rule moves it.
    pub refund_required: Option<bool>,
}

/// Reads, with the order row locked (`FOR UPDATE`, in the caller's transaction), what a
/// payment or refund of `id` on this shard does, so it serialises with every other change
/// of the order.
pub(super) async fn plan_money(
    tx: &mut MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    m: &MoneyMovement,
) -> Result<std::result::Result<MoneyPlan, NotWritten>> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT status, pay_amount, version FROM {} WHERE order_id = ? FOR UPDATE",
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(Err(NotWritten::NotFound));
    };
    let code: i8 = row.try_get("status")?;
    let status = OrderStatus::from_code(i64::from(code)).ok_or_else(|| corrupt("status", code))?;
    let pay_amount: i64 = row.try_get("pay_amount")?;
    let version: i64 = row.try_get("version")?;

    let existing = sqlx::query(AssertSqlSafe(format!(
        "SELECT order_id, kind, amount, channel FROM {} WHERE transaction_no = ?",
        t.payments
    )))
    .bind(&m.transaction_no)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(e) = existing {
        let (oid, kind, amount, channel): (i64, i8, i64, String) =
            (e.try_get(0)?, e.try_get(1)?, e.try_get(2)?, e.try_get(3)?);
        // The same callback again answers the same; the same number with other content is
        // not a retry.
        let same =
            oid == id.get() && kind == m.kind as i8 && amount == m.amount.minor() && channel == m.channel;
        return Ok(Err(if same {
            NotWritten::Replay
        } else {
            NotWritten::Conflict
        }));
    }
    let net: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT CAST(COALESCE(SUM(IF(kind = 0, amount, -amount)), 0) AS SIGNED) FROM {} WHERE order_id = ?",
        t.payments
    )))
    .bind(id.get())
    .fetch_one(&mut *tx)
    .await?;
    let MoneyEffect {
        to,
        refund_required,
        closes,
    } = match money_rule(status, m.kind, m.amount.minor(), pay_amount, net) {
        Ok(e) => e,
        Err(MoneyRefusal::WrongAmount { limit }) => return Ok(Err(NotWritten::Mismatch { due: limit })),
        Err(MoneyRefusal::NotNow) => return Ok(Err(NotWritten::NotNow(status))),
    };
    Ok(Ok(MoneyPlan {
        from: status,
        to,
        version,
        closes,
        refund_required,
    }))
}

/// What money for an archived order writes: its whole new document (the payment appended,
/// the flag moved, the version up by one) and the event of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ArchivedMoneyPlan {
    pub snapshot: OrderSnapshot,
    /// `snapshot` as JSON: the document and the event's payload.
    pub payload: String,
    /// The order's status, which an archived order keeps.
    pub status: OrderStatus,
    /// Stored times have microseconds, as the shards' DATETIME(6) columns do.
    pub now: DateTime<Utc>,
}

/// Reads, with the archived document locked (`FOR UPDATE`, in the caller's transaction on
/// the archive), what a payment or refund of `id` does, by the same rule as on a shard: a
/// payment is never refused (it is appended to the document and flags the order
/// `refund_required`: money arriving for an order that is over must go back); a refund may
/// return only the excess, and clears the flag once it has. An archived order is final and
/// stays in its status.
pub(super) async fn plan_archived_money(
    tx: &mut MySqlConnection,
    id: OrderId,
    m: &MoneyMovement,
    now: DateTime<Utc>,
) -> Result<std::result::Result<ArchivedMoneyPlan, NotWritten>> {
    let doc: Option<String> =
        sqlx::query_scalar("SELECT doc FROM archived_orders WHERE order_id = ? FOR UPDATE")
            .bind(id.get())
            .fetch_optional(&mut *tx)
            .await?;
    let Some(doc) = doc else {
        return Ok(Err(NotWritten::NotFound));
    };
    let mut s: OrderSnapshot =
        serde_json::from_str(&doc).map_err(|e| corrupt("archived order document", e))?;
    let kind = i64::from(m.kind == PaymentKind::Refund);
    if let Some(p) = s.payments.iter().find(|p| p.transaction_no == m.transaction_no) {
        let same = p.kind == kind && p.amount == m.amount.minor() && p.channel == m.channel;
        return Ok(Err(if same {
            NotWritten::Replay
        } else {
            NotWritten::Conflict
        }));
    }
    let status = s
        .status()
        .ok_or_else(|| corrupt("archived order status", s.status))?;
    let net: i64 = s
        .payments
        .iter()
        .map(|p| if p.kind == 0 { p.amount } else { -p.amount })
        .sum();
    let effect = match money_rule(status, m.kind, m.amount.minor(), s.pay_amount, net) {
        // Final statuses take money without moving (the rule never closes them again).
        Ok(e) if e.to == status && !e.closes => e,
        Ok(_) | Err(MoneyRefusal::NotNow) => return Ok(Err(NotWritten::NotNow(status))),
        Err(MoneyRefusal::WrongAmount { limit }) => return Ok(Err(NotWritten::Mismatch { due: limit })),
    };
    // Stored times have microseconds, as the shards' DATETIME(6) columns do.
    let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    s.payments.push(PaymentSnapshot {
        kind,
        transaction_no: m.transaction_no.clone(),
        channel: m.channel.clone(),
        amount: m.amount.minor(),
        created_at: now,
    });
    if let Some(flag) = effect.refund_required {
        s.refund_required = flag;
    }
    s.version += 1;
    s.updated_at = now;
    let payload = serde_json::to_string(&s).map_err(|e| corrupt("archived order document", e))?;
    Ok(Ok(ArchivedMoneyPlan {
        snapshot: s,
        payload,
        status,
        now,
    }))
}
