//! The connection budget: a MariaDB server takes at most `max_connections` clients (and
//! `max_user_connections` per account, when set). A process whose pools can open more than
//! that against one server meets "Too many connections" under load, and so do processes that
//! together can. Such a refusal is answered 503 (see [`super::StorageError::is_transient`]),
//! but a service sized to fit never has to.
//!
//! - [`check`] reads each server's limits once and warns (a `WARN` log line with the numbers)
//!   when the pools of one process, counted per server (primary pools, replica pools and any
//!   other pool or connection the process opens there), cannot fit.
//! - [`fitting_pool_size`] sizes the pools of several processes started together (the bench,
//!   the playground) so that they fit.
//!
//! A server is named by its host and port (or socket), so databases that share a server
//! share its budget.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// One pool (or long-held connection) a process opens, with the most connections it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPool {
    /// What logs call it (`orders0`, `orders0/r0`, `commerce lease`, …).
    pub name: String,
    pub url: String,
    pub connections: u32,
}

/// What one process may open against one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDemand {
    /// The pools there, by name.
    pub pools: Vec<String>,
    pub connections: u32,
    /// A URL of the server, to read its limits with.
    pub url: String,
}

/// A server's limits on clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_connections: u32,
    /// 0: no limit per account.
    pub max_user_connections: u32,
}

impl ServerLimits {
    /// What one account (every pool of ours logs in as one) may open.
    pub fn allowed(&self) -> u32 {
        match self.max_user_connections {
            0 => self.max_connections,
            n => n.min(self.max_connections),
        }
    }
}

/// `host:port` (or the socket) of `url`; `None` when it does not parse.
pub fn server_of(url: &str) -> Option<String> {
    let opts: MySqlConnectOptions = url.parse().ok()?;
    Some(match opts.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", opts.get_host(), opts.get_port()),
    })
}

/// `pools` summed per server.
pub fn per_server(pools: &[PlannedPool]) -> BTreeMap<String, ServerDemand> {
    let mut servers: BTreeMap<String, ServerDemand> = BTreeMap::new();
    for pool in pools {
        let Some(server) = server_of(&pool.url) else {
            continue;
        };
        let demand = servers.entry(server).or_insert_with(|| ServerDemand {
            pools: Vec::new(),
            connections: 0,
            url: pool.url.clone(),
        });
        demand.pools.push(pool.name.clone());
        demand.connections += pool.connections;
    }
    servers
}

/// Reads the limits of the server behind `url` on a connection of its own, closed after.
pub async fn server_limits(url: &str) -> Result<ServerLimits, sqlx::Error> {
    // Any account can open `information_schema`; the URL's database may not exist yet.
    let opts = url.parse::<MySqlConnectOptions>()?.database("information_schema");
    let mut conn = opts.connect().await?;
    let (max_connections, max_user_connections): (i64, i64) =
        sqlx::query_as("SELECT CAST(@@max_connections AS SIGNED), CAST(@@max_user_connections AS SIGNED)")
            .fetch_one(&mut conn)
            .await?;
    let _ = conn.close().await;
    let clamp = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
    Ok(ServerLimits {
        max_connections: clamp(max_connections),
        max_user_connections: clamp(max_user_connections),
    })
}

/// A server the pools of one process cannot fit into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overcommit {
    pub server: String,
    pub demand: ServerDemand,
    pub limits: ServerLimits,
}

