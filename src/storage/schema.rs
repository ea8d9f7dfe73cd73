//! The schema and `orderly migrate`.
//!
//! Migrations are numbered and recorded per *scope* in `schema_migrations` on each database:
//! `commerce` on the commerce database, `shard_NN` for each table shard on the server that
//! holds it, `merchant_NN` for each table of the merchant copy, `archive` on the archive's.
//! Applying is idempotent (`CREATE TABLE IF NOT EXISTS` plus the record), so a migrate
//! interrupted halfway is simply run again. [`Databases`] is every database of a deployment:
//! `orderly migrate` applies ([`Databases::migrate`]), `orderly migrate status` reports
//! ([`Databases::status`]), `orderly migrate --dry-run` prints ([`Databases::plan`]), and
//! `serve` and `relay` check ([`Databases::refuse_pending`]).
//!
//! # Invariants
//! * One migrate at a time per database: applying holds the named lock
//!   `orderly_migrate.<database>` (`GET_LOCK`, on the connection that runs every statement and
//!   reads what is recorded), so a second migrate waits, then finds every version recorded and
//!   applies nothing. A migrate that dies releases the lock with its connection.
//! * A released migration's text never changes: each record keeps the SHA-256 of the
//!   statements that were applied (`checksum`), and `orderly migrate status` reports a
//!   version whose compiled-in text differs. Change a schema with a new version instead
//!   (a unit test pins every checksum).
//! * The bookkeeping table migrates like the rest, as scope `schema_migrations`, first on
//!   every database (its v1 added `checksum`). Versions recorded before it have their checksum
//!   recorded by the next migrate, from the text that migrate carries.
//! * `serve` and `relay` refuse to start while a version is pending on any database: the
//!   code would meet tables or columns it needs missing in the middle of requests.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::mysql::MySqlConnection;
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::config::Settings;
use crate::storage::Db;

use super::merchant::MerchantMap;
use super::shards::{ShardMap, ShardTables};
use super::{Result, StorageError};

/// The bookkeeping table as the first orderly created it; what it gained since is in
/// [`BOOKKEEPING`].
const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    scope VARCHAR(32) NOT NULL,
    version INT NOT NULL,
    description VARCHAR(200) NOT NULL,
    applied_at DATETIME(6) NOT NULL,
    PRIMARY KEY (scope, version)
) ENGINE=InnoDB";

/// How long `orderly migrate` waits by default for another migrate that holds a database's
/// lock: a migrate that builds an index on a large table takes minutes, and a deploy that
/// starts several migrate jobs at once should see the later ones wait for it, not fail.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(300);

/// The scope of the bookkeeping table's own migrations, on every database.
pub const BOOKKEEPING_SCOPE: &str = "schema_migrations";

/// The bookkeeping table's own migrations. `checksum` is the SHA-256 (hex) of the version's
/// statements as applied (see [`checksum`]); `NULL` on versions recorded before it, until
/// the next migrate records it.
const BOOKKEEPING: &[Migration] = &[Migration {
    version: 1,
    description: "the checksum of each applied version",
    statements: &[
        "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum CHAR(64) CHARACTER SET ascii NULL AFTER description",
    ],
}];

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

/// One version of a scope: statements applied in order, then recorded.
#[derive(Debug)]
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

/// What a migrate run did. Only the schema's versions count: the bookkeeping table's own
/// ([`BOOKKEEPING_SCOPE`]) are not in it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// `scope vN` of every version applied now.
    pub applied: Vec<String>,
    /// Versions found applied.
    pub already: usize,
}

impl MigrateReport {
    fn extend(&mut self, other: MigrateReport) {
        self.applied.extend(other.applied);
        self.already += other.already;
    }
}

