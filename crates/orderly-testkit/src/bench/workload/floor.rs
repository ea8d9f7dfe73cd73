//! The floor of `create`: the least work that keeps a create's guarantees on the same schema,
//! issued raw with the same concurrency, so that the service is measured against what no
//! design could skip rather than against its own SQL (issue 21).
//!
//! What it keeps: the claim (exactly once per order id), the buyer's held units within the
//! cap, every line's stock taken only where it suffices, the reservations (what a close gives
//! back), and on the shard the order, its lines and its event in one transaction. One
//! commerce transaction, sent with its `BEGIN` as one batch of statements and committed
//! (two round trips), and one shard transaction: `BEGIN`, order, lines, event, `COMMIT` (five).
//!
//! What it leaves out, each something the service pays for a guarantee or an answer: the
//! replay check and the price read before reserving, the void handshake's read, the GTID read
//! with the commit, HTTP, JSON, the JWT, the cache notice and the watermark. The price is the
//! one the workload loaded at start.

use chrono::Utc;
use sqlx::AssertSqlSafe;

use super::{Outcome, Workload};
use orderly::domain::events::{EventKind, OrderSnapshot};
use orderly::domain::order::{Order, OrderLine, Pricing, ProductSnapshot};
use orderly::domain::status::OrderStatus;
use orderly::storage::{outbox, pool};

impl Workload {
    /// One create at the floor: see the module docs.
    pub(super) async fn floor_create(
        &self,
        user: usize,
        product: &ProductSnapshot,
        quantity: i64,
    ) -> Result<(), Outcome> {
        let new = self.one_line_order(user, product, quantity)?;
        let (id, user_id) = (new.order_id, new.user_id);
        let hash = new.request_hash();
        let now = Utc::now();
        let at = format!("'{}'", now.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f"));
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let (o, u, p, price) = (id.get(), user_id.get(), product.id.get(), product.price.minor());

        // Commerce: claim, held units, stock, reservation; one batch, then COMMIT.
        let mut sql = format!(
            "INSERT INTO order_claims (order_id, user_id, request_hash, state, attempt, held_units, created_at, touched_at, priced_at)
             VALUES ({o}, {u}, X'{hex}', 0, 0, {quantity}, {at}, {at}, {at});"
        );
        if let Some(max) = self.max_held_units {
            sql.push_str(&format!(
                " UPDATE user_holds SET held_units = held_units + {quantity} WHERE user_id = {u} AND held_units + {quantity} <= {max};"
            ));
        }
        sql.push_str(&format!(
            " UPDATE products SET stock = stock - {quantity}, updated_at = {at} WHERE id = {p} AND stock >= {quantity};
             INSERT INTO stock_reservations (order_id, product_id, quantity, state, flash_sale_id, unit_price, created_at, updated_at)
             VALUES ({o}, {p}, {quantity}, 0, NULL, {price}, {at}, {at});"
        ));
        let mut c = self.commerce.acquire().await?;
        let counts = match pool::begin_batch(&mut c, sql).await {
            Ok(counts) => counts,
            Err(e) => {
                pool::rollback_raw(&mut c).await?;
                return Err(Outcome::Error(format!("floor reservation: {e}")));
            }
        };
        let taken: Vec<u64> = counts.iter().map(|c| c.rows_affected()).collect();
        if taken.contains(&0) {
            pool::rollback_raw(&mut c).await?;
            // The held units at their cap (the user row is made at start) or the shelf empty.
            return Err(Outcome::Refused("out_of_stock".into()));
        }
        pool::commit_raw(&mut c).await?;
        drop(c);

        // Shard: order, lines, event.
        let line_total = product.price.minor() * quantity;
        let total =
            orderly::domain::money::Money::new(line_total).ok_or_else(|| Outcome::Error("price".into()))?;
        let pricing = Pricing {
            shop_id: product.shop_id,
            currency: product.currency,
            items: vec![OrderLine {
                line_no: 1,
                product_id: product.id,
                product_name: product.name.clone(),
                unit_price: product.price,
                quantity,
                line_total: total,
            }],
            discounts: Vec::new(),
            total_amount: total,
            discount_amount: orderly::domain::money::Money::ZERO,
            pay_amount: total,
        };
        let deadline = now + self.pay_timeout;
        let payload =
            serde_json::to_string(&OrderSnapshot::of(&Order::from_new(&new, pricing, now, deadline)))
                .map_err(|e| Outcome::Error(e.to_string()))?;
        let shard = self.shards.of_order(id);
        let t = &shard.tables;
        let mut conn = self.shards.primary(shard).acquire().await?;
        pool::begin_raw(&mut conn).await?;
        let a = &self.address;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, user_id, shop_id, status, version, currency, total_amount,
                discount_amount, pay_amount, receiver_name, receiver_phone, receiver_region,
                receiver_detail, remark, request_hash, created_at, updated_at, pay_deadline)
             VALUES (?, ?, ?, ?, 1, ?, ?, 0, ?, ?, ?, ?, ?, '', ?, ?, ?, ?)",
            t.orders
        )))
        .bind(o)
        .bind(u)
        .bind(product.shop_id.get())
        .bind(OrderStatus::PendingPayment.code())
        .bind(product.currency.as_str())
        .bind(line_total)
        .bind(line_total)
        .bind(&a.name)
        .bind(&a.phone)
        .bind(&a.region)
        .bind(&a.detail)
        .bind(&hash[..])
        .bind(now.naive_utc())
        .bind(now.naive_utc())
        .bind(deadline.naive_utc())
        .execute(&mut *conn)
        .await
        .map_err(orderly::storage::StorageError::from)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, line_no, product_id, product_name, unit_price, quantity, line_total)
             VALUES (?, 1, ?, ?, ?, ?, ?)",
            t.items
        )))
        .bind(o)
        .bind(p)
        .bind(&product.name)
        .bind(price)
        .bind(quantity)
        .bind(line_total)
        .execute(&mut *conn)
        .await
        .map_err(orderly::storage::StorageError::from)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, version, shop_id, kind, payload, created_at) VALUES (?, 1, ?, ?, ?, ?)",
            outbox::TABLE
        )))
        .bind(o)
        .bind(product.shop_id.get())
        .bind(EventKind::Created.name())
        .bind(&payload)
        .bind(now.naive_utc())
        .execute(&mut *conn)
        .await
        .map_err(orderly::storage::StorageError::from)?;
        pool::commit_raw(&mut conn).await?;
        self.record(user, id);
        Ok(())
    }
}