/// Compares, once per server, what `pools` may open with what the server allows, and warns
/// for each server they cannot fit into. A server that does not answer within `timeout` is
/// skipped (a replica down at start: its pool opens lazily, and the probe reports it).
pub async fn check(pools: &[PlannedPool], timeout: Duration) -> Vec<Overcommit> {
    // All servers at once: one that hangs delays the start by `timeout`, not once per server.
    let servers = per_server(pools);
    let limits = futures::future::join_all(
        servers
            .values()
            .map(|d| tokio::time::timeout(timeout, server_limits(&d.url))),
    )
    .await;
    let mut over = Vec::new();
    for ((server, demand), limits) in servers.into_iter().zip(limits) {
        let limits = match limits {
            Ok(Ok(limits)) => limits,
            Ok(Err(e)) => {
                tracing::info!(%server, error = %e, "cannot read the server's max_connections");
                continue;
            }
            Err(_) => {
                tracing::info!(%server, "the server's max_connections did not come in time");
                continue;
            }
        };
        if demand.connections > limits.allowed() {
            tracing::warn!(
                %server,
                connections = demand.connections,
                max_connections = limits.max_connections,
                max_user_connections = limits.max_user_connections,
                pools = %demand.pools.join(", "),
                "the database pools of this process can open {} connections to {server}, which \
                 allows {}: under load requests will meet 'Too many connections' (503); lower \
                 database.max_connections or raise the server's max_connections",
                demand.connections,
                limits.allowed(),
            );
            over.push(Overcommit {
                server,
                demand,
                limits,
            });
        }
    }
    over
}

/// The largest pool size, at most `wanted` and at least 1, at which `processes` processes
/// whose pools `plan(size)` describes fit together into `max_connections` on every server.
pub fn fitting_pool_size(
    wanted: u32,
    processes: u32,
    max_connections: u32,
    plan: impl Fn(u32) -> Vec<PlannedPool>,
) -> u32 {
    (1..=wanted.max(1))
        .rev()
        .find(|&size| {
            per_server(&plan(size))
                .values()
                .all(|d| d.connections * processes <= max_connections)
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, url: &str, connections: u32) -> PlannedPool {
        PlannedPool {
            name: name.into(),
            url: url.into(),
            connections,
        }
    }

    #[test]
    fn pools_are_summed_per_server_whatever_their_database() {
        let pools = [
            pool("orders0", "mysql://u:p@127.0.0.1:3306/orders0", 16),
            pool(
                "commerce",
                "mysql://u:p@127.0.0.1:3306/commerce?ssl-mode=disabled",
                16,
            ),
            pool("lease", "mysql://u:p@127.0.0.1:3306/commerce", 2),
            pool("orders0/r0", "mysql://u:p@127.0.0.1:3307/orders0", 16),
        ];
        let servers = per_server(&pools);
        assert_eq!(servers.len(), 2);
        assert_eq!(servers["127.0.0.1:3306"].connections, 34);
        assert_eq!(servers["127.0.0.1:3306"].pools, ["orders0", "commerce", "lease"]);
        assert_eq!(servers["127.0.0.1:3307"].connections, 16);
    }

    #[test]
    fn the_fitting_pool_size_keeps_every_server_within_its_limit() {
        // Three pools of `size` and four fixed connections on one server, one pool on another.
        let plan = |size: u32| {
            vec![
                pool("a", "mysql://u:p@h:1/a", size),
                pool("b", "mysql://u:p@h:1/b", size),
                pool("c", "mysql://u:p@h:1/c", size),
                pool("fixed", "mysql://u:p@h:1/c", 4),
                pool("d", "mysql://u:p@h:2/d", size),
            ]
        };
        // 4 processes × (3 × 40 + 4) = 496 ≤ 500; 41 would be 508.
        assert_eq!(fitting_pool_size(64, 4, 500, plan), 40);
        assert_eq!(fitting_pool_size(16, 4, 500, plan), 16, "what was asked for fits");
        assert_eq!(fitting_pool_size(64, 400, 500, plan), 1, "never below one");
    }

    #[test]
    fn an_account_limit_tighter_than_the_server_is_what_counts() {
        let limits = |max_connections, max_user_connections| ServerLimits {
            max_connections,
            max_user_connections,
        };
        assert_eq!(limits(500, 0).allowed(), 500);
        assert_eq!(limits(500, 100).allowed(), 100);
        assert_eq!(limits(50, 100).allowed(), 50);
    }
}