/// The SHA-256 (lowercase hex) of a migration's statements as written here, each followed
/// by a NUL: the same for every shard (the table names are not filled in), and a different
/// one as soon as a statement's text changes.
fn checksum(m: &Migration) -> String {
    let mut hash = Sha256::new();
    for s in m.statements {
        hash.update(s.as_bytes());
        hash.update([0]);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a scope's statements name its tables.
#[derive(Debug, Clone)]
enum Names {
    /// As written.
    Plain,
    /// `{orders}`, `{items}`, … are the shard's tables.
    Shard(Arc<ShardTables>),
    /// `{merchant_orders}` is this table of the merchant copy.
    Merchant(String),
}

impl Names {
    fn render(&self, stmt: &str) -> String {
        match self {
            Names::Plain => stmt.to_owned(),
            Names::Shard(t) => stmt
                .replace("{orders}", &t.orders)
                .replace("{items}", &t.items)
                .replace("{payments}", &t.payments)
                .replace("{discounts}", &t.discounts)
                .replace("{voids}", &t.voids)
                .replace("{archived_users}", &t.archived_users),
            Names::Merchant(table) => stmt.replace("{merchant_orders}", table),
        }
    }
}

/// One scope of a database: its migrations, and the names its statements use.
#[derive(Debug, Clone)]
struct Scope {
    name: String,
    migrations: &'static [Migration],
    names: Names,
}

/// One version of one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub scope: String,
    pub version: i32,
    pub description: String,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{}", self.scope, self.version)
    }
}

impl Version {
    fn of(scope: &Scope, m: &Migration) -> Version {
        Version {
            scope: scope.name.clone(),
            version: m.version,
            description: m.description.to_owned(),
        }
    }
}

/// Where one database's schema stands against the migrations this build carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaStatus {
    /// The database's name in the settings (`commerce`, a shard database's `name`,
    /// `merchant0`, …, `archive`).
    pub database: String,
    /// Applied, with the checksum of the text this build carries.
    pub applied: Vec<Version>,
    /// Not applied yet: `orderly migrate` applies them.
    pub pending: Vec<Version>,
    /// Applied from a text other than the one this build carries: someone changed a released
    /// migration. The database may differ from what the code expects; compare by hand.
    pub mismatched: Vec<Version>,
    /// Applied before checksums were kept: `orderly migrate` records them.
    pub unrecorded: Vec<Version>,
    /// Recorded versions of this database's scopes that this build does not carry: applied
    /// by a newer orderly. Reported only.
    pub unknown: Vec<Version>,
}

impl SchemaStatus {
    /// Nothing for `orderly migrate` to do, and nothing changed behind its back: what
    /// `orderly migrate status` exits 0 for.
    pub fn is_up_to_date(&self) -> bool {
        self.pending.is_empty() && self.mismatched.is_empty() && self.unrecorded.is_empty()
    }
}

/// The versions of `list`, at most `MAX_LISTED` of them, then how many more.
fn listed(list: &[Version]) -> String {
    // Enough to recognise what is missing; a fresh database has ~200 pending versions.
    const MAX_LISTED: usize = 12;
    let mut text = list
        .iter()
        .take(MAX_LISTED)
        .map(Version::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > MAX_LISTED {
        text.push_str(&format!(" and {} more", list.len() - MAX_LISTED));
    }
    text
}

/// What `orderly migrate status` prints for one database: a line, then one indented line
/// per kind of trouble.
impl fmt::Display for SchemaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let applied = self.applied.len() + self.mismatched.len() + self.unrecorded.len();
        if self.pending.is_empty() {
            write!(f, "{}: {applied} versions applied, none pending", self.database)?;
        } else {
            write!(
                f,
                "{}: {applied} versions applied, {} pending: {}",
                self.database,
                self.pending.len(),
                listed(&self.pending)
            )?;
        }
        for m in &self.mismatched {
            write!(
                f,
                "\n  checksum mismatch: {m} ({}) was applied from another text than this build's",
                m.description
            )?;
        }
        if !self.unrecorded.is_empty() {
            write!(
                f,
                "\n  checksum not recorded (applied before checksums were kept): {}",
                listed(&self.unrecorded)
            )?;
        }
        if !self.unknown.is_empty() {
            write!(f, "\n  unknown to this build: {}", listed(&self.unknown))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Another migrate held the database's lock for all of `waited`.
    #[error(
        "database {database}: another `orderly migrate` held its lock for {}s; nothing was applied there",
        waited.as_secs()
    )]
    Busy { database: String, waited: Duration },
    /// Versions are pending on these databases (see [`Databases::refuse_pending`]).
    #[error("{}", pending_message(.0))]
    Pending(Vec<SchemaStatus>),
}

