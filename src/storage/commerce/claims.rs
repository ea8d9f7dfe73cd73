//! Order claims and stock reservations: what each order id takes before its order is
//! written (stock, coupons, flash units, held units), and how it is confirmed, released or
//! given back.
//!
//! # Reserving exactly once
//! `reserve` runs one short transaction. Its first statement inserts the order's *claim*
//! (`order_claims`, keyed by order id), which serialises every create of one order id:
//! - a new claim takes the stock (`stock = stock - q WHERE stock >= q`, never read-then-write)
//!   and redeems the coupons (`WHERE redeemed_order_id IS NULL`), or rolls back entirely;
//! - an existing claim with the same request hash means "already reserved": nothing is taken
//!   twice; with another hash it is an idempotency conflict and nothing is taken at all.
//!
//! # A claim's life
//! A claim is `reserved` from `reserve` on. The create does not confirm it (that would be a
//! third commit on every create): the sweeper confirms, in batches ([`confirm_claims`]),
//! the stale claims whose order it finds on the shard with the claim's request hash. A claim
//! becomes `released` exactly once when its order is closed or invalidated, from `reserved`
//! or `confirmed` alike ([`release_claim`]). A claim whose order never appears is given back
//! and deleted ([`abandon_claim`]): by the sweeper after a grace period, once it has voided
//! the order id on its shard (so the order can never be written later; see
//! [`crate::storage::orders::void_unless_written`]), or at once by the failed create itself if no later
//! attempt has touched it.
//!
//! # Units held by unpaid orders
//! With a cap (`limits.max_unpaid_units_per_user`), a new claim records the units of its
//! order in `order_claims.held_units` and adds them to its user's `user_holds.held_units`, in
//! `reserve`'s transaction, after locking that user's row: creates of one user serialise
//! there, so no number of concurrent creates can pass the cap together, and a create that
//! would pass it is refused before any stock is taken. The invariant: **a user's
//! `held_units` is the sum of `held_units` over that user's claims**, and a claim holds units
//! from its reservation until its order is paid ([`unhold_claim`], run after the payment's
//! shard commit), released ([`release_claim`]) or abandoned ([`abandon_claim`]), whichever
//! comes first. Each of those subtracts in the same transaction that sets the claim's
//! `held_units` to 0 (`... WHERE held_units > 0`, the claim row locked), so it happens once
//! per claim whatever the retries and races. A replayed create finds the claim and adds
//! nothing; a claim given back and deleted took its units with it, so a later retry that
//! reserves afresh counts them once again. Lock order everywhere: claim, user, products.
//! Without a cap, claims hold 0 units and nothing is counted.

use crate::storage::Db;
use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::{MySqlConnection, Row};

use crate::domain::ids::{CouponId, FlashSaleId, OrderId, ProductId, UserId};
use crate::domain::order::NewLine;

use crate::storage::{corrupt, pool, ts, Result, StorageError};

// ---------------------------------------------------------------- claims and reservations

/// Claim states, as stored.
pub const CLAIM_RESERVED: i8 = 0;
pub const CLAIM_CONFIRMED: i8 = 1;
pub const CLAIM_RELEASED: i8 = 2;

/// What `reserve` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Stock taken and coupons redeemed now.
    Reserved,
    /// An earlier attempt with the same content reserved already; nothing taken now.
    AlreadyReserved,
    /// This order id was claimed with other content; nothing taken.
    Conflict,
    OutOfStock(ProductId),
    CouponUnavailable(CouponId),
    /// The claim disappeared while we looked (a failed attempt gave it back): try again.
    Vanished,
    /// The user's unpaid orders hold `held` units already; with this order's they would
    /// exceed the cap. Nothing taken.
    LimitExceeded {
        held: i64,
    },
    /// A flash sale's per-user limit: the user's live orders of the sale hold `bought` units,
    /// and this order's would take them past `limit`. Nothing taken.
    FlashLimit {
        sale: FlashSaleId,
        bought: i64,
        limit: i64,
    },
}

/// A line of an order bought through a flash sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashLine {
    pub product_id: ProductId,
    pub sale_id: FlashSaleId,
    pub per_user_limit: i64,
}

