//! Correctness checks after a scenario, straight against the databases. Each returns a
//! named [`Check`]; a failed one fails the run.

use orderly::storage::Db;
use sqlx::AssertSqlSafe;
use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::Row;

use crate::raw::RawDb;
use orderly::domain::ids::{OrderId, ProductId};
use orderly::storage::commerce::CLAIM_RELEASED;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &str, problems: Vec<String>, what: &str) -> Check {
    Check {
        name: name.into(),
        ok: problems.is_empty(),
        detail: if problems.is_empty() {
            what.into()
        } else {
            let n = problems.len();
            let mut shown: Vec<_> = problems.into_iter().take(5).collect();
            if n > 5 {
                shown.push(format!("... {} more", n - 5));
            }
            shown.join("; ")
        },
    }
}

/// Reservations of claims still `reserved`: (order, product, quantity). Most belong to
/// orders just written; one whose order does not exist is a create that failed half-way,
/// which the sweeper gives back after its grace period.
async fn unconfirmed_reservations(commerce: &Db) -> anyhow::Result<Vec<(i64, i64, i64)>> {
    let rows = sqlx::query(
        "SELECT r.order_id, r.product_id, r.quantity FROM stock_reservations r
         JOIN order_claims c ON c.order_id = r.order_id WHERE c.state = ?",
    )
    .bind(orderly::storage::commerce::CLAIM_RESERVED)
    .fetch_all(commerce)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}

/// Live reserved units per product (reservations not released).
async fn reserved_units(commerce: &Db) -> anyhow::Result<HashMap<i64, i64>> {
    let rows = sqlx::query(
        "SELECT product_id, CAST(SUM(quantity) AS SIGNED) FROM stock_reservations WHERE state <> ? GROUP BY product_id",
    )
    .bind(CLAIM_RELEASED)
    .fetch_all(commerce)
    .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// Every check that holds after any scenario. `loaded` is the stock put on the shelf per
/// product; `acked` the order ids answered with success.
pub async fn run(
    shards: &RawDb,
    commerce: &Db,
    loaded: &HashMap<ProductId, i64>,
    acked: &[OrderId],
) -> anyhow::Result<Vec<Check>> {
    let mut dup = Vec::new();
    let mut misplaced = Vec::new();
    let mut without_items = Vec::new();
    let mut acked_missing = Vec::new();
    let mut seen: HashSet<i64> = HashSet::new();
    let mut units_in_live_orders: HashMap<i64, i64> = HashMap::new();
    let mut acked_by_shard: HashMap<u16, Vec<i64>> = HashMap::new();
    for id in acked {
        acked_by_shard
            .entry(shards.of_order(*id).index.get())
            .or_default()
            .push(id.get());
    }
    for shard in shards.all() {
        let pool = shards.primary(shard);
        let t = &shard.tables;
        let ids: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!("SELECT order_id FROM {}", t.orders)))
            .fetch_all(pool)
            .await?;
        for id in ids {
            if !seen.insert(id) {
                dup.push(format!("order {id} appears twice"));
            }
            if OrderId::new(id).is_none_or(|o| shards.of_order(o).index != shard.index) {
                misplaced.push(format!("order {id} is in {}", t.orders));
            }
        }
        let orphans: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT o.order_id FROM {} o WHERE NOT EXISTS (SELECT 1 FROM {} i WHERE i.order_id = o.order_id) LIMIT 10",
            t.orders, t.items
        )))
        .fetch_all(pool)
        .await?;
        without_items.extend(orphans.iter().map(|id| format!("order {id} has no items")));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT i.product_id, CAST(SUM(i.quantity) AS SIGNED) FROM {} i JOIN {} o ON o.order_id = i.order_id
             WHERE o.status NOT IN (4, 5) GROUP BY i.product_id",
            t.items, t.orders
        )))
        .fetch_all(pool)
        .await?;
        for r in rows {
            *units_in_live_orders.entry(r.try_get(0)?).or_default() += r.try_get::<i64, _>(1)?;
        }
        if let Some(want) = acked_by_shard.get(&shard.index.get()) {
            for chunk in want.chunks(1000) {
                let sql = format!(
                    "SELECT order_id FROM {} WHERE order_id IN ({})",
                    t.orders,
                    vec!["?"; chunk.len()].join(", ")
                );
                let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(&*sql));
                for id in chunk {
                    q = q.bind(id);
                }
                let found: HashSet<i64> = q.fetch_all(pool).await?.into_iter().collect();
                acked_missing.extend(
                    chunk
                        .iter()
                        .filter(|id| !found.contains(id))
                        .map(|id| format!("acknowledged order {id} is missing")),
                );
            }
        }
    }

    let reserved = reserved_units(commerce).await?;
    // Units held for orders that were never written: they count as taken from the shelf,
    // but are in no order until the sweeper returns them.
    let mut pending: HashMap<i64, i64> = HashMap::new();
    let mut pending_orders = 0;
    for (order, product, qty) in unconfirmed_reservations(commerce).await? {
        if !seen.contains(&order) {
            *pending.entry(product).or_default() += qty;
            pending_orders += 1;
        }
    }
    let mut conserved = Vec::new();
    let mut negative = Vec::new();
    let mut unaccounted = Vec::new();
    for (&product, &stock_loaded) in loaded {
        let stock: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = ?")
            .bind(product.get())
            .fetch_one(commerce)
            .await?;
        let held = reserved.get(&product.get()).copied().unwrap_or(0);
        if stock < 0 {
            negative.push(format!("product {product} has stock {stock}"));
        }
        if stock + held != stock_loaded {
            conserved.push(format!(
                "product {product}: {stock} on the shelf + {held} reserved != {stock_loaded} loaded"
            ));
        }
        let in_orders = units_in_live_orders.get(&product.get()).copied().unwrap_or(0);
        let held_for_orders = held - pending.get(&product.get()).copied().unwrap_or(0);
        if in_orders != held_for_orders {
            unaccounted.push(format!(
                "product {product}: {held_for_orders} units reserved for orders but {in_orders} in live orders"
            ));
        }
    }
    Ok(vec![
        check(
            "no_duplicate_orders",
            dup,
            &format!("{} orders, each once", seen.len()),
        ),
        check(
            "orders_in_their_shard",
            misplaced,
            "every order in the shard of its id",
        ),
        check("no_order_without_items", without_items, "every order has items"),
        check(
            "stock_conserved",
            conserved,
            "shelf + reserved = loaded, per product",
        ),
        check("stock_never_negative", negative, "no negative stock"),
        check(
            "reserved_units_in_live_orders",
            unaccounted,
            &format!(
                "every reserved unit is in a live order ({pending_orders} reservations of unfinished creates await the sweeper)"
            ),
        ),
        check(
            "acknowledged_creates_present",
            acked_missing,
            &format!("{} acknowledged creates, all present", acked.len()),
        ),
    ])
}