impl From<sqlx::Error> for SchemaError {
    fn from(e: sqlx::Error) -> Self {
        SchemaError::Storage(e.into())
    }
}

fn pending_message(behind: &[SchemaStatus]) -> String {
    let each: Vec<String> = behind
        .iter()
        .map(|s| {
            format!(
                "database {} has {} pending ({})",
                s.database,
                s.pending.len(),
                listed(&s.pending)
            )
        })
        .collect();
    format!(
        "the schema is behind this build: {}; run `orderly migrate`",
        each.join("; ")
    )
}

/// A row of `schema_migrations`.
struct Recorded {
    scope: String,
    version: i32,
    description: String,
    /// `None` before the bookkeeping's v1, or until the next migrate records it.
    checksum: Option<String>,
}

const ER_NO_SUCH_TABLE: u16 = 1146;
const ER_BAD_FIELD_ERROR: u16 = 1054;

/// Every row of `schema_migrations` on `conn`'s database: none when the table does not
/// exist yet, and no checksums before the bookkeeping's v1 added the column. Reads only.
async fn recorded(conn: &mut MySqlConnection) -> Result<Vec<Recorded>> {
    let with_checksum = sqlx::query("SELECT scope, version, description, checksum FROM schema_migrations")
        .fetch_all(&mut *conn)
        .await;
    let rows = match with_checksum {
        Ok(rows) => rows,
        Err(e) => match super::mysql_error_number(&e) {
            Some(ER_NO_SUCH_TABLE) => return Ok(Vec::new()),
            Some(ER_BAD_FIELD_ERROR) => {
                sqlx::query("SELECT scope, version, description, NULL FROM schema_migrations")
                    .fetch_all(&mut *conn)
                    .await?
            }
            _ => return Err(e.into()),
        },
    };
    rows.iter()
        .map(|r| {
            Ok(Recorded {
                scope: r.try_get(0)?,
                version: r.try_get(1)?,
                description: r.try_get(2)?,
                checksum: r.try_get(3)?,
            })
        })
        .collect()
}

/// The migrations of one database: the scopes it holds, in the order they apply, after the
/// bookkeeping table's own.
#[derive(Debug, Clone)]
pub struct DatabaseSchema {
    name: String,
    pool: Db,
    scopes: Vec<Scope>,
}

impl DatabaseSchema {
    fn new(name: &str, pool: &Db, scopes: Vec<Scope>) -> DatabaseSchema {
        let bookkeeping = Scope {
            name: BOOKKEEPING_SCOPE.to_owned(),
            migrations: BOOKKEEPING,
            names: Names::Plain,
        };
        DatabaseSchema {
            name: name.to_owned(),
            pool: pool.clone(),
            scopes: std::iter::once(bookkeeping).chain(scopes).collect(),
        }
    }

    /// The database's name in the settings.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the database stands (reads only). Its `pending` is what [`Self::pending`]
    /// answers.
    pub async fn status(&self) -> Result<SchemaStatus> {
        let mut conn = self.pool.acquire().await?;
        let rows = recorded(&mut conn).await?;
        let mut status = SchemaStatus {
            database: self.name.clone(),
            ..SchemaStatus::default()
        };
        for scope in &self.scopes {
            for m in scope.migrations {
                let v = Version::of(scope, m);
                match rows
                    .iter()
                    .find(|r| r.scope == scope.name && r.version == m.version)
                {
                    None => status.pending.push(v),
                    Some(r) => match &r.checksum {
                        None => status.unrecorded.push(v),
                        Some(c) if *c == checksum(m) => status.applied.push(v),
                        Some(_) => status.mismatched.push(v),
                    },
                }
            }
        }
        for r in rows {
            // Scopes of other settings (another database sharing this one) are theirs.
            let Some(scope) = self.scopes.iter().find(|s| s.name == r.scope) else {
                continue;
            };
            if !scope.migrations.iter().any(|m| m.version == r.version) {
                status.unknown.push(Version {
                    scope: r.scope,
                    version: r.version,
                    description: r.description,
                });
            }
        }
        Ok(status)
    }

    /// The versions `orderly migrate` would apply here: what readiness checks and what
    /// `serve` and `relay` refuse to start with. Reads only.
    pub async fn pending(&self) -> Result<Vec<Version>> {
        Ok(self.status().await?.pending)
    }

