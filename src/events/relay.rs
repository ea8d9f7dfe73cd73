//! The outbox relay: publishes each shard database's outbox rows to JetStream and deletes
//! them once the broker acknowledged them.
//!
//! # Invariants
//! - **At least once, then exactly once in the stream.** A row is deleted only after its
//!   publish was acknowledged; a relay that dies in between publishes it again later, and
//!   JetStream drops the copy (`Nats-Msg-Id` = the event id, within the duplicate window).
//!   Consumers are idempotent by version beyond that window.
//! - **One active relay per database.** A relay holds the database's named lock
//!   (`GET_LOCK`) on its own connection while it works, and reads and deletes rows on that
//!   same connection: if the connection dies, the lock goes with it and the relay stops
//!   before another one takes over. Two relays at once would only duplicate publishes,
//!   which the stream absorbs; the lock saves the work.
//! - **Per-order order.** Rows are published in id order, one batch at a time, and only the
//!   acknowledged prefix of a batch is deleted; the second version of an order always has a
//!   higher id than the first (see [`crate::storage::outbox`]).
//! - **Orders never wait.** Nothing here runs inside an order's transaction; NATS down only
//!   makes the outbox grow (`orderly_outbox_backlog`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::SecondsFormat;
use sqlx::MySqlConnection;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError, RelayWakers};
use crate::config::EventSettings;
use crate::domain::events::event_id;
use crate::storage::outbox::{self, Pending};
use crate::storage::replicas::Database;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What one relay step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Rows published, acknowledged and deleted.
    pub published: usize,
    /// Of those, the ones JetStream already had (a republish after a crash).
    pub duplicates: usize,
}

/// The message body of an outbox row: the [`crate::domain::events::OrderEvent`] JSON, built
/// around the stored snapshot without parsing it.
pub(crate) fn body(row: &Pending) -> Bytes {
    format!(
        r#"{{"event_id":"{}","kind":"{}","occurred_at":"{}","order":{}}}"#,
        event_id(row.order_id, row.version),
        row.kind.name(),
        row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        row.payload
    )
    .into()
}

/// Publishes up to `batch` of the oldest outbox rows and waits for their acks; answers the
/// ids of the acknowledged prefix, in order, and how many of them were duplicates. Deletes
/// nothing (see [`relay_once`]).
pub async fn publish_pending(
    conn: &mut MySqlConnection,
    broker: &Broker,
    batch: u32,
) -> Result<(Vec<i64>, usize), RelayError> {
    let rows = outbox::pending(conn, batch).await?;
    let mut acks = Vec::with_capacity(rows.len());
    for row in &rows {
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(body(row))
            .message_id(event_id(row.order_id, row.version));
        match broker
            .jetstream()
            .send_publish(broker.subject(row.shop_id, row.kind), publish)
            .await
        {
            Ok(ack) => acks.push((row.id, ack)),
            Err(e) => {
                tracing::warn!(error = %e, "publish not sent; the rest of the batch waits");
                break;
            }
        }
    }
    let mut acked = Vec::with_capacity(acks.len());
    let mut duplicates = 0;
    let mut failure = None;
    for (id, ack) in acks {
        if failure.is_some() {
            // Dropped unawaited: the rows stay and go out again with the next batch.
            continue;
        }
        match ack.await {
            Ok(a) => {
                duplicates += usize::from(a.duplicate);
                acked.push(id);
            }
            Err(e) => failure = Some(e),
        }
    }
    if acked.is_empty() {
        if let Some(e) = failure {
            return Err(BrokerError::Publish(e).into());
        }
    }
    Ok((acked, duplicates))
}

/// One relay step: [`publish_pending`], then deletes what the broker acknowledged.
pub async fn relay_once(
    conn: &mut MySqlConnection,
    broker: &Broker,
    batch: u32,
) -> Result<Relayed, RelayError> {
    let (acked, duplicates) = publish_pending(conn, broker, batch).await?;
    outbox::delete(conn, &acked).await?;
    Ok(Relayed {
        published: acked.len(),
        duplicates,
    })
}

/// Takes the relay lock of `conn`'s database without waiting: true when this session holds
/// it. The name carries the database, since named locks are per server.
pub async fn try_lock(conn: &mut MySqlConnection) -> Result<bool, StorageError> {
    let got: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('orderly_relay.', DATABASE()), 64), 0)")
            .fetch_one(conn)
            .await?;
    Ok(got == Some(1))
}

/// Runs the relays of every shard database until `shutdown`: connects to NATS (retrying
/// while it is down), then one loop per database.
pub async fn run(
    databases: Vec<Arc<Database>>,
    settings: EventSettings,
    wakers: RelayWakers,
    shutdown: CancellationToken,
) {
    let retry = Duration::from_millis(settings.retry_ms);
    let broker = loop {
        match Broker::connect(&settings).await {
            Ok(b) => break b,
            Err(e) => {
                tracing::warn!(error = %e, "event relay: NATS unavailable; orders go on, the outbox grows");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    };
    let loops: Vec<_> = databases
        .into_iter()
        .enumerate()
        .map(|(index, db)| {
            tokio::spawn(run_database(
                db,
                index,
                broker.clone(),
                settings.clone(),
                wakers.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    for l in loops {
        let _ = l.await;
    }
}

/// The relay loop of one database: take the lock, drain the outbox, wait for a wake or the
/// poll interval, repeat; on any failure drop the connection (and the lock) and retry.
async fn run_database(
    db: Arc<Database>,
    index: usize,
    broker: Broker,
    settings: EventSettings,
    wakers: RelayWakers,
    shutdown: CancellationToken,
) {
    let retry = Duration::from_millis(settings.retry_ms);
    let poll = Duration::from_millis(settings.relay_poll_ms);
    let name = db.name().to_owned();
    let active = metrics::gauge!("orderly_relay_active", "database" => name.clone());
    let backlog = metrics::gauge!("orderly_outbox_backlog", "database" => name.clone());
    let published = metrics::counter!("orderly_events_published_total", "database" => name.clone());
    let failures = metrics::counter!("orderly_relay_failures_total", "database" => name.clone());
    while !shutdown.is_cancelled() {
        let held = async {
            let mut conn = db.write().acquire().await?.detach();
            let locked = try_lock(&mut conn).await?;
            Ok::<_, StorageError>(locked.then_some(conn))
        }
        .await;
        let mut conn = match held {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                // Another relay holds this database; look again later in case it dies.
                active.set(0.0);
                sleep_or_stop(retry * 5, &shutdown).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(database = %name, error = %e, "event relay: database unavailable");
                sleep_or_stop(retry, &shutdown).await;
                continue;
            }
        };
        active.set(1.0);
        loop {
            match relay_once(&mut conn, &broker, settings.relay_batch).await {
                Ok(r) => {
                    published.increment(r.published as u64);
                    if r.published as u32 == settings.relay_batch {
                        continue;
                    }
                    backlog.set(0.0);
                }
                Err(e) => {
                    failures.increment(1);
                    tracing::warn!(database = %name, error = %e, "event relay step failed; retrying");
                    if let RelayError::Storage(_) = e {
                        break;
                    }
                    if let Ok(n) = outbox::backlog(&mut conn).await {
                        backlog.set(n as f64);
                    }
                    sleep_or_stop(retry, &shutdown).await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    continue;
                }
            }
            let wake = wakers.of(index);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(poll) => {}
                _ = async {
                    match wake {
                        Some(n) => n.notified().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
        active.set(0.0);
        // Dropping the connection closes the session and frees the lock.
    }
}

async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
