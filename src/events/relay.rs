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
//!   makes the outbox grow (`orderly_outbox_backlog_events`).
//! - **No silent stall.** Every publish that fails is counted by why
//!   (`orderly_relay_publish_failures_total{reason}`: `send_timeout` — the NATS client's
//!   buffer is full, as after a long outage; `send_error`, `ack_timeout`, `ack_error`,
//!   `no_stream`, `refused`), and after a failed step the backlog gauge is the outbox's real
//!   size. The relay calls itself caught up (gauge 0, one log line) only after a step that
//!   read less than a batch and published all of it.
//! - **A poison row is parked, never an unavailable broker's.** A row JetStream refuses for
//!   what it is (`refused`: over the maximum message size) is retried, and after
//!   `events.max_publish_attempts` refusals in a row moved to `order_outbox_parked`
//!   ([`outbox::park`], logged with its event id, counted in `orderly_outbox_parked_events`),
//!   so the rows behind it flow. Timeouts and errors of a broker that is away or slow park nothing:
//!   those rows wait, in order, however long it takes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::ErrorCode;
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Rows published and acknowledged (and, by [`relay_once`], deleted).
    pub published: usize,
    /// Of those, the ones JetStream already had (a republish after a crash).
    pub duplicates: usize,
    /// The first row of the batch that was not acknowledged, if any: it and every row after
    /// it wait for the next step.
    pub failed: Option<Failure>,
}

/// A publish that failed: the first row of a batch that did not go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The outbox row's id.
    pub id: i64,
    pub event_id: String,
    pub order_id: i64,
    pub version: i64,
    pub reason: FailureReason,
    /// The client's or the broker's words.
    pub error: String,
}

impl Failure {
    fn of(row: &Pending, reason: FailureReason, error: impl std::fmt::Display) -> Failure {
        Failure {
            id: row.id,
            event_id: event_id(row.order_id, row.version),
            order_id: row.order_id.get(),
            version: row.version,
            reason,
            error: error.to_string(),
        }
    }
}

/// Why a publish failed: the `reason` label of `orderly_relay_publish_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Not handed to the NATS client within `events.publish_timeout_ms`: its buffer is full
    /// (NATS away for long) or too many acks are outstanding.
    SendTimeout,
    /// The client would not take it.
    SendError,
    /// Sent (or buffered), but no ack within `events.publish_timeout_ms`.
    AckTimeout,
    /// JetStream answered with an error that says nothing about the message itself.
    AckError,
    /// No stream captures the subject (the stream was deleted): set up again, never parked.
    NoStream,
    /// Refused for what the message is (over the server's or the stream's maximum size):
    /// every retry is refused alike; parked after `events.max_publish_attempts`.
    Refused,
}

impl FailureReason {
    pub fn label(self) -> &'static str {
        match self {
            FailureReason::SendTimeout => "send_timeout",
            FailureReason::SendError => "send_error",
            FailureReason::AckTimeout => "ack_timeout",
            FailureReason::AckError => "ack_error",
            FailureReason::NoStream => "no_stream",
            FailureReason::Refused => "refused",
        }
    }

    fn of_send(e: &PublishError) -> FailureReason {
        match e.kind() {
            PublishErrorKind::TimedOut => FailureReason::SendTimeout,
            PublishErrorKind::MaxPayloadExceeded => FailureReason::Refused,
            _ => FailureReason::SendError,
        }
    }

    fn of_ack(e: &PublishError) -> FailureReason {
        let code = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .map(|j| j.error_code());
        match e.kind() {
            PublishErrorKind::TimedOut => FailureReason::AckTimeout,
            PublishErrorKind::StreamNotFound => FailureReason::NoStream,
            _ if code == Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => FailureReason::Refused,
            _ => FailureReason::AckError,
        }
    }
}

/// The message body of an outbox row: the [`crate::domain::events::OrderEvent`] JSON, built
/// around the stored snapshot without parsing it. Public for the events bench, whose raw
/// baseline publishes exactly these bodies.
pub fn body(row: &Pending) -> Bytes {
    format!(
        r#"{{"event_id":"{}","kind":"{}","occurred_at":"{}","order":{}}}"#,
        event_id(row.order_id, row.version),
        row.kind.name(),
        row.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        row.payload
    )
    .into()
}