/// A reservation request: the order, its content hash, a random attempt token, the lines
/// and coupons.
#[derive(Debug, Clone)]
pub struct Reservation<'a> {
    pub order_id: OrderId,
    pub user_id: UserId,
    pub request_hash: &'a [u8; 32],
    pub attempt: i64,
    pub lines: &'a [NewLine],
    pub coupons: &'a [CouponId],
    /// The most units the user's unpaid orders may hold, this order's included; `None`: no
    /// cap, and this order's units are not counted.
    pub max_held_units: Option<i64>,
    /// The lines bought through a flash sale: their units are also taken from the sale
    /// (within its allotment, window and per-user limit).
    pub flash: &'a [FlashLine],
    /// The priced terms, recorded with the claim: when the order was priced and each line's
    /// unit price (see [`claim_terms`]).
    pub priced_at: DateTime<Utc>,
    pub unit_prices: &'a [(ProductId, i64)],
}

/// The terms the first attempt of an order priced it at, as its claim records them: a
/// retry writes exactly these (see the migration of `priced_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimTerms {
    pub priced_at: DateTime<Utc>,
    /// Per product: the unit price, and the flash sale it was bought through.
    pub lines: Vec<(ProductId, i64, Option<FlashSaleId>)>,
}

/// The priced terms of `order`'s claim; `None` for a claim without them (made before they
/// were recorded) or without reservations.
pub async fn claim_terms(conn: &mut MySqlConnection, order: OrderId) -> Result<Option<ClaimTerms>> {
    /// (priced at, product, unit price, flash sale) per reserved line.
    type TermsRow = (Option<NaiveDateTime>, i64, Option<i64>, Option<i64>);
    let rows: Vec<TermsRow> = sqlx::query_as(
        "SELECT c.priced_at, r.product_id, r.unit_price, r.flash_sale_id
         FROM order_claims c JOIN stock_reservations r ON r.order_id = c.order_id
         WHERE c.order_id = ?",
    )
    .bind(order.get())
    .fetch_all(&mut *conn)
    .await?;
    let Some(priced_at) = rows.first().and_then(|r| r.0) else {
        return Ok(None);
    };
    let mut lines = Vec::with_capacity(rows.len());
    for (_, product, price, sale) in rows {
        let (Some(product), Some(price)) = (ProductId::new(product), price) else {
            return Ok(None);
        };
        lines.push((product, price, sale.and_then(FlashSaleId::new)));
    }
    Ok(Some(ClaimTerms {
        priced_at: priced_at.and_utc(),
        lines,
    }))
}

/// Takes stock and coupons for an order id exactly once; see the module docs.
///
/// Round trips, for an order without flash lines or coupons: two. The first sends `BEGIN`
/// with the claim, the user's held units (with a cap), the stock of every line and the
/// reservations, each one statement (`opening_statements`); the second is the `COMMIT`, sent
/// once each statement's count says it took what it must. Flash lines and coupons add a
/// statement each, after the products (the lock order).
pub async fn reserve(
    conn: &mut MySqlConnection,
    r: &Reservation<'_>,
    now: DateTime<Utc>,
) -> Result<ReserveOutcome> {
    let units: i64 = r.lines.iter().map(|l| l.quantity).sum();
    // Products in id order, so two orders of the same products lock them alike.
    let mut lines = r.lines.to_vec();
    lines.sort_by_key(|l| l.product_id);
    let with_reservations = r.flash.is_empty();
    // At most twice: the user's first create inserts the row of their held units and opens
    // again (see `ensure_user_holds_row`); a refusal by a moving count reads again once.
    for _ in 0..3 {
        let sql = opening_statements(r, &lines, units, with_reservations, now);
        let counts = match pool::begin_batch(conn, sql).await.map_err(StorageError::from) {
            Ok(counts) => counts,
            Err(StorageError::Duplicate(_)) => {
                // Another attempt holds the claim. Roll back first: the failed insert left a
                // shared lock on the claim, and upgrading it while other waiters hold theirs
                // is InnoDB's classic insert deadlock.
                pool::rollback_raw(conn).await?;
                return touch_claim(conn, r, now).await;
            }
            Err(e) => {
                let _ = pool::rollback_raw(conn).await;
                return Err(e);
            }
        };
        let counts: Vec<u64> = counts.iter().map(|c| c.rows_affected()).collect();
        let taken = take_the_rest(conn, r, &lines, units, &counts, with_reservations, now).await;
        match taken {
            Ok(Some(outcome)) => return Ok(outcome),
            // Open again (the user's held-units row was missing, or the count moved).
            Ok(None) => continue,
            Err(e) => {
                // End the transaction here, so the connection goes back to the pool.
                let _ = pool::rollback_raw(conn).await;
                return Err(e);
            }
        }
    }
    Err(StorageError::Db(sqlx::Error::Protocol(
        "the user's held units kept changing while reserving".into(),
    )))
}

