//! [`Db`]: a database pool that costs no round trip per use.
//!
//! sqlx's pool pings every connection it takes back (`return_to_pool`, unconditionally, in
//! sqlx 0.9), and our transaction guard asked each one `SELECT @@in_transaction` on top: two
//! round trips per connection use, more than the statements of a read. `Db` keeps the
//! connections it hands out in a stack of its own instead ([`Conn`]'s `Drop`), and gives the
//! most recently used one to the next caller (LIFO, so a quiet pool's spare connections sink
//! to the bottom and are handed back to sqlx, which pings them once and lets them idle out).
//! sqlx still opens, limits and closes the connections; `Db` only skips the return trip, and
//! makes callers wait for a connection on a semaphore of its own (sqlx would count the kept
//! connections as in use and keep its waiters waiting).
//!
//! # The guard, without a round trip
//! No connection is reused inside a transaction. Every transaction of the crate begins with
//! [`begin`] (or [`begin_raw`], [`begin_batch`]), which marks the connection before it sends
//! `BEGIN`; the mark goes only when its `COMMIT` or `ROLLBACK` has answered ([`Tx::commit`],
//! [`Tx::rollback`], [`commit_with`], [`commit_raw`], [`rollback_raw`]). A use cut off at an `.await` (the request's future
//! dropped, a timeout) or ended by an error inside a transaction leaves the mark, as does a
//! `BEGIN` whose answer never arrived (the case the old guard read from the server); so does
//! a [`Tx`] dropped without its end. A marked connection, or one with a statement queued,
//! is closed when its [`Conn`] is dropped, which rolls back whatever the server still holds
//! for it, and is counted in `orderly_db_connections_closed_in_transaction_total`. An autocommit
//! statement cut off needs nothing: its answer is read (and dropped) by the next use.
//! `tests/one_door.rs` fails on a transaction begun any other way.
//!
//! # Dead connections
//! sqlx's ping on release was also what found a connection the server had dropped (a restart,
//! a kill). Without it, a dead connection would go back on the stack after its failed
//! statement and fail every use after. So every connection-level failure (an I/O or protocol
//! error, or the server ending the session: [`super::StorageError`]'s conversion calls
//! [`connection_failed`]) starts a new *epoch*: a connection checked out before it is handed
//! back to sqlx when dropped, and a kept one older than it is handed back when popped. sqlx
//! pings each once on the way (closing the dead ones), so a failure costs the pool one ping per
//! connection, and a healthy pool none.

