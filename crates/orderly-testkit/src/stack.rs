//! The one start-up sequence of everything the harness runs: start a local cluster, derive
//! the service's settings from it ([`cluster_settings`]), fit the pools into the servers,
//! let the caller adjust, validate, create the databases ([`create_databases`]) and migrate.
//! The tests (on their shared cluster), the playground and every bench start this way; what
//! each then seeds is its own.
//!
//! # Invariants
//! * A stack's databases, Redis keys, event stream and search index are named from its
//!   `db_prefix`, so several stacks share one cluster without seeing each other.
//! * With [`PoolFit`], every process the caller will start on the settings fits into every
//!   server's `max_connections` together (see [`orderly::app::fitting_pool_size`]).

use std::sync::Arc;

use sqlx::AssertSqlSafe;

use orderly::app::migrate;
use orderly::config::{MerchantDatabase, Settings, ShardDatabase};
use orderly::storage;
use orderly::storage::schema::MigrateReport;

use crate::cluster::{ClusterSpec, LocalCluster, MAX_CONNECTIONS};

/// The pools of `processes` processes like `serve`, each wanting `wanted` connections per
/// server: `database.max_connections` becomes `wanted` or fewer, so that they all fit.
#[derive(Debug, Clone, Copy)]
pub struct PoolFit {
    pub processes: u32,
    pub wanted: u32,
}

/// The databases of one stack on a cluster.
#[derive(Debug, Clone)]
pub struct StackSpec {
    /// What the settings start from (secret, listen address, limits, …); the cluster's
    /// addresses and the database names replace theirs.
    pub base: Settings,
    /// Prefix of every database name (and of the stream, the subjects and the search index).
    pub db_prefix: String,
    /// Table shards, split evenly over the cluster's MariaDB servers.
    pub shards: u32,
    /// Shrink the pools to fit; `None` keeps `base`'s `database.max_connections`.
    pub pool_fit: Option<PoolFit>,
}

/// A started stack: its cluster, and settings whose databases exist and are migrated.
pub struct Stack {
    pub cluster: Arc<LocalCluster>,
    pub settings: Settings,
    pub migrations: MigrateReport,
}

/// Starts a cluster of `cluster` and prepares `spec`'s databases on it (see [`prepare`]).
pub async fn start(
    cluster: ClusterSpec,
    spec: StackSpec,
    tweak: impl FnOnce(&mut Settings),
) -> anyhow::Result<Stack> {
    let cluster = Arc::new(LocalCluster::start(cluster).await?);
    let (settings, migrations) = prepare(&cluster, spec, tweak).await?;
    Ok(Stack {
        cluster,
        settings,
        migrations,
    })
}

/// On a running cluster: settings for `spec` from the cluster, pools fitted, then `tweak`,
/// validated; the databases created and migrated. Answers the settings and what migrating did.
pub async fn prepare(
    cluster: &LocalCluster,
    spec: StackSpec,
    tweak: impl FnOnce(&mut Settings),
) -> anyhow::Result<(Settings, MigrateReport)> {
    let mut settings = cluster_settings(spec.base, cluster, &spec.db_prefix, spec.shards);
    if let Some(fit) = spec.pool_fit {
        settings.database.max_connections =
            orderly::app::fitting_pool_size(&settings, fit.processes, MAX_CONNECTIONS, fit.wanted);
    }
    tweak(&mut settings);
    settings.validate()?;
    create_databases(&settings).await?;
    let report = migrate(&settings).await?;
    Ok((settings, report))
}

/// Settings for a local cluster: `shard_dbs[i]` holds an equal slice of the shards, the
/// commerce database lives on the first server; each database lists its server's replicas.
pub fn cluster_settings(base: Settings, cluster: &LocalCluster, db_prefix: &str, shards: u32) -> Settings {
    let mut s = base;
    let servers = cluster.mariadb_servers().len() as u32;
    let per = shards / servers;
    s.shards.count = shards;
    s.shards.databases = (0..servers)
        .map(|i| ShardDatabase {
            name: format!("orders{i}"),
            primary: cluster.mariadb(i as usize).url(&format!("{db_prefix}orders{i}")),
            replicas: cluster
                .replicas(i as usize)
                .iter()
                .map(|r| r.url(&format!("{db_prefix}orders{i}")))
                .collect(),
            first_shard: i * per,
            last_shard: if i + 1 == servers {
                shards - 1
            } else {
                (i + 1) * per - 1
            },
        })
        .collect();
    s.commerce.url = cluster.mariadb(0).url(&format!("{db_prefix}commerce"));
    // The merchant copy on the last server, away from the commerce database.
    let last = cluster.mariadb(servers as usize - 1);
    s.merchant.databases = vec![MerchantDatabase {
        url: last.url(&format!("{db_prefix}merchant")),
        first_table: 0,
        last_table: s.merchant.tables - 1,
    }];
    // The archive beside the commerce database: the same server by default, its own
    // database, so it can move to a cheaper server by changing one URL.
    s.archive.url = cluster.mariadb(0).url(&format!("{db_prefix}archive"));
    s.commerce.replicas = cluster
        .replicas(0)
        .iter()
        .map(|r| r.url(&format!("{db_prefix}commerce")))
        .collect();
    if let Some(url) = cluster.redis_url() {
        s.redis.url = url;
    }
    // A local cluster has no load balancer to see a process leave: shutdown stops at once.
    s.server.shutdown_delay_ms = 0;
    match cluster.nats_url() {
        Some(url) => s.events.nats_url = url,
        // Never the machine's own broker: no NATS in the cluster, no relay.
        None => s.events.relay = false,
    }
    // A throwaway cluster's search index lives and dies with it, one per set of databases.
    s.search.data_dir = cluster.dir().join(format!("{db_prefix}search"));
    // A stream and subject space per set of databases, so services sharing one broker
    // (the tests' apps) keep their events apart.
    let tag: String = db_prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let tag = tag.trim_matches('_');
    if !tag.is_empty() {
        s.events.stream = format!("{tag}_ORDERS");
        s.events.subject_prefix = tag.to_owned();
    }
    s
}

/// Creates the databases named by `settings` on their servers.
pub async fn create_databases(settings: &Settings) -> anyhow::Result<()> {
    let urls = settings
        .shards
        .databases
        .iter()
        .map(|d| d.primary.clone())
        .chain([settings.commerce.url.clone(), settings.archive.url.clone()])
        .chain(settings.merchant.databases.iter().map(|d| d.url.clone()));
    for url in urls {
        // `mysql://user:pw@host:port/db?params`: the parameters (TLS among them) stay.
        let bad = || anyhow::anyhow!("bad url {url}");
        let authority_end = url.find("://").ok_or_else(bad)? + 3;
        let slash = authority_end + url[authority_end..].find('/').ok_or_else(bad)?;
        let (server, rest) = (&url[..slash], &url[slash + 1..]);
        let (db, params) = rest.split_once('?').unwrap_or((rest, "ssl-mode=disabled"));
        let pool = storage::connect(&format!("{server}/?{params}"), &settings.database).await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4"
        )))
        .execute(&pool)
        .await?;
        pool.close().await;
    }
    Ok(())
}
