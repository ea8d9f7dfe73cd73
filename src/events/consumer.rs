//! Durable JetStream consumers that keep the read models (SPEC 6) up to date.
//!
//! A [`Projection`] is a read model fed by the order stream: the merchant copy with its
//! reports, the search index. Each has its own durable pull consumer (named after it), so
//! each keeps its own position, survives restarts and can be rebuilt alone.
//!
//! # Invariants
//! - **A batch is acknowledged only after [`Projection::apply`] made it durable.** A crash in
//!   between redelivers the batch; projections are idempotent by `(order, version)` (an event
//!   older than or equal to what a projection holds changes nothing), so a redelivery, a
//!   replay of the whole stream or an older event arriving after a newer one is harmless.
//! - **A message that is not an order event** (none of ours ever is) is logged and
//!   terminated, so it cannot block the consumer forever.
//! - A batch that fails to apply is negatively acknowledged (redelivered after a delay).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::AckKind;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::config::EventSettings;
use crate::domain::events::OrderEvent;

/// Events delivered together, with how many more the stream holds for this consumer.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub events: Vec<OrderEvent>,
    /// Messages still pending for the consumer after this batch (0: caught up).
    pub pending: u64,
}

/// Why a projection could not apply a batch (it is redelivered).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProjectionError(pub String);

impl ProjectionError {
    pub fn new(e: impl std::fmt::Display) -> Self {
        ProjectionError(e.to_string())
    }
}

/// A read model fed by the order stream.
pub trait Projection: Send + Sync + 'static {
    /// The durable consumer's name (letters, digits, `_`, `-`).
    fn name(&self) -> &str;

    /// Applies `batch` idempotently and durably: when this answers `Ok`, the batch is
    /// acknowledged and never delivered again (but may be replayed by a rebuild).
    fn apply(&self, batch: &Batch) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// Errors of the consumer side.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Broker(#[from] super::BrokerError),
    #[error("consumer: {0}")]
    Nats(String),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

fn nats(e: impl std::fmt::Display) -> ConsumerError {
    ConsumerError::Nats(e.to_string())
}

/// Where a new durable consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The whole stream.
    Beginning,
    /// The first message after this stream sequence (a rebuild's start).
    After(u64),
}

/// The durable consumer of `name` on the settings' stream, created if absent (starting at
/// `start`; an existing one keeps its position).
pub async fn durable(broker: &Broker, name: &str, start: StartAt) -> Result<PullConsumer, ConsumerError> {
    let s = broker.settings();
    let stream = broker.jetstream().get_stream(&s.stream).await.map_err(nats)?;
    let deliver_policy = match start {
        StartAt::Beginning => DeliverPolicy::All,
        StartAt::After(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                // A batch is applied in milliseconds; one held longer than this by a stuck
                // process is given to the next pull.
                ack_wait: Duration::from_secs(30),
                filter_subject: format!("{}.orders.>", s.subject_prefix),
                // Bounds what one slow projection holds unacknowledged.
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)
}

/// Deletes the durable consumer of `name` (a rebuild starts a new one); absent is fine.
pub async fn delete(broker: &Broker, name: &str) -> Result<(), ConsumerError> {
    let stream = broker
        .jetstream()
        .get_stream(&broker.settings().stream)
        .await
        .map_err(nats)?;
    match stream.delete_consumer(name).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(nats(e)),
    }
}

/// The last sequence of the stream (0 when empty): where a rebuild's backfill starts.
pub async fn stream_last_sequence(broker: &Broker) -> Result<u64, ConsumerError> {
    let mut stream = broker
        .jetstream()
        .get_stream(&broker.settings().stream)
        .await
        .map_err(nats)?;
    Ok(stream.info().await.map_err(nats)?.state.last_sequence)
}

/// The commit time of the oldest order event the durable consumer `name` has not
/// acknowledged (`None` when it has acknowledged everything the stream holds): how stale its
/// read model is, from JetStream's own view, so it keeps growing while the consumer is
/// stalled or no process runs it. The oldest unacknowledged message is the first one after
/// the consumer's ack floor (its subjects are the stream's). What
/// `orderly_projection_lag_seconds` samples.
pub async fn oldest_unapplied(
    broker: &Broker,
    name: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ConsumerError> {
    #[derive(serde::Deserialize)]
    struct Occurred {
        occurred_at: chrono::DateTime<chrono::Utc>,
    }
    let s = broker.settings();
    let stream = broker.jetstream().get_stream(&s.stream).await.map_err(nats)?;
    let mut consumer: PullConsumer = stream.get_consumer(name).await.map_err(nats)?;
    let info = consumer.info().await.map_err(nats)?;
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        return Ok(None);
    }
    let after = info.ack_floor.stream_sequence;
    let message = stream
        .get_first_raw_message_by_subject(format!("{}.orders.>", s.subject_prefix), after + 1)
        .await
        .map_err(nats)?;
    let event: Occurred = serde_json::from_slice(&message.payload).map_err(nats)?;
    Ok(Some(event.occurred_at))
}

