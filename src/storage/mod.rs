//! Storage: MariaDB access for the order shards and the commerce database.
//!
//! - [`shards`] owns the shard map: which server holds which table shard, and the table
//!   names. Table names come only from here, never from input.
//! - [`schema`] creates the tables (`orderly migrate`).
//! - [`replicas`] is one server with its read replicas: the read/write split, read-your-writes
//!   by GTID, replica health and rotation.
//! - [`budget`] weighs the connections a process's pools may open against what each server
//!   allows (`max_connections`), and sizes pools of processes started together to fit.
//! - [`archive`] is the SQL of the archive: old final orders as one document each, out of
//!   the hot shards.
//! - [`carts`] is the SQL of carts, the write-behind copy of what Redis holds.
//! - [`merchant`] is the merchant copy of the orders, sharded by shop, with its daily
//!   reports (a read model the event stream keeps).
//! - [`flash`] is the SQL of flash sales (their units are taken in [`commerce::reserve`]).
//! - [`orders`] is the SQL of the order tables, one concern per file, with the one door
//!   (`orders/commit.rs`): the only file that writes an order row or an order event, on a
//!   shard or in the archive (`tests/one_door.rs` fails on a write anywhere else); [`outbox`]
//!   reads the order events the door writes with every order change, for the relay;
//!   [`commerce`] is the SQL of users, shops, products and coupons, order claims and stock
//!   reservations, and payment numbers.
//!
//! Every write that must not be lost or doubled is a compare-and-set in one statement or one
//! short transaction. A duplicate-key error (MySQL 1062) is translated here, in one place,
//! into [`StorageError::Duplicate`]; the layers above decide what it means (replay, conflict).

pub mod archive;
pub mod budget;
pub mod carts;
pub mod commerce;
pub mod flash;
pub mod merchant;
pub mod orders;
pub mod outbox;
pub mod pool;
pub mod replicas;
pub mod schema;
pub mod shards;

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions};

use crate::config::DatabaseSettings;

pub use pool::{Conn, Db};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A unique key already holds this value (MySQL error 1062).
    #[error("duplicate key: {0}")]
    Duplicate(String),
    #[error("database error: {0}")]
    Db(#[source] sqlx::Error),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
}

const ER_DUP_ENTRY: u16 = 1062;
const ER_LOCK_DEADLOCK: u16 = 1213;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

/// The server has no connection to give now: "Too many connections" (`max_connections`
/// taken), the account's `max_user_connections`, or its hourly limits. Said while logging in,
/// before any statement ran: nothing was done, and a later attempt may find a place.
const REFUSED_CONNECTION: [u16; 3] = [
    1040, // ER_CON_COUNT_ERROR
    1203, // ER_TOO_MANY_USER_CONNECTIONS
    1226, // ER_USER_LIMIT_REACHED
];

/// The server ended the connection under a statement: shutting down, or the connection was
/// killed. Like a lost connection, the outcome of a write in flight is unknown.
const ENDED_CONNECTION: [u16; 2] = [
    1053, // ER_SERVER_SHUTDOWN
    1927, // ER_CONNECTION_KILLED
];

/// The MySQL error number (not the SQLSTATE) of a server error.
fn mysql_error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db.try_downcast_ref::<MySqlDatabaseError>().map(|m| m.number()),
        _ => None,
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        if mysql_error_number(&e) == Some(ER_DUP_ENTRY) {
            if let sqlx::Error::Database(db) = &e {
                return StorageError::Duplicate(db.message().to_owned());
            }
        }
        // Every database error passes here once (a duplicate key is an answer, not an error).
        let number = mysql_error_number(&e);
        let kind = match &e {
            sqlx::Error::Database(_) if matches!(number, Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)) => {
                "lock"
            }
            sqlx::Error::Database(_) if number.is_some_and(|n| REFUSED_CONNECTION.contains(&n)) => "refused",
            sqlx::Error::Database(_) if number.is_some_and(|n| ENDED_CONNECTION.contains(&n)) => "connection",
            sqlx::Error::Database(_) => "server",
            sqlx::Error::PoolTimedOut => "pool_timeout",
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolClosed => "connection",
            _ => "other",
        };
        metrics::counter!("orderly_db_errors_total", "kind" => kind).increment(1);
        if kind == "connection" {
            // Connections kept by the pools may be dead too: see `pool`'s "Dead connections".
            pool::connection_failed();
        }
        StorageError::Db(e)
    }
}

