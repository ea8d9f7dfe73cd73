//! Money: payments and refunds. A number is claimed once across every shard in the
//! commerce database, then recorded on the order's shard (or, for an archived order, in the
//! archive, through [`OrderService::commit_archived_money`]).

use crate::domain::actor::Caller;
use crate::domain::ids::OrderId;
use crate::domain::money::Money;
use crate::domain::order::{check_text, FieldErrors, Order, PaymentKind, MAX_REASON_CHARS};
use crate::storage::commerce;
use crate::storage::orders::{self, MoneyMovement, NotWritten, OrderWrite};
use crate::storage::StorageError;

use crate::service::{retry_deadlocks, Error, Result};

use super::{check_reference, OrderService, PaymentRequest, RefundRequest, Snapshot};

/// What a payment or refund answers: the order at its new version, and whether it was
/// recorded against the archived order (which is then flagged `refund_required`).
#[derive(Debug)]
pub struct MoneyAnswer {
    pub order: Order,
    pub archived: bool,
}

fn check_amount(errors: &mut FieldErrors, field: &str, amount: i64) -> Money {
    match Money::new(amount) {
        Some(m) if m > Money::ZERO => m,
        _ => {
            errors.push(field, "must be a positive amount in minor units, at most 10^15");
            Money::ZERO
        }
    }
}

impl OrderService {
    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn pay(&self, caller: Caller, id: OrderId, req: PaymentRequest) -> Result<MoneyAnswer> {
        if caller != Caller::Service {
            return Err(Error::Forbidden("only the payment channel reports payments"));
        }
        let mut errors = FieldErrors::default();
        check_reference(&mut errors, "transaction_no", &req.transaction_no, 64);
        check_reference(&mut errors, "channel", &req.channel, 32);
        let amount = check_amount(&mut errors, "amount", req.amount);
        errors.into_result(())?;
        let movement = MoneyMovement {
            kind: PaymentKind::Payment,
            transaction_no: req.transaction_no,
            channel: req.channel,
            amount,
            reason: String::new(),
        };
        self.move_money(caller, id, movement).await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn refund(&self, caller: Caller, id: OrderId, req: RefundRequest) -> Result<MoneyAnswer> {
        if !matches!(caller, Caller::Service | Caller::Admin(_)) {
            return Err(Error::Forbidden(
                "only the payment channel or an administrator refunds",
            ));
        }
        let mut errors = FieldErrors::default();
        check_reference(&mut errors, "refund_no", &req.refund_no, 64);
        check_text(&mut errors, "reason", &req.reason, MAX_REASON_CHARS, false);
        let amount = check_amount(&mut errors, "amount", req.amount);
        errors.into_result(())?;
        let movement = MoneyMovement {
            kind: PaymentKind::Refund,
            transaction_no: req.refund_no,
            channel: "refund".into(),
            amount,
            reason: req.reason,
        };
        self.move_money(caller, id, movement).await
    }

    /// Records a payment or refund. The number is first claimed in the commerce database,
    /// so one number can pay or refund only one order across every shard; the shard then
    /// records it (idempotent by number on its own). A number the shard refused for good is
    /// given back by the call that holds the claim, so it is not burned.
    async fn move_money(&self, caller: Caller, id: OrderId, m: MoneyMovement) -> Result<MoneyAnswer> {
        let number = commerce::PaymentNumber {
            transaction_no: &m.transaction_no,
            kind: m.kind,
            order_id: id,
            channel: &m.channel,
            amount: m.amount,
            attempt: rand::random(),
        };
        let mut claim = commerce::NumberClaim::Vanished;
        for _ in 0..3 {
            claim =
                retry_deadlocks(|| commerce::claim_payment_number(&self.commerce, &number, self.clock.now()))
                    .await?;
            if claim != commerce::NumberClaim::Vanished {
                break;
            }
        }
        match claim {
            commerce::NumberClaim::Claimed | commerce::NumberClaim::Same => {}
            commerce::NumberClaim::Conflict => return Err(Error::IdempotencyConflict),
            commerce::NumberClaim::Vanished => {
                return Err(Error::Unavailable(
                    "the payment number's claim keeps changing".into(),
                ))
            }
        };

        let shard = self.shards.of_order(id);
        let write = OrderWrite::Money {
            id,
            movement: &m,
            now: self.clock.now(),
        };
        // Reloaded after the commit: the cache gets the new version, and so does the answer.
        let mut recorded = self.commit(shard, write, Snapshot::Reload).await;
        // Not in its shard: an archived order's money is recorded against its document.
        let mut archived = false;
        if matches!(recorded, Ok(Err(NotWritten::NotFound))) {
            if let Some(a) = self.archive_for(id).cloned() {
                recorded = self.commit_archived_money(shard, &a, id, &m).await;
                archived = !matches!(recorded, Ok(Err(NotWritten::NotFound)));
            }
        }
        // Refused for good, with nothing recorded under the number. (A shard-level conflict
        // or duplicate means the number *is* recorded there, for another order: its claim
        // stays.)
        let refused = matches!(
            recorded,
            Ok(Err(NotWritten::Mismatch { .. }
                | NotWritten::NotNow(_)
                | NotWritten::NotFound))
        );
        if refused {
            if let Err(e) =
                retry_deadlocks(|| commerce::release_payment_number(&self.commerce, &number)).await
            {
                // The number stays claimed for this order: a retry with the same content
                // still goes through; only its reuse elsewhere is refused.
                tracing::warn!(order_id = %id, error = %e, "could not give a refused payment number back");
            }
        }
        let mut answer = None;
        let replayed = matches!(recorded, Ok(Err(NotWritten::Replay)));
        match recorded {
            Ok(Ok((c, snapshot))) => {
                if c.status.releases_stock() && !c.previous.releases_stock() {
                    self.release_stock(shard, id).await;
                }
                if m.kind == PaymentKind::Payment {
                    self.unhold(id).await;
                }
                // The release bookkeeping leaves the version (and the order as shown) alone.
                answer = snapshot;
            }
            // A replay repairs an unhold that failed the first time.
            Ok(Err(NotWritten::Replay)) if m.kind == PaymentKind::Payment => self.unhold(id).await,
            Ok(Err(NotWritten::Replay)) => {}
            Ok(Err(NotWritten::Conflict)) | Err(StorageError::Duplicate(_)) => {
                return Err(Error::IdempotencyConflict)
            }
            Ok(Err(NotWritten::Mismatch { due })) => {
                return Err(Error::PaymentMismatch {
                    detail: format!("amount {} against {due} due", m.amount),
                })
            }
            Ok(Err(NotWritten::NotNow(status))) => return Err(Error::InvalidTransition { status }),
            Ok(Err(_)) => return Err(Error::NotFound),
            Err(e) => return Err(e.into()),
        }
        let order = match answer {
            Some(order) => order,
            None if archived => self.archived(id).await?.ok_or(Error::NotFound)?,
            None => {
                let mut conn = self.conn(shard).await?;
                orders::load_order(&mut conn, &shard.tables, id)
                    .await?
                    .ok_or(Error::NotFound)?
            }
        };
        if replayed && !archived {
            self.after_replay(&order).await;
        }
        if !caller.can_see(&order) {
            return Err(Error::NotFound);
        }
        Ok(MoneyAnswer { order, archived })
    }
}
