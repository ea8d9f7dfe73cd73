//! The steps of the background work on orders: the reservation sweeper, the payment-timeout
//! closer and the completer (their loops, cadence and metrics are in [`crate::jobs`]).
//!
//! The sweeper settles claims and finishes releases. Two kinds of work, both found by an
//! index:
//! - claims still `reserved` and untouched for the grace period. Creates do not confirm
//!   their claims (two commits per create, not three), so most of these belong to orders
//!   that are simply written. The claims are grouped by shard database and each database is
//!   settled on its own task, so a server that is down or stalled holds up only its own
//!   claims (counted `failed`, left for the next step). Per shard, one non-locking read finds
//!   the committed orders; those carrying the claim's request hash are confirmed in one
//!   statement. Each remaining claim goes through the void handshake
//!   ([`orders::void_unless_written`]) on a connection with short lock waits: the order id is
//!   voided on its shard unless the order is there (then the claim is confirmed), and only
//!   after the void committed is the reservation returned (guarded by the claim's attempt
//!   token, so a create that touched it since is left alone until a later step). An order
//!   whose shard commit is in flight holds its row lock: the handshake times out and the
//!   claim is skipped, never returned; a create that arrives after the void finds it and
//!   writes nothing.
//! - closed or invalidated orders still marked `release_pending`: the release is finished
//!   (exactly once, guarded by the claim state).
//!
//! The closer moves unpaid orders past their payment deadline to `closed` (SPEC 0→4 on
//! timeout) with the same compare-and-set as a cancel, so a payment racing it has exactly
//! one winner, and gives their stock back.
//!
//! The completer moves shipped orders whose shipment is older than `orders.auto_complete_days`
//! to `completed` (SPEC 2→3, "auto-confirmed"), found by `idx_status_shipped`, with the same
//! compare-and-set as a buyer's confirm: a buyer confirming at the same moment, or another
//! process running the same step, has exactly one winner, and the loser counts as `raced`.
//!
//! [`OrderService::sweep_once`], [`OrderService::close_expired_once`] and
//! [`OrderService::complete_shipped_once`] are single steps (tests call them directly with a
//! chosen time); [`crate::jobs::sweeper::run`] loops until its token is cancelled. A
//! failure on one claim or shard is logged and the step goes on with the rest.

use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::MySqlConnection;
use tokio::task::JoinSet;

use crate::domain::ids::OrderId;
use crate::domain::status::{Command, OrderStatus};
use crate::storage::commerce::{self, StaleClaim};
use crate::storage::orders::{self, OrderWrite, StatusChange, VoidOutcome};
use crate::storage::shards::Shard;
use crate::storage::StorageError;

use super::orders::{OrderService, Snapshot};
use super::{retry_deadlocks, Result};

/// What one sweep step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Stale claims this step looked at (at most the batch size).
    pub examined: usize,
    /// Claims whose order was found and which are now confirmed.
    pub confirmed: usize,
    /// Reservations of orders that never appeared (their ids now void), given back.
    pub returned: usize,
    /// Closed or invalidated orders whose stock release was finished.
    pub released: usize,
    /// Claims or shards that failed and are left for the next step (among them claims whose
    /// order's commit is still in flight).
    pub failed: usize,
}

/// The longest one shard database may hold up a sweep step. A healthy database settles a
/// batch in milliseconds, and a claim whose order commit is in flight costs at most
/// [`orders::SWEEPER_LOCK_WAIT_SECS`]; a server that hangs (frozen, network gone silent)
/// would otherwise hold the step forever. Whatever is cut off is safe to redo: the void
/// handshake and the give-back are each one transaction.
const DATABASE_STEP_TIMEOUT: Duration = Duration::from_secs(30);

impl AddAssign for SweepOutcome {
    fn add_assign(&mut self, o: SweepOutcome) {
        self.examined += o.examined;
        self.confirmed += o.confirmed;
        self.returned += o.returned;
        self.released += o.released;
        self.failed += o.failed;
    }
}

/// What one payment-timeout step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CloseOutcome {
    /// Unpaid orders past their deadline that were closed.
    pub closed: usize,
    /// Orders that changed under us (paid or cancelled meanwhile): left as they are.
    pub raced: usize,
    pub failed: usize,
}

/// What one completer step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompleteOutcome {
    /// Shipped orders past the auto-complete age that were completed.
    pub completed: usize,
    /// Orders that changed under us (confirmed by the buyer, or completed by another
    /// process, meanwhile): left as they are.
    pub raced: usize,
    pub failed: usize,
}

