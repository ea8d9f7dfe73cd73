//! Create and preview: an order written exactly once per order id (the steps are listed in
//! the [parent module](super)'s docs), and the pricing a preview answers.

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::actor::Caller;
use crate::domain::flash::FlashSale;
use crate::domain::ids::{FlashSaleId, OrderId, ProductId, UserId};
use crate::domain::money::Money;
use crate::domain::order::{
    parse_preview, price_order, CreateOrderRequest, NewLine, NewOrder, Order, PreviewRequest, Pricing,
};
use crate::domain::shard::Gene;
use crate::storage::commerce::{self, FlashLine, Reservation, ReserveOutcome};
use crate::storage::orders::{self, IdState, OrderWrite};
use crate::storage::shards::Shard;
use crate::storage::StorageError;

use crate::service::flash::Admission;
use crate::service::{retry_deadlocks, Error, Result};

use super::{check_id_is_fresh, voided_id, Created, OrderService, Snapshot};

/// What the flash gates let through for a create: the live sales of its products, the sales
/// whose gates took units for it (given back unless it is reserved), and the places it
/// holds on the database path of sales whose gate cannot answer (until the reservation
/// answers).
struct Admitted {
    sales: Vec<FlashSale>,
    gated: Vec<FlashSaleId>,
    bounds: Vec<tokio::sync::OwnedSemaphorePermit>,
}

