//! The merchant copy and its reports as a [`Projection`] of the order stream (the SQL and its
//! invariants are in [`crate::storage::merchant`]).

use std::collections::BTreeMap;

use super::consumer::{Batch, Projection, ProjectionError};
use crate::domain::events::OrderEvent;
use crate::storage::merchant::{self, MerchantMap, PROJECTION};
use crate::storage::DEADLOCK_RETRIES;

/// Keeps the copy sharded by shop and the daily reports.
#[derive(Debug, Clone)]
pub struct MerchantCopy {
    map: MerchantMap,
}

impl MerchantCopy {
    pub fn new(map: MerchantMap) -> Self {
        MerchantCopy { map }
    }

    pub fn map(&self) -> &MerchantMap {
        &self.map
    }
}

impl Projection for MerchantCopy {
    fn name(&self) -> &str {
        PROJECTION
    }

    async fn apply(&self, batch: &Batch) -> Result<(), ProjectionError> {
        // One transaction per database of the copy; events keep their stream order within it.
        let mut by_database: BTreeMap<usize, Vec<&OrderEvent>> = BTreeMap::new();
        for e in &batch.events {
            by_database
                .entry(self.map.table_of(e.order.shop_id).database)
                .or_default()
                .push(e);
        }
        let progress = merchant::Progress {
            pending: batch.pending,
            newest: batch.events.iter().map(|e| e.occurred_at).max(),
        };
        let mut done = Vec::new();
        for (database, events) in by_database {
            let mut tries = 0;
            loop {
                match merchant::apply(&self.map, database, &events, progress).await {
                    Ok(_) => break,
                    // Two processes applying batches that touch the same report rows.
                    Err(e) if e.is_retryable() && tries < DEADLOCK_RETRIES => tries += 1,
                    Err(e) => return Err(ProjectionError::new(e)),
                }
            }
            done.push(database);
        }
        // The databases without events in this batch get its progress on their own.
        merchant::record_progress(&self.map, progress, &done)
            .await
            .map_err(ProjectionError::new)
    }
}
