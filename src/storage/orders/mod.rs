//! SQL of the order tables of a shard, and the one door every order write goes through.
//!
//! Every function names the shard's tables it touches through
//! [`ShardTables`](super::shards::ShardTables); the id and
//! user routing happened before. One concern per file:
//! - [`rows`]: decoding order rows and their children; [`load_order`].
//! - [`list`]: a buyer's list, its filters and keyset ([`ListQuery`]), shared with the archive.
//! - [`create`]: what a create reads before it writes ([`id_state`], [`request_hashes`]).
//! - [`voids`]: the void handshake between a late create and the sweeper.
//! - [`changes`]: status and `PATCH` compare-and-set plans ([`StatusChange`], [`FieldChanges`]).
//! - [`money`]: payments and refunds, on a shard or on an archived order ([`MoneyMovement`]):
//!   the locked reads and [`money_rule`](crate::domain::payment_rules::money_rule)'s plan.
//! - [`due`]: what the sweeper, the closer and the completer move next.
//! - [`archive_move`]: the archiver's scans, counts and the plan of its move out of the shard.
//! - [`mod@commit`]: **the one door**.
//!
//! # One door
//! Every change of an order goes through [`mod@commit`] ([`write_order`] for a shard,
//! [`fn@commit`] with an [`OrderDoor`] for a shard or the archive; [`OrderWrite`] and
//! [`ArchiveWrite`] name the changes): it runs the write as one statement or one short
//! transaction and answers what committed ([`Committed`]: ids, version, status, GTID) or why
//! nothing did ([`NotWritten`]). Changes are compare-and-set statements on `version` and
//! `status`; a caller that lost reloads to say why. Every write that moves the version writes
//! its event into the outbox in the same transaction; the stock-release bookkeeping moves no
//! version and tells the outside nothing, so it writes none.
//!
//! `commit.rs` is the only file of the crate that holds SQL inserting, updating or deleting
//! rows of the order tables (`orders_NN`, `order_items_NN`, `order_payments_NN`,
//! `order_discounts_NN`, `order_voids_NN`, the archive's `archived_orders`) or inserting an
//! order event (`order_outbox`, in a shard database or the archive's); the other files here
//! read and build what to write. The door's entries are `pub(crate)`, so nothing outside the
//! crate can reach them. The test `tests/one_door.rs` scans every file under `src/` and fails,
//! naming file and line, on such a statement anywhere else, so no write path can commit around
//! the door.
//!
//! The void handshake that keeps a late create from landing after its stock went back is
//! described in [`voids`].

mod archive_move;
mod changes;
mod commit;
mod create;
mod due;
mod list;
mod money;
mod rows;
mod voids;

pub use archive_move::{archive_counts, archive_scan_end, last_logged_gtid, versions_of, Deleted};
pub use changes::{FieldChanges, StatusChange};
#[cfg(feature = "testkit")]
pub use commit::commit_without_after_commit;
pub(crate) use commit::{commit, delete_archived, void_unless_written};
pub use commit::{ArchiveWrite, Committed, NotWritten, OrderDoor, OrderWrite};
pub use create::{id_state, request_hash_of, request_hashes, IdState};
pub use due::{expired_unpaid, release_pending, shipped_before};
pub(in crate::storage) use list::{bind_user_list, user_list_sql};
pub use list::{has_archived_orders, list_user_orders, ListQuery};
pub use money::MoneyMovement;
pub use rows::load_order;
pub use voids::{sweeper_connection, VoidOutcome, SWEEPER_LOCK_WAIT_SECS};

pub(crate) use commit::{remove_stale, store_batch};
