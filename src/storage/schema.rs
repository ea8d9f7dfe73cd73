//! The schema and `orderly migrate`.
//!
//! Migrations are numbered and recorded per *scope* in `schema_migrations` on each database:
//! `commerce` on the commerce database, `shard_NN` for each table shard on the server that
//! holds it. Applying is idempotent (`CREATE TABLE IF NOT EXISTS` plus the record), so a
//! migrate interrupted halfway is simply run again.

use crate::storage::Db;
use sqlx::AssertSqlSafe;
use sqlx::Row;

use super::merchant::MerchantMap;
use super::shards::{ShardMap, ShardTables};
use super::Result;

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    scope VARCHAR(32) NOT NULL,
    version INT NOT NULL,
    description VARCHAR(200) NOT NULL,
    applied_at DATETIME(6) NOT NULL,
    PRIMARY KEY (scope, version)
) ENGINE=InnoDB";

/// Commerce tables. One database, not sharded: the catalog is small next to the orders.
const COMMERCE_V1: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS users (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(100) NOT NULL,
        level INT NOT NULL DEFAULT 0,
        created_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS shops (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name VARCHAR(100) NOT NULL,
        created_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // stock is only ever changed by `stock = stock - ? WHERE stock >= ?` (never read, then
    // written); the CHECK is the last line of defence against overselling.
    "CREATE TABLE IF NOT EXISTS products (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        shop_id BIGINT NOT NULL,
        name VARCHAR(200) NOT NULL,
        price BIGINT NOT NULL,
        currency CHAR(3) NOT NULL,
        stock BIGINT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        KEY idx_products_shop (shop_id),
        CONSTRAINT stock_never_negative CHECK (stock >= 0),
        CONSTRAINT price_never_negative CHECK (price >= 0)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // redeemed_order_id is the compare-and-set target of redemption: set only when NULL,
    // cleared only by the order that set it.
    "CREATE TABLE IF NOT EXISTS coupons (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        user_id BIGINT NOT NULL,
        shop_id BIGINT NULL,
        amount BIGINT NOT NULL,
        min_spend BIGINT NOT NULL,
        valid_from DATETIME(6) NOT NULL,
        valid_to DATETIME(6) NOT NULL,
        redeemed_order_id BIGINT NULL,
        redeemed_at DATETIME(6) NULL,
        created_at DATETIME(6) NOT NULL,
        KEY idx_coupons_user (user_id),
        KEY idx_coupons_order (redeemed_order_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // One row per order id that ever reserved stock: the idempotency record of the
    // reservation step. state 0 = reserved (order not yet seen), 1 = confirmed (order
    // written), 2 = released (order closed or invalidated; stock and coupons given back).
    // attempt is a random token of the last create that passed through, touches counts
    // the creates after the first: a failed create gives the reservation back at once only
    // if it is the only attempt there ever was (touches = 0); otherwise another attempt
    // may be writing the order right now, and the sweeper decides after the grace. The
    // (state, touched_at) index serves the sweeper.
    "CREATE TABLE IF NOT EXISTS order_claims (
        order_id BIGINT NOT NULL PRIMARY KEY,
        user_id BIGINT NOT NULL,
        request_hash BINARY(32) NOT NULL,
        state TINYINT NOT NULL,
        attempt BIGINT NOT NULL,
        touches INT NOT NULL DEFAULT 0,
        created_at DATETIME(6) NOT NULL,
        touched_at DATETIME(6) NOT NULL,
        KEY idx_claims_sweep (state, touched_at)
    ) ENGINE=InnoDB",
    // Keyed by (order, product): a retried create can never reserve a product twice.
    // state 0 = held, 2 = released with its claim.
    "CREATE TABLE IF NOT EXISTS stock_reservations (
        order_id BIGINT NOT NULL,
        product_id BIGINT NOT NULL,
        quantity BIGINT NOT NULL,
        state TINYINT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        PRIMARY KEY (order_id, product_id),
        KEY idx_reservations_product (product_id)
    ) ENGINE=InnoDB",
];

