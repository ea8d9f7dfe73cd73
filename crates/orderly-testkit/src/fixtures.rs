//! Fixtures: data written straight through the library where the API cannot write it.
//!
//! [`write_old_orders`] writes orders with creation times in the past (the API refuses order
//! ids older than a day), each through the commit point at its own old times, for the
//! archive's tests, the playground's demo and the archive bench.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::MySqlConnection;

use orderly::domain::ids::{IdParts, OrderId, ProductId, ShopId, UserId};
use orderly::domain::money::{Currency, Money};
use orderly::domain::order::{Address, NewOrder, OrderLine, PaymentKind, Pricing};
use orderly::domain::shard::Gene;
use orderly::domain::status::OrderStatus;
use orderly::storage::orders::{MoneyMovement, OrderDoor, OrderWrite, StatusChange};
use orderly::storage::{commerce, orders, StorageError};

use crate::raw::RawDb;

/// Old orders to write straight through storage (the API refuses order ids older than a
/// day): for the playground's demo, the tests and the archive bench.
#[derive(Debug, Clone)]
pub struct OldOrders {
    pub users: Vec<UserId>,
    pub shop: ShopId,
    /// `(product, name, unit price)`; the orders cycle through them.
    pub products: Vec<(ProductId, String, Money)>,
    pub count: usize,
    /// The newest order is this old; each next one a minute older.
    pub newest_age: TimeDelta,
    /// The statuses the orders end in, cycled: completed, closed and invalid are final;
    /// shipped and pending_payment are not.
    pub statuses: Vec<OrderStatus>,
}

/// Writes `spec`'s orders, each through the commit point at its own old times (created,
/// then paid, shipped, confirmed, closed or invalidated minutes later), with a confirmed or
/// released claim and reservation in the commerce database as a real create leaves them.
/// Answers their ids, in the order written. No stock is taken: the catalog is not touched.
pub async fn write_old_orders(db: &RawDb, spec: &OldOrders) -> Result<Vec<OrderId>, StorageError> {
    use futures::StreamExt;
    let now = Utc::now();
    let written: Vec<Result<OrderId, StorageError>> = futures::stream::iter(0..spec.count)
        .map(|i| async move {
            let created = now - spec.newest_age - TimeDelta::minutes(i as i64);
            write_old_order(db, spec, i, created).await
        })
        .buffered(16)
        .collect()
        .await;
    written.into_iter().collect()
}

/// One write of an old order, which must commit (nothing else touches it).
async fn must(
    conn: &mut MySqlConnection,
    t: &orderly::storage::shards::ShardTables,
    write: OrderWrite<'_>,
) -> Result<(), StorageError> {
    match orders::commit_without_after_commit(conn, OrderDoor::Shard(t, write)).await? {
        Ok(_) => Ok(()),
        Err(e) => Err(StorageError::Corrupt(format!("old order write refused: {e:?}"))),
    }
}

async fn write_old_order(
    db: &RawDb,
    spec: &OldOrders,
    i: usize,
    created: DateTime<Utc>,
) -> Result<OrderId, StorageError> {
    let user = spec.users[i % spec.users.len()];
    let (product, name, price) = spec.products[i % spec.products.len()].clone();
    let status = spec.statuses[i % spec.statuses.len()];
    let created = DateTime::from_timestamp_millis(created.timestamp_millis()).unwrap_or(created);
    let id = OrderId::compose(IdParts {
        unix_ms: created.timestamp_millis(),
        gene: Gene::of_user(user),
        // The last worker id; no live process issues ids this far in the past.
        worker: orderly::domain::ids::MAX_WORKERS - 1,
        seq: (i % 128) as u16,
    });
    let quantity = 1 + (i % 3) as i64;
    let total = Money::new(price.minor() * quantity).unwrap_or(price);
    let order = NewOrder {
        order_id: id,
        user_id: user,
        lines: Vec::new(),
        coupon_ids: Vec::new(),
        address: Address {
            name: format!("Buyer {}", user.get()),
            phone: "13800000000".into(),
            region: "Shanghai".into(),
            detail: format!("{} Old Street", 1 + i % 500),
        },
        remark: String::new(),
    };
    let pricing = Pricing {
        shop_id: spec.shop,
        currency: Currency::parse("CNY").unwrap_or_else(|| unreachable!()),
        items: vec![OrderLine {
            line_no: 1,
            product_id: product,
            product_name: name,
            unit_price: price,
            quantity,
            line_total: total,
        }],
        discounts: Vec::new(),
        total_amount: total,
        discount_amount: Money::new(0).unwrap_or(total),
        pay_amount: total,
    };
    let shard = db.of_order(id);
    let mut conn = db.primary(shard).acquire().await?;
    let commerce = db.commerce();
    let t = &shard.tables;
    let at = |minutes: i64| created + TimeDelta::minutes(minutes);
    let hash = [0u8; 32];
    let create = OrderWrite::Create {
        order: &order,
        pricing: &pricing,
        request_hash: &hash,
        now: created,
        pay_deadline: at(30),
    };
    must(&mut conn, t, create).await?;
    let step = |expected_version, from, to, change, now| OrderWrite::Status {
        id,
        expected_version,
        from,
        to,
        change,
        now,
    };
    let none = StatusChange::default();
    let shipped = StatusChange {
        carrier: Some("SF".into()),
        tracking_number: Some(format!("SF{}", id.get())),
        ..StatusChange::default()
    };
    let closed = StatusChange {
        close_reason: Some("cancelled".into()),
        ..StatusChange::default()
    };
    use OrderStatus::*;
    let paid = matches!(status, Completed | Shipped);
    if paid {
        let number = format!("old-{}", id.get());
        let claim = commerce::PaymentNumber {
            transaction_no: &number,
            kind: PaymentKind::Payment,
            order_id: id,
            channel: "demo",
            amount: total,
            attempt: 0,
        };
        commerce::claim_payment_number(commerce, &claim, at(5)).await?;
        let m = MoneyMovement {
            kind: PaymentKind::Payment,
            transaction_no: number.clone(),
            channel: "demo".into(),
            amount: total,
            reason: String::new(),
        };
        must(
            &mut conn,
            t,
            OrderWrite::Money {
                id,
                movement: &m,
                now: at(5),
            },
        )
        .await?;
        must(&mut conn, t, step(2, AwaitingShipment, Shipped, &shipped, at(60))).await?;
        if status == Completed {
            must(&mut conn, t, step(3, Shipped, Completed, &none, at(3 * 24 * 60))).await?;
        }
    }
    let released = matches!(status, Closed | Invalid);
    if released {
        let change = if status == Closed { &closed } else { &none };
        must(&mut conn, t, step(1, PendingPayment, status, change, at(10))).await?;
        must(&mut conn, t, OrderWrite::StockReleased { id }).await?;
    }
    commerce::record_old_claim(commerce, id, user, product, quantity, released, created).await?;
    Ok(id)
}
