//! The archiver (`orderly archive`, SPEC 2.7): moves old final orders out of the hot shards
//! into the archive without losing one.
//!
//! # A pass, per table shard and batch
//! 1. Scan the next `batch_size` order ids by primary key from the checkpoint, below the
//!    pass's bound `OrderId::lower_bound_at(cutoff)` (ids carry their creation time, and no
//!    index starts with `created_at`).
//! 2. Read the snapshots of the final ones among them (completed, closed, invalid; stock
//!    given back; no refund outstanding) in one consistent read; the others stay and are
//!    looked at again by a later pass, which starts from the lowest id.
//! 3. With `--export-dir`, write them as gzip NDJSON (temporary name, fsync, rename) before
//!    anything changes.
//! 4. Write their documents and the shard's checkpoint in **one archive transaction**; the
//!    checkpoint names this batch's *start*, so a pass interrupted anywhere after it runs
//!    the batch again (documents are only replaced by a higher version: a re-run is a no-op
//!    there) and finishes the deletes.
//! 5. Verify the batch in the archive (count, id checksum, versions); only then delete it
//!    from the four hot tables, in id order, in transactions of `delete_chunk` orders, each
//!    order only if it is still at the archived version; each transaction also records the
//!    deleted orders' buyers in the shard's `archived_users` (lists ask the archive only for
//!    them). One that moved on (money arrived in between) stays hot and its stale document
//!    is removed from the archive.
//! 6. Prune the claims and reservations of the deleted orders in the commerce database;
//!    pause (longer while replicas lag or the deletes slow down: see [`Throttle`]).
//!
//! Every order is at every moment in the hot shard, in the archive, or in both (between 4
//! and 5); readers look in the shard first and then in the archive (a list: if the shard
//! records the buyer, which it does from the delete on), so none misses an order in the
//! middle of its move. A shard is archived by one process at a time: the pass
//! holds a named lock (`GET_LOCK`) on the shard's database for its duration.
//!
//! # Crash safety
//! Failpoints (`--features failpoints`): `archive::export` (half a batch written),
//! `archive::after_commit` (documents committed, nothing deleted) and
//! `archive::between_deletes` (after the first delete chunk). Each returns an error where it
//! stands, as a crash would; a re-run leaves every order in exactly one place.

use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use sqlx::MySqlConnection;
use tokio_util::sync::CancellationToken;

use crate::config::ArchiveSettings;
use crate::domain::ids::OrderId;
use crate::storage::archive::{self, ArchivedDoc, Checkpoint};
use crate::storage::replicas::Database;
use crate::storage::shards::{Shard, ShardMap};
use crate::storage::Db;
use crate::storage::{commerce, orders, outbox, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("export: {0}")]
    Export(#[from] std::io::Error),
    #[error("shard {shard}: the archive does not hold the batch just written (ids {first}..={last}); nothing was deleted")]
    Unverified { shard: u32, first: i64, last: i64 },
    #[error("failpoint {0}")]
    Failpoint(&'static str),
    #[error("shard {0} is not in this deployment")]
    NoSuchShard(u32),
}

impl From<sqlx::Error> for ArchiveError {
    fn from(e: sqlx::Error) -> Self {
        ArchiveError::Storage(e.into())
    }
}

/// What one pass is asked to do (`orderly archive`'s flags; defaults from settings).
#[derive(Debug, Clone)]
pub struct PassOptions {
    /// Orders created before `now - older_than` move (never less than
    /// `archive.min_age_days`: [`Archiver::pass`] raises it).
    pub older_than: TimeDelta,
    pub batch_size: u32,
    pub pause: Duration,
    pub shards: Option<RangeInclusive<u32>>,
    /// Count what would move; change nothing.
    pub dry_run: bool,
    pub export_dir: Option<PathBuf>,
    /// A progress bar per shard on the terminal.
    pub progress: bool,
    /// The most of the time the pass may work (`archive.max_busy_percent`; 100: no rest
    /// beyond the pause): see [`Throttle`].
    pub busy_percent: u32,
    /// Stops the pass between two batches (the next pass resumes where it stopped).
    pub stop: CancellationToken,
}

impl PassOptions {
    pub fn from_settings(s: &ArchiveSettings) -> PassOptions {
        PassOptions {
            older_than: TimeDelta::days(i64::from(s.older_than_days)),
            batch_size: s.batch_size,
            pause: Duration::from_millis(s.pause_ms),
            shards: None,
            dry_run: false,
            export_dir: None,
            progress: false,
            busy_percent: s.max_busy_percent,
            stop: CancellationToken::new(),
        }
    }
}

/// What a pass did over one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardSummary {
    pub shard: u32,
    /// Orders moved (dry run: that would move).
    pub moved: u64,
    /// Old orders left hot because they are not final yet (dry run only counts them).
    pub not_final: u64,
    /// Orders whose archived copy was dropped because they moved on meanwhile.
    pub moved_on: u64,
    /// Bytes of the moved orders' documents (uncompressed JSON).
    pub bytes: u64,
    pub batches: u64,
    /// Another process holds this shard's archive lock: skipped.
    pub busy: bool,
}

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct PassSummary {
    pub shards: Vec<ShardSummary>,
    pub elapsed: Duration,
    pub dry_run: bool,
}