impl OrderService {
    /// One sweep at time `at`: looks at claims untouched since `at - grace`, up to `batch`,
    /// and at releases left pending, each shard database on its own task.
    pub async fn sweep_once(&self, at: DateTime<Utc>, grace: Duration, batch: u32) -> Result<SweepOutcome> {
        let before = at - TimeDelta::from_std(grace).unwrap_or(TimeDelta::zero());
        let mut per_database = vec![Vec::new(); self.shards().databases().len()];
        let stale = commerce::stale_claims(self.commerce(), before, batch).await?;
        let examined: Vec<OrderId> = stale.iter().map(|c| c.order_id).collect();
        for claim in stale {
            per_database[self.shards().of_order(claim.order_id).database].push(claim);
        }
        let counts: Vec<usize> = per_database.iter().map(Vec::len).collect();
        let mut per_database = per_database.into_iter().map(Some).collect::<Vec<_>>();
        let steps = self
            .on_each_database("sweep", |service, database| {
                let claims = per_database[database].take().unwrap_or_default();
                async move { service.sweep_database(database, claims, before, batch).await }
            })
            .await;
        let mut out = SweepOutcome {
            examined: examined.len(),
            ..SweepOutcome::default()
        };
        for (database, step) in steps.into_iter().enumerate() {
            match step {
                Some(o) => out += o,
                None => out.failed += counts[database].max(1),
            }
        }
        // What could not be settled goes to the back of the queue, so that a database that
        // is down cannot hold the head of it (and every step) with its own claims.
        if out.confirmed + out.returned < examined.len() {
            if let Err(e) = commerce::postpone_claims(self.commerce(), &examined, before).await {
                tracing::warn!(error = %e, "sweep: could not postpone unsettled claims");
            }
        }
        Ok(out)
    }

