//! The shard map: for each table shard, the database that holds it and its table names.
//!
//! Built once from settings. A request finds its shard from the order id's gene or the
//! user's hash ([`crate::domain::shard`]) and gets a [`Shard`]: its [`Database`] (primary and
//! replicas) and its table names. Moving shards to more servers is a change of the settings, not of code.

use crate::storage::Db;
use std::sync::Arc;

use crate::config::Settings;
use crate::domain::ids::{OrderId, UserId};
use crate::domain::shard::{ShardCount, ShardIndex};

use super::replicas::Database;
use super::{corrupt, Result};
use crate::domain::consistency::DatabaseRef;

/// The four table names of one shard.
#[derive(Debug, Clone)]
pub struct ShardTables {
    pub orders: String,
    pub items: String,
    pub payments: String,
    pub discounts: String,
    /// Order ids the sweeper declared dead (their reservation was given back): a create of
    /// such an id that arrives late must not write the order.
    pub voids: String,
    /// Buyers the archiver moved orders of out of this shard: a list asks the archive only
    /// for them (see [`super::orders::has_archived_orders`]).
    pub archived_users: String,
}

impl ShardTables {
    pub fn of(index: ShardIndex) -> Self {
        let s = index.suffix();
        ShardTables {
            orders: format!("orders_{s}"),
            items: format!("order_items_{s}"),
            payments: format!("order_payments_{s}"),
            discounts: format!("order_discounts_{s}"),
            voids: format!("order_voids_{s}"),
            archived_users: format!("archived_users_{s}"),
        }
    }
}

/// One table shard: where it lives and what its tables are called.
#[derive(Debug, Clone)]
pub struct Shard {
    pub index: ShardIndex,
    /// Index into [`ShardMap::databases`].
    pub database: usize,
    /// Shared, so a read can hand its query an owned copy (see [`Database::read`]).
    pub tables: Arc<ShardTables>,
}

/// Cheap to clone (one `Arc`): every request's state holds one.
#[derive(Debug, Clone)]
pub struct ShardMap(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    count: ShardCount,
    shards: Vec<Shard>,
    databases: Vec<Arc<Database>>,
}

impl ShardMap {
    /// Connects to every shard database of the settings.
    pub async fn connect(settings: &Settings) -> Result<ShardMap> {
        let count = settings.shard_count();
        let mut databases = Vec::new();
        let mut owner = vec![0usize; count.get() as usize];
        for (i, db) in settings.shards.databases.iter().enumerate() {
            let reference = DatabaseRef::Shards(u16::try_from(i).map_err(|_| corrupt("shard databases", i))?);
            databases.push(Arc::new(
                Database::connect(
                    &db.name,
                    reference,
                    &db.primary,
                    &db.replicas,
                    &settings.database,
                    &settings.replicas,
                )
                .await?,
            ));
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
        Ok(ShardMap(Arc::new(Inner {
            count,
            shards,
            databases,
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

    pub fn databases(&self) -> &[Arc<Database>] {
        &self.0.databases
    }

    /// The server of a shard, with its replicas.
    pub fn database(&self, shard: &Shard) -> &Database {
        &self.0.databases[shard.database]
    }

    /// The primary pool of a shard: the only handle that writes. Inside the crate only: the
    /// harness opens pools of its own (`orderly_testkit::raw`).
    pub(crate) fn primary(&self, shard: &Shard) -> &Db {
        self.0.databases[shard.database].write()
    }
}
