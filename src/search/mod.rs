//! Order search (SPEC 6): an embedded full-text index of every order at its latest version,
//! fed by the order event stream and answering `GET /v1/search/orders`.
//!
//! - [`OrderIndex`] is the seam: upsert snapshots, search, clear. [`index::TantivyIndex`] is
//!   the one implementation, a tantivy index in `search.data_dir`. A deployment that outgrows
//!   one index on one disk moves to a distributed engine (Quickwit, OpenSearch) behind the
//!   same trait; nothing above it knows which engine answers.
//! - [`projection::Search`] is the read model's [`crate::events::consumer::Projection`]
//!   (durable consumer `search`), and [`projection::run`] the loop `serve` runs.
//!
//! # Invariants
//! - **One document per order, at the highest version seen.** An upsert of a version at or
//!   below the indexed one changes nothing, so redeliveries, replays of the whole stream and
//!   a rebuild overlapping the stream are harmless.
//! - **Visibility is part of the query** ([`Scope`]): a user's search matches only their
//!   orders, a merchant's only its shop's, before the limit is applied, never filtered after.
//! - **Applied means committed:** an upsert answers only once the index committed it and the
//!   searcher sees it, so the consumer acknowledges only what a crash cannot lose.
//!
//! The module sits beside `storage` rather than inside `events`: it is a store of its own
//! (its schema, its files), written by the event stream and read by HTTP, and HTTP must not
//! depend on the event machinery to read it.

pub mod index;
pub mod projection;

use chrono::{DateTime, Utc};

use crate::domain::actor::Caller;
use crate::domain::events::OrderSnapshot;
use crate::domain::ids::{ShopId, UserId};
use crate::domain::status::OrderStatus;

/// Results per search at most, and by default: as `GET /v1/orders` pages (SPEC 6), enough
/// for a screen of results, and a search fetches and decodes every stored snapshot it returns.
pub const MAX_LIMIT: usize = 100;
pub const DEFAULT_LIMIT: usize = 20;

/// Whose orders a search may match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User(UserId),
    Shop(ShopId),
    All,
}

impl Scope {
    /// What `caller` may search: a user their orders, a merchant its shop's, an administrator
    /// all. `None` for the payment channel, which acts on orders by id and searches nothing.
    pub fn of(caller: Caller) -> Option<Scope> {
        match caller {
            Caller::User(u) => Some(Scope::User(u)),
            Caller::Merchant { shop, .. } => Some(Scope::Shop(shop)),
            Caller::Admin(_) => Some(Scope::All),
            Caller::Service => None,
        }
    }
}

/// A search: every condition must hold. Results come newest first (by `created_at`), not by
/// relevance: a buyer looking for an order remembers roughly when, and the newest match is
/// the one they mean far more often than the best-scoring one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    pub scope: Scope,
    /// Matches when every word is in a product name of the order, or it is the order's id,
    /// or exactly its tracking number. `None`: every order of the scope.
    pub text: Option<String>,
    pub status: Option<OrderStatus>,
    /// Inclusive.
    pub created_from: Option<DateTime<Utc>>,
    /// Exclusive (as in `GET /v1/orders`).
    pub created_to: Option<DateTime<Utc>>,
    /// 1 to [`MAX_LIMIT`].
    pub limit: usize,
}

impl SearchQuery {
    pub fn new(scope: Scope) -> SearchQuery {
        SearchQuery {
            scope,
            text: None,
            status: None,
            created_from: None,
            created_to: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upserted {
    /// Orders whose document was written (new, or a newer version).
    pub written: usize,
    /// Snapshots at or below the indexed version (or older than another of the same batch).
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Another writer (another process on the same data directory) holds the index.
    #[error("another process holds the search index writer")]
    Locked,
    #[error("search index: {0}")]
    Engine(String),
    #[error("search index directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("indexed snapshot is malformed: {0}")]
    Snapshot(String),
}

/// The order index behind search. Calls block (disk, CPU): async callers run them on the
/// blocking pool.
pub trait OrderIndex: Send + Sync + 'static {
    /// Makes each snapshot's order the indexed one unless the index holds that version or a
    /// newer one; answers once committed and visible to [`OrderIndex::search`].
    fn upsert(&self, snapshots: &[OrderSnapshot]) -> Result<Upserted, IndexError>;

    /// The orders matching `query`, newest first, at most `query.limit`.
    fn search(&self, query: &SearchQuery) -> Result<Vec<OrderSnapshot>, IndexError>;

    /// Removes every document (the reset of a rebuild); committed when it answers.
    fn clear(&self) -> Result<(), IndexError>;

    /// Whether the deployment's index is another one (written on another host): searches
    /// here must be refused rather than answered from an index the stream does not feed.
    fn fed_elsewhere(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_but_the_payment_channel_has_a_scope() {
        let u = UserId::new(7).unwrap();
        let shop = ShopId::new(9).unwrap();
        assert_eq!(Scope::of(Caller::User(u)), Some(Scope::User(u)));
        assert_eq!(
            Scope::of(Caller::Merchant { user: u, shop }),
            Some(Scope::Shop(shop))
        );
        assert_eq!(Scope::of(Caller::Admin(u)), Some(Scope::All));
        assert_eq!(Scope::of(Caller::Service), None);
    }
}