use std::collections::{HashSet, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use sqlx::mysql::{
    MySql, MySqlConnection, MySqlPool, MySqlQueryResult, MySqlRow, MySqlStatement, MySqlTypeInfo,
};
use sqlx::pool::PoolConnection;
use sqlx::Either;
use sqlx::{Connection, Execute, Executor};

/// Connection-level failures seen by the process, so far (see "Dead connections").
static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A connection failed at the connection level (I/O, protocol, the server ended the
/// session): every connection in use or kept now is checked by sqlx's ping before its next
/// use.
pub fn connection_failed() {
    EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn epoch() -> u64 {
    EPOCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// A kept connection unused this long goes back to sqlx's pool (pinged once there, then
/// idle until sqlx's idle timeout closes it).
const KEPT_IDLE: Duration = Duration::from_secs(10);

/// A pool of connections to one database; cheap to clone (the clones share it).
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    /// The pool's name in logs and metrics (the database, never the credentials).
    name: Arc<str>,
    /// Connections handed back by [`Conn`]s, most recently used last.
    kept: Mutex<VecDeque<Kept>>,
    /// Whether connections are kept at all (see [`Db::unkept`]).
    keeps: bool,
    /// One permit per connection in use, `max_connections` in all: sqlx counts kept
    /// connections as in use and would make its own waiters wait for them, so the waiting
    /// happens here, where a kept connection is seen.
    permits: Arc<tokio::sync::Semaphore>,
}

struct Kept {
    conn: Box<PoolConnection<MySql>>,
    /// The epoch its last use began in.
    epoch: u64,
    since: Instant,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("name", &self.inner.name).finish()
    }
}

impl Db {
    /// Wraps a sqlx pool (opened by [`super::connect`], or a harness's own).
    pub fn new(pool: MySqlPool, name: &str) -> Db {
        Db::with(pool, name, true)
    }

    /// A `Db` that hands every connection back to sqlx's pool, as a plain sqlx pool does (a
    /// ping per use): for a harness whose pool must find a restarted server with
    /// `test_before_acquire`.
    pub fn unkept(pool: MySqlPool, name: &str) -> Db {
        Db::with(pool, name, false)
    }

    fn with(pool: MySqlPool, name: &str, keeps: bool) -> Db {
        let max = pool.options().get_max_connections() as usize;
        Db {
            inner: Arc::new(Inner {
                pool,
                name: name.into(),
                kept: Mutex::new(VecDeque::new()),
                keeps,
                permits: Arc::new(tokio::sync::Semaphore::new(max)),
            }),
        }
    }

    /// A connection: the most recently used kept one, else one from sqlx's pool (a new one,
    /// or an idle one, without a ping: a dead connection fails its statement and is closed).
    pub async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        let timeout = self.inner.pool.options().get_acquire_timeout();
        let permit =
            match tokio::time::timeout(timeout, Arc::clone(&self.inner.permits).acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(sqlx::Error::PoolClosed),
                Err(_) => return Err(sqlx::Error::PoolTimedOut),
            };
        // With a permit, sqlx has a connection for us at once: those it counts as in use are
        // ours in use (fewer than the maximum, this one not yet among them) and the kept
        // ones, and the stack is empty when we ask it.
        let now = epoch();
        let kept = loop {
            let top = self.inner.kept.lock().expect("pool stack poisoned").pop_back();
            match top {
                // Kept before a connection failed somewhere, or unused for a while (the server
                // may have closed it: `wait_timeout`): back to sqlx, which pings it.
                Some(k) if k.epoch != now || k.since.elapsed() > KEPT_IDLE => drop(k),
                other => break other,
            }
        };
        let conn = match kept {
            Some(k) => k.conn,
            None => Box::new(self.inner.pool.acquire().await?),
        };
        Ok(Conn {
            conn: Some(conn),
            db: Arc::clone(&self.inner),
            close: false,
            epoch: now,
            _permit: permit,
        })
    }

    /// Connections open (kept, idle in sqlx's pool or in use).
    pub fn size(&self) -> u32 {
        self.inner.pool.size()
    }

    /// Connections not in use: kept or idle in sqlx's pool.
    pub fn num_idle(&self) -> usize {
        self.inner.pool.num_idle() + self.inner.kept.lock().expect("pool stack poisoned").len()
    }

    /// Closes every connection, kept ones first (sqlx's `close` waits for all of them).
    pub async fn close(&self) {
        self.inner.permits.close();
        let kept: Vec<Kept> = self
            .inner
            .kept
            .lock()
            .expect("pool stack poisoned")
            .drain(..)
            .collect();
        drop(kept);
        self.inner.pool.close().await;
    }
}

impl Inner {
    fn keep(&self, conn: Box<PoolConnection<MySql>>, epoch: u64) {
        if !self.keeps {
            return;
        }
        let now = Instant::now();
        let mut kept = self.kept.lock().expect("pool stack poisoned");
        kept.push_back(Kept {
            conn,
            epoch,
            since: now,
        });
        // The bottom of the stack is the connection unused longest.
        let stale = kept
            .front()
            .is_some_and(|k| now.duration_since(k.since) > KEPT_IDLE);
        let released = if stale { kept.pop_front() } else { None };
        drop(kept);
        // Back to sqlx: its release task pings it and it idles there.
        drop(released);
    }
}

/// A connection taken from a [`Db`]. It goes back to the pool when dropped if its use ended
/// cleanly, and is closed otherwise (see the [module docs](self)).
pub struct Conn {
    /// Boxed, so the session's address is its name in [`OPEN`] for as long as it lives.
    conn: Option<Box<PoolConnection<MySql>>>,
    db: Arc<Inner>,
    /// Close instead of keeping when dropped.
    close: bool,
    /// The epoch this use began in (see "Dead connections").
    epoch: u64,
    /// Given back after the connection (fields drop after `Drop::drop`).
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Conn {
    /// Closes the connection when dropped instead of reusing it: for a use cut off while a
    /// statement may still run (a read timed out), whose answer the next user would wait for.
    pub fn close_on_drop(&mut self) {
        self.close = true;
    }

    fn pooled(&self) -> &PoolConnection<MySql> {
        self.conn.as_ref().expect("connection present until drop")
    }

    /// Takes the connection out of the pool for good (a session with settings of its own,
    /// closed when dropped); the pool may open a replacement.
    pub fn detach(mut self) -> MySqlConnection {
        let conn = self.conn.take().expect("connection present until drop");
        (*conn).detach()
    }
}

impl Deref for Conn {
    type Target = MySqlConnection;
    fn deref(&self) -> &MySqlConnection {
        self.pooled()
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        self.conn.as_mut().expect("connection present until drop")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        let open = unmark(session(&conn));
        let cut_off = open || conn.should_flush() || conn.is_in_transaction();
        if self.close && !cut_off {
            conn.close_on_drop();
            return;
        }
        if cut_off {
            metrics::counter!("orderly_db_connections_closed_in_transaction_total", "pool" => self.db.name.to_string())
                .increment(1);
            tracing::debug!(pool = %self.db.name, "a connection's use was cut off; closing it");
            conn.close_on_drop();
            return;
        }
        if self.epoch != epoch() {
            // A connection failed somewhere during this use: back to sqlx, which pings it.
            return;
        }
        self.db.keep(conn, self.epoch);
    }
}

/// Statements on the pool itself take a connection for the one statement, as on a sqlx
/// pool, and give it back without a round trip.
impl<'p> Executor<'p> for &'_ Db {
    type Database = MySql;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<MySqlQueryResult, MySqlRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, MySql>,
    {
        let db = self.clone();
        Box::pin(async_stream::try_stream! {
            let mut conn = db.acquire().await?;
            // Until the statement is read to its end: a stream dropped before that leaves
            // the rest of its answer in flight.
            conn.close = true;
            {
                let mut s = conn.fetch_many(query);
                while let Some(v) = s.try_next().await? {
                    yield v;
                }
            }
            conn.close = false;
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<MySqlRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, MySql>,
    {
        let db = self.clone();
        Box::pin(async move {
            let mut conn = db.acquire().await?;
            // Until the answer is read: a future dropped before that leaves it in flight.
            conn.close = true;
            let row = conn.fetch_optional(query).await?;
            conn.close = false;
            Ok(row)
        })
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [MySqlTypeInfo],
    ) -> BoxFuture<'e, Result<MySqlStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        let db = self.clone();
        Box::pin(async move { db.acquire().await?.prepare_with(sql, parameters).await })
    }
}

// ---------------------------------------------------------------- transactions

/// The sessions inside a transaction begun here, by address (a session does not move while
/// it lives: [`Conn`] boxes it, and a transaction borrows it).
static OPEN: LazyLock<Mutex<HashSet<usize>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

fn session(conn: &MySqlConnection) -> usize {
    conn as *const MySqlConnection as usize
}

/// How many sessions [`OPEN`] holds: every connection's release asks [`unmark`], and most
/// hold no transaction, so they skip the lock.
static MARKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn mark(id: usize) {
    if OPEN.lock().expect("transaction marks poisoned").insert(id) {
        MARKED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Removes the mark; answers whether there was one. (A session is marked and unmarked by the
/// task using it, so a mark of its own is always counted when it asks.)
fn unmark(id: usize) -> bool {
    if MARKED.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        return false;
    }
    let removed = OPEN.lock().expect("transaction marks poisoned").remove(&id);
    if removed {
        MARKED.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    removed
}

/// Begins a transaction on `conn` (see the [module docs](self)).
pub async fn begin(conn: &mut MySqlConnection) -> Result<Tx<'_>, sqlx::Error> {
    let id = session(conn);
    mark(id);
    let inner = sqlx::Connection::begin(conn).await?;
    Ok(Tx { inner, id })
}

/// A transaction of [`begin`]: a [`sqlx::Transaction`] whose connection is marked until its
/// end answers.
pub struct Tx<'c> {
    inner: sqlx::Transaction<'c, MySql>,
    id: usize,
}

impl Tx<'_> {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        let id = self.id;
        self.inner.commit().await?;
        unmark(id);
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        let id = self.id;
        self.inner.rollback().await?;
        unmark(id);
        Ok(())
    }
}

impl Deref for Tx<'_> {
    type Target = MySqlConnection;
    fn deref(&self) -> &MySqlConnection {
        &self.inner
    }
}

impl DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        &mut self.inner
    }
}