/// The rest of a reservation whose opening statements ran ([`reserve`]), given their counts
/// of rows changed: it checks them, takes the flash units, writes the reservations of an
/// order with flash lines, redeems the coupons, and ends the transaction. `None`: rolled back
/// to open again.
#[allow(clippy::too_many_arguments)]
async fn take_the_rest(
    conn: &mut MySqlConnection,
    r: &Reservation<'_>,
    lines: &[NewLine],
    units: i64,
    counts: &[u64],
    with_reservations: bool,
    now: DateTime<Utc>,
) -> Result<Option<ReserveOutcome>> {
    let sale_of = |p: ProductId| r.flash.iter().find(|f| f.product_id == p);
    let mut counts = counts.iter().copied();
    let _claim = counts.next();
    if let Some(max) = r.max_held_units {
        if counts.next() != Some(1) {
            // Over the cap, or the user has no row yet: the row says which.
            let held: Option<i64> = sqlx::query_scalar("SELECT held_units FROM user_holds WHERE user_id = ?")
                .bind(r.user_id.get())
                .fetch_optional(&mut *conn)
                .await?;
            pool::rollback_raw(conn).await?;
            match held {
                None => ensure_user_holds_row(conn, r.user_id).await?,
                Some(held) if held + units > max => return Ok(Some(ReserveOutcome::LimitExceeded { held })),
                // Units went back in between: open again.
                Some(_) => {}
            }
            return Ok(None);
        }
    }
    if counts.next() != Some(lines.len() as u64) {
        let short = short_product(conn, lines).await?;
        pool::rollback_raw(conn).await?;
        return Ok(Some(ReserveOutcome::OutOfStock(short)));
    }
    // Flash sales after products (lock order: claim, user, products, sales, buyers).
    for l in lines {
        let Some(f) = sale_of(l.product_id) else { continue };
        if let Some(refusal) = take_from_sale(conn, f, r.user_id, l.quantity, now).await? {
            pool::rollback_raw(conn).await?;
            return Ok(Some(refusal));
        }
    }
    if !with_reservations {
        insert_reservations(conn, r, lines, now).await?;
    }
    // Coupons in id order too, for the same reason as products.
    let mut coupons = r.coupons.to_vec();
    coupons.sort_unstable();
    for c in &coupons {
        let redeemed = sqlx::query(
            "UPDATE coupons SET redeemed_order_id = ?, redeemed_at = ?
             WHERE id = ? AND user_id = ? AND redeemed_order_id IS NULL",
        )
        .bind(r.order_id.get())
        .bind(ts(now))
        .bind(c.get())
        .bind(r.user_id.get())
        .execute(&mut *conn)
        .await?;
        if redeemed.rows_affected() != 1 {
            pool::rollback_raw(conn).await?;
            return Ok(Some(ReserveOutcome::CouponUnavailable(*c)));
        }
    }
    pool::commit_raw(conn).await?;
    Ok(Some(ReserveOutcome::Reserved))
}

