//! Flash sales: the sales themselves (created, read and ended by an administrator or the
//! product's merchant), the sales live now (kept in memory, to price orders without a query),
//! and their Redis gates (see [`crate::redis::gate`]).
//!
//! # A flash create
//! [`super::orders::OrderService::create`] prices a product of a live sale at the sale price,
//! then asks the sale's gate for the units ([`FlashSales::take`]). A buyer the gate refuses
//! (sold out, over the per-user limit, outside the window) is answered at once, without
//! MySQL. A buyer the gate lets through reserves in the database as any order does, and the
//! reservation takes the units from the sale too (`sold + q <= units`, the buyer's limit): the
//! database alone never oversells, whatever the gate says. Units go back to the gate exactly
//! once (the gate forgets the order as it returns its units) whenever the database gives them
//! back: a create that failed, an order closed, timed out, invalidated or abandoned.
//!
//! # Redis down or restarted
//! The gate is rebuilt from MySQL (live reservations, per-buyer units) when a take finds none,
//! on start and every `flash.gate_rebuild_interval_secs`. While Redis does not answer (or the
//! gate is being rebuilt), buyers go to the database path behind a small per-sale bound
//! (`flash.fallback_concurrency`) on the hot rows: slower, never oversold.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::Clock;
use crate::config::FlashSettings;
use crate::domain::actor::Caller;
use crate::domain::flash::{FlashSale, NewFlashSale, NewFlashSaleRequest};
use crate::domain::ids::{FlashSaleId, OrderId, ProductId, UserId};
use crate::domain::order::FieldErrors;
use crate::redis::gate::{FlashGate, GateAnswer};
use crate::storage::Db;
use crate::storage::{commerce, flash};

use super::{Error, Result};

/// Sales starting within this much are loaded with the live ones, so that the in-memory list
/// knows a sale the moment it starts.
const LOOKAHEAD: TimeDelta = TimeDelta::minutes(10);

pub struct FlashSales {
    commerce: Db,
    /// `None`: no Redis (`[cache] enabled = false`), the database decides every buyer.
    gate: Option<FlashGate>,
    settings: FlashSettings,
    /// Sales live now or soon, and when they were read.
    known: RwLock<(Option<Instant>, Arc<Vec<FlashSale>>)>,
    /// Refreshes of `known` go one at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// The database path's bound per sale, while its gate cannot answer.
    fallback: Mutex<HashMap<FlashSaleId, Arc<FallbackBound>>>,
    /// Sales whose gate is being rebuilt in the background.
    rebuilding: Arc<Mutex<HashSet<FlashSaleId>>>,
    clock: Clock,
}

/// The database path's bound of one sale: `flash.fallback_concurrency` places, and the
/// buyers waiting for one (at most `flash.fallback_queue`).
struct FallbackBound {
    places: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// What a sale's gate let an order do.
#[derive(Debug)]
pub enum Admission {
    /// The gate took the units now: go on (and give them back if the order is not reserved).
    Took,
    /// The gate had taken the units for this order before (a retry): go on; giving them back
    /// is the business of the attempt that took them.
    Already,
    /// The gate cannot answer: go on to the database, holding this place in the sale's bound.
    Fallback(OwnedSemaphorePermit),
    /// The gate cannot answer and the sale's database path has a full queue: come back later.
    Busy,
    /// The gate took nothing, but this order id took units of the sale before (a replay):
    /// go on to the database, which answers it as it was.
    Known,
    /// No: sold out, or the sale is over.
    SoldOut,
    /// No: the buyer's units would pass the sale's limit.
    OverLimit { limit: i64 },
}

impl FlashSales {
    /// The `[flash]` settings this service runs with.
    pub fn settings(&self) -> &FlashSettings {
        &self.settings
    }

    pub fn new(commerce: Db, gate: Option<FlashGate>, settings: FlashSettings) -> FlashSales {
        FlashSales {
            commerce,
            gate,
            settings,
            known: RwLock::new((None, Arc::new(Vec::new()))),
            refreshing: tokio::sync::Mutex::new(()),
            fallback: Mutex::new(HashMap::new()),
            rebuilding: Arc::new(Mutex::new(HashSet::new())),
            clock: Clock::system(),
        }
    }

    /// The clock sales are read and stamped with (the system's by default).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    // ------------------------------------------------------------------ live sales