/// A check named `name`, passed when `problems` is empty; `what` says what passing means.
pub fn named(name: &str, problems: Vec<String>, what: &str) -> Check {
    check(name, problems, what)
}

/// Every phase did work, and at most 1 % of each phase's operations failed: a run where the
/// service only answered errors (a wrong secret, a dead database) must not pass.
pub fn phases_ran(phases: &[(&str, &super::PhaseStats)]) -> Check {
    let mut problems = Vec::new();
    for &(name, p) in phases {
        let failed: u64 = p.errors.values().sum();
        if p.ops == 0 {
            problems.push(format!(
                "the {name} phase completed no operation ({failed} failed)"
            ));
        } else if failed * 100 > p.ops + failed {
            problems.push(format!(
                "the {name} phase failed {failed} of {} operations: {:?}",
                p.ops + failed,
                p.errors
            ));
        }
    }
    check(
        "phases_ran",
        problems,
        &format!("all {} phases completed work, errors under 1 %", phases.len()),
    )
}

/// A flash sale sold exactly its stock: nothing left, exactly `stock` units reserved.
pub async fn sold_exactly(commerce: &Db, product: ProductId, stock: i64) -> anyhow::Result<Check> {
    let left: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = ?")
        .bind(product.get())
        .fetch_one(commerce)
        .await?;
    let sold = reserved_units(commerce)
        .await?
        .get(&product.get())
        .copied()
        .unwrap_or(0);
    let problems = if left == 0 && sold == stock {
        Vec::new()
    } else {
        vec![format!("product {product}: sold {sold} of {stock}, {left} left")]
    };
    Ok(check(
        "flash_sold_exactly_stock",
        problems,
        &format!("product {product}: sold {sold} of {stock}"),
    ))
}

/// A flash sale the bench made sold exactly its units: the sale's `sold` is its units, its live
/// reservations hold exactly them, the product's shelf went down by exactly them (from what was
/// loaded; never below zero), and the live orders of the product are `units` orders of one unit
/// each (every buyer asks for one). `name` tells the sales apart (one per service phase).
pub async fn flash_sale_sold_exactly(
    shards: &RawDb,
    commerce: &Db,
    name: &str,
    sale: &super::workload::FlashSaleMade,
) -> anyhow::Result<Check> {
    let id: i64 = sale
        .sale_id
        .parse()
        .map_err(|_| anyhow::anyhow!("flash sale id {:?} is not a number", sale.sale_id))?;
    let product = sale.product_id;
    let sold: i64 = sqlx::query_scalar("SELECT sold FROM flash_sales WHERE id = ?")
        .bind(id)
        .fetch_one(commerce)
        .await?;
    let reserved: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS SIGNED) FROM stock_reservations
         WHERE flash_sale_id = ? AND state <> ?",
    )
    .bind(id)
    .bind(CLAIM_RELEASED)
    .fetch_one(commerce)
    .await?;
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM products WHERE id = ?")
        .bind(product.get())
        .fetch_one(commerce)
        .await?;
    let (mut orders, mut units_in_orders) = (0i64, 0i64);
    for shard in shards.all() {
        let t = &shard.tables;
        let (n, q): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT COUNT(DISTINCT i.order_id), CAST(COALESCE(SUM(i.quantity), 0) AS SIGNED)
             FROM {} i JOIN {} o ON o.order_id = i.order_id
             WHERE i.product_id = ? AND o.status NOT IN (4, 5)",
            t.items, t.orders
        )))
        .bind(product.get())
        .fetch_one(shards.primary(shard))
        .await?;
        orders += n;
        units_in_orders += q;
    }
    let units = sale.units;
    let mut problems = Vec::new();
    if sold != units {
        problems.push(format!("sale {id}: sold {sold} of {units} units"));
    }
    if reserved != units {
        problems.push(format!(
            "sale {id}: {reserved} units in live reservations, not {units}"
        ));
    }
    if stock < 0 {
        problems.push(format!("product {product} has stock {stock}"));
    }
    if stock != sale.loaded - units {
        problems.push(format!(
            "product {product}: {stock} on the shelf, not {} loaded - {units} sold",
            sale.loaded
        ));
    }
    if orders != units || units_in_orders != units {
        problems.push(format!(
            "product {product}: {orders} live orders of {units_in_orders} units, not {units} orders of one unit"
        ));
    }
    Ok(check(
        name,
        problems,
        &format!(
            "sale {id} ({}): sold {sold} of {units}, shelf {} -> {stock}, {orders} orders of one unit",
            sale.phase.label(),
            sale.loaded
        ),
    ))
}