/// The statements that open a reservation, sent with its `BEGIN` in one round trip (see
/// [`pool::begin_batch`]): the claim, then with a cap the user's held units raised only within
/// it, then every line's stock taken only where it suffices (one statement; its count of rows
/// changed is the lines that got their stock), then, for an order without flash lines, the
/// reservations. A text batch carries no parameters, so its values are written into it, and
/// only values of these kinds: integers, the request hash in hexadecimal and times the
/// process formats. No text of a client's reaches it.
fn opening_statements(
    r: &Reservation<'_>,
    lines: &[NewLine],
    units: i64,
    with_reservations: bool,
    now: DateTime<Utc>,
) -> String {
    let now_sql = datetime_literal(now);
    let mut sql = format!(
        "INSERT INTO order_claims
            (order_id, user_id, request_hash, state, attempt, held_units, created_at, touched_at, priced_at)
         VALUES ({}, {}, {}, {CLAIM_RESERVED}, {}, {}, {now_sql}, {}, {now_sql});",
        r.order_id.get(),
        r.user_id.get(),
        hex_literal(&r.request_hash[..]),
        r.attempt,
        if r.max_held_units.is_some() { units } else { 0 },
        datetime_literal(r.priced_at),
    );
    if let Some(max) = r.max_held_units {
        sql.push_str(&format!(
            " UPDATE user_holds SET held_units = held_units + {units}
              WHERE user_id = {} AND held_units + {units} <= {max};",
            r.user_id.get()
        ));
    }
    let quantity: String = lines
        .iter()
        .map(|l| format!(" WHEN {} THEN {}", l.product_id.get(), l.quantity))
        .collect();
    let ids: Vec<String> = lines.iter().map(|l| l.product_id.get().to_string()).collect();
    sql.push_str(&format!(
        " UPDATE products SET stock = stock - CASE id{quantity} END, updated_at = {now_sql}
          WHERE id IN ({}) AND stock >= CASE id{quantity} END;",
        ids.join(", ")
    ));
    if with_reservations {
        let price_of = |p: ProductId| {
            r.unit_prices
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, price)| *price)
        };
        let rows: Vec<String> = lines
            .iter()
            .map(|l| {
                format!(
                    "({}, {}, {}, {CLAIM_RESERVED}, NULL, {}, {now_sql}, {now_sql})",
                    r.order_id.get(),
                    l.product_id.get(),
                    l.quantity,
                    price_of(l.product_id).map_or("NULL".to_owned(), |p| p.to_string()),
                )
            })
            .collect();
        sql.push_str(&format!(
            " INSERT INTO stock_reservations (order_id, product_id, quantity, state, flash_sale_id, unit_price, created_at, updated_at) VALUES {};",
            rows.join(", ")
        ));
    }
    sql
}

/// A time as a `DATETIME(6)` literal, formatted here (never text of a client's).
fn datetime_literal(t: DateTime<Utc>) -> String {
    format!("'{}'", ts(t).format("%Y-%m-%d %H:%M:%S%.6f"))
}

/// Bytes as a hexadecimal literal (`X'…'`), which no content can break out of.
fn hex_literal(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("X'{hex}'")
}

/// The first of `lines` whose product has less stock than the line wants (or no row): what
/// a refused stock statement refused, read inside the reservation before it rolls back.
async fn short_product(conn: &mut MySqlConnection, lines: &[NewLine]) -> Result<ProductId> {
    let placeholders = vec!["?"; lines.len()].join(", ");
    let sql = format!("SELECT id, stock FROM products WHERE id IN ({placeholders})");
    let mut q = sqlx::query_as::<_, (i64, i64)>(AssertSqlSafe(sql));
    for l in lines {
        q = q.bind(l.product_id.get());
    }
    let stocks = q.fetch_all(&mut *conn).await?;
    let short = lines.iter().find(|l| {
        stocks
            .iter()
            .find(|(id, _)| *id == l.product_id.get())
            .is_none_or(|(_, stock)| *stock < l.quantity)
    });
    // The stock moved back between the two statements: the first line stands for the refusal.
    Ok(short.unwrap_or(&lines[0]).product_id)
}