/// Parses, applies and acknowledges `messages` (one batch).
async fn apply_messages<P: Projection>(
    projection: &P,
    messages: Vec<async_nats::jetstream::Message>,
    retry: Duration,
) -> Result<usize, ConsumerError> {
    let mut batch = Batch::default();
    let mut good = Vec::with_capacity(messages.len());
    for m in messages {
        match serde_json::from_slice::<OrderEvent>(&m.payload) {
            Ok(e) => {
                batch.pending = m.info().map(|i| i.pending).unwrap_or(0);
                batch.events.push(e);
                good.push(m);
            }
            Err(e) => {
                tracing::error!(subject = %m.subject, error = %e, "not an order event; dropped");
                m.ack_with(AckKind::Term).await.map_err(nats)?;
            }
        }
    }
    if good.is_empty() {
        return Ok(0);
    }
    if let Err(e) = projection.apply(&batch).await {
        for m in &good {
            let _ = m.ack_with(AckKind::Nak(Some(retry))).await;
        }
        return Err(e.into());
    }
    for m in &good {
        m.ack().await.map_err(nats)?;
    }
    Ok(good.len())
}

/// One step: applies what the consumer has now (up to `max` events) and answers how many;
/// 0 when it is caught up. For tests and tools that need a deterministic end.
pub async fn consume_once<P: Projection>(
    consumer: &PullConsumer,
    projection: &P,
    max: usize,
) -> Result<usize, ConsumerError> {
    let mut fetched = consumer
        .fetch()
        .max_messages(max)
        .expires(Duration::from_millis(200))
        .messages()
        .await
        .map_err(nats)?;
    let mut messages = Vec::new();
    while let Some(m) = fetched.next().await {
        messages.push(m.map_err(nats)?);
    }
    apply_messages(projection, messages, Duration::from_secs(1)).await
}

/// Applies everything the consumer has until it is caught up; answers the events applied.
pub async fn drain<P: Projection>(
    consumer: &PullConsumer,
    projection: &P,
    max: usize,
) -> Result<usize, ConsumerError> {
    let mut total = 0;
    loop {
        let n = consume_once(consumer, projection, max).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

/// Events applied per batch at most: enough to amortise a projection's transaction, small
/// enough that a batch applies in tens of milliseconds.
pub const BATCH: usize = 200;

/// Feeds `projection` from its durable consumer until `shutdown`, reconnecting as needed.
pub async fn run<P: Projection>(settings: EventSettings, projection: Arc<P>, shutdown: CancellationToken) {
    let retry = Duration::from_millis(settings.retry_ms);
    let name = projection.name().to_owned();
    let applied = metrics::counter!("orderly_projection_events_total", "projection" => name.clone());
    let failures = metrics::counter!("orderly_projection_failures_total", "projection" => name.clone());
    while !shutdown.is_cancelled() {
        let consumed = async {
            let broker = Broker::connect(&settings).await?;
            let consumer = durable(&broker, &name, StartAt::Beginning).await?;
            let mut messages = consumer.messages().await.map_err(nats)?;
            loop {
                let first = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    m = messages.next() => m,
                };
                let Some(first) = first else {
                    return Err(nats("the message stream ended"));
                };
                let mut batch = vec![first.map_err(nats)?];
                // Whatever else has arrived joins the batch, without waiting for more.
                while batch.len() < BATCH {
                    match messages.next().now_or_never() {
                        Some(Some(Ok(m))) => batch.push(m),
                        _ => break,
                    }
                }
                let n = apply_messages(projection.as_ref(), batch, retry).await?;
                applied.increment(n as u64);
            }
        }
        .await;
        match consumed {
            Ok(()) => return,
            Err(e) => {
                failures.increment(1);
                tracing::warn!(projection = %name, error = %e, "projection consumer failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}