/// Publishes up to `batch` of the oldest outbox rows and waits for their acks in order,
/// stopping at the first failure; answers the ids of the acknowledged prefix, in order, and
/// what the step did (its `published` counts that prefix). Deletes nothing (see
/// [`relay_once`]).
pub async fn publish_pending(
    conn: &mut MySqlConnection,
    broker: &Broker,
    batch: u32,
) -> Result<(Vec<i64>, Relayed), RelayError> {
    let rows = outbox::pending(conn, batch).await?;
    let timeout = Duration::from_millis(broker.settings().publish_timeout_ms);
    let mut acks = Vec::with_capacity(rows.len());
    let mut unsent = None;
    for row in &rows {
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(body(row))
            .message_id(event_id(row.order_id, row.version));
        // The client bounds its own send, but not its wait for an ack permit: bound both.
        let sent = tokio::time::timeout(
            timeout,
            broker
                .jetstream()
                .send_publish(broker.subject(row.shop_id, row.kind), publish),
        )
        .await;
        match sent {
            Ok(Ok(ack)) => acks.push((row, ack)),
            Ok(Err(e)) => {
                unsent = Some(Failure::of(row, FailureReason::of_send(&e), e));
                break;
            }
            Err(_) => {
                unsent = Some(Failure::of(
                    row,
                    FailureReason::SendTimeout,
                    "publish not sent in time",
                ));
                break;
            }
        }
    }
    let mut acked = Vec::with_capacity(acks.len());
    let mut relayed = Relayed::default();
    for (row, ack) in acks {
        if relayed.failed.is_some() {
            // Dropped unawaited: the rows stay and go out again with the next batch.
            continue;
        }
        match ack.await {
            Ok(a) => {
                relayed.duplicates += usize::from(a.duplicate);
                acked.push(row.id);
            }
            Err(e) => relayed.failed = Some(Failure::of(row, FailureReason::of_ack(&e), e)),
        }
    }
    if relayed.failed.is_none() {
        relayed.failed = unsent;
    }
    relayed.published = acked.len();
    Ok((acked, relayed))
}

