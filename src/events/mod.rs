//! The order event stream (SPEC 6): the outbox relay to NATS JetStream, and the broker
//! connection the read models consume from.
//!
//! - [`relay`] publishes each shard database's outbox ([`crate::storage::outbox`]) to the
//!   stream, one active relay per database, and deletes rows only once JetStream acknowledged
//!   them.
//! - [`consumer`] feeds each read model ([`consumer::Projection`]) from a durable consumer of
//!   its own, acknowledging a batch only once it is applied.
//! - [`merchant`] is the merchant copy by shop with its daily reports, as a projection.
//! - [`rebuild`] rebuilds a read model from the shards and follows the stream from there.
//!
//! The stream: one JetStream stream (`events.stream`), subjects
//! `<events.subject_prefix>.orders.<shop_id>.<kind>`, file storage, every message with its
//! event id as `Nats-Msg-Id` so that JetStream drops a republished event within
//! `events.duplicate_window_secs`. Orders never wait for NATS: the outbox is written in the
//! order's own transaction, and the relay catches up whenever the broker is back.
//! Every process that connects sets the stream up if it is missing ([`Broker::ensure_stream`]),
//! safely when several do at once; an existing stream is used as it is.

pub mod consumer;
pub mod merchant;
pub mod rebuild;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::Notify;

use crate::config::EventSettings;
use crate::domain::events::EventKind;

/// Errors of the broker side.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    #[error("cannot read the NATS credentials file (events.nats_credentials_file): {0}")]
    Credentials(#[source] std::io::Error),
    #[error("JetStream stream setup failed: {0}")]
    Stream(String),
    #[error("publish failed: {0}")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
}

/// A JetStream context bound to the settings' stream and subjects.
#[derive(Clone)]
pub struct Broker {
    js: jetstream::Context,
    settings: Arc<EventSettings>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("stream", &self.settings.stream)
            .finish()
    }
}

impl Broker {
    /// Connects to `events.nats_url` (failing if it is down: callers retry) and makes sure
    /// the stream exists.
    pub async fn connect(settings: &EventSettings) -> Result<Broker, BrokerError> {
        let broker = Broker::open(settings).await?;
        broker.ensure_stream().await?;
        Ok(broker)
    }

    /// Connects to `events.nats_url` without looking at the stream (see
    /// [`Broker::ensure_stream`]).
    pub async fn open(settings: &EventSettings) -> Result<Broker, BrokerError> {
        let timeout = Duration::from_millis(settings.publish_timeout_ms);
        let mut options = async_nats::ConnectOptions::new();
        if !settings.nats_credentials_file.as_os_str().is_empty() {
            options = options
                .credentials_file(&settings.nats_credentials_file)
                .await
                .map_err(BrokerError::Credentials)?;
        }
        if !settings.nats_tls_ca_file.as_os_str().is_empty() {
            options = options
                .add_root_certificates(settings.nats_tls_ca_file.clone())
                .require_tls(true);
        }
        let client = options
            .name("orderly")
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .connect(settings.nats_url.as_str())
            .await
            .map_err(BrokerError::Connect)?;
        let mut js = jetstream::new(client);
        js.set_timeout(timeout);
        Ok(Broker {
            js,
            settings: Arc::new(settings.clone()),
        })
    }

    /// Creates the stream if it is not there; an existing one is kept as it is (change its
    /// retention with the broker's tools), as long as it captures our subjects.
    ///
    /// Safe when several processes (a relay, the consumers, other instances, perhaps of
    /// another release with other settings) set it up at once: between one's look and its
    /// create, another may create it, and JetStream refuses the late create ("stream name
    /// already in use with a different configuration", or "subjects overlap with an existing
    /// stream" on servers whose name and subject checks straddle the other's create). Either
    /// refusal means the stream may be there now: look again and check it.
    ///
    /// Failpoint (`--features failpoints`): `events::before_stream_create` = `return(MS)`
    /// waits MS milliseconds between finding no stream and creating it, the window of the
    /// race.
    pub async fn ensure_stream(&self) -> Result<(), BrokerError> {
        let s = &self.settings;
        let subjects = format!("{}.orders.>", s.subject_prefix);
        let info = match self.stream_info().await? {
            Some(info) => info,
            None => {
                if let Some(pause) = before_stream_create() {
                    tokio::time::sleep(pause).await;
                }
                let created = self
                    .js
                    .create_stream(stream::Config {
                        name: s.stream.clone(),
                        subjects: vec![subjects.clone()],
                        storage: stream::StorageType::File,
                        duplicate_window: Duration::from_secs(s.duplicate_window_secs),
                        max_age: Duration::from_secs(s.retention_days * 24 * 3600),
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(stream) => stream.cached_info().clone(),
                    Err(e) if lost_create_race(&e) => self.stream_info().await?.ok_or_else(|| {
                        BrokerError::Stream(format!(
                            "{e}; and no stream {}: another stream captures {subjects}",
                            s.stream
                        ))
                    })?,
                    Err(e) => return Err(BrokerError::Stream(e.to_string())),
                }
            }
        };
        if !info.config.subjects.contains(&subjects) {
            return Err(BrokerError::Stream(format!(
                "stream {} exists without the subjects {subjects} (it has {:?})",
                s.stream, info.config.subjects
            )));
        }
        if info.config.duplicate_window < Duration::from_secs(s.duplicate_window_secs) {
            tracing::warn!(
                stream = %s.stream,
                window = ?info.config.duplicate_window,
                "the stream's duplicate window is shorter than events.duplicate_window_secs: a republish after a relay crash may be stored twice"
            );
        }
        Ok(())
    }

    /// The settings' stream as it is now, or `None` when there is none.
    async fn stream_info(&self) -> Result<Option<stream::Info>, BrokerError> {
        let name = &self.settings.stream;
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(Some(stream.cached_info().clone())),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(BrokerError::Stream(format!("looking for stream {name}: {e}"))),
            },
        }
    }

    /// The subject of an event of `shop`.
    pub fn subject(&self, shop: i64, kind: EventKind) -> String {
        format!("{}.orders.{shop}.{}", self.settings.subject_prefix, kind.name())
    }

    /// The JetStream context (for consumers and tests).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn settings(&self) -> &EventSettings {
        &self.settings
    }
}

/// The pause of the `events::before_stream_create` failpoint, if it is set.
fn before_stream_create() -> Option<Duration> {
    fail_point!("events::before_stream_create", |ms| ms
        .and_then(|m| m.parse().ok())
        .map(Duration::from_millis));
    None
}

/// Whether JetStream refused a create because the stream (or one on its subjects) appeared
/// meanwhile.
fn lost_create_race(e: &jetstream::context::CreateStreamError) -> bool {
    match e.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(js) => matches!(
            js.error_code(),
            jetstream::ErrorCode::STREAM_NAME_EXIST | jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
        ),
        _ => false,
    }
}

/// Wakes the relay of a shard database when a write of this process committed an event
/// there, so events do not wait for the next poll. One per database, by index.
#[derive(Debug, Clone, Default)]
pub struct RelayWakers(Arc<[Notify]>);

impl RelayWakers {
    pub fn new(databases: usize) -> Self {
        RelayWakers((0..databases).map(|_| Notify::new()).collect())
    }

    /// After a commit on database `index`. A wake with no relay waiting is kept for its next
    /// wait (`Notify` stores one permit), so none is lost between two polls.
    pub fn wake(&self, index: usize) {
        if let Some(n) = self.0.get(index) {
            n.notify_one();
        }
    }

    fn of(&self, index: usize) -> Option<&Notify> {
        self.0.get(index)
    }
}