    /// The sales known to be live or starting soon, read again when older than
    /// `flash.refresh_ms`.
    async fn known(&self) -> Result<Arc<Vec<FlashSale>>> {
        let fresh = |k: &(Option<Instant>, Arc<Vec<FlashSale>>)| {
            k.0.is_some_and(|at| at.elapsed() < Duration::from_millis(self.settings.refresh_ms))
        };
        {
            let k = self.known.read().unwrap_or_else(|p| p.into_inner());
            if fresh(&k) {
                return Ok(k.1.clone());
            }
        }
        let _one = self.refreshing.lock().await;
        {
            let k = self.known.read().unwrap_or_else(|p| p.into_inner());
            if fresh(&k) {
                return Ok(k.1.clone());
            }
        }
        let t = self.clock.now();
        let sales = Arc::new(flash::sales_between(&self.commerce, t, t + LOOKAHEAD).await?);
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = (Some(Instant::now()), sales.clone());
        Ok(sales)
    }

    /// Forgets the in-memory list (a sale was created or ended here).
    fn forget(&self) {
        self.known.write().unwrap_or_else(|p| p.into_inner()).0 = None;
    }

    /// The sale live at `at` for each of `products` that has one.
    pub async fn live_for(&self, products: &[ProductId], at: DateTime<Utc>) -> Result<Vec<FlashSale>> {
        let known = self.known().await?;
        Ok(known
            .iter()
            .filter(|s| products.contains(&s.product_id) && s.is_live(at))
            .cloned()
            .collect())
    }

    // ------------------------------------------------------------------ the gate

    /// Asks `sale`'s gate for `units` for `order`.
    pub async fn take(&self, sale: &FlashSale, order: OrderId, user: UserId, units: i64) -> Admission {
        let answer = match &self.gate {
            Some(gate) => gate.take(sale.sale_id, order, user, units).await,
            None => GateAnswer::Unavailable,
        };
        match answer {
            GateAnswer::Took => Admission::Took,
            GateAnswer::Already => Admission::Already,
            GateAnswer::Known => Admission::Known,
            GateAnswer::SoldOut | GateAnswer::Closed => {
                metrics::counter!("orderly_flash_gate_requests_total", "outcome" => "sold_out").increment(1);
                Admission::SoldOut
            }
            GateAnswer::OverLimit => {
                metrics::counter!("orderly_flash_gate_requests_total", "outcome" => "over_limit")
                    .increment(1);
                Admission::OverLimit {
                    limit: sale.per_user_limit,
                }
            }
            GateAnswer::Missing => {
                self.rebuild_soon(sale.clone());
                self.fallback(sale.sale_id).await
            }
            GateAnswer::Unavailable => self.fallback(sale.sale_id).await,
        }
    }

    async fn fallback(&self, sale: FlashSaleId) -> Admission {
        match self.fallback_permit(sale).await {
            Some(place) => Admission::Fallback(place),
            None => Admission::Busy,
        }
    }

    /// A place among the buyers that reserve in MySQL while the gate cannot answer; `None`
    /// when `flash.fallback_queue` buyers of this sale already wait in this process (the
    /// buyer is told to come back: a queue without a bound would hold every buyer of an
    /// 11.11 sale in memory, each with its request, for as long as Redis is down).
    async fn fallback_permit(&self, sale: FlashSaleId) -> Option<OwnedSemaphorePermit> {
        let bound = {
            let mut f = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(sale)
                .or_insert_with(|| {
                    Arc::new(FallbackBound {
                        places: Arc::new(Semaphore::new(self.settings.fallback_concurrency.max(1))),
                        waiting: AtomicUsize::new(0),
                    })
                })
                .clone()
        };
        if let Ok(place) = bound.places.clone().try_acquire_owned() {
            metrics::counter!("orderly_flash_gate_requests_total", "outcome" => "fallback").increment(1);
            return Some(place);
        }
        if bound.waiting.fetch_add(1, Ordering::AcqRel) >= self.settings.fallback_queue {
            bound.waiting.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("orderly_flash_gate_requests_total", "outcome" => "fallback_full").increment(1);
            return None;
        }
        metrics::counter!("orderly_flash_gate_requests_total", "outcome" => "fallback").increment(1);
        // Acquiring fails only on a closed semaphore, and these are never closed.
        let place = bound.places.clone().acquire_owned().await.ok();
        bound.waiting.fetch_sub(1, Ordering::AcqRel);
        place
    }