    async fn sweep_database(
        &self,
        database: usize,
        claims: Vec<StaleClaim>,
        before: DateTime<Utc>,
        batch: u32,
    ) -> SweepOutcome {
        let mut out = SweepOutcome::default();
        // One connection for the reads of every shard here: a server that is down costs one
        // failed acquire, not one per shard.
        let db = &self.shards().databases()[database];
        let mut conn = match db.write().acquire().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(database = %db.name(), error = %e, "sweep: database left for the next step");
                out.failed += claims.len().max(1);
                return out;
            }
        };
        if !claims.is_empty() {
            self.settle_claims(&mut conn, database, claims, &mut out).await;
        }
        for shard in self.shards().all().iter().filter(|s| s.database == database) {
            match self.finish_releases(&mut conn, shard, before, batch).await {
                Ok(n) => out.released += n,
                Err(e) => {
                    tracing::warn!(shard = %shard.index, error = %e, "sweep: shard left for the next step");
                    out.failed += 1;
                }
            }
        }
        out
    }

    /// Confirms the claims whose order is committed (one read per shard, one update for
    /// all); puts each of the others through the void handshake.
    async fn settle_claims(
        &self,
        conn: &mut crate::storage::Conn,
        database: usize,
        claims: Vec<StaleClaim>,
        out: &mut SweepOutcome,
    ) {
        let db = &self.shards().databases()[database];
        let mut by_shard: BTreeMap<_, (&Shard, Vec<StaleClaim>)> = BTreeMap::new();
        for claim in claims {
            let shard = self.shards().of_order(claim.order_id);
            by_shard
                .entry(shard.index.get())
                .or_insert_with(|| (shard, Vec::new()))
                .1
                .push(claim);
        }
        let mut written = Vec::new();
        let mut unseen = Vec::new();
        for (shard, claims) in by_shard.into_values() {
            let ids: Vec<OrderId> = claims.iter().map(|c| c.order_id).collect();
            let found = match orders::request_hashes(conn, &shard.tables, &ids).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(shard = %shard.index, error = %e, "sweep: claims left for the next step");
                    out.failed += claims.len();
                    continue;
                }
            };
            for claim in claims {
                match found.iter().find(|(id, _)| *id == claim.order_id) {
                    Some((_, hash)) if hash[..] == claim.request_hash[..] => written.push(claim.order_id),
                    Some(_) => {
                        mismatch(&claim);
                        out.failed += 1;
                    }
                    None => unseen.push((shard, claim)),
                }
            }
        }
        if !written.is_empty() {
            match retry_deadlocks(|| commerce::confirm_claims(self.commerce(), &written)).await {
                Ok(n) => out.confirmed += n as usize,
                Err(e) => {
                    tracing::warn!(error = %e, "sweep: confirmations left for the next step");
                    out.failed += written.len();
                }
            }
        }
        if unseen.is_empty() {
            return;
        }
        let mut conn = match orders::sweeper_connection(db.write()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(database = %db.name(), error = %e, "sweep: claims left for the next step");
                out.failed += unseen.len();
                return;
            }
        };
        for (shard, claim) in unseen {
            match self.void_or_confirm(&mut conn, shard, &claim).await {
                Ok(Settled::Confirmed) => out.confirmed += 1,
                Ok(Settled::Returned) => out.returned += 1,
                Ok(Settled::Untouched) => {}
                Ok(Settled::Mismatch) => {
                    mismatch(&claim);
                    out.failed += 1;
                }
                Err(e) => {
                    tracing::warn!(order_id = %claim.order_id, error = %e, "sweep: claim left for the next step");
                    out.failed += 1;
                }
            }
        }
    }

    /// The careful path for a claim whose order was not seen: void the id unless the order
    /// is there; give the reservation back only once the void is committed.
    async fn void_or_confirm(
        &self,
        conn: &mut MySqlConnection,
        shard: &Shard,
        claim: &StaleClaim,
    ) -> Result<Settled, StorageError> {
        let id = claim.order_id;
        match orders::void_unless_written(conn, &shard.tables, id, self.clock().now()).await? {
            VoidOutcome::Written(hash) if hash[..] == claim.request_hash[..] => {
                let ids = [id];
                let n = retry_deadlocks(|| commerce::confirm_claims(self.commerce(), &ids)).await?;
                Ok(if n == 1 {
                    Settled::Confirmed
                } else {
                    Settled::Untouched
                })
            }
            VoidOutcome::Written(_) => Ok(Settled::Mismatch),
            VoidOutcome::Voided => {
                let mut c = self.commerce().acquire().await?;
                let given =
                    commerce::abandon_claim(&mut c, id, claim.attempt, false, self.clock().now()).await?;
                drop(c);
                self.flash().give_back(id, given.flash_sales()).await;
                if given.done() {
                    tracing::info!(order_id = %id, "voided an order that never appeared and returned its reservation");
                    return Ok(Settled::Returned);
                }
                Ok(Settled::Untouched)
            }
        }
    }

    async fn finish_releases(
        &self,
        conn: &mut crate::storage::Conn,
        shard: &Shard,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<usize, StorageError> {
        let ids = orders::release_pending(conn, &shard.tables, before, batch).await?;
        for &id in &ids {
            self.release_stock(shard, id).await;
        }
        Ok(ids.len())
    }

    /// Closes unpaid orders whose payment deadline is before `at`, up to `batch` per shard,
    /// each shard database on its own task with the same time bound as a sweep, so one server
    /// that hangs does not hold up the others.
    pub async fn close_expired_once(&self, at: DateTime<Utc>, batch: u32) -> Result<CloseOutcome> {
        let m = self.move_due_once(Due::Unpaid, at, batch).await;
        Ok(CloseOutcome {
            closed: m.moved,
            raced: m.raced,
            failed: m.failed,
        })
    }

    /// Completes shipped orders shipped before `at - after`, up to `batch` per shard, each
    /// shard database on its own task with the same time bound as a sweep.
    pub async fn complete_shipped_once(
        &self,
        at: DateTime<Utc>,
        after: Duration,
        batch: u32,
    ) -> Result<CompleteOutcome> {
        // An age too large to subtract completes nothing (never everything).
        let Some(cutoff) = TimeDelta::from_std(after)
            .ok()
            .and_then(|d| at.checked_sub_signed(d))
        else {
            return Ok(CompleteOutcome::default());
        };
        let m = self.move_due_once(Due::Shipped, cutoff, batch).await;
        Ok(CompleteOutcome {
            completed: m.moved,
            raced: m.raced,
            failed: m.failed,
        })
    }

    /// Moves the orders `due` names whose time is before `before`, up to `batch` per shard,
    /// every shard database at once.
    async fn move_due_once(&self, due: Due, before: DateTime<Utc>, batch: u32) -> Moved {
        let steps = self
            .on_each_database(due.what(), move |service, database| async move {
                let mut out = Moved::default();
                for shard in service.shards().all().iter().filter(|s| s.database == database) {
                    if let Err(e) = service.move_due_in(shard, due, before, batch, &mut out).await {
                        tracing::warn!(shard = %shard.index, error = %e, "{}: shard left for the next step", due.what());
                        out.failed += 1;
                    }
                }
                out
            })
            .await;
        let mut out = Moved::default();
        for step in steps {
            match step {
                Some(o) => {
                    out.moved += o.moved;
                    out.raced += o.raced;
                    out.failed += o.failed;
                }
                None => out.failed += 1,
            }
        }
        out
    }

    /// Runs `step` for every shard database at once, each on its own task and cut off after
    /// [`DATABASE_STEP_TIMEOUT`], so one server that hangs holds up only its own part. The
    /// answer per database, in order; `None` where it was cut off or panicked (logged).
    async fn on_each_database<T, F, Fut>(&self, what: &'static str, mut step: F) -> Vec<Option<T>>
    where
        F: FnMut(OrderService, usize) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let mut steps = JoinSet::new();
        for database in 0..self.shards().databases().len() {
            let work = step(self.clone(), database);
            steps.spawn(async move { (database, tokio::time::timeout(DATABASE_STEP_TIMEOUT, work).await) });
        }
        let mut answers: Vec<Option<T>> = std::iter::repeat_with(|| None).take(steps.len()).collect();
        while let Some(joined) = steps.join_next().await {
            match joined {
                Ok((database, Ok(answer))) => answers[database] = Some(answer),
                Ok((database, Err(_))) => {
                    let name = self.shards().databases()[database].name();
                    tracing::warn!(database = %name, "{what}: database too slow; left for the next step");
                }
                Err(e) => tracing::error!(error = %e, "{what}: a database step panicked"),
            }
        }
        answers
    }

    /// One shard's part of [`Self::move_due_once`]: each due order moves by a compare-and-set
    /// on its version and status through the service's commit point, like any request's
    /// write (the cache learns of it before the next read); one that changed meanwhile is
    /// `raced`. A closed order gives its stock back.
    async fn move_due_in(
        &self,
        shard: &Shard,
        due: Due,
        before: DateTime<Utc>,
        batch: u32,
        out: &mut Moved,
    ) -> Result<(), StorageError> {
        let mut conn = self.shards().primary(shard).acquire().await?;
        let orders: Vec<(OrderId, i64)> = match due {
            Due::Unpaid => orders::expired_unpaid(&mut conn, &shard.tables, before, batch).await?,
            Due::Shipped => orders::shipped_before(&mut conn, &shard.tables, before, batch).await?,
        };
        drop(conn);
        let (from, command, fallback) = match due {
            Due::Unpaid => (
                OrderStatus::PendingPayment,
                Command::TimeoutClose,
                OrderStatus::Closed,
            ),
            Due::Shipped => (
                OrderStatus::Shipped,
                Command::AutoComplete,
                OrderStatus::Completed,
            ),
        };
        let to = crate::domain::status::transition(from, command).unwrap_or(fallback);
        // `completed_at` is set by the status write itself; a close also records why.
        let change = StatusChange {
            close_reason: (due == Due::Unpaid).then(|| "payment timeout".into()),
            ..Default::default()
        };
        for (id, version) in orders {
            // Each move runs to its end (cache notice, stock given back) on a write task of
            // its own, whatever happens to this step (its timeout, shutdown).
            let (service, shard, change) = (self.clone(), shard.clone(), change.clone());
            let moved = self
                .uncut(async move {
                    let write = OrderWrite::Status {
                        id,
                        expected_version: version,
                        from,
                        to,
                        change: &change,
                        now: service.clock().now(),
                    };
                    let moved = service.commit(&shard, write, Snapshot::None).await?.is_ok();
                    if moved && due == Due::Unpaid {
                        service.release_stock(&shard, id).await;
                    }
                    Ok::<_, StorageError>(moved)
                })
                .await
                .map_err(|e| {
                    tracing::error!(order_id = %id, error = %e, "a background move panicked");
                    StorageError::Db(sqlx::Error::WorkerCrashed)
                })??;
            if moved {
                out.moved += 1;
            } else {
                out.raced += 1;
            }
        }
        Ok(())
    }
}

/// The orders a background step moves on their own: unpaid past their payment deadline
/// (closed), shipped longer ago than the auto-complete age (completed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Unpaid,
    Shipped,
}

impl Due {
    fn what(self) -> &'static str {
        match self {
            Due::Unpaid => "close expired",
            Due::Shipped => "complete shipped",
        }
    }
}

/// What a step of [`Due`] orders did: moved, changed meanwhile, shards or databases failed.
#[derive(Debug, Default, Clone, Copy)]
struct Moved {
    moved: usize,
    raced: usize,
    failed: usize,
}

enum Settled {
    Confirmed,
    Returned,
    /// Changed by someone else since we looked (touched, released): a later step decides.
    Untouched,
    /// The order on the shard is not the one the claim reserved for.
    Mismatch,
}

/// No create writes an order whose hash differs from its claim's: this is a bug or a hand
/// edit, for a person to look at. The claim is left as it is.
fn mismatch(claim: &StaleClaim) {
    tracing::error!(
        order_id = %claim.order_id,
        "sweep: the order on the shard does not carry its claim's request hash; claim left alone"
    );
}