/// The four order tables of one shard. `{orders}` etc. are replaced by the shard's names.
const SHARD_V1: &[&str] = &[
    // order_id is the primary key: a retried create cannot insert a second row.
    // idx_user_created serves "my orders" newest first with a keyset cursor;
    // idx_shop_created the merchant's view; idx_status_deadline the payment-timeout sweep;
    // idx_release_pending the sweep that finishes giving stock back after a crash.
    "CREATE TABLE IF NOT EXISTS {orders} (
        order_id BIGINT NOT NULL PRIMARY KEY,
        user_id BIGINT NOT NULL,
        shop_id BIGINT NOT NULL,
        status TINYINT NOT NULL,
        version BIGINT NOT NULL,
        currency CHAR(3) NOT NULL,
        total_amount BIGINT NOT NULL,
        discount_amount BIGINT NOT NULL,
        pay_amount BIGINT NOT NULL,
        receiver_name VARCHAR(200) NOT NULL,
        receiver_phone VARCHAR(32) NOT NULL,
        receiver_region VARCHAR(200) NOT NULL,
        receiver_detail VARCHAR(200) NOT NULL,
        remark VARCHAR(500) NOT NULL,
        tracking_number VARCHAR(64) NULL,
        carrier VARCHAR(64) NULL,
        close_reason VARCHAR(500) NULL,
        refund_required TINYINT NOT NULL DEFAULT 0,
        release_pending TINYINT NOT NULL DEFAULT 0,
        request_hash BINARY(32) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        pay_deadline DATETIME(6) NOT NULL,
        paid_at DATETIME(6) NULL,
        shipped_at DATETIME(6) NULL,
        completed_at DATETIME(6) NULL,
        closed_at DATETIME(6) NULL,
        invalidated_at DATETIME(6) NULL,
        KEY idx_user_created (user_id, created_at, order_id),
        KEY idx_shop_created (shop_id, created_at),
        KEY idx_status_deadline (status, pay_deadline),
        KEY idx_release_pending (release_pending, updated_at)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // The product as it was when ordered: later catalog changes do not rewrite history.
    "CREATE TABLE IF NOT EXISTS {items} (
        order_id BIGINT NOT NULL,
        line_no SMALLINT NOT NULL,
        product_id BIGINT NOT NULL,
        product_name VARCHAR(200) NOT NULL,
        unit_price BIGINT NOT NULL,
        quantity INT NOT NULL,
        line_total BIGINT NOT NULL,
        PRIMARY KEY (order_id, line_no)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    // transaction_no (payment or refund number of the channel) is unique: a repeated
    // callback finds its first record instead of paying twice.
    "CREATE TABLE IF NOT EXISTS {payments} (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        order_id BIGINT NOT NULL,
        kind TINYINT NOT NULL,
        transaction_no VARCHAR(64) NOT NULL,
        channel VARCHAR(32) NOT NULL,
        amount BIGINT NOT NULL,
        reason VARCHAR(500) NOT NULL DEFAULT '',
        created_at DATETIME(6) NOT NULL,
        UNIQUE KEY uq_transaction_no (transaction_no),
        KEY idx_payments_order (order_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS {discounts} (
        order_id BIGINT NOT NULL,
        line_no SMALLINT NOT NULL,
        coupon_id BIGINT NULL,
        kind VARCHAR(16) NOT NULL,
        amount BIGINT NOT NULL,
        description VARCHAR(200) NOT NULL,
        PRIMARY KEY (order_id, line_no)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
];

/// Worker-id leases (one row per worker id, seeded once: a lease is only ever taken by
/// updating an existing row, so a row that vanished is a worker id nobody can take, never
/// one two processes share). `expires_at` is in the database's clock; `issued_below_ms` is
/// the bound under which the holder may have issued ids (its lease deadline, or its last id
/// on a clean release), so the next holder never issues an id at or below it, whatever its
/// clock says. `generation` counts the takes (a fencing token for logs).
const COMMERCE_V2: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS worker_leases (
        worker_id SMALLINT NOT NULL PRIMARY KEY,
        holder VARCHAR(64) NULL,
        expires_at DATETIME(6) NOT NULL,
        issued_below_ms BIGINT NOT NULL DEFAULT 0,
        generation BIGINT NOT NULL DEFAULT 0,
        updated_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB",
    "INSERT IGNORE INTO worker_leases (worker_id, holder, expires_at, updated_at)
     WITH RECURSIVE w(id) AS (SELECT 0 UNION ALL SELECT id + 1 FROM w WHERE id < 63)
     SELECT id, NULL, '1970-01-01 00:00:01', UTC_TIMESTAMP(6) FROM w",
];

/// Payment and refund numbers of the channel are unique across every shard: the number is
/// claimed here before the shard records the payment, so one number can never pay two
/// orders on two shards. Coupons carry the currency they are worth.
const COMMERCE_V3: &[&str] = &[
    // Numbers compare byte for byte (ascii_bin): channel numbers are case-sensitive, and
    // "AbC" and "abc" are two payments. `attempt` is the random token of the last call that
    // claimed or took over the number: only that call may give a refused number back.
    "CREATE TABLE IF NOT EXISTS payment_numbers (
        transaction_no VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
        kind TINYINT NOT NULL,
        order_id BIGINT NOT NULL,
        channel VARCHAR(32) NOT NULL,
        amount BIGINT NOT NULL,
        attempt BIGINT NOT NULL,
        created_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "ALTER TABLE coupons ADD COLUMN IF NOT EXISTS currency CHAR(3) NOT NULL DEFAULT 'CNY' AFTER min_spend",
];

/// Units held by unpaid orders, per user (`limits.max_unpaid_units_per_user`; see
/// [`super::commerce`]). `user_holds.held_units` is the sum of `order_claims.held_units` over
/// the user's claims: a claim's units are added when it reserves and subtracted once, by the
/// statement that sets its `held_units` back to 0 (paid, released or abandoned). Claims older
/// than this migration hold 0: they were never counted, so they are never subtracted. The
/// row of a user is the lock that serialises the cap check of that user's creates.
const COMMERCE_V4: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS user_holds (
        user_id BIGINT NOT NULL PRIMARY KEY,
        held_units BIGINT NOT NULL,
        CONSTRAINT held_units_never_negative CHECK (held_units >= 0)
    ) ENGINE=InnoDB",
    "ALTER TABLE order_claims ADD COLUMN IF NOT EXISTS held_units INT NOT NULL DEFAULT 0",
];

/// Flash sales (see [`super::flash`]). `sold` is the number of units in live reservations of
/// the sale: raised in the reservation's transaction (`sold + q <= units`, so the database
/// alone never sells more than the allotment, whatever the gate in front says) and lowered
/// exactly once when the reservation is given back. `flash_sale_buyers` holds the same per
/// buyer (the per-user limit), and each reservation names its sale.
const COMMERCE_V5: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS flash_sales (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        product_id BIGINT NOT NULL,
        shop_id BIGINT NOT NULL,
        units BIGINT NOT NULL,
        sold BIGINT NOT NULL DEFAULT 0,
        sale_price BIGINT NOT NULL,
        per_user_limit INT NOT NULL,
        starts_at DATETIME(6) NOT NULL,
        ends_at DATETIME(6) NOT NULL,
        payment_timeout_secs INT NOT NULL,
        ended_at DATETIME(6) NULL,
        created_at DATETIME(6) NOT NULL,
        KEY idx_flash_product (product_id, ends_at),
        KEY idx_flash_ends (ends_at),
        CONSTRAINT flash_sold_within_units CHECK (sold >= 0 AND sold <= units)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS flash_sale_buyers (
        sale_id BIGINT NOT NULL,
        user_id BIGINT NOT NULL,
        units BIGINT NOT NULL,
        PRIMARY KEY (sale_id, user_id),
        CONSTRAINT flash_buyer_units_never_negative CHECK (units >= 0)
    ) ENGINE=InnoDB",
    "ALTER TABLE stock_reservations ADD COLUMN IF NOT EXISTS flash_sale_id BIGINT NULL",
    "CREATE INDEX IF NOT EXISTS idx_reservations_flash ON stock_reservations (flash_sale_id, state)",
];

/// Carts (see [`super::carts`]): the write-behind copy of the carts Redis holds, one row per
/// buyer. `items` is a JSON array of `[product_id, quantity]` pairs (no prices: a cart shows
/// the catalog's current ones); `checkouts` the last order ids whose lines were removed
/// (comma-separated), so a removal happens once per order. `version` is the cart's change
/// counter: the flusher writes a row only with a newer version, so nothing regresses.
const COMMERCE_V6: &[&str] = &["CREATE TABLE IF NOT EXISTS carts (
        user_id BIGINT NOT NULL PRIMARY KEY,
        version BIGINT NOT NULL,
        items TEXT NOT NULL,
        checkouts VARCHAR(400) NOT NULL DEFAULT '',
        updated_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB"];

/// The priced terms of a claim (see [`super::commerce::claim_terms`]): when the first attempt
/// priced the order, and each line's unit price, so that a retry writes the order at exactly
/// those terms (a flash sale that started or ended in between changes nothing). `NULL` on
/// claims made before this migration: their retries price anew, as they always did.
const COMMERCE_V7: &[&str] = &[
    "ALTER TABLE order_claims ADD COLUMN IF NOT EXISTS priced_at DATETIME(6) NULL",
    "ALTER TABLE stock_reservations ADD COLUMN IF NOT EXISTS unit_price BIGINT NULL",
];

/// Void order ids of a shard: see [`ShardTables::voids`]. And payment numbers compare byte
/// for byte, as in `payment_numbers`: under the default case-insensitive collation a second
/// payment "abc" after "AbC" would be taken for a replay and dropped.
const SHARD_V2: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {voids} (
        order_id BIGINT NOT NULL PRIMARY KEY,
        voided_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB",
    "ALTER TABLE {payments} MODIFY transaction_no VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL",
];

/// The completer's index: shipped orders, oldest shipment first (see
/// [`super::orders::shipped_before`]). Without it, each step would scan the whole shard.
const SHARD_V3: &[&str] = &["CREATE INDEX IF NOT EXISTS idx_status_shipped ON {orders} (status, shipped_at)"];

/// The transactional outbox of order events: one table per shard database, which every
/// table shard's migration creates if it is not there yet (see [`super::outbox`]).
/// `(order_id, version)` is unique: one event per committed version.
const SHARD_V4: &[&str] = &["CREATE TABLE IF NOT EXISTS order_outbox (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        order_id BIGINT NOT NULL,
        version BIGINT NOT NULL,
        shop_id BIGINT NOT NULL,
        kind VARCHAR(16) NOT NULL,
        payload LONGTEXT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        UNIQUE KEY uq_outbox_order_version (order_id, version)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"];

/// Outbox rows the relay parked: JetStream refused them `events.max_publish_attempts` times
/// for what they are (too large), so they were moved here, whole, to let the rows behind
/// them flow (see [`super::outbox::park`]). `id` is the row's outbox id, kept so that
/// `orderly relay --republish-parked` puts it back where it was; `reason` is the last refusal.
const SHARD_V5: &[&str] = &["CREATE TABLE IF NOT EXISTS order_outbox_parked (
        id BIGINT NOT NULL PRIMARY KEY,
        order_id BIGINT NOT NULL,
        version BIGINT NOT NULL,
        shop_id BIGINT NOT NULL,
        kind VARCHAR(16) NOT NULL,
        payload LONGTEXT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        attempts INT NOT NULL,
        reason VARCHAR(512) NOT NULL,
        parked_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"];

/// The merchant copy (see [`super::merchant`]): one table per `merchant_NN` scope, plus the
/// reports and the progress of its database, created by whichever table's migration runs
/// first there. `day` is the report day (in `merchant.report_utc_offset_minutes`);
/// `idx_shop_created` serves the shop's list newest first with a keyset cursor, and
/// `idx_shop_status` the same filtered by status. `doc` is the order's snapshot JSON.
const MERCHANT_V1: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {merchant_orders} (
        order_id BIGINT NOT NULL PRIMARY KEY,
        shop_id BIGINT NOT NULL,
        user_id BIGINT NOT NULL,
        status TINYINT NOT NULL,
        version BIGINT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        day DATE NOT NULL,
        units BIGINT NOT NULL,
        gross BIGINT NOT NULL,
        discounts BIGINT NOT NULL,
        paid BIGINT NOT NULL,
        refunded BIGINT NOT NULL,
        doc LONGTEXT NOT NULL,
        KEY idx_shop_created (shop_id, created_at, order_id),
        KEY idx_shop_status (shop_id, status, created_at, order_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE IF NOT EXISTS merchant_reports (
        shop_id BIGINT NOT NULL,
        day DATE NOT NULL,
        orders BIGINT NOT NULL,
        units BIGINT NOT NULL,
        gross BIGINT NOT NULL,
        discounts BIGINT NOT NULL,
        paid BIGINT NOT NULL,
        refunded BIGINT NOT NULL,
        status_0 BIGINT NOT NULL,
        status_1 BIGINT NOT NULL,
        status_2 BIGINT NOT NULL,
        status_3 BIGINT NOT NULL,
        status_4 BIGINT NOT NULL,
        status_5 BIGINT NOT NULL,
        PRIMARY KEY (shop_id, day)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS projection_state (
        name VARCHAR(32) NOT NULL PRIMARY KEY,
        pending BIGINT NOT NULL,
        applied_through DATETIME(6) NULL,
        updated_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB",
];

/// Buyers with archived orders, per table shard (see [`ShardTables::archived_users`]). A row
/// is written in the transaction that deletes the buyer's first archived orders from the
/// shard ([`super::orders::delete_archived`]), so a list that no longer finds an order in
/// the shard finds the row in a later statement on its connection; rows are never deleted
/// (the archive keeps the orders). Existing archives are backfilled by
/// [`backfill_archived_users`] when this migration is applied.
const SHARD_V6: &[&str] = &["CREATE TABLE IF NOT EXISTS {archived_users} (
        user_id BIGINT NOT NULL PRIMARY KEY,
        since DATETIME(6) NOT NULL
    ) ENGINE=InnoDB"];

const MERCHANT: &[Migration] = &[Migration {
    version: 1,
    description: "merchant copy by shop, daily reports, projection progress",
    statements: MERCHANT_V1,
}];

struct Migration {
    version: i32,
    description: &'static str,
    statements: &'static [&'static str],
}

const COMMERCE: &[Migration] = &[
    Migration {
        version: 1,
        description: "users, shops, products, coupons, order claims, stock reservations",
        statements: COMMERCE_V1,
    },
    Migration {
        version: 2,
        description: "worker-id leases",
        statements: COMMERCE_V2,
    },
    Migration {
        version: 3,
        description: "payment numbers unique across shards; coupon currency",
        statements: COMMERCE_V3,
    },
    Migration {
        version: 4,
        description: "units held by unpaid orders, per user",
        statements: COMMERCE_V4,
    },
    Migration {
        version: 5,
        description: "flash sales, their buyers, the sale of each reservation",
        statements: COMMERCE_V5,
    },
    Migration {
        version: 6,
        description: "carts (write-behind from Redis)",
        statements: COMMERCE_V6,
    },
    Migration {
        version: 7,
        description: "the priced terms of a claim (when, and each line's unit price)",
        statements: COMMERCE_V7,
    },
];

const SHARD: &[Migration] = &[
    Migration {
        version: 1,
        description: "orders, order_items, order_payments, order_discounts",
        statements: SHARD_V1,
    },
    Migration {
        version: 2,
        description: "void order ids",
        statements: SHARD_V2,
    },
    Migration {
        version: 3,
        description: "index of shipped orders by shipment time",
        statements: SHARD_V3,
    },
    Migration {
        version: 4,
        description: "the outbox of order events",
        statements: SHARD_V4,
    },
    Migration {
        version: 5,
        description: "parked outbox rows",
        statements: SHARD_V5,
    },
    Migration {
        version: 6,
        description: "buyers with archived orders",
        statements: SHARD_V6,
    },
];

/// What a migrate run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<String>,
    pub already: usize,
}

fn render(stmt: &str, t: &ShardTables) -> String {
    stmt.replace("{orders}", &t.orders)
        .replace("{items}", &t.items)
        .replace("{payments}", &t.payments)
        .replace("{discounts}", &t.discounts)
        .replace("{voids}", &t.voids)
        .replace("{archived_users}", &t.archived_users)
}

async fn apply(
    pool: &Db,
    scope: &str,
    migrations: &[Migration],
    render_stmt: impl Fn(&str) -> String,
    report: &mut MigrateReport,
) -> Result<()> {
    sqlx::query(MIGRATIONS_TABLE).execute(pool).await?;
    let done: Vec<i32> = sqlx::query("SELECT version FROM schema_migrations WHERE scope = ?")
        .bind(scope)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    for m in migrations {
        if done.contains(&m.version) {
            report.already += 1;
            continue;
        }
        for stmt in m.statements {
            sqlx::query(AssertSqlSafe(&*render_stmt(stmt)))
                .execute(pool)
                .await?;
        }
        sqlx::query(
            "INSERT IGNORE INTO schema_migrations (scope, version, description, applied_at)
             VALUES (?, ?, ?, NOW(6))",
        )
        .bind(scope)
        .bind(m.version)
        .bind(m.description)
        .execute(pool)
        .await?;
        report.applied.push(format!("{scope} v{}", m.version));
    }
    Ok(())
}

const ARCHIVE: &[Migration] = &[
    Migration {
        version: 1,
        description: "archived orders, checkpoints",
        statements: super::archive::ARCHIVE_V1,
    },
    Migration {
        version: 2,
        description: "the outbox of events of archived orders",
        statements: SHARD_V4,
    },
    Migration {
        version: 3,
        description: "parked outbox rows of archived orders",
        statements: SHARD_V5,
    },
];

/// Creates the archive's tables on its database (scope `archive`).
pub async fn migrate_archive(pool: &Db) -> Result<MigrateReport> {
    let mut report = MigrateReport::default();
    apply(pool, "archive", ARCHIVE, str::to_owned, &mut report).await?;
    Ok(report)
}

/// Records, in each table shard whose `archived_users` table `report` says was created now,
/// every buyer of that shard who already has orders in the archive (moved by an archiver
/// from before the table): without it their lists would skip the archive. Idempotent; run by
/// `migrate` after the archive's migrations. Answers the buyers recorded.
pub async fn backfill_archived_users(archive: &Db, shards: &ShardMap, report: &MigrateReport) -> Result<u64> {
    // Rows per INSERT: far below the 65 535 placeholders a statement may bind.
    const CHUNK: usize = 1000;
    let new: Vec<&super::shards::Shard> = shards
        .all()
        .iter()
        .filter(|s| {
            let applied = format!("shard_{} v6", s.index.suffix());
            report.applied.contains(&applied)
        })
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    // A loose scan of `idx_user_created`: one row per buyer.
    let users: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT user_id FROM archived_orders")
        .fetch_all(archive)
        .await?;
    let mut recorded = 0;
    for shard in new {
        let mine: Vec<i64> = users
            .iter()
            .copied()
            .filter(|u| {
                crate::domain::ids::UserId::new(*u).is_some_and(|u| shards.of_user(u).index == shard.index)
            })
            .collect();
        for chunk in mine.chunks(CHUNK) {
            let sql = format!(
                "INSERT IGNORE INTO {} (user_id, since) VALUES {}",
                shard.tables.archived_users,
                vec!["(?, UTC_TIMESTAMP(6))"; chunk.len()].join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                q = q.bind(*u);
            }
            recorded += q.execute(shards.primary(shard)).await?.rows_affected();
        }
    }
    Ok(recorded)
}

/// Creates every table of the merchant copy on its database.
pub async fn migrate_merchant(map: &MerchantMap) -> Result<MigrateReport> {
    let mut report = MigrateReport::default();
    for t in map.tables() {
        let scope = format!("merchant_{:02}", t.index);
        apply(
            map.pool(t),
            &scope,
            MERCHANT,
            |s| s.replace("{merchant_orders}", &t.name),
            &mut report,
        )
        .await?;
    }
    Ok(report)
}

/// Creates every table of the commerce database and of every shard on its server.
pub async fn migrate(commerce: &Db, shards: &ShardMap) -> Result<MigrateReport> {
    let mut report = MigrateReport::default();
    apply(commerce, "commerce", COMMERCE, str::to_owned, &mut report).await?;
    for shard in shards.all() {
        let scope = format!("shard_{}", shard.index.suffix());
        let pool = shards.primary(shard);
        apply(pool, &scope, SHARD, |s| render(s, &shard.tables), &mut report).await?;
    }
    if report.applied.iter().any(|m| m == "commerce v3") {
        backfill_payment_numbers(commerce, shards).await?;
    }
    Ok(report)
}

/// Claims, in `payment_numbers`, every number already recorded on the shards, so that none
/// of them can pay or refund another order once the cross-shard check is in force. Run by
/// the migration that creates the table; idempotent (a number already claimed is kept).
/// Returns the numbers claimed now.
pub async fn backfill_payment_numbers(commerce: &Db, shards: &ShardMap) -> Result<u64> {
    // Rows per INSERT: 7 placeholders each, far below the 65 535 a statement may bind.
    const CHUNK: usize = 500;
    let mut claimed = 0;
    for shard in shards.all() {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT transaction_no, kind, order_id, channel, amount, created_at FROM {}",
            shard.tables.payments
        )))
        .fetch_all(shards.primary(shard))
        .await?;
        for chunk in rows.chunks(CHUNK) {
            let sql = format!(
                "INSERT IGNORE INTO payment_numbers
                    (transaction_no, kind, order_id, channel, amount, attempt, created_at)
                 VALUES {}",
                vec!["(?, ?, ?, ?, ?, 0, ?)"; chunk.len()].join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.try_get::<String, _>(0)?)
                    .bind(r.try_get::<i8, _>(1)?)
                    .bind(r.try_get::<i64, _>(2)?)
                    .bind(r.try_get::<String, _>(3)?)
                    .bind(r.try_get::<i64, _>(4)?)
                    .bind(r.try_get::<chrono::NaiveDateTime, _>(5)?);
            }
            claimed += q.execute(commerce).await?.rows_affected();
        }
    }
    Ok(claimed)
}