/// The reservations of an order with flash lines (each naming its sale), after the sales'
/// units were taken.
async fn insert_reservations(
    conn: &mut MySqlConnection,
    r: &Reservation<'_>,
    lines: &[NewLine],
    now: DateTime<Utc>,
) -> Result<()> {
    let sale_of = |p: ProductId| r.flash.iter().find(|f| f.product_id == p);
    let placeholders = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; lines.len()].join(", ");
    let sql = format!(
        "INSERT INTO stock_reservations (order_id, product_id, quantity, state, flash_sale_id, unit_price, created_at, updated_at) VALUES {placeholders}"
    );
    let price_of = |p: ProductId| {
        r.unit_prices
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, price)| *price)
    };
    let mut q = sqlx::query(AssertSqlSafe(&*sql));
    for l in lines {
        q = q
            .bind(r.order_id.get())
            .bind(l.product_id.get())
            .bind(l.quantity)
            .bind(CLAIM_RESERVED)
            .bind(sale_of(l.product_id).map(|f| f.sale_id.get()))
            .bind(price_of(l.product_id))
            .bind(ts(now))
            .bind(ts(now));
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// Takes `units` of a flash sale for `user` inside `tx`: within the allotment and the
/// window (`sold + q <= units`, one statement), and within the buyer's limit (the buyer's
/// row, inserted or raised, is the lock that serialises one buyer's creates). `Some`: the
/// refusal (the caller rolls back).
async fn take_from_sale(
    tx: &mut MySqlConnection,
    f: &FlashLine,
    user: UserId,
    units: i64,
    now: DateTime<Utc>,
) -> Result<Option<ReserveOutcome>> {
    let taken = sqlx::query(
        "UPDATE flash_sales SET sold = sold + ?
         WHERE id = ? AND sold + ? <= units AND ended_at IS NULL AND starts_at <= ? AND ends_at > ?",
    )
    .bind(units)
    .bind(f.sale_id.get())
    .bind(units)
    .bind(ts(now))
    .bind(ts(now))
    .execute(&mut *tx)
    .await?;
    if taken.rows_affected() != 1 {
        // Sold out, or the sale is over: either way no unit for this order.
        return Ok(Some(ReserveOutcome::OutOfStock(f.product_id)));
    }
    sqlx::query(
        "INSERT INTO flash_sale_buyers (sale_id, user_id, units) VALUES (?, ?, ?)
         ON DUPLICATE KEY UPDATE units = units + VALUES(units)",
    )
    .bind(f.sale_id.get())
    .bind(user.get())
    .bind(units)
    .execute(&mut *tx)
    .await?;
    let bought: i64 =
        sqlx::query_scalar("SELECT units FROM flash_sale_buyers WHERE sale_id = ? AND user_id = ?")
            .bind(f.sale_id.get())
            .bind(user.get())
            .fetch_one(&mut *tx)
            .await?;
    if bought > f.per_user_limit {
        return Ok(Some(ReserveOutcome::FlashLimit {
            sale: f.sale_id,
            bought: bought - units,
            limit: f.per_user_limit,
        }));
    }
    Ok(None)
}

/// Makes sure the user has a `user_holds` row to lock, outside any transaction: inserting it
/// inside `reserve`'s would make concurrent first creates of one user take shared locks on
/// the new row and then deadlock upgrading them. A plain read first, so that the usual case
/// (the row exists) waits for no lock at all.
async fn ensure_user_holds_row(conn: &mut MySqlConnection, user: UserId) -> Result<()> {
    let exists = sqlx::query("SELECT 1 FROM user_holds WHERE user_id = ?")
        .bind(user.get())
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_none() {
        sqlx::query("INSERT IGNORE INTO user_holds (user_id, held_units) VALUES (?, 0)")
            .bind(user.get())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Stops counting the units of `order`'s claim against its user, inside `tx`, if the claim
/// still holds any. Returns whether it did.
async fn unhold_in(tx: &mut MySqlConnection, order: OrderId) -> Result<bool> {
    let row = sqlx::query(
        "SELECT user_id, held_units FROM order_claims WHERE order_id = ? AND held_units > 0 FOR UPDATE",
    )
    .bind(order.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let (user, units): (i64, i32) = (row.try_get(0)?, row.try_get(1)?);
    sqlx::query("UPDATE order_claims SET held_units = 0 WHERE order_id = ?")
        .bind(order.get())
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE user_holds SET held_units = held_units - ? WHERE user_id = ?")
        .bind(units)
        .bind(user)
        .execute(&mut *tx)
        .await?;
    Ok(true)
}

/// A paid order's units no longer count against its user's cap: run after the payment's
/// shard commit (and again by a replayed payment, so a failure here is repaired by the
/// channel's retry). Exactly once per claim; returns whether this call did it.
pub async fn unhold_claim(conn: &mut MySqlConnection, order: OrderId) -> Result<bool> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    let done = unhold_in(&mut tx, order).await?;
    tx.commit().await?;
    Ok(done)
}

/// Units the unpaid orders of `user` hold (0 for a user never counted).
pub async fn held_units(pool: &Db, user: UserId) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT held_units FROM user_holds WHERE user_id = ?")
            .bind(user.get())
            .fetch_optional(pool)
            .await?
            .unwrap_or(0),
    )
}

/// An existing claim: the same content means "already reserved" (and this attempt becomes
/// the latest, so an earlier attempt that fails now does not give back what this one is
/// about to use); other content is a conflict.
async fn touch_claim(
    conn: &mut MySqlConnection,
    r: &Reservation<'_>,
    now: DateTime<Utc>,
) -> Result<ReserveOutcome> {
    let touched = sqlx::query(
        "UPDATE order_claims SET attempt = ?, touches = touches + 1, touched_at = ?
         WHERE order_id = ? AND request_hash = ?",
    )
    .bind(r.attempt)
    .bind(ts(now))
    .bind(r.order_id.get())
    .bind(&r.request_hash[..])
    .execute(&mut *conn)
    .await?;
    if touched.rows_affected() == 1 {
        return Ok(ReserveOutcome::AlreadyReserved);
    }
    let exists = sqlx::query("SELECT 1 FROM order_claims WHERE order_id = ?")
        .bind(r.order_id.get())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(if exists.is_some() {
        ReserveOutcome::Conflict
    } else {
        // The claim was abandoned in between: the caller retries from the start.
        ReserveOutcome::Vanished
    })
}

/// Confirms the still-reserved claims of these orders, whose orders were seen on their
/// shards, in one statement. Returns how many moved (a claim released meanwhile stays
/// released).
pub async fn confirm_claims(pool: &Db, orders: &[OrderId]) -> Result<u64> {
    if orders.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "UPDATE order_claims SET state = ? WHERE order_id IN ({}) AND state = ?",
        vec!["?"; orders.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(&*sql)).bind(CLAIM_CONFIRMED);
    for o in orders {
        q = q.bind(o.get());
    }
    Ok(q.bind(CLAIM_RESERVED).execute(pool).await?.rows_affected())
}

/// Gives back every unit and coupon of an order inside `tx` (the claim row is locked),
/// flash-sale units to their sale and buyer too. Returns the sales it gave units back to
/// (their Redis gates are told next).
async fn give_back(tx: &mut MySqlConnection, order: OrderId, now: DateTime<Utc>) -> Result<Vec<FlashSaleId>> {
    let rows = sqlx::query(
        "SELECT r.product_id, r.quantity, r.flash_sale_id, c.user_id
         FROM stock_reservations r JOIN order_claims c ON c.order_id = r.order_id
         WHERE r.order_id = ? AND r.state <> ? ORDER BY r.product_id",
    )
    .bind(order.get())
    .bind(CLAIM_RELEASED)
    .fetch_all(&mut *tx)
    .await?;
    let mut sales = Vec::new();
    for row in &rows {
        let (pid, qty): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        sqlx::query("UPDATE products SET stock = stock + ?, updated_at = ? WHERE id = ?")
            .bind(qty)
            .bind(ts(now))
            .bind(pid)
            .execute(&mut *tx)
            .await?;
    }
    for row in &rows {
        let (qty, sale, user): (i64, Option<i64>, i64) = (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        let Some(sale) = sale else { continue };
        sqlx::query("UPDATE flash_sales SET sold = sold - ? WHERE id = ?")
            .bind(qty)
            .bind(sale)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE flash_sale_buyers SET units = units - ? WHERE sale_id = ? AND user_id = ?")
            .bind(qty)
            .bind(sale)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        sales.extend(FlashSaleId::new(sale));
    }
    sqlx::query(
        "UPDATE coupons SET redeemed_order_id = NULL, redeemed_at = NULL WHERE redeemed_order_id = ?",
    )
    .bind(order.get())
    .execute(&mut *tx)
    .await?;
    Ok(sales)
}

/// What giving a reservation back did: nothing (someone else did, or it was not to be
/// given back), or gave it back, with the flash sales whose units it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GivenBack {
    Nothing,
    Done { flash_sales: Vec<FlashSaleId> },
}

impl GivenBack {
    pub fn done(&self) -> bool {
        matches!(self, GivenBack::Done { .. })
    }

    pub fn flash_sales(&self) -> &[FlashSaleId] {
        match self {
            GivenBack::Done { flash_sales } => flash_sales,
            GivenBack::Nothing => &[],
        }
    }
}

/// Gives a reservation back and deletes its claim, if the claim is still reserved by
/// `attempt`. With `sole_attempt`, only if no other attempt ever touched it: a failed create
/// uses that, because any other attempt may be writing the order right now. The sweeper
/// does not: after the grace period every attempt is over. Returns whether it gave back.
pub async fn abandon_claim(
    conn: &mut MySqlConnection,
    order: OrderId,
    attempt: i64,
    sole_attempt: bool,
    now: DateTime<Utc>,
) -> Result<GivenBack> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    let locked = sqlx::query(
        "SELECT touches FROM order_claims WHERE order_id = ? AND state = ? AND attempt = ? FOR UPDATE",
    )
    .bind(order.get())
    .bind(CLAIM_RESERVED)
    .bind(attempt)
    .fetch_optional(&mut *tx)
    .await?;
    let touches: i32 = match locked {
        Some(row) => row.try_get(0)?,
        None => return Ok(GivenBack::Nothing),
    };
    if sole_attempt && touches > 0 {
        return Ok(GivenBack::Nothing);
    }
    unhold_in(&mut tx, order).await?;
    let flash_sales = give_back(&mut tx, order, now).await?;
    delete_claim(&mut tx, order).await?;
    tx.commit().await?;
    Ok(GivenBack::Done { flash_sales })
}