impl PassSummary {
    pub fn moved(&self) -> u64 {
        self.shards.iter().map(|s| s.moved).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// Orders moved per second.
    pub fn rate(&self) -> f64 {
        self.moved() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The pause between batches. At least long enough that the pass works at most
/// `busy_percent` of the time (a batch that took 1 s at 20 % is followed by 4 s of rest), so
/// requests keep most of the database whatever a batch costs on this machine; and at least
/// the base pause, stretched while the system is under strain: doubling (up to
/// `archive.max_slowdown` times) while a replica of the shard's database lags more than
/// `archive.max_replica_lag_ms`, or while a batch's deletes take more than four times the
/// fastest batch seen in this pass (the hot tables are busy with requests); halving back as
/// they recover.
#[derive(Debug, Clone)]
pub struct Throttle {
    base: Duration,
    busy_percent: u32,
    max_factor: u32,
    max_lag: Duration,
    factor: u32,
    fastest: Option<Duration>,
}

impl Throttle {
    pub fn new(base: Duration, busy_percent: u32, settings: &ArchiveSettings) -> Throttle {
        Throttle {
            base,
            busy_percent: busy_percent.clamp(1, 100),
            max_factor: settings.max_slowdown.max(1),
            max_lag: Duration::from_millis(settings.max_replica_lag_ms),
            factor: 1,
            fastest: None,
        }
    }

    /// The pause after a batch that took `batch` in all, whose deletes took `deletes` (per
    /// chunk), with replicas `lag` behind.
    pub fn after_batch(&mut self, batch: Duration, deletes: Duration, lag: Duration) -> Duration {
        let fastest = *self.fastest.get_or_insert(deletes);
        self.fastest = Some(fastest.min(deletes));
        let strained = lag > self.max_lag || deletes > fastest * 4;
        self.factor = if strained {
            (self.factor * 2).min(self.max_factor)
        } else {
            (self.factor / 2).max(1)
        };
        let rest = batch.mul_f64(f64::from(100 - self.busy_percent) / f64::from(self.busy_percent));
        (self.base * self.factor).max(rest)
    }

    pub fn factor(&self) -> u32 {
        self.factor
    }
}

/// Moves old final orders from the shards to the archive (see the module docs).
#[derive(Clone)]
pub struct Archiver {
    shards: ShardMap,
    archive: Arc<Database>,
    commerce: Db,
    settings: ArchiveSettings,
}

impl Archiver {
    /// The `[archive]` settings passes run with by default.
    pub fn settings(&self) -> &ArchiveSettings {
        &self.settings
    }

    pub fn new(shards: ShardMap, archive: Arc<Database>, commerce: Db, settings: ArchiveSettings) -> Self {
        Archiver {
            shards,
            archive,
            commerce,
            settings,
        }
    }

    /// One pass over the shards `opts` names, one shard after another.
    pub async fn pass(&self, opts: &PassOptions) -> Result<PassSummary, ArchiveError> {
        let started = Instant::now();
        let count = self.shards.count().get();
        let range = opts.shards.clone().unwrap_or(0..=count - 1);
        if let Some(bad) = range.clone().find(|s| *s >= count) {
            return Err(ArchiveError::NoSuchShard(bad));
        }
        // Never younger than the floor reads rely on (see `archive.min_age_days`).
        let older_than = opts.older_than.max(self.settings.min_age());
        let cutoff = Utc::now() - older_than;
        let bars = opts.progress.then(MultiProgress::new);
        let mut summary = PassSummary {
            dry_run: opts.dry_run,
            ..PassSummary::default()
        };
        for index in range {
            if opts.stop.is_cancelled() {
                break;
            }
            let shard = self
                .shards
                .all()
                .iter()
                .find(|s| u32::from(s.index.get()) == index)
                .ok_or(ArchiveError::NoSuchShard(index))?;
            let bar = match &bars {
                Some(m) => m.add(shard_bar(index)),
                None => ProgressBar::hidden(),
            };
            let done = if opts.dry_run {
                self.count_shard(shard, cutoff).await?
            } else {
                self.archive_shard(shard, cutoff, opts, &bar).await?
            };
            bar.finish_with_message(format!("{} moved", done.moved));
            summary.shards.push(done);
        }
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// `--dry-run`: what a pass would move from `shard`, and what it would leave.
    async fn count_shard(&self, shard: &Shard, cutoff: DateTime<Utc>) -> Result<ShardSummary, ArchiveError> {
        let mut conn = self.shards.primary(shard).acquire().await?;
        let bound = OrderId::lower_bound_at(cutoff);
        let mut out = ShardSummary {
            shard: u32::from(shard.index.get()),
            ..ShardSummary::default()
        };
        // In primary-key ranges of a batch each: no statement reads the whole old part of
        // the table at once.
        let mut after = 0;
        while let Some(last) =
            orders::archive_scan_end(&mut conn, &shard.tables, after, bound, self.settings.batch_size).await?
        {
            let (movable, not_final) = orders::archive_counts(&mut conn, &shard.tables, after, last).await?;
            out.moved += movable;
            out.not_final += not_final;
            out.batches += 1;
            after = last;
        }
        Ok(out)
    }

    async fn archive_shard(
        &self,
        shard: &Shard,
        cutoff: DateTime<Utc>,
        opts: &PassOptions,
        bar: &ProgressBar,
    ) -> Result<ShardSummary, ArchiveError> {
        let index = u32::from(shard.index.get());
        let mut out = ShardSummary {
            shard: index,
            ..ShardSummary::default()
        };
        // The lock and every statement on the hot side share one session: if it dies, the
        // lock goes with it before another process can take the shard.
        let mut hot = self.shards.primary(shard).acquire().await?.detach();
        if !lock_shard(&mut hot, &shard.tables.orders).await? {
            out.busy = true;
            return Ok(out);
        }
        let mut arch = self.archive.write().acquire().await?;
        let (bound, mut after, mut moved_in_pass, mut interrupted) =
            match archive::checkpoint(&mut arch, index).await? {
                // An interrupted pass resumes where it stood, with its own bound (or this
                // pass's, if that is older: never past what these settings allow).
                Some(c) if !c.done => (
                    c.bound.min(OrderId::lower_bound_at(cutoff)),
                    c.resume_after,
                    c.moved,
                    Some(c.batch_last),
                ),
                _ => (OrderId::lower_bound_at(cutoff), 0, 0, None),
            };
        let first = orders::archive_scan_end(&mut hot, &shard.tables, after, bound, 1)
            .await?
            .unwrap_or(bound);
        bar.set_length((bound - first).max(1) as u64);
        let mut throttle = Throttle::new(opts.pause, opts.busy_percent, &self.settings);
        let db = self.shards.database(shard);
        while let Some(last) =
            orders::archive_scan_end(&mut hot, &shard.tables, after, bound, opts.batch_size).await?
        {
            if opts.stop.is_cancelled() {
                return Ok(out);
            }
            let batch_started = Instant::now();
            let docs = outbox::archivable_snapshots(&mut hot, &shard.tables, after, last)
                .await?
                .into_iter()
                .map(ArchivedDoc::from_json)
                .collect::<Result<Vec<_>, _>>()?;
            out.batches += 1;
            if let Some(batch_last) = interrupted.take() {
                // The interrupted batch (maybe of another size): a document it archived whose
                // order then changed on its shard (money arrived before the deletes ran) is
                // stale; the order stays hot (or is archived again, at its new version).
                let upto = batch_last.max(last);
                out.moved_on += self
                    .drop_stale(shard, &mut hot, &mut arch, after, upto, &docs)
                    .await?;
            }
            if docs.is_empty() {
                after = last;
                bar.set_position((last - first).max(0) as u64);
                continue;
            }
            if let Some(dir) = &opts.export_dir {
                export(dir, index, &docs).await?;
            }
            let checkpoint = Checkpoint {
                bound,
                resume_after: after,
                batch_last: last,
                done: false,
                moved: moved_in_pass,
            };
            archive::store_batch(&mut arch, index, &docs, &checkpoint, Utc::now()).await?;
            fail_point!("archive::after_commit", |_| Err(ArchiveError::Failpoint(
                "archive::after_commit"
            )));
            if !archive::verify(&mut arch, &docs).await? {
                return Err(ArchiveError::Unverified {
                    shard: index,
                    first: docs[0].order_id.get(),
                    last: docs[docs.len() - 1].order_id.get(),
                });
            }
            // Safely archived: the claims and reservations go (before the orders leave their
            // shard, so the sweeper never sees a claim whose order is gone).
            let ids: Vec<OrderId> = docs.iter().map(|d| d.order_id).collect();
            crate::service::retry_deadlocks(|| commerce::prune_archived(&self.commerce, &ids)).await?;
            let started = Instant::now();
            let mut chunks = 0u32;
            for chunk in docs.chunks(self.settings.delete_chunk as usize) {
                if chunks > 0 {
                    fail_point!("archive::between_deletes", |_| Err(ArchiveError::Failpoint(
                        "archive::between_deletes"
                    )));
                }
                chunks += 1;
                let pairs: Vec<(OrderId, i64)> = chunk.iter().map(|d| (d.order_id, d.version)).collect();
                let done = delete_chunk(&mut hot, shard, &pairs).await?;
                if !done.moved_on.is_empty() {
                    let stale: Vec<(OrderId, i64)> = chunk
                        .iter()
                        .filter(|d| done.moved_on.iter().any(|(id, _)| *id == d.order_id))
                        .map(|d| (d.order_id, d.version))
                        .collect();
                    archive::remove_stale(&mut arch, &stale).await?;
                    out.moved_on += stale.len() as u64;
                }
                let kept: std::collections::HashSet<i64> =
                    done.moved_on.iter().map(|(id, _)| id.get()).collect();
                for d in chunk.iter().filter(|d| !kept.contains(&d.order_id.get())) {
                    out.moved += 1;
                    out.bytes += d.doc.len() as u64;
                }
                moved_in_pass += done.deleted.len() as i64;
            }
            metrics::counter!("orderly_archived_orders_total").increment(docs.len() as u64);
            after = last;
            bar.set_position((last - first).max(0) as u64);
            bar.set_message(format!("{} moved", out.moved));
            let per_chunk = started.elapsed() / chunks.max(1);
            db.probe().await;
            let pause = throttle.after_batch(batch_started.elapsed(), per_chunk, db.max_replica_lag());
            metrics::gauge!("orderly_archive_slowdown_ratio").set(f64::from(throttle.factor()));
            tokio::select! {
                _ = opts.stop.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        archive::set_checkpoint(
            &mut arch,
            index,
            &Checkpoint {
                bound,
                resume_after: bound,
                batch_last: bound,
                done: true,
                moved: moved_in_pass,
            },
            Utc::now(),
        )
        .await?;
        Ok(out)
    }

    /// Removes from the archive the documents of this shard's orders with ids in
    /// `(after, last]` that are still hot at another version and are not in this batch's
    /// `docs` (those are written again at their current version). Answers how many.
    async fn drop_stale(
        &self,
        shard: &Shard,
        hot: &mut MySqlConnection,
        arch: &mut MySqlConnection,
        after: i64,
        last: i64,
        docs: &[ArchivedDoc],
    ) -> Result<u64, ArchiveError> {
        let in_batch: std::collections::HashSet<OrderId> = docs.iter().map(|d| d.order_id).collect();
        let archived: Vec<(OrderId, i64)> = archive::versions_between(arch, after, last)
            .await?
            .into_iter()
            .filter(|(id, _)| self.shards.of_order(*id).index == shard.index)
            .filter(|(id, _)| !in_batch.contains(id))
            .collect();
        if archived.is_empty() {
            return Ok(0);
        }
        let ids: Vec<OrderId> = archived.iter().map(|(id, _)| *id).collect();
        let current = orders::versions_of(hot, &shard.tables, &ids).await?;
        let stale: Vec<(OrderId, i64)> = archived
            .into_iter()
            .filter(|(id, v)| current.get(id).is_some_and(|hot| hot != v))
            .collect();
        Ok(archive::remove_stale(arch, &stale).await?)
    }
}

/// [`orders::delete_archived`], again after a deadlock (which committed nothing).
async fn delete_chunk(
    hot: &mut MySqlConnection,
    shard: &Shard,
    pairs: &[(OrderId, i64)],
) -> Result<orders::Deleted, StorageError> {
    let mut tries = 0;
    loop {
        match orders::delete_archived(hot, &shard.tables, pairs).await {
            Err(e) if e.is_retryable() && tries < crate::storage::DEADLOCK_RETRIES => tries += 1,
            other => return other,
        }
    }
}

fn shard_bar(index: u32) -> ProgressBar {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "shard {index:02} [{{bar:30}}] {{percent:>3}}% {{msg}} {{elapsed}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Takes the archive lock of a table shard on `conn`'s session, without waiting.
async fn lock_shard(conn: &mut MySqlConnection, orders_table: &str) -> Result<bool, StorageError> {
    let got: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('orderly_archive.', DATABASE(), '.', ?), 64), 0)")
            .bind(orders_table)
            .fetch_one(conn)
            .await?;
    Ok(got == Some(1))
}

/// Writes a batch as gzip NDJSON (one document per line) under `dir/shard_NN/`, named by
/// its first and last id: to a temporary name, synced, then renamed, so a file with the
/// final name is always whole. A batch exported again (a re-run) replaces its file.
async fn export(dir: &Path, shard: u32, docs: &[ArchivedDoc]) -> Result<PathBuf, ArchiveError> {
    let dir = dir.join(format!("shard_{shard:02}"));
    let name = format!(
        "{}-{}.ndjson.gz",
        docs[0].order_id.get(),
        docs[docs.len() - 1].order_id.get()
    );
    let lines: Vec<String> = docs.iter().map(|d| d.doc.clone()).collect();
    tokio::task::spawn_blocking(move || -> Result<PathBuf, ArchiveError> {
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(&name);
        let partial = dir.join(format!("{name}.partial"));
        let file = std::fs::File::create(&partial)?;
        let mut gz =
            flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::default());
        for (i, line) in lines.iter().enumerate() {
            if i == lines.len() / 2 {
                fail_point!("archive::export", |_| Err(ArchiveError::Failpoint(
                    "archive::export"
                )));
            }
            gz.write_all(line.as_bytes())?;
            gz.write_all(b"\n")?;
        }
        let file = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)?;
        Ok(path)
    })
    .await
    .map_err(|e| ArchiveError::Export(std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_backs_off_under_strain_and_recovers() {
        let s = ArchiveSettings::default();
        let base = Duration::from_millis(200);
        let mut t = Throttle::new(base, 100, &s);
        let fast = Duration::from_millis(5);
        assert_eq!(t.after_batch(Duration::ZERO, fast, Duration::ZERO), base);
        // Deletes 5 times slower than the fastest: the hot tables are busy.
        assert_eq!(t.after_batch(Duration::ZERO, fast * 5, Duration::ZERO), base * 2);
        assert_eq!(t.after_batch(Duration::ZERO, fast * 5, Duration::ZERO), base * 4);
        // A lagging replica alone is strain too.
        let lag = Duration::from_millis(s.max_replica_lag_ms + 1);
        assert_eq!(t.after_batch(Duration::ZERO, fast, lag), base * 8);
        for _ in 0..10 {
            t.after_batch(Duration::ZERO, fast, lag);
        }
        assert_eq!(t.factor(), s.max_slowdown);
        t.after_batch(Duration::ZERO, fast, Duration::ZERO);
        assert_eq!(t.factor(), s.max_slowdown / 2);
        for _ in 0..10 {
            t.after_batch(Duration::ZERO, fast, Duration::ZERO);
        }
        assert_eq!(t.after_batch(Duration::ZERO, fast, Duration::ZERO), base);
    }

    #[test]
    fn the_throttle_rests_long_enough_to_keep_the_pass_under_its_share_of_the_time() {
        let s = ArchiveSettings::default();
        let base = Duration::from_millis(200);
        let mut t = Throttle::new(base, 20, &s);
        let fast = Duration::from_millis(5);
        // A batch of 1 s at 20 %: 4 s of rest; a quick batch still gets the base pause.
        assert_eq!(
            t.after_batch(Duration::from_secs(1), fast, Duration::ZERO),
            Duration::from_secs(4)
        );
        assert_eq!(
            t.after_batch(Duration::from_millis(10), fast, Duration::ZERO),
            base
        );
        let mut all_out = Throttle::new(Duration::ZERO, 100, &s);
        assert_eq!(
            all_out.after_batch(Duration::from_secs(1), fast, Duration::ZERO),
            Duration::ZERO
        );
    }
}