impl StorageError {
    /// A deadlock or lock-wait timeout: the whole transaction may be retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Db(e) => matches!(
                mysql_error_number(e),
                Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)
            ),
            _ => false,
        }
    }

    /// The connection or server failed: the outcome of a write in flight is unknown.
    pub fn is_connection_failure(&self) -> bool {
        match self {
            StorageError::Db(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Protocol(_),
            ) => true,
            StorageError::Db(e) => mysql_error_number(e).is_some_and(|n| ENDED_CONNECTION.contains(&n)),
            _ => false,
        }
    }

    /// The server refused a new connection (too many connections, the account's limits):
    /// nothing was done. (A refused TCP connect is an `Io` error, which sqlx's pool retries
    /// until its acquire timeout: [`Self::is_connection_failure`].)
    pub fn is_refused_connection(&self) -> bool {
        match self {
            StorageError::Db(e) => mysql_error_number(e).is_some_and(|n| REFUSED_CONNECTION.contains(&n)),
            _ => false,
        }
    }

    /// A dependency's bad moment that a retry may get past: a lost, refused or exhausted
    /// connection, a deadlock. The one place that decides it: HTTP answers these 503 with
    /// `Retry-After`, every other storage error 500 (see [`crate::http::error`]).
    pub fn is_transient(&self) -> bool {
        self.is_connection_failure() || self.is_refused_connection() || self.is_retryable()
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Times are stored as UTC `DATETIME(6)`.
pub(crate) fn ts(t: chrono::DateTime<chrono::Utc>) -> chrono::NaiveDateTime {
    t.naive_utc()
}

/// A stored value that no valid write could have produced.
/// Rows of `(order_id, version)`, as ids and versions.
pub(crate) fn id_versions(rows: &[sqlx::mysql::MySqlRow]) -> Result<Vec<(crate::domain::ids::OrderId, i64)>> {
    use sqlx::Row;
    rows.iter()
        .map(|r| {
            let id: i64 = r.try_get(0)?;
            Ok((
                crate::domain::ids::OrderId::new(id).ok_or_else(|| corrupt("order_id", id))?,
                r.try_get(1)?,
            ))
        })
        .collect()
}

pub(crate) fn corrupt(what: &str, v: impl std::fmt::Debug) -> StorageError {
    StorageError::Corrupt(format!("{what}: {v:?}"))
}

/// How many times a transaction that hit a deadlock is retried. InnoDB deadlocks between
/// racing creates of one order are expected and short; three tries resolve them in practice.
pub const DEADLOCK_RETRIES: usize = 3;

/// Prepared statements kept per connection: ~20 statements × the shards of one server, with
/// room for the `IN (?, …)` variants. The server's `max_prepared_stmt_count` must allow
/// this times the connections of every client (the local cluster sets it to 1M). Public so
/// the bench's own replica sessions are set up as the service's are.
pub const STATEMENT_CACHE: usize = 512;

/// Opens a pool against `url` with the shared pool settings (see [`pool`] for how its
/// connections are reused without a round trip, and how none is reused inside a transaction).
pub async fn connect(url: &str, settings: &DatabaseSettings) -> Result<Db> {
    let opts: MySqlConnectOptions = url.parse().map_err(StorageError::Db)?;
    // The pool's name in logs and metrics: the database, never the credentials.
    let name: std::sync::Arc<str> = opts.get_database().unwrap_or("-").into();
    // Every shard has its own table names, so one server sees 16+ copies of each statement;
    // sqlx's default cache of 100 prepared statements per connection would thrash and
    // re-prepare on nearly every query.
    let opts = opts.statement_cache_capacity(STATEMENT_CACHE);
    let pool = MySqlPoolOptions::new()
        .max_connections(settings.max_connections)
        // Keep a couple of connections warm so the first requests after idle are not slow.
        .min_connections(1)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        // No ping before every checkout: it is a round trip per request. A dead connection
        // fails its statement instead, is dropped by the pool, and the request answers 503.
        .test_before_acquire(false)
        // A connection sqlx takes back directly (a kept one unused for a while, see
        // [`pool`]) is checked as a `Conn` is, without a round trip.
        .after_release(|conn, _| Box::pin(async move { Ok(release_guard(conn)) }))
        .after_connect(|conn, _| {
            Box::pin(async move {
                // READ COMMITTED: our transactions are compare-and-set updates that never
                // rely on repeatable snapshots; it avoids the gap locks that make racing
                // inserts deadlock under REPEATABLE READ.
                // (sqlx already sets the session time zone to UTC, which DATETIME columns assume.)
                sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect_with(opts)
        .await?;
    Ok(Db::new(pool, &name))
}

/// The pool guard for connections sqlx takes back itself: one with a statement in flight
/// (a use cut off) or a transaction the driver counts open is closed, not reused (see
/// [`pool`]).
fn release_guard(conn: &mut sqlx::MySqlConnection) -> bool {
    use sqlx::Connection;
    !(conn.should_flush() || conn.is_in_transaction())
}