/// Deleting (rather than marking) an abandoned claim lets a later retry of the same create
/// reserve afresh.
async fn delete_claim(tx: &mut MySqlConnection, order: OrderId) -> Result<()> {
    sqlx::query("DELETE FROM stock_reservations WHERE order_id = ?")
        .bind(order.get())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM order_claims WHERE order_id = ?")
        .bind(order.get())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Gives back the stock and coupons of a closed or invalidated order, exactly once: the
/// claim's state moves to released in the same transaction. Says whether this call did it.
pub async fn release_claim(
    conn: &mut MySqlConnection,
    order: OrderId,
    now: DateTime<Utc>,
) -> Result<GivenBack> {
    let mut tx = crate::storage::pool::begin(conn).await?;
    let moved =
        sqlx::query("UPDATE order_claims SET state = ?, touched_at = ? WHERE order_id = ? AND state <> ?")
            .bind(CLAIM_RELEASED)
            .bind(ts(now))
            .bind(order.get())
            .bind(CLAIM_RELEASED)
            .execute(&mut *tx)
            .await?;
    if moved.rows_affected() != 1 {
        return Ok(GivenBack::Nothing);
    }
    unhold_in(&mut tx, order).await?;
    let flash_sales = give_back(&mut tx, order, now).await?;
    sqlx::query("UPDATE stock_reservations SET state = ?, updated_at = ? WHERE order_id = ?")
        .bind(CLAIM_RELEASED)
        .bind(ts(now))
        .bind(order.get())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(GivenBack::Done { flash_sales })
}

/// A reserved claim the sweeper looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleClaim {
    pub order_id: OrderId,
    pub attempt: i64,
    /// The hash of the create request that reserved: the order found on the shard must
    /// carry it for the claim to be confirmed.
    pub request_hash: [u8; 32],
}

