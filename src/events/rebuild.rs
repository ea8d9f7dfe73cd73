//! `orderly project rebuild`: a read model rebuilt from the order shards, then fed from the
//! stream from where the backfill started.
//!
//! 1. Note the stream's last sequence `S`.
//! 2. Delete the projection's durable consumer, reset the projection (the caller's step:
//!    truncate its tables, empty its index), and create the consumer again to start after
//!    `S`.
//! 3. Backfill: every order of every shard, at its current version, applied as an event
//!    (read in id order, in pages); then every archived order. The shards are read before
//!    the archive, and an order moves into the archive before it leaves its shard, so an
//!    order moving meanwhile is read in one place or both.
//!
//! Every event after `S` is delivered by the consumer; every event up to `S` was committed
//! before the backfill read its order, so the backfill holds it or something newer.
//! Projections keep the highest version, so the overlap of the two is harmless, and so is a
//! running `serve` whose consumer reconnects meanwhile (at worst it replays the stream).

use std::time::Duration;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};

use super::consumer::{self, Batch, ConsumerError, Projection, ProjectionError, StartAt};
use super::Broker;
use crate::domain::events::{event_id, EventKind, OrderEvent, OrderSnapshot};
use crate::storage::outbox;
use crate::storage::shards::ShardMap;

/// Orders read and applied per page of the backfill.
const PAGE: u32 = 500;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Orders applied by the backfill.
    pub orders: u64,
    /// The stream sequence the consumer follows from (exclusive).
    pub followed_after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("stored snapshot of order {0} is malformed: {1}")]
    Snapshot(i64, String),
}

/// Rebuilds `projection` as the module docs say; `reset` empties it. Shows a progress bar
/// when `progress` is set (the command line), none in tests.
pub async fn rebuild<P, R>(
    broker: &Broker,
    shards: &ShardMap,
    archive: &crate::storage::Db,
    projection: &P,
    reset: R,
    progress: bool,
) -> Result<Rebuilt, RebuildError>
where
    P: Projection,
    R: std::future::Future<Output = Result<(), ProjectionError>>,
{
    let after = consumer::stream_last_sequence(broker).await?;
    consumer::delete(broker, projection.name()).await?;
    reset.await?;
    consumer::durable(broker, projection.name(), StartAt::After(after)).await?;

    let bar = if progress {
        let bar = ProgressBar::new(shards.all().len() as u64 + 1);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} stores ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("rebuilding {}", projection.name()));
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut orders = 0u64;
    for shard in shards.all() {
        let mut conn = shards
            .primary(shard)
            .acquire()
            .await
            .map_err(crate::storage::StorageError::from)?;
        let mut last = 0i64;
        loop {
            let page = outbox::snapshots(&mut conn, &shard.tables, last, PAGE).await?;
            let Some((id, _)) = page.last() else { break };
            last = *id;
            orders += apply_page(projection, &page).await?;
            bar.set_message(format!("rebuilding {}: {orders} orders", projection.name()));
        }
        bar.inc(1);
    }
    let mut conn = archive
        .acquire()
        .await
        .map_err(crate::storage::StorageError::from)?;
    let mut last = 0i64;
    loop {
        let page = crate::storage::archive::documents(&mut conn, last, PAGE).await?;
        let Some((id, _)) = page.last() else { break };
        last = *id;
        orders += apply_page(projection, &page).await?;
        bar.set_message(format!("rebuilding {}: {orders} orders", projection.name()));
    }
    bar.inc(1);
    bar.finish_with_message(format!(
        "rebuilt {}: {orders} orders at {}; following the stream after #{after}",
        projection.name(),
        Utc::now().format("%H:%M:%S")
    ));
    Ok(Rebuilt {
        orders,
        followed_after: after,
    })
}

/// Applies a page of `(order id, snapshot JSON)` as events at the orders' current versions;
/// answers how many.
async fn apply_page<P: Projection>(projection: &P, page: &[(i64, String)]) -> Result<u64, RebuildError> {
    let mut batch = Batch::default();
    for (id, json) in page {
        let order: OrderSnapshot =
            serde_json::from_str(json).map_err(|e| RebuildError::Snapshot(*id, e.to_string()))?;
        let oid = crate::domain::ids::OrderId::new(*id)
            .ok_or_else(|| RebuildError::Snapshot(*id, "not an order id".into()))?;
        batch.events.push(OrderEvent {
            event_id: event_id(oid, order.version),
            kind: EventKind::Changed,
            occurred_at: order.updated_at,
            order,
        });
    }
    projection.apply(&batch).await?;
    Ok(batch.events.len() as u64)
}