    /// The statements `orderly migrate` would run here, in order, each pending version's
    /// preceded by a `-- scope vN: description` comment; empty when there is nothing to do.
    /// Reads only.
    pub async fn plan(&self) -> Result<Vec<String>> {
        let mut conn = self.pool.acquire().await?;
        let rows = recorded(&mut conn).await?;
        let table_exists: bool = sqlx::query_scalar(
            "SELECT COUNT(*) > 0 FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = 'schema_migrations'",
        )
        .fetch_one(&mut *conn)
        .await?;
        let mut plan = Vec::new();
        if !table_exists {
            plan.push(MIGRATIONS_TABLE.to_owned());
        }
        let mut unrecorded = 0;
        for scope in &self.scopes {
            for m in scope.migrations {
                match rows
                    .iter()
                    .find(|r| r.scope == scope.name && r.version == m.version)
                {
                    Some(r) => unrecorded += usize::from(r.checksum.is_none()),
                    None => {
                        plan.push(format!("-- {} v{}: {}", scope.name, m.version, m.description));
                        plan.extend(m.statements.iter().map(|s| scope.names.render(s)));
                    }
                }
            }
        }
        if unrecorded > 0 {
            plan.push(format!(
                "-- record the checksums of {unrecorded} versions applied before checksums were kept"
            ));
        }
        Ok(plan)
    }

    /// Applies every pending version, holding the database's migrate lock (waiting at most
    /// `lock_wait` for another migrate to finish), and records the checksum of versions
    /// applied before checksums were kept.
    pub async fn migrate(&self, lock_wait: Duration) -> std::result::Result<MigrateReport, SchemaError> {
        // Its own connection: the lock lives on it, and a migrate that dies releases it.
        let mut conn = self.pool.acquire().await?.detach();
        let got: Option<i64> =
            sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('orderly_migrate.', DATABASE()), 64), ?)")
                .bind(lock_wait.as_secs_f64().ceil() as i64)
                .fetch_one(&mut conn)
                .await?;
        if got != Some(1) {
            return Err(SchemaError::Busy {
                database: self.name.clone(),
                waited: lock_wait,
            });
        }
        let applied = self.apply_locked(&mut conn).await;
        // Closing the connection would release it too; this says so at once.
        let released = sqlx::query("DO RELEASE_LOCK(LEFT(CONCAT('orderly_migrate.', DATABASE()), 64))")
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        let report = applied?;
        released?;
        Ok(report)
    }

    /// [`Self::migrate`]'s work, on the connection that holds the lock.
    async fn apply_locked(&self, conn: &mut MySqlConnection) -> Result<MigrateReport> {
        sqlx::query(MIGRATIONS_TABLE).execute(&mut *conn).await?;
        // Read under the lock: nobody else applies here until it is released.
        let rows = recorded(conn).await?;
        let mut report = MigrateReport::default();
        let mut checksums_recorded = 0;
        for scope in &self.scopes {
            let counted = scope.name != BOOKKEEPING_SCOPE;
            for m in scope.migrations {
                let sum = checksum(m);
                match rows
                    .iter()
                    .find(|r| r.scope == scope.name && r.version == m.version)
                {
                    Some(r) => {
                        report.already += usize::from(counted);
                        if r.checksum.is_none() {
                            // The bookkeeping's v1 is applied: it comes first.
                            sqlx::query(
                                "UPDATE schema_migrations SET checksum = ?
                                 WHERE scope = ? AND version = ? AND checksum IS NULL",
                            )
                            .bind(&sum)
                            .bind(&scope.name)
                            .bind(m.version)
                            .execute(&mut *conn)
                            .await?;
                            checksums_recorded += 1;
                        }
                    }
                    None => {
                        for stmt in m.statements {
                            sqlx::query(AssertSqlSafe(scope.names.render(stmt)))
                                .execute(&mut *conn)
                                .await?;
                        }
                        // IGNORE: a migrate of an older orderly takes no lock, and may have
                        // recorded it meanwhile.
                        sqlx::query(
                            "INSERT IGNORE INTO schema_migrations
                                (scope, version, description, checksum, applied_at)
                             VALUES (?, ?, ?, ?, NOW(6))",
                        )
                        .bind(&scope.name)
                        .bind(m.version)
                        .bind(m.description)
                        .bind(&sum)
                        .execute(&mut *conn)
                        .await?;
                        if counted {
                            report.applied.push(format!("{} v{}", scope.name, m.version));
                        }
                    }
                }
            }
        }
        if checksums_recorded > 0 {
            tracing::info!(
                database = %self.name,
                versions = checksums_recorded,
                "recorded the checksums of versions applied before checksums were kept"
            );
        }
        Ok(report)
    }
}