/// Claims still `reserved` and untouched since `before`, oldest first.
pub async fn stale_claims(pool: &Db, before: DateTime<Utc>, limit: u32) -> Result<Vec<StaleClaim>> {
    let rows = sqlx::query(
        "SELECT order_id, attempt, request_hash FROM order_claims
         WHERE state = ? AND touched_at < ? ORDER BY touched_at LIMIT ?",
    )
    .bind(CLAIM_RESERVED)
    .bind(ts(before))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let id: i64 = r.try_get(0)?;
            let hash: Vec<u8> = r.try_get(2)?;
            Ok(StaleClaim {
                order_id: OrderId::new(id).ok_or_else(|| corrupt("order id", id))?,
                attempt: r.try_get(1)?,
                request_hash: hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("claim request hash", &hash))?,
            })
        })
        .collect()
}

/// Moves claims that a sweep step looked at but could not settle (their database down or
/// slow, a commit in flight, a hash mismatch) behind every other stale claim: their
/// `touched_at` becomes just before `before`, so they stay stale (a later step looks again)
/// but no longer head the oldest-first queue and starve the claims of healthy databases.
/// A claim touched since (a create came through) or settled meanwhile is left as it is.
pub async fn postpone_claims(pool: &Db, orders: &[OrderId], before: DateTime<Utc>) -> Result<u64> {
    if orders.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "UPDATE order_claims SET touched_at = ? WHERE order_id IN ({}) AND state = ? AND touched_at < ?",
        vec!["?"; orders.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(sql)).bind(ts(before - chrono::TimeDelta::microseconds(1)));
    for o in orders {
        q = q.bind(o.get());
    }
    let done = q.bind(CLAIM_RESERVED).bind(ts(before)).execute(pool).await?;
    Ok(done.rows_affected())
}

