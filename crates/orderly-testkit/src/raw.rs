//! Raw SQL of the harness: pools of its own on the databases the settings name, and the
//! shard routing to find a row. The benches' raw baselines (the same SQL without the service
//! around it) and the tests' row checks go through here; the service never hands out its
//! pools.
//!
//! # Invariants
//! * Every pool here is the harness's own, opened from the settings' URLs: nothing it does
//!   queues behind, or holds a connection of, the service under test.
//! * Routing is the service's own ([`ShardCount`], [`ShardTables`]): a row is looked for
//!   where the service put it.
//! * What is written here bypasses the service's commit point on purpose (baselines,
//!   fixtures of broken states); the service's own writes never come through this module.

use std::sync::Arc;

use orderly::config::Settings;
use orderly::domain::ids::{OrderId, UserId};
use orderly::domain::shard::{ShardCount, ShardIndex};
use orderly::storage::shards::{Shard, ShardTables};
use orderly::storage::{self, Db, StorageError};

/// A pool of `settings.database`'s size that pings before every checkout, with the
/// service's session settings (READ COMMITTED).
async fn checked_pool(url: &str, settings: &Settings) -> Result<Db, StorageError> {
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .test_before_acquire(true)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(Db::unkept(pool, "checked"))
}

/// The harness's pools: the primary of every shard database and the commerce database, with
/// the routing of order ids and users to their table shards. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RawDb(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    count: ShardCount,
    shards: Vec<Shard>,
    /// Primaries of `settings.shards.databases`, in that order.
    databases: Vec<Db>,
    commerce: Db,
}

impl RawDb {
    /// Opens pools on every shard database's primary and on the commerce database of
    /// `settings` (each of `settings.database`'s size).
    pub async fn connect(settings: &Settings) -> Result<RawDb, StorageError> {
        Self::open(settings, false).await
    }

    /// Like [`RawDb::connect`], with pools that ping a connection before handing it out: for
    /// the tests' row checks, which must work after a server was killed and restarted under
    /// an idle pool. (The benches keep the service's pools without the ping, so that their
    /// raw baselines pay what the service pays.)
    pub async fn connect_checked(settings: &Settings) -> Result<RawDb, StorageError> {
        Self::open(settings, true).await
    }

    async fn open(settings: &Settings, checked: bool) -> Result<RawDb, StorageError> {
        let pool = |url: &str| {
            let url = url.to_owned();
            async move {
                if checked {
                    checked_pool(&url, settings).await
                } else {
                    storage::connect(&url, &settings.database).await
                }
            }
        };
        let count = settings.shard_count();
        let mut owner = vec![0usize; count.get() as usize];
        let mut databases = Vec::new();
        for (i, db) in settings.shards.databases.iter().enumerate() {
            databases.push(pool(&db.primary).await?);
            for s in db.first_shard..=db.last_shard {
                owner[s as usize] = i;
            }
        }
        let shards = count
            .all()
            .map(|index| Shard {
                index,
                database: owner[index.get() as usize],
                tables: Arc::new(ShardTables::of(index)),
            })
            .collect();
        let commerce = pool(&settings.commerce.url).await?;
        Ok(RawDb(Arc::new(Inner {
            count,
            shards,
            databases,
            commerce,
        })))
    }

    pub fn count(&self) -> ShardCount {
        self.0.count
    }

    pub fn shard(&self, index: ShardIndex) -> &Shard {
        &self.0.shards[index.get() as usize]
    }

    pub fn of_order(&self, id: OrderId) -> &Shard {
        self.shard(self.0.count.shard_of_gene(id.gene()))
    }

    pub fn of_user(&self, user: UserId) -> &Shard {
        self.shard(self.0.count.shard_of_user(user))
    }

    pub fn all(&self) -> &[Shard] {
        &self.0.shards
    }

    /// The primary of `shard`'s database.
    pub fn primary(&self, shard: &Shard) -> &Db {
        &self.0.databases[shard.database]
    }

    /// The primary of every shard database, in the settings' order.
    pub fn databases(&self) -> &[Db] {
        &self.0.databases
    }

    /// The commerce database.
    pub fn commerce(&self) -> &Db {
        &self.0.commerce
    }
}

/// A timestamp as the shards store it (UTC, no zone), as the service's storage writes it.
pub fn ts(t: chrono::DateTime<chrono::Utc>) -> chrono::NaiveDateTime {
    t.naive_utc()
}

/// The raw baseline's outbox write: the `created` event of the order `id` just inserted
/// into `t`, in the caller's transaction, with the same statements as the service's outbox
/// (read the snapshot, then a plain `INSERT`), so that the baseline pays what the service
/// pays. Not the service's code path: the events bench compares against it.
pub async fn insert_created_event(
    conn: &mut sqlx::MySqlConnection,
    t: &ShardTables,
    id: OrderId,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StorageError> {
    use sqlx::{AssertSqlSafe, Row};
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT o.version, o.shop_id, {} FROM {} o WHERE o.order_id = ?",
        orderly::storage::outbox::snapshot_json(t),
        t.orders
    )))
    .bind(id.get())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StorageError::Corrupt(format!("raw outbox: no order row for {id}")))?;
    let version: i64 = row.try_get(0)?;
    let shop: i64 = row.try_get(1)?;
    let payload: String = row.try_get(2)?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (order_id, version, shop_id, kind, payload, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
        orderly::storage::outbox::TABLE
    )))
    .bind(id.get())
    .bind(version)
    .bind(shop)
    .bind(orderly::domain::events::EventKind::Created.name())
    .bind(payload)
    .bind(ts(now))
    .execute(conn)
    .await?;
    Ok(())
}