/// Begins a transaction that [`commit_with`] or [`rollback_raw`] ends: for the door's
/// create, whose `COMMIT` carries the read of its GTID in the same round trip (a
/// [`sqlx::Transaction`] sends its `COMMIT` alone).
pub async fn begin_raw(conn: &mut MySqlConnection) -> Result<(), sqlx::Error> {
    mark(session(conn));
    conn.execute("BEGIN").await?;
    Ok(())
}

/// Ends a transaction of [`begin_raw`] with `COMMIT` followed, in the same round trip, by
/// `then` (a statement without parameters, e.g. `SELECT @@last_gtid`); answers `then`'s
/// first row.
pub async fn commit_with(
    conn: &mut MySqlConnection,
    then: &'static str,
) -> Result<Option<MySqlRow>, sqlx::Error> {
    let id = session(conn);
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("COMMIT; {then}")))
        .fetch_all(&mut *conn)
        .await?;
    unmark(id);
    Ok(rows.into_iter().next())
}

/// Begins a transaction with `statements` (one or more, `;`-separated, without parameters)
/// in the same round trip as its `BEGIN`, and answers each statement's result. On an error
/// the transaction is open: end it with [`rollback_raw`]. For the reservation, whose opening
/// statements are numbers only (see `commerce::claims`).
pub async fn begin_batch(
    conn: &mut MySqlConnection,
    statements: String,
) -> Result<Vec<MySqlQueryResult>, sqlx::Error> {
    mark(session(conn));
    let sql = sqlx::AssertSqlSafe(format!("BEGIN; {statements}"));
    let mut results: Vec<MySqlQueryResult> =
        sqlx::raw_sql(sql).execute_many(&mut *conn).try_collect().await?;
    // The first result is the `BEGIN`'s.
    if !results.is_empty() {
        results.remove(0);
    }
    Ok(results)
}

/// Ends a transaction of [`begin_raw`] or [`begin_batch`] with `COMMIT`.
pub async fn commit_raw(conn: &mut MySqlConnection) -> Result<(), sqlx::Error> {
    let id = session(conn);
    conn.execute("COMMIT").await?;
    unmark(id);
    Ok(())
}

/// Ends a transaction of [`begin_raw`] or [`begin_batch`] with `ROLLBACK`.
pub async fn rollback_raw(conn: &mut MySqlConnection) -> Result<(), sqlx::Error> {
    let id = session(conn);
    conn.execute("ROLLBACK").await?;
    unmark(id);
    Ok(())
}
