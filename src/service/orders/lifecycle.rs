//! The life cycle of an order after its create: patch, ship, confirm, cancel, invalidate,
//! each a compare-and-set on the order's version through [`OrderService::commit`], and the
//! release of an order's stock when it closes.

use crate::domain::actor::Caller;
use crate::domain::ids::OrderId;
use crate::domain::order::{
    check_text, FieldErrors, Order, MAX_CARRIER_CHARS, MAX_REASON_CHARS, MAX_REMARK_CHARS, MAX_TRACKING_CHARS,
};
use crate::domain::patch_rules::{patchable_in, PatchFields, PatchRefusal};
use crate::domain::status::{transition, Command};
use crate::storage::commerce;
use crate::storage::orders::{self, FieldChanges, OrderWrite, StatusChange};
use crate::storage::shards::Shard;

use crate::service::{retry_deadlocks, Error, Result};

use super::{
    check_reference, check_version, OrderService, PatchRequest, ShipmentRequest, Snapshot, VersionedRequest,
};

impl OrderService {
    // ------------------------------------------------------------------ life cycle

    /// Loads the order for a versioned change by `caller`, checks the version and the move.
    async fn status_change(
        &self,
        caller: Caller,
        id: OrderId,
        expected_version: i64,
        command: Command,
        change: impl FnOnce(&Order) -> StatusChange,
        allowed: impl Fn(Caller, &Order) -> bool,
    ) -> Result<Order> {
        let shard = self.shards.of_order(id);
        let mut conn = self.conn(shard).await?;
        let order = self.load_visible(&mut conn, shard, caller, id).await?;
        if !allowed(caller, &order) {
            return Err(Error::Forbidden("this party may not do this to the order"));
        }
        if order.version != expected_version {
            return Err(Error::VersionConflict {
                current_version: order.version,
            });
        }
        let to =
            transition(order.status, command).map_err(|e| Error::InvalidTransition { status: e.from })?;
        let change = change(&order);
        drop(conn);
        let write = OrderWrite::Status {
            id,
            expected_version,
            from: order.status,
            to,
            change: &change,
            now: self.clock.now(),
        };
        let snapshot = if to.releases_stock() {
            // The release below writes again; the answer is reloaded after it.
            Snapshot::None
        } else {
            Snapshot::Reload
        };
        match self.commit(shard, write, snapshot).await? {
            Ok((_, Some(order))) => return Ok(order),
            Ok((_, None)) => {}
            Err(_) => {
                let mut conn = self.conn(shard).await?;
                return Err(self
                    .explain_lost_race(&mut conn, shard, id, expected_version)
                    .await);
            }
        }
        if to.releases_stock() {
            self.release_stock(shard, id).await;
        }
        let mut conn = self.conn(shard).await?;
        orders::load_order(&mut conn, &shard.tables, id)
            .await?
            .ok_or(Error::NotFound)
    }

    /// A compare-and-set matched nothing: say whether the version or the status moved.
    async fn explain_lost_race(
        &self,
        conn: &mut crate::storage::Conn,
        shard: &Shard,
        id: OrderId,
        expected: i64,
    ) -> Error {
        match orders::load_order(conn, &shard.tables, id).await {
            Ok(Some(o)) if o.version != expected => Error::VersionConflict {
                current_version: o.version,
            },
            Ok(Some(o)) => Error::InvalidTransition { status: o.status },
            // Moved to the archive since it was read (the caller could see it then).
            Ok(None) => match self.archived(id).await {
                Ok(Some(_)) => Error::Archived,
                Ok(None) => Error::NotFound,
                Err(e) => e,
            },
            Err(e) => e.into(),
        }
    }