/// Every database of a deployment with its migrations, in the order they are applied: the
/// commerce database, each shard database, each database of the merchant copy, the archive.
pub struct Databases {
    commerce: Db,
    shards: ShardMap,
    archive: Db,
    list: Vec<DatabaseSchema>,
}

impl Databases {
    /// Over pools already open (`serve`'s).
    pub fn new(commerce: &Db, shards: &ShardMap, merchant: &MerchantMap, archive: &Db) -> Databases {
        let mut list = vec![DatabaseSchema::new(
            "commerce",
            commerce,
            vec![Scope {
                name: "commerce".into(),
                migrations: COMMERCE,
                names: Names::Plain,
            }],
        )];
        for (i, db) in shards.databases().iter().enumerate() {
            let scopes = shards
                .all()
                .iter()
                .filter(|s| s.database == i)
                .map(|s| Scope {
                    name: format!("shard_{}", s.index.suffix()),
                    migrations: SHARD,
                    names: Names::Shard(s.tables.clone()),
                })
                .collect();
            list.push(DatabaseSchema::new(db.name(), db.write(), scopes));
        }
        for (i, pool) in merchant.pools().iter().enumerate() {
            let scopes = merchant
                .tables()
                .iter()
                .filter(|t| t.database == i)
                .map(|t| Scope {
                    name: format!("merchant_{:02}", t.index),
                    migrations: MERCHANT,
                    names: Names::Merchant(t.name.clone()),
                })
                .collect();
            list.push(DatabaseSchema::new(&format!("merchant{i}"), pool, scopes));
        }
        list.push(DatabaseSchema::new(
            "archive",
            archive,
            vec![Scope {
                name: "archive".into(),
                migrations: ARCHIVE,
                names: Names::Plain,
            }],
        ));
        Databases {
            commerce: commerce.clone(),
            shards: shards.clone(),
            archive: archive.clone(),
            list,
        }
    }

    /// Opens a pool on every database of `settings` (`orderly migrate`, `orderly relay`).
    pub async fn connect(settings: &Settings) -> Result<Databases> {
        let shards = ShardMap::connect(settings).await?;
        let commerce = super::connect(&settings.commerce.url, &settings.database).await?;
        let merchant = MerchantMap::connect(&settings.merchant, &settings.database).await?;
        let archive = super::connect(&settings.archive.url, &settings.database).await?;
        Ok(Databases::new(&commerce, &shards, &merchant, &archive))
    }

    pub fn list(&self) -> &[DatabaseSchema] {
        &self.list
    }

    /// Where each database stands (reads only).
    pub async fn status(&self) -> Result<Vec<SchemaStatus>> {
        let mut all = Vec::with_capacity(self.list.len());
        for db in &self.list {
            all.push(db.status().await?);
        }
        Ok(all)
    }

    /// The statements `orderly migrate` would run, per database (reads only). The backfills
    /// that follow some versions are named in a comment where they would run.
    pub async fn plan(&self) -> Result<Vec<(String, Vec<String>)>> {
        let mut all = Vec::with_capacity(self.list.len());
        for db in &self.list {
            all.push((db.name.clone(), db.plan().await?));
        }
        let new_archived_users = all
            .iter()
            .flat_map(|(_, plan)| plan)
            .any(|s| s.starts_with("-- shard_") && s.contains(" v6:"));
        for (name, plan) in &mut all {
            if name == "commerce" && plan.iter().any(|s| s.starts_with("-- commerce v3:")) {
                plan.push("-- then: claim every payment number already on the shards (backfill)".into());
            }
            if name == "archive" && new_archived_users {
                plan.push("-- then: record the buyers with archived orders of each new archived_users table (backfill)".into());
            }
        }
        Ok(all)
    }