impl OrderService {
    // ------------------------------------------------------------------ create

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, shard = tracing::field::Empty, caller = ?caller))]
    pub async fn create(&self, caller: Caller, req: CreateOrderRequest) -> Result<(Order, Created)> {
        let Caller::User(user) = caller else {
            return Err(Error::Forbidden("only a buyer creates orders"));
        };
        if !req.from_cart {
            let new = NewOrder::parse(user, req)?;
            return self.create_new(user, new).await;
        }
        self.create_from_cart(user, req).await
    }

    /// A create of what the cart holds (`from_cart: true`). The order's content is the cart's
    /// lines as they were when it was created, so:
    /// - the cart is read *before* the order id is checked: a replay that reads a cart the
    ///   first attempt already emptied finds that attempt's order;
    /// - a replay of an order that exists is compared with the order's own lines (the cart
    ///   has changed since), and answered as it was;
    /// - only the attempt that wrote the order removes the purchased lines, once per order id
    ///   (the cart records it), each line by the ordered quantity: what was added since stays.
    async fn create_from_cart(&self, user: UserId, req: CreateOrderRequest) -> Result<(Order, Created)> {
        let cart = self.carts.load(user).await?;
        let lines = cart.cart.order_lines();
        if let Some(id) = OrderId::parse(&req.order_id).filter(|id| id.gene() == Gene::of_user(user)) {
            let shard = self.shards.of_order(id);
            let mut conn = self.conn(shard).await?;
            if let IdState::Taken(stored) = orders::id_state(&mut conn, &shard.tables, id).await? {
                let order = orders::load_order(&mut conn, &shard.tables, id)
                    .await?
                    .ok_or(Error::NotFound)?;
                let bought: Vec<NewLine> = order
                    .items
                    .iter()
                    .map(|l| NewLine {
                        product_id: l.product_id,
                        quantity: l.quantity,
                    })
                    .collect();
                let new = NewOrder::parse_from_cart(user, req, &bought)?;
                return self
                    .replay(&mut conn, shard, id, &stored, &new.request_hash())
                    .await;
            }
        }
        let new = NewOrder::parse_from_cart(user, req, &lines)?;
        let (order, created) = self.create_new(user, new.clone()).await?;
        if created == Created::New {
            if let Err(e) = self.carts.check_out(user, order.order_id, &new.lines).await {
                // The order stands; its lines stay in the cart, where the buyer sees them.
                tracing::warn!(order_id = %order.order_id, error = %e, "order created; its lines could not be removed from the cart");
            }
        }
        Ok((order, created))
    }

    /// A create of a parsed order: the steps of the [module docs](super), each a method below.
    async fn create_new(&self, user: UserId, new: NewOrder) -> Result<(Order, Created)> {
        let hash = new.request_hash();
        let shard = self.shards.of_order(new.order_id);
        tracing::Span::current()
            .record("order_id", tracing::field::display(new.order_id))
            .record("shard", shard.index.get());
        let priced_at = self.clock.now();
        let admitted = self.admit_at_gates(user, &new, priced_at).await?;
        // From here until the reservation answers, every way out gives the gates' units back.
        let before_reserve = self
            .check_id_and_price(user, &new, shard, &hash, priced_at, &admitted.sales)
            .await;
        let pricing = match before_reserve {
            Ok(Ok(pricing)) => pricing,
            Ok(Err(replayed)) => {
                self.flash.give_back(new.order_id, &admitted.gated).await;
                return replayed;
            }
            Err(e) => {
                self.flash.give_back(new.order_id, &admitted.gated).await;
                return Err(e);
            }
        };
        let attempt: i64 = rand::random();
        let (pricing, sales) = self
            .reserve(user, &new, &hash, attempt, admitted, pricing, priced_at)
            .await?;

        // Tests stop a create here, reserved but not written (as a process that died between
        // the two commits would): `return(<order id>)`.
        #[cfg(feature = "failpoints")]
        if let Some(Some(arg)) = fail::eval("orders::after_reserve", |arg| arg) {
            if arg == new.order_id.to_string() {
                return Err(Error::Unavailable("failpoint orders::after_reserve".into()));
            }
        }
        self.write_new(shard, &new, &hash, attempt, &pricing, &sales)
            .await
    }

    /// Flash lines ask their sale's gate first, before any SQL: most buyers of a sold-out
    /// sale end here. (An order id the sale has seen before is let through to the
    /// database, so a replay is answered as it was.) A refusal gives back what earlier gates
    /// of the same order took.
    async fn admit_at_gates(
        &self,
        user: UserId,
        new: &NewOrder,
        priced_at: DateTime<Utc>,
    ) -> Result<Admitted> {
        let products: Vec<_> = new.lines.iter().map(|l| l.product_id).collect();
        let sales = self.flash.live_for(&products, priced_at).await?;
        let mut gated = Vec::new();
        let mut bounds = Vec::new();
        for sale in &sales {
            let units: i64 = new
                .lines
                .iter()
                .filter(|l| l.product_id == sale.product_id)
                .map(|l| l.quantity)
                .sum();
            let refusal = match self.flash.take(sale, new.order_id, user, units).await {
                Admission::Took => {
                    gated.push(sale.sale_id);
                    continue;
                }
                Admission::Already | Admission::Known => continue,
                Admission::Fallback(place) => {
                    bounds.push(place);
                    continue;
                }
                Admission::Busy => Error::Unavailable("the flash sale's queue is full; retry".into()),
                Admission::SoldOut => Error::OutOfStock {
                    product_id: sale.product_id,
                },
                Admission::OverLimit { limit } => Error::FlashLimit {
                    sale_id: sale.sale_id,
                    limit,
                },
            };
            self.flash.give_back(new.order_id, &gated).await;
            return Err(refusal);
        }
        Ok(Admitted { sales, gated, bounds })
    }

    /// Steps 2 and 3: the replay check on the shard (`Ok(Err(answer))`: the id is taken, and
    /// this is the answer), the id's freshness, then the price from the catalog.
    async fn check_id_and_price(
        &self,
        user: UserId,
        new: &NewOrder,
        shard: &Shard,
        hash: &[u8; 32],
        priced_at: DateTime<Utc>,
        sales: &[FlashSale],
    ) -> Result<std::result::Result<Pricing, Result<(Order, Created)>>> {
        let mut conn = self.conn(shard).await?;
        match orders::id_state(&mut conn, &shard.tables, new.order_id).await? {
            IdState::Taken(stored) => {
                return Ok(Err(self
                    .replay(&mut conn, shard, new.order_id, &stored, hash)
                    .await))
            }
            IdState::Voided => return Err(voided_id()),
            IdState::Free => {}
        }
        drop(conn);
        check_id_is_fresh(new.order_id, self.clock.now())?;
        let pricing = self
            .price_with(
                user,
                Some(new.order_id),
                &new.lines,
                &new.coupon_ids,
                priced_at,
                sales,
            )
            .await?;
        Ok(Ok(pricing))
    }

    /// Step 4: reserve stock, coupons, flash units and the buyer's unpaid units in the
    /// commerce database, keyed by order id (commit one). Answers the terms the order is
    /// written at: this attempt's, or those of an earlier attempt that reserved already.
    /// Unless the reservation surely holds, what the gates took goes back.
    #[allow(clippy::too_many_arguments)]
    async fn reserve(
        &self,
        user: UserId,
        new: &NewOrder,
        hash: &[u8; 32],
        attempt: i64,
        admitted: Admitted,
        pricing: Pricing,
        priced_at: DateTime<Utc>,
    ) -> Result<(Pricing, Vec<FlashSale>)> {
        let Admitted { sales, gated, bounds } = admitted;
        let flash_lines: Vec<FlashLine> = sales
            .iter()
            .map(|s| FlashLine {
                product_id: s.product_id,
                sale_id: s.sale_id,
                per_user_limit: s.per_user_limit,
            })
            .collect();
        let unit_prices: Vec<(ProductId, i64)> = pricing
            .items
            .iter()
            .map(|l| (l.product_id, l.unit_price.minor()))
            .collect();
        let reservation = Reservation {
            order_id: new.order_id,
            user_id: user,
            request_hash: hash,
            attempt,
            lines: &new.lines,
            coupons: &new.coupon_ids,
            max_held_units: self.max_unpaid_units,
            flash: &flash_lines,
            priced_at,
            unit_prices: &unit_prices,
        };
        let reserved = async {
            let mut outcome = ReserveOutcome::Vanished;
            for _ in 0..3 {
                outcome = retry_deadlocks(|| async {
                    let mut c = self.commerce.acquire().await?;
                    commerce::reserve(&mut c, &reservation, self.clock.now()).await
                })
                .await?;
                if outcome != ReserveOutcome::Vanished {
                    break;
                }
            }
            Ok::<_, StorageError>(outcome)
        }
        .await;
        drop(bounds);
        if !matches!(
            reserved,
            Ok(ReserveOutcome::Reserved | ReserveOutcome::AlreadyReserved)
        ) {
            // Nothing was reserved for this order (or the outcome is unknown, and the gate
            // may then be one unit optimistic: MySQL refuses what it lets through): what its
            // gates took goes back.
            self.flash.give_back(new.order_id, &gated).await;
        }
        let outcome = reserved?;
        let counted = match outcome {
            ReserveOutcome::Reserved => "reserved",
            ReserveOutcome::AlreadyReserved => "already_reserved",
            ReserveOutcome::Vanished => "vanished",
            ReserveOutcome::Conflict => "conflict",
            ReserveOutcome::OutOfStock(_) => "out_of_stock",
            ReserveOutcome::CouponUnavailable(_) => "coupon_unavailable",
            ReserveOutcome::LimitExceeded { .. } | ReserveOutcome::FlashLimit { .. } => "limit_exceeded",
        };
        metrics::counter!("orderly_reservations_total", "outcome" => counted).increment(1);
        self.reserved_terms(outcome, new, &gated, pricing, sales).await
    }

    /// What a reservation's outcome means for the create: the terms it goes on with, or its
    /// refusal.
    async fn reserved_terms(
        &self,
        outcome: ReserveOutcome,
        new: &NewOrder,
        gated: &[FlashSaleId],
        pricing: Pricing,
        sales: Vec<FlashSale>,
    ) -> Result<(Pricing, Vec<FlashSale>)> {
        match outcome {
            ReserveOutcome::Reserved => Ok((pricing, sales)),
            ReserveOutcome::AlreadyReserved => {
                // An earlier attempt reserved this order at its own terms (perhaps inside a
                // flash sale that has ended since, or before one began): the order is
                // written at exactly those, and what this attempt took at a gate goes back.
                let terms = self.claimed_terms(new.order_id, new, gated).await?;
                Ok(terms.unwrap_or((pricing, sales)))
            }
            ReserveOutcome::Vanished => Err(Error::Unavailable("the order's claim keeps changing".into())),
            ReserveOutcome::Conflict => Err(Error::IdempotencyConflict),
            ReserveOutcome::OutOfStock(product_id) => Err(Error::OutOfStock { product_id }),
            ReserveOutcome::CouponUnavailable(coupon_id) => Err(Error::CouponUnavailable { coupon_id }),
            ReserveOutcome::LimitExceeded { held } => Err(Error::LimitExceeded {
                held,
                max: self.max_unpaid_units.unwrap_or_default(),
            }),
            ReserveOutcome::FlashLimit { sale, limit, .. } => Err(Error::FlashLimit { sale_id: sale, limit }),
        }
    }

    /// Step 5: write the order, its items and discounts through [`Self::commit`] (commit two,
    /// the last), and step 6 when it fails: give the reservation back if nothing can hold it.
    async fn write_new(
        &self,
        shard: &Shard,
        new: &NewOrder,
        hash: &[u8; 32],
        attempt: i64,
        pricing: &Pricing,
        sales: &[FlashSale],
    ) -> Result<(Order, Created)> {
        let created = self.clock.now();
        // An order of a flash sale gets the sale's payment timeout (the shortest, with two).
        let timeout = sales
            .iter()
            .map(FlashSale::payment_timeout)
            .min()
            .unwrap_or(TimeDelta::seconds(self.settings.payment_timeout_secs as i64));
        let deadline = created + timeout;
        let order = Order::from_new(new, pricing.clone(), created, deadline);
        // A deadlock with the sweeper's void transaction is retried: the retry either writes
        // the order or finds the void.
        let write = OrderWrite::Create {
            order: new,
            pricing,
            request_hash: hash,
            now: created,
            pay_deadline: deadline,
        };
        let written = self.commit(shard, write, Snapshot::Known(Box::new(order))).await;
        // No claim confirmation here: it would be a third commit on every create. The sweeper
        // confirms the claims whose order it finds.
        match written {
            Ok(Ok((_, Some(order)))) => Ok((order, Created::New)),
            Ok(Ok((_, None))) => Err(Error::Unavailable("a new order without its snapshot".into())),
            Ok(Err(_)) => {
                self.abandon(shard, new.order_id, attempt).await;
                Err(voided_id())
            }
            Err(StorageError::Duplicate(_)) => {
                let mut conn = self.conn(shard).await?;
                let stored = orders::request_hash_of(&mut conn, &shard.tables, new.order_id)
                    .await?
                    .ok_or_else(|| Error::Unavailable("order vanished after a duplicate key".into()))?;
                self.replay(&mut conn, shard, new.order_id, &stored, hash).await
            }
            // A lost connection leaves the outcome unknown (the commit may have happened):
            // only the sweeper, after the grace period, may decide.
            Err(e) if e.is_connection_failure() => Err(e.into()),
            Err(e) => {
                self.abandon(shard, new.order_id, attempt).await;
                Err(e.into())
            }
        }
    }

    /// The pricing and flash sales an earlier attempt of `id` reserved at (see
    /// [`commerce::claim_terms`]), after giving back what this attempt took at gates of sales
    /// those terms do not name. `None`: the claim records no terms (made before they were
    /// recorded); the order is priced anew, as it was then.
    async fn claimed_terms(
        &self,
        id: OrderId,
        new: &NewOrder,
        gated: &[FlashSaleId],
    ) -> Result<Option<(Pricing, Vec<FlashSale>)>> {
        let terms = {
            let mut c = self.commerce.acquire().await.map_err(StorageError::from)?;
            commerce::claim_terms(&mut c, id).await?
        };
        let Some(terms) = terms else {
            return Ok(None);
        };
        let mut sales = Vec::new();
        for sale in terms.lines.iter().filter_map(|(_, _, sale)| *sale) {
            if let Some(s) = crate::storage::flash::load_sale(&self.commerce, sale).await? {
                sales.push(s);
            }
        }
        let not_claimed: Vec<FlashSaleId> = gated
            .iter()
            .copied()
            .filter(|g| !sales.iter().any(|s| s.sale_id == *g))
            .collect();
        self.flash.give_back(id, &not_claimed).await;
        let claimed_price = |p: ProductId| {
            terms
                .lines
                .iter()
                .find(|(q, _, _)| *q == p)
                .and_then(|(_, price, _)| Money::new(*price))
        };
        let pricing = self
            .price_at(
                new.user_id,
                Some(id),
                &new.lines,
                &new.coupon_ids,
                terms.priced_at,
                claimed_price,
            )
            .await?;
        Ok(Some((pricing, sales)))
    }

    pub(super) async fn replay(
        &self,
        conn: &mut crate::storage::Conn,
        shard: &Shard,
        id: OrderId,
        stored_hash: &[u8],
        hash: &[u8; 32],
    ) -> Result<(Order, Created)> {
        if stored_hash != hash.as_slice() {
            return Err(Error::IdempotencyConflict);
        }
        let order = orders::load_order(conn, &shard.tables, id)
            .await?
            .ok_or(Error::NotFound)?;
        self.after_replay(&order).await;
        Ok((order, Created::Replay))
    }

    /// What a replayed write owes the readers: the first attempt may have committed and then
    /// lost its [`Self::after_commit`] (its process killed, its step cut off between COMMIT
    /// and the notice), so a replay, which read the order from the primary, notifies the
    /// cache of it as the write would have. A notice of a version the cache already has
    /// changes nothing.
    pub(super) async fn after_replay(&self, order: &Order) {
        metrics::counter!("orderly_order_replays_total").increment(1);
        self.cache
            .order_written(order.order_id, order.user_id, order.version, Some(order))
            .await;
    }

    /// The order write failed or found its id void: give the reservation back now if the
    /// order is surely not there and this was the only attempt ever. Anything uncertain is
    /// left to the sweeper (which voids the id before it gives back).
    async fn abandon(&self, shard: &Shard, id: OrderId, attempt: i64) {
        let absent = match self.conn(shard).await {
            Ok(mut c) => matches!(orders::request_hash_of(&mut c, &shard.tables, id).await, Ok(None)),
            Err(_) => false,
        };
        if !absent {
            return;
        }
        let result = async {
            let mut c = self.commerce.acquire().await?;
            commerce::abandon_claim(&mut c, id, attempt, true, self.clock.now()).await
        }
        .await;
        match result {
            Ok(given) => {
                self.flash.give_back(id, given.flash_sales()).await;
                tracing::info!(order_id = %id, gave_back = given.done(), "create failed; reservation abandoned")
            }
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "create failed; sweeper will return the reservation")
            }
        }
    }

    /// Prices `lines` at `at`: a product of a flash sale live then at the sale price. Also
    /// answers those sales.
    async fn price(
        &self,
        user: UserId,
        order: Option<OrderId>,
        lines: &[crate::domain::order::NewLine],
        coupons: &[crate::domain::ids::CouponId],
        at: DateTime<Utc>,
    ) -> Result<(Pricing, Vec<FlashSale>)> {
        let ids: Vec<_> = lines.iter().map(|l| l.product_id).collect();
        let sales = self.flash.live_for(&ids, at).await?;
        let pricing = self.price_with(user, order, lines, coupons, at, &sales).await?;
        Ok((pricing, sales))
    }

    /// Prices `lines` at `at` with `sales` (the flash sales live then for its products).
    async fn price_with(
        &self,
        user: UserId,
        order: Option<OrderId>,
        lines: &[crate::domain::order::NewLine],
        coupons: &[crate::domain::ids::CouponId],
        at: DateTime<Utc>,
        sales: &[FlashSale],
    ) -> Result<Pricing> {
        let sale_price = |p: ProductId| sales.iter().find(|s| s.product_id == p).map(|s| s.sale_price);
        self.price_at(user, order, lines, coupons, at, sale_price).await
    }

    /// Prices `lines` at `at`, each product at `price_of` it where that names a price, else at
    /// the catalog's.
    async fn price_at(
        &self,
        user: UserId,
        order: Option<OrderId>,
        lines: &[crate::domain::order::NewLine],
        coupons: &[crate::domain::ids::CouponId],
        at: DateTime<Utc>,
        price_of: impl Fn(ProductId) -> Option<Money>,
    ) -> Result<Pricing> {
        let ids: Vec<_> = lines.iter().map(|l| l.product_id).collect();
        let products: Vec<_> = commerce::load_products(&self.commerce, &ids)
            .await?
            .iter()
            .map(|p| {
                let mut snapshot = p.snapshot();
                if let Some(price) = price_of(p.product_id) {
                    snapshot.price = price;
                }
                snapshot
            })
            .collect();
        let coupon_rows = commerce::load_coupons(&self.commerce, coupons).await?;
        Ok(price_order(
            user,
            order,
            lines,
            coupons,
            &products,
            &coupon_rows,
            at,
        )?)
    }

    pub async fn preview(&self, caller: Caller, req: PreviewRequest) -> Result<Pricing> {
        let Caller::User(user) = caller else {
            return Err(Error::Forbidden("only a buyer previews orders"));
        };
        let cart = if req.from_cart {
            Some(self.carts.load(user).await?.cart.order_lines())
        } else {
            None
        };
        let (lines, coupons) = parse_preview(&req, cart.as_deref())?;
        Ok(self
            .price(user, None, &lines, &coupons, self.clock.now())
            .await?
            .0)
    }
}