/// One relay step: [`publish_pending`], then deletes what the broker acknowledged.
pub async fn relay_once(
    conn: &mut MySqlConnection,
    broker: &Broker,
    batch: u32,
) -> Result<Relayed, RelayError> {
    let (acked, relayed) = publish_pending(conn, broker, batch).await?;
    outbox::delete(conn, &acked).await?;
    Ok(relayed)
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

/// How often the parked gauge is sampled while rows flow: the table changes only when this
/// relay parks a row (sampled at once) or an operator republishes (rare), so a few seconds of
/// staleness cost nothing, and an idle relay's polls stay one query each.
const PARKED_SAMPLE: Duration = Duration::from_secs(5);

/// Runs the relays of every shard database until `shutdown`: connects to NATS (retrying
/// while it is down, the backlog gauges sampled meanwhile), then one loop per database.
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
                for db in &databases {
                    sample_backlog(db).await;
                }
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

/// Sets the backlog gauge of `db` from its outbox, on a pooled connection (no relay holds it
/// yet); a database that does not answer keeps its last value.
async fn sample_backlog(db: &Database) {
    let counted = async {
        let mut conn = db.write().acquire().await.map_err(StorageError::from)?;
        outbox::backlog(&mut conn).await
    }
    .await;
    if let Ok(n) = counted {
        metrics::gauge!("orderly_outbox_backlog_events", "database" => db.name().to_owned()).set(n as f64);
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
        let mut state = DatabaseRelay::new(&name, settings.max_publish_attempts);
        loop {
            let step = async {
                state.sample_parked(&mut conn, false).await?;
                let r = relay_once(&mut conn, &broker, settings.relay_batch).await?;
                published.increment(r.published as u64);
                Ok::<_, RelayError>(
                    state
                        .after_step(&mut conn, &broker, r, settings.relay_batch)
                        .await?,
                )
            }
            .await;
            let next = match step {
                Ok(next) => next,
                Err(e) => {
                    // Only the database fails a step: publish failures are answers.
                    failures.increment(1);
                    tracing::warn!(database = %name, error = %e, "event relay: database failed; reconnecting");
                    break;
                }
            };
            let wait = match next {
                Next::Now => continue,
                Next::Retry => {
                    failures.increment(1);
                    sleep_or_stop(retry, &shutdown).await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    continue;
                }
                Next::Idle => poll,
            };
            let wake = wakers.of(index);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
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

/// What the relay loop does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// More rows are waiting and the broker takes them (or a poison row was just parked).
    Now,
    /// A publish failed: wait `events.retry_ms`.
    Retry,
    /// Caught up: wait for a wake or the poll interval.
    Idle,
}

/// What the relay of one database remembers between steps while it holds the lock.
struct DatabaseRelay {
    name: String,
    max_attempts: u32,
    backlog: metrics::Gauge,
    parked: metrics::Gauge,
    /// The row at the head of the outbox that JetStream refused, and how many times in a row.
    refused: Option<(i64, u32)>,
    /// Failed publishes since the relay was last caught up (0: it is).
    failing: u64,
    parked_sampled: Option<std::time::Instant>,
}

impl DatabaseRelay {
    fn new(name: &str, max_attempts: u32) -> Self {
        DatabaseRelay {
            name: name.to_owned(),
            max_attempts,
            backlog: metrics::gauge!("orderly_outbox_backlog_events", "database" => name.to_owned()),
            parked: metrics::gauge!("orderly_outbox_parked_events", "database" => name.to_owned()),
            refused: None,
            failing: 0,
            parked_sampled: None,
        }
    }

    /// Samples the parked gauge when `now` or when the last sample is [`PARKED_SAMPLE`] old.
    async fn sample_parked(&mut self, conn: &mut MySqlConnection, now: bool) -> Result<(), StorageError> {
        if now || self.parked_sampled.is_none_or(|at| at.elapsed() >= PARKED_SAMPLE) {
            self.parked.set(outbox::parked(conn).await? as f64);
            self.parked_sampled = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Counts, samples, parks and logs after step `r`; answers what the loop does next.
    async fn after_step(
        &mut self,
        conn: &mut MySqlConnection,
        broker: &Broker,
        r: Relayed,
        batch: u32,
    ) -> Result<Next, StorageError> {
        let Some(failed) = r.failed else {
            self.refused = None;
            if r.published as u32 == batch {
                // A full batch: more may wait. One count per batch keeps the gauge true
                // while a backlog drains.
                self.backlog.set(outbox::backlog(conn).await? as f64);
                return Ok(Next::Now);
            }
            // Less than a batch was there, and all of it went out.
            self.backlog.set(0.0);
            if self.failing > 0 {
                tracing::info!(database = %self.name, failed_publishes = self.failing, "event relay caught up");
                self.failing = 0;
            }
            return Ok(Next::Idle);
        };
        self.failing += 1;
        metrics::counter!(
            "orderly_relay_publish_failures_total",
            "database" => self.name.clone(),
            "reason" => failed.reason.label()
        )
        .increment(1);
        // Not caught up, whatever was published: the gauge says what is left.
        self.backlog.set(outbox::backlog(conn).await? as f64);
        if failed.reason != FailureReason::Refused {
            self.refused = None;
            tracing::warn!(
                database = %self.name, reason = failed.reason.label(), error = %failed.error,
                event_id = %failed.event_id, "event relay: publish failed; the row and those after it wait"
            );
            if failed.reason == FailureReason::NoStream {
                if let Err(e) = broker.ensure_stream().await {
                    tracing::warn!(database = %self.name, error = %e, "event relay: the stream cannot be set up");
                }
            }
            return Ok(Next::Retry);
        }
        let attempts = match self.refused {
            Some((id, n)) if id == failed.id => n + 1,
            _ => 1,
        };
        if attempts < self.max_attempts {
            self.refused = Some((failed.id, attempts));
            tracing::warn!(
                database = %self.name, error = %failed.error, event_id = %failed.event_id,
                order_id = failed.order_id, attempts,
                "event relay: JetStream refused an event; it is parked if this goes on"
            );
            return Ok(Next::Retry);
        }
        self.refused = None;
        if outbox::park(conn, failed.id, attempts, &failed.error).await? {
            tracing::error!(
                database = %self.name, error = %failed.error, event_id = %failed.event_id,
                order_id = failed.order_id, version = failed.version, attempts,
                "event relay: parked an event JetStream keeps refusing; the rows behind it go on \
                 (republish with `orderly relay --republish-parked` once the cause is fixed)"
            );
        }
        self.sample_parked(conn, true).await?;
        Ok(Next::Now)
    }
}

async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