    /// Applies every pending version, database after database, each under its migrate lock
    /// (see [`DatabaseSchema::migrate`]), then the backfills some versions call for.
    pub async fn migrate(&self, lock_wait: Duration) -> std::result::Result<MigrateReport, SchemaError> {
        let mut report = MigrateReport::default();
        for db in &self.list {
            report.extend(db.migrate(lock_wait).await?);
        }
        if report.applied.iter().any(|m| m == "commerce v3") {
            backfill_payment_numbers(&self.commerce, &self.shards).await?;
        }
        backfill_archived_users(&self.archive, &self.shards, &report).await?;
        Ok(report)
    }

    /// `Ok` when no version is pending on any database; else [`SchemaError::Pending`],
    /// naming each database behind and its versions. A checksum mismatch is logged, not
    /// refused: the schema is there, from another text.
    pub async fn refuse_pending(&self) -> std::result::Result<(), SchemaError> {
        let mut behind = Vec::new();
        for status in self.status().await? {
            for m in &status.mismatched {
                tracing::warn!(
                    database = %status.database,
                    version = %m,
                    "migration applied from another text than this build's (see `orderly migrate status`)"
                );
            }
            if !status.pending.is_empty() {
                behind.push(status);
            }
        }
        match behind.is_empty() {
            true => Ok(()),
            false => Err(SchemaError::Pending(behind)),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scope's migrations, by name.
    fn all() -> [(&'static str, &'static [Migration]); 5] {
        [
            (BOOKKEEPING_SCOPE, BOOKKEEPING),
            ("commerce", COMMERCE),
            ("shard", SHARD),
            ("merchant", MERCHANT),
            ("archive", ARCHIVE),
        ]
    }

    /// The checksum of every released version. A released migration never changes (the
    /// databases that applied it keep its old text's checksum, and `orderly migrate status`
    /// would report every one of them): change the schema with a new version, and add its
    /// line here.
    const RELEASED: &[(&str, i32, &str)] = &[
        (
            "schema_migrations",
            1,
            "9d72008835950c4ddb13ab2f00c506a71027c1bddf1b18f0d370ba57b6dbcb3b",
        ),
        (
            "commerce",
            1,
            "30df627fab837605172e305b10b7e51455c6e9418bf17957160c3ef5e194dd30",
        ),
        (
            "commerce",
            2,
            "95c274ad972e961b80b3bb676d3b11e5a089a4a0adb845073e151efd52a4246b",
        ),
        (
            "commerce",
            3,
            "5562eda38f9037d4bbdc95ff709cc8130f5cdfea2dd7410746594cb0f9cd7230",
        ),
        (
            "commerce",
            4,
            "0f4a5730b437222b8f00f50cd51cc8fbfc7e722320ce162151e9f5f412890554",
        ),
        (
            "commerce",
            5,
            "76fa62915f4ef3a4f32cae098f99d1906e311f4cb2cdf31296f2b4315da09478",
        ),
        (
            "commerce",
            6,
            "78676e0f74177d8a3c3f0172bc735b8824a44450417d9e3802dfea839f811e18",
        ),
        (
            "commerce",
            7,
            "5b68cf5906fd15645ce7ae18a1a2aafc02a8031641d629beda7df814f3b5a3ec",
        ),
        (
            "shard",
            1,
            "c64fca9ab9004f6839559c76b7786fe59c7101cbbf974a0291b50924262008fa",
        ),
        (
            "shard",
            2,
            "89850a822b4c6726a84d028d3bd2a9340e48c0b1bc24bf266cd2329cf77abb14",
        ),
        (
            "shard",
            3,
            "4e108dd908af1b792a3664923b3f4893f2f22b7ebfa7ed8b9bd28b1f10fc2f66",
        ),
        (
            "shard",
            4,
            "958c8591506db24520d75b5bdf23fa9b4fa512dc5990a5b93c4ed2a4c153ce29",
        ),
        (
            "shard",
            5,
            "1ebd6b6ba2c64988f901c6ee9cd980d67c0a9772c93bdc2ff20c7cd52ced1460",
        ),
        (
            "shard",
            6,
            "485c0bcdc6d956a6274407487fa07601abadd0d1559f19cb3ed714291da9630d",
        ),
        (
            "merchant",
            1,
            "c8a53d418b12351caba28657240c3549af0b32c397b19d3d555239a00aaa0bb7",
        ),
        (
            "archive",
            1,
            "3438a370db506e8c6933bc112118fa8be06569c3cd13a73aea4aa3d92801a25b",
        ),
        (
            "archive",
            2,
            "958c8591506db24520d75b5bdf23fa9b4fa512dc5990a5b93c4ed2a4c153ce29",
        ),
        (
            "archive",
            3,
            "1ebd6b6ba2c64988f901c6ee9cd980d67c0a9772c93bdc2ff20c7cd52ced1460",
        ),
    ];

    #[test]
    fn released_migrations_keep_their_text() {
        let mut found = Vec::new();
        for (scope, migrations) in all() {
            for m in migrations {
                found.push((scope, m.version, checksum(m)));
            }
        }
        let found: Vec<(&str, i32, &str)> = found.iter().map(|(s, v, c)| (*s, *v, c.as_str())).collect();
        assert_eq!(found, RELEASED);
    }

    /// Versions run 1, 2, 3, … in each scope: a status lists them in order, and a gap would
    /// be a version nobody can tell from one not written yet.
    #[test]
    fn versions_are_consecutive_from_1() {
        for (scope, migrations) in all() {
            let versions: Vec<i32> = migrations.iter().map(|m| m.version).collect();
            let expected: Vec<i32> = (1..=migrations.len() as i32).collect();
            assert_eq!(versions, expected, "{scope}");
        }
    }

    /// A shard's and a merchant table's statements leave no placeholder unfilled.
    #[test]
    fn every_placeholder_is_filled() {
        let shard = Names::Shard(Arc::new(ShardTables::of(
            crate::domain::shard::ShardCount::new(32)
                .unwrap()
                .all()
                .nth(7)
                .unwrap(),
        )));
        let merchant = Names::Merchant("merchant_orders_03".into());
        for (names, migrations) in [
            (shard, SHARD),
            (merchant, MERCHANT),
            (Names::Plain, COMMERCE),
            (Names::Plain, ARCHIVE),
        ] {
            for m in migrations {
                for s in m.statements {
                    let rendered = names.render(s);
                    assert!(!rendered.contains('{'), "{names:?}: {rendered}");
                }
            }
        }
    }

    /// What `orderly migrate status` prints for a database: one line when all is well, a
    /// line per kind of trouble otherwise.
    #[test]
    fn a_status_reads_as_one_line_per_database_and_per_trouble() {
        let v = |scope: &str, version: i32| Version {
            scope: scope.into(),
            version,
            description: "d".into(),
        };
        let good = SchemaStatus {
            database: "commerce".into(),
            applied: vec![v("schema_migrations", 1), v("commerce", 1)],
            ..SchemaStatus::default()
        };
        assert!(good.is_up_to_date());
        assert_eq!(good.to_string(), "commerce: 2 versions applied, none pending");
        let bad = SchemaStatus {
            database: "orders0".into(),
            applied: vec![v("shard_00", 1)],
            pending: (1..=14).map(|i| v("shard_01", i)).collect(),
            mismatched: vec![v("shard_00", 2)],
            ..SchemaStatus::default()
        };
        assert!(!bad.is_up_to_date());
        assert_eq!(
            bad.to_string(),
            "orders0: 2 versions applied, 14 pending: shard_01 v1, shard_01 v2, shard_01 v3, \
             shard_01 v4, shard_01 v5, shard_01 v6, shard_01 v7, shard_01 v8, shard_01 v9, \
             shard_01 v10, shard_01 v11, shard_01 v12 and 2 more\n  \
             checksum mismatch: shard_00 v2 (d) was applied from another text than this build's"
        );
        let error = SchemaError::Pending(vec![bad]).to_string();
        assert!(
            error.starts_with(
                "the schema is behind this build: database orders0 has 14 pending (shard_01 v1,"
            ),
            "{error}"
        );
        assert!(error.ends_with("and 2 more); run `orderly migrate`"), "{error}");
    }
}