    /// A paid order's units stop counting against its buyer's unpaid cap (idempotent). A
    /// failure is logged: the payment stands, and the channel's retry of it, or the order's
    /// release if it is closed later, clears the units.
    pub(super) async fn unhold(&self, id: OrderId) {
        let done = retry_deadlocks(|| async {
            let mut c = self.commerce.acquire().await?;
            commerce::unhold_claim(&mut c, id).await
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(order_id = %id, error = %e, "could not free the units of a paid order");
        }
    }

    /// Gives back the stock and coupons of a closed or invalidated order. Exactly once: the
    /// claim's state change guards it. If this fails, the order stays `release_pending` and
    /// the sweeper finishes the job.
    pub(crate) async fn release_stock(&self, shard: &Shard, id: OrderId) {
        let released = async {
            let given = retry_deadlocks(|| async {
                let mut c = self.commerce.acquire().await?;
                commerce::release_claim(&mut c, id, self.clock.now()).await
            })
            .await?;
            self.flash.give_back(id, given.flash_sales()).await;
            self.commit(shard, OrderWrite::StockReleased { id }, Snapshot::None)
                .await
        }
        .await;
        if let Err(e) = released {
            tracing::warn!(order_id = %id, error = %e, "stock release deferred to the sweeper");
        }
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn patch(&self, caller: Caller, id: OrderId, req: PatchRequest) -> Result<Order> {
        let mut errors = FieldErrors::default();
        check_version(&mut errors, req.expected_version);
        if let Some(a) = &req.address {
            a.check(&mut errors, "address");
        }
        if let Some(r) = &req.remark {
            check_text(&mut errors, "remark", r, MAX_REMARK_CHARS, false);
        }
        if let Some(t) = &req.tracking_number {
            check_reference(&mut errors, "tracking_number", t, MAX_TRACKING_CHARS);
        }
        if let Some(c) = &req.carrier {
            check_text(&mut errors, "carrier", c, MAX_CARRIER_CHARS, true);
        }
        let buyer_fields = req.address.is_some() || req.remark.is_some();
        let shop_fields = req.tracking_number.is_some() || req.carrier.is_some();
        if !buyer_fields && !shop_fields {
            errors.push("body", "names no field to change");
        }
        errors.into_result(())?;
        let fields = match (buyer_fields, shop_fields) {
            (true, true) => PatchFields::Both,
            (true, false) => PatchFields::Buyer,
            _ => PatchFields::Shop,
        };
        let allowed = patchable_in(caller.role(), fields).map_err(|r| match r {
            PatchRefusal::Forbidden(why) => Error::Forbidden(why),
            PatchRefusal::NotNow => Error::Forbidden("not allowed"),
        })?;
        let shard = self.shards.of_order(id);
        let mut conn = self.conn(shard).await?;
        let order = self.load_visible(&mut conn, shard, caller, id).await?;
        drop(conn);
        if order.version != req.expected_version {
            return Err(Error::VersionConflict {
                current_version: order.version,
            });
        }
        if !allowed.contains(&order.status) {
            return Err(Error::InvalidTransition { status: order.status });
        }
        let changes = FieldChanges {
            address: req.address,
            remark: req.remark,
            tracking_number: req.tracking_number,
            carrier: req.carrier,
        };
        let write = OrderWrite::Fields {
            id,
            expected_version: req.expected_version,
            status: order.status,
            changes: &changes,
            now: self.clock.now(),
        };
        match self.commit(shard, write, Snapshot::Reload).await? {
            Ok((_, Some(order))) => Ok(order),
            Ok((_, None)) => {
                let mut conn = self.conn(shard).await?;
                orders::load_order(&mut conn, &shard.tables, id)
                    .await?
                    .ok_or(Error::NotFound)
            }
            Err(_) => {
                let mut conn = self.conn(shard).await?;
                Err(self
                    .explain_lost_race(&mut conn, shard, id, req.expected_version)
                    .await)
            }
        }
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn ship(&self, caller: Caller, id: OrderId, req: ShipmentRequest) -> Result<Order> {
        if !matches!(caller, Caller::Merchant { .. }) {
            return Err(Error::Forbidden("only the shop ships"));
        }
        let mut errors = FieldErrors::default();
        check_version(&mut errors, req.expected_version);
        check_reference(
            &mut errors,
            "tracking_number",
            &req.tracking_number,
            MAX_TRACKING_CHARS,
        );
        check_text(&mut errors, "carrier", &req.carrier, MAX_CARRIER_CHARS, true);
        errors.into_result(())?;
        let change = StatusChange {
            carrier: Some(req.carrier),
            tracking_number: Some(req.tracking_number),
            ..Default::default()
        };
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Ship,
            |_| change,
            |c, o| c.is_shop_of(o),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn confirm(&self, caller: Caller, id: OrderId, req: VersionedRequest) -> Result<Order> {
        if !matches!(caller, Caller::User(_)) {
            return Err(Error::Forbidden("only the buyer confirms receipt"));
        }
        self.versioned_checks(&req)?;
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Confirm,
            |_| StatusChange::default(),
            |c, o| c.is_owner(o),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn cancel(&self, caller: Caller, id: OrderId, req: VersionedRequest) -> Result<Order> {
        if !matches!(caller, Caller::User(_) | Caller::Admin(_)) {
            return Err(Error::Forbidden("only the buyer or an administrator cancels"));
        }
        self.versioned_checks(&req)?;
        let change = StatusChange {
            close_reason: Some(if req.reason.is_empty() {
                "cancelled".into()
            } else {
                req.reason
            }),
            ..Default::default()
        };
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Cancel,
            |_| change,
            |c, o| c.is_owner(o) || c.is_admin(),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(order_id = %id, shard = self.shards.of_order(id).index.get(), caller = ?caller))]
    pub async fn invalidate(&self, caller: Caller, id: OrderId, req: VersionedRequest) -> Result<Order> {
        if !caller.is_admin() {
            return Err(Error::Forbidden("only an administrator invalidates orders"));
        }
        self.versioned_checks(&req)?;
        let reason = if req.reason.is_empty() {
            "invalidated".into()
        } else {
            req.reason
        };
        let change = |current: &Order| StatusChange {
            close_reason: Some(reason),
            // Money already received must go back to the buyer.
            refund_required: current.net_paid() > 0,
            ..Default::default()
        };
        self.status_change(
            caller,
            id,
            req.expected_version,
            Command::Invalidate,
            change,
            |c, _| c.is_admin(),
        )
        .await
    }

    fn versioned_checks(&self, req: &VersionedRequest) -> Result<()> {
        let mut errors = FieldErrors::default();
        check_version(&mut errors, req.expected_version);
        check_text(&mut errors, "reason", &req.reason, MAX_REASON_CHARS, false);
        Ok(errors.into_result(())?)
    }
}