    /// Returns `order`'s units to the gates of `sales` (after the database gave them back,
    /// or when the create did not reserve). A gate that does not hold them does nothing.
    pub async fn give_back(&self, order: OrderId, sales: &[FlashSaleId]) {
        for &sale in sales {
            let Some(gate) = &self.gate else {
                return;
            };
            if gate.give_back(sale, order).await.is_none() {
                tracing::debug!(sale = %sale, order_id = %order, "gate give-back not delivered; the next rebuild settles it");
            }
        }
    }

    /// Rebuilds `sale`'s gate from the database; whether Redis took it.
    pub async fn rebuild(&self, sale: &FlashSale) -> Result<bool> {
        rebuild_gate(&self.commerce, self.gate.as_ref(), sale).await
    }

    /// Rebuilds `sale`'s gate in the background, unless that is under way already.
    fn rebuild_soon(&self, sale: FlashSale) {
        if !self
            .rebuilding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sale.sale_id)
        {
            return;
        }
        let (commerce, gate, rebuilding) =
            (self.commerce.clone(), self.gate.clone(), self.rebuilding.clone());
        tokio::spawn(async move {
            let outcome = rebuild_gate(&commerce, gate.as_ref(), &sale).await;
            tracing::info!(sale = %sale.sale_id, ?outcome, "flash gate rebuilt on demand");
            rebuilding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sale.sale_id);
        });
    }

    /// Rebuilds the gate of every sale live now or starting soon: one step of the loop.
    pub async fn rebuild_all_once(&self) -> Result<usize> {
        let t = self.clock.now();
        let sales = flash::sales_between(&self.commerce, t, t + LOOKAHEAD).await?;
        let mut rebuilt = 0;
        for sale in &sales {
            if self.rebuild(sale).await? {
                rebuilt += 1;
            }
        }
        Ok(rebuilt)
    }

    // ------------------------------------------------------------------ the API

    pub async fn create(&self, caller: Caller, req: NewFlashSaleRequest) -> Result<FlashSale> {
        if !matches!(caller, Caller::Admin(_) | Caller::Merchant { .. }) {
            return Err(Error::Forbidden(
                "only an administrator or the product's merchant creates flash sales",
            ));
        }
        let new = NewFlashSale::parse(&req, self.clock.now())?;
        let product = commerce::load_product(&self.commerce, new.product_id)
            .await?
            .ok_or_else(|| FieldErrors::single("product_id", "no such product"))?;
        if !caller.manages_shop(product.shop_id) {
            // Another shop's product: as for its catalog, the sale is not this merchant's to see.
            return Err(Error::NotFound);
        }
        match flash::insert_sale(&self.commerce, product.shop_id, &new, self.clock.now()).await? {
            Ok(sale) => {
                self.forget();
                if let Err(e) = self.rebuild(&sale).await {
                    tracing::warn!(sale = %sale.sale_id, error = %e, "new sale's gate not built; a take will build it");
                }
                Ok(sale)
            }
            Err(flash::NotCreated::Overlaps(other)) => Err(FieldErrors::single(
                "starts_at",
                format!("the product has flash sale {other} in this window"),
            )
            .into()),
        }
    }

    pub async fn get(&self, caller: Caller, id: FlashSaleId) -> Result<FlashSale> {
        match flash::load_sale(&self.commerce, id).await? {
            Some(s) if caller.manages_shop(s.shop_id) => Ok(s),
            _ => Err(Error::NotFound),
        }
    }

    /// Ends a sale now: no more units are sold through it (orders made stay).
    pub async fn end(&self, caller: Caller, id: FlashSaleId) -> Result<FlashSale> {
        let sale = self.get(caller, id).await?;
        flash::end_sale(&self.commerce, id, self.clock.now()).await?;
        self.forget();
        let ended = flash::load_sale(&self.commerce, id).await?.unwrap_or(sale);
        if let Err(e) = self.rebuild(&ended).await {
            tracing::warn!(sale = %id, error = %e, "ended sale's gate not rebuilt; the database refuses its buyers");
        }
        Ok(ended)
    }
}

/// Replaces `sale`'s gate with what the database holds; whether Redis took it.
/// Without a gate (no Redis) nothing is written: `false`.
async fn rebuild_gate(commerce: &Db, gate: Option<&FlashGate>, sale: &FlashSale) -> Result<bool> {
    let state = flash::gate_state(commerce, sale).await?;
    Ok(match gate {
        Some(gate) => {
            gate.rebuild(sale, state.left, &state.buyers, &state.orders, &state.released)
                .await
        }
        None => false,
    })
}
