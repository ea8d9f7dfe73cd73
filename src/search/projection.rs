//! The search read model: the [`Projection`] that feeds an [`OrderIndex`] from the order
//! stream (durable consumer `search`), and the loop `serve` runs it in.
//!
//! Each batch is one upsert of its snapshots: committed before `apply` answers, so the
//! consumer acknowledges only what the index holds. Idempotency by version is the index's
//! (see [`OrderIndex::upsert`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::index::TantivyIndex;
use super::{IndexError, OrderIndex};
use crate::config::EventSettings;
use crate::events::consumer::{self, Batch, Projection, ProjectionError};

/// The durable consumer's name.
pub const NAME: &str = "search";

/// How often a process whose data directory's writer another process holds tries to take
/// it over. The holder keeps the index current meanwhile; a few seconds of lag after the
/// holder stops is what a standby costs, and a lock attempt is one system call.
const STANDBY_RETRY: Duration = Duration::from_secs(5);

/// The search read model over `index`.
#[derive(Clone)]
pub struct Search {
    index: Arc<dyn OrderIndex>,
}

impl Search {
    pub fn new(index: Arc<dyn OrderIndex>) -> Search {
        Search { index }
    }

    /// Empties the index: the reset step of a rebuild.
    pub fn reset(&self) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'static {
        let index = self.index.clone();
        async move { blocking(move || index.clear()).await }
    }
}

async fn blocking<T, F>(f: F) -> Result<T, ProjectionError>
where
    F: FnOnce() -> Result<T, IndexError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ProjectionError::new)?
        .map_err(ProjectionError::new)
}

impl Projection for Search {
    fn name(&self) -> &str {
        NAME
    }

    fn apply(&self, batch: &Batch) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        let index = self.index.clone();
        let snapshots: Vec<_> = batch.events.iter().map(|e| e.order.clone()).collect();
        async move {
            blocking(move || index.upsert(&snapshots)).await?;
            Ok(())
        }
    }
}

/// Feeds `index` from the `search` consumer until `shutdown`. First takes the directory's
/// writer, waiting as a standby while another process holds it (that process runs the
/// consumer meanwhile; this one still answers searches from the directory).
pub async fn run(settings: EventSettings, index: Arc<TantivyIndex>, shutdown: CancellationToken) {
    let mut told = false;
    loop {
        let attempt = index.clone();
        let outcome = tokio::task::spawn_blocking(move || attempt.take_writer()).await;
        let wait = match outcome {
            Ok(Ok(())) => break,
            Ok(Err(IndexError::Locked)) => {
                if !told {
                    tracing::info!("another process writes the search index; standing by");
                    told = true;
                }
                STANDBY_RETRY
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot open the search index writer; retrying");
                STANDBY_RETRY
            }
            Err(e) => {
                tracing::error!(error = %e, "search index writer task failed; retrying");
                STANDBY_RETRY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    consumer::run(settings, Arc::new(Search::new(index)), shutdown).await;
}
