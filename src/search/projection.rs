//! The search read model: the [`Projection`] that feeds an [`OrderIndex`] from the order
//! stream (durable consumer `search`), and the loop `serve` runs it in.
//!
//! Each batch is one upsert of its snapshots: committed before `apply` answers, so the
//! consumer acknowledges only what the index holds. Idempotency by version is the index's
//! (see [`OrderIndex::upsert`]).

use crate::storage::Db;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::MySqlConnection;
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

/// Feeds `index` from the `search` consumer until `shutdown`, once elected.
///
/// Two locks elect the writer. The directory's writer (tantivy's lock file) makes one process
/// per data directory the writer; a process that cannot take it stands by and answers
/// searches from the directory, which the holder keeps current. The deployment's writer (a
/// named lock in the commerce database, held on a connection of its own) makes one data
/// directory the deployment's index: the durable consumer is one for the deployment, so two
/// hosts that both consumed would each index part of the stream. A process that holds its
/// directory's writer but not the deployment's is on another host than the index: it
/// consumes nothing and refuses searches (503, naming why) until it wins the election.
pub async fn run(
    settings: EventSettings,
    index: Arc<TantivyIndex>,
    commerce: Db,
    shutdown: CancellationToken,
) {
    let mut told = false;
    loop {
        let wait = match elect(&index, &commerce).await {
            Ok(Some(mut lock)) => {
                index.set_fed_elsewhere(false);
                tracing::info!("this process writes the search index");
                told = false;
                let consuming = shutdown.child_token();
                let consumer = tokio::spawn(consumer::run(
                    settings.clone(),
                    Arc::new(Search::new(index.clone())),
                    consuming.clone(),
                ));
                // The consumer runs while the deployment lock holds: a lost connection frees
                // the lock for another host, so this one stops first.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(LOCK_CHECK) => {}
                    }
                    if !still_held(&mut lock).await {
                        tracing::warn!("lost the search writer's lock; the search consumer stops");
                        break;
                    }
                }
                consuming.cancel();
                let _ = consumer.await;
                if shutdown.is_cancelled() {
                    return;
                }
                STANDBY_RETRY
            }
            Ok(None) => {
                if !told {
                    tracing::warn!(
                        "another host writes this deployment's search index: this process \
                         refuses searches (route /v1/search/* to that host)"
                    );
                    told = true;
                }
                index.set_fed_elsewhere(true);
                STANDBY_RETRY
            }
            Err(IndexError::Locked) => {
                if !told {
                    tracing::info!("another process writes the search index; standing by");
                    told = true;
                }
                STANDBY_RETRY
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the search index writer; retrying");
                STANDBY_RETRY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How often the deployment writer checks that its lock still holds.
const LOCK_CHECK: Duration = Duration::from_secs(5);

/// Takes the directory's writer, then the deployment's: `Ok(Some(connection holding the
/// lock))` elected, `Ok(None)` another host holds the deployment's, `Err(Locked)` another
/// process holds this directory's.
async fn elect(index: &Arc<TantivyIndex>, commerce: &Db) -> Result<Option<MySqlConnection>, IndexError> {
    let attempt = index.clone();
    tokio::task::spawn_blocking(move || attempt.take_writer())
        .await
        .map_err(|e| IndexError::Engine(format!("search writer task failed: {e}")))??;
    let locked = async {
        let mut conn = commerce.acquire().await?.detach();
        let got: Option<i64> =
            sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('orderly_search.', DATABASE()), 64), 0)")
                .fetch_one(&mut conn)
                .await?;
        Ok::<_, sqlx::Error>((got == Some(1)).then_some(conn))
    }
    .await;
    locked.map_err(|e| IndexError::Engine(format!("the search writer's lock: {e}")))
}

async fn still_held(conn: &mut MySqlConnection) -> bool {
    let held: Result<Option<i64>, _> = sqlx::query_scalar(
        "SELECT IS_USED_LOCK(LEFT(CONCAT('orderly_search.', DATABASE()), 64)) = CONNECTION_ID()",
    )
    .fetch_one(conn)
    .await;
    matches!(held, Ok(Some(1)))
}