/// Deletes the claims and stock reservations of archived orders (their stock question was
/// settled long ago: an order is archived only once final with its stock given back), in one
/// transaction; units a claim still counts against its buyer (an unhold that failed after the
/// payment) stop counting first. Payment numbers stay: they keep a number from paying a
/// second order, archived or not.
pub async fn prune_archived(pool: &Db, orders: &[OrderId]) -> Result<u64> {
    if orders.is_empty() {
        return Ok(0);
    }
    let list = vec!["?"; orders.len()].join(", ");
    let mut conn = pool.acquire().await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    let sql = format!(
        "SELECT order_id FROM order_claims WHERE order_id IN ({list}) AND held_units > 0
         ORDER BY order_id"
    );
    let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(&*sql));
    for o in orders {
        q = q.bind(o.get());
    }
    for held in q.fetch_all(&mut *tx).await? {
        unhold_in(
            &mut tx,
            OrderId::new(held).ok_or_else(|| corrupt("order_id", held))?,
        )
        .await?;
    }
    let mut pruned = 0;
    for table in ["stock_reservations", "order_claims"] {
        let sql = format!("DELETE FROM {table} WHERE order_id IN ({list})");
        let mut q = sqlx::query(AssertSqlSafe(&*sql));
        for o in orders {
            q = q.bind(o.get());
        }
        pruned += q.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(pruned)
}

/// The claim and reservation a create and its end leave behind, written for an old order
/// put straight into storage (demo data, tests): confirmed, or released with its stock.
pub async fn record_old_claim(
    pool: &Db,
    order: OrderId,
    user: UserId,
    product: ProductId,
    quantity: i64,
    released: bool,
    at: DateTime<Utc>,
) -> Result<()> {
    let mut conn = pool.acquire().await?;
    let mut tx = crate::storage::pool::begin(&mut conn).await?;
    sqlx::query(
        "INSERT IGNORE INTO order_claims
            (order_id, user_id, request_hash, state, attempt, touches, created_at, touched_at)
         VALUES (?, ?, ?, ?, 0, 0, ?, ?)",
    )
    .bind(order.get())
    .bind(user.get())
    .bind(&[0u8; 32][..])
    .bind(if released { CLAIM_RELEASED } else { CLAIM_CONFIRMED })
    .bind(ts(at))
    .bind(ts(at))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT IGNORE INTO stock_reservations (order_id, product_id, quantity, state, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(order.get())
    .bind(product.get())
    .bind(quantity)
    .bind(if released { CLAIM_RELEASED } else { 0 })
    .bind(ts(at))
    .bind(ts(at))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
